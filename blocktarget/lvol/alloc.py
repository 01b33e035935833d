"""Which physical clusters of a store are free.

The free map is never stored: it is derived from the volumes' cluster maps when a store
is opened (and checked: a cluster owned twice means corrupt metadata, and the store is
refused rather than handing one cluster to two volumes). While the store runs, clusters
move through three states:

* owned: in a volume's map (durable), or reserved by an operation in flight;
* limbo: released by a committed change (unmap, shrink, delete) but possibly still the
  target of an I/O submitted before that change was visible: reusing it now could let
  that late write land in another volume's new cluster. A limbo cluster becomes free
  once every I/O that started before its release has completed (`IoEpochs`);
* free.

Callers hold the store's lock around every method here (several reactors allocate).
"""

from __future__ import annotations

from collections.abc import Iterable


class NoSpace(Exception):
    """Not enough free clusters."""


class ClusterAllocator:
    def __init__(self, total: int) -> None:
        self.total = total
        self._free = bytearray(b"\x01") * total  # 1: free
        self.free_count = total
        self._hint = 0
        self._limbo: list[tuple[int, list[int]]] = []  # (epoch released in, clusters)

    @classmethod
    def from_maps(cls, total: int, maps: Iterable[tuple[str, dict[int, int]]]
                  ) -> ClusterAllocator:
        """The allocator for volumes with these maps; ValueError naming the conflict when a
        cluster is out of range or owned twice."""
        a = cls(total)
        owner: dict[int, str] = {}
        for name, m in maps:
            for v, p in m.items():
                if not 0 <= p < total:
                    raise ValueError(f"volume {name}: cluster {v} maps to {p}, outside the "
                                     f"store's {total} clusters")
                if p in owner:
                    raise ValueError(f"cluster {p} is owned by both {owner[p]} and {name}")
                owner[p] = name
                a._take(p)
        return a

    def grow(self, total: int) -> None:
        """More clusters (the store grew with its base), all free."""
        if total > self.total:
            self._free.extend(b"\x01" * (total - self.total))
            self.free_count += total - self.total
            self.total = total

    def _take(self, p: int) -> None:
        self._free[p] = 0
        self.free_count -= 1

    def allocate(self, n: int) -> list[int]:
        """n free clusters (lowest first from a moving hint, so thin volumes written
        sequentially get runs); NoSpace when there are fewer."""
        if n > self.free_count:
            raise NoSpace(f"{n} clusters needed, {self.free_count} free")
        out: list[int] = []
        i = self._hint
        free = self._free
        while len(out) < n:
            j = free.find(1, i)
            if j < 0:
                j = free.find(1, 0)
            out.append(j)
            free[j] = 0
            i = j + 1
        self.free_count -= n
        self._hint = i if i < self.total else 0
        return out

    def release(self, clusters: Iterable[int]) -> None:
        """Give clusters back at once (a reservation that was never made visible)."""
        for p in clusters:
            if self._free[p]:
                raise ValueError(f"cluster {p} released twice")
            self._free[p] = 1
            self.free_count += 1
            self._hint = min(self._hint, p)

    def to_limbo(self, clusters: list[int], epoch: int) -> None:
        if clusters:
            self._limbo.append((epoch, clusters))

    def reclaim(self, oldest_busy_epoch: int | None) -> None:
        """Free the limbo clusters released before the oldest epoch with I/O in flight
        (None: no I/O in flight at all)."""
        keep = []
        for epoch, clusters in self._limbo:
            if oldest_busy_epoch is None or epoch < oldest_busy_epoch:
                self.release(clusters)
            else:
                keep.append((epoch, clusters))
        self._limbo = keep

    @property
    def limbo_count(self) -> int:
        return sum(len(c) for _, c in self._limbo)


class IoEpochs:
    """Counts I/Os in flight per epoch. A release bumps the epoch: clusters released in
    epoch e may be reused once no I/O that started in an epoch <= e is in flight."""

    def __init__(self) -> None:
        self.epoch = 0
        self.inflight: dict[int, int] = {}

    def start(self) -> int:
        e = self.epoch
        self.inflight[e] = self.inflight.get(e, 0) + 1
        return e

    def done(self, e: int) -> None:
        n = self.inflight[e] - 1
        if n:
            self.inflight[e] = n
        else:
            del self.inflight[e]

    def advance(self) -> int:
        """The epoch now ending (clusters released now are stamped with it)."""
        e = self.epoch
        self.epoch += 1
        return e

    def oldest_busy(self) -> int | None:
        return min(self.inflight) if self.inflight else None
