"""pmem bdev: block-atomic writes on a persistent-memory pool file.

Persistent memory is written with CPU stores, and a power failure (or `kill -9`, which
stops a process between any two instructions) can leave a 4 KiB block half old and half
new: only an aligned 8-byte store is failure atomic. A block device must not tear blocks,
so the pool is laid out like PMDK's libpmemblk, whose Block Translation Table (BTT) makes
block writes atomic by never overwriting live data:

    +--------+-------------+---------------------+----------------------+--------+
    | info   | flog        | map                 | data                 | backup |
    | 4 KiB  | lanes x K   | num_blocks entries  | num_blocks + lanes*K | info   |
    |        | 64 B pairs  | 4 B (or 8 B) each   | blocks               | 4 KiB  |
    +--------+-------------+---------------------+----------------------+--------+

* The **map** translates an LBA to a physical data block. An entry's top two bits are
  flags as in BTT: 11 normal, 10 reads as zeroes (unmap / write zeroes), 01 error, 00 the
  initial state (reads as zeroes; physical block = LBA). Entries are 4 bytes while the
  data area has at most 2^30 blocks, 8 bytes beyond. Either way one entry is changed
  with one aligned store inside one 8-byte-aligned word, the unit that persistent memory
  writes atomically.
* There are `lanes * K` physical blocks more than LBAs: each lane (one per reactor at pool
  creation, stored in the info block) owns a **free list** of K blocks that no LBA maps to.
* Each free block has a **flog** pair (BTT's "free list / log"): two 32-byte entries
  {lba, old, new, seq}, the current one being the one with the later 2-bit sequence
  number (1 -> 2 -> 3 -> 1). The current entry's `old` is the slot's free block.

A write of one block, with lane L's slot s holding free block F:

    1. copy the data into F                       (nobody reads F: a crash changes nothing)
    2. old = map[lba]; write {lba, old, F} into the slot's non-current flog entry;
       persist them, and with them the map entries lane L's previous write stored and
       (with more than one lane) map[lba] (one drain: all only have to be durable
       before step 3)
    3. write its seq = next(seq), persist         (commit point: the flog now says lba -> F)
    4. map[lba] = F (one store, not persisted)    (the slot's free block is now `old`)

The map store of step 4 is left to the next write's step 2: until then the slot's flog
entry is current (only this lane's next write replaces it, at its step 3, after that
step 2), so recovery redoes the store if a crash loses it. A writer on another lane that
reads the entry as its `old` persists it in its own step 2 too, before its commit point:
a fence orders only its own CPU's flushes, and without that a crash could leave both
lanes' flog entries naming the entry while the media still held the value before the
first, and one block owned twice. Two drains per chunk instead of three (on tmpfs or a
disk file, two msyncs); the crash-point harness (tests/unit/test_pmem_crash.py) crashes
at both and with the map store's word lost or kept.

Recovery on open looks at every slot's current flog entry: if map[lba] still equals
`old`, the crash came after step 3 and before step 4's store was durable, and the map
update is completed; either
way the slot's free block is `old`. So each block reads old or new contents, never a mix,
and no physical block is ever owned twice. A write of n blocks takes up to K slots at once
and runs each step for all of them before one drain, so the fences (or msyncs) are paid
per step, not per block; every block stays individually atomic, which is what NVMe
promises (AWUN/AWUPF of one block).

Group commit (the C engine and the lane only): a chunk's blocks need not be consecutive
LBAs. Each has its own slot, so its own free block and flog pair, its own entry naming
its LBA, its own commit point (its sequence number), and recovery looks at each pair
alone. So the in-capsule writes of one lane batch (one socket read's commands) are
committed as one chunk, `bt_pmem_write_group`: two drains for all of them, each pair
updated once (never two updates in one pair, which the format could not tell apart).
Two conditions make it a chunk: no LBA twice in it (both entries would read the same
`old`: one block owned twice) and at most K blocks; the engine refuses either. The lane
answers none of the writes before the group's second drain returned; a failed group is
taken back by the lane untaken, and the Python path runs those capsules from the start
(the pool refuses them, broken, as after any failed write). The crash-point harness
crashes groups of several writes (and runs, on one lane and several) at every drain.

Concurrency: a lane is used by one reactor, so its slots need no lock in the common case;
a lane lock (uncontended then) still guards them because more reactors than lanes, or a
caller without a reactor, may share one. Two lanes writing the same LBA are serialised by
a map lock (hashed on the LBA), held from reading `old` to the persisted map store. A
reader publishes the physical blocks it copies in a read-tracking table, and a writer
waits before reusing a free block some reader still copies from (BTT's RTT). The GIL
does not make this moot: copies run in C with the GIL released. The C lane's large reads
over a socket lent to the C poller are not copied at all: their blocks stay published
(and the lane's lock held) until the socket has taken their bytes, or the rest has been
copied into the connection's queue (csrc/be_pmem.c `bt_pmem_read_map` has why each block
still reads whole, old or new).

Durability: a write is durable before it completes (its data and committed flog entry
are; recovery redoes its map store if that was lost), so there is no volatile cache
(write_cache False; Flush and FUA cost nothing). Where the mapping is not real persistent
memory (`pmem_is_pmem` false: a file on tmpfs or a disk file system) persisting is
`pmem_msync`; otherwise cache-line flushes and a fence (`pmem_flush`/`pmem_drain`).
libpmem honours PMEM_IS_PMEM_FORCE=1 to treat a mapping as pmem (benchmarks).

The on-media format is our own (signature BLOCKTARGET_BTT), BTT-like but not
libpmemblk-compatible: one arena of any size, 64-bit block counts, K free blocks per lane.
The host must be little-endian (x86-64, arm64); the info block records nothing else
about the machine.

Persistence goes through a `PersistentMemory` object so that tests can replace libpmem
with a recorder that simulates a crash at every persist point.

Two engines run this BTT, with the same stores and persists in the same order: the
Python methods of `Pool` below (the reference, and what runs without the compiled
lane), and csrc/be_pmem.c, which `Pool` calls for every read, write and zeroing when
blocktarget._fastpath is built (`_Core`). The C one holds the free-list slots, map locks
and read-tracking table then, so the NVMe/TCP lane (nvme/fastlane.py, `lane_target`) and
the Python path share them and a pool can be served by both at once. It reaches libpmem
through function pointers taken from blocktarget._pmem (the lane's extension does not
link libpmem), and a test's `PersistentMemory` through callbacks (`Pool(core=True)`), so
the crash-point harness crashes the C engine at every drain too. Recovery, formatting
and checking stay in Python.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import logging
import os
import struct
import sys
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from ..bdev import (
    LANE_PMEM,
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
from ..errors import AlreadyExists, Busy, InvalidParams, NoSuchDevice, RpcError, Unsupported
from ..params import Param, Schema, non_empty
from ..paths import check_path

log = logging.getLogger("blocktarget.bdev.pmem")

try:  # the compiled libpmem glue is optional: without it this module still imports
    from .. import _pmem  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only where libpmem-dev is missing
    _pmem = None
    _PMEM_IMPORT_ERROR = str(exc)
else:
    _PMEM_IMPORT_ERROR = ""

try:  # the C lane's extension carries the C engine of the BTT (csrc/be_pmem.c)
    from .._fastpath import ffi as _cffi  # type: ignore[attr-defined]
    from .._fastpath import lib as _clib  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised only without a compiler
    _cffi = _clib = None
# Whether a pool opened on a libpmem mapping runs the C engine (when built); tests turn
# it off to hold the C engine to the Python one.
USE_C_ENGINE = True

# ---------------------------------------------------------------------------
# on-media constants

SIGNATURE = b"BLOCKTARGET_BTT\0"
MAJOR, MINOR = 1, 0
INFO_SIZE = 4096
ALIGN = 4096
FLOG_ENTRY = 32  # lba, old, new, seq: four little-endian u64
FLOG_PAIR = 64  # two entries, one cache line
CACHE_LINE = 64
DEFAULT_FREE_PER_LANE = 32  # one chunk covers a 128 KiB write of 4 KiB blocks
MAX_LANES = 1024
MAX_FREE_PER_LANE = 256
NSEQ = (0, 2, 3, 1)  # 1 -> 2 -> 3 -> 1; 0 means "never written"

# info block: fields after the signature, little-endian; checksum in the last 8 bytes
_INFO = struct.Struct("<16s16sHHIIIQQIIQQQQQ")
_FLOG_BODY = struct.Struct("<QQQ")  # lba, old, new: written before seq, no atomicity needed
_CHECKSUM_OFF = INFO_SIZE - 8


class PoolError(Exception):
    """The file is not a usable pool (bad info block, inconsistent flog, wrong size)."""


class MediaError(Exception):
    """A block whose map entry carries the error flag."""


class PoolBroken(Exception):
    """A metadata update failed half way; the pool refuses writes until reopened."""


def fletcher64(data: bytes) -> int:
    """PMDK's info-block checksum: Fletcher-64 over little-endian 32-bit words."""
    lo = hi = 0
    for (w,) in struct.iter_unpack("<I", data):
        lo = (lo + w) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFF
    return hi << 32 | lo


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    """Sizes and offsets of one pool; everything follows from the first five fields."""

    block_size: int
    num_blocks: int  # external LBAs
    lanes: int
    free_per_lane: int
    entry_size: int  # 4 or 8

    @classmethod
    def compute(cls, num_blocks: int, block_size: int, lanes: int,
                free_per_lane: int = DEFAULT_FREE_PER_LANE,
                entry_size: int | None = None) -> Layout:
        if num_blocks < 1:
            raise ValueError("num_blocks must be positive")
        if check_block_size(block_size):
            raise ValueError(f"block_size {check_block_size(block_size)}")
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be between 1 and {MAX_LANES}")
        if not 1 <= free_per_lane <= MAX_FREE_PER_LANE:
            raise ValueError(f"free blocks per lane must be between 1 and {MAX_FREE_PER_LANE}")
        internal = num_blocks + lanes * free_per_lane
        if entry_size is None:
            entry_size = 4 if internal <= 1 << 30 else 8
        if entry_size not in (4, 8) or (entry_size == 4 and internal > 1 << 30):
            raise ValueError(f"map entry size {entry_size} cannot address {internal} blocks")
        if internal >= 1 << 62:
            raise ValueError("too many blocks")
        return cls(block_size, num_blocks, lanes, free_per_lane, entry_size)

    @property
    def nfree(self) -> int:
        return self.lanes * self.free_per_lane

    @property
    def internal_blocks(self) -> int:
        return self.num_blocks + self.nfree

    @property
    def flogoff(self) -> int:
        return INFO_SIZE

    @property
    def mapoff(self) -> int:
        return self.flogoff + _align(self.nfree * FLOG_PAIR)

    @property
    def dataoff(self) -> int:
        return self.mapoff + _align(self.num_blocks * self.entry_size)

    @property
    def backupoff(self) -> int:
        return _align(self.dataoff + self.internal_blocks * self.block_size)

    @property
    def file_size(self) -> int:
        return self.backupoff + INFO_SIZE

    def pack_info(self, pool_uuid: bytes) -> bytes:
        head = _INFO.pack(
            SIGNATURE, pool_uuid, MAJOR, MINOR, 0, self.block_size, self.entry_size,
            self.num_blocks, self.internal_blocks, self.lanes, self.free_per_lane,
            self.flogoff, self.mapoff, self.dataoff, self.backupoff, self.file_size)
        body = head + bytes(_CHECKSUM_OFF - len(head))
        return body + struct.pack("<Q", fletcher64(body))

    @classmethod
    def unpack_info(cls, info: bytes) -> tuple[Layout, bytes]:
        """(layout, uuid) from an info block; PoolError says why it is not one."""
        if len(info) < INFO_SIZE or info[:16] != SIGNATURE:
            raise PoolError("no pool signature")
        (stored,) = struct.unpack_from("<Q", info, _CHECKSUM_OFF)
        if fletcher64(info[:_CHECKSUM_OFF]) != stored:
            raise PoolError("info block checksum mismatch")
        (_sig, pool_uuid, major, _minor, _flags, bs, es, nb, internal, lanes, fpl,
         flogoff, mapoff, dataoff, backupoff, size) = _INFO.unpack_from(info)
        if major != MAJOR:
            raise PoolError(f"unsupported format version {major}")
        try:
            layout = cls.compute(nb, bs, lanes, fpl, es)
        except ValueError as exc:
            raise PoolError(f"info block describes an impossible pool: {exc}") from None
        if (internal, flogoff, mapoff, dataoff, backupoff, size) != (
            layout.internal_blocks, layout.flogoff, layout.mapoff, layout.dataoff,
            layout.backupoff, layout.file_size,
        ):
            raise PoolError("info block offsets do not match its geometry")
        return layout, pool_uuid


