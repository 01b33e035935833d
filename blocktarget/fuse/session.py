"""A FUSE session serving block devices as files, on one asyncio loop.

Requests are read from the non-blocking /dev/fuse channel in the loop's reader
callback, as many as are queued (one read(2) returns one request). Metadata requests
are answered inline; READ, WRITE, FSYNC and FALLOCATE each become a task, so requests
the kernel sends concurrently (several threads, or AIO with FUSE_ASYNC_DIO) become
concurrent NVMe commands: the FUSE queue depth is the NVMe queue depth.

Decisions:

* Every open is FOPEN_DIRECT_IO, whatever the open flags: the data lives on a target
  other hosts may write, so a page cache here would serve stale data and would make
  ``write`` return before the target has the data. fsync is then the only durability
  point (it sends Flush), exactly as on a block device. The cost: no shared mmap and
  no read-ahead for small buffered reads.
* FOPEN_PARALLEL_DIRECT_WRITES lets the kernel send writes to one file concurrently
  (it would otherwise hold the inode lock across each write).
* Byte ranges that do not cover whole blocks are read-modify-written. Every write holds
  a lock on the block range it touches, so two writes sharing a block never lose each
  other's bytes; reads take no lock (a read racing a write sees old or new blocks, as
  on any disk).
* The file size is the namespace size and cannot change: truncate to another size is
  EPERM, a write at or past the end is ENOSPC and one that straddles the end is cut
  short, as the block layer does for a device.
* Interrupts (FUSE_INTERRUPT, sent when the caller of a request we are serving gets a
  signal): the kernel keeps waiting for our answer even for SIGKILL once a request is
  read, so ignoring interrupts turns a stalled target into unkillable processes. A read
  is answered EINTR at once: its NVMe command stays outstanding and finishes (or times
  out) on its own, its data is dropped, and reads have no side effect to lose. A write,
  fsync or fallocate is answered EINTR only while none of its NVMe commands has been
  sent (waiting for the block-range lock or the read half of a read-modify-write);
  once one has, the request runs to completion and is answered with its real result,
  because a write cannot be taken back and "interrupted" must mean "not done". An
  INTERRUPT for a request already answered is dropped: requests are read and
  dispatched in order on one loop, so the original was always seen first, and the
  kernel discards the interrupt itself when the answer arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import proto
from .device import BlockDevice, DeviceError
from .mount import Mount

__all__ = ["BlockFile", "FuseSession", "RangeLock"]

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
MAX_BACKGROUND = 64  # async requests (AIO direct I/O) the kernel keeps in flight
ATTR_VALID = 1.0
DT_DIR = 4
DT_REG = 8
_NO_REPLY = {proto.Op.FORGET, proto.Op.BATCH_FORGET, proto.Op.INTERRUPT}


class FuseError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


@dataclass(eq=False)
class _Pending:
    """A data request being served, and how far it got (see the interrupt rules)."""

    opcode: int
    task: asyncio.Task[None] | None = None
    committed: bool = False  # a command with side effects has been sent to the device
    interrupted: bool = False


_CURRENT: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "fuse_request", default=None)


def _commit() -> None:
    """Mark the running request as past the point where an interrupt can undo it."""
    p = _CURRENT.get()
    if p is not None:
        p.committed = True


class RangeLock:
    """Exclusive locks on half-open block ranges; waiters retry when any holder leaves."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._changed: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int):  # type: ignore[no-untyped-def]
        while any(s < end and start < e for s, e in self._held):
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        entry = (start, end)
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            ev, self._changed = self._changed, None
            if ev is not None:
                ev.set()


@dataclass(eq=False)
class BlockFile:
    """One file of the export: a device and its inode's attributes."""

    name: str
    device: BlockDevice
    ino: int
    mode: int = 0o600
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    lock: RangeLock = field(default_factory=RangeLock)

    def attr(self) -> proto.Attr:
        return proto.Attr(self.ino, self.device.size_bytes, stat.S_IFREG | self.mode, 1,
                          self.uid, self.gid, self.device.block_size, self.mtime_ns,
                          self.ctime_ns)


