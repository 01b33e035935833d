"""A store's volumes as the C lane sees them: one cluster map per volume in C memory
(csrc/bt_lvol.h's ``struct bt_lvmap``), which the lane consults to send a volume's reads
and writes straight to the base, and which only this module writes.

An entry holds the byte offset on the base of the cluster a read of that virtual
cluster finds (the volume's own, else a parent's up the chain: `format.resolve`), bit 0
set when the volume owns it (only then may the lane write there), or all ones (reads
zeroes; a write must allocate: the Python path's). The rules, with bt_lvol.h's C half:

* an entry appears only after the metadata naming it is durable: `committed` runs once
  a commit is live, and a commit that only adds clusters (a first write, a copy of
  inflate or decouple) just stores the new entries, one atomic 8-byte store each;
* any other commit (snapshot, resize, delete, Deallocate, decouple's last step,
  read-only) is a *structural* one: `before` freezes every map of
  the store and waits until no lane command uses one (`busy`), then the commit runs
  (the Python path takes the volumes' commands meanwhile: it is the reference for these
  changes), then every map is rebuilt from the new metadata and thawed. So the lane
  never writes a cluster a snapshot took, nor touches one a change freed: the clusters
  a commit frees are retired after it (store.py), when no lane I/O can still reach them,
  which is what the store's I/O epochs guarantee for the Python path's forwarded I/O.

Freezing the whole store is coarse, but structural changes are control-plane rates, and
a frozen volume still serves every command, through Python.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .format import UNMAPPED, Metadata, VolumeRecord, resolve

if TYPE_CHECKING:
    from .store import LvolStore

try:
    from .._fastpath import ffi, lib
except ImportError:  # no C lane built: every volume I/O takes the Python path
    ffi = lib = None

log = logging.getLogger("blocktarget.lvol")

AVAILABLE = lib is not None
ENTRY_UNMAPPED = (1 << 64) - 1
OWN = 1
_DRAIN_POLL_S = 0.0002
_DRAIN_WARN_S = 5.0


class LaneMap:
    """One volume's ``struct bt_lvmap`` and the array it points to."""

    def __init__(self, nclusters: int, cluster_bytes: int) -> None:
        self.c = ffi.new("struct bt_lvmap *")
        self.c.cluster_shift = cluster_bytes.bit_length() - 1
        self._arr: Any = None
        self._size(nclusters)

    def _size(self, n: int) -> None:
        arr = ffi.new("uint64_t[]", max(n, 1))
        ffi.memmove(arr, b"\xff" * (8 * max(n, 1)), 8 * max(n, 1))
        self.c.map = arr
        self.c.nclusters = n
        self._arr = arr  # (the old array, if any, is unused: the map is frozen and idle)

    @property
    def busy(self) -> int:
        return int(lib.bt_lvmap_busy(self.c))

    def entry(self, vc: int) -> int:
        return int(self._arr[vc])


