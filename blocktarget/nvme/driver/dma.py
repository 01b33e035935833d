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

IOVAs are assigned by us, not derived from virtual addresses: an emulated or small IOMMU
may offer only 39 address bits, less than a user virtual address can need.

A :class:`BufferPool` hands out fixed-size buffers to one queue pair: it belongs to the
reactor that owns the queue, so get/put need no lock; only growing it takes the
allocator's lock.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from .vfio import (
    MADV_DONTFORK,
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
    path = f"/sys/kernel/mm/hugepages/hugepages-{size // 1024}kB/free_hugepages"
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


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


def _mmap_anon(size: int, hugepage_size: int | None) -> Any:
    flags = MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE
    if hugepage_size:
        flags |= MAP_HUGETLB | (hugepage_size.bit_length() - 1) << MAP_HUGE_SHIFT
    addr = libc.mmap(ffi.NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr == MAP_FAILED:
        return None
    libc.madvise(addr, size, MADV_DONTFORK)
    return addr


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
        if self.use_hugepages:
            addr = _mmap_anon(size, hp)
            huge = addr is not None
        if addr is None:
            if not self.mapper.iova_pgsizes & PAGE_SIZE:
                raise DmaError(
                    f"{self.name}: no free {hp >> 20} MiB hugepage for {size} bytes and the "
                    "IOMMU cannot map 4 KiB pages: reserve hugepages "
                    "(`blocktarget setup --hugemem MiB`)")
            addr = _mmap_anon(size, None)
            if addr is None:
                raise DmaError(f"{self.name}: cannot allocate {size} bytes: "
                               f"{os.strerror(ffi.errno)}")
            if not self._warned_4k:
                self._warned_4k = True
                why = "disabled" if not self.use_hugepages else "none free"
                log.warning("%s: hugepages %s; using 4 KiB pages for DMA (the IOMMU maps "
                            "them to contiguous IOVAs; expect more IOTLB misses). Reserve "
                            "hugepages with `blocktarget setup --hugemem`", self.name, why)
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
                # a memoryview of it is still referenced somewhere; leave the mapping
                log.debug("%s: region at IOVA %#x still referenced; not unmapped", self.name,
                          r.iova)


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