def read_info_file(path: str) -> tuple[Layout, bytes]:
    """The pool's geometry from its info blocks (primary, else the backup) with plain
    file reads, so RPCs can describe or delete a pool without mapping it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NoSuchDevice(f"pmem pool file '{path}' does not exist") from None
    except OSError as exc:
        raise RpcError(f"cannot open pmem pool file '{path}': {exc.strerror}",
                       -(exc.errno or errno.EIO)) from None
    try:
        size = os.fstat(fd).st_size
        primary = os.pread(fd, INFO_SIZE, 0)
        try:
            layout, pool_uuid = Layout.unpack_info(primary)
        except PoolError as first:
            if size < 2 * INFO_SIZE:
                raise InvalidParams(f"'{path}' is not a pmem pool: {first}") from None
            try:
                layout, pool_uuid = Layout.unpack_info(os.pread(fd, INFO_SIZE, size - INFO_SIZE))
            except PoolError:
                raise InvalidParams(f"'{path}' is not a pmem pool: {first}") from None
        if size != layout.file_size:
            raise InvalidParams(f"'{path}' is not a usable pmem pool: the file has {size} "
                                f"bytes, its info block says {layout.file_size}")
        return layout, pool_uuid
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# persistence layer


class PersistentMemory(abc.ABC):
    """A mapped pool file and the primitives the BTT needs to order its stores.

    `store` and `copy_flush` write without making anything durable; `flush` starts
    write-back of a range and `drain` waits for everything this thread flushed so far.
    Nothing is durable before the drain that follows its flush, and stores may reach the
    media in any order at 8-byte granularity; that is the contract the crash tests
    simulate. The batch methods (`store_many`, `scatter_flush`, `gather`) exist so an
    implementation can do a whole chunk of blocks in one call into C.
    """

    mem: memoryview
    is_pmem: bool = False

    @property
    def size(self) -> int:
        return len(self.mem)

    @abc.abstractmethod
    def store(self, off: int, value: int, width: int) -> None:
        """One aligned `width`-byte little-endian store (4 or 8), atomic."""

    @abc.abstractmethod
    def write(self, off: int, data: Any) -> None:
        """Plain copy into a range (formatting, repairs, flog bodies): not atomic, and
        nothing relies on it being so."""

    @abc.abstractmethod
    def copy_flush(self, off: int, src: Any) -> None:
        """Copy `src` to `off` and start its write-back."""

    @abc.abstractmethod
    def flush(self, off: int, length: int) -> None:
        """Start the write-back of a range."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Wait until everything this thread flushed is durable."""

    def persist(self, off: int, length: int) -> None:
        self.flush(off, length)
        self.drain()

    def stored(self, off: int, length: int) -> None:  # noqa: B027 - optional: a no-op
        """The C engine stored into this range of `mem` itself (a recorder notes it)."""

    def copy_out(self, off: int, dst: memoryview) -> None:
        """Copy `len(dst)` bytes at `off` into `dst` (a read)."""
        dst[:] = self.mem[off:off + len(dst)]

    def store_many(self, offsets: list[int], values: list[int], width: int) -> None:
        """`store` for each pair, in order; each store atomic on its own."""
        for off, value in zip(offsets, values, strict=True):
            self.store(off, value, width)

    def scatter_flush(self, offsets: list[int], src: memoryview, bs: int) -> None:
        """`copy_flush` of consecutive `bs`-byte pieces of `src` to `offsets`."""
        for i, off in enumerate(offsets):
            self.copy_flush(off, src[i * bs:(i + 1) * bs])

    def gather(self, offsets: list[int], dst: memoryview, bs: int) -> None:
        """`copy_out` of `bs` bytes at each offset into consecutive pieces of `dst`."""
        for i, off in enumerate(offsets):
            self.copy_out(off, dst[i * bs:(i + 1) * bs])

    def close(self) -> None:
        """Let go of the memory (a mapping also unmaps it): every view of `mem` handed
        out must be released first."""
        self.mem.release()


