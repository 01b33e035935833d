"""The issue-7 benchmarks still run end to end (tiny durations), so the figures recorded in
bench/RESULTS.md stay reproducible with the commands written there.

- bench/hotpath.py: in process, no peers needed; reads, in-capsule writes, R2T writes.
- bench/vs_spdk.py against blocktarget with `blocktarget perf` as the initiator (real
  target process, real initiator process); with SPDK's tools present (optional tools, see
  bench/spdk_tools.py) also with spdk_nvme_perf against both targets, --markdown into a
  copy of RESULTS.md; without them, that it says they are not available and exits 2.
Budget: ≈ 15 s without SPDK's tools, ≈ 35 s with them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blocktarget.nvme import fastlane

from .spdk_target import find_tool, tool_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SPDK_WHY = tool_unavailable_reason("nvmf_tgt") or tool_unavailable_reason("spdk_nvme_perf")


def _loop_unavailable() -> str | None:
    sys.path.insert(0, str(BENCH))
    try:
        import loopdev
    finally:
        sys.path.remove(str(BENCH))
    return loopdev.unavailable_reason()


def _env() -> dict[str, str]:
    """The scripts run from a copy of bench/ find SPDK's tools where this checkout does."""
    env = dict(os.environ)
    tgt, perf = find_tool("nvmf_tgt"), find_tool("spdk_nvme_perf")
    if tgt is not None and perf is not None and tgt.parent == perf.parent:
        env["SPDK_TOOLS"] = str(tgt.parent)
    return env


def _run(*args: str, timeout: int = 120, cwd: Path = ROOT, rc: int = 0) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd, env=_env())
    assert r.returncode == rc, f"{args} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.parametrize(("args", "in_lane"), [
    ((), 100), (("--write",), 100), (("--write", "--size", "131072"), 100),
    (("--digests",), 100), (("--python-path",), 0), (("--write", "--python-path"), 0),
    # in socket reads the Python decoder finishes a PDU spanning two reads; the lane
    # still executes a write whose data it was (Lane.h2c), not a capsule it was
    (("--write", "--size", "131072", "--reads", "262144"), 90),
    (("--write", "--reads", "262144"), 90),
    # over a loopback socket lent to the reactor's C poller; NVMe: swept by it
    (("--socket",), 100), (("--socket", "--write"), 100),
    (("--socket", "--backend", "nvme"), 100),
    # the C device completing at the doorbell, inside the target's call: one loop turn
    (("--socket", "--backend", "nvme", "--nvme-device", "csync", "--write"), 100),
    # a uring bdev on a loop device the bench attaches over a /dev/shm file
    (("--socket", "--backend", "uring-loop", "--write"), 100),
], ids=["read", "write", "r2t", "digests", "read-python", "write-python", "r2t-arena",
        "write-arena", "socket-read", "socket-write", "socket-nvme", "socket-nvme-csync",
        "socket-uring-loop"])
def test_hotpath_bench_runs(args: tuple[str, ...], in_lane: int) -> None:
    if "uring-loop" in args and (why := _loop_unavailable()) is not None:
        pytest.xfail(f"no loop devices here: {why}")
    out = _run(str(BENCH / "hotpath.py"), "--ops", "640", "--reps", "1", *args)
    m = re.search(r"CPU µs/command min ([\d.]+)", out)
    assert m and 0 < float(m.group(1)) < 10_000, out
    # where the C lane applies (reads, writes in capsule or by R2T, with or without
    # digests) it took them (all, or at least `in_lane` % when delivered in socket reads)
    m = re.search(r" (\d+)% of commands in the C lane", out)
    assert m, out
    share = int(m.group(1))
    if not fastlane.AVAILABLE:  # built without a compiler: the Python path only
        assert share == 0 and os.environ.get("CI") != "true", "the C lane was not built"
        return
    assert share >= in_lane if "--reads" in args else share == in_lane, out
    if "--socket" in args:
        assert "socket lent to the C poller: True" in out, out
        if "nvme" in args:
            assert "NVMe completions reaped by the C poller 100%" in out, out
        if "csync" in args:  # (reaped and answered in the call that submitted them)
            assert "loop turns per batch 1.00" in out, out
            assert "the synchronous C device in the reactor's calls" in out, out


