"""Hostile input through the whole target-side command path, without sockets.

A real `Target` (malloc namespace, subsystem, listener) and a real `nvme.qpair.Qpair` are
driven through `data_received` with a fake transport that records what the target writes.
A small host model answers R2Ts and decodes every PDU the target sends, so each property
can check the two things a hostile peer must never break:

* nothing raises out of `data_received` (an exception there kills the connection's
  protocol callback in the event loop, and on a shared reactor may disturb others), and
  no handler falls into the catch-all Internal Error (a handler crash in disguise);
* every capsule is answered exactly once (a CapsuleResp, or C2HData with SUCCESS), except
  Asynchronous Event Requests, which are held - or the connection is terminated with a
  C2HTermReq / closed (Disconnect, CC change), after which nothing is owed.

The commands are generated to reach every parser: random SQEs on an unconnected queue,
random Connect SQE fields and Connect data, Property Get/Set with any offset/size/value,
Identify / Get Log Page / Get+Set Features with random CDWs, and I/O commands with
random CDWs and SGL descriptors (in-capsule, transport, anything else).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktarget.app import Target
from blocktarget.config import Settings
from blocktarget.nvme import pdu, spec
from blocktarget.nvme.qpair import Qpair
from blocktarget.nvme.structs import (
    build_connect_data,
    build_connect_sqe,
    build_property_get_sqe,
    build_property_set_sqe,
    build_sqe,
    parse_cqe,
)
from blocktarget.reactor import Reactor

NQN = "nqn.2026-01.io.blocktarget.test:fuzz"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100"
HOSTID = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100").bytes
PSDT_SGL = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT
SC_INTERNAL = (spec.Sct.GENERIC, spec.GenericStatus.INTERNAL)
AER = spec.AdminOpcode.ASYNC_EVENT_REQUEST
BLOCKS = 2048  # 1 MiB malloc namespace with 512-byte blocks

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


class FakeTransport:
    """Just enough of asyncio.Transport for Qpair: records writes, remembers close()."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def writelines(self, bufs: Any) -> None:
        for b in bufs:
            self.out += b

    def write(self, b: Any) -> None:
        self.out += b

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 4420)}.get(
            name, default)


class SimTarget:
    """One in-process target whose reactor is the calling thread's own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.target = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False,
                                      pin=False))
        doc = {"subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create",
                 "params": {"name": "M0", "num_blocks": BLOCKS, "block_size": 512}}]},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": NQN, "allow_any_host": True}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": NQN, "namespace": {"bdev_name": "M0", "nsid": 1}}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": {
                     "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                     "trsvcid": "4420"}}},
            ]},
        ]}
        self.loop.run_until_complete(self.target.apply_config(doc, "fuzz"))
        self.addr = next(iter(self.target.subsystems.find(NQN).listeners))
        self.reactor = Reactor(index=0, core=0, pin=False)
        self.reactor.loop = self.loop
        self.reactor.tid = threading.get_native_id()

    def close(self) -> None:
        self.loop.close()

    def run_pending(self) -> None:
        """Let call_soon'd flushes run (bdev completions of malloc are inline)."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))


