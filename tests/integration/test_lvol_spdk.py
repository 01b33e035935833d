"""Logical volumes in a real target process, driven by SPDK's own `rpc.py` (PyPI `spdk`)
and used over NVMe/TCP by blocktarget's initiator: data written through a thin volume
is read back byte for byte, a live resize reaches the connected host as a Namespace
Attribute Changed event and a new size, a full store fails only the writes that need a
new cluster (Capacity Exceeded), and after a restart from the saved config (which has no
lvol lines) the store and its volumes are back with their data.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.host.connection import NvmeStatusError
from blocktarget.host.controller import connect
from blocktarget.nvme import spec

from .target_proc import Launcher, RunningTarget, config, free_port, listen_address
from .test_spdk_client import SPDK_RPC
from .test_spdk_client import SpdkRpc as _SpdkRpc

NQN = "nqn.2026-01.io.test:lvol"
BS = 4096
MIB = 1 << 20
BPC = MIB // BS  # blocks per 1 MiB cluster


class SpdkRpc(_SpdkRpc):
    def uuid(self, *args: str) -> str:
        """A UUID result: rpc.py prints strings bare, not as JSON."""
        out = self.ok(*args).strip()
        assert len(out) == 36 and out.count("-") == 4, out
        return out


@pytest.fixture
def base_file() -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="bt-lvol-", suffix=".img", dir=tempfile.gettempdir())
    os.ftruncate(fd, 40 * MIB)
    os.close(fd)
    yield Path(name)
    os.unlink(name)


def target_config(img: Path) -> dict[str, Any]:
    return config([{"method": "bdev_uring_create",
                    "params": {"name": "U0", "filename": str(img), "block_size": BS}}],
                  [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}}])


def blocks(n: int, seed: int) -> bytes:
    return bytes(((i * 29 + seed) & 0xFF) for i in range(n * BS))


async def _write_verify(port: int, writes: dict[int, bytes]) -> None:
    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=2, timeout=15)
    try:
        await asyncio.gather(*(ctrl.write(1, lba, d) for lba, d in writes.items()))
        await ctrl.flush(1)
        for lba, d in writes.items():
            assert bytes(await ctrl.read(1, lba, len(d) // BS)) == d, f"lba {lba}"
        assert bytes(await ctrl.read(1, 9 * BPC, 2)) == bytes(2 * BS)  # never written
    finally:
        await ctrl.disconnect()


async def _read_back(port: int, writes: dict[int, bytes]) -> None:
    ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
    try:
        for lba, d in writes.items():
            assert bytes(await ctrl.read(1, lba, len(d) // BS)) == d, f"lba {lba}"
    finally:
        await ctrl.disconnect()


async def _resize_seen(port: int, rpc: SpdkRpc, name: str) -> None:
    ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
    try:
        assert (await ctrl.namespace(1)).nsze == 64 * BPC
        await ctrl.set_features(spec.FeatureId.ASYNC_EVENT, spec.AenConfig.NS_ATTR)
        aer = await ctrl.async_event_request()
        await asyncio.to_thread(rpc.ok, "bdev_lvol_resize", name, "96")
        dw0 = await asyncio.wait_for(aer, 5)
        assert dw0 == spec.make_aen_result(spec.AsyncEventType.NOTICE,
                                           spec.AsyncEventNotice.NS_ATTR_CHANGED,
                                           spec.LogPage.CHANGED_NS)
        changed = await ctrl.get_log_page(spec.LogPage.CHANGED_NS, 4096)
        assert int.from_bytes(bytes(changed[:4]), "little") == 1
        assert (await ctrl.namespace(1, refresh=True)).nsze == 96 * BPC
        await ctrl.write(1, 95 * BPC, blocks(1, 3))  # the grown part takes writes
        assert bytes(await ctrl.read(1, 95 * BPC, 1)) == blocks(1, 3)
    finally:
        await ctrl.disconnect()


async def _fill(port: int, clusters: int) -> list[int]:
    """Write one block into each of `clusters` clusters; the statuses."""
    ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
    out = []
    try:
        for c in range(clusters):
            try:
                await ctrl.write(1, c * BPC, blocks(1, c))
                out.append(0)
            except NvmeStatusError as e:
                out.append(e.sc | (e.sct << 8))
        # what was written still reads, and a mapped cluster still takes writes
        assert bytes(await ctrl.read(1, 0, 1)) == blocks(1, 0)
        await ctrl.write(1, 5, blocks(1, 77))
    finally:
        await ctrl.disconnect()
    return out


def test_lvol_by_spdk_rpc_with_io_resize_and_restart(running_target: Launcher,
                                                     base_file: Path, tmp_path: Path) -> None:
    assert Path(SPDK_RPC).exists(), "SPDK's client is a test dependency (pip package 'spdk')"
    t: RunningTarget = running_target(target_config(base_file))
    rpc = SpdkRpc(t.sock_path)
    try:
        lvs = rpc.uuid("bdev_lvol_create_lvstore", "U0", "lvs0", "-c", str(MIB))
        [info] = rpc.json("bdev_lvol_get_lvstores", "-l", "lvs0")
        assert info["uuid"] == lvs and info["cluster_size"] == MIB and info["block_size"] == BS
        total = info["total_data_clusters"]
        assert info["free_clusters"] == total >= 20
        thin = rpc.uuid("bdev_lvol_create", "-l", "lvs0", "-t", "vol", "64")
        thick = rpc.uuid("bdev_lvol_create", "-u", lvs, "fat", "2", "-c", "write_zeroes")
        lvols = {v["name"]: v for v in rpc.json("bdev_lvol_get_lvols", "-l", "lvs0")}
        assert lvols["vol"]["uuid"] == thin and lvols["vol"]["is_thin_provisioned"] is True
        assert lvols["fat"]["uuid"] == thick and lvols["fat"]["num_allocated_clusters"] == 2
        rpc.ok("bdev_lvol_rename", "lvs0/fat", "thick")
        rpc.ok("bdev_lvol_set_read_only", "lvs0/thick")
        [b] = rpc.json("bdev_get_bdevs", "-b", "lvs0/thick")
        assert b["name"] == thick and b["driver_specific"]["lvol"]["read_only"] is True

        rpc.ok("nvmf_create_subsystem", NQN, "-a")
        rpc.ok("nvmf_subsystem_add_ns", NQN, "lvs0/vol")
        port = free_port()
        rpc.ok("nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1",
               "-s", str(port))
        e = rpc.fails("bdev_lvol_delete", "lvs0/vol")
        assert e["code"] == -16
        writes = {0: blocks(1, 1), BPC - 2: blocks(4, 2), 7 * BPC + 5: blocks(32, 3),
                  3 * BPC + 200: blocks(32, 4)}
        asyncio.run(_write_verify(port, writes))
        [v] = [x for x in rpc.json("bdev_lvol_get_lvols") if x["name"] == "vol"]
        assert v["num_allocated_clusters"] == 4
        asyncio.run(_resize_seen(port, rpc, "lvs0/vol"))
        assert rpc.json("bdev_lvol_get_lvstores")[0]["free_clusters"] == total - 2 - 5
        saved = json.loads(rpc.ok("save_config"))
        assert not any("lvol" in c["method"] for s in saved["subsystems"] for c in s["config"])
    finally:
        rpc.close()
    assert t.stop() == 0

    # restart from what save_config wrote: the store is found on U0 again
    again = running_target(saved)
    rpc = SpdkRpc(again.sock_path)
    try:
        [info] = rpc.json("bdev_lvol_get_lvstores")
        assert info["uuid"] == lvs and info["free_clusters"] == total - 2 - 5
        lvols = {v["name"]: v for v in rpc.json("bdev_lvol_get_lvols")}
        assert set(lvols) == {"vol", "thick"} and lvols["vol"]["num_allocated_clusters"] == 5
        [b] = rpc.json("bdev_get_bdevs", "-b", "lvs0/thick")
        assert b["driver_specific"]["lvol"]["read_only"] is True
        asyncio.run(_read_back(port, {**writes, 95 * BPC: blocks(1, 3)}))
        rpc.ok("nvmf_delete_subsystem", NQN)
        rpc.ok("bdev_lvol_delete", "lvs0/vol")
        rpc.ok("bdev_lvol_rename_lvstore", "lvs0", "lvs1")
        rpc.ok("bdev_lvol_delete_lvstore", "-l", "lvs1")
        assert rpc.json("bdev_lvol_get_lvstores") == []
        assert [b["name"] for b in rpc.json("bdev_get_bdevs")] == ["U0"]
    finally:
        rpc.close()


def test_full_thin_store_fails_only_new_clusters(running_target: Launcher, base_file: Path
                                                 ) -> None:
    t = running_target(target_config(base_file))
    rpc = SpdkRpc(t.sock_path)
    try:
        rpc.uuid("bdev_lvol_create_lvstore", "U0", "lvs0", "-c", str(MIB))
        total = rpc.json("bdev_lvol_get_lvstores")[0]["total_data_clusters"]
        rpc.uuid("bdev_lvol_create", "-l", "lvs0", "-t", "big", str(total + 8))
        rpc.ok("nvmf_create_subsystem", NQN, "-a")
        rpc.ok("nvmf_subsystem_add_ns", NQN, "lvs0/big")
        port = free_port()
        t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(port))
        statuses = asyncio.run(_fill(port, total + 3))
        capacity_exceeded = spec.GenericStatus.CAPACITY_EXCEEDED
        assert statuses == [0] * total + [capacity_exceeded] * 3
        assert rpc.json("bdev_lvol_get_lvstores")[0]["free_clusters"] == 0
        assert "Capacity Exceeded" in t.log()
    finally:
        rpc.close()


async def _snapshot_io(port: int, rpc: SpdkRpc) -> None:
    """Write the origin, snapshot it over RPC while connected, write it again: the clone
    of the snapshot (nsid 2) reads the first data, the origin (nsid 1) the second."""
    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=2, timeout=15)
    try:
        first = {lba: blocks(8, lba % 251) for lba in (0, 3 * BPC + 17, 6 * BPC - 8)}
        for lba, d in first.items():
            await ctrl.write(1, lba, d)
        await ctrl.flush(1)
        snap = await asyncio.to_thread(rpc.uuid, "bdev_lvol_snapshot", "lvs0/vol", "snap0")
        await asyncio.to_thread(rpc.uuid, "bdev_lvol_clone", snap, "clone0")
        await asyncio.to_thread(rpc.ok, "nvmf_subsystem_add_ns", "-n", "2", NQN, "lvs0/clone0")
        second = {lba: blocks(8, 99) for lba in first}
        for lba, d in second.items():
            await ctrl.write(1, lba + 2, d)  # partial: the rest of the cluster is copied
        for lba, d in first.items():
            want = d[:2 * BS] + second[lba]
            assert bytes(await ctrl.read(1, lba, 10)) == want, f"origin lba {lba}"
            assert bytes(await ctrl.read(2, lba, 8)) == d, f"clone lba {lba}"
        await ctrl.write(2, 0, blocks(1, 5))  # the clone is writable, the snapshot not
        assert bytes(await ctrl.read(1, 0, 2)) == first[0][:2 * BS]
    finally:
        await ctrl.disconnect()


async def _read_after_detach(port: int) -> None:
    ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
    try:
        first = blocks(8, 0)
        assert bytes(await ctrl.read(1, 0, 10)) == first[:2 * BS] + blocks(8, 99)
        assert bytes(await ctrl.read(2, 0, 8)) == blocks(1, 5) + first[BS:]
    finally:
        await ctrl.disconnect()


def test_snapshot_and_clone_by_spdk_rpc_while_connected(running_target: Launcher,
                                                        base_file: Path) -> None:
    t = running_target(target_config(base_file))
    rpc = SpdkRpc(t.sock_path)
    try:
        rpc.uuid("bdev_lvol_create_lvstore", "U0", "lvs0", "-c", str(MIB))
        rpc.uuid("bdev_lvol_create", "-l", "lvs0", "vol", "8")
        rpc.ok("nvmf_create_subsystem", NQN, "-a")
        rpc.ok("nvmf_subsystem_add_ns", NQN, "lvs0/vol")
        port = free_port()
        t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(port))
        asyncio.run(_snapshot_io(port, rpc))
        lvols = {v["name"]: v for v in rpc.json("bdev_lvol_get_lvols", "-l", "lvs0")}
        assert lvols["snap0"]["is_snapshot"] and lvols["snap0"]["num_allocated_clusters"] == 8
        assert lvols["vol"]["is_clone"] and lvols["vol"]["num_allocated_clusters"] == 4  # 5|6 straddled
        assert lvols["clone0"]["is_clone"] and lvols["clone0"]["num_allocated_clusters"] == 1
        [b] = rpc.json("bdev_get_bdevs", "-b", "lvs0/snap0")
        assert sorted(b["driver_specific"]["lvol"]["clones"]) == ["clone0", "vol"]
        e = rpc.fails("bdev_lvol_delete", "lvs0/snap0")  # refused, naming both clones
        assert e["code"] == -16, e
        assert e["message"] == (
            "lvol 'lvs0/snap0' is a snapshot with 2 clones ('lvs0/vol', 'lvs0/clone0') "
            "reading through it: delete them, or make them independent with "
            "bdev_lvol_inflate or bdev_lvol_decouple_parent, first"), e
        # both clones become independent while exported; then the snapshot can go
        rpc.ok("bdev_lvol_decouple_parent", "lvs0/clone0")
        e = rpc.fails("bdev_lvol_delete", "lvs0/snap0")  # one clone left: still refused
        assert e["code"] == -16, e
        assert "a snapshot with a clone ('lvs0/vol') reading through it: delete it," in (
            e["message"]), e
        [b] = rpc.json("bdev_get_bdevs", "-b", "lvs0/snap0")  # and it is still there
        assert b["driver_specific"]["lvol"]["clones"] == ["vol"]
        rpc.ok("bdev_lvol_inflate", "lvs0/vol")
        lvols = {v["name"]: v for v in rpc.json("bdev_lvol_get_lvols", "-l", "lvs0")}
        assert not lvols["vol"]["is_clone"] and lvols["vol"]["num_allocated_clusters"] == 8
        assert not lvols["clone0"]["is_clone"] and lvols["clone0"]["is_thin_provisioned"]
        rpc.ok("bdev_lvol_delete", "lvs0/snap0")
        asyncio.run(_read_after_detach(port))
    finally:
        rpc.close()


async def _grow_live(port: int, rpc: SpdkRpc, base: Path, exported: Path) -> None:
    """Over one connection: a store filled to its last cluster, its base file grown,
    rescanned and the store grown by SPDK's rpc.py while writes run, then the clusters
    that failed before take writes; and a file bdev exported as itself (nsid 2) grown
    under the host, which gets the event and the size."""
    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=2, timeout=15)
    try:
        total = rpc.json("bdev_lvol_get_lvstores")[0]["total_data_clusters"]
        for c in range(total):
            await ctrl.write(1, c * BPC, blocks(1, c))
        with pytest.raises(NvmeStatusError) as full:
            await ctrl.write(1, total * BPC, blocks(1, total))
        assert full.value.sc == spec.GenericStatus.CAPACITY_EXCEEDED

        stop = asyncio.Event()

        async def writer() -> int:  # rewrites mapped clusters the whole time
            n = 0
            while not stop.is_set():
                c = n % total
                await ctrl.write(1, c * BPC + 1, blocks(1, c + 1000))
                assert bytes(await ctrl.read(1, c * BPC + 1, 1)) == blocks(1, c + 1000)
                n += 1
            return n

        task = asyncio.create_task(writer())
        os.truncate(base, 100 * MIB)
        await asyncio.to_thread(rpc.ok, "bdev_aio_rescan", "U0")
        await asyncio.to_thread(rpc.ok, "bdev_lvol_grow_lvstore", "-l", "lvs0")
        stop.set()
        assert await task > 0
        [s] = rpc.json("bdev_lvol_get_lvstores")
        assert s["total_data_clusters"] > total + 55
        for c in range(total, total + 55):  # failed above: the store has room now
            await ctrl.write(1, c * BPC, blocks(1, c))
        for c in range(total + 55):
            assert bytes(await ctrl.read(1, c * BPC, 1)) == blocks(1, c), f"cluster {c}"

        await ctrl.set_features(spec.FeatureId.ASYNC_EVENT, spec.AenConfig.NS_ATTR)
        aer = await ctrl.async_event_request()
        assert (await ctrl.namespace(2)).nsze == 8 * BPC
        os.truncate(exported, 12 * MIB)
        await asyncio.to_thread(rpc.ok, "bdev_uring_rescan", "U1")
        dw0 = await asyncio.wait_for(aer, 5)
        assert dw0 == spec.make_aen_result(spec.AsyncEventType.NOTICE,
                                           spec.AsyncEventNotice.NS_ATTR_CHANGED,
                                           spec.LogPage.CHANGED_NS)
        changed = await ctrl.get_log_page(spec.LogPage.CHANGED_NS, 4096)
        assert int.from_bytes(bytes(changed[:4]), "little") == 2
        assert (await ctrl.namespace(2, refresh=True)).nsze == 12 * BPC
        await ctrl.write(2, 12 * BPC - 1, blocks(1, 9))  # the last block, new
        assert bytes(await ctrl.read(2, 12 * BPC - 1, 1)) == blocks(1, 9)
    finally:
        await ctrl.disconnect()


def test_live_grow_by_spdk_rpc(running_target: Launcher, base_file: Path) -> None:
    exported = base_file.with_suffix(".exported.img")
    with open(exported, "wb") as f:
        f.truncate(8 * MIB)
    cfg = target_config(base_file)
    cfg["subsystems"][0]["config"].append(
        {"method": "bdev_uring_create",
         "params": {"name": "U1", "filename": str(exported), "block_size": BS}})
    t = running_target(cfg)
    rpc = SpdkRpc(t.sock_path)
    try:
        rpc.uuid("bdev_lvol_create_lvstore", "U0", "lvs0", "-c", str(MIB))
        rpc.uuid("bdev_lvol_create", "-l", "lvs0", "-t", "vol", "128")
        rpc.ok("nvmf_create_subsystem", NQN, "-a")
        rpc.ok("nvmf_subsystem_add_ns", NQN, "lvs0/vol")
        rpc.ok("nvmf_subsystem_add_ns", NQN, "U1")
        port = free_port()
        t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(port))
        asyncio.run(_grow_live(port, rpc, base_file, exported))
        # past what the metadata was sized for at create: refused, with the reason
        [before] = rpc.json("bdev_lvol_get_lvstores")
        os.truncate(base_file, 400 * MIB)
        rpc.ok("bdev_uring_rescan", "U0")
        e = rpc.fails("bdev_lvol_grow_lvstore", "-l", "lvs0")
        assert e["code"] == -28 and "max_growable_size" in e["message"], e
        assert rpc.json("bdev_lvol_get_lvstores") == [before]
        # a shrink under the exported bdev is refused, it keeps its size
        os.truncate(exported, 4 * MIB)
        e = rpc.fails("bdev_aio_rescan", "U1")
        assert e["code"] == -16 and "in use by" in e["message"], e
        [b] = rpc.json("bdev_get_bdevs", "-b", "U1")
        assert b["num_blocks"] == 12 * BPC
    finally:
        rpc.close()
        exported.unlink()


CLONE_MIB = 48  # 1 MiB clusters: decouple and inflate copy 20-odd each (16 a commit)
WORKERS = 4
HOT = 4  # the workers write the first HOT clusters only, so the copies have work to do


class _CloneModel:
    """What every block of the exported clone must read: its snapshot's pattern until a
    worker overwrites it. Worker w owns the blocks with lba % WORKERS == w, so the model
    is exact while the workers run concurrently."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}
        self.ops = 0

    def want(self, lba: int) -> bytes:
        return self.data.get(lba) or blocks(1, lba % 251)[:BS]


