"""Block atomicity of the pmem bdev, proved by crashing at every persist point.

The pool engine does all its stores through a `PersistentMemory`; here that is a recorder
that keeps two images of the pool: what the CPU sees (every store) and what would survive
a power failure (only lines that were flushed and then drained). Each drain is a crash
point: before the drain completes, the test builds the surviving image, reopens it (which
runs recovery) and checks that

* the pool is consistent: every physical block is owned by exactly one LBA or one free
  list slot (no block mapped twice, no block lost);
* every block reads either its contents before the operation in flight or the new
  contents, byte for byte, never a mix; blocks outside the operation read what they held;
  once an operation returned, only its new contents are acceptable.

Persistent memory can also write back stores nobody flushed yet (a cache line evicted
early), in any order at 8-byte granularity. So besides the strict image ("nothing after
the last drain survives") each crash point is checked with random subsets of the
unpersisted 8-byte words included, and when recovery itself has work to do, recovery is
crashed at its own persist points and recovered again.
"""

from __future__ import annotations

import os
import random
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from blocktarget.bdevs.pmem import (
    FLOG_PAIR,
    INFO_SIZE,
    Layout,
    PersistentMemory,
    Pool,
    PoolError,
    c_engine_available,
    format_pool,
)

LINE = 64
WORD = 8


