"""Virtual bdev stacks in a real target process: built by RPC, saved, restarted, exported.

The unit tests drive the stacking code through channels; here the same stacks are built
the way an operator builds them (RPC, SPDK names and the generic bdev_create), written by
save_config and brought back by a restart, and exported over NVMe/TCP to blocktarget's
initiator, so a raid1's mirror is checked with data that crossed the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blocktarget.host.connection import NvmeStatusError
from blocktarget.host.controller import connect
from blocktarget.rpc_client import RpcCallError

from .target_proc import Launcher, RunningTarget, config, free_port, listen_address, malloc

NQN = "nqn.2026-01.io.test:stack"
LEG_NQN = "nqn.2026-01.io.test:leg"


def export(t: RunningTarget, nqn: str, bdev: str, port: int) -> None:
    t.rpc("nvmf_create_subsystem", nqn=nqn, allow_any_host=True)
    t.rpc("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": bdev})
    t.rpc("nvmf_subsystem_add_listener", nqn=nqn, listen_address=listen_address(port))


def bdev_view(t: RunningTarget) -> list[dict[str, Any]]:
    return [{k: b[k] for k in ("name", "uuid", "block_size", "num_blocks", "claimed_by",
                               "product_name", "driver_specific")}
            for b in t.rpc("bdev_get_bdevs")]


def test_stack_by_rpc_survives_save_and_restart(running_target: Launcher, tmp_path: Path
                                                ) -> None:
    first = running_target(config([malloc("M0", 2048), malloc("M1", 2048)]))
    assert first.rpc("bdev_error_create", base_name="M1") == "EE_M1"
    first.http_rpc("bdev_raid_create", name="R0", raid_level="raid1",
                   base_bdevs=["M0", "EE_M1"])
    assert first.rpc("bdev_split_create", base_bdev="R0", split_count=2) == ["R0p0", "R0p1"]
    first.rpc("bdev_create", type="delay", base_bdev_name="R0p1", name="D0",
              avg_read_latency=100, p99_read_latency=1000, avg_write_latency=200,
              p99_write_latency=2000)
    first.rpc("bdev_delay_update_latency", delay_bdev_name="D0", latency_type="avg_write",
              latency_us=300)
    first.rpc("bdev_passthru_create", base_bdev_name="D0", name="P0")
    # an error bdev's injection is test state: it is not saved, and must not break saving
    first.rpc("bdev_error_inject_error", name="EE_M1", io_type="read", error_type="failure",
              num=5)
    before = bdev_view(first)
    assert {b["name"]: b["claimed_by"] for b in before} == {
        "M0": "raid1 R0", "M1": "error EE_M1", "EE_M1": "raid1 R0", "R0": "split R0",
        "R0p0": None, "R0p1": "delay D0", "D0": "passthru P0", "P0": None}

    with pytest.raises(RpcCallError) as ei:
        first.rpc("bdev_malloc_delete", name="M0")
    assert ei.value.code == -16

    saved = first.rpc("save_config")
    bdev_calls = next(s["config"] for s in saved["subsystems"] if s["subsystem"] == "bdev")
    assert [c["method"] for c in bdev_calls] == [
        "bdev_malloc_create", "bdev_malloc_create", "bdev_error_create", "bdev_raid_create",
        "bdev_split_create", "bdev_delay_create", "bdev_passthru_create"]
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    assert first.stop() == 0

    second = running_target(json.loads(path.read_text()))
    after = bdev_view(second)
    for b in before + after:  # the injection counter is runtime state, not identity
        b["driver_specific"].get("error", {}).pop("injections", None)
    assert after == before
    assert second.rpc("save_config")["subsystems"] == saved["subsystems"]


async def _verify_through(port: int, nqn: str, writes: dict[int, bytes]) -> None:
    ctrl = await connect("127.0.0.1", port, nqn, nr_io_queues=2, timeout=15)
    try:
        for lba, data in writes.items():
            await ctrl.write(1, lba, data)
        await ctrl.flush(1)
        for lba, data in writes.items():
            assert bytes(await ctrl.read(1, lba, len(data) // 512)) == data
    finally:
        await ctrl.disconnect()


async def _read_back(port: int, nqn: str, writes: dict[int, bytes]) -> None:
    ctrl = await connect("127.0.0.1", port, nqn, timeout=15)
    try:
        for lba, data in writes.items():
            assert bytes(await ctrl.read(1, lba, len(data) // 512)) == data, f"lba {lba}"
    finally:
        await ctrl.disconnect()


def test_raid1_exported_mirrors_every_write(running_target: Launcher) -> None:
    t = running_target(config([malloc("M0", 4096), malloc("M1", 4096)]),
                       cores=sorted(os.sched_getaffinity(0)))
    t.rpc("bdev_raid_create", name="R0", raid_level="raid1", base_bdevs=["M0", "M1"])
    port = free_port()
    export(t, NQN, "R0", port)
    writes = {0: os.urandom(4096), 100: os.urandom(64 * 1024), 4095: os.urandom(512)}
    asyncio.run(_verify_through(port, NQN, writes))
    stats = {b["name"]: b for b in t.rpc("bdev_get_iostat")["bdevs"]}
    assert stats["M0"]["num_write_ops"] == stats["M1"]["num_write_ops"] == 3
    assert stats["M0"]["num_read_ops"] + stats["M1"]["num_read_ops"] == 3

    # take the mirror apart and read each leg on its own: both hold every write
    t.rpc("nvmf_delete_subsystem", nqn=NQN)
    t.rpc("bdev_raid_delete", name="R0")
    for i, leg in enumerate(("M0", "M1")):
        p = free_port()
        export(t, f"{LEG_NQN}{i}", leg, p)
        asyncio.run(_read_back(p, f"{LEG_NQN}{i}", writes))


async def _degraded_io(port: int) -> tuple[bytes, bytes]:
    ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
    try:
        data = os.urandom(8192)
        await ctrl.write(1, 8, data)
        reads = [bytes(await ctrl.read(1, 8, 16)) for _ in range(4)]
        assert all(r == data for r in reads), "a failed leg must not show through the mirror"
        return data, reads[0]
    finally:
        await ctrl.disconnect()


async def _offline_io(port: int) -> int:
    ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
    try:
        with pytest.raises(NvmeStatusError) as ei:
            await ctrl.read(1, 8, 1)
        return ei.value.status
    finally:
        await ctrl.disconnect()


def test_raid1_degrades_under_injected_errors_while_exported(running_target: Launcher) -> None:
    t = running_target(config([malloc("M0", 1024), malloc("M1", 1024)]))
    t.rpc("bdev_error_create", base_name="M0")
    t.rpc("bdev_error_create", base_name="M1")
    t.rpc("bdev_raid_create", name="R0", raid_level="raid1", base_bdevs=["EE_M0", "EE_M1"])
    port = free_port()
    export(t, NQN, "R0", port)
    t.rpc("bdev_error_inject_error", name="EE_M1", io_type="read", error_type="failure",
          num=1, status="UNRECOVERED_READ_ERROR")
    asyncio.run(_degraded_io(port))
    raid = t.rpc("bdev_raid_get_bdevs", category="degraded")
    assert [r["name"] for r in raid] == ["R0"]
    assert [b["state"] for b in raid[0]["base_bdevs_list"]] == ["online", "failed"]
    assert t.rpc("bdev_get_bdevs", name="R0")[0]["driver_specific"]["raid"]["degraded"]
    # the last leg fails too: now the host sees the media error
    t.rpc("bdev_error_inject_error", name="EE_M0", io_type="read", error_type="failure",
          num=1, status="UNRECOVERED_READ_ERROR")
    status = asyncio.run(_offline_io(port))
    assert status & 0x7FF == 0x281
    assert [r["name"] for r in t.rpc("bdev_raid_get_bdevs", category="offline")] == ["R0"]


SPDK_RPC = str(Path(sys.executable).with_name("spdk-rpc"))


def spdk_rpc(t: RunningTarget, *args: str) -> str:
    """SPDK's own client, unmodified, as SPDK test scripts drive virtual bdevs."""
    r = subprocess.run([SPDK_RPC, "-s", t.sock_path, *args], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"spdk-rpc {' '.join(args)}:\n{r.stdout}{r.stderr}"
    return r.stdout


def test_spdk_client_drives_virtual_bdevs(running_target: Launcher) -> None:
    if not Path(SPDK_RPC).exists():
        pytest.skip("SPDK's client (PyPI spdk) is not installed")
    t = running_target(config([malloc("M0", 2048), malloc("M1", 2048), malloc("M2", 256)]))
    assert spdk_rpc(t, "bdev_error_create", "M1").strip() == "EE_M1"
    spdk_rpc(t, "bdev_raid_create", "-n", "R0", "-r", "raid1", "-b", "M0 EE_M1")
    assert spdk_rpc(t, "bdev_split_create", "R0", "2").split() == ["R0p0", "R0p1"]
    spdk_rpc(t, "bdev_delay_create", "-b", "R0p0", "-d", "D0", "-r", "10", "-t", "100",
             "-w", "20", "-n", "200")
    spdk_rpc(t, "bdev_delay_update_latency", "D0", "p99_write", "300")
    spdk_rpc(t, "bdev_passthru_create", "-b", "M2", "-p", "P0")
    spdk_rpc(t, "bdev_error_inject_error", "EE_M1", "write", "failure", "-n", "3")
    spdk_rpc(t, "bdev_error_inject_error", "EE_M1", "read", "nvme_failure", "--nvme-sct", "2",
             "--nvme-sc", "129", "-n", "1")
    raids = json.loads(spdk_rpc(t, "bdev_raid_get_bdevs", "online"))
    assert [r["name"] for r in raids] == ["R0"] and raids[0]["raid_level"] == "raid1"
    delay = t.rpc("bdev_get_bdevs", name="D0")[0]["driver_specific"]["delay"]
    assert delay["p99_write_latency"] == 300
    spdk_rpc(t, "bdev_passthru_delete", "P0")
    spdk_rpc(t, "bdev_delay_delete", "D0")
    spdk_rpc(t, "bdev_split_delete", "R0")
    spdk_rpc(t, "bdev_raid_delete", "R0")
    spdk_rpc(t, "bdev_error_delete", "EE_M1")
    assert sorted(b["name"] for b in t.rpc("bdev_get_bdevs")) == ["M0", "M1", "M2"]
    assert all(not b["claimed"] for b in t.rpc("bdev_get_bdevs"))
