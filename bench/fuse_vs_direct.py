"""FUSE export vs the initiator used directly: what the file interface costs.

One blocktarget target (malloc bdev, core 0) per run. For each workload, back to back on
that target: `blocktarget perf` (the Python NVMe/TCP initiator alone), then fio on the
file that `blocktarget fuse-export` serves from the same target (libaio, O_DIRECT, the
same queue depth: fio -> kernel FUSE -> our FUSE session -> the same initiator code).
A third column, "FUSE over RAM", serves a bytearray through the same FUSE session with
no network, which isolates the FUSE layer's own cost.

    .venv/bin/python bench/fuse_vs_direct.py [--time 5] [--markdown]

Needs root (mount) and /dev/fuse, fio. The kernel initiator in QEMU column of issue 10
is not measured here (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blocktarget.fuse.device import BlockDevice  # noqa: E402
from blocktarget.fuse.export import Export, serve_on  # noqa: E402

NQN = "nqn.2026-01.io.blocktarget:fusebench"
WORKLOADS = [
    ("4K randread QD1", "randread", 4096, 1),
    ("4K randread QD32", "randread", 4096, 32),
    ("4K randwrite QD32", "randwrite", 4096, 32),
    ("128K read QD8", "read", 131072, 8),
    ("128K write QD8", "write", 131072, 8),
]
SIZE = 256 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_target(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create", "params": {
            "name": "B0", "num_blocks": SIZE // 4096, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                                                           "namespace": {"bdev_name": "B0"}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address": {
                "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                "trsvcid": str(port)}}}]}],
        "blocktarget": {"cores": [0], "log_level": "warning",
                        "rpc": {"http": None, "unix": str(workdir / "bt.sock")}}}
    path = workdir / "bt.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "blocktarget", "start", "-c", str(path)],
                            stdout=open(workdir / "target.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("target did not start")


def perf(port: int, rw: str, bs: int, qd: int, secs: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "blocktarget", "perf", "-a", "127.0.0.1", "-s", str(port), "-n",
         NQN, "-w", rw, "-o", str(bs), "-q", str(qd), "-t", str(secs), "--json", "--quiet"],
        capture_output=True, text=True, timeout=secs + 60, check=False)
    j = json.loads(out.stdout)["total"]
    return {"iops": j["iops"], "mibs": j["mib_s"], "lat_us": j["lat_us"]["mean"]}


def fio(path: Path, rw: str, bs: int, qd: int, secs: float) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=b", f"--filename={path}", f"--size={SIZE}", f"--rw={rw}", f"--bs={bs}",
         "--direct=1", "--ioengine=libaio", f"--iodepth={qd}", "--time_based",
         f"--runtime={secs}", "--output-format=json"],
        capture_output=True, text=True, timeout=secs + 60, check=False)
    j = json.loads(out.stdout)["jobs"][0]
    d = j["read"] if "read" in rw else j["write"]
    return {"iops": d["iops"], "mibs": d["bw_bytes"] / (1 << 20),
            "lat_us": d["clat_ns"]["mean"] / 1e3}


class RamDevice(BlockDevice):
    """A bytearray: FUSE layer cost with no initiator and no network."""

    def __init__(self, size: int) -> None:
        self.mem = memoryview(bytearray(size))
        self.block_size, self.num_blocks, self.max_blocks = 4096, size // 4096, 256
        self.can_deallocate = True

    async def read(self, lba: int, buf: memoryview) -> None:
        o = lba * 4096
        buf[:] = self.mem[o:o + buf.nbytes]

    async def write(self, lba: int, data: memoryview) -> None:
        o = lba * 4096
        self.mem[o:o + data.nbytes] = data

    async def flush(self) -> None:
        pass

    async def deallocate(self, lba: int, nblocks: int) -> None:
        self.mem[lba * 4096:(lba + nblocks) * 4096] = bytes(nblocks * 4096)


class Exported:
    """A mount served on a loop in a thread (RAM) or a fuse-export process (NVMe/TCP)."""

    def __init__(self, mnt: Path, port: int | None) -> None:
        self.mnt = mnt
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        if port is None:
            self.export = Export(str(mnt), [("ram0", RamDevice(SIZE))])
            self.export.mount()
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=serve_on, args=(self.loop, self.export),
                                           daemon=True)
            self.thread.start()
            self.file = mnt / "ram0"
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "blocktarget", "fuse-export", "-a", "127.0.0.1", "-s",
                 str(port), "-n", NQN, str(mnt)], stdout=subprocess.PIPE)
            assert self.proc.stdout is not None
            self.proc.stdout.readline()
            self.file = mnt / "nvme0n1"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        else:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.export.shutdown()))
            assert self.thread is not None
            self.thread.join(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", type=float, default=5.0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bt-fusebench-") as d:
        work = Path(d)
        port = free_port()
        target = start_target(work, port)
        (work / "nv").mkdir()
        (work / "ram").mkdir()
        try:
            for label, rw, bs, qd in WORKLOADS:
                direct = perf(port, rw, bs, qd, args.time)
                ex = Exported(work / "nv", port)
                try:
                    fuse = fio(ex.file, rw, bs, qd, args.time)
                finally:
                    ex.close()
                ram_ex = Exported(work / "ram", None)
                try:
                    ram = fio(ram_ex.file, rw, bs, qd, args.time)
                finally:
                    ram_ex.close()
                rows.append((label, direct, fuse, ram))
                print(f"{label}: perf {direct['iops']:.0f} IOPS, FUSE {fuse['iops']:.0f} IOPS, "
                      f"FUSE over RAM {ram['iops']:.0f} IOPS", file=sys.stderr)
        finally:
            target.send_signal(signal.SIGINT)
            target.wait(15)
    if args.markdown:
        print(f"Run {datetime.date.today()}, {os.cpu_count()} CPUs, {args.time:.0f} s each, "
              "malloc bdev, target on core 0.\n")
        print("| workload | `blocktarget perf` IOPS (MiB/s, mean us) | fio on FUSE file "
              "| FUSE/perf | fio on FUSE over RAM |")
        print("|---|---|---|---|---|")
        for label, a, b, c in rows:
            print(f"| {label} | {a['iops']:.0f} ({a['mibs']:.1f}, {a['lat_us']:.0f}) | "
                  f"{b['iops']:.0f} ({b['mibs']:.1f}, {b['lat_us']:.0f}) | "
                  f"{b['iops'] / a['iops']:.2f} | {c['iops']:.0f} ({c['mibs']:.1f}, "
                  f"{c['lat_us']:.0f}) |")
    else:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
