"""The Linux kernel NVMe/TCP host (6.12, in QEMU) against a blocktarget on this host.

This is the peer the target exists for: nvme-cli and the kernel driver, unmodified. Each
test boots one guest and runs a script; the guest reaches the host's loopback as
10.0.2.2, including the target's HTTP RPC, which the scripts use to change the
configuration while the host is connected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
from integration.target_proc import RunningTarget, free_port, listen_address

from blocktarget.nvme import fastlane

from .harness.vm import Guest

NQN = "nqn.2026-01.io.blocktarget:vmtest"
LOCKED = "nqn.2026-01.io.blocktarget:locked"


def _config(port: int) -> dict:
    la = listen_address(port)
    return {
        "subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create",
                 "params": {"name": "M0", "num_blocks": 131072, "block_size": 512}},
                {"method": "bdev_malloc_create",
                 "params": {"name": "M1", "num_blocks": 8192, "block_size": 4096}},
                {"method": "bdev_null_create",
                 "params": {"name": "N0", "num_blocks": 1024, "block_size": 4096}},
            ]},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "BTVM0001"}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": la}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": LOCKED, "allow_any_host": False}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": LOCKED, "namespace": {"bdev_name": "N0"}}},
                {"method": "nvmf_subsystem_add_host",
                 "params": {"nqn": LOCKED, "host": "nqn.2014-08.org.nvmexpress:uuid:"
                            "00000000-0000-0000-0000-0000000000aa"}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": LOCKED, "listen_address": la}},
            ]},
        ]
    }


def serve(tmp_path, cfg: dict, **ports: int) -> Iterator[RunningTarget]:
    """A target process for a guest to reach, its ports as attributes (`nvme_port`...),
    killed after the test: the VM tests' target fixtures `yield from` this."""
    t = RunningTarget(tmp_path, cfg, cores=None)
    for name, port in ports.items():
        setattr(t, name, port)
    t.start()
    try:
        yield t
    finally:
        t.kill()


@pytest.fixture
def target(tmp_path) -> Iterator[RunningTarget]:
    port = free_port()
    yield from serve(tmp_path, _config(port), nvme_port=port)


# Shell helpers the guest scripts share: wait for a block device of our subsystem, and
# call the target's HTTP RPC from inside the guest.
PRELUDE = r"""
set -u
echo 15 > /sys/module/nvme_core/parameters/admin_timeout
rpc() { /usr/bin/python3 -c 'import json,sys,urllib.request as u
r=u.urlopen(u.Request(sys.argv[1],data=sys.argv[2].encode(),headers={"Content-Type":"application/json"}),timeout=20)
print(r.read().decode())' "http://$HOST_ADDR:$RPC_PORT/" "$1"; }
nsdev() {  # block device of namespace $2 of subsystem $1 (native multipath on 6.12)
  for i in $(seq 1 100); do
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
      [ "$(cat $s/subsysnqn 2>/dev/null)" = "$1" ] || continue
      for b in $s/nvme*n*; do
        [ -e "$b/nsid" ] && [ "$(cat $b/nsid)" = "$2" ] && { echo /dev/$(basename $b); return 0; }
      done
    done
    sleep 0.1
  done
  return 1
}
ctrldev() { for c in /sys/class/nvme/nvme*; do
  [ "$(cat $c/subsysnqn)" = "$1" ] && { echo /dev/$(basename $c); return 0; }; done; return 1; }
"""


def _run(vm: Guest, target: RunningTarget, script: str, timeout: float = 240,
         modules: tuple[str, ...] = ()):
    env = {"RPC_PORT": str(target.http_port), "PORT": str(target.nvme_port),  # type: ignore[attr-defined]
           "NQN": NQN, "LOCKED": LOCKED}
    return vm.run(PRELUDE + script, env=env, timeout=timeout, modules=modules)


