"""What one call of the reactor's C socket poller costs when it finds nothing to do: the
Python around the call (NetPoller.poll) and the C call alone (bt_net_poll), per call.

Why: under a host slower than the busy-poll window (a QEMU guest's kernel initiator at
QD1) every command is one wake-up and one such call, so this fixed cost is paid per
command; under TCG it is multiplied with everything else (bench/RESULTS.md, the QD1
goal in the guest). A connection is lent to the poller over a real socket pair (the unit
tests' harness), the reactor in poll mode event; ``--calls`` empty calls each way,
``--rounds`` rounds, min and median per call. ``--before TREE`` runs the same in
another checkout (built in place) too, the trees alternating by round.

    PYTHONPATH=$PWD .venv/bin/python bench/netpoll_call.py [--before TREE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time
sys.path.insert(0, "tests/unit")
from lane_harness import OPTS, rd
from net_harness import SockPair
from test_netpoll import SQFLOW_OFF, _lent
from blocktarget.nvme import netpoll
p = SockPair(OPTS, cattr=SQFLOW_OFF)
p.feed(rd(900, 2, 0))
assert _lent(p)
r = p.fast.reactor
r.set_poll_mode("event")
np_, lib, N = r.net_poller, netpoll.lib, int(sys.argv[1])
t0 = time.perf_counter_ns()
for _ in range(N):
    np_.poll()
t1 = time.perf_counter_ns()
n = np_.n
for _ in range(N):
    lib.bt_net_poll(n, np_._ready, netpoll.MAX_READY, np_._nready, netpoll.BUDGET_NS, 0)
t2 = time.perf_counter_ns()
p.close()
print(json.dumps({"call_us": (t1 - t0) / N / 1000, "c_us": (t2 - t1) / N / 1000}))
"""


def measure(tree: Path, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(calls)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise SystemExit(f"{tree}: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["py_us"] = r["call_us"] - r["c_us"]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", type=Path, default=None, metavar="TREE")
    args = ap.parse_args()
    trees = [("this tree", ROOT)] + ([("before", args.before.resolve())] if args.before else [])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for k in range(args.rounds):
        for name, tree in (trees if k % 2 == 0 else trees[::-1]):
            runs[name].append(measure(tree, args.calls))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
          f"{os.getloadavg()[0]:.2f}, {args.rounds} rounds of {args.calls:,} empty calls")
    print("| tree | whole call µs, min (median) | C call alone | Python around it |")
    print("|---|---|---|---|")
    for name, _ in trees:
        cells = []
        for key in ("call_us", "c_us", "py_us"):
            v = [r[key] for r in runs[name]]
            cells.append(f"{min(v):.2f} ({statistics.median(v):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
