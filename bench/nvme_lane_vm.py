"""The C lane against the Python path on the NVMe PCIe bdev (VFIO), in one QEMU guest
(TCG, emulated intel-iommu, QEMU `-device nvme`): the same target twice, with the lane
(default) and with ``c_fast_path: false``, the guest kernel's nvme-tcp initiator and fio
on its block device, one reactor.

For each mode and workload: fio's IOPS and mean latency, the target's CPU per I/O
(utime + stime of the process from /proc around the fio run) and the share of the
commands the C lane executed (nvmf_get_stats ``c_lane_commands``). Under TCG the device
and the guest's kernel are emulated, so the figures compare the two paths on one
emulated machine; they are not what a real SSD would give.

    PYTHONPATH=$PWD .venv/bin/python bench/nvme_lane_vm.py [--time 5] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vm.harness.vm import PROJECT_ROOT, Guest, ensure_vm  # noqa: E402

NQN = "nqn.2026-01.io.blocktarget:lanebench"
IMAGE_MB = 64
QEMU_ARGS = [
    "-machine", "q35",
    "-device", "intel-iommu,intremap=on,caching-mode=on",
    "-drive", "file={rundir}/nvme.img,if=none,id=nv0,format=raw",
    "-device", "nvme,serial=lanebench,drive=nv0",
]  # fmt: skip
WORKLOADS = (("randread", "4k", 32), ("randwrite", "4k", 32), ("read", "128k", 8))

GUEST = r"""
set -euo pipefail
BT="$PY -m blocktarget"
SOCK=/tmp/bt.sock
BDF=$(for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/class)" = 0x010802 ]; then basename $d; fi; done | head -1)
$BT setup --pci $BDF --hugemem 64 > /dev/null
cpu() { awk '{print $14 + $15}' /proc/$1/stat; }
for rep in $(seq 1 $REPS); do
for lane in true false; do
  sed "s/@BDF@/$BDF/; s#@SOCK@#$SOCK#; s/@LANE@/$lane/" cfg.json.in > cfg.json
  $BT start -c cfg.json > target-$lane.log 2>&1 &
  TPID=$!
  for i in $(seq 1 600); do [ -S $SOCK ] && break; sleep 0.1; done
  sleep 1
  nvme connect -t tcp -a 127.0.0.1 -s 4420 -n $NQN > /dev/null
  dev=""
  for i in $(seq 1 100); do
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
      [ "$(cat $s/subsysnqn 2>/dev/null)" = "$NQN" ] || continue
      dev=$(ls $s | grep -E '^nvme[0-9]+n1$' | head -1 || true)
    done
    [ -n "$dev" ] && [ -b /dev/$dev ] && break; sleep 0.1
  done
  for wl in $WORKLOADS; do
    IFS=: read rw bs qd <<< "$wl"
    c0=$(cpu $TPID); l0=$($PY lane_count.py $SOCK)
    fio --name=w --filename=/dev/$dev --rw=$rw --bs=$bs --direct=1 --ioengine=libaio \
        --iodepth=$qd --time_based --runtime=$T --size=48M --norandommap --randrepeat=0 \
        --output-format=json --output=fio-$lane-$rw-$bs-$rep.json
    c1=$(cpu $TPID); l1=$($PY lane_count.py $SOCK)
    echo "{\"lane\": $lane, \"rw\": \"$rw\", \"bs\": \"$bs\", \"qd\": $qd, \"rep\": $rep, \"cpu_ticks\": $((c1 - c0)), \"lane_cmds\": $((l1 - l0))}" >> results.jsonl
  done
  nvme disconnect -n $NQN > /dev/null
  kill $TPID; wait $TPID || true
done
done
$BT setup reset --pci $BDF > /dev/null
echo BENCH_DONE
"""

LANE_COUNT = r'''
import sys
from blocktarget.rpc_client import RpcClient
with RpcClient(unix=sys.argv[1], timeout=60) as c:
    print(sum(g["c_lane_commands"] for g in c.call("nvmf_get_stats")["poll_groups"]))
'''


def _config() -> str:
    cfg = {
        "blocktarget": {"cores": [0], "rpc": {"unix": "@SOCK@", "http": None},
                        "metrics": False},
        "subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller",
                 "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "@BDF@"}}]},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport",
                 "params": {"trtype": "TCP", "c_fast_path": "@LANE@"}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "BTLANE01"}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": NQN, "namespace": {"bdev_name": "Nvme0n1", "nsid": 1}}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": {
                     "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                     "trsvcid": "4420"}}},
            ]},
        ],
    }  # fmt: skip
    return json.dumps(cfg, indent=1).replace('"@LANE@"', "@LANE@")


def run(seconds: float, reps: int) -> list[dict[str, Any]]:
    guest = Guest(ensure_vm(), memory_mb=1024)
    res = guest.run(
        "bash ./bench.sh", timeout=1800,
        env={"PY": sys.executable, "T": str(seconds), "NQN": NQN, "REPS": str(reps),
             "WORKLOADS": " ".join(f"{rw}:{bs}:{qd}" for rw, bs, qd in WORKLOADS),
             "PYTHONPATH": os.environ.get("PYTHONPATH", str(PROJECT_ROOT))},
        files={"bench.sh": GUEST, "lane_count.py": LANE_COUNT, "cfg.json.in": _config()},
        modules=["vfio-pci"], extra_qemu_args=QEMU_ARGS,
        extra_append=["intel_iommu=on", "iommu=pt"],
        sparse_files={"nvme.img": IMAGE_MB << 20},
    )  # fmt: skip
    if res.rc != 0 or "BENCH_DONE" not in res.output:
        sys.stderr.write(res.output[-4000:])
        raise SystemExit(f"guest run failed (rc={res.rc}), see {res.rundir}")
    rows = []
    hz = os.sysconf("SC_CLK_TCK")
    for line in (res.rundir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        name = f"fio-{'true' if r['lane'] else 'false'}-{r['rw']}-{r['bs']}-{r['rep']}.json"
        job = json.loads((res.rundir / name).read_text())["jobs"][0]
        d = job["read"] if "read" in r["rw"] else job["write"]
        ios = d["total_ios"]
        r.update(iops=d["iops"], lat_us=d["lat_ns"]["mean"] / 1000, ios=ios,
                 cpu_us_per_io=r["cpu_ticks"] / hz / ios * 1e6 if ios else 0.0,
                 lane_share=r["lane_cmds"] / ios if ios else 0.0)
        rows.append(r)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=5)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    rows = run(args.time, args.reps)
    print("| workload | path | IOPS (runs) | mean lat µs | target CPU µs/IO | lane share |")
    print("|---|---|---|---|---|---|")
    for rw, bs, qd in WORKLOADS:
        for lane in (True, False):
            rs = [r for r in rows if r["rw"] == rw and r["bs"] == bs and r["lane"] == lane]
            if not rs:
                continue
            rs.sort(key=lambda r: r["iops"])
            med = rs[len(rs) // 2]
            runs = ", ".join(f"{r['iops']:,.0f}" for r in rs)
            print(f"| {bs} {rw} QD{qd} | {'C lane' if lane else 'Python'} | "
                  f"{med['iops']:,.0f} ({runs}) | "
                  f"{med['lat_us']:.0f} | {med['cpu_us_per_io']:.0f} | "
                  f"{med['lane_share']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