GIL_FREE_COPY = 16384  # single copies this large run in C without the GIL


class _LibPmemMapping(PersistentMemory):
    """What both libpmem mappings share: the mapping, atomic stores, reads, unmapping."""

    def __init__(self, lib: Any, ffi: Any, addr: Any, length: int, is_pmem: bool) -> None:
        self._lib = lib
        self._ffi = ffi
        self._addr = addr
        self._len = length
        self._p = ffi.cast("char *", addr)
        self.is_pmem = is_pmem
        self.mem = memoryview(ffi.buffer(addr, length))

    def store(self, off: int, value: int, width: int) -> None:
        if width == 8:
            self._lib.bt_store64(self._p + off, value)
        else:
            self._lib.bt_store32(self._p + off, value)

    def store_many(self, offsets: list[int], values: list[int], width: int) -> None:
        if len(offsets) == 1:
            self.store(offsets[0], values[0], width)
            return
        new = self._ffi.new
        self._lib.bt_store_many(self._p, new("uint64_t[]", offsets), new("uint64_t[]", values),
                                len(offsets), width)

    def write(self, off: int, data: Any) -> None:
        self.mem[off:off + len(data)] = data

    def copy_out(self, off: int, dst: memoryview) -> None:
        n = len(dst)
        if n >= GIL_FREE_COPY:
            self._lib.memcpy(self._ffi.from_buffer(dst), self._p + off, n)
        else:  # a short copy costs less than giving the GIL away and taking it back
            dst[:] = self.mem[off:off + n]

    def gather(self, offsets: list[int], dst: memoryview, bs: int) -> None:
        if len(offsets) == 1:
            self.copy_out(offsets[0], dst[:bs])
            return
        self._lib.bt_gather(self._ffi.from_buffer(dst), self._p,
                            self._ffi.new("uint64_t[]", offsets), len(offsets), bs)

    def _scatter(self, offsets: list[int], src: memoryview, bs: int) -> None:
        self._lib.bt_scatter(self._p, self._ffi.new("uint64_t[]", offsets),
                             self._ffi.from_buffer(src), len(offsets), bs, self.is_pmem)

    def _msync(self, off: int, length: int) -> None:
        if self._lib.pmem_msync(self._p + off, length):
            raise OSError(self._ffi.errno, "pmem_msync failed")

    def close(self) -> None:
        if self._addr is None:
            return
        self.mem.release()
        self._lib.pmem_unmap(self._addr, self._len)
        self._addr = None


class PmemMapping(_LibPmemMapping):
    """Real persistent memory (`pmem_is_pmem` true): cache-line write-back
    (`pmem_flush`, `pmem_memcpy_nodrain`) and a fence (`pmem_drain`), no system call."""

    def flush(self, off: int, length: int) -> None:
        self._lib.pmem_flush(self._p + off, length)

    def drain(self) -> None:
        self._lib.pmem_drain()

    def persist(self, off: int, length: int) -> None:
        self._lib.pmem_persist(self._p + off, length)

    def copy_flush(self, off: int, src: Any) -> None:
        self._lib.pmem_memcpy_nodrain(self._p + off, self._ffi.from_buffer(src), len(src))

    def scatter_flush(self, offsets: list[int], src: memoryview, bs: int) -> None:
        if len(offsets) == 1:
            self.copy_flush(offsets[0], src[:bs])
        else:
            self._scatter(offsets, src, bs)


class _Pending(threading.local):
    """The byte range flushed by this thread since its last drain."""

    def __init__(self) -> None:
        self.lo = -1
        self.hi = 0


