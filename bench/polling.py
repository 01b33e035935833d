"""Reactor socket polling policies (event / adaptive / busy) on QD1 latency and idle CPU.

Used by `vs_spdk.py --polling`; runnable alone:

    .venv/bin/python bench/polling.py [--time 3] [--reps 2]

For each mode, a blocktarget with one reactor on core 0 (malloc bdev) serves
spdk_nvme_perf on core 1: 4 KiB randread at QD1 (mean latency, IOPS, target CPU) and at
QD32; then the target sits with no connection for `--time` seconds and its CPU over that
window is the idle cost. Modes alternate within each repetition; medians are reported.
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

from tcp_perf import Target  # noqa: E402
from vs_spdk import MALLOC, measure  # noqa: E402

MODES = ("event", "adaptive", "busy")


def run_mode(tmp: Path, mode: str, secs: int, busy_us: int) -> dict:
    t = Target("blocktarget", "malloc", tmp, bdev=MALLOC,
               bt_extra={"poll": {"mode": mode, "busy_us": busy_us}})
    try:
        time.sleep(0.3)
        qd1 = measure(t, "randread", 4096, 1, secs)
        qd32 = measure(t, "randread", 4096, 32, secs)
        time.sleep(0.5)  # connections gone, adaptive spin over
        c0, w0 = t.cpu_seconds(), time.monotonic()
        time.sleep(secs)
        idle = (t.cpu_seconds() - c0) / (time.monotonic() - w0)
    finally:
        t.stop()
    return {"qd1_lat": qd1.get("lat_us", 0), "qd1_iops": qd1.get("iops", 0),
            "qd1_cpu": qd1.get("cpu_us_per_io", 0), "qd32_iops": qd32.get("iops", 0),
            "qd32_cpu": qd32.get("cpu_us_per_io", 0), "idle_cpu": idle,
            "load": os.getloadavg()[0]}


def polling_table(tmp: Path, secs: int, log: Callable[[str], None], reps: int = 2,
                  busy_us: int = 200) -> list[str]:
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for rep in range(reps):
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            r = run_mode(tmp, mode, secs, busy_us)
            runs[mode].append(r)
            log(f"polling rep {rep} {mode:8} QD1 {r['qd1_lat']:.1f} µs {r['qd1_iops']:,.0f} IOPS "
                f"cpu {r['qd1_cpu']:.1f} µs/IO; QD32 {r['qd32_iops']:,.0f} IOPS cpu "
                f"{r['qd32_cpu']:.2f} µs/IO; idle {100 * r['idle_cpu']:.1f} % of a core; "
                f"load {r['load']:.1f}")
    out = [f"| poll mode (busy_us {busy_us}) | QD1 mean lat µs | QD1 IOPS | QD1 CPU µs/IO "
           "| QD32 IOPS | QD32 CPU µs/IO | idle CPU (% of a core) | runs |",
           "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        rs = runs[mode]

        def med(k: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[k] for r in rs)

        out.append(f"| {mode} | {med('qd1_lat'):.1f} | {med('qd1_iops'):,.0f} | "
                   f"{med('qd1_cpu'):.1f} | {med('qd32_iops'):,.0f} | {med('qd32_cpu'):.2f} | "
                   f"{100 * med('idle_cpu'):.1f} | {len(rs)} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--busy-us", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="polling-") as tmp:
        lines = polling_table(Path(tmp), args.time,
                              lambda m: print(m, file=sys.stderr, flush=True), args.reps,
                              args.busy_us)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
