"""uring bdev: a regular file or a block device, driven by io_uring (or a thread pool).

Decisions, and why:

* One io_uring per reactor, shared by every uring bdev with a channel on that reactor
  (as SPDK's uring module shares one ring per thread): a reactor then has one completion
  source to watch (one eventfd, one poller) however many files it serves.
* Each SQE is submitted as soon as it is filled (`SUBMIT_NOW`), not once per event loop
  pass: Python spends ~10 µs on each I/O, so a batch of completions whose callbacks all
  queue new I/O before one submit leaves the disk idle meanwhile. One io_uring_enter
  per I/O costs less than that idle time: 0.86-0.90 of fio's 4K QD32 IOPS against
  0.53-0.58 batched (bench/RESULTS.md).
* Completions are noticed two ways at once ("hybrid", `REAP_MODE`): a reactor poller,
  registered only while I/O is in flight, reaps during the reactor's busy-poll window
  (QD1 latency as fio's); an eventfd registered with the ring and watched by the
  reactor's loop wakes it when the window has passed, and lets an idle reactor sleep
  (zero wake-ups), where a permanent poller would wake it every `idle_poll_us`. The
  price: under load the reactor busy-polls, a whole core, as SPDK does. Poller
  alone reaps late once the reactor backs off (1 ms timer: 0.25 of fio at QD32);
  eventfd alone pays a sleep/wake-up per completion (0.61-0.87 of fio at QD1, against
  0.93-1.11 for hybrid).
* O_DIRECT when the file system allows it and the block size suits its alignment,
  otherwise buffered with a warning. O_DIRECT needs aligned memory: data goes through
  page-aligned buffers from a per-channel pool unless the caller's buffer is aligned
  already; buffered I/O uses the caller's buffer as it is.
* Reads the caller did not give a buffer for are returned as `bytes` copied out of the
  pool buffer: the one copy the NVMe/TCP transport would otherwise make of any
  non-bytes buffer (it snapshots read data before queueing it on the socket).
* The volatile write cache is always advertised: even with O_DIRECT, file-system
  metadata and the disk's own cache need an fdatasync. FUA writes carry RWF_DSYNC.
* Unmap is fallocate(PUNCH_HOLE|KEEP_SIZE) and write zeroes fallocate(ZERO_RANGE); a
  mode the file system refuses (tmpfs has no ZERO_RANGE) is dropped for that bdev and
  the next one tried, the last resort being writes of zeroes. Deallocated blocks must
  read back as zeroes (Identify DLFEAT says so), hence no "advisory" skip.
* Where io_uring cannot be used (no extension, kernel without it, seccomp or
  `kernel.io_uring_disabled`), create fails naming the reason, and `"engine": "threads"`
  is the explicit fallback: a small thread pool doing pread/pwrite/fdatasync/fallocate
  that completes on the reactor with `call_soon_threadsafe`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..bdev import (
    LANE_URING,
    Bdev,
    BdevIO,
    BdevModule,
    IOChannel,
    IOType,
    LaneTarget,
    Status,
    check_block_size,
    check_uuid,
    register_module,
)
from ..errors import InvalidParams, RpcError, Unsupported
from ..params import Param, Schema, non_empty
from ..paths import check_path

if TYPE_CHECKING:
    from ..reactor import Poller, Reactor

try:  # built at install time from liburing-dev; optional (see _uring_build.py)
    from .._uring import ffi, lib  # type: ignore[import-not-found]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    ffi = lib = None
    _IMPORT_ERROR = str(exc)
try:  # the NVMe/TCP C lane's io_uring backend (csrc/be_uring.c); optional too
    from .._fastpath import ffi as lane_ffi  # type: ignore[import-not-found]
    from .._fastpath import lib as lane_lib  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the install
    lane_ffi = lane_lib = None

log = logging.getLogger("blocktarget.bdev.uring")

ENGINES = ("uring", "threads")
RING_ENTRIES = 512  # per reactor; more I/O than this waits in a software backlog
REAP_BATCH = 64
# How completions are noticed (see the module doc): "hybrid" (eventfd, plus a poller
# while I/O is in flight), "eventfd" or "poller". Read when a reactor's ring is created;
# bench/uring_vs_fio.py switches it (and SUBMIT_NOW) to compare them.
REAP_MODE = "hybrid"
# submit each SQE as it is filled instead of once per loop pass (see the module doc)
SUBMIT_NOW = True
THREADS_PER_BDEV = 4
POOL_KEEP = 64  # idle aligned buffers kept per size class and channel
PAGE = mmap.PAGESIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_WRITE_ZEROS = -1  # pseudo mode: write zero buffers (the last resort)
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

# op kinds
_RD, _WR, _FSYNC, _FALLOC = 0, 1, 2, 3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, off: int, length: int) -> int:
    """fallocate(2) with a mode (os has only posix_fallocate); 0 or -errno."""
    if _libc.fallocate(fd, mode, off, length) == 0:
        return 0
    return -ctypes.get_errno()


_zero_page_buf: memoryview | None = None


def _zero_buf() -> memoryview:
    """1 MiB of page-aligned zeroes, shared read-only by every writer of zeroes."""
    global _zero_page_buf
    if _zero_page_buf is None:
        _zero_page_buf = memoryview(mmap.mmap(-1, 1 << 20))
    return _zero_page_buf


# ---------------------------------------------------------------------------
# io_uring availability


_probe_result: str | None | bool = False  # False: not probed yet; None: usable


def uring_unavailable_reason() -> str | None:
    """Why this process cannot use io_uring, or None when it can (probed once)."""
    global _probe_result
    if _probe_result is not False:
        return _probe_result  # type: ignore[return-value]
    _probe_result = _probe()
    return _probe_result


def _probe() -> str | None:
    if lib is None:
        return (f"the io_uring extension blocktarget._uring is not built ({_IMPORT_ERROR}); "
                "install liburing-dev and reinstall blocktarget")
    err = ffi.new("int *")
    ring = lib.bt_ring_new(4, 0, err)
    if ring == ffi.NULL:
        e = -err[0]
        why = {
            errno.ENOSYS: "the kernel has no io_uring (io_uring_setup: ENOSYS)",
            errno.EPERM: "io_uring is forbidden to this process (io_uring_setup: EPERM; "
                         "sysctl kernel.io_uring_disabled or a seccomp filter)",
            errno.ENOMEM: "the kernel refused ring memory (io_uring_setup: ENOMEM; "
                          "check RLIMIT_MEMLOCK)",
        }.get(e)
        return why or f"io_uring_setup failed: {os.strerror(e)} ({errno.errorcode.get(e, e)})"
    try:
        for op, name in ((lib.IORING_OP_READ, "READ"), (lib.IORING_OP_WRITE, "WRITE"),
                         (lib.IORING_OP_FSYNC, "FSYNC")):
            if lib.bt_ring_op_supported(ring, op) == 0:
                return f"the kernel's io_uring lacks IORING_OP_{name} (needs Linux 5.6+)"
    finally:
        lib.bt_ring_free(ring)
    return None


# ---------------------------------------------------------------------------
# aligned buffers


class _Buf:
    """A page-aligned buffer (anonymous mmap) and its address for the kernel."""

    __slots__ = ("size", "map", "mv", "ptr")

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size)
        self.mv = memoryview(self.map)
        self.ptr = ffi.from_buffer(self.mv) if ffi is not None else None


class _BufPool:
    """Aligned buffers in power-of-two size classes, reused so the I/O path makes no
    mmap call once warm. Touched only by the owning reactor's thread."""

    def __init__(self) -> None:
        self.free: dict[int, list[_Buf]] = {}

    def get(self, n: int) -> _Buf:
        size = PAGE if n <= PAGE else 1 << (n - 1).bit_length()
        lst = self.free.get(size)
        if lst:
            return lst.pop()
        return _Buf(size)

    def put(self, b: _Buf) -> None:
        lst = self.free.setdefault(b.size, [])
        if len(lst) < POOL_KEEP:
            lst.append(b)


