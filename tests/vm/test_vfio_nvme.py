"""The user-space NVMe driver against a real PCIe NVMe controller: QEMU's emulated one,
in a guest with an emulated Intel IOMMU, driven through VFIO exactly as a physical SSD
would be.

Everything runs inside the guest: the kernel's ``nvme`` driver owns the device first (as
on any host), ``blocktarget setup`` refuses it while a file system is mounted, then binds
it to vfio-pci; a blocktarget process attaches it, exports the namespace over NVMe/TCP
on the guest's loopback, and the Python initiator writes and read-verifies through it,
including across a controller reset in the middle of a write/verify stream. After detach
and ``setup reset`` the kernel driver gets the device back and must read what the
initiator wrote; the host finally checks the same blocks in the disk image file.

It runs twice: with the C lane serving the namespace (csrc/be_nvme.c: SQEs, doorbells
and the CQ driven from C on the reactor's queue pair; the default) and with the Python
path (``c_fast_path: false``). With the lane it asserts that the lane executed most of
the I/O (nvmf_get_stats ``c_lane_commands``, the queue's ``lane_reads``/``lane_writes``),
across the reset too; with the Python path, its zero-copy paths. (The device is
throttled for the reset's sake: throughput is bench/nvme_lane_vm.py's business.)

On a host with a real SSD the same guest script runs unchanged (see tests/vm/README.md,
"VFIO NVMe on real hardware"): ``write_guest_files(dir)``, then ``bash vfio_nvme.sh`` as
root with BT_NVME_BDF naming the SSD.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from .harness.vm import PROJECT_ROOT, Guest

IMAGE_MB = 64
NQN = "nqn.2026-01.io.blocktarget:vfio"
QEMU_ARGS = [
    "-machine", "q35",
    "-device", "intel-iommu,intremap=on,caching-mode=on",
    "-drive", "file={rundir}/nvme.img,if=none,id=nv0,format=raw",
    "-device", "nvme,serial=deadbeef,drive=nv0",
]  # fmt: skip
# QEMU's I/O throttling keeps commands inside the "device" for a while, so the reset in
# the middle of the write/verify stream really finds commands in the hardware queues
# (without it QEMU completes them before a reset can catch one)
THROTTLED = [a.replace("format=raw", "format=raw,throttling.iops-total=50")
             for a in QEMU_ARGS]
KERNEL_ARGS = ["intel_iommu=on", "iommu=pt"]

# The guest side, also usable by hand on a host with a real SSD (README). $PY is the
# repository's venv python (the guest sees the host's root at the same paths).
GUEST_SCRIPT = r"""
set -euo pipefail
PY=${PY:?}
BT="$PY -m blocktarget"
SOCK=/tmp/bt.sock  # not in the run dir: 9p cannot hold a socket
step() { echo "== $(date +%T.%N | cut -c1-12) $*"; }
first_nvme() {
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/class)" = 0x010802 ]; then basename $d; fi
  done | head -1
}
BDF=${BT_NVME_BDF:-$(first_nvme)}
echo "BDF=$BDF"

step "kernel nvme driver owns the device"
for i in $(seq 1 100); do
  dev=$(ls /sys/bus/pci/devices/$BDF/nvme/*/ 2>/dev/null | grep -E '^nvme[0-9]+n1$' | head -1 || true)
  [ -n "$dev" ] && [ -b /dev/$dev ] && break; sleep 0.1
done
echo "block device: /dev/$dev"

if [ -z "${BT_SKIP_MKFS:-}" ]; then
  step "setup refuses a device with a mounted file system"
  mkfs.ext4 -q -F /dev/$dev
  mkdir -p /tmp/bt-test && mount /dev/$dev /tmp/bt-test
  if $BT setup --pci $BDF --hugemem 64 > refuse.txt 2>&1; then echo "setup did not refuse"; exit 11; fi
  cat refuse.txt
  grep -q "NOT touched: $dev is mounted on /tmp/bt-test" refuse.txt
  umount /tmp/bt-test
fi

step "setup binds it to vfio-pci"
$BT setup --pci $BDF --hugemem 64 | tee setup.txt
grep -q "$BDF .*-> vfio-pci" setup.txt
$BT setup status | tee status.txt
grep -q "^$BDF .* vfio-pci" status.txt

step "start blocktarget with the nvme bdev exported on 127.0.0.1:4420"
sed "s/@BDF@/$BDF/; s#@SOCK@#$SOCK#" cfg.json.in > cfg.json
$BT start -c cfg.json > target.log 2>&1 &
TPID=$!
trap 'kill $TPID 2>/dev/null || true' EXIT

step "initiator: write/read-verify, reset mid-I/O, detach"
$PY io_check.py "$SOCK" "$NQN" manifest.json "${BT_LANE:-1}"

step "setup reset refuses nothing now: the target released the device"
$BT setup reset --pci $BDF | tee reset.txt
grep -q "vfio-pci -> nvme" reset.txt

step "the kernel driver reads what went through blocktarget"
for i in $(seq 1 100); do
  dev=$(ls /sys/bus/pci/devices/$BDF/nvme/*/ 2>/dev/null | grep -E '^nvme[0-9]+n1$' | head -1 || true)
  [ -n "$dev" ] && [ -b /dev/$dev ] && break; sleep 0.1
