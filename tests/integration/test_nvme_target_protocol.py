"""blocktarget's NVMe/TCP target against protocol violations, on raw sockets.

Each violation must be answered the spec's way - a C2HTermReq whose FES names the
error class and whose FEI names the offending field (its byte offset, for Invalid
Header Field / Unsupported Parameter; 0 where the spec reserves FEI), then the
connection closes - and must cost nothing to any other connection. A data digest error
is the exception: the framing is intact, so only the command fails (Transient
Transport Error) and the connection stays up.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator

import pytest

from blocktarget.host import connect
from blocktarget.nvme import pdu, spec

from .nvme_target_util import (
    NQN,
    RawQueue,
    Tgt,
    open_queue,
    raw_controller,
    sct_sc,
    start_target,
)
from .target_proc import Launcher

pytestmark = pytest.mark.timeout(60)

F = pdu.Fes
G = spec.Sct.GENERIC


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        yield start_target(launcher)
    finally:
        launcher.cleanup()


def capsule_bytes(q: RawQueue, opcode: int = spec.AdminOpcode.KEEP_ALIVE) -> bytes:
    return q.encode(pdu.CapsuleCmd(q.sqe(opcode)))


# ------------------------------------------------------------------ connection set-up


async def test_bad_pfv(tgt: Tgt) -> None:
    q = await RawQueue.open(tgt.addr, tgt.port)
    await q.send_bytes(q.encode(pdu.ICReq(pfv=1)))
    term = await q.expect_term(F.UNSUPPORTED_PARAMETER, pdu.OFFSET_IC_PFV)
    assert term.data == b""  # a connection-level parameter: no PDU header to quote


async def test_hpda_out_of_range(tgt: Tgt) -> None:
    q = await RawQueue.open(tgt.addr, tgt.port)
    await q.send_bytes(q.encode(pdu.ICReq(hpda=pdu.MAX_PDA + 1)))
    await q.expect_term(F.INVALID_HEADER_FIELD, pdu.OFFSET_IC_PDA)


async def test_capsule_before_icreq(tgt: Tgt) -> None:
    q = await RawQueue.open(tgt.addr, tgt.port)
    raw = capsule_bytes(q)
    await q.send_bytes(raw)
    term = await q.expect_term(F.PDU_SEQUENCE_ERROR, 0)
    assert term.data == raw[:8]  # the offending PDU's common header


async def test_second_icreq(tgt: Tgt) -> None:
    q = await open_queue(tgt.addr, tgt.port)
    await q.send_bytes(q.encode(pdu.ICReq()))
    await q.expect_term(F.PDU_SEQUENCE_ERROR, 0)


async def test_controller_to_host_pdu_type_from_host(tgt: Tgt) -> None:
    q = await open_queue(tgt.addr, tgt.port)
    await q.send(pdu.C2HData(cccid=1, datao=0, data=bytes(512)))
    term = await q.expect_term(F.INVALID_HEADER_FIELD, pdu.OFFSET_TYPE)
    assert term.data[0] == pdu.PduType.C2H_DATA


async def test_bad_hlen(tgt: Tgt) -> None:
    q = await open_queue(tgt.addr, tgt.port)
    raw = bytearray(capsule_bytes(q))
    raw[2] = 80  # CapsuleCmd hlen is 72
    await q.send_bytes(bytes(raw))
    await q.expect_term(F.INVALID_HEADER_FIELD, pdu.OFFSET_HLEN)


async def test_plen_over_the_limit(tgt: Tgt) -> None:
    """A capsule announcing 16 MiB of in-capsule data: refused from the common header
    alone (nothing is buffered for it) with Data Transfer Limit Exceeded."""
    q = await open_queue(tgt.addr, tgt.port)
    sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=16 << 20, sgl_id=spec.SGL_ID_INCAPSULE)
    header = struct.pack("<BBBBI", pdu.PduType.CAPSULE_CMD, 0, 72, 72, 72 + (16 << 20)) + sqe
    await q.send_bytes(header)
    term = await q.expect_term(F.DATA_TRANSFER_LIMIT_EXCEEDED, 0)
    assert term.data == header[:8]


async def test_bad_header_digest(tgt: Tgt) -> None:
    q = await open_queue(tgt.addr, tgt.port, hdgst=True)
    assert q.hdgst
    raw = bytearray(capsule_bytes(q))
    raw[72] ^= 0xFF  # the header digest follows the 72-byte header
    await q.send_bytes(bytes(raw))
    term = await q.expect_term(F.HEADER_DIGEST_ERROR, 0)
    assert term.data == bytes(raw[:72])


@pytest.mark.parametrize(("hdgst", "ddgst"), [(False, False), (True, False), (False, True),
                                               (True, True)])
async def test_icresp_reflects_requested_digests(tgt: Tgt, hdgst: bool, ddgst: bool) -> None:
    q = await RawQueue.open(tgt.addr, tgt.port)
    try:
        resp = await q.icreq(hdgst=hdgst, ddgst=ddgst)
        assert (resp.header_digest, resp.data_digest) == (hdgst, ddgst)
        assert resp.pfv == 0 and resp.cpda == 0 and resp.maxh2cdata == 128 * 1024
        # ... and the queue then works with exactly those digests.
        cqe = await q.connect(0)
        assert cqe.status == 0, sct_sc(cqe)
    finally:
        await q.close()


# ------------------------------------------------------------------------ data PDUs


async def test_data_digest_error_in_capsule(tgt: Tgt) -> None:
    """A corrupt in-capsule write fails with Transient Transport Error and is not
    executed; the connection stays up and the next command works."""
    async with raw_controller(tgt, hdgst=True, ddgst=True) as c:
        q = c.io[0]
        good = os.urandom(1024)
        assert (await q.write(1, 100, good, in_capsule=True)).ok
        bad = os.urandom(1024)
        sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=1024, sgl_id=spec.SGL_ID_INCAPSULE,
                    cdw10=100, cdw12=1)
        raw = bytearray(q.encode(pdu.CapsuleCmd(sqe, bad)))
        raw[-1] ^= 0x5A  # the data digest is the last 4 bytes
        await q.send_bytes(bytes(raw))
        r = await q.collect(int.from_bytes(sqe[2:4], "little"))
        assert r.status == (G, spec.GenericStatus.TRANSIENT_TRANSPORT_ERROR)
        assert r.cqe is not None and not r.cqe.status & spec.STATUS_DNR  # retryable
        got = await q.read(1, 100, 2)
        assert got.ok and got.data == good  # the corrupt data never reached the bdev


async def test_data_digest_error_in_h2c_data(tgt: Tgt) -> None:
    """R2T data in two H2CData PDUs, the first corrupt: the target takes the rest of the
    transfer, then fails the command (Transient Transport Error); the queue goes on."""
    async with raw_controller(tgt, hdgst=True, ddgst=True) as c:
        q = c.io[0]
        old = os.urandom(16384)
        assert (await q.write(1, 200, old)).ok
        new = os.urandom(16384)
        sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=16384, cdw10=200, cdw12=31)
        cid = int.from_bytes(sqe[2:4], "little")
        r = await q.run(sqe, answer_r2t=False)
        r2t = r.pdus[-1]
        assert type(r2t) is pdu.R2T and (r2t.r2to, r2t.r2tl) == (0, 16384)
        first = bytearray(q.encode(pdu.H2CData(cid, r2t.ttag, 0, new[:8192], last=False)))
        first[-1] ^= 1
        await q.send_bytes(bytes(first) + q.encode(pdu.H2CData(cid, r2t.ttag, 8192,
                                                               new[8192:], last=True)))
        r = await q.collect(cid)
        assert r.status == (G, spec.GenericStatus.TRANSIENT_TRANSPORT_ERROR)
        got = await q.read(1, 200, 32)
        assert got.ok and got.data == old


async def test_h2c_data_unknown_ttag(tgt: Tgt) -> None:
    async with raw_controller(tgt) as c:
        q = c.io[0]
        h2c = pdu.H2CData(cccid=7, ttag=0x1234, datao=0, data=bytes(512))
        await q.send(h2c)
        term = await q.expect_term(F.INVALID_HEADER_FIELD, pdu.OFFSET_TTAG)
        assert term.data == q.encode(h2c)[:24]


async def test_h2c_data_wrong_cccid(tgt: Tgt) -> None:
    async with raw_controller(tgt) as c:
        q = c.io[0]
        sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=4096, cdw10=0, cdw12=7)
        r = await q.run(sqe, answer_r2t=False)
        r2t = r.pdus[-1]
        cid = int.from_bytes(sqe[2:4], "little")
        await q.send(pdu.H2CData(cccid=cid + 1, ttag=r2t.ttag, datao=0, data=bytes(4096)))
        await q.expect_term(F.INVALID_HEADER_FIELD, pdu.OFFSET_CCCID)


@pytest.mark.parametrize(("datao", "size"), [(512, 3584), (0, 8192)],
                         ids=["offset-gap", "beyond-r2tl"])
async def test_h2c_data_out_of_range(tgt: Tgt, datao: int, size: int) -> None:
    async with raw_controller(tgt) as c:
        q = c.io[0]
        sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=4096, cdw10=0, cdw12=7)
        r = await q.run(sqe, answer_r2t=False)
        r2t = r.pdus[-1]
        assert type(r2t) is pdu.R2T
        cid = int.from_bytes(sqe[2:4], "little")
        await q.send(pdu.H2CData(cccid=cid, ttag=r2t.ttag, datao=datao, data=bytes(size)))
        await q.expect_term(F.DATA_TRANSFER_OUT_OF_RANGE, 0)


async def test_h2c_data_last_flag_missing(tgt: Tgt) -> None:
    async with raw_controller(tgt) as c:
        q = c.io[0]
        sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=4096, cdw10=0, cdw12=7)
        r = await q.run(sqe, answer_r2t=False)
        cid = int.from_bytes(sqe[2:4], "little")
        await q.send(pdu.H2CData(cccid=cid, ttag=r.pdus[-1].ttag, datao=0, data=bytes(4096),
                                 last=False))
        await q.expect_term(F.PDU_SEQUENCE_ERROR, 0)


async def test_host_term_req_closes_quietly(tgt: Tgt) -> None:
    q = await open_queue(tgt.addr, tgt.port)
    await q.send(pdu.TermReq(c2h=False, fes=F.PDU_SEQUENCE_ERROR))
    assert await q.closed_by_target()  # no TermReq is answered with a TermReq


# ------------------------------------------------------------------------ isolation


async def test_broken_connections_do_not_disturb_verified_io(tgt: Tgt) -> None:
    """A host doing verified I/O on the same reactor while other connections commit
    every kind of protocol violation: its I/O never fails and its data stays right."""
    ctrl = await connect(tgt.addr, tgt.port, NQN, nr_io_queues=2, timeout=10)
    stop = asyncio.Event()
    done = {"ios": 0}

    async def verified_io(worker: int) -> None:
        slba = 4000 + worker * 64
        while not stop.is_set():
            data = os.urandom(8192 if done["ios"] % 2 else 32768)
            await ctrl.write(1, slba, data)
            assert bytes(await ctrl.read(1, slba, len(data) // 512)) == data
            done["ios"] += 1

    async def violate(n: int) -> None:
        q = await RawQueue.open(tgt.addr, tgt.port)
        try:
            kind = n % 4
            if kind == 0:
                await q.send_bytes(q.encode(pdu.ICReq(pfv=2)))
            elif kind == 1:
                await q.send_bytes(capsule_bytes(q))
            elif kind == 2:
                await q.icreq()
                await q.send(pdu.H2CData(cccid=1, ttag=99, datao=0, data=bytes(64)))
            else:
                await q.icreq()
                await q.send_bytes(os.urandom(200))
            assert await q.closed_by_target()
        finally:
            await q.close()

    workers = [asyncio.ensure_future(verified_io(i)) for i in range(4)]
    try:
        for n in range(24):
            await violate(n)
            if any(w.done() for w in workers):
                break
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await ctrl.disconnect()
    assert done["ios"] > 20
