"""blocktarget.host.connection against a scripted fake controller on 127.0.0.1.

The fake speaks the wire through the shared codec and lets each test decide what the
"controller" answers, so the host's handling of the cases a well-behaved target rarely
produces (split C2H data, several R2Ts, small MAXH2CDATA, CPDA padding, digest errors,
TermReqs, dropped connections, bad offsets) is exercised without a real peer.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from blocktarget.host.connection import (
    Completion,
    NvmeStatusError,
    QueuePair,
    TransportError,
)
from blocktarget.nvme import pdu, spec, structs

pytestmark = pytest.mark.timeout(30)


class FakeConn(asyncio.Protocol):
    def __init__(self, server: FakeController) -> None:
        self.server = server
        self.dec = pdu.Decoder(expect=pdu.HOST_TO_CONTROLLER)
        self.dec.set_pda(server.cpda)
        self.transport: asyncio.Transport | None = None
        self.hdgst = self.ddgst = False
        self.received: list[Any] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.conns.append(self)

    def data_received(self, data: bytes) -> None:
        try:
            pdus = self.dec.feed(data)
            while True:
                more = False
                for p in pdus:
                    self.received.append(p)
                    if isinstance(p, pdu.ICReq):
                        self._icreq(p)
                        more = True
                    else:
                        self.server.handler(self, p)
                if not (more and self.dec.buffered):
                    return
                pdus = self.dec.feed(b"")
        except pdu.ProtocolError as exc:
            self.server.errors.append(exc)

    def _icreq(self, p: pdu.ICReq) -> None:
        s = self.server
        dgst = p.dgst if s.dgst is None else s.dgst
        self.send(pdu.ICResp(pfv=s.pfv, cpda=s.cpda, dgst=dgst, maxh2cdata=s.maxh2cdata))
        self.hdgst, self.ddgst = bool(dgst & 1), bool(dgst & 2)
        self.dec.set_digests(self.hdgst, self.ddgst)

    def send(self, p: Any, *, corrupt_ddgst: bool = False) -> None:
        bufs = [bytes(b) for b in pdu.encode(p, hdgst=self.hdgst, ddgst=self.ddgst, pda=0)]
        if corrupt_ddgst:
            last = bytearray(bufs[-1])
            last[-1] ^= 0xFF
            bufs[-1] = bytes(last)
        assert self.transport is not None
        self.transport.write(b"".join(bufs))

    def respond(self, cid: int, status: int = 0, dw0: int = 0) -> None:
        self.send(pdu.CapsuleResp(structs.pack_cqe(cid, status, dw0=dw0)))

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


class FakeController:
    def __init__(self, handler: Callable[[FakeConn, Any], None], *, maxh2cdata: int = 131072,
                 cpda: int = 0, dgst: int | None = None, pfv: int = 0) -> None:
        self.handler = handler
        self.maxh2cdata = maxh2cdata
        self.cpda = cpda
        self.dgst = dgst
        self.pfv = pfv
        self.conns: list[FakeConn] = []
        self.errors: list[Exception] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> FakeController:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FakeConn(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()
        self.server.close()
        await self.server.wait_closed()

    async def open(self, depth: int = 8, **kw: Any) -> QueuePair:
        qp = await QueuePair.open("127.0.0.1", self.port, qid=1, depth=depth, timeout=5, **kw)
        return qp


def sqe_of(p: pdu.CapsuleCmd) -> structs.Sqe:
    return structs.parse_sqe(p.sqe)


class Disk:
    """A tiny "namespace" so handlers can serve reads and writes."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)
        self.pending: dict[int, tuple[structs.Sqe, bytearray, int]] = {}


@pytest.fixture
async def disk() -> AsyncIterator[Disk]:
    yield Disk()


READ = spec.IoOpcode.READ
WRITE = spec.IoOpcode.WRITE


