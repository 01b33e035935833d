"""SPDK's user-space NVMe/TCP host (inside spdk_nvme_perf) against blocktarget.

A second, independent implementation of the host side: if SPDK's initiator accepts our
ICResp, Connect responses, R2Ts, C2H data and digests, the wire protocol is not just
matched to one peer. SPDK's tools are optional (see spdk_target.py: $SPDK_TOOLS, then
.tools/spdk in the checkout, then PATH), so these tests skip, with the reason, where
spdk_nvme_perf is not available or cannot start, in CI too.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .spdk_target import find_tool, tool_unavailable_reason
from .target_proc import RunningTarget, free_port, listen_address

NQN = "nqn.2026-01.io.blocktarget:spdkperf"

pytestmark = pytest.mark.spdk


def perf_path() -> Path:
    """spdk_nvme_perf, or a skip saying why it cannot be used (not found, cannot start)."""
    why = tool_unavailable_reason("spdk_nvme_perf")
    if why is not None:
        pytest.skip(why)
    path = find_tool("spdk_nvme_perf")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[RunningTarget]:
    perf_path()
    port = free_port()
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "M0", "num_blocks": 32768, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(port)}}]}]}
    t = RunningTarget(tmp_path_factory.mktemp("spdkperf"), cfg, cores=[0])
    t.nvme_port = port  # type: ignore[attr-defined]
    t.start()
    yield t
    t.kill()


def _perf(target: RunningTarget, *args: str) -> str:
    trid = (f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 "
            f"trsvcid:{target.nvme_port} subnqn:{NQN}")  # type: ignore[attr-defined]
    hugepages = Path("/dev/hugepages").is_dir() and int(
        Path("/proc/sys/vm/nr_hugepages").read_text()) >= 512
    mem = [] if hugepages else ["--no-huge", "-s", "1024"]
    core = "0x2" if (os.cpu_count() or 1) > 1 else "0x1"
    cmd = [str(perf_path()), *mem, "-c", core, "-t", "2", *args, "-r", trid]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{out[-3000:]}"
    return out


def _total(out: str) -> tuple[float, float]:
    m = re.search(r"^Total\s+:\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert m, out[-2000:]
    return float(m.group(1)), float(m.group(2))


def _errors(out: str) -> list[str]:
    # SPDK documents one "CQ transport error -6" at teardown as normal.
    return [ln for ln in out.splitlines()
            if "ERROR" in ln and "CQ transport error -6" not in ln]


@pytest.mark.parametrize("digests", [(), ("-H", "-I")], ids=["plain", "digests"])
@pytest.mark.parametrize(
    "workload",
    [("-w", "randread", "-o", "4096", "-q", "32"),
     ("-w", "randwrite", "-o", "4096", "-q", "32"),
     ("-w", "read", "-o", "131072", "-q", "8"),
     ("-w", "write", "-o", "131072", "-q", "8"),
     ("-w", "randrw", "-M", "70", "-o", "16384", "-q", "16")],
    ids=["randread4k", "randwrite4k", "read128k", "write128k", "randrw16k"],
)
def test_spdk_perf_against_blocktarget(target: RunningTarget, workload, digests) -> None:
    out = _perf(target, *workload, *digests)
    iops, mibs = _total(out)
    assert iops > 50, out[-2000:]
    assert mibs > 0
    assert _errors(out) == [], "\n".join(_errors(out))
    stats = target.rpc("bdev_get_iostat", name="M0")["bdevs"][0]
    assert stats["num_read_ops"] + stats["num_write_ops"] > 0

