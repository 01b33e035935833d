"""`blocktarget perf`'s two engines against a real target: the C engine (csrc/perf.c)
must see exactly what the Python engine (the reference) sees.

One target process: malloc (512-byte blocks), null (4 KiB), and an error bdev over a
malloc to inject faults; 4 KiB of in-capsule data, so larger writes take R2T. Each
check runs both engines on the same workload and compares: verified runs (in-capsule
and R2T writes, multi-PDU reads, digests) stay clean; injected read/write failures are
counted one for one; injected corruption and a block overwritten behind the
initiator's back (a second connection) are caught with the same messages; the CLI says
which engine ran and why, and --journal keeps the Python engine.
Budget: about 30 s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.host import connect, fastperf
from blocktarget.host.perf import PerfConfig, PerfResult, run_perf_async

from .nvme_target_util import NQN, Tgt, start_target
from .target_proc import Launcher, malloc, run_cli

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not fastperf.AVAILABLE, reason="blocktarget._fastpath not built"),
]

ENGINES = ("python", "c")
NS_MALLOC, NS_NULL, NS_ERROR = 1, 2, 3


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        yield start_target(
            launcher,
            transport={"in_capsule_data_size": 4096},
            bdevs=[malloc("M0", 65536, 512),
                   {"method": "bdev_null_create",
                    "params": {"name": "N0", "num_blocks": 65536, "block_size": 4096}},
                   malloc("M1", 8192, 512),
                   {"method": "bdev_error_create", "params": {"base_name": "M1"}}],
            ns=[{"bdev_name": "M0", "nsid": NS_MALLOC}, {"bdev_name": "N0", "nsid": NS_NULL},
                {"bdev_name": "EE_M1", "nsid": NS_ERROR}])
    finally:
        launcher.cleanup()


def _cfg(t: Tgt, engine: str, **kw: Any) -> PerfConfig:
    base: dict[str, Any] = {"workload": "randrw", "io_size": 4096, "qd": 16, "time_s": 1.0,
                            "size": 4 << 20, "progress": False, "seed": 3}
    base.update(kw)
    return PerfConfig(t.addr, t.port, NQN, engine=engine, **base)


def _run(t: Tgt, engine: str, **kw: Any) -> PerfResult:
    res = asyncio.run(run_perf_async(_cfg(t, engine, **kw)))
    assert res.engine == engine
    return res


@pytest.mark.parametrize(("io_size", "digests", "workload"), [
    (4096, False, "randrw"), (131072, False, "randrw"), (8192, True, "randrw"),
    (131072, True, "rw"), (65536, False, "write"),
], ids=["4k", "128k-r2t", "8k-digests", "128k-digests", "64k-write"])
def test_verified_runs_are_clean_on_both(tgt: Tgt, io_size: int, digests: bool,
                                         workload: str) -> None:
    for engine in ENGINES:
        res = _run(tgt, engine, workload=workload, io_size=io_size, verify=True,
                   hdgst=digests, ddgst=digests, size=8 << 20)
        assert res.ok, (engine, res.messages)
        assert res.verified_reads > 0 and res.verify_failures == 0, engine
        s = res.total
        assert s.ops > 0 and s.hist.count == s.ops and s.bytes == s.ops * io_size


def test_null_bdev_without_verify(tgt: Tgt) -> None:
    for engine in ENGINES:
        for workload, size in (("randread", 4096), ("read", 131072), ("randwrite", 131072)):
            res = _run(tgt, engine, workload=workload, io_size=size, nsid=NS_NULL,
                       time_s=0.5, size=0)
            assert res.ok and res.total.ops > 0, (engine, workload, res.messages)


@pytest.mark.parametrize("io_type", ["read", "write"])
def test_injected_failures_are_counted_one_for_one(tgt: Tgt, io_type: str) -> None:
    counts = {}
    for engine in ENGINES:
        tgt.rpc("bdev_error_inject_error", name="EE_M1", io_type=io_type, num=5,
                status="UNRECOVERED_READ_ERROR" if io_type == "read" else "WRITE_FAULT")
        res = _run(tgt, engine, workload="rand" + io_type, nsid=NS_ERROR, size=0,
                   time_s=0.5)
        stats = res.read if io_type == "read" else res.write
        counts[engine] = (stats.errors, sorted(m.split(": ", 1)[1] for m in res.messages))
        assert stats.ops > 0
    assert counts["c"] == counts["python"]
    assert counts["c"][0] == 5, counts


def test_injected_corruption_is_caught_alike(tgt: Tgt) -> None:
    got = {}
    for engine in ENGINES:
        tgt.rpc("bdev_error_inject_error", name="EE_M1", io_type="read",
                error_type="corrupt_data", num=3, corrupt_offset=700, corrupt_value=0x40)
        res = _run(tgt, engine, workload="randread", nsid=NS_ERROR, size=1 << 20,
                   verify=True, time_s=0.5)
        got[engine] = (res.verify_failures, [m.split(":")[2] for m in res.messages])
        assert res.verified_reads > 3 and not res.ok
    assert got["c"] == got["python"]
    assert got["c"] == (3, [" stamp right but block body corrupt"] * 3), got


@pytest.mark.parametrize("engine", ENGINES)
def test_a_block_overwritten_behind_its_back_is_caught(tgt: Tgt, engine: str) -> None:
    """A second connection zeroes one block of the working set while a verifying run
    reads it over and over: the run reports it as a block with no pattern."""

    async def go() -> PerfResult:
        cfg = _cfg(tgt, engine, workload="randread", verify=True, size=64 << 10,
                   time_s=2.0)
        run = asyncio.ensure_future(run_perf_async(cfg))
        await asyncio.sleep(1.0)  # connected, prefilled, running
        other = await connect(tgt.addr, tgt.port, NQN, timeout=10)
        try:
            await other.write(NS_MALLOC, 24, bytes(4096))  # unit 3 (8 blocks a unit)
        finally:
            await other.disconnect()
        return await run

    res = asyncio.run(go())
    assert res.engine == engine
    assert res.verify_failures > 0 and not res.ok
    assert all(m == "verify: LBA 24: no pattern (starts " + "00" * 16 + ")"
               for m in res.messages), res.messages


def test_cli_says_which_engine_ran(tgt: Tgt, tmp_path: Path) -> None:
    common = ["perf", "-a", tgt.addr, "-s", str(tgt.port), "-n", NQN, "-t", "1",
              "--size", "2M", "--json"]
    r = run_cli(*common, "-w", "randrw", "--verify", "-c", "2", timeout=60)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["engine"], s["engine_note"]) == ("c", "")
    assert s["verified_reads"] > 0 and s["verify_failures"] == 0
    assert "IOPS" in r.stderr  # progress lines from both workers' shared counters
    r = run_cli(*common, "--verify", "--journal", str(tmp_path / "j"), timeout=60)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["engine"] == "python" and "--journal" in s["engine_note"]
    r = run_cli(*common, "--verify", "--journal", str(tmp_path / "j"), "--engine", "c")
    assert r.returncode == 2 and "--journal runs on the Python engine" in r.stderr
    r = run_cli(*common[:-1], "--engine", "python", "-w", "randread")
    assert r.returncode == 0 and ", engine python" in r.stdout, r.stdout


def test_busy_poll_spins_and_is_refused_where_it_cannot(tgt: Tgt, tmp_path: Path) -> None:
    """--busy-poll: the C engine spins on the socket (no poll() call at all, and a
    verified run stays clean); with the Python engine, or a run that needs it, it is
    refused rather than ignored."""
    res = _run(tgt, "c", workload="randrw", verify=True, busy_poll=True, qd=1, time_s=0.5)
    assert res.ok and res.verified_reads > 0 and res.verify_failures == 0, res.messages
    common = ["perf", "-a", tgt.addr, "-s", str(tgt.port), "-n", NQN, "-t", "0.5",
              "--size", "2M", "--busy-poll"]
    r = run_cli(*common, "--engine", "python")
    assert r.returncode == 2 and "only the C engine spins" in r.stderr, r.stderr
    r = run_cli(*common, "--verify", "--journal", str(tmp_path / "j"))
    assert r.returncode == 2 and "--busy-poll" in r.stderr, r.stderr
