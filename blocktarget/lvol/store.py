"""A logical volume store: its metadata, the only way that metadata changes, and the
control-plane operations (create/open a store; create, resize, rename, delete volumes).

The rule every change follows (format.py has the on-disk half):

    copy the durable metadata -> change the copy -> write it to the other slot -> flush
    -> only then make the copy the live state

so the live state is always the last durable state, and readers on the I/O path (which
look clusters up in ``store.md``) never see a mapping that a crash could take back.
Clusters a change needs are reserved in the allocator before the write and given back
if it fails; clusters a change frees are cleared (the volume's clear method) and pass
through limbo (alloc.py) only after it is durable.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import uuid as uuidlib
from collections.abc import Callable

from ..bdev import Bdev, IOChannel, IOType, Status
from ..errors import AlreadyExists, Busy, InvalidParams, RpcError
from . import baseio, lanemap
from .alloc import ClusterAllocator, IoEpochs, NoSpace
from .format import (
    NAME_MAX,
    UNMAPPED,
    FormatError,
    Metadata,
    SuperBlock,
    VolumeRecord,
    decode_metadata,
    decode_super,
    encode_metadata,
    geometry,
    resolve,
)
from .serial import Turnstile

log = logging.getLogger("blocktarget.lvol")

class StoreError(RpcError):
    """A store operation failed on the base bdev (I/O error, metadata too large)."""


class NoRoom(RpcError):
    """The store cannot take what is asked: its metadata has no room (-ENOSPC, as SPDK's
    blobstore answers a grow beyond its metadata region)."""

    code = -errno.ENOSPC


def check_name(what: str, name: str) -> None:
    if not name:
        raise InvalidParams(f"{what} name must not be empty")
    if len(name.encode()) > NAME_MAX:
        raise InvalidParams(f"{what} name '{name}' is longer than {NAME_MAX} bytes")
    if "/" in name:
        raise InvalidParams(f"{what} name '{name}' must not contain '/'")


class LvolStore:
    """An open store. `md` is the durable metadata (replaced, never mutated); `lock`
    guards the allocator and the I/O epochs, which every reactor touches."""

    def __init__(self, base: Bdev, sb: SuperBlock, generation: int, slot: int, md: Metadata,
                 clear_method: str = "unmap") -> None:
        self.base = base
        self.sb = sb
        self.uuid = sb.uuid
        self.generation = generation
        self.slot = slot  # the slot holding `generation`
        self.md = md
        self.clear_method = clear_method
        self.lock = threading.Lock()
        self.alloc = ClusterAllocator.from_maps(
            md.total_clusters, ((v.name, v.map) for v in md.volumes.values()))
        _check_chains(md)
        # volumes whose writes must not start now (a snapshot of them is being taken):
        # the fast path sends them to the slow path, which waits behind the turnstile
        self.frozen: set[str] = set()
        self.copy_batch = 16  # clusters inflate/decouple copies per commit
        self.epochs = IoEpochs()
        self.turn = Turnstile()
        self.enospc_errors = 0  # writes failed for want of a free cluster
        self.link: object = None  # the BaseLink the module sets (claim + channels)
        self.cp_channel: IOChannel | None = None  # the base's control-plane channel
        # the volumes' cluster maps for the C lane (None: no lane built)
        self.lane = lanemap.LaneMaps(self) if lanemap.AVAILABLE else None

    # ---- geometry ----
    @property
    def name(self) -> str:
        return self.md.name

    @property
    def cluster_size(self) -> int:
        return self.sb.cluster_size

    @property
    def block_size(self) -> int:
        return self.sb.block_size

    @property
    def blocks_per_cluster(self) -> int:
        return self.sb.cluster_size // self.sb.block_size

    def cluster_block(self, pcluster: int) -> int:
        """The base block where a physical cluster starts."""
        return self.sb.cluster_offset(pcluster) // self.sb.block_size

    def free_clusters(self) -> int:
        """Free and limbo clusters (limbo is free as soon as in-flight I/O drains)."""
        return self.alloc.free_count + self.alloc.limbo_count

    # ---- clusters (any thread) ----
    def reserve(self, n: int) -> list[int]:
        with self.lock:
            self.alloc.reclaim(self.epochs.oldest_busy())
            return self.alloc.allocate(n)

    def unreserve(self, clusters: list[int]) -> None:
        with self.lock:
            self.alloc.release(clusters)

    def retire(self, clusters: list[int]) -> None:
        """Clusters no volume maps any more (durably): free once older I/O drained."""
        with self.lock:
            self.alloc.to_limbo(clusters, self.epochs.advance())
            self.alloc.reclaim(self.epochs.oldest_busy())

    def io_start(self) -> int:
        with self.lock:
            return self.epochs.start()

    def write_start(self, vol_uuid: str) -> int | None:
        """io_start for a write, or None while the volume is frozen (checked under the
        same lock a freeze takes, so a write either counts before it or waits after)."""
        with self.lock:
            if vol_uuid in self.frozen:
                return None
            return self.epochs.start()

    def lane_map(self, vol_uuid: str) -> lanemap.LaneMap | None:
        """The volume's cluster map for the C lane (made on first use), or None."""
        if self.lane is None:
            return None
        with self.lock:
            return self.lane.get(vol_uuid)

    def io_done(self, epoch: int) -> None:
        with self.lock:
            self.epochs.done(epoch)

    def extents(self, clusters: list[int]) -> list[tuple[int, int]]:
        bpc = self.blocks_per_cluster
        return [(self.cluster_block(p), bpc) for p in sorted(clusters)]

    # ---- the one way metadata changes (caller holds the turnstile) ----
    def commit(self, ch: IOChannel, new: Metadata, done: Callable[[int], None]) -> None:
        """Write `new` as the next generation into the other slot, flush, and on success
        make it the live metadata; done(status). The C lane's maps follow (lanemap.py):
        a change that is not just new clusters first stops the lane using them."""
        lane = self.lane
        if lane is None:
            self._commit(ch, new, done, False)
            return
        old = self.md
        lane.before(old, new, lambda structural: self._commit(ch, new, done, structural))

    def _commit(self, ch: IOChannel, new: Metadata, done: Callable[[int], None],
                structural: bool) -> None:
        lane = self.lane
        if structural:
            def thawed(status: int) -> None:
                if status:  # (nothing changed: the maps come back as they were)
                    with self.lock:
                        lane.thaw(self.md)  # type: ignore[union-attr]
                done(status)
        else:
            thawed = done
        self._write_md(ch, new, thawed, structural)

    def _write_md(self, ch: IOChannel, new: Metadata, done: Callable[[int], None],
                  structural: bool) -> None:
        gen, slot = self.generation + 1, 1 - self.slot
        try:
            raw = encode_metadata(new, self.uuid, gen, self.sb.md_slot_size, self.block_size)
        except FormatError as e:
            log.error("lvstore %s: %s", self.name, e)
            done(Status.CAPACITY_EXCEEDED)
            return
        bs = self.block_size

        def written(status: int) -> None:
            if status:
                log.error("lvstore %s: metadata write failed (status %#x)", self.name, status)
                done(status)
                return
            baseio.flush(ch, flushed)

        def flushed(status: int) -> None:
            if status:
                log.error("lvstore %s: metadata flush failed (status %#x)", self.name, status)
                done(status)
                return
            old = self.md
            with self.lock:
                self.generation, self.slot, self.md = gen, slot, new
                if self.lane is not None:
                    self.lane.committed(old, new, structural)
            done(0)

        baseio.submit(ch, IOType.WRITE, self.sb.slot_offset(slot) // bs, len(raw) // bs,
                      memoryview(raw), written)

    async def change(self, edit: Callable[[Metadata], None]) -> None:
        """A control-plane change: edit a copy and commit it (holding the turnstile)."""
        async with self.turn.held():
            await self.commit_held(edit)

    async def commit_held(self, edit: Callable[[Metadata], None]) -> None:
        new = self.md.copy()
        edit(new)
        ch = self.cp_channel
        assert ch is not None
        st = await baseio.wait(lambda d: self.commit(ch, new, d))
        if st:
            raise StoreError(f"lvstore '{self.name}': metadata update failed "
                             f"(NVMe status {st:#x}); nothing changed")

    # ---- control-plane operations ----
    def volume_by_name(self, name: str) -> VolumeRecord | None:
        return next((v for v in self.md.volumes.values() if v.name == name), None)

    async def create_volume(self, name: str, size_bytes: int, thin: bool,
                            clear_method: str, vol_uuid: str | None = None) -> VolumeRecord:
        """A new volume of size_bytes rounded up to whole clusters. A thick volume gets
        all its clusters now, zeroed before the metadata names them (so it reads zeroes
        and never another volume's old data)."""
        check_name("lvol", name)
        if size_bytes <= 0:
            raise InvalidParams("parameter 'size_in_mib' must be positive")
        n = -(-size_bytes // self.cluster_size)
        async with self.turn.held():
            if self.volume_by_name(name) is not None:
                raise AlreadyExists(f"lvol '{self.name}/{name}' already exists")
            if len(self.md.volumes) >= 1024:
                raise InvalidParams(f"lvstore '{self.name}' holds its maximum of 1024 lvols")
            rec = VolumeRecord(vol_uuid or str(uuidlib.uuid4()), name, n, thin,
                               clear_method=clear_method)
            pcs = await self._zeroed_clusters(0 if thin else n)
            rec.map = dict(enumerate(pcs))
            try:
                await self.commit_held(lambda md: md.volumes.__setitem__(rec.uuid, rec.copy()))
            except BaseException:
                self.unreserve(pcs)
                raise
        return rec

    async def _zeroed_clusters(self, n: int) -> list[int]:
        if n == 0:
            return []
        try:
            pcs = self.reserve(n)
        except NoSpace:
            raise InvalidParams(
                f"lvstore '{self.name}' has {self.free_clusters()} free clusters, "
                f"{n} needed") from None
        ch = self.cp_channel
        assert ch is not None

        def start(done: Callable[[int], None]) -> None:
            join = baseio.Join(len(pcs), lambda st: baseio.flush(ch, done) if not st
                               else done(st))
            for off, cnt in self.extents(pcs):
                baseio.zero(ch, off, cnt, join.one)

        st = await baseio.wait(start)
        if st:
            self.unreserve(pcs)
            raise StoreError(f"lvstore '{self.name}': zeroing new clusters failed "
                             f"(NVMe status {st:#x})")
        return pcs

    async def resize_volume(self, vol_uuid: str, size_bytes: int) -> VolumeRecord:
        n = -(-size_bytes // self.cluster_size)
        async with self.turn.held():
            old = self.md.volumes[vol_uuid]
            if old.snapshot:
                raise InvalidParams(f"lvol '{self.name}/{old.name}' is a snapshot: its size "
                                    "is fixed")
            if n == old.num_clusters:
                return old
            freed = [p for v, p in old.map.items() if v >= n]
            grow = [] if old.thin or n < old.num_clusters else list(range(old.num_clusters, n))
            pcs = await self._zeroed_clusters(len(grow))

            def edit(md: Metadata) -> None:
                v = md.volumes[vol_uuid]
                v.num_clusters = n
                v.parent_clusters = min(v.parent_clusters, n)
                v.map = {a: b for a, b in v.map.items() if a < n}
                v.map.update(zip(grow, pcs, strict=True))

            try:
                await self.commit_held(edit)
            except BaseException:
                self.unreserve(pcs)
                raise
            await self._release(freed, old.clear_method)
            return self.md.volumes[vol_uuid]

    def children(self, vol_uuid: str) -> list[VolumeRecord]:
        return [v for v in self.md.volumes.values() if v.parent == vol_uuid]

    def refuse_if_cloned(self, vol_uuid: str) -> None:
        """Busy when the volume is a snapshot that clones still read through: deleting
        it would take their data (SPDK merges a snapshot into its one clone instead;
        here the operator chooses, and the message says how)."""
        kids = self.children(vol_uuid)
        if not kids:
            return
        names = ", ".join(repr(f"{self.name}/{k.name}") for k in kids)
        which = f"a clone ({names})" if len(kids) == 1 else f"{len(kids)} clones ({names})"
        them = "it" if len(kids) == 1 else "them"
        raise Busy(f"lvol '{self.name}/{self.md.volumes[vol_uuid].name}' is a snapshot "
                   f"with {which} reading through it: delete {them}, or make {them} "
                   "independent with bdev_lvol_inflate or bdev_lvol_decouple_parent, first")

    async def delete_volume(self, vol_uuid: str) -> None:
        async with self.turn.held():
            old = self.md.volumes[vol_uuid]
            self.refuse_if_cloned(vol_uuid)
            await self.commit_held(lambda md: md.volumes.pop(vol_uuid))
            await self._release(list(old.map.values()), old.clear_method)

    async def _release(self, clusters: list[int], method: str) -> None:
        """Clear durably freed clusters, then let them go. A clear that fails is logged
        and the clusters are still freed: the metadata no longer names them, and a
        cluster is zeroed again before reuse."""
        if not clusters:
            return
        ch = self.cp_channel
        assert ch is not None
        st = await baseio.wait(lambda d: baseio.clear(ch, method, self.extents(clusters), d))
        if st:
            log.error("lvstore %s: clearing %d freed clusters (%s) failed: status %#x",
                      self.name, len(clusters), method, st)
        self.retire(clusters)

    async def set_volume(self, vol_uuid: str, **fields: object) -> None:
        """Rename or set read-only: one field of one record."""
        async with self.turn.held():
            if "name" in fields:
                other = self.volume_by_name(str(fields["name"]))
                if other is not None and other.uuid != vol_uuid:
                    raise AlreadyExists(f"lvol '{self.name}/{fields['name']}' already exists")

            def edit(md: Metadata) -> None:
                for k, val in fields.items():
                    setattr(md.volumes[vol_uuid], k, val)

            await self.commit_held(edit)

    async def snapshot_volume(self, vol_uuid: str, name: str) -> VolumeRecord:
        """A read-only, point-in-time copy: the snapshot takes the volume's clusters, the
        volume becomes a thin clone of it (reads fall through, a first write to a cluster
        copies it). In-flight writes to the volume are drained first and new ones wait,
        so no write lands in a cluster after it became the snapshot's."""
        check_name("lvol", name)
        async with self.turn.held():
            if self.volume_by_name(name) is not None:
                raise AlreadyExists(f"lvol '{self.name}/{name}' already exists")
            if self.md.volumes[vol_uuid].snapshot:
                raise InvalidParams(f"lvol '{self.name}/{self.md.volumes[vol_uuid].name}' is "
                                    "a snapshot already (clone it, then snapshot the clone)")
            with self.lock:
                self.frozen.add(vol_uuid)
                barrier = self.epochs.advance()
            try:
                while True:
                    with self.lock:
                        busy = self.epochs.oldest_busy()
                    if busy is None or busy > barrier:
                        break
                    await asyncio.sleep(0.0005)
                old = self.md.volumes[vol_uuid]
                snap = VolumeRecord(str(uuidlib.uuid4()), name, old.num_clusters, thin=True,
                                    read_only=True, clear_method=old.clear_method,
                                    map=dict(old.map), parent=old.parent, snapshot=True,
                                    parent_clusters=old.parent_clusters)

                def edit(md: Metadata) -> None:
                    v = md.volumes[vol_uuid]
                    v.map, v.parent, v.thin = {}, snap.uuid, True
                    v.parent_clusters = v.num_clusters
                    md.volumes[snap.uuid] = snap.copy()

                await self.commit_held(edit)
            finally:
                with self.lock:
                    self.frozen.discard(vol_uuid)
        return snap

    async def clone_volume(self, snap_uuid: str, name: str) -> VolumeRecord:
        """A writable thin volume reading through to a snapshot."""
        check_name("lvol", name)
        async with self.turn.held():
            snap = self.md.volumes[snap_uuid]
            if not snap.snapshot:
                raise InvalidParams(f"lvol '{self.name}/{snap.name}' is not a snapshot")
            if self.volume_by_name(name) is not None:
                raise AlreadyExists(f"lvol '{self.name}/{name}' already exists")
            rec = VolumeRecord(str(uuidlib.uuid4()), name, snap.num_clusters, thin=True,
                               clear_method=snap.clear_method, parent=snap_uuid,
                               parent_clusters=snap.num_clusters)
            await self.commit_held(lambda md: md.volumes.__setitem__(rec.uuid, rec.copy()))
        return rec

    async def detach(self, vol_uuid: str, *, inflate: bool) -> None:
        """Inflate (every cluster the volume does not own gets one: a copy of what it
        reads, or zeroes; it ends thick, with no parent) or decouple (it gets a copy of
        each cluster its parent owns; its parent's parent becomes its parent). Clusters
        are copied `copy_batch` at a time, one commit each, holding the turnstile only
        per batch, so the volume stays in use: every intermediate state reads the same
        data, and writes between batches are simply clusters with nothing to copy."""
        while True:
            async with self.turn.held():
                md = self.md
                v = md.volumes[vol_uuid]
                parent = md.volumes.get(v.parent) if v.parent else None
                if not inflate and parent is None:
                    raise InvalidParams(f"lvol '{self.name}/{v.name}' has no parent")
                todo: list[tuple[int, int]] = []  # (virtual cluster, source or UNMAPPED)
                for vc in range(v.num_clusters):
                    if vc in v.map:
                        continue
                    if inflate:
                        todo.append((vc, resolve(md, v, vc)))
                    elif parent is not None and vc < v.parent_clusters and vc in parent.map:
                        todo.append((vc, parent.map[vc]))
                    if len(todo) == self.copy_batch:
                        break
                last = len(todo) < self.copy_batch  # the scan reached the end
                if not todo:
                    await self.commit_held(lambda m: _detached(m, vol_uuid, inflate))
                    return
                await self._copy_in(vol_uuid, todo, inflate if last else None)
                if last:
                    return
            await asyncio.sleep(0)  # I/O queued behind the turnstile goes first

    async def _copy_in(self, vol_uuid: str, todo: list[tuple[int, int]],
                       detach_inflate: bool | None) -> None:
        """Copy clusters in (one commit); with detach_inflate not None, the same commit
        also detaches the volume (the last batch: no state in between)."""
        try:
            pcs = self.reserve(len(todo))
        except NoSpace:
            raise InvalidParams(
                f"lvstore '{self.name}' has {self.free_clusters()} free clusters, "
                f"{len(todo)} more needed") from None
        ch = self.cp_channel
        assert ch is not None
        bpc = self.blocks_per_cluster

        def start(done: Callable[[int], None]) -> None:
            join = baseio.Join(len(todo), lambda st: baseio.flush(ch, done) if not st
                               else done(st))
            for (_, src), pc in zip(todo, pcs, strict=True):
                if src == UNMAPPED:
                    baseio.zero(ch, self.cluster_block(pc), bpc, join.one)
                    continue
                buf = memoryview(bytearray(self.cluster_size))

                def copied(st: int, pc: int = pc, buf: memoryview = buf) -> None:
                    if st:
                        join.one(st)
                    else:
                        baseio.submit(ch, IOType.WRITE, self.cluster_block(pc), bpc, buf,
                                      join.one)

                baseio.submit(ch, IOType.READ, self.cluster_block(src), bpc, buf, copied)

        st = await baseio.wait(start)
        if st:
            self.unreserve(pcs)
            raise StoreError(f"lvstore '{self.name}': copying clusters failed "
                             f"(NVMe status {st:#x})")

        def edit(md: Metadata) -> None:
            md.volumes[vol_uuid].map.update(
                (vc, pc) for (vc, _), pc in zip(todo, pcs, strict=True))
            if detach_inflate is not None:
                _detached(md, vol_uuid, detach_inflate)

        try:
            await self.commit_held(edit)
        except BaseException:
            self.unreserve(pcs)
            raise

    @property
    def total_clusters(self) -> int:
        return self.md.total_clusters

    async def grow(self) -> int:
        """Take in the clusters a grown base now holds; one commit. Returns the clusters
        added. Refused, nothing changed, when the base holds more than the metadata slots
        have room for (their size is fixed at create: they lie before the data)."""
        async with self.turn.held():
            fit = self.sb.clusters_fitting(self.base.size_bytes)
            if fit > self.sb.max_clusters:
                cs = self.cluster_size
                raise NoRoom(
                    f"lvstore '{self.name}': its base '{self.base.name}' "
                    f"({self.base.size_bytes} bytes) now holds {fit} clusters but the "
                    f"store's metadata has room for {self.sb.max_clusters} clusters "
                    "(max_growable_size "
                    f"{self.sb.max_clusters * cs} bytes, fixed when the store was created; "
                    "give max_growable_size_mib to bdev_lvol_create_lvstore for more); "
                    "not grown")
            old = self.md.total_clusters
            if fit <= old:
                return 0

            def edit(md: Metadata) -> None:
                md.total_clusters = fit

            await self.commit_held(edit)
            with self.lock:
                self.alloc.grow(fit)
            return fit - old

    async def rename(self, new_name: str) -> None:
        check_name("lvstore", new_name)

        def edit(md: Metadata) -> None:
            md.name = new_name

        await self.change(edit)


def _detached(md: Metadata, vol_uuid: str, inflate: bool) -> None:
    v = md.volumes[vol_uuid]
    parent = md.volumes.get(v.parent) if v.parent else None
    if inflate or parent is None:
        v.parent, v.parent_clusters = None, 0
        if inflate:
            v.thin = False
    else:
        v.parent = parent.parent
        v.parent_clusters = min(v.parent_clusters, parent.parent_clusters)
        if v.parent is None:
            v.parent_clusters = 0


def _check_chains(md: Metadata) -> None:
    """Every parent exists and is a snapshot, and no chain loops (ValueError)."""
    for v in md.volumes.values():
        seen = {v.uuid}
        p = v.parent
        while p is not None:
            parent = md.volumes.get(p)
            if parent is None or not parent.snapshot:
                raise ValueError(f"volume {v.name}: parent {p} is missing or not a snapshot")
            if p in seen:
                raise ValueError(f"volume {v.name}: its chain of parents loops")
            seen.add(p)
            p = parent.parent


# ---- creating and finding stores on a base ----


async def format_store(base: Bdev, ch: IOChannel, name: str, cluster_size: int,
                       clear_method: str, max_bytes: int | None = None) -> LvolStore:
    """Write a new, empty store on `base` (claimed by the caller). The super block goes
    last: until it is durable there is no store, so a crash midway leaves the base as
    it was as far as any reader can tell."""
    check_name("lvstore", name)
    try:
        sb = geometry(base.num_blocks, base.block_size, cluster_size, str(uuidlib.uuid4()),
                      max_bytes)
    except FormatError as e:
        raise InvalidParams(f"bdev '{base.name}': {e}") from None
    md = Metadata(name, sb.clusters_on(base.size_bytes))
    bs = base.block_size
    data_blocks = sb.clusters_on(base.size_bytes) * (cluster_size // bs)
    if clear_method != "none":
        st = await baseio.wait(lambda d: baseio.clear(
            ch, clear_method, [(sb.data_offset // bs, data_blocks)], d))
        if st:
            raise StoreError(f"bdev '{base.name}': clearing the data region ({clear_method}) "
                             f"failed: NVMe status {st:#x}")
    raw = encode_metadata(md, sb.uuid, 1, sb.md_slot_size, bs)
    steps = [
        (IOType.WRITE, sb.slot_offset(0) // bs, raw),
        (IOType.FLUSH, 0, None),
        (IOType.WRITE, 0, sb.encode()),
        (IOType.FLUSH, 0, None),
    ]
    for kind, off, data in steps:
        if kind == IOType.FLUSH:
            st = await baseio.wait(lambda d: baseio.flush(ch, d))
        else:
            buf = memoryview(data)
            st = await baseio.wait(lambda d, o=off, b=buf: baseio.submit(
                ch, IOType.WRITE, o, len(b) // bs, b, d))
        if st:
            raise StoreError(f"bdev '{base.name}': writing the lvstore failed: "
                             f"NVMe status {st:#x}")
    return LvolStore(base, sb, 1, 0, md, clear_method)


async def probe(base: Bdev, ch: IOChannel) -> LvolStore | None:
    """The store on `base`, or None when there is none. FormatError when a super block
    is there but no valid metadata slot or a conflicting map (the store is not opened:
    refusing beats handing one cluster to two volumes)."""
    if IOType.READ not in base.io_types or base.num_blocks == 0:
        return None
    bs = base.block_size
    sb = decode_super(await baseio.read(ch, 0, bs))
    if sb is None:
        return None
    if sb.block_size != bs:
        raise FormatError(f"store written with block size {sb.block_size}, base has {bs}")
    best: tuple[int, int, Metadata] | None = None
    for slot in (0, 1):
        raw = await baseio.read(ch, sb.slot_offset(slot), sb.md_slot_size)
        got = decode_metadata(raw, sb.uuid)
        if got is not None and (best is None or got[0] > best[0]):
            best = (got[0], slot, got[1])
    if best is None:
        raise FormatError("no valid metadata copy")
    gen, slot, md = best
    if md.total_clusters > sb.clusters_on(base.size_bytes):
        raise FormatError(f"the base ({base.size_bytes} bytes) is smaller than the store's "
                          f"{md.total_clusters} clusters")
    try:
        return LvolStore(base, sb, gen, slot, md)
    except ValueError as e:
        raise FormatError(str(e)) from None


async def erase(ch: IOChannel) -> int:
    """Zero the super block and flush: the store is gone (status, 0 on success)."""
    bs = ch.bdev.block_size
    st = await baseio.wait(lambda d: baseio.submit(ch, IOType.WRITE, 0, 1,
                                                   memoryview(bytes(bs)), d))
    if st:
        return st
    return await baseio.wait(lambda d: baseio.flush(ch, d))

