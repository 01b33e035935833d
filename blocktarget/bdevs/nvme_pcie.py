"""nvme bdev over PCIe: a local NVMe SSD driven by our user-space driver (nvme/driver).

``attach_pcie`` opens the controller through VFIO and registers one bdev per active
namespace, ``<name>n<nsid>`` as SPDK names them. Each reactor that does I/O on any of
them gets its own hardware queue pair, created on that reactor the first time one of
its channels opens, polled by that reactor's poller, and shared by all namespaces of the
controller on that reactor — SPDK's model: no locks and no cross-core traffic per I/O.
While nothing is outstanding on a queue its poller sleeps (Reactor.set_dormant: no
timed poll turns for an idle queue) and the controller's health tick runs from a loop
timer instead. Where the device offers MSI-X vectors and the attach asks for them
(``interrupts``, off by default: polling served QD32 better in the guest), each queue's
CQ raises one: the reactor's C socket poller, which reaps the C lane's completions,
sleeps on its eventfd, so the lane's commands at the device need no poll turn of the
Python poller either.

Bdev I/O maps 1:1 onto NVMe commands: read, write (FUA passes through), flush, write
zeroes, and unmap as Dataset Management/deallocate. Transfers larger than the
controller's MDTS are split. Data moves through the queue's DMA buffer pool, zero-copy
where NVMe/TCP is the caller (the bdev layer's DataBuffer lending, bdev.py):

* writes: when the qpair sends an R2T it asks the channel (``alloc_data_buffer``) for a
  pool buffer; the H2CData payload is placed straight into it and the command's PRPs
  point at it. A large payload (16 KiB or more still to come once its header is in) is
  received by the kernel into the buffer itself (qpair ``_try_direct``); smaller ones,
  and bytes that arrived with the header, are copied in from the received ``bytes``. The request holds it until it finishes (or its connection goes away
  while it waits for data; a command still at the device keeps it until completion,
  re-submission after a controller reset included) and then releases it.
* reads: the device writes a pool buffer; the bdev completes with a view of it and the
  qpair sends the C2HData from it (data digest computed over it at once), releasing it
  only when the transport's pending byte count shows the bytes left for the kernel
  (uvloop and asyncio keep views, not copies, of what they cannot send at once).

Lent buffers are held for network time, so at most half of a queue's pool is lent;
beyond that, and for split I/O, in-capsule write data and other callers, data is
copied (writes in, reads out once as ``bytes``). The counters in ``driver_specific``
(``data_path``) say which path each command took.

Resets (RPC, command timeouts, fatal status) and hot-removal are the controller's
(see driver/ctrlr.py); here they are wired to reactor messages, and a removed device's
namespaces are taken out of their subsystems and its bdevs unregistered, so the kernel
can finish the removal.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..bdev import LANE_NVME, Bdev, BdevIO, IOChannel, IOType, LaneTarget, Status
from ..errors import AlreadyExists, Busy, InvalidParams, NoSuchDevice, RpcError
from ..nvme import spec
from ..nvme.driver.ctrlr import (
    ONCS_DSM,
    ONCS_WRITE_ZEROES,
    TICK_INTERVAL_S,
    Controller,
    IoQueue,
    Namespace,
    Options,
    buffer_prps,
    open_pcie,
)
from ..nvme.driver.dma import DmaBuffer, DmaError
from ..nvme.driver.qpair import STATUS_MASK
from ..params import Param, Schema, non_empty, positive

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Poller, Reactor

log = logging.getLogger(__name__)

OP = spec.IoOpcode
FUA_BIT = 1 << 30
DSM_AD = 1 << 2
MAIN_POLL_S = 0.0002  # the reactor-less queue's polling period while commands are out
MAX_WZ_BLOCKS = 1 << 16  # NLB is a 16-bit 0's based field
MAX_DSM_RANGE_BLOCKS = 0xFFFFFFFF
# data_path counters (driver_specific), kept per queue and summed
_COUNTERS = ("zero_copy_reads", "zero_copy_writes", "copied_reads", "copied_writes",
             "rx_direct_bytes", "rx_copied_bytes", "lane_reads", "lane_writes",
             "lane_c_reaped")


# ---------------------------------------------------------------------------
# per-reactor queue


class ReactorQueue:
    """The controller's I/O queue on one reactor, shared by that reactor's channels."""

    def __init__(self, owner: PcieController, reactor: Reactor | None, q: IoQueue) -> None:
        self.owner = owner
        self.reactor = reactor
        self.q = q
        self.refs = 0
        self.poller: Poller | None = None
        self.buf_waiters: deque[Callable[[DmaBuffer], None]] = deque()
        # Buffers lent to NVMe/TCP (write data received into them, read data sent from
        # them) are held for network time, not just device time: at most half the pool
        # may be out that way, so a slow host never starves this reactor's other I/O.
        self.lent = 0
        pool = getattr(q, "pool", None)
        self.lend_cap = max(1, pool.max_count // 2) if pool is not None else 0
        # data path counters (bdev_get_bdevs driver_specific): proof of zero-copy
        self.zero_copy_reads = 0
        self.zero_copy_writes = 0
        self.copied_reads = 0
        self.copied_writes = 0
        # bytes of R2T write data placed into lent buffers: received by the kernel
        # straight into them (NVMe/TCP's direct receive) or copied in from Python bytes
        self.rx_direct_bytes = 0
        self.rx_copied_bytes = 0
        self._next_tick = 0.0
        # the health tick's own timer (see _tick_timer), armed by start_ticking
        self._tick_handle: asyncio.TimerHandle | None = None
        # times that timer found the poller dormant with work and no poll coming: a
        # submission that did not kick (a bug; tests hold it at 0), mended within a tick
        self.late_wakes = 0
        # On a reactor its poller reaps the queue; the reactor-less queue (the control
        # plane's I/O: a volume store's examine and metadata, bdev_lvol zeroing) is
        # polled by the main event loop while it has commands out (_main_kick).
        self._kick = reactor.kick if reactor is not None else self._main_kick
        self._main_poll: Any = None
        # The NVMe/TCP C lane submits to this queue too when its ring state is in C
        # (driver/cring.py): its completions are finished in C when poll() reaps the CQ,
        # and the lanes with something to send hear of it here (Lane.drain).
        cr = getattr(q, "cring", None)
        self.lane_ctx: Any = cr.c if cr is not None else None
        # lanes of connections that went away with I/O here: kept (their handles must
        # stay valid) until their last completion (fastlane.Lane.drain)
        self.zombies: set[Any] = set()
        # the reactor's C socket poller (nvme/netpoll.NetPoller) once a lane whose
        # socket it holds uses this queue: it reaps the lanes' completions (see poll)
        self.net_poller: Any = None
        # our duplicate of the queue's interrupt eventfd, watched by the event loop
        # while the C poller does not (watch_irq), or -1
        self._irq_fd = -1
        if cr is not None:
            cr.on_ready = self._lanes_ready
            cr.stats = reactor.stats if reactor is not None else None

    @property
    def lane_reads(self) -> int:
        """Reads the C lane sent to this queue (their data went to the host from the
        DMA buffer the device wrote)."""
        return int(self.lane_ctx.lane_reads) if self.lane_ctx is not None else 0

    @property
    def lane_writes(self) -> int:
        """Writes the C lane sent (their data received or copied into DMA memory once)."""
        return int(self.lane_ctx.lane_writes) if self.lane_ctx is not None else 0

    @property
    def lane_c_reaped(self) -> int:
        """The lane's completions reaped by the reactor's C socket poller (finished and
        answered in its GIL-free call); the rest were the Python poller's reaps."""
        return int(self.lane_ctx.c_reaped) if self.lane_ctx is not None else 0

    def _lanes_ready(self, lanes: list[Any]) -> None:
        for lane in lanes:
            try:
                lane.drain()
            except Exception:  # one connection's trouble must not strand the others
                log.exception("completing the C lane's NVMe I/O failed")

    def lane_io_started(self) -> None:
        """The C lane submitted commands (and rang the doorbell): poll for them, unless
        nothing needs a poll: a device done within the C poller's sweep had them reaped
        and answered in the very call that submitted them, and a poller turn then would
        find nothing (a loop handle and a Python poll per batch); an interrupting queue
        the C poller sweeps wakes its epoll set when the device posts."""
        if self.lane_ctx is None or self.unwatched():
            self._kick()

    def irq_watched(self) -> bool:
        """Someone sleeps on the queue's completion interrupt: the reactor's C poller,
        which sweeps it (stopping at the Python path's first entry for us to reap), or
        else the event loop (watch_irq), which kicks the reactor."""
        return self.q.irq_efd >= 0 and (self.net_poller is not None or self._irq_fd >= 0)

    def unwatched(self) -> int:
        """Commands at the device that only a timed poll turn of ours would find
        complete: none while the completion interrupt is watched."""
        return 0 if self.irq_watched() else self.q.outstanding

    def watch_irq(self) -> None:
        """(Reactor thread) The event loop watches the queue's interrupt eventfd (a
        duplicate: closing the device's descriptor on removal leaves nothing stale in
        the loop) and kicks the reactor at each completion, so commands at the device
        need no timed poll turns; while the reactor's C poller sweeps the queue it
        watches it instead (pause_irq)."""
        r = self.reactor
        if self.q.irq_efd < 0 or r is None or r.loop is None or self._irq_fd >= 0:
            return
        self._irq_fd = os.dup(self.q.irq_efd)
        if self.net_poller is None:
            r.loop.add_reader(self._irq_fd, self._on_irq)

    def _on_irq(self) -> None:
        try:
            os.eventfd_read(self._irq_fd)
        except (BlockingIOError, OSError):
            pass
        self._kick()

    def pause_irq(self) -> None:
        """The reactor's C poller watches the interrupt now (not the loop, which would
        wake Python for completions C answers)."""
        r = self.reactor
        if self._irq_fd >= 0 and r is not None and r.loop is not None:
            r.loop.remove_reader(self._irq_fd)

    def resume_irq(self) -> None:
        r = self.reactor
        if (self._irq_fd >= 0 and r is not None and r.loop is not None
                and not r.loop.is_closed()):
            r.loop.add_reader(self._irq_fd, self._on_irq)

    def unwatch_irq(self) -> None:
        fd, self._irq_fd = self._irq_fd, -1
        if fd < 0:
            return
        r = self.reactor
        if r is not None and r.loop is not None and not r.loop.is_closed():
            r.loop.remove_reader(fd)
        os.close(fd)

    def _main_kick(self) -> None:
        if self._main_poll is None:
            self._main_poll = asyncio.get_event_loop().call_soon(self._main_poll_once)

    def _main_poll_once(self) -> None:
        self._main_poll = None
        try:
            self.poll()
        finally:
            if self.q.outstanding and not self.owner.ctrlr.removed:
                self._main_poll = asyncio.get_event_loop().call_later(
                    MAIN_POLL_S, self._main_poll_once)

    def poll(self) -> int:
        """The reactor's poller turn. While lane commands are at the device and the
        reactor's C socket poller sweeps this queue, one call of it does the work, the
        GIL released (a sweep, or a whole poll with its spinning when the reactor
        spins): it rings the doorbell, finishes the lent lanes' completions and
        sends their replies, and stops at the first entry that is the Python path's,
        which it then reaps here (reap_python). Otherwise (no lane I/O, no lent socket,
        a suspended queue) the Python path reaps everything, the lane's completions
        included (finished in C, drained through Lane.drain)."""
        q = self.q
        np = self.net_poller
        ctx = self.lane_ctx
        if np is not None and ctx.lane_inflight and not q.suspended:
            before = ctx.c_reaped
            if self.reactor is not None and self.reactor.spin_on_io:
                np.poll()  # (it waits for the device, the GIL released, as the loop would)
            else:
                np.reap()
            n = ctx.c_reaped - before
        elif q.outstanding:
            n = self.reap_python()
        else:
            n = 0  # (nothing at the device: nothing to reap; a stray entry waits)
        self._tick_if_due()
        p = self.poller
        if p is not None:
            # Dormant while nothing can complete: no command at the device (the lane's
            # included), none waiting for a slot or for the queue to come back from a
            # reset, no I/O waiting for a buffer. Every way work comes back kicks the
            # reactor (the channel's submissions, lane_io_started, a buffer given back
            # to a waiter, the controller's calls on the queue: PcieController._call),
            # and that turn wakes it here.
            # (commands at an interrupting queue announce their completions, to the C
            # poller or to the loop: they need no timed turn)
            idle = not (self.unwatched() or q.waiting or q.suspended or self.buf_waiters)
            if idle is not p.dormant:
                self.reactor.set_dormant(p, idle)  # type: ignore[union-attr]
        return n

    def start_ticking(self) -> None:
        """(Reactor thread) Run the controller's health tick from a loop timer as well
        as from poll: a dormant queue's poller is not called while the reactor sleeps,
        but a device removed, failed (CSTS.CFS, all ones) or asked back by the kernel
        while it is idle must still be noticed within a tick or two. The timer fires
        every TICK_INTERVAL_S whatever the queue does (ten loop wake-ups a second, where
        arming it on every switch to dormant would cost a timer per I/O at QD1) and ticks
        only when poll has not."""
        loop = self.reactor.loop if self.reactor is not None else None
        if loop is not None and self._tick_handle is None:
            self._tick_handle = loop.call_later(TICK_INTERVAL_S, self._tick_timer)

    def stop_ticking(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    def _tick_if_due(self) -> None:
        """The controller's health tick, at most every TICK_INTERVAL_S, whichever of
        poll and the tick timer comes first."""
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK_INTERVAL_S
            self.owner.ctrlr.tick(self.q, now)

    def _tick_timer(self) -> None:
        self._tick_handle = None
        ctrlr = self.owner.ctrlr
        try:
            self._tick_if_due()
            p = self.poller
            r = self.reactor
            q = self.q
            if (p is not None and r is not None and p.dormant and not r.poll_scheduled
                    and (self.unwatched() or q.waiting)):
                # commands that no kick announced: poll them now rather than never (a
                # buffer waiter needs no poll: a buffer given back serves it)
                self.late_wakes += 1
                log.warning("%s: queue %d had work while its poller slept; polling it",
                            self.owner.name, self.q.qid)
                r.kick()
            elif (p is not None and r is not None and p.dormant and not r.poll_scheduled
                    and q.outstanding and not q.suspended):
                # commands an interrupt announces: reaped each tick all the same, so
                # that a completion whose interrupt never came waits a tick, not for
                # the command's timeout (a reap, not a kick: that would spin a window)
                np = self.net_poller
                if np is not None:
                    np.reap()
                else:
                    self.reap_python()
        finally:
            loop = self.reactor.loop if self.reactor is not None else None
            if (self.poller is not None and not (ctrlr.removed or ctrlr.closed)
                    and loop is not None and not loop.is_closed()):
                self._tick_handle = loop.call_later(
                    max(self._next_tick - time.monotonic(), 0.001), self._tick_timer)

    def reap_python(self) -> int:
        """The Python poller's reap of the whole queue (bt_nvmeq_reap): its doorbell
        rung, every completion taken, the lanes' finished in C."""
        q = self.q
        q.flush_doorbell()
        return q.process_completions()

    def with_buffer(self, fn: Callable[[DmaBuffer], None]) -> None:
        """Run ``fn(buf)`` now, or when a buffer comes back (FIFO, so nothing starves)."""
        if not self.buf_waiters:
            buf = self.q.get_buffer()
            if buf is not None:
                fn(buf)
                return
        self.buf_waiters.append(fn)

    def put_buffer(self, buf: DmaBuffer) -> None:
        if self.buf_waiters:
            self.buf_waiters.popleft()(buf)
        else:
            self.q.put_buffer(buf)

    def fail_waiters(self, status: int) -> None:
        while self.buf_waiters:
            fn = self.buf_waiters.popleft()
            fn(None)  # type: ignore[arg-type]

    def lend(self, nbytes: int) -> LentBuffer | None:
        """A pool buffer for one NVMe/TCP transfer, or None (copy instead): too big for
        one command (the I/O will be split), I/O already waiting for buffers, or the
        lending cap reached."""
        if self.lent >= self.lend_cap or self.buf_waiters or nbytes > self.q.max_transfer:
            return None
        buf = self.q.get_buffer()
        if buf is None:
            return None
        self.lent += 1
        return LentBuffer(self, buf, nbytes)


class LentBuffer:
    """A queue's DMA buffer lent to the transport (the bdev layer's DataBuffer): write
    data is received into ``mem`` and the command's PRPs point at it; read data is sent
    from it. ``release`` gives it back to the pool once, however often it is called."""

    __slots__ = ("rq", "buf", "mem", "rx_direct", "rx_copied")

    def __init__(self, rq: ReactorQueue, buf: DmaBuffer, nbytes: int) -> None:
        self.rq = rq
        self.buf: DmaBuffer | None = buf
        self.mem = buf.mem[:nbytes]
        self.rx_direct = 0  # (bdev.DataBuffer: the transport counts how data came in)
        self.rx_copied = 0

    def release(self) -> None:
        buf = self.buf
        if buf is not None:
            self.buf = None
            rq = self.rq
            rq.lent -= 1
            rq.rx_direct_bytes += self.rx_direct
            rq.rx_copied_bytes += self.rx_copied
            rq.put_buffer(buf)


# ---------------------------------------------------------------------------
# channel


class _Split:
    """Completion of one bdev I/O made of several NVMe commands."""

    __slots__ = ("left", "status", "io", "ch")

    def __init__(self, io: BdevIO, ch: NvmeChannel, left: int) -> None:
        self.io = io
        self.ch = ch
        self.left = left
        self.status = 0

    def part_done(self, status: int) -> None:
        if status and not self.status:
            self.status = status
        self.left -= 1
        if self.left == 0:
            self.ch.complete(self.io, self.status)


class NvmeChannel(IOChannel):
    bdev: NvmeNsBdev

    def __init__(self, bdev: NvmeNsBdev, reactor: Reactor | None, rq: ReactorQueue) -> None:
        super().__init__(bdev, reactor)
        self.rq = rq
        self.q = rq.q
        self.nsid = bdev.ns.nsid
        self.bs = bdev.block_size
        self.max_blocks = rq.q.max_transfer // bdev.block_size
        self._kick = rq._kick
        # the bdev layer's lending hook (bdev.DataBuffer): write data is received
        # straight into this queue's DMA memory
        self.alloc_data_buffer = rq.lend  # type: ignore[assignment]

    def _submit(self, io: BdevIO) -> None:
        t = io.type
        if t == IOType.READ or t == IOType.WRITE:
            self._rw(io)
        elif t == IOType.FLUSH:
            if not self.bdev.write_cache:
                self.complete(io, Status.SUCCESS)  # nothing volatile to flush
                return
            self.q.submit(OP.FLUSH, self.nsid, cb=self._simple_cb(io))
            self._kick()
        elif t == IOType.WRITE_ZEROES:
            self._write_zeroes(io)
        elif t == IOType.UNMAP:
            self._unmap(io)
        else:
            self.complete(io, Status.INVALID_OPCODE)

    def _simple_cb(self, io: BdevIO) -> Callable[[int, int], None]:
        def cb(status: int, dw0: int) -> None:
            self.complete(io, status & STATUS_MASK)

        return cb

    # ---- read / write ----
    def _rw(self, io: BdevIO) -> None:
        nblocks = io.num_blocks
        if nblocks <= self.max_blocks:
            lent = io.dma
            if (lent is not None and lent is not True and getattr(lent, "rq", None) is self.rq
                    and lent.buf is not None):
                # write data already in our DMA memory (lent to the transport): the
                # command's PRPs point at it; the lender releases it after completion
                self._rw_one(io, lent.buf, io.offset_blocks, nblocks, 0, None, lent)
                return
            self.rq.with_buffer(lambda buf: self._rw_one(io, buf, io.offset_blocks, nblocks,
                                                         0, None))
            return
        parts = (nblocks + self.max_blocks - 1) // self.max_blocks
        split = _Split(io, self, parts)
        if io.type == IOType.READ and io.buf is None:
            io.buf = bytearray(nblocks * self.bs)
        for i in range(parts):
            first = i * self.max_blocks
            n = min(self.max_blocks, nblocks - first)
            self.rq.with_buffer(
                lambda buf, first=first, n=n: self._rw_one(
                    io, buf, io.offset_blocks + first, n, first * self.bs, split))

    def _rw_one(self, io: BdevIO, buf: DmaBuffer | None, lba: int, nblocks: int,
                byte_off: int, split: _Split | None, lent: LentBuffer | None = None) -> None:
        if buf is None:  # queue failed while waiting for a buffer
            self._part_done(io, split, Status.ABORTED_SQ_DELETION)
            return
        nbytes = nblocks * self.bs
        prp1, prp2 = buffer_prps(buf, nbytes)
        cdw12 = nblocks - 1
        rq = self.rq
        if io.type == IOType.WRITE:
            if lent is not None:
                rq.zero_copy_writes += 1
            else:
                rq.copied_writes += 1
                src = io.buf
                if not isinstance(src, (bytes, bytearray)):
                    src = memoryview(src).cast("B")
                buf.mem[:nbytes] = src[byte_off:byte_off + nbytes]
            if io.fua:
                cdw12 |= FUA_BIT
            opcode = OP.WRITE
        else:
            opcode = OP.READ

        def cb(status: int, dw0: int) -> None:
            if lent is not None:  # lent write memory: its holder releases it
                self._part_done(io, split, status & STATUS_MASK)
                return
            if not status and opcode == OP.READ:
                if io.buf is None:
                    if io.dma is True and split is None and rq.lent < rq.lend_cap:
                        # lend the buffer: the transport sends from DMA memory and
                        # releases it once the socket has the bytes
                        rq.lent += 1
                        rq.zero_copy_reads += 1
                        out = LentBuffer(rq, buf, nbytes)
                        io.buf = out.mem
                        io.dma = out
                        self._part_done(io, split, 0)
                        return
                    rq.copied_reads += 1
                    io.buf = bytes(buf.mem[:nbytes])  # one copy; the transport sends bytes as is
                else:
                    rq.copied_reads += 1
                    dst = io.buf if isinstance(io.buf, bytearray) else memoryview(io.buf).cast("B")
                    dst[byte_off:byte_off + nbytes] = buf.mem[:nbytes]
            rq.put_buffer(buf)
            self._part_done(io, split, status & STATUS_MASK)

        self.q.submit(opcode, self.nsid, prp1=prp1, prp2=prp2, cdw10=lba & 0xFFFFFFFF,
                      cdw11=lba >> 32, cdw12=cdw12, cb=cb, buf=buf)
        self._kick()

    def _part_done(self, io: BdevIO, split: _Split | None, status: int) -> None:
        if split is None:
            self.complete(io, status)
        else:
            split.part_done(status)

    # ---- write zeroes / unmap ----
    def _write_zeroes(self, io: BdevIO) -> None:
        chunks = [(lba, min(MAX_WZ_BLOCKS, io.offset_blocks + io.num_blocks - lba))
                  for lba in range(io.offset_blocks, io.offset_blocks + io.num_blocks,
                                   MAX_WZ_BLOCKS)]
        split = _Split(io, self, len(chunks))
        for lba, n in chunks:
            self.q.submit(OP.WRITE_ZEROES, self.nsid, cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32,
                          cdw12=n - 1, cb=lambda st, dw0: split.part_done(st & STATUS_MASK))
        self._kick()

    def _unmap(self, io: BdevIO) -> None:
        ranges = []
        lba, left = io.offset_blocks, io.num_blocks
        while left:
            n = min(left, MAX_DSM_RANGE_BLOCKS)
            ranges.append((lba, n))
            lba += n
            left -= n
        groups = [ranges[i:i + spec.DSM_MAX_RANGES] for i in range(0, len(ranges),
                                                                   spec.DSM_MAX_RANGES)]
        split = _Split(io, self, len(groups))
        for group in groups:
            self.rq.with_buffer(lambda buf, group=group: self._dsm(buf, group, split))

    def _dsm(self, buf: DmaBuffer | None, group: list[tuple[int, int]], split: _Split) -> None:
        if buf is None:
            split.part_done(Status.ABORTED_SQ_DELETION)
            return
        from ..nvme.structs import DsmRange, build_dsm_ranges

        data = build_dsm_ranges(DsmRange(0, n, lba) for lba, n in group)
        buf.mem[:len(data)] = data
        rq = self.rq

        def cb(status: int, dw0: int) -> None:
            rq.put_buffer(buf)
            split.part_done(status & STATUS_MASK)

        prp1, prp2 = buffer_prps(buf, len(data))
        self.q.submit(OP.DATASET_MANAGEMENT, self.nsid, prp1=prp1, prp2=prp2,
                      cdw10=len(group) - 1, cdw11=DSM_AD, cb=cb, buf=buf)
        self._kick()

    def lane_target(self) -> LaneTarget | None:
        # Reads, writes (the host's FUA bit passed through) and flushes go from the C
        # lane to this reactor's queue pair as _rw_one would send them (one command, data
        # in a DMA buffer); anything that does not succeed comes back to this channel
        # through the Python path. Never for a device that is gone or a queue that
        # failed. While the controller is being reset the lane starts nothing either, but
        # that is decided per command, in C (the queue pair's `suspended`, set by
        # QueuePair.suspend until resume): a connection's table is built once, and one
        # built during a reset must serve the namespace again after it.
        rq = self.rq
        ctrlr = self.bdev.owner.ctrlr
        if (rq.lane_ctx is None or ctrlr.removed or ctrlr.closed or self.q.failed_status
                or rq.lane_ctx.dead):
            return None
        return LaneTarget(LANE_NVME, None, 0, (self,), ring=rq, nsid=self.nsid)

    def close(self) -> None:
        self.bdev.owner.release_queue(self.reactor, self.rq)


# ---------------------------------------------------------------------------
# bdev


class NvmeNsBdev(Bdev):
    owner: PcieController
    ns: Namespace

    def create_channel(self, reactor: Reactor | None) -> IOChannel:
        if self.owner.ctrlr.removed:
            raise RpcError(f"bdev {self.name}: NVMe device removed")
        rq = self.owner.acquire_queue(reactor)
        return NvmeChannel(self, reactor, rq)

    def destruct(self) -> None:
        self.owner.bdev_destroyed(self)

    def driver_specific(self) -> dict[str, Any]:
        c = self.owner.ctrlr
        return {
            "nvme": [{
                "trid": {"trtype": "PCIe", "traddr": self.owner.traddr},
                "ctrlr_data": {
                    "model_number": c.ident.get("mn", ""), "serial_number": c.ident.get("sn", ""),
                    "firmware_revision": c.ident.get("fr", ""),
                    "vendor_id": f"{c.ident.get('vid', 0):#06x}",
                    "oacs": {}, "cntlid": c.ident.get("cntlid", 0),
                },
                "ns_data": {"id": self.ns.nsid},
                "driver": "blocktarget-vfio",
                "controller": c.describe(),
                "data_path": self.owner.data_path_counters(),
            }]
        }  # fmt: skip

    def config_entry(self) -> dict[str, Any] | None:
        """The first namespace's bdev replays the attach; the others come with it."""
        if self.owner.bdevs and self is self.owner.bdevs[0]:
            return {"method": "bdev_nvme_attach_controller",
                    "params": self.owner.config_params()}
        return None


# ---------------------------------------------------------------------------
# controller wrapper


class PcieController:
    """One attached controller: the driver object, its bdevs and per-reactor queues."""

    def __init__(self, target: Target | None, name: str, traddr: str, ctrlr: Controller,
                 params: dict[str, Any]) -> None:
        self.target = target
        self.name = name
        self.traddr = traddr
        self.ctrlr = ctrlr
        self.params = params
        self.bdevs: list[NvmeNsBdev] = []
        self.queues: dict[int, ReactorQueue] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.detached = False
        self._retired_counts: dict[str, int] = {}  # counters of queues already released
        ctrlr.call = self._call
        ctrlr.post = self._post
        ctrlr.on_reset_needed = self._reset_needed
        ctrlr.on_removed = self._removed

    def config_params(self) -> dict[str, Any]:
        return {"name": self.name, "trtype": "PCIe", "traddr": self.traddr,
                **{k: v for k, v in self.params.items()
                   if k not in ("name", "trtype", "traddr") and v is not None}}

    # ---- owner hooks for the driver ----
    # The controller changes a queue on its reactor (suspend, re-create and re-submit
    # after a reset, fail): the reactor then polls at once, whether or not the queue's
    # poller was dormant, so nothing the change left at the device waits for a turn.
    async def _call(self, q: Any, fn: Callable[[], Any]) -> Any:
        reactor = getattr(q, "owner", None)
        if reactor is None or reactor.loop is None or not reactor.running:
            try:
                return fn()
            finally:
                _kick_if_here(reactor)
        return await reactor.call(_then_kick(reactor, fn))

    def _post(self, q: Any, fn: Callable[[], Any]) -> None:
        reactor = getattr(q, "owner", None)
        if reactor is None or reactor.loop is None or not reactor.running:
            try:
                fn()
            finally:
                _kick_if_here(reactor)
        elif reactor.on_reactor():
            _then_kick(reactor, fn)()
        else:
            reactor.loop.call_soon_threadsafe(_then_kick(reactor, fn))

    def _on_main(self, coro_fn: Callable[[], Any]) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return

        def start() -> None:
            task = asyncio.ensure_future(coro_fn())
            task.add_done_callback(_log_failure)

        loop.call_soon_threadsafe(start)

    def _reset_needed(self, ctrlr: Controller, reason: str) -> None:
        self._on_main(self.reset)

    def _removed(self, ctrlr: Controller) -> None:
        self._on_main(self.hot_removed)

    def data_path_counters(self) -> dict[str, int]:
        """NVMe read/write commands whose data moved zero-copy (DMA memory lent to the
        NVMe/TCP transport) or through a copy, summed over its queues (released ones
        included); ``rx_direct_bytes``/``rx_copied_bytes``: R2T write data the kernel
        received straight into lent buffers / the transport copied into them;
        ``lent_buffers``: buffers the transport holds right now."""
        keys = _COUNTERS
        qs = list(self.queues.values())
        out = {k: self._retired_counts.get(k, 0) + sum(getattr(rq, k) for rq in qs)
               for k in keys}
        out["lent_buffers"] = sum(rq.lent for rq in qs)
        return out

    # ---- queues ----
    def acquire_queue(self, reactor: Reactor | None) -> ReactorQueue:
        key = reactor.index if reactor is not None else -1
        rq = self.queues.get(key)
        if rq is None:
            q = self.ctrlr.create_io_queue(owner=reactor)
            # on a reactor the poller runs right after this loop turn (kick), so
            # submissions of one turn share one doorbell write
            q.batch_doorbells = reactor is not None and self.params.get("delay_cmd_submit",
                                                                        True)
            rq = ReactorQueue(self, reactor, q)
            if reactor is not None:
                rq.poller = reactor.register_poller(rq.poll, f"nvme_{self.name}_q{q.qid}")
                rq.start_ticking()
                rq.watch_irq()
            self.queues[key] = rq
            log.info("%s: I/O queue %d (depth %d) on reactor %s", self.name, q.qid, q.depth,
                     key)
        rq.refs += 1
        return rq

    def release_queue(self, reactor: Reactor | None, rq: ReactorQueue) -> None:
        rq.refs -= 1
        if rq.refs > 0:
            return
        key = reactor.index if reactor is not None else -1
        if self.queues.get(key) is rq:
            del self.queues[key]
        for k in _COUNTERS:
            self._retired_counts[k] = self._retired_counts.get(k, 0) + getattr(rq, k)
        if rq.net_poller is not None:
            rq.net_poller.drop_nvmeq(rq)
        rq.unwatch_irq()
        if rq.poller is not None and reactor is not None:
            reactor.unregister_poller(rq.poller)
            rq.poller = None
        rq.stop_ticking()
        # let commands in flight finish before the queue goes (bounded wait)
        deadline = time.monotonic() + 5
        rq.q.flush_doorbell()
        while rq.q.outstanding and not self.ctrlr.removed and time.monotonic() < deadline:
            rq.q.process_completions()
            time.sleep(0.0001)
        rq.fail_waiters(Status.ABORTED_SQ_DELETION)
        if not self.ctrlr.closed:
            self.ctrlr.delete_io_queue(rq.q)

    # ---- lifecycle ----
    async def reset(self) -> None:
        await self.ctrlr.reset()

    async def hot_removed(self) -> None:
        """The device is gone: take its namespaces out of subsystems, drop its bdevs,
        close the device so the kernel can complete the removal."""
        log.error("%s: hot-removed; unregistering %s", self.name,
                  ", ".join(b.name for b in self.bdevs))
        target = self.target
        if target is not None:
            for b in list(self.bdevs):
                for sub in list(target.subsystems):
                    for ns in list(sub.ns_list()):
                        if ns.bdev is b:
                            try:
                                await target.remove_namespace(sub, ns.nsid)
                            except RpcError as exc:
                                log.warning("%s: removing namespace %d of %s: %s", self.name,
                                            ns.nsid, sub.nqn, exc)
        await self.detach(force=True)

    async def detach(self, *, force: bool = False) -> None:
        if self.detached:
            return
        target = self.target
        if target is not None and not force:
            for b in self.bdevs:
                if b.claimed_by is not None:
                    raise Busy(f"bdev '{b.name}' is in use by {b.claimed_by}; remove that first")
        self.detached = True
        _CONTROLLERS.pop(self.name, None)
        for b in list(self.bdevs):
            if target is not None and target.bdevs.find(b.name) is b:
                if b.claimed_by is not None:
                    continue  # a claimant still holds it: it fails I/O until released
                target.bdevs.remove(b)
                if target.started:
                    await target.reactors.broadcast(b.close_channel)
                b.close_channel(None)
        await asyncio.to_thread(self._close_ctrlr)

    def _close_ctrlr(self) -> None:
        for rq in list(self.queues.values()):
            rq.fail_waiters(Status.ABORTED_SQ_DELETION)
        self.queues.clear()
        self.ctrlr.close()
        log.info("%s: detached from %s", self.name, self.traddr)

    def bdev_destroyed(self, bdev: NvmeNsBdev) -> None:
        """The target is shutting down (or the bdev was deleted): the last bdev closes
        the controller, so the device is left shut down cleanly."""
        if bdev in self.bdevs:
            self.bdevs.remove(bdev)
        if not self.bdevs and not self.detached:
            self.detached = True
            _CONTROLLERS.pop(self.name, None)
            self._close_ctrlr()


def _then_kick(reactor: Reactor, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` followed (on the reactor's thread) by a kick of its reactor."""

    def run() -> Any:
        try:
            return fn()
        finally:
            reactor.kick()

    return run


def _kick_if_here(reactor: Reactor | None) -> None:
    """Kick a reactor that is not running as a thread of its own (tests drive its loop
    on theirs) when called on its loop's thread; the reactor-less queue needs none."""
    if reactor is not None and reactor.loop is not None and not reactor.loop.is_closed() \
            and reactor.on_reactor():
        reactor.kick()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("nvme controller task failed: %s", task.exception())


_CONTROLLERS: dict[str, PcieController] = {}


# ---------------------------------------------------------------------------
# attach / detach (RPC entry points)

ATTACH_SCHEMA = Schema(
    (
        Param("name", str, required=True, check=non_empty),
        Param("trtype", str, default="pcie"),
        Param("traddr", str, required=True, check=non_empty),
        Param("io_queue_size", int, check=positive, help="entries per I/O queue (default 128)"),
        Param("io_timeout_ms", int, check=positive, help="per-command timeout (default 30000)"),
        Param("admin_timeout_ms", int, check=positive),
        Param("action_on_timeout", str, choices=("abort", "reset", "none")),
        Param("max_transfer_kb", int, check=positive,
              help="cap on one NVMe command's data (default 128; MDTS also applies)"),
        Param("hugepages", bool, default=True, help="false: 4 KiB pages (IOMMU needed)"),
        Param("delay_cmd_submit", bool, default=True,
              help="batch SQ doorbell writes per reactor poll (SPDK's option of this name)"),
        Param("interrupts", bool, default=False,
              help="I/O queues raise MSI-X completion interrupts the reactor sleeps on "
                   "while commands are at the device, where the device offers vectors "
                   "(default false: polled, which served QD32 better and QD1 as well "
                   "in the guest's measurements)"),
    ),
    # sent by SPDK's rpc.py or found in SPDK configs; meaningless for a local controller
    extra_ok=frozenset({"adrfam", "trsvcid", "subnqn", "hostnqn", "hostid", "hostaddr",
                        "hostsvcid", "hdgst", "ddgst", "multipath", "ctrlr_loss_timeout_sec", "reconnect_delay_sec",
                        "fast_io_fail_timeout_sec", "priority", "num_io_queues", "max_bdevs",
                        "allow_unrecognized_csi", "multipath_opts"}),
    refused={"prchk_reftag": "end-to-end protection information (DIF/DIX) is not implemented", "prchk_guard": "end-to-end protection information (DIF/DIX) is not implemented"},
)


def _options(params: dict[str, Any]) -> Options:
    o = Options()
    if params.get("io_queue_size"):
        o.io_queue_depth = params["io_queue_size"]
    if params.get("io_timeout_ms"):
        o.io_timeout_s = params["io_timeout_ms"] / 1000
    if params.get("admin_timeout_ms"):
        o.admin_timeout_s = params["admin_timeout_ms"] / 1000
    if params.get("action_on_timeout"):
        o.action_on_timeout = params["action_on_timeout"]
    if params.get("max_transfer_kb"):
        kb = params["max_transfer_kb"]
        if kb < 4 or kb & (kb - 1):
            raise InvalidParams("parameter 'max_transfer_kb' must be a power of two >= 4")
        o.max_transfer = kb * 1024
    o.interrupts = params.get("interrupts", False)
    return o


async def attach_pcie(target: Target | None, params: dict[str, Any]) -> list[str]:
    """Attach the PCIe controller at ``traddr`` and register ``<name>n<nsid>`` bdevs.

    Returns the bdev names (SPDK's bdev_nvme_attach_controller result).
    """
    name = params["name"]
    if str(params.get("trtype", "pcie")).lower() != "pcie":
        raise InvalidParams("attach_pcie handles trtype 'pcie' only")
    if name in _CONTROLLERS:
        raise AlreadyExists(f"NVMe controller '{name}' already exists")
    from ..nvme.driver.pci import normalize_bdf

    try:
        bdf = normalize_bdf(params["traddr"])
    except ValueError as exc:
        raise InvalidParams(f"parameter 'traddr': {exc}") from None
    for c in _CONTROLLERS.values():
        if c.traddr == bdf:
            raise AlreadyExists(f"{bdf} is already attached as '{c.name}'")
    opts = _options(params)
    nreactors = len(target.reactors) if target is not None else 1
    try:
        ctrlr = await asyncio.to_thread(open_pcie, bdf, name=name, options=opts,
                                        io_queues=nreactors,
                                        use_hugepages=params.get("hugepages", True))
    except OSError as exc:
        raise RpcError(f"cannot attach {bdf}: {exc.strerror or exc}",
                       -(exc.errno or 19)) from None
    except DmaError as exc:  # the message says how much, what is free, and the knob
        raise RpcError(f"cannot attach {bdf}: {exc}", -errno.ENOMEM) from None
    except Exception as exc:
        raise RpcError(f"cannot attach {bdf}: {exc}") from None
    return await register_controller(target, name, bdf, ctrlr, dict(params, traddr=bdf))


async def register_controller(target: Target | None, name: str, traddr: str,
                              ctrlr: Controller, params: dict[str, Any]) -> list[str]:
    """Wrap a brought-up controller and register its namespaces as bdevs (split from
    attach_pcie so tests can hand in a controller that is not behind VFIO)."""
    wrapper = PcieController(target, name, traddr, ctrlr, params)
    wrapper.loop = asyncio.get_running_loop()
    io_types = {IOType.READ, IOType.WRITE, IOType.FLUSH}
    if ctrlr.oncs & ONCS_WRITE_ZEROES:
        io_types.add(IOType.WRITE_ZEROES)
    if ctrlr.oncs & ONCS_DSM:
        io_types.add(IOType.UNMAP)
    bdevs: list[NvmeNsBdev] = []
    used: set[str] = {x.uuid for x in target.bdevs} if target is not None else set()
    for nsid, ns in sorted(ctrlr.namespaces.items()):
        uuid = _uuid_from(ns)
        if uuid in used:  # a device with duplicate NGUIDs must not block the attach
            uuid = ""
        used.add(uuid)
        b = NvmeNsBdev(
            name=f"{name}n{nsid}", block_size=ns.block_size, num_blocks=ns.num_blocks,
            uuid=uuid, product_name="NVMe disk", module="nvme",
            write_cache=ctrlr.volatile_write_cache, io_types=frozenset(io_types),
            create_method="bdev_nvme_attach_controller",
        )  # fmt: skip
        b.owner = wrapper
        b.ns = ns
        bdevs.append(b)
    wrapper.bdevs = list(bdevs)
    _CONTROLLERS[name] = wrapper
    added: list[NvmeNsBdev] = []
    try:
        if target is not None:
            for b in bdevs:
                target.bdevs.add(b)
                added.append(b)
    except RpcError:
        for b in added:
            target.bdevs.remove(b)  # type: ignore[union-attr]
        _CONTROLLERS.pop(name, None)
        await asyncio.to_thread(ctrlr.close)
        raise
    log.info("%s: attached %s (%s), bdevs %s", name, traddr, ctrlr.ident.get("mn", ""),
             [b.name for b in bdevs])
    return [b.name for b in bdevs]


def _uuid_from(ns: Namespace) -> str:
    """Namespaces with an NGUID keep a stable bdev UUID across attaches (hosts see the
    same namespace identity after a target restart)."""
    import uuid

    if ns.nguid and any(ns.nguid):
        return str(uuid.UUID(bytes=bytes(ns.nguid)))
    return ""


def get_controller(name: str) -> PcieController:
    c = _CONTROLLERS.get(name)
    if c is None:
        raise NoSuchDevice(f"no NVMe PCIe controller named '{name}'")
    return c


async def detach_pcie(target: Target | None, name: str) -> None:
    await get_controller(name).detach()


async def reset_pcie(target: Target | None, name: str) -> None:
    c = get_controller(name)
    try:
        await c.reset()
    except Exception as exc:
        raise RpcError(f"reset of '{name}' failed: {exc}") from None


def controllers() -> list[PcieController]:
    return list(_CONTROLLERS.values())
