"""bench/hotpath.py --socket in two (or more) checkouts, alternating cell by cell.

The other engineers' load moves every figure on this machine by up to 2x between runs;
alternating the trees per cell (their order swapped each round) lets a change be judged
against the load of the same minute. Each run is its own process, one rep, the tree's
own bench/hotpath.py with PYTHONPATH at the tree; the figure kept is its "CPU µs/command".

    python bench/ab_hotpath.py ROUNDS OPS TREE[,TREE...] CELL[,CELL...]

A cell is backend:mode:command: backend a hotpath.py backend, or nvme-py (nvme with the
Python device model), or nvme-sync (nvme with the C model completing at the doorbell,
--nvme-device csync); mode sock or spin; command read or write. Prints the start and end
load average, every run as JSON, then per tree and cell the min and every run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

PY = sys.executable


def run_cell(tree: str, backend: str, mode: str, rw: str, ops: int) -> float | None:
    args = [PY, os.path.join(tree, "bench", "hotpath.py"), "--backend",
            backend.removesuffix("-py").removesuffix("-sync"), "--socket", "--reps", "1",
            "--ops", str(ops)]
    if backend.endswith("-py"):
        args += ["--nvme-device", "python"]
    elif backend.endswith("-sync"):
        args += ["--nvme-device", "csync"]
    if mode == "spin":
        args.append("--spin")
    if rw == "write":
        args.append("--write")
    out = subprocess.run(args, capture_output=True, text=True, cwd=tree, timeout=600,
                         env={**os.environ, "PYTHONPATH": tree}).stdout
    m = re.search(r"CPU µs/command min ([-\d.]+)", out)
    return float(m.group(1)) if m else None


def main() -> int:
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    rounds, ops = int(sys.argv[1]), int(sys.argv[2])
    trees = sys.argv[3].split(",")
    cells = [tuple(c.split(":")) for c in sys.argv[4].split(",")]
    res: dict[str, list[float | None]] = {}
    print("start", time.strftime("%H:%M:%S", time.gmtime()), "load", os.getloadavg(),
          flush=True)
    for r in range(rounds):
        for backend, mode, rw in cells:
            for tree in trees if r % 2 == 0 else trees[::-1]:
                res.setdefault(f"{tree}|{backend}|{mode}|{rw}", []).append(
                    run_cell(tree, backend, mode, rw, ops))
    print("end", time.strftime("%H:%M:%S", time.gmtime()), "load", os.getloadavg())
    print(json.dumps(res))
    for key, runs in res.items():
        got = [x for x in runs if x is not None]
        print(key, f"min {min(got):.2f}" if got else "no figure",
              "runs", ", ".join(f"{x:.2f}" for x in got))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