class Host:
    """The peer of one Qpair: sends PDUs, answers R2Ts, accounts for every response."""

    def __init__(self, sim: SimTarget) -> None:
        self.sim = sim
        self.tr = FakeTransport()
        self.qp = Qpair(sim.target, sim.reactor, sim.addr)
        self.qp.connection_made(self.tr)  # type: ignore[arg-type]
        self.dec = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
        self.read = 0
        self.responses: dict[int, int] = {}  # cid -> completions seen
        self.cqes: dict[int, Any] = {}
        self.c2h: dict[int, int] = {}  # cid -> bytes of C2HData
        self.terminated = False
        self.next_cid = 1
        self.xfer: dict[int, int] = {}  # cid -> SGL length of the command

    @property
    def closed(self) -> bool:
        return self.qp.closed

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        self.qp.data_received(data)  # must never raise
        self.sim.run_pending()
        self._drain()

    def _drain(self) -> None:
        new = bytes(self.tr.out[self.read:])
        self.read = len(self.tr.out)
        pdus = self.dec.feed(new)
        while pdus:
            p = pdus.pop(0)
            t = type(p)
            if t is pdu.ICResp:
                self.dec.set_digests(p.header_digest, p.data_digest)
                pdus.extend(self.dec.feed(b""))
            elif t is pdu.TermReq:
                assert p.c2h
                self.terminated = True
                assert self.closed, "C2HTermReq sent but the connection stays open"
            elif t is pdu.CapsuleResp:
                cqe = parse_cqe(p.cqe)
                self._answered(cqe.cid)
                self.cqes[cqe.cid] = cqe
                st_ = (spec.status_sct(cqe.status), spec.status_sc(cqe.status))
                assert st_ != SC_INTERNAL, f"a handler crashed on cid {cqe.cid}"
            elif t is pdu.C2HData:
                assert p.datao == self.c2h.get(p.cccid, 0), "C2HData out of order"
                self.c2h[p.cccid] = p.datao + len(p.data)
                assert self.c2h[p.cccid] <= max(self.xfer.get(p.cccid, 0), 1 << 20)
                if p.success:
                    self._answered(p.cccid)
            elif t is pdu.R2T:
                assert p.r2to == 0 and p.r2tl == self.xfer.get(p.cccid), p
                h2c = pdu.H2CData(cccid=p.cccid, ttag=p.ttag, datao=0,
                                  data=bytes(p.r2tl), last=True)
                wire = b"".join(bytes(b) for b in pdu.encode(h2c, hdgst=self.qp.hdgst,
                                                               ddgst=self.qp.ddgst))
                self.qp.data_received(wire)
                self.sim.run_pending()
                new = bytes(self.tr.out[self.read:])
                self.read = len(self.tr.out)
                pdus.extend(self.dec.feed(new))
            else:
                raise AssertionError(f"unexpected PDU {p!r}")

    def _answered(self, cid: int) -> None:
        self.responses[cid] = self.responses.get(cid, 0) + 1
        assert self.responses[cid] == 1, f"cid {cid} answered twice"

    # ---- commands ----
    def icreq(self) -> None:
        self.feed(b"".join(bytes(b) for b in pdu.encode(pdu.ICReq())))
        assert self.qp.ic_done

    def capsule(self, sqe: bytes, icd: bytes = b"", *, keep_cid: bool = False) -> int:
        """Send one capsule (a fresh CID unless keep_cid), return its CID."""
        sqe = bytearray(sqe)
        if not keep_cid:
            cid = self.next_cid
            self.next_cid += 1
            sqe[2:4] = cid.to_bytes(2, "little")
        cid = int.from_bytes(sqe[2:4], "little")
        self.xfer[cid] = int.from_bytes(sqe[32:36], "little")
        wire = b"".join(bytes(b) for b in pdu.encode(pdu.CapsuleCmd(bytes(sqe), icd),
                                                       hdgst=self.qp.hdgst,
                                                       ddgst=self.qp.ddgst))
        self.feed(wire)
        return cid

    def check_answered(self, cid: int, opcode: int) -> None:
        """The property: answered exactly once, held (AER), or the connection ended."""
        n = self.responses.get(cid, 0)
        if self.closed:
            assert n <= 1
            return
        if opcode == AER and self.qp.qid == 0:
            assert n <= 1
            return
        assert n == 1, f"cid {cid} opcode {opcode:#x} answered {n} times"

    def ok(self, cid: int) -> bool:
        cqe = self.cqes.get(cid)
        return self.responses.get(cid) == 1 and (cqe is None or cqe.status == 0)

    # ---- bring-up ----
    def connect_admin(self) -> int:
        self.icreq()
        cid = self.capsule(build_connect_sqe(0, 0, 31, 0),
                           build_connect_data(HOSTID, spec.CNTLID_DYNAMIC, NQN, HOSTNQN))
        assert self.ok(cid), self.cqes.get(cid)
        return self.cqes[cid].dw0 & 0xFFFF

    def enable(self) -> None:
        cc = (spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT)
              | (spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT))
        assert self.ok(self.capsule(build_property_set_sqe(0, spec.Property.CC, cc)))
        assert self.qp.ctrl is not None and self.qp.ctrl.csts & spec.CSTS_RDY

    def connect_io(self, cntlid: int, qid: int = 1) -> None:
        self.icreq()
        cid = self.capsule(build_connect_sqe(0, qid, 63, 0),
                           build_connect_data(HOSTID, cntlid, NQN, HOSTNQN))
        assert self.ok(cid), self.cqes.get(cid)

    def close(self) -> None:
        if not self.qp.closed:
            self.qp.connection_lost(None)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimTarget]:
    s = SimTarget()
    yield s
    s.close()