class MsyncMapping(_LibPmemMapping):
    """Anything else (a file on tmpfs or a disk file system): `pmem_msync`, as libpmem
    documents for mappings `pmem_is_pmem` rejects.

    msync is synchronous and works on whole pages, so a flush only notes its range and
    the drain makes one msync over the union of the ranges this thread flushed: durable
    early is never wrong for the BTT (a store is issued only after what it depends on is
    durable), and one system call per step beats one per block.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._pending = _Pending()

    def flush(self, off: int, length: int) -> None:
        p = self._pending
        if p.lo < 0:
            p.lo, p.hi = off, off + length
        else:
            if off < p.lo:
                p.lo = off
            if off + length > p.hi:
                p.hi = off + length

    def drain(self) -> None:
        p = self._pending
        if p.lo >= 0:
            lo, hi = p.lo, p.hi
            p.lo = -1
            self._msync(lo, hi - lo)

    def persist(self, off: int, length: int) -> None:
        self._msync(off, length)

    def copy_flush(self, off: int, src: Any) -> None:
        n = len(src)
        if n >= GIL_FREE_COPY:
            self._lib.memcpy(self._p + off, self._ffi.from_buffer(src), n)
        else:
            self.mem[off:off + n] = src
        self.flush(off, n)

    def scatter_flush(self, offsets: list[int], src: memoryview, bs: int) -> None:
        if len(offsets) == 1:
            self.copy_flush(offsets[0], src[:bs])
            return
        self._scatter(offsets, src, bs)
        lo = min(offsets)
        self.flush(lo, max(offsets) + bs - lo)


def map_pool_file(path: str) -> _LibPmemMapping:
    """Map a whole file with `pmem_map_file`; the mapping type follows `pmem_is_pmem`
    (which honours PMEM_IS_PMEM_FORCE)."""
    lib, ffi = require_libpmem()
    mapped = ffi.new("size_t *")
    is_pmem = ffi.new("int *")
    addr = lib.pmem_map_file(os.fsencode(path), 0, 0, 0, mapped, is_pmem)
    if addr == ffi.NULL:
        err = ffi.errno or errno.EIO
        msg = lib.pmem_errormsg()
        text = ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else ""
        raise OSError(err, text or os.strerror(err), path)
    cls = PmemMapping if is_pmem[0] else MsyncMapping
    return cls(lib, ffi, addr, mapped[0], bool(is_pmem[0]))


def libpmem_available() -> bool:
    return _pmem is not None


def require_libpmem() -> tuple[Any, Any]:
    """(lib, ffi) of the compiled glue, or an RPC error an operator can act on."""
    if _pmem is None:
        raise Unsupported(
            "the pmem bdev needs libpmem, but blocktarget's libpmem extension "
            f"(blocktarget._pmem) is not built ({_PMEM_IMPORT_ERROR}); install libpmem-dev "
            "and pkg-config, then reinstall blocktarget")
    return _pmem.lib, _pmem.ffi


# ---------------------------------------------------------------------------
# the block translation table


class _Slot:
    """Run-time state of one free block and its flog pair."""

    __slots__ = ("off", "next", "seq", "free")

    def __init__(self, off: int, next_: int, seq: int, free: int) -> None:
        self.off = off  # byte offset of the flog pair
        self.next = next_  # which entry (0/1) the next update writes
        self.seq = seq  # sequence number of the current entry
        self.free = free  # physical block this slot owns


class _Lane:
    __slots__ = ("index", "lock", "slots", "map_lo", "map_len")

    def __init__(self, index: int, slots: list[_Slot]) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.slots = slots
        # the map bytes this lane's last write stored and its next write persists
        self.map_lo = 0
        self.map_len = 0


NO_READS: frozenset[int] = frozenset()
READ_BATCH = 64  # blocks published in the read-tracking table at once
MAP_LOCKS = 64
MAP_LOCK_SHIFT = 4  # 16 consecutive LBAs share a lock: a chunk takes few locks
ZERO_CHUNK = 4096  # LBAs per map-lock round of unmap / write zeroes


# what the C engine takes from libpmem (struct bt_pmem_lib), with the types it calls
_LIBPMEM_FNS = (("flush", "void (*)(const void *, size_t)"), ("drain", "void (*)(void)"),
                ("msync", "int (*)(const void *, size_t)"),
                ("memcpy_nodrain", "void *(*)(void *, const void *, size_t)"))


def c_engine_available() -> bool:
    return _clib is not None


class _Raised:
    """The first exception a callback from C raised (C cannot carry it)."""

    __slots__ = ("exc",)

    def __init__(self) -> None:
        self.exc: BaseException | None = None


def _guarded(err: _Raised, fn: Any) -> Any:
    def call(_ctx: Any, off: int, length: int) -> None:
        if err.exc is None:
            try:
                fn(off, length)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                err.exc = exc
    return call


def _drain_cb(err: _Raised, pm: PersistentMemory) -> Any:
    def drain(_ctx: Any) -> int:
        if err.exc is not None:
            return 1  # a flush already failed: so does the drain
        try:
            pm.drain()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            err.exc = exc
            return 1
        return 0
    return drain


class _Core:
    """The C engine (csrc/be_pmem.c) over an open pool: its `struct bt_pmem *` (`c`) and
    what keeps the pointers it holds valid (callbacks, the buffer export of a test's
    memory)."""

    def __init__(self, pool: Pool) -> None:
        ffi, lib = _cffi, _clib
        pm, layout = pool.pm, pool.layout
        g = ffi.new("struct bt_pmem_geom *", {
            "block_size": layout.block_size, "entry_size": layout.entry_size,
            "lanes": layout.lanes, "free_per_lane": layout.free_per_lane,
            "num_blocks": layout.num_blocks, "internal_blocks": layout.internal_blocks,
            "flogoff": layout.flogoff, "mapoff": layout.mapoff, "dataoff": layout.dataoff})
        self._err = _Raised()  # what a test's callback raised
        self._keep: list[Any] = []
        plib = ffi.NULL
        hook = ffi.NULL
        if isinstance(pm, _LibPmemMapping):
            pffi = pm._ffi
            base = ffi.cast("unsigned char *", int(pffi.cast("uintptr_t", pm._p)))
            plib = ffi.new("struct bt_pmem_lib *")
            for field, ctype in _LIBPMEM_FNS:
                fn = pffi.addressof(pm._lib, "pmem_" + field)
                setattr(plib, field, ffi.cast(ctype, int(pffi.cast("uintptr_t", fn))))
            mode = lib.BT_PM_FLUSH if pm.is_pmem else lib.BT_PM_MSYNC
        else:
            # (the memory itself, not the memoryview: the garbage collector may clear a
            # memoryview with an export, which crashes)
            whole = pm.mem.obj
            if not isinstance(whole, bytearray) or len(whole) != pm.size:
                whole = pm.mem  # (a view of part of something: only the view will do)
            buf = ffi.from_buffer("unsigned char[]", whole, require_writable=True)
            base = buf
            hook = ffi.new("struct bt_pmem_hook *")
            err = self._err  # (the callbacks hold this, not self: no reference cycle)
            cbs = (
                ffi.callback("void(void *, uint64_t, uint64_t)", _guarded(err, pm.stored)),
                ffi.callback("void(void *, uint64_t, uint64_t)", _guarded(err, pm.flush)),
                ffi.callback("int(void *)", _drain_cb(err, pm), error=1),
            )
            hook.stored, hook.flush, hook.drain = cbs
            self._keep += [buf, *cbs]
            mode = lib.BT_PM_HOOK
        self._keep += [g, plib, hook]
        c = lib.bt_pmem_new(base, pm.size, g, mode, plib, hook)
        if c == ffi.NULL:
            raise PoolError("the C engine refused the pool's geometry (or no memory)")
        self.c = c
        k = layout.free_per_lane
        for ln in pool.lanes:
            for s, slot in enumerate(ln.slots):
                lib.bt_pmem_set_slot(c, ln.index * k + s, slot.next, slot.seq, slot.free)

    def failure(self, what: str) -> BaseException:
        """The exception for a step that failed in C: a test callback's own, else the
        errno of the failed msync."""
        exc, self._err.exc = self._err.exc, None
        if exc is not None:
            return exc
        err = _clib.bt_pmem_errno(self.c) or errno.EIO
        return OSError(err, f"{what}: {os.strerror(err)}")

    def sync_slots(self, lanes: list[_Lane]) -> None:
        """The Python view of the free lists from C's (for check())."""
        nxt, seq = _cffi.new("uint32_t *"), _cffi.new("uint32_t *")
        free = _cffi.new("uint64_t *")
        k = len(lanes[0].slots) if lanes else 0
        for ln in lanes:
            for s, slot in enumerate(ln.slots):
                _clib.bt_pmem_get_slot(self.c, ln.index * k + s, nxt, seq, free)
                slot.next, slot.seq, slot.free = nxt[0], seq[0], free[0]

    def close(self) -> None:
        c, self.c = self.c, None
        if c is not None:
            _clib.bt_pmem_free(c)
        self._keep = []


