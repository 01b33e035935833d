"""Native NVMe multipath with ANA across two blocktarget processes (kernel 6.12 in QEMU).

Two targets on this host export the same subsystem NQN, serial, model and namespace
(nsid 1 with the same NGUID/UUID/EUI-64, NMIC shared, CMIC multi-controller + ANA) with
disjoint controller-id ranges (min_cntlid/max_cntlid), so the kernel merges the two
controllers into one subsystem with one namespace node and two paths.

Data coherence: both targets serve one shared file through the uring bdev (O_DIRECT on
ext4). A write acknowledged by either process is in the file (in the host kernel's page
cache at worst, which both processes share), so a read through the other path sees it;
nothing is cached in either process. The other option, target B forwarding to target A
through the remote NVMe/TCP bdev, would make A a single point of failure: killing A would
take both paths down, which is the opposite of what the test must show.

While fio writes with crc32c verification through the multipath node (round-robin over
both paths): (a) path A is set inaccessible by RPC: the target fails I/O there with the
ANA Inaccessible path status and sends an ANA change AEN, the kernel re-reads the ANA log
and stops using the path, I/O goes on through B; A is set optimized again and takes I/O
again; (b) target B is killed (SIGKILL): the kernel sees the connection drop, fails its
commands over to A and goes on. fio must end with zero verify errors.

Budget: one guest boot, about 40-70 s under TCG (timeout 150 s).
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.target_proc import RunningTarget, free_port, listen_address

from blocktarget.bdevs.uring import uring_unavailable_reason
from blocktarget.config import Settings

from .harness.vm import Guest

pytestmark = pytest.mark.timeout(240)  # the guest's own limit is 150 s; targets start in ~2 s

NQN = "nqn.2026-01.io.blocktarget:mpath"
SERIAL = "BTMPATH0001"
NS_UUID = "6f1c2a9e-4b7d-4e0a-9d3c-2b8e5f7a1c40"
NS_NGUID = "6f1c2a9e4b7d4e0a9d3c2b8e5f7a1c40"
NS_EUI64 = "0026b7a1c4000001"
FILE_MB = 64


def _config(port: int, backing: Path, cntlids: tuple[int, int]) -> dict:
    settings: dict = {}
    if hasattr(Settings(), "allowed_dirs"):  # file bdevs only inside allowed directories
        settings["allowed_dirs"] = [str(backing.parent)]
    return {
        "blocktarget": settings,
        "subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_uring_create",
                 "params": {"name": "Shared0", "filename": str(backing), "block_size": 512,
                            # both engines open O_DIRECT; threads where io_uring is barred
                            "engine": "threads" if uring_unavailable_reason() else "uring"}},
            ]},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                {"method": "nvmf_create_subsystem", "params": {
                    "nqn": NQN, "allow_any_host": True, "serial_number": SERIAL,
                    "ana_reporting": True, "max_namespaces": 4,
                    "min_cntlid": cntlids[0], "max_cntlid": cntlids[1]}},
                {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {
                    "bdev_name": "Shared0", "nsid": 1, "uuid": NS_UUID, "nguid": NS_NGUID,
                    "eui64": NS_EUI64}}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": listen_address(port)}},
            ]},
        ],
    }


class KillSwitch:
    """A line-based control port for the guest: "kill" SIGKILLs target B and answers
    "killed" once it is gone. The guest cannot signal host processes itself, and the
    kill must land while its fio is running."""

    def __init__(self, victim: RunningTarget) -> None:
        self.victim = victim
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2)
        self.port = self.sock.getsockname()[1]
        self.killed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("r").readline().strip()
                if line == "kill":
                    self.victim.kill()
                    self.killed.set()
                    conn.sendall(b"killed\n")
                else:
                    conn.sendall(b"unknown command\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RunningTarget, RunningTarget]]:
    backing = tmp_path / "shared.img"
    with open(backing, "wb") as f:  # allocated blocks: O_DIRECT never falls back
        f.write(bytes(FILE_MB << 20))
        os.fsync(f.fileno())
    targets = []
    try:
        for name, cntlids in (("a", (1, 0x7FFF)), ("b", (0x8000, 0xFFEF))):
            port = free_port()
            d = tmp_path / name
            d.mkdir()
            t = RunningTarget(d, _config(port, backing, cntlids), cores=None)
            t.nvme_port = port  # type: ignore[attr-defined]
            targets.append(t.start())
        yield targets[0], targets[1]
    finally:
        for t in targets:
            t.kill()


SCRIPT = r"""
set -u
echo 15 > /sys/module/nvme_core/parameters/admin_timeout
echo "MULTIPATH $(cat /sys/module/nvme_core/parameters/multipath)"
[ "$(cat /sys/module/nvme_core/parameters/multipath)" = Y ] || exit 9
rpc() {  # rpc <http port> <method> <params json>: plain bash (a python start costs ~2 s in TCG)
  local body='{"jsonrpc":"2.0","id":1,"method":"'$2'","params":'$3'}' resp
  exec 5<>/dev/tcp/$HOST_ADDR/$1 || return 1
  printf 'POST / HTTP/1.0\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' \
    ${#body} "$body" >&5
  resp=$(cat <&5); exec 5>&-
  case "$resp" in *'"error"'*) echo "rpc $2: $resp" >&2; return 1;; esac
  echo "$resp"; }
