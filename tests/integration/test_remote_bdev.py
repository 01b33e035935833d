"""A remote NVMe/TCP bdev between two real target processes.

Target A exports a malloc bdev; target B attaches it with bdev_nvme_attach_controller and
exports it again; blocktarget's initiator talks to B only. That is the replication
building block of DESIGN §8, so the tests follow what an operator will meet: data
through the chain, statuses through the chain (B's own checks and A's failures),
save_config/restart of B, A dying under B, and the two ways back (reset in place, or
detach and attach).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blocktarget.host.connection import NvmeStatusError
from blocktarget.host.controller import connect
from blocktarget.rpc_client import RpcCallError

from .target_proc import Launcher, RunningTarget, config, free_port, listen_address, malloc

NQN_A = "nqn.2026-01.io.test:remote-a"
NQN_B = "nqn.2026-01.io.test:remote-b"
BS = 512
NOT_READY = 0x082
LBA_OUT_OF_RANGE = 0x080


def exported(nqn: str, bdev: str, port: int, transport: dict[str, Any] | None = None
             ) -> list[dict[str, Any]]:
    return [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP", **(transport or {})}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": True}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": nqn,
                                                       "namespace": {"bdev_name": bdev}}},
        {"method": "nvmf_subsystem_add_listener",
         "params": {"nqn": nqn, "listen_address": listen_address(port)}},
    ]


def start_a(launcher: Launcher, port: int, *, error_bdev: bool = False,
            transport: dict[str, Any] | None = None) -> RunningTarget:
    bdevs = [malloc("M0", 8192, BS)]
    name = "M0"
    if error_bdev:
        bdevs.append({"method": "bdev_error_create", "params": {"base_name": "M0"}})
        name = "EE_M0"
    return launcher(config(bdevs, exported(NQN_A, name, port, transport)))


def attach(b: RunningTarget, port_a: int, name: str = "Nvme0") -> list[str]:
    return b.rpc("bdev_nvme_attach_controller", name=name, trtype="tcp", adrfam="ipv4",
                 traddr="127.0.0.1", trsvcid=str(port_a), subnqn=NQN_A)


def export_b(b: RunningTarget, port_b: int, bdev: str = "Nvme0n1") -> None:
    b.rpc("nvmf_create_subsystem", nqn=NQN_B, allow_any_host=True)
    b.rpc("nvmf_subsystem_add_ns", nqn=NQN_B, namespace={"bdev_name": bdev})
    b.rpc("nvmf_subsystem_add_listener", nqn=NQN_B, listen_address=listen_address(port_b))


async def write_read_verify(port: int, nqn: str, writes: dict[int, bytes], *,
                            queues: int = 2) -> None:
    ctrl = await connect("127.0.0.1", port, nqn, nr_io_queues=queues, timeout=15)
    try:
        await asyncio.gather(*(ctrl.write(1, lba, d) for lba, d in writes.items()))
        for lba, data in writes.items():
            for qid in range(1, queues + 1):
                got = await ctrl.read(1, lba, len(data) // BS, qid=qid)
                assert bytes(got) == data, f"lba {lba} via qid {qid}"
    finally:
        await ctrl.disconnect()


async def read_back(port: int, nqn: str, writes: dict[int, bytes]) -> None:
    ctrl = await connect("127.0.0.1", port, nqn, timeout=15)
    try:
        for lba, data in writes.items():
            assert bytes(await ctrl.read(1, lba, len(data) // BS)) == data, f"lba {lba}"
    finally:
        await ctrl.disconnect()


async def status_of(port: int, nqn: str, op: str, lba: int, nlb: int = 1) -> int:
    """The NVMe status (sct << 8 | sc) of one command through the chain, 0 for success."""
    ctrl = await connect("127.0.0.1", port, nqn, timeout=15)
    try:
        if op == "read":
            await ctrl.read(1, lba, nlb)
        else:
            await ctrl.write(1, lba, os.urandom(nlb * BS))
        return 0
    except NvmeStatusError as exc:
        return exc.status & 0x7FF
    finally:
        await ctrl.close()


def wait_for(fn: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def controller(b: RunningTarget, name: str = "Nvme0") -> dict[str, Any]:
    return b.rpc("bdev_nvme_get_controllers", name=name)[0]["ctrlrs"][0]


def test_data_through_a_remote_bdev(running_target: Launcher, tmp_path: Path) -> None:
    pa, pb = free_port(), free_port()
    a = start_a(running_target, pa)
    # every core: one I/O queue per reactor
    b = running_target(config(), cores=sorted(os.sched_getaffinity(0)))
    assert attach(b, pa) == ["Nvme0n1"]
    n1 = b.rpc("bdev_get_bdevs", name="Nvme0n1")[0]
    m0 = a.rpc("bdev_get_bdevs", name="M0")[0]
    assert (n1["num_blocks"], n1["block_size"]) == (m0["num_blocks"], m0["block_size"])
    assert n1["uuid"] == m0["uuid"], "the namespace keeps its identity through the chain"
    assert n1["driver_specific"]["nvme"][0]["state"] == "enabled"
    assert n1["driver_specific"]["nvme"][0]["trid"]["trsvcid"] == str(pa)
    export_b(b, pb)

    writes = {0: os.urandom(4096), 77: os.urandom(128 * 1024), 8191: os.urandom(BS)}
    asyncio.run(write_read_verify(pb, NQN_B, writes))
    asyncio.run(read_back(pa, NQN_A, writes))  # it really is on A
    ctrl = controller(b)
    reactors = len(b.rpc("framework_get_reactors")["reactors"])
    assert ctrl["state"] == "enabled" and ctrl["io_queues_granted"] == reactors + 1
    used = [q for q in ctrl["io_queues"].values() if q["commands"]]
    assert len(used) == min(reactors, 2), "each of B's reactors used its own queue"
    assert all(q["state"] == "ready" and q["errors"] == 0 for q in used)

    # B's config brings the remote bdev (and the export of it) back after a restart
    saved = b.rpc("save_config")
    bdev_calls = next(s["config"] for s in saved["subsystems"] if s["subsystem"] == "bdev")
    assert bdev_calls == [{"method": "bdev_nvme_attach_controller", "params": {
        "name": "Nvme0", "trtype": "TCP", "adrfam": "ipv4", "traddr": "127.0.0.1",
        "trsvcid": str(pa), "subnqn": NQN_A, "hdgst": False, "ddgst": False,
        "hostnqn": ctrl["host"]["nqn"]}}]
    assert b.stop() == 0
    b2 = running_target(json.loads(json.dumps(saved)), cores=None)
    asyncio.run(read_back(pb, NQN_B, writes))
    assert b2.rpc("bdev_get_bdevs", name="Nvme0n1")[0]["uuid"] == n1["uuid"]

    # detach is refused while exported, then releases A's controller
    with pytest.raises(RpcCallError) as ei:
        b2.rpc("bdev_nvme_detach_controller", name="Nvme0")
    assert ei.value.code == -16
    b2.rpc("nvmf_delete_subsystem", nqn=NQN_B)
    assert b2.rpc("bdev_nvme_detach_controller", name="Nvme0") is True
    assert b2.rpc("bdev_nvme_get_controllers") == []
    assert b2.rpc("bdev_get_bdevs") == []
    assert a.running()


def test_errors_propagate_through_the_chain(running_target: Launcher) -> None:
    pa, pb = free_port(), free_port()
    a = start_a(running_target, pa, error_bdev=True)
    b = running_target(config())
    attach(b, pa)
    export_b(b, pb)
    # B knows the size, so an LBA past the end is refused by B exactly as A would
    assert asyncio.run(status_of(pb, NQN_B, "read", 8191, 2)) == LBA_OUT_OF_RANGE
    assert asyncio.run(status_of(pb, NQN_B, "write", 8192)) == LBA_OUT_OF_RANGE
    # a failure produced by A's device reaches the host with A's status
    a.rpc("bdev_error_inject_error", name="EE_M0", io_type="read", error_type="failure",
          num=1, status="UNRECOVERED_READ_ERROR")
    assert asyncio.run(status_of(pb, NQN_B, "read", 5)) == 0x281
    a.rpc("bdev_error_inject_error", name="EE_M0", io_type="write",
          error_type="nvme_failure", nvme_sct=2, nvme_sc=0x80, num=1)
    assert asyncio.run(status_of(pb, NQN_B, "write", 5)) == 0x280
    assert asyncio.run(status_of(pb, NQN_B, "read", 5)) == 0, "num=1: only one of each"
    ctrl = controller(b)
    assert ctrl["state"] == "enabled", "command errors do not fail the controller"
    assert sum(q["errors"] for q in ctrl["io_queues"].values()) == 2


def test_remote_target_dies_then_reset_and_reattach(running_target: Launcher) -> None:
    pa, pb = free_port(), free_port()
    a = start_a(running_target, pa)
    b = running_target(config())
    attach(b, pa)
    export_b(b, pb)
    asyncio.run(write_read_verify(pb, NQN_B, {0: os.urandom(4096)}, queues=1))

    a.kill()  # kill -9: no shutdown, the sockets just close
    failed = wait_for(lambda: controller(b)["state"] == "failed" and controller(b),
                      "B to notice that A is gone")
    assert failed["failure_reason"]
    assert asyncio.run(status_of(pb, NQN_B, "read", 0)) == NOT_READY
    assert asyncio.run(status_of(pb, NQN_B, "write", 0)) == NOT_READY
    ds = b.rpc("bdev_get_bdevs", name="Nvme0n1")[0]["driver_specific"]["nvme"][0]
    assert ds["state"] == "failed" and ds["failure_reason"]
    with pytest.raises(RpcCallError) as ei:
        b.rpc("bdev_nvme_reset_controller", name="Nvme0")
    assert ei.value.code == -5 and "cannot reset" in ei.value.message
    assert asyncio.run(status_of(pb, NQN_B, "read", 0)) == NOT_READY, "B stays usable"

    # A comes back (malloc: empty); a reset reconnects without touching B's export
    a2 = start_a(running_target, pa)
    b.rpc("bdev_nvme_reset_controller", name="Nvme0")
    assert controller(b)["state"] == "enabled"
    data = {9: os.urandom(2048)}
    asyncio.run(write_read_verify(pb, NQN_B, data, queues=1))
    asyncio.run(read_back(pa, NQN_A, data))

    # the other way back: A dies again, the operator detaches and attaches
    a2.kill()
    wait_for(lambda: controller(b)["state"] == "failed", "the second failure")
    b.rpc("nvmf_subsystem_remove_ns", nqn=NQN_B, nsid=1)
    b.rpc("bdev_nvme_detach_controller", name="Nvme0")  # A is dead: must not hang
    start_a(running_target, pa)
    assert attach(b, pa) == ["Nvme0n1"]
    b.rpc("nvmf_subsystem_add_ns", nqn=NQN_B, namespace={"bdev_name": "Nvme0n1"})
    asyncio.run(write_read_verify(pb, NQN_B, data, queues=1))


def test_small_remote_queues_and_transfers(running_target: Launcher) -> None:
    """A grants one I/O queue and 8 KiB transfers; B has two reactors and takes 32 KiB
    commands: reactor 1 borrows reactor 0's queue, and every command is split in four."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("needs two cores")
    pa, pb = free_port(), free_port()
    start_a(running_target, pa, transport={"max_io_qpairs_per_ctrlr": 1, "max_io_size": 8192})
    b = running_target(config(), cores=cores)
    attach(b, pa)
    export_b(b, pb)
    # two host queues land on B's two reactors; both must reach A over its one queue
    writes = {i * 256: os.urandom(32768) for i in range(4)}
    asyncio.run(write_read_verify(pb, NQN_B, writes, queues=2))
    asyncio.run(read_back(pa, NQN_A, {lba + 8: d[4096:8192] for lba, d in writes.items()}))
    ctrl = controller(b)
    assert ctrl["io_queues_granted"] == 1
    assert list(ctrl["io_queues"]) == ["0"], "reactor 1 borrowed reactor 0's queue"
    # each 32 KiB write and read (on two host queues) became four 8 KiB commands
    assert ctrl["io_queues"]["0"]["commands"] == len(writes) * 3 * 4
    chans = b.rpc("bdev_get_iostat", name="Nvme0n1", per_channel=True)["bdevs"][0]["channels"]
    assert sorted(c["reactor"] for c in chans if c["num_read_ops"]) == [0, 1]