def format_pool(pm: PersistentMemory, layout: Layout, pool_uuid: bytes,
                *, zero_map: bool = False) -> None:
    """Write the metadata of an empty pool onto a zero-filled mapping.

    Order: flog, then the backup info block, then the primary one, each persisted before
    the next, so a pool whose primary info block checks out is complete (a crash before
    it leaves "not a pool"; after the backup, open repairs the primary from it).
    """
    if pm.size < layout.file_size:
        raise PoolError(f"mapping of {pm.size} bytes is smaller than the pool "
                        f"({layout.file_size})")
    if zero_map:
        chunk = bytes(1 << 20)
        end = layout.dataoff
        for off in range(layout.mapoff, end, len(chunk)):
            pm.write(off, chunk[:min(len(chunk), end - off)])
    zero = 2 << (layout.entry_size * 8 - 2)
    first_free = layout.num_blocks
    for i in range(layout.nfree):
        off = layout.flogoff + i * FLOG_PAIR
        entry = zero | (first_free + i)
        pm.write(off, struct.pack("<QQQQ", 0, entry, entry, 1) + bytes(FLOG_PAIR - FLOG_ENTRY))
    pm.persist(layout.flogoff, layout.dataoff - layout.flogoff)
    info = layout.pack_info(pool_uuid)
    pm.write(layout.backupoff, info)
    pm.persist(layout.backupoff, INFO_SIZE)
    pm.write(0, info)
    pm.persist(0, INFO_SIZE)


