"""The reactor's C socket poller (blocktarget/csrc/net.c): connections lent to C.

Why: with the C lane doing each command's work, most of a reactor's time per 4 KiB I/O
was the event loop's per-read Python callback and the glue around the lane calls, all
of it holding the GIL (bench/dataplane.py), which is what limits reactors on a machine
with cores to spare. So an I/O queue pair in its steady state lends its socket to C: its
transport stops reading (``pause_reading``) and one call per loop wake-up (the poller's
epoll fd is watched with ``loop.add_reader``) receives, runs the lane and sends for
every lent connection of the reactor, many reads per call, the GIL released throughout.

When: exactly when the next receive buffer would start in the lane anyway
(``Lane.usable``), the transport has nothing queued (so nothing can be overtaken), and
no memory is lent to the connection (the NVMe PCIe bdev's direct receive stays
Python's). C gives the socket back at the first input the lane does not take, at the
end of the stream or a socket error, and when a lane command must be done again by the
Python path; the queue pair gives it back itself before closing. Giving back: C's unsent
output goes to the transport first, the transport reads again, and the input C did not
run goes to ``data_received`` as if just read, so the Python path sees the stream as
it always does. The next time the connection is in its steady state (checked where the
queue pair flushes its output) it is lent again.

While lent, everything the queue pair sends goes through C's one queue per socket
(``write``), the Python path's responses too, so lane and Python output never overtake
each other. Flow control is the transport's: output beyond its high mark stops reading
until it drains to the low mark, and the queue pair hears of both as pause_writing and
resume_writing (its stall watch closes a connection whose host never reads).

The lanes' asynchronous backends are reaped here too, so that a lent lane's completion
is answered in the same GIL-free call: io_uring rings (woken by their eventfds) and the
reactor's NVMe queue pairs (polled: each round of a call rings the queue's pending
doorbell and sweeps its CQ; the reactor's Python poller for the queue, while lane
commands are at the device, just calls this poller). Whatever is not a lent lane's (the
Python path's own I/O, a lane Python runs or one closed with I/O in flight) stops C's
sweep there, and Python reaps from that entry on, as before. A suspended (resetting) or
dead queue is Python's alone (csrc/bt_nvme.h has the ownership rule).

What Python does after a call is proportional to what needs Python, not to what C did
(a Python visit per served connection cost 20-30 us per call, all of it holding the GIL:
bench/RESULTS.md). C reports a connection only for an event Python acts on (input handed
back, the end of the stream, a send pause or resume, a command to redo: each gives the
socket back or changes the transport's state); for the rest, two facts per call, not per
connection: the budget the lanes took and gave back (added to the reactor's
``DataBudget`` at once, so it is exact whenever Python reads it, and its waiters woken),
and whether a lane started I/O (the rings' and queue pairs' Python watch is told). The
counters (the lane's and its bdev channels' statistics with their latency histogram,
the controller's SMART counts, the stall watch's PDUs, the SQ head, the queue's budget
share) stay in C and are folded (``Lane.fold``, on the reactor's thread) lazily:
- before anyone reads them: ``Reactor.fold_stats`` (nvmf_get_stats, bdev_get_iostat,
  /metrics broadcast it to every reactor), the stall watch and the SMART log (the
  admin queue's reactor folds its own; another reactor's within the timer below),
  a response the Python path builds (the SQ head);
- when the socket is given back or the queue pair closes (nothing is lost);
- and every ``FOLD_S`` on a timer, so that figures read without asking stay current.

When the lent connections have nothing to do but wait for the host's next command, the
call waits for it in C (the host wait, ``poll.host_wait_us``; csrc/bt_net.h) instead of
returning to the loop, whose every wake-up was a Python pass per command under a slow
host: the loop's own epoll fd is in the same wait, and Python asks for it only while the
loop has no callback ready to run (``loop_wait_parts``), so nothing of the loop's waits
for C, and its timers no longer than the call's time budget (``BUDGET_NS``) let them.

The transport option ``c_net_poll`` (default true) switches this off: the lane still
runs, called from ``data_received`` as before.
"""

from __future__ import annotations

import collections
import gc
import logging
import time
from typing import TYPE_CHECKING, Any

