"""Per-bdev rate limits (SPDK's `bdev_set_qos_limit`): I/Os per second and MB per second
for reads and writes together, and MB per second for each alone.

One `Qos` per limited bdev, shared by every reactor's channel of it: the limit holds for
the bdev as a whole however many connections and reactors drive it. Its token buckets
sit behind a lock because reactors are threads; a reactor takes the lock once per read or
write it submits, which only limited bdevs pay (an unlimited one tests `bdev.qos is None`).

Tokens refill continuously at the limit's rate, up to `BURST_S` worth. An I/O is
admitted when every bucket it draws on has something left, and then takes its whole
size, possibly into debt: a 128 KiB write under a 1 MB/s limit is not starved by smaller
ones, it just makes the next ones wait longer. Over a run of seconds the rate is the limit
within BURST_S / run time. The burst is 50 ms because a reactor's timer under load fires
late by some milliseconds, and tokens not banked over that lateness would be lost (the
rate would fall short of the limit).

I/Os that must wait queue on their channel, in order (a channel with a queue sends new
I/Os behind it, so nothing overtakes), and a timer on the channel's reactor submits them
when the tokens are there (`IOChannel`). The C lane does not serve a limited bdev, or any
bdev stacked on one (`bdev.lane_target_of`): its I/O takes the Python path, which counts
it here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .errors import InvalidParams

BURST_S = 0.05
# SPDK's floor and granularity for the IOPS limit, and the floor of the MB/s ones
MIN_IOS_PER_SEC = 1000
MB = 1024 * 1024

LIMIT_NAMES = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")


@dataclass(frozen=True)
class QosLimits:
    """0: no limit of that kind (SPDK's meaning)."""

    rw_ios_per_sec: int = 0
    rw_mbytes_per_sec: int = 0
    r_mbytes_per_sec: int = 0
    w_mbytes_per_sec: int = 0

    def any(self) -> bool:
        return any(getattr(self, n) for n in LIMIT_NAMES)

    def describe(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in LIMIT_NAMES}

    def updated(self, changes: dict[str, int]) -> QosLimits:
        """These limits with the given ones changed (the others kept, as SPDK does),
        checked: non-negative, IOPS a multiple of 1000."""
        values = self.describe()
        for name, v in changes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidParams(f"parameter '{name}' must be a non-negative integer")
            if name == "rw_ios_per_sec" and v % MIN_IOS_PER_SEC:
                raise InvalidParams(f"parameter 'rw_ios_per_sec' {v} is not a multiple of "
                                    f"{MIN_IOS_PER_SEC} (0 removes the limit)")
            values[name] = v
        return QosLimits(**values)


class _Bucket:
    __slots__ = ("rate", "cap", "avail")

    def __init__(self, rate: float, unit: float) -> None:
        self.rate = rate
        self.cap = max(rate * BURST_S, unit)
        self.avail = self.cap


class Qos:
    """The token buckets of one bdev's limits."""

    def __init__(self, limits: QosLimits, block_size: int) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._last = time.monotonic()
        one = float(block_size)
        self._ios = _Bucket(limits.rw_ios_per_sec, 1.0) if limits.rw_ios_per_sec else None
        self._rw = _Bucket(limits.rw_mbytes_per_sec * MB, one) if limits.rw_mbytes_per_sec else None
        self._r = _Bucket(limits.r_mbytes_per_sec * MB, one) if limits.r_mbytes_per_sec else None
        self._w = _Bucket(limits.w_mbytes_per_sec * MB, one) if limits.w_mbytes_per_sec else None
        self._all = [b for b in (self._ios, self._rw, self._r, self._w) if b is not None]
        self.delayed = 0  # I/Os that had to wait (metrics)

    def admit(self, is_write: bool, nbytes: int) -> float:
        """Take the I/O's tokens and return 0.0, or return the seconds to wait before
        asking again (nothing taken)."""
        draws = []
        if self._ios is not None:
            draws.append((self._ios, 1))
        if self._rw is not None:
            draws.append((self._rw, nbytes))
        one = self._w if is_write else self._r
        if one is not None:
            draws.append((one, nbytes))
        with self._lock:
            now = time.monotonic()
            dt = now - self._last
            self._last = now
            for b in self._all:  # (every bucket: the time passed for all of them)
                b.avail = min(b.cap, b.avail + b.rate * dt)
            wait = 0.0
            for b, _ in draws:
                if b.avail <= 0:
                    wait = max(wait, -b.avail / b.rate, 1e-4)
            if wait:
                return wait
            for b, need in draws:
                b.avail -= need
            return 0.0
