#!/usr/bin/env python3
"""The cost of block atomicity: pmem bdev I/O against raw libpmem copies of the same size.

One pool file on /dev/shm. The bdev side submits 4 KiB and 128 KiB writes and reads at
random aligned offsets through an `IOChannel` (inline completion, one thread, queue depth
1: the bdev does its work synchronously, so deeper queues would only add Python overhead).
The raw side, after the bdev is closed, maps the same file with libpmem and copies the
same sizes to and from the same data area:

* `pmem_memcpy_persist` (what the issue names as the baseline), and
* memcpy + `pmem_msync`, the primitive the bdev itself uses where `pmem_is_pmem` is false
  (tmpfs), so "bdev / raw msync" isolates the BTT's own overhead.

The ratio raw time / bdev time is the fraction of the raw speed the bdev keeps (1.0 = no
overhead). Each mode runs in its own process: "msync" is tmpfs as it is (pmem_is_pmem
false); "pmem" sets PMEM_IS_PMEM_FORCE=1 so libpmem persists with cache-line flushes and
a fence, the path taken on real persistent memory.

    .venv/bin/python bench/pmem_vs_raw.py [--seconds 1.5] [--mib 256] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

SIZES = (4096, 128 * 1024)
BS = 4096


def timed(fn: Any, seconds: float) -> tuple[int, float, float]:
    """Run fn(i) until `seconds` pass; (calls, wall seconds, CPU seconds of this process).

    CPU time is the steadier figure on a shared machine: wall time also counts the time
    other processes held the CPU."""
    n = 0
    start = time.perf_counter()
    cpu = time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(64):
            fn(n)
            n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n, now - start, time.process_time() - cpu


def run_mode(seconds: float, mib: int) -> list[dict[str, Any]]:
    from blocktarget.bdev import MODULES, BdevIO, IOType, load_builtin_modules
    from blocktarget.bdevs import pmem
    from blocktarget.params import validate

    load_builtin_modules()
    lib, ffi = pmem.require_libpmem()
    nb = mib * 1024 * 1024 // BS
    rng = random.Random(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bt-pmem-bench-", dir="/dev/shm") as d:
        path = os.path.join(d, "pool")
        pmem.create_pool_file(path, nb, BS, lanes=1)
        mod = MODULES["pmem"]
        bdev = mod.create(validate(mod.schema, {"name": "B", "pmem_file": path}))
        is_pmem = bdev.pool.pm.is_pmem
        ch = bdev.get_io_channel(None)
        dataoff = bdev.pool.layout.dataoff
        bdev_times: dict[tuple[str, int], tuple[int, float, float]] = {}
        failed: list[BdevIO] = []

        def check(io: BdevIO) -> None:
            if io.status:
                failed.append(io)

        for size in SIZES:
            count = size // BS
            payload = os.urandom(size)
            slots = nb // count
            offs = [rng.randrange(slots) * count for _ in range(4096)]

            def write(i: int, count: int = count, payload: bytes = payload,
                      offs: list[int] = offs) -> None:
                ch.submit(BdevIO(IOType.WRITE, offs[i & 4095], count, payload, check))

            buf = bytearray(size)
            view = memoryview(buf)

            def read(i: int, count: int = count, offs: list[int] = offs,
                     view: memoryview = view) -> None:
                ch.submit(BdevIO(IOType.READ, offs[i & 4095], count, view, check))

            # fill every block once so reads copy data, not zeroes
            for lba in range(0, nb, 32):
                ch.submit(BdevIO(IOType.WRITE, lba, min(32, nb - lba),
                                 os.urandom(min(32, nb - lba) * BS), check))
            bdev_times[("write", size)] = timed(write, seconds)
            bdev_times[("read", size)] = timed(read, seconds)
            assert not failed, failed[0].status
        bdev.close_channel(None)
        bdev.destruct()

        # raw libpmem on the same file and data area
        mapped = ffi.new("size_t *")
        flag = ffi.new("int *")
        addr = lib.pmem_map_file(path.encode(), 0, 0, 0, mapped, flag)
        assert addr != ffi.NULL
        base = ffi.cast("char *", addr) + dataoff
        try:
            for size in SIZES:
                src = ffi.from_buffer(os.urandom(size))
                dst = ffi.from_buffer(bytearray(size))
                offs = [rng.randrange(nb * BS // size) * size for _ in range(4096)]

                def raw_persist(i: int, size: int = size, src: Any = src,
                                offs: list[int] = offs) -> None:
                    lib.pmem_memcpy_persist(base + offs[i & 4095], src, size)

                def raw_msync(i: int, size: int = size, src: Any = src,
                              offs: list[int] = offs) -> None:
                    lib.bt_copy_msync(base + offs[i & 4095], src, size)

                def raw_read(i: int, size: int = size, dst: Any = dst,
                             offs: list[int] = offs) -> None:
                    lib.memcpy(dst, base + offs[i & 4095], size)

                raw = {
                    "write": [("pmem_memcpy_persist", timed(raw_persist, seconds)),
                              ("memcpy + pmem_msync", timed(raw_msync, seconds))],
                    "read": [("memcpy", timed(raw_read, seconds))],
                }
                for op in ("write", "read"):
                    n, t, c = bdev_times[(op, size)]
                    bdev_us, bdev_cpu = t / n * 1e6, c / n * 1e6
                    for name, (rn, rt, rc) in raw[op]:
                        raw_us, raw_cpu = rt / rn * 1e6, rc / rn * 1e6
                        rows.append({
                            "is_pmem": is_pmem, "op": op, "size": size,
                            "bdev_us": bdev_us, "bdev_cpu_us": bdev_cpu,
                            "bdev_mbs": size / bdev_us,
                            "raw": name, "raw_us": raw_us, "raw_cpu_us": raw_cpu,
                            "raw_mbs": size / raw_us,
                            "ratio": raw_us / bdev_us, "cpu_ratio": raw_cpu / bdev_cpu,
                        })
        finally:
            lib.pmem_unmap(addr, mapped[0])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="per cell")
    ap.add_argument("--mib", type=int, default=256, help="pool size")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.seconds, args.mib)))
        return 0
    rows = []
    for mode, env_extra in (("msync", {"PMEM_IS_PMEM_FORCE": "0"}),
                            ("pmem", {"PMEM_IS_PMEM_FORCE": "1"})):
        env = dict(os.environ, **env_extra)
        out = subprocess.run([sys.executable, __file__, "--child", "--seconds",
                              str(args.seconds), "--mib", str(args.mib)],
                             env=env, capture_output=True, text=True, check=True)
        for row in json.loads(out.stdout):
            row["mode"] = mode
            rows.append(row)
    if args.markdown:
        print("| persist | op | size | bdev µs/op (CPU) | bdev MB/s | raw | raw µs/op (CPU) | "
              "raw MB/s | raw/bdev wall | raw/bdev CPU |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size'] // 1024} KiB"
        if args.markdown:
            print(f"| {r['mode']} | {r['op']} | {size} | {r['bdev_us']:.1f} "
                  f"({r['bdev_cpu_us']:.1f}) | {r['bdev_mbs']:,.0f} | {r['raw']} | "
                  f"{r['raw_us']:.2f} ({r['raw_cpu_us']:.2f}) | {r['raw_mbs']:,.0f} | "
                  f"{r['ratio']:.2f} | {r['cpu_ratio']:.2f} |")
        else:
            print(f"{r['mode']:5} {r['op']:5} {size:>7}: bdev {r['bdev_us']:7.1f} us "
                  f"(cpu {r['bdev_cpu_us']:6.1f}) {r['bdev_mbs']:7,.0f} MB/s | {r['raw']:20} "
                  f"{r['raw_us']:7.2f} us (cpu {r['raw_cpu_us']:6.2f}) "
                  f"{r['raw_mbs']:7,.0f} MB/s | ratio {r['ratio']:.2f} cpu {r['cpu_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
