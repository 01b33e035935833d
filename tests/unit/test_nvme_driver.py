"""The user-space NVMe driver without hardware: registers, PRPs, rings, bring-up, timeouts,
reset and removal against a fake controller.

``FakeNvme`` is a small behavioural model of a PCIe NVMe controller: a register file
with doorbells, admin and I/O queues in "DMA" memory reached only through a fake IOMMU
(IOVA -> our own pages, like the real one), and a PRP walker written from the spec
independently of the driver's builder, so a wrong PRP shows up as wrong data. It also
misbehaves on request: holds commands (timeouts), ignores Aborts, raises CSTS.CFS, or
vanishes (reads all ones) — the paths a real SSD rarely exercises on demand.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import threading
import time
from typing import Any

import pytest

from blocktarget.nvme import spec, structs
from blocktarget.nvme.driver import cring, regs
from blocktarget.nvme.driver.ctrlr import (
    Controller,
    ControllerError,
    Options,
    buffer_prps,
)
from blocktarget.nvme.driver.dma import (
    HUGEPAGE_SIZE,
    PAGE_SIZE,
    BufferPool,
    DmaAllocator,
    DmaBuffer,
)
from blocktarget.nvme.driver.qpair import (
    SC_ABORTED_SQ_DELETION,
    QueuePair,
    build_prps,
    prp_list_align,
    prp_list_size,
)
from blocktarget.nvme.driver.regs import Capabilities, Registers, Version
from blocktarget.nvme.driver.vfio import ffi

# ---------------------------------------------------------------------------
# fakes


class FakeIommu:
    """IOVA -> our own virtual memory, as VFIO type1 sets it up for the device."""

    iova_pgsizes = 0x1000 | 0x200000

    def __init__(self) -> None:
        self.maps: dict[int, tuple[int, int]] = {}
        self.next = 1 << 32
        self.unmapped: list[int] = []

    def alloc_iova(self, size: int, align: int) -> int:
        iova = (self.next + align - 1) & ~(align - 1)
        self.next = iova + size
        return iova

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        self.maps[iova] = (vaddr, size)

    def unmap_dma(self, iova: int, size: int) -> None:
        del self.maps[iova]
        self.unmapped.append(iova)

    def _buf(self, iova: int, n: int) -> Any:
        for base, (vaddr, size) in self.maps.items():
            if base <= iova and iova + n <= base + size:
                return ffi.buffer(ffi.cast("char *", vaddr + iova - base), n)
        raise AssertionError(f"device DMA to unmapped IOVA {iova:#x}+{n}")

    def read(self, iova: int, n: int) -> bytes:
        return bytes(self._buf(iova, n))

    def write(self, iova: int, data: bytes) -> None:
        self._buf(iova, len(data))[:] = data


def prp_walk(dev: FakeIommu, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
    """The controller's reading of PRP1/PRP2 (NVMe 2.0 4.1.1), independent of the driver."""
    page = PAGE_SIZE
    assert prp1 % 4 == 0, "PRP1 must be dword aligned"
    first = min(length, page - prp1 % page)
    segs = [(prp1, first)]
    rest = length - first
    if not rest:
        return segs
    if rest <= page:
        assert prp2 % page == 0, "PRP2 data pointer must be page aligned"
        return segs + [(prp2, rest)]
    assert prp2 % 8 == 0
    pos = prp2
    while rest:
        (entry,) = struct.unpack("<Q", dev.read(pos, 8))
        if (pos + 8) % page == 0 and rest > page:
            assert entry % page == 0, "chained list page must be page aligned"
            pos = entry
            continue
        assert entry % page == 0, f"PRP entry {entry:#x} not page aligned"
        n = min(page, rest)
        segs.append((entry, n))
        rest -= n
        pos += 8
    return segs