def rw_handler(disk: Disk, *, c2h_chunks: list[int] | None = None, success: bool = False,
               r2t_chunks: list[int] | None = None) -> Callable[[FakeConn, Any], None]:
    """Serve 512-byte-block reads/writes; reads split per ``c2h_chunks`` sizes, R2Ts
    per ``r2t_chunks`` (one outstanding at a time, as MAXR2T 0 asks)."""

    def handler(conn: FakeConn, p: Any) -> None:
        if isinstance(p, pdu.CapsuleCmd):
            sqe = sqe_of(p)
            assert sqe.flags & 0xC0 == 0x40, "PSDT must be SGL"
            off = sqe.slba * 512
            n = sqe.nlb * 512
            if sqe.opcode == READ:
                assert sqe.sgl_id == spec.SGL_ID_TRANSPORT and sqe.sgl_len == n
                chunks = list(c2h_chunks or [n])
                pos = 0
                while pos < n:
                    size = min(chunks.pop(0) if chunks else n, n - pos)
                    last = pos + size == n
                    chunk = bytes(disk.data[off + pos:off + pos + size])
                    conn.send(pdu.C2HData(sqe.cid, pos, chunk, last=last,
                                          success=success and last))
                    pos += size
                if not success:
                    conn.respond(sqe.cid)
            elif sqe.opcode == WRITE:
                if sqe.sgl_id == spec.SGL_ID_INCAPSULE:
                    assert len(p.data) == n == sqe.sgl_len
                    disk.data[off:off + n] = p.data
                    conn.respond(sqe.cid)
                else:
                    assert sqe.sgl_id == spec.SGL_ID_TRANSPORT and sqe.sgl_len == n
                    disk.pending[sqe.cid] = (sqe, bytearray(n), 0)
                    _next_r2t(conn, disk, sqe.cid, r2t_chunks)
            else:
                conn.respond(sqe.cid)
        elif isinstance(p, pdu.H2CData):
            sqe, buf, r2t_end = disk.pending[p.cccid]
            assert p.ttag == 0x100 + p.cccid
            assert len(p.data) <= conn.server.maxh2cdata
            buf[p.datao:p.datao + len(p.data)] = p.data
            if p.datao + len(p.data) == r2t_end:
                assert p.last, "the last H2CData of an R2T must carry LAST"
                if r2t_end == len(buf):
                    off = sqe.slba * 512
                    disk.data[off:off + len(buf)] = buf
                    del disk.pending[p.cccid]
                    conn.respond(p.cccid)
                else:
                    _next_r2t(conn, disk, p.cccid, r2t_chunks)
            else:
                assert not p.last

    return handler


def _next_r2t(conn: FakeConn, disk: Disk, cid: int, chunks: list[int] | None) -> None:
    sqe, buf, done = disk.pending[cid]
    size = min(chunks[0] if chunks else len(buf), len(buf) - done)
    disk.pending[cid] = (sqe, buf, done + size)
    conn.send(pdu.R2T(cid, 0x100 + cid, done, size))


async def rw(qp: QueuePair, opcode: int, slba: int, nbytes: int, data: Any = None,
             buf: Any = None) -> tuple[Completion, Any]:
    nlb = nbytes // 512
    r = await qp.submit(opcode, 1, slba, 0, nlb - 1, data_out=data,
                        in_len=nbytes if opcode == READ else 0, in_buf=buf, timeout=5)
    return r.completion, r.data


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("digests", [False, True])
async def test_icd_write_and_single_c2h_read(disk: Disk, digests: bool) -> None:
    async with FakeController(rw_handler(disk)) as fc:
        qp = await fc.open(hdgst=digests, ddgst=digests)
        assert (qp.hdgst, qp.ddgst) == (digests, digests)
        qp.icd_max = 8192
        data = os.urandom(4096)
        cpl, _ = await rw(qp, WRITE, 8, 4096, data)
        assert cpl.status == 0
        assert disk.data[4096:8192] == data
        cpl, got = await rw(qp, READ, 8, 4096)
        assert cpl.status == 0 and bytes(got) == data
        qp.close()


