"""Ready means ready, with the Linux kernel host (issue 18).

The script users ran: start the target, wait for its RPC socket file, and connect at
once -- they got "connection refused" because the socket appeared before the NVMe/TCP
listeners. Here the target runs inside the guest (the guest sees the host's root, venv
included), a shell loop waits for the socket, and the kernel's `nvme connect` goes to
every listener of the config in parallel the moment it exists. Three fresh starts, each
a new race; every connect must succeed.
"""

from __future__ import annotations

import json
import sys

from .harness.vm import Guest

NQN_A = "nqn.2026-01.io.blocktarget:ready-a"
NQN_B = "nqn.2026-01.io.blocktarget:ready-b"
SOCK = "/tmp/bt-ready.sock"  # not in the run dir: 9p cannot hold a socket
PORTS = {NQN_A: (4420, 4421), NQN_B: (4422,)}


def config() -> dict:
    bdevs, nvmf = [], [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}}]
    for i, (nqn, ports) in enumerate(PORTS.items()):
        bdevs.append({"method": "bdev_malloc_create",
                      "params": {"name": f"M{i}", "num_blocks": 2048, "block_size": 512}})
        nvmf += [{"method": "nvmf_create_subsystem", "params": {"nqn": nqn,
                                                                 "allow_any_host": True}},
                 {"method": "nvmf_subsystem_add_ns",
                  "params": {"nqn": nqn, "namespace": {"bdev_name": f"M{i}"}}}]
        nvmf += [{"method": "nvmf_subsystem_add_listener", "params": {"nqn": nqn,
                  "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                                     "trsvcid": str(p)}}} for p in ports]
    return {"blocktarget": {"cores": [0], "rpc": {"unix": SOCK,
                                                     "http": "127.0.0.1:9009"},
                            "allowed_dirs": ["/tmp"]},
            "subsystems": [{"subsystem": "bdev", "config": bdevs},
                           {"subsystem": "nvmf", "config": nvmf}]}


CONNECTS = "\n".join(
    f"  nvme connect -t tcp -a 127.0.0.1 -s {p} -n {nqn} > c{p}.txt 2>&1 & pids=\"$pids $!\""
    for nqn, ports in PORTS.items() for p in ports)

SCRIPT = rf"""
set -u
PY=${{PY:?}}
for round in 1 2 3; do
  rm -f {SOCK}
  $PY -m blocktarget start -c cfg.json > target$round.log 2>&1 &
  TPID=$!
  while [ ! -S {SOCK} ]; do
    kill -0 $TPID 2>/dev/null || {{ cat target$round.log; echo TARGET_DIED; exit 3; }}
  done
  pids=""
{CONNECTS}
  ok=1
  for p in $pids; do wait $p || ok=0; done
  cat c*.txt
  [ $ok = 1 ] || {{ echo "CONNECT_REFUSED in round $round"; exit 4; }}
  n=$(grep -lE '^({NQN_A}|{NQN_B})$' /sys/class/nvme/nvme*/subsysnqn | wc -l)
  echo "round $round: $n controllers"
  [ "$n" = {sum(len(p) for p in PORTS.values())} ] || exit 5
  nvme disconnect-all > /dev/null 2>&1
  kill $TPID; wait $TPID || true
done
echo READY_KERNEL_OK
"""


def test_kernel_host_connects_the_instant_the_socket_exists(vm: Guest) -> None:
    res = vm.run(SCRIPT, timeout=300, files={"cfg.json": json.dumps(config())},
                 env={"PY": sys.executable}, modules=["nvme-tcp"])
    res.check()
    assert "READY_KERNEL_OK" in res.output, res.output
    assert "round 3: 3 controllers" in res.output
