"""The C lane against the Python path on the NVMe PCIe bdev (VFIO), in one QEMU guest
(TCG, emulated intel-iommu, QEMU `-device nvme`): the same target twice, with the lane
(default) and with ``c_fast_path: false``, the guest kernel's nvme-tcp initiator and fio
on its block device, one reactor.

For each mode and workload: fio's IOPS and mean latency, the target's CPU per I/O
(utime + stime of the process from /proc around the fio run) and the share of the
commands the C lane executed (nvmf_get_stats ``c_lane_commands``). Under TCG the device
and the guest's kernel are emulated, so the figures compare the two paths on one
emulated machine; they are not what a real SSD would give.

``--vs-kernel`` (issue 15's goal for the NVMe bdev): the same controller exported by
the Linux kernel instead, its own nvme driver under its nvmet-tcp target (configfs,
the namespace's device_path the controller's block device), against blocktarget's lane
over VFIO; the guest's nvme-tcp host and fio as the client of both, the modes
alternating (the function moves between vfio-pci and nvme each time). The kernel's
target has no process to time: for every mode the guest's whole CPU per I/O is given
too (/proc/stat, all vCPUs, fio and the host included), the comparable figure.

    PYTHONPATH=$PWD .venv/bin/python bench/nvme_lane_vm.py [--time 5] [--reps 2] [--vs-kernel]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
KERNEL_WORKLOADS = (("randread", "4k", 32), ("randwrite", "4k", 32), ("read", "128k", 32),
                    ("randread", "4k", 1))
MODES = ("lane", "python")
KERNEL_MODES = ("lane", "kernel")

GUEST = r"""
set -euo pipefail
BT="$PY -m blocktarget"
SOCK=/tmp/bt.sock
BDF=$(for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/class)" = 0x010802 ]; then basename $d; fi; done | head -1)
cpu() { awk '{print $14 + $15}' /proc/$1/stat; }
# the target's threads: id, name, CPU ticks
threads() { for t in /proc/$TPID/task/*; do
  echo "$(basename $t) $(cat $t/comm) $(awk '{print $14 + $15}' $t/stat)"; done; }
# the guest's busy ticks, all vCPUs (user nice system irq softirq steal)
sys_busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
NVMET=/sys/kernel/config/nvmet
kernel_up() {
  # the function to the kernel's nvme driver, its namespace exported by nvmet-tcp
  $BT setup reset --pci $BDF > /dev/null
  blk=""
  for i in $(seq 1 200); do
    blk=$(ls /sys/bus/pci/devices/$BDF/nvme/*/ 2>/dev/null | grep -E '^nvme[0-9]+n1$' | head -1 || true)
    [ -n "$blk" ] && [ -b /dev/$blk ] && break; sleep 0.1
  done
  [ -n "$blk" ] || { echo "the kernel's nvme driver did not take $BDF" >&2; exit 1; }
  echo "kernel nvme: $BDF is /dev/$blk" >&2
  mkdir $NVMET/subsystems/$NQN
  echo 1 > $NVMET/subsystems/$NQN/attr_allow_any_host
  mkdir $NVMET/subsystems/$NQN/namespaces/1
  echo -n /dev/$blk > $NVMET/subsystems/$NQN/namespaces/1/device_path
  echo 1 > $NVMET/subsystems/$NQN/namespaces/1/enable
  mkdir $NVMET/ports/1
  echo tcp > $NVMET/ports/1/addr_trtype; echo ipv4 > $NVMET/ports/1/addr_adrfam
  echo 127.0.0.1 > $NVMET/ports/1/addr_traddr; echo 4420 > $NVMET/ports/1/addr_trsvcid
  ln -s $NVMET/subsystems/$NQN $NVMET/ports/1/subsystems/$NQN
}
kernel_down() {
  rm $NVMET/ports/1/subsystems/$NQN; rmdir $NVMET/ports/1
  echo 0 > $NVMET/subsystems/$NQN/namespaces/1/enable
  rmdir $NVMET/subsystems/$NQN/namespaces/1; rmdir $NVMET/subsystems/$NQN
}
for rep in $(seq 1 $REPS); do
for mode in $MODES; do
  if [ $mode = kernel ]; then
    kernel_up
    TPID=""
  else
    lane=$([ $mode = python ] || [ $mode = pythonpoll ] && echo false || echo true)
    # (the I/O queues polled, no MSI-X completion interrupts: the attach's option)
    irq=""
    if [ $mode = lanepoll ] || [ $mode = pythonpoll ]; then irq=', "interrupts": false'; fi
    if [ $mode = laneirq ]; then irq=', "interrupts": true'; fi
    # (the C poller returns to the event loop at once instead of waiting for the host)
    hw=""
    if [ $mode = lanenohw ]; then hw=', "host_wait_us": 0'; fi
    netpoll=$([ $mode = nonet ] && echo false || echo true)
    pollmode=adaptive; busy=200; idle=1000; dwait=10; adapt=true
    # (the whole busy-poll window after every reply, as before poll.adaptive_window)
    if [ $mode = lanefixed ]; then adapt=false; fi
    # (the reactor's timed poll of its idle NVMe queue every 20 ms instead of 1 ms)
    if [ $mode = laneidle20 ]; then idle=20000; fi
    if [ $mode = lanedw200 ]; then dwait=200; idle=20000; fi
    if [ $mode = lanebusy ]; then pollmode=busy; fi
    # (the busy-poll window spun while only the device works, as before device_wait_us)
    if [ $mode = lanespin ]; then dwait=0; fi
    # (no spinning at all: the reactor polls the queue every 50 us, sleeping between)
    if [ $mode = lanenospin ]; then pollmode=event; busy=0; idle=50; fi
    $BT setup --pci $BDF --hugemem 64 > /dev/null
    sed "s/@BDF@/$BDF/; s#@SOCK@#$SOCK#; s/@LANE@/$lane/; s/@NETPOLL@/$netpoll/;
         s/@POLLMODE@/$pollmode/; s/@BUSY@/$busy/; s/@IDLE@/$idle/;
         s/@DWAIT@/$dwait/; s/@ADAPT@/$adapt/; s/@IRQ@/$irq/; s/@HW@/$hw/" cfg.json.in > cfg.json
    # (mode before: the same settings as lane, the target from another checkout)
    tree=$([ $mode = before ] && echo "$BEFORE" || echo "$PYTHONPATH")
    # (the reactor's GIL sampler off: its CPU-clock signal, ~250 a CPU second)
    gil=$([ $mode = lanenogil ] && echo 0 || echo 1)
    BLOCKTARGET_GIL_SAMPLING=$gil PYTHONPATH=$tree $BT start -c cfg.json > target-$mode.log 2>&1 &
    TPID=$!
    for i in $(seq 1 600); do [ -S $SOCK ] && break; sleep 0.1; done
    sleep 1
  fi
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
    if [ -n "$TPID" ]; then c0=$(cpu $TPID); l0=$($PY lane_count.py $SOCK); else c0=0; l0=0; fi
    if [ -n "$TPID" ]; then threads > threads0-$mode-$rw-$bs-$qd-$rep.txt; fi
    s0=$(sys_busy)
    fio --name=w --filename=/dev/$dev --rw=$rw --bs=$bs --direct=1 --ioengine=libaio \
        --iodepth=$qd --time_based --runtime=$T --size=48M --norandommap --randrepeat=0 \
        --output-format=json --output=fio-$mode-$rw-$bs-$qd-$rep.json
    s1=$(sys_busy)
    if [ -n "$TPID" ]; then c1=$(cpu $TPID); l1=$($PY lane_count.py $SOCK); else c1=0; l1=0; fi
    if [ -n "$TPID" ]; then
      # where the target's CPU went: per thread (ticks since its start), and the
      # reactor's poller counters (cumulative since the target started)
      threads > threads1-$mode-$rw-$bs-$qd-$rep.txt
      $PY lane_count.py $SOCK stats > stats-$mode-$rw-$bs-$qd-$rep.json
    fi
    echo "{\"mode\": \"$mode\", \"rw\": \"$rw\", \"bs\": \"$bs\", \"qd\": $qd, \"rep\": $rep, \"cpu_ticks\": $((c1 - c0)), \"sys_ticks\": $((s1 - s0)), \"lane_cmds\": $((l1 - l0))}" >> results.jsonl
  done
  nvme disconnect -n $NQN > /dev/null
  if [ $mode = kernel ]; then
    kernel_down
  else
    kill $TPID; wait $TPID || true
  fi