def admin_host(sim: SimTarget) -> Host:
    h = Host(sim)
    h.connect_admin()
    h.enable()
    return h


# ------------------------------------------------------------------ strategies

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 2, 0x7FFFFFFF, 0xFFFFFFFF]))
small_u32 = st.one_of(st.integers(0, 64), u32)
SGL_IDS = [spec.SGL_ID_INCAPSULE, spec.SGL_ID_TRANSPORT, 0x00, 0x5A, 0x01, 0x30, 0xFF]


@st.composite
def sqes(draw: Any, opcodes: Any, *, nsid: Any = None, max_len: int = 1 << 17,
         ) -> tuple[int, bytes, bytes]:
    """An SQE with random CDWs and SGL descriptor, plus in-capsule data that sometimes
    matches its SGL. Returns (opcode, sqe, icd)."""
    opcode = draw(opcodes)
    flags = draw(st.one_of(st.just(PSDT_SGL), u8))
    sgl_id = draw(st.one_of(st.sampled_from(SGL_IDS), u8))
    icd_len = draw(st.one_of(st.just(0), st.integers(1, 4096), st.sampled_from([1024, 8192])))
    sgl_len = draw(st.one_of(st.just(icd_len), st.integers(0, max_len),
                             st.sampled_from([512, 4096, 0x20000, 0x20001, 0xFFFFFFFF])))
    sgl_addr = draw(st.one_of(st.just(0), st.integers(0, 2**64 - 1)))
    cdw = [draw(small_u32) for _ in range(6)]
    sqe = build_sqe(opcode, 0, draw(nsid if nsid is not None else st.one_of(
                        st.sampled_from([0, 1, 2, 0xFFFFFFFF]), u32)),
                    flags=flags, sgl_addr=sgl_addr, sgl_len=sgl_len & 0xFFFFFFFF,
                    sgl_id=sgl_id, cdw10=cdw[0], cdw11=cdw[1], cdw12=cdw[2], cdw13=cdw[3],
                    cdw14=cdw[4], cdw15=cdw[5])
    sqe = bytearray(sqe)
    sqe[4:8] = draw(st.binary(min_size=4, max_size=4))  # cdw2..: whatever the host likes
    return opcode, bytes(sqe), bytes(icd_len)


ADMIN_OPS = st.one_of(st.sampled_from([int(o) for o in spec.AdminOpcode]), u8)
IO_OPS = st.one_of(st.sampled_from([int(o) for o in spec.IoOpcode]), u8)
FABRICS_SQE = st.builds(
    lambda fctype, cdws: (spec.FABRICS_OPCODE, fctype, cdws),
    st.one_of(st.sampled_from([int(f) for f in spec.FabricsType]), u8),
    st.lists(u32, min_size=6, max_size=6))