class FakeNvme:
    """A PCIe NVMe controller model behind read32/write32 (see the module docstring)."""

    def __init__(self, iommu: FakeIommu, *, blocks: int = 4096, block_size: int = 512,
                 mdts: int = 5, mqes: int = 63, dstrd: int = 0, max_queues: int = 4,
                 oncs: int = 0x0C, vwc: int = 1, nsids: tuple[int, ...] = (1,)) -> None:
        self.iommu = iommu
        self.cap = (mqes | 1 << 16 | 2 << 24 | dstrd << 32 | 1 << 37 | 0 << 48 | 4 << 52)
        self.stride = 4 << dstrd
        self.vs = 0x00010400
        self.cc = 0
        self.csts = 0
        self.aqa = self.asq = self.acq = 0
        self.mdts = mdts
        self.oncs = oncs
        self.vwc = vwc
        self.max_queues = max_queues
        self.bs = block_size
        self.blocks = blocks
        self.storage = {n: bytearray(blocks * block_size) for n in nsids}
        self.sqs: dict[int, dict[str, int]] = {}
        self.cqs: dict[int, dict[str, int]] = {}
        self.hold_io = 0  # the next N I/O commands are held (never completed)
        self.abortable = True  # whether Abort finds held commands
        self.hold_aborts = False  # Aborts are never completed (a wedged admin queue)
        self.held: list[tuple[int, bytes]] = []
        self.removed = False
        self.commands: list[tuple[int, int]] = []  # (sqid, opcode)
        self.doorbell_writes = 0
        self.lock = threading.RLock()
        # MSI-X vectors' eventfds, by vector (FakeVfio.enable_msix sets them); a CQ
        # created with IEN signals its vector's after each completion it posts
        self.irq_efds: list[int] = []
        self.interrupts = 0

    # ---- MMIO ----
    def read32(self, off: int) -> int:
        if self.removed:
            return 0xFFFFFFFF
        return {
            regs.CAP: self.cap & 0xFFFFFFFF, regs.CAP + 4: self.cap >> 32, regs.VS: self.vs,
            regs.CC: self.cc, regs.CSTS: self.csts, regs.AQA: self.aqa,
            regs.ASQ: self.asq & 0xFFFFFFFF, regs.ASQ + 4: self.asq >> 32,
            regs.ACQ: self.acq & 0xFFFFFFFF, regs.ACQ + 4: self.acq >> 32,
        }.get(off, 0)  # fmt: skip

    def write32(self, off: int, value: int) -> None:
        if self.removed:
            return
        with self.lock:
            if off >= regs.DOORBELL_BASE:
                self.doorbell_writes += 1
                idx = (off - regs.DOORBELL_BASE) // self.stride
                qid, is_cq = divmod(idx, 2)
                if is_cq:
                    assert qid in self.cqs, f"CQ head doorbell of missing queue {qid}"
                    self.cqs[qid]["head"] = value
                else:
                    assert qid in self.sqs, f"SQ tail doorbell of missing queue {qid}"
                    self.sqs[qid]["tail"] = value
                    self._process(qid)
            elif off == regs.CC:
                self._set_cc(value)
            elif off == regs.AQA:
                self.aqa = value
            elif off in (regs.ASQ, regs.ASQ + 4):
                self.asq = _set_half(self.asq, off - regs.ASQ, value)
            elif off in (regs.ACQ, regs.ACQ + 4):
                self.acq = _set_half(self.acq, off - regs.ACQ, value)

    def _set_cc(self, value: int) -> None:
        was = self.cc & 1
        self.cc = value
        if value & regs.CC_SHN_MASK:
            self.csts = (self.csts & ~regs.CSTS_SHST_MASK) | regs.CSTS_SHST_COMPLETE
        if was and not value & 1:
            self.sqs.clear()
            self.cqs.clear()
            self.held.clear()
            self.csts &= ~(regs.CSTS_RDY | regs.CSTS_CFS | regs.CSTS_SHST_MASK)
        elif not was and value & 1:
            assert value >> regs.CC_IOSQES_SHIFT & 0xF == 6
            assert value >> regs.CC_IOCQES_SHIFT & 0xF == 4
            asz, csz = (self.aqa & 0xFFF) + 1, (self.aqa >> 16 & 0xFFF) + 1
            self.cqs[0] = {"base": self.acq, "size": csz, "tail": 0, "head": 0, "phase": 1}
            self.sqs[0] = {"base": self.asq, "size": asz, "head": 0, "tail": 0, "cqid": 0}
            self.csts |= regs.CSTS_RDY

    def fatal(self) -> None:
        self.csts |= regs.CSTS_CFS

    # ---- queues ----
    def _process(self, qid: int) -> None:
        sq = self.sqs[qid]
        while sq["head"] != sq["tail"]:
            raw = self.iommu.read(sq["base"] + sq["head"] * 64, 64)
            sq["head"] = (sq["head"] + 1) % sq["size"]
            sqe = structs.parse_sqe(raw)
            self.commands.append((qid, sqe.opcode))
            if qid and self.hold_io:
                self.hold_io -= 1
                self.held.append((qid, raw))
                continue
            if not qid and self.hold_aborts and sqe.opcode == spec.AdminOpcode.ABORT:
                continue
            status, dw0 = (self._admin if qid == 0 else self._io)(raw)
            self.post(qid, sqe.cid, status, dw0)

    def post(self, sqid: int, cid: int, status: int, dw0: int = 0) -> None:
        sq = self.sqs[sqid]
        cq = self.cqs[sq["cqid"]]
        nxt = (cq["tail"] + 1) % cq["size"]
        assert nxt != cq["head"], "CQ overflow: the driver let too many commands out"
        cqe = struct.pack("<IIHHHH", dw0, 0, sq["head"], sqid, cid,
                          status << 1 | cq["phase"])
        self.iommu.write(cq["base"] + cq["tail"] * 16, cqe)
        cq["tail"] = nxt
        if nxt == 0:
            cq["phase"] ^= 1
        self._interrupt(cq)

    def _interrupt(self, cq: dict[str, int]) -> None:
        """The CQ's MSI-X vector fires (its eventfd), if it was created with IEN."""
        iv = cq.get("iv", -1)
        if iv >= 0 and iv < len(self.irq_efds):
            os.eventfd_write(self.irq_efds[iv], 1)
            self.interrupts += 1

    def _data(self, sqe: structs.Sqe, raw: bytes, length: int) -> list[tuple[int, int]]:
        prp1, prp2 = struct.unpack_from("<QQ", raw, 24)
        return prp_walk(self.iommu, prp1, prp2, length)

    def _to_host(self, raw: bytes, sqe: structs.Sqe, data: bytes) -> None:
        pos = 0
        for addr, n in self._data(sqe, raw, len(data)):
            self.iommu.write(addr, data[pos:pos + n])
            pos += n

    def _from_host(self, raw: bytes, sqe: structs.Sqe, length: int) -> bytes:
        return b"".join(self.iommu.read(a, n) for a, n in self._data(sqe, raw, length))

    def _admin(self, raw: bytes) -> tuple[int, int]:
        sqe = structs.parse_sqe(raw)
        op = sqe.opcode
        A = spec.AdminOpcode
        if op == A.IDENTIFY:
            cns = sqe.cdw10 & 0xFF
            if cns == spec.Cns.CTRL:
                data = structs.build_identify_ctrl(
                    vid=0x1B36, sn="FAKE0001", mn="fake nvme", fr="1.0", mdts=self.mdts,
                    nn=max(self.storage), oncs=self.oncs, vwc=self.vwc, sqes=0x66, cqes=0x44,
                    ver=self.vs)
            elif cns == spec.Cns.NS:
                if sqe.nsid not in self.storage:
                    data = bytes(4096)
                else:
                    data = structs.build_identify_ns(
                        nsze=self.blocks, ncap=self.blocks, nuse=self.blocks, flbas=0,
                        lbaf=[structs.LbaFormat(0, self.bs.bit_length() - 1, 0)],
                        nguid=bytes(range(sqe.nsid, sqe.nsid + 16)))
            elif cns == spec.Cns.ACTIVE_NS_LIST:
                data = structs.build_ns_list(self.storage)
            else:
                return 0x002, 0
            self._to_host(raw, sqe, data)
            return 0, 0
        if op == A.SET_FEATURES and sqe.cdw10 & 0xFF == spec.FeatureId.NUM_QUEUES:
            n = min((sqe.cdw11 & 0xFFFF) + 1, self.max_queues)
            return 0, (n - 1) << 16 | (n - 1)
        if op == A.CREATE_IO_CQ:
            qid, size = sqe.cdw10 & 0xFFFF, (sqe.cdw10 >> 16) + 1
            assert sqe.cdw11 & 1, "queues are physically contiguous"
            if qid in self.cqs or qid == 0 or qid > self.max_queues:
                return 0x101, 0  # invalid queue identifier
            prp1 = struct.unpack_from("<Q", raw, 24)[0]
            iv = sqe.cdw11 >> 16 if sqe.cdw11 & 2 else -1  # (IEN: interrupts, vector IV)
            if iv >= len(self.irq_efds):
                return 0x108, 0  # invalid interrupt vector
            self.cqs[qid] = {"base": prp1, "size": size, "tail": 0, "head": 0, "phase": 1,
                             "iv": iv}
            return 0, 0
        if op == A.CREATE_IO_SQ:
            qid, size, cqid = sqe.cdw10 & 0xFFFF, (sqe.cdw10 >> 16) + 1, sqe.cdw11 >> 16
            if cqid not in self.cqs:
                return 0x100, 0  # completion queue invalid
            prp1 = struct.unpack_from("<Q", raw, 24)[0]
            self.sqs[qid] = {"base": prp1, "size": size, "head": 0, "tail": 0, "cqid": cqid}
            return 0, 0
        if op == A.DELETE_IO_SQ:
            self.sqs.pop(sqe.cdw10 & 0xFFFF, None)
            return 0, 0
        if op == A.DELETE_IO_CQ:
            self.cqs.pop(sqe.cdw10 & 0xFFFF, None)
            return 0, 0
        if op == A.ABORT:
            sqid, cid = sqe.cdw10 & 0xFFFF, sqe.cdw10 >> 16
            for i, (q, held) in enumerate(self.held):
                if self.abortable and q == sqid and structs.parse_sqe(held).cid == cid:
                    del self.held[i]
                    self.post(sqid, cid, 0x007)  # ABORTED_BY_REQUEST
                    return 0, 0
            return 0, 1  # not aborted
        return 0x001, 0

    def _io(self, raw: bytes) -> tuple[int, int]:
        sqe = structs.parse_sqe(raw)
        store = self.storage.get(sqe.nsid)
        if store is None:
            return 0x00B, 0
        op = sqe.opcode
        slba = sqe.cdw10 | sqe.cdw11 << 32
        nlb = (sqe.cdw12 & 0xFFFF) + 1
        if op in (spec.IoOpcode.READ, spec.IoOpcode.WRITE, spec.IoOpcode.WRITE_ZEROES):
            if slba + nlb > self.blocks:
                return 0x080, 0
            start, n = slba * self.bs, nlb * self.bs
            if op == spec.IoOpcode.READ:
                self._to_host(raw, sqe, bytes(store[start:start + n]))
            elif op == spec.IoOpcode.WRITE:
                store[start:start + n] = self._from_host(raw, sqe, n)
            else:
                store[start:start + n] = bytes(n)
            return 0, 0
        if op == spec.IoOpcode.FLUSH:
            return 0, 0
        if op == spec.IoOpcode.DATASET_MANAGEMENT:
            nr = (sqe.cdw10 & 0xFF) + 1
            ranges = structs.parse_dsm_ranges(self._from_host(raw, sqe, nr * 16), nr)
            if sqe.cdw11 & 4:
                for r in ranges:
                    store[r.slba * self.bs:(r.slba + r.nlb) * self.bs] = bytes(r.nlb * self.bs)
            return 0, 0
        return 0x001, 0

    def release_held(self) -> None:
        """Complete held commands late (a slow device catching up)."""
        with self.lock:
            for qid, raw in self.held:
                if qid in self.sqs:
                    status, dw0 = self._io(raw)
                    self.post(qid, structs.parse_sqe(raw).cid, status, dw0)
            self.held.clear()


