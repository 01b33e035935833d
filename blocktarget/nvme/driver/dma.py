"""DMA memory: pinned, IOMMU-mapped buffers the controller can read and write.

Memory comes from 2 MiB hugepages (anonymous ``MAP_HUGETLB``, reserved by
``blocktarget setup --hugemem``): one IOTLB entry covers a whole page, a page is
physically contiguous, and hugetlb pages are never swapped, migrated or merged, so the
translation the IOMMU holds stays valid. When no hugepage is free we fall back to 4 KiB
pages, but only when the IOMMU maps 4 KiB pages: the IOMMU then makes scattered physical
pages one contiguous IOVA range, so rings and PRP lists still work. The log states which
memory is used. Without an IOMMU there is no fallback (vfio refuses earlier).

Mappings are ``MAP_SHARED`` and ``MADV_DONTFORK``: a private mapping would turn
copy-on-write after a ``fork()`` (subprocess, multiprocessing) and our next store would
land in a fresh page while the device keeps DMA-ing into the old, pinned one.

Fail fast: every region is faulted in when it is mapped (``MADV_POPULATE_WRITE``, or
``mlock`` on kernels before 5.14), so memory the kernel cannot back is an error at that
moment, raised to whoever asked (the attach RPC or the config line), instead of a SIGBUS
that kills the target on first touch (a hugetlb cgroup limit, a cpuset without pages;
``MAP_POPULATE`` alone ignores such failures). The driver also reserves, when a
controller is attached, all the memory its I/O queues will use (:meth:`DmaAllocator.reserve`),
so a short pool fails the attach, not an I/O an hour later. When hugepage pools already
take more of the machine than it can spare (blocktarget/memory.py) the allocator logs a
warning at creation: an OOM kill leaves no message of its own.

IOVAs are assigned by us, not derived from virtual addresses: an emulated or small IOMMU
may offer only 39 address bits, less than a user virtual address can need.

A :class:`BufferPool` hands out fixed-size buffers to one queue pair: it belongs to the
reactor that owns the queue, so get/put need no lock; only growing it takes the
allocator's lock.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ...memory import MEMINFO, max_hugemem_kb, mib, min_left_kb, read_meminfo
from .vfio import (
    MADV_DONTFORK,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FAILED,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    MAP_POPULATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    ffi,
    libc,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
HUGEPAGE_SIZE = 2 << 20


class DmaMapper(Protocol):
    """The IOMMU side: hands out IOVAs and installs translations (vfio.Container)."""

    iova_pgsizes: int

    def alloc_iova(self, size: int, align: int) -> int: ...

    def map_dma(self, vaddr: int, iova: int, size: int) -> None: ...

    def unmap_dma(self, iova: int, size: int) -> None: ...


class DmaError(MemoryError):
    """DMA memory could not be had; the message names the knob to turn."""


def default_hugepage_size() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return HUGEPAGE_SIZE


def free_hugepages(size: int = HUGEPAGE_SIZE) -> int:
    return _hugepage_count(size, "free_hugepages")


def reserved_hugepages(size: int = HUGEPAGE_SIZE) -> int:
    """The pool's size (nr_hugepages), free or not."""
    return _hugepage_count(size, "nr_hugepages")


def _hugepage_count(size: int, what: str) -> int:
    path = f"/sys/kernel/mm/hugepages/hugepages-{size // 1024}kB/{what}"
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def populate(addr: Any, size: int) -> int:
    """Fault in every page of a fresh mapping now; 0, or the errno of the failure.

    ``MADV_POPULATE_WRITE`` reports what a first touch would have turned into SIGBUS
    (EFAULT) or an OOM (ENOMEM). Kernels before 5.14 reject it (EINVAL): ``mlock`` then
    faults the pages in and reports failures too (it needs the memlock limit that
    VFIO's pinning needs anyway)."""
    if libc.madvise(addr, size, MADV_POPULATE_WRITE) == 0:
        return 0
    err = ffi.errno
    if err != errno.EINVAL:
        return err
    if libc.mlock(addr, size) == 0:
        return 0
    return ffi.errno or errno.ENOMEM