def fabrics_raw(fctype: int, cdws: list[int], rest: bytes) -> bytes:
    """A Fabrics SQE: opcode 7Fh, fctype at byte 4, the rest as the host likes."""
    sqe = bytearray(rest.ljust(64, b"\0")[:64])
    sqe[0] = spec.FABRICS_OPCODE
    sqe[4] = fctype
    for i, v in enumerate(cdws):
        sqe[40 + 4 * i: 44 + 4 * i] = v.to_bytes(4, "little")
    return bytes(sqe)


# ------------------------------------------------------------------ properties


@SETTINGS
@given(st.lists(st.tuples(st.binary(min_size=64, max_size=64),
                          st.one_of(st.just(b""), st.binary(max_size=2048))),
                min_size=1, max_size=6))
def test_random_sqes_on_unconnected_queue(sim: SimTarget, cmds: list[tuple[bytes, bytes]]
                                          ) -> None:
    """Before Connect only Connect is meaningful; anything else is answered (Command
    Sequence Error and friends), never executed, and never buffered for (no R2T)."""
    h = Host(sim)
    try:
        h.icreq()
        for raw, icd in cmds:
            cid = h.capsule(raw, icd)
            h.check_answered(cid, raw[0])
            if h.closed:
                break
    finally:
        h.close()


@st.composite
def connect_cases(draw: Any) -> tuple[bytes, bytes]:
    qid = draw(st.one_of(st.sampled_from([0, 1, 2, 0xFFFF]), u16))
    sqsize = draw(st.one_of(st.sampled_from([0, 1, 31, 63, 127, 128, 0xFFFF]), u16))
    kato = draw(st.one_of(st.just(0), u32))
    cattr = draw(u8)
    recfmt = draw(st.one_of(st.just(spec.CONNECT_RECFMT), u16))
    sqe = bytearray(build_connect_sqe(0, qid, sqsize, 0, cattr=cattr, recfmt=recfmt))
    sqe[48:52] = kato.to_bytes(4, "little")
    nqn = st.one_of(st.sampled_from([NQN, spec.DISCOVERY_NQN, "", NQN + "x"]),
                    st.text(max_size=300))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        data = draw(st.binary(min_size=0, max_size=1100))
    else:
        hostid = draw(st.one_of(st.just(HOSTID), st.just(bytes(16)),
                                st.binary(min_size=16, max_size=16)))
        cntlid = draw(st.one_of(st.just(spec.CNTLID_DYNAMIC), u16))
        try:
            data = build_connect_data(hostid, cntlid, draw(nqn), draw(nqn))
        except ValueError:
            data = draw(st.binary(min_size=1024, max_size=1024))
        if kind == 3:  # flip some bytes of an otherwise valid record
            b = bytearray(data)
            for pos, val in draw(st.lists(st.tuples(st.integers(0, 1023), u8), max_size=8)):
                b[pos] = val
            data = bytes(b)
    return bytes(sqe), data


@SETTINGS
@given(connect_cases(), st.booleans())
def test_arbitrary_connect(sim: SimTarget, case: tuple[bytes, bytes], in_capsule: bool) -> None:
    """Random Connect SQE fields and Connect data, in-capsule or through R2T: exactly one
    answer; success only for a well-formed admin or I/O Connect."""
    sqe, data = case
    h = Host(sim)
    try:
        h.icreq()
        if not in_capsule and data:
            b = bytearray(sqe)
            b[32:36] = len(data).to_bytes(4, "little")
            b[39] = spec.SGL_ID_TRANSPORT
            cid = h.capsule(bytes(b))
        else:
            cid = h.capsule(sqe, data)
        h.check_answered(cid, spec.FABRICS_OPCODE)
        if h.ok(cid):
            assert h.qp.qid >= 0 and h.qp.ctrl is not None
    finally:
        h.close()


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 0x2000), st.integers(0, 7),
                          st.integers(0, 2**64 - 1)), min_size=1, max_size=12))
