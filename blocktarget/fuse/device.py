"""Block devices a FUSE export can serve: a remote NVMe/TCP namespace, or a local bdev.

Both are used from the FUSE session's event loop. Transfers arrive whole from the FUSE
layer (up to max_write) and are split here at the device's limit (MDTS, 16-bit NLB).

Remote devices survive connection loss the way the Linux host does: any command that
fails because the transport went away (not because of an NVMe status) waits for one
shared reconnect and is then resubmitted; re-sending a read, write, flush or deallocate
is idempotent, and a write that was never acknowledged may be applied or not, as with
any block device. If the target stays away longer than ``ctrl_loss_tmo`` the device
fails: every command, pending and new, completes with EIO (never silently dropped),
while reconnecting goes on in the background so the export heals when the target
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from blocktarget.host.connection import NvmeStatusError
from blocktarget.host.controller import Controller, connect
from blocktarget.nvme import spec

if TYPE_CHECKING:
    from blocktarget.bdev import Bdev, BdevIO
    from blocktarget.reactor import Reactor

__all__ = ["BdevDevice", "BlockDevice", "DeviceError", "NvmeDevice", "RemoteController"]

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_NLB = 1 << 16  # one command's block count field is 16 bits, 0's based


class DeviceError(OSError):
    """An I/O that failed; ``errno`` is what the FUSE request answers."""


class BlockDevice:
    """What the filesystem needs from a device; all methods run on the session loop."""

    block_size: int
    num_blocks: int
    max_blocks: int  # per command
    can_deallocate: bool = False
    name: str = ""

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.num_blocks

    async def read(self, lba: int, buf: memoryview) -> None:
        raise NotImplementedError

    async def write(self, lba: int, data: memoryview) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError

    async def deallocate(self, lba: int, nblocks: int) -> None:
        """Blocks read back as zeroes afterwards (punch-hole semantics)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Flush what the device may cache and let go of it."""

    def _chunks(self, lba: int, nbytes: int) -> list[tuple[int, int, int]]:
        """(lba, byte offset, byte count) pieces of at most max_blocks blocks."""
        step = self.max_blocks * self.block_size
        return [(lba + off // self.block_size, off, min(step, nbytes - off))
                for off in range(0, nbytes, step)]


class RemoteController:
    """One connection to a remote subsystem, shared by the namespaces exported from it,
    with the recovery described in the module docstring."""

    def __init__(self, addr: str, port: int, subnqn: str, *, nr_io_queues: int = 1,
                 queue_size: int = 128, hostnqn: str | None = None, hdgst: bool = False,
                 ddgst: bool = False, timeout: float = 30.0, reconnect_delay: float = 1.0,
                 ctrl_loss_tmo: float = 60.0, tls_key: str | None = None) -> None:
        self.addr, self.port, self.subnqn = addr, port, subnqn
        self._kw: dict[str, Any] = dict(nr_io_queues=nr_io_queues, queue_size=queue_size,
                                        hostnqn=hostnqn, hdgst=hdgst, ddgst=ddgst,
                                        timeout=timeout, tls_key=tls_key)
        self.reconnect_delay = reconnect_delay
        self.ctrl_loss_tmo = ctrl_loss_tmo
        self.ctrl: Controller | None = None
        self.generation = 0  # bumped by each successful (re)connect
        self.reconnects = 0
        self.failed = False  # past ctrl_loss_tmo: fail fast until a reconnect succeeds
        self.namespaces: list[NvmeDevice] = []
        self._reconnect_task: asyncio.Task[None] | None = None

    async def open(self) -> RemoteController:
        """First connection: failures here are the caller's to report (no retry)."""
        self.ctrl = await connect(self.addr, self.port, self.subnqn, **self._kw)
        self.generation = 1
        return self

    async def namespace(self, nsid: int) -> NvmeDevice:
        assert self.ctrl is not None
        dev = NvmeDevice(self, nsid)
        await dev.describe(self.ctrl)
        self.namespaces.append(dev)
        return dev

    async def run(self, op: Callable[[Controller], Awaitable[T]]) -> T:
        while True:
            if self.failed:
                raise DeviceError(errno.EIO, f"{self.subnqn}: controller lost")
            ctrl, gen = self.ctrl, self.generation
            if ctrl is None or not ctrl.connected:
                await self._recover(gen)
                continue
            try:
                return await op(ctrl)
            except NvmeStatusError as exc:
                raise DeviceError(errno.EIO, f"{self.subnqn}: {exc}") from exc
            except (ConnectionError, TimeoutError, OSError) as exc:
                log.warning("%s: I/O failed on the transport (%s); reconnecting", self.subnqn,
                            exc)
                await self._recover(gen)

    async def _recover(self, gen: int) -> None:
        """Wait for a connection newer than ``gen`` (one reconnect for all waiters)."""
        if self.generation != gen and self.ctrl is not None and self.ctrl.connected:
            return
        task = self._reconnect_task
        if task is None or task.done():
            task = self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(), name=f"reconnect {self.subnqn}")
        try:
            async with asyncio.timeout(self.ctrl_loss_tmo):
                await asyncio.shield(task)
        except TimeoutError:
            if not self.failed:
                log.error("%s: no connection for %.0f s (ctrl_loss_tmo): failing I/O with "
                          "EIO, still reconnecting in the background", self.subnqn,
                          self.ctrl_loss_tmo)
            self.failed = True
            raise DeviceError(errno.EIO, f"{self.subnqn}: controller lost") from None

    async def _reconnect_loop(self) -> None:
        old, self.ctrl = self.ctrl, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        while True:
            try:
                ctrl = await connect(self.addr, self.port, self.subnqn, **self._kw)
            except (ConnectionError, TimeoutError, OSError, NvmeStatusError) as exc:
                log.info("%s: reconnect failed (%s); retrying in %.1f s", self.subnqn, exc,
                         self.reconnect_delay)
                await asyncio.sleep(self.reconnect_delay)
                continue
            try:
                for ns in self.namespaces:
                    await ns.describe(ctrl)
            except (ConnectionError, TimeoutError, OSError, NvmeStatusError) as exc:
                await ctrl.close()
                log.info("%s: reconnect failed (%s); retrying", self.subnqn, exc)
                await asyncio.sleep(self.reconnect_delay)
                continue
            self.ctrl = ctrl
            self.generation += 1
            self.reconnects += 1
            self.failed = False
            log.warning("%s: reconnected (cntlid %d)", self.subnqn, ctrl.cntlid)
            return

    async def close(self) -> None:
        """Flush every namespace, then an orderly disconnect."""
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        ctrl, self.ctrl = self.ctrl, None
        if ctrl is not None and ctrl.connected:
            for ns in self.namespaces:
                with contextlib.suppress(Exception):
                    await ctrl.flush(ns.nsid)
            await ctrl.disconnect()
        elif ctrl is not None:
            await ctrl.close()


