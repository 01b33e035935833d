"""NVMe/TCP baseline: blocktarget vs SPDK's nvmf_tgt, same initiators, same run.

For each bdev type (null, malloc) both targets are started with equivalent configs (one
core: the target on CPU 0, the initiator on CPU 1) and each workload is run with
spdk_nvme_perf and with `blocktarget perf` against one target and then the other, back to
back, so the ratios compare like with like on a noisy 2-core machine. spdk_nvme_perf is
the fast initiator; `blocktarget perf` shows whether the Python initiator is the limit.

    .venv/bin/python bench/tcp_perf.py [--time 3] [--markdown]

SPDK's nvmf_tgt and spdk_nvme_perf are optional (bench/spdk_tools.py: $SPDK_TOOLS, then
.tools/spdk in the checkout, then PATH); without them only blocktarget perf against
blocktarget runs, and the script says so.

`Target`, `run_spdk_perf` and `run_bt_perf` are also the building blocks of
bench/vs_spdk.py (issue 7: repetitions, medians, memory, polling, scaling), which
imports them from here rather than keeping a second copy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spdk_tools import find_tool, unavailable_reason  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NQN = "nqn.2026-01.io.blocktarget:bench"
WORKLOADS = [
    ("4K randread QD1", "randread", 4096, 1),
    ("4K randread QD32", "randread", 4096, 32),
    ("128K read QD32", "read", 131072, 32),
    ("4K randwrite QD32", "randwrite", 4096, 32),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bdev_call(kind: str) -> dict:
    if kind == "null":
        return {"method": "bdev_null_create",
                "params": {"name": "B0", "num_blocks": 262144, "block_size": 4096}}
    return {"method": "bdev_malloc_create",
            "params": {"name": "B0", "num_blocks": 65536, "block_size": 4096}}


def nvmf_calls(port: int) -> list[dict]:
    return [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True,
                                                       "serial_number": "BENCH0001"}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace":
                                                       {"bdev_name": "B0"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address": {
            "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}}},
    ]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("target did not start listening")


def hugepages() -> bool:
    try:
        return Path("/dev/hugepages").is_dir() and int(
            Path("/proc/sys/vm/nr_hugepages").read_text()) >= 512
    except OSError:
        return False


class Target:
    """One target process (blocktarget or SPDK's nvmf_tgt) serving one bdev.

    ``cores`` are blocktarget's reactor cores (SPDK always gets core 0: its reactor
    spins, so a second core would only take the initiator's); ``bt_extra`` is merged
    into blocktarget's own config section (e.g. a reactor polling policy)."""

    def __init__(self, name: str, kind: str, workdir: Path, *, cores: tuple[int, ...] = (0,),
                 bdev: dict | None = None, bt_extra: dict | None = None,
                 spdk_mem_mb: int = 1024, bt_tree: Path | None = None,
                 transport: dict | None = None) -> None:
        self.name = name
        self.port = free_port()
        nvmf = nvmf_calls(self.port)
        if transport:  # extra nvmf_create_transport parameters (blocktarget only)
            nvmf[0]["params"].update(transport)
        cfg = {"subsystems": [{"subsystem": "bdev", "config": [bdev or bdev_call(kind)]},
                              {"subsystem": "nvmf", "config": nvmf}]}
        log = open(workdir / f"{name}-{kind}.log", "wb")  # noqa: SIM115 - lives with proc
        if name.startswith("blocktarget"):
            cfg["blocktarget"] = {"cores": list(cores), "log_level": "warning",
                                  "rpc": {"http": None, "unix": str(workdir / "bt.sock")},
                                  **(bt_extra or {})}
            path = workdir / "bt.json"
            path.write_text(json.dumps(cfg))
            cmd = [sys.executable, "-m", "blocktarget", "start", "-c", str(path)]
        else:
            path = workdir / "spdk.json"
            path.write_text(json.dumps(cfg))
            mem = [] if hugepages() else ["--no-huge", "-s", str(spdk_mem_mb)]
            cmd = [str(find_tool("nvmf_tgt")), "-m", "0x1", "-r", str(workdir / "spdk.sock"),
                   "--json", str(path), "--disable-cpumask-locks", *mem]
        # bt_tree: run blocktarget from another checkout (a before/after comparison);
        # `-m` puts the working directory first on sys.path, so both cwd and PYTHONPATH
        env, cwd = None, None
        if bt_tree is not None and name.startswith("blocktarget"):
            env, cwd = {**os.environ, "PYTHONPATH": str(bt_tree)}, str(bt_tree)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=cwd)
        wait_port(self.port, self.proc)
        self.cpu0 = self.cpu_seconds()

    def rss_kib(self) -> int:
        """Resident set size now (VmRSS), KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_spdk_perf(port: int, rw: str, size: int, qd: int, secs: int,
                  extra: tuple[str, ...] = ()) -> dict:
    """``extra``: more spdk_nvme_perf options, e.g. ("-P", "2") for two I/O queues."""
    trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}"
    mem = [] if hugepages() else ["--no-huge", "-s", "1024"]
    cmd = [str(find_tool("spdk_nvme_perf")), *mem, "-c", "0x2", "-q", str(qd), "-o", str(size),
           "-w", rw, "-t", str(secs), *extra, "-r", trid]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60).stdout
    m = re.search(r"^Total\s+:\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    if not m:
        return {"error": out[-300:]}
    return {"iops": float(m.group(1)), "mibs": float(m.group(2)), "lat_us": float(m.group(3))}


def run_bt_perf(port: int, rw: str, size: int, qd: int, secs: int) -> dict:
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "blocktarget", "perf", "-a", "127.0.0.1",
           "-s", str(port), "-n", NQN, "-w", rw, "-o", str(size), "-q", str(qd), "-t",
           str(secs), "--json", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"error": (r.stdout + r.stderr)[-300:]}
    total = doc["total"]
    return {"iops": total["iops"], "mibs": total["mib_s"], "lat_us": total["lat_us"]["mean"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=3, help="seconds per run")
    ap.add_argument("--bdevs", default="null,malloc")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    why = unavailable_reason("nvmf_tgt", "spdk_nvme_perf")
    have_spdk = why is None
    if not have_spdk:
        print(f"{why}: running blocktarget perf against blocktarget only", file=sys.stderr)
    targets = ["blocktarget", "spdk"] if have_spdk else ["blocktarget"]
    initiators = ["spdk_nvme_perf", "blocktarget perf"] if have_spdk else ["blocktarget perf"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcpperf-") as tmp:
        for kind in args.bdevs.split(","):
            for label, rw, size, qd in WORKLOADS:
                for ini in initiators:
                    res: dict[str, dict] = {}
                    for tname in targets:
                        t = Target(tname, kind, Path(tmp))
                        try:
                            fn = run_spdk_perf if ini == "spdk_nvme_perf" else run_bt_perf
                            t0 = time.monotonic()
                            r = fn(t.port, rw, size, qd, args.time)
                            cpu = t.cpu_seconds() - t.cpu0
                            r["cpu_s"] = cpu
                            r["wall_s"] = time.monotonic() - t0
                        finally:
                            t.stop()
                        res[tname] = r
                        print(f"{kind:6} {label:18} {ini:16} {tname:11} {r}", file=sys.stderr)
                    rows.append((kind, label, ini, res))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"# tcp_perf: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"commit {commit}, {args.time} s per run, load {os.getloadavg()[0]:.1f}")
    hdr = "| bdev | workload | initiator | blocktarget IOPS | MiB/s | lat µs |"
    if have_spdk:
        hdr += " SPDK IOPS | MiB/s | lat µs | ratio bt/SPDK | IOPS per target CPU-s bt / SPDK |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for kind, label, ini, res in rows:
        b = res["blocktarget"]
        line = (f"| {kind} | {label} | {ini} | {b.get('iops', 0):,.0f} | {b.get('mibs', 0):,.1f}"
                f" | {b.get('lat_us', 0):,.1f} |")
        if have_spdk:
            s = res["spdk"]
            ratio = b.get("iops", 0) / s["iops"] if s.get("iops") else 0
            eff_b = b.get("iops", 0) * args.time / b["cpu_s"] if b.get("cpu_s") else 0
            eff_s = s.get("iops", 0) * args.time / s["cpu_s"] if s.get("cpu_s") else 0
            line += (f" {s.get('iops', 0):,.0f} | {s.get('mibs', 0):,.1f} |"
                     f" {s.get('lat_us', 0):,.1f} | {ratio:.2f} | {eff_b:,.0f} / {eff_s:,.0f} |")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
