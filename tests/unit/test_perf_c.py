"""The C engine of `blocktarget perf` (csrc/perf.c, host/fastperf.py) against the Python
engine (host/perf.py's _Engine), the reference.

- The pieces both have: the --verify block pattern (byte for byte) and the latency
  histogram (bucket for bucket), so results mean the same and merge.
- Both engines against the scripted fake controller of test_host_connection.py, on the
  same scripts: clean verified runs (in-capsule and R2T writes, split C2H data, data
  SUCCESS, digests, CPDA padding), a stale block, error statuses, a bad data digest, and
  the fatal cases (C2HTermReq, protocol violations answered with H2CTermReq, a dropped
  connection): same counts, same messages, same exceptions. And what only the C engine
  has: a timeout instead of a hang, cancellation.
"""

from __future__ import annotations

import array
import asyncio
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_connection import (
    READ,
    Disk,
    FakeConn,
    FakeController,
    rw_handler,
    sqe_of,
)

from blocktarget.host import fastperf
from blocktarget.host.connection import TransportError
from blocktarget.host.perf import (
    LatencyHistogram,
    OpStats,
    PerfConfig,
    PerfResult,
    _Engine,
    make_pattern,
    verify_pattern,
)
from blocktarget.nvme import pdu, spec

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not fastperf.AVAILABLE, reason="blocktarget._fastpath not built"),
]

if fastperf.AVAILABLE:
    from blocktarget._fastpath import ffi, lib

BS = 512
UNITS = 64  # 4 KiB units of the fake's 1 MiB disk (a 32 KiB unit: 32 of them)


# ------------------------------------------------------------------------- pattern


@settings(max_examples=300, deadline=None)
@given(slba=st.integers(0, (1 << 64) - 64), nlb=st.integers(1, 4),
       lba_size=st.sampled_from([1, 15, 16, 17, 512, 520, 4096]),
       gen=st.integers(0, 0xFFFFFFFF))
def test_pattern_is_byte_identical(slba: int, nlb: int, lba_size: int, gen: int) -> None:
    buf = ffi.new("unsigned char[]", nlb * lba_size)
    lib.bt_perf_make_pattern(buf, slba, nlb, lba_size, gen)
    ref = make_pattern(slba, nlb, lba_size, gen)
    assert bytes(ffi.buffer(buf)) == ref
    assert lib.bt_perf_check_pattern(ref, slba, nlb, lba_size, gen) == 0


@settings(max_examples=300, deadline=None)
@given(nlb=st.integers(1, 4), lba_size=st.sampled_from([17, 512, 520, 4096]),
       data=st.data())
