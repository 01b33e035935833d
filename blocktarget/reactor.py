"""Reactors: one pinned OS thread per core, each with its own event loop.

Everything a connection touches on the I/O path belongs to exactly one reactor, so the
I/O path needs no locks; other threads reach a reactor only through `send()`. Pollers
give SPDK-style polling of completion sources (NVMe CQs, io_uring) without burning a core
when idle: a reactor busy-polls while pollers report work and for `busy_poll_us` after the
last work, then falls back to a timed poll every `idle_poll_us` and sleeps in the event
loop in between. The timed poll runs only while some poller is awake: a poller whose
owner knows it has nothing outstanding (an NVMe queue pair with no command at the
device) is put to sleep with `set_dormant`, and whatever gives it work again kicks the
reactor (`kick`), whose next turn polls every poller, the sleeping ones too. With every
poller asleep an idle reactor sleeps in epoll until a socket, a message or a kick wakes
it (an idle NVMe queue's timed turns cost a QEMU guest's reactor ~30 % of its CPU at
QD1, where the C socket poller reaps the lane's completions itself).

Sockets follow the reactor's `poll_mode` (bench/RESULTS.md, "Reactor polling", has the
measurements behind the default):
- "event": sleep in epoll until a socket is readable (one wake-up per batch of PDUs);
  no CPU when idle.
- "adaptive": after socket activity keep the loop spinning (epoll with a zero timeout)
  for `busy_poll_us`, so the next command of a QD1 stream is picked up without a
  wake-up, then sleep as "event" does; idle CPU stays ~0.
- "busy": spin always, as an SPDK reactor does: lowest latency, a whole core when idle.

Inside the busy-poll window the C socket poller spins the GIL released; while the only
outstanding work is the C lane's I/O at an NVMe device it sleeps instead, and goes on
so past the window until the device completes, so that a device the host's own CPUs
emulate is not starved by the reactor waiting for it, nor left to the idle poll. A
queue that raises MSI-X completion interrupts (the attach's `interrupts`, where
vfio-pci offers vectors) is slept on in one wait, its eventfd in the poller's epoll set; a polled one
in `device_wait_us` slices (woken at once by a socket or an io_uring completion). The
window it spins for the host's next command adapts (`adaptive_window`): it shrinks
while the host's commands come later than `busy_poll_us` (a slow host gains nothing
from the spinning but loses the CPU), and grows back when they come within it. Past
the window, a host whose commands come within `host_wait_us` of each reply is waited
for by C itself, asleep (its epoll set and the loop's own fd in one wait, within the C
call's time budget), rather than by the event loop, whose every wake-up is a Python pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .gilsample import GilSampler

log = logging.getLogger(__name__)

try:  # uvloop is a dependency on Linux, but a reactor must still run without it
    import uvloop

    _new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    LOOP_KIND = "uvloop"
except ImportError:  # pragma: no cover - exercised only where uvloop is missing
    _new_loop = asyncio.new_event_loop
    LOOP_KIND = "asyncio"


def default_cores() -> list[int]:
    """One reactor, on the first CPU the process may use: SPDK's default (`-m 0x1`), and
    what measured best here — reactors are threads of one CPython process sharing one
    GIL, and a second reactor cost 5x more CPU per I/O than one (bench/RESULTS.md,
    "Reactor scaling with the C lane"). More reactors are a configuration choice."""
    return sorted(os.sched_getaffinity(0))[:1]


def parse_cores(spec: Any) -> list[int]:
    """Accept a list of cores, an SPDK hex mask ('0x3'), or a range string ('0-1,3');
    None is the default (`default_cores`)."""
    available = sorted(os.sched_getaffinity(0))
    if spec is None:
        return default_cores()
    cores: list[int]
    if isinstance(spec, list):
        if not spec or not all(isinstance(c, int) and not isinstance(c, bool) for c in spec):
            raise ValueError("cores must be a non-empty list of integers")
        cores = list(spec)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        cores = [i for i in range(spec.bit_length()) if spec >> i & 1]
    elif isinstance(spec, str):
        text = spec.strip().strip("[]")
        try:
            if text.lower().startswith("0x"):
                mask = int(text, 16)
                cores = [i for i in range(mask.bit_length()) if mask >> i & 1]
            else:
                cores = []
                for part in filter(None, (p.strip() for p in text.split(","))):
                    if "-" in part:
                        lo, hi = part.split("-", 1)
                        cores.extend(range(int(lo), int(hi) + 1))
                    else:
                        cores.append(int(part))
        except ValueError:  # int()'s own message names neither the setting nor the forms
            raise ValueError(
                f"cannot parse cores {spec!r}: expected a list '0,1', a range '0-3' "
                "or a hex mask '0x3'"
            ) from None
    else:
        raise ValueError(f"cores must be a list or a hex mask, got {spec!r}")
    if not cores:
        raise ValueError("no cores selected")
    if len(set(cores)) != len(cores):
        raise ValueError(f"duplicate cores in {spec!r}")
    missing = [c for c in cores if c not in available]
    if missing:
        raise ValueError(f"cores {missing} are not available to this process (have {available})")
    return cores


# A poller that raises is called again after a pause that doubles with each failure in a
# row (up to the cap), rather than dropped: an NVMe queue or io_uring ring whose poller
# stops being called never completes its I/O again, so one bad completion would hang
# every command behind it. The pause keeps a poller that always fails from spinning the
# reactor and flooding the log.
POLLER_RETRY_FIRST_S = 0.001
POLLER_RETRY_MAX_S = 1.0
POLLER_LOG_EVERY_S = 10.0


@dataclass(eq=False)
class Poller:
    """A function the reactor calls repeatedly; it returns how much work it did."""

    fn: Callable[[], int]
    name: str
    runs: int = 0
    work: int = 0
    errors: int = 0  # calls that raised, in all
    failing: int = 0  # calls that raised in a row (0: healthy)
    retry_at: float = 0.0  # monotonic time before which a failing poller is not called
    logged_at: float = float("-inf")

    def failed(self, now: float) -> None:
        """Count a failure and set when to call it again; log its traceback the first
        time in a row and then at most every POLLER_LOG_EVERY_S."""
        self.errors += 1
        self.failing += 1
        delay = min(POLLER_RETRY_FIRST_S * 2 ** min(self.failing - 1, 20), POLLER_RETRY_MAX_S)
        self.retry_at = now + delay
        if self.failing == 1 or now - self.logged_at >= POLLER_LOG_EVERY_S:
            self.logged_at = now
            log.exception("poller %s failed (%d in a row, %d in all); calling it again in "
                          "%.3f s", self.name, self.failing, self.errors, delay)
    # the reactor's C socket poller reaps what this poller waits for (an NVMe queue pair
    # registered with it): C may spin for it, the GIL released (nvme/netpoll.py)
    c_reaped: bool = False
    # its owner has nothing outstanding: no timed idle poll for it; change it only
    # through Reactor.set_dormant, which keeps the count of awake pollers
    dormant: bool = False


@dataclass
class ReactorStats:
    """Plain counters written only by the owning thread; readers may see them a bit stale."""

    messages: int = 0
    poll_runs: int = 0
    poll_work: int = 0
    poller_errors: int = 0  # poller calls that raised (see Poller)
    connections_opened: int = 0
    connections_closed: int = 0
    adopt_failed: int = 0  # sockets handed to this reactor that died before adoption
    c_lane_commands: int = 0  # NVMe commands executed by the C lane (nvme/fastlane.py)
    c_pmem_sent: int = 0  # of its pmem reads, those sent from the pool's blocks (lane.c)
    # Time in the C lane's calls (cffi releases the GIL around them): the part of the
    # reactor's CPU another reactor's Python could run beside. The rest of busy time holds
    # the GIL, which is what limits reactors on a machine with cores to spare. Wall time
    # (a vDSO clock read, ~50 ns): the thread's CPU clock is a system call here (1.1 us,
    # too dear at QD1), and on a core the reactor has to itself the two are the same.
    gil_released_ns: int = 0
    net_polls: int = 0  # calls of the C socket poller (nvme/netpoll.py)
    net_lends: int = 0  # times a connection's socket was lent to it
    net_pdus: int = 0  # PDUs it took (run by the lane without a Python call per read)
    # of gil_released_ns, the poller's time finding no socket with anything to do
    net_idle_ns: int = 0
    # slices it slept instead of spinning, only device I/O outstanding (device_wait_us)
    net_device_waits: int = 0
    # the C poller's adaptive busy-poll window (poll.adaptive_window): times a host
    # command came later than the whole window (halved) or within it (doubled back),
    # and the window now, ns
    net_window_shrinks: int = 0
    net_window_grows: int = 0
    net_window_ns: int = 0
    # the CPU time those slices took (timer set-up and wake-up: waiting, not work)
    net_device_wait_ns: int = 0
    # wake-ups by an NVMe queue's completion interrupt (MSI-X eventfd), which replace
    # those slices on a device that raises them
    net_irq_wakes: int = 0
    # the C poller's host waits (host_wait_us): begun; ended by C's own epoll set (the
    # host's next command, a device's completion); ended by the loop's own fd (its
    # sockets, messages); the rest timed out
    net_host_waits: int = 0
    net_host_catches: int = 0
    net_host_loop_wakes: int = 0


POLL_MODES = ("event", "adaptive", "busy")
DEFAULT_POLL_MODE = "adaptive"  # measured: bench/RESULTS.md, "Reactor polling"


def check_poll_mode(mode: Any) -> str:
    """The mode if it is one of POLL_MODES; a ValueError worded for the config file."""
    if mode not in POLL_MODES:
        raise ValueError(f"poll mode must be one of {', '.join(POLL_MODES)}, got {mode!r}")
    return str(mode)


@dataclass(eq=False)
class Reactor:
    index: int
    core: int
    busy_poll_us: int = 200
    idle_poll_us: int = 1000
    # Within the busy-poll window, while the only work outstanding is lane I/O at an
    # NVMe device, the C poller sleeps in slices of this many µs (a socket or a ring
    # wakes it at once) instead of spinning: a spinning reactor took the CPU of a
    # device emulated on the same host (QEMU's), which made QD1 latency 3x worse
    # (bench/RESULTS.md); on real hardware a slice adds at most its length to a
    # command's latency. 0: spin, as before.
    device_wait_us: int = 10
    # The busy-poll window after work follows the host's pace (net.c, bt_net.h): halved
    # each time the host's next command comes later than the whole window, doubled back
    # when one comes within it; so a host slower than the window (a QEMU guest's, 3x
    # the kernel's QD1 latency with the spinning) is waited for in epoll. False: always
    # the whole busy_poll_us, as before.
    adaptive_window: bool = True
    # When the C poller's lanes have nothing to do but wait for the host's next command
    # (or an interrupting NVMe queue's completion), it sleeps for it itself, the GIL
    # released, instead of returning to the event loop, whose wake-up would be a Python
    # pass per command (a QEMU guest's host at QD1), as long as the host's recent gaps
    # are under this many µs; the loop's own fd is in the same wait, so its sockets and
    # messages end it at once, and its timers wait no longer than the C call's time
    # budget let them (csrc/bt_net.h, host_wait_ns). 0: return to the loop at once.
    host_wait_us: int = 500
    pin: bool = True
    poll_mode: str = DEFAULT_POLL_MODE
    spin_on_io: bool = False  # poll_mode != "event": qpairs call note_io() per wake-up
    loop: asyncio.AbstractEventLoop | None = None
    tid: int = 0
    stats: ReactorStats = field(default_factory=ReactorStats)
    # receive memory of this reactor's NVMe/TCP connections (nvme/rx_arena.py)
    rx_arena: Any = None
    # the C socket poller of this reactor's lent connections (nvme/netpoll.py), if any
    net_poller: Any = None
    # the sampler of this thread's GIL state (gilsample.py), or None
    gil: GilSampler | None = None
    pollers: list[Poller] = field(default_factory=list)
    # Objects owned by this reactor, by kind, for framework_get_reactors and metrics.
    owned: dict[str, set[Any]] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _started: threading.Event = field(default_factory=threading.Event)
    _stopped: asyncio.Event | None = None
    _poll_handle: asyncio.Handle | None = None
    # pollers that are not dormant: the idle timed poll runs only while there are some
    # (kept on change, so the hot _poll reads one int instead of walking the pollers)
    _awake: int = 0
    _last_work_ns: int = 0
    _start_ns: int = 0
    _startup_error: BaseException | None = None

    # ---- lifecycle (called from the owning Target's thread) ----
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"reactor_{self.index}", daemon=True
        )
        self._thread.start()
        self._started.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def _run(self) -> None:
        try:
            if self.pin:
                os.sched_setaffinity(0, {self.core})
            self.tid = threading.get_native_id()
            self.gil = GilSampler.start()  # (on this thread: it samples its caller)
            self.loop = _new_loop()
            asyncio.set_event_loop(self.loop)
            self._stopped = asyncio.Event()
            self._start_ns = time.monotonic_ns()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._started.set()
            return
        self._started.set()
        self.set_poll_mode(self.poll_mode)
        try:
            self.loop.run_until_complete(self._stopped.wait())
            # Let tasks cancelled by stop() finish their cleanup.
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self.loop.close()
            if self.gil is not None:
                self.gil.stop()

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop is None or self._thread is None:
            return
        if self._stopped is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._stopped.set)
            except RuntimeError:
                pass
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_reactor(self) -> bool:
        return threading.get_native_id() == self.tid

    # ---- messages ----
    def send(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run fn(*args) on this reactor; if it returns an awaitable, await it there.

        The returned concurrent future can be awaited from another loop with
        `asyncio.wrap_future`, which is how the control plane talks to reactors.
        """
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        assert self.loop is not None, "reactor not started"

        def run() -> None:
            self.stats.messages += 1
            if not fut.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - delivered to the sender
                fut.set_exception(exc)
                return
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                task = asyncio.ensure_future(result)

                def done(t: asyncio.Future[Any]) -> None:
                    if t.cancelled():
                        # fut is already running, so fut.cancel() would be a no-op and the
                        # sender would wait forever (e.g. the reactor stopped under it)
                        fut.set_exception(
                            concurrent.futures.CancelledError("cancelled on the reactor"))
                    elif t.exception() is not None:
                        fut.set_exception(t.exception())  # type: ignore[arg-type]
                    else:
                        fut.set_result(t.result())

                task.add_done_callback(done)
            else:
                fut.set_result(result)

        self.loop.call_soon_threadsafe(run)
        return fut

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Await `send(fn)` from another event loop (or run inline on our own)."""
        if self.on_reactor():
            result = fn(*args)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            return result
        return await asyncio.wrap_future(self.send(fn, *args))

    # ---- pollers (call on the reactor thread) ----
    def register_poller(self, fn: Callable[[], int], name: str) -> Poller:
        poller = Poller(fn, name)
        self.pollers.append(poller)
        self._awake += 1
        self._last_work_ns = time.monotonic_ns()
        self._schedule_poll(0.0)
        return poller

    def unregister_poller(self, poller: Poller) -> None:
        if poller in self.pollers:
            self.pollers.remove(poller)
            if not poller.dormant:
                self._awake -= 1

    def set_dormant(self, poller: Poller, dormant: bool) -> None:
        """(Reactor thread) Whether ``poller`` needs the idle timed poll. A dormant
        poller is still called on every turn the reactor makes for other reasons; its
        owner must `kick` the reactor whenever it gets work again (the turn that kick
        makes is where the owner wakes it), or that work waits for someone else's turn."""
        if poller.dormant == dormant:
            return
        poller.dormant = dormant
        if poller in self.pollers:
            self._awake += -1 if dormant else 1

    def kick(self) -> None:
        """Tell the reactor that work is pending: poll now instead of after the idle delay."""
        self._last_work_ns = time.monotonic_ns()
        if self._poll_handle is not None and isinstance(self._poll_handle, asyncio.TimerHandle):
            self._poll_handle.cancel()
            self._poll_handle = None
        self._schedule_poll(0.0)

    @property
    def poll_scheduled(self) -> bool:
        """A poll turn is coming (now, or at the end of the idle delay)."""
        return self._poll_handle is not None

    def _schedule_poll(self, delay: float) -> None:
        if self._poll_handle is not None or self.loop is None:
            return
        if delay <= 0:
            self._poll_handle = self.loop.call_soon(self._poll)
        else:
            self._poll_handle = self.loop.call_later(delay, self._poll)

    # ---- socket polling policy (reactor thread) ----
    def set_poll_mode(self, mode: str) -> None:
        """Switch between "event", "adaptive" and "busy" (see the module docstring)."""
        self.poll_mode = check_poll_mode(mode)
        self.spin_on_io = mode != "event"
        if self.loop is not None and mode != "event":
            self.kick()

    def note_io(self) -> None:
        """A socket had data (adaptive/busy modes): spin for another `busy_poll_us`."""
        self._last_work_ns = time.monotonic_ns()
        if self._poll_handle is None:
            self._schedule_poll(0.0)

    def _poll(self) -> None:
        self._poll_handle = None
        work = 0
        for poller in tuple(self.pollers):
            if poller.failing and time.monotonic() < poller.retry_at:
                continue
            try:
                done = poller.fn()
            except Exception:  # a faulty poller must not stop the reactor (see Poller)
                self.stats.poller_errors += 1
                poller.failed(time.monotonic())
                if poller.dormant:  # (its retry needs the timed poll)
                    self.set_dormant(poller, False)
                continue
            if poller.failing:
                log.warning("poller %s works again after %d failures", poller.name,
                            poller.failing)
                poller.failing = 0
            poller.runs += 1
            if done:
                poller.work += done
                work += done
        self.stats.poll_runs += 1
        now = time.monotonic_ns()
        if work:
            self.stats.poll_work += work
            self._last_work_ns = now
        if self.poll_mode == "busy" or now - self._last_work_ns < self.busy_poll_us * 1000:
            self._schedule_poll(0.0)  # spin: the loop polls epoll with a zero timeout
        elif self._awake:
            self._schedule_poll(self.idle_poll_us / 1e6)
        # else: nothing to poll, or every poller dormant; sleep in epoll until a socket,
        # a message or a kick wakes us

    def fold_stats(self) -> None:
        """(Reactor thread) Bring the counters the C poller keeps for lent connections
        up to date (nvme/netpoll.py: folded lazily): what a reader calls, through
        ``ReactorGroup.fold_stats`` from another thread, before it reads them."""
        np = self.net_poller
        if np is not None:
            np.fold_all()

    # ---- ownership bookkeeping (reactor thread) ----
    def own(self, kind: str, obj: Any) -> None:
        self.owned.setdefault(kind, set()).add(obj)

    def disown(self, kind: str, obj: Any) -> None:
        self.owned.get(kind, set()).discard(obj)

    # ---- accounting (any thread) ----
    def cpu_ns(self) -> int:
        """CPU time of the reactor thread, read from schedstat so no message is needed."""
        if not self.tid:
            return 0
        try:
            with open(f"/proc/self/task/{self.tid}/schedstat") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            try:
                with open(f"/proc/self/task/{self.tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks = int(fields[11]) + int(fields[12])
                return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                return 0

    def cpu_split_ns(self) -> tuple[int, int]:
        """(user, system) CPU time of the reactor thread, from /proc (clock ticks)."""
        if not self.tid:
            return 0, 0
        try:
            with open(f"/proc/self/task/{self.tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0, 0
        tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        return int(fields[11]) * tick, int(fields[12]) * tick

    def gil_split_ns(self, busy: int | None = None) -> tuple[int, int, int, bool]:
        """The reactor thread's CPU time ``busy`` (default: now) as (in the C data plane's
        calls, the GIL released; holding the GIL; neither: the event loop's epoll and
        the kernel's work outside our calls) and whether the held part was sampled
        (gilsample.py). Without a sampler: everything outside the C calls counts as
        held (an upper bound) and "neither" is 0."""
        if busy is None:
            busy = self.cpu_ns()
        released = self.stats.gil_released_ns
        g = self.gil
        if g is None:
            return released, max(busy - released, 0), 0, False
        held = g.held_ns()
        return released, held, max(busy - released - held, 0), True

    def wall_ns(self) -> int:
        return time.monotonic_ns() - self._start_ns if self._start_ns else 0

    def describe(self) -> dict[str, Any]:
        busy = self.cpu_ns()
        wall = self.wall_ns()
        return {
            "lcore": self.core,
            "index": self.index,
            "tid": self.tid,
            "loop": LOOP_KIND,
            "busy": busy,
            "idle": max(wall - busy, 0),
            "busy_seconds": busy / 1e9,
            "idle_seconds": max(wall - busy, 0) / 1e9,
            "messages": self.stats.messages,
            # dormant: asleep until kicked (set_dormant), no timed poll turns for it
            "pollers": [{"name": p.name, "runs": p.runs, "work": p.work, "errors": p.errors,
                         "failing": p.failing, "dormant": p.dormant} for p in self.pollers],
            # list() copies the set in one C call; iterating it directly from this (non-
            # reactor) thread races with own()/disown() ("Set changed size during iteration")
            "connections": sorted(str(c) for c in list(self.owned.get("connection", ()))),
            "channels": sorted(str(c) for c in list(self.owned.get("channel", ()))),
            "irq_mode": False,
            "poll_mode": self.poll_mode,
        }


# glibc malloc serves blocks of 128 KiB and more with mmap (and gives freed heap back
# above a 128 KiB trim threshold), so every 128 KiB I/O buffer - the socket read uvloop
# hands us, a C2H snapshot, an R2T buffer - cost an mmap, 32 page faults with the kernel
# zeroing each page, and a munmap: 68 µs of CPU per 128 KiB read in bench/hotpath.py,
# 11 µs with these settings. The price is that up to TRIM_THRESHOLD of freed heap per
# malloc arena stays with the process instead of going back to the kernel.
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep I/O-sized buffers on the heap (see above); False where libc has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class ReactorPool:
    """The set of reactors plus the round-robin choice of where new work lives."""

    def __init__(self, cores: Iterable[int], *, pin: bool = True, busy_poll_us: int = 200,
                 idle_poll_us: int = 1000, device_wait_us: int = 10,
                 poll_modes: str | list[str] = DEFAULT_POLL_MODE,
                 adaptive_window: bool = True, host_wait_us: int = 500) -> None:
        """``poll_modes``: one mode for every reactor, or a list with one per reactor."""
        cores = list(cores)
        modes = [poll_modes] * len(cores) if isinstance(poll_modes, str) else list(poll_modes)
        if len(modes) != len(cores):
            raise ValueError(f"{len(modes)} poll modes for {len(cores)} reactors")
        self.reactors = [
            Reactor(i, core, pin=pin, busy_poll_us=busy_poll_us, idle_poll_us=idle_poll_us,
                    device_wait_us=device_wait_us, poll_mode=check_poll_mode(mode),
                    adaptive_window=adaptive_window, host_wait_us=host_wait_us)
            for i, (core, mode) in enumerate(zip(cores, modes, strict=True))
        ]
        self._next = 0
        self._placed = [0] * len(self.reactors)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.reactors)

    def __len__(self) -> int:
        return len(self.reactors)

    def __getitem__(self, i: int) -> Reactor:
        return self.reactors[i]

    def start(self) -> None:
        tune_allocator()
        started: list[Reactor] = []
        try:
            for r in self.reactors:
                r.start()
                started.append(r)
        except BaseException:
            for r in started:
                r.stop()
            raise

    def stop(self) -> None:
        for r in self.reactors:
            r.stop()

    def pick(self, policy: str = "round_robin") -> Reactor:
        """Where a new connection lives (it never moves afterwards).

        "round_robin": in turn, as SPDK does. "least_connections": the reactor with the
        fewest connections, counting those handed over but not yet adopted, so a burst
        of accepts does not all land on one reactor; ties go to the lowest index.
        Called only from the control-plane thread.
        """
        if policy == "least_connections":
            r = min(self.reactors, key=lambda x: (self.load(x), x.index))
        else:
            r = self.reactors[self._next % len(self.reactors)]
            self._next += 1
        self._placed[r.index] += 1
        return r

    def load(self, r: Reactor) -> int:
        """Connections placed on ``r`` that are not closed yet. Each counter has one
        writer (placed: this thread; closed/failed: the reactor), so no lock."""
        s = r.stats
        return self._placed[r.index] - s.connections_closed - s.adopt_failed

    async def broadcast(self, fn: Callable[[Reactor], Any]) -> list[Any]:
        """Run fn(reactor) on every reactor and wait for all; how shared state changes."""
        futs = [asyncio.wrap_future(r.send(fn, r)) for r in self.reactors if r.loop is not None]
        return list(await asyncio.gather(*futs))

    async def fold_stats(self) -> None:
        """Every reactor folds its lent connections' counters (Reactor.fold_stats):
        readers of statistics await this first, so that what they read is exact."""
        await self.broadcast(Reactor.fold_stats)