async def _clone_io(ctrl: Any, model: _CloneModel, w: int, stop: asyncio.Event,
                    rng: random.Random) -> None:
    n = CLONE_MIB * BPC
    while not stop.is_set():
        lba = rng.randrange(w, HOT * BPC, WORKERS)
        d = bytes([rng.randrange(1, 256)]) * 16 + lba.to_bytes(8, "little") * 510
        await ctrl.write(1, lba, d)
        model.data[lba] = d
        other = rng.randrange(w, n, WORKERS)
        assert bytes(await ctrl.read(1, other, 1)) == model.want(other), f"lba {other}"
        model.ops += 1


async def _detach_under_io(port: int, rpc: SpdkRpc) -> list[tuple[str, int, float]]:
    """Writes and verified reads through the exported clone (nsid 1) by WORKERS tasks
    while SPDK's rpc.py snapshots it, decouples it from that snapshot and inflates it;
    after each step every block of the clone reads what the model says. Before, the
    clone writes one block of every other cluster: the snapshot s2 owns those (decouple
    copies them), s1 the rest (inflate copies them). Returns the I/Os that completed
    during each RPC, and how long the RPC took."""
    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=2, timeout=15)
    model = _CloneModel()
    rng = random.Random(4)
    during = []
    try:
        for c in range(0, CLONE_MIB, 2):
            lba = c * BPC + 8
            d = bytes([c + 1]) * BS
            await ctrl.write(1, lba, d)
            model.data[lba] = d

        async def full_check(what: str) -> None:
            for lba in range(0, CLONE_MIB * BPC, 32):
                got = bytes(await ctrl.read(1, lba, 32))
                for i in range(32):
                    assert got[i * BS:(i + 1) * BS] == model.want(lba + i), (
                        f"{what}: lba {lba + i}")

        for step in (("bdev_lvol_snapshot", "lvs0/c1", "s2"),
                     ("bdev_lvol_decouple_parent", "lvs0/c1"),
                     ("bdev_lvol_inflate", "lvs0/c1")):
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_clone_io(ctrl, model, w, stop,
                                                   random.Random(rng.random())))
                     for w in range(WORKERS)]
            await asyncio.sleep(0.2)  # the workers are writing when the RPC starts
            start, t0 = model.ops, time.monotonic()
            await asyncio.to_thread(rpc.ok, *step)
            during.append((step[0], model.ops - start, round(time.monotonic() - t0, 3)))
            stop.set()
            await asyncio.gather(*tasks)
            await full_check(f"after {step[0]}")
    finally:
        await ctrl.disconnect()
    return during


