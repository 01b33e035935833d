"""One NVMe submission/completion queue pair in DMA memory, polled, never interrupted.

The rings live in DMA memory the controller reads (SQ) and writes (CQ). Submitting is:
write the 64-byte SQE at the tail, advance the tail, write the tail to the SQ doorbell.
Completing is: look at the CQE at the head; it is new when its phase bit equals the
phase we expect (the controller inverts the bit on every pass over the ring, so stale
entries never look new and the ring needs no clearing); take every new entry, then
write the new head to the CQ doorbell once for the batch.

Flow control needs no SQ head tracking: at most ``depth - 1`` commands are outstanding
(one command id per free slot), so neither ring can overflow. Commands beyond that wait
in a local queue and go out as completions free ids.

Reset support: a controller reset destroys every queue, and the commands in them are
neither completed nor will they be. ``suspend()`` stops submission, ``reinit()`` clears
the rings, and ``resume()`` re-submits the lost commands (same buffers, same command ids,
fresh deadlines) ahead of anything that queued meanwhile, so a caller sees a delayed
completion, not an error — reads and writes are idempotent. A command lost to more than
``max_resubmits`` resets fails with ABORTED_SQ_DELETION.

Shared with the C lane: when ``attach_cring`` gave the queue a :class:`cring.CRing`, the
ring state (tail, head, phase, the pending doorbell) lives there, in C, and both this
class and the NVMe/TCP C lane move it; this class keeps the command ids below
``CRing.cid0`` (its trackers) and the lane the rest, and every CQ entry is reaped by C,
which finishes the lane's and hands over these (see cring.py for why).

PRPs: data buffers come from per-queue pools and each buffer carries a PRP list built
once (its page addresses after the first), so the per-I/O work is choosing PRP2: none,
the second page, or the list. :func:`build_prps` is the general builder (unaligned start,
chained list pages) used for everything else and for precomputing those lists.
"""

from __future__ import annotations

import collections
import struct
import time
from collections.abc import Callable
from typing import Any

from .dma import PAGE_SIZE, DmaAllocator, DmaBuffer
from .regs import cq_head_doorbell, sq_tail_doorbell

SQE_SIZE = 64
CQE_SIZE = 16

# same layout as nvme.structs.build_sqe's PRP form, precompiled for the per-I/O path
_SQE = struct.Struct("<BBHIIIQQQIIIIII")
_CQE = struct.Struct("<IIHHHH")
_U16 = struct.Struct("<H")
_monotonic = time.monotonic

STATUS_MASK = 0x7FF  # (sct << 8) | sc, without CRD/More/DNR
STATUS_DNR = 1 << 14
SC_ABORTED_BY_REQUEST = 0x007
SC_ABORTED_SQ_DELETION = 0x008
SC_INTERNAL = 0x006

Callback = Callable[[int, int], None]
"""cb(status, dw0): status is the CQE's 15-bit status field (0 = success)."""


def build_prps(iova: int, length: int, prp_list: DmaBuffer | None = None,
               page_size: int = PAGE_SIZE) -> tuple[int, int]:
    """PRP1 and PRP2 for a transfer of ``length`` bytes at ``iova`` (IOVA-contiguous).

    PRP1 may start anywhere dword aligned; every further entry is a page address. Two
    pages fit PRP1/PRP2; more need a list in ``prp_list``, chained to the next list page
    through its last entry whenever the list reaches a page boundary (NVMe 2.0 4.1.1).
    """
    if iova & 3:
        raise ValueError(f"PRP1 {iova:#x} is not dword aligned")
    if length <= 0:
        raise ValueError("transfer length must be positive")
    first = page_size - (iova & (page_size - 1))
    if length <= first:
        return iova, 0
    second = iova + first
    rest = length - first
    if rest <= page_size:
        return iova, second
    if prp_list is None:
        raise ValueError(f"a {length}-byte transfer needs a PRP list")
    npages = (rest + page_size - 1) // page_size
    mem = prp_list.mem
    base = prp_list.iova
    if base & 7:
        raise ValueError("PRP list must be qword aligned")
    pos = 0
    page = second
    left = npages
    pack = struct.Struct("<Q").pack_into
    while left:
        if pos + 8 > len(mem):
            raise ValueError(f"PRP list of {len(mem)} bytes too small for {npages} entries")
        slot = base + pos
        last_in_page = (slot + 8) % page_size == 0
        if last_in_page and left > 1:
            pack(mem, pos, slot + 8)  # chain: the next list page starts right after
        else:
            pack(mem, pos, page)
            page += page_size
            left -= 1
        pos += 8
    return iova, base