# ---------------------------------------------------------------------------
# one operation in flight


class _Op:
    """What the kernel (or a worker thread) is doing for one BdevIO."""

    __slots__ = ("ch", "io", "kind", "view", "ptr", "pbuf", "off", "length", "done",
                 "rw_flags", "mode")

    def __init__(self, ch: FileChannel, io: BdevIO, kind: int, off: int, length: int) -> None:
        self.ch = ch
        self.io = io
        self.kind = kind
        self.view: memoryview | None = None  # the memory the I/O reads into / writes from
        self.ptr: Any = None  # its cffi address (uring engine)
        self.pbuf: _Buf | None = None  # pool buffer to give back at completion
        self.off = off
        self.length = length
        self.done = 0
        self.rw_flags = 0
        self.mode = 0  # fallocate mode


def _blocking(op: _Op, fd: int, modes: tuple[int, ...] = ()) -> int:
    """Run op with plain system calls (worker thread); bytes done or -errno."""
    try:
        kind = op.kind
        if kind == _RD or kind == _WR:
            view = op.view
            assert view is not None
            done = op.done
            while done < op.length:
                if kind == _RD:
                    n = os.preadv(fd, [view[done:op.length]], op.off + done)
                else:
                    n = os.pwritev(fd, [view[done:op.length]], op.off + done, op.rw_flags)
                if n <= 0:
                    return -errno.EIO  # EOF inside the bdev: the file shrank under us
                done += n
            return done - op.done
        if kind == _FSYNC:
            os.fdatasync(fd)
            return 0
        # fallocate: the given mode, then each later one the file system accepts
        for mode in modes or (op.mode,):
            if mode == _WRITE_ZEROS:
                return _write_zeros(fd, op.off, op.length)
            rc = _fallocate(fd, mode, op.off, op.length)
            if rc not in (-errno.EOPNOTSUPP, -errno.EINVAL, -errno.ENOSYS):
                return rc
        return -errno.EOPNOTSUPP
    except OSError as exc:
        return -(exc.errno or errno.EIO)


