"""NVMe-oF controller state: properties, features, keep-alive, async events, logs.

A controller is created by an admin-queue Connect and lives as long as its admin queue.
Its queue pairs may sit on different reactors; state that an I/O queue touches (the
namespace map, counters) is read without locks, counters are kept per queue pair and
summed when a log page asks. Events that must complete a held Asynchronous Event Request
are sent to the admin queue's reactor as messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import spec
from .structs import ErrorLogEntry

if TYPE_CHECKING:
    from ..reactor import Reactor
    from .subsystem import ListenAddress, Subsystem

log = logging.getLogger(__name__)

VERSION = spec.make_version(1, 4, 0)
CAP_TO_500MS = 15  # CAP.TO: worst-case time to become ready, in 500 ms units
AERL = 3  # 0's based: four AERs may be outstanding
ERROR_LOG_ENTRIES = 64
KAS_100MS = 10  # Keep Alive granularity reported in Identify (100 ms units)


class QpairCounters:
    """Per queue pair counters for SMART; only the queue's reactor writes them."""

    __slots__ = ("read_cmds", "write_cmds", "read_blocks_bytes", "write_bytes", "busy_ns")

    def __init__(self) -> None:
        self.read_cmds = 0
        self.write_cmds = 0
        self.read_blocks_bytes = 0
        self.write_bytes = 0
        self.busy_ns = 0


