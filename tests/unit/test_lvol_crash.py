"""Crash consistency of lvol store metadata, proved by crashing at every write and flush.

The store runs on a `CrashDisk`: a bdev with a volatile write cache, modelled as two
images, what reads see and what survives power loss (only what a Flush covered). Before
every write and every flush the disk records the media a crash *there* could leave:

* only the durable image (nothing since the last flush reached the media);
* everything written so far reached it;
* random subsets of the writes since the last flush, each write torn at block
  granularity (a cache drains in any order, one block at a time).

Each image is then brought up as a new target would (examine), and checked:

* the store is there or not exactly as before or after the operation, and its metadata
  (names, sizes, flags, every cluster map) equals the state before or the state after,
  never a mix;
* no cluster is owned twice (the examiner refuses such a store: it must be found);
* every acknowledged write reads back, byte for byte, through the recovered maps; a
  cluster the operation was allocating reads either zeroes or the new data.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from blocktarget.app import Target
from blocktarget.bdev import Bdev, BdevIO, IOChannel, IOType, Status
from blocktarget.config import Settings
from blocktarget.lvol.format import UNMAPPED, Metadata, resolve
from blocktarget.lvol.module import examine, stores_of
from blocktarget.lvol.store import LvolStore

BS = 512
CLUSTER = 64 * 1024
BPC = CLUSTER // BS
DISK_BLOCKS = 8192  # 4 MiB: 63-ish clusters after the metadata
SUBSETS = 3


class CrashDiskChannel(IOChannel):
    bdev: CrashDisk

    def _submit(self, io: BdevIO) -> None:
        d = self.bdev
        a, n = io.offset_blocks * BS, io.num_blocks * BS
        t = io.type
        if t == IOType.READ:
            data = memoryview(d.cur)[a:a + n]
            if io.buf is None:
                io.buf = bytearray(data)
            else:
                io.buf[:n] = data
        elif t in (IOType.WRITE, IOType.WRITE_ZEROES, IOType.UNMAP):
            d.point()
            data = bytes(io.buf) if t == IOType.WRITE else bytes(n)
            d.cur[a:a + n] = data
            d.pending.append((a, data))
        elif t == IOType.FLUSH:
            d.point()
            d.durable[:] = d.cur
            d.pending.clear()
        self.complete(io, Status.SUCCESS)


class CrashDisk(Bdev):
    def __init__(self, name: str, image: bytes | None = None) -> None:
        blocks = DISK_BLOCKS if image is None else len(image) // BS
        super().__init__(name=name, block_size=BS, num_blocks=blocks, module="crashdisk",
                         write_cache=True,
                         io_types=frozenset({IOType.READ, IOType.WRITE, IOType.FLUSH,
                                             IOType.UNMAP, IOType.WRITE_ZEROES}))
        self.cur = bytearray(image if image is not None else bytes(blocks * BS))
        self.durable = bytearray(self.cur)
        self.pending: list[tuple[int, bytes]] = []
        self.on_point: Callable[[CrashDisk], None] | None = None
        self.points = 0

    def create_channel(self, reactor: Any) -> IOChannel:
        return CrashDiskChannel(self, reactor)

    def grow(self, blocks: int) -> None:
        """The device got bigger (a file extended, a volume resized): the new blocks read
        zeroes and are durable as such, as a file's hole is."""
        more = bytes((blocks - self.num_blocks) * BS)
        self.cur += more
        self.durable += more
        self.num_blocks = blocks

    def point(self) -> None:
        self.points += 1
        if self.on_point is not None:
            self.on_point(self)

    def crash_images(self, rng: random.Random) -> list[bytes]:
        out = [bytes(self.durable), bytes(self.cur)]
        for _ in range(SUBSETS):
            img = bytearray(self.durable)
            for off, data in self.pending:
                for b in range(0, len(data), BS):
                    if rng.random() < 0.5:
                        img[off + b:off + b + BS] = data[b:b + BS]
            out.append(bytes(img))
        return out


def settings() -> Settings:
    return Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False)


