"""bench/rpc_latency.py still runs end to end (tiny durations), so the recorded figures
in bench/RESULTS.md stay reproducible with the command written there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rpc_latency.py"


def test_rpc_latency_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(BENCH), "--duration", "0.2", "--warmup", "0.05",
                        "--bdevs", "1,20", "--markdown", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert [(x["client"], x["bdevs"]) for x in results] == [
        ("HTTP keep-alive (http.client)", 1), ("Unix socket, persistent", 1),
        ("Unix socket, SPDK JSONRPCClient", 1),
        ("HTTP keep-alive (http.client)", 20), ("Unix socket, persistent", 20),
        ("Unix socket, SPDK JSONRPCClient", 20)]
    assert all(x["calls"] >= 3 and x["rate"] > 0 for x in results)
    small, big = results[1]["response_bytes"], results[4]["response_bytes"]
    assert big > 10 * small, "20 bdevs are listed, not 1"
    assert r.stdout.splitlines()[1].startswith("| client | bdevs | calls/s")
