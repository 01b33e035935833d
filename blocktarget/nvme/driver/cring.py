"""The ring state of an I/O queue pair kept in C (csrc/bt_nvme.h), so that the NVMe/TCP
C lane (nvme/fastlane.py, csrc/be_nvme.c) and the Python path submit to and reap from
one hardware queue on one reactor.

Why in C and not in the QueuePair's attributes: the lane writes SQEs and rings the
doorbell inside its C calls, with the GIL released, and finishes its completions when
the CQ is reaped; the tail, head and phase it moves must be the very ones Python moves.
Both paths run on the queue's reactor thread, one at a time, so one struct needs no
lock. Command ids are partitioned (``cid0``): the Python path keeps the low ones (its
trackers: callbacks, timeouts, resubmission after a reset), the lane the rest; together
they are ``depth - 1``, so the rings cannot overflow whoever submits.

The lane's data lies in a pool of DMA buffers of its own (made here, from the
controller's allocator), each with a page of headroom before the data (a C2HData header
is built there and the read sent to the host from the buffer), room after it (the data
digest) and its PRP list built once.

Attached only when the compiled lane is there and the BAR is mapped memory whose
doorbell addresses C can write (vfio.MappedBar); otherwise the QueuePair keeps its ring
state in Python as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .dma import PAGE_SIZE, DmaAllocator, DmaBuffer
from .qpair import build_prps, prp_list_align, prp_list_size

try:
    from ..._fastpath import ffi, lib
except ImportError:  # not built: queue pairs keep their ring state in Python
    ffi = lib = None

log = logging.getLogger(__name__)
_now_ns = time.perf_counter_ns

REAP_BATCH = 64
READY_MAX = 64
# what each lane buffer takes besides its data: a page of headroom before it (C2HData
# header) and one after it (data digest; pages keep the next buffer's data aligned)
LANE_BUF_EXTRA = 2 * PAGE_SIZE
# lane buffers a socket still held when their queue pair went (see free_buffers)
_KEPT: list[Any] = []


def available(mmio: Any) -> bool:
    """Whether a queue pair over ``mmio`` can keep its ring state in C."""
    return (lib is not None and hasattr(lib, "bt_nvmeq_new")
            and callable(getattr(mmio, "doorbell_addr", None)))


def lane_cids(depth: int) -> int:
    """Command ids of a ``depth``-entry queue that are the lane's: half of them (the
    Python path keeps the rest for its own I/O, admin-driven work and fallbacks)."""
    return (depth - 1) // 2


class CRing:
    """struct bt_nvmeq for one QueuePair (its owner thread only)."""

    def __init__(self, sq: DmaBuffer, cq: DmaBuffer, depth: int, cid0: int,
                 sq_db: int, cq_db: int, max_transfer: int) -> None:
        c = lib.bt_nvmeq_new(depth, cid0, max_transfer)
        if c == ffi.NULL:
            raise MemoryError("no memory for the queue pair's C ring state")
        # freed by the garbage collector once nothing (a lane's namespace table, through
        # the channel and queue) refers to it any more; its memory stays until the last
        # buffer lent to a socket comes back (bt_nvmeq_free)
        self.c = ffi.gc(c, lib.bt_nvmeq_free)
        c.sq = ffi.cast("unsigned char *", sq.vaddr)
        c.cq = ffi.cast("unsigned char *", cq.vaddr)
        c.sq_db = ffi.cast("uint32_t *", sq_db)
        c.cq_db = ffi.cast("uint32_t *", cq_db)
        self.cid0 = cid0
        self.bufs: list[tuple[DmaBuffer, DmaBuffer | None]] = []
        self._cids = ffi.new("uint16_t[]", REAP_BATCH)
        self._status = ffi.new("uint16_t[]", REAP_BATCH)
        self._dw0 = ffi.new("uint32_t[]", REAP_BATCH)
        self._ready = ffi.new("void *[]", READY_MAX)
        self._exp_cids = ffi.new("uint16_t[]", REAP_BATCH)
        self._exp_abort = ffi.new("uint8_t[]", REAP_BATCH)
        # who hears of lanes with completions (nvme_pcie.ReactorQueue: Lane.drain)
        self.on_ready: Callable[[list[Any]], None] | None = None
        # the owner reactor's stats: the reaps' time in C (GIL released) is counted in
        # its gil_released_ns, as the lane's own calls are
        self.stats: Any = None
        self.push = lambda sqe, _p=lib.bt_nvmeq_push, _c=c: _p(_c, sqe)
        self.ring = lambda _r=lib.bt_nvmeq_ring, _c=c: _r(_c)

    def set_doorbell_hook(self, fn: int, ctx: int) -> None:
        """A device model's entry point (the address of a C ``void fn(void *ctx)``) to be
        called right after each SQ doorbell write: measurement and tests only (bt_nvme.h,
        db_hook); a real controller's BAR offers none."""
        self.c.db_hook = ffi.cast("void (*)(void *)", fn)
        self.c.db_hook_ctx = ffi.cast("void *", ctx)

    def add_buffers(self, allocator: DmaAllocator, n: int, max_transfer: int) -> None:
        """``n`` DMA buffers of ``max_transfer`` bytes for the lane's pool."""
        prp = prp_list_size(max_transfer)
        for _ in range(n):
            whole = allocator.alloc(max_transfer + LANE_BUF_EXTRA, PAGE_SIZE)
            iova = whole.iova + PAGE_SIZE
            plist = allocator.alloc(prp, prp_list_align(prp)) if prp else None
            if plist is not None:
                build_prps(iova, max_transfer, plist)
            rc = lib.bt_nvmeq_add_buf(self.c, ffi.cast("unsigned char *", whole.vaddr + PAGE_SIZE),
                                      iova, plist.iova if plist is not None else 0)
            if rc < 0:
                raise MemoryError("no memory for the lane's buffer list")
            self.bufs.append((whole, plist))

    def free_buffers(self, allocator: DmaAllocator) -> bool:
        """Give the pool's DMA memory back, unless a socket still holds one of its buffers
        (a read being sent from it, C memory Python cannot see exported): then the
        buffers are kept referenced for good, which keeps the allocator from unmapping
        their region (its release sees the exports and leaves it mapped) under the
        socket. Returns whether the memory went."""
        if self.c.bufs_out:
            log.warning("queue pair torn down with %d lane buffer(s) still being sent: "
                        "their DMA memory stays mapped", self.c.bufs_out)
            _KEPT.append(self.bufs)
            self.bufs = []
            return False
        for whole, plist in self.bufs:
            allocator.free(whole)
            if plist is not None:
                allocator.free(plist)
        self.bufs = []
        return True

    # ---- the CQ ----
    def reap(self, take: Callable[[int, int, int], None], max_completions: int = 0) -> bool:
        """Reap the CQ: ``take(cid, status, dw0)`` for each of the Python path's
        completions (the lane's are finished in C), then the lanes with something new
        hear of it. Returns whether any entry was consumed."""
        c = self.c
        head, phase = c.cq_head, c.phase
        cids, status, dw0 = self._cids, self._status, self._dw0
        left = max_completions or 1 << 30
        stats = self.stats
        while True:
            t0 = _now_ns()
            n = lib.bt_nvmeq_reap(c, cids, status, dw0, min(REAP_BATCH, left))
            if stats is not None:
                stats.gil_released_ns += _now_ns() - t0
            for i in range(n):
                take(cids[i], status[i], dw0[i])
            left -= n
            if n < REAP_BATCH or not left:
                break
        self.drain_ready()
        return c.cq_head != head or c.phase != phase

    def drain_ready(self) -> None:
        c = self.c
        while c.ready != ffi.NULL:
            k = lib.bt_nvmeq_ready(c, self._ready, READY_MAX)
            lanes = [ffi.from_handle(self._ready[i]) for i in range(k)]
            if self.on_ready is not None:
                self.on_ready(lanes)

    def reinit(self) -> int:
        """The device lost the queue: the lane's commands go back to the Python path;
        the rings start again empty (see bt_nvmeq_reinit)."""
        n = lib.bt_nvmeq_reinit(self.c)
        self.drain_ready()
        return int(n)

    def expired(self, before_ns: int) -> list[tuple[int, bool]]:
        """The lane's commands submitted before ``before_ns`` (monotonic ns): (cid,
        Abort already sent). A time before the clock's start (a machine up for less
        than the I/O timeout: the monotonic clock counts from boot) has none."""
        if before_ns <= 0:
            return []
        n = lib.bt_nvmeq_expired(self.c, before_ns, self._exp_cids, self._exp_abort,
                                 REAP_BATCH)
        return [(self._exp_cids[i], bool(self._exp_abort[i])) for i in range(n)]

    def aborting(self, cid: int) -> None:
        lib.bt_nvmeq_aborting(self.c, cid)

    @staticmethod
    def now_ns() -> int:
        return int(lib.bt_now_ns())