def test_nvme_hotpath_bench_runs() -> None:
    """bench/nvme_hotpath.py: every configuration ran in the lane (it asserts that, and
    that the sockets were lent and the NVMe completions reaped where it says)."""
    if not fastlane.AVAILABLE:
        assert os.environ.get("CI") != "true", "the C lane was not built"
        pytest.xfail("the C lane is not built here: nothing to compare")
    out = _run(str(BENCH / "nvme_hotpath.py"), "--ops", "320", "--reps", "1", timeout=300)
    rows = re.findall(r"^\| (4K read|4K write|128K read) \| ([\d.]+) \|", out, re.M)
    # the CPU table, then the GIL-held one (a 128K read's time outside the C calls can
    # round to 0.00 over 320 commands)
    assert len(rows) == 6, out
    assert all(float(v) > 0 for _wl, v in rows[:3]), out
    assert all(float(v) >= 0 for _wl, v in rows[3:]), out


def test_vs_spdk_with_blocktarget_perf() -> None:
    out = _run(str(BENCH / "vs_spdk.py"), "--only", "blocktarget", "--reps", "1", "--time",
               "1", "--workloads", "4K randread QD1,128K write QD32",
               "--initiators", "blocktarget perf")
    rows = [ln for ln in out.splitlines() if ln.startswith("| 4K randread QD1")
            or ln.startswith("| 128K write QD32")]
    assert len(rows) == 2, out
    for row in rows:
        iops = float(row.split("|")[3].replace(",", ""))
        assert iops > 0, row


def test_vs_spdk_without_spdk_says_not_available() -> None:
    """Without SPDK's tools a run that needs them stops at once, saying what is missing
    and where it looked (the blocktarget-only run above still works)."""
    if SPDK_WHY is None:
        pytest.skip("SPDK's tools are available here: test_vs_spdk_against_spdk_appends_markdown"
                    " runs them instead")
    out = _run(str(BENCH / "vs_spdk.py"), "--reps", "1", "--time", "1", rc=2, timeout=60)
    assert SPDK_WHY in out and "not available" in out and "SPDK_TOOLS" in out, out
    assert "only --only blocktarget --initiators 'blocktarget perf' runs" in out, out


@pytest.mark.spdk
@pytest.mark.skipif(SPDK_WHY is not None, reason=str(SPDK_WHY))
def test_vs_spdk_against_spdk_appends_markdown(tmp_path: Path) -> None:
    # run from a copy of the bench directory so the real RESULTS.md is left alone
    work = tmp_path / "repo"
    shutil.copytree(BENCH, work / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "bench" / "RESULTS.md").write_text("# results\n")
    env_root = str(work / "bench" / "vs_spdk.py")
    out = _run(env_root, "--reps", "1", "--time", "1", "--workloads", "4K randread QD32",
               "--initiators", "spdk_nvme_perf", "--markdown", cwd=ROOT, timeout=180)
    row = next(ln for ln in out.splitlines() if ln.startswith("| 4K randread QD32"))
    cells = [c.strip() for c in row.split("|")]
    assert float(cells[3].replace(",", "")) > 0 and float(cells[8].replace(",", "")) > 0, row
    text = (work / "bench" / "RESULTS.md").read_text()
    assert "Command: `.venv/bin/python bench/vs_spdk.py" in text and row in text


def test_uring_sock_bench_runs() -> None:
    """bench/uring_sock.py builds its liburing binding and both servers answer requests
    (≈ 8 s: six 0.5 s cases plus process start-up)."""
    out = _run(str(BENCH / "uring_sock.py"), "--time", "0.5", "--reps", "1", timeout=180)
    rows = re.findall(r"^\| (\d+) KiB \| (\d+) \| (epoll|io_uring) \| ([\d,]+) \| ([\d.]+) ",
                      out, re.M)
    assert len(rows) == 6, out
    for _size, _qd, _kind, ops, cpu in rows:
        assert int(ops.replace(",", "")) > 0 and float(cpu) > 0, out


def test_netpoll_call_bench_runs() -> None:
    """bench/netpoll_call.py times the C poller's empty call, against itself as the
    --before tree here (two rounds of 2,000 calls each way)."""
    out = _run(str(BENCH / "netpoll_call.py"), "--calls", "2000", "--rounds", "2",
               "--before", str(ROOT), timeout=180)
    rows = re.findall(r"^\| (this tree|before) \| ([\d.]+) \(([\d.]+)\) \| ([\d.]+) "
                      r"\(([\d.]+)\) \| (-?[\d.]+) \(", out, re.M)
    assert [r[0] for r in rows] == ["this tree", "before"], out
    for _name, call, _med, c_call, _cmed, _py in rows:
        assert float(call) > 0 and float(c_call) > 0, out