def _write_zeros(fd: int, off: int, length: int) -> int:
    zeros = _zero_buf()
    end = off + length
    while off < end:
        n = os.pwrite(fd, zeros[: min(len(zeros), end - off)], off)
        if n <= 0:
            return -errno.EIO
        off += n
    return 0


# ---------------------------------------------------------------------------
# the per-reactor ring


class _Ring:
    """One io_uring for one reactor (or a private synchronous one without a reactor)."""

    def __init__(self, reactor: Reactor | None) -> None:
        err = ffi.new("int *")
        ring = lib.bt_ring_new(RING_ENTRIES, 0, err)
        if ring == ffi.NULL:
            raise OSError(-err[0], f"io_uring_setup: {os.strerror(-err[0])}")
        self.ring = ring
        self.reactor = reactor
        self.loop = reactor.loop if reactor is not None else None
        self.ops: dict[int, _Op] = {}
        self.backlog: deque[_Op] = deque()
        self.users = 0
        self.pending = 0  # SQEs prepared, not yet submitted
        self._tag = 0
        self._flush_scheduled = False
        self._retry_scheduled = False
        self._ud = ffi.new("uint64_t[]", REAP_BATCH)
        self._res = ffi.new("int32_t[]", REAP_BATCH)
        self.fallocate_ok = lib.bt_ring_op_supported(ring, lib.IORING_OP_FALLOCATE) == 1
        self.mode = REAP_MODE if self.loop is not None else "sync"
        # The C lane submits to this ring too (csrc/be_uring.c) and its completions are
        # reaped here with Python's, finished in C; None: no lane here (a synchronous
        # ring, or no lane backend built).
        self.lane_ctx: Any = None
        # lanes of connections that went away with I/O here: kept (their handles must
        # stay valid) until their last completion is reaped (fastlane.Lane.drain)
        self.zombies: set[Any] = set()
        # the reactor's C socket poller reaping this ring's lane completions too
        # (nvme/netpoll.py), if it does
        self.net_poller: Any = None
        if self.mode != "sync" and lane_lib is not None and lane_lib.bt_uring_available():
            ctx = lane_lib.bt_uring_attach(lane_ffi.cast("void *",
                                                          int(ffi.cast("uintptr_t", ring))))
            self.lane_ctx = ctx if ctx != lane_ffi.NULL else None
            self._ready = lane_ffi.new("void *[]", REAP_BATCH)
            self._nready = lane_ffi.new("unsigned *")
            self._lud = lane_ffi.new("uint64_t[]", REAP_BATCH)
            self._lres = lane_ffi.new("int32_t[]", REAP_BATCH)
        self.efd = -1
        self.poller: Poller | None = None
        if self.mode in ("eventfd", "hybrid"):
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            rc = lib.bt_ring_register_eventfd(ring, self.efd)
            if rc < 0:
                os.close(self.efd)
                lib.bt_ring_free(ring)
                raise OSError(-rc, f"io_uring_register_eventfd: {os.strerror(-rc)}")
            assert self.loop is not None
            self.loop.add_reader(self.efd, self._on_eventfd)
        elif self.mode == "poller":
            assert reactor is not None
            self.poller = reactor.register_poller(self.poll, "uring")

    # ---- per-reactor sharing (reactor thread) ----
    _rings: dict[Any, _Ring] = {}

    @classmethod
    def acquire(cls, reactor: Reactor | None) -> _Ring:
        if reactor is None or reactor.loop is None:
            ring = cls(None)  # no event loop to complete on: private and synchronous
        else:
            ring = cls._rings.get(reactor)
            if ring is None:
                ring = cls._rings[reactor] = cls(reactor)
        ring.users += 1
        return ring

    def lane_busy(self) -> bool:
        """Whether the C lane has I/O in flight (or SQEs queued) on this ring."""
        ctx = self.lane_ctx
        return ctx is not None and bool(ctx.inflight or ctx.ready != lane_ffi.NULL)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and not self.ops and not self.backlog and not self.lane_busy():
            self._close()

    def _close(self) -> None:
        if self.net_poller is not None:  # (first: it watches the eventfd closed below)
            self.net_poller.drop_ring(self)
        if self.efd >= 0 and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.efd)  # (drop_ring gave it back to the loop)
        if self.reactor is not None and _Ring._rings.get(self.reactor) is self:
            del _Ring._rings[self.reactor]
        if self.efd >= 0:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(self.efd)
            os.close(self.efd)
            self.efd = -1
        if self.poller is not None and self.reactor is not None:
            self.reactor.unregister_poller(self.poller)
            self.poller = None
        if self.lane_ctx is not None:
            lane_lib.bt_uring_detach(self.lane_ctx)
            self.lane_ctx = None
        if self.ring is not None:
            lib.bt_ring_free(self.ring)
            self.ring = None

    # ---- submission ----
    def issue(self, op: _Op) -> None:
        if len(self.ops) >= RING_ENTRIES:
            self.backlog.append(op)
            return
        self._tag += 1
        tag = self._tag
        ring = self.ring
        fd = op.ch.bdev.fd
        kind = op.kind
        if kind == _RD or kind == _WR:
            d = op.done
            args = (ring, kind, fd, op.ptr + d, op.length - d, op.off + d, op.rw_flags, tag)
            prep: Callable[..., int] = lib.bt_prep_rw
        elif kind == _FSYNC:
            args = (ring, fd, lib.IORING_FSYNC_DATASYNC, tag)
            prep = lib.bt_prep_fsync
        else:
            args = (ring, fd, op.mode, op.off, op.length, tag)
            prep = lib.bt_prep_fallocate
        if prep(*args) == -errno.EBUSY:  # SQ full: cannot happen below RING_ENTRIES
            self.submit()
            if prep(*args) < 0:
                self.backlog.append(op)
                return
        self.ops[tag] = op
        self.pending += 1
        mode = self.mode
        if mode == "sync":
            while tag in self.ops:
                lib.bt_submit_and_wait(ring, 1)
                self.pending = 0
                self.reap()
            return
        if SUBMIT_NOW:
            self.submit()
        elif mode == "eventfd" and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)  # type: ignore[union-attr]
        if mode == "eventfd":
            return
        reactor = self.reactor
        assert reactor is not None
        if self.poller is None:  # hybrid: poll while I/O is in flight
            self.poller = reactor.register_poller(self.poll, "uring")
        else:
            reactor.kick()

    def lane_io_started(self) -> None:
        """The C lane submitted I/O (it submits itself, once per receive buffer): watch
        for its completions as for Python's (hybrid: poll while I/O is in flight)."""
        self.pending = 0  # (its io_uring_submit also took any SQE Python had queued)
        if self.net_poller is not None:
            return  # (the C socket poller reaps them, woken by the eventfd it watches)
        if self.mode == "hybrid" and self.poller is None and self.reactor is not None:
            self.poller = self.reactor.register_poller(self.poll, "uring")
        elif self.reactor is not None:
            self.reactor.kick()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.pending and self.ring is not None:
            self.submit()

    def submit(self) -> None:
        rc = lib.bt_submit(self.ring)
        if rc >= 0:
            self.pending = max(self.pending - rc, 0)
            if not self.pending:
                return
        elif rc not in (-errno.EAGAIN, -errno.EBUSY, -errno.EINTR):
            log.error("io_uring_submit failed: %s", os.strerror(-rc))
        # EAGAIN/EBUSY (the kernel is short of memory, or the CQ overflowed) or a partial
        # submit: the rest stay in the SQ ring; try again shortly, after completions
        if self.loop is not None and not self._retry_scheduled:
            self._retry_scheduled = True
            self.loop.call_later(0.0005, self._retry)

    def _retry(self) -> None:
        self._retry_scheduled = False
        self._flush()

    # ---- completion ----
    def _on_eventfd(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        self.reap()

    def poll(self) -> int:
        """Reactor poller: submit what is queued, reap what is done."""
        if self.pending:
            self.submit()
        if self.net_poller is not None and not self.ops and not self.backlog:
            # only the lanes' I/O here, which the C socket poller reaps (and it hands
            # over what is Python's): no need to poll, nor to spin the loop for it
            if self.mode == "hybrid" and self.poller is not None and self.reactor is not None:
                self.reactor.unregister_poller(self.poller)
                self.poller = None
            return 0
        return self.reap()

    def reap(self) -> int:
        total = 0
        ring = self.ring
        if ring is None:
            return 0
        ops = self.ops
        ctx = self.lane_ctx
        while True:
            if ctx is not None:
                # the lane's completions are finished in C; Python gets its own, and
                # the lanes that now have something to send (or to give back)
                ud, res, nready = self._lud, self._lres, self._nready
                t0 = time.perf_counter_ns()
                n = lane_lib.bt_uring_reap(ctx, ud, res, REAP_BATCH, self._ready, REAP_BATCH,
                                           nready)
                if self.reactor is not None:  # (cffi released the GIL for the call)
                    self.reactor.stats.gil_released_ns += time.perf_counter_ns() - t0
                lanes = [lane_ffi.from_handle(self._ready[i]) for i in range(nready[0])]
                more_lanes = ctx.ready != lane_ffi.NULL
            else:
                ud, res = self._ud, self._res
                n = lib.bt_reap(ring, ud, res, REAP_BATCH)
                lanes, more_lanes = [], False
            for i in range(n):
                op = ops.pop(ud[i])
                try:
                    op.ch.finish(op, res[i])
                except Exception:  # a consumer's bug must not strand the rest of the batch
                    op.ch.bdev.log_exception(op.io)
            for lane in lanes:
                try:
                    lane.drain()
                except Exception:  # one connection's trouble must not strand the others
                    log.exception("completing the C lane's I/O failed")
            total += n + len(lanes)
            if n < REAP_BATCH and not more_lanes:
                break
        backlog = self.backlog
        while backlog and len(ops) < RING_ENTRIES:
            self.issue(backlog.popleft())
        if self.pending and self.mode != "sync":
            self.submit()  # what the callbacks queued goes now, not a loop pass later
        if not ops and not backlog and not self.lane_busy():
            if self.mode == "hybrid" and self.poller is not None:
                self.reactor.unregister_poller(self.poller)  # type: ignore[union-attr]
                self.poller = None  # idle: the reactor may sleep until the next I/O
            if self.users == 0:
                self._close()
        return total


# ---------------------------------------------------------------------------
# channels


class FileChannel(IOChannel):
    """Common to both engines: turning a BdevIO into an _Op and finishing it."""

    bdev: UringBdev

    def __init__(self, bdev: UringBdev, reactor: Reactor | None) -> None:
        super().__init__(bdev, reactor)
        self.pool = _BufPool()
        self.loop = reactor.loop if reactor is not None else None

    def _issue(self, op: _Op) -> None:
        raise NotImplementedError

    def _in_thread(self, op: _Op, modes: tuple[int, ...] = ()) -> None:
        """Run op's system call on the bdev's worker threads; finish on this reactor."""
        fd = self.bdev.fd
        if self.loop is None:
            self.finish(op, _blocking(op, fd, modes))
            return
        loop = self.loop

        def work() -> None:
            res = _blocking(op, fd, modes)
            try:
                loop.call_soon_threadsafe(self.finish, op, res)
            except RuntimeError:  # the reactor stopped meanwhile: nobody to tell
                pass

        self.bdev.executor().submit(work)

    # ---- BdevIO -> op ----
    def _submit(self, io: BdevIO) -> None:
        bdev = self.bdev
        bs = bdev.block_size
        t = io.type
        off = io.offset_blocks * bs
        n = io.num_blocks * bs
        if t == IOType.FLUSH:
            self._issue(_Op(self, io, _FSYNC, 0, 0))
            return
        if n == 0:
            self.complete(io, Status.SUCCESS)
            return
        if t == IOType.READ or t == IOType.COMPARE:
            op = _Op(self, io, _RD, off, n)
            if t == IOType.READ and io.buf is not None:
                mv = memoryview(io.buf).cast("B")
                if mv.nbytes < n:
                    raise ValueError(f"read buffer of {mv.nbytes} bytes for {n} bytes")
                if not self._use(op, mv[:n], writable=True):
                    self._use_pool(op, n)
            else:
                self._use_pool(op, n)
            self._issue(op)
        elif t == IOType.WRITE:
            op = _Op(self, io, _WR, off, n)
            mv = memoryview(io.buf).cast("B")
            if mv.nbytes != n:
                raise ValueError(f"write buffer of {mv.nbytes} bytes for {n} bytes")
            if not self._use(op, mv, writable=False):
                self._use_pool(op, n)
                op.view[:] = mv  # type: ignore[index]
            if io.fua:
                op.rw_flags = os.RWF_DSYNC
            self._issue(op)
        elif t == IOType.UNMAP or t == IOType.WRITE_ZEROES:
            op = _Op(self, io, _FALLOC, off, n)
            modes = bdev.unmap_modes if t == IOType.UNMAP else bdev.zero_modes
            op.mode = modes[0]
            if op.mode == _WRITE_ZEROS or not self._can_fallocate():
                self._in_thread(op, modes)
            else:
                self._issue(op)
        else:
            self.complete(io, Status.INVALID_OPCODE)

    def _can_fallocate(self) -> bool:
        return True

    def _use(self, op: _Op, mv: memoryview, *, writable: bool) -> bool:
        """Do the I/O straight from/into the caller's memory when O_DIRECT allows it."""
        if self.bdev.direct:
            if ffi is None:
                return False
            try:
                ptr = ffi.from_buffer(mv, require_writable=writable)
            except TypeError:
                return False
            if int(ffi.cast("uintptr_t", ptr)) % self.bdev.mem_align:
                return False
            op.ptr = ptr
        elif ffi is not None and self._wants_ptr():
            op.ptr = ffi.from_buffer(mv, require_writable=writable)
        op.view = mv
        return True

    def _wants_ptr(self) -> bool:
        return False

    def close(self) -> None:
        # The idle pool buffers are unmapped now rather than whenever the collector
        # finds the channel (up to POOL_KEEP per size class); one still in flight is
        # held by its _Op and goes when the kernel is done with it.
        self.pool.free.clear()

    def _use_pool(self, op: _Op, n: int) -> None:
        b = self.pool.get(n)
        op.pbuf = b
        op.view = b.mv[:n]
        op.ptr = b.ptr

    # ---- op -> completion ----
    def finish(self, op: _Op, res: int) -> None:
        """The kernel's (or a worker's) answer for op: bytes done or -errno."""
        io = op.io
        kind = op.kind
        if res < 0:
            if kind == _FALLOC and res in (-errno.EOPNOTSUPP, -errno.EINVAL, -errno.ENOSYS):
                self._next_zero_mode(op, res)
                return
            self._fail(op, res)
            return
        if kind == _RD or kind == _WR:
            op.done += res
            if op.done < op.length:
                if res == 0:  # EOF inside the bdev: the file shrank under us
                    self._fail(op, -errno.EIO)
                else:
                    self._issue(op)  # a short transfer: the rest, from where it stopped
                return
            if io.type == IOType.READ:
                if op.pbuf is not None:
                    if io.buf is None:
                        io.buf = bytes(op.view)  # type: ignore[arg-type]
                    else:
                        memoryview(io.buf).cast("B")[: op.length] = op.view  # type: ignore[index]
            elif io.type == IOType.COMPARE:
                same = bytes(op.view) == bytes(memoryview(io.buf).cast("B")[: op.length])  # type: ignore[arg-type]
                self._release(op)
                self.complete(io, Status.SUCCESS if same else Status.COMPARE_FAILURE)
                return
        self._release(op)
        self.complete(io, Status.SUCCESS)

    def _next_zero_mode(self, op: _Op, res: int) -> None:
        bdev = self.bdev
        unmap = op.io.type == IOType.UNMAP
        modes = bdev.unmap_modes if unmap else bdev.zero_modes
        if res == -errno.EOPNOTSUPP and op.mode in modes and len(modes) > 1:
            # the file system has no such mode at all: stop asking, for this bdev
            modes = tuple(m for m in modes if m != op.mode)
            if unmap:
                bdev.unmap_modes = modes
            else:
                bdev.zero_modes = modes
            log.info("bdev %s: %s not supported by %s, now using %s", bdev.name,
                     _mode_name(op.mode), bdev.filename, _mode_name(modes[0]))
        later = modes[modes.index(op.mode) + 1:] if op.mode in modes else modes
        if not later:
            self._fail(op, res)
            return
        op.mode = later[0]
        if op.mode == _WRITE_ZEROS or not self._can_fallocate():
            self._in_thread(op, later)
        else:
            self._issue(op)

    def _release(self, op: _Op) -> None:
        if op.pbuf is not None:
            self.pool.put(op.pbuf)
            op.pbuf = None
        op.view = op.ptr = None

    def _fail(self, op: _Op, res: int) -> None:
        io = op.io
        e = -res
        if e == errno.ENOSPC or e == errno.EDQUOT:
            status = Status.CAPACITY_EXCEEDED
        elif e == errno.EIO and op.kind == _RD:
            status = Status.UNRECOVERED_READ_ERROR
        elif e == errno.EIO:
            status = Status.WRITE_FAULT
        else:
            status = Status.INTERNAL_ERROR
        self.bdev.note_error(io, e)
        self._release(op)
        self.complete(io, status)


class UringChannel(FileChannel):
    """I/O through this reactor's io_uring."""

    def __init__(self, bdev: UringBdev, reactor: Reactor | None) -> None:
        super().__init__(bdev, reactor)
        self.ring = _Ring.acquire(reactor)

    def _issue(self, op: _Op) -> None:
        self.ring.issue(op)

    def _wants_ptr(self) -> bool:
        return True

    def _can_fallocate(self) -> bool:
        return self.ring.fallocate_ok  # else fallocate runs on a worker thread

    def lane_target(self) -> LaneTarget | None:
        # Reads, writes (FUA: RWF_DSYNC, then fdatasync) and flushes (fdatasync) go from
        # the C lane to this reactor's ring as _Op would send them; anything that does
        # not complete in full comes back to this channel through the Python path.
        ring = self.ring
        if ring is None or ring.lane_ctx is None or self.bdev.fd < 0:
            return None
        return LaneTarget(LANE_URING, None, 0, (self,), fd=self.bdev.fd, ring=ring)

    def close(self) -> None:
        super().close()
        ring, self.ring = self.ring, None  # type: ignore[assignment]
        if ring is not None:
            ring.release()


class ThreadsChannel(FileChannel):
    """I/O on the bdev's worker threads, completions posted back to this reactor."""

    def _issue(self, op: _Op) -> None:
        self._in_thread(op)


def _mode_name(mode: int) -> str:
    return {PUNCH: "fallocate(PUNCH_HOLE)", ZERO: "fallocate(ZERO_RANGE)",
            _WRITE_ZEROS: "writing zeroes"}.get(mode, f"fallocate mode {mode:#x}")


# ---------------------------------------------------------------------------
# the bdev


class UringBdev(Bdev):
    """A file or block device; the fd is shared by every reactor's channel."""

    def __init__(self, *, fd: int, filename: str, engine: str, direct: bool, mem_align: int,
                 block_device: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.fd = fd
        self.filename = filename
        self.engine = engine
        self.direct = direct
        self.mem_align = mem_align
        self.block_device = block_device
        self.unmap_modes: tuple[int, ...] = (PUNCH, ZERO, _WRITE_ZEROS)
        self.zero_modes: tuple[int, ...] = (ZERO, PUNCH, _WRITE_ZEROS)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._errors_logged: set[int] = set()

    def executor(self) -> ThreadPoolExecutor:
        """The worker threads (created on first use: the uring engine rarely needs them;
        several reactors may ask at once, hence the lock)."""
        ex = self._executor
        if ex is None:
            with self._executor_lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        THREADS_PER_BDEV, thread_name_prefix=f"bdev-{self.name}")
                ex = self._executor
        return ex

    def device_blocks(self) -> int:
        """Whole blocks the file or device holds now (it may have grown or shrunk since
        create: bdev_uring_rescan reads this). OSError when the fd cannot tell."""
        if self.block_device:
            size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0]
        else:
            size = os.fstat(self.fd).st_size
        return size // self.block_size

    def create_channel(self, reactor: Reactor | None) -> IOChannel:
        if self.engine == "uring":
            return UringChannel(self, reactor)
        return ThreadsChannel(self, reactor)

    def note_error(self, io: BdevIO, e: int) -> None:
        """Log each kind of failure once: a dying disk must not flood the log."""
        if e not in self._errors_logged:
            self._errors_logged.add(e)
            log.error("bdev %s (%s): %s failed: %s (further %s errors not logged)", self.name,
                      self.filename, io.type.name.lower(), os.strerror(e),
                      errno.errorcode.get(e, e))

    def destruct(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # no worker may touch the fd once closed
            self._executor = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def driver_specific(self) -> dict[str, Any]:
        return {"uring": {
            "filename": self.filename,
            "engine": self.engine,
            "direct_io": self.direct,
            "block_device": self.block_device,
            "readonly": IOType.WRITE not in self.io_types,
        }}


# ---------------------------------------------------------------------------
# create


def _check_block_size(value: int) -> str | None:
    return None if value == 0 else check_block_size(value)  # 0: detect, as in SPDK


SCHEMA = Schema(
    (
        Param("name", str, required=True, check=non_empty),
        Param("filename", str, required=True, check=non_empty,
              help="regular file or block device; must exist"),
        Param("block_size", int, check=_check_block_size,
              help="bytes; default: the device's logical block size, 512 for files"),
        Param("uuid", str, check=check_uuid),
        Param("engine", str, default="uring", choices=ENGINES,
              help="'threads' where io_uring is unavailable"),
        Param("readonly", bool, default=False, help="open read-only; writes are refused"),
    ),
    # SPDK's bdev_aio_create option to enable unmap/write zeroes: always on here
    extra_ok=frozenset({"fallocate"}),
)


def _os_error(what: str, path: str, exc: OSError) -> RpcError:
    e = exc.errno or errno.EIO
    return RpcError(f"cannot {what} '{path}': {os.strerror(e)}", -e)


def _probe_direct(fd: int, bs: int) -> int | None:
    """The memory alignment O_DIRECT needs for blocks of `bs` bytes on this fd (512 or a
    page), or None when O_DIRECT cannot do `bs`-sized I/O here."""
    m = mmap.mmap(-1, 2 * PAGE + bs)
    mv = memoryview(m)
    try:
        try:
            os.preadv(fd, [mv[:bs]], 0)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise
        try:
            os.preadv(fd, [mv[512 : 512 + bs]], 0)
            return 512
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return PAGE
            raise
    finally:
        mv.release()
        m.close()


def _open(path: str, flags: int, readonly: bool) -> int:
    return os.open(path, flags | (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)


def create(params: dict[str, Any], target: Any = None) -> Bdev:
    """``target``: given when an RPC or the config asks, so the file must lie inside the
    target's allowed directories (in-process callers pass none)."""
    name, path, engine = params["name"], params["filename"], params["engine"]
    if target is not None:
        check_path(target, path, "bdev file")
    if engine == "uring":
        why = uring_unavailable_reason()
        if why is not None:
            raise Unsupported(f"cannot create uring bdev '{name}': {why}; "
                              "use \"engine\": \"threads\" to run without io_uring")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error("open", path, exc) from None
    block_device = stat.S_ISBLK(st.st_mode)
    if not block_device and not stat.S_ISREG(st.st_mode):
        raise InvalidParams(f"parameter 'filename' {path!r} is not a regular file or a "
                            "block device")
    direct = True
    try:
        try:
            fd = _open(path, os.O_DIRECT, params["readonly"])
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: the file system has no O_DIRECT
                raise
            direct = False
            fd = _open(path, 0, params["readonly"])
    except OSError as exc:
        raise _os_error("open", path, exc) from None
    holder = [fd]
    try:
        return _finish_create(params, holder, direct, block_device)
    except BaseException:
        os.close(holder[0])
        raise


def _finish_create(params: dict[str, Any], holder: list[int], direct: bool,
                   block_device: bool) -> Bdev:
    """Size, block size and I/O mode of the open fd in holder[0] (which it may replace by
    a buffered one); the caller closes holder[0] if this raises."""
    name, path, readonly = params["name"], params["filename"], params["readonly"]
    fd = holder[0]
    if block_device:
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
        lbs = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))[0]
    else:
        size, lbs = os.fstat(fd).st_size, 512
    bs = params.get("block_size") or lbs
    num_blocks = size // bs
    if num_blocks == 0:
        raise InvalidParams(f"parameter 'filename' {path!r} is smaller than one block "
                            f"({size} bytes < {bs}); create it with the size wanted "
                            "(e.g. truncate -s 1G)")
    mem_align = PAGE
    why_buffered = "the file system does not support O_DIRECT"
    if direct:
        align = None
        if bs < lbs:
            why_buffered = f"block_size {bs} is below the device's logical block size {lbs}"
        else:
            try:
                align = _probe_direct(fd, bs)
                if align is None and not params.get("block_size") and size >= PAGE:
                    # no size asked for, and the file system's O_DIRECT wants more than
                    # 512 (a 4Kn disk): its block size beats falling back to buffered
                    align = _probe_direct(fd, PAGE)
                    if align is not None:
                        bs = PAGE
                        num_blocks = size // bs
            except OSError as exc:
                raise _os_error("read", path, exc) from None
            why_buffered = f"O_DIRECT refuses {bs}-byte blocks here"
        if align is None:
            direct = False
            try:
                fd2 = _open(path, 0, params["readonly"])
            except OSError as exc:
                raise _os_error("open", path, exc) from None
            os.close(fd)
            fd = holder[0] = fd2
        else:
            mem_align = align
    if not direct:
        log.warning("uring bdev %s: %s (%s): using buffered I/O through the page cache",
                    name, why_buffered, path)
    if size % bs:
        log.warning("uring bdev %s: the last %d bytes of %s are not a whole block and are "
                    "not exported", name, size % bs, path)
    return UringBdev(
        fd=fd, filename=path, engine=params["engine"], direct=direct,
        mem_align=mem_align, block_device=block_device,
        name=name,
        block_size=bs,
        num_blocks=num_blocks,
        uuid=params.get("uuid") or "",
        product_name="URING bdev" if params["engine"] == "uring" else "AIO disk",
        module="uring",
        write_cache=True,
        io_types=frozenset({IOType.READ, IOType.FLUSH, IOType.COMPARE} if readonly else
                           {IOType.READ, IOType.WRITE, IOType.FLUSH, IOType.UNMAP,
                            IOType.WRITE_ZEROES, IOType.COMPARE}),
        create_method="bdev_uring_create",
        # the detected block size is written down, so a restart keeps the geometry
        create_params={"filename": path, "block_size": bs, "engine": params["engine"],
                       **({"readonly": True} if readonly else {})},
    )


MODULE = register_module(
    BdevModule(
        name="uring",
        create=create,
        schema=SCHEMA,
        create_method="bdev_uring_create",
        delete_method="bdev_uring_delete",
        description="file or block device through io_uring (or a thread pool)",
        needs_target=True,  # for the allowed-directories check of the file
        create_aliases=("bdev_aio_create",),
        delete_aliases=("bdev_aio_delete",),
    )
)