def test_discover_connect_identify_fio_fs_aen(vm: Guest, target: RunningTarget) -> None:
    """The whole life of a plain connection, in one boot to keep CI time down."""
    res = _run(vm, target, r"""
set -x
nvme discover -t tcp -a $HOST_ADDR -s $PORT > disc.txt || exit 10
nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN || exit 11
dev=$(nsdev $NQN 1) || exit 12
ctrl=$(ctrldev $NQN) || exit 13
nvme list > list.txt
nvme id-ctrl $ctrl > idctrl.txt || exit 14
nvme id-ns $dev > idns.txt || exit 15
nvme id-ns $dev > /dev/null
fio --name=r4k --filename=$dev --rw=randwrite --bs=4k --size=8M --ioengine=libaio --direct=1 \
    --iodepth=16 --verify=crc32c --verify_fatal=1 --output=fio4k.txt || exit 16
fio --name=s128k --filename=$dev --rw=write --bs=128k --size=16M --ioengine=libaio --direct=1 \
    --iodepth=4 --verify=crc32c --verify_fatal=1 --output=fio128k.txt || exit 17
nvme smart-log $ctrl > smart.txt || exit 18
mkfs.ext4 -q -F $dev || exit 19
mkdir -p /tmp/mnt && mount $dev /tmp/mnt || exit 20
dd if=/dev/urandom of=/tmp/mnt/a.bin bs=64k count=40 status=none
cp /usr/bin/nvme /tmp/mnt/nvme.copy
(cd /tmp/mnt && md5sum a.bin nvme.copy) > sums.txt
umount /tmp/mnt || exit 21
nvme disconnect -n $NQN > disc1.txt || exit 22
sleep 0.5
nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN || exit 23
dev=$(nsdev $NQN 1) || exit 24
mount $dev /tmp/mnt || exit 25
(cd /tmp/mnt && md5sum -c $RUNDIR/sums.txt) || exit 26
umount /tmp/mnt
# a namespace added by RPC while connected must show up (AEN -> rescan)
rpc '{"jsonrpc":"2.0","id":1,"method":"nvmf_subsystem_add_ns","params":{"nqn":"'$NQN'","namespace":{"bdev_name":"M1","nsid":2}}}'
dev2=$(nsdev $NQN 2) || exit 27
echo "NS2 $dev2 $(blockdev --getsize64 $dev2)"
nvme disconnect -n $NQN || exit 28
# a host NQN not on the allow-list is refused
if nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $LOCKED 2> locked.txt; then exit 29; fi
echo DONE
""", modules=("ext4",))
    res.check()
    out = res.output
    rd = res.rundir
    disc = (rd / "disc.txt").read_text()
    assert f"subnqn:  {NQN}" in disc
    assert "nqn.2014-08.org.nvmexpress.discovery" in disc
    # the host is not on LOCKED's allow-list, so discovery must not show it
    assert LOCKED not in disc
    listing = (rd / "list.txt").read_text()
    assert "BTVM0001" in listing and "blocktarget" in listing
    idctrl = (rd / "idctrl.txt").read_text()
    assert re.search(r"^mn\s+: blocktarget\s*$", idctrl, re.M)
    assert re.search(r"^subnqn\s+: " + re.escape(NQN), idctrl, re.M)
    assert re.search(r"^fr\s+: 0\.\d", idctrl, re.M)
    idns = (rd / "idns.txt").read_text()
    assert re.search(r"^nsze\s+: 0x20000", idns, re.M)
    for f in ("fio4k.txt", "fio128k.txt"):
        text = (rd / f).read_text()
        assert "err= 0" in text, text
    smart = (rd / "smart.txt").read_text()
    written = int(re.search(r"Data Units Written\s+: ([\d,]+)", smart).group(1).replace(",", ""))
    writes = int(re.search(r"host_write_commands\s+: ([\d,]+)", smart).group(1).replace(",", ""))
    assert written >= 24 * 1024 * 1024 // 512000  # 8 MiB + 16 MiB written by fio
    assert writes >= 2048 + 128
    assert "temperature" in smart
    assert "disconnected 1 controller" in (rd / "disc1.txt").read_text()
    m = re.search(r"NS2 (\S+) (\d+)", out)
    assert m and int(m.group(2)) == 8192 * 4096
    assert "DONE" in out
    sub = target.rpc("nvmf_get_subsystems", nqn=NQN)[0]
    assert [ns["nsid"] for ns in sub["namespaces"]] == [1, 2]
    # the verified 4 KiB reads and writes above went through the C lane (malloc, no
    # digests); the 128 KiB writes through R2T on the Python path
    stats = target.rpc("nvmf_get_stats")
    lane = sum(g["c_lane_commands"] for g in stats["poll_groups"])
    if fastlane.AVAILABLE:
        assert lane >= 2048
    else:  # built without a compiler: the Python path served everything
        assert lane == 0
        assert os.environ.get("CI") != "true", "the C lane extension was not built"


def test_digests_and_two_io_queues(vm: Guest, target: RunningTarget) -> None:
    res = _run(vm, target, r"""
set -x
nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN -g -G --nr-io-queues 2 || exit 10
dev=$(nsdev $NQN 1) || exit 11
ls /sys/block/$(basename $dev)/mq/ 2>/dev/null | wc -l > queues.txt
ctrl=$(basename $(ctrldev $NQN))
cat /sys/class/nvme/$ctrl/queue_count > queue_count.txt 2>/dev/null || true
fio --name=dg --filename=$dev --rw=randwrite --bs=4k --size=4M --offset_increment=4M --ioengine=libaio --direct=1 \
    --iodepth=8 --numjobs=2 --verify=crc32c --verify_fatal=1 --output=fio.txt || exit 12
fio --name=dg128 --filename=$dev --rw=write --bs=128k --size=8M --ioengine=libaio --direct=1 \
    --iodepth=4 --verify=crc32c --verify_fatal=1 --output=fio128.txt || exit 13
nvme disconnect -n $NQN || exit 14
echo DONE
""")
    res.check()
    assert "err= 0" in (res.rundir / "fio.txt").read_text()
    assert "err= 0" in (res.rundir / "fio128.txt").read_text()
    qc = (res.rundir / "queue_count.txt").read_text().strip()
    if qc:
        assert int(qc) == 3  # admin + 2 I/O queues
    assert "DONE" in res.output