def test_attach_refusals(running_target: Launcher) -> None:
    pa = free_port()
    start_a(running_target, pa)
    b = running_target(config())

    def refused(**params: Any) -> RpcCallError:
        base = {"name": "Nvme0", "trtype": "tcp", "traddr": "127.0.0.1",
                "trsvcid": str(pa), "subnqn": NQN_A}
        with pytest.raises(RpcCallError) as ei:
            b.rpc("bdev_nvme_attach_controller", **{**base, **params})
        return ei.value

    # PCIe is the VFIO driver's: refused while it is not in the build, else its own error
    e = refused(trtype="PCIe", traddr="0000:ff:1f.7")
    assert "VFIO" in e.message or "0000:ff:1f.7" in e.message, e.message
    e = refused(trtype="rdma")
    assert e.code == -32602 and "TCP" in e.message
    e = refused(trsvcid=str(free_port()))
    assert e.code == -5 and "cannot attach" in e.message
    e = refused(subnqn="nqn.2026-01.io.test:nobody")
    assert e.code == -5 and "cannot attach" in e.message
    e = refused(trsvcid="http")
    assert e.code == -32602
    assert b.rpc("bdev_nvme_get_controllers") == [] and b.rpc("bdev_get_bdevs") == []
    attach(b, pa)
    e = refused()
    assert e.code == -17
    b.rpc("bdev_malloc_create", name="Nvme1n1", num_blocks=8, block_size=512)
    e = refused(name="Nvme1")
    assert e.code == -17 and "Nvme1n1" in e.message
    assert [c["name"] for c in b.rpc("bdev_nvme_get_controllers")] == ["Nvme0"]
    with pytest.raises(RpcCallError) as ei:
        b.rpc("bdev_nvme_detach_controller", name="Nvme9")
    assert ei.value.code == -19
    with pytest.raises(RpcCallError) as ei:
        b.rpc("bdev_nvme_get_controllers", name="Nvme9")
    assert ei.value.code == -19


def test_spdk_client_attaches_and_detaches(running_target: Launcher) -> None:
    spdk_rpc = Path(sys.executable).with_name("spdk-rpc")
    if not spdk_rpc.exists():
        pytest.skip("SPDK's client (PyPI spdk) is not installed")
    pa = free_port()
    start_a(running_target, pa)
    b = running_target(config())

    def run(*args: str) -> str:
        r = subprocess.run([str(spdk_rpc), "-s", b.sock_path, *args], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    # exactly what SPDK's CLI sends, all its defaulted flags included
    out = run("bdev_nvme_attach_controller", "-b", "Nvme0", "-t", "tcp", "-a", "127.0.0.1",
              "-f", "ipv4", "-s", str(pa), "-n", NQN_A)
    assert out.split() == ["Nvme0n1"]
    ctrls = json.loads(run("bdev_nvme_get_controllers", "-n", "Nvme0"))
    assert ctrls[0]["ctrlrs"][0]["trid"]["subnqn"] == NQN_A
    run("bdev_nvme_detach_controller", "Nvme0")
    assert b.rpc("bdev_get_bdevs") == []