from . import fastlane

if TYPE_CHECKING:
    from ..reactor import Reactor
    from .qpair import Qpair

log = logging.getLogger(__name__)
ffi, lib = fastlane.ffi, fastlane.lib
_now_ns = time.perf_counter_ns
AVAILABLE = fastlane.AVAILABLE and hasattr(lib, "bt_net_new")
MAX_READY = 1024  # connections reported per poll call
# One call's time bound: the reactor's Python (timers, the admin queue, other sockets)
# waits at most this long for its turn.
BUDGET_NS = 500_000
RETRY_S = 0.001  # how soon lending is tried again while the transport has output
CHUNKS = 64
# bt_net_poll's return value: what Python must act on after the call (csrc/bt_net.h)
_PYTHON_CQE, _READY, _STARTED, _BUDGET, _PDUS, _SHORT, _DEV = (
    (lib.BT_NET_PYTHON_CQE, lib.BT_NET_READY, lib.BT_NET_STARTED, lib.BT_NET_BUDGET,
     lib.BT_NET_PDUS, lib.BT_NET_SHORT, lib.BT_NET_DEV) if AVAILABLE else (0,) * 7)
_ATTN = _PYTHON_CQE | _READY | _STARTED | _BUDGET | _PDUS | _SHORT | _DEV
_ATTN_NO_PDUS = _ATTN & ~_PDUS
# Whether the poller sweeps the lanes' NVMe queue pairs (False: the reactor's Python
# poller reaps them, as before; bench/nvme_hotpath.py's baseline)
SWEEP_NVME = True
# How often a reactor folds its lent connections' counters when nobody asks (see the
# module doc): stale by at most this much to a reader that reads without asking.
FOLD_S = 0.2


def eligible(qp: Qpair) -> bool:
    """Whether ``qp`` may ever lend its socket: an I/O queue with a lane, the option on,
    a real socket under its transport (unit tests drive queue pairs with fakes)."""
    if not AVAILABLE or qp._lane is None or not getattr(qp.opts, "c_net_poll", True):
        return False
    t = qp.transport
    sock = t.get_extra_info("socket") if t is not None else None
    try:
        fd = sock.fileno() if sock is not None else -1
    except (OSError, AttributeError, ValueError):
        return False
    if fd < 0 or qp.reactor.loop is None:
        return False
    qp._net_fd = fd
    return True


def loop_wait_parts(loop: Any) -> tuple[int, Any]:
    """The event loop's epoll fd and its queue of callbacks ready to run (a deque), for
    the host wait (bt_net.h): C sleeps on the fd beside its own, and is asked to wait
    only while the queue is empty (a ready callback raises no fd; C would make it wait).
    uvloop keeps the queue in a C attribute: it is the deque among the loop's referents
    that a probe callback lands in. (-1, None) where either cannot be found: no host
    wait, the loop sleeps as before."""
    try:
        fd = loop._get_backend_id() if hasattr(loop, "_get_backend_id") else (
            loop._selector.fileno())
    except (AttributeError, OSError, ValueError):
        return -1, None
    ready = getattr(loop, "_ready", None)
    if not isinstance(ready, collections.deque):
        found = [o for o in gc.get_referents(loop) if type(o) is collections.deque]
        probe = loop.call_soon(lambda: None)
        probe.cancel()
        hits = [q for q in found if q and q[-1] is probe]
        ready = hits[0] if len(hits) == 1 else None
    if ready is None or not isinstance(fd, int) or fd < 0:
        return -1, None
    return fd, ready