class Controller:
    def __init__(
        self,
        *,
        cntlid: int,
        subsystem: Subsystem,
        hostnqn: str,
        hostid: bytes,
        kato_ms: int,
        reactor: Reactor,
        max_queue_depth: int,
        max_io_queues: int,
        discovery: bool,
    ) -> None:
        self.cntlid = cntlid
        self.subsystem = subsystem
        self.hostnqn = hostnqn
        self.hostid = hostid
        self.kato_ms = kato_ms
        self.reactor = reactor  # the admin queue's reactor
        self.max_queue_depth = max_queue_depth
        self.max_io_queues = max_io_queues
        self.discovery = discovery
        self.cc = 0
        self.csts = 0
        self.qpairs: dict[int, Any] = {}
        self.created = time.monotonic()
        self.last_keep_alive = time.monotonic()
        self.dead = False
        self.granted_io_queues = max_io_queues  # NCQR/NSQR after Set Features 07h
        self.features: dict[int, int] = {
            spec.FeatureId.ARBITRATION: 0,
            spec.FeatureId.POWER_MGMT: 0,
            spec.FeatureId.TEMP_THRESH: 0x0157,  # 343 K over-temperature default
            spec.FeatureId.ERR_RECOVERY: 0,
            spec.FeatureId.VOLATILE_WC: 1,
            spec.FeatureId.IRQ_COALESCE: 0,
            spec.FeatureId.IRQ_CONFIG: 0,
            spec.FeatureId.WRITE_ATOMIC: 0,
            spec.FeatureId.ASYNC_EVENT: 0,
        }
        self.under_temp_threshold = 0
        # held AER commands (callables completing them) and events waiting for one
        self.aer_waiting: deque[Callable[[int], None]] = deque()
        self.events: deque[tuple[int, int, int]] = deque()
        self.masked_events: set[tuple[int, int]] = set()  # (type, info) until log is read
        self.changed_ns: set[int] = set()
        self.changed_ns_overflow = False
        self.errors: deque[ErrorLogEntry] = deque(maxlen=ERROR_LOG_ENTRIES)
        self.error_count = 0
        self.counters: list[QpairCounters] = []
        self.retired = QpairCounters()
        # the listener the admin queue came through: its ANA states are this
        # controller's view (ANA log page, path status of I/O)
        self.listener: ListenAddress | None = None
        self._kato_handle: Any = None
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"ctrl {self.cntlid} of {self.subsystem.nqn} for {self.hostnqn}"

    # ---- properties ----
    @property
    def cap(self) -> int:
        mqes = (self.max_queue_depth - 1) & 0xFFFF
        return (
            mqes
            | (1 << 16)  # CQR: queues must be physically contiguous (meaningless on fabrics)
            | (CAP_TO_500MS << 24)
            | (1 << 37)  # CSS: NVM command set
        )

    @property
    def enabled(self) -> bool:
        return bool(self.csts & spec.CSTS_RDY)

    def property_get(self, offset: int, size: int) -> int | None:
        if offset == spec.Property.CAP and size == 8:
            return self.cap
        if offset == spec.Property.VS and size == 4:
            return VERSION
        if offset == spec.Property.CC and size == 4:
            return self.cc
        if offset == spec.Property.CSTS and size == 4:
            return self.csts
        if offset == spec.Property.NSSR and size == 4:
            return 0
        return None

    def property_set(self, offset: int, size: int, value: int) -> bool:
        """Apply a property write; False means the offset/size is not writable."""
        if offset != spec.Property.CC or size != 4:
            return False
        old, new = self.cc, value & 0xFFFFFFFF
        self.cc = new
        en_old, en_new = old & 1, new & 1
        shn = (new >> 14) & 0x3
        if en_new and not en_old:
            iosqes, iocqes = (new >> 16) & 0xF, (new >> 20) & 0xF
            if not self.discovery and (iosqes != 6 or iocqes != 4):
                self.csts |= 0x2  # CFS: the host asked for entry sizes we do not use
            else:
                self.csts |= 0x1
        elif en_old and not en_new:
            self.csts &= ~0x1
            self.reset_io_queues("controller disabled (CC.EN=0)")
        if shn and not (old >> 14) & 0x3:
            # Normal or abrupt shutdown: nothing volatile to save beyond the bdevs'
            # own caches, so the shutdown completes at once.
            self.csts = (self.csts & ~(0x3 << 2)) | (0x2 << 2)
        elif not shn:
            self.csts &= ~(0x3 << 2)
        return True

    # ---- queues ----
    def add_qpair(self, qid: int, qpair: Any) -> None:
        if qid == 0:
            self.listener = qpair.addr
        with self._lock:
            self.qpairs[qid] = qpair
            self.counters.append(qpair.counters)
        # After the insert: a concurrent ANA change either is seen here or finds this
        # queue in `qpairs` and sends it a refresh (see refresh_ana).
        qpair.ana_inaccessible = self.subsystem.inaccessible_nsids(self.listener)

    def remove_qpair(self, qid: int, qpair: Any) -> None:
        with self._lock:
            if self.qpairs.get(qid) is qpair:
                del self.qpairs[qid]
            if qpair.counters in self.counters:
                self.counters.remove(qpair.counters)
                r = self.retired
                c = qpair.counters
                r.read_cmds += c.read_cmds
                r.write_cmds += c.write_cmds
                r.read_blocks_bytes += c.read_blocks_bytes
                r.write_bytes += c.write_bytes

    # ---- ANA ----
    def refresh_ana(self) -> None:
        """After an ANA state or namespace change (from any thread): each queue pair
        recomputes, on its own reactor, the nsids it must fail with the inaccessible
        path status. The I/O path only reads its queue pair's frozenset."""
        sub, listener = self.subsystem, self.listener
        for qp in list(self.qpairs.values()):
            loop = qp.reactor.loop
            if loop is None:
                continue
            loop.call_soon_threadsafe(_set_inaccessible, qp, sub, listener)

    def ana_changed(self) -> None:
        """The ANA state of this controller's listener changed (from any thread)."""
        self.refresh_ana()
        loop = self.reactor.loop
        if loop is not None:
            loop.call_soon_threadsafe(self.post_event, spec.AsyncEventType.NOTICE,
                                      spec.AsyncEventNotice.ANA_CHANGE, spec.LogPage.ANA)

    def reset_io_queues(self, reason: str) -> None:
        for qid, qp in list(self.qpairs.items()):
            if qid != 0:
                qp.close_threadsafe(reason)

    def fold_local(self) -> None:
        """Fold the counters the C poller keeps for this controller's lent I/O queues
        on the calling reactor (nvme/netpoll.py); a queue on another reactor is folded
        by that reactor's timer (netpoll.FOLD_S), which the SMART log may lag by."""
        with self._lock:
            qps = list(self.qpairs.values())
        for qp in qps:
            lane = getattr(qp, "_lane", None)
            if lane is not None and qp._net is not None and qp.reactor.on_reactor():
                lane.fold()

    def totals(self) -> QpairCounters:
        t = QpairCounters()
        with self._lock:
            parts = [self.retired, *self.counters]
        for c in parts:
            t.read_cmds += c.read_cmds
            t.write_cmds += c.write_cmds
            t.read_blocks_bytes += c.read_blocks_bytes
            t.write_bytes += c.write_bytes
        return t

    # ---- keep alive ----
    def keep_alive(self) -> None:
        self.last_keep_alive = time.monotonic()

    def set_kato(self, kato_ms: int) -> None:
        """Set Features KATO (on the admin reactor): the new timeout applies at once,
        including turning the timer on or off."""
        self.kato_ms = kato_ms
        self.keep_alive()
        if self._kato_handle is not None:
            self._kato_handle.cancel()
            self._kato_handle = None
        self.start_kato_timer()

    def start_kato_timer(self) -> None:
        """Arm the keep-alive check on the admin reactor (KATO=0 disables it)."""
        if self.kato_ms <= 0 or self.reactor.loop is None or self.dead:
            return
        period = max(self.kato_ms / 4000.0, 0.05)
        self._kato_handle = self.reactor.loop.call_later(period, self._kato_check, period)

    def _kato_check(self, period: float) -> None:
        if self.dead:
            return
        elapsed = time.monotonic() - self.last_keep_alive
        if elapsed * 1000 > self.kato_ms:
            log.warning("%s: keep alive timeout (%.1f s > KATO %d ms): tearing it down",
                        self, elapsed, self.kato_ms)
            self.teardown("keep alive timeout")
            return
        self._kato_handle = self.reactor.loop.call_later(period, self._kato_check, period)

    def teardown(self, reason: str) -> None:
        """Close every queue of the controller (I/O in flight is aborted)."""
        if self.dead:
            return
        self.dead = True
        if self._kato_handle is not None:
            self._kato_handle.cancel()
        for qp in list(self.qpairs.values()):
            qp.close_threadsafe(reason)

    # ---- async events ----
    def aen_enabled(self, event_type: int, info: int) -> bool:
        aec = self.features.get(spec.FeatureId.ASYNC_EVENT, 0)
        if event_type == spec.AsyncEventType.NOTICE:
            if info == spec.AsyncEventNotice.NS_ATTR_CHANGED:
                return bool(aec & (1 << 8))
            if info == spec.AsyncEventNotice.FW_ACTIVATION_STARTING:
                return bool(aec & (1 << 9))
            if info == spec.AsyncEventNotice.ANA_CHANGE:
                return bool(aec & (1 << 11))
            if info == spec.AsyncEventNotice.DISCOVERY_LOG_CHANGE:
                return bool(aec & (1 << 31))
        return True

    def post_event(self, event_type: int, info: int, log_page: int) -> None:
        """Queue an event (on the admin reactor) and complete a held AER if there is one."""
        if self.dead or not self.aen_enabled(event_type, info):
            return
        if (event_type, info) in self.masked_events:
            return  # the host has not read the log page of the last one yet
        self.masked_events.add((event_type, info))
        self.events.append((event_type, info, log_page))
        self._deliver()

    def hold_aer(self, complete: Callable[[int], None]) -> bool:
        if len(self.aer_waiting) > AERL:
            return False
        self.aer_waiting.append(complete)
        self._deliver()
        return True

    def _deliver(self) -> None:
        while self.events and self.aer_waiting:
            etype, info, lid = self.events.popleft()
            self.aer_waiting.popleft()(spec.make_aen_result(etype, info, lid))

    def log_read(self, lid: int, rae: bool) -> None:
        """Reading the log page re-arms its event (unless Retain Async Event is set)."""
        if rae:
            return
        for key in list(self.masked_events):
            etype, info = key
            if (lid == spec.LogPage.CHANGED_NS and info == spec.AsyncEventNotice.NS_ATTR_CHANGED
                    and etype == spec.AsyncEventType.NOTICE):
                self.masked_events.discard(key)
            elif lid == spec.LogPage.DISCOVERY and info == spec.AsyncEventNotice.DISCOVERY_LOG_CHANGE:
                self.masked_events.discard(key)
            elif lid == spec.LogPage.ANA and info == spec.AsyncEventNotice.ANA_CHANGE:
                self.masked_events.discard(key)
        if lid == spec.LogPage.CHANGED_NS:
            self.changed_ns.clear()
            self.changed_ns_overflow = False

    def ns_changed(self, nsid: int) -> None:
        """Called on the admin reactor when a namespace is added or removed live."""
        if len(self.changed_ns) >= spec.MAX_CHANGED_NAMESPACES:
            self.changed_ns_overflow = True
        else:
            self.changed_ns.add(nsid)
        self.post_event(spec.AsyncEventType.NOTICE, spec.AsyncEventNotice.NS_ATTR_CHANGED,
                        spec.LogPage.CHANGED_NS)

    # ---- error log ----
    def record_error(self, sqid: int, cid: int, status: int, nsid: int = 0, lba: int = 0) -> None:
        self.error_count += 1
        self.errors.appendleft(
            ErrorLogEntry(
                error_count=self.error_count, sqid=sqid, cid=cid, status=status,
                param_error_location=0xFFFF, lba=lba, nsid=nsid, vs=0, trtype=3,
                cs=0, trtype_specific=0,
            )
        )