done
done
$BT setup reset --pci $BDF > /dev/null
echo BENCH_DONE
"""

LANE_COUNT = r'''
import sys
from blocktarget.rpc_client import RpcClient
import json
with RpcClient(unix=sys.argv[1], timeout=60) as c:
    groups = c.call("nvmf_get_stats")["poll_groups"]
    if sys.argv[2:] == ["stats"]:
        print(json.dumps({k: v for k, v in groups[0].items() if isinstance(v, int)}))
    else:
        print(sum(g["c_lane_commands"] for g in groups))
'''


def _config() -> str:
    cfg = {
        "blocktarget": {"cores": [0], "rpc": {"unix": "@SOCK@", "http": None},
                        "metrics": False,
                        "poll": {"mode": "@POLLMODE@", "busy_us": "@BUSY@",
                                 "idle_us": "@IDLE@", "device_wait_us": "@DWAIT@",
                                 "adaptive_window": "@ADAPT@", "hw": "@HW@"}},
        "subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller",
                 "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "@BDF@",
                            "irq": "@IRQ@"}}]},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport",
                 "params": {"trtype": "TCP", "c_fast_path": "@LANE@",
                            "c_net_poll": "@NETPOLL@"}},
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
    text = json.dumps(cfg, indent=1)
    for key in ("LANE", "NETPOLL", "BUSY", "IDLE", "DWAIT", "ADAPT"):  # (JSON booleans, numbers)
        text = text.replace(f'"@{key}@"', f"@{key}@")
    # (the attach's "interrupts" only where a mode sets it: a --before tree may not know it)
    text = re.sub(r',\s*"irq": "@IRQ@"', "@IRQ@", text)
    text = re.sub(r',\s*"hw": "@HW@"', "@HW@", text)  # (likewise poll.host_wait_us)
    return text


def run(seconds: float, reps: int, modes: tuple[str, ...] = MODES,
        workloads: tuple[tuple[str, str, int], ...] = WORKLOADS,
        before: Path | None = None) -> list[dict[str, Any]]:
    guest = Guest(ensure_vm(), memory_mb=1024)
    # (the kernel's nvme driver is loaded only when it is compared: loaded, it takes the
    # function at once, and `blocktarget setup` moves it to vfio-pci)
    modules = ["vfio-pci"] + (["nvme"] if "kernel" in modes else [])
    res = guest.run(
        "bash ./bench.sh", timeout=3600,
        env={"PY": sys.executable, "T": str(seconds), "NQN": NQN, "REPS": str(reps),
             "MODES": " ".join(modes),
             "WORKLOADS": " ".join(f"{rw}:{bs}:{qd}" for rw, bs, qd in workloads),
             "PYTHONPATH": os.environ.get("PYTHONPATH", str(PROJECT_ROOT)),
             "BEFORE": str(before.resolve()) if before is not None else ""},
        files={"bench.sh": GUEST, "lane_count.py": LANE_COUNT, "cfg.json.in": _config()},
        modules=modules, extra_qemu_args=QEMU_ARGS,
        extra_append=["intel_iommu=on", "iommu=pt"],
        sparse_files={"nvme.img": IMAGE_MB << 20},
    )  # fmt: skip
    if res.rc != 0 or "BENCH_DONE" not in res.output:
        sys.stderr.write(res.output[-4000:])
        raise SystemExit(f"guest run failed (rc={res.rc}), see {res.rundir}")
    rows = []
    hz = os.sysconf("SC_CLK_TCK")  # (the guest's USER_HZ is the same: 100)
    for line in (res.rundir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        name = f"fio-{r['mode']}-{r['rw']}-{r['bs']}-{r['qd']}-{r['rep']}.json"
        job = json.loads((res.rundir / name).read_text())["jobs"][0]
        d = job["read"] if "read" in r["rw"] else job["write"]
        ios = d["total_ios"]
        r.update(iops=d["iops"], lat_us=d["lat_ns"]["mean"] / 1000, ios=ios,
                 cpu_us_per_io=r["cpu_ticks"] / hz / ios * 1e6 if ios else 0.0,
                 sys_us_per_io=r["sys_ticks"] / hz / ios * 1e6 if ios else 0.0,
                 lane_share=r["lane_cmds"] / ios if ios else 0.0)
        rows.append(r)
    return rows


LABELS = {"lane": "blocktarget, C lane (VFIO)", "python": "blocktarget, Python path (VFIO)",
          "nonet": "blocktarget, C lane without the C poller (VFIO)",
          "lanebusy": "blocktarget, C lane, poll mode busy (VFIO)",
          "lanenospin": "blocktarget, C lane, no spinning, polled every 50 us (VFIO)",
          "lanespin": "blocktarget, C lane, spinning while the device works "
                      "(device_wait_us 0) (VFIO)",
          "lanefixed": "blocktarget, C lane, the whole busy-poll window after every "
                       "reply (adaptive_window false) (VFIO)",
          "laneidle20": "blocktarget, C lane, idle_us 20000 (VFIO)",
          "lanedw200": "blocktarget, C lane, idle_us 20000, device_wait_us 200 (VFIO)",
          "before": "blocktarget, C lane, the --before checkout (VFIO)",
          "lanepoll": "blocktarget, C lane, I/O queues polled (interrupts false) (VFIO)",
          "laneirq": "blocktarget, C lane, I/O queues raising MSI-X interrupts "
                     "(interrupts true) (VFIO)",
          "lanenohw": "blocktarget, C lane, no host wait (host_wait_us 0) (VFIO)",
          "lanenogil": "blocktarget, C lane, the GIL sampler off (VFIO)",
          "pythonpoll": "blocktarget, Python path, I/O queues polled (interrupts false) "
                        "(VFIO)",
          "kernel": "Linux nvmet-tcp + nvme driver"}


def _median(rs: list[dict[str, Any]]) -> dict[str, Any]:
    rs = sorted(rs, key=lambda r: r["iops"])
    return rs[len(rs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--vs-kernel", action="store_true",
                    help="blocktarget's lane against the kernel's nvmet-tcp over its nvme "
                         "driver, same controller")
    ap.add_argument("--modes", help="comma separated, in the order they alternate: lane, "
                    "python (c_fast_path false), nonet (c_net_poll false), lanebusy (poll "
                    "mode busy: the reactor never sleeps), lanenospin (poll mode event, "
                    "no busy window, the queue polled every 50 us), lanespin (adaptive, "
                    "spinning while only the device works: device_wait_us 0), lanefixed "
                    "(adaptive_window false: the whole window after every reply), "
                    "laneidle20 (idle_us 20000: the idle queue polled every 20 ms), "
                    "lanedw200 (idle_us 20000, device_wait_us 200), before (lane, "
                    "the target run from --before's checkout), lanepoll / pythonpoll (the "
                    "attach's interrupts false: I/O queues polled), laneirq (interrupts true), "
                    "lanenohw (poll.host_wait_us 0), lanenogil (the GIL sampler off), kernel")
    ap.add_argument("--before", type=Path, metavar="TREE",
                    help="another checkout, built in place, for mode before (an A/B of a "
                    "change in one guest run, the modes alternating)")
    ap.add_argument("--workloads", help="comma separated RW:BS:QD (e.g. randread:4k:1); "
                    "default: all of the comparison's")
    args = ap.parse_args()
    modes, workloads = (KERNEL_MODES, KERNEL_WORKLOADS) if args.vs_kernel else (MODES, WORKLOADS)
    if args.workloads:
        try:
            workloads = tuple((rw, bs, int(qd)) for rw, bs, qd in
                              (w.split(":") for w in args.workloads.split(",")))
        except ValueError:
            ap.error("--workloads: each must be RW:BS:QD, e.g. randread:4k:1")
    if args.modes:
        modes = tuple(args.modes.split(","))
        bad = [m for m in modes if m not in LABELS]
        if bad:
            ap.error(f"unknown mode(s) {', '.join(bad)}: choose from {', '.join(LABELS)}")
    if ("before" in modes) != (args.before is not None):
        ap.error("mode before and --before go together")
    rows = run(args.time, args.reps, modes, workloads, args.before)
    print("| workload | target | IOPS (runs) | mean lat µs | target CPU µs/IO "
          "| guest CPU µs/IO | lane share |")
    print("|---|---|---|---|---|---|---|")
    for rw, bs, qd in workloads:
        for mode in modes:
            rs = [r for r in rows if r["rw"] == rw and r["bs"] == bs and r["qd"] == qd
                  and r["mode"] == mode]
            if not rs:
                continue
            med = _median(rs)
            runs = ", ".join(f"{r['iops']:,.0f}" for r in rs)
            own = f"{med['cpu_us_per_io']:.0f}" if mode != "kernel" else "-"
            share = f"{med['lane_share']:.0%}" if mode != "kernel" else "-"
            print(f"| {bs} {rw} QD{qd} | {LABELS[mode]} | {med['iops']:,.0f} ({runs}) | "
                  f"{med['lat_us']:.0f} | {own} | {med['sys_us_per_io']:.0f} | {share} |")
    if "kernel" in modes:
        print("\n| workload | blocktarget mode | IOPS / kernel's | mean latency / kernel's "
              "| guest CPU per I/O / kernel's |")
        print("|---|---|---|---|---|")
        for rw, bs, qd in workloads:
            m = {mode: _median([r for r in rows if r["rw"] == rw and r["bs"] == bs
                                and r["qd"] == qd and r["mode"] == mode]) for mode in modes}
            k = m["kernel"]
            for mode in modes:
                if mode == "kernel":
                    continue
                a = m[mode]
                print(f"| {bs} {rw} QD{qd} | {mode} | {a['iops'] / k['iops']:.2f} | "
                      f"{a['lat_us'] / k['lat_us']:.2f} | "
                      f"{a['sys_us_per_io'] / k['sys_us_per_io']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
