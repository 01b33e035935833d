"""Resource limits of the NVMe/TCP transport, as sans-I/O pieces the socket side uses.

A target must stay up for every well-behaved host while a broken or hostile one does its
worst, so each resource a host can make us hold has a bound:

- connections: a global count and a count per source address, checked at accept, before
  a reactor spends anything on the socket (`ConnectionLimiter`);
- queue depth: a host may have at most SQSIZE+1 commands outstanding per queue (Connect
  already caps SQSIZE by max_queue_depth); more is a protocol violation (qpair.py);
- data buffers: an R2T buffer is allocated only against a budget, per connection and
  per reactor (the transport's `num_shared_buffers` x `io_unit_size`, split evenly over
  the reactors so no lock is shared). A write that does not fit waits for its R2T until
  buffers are returned; nothing is allocated for it meanwhile (`DataBudget`). In-capsule
  data counts in the same budget; as it arrives unasked, a connection that overruns
  the budget with it is not read from until buffers are returned;
- output: a host that stops reading its responses (its socket's send buffer full past
  a high-water mark) is not read from either until it catches up, so it cannot make us
  queue read data without end (qpair.py pause_writing);
- time: a PDU begun but not completed, a connection that never sends Connect, an R2T
  never answered, a host that reads none of its responses, each within a bound; then
  the connection is closed (`StallWatch`).
  Keep-alive (KATO) is the controller's own timer (nvme/controller.py).

Per-I/O cost is kept near zero: the watch runs from one timer per connection, a few
times per timeout period, and reads state the queue pair keeps anyway; the budget is two
integer additions per R2T.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Why a connection was closed by a limit (metrics label values).
STALL, NO_CONNECT, R2T_TIMEOUT, QUEUE_OVERFLOW, SEND_STALL = (
    "pdu_stall", "no_connect", "r2t_timeout", "queue_overflow", "send_stall")
CLOSE_REASONS = (STALL, NO_CONNECT, R2T_TIMEOUT, QUEUE_OVERFLOW, SEND_STALL)


# ---------------------------------------------------------------------------
# connections


@dataclass(eq=False)
class ConnSlot:
    """One admitted connection; released exactly once, whoever sees the end first."""

    address: str
    released: bool = False


class ConnectionLimiter:
    """Counts open connections, globally and per source address.

    Admission runs on the control-plane loop (accept); release on the reactor that owned
    the connection; one lock, taken once per connection, never per I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.refused_global = 0
        self.refused_per_address = 0

    def admit(self, address: str, max_total: int, max_per_address: int) -> ConnSlot | None:
        """A slot, or None when a limit is reached (0 means no limit)."""
        with self._lock:
            if max_total and self.open >= max_total:
                self.refused_global += 1
                return None
            n = self.by_address.get(address, 0)
            if max_per_address and n >= max_per_address:
                self.refused_per_address += 1
                return None
            self.open += 1
            self.by_address[address] = n + 1
            return ConnSlot(address)

    def release(self, slot: ConnSlot | None) -> None:
        if slot is None:
            return
        with self._lock:
            if slot.released:
                return
            slot.released = True
            self.open -= 1
            n = self.by_address.get(slot.address, 0) - 1
            if n > 0:
                self.by_address[slot.address] = n
            else:
                self.by_address.pop(slot.address, None)


# ---------------------------------------------------------------------------
# data buffers