def test_inflate_and_decouple_under_io_through_the_exported_clone(
        running_target: Launcher) -> None:
    img = Path(tempfile.mkstemp(prefix="bt-lvol-", suffix=".img")[1])
    os.truncate(img, 3 * CLONE_MIB * MIB)
    t = running_target(target_config(img))
    rpc = SpdkRpc(t.sock_path)
    try:
        rpc.uuid("bdev_lvol_create_lvstore", "U0", "lvs0", "-c", str(MIB))
        rpc.uuid("bdev_lvol_create", "-l", "lvs0", "vol", str(CLONE_MIB))
        rpc.ok("nvmf_create_subsystem", NQN, "-a")
        rpc.ok("nvmf_subsystem_add_ns", "-n", "2", NQN, "lvs0/vol")
        port = free_port()
        t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(port))

        async def fill() -> None:
            ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
            try:
                for lba in range(0, CLONE_MIB * BPC, 32):
                    await ctrl.write(2, lba, b"".join(blocks(1, (lba + i) % 251)[:BS]
                                                      for i in range(32)))
                await ctrl.flush(2)
            finally:
                await ctrl.disconnect()

        asyncio.run(fill())
        rpc.uuid("bdev_lvol_snapshot", "lvs0/vol", "s1")
        rpc.uuid("bdev_lvol_clone", "lvs0/s1", "c1")
        rpc.ok("nvmf_subsystem_add_ns", "-n", "1", NQN, "lvs0/c1")
        during = asyncio.run(_detach_under_io(port, rpc))
        print(f"I/Os through the exported clone during each RPC: {during}")
        # I/O completed while each copy ran (the snapshot's freeze is too short to count)
        assert all(n > 0 for what, n, _ in during if what != "bdev_lvol_snapshot"), during
        lvols = {v["name"]: v for v in rpc.json("bdev_lvol_get_lvols", "-l", "lvs0")}
        c1 = lvols["c1"]
        assert not c1["is_clone"] and not c1["is_thin_provisioned"]
        assert c1["num_allocated_clusters"] == CLONE_MIB
        assert lvols["s2"]["num_allocated_clusters"] >= CLONE_MIB // 2 - HOT
        # nothing reads through s2 or s1 for c1 any more: the snapshots can go
        rpc.ok("bdev_lvol_delete", "lvs0/s2")
        e = rpc.fails("bdev_lvol_delete", "lvs0/s1")  # vol still reads through it
        assert e["code"] == -16 and "'lvs0/vol'" in e["message"], e
    finally:
        rpc.close()
        img.unlink()
