"""Per-I/O cost of blocktarget's user-space NVMe driver vs the kernel's nvme driver, on the
same emulated controller in one QEMU guest (TCG, emulated intel-iommu, QEMU `-device nvme`).

One guest run does, in order, on one 64 MiB raw image (prefilled so reads hit data):

1. kernel nvme driver: fio 4 KiB random reads on /dev/nvme0n1 — QD1 with interrupts
   (libaio), QD1 polled (io_uring hipri on a poll queue: `nvme poll_queues=1`), QD32
   (libaio).
2. `blocktarget setup` binds the controller to vfio-pci; then our driver straight from
   Python, no target around it (one I/O queue, polled): QD1 with the submit and reap
   paths timed separately (the driver's own work per I/O, without the wait for the
   device), and QD32 (completions resubmit from the callback).
3. The whole target: blocktarget with the nvme bdev exported over NVMe/TCP on the guest's
   loopback, the guest kernel's nvme-tcp initiator connected, fio QD1/QD32 on that block
   device.

    .venv/bin/python bench/nvme_driver.py [--time 5] [--markdown]

Emulation hides and distorts a lot; see the RESULTS.md section before quoting a number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vm.harness.vm import Guest, ensure_vm  # noqa: E402

NQN = "nqn.2026-01.io.blocktarget:nvmebench"
IMAGE_MB = 64
QEMU_ARGS = [
    "-machine", "q35",
    "-device", "intel-iommu,intremap=on,caching-mode=on",
    "-drive", "file={rundir}/nvme.img,if=none,id=nv0,format=raw",
    "-device", "nvme,serial=benchnvme,drive=nv0",
]  # fmt: skip

GUEST = r"""
set -euo pipefail
T=${T:?}
BT="$PY -m blocktarget"
SOCK=/tmp/bt.sock
BDF=$(for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/class)" = 0x010802 ]; then basename $d; fi; done | head -1)
modprobe -d $VMDIR/kernel nvme poll_queues=1
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo "== kernel driver on $BDF: $(cat /sys/block/nvme0n1/queue/io_poll) io_poll"
fio --name=fill --filename=/dev/nvme0n1 --rw=write --bs=128k --direct=1 --ioengine=libaio \
    --iodepth=8 --size=100% --output=/dev/null
COMMON="--filename=/dev/nvme0n1 --rw=randread --bs=4k --direct=1 --time_based \
  --runtime=$T --ramp_time=1 --norandommap --randrepeat=0 --output-format=json"
fio --name=k_qd1 $COMMON --ioengine=libaio --iodepth=1 --output=k_qd1.json
fio --name=k_qd1_poll $COMMON --ioengine=io_uring --hipri=1 --iodepth=1 \
    --output=k_qd1_poll.json
fio --name=k_qd32 $COMMON --ioengine=libaio --iodepth=32 --output=k_qd32.json

echo "== blocktarget driver"
$BT setup --pci $BDF --hugemem 64
$PY drv_bench.py $BDF $T > d.json

echo "== through blocktarget over NVMe/TCP (kernel initiator)"
sed "s/@BDF@/$BDF/; s#@SOCK@#$SOCK#" cfg.json.in > cfg.json
$BT start -c cfg.json > target.log 2>&1 &
TPID=$!
for i in $(seq 1 600); do [ -S $SOCK ] && break; sleep 0.1; done
sleep 1
nvme connect -t tcp -a 127.0.0.1 -s 4420 -n $NQN
dev=""
for i in $(seq 1 100); do
  for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat $s/subsysnqn 2>/dev/null)" = "$NQN" ] || continue
    dev=$(ls $s | grep -E '^nvme[0-9]+n1$' | head -1 || true)
  done
  [ -n "$dev" ] && [ -b /dev/$dev ] && break; sleep 0.1
