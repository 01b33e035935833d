"""FUSE export vs the initiator used directly: what the file interface costs.

One blocktarget target (malloc bdev, core 0) per run. For each workload, back to back on
that target: `blocktarget perf` (the Python NVMe/TCP initiator alone), then fio on the
file that `blocktarget fuse-export` serves from the same target (libaio, O_DIRECT, the
same queue depth: fio -> kernel FUSE -> our FUSE session -> the same initiator code).
A third column, "FUSE over RAM", serves a bytearray through the same FUSE session with
no network, which isolates the FUSE layer's own cost. A fourth, after those, runs fio on
the Linux kernel NVMe/TCP initiator (nvme connect) in a QEMU guest against the same
target process, one boot for all workloads (tests/vm/harness). The guest is emulated by
TCG (KVM is unusable on the dev machine) and reaches the target through QEMU's user-mode
network, so that column measures an emulated CPU and slirp, not the kernel driver: it
shows the path works end to end on the same target, not what the kernel could do.

    .venv/bin/python bench/fuse_vs_direct.py [--time 5] [--markdown] [--no-vm]

Needs root (mount) and /dev/fuse, fio; the VM column needs the harness bootstrapped
(tests/vm/harness/bootstrap.sh) and is left out with a note when it is not.
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

sys.path.insert(0, str(ROOT / "tests"))
from vm.harness.vm import Guest, ensure_vm, vm_available  # noqa: E402

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


# One guest boot runs every workload with fio on the kernel's block device for our
# namespace; each result lands in the run dir as fio-<i>.json.
GUEST_SCRIPT = r"""
set -u
nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN || exit 10
dev=""
for i in $(seq 1 100); do
  for b in /sys/class/nvme-subsystem/nvme-subsys*/nvme*n1; do
    [ -e "$b" ] && [ "$(cat $(dirname $b)/subsysnqn)" = "$NQN" ] && dev=/dev/$(basename $b)
  done
  [ -n "$dev" ] && break; sleep 0.1
done
[ -n "$dev" ] || exit 11
i=0
while read rw bs qd; do
  fio --name=b --filename=$dev --size=$SIZE --rw=$rw --bs=$bs --direct=1 --ioengine=libaio \
      --iodepth=$qd --time_based --runtime=$SECS --output-format=json \
      --output=fio-$i.json || exit 12
  i=$((i + 1))
done < workloads.txt
nvme disconnect -n $NQN || exit 13
"""


def kernel_in_guest(port: int, secs: float) -> tuple[list[dict[str, float]] | None, str]:
    """fio in a TCG guest over the kernel initiator, every workload in one boot."""
    ok, why = vm_available()
    if not ok:
        return None, why
    guest = Guest(ensure_vm(), smp=2)
    workloads = "".join(f"{rw} {bs} {qd}\n" for _l, rw, bs, qd in WORKLOADS)
    t0 = time.monotonic()
    res = guest.run(GUEST_SCRIPT, files={"workloads.txt": workloads},
                    env={"PORT": str(port), "NQN": NQN, "SIZE": str(SIZE),
                         "SECS": str(int(secs))},
                    timeout=120 + len(WORKLOADS) * (secs + 30))
    if res.rc != 0:
        return None, f"guest rc {res.rc} (run dir {res.rundir})"
    out = []
    for i, (_l, rw, _bs, _qd) in enumerate(WORKLOADS):
        j = json.loads((res.rundir / f"fio-{i}.json").read_text())["jobs"][0]
        d = j["read"] if "read" in rw else j["write"]
        out.append({"iops": d["iops"], "mibs": d["bw_bytes"] / (1 << 20),
                    "lat_us": d["clat_ns"]["mean"] / 1e3})
    return out, (f"one guest boot, {time.monotonic() - t0:.0f} s wall in all "
                 f"(boot {res.boot_seconds or 0:.1f} s)")


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
    ap.add_argument("--no-vm", action="store_true",
                    help="leave out the kernel-initiator-in-QEMU column")
    args = ap.parse_args()
    kernel: list[dict[str, float]] | None = None
    vm_note = "not run (--no-vm)"
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
            if not args.no_vm:
                kernel, vm_note = kernel_in_guest(port, args.time)
                print(f"kernel initiator in QEMU: {vm_note}", file=sys.stderr)
        finally:
            target.send_signal(signal.SIGINT)
            target.wait(15)
    def cell(m: dict[str, float] | None) -> str:
        return "n/a" if m is None else f"{m['iops']:.0f} ({m['mibs']:.1f}, {m['lat_us']:.0f})"

    if args.markdown:
        print(f"Run {datetime.date.today()}, {os.cpu_count()} CPUs, {args.time:.0f} s each, "
              "malloc bdev, target on core 0. Kernel column: Linux NVMe/TCP initiator in a "
              f"QEMU guest under TCG over slirp ({vm_note}).\n")
        print("| workload | `blocktarget perf` IOPS (MiB/s, mean us) | fio on FUSE file "
              "| FUSE/perf | fio on FUSE over RAM | fio in QEMU guest, kernel initiator (TCG) |")
        print("|---|---|---|---|---|---|")
        for i, (label, a, b, c) in enumerate(rows):
            print(f"| {label} | {cell(a)} | {cell(b)} | {b['iops'] / a['iops']:.2f} | "
                  f"{cell(c)} | {cell(kernel[i] if kernel else None)} |")
    else:
        print(json.dumps({"rows": rows, "kernel_in_qemu": kernel, "vm_note": vm_note},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
