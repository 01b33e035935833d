"""Logical volumes on a running target: every bdev_lvol_* method's success and error
paths through the JSON-RPC core, and volume I/O on the reactors (thin allocation, out of
space, Deallocate, read-only, resize), and a store found again by a second target."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.app import Target
from blocktarget.bdev import BdevIO, IOType, Status
from blocktarget.config import Settings
from blocktarget.lvol.volume import NS_WRITE_PROTECTED
from blocktarget.metrics import TargetCollector

ENODEV, EEXIST, EBUSY = -errno.ENODEV, -errno.EEXIST, -errno.EBUSY
BS = 512
MIB = 1 << 20
BPC = MIB // BS  # blocks per 1 MiB cluster
NQN = "nqn.2026-01.io.test:lvol"
_ids = itertools.count(1)


def settings(cores: list[int], **kw: Any) -> Settings:
    return Settings(cores=cores, rpc_http=None, rpc_unix=None, metrics=False, **kw)


@pytest.fixture
async def t() -> AsyncIterator[Target]:
    target = Target(settings([0]))
    await target.start()
    yield target
    await target.stop()


async def rpc(t: Target, method: str, **params: Any) -> dict[str, Any]:
    return await t.dispatcher.handle(
        {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params})


async def ok(t: Target, method: str, **params: Any) -> Any:
    resp = await rpc(t, method, **params)
    assert "error" not in resp, resp
    return resp["result"]


async def err(t: Target, method: str, **params: Any) -> tuple[int, str]:
    resp = await rpc(t, method, **params)
    assert "result" not in resp, resp
    e = resp["error"]
    assert e["code"] != -32603, f"user error reported as internal: {e}"
    return e["code"], e["message"]


async def io(t: Target, name: str, kind: IOType, offset: int = 0, blocks: int = 1,
             buf: Any = None, reactor: int = 0) -> BdevIO:
    r = t.reactors[reactor]
    bdev = t.bdevs.get(name)

    def run() -> asyncio.Future[BdevIO]:
        fut = asyncio.get_running_loop().create_future()
        bdev.get_io_channel(r).submit(BdevIO(kind, offset, blocks, buf, fut.set_result))
        return fut

    return await asyncio.wait_for(r.call(run), 10)


async def write(t: Target, name: str, offset: int, data: bytes, reactor: int = 0) -> int:
    return (await io(t, name, IOType.WRITE, offset, len(data) // BS, data, reactor)).status


async def read(t: Target, name: str, offset: int, blocks: int) -> bytes:
    x = await io(t, name, IOType.READ, offset, blocks)
    assert x.status == 0
    return bytes(x.buf)


def pattern(blocks: int, seed: int) -> bytes:
    return bytes(((i * 13 + seed) & 0xFF) for i in range(blocks * BS))


async def store(t: Target, mib: int = 16, name: str = "lvs") -> str:
    await ok(t, "bdev_malloc_create", name="M0", num_blocks=mib * MIB // BS, block_size=BS)
    return await ok(t, "bdev_lvol_create_lvstore", bdev_name="M0", lvs_name=name,
                    cluster_sz=MIB)


async def lvstore(t: Target, name: str = "lvs") -> dict[str, Any]:
    [s] = await ok(t, "bdev_lvol_get_lvstores", lvs_name=name)
    return s


async def test_lvstore_methods_and_shapes(t: Target) -> None:
    u = await store(t)
    s = await lvstore(t)
    assert s == {"uuid": u, "name": "lvs", "base_bdev": "M0", "total_data_clusters": 15,
                 "free_clusters": 15, "block_size": BS, "cluster_size": MIB,
                 "max_growable_size": 60 * MIB}
    await ok(t, "bdev_lvol_grow_lvstore", lvs_name="lvs")  # the base did not grow
    assert (await lvstore(t))["total_data_clusters"] == 15
    assert await ok(t, "bdev_lvol_get_lvstores", uuid=u) == [s]
    assert t.bdevs.get("M0").claimed_by == "lvstore"
    # the base is the store's now
    assert (await err(t, "bdev_malloc_delete", name="M0"))[0] == EBUSY
    await ok(t, "bdev_malloc_create", name="M1", num_blocks=4 * MIB // BS, block_size=BS)
    assert (await err(t, "bdev_lvol_create_lvstore", bdev_name="M0", lvs_name="x"))[0] == EBUSY
    assert (await err(t, "bdev_lvol_create_lvstore", bdev_name="M1", lvs_name="lvs"))[0] == EEXIST
    assert (await err(t, "bdev_lvol_create_lvstore", bdev_name="Nope", lvs_name="y"))[0] == ENODEV
    code, msg = await err(t, "bdev_lvol_create_lvstore", bdev_name="M1", lvs_name="y",
                          cluster_sz=3000)
    assert code == -32602 and "cluster_sz" in msg
    code, msg = await err(t, "bdev_lvol_create_lvstore", bdev_name="M1", lvs_name="y",
                          cluster_sz=8 * MIB)
    assert code == -32602 and "holds no" in msg
    assert t.bdevs.get("M1").claimed_by is None  # a refused create leaves no claim
    code, msg = await err(t, "bdev_lvol_create_lvstore", bdev_name="M1", lvs_name="a/b")
    assert code == -32602 and "'/'" in msg
    code, _ = await err(t, "bdev_lvol_get_lvstores", uuid=u, lvs_name="lvs")
    assert code == -32602
    assert (await err(t, "bdev_lvol_get_lvstores", lvs_name="nope"))[0] == ENODEV

    await ok(t, "bdev_lvol_rename_lvstore", old_name="lvs", new_name="pool")
    assert (await lvstore(t, "pool"))["uuid"] == u
    assert (await err(t, "bdev_lvol_rename_lvstore", old_name="lvs", new_name="z"))[0] == ENODEV
    await ok(t, "bdev_lvol_delete_lvstore", lvs_name="pool")
    assert await ok(t, "bdev_lvol_get_lvstores") == []
    assert t.bdevs.get("M0").claimed_by is None
    await ok(t, "bdev_malloc_delete", name="M0")


async def test_lvol_methods_shapes_and_errors(t: Target) -> None:
    u = await store(t)
    thin = await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="thin", size_in_mib=40,
                    thin_provision=True)
    thick = await ok(t, "bdev_lvol_create", uuid=u, lvol_name="thick", size_in_mib=3,
                     clear_method="write_zeroes")
    assert (await lvstore(t))["free_clusters"] == 12  # thin over-commits: nothing taken
    lvols = await ok(t, "bdev_lvol_get_lvols", lvs_name="lvs")
    assert [(v["alias"], v["uuid"], v["is_thin_provisioned"], v["num_allocated_clusters"])
            for v in lvols] == [("lvs/thin", thin, True, 0), ("lvs/thick", thick, False, 3)]
    assert lvols[0]["lvs"] == {"name": "lvs", "uuid": u}
    [b] = await ok(t, "bdev_get_bdevs", name="lvs/thick")
    assert b["name"] == thick and b["aliases"] == ["lvs/thick"]
    assert b["product_name"] == "Logical Volume" and b["num_blocks"] == 3 * BPC
    d = b["driver_specific"]["lvol"]
    assert d["lvol_store_uuid"] == u and d["base_bdev"] == "M0"
    assert d["thin_provision"] is False and d["num_allocated_clusters"] == 3
    assert d["clear_method"] == "write_zeroes"

    assert (await err(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="thin",
                      size_in_mib=1))[0] == EEXIST
    code, msg = await err(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="big",
                          size_in_mib=13)
    assert code == -32602 and "free clusters" in msg
    assert (await err(t, "bdev_lvol_create", lvs_name="no", lvol_name="x",
                      size_in_mib=1))[0] == ENODEV
    assert (await err(t, "bdev_lvol_create", lvol_name="x", size_in_mib=1))[0] == -32602
    assert (await err(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="x", size_in_mib=1,
                      clear_method="shred"))[0] == -32602
    assert (await err(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="x" * 64,
                      size_in_mib=1))[0] == -32602
    assert (await err(t, "bdev_lvol_delete", name="M0"))[0] == ENODEV
    assert (await err(t, "bdev_lvol_resize", name="lvs/none", size_in_mib=1))[0] == ENODEV

    await ok(t, "bdev_lvol_rename", old_name="lvs/thin", new_name="slim")
    assert t.bdevs.get("lvs/slim").uuid == thin and t.bdevs.find("lvs/thin") is None
    assert (await err(t, "bdev_lvol_rename", old_name=thin, new_name="thick"))[0] == EEXIST
    await ok(t, "bdev_lvol_rename_lvstore", old_name="lvs", new_name="pool")
    assert t.bdevs.get("pool/slim").uuid == thin

    # exported: delete refused, store delete refused
    await ok(t, "nvmf_create_subsystem", nqn=NQN, allow_any_host=True)
    await ok(t, "nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "pool/thick"})
    assert (await err(t, "bdev_lvol_delete", name="pool/thick"))[0] == EBUSY
    assert (await err(t, "bdev_lvol_delete_lvstore", lvs_name="pool"))[0] == EBUSY
    await ok(t, "nvmf_delete_subsystem", nqn=NQN)
    await ok(t, "bdev_lvol_delete", name="pool/thick")
    assert t.bdevs.find(thick) is None
    assert (await lvstore(t, "pool"))["free_clusters"] == 15
    await ok(t, "bdev_lvol_delete_lvstore", uuid=u)
    assert t.bdevs.find(thin) is None
    cfg = await ok(t, "save_config")
    assert not any("lvol" in c["method"] for s in cfg["subsystems"] for c in s["config"])


async def test_thin_allocation_read_write_and_deallocate(t: Target) -> None:
    await store(t)
    await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=8,
             thin_provision=True)
    assert await read(t, "lvs/v", 0, 8) == bytes(8 * BS)  # unallocated: zeroes
    data = pattern(16, 1)
    assert await write(t, "lvs/v", BPC - 8, data) == 0  # straddles clusters 0 and 1
    assert (await lvstore(t))["free_clusters"] == 13
    assert await read(t, "lvs/v", BPC - 16, 32) == bytes(8 * BS) + data + bytes(8 * BS)
    # a mapped cluster takes the fast path; a cluster further on is allocated
    more = pattern(4, 2)
    assert await write(t, "lvs/v", 5 * BPC + 3, more) == 0
    [v] = await ok(t, "bdev_lvol_get_lvols")
    assert v["num_allocated_clusters"] == 3
    assert await read(t, "lvs/v", 5 * BPC, 8) == bytes(3 * BS) + more + bytes(BS)

    # Deallocate: part of a cluster is zeroed, a whole cluster is freed
    x = await io(t, "lvs/v", IOType.UNMAP, BPC - 8, 4)
    assert x.status == 0
    assert await read(t, "lvs/v", BPC - 8, 8) == bytes(4 * BS) + data[4 * BS:8 * BS]
    x = await io(t, "lvs/v", IOType.UNMAP, 5 * BPC, BPC)
    assert x.status == 0
    assert (await lvstore(t))["free_clusters"] == 13
    assert await read(t, "lvs/v", 5 * BPC, 8) == bytes(8 * BS)
    x = await io(t, "lvs/v", IOType.WRITE_ZEROES, BPC, 8)
    assert x.status == 0 and await read(t, "lvs/v", BPC, 8) == bytes(8 * BS)
    assert (await io(t, "lvs/v", IOType.FLUSH, 0, 0)).status == 0
    # a freed cluster handed to another volume reads zeroes there, not the old data
    await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="w", size_in_mib=13)
    assert await read(t, "lvs/w", 0, 4) == bytes(4 * BS)
    assert (await lvstore(t))["free_clusters"] == 0


async def test_out_of_space_fails_only_new_clusters(t: Target, caplog: Any) -> None:
    await store(t, mib=4)  # 3 clusters
    await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=8,
             thin_provision=True)
    for c in range(3):
        assert await write(t, "lvs/v", c * BPC, pattern(2, c)) == 0
    with caplog.at_level(logging.ERROR, logger="blocktarget.lvol"):
        assert await write(t, "lvs/v", 4 * BPC, pattern(2, 9)) == Status.CAPACITY_EXCEEDED
        assert await write(t, "lvs/v", 5 * BPC, pattern(2, 9)) == Status.CAPACITY_EXCEEDED
    assert "Capacity Exceeded" in caplog.text and "lvs/v" in caplog.text
    store_obj = t.bdevs.get("lvs/v").store  # type: ignore[attr-defined]
    assert store_obj.enospc_errors == 2
    # allocated clusters keep working, and what was written is there
    assert await write(t, "lvs/v", 2 * BPC + 7, pattern(1, 5)) == 0
    for c in range(3):
        assert await read(t, "lvs/v", c * BPC, 2) == pattern(2, c)
    assert await read(t, "lvs/v", 4 * BPC, 2) == bytes(2 * BS)
    # freeing a cluster lets the write through
    assert (await io(t, "lvs/v", IOType.UNMAP, 0, BPC)).status == 0
    assert await write(t, "lvs/v", 4 * BPC, pattern(2, 9)) == 0
    # and the scrape shows it all
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in TargetCollector(t).collect() for s in fam.samples}
    lvs = (("lvs", "lvs"),)
    assert samples[("blocktarget_lvstore_clusters", lvs)] == 3
    assert samples[("blocktarget_lvstore_free_clusters", lvs)] == 0
    assert samples[("blocktarget_lvstore_cluster_size_bytes", lvs)] == MIB
    assert samples[("blocktarget_lvstore_out_of_space_errors_total", lvs)] == 2
    name = t.bdevs.get("lvs/v").name
    assert samples[("blocktarget_lvol_allocated_clusters",
                    (("bdev", name), ("lvs", "lvs")))] == 3
    assert samples[("blocktarget_bdev_errors_total", (("bdev", name), ("type", "write")))] == 2


async def test_read_only_and_resize(t: Target) -> None:
    await store(t)
    await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=2)
    assert await write(t, "lvs/v", 0, pattern(1, 3)) == 0
    events: list[tuple[str, Any]] = []
    t.subsystems.observers.append(lambda ev, sub, detail: events.append((ev, detail)))
    await ok(t, "nvmf_create_subsystem", nqn=NQN, allow_any_host=True)
    await ok(t, "nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "lvs/v"})
    await ok(t, "bdev_lvol_resize", name="lvs/v", size_in_mib=5)  # live, exported
    bdev = t.bdevs.get("lvs/v")
    assert bdev.num_blocks == 5 * BPC and (await lvstore(t))["free_clusters"] == 10
    assert [e for e, _ in events][-1] == "ns_resized" and events[-1][1].nsid == 1
    assert await read(t, "lvs/v", 4 * BPC, 2) == bytes(2 * BS)  # grown part reads zeroes
    await ok(t, "bdev_lvol_resize", name="lvs/v", size_in_mib=1)
    assert bdev.num_blocks == BPC and (await lvstore(t))["free_clusters"] == 14
    x = await io(t, "lvs/v", IOType.READ, BPC, 1)
    assert x.status == Status.LBA_OUT_OF_RANGE
    assert await read(t, "lvs/v", 0, 1) == pattern(1, 3)

    await ok(t, "bdev_lvol_set_read_only", name="lvs/v")
    assert await write(t, "lvs/v", 0, pattern(1, 4)) == NS_WRITE_PROTECTED
    assert (await io(t, "lvs/v", IOType.UNMAP, 0, 1)).status == NS_WRITE_PROTECTED
    assert await read(t, "lvs/v", 0, 1) == pattern(1, 3)
    [b] = await ok(t, "bdev_get_bdevs", name="lvs/v")
    assert b["driver_specific"]["lvol"]["read_only"] is True


async def test_concurrent_first_writes_from_two_reactors() -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    target = Target(settings(cores if len(cores) == 2 else [cores[0], cores[0]]))
    await target.start()
    try:
        await store(target)
        await ok(target, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=8,
                 thin_provision=True)
        writes = [write(target, "lvs/v", c * BPC + k * 16, pattern(16, c * 8 + k), k % 2)
                  for c in range(4) for k in range(8)]
        assert await asyncio.gather(*writes) == [0] * 32
        [v] = await ok(target, "bdev_lvol_get_lvols")
        assert v["num_allocated_clusters"] == 4  # one cluster each, never two
        for c in range(4):
            for k in range(8):
                assert await read(target, "lvs/v", c * BPC + k * 16, 16) == pattern(16, c * 8 + k)
    finally:
        await target.stop()


async def test_store_found_again_by_a_new_target(tmp_path: Path) -> None:
    f = tmp_path / "base.img"
    with open(f, "wb") as fh:
        fh.truncate(16 * MIB)
    first = Target(settings([0], allowed_dirs=[str(tmp_path)]))
    await first.start()
    try:
        await ok(first, "bdev_uring_create", name="U0", filename=str(f), block_size=BS)
        u = await ok(first, "bdev_lvol_create_lvstore", bdev_name="U0", lvs_name="lvs",
                     cluster_sz=MIB)
        v = await ok(first, "bdev_lvol_create", lvs_name="lvs", lvol_name="thin",
                     size_in_mib=32, thin_provision=True)
        await ok(first, "bdev_lvol_create", lvs_name="lvs", lvol_name="thick", size_in_mib=2)
        assert await write(first, "lvs/thin", 3 * BPC + 1, pattern(4, 7)) == 0
        assert (await io(first, "lvs/thin", IOType.FLUSH)).status == 0
        cfg = await ok(first, "save_config")
    finally:
        await first.stop()
    second = Target(settings([0], allowed_dirs=[str(tmp_path)]))
    await second.apply_config(cfg, "saved")  # only the uring bdev is in it
    await second.start()
    try:
        assert (await lvstore(second))["uuid"] == u
        assert t_names(second) == {"U0", v, second.bdevs.get("lvs/thick").name}
        assert await read(second, "lvs/thin", 3 * BPC + 1, 4) == pattern(4, 7)
        assert second.bdevs.get("U0").claimed_by == "lvstore"
        [b] = await ok(second, "bdev_get_bdevs", name=v)
        assert b["driver_specific"]["lvol"]["num_allocated_clusters"] == 1
        cfg2 = await ok(second, "save_config")
        assert cfg2["subsystems"][0]["config"] == cfg["subsystems"][0]["config"]
    finally:
        await second.stop()


def t_names(t: Target) -> set[str]:
    return {b.name for b in t.bdevs}


async def test_snapshot_clone_copy_on_write(t: Target) -> None:
    await store(t)
    origin = await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="o", size_in_mib=4)
    a = pattern(BPC, 1)
    assert await write(t, "lvs/o", 0, a) == 0  # cluster 0 fully written
    assert await write(t, "lvs/o", 2 * BPC + 5, pattern(3, 2)) == 0
    snap = await ok(t, "bdev_lvol_snapshot", lvol_name="lvs/o", snapshot_name="s")
    assert (await lvstore(t))["free_clusters"] == 11  # the snapshot took o's 4 clusters
    # the origin is a thin clone of the snapshot: same data, no clusters of its own
    assert await read(t, "lvs/o", 0, BPC) == a
    lv = {v["name"]: v for v in await ok(t, "bdev_lvol_get_lvols")}
    assert lv["s"]["is_snapshot"] and lv["o"]["is_clone"] and not lv["o"]["is_snapshot"]
    assert lv["o"]["num_allocated_clusters"] == 0 and lv["s"]["num_allocated_clusters"] == 4
    [b] = await ok(t, "bdev_get_bdevs", name="lvs/o")
    assert b["driver_specific"]["lvol"]["base_snapshot"] == "s"
    [b] = await ok(t, "bdev_get_bdevs", name=snap)
    assert b["driver_specific"]["lvol"]["clones"] == ["o"]

    # a partial write to the origin copies the cluster first: the rest keeps the old data
    b1 = pattern(2, 3)
    assert await write(t, "lvs/o", 7, b1) == 0
    assert await read(t, "lvs/o", 0, BPC) == a[:7 * BS] + b1 + a[9 * BS:]
    assert await read(t, "lvs/s", 0, BPC) == a  # point in time
    assert await write(t, "lvs/s", 0, b1) == NS_WRITE_PROTECTED
    assert (await lvstore(t))["free_clusters"] == 10

    # a clone of the snapshot sees the snapshot, not the origin's later writes
    await ok(t, "bdev_lvol_clone", snapshot_name="lvs/s", clone_name="c")
    assert await read(t, "lvs/c", 0, BPC) == a
    assert await read(t, "lvs/c", 2 * BPC + 5, 3) == pattern(3, 2)
    # Deallocate and Write Zeroes on a clone read zeroes, never the parent's data
    assert (await io(t, "lvs/c", IOType.UNMAP, 0, BPC)).status == 0
    assert await read(t, "lvs/c", 0, 4) == bytes(4 * BS)
    assert (await io(t, "lvs/c", IOType.WRITE_ZEROES, 2 * BPC + 5, 1)).status == 0
    assert await read(t, "lvs/c", 2 * BPC + 5, 3) == bytes(BS) + pattern(3, 2)[BS:]
    assert await read(t, "lvs/s", 0, BPC) == a and await read(t, "lvs/o", 9, 1) == a[9 * BS:10 * BS]

    # a clone shrunk and grown again reads zeroes where it gave clusters up
    await ok(t, "bdev_lvol_resize", name="lvs/c", size_in_mib=2)
    await ok(t, "bdev_lvol_resize", name="lvs/c", size_in_mib=4)
    assert await read(t, "lvs/c", 2 * BPC + 5, 3) == bytes(3 * BS)

    # a snapshot with clones is not deleted; its clones are, then it is
    code, msg = await err(t, "bdev_lvol_delete", name="lvs/s")
    assert code == EBUSY and "'lvs/o'" in msg and "'lvs/c'" in msg
    assert (await err(t, "bdev_lvol_resize", name="lvs/s", size_in_mib=8))[0] == -32602
    assert (await err(t, "bdev_lvol_clone", snapshot_name="lvs/o", clone_name="x"))[0] == -32602
    assert (await err(t, "bdev_lvol_snapshot", lvol_name="lvs/s",
                      snapshot_name="x"))[0] == -32602
    assert (await err(t, "bdev_lvol_snapshot", lvol_name="lvs/o",
                      snapshot_name="c"))[0] == EEXIST
    await ok(t, "bdev_lvol_delete", name="lvs/c")
    await ok(t, "bdev_lvol_delete", name=origin)
    await ok(t, "bdev_lvol_delete", name="lvs/s")
    assert (await lvstore(t))["free_clusters"] == 15


async def test_snapshot_while_writes_run_is_point_in_time() -> None:
    """Writes from two reactors run while the snapshot is taken: the snapshot holds, for
    every block, a value the volume had; the origin then holds each block's last write,
    and every acknowledged write is in one of them."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    target = Target(settings(cores if len(cores) == 2 else [cores[0], cores[0]]))
    await target.start()
    try:
        await store(target)
        await ok(target, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=4)
        blocks = 64
        last: dict[int, int] = {}  # acknowledged
        issued: dict[int, int] = {}  # submitted
        stop = asyncio.Event()

        async def writer(r: int) -> None:
            gen = 0
            while not stop.is_set():
                gen += 1
                for k in range(r, blocks, 2):
                    blk = k * (BPC // 16)  # spread over the 4 clusters
                    issued[blk] = gen
                    assert await write(target, "lvs/v", blk, pattern(1, gen), r) == 0
                    last[blk] = gen

        tasks = [asyncio.create_task(writer(r)) for r in (0, 1)]
        await asyncio.sleep(0.2)
        before = dict(last)  # acknowledged before the snapshot began: must be in it
        await ok(target, "bdev_lvol_snapshot", lvol_name="lvs/v", snapshot_name="s")
        at_snap = dict(issued)  # submitted after it returned: must not be in it
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        for blk, gen in last.items():
            assert await read(target, "lvs/v", blk, 1) == pattern(1, gen)
            got = await read(target, "lvs/s", blk, 1)
            lo, hi = before.get(blk, 0), at_snap.get(blk, 0)
            assert any(got == (pattern(1, g) if g else bytes(BS)) for g in range(lo, hi + 1)), (
                f"block {blk}: the snapshot holds none of generations {lo}..{hi}")
        assert sum(at_snap.values()) > sum(before.values())  # writes ran across it
    finally:
        await target.stop()


async def test_snapshot_waits_for_writes_in_flight(t: Target) -> None:
    """A write held below the store (an error bdev's `pending` injection) when a snapshot
    starts: the snapshot waits for it, so the write is in the snapshot and in the
    origin's copy of the cluster, never only in a cluster the origin no longer reads."""
    await ok(t, "bdev_malloc_create", name="M0", num_blocks=16 * MIB // BS, block_size=BS)
    await ok(t, "bdev_error_create", base_name="M0")
    await ok(t, "bdev_lvol_create_lvstore", bdev_name="EE_M0", lvs_name="lvs", cluster_sz=MIB)
    await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=2)
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="write",
             error_type="pending", num=1)
    held = asyncio.create_task(write(t, "lvs/v", 5, pattern(1, 1)))
    await asyncio.sleep(0.05)
    assert not held.done()
    snap = asyncio.create_task(ok(t, "bdev_lvol_snapshot", lvol_name="lvs/v",
                                  snapshot_name="s"))
    await asyncio.sleep(0.1)
    assert not snap.done(), "the snapshot did not wait for the write in flight"
    assert await ok(t, "bdev_error_resume_pending", name="EE_M0") == 1
    assert await held == 0
    await snap
    assert await write(t, "lvs/v", 6, pattern(1, 2)) == 0  # copies cluster 0
    assert await read(t, "lvs/v", 5, 2) == pattern(1, 1) + pattern(1, 2)
    assert await read(t, "lvs/s", 5, 2) == pattern(1, 1) + bytes(BS)