done
COMMON_T=${COMMON//nvme0n1/$dev}
fio --name=t_qd1 $COMMON_T --ioengine=libaio --iodepth=1 --output=t_qd1.json
fio --name=t_qd32 $COMMON_T --ioengine=libaio --iodepth=32 --output=t_qd32.json
dev2=${dev%n1}n2
fio --name=m_fill --filename=/dev/$dev2 --rw=write --bs=128k --direct=1 --ioengine=libaio \
    --iodepth=8 --size=100% --output=/dev/null
COMMON_M=${COMMON//nvme0n1/$dev2}
fio --name=m_qd1 $COMMON_M --ioengine=libaio --iodepth=1 --output=m_qd1.json
fio --name=m_qd32 $COMMON_M --ioengine=libaio --iodepth=32 --output=m_qd32.json
nvme disconnect -n $NQN
kill $TPID; wait $TPID || true
$BT setup reset --pci $BDF
echo BENCH_DONE
"""

DRV_BENCH = r'''
import json, random, sys, time
from blocktarget.nvme import spec
from blocktarget.nvme.driver.ctrlr import open_pcie

bdf, T = sys.argv[1], float(sys.argv[2])
c = open_pcie(bdf, io_queues=1)
q = c.create_io_queue(64)
ns = c.namespaces[1]
per = 4096 // ns.block_size
slots = (ns.num_blocks - per) // per
bufs = [q.get_buffer() for _ in range(32)]
READ = spec.IoOpcode.READ
rnd = random.Random(1)
pc = time.perf_counter_ns


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def qd1(seconds):
    lat, sub, reap = [], [], []
    box = [0]

    def cb(st, dw0):
        assert st == 0, st
        box[0] = 1

    buf = bufs[0]
    end = time.monotonic() + seconds
    cpu0 = time.process_time()
    while time.monotonic() < end:
        lba = rnd.randrange(slots) * per
        box[0] = 0
        t0 = pc()
        q.submit(READ, 1, prp1=buf.iova, cdw10=lba, cdw12=per - 1, cb=cb)
        t1 = pc()
        while True:
            tp = pc()
            if q.process_completions():
                break
        t2 = pc()
        lat.append(t2 - t0)
        sub.append(t1 - t0)
        reap.append(t2 - tp)
    cpu = time.process_time() - cpu0
    n = len(lat)
    return {"ios": n, "iops": n / seconds, "lat_mean_ns": sum(lat) / n,
            "lat_p50_ns": pct(lat, 0.5), "lat_p99_ns": pct(lat, 0.99),
            "submit_mean_ns": sum(sub) / n, "submit_p50_ns": pct(sub, 0.5),
            "reap_mean_ns": sum(reap) / n, "reap_p50_ns": pct(reap, 0.5),
            "cpu_us_per_io": cpu / n * 1e6}


def qd32(seconds, batched=False):
    q.batch_doorbells = batched
    q.doorbells = q.submitted = 0
    done = [0]
    stop = [False]

    def issue(buf):
        lba = rnd.randrange(slots) * per

        def cb(st, dw0):
            assert st == 0, st
            done[0] += 1
            if not stop[0]:
                issue(buf)

        q.submit(READ, 1, prp1=buf.iova, cdw10=lba, cdw12=per - 1, cb=cb)

    for b in bufs:
        issue(b)
    end = time.monotonic() + seconds
    cpu0 = time.process_time()
    t0 = time.monotonic()
    while time.monotonic() < end:
        q.flush_doorbell()
        q.process_completions()
    stop[0] = True
    wall = time.monotonic() - t0
    n = done[0]
    cpu = time.process_time() - cpu0
    while q.outstanding:
        q.flush_doorbell()
        q.process_completions()
    q.batch_doorbells = False
    return {"ios": n, "iops": n / wall, "cpu_us_per_io": cpu / n * 1e6,
            "doorbells_per_io": q.doorbells / max(q.submitted, 1)}


def empty_poll():
    n = 20000
    t0 = pc()
    for _ in range(n):
        q.process_completions()
    return (pc() - t0) / n


qd1(1.0)  # warm-up
out = {"qd1": qd1(T), "empty_poll_ns": empty_poll()}
out["qd32"] = qd32(T)
out["qd32_batched"] = qd32(T, batched=True)
out["dma"] = c.allocator.describe()
c.close()
print(json.dumps(out))
'''


def _config() -> dict[str, Any]:
    return {
        "blocktarget": {"cores": [0, 1], "rpc": {"unix": "@SOCK@", "http": None},
                        "metrics": False},
        "subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller",
                 "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "@BDF@"}},
                {"method": "bdev_malloc_create",
                 "params": {"name": "M0", "num_blocks": 131072, "block_size": 512}}]},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "BTBENCH1"}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": NQN, "namespace": {"bdev_name": "Nvme0n1", "nsid": 1}}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": NQN, "namespace": {"bdev_name": "M0", "nsid": 2}}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": {
                     "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                     "trsvcid": "4420"}}},
            ]},
        ],
    }  # fmt: skip


def _fio(path: Path) -> dict[str, float]:
    job = json.loads(path.read_text())["jobs"][0]
    r = job["read"]
    runtime_s = job.get("job_runtime", r.get("runtime", 0)) / 1000
    ios = r["total_ios"]
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime_s
    pcts = r["clat_ns"].get("percentile", {})
    return {
        "iops": r["iops"], "lat_mean_ns": r["lat_ns"]["mean"],
        "slat_mean_ns": r["slat_ns"]["mean"], "clat_mean_ns": r["clat_ns"]["mean"],
        "lat_p50_ns": pcts.get("50.000000", 0), "lat_p99_ns": pcts.get("99.000000", 0),
        "cpu_us_per_io": cpu_s / ios * 1e6 if ios else 0.0,
        "usr_cpu": job["usr_cpu"], "sys_cpu": job["sys_cpu"],
    }  # fmt: skip


def host_native(n: int = 200_000) -> dict[str, float]:
    """The driver's per-I/O Python path on this host, no emulation: submit and reap on a
    real queue in DMA-style memory whose doorbells go nowhere and whose CQEs we post by
    hand. What it leaves out is exactly the MMIO cost and the device."""
    import struct
    import time

    from blocktarget.nvme.driver.dma import DmaAllocator
    from blocktarget.nvme.driver.qpair import QueuePair

    class Mapper:
        iova_pgsizes = 0x1000

        def alloc_iova(self, size: int, align: int) -> int:
            return 1 << 32

        def map_dma(self, vaddr: int, iova: int, size: int) -> None:
            pass

        def unmap_dma(self, iova: int, size: int) -> None:
            pass

    class NoBar:
        def read32(self, off: int) -> int:
            return 0

        def write32(self, off: int, value: int) -> None:
            pass

    alloc = DmaAllocator(Mapper(), name="native", use_hugepages=False)
    q = QueuePair(NoBar(), 1, 64, 4, alloc)
    cqe = struct.Struct("<IIHHHH")
    cq = q.cq.mem
    done = [0]

    def cb(st: int, dw0: int) -> None:
        done[0] += 1

    slot, phase = 0, 1
    t_sub = t_reap = 0
    pc = time.perf_counter_ns
    for i in range(n):
        t0 = pc()
        q.submit(2, 1, prp1=0x1000, cdw10=i, cdw12=7, cb=cb)
        t1 = pc()
        active = next(t for t in q.trackers if t.active)
        cqe.pack_into(cq, slot * 16, 0, 0, 0, 1, active.cid, phase)
        slot += 1
        if slot == 64:
            slot, phase = 0, phase ^ 1
        t2 = pc()
        q.process_completions()
        t3 = pc()
        t_sub += t1 - t0
        t_reap += t3 - t2
    alloc.close()
    assert done[0] == n
    return {"submit_ns": t_sub / n, "reap_ns": t_reap / n}


def run(seconds: float) -> dict[str, Any]:
    guest = Guest(ensure_vm(), memory_mb=1024)
    res = guest.run(
        "bash ./bench.sh", timeout=900, env={"PY": sys.executable, "T": str(seconds),
                                            "NQN": NQN},
        files={"bench.sh": GUEST, "drv_bench.py": DRV_BENCH,
               "cfg.json.in": json.dumps(_config())},
        modules=["vfio-pci"], extra_qemu_args=QEMU_ARGS,
        extra_append=["intel_iommu=on", "iommu=pt"],
        sparse_files={"nvme.img": IMAGE_MB << 20},
    )  # fmt: skip
    if res.rc != 0 or "BENCH_DONE" not in res.output:
        sys.stderr.write(res.output[-4000:])
        raise SystemExit(f"guest run failed (rc={res.rc}), see {res.rundir}")
    d = res.rundir
    return {
        "kernel_qd1": _fio(d / "k_qd1.json"), "kernel_qd1_poll": _fio(d / "k_qd1_poll.json"),
        "kernel_qd32": _fio(d / "k_qd32.json"),
        "driver": json.loads((d / "d.json").read_text()),
        "target_qd1": _fio(d / "t_qd1.json"), "target_qd32": _fio(d / "t_qd32.json"),
        "malloc_qd1": _fio(d / "m_qd1.json"), "malloc_qd32": _fio(d / "m_qd32.json"),
        "rundir": str(d), "seconds": seconds, "total_s": res.total_seconds,
    }  # fmt: skip


def _us(ns: float) -> str:
    return f"{ns / 1000:,.1f}"


def markdown(r: dict[str, Any]) -> str:
    k1, kp, k32 = r["kernel_qd1"], r["kernel_qd1_poll"], r["kernel_qd32"]
    d1, d32 = r["driver"]["qd1"], r["driver"]["qd32"]
    t1, t32 = r["target_qd1"], r["target_qd32"]
    rows = [
        ("kernel nvme, fio libaio (interrupts)", k1, k32),
        ("kernel nvme, fio io_uring hipri (polled)", kp, None),
        ("blocktarget driver, Python, polled", d1, d32),
        ("blocktarget target over NVMe/TCP, nvme bdev (kernel initiator + fio)", t1, t32),
        ("same target and connection, malloc bdev instead",
         r["malloc_qd1"], r["malloc_qd32"]),
    ]
    out = ["| path | QD1 IOPS | QD1 mean µs | QD1 p50 µs | QD1 p99 µs | QD1 CPU µs/IO "
           "| QD32 IOPS | QD32 CPU µs/IO |",
           "|---|---|---|---|---|---|---|---|"]
    for name, a, b in rows:
        out.append(
            f"| {name} | {a['iops']:,.0f} | {_us(a['lat_mean_ns'])} | {_us(a['lat_p50_ns'])} "
            f"| {_us(a['lat_p99_ns'])} | {a['cpu_us_per_io']:,.0f} | "
            + (f"{b['iops']:,.0f} | {b['cpu_us_per_io']:,.0f} |" if b else "– | – |"))
    out += [
        "",
        "Driver work per I/O (QD1, 4 KiB read), without the wait for the device:",
        "",
        "| | mean µs | p50 µs |",
        "|---|---|---|",
        f"| blocktarget submit (build SQE, ring copy, doorbell MMIO) | "
        f"{_us(d1['submit_mean_ns'])} | {_us(d1['submit_p50_ns'])} |",
        f"| blocktarget reap (phase check, CQE parse, CQ doorbell, callback) | "
        f"{_us(d1['reap_mean_ns'])} | {_us(d1['reap_p50_ns'])} |",
        f"| blocktarget empty poll (nothing completed) | "
        f"{_us(r['driver']['empty_poll_ns'])} | |",
        f"| kernel submission (fio slat: io_submit syscall, block layer, driver, doorbell) "
        f"| {_us(k1['slat_mean_ns'])} | |",
        f"| blocktarget submit, this host natively (no MMIO, no device) | "
        f"{_us(r['native']['submit_ns'])} | |",
        f"| blocktarget reap, this host natively (no MMIO, no device) | "
        f"{_us(r['native']['reap_ns'])} | |",
        "",
        f"Ratios: QD1 mean latency blocktarget driver / kernel (interrupts) = "
        f"{d1['lat_mean_ns'] / k1['lat_mean_ns']:.2f}, / kernel (polled) = "
        f"{d1['lat_mean_ns'] / kp['lat_mean_ns']:.2f}; QD32 IOPS blocktarget driver / "
        f"kernel = {d32['iops'] / k32['iops']:.2f}; QD32 CPU per I/O blocktarget driver / "
        f"kernel = {d32['cpu_us_per_io'] / max(k32['cpu_us_per_io'], 1e-9):.2f}.",
        f"DMA memory: {r['driver']['dma']}; doorbell writes per I/O at QD32: "
        f"{d32['doorbells_per_io']:.2f}.",
        f"QD32 with batched doorbells (delay_cmd_submit): "
        f"{r['driver']['qd32_batched']['iops']:,.0f} IOPS, "
        f"{r['driver']['qd32_batched']['cpu_us_per_io']:,.0f} CPU µs/IO, "
        f"{r['driver']['qd32_batched']['doorbells_per_io']:.2f} doorbell writes per I/O.",
    ]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    r = run(args.time)
    r["native"] = host_native()
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    r["commit"] = rev
    r["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    if args.markdown:
        print(f"Commit `{rev}`+uncommitted, {r['date']}, {args.time:g} s per measurement, "
              f"guest run {r['total_s']:.0f} s.\n")
        print(markdown(r))
    else:
        print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