field() { sed -n 's/.*"'$1'": *\([0-9]*\).*/\1/p'; }
ops() {  # reads + writes the target's bdev has done
  local r; r=$(rpc $1 bdev_get_iostat '{"name":"Shared0"}') || return 1
  echo $(( $(echo "$r" | field num_read_ops) + $(echo "$r" | field num_write_ops) )); }
now() { date +%s.%N; }
set_ana() {  # set_ana <rpc port> <nvme port> <state>
  rpc $1 nvmf_subsystem_listener_set_ana_state '{"nqn":"'$NQN'","listen_address":{"trtype":"tcp","adrfam":"ipv4","traddr":"127.0.0.1","trsvcid":"'$2'"},"ana_state":"'$3'"}' > /dev/null; }
ctrl_of_port() { for c in /sys/class/nvme/nvme*; do
  [ "$(cat $c/subsysnqn)" = "$NQN" ] || continue
  case "$(cat $c/address)," in *trsvcid=$1,*) basename $c; return 0;; esac; done; return 1; }
path_state() { cat /sys/class/nvme/$1/nvme*c*n*/ana_state 2>/dev/null | head -1; }
wait_state() {  # wait_state <ctrl> <state>: the kernel's view of the path
  for i in $(seq 1 100); do [ "$(path_state $1)" = "$2" ] && return 0; sleep 0.1; done; return 1; }
alive() { kill -0 $FIO 2>/dev/null || { echo "fio failed before step $1"; exit 30; }; }

CONN="--ctrl-loss-tmo=5 --reconnect-delay=1 --keep-alive-tmo=5"
nvme connect -t tcp -a $HOST_ADDR -s $PORT_A -n $NQN $CONN || exit 10
nvme connect -t tcp -a $HOST_ADDR -s $PORT_B -n $NQN $CONN || exit 11
for i in $(seq 1 100); do
  ls /dev | grep -qE '^nvme[0-9]+n1$' && break; sleep 0.1; done