def test_check_agrees_with_verify_pattern(nlb: int, lba_size: int, data: Any) -> None:
    slba, gen = 1000, 7
    buf = bytearray(make_pattern(slba, nlb, lba_size, gen))
    kind = data.draw(st.sampled_from(["flip", "gen", "lba", "none"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        bad = pos // lba_size
    elif kind == "gen":
        bad = data.draw(st.integers(0, nlb - 1))
        buf[bad * lba_size:(bad + 1) * lba_size] = make_pattern(slba + bad, 1, lba_size, 8)
    elif kind == "lba":
        bad = data.draw(st.integers(0, nlb - 1))
        buf[bad * lba_size:(bad + 1) * lba_size] = make_pattern(slba + nlb, 1, lba_size, gen)
    else:
        bad = None
    got = lib.bt_perf_check_pattern(bytes(buf), slba, nlb, lba_size, gen)
    problem = verify_pattern(bytes(buf), slba, nlb, lba_size, gen)
    if bad is None:
        assert got == 0 and problem is None
    else:
        assert got == bad + 1, (got, bad)
        assert problem is not None and f"LBA {slba + bad}:" in problem


# ------------------------------------------------------------------------ histogram


def test_histogram_index_is_pythons() -> None:
    rng = random.Random(1)
    values = list(range(0, 4096)) + [(1 << k) + d for k in range(7, 64) for d in (-1, 0, 1)]
    values += [rng.getrandbits(rng.randrange(1, 64)) for _ in range(20000)]
    for v in values:
        if 0 <= v < 1 << 64:
            assert lib.bt_perf_hist_index(v) == LatencyHistogram.index(v), v


def test_c_histogram_merges_with_python_ones() -> None:
    """What the C engine records, turned into a LatencyHistogram (as fastperf does), is
    what Python would have recorded; merged with a Python one, percentiles are those of
    all the samples."""
    rng = random.Random(2)
    c_vals = [int(rng.lognormvariate(11, 1.0)) for _ in range(5000)]
    py_vals = [int(rng.lognormvariate(12, 0.5)) for _ in range(5000)]
    d = ffi.new("struct bt_perf_dir *")
    hist = ffi.new("uint64_t[]", LatencyHistogram.NBUCKETS)
    d.hist = hist
    for v in c_vals:
        lib.bt_perf_hist_record(d, v)
    from_c = fastperf._hist(d)
    ref = LatencyHistogram()
    for v in c_vals:
        ref.record(v)
    assert from_c.to_dict() == ref.to_dict()
    other = LatencyHistogram()
    for v in py_vals:
        other.record(v)
    whole = LatencyHistogram()
    for v in c_vals + py_vals:
        whole.record(v)
    merged = LatencyHistogram.from_dict(from_c.to_dict()).merge(other)
    assert merged.to_dict() == whole.to_dict()
    assert merged.percentile(99.9) == whole.percentile(99.9)


# ------------------------------------------------------------- engines on the fake


async def _run(engine: str, handler: Any, workload: str, *, io_size: int = 4096,
               units: int = UNITS, qd: int = 16, time_s: float = 0.3, verify: bool = True,
               icd_max: int = 8192, fc_kw: dict[str, Any] | None = None,
               qp_kw: dict[str, Any] | None = None, fc_out: list[Any] | None = None,
               seed: int = 5) -> PerfResult:
    """One engine's run (prefill, timed run, read-back, as run_perf_async does) against
    the fake; returns the result or raises what the engine raised."""
    async with FakeController(handler, **(fc_kw or {})) as fc:
        if fc_out is not None:
            fc_out.append(fc)
        qp = await fc.open(depth=qd, **(qp_kw or {}))
        qp.icd_max = icd_max
        cfg = PerfConfig("127.0.0.1", fc.port, "nqn.x:y", workload=workload, io_size=io_size,
                         qd=qd, time_s=time_s, verify=verify, seed=seed, engine=engine)
        res = PerfResult(cfg)
        eng: Any
        if engine == "c":
            eng = fastperf.CEngine(qp, cfg, 1, BS, 0, units, qd, res)
        else:
            eng = _Engine(qp, cfg, 1, BS, 0, units, qd, res)
            if verify:
                eng.gens = array.array("I", bytes(4 * units))
        res.engine = eng.kind
        try:
            if verify and cfg.read_share:
                await eng.prefill(None)
            await eng.run()
            if verify and cfg.read_share < 100:
                await eng.read_back(None)
        finally:
            qp.close()
            await asyncio.sleep(0.1)  # the fake reads what we sent last (a TermReq)
        return res


ENGINES = ["python", "c"]


@pytest.fixture
def disk() -> Disk:
    return Disk()


@pytest.mark.parametrize("workload", ["randrw", "rw", "randwrite", "randread", "write"])
@pytest.mark.parametrize("engine", ENGINES)
async def test_clean_verified_runs(disk: Disk, engine: str, workload: str) -> None:
    res = await _run(engine, rw_handler(disk), workload)
    assert res.ok, res.messages
    assert res.read.ops + res.write.ops > 50
    assert res.verified_reads > 0 and res.verify_failures == 0
    assert res.engine == engine


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("name", "io_size", "handler_kw", "fc_kw", "qp_kw", "icd_max"), [
    # every write on R2T, two R2Ts per command, each answered with two H2CData PDUs
    ("r2t", 16384, {"r2t_chunks": [8192]}, {"maxh2cdata": 4096}, {}, 0),
    # reads in three C2HData PDUs, the last one with SUCCESS (no CapsuleResp)
    ("c2h-split-success", 16384, {"c2h_chunks": [5000, 5000], "success": True}, {}, {}, 0),
    # header and data digests, CPDA padding (the fake's decoder checks alignment)
    ("digests-cpda", 8192, {"r2t_chunks": [4096]}, {"cpda": 7, "maxh2cdata": 4096},
     {"hdgst": True, "ddgst": True}, 4096),
    # 32 KiB: the C loop's large-I/O receive path; data SUCCESS
    ("large", 32768, {"success": True}, {}, {}, 8192),
])
async def test_transfer_shapes(disk: Disk, engine: str, name: str, io_size: int,
                               handler_kw: dict[str, Any], fc_kw: dict[str, Any],
                               qp_kw: dict[str, Any], icd_max: int) -> None:
    fcs: list[Any] = []
    res = await _run(engine, rw_handler(disk, **handler_kw), "randrw", io_size=io_size,
                     units=(1 << 20) // io_size, icd_max=icd_max, fc_kw=fc_kw, qp_kw=qp_kw,
                     fc_out=fcs)
    assert res.ok, res.messages
    assert res.verified_reads > 0 and res.verify_failures == 0
    assert not fcs[0].errors  # the fake's decoder found nothing wrong with what we sent
    assert not disk.pending


@pytest.mark.parametrize("engine", ENGINES)
async def test_plain_runs_without_verify(disk: Disk, engine: str) -> None:
    """No verify: the C loop drops read payloads unread; counts and latencies still."""
    for workload, size in (("randread", 4096), ("read", 65536), ("randwrite", 65536)):
        res = await _run(engine, rw_handler(disk, success=size > 4096), workload,
                         io_size=size, units=(1 << 20) // size, verify=False,
                         icd_max=0 if workload == "randwrite" else 8192)
        assert res.ok, res.messages
        s = res.total
        assert s.ops > 20 and s.bytes == s.ops * size and s.hist.count == s.ops
        assert 0 < s.hist.min <= s.hist.percentile(50) <= s.hist.max


def _corrupting(disk: Disk, nth: int) -> Any:
    """rw_handler, but the nth read returns its block with one bit flipped (stale)."""
    base = rw_handler(disk)
    reads = 0

    def handler(conn: FakeConn, p: Any) -> None:
        nonlocal reads
        if isinstance(p, pdu.CapsuleCmd) and sqe_of(p).opcode == READ:
            reads += 1
            if reads == nth:
                off = sqe_of(p).slba * BS + 12
                disk.data[off] ^= 0x01
                base(conn, p)
                disk.data[off] ^= 0x01
                return
        base(conn, p)

    return handler


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_stale_block_is_caught(disk: Disk, engine: str) -> None:
    res = await _run(engine, _corrupting(disk, 5), "randread")  # (the prefill only writes)
    assert res.verify_failures == 1 and not res.ok
    assert len(res.messages) == 1
    assert res.messages[0].startswith("verify: LBA ")
    assert "generation 0, expected 1" in res.messages[0]


def _failing(disk: Disk, every: int, status: int) -> Any:
    """rw_handler, but every `every`th command (after the prefill) fails with status."""
    base = rw_handler(disk)
    n = 0

    def handler(conn: FakeConn, p: Any) -> None:
        nonlocal n
        if isinstance(p, pdu.CapsuleCmd):
            n += 1
            if n > UNITS and n % every == 0:
                conn.respond(sqe_of(p).cid, status=status)
                return
        base(conn, p)

    return handler


async def test_error_statuses_count_the_same(disk: Disk) -> None:
    status = spec.make_status(spec.Sct.MEDIA_ERROR, 0x81, dnr=True)  # Unrecovered Read Error
    results = {}
    for engine in ENGINES:
        d = Disk()
        results[engine] = await _run(engine, _failing(d, 10, status), "randrw", time_s=0.4)
    for engine, res in results.items():
        errors = res.read.errors + res.write.errors
        assert errors > 3, engine
        ops = res.read.ops + res.write.ops + errors
        assert errors == pytest.approx(ops / 10, abs=2), (engine, errors, ops)
        # a failed write is never verified; failed read-back reads count as failures
        assert res.messages and all(
            m.split(" of unit ")[0] in ("read", "write", "verify read")
            and m.endswith(spec.status_name(status)) for m in res.messages), res.messages
        assert not any(m.startswith("verify: ") for m in res.messages)


async def test_a_bad_data_digest_fails_only_its_command() -> None:
    disk = Disk()
    base = rw_handler(disk)
    reads = 0

    def handler(conn: FakeConn, p: Any) -> None:
        nonlocal reads
        if isinstance(p, pdu.CapsuleCmd) and sqe_of(p).opcode == READ:
            reads += 1
            if reads == UNITS + 3:
                sqe = sqe_of(p)
                data = bytes(disk.data[sqe.slba * BS:(sqe.slba + sqe.nlb) * BS])
                conn.send(pdu.C2HData(sqe.cid, 0, data), corrupt_ddgst=True)
                conn.respond(sqe.cid)
                return
        base(conn, p)

    out = {}
    for engine in ENGINES:
        reads = 0
        out[engine] = await _run(engine, handler, "randread", qp_kw={"ddgst": True})
    for res in out.values():
        assert res.read.errors == 1 and res.verify_failures == 0
        assert res.messages == [res.messages[0]]
        assert res.messages[0].endswith(": TRANSIENT_TRANSPORT_ERROR"), res.messages


# ---------------------------------------------------------------------- fatal cases


async def _fatal(engine: str, handler: Any, **kw: Any) -> tuple[BaseException, list[Any]]:
    fcs: list[Any] = []
    with pytest.raises((ConnectionError, TransportError)) as ei:
        await _run(engine, handler, kw.pop("workload", "randread"), fc_out=fcs, **kw)
    return ei.value, fcs[0].conns[-1].received


def _after_prefill(disk: Disk, act: Any, nth: int = 20) -> Any:
    base = rw_handler(disk)
    n = 0

    def handler(conn: FakeConn, p: Any) -> None:
        nonlocal n
        if isinstance(p, pdu.CapsuleCmd):
            n += 1
            if n == UNITS + nth:
                act(conn, p)
                return
        base(conn, p)

    return handler


@pytest.mark.parametrize("case", [
    "term-req", "unknown-c2h-cid", "c2h-offset", "resp-unknown-cid", "bad-hlen",
    "hdgst", "r2t-no-data", "closed",
])
async def test_fatal_cases_match(case: str) -> None:
    def act(conn: FakeConn, p: Any) -> None:
        cid = sqe_of(p).cid
        if case == "term-req":
            conn.send(pdu.TermReq(c2h=True, fes=pdu.Fes.DATA_TRANSFER_LIMIT_EXCEEDED,
                                  fei=0x1234, data=b"y" * 24))
        elif case == "unknown-c2h-cid":
            conn.send(pdu.C2HData(cid + 100, 0, b"\0" * 4096))
        elif case == "c2h-offset":
            conn.send(pdu.C2HData(cid, 512, b"\0" * 512))
        elif case == "resp-unknown-cid":
            conn.respond(cid + 200)
        elif case == "bad-hlen":  # a CapsuleResp whose hlen says 28
            conn.transport.write(bytes([5, 0, 28, 0, 28, 0, 0, 0]) + bytes(20))
        elif case == "hdgst":
            conn.transport.write(bytes([5, 1, 24, 0, 28, 0, 0, 0]) + bytes(20))
        elif case == "r2t-no-data":
            conn.send(pdu.R2T(cid, 7, 0, 4096))
        elif case == "closed":
            conn.close()

    got = {}
    for engine in ENGINES:
        qp_kw = {"hdgst": True} if case == "hdgst" else {}
        got[engine] = await _fatal(engine, _after_prefill(Disk(), act), qp_kw=qp_kw)
    (py_exc, py_rx), (c_exc, c_rx) = got["python"], got["c"]
    assert type(c_exc) is type(py_exc)

    def text(exc: BaseException) -> str:
        # the peer's port and the CIDs differ per run; a close with our bytes unread on
        # the fake's side is a reset or an EOF depending on timing, for either engine
        return re.sub(r"\d+", "#", re.sub(r" lost: .*", " lost", str(exc)))

    assert text(c_exc) == text(py_exc)
    if isinstance(py_exc, TransportError):
        assert c_exc.fes == py_exc.fes

    def terms(rx: list[Any]) -> list[tuple[int, int, bytes]]:
        return [(t.fes, t.fei, t.data) for t in rx if isinstance(t, pdu.TermReq)]

    assert terms(c_rx) == terms(py_rx)  # the same H2CTermReq (or none) went out
    if case in ("unknown-c2h-cid", "c2h-offset", "bad-hlen", "hdgst", "r2t-no-data"):
        assert len(terms(c_rx)) == 1


async def test_no_answer_is_a_timeout_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 s, not less: on a loaded machine (a CI run beside QEMU guests) the fake controller
    # in this process once answered nothing for 0.5 s, and the timeout fired with all 16
    # commands outstanding instead of the one never answered
    monkeypatch.setattr(fastperf, "IO_TIMEOUT_S", 2.0)
    disk = Disk()
    exc, _ = await _fatal("c", _after_prefill(disk, lambda conn, p: None), time_s=1.0)
    assert isinstance(exc, TransportError)
    assert "no completion in 2.0 s with 1 commands outstanding" in str(exc)


async def test_cancel_stops_the_c_loop(disk: Disk) -> None:
    task = asyncio.ensure_future(_run("c", rw_handler(disk), "randrw", time_s=30.0))
    await asyncio.sleep(0.5)
    task.cancel()
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.get_running_loop().time() - t0 < 5.0  # (the run was to last 30 s)


async def test_results_merge_across_engines(disk: Disk) -> None:
    a = await _run("c", rw_handler(disk), "randrw", verify=False)
    b = await _run("python", rw_handler(disk), "randrw", verify=False)
    total = PerfResult(a.config)
    for r in (a, b):
        total.merge(PerfResult.from_wire(r.config, r.to_wire()))
    whole = OpStats().merge(a.total).merge(b.total)
    assert total.total.hist.to_dict() == whole.hist.to_dict()
    assert total.total.ops == a.total.ops + b.total.ops
    assert {a.engine, b.engine} == {"c", "python"}


async def test_write_reaches_the_disk_intact(disk: Disk) -> None:
    """What the C engine writes is make_pattern's bytes, at the right LBAs (checked on
    the fake's disk itself, not through the engine's own reads)."""
    res = await _run("c", rw_handler(disk), "write", units=16, qd=4, time_s=0.2)
    assert res.ok and res.write.ops >= 16
    for unit in range(16):
        block = bytes(disk.data[unit * 4096:(unit + 1) * 4096])
        gen = int.from_bytes(block[12:16], "little")
        assert gen >= 2 and block == make_pattern(unit * 8, 8, BS, gen), unit


async def test_error_answers_do_not_stall_batched_wakeups() -> None:
    """Large reads make the C loop wait for a batch of data per wakeup (SO_RCVLOWAT);
    a controller failing every read answers with 24 bytes instead: the batch is sized
    from what answers actually carry, so the run goes on at the fake's pace."""
    status = spec.make_status(spec.Sct.MEDIA_ERROR, 0x81)

    def handler(conn: FakeConn, p: Any) -> None:
        conn.respond(sqe_of(p).cid, status=status)

    res = await _run("c", handler, "read", io_size=131072, units=8, qd=32, time_s=1.0,
                     verify=False)
    assert res.read.ops == 0 and res.read.errors > 2000, res.read.errors
    assert len(res.messages) == 10