@pytest.mark.parametrize("cpda", [0, 1, 7])
async def test_r2t_split_by_maxh2cdata_and_cpda(disk: Disk, cpda: int) -> None:
    """16 KiB through two R2Ts of 8 KiB, each split into H2CData of <= 4 KiB, PDUs
    aligned to the controller's CPDA (the fake's decoder checks PDO alignment)."""
    async with FakeController(rw_handler(disk, r2t_chunks=[8192]), maxh2cdata=4096,
                              cpda=cpda) as fc:
        qp = await fc.open(hdgst=True, ddgst=True)
        assert qp.cpda == cpda and qp.maxh2cdata == 4096
        qp.icd_max = 0
        data = os.urandom(16384)
        cpl, _ = await rw(qp, WRITE, 0, 16384, data)
        assert cpl.status == 0 and disk.data[:16384] == data
        h2c = [p for p in fc.conns[0].received if isinstance(p, pdu.H2CData)]
        assert [len(p.data) for p in h2c] == [4096] * 4
        assert [p.last for p in h2c] == [False, True, False, True]
        assert not fc.errors
        qp.close()


@pytest.mark.parametrize("success", [False, True], ids=["capsule-resp", "data-success"])
async def test_c2h_split_into_caller_buffer(disk: Disk, success: bool) -> None:
    disk.data[:16384] = os.urandom(16384)
    async with FakeController(rw_handler(disk, c2h_chunks=[5000, 5000, 2000],
                                         success=success)) as fc:
        qp = await fc.open()
        cpl, got = await rw(qp, READ, 0, 16384)
        assert cpl.status == 0 and bytes(got) == disk.data[:16384]
        buf = bytearray(16384)
        cpl, got = await rw(qp, READ, 0, 16384, buf=buf)
        assert bytes(buf) == disk.data[:16384] and got.obj is buf
        qp.close()


async def test_queue_depth_bound_and_many_outstanding(disk: Disk) -> None:
    held: list[tuple[FakeConn, int]] = []
    outstanding = 0
    peak = 0

    def handler(conn: FakeConn, p: Any) -> None:
        nonlocal outstanding, peak
        outstanding += 1
        peak = max(peak, outstanding)
        held.append((conn, sqe_of(p).cid))

    async with FakeController(handler) as fc:
        qp = await fc.open(depth=3)
        tasks = [asyncio.ensure_future(qp.submit(spec.IoOpcode.FLUSH, 1)) for _ in range(10)]
        done = 0
        while done < 10:
            await asyncio.sleep(0.02)
            assert outstanding <= 3
            while held:
                conn, cid = held.pop(0)
                outstanding -= 1
                conn.respond(cid, dw0=cid)
                done += 1
        results = await asyncio.gather(*tasks)
        assert all(r.completion.status == 0 for r in results)
        assert peak == 3
        qp.close()


async def test_error_status_is_reported_raw(disk: Disk) -> None:
    status = spec.make_status(spec.Sct.GENERIC, spec.GenericStatus.LBA_OUT_OF_RANGE, dnr=True)

    def handler(conn: FakeConn, p: Any) -> None:
        conn.respond(sqe_of(p).cid, status=status)

    async with FakeController(handler) as fc:
        qp = await fc.open()
        r = await qp.submit(READ, 1, 0, 0, 0, in_len=512, timeout=5)
        assert r.completion.status == status
        err = NvmeStatusError(status, "I/O READ")
        assert err.sct == 0 and err.sc == 0x80 and "LBA_OUT_OF_RANGE|DNR" in str(err)
        qp.close()


async def test_c2h_term_req_fails_outstanding(disk: Disk) -> None:
    def handler(conn: FakeConn, p: Any) -> None:
        conn.send(pdu.TermReq(c2h=True, fes=pdu.Fes.INVALID_HEADER_FIELD, fei=3, data=b"x" * 8))

    async with FakeController(handler) as fc:
        qp = await fc.open()
        with pytest.raises(TransportError) as ei:
            await qp.submit(spec.IoOpcode.FLUSH, 1, timeout=5)
        assert ei.value.fes == pdu.Fes.INVALID_HEADER_FIELD
        assert "C2HTermReq INVALID_HEADER_FIELD" in str(ei.value)
        assert qp.closed
        with pytest.raises(ConnectionError):
            await qp.submit(spec.IoOpcode.FLUSH, 1)
        await asyncio.wait_for(qp.wait_closed(), 5)


