"""Helpers for the test_nvme_target_* suites: a raw NVMe/TCP queue and target configs.

`RawQueue` speaks the wire protocol with nothing but `nvme/pdu.py` and `nvme/structs.py`,
so a test can send exactly the bytes it wants - including wrong ones - and see exactly
which PDUs the target answers with (how many C2HData, whether a CapsuleResp follows,
the SQHD of each CQE, the FES/FEI of a C2HTermReq). The Python initiator
(blocktarget.host) would hide or refuse all of that, by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from blocktarget.nvme import pdu, spec
from blocktarget.nvme.structs import (
    Cqe,
    build_connect_data,
    build_connect_sqe,
    build_fabrics_sqe,
    build_property_get_sqe,
    build_property_set_sqe,
    build_sqe,
    parse_cqe,
)

from .target_proc import Launcher, RunningTarget, free_port, listen_address, malloc

NQN = "nqn.2016-06.io.blocktarget.test:target"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6a1c1b7e-2f4d-4c8e-9a3b-0c2d4e6f8a10"
HOSTID = uuid.UUID("6a1c1b7e-2f4d-4c8e-9a3b-0c2d4e6f8a10").bytes
PSDT_SGL = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT
ADMIN_SQSIZE = 31  # 32 entries, the minimum admin queue (0's based)
TIMEOUT = 5.0

G = spec.Sct.GENERIC
CS = spec.Sct.COMMAND_SPECIFIC


def status(sct: int, sc: int) -> tuple[int, int]:
    return sct, sc


def sct_sc(cqe: Cqe) -> tuple[int, int]:
    return spec.status_sct(cqe.status), spec.status_sc(cqe.status)


# ------------------------------------------------------------------- target configs


def nvmf_target_config(port: int, *, transport: dict[str, Any] | None = None,
                       ns: list[dict[str, Any]] | None = None,
                       bdevs: list[dict[str, Any]] | None = None,
                       extra: list[dict[str, Any]] | None = None,
                       allow_any_host: bool = True, serial: str = "BTTEST0001",
                       model: str | None = None) -> dict[str, Any]:
    """One subsystem (NQN) on 127.0.0.1:port; by default one 32 MiB malloc namespace
    with 512-byte blocks. Returns the SPDK-shape config document."""
    bdevs = bdevs if bdevs is not None else [malloc("Malloc0", 65536, 512)]
    ns = ns if ns is not None else [{"bdev_name": "Malloc0", "nsid": 1}]
    sub: dict[str, Any] = {"nqn": NQN, "allow_any_host": allow_any_host,
                           "serial_number": serial}
    if model is not None:
        sub["model_number"] = model
    nvmf: list[dict[str, Any]] = [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP", **(transport or {})}},
        {"method": "nvmf_create_subsystem", "params": sub},
    ]
    for n in ns:
        nvmf.append({"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": n}})
    nvmf.append({"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": listen_address(port)}})
    nvmf.extend(extra or [])
    return {"subsystems": [{"subsystem": "bdev", "config": bdevs},
                           {"subsystem": "nvmf", "config": nvmf}]}


@dataclass
class Tgt:
    """A running target and where it listens."""

    proc: RunningTarget
    port: int
    addr: str = "127.0.0.1"
    nqn: str = NQN

    def rpc(self, method: str, **params: Any) -> Any:
        return self.proc.rpc(method, **params)

    def sync_reactors(self) -> None:
        self.proc.sync_reactors()


def start_target(launcher: Launcher, cores: tuple[int, ...] = (0,), **kw: Any) -> Tgt:
    port = free_port()
    rt = launcher(nvmf_target_config(port, **kw), cores=list(cores))
    return Tgt(rt, port)


# ------------------------------------------------------------------------ raw queue


@dataclass
class Result:
    """What the target sent for one command: its CQE (None when C2HData carried the
    SUCCESS flag instead), the data, and every PDU that belonged to it, in order."""

    cqe: Cqe | None
    data: bytes = b""
    pdus: list[Any] = field(default_factory=list)

    @property
    def status(self) -> tuple[int, int]:
        return (0, 0) if self.cqe is None else sct_sc(self.cqe)

    @property
    def ok(self) -> bool:
        return self.cqe is None or self.cqe.status == 0


class RawQueue:
    """One NVMe/TCP connection driven by hand. Everything is explicit: `icreq()`,
    `connect()`, `enable()`; `run()` sends one command and collects its PDUs, answering
    R2Ts with H2CData unless told not to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.dec = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
        self.hdgst = False
        self.ddgst = False
        self.pending: list[Any] = []
        self.next_cid = 1
        self.qid = -1
        self.cntlid = 0

    @classmethod
    async def open(cls, addr: str, port: int) -> RawQueue:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(addr, port, family=family), TIMEOUT)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    # ---- bytes ----
    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def encode(self, p: Any, **kw: Any) -> bytes:
        kw.setdefault("hdgst", self.hdgst)
        kw.setdefault("ddgst", self.ddgst)
        return b"".join(bytes(b) for b in pdu.encode(p, **kw))

    async def send(self, *pdus: Any) -> None:
        await self.send_bytes(b"".join(self.encode(p) for p in pdus))

    async def recv(self, timeout: float = TIMEOUT) -> Any:
        """The next PDU from the target; EOFError when it closed the connection."""
        while not self.pending:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError("target closed the connection")
            # (the decoder pauses after ICResp; icreq() applies digests, then resumes)
            self.pending.extend(self.dec.feed(data))
        return self.pending.pop(0)

    async def closed_by_target(self, timeout: float = TIMEOUT) -> bool:
        """True once the target has closed the connection (EOF or reset)."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    async def expect_term(self, fes: int, fei: int, timeout: float = TIMEOUT) -> pdu.TermReq:
        """The target's answer to a protocol violation: a C2HTermReq with this FES/FEI,
        then the connection closes."""
        p = await self.recv(timeout)
        assert type(p) is pdu.TermReq and p.c2h, f"expected a C2HTermReq, got {p!r}"
        assert (p.fes, p.fei) == (fes, fei), f"FES/FEI {p.fes}/{p.fei}, wanted {fes}/{fei}"
        assert await self.closed_by_target(timeout), "connection still open after TermReq"
        return p

    # ---- connection set-up ----
    async def icreq(self, *, hdgst: bool = False, ddgst: bool = False, pfv: int = 0,
                    hpda: int = 0, maxr2t: int = 0) -> pdu.ICResp:
        dgst = (pdu.DGST_HEADER if hdgst else 0) | (pdu.DGST_DATA if ddgst else 0)
        await self.send_bytes(self.encode(pdu.ICReq(pfv=pfv, hpda=hpda, dgst=dgst,
                                                    maxr2t=maxr2t)))
        resp = await self.recv()
        assert type(resp) is pdu.ICResp, resp
        self.hdgst, self.ddgst = resp.header_digest, resp.data_digest
        self.dec.set_digests(self.hdgst, self.ddgst)
        if self.dec.buffered:
            self.pending.extend(self.dec.feed(b""))
        return resp

    def cid(self) -> int:
        c = self.next_cid
        self.next_cid = (self.next_cid + 1) & 0xFFFF or 1
        return c

    async def connect(self, qid: int, subnqn: str = NQN, *, hostnqn: str = HOSTNQN,
                      hostid: bytes = HOSTID, cntlid: int = spec.CNTLID_DYNAMIC,
                      sqsize: int | None = None, cattr: int = 0, kato: int = 0,
                      recfmt: int = spec.CONNECT_RECFMT) -> Cqe:
        if sqsize is None:
            sqsize = ADMIN_SQSIZE if qid == 0 else 63
        sqe = build_connect_sqe(self.cid(), qid, sqsize, kato, cattr=cattr, recfmt=recfmt)
        data = build_connect_data(hostid, cntlid, subnqn, hostnqn)
        r = await self.run(sqe, data)
        assert r.cqe is not None
        if r.cqe.status == 0:
            self.qid = qid
            self.cntlid = r.cqe.dw0 & 0xFFFF
        return r.cqe

    async def property_get(self, offset: int, size: int = 4) -> Cqe:
        r = await self.run(build_property_get_sqe(self.cid(), offset, size))
        assert r.cqe is not None
        return r.cqe

    async def property_set(self, offset: int, value: int, size: int = 4) -> Cqe:
        r = await self.run(build_property_set_sqe(self.cid(), offset, value, size))
        assert r.cqe is not None
        return r.cqe

    async def enable(self) -> None:
        cc = (spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT)
              | (spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT))
        assert (await self.property_set(spec.Property.CC, cc)).status == 0
        for _ in range(100):
            if (await self.property_get(spec.Property.CSTS)).dw0 & spec.CSTS_RDY:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("CSTS.RDY never came")

    # ---- commands ----
    def sqe(self, opcode: int, nsid: int = 0, *, cid: int | None = None, sgl_len: int = 0,
            sgl_id: int | None = None, sgl_addr: int = 0, flags: int = PSDT_SGL,
            **cdws: int) -> bytes:
        if sgl_id is None:
            sgl_id = spec.SGL_ID_TRANSPORT if sgl_len else 0
        return build_sqe(opcode, self.cid() if cid is None else cid, nsid, flags=flags,
                         sgl_addr=sgl_addr, sgl_len=sgl_len, sgl_id=sgl_id, **cdws)

    def fabrics_sqe(self, fctype: int, **kw: int) -> bytes:
        return build_fabrics_sqe(fctype, self.cid(), **kw)

    async def run(self, sqe: bytes, icd: bytes = b"", *, data_out: bytes = b"",
                  answer_r2t: bool = True, timeout: float = TIMEOUT) -> Result:
        """Send one capsule (with `icd` in it) and collect PDUs up to its completion.
        `data_out` is what to send when the target asks with R2T."""
        await self.send(pdu.CapsuleCmd(sqe, icd))
        return await self.collect(int.from_bytes(sqe[2:4], "little"), data_out=data_out,
                                  answer_r2t=answer_r2t, timeout=timeout)

    async def collect(self, cid: int, *, data_out: bytes = b"", answer_r2t: bool = True,
                      timeout: float = TIMEOUT) -> Result:
        res = Result(None)
        data = bytearray()
        while True:
            p = await self.recv(timeout)
            if type(p) is pdu.TermReq:
                raise AssertionError(f"target terminated the connection: {p!r}")
            if getattr(p, "cccid", getattr(p, "cid", None)) != cid:
                raise AssertionError(f"PDU for another command: {p!r}")
            res.pdus.append(p)
            if type(p) is pdu.C2HData:
                assert p.datao == len(data), (p.datao, len(data))
                data += p.data
                if p.success:
                    res.data = bytes(data)
                    return res
            elif type(p) is pdu.R2T:
                if not answer_r2t:
                    res.data = bytes(data)
                    return res
                chunk = data_out[p.r2to : p.r2to + p.r2tl]
                await self.send(pdu.H2CData(cccid=cid, ttag=p.ttag, datao=p.r2to, data=chunk,
                                            last=True))
            elif type(p) is pdu.CapsuleResp:
                res.cqe = parse_cqe(p.cqe)
                res.data = bytes(data)
                return res

    # ---- NVMe helpers ----
    async def admin(self, opcode: int, nsid: int = 0, *, in_len: int = 0,
                    data: bytes = b"", **cdws: int) -> Result:
        if data:
            return await self.run(self.sqe(opcode, nsid, sgl_len=len(data),
                                           sgl_id=spec.SGL_ID_INCAPSULE, **cdws), data)
        return await self.run(self.sqe(opcode, nsid, sgl_len=in_len, **cdws))

    async def read(self, nsid: int, slba: int, nlb: int, block: int = 512,
                   timeout: float = TIMEOUT) -> Result:
        return await self.run(self.sqe(spec.IoOpcode.READ, nsid, sgl_len=nlb * block,
                                       cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                                       cdw12=nlb - 1), timeout=timeout)

    async def write(self, nsid: int, slba: int, data: bytes, block: int = 512, *,
                    in_capsule: bool = False) -> Result:
        nlb = len(data) // block
        cdws = {"cdw10": slba & 0xFFFFFFFF, "cdw11": slba >> 32, "cdw12": nlb - 1}
        if in_capsule:
            return await self.run(self.sqe(spec.IoOpcode.WRITE, nsid, sgl_len=len(data),
                                           sgl_id=spec.SGL_ID_INCAPSULE, **cdws), data)
        return await self.run(self.sqe(spec.IoOpcode.WRITE, nsid, sgl_len=len(data), **cdws),
                              data_out=data)


async def open_queue(addr: str, port: int, *, hdgst: bool = False,
                     ddgst: bool = False) -> RawQueue:
    q = await RawQueue.open(addr, port)
    await q.icreq(hdgst=hdgst, ddgst=ddgst)
    return q


@dataclass
class RawController:
    admin: RawQueue
    io: list[RawQueue]

    @property
    def cntlid(self) -> int:
        return self.admin.cntlid

    async def close(self) -> None:
        for q in [*self.io, self.admin]:
            await q.close()


@contextlib.asynccontextmanager
async def raw_controller(t: Tgt, *, nr_io: int = 1, hdgst: bool = False, ddgst: bool = False,
                         cattr: int = 0, kato: int = 0, io_sqsize: int = 63,
                         subnqn: str | None = None,
                         hostnqn: str = HOSTNQN) -> AsyncIterator[RawController]:
    """Admin queue connected and enabled, plus `nr_io` connected I/O queues."""
    admin = await open_queue(t.addr, t.port, hdgst=hdgst, ddgst=ddgst)
    ctrl = RawController(admin, [])
    try:
        cqe = await admin.connect(0, subnqn or t.nqn, kato=kato, hostnqn=hostnqn)
        assert cqe.status == 0, sct_sc(cqe)
        await admin.enable()
        for qid in range(1, nr_io + 1):
            q = await open_queue(t.addr, t.port, hdgst=hdgst, ddgst=ddgst)
            ctrl.io.append(q)
            cqe = await q.connect(qid, subnqn or t.nqn, cntlid=admin.cntlid, cattr=cattr,
                                  sqsize=io_sqsize, hostnqn=hostnqn)
            assert cqe.status == 0, sct_sc(cqe)
        yield ctrl
    finally:
        await ctrl.close()


def random_data(n: int) -> bytes:
    return os.urandom(n)
