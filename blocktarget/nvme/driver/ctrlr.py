"""An NVMe controller driven from user space: bring-up, queues, Abort, reset, removal.

Bring-up follows the spec's initialization sequence (NVMe 2.0, 3.5.1) as Linux and SPDK
do it: wait out a pending enable, disable (CC.EN=0, CSTS.RDY=0 within CAP.TO), program
the admin queue (AQA/ASQ/ACQ), enable with our CC (4 KiB pages, 64/16-byte entries, NVM
command set), Identify Controller, Set Features Number of Queues, Identify the active
namespaces. I/O queue pairs are created later, one per reactor, on that reactor: the CQ
first, then its SQ (deletion in reverse).

Admin commands are synchronous: submit under the admin lock and poll the admin CQ until
the completion or the admin timeout. They are rare (bring-up, queue creation, Abort,
reset), come from several threads (each reactor creates its own queue), and a lock plus
a short poll is simpler and cheaper than an admin poller on every reactor.

Timeouts: every command has a deadline. The owning reactor's poller calls
:meth:`Controller.tick` a few times a second; a command past its deadline gets an
Abort, and if it is still outstanding after a second grace period (or the Abort itself
fails) the controller is reset: every queue is suspended, the controller disabled and
re-enabled, the queues re-created on their reactors and the swallowed commands
re-submitted (see qpair). CSTS.CFS (fatal status) also triggers a reset.

Hot-remove: a register read of all ones means the device is gone; with VFIO the kernel
also asks for the device back through an eventfd before removing it (``echo 1 > remove``,
unbind). Either way every outstanding command fails with ABORTED_SQ_DELETION and the
owner is told (``on_removed``) so it can unregister the bdevs and close the device, which
lets the kernel finish the removal.

Threads: a queue pair belongs to the thread that created it. Steps that must run on
every queue's own thread (suspend, re-create, fail) go through ``call``/``post``
callables the owner supplies (the nvme bdev passes reactor messages); by default they run
inline, which is right for single-threaded users (tests, the benchmark).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import spec, structs
from . import cring
from .dma import HUGEPAGE_SIZE, PAGE_SIZE, BufferPool, DmaAllocator, DmaBuffer, DmaError
from .qpair import (
    CQE_SIZE,
    SC_ABORTED_SQ_DELETION,
    SQE_SIZE,
    STATUS_MASK,
    QueuePair,
    build_prps,
    prp_list_align,
    prp_list_size,
    wait_for,
)
from .regs import (
    CC_EN,
    CC_SHN_MASK,
    CC_SHN_NORMAL,
    CSTS,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_COMPLETE,
    CSTS_SHST_MASK,
    Capabilities,
    DeviceRemoved,
    Registers,
    Version,
    cq_head_doorbell,
    describe_csts,
    make_cc,
    sq_tail_doorbell,
)

log = logging.getLogger(__name__)

ADMIN_DEPTH = 32
DEFAULT_MAX_TRANSFER = 128 * 1024
TICK_INTERVAL_S = 0.1

ONCS_COMPARE = 1 << 0
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
VWC_PRESENT = 1 << 0

OwnerCall = Callable[[QueuePair, Callable[[], Any]], Awaitable[Any]]
OwnerPost = Callable[[QueuePair, Callable[[], Any]], None]


class ControllerError(RuntimeError):
    """Bring-up or an admin step failed; the message says which and why."""


class NvmeError(ControllerError):
    def __init__(self, what: str, status: int) -> None:
        self.status = status
        super().__init__(f"{what} failed: {spec.status_name(status)} (status {status:#x})")


@dataclass
class Namespace:
    nsid: int
    block_size: int
    num_blocks: int
    nguid: bytes = b""
    eui64: bytes = b""
    ident: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.num_blocks


@dataclass
class Options:
    admin_depth: int = ADMIN_DEPTH
    io_queue_depth: int = 128
    admin_timeout_s: float = 30.0
    io_timeout_s: float = 30.0
    max_transfer: int = DEFAULT_MAX_TRANSFER
    action_on_timeout: str = "abort"  # "abort" (then reset), "reset", "none"
    max_resubmits: int = 3
    # I/O queues keep their ring state in C, shared with the NVMe/TCP C lane
    # (driver/cring.py), where the lane is built and the BAR is mapped memory
    c_ring: bool = True
    # I/O completion queues raise MSI-X interrupts, delivered as eventfds the reactor's
    # C poller sleeps on while lane commands are at the device (instead of timed
    # slices), where the device offers a vector per queue. Off by default: polled did
    # as well at QD1 and better at QD32 in every guest run (an interrupt per completion
    # batch wakes the reactor for each; bench/RESULTS.md), as SPDK's drivers poll.
    interrupts: bool = False


async def _inline_call(qp: QueuePair, fn: Callable[[], Any]) -> Any:
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result


def _inline_post(qp: QueuePair, fn: Callable[[], Any]) -> None:
    fn()


class IoQueue(QueuePair):
    """An I/O queue pair plus its data buffer pool (both owned by one reactor)."""

    pool: BufferPool
    owner: Any = None
    max_transfer: int = DEFAULT_MAX_TRANSFER
    # the eventfd its CQ's MSI-X vector signals (vector = qid), or -1: polled only
    irq_efd: int = -1

    def get_buffer(self) -> DmaBuffer | None:
        buf = self.pool.get()
        size = prp_list_size(buf.size) if buf is not None else 0
        if buf is not None and buf.prp_list is None and size:
            buf.prp_list = self.allocator.alloc(size, prp_list_align(size))
            build_prps(buf.iova, buf.size, buf.prp_list)
        return buf

    def put_buffer(self, buf: DmaBuffer) -> None:
        self.pool.put(buf)

    def free(self) -> None:
        super().free()
        pool = getattr(self, "pool", None)  # (none yet when creation failed early)
        if pool is not None:
            pool.release()


def buffer_prps(buf: DmaBuffer, length: int) -> tuple[int, int]:
    """PRP1/PRP2 for the first ``length`` bytes of a page-aligned pool buffer whose list
    was precomputed: the per-I/O cost is one comparison."""
    if length <= PAGE_SIZE:
        return buf.iova, 0
    if length <= 2 * PAGE_SIZE:
        return buf.iova, buf.iova + PAGE_SIZE
    assert buf.prp_list is not None
    return buf.iova, buf.prp_list.iova


class Controller:
    """One NVMe controller behind an MMIO window and an IOMMU-mapped allocator."""

    def __init__(
        self,
        mmio: Any,
        allocator: DmaAllocator,
        *,
        name: str = "nvme",
        options: Options | None = None,
        device: Any = None,
    ) -> None:
        self.name = name
        self.mmio = mmio
        self.regs = Registers(mmio)
        self.allocator = allocator
        self.opts = options or Options()
        self.device = device  # vfio.Device when attached over VFIO (closed by close())
        self.cap: Capabilities | None = None
        self.vs: Version | None = None
        self.ident: dict[str, Any] = {}
        self.namespaces: dict[int, Namespace] = {}
        self.admin_q: QueuePair | None = None
        self.io_queues: list[IoQueue] = []
        self.nr_io_queues = 0
        self._free_qids: list[int] = []
        self._admin_lock = threading.RLock()
        self.max_transfer = self.opts.max_transfer
        self.resetting = False
        self.removed = False
        self.failed = False
        self.resets = 0
        self.last_reset: dict[str, Any] = {}
        self.aborts_sent = 0
        self._aborts_outstanding = 0
        self._abort_limit = 1  # ACL + 1 once Identify has run
        self.timeouts = 0
        self.closed = False
        # owner hooks (the nvme bdev sets these to reactor messages / main-loop tasks)
        self.call: OwnerCall = _inline_call
        self.post: OwnerPost = _inline_post
        self.on_reset_needed: Callable[[Controller, str], None] | None = None
        self.on_removed: Callable[[Controller], None] | None = None
        self._reset_requested = False
        self._reset_done: asyncio.Event | None = None
        # MSI-X vectors' eventfds (index = vector = qid; 0 is the admin queue's, unread)
        self.irq_efds: list[int] = []

    # ------------------------------------------------------------------ bring-up
    @property
    def stride(self) -> int:
        assert self.cap is not None
        return self.cap.doorbell_stride

    def init(self, io_queues: int = 1) -> None:
        """Disable, program the admin queue, enable, identify, ask for ``io_queues``."""
        self.cap = self.regs.cap()
        self.vs = self.regs.vs()
        cap = self.cap
        if not cap.css & 1:
            raise ControllerError(f"{self.name}: controller lacks the NVM command set "
                                  f"(CAP.CSS={cap.css:#x})")
        if not cap.mpsmin <= PAGE_SIZE <= cap.mpsmax:
            raise ControllerError(f"{self.name}: 4 KiB memory pages unsupported "
                                  f"(MPSMIN {cap.mpsmin}, MPSMAX {cap.mpsmax})")
        log.info("%s: NVMe %s, CAP %#018x (MQES %d, TO %d ms, DSTRD %d)", self.name, self.vs,
                 cap.raw, cap.mqes, cap.timeout_ms, cap.dstrd)
        self._disable()
        depth = min(self.opts.admin_depth, cap.max_queue_entries)
        self.admin_q = QueuePair(self.mmio, 0, depth, self.stride, self.allocator,
                                 timeout_s=self.opts.admin_timeout_s, max_resubmits=0,
                                 name=f"{self.name}-admin")
        self._program_admin()
        self._enable()
        self._identify()
        self._set_num_queues(io_queues)
        self._enable_interrupts(io_queues)
        self._scan_namespaces()
        # all the DMA memory the I/O queues will use, now: a short hugepage pool fails
        # the attach that asked, with the amount in the message, not an I/O later
        nq = min(max(1, io_queues), self.nr_io_queues)
        need = self.io_dma_bytes(nq)
        try:
            self.allocator.reserve(need)
        except DmaError as exc:
            depth = min(self.opts.io_queue_depth, self.cap.max_queue_entries)
            raise DmaError(f"{exc} ({nq} I/O queue(s), one per reactor, of {depth - 1} "
                           f"commands with a {self.max_transfer >> 10} KiB buffer each; "
                           "io_queue_size and max_transfer_kb make that less)") from None
        log.info("%s: %d KiB of DMA memory reserved for %d I/O queue(s)", self.name,
                 need >> 10, nq)

    def _enable_interrupts(self, io_queues: int) -> None:
        """MSI-X vectors for the admin queue (0) and the first I/O queues (qid raises
        vector qid): one per reactor and one for the control plane's queue (the queues
        this attach will create; a controller may grant far more), when the options want
        them and the device offers them; a queue beyond, or every queue when vfio-pci
        refuses, stays polled (logged: a slower wait, never a failure)."""
        dev = self.device
        if not self.opts.interrupts or dev is None or not hasattr(dev, "enable_msix"):
            return
        want = min(max(1, io_queues) + 1, self.nr_io_queues) + 1
        have = dev.msix_vectors()
        if have < 2:
            log.info("%s: no MSI-X vectors for I/O queues: completions are polled", self.name)
            return
        try:
            self.irq_efds = dev.enable_msix(min(want, have))
        except OSError as exc:
            log.warning("%s: MSI-X refused (%s): completions are polled", self.name, exc)
            return
        log.info("%s: %d MSI-X vector(s): I/O queues 1-%d raise completion interrupts",
                 self.name, len(self.irq_efds), len(self.irq_efds) - 1)

    def io_dma_bytes(self, nqueues: int) -> int:
        """The most DMA memory ``nqueues`` I/O queues take from the allocator: both
        rings, and a full buffer pool (one ``max_transfer`` buffer per command slot, as
        create_io_queue sizes it) with each buffer's PRP list, alignment padding of the
        allocator's bump pointer included."""
        assert self.cap is not None
        depth = min(self.opts.io_queue_depth, self.cap.max_queue_entries)
        rings = sum(-(-n // PAGE_SIZE) * PAGE_SIZE + PAGE_SIZE
                    for n in (depth * SQE_SIZE, depth * CQE_SIZE))
        slots = depth - 1
        prp = prp_list_size(self.max_transfer)
        per_buf = self.max_transfer + (prp + prp_list_align(prp) if prp else 0)
        grow_by = max(1, HUGEPAGE_SIZE // self.max_transfer)  # BufferPool's chunk
        chunks = -(-slots // grow_by)
        # (with the ring state in C, the C lane's share of the slots has buffers of its
        # own, each with a page of headroom and one of tail room)
        lane = (cring.lane_cids(depth) * cring.LANE_BUF_EXTRA
                if self.opts.c_ring and cring.available(self.mmio) else 0)
        return nqueues * (rings + slots * per_buf + chunks * PAGE_SIZE + lane)

    def _wait_csts(self, want: Callable[[int], bool], what: str, timeout_ms: int) -> int:
        deadline = time.monotonic() + max(timeout_ms, 500) / 1000
        while True:
            csts = self.regs.csts()  # raises DeviceRemoved
            if want(csts):
                return csts
            if time.monotonic() > deadline:
                raise ControllerError(f"{self.name}: timed out after {timeout_ms} ms waiting "
                                      f"for {what}; CSTS {describe_csts(csts)}")
            time.sleep(0.001)

    def _disable(self) -> None:
        assert self.cap is not None
        cc = self.regs.cc()
        csts = self.regs.csts()
        to = self.cap.timeout_ms
        if cc & CC_EN and not csts & CSTS_RDY and not csts & CSTS_CFS:
            # an enable is in progress: the spec forbids clearing EN until RDY follows
            self._wait_csts(lambda c: bool(c & (CSTS_RDY | CSTS_CFS)), "CSTS.RDY=1", to)
        if cc & CC_EN:
            self.regs.set_cc(cc & ~CC_EN)
        self._wait_csts(lambda c: not c & CSTS_RDY, "CSTS.RDY=0 after CC.EN=0", to)

    def _program_admin(self) -> None:
        q = self.admin_q
        assert q is not None
        self.regs.set_admin_queues(q.sq.iova, q.cq.iova, q.depth, q.depth)

    def _enable(self) -> None:
        assert self.cap is not None
        self.regs.set_cc(make_cc(enable=True, page_size=PAGE_SIZE))
        csts = self._wait_csts(lambda c: bool(c & (CSTS_RDY | CSTS_CFS)), "CSTS.RDY=1",
                               self.cap.timeout_ms)
        if csts & CSTS_CFS:
            raise ControllerError(f"{self.name}: controller fatal status while enabling "
                                  f"(CSTS {describe_csts(csts)})")

    # ------------------------------------------------------------------ admin
    def admin(self, opcode: int, nsid: int = 0, *, data: DmaBuffer | None = None,
              length: int = 0, prp1: int | None = None, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0,
              cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, check: bool = True,
              timeout_s: float | None = None) -> tuple[int, int]:
        """Run one admin command to completion; returns (status, dw0).

        Raises NvmeError on a failed status (unless ``check`` is False), ControllerError
        on a timeout (and asks for a reset), DeviceRemoved when the device is gone.
        """
        if self.removed:
            raise DeviceRemoved(f"{self.name}: device removed")
        q = self.admin_q
        assert q is not None
        prp2 = 0
        if prp1 is None:
            prp1 = 0
            if data is not None:
                prp1, prp2 = build_prps(data.iova, length or data.size, data.prp_list)
        result: list[int] = []

        def cb(status: int, dw0: int) -> None:
            result.extend((status, dw0))

        name = _admin_name(opcode)
        with self._admin_lock:
            q.submit(opcode, nsid, prp1=prp1, prp2=prp2, cdw10=cdw10, cdw11=cdw11,
                     cdw12=cdw12, cdw13=cdw13, cdw14=cdw14, cdw15=cdw15, cb=cb)
            ok = wait_for(q, lambda: bool(result), timeout_s or self.opts.admin_timeout_s,
                          self._check_alive)
        if not ok:
            self.request_reset(f"admin {name} timed out")
            raise ControllerError(f"{self.name}: admin command {name} timed out")
        status, dw0 = result
        if status == SC_ABORTED_SQ_DELETION and self.removed:
            raise DeviceRemoved(f"{self.name}: device removed during {name}")
        if check and status:
            raise NvmeError(f"{self.name}: {name}", status)
        return status, dw0

    def _check_alive(self) -> None:
        if self.removed:
            raise DeviceRemoved(f"{self.name}: device removed")
        if self.regs.removed():
            self._device_gone("registers read all ones")
            raise DeviceRemoved(f"{self.name}: device removed")

    def _identify(self) -> None:
        buf = self.allocator.alloc(spec.IDENTIFY_DATA_SIZE)
        try:
            self.admin(spec.AdminOpcode.IDENTIFY, data=buf, cdw10=spec.Cns.CTRL)
            self.ident = structs.parse_identify_ctrl(bytes(buf.mem))
        finally:
            self.allocator.free(buf)
        assert self.cap is not None
        self._abort_limit = self.ident["acl"] + 1
        mdts = self.ident["mdts"]
        if mdts:
            self.max_transfer = min(self.opts.max_transfer, self.cap.mpsmin << mdts)
        # a PRP list page holds 511 entries + a chain pointer; we stay within 2 MiB
        self.max_transfer = max(PAGE_SIZE, min(self.max_transfer, 2 << 20))
        log.info("%s: %s SN %s FW %s, MDTS %d (max transfer %d KiB), %d namespace(s), "
                 "ONCS %#x, VWC %#x", self.name, self.ident["mn"], self.ident["sn"],
                 self.ident["fr"], mdts, self.max_transfer >> 10, self.ident["nn"],
                 self.ident["oncs"], self.ident["vwc"])

    def _set_num_queues(self, want: int) -> None:
        want = max(1, want)
        _, dw0 = self.admin(spec.AdminOpcode.SET_FEATURES, cdw10=spec.FeatureId.NUM_QUEUES,
                            cdw11=(want - 1) << 16 | (want - 1))
        got = min(dw0 & 0xFFFF, dw0 >> 16) + 1
        self.nr_io_queues = got
        in_use = {q.qid for q in self.io_queues}
        self._free_qids = [q for q in range(got, 0, -1) if q not in in_use]
        if got < want:
            log.warning("%s: asked for %d I/O queues, controller grants %d", self.name, want,
                        got)

    def _scan_namespaces(self) -> None:
        assert self.vs is not None
        nn = self.ident["nn"]
        buf = self.allocator.alloc(spec.IDENTIFY_DATA_SIZE)
        try:
            if self.vs.at_least(1, 1):
                self.admin(spec.AdminOpcode.IDENTIFY, data=buf, cdw10=spec.Cns.ACTIVE_NS_LIST)
                nsids = structs.parse_ns_list(bytes(buf.mem))
            else:
                nsids = list(range(1, nn + 1))
            found: dict[int, Namespace] = {}
            for nsid in nsids:
                self.admin(spec.AdminOpcode.IDENTIFY, nsid, data=buf, cdw10=spec.Cns.NS)
                ident = structs.parse_identify_ns(bytes(buf.mem))
                if not ident["nsze"]:
                    continue
                fmt = ident["lbaf"][structs.flbas_index(ident["flbas"])]
                if fmt.ms:
                    log.warning("%s: namespace %d has %d bytes of metadata per block: not "
                                "supported, skipped", self.name, nsid, fmt.ms)
                    continue
                found[nsid] = Namespace(nsid, 1 << fmt.lbads, ident["nsze"], ident["nguid"],
                                        ident["eui64"], ident)
            self.namespaces = found
        finally:
            self.allocator.free(buf)

    @property
    def oncs(self) -> int:
        return int(self.ident.get("oncs", 0))

    @property
    def volatile_write_cache(self) -> bool:
        return bool(self.ident.get("vwc", 0) & VWC_PRESENT)

    # ------------------------------------------------------------------ I/O queues
    def create_io_queue(self, depth: int | None = None, owner: Any = None) -> IoQueue:
        """Create an I/O CQ+SQ pair; call on the thread that will poll it."""
        assert self.cap is not None
        depth = min(depth or self.opts.io_queue_depth, self.cap.max_queue_entries)
        with self._admin_lock:
            if not self._free_qids:
                raise ControllerError(f"{self.name}: no I/O queue left (controller granted "
                                      f"{self.nr_io_queues})")
            qid = self._free_qids.pop()
        try:
            q = IoQueue(self.mmio, qid, depth, self.stride, self.allocator,
                        timeout_s=self.opts.io_timeout_s,
                        max_resubmits=self.opts.max_resubmits, name=f"{self.name}-q{qid}")
        except BaseException:
            with self._admin_lock:
                self._free_qids.append(qid)
            raise
        q.owner = owner
        q.max_transfer = self.max_transfer
        if qid < len(self.irq_efds):
            q.irq_efd = self.irq_efds[qid]
        py_cids = depth - 1
        try:
            if self.opts.c_ring and cring.available(self.mmio):
                lanes = cring.lane_cids(depth)
                py_cids -= lanes
                cr = cring.CRing(q.sq, q.cq, depth, py_cids,
                                 self.mmio.doorbell_addr(sq_tail_doorbell(qid, self.stride)),
                                 self.mmio.doorbell_addr(cq_head_doorbell(qid, self.stride)),
                                 self.max_transfer)
                cr.add_buffers(self.allocator, lanes, self.max_transfer)
                # a device model that completes commands at their doorbell offers its
                # entry point (tests/unit/cfake_nvme.py, sync); a real BAR has none
                hook = getattr(self.mmio, "sq_doorbell_hook", None)
                addrs = hook() if hook is not None else None
                if addrs is not None:
                    cr.set_doorbell_hook(*addrs)
                cr.c.irq_efd = q.irq_efd
                q.attach_cring(cr)
        except BaseException:
            q.free()
            with self._admin_lock:
                self._free_qids.append(qid)
            raise
        q.pool = BufferPool(self.allocator, self.max_transfer, py_cids)
        try:
            self._create_on_device(q)
        except BaseException:
            q.free()
            with self._admin_lock:
                self._free_qids.append(qid)
            raise
        with self._admin_lock:
            self.io_queues.append(q)
        return q

    def _create_on_device(self, q: QueuePair) -> None:
        size = (q.depth - 1) << 16 | q.qid
        # PC=1 (physically contiguous: one IOVA range; only PRP1 is used, the ring's
        # base); IEN=1 with IV=qid where the queue has a vector, else IEN=0 (polled)
        irq = getattr(q, "irq_efd", -1) >= 0
        cdw11 = q.qid << 16 | 2 | 1 if irq else 1
        self.admin(spec.AdminOpcode.CREATE_IO_CQ, cdw10=size, cdw11=cdw11, prp1=q.cq.iova)
        try:
            self.admin(spec.AdminOpcode.CREATE_IO_SQ, cdw10=size, cdw11=q.qid << 16 | 1,
                       prp1=q.sq.iova)
        except BaseException:
            self.admin(spec.AdminOpcode.DELETE_IO_CQ, cdw10=q.qid, check=False)
            raise

    def delete_io_queue(self, q: IoQueue) -> None:
        """Delete SQ then CQ, fail what is left, free the rings (owner stopped polling)."""
        with self._admin_lock:
            if q in self.io_queues:
                self.io_queues.remove(q)
        if not self.removed and not self.failed:
            try:
                self.admin(spec.AdminOpcode.DELETE_IO_SQ, cdw10=q.qid, check=False,
                           timeout_s=5)
                self.admin(spec.AdminOpcode.DELETE_IO_CQ, cdw10=q.qid, check=False,
                           timeout_s=5)
            except (ControllerError, OSError) as exc:
                log.warning("%s: deleting queue %d: %s", self.name, q.qid, exc)
        q.fail_all(SC_ABORTED_SQ_DELETION)
        with self._admin_lock:
            self._free_qids.append(q.qid)
        q.free()

    # ------------------------------------------------------------------ health
    def tick(self, q: IoQueue, now: float | None = None) -> None:
        """Called by the owner of ``q`` every ~100 ms: removal, fatal status, timeouts."""
        if self.removed or self.closed:
            return
        try:
            if self.device is not None and self.device.release_requested():
                self._device_gone("the kernel asked for the device back (remove/unbind)")
                return
            csts = self.mmio.read32(CSTS)
        except OSError:
            return
        if csts == 0xFFFFFFFF:
            self._device_gone("registers read all ones")
            return
        if self.resetting or q.suspended:
            return
        if csts & CSTS_CFS:
            self.request_reset("controller fatal status (CSTS.CFS)")
            return
        now = time.monotonic() if now is None else now
        action = self.opts.action_on_timeout
        for tr in q.trackers:
            if not tr.active or tr.deadline >= now:
                continue
            if action == "none":
                continue
            if tr.aborting or action == "reset":
                self.request_reset(f"command {tr.cid} on queue {q.qid} still outstanding "
                                   "after its timeout" + (" and an Abort" if tr.aborting else ""))
                return
            if not self._send_abort(q, tr, now):
                return  # admin queue busy or the abort limit reached: try on the next tick
        cr = q.cring
        if cr is not None and action != "none":
            # the C lane's commands: the same rule, their clock kept in C
            for cid, aborting in cr.expired(cr.now_ns() - int(self.opts.io_timeout_s * 1e9)):
                if aborting or action == "reset":
                    self.request_reset(f"command {cid} on queue {q.qid} still outstanding "
                                       "after its timeout" + (" and an Abort" if aborting
                                                              else ""))
                    return
                if not self._send_abort(q, _LaneCommand(cid), now):
                    return
                cr.aborting(cid)
        self.poll_admin()

    def _send_abort(self, q: IoQueue, tr: Any, now: float) -> bool:
        """Submit an Abort for ``tr`` without waiting for it.

        The caller is a reactor's poller: waiting here (up to seconds for a sick
        controller) would stall every connection on that reactor. The Abort's completion
        is reaped by :meth:`poll_admin` on a later tick; whether or not the controller
        found the command, the tracker's new deadline decides: still outstanding then
        means a reset. At most ACL+1 Aborts are outstanding, as the controller allows.
        """
        if self._aborts_outstanding >= self._abort_limit:
            return False
        if not self._admin_lock.acquire(blocking=False):
            return False
        try:
            admin_q = self.admin_q
            if admin_q is None:
                return False
            cid, qid = tr.cid, q.qid
            tr.aborting = True
            q.timeouts += 1
            self.timeouts += 1
            tr.deadline = now + self.opts.io_timeout_s
            log.warning("%s: command %d on queue %d timed out after %.1f s; aborting",
                        self.name, cid, qid, self.opts.io_timeout_s)

            def done(status: int, dw0: int) -> None:
                self._aborts_outstanding -= 1
                if status or dw0 & 1:
                    log.info("%s: Abort of command %d on queue %d: %s", self.name, cid, qid,
                             f"status {status:#x}" if status else "not aborted by the controller")

            self._aborts_outstanding += 1
            self.aborts_sent += 1
            admin_q.submit(spec.AdminOpcode.ABORT, cdw10=cid << 16 | qid, cb=done)
            admin_q.flush_doorbell()
            return True
        finally:
            self._admin_lock.release()

    def poll_admin(self) -> None:
        """Reap admin completions nobody waits for synchronously (Aborts), if the admin
        queue is free; a thread inside :meth:`admin` reaps them itself otherwise."""
        admin_q = self.admin_q
        if admin_q is None or not self._aborts_outstanding:
            return
        if self._admin_lock.acquire(blocking=False):
            try:
                admin_q.process_completions()
            finally:
                self._admin_lock.release()

    def _device_gone(self, why: str) -> None:
        if self.removed:
            return
        self.removed = True
        log.error("%s: device removed (%s); failing all I/O", self.name, why)
        for q in list(self.io_queues):
            self.post(q, lambda q=q: q.fail_all(SC_ABORTED_SQ_DELETION))
        # an admin waiter notices `removed` in its liveness check and gives up
        if self.on_removed is not None:
            self.on_removed(self)

    # ------------------------------------------------------------------ reset
    def request_reset(self, reason: str) -> None:
        """Ask the owner to reset (once). Without an owner hook the request stays in
        :attr:`reset_pending` for a single-threaded user to act on with reset_sync()."""
        if self.resetting or self._reset_requested or self.removed or self.closed:
            return
        self._reset_requested = True
        log.warning("%s: controller reset needed: %s", self.name, reason)
        if self.on_reset_needed is not None:
            self.on_reset_needed(self, reason)

    @property
    def reset_pending(self) -> bool:
        return self._reset_requested

    async def reset(self) -> None:
        """Disable and re-enable the controller, re-create every I/O queue on its owner,
        re-submit what the reset swallowed. Safe to call while I/O runs."""
        if self.resetting:
            assert self._reset_done is not None
            await self._reset_done.wait()
            return
        if self.removed or self.closed:
            raise ControllerError(f"{self.name}: cannot reset: device "
                                  f"{'removed' if self.removed else 'detached'}")
        self.resetting = True
        self._reset_done = asyncio.Event()
        t0 = time.monotonic()
        in_flight = resubmitted = 0
        try:
            queues = list(self.io_queues)
            for q in queues:
                in_flight += await self.call(q, q.suspend)
            await asyncio.to_thread(self._reset_admin_phase1)
            for q in queues:
                await self.call(q, lambda q=q: _reap_and_reinit(q))
            await asyncio.to_thread(self._reset_admin_phase2)
            for q in queues:
                resubmitted += await self.call(q, lambda q=q: self._recreate(q))
            self.failed = False
        except BaseException:
            self.failed = True
            for q in list(self.io_queues):
                await self.call(q, lambda q=q: q.fail_all(SC_ABORTED_SQ_DELETION))
            raise
        finally:
            self.resetting = False
            self._reset_requested = False
            self._reset_done.set()
        self.resets += 1
        ms = (time.monotonic() - t0) * 1000
        self.last_reset = {"ms": round(ms, 1), "queues": len(queues), "in_flight": in_flight,
                           "resubmitted": resubmitted}
        log.info("%s: controller reset done in %.0f ms (%d queue(s) re-created; %d command(s) "
                 "were in flight, %d re-submitted)", self.name, ms, len(queues), in_flight,
                 resubmitted)

    def reset_sync(self) -> None:
        """:meth:`reset` for single-threaded users (tests, benchmark): no event loop."""
        queues = list(self.io_queues)
        self.resetting = True
        try:
            for q in queues:
                q.suspend()
            self._reset_admin_phase1()
            for q in queues:
                _reap_and_reinit(q)
            self._reset_admin_phase2()
            for q in queues:
                self._recreate(q)
        finally:
            self.resetting = False
            self._reset_requested = False
        self.resets += 1

    def _reset_admin_phase1(self) -> None:
        with self._admin_lock:
            q = self.admin_q
            assert q is not None
            q.suspend()
            self._disable()
            q.fail_all(SC_ABORTED_SQ_DELETION)  # admin commands are not replayed
            q.failed_status = 0
            q.reinit()

    def _reset_admin_phase2(self) -> None:
        with self._admin_lock:
            q = self.admin_q
            assert q is not None
            self._program_admin()
            self._enable()
            q.resume()
            self._set_num_queues(max(self.nr_io_queues, 1))

    def _recreate(self, q: IoQueue) -> int:
        self._create_on_device(q)
        n = q.resume()
        if n:
            log.info("%s: queue %d: re-submitted %d command(s) after reset", self.name,
                     q.qid, n)
        return n

    # ------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Normal shutdown (CC.SHN), so the device flushes its cache before we let go."""
        if self.removed or self.cap is None:
            return
        try:
            cc = self.regs.cc()
            if not cc & CC_EN:
                return
            self.regs.set_cc((cc & ~CC_SHN_MASK) | CC_SHN_NORMAL)
            rtd3e_ms = int(self.ident.get("rtd3e", 0) or 0) // 1000
            self._wait_csts(lambda c: c & CSTS_SHST_MASK == CSTS_SHST_COMPLETE,
                            "shutdown complete (CSTS.SHST)", max(rtd3e_ms, 10_000))
            self._disable()
        except (ControllerError, OSError) as exc:
            log.warning("%s: shutdown: %s", self.name, exc)

    def close(self) -> None:
        """Delete remaining queues, shut down, release DMA memory and the device."""
        if self.closed:
            return
        for q in list(self.io_queues):
            self.delete_io_queue(q)
        self.shutdown()
        self.closed = True
        if self.admin_q is not None:
            self.admin_q.fail_all(SC_ABORTED_SQ_DELETION)
        if self.device is not None:
            try:
                if not self.removed:
                    self.device.disable_bus_master()
            except OSError:
                pass
        self.allocator.close()
        if self.device is not None:
            self.device.close()
            self.device = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.ident.get("mn", ""), "serial": self.ident.get("sn", ""),
            "firmware": self.ident.get("fr", ""), "version": str(self.vs),
            "cap": self.cap.describe() if self.cap else {},
            "max_transfer": self.max_transfer, "io_queues": len(self.io_queues),
            "io_queues_granted": self.nr_io_queues,
            "interrupt_vectors": len(self.irq_efds),
            "namespaces": sorted(self.namespaces), "resets": self.resets,
            "last_reset": self.last_reset,
            "timeouts": self.timeouts, "aborts_sent": self.aborts_sent,
            "removed": self.removed, "dma": self.allocator.describe(),
        }  # fmt: skip


class _LaneCommand:
    """A C lane command as _send_abort sees a tracker (its clock is kept in C)."""

    __slots__ = ("cid", "aborting", "deadline")

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.aborting = False
        self.deadline = 0.0


def _reap_and_reinit(q: QueuePair) -> None:
    """With the controller disabled the CQ is final: take the completions that made it
    (their commands are done), then clear the rings for re-creation."""
    in_flight = q.outstanding
    q.process_completions()
    if in_flight:
        lane = q.cring.c.lane_inflight if q.cring is not None else 0
        log.info("%s: %d command(s) in flight at the reset: %d completed by the device "
                 "while it was disabled, %d to re-submit%s", q.name, in_flight,
                 in_flight - q.outstanding, q.outstanding,
                 f" ({lane} of them the C lane's, which the Python path does again)"
                 if lane else "")
    q.reinit()


def _admin_name(opcode: int) -> str:
    try:
        return spec.AdminOpcode(opcode).name
    except ValueError:
        return f"opcode {opcode:#x}"


def status_code(status: int) -> int:
    """(sct << 8) | sc of a CQE status: what bdev.Status speaks."""
    return status & STATUS_MASK


# ---------------------------------------------------------------------------
# VFIO attach


def open_pcie(bdf: str, *, name: str = "", options: Options | None = None,
              io_queues: int = 1, use_hugepages: bool = True) -> Controller:
    """Open ``bdf`` through VFIO, map BAR0, enable bus mastering, bring the controller up.

    The caller owns the result and must ``close()`` it, which gives the device back to
    vfio-pci in a quiet state (``blocktarget setup reset`` then returns it to the kernel).
    """
    from .vfio import Device

    dev = Device(bdf)
    try:
        bar = dev.map_bar0()
        dev.enable_bus_master()
        dev.enable_release_request()
        allocator = DmaAllocator(dev.container, name=name or dev.bdf,
                                 use_hugepages=use_hugepages)
    except BaseException:
        dev.close()
        raise
    ctrlr = Controller(bar, allocator, name=name or dev.bdf, options=options, device=dev)
    try:
        ctrlr.init(io_queues)
    except BaseException:
        ctrlr.closed = True
        allocator.close()
        dev.close()
        raise
    return ctrlr