class MemBarNvme(FakeNvme):
    """FakeNvme whose doorbell registers are real memory: C code writes them by address
    (`doorbell_addr`, what vfio.MappedBar offers), and the device notices, from its own
    thread, as a controller notices doorbell writes. Completions are posted with the
    phase bit written last, as a device's DMA write lands in order."""

    POLL_S = 0.0002

    def __init__(self, iommu: FakeIommu, *, thread: bool = True, **kw: Any) -> None:
        """``thread`` False: no thread of its own; whoever drives it calls service()
        (bench/hotpath.py, to leave the device's time out of the target's)."""
        super().__init__(iommu, **kw)
        self.bar = ffi.new("uint32_t[]", 0x4000 // 4)
        self._bar_addr = int(ffi.cast("uintptr_t", self.bar))
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        if thread:
            self.thread = threading.Thread(target=self._run, name="fake-nvme", daemon=True)
            self.thread.start()

    def doorbell_addr(self, offset: int) -> int:
        return self._bar_addr + offset

    def _db(self, qid: int, cq: bool) -> int:
        return (regs.DOORBELL_BASE + (2 * qid + cq) * self.stride) // 4

    def write32(self, off: int, value: int) -> None:
        if off >= regs.DOORBELL_BASE and not self.removed:
            self.bar[off // 4] = value
        super().write32(off, value)

    def _set_cc(self, value: int) -> None:
        with self.lock:
            if self.cc & 1 and not value & 1:
                # a controller reset clears its doorbell registers with its queues
                for i in range(regs.DOORBELL_BASE // 4, len(self.bar)):
                    self.bar[i] = 0
            super()._set_cc(value)

    def _admin(self, raw: bytes) -> tuple[int, int]:
        status, dw0 = super()._admin(raw)
        if raw[0] in (0x01, 0x05) and not status:  # Create I/O SQ / CQ
            # a new queue's doorbell starts at 0 (the host's tail and head do)
            qid = int.from_bytes(raw[40:42], "little")
            self.bar[self._db(qid, raw[0] == 0x05)] = 0
        return status, dw0

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.service()
            time.sleep(self.POLL_S)

    def service(self) -> None:
        """Take what the doorbells say: new CQ heads, then new SQ tails (I/O queues; the
        admin queue is served at its write32)."""
        if self.removed:
            return
        with self.lock:
            for qid, cq in list(self.cqs.items()):
                if qid:
                    cq["head"] = self.bar[self._db(qid, True)]
            for qid, sq in list(self.sqs.items()):
                tail = self.bar[self._db(qid, False)]
                if qid and tail != sq["tail"]:
                    sq["tail"] = tail
                    self._process(qid)

    def post(self, sqid: int, cid: int, status: int, dw0: int = 0) -> None:
        sq = self.sqs[sqid]
        cqid = sq["cqid"]
        cq = self.cqs[cqid]
        if cqid:
            cq["head"] = self.bar[self._db(cqid, True)]
        nxt = (cq["tail"] + 1) % cq["size"]
        assert nxt != cq["head"], "CQ overflow: the driver let too many commands out"
        cqe = struct.pack("<IIHHHH", dw0, 0, sq["head"], sqid, cid, status << 1 | cq["phase"])
        at = cq["base"] + cq["tail"] * 16
        self.iommu.write(at, cqe[:14])
        self.iommu.write(at + 14, cqe[14:])  # (the phase bit last)
        cq["tail"] = nxt
        if nxt == 0:
            cq["phase"] ^= 1
        self._interrupt(cq)



class FakeVfio:
    """What Controller asks of its vfio.Device, for a fake controller: MSI-X vectors as
    eventfds (handed to the model, which signals them as a device's vectors fire), no
    release request, nothing to unmap."""

    def __init__(self, nvme: FakeNvme, vectors: int = 8) -> None:
        self.nvme = nvme
        self.vectors = vectors
        self.efds: list[int] = []
        self.closed = False

    def msix_vectors(self) -> int:
        return self.vectors

    def enable_msix(self, count: int) -> list[int]:
        assert not self.efds and 1 <= count <= self.vectors
        self.efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.nvme.irq_efds = list(self.efds)
        return list(self.efds)

    def release_requested(self) -> bool:
        return False

    def disable_bus_master(self) -> None:
        pass

    def close(self) -> None:
        self.nvme.irq_efds = []
        for fd in self.efds:
            os.close(fd)
        self.efds = []
        self.closed = True


def _set_half(old: int, half: int, value: int) -> int:
    return (old & ~0xFFFFFFFF) | value if half == 0 else (old & 0xFFFFFFFF) | value << 32


@pytest.fixture
def iommu() -> FakeIommu:
    return FakeIommu()


@pytest.fixture
def alloc(iommu: FakeIommu):  # type: ignore[no-untyped-def]
    a = DmaAllocator(iommu, name="test", use_hugepages=False)
    yield a
    a.close()


def make_ctrlr(iommu: FakeIommu, alloc: DmaAllocator, io_queues: int = 1,
               **kw: Any) -> tuple[FakeNvme, Controller]:
    opts = kw.pop("options", None) or Options()
    dev = FakeNvme(iommu, **kw)
    c = Controller(dev, alloc, name="fake", options=opts)
    c.init(io_queues)
    return dev, c


def run_sync(c: Controller, q: QueuePair, opcode: int, nsid: int = 1, timeout: float = 2,
             **kw: Any) -> tuple[int, int]:
    out: list[int] = []
    q.submit(opcode, nsid, cb=lambda st, dw0: out.extend((st, dw0)), **kw)
    deadline = time.monotonic() + timeout
    while not out and time.monotonic() < deadline:
        q.process_completions()
    assert out, "command did not complete"
    return out[0], out[1]


# ---------------------------------------------------------------------------
# registers


def test_cap_decoding_of_qemu_controller() -> None:
    # QEMU 7.2's emulated NVMe as read in the guest (notes/vm-testing.md)
    cap = Capabilities(0x004018200F0107FF)
    assert cap.mqes == 2047 and cap.max_queue_entries == 2048
    assert cap.cqr is True
    assert cap.timeout_ms == 15 * 500
    assert cap.dstrd == 0 and cap.doorbell_stride == 4
    assert cap.css & regs.CAP_CSS_NVM
    assert cap.mpsmin == 4096 and cap.mpsmax == 65536
    v = Version(0x00010400)
    assert (v.major, v.minor, v.tertiary) == (1, 4, 0) and str(v) == "1.4.0"
    assert v.at_least(1, 1) and not v.at_least(2, 0)


def test_cc_aqa_and_doorbells() -> None:
    cc = regs.make_cc(enable=True)
    assert cc & regs.CC_EN
    assert cc >> regs.CC_IOSQES_SHIFT & 0xF == 6 and cc >> regs.CC_IOCQES_SHIFT & 0xF == 4
    assert cc >> regs.CC_MPS_SHIFT & 0xF == 0  # 4 KiB
    assert regs.make_cc(enable=False, page_size=8192) >> regs.CC_MPS_SHIFT & 0xF == 1
    with pytest.raises(ValueError):
        regs.make_cc(enable=True, page_size=1024)
    assert regs.make_aqa(32, 16) == (15 << 16) | 31
    with pytest.raises(ValueError):
        regs.make_aqa(1, 32)
    assert regs.sq_tail_doorbell(0, 4) == 0x1000 and regs.cq_head_doorbell(0, 4) == 0x1004
    assert regs.sq_tail_doorbell(3, 4) == 0x1018 and regs.cq_head_doorbell(3, 4) == 0x101C
    # DSTRD=2: doorbells 16 bytes apart
    assert regs.sq_tail_doorbell(1, 16) == 0x1020 and regs.cq_head_doorbell(1, 16) == 0x1030


class ByteBar:
    """A plain bytearray register window (what a bytearray-backed mock BAR looks like)."""

    def __init__(self) -> None:
        self.mem = bytearray(0x2000)

    def read32(self, off: int) -> int:
        return struct.unpack_from("<I", self.mem, off)[0]

    def write32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.mem, off, value)


def test_registers_split_64bit_access_and_removal() -> None:
    bar = ByteBar()
    struct.pack_into("<Q", bar.mem, regs.CAP, 0x004018200F0107FF)
    struct.pack_into("<I", bar.mem, regs.VS, 0x10400)
    r = Registers(bar)
    assert r.cap().mqes == 2047 and str(r.vs()) == "1.4.0"
    r.set_admin_queues(0x1_2345_6000, 0x1_2346_7000, 32, 32)
    assert struct.unpack_from("<Q", bar.mem, regs.ASQ)[0] == 0x1_2345_6000
    assert struct.unpack_from("<Q", bar.mem, regs.ACQ)[0] == 0x1_2346_7000
    assert struct.unpack_from("<I", bar.mem, regs.AQA)[0] == (31 << 16) | 31
    assert not r.removed()
    bar.mem[:] = b"\xff" * len(bar.mem)  # a surprise-removed device reads all ones
    assert r.removed()
    with pytest.raises(regs.DeviceRemoved):
        r.csts()
    with pytest.raises(regs.DeviceRemoved):
        r.cap()
    assert "device gone" in regs.describe_csts(0xFFFFFFFF)
    assert "CFS" in regs.describe_csts(regs.CSTS_CFS | regs.CSTS_RDY)


# ---------------------------------------------------------------------------
# PRPs


def _covers(segs: list[tuple[int, int]], iova: int, length: int) -> None:
    pos = iova
    for addr, n in segs:
        assert addr == pos, f"segment at {addr:#x}, expected {pos:#x}"
        pos += n
    assert pos == iova + length


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 512), (0, 4096), (0, 4097), (0, 8192), (0, 8193), (0, 12288), (0, 128 * 1024),
        (512, 3584), (512, 4096), (512, 8192), (4092, 8), (100 * 4, 64 * 1024),
        (0, 2 << 20),  # 511 list entries: exactly one list page
        (0, (2 << 20) + 4096),  # 512 entries: the list needs a chain
        (2048, 4 << 20),  # unaligned start, two chain pointers
    ],
)  # fmt: skip
def test_prps_as_the_controller_reads_them(iommu: FakeIommu, alloc: DmaAllocator, offset: int,
                                           length: int) -> None:
    data = alloc.alloc(length + offset + PAGE_SIZE)
    size = prp_list_size(length + offset + PAGE_SIZE) or 8
    lst = alloc.alloc(size, prp_list_align(size))
    prp1, prp2 = build_prps(data.iova + offset, length, lst)
    _covers(prp_walk(iommu, prp1, prp2, length), data.iova + offset, length)
    if length <= PAGE_SIZE - offset:
        assert prp2 == 0


def test_prp_errors(alloc: DmaAllocator) -> None:
    buf = alloc.alloc(3 * PAGE_SIZE)
    with pytest.raises(ValueError, match="dword"):
        build_prps(buf.iova + 2, 16)
    with pytest.raises(ValueError, match="needs a PRP list"):
        build_prps(buf.iova, 3 * PAGE_SIZE)
    small = alloc.alloc(8, 8)
    with pytest.raises(ValueError, match="too small"):
        build_prps(buf.iova, 4 * PAGE_SIZE, small)
    with pytest.raises(ValueError):
        build_prps(buf.iova, 0)