class NvmeDevice(BlockDevice):
    """One namespace of a remote NVMe/TCP subsystem, through blocktarget.host."""

    def __init__(self, remote: RemoteController, nsid: int) -> None:
        self.remote = remote
        self.nsid = nsid
        self._use_dsm = False
        self.name = f"{remote.subnqn}/{nsid}"

    async def describe(self, ctrl: Controller) -> None:
        """Geometry and deallocate support, (re)read at every connect."""
        info = await ctrl.namespace(self.nsid, refresh=True)
        if info.ms:
            raise DeviceError(errno.EOPNOTSUPP, f"namespace {self.nsid} has {info.ms}-byte "
                              "metadata per block, which a file cannot carry")
        if getattr(self, "block_size", info.lba_size) != info.lba_size:
            raise DeviceError(errno.EIO, f"namespace {self.nsid} changed its block size "
                              f"across a reconnect ({self.block_size} -> {info.lba_size})")
        self.block_size = info.lba_size
        self.num_blocks = info.nsze
        mdts_blocks = ctrl.max_transfer // info.lba_size if ctrl.max_transfer else MAX_NLB
        self.max_blocks = max(1, min(MAX_NLB, mdts_blocks))
        oncs = ctrl.id_ctrl.get("oncs", 0)
        ns = await ctrl.identify_ns(self.nsid)
        reads_zero = ns.get("dlfeat", 0) & 0x7 == spec.Dlfeat.READ_ZEROES
        # Deallocate only promises zeroes when DLFEAT says so; otherwise Write Zeroes
        # (which may deallocate too) keeps the punch-hole promise.
        self._use_dsm = bool(oncs & spec.Oncs.DSM) and reads_zero
        self.can_deallocate = self._use_dsm or bool(oncs & spec.Oncs.WRITE_ZEROES)

    async def read(self, lba: int, buf: memoryview) -> None:
        run, nsid, bs = self.remote.run, self.nsid, self.block_size

        async def one(c: int, off: int, n: int) -> None:
            await run(lambda ctrl: ctrl.read(nsid, c, n // bs, buf[off:off + n]))
        chunks = self._chunks(lba, buf.nbytes)
        if len(chunks) == 1:
            await one(*chunks[0])
        else:
            await asyncio.gather(*(one(*p) for p in chunks))

    async def write(self, lba: int, data: memoryview) -> None:
        run, nsid = self.remote.run, self.nsid

        async def one(c: int, off: int, n: int) -> None:
            await run(lambda ctrl: ctrl.write(nsid, c, data[off:off + n]))
        chunks = self._chunks(lba, data.nbytes)
        if len(chunks) == 1:
            await one(*chunks[0])
        else:
            await asyncio.gather(*(one(*p) for p in chunks))

    async def flush(self) -> None:
        await self.remote.run(lambda ctrl: ctrl.flush(self.nsid))

    async def deallocate(self, lba: int, nblocks: int) -> None:
        run, nsid = self.remote.run, self.nsid
        if self._use_dsm:
            step = 0xFFFFFFFF
            ranges = [(s, min(step, lba + nblocks - s)) for s in range(lba, lba + nblocks, step)]
            for i in range(0, len(ranges), spec.DSM_MAX_RANGES):
                part = ranges[i:i + spec.DSM_MAX_RANGES]
                await run(lambda ctrl, p=part: ctrl.dsm_deallocate(nsid, p))
            return
        chunks = [(s, min(MAX_NLB, lba + nblocks - s))
                  for s in range(lba, lba + nblocks, MAX_NLB)]
        await asyncio.gather(*(run(
            lambda ctrl, s=s, n=n: ctrl.write_zeroes(nsid, s, n, deallocate=True))
            for s, n in chunks))


class BdevDevice(BlockDevice):
    """A bdev inside this target process. The session runs on its own thread's loop;
    each I/O is handed to a reactor (``Reactor.send``), submitted on that reactor's
    I/O channel, and its completion comes back with ``call_soon_threadsafe``."""

    def __init__(self, bdev: Bdev, reactor: Reactor) -> None:
        from blocktarget.bdev import IOType

        self.bdev = bdev
        self.reactor = reactor
        self.block_size = bdev.block_size
        self.num_blocks = bdev.num_blocks
        self.max_blocks = max(1, (1 << 20) // bdev.block_size)
        self.can_deallocate = IOType.UNMAP in bdev.io_types \
            or IOType.WRITE_ZEROES in bdev.io_types
        self.name = bdev.name
        self._types = bdev.io_types

    async def _io(self, type_: int, lba: int = 0, nblocks: int = 0, buf: Any = None) -> None:
        from blocktarget.bdev import BdevIO, IOType, Status

        if self.bdev.removed:
            raise DeviceError(errno.EIO, f"bdev {self.name} was deleted")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def done(io: BdevIO) -> None:
            if io.type == IOType.READ and buf is not None and io.buf is not buf:
                buf[:] = io.buf[:buf.nbytes]  # a backend that answered with its own memory
            loop.call_soon_threadsafe(_set, fut, io.status)

        def submit() -> None:
            ch = self.bdev.get_io_channel(self.reactor)
            ch.submit(BdevIO(IOType(type_), lba, nblocks, buf, done))

        await asyncio.wrap_future(self.reactor.send(submit))
        status = await fut
        if status != Status.SUCCESS:
            try:
                what = Status(status).name
            except ValueError:
                what = f"status {status:#x}"
            raise DeviceError(errno.EIO, f"bdev {self.name}: {what}")

    async def read(self, lba: int, buf: memoryview) -> None:
        from blocktarget.bdev import IOType

        bs = self.block_size
        await asyncio.gather(*(self._io(IOType.READ, c, n // bs, buf[off:off + n])
                               for c, off, n in self._chunks(lba, buf.nbytes)))

    async def write(self, lba: int, data: memoryview) -> None:
        from blocktarget.bdev import IOType

        bs = self.block_size
        await asyncio.gather(*(self._io(IOType.WRITE, c, n // bs, data[off:off + n])
                               for c, off, n in self._chunks(lba, data.nbytes)))

    async def flush(self) -> None:
        from blocktarget.bdev import IOType

        if IOType.FLUSH in self._types:
            await self._io(IOType.FLUSH, 0, self.num_blocks)

    async def deallocate(self, lba: int, nblocks: int) -> None:
        from blocktarget.bdev import IOType

        # UNMAP on a bdev reads back zeroes (what our target advertises as DLFEAT)
        t = IOType.UNMAP if IOType.UNMAP in self._types else IOType.WRITE_ZEROES
        await self._io(t, lba, nblocks)

    async def close(self) -> None:
        with contextlib.suppress(DeviceError):
            await self.flush()


def _set(fut: asyncio.Future[int], status: int) -> None:
    if not fut.done():
        fut.set_result(status)