async def test_connection_loss_fails_all_outstanding() -> None:
    got: list[FakeConn] = []

    def handler(conn: FakeConn, p: Any) -> None:
        got.append(conn)
        if len(got) == 3:
            conn.close()

    async with FakeController(handler) as fc:
        qp = await fc.open()
        results = await asyncio.gather(
            *(qp.submit(spec.IoOpcode.FLUSH, 1) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ConnectionError) for r in results), results
        await asyncio.wait_for(qp.wait_closed(), 5)


async def test_bad_c2h_offset_is_fatal_with_h2c_term_req() -> None:
    def handler(conn: FakeConn, p: Any) -> None:
        if isinstance(p, pdu.CapsuleCmd):
            conn.send(pdu.C2HData(sqe_of(p).cid, 512, b"\0" * 512))  # skips offset 0

    async with FakeController(handler) as fc:
        qp = await fc.open()
        with pytest.raises(TransportError) as ei:
            await qp.submit(READ, 1, 0, 0, 1, in_len=1024, timeout=5)
        assert ei.value.fes == pdu.Fes.DATA_TRANSFER_OUT_OF_RANGE
        await asyncio.wait_for(qp.wait_closed(), 5)
        terms = [p for p in fc.conns[0].received if isinstance(p, pdu.TermReq)]
        assert terms and terms[0].fes == pdu.Fes.DATA_TRANSFER_OUT_OF_RANGE
        assert not terms[0].c2h


async def test_r2t_beyond_data_is_fatal() -> None:
    def handler(conn: FakeConn, p: Any) -> None:
        if isinstance(p, pdu.CapsuleCmd):
            conn.send(pdu.R2T(sqe_of(p).cid, 1, 0, 8192))  # command has 4096 bytes

    async with FakeController(handler) as fc:
        qp = await fc.open()
        qp.icd_max = 0
        with pytest.raises(TransportError):
            await qp.submit(WRITE, 1, 0, 0, 7, data_out=bytes(4096), timeout=5)


async def test_data_digest_error_completes_with_transient_error(disk: Disk) -> None:
    """Framing survives a bad data digest: that command fails with Transient Transport
    Error, the connection carries on."""
    calls = 0

    def handler(conn: FakeConn, p: Any) -> None:
        nonlocal calls
        calls += 1
        cid = sqe_of(p).cid
        conn.send(pdu.C2HData(cid, 0, b"\xab" * 512), corrupt_ddgst=calls == 1)
        conn.respond(cid)

    async with FakeController(handler) as fc:
        qp = await fc.open(ddgst=True)
        r = await qp.submit(READ, 1, 0, 0, 0, in_len=512, timeout=5)
        assert r.completion.status == spec.GenericStatus.TRANSIENT_TRANSPORT_ERROR
        r = await qp.submit(READ, 1, 0, 0, 0, in_len=512, timeout=5)
        assert r.completion.status == 0 and bytes(r.data) == b"\xab" * 512
        assert not qp.closed
        qp.close()


async def test_icresp_digest_mismatch_is_refused() -> None:
    async with FakeController(lambda c, p: None, dgst=0) as fc:
        with pytest.raises(TransportError, match="digest"):
            await fc.open(hdgst=True)


async def test_icresp_bad_pfv_is_refused() -> None:
    async with FakeController(lambda c, p: None, pfv=1) as fc:
        with pytest.raises(TransportError, match="PFV"):
            await fc.open()


async def test_timeout_tears_down_the_connection() -> None:
    async with FakeController(lambda c, p: None) as fc:
        qp = await fc.open()
        other = asyncio.ensure_future(qp.submit(spec.IoOpcode.FLUSH, 1))
        with pytest.raises(TimeoutError):
            await qp.submit(spec.IoOpcode.FLUSH, 1, timeout=0.2)
        with pytest.raises(ConnectionError):
            await other
        assert qp.closed