def test_property_get_set_any_value(sim: SimTarget,
                                    ops: list[tuple[bool, int, int, int]]) -> None:
    """Property Get/Set with any offset, size attribute and value: answered once each
    (CC writes may reset or shut down the controller; that is the host's right)."""
    h = Host(sim)
    try:
        h.connect_admin()
        for is_set, offset, attrib, value in ops:
            raw = bytearray(build_property_get_sqe(0, 0) if not is_set
                            else build_property_set_sqe(0, 0, 0))
            raw[40] = attrib  # ATTRIB: size code in bits 2:0, reserved above
            raw[44:48] = offset.to_bytes(4, "little")
            if is_set:
                raw[48:56] = value.to_bytes(8, "little")
            cid = h.capsule(bytes(raw))
            h.check_answered(cid, spec.FABRICS_OPCODE)
            if h.closed:
                break
    finally:
        h.close()


@SETTINGS
@given(st.lists(sqes(ADMIN_OPS), min_size=1, max_size=8))
def test_admin_commands_random_cdws(sim: SimTarget,
                                    cmds: list[tuple[int, bytes, bytes]]) -> None:
    """Identify, Get Log Page, Get/Set Features, Abort, Keep Alive, AER and unknown
    opcodes with random CDWs, NSIDs and SGLs on an enabled admin queue."""
    h = admin_host(sim)
    try:
        for opcode, sqe, icd in cmds:
            cid = h.capsule(sqe, icd if sqe[1] & 1 else b"")
            h.check_answered(cid, opcode)
            if h.closed:
                break
    finally:
        h.close()


ADMIN_FOCUS = st.sampled_from([spec.AdminOpcode.IDENTIFY, spec.AdminOpcode.GET_LOG_PAGE,
                               spec.AdminOpcode.GET_FEATURES, spec.AdminOpcode.SET_FEATURES])


@SETTINGS
@given(st.lists(st.tuples(ADMIN_FOCUS, st.lists(small_u32, min_size=6, max_size=6),
                          st.sampled_from([0, 1, 2, 0xFFFFFFFF]),
                          st.one_of(st.sampled_from([0, 4, 16, 512, 4096, 8192]),
                                    st.integers(0, 1 << 17))),
                min_size=1, max_size=10))
def test_identify_log_features_cdws(sim: SimTarget,
                                    cmds: list[tuple[int, list[int], int, int]]) -> None:
    """The data-returning admin parsers with well-formed SGLs and random CDWs: answered
    once, and never more data than the host's SGL asked for."""
    h = admin_host(sim)
    try:
        for opcode, cdw, nsid, length in cmds:
            sgl_id = spec.SGL_ID_TRANSPORT if length else 0
            icd = b""
            if opcode == spec.AdminOpcode.SET_FEATURES and length and length <= 8192:
                sgl_id, icd = spec.SGL_ID_INCAPSULE, bytes(range(256)) * (length // 256) + bytes(
                    length % 256)
            sqe = build_sqe(opcode, 0, nsid, flags=PSDT_SGL, sgl_len=length, sgl_id=sgl_id,
                            cdw10=cdw[0], cdw11=cdw[1], cdw12=cdw[2], cdw13=cdw[3],
                            cdw14=cdw[4], cdw15=cdw[5])
            cid = h.capsule(sqe, icd)
            h.check_answered(cid, opcode)
            if h.closed:
                break
            assert h.c2h.get(cid, 0) <= length
    finally:
        h.close()


@SETTINGS
@given(st.lists(st.one_of(
    sqes(IO_OPS, nsid=st.sampled_from([1, 1, 1, 0, 2, 0xFFFFFFFF])),
    st.builds(lambda op, slba, nlb, icd: _rw(op, slba, nlb, icd),
              st.sampled_from([spec.IoOpcode.READ, spec.IoOpcode.WRITE,
                               spec.IoOpcode.COMPARE, spec.IoOpcode.WRITE_ZEROES,
                               spec.IoOpcode.DATASET_MANAGEMENT]),
              st.integers(0, BLOCKS + 8), st.integers(0, 300), st.booleans())),
    min_size=1, max_size=10))
