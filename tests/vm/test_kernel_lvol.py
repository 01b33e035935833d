"""A thin logical volume used by the Linux kernel NVMe/TCP host (in QEMU), unmodified.

One boot: fio writes with crc32c verification through a thin volume that is larger than
its store; a live `bdev_lvol_resize` reaches the connected host, whose block device grows
(Namespace Attribute Changed AEN, then `nvme ns-rescan`); filling the store fails the
writes that need a new cluster (the kernel reports the Capacity Exceeded status as a
space allocation error) while what was written before still reads back unchanged. The
volume's reads and writes of allocated clusters are the C lane's (nvmf_get_stats).

Another: a snapshot taken while the host writes, proved point-in-time block by block
(`test_snapshot_mid_write_phase_is_point_in_time`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing

import pytest
from integration.target_proc import RunningTarget, free_port, listen_address

from .harness.vm import Guest
from .test_kernel_host import PRELUDE, serve

NQN = "nqn.2026-01.io.blocktarget:lvolvm"
MIB = 1 << 20


@pytest.fixture
def target(tmp_path) -> Iterator[RunningTarget]:
    port = free_port()
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Pool0", "num_blocks": 16384, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "BTLVOL01"}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(port)}}]}]}
    with closing(serve(tmp_path, cfg, nvme_port=port)) as served:  # killed when done
        t = next(served)
        t.rpc("bdev_lvol_create_lvstore", bdev_name="Pool0", lvs_name="lvs0", cluster_sz=MIB)
        t.rpc("bdev_lvol_create", lvs_name="lvs0", lvol_name="thin", size_in_mib=96,
              thin_provision=True)
        t.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "lvs0/thin"})
        yield t


def test_thin_volume_fio_verify_live_resize_and_full_store(vm: Guest,
                                                           target: RunningTarget) -> None:
    total = target.rpc("bdev_lvol_get_lvstores")[0]["total_data_clusters"]
    res = vm.run(PRELUDE + r"""
set -x
nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN || exit 10
dev=$(nsdev $NQN 1) || exit 11
ctrl=$(ctrldev $NQN) || exit 12
echo "SIZE0 $(blockdev --getsize64 $dev)"
fio --name=thin --filename=$dev --rw=randwrite --bs=4k --size=16M --ioengine=libaio --direct=1 \
    --iodepth=16 --verify=crc32c --verify_fatal=1 --output=fio.txt || exit 13
dd if=$dev bs=1M count=16 iflag=direct status=none | md5sum > before.md5
# grow the volume while connected: the AEN makes the kernel rescan on its own
rpc '{"jsonrpc":"2.0","id":1,"method":"bdev_lvol_resize","params":{"name":"lvs0/thin","size_in_mib":128}}'
for i in $(seq 1 100); do
  [ "$(blockdev --getsize64 $dev)" = "134217728" ] && break; sleep 0.1; done