async def test_inflate_and_decouple_while_in_use(t: Target) -> None:
    await store(t)
    await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=4,
             thin_provision=True)
    a, b = pattern(8, 1), pattern(8, 2)
    assert await write(t, "lvs/v", 0, a) == 0  # cluster 0
    await ok(t, "bdev_lvol_snapshot", lvol_name="lvs/v", snapshot_name="s1")
    assert await write(t, "lvs/v", 2 * BPC, b) == 0  # cluster 2, owned by v now
    await ok(t, "bdev_lvol_snapshot", lvol_name="lvs/v", snapshot_name="s2")
    # chain: v -> s2 (cluster 2) -> s1 (cluster 0)
    assert await read(t, "lvs/v", 0, 8) == a and await read(t, "lvs/v", 2 * BPC, 8) == b
    await ok(t, "bdev_lvol_clone", snapshot_name="lvs/s2", clone_name="c")
    store_obj = t.bdevs.get("lvs/c").store  # type: ignore[attr-defined]
    store_obj.copy_batch = 1  # one cluster per commit: writes interleave with the copy

    # decouple v from s2 while a writer keeps writing: v gets s2's cluster, reads s1
    stop = asyncio.Event()
    wrote: list[int] = []

    async def writer() -> None:
        k = 0
        while not stop.is_set():
            blk = 3 * BPC + (k % 8)
            assert await write(t, "lvs/v", blk, pattern(1, k)) == 0
            wrote.append(k)
            k += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    await ok(t, "bdev_lvol_decouple_parent", name="lvs/v")
    stop.set()
    await task
    assert wrote
    [bd] = await ok(t, "bdev_get_bdevs", name="lvs/v")
    assert bd["driver_specific"]["lvol"]["base_snapshot"] == "s1"
    assert await read(t, "lvs/v", 0, 8) == a and await read(t, "lvs/v", 2 * BPC, 8) == b
    k = wrote[-1]
    assert await read(t, "lvs/v", 3 * BPC + k % 8, 1) == pattern(1, k)

    # inflate c: every cluster its own, thick, no parent; then s2 has no clones left
    await ok(t, "bdev_lvol_inflate", name="lvs/c")
    lv = {x["name"]: x for x in await ok(t, "bdev_lvol_get_lvols")}
    assert lv["c"]["num_allocated_clusters"] == 4 and not lv["c"]["is_clone"]
    assert not lv["c"]["is_thin_provisioned"]
    assert await read(t, "lvs/c", 0, 8) == a and await read(t, "lvs/c", 2 * BPC, 8) == b
    assert await read(t, "lvs/c", BPC, 8) == bytes(8 * BS)
    await ok(t, "bdev_lvol_delete", name="lvs/s2")
    assert (await err(t, "bdev_lvol_decouple_parent", name="lvs/c"))[0] == -32602