def test_io_commands_random_cdws_and_sgls(sim: SimTarget,
                                          cmds: list[tuple[int, bytes, bytes]]) -> None:
    """I/O commands on a connected I/O queue: random CDWs (LBA ranges, NLB, FUA, DSM
    ranges), random SGL types/lengths/offsets, in-capsule or by R2T."""
    admin = admin_host(sim)
    h = Host(sim)
    try:
        h.connect_io(admin.qp.ctrl.cntlid)  # type: ignore[union-attr]
        for opcode, sqe, icd in cmds:
            cid = h.capsule(sqe, icd)
            h.check_answered(cid, opcode)
            if h.closed:
                break
    finally:
        h.close()
        admin.close()


def _rw(opcode: int, slba: int, nlb: int, icd: bool) -> tuple[int, bytes, bytes]:
    """A nearly valid read/write-like command (so the handlers' later checks run)."""
    n = (nlb + 1) * 512
    data = bytes(n) if icd and opcode != spec.IoOpcode.READ and n <= 8192 else b""
    sgl_id = spec.SGL_ID_INCAPSULE if data else spec.SGL_ID_TRANSPORT
    cdw10 = slba if opcode != spec.IoOpcode.DATASET_MANAGEMENT else nlb & 0xFF
    cdw11 = 0 if opcode != spec.IoOpcode.DATASET_MANAGEMENT else 4
    if opcode == spec.IoOpcode.DATASET_MANAGEMENT:
        n = ((nlb & 0xFF) + 1) * 16
        data = bytes(n) if icd and n <= 8192 else b""
        sgl_id = spec.SGL_ID_INCAPSULE if data else spec.SGL_ID_TRANSPORT
    sqe = build_sqe(opcode, 0, 1, flags=PSDT_SGL, sgl_len=n, sgl_id=sgl_id, cdw10=cdw10,
                    cdw11=cdw11, cdw12=nlb)
    return opcode, sqe, data


@SETTINGS
@given(st.lists(st.tuples(FABRICS_SQE, st.binary(min_size=64, max_size=64),
                          st.one_of(st.just(b""), st.binary(max_size=1100))),
                min_size=1, max_size=6), st.booleans())
def test_fabrics_commands_any_fctype(sim: SimTarget, cmds: list[Any], on_io: bool) -> None:
    """Any fctype (Connect again, Property, Disconnect, Auth, unknown) on a connected
    admin or I/O queue."""
    admin = admin_host(sim)
    h = admin
    if on_io:
        h = Host(sim)
        h.connect_io(admin.qp.ctrl.cntlid)  # type: ignore[union-attr]
    try:
        for (_, fctype, cdws), rest, icd in cmds:
            sqe = bytearray(fabrics_raw(fctype, cdws, rest))
            sqe[1] = PSDT_SGL
            if icd:
                sqe[24:32] = bytes(8)
                sqe[32:36] = len(icd).to_bytes(4, "little")
                sqe[39] = spec.SGL_ID_INCAPSULE
            cid = h.capsule(bytes(sqe), icd)
            h.check_answered(cid, spec.FABRICS_OPCODE)
            if h.closed:
                break
    finally:
        h.close()
        admin.close()


@SETTINGS
@given(st.binary(max_size=600), st.integers(1, 64))
def test_garbage_after_icreq_terminates_cleanly(sim: SimTarget, garbage: bytes,
                                                step: int) -> None:
    """Raw garbage after a valid ICReq, fed in pieces: never an exception, and any
    C2HTermReq is followed by the close."""
    h = Host(sim)
    try:
        h.icreq()
        for i in range(0, len(garbage), step):
            h.feed(garbage[i:i + step])
    finally:
        h.close()