def _set_inaccessible(qp: Any, sub: Subsystem, listener: ListenAddress | None) -> None:
    qp.ana_inaccessible = sub.inaccessible_nsids(listener)
    lane = getattr(qp, "_lane", None)  # (fake queue pairs in unit tests have none)
    if lane is not None:
        lane.invalidate()


class ControllerTable:
    """Controllers of the whole target, by subsystem and controller id.

    Connects arrive on any reactor; allocation of controller ids is the one place where
    reactors would race, so it takes a lock (Connect is not on the I/O path).
    """

    def __init__(self) -> None:
        self._by_sub: dict[str, dict[int, Controller]] = {}
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()

    def allocate(self, sub: Subsystem, make: Callable[[int], Controller]) -> Controller | None:
        with self._lock:
            ctrls = self._by_sub.setdefault(sub.nqn, {})
            lo, hi = sub.min_cntlid, sub.max_cntlid
            start = self._next.get(sub.nqn, lo)
            span = hi - lo + 1
            for i in range(span):
                cntlid = lo + (start - lo + i) % span
                if cntlid not in ctrls:
                    ctrl = make(cntlid)
                    ctrls[cntlid] = ctrl
                    self._next[sub.nqn] = lo + (cntlid - lo + 1) % span
                    return ctrl
            return None

    def find(self, subnqn: str, cntlid: int) -> Controller | None:
        return self._by_sub.get(subnqn, {}).get(cntlid)

    def remove(self, ctrl: Controller) -> None:
        with self._lock:
            ctrls = self._by_sub.get(ctrl.subsystem.nqn, {})
            if ctrls.get(ctrl.cntlid) is ctrl:
                del ctrls[ctrl.cntlid]

    def of_subsystem(self, nqn: str) -> list[Controller]:
        return list(self._by_sub.get(nqn, {}).values())

    def all(self) -> list[Controller]:
        return [c for d in list(self._by_sub.values()) for c in list(d.values())]