def hugepage_pressure(meminfo: str | Path = MEMINFO) -> str:
    """A warning when hugepage pools hold more than the system can spare (memory.py),
    else ''. Said in the target's log because the OOM kill it leads to says nothing."""
    info = read_meminfo(meminfo)
    total = info.get("MemTotal", 0)
    held = info.get("Hugetlb", info.get("HugePages_Total", 0) * info.get("Hugepagesize", 0))
    if not total or held <= max_hugemem_kb(total):
        return ""
    return (f"hugepage pools hold {mib(held)} of this machine's {mib(total)}, leaving the "
            f"system less than the {mib(min_left_kb(total))} it should keep: this process "
            "or another may be killed by the OOM killer; give pages back with `blocktarget "
            "setup reset --release-hugepages` and reserve what `blocktarget setup status` "
            "advises")


@dataclass(eq=False)
class DmaRegion:
    """One mmap, mapped at one IOVA range; freed as a whole."""

    addr: Any  # cffi void*
    vaddr: int
    iova: int
    size: int
    hugepages: bool
    mem: memoryview

    def release(self) -> None:
        self.mem.release()
        libc.munmap(self.addr, self.size)


@dataclass(eq=False)
class DmaBuffer:
    """A slice of a region: ``mem`` for the CPU, ``iova`` for the device."""

    iova: int
    size: int
    mem: memoryview
    vaddr: int
    region: DmaRegion | None = None
    # PRP list precomputed for this buffer by the queue pair that uses it (see qpair)
    prp_list: DmaBuffer | None = None
    align: int = PAGE_SIZE

    def view(self, length: int) -> memoryview:
        return self.mem[:length]