async def test_grow_lvstore_after_the_base_grew(tmp_path: Path) -> None:
    f = tmp_path / "base.img"
    with open(f, "wb") as fh:
        fh.truncate(16 * MIB)

    async def started() -> Target:
        t = Target(settings([0], allowed_dirs=[str(tmp_path)]))
        await t.start()
        await ok(t, "bdev_uring_create", name="U0", filename=str(f), block_size=BS)
        return t

    t = await started()
    try:
        await ok(t, "bdev_lvol_create_lvstore", bdev_name="U0", lvs_name="lvs",
                 cluster_sz=MIB)
        await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=40,
                 thin_provision=True)
        assert await write(t, "lvs/v", 3, pattern(2, 4)) == 0
        assert (await io(t, "lvs/v", IOType.FLUSH)).status == 0
        before = await lvstore(t)
    finally:
        await t.stop()
    with open(f, "r+b") as fh:
        fh.truncate(48 * MIB)  # the base grew while the target was down
    t = await started()
    try:
        assert await lvstore(t) == before  # found again as it was: growing is asked for
        await ok(t, "bdev_lvol_grow_lvstore", uuid=before["uuid"])
        s = await lvstore(t)
        assert s["total_data_clusters"] == before["total_data_clusters"] + 32
        assert s["free_clusters"] == before["free_clusters"] + 32
        for c in range(20, 40):  # the new clusters take writes
            assert await write(t, "lvs/v", c * BPC, pattern(1, c)) == 0
        assert await read(t, "lvs/v", 3, 2) == pattern(2, 4)
    finally:
        await t.stop()
    t = await started()
    try:
        s2 = await lvstore(t)
        assert s2["total_data_clusters"] == s["total_data_clusters"]
        assert s2["free_clusters"] == s["free_clusters"] - 20
        assert await read(t, "lvs/v", 39 * BPC, 1) == pattern(1, 39)
    finally:
        await t.stop()