done
$PY verify_blocks.py manifest.json /dev/$dev
kill $TPID; wait $TPID || true
trap - EXIT
grep -E "controller reset done|re-submitted|attached|detached" target.log || true
step "VFIO_NVME_OK"
"""

IO_CHECK = r'''
import asyncio, json, struct, sys, time
from blocktarget.host import connect
from blocktarget.rpc_client import RpcClient

SOCK, NQN, OUT = sys.argv[1:4]
LANE = (sys.argv[4] if len(sys.argv) > 4 else "1") == "1"  # the transport's c_fast_path


def rpc(method, params=None):
    with RpcClient(unix=SOCK, timeout=60) as c:
        return c.call(method, params)


def blk(lba, gen, bs):
    return struct.pack("<QQ", lba, gen) * (bs // 16)


async def main():
    for _ in range(600):  # the target starts slowly under TCG
        try:
            rpc("spdk_get_version")
            break
        except OSError:
            await asyncio.sleep(0.1)
    b = rpc("bdev_get_bdevs", {"name": "Nvme0n1"})[0]
    trid = b["driver_specific"]["nvme"][0]["trid"]
    assert trid["trtype"] == "PCIe", trid
    print("bdev", b["name"], b["num_blocks"], "x", b["block_size"], trid)
    ctrl = await connect("127.0.0.1", 4420, NQN, nr_io_queues=2, queue_size=32)
    n_io = [0]  # the host's I/O commands (read, write, flush), to judge the lane's share
    for name in ("read", "write", "flush"):
        def counted(*a, _f=getattr(ctrl, name), **kw):
            n_io[0] += 1
            return _f(*a, **kw)
        setattr(ctrl, name, counted)
    ns = await ctrl.namespace(1)
    bs = ns.lba_size
    nsze = b["num_blocks"]
    state = {}

    async def wr(lba, nlb, gen):
        data = b"".join(blk(x, gen, bs) for x in range(lba, lba + nlb))
        await ctrl.write(1, lba, data)
        for x in range(lba, lba + nlb):
            state[x] = gen
        return data

    t0 = time.monotonic()
    # sizes: one block, unaligned short, two pages, 128 KiB (PRP list), odd, last blocks
    for lba, nlb in [(0, 1), (1, 7), (64, 8), (200, 256), (1000, 33), (4096, 255),
                     (nsze - 8, 8)]:
        data = await wr(lba, nlb, 1)
        got = bytes(await ctrl.read(1, lba, nlb))
        assert got == data, f"read-back mismatch at {lba}+{nlb}"
    await ctrl.flush(1)
    await ctrl.write_zeroes(1, 1, 7)
    for x in range(1, 8):
        state[x] = 0
    assert bytes(await ctrl.read(1, 1, 7)) == bytes(7 * bs)
    await ctrl.dsm_deallocate(1, [(64, 8)])
    for x in range(64, 72):
        state.pop(x)  # deallocated: contents unspecified
    print(f"basic I/O ok in {time.monotonic() - t0:.1f}s")

    stop = asyncio.Event()
    count = [0]
    errors = []

    async def worker(w):
        gen = 2
        base = 20000 + w * 512
        while not stop.is_set():
            lba = base + (gen * 8) % 512
            data = await wr(lba, 8, gen)
            got = bytes(await ctrl.read(1, lba, 8))
            if got != data:
                errors.append((lba, gen))
            count[0] += 1
            gen += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(8)]
    await asyncio.sleep(2)
    # The reset must find commands in the hardware queues. The workers' commands come
    # and go in bursts (QEMU's throttle lets them out together; the host in this guest
    # needs a while to send the next ones), so a reset at an arbitrary instant can find
    # them all answered: reset when the queues show commands, and once more (up to
    # three times) if the reset still found none.
    async def queued():
        for _ in range(40):
            qs = (await asyncio.to_thread(rpc, "bdev_nvme_get_controllers_pcie",
                                          {"name": "Nvme0"}))[0]["queues"]
            if sum(q["outstanding"] for q in qs):
                return
            await asyncio.sleep(0.05)

    resets = 0
    while True:
        await queued()
        before = count[0]
        t1 = time.monotonic()
        await asyncio.to_thread(rpc, "bdev_nvme_reset_controller", {"name": "Nvme0"})
        reset_s = time.monotonic() - t1
        during = count[0] - before
        resets += 1
        info = rpc("bdev_nvme_get_controllers_pcie", {"name": "Nvme0"})[0]
        last = info["last_reset"]
        if last["in_flight"] > 0 or resets == 3:
            break
    await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*tasks)
    after = count[0] - before - during
    assert not errors, f"verify errors across the reset: {errors[:5]}"
    assert before > 0 and after > 0, (before, after)
    assert info["resets"] == resets, (info, resets)
    print(f"reset mid-I/O: {before} write+verify before, {during} during the "
          f"{reset_s * 1000:.0f} ms reset, {after} after; no errors; {last} "
          f"(reset {resets} of at most 3)")
    assert last["in_flight"] > 0, f"the reset found no command in the hardware queues: {last}"

    # everything written so far reads back
    lbas = sorted(state)
    runs = []
    for x in lbas:
        if runs and x == runs[-1][0] + runs[-1][1] and runs[-1][1] < 256:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    for lba, n in runs:
        got = bytes(await ctrl.read(1, lba, n))
        want = b"".join(blk(x, state[x], bs) if state[x] else bytes(bs)
                        for x in range(lba, lba + n))
        assert got == want, f"final verify mismatch in {lba}+{n}"
    print(f"final verify of {len(lbas)} blocks ok")

    # large writes whose H2CData header reaches the target before the payload, as on
    # any real network (segments): the host side sends the first 4 KiB of each large
    # write at once and the rest 0.5 s later (writes are sequential, so nothing else
    # is in between); the kernel then receives the payload's remainder straight into
    # the lent DMA buffer (rx_direct_bytes), only the first bytes are copied
    loop = asyncio.get_running_loop()

    class Paced:
        def __init__(self, t):
            self.t = t

        def __getattr__(self, name):
            return getattr(self.t, name)

        def writelines(self, bufs):
            data = b"".join(bytes(x) for x in bufs)
            if len(data) < 65536:
                self.t.write(data)
                return
            self.t.write(data[:4096])
            loop.call_later(0.5, self.t.write, data[4096:])

    saved_transports = [q._transport for q in ctrl.io_queues]
    for q in ctrl.io_queues:
        q._transport = Paced(q._transport)
    dp0 = rpc("bdev_get_bdevs", {"name": "Nvme0n1"})[0]["driver_specific"]["nvme"][0][
        "data_path"]
    nlb = (128 * 1024) // bs
    big = [(30000 + i * nlb, await wr(30000 + i * nlb, nlb, 50 + i)) for i in range(8)]
    for lba, data in big:
        assert bytes(await ctrl.read(1, lba, nlb)) == data, f"paced write at {lba}"
    dp1 = rpc("bdev_get_bdevs", {"name": "Nvme0n1"})[0]["driver_specific"]["nvme"][0][
        "data_path"]
    direct = dp1["rx_direct_bytes"] - dp0["rx_direct_bytes"]
    copied = dp1["rx_copied_bytes"] - dp0["rx_copied_bytes"]
    if LANE:
        # the lane receives the payload itself, into its DMA buffer, as it comes
        lane_w = dp1["lane_writes"] - dp0["lane_writes"]
        print(f"paced 128 KiB writes: {lane_w} written by the C lane from its DMA buffers")
        assert lane_w >= 8 and direct + copied == 0, (lane_w, direct, copied)
    else:
        print(f"paced 128 KiB writes: {direct} bytes received into DMA memory by the "
              f"kernel, {copied} copied")
        assert direct + copied == 8 * 128 * 1024 and direct > 3 * copied, (direct, copied)
    for q, t in zip(ctrl.io_queues, saved_transports):
        q._transport = t


    stats = rpc("nvmf_get_stats")
    lane = sum(g["c_lane_commands"] for g in stats["poll_groups"])
    print(f"lane: {lane} of the host's {n_io[0]} I/O commands executed by the C lane")
    ctl = rpc("bdev_get_bdevs", {"name": "Nvme0n1"})[0]["driver_specific"]["nvme"][0][
        "controller"]
    wakes = sum(g["net_irq_wakes"] for g in stats["poll_groups"])
    print(f"interrupts: {ctl['interrupt_vectors']} MSI-X vectors, {wakes} C poller wakes")
    if LANE:
        assert lane >= n_io[0] // 2, (lane, n_io[0])
    else:
        assert lane == 0, lane
    await ctrl.close()

    # the data path was zero-copy: R2T write data landed in the queue's DMA buffers and
    # reads were sent from them (in-capsule writes, <= 8 KiB, are still copied), and
    # every lent buffer is back once the connection is gone
    for _ in range(50):
        dp = rpc("bdev_get_bdevs", {"name": "Nvme0n1"})[0]["driver_specific"]["nvme"][0][
            "data_path"]
        if dp["lent_buffers"] == 0:
            break
        await asyncio.sleep(0.1)
    print("data path:", json.dumps(dp, sort_keys=True))
    if LANE:  # reads sent from the DMA buffer, writes placed into one, by the lane
        assert dp["lane_reads"] > 0 and dp["lane_writes"] > 0, dp
        # (and, the sockets lent to the reactor's C poller, completions reaped by it)
        assert dp["lane_c_reaped"] > 0, dp
    else:
        assert dp["zero_copy_writes"] > 0 and dp["zero_copy_reads"] > 0, dp
        assert dp["zero_copy_reads"] > dp["copied_reads"], dp
        assert dp["lane_reads"] == dp["lane_writes"] == 0, dp
    assert dp["lent_buffers"] == 0, dp

    saved = rpc("save_config")
    calls = [c for sub in saved["subsystems"] if sub["subsystem"] == "bdev"
             for c in sub["config"]]
    attach = [c for c in calls if c["params"].get("name") == "Nvme0"]
    assert attach and attach[0]["method"] == "bdev_nvme_attach_controller", calls
    assert attach[0]["params"]["trtype"] == "PCIe", attach

    # detach: take the namespace out of the subsystem first (a claimed bdev is refused)
    try:
        rpc("bdev_nvme_detach_controller", {"name": "Nvme0"})
        raise AssertionError("detach of a claimed controller was accepted")
    except Exception as exc:
        assert "in use" in str(exc), exc
    rpc("nvmf_subsystem_remove_ns", {"nqn": NQN, "nsid": 1})
    rpc("bdev_nvme_detach_controller_pcie", {"name": "Nvme0"})
    assert not [x for x in rpc("bdev_get_bdevs") if x["name"].startswith("Nvme0")]
    assert rpc("bdev_nvme_get_controllers_pcie") == []
    json.dump({"bs": bs, "state": {str(k): v for k, v in state.items()},
               "ios_before": before, "ios_during": during, "ios_after": after,
               "reset_ms": reset_s * 1000}, open(OUT, "w"))


asyncio.run(main())
'''

VERIFY_BLOCKS = r'''
import json, os, struct, sys

manifest, path = sys.argv[1:3]
m = json.load(open(manifest))
bs = m["bs"]
fd = os.open(path, os.O_RDONLY)
bad = []
for k, gen in m["state"].items():
    lba = int(k)
    got = os.pread(fd, bs, lba * bs)
    want = struct.pack("<QQ", lba, gen) * (bs // 16) if gen else bytes(bs)
    if got != want:
        bad.append(lba)
assert not bad, f"{len(bad)} blocks differ on {path}, first {bad[:5]}"
print(f"{path}: {len(m['state'])} blocks as written")
'''


def _config(lane: bool = True) -> dict:
    return {
        "blocktarget": {"cores": [0, 1], "rpc": {"unix": "@SOCK@", "http": None},
                        "metrics": False},
        "subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller",
                 "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "@BDF@",
                            "interrupts": True}},
            ]},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport",
                 "params": {"trtype": "TCP", "c_fast_path": lane}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "BTVFIO01"}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": NQN, "namespace": {"bdev_name": "Nvme0n1"}}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": {
                     "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                     "trsvcid": "4420"}}},
            ]},
        ],
    }  # fmt: skip


def guest_files(lane: bool = True) -> dict[str, str]:
    return {
        "vfio_nvme.sh": GUEST_SCRIPT,
        "io_check.py": IO_CHECK,
        "verify_blocks.py": VERIFY_BLOCKS,
        "cfg.json.in": json.dumps(_config(lane), indent=1),
    }


def write_guest_files(directory: str | Path) -> Path:
    """Write the guest script and its helpers to ``directory``, for a run on a host with a
    real SSD (tests/vm/README.md, "VFIO NVMe on real hardware")."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, text in guest_files().items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "python-path"])