class FuseSession:
    """Serves ``files`` under a mounted channel until unmounted or :meth:`stop`."""

    def __init__(self, mnt: Mount, files: Sequence[BlockFile]) -> None:
        self.mnt = mnt
        self.files = {f.ino: f for f in files}
        self.by_name = {f.name.encode(): f for f in files}
        self.root_time = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()
        self._buf = bytearray(MAX_WRITE + 4096)
        self._view = memoryview(self._buf)
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[int, _Pending] = {}  # by request unique
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0
        self.errors = 0
        self.interrupted = 0  # requests answered EINTR because their caller gave up

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve until the kernel says the filesystem is gone (unmount, abort)."""
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._loop.add_reader(self.mnt.fd, self._readable)
        try:
            await self._done
        finally:
            self._loop.remove_reader(self.mnt.fd)
            await self.drain()

    async def drain(self) -> None:
        """Wait for requests in flight (they answer the kernel, or fail, first)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def stop(self) -> None:
        """End :meth:`run` (after an unmount the kernel does this itself with ENODEV)."""
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _readable(self) -> None:
        fd, view = self.mnt.fd, self._view
        while True:
            try:
                n = os.readv(fd, [self._buf])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                # ENODEV: unmounted
                if exc.errno != errno.ENODEV:
                    log.error("fuse %s: read: %s", self.mnt.mountpoint, exc)
                self.stop()
                return
            if n == 0:
                self.stop()
                return
            self.requests += 1
            self._dispatch(proto.parse_request(view[:n]))

    def _reply(self, unique: int, err: int = 0, *payload: bytes | memoryview) -> None:
        size = sum(memoryview(p).nbytes for p in payload)
        try:
            os.writev(self.mnt.fd, [proto.reply_header(unique, err, size), *payload])
        except OSError as exc:
            # ENOENT: interrupted and forgotten by the kernel; ENODEV: unmounted
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("fuse %s: reply: %s", self.mnt.mountpoint, exc)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, req: proto.Request) -> None:
        op = req.opcode
        if op == proto.Op.INTERRUPT:
            self._interrupt(req)
            return
        if op in _NO_REPLY:
            return
        if op in (proto.Op.READ, proto.Op.WRITE, proto.Op.FSYNC, proto.Op.FALLOCATE):
            # the read buffer is reused by the next request: the task gets its own copy
            body = memoryview(bytes(req.body))
            pending = _Pending(op)
            task = asyncio.get_running_loop().create_task(
                self._io(req._replace(body=body), pending))
            pending.task = task
            self._inflight[req.unique] = pending
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            handler = _META.get(op)
            if handler is None:
                raise FuseError(errno.ENOSYS)
            payload = handler(self, req)
            self._reply(req.unique, 0, *payload)
        except FuseError as exc:
            self._reply(req.unique, exc.errno)
        except Exception:
            log.exception("fuse %s: opcode %d", self.mnt.mountpoint, op)
            self._reply(req.unique, errno.EIO)
        if op == proto.Op.DESTROY:
            self.stop()

    def _interrupt(self, req: proto.Request) -> None:
        """The caller of request ``unique`` got a signal (rules in the module docstring)."""
        (unique,) = proto.INTERRUPT_IN.unpack_from(req.body)
        p = self._inflight.get(unique)
        if p is None or p.task is None:
            return  # answered already; the kernel drops the interrupt
        if p.opcode == proto.Op.READ or not p.committed:
            p.interrupted = True
            p.task.cancel()
        else:
            log.info("fuse %s: request %d interrupted after its command was sent; "
                     "finishing it", self.mnt.mountpoint, unique)

    async def _io(self, req: proto.Request, pending: _Pending) -> None:
        _CURRENT.set(pending)  # this task's own context
        try:
            f = self._file(req.nodeid)
            if req.opcode == proto.Op.READ:
                _fh, off, size, *_ = proto.READ_IN.unpack_from(req.body)
                data = await self.read(f, off, size)
                self._reply(req.unique, 0, data)
            elif req.opcode == proto.Op.WRITE:
                _fh, off, size, *_ = proto.WRITE_IN.unpack_from(req.body)
                data = req.body[proto.WRITE_IN.size:proto.WRITE_IN.size + size]
                n = await self.write(f, off, data)
                self._reply(req.unique, 0, proto.write_out(n))
            elif req.opcode == proto.Op.FSYNC:
                _commit()
                await f.device.flush()
                self._reply(req.unique)
            else:
                _fh, off, length, mode, _ = proto.FALLOCATE_IN.unpack_from(req.body)
                await self.fallocate(f, off, length, mode)
                self._reply(req.unique)
        except FuseError as exc:
            self.errors += 1
            self._reply(req.unique, exc.errno)
        except DeviceError as exc:
            self.errors += 1
            log.error("fuse %s: %s", self.mnt.mountpoint, exc)
            self._reply(req.unique, exc.errno or errno.EIO)
        except Exception:
            self.errors += 1
            log.exception("fuse %s: opcode %d", self.mnt.mountpoint, req.opcode)
            self._reply(req.unique, errno.EIO)
        except asyncio.CancelledError:
            if not pending.interrupted:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.interrupted += 1
            self._reply(req.unique, errno.EINTR)
        finally:
            self._inflight.pop(req.unique, None)

    def _file(self, nodeid: int) -> BlockFile:
        f = self.files.get(nodeid)
        if f is None:
            raise FuseError(errno.EISDIR if nodeid == proto.FUSE_ROOT_ID else errno.ENOENT)
        return f

    # ------------------------------------------------------------------ data path

    async def read(self, f: BlockFile, off: int, size: int) -> memoryview | bytes:
        dev = f.device
        end = min(off + size, dev.size_bytes)
        if off >= end:
            return b""
        bs = dev.block_size
        first, last = off // bs, (end + bs - 1) // bs
        buf = memoryview(bytearray((last - first) * bs))
        await dev.read(first, buf)
        return buf[off - first * bs:end - first * bs]

    async def write(self, f: BlockFile, off: int, data: memoryview) -> int:
        dev = f.device
        total = dev.size_bytes
        if off >= total:
            raise FuseError(errno.ENOSPC)
        data = data[:total - off]
        size = data.nbytes
        if size == 0:
            return 0
        end = off + size
        bs = dev.block_size
        first, last = off // bs, (end + bs - 1) // bs
        async with f.lock.hold(first, last):
            if off % bs == 0 and end % bs == 0:
                _commit()
                await dev.write(first, data)
            else:
                buf = memoryview(bytearray((last - first) * bs))
                edges = {first} if off % bs else set()
                if end % bs:
                    edges.add(last - 1)
                await asyncio.gather(*(dev.read(b, buf[(b - first) * bs:(b - first + 1) * bs])
                                       for b in edges))
                buf[off - first * bs:end - first * bs] = data
                _commit()
                await dev.write(first, buf)
        f.mtime_ns = f.ctime_ns = time.time_ns()
        return size

    async def fallocate(self, f: BlockFile, off: int, length: int, mode: int) -> None:
        dev = f.device
        total = dev.size_bytes
        if mode & ~(proto.FALLOC_FL_KEEP_SIZE | proto.FALLOC_FL_PUNCH_HOLE
                    | proto.FALLOC_FL_ZERO_RANGE):
            raise FuseError(errno.EOPNOTSUPP)
        if not mode & (proto.FALLOC_FL_PUNCH_HOLE | proto.FALLOC_FL_ZERO_RANGE):
            # plain allocation: every block exists already; growing the file cannot happen
            if off + length > total and not mode & proto.FALLOC_FL_KEEP_SIZE:
                raise FuseError(errno.EFBIG)
            return
        if mode & proto.FALLOC_FL_PUNCH_HOLE and not mode & proto.FALLOC_FL_KEEP_SIZE:
            raise FuseError(errno.EINVAL)  # what every Linux filesystem answers
        end = min(off + length, total)
        if off >= end:
            return
        bs = dev.block_size
        first, last = (off + bs - 1) // bs, end // bs  # whole blocks inside the range
        head = min(end, first * bs) - off
        tail = end - max(off, last * bs) if last >= first else 0
        if last > first and not dev.can_deallocate:
            raise FuseError(errno.EOPNOTSUPP)
        # partial blocks at the edges are zeroed by writing zeroes
        if last < first:  # inside one block
            await self.write(f, off, memoryview(bytes(end - off)))
            return
        if head:
            await self.write(f, off, memoryview(bytes(head)))
        if tail:
            await self.write(f, last * bs, memoryview(bytes(tail)))
        if last > first:
            async with f.lock.hold(first, last):
                _commit()
                await dev.deallocate(first, last - first)
        f.mtime_ns = f.ctime_ns = time.time_ns()

    # ------------------------------------------------------------------ metadata

    def _root_attr(self) -> proto.Attr:
        return proto.Attr(proto.FUSE_ROOT_ID, 0, stat.S_IFDIR | 0o755, 2, self.uid, self.gid,
                          4096, self.root_time, self.root_time)

    def _attr(self, nodeid: int) -> proto.Attr:
        if nodeid == proto.FUSE_ROOT_ID:
            return self._root_attr()
        return self._file(nodeid).attr()

    def _init(self, req: proto.Request) -> tuple[bytes]:
        major, minor, max_readahead, flags = proto.INIT_IN.unpack_from(req.body)
        if major != proto.KERNEL_VERSION or minor < proto.MIN_MINOR:
            log.error("fuse: kernel protocol %d.%d is older than 7.%d", major, minor,
                      proto.MIN_MINOR)
            raise FuseError(errno.EPROTO)
        want = (proto.InitFlags.ASYNC_READ | proto.InitFlags.BIG_WRITES
                | proto.InitFlags.ASYNC_DIO | proto.InitFlags.MAX_PAGES)
        return (proto.init_out(min(minor, proto.OUR_MINOR), max_readahead, flags & want,
                               MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE,
                               MAX_PAGES),)

    def _lookup(self, req: proto.Request) -> tuple[bytes]:
        if req.nodeid != proto.FUSE_ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        name = bytes(req.body).split(b"\0", 1)[0]
        f = self.by_name.get(name)
        if f is None:
            raise FuseError(errno.ENOENT)
        return (proto.entry_out(f.attr(), ATTR_VALID),)

    def _getattr(self, req: proto.Request) -> tuple[bytes]:
        return (proto.attr_out(self._attr(req.nodeid), ATTR_VALID),)

    def _setattr(self, req: proto.Request) -> tuple[bytes]:
        (valid, _p, _fh, size, _lo, _at, mtime, _ct, _atn, mtimens, _ctn, mode, _u4, uid, gid,
         _u5) = proto.SETATTR_IN.unpack_from(req.body)
        if req.nodeid == proto.FUSE_ROOT_ID:
            raise FuseError(errno.EPERM)
        f = self._file(req.nodeid)
        if valid & proto.FATTR_SIZE and size != f.device.size_bytes:
            raise FuseError(errno.EPERM)  # a namespace has the size it has
        if valid & proto.FATTR_MODE:
            f.mode = mode & 0o7777
        if valid & proto.FATTR_UID:
            f.uid = uid
        if valid & proto.FATTR_GID:
            f.gid = gid
        if valid & proto.FATTR_MTIME_NOW:
            f.mtime_ns = time.time_ns()
        elif valid & proto.FATTR_MTIME:
            f.mtime_ns = mtime * 1_000_000_000 + mtimens
        f.ctime_ns = time.time_ns()
        return (proto.attr_out(f.attr(), ATTR_VALID),)

    def _open(self, req: proto.Request) -> tuple[bytes]:
        self._file(req.nodeid)
        return (proto.open_out(0, proto.FopenFlags.DIRECT_IO
                               | proto.FopenFlags.PARALLEL_DIRECT_WRITES),)

    def _opendir(self, req: proto.Request) -> tuple[bytes]:
        if req.nodeid != proto.FUSE_ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        return (proto.open_out(0, 0),)

    def _readdir(self, req: proto.Request) -> tuple[bytes]:
        _fh, off, size, *_ = proto.READ_IN.unpack_from(req.body)
        entries = [(proto.FUSE_ROOT_ID, b".", DT_DIR), (proto.FUSE_ROOT_ID, b"..", DT_DIR)]
        entries += [(f.ino, f.name.encode(), DT_REG) for f in self.files.values()]
        out = bytearray()
        for i in range(off, len(entries)):
            ino, name, dtype = entries[i]
            d = proto.dirent(ino, i + 1, name, dtype)
            if len(out) + len(d) > size:
                break
            out += d
        return (bytes(out),)

    def _statfs(self, req: proto.Request) -> tuple[bytes]:
        total = sum(f.device.size_bytes for f in self.files.values())
        return (proto.statfs_out(total // 4096, 4096, len(self.files) + 1),)

    def _empty(self, req: proto.Request) -> tuple[()]:
        return ()


_META = {
    proto.Op.INIT: FuseSession._init,
    proto.Op.LOOKUP: FuseSession._lookup,
    proto.Op.GETATTR: FuseSession._getattr,
    proto.Op.SETATTR: FuseSession._setattr,
    proto.Op.OPEN: FuseSession._open,
    proto.Op.OPENDIR: FuseSession._opendir,
    proto.Op.READDIR: FuseSession._readdir,
    proto.Op.STATFS: FuseSession._statfs,
    proto.Op.RELEASE: FuseSession._empty,
    proto.Op.RELEASEDIR: FuseSession._empty,
    proto.Op.FLUSH: FuseSession._empty,  # close(2) is not a durability point; fsync is
    proto.Op.FSYNCDIR: FuseSession._empty,
    proto.Op.ACCESS: FuseSession._empty,
    proto.Op.DESTROY: FuseSession._empty,
}