async def test_grow_live_by_rescan_and_the_limit_of_the_metadata(tmp_path: Path) -> None:
    """The base file grows under a running target: bdev_uring_rescan takes the new size,
    bdev_lvol_grow_lvstore the new clusters, with a volume in use throughout. Past what
    the metadata was sized for at create, the grow is refused and nothing changes; a
    store created with max_growable_size_mib grows that far."""
    f, g = tmp_path / "base.img", tmp_path / "big.img"
    for p in (f, g):
        with open(p, "wb") as fh:
            fh.truncate(16 * MIB)
    t = Target(settings([0], allowed_dirs=[str(tmp_path)]))
    await t.start()
    try:
        await ok(t, "bdev_uring_create", name="U0", filename=str(f), block_size=BS)
        await ok(t, "bdev_lvol_create_lvstore", bdev_name="U0", lvs_name="lvs",
                 cluster_sz=MIB)
        await ok(t, "bdev_lvol_create", lvs_name="lvs", lvol_name="v", size_in_mib=100,
                 thin_provision=True)
        assert await write(t, "lvs/v", 3, pattern(2, 4)) == 0
        before = await lvstore(t)
        assert before["max_growable_size"] == 60 * MIB  # 15 clusters at create, times 4

        with open(f, "r+b") as fh:
            fh.truncate(40 * MIB)
        await ok(t, "bdev_aio_rescan", name="U0")  # SPDK's two names, one method
        assert t.bdevs.get("U0").num_blocks == 40 * MIB // BS
        assert await lvstore(t) == before  # growing the store is asked for
        await ok(t, "bdev_lvol_grow_lvstore", lvs_name="lvs")
        s = await lvstore(t)
        assert s["total_data_clusters"] == before["total_data_clusters"] + 24
        assert s["free_clusters"] == before["free_clusters"] + 24
        for c in range(14, 40):  # the store's new clusters take first writes
            assert await write(t, "lvs/v", c * BPC, pattern(1, c)) == 0
        assert await read(t, "lvs/v", 3, 2) == pattern(2, 4)
        assert await read(t, "lvs/v", 39 * BPC, 1) == pattern(1, 39)

        # past max_growable_size: refused with the reason, the store as it was
        with open(f, "r+b") as fh:
            fh.truncate(80 * MIB)
        await ok(t, "bdev_uring_rescan", name="U0")
        grown = await lvstore(t)
        code, msg = await err(t, "bdev_lvol_grow_lvstore", lvs_name="lvs")
        assert code == -errno.ENOSPC
        assert "room for 60 clusters" in msg and "max_growable_size" in msg, msg
        assert "not grown" in msg
        assert await lvstore(t) == grown

        # a shrink under a claimed bdev is refused (here it would cut off nothing the
        # store uses yet, but the bdev does not know what its user will address)
        with open(f, "r+b") as fh:
            fh.truncate(70 * MIB)
        code, msg = await err(t, "bdev_uring_rescan", name="U0")
        assert code == EBUSY and "in use by lvstore" in msg, msg
        assert t.bdevs.get("U0").num_blocks == 80 * MIB // BS
        with open(f, "r+b") as fh:
            fh.truncate(80 * MIB)
        assert await read(t, "lvs/v", 39 * BPC, 1) == pattern(1, 39)

        # an operator who expects growth says so at create
        await ok(t, "bdev_uring_create", name="U1", filename=str(g), block_size=BS)
        await ok(t, "bdev_lvol_create_lvstore", bdev_name="U1", lvs_name="big",
                 cluster_sz=MIB, max_growable_size_mib=1024)
        b = await lvstore(t, "big")
        assert b["max_growable_size"] == 1024 * MIB and b["total_data_clusters"] == 15
        with open(g, "r+b") as fh:
            fh.truncate(200 * MIB)
        await ok(t, "bdev_uring_rescan", name="U1")
        await ok(t, "bdev_lvol_grow_lvstore", lvs_name="big")
        assert (await lvstore(t, "big"))["total_data_clusters"] == 199
        code, msg = await err(t, "bdev_lvol_create_lvstore", bdev_name="U1", lvs_name="x",
                              max_growable_size_mib=8)
        assert code == EBUSY  # (claimed: the option is checked on a free base below)

        # unused, a bdev takes a shrink too; to less than one block it does not
        h = tmp_path / "free.img"
        with open(h, "wb") as fh:
            fh.truncate(8 * MIB)
        await ok(t, "bdev_uring_create", name="U2", filename=str(h), block_size=BS)
        os.truncate(h, 2 * MIB + 100)
        await ok(t, "bdev_uring_rescan", name="U2")
        assert t.bdevs.get("U2").num_blocks == 2 * MIB // BS
        os.truncate(h, BS - 1)
        code, msg = await err(t, "bdev_uring_rescan", name="U2")
        assert code == -32602 and "no whole block" in msg, msg
        assert t.bdevs.get("U2").num_blocks == 2 * MIB // BS

        # bad rescans: not a file bdev, no such bdev
        await ok(t, "bdev_malloc_create", name="M0", num_blocks=8 * MIB // BS, block_size=BS)
        code, msg = await err(t, "bdev_uring_rescan", name="M0")
        assert code == -32602 and "not a file or block device" in msg
        assert (await err(t, "bdev_uring_rescan", name="nope"))[0] == ENODEV
        code, msg = await err(t, "bdev_lvol_create_lvstore", bdev_name="M0", lvs_name="x",
                              cluster_sz=MIB, max_growable_size_mib=4)
        assert code == -32602 and "less than the base" in msg
        code, msg = await err(t, "bdev_lvol_create_lvstore", bdev_name="M0", lvs_name="x",
                              cluster_sz=4096, max_growable_size_mib=1 << 20)
        assert code == -32602 and "choose a smaller max_growable_size" in msg
        assert t.bdevs.get("M0").claimed_by is None
    finally:
        await t.stop()

    # the grown store is found again by a new target, as grown
    t = Target(settings([0], allowed_dirs=[str(tmp_path)]))
    await t.start()
    try:
        await ok(t, "bdev_uring_create", name="U0", filename=str(f), block_size=BS)
        assert await lvstore(t) == grown
        assert await read(t, "lvs/v", 39 * BPC, 1) == pattern(1, 39)
    finally:
        await t.stop()