CA=$(ctrl_of_port $PORT_A) || exit 12
CB=$(ctrl_of_port $PORT_B) || exit 13
SUBSYS=$(for s in /sys/class/nvme-subsystem/*; do
  [ "$(cat $s/subsysnqn)" = "$NQN" ] && basename $s; done)
DEV=/dev/$(ls /sys/class/nvme-subsystem/$SUBSYS | grep -E '^nvme[0-9]+n1$' | head -1)
echo "CTRLS $CA $CB SUBSYS $SUBSYS DEV $DEV"
echo "CNTLIDS $(cat /sys/class/nvme/$CA/cntlid) $(cat /sys/class/nvme/$CB/cntlid)"
nvme list-subsys > list-subsys.txt
nvme list-subsys $DEV > list-subsys-ns.txt 2>&1
ls /dev | grep -E '^nvme[0-9]+n[0-9]+$' > blockdevs.txt
nvme id-ns $DEV > id-ns.txt
echo "STATES $(path_state $CA) $(path_state $CB)"
echo round-robin > /sys/class/nvme-subsystem/$SUBSYS/iopolicy || exit 14

# fio write+verify rounds of 8 MiB until told to stop, so I/O spans every step however
# fast this machine is. randrepeat=0: each round has its own seed, so a block left over
# from an earlier round (a lost write) fails the verify header check.
rm -f stop
( i=0; while [ ! -e stop ]; do
    fio --name=mp$i --filename=$DEV --rw=randwrite --bs=4k --size=8M \
      --offset=$(( (i % 7) * 8 ))M --ioengine=libaio --direct=1 --iodepth=8 --randrepeat=0 \
      --verify=crc32c --verify_fatal=1 --verify_backlog=512 --rate_iops=400 \
      --output=fio$i.txt || { echo "FIO_FAILED round $i"; exit 1; }
    i=$((i+1)); done; echo "FIO_ROUNDS $i" ) &
FIO=$!
sleep 3
a0=$(ops $RPC_A); b0=$(ops $RPC_B); sleep 2; a1=$(ops $RPC_A); b1=$(ops $RPC_B)
echo "BOTH a=$((a1-a0)) b=$((b1-b0))"
alive both

# (a) path A inaccessible by RPC: AEN -> ANA log -> the kernel stops using it
t0=$(now)
set_ana $RPC_A $PORT_A inaccessible || exit 20
wait_state $CA inaccessible || { echo "kernel never saw A inaccessible: $(path_state $CA)"; exit 21; }
echo "ANA_SEEN_S $(echo "$(now) - $t0" | bc 2>/dev/null || echo ?)"
a2=$(ops $RPC_A); b2=$(ops $RPC_B); sleep 3; a3=$(ops $RPC_A); b3=$(ops $RPC_B)
echo "INACCESSIBLE a=$((a3-a2)) b=$((b3-b2)) state=$(path_state $CA)"
alive inaccessible
set_ana $RPC_A $PORT_A optimized || exit 22
wait_state $CA optimized || exit 23
a4=$(ops $RPC_A); sleep 2; a5=$(ops $RPC_A)
echo "RESTORED a=$((a5-a4))"
alive restored

# (b) target B killed under load: the kernel fails its I/O over to A
exec 3<>/dev/tcp/$HOST_ADDR/$KILL_PORT; echo kill >&3; read -r ans <&3; exec 3>&-
echo "KILL $ans"
a6=$(ops $RPC_A); sleep 4; a7=$(ops $RPC_A)
echo "AFTER_KILL a=$((a7-a6)) b_state=$(cat /sys/class/nvme/$CB/state 2>/dev/null || echo gone)"
alive after_kill
touch stop
wait $FIO; rc=$?
echo "FIO_RC $rc"
nvme list-subsys > list-subsys-after.txt 2>&1
nvme disconnect -n $NQN
[ $rc = 0 ] || exit 31
echo DONE
"""


def test_ana_failover_between_two_targets(vm: Guest, pair: tuple[RunningTarget, RunningTarget]
                                          ) -> None:
    a, b = pair
    kill = KillSwitch(b)
    try:
        env = {"NQN": NQN, "PORT_A": str(a.nvme_port), "PORT_B": str(b.nvme_port),  # type: ignore[attr-defined]
               "RPC_A": str(a.http_port), "RPC_B": str(b.http_port),
               "KILL_PORT": str(kill.port)}
        res = vm.run(SCRIPT, env=env, timeout=150, extra_append=("nvme_core.multipath=Y",))
    finally:
        kill.close()
    res.check()
    out, rd = res.output, res.rundir
    assert "MULTIPATH Y" in out
    assert kill.killed.is_set() and "KILL killed" in out

    # one subsystem, two live paths (one per target), one namespace node
    subsys = (rd / "list-subsys.txt").read_text()
    assert subsys.count(f"NQN={NQN}") == 1, subsys
    assert len(re.findall(r"\+- nvme\d+ tcp .*live", subsys)) == 2, subsys
    for t in (a, b):
        assert f"trsvcid={t.nvme_port}" in subsys  # type: ignore[attr-defined]
    assert len((rd / "blockdevs.txt").read_text().split()) == 1
    cntlids = [int(x) for x in re.search(r"CNTLIDS (\d+) (\d+)", out).groups()]
    assert cntlids[0] < 0x8000 <= cntlids[1]  # disjoint ranges, so Linux accepts both
    idns = (rd / "id-ns.txt").read_text()
    assert re.search(r"^nguid\s+: " + NS_NGUID, idns, re.M), idns
    assert re.search(r"^nmic\s+: 0x1", idns, re.M)
    assert re.search(r"^anagrpid\s*: 1", idns, re.M)
    assert "STATES optimized optimized" in out

    def counts(tag: str) -> dict[str, int]:
        m = re.search(tag + r" a=(-?\d+)(?: b=(-?\d+))?", out)
        assert m, (tag, out)
        return {"a": int(m.group(1)), "b": int(m.group(2) or 0)}

    both = counts("BOTH")
    assert both["a"] > 0 and both["b"] > 0, both  # round-robin over both paths
    inacc = counts("INACCESSIBLE")
    assert inacc["a"] == 0 and inacc["b"] > 0, inacc  # everything moved to B
    assert counts("RESTORED")["a"] > 0  # A carries I/O again once optimized
    assert counts("AFTER_KILL")["a"] > 0  # B died: A carries everything
    rounds = int(re.search(r"FIO_ROUNDS (\d+)", out).group(1))
    assert rounds >= 1
    for i in range(rounds):
        fio = (rd / f"fio{i}.txt").read_text()
        assert "err= 0" in fio, fio
        assert "verify:" not in fio and "bad header" not in fio, fio
    assert "FIO_RC 0" in out and "DONE" in out
    # failover stayed below the block layer: no command error reached it
    assert not re.search(r"I/O Cmd|I/O error|Buffer I/O", res.console), res.console[-3000:]
    # target A logged no failure of its own
    assert "Traceback" not in a.log()
