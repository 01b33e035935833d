"""NVMe controller registers (NVMe base spec 2.0, section 3.1) over an MMIO window.

Every access is a single 32-bit load or store: some controllers (and QEMU's emulation for
some registers) do not accept 64-bit accesses, and a 64-bit register split into two
dword accesses is what Linux does on platforms without atomic readq (``lo_hi_readq``).
The window is anything with ``read32``/``write32``; the VFIO BAR mapping provides one,
unit tests a bytearray-backed fake, so register decoding is tested without hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .. import spec

# register offsets: the same numbers fabrics reaches by Property Get/Set
CAP = spec.Property.CAP
VS = spec.Property.VS
INTMS = spec.Property.INTMS
INTMC = spec.Property.INTMC
CC = spec.Property.CC
CSTS = spec.Property.CSTS
NSSR = spec.Property.NSSR
AQA = spec.Property.AQA
ASQ = spec.Property.ASQ
ACQ = spec.Property.ACQ
CMBLOC = spec.Property.CMBLOC
CMBSZ = spec.Property.CMBSZ
DOORBELL_BASE = 0x1000

# CC fields
CC_EN = 1 << 0
CC_CSS_SHIFT = 4
CC_MPS_SHIFT = 7
CC_AMS_SHIFT = 11
CC_SHN_SHIFT = 14
CC_SHN_MASK = 0x3 << CC_SHN_SHIFT
CC_SHN_NORMAL = 0x1 << CC_SHN_SHIFT
CC_SHN_ABRUPT = 0x2 << CC_SHN_SHIFT
CC_IOSQES_SHIFT = 16
CC_IOCQES_SHIFT = 20

# CSTS fields
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
CSTS_SHST_MASK = 0x3 << CSTS_SHST_SHIFT
CSTS_SHST_NORMAL = 0x0 << CSTS_SHST_SHIFT
CSTS_SHST_OCCURRING = 0x1 << CSTS_SHST_SHIFT
CSTS_SHST_COMPLETE = 0x2 << CSTS_SHST_SHIFT
CSTS_NSSRO = 1 << 4
CSTS_PP = 1 << 5

# CAP.CSS bits
CAP_CSS_NVM = 1 << 0
CAP_CSS_IOCS = 1 << 6
CAP_CSS_NO_IO = 1 << 7

ALL_ONES32 = 0xFFFFFFFF
"""What a read returns once the device is gone (surprise removal, link down)."""

SQE_SIZE_LOG2 = 6  # 64-byte submission queue entries
CQE_SIZE_LOG2 = 4  # 16-byte completion queue entries


class Mmio(Protocol):
    """A register window; offsets are byte offsets, accesses are 32-bit."""

    def read32(self, offset: int) -> int: ...

    def write32(self, offset: int, value: int) -> None: ...


class DeviceRemoved(OSError):
    """Register reads return all ones: the device is gone (hot-remove or dead link)."""


@dataclass(frozen=True)
class Capabilities:
    """CAP decoded. Times are in milliseconds, sizes in bytes, ready to use."""

    raw: int

    @property
    def mqes(self) -> int:
        """Maximum queue entries supported, 0's based (so MQES+1 entries per queue)."""
        return self.raw & 0xFFFF

    @property
    def max_queue_entries(self) -> int:
        return self.mqes + 1

    @property
    def cqr(self) -> bool:
        """Contiguous queues required (we always allocate contiguous rings anyway)."""
        return bool(self.raw >> 16 & 1)

    @property
    def ams(self) -> int:
        return self.raw >> 17 & 0x3

    @property
    def timeout_ms(self) -> int:
        """CAP.TO: worst case for CSTS.RDY to follow CC.EN, in 500 ms units."""
        return (self.raw >> 24 & 0xFF) * 500

    @property
    def dstrd(self) -> int:
        return self.raw >> 32 & 0xF

    @property
    def doorbell_stride(self) -> int:
        """Bytes between consecutive doorbell registers (4 << DSTRD)."""
        return 4 << self.dstrd

    @property
    def nssrs(self) -> bool:
        return bool(self.raw >> 36 & 1)

    @property
    def css(self) -> int:
        return self.raw >> 37 & 0xFF

    @property
    def bps(self) -> bool:
        return bool(self.raw >> 45 & 1)

    @property
    def mpsmin(self) -> int:
        """Minimum memory page size in bytes (2 ^ (12 + MPSMIN))."""
        return 1 << (12 + (self.raw >> 48 & 0xF))

    @property
    def mpsmax(self) -> int:
        return 1 << (12 + (self.raw >> 52 & 0xF))

    @property
    def cmbs(self) -> bool:
        return bool(self.raw >> 57 & 1)

    def describe(self) -> dict[str, int | bool]:
        return {
            "mqes": self.mqes, "cqr": self.cqr, "to_ms": self.timeout_ms,
            "dstrd": self.dstrd, "css": self.css, "nssrs": self.nssrs,
            "mpsmin": self.mpsmin, "mpsmax": self.mpsmax,
        }  # fmt: skip


