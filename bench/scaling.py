"""Reactor scaling: 1 vs 2 reactors serving 2 connections, per target CPU-second.

Used by `vs_spdk.py --scaling`; runnable alone:

    .venv/bin/python bench/scaling.py [--time 3] [--reps 2]

spdk_nvme_perf on core 1 opens two I/O queues (`-P 2`) and runs 4 KiB randread QD32 on
each. The target runs with one reactor (core 0) or two (cores 0 and 1; with 2 connections
placed round robin each reactor serves one). There are only 2 cores, so with 2 reactors
the second shares core 1 with the initiator: IOPS alone would mislead, hence IOPS per
target CPU-second (utime+stime of the whole target process) next to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tcp_perf import Target, run_spdk_perf  # noqa: E402
from vs_spdk import MALLOC  # noqa: E402

CONFIGS = (("1 reactor (core 0)", (0,)), ("2 reactors (cores 0, 1)", (0, 1)))


def run_config(tmp: Path, cores: tuple[int, ...], secs: int, rw: str) -> dict:
    t = Target("blocktarget", "malloc", tmp, bdev=MALLOC, cores=cores)
    try:
        time.sleep(0.3)
        c0 = t.cpu_seconds()
        r = run_spdk_perf(t.port, rw, 4096, 32, secs, ("-P", "2"))
        cpu = t.cpu_seconds() - c0
    finally:
        t.stop()
    iops = r.get("iops", 0.0)
    return {"iops": iops, "cpu_s": cpu, "cpu_cores": cpu / secs,
            "iops_per_cpu_s": iops * secs / cpu if cpu else 0.0,
            "load": os.getloadavg()[0], "error": r.get("error")}


def scaling_table(tmp: Path, secs: int, log: Callable[[str], None], reps: int = 2) -> list[str]:
    out = ["| 4K randread QD32 × 2 connections | IOPS | target CPU (cores) "
           "| IOPS per target CPU-s | CPU µs/IO | runs |", "|---|---|---|---|---|---|"]
    for rw in ("randread",):
        runs: dict[str, list[dict]] = {label: [] for label, _ in CONFIGS}
        for rep in range(reps):
            for label, cores in (CONFIGS if rep % 2 == 0 else CONFIGS[::-1]):
                r = run_config(tmp, cores, secs, rw)
                runs[label].append(r)
                log(f"scaling rep {rep} {label:24} {r['iops']:,.0f} IOPS, target CPU "
                    f"{r['cpu_cores']:.2f} cores, {r['iops_per_cpu_s']:,.0f} IOPS/CPU-s, "
                    f"load {r['load']:.1f} {r['error'] or ''}")
        for label, _ in CONFIGS:
            rs = [r for r in runs[label] if r["iops"]]
            if not rs:
                continue
            iops = statistics.median(r["iops"] for r in rs)
            eff = statistics.median(r["iops_per_cpu_s"] for r in rs)
            cores_used = statistics.median(r["cpu_cores"] for r in rs)
            out.append(f"| {label} | {iops:,.0f} | {cores_used:.2f} | {eff:,.0f} | "
                       f"{1e6 / eff if eff else 0:.2f} | {len(rs)} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        lines = scaling_table(Path(tmp), args.time,
                              lambda m: print(m, file=sys.stderr, flush=True), args.reps)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
