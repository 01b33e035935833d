"""An lvol bdev: a volume of a store, its I/O mapped cluster by cluster onto the base.

Fast path (any reactor, no metadata change): reads and writes whose clusters are all
mapped are forwarded to the base at the mapped offsets; reads of unallocated clusters
return zeroes; Write Zeroes needs nothing where nothing is allocated. Each forwarded
I/O is counted in the store's I/O epoch, so a cluster freed meanwhile is not reused
before it completes (alloc.py). The NVMe/TCP C lane does the same reads and writes
itself, from a copy of the maps in C (`lane_target`, lanemap.py, which says how that copy
is kept from ever getting ahead of the durable metadata); what it does not take comes
here.

Slow path (one at a time per store, under the store's turnstile, on this channel's
reactor): a write touching an unallocated cluster, and a Deallocate that frees whole
clusters of a thin volume. A first write to a thin cluster

1. reserves a free cluster,
2. writes the whole cluster: the data, and zeroes around it (a free cluster holds
   whatever a deleted volume left there; the volume must read zeroes elsewhere in it),
3. flushes the base, so the data is durable before any metadata points at it (else a
   crash could leave the map naming a cluster with another volume's old data),
4. commits the metadata with the new mapping (a slot write and a flush), and only then
5. acknowledges the write.

The commit before the acknowledgement keeps the contract simple: an acknowledged write
is reachable after a crash as soon as its data is, i.e. by the Flush the host issues
(or at once with FUA); no later Flush has to remember metadata. Writes to the cluster
while this runs find it unmapped and queue behind it; reads of it still see zeroes,
which is correct until the write is acknowledged.

Out of space: the write fails with Capacity Exceeded (generic status 0x81, SPDK's
-ENOSPC mapping), is counted in the store and logged (once per burst); other I/O goes on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..bdev import BdevIO, IOType, LaneTarget, Status, lane_target_of
from ..bdevs._stack import StackedBdev, StackedChannel
from . import baseio
from .alloc import NoSpace
from .format import UNMAPPED, Metadata, VolumeRecord, resolve
from .serial import run_on

if TYPE_CHECKING:
    from ..reactor import Reactor
    from .store import LvolStore

log = logging.getLogger("blocktarget.lvol")

# NVMe generic status 0x20: Namespace is Write Protected (a read-only lvol)
NS_WRITE_PROTECTED = 0x020

LVOL_IO_TYPES = frozenset({IOType.READ, IOType.WRITE, IOType.FLUSH, IOType.UNMAP,
                           IOType.WRITE_ZEROES, IOType.RESET})
_MODIFYING = (IOType.WRITE, IOType.UNMAP, IOType.WRITE_ZEROES)
_ENOSPC_LOG_INTERVAL_S = 10.0


class Segment:
    """The part of an I/O inside one virtual cluster."""

    __slots__ = ("vc", "pc", "src", "io_off", "in_off", "n")

    def __init__(self, vc: int, pc: int, src: int, io_off: int, in_off: int, n: int) -> None:
        self.vc = vc  # virtual cluster
        self.pc = pc  # the volume's own physical cluster, or UNMAPPED
        self.src = src  # where a read finds it: own, else up the parent chain, or UNMAPPED
        self.io_off = io_off  # first block within the I/O
        self.in_off = in_off  # first block within the cluster
        self.n = n


def segments(offset: int, num: int, bpc: int, md: Metadata, vol: VolumeRecord
             ) -> list[Segment]:
    out = []
    pos = 0
    m = vol.map
    chained = vol.parent is not None
    while pos < num:
        b = offset + pos
        vc, in_off = divmod(b, bpc)
        n = min(num - pos, bpc - in_off)
        pc = m.get(vc, UNMAPPED)
        src = resolve(md, vol, vc) if chained and pc == UNMAPPED else pc
        out.append(Segment(vc, pc, src, pos, in_off, n))
        pos += n
    return out


class LvolChannel(StackedChannel):
    bdev: LvolBdev
    _lane_map: Any = None

    def lane_target(self) -> LaneTarget | None:
        """The base's target seen through this volume's cluster map (lanemap.py): the
        lane sends reads and writes of the volume's own clusters (reads of a parent's
        too) to the base itself and answers reads of unmapped clusters with zeroes;
        everything else comes here."""
        base = lane_target_of(self.base_channels[0])
        if base is None or base.lvol is not None:
            return None
        m = self.bdev.store.lane_map(self.bdev.uuid)
        if m is None:
            return None
        self._lane_map = m  # (the lane's table holds this channel, so the map lives on)
        return base.lvol_under(self, m)

    def _submit(self, io: BdevIO) -> None:
        bdev = self.bdev
        store = bdev.store
        md = store.md  # one consistent view for the whole I/O
        vol = md.volumes.get(bdev.uuid)
        t = io.type
        if vol is None:
            self.complete(io, Status.INVALID_NAMESPACE)  # deleted under us
            return
        if t == IOType.FLUSH:
            baseio.flush(self.base_channels[0], lambda st: self.complete(io, st))
            return
        if t == IOType.RESET:
            self.complete(io, Status.SUCCESS)
            return
        if vol.read_only and t in _MODIFYING:
            self.complete(io, NS_WRITE_PROTECTED)
            return
        bpc = store.blocks_per_cluster
        if t == IOType.READ or t == IOType.WRITE:
            # the common case, without building segments: inside one mapped cluster
            vc, in_off = divmod(io.offset_blocks, bpc)
            pc = vol.map.get(vc)
            if pc is None and t == IOType.READ and vol.parent is not None:
                pc = resolve(md, vol, vc)
                pc = None if pc == UNMAPPED else pc
            if pc is not None and in_off + io.num_blocks <= bpc:
                epoch = store.io_start() if t == IOType.READ else store.write_start(vol.uuid)
                if epoch is None:
                    self._slow(io)  # frozen for a snapshot: wait behind it
                    return
                self.base_channels[0].submit(BdevIO(
                    t, store.cluster_block(pc) + in_off, io.num_blocks, io.buf,
                    self._one_done, fua=io.fua, ctx=(io, epoch)))
                return
        segs = segments(io.offset_blocks, io.num_blocks, bpc, md, vol)
        if t == IOType.READ:
            self._read(io, segs)
        elif t == IOType.WRITE:
            if any(s.pc == UNMAPPED for s in segs):
                self._slow(io)
            else:
                self._write(io, segs)
        elif vol.parent is not None:
            # a clone: a cluster only its parent has must get zeroes of its own (dropping
            # it would show the parent's data), so Deallocate frees nothing here
            if any(s.pc == UNMAPPED and s.src != UNMAPPED for s in segs):
                self._slow(io)
            else:
                self._zero(io, segs)
        elif t == IOType.UNMAP and vol.thin and any(s.pc != UNMAPPED and s.n == bpc
                                                    for s in segs):
            self._slow(io)
        else:
            self._zero(io, segs)

    # ---- fast path ----
    def _one_done(self, child: BdevIO) -> None:
        io, epoch = child.ctx
        self.bdev.store.io_done(epoch)
        if io.buf is None and child.buf is not None and not child.status:
            io.buf = child.buf  # a memory base lent its buffer: zero-copy read
        self.complete(io, child.status)

    def _base_block(self, s: Segment, own: bool = True) -> int:
        return self.bdev.store.cluster_block(s.pc if own else s.src) + s.in_off

    def _finish(self, io: BdevIO, epoch: int) -> baseio.Done:
        store = self.bdev.store

        def done(status: int) -> None:
            store.io_done(epoch)
            self.complete(io, status)

        return done

    def _read(self, io: BdevIO, segs: list[Segment]) -> None:
        bs = self.bdev.block_size
        if io.buf is None:
            io.buf = memoryview(bytearray(io.num_blocks * bs))
        buf = memoryview(io.buf)
        mapped = [s for s in segs if s.src != UNMAPPED]
        for s in segs:
            if s.src == UNMAPPED:
                a = s.io_off * bs
                buf[a:a + s.n * bs] = bytes(s.n * bs)
        if not mapped:
            self.complete(io, Status.SUCCESS)
            return
        epoch = self.bdev.store.io_start()
        join = baseio.Join(len(mapped), self._finish(io, epoch))
        ch = self.base_channels[0]
        for s in mapped:
            a = s.io_off * bs
            baseio.submit(ch, IOType.READ, self._base_block(s, own=False), s.n,
                          buf[a:a + s.n * bs], join.one)

    def _write(self, io: BdevIO, segs: list[Segment]) -> None:
        epoch = self.bdev.store.write_start(self.bdev.uuid)
        if epoch is None:
            self._slow(io)
            return
        self._write_mapped(io, segs, self._finish(io, epoch))

    def _write_mapped(self, io: BdevIO, segs: list[Segment], done: baseio.Done) -> None:
        bs = self.bdev.block_size
        buf = memoryview(io.buf)
        ch = self.base_channels[0]
        join = baseio.Join(len(segs), done)
        for s in segs:
            a = s.io_off * bs
            baseio.submit(ch, IOType.WRITE, self._base_block(s), s.n, buf[a:a + s.n * bs],
                          join.one, fua=io.fua)

    def _zero(self, io: BdevIO, segs: list[Segment]) -> None:
        """Write Zeroes, and Deallocate that frees no whole cluster: zero the volume's own
        clusters (clusters nobody has already read zeroes)."""
        mapped = [s for s in segs if s.pc != UNMAPPED]
        if not mapped:
            self.complete(io, Status.SUCCESS)
            return
        epoch = self.bdev.store.write_start(self.bdev.uuid)
        if epoch is None:
            self._slow(io)
            return
        self._zero_own(mapped, self._finish(io, epoch))

    def _zero_own(self, segs: list[Segment], done: baseio.Done) -> None:
        join = baseio.Join(len(segs), done)
        ch = self.base_channels[0]
        for s in segs:
            baseio.zero(ch, self._base_block(s), s.n, join.one)

    # ---- slow path ----
    def _slow(self, io: BdevIO) -> None:
        store = self.bdev.store
        store.turn.enter(lambda: run_on(self.reactor, self._run_slow, io))

    def _run_slow(self, io: BdevIO) -> None:
        store = self.bdev.store

        def finish(status: int) -> None:
            self.complete(io, status)
            store.turn.leave()

        try:
            md = store.md
            vol = md.volumes.get(self.bdev.uuid)
            if vol is None or self.bdev.removed:
                finish(Status.INVALID_NAMESPACE)
                return
            if vol.read_only:
                finish(NS_WRITE_PROTECTED)
                return
            if io.offset_blocks + io.num_blocks > self.bdev.num_blocks:
                finish(Status.LBA_OUT_OF_RANGE)  # shrunk while this I/O queued
                return
            segs = segments(io.offset_blocks, io.num_blocks, store.blocks_per_cluster, md, vol)
            if io.type == IOType.WRITE:
                self._allocate_and_write(io, vol, segs, finish)
            elif vol.parent is not None or io.type == IOType.WRITE_ZEROES or not vol.thin:
                self._allocate_and_write(io, vol, segs, finish, zero=True)
            else:
                self._deallocate(io, vol, segs, finish)
        except Exception:
            self.bdev.log_exception(io)
            finish(Status.INTERNAL_ERROR)

    def _allocate_and_write(self, io: BdevIO, vol: VolumeRecord, segs: list[Segment],
                            finish: baseio.Done, zero: bool = False) -> None:
        """Give the clusters the I/O touches that the volume does not own yet a cluster of
        their own: a copy of the parent's (copy-on-write) or zeroes, with the I/O's data
        (or zeroes, for Write Zeroes and a clone's Deallocate) on top."""
        store = self.bdev.store
        new = [s for s in segs if s.pc == UNMAPPED and (not zero or s.src != UNMAPPED)]
        old = [s for s in segs if s.pc != UNMAPPED]
        if not new:  # another write allocated them while this one queued
            if zero:
                self._zero_own(old, finish)
            else:
                self._write_mapped(io, old, finish)
            return
        try:
            pcs = store.reserve(len(new))
        except NoSpace:
            self.bdev.out_of_space(len(new))
            finish(Status.CAPACITY_EXCEEDED)
            return
        for s, pc in zip(new, pcs, strict=True):
            s.pc = pc
        ch = self.base_channels[0]
        bs = self.bdev.block_size
        cs = store.cluster_size
        bpc = store.blocks_per_cluster
        src = None if zero else memoryview(io.buf)
        wholes = [bytearray(cs) for _ in new]

        def failed(status: int) -> None:
            store.unreserve(pcs)
            finish(status)

        def committed(status: int) -> None:
            if status:
                failed(status)
            else:
                finish(0)

        def flushed(status: int) -> None:
            if status:
                failed(status)
                return
            md = store.md.copy()
            md.volumes[vol.uuid].map.update((s.vc, s.pc) for s in new)
            store.commit(ch, md, committed)

        def written(status: int) -> None:
            if status:
                failed(status)
            else:
                baseio.flush(ch, flushed)

        def copied(status: int) -> None:
            if status:
                failed(status)
                return
            join = baseio.Join(len(old) + len(new), written)
            for s in old:
                a = s.io_off * bs
                if zero:
                    baseio.zero(ch, self._base_block(s), s.n, join.one)
                else:
                    baseio.submit(ch, IOType.WRITE, self._base_block(s), s.n,
                                  src[a:a + s.n * bs], join.one)  # type: ignore[index]
            for s, whole in zip(new, wholes, strict=True):
                a, b = s.in_off * bs, (s.in_off + s.n) * bs
                if zero:
                    whole[a:b] = bytes(b - a)
                else:
                    whole[a:b] = src[s.io_off * bs:s.io_off * bs + b - a]  # type: ignore[index]
                baseio.submit(ch, IOType.WRITE, store.cluster_block(s.pc), bpc,
                              memoryview(whole), join.one)

        cow = [(s, w) for s, w in zip(new, wholes, strict=True) if s.src != UNMAPPED]
        join = baseio.Join(len(cow), copied)
        for s, whole in cow:  # the parent's cluster first: the write lands on a copy of it
            baseio.submit(ch, IOType.READ, store.cluster_block(s.src), bpc, memoryview(whole),
                          join.one)

    def _deallocate(self, io: BdevIO, vol: VolumeRecord, segs: list[Segment],
                    finish: baseio.Done) -> None:
        """Free the whole clusters (metadata first), zero the partial ones."""
        store = self.bdev.store
        bpc = store.blocks_per_cluster
        whole = [s for s in segs if s.pc != UNMAPPED and s.n == bpc]
        part = [s for s in segs if s.pc != UNMAPPED and s.n < bpc]
        ch = self.base_channels[0]

        def committed(status: int) -> None:
            if status:
                finish(status)
                return
            freed = [s.pc for s in whole]
            baseio.clear(ch, vol.clear_method, store.extents(freed),
                         lambda st: (store.retire(freed), finish(0)))

        def zeroed(status: int) -> None:
            if status:
                finish(status)
                return
            if not whole:
                finish(0)
                return
            md = store.md.copy()
            m = md.volumes[vol.uuid].map
            for s in whole:
                m.pop(s.vc, None)
            store.commit(ch, md, committed)

        join = baseio.Join(len(part), zeroed)
        for s in part:
            baseio.zero(ch, self._base_block(s), s.n, join.one)


class LvolBdev(StackedBdev):
    """Named by its UUID, alias `<lvs>/<lvol>`, as SPDK. Not in save_config: the store
    on the base brings it back (examine)."""

    def __init__(self, *, store: LvolStore, **kw: Any) -> None:
        super().__init__(links=[store.link], **kw)  # type: ignore[list-item]
        self.store = store
        self._enospc_logged = 0.0

    def create_channel(self, reactor: Reactor | None) -> LvolChannel:
        return LvolChannel(self, reactor)

    def destruct(self) -> None:
        """The claim on the base is the store's, not this volume's."""

    def config_entry(self) -> dict[str, Any] | None:
        return None

    @property
    def record(self) -> VolumeRecord:
        return self.store.md.volumes[self.uuid]

    def out_of_space(self, needed: int) -> None:
        store = self.store
        store.enospc_errors += 1
        now = time.monotonic()
        if now - self._enospc_logged >= _ENOSPC_LOG_INTERVAL_S:
            self._enospc_logged = now
            log.error("lvol %s: write needs %d new cluster(s), lvstore '%s' has %d free: "
                      "failed with Capacity Exceeded (%d such writes so far)",
                      self.aliases[0] if self.aliases else self.name, needed, store.name,
                      store.free_clusters(), store.enospc_errors)

    def driver_specific(self) -> dict[str, Any]:
        v = self.store.md.volumes.get(self.uuid)
        if v is None:
            return {}
        md = self.store.md
        out: dict[str, Any] = {
            "name": v.name,
            "lvol_store_uuid": self.store.uuid,
            "base_bdev": self.store.base.name,
            "thin_provision": v.thin,
            "num_allocated_clusters": len(v.map),
            "snapshot": v.snapshot,
            "clone": v.parent is not None,
            "esnap_clone": False,
            "read_only": v.read_only,
            "clear_method": v.clear_method,
        }
        parent = md.volumes.get(v.parent) if v.parent else None
        if parent is not None:
            out["base_snapshot"] = parent.name
        if v.snapshot:
            out["clones"] = [c.name for c in md.volumes.values() if c.parent == v.uuid]
        return {"lvol": out}