class LaneMaps:
    """The C maps of one store's volumes, made when the lane first asks for a volume's
    (`get`). Callers hold the store's lock around `get` and `committed`, so a map made
    while a commit goes live sees either the old metadata (and then the commit's
    update) or the new."""

    def __init__(self, store: LvolStore) -> None:
        self.store = store
        self.maps: dict[str, LaneMap] = {}
        self.frozen = False

    def get(self, vol_uuid: str) -> LaneMap | None:
        m = self.maps.get(vol_uuid)
        if m is not None:
            return m
        md = self.store.md
        vol = md.volumes.get(vol_uuid)
        cs = self.store.cluster_size
        if vol is None or cs & (cs - 1):
            return None  # (the lane's lookup shifts: a store of another cluster size is
            #              the Python path's; the RPC makes only powers of two)
        m = LaneMap(vol.num_clusters, self.store.cluster_size)
        self._fill(m, md, vol)
        if self.frozen:
            lib.bt_lvmap_freeze(m.c, 1)
        self.maps[vol_uuid] = m
        return m

    def _fill(self, m: LaneMap, md: Metadata, vol: VolumeRecord) -> None:
        """Every entry from `md` (the map is frozen and idle, or not yet published)."""
        if m.c.nclusters != vol.num_clusters:
            m._size(vol.num_clusters)
        off = self.store.sb.cluster_offset
        arr = m._arr
        for vc in range(vol.num_clusters):
            pc = vol.map.get(vc)
            if pc is not None:
                arr[vc] = off(pc) | OWN
            else:
                src = resolve(md, vol, vc) if vol.parent is not None else UNMAPPED
                arr[vc] = ENTRY_UNMAPPED if src == UNMAPPED else off(src)
        m.c.read_only = 1 if vol.read_only else 0

    # ---- commits (store.commit) ----
    def structural(self, old: Metadata, new: Metadata) -> bool:
        """Does going from `old` to `new` change or drop a mapping the lane may use (or
        a volume's geometry, parent or read-only flag)? Adding clusters does not. Every
        volume is looked at, not only those with a map now: one may be made meanwhile
        (from the old metadata), and only a freeze makes it wait for the rebuild."""
        for u, v in old.volumes.items():
            w = new.volumes.get(u)
            if w is None or (w.num_clusters, w.parent, w.parent_clusters, w.read_only) != (
                    v.num_clusters, v.parent, v.parent_clusters, v.read_only):
                return True
            if len(w.map) < len(v.map) or any(w.map.get(vc) != pc for vc, pc in v.map.items()):
                return True
        return False

    def before(self, old: Metadata, new: Metadata, go: Callable[[bool], None]) -> None:
        """Ahead of a commit from `old` to `new`: go(structural) once the lane may no
        longer use what the commit changes (at once for a commit that only adds)."""
        if not self.structural(old, new):
            go(False)
            return
        with self.store.lock:
            self.frozen = True
            for m in self.maps.values():
                lib.bt_lvmap_freeze(m.c, 1)
        self._drained(lambda: go(True), time.monotonic())

    def _drained(self, then: Callable[[], None], t0: float) -> None:
        """then() once no lane command holds any of the maps: now, or polled on this
        thread's event loop (the lane's I/O completes on the reactors' loops; a
        synchronous backend's within a lane call on another reactor's thread)."""
        with self.store.lock:
            maps = list(self.maps.values())
        if not any(m.busy for m in maps):
            then()
            return
        if time.monotonic() - t0 > _DRAIN_WARN_S:
            log.warning("lvstore %s: lane I/O still in flight %.0f s after a freeze",
                        self.store.name, time.monotonic() - t0)
            t0 = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop here: the I/O is another thread's to finish)
            time.sleep(_DRAIN_POLL_S)
            self._drained(then, t0)
            return
        loop.call_later(_DRAIN_POLL_S, self._drained, then, t0)

    def committed(self, old: Metadata, new: Metadata, structural: bool) -> None:
        """`new` is live (the caller holds the store's lock): entries for the clusters
        it added, or, after a structural change, every map rebuilt and thawed."""
        if structural:
            self.thaw(new)
            return
        off = self.store.sb.cluster_offset
        for u, m in self.maps.items():
            w, v = new.volumes.get(u), old.volumes.get(u)
            if w is None or v is None or len(w.map) == len(v.map):
                continue
            for vc, pc in w.map.items():
                if vc not in v.map:
                    lib.bt_lvmap_set(m.c, vc, off(pc) | OWN)

    def thaw(self, md: Metadata) -> None:
        """After a structural commit (or a failed one: `md` is then the old metadata):
        maps rebuilt from the live metadata, thawed; a deleted volume's stays frozen
        and empty (its namespace is on its way out)."""
        if not self.frozen:
            return
        for u, m in list(self.maps.items()):
            vol = md.volumes.get(u)
            if vol is None:
                m._size(0)
                del self.maps[u]
                continue
            self._fill(m, md, vol)
            lib.bt_lvmap_freeze(m.c, 0)
        self.frozen = False