@dataclass(frozen=True)
class Version:
    raw: int

    @property
    def major(self) -> int:
        return self.raw >> 16

    @property
    def minor(self) -> int:
        return self.raw >> 8 & 0xFF

    @property
    def tertiary(self) -> int:
        return self.raw & 0xFF

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.tertiary}"


def make_cc(*, enable: bool, page_size: int = 4096, shn: int = 0, css: int = 0) -> int:
    """CC value for our fixed choices: NVM command set, round robin, 64/16-byte entries."""
    mps = page_size.bit_length() - 13
    if mps < 0 or 1 << (12 + mps) != page_size:
        raise ValueError(f"page size {page_size} is not a power of two >= 4096")
    return (
        (CC_EN if enable else 0)
        | (css & 0x7) << CC_CSS_SHIFT
        | mps << CC_MPS_SHIFT
        | shn
        | SQE_SIZE_LOG2 << CC_IOSQES_SHIFT
        | CQE_SIZE_LOG2 << CC_IOCQES_SHIFT
    )


def make_aqa(asq_entries: int, acq_entries: int) -> int:
    """AQA holds both admin queue sizes, 0's based, 12 bits each (2..4096 entries)."""
    for n in (asq_entries, acq_entries):
        if not 2 <= n <= 4096:
            raise ValueError(f"admin queue size {n} must be 2..4096")
    return (acq_entries - 1) << 16 | (asq_entries - 1)


def sq_tail_doorbell(qid: int, stride: int) -> int:
    return DOORBELL_BASE + (2 * qid) * stride


def cq_head_doorbell(qid: int, stride: int) -> int:
    return DOORBELL_BASE + (2 * qid + 1) * stride


class Registers:
    """Typed access to one controller's registers; raises DeviceRemoved on all-ones reads
    of registers that can never legitimately read all ones (CSTS, VS)."""

    def __init__(self, mmio: Mmio) -> None:
        self.mmio = mmio

    def read64(self, offset: int) -> int:
        lo = self.mmio.read32(offset)
        hi = self.mmio.read32(offset + 4)
        return hi << 32 | lo

    def write64(self, offset: int, value: int) -> None:
        self.mmio.write32(offset, value & ALL_ONES32)
        self.mmio.write32(offset + 4, value >> 32)

    def cap(self) -> Capabilities:
        raw = self.read64(CAP)
        if raw == 0xFFFFFFFFFFFFFFFF:
            raise DeviceRemoved("NVMe CAP reads all ones: the device is not responding")
        return Capabilities(raw)

    def vs(self) -> Version:
        raw = self.mmio.read32(VS)
        if raw == ALL_ONES32:
            raise DeviceRemoved("NVMe VS reads all ones: the device is not responding")
        return Version(raw)

    def cc(self) -> int:
        return self.mmio.read32(CC)

    def set_cc(self, value: int) -> None:
        self.mmio.write32(CC, value)

    def csts(self) -> int:
        raw = self.mmio.read32(CSTS)
        if raw == ALL_ONES32:
            raise DeviceRemoved("NVMe CSTS reads all ones: the device is gone")
        return raw

    def removed(self) -> bool:
        """The cheap liveness probe the pollers use (one MMIO read)."""
        return self.mmio.read32(CSTS) == ALL_ONES32

    def set_admin_queues(self, asq_iova: int, acq_iova: int, asq_entries: int,
                         acq_entries: int) -> None:
        self.mmio.write32(AQA, make_aqa(asq_entries, acq_entries))
        self.write64(ASQ, asq_iova)
        self.write64(ACQ, acq_iova)


def describe_csts(value: int) -> str:
    """For error messages: which CSTS bits were set when something went wrong."""
    if value == ALL_ONES32:
        return "0xffffffff (device gone)"
    parts = []
    if value & CSTS_RDY:
        parts.append("RDY")
    if value & CSTS_CFS:
        parts.append("CFS (controller fatal status)")
    shst = value & CSTS_SHST_MASK
    if shst == CSTS_SHST_OCCURRING:
        parts.append("SHST=occurring")
    elif shst == CSTS_SHST_COMPLETE:
        parts.append("SHST=complete")
    if value & CSTS_PP:
        parts.append("PP")
    return f"{value:#x} ({', '.join(parts) or 'not ready'})"