def test_vfio_nvme_setup_attach_export_reset_detach(vm: Guest, lane: bool) -> None:
    res = vm.run(
        "bash ./vfio_nvme.sh", timeout=240, files=guest_files(lane),
        env={"PY": sys.executable, "NQN": NQN, "BT_LANE": "1" if lane else "0",
             "PYTHONPATH": str(PROJECT_ROOT)},
        modules=["nvme", "vfio-pci", "ext4"],
        extra_qemu_args=THROTTLED, extra_append=KERNEL_ARGS,
        sparse_files={"nvme.img": IMAGE_MB << 20},
    )  # fmt: skip
    res.check()
    out = res.output
    assert "VFIO_NVME_OK" in out
    assert re.search(r"reset mid-I/O: \d+ write\+verify before, \d+ during", out), out
    target_log = (res.rundir / "target.log").read_text()
    assert "controller reset done" in target_log, target_log[-3000:]
    # QEMU drains what it holds when disabled (those commands complete, nothing to
    # re-submit); a controller that drops them gets them re-submitted (unit-tested)
    assert re.search(r"[1-9]\d* command\(s\) were in flight", target_log), target_log
    assert "hugepages" in target_log, "the log says which memory backs DMA"
    dp = json.loads(re.search(r"data path: (\{.*\})", out).group(1))
    m = re.search(r"lane: (\d+) of the host's (\d+) I/O commands", out)
    assert m, out
    print(m.group(0))
    # the I/O queues raise MSI-X completion interrupts through vfio-pci's eventfds (the
    # admin queue's vector and one per queue), which wake the reactor's C poller
    irq = re.search(r"interrupts: (\d+) MSI-X vectors, (\d+) C poller wakes", out)
    assert irq and int(irq.group(1)) >= 2, out
    print(irq.group(0))
    if lane:
        assert dp["lane_reads"] > 0 and dp["lane_writes"] > 0, dp
        assert dp["lane_c_reaped"] > 0, dp
        assert int(irq.group(2)) > 0, irq.group(0)
        assert int(m.group(1)) >= int(m.group(2)) // 2, m.group(0)
        assert re.search(r"paced 128 KiB writes: ([89]|\d\d+) written by the C lane", out), out
    else:
        assert dp["zero_copy_writes"] > 0 and dp["zero_copy_reads"] > 0, dp
        # no user-space copy for most of the paced writes' data (kernel into DMA memory)
        m = re.search(r"paced 128 KiB writes: (\d+) bytes received into DMA memory by the "
                      r"kernel, (\d+) copied", out)
        assert m and int(m.group(1)) > 3 * int(m.group(2)), out
        print(m.group(0))
    # the image on the host holds the same blocks the kernel driver read back
    m = json.loads((res.rundir / "manifest.json").read_text())
    bs = m["bs"]
    with open(res.rundir / "nvme.img", "rb") as img:
        for k, gen in m["state"].items():
            lba = int(k)
            img.seek(lba * bs)
            want = struct.pack("<QQ", lba, gen) * (bs // 16) if gen else bytes(bs)
            assert img.read(bs) == want, f"LBA {lba} differs in the disk image"
    print(f"\nvfio nvme: {res.total_seconds:.0f}s total, boot {res.boot_seconds:.1f}s; "
          f"{m['ios_before']}/{m['ios_during']}/{m['ios_after']} I/O pairs "
          f"before/during/after a {m['reset_ms']:.0f} ms reset")


HOT_REMOVE = r"""
set -euo pipefail
PY=${PY:?}
BT="$PY -m blocktarget"
SOCK=/tmp/bt.sock  # not in the run dir: 9p cannot hold a socket
BDF=$(for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/class)" = 0x010802 ]; then basename $d; fi; done | head -1)
$BT setup --pci $BDF --hugemem 64
sed "s/@BDF@/$BDF/; s#@SOCK@#$SOCK#" cfg.json.in > cfg.json
$BT start -c cfg.json > target.log 2>&1 &
TPID=$!
$PY hot_remove.py "$SOCK" "$BDF"
grep -E "hot-removed|device removed" target.log
kill $TPID; wait $TPID || true
echo HOT_REMOVE_OK
"""

HOT_REMOVE_PY = r'''
import asyncio, subprocess, sys, time
from blocktarget.host import connect
from blocktarget.rpc_client import RpcClient
SOCK, BDF = sys.argv[1:3]
NQN = "nqn.2026-01.io.blocktarget:vfio"

def rpc(m, p=None):
    with RpcClient(unix=SOCK, timeout=60) as c:
        return c.call(m, p)

async def main():
    for _ in range(600):
        try:
            rpc("spdk_get_version"); break
        except OSError:
            await asyncio.sleep(0.1)
    ctrl = await connect("127.0.0.1", 4420, NQN, nr_io_queues=1, queue_size=16)
    await ctrl.write(1, 0, b"x" * 4096)
    # the kernel asks vfio-pci for the device; vfio signals us; we must let go
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", f"echo 1 > /sys/bus/pci/devices/{BDF}/remove")
    rc = await asyncio.wait_for(proc.wait(), 60)
    print(f"remove finished rc={rc} after {time.monotonic() - t0:.1f}s")
    assert rc == 0
    for _ in range(100):
        if not [b for b in rpc("bdev_get_bdevs") if b["name"] == "Nvme0n1"]:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("bdev still registered after hot-remove")
    sub = rpc("nvmf_get_subsystems")
    ns = [s for s in sub if s["nqn"] == NQN][0].get("namespaces", [])
    assert not ns, ns
    print("bdev and namespace gone after hot-remove")

asyncio.run(main())
'''


def test_vfio_nvme_hot_remove_releases_device(vm: Guest) -> None:
    files = guest_files()
    files["hot_remove.sh"] = HOT_REMOVE
    files["hot_remove.py"] = HOT_REMOVE_PY
    res = vm.run(
        "bash ./hot_remove.sh", timeout=150, files=files,
        env={"PY": sys.executable, "PYTHONPATH": str(PROJECT_ROOT)}, modules=["vfio-pci"],
        extra_qemu_args=QEMU_ARGS, extra_append=KERNEL_ARGS,
        sparse_files={"nvme.img": IMAGE_MB << 20},
    )  # fmt: skip
    res.check()
    assert "HOT_REMOVE_OK" in res.output
    assert "bdev and namespace gone after hot-remove" in res.output


def test_guest_script_is_self_contained() -> None:
    """The README tells operators to run the guest script on real hardware; it must not
    depend on anything only the harness provides besides PY, RUNDIR and NQN."""
    for var in re.findall(r"\$\{?([A-Z_]+)", GUEST_SCRIPT):
        assert var in {"PY", "RUNDIR", "NQN", "BT_NVME_BDF", "BT_SKIP_MKFS", "BT", "SOCK",
                       "BDF", "TPID", "BT_LANE"}, var
    assert Path(__file__).name == "test_vfio_nvme.py"
