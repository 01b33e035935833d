"""VFIO: hand a PCI function to this process, safely, through the IOMMU.

The kernel's vfio-pci driver owns the device; we get three file descriptors — the
container (an IOMMU address space), the group (the smallest set of devices the IOMMU can
isolate) and the device — and do everything else with ioctls on them: map BAR0 for the
registers, switch on bus mastering in config space, and map our DMA memory at IOVAs of
our choosing (``VFIO_IOMMU_MAP_DMA``), which is what makes user-space DMA safe: the
device can reach exactly the memory we mapped and nothing else.

System calls go through cffi in ABI mode against libc (``ioctl``, ``mmap``, ``munmap``,
``madvise``): no compiler is needed at install time, and MMIO accesses through cffi
pointers are single loads/stores of the declared width, which registers need (a Python
``mmap`` slice is a ``memcpy`` that may split or repeat an access).

One container per process (as SPDK does): every attached device shares one IOVA space,
so DMA memory mapped once is usable by all of them, and two devices of one IOMMU group
can coexist. Errors are worded for the operator, naming the fix: missing IOMMU, device
not bound to vfio-pci, group not viable (and which devices spoil it), no permission.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cffi import FFI

from .pci import SYSFS_PCI, group_devices, iommu_group, normalize_bdf, pci_driver

log = logging.getLogger(__name__)

ffi = FFI()
ffi.cdef(
    """
    int ioctl(int fd, unsigned long request, ...);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int madvise(void *addr, size_t length, int advice);
    int mlock(const void *addr, size_t len);
    """
)
libc: Any = ffi.dlopen(None)

# mmap/madvise constants (x86-64 / generic Linux values)
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MADV_DONTFORK = 10
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in now, an error instead of SIGBUS
MAP_FAILED = ffi.cast("void *", -1)

# ioctl numbers: _IO(';', 100 + n)
_VFIO_BASE = (ord(";") << 8) | 100
VFIO_GET_API_VERSION = _VFIO_BASE + 0
VFIO_CHECK_EXTENSION = _VFIO_BASE + 1
VFIO_SET_IOMMU = _VFIO_BASE + 2
VFIO_GROUP_GET_STATUS = _VFIO_BASE + 3
VFIO_GROUP_SET_CONTAINER = _VFIO_BASE + 4
VFIO_GROUP_UNSET_CONTAINER = _VFIO_BASE + 5
VFIO_GROUP_GET_DEVICE_FD = _VFIO_BASE + 6
VFIO_DEVICE_GET_INFO = _VFIO_BASE + 7
VFIO_DEVICE_GET_REGION_INFO = _VFIO_BASE + 8
VFIO_DEVICE_GET_IRQ_INFO = _VFIO_BASE + 9
VFIO_DEVICE_SET_IRQS = _VFIO_BASE + 10
VFIO_DEVICE_RESET = _VFIO_BASE + 11
VFIO_IOMMU_GET_INFO = _VFIO_BASE + 12
VFIO_IOMMU_MAP_DMA = _VFIO_BASE + 13
VFIO_IOMMU_UNMAP_DMA = _VFIO_BASE + 14

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_IRQ_INFO_EVENTFD = 1 << 0

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_COMMAND_INTX_DISABLE = 1 << 10

DEV_VFIO = Path("/dev/vfio")

_GROUP_STATUS = struct.Struct("<II")
_DEVICE_INFO = struct.Struct("<IIIIII")
_REGION_INFO = struct.Struct("<IIIIQQ")
_IRQ_INFO = struct.Struct("<IIII")
_IRQ_SET_HDR = struct.Struct("<IIIII")
_IOMMU_INFO = struct.Struct("<IIQII")
_CAP_HDR = struct.Struct("<HHI")
_DMA_MAP = struct.Struct("<IIQQQ")
_DMA_UNMAP = struct.Struct("<IIQQ")


class VfioError(OSError):
    """A VFIO step failed; the message says what to do about it."""


def _ioctl(fd: int, request: int, arg: Any = None) -> int:
    """ioctl via libc; ``arg`` is None, an int, or a writable buffer (updated in place).

    Not ``fcntl.ioctl``: with a buffer it returns the buffer, not the ioctl's value,
    and GROUP_GET_DEVICE_FD returns the new fd as the value.
    """
    if arg is None:
        rc = libc.ioctl(fd, request)
    elif isinstance(arg, int):
        rc = libc.ioctl(fd, request, ffi.cast("unsigned long", arg))
    else:
        buf = ffi.from_buffer(arg)
        rc = libc.ioctl(fd, request, ffi.cast("void *", buf))
    if rc < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return int(rc)


# ---------------------------------------------------------------------------
# sysfs helpers (also used by `blocktarget setup`)


def noiommu_mode() -> bool:
    try:
        return Path("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode").read_text()[0] in "Y1"
    except OSError:
        return False


def iommu_present() -> bool:
    """Any IOMMU group at all means the kernel runs an IOMMU (intel_iommu=on, amd, smmu)."""
    try:
        return any(Path("/sys/kernel/iommu_groups").iterdir())
    except OSError:
        return False


# ---------------------------------------------------------------------------
# container (process-wide)


@dataclass(frozen=True)
class IovaRange:
    start: int
    end: int  # inclusive, as the kernel reports it


class Container:
    """The process's one IOMMU address space; groups join it, DMA maps go into it."""

    _instance: Container | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            self.fd = os.open(DEV_VFIO / "vfio", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioError(
                errno.ENOENT,
                "/dev/vfio/vfio does not exist: the vfio module is not loaded "
                "(run `blocktarget setup`, or `modprobe vfio-pci`)",
            ) from None
        except PermissionError:
            raise VfioError(errno.EACCES, "no permission to open /dev/vfio/vfio (run as root)") \
                from None
        try:
            version = _ioctl(self.fd, VFIO_GET_API_VERSION)
            if version != VFIO_API_VERSION:
                raise VfioError(errno.EINVAL, f"unknown VFIO API version {version} "
                                f"(this driver speaks {VFIO_API_VERSION})")
            if not _ioctl(self.fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU):
                if _ioctl(self.fd, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU):
                    raise VfioError(errno.ENODEV, "VFIO is in no-IOMMU mode: user-space DMA "
                                    "would be unprotected and needs physical addresses; "
                                    "this driver requires an IOMMU (intel_iommu=on or "
                                    "amd_iommu=on on the kernel command line)")
                raise VfioError(errno.ENODEV, "the kernel's VFIO has no type1v2 IOMMU "
                                "backend (vfio_iommu_type1 not loaded, or no IOMMU)")
        except BaseException:
            os.close(self.fd)
            raise
        self.iommu_set = False
        self.groups: dict[int, Group] = {}
        self.iova_ranges: list[IovaRange] = []
        self.iova_pgsizes = 0
        self.refs = 0
        self._iova_next: int | None = None
        self._iova_lock = threading.Lock()

    @classmethod
    def get(cls) -> Container:
        with cls._lock:
            if cls._instance is None:
                cls._instance = Container()
            cls._instance.refs += 1
            return cls._instance

    def put(self) -> None:
        with Container._lock:
            self.refs -= 1
            if self.refs <= 0 and Container._instance is self:
                Container._instance = None
                for g in list(self.groups.values()):
                    g.close()
                os.close(self.fd)

    def _after_first_group(self) -> None:
        _ioctl(self.fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        self.iommu_set = True
        self._read_iommu_info()

    def _read_iommu_info(self) -> None:
        """Page sizes and valid IOVA ranges (the MSI window and reserved regions are
        holes; mapping into one fails with EINVAL, so the allocator must avoid them)."""
        argsz = _IOMMU_INFO.size
        for _ in range(2):
            buf = bytearray(max(argsz, _IOMMU_INFO.size))
            _IOMMU_INFO.pack_into(buf, 0, len(buf), 0, 0, 0, 0)
            _ioctl(self.fd, VFIO_IOMMU_GET_INFO, buf)
            got_argsz, flags, pgsizes, cap_off, _ = _IOMMU_INFO.unpack_from(buf)
            if got_argsz > len(buf):
                argsz = got_argsz
                continue
            break
        self.iova_pgsizes = pgsizes if flags & VFIO_IOMMU_INFO_PGSIZES else 0
        ranges: list[IovaRange] = []
        if flags & VFIO_IOMMU_INFO_CAPS:
            for cap_id, _ver, off in _caps(buf, cap_off):
                if cap_id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                    (n,) = struct.unpack_from("<I", buf, off + _CAP_HDR.size)
                    base = off + _CAP_HDR.size + 8
                    for i in range(n):
                        start, end = struct.unpack_from("<QQ", buf, base + 16 * i)
                        ranges.append(IovaRange(start, end))
        self.iova_ranges = ranges or [IovaRange(0, (1 << 39) - 1)]
        log.debug("VFIO IOMMU page sizes %#x, IOVA ranges %s", self.iova_pgsizes,
                  [(hex(r.start), hex(r.end)) for r in self.iova_ranges])

    def open_group(self, group: int) -> Group:
        g = self.groups.get(group)
        if g is None:
            g = Group(self, group)
            self.groups[group] = g
        return g

    # ---- IOVA space and DMA mappings ----
    def alloc_iova(self, size: int, align: int) -> int:
        """A fresh IOVA range inside the IOMMU's valid ranges, never reused in this
        process: a stale device access can then never hit someone else's buffer."""
        with self._iova_lock:
            cur = self._iova_next if self._iova_next is not None else 1 << 32
            for r in sorted(self.iova_ranges, key=lambda r: r.start):
                start = max(cur, r.start)
                start = (start + align - 1) & ~(align - 1)
                if start + size - 1 <= r.end:
                    self._iova_next = start + size
                    return start
            raise VfioError(errno.ENOSPC, f"no IOVA space left for {size} bytes")

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        buf = bytearray(_DMA_MAP.pack(_DMA_MAP.size,
                                      VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                      vaddr, iova, size))
        try:
            _ioctl(self.fd, VFIO_IOMMU_MAP_DMA, buf)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.ENOMEM:
                hint = " (locked-memory limit: raise `ulimit -l` or run as root)"
            elif exc.errno == errno.ENOSPC:
                hint = " (vfio_iommu_type1 dma_entry_limit reached)"
            raise VfioError(exc.errno, f"VFIO_IOMMU_MAP_DMA of {size} bytes at IOVA "
                            f"{iova:#x} failed: {exc.strerror}{hint}") from None

    def unmap_dma(self, iova: int, size: int) -> None:
        buf = bytearray(_DMA_UNMAP.pack(_DMA_UNMAP.size, 0, iova, size))
        _ioctl(self.fd, VFIO_IOMMU_UNMAP_DMA, buf)


def _caps(buf: bytes | bytearray, off: int) -> Iterator[tuple[int, int, int]]:
    seen = 0
    while off and off + _CAP_HDR.size <= len(buf) and seen < 64:
        cap_id, ver, nxt = _CAP_HDR.unpack_from(buf, off)
        yield cap_id, ver, off
        off = nxt
        seen += 1


class Group:
    """An IOMMU group: viable only when every device in it is bound to vfio-pci (or to
    no driver), because the IOMMU cannot keep a kernel driver's device out of ours."""

    def __init__(self, container: Container, group: int) -> None:
        self.container = container
        self.number = group
        path = DEV_VFIO / str(group)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioError(errno.ENOENT, f"{path} does not exist: no device of IOMMU group "
                            f"{group} is bound to vfio-pci (run `blocktarget setup`)") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise VfioError(errno.EBUSY, f"{path} is busy: another process (a VM, "
                                "another target) has this IOMMU group open") from None
            raise
        try:
            st = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
            _ioctl(self.fd, VFIO_GROUP_GET_STATUS, st)
            _, flags = _GROUP_STATUS.unpack(st)
            if not flags & VFIO_GROUP_FLAGS_VIABLE:
                others = [f"{d} ({pci_driver(d) or 'no driver'})" for d in group_devices(group)]
                raise VfioError(errno.EPERM, f"IOMMU group {group} is not viable: every "
                                "device in it must be bound to vfio-pci or have no driver; "
                                f"the group holds {', '.join(others) or '?'}")
            _ioctl(self.fd, VFIO_GROUP_SET_CONTAINER,
                   bytearray(struct.pack("<i", container.fd)))
            if not container.iommu_set:
                container._after_first_group()
        except BaseException:
            os.close(self.fd)
            raise
        self.devices = 0

    def open_device(self, bdf: str) -> int:
        # the ioctl's return value is the new fd: libc, not fcntl
        name = ffi.new("char[]", bdf.encode())
        fd = libc.ioctl(self.fd, VFIO_GROUP_GET_DEVICE_FD, ffi.cast("void *", name))
        if fd < 0:
            err = ffi.errno
            raise VfioError(err, f"VFIO_GROUP_GET_DEVICE_FD({bdf}) failed: {os.strerror(err)}")
        self.devices += 1
        return int(fd)

    def device_closed(self) -> None:
        self.devices -= 1

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            _ioctl(self.fd, VFIO_GROUP_UNSET_CONTAINER)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        self.container.groups.pop(self.number, None)


# ---------------------------------------------------------------------------
# device


@dataclass(frozen=True)
class Region:
    index: int
    flags: int
    size: int
    offset: int
    sparse: tuple[tuple[int, int], ...] = ()  # mmap-able (offset, size) areas, if sparse


class MappedBar:
    """A BAR mapped into our address space; 32-bit accesses through a cffi pointer are
    single ``mov`` instructions, which is what MMIO needs."""

    def __init__(self, addr: Any, size: int) -> None:
        self._addr = addr
        self.size = size
        self._u32 = ffi.cast("uint32_t *", addr)

    def read32(self, offset: int) -> int:
        return int(self._u32[offset >> 2])

    def write32(self, offset: int, value: int) -> None:
        self._u32[offset >> 2] = value

    def doorbell(self, offset: int) -> Any:
        """A bound writer for one doorbell, so the hot path skips an offset shift."""
        u32 = self._u32
        idx = offset >> 2

        def ring(value: int) -> None:
            u32[idx] = value

        return ring

    def doorbell_addr(self, offset: int) -> int:
        """The address of the register at ``offset``, for C code that writes doorbells
        itself (the C lane, driver/cring.py)."""
        return int(ffi.cast("uintptr_t", self._addr)) + offset

    def unmap(self) -> None:
        if self._addr is not None:
            libc.munmap(self._addr, self.size)
            self._addr = None


class PreadBar:
    """Register access through pread/pwrite on the device fd: a system call per access,
    for regions VFIO does not let us mmap. Correct but slow; the log says so."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd = fd
        self.base = offset
        self.size = size

    def read32(self, offset: int) -> int:
        return struct.unpack("<I", os.pread(self.fd, 4, self.base + offset))[0]

    def write32(self, offset: int, value: int) -> None:
        os.pwrite(self.fd, struct.pack("<I", value & 0xFFFFFFFF), self.base + offset)

    def doorbell(self, offset: int) -> Any:
        def ring(value: int) -> None:
            self.write32(offset, value)

        return ring

    def unmap(self) -> None:
        pass


class Device:
    """One PCI function handed to us by vfio-pci."""

    def __init__(self, bdf: str) -> None:
        bdf = normalize_bdf(bdf)
        self.bdf = bdf
        if not (SYSFS_PCI / bdf).exists():
            raise VfioError(errno.ENODEV, f"no PCI device {bdf}")
        driver = pci_driver(bdf)
        if driver != "vfio-pci":
            raise VfioError(errno.ENODEV, f"{bdf} is bound to {driver or 'no driver'}, not "
                            f"vfio-pci: run `blocktarget setup --pci {bdf}` first")
        group = iommu_group(bdf)
        if group is None:
            if noiommu_mode():
                raise VfioError(errno.ENODEV, "VFIO is in no-IOMMU mode: this driver needs an "
                                "IOMMU (user-space DMA without one is unprotected)")
            raise VfioError(errno.ENODEV, f"{bdf} has no IOMMU group: the IOMMU is off; boot "
                            "with intel_iommu=on (Intel) or amd_iommu=on (AMD) and enable "
                            "VT-d/AMD-Vi in the firmware")
        self.container = Container.get()
        try:
            self.group = self.container.open_group(group)
            self.fd = self.group.open_device(bdf)
        except BaseException:
            self.container.put()
            raise
        self.regions: dict[int, Region] = {}
        self._req_efd: int | None = None
        self._msix_efds: list[int] = []
        self.bar0: MappedBar | PreadBar | None = None
        try:
            info = bytearray(_DEVICE_INFO.pack(_DEVICE_INFO.size, 0, 0, 0, 0, 0))
            _ioctl(self.fd, VFIO_DEVICE_GET_INFO, info)
            _, self.flags, self.num_regions, self.num_irqs, _, _ = _DEVICE_INFO.unpack(info)
            if not self.flags & VFIO_DEVICE_FLAGS_PCI:
                raise VfioError(errno.ENODEV, f"{bdf} is not a vfio-pci device")
        except BaseException:
            self.close()
            raise

    # ---- regions ----
    def region(self, index: int) -> Region:
        r = self.regions.get(index)
        if r is not None:
            return r
        argsz = _REGION_INFO.size
        buf = bytearray()
        for _ in range(2):
            buf = bytearray(argsz)
            _REGION_INFO.pack_into(buf, 0, argsz, 0, index, 0, 0, 0)
            _ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, buf)
            got = struct.unpack_from("<I", buf)[0]
            if got <= argsz:
                break
            argsz = got
        _, flags, _, cap_off, size, offset = _REGION_INFO.unpack_from(buf)
        sparse: list[tuple[int, int]] = []
        if flags & VFIO_REGION_INFO_FLAG_CAPS and cap_off:
            for cap_id, _ver, off in _caps(buf, cap_off):
                if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                    (n,) = struct.unpack_from("<I", buf, off + _CAP_HDR.size)
                    base = off + _CAP_HDR.size + 8
                    sparse += [struct.unpack_from("<QQ", buf, base + 16 * i) for i in range(n)]
        r = Region(index, flags, size, offset, tuple(sparse))
        self.regions[index] = r
        return r

    def map_bar0(self, need: int = 0x2000) -> MappedBar | PreadBar:
        """mmap BAR0 (registers and doorbells); ``need`` is how much must be reachable.

        When VFIO allows only parts of the BAR to be mapped (the MSI-X table is carved
        out on platforms without interrupt remapping), map the area starting at 0, which
        holds the registers and doorbells on every controller we know.
        """
        r = self.region(VFIO_PCI_BAR0_REGION_INDEX)
        if r.size == 0:
            raise VfioError(errno.ENODEV, f"{self.bdf}: BAR0 is empty")
        length = r.size
        if r.flags & VFIO_REGION_INFO_FLAG_MMAP:
            if r.sparse:
                first = [s for off, s in r.sparse if off == 0]
                length = first[0] if first else 0
            if length >= min(need, r.size):
                addr = libc.mmap(ffi.NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd,
                                 r.offset)
                if addr != MAP_FAILED:
                    self.bar0 = MappedBar(addr, length)
                    return self.bar0
                log.warning("%s: mmap of BAR0 failed (%s); using pread/pwrite", self.bdf,
                            os.strerror(ffi.errno))
        log.warning("%s: BAR0 cannot be mmapped; register access by system call (slow)",
                    self.bdf)
        self.bar0 = PreadBar(self.fd, r.offset, r.size)
        return self.bar0

    def config_read(self, offset: int, size: int) -> int:
        r = self.region(VFIO_PCI_CONFIG_REGION_INDEX)
        return int.from_bytes(os.pread(self.fd, size, r.offset + offset), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        r = self.region(VFIO_PCI_CONFIG_REGION_INDEX)
        os.pwrite(self.fd, value.to_bytes(size, "little"), r.offset + offset)

    def enable_bus_master(self) -> None:
        """Memory decode on, bus mastering on (the device may DMA), INTx off (we poll)."""
        cmd = self.config_read(PCI_COMMAND, 2)
        new = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE
        if new != cmd:
            self.config_write(PCI_COMMAND, 2, new)

    def disable_bus_master(self) -> None:
        cmd = self.config_read(PCI_COMMAND, 2)
        if cmd & PCI_COMMAND_MASTER:
            self.config_write(PCI_COMMAND, 2, cmd & ~PCI_COMMAND_MASTER)

    # ---- the "please release the device" request (hot-remove, unbind) ----
    def enable_release_request(self) -> bool:
        """Ask vfio-pci to signal an eventfd when the kernel wants the device back
        (surprise/orderly removal, unbind); without it the removal just blocks until we
        close the device. Returns False when the kernel lacks the request IRQ."""
        if self._irq_count(VFIO_PCI_REQ_IRQ_INDEX) < 1:
            return False
        try:
            (self._req_efd,) = self._signal_eventfds(VFIO_PCI_REQ_IRQ_INDEX, 1)
        except OSError as exc:
            log.debug("%s: no release-request eventfd: %s", self.bdf, exc)
            return False
        return True

    def _irq_count(self, index: int) -> int:
        """How many interrupts of VFIO IRQ index ``index`` can signal an eventfd (0:
        none, or a kernel without that index)."""
        if self.num_irqs <= index:
            return 0
        info = bytearray(_IRQ_INFO.pack(_IRQ_INFO.size, 0, index, 0))
        try:
            _ioctl(self.fd, VFIO_DEVICE_GET_IRQ_INFO, info)
        except OSError:
            return 0
        _, flags, _, count = _IRQ_INFO.unpack(info)
        return count if flags & VFIO_IRQ_INFO_EVENTFD else 0

    def _signal_eventfds(self, index: int, count: int) -> list[int]:
        """New eventfds that interrupts 0 .. count-1 of ``index`` signal from now on
        (closed again when vfio-pci refuses: OSError)."""
        efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        req = bytearray(_IRQ_SET_HDR.pack(_IRQ_SET_HDR.size + 4 * count,
                                          VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                          index, 0, count)
                        + struct.pack(f"<{count}i", *efds))
        try:
            _ioctl(self.fd, VFIO_DEVICE_SET_IRQS, req)
        except OSError:
            for fd in efds:
                os.close(fd)
            raise
        return efds

    # ---- MSI-X: completion interrupts as eventfds ----
    def msix_vectors(self) -> int:
        """How many MSI-X vectors vfio-pci can signal through eventfds (0: none, or a
        kernel without MSI-X for this device)."""
        return self._irq_count(VFIO_PCI_MSIX_IRQ_INDEX)

    def enable_msix(self, count: int) -> list[int]:
        """Enable MSI-X vectors 0 .. count-1, each signalling an eventfd of its own
        (returned, by vector; the device keeps them until close or disable_msix).

        Why: a polled completion queue makes whoever waits for it either spin or sleep
        in timed slices; an interrupt's eventfd lets the waiter sleep in epoll until the
        device has posted, which on a CPU the device shares (a QEMU guest) is what the
        kernel's own driver does. All vectors are enabled at once: vfio-pci may refuse to
        grow an enabled MSI-X set (VFIO_IRQ_INFO_NORESIZE)."""
        if self._msix_efds:
            raise VfioError(errno.EBUSY, f"{self.bdf}: MSI-X is enabled already")
        avail = self.msix_vectors()
        if count < 1 or count > avail:
            raise VfioError(errno.EINVAL, f"{self.bdf}: {count} MSI-X vectors asked, the "
                            f"device offers {avail}")
        self._msix_efds = self._signal_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, count)
        return list(self._msix_efds)

    def disable_msix(self) -> None:
        """Turn MSI-X off (vfio-pci frees the vectors) and close the eventfds."""
        if not self._msix_efds:
            return
        req = bytearray(_IRQ_SET_HDR.pack(_IRQ_SET_HDR.size,
                                          VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                          VFIO_PCI_MSIX_IRQ_INDEX, 0, 0))
        try:
            _ioctl(self.fd, VFIO_DEVICE_SET_IRQS, req)
        except OSError as exc:
            log.warning("%s: disabling MSI-X: %s", self.bdf, exc)
        for fd in self._msix_efds:
            os.close(fd)
        self._msix_efds = []

    def release_requested(self) -> bool:
        """Non-blocking: has the kernel asked for the device back since the last check?"""
        if self._req_efd is None:
            return False
        try:
            return os.eventfd_read(self._req_efd) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        """Unmap BAR0, close the device; the group and container go when unused."""
        if self.bar0 is not None:
            self.bar0.unmap()
            self.bar0 = None
        if self._req_efd is not None:
            os.close(self._req_efd)
            self._req_efd = None
        if self._msix_efds and getattr(self, "fd", -1) >= 0:
            self.disable_msix()
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
            self.group.device_closed()
            if self.group.devices <= 0:
                self.group.close()
        if self.container is not None:
            self.container.put()
            self.container = None  # type: ignore[assignment]