class Pool:
    """An open pool: recovery on open, then block reads, atomic writes and zeroing.

    Methods take a lane index; callers pick one per reactor (`lane_for`). ``core``: run
    the C engine (None: when built and the memory is a libpmem mapping; True: also over
    a test's PersistentMemory, through callbacks).
    """

    def __init__(self, pm: PersistentMemory, *, path: str = "",
                 core: bool | None = None) -> None:
        self.pm = pm
        self.path = path
        self.repaired: list[str] = []
        self.recovered = 0
        layout, self.uuid = self._read_info()
        self.layout = layout
        self.block_size = layout.block_size
        self.num_blocks = layout.num_blocks
        es = layout.entry_size
        self._es = es
        self._shift = es * 8 - 2
        self._mask = (1 << self._shift) - 1
        self._normal = 3 << self._shift
        self._zero = 2 << self._shift
        self._mapoff = layout.mapoff
        self._dataoff = layout.dataoff
        mem = pm.mem
        self._map = mem[layout.mapoff:layout.mapoff + layout.num_blocks * es].cast(
            "I" if es == 4 else "Q")
        self._flog = mem[layout.flogoff:layout.flogoff + layout.nfree * FLOG_PAIR].cast("Q")
        # per lane, the physical blocks its reader is copying from (BTT's read tracking)
        self._rtt: list[frozenset[int] | set[int]] = [NO_READS] * layout.lanes
        self._map_locks = [threading.Lock() for _ in range(MAP_LOCKS)]
        self._zeroes = bytes(self.block_size)
        self.broken = ""
        self.core: _Core | None = None
        try:
            self.lanes = self._recover()
            if core is None:
                core = USE_C_ENGINE and isinstance(pm, _LibPmemMapping)
            if core and _clib is not None:
                self.core = _Core(self)
        except BaseException:
            self._map.release()  # no view may outlive the mapping the caller now unmaps
            self._flog.release()
            raise

    # ---- open ----
    def _read_info(self) -> tuple[Layout, bytes]:
        pm = self.pm
        primary = bytes(pm.mem[:INFO_SIZE])
        try:
            layout, pool_uuid = Layout.unpack_info(primary)
        except PoolError as exc:
            if pm.size < 2 * INFO_SIZE:
                raise
            backup = bytes(pm.mem[pm.size - INFO_SIZE:])
            try:
                layout, pool_uuid = Layout.unpack_info(backup)
            except PoolError:
                raise exc from None
            if layout.file_size != pm.size:
                raise PoolError(f"the file has {pm.size} bytes, its backup info block says "
                                f"{layout.file_size}") from None
            pm.write(0, backup)
            pm.persist(0, INFO_SIZE)
            self.repaired.append(f"primary info block restored from the backup ({exc})")
            return layout, pool_uuid
        if layout.file_size != pm.size:
            raise PoolError(f"the file has {pm.size} bytes, its info block says "
                            f"{layout.file_size}")
        backup = bytes(pm.mem[layout.backupoff:layout.backupoff + INFO_SIZE])
        if backup != primary:
            pm.write(layout.backupoff, primary)
            pm.persist(layout.backupoff, INFO_SIZE)
            self.repaired.append("backup info block rewritten from the primary")
        return layout, pool_uuid

    def _recover(self) -> list[_Lane]:
        """Finish every map update whose flog entry committed; rebuild the free lists."""
        layout = self.layout
        q = self._flog
        mask, internal = self._mask, layout.internal_blocks
        lanes = []
        for lane_index in range(layout.lanes):
            slots = []
            for s in range(layout.free_per_lane):
                i = lane_index * layout.free_per_lane + s
                base = i * FLOG_PAIR // 8
                e0 = tuple(q[base:base + 4])
                e1 = tuple(q[base + 4:base + 8])
                cur, which = _current(e0, e1)
                if cur is None:
                    raise PoolError(f"flog slot {i}: no valid sequence number "
                                    f"(seq {e0[3]}, {e1[3]})")
                lba, old, new, seq = cur
                if lba >= layout.num_blocks or old & mask >= internal or new & mask >= internal:
                    raise PoolError(f"flog slot {i}: entry out of range "
                                    f"(lba {lba}, old {old & mask}, new {new & mask})")
                if old != new:
                    entry = self._entry(lba)
                    if entry != new and entry == old:
                        self._store_map(lba, new)
                        self.pm.persist(self._mapoff + lba * self._es, self._es)
                        self.recovered += 1
                slots.append(_Slot(layout.flogoff + i * FLOG_PAIR, 1 - which, seq, old & mask))
            lanes.append(_Lane(lane_index, slots))
        return lanes

    def _entry(self, lba: int) -> int:
        """The map entry with the initial state spelled out (zero flag, block = LBA)."""
        raw = self._map[lba]
        return raw if raw >> self._shift else lba | self._zero

    def _store_map(self, lba: int, value: int) -> None:
        self.pm.store(self._mapoff + lba * self._es, value, self._es)

    def lane_for(self, index: int) -> int:
        return index % len(self.lanes)

    # ---- I/O ----
    def set_broken(self, why: str) -> None:
        """Refuse writes from now on (the C lane's too) until the pool is reopened."""
        self.broken = why
        if self.core is not None:
            _clib.bt_pmem_set_broken(self.core.c)

    def _range(self, lane: int, lba: int, count: int, buf: Any) -> None:
        """What the C engine would refuse (its memory is not bounds-checked by Python)."""
        if not (0 <= lane < len(self.lanes) and 0 <= lba and 0 <= count
                and lba + count <= self.num_blocks):
            raise IndexError(f"blocks {lba}+{count} (lane {lane}) are outside the pool")
        if buf is not None and len(buf) < count * self.block_size:
            raise ValueError("buffer shorter than the blocks")

    def read(self, lane: int, lba: int, count: int, dst: memoryview) -> None:
        """Copy `count` blocks into `dst`; each block is read whole, old or new."""
        core = self.core
        if core is not None:
            self._range(lane, lba, count, dst)
            rc = _clib.bt_pmem_read(core.c, lane, lba, count,
                                    _cffi.from_buffer("unsigned char[]", dst,
                                                      require_writable=True))
            if rc == _clib.BT_PMEM_MEDIA:
                raise MediaError(f"a block of {lba}+{count} is marked bad")
            return
        ln = self.lanes[lane]
        with ln.lock:
            self._read(ln.index, lba, count, dst)

    def _read(self, lane: int, lba: int, count: int, dst: memoryview) -> None:
        m, rtt, copy_out = self._map, self._rtt, self.pm.copy_out
        bs, shift, mask, dataoff = self.block_size, self._shift, self._mask, self._dataoff
        normal = 3
        try:
            done = 0
            while done < count:
                n = min(READ_BATCH, count - done)
                first = lba + done
                raws = m[first:first + n].tolist()
                # publish the blocks about to be copied (a writer then leaves them alone),
                # and make sure they are still the live ones
                rtt[lane] = {r & mask for r in raws if r >> shift == normal}
                if m[first:first + n].tolist() != raws:
                    continue  # a write moved one of them meanwhile: look again
                pos = done * bs
                if len(rtt[lane]) == n:  # all mapped (the usual case): one copy call
                    self.pm.gather([dataoff + (r & mask) * bs for r in raws],
                                   dst[pos:pos + n * bs], bs)
                else:
                    for raw in raws:
                        flags = raw >> shift
                        if flags == normal:
                            copy_out(dataoff + (raw & mask) * bs, dst[pos:pos + bs])
                        elif flags == 1:
                            raise MediaError(f"block {lba + pos // bs} is marked bad")
                        else:
                            dst[pos:pos + bs] = self._zeroes
                        pos += bs
                rtt[lane] = NO_READS
                done += n
        finally:
            rtt[lane] = NO_READS

    def write(self, lane: int, lba: int, count: int, src: memoryview) -> None:
        """Write `count` blocks from `src`; each block atomically (old or new after a crash)."""
        if self.broken:
            raise PoolBroken(self.broken)
        core = self.core
        if core is not None:
            self._range(lane, lba, count, src)
            rc = _clib.bt_pmem_write(core.c, lane, lba, count,
                                     _cffi.from_buffer("unsigned char[]", src))
            if rc == _clib.BT_PMEM_BROKEN:
                self.broken = "a write failed half way (in the C lane); reopen the pool"
                raise PoolBroken(self.broken)
            if rc != _clib.BT_PMEM_OK:
                exc = core.failure("persisting a block write")
                self.set_broken(f"a write failed half way ({exc!r}); reopen the pool")
                raise exc
            return
        ln = self.lanes[lane]
        k = len(ln.slots)
        with ln.lock:
            done = 0
            while done < count:
                n = min(k, count - done)
                try:
                    self._write_chunk(ln, lba + done, n, src, done * self.block_size)
                except BaseException as exc:
                    # the run-time free lists may no longer match the media: stop writing;
                    # reopening the pool recovers from what is on the media
                    self.set_broken(f"a write failed half way ({exc!r}); reopen the pool")
                    raise
                done += n

    def _write_chunk(self, ln: _Lane, lba: int, n: int, src: memoryview, pos: int) -> None:
        pm, bs = self.pm, self.block_size
        slots = ln.slots[:n]
        rtt = self._rtt
        dataoff = self._dataoff
        # 1. data into the free blocks (no reader may still be copying from one)
        if any(rtt):
            for slot in slots:
                self._wait_readers(slot.free, ln.index)
        pm.scatter_flush([dataoff + slot.free * bs for slot in slots], src[pos:pos + n * bs], bs)
        # (no drain here: the data only has to be durable before the sequence numbers,
        # and the drain after the flog bodies covers both)
        normal, es, body = self._normal, self._es, _FLOG_BODY.pack
        flog_start = slots[0].off
        flog_len = slots[-1].off + FLOG_PAIR - flog_start
        locks = self._locks_for(lba, n)
        for lk in locks:
            lk.acquire()
        try:
            # 2. the flog entries, all but their sequence numbers; drain (data too)
            olds = []
            m, shift, zero = self._map, self._shift, self._zero
            for i, slot in enumerate(slots):
                raw = m[lba + i]
                old = raw if raw >> shift else (lba + i) | zero
                olds.append(old)
                pm.write(slot.off + slot.next * FLOG_ENTRY,
                         body(lba + i, old, normal | slot.free))
            pm.flush(flog_start, flog_len)
            # with them, the map entries this lane's last write stored (its slots' flog
            # entries may be overwritten from step 3 on), and the entries just read as
            # `old` (another lane's write may have stored one without persisting it yet;
            # in a one-lane pool, only this lane's last write, whose entries are the former)
            if ln.map_len:
                pm.flush(ln.map_lo, ln.map_len)
            mapoff = self._mapoff + lba * es
            if len(self.lanes) > 1:
                pm.flush(mapoff, n * es)
            pm.drain()
            ln.map_len = 0
            # 3. the sequence numbers: each block's commit point
            pm.store_many([slot.off + slot.next * FLOG_ENTRY + 24 for slot in slots],
                          [NSEQ[slot.seq] for slot in slots], 8)
            pm.flush(flog_start, flog_len)
            pm.drain()
            # 4. the map, persisted by the next write's step 2 (this lane's or, for these
            # LBAs, any lane's): until then recovery redoes it from the flog
            pm.store_many(list(range(mapoff, mapoff + n * es, es)),
                          [normal | slot.free for slot in slots], es)
            ln.map_lo, ln.map_len = mapoff, n * es
        finally:
            for lk in reversed(locks):
                lk.release()
        mask = self._mask
        for slot, old in zip(slots, olds, strict=True):
            slot.seq = NSEQ[slot.seq]
            slot.next ^= 1
            slot.free = old & mask

    def _wait_readers(self, block: int, lane: int) -> None:
        """Wait while a reader on another lane still copies from `block` (BTT's RTT)."""
        rtt = self._rtt
        while any(block in blocks for i, blocks in enumerate(rtt) if i != lane):
            time.sleep(0)  # yields the GIL to the reader

    def _locks_for(self, lba: int, n: int) -> list[threading.Lock]:
        """The map locks of lba..lba+n-1 in a fixed global order (no deadlock)."""
        first = lba >> MAP_LOCK_SHIFT
        last = (lba + n - 1) >> MAP_LOCK_SHIFT
        if first == last:
            return [self._map_locks[first % MAP_LOCKS]]
        if last - first + 1 >= MAP_LOCKS:
            return self._map_locks
        idx = sorted({b % MAP_LOCKS for b in range(first, last + 1)})
        return [self._map_locks[i] for i in idx]

    def zero(self, lane: int, lba: int, count: int) -> None:
        """Make blocks read as zeroes by setting the map's zero flag (no data written)."""
        if self.broken:
            raise PoolBroken(self.broken)
        core = self.core
        if core is not None:
            self._range(0, lba, count, None)
            rc = _clib.bt_pmem_zero(core.c, lba, count)
            if rc == _clib.BT_PMEM_BROKEN:
                self.broken = "a write failed half way (in the C lane); reopen the pool"
                raise PoolBroken(self.broken)
            if rc != _clib.BT_PMEM_OK:
                raise core.failure("persisting zeroed map entries")
            return
        pm, es, m = self.pm, self._es, self._map
        shift, zero, mask = self._shift, self._zero, self._mask
        end = lba + count
        start = lba
        while start < end:
            stop = min(end, start + ZERO_CHUNK)
            locks = self._locks_for(start, stop - start)
            for lk in locks:
                lk.acquire()
            try:
                offs, values = [], []
                base = self._mapoff + start * es
                for i, raw in enumerate(m[start:stop].tolist()):
                    flags = raw >> shift
                    if flags == 0 or flags == 2:
                        continue  # already reads as zeroes
                    offs.append(base + i * es)
                    values.append(zero | (raw & mask))
                if offs:
                    pm.store_many(offs, values, es)
                    pm.flush(offs[0], offs[-1] + es - offs[0])
                    pm.drain()
            finally:
                for lk in reversed(locks):
                    lk.release()
            start = stop

    # ---- checks and reporting ----
    def check(self) -> list[str]:
        """Full consistency check (BTT's btt_check): every physical block is owned by
        exactly one LBA or one free-list slot. Returns the problems found; call it with
        no I/O in flight."""
        layout = self.layout
        if self.core is not None:
            self.core.sync_slots(self.lanes)
        internal, shift, mask = layout.internal_blocks, self._shift, self._mask
        owner = bytearray(internal)
        problems: list[str] = []
        for lba, raw in enumerate(self._map.tolist()):
            phys = raw & mask if raw >> shift else lba
            if phys >= internal:
                problems.append(f"map[{lba}] points outside the data area ({phys})")
            elif owner[phys]:
                problems.append(f"map[{lba}]: block {phys} is owned twice")
            else:
                owner[phys] = 1
        for ln in self.lanes:
            for s, slot in enumerate(ln.slots):
                if slot.free >= internal:
                    problems.append(f"lane {ln.index} slot {s}: free block out of range")
                elif owner[slot.free]:
                    problems.append(f"lane {ln.index} slot {s}: free block {slot.free} "
                                    "is also in use")
                else:
                    owner[slot.free] = 1
        missing = owner.count(0)
        if missing:
            problems.append(f"{missing} physical block(s) owned by nobody "
                            f"(first: {owner.index(0)})")
        return problems

    def describe(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "num_blocks": layout.num_blocks,
            "block_size": layout.block_size,
            "uuid": str(uuidlib.UUID(bytes=self.uuid)),
            "lanes": layout.lanes,
            "free_blocks_per_lane": layout.free_per_lane,
            "map_entry_size": layout.entry_size,
            "file_size": layout.file_size,
            "is_pmem": self.pm.is_pmem,
        }

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
            self.core = None
        self._map.release()
        self._flog.release()
        self.pm.close()


