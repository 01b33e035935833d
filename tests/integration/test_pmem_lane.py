"""A pmem pool served by the C lane on two reactors at once (two threads in the BTT's C
engine, csrc/be_pmem.c, with the GIL released: one free list each, the map locks and the
read-tracking table shared), driven at once by `blocktarget perf --verify` (the C engine) and by a checking loop
over four I/O queues of blocktarget's own host (consecutive queues land on different
reactors), 4 KiB to 128 KiB, with and without digests; both check every block they read
against what they wrote. Then the pool, reopened, is consistent. The target is real (a
process of its own).

Budget: about 30 s.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.bdevs import pmem
from blocktarget.host import fastperf
from blocktarget.host.perf import PerfConfig, run_perf_async
from blocktarget.nvme import fastlane

from .nvme_target_util import NQN, start_target
from .target_proc import Launcher

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not pmem.libpmem_available(),
                       reason="blocktarget._pmem not built (libpmem-dev missing)"),
    pytest.mark.skipif(not (fastlane.AVAILABLE and pmem.c_engine_available()
                            and fastperf.AVAILABLE),
                       reason="blocktarget._fastpath not built"),
]


@pytest.fixture
def pool_path() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="bt-pmem-lane-", dir=base))
    try:
        yield d / "pool"
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _verify_loop(port: int, first: int, blocks: int, seconds: float,
                       seed: int) -> int:
    """Writes of 1-16 blocks and reads back, each checked, on the I/O queues of one
    controller (round robin: consecutive queues land on different reactors); returns
    how many blocks were checked."""
    from blocktarget.host.controller import connect

    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=4, timeout=15)
    model: dict[int, bytes] = {}
    checked = 0

    async def worker(w: int) -> None:
        nonlocal checked
        rng = random.Random(seed * 100 + w)
        lo = first + w * blocks // 8
        hi = first + (w + 1) * blocks // 8  # workers own disjoint LBAs
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            lba = rng.randrange(lo, hi)
            n = rng.randint(1, min(16, hi - lba))
            data = rng.randbytes(n * 4096)
            await ctrl.write(1, lba, data)
            for i in range(n):
                model[lba + i] = data[i * 4096:(i + 1) * 4096]
            rlba = rng.randrange(lo, hi)
            rn = rng.randint(1, min(16, hi - rlba))
            got = bytes(await ctrl.read(1, rlba, rn))
            for i in range(rn):
                want = model.get(rlba + i)
                if want is not None:
                    assert got[i * 4096:(i + 1) * 4096] == want, f"block {rlba + i}"
                    checked += 1

    try:
        await asyncio.gather(*(worker(w) for w in range(8)))
    finally:
        await ctrl.disconnect()
    return checked


def test_two_reactors_verified(pool_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs for two reactors")
    # few free blocks per lane: slots are reused under the other reactor's readers
    pmem.create_pool_file(str(pool_path), 8192, 4096, lanes=2, free_per_lane=4)
    launcher = Launcher()
    try:
        t = start_target(
            launcher, cores=(0, 1), transport={"in_capsule_data_size": 8192},
            bdevs=[{"method": "bdev_pmem_create",
                    "params": {"name": "PM", "pmem_file": str(pool_path)}}],
            ns=[{"bdev_name": "PM", "nsid": 1}])

        async def both(io_size: int, digests: bool) -> tuple[Any, int]:
            # perf's C engine on blocks 0-4095, the checking loop on 4096-8191, at once
            cfg = PerfConfig(t.addr, t.port, NQN, engine="c", workload="randrw",
                             io_size=io_size, qd=16, time_s=2.0, size=16 << 20,
                             verify=True, progress=False, seed=5, hdgst=digests,
                             ddgst=digests)
            return await asyncio.gather(run_perf_async(cfg),
                                        _verify_loop(t.port, 4096, 4096, 2.0, io_size))

        for io_size, digests in [(4096, False), (131072, False), (16384, True)]:
            res, checked = asyncio.run(both(io_size, digests))
            assert res.engine == "c"
            assert res.ok and res.verified_reads > 0, (io_size, digests, res.messages[:3])
            assert res.write.ops > 0 and checked > 0, (io_size, digests)
        stats = t.rpc("nvmf_get_stats")
        per_reactor = [g["c_lane_commands"] for g in stats["poll_groups"]]
        assert len(per_reactor) == 2 and all(n > 500 for n in per_reactor), per_reactor
        t.proc.kill()
    finally:
        launcher.cleanup()
    pool, fd = pmem.open_pool(str(pool_path))
    try:
        assert pool.check() == []
    finally:
        pool.close()
        os.close(fd)
