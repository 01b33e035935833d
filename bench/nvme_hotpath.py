"""The NVMe PCIe lane's CPU per command against the malloc lane's (issue 15 item 8: within
1.3x), side by side in one process, the configurations alternating round by round.

Every figure is bench/hotpath.py's (CPU µs per command of the reactor thread, batches of
32, the NVMe device the unit tests' fake controller with memory doorbells, served
between the loop's turns and not timed). Configurations:

* ``malloc``, ``nvme``: the queue pair fed through ``data_received`` (no socket): the
  lane called from Python; NVMe completions reaped by the reactor's Python poller turn
  (bt_nvmeq_reap, then Lane.drain).
* ``malloc sock``, ``nvme sock``: a loopback socket lent to the reactor's C poller, as a
  served connection is in the target; NVMe completions swept by the C poller
  (be_nvme_reap_lanes: finished and sent in the same GIL-free call).
* ``nvme sock, Python reap``: the same socket, the C poller not sweeping the NVMe queue
  (netpoll.SWEEP_NVME false): the reactor's Python poller reaps it and Lane.drain flushes
  to the lent socket (the state before the sweep).

    PYTHONPATH=$PWD .venv/bin/python bench/nvme_hotpath.py [--ops 32000] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hotpath  # noqa: E402

from blocktarget.nvme import netpoll  # noqa: E402

CONFIGS = (
    ("malloc", "malloc", False, True),
    ("nvme", "nvme", False, True),
    ("malloc sock", "malloc", True, True),
    ("nvme sock", "nvme", True, True),
    ("nvme sock, Python reap", "nvme", True, False),
)
WORKLOADS = (("4K read", 4096, False), ("4K write", 4096, True), ("128K read", 131072, False))


def measure(ops: int, reps: int) -> tuple[dict[tuple[str, str], list[float]],
                                          dict[tuple[str, str], list[float]]]:
    """CPU µs per command, and of that the part outside the C calls (GIL held), per
    (workload, configuration), a figure per round."""
    res: dict[tuple[str, str], list[float]] = {}
    held: dict[tuple[str, str], list[float]] = {}
    for _ in range(reps):
        for wl, size, write in WORKLOADS:
            n = ops if size <= 4096 else max(ops // 5, 320)
            for name, backend, sock, sweep in CONFIGS:
                netpoll.SWEEP_NVME = sweep
                try:
                    r = hotpath.run(n, 32, size, write, False, True, 0, False, backend, sock=sock)
                finally:
                    netpoll.SWEEP_NVME = True
                assert r["in_lane"] > 0.99, (name, wl, r)
                if sock:
                    assert r["lent"], (name, wl, "the socket was not lent to the C poller")
                    if backend == "nvme":
                        want = 1.0 if sweep else 0.0
                        assert r["c_reaped"] == want, (name, wl, r["c_reaped"])
                res.setdefault((wl, name), []).append(r["cpu_us"])
                held.setdefault((wl, name), []).append(max(r["cpu_us"] - r["c_us"], 0.0))
    return res, held


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)  # (the fake device's "no hugepages" per run)
    load = os.getloadavg()
    t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res, held = measure(args.ops, args.reps)
    print(f"{t0}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start, "
          f"{args.reps} alternating rounds, min of the rounds (CPU µs per command)\n")
    names = [c[0] for c in CONFIGS]
    print("| command | " + " | ".join(names) + " | nvme / malloc | nvme sock / malloc sock |")
    print("|---|" + "---|" * (len(names) + 2))
    for wl, _size, _w in WORKLOADS:
        best: dict[str, Any] = {n: min(res[(wl, n)]) for n in names}
        cells = [f"{best[n]:.2f}" for n in names]
        print(f"| {wl} | " + " | ".join(cells)
              + f" | {best['nvme'] / best['malloc']:.2f}x"
              + f" | {best['nvme sock'] / best['malloc sock']:.2f}x |")
    print("\nGIL held (CPU µs per command outside the C calls; the C calls of the NVMe "
          "sweep and of the Python poller's reap timed in wall time, the poll's in CPU "
          "time), min of the rounds:\n")
    print("| command | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for wl, _size, _w in WORKLOADS:
        print(f"| {wl} | " + " | ".join(f"{min(held[(wl, n)]):.2f}" for n in names) + " |")
    print("\nall rounds: " + "; ".join(
        f"{wl} {n}: " + ", ".join(f"{x:.2f}" for x in res[(wl, n)])
        for wl, _s, _w in WORKLOADS for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