def _mmap_anon(size: int, hugepage_size: int | None) -> tuple[Any, int]:
    """A populated shared anonymous mapping: (address, 0), or (None, errno) when the
    kernel refuses it or cannot back every page of it (then nothing stays mapped)."""
    flags = MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE
    if hugepage_size:
        flags |= MAP_HUGETLB | (hugepage_size.bit_length() - 1) << MAP_HUGE_SHIFT
    addr = libc.mmap(ffi.NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr == MAP_FAILED:
        return None, ffi.errno
    err = populate(addr, size)
    if err:
        libc.munmap(addr, size)
        return None, err
    libc.madvise(addr, size, MADV_DONTFORK)
    return addr, 0


class DmaAllocator:
    """Carves DMA buffers out of IOMMU-mapped regions; thread safe (one lock).

    Freed buffers go on a free list per (size, alignment) and are reused for the next
    request of that shape: the driver allocates only a few shapes (rings, PRP-list
    pages, data buffers), so this never fragments in practice and needs no coalescing.
    """

    def __init__(
        self,
        mapper: DmaMapper,
        *,
        name: str = "dma",
        hugepage_size: int | None = None,
        use_hugepages: bool = True,
        region_size: int | None = None,
        meminfo: str | Path = MEMINFO,
    ) -> None:
        self.mapper = mapper
        self.name = name
        self.hugepage_size = hugepage_size or default_hugepage_size()
        self.use_hugepages = use_hugepages
        self.region_size = region_size or self.hugepage_size
        self.regions: list[DmaRegion] = []
        self._free: dict[tuple[int, int], list[DmaBuffer]] = {}
        self._cur: DmaRegion | None = None
        self._cur_off = 0
        self._lock = threading.Lock()
        self._warned_4k = False
        self.closed = False
        if use_hugepages and (warning := hugepage_pressure(meminfo)):
            log.warning("%s: %s", name, warning)

    # ---- stats ----
    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def hugepage_bytes(self) -> int:
        return sum(r.size for r in self.regions if r.hugepages)

    def describe(self) -> dict[str, Any]:
        return {"regions": len(self.regions), "mapped_bytes": self.mapped_bytes,
                "hugepage_bytes": self.hugepage_bytes,
                "page_kind": "2MiB-hugepages" if self.hugepage_bytes == self.mapped_bytes
                else "mixed/4KiB"}

    # ---- regions ----
    def _new_region(self, size: int) -> DmaRegion:
        hp = self.hugepage_size
        size = (size + hp - 1) // hp * hp
        addr = None
        huge = False
        huge_err = 0
        if self.use_hugepages:
            addr, huge_err = _mmap_anon(size, hp)
            huge = addr is not None
        if addr is None:
            if not self.mapper.iova_pgsizes & PAGE_SIZE:
                raise DmaError(self._no_hugepages(size, huge_err))
            addr, err = _mmap_anon(size, None)
            if addr is None:
                raise DmaError(f"{self.name}: cannot get {mib(size >> 10)} of DMA memory "
                               f"(4 KiB pages, as {self._why_not_huge(huge_err)}): "
                               f"{os.strerror(err)}")
            if not self._warned_4k:
                self._warned_4k = True
                log.warning("%s: %s; using 4 KiB pages for DMA (the IOMMU maps them to "
                            "contiguous IOVAs; expect more IOTLB misses). Reserve hugepages "
                            "with `blocktarget setup --hugemem`", self.name,
                            self._why_not_huge(huge_err))
            libc.mlock(addr, size)
        vaddr = int(ffi.cast("uintptr_t", addr))
        try:
            iova = self.mapper.alloc_iova(size, hp)
            self.mapper.map_dma(vaddr, iova, size)
        except BaseException:
            libc.munmap(addr, size)
            raise
        mem = memoryview(ffi.buffer(addr, size))
        region = DmaRegion(addr, vaddr, iova, size, huge, mem)
        self.regions.append(region)
        log.info("%s: mapped %d KiB of %s at IOVA %#x", self.name, size >> 10,
                 f"{hp >> 20} MiB hugepages" if huge else "4 KiB pages", iova)
        return region

    def _why_not_huge(self, err: int) -> str:
        if not self.use_hugepages:
            return "hugepages are disabled"
        return f"no {self.hugepage_size >> 20} MiB hugepages to be had ({os.strerror(err)})"

    def _no_hugepages(self, size: int, err: int) -> str:
        hp = self.hugepage_size
        free, pool = free_hugepages(hp), reserved_hugepages(hp)
        if err == errno.EFAULT:  # mapped, but the pages could not be faulted in
            why = ("the kernel could not fault them in (a hugetlb cgroup limit or a cpuset "
                   "without free pages; a first touch would have been SIGBUS)")
        else:
            why = f"{free} of the pool's {pool} are free ({os.strerror(err)})"
        return (f"{self.name}: {mib(size >> 10)} of DMA memory needed as {hp >> 20} MiB "
                f"hugepages ({size // hp} pages), but {why}, and the IOMMU cannot map "
                "4 KiB pages instead: reserve more (`blocktarget setup --hugemem MiB`; "
                "`blocktarget setup status` shows what this machine can spare) or stop "
                "what holds them")

    def reserve(self, nbytes: int) -> None:
        """Map ``nbytes`` now, so the allocations that follow (up to that much, padding
        included) need no new mapping: whoever attaches a device learns at once whether
        its DMA memory is there, instead of an I/O failing for it later. Raises
        DmaError, with nothing new mapped, when the memory cannot be had."""
        with self._lock:
            if self.closed:
                raise DmaError(f"{self.name}: allocator is closed")
            have = self._cur.size - self._cur_off if self._cur is not None else 0
            if nbytes <= have:
                return
            self._cur = self._new_region(nbytes)
            self._cur_off = 0

    def alloc(self, size: int, align: int = PAGE_SIZE) -> DmaBuffer:
        """A zero-filled buffer of ``size`` bytes aligned to ``align`` (power of two)."""
        if self.closed:
            raise DmaError(f"{self.name}: allocator is closed")
        if size <= 0 or align & (align - 1):
            raise ValueError("size must be positive and align a power of two")
        with self._lock:
            free = self._free.get((size, align))
            if free:
                buf = free.pop()
                buf.mem[:] = bytes(size)
                return buf
            off = (self._cur_off + align - 1) & ~(align - 1)
            if self._cur is None or off + size > self._cur.size:
                self._cur = self._new_region(max(size, self.region_size))
                off = 0
            region = self._cur
            self._cur_off = off + size
        buf = DmaBuffer(region.iova + off, size, region.mem[off:off + size], region.vaddr + off,
                        region, align=align)
        buf.mem[:] = bytes(size)
        return buf

    def free(self, buf: DmaBuffer) -> None:
        """Back on the free list of its shape; the memory stays mapped for reuse."""
        with self._lock:
            self._free.setdefault((buf.size, buf.align), []).append(buf)

    def close(self) -> None:
        """Unmap and free everything; buffers handed out are invalid afterwards."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for r in self.regions:
                try:
                    self.mapper.unmap_dma(r.iova, r.size)
                except OSError as exc:  # device already gone: the memory is still ours
                    log.debug("%s: unmap of IOVA %#x failed: %s", self.name, r.iova, exc)
            self._free.clear()
            regions, self.regions = self.regions, []
            self._cur = None
        for r in regions:
            try:
                r.release()
            except BufferError:
                # a memoryview of it is still referenced somewhere: unmapping would turn
                # that reader's next access into a SIGSEGV, so the mapping stays (said
                # aloud: it is memory the process keeps until it exits)
                log.warning("%s: DMA region at IOVA %#x (%d KiB) still referenced at close: "
                            "left mapped", self.name, r.iova, r.size // 1024)


@dataclass(eq=False)
class BufferPool:
    """Fixed-size DMA buffers for one queue pair, grown on demand up to ``max_count``.

    Owned by one reactor: ``get``/``put`` are plain list operations. Growth allocates
    from the shared allocator in chunks (one hugepage worth when buffers are small)."""

    allocator: DmaAllocator
    buf_size: int
    max_count: int
    grow_by: int = 0
    free: list[DmaBuffer] = field(default_factory=list)
    count: int = 0
    # what get() took from the allocator, to give back in release()
    chunks: list[DmaBuffer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.buf_size % PAGE_SIZE:
            raise ValueError("buffer size must be a multiple of 4 KiB")
        if not self.grow_by:
            self.grow_by = max(1, HUGEPAGE_SIZE // self.buf_size)

    def get(self) -> DmaBuffer | None:
        """A buffer, or None when ``max_count`` are out (the caller queues the I/O)."""
        if self.free:
            return self.free.pop()
        if self.count >= self.max_count:
            return None
        n = min(self.grow_by, self.max_count - self.count)
        chunk = self.allocator.alloc(self.buf_size * n, PAGE_SIZE)
        self.chunks.append(chunk)
        for i in range(n):
            off = i * self.buf_size
            self.free.append(DmaBuffer(chunk.iova + off, self.buf_size,
                                       chunk.mem[off:off + self.buf_size], chunk.vaddr + off,
                                       chunk.region))
        self.count += n
        return self.free.pop()

    def put(self, buf: DmaBuffer) -> None:
        self.free.append(buf)

    def preallocate(self, n: int) -> None:
        got = [b for b in (self.get() for _ in range(n)) if b is not None]
        self.free.extend(got)

    @property
    def in_use(self) -> int:
        return self.count - len(self.free)

    def release(self) -> bool:
        """Give the pool's memory (and the PRP lists built for its buffers) back to the
        allocator's free lists, for the next queue pair: without this every queue pair
        torn down left its pool mapped until the controller closed. Only once every
        buffer is back: one still out may be read by a socket or written by the device,
        so then the pool keeps its memory (the allocator's close unmaps it). Call after
        the device's queue is deleted. Returns whether the memory went."""
        if self.in_use:
            log.warning("%s: queue pair torn down with %d data buffer(s) out: their DMA "
                        "memory stays reserved until the controller closes",
                        self.allocator.name, self.in_use)
            return False
        for buf in self.free:
            if buf.prp_list is not None:
                self.allocator.free(buf.prp_list)
                buf.prp_list = None
        for chunk in self.chunks:
            self.allocator.free(chunk)
        self.free.clear()
        self.chunks.clear()
        self.count = 0
        return True