echo "SIZE1 $(blockdev --getsize64 $dev)"
nvme ns-rescan $ctrl || exit 14
echo "SIZE2 $(blockdev --getsize64 $dev)"
# fill the store: writes into new clusters fail once none is free
dd if=/dev/urandom of=$dev bs=1M seek=16 count=100 oflag=direct status=none 2> fill.err
echo "FILL_RC $?"
dd if=$dev bs=1M count=16 iflag=direct status=none | md5sum > after.md5
cmp before.md5 after.md5 || exit 15
# a cluster allocated before still takes writes
dd if=/dev/urandom of=$dev bs=4k count=1 seek=5 oflag=direct status=none || exit 16
dmesg | grep -i -E "space allocation|capacity" > dmesg.txt
nvme disconnect -n $NQN || exit 17
echo DONE
""", env={"RPC_PORT": str(target.http_port), "PORT": str(target.nvme_port),  # type: ignore[attr-defined]
          "NQN": NQN}, timeout=300)
    res.check()
    # the volume's I/O went through the C lane (the cluster lookup in C): fio's verify
    # pass alone reads 4096 blocks of clusters already allocated, all of them the lane's
    stats = target.rpc("nvmf_get_stats")
    lane = sum(g["c_lane_commands"] for g in stats["poll_groups"])
    assert lane > 2000, stats
    out = res.output
    rd = res.rundir
    assert f"SIZE0 {96 * MIB}" in out
    assert f"SIZE1 {128 * MIB}" in out, "the AEN did not make the host see the new size"
    assert f"SIZE2 {128 * MIB}" in out
    assert "err= 0" in (rd / "fio.txt").read_text()
    assert "FILL_RC 0" not in out, "a full store took every write"
    fill_err = (rd / "fill.err").read_text()
    # Capacity Exceeded is BLK_STS_NOSPC in the kernel: ENOSPC to the writer, not EIO
    assert "No space left on device" in fill_err, fill_err
    assert "critical space allocation error" in (rd / "dmesg.txt").read_text()
    assert "DONE" in out
    [s] = target.rpc("bdev_lvol_get_lvstores")
    assert s["free_clusters"] == 0 and s["total_data_clusters"] == total
    assert "Capacity Exceeded" in target.log()


SNAP_VOL_MIB = 32
SNAP_NQN = "nqn.2026-01.io.blocktarget:lvolsnap"


@pytest.fixture
def snap_target(tmp_path) -> Iterator[RunningTarget]:
    """A thin volume on a malloc store with room for it twice (its snapshot keeps the
    first copy of each cluster, the origin's copy-on-writes take a second)."""
    port = free_port()
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Pool0", "num_blocks": 32768, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": SNAP_NQN, "allow_any_host": True, "serial_number": "BTLVSNAP"}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": SNAP_NQN, "listen_address": listen_address(port)}}]}]}
    with closing(serve(tmp_path, cfg, nvme_port=port)) as served:  # killed when done
        t = next(served)
        t.rpc("bdev_lvol_create_lvstore", bdev_name="Pool0", lvs_name="lvs0", cluster_sz=MIB)
        t.rpc("bdev_lvol_create", lvs_name="lvs0", lvol_name="vol",
              size_in_mib=SNAP_VOL_MIB, thin_provision=True)
        t.rpc("nvmf_subsystem_add_ns", nqn=SNAP_NQN, namespace={"bdev_name": "lvs0/vol"})
        yield t


# In the guest, one Python process per call: the snapshot is requested a few ms after
# the write counter was read, and the counter is read again as soon as it returns.
_SNAP_PY = r'''
import json, sys, time, urllib.request as u
url = sys.argv[1]
def call(method, params):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    r = json.loads(u.urlopen(u.Request(url, data=body.encode(),
                   headers={"Content-Type": "application/json"}), timeout=30).read())
    if "error" in r:
        raise SystemExit(f"{method}: {r['error']}")
    return r["result"]
def written():
    return call("bdev_get_iostat", {"name": "lvs0/vol"})["bdevs"][0]["bytes_written"]
if sys.argv[2] == "base":
    print(written())
    raise SystemExit
base, need = int(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + 120
while written() - base < need:
    if time.monotonic() > deadline:
        raise SystemExit("the write phase never got going")
    time.sleep(0.02)
before = written()
snap = call("bdev_lvol_snapshot", {"lvol_name": "lvs0/vol", "snapshot_name": "snap"})
after = written()
print(json.dumps({"before": before, "after": after, "snapshot": snap}))
'''

# Block by block: A is the volume as the first write phase left it (saved), B what the
# second left on the origin. Every clone block must be its A or its B, and which one is
# printed as a run-length string for the host to judge.
_CHECK_PY = r'''
import json, sys
BS = 4096
a = open(sys.argv[1], "rb")
o = open(sys.argv[2], "rb", buffering=0)
c = open(sys.argv[3], "rb", buffering=0)
kinds, origin_is_a = [], 0
while True:
    ab, ob, cb = a.read(1 << 20), o.read(1 << 20), c.read(1 << 20)
    if not ab:
        assert not ob and not cb, "the devices differ in size"
        break
    assert len(ab) == len(ob) == len(cb)
    for i in range(0, len(ab), BS):
        A, B, C = ab[i:i + BS], ob[i:i + BS], cb[i:i + BS]
        origin_is_a += A == B
        kinds.append("A" if C == A else "B" if C == B else "X")
runs = []
for k in kinds:
    if runs and runs[-1][0] == k:
        runs[-1][1] += 1
    else:
        runs.append([k, 1])
print(json.dumps({"blocks": len(kinds), "runs": runs,
                  "origin_blocks_still_a": origin_is_a}))
'''


