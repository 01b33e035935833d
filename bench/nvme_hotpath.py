"""The NVMe PCIe lane's CPU per command against the malloc lane's (issue 15 item 8: within
1.3x), side by side in one process, the configurations alternating round by round.

Every figure is bench/hotpath.py's (CPU µs per command of the reactor thread, batches of
32). The NVMe device is a fake controller whose I/O queues run in C
(tests/unit/cfake_nvme.py), its time never the reactor's: served between the loop's turns
(untimed) where the reactor does not spin, on a thread of its own where it does (--spin:
reaped by the C poller in the call that submitted, as a real SSD's completions are).
Configurations:

* ``malloc``, ``nvme``: the queue pair fed through ``data_received`` (no socket): the
  lane called from Python; NVMe completions reaped by the reactor's Python poller turn
  (bt_nvmeq_reap, then Lane.drain).
* ``malloc sock``, ``nvme sock``: a loopback socket lent to the reactor's C poller, as a
  served connection is in the target, poll mode event; NVMe completions swept by the C
  poller (be_nvme_reap_lanes) at the loop's next turn (netpoll.reap, bt_net_reap).
* ``nvme sock (Python reap)``: the same socket, the C poller not sweeping the NVMe queue
  (netpoll.SWEEP_NVME false): the reactor's Python poller reaps it and Lane.drain flushes
  to the lent socket (the state before the sweep).
* ``nvme sock (Python device)``: ``nvme sock`` with the unit tests' Python device model
  (test_nvme_driver.MemBarNvme) served between the turns: the harness of the figures
  before the C model.
* ``malloc spin``, ``nvme spin``: poll mode adaptive (the target's default), the C
  poller's idle spinning and its sleeps waiting for the device subtracted; NVMe: the C
  device on its own thread.

    PYTHONPATH=$PWD .venv/bin/python bench/nvme_hotpath.py [--ops 32000] [--reps 3]
        [--configs "malloc sock,nvme sock"] [--workloads "4K read,4K write"]
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

# name, backend, socket, the C poller sweeps NVMe queues, spin, device model
CONFIGS = (
    ("malloc", "malloc", False, True, False, "c"),
    ("nvme", "nvme", False, True, False, "c"),
    ("malloc sock", "malloc", True, True, False, "c"),
    ("nvme sock", "nvme", True, True, False, "c"),
    ("nvme sock (Python reap)", "nvme", True, False, False, "c"),
    ("nvme sock (Python device)", "nvme", True, True, False, "python"),
    ("malloc spin", "malloc", True, True, True, "c"),
    ("nvme spin", "nvme", True, True, True, "c"),
)
WORKLOADS = (("4K read", 4096, False), ("4K write", 4096, True), ("128K read", 131072, False))


def measure(ops: int, reps: int, configs: tuple[Any, ...] = CONFIGS,
            workloads: tuple[Any, ...] = WORKLOADS
            ) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], list[float]]]:
    """CPU µs per command, and of that the part outside the C calls (GIL held), per
    (workload, configuration), a figure per round."""
    res: dict[tuple[str, str], list[float]] = {}
    held: dict[tuple[str, str], list[float]] = {}
    for _ in range(reps):
        for wl, size, write in workloads:
            n = ops if size <= 4096 else max(ops // 5, 320)
            for name, backend, sock, sweep, spin, device in configs:
                netpoll.SWEEP_NVME = sweep
                hotpath.NVME_DEVICE["kind"] = device
                try:
                    r = hotpath.run(n, 32, size, write, False, True, 0, False, backend,
                                    sock=sock, spin=spin)
                finally:
                    netpoll.SWEEP_NVME = True
                    hotpath.NVME_DEVICE["kind"] = "c"
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
    ap.add_argument("--configs", default="",
                    help="comma-separated configuration names (default: all)")
    ap.add_argument("--workloads", default="",
                    help="comma-separated: 4K read, 4K write, 128K read (default: all)")
    args = ap.parse_args()
    configs = tuple(c for c in CONFIGS if not args.configs
                    or c[0] in args.configs.split(","))
    workloads = tuple(w for w in WORKLOADS if not args.workloads
                      or w[0] in args.workloads.split(","))
    if not configs or not workloads:
        ap.error("no such configuration or workload")
    import logging

    logging.disable(logging.WARNING)  # (the fake device's "no hugepages" per run)
    load = os.getloadavg()
    t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res, held = measure(args.ops, args.reps, configs, workloads)
    end = os.getloadavg()
    print(f"{t0}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start, "
          f"{end[0]:.2f} at the end, {args.reps} alternating rounds, min of the rounds "
          f"(CPU µs per command)\n")
    names = [c[0] for c in configs]
    pairs = [(a, b) for a, b in (("nvme", "malloc"), ("nvme sock", "malloc sock"),
                                 ("nvme spin", "malloc spin")) if a in names and b in names]
    print("| command | " + " | ".join(names) + "".join(f" | {a} / {b}" for a, b in pairs)
          + " |")
    print("|---|" + "---|" * (len(names) + len(pairs)))
    for wl, _size, _w in workloads:
        best: dict[str, Any] = {n: min(res[(wl, n)]) for n in names}
        cells = [f"{best[n]:.2f}" for n in names]
        print(f"| {wl} | " + " | ".join(cells)
              + "".join(f" | {best[a] / best[b]:.2f}x" for a, b in pairs) + " |")
    print("\nGIL held (CPU µs per command outside the C calls; the C calls of the NVMe "
          "sweep and of the Python poller's reap timed in wall time, the poll's in CPU "
          "time), min of the rounds:\n")
    print("| command | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for wl, _size, _w in workloads:
        print(f"| {wl} | " + " | ".join(f"{min(held[(wl, n)]):.2f}" for n in names) + " |")
    print("\nall rounds: " + "; ".join(
        f"{wl} {n}: " + ", ".join(f"{x:.2f}" for x in res[(wl, n)])
        for wl, _s, _w in workloads for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
