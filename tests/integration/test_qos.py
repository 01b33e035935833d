"""Rate limits (issue 16 item 5) under load against a real target process: one reactor,
two malloc namespaces; `blocktarget perf` (C engine) drives them at QD32. The limited one
must run within 5 % of its limit (IOPS, read MB/s, write MB/s), the unlimited neighbour
on the same reactor must keep most of its throughput, the limits show in bdev_get_bdevs,
the metrics and save_config, removing them gives the namespace back to the C lane, and
bad values are refused. SPDK's rpc.py sets one of the limits. Budget: about 40 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.host import fastperf
from blocktarget.host.perf import PerfConfig, PerfResult, run_perf_async
from blocktarget.rpc_client import RpcCallError

from .nvme_target_util import NQN, Tgt, start_target
from .target_proc import Launcher, malloc

pytestmark = pytest.mark.timeout(240)

LIMITED, NEIGHBOUR = 1, 2
RUN_S = 3.0


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        yield start_target(launcher, cores=(0,),
                           bdevs=[malloc("Q0", 65536, 512), malloc("Q1", 65536, 512)],
                           ns=[{"bdev_name": "Q0", "nsid": LIMITED},
                               {"bdev_name": "Q1", "nsid": NEIGHBOUR}])
    finally:
        launcher.cleanup()


@pytest.fixture(autouse=True)
def _no_limits(tgt: Tgt) -> Iterator[None]:
    yield
    tgt.rpc("bdev_set_qos_limit", name="Q0", rw_ios_per_sec=0, rw_mbytes_per_sec=0,
            r_mbytes_per_sec=0, w_mbytes_per_sec=0)


def cfg(t: Tgt, nsid: int, **kw: Any) -> PerfConfig:
    base: dict[str, Any] = {"workload": "randread", "io_size": 4096, "qd": 32,
                            "time_s": RUN_S, "size": 16 << 20, "progress": False, "seed": 1,
                            "nsid": nsid,
                            "engine": "c" if fastperf.AVAILABLE else "python"}
    base.update(kw)
    return PerfConfig(t.addr, t.port, NQN, **base)


def run(*cfgs: PerfConfig) -> list[PerfResult]:
    async def both() -> list[PerfResult]:
        return list(await asyncio.gather(*(run_perf_async(c) for c in cfgs)))

    out = asyncio.run(both())
    for r in out:
        assert r.ok, r.messages
    return out


def iops(r: PerfResult) -> float:
    return r.total.ops / r.elapsed_s


def mbps(r: PerfResult) -> float:
    return r.total.bytes / r.elapsed_s / (1024 * 1024)


def lane_commands(t: Tgt) -> int:
    return sum(g["c_lane_commands"] for g in t.rpc("nvmf_get_stats")["poll_groups"])


def test_iops_limit_holds_and_the_neighbour_keeps_its_throughput(tgt: Tgt) -> None:
    assert tgt.rpc("bdev_set_qos_limit", name="Q0", rw_ios_per_sec=4000) is True
    # The limit is a ceiling: a reactor starved of CPU by other processes on this 2-CPU
    # machine (a CI run beside QEMU guests) serves the Python path's limited stream less
    # than its share next to a C-lane neighbour, once 72 % of the limit, and the second
    # initiator beside the first takes CPU from the neighbour's. Up to 3 runs; every one
    # must stay under the ceiling, and one must both reach the limit within 5 % and
    # leave the neighbour (C lane) 60 % of what it did alone: the limited namespace
    # costs its reactor ~4000 Python-path I/Os a second, not the neighbour's share.
    runs = []
    for _ in range(3):
        solo = iops(run(cfg(tgt, NEIGHBOUR))[0])
        limited, neighbour = run(cfg(tgt, LIMITED), cfg(tgt, NEIGHBOUR))
        runs.append((iops(limited), iops(neighbour), solo))
        print(f"limit 4000 IOPS: {runs[-1][0]:.0f} IOPS; neighbour {runs[-1][1]:.0f} IOPS "
              f"beside it, {solo:.0f} alone")
        assert runs[-1][0] <= 4000 * 1.05, runs
        if runs[-1][0] >= 4000 * 0.95 and runs[-1][1] >= 0.6 * runs[-1][2]:
            break
    got, beside, alone = runs[-1]
    assert 4000 * 0.95 <= got, runs
    assert beside >= 0.6 * alone, runs
    b = tgt.rpc("bdev_get_bdevs", name="Q0")[0]
    assert b["assigned_rate_limits"] == {"rw_ios_per_sec": 4000, "rw_mbytes_per_sec": 0,
                                         "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}
    status, _, body = tgt.proc.http_get("/metrics")
    text = body.decode()
    assert status == 200
    assert 'blocktarget_bdev_qos_limit{bdev="Q0",limit="rw_ios_per_sec"} 4000.0' in text
    delayed = [line for line in text.splitlines()
               if line.startswith('blocktarget_bdev_qos_delayed_total{bdev="Q0"}')]
    assert delayed and float(delayed[0].split()[-1]) > 0


@pytest.mark.parametrize(("limit", "workload", "io_size", "mb"), [
    ("r_mbytes_per_sec", "randread", 131072, 8),
    ("w_mbytes_per_sec", "randwrite", 65536, 6),
    ("rw_mbytes_per_sec", "randrw", 32768, 10),
])
def test_bandwidth_limits_hold(tgt: Tgt, limit: str, workload: str, io_size: int,
                               mb: int) -> None:
    tgt.rpc("bdev_set_qos_limit", name="Q0", **{limit: mb})
    (r,) = run(cfg(tgt, LIMITED, workload=workload, io_size=io_size))
    print(f"{limit} {mb}: {mbps(r):.2f} MB/s")
    assert mb * 0.95 <= mbps(r) <= mb * 1.05, mbps(r)


def test_a_read_limit_leaves_writes_alone(tgt: Tgt) -> None:
    tgt.rpc("bdev_set_qos_limit", name="Q0", r_mbytes_per_sec=2)
    (w,) = run(cfg(tgt, LIMITED, workload="randwrite", time_s=1.0))
    assert mbps(w) > 4 * 2, mbps(w)


def test_removing_the_limit_gives_the_lane_back(tgt: Tgt) -> None:
    tgt.rpc("bdev_set_qos_limit", name="Q0", rw_ios_per_sec=2000)
    before = lane_commands(tgt)
    run(cfg(tgt, LIMITED, time_s=1.0))
    assert lane_commands(tgt) - before < 50  # the Python path counted them
    tgt.rpc("bdev_set_qos_limit", name="Q0", rw_ios_per_sec=0)
    assert tgt.rpc("bdev_get_bdevs", name="Q0")[0]["assigned_rate_limits"][
        "rw_ios_per_sec"] == 0
    before = lane_commands(tgt)
    (r,) = run(cfg(tgt, LIMITED, time_s=1.0))
    assert iops(r) > 2000 * 3
    assert lane_commands(tgt) - before >= r.total.ops * 0.9


def test_save_config_and_errors(tgt: Tgt) -> None:
    tgt.rpc("bdev_set_qos_limit", name="Q0", rw_ios_per_sec=3000)
    tgt.rpc("bdev_set_qos_limit", name="Q0", w_mbytes_per_sec=7)  # the other stays
    saved = tgt.rpc("save_config")
    calls = [e for s in saved["subsystems"] if s["subsystem"] == "bdev" for e in s["config"]]
    qos = [e for e in calls if e["method"] == "bdev_set_qos_limit"]
    assert qos == [{"method": "bdev_set_qos_limit", "params": {
        "name": "Q0", "rw_ios_per_sec": 3000, "rw_mbytes_per_sec": 0,
        "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 7}}]
    assert calls.index(qos[0]) > max(i for i, e in enumerate(calls)
                                     if e["method"] == "bdev_malloc_create")

    def err(**p: Any) -> RpcCallError:
        with pytest.raises(RpcCallError) as ei:
            tgt.rpc("bdev_set_qos_limit", **p)
        return ei.value

    e = err(name="Q0", rw_ios_per_sec=1500)
    assert e.code == -32602 and "multiple of 1000" in str(e)
    e = err(name="Q0", r_mbytes_per_sec=-1)
    assert e.code == -32602
    e = err(name="Q0")
    assert e.code == -32602 and "at least one" in str(e)
    e = err(name="nope", rw_ios_per_sec=1000)
    assert e.code == -19
    assert tgt.rpc("bdev_get_bdevs", name="Q0")[0]["assigned_rate_limits"][
        "rw_ios_per_sec"] == 3000  # nothing changed by the refused calls


def test_spdk_client_sets_a_limit(tgt: Tgt) -> None:
    from .test_spdk_client import SPDK_RPC, SpdkRpc

    if not Path(SPDK_RPC).exists():
        pytest.fail(f"{SPDK_RPC} is missing (the spdk package is a test dependency)")
    rpc = SpdkRpc(tgt.proc.sock_path)
    try:
        rpc.ok("bdev_set_qos_limit", "Q0", "--rw-ios-per-sec", "5000",
               "--r-mbytes-per-sec", "20")
        lim = rpc.json("bdev_get_bdevs", "-b", "Q0")[0]["assigned_rate_limits"]
        assert lim["rw_ios_per_sec"] == 5000 and lim["r_mbytes_per_sec"] == 20
        err = rpc.fails("bdev_set_qos_limit", "Q0", "--rw-ios-per-sec", "999")
        assert err["code"] == -32602
    finally:
        rpc.close()