def test_prp_list_size() -> None:
    assert prp_list_size(4096) == 0 and prp_list_size(8192) == 0
    assert prp_list_size(12288) == 16  # 2 entries
    assert prp_list_size(128 * 1024) == 31 * 8
    assert prp_list_size(2 << 20) == 511 * 8  # fits one page exactly
    assert prp_list_size((2 << 20) + 4096) == 512 * 8  # 512 entries fill a page, no chain
    assert prp_list_size((2 << 20) + 8192) == (512 + 2) * 8  # 511 + chain, then 2
    assert prp_list_size(4 << 20) == 1024 * 8  # 1023 entries: 511 + chain, then 512
    assert prp_list_align(248) == 256 and prp_list_align(4096) == 4096
    assert prp_list_align(9000) == 4096


def test_pool_buffers_have_precomputed_prps(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    from blocktarget.nvme.driver.ctrlr import IoQueue

    q = IoQueue(FakeNvme(iommu), 1, 8, 4, alloc)
    q.pool = BufferPool(alloc, 64 * 1024, 7)
    buf = q.get_buffer()
    assert buf is not None and buf.prp_list is not None
    for length in (512, 4096, 4097, 8192, 12288, 64 * 1024):
        prp1, prp2 = buffer_prps(buf, length)
        _covers(prp_walk(iommu, prp1, prp2, length), buf.iova, length)
    q.put_buffer(buf)
    assert q.get_buffer() is buf, "a returned buffer is reused (its PRP list with it)"


# ---------------------------------------------------------------------------
# DMA memory


def test_allocator_maps_regions_and_reuses(iommu: FakeIommu) -> None:
    a = DmaAllocator(iommu, name="t", use_hugepages=False)
    x = a.alloc(4096)
    y = a.alloc(100, 8)
    assert x.iova % 4096 == 0 and y.iova % 8 == 0
    assert len(iommu.maps) == 1, "small buffers come from one mapped region"
    x.mem[:4] = b"abcd"
    assert iommu.read(x.iova, 4) == b"abcd", "CPU view and device view are the same bytes"
    a.free(x)
    z = a.alloc(4096)
    assert z is x and bytes(z.mem[:4]) == bytes(4), "reused and zeroed"
    big = a.alloc(3 << 20)
    assert len(iommu.maps) == 2 and big.size == 3 << 20
    assert a.describe()["hugepage_bytes"] == 0
    a.close()
    assert not iommu.maps, "close unmaps every region from the IOMMU"
    with pytest.raises(MemoryError):
        a.alloc(4096)


def test_allocator_falls_back_to_4k_only_when_iommu_maps_them(
        iommu: FakeIommu, caplog: pytest.LogCaptureFixture) -> None:
    from blocktarget.nvme.driver.dma import free_hugepages

    if free_hugepages():
        pytest.skip("hugepages are free on this machine; the fallback is not reached")
    a = DmaAllocator(iommu, name="t4k", use_hugepages=True)
    with caplog.at_level("WARNING"):
        buf = a.alloc(4096)
    assert "4 KiB pages" in caplog.text
    assert buf.region is not None and not buf.region.hugepages
    a.close()
    iommu.iova_pgsizes = 0x200000  # an IOMMU that cannot map 4 KiB pages
    b = DmaAllocator(iommu, name="no4k", use_hugepages=True)
    with pytest.raises(MemoryError, match="--hugemem"):
        b.alloc(4096)


def test_attach_takes_all_the_dma_memory_its_queues_will_use(iommu: FakeIommu) -> None:
    """Bring-up reserves the I/O queues' rings and full buffer pools (PRP lists
    included): filling every pool afterwards maps nothing new, so no I/O can fail later
    for DMA memory the attach did not get."""
    a = DmaAllocator(iommu, name="budget", use_hugepages=False)
    try:
        _, c = make_ctrlr(iommu, a, io_queues=2)
        need = c.io_dma_bytes(2)
        assert need > 2 * 63 * c.max_transfer, "rings + 63 buffers of 128 KiB per queue"
        maps = dict(iommu.maps)
        queues = [c.create_io_queue(), c.create_io_queue()]
        held = []
        for q in queues:
            while (buf := q.get_buffer()) is not None:
                held.append(buf)
                assert buf.prp_list is not None
        assert len(held) == 2 * 63, "every command slot of both queues has its buffer"
        assert iommu.maps == maps, "nothing mapped after bring-up"
        assert a.mapped_bytes <= need + 2 * HUGEPAGE_SIZE, "and not much more than needed"
        for q, bufs in ((queues[0], held[:63]), (queues[1], held[63:])):
            for b in bufs:
                q.put_buffer(b)
        c.close()
    finally:
        a.close()


def test_attach_fails_at_once_without_the_dma_memory(iommu: FakeIommu) -> None:
    """No hugepages to be had and an IOMMU that cannot map 4 KiB pages: the bring-up
    (the attach RPC, the config line) fails, saying how much is needed and the knob."""
    from blocktarget.nvme.driver.dma import DmaError, free_hugepages

    if free_hugepages() * HUGEPAGE_SIZE >= 32 << 20:
        pytest.skip("this machine has free hugepages: the shortage is not reached")
    iommu.iova_pgsizes = HUGEPAGE_SIZE
    a = DmaAllocator(iommu, name="short", use_hugepages=True)
    try:
        with pytest.raises(DmaError) as ei:
            make_ctrlr(iommu, a, io_queues=2)
    finally:
        a.close()
    msg = str(ei.value)
    assert msg.startswith("short: ") and "MiB of DMA memory needed as 2 MiB hugepages" in msg
    assert "are free" in msg and "blocktarget setup --hugemem MiB" in msg
    assert not iommu.maps, "nothing stays mapped"


def _set_pool(pages: int) -> int:
    path = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    with open(path, "w") as f:
        f.write(f"{pages}\n")
    with open(path) as f:
        return int(f.read())


@pytest.fixture
def hugepage_pool():  # type: ignore[no-untyped-def]
    """Set the real 2 MiB pool (root only) for a moment; the old size comes back after."""
    import os

    from blocktarget.nvme.driver.dma import reserved_hugepages

    if os.geteuid() != 0 or not os.access(
            "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", os.W_OK):
        pytest.skip("needs root to size the hugepage pool")
    old = reserved_hugepages()
    try:
        yield _set_pool
    finally:
        _set_pool(old)


def test_real_hugepage_pool_too_small_then_enough(iommu: FakeIommu, hugepage_pool) -> None:  # type: ignore[no-untyped-def]
    """The real kernel's pool: a few pages short of what two queues need, the bring-up
    fails and names the numbers; with enough, every region is hugepages."""
    from blocktarget.nvme.driver.dma import DmaError, free_hugepages

    iommu.iova_pgsizes = HUGEPAGE_SIZE
    base = free_hugepages()
    if hugepage_pool(base + 4) < base + 4 or free_hugepages() < 4:
        pytest.skip("the kernel could not grow the hugepage pool")
    a = DmaAllocator(iommu, name="pool", use_hugepages=True)
    with pytest.raises(DmaError) as ei:
        make_ctrlr(iommu, a, io_queues=2)
    a.close()
    assert re.search(r"^pool: 16 MiB of DMA memory needed as 2 MiB hugepages \(8 pages\), "
                     r"but \d+ of the pool's \d+ are free", str(ei.value)), ei.value
    assert str(ei.value).endswith(
        "(2 I/O queue(s), one per reactor, of 63 commands with a 128 KiB buffer each; "
        "io_queue_size and max_transfer_kb make that less)"), "the bring-up got this far"
    pages = 12 + base  # two queues need 16 MiB (8 pages), the admin region one page
    if hugepage_pool(pages) < pages:
        pytest.skip("the kernel could not grow the hugepage pool")
    a = DmaAllocator(iommu, name="pool", use_hugepages=True)
    try:
        _, c = make_ctrlr(iommu, a, io_queues=2)
        assert a.describe()["page_kind"] == "2MiB-hugepages"
        assert a.hugepage_bytes >= c.io_dma_bytes(2)
        c.close()
    finally:
        a.close()


def test_populate_turns_a_would_be_sigbus_into_an_error() -> None:
    """A shared mapping past the end of its (empty) file: touching it is SIGBUS, the
    kernel's answer for memory it cannot back, as a hugetlb cgroup limit gives it.
    populate() reports EFAULT instead, and the process lives."""
    import errno
    import os

    from blocktarget.nvme.driver.dma import populate
    from blocktarget.nvme.driver.vfio import MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, libc

    fd = os.memfd_create("bt-sigbus")
    try:
        addr = libc.mmap(ffi.NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        assert addr != MAP_FAILED
        try:
            assert populate(addr, 8192) == errno.EFAULT
            os.ftruncate(fd, 8192)  # now backed: the same call succeeds
            assert populate(addr, 8192) == 0
        finally:
            libc.munmap(addr, 8192)
    finally:
        os.close(fd)


def test_oversized_hugepage_pool_is_said_in_the_log(
        iommu: FakeIommu, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The OOM kill after a greedy reservation left no message: the allocator says it."""
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:        2097152 kB\nHugePages_Total:    1024\n"
                    "Hugepagesize:       2048 kB\nHugetlb:         2097152 kB\n")
    with caplog.at_level("WARNING"):
        DmaAllocator(iommu, name="greedy", use_hugepages=True, meminfo=info).close()
    assert "greedy: hugepage pools hold 2048 MiB of this machine's 2048 MiB, leaving the " \
           "system less than the 1024 MiB it should keep" in caplog.text
    caplog.clear()
    info.write_text("MemTotal:        2097152 kB\nHugetlb:          524288 kB\n")
    with caplog.at_level("WARNING"):
        DmaAllocator(iommu, name="fine", use_hugepages=True, meminfo=info).close()
    assert "hugepage pools" not in caplog.text


def test_buffer_pool_grows_to_its_limit(alloc: DmaAllocator) -> None:
    pool = BufferPool(alloc, 128 * 1024, 20)
    got = [pool.get() for _ in range(20)]
    assert all(isinstance(b, DmaBuffer) for b in got)
    assert pool.get() is None, "no more than max_count buffers"
    assert len({b.iova for b in got if b}) == 20
    pool.put(got[0])  # type: ignore[arg-type]
    assert pool.get() is got[0]
    assert pool.in_use == 20


# ---------------------------------------------------------------------------
# ring and phase logic (a hand-driven queue, no controller model)


class RingBar:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def read32(self, off: int) -> int:
        return 0

    def write32(self, off: int, value: int) -> None:
        self.writes.append((off, value))


def _post(iommu: FakeIommu, q: QueuePair, slot: int, cid: int, phase: int,
          status: int = 0, dw0: int = 0) -> None:
    iommu.write(q.cq.iova + slot * 16,
                struct.pack("<IIHHHH", dw0, 0, 0, q.qid, cid, status << 1 | phase))


def test_phase_bit_wraps_and_stale_entries_are_ignored(iommu: FakeIommu,
                                                       alloc: DmaAllocator) -> None:
    bar = RingBar()
    q = QueuePair(bar, 1, 4, 4, alloc)  # 4 entries: 3 commands in flight at most
    done: list[tuple[int, int]] = []
    slot = 0
    phase = 1
    for rnd in range(5):  # several passes over the ring: the phase flips each pass
        cids = []
        for i in range(3):
            q.submit(0x02, 1, cb=lambda st, dw0: done.append((st, dw0)), cdw10=rnd * 10 + i)
        assert q.outstanding == 3
        for t in q.trackers:
            cids.append(t.cid)
        assert q.process_completions() == 0, "nothing posted yet: old entries are stale"
        for cid in cids:
            _post(iommu, q, slot, cid, phase, dw0=cid)
            slot += 1
            if slot == 4:
                slot, phase = 0, phase ^ 1
        bar.writes.clear()
        assert q.process_completions() == 3
        cq_db = [w for w in bar.writes if w[0] == regs.cq_head_doorbell(1, 4)]
        assert cq_db == [(regs.cq_head_doorbell(1, 4), slot)], "one CQ doorbell per batch"
        assert q.outstanding == 0
    assert len(done) == 15 and all(st == 0 for st, _ in done)
    # the SQ contents: command dword 10 of the last one written where the tail was
    tail = (q.sq_tail - 1) % 4
    raw = bytes(q.sq.mem[tail * 64:(tail + 1) * 64])
    assert structs.parse_sqe(raw).cdw10 == 42


def test_commands_beyond_depth_wait_then_go(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    bar = RingBar()
    q = QueuePair(bar, 1, 4, 4, alloc)
    order: list[int] = []
    for i in range(7):
        q.submit(0x02, 1, cdw10=i, cb=lambda st, dw0, i=i: order.append(i))
    assert q.outstanding == 3 and len(q.waiting) == 4
    sq_db = regs.sq_tail_doorbell(1, 4)
    assert [v for off, v in bar.writes if off == sq_db] == [1, 2, 3]
    slot, phase = 0, 1
    while order != list(range(7)):
        active = sorted(q.active_trackers(), key=lambda t: t.seq)
        assert active, f"stuck after {order}"
        _post(iommu, q, slot, active[0].cid, phase)
        slot += 1
        if slot == 4:
            slot, phase = 0, phase ^ 1
        q.process_completions()
    assert q.outstanding == 0 and not q.waiting


def test_batched_doorbells_one_write_per_flush(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    bar = RingBar()
    q = QueuePair(bar, 1, 8, 4, alloc)
    q.batch_doorbells = True
    for i in range(3):
        q.submit(0x02, 1, cdw10=i, cb=lambda st, dw0: None)
    assert bar.writes == [], "no doorbell until the poller flushes"
    q.flush_doorbell()
    q.flush_doorbell()
    assert bar.writes == [(regs.sq_tail_doorbell(1, 4), 3)] and q.doorbells == 1
    q.submit(0x02, 1, cb=lambda st, dw0: None)
    q.suspend()
    q.flush_doorbell()
    assert len(bar.writes) == 1, "a suspended queue's doorbell is not written"


def test_suspend_reinit_resume_resubmits_in_order(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    bar = RingBar()
    q = QueuePair(bar, 1, 8, 4, alloc, max_resubmits=1)
    results: list[tuple[int, int]] = []
    for i in range(3):
        q.submit(0x01, 1, cdw10=i, cb=lambda st, dw0, i=i: results.append((i, st)))
    q.suspend()
    q.submit(0x01, 1, cdw10=3, cb=lambda st, dw0: results.append((3, st)))
    assert len(q.waiting) == 1, "a suspended queue holds new commands"
    q.reinit()
    assert q.sq_tail == 0 and q.phase == 1 and not any(q.cq.mem)
    assert q.resume() == 3
    sqes = [structs.parse_sqe(bytes(q.sq.mem[i * 64:(i + 1) * 64])) for i in range(4)]
    assert [s.cdw10 for s in sqes] == [0, 1, 2, 3], "lost commands first, then the waiting one"
    # a second reset: the first three are past max_resubmits and fail
    q.suspend()
    q.reinit()
    q.resume()
    assert sorted(results) == [(0, SC_ABORTED_SQ_DELETION), (1, SC_ABORTED_SQ_DELETION),
                               (2, SC_ABORTED_SQ_DELETION)]
    assert q.fail_all() == 1 and results[-1] == (3, SC_ABORTED_SQ_DELETION)
    q.submit(0x02, 1, cb=lambda st, dw0: results.append((9, st)))
    assert results[-1] == (9, SC_ABORTED_SQ_DELETION), "a failed queue fails at once"


# ---------------------------------------------------------------------------
# controller bring-up and I/O against the model


def test_bring_up_identify_and_queues(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc, io_queues=2, nsids=(1, 3))
    assert dev.csts & regs.CSTS_RDY and dev.cc & regs.CC_EN
    assert c.ident["mn"] == "fake nvme" and c.ident["sn"] == "FAKE0001"
    assert sorted(c.namespaces) == [1, 3]
    ns = c.namespaces[1]
    assert ns.block_size == 512 and ns.num_blocks == 4096 and ns.nguid == bytes(range(1, 17))
    assert c.max_transfer == 4096 << 5  # MDTS 5 in MPSMIN units
    assert c.nr_io_queues == 2
    q1 = c.create_io_queue(16)
    q2 = c.create_io_queue(16)
    assert {q1.qid, q2.qid} == {1, 2} and set(dev.sqs) == {0, 1, 2}
    with pytest.raises(ControllerError, match="no I/O queue left"):
        c.create_io_queue(16)
    c.delete_io_queue(q2)
    assert set(dev.sqs) == {0, 1} and set(dev.cqs) == {0, 1}
    q3 = c.create_io_queue(16)
    assert q3.qid == 2, "a deleted queue's id is reused"
    c.close()
    assert dev.csts & regs.CSTS_SHST_MASK == regs.CSTS_SHST_COMPLETE or not dev.cc & 1
    assert not dev.sqs, "queues deleted and controller disabled on close"


def test_bring_up_disables_a_running_controller_first(iommu: FakeIommu,
                                                      alloc: DmaAllocator) -> None:
    dev = FakeNvme(iommu)
    dev.aqa = 0
    dev._set_cc(regs.make_cc(enable=True))  # left enabled by a previous user
    c = Controller(dev, alloc, name="fake")
    c.init(1)
    assert ("admin", 0) not in dev.commands
    assert dev.csts & regs.CSTS_RDY
    c.close()


def test_read_write_roundtrip_with_prp_lists(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc)
    q = c.create_io_queue(32)
    buf = q.get_buffer()
    assert buf is not None
    payload = bytes((i * 7) & 0xFF for i in range(c.max_transfer))
    buf.mem[:] = payload
    prp1, prp2 = buffer_prps(buf, len(payload))
    nlb = len(payload) // 512
    st, _ = run_sync(c, q, spec.IoOpcode.WRITE, prp1=prp1, prp2=prp2, cdw10=100, cdw12=nlb - 1)
    assert st == 0
    assert dev.storage[1][100 * 512:100 * 512 + len(payload)] == payload
    buf.mem[:] = bytes(len(buf.mem))
    st, _ = run_sync(c, q, spec.IoOpcode.READ, prp1=prp1, prp2=prp2, cdw10=100, cdw12=nlb - 1)
    assert st == 0 and bytes(buf.mem) == payload
    st, _ = run_sync(c, q, spec.IoOpcode.READ, nsid=9, prp1=prp1, cdw12=0)
    assert st == 0x00B, "a device error status comes back unchanged"
    c.close()


def test_admin_error_is_reported_with_status_name(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    _, c = make_ctrlr(iommu, alloc)
    with pytest.raises(ControllerError, match="INVALID_OPCODE"):
        c.admin(0x7E)
    c.close()


def test_timeout_abort_completes_the_command(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc, options=Options(io_timeout_s=0.05))
    q = c.create_io_queue(8)
    out: list[int] = []
    dev.hold_io = 1
    submitted = time.monotonic()
    q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    # a tick as of the submission (the clock the deadline is set on; on a loaded machine
    # the real clock may already be past it by the next line)
    c.tick(q, now=submitted)
    assert not out and c.aborts_sent == 0, "not yet expired"
    time.sleep(0.06)
    c.tick(q)
    assert c.aborts_sent == 1 and q.timeouts == 1
    q.process_completions()
    assert out == [0x007], "the aborted command completes with ABORTED_BY_REQUEST"
    assert not c.reset_pending
    c.close()


def test_timeout_unabortable_command_resets_and_resubmits(iommu: FakeIommu,
                                                          alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc, options=Options(io_timeout_s=0.05))
    reasons: list[str] = []
    c.on_reset_needed = lambda ctrlr, why: reasons.append(why)
    q = c.create_io_queue(8)
    buf = q.get_buffer()
    assert buf is not None
    buf.mem[:512] = b"R" * 512
    out: list[int] = []
    dev.hold_io = 1
    dev.abortable = False
    q.submit(spec.IoOpcode.WRITE, 1, prp1=buf.iova, cdw10=7, cdw12=0,
             cb=lambda st, dw0: out.append(st))
    time.sleep(0.06)
    c.tick(q)  # Abort: the controller does not find it
    assert c.aborts_sent == 1 and not reasons
    time.sleep(0.06)
    c.tick(q)  # still outstanding after the Abort's grace period
    assert reasons and "after its timeout and an Abort" in reasons[0]
    assert c.reset_pending
    c.reset_sync()
    q.process_completions()
    assert out == [0], "re-submitted after the reset and completed"
    assert dev.storage[1][7 * 512:8 * 512] == b"R" * 512
    assert c.resets == 1 and not c.reset_pending and q.resubmitted == 1
    c.close()


def test_abort_never_blocks_the_poller_and_respects_the_abort_limit(
        iommu: FakeIommu, alloc: DmaAllocator) -> None:
    """A wedged admin queue must not stall the reactor that runs tick(): the Abort is
    only submitted, at most ACL+1 are outstanding, and the reset follows on deadline."""
    dev, c = make_ctrlr(iommu, alloc, options=Options(io_timeout_s=0.05))
    reasons: list[str] = []
    c.on_reset_needed = lambda ctrlr, why: reasons.append(why)
    q = c.create_io_queue(8)
    out: list[int] = []
    dev.hold_io = 2
    dev.hold_aborts = True
    for _ in range(2):
        q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    time.sleep(0.06)
    t0 = time.monotonic()
    c.tick(q)
    # waiting for the Abort (which the fake never completes) would take admin_timeout_s
    # (30 s here); a bound far below that and far above a stalled CI thread's delay
    assert time.monotonic() - t0 < 1.0, "tick waited for the Abort"
    assert c.aborts_sent == 1, "ACL is 0 in the fake: one Abort outstanding at a time"
    assert q.timeouts == 1 and not reasons
    c.tick(q)
    assert c.aborts_sent == 1, "the limit holds while the first Abort is outstanding"
    time.sleep(0.06)
    c.tick(q)
    assert reasons and "after its timeout and an Abort" in reasons[0]
    c.reset_sync()
    q.process_completions()
    assert out == [0, 0], "both commands re-submitted after the reset and completed"
    assert c._aborts_outstanding == 0, "the reset failed the wedged Abort"
    c.close()


def test_reset_while_io_in_flight_keeps_every_command(iommu: FakeIommu,
                                                      alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc)
    q = c.create_io_queue(16)
    results: list[int] = []
    dev.hold_io = 5  # five commands the device "has" when the reset hits
    for _ in range(10):
        q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: results.append(st))
    # the five not held completed; five are outstanding in the device
    q.process_completions()
    assert len(results) == 5 and q.outstanding == 5
    c.reset_sync()
    q.process_completions()
    assert results == [0] * 10
    assert {s for s, _ in dev.commands[-5:]} == {q.qid}, "re-submitted on the new queue"
    c.close()


def test_async_reset_runs_steps_through_owner_hooks(iommu: FakeIommu,
                                                    alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc)
    q = c.create_io_queue(8)
    calls: list[str] = []

    async def call(qp: QueuePair, fn: Any) -> Any:
        calls.append(getattr(fn, "__name__", "fn"))
        return fn()

    c.call = call
    asyncio.run(c.reset())
    assert calls[0] == "suspend" and len(calls) == 3
    st, _ = run_sync(c, q, spec.IoOpcode.FLUSH)
    assert st == 0 and c.resets == 1
    c.close()


def test_fatal_status_requests_reset(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc)
    q = c.create_io_queue(8)
    reasons: list[str] = []
    c.on_reset_needed = lambda ctrlr, why: reasons.append(why)
    dev.fatal()
    c.tick(q)
    assert reasons == ["controller fatal status (CSTS.CFS)"]
    c.reset_sync()
    assert not dev.csts & regs.CSTS_CFS and run_sync(c, q, spec.IoOpcode.FLUSH)[0] == 0
    c.close()


def test_hot_remove_fails_io_and_tells_the_owner(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    dev, c = make_ctrlr(iommu, alloc)
    q = c.create_io_queue(8)
    gone: list[Controller] = []
    c.on_removed = gone.append
    out: list[int] = []
    dev.hold_io = 2
    q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    dev.removed = True
    c.tick(q)
    assert gone == [c] and c.removed
    assert out == [SC_ABORTED_SQ_DELETION] * 2
    q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    assert out[-1] == SC_ABORTED_SQ_DELETION
    with pytest.raises(regs.DeviceRemoved):
        c.admin(spec.AdminOpcode.IDENTIFY)
    c.close()  # must not hang or touch the dead device's queues


def test_disable_timeout_names_csts(iommu: FakeIommu, alloc: DmaAllocator) -> None:
    dev = FakeNvme(iommu)
    dev._set_cc(regs.make_cc(enable=True))
    dev.cap = dev.cap & ~(0xFF << 24) | 1 << 24  # CAP.TO = 500 ms
    orig = dev._set_cc
    dev._set_cc = lambda v: None  # type: ignore[method-assign]  # ignores CC writes: stuck
    c = Controller(dev, alloc, name="stuck")
    with pytest.raises(ControllerError, match="CSTS.RDY=0.*RDY"):
        c.init(1)
    dev._set_cc = orig  # type: ignore[method-assign]


# ---------------------------------------------------------------------------
# the nvme bdev on real reactors, over the model


class StubTarget:
    """What the nvme bdev needs of app.Target: reactors, the bdev registry, subsystems."""

    def __init__(self, cores: list[int]) -> None:
        from blocktarget.bdev import BdevRegistry
        from blocktarget.reactor import ReactorPool

        self.reactors = ReactorPool(cores, pin=False)
        self.bdevs = BdevRegistry()
        self.subsystems: list[Any] = []
        self.started = True
        self.removed_ns: list[int] = []

    async def remove_namespace(self, sub: Any, nsid: int) -> None:
        self.removed_ns.append(nsid)


@pytest.fixture
def stub_target():  # type: ignore[no-untyped-def]
    import os

    cores = sorted(os.sched_getaffinity(0))[:2]
    t = StubTarget(cores if len(cores) == 2 else cores * 2)
    t.reactors.start()
    yield t
    t.reactors.stop()


def _io(reactor: Any, bdev: Any, kind: Any, lba: int, nblocks: int, buf: Any = None,
        **kw: Any) -> Any:
    """Submit on the reactor, wait for the completion; returns the finished BdevIO."""
    import concurrent.futures

    from blocktarget.bdev import BdevIO

    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def go() -> None:
        ch = bdev.get_io_channel(reactor)
        ch.submit(BdevIO(kind, lba, nblocks, buf, fut.set_result, **kw))

    reactor.send(go)
    return fut.result(timeout=10)


async def test_nvme_bdev_io_split_reset_detach(iommu: FakeIommu, stub_target: StubTarget) -> None:
    from blocktarget.bdev import IOType, Status
    from blocktarget.bdevs import nvme_pcie

    alloc = DmaAllocator(iommu, name="bdev", use_hugepages=False)
    dev = FakeNvme(iommu, blocks=8192, mdts=3, nsids=(1, 2))  # 32 KiB max transfer
    c = Controller(dev, alloc, name="Fake", options=Options(max_transfer=32 * 1024))
    c.init(2)
    names = await nvme_pcie.register_controller(stub_target, "Fake", "0000:00:04.0", c,
                                                {"name": "Fake", "traddr": "0000:00:04.0"})
    assert names == ["Faken1", "Faken2"]
    b1 = stub_target.bdevs.get("Faken1")
    assert b1.block_size == 512 and b1.num_blocks == 8192 and b1.write_cache
    assert {IOType.WRITE_ZEROES, IOType.UNMAP} <= b1.io_types
    assert b1.describe()["driver_specific"]["nvme"][0]["trid"]["traddr"] == "0000:00:04.0"
    entry = b1.config_entry()
    assert entry["method"] == "bdev_nvme_attach_controller"
    assert entry["params"] == {"name": "Fake", "trtype": "PCIe", "traddr": "0000:00:04.0"}
    assert stub_target.bdevs.get("Faken2").config_entry() is None
    r0, r1 = stub_target.reactors[0], stub_target.reactors[1]

    payload = bytes((i * 31 + 7) & 0xFF for i in range(300 * 512))  # split into 5 commands
    io = await asyncio.to_thread(_io, r0, b1, IOType.WRITE, 10, 300, payload, fua=True)
    assert io.status == Status.SUCCESS
    assert dev.storage[1][10 * 512:310 * 512] == payload
    writes = [op for q, op in dev.commands if q and op == spec.IoOpcode.WRITE]
    assert len(writes) == 5, "300 blocks over a 64-block max transfer"
    io = await asyncio.to_thread(_io, r1, b1, IOType.READ, 10, 300)
    assert io.status == 0 and bytes(io.buf) == payload, "read on the other reactor's queue"
    assert len({q for q, _ in dev.commands if q}) == 2, "one hardware queue per reactor"
    into = bytearray(8 * 512)
    io = await asyncio.to_thread(_io, r0, b1, IOType.READ, 10, 8, into)
    assert io.buf is into and into == payload[:8 * 512]
    assert (await asyncio.to_thread(_io, r0, b1, IOType.WRITE_ZEROES, 10, 4)).status == 0
    assert dev.storage[1][10 * 512:14 * 512] == bytes(4 * 512)
    assert (await asyncio.to_thread(_io, r0, b1, IOType.UNMAP, 14, 2)).status == 0
    assert dev.storage[1][14 * 512:16 * 512] == bytes(1024)
    assert (await asyncio.to_thread(_io, r0, b1, IOType.FLUSH, 0, 0)).status == 0
    io = await asyncio.to_thread(_io, r0, b1, IOType.READ, 8190, 4)
    assert io.status == Status.LBA_OUT_OF_RANGE

    # a reset while the device holds commands: they are re-submitted, not failed
    import concurrent.futures

    from blocktarget.bdev import BdevIO

    futs = [concurrent.futures.Future() for _ in range(6)]
    dev.hold_io = 3

    def burst() -> None:
        ch = b1.get_io_channel(r0)
        for i, f in enumerate(futs):
            ch.submit(BdevIO(IOType.WRITE, 1000 + i, 1, bytes([i + 1]) * 512, f.set_result))

    r0.send(burst).result(timeout=5)
    # the three the device does not hold complete (when the reactor's poller reaps them)
    for _ in range(500):
        if sum(f.done() for f in futs) >= 3:
            break
        await asyncio.sleep(0.01)
    assert sum(f.done() for f in futs) == 3
    await nvme_pcie.reset_pcie(stub_target, "Fake")
    done = [f.result(timeout=5) for f in futs]
    assert [d.status for d in done] == [0] * 6
    assert all(dev.storage[1][(1000 + i) * 512] == i + 1 for i in range(6))
    assert c.resets == 1

    # detach is refused while claimed, then gives everything back
    b1.claim("subsystem nqn.test")
    with pytest.raises(Exception, match="in use"):
        await nvme_pcie.detach_pcie(stub_target, "Fake")
    b1.release("subsystem nqn.test")
    await nvme_pcie.detach_pcie(stub_target, "Fake")
    assert len(stub_target.bdevs) == 0 and not dev.sqs and not iommu.maps
    assert not dev.cc & regs.CC_EN
    with pytest.raises(Exception, match="no NVMe PCIe controller"):
        await nvme_pcie.detach_pcie(stub_target, "Fake")


async def test_nvme_bdev_hot_remove_unregisters(iommu: FakeIommu,
                                                stub_target: StubTarget) -> None:
    from blocktarget.bdev import IOType
    from blocktarget.bdevs import nvme_pcie

    alloc = DmaAllocator(iommu, name="hr", use_hugepages=False)
    dev = FakeNvme(iommu)
    c = Controller(dev, alloc, name="Gone")
    c.init(2)
    await nvme_pcie.register_controller(stub_target, "Gone", "0000:00:05.0", c,
                                        {"name": "Gone", "traddr": "0000:00:05.0"})
    b = stub_target.bdevs.get("Gonen1")
    r0 = stub_target.reactors[0]
    assert (await asyncio.to_thread(_io, r0, b, IOType.FLUSH, 0, 0)).status == 0
    dev.hold_io = 1
    import concurrent.futures

    from blocktarget.bdev import BdevIO

    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    r0.send(lambda: b.get_io_channel(r0).submit(
        BdevIO(IOType.WRITE, 0, 1, bytes(512), fut.set_result))).result(5)
    dev.removed = True  # the poller's next health tick sees all ones
    io = await asyncio.wrap_future(fut)
    assert io.status == SC_ABORTED_SQ_DELETION
    for _ in range(100):
        if not len(stub_target.bdevs):
            break
        await asyncio.sleep(0.02)
    assert len(stub_target.bdevs) == 0, "a removed device's bdevs are unregistered"
    assert "Gone" not in [x.name for x in nvme_pcie.controllers()]


async def test_attach_pcie_errors_name_the_fix() -> None:
    from blocktarget.bdevs import nvme_pcie
    from blocktarget.errors import InvalidParams, RpcError

    with pytest.raises(InvalidParams, match="not a PCI address"):
        await nvme_pcie.attach_pcie(None, {"name": "X", "traddr": "zz"})
    with pytest.raises(RpcError, match="no PCI device 0000:7f:1f.7"):
        await nvme_pcie.attach_pcie(None, {"name": "X", "traddr": "7f:1f.7"})


async def test_attach_without_dma_memory_is_an_rpc_error_and_config_exit_2(
        iommu: FakeIommu, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """The attach that cannot get its DMA memory answers the RPC with -ENOMEM and the
    numbers, and a config with that line makes `blocktarget start` exit 2 before
    serving. The device behind VFIO is the fake controller (no IOMMU here); bring-up
    and the DMA allocator are the real ones."""
    import errno
    import json
    import os

    from blocktarget import app
    from blocktarget.bdevs import nvme_pcie
    from blocktarget.config import Settings
    from blocktarget.errors import RpcError
    from blocktarget.nvme.driver.dma import free_hugepages
    from blocktarget.rpc import call_method

    if free_hugepages() * HUGEPAGE_SIZE >= 32 << 20:
        pytest.skip("this machine has free hugepages: the shortage is not reached")
    iommu.iova_pgsizes = HUGEPAGE_SIZE  # no 4 KiB fallback

    def open_fake(bdf: str, *, name: str = "", options: Any = None, io_queues: int = 1,
                  use_hugepages: bool = True) -> Controller:
        a = DmaAllocator(iommu, name=name or bdf, use_hugepages=use_hugepages)
        c = Controller(FakeNvme(iommu), a, name=name or bdf, options=options)
        try:
            c.init(io_queues)
        except BaseException:
            a.close()
            raise
        return c

    monkeypatch.setattr(nvme_pcie, "open_pcie", open_fake)
    params = {"name": "D", "trtype": "PCIe", "traddr": "0000:01:00.0"}
    t = app.Target(Settings(cores=sorted(os.sched_getaffinity(0))[:1], rpc_http=None,
                            rpc_unix=None, metrics=False, pin=False))
    with pytest.raises(RpcError) as ei:
        await call_method(t, "bdev_nvme_attach_controller", params)
    assert ei.value.code == -errno.ENOMEM
    assert ei.value.message.startswith("cannot attach 0000:01:00.0: D: ")
    assert "MiB of DMA memory needed as 2 MiB hugepages" in ei.value.message
    assert not t.bdevs.find("Dn1") and not iommu.maps
    doc = {"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_attach_controller", "params": params}]}]}
    settings = Settings(cores=sorted(os.sched_getaffinity(0))[:1], rpc_http=None,
                        rpc_unix=str(tmp_path / "never.sock"), metrics=False, pin=False)
    with caplog.at_level("ERROR"):
        assert await app.run(settings, json.loads(json.dumps(doc)), "cfg.json") == 2
    assert "cfg.json: subsystems[0].config[0] (bdev_nvme_attach_controller): cannot attach " \
           "0000:01:00.0: D: " in caplog.text
    assert not (tmp_path / "never.sock").exists(), "nothing served"


async def test_spdk_attach_name_dispatches_pcie() -> None:
    """SPDK's bdev_nvme_attach_controller with trtype PCIe reaches this driver (and its
    error names the device), with the parameters SPDK's rpc.py sends."""
    from blocktarget.app import Target
    from blocktarget.errors import RpcError
    from blocktarget.rpc import call_method

    t = Target()
    with pytest.raises(RpcError, match="no PCI device 0000:7f:1f.7"):
        await call_method(t, "bdev_nvme_attach_controller",
                          {"name": "X", "trtype": "PCIe", "traddr": "0000:7f:1f.7",
                           "prchk_reftag": False, "prchk_guard": False})
    with pytest.raises(RpcError, match="does not exist"):
        await call_method(t, "bdev_nvme_detach_controller", {"name": "X"})
    assert await call_method(t, "bdev_nvme_get_controllers_pcie", {}) == []


async def test_target_shutdown_leaves_the_controller_shut_down(iommu: FakeIommu) -> None:
    """Stopping the target with a controller attached (no detach): channels close on the
    way down and the last namespace bdev shuts the controller down and unmaps its DMA."""
    import os

    from blocktarget.app import Target
    from blocktarget.bdev import IOType
    from blocktarget.bdevs import nvme_pcie
    from blocktarget.config import Settings

    t = Target(Settings(cores=sorted(os.sched_getaffinity(0))[:1], rpc_http=None,
                        rpc_unix=None, metrics=False, pin=False))
    await t.start()
    alloc = DmaAllocator(iommu, name="stop", use_hugepages=False)
    dev = FakeNvme(iommu)
    c = Controller(dev, alloc, name="Down")
    c.init(1)
    await nvme_pcie.register_controller(t, "Down", "0000:00:06.0", c,
                                        {"name": "Down", "traddr": "0000:00:06.0"})
    b = t.bdevs.get("Downn1")
    io = await asyncio.to_thread(_io, t.reactors[0], b, IOType.WRITE, 0, 8, bytes(4096))
    assert io.status == 0 and set(dev.sqs) == {0, 1}
    saved = t.save_config()
    calls = [e for s in saved["subsystems"] for e in s["config"]]
    assert [e["method"] for e in calls if e["params"].get("name") == "Down"] == [
        "bdev_nvme_attach_controller"]
    await t.stop()
    assert not dev.sqs and not dev.cc & regs.CC_EN, "queues deleted, controller disabled"
    assert dev.csts & regs.CSTS_SHST_MASK == 0  # disabled after the normal shutdown
    assert not iommu.maps, "DMA memory unmapped"
    assert "Down" not in [x.name for x in nvme_pcie.controllers()]


# ---------------------------------------------------------------------------
# VFIO errors an operator sees (fake sysfs; this host has no VFIO devices)


@pytest.fixture
def fake_sysfs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from blocktarget.nvme.driver import pci, vfio

    devs = tmp_path / "devices"
    devs.mkdir()
    monkeypatch.setattr(pci, "SYSFS_PCI", devs)
    monkeypatch.setattr(vfio, "SYSFS_PCI", devs)
    monkeypatch.setattr(vfio, "DEV_VFIO", tmp_path / "dev-vfio")
    return tmp_path


def _fake_dev(root: Any, bdf: str, driver: str | None, group: int | None) -> None:
    import os

    d = root / "devices" / bdf
    d.mkdir()
    if driver:
        (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        os.symlink(root / "drivers" / driver, d / "driver")
    if group is not None:
        (root / "groups" / str(group)).mkdir(parents=True, exist_ok=True)
        os.symlink(root / "groups" / str(group), d / "iommu_group")


def test_vfio_errors_name_the_fix(fake_sysfs: Any) -> None:
    from blocktarget.nvme.driver.vfio import Device, VfioError

    with pytest.raises(VfioError, match="no PCI device 0000:00:09.0"):
        Device("00:09.0")
    _fake_dev(fake_sysfs, "0000:00:04.0", "nvme", 3)
    with pytest.raises(VfioError, match=r"bound to nvme, not vfio-pci: run `blocktarget "
                                        r"setup --pci 0000:00:04.0`"):
        Device("0000:00:04.0")
    _fake_dev(fake_sysfs, "0000:00:05.0", "vfio-pci", None)
    with pytest.raises(VfioError, match="IOMMU is off.*intel_iommu=on"):
        Device("0000:00:05.0")
    _fake_dev(fake_sysfs, "0000:00:06.0", "vfio-pci", 7)
    with pytest.raises(VfioError, match="/dev/vfio/vfio does not exist.*blocktarget setup"):
        Device("0000:00:06.0")


def test_normalize_bdf() -> None:
    from blocktarget.nvme.driver.pci import normalize_bdf

    assert normalize_bdf("00:04.0") == "0000:00:04.0"
    assert normalize_bdf("0000:5E:00.1") == "0000:5e:00.1"
    with pytest.raises(ValueError, match="not a PCI address"):
        normalize_bdf("5e:00")


# ---------------------------------------------------------------------------
# the ring state in C (driver/cring.py): the Python path over it


def _wait_until(q: QueuePair, cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not reached"
        q.process_completions()
        time.sleep(0.0005)


@pytest.fixture
def membar(iommu: FakeIommu, alloc: DmaAllocator) -> Any:
    devs: list[MemBarNvme] = []

    def make(**kw: Any) -> tuple[MemBarNvme, Controller]:
        opts = kw.pop("options", None) or Options()
        dev = MemBarNvme(iommu, **kw)
        devs.append(dev)
        c = Controller(dev, alloc, name="fake", options=opts)
        c.init(1)
        return dev, c

    yield make
    for d in devs:
        d.stop()


cring_built = pytest.mark.skipif(not cring.available(MemBarNvme.__new__(MemBarNvme)),
                                 reason="the C lane is not built")


@cring_built
def test_c_ring_python_path_roundtrip(membar: Any) -> None:
    """With the ring state in C, the Python path keeps the low command ids and its I/O
    goes through the same doorbells and CQ the lane uses."""
    dev, c = membar()
    q = c.create_io_queue(16)
    # 15 command ids: the Python path's 0..7, the lane's 8..14
    assert q.cring is not None and q.cring.cid0 == 8 and len(q.trackers) == 8
    buf = q.get_buffer()
    assert buf is not None
    payload = bytes((i * 5) & 0xFF for i in range(16384))
    buf.mem[:len(payload)] = payload
    prp1, prp2 = buffer_prps(buf, len(payload))
    out: list[int] = []
    q.submit(spec.IoOpcode.WRITE, 1, prp1=prp1, prp2=prp2, cdw10=40, cdw12=31,
             cb=lambda st, dw0: out.append(st))
    _wait_until(q, lambda: out)
    assert out == [0] and dev.storage[1][40 * 512:40 * 512 + 16384] == payload
    assert q.cring.c.doorbells >= 1 and q.cring.c.sq_tail == 1 and q.cring.c.cq_head == 1
    assert struct.unpack_from("<H", q.sq.mem, 2)[0] < q.cring.cid0  # (the SQE's cid)
    c.close()


@cring_built
def test_c_ring_reset_resubmits_python_commands(membar: Any) -> None:
    dev, c = membar()
    q = c.create_io_queue(16)
    results: list[int] = []
    dev.hold_io = 3
    for _ in range(6):
        q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: results.append(st))
    _wait_until(q, lambda: len(results) == 3)
    assert q.outstanding == 3
    c.reset_sync()
    _wait_until(q, lambda: len(results) == 6)
    assert results == [0] * 6 and q.resubmitted == 3
    assert q.cring.c.suspended == 0
    c.close()


@cring_built
def test_c_ring_timeout_abort_and_device_gone(membar: Any) -> None:
    dev, c = membar(options=Options(io_timeout_s=0.05))
    q = c.create_io_queue(8)
    out: list[int] = []
    dev.hold_io = 1
    q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    _wait_until(q, lambda: len(dev.held) == 1)
    time.sleep(0.06)
    c.tick(q)
    assert c.aborts_sent == 1
    _wait_until(q, lambda: out)
    assert out == [0x007]
    dev.hold_io = 1
    q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    _wait_until(q, lambda: len(dev.held) == 1)
    assert q.fail_all() == 1 and out == [0x007, SC_ABORTED_SQ_DELETION]
    assert q.cring.c.dead == 1
    c.close()


@cring_built
def test_c_ring_ticks_on_a_machine_up_for_less_than_the_timeout(membar: Any) -> None:
    """The monotonic clock counts from boot: a guest up for 4 s with the 30 s I/O timeout
    ticks with a cut-off before the clock's start. That once raised OverflowError (C's
    clock is unsigned), which unregistered the queue's poller: nothing on the queue was
    ever completed again (the VFIO guest's hot-remove test timed out on its first write)."""
    dev, c = membar(options=Options(io_timeout_s=1e9))
    q = c.create_io_queue(8)
    out: list[int] = []
    dev.hold_io = 1
    q.submit(spec.IoOpcode.FLUSH, 1, cb=lambda st, dw0: out.append(st))
    _wait_until(q, lambda: len(dev.held) == 1)
    c.tick(q)  # (raised)
    assert c.aborts_sent == 0 and q.cring.expired(-1) == []
    dev.release_held()
    _wait_until(q, lambda: out == [0])
    c.close()
