"""NVMe/TCP resource limits (issue 8 item 4), each driven on raw sockets against a real
target process: connection counts (global and per host address), queue depth, the R2T
buffer budget (per connection and per reactor, in-capsule data included), controllers
per subsystem (the cntlid range), and the timeouts for hosts that go
quiet (slowloris PDUs, no Connect, unanswered R2T, responses never read). Keep-alive
expiry is covered by test_nvme_target_admin.py (test_kato_expiry_tears_the_controller_down
and friends); the discovery default is here.

Budget: about 20 s (measured 13-17 s; timeouts are set to 1-2 s here, defaults 30 s).
Two tests drive SPDK's initiator (spdk_nvme_perf) through a tight budget: R2T buffers,
and in-capsule data (which counts in the same budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterator

import pytest

from blocktarget.nvme import pdu, spec
from blocktarget.nvme.structs import parse_cqe

from .nvme_target_util import (
    RawQueue,
    Tgt,
    open_queue,
    raw_controller,
    sct_sc,
    start_target,
)
from .target_proc import Launcher, RunningTarget, free_port, listen_address, malloc

pytestmark = pytest.mark.timeout(90)

F = pdu.Fes
STALL_S = 1
R2T_S = 2
KiB = 1024

LIMITS = {
    "stall_timeout_sec": STALL_S,
    "r2t_timeout_sec": R2T_S,
    # one reactor: 2 x 128 KiB = 256 KiB of R2T buffers; 128 KiB per connection
    "num_shared_buffers": 2,
    "max_qpair_buffer_bytes": 128 * KiB,
}


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        yield start_target(launcher, transport=LIMITS)
    finally:
        launcher.cleanup()


def metric(t: Tgt, name: str, labels: str = "") -> float:
    status, _, body = t.proc.http_get("/metrics")
    assert status == 200
    pat = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.M)
    m = pat.search(body.decode())
    assert m is not None, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def write_sqe(q: RawQueue, slba: int, nbytes: int) -> tuple[bytes, int]:
    sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=nbytes, cdw10=slba, cdw12=nbytes // 512 - 1)
    return sqe, int.from_bytes(sqe[2:4], "little")


async def r2t_for(q: RawQueue, sqe: bytes, timeout: float = 2.0) -> pdu.R2T | None:
    """Send a write capsule; its R2T, or None when none came within ``timeout``."""
    await q.send(pdu.CapsuleCmd(sqe, b""))
    try:
        p = await q.recv(timeout)
    except TimeoutError:
        return None
    assert type(p) is pdu.R2T, p
    return p


async def answer(q: RawQueue, r2t: pdu.R2T, data: bytes) -> None:
    """Send the data an R2T asked for; the write must then complete successfully."""
    await q.send(pdu.H2CData(cccid=r2t.cccid, ttag=r2t.ttag, datao=0, data=data, last=True))
    p = await q.recv()
    assert type(p) is pdu.CapsuleResp, p
    cqe = parse_cqe(p.cqe)
    assert cqe.cid == r2t.cccid and cqe.status == 0, cqe


async def verified_io(q: RawQueue, rounds: int, slba: int = 4096) -> int:
    """Write then read back random data; returns the rounds that matched."""
    good = 0
    for i in range(rounds):
        data = os.urandom(4096)
        assert (await q.write(1, slba + 8 * i, data)).ok
        r = await q.read(1, slba + 8 * i, 8)
        good += r.ok and r.data == data
    return good


# ------------------------------------------------------------------ connections


def test_connection_limits_global_and_per_address(tmp_path: object) -> None:
    """max_connections_per_address=3 from 127.0.0.1; 127.0.0.2 has its own quota until
    the global max_connections=5 is reached; a freed slot is usable again."""
    launcher = Launcher()
    try:
        t = start_target(launcher, transport={"max_connections": 5,
                                              "max_connections_per_address": 3})
        asyncio.run(_connection_limits(t))
    finally:
        launcher.cleanup()


async def _open_from(t: Tgt, src: str) -> RawQueue:
    reader, writer = await asyncio.open_connection(t.addr, t.port, local_addr=(src, 0))
    return RawQueue(reader, writer)


async def _admitted(q: RawQueue) -> bool:
    """A refused connection is closed at once: the ICReq gets EOF, not an ICResp."""
    try:
        await q.icreq()
    except (EOFError, ConnectionError):
        return False
    return True


async def _connection_limits(t: Tgt) -> None:
    held: list[RawQueue] = []
    try:
        for _ in range(3):
            held.append(await _open_from(t, "127.0.0.1"))
            assert await _admitted(held[-1])
        extra = await _open_from(t, "127.0.0.1")
        assert not await _admitted(extra), "4th connection from one address was admitted"
        await extra.close()
        for _ in range(2):
            held.append(await _open_from(t, "127.0.0.2"))
            assert await _admitted(held[-1])
        extra = await _open_from(t, "127.0.0.2")
        assert not await _admitted(extra), "6th connection overall was admitted"
        await extra.close()
        assert metric(t, "blocktarget_tcp_connections") == 5
        assert metric(t, "blocktarget_tcp_connections_limit") == 5
        assert metric(t, "blocktarget_tcp_connections_refused_total", '{limit="per_address"}') == 1
        assert metric(t, "blocktarget_tcp_connections_refused_total", '{limit="total"}') == 1
        await held.pop(0).close()
        for _ in range(50):  # the slot is released on the reactor, asynchronously
            if metric(t, "blocktarget_tcp_connections") == 4:
                break
            await asyncio.sleep(0.05)
        again = await _open_from(t, "127.0.0.1")
        held.append(again)
        assert await _admitted(again), "a released slot could not be used again"
    finally:
        for q in held:
            await q.close()


# ------------------------------------------------------------------ queue depth


async def test_more_commands_than_the_queue_holds_ends_the_connection(tgt: Tgt) -> None:
    """I/O queue of 4 entries (SQSIZE 3): four writes wait for their R2T data; a fifth
    outstanding command is a protocol violation (C2HTermReq, PDU Sequence Error)."""
    async with raw_controller(tgt, io_sqsize=3) as c:
        q = c.io[0]
        for i in range(4):
            sqe, _ = write_sqe(q, 8 * i, 4096)
            assert await r2t_for(q, sqe) is not None
        sqe, _ = write_sqe(q, 64, 4096)
        await q.send(pdu.CapsuleCmd(sqe, b""))
        await q.expect_term(F.PDU_SEQUENCE_ERROR, 0)


async def test_connect_sqsize_over_max_queue_depth_is_refused(tgt: Tgt) -> None:
    """max_queue_depth (128) bounds SQSIZE at Connect: 128 entries ok, 129 refused."""
    async with raw_controller(tgt, nr_io=0) as c:
        q = await open_queue(tgt.addr, tgt.port)
        try:
            cqe = await q.connect(1, cntlid=c.cntlid, sqsize=128)
            assert cqe.status != 0, "SQSIZE 128 (129 entries) accepted"
        finally:
            await q.close()
        q = await open_queue(tgt.addr, tgt.port)
        try:
            assert (await q.connect(1, cntlid=c.cntlid, sqsize=127)).status == 0
        finally:
            await q.close()


# ------------------------------------------------------------------ R2T buffers


async def test_r2t_buffers_per_connection_wait_not_allocate(tgt: Tgt) -> None:
    """128 KiB per connection: two 64 KiB writes get R2Ts, the third waits (no R2T, no
    buffer) until the first completes, then gets its R2T and completes too."""
    waits0 = metric(tgt, "blocktarget_tcp_r2t_buffer_waits_total", '{reactor="0"}')
    async with raw_controller(tgt) as c:
        q = c.io[0]
        sqes = [write_sqe(q, 1024 + 128 * i, 64 * KiB) for i in range(3)]
        r1 = await r2t_for(q, sqes[0][0])
        r2 = await r2t_for(q, sqes[1][0])
        assert r1 is not None and r2 is not None
        assert await r2t_for(q, sqes[2][0], timeout=0.5) is None, "R2T beyond the budget"
        assert metric(tgt, "blocktarget_tcp_r2t_buffer_bytes", '{reactor="0"}') == 128 * KiB
        await answer(q, r1, os.urandom(64 * KiB))
        r3 = await q.recv()
        assert type(r3) is pdu.R2T and r3.cccid == sqes[2][1], r3
        await answer(q, r2, os.urandom(64 * KiB))
        await answer(q, r3, os.urandom(64 * KiB))
    assert metric(tgt, "blocktarget_tcp_r2t_buffer_waits_total", '{reactor="0"}') > waits0
    assert metric(tgt, "blocktarget_tcp_r2t_buffer_bytes", '{reactor="0"}') == 0


async def test_r2t_buffers_per_reactor_are_shared_in_order(tgt: Tgt) -> None:
    """256 KiB per reactor: two hosts hold 128 KiB each; a third host's 4 KiB write
    waits for its R2T until one of them completes; nothing is refused."""
    async with raw_controller(tgt) as a, raw_controller(tgt) as b, \
            raw_controller(tgt) as c:
        qa, qb, qc = a.io[0], b.io[0], c.io[0]
        ra = await r2t_for(qa, write_sqe(qa, 2048, 128 * KiB)[0])
        rb = await r2t_for(qb, write_sqe(qb, 2560, 128 * KiB)[0])
        assert ra is not None and rb is not None
        sqe, cid = write_sqe(qc, 3072, 4096)
        assert await r2t_for(qc, sqe, timeout=0.5) is None, "R2T beyond the reactor budget"
        await answer(qa, ra, os.urandom(128 * KiB))
        rc = await qc.recv()
        assert type(rc) is pdu.R2T and rc.cccid == cid
        data = os.urandom(4096)
        await answer(qc, rc, data)
        got = await qc.read(1, 3072, 8)
        assert got.ok and got.data == data
        await answer(qb, rb, os.urandom(128 * KiB))


async def test_in_capsule_data_counts_in_the_reactor_budget(tgt: Tgt) -> None:
    """In-capsule data is in the same 256 KiB budget as R2T buffers. While two hosts hold
    all of it, a third host's in-capsule write still completes (its data had arrived
    already), but the target then stops reading that host: its next in-capsule write
    gets no answer until buffers are returned, then completes and reads back."""
    async with raw_controller(tgt) as a, raw_controller(tgt) as b, \
            raw_controller(tgt) as c:
        qa, qb, qc = a.io[0], b.io[0], c.io[0]
        pauses0 = metric(tgt, "blocktarget_tcp_icd_read_pauses_total", '{reactor="0"}')
        ra = await r2t_for(qa, write_sqe(qa, 2048, 128 * KiB)[0])
        rb = await r2t_for(qb, write_sqe(qb, 2560, 128 * KiB)[0])
        assert ra is not None and rb is not None
        assert (await qc.write(1, 3072, os.urandom(4096), in_capsule=True)).ok
        assert metric(tgt, "blocktarget_tcp_icd_read_pauses_total",
                      '{reactor="0"}') == pauses0 + 1
        data = os.urandom(4096)
        sqe = qc.sqe(spec.IoOpcode.WRITE, 1, sgl_len=4096, sgl_id=spec.SGL_ID_INCAPSULE,
                     cdw10=3080, cdw12=7)
        await qc.send(pdu.CapsuleCmd(sqe, data))
        with pytest.raises(TimeoutError):
            await qc.recv(0.5)  # not read while the budget is spent
        await answer(qa, ra, os.urandom(128 * KiB))
        p = await qc.recv()
        assert type(p) is pdu.CapsuleResp and parse_cqe(p.cqe).status == 0, p
        got = await qc.read(1, 3080, 8)
        assert got.ok and got.data == data
        await answer(qb, rb, os.urandom(128 * KiB))
    assert metric(tgt, "blocktarget_tcp_r2t_buffer_bytes", '{reactor="0"}') == 0


# ------------------------------------------------------------------ controllers


async def test_controllers_per_subsystem_bounded_by_cntlid_range(tgt: Tgt) -> None:
    """SPDK's per-subsystem controller bound: nvmf_create_subsystem min_cntlid/max_cntlid.
    With a range of 2, a third host's admin Connect is refused with Controller Busy (DNR);
    once a controller is gone its id is reused. (I/O queues per controller are bounded by
    max_io_qpairs_per_ctrlr: test_nvme_target_fabrics.py.)"""
    nqn = "nqn.2026-01.io.test:two-controllers"
    tgt.rpc("nvmf_create_subsystem", nqn=nqn, allow_any_host=True, min_cntlid=7,
            max_cntlid=8)
    tgt.rpc("nvmf_subsystem_add_listener", nqn=nqn, listen_address=listen_address(tgt.port))
    held: list[RawQueue] = []
    try:
        for _ in range(2):
            q = await open_queue(tgt.addr, tgt.port)
            held.append(q)
            cqe = await q.connect(0, nqn)
            assert cqe.status == 0 and 7 <= q.cntlid <= 8, cqe
        q = await open_queue(tgt.addr, tgt.port)
        held.append(q)
        cqe = await q.connect(0, nqn)
        assert sct_sc(cqe) == (spec.Sct.COMMAND_SPECIFIC,
                               spec.FabricsStatus.CONNECT_CTRL_BUSY), sct_sc(cqe)
        assert cqe.status & spec.STATUS_DNR
        freed = held[0].cntlid
        await held[0].close()
        for _ in range(40):  # the controller goes with its admin queue
            q = await open_queue(tgt.addr, tgt.port)
            held.append(q)
            cqe = await q.connect(0, nqn)
            if cqe.status == 0:
                break
            await asyncio.sleep(0.05)
        assert cqe.status == 0 and q.cntlid == freed, (sct_sc(cqe), q.cntlid)
    finally:
        for q in held:
            await q.close()
        tgt.rpc("nvmf_delete_subsystem", nqn=nqn)


# ------------------------------------------------------------------ timeouts


async def _closed_within(q: RawQueue, low: float, high: float,
                         t0: float | None = None) -> float:
    """Seconds until the target closed ``q``, counted from ``t0`` (default: now)."""
    t0 = time.monotonic() if t0 is None else t0
    assert await q.closed_by_target(timeout=high + 1), "stalled connection still open"
    took = time.monotonic() - t0
    assert took <= high, f"closed after {took:.2f} s, bound {high} s"
    return took


async def test_connection_without_connect_is_closed(tgt: Tgt) -> None:
    before = metric(tgt, "blocktarget_tcp_connections_closed_by_limit_total",
                    '{reason="no_connect"}')
    silent = await RawQueue.open(tgt.addr, tgt.port)  # not even an ICReq
    icreq_only = await open_queue(tgt.addr, tgt.port)
    try:
        took = await asyncio.gather(_closed_within(silent, 0, STALL_S * 2 + 2),
                                    _closed_within(icreq_only, 0, STALL_S * 2 + 2))
        print(f"no Connect: closed after {took[0]:.2f} s (no ICReq) and {took[1]:.2f} s "
              f"(ICReq only); stall_timeout_sec={STALL_S}")
    finally:
        await silent.close()
        await icreq_only.close()
    assert metric(tgt, "blocktarget_tcp_connections_closed_by_limit_total",
                  '{reason="no_connect"}') == before + 2


async def test_slowloris_pdu_is_closed_and_does_not_starve_others(tgt: Tgt) -> None:
    """One host trickles a capsule header a byte at a time, another sends a header and
    half its in-capsule data, then nothing; both are closed after the stall timeout,
    while a third host's verified I/O goes on undisturbed meanwhile."""
    async with raw_controller(tgt) as slow, raw_controller(tgt) as half, \
            raw_controller(tgt) as good:
        qs, qh = slow.io[0], half.io[0]
        sqe, _ = write_sqe(qs, 0, 4096)
        trickle = qs.encode(pdu.CapsuleCmd(sqe, b""))
        sqe, _ = write_sqe(qh, 0, 4096)
        capsule = qh.encode(pdu.CapsuleCmd(
            qh.sqe(spec.IoOpcode.WRITE, 1, sgl_len=4096, sgl_id=spec.SGL_ID_INCAPSULE,
                   cdw10=0, cdw12=7), os.urandom(4096)))
        await qh.send_bytes(capsule[: len(capsule) // 2])

        async def drip() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                for b in trickle[:-1]:  # never the last byte
                    await qs.send_bytes(bytes([b]))
                    await asyncio.sleep(0.2)

        t0 = time.monotonic()
        drip_task = asyncio.create_task(drip())
        await asyncio.sleep(0.3)  # the first bytes are in
        closed = asyncio.gather(_closed_within(qs, STALL_S, STALL_S * 2 + 2),
                                _closed_within(qh, STALL_S, STALL_S * 2 + 2))
        good_rounds = 0
        while not closed.done():
            good_rounds += await verified_io(good.io[0], 1)
            await asyncio.sleep(0.01)
        await closed
        drip_task.cancel()
        took = time.monotonic() - t0
        print(f"slowloris: both stalled hosts closed {took:.2f} s after they began "
              f"(stall_timeout_sec={STALL_S}); the good host did {good_rounds} verified "
              "write+read rounds meanwhile, 0 errors")
        assert took >= STALL_S, f"closed after {took:.2f} s, before the stall timeout"
        assert good_rounds >= 5, good_rounds
        assert await verified_io(good.io[0], 3) == 3
    assert metric(tgt, "blocktarget_tcp_connections_closed_by_limit_total",
                  '{reason="pdu_stall"}') >= 2


async def test_unanswered_r2t_is_closed(tgt: Tgt) -> None:
    """A write's R2T never answered: closed after r2t_timeout_sec, its buffer returned."""
    async with raw_controller(tgt) as c:
        q = c.io[0]
        # timed from before the capsule: the target's R2T clock starts after it, so the
        # floor is exact however late this process reads the R2T on a loaded machine
        t0 = time.monotonic()
        assert await r2t_for(q, write_sqe(q, 0, 64 * KiB)[0]) is not None
        took = await _closed_within(q, R2T_S, R2T_S * 2 + 2, t0)
        print(f"unanswered R2T: closed after {took:.2f} s (r2t_timeout_sec={R2T_S})")
        assert took >= R2T_S
    assert metric(tgt, "blocktarget_tcp_connections_closed_by_limit_total",
                  '{reason="r2t_timeout"}') >= 1
    for _ in range(40):
        if metric(tgt, "blocktarget_tcp_r2t_buffer_bytes", '{reactor="0"}') == 0:
            break
        await asyncio.sleep(0.05)
    assert metric(tgt, "blocktarget_tcp_r2t_buffer_bytes", '{reactor="0"}') == 0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_host_that_reads_no_responses_is_bounded_then_closed(tgt: Tgt) -> None:
    """A host pipelines 1,500 reads of 128 KiB (~190 MiB of data) and never reads the
    answers. The target stops reading its commands once its output backs up (so its
    memory stays flat), and closes the connection after the stall timeout."""
    before = rss_bytes(tgt.proc.pid)
    closed0 = metric(tgt, "blocktarget_tcp_connections_closed_by_limit_total",
                     '{reason="send_stall"}')
    async with raw_controller(tgt, io_sqsize=127) as c, raw_controller(tgt) as good:
        q = c.io[0]
        blob = b"".join(
            q.encode(pdu.CapsuleCmd(q.sqe(spec.IoOpcode.READ, 1, cid=i % 64 + 1,
                                          sgl_len=128 * KiB, cdw10=0, cdw12=255), b""))
            for i in range(1500))

        async def flood() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                await q.send_bytes(blob)

        task = asyncio.create_task(flood())
        peak = 0
        t0 = time.monotonic()
        while metric(tgt, "blocktarget_tcp_connections_closed_by_limit_total",
                     '{reason="send_stall"}') == closed0:
            peak = max(peak, rss_bytes(tgt.proc.pid))
            assert time.monotonic() - t0 < STALL_S * 2 + 5, "never closed"
            assert await verified_io(good.io[0], 1) == 1, "the good host was disturbed"
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        growth = peak - before
        print(f"host reading nothing: 1,500 x 128 KiB reads sent, target RSS grew "
              f"{growth / 2**20:.1f} MiB, closed {time.monotonic() - t0:.2f} s after "
              "the flood began")
        assert growth < 48 << 20, f"RSS grew {growth >> 20} MiB for a host reading nothing"
        assert await verified_io(good.io[0], 3) == 3


# ------------------------------------------------------------------ keep-alive


async def test_discovery_controller_without_kato_gets_two_minutes(tgt: Tgt) -> None:
    """KATO expiry itself is tested in test_nvme_target_admin.py; here the one default:
    a discovery controller whose host asks for no keep-alive still has one (120 s, as
    Linux nvmet), while an I/O controller keeps what the host asked for (none)."""
    q = await open_queue(tgt.addr, tgt.port)
    try:
        assert (await q.connect(0, spec.DISCOVERY_NQN, kato=0)).status == 0
        await q.enable()
        r = await q.admin(spec.AdminOpcode.GET_FEATURES, cdw10=spec.FeatureId.KATO)
        assert r.ok and r.cqe is not None and r.cqe.dw0 == 120_000
    finally:
        await q.close()
    async with raw_controller(tgt, nr_io=0, kato=0) as c:
        r = await c.admin.admin(spec.AdminOpcode.GET_FEATURES, cdw10=spec.FeatureId.KATO)
        assert r.ok and r.cqe is not None and r.cqe.dw0 == 0


# ------------------------------------------------------------------ a real peer


def _spdk_peer_target(launcher: Launcher, nqn: str, bdevs: list[dict], ns_bdev: str,
                      transport: dict) -> tuple[int, RunningTarget]:
    """One reactor exporting ``ns_bdev`` to spdk_nvme_perf through a TCP transport with
    the given (tight) buffer options; returns (port, target)."""
    port = free_port()
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": bdevs},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP", **transport}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": nqn, "allow_any_host": True}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": nqn, "namespace": {"bdev_name": ns_bdev}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": nqn, "listen_address": listen_address(port)}}]}]}
    t = launcher(cfg, cores=[0])
    t.nvme_port = port
    return port, t


@pytest.mark.spdk
def test_spdk_host_under_a_tight_r2t_budget(tmp_path: object) -> None:
    """SPDK's initiator (spdk_nvme_perf) writing 128 KiB at QD 32 against a target whose
    reactor holds only two 128 KiB R2T buffers: most R2Ts wait for buffers, and the
    host sees delayed R2Ts only, never an error. Skips where SPDK's tools are absent."""
    from . import test_spdk_perf_peer as sp

    sp.perf_path()  # skips, saying why, where SPDK's spdk_nvme_perf is not available
    launcher = Launcher()
    try:
        port, t = _spdk_peer_target(
            launcher, sp.NQN, [malloc("M0", 32768, 4096)], "M0",
            {"num_shared_buffers": 2, "max_qpair_buffer_bytes": 128 * KiB})
        out = sp._perf(t, "-w", "write", "-o", "131072", "-q", "32")
        iops, mibs = sp._total(out)
        assert iops > 50 and sp._errors(out) == [], out[-2000:]
        tg = Tgt(t, port)
        waits = metric(tg, "blocktarget_tcp_r2t_buffer_waits_total", '{reactor="0"}')
        limit = metric(tg, "blocktarget_tcp_r2t_buffer_limit_bytes", '{reactor="0"}')
        print(f"spdk_nvme_perf write 128 KiB QD32, 2 x 128 KiB R2T buffers: {iops:.0f} IOPS "
              f"{mibs:.0f} MiB/s, {waits:.0f} R2Ts waited for buffers, 0 errors")
        assert limit == 256 * KiB and waits > 0
    finally:
        launcher.cleanup()


@pytest.mark.spdk
def test_spdk_host_in_capsule_writes_under_a_tight_budget(tmp_path: object) -> None:
    """SPDK's initiator writing 4 KiB (in-capsule data: 4 KiB <= in_capsule_data_size)
    at QD 32 against a reactor budget of 16 KiB (2 x 8 KiB io units): 128 KiB of
    in-capsule data would be in flight, so the target stops reading the connection
    whenever the budget is spent, and the host sees only back-pressure, never an error.
    Skips where SPDK's tools are absent."""
    from . import test_spdk_perf_peer as sp

    sp.perf_path()  # skips, saying why, where SPDK's spdk_nvme_perf is not available
    launcher = Launcher()
    try:
        # 200 us per write keeps the 32 commands (and their data) in flight
        delay = {"method": "bdev_delay_create",
                 "params": {"base_bdev_name": "M0", "name": "D0", "avg_read_latency": 0,
                            "p99_read_latency": 0, "avg_write_latency": 200,
                            "p99_write_latency": 200}}
        port, t = _spdk_peer_target(launcher, sp.NQN, [malloc("M0", 32768, 4096), delay], "D0",
                                    {"num_shared_buffers": 2, "io_unit_size": 8192})
        out = sp._perf(t, "-w", "write", "-o", "4096", "-q", "32")
        iops, mibs = sp._total(out)
        assert iops > 50 and sp._errors(out) == [], out[-2000:]
        tg = Tgt(t, port)
        pauses = metric(tg, "blocktarget_tcp_icd_read_pauses_total", '{reactor="0"}')
        limit = metric(tg, "blocktarget_tcp_r2t_buffer_limit_bytes", '{reactor="0"}')
        held = metric(tg, "blocktarget_tcp_r2t_buffer_bytes", '{reactor="0"}')
        print(f"spdk_nvme_perf write 4 KiB (in-capsule) QD32, 16 KiB budget: {iops:.0f} IOPS "
              f"{mibs:.0f} MiB/s, reads paused {pauses:.0f} times, 0 errors")
        assert limit == 16 * KiB and pauses > 0 and held == 0
    finally:
        launcher.cleanup()