BACKENDS_NQN = "nqn.2026-01.io.blocktarget:lanes"


@pytest.mark.timeout(900)
def test_fio_verify_through_each_lane_backend(vm: Guest, tmp_path) -> None:
    """The kernel host's verified I/O on every backend the C lane serves, with and without
    digests: a uring bdev on a file (nsid 1), a split part of a malloc bdev (2), a
    passthru over a malloc bdev (3), and a null bdev (4, reads: nothing to verify). 4 KiB
    random writes (in capsule) and 128 KiB sequential ones (R2T and H2CData), each
    verified with crc32c; the lane must have served nearly all of them."""
    port = free_port()
    img = tmp_path / "lane.img"
    with open(img, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 64 << 20)
    la = listen_address(port)
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_uring_create",
             "params": {"name": "U0", "filename": str(img), "block_size": 4096}},
            {"method": "bdev_malloc_create",
             "params": {"name": "MB", "num_blocks": 32768, "block_size": 4096}},
            {"method": "bdev_split_create", "params": {"base_bdev": "MB", "split_count": 2}},
            {"method": "bdev_malloc_create",
             "params": {"name": "MP", "num_blocks": 16384, "block_size": 4096}},
            {"method": "bdev_passthru_create", "params": {"base_bdev_name": "MP", "name": "P0"}},
            {"method": "bdev_null_create",
             "params": {"name": "N0", "num_blocks": 16384, "block_size": 4096}},
        ]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": BACKENDS_NQN, "allow_any_host": True}},
            *({"method": "nvmf_subsystem_add_ns",
               "params": {"nqn": BACKENDS_NQN, "namespace": {"bdev_name": b, "nsid": i + 1}}}
              for i, b in enumerate(("U0", "MBp1", "P0", "N0"))),
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": BACKENDS_NQN, "listen_address": la}},
        ]}]}
    t = RunningTarget(tmp_path, cfg, cores=None)
    t.start()
    try:
        env = {"RPC_PORT": str(t.http_port), "PORT": str(port), "NQN": BACKENDS_NQN}
        res = vm.run(PRELUDE + r"""
set -x
for pass in plain digests; do
  if [ $pass = digests ]; then extra="-g -G"; else extra=""; fi
  nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN $extra || exit 10
  for ns in 1 2 3; do
    dev=$(nsdev $NQN $ns) || exit 11
    fio --name=r$ns --filename=$dev --rw=randwrite --bs=4k --size=2M --ioengine=libaio \
        --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 \
        --output=$pass-4k-$ns.txt || exit 12
    fio --name=s$ns --filename=$dev --rw=write --bs=128k --size=4M --ioengine=libaio \
        --direct=1 --iodepth=4 --verify=crc32c --verify_fatal=1 \
        --output=$pass-128k-$ns.txt || exit 13
  done
  dev=$(nsdev $NQN 4) || exit 14
  fio --name=n --filename=$dev --rw=randread --bs=4k --size=4M --ioengine=libaio --direct=1 \
      --iodepth=16 --output=$pass-null.txt || exit 15
  nvme disconnect -n $NQN || exit 16
  sleep 0.5
done
echo DONE
""", env=env, timeout=840)
        res.check()
        for f in sorted(res.rundir.glob("*-*.txt")):
            assert "err= 0" in f.read_text(), f.name
        assert "DONE" in res.output
        stats = t.rpc("nvmf_get_stats")
        lane = sum(g["c_lane_commands"] for g in stats["poll_groups"])
        # per pass: 3 x (512 writes + 512 verify reads + 32 + 32) + 1024 null reads
        expected = 2 * (3 * (512 * 2 + 32 * 2) + 1024)
        if fastlane.AVAILABLE:
            assert lane >= 0.9 * expected, (lane, expected)
            # and most of it without a Python call per read: the sockets lent to the
            # reactor's C poller (nvme/netpoll.py), taken back for what the lane leaves
            net = sum(g["net_pdus"] for g in stats["poll_groups"])
            lends = sum(g["net_lends"] for g in stats["poll_groups"])
            assert lends >= 2 and net >= 0.5 * expected, (net, lends, expected)
        else:
            assert lane == 0 and os.environ.get("CI") != "true", "the C lane is not built"
    finally:
        t.kill()


