#!/bin/bash
# Runs INSIDE the guest: Linux nvmet on 127.0.0.1 backed by brd, the kernel NVMe/TCP host
# connects to it, fio verifies data, then disconnects. Proves the guest's kernel host, nvme-cli
# and fio work, independently of our target. Env: PORT (4420), FIO_SIZE (4M).
set -euxo pipefail
NQN=nqn.2024-01.io.blocktarget:harness-loop
PORT=${PORT:-4420}
CFG=/sys/kernel/config/nvmet
test -b /dev/ram0
mkdir "$CFG/subsystems/$NQN"
echo 1 > "$CFG/subsystems/$NQN/attr_allow_any_host"
mkdir "$CFG/subsystems/$NQN/namespaces/1"
echo -n /dev/ram0 > "$CFG/subsystems/$NQN/namespaces/1/device_path"
echo 1 > "$CFG/subsystems/$NQN/namespaces/1/enable"
mkdir "$CFG/ports/1"
echo tcp > "$CFG/ports/1/addr_trtype"
echo ipv4 > "$CFG/ports/1/addr_adrfam"
echo 127.0.0.1 > "$CFG/ports/1/addr_traddr"
echo "$PORT" > "$CFG/ports/1/addr_trsvcid"
ln -s "$CFG/subsystems/$NQN" "$CFG/ports/1/subsystems/$NQN"

nvme discover -t tcp -a 127.0.0.1 -s "$PORT" | tee discover.txt
grep -q "subnqn: *$NQN" discover.txt
nvme connect -t tcp -a 127.0.0.1 -s "$PORT" -n "$NQN"
# With native multipath (6.12: on) the block device hangs off the subsystem, else the controller.
DEV=
for _ in $(seq 100); do
  for d in /sys/class/nvme-subsystem/* /sys/class/nvme/*; do
    [ "$(cat "$d/subsysnqn" 2>/dev/null)" = "$NQN" ] || continue
    for ns in "$d"/nvme*n1; do [ -b "/dev/${ns##*/}" ] && DEV=/dev/${ns##*/}; done
  done
  [ -n "$DEV" ] && break
  sleep 0.1
done
test -n "$DEV"
nvme list
fio --name=verify --filename="$DEV" --rw=randwrite --bs=4k --size="${FIO_SIZE:-4M}" \
    --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output=fio.txt
grep -E 'err= *0' fio.txt
nvme disconnect -n "$NQN" | tee disconnect.txt
grep -q 'disconnected 1 controller' disconnect.txt
echo NVMET_LOOPBACK_OK