class Harness:
    """A target (reactor-less: every I/O completes synchronously) with one CrashDisk,
    the acknowledged data of each volume, and the crash images of the operation running."""

    def __init__(self, t: Target) -> None:
        self.t = t
        self.disk = CrashDisk("D0")
        t.bdevs.add(self.disk)
        self.rng = random.Random(16)
        self.images: list[bytes] = []
        self.acked: dict[str, dict[int, bytes]] = {}  # volume uuid -> block -> data
        self.loose: dict[str, set[int]] = {}  # blocks the host deallocated

    async def call(self, method: str, **params: Any) -> Any:
        resp = await self.t.dispatcher.handle(
            {"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        assert "error" not in resp, resp
        return resp["result"]

    def store(self) -> LvolStore | None:
        return next(iter(stores_of(self.t)), None)

    def state(self) -> Metadata | None:
        s = self.store()
        return None if s is None else s.md.copy()

    async def crashing(self, op: Callable[[], Any]) -> tuple[Metadata | None, Metadata | None,
                                                             list[bytes]]:
        """Run op, recording crash images at every write and flush; (before, after, images)."""
        before = self.state()
        images: list[bytes] = []
        self.disk.on_point = lambda d: images.extend(d.crash_images(self.rng))
        try:
            await op()
        finally:
            self.disk.on_point = None
        images.extend(self.disk.crash_images(self.rng))  # and right after it returned
        assert images
        return before, self.state(), images

    def io(self, name: str, kind: IOType, offset: int, blocks: int, buf: Any = None
           ) -> BdevIO:
        bdev = self.t.bdevs.get(name)
        got: list[BdevIO] = []
        bdev.get_io_channel(None).submit(BdevIO(kind, offset, blocks, buf, got.append))
        assert got, "a reactor-less channel completes at once"
        return got[0]

    def write(self, name: str, offset: int, data: bytes) -> None:
        """Write and flush: durable from here on (a write without Flush or FUA may be
        lost in a crash on a volatile cache, by the durability contract)."""
        x = self.io(name, IOType.WRITE, offset, len(data) // BS, data)
        assert x.status == 0
        assert self.io(name, IOType.FLUSH, 0, 0).status == 0
        vol = self.t.bdevs.get(name).uuid
        for i in range(len(data) // BS):
            self.acked.setdefault(vol, {})[offset + i] = data[i * BS:(i + 1) * BS]


async def recover(image: bytes) -> tuple[Target, LvolStore | None]:
    t = Target(settings())
    disk = CrashDisk("D0", image)
    t.bdevs.add(disk)
    await examine(t, disk)
    store = next(iter(stores_of(t)), None)
    if store is None:
        assert disk.claimed_by is None
    return t, store


ZERO = bytes(BS)


def check_data(h: Harness, img: bytes, store: LvolStore, which: str,
               new_data: dict[str, dict[int, tuple[bytes, bytes]]]) -> None:
    """Every block of every recovered volume, read as the volume reads it (its own
    cluster, else its parent's, up the chain): acknowledged data where it was written,
    the in-flight write's data or the block's previous value where it went, zeroes
    everywhere else (never a deleted volume's leftovers), except blocks the host
    deallocated (old data or zeroes)."""
    md = store.md
    for vol, rec in md.volumes.items():
        acked, new, loose = h.acked.get(vol, {}), new_data.get(vol, {}), h.loose.get(vol, set())
        for vc in range(rec.num_clusters):
            pc = resolve(md, rec, vc)
            if pc == UNMAPPED:
                for b in range(vc * BPC, (vc + 1) * BPC):
                    if b in new:
                        assert which == "before" and new[b][1] == ZERO, (
                            f"{rec.name} block {b}: the new cluster is gone")
                    elif b in acked and b not in loose:
                        raise AssertionError(f"{rec.name}: acknowledged block {b} unmapped")
                continue
            a = store.sb.cluster_offset(pc)
            got = img[a:a + CLUSTER]
            for i in range(BPC):
                b = vc * BPC + i
                blk = got[i * BS:(i + 1) * BS]
                if b in new:
                    data, prev = new[b]
                    assert blk == data if which == "after" else blk in (data, prev), (
                        f"{rec.name} block {b}: neither the new data nor the old")
                elif b in loose:
                    continue
                elif b in acked:
                    assert blk == acked[b], f"{rec.name}: acknowledged block {b} lost"
                else:
                    assert blk == ZERO, f"{rec.name}: block {b} reads stale data"


async def check_all(h: Harness, before: Metadata | None, after: Metadata | None,
                    images: list[bytes],
                    new_data: dict[str, dict[int, tuple[bytes, bytes]]] | None = None) -> int:
    """Every image recovers to `before` or `after`, with the acknowledged data."""
    seen = set()
    for img in images:
        t, store = await recover(img)
        try:
            if (before is None) != (after is None) and store is None:
                seen.add("absent")
                continue
            assert store is not None, "the store vanished"
            md = store.md
            assert md in (before, after), f"recovered metadata is neither before nor after: {md}"
            which = "before" if md == before else "after"
            seen.add(which)
            check_data(h, img, store, which, new_data or {})
        finally:
            await t.stop()
    return len(seen)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    t = Target(settings())
    yield Harness(t)
    await t.stop()


def pattern(blocks: int, seed: int) -> bytes:
    return bytes(((i * 31 + seed) & 0xFF) or 1 for i in range(blocks * BS))


async def test_create_lvstore_is_atomic(h: Harness) -> None:
    before, after, images = await h.crashing(lambda: h.call(
        "bdev_lvol_create_lvstore", bdev_name="D0", lvs_name="lvs", cluster_sz=CLUSTER))
    assert before is None and after is not None
    assert await check_all(h, before, after, images) == 2  # both outcomes were reachable


async def test_every_metadata_change_is_atomic(h: Harness) -> None:
    await h.call("bdev_lvol_create_lvstore", bdev_name="D0", lvs_name="lvs",
                 cluster_sz=CLUSTER, clear_method="none")
    # garbage in the data region, as a deleted volume would leave it: a new cluster must
    # read zeroes all the same
    store = h.store()
    assert store is not None
    a = store.sb.data_offset
    h.disk.cur[a:] = b"\xee" * (len(h.disk.cur) - a)
    h.disk.durable[:] = h.disk.cur

    # metadata spanning several blocks, so a torn slot write is possible at all
    for i in range(12):
        await h.call("bdev_lvol_create", lvs_name="lvs", lvol_name=f"{i:063d}",
                     size_in_mib=1, thin_provision=True)
    store = h.store()
    assert store is not None
    assert len(store.md.volumes) == 12

    ops: list[tuple[str, Callable[[], Any]]] = [
        ("create thick", lambda: h.call("bdev_lvol_create", lvs_name="lvs", lvol_name="thick",
                                        size_in_mib=1, thin_provision=False)),
        ("create thin", lambda: h.call("bdev_lvol_create", lvs_name="lvs", lvol_name="thin",
                                       size_in_mib=2, thin_provision=True)),
    ]
    for what, op in ops:
        before, after, images = await h.crashing(op)
        assert before != after, what
        assert await check_all(h, before, after, images) == 2, what

    h.write("lvs/thick", 3, pattern(4, 1))  # acknowledged: must survive everything below

    # a first write to a thin cluster, straddling two clusters
    data = pattern(8, 2)
    thin = h.t.bdevs.get("lvs/thin").uuid
    before, after, images = await h.crashing(
        lambda: _async(lambda: h.write("lvs/thin", BPC - 4, data)))
    new = {thin: {BPC - 4 + i: (data[i * BS:(i + 1) * BS], ZERO) for i in range(8)}}
    assert await check_all(h, before, after, images, new) == 2

    more = [
        ("grow thin", lambda: h.call("bdev_lvol_resize", name="lvs/thin", size_in_mib=4)),
        ("grow thick", lambda: h.call("bdev_lvol_resize", name="lvs/thick", size_in_mib=2)),
        ("rename", lambda: h.call("bdev_lvol_rename", old_name="lvs/thin", new_name="t2")),
        ("read-only", lambda: h.call("bdev_lvol_set_read_only", name="lvs/thick")),
        ("rename store", lambda: h.call("bdev_lvol_rename_lvstore", old_name="lvs",
                                        new_name="pool")),
        ("deallocate a cluster", lambda: _async(lambda: _unmap(h, "pool/t2", 0, BPC))),
        ("shrink", lambda: h.call("bdev_lvol_resize", name="pool/thick", size_in_mib=1)),
        ("delete", lambda: h.call("bdev_lvol_delete", name="pool/t2")),
    ]
    for what, op in more:
        if what == "deallocate a cluster":  # the host deallocated these: no longer owed
            h.loose[thin] = set(range(BPC))
        before, after, images = await h.crashing(op)
        assert before != after, what
        assert await check_all(h, before, after, images) == 2, what

    # snapshots and clones: the snapshot takes the clusters, first writes copy them
    await h.call("bdev_lvol_create", lvs_name="pool", lvol_name="origin", size_in_mib=1)
    h.write("pool/origin", 0, pattern(BPC, 5))
    origin = h.t.bdevs.get("pool/origin").uuid
    before, after, images = await h.crashing(
        lambda: h.call("bdev_lvol_snapshot", lvol_name="pool/origin", snapshot_name="snap"))
    snap = h.t.bdevs.get("pool/snap").uuid
    h.acked[snap] = dict(h.acked[origin])
    assert await check_all(h, before, after, images) == 2, "snapshot"
    before, after, images = await h.crashing(
        lambda: h.call("bdev_lvol_clone", snapshot_name="pool/snap", clone_name="clone"))
    clone = h.t.bdevs.get("pool/clone").uuid
    h.acked[clone] = dict(h.acked[snap])
    assert await check_all(h, before, after, images) == 2, "clone"
    for name, vol, seed in (("pool/origin", origin, 6), ("pool/clone", clone, 7)):
        data = pattern(4, seed)
        prev = dict(h.acked[vol])
        before, after, images = await h.crashing(
            lambda n=name, d=data: _async(lambda: h.write(n, 10, d)))
        new = {vol: {10 + i: (data[i * BS:(i + 1) * BS], prev[10 + i]) for i in range(4)}}
        assert await check_all(h, before, after, images, new) == 2, f"copy-on-write {name}"
    # a second level: origin -> snap2 -> snap; then decouple and inflate (copy_batch
    # large: one commit, so each crash image is before or after as a whole)
    before, after, images = await h.crashing(
        lambda: h.call("bdev_lvol_snapshot", lvol_name="pool/origin", snapshot_name="snap2"))
    h.acked[h.t.bdevs.get("pool/snap2").uuid] = dict(h.acked[origin])
    assert await check_all(h, before, after, images) == 2, "snapshot of a clone"
    store = h.store()
    assert store is not None
    store.copy_batch = 1 << 20
    for method, name in (("bdev_lvol_decouple_parent", "pool/origin"),
                         ("bdev_lvol_inflate", "pool/clone")):
        before, after, images = await h.crashing(lambda m=method, n=name: h.call(m, name=n))
        assert await check_all(h, before, after, images) == 2, method
    for name in ("pool/clone", "pool/origin", "pool/snap2", "pool/snap"):
        before, after, images = await h.crashing(
            lambda n=name: h.call("bdev_lvol_delete", name=n))
        assert await check_all(h, before, after, images) == 2, f"delete {name}"

    before, after, images = await h.crashing(
        lambda: h.call("bdev_lvol_delete_lvstore", lvs_name="pool"))
    assert after is None
    assert await check_all(h, before, after, images) == 2
    assert h.disk.claimed_by is None


def _unmap(h: Harness, name: str, offset: int, blocks: int) -> None:
    assert h.io(name, IOType.UNMAP, offset, blocks).status == 0


async def _async(fn: Callable[[], None]) -> None:
    fn()


async def test_grow_lvstore_is_atomic(h: Harness) -> None:
    """A crash at any write or flush of bdev_lvol_grow_lvstore leaves the store with its
    old or its new cluster count, every acknowledged block intact; the first write into
    a grown cluster is as atomic as any other allocation; a grow refused for want of
    metadata room writes nothing."""
    await h.call("bdev_lvol_create_lvstore", bdev_name="D0", lvs_name="lvs",
                 cluster_sz=CLUSTER, clear_method="none")
    store = h.store()
    assert store is not None
    old_total = store.total_clusters
    # a thin volume over-committed past the store, with data in its last clusters
    await h.call("bdev_lvol_create", lvs_name="lvs", lvol_name="v",
                 size_in_mib=3 * DISK_BLOCKS * BS // (1 << 20), thin_provision=True)
    for c in range(old_total):
        h.write("lvs/v", c * BPC + c % BPC, pattern(1, c))
    assert store.free_clusters() == 0

    h.disk.grow(2 * DISK_BLOCKS)  # what a rescan of a grown file does to the bdev
    before, after, images = await h.crashing(
        lambda: h.call("bdev_lvol_grow_lvstore", lvs_name="lvs"))
    assert before is not None and after is not None
    assert after.total_clusters > before.total_clusters == old_total
    assert await check_all(h, before, after, images) == 2

    # a first write to a cluster the grow brought in, straddling into the next one
    vol = h.t.bdevs.get("lvs/v").uuid
    first = old_total * BPC - 2  # the last two blocks of the old last cluster, and on
    data = pattern(6, 9)
    prev = {first + i: h.acked[vol].get(first + i, ZERO) for i in range(6)}
    before, after, images = await h.crashing(
        lambda: _async(lambda: h.write("lvs/v", first, data)))
    new = {vol: {first + i: (data[i * BS:(i + 1) * BS], prev[first + i]) for i in range(6)}}
    assert await check_all(h, before, after, images, new) == 2

    # past the metadata's room: refused, and not one write or flush reached the disk
    assert store.sb.max_clusters < 8 * old_total
    h.disk.grow(16 * DISK_BLOCKS)
    points = h.disk.points
    resp = await h.t.dispatcher.handle({"jsonrpc": "2.0", "id": 2, "method":
                                        "bdev_lvol_grow_lvstore",
                                        "params": {"lvs_name": "lvs"}})
    assert resp["error"]["code"] == -28 and "not grown" in resp["error"]["message"]
    assert h.disk.points == points
