#!/usr/bin/env python3
"""What a logical volume costs over its base bdev, on the Python path (the bdev layer
alone; `bench/hotpath.py --lvol` measures it through the NVMe/TCP C lane): 4 KiB random reads and writes at queue depth 1 through an
`IOChannel` with inline completion (a malloc base, so the device costs nothing and the
figure is the volume layer's own CPU), A (the base) and B (a thick volume filling the
same base) alternating in rounds; and the cost of a first write to a thin cluster (the
whole cluster written, a flush, the metadata slot written, a flush) and of a first write
after a snapshot (the parent's cluster read and copied first), per cluster size.

    .venv/bin/python bench/lvol_overhead.py [--seconds 1.0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any

BS = 4096
BASE_MIB = 256


def timed(fn: Any, seconds: float) -> tuple[int, float]:
    """Calls of fn(i) in `seconds`; (calls, CPU seconds of this process)."""
    n = 0
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(64):
            fn(n)
            n += 1
    return n, time.process_time() - cpu


async def main(seconds: float, rounds: int) -> None:
    from blocktarget.app import Target
    from blocktarget.bdev import BdevIO, IOType
    from blocktarget.config import Settings

    t = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False))

    async def call(method: str, **params: Any) -> Any:
        r = await t.dispatcher.handle({"jsonrpc": "2.0", "id": 1, "method": method,
                                       "params": params})
        assert "error" not in r, r
        return r["result"]

    await call("bdev_malloc_create", name="M0", num_blocks=BASE_MIB * 256, block_size=BS)
    await call("bdev_malloc_create", name="M1", num_blocks=BASE_MIB * 256, block_size=BS)
    await call("bdev_lvol_create_lvstore", bdev_name="M1", lvs_name="lvs",
               cluster_sz=4 << 20, clear_method="none")
    free = (await call("bdev_lvol_get_lvstores"))[0]["free_clusters"]
    await call("bdev_lvol_create", lvs_name="lvs", lvol_name="thick", size_in_mib=4 * free)
    base, vol = t.bdevs.get("M0"), t.bdevs.get("lvs/thick")
    span = min(base.num_blocks, vol.num_blocks)
    rng = random.Random(1)
    offs = [rng.randrange(span) for _ in range(1 << 16)]
    data = memoryview(os.urandom(BS))
    done: list[BdevIO] = []

    def runner(bdev: Any, kind: IOType) -> Any:
        ch = bdev.get_io_channel(None)
        buf = data if kind == IOType.WRITE else None

        def one(i: int) -> None:
            ch.submit(BdevIO(kind, offs[i & 0xFFFF], 1, buf, done.append))
            done.pop()

        return one

    print(f"load average {os.getloadavg()[0]:.2f}; {seconds}s per run, {rounds} rounds, "
          "A = malloc base, B = thick lvol on malloc (4 KiB, QD1, inline)")
    for kind in (IOType.READ, IOType.WRITE):
        ratios = []
        for r in range(rounds):
            a_n, a_cpu = timed(runner(base, kind), seconds)
            b_n, b_cpu = timed(runner(vol, kind), seconds)
            a_us, b_us = a_cpu / a_n * 1e6, b_cpu / b_n * 1e6
            ratios.append(b_us / a_us)
            print(f"  {kind.name.lower():5} round {r}: base {a_us:.2f} us/IO, "
                  f"lvol {b_us:.2f} us/IO, lvol/base {b_us / a_us:.2f}")
        print(f"  {kind.name.lower():5} lvol/base CPU per I/O, median of rounds: "
              f"{sorted(ratios)[len(ratios) // 2]:.2f}")

    await call("bdev_lvol_delete", name="lvs/thick")
    for cs in (64 << 10, 1 << 20, 4 << 20):
        await call("bdev_lvol_delete_lvstore", lvs_name="lvs")
        await call("bdev_lvol_create_lvstore", bdev_name="M1", lvs_name="lvs",
                   cluster_sz=cs, clear_method="none")
        await call("bdev_lvol_create", lvs_name="lvs", lvol_name="thin",
                   size_in_mib=BASE_MIB, thin_provision=True)
        thin = t.bdevs.get("lvs/thin")
        ch = thin.get_io_channel(None)
        bpc = cs // BS
        n = min(200, (BASE_MIB << 20) // cs // 2 - 8)  # room for the copies too
        start = time.perf_counter()
        for c in range(n):  # the first write of each cluster allocates it
            ch.submit(BdevIO(IOType.WRITE, c * bpc, 1, data, done.append))
            assert done.pop().status == 0
        first = (time.perf_counter() - start) / n
        start = time.perf_counter()
        for c in range(n):  # the same blocks again: mapped now
            ch.submit(BdevIO(IOType.WRITE, c * bpc, 1, data, done.append))
            assert done.pop().status == 0
        again = (time.perf_counter() - start) / n
        await call("bdev_lvol_snapshot", lvol_name="lvs/thin", snapshot_name="snap")
        ch = thin.get_io_channel(None)
        start = time.perf_counter()
        for c in range(n):  # the first write after the snapshot copies the cluster
            ch.submit(BdevIO(IOType.WRITE, c * bpc + 1, 1, data, done.append))
            assert done.pop().status == 0
        cow = (time.perf_counter() - start) / n
        print(f"  cluster {cs >> 10:4} KiB: thin first write {first * 1e6:5.0f} us, "
              f"copy-on-write after a snapshot {cow * 1e6:5.0f} us, mapped {again * 1e6:4.1f} us"
              f" ({n} clusters)")
        await call("bdev_lvol_delete", name="lvs/thin")
        await call("bdev_lvol_delete", name="lvs/snap")
    await t.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    asyncio.run(main(a.seconds, a.rounds))