class CrashRecorder(PersistentMemory):
    """A pool image with a CPU view and a durable view, and a hook at every drain.

    A fence orders only the flushes of its own CPU, so flushed lines are kept per lane
    (the test sets `lane` to the lane whose operation runs, one CPU per lane) and a drain
    makes durable only its own lane's lines.
    """

    def __init__(self, image: bytes | bytearray,
                 on_drain: Callable[[CrashRecorder], None] | None = None) -> None:
        self.cur = bytearray(image)
        self.mem = memoryview(self.cur)
        self.durable = bytearray(image)
        self.lane = 0
        self.flushed: dict[int, dict[int, bytes]] = {}  # lane -> cache line -> contents
        self.dirty: set[int] = set()  # lines whose CPU view may differ from the durable one
        self.on_drain = on_drain
        self.drains = 0

    @property
    def staged(self) -> dict[int, bytes]:
        return self.flushed.setdefault(self.lane, {})

    def _touch(self, off: int, length: int) -> None:
        self.dirty.update(range(off // LINE, (off + length - 1) // LINE + 1))

    stored = _touch  # the C engine stores into `cur` itself, then says where

    def store(self, off: int, value: int, width: int) -> None:
        assert off % width == 0, f"unaligned {width}-byte store at {off}"
        assert off // WORD == (off + width - 1) // WORD, "a store must stay in one 8-byte word"
        struct.pack_into("<Q" if width == 8 else "<I", self.cur, off, value)
        self._touch(off, width)

    def write(self, off: int, data: Any) -> None:
        n = len(data)
        self.cur[off:off + n] = data
        self._touch(off, n)

    def copy_flush(self, off: int, src: Any) -> None:
        self.write(off, src)
        self.flush(off, len(src))

    def flush(self, off: int, length: int) -> None:
        for line in range(off // LINE, (off + length - 1) // LINE + 1):
            self.staged[line] = bytes(self.cur[line * LINE:(line + 1) * LINE])

    def drain(self) -> None:
        if self.on_drain is not None:
            self.on_drain(self)  # the crash happens before this drain completes
        for line, data in self.staged.items():
            self.durable[line * LINE:(line + 1) * LINE] = data
            if self.cur[line * LINE:(line + 1) * LINE] == data:
                self.dirty.discard(line)
        self.staged.clear()
        self.drains += 1

    def crash_image(self, rng: random.Random | None = None) -> bytearray:
        """The media after a crash now: the durable image, plus (with rng) a random
        subset of the 8-byte words stored but not yet drained."""
        img = bytearray(self.durable)
        if rng is not None:
            pending = set(self.dirty)
            for lines in self.flushed.values():
                pending.update(lines)
            for line in sorted(pending):
                for w in range(line * LINE, (line + 1) * LINE, WORD):
                    if self.cur[w:w + WORD] != img[w:w + WORD] and rng.random() < 0.5:
                        img[w:w + WORD] = self.cur[w:w + WORD]
        return img


@dataclass
class Checker:
    """The model of what every block may read after a crash, and the crash verifier."""

    layout: Layout
    rng: random.Random
    variants: int = 2  # random unpersisted-word images per crash point (plus the strict one)
    nested: bool = True
    model: list[bytes] = field(default_factory=list)
    pending: tuple[int, list[bytes]] | None = None
    group: dict[int, bytes] | None = None  # a group commit's blocks in flight: lba -> new
    crashes: int = 0
    saw_old: int = 0
    saw_new: int = 0
    recoveries: int = 0

    def __post_init__(self) -> None:
        self.model = [bytes(self.layout.block_size)] * self.layout.num_blocks

    def on_drain(self, rec: CrashRecorder) -> None:
        self.verify(rec.crash_image(), nested=self.nested)
        for _ in range(self.variants):
            self.verify(rec.crash_image(self.rng), nested=False)

    def allowed(self, lba: int) -> tuple[bytes, ...]:
        if self.group is not None and lba in self.group:
            return (self.model[lba], self.group[lba])
        if self.pending is not None:
            start, new = self.pending
            if start <= lba < start + len(new):
                return (self.model[lba], new[lba - start])
        return (self.model[lba],)

    def verify(self, img: bytearray, *, nested: bool) -> None:
        self.crashes += 1
        inner: list[bytearray] = []
        rec = CrashRecorder(img, on_drain=(lambda r: inner.append(r.crash_image()))
                            if nested else None)
        pool = Pool(rec)  # recovery
        if pool.recovered:
            self.recoveries += 1
        assert pool.check() == [], "pool inconsistent after recovery"
        self.check_contents(pool)
        # crashing recovery itself and recovering again must end in a valid state too
        for again in inner:
            p2 = Pool(CrashRecorder(again))
            assert p2.check() == []
            self.check_contents(p2, count=False)
        # recovery is idempotent: reopening what it left changes nothing
        p3 = Pool(CrashRecorder(rec.durable))
        assert p3.recovered == 0, "a second recovery found work: the first one did not persist"
        # and the recovered pool takes writes
        bs = self.layout.block_size
        lba = self.rng.randrange(self.layout.num_blocks)
        data = self.rng.randbytes(bs)
        p3.write(self.rng.randrange(self.layout.lanes), lba, 1, memoryview(data))
        out = bytearray(bs)
        p3.read(0, lba, 1, memoryview(out))
        assert out == data
        assert p3.check() == []

    def check_contents(self, pool: Pool, *, count: bool = True) -> None:
        bs, nb = self.layout.block_size, self.layout.num_blocks
        out = bytearray(nb * bs)
        pool.read(0, 0, nb, memoryview(out))
        for lba in range(nb):
            got = bytes(out[lba * bs:(lba + 1) * bs])
            allowed = self.allowed(lba)
            if got not in allowed:
                kind = "torn (a mix of old and new)" if len(allowed) == 2 else "wrong"
                raise AssertionError(f"block {lba} is {kind} after a crash")
            if count and len(allowed) == 2 and allowed[0] != allowed[1]:
                if got == allowed[0]:
                    self.saw_old += 1
                else:
                    self.saw_new += 1


def _layout(entry_size: int, *, num_blocks: int = 20, block_size: int = 512, lanes: int = 3,
            free_per_lane: int = 2) -> Layout:
    return Layout.compute(num_blocks, block_size, lanes, free_per_lane, entry_size)


def _fresh(layout: Layout) -> CrashRecorder:
    rec = CrashRecorder(bytes(layout.file_size))
    format_pool(rec, layout, uuid.uuid4().bytes)
    return rec


def run_random_ops(seed: int, entry_size: int, ops: int, *, core: bool = False,
                   **layout_kw: int) -> Checker:
    """``core``: the pool under test runs the C engine (csrc/be_pmem.c); recovery and
    the checks are Python's either way."""
    rng = random.Random(seed)
    layout = _layout(entry_size, **layout_kw)
    rec = _fresh(layout)
    pool = Pool(rec, core=core)
    assert (pool.core is not None) == core
    chk = Checker(layout, random.Random(seed + 1))
    rec.on_drain = chk.on_drain
    bs, nb = layout.block_size, layout.num_blocks
    for _ in range(ops):
        lba = rng.randrange(nb)
        count = rng.randint(1, min(layout.free_per_lane * 2 + 1, nb - lba))
        lane = rng.randrange(layout.lanes)
        rec.lane = lane  # this lane's CPU issues the flushes and fences
        if rng.random() < 0.8:
            new = [rng.randbytes(bs) for _ in range(count)]
            chk.pending = (lba, new)
            pool.write(lane, lba, count, memoryview(b"".join(new)))
        else:
            new = [bytes(bs)] * count
            chk.pending = (lba, new)
            pool.zero(lane, lba, count)
        chk.pending = None
        chk.model[lba:lba + count] = new
    # a crash after the last persist: everything acknowledged survives
    chk.verify(rec.crash_image(), nested=False)
    assert pool.check() == []
    return chk


@pytest.mark.parametrize("entry_size", [4, 8])
@pytest.mark.parametrize("seed", [1, 2])
def test_crash_at_every_persist_point(seed: int, entry_size: int) -> None:
    chk = run_random_ops(seed * 100 + entry_size, entry_size, ops=60)
    # the harness really crashed in the middle of writes and saw both outcomes
    assert chk.crashes > 60 * 3
    assert chk.saw_old > 0 and chk.saw_new > 0
    assert chk.recoveries > 0, "no crash point needed recovery: the harness missed step 3-4"


def test_one_lane_one_slot() -> None:
    """The smallest free list (one block per lane, one lane) exercises slot reuse hardest."""
    chk = run_random_ops(7, 4, ops=80, num_blocks=6, lanes=1, free_per_lane=1)
    assert chk.saw_old > 0 and chk.saw_new > 0


def test_large_blocks() -> None:
    chk = run_random_ops(11, 4, ops=20, num_blocks=8, block_size=4096, lanes=2, free_per_lane=3)
    assert chk.saw_old > 0 and chk.saw_new > 0


def test_persist_points_of_one_block_write() -> None:
    """One block costs two drains in this order: data with the flog body (and the map
    entries: the one read as `old`, the lane's last write's), the flog's sequence
    number; its map store is persisted by the lane's next write's first drain."""
    layout = _layout(4)
    rec = _fresh(layout)
    pool = Pool(rec)
    seen: list[set[str]] = []

    def where(r: CrashRecorder) -> None:
        regions = set()
        for line in r.staged:
            off = line * LINE
            if layout.flogoff <= off < layout.mapoff:
                regions.add("flog")
            elif layout.mapoff <= off < layout.dataoff:
                regions.add("map")
            elif off >= layout.dataoff:
                regions.add("data")
        seen.append(regions)

    rec.on_drain = where
    pool.write(0, 3, 1, memoryview(bytes([7]) * layout.block_size))
    assert seen == [{"data", "flog", "map"}, {"flog"}]
    entry = layout.mapoff + 3 * layout.entry_size
    assert rec.cur[entry:entry + 4] != rec.durable[entry:entry + 4]  # stored, not persisted
    # the lane's next write, far from LBA 3 (another map line), persists it first
    far = layout.num_blocks - 1
    assert (layout.mapoff + far * layout.entry_size) // LINE != entry // LINE
    staged: list[set[int]] = []
    rec.on_drain = lambda r: staged.append(set(r.staged))
    pool.write(0, far, 1, memoryview(bytes([8]) * layout.block_size))
    assert entry // LINE in staged[0]
    assert rec.cur[entry:entry + 4] == rec.durable[entry:entry + 4]


@pytest.mark.parametrize("core", [False, True], ids=["python", "c"])
def test_another_lane_persists_the_map_entry_it_reads_as_old(core: bool) -> None:
    """Lane 1 writes an LBA and returns with its map store not persisted; lane 0 then
    writes the same LBA, reading that entry as its `old`. Whatever survives of lane 0's
    write, recovery (which visits lane 0's slots first) must leave no block owned twice:
    lane 0's first drain persists the entry lane 1 stored."""
    if core and not c_engine_available():
        pytest.skip("blocktarget._fastpath (the C engine) not built")
    layout = _layout(4, num_blocks=8, lanes=2, free_per_lane=1)
    rec = _fresh(layout)
    pool = Pool(rec, core=core)
    bs = layout.block_size
    a, b = bytes([1]) * bs, bytes([2]) * bs
    rec.lane = 1
    pool.write(1, 5, 1, memoryview(a))
    entry = layout.mapoff + 5 * layout.entry_size
    assert rec.cur[entry:entry + 4] != rec.durable[entry:entry + 4]
    images: list[bytearray] = []
    rec.on_drain = lambda r: images.append(r.crash_image())
    rec.lane = 0
    pool.write(0, 5, 1, memoryview(b))
    images.append(rec.crash_image())  # returned: its own map store not persisted either
    assert len(images) == 3
    for i, img in enumerate(images):
        after = Pool(CrashRecorder(img))
        assert after.check() == [], f"crash point {i}"
        out = bytearray(bs)
        after.read(0, 5, 1, memoryview(out))
        assert bytes(out) == (b if i == 2 else a), f"crash point {i}"


def test_crash_while_formatting() -> None:
    """Before the primary info block is durable the file is not a pool (a clear error);
    from the backup info block on it opens, repaired, as an empty pool."""
    layout = _layout(4)
    outcomes: list[str] = []

    def crash(r: CrashRecorder) -> None:
        for rng in (None, random.Random(len(outcomes))):
            img = r.crash_image(rng)
            try:
                pool = Pool(CrashRecorder(img))
            except PoolError as exc:
                outcomes.append(f"refused: {exc}")
                continue
            assert pool.check() == []
            out = bytearray(layout.num_blocks * layout.block_size)
            pool.read(0, 0, layout.num_blocks, memoryview(out))
            assert not any(out)
            outcomes.append("empty pool")

    rec = CrashRecorder(bytes(layout.file_size), on_drain=crash)
    format_pool(rec, layout, uuid.uuid4().bytes)
    assert any(o.startswith("refused") for o in outcomes)
    assert "empty pool" in outcomes
    assert Pool(CrashRecorder(rec.durable)).check() == []


def test_info_block_backup_repairs_primary() -> None:
    layout = _layout(4)
    rec = _fresh(layout)
    img = bytearray(rec.durable)
    img[100] ^= 0xFF  # a bit flip in the primary info block: checksum mismatch
    pool = Pool(CrashRecorder(img))
    assert pool.repaired and "backup" in pool.repaired[0]
    assert pool.layout == layout
    fixed = pool.pm.mem[:INFO_SIZE].tobytes()
    assert fixed == rec.durable[:INFO_SIZE]

    img = bytearray(rec.durable)
    img[layout.backupoff + 100] ^= 0xFF
    pool = Pool(CrashRecorder(img))
    assert pool.repaired == ["backup info block rewritten from the primary"]

    img = bytearray(rec.durable)
    img[100] ^= 0xFF
    img[layout.backupoff + 100] ^= 0xFF
    with pytest.raises(PoolError, match="checksum"):
        Pool(CrashRecorder(img))


def test_not_a_pool() -> None:
    with pytest.raises(PoolError, match="signature"):
        Pool(CrashRecorder(bytes(3 * INFO_SIZE)))
    layout = _layout(4)
    img = bytearray(_fresh(layout).durable)
    with pytest.raises(PoolError, match="bytes"):  # truncated file
        Pool(CrashRecorder(img[:-INFO_SIZE]))


def test_corrupt_flog_is_refused() -> None:
    layout = _layout(4)
    img = bytearray(_fresh(layout).durable)
    off = layout.flogoff + FLOG_PAIR  # slot 1: make both entries claim seq 1
    struct.pack_into("<Q", img, off + 32 + 24, 1)
    with pytest.raises(PoolError, match="flog slot 1"):
        Pool(CrashRecorder(img))


def test_check_finds_a_doubly_mapped_block() -> None:
    """The consistency check is what the crash tests trust; it must catch corruption."""
    layout = _layout(4)
    rec = _fresh(layout)
    pool = Pool(rec)
    pool.write(0, 0, 1, memoryview(bytes(layout.block_size)))
    assert pool.check() == []
    raw = pool._map[0]
    rec.store(layout.mapoff + 4, raw, 4)  # map[1] -> the block map[0] owns
    problems = pool.check()
    assert any("owned twice" in p for p in problems)
    assert any("owned by nobody" in p for p in problems)


class InPlacePool(Pool):
    """A deliberately wrong engine: overwrites the live block in place (no BTT)."""

    def _write_chunk(self, ln, lba, n, src, pos):  # type: ignore[no-untyped-def]
        bs = self.block_size
        for i in range(n):
            raw = self._map[lba + i]
            phys = raw & self._mask if raw >> self._shift else lba + i
            self.pm.copy_flush(self._dataoff + phys * bs, src[pos + i * bs:pos + (i + 1) * bs])
            self.pm.drain()
            self._store_map(lba + i, self._normal | phys)
            self.pm.persist(self._mapoff + (lba + i) * self._es, self._es)


def test_harness_catches_torn_in_place_writes() -> None:
    """The harness has teeth: an engine that writes blocks in place tears them, and the
    random unpersisted-word images expose it (recovery, as always, is the real one)."""
    layout = _layout(4)
    rec = _fresh(layout)
    pool = InPlacePool(rec)
    chk = Checker(layout, random.Random(5), variants=4, nested=False)
    rec.on_drain = chk.on_drain
    bs = layout.block_size
    with pytest.raises(AssertionError, match="torn"):
        for _ in range(40):
            lba = chk.rng.randrange(layout.num_blocks)
            new = [chk.rng.randbytes(bs)]
            chk.pending = (lba, new)
            pool.write(0, lba, 1, memoryview(new[0]))
            chk.pending = None
            chk.model[lba] = new[0]


# ---- group commit (csrc/be_pmem.c's bt_pmem_write_group, which the C lane uses for the
# writes of one batch): the C engine only, Python's pools write one by one ----

def _need_c_engine() -> None:
    """Group commit exists only in the C engine: without a compiler there is nothing to
    crash (the Python path writes one by one), but CI builds it, so there it must run."""
    if not c_engine_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but blocktarget._fastpath (the C engine) is not built")
        pytest.skip("blocktarget._fastpath (the C engine) not built")


def write_group(pool: Pool, lane: int, writes: list[tuple[int, bytes]]) -> int:
    """bt_pmem_write_group over (lba, data) pairs; its result code (a failed step raises
    what the recorder raised, as Pool.write does)."""
    from blocktarget.bdevs.pmem import _cffi, _clib

    assert pool.core is not None
    bs = pool.block_size
    bufs = [_cffi.from_buffer("unsigned char[]", data) for _lba, data in writes]
    rc = _clib.bt_pmem_write_group(
        pool.core.c, lane, len(writes), _cffi.new("uint64_t[]", [w[0] for w in writes]),
        _cffi.new("uint64_t[]", [len(w[1]) // bs for w in writes]),
        _cffi.new("const unsigned char *[]", bufs))
    if rc == _clib.BT_PMEM_FAILED:
        raise pool.core.failure("group write")
    return rc


def _random_group(rng: random.Random, layout: Layout) -> list[tuple[int, int]]:
    """(lba, count) of up to free_per_lane blocks in all, no LBA twice."""
    k, nb = layout.free_per_lane, layout.num_blocks
    left, taken, out = k, set(), []
    for _ in range(rng.randint(1, k)):
        if left == 0:
            break
        count = rng.randint(1, min(2, left))
        lba = rng.randrange(nb - count + 1)
        span = set(range(lba, lba + count))
        if span & taken:
            continue
        taken |= span
        out.append((lba, count))
        left -= count
    return out


def run_random_groups(seed: int, entry_size: int, ops: int, **layout_kw: int) -> Checker:
    """Groups, single writes and zeroing on random lanes of a C-engine pool, crashed at
    every drain: every block of a group in flight reads old or new, the rest their
    contents, and nothing a returned group wrote is lost."""
    _need_c_engine()
    rng = random.Random(seed)
    layout = _layout(entry_size, **layout_kw)
    rec = _fresh(layout)
    pool = Pool(rec, core=True)
    chk = Checker(layout, random.Random(seed + 1))
    rec.on_drain = chk.on_drain
    bs, nb = layout.block_size, layout.num_blocks
    groups = 0
    for _ in range(ops):
        lane = rng.randrange(layout.lanes)
        rec.lane = lane
        r = rng.random()
        if r < 0.6:
            spans = _random_group(rng, layout)
            writes = [(lba, rng.randbytes(count * bs)) for lba, count in spans]
            chk.group = {lba + i: data[i * bs:(i + 1) * bs]
                         for lba, data in writes for i in range(len(data) // bs)}
            before = rec.drains
            assert write_group(pool, lane, writes) == 0
            assert rec.drains - before == 2, "a group costs the two drains of one chunk"
            groups += len(writes) > 1
            for lba, new in chk.group.items():
                chk.model[lba] = new
            chk.group = None
        else:
            lba = rng.randrange(nb)
            count = rng.randint(1, min(layout.free_per_lane, nb - lba))
            new = [rng.randbytes(bs) for _ in range(count)] if r < 0.9 else [bytes(bs)] * count
            chk.pending = (lba, new)
            if r < 0.9:
                pool.write(lane, lba, count, memoryview(b"".join(new)))
            else:
                pool.zero(lane, lba, count)
            chk.pending = None
            chk.model[lba:lba + count] = new
    assert groups > ops // 4
    chk.verify(rec.crash_image(), nested=False)
    assert pool.check() == []
    return chk


@pytest.mark.parametrize("entry_size", [4, 8])
@pytest.mark.parametrize("lanes", [1, 3])
def test_crash_at_every_persist_point_of_groups(lanes: int, entry_size: int) -> None:
    chk = run_random_groups(lanes * 10 + entry_size, entry_size, ops=50, lanes=lanes,
                            free_per_lane=4)
    assert chk.saw_old > 0 and chk.saw_new > 0
    assert chk.recoveries > 0, "no crash point needed recovery: the harness missed step 3-4"


def test_group_refuses_an_lba_twice_and_more_than_the_free_list() -> None:
    """Two flog entries for one LBA in one commit would both read the same `old` (one
    block owned twice), and each block needs its own slot: both refused, nothing done."""
    _need_c_engine()
    from blocktarget.bdevs.pmem import _clib

    layout = _layout(4, free_per_lane=3)
    rec = _fresh(layout)
    pool = Pool(rec, core=True)
    bs = layout.block_size
    image, drains = bytes(rec.cur), rec.drains
    for writes in ([(2, b"a" * bs), (2, b"b" * bs)],         # the same LBA twice
                   [(1, b"a" * 2 * bs), (2, b"b" * bs)],     # overlapping runs
                   [(1, b"a" * 2 * bs), (5, b"b" * 2 * bs)],  # four blocks, three slots
                   [(layout.num_blocks - 1, b"a" * 2 * bs)]):  # past the end
        assert write_group(pool, 0, writes) == _clib.BT_PMEM_RANGE
        assert bytes(rec.cur) == image and rec.drains == drains
    assert write_group(pool, 0, [(1, b"a" * 2 * bs), (5, b"b" * bs)]) == 0
    out = bytearray(bs)
    pool.read(0, 5, 1, memoryview(out))
    assert out == b"b" * bs and pool.check() == []


def test_group_lba_set_is_exact_at_its_largest() -> None:
    """The group's LBAs are kept in an exact set (bt_pmem.h, bt_lba_set), as large as the
    largest free list: 256 distinct LBAs, spread so that their hashes collide and probe,
    commit; one repeat among them, the last, is refused with nothing done; and what a
    refused or committed group put in the set is gone for the next group."""
    _need_c_engine()
    from blocktarget.bdevs.pmem import _clib

    layout = _layout(8, num_blocks=4096, lanes=1, free_per_lane=256)
    rec = _fresh(layout)
    pool = Pool(rec, core=True)
    bs = layout.block_size
    lbas = [(i * 2654435761) % layout.num_blocks for i in range(256)]
    assert len(set(lbas)) == 256
    writes = [(lba, bytes([i % 251 + 1]) * bs) for i, lba in enumerate(lbas)]
    image, drains = bytes(rec.cur), rec.drains
    assert write_group(pool, 0, writes[:255] + [(lbas[17], b"x" * bs)]) == _clib.BT_PMEM_RANGE
    assert bytes(rec.cur) == image and rec.drains == drains
    for _ in range(2):  # (the same LBAs again: the set was emptied by the commit)
        assert write_group(pool, 0, writes) == 0
    out = bytearray(bs)
    for lba, data in writes[::37]:
        pool.read(0, lba, 1, memoryview(out))
        assert out == data
    assert pool.check() == []