PMEM_NQN = "nqn.2026-01.io.blocktarget:pmem-lane"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("persist", ["msync", "flush"])
def test_fio_verify_through_pmem_lane(vm: Guest, tmp_path, persist: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel host's verified I/O on pmem pools through the C lane (the BTT in C,
    csrc/be_pmem.c): a pool (nsid 1) and the second half of a split pool (2, an offset
    remap), with and without digests, 4 KiB random writes in capsule and 128 KiB
    sequential ones by R2T, each verified with crc32c; the lane must have served nearly
    all of them. `persist`: PMEM_IS_PMEM_FORCE 0 (msync, as tmpfs is) or 1 (cache-line
    flushes and a fence). The pools are consistent afterwards."""
    from blocktarget.bdevs import pmem

    if not pmem.libpmem_available():
        pytest.skip("blocktarget._pmem not built (libpmem-dev missing)")
    monkeypatch.setenv("PMEM_IS_PMEM_FORCE", "1" if persist == "flush" else "0")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    pools = [os.path.join(shm, f"bt-vm-pmem-{os.getpid()}-{i}") for i in range(2)]
    for path in pools:
        if os.path.exists(path):
            os.unlink(path)
    pmem.create_pool_file(pools[0], 4096, 4096, lanes=2)
    pmem.create_pool_file(pools[1], 8192, 4096, lanes=2, free_per_lane=8)
    port = free_port()
    la = listen_address(port)
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_pmem_create", "params": {"name": "PM0", "pmem_file": pools[0]}},
            {"method": "bdev_pmem_create", "params": {"name": "PM1", "pmem_file": pools[1]}},
            {"method": "bdev_split_create", "params": {"base_bdev": "PM1", "split_count": 2}},
        ]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": PMEM_NQN, "allow_any_host": True}},
            *({"method": "nvmf_subsystem_add_ns",
               "params": {"nqn": PMEM_NQN, "namespace": {"bdev_name": b, "nsid": i + 1}}}
              for i, b in enumerate(("PM0", "PM1p1"))),
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": PMEM_NQN, "listen_address": la}},
        ]}]}
    t = RunningTarget(tmp_path, cfg, cores=None)
    t.start()
    try:
        info = t.rpc("bdev_get_bdevs", name="PM0")[0]["driver_specific"]["pmem"]
        assert info["is_pmem"] is (persist == "flush")
        env = {"RPC_PORT": str(t.http_port), "PORT": str(port), "NQN": PMEM_NQN}
        res = vm.run(PRELUDE + r"""
set -x
for pass in plain digests; do
  if [ $pass = digests ]; then extra="-g -G"; else extra=""; fi
  nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN $extra || exit 10
  for ns in 1 2; do
    dev=$(nsdev $NQN $ns) || exit 11
    fio --name=r$ns --filename=$dev --rw=randwrite --bs=4k --size=2M --ioengine=libaio \
        --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 \
        --output=$pass-4k-$ns.txt || exit 12
    fio --name=s$ns --filename=$dev --rw=write --bs=128k --size=4M --ioengine=libaio \
        --direct=1 --iodepth=4 --verify=crc32c --verify_fatal=1 \
        --output=$pass-128k-$ns.txt || exit 13
  done
  nvme disconnect -n $NQN || exit 16
  sleep 0.5
done
echo DONE
""", env=env, timeout=840)
        res.check()
        for f in sorted(res.rundir.glob("*-*.txt")):
            assert "err= 0" in f.read_text(), f.name
        assert "DONE" in res.output
        stats = t.rpc("nvmf_get_stats")
        lane = sum(g["c_lane_commands"] for g in stats["poll_groups"])
        sent = sum(g["c_pmem_sent"] for g in stats["poll_groups"])
        # per pass: 2 x (512 writes + 512 verify reads + 32 + 32)
        expected = 2 * 2 * (512 * 2 + 32 * 2)
        print(f"pmem ({persist}): {lane} commands in the C lane, {expected} verified I/Os, "
              f"{sent} of the 128 verify reads of 128 KiB sent from the pools' blocks")
        if fastlane.AVAILABLE and pmem.c_engine_available():
            assert lane >= 0.9 * expected, (lane, expected)
            # (those over a socket lent to the C poller with nothing queued before them)
            assert sent >= 64, sent
        else:
            assert lane == 0 and os.environ.get("CI") != "true", "the C lane is not built"
    finally:
        t.kill()
    for path in pools:
        pool, fd = pmem.open_pool(path)
        try:
            assert pool.check() == []
        finally:
            pool.close()
            os.close(fd)
            os.unlink(path)