async def test_unknown_cid_is_fatal() -> None:
    def handler(conn: FakeConn, p: Any) -> None:
        conn.respond(sqe_of(p).cid + 1000)

    async with FakeController(handler) as fc:
        qp = await fc.open()
        with pytest.raises(TransportError, match="unknown cid"):
            await qp.submit(spec.IoOpcode.FLUSH, 1, timeout=5)


async def test_sqe_fields_and_overrides() -> None:
    seen: list[structs.Sqe] = []

    def handler(conn: FakeConn, p: Any) -> None:
        seen.append(sqe_of(p))
        conn.respond(seen[-1].cid)

    async with FakeController(handler) as fc:
        qp = await fc.open()
        await qp.submit(0x42, 7, 1, 2, 3, 4, 5, 6, timeout=5)
        await qp.submit(0x43, 7, flags=0, sgl=(1, 2, 0xF0), timeout=5)
        a, b = seen
        assert (a.opcode, a.nsid, a.flags) == (0x42, 7, 0x40)
        assert (a.cdw10, a.cdw11, a.cdw12, a.cdw13, a.cdw14, a.cdw15) == (1, 2, 3, 4, 5, 6)
        assert (a.sgl_addr, a.sgl_len, a.sgl_id) == (0, 0, 0)
        assert (b.flags, b.sgl_addr, b.sgl_len, b.sgl_id) == (0, 1, 2, 0xF0)
        qp.close()


def test_completion_result64() -> None:
    c = Completion(0, 0x11223344, 0x55667788, 3)
    assert c.ok and c.result64 == 0x5566778811223344
    assert struct.calcsize("<IIHHHH") == spec.CQE_SIZE


# ---------------------------------------------------------- perf engine on the fake


async def _engine_run(disk: Disk, workload: str, *, corrupt: bool = False,
                      time_s: float = 0.3) -> Any:
    from blocktarget.host.perf import PerfConfig, PerfResult, _Engine

    base = rw_handler(disk)
    reads = 0

    def handler(conn: FakeConn, p: Any) -> None:
        nonlocal reads
        if corrupt and isinstance(p, pdu.CapsuleCmd) and sqe_of(p).opcode == READ:
            reads += 1
            if reads == 5:  # one read returns a stale block: LBA right, generation old
                off = sqe_of(p).slba * 512 + 12
                disk.data[off] ^= 0x01
                base(conn, p)
                disk.data[off] ^= 0x01
                return
        base(conn, p)

    async with FakeController(handler) as fc:
        qp = await fc.open(depth=16)
        qp.icd_max = 8192
        cfg = PerfConfig("127.0.0.1", fc.port, "nqn.x:y", workload=workload, io_size=4096,
                         qd=16, time_s=time_s, verify=True, seed=5)
        res = PerfResult(cfg)
        eng = _Engine(qp, cfg, 1, 512, 0, 64, 16, res)
        import array

        eng.gens = array.array("I", bytes(4 * 64))
        if cfg.read_share:
            await eng.prefill(None)
        await eng.run()
        if cfg.read_share < 100:
            await eng.read_back(None)
        qp.close()
        return res


@pytest.mark.parametrize("workload", ["randrw", "rw", "randwrite", "randread", "write"])
async def test_perf_engine_verifies_clean_runs(disk: Disk, workload: str) -> None:
    res = await _engine_run(disk, workload)
    assert res.ok, res.messages
    assert res.read.ops + res.write.ops > 50
    assert res.verified_reads > 0 and res.verify_failures == 0


async def test_perf_engine_detects_a_stale_block(disk: Disk) -> None:
    res = await _engine_run(disk, "randread", corrupt=True)
    assert res.verify_failures == 1 and not res.ok
    assert any("generation" in m or "corrupt" in m for m in res.messages), res.messages