def _current(e0: tuple[int, ...], e1: tuple[int, ...]) -> tuple[tuple[int, ...] | None, int]:
    """The current entry of a flog pair and its index (BTT's rules for the 2-bit seq)."""
    s0, s1 = e0[3], e1[3]
    if s0 == s1 or s0 > 3 or s1 > 3:
        return None, 0
    if s0 == 0:
        return e1, 1
    if s1 == 0:
        return e0, 0
    if NSEQ[s0] == s1:
        return e1, 1
    if NSEQ[s1] == s0:
        return e0, 0
    return None, 0  # unreachable for distinct values in 1..3


# ---------------------------------------------------------------------------
# pool files


_OPEN: dict[str, PmemBdev] = {}  # realpath -> the bdev using it (this process)
_OPEN_LOCK = threading.Lock()


def _key(path: str) -> str:
    return os.path.realpath(path)


def in_use_by(path: str) -> str | None:
    bdev = _OPEN.get(_key(path))
    return bdev.name if bdev is not None else None


def create_pool_file(path: str, num_blocks: int, block_size: int, lanes: int,
                     free_per_lane: int = DEFAULT_FREE_PER_LANE,
                     entry_size: int | None = None) -> Layout:
    """Create and format a pool file; refuses to overwrite an existing file."""
    require_libpmem()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise Unsupported("pmem pools are little-endian; this host is not")
    try:
        layout = Layout.compute(num_blocks, block_size, lanes, free_per_lane, entry_size)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"pmem pool file '{path}' already exists") from None
    except OSError as exc:
        raise RpcError(f"cannot create pmem pool file '{path}': {exc.strerror}",
                       -(exc.errno or errno.EIO)) from None
    ok = False
    try:
        try:
            # allocate now: a store to an unbacked page of a full tmpfs is SIGBUS, not ENOSPC
            os.posix_fallocate(fd, 0, layout.file_size)
        except OSError as exc:
            raise RpcError(f"cannot allocate {layout.file_size} bytes for pmem pool "
                           f"'{path}': {exc.strerror}", -(exc.errno or errno.ENOSPC)) from None
        pm = map_pool_file(path)
        try:
            format_pool(pm, layout, uuidlib.uuid4().bytes)
        finally:
            pm.close()
        ok = True
    finally:
        os.close(fd)
        if not ok:
            try:
                os.unlink(path)
            except OSError:
                pass
    return layout


