"""A thin logical volume used by the Linux kernel NVMe/TCP host (in QEMU), unmodified.

One boot: fio writes with crc32c verification through a thin volume that is larger than
its store; a live `bdev_lvol_resize` reaches the connected host, whose block device grows
(Namespace Attribute Changed AEN, then `nvme ns-rescan`); filling the store fails the
writes that need a new cluster (the kernel reports the Capacity Exceeded status as a
space allocation error) while what was written before still reads back unchanged. The
volume's reads and writes of allocated clusters are the C lane's (nvmf_get_stats).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from integration.target_proc import RunningTarget, free_port, listen_address

from .harness.vm import Guest
from .test_kernel_host import PRELUDE

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
    t = RunningTarget(tmp_path, cfg, cores=None)
    t.nvme_port = port  # type: ignore[attr-defined]
    t.start()
    try:
        t.rpc("bdev_lvol_create_lvstore", bdev_name="Pool0", lvs_name="lvs0", cluster_sz=MIB)
        t.rpc("bdev_lvol_create", lvs_name="lvs0", lvol_name="thin", size_in_mib=96,
              thin_provision=True)
        t.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "lvs0/thin"})
        yield t
    finally:
        t.kill()


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
