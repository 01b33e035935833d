"""An export: a mount, its session, and the devices behind it, with an orderly end.

Shutdown order matters for data: unmount first (the kernel stops sending requests and
fails new opens), let requests in flight finish and answer, then Flush every device
and disconnect. A mount still busy at shutdown (a process holds the file open) is
detached lazily and the channel closed after a grace period, so those processes get
ENOTCONN rather than a hang; nothing acknowledged is lost either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from .device import BdevDevice, BlockDevice
from .mount import Mount, mount, unmount
from .session import BlockFile, FuseSession

if TYPE_CHECKING:
    from blocktarget.bdev import Bdev
    from blocktarget.reactor import Reactor

__all__ = ["Export", "LocalExport", "file_name", "serve_on"]

log = logging.getLogger(__name__)


def file_name(nsid: int, ctrl_index: int = 0) -> str:
    """Linux's name for the namespace's block device (``nvme0n1``), so scripts that
    know one know the other."""
    return f"nvme{ctrl_index}n{nsid}"


class Export:
    """Mount ``devices`` as files under ``mountpoint`` and serve them on this loop."""

    def __init__(self, mountpoint: str, devices: Sequence[tuple[str, BlockDevice]], *,
                 fsname: str = "blocktarget", allow_other: bool = False,
                 fuse_device: str | None = None,
                 close_devices: Callable[[], Awaitable[None]] | None = None,
                 grace: float = 5.0) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.files = [BlockFile(name, dev, ino=i + 2) for i, (name, dev) in enumerate(devices)]
        self.fsname = fsname
        self.allow_other = allow_other
        self.fuse_device = fuse_device
        self.grace = grace
        self._close_devices = close_devices
        self.mnt: Mount | None = None
        self.session: FuseSession | None = None
        self._served: asyncio.Event | None = None

    def mount(self) -> None:
        """Raises FuseUnavailable when FUSE cannot be used or the mount fails."""
        self.mnt = mount(self.mountpoint, fsname=self.fsname, allow_other=self.allow_other,
                         device=self.fuse_device)
        self.session = FuseSession(self.mnt, self.files)

    async def serve(self) -> None:
        """Serve until unmounted (by :meth:`shutdown` or anyone else), then close."""
        assert self.session is not None and self.mnt is not None
        self._served = asyncio.Event()
        try:
            await self.session.run()
        finally:
            await self._close()
            self._served.set()

    async def shutdown(self) -> None:
        """Unmount and wait for :meth:`serve` to finish (call on the serving loop)."""
        if self.mnt is None or self.session is None:
            return
        try:
            await asyncio.to_thread(unmount, self.mnt)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # already unmounted
                self.session.stop()
            else:
                log.warning("%s busy (%s): detaching lazily", self.mountpoint, exc)
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(unmount, self.mnt, lazy=True)
        if self._served is None:
            await self._close()
            return
        try:
            async with asyncio.timeout(self.grace):
                await self._served.wait()
        except TimeoutError:
            log.warning("%s: still in use after %.0f s; aborting the FUSE connection",
                        self.mountpoint, self.grace)
            self.session.stop()
            await self._served.wait()

    async def _close(self) -> None:
        mnt, self.mnt = self.mnt, None
        if self.session is not None:
            await self.session.drain()
        if mnt is not None:
            with contextlib.suppress(OSError):
                os.close(mnt.fd)
        if self._close_devices is not None:
            close, self._close_devices = self._close_devices, None
            try:
                await close()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on
                log.warning("%s: closing devices: %s", self.mountpoint, exc)


def serve_on(loop: asyncio.AbstractEventLoop, export: Export) -> None:
    """Run ``export`` on ``loop`` (in the calling thread) until it is unmounted, then
    close the loop. serve() ends before the shutdown() that unmounted it returns, so the
    tasks still pending are run to their end rather than destroyed."""
    try:
        loop.run_until_complete(export.serve())
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    finally:
        loop.close()


class LocalExport:
    """A bdev of this target exported through FUSE, served by its own thread and loop
    (FUSE requests never run on a reactor or the control-plane loop; each I/O is sent
    to ``reactor`` as a BdevIO)."""

    def __init__(self, bdev: Bdev, reactor: Reactor, mountpoint: str, *,
                 allow_other: bool = False, fuse_device: str | None = None) -> None:
        self.bdev = bdev
        self.device = BdevDevice(bdev, reactor)
        self.export = Export(mountpoint, [(bdev.name, self.device)],
                             fsname=f"blocktarget:{bdev.name}", allow_other=allow_other,
                             fuse_device=fuse_device, close_devices=self.device.close)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Task[None] | None = None

    @property
    def mountpoint(self) -> str:
        return self.export.mountpoint

    def start(self) -> None:
        """Mount (errors raise here, in the caller) and start serving."""
        self.export.mount()
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            ready.set()
            serve_on(self.loop, self.export)

        self._thread = threading.Thread(target=run, name=f"fuse {self.bdev.name}",
                                        daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """Blocking: unmount, drain, flush (call from a worker thread, not a loop)."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        # Join the thread rather than wait for shutdown()'s future: the thread ends when
        # serving does, and the future's last callback may never run on a loop that
        # stopped in the same iteration (serve_on runs pending tasks, not callbacks).
        with contextlib.suppress(RuntimeError):  # loop already closed: serving has ended
            loop.call_soon_threadsafe(self._begin_shutdown)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"FUSE export at {self.mountpoint} did not stop in {timeout} s")

    def _begin_shutdown(self) -> None:
        assert self.loop is not None
        self._stopping = self.loop.create_task(self.export.shutdown())  # keep a reference

    def describe(self) -> dict[str, object]:
        s = self.export.session
        return {"bdev_name": self.bdev.name, "mountpoint": self.mountpoint,
                "file": os.path.join(self.mountpoint, self.bdev.name),
                "size": self.device.size_bytes,
                "requests": s.requests if s else 0, "errors": s.errors if s else 0}
