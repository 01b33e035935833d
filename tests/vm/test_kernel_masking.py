"""Namespace masking seen by the Linux 6.12 kernel host (nvme-cli 2.3, in QEMU).

One boot: the host connects as HOST_A; of the subsystem's two namespaces it sees only the
auto-visible one (no block device, no entry in `nvme list-ns`, for the masked one);
`nvmf_ns_add_host` by RPC while it is connected makes the masked namespace appear (the
namespace-attribute event, then the kernel's rescan) and fio verifies through it;
`nvmf_ns_remove_host` makes it disappear again. A second connection as HOST_B to the same
subsystem never sees it. Budget: one boot, ~40-60 s under TCG.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.target_proc import RunningTarget, free_port, listen_address

from .harness.vm import Guest
from .test_kernel_host import PRELUDE, serve

NQN = "nqn.2026-01.io.blocktarget:masking"
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:a0a0a0a0-0000-4000-8000-0000000000a1"
HOSTID_A = "a0a0a0a0-0000-4000-8000-0000000000a1"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:a0a0a0a0-0000-4000-8000-0000000000b2"
HOSTID_B = "a0a0a0a0-0000-4000-8000-0000000000b2"


def _config(port: int) -> dict:
    return {"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "M0", "num_blocks": 16384, "block_size": 512}},
            {"method": "bdev_malloc_create",
             "params": {"name": "M1", "num_blocks": 4096, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "BTMASK01"}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M0", "nsid": 1}}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M1", "nsid": 2,
                                                  "no_auto_visible": True}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(port)}},
        ]},
    ]}


@pytest.fixture
def target(tmp_path: Path) -> Iterator[RunningTarget]:
    port = free_port()
    yield from serve(tmp_path, _config(port), nvme_port=port)


SCRIPT = r"""
set -x
nshost() { rpc '{"jsonrpc":"2.0","id":1,"method":"'$1'","params":{"nqn":"'$NQN'","nsid":2,"host":"'$HOST_A'"}}'; }
gone() {  # namespace $1 has no block device (waits up to 10 s for a removal)
  for i in $(seq 1 100); do
    found=0
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
      [ "$(cat $s/subsysnqn 2>/dev/null)" = "$NQN" ] || continue
      for b in $s/nvme*n*; do [ -e "$b/nsid" ] && [ "$(cat $b/nsid)" = "$1" ] && found=1; done
    done
    [ $found = 0 ] && return 0
    sleep 0.1
  done
  return 1
}
nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN --hostnqn=$HOST_A --hostid=$HOSTID_A || exit 10
dev1=$(nsdev $NQN 1) || exit 11
ctrl=$(ctrldev $NQN) || exit 12
sleep 1
nvme list-ns $ctrl > listns_before.txt || exit 13
gone 2 || exit 14
# shown to this host while connected: the event, the rescan, a block device
nshost nvmf_ns_add_host > add.txt || exit 15
grep -q '"result": *true' add.txt || exit 15
dev2=$(nsdev $NQN 2) || exit 16
nvme list-ns $ctrl > listns_after.txt || exit 17
echo "NS2 $(blockdev --getsize64 $dev2)"
fio --name=m --filename=$dev2 --rw=randwrite --bs=4k --size=4M --ioengine=libaio --direct=1 \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --output=fio.txt || exit 18
# another host of the same subsystem still does not see it
# (through the kernel's fabrics device: nvme-cli 2.3 refuses a second controller of a
#  subsystem it is connected to, "already connected", even with --duplicate-connect)
echo "transport=tcp,traddr=$HOST_ADDR,trsvcid=$PORT,nqn=$NQN,hostnqn=$HOST_B,hostid=$HOSTID_B" \
  > /dev/nvme-fabrics 2> connb.txt || exit 19
sleep 1
for c in /sys/class/nvme/nvme*; do
  [ "$(cat $c/subsysnqn)" = "$NQN" ] || continue
  echo "$(cat $c/hostnqn) $(nvme list-ns /dev/$(basename $c) | tr '\n' ' ')" >> views.txt
done
# hidden again: the block device goes
nshost nvmf_ns_remove_host > rm.txt || exit 20
grep -q '"result": *true' rm.txt || exit 20
gone 2 || exit 21
nvme disconnect -n $NQN || exit 22
echo DONE
"""


def test_kernel_host_sees_only_its_namespaces(vm: Guest, target: RunningTarget) -> None:
    env = {"RPC_PORT": str(target.http_port), "PORT": str(target.nvme_port),  # type: ignore[attr-defined]
           "NQN": NQN, "HOST_A": HOST_A, "HOSTID_A": HOSTID_A, "HOST_B": HOST_B,
           "HOSTID_B": HOSTID_B}
    res = vm.run(PRELUDE + SCRIPT, env=env, timeout=240)
    res.check()
    rd = res.rundir
    assert "DONE" in res.output
    before = (rd / "listns_before.txt").read_text()
    after = (rd / "listns_after.txt").read_text()
    assert "0x1" in before and "0x2" not in before, before
    assert "0x1" in after and "0x2" in after, after
    assert f"NS2 {4096 * 4096}" in res.output
    assert "err= 0" in (rd / "fio.txt").read_text()
    views = (rd / "views.txt").read_text().splitlines()
    by_host = {line.split()[0]: line for line in views}
    assert "0x2" in by_host[HOST_A] and "0x2" not in by_host[HOST_B], views
    sub = target.rpc("nvmf_get_subsystems", nqn=NQN)[0]
    assert {ns["nsid"]: ns.get("hosts") for ns in sub["namespaces"]} == {1: None, 2: []}