def test_snapshot_mid_write_phase_is_point_in_time(vm: Guest, snap_target: RunningTarget
                                                   ) -> None:
    """The kernel host writes pattern A over the whole thin volume (fio, crc32c verify),
    then pattern B sequentially, one 4 KiB write at a time (QD1: each is acknowledged
    before the next is sent), and a quarter of the way in the snapshot is taken over
    RPC. The origin must end all-B (fio verifies it, and no block still holds its A);
    the snapshot, exported through a clone as namespace 2, must read B on exactly a
    prefix of the blocks and A on the rest (QD1 sequential writes leave no other
    point-in-time image), and the prefix must lie between the target's write counts
    just before and just after the snapshot call."""
    n = SNAP_VOL_MIB * MIB // 4096
    res = vm.run(PRELUDE + r"""
set -x
nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN || exit 10
dev=$(nsdev $NQN 1) || exit 11
url=http://$HOST_ADDR:$RPC_PORT/
fio --name=a --filename=$dev --rw=write --bs=128k --size=${VOL}M --ioengine=libaio --direct=1 \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --randseed=1111 --output=fioA.txt || exit 12
dd if=$dev of=a.bin bs=1M iflag=direct status=none || exit 13
python3 snap.py $url base > base.txt || exit 14
fio --name=b --filename=$dev --rw=write --bs=4k --size=${VOL}M --ioengine=libaio --direct=1 \
    --iodepth=1 --verify=crc32c --verify_fatal=1 --randseed=2222 --output=fioB.txt &
fiopid=$!
python3 snap.py $url snap $(cat base.txt) $((VOL * 1048576 / 4)) > snap.json || exit 15
wait $fiopid || exit 16
rpc '{"jsonrpc":"2.0","id":3,"method":"bdev_lvol_clone","params":{"snapshot_name":"lvs0/snap","clone_name":"clone"}}' > clone.json
rpc '{"jsonrpc":"2.0","id":4,"method":"nvmf_subsystem_add_ns","params":{"nqn":"'$NQN'","namespace":{"bdev_name":"lvs0/clone","nsid":2}}}' > addns.json
cdev=$(nsdev $NQN 2) || exit 17
blockdev --flushbufs $dev $cdev
python3 check.py a.bin $dev $cdev > check.json || exit 18
nvme disconnect -n $NQN || exit 19
echo DONE
""", files={"snap.py": _SNAP_PY, "check.py": _CHECK_PY},
        env={"RPC_PORT": str(snap_target.http_port),
             "PORT": str(snap_target.nvme_port),  # type: ignore[attr-defined]
             "NQN": SNAP_NQN, "VOL": str(SNAP_VOL_MIB)}, timeout=600)
    res.check()
    rd = res.rundir
    assert "DONE" in res.output
    for f in ("fioA.txt", "fioB.txt"):
        assert "err= 0" in (rd / f).read_text(), f
    base = int((rd / "base.txt").read_text())
    snap = json.loads((rd / "snap.json").read_text())
    check = json.loads((rd / "check.json").read_text())
    c0, c1 = (snap["before"] - base) // 4096, (snap["after"] - base) // 4096
    runs = [tuple(r) for r in check["runs"]]
    print(f"snapshot of {n} blocks: {runs}; B writes counted before/after the snapshot "
          f"call: {c0}/{c1}")
    assert check["blocks"] == n
    # no origin block still equals its A: the origin moved on everywhere, and A and B
    # differ in every block, so no clone block can pass as both
    assert check["origin_blocks_still_a"] == 0
    # exactly B on a prefix, A on the rest: the image at one instant of the write phase
    assert len(runs) == 2 and runs[0][0] == "B" and runs[1][0] == "A", runs
    prefix = runs[0][1]
    assert c0 <= prefix <= c1, (c0, prefix, c1)
    assert 0 < prefix < n
    lvols = {v["name"]: v for v in snap_target.rpc("bdev_lvol_get_lvols")}
    assert lvols["snap"]["is_snapshot"] and lvols["clone"]["is_clone"]
    assert lvols["vol"]["is_clone"]  # the origin reads through the snapshot
