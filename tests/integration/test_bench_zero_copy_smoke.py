"""bench/nvme_zero_copy.py still runs end to end (tiny durations), so the figures in
bench/RESULTS.md stay reproducible with the command written there. Budget: ~4 s."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nvme_zero_copy.py"


def test_nvme_zero_copy_bench_runs() -> None:
    r = subprocess.run([sys.executable, str(BENCH), "--time", "0.2", "--rounds", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:7]]
    assert [(x[1], x[2]) for x in rows] == [
        (mode, op) for mode in ("zero-copy", "no-direct-rx", "copy") for op in ("read", "write")
    ], r.stdout
    assert all(float(x[3]) > 0 for x in rows)
    # the no-direct-rx and copy paths never receive into DMA memory directly
    rx = {x[1]: tuple(map(int, x[6].split("/"))) for x in rows if x[2] == "write"}
    assert rx["no-direct-rx"][0] == 0 and rx["copy"] == (0, 0), r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("data path counters:"))
    counters = ast.literal_eval(line.split(":", 1)[1].strip())
    # both paths really ran, and every lent buffer came back
    assert counters["zero_copy_reads"] > 0 and counters["copied_reads"] > 0, counters
    assert counters["zero_copy_writes"] > 0 and counters["copied_writes"] > 0, counters
    assert counters["lent_buffers"] == 0, counters