class BudgetUser:
    """What DataBudget needs from a queue pair: bytes held, and a way to resume."""

    budget_held: int
    budget_queued: bool

    def resume_r2t(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class DataBudget:
    """R2T buffer bytes of one reactor (touched only by that reactor's thread).

    ``take`` never refuses the first buffer of an idle connection on an idle reactor, so
    a single transfer larger than a share still makes progress; everything else beyond
    a limit waits. Waiting connections are resumed in arrival order, so a greedy host
    cannot starve a patient one."""

    limit: int
    per_qpair: int
    used: int = 0
    waits: int = 0  # R2Ts that had to wait for buffers
    read_pauses: int = 0  # connections paused: their in-capsule data overran the budget
    high_water: int = 0
    waiting: deque[Any] = field(default_factory=deque)
    closed_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))

    def take(self, user: Any, n: int) -> bool:
        held = user.budget_held
        if (held and held + n > self.per_qpair) or (self.used and self.used + n > self.limit):
            self.waits += 1
            if not user.budget_queued:
                user.budget_queued = True
                self.waiting.append(user)
            return False
        user.budget_held = held + n
        self.used += n
        if self.used > self.high_water:
            self.high_water = self.used
        return True

    def hold(self, user: Any, n: int) -> bool:
        """Account in-capsule data, which has already arrived and so cannot wait for a
        buffer as an R2T does. It counts in the same budget as R2T buffers (it is the
        same memory: data of commands not yet completed), so the reactor's total stays
        bounded; False means the budget is now exceeded and the caller must stop
        reading that connection until ``resume_r2t`` is called (it is queued for it).
        Without this, in-capsule data was bounded only per connection: queue size x
        in_capsule_data_size x max_connections, i.e. gigabytes."""
        user.budget_held += n
        self.used += n
        if self.used > self.high_water:
            self.high_water = self.used
        if self.used <= self.limit:
            return True
        self.read_pauses += 1
        if not user.budget_queued:
            user.budget_queued = True
            self.waiting.append(user)
        return False

    def give_back(self, user: Any, n: int) -> None:
        user.budget_held -= n
        self.used -= n
        if self.waiting:
            self._wake()

    def drop(self, user: Any) -> None:
        """A connection is gone: return all it held and forget that it waited."""
        if user.budget_held:
            self.used -= user.budget_held
            user.budget_held = 0
        if user.budget_queued:
            user.budget_queued = False
            try:
                self.waiting.remove(user)
            except ValueError:
                pass
        if self.waiting:
            self._wake()

    def _wake(self) -> None:
        # each waiting connection gets one try, in order; one that still cannot go on
        # re-queues itself at the tail (take() above)
        for _ in range(len(self.waiting)):
            if self.used >= self.limit:
                break
            user = self.waiting.popleft()
            user.budget_queued = False
            user.resume_r2t()


# ---------------------------------------------------------------------------
# time


class StallWatch:
    """The per-connection clock of the three "host went quiet" rules.

    ``check`` is called from a timer a few times per timeout period; it looks at how many
    PDUs have completed (a counter the connection bumps once per receive), whether part
    of a PDU is buffered, and which R2Ts are outstanding, and returns why the connection
    must go, or None. A PDU is stalled when it has been partly received for longer than
    ``stall`` with no PDU completing meanwhile: a host trickling one byte a second is
    stalled, a busy connection that always has the next PDU in flight is not."""

    __slots__ = ("stall", "r2t", "born", "_partial_since", "_pdus_seen", "_r2t_seen")

    def __init__(self, stall: float, r2t: float, now: float) -> None:
        self.stall = stall
        self.r2t = r2t
        self.born = now
        self._partial_since: float | None = None
        self._pdus_seen = -1
        self._r2t_seen: dict[int, tuple[Any, float]] = {}

    @staticmethod
    def period(stall: float, r2t: float) -> float | None:
        """How often to check: a quarter of the shortest timeout (None: all disabled)."""
        ts = [t for t in (stall, r2t) if t > 0]
        return max(min(ts) / 4, 0.05) if ts else None

    def check(self, now: float, *, connected: bool, buffered: int, pdus: int,
              r2t_pending: Mapping[int, Any], write_paused_since: float | None = None,
              ) -> tuple[str, str] | None:
        if self.stall > 0:
            if not connected and now - self.born > self.stall:
                return NO_CONNECT, f"no Connect within {self.stall:g} s"
            if write_paused_since is not None and now - write_paused_since > self.stall:
                return SEND_STALL, (f"host read none of its responses for "
                                    f"{now - write_paused_since:.1f} s")
            if buffered and pdus == self._pdus_seen:
                if self._partial_since is None:
                    self._partial_since = now
                elif now - self._partial_since > self.stall:
                    return STALL, (f"PDU incomplete for {now - self._partial_since:.1f} s "
                                   f"({buffered} bytes buffered)")
            else:
                self._partial_since = now if buffered else None
            self._pdus_seen = pdus
        if self.r2t > 0 and (r2t_pending or self._r2t_seen):
            seen = self._r2t_seen
            fresh: dict[int, tuple[Any, float]] = {}
            for ttag, req in r2t_pending.items():
                prev = seen.get(ttag)
                t0 = prev[1] if prev is not None and prev[0] is req else now
                if now - t0 > self.r2t:
                    return R2T_TIMEOUT, (f"R2T ttag {ttag} (cid {getattr(req, 'cid', '?')}) "
                                         f"unanswered for {now - t0:.1f} s")
                fresh[ttag] = (req, t0)
            self._r2t_seen = fresh
        return None


def budget_for(limit_total: int, reactors: int, per_qpair: int) -> DataBudget:
    """A reactor's share of the transport's buffer budget."""
    return DataBudget(limit=max(limit_total // max(reactors, 1), 1), per_qpair=per_qpair)