def test_large_transport_sgl_before_connect_is_not_buffered(sim: SimTarget) -> None:
    """Regression: a 4 GiB transport SGL on a queue that is not connected made the target
    allocate (and zero) a 4 GiB R2T buffer for a command it was going to refuse anyway."""
    h = Host(sim)
    try:
        h.icreq()
        sqe = build_sqe(spec.IoOpcode.WRITE, 0, 1, flags=PSDT_SGL, sgl_len=0xFFFFFFFF,
                        sgl_id=spec.SGL_ID_TRANSPORT)
        cid = h.capsule(sqe)
        assert h.responses.get(cid) == 1 and not h.qp.r2t_pending
        sqe = build_connect_sqe(0, 0, 31, 0)
        b = bytearray(sqe)
        b[32:36] = (0xFFFFFFFF).to_bytes(4, "little")
        b[39] = spec.SGL_ID_TRANSPORT
        cid = h.capsule(bytes(b))
        assert h.responses.get(cid) == 1 and not h.qp.r2t_pending
    finally:
        h.close()


def test_large_transport_sgl_on_admin_queue_is_not_buffered(sim: SimTarget) -> None:
    """Regression: the same on a connected admin queue (Set Features with a 4 GiB SGL)."""
    h = admin_host(sim)
    try:
        sqe = build_sqe(spec.AdminOpcode.SET_FEATURES, 0, 0, flags=PSDT_SGL,
                        sgl_len=0xFFFFFFFF, sgl_id=spec.SGL_ID_TRANSPORT,
                        cdw10=spec.FeatureId.HOST_ID)
        cid = h.capsule(sqe)
        assert h.responses.get(cid) == 1 and not h.qp.r2t_pending
    finally:
        h.close()


@pytest.mark.parametrize("sgl_len", [0, 4096, 0x20000])
def test_get_log_page_huge_numd_is_refused(sim: SimTarget, sgl_len: int) -> None:
    """Regression: NUMD of 16 GiB on a valid log page was zero-filled to 16 GiB before the
    SGL length cut it (any discovery host could do it). NUMD beyond the host's buffer is
    Invalid Field, as in SPDK."""
    h = admin_host(sim)
    try:
        sqe = build_sqe(spec.AdminOpcode.GET_LOG_PAGE, 0, spec.NSID_ALL, flags=PSDT_SGL,
                        sgl_len=sgl_len, sgl_id=spec.SGL_ID_TRANSPORT if sgl_len else 0,
                        cdw10=spec.LogPage.SMART | (0xFFFF << 16), cdw11=0xFFFF)
        cid = h.capsule(sqe)
        cqe = h.cqes[cid]
        assert (spec.status_sct(cqe.status), spec.status_sc(cqe.status)) == (
            spec.Sct.GENERIC, spec.GenericStatus.INVALID_FIELD)
        assert h.c2h.get(cid, 0) == 0
    finally:
        h.close()


@SETTINGS
@given(st.sampled_from([int(x) for x in spec.LogPage]), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.sampled_from([0, 4, 512, 4096, 0x20000, 0xFFFFFFFF]),
       st.integers(0, 8) .map(lambda x: x * 4))
def test_get_log_page_any_numd(sim: SimTarget, lid: int, numdl: int, numdu: int,
                               sgl_len: int, offset: int) -> None:
    """Every log page, any NUMD and SGL length, small offsets: answered once, never more
    data than the SGL, never a crash (a MemoryError would show as Internal Error)."""
    h = admin_host(sim)
    try:
        sqe = build_sqe(spec.AdminOpcode.GET_LOG_PAGE, 0, spec.NSID_ALL, flags=PSDT_SGL,
                        sgl_len=sgl_len, sgl_id=spec.SGL_ID_TRANSPORT if sgl_len else 0,
                        cdw10=lid | (numdl << 16), cdw11=numdu, cdw12=offset)
        cid = h.capsule(sqe)
        h.check_answered(cid, spec.AdminOpcode.GET_LOG_PAGE)
        assert h.c2h.get(cid, 0) <= sgl_len
    finally:
        h.close()