def prp_list_size(max_transfer: int, page_size: int = PAGE_SIZE) -> int:
    """Bytes of PRP list a page-aligned transfer of ``max_transfer`` bytes needs, chain
    entries included, for a list that starts on a page boundary or fits in one page
    (:func:`prp_list_align` gives an allocation alignment that guarantees it)."""
    entries = max(0, (max_transfer + page_size - 1) // page_size - 1)
    if entries <= 1:
        return 0
    per_page = page_size // 8
    slots = 0
    while entries > per_page:  # a full page: per_page - 1 entries and a chain pointer
        slots += per_page
        entries -= per_page - 1
    return (slots + entries) * 8


def prp_list_align(size: int, page_size: int = PAGE_SIZE) -> int:
    """An alignment that keeps a list of ``size`` bytes inside one page when it fits in
    one, so its capacity is exactly what prp_list_size computed."""
    align = 8
    while align < size and align < page_size:
        align <<= 1
    return align


class Tracker:
    """One outstanding command: its id, the SQE for re-submission, who to tell."""

    __slots__ = ("cid", "sqe", "cb", "buf", "deadline", "seq", "aborting", "resubmits",
                 "active", "ctx")

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.sqe = b""
        self.cb: Callback | None = None
        self.buf: DmaBuffer | None = None
        self.deadline = 0.0
        self.seq = 0  # submission order, for re-submitting in order after a reset
        self.aborting = False
        self.resubmits = 0
        self.active = False
        self.ctx: Any = None


class QueuePair:
    """One SQ/CQ pair; qid 0 is the admin queue. Owned by one thread (its reactor)."""

    def __init__(
        self,
        mmio: Any,
        qid: int,
        depth: int,
        stride: int,
        allocator: DmaAllocator,
        *,
        timeout_s: float = 30.0,
        max_resubmits: int = 3,
        name: str = "",
    ) -> None:
        if depth < 2:
            raise ValueError("a queue needs at least 2 entries")
        self.qid = qid
        self.depth = depth
        self.name = name or f"q{qid}"
        self.timeout_s = timeout_s
        self.max_resubmits = max_resubmits
        self.allocator = allocator
        self.sq = allocator.alloc(depth * SQE_SIZE, PAGE_SIZE)
        self.cq = allocator.alloc(depth * CQE_SIZE, PAGE_SIZE)
        self._sq_mem = self.sq.mem
        self._cq_mem = self.cq.mem
        self._ring_sq = _doorbell(mmio, sq_tail_doorbell(qid, stride))
        self._ring_cq = _doorbell(mmio, cq_head_doorbell(qid, stride))
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1
        self.sq_head = 0
        self._sq_dirty = False
        self.trackers = [Tracker(cid) for cid in range(depth - 1)]
        self.free_cids: list[int] = list(range(depth - 2, -1, -1))
        self.waiting: collections.deque[tuple[bytes, Callback, DmaBuffer | None, Any]] = (
            collections.deque())
        self.suspended = False
        self.failed_status = 0  # set when the controller is gone: everything fails at once
        # counters (owner thread only)
        self.submitted = 0
        self.completed = 0
        self.doorbells = 0
        self.timeouts = 0
        self.resubmitted = 0
        self._seq = 0
        # Batched doorbells (SPDK's delay_cmd_submit): submit() only marks the tail dirty
        # and flush_doorbell() writes it once per poller run, so commands submitted in one
        # event-loop turn cost one MMIO write instead of one each.
        self.batch_doorbells = False
        self._sq_dirty = False
        self.cring: Any = None  # cring.CRing once attached: ring state in C, shared

    def attach_cring(self, cring: Any) -> None:
        """Keep the ring state in ``cring`` from now on, and only the command ids below
        its ``cid0`` (the rest are the C lane's). Only on a queue with nothing submitted
        yet."""
        assert self.outstanding == 0 and not self.waiting and self.sq_tail == 0
        self.cring = cring
        del self.trackers[cring.cid0:]
        self.free_cids = [cid for cid in self.free_cids if cid < cring.cid0]

    # ---- submission ----
    def submit(self, opcode: int, nsid: int = 0, *, prp1: int = 0, prp2: int = 0,
               cdw10: int = 0, cdw11: int = 0, cdw12: int = 0, cdw13: int = 0,
               cdw14: int = 0, cdw15: int = 0, flags: int = 0, cb: Callback,
               buf: DmaBuffer | None = None, ctx: Any = None) -> None:
        """Queue a command; ``cb(status, dw0)`` runs from ``process_completions``.

        ``buf`` is only remembered (the caller's data buffer, handed back in the tracker
        for resubmission bookkeeping); PRPs must already point into DMA memory.
        """
        if self.failed_status:
            cb(self.failed_status, 0)
            return
        if self.suspended or not self.free_cids or self.waiting:
            # cid 0 is a placeholder; the real id goes in when a slot is free
            self.waiting.append((_SQE.pack(opcode, flags, 0, nsid, 0, 0, 0, prp1, prp2, cdw10,
                                           cdw11, cdw12, cdw13, cdw14, cdw15), cb, buf, ctx))
            return
        # the per-I/O path: everything inline, one pack straight with the real cid
        cid = self.free_cids.pop()
        tr = self.trackers[cid]
        tr.sqe = sqe = _SQE.pack(opcode, flags, cid, nsid, 0, 0, 0, prp1, prp2, cdw10, cdw11,
                                 cdw12, cdw13, cdw14, cdw15)
        tr.cb = cb
        tr.buf = buf
        tr.ctx = ctx
        tr.active = True
        tr.aborting = False
        tr.resubmits = 0
        tr.seq = self._seq
        self._seq += 1
        tr.deadline = _monotonic() + self.timeout_s
        self.submitted += 1
        cring = self.cring
        if cring is not None:
            cring.push(sqe)
            if not self.batch_doorbells:
                cring.ring()
            return
        tail = self.sq_tail
        off = tail * SQE_SIZE
        self._sq_mem[off:off + SQE_SIZE] = sqe
        tail += 1
        self.sq_tail = tail = 0 if tail == self.depth else tail
        if self.batch_doorbells:
            self._sq_dirty = True
        else:
            self._ring_sq(tail)
            self.doorbells += 1

    def flush_doorbell(self) -> None:
        """Write the SQ tail once for everything submitted since the last write (batched
        mode: the owner's poller calls this first thing on every run)."""
        if self.cring is not None:
            self.cring.ring()  # (nothing while suspended; the lane's tail goes too)
            return
        if self._sq_dirty:
            self._sq_dirty = False
            if not self.suspended:
                self._ring_sq(self.sq_tail)
                self.doorbells += 1

    def _issue(self, sqe: bytes, cb: Callback, buf: DmaBuffer | None, ctx: Any) -> Tracker:
        """Take a command from the waiting queue (its SQE has a placeholder cid)."""
        cid = self.free_cids.pop()
        tr = self.trackers[cid]
        sqe = sqe[:2] + cid.to_bytes(2, "little") + sqe[4:]
        tr.sqe = sqe
        tr.cb = cb
        tr.buf = buf
        tr.ctx = ctx
        tr.active = True
        tr.aborting = False
        tr.resubmits = 0
        tr.seq = self._seq
        self._seq += 1
        tr.deadline = _monotonic() + self.timeout_s
        self._write_sqe(sqe)
        self.submitted += 1
        return tr

    def _write_sqe(self, sqe: bytes) -> None:
        if self.cring is not None:
            self.cring.push(sqe)
            return
        off = self.sq_tail * SQE_SIZE
        self._sq_mem[off:off + SQE_SIZE] = sqe
        tail = self.sq_tail + 1
        self.sq_tail = 0 if tail == self.depth else tail

    def _drain_waiting(self) -> bool:
        issued = False
        while self.waiting and self.free_cids and not self.suspended:
            sqe, cb, buf, ctx = self.waiting.popleft()
            self._issue(sqe, cb, buf, ctx)
            issued = True
        return issued

    # ---- completion ----
    def process_completions(self, max_completions: int = 0) -> int:
        """Reap new CQEs (all, or up to ``max_completions``); returns how many."""
        if self.cring is not None:
            return self._reap_c(max_completions)
        mem = self._cq_mem
        head = self.cq_head
        phase = self.phase
        depth = self.depth
        done: list[tuple[Tracker, int, int]] = []
        trackers = self.trackers
        while True:
            off = head * CQE_SIZE
            if (_U16.unpack_from(mem, off + 14)[0] & 1) != phase:
                break
            dw0, _dw1, sqhd, _sqid, cid, raw = _CQE.unpack_from(mem, off)
            head += 1
            if head == depth:
                head = 0
                phase ^= 1
            self.sq_head = sqhd
            if cid < len(trackers) and trackers[cid].active:
                done.append((trackers[cid], raw >> 1, dw0))
            if max_completions and len(done) >= max_completions:
                break
        if head == self.cq_head and phase == self.phase:
            return 0
        self.cq_head = head
        self.phase = phase
        if not self.suspended:  # a suspended queue may not exist on the device any more
            self._ring_cq(head)
        for tr, status, dw0 in done:
            self._finish(tr, status, dw0)
        if self.waiting and self._drain_waiting():
            self._ring_sq(self.sq_tail)
            self.doorbells += 1
        self.completed += len(done)
        return len(done) or 1

    def _reap_c(self, max_completions: int) -> int:
        """process_completions with the ring state in C: the lane's entries are finished
        there, ours come back here."""
        trackers = self.trackers
        done: list[tuple[Tracker, int, int]] = []

        def take(cid: int, status: int, dw0: int) -> None:
            if cid < len(trackers) and trackers[cid].active:
                done.append((trackers[cid], status, dw0))

        moved = self.cring.reap(take, max_completions)
        if not moved:
            return 0
        self.sq_head = self.cring.c.sq_head
        for tr, status, dw0 in done:
            self._finish(tr, status, dw0)
        if self.waiting and self._drain_waiting():
            self.cring.ring()
        self.completed += len(done)
        return len(done) or 1

    def _finish(self, tr: Tracker, status: int, dw0: int) -> None:
        cb = tr.cb
        tr.active = False
        tr.cb = None
        tr.buf = None
        tr.ctx = None
        self.free_cids.append(tr.cid)
        if cb is not None:
            cb(status, dw0)

    # ---- introspection ----
    @property
    def outstanding(self) -> int:
        """Commands at the device, the C lane's included."""
        n = len(self.trackers) - len(self.free_cids)
        return n + self.cring.c.lane_inflight if self.cring is not None else n

    def active_trackers(self) -> list[Tracker]:
        return [t for t in self.trackers if t.active]

    def expired(self, now: float | None = None) -> list[Tracker]:
        """Active commands past their deadline that are not already being aborted."""
        now = time.monotonic() if now is None else now
        return [t for t in self.trackers if t.active and not t.aborting and t.deadline < now]

    def describe(self) -> dict[str, Any]:
        return {"qid": self.qid, "depth": self.depth, "outstanding": self.outstanding,
                "waiting": len(self.waiting), "submitted": self.submitted,
                "completed": self.completed,
                # (with the ring state in C, C counts every SQ doorbell, the lane's too)
                "doorbells": self.doorbells + (self.cring.c.doorbells if self.cring else 0),
                "timeouts": self.timeouts, "resubmitted": self.resubmitted,
                "suspended": self.suspended}

    # ---- reset / removal ----
    def suspend(self) -> int:
        """Stop writing to the rings (the controller is about to be reset); returns how
        many commands the device holds at this moment."""
        self.suspended = True
        if self.cring is not None:
            self.cring.c.suspended = 1  # the lane starts nothing, rings no doorbell
        return self.outstanding

    def reinit(self) -> None:
        """Empty rings, phase 1: what a freshly created queue looks like to the device.
        The C lane's commands still in the old rings go back to the Python path, which
        does them again (queued behind the suspension, resubmitted on resume)."""
        if self.cring is not None:
            self._sq_dirty = False
            self.cring.reinit()
            return
        self._sq_mem[:] = bytes(len(self._sq_mem))
        self._cq_mem[:] = bytes(len(self._cq_mem))
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1
        self.sq_head = 0
        self._sq_dirty = False

    def resume(self) -> int:
        """Re-submit the commands the reset swallowed, then the waiting ones."""
        self.suspended = False
        lost = sorted((t for t in self.trackers if t.active), key=lambda t: t.seq)
        failed: list[Tracker] = []
        n = 0
        now = time.monotonic()
        for tr in lost:
            if tr.resubmits >= self.max_resubmits:
                failed.append(tr)
                continue
            tr.resubmits += 1
            tr.aborting = False
            tr.deadline = now + self.timeout_s
            self._write_sqe(tr.sqe)
            n += 1
        self.resubmitted += n
        self._drain_waiting()
        if self.cring is not None:
            self.cring.c.suspended = 0
            self.cring.ring()
        elif self.sq_tail:
            self._ring_sq(self.sq_tail)
            self.doorbells += 1
        for tr in failed:
            self._finish(tr, SC_ABORTED_SQ_DELETION, 0)
        return n

    def fail_all(self, status: int = SC_ABORTED_SQ_DELETION) -> int:
        """Complete every active and waiting command with ``status`` (device gone, or
        the queue is being torn down); later submissions fail the same way at once."""
        self.failed_status = status
        n = 0
        if self.cring is not None:
            # the lane's commands will not complete either: back to the Python path,
            # which fails them with this status like its own
            self.cring.c.dead = 1
            n += self.cring.reinit()
        for tr in self.trackers:
            if tr.active:
                self._finish(tr, status, 0)
                n += 1
        while self.waiting:
            _sqe, cb, _buf, _ctx = self.waiting.popleft()
            cb(status, 0)
            n += 1
        return n

    def free(self) -> None:
        if self.cring is not None:
            self.cring.c.dead = 1
            self.cring.free_buffers(self.allocator)
        self.allocator.free(self.sq)
        self.allocator.free(self.cq)


def _doorbell(mmio: Any, offset: int) -> Callable[[int], None]:
    ring = getattr(mmio, "doorbell", None)
    if ring is not None:
        return ring(offset)  # type: ignore[no-any-return]

    def write(value: int) -> None:
        mmio.write32(offset, value)

    return write


def wait_for(qp: QueuePair, done: Callable[[], bool], timeout_s: float,
             check: Callable[[], None] | None = None) -> bool:
    """Poll ``qp`` until ``done()`` or the timeout: how synchronous admin commands wait.

    Spins briefly, then sleeps in 50 µs steps so a slow command does not hold the GIL
    away from the reactors. ``check`` may raise (device removed) to end the wait early.
    """
    deadline = time.monotonic() + timeout_s
    spins = 0
    while True:
        qp.process_completions()
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        spins += 1
        if spins > 200:
            if check is not None and spins % 64 == 0:
                check()
            time.sleep(0.00005)
