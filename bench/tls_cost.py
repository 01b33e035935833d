"""What the TLS secure channel costs (issue 17 item 5): the same target, one plain and one
secure listener on the same subsystem, `blocktarget perf` against each, alternating
plain/TLS in every round so both see the same machine load; target CPU per I/O from
/proc/<pid>/stat over each run.

    .venv/bin/python bench/tls_cost.py [--time 5] [--rounds 3] [--markdown]

The record layer is OpenSSL in user space (this host's kernel has no kTLS; for the
kernel's record layer against the user-space one, see bench/tls_cost_vm.py, in QEMU). The initiator
is `blocktarget perf --engine python` for both (its C loop cannot speak TLS), so the
plain figures here are below what the C initiator reaches against the same target.
The target runs on CPU 0, the initiator on CPU 1 (when the machine has two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tcp_perf import free_port, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NQN = "nqn.2026-01.io.blocktarget:tls-bench"
HOST = "nqn.2014-08.org.nvmexpress:uuid:5eb00000-0000-4000-8000-000000000001"
WORKLOADS = [("4K randread QD32", "randread", "4k"), ("128K read QD32", "read", "128k")]


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def config(plain: int, secure: int, key_path: str) -> dict:
    listen = [{"method": "nvmf_subsystem_add_listener", "params": {
        "nqn": NQN, "secure_channel": sec, "listen_address": {
            "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}}}
        for port, sec in ((plain, False), (secure, True))]
    return {"blocktarget": {"cores": [0], "metrics": False},
            "subsystems": [
                {"subsystem": "keyring", "config": [
                    {"method": "keyring_file_add_key",
                     "params": {"name": "psk0", "path": key_path}}]},
                {"subsystem": "bdev", "config": [
                    {"method": "bdev_malloc_create",
                     "params": {"name": "M0", "num_blocks": 65536, "block_size": 4096}}]},
                {"subsystem": "nvmf", "config": [
                    {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                    {"method": "nvmf_create_subsystem",
                     "params": {"nqn": NQN, "allow_any_host": False}},
                    {"method": "nvmf_subsystem_add_ns",
                     "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
                    {"method": "nvmf_subsystem_add_host",
                     "params": {"nqn": NQN, "host": HOST, "psk": "psk0"}},
                    {"method": "nvmf_subsystem_add_host",
                     "params": {"nqn": NQN, "host": HOST[:-1] + "2"}},
                    *listen]}]}


def run_perf(port: int, workload: str, size: str, seconds: float, key: str | None,
             pid: int) -> dict:
    host = HOST if key else HOST[:-1] + "2"
    cmd = [sys.executable, "-m", "blocktarget", "perf", "-a", "127.0.0.1", "-s", str(port),
           "-n", NQN, "--hostnqn", host, "-w", workload, "-o", size, "-q", "32",
           "-t", str(seconds), "--engine", "python", "--json", "--quiet"]
    if key:
        cmd += ["--tls", "--tls-key", key]
    if os.cpu_count() and os.cpu_count() > 1:
        cmd = ["taskset", "-c", "1", *cmd]
    t0 = cpu_ticks(pid)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    ticks = cpu_ticks(pid) - t0
    if r.returncode != 0:
        raise RuntimeError(f"perf failed: {r.stderr[-2000:]}")
    doc = json.loads(r.stdout)
    ops = doc["total"]["ops"]
    return {"iops": doc["total"]["iops"], "mib_s": doc["total"]["mib_s"],
            "p50_us": doc["total"]["lat_us"]["p50"],
            "tgt_us_per_io": ticks / os.sysconf("SC_CLK_TCK") / ops * 1e6 if ops else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    from blocktarget.nvme.tls_keys import ConfiguredPsk

    work = Path(tempfile.mkdtemp(prefix="bt-tls-bench-"))
    key = work / "psk0"
    key.write_text(ConfiguredPsk.generate(1).encode())
    key.chmod(0o600)
    plain, secure = free_port(), free_port()
    cfg = work / "target.json"
    cfg.write_text(json.dumps(config(plain, secure, str(key))))
    proc = subprocess.Popen([sys.executable, "-m", "blocktarget", "start", "-c", str(cfg),
                             "-r", str(work / "rpc.sock"), "--http", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        wait_port(secure, proc)
        for name, workload, size in WORKLOADS:
            runs = results.setdefault(name, {"plain": [], "tls": []})
            for _ in range(args.rounds):
                runs["plain"].append(run_perf(plain, workload, size, args.time, None,
                                              proc.pid))
                runs["tls"].append(run_perf(secure, workload, size, args.time, str(key),
                                            proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    load = os.getloadavg()
    med = {n: {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
               for k, v in d.items()} for n, d in results.items()}
    if not args.markdown:
        print(json.dumps({"load": load, "median": med, "runs": results}, indent=1))
        return 0
    print(f"{args.rounds} rounds x {args.time:.0f} s, plain/TLS alternating, medians; "
          f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| workload | plain IOPS | TLS IOPS | TLS/plain | plain MiB/s | TLS MiB/s | "
          "plain target µs/IO | TLS target µs/IO | plain p50 µs | TLS p50 µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, d in med.items():
        p, t = d["plain"], d["tls"]
        print(f"| {n} | {p['iops']:,.0f} | {t['iops']:,.0f} | {t['iops'] / p['iops']:.2f} | "
              f"{p['mib_s']:,.0f} | {t['mib_s']:,.0f} | {p['tgt_us_per_io']:.1f} | "
              f"{t['tgt_us_per_io']:.1f} | {p['p50_us']:.0f} | {t['p50_us']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