class NetPoller:
    """One reactor's poller: the C side (struct bt_net) and its place in the loop."""

    __slots__ = ("reactor", "n", "budget", "conns", "rings", "nvmeqs", "_ready", "_nready",
                 "_closing", "_again", "lent", "watched", "_fold_timer", "_cfg",
                 "_pollers_seen", "_c_only", "_counted", "_loop_ready", "_hw")

    def __init__(self, reactor: Reactor, budget: Any) -> None:
        n = lib.bt_net_new()
        if n == ffi.NULL:
            raise OSError("no memory or file descriptors for the C socket poller")
        self.reactor = reactor
        self.n = n
        self.budget = budget
        self.conns = 0
        self.rings: list[Any] = []  # io_uring rings (bdevs/uring._Ring) it reaps too
        self.nvmeqs: list[Any] = []  # NVMe queue pairs (bdevs/nvme_pcie.ReactorQueue), too
        self._ready = ffi.new("void *[]", MAX_READY)
        self._nready = ffi.new("unsigned *")
        self._closing = False
        self._again: Any = None  # the loop's handle of a call going on at its next turn
        # the queue pairs lent now (folded lazily), and the rings and NVMe queue pairs
        # their lanes use, with how many of them use each (told when a lane starts I/O)
        self.lent: set[Qpair] = set()
        self.watched: dict[Any, int] = {}
        self._cfg: tuple[int, int, bool] | None = None  # (the settings C was last given)
        self._pollers_seen: list[Any] | None = None  # (see _c_pollers_only)
        self._c_only = False
        self._counted = (0,) * 12  # (C's cumulative counters at the last fold)
        loop = reactor.loop
        n.loop_fd, self._loop_ready = loop_wait_parts(loop)
        self._hw = 0  # (the host wait C was last given, ns)
        loop.add_reader(n.epfd, self.poll)  # type: ignore[union-attr]
        self._fold_timer = loop.call_later(FOLD_S, self._tick)  # type: ignore[union-attr]

    @classmethod
    def of(cls, qp: Qpair) -> NetPoller:
        r = qp.reactor
        p = r.net_poller
        if p is None:
            p = r.net_poller = cls(r, qp.budget)
        return p

    def poll(self, spin_left: int | None = None) -> None:
        """The epoll fd is readable (or C stopped inside its busy-poll window, of which
        ``spin_left`` ns are left): serve every lent connection with something to do.

        Kept lean: under a host slower than the busy-poll window (a QEMU guest's kernel
        initiator at QD1) every command is one wake-up and one call, so what Python
        does around the call is paid per command (4.4 us of it, with the GIL held,
        against 6.3 us in C, at QD1 in poll mode event; bench/RESULTS.md). So the call's
        counters stay in C until folded (``fold_counters``), the settings are written
        only when they change, and C says in its return value whether anything needs
        Python at all (BT_NET_* bits, csrc/bt_net.h)."""
        n = self.n
        if n is None:
            return
        if self._again is not None and spin_left is None:
            self._again.cancel()  # (the epoll fd woke us first: this call goes on)
            self._again = None
        b = self.budget
        n.bud_used = b.used
        # (while connections wait for buffers, the lanes take none beyond the first)
        n.bud_limit = 0 if b.waiting else b.limit
        r = self.reactor
        cfg = (r.busy_poll_us, r.device_wait_us, r.adaptive_window)
        if cfg != self._cfg:
            self._cfg = cfg
            n.dev_wait_ns = r.device_wait_us * 1000
            n.win_adapt = r.adaptive_window
            n.spin_max_ns = r.busy_poll_us * 1000
        # Between sockets' reads, C waits for the next one itself (the GIL released)
        # for the reactor's busy-poll window, instead of the event loop spinning it
        # holding the GIL, as long as the reactor would spin anyway (poll_mode) and no
        # poller but a ring's (which C reaps) waits its turn.
        spin = 0
        c_only = self._c_pollers_only(r)
        if r.spin_on_io and c_only:
            # (the rings' and queue pairs' lane completions are reaped in C too, and it
            # returns at the first of Python's)
            spin = r.busy_poll_us * 1000
            if spin_left is not None:
                spin = min(spin, spin_left)
        # The host wait: C sleeps for the host's next command itself, unless the loop
        # has callbacks ready or pollers of its own that would wait meanwhile.
        hw = 0
        if r.host_wait_us and c_only and self._loop_ready is not None \
                and not self._loop_ready:
            hw = r.host_wait_us * 1000
        if hw != self._hw:
            self._hw = n.host_wait_ns = hw
        attn = lib.bt_net_poll(n, self._ready, MAX_READY, self._nready, BUDGET_NS, spin)
        # (the PDUs taken matter only to a reactor that spins the window in Python)
        if attn & (_ATTN if spin == 0 and r.spin_on_io else _ATTN_NO_PDUS):
            self._settle(n, attn, spin)
        elif spin and r.adaptive_window and r.poll_scheduled:
            # C waited out its window for the host with nothing for Python: the
            # reactor's Python poll loop, which a lane's NVMe I/O kicked
            # (lane_io_started) in an earlier call, must not spin its own window after
            # it (200 us more per QD1 command, holding the GIL, in a guest taking the
            # vCPU the host side needed).
            r._last_work_ns = min(r._last_work_ns, time.monotonic_ns() - r.busy_poll_us * 1000)

    def _c_pollers_only(self, r: Reactor) -> bool:
        """Whether every poller of the reactor is one whose lane completions C reaps (a
        ring's, or an NVMe queue pair this poller sweeps): cached per pollers list."""
        if r.pollers != self._pollers_seen:
            self._pollers_seen = list(r.pollers)
            self._c_only = all(p.name == "uring" or p.c_reaped for p in r.pollers)
        return self._c_only

    def _settle(self, n: Any, attn: int, spin: int) -> None:
        """After a call that left something for Python (``attn``, BT_NET_* bits)."""
        r = self.reactor
        quiet = not attn & (_PYTHON_CQE | _READY)
        self._after(n)
        if spin:
            # C spins the reactor's busy-poll window itself: the event loop must not
            # spin it again in Python, holding the GIL (on io_uring, waiting for the
            # kernel's workers to complete reads, it spun 0.35 times per I/O). If C
            # stopped inside its window (its time budget, Python's own completions),
            # it goes on at the loop's next turn, after the rest of Python had its own.
            # Lane commands still at an NVMe device, waited for sleeping (device_wait_us):
            # C goes on waiting so at the loop's next turn, past the window too, rather
            # than leave them to the reactor's idle poll.
            # The window C spun is the adaptive one (win_used_ns: spin, or less when
            # the host's commands come later than the window; bt_net.h).
            short = attn & _SHORT
            if (short or attn & _DEV) and n.nconns and self._again is None:
                tail, win = n.tail_idle_ns, n.win_used_ns
                left = win - tail if short else spin
                self._again = r.loop.call_soon(self._resume, left)  # type: ignore[union-attr]
            elif quiet and r.adaptive_window and not short:
                # (as in poll: C waited out the window, nothing for Python; only when C
                # reported nothing: Python I/O a hand-back started is polled as before)
                r._last_work_ns = min(r._last_work_ns,
                                      time.monotonic_ns() - r.busy_poll_us * 1000)
        elif attn & _PDUS and r.spin_on_io:
            # the reactor's busy-poll window runs from the last work C saw, part of
            # which C already spent spinning: the event loop must not spin it again
            r.note_io()
            r._last_work_ns -= n.tail_idle_ns

    def fold_counters(self) -> None:
        """Add what the C poller counted since the last fold to the reactor's stats (C
        keeps them cumulative; they are folded with the lent connections' counters,
        before anyone reads them: see the module doc)."""
        n = self.n
        if n is None:
            return
        now = (n.polls, n.pdus, n.cpu_ns, n.idle_ns, n.dev_waits, n.dev_wait_cpu_ns,
               n.win_shrinks, n.win_grows, n.irq_wakes, n.host_waits, n.host_catches,
               n.host_loop_wakes)
        was, self._counted = self._counted, now
        st = self.reactor.stats
        st.net_polls += now[0] - was[0]
        st.net_pdus += now[1] - was[1]
        st.gil_released_ns += now[2] - was[2]  # (CPU time: see struct bt_net)
        st.net_idle_ns += now[3] - was[3]
        st.net_device_waits += now[4] - was[4]
        st.net_device_wait_ns += now[5] - was[5]
        st.net_window_shrinks += now[6] - was[6]
        st.net_window_grows += now[7] - was[7]
        st.net_irq_wakes += now[8] - was[8]
        st.net_host_waits += now[9] - was[9]
        st.net_host_catches += now[10] - was[10]
        st.net_host_loop_wakes += now[11] - was[11]
        r = self.reactor
        st.net_window_ns = n.win_ns if r.adaptive_window else n.spin_max_ns

    def reap(self) -> None:
        """Sweep the NVMe queue pairs alone (bt_net_reap: no socket polled, no system
        call but the replies' sends): the reactor's poller turn for a queue with lane
        commands at the device, when the reactor does not spin (poll() does, the GIL
        released, when it would)."""
        n = self.n
        if n is None:
            return
        t0 = _now_ns()
        lib.bt_net_reap(n, self._ready, MAX_READY, self._nready)
        self.reactor.stats.gil_released_ns += _now_ns() - t0
        self._after(n)

    def _after(self, n: Any) -> None:
        """After a C call: Python's own completions it stopped at, the budget, I/O the
        lanes started, then the connections C reported (see the module doc)."""
        python = n.python_cqe
        if python:  # (C stopped at a completion of Python's own I/O)
            n.python_cqe = 0
            if python & 1:
                for ring in self.rings:
                    ring.reap()
            if python & 2:
                for rq in self.nvmeqs:
                    rq.reap_python()
        self.take_budget()
        if n.lane_started:
            n.lane_started = 0
            for ring in self.watched:
                ring.lane_io_started()
        k = self._nready[0]
        if not k:
            return
        ready = self._ready
        qps = [ffi.from_handle(ready[i]) for i in range(k)]
        # first what every lane did, then the events (a connection handed back to the
        # Python path must see the state the others left)
        for stage in (sync, events):
            for qp in qps:
                try:
                    stage(qp)
                except Exception:  # one connection's trouble must not strand the others
                    log.exception("%s: after the C poller", qp)
                    qp.close("internal error after the C poller")

    def take_budget(self) -> None:
        """Add what the lent lanes took from the reactor's buffer budget and gave back
        (one sum, kept by C) to the budget, and wake its waiters if some came back."""
        n = self.n
        if n is None:
            return
        d = n.bud_delta
        if not d:
            return
        n.bud_delta = 0
        b = self.budget
        b.used += d
        if b.used > b.high_water:
            b.high_water = b.used
        if d < 0 and b.waiting:
            b._wake()

    def fold_all(self) -> None:
        """Fold every lent connection's counters (Lane.fold): on the reactor's thread,
        for a reader, or the timer."""
        for qp in list(self.lent):
            lane = qp._lane
            if lane is not None:
                lane.fold()
        self.take_budget()
        self.fold_counters()

    def _tick(self) -> None:
        self._fold_timer = None
        if self.n is None:
            return
        try:
            self.fold_all()
        finally:
            loop = self.reactor.loop
            if loop is not None and not loop.is_closed():
                self._fold_timer = loop.call_later(FOLD_S, self._tick)

    def _resume(self, spin_left: int) -> None:
        """The loop's next turn after C stopped inside its busy-poll window."""
        self._again = None
        self.poll(spin_left)

    def lend(self, qp: Qpair) -> Any:
        """Attach ``qp``'s socket and lane; the bt_conn, or None when C cannot take it."""
        lane = qp._lane
        high = qp._net_high
        conn = lib.bt_net_attach(self.n, qp._net_fd, lane.c, qp._net_handle, high, high // 4)
        if conn == ffi.NULL:
            return None
        self.conns += 1
        self.lent.add(qp)
        qp._net_rings = lane.rings
        for ring in lane.rings:
            self.watched[ring] = self.watched.get(ring, 0) + 1
        return conn

    def unlend(self, qp: Qpair) -> None:
        """``qp`` is no longer lent (give_back folded it)."""
        self.lent.discard(qp)
        for ring in qp._net_rings:
            k = self.watched.get(ring, 0) - 1
            if k > 0:
                self.watched[ring] = k
            else:
                self.watched.pop(ring, None)
        qp._net_rings = ()

    def starts_rule(self) -> None:
        """Tell C whether every ring and queue pair the lent lanes use is an NVMe queue
        pair it sweeps (bt_net.quiet_starts): then lane I/O started and completed within
        a call needs no word to Python; and whether every one is reaped by C, a ring
        or a queue pair (bt_net.starts_reaped): then the word can wait for the call's
        end."""
        n = self.n
        if n is not None:
            w = self.watched
            n.quiet_starts = bool(w) and all(x in self.nvmeqs for x in w)
            n.starts_reaped = all(x in self.nvmeqs or x in self.rings for x in w)

    def add_rings(self, lane: Any) -> None:
        """The poller reaps the lane's rings too (their lane completions, in C), woken by
        their eventfds, which it watches instead of the event loop (the loop would wake
        Python for completions C answers)."""
        loop = self.reactor.loop
        for ring in lane.urings:  # (NVMe queue pairs are the reactor's pollers' to reap)
            ctx = ring.lane_ctx
            if ctx is None or ring.net_poller is self or ring.net_poller is not None:
                continue
            if lib.bt_net_add_ring(self.n, ctx, ring.efd) == 0:
                ring.net_poller = self
                self.rings.append(ring)
                if ring.efd >= 0 and loop is not None:
                    loop.remove_reader(ring.efd)

    def add_nvmeqs(self, lane: Any) -> None:
        """The poller sweeps the lane's NVMe queue pairs too (see the module doc)."""
        for rq in lane.nvmeqs:
            ctx = rq.lane_ctx
            if ctx is None or rq.net_poller is not None:
                continue
            if lib.bt_net_add_nvmeq(self.n, ctx) == 0:
                rq.net_poller = self
                rq.pause_irq()  # (C sleeps on its interrupt now, not the loop)
                if rq.poller is not None:
                    rq.poller.c_reaped = True
                    self._pollers_seen = None  # (the cached check reads c_reaped)
                self.nvmeqs.append(rq)

    def drop_nvmeq(self, rq: Any) -> None:
        """``rq`` goes away, or the poller does: its reactor's Python poller alone reaps
        it again."""
        if rq in self.nvmeqs:
            self.nvmeqs.remove(rq)
        if self.n is not None:
            lib.bt_net_drop_nvmeq(self.n, rq.lane_ctx)
        rq.net_poller = None
        if rq.poller is not None:
            rq.poller.c_reaped = False
            self._pollers_seen = None
        rq.resume_irq()  # (the loop watches its interrupt again, where it has one)
        if rq.q.outstanding:
            # (commands an interrupt was to announce to C, the queue's poller asleep
            # meanwhile: its next turn takes them over)
            rq._kick()
        self.starts_rule()

    def drop_ring(self, ring: Any) -> None:
        """``ring`` goes away, or the poller does: the event loop watches its eventfd
        again."""
        if ring in self.rings:
            self.rings.remove(ring)
        if self.n is not None:
            lib.bt_net_drop_ring(self.n, ring.lane_ctx)
        ring.net_poller = None
        loop = self.reactor.loop
        if ring.efd >= 0 and loop is not None and not loop.is_closed():
            loop.add_reader(ring.efd, ring._on_eventfd)
        self.starts_rule()  # (its lane starts are Python's to hear of at once again)

    def let_go(self) -> None:
        """A connection was given back; the poller goes with the last one (later: the
        current poll call may still be reporting)."""
        self.conns -= 1
        if self.conns == 0 and not self._closing and self.reactor.loop is not None:
            self._closing = True
            self.reactor.loop.call_soon(self._maybe_close)

    def _maybe_close(self) -> None:
        self._closing = False
        if self.conns or self.n is None:
            return
        for ring in list(self.rings):
            self.drop_ring(ring)
        for rq in list(self.nvmeqs):
            self.drop_nvmeq(rq)
        if self._again is not None:
            self._again.cancel()
            self._again = None
        if self._fold_timer is not None:
            self._fold_timer.cancel()
            self._fold_timer = None
        self.take_budget()  # (nothing of the budget stays behind in C)
        self.fold_counters()  # (nor of the counters)
        n, self.n = self.n, None
        loop = self.reactor.loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(n.epfd)
        lib.bt_net_free(n)
        if self.reactor.net_poller is self:
            self.reactor.net_poller = None


def try_lend(qp: Qpair) -> None:
    """Lend ``qp``'s socket to C if it is in its steady state (see the module doc)."""
    lane = qp._lane
    t = qp.transport
    if (lane is None or lane.c is None or t is None or qp.closed or qp._out or qp._lends
            or qp._lent_wait or qp._lent_new or qp._budget_paused or lane.c.redo
            or t.is_closing() or not lane.usable()):
        return
    if t.get_write_buffer_size():
        # the transport still sends what the Python path wrote (a host that was slow to
        # read): lend once it is out, or with the next input, whichever comes first
        loop = qp.reactor.loop
        if qp._net_retry is None and loop is not None:
            qp._net_retry = loop.call_later(RETRY_S, _retry, qp)
        return
    try:
        poller = NetPoller.of(qp)
    except OSError:
        log.exception("no C socket poller on reactor %d", qp.reactor.index)
        qp._net_ok = False
        return
    lane._enter()  # (the SQ head and the budget as the Python path left them)
    conn = poller.lend(qp)
    if conn is None:
        qp._net_ok = False  # (no fds or memory: this connection stays on the Python path)
        return
    if lane.urings:
        poller.add_rings(lane)
    if lane.nvmeqs and SWEEP_NVME:
        poller.add_nvmeqs(lane)
    poller.starts_rule()
    t.pause_reading()
    qp._net = conn
    qp._net_seen = [0, 0]
    c = lane.c
    if c.out_len or c.nchunks:  # (completions' output not taken yet: C sends it now)
        lib.bt_net_flush(conn)
    qp.reactor.stats.net_lends += 1


def _retry(qp: Qpair) -> None:
    qp._net_retry = None
    if qp._net is None and qp._net_ok and not qp._rx_depth:
        try_lend(qp)


def give_back(qp: Qpair, send: bool = True) -> tuple[int, bytes | None, bytes | None]:
    """Take the socket back from C: its unsent output to the transport (``send``) or
    dropped, the poller let go of. Returns (the events C had not reported, a capsule C
    gave back to be handled first or None, the input C did not run or None)."""
    conn = qp._net
    lane = qp._lane
    if lane is not None and lane.c is not None:
        lane.fold()  # (while qp._net is still the connection: its counts too)
    qp._net = None
    lib.bt_net_detach(conn)
    ev = conn.ev
    first = rest = None
    if conn.hand_len:
        data = ffi.buffer(conn.hand, conn.hand_len)
        k = conn.hand_first
        first = data[:k] if k else None
        rest = data[k:] if conn.hand_len > k else None
    out = []
    chunks = ffi.new("struct bt_chunk[]", CHUNKS)
    while True:
        k = lib.bt_net_take(conn, chunks, CHUNKS)
        for i in range(k):
            out.append(fastlane.chunk_view(chunks[i]))
        if k < CHUNKS:
            break
    lib.bt_net_conn_free(conn)
    poller = qp.reactor.net_poller
    poller.unlend(qp)
    poller.starts_rule()
    poller.let_go()
    t = qp.transport
    qp._write_paused_at = None  # (C's pause ends here; the transport keeps its own)
    if out and send and t is not None and not t.is_closing():
        t.writelines(out)
    return ev, first, rest


def sync(qp: Qpair) -> None:
    """C reported ``qp``'s connection (an event, a command to redo): fold what its lane
    did and act on it as after a lane call (Lane._sync)."""
    lane = qp._lane
    if qp._net is None or lane is None or lane.c is None:
        return
    lane._sync()


def events(qp: Qpair) -> None:
    """Act on the events C reported for ``qp``'s connection."""
    conn = qp._net
    if conn is None:
        return
    ev = conn.ev
    if not ev:
        return
    conn.ev = 0
    loop = qp.reactor.loop
    if ev & lib.BT_NET_PAUSED:
        qp._write_paused_at = loop.time() if loop is not None else 0.0
    if ev & lib.BT_NET_RESUMED:
        qp._write_paused_at = None
    if ev & (lib.BT_NET_HAND | lib.BT_NET_EOF):
        qp._net_back()


def write(qp: Qpair, out: list[Any]) -> None:
    """The Python path's output for a lent socket: through C's queue, behind the lane's."""
    data = out[0] if len(out) == 1 else b"".join(out)
    if lib.bt_net_write(qp._net, ffi.from_buffer("unsigned char[]", data), len(data)) != 0:
        qp.close("no memory for output")
        return
    events(qp)
