"""The FUSE kernel protocol (``include/uapi/linux/fuse.h``), sans-I/O: bytes in, tuples out.

Only what a block-file filesystem needs is decoded; every other opcode is answered
ENOSYS by the session, which the kernel remembers and stops sending. Layouts are the
protocol's 7.31+ shapes (this module speaks 7.31 at least; older kernels are refused at
INIT rather than half-served).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

__all__ = [
    "ATTR", "ENTRY_OUT", "IN_HEADER", "OUT_HEADER", "Op", "InitFlags", "FopenFlags",
    "Request", "parse_request", "attr_out", "entry_out", "init_out", "open_out",
    "write_out", "statfs_out", "dirent", "reply_header",
]

KERNEL_VERSION = 7
MIN_MINOR = 31
OUR_MINOR = 31  # FUSE_PARALLEL_DIRECT_WRITES and MAX_PAGES exist from here on


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    GETXATTR = 22
    LISTXATTR = 23
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    LSEEK = 46


class InitFlags(enum.IntFlag):
    ASYNC_READ = 1 << 0
    BIG_WRITES = 1 << 5
    ASYNC_DIO = 1 << 15
    PARALLEL_DIROPS = 1 << 18
    MAX_PAGES = 1 << 22


class FopenFlags(enum.IntFlag):
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    PARALLEL_DIRECT_WRITES = 1 << 6


# setattr "valid" bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10

# fallocate modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

FUSE_ROOT_ID = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows on 7.36+)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes: ... flags2, then reserved
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QIi")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
FSYNC_IN = struct.Struct("<QII")
FALLOCATE_IN = struct.Struct("<QQQII")
INTERRUPT_IN = struct.Struct("<Q")  # unique of the request the caller gave up on
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # 80 bytes
DIRENT = struct.Struct("<QQII")

assert IN_HEADER.size == 40 and ATTR.size == 88 and INIT_OUT.size == 64
assert SETATTR_IN.size == 88 and KSTATFS.size == 80


class Request(NamedTuple):
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview  # the op-specific part, a view into the read buffer


def parse_request(buf: memoryview) -> Request:
    """One request as read from /dev/fuse (a read returns exactly one)."""
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
    return Request(opcode, unique, nodeid, uid, gid, pid, buf[IN_HEADER.size:length])


def reply_header(unique: int, error: int, payload_len: int) -> bytes:
    """``error`` is 0 or a positive errno (sent negated, as the kernel expects)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, -error, unique)


class Attr(NamedTuple):
    ino: int
    size: int
    mode: int
    nlink: int
    uid: int
    gid: int
    blksize: int
    mtime_ns: int
    ctime_ns: int


def _attr(a: Attr) -> bytes:
    ms, mn = divmod(a.mtime_ns, 1_000_000_000)
    cs, cn = divmod(a.ctime_ns, 1_000_000_000)
    return ATTR.pack(a.ino, a.size, (a.size + 511) // 512, ms, ms, cs, mn, mn, cn, a.mode,
                     a.nlink, a.uid, a.gid, 0, a.blksize, 0)


def attr_out(a: Attr, valid_s: float) -> bytes:
    s, ns = _split(valid_s)
    return ATTR_OUT.pack(s, ns, 0) + _attr(a)


def entry_out(a: Attr, valid_s: float) -> bytes:
    s, ns = _split(valid_s)
    return ENTRY_OUT.pack(a.ino, 0, s, s, ns, ns) + _attr(a)


def _split(seconds: float) -> tuple[int, int]:
    s = int(seconds)
    return s, int((seconds - s) * 1e9)


def init_out(minor: int, max_readahead: int, flags: int, max_background: int,
             congestion: int, max_write: int, max_pages: int) -> bytes:
    return INIT_OUT.pack(KERNEL_VERSION, minor, max_readahead, flags, max_background,
                         congestion, max_write, 1, max_pages, 0, 0)


def open_out(fh: int, open_flags: int) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, 0)


def write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def statfs_out(blocks: int, bsize: int, files: int) -> bytes:
    return KSTATFS.pack(blocks, 0, 0, files, 0, bsize, 255, bsize, 0)


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    """One fuse_dirent, padded to 8 bytes; ``off`` is the cookie of the *next* entry."""
    raw = DIRENT.pack(ino, off, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)