def open_pool(path: str) -> tuple[Pool, int]:
    """Map, lock and recover a pool; returns the pool and the fd holding its lock."""
    require_libpmem()
    try:
        read_info_file(path)  # a clear error before mapping anything odd
    except NoSuchDevice:
        raise NoSuchDevice(f"pmem pool file '{path}' does not exist (an operator creates "
                           "it once with bdev_pmem_create_pool)") from None
    try:
        lock_fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise RpcError(f"cannot open pmem pool file '{path}': {exc.strerror}",
                       -(exc.errno or errno.EIO)) from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"pmem pool '{path}' is in use by another process") from None
        try:
            pm = map_pool_file(path)
        except OSError as exc:
            raise RpcError(f"cannot map pmem pool '{path}': {exc.strerror}",
                           -(exc.errno or errno.EIO)) from None
        try:
            pool = Pool(pm, path=path)
        except PoolError as exc:
            pm.close()
            raise InvalidParams(f"'{path}' is not a usable pmem pool: {exc}") from None
        except BaseException:
            pm.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    for note in pool.repaired:
        log.warning("pmem pool %s: %s", path, note)
    if pool.recovered:
        log.info("pmem pool %s: completed %d interrupted block write(s)", path, pool.recovered)
    return pool, lock_fd


def pool_info(path: str) -> dict[str, Any]:
    """Geometry plus a consistency check (as SPDK's pmemblk_check), or the geometry
    alone when a bdev has the pool open (checking would race its I/O)."""
    user = in_use_by(path)
    if user is not None:
        bdev = _OPEN[_key(path)]
        info = bdev.pool.describe()
        info["in_use_by"] = user
        return info
    pool, fd = open_pool(path)
    try:
        info = pool.describe()
        problems = pool.check()
    finally:
        pool.close()
        os.close(fd)
    if problems:
        raise InvalidParams(f"pmem pool '{path}' is inconsistent: " + "; ".join(problems[:5]))
    info["consistent"] = True
    return info


def delete_pool_file(path: str) -> None:
    user = in_use_by(path)
    if user is not None:
        raise Busy(f"pmem pool '{path}' is in use by bdev '{user}'; delete the bdev first")
    read_info_file(path)  # only ever unlink something that is a pool
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise RpcError(f"cannot open pmem pool file '{path}': {exc.strerror}",
                       -(exc.errno or errno.EIO)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"pmem pool '{path}' is in use by another process") from None
        os.unlink(path)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# the bdev


class PmemChannel(IOChannel):
    bdev: PmemBdev

    def __init__(self, bdev: PmemBdev, reactor: Any) -> None:
        super().__init__(bdev, reactor)
        self.lane = bdev.pool.lane_for(reactor.index if reactor is not None else 0)

    def lane_target(self) -> LaneTarget | None:
        """Reads, writes and flushes in the C lane, through the same C engine (and so
        the same slots, locks and read tracking) as this channel's own I/O."""
        core = self.bdev.pool.core
        if core is None:
            return None
        return LaneTarget(LANE_PMEM, None, 0, (self,), pmem=(core.c, self.lane))

    def _submit(self, io: BdevIO) -> None:
        pool = self.bdev.pool
        t = io.type
        try:
            if t == IOType.READ:
                n = io.num_blocks * pool.block_size
                if io.buf is None:
                    io.buf = bytearray(n)
                pool.read(self.lane, io.offset_blocks, io.num_blocks, _bytes_view(io.buf))
            elif t == IOType.WRITE:
                pool.write(self.lane, io.offset_blocks, io.num_blocks, _bytes_view(io.buf))
            elif t == IOType.UNMAP or t == IOType.WRITE_ZEROES:
                pool.zero(self.lane, io.offset_blocks, io.num_blocks)
            elif t == IOType.COMPARE:
                n = io.num_blocks * pool.block_size
                cur = bytearray(n)
                pool.read(self.lane, io.offset_blocks, io.num_blocks, memoryview(cur))
                if _bytes_view(io.buf)[:n] != cur:
                    self.complete(io, Status.COMPARE_FAILURE)
                    return
            # FLUSH and RESET: every write is durable before it completes
        except MediaError:
            self.complete(io, Status.UNRECOVERED_READ_ERROR)
            return
        except PoolBroken:
            self.complete(io, Status.WRITE_FAULT)
            return
        self.complete(io, Status.SUCCESS)


def _bytes_view(buf: Any) -> memoryview:
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class PmemBdev(Bdev):
    def __init__(self, *, pool: Pool, lock_fd: int, path: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.pool = pool
        self.path = path
        self._lock_fd: int | None = lock_fd

    def create_channel(self, reactor: Any) -> IOChannel:
        return PmemChannel(self, reactor)

    def driver_specific(self) -> dict[str, Any]:
        info = self.pool.describe()
        return {"pmem": {"pmem_file": self.path, "lanes": info["lanes"],
                         "free_blocks_per_lane": info["free_blocks_per_lane"],
                         "map_entry_size": info["map_entry_size"],
                         "is_pmem": info["is_pmem"]}}

    def destruct(self) -> None:
        with _OPEN_LOCK:
            if _OPEN.get(_key(self.path)) is self:
                del _OPEN[_key(self.path)]
        if self._lock_fd is not None:
            self.pool.close()
            os.close(self._lock_fd)
            self._lock_fd = None


SCHEMA = Schema((
    Param("name", str, required=True, check=non_empty),
    Param("pmem_file", str, required=True, check=non_empty,
          help="pool file made by bdev_pmem_create_pool"),
    Param("uuid", str, check=check_uuid, help="default: the pool's own UUID"),
))


def create(params: dict[str, Any], target: Any = None) -> Bdev:
    """``target``: given for RPC and config calls, whose pool file must lie inside the
    target's allowed directories (in-process callers pass none)."""
    path = params["pmem_file"]
    if target is not None:
        check_path(target, path, "pmem pool")
    with _OPEN_LOCK:
        user = in_use_by(path)
        if user is not None:
            raise Busy(f"pmem pool '{path}' is already used by bdev '{user}'")
        pool, lock_fd = open_pool(path)
        try:
            bdev = PmemBdev(
                pool=pool,
                lock_fd=lock_fd,
                path=path,
                name=params["name"],
                block_size=pool.block_size,
                num_blocks=pool.num_blocks,
                uuid=params.get("uuid") or str(uuidlib.UUID(bytes=pool.uuid)),
                product_name="pmemblk disk",
                module="pmem",
                write_cache=False,
                io_types=frozenset(
                    {IOType.READ, IOType.WRITE, IOType.FLUSH, IOType.UNMAP,
                     IOType.WRITE_ZEROES, IOType.COMPARE, IOType.RESET}),
                create_method="bdev_pmem_create",
                create_params={"pmem_file": path},
            )
        except BaseException:
            pool.close()
            os.close(lock_fd)
            raise
        _OPEN[_key(path)] = bdev
    return bdev


MODULE = register_module(
    BdevModule(
        name="pmem",
        create=create,
        schema=SCHEMA,
        create_method="bdev_pmem_create",
        delete_method="bdev_pmem_delete",
        description="block-atomic bdev on a persistent-memory pool file (libpmem, BTT layout)",
        needs_target=True,  # for the allowed-directories check of the pool file
    )
)
