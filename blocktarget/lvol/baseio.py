"""I/O on a store's base bdev in the two styles the store needs: callback chains on a
reactor (the I/O path must never block) and awaitables on the control plane (which
uses the base's reactor-less channel; its completion may come from any thread)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..bdev import BdevIO, IOChannel, IOType, Status

ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(ZERO_CHUNK))

Done = Callable[[int], None]  # called with the first failing status, or 0


class Join:
    """Completes `done` once after `n` parts finished, with the first failure."""

    __slots__ = ("left", "status", "done")

    def __init__(self, n: int, done: Done) -> None:
        self.left = n
        self.status = 0
        self.done = done
        if n == 0:
            done(0)

    def part(self, io: BdevIO) -> None:
        self.one(io.status)

    def one(self, status: int) -> None:
        if status and not self.status:
            self.status = status
        self.left -= 1
        if self.left == 0:
            self.done(self.status)


def submit(ch: IOChannel, kind: IOType, offset_blocks: int, num_blocks: int, buf: Any,
           done: Done, *, fua: bool = False) -> None:
    ch.submit(BdevIO(kind, offset_blocks, num_blocks, buf, lambda io: done(io.status),
                     fua=fua))


def zero(ch: IOChannel, offset_blocks: int, num_blocks: int, done: Done) -> None:
    """Make blocks read zeroes: Write Zeroes when the base has it, else written zeroes
    (Deallocate is not used: a base need not read it back as zeroes)."""
    if num_blocks == 0:
        done(0)
        return
    bdev = ch.bdev
    if IOType.WRITE_ZEROES in bdev.io_types:
        submit(ch, IOType.WRITE_ZEROES, offset_blocks, num_blocks, None, done)
        return
    bs = bdev.block_size
    per = max(1, ZERO_CHUNK // bs)
    chunks = [(o, min(per, offset_blocks + num_blocks - o))
              for o in range(offset_blocks, offset_blocks + num_blocks, per)]
    join = Join(len(chunks), done)
    for o, n in chunks:
        submit(ch, IOType.WRITE, o, n, _ZEROS[:n * bs], join.one)


def clear(ch: IOChannel, method: str, extents: list[tuple[int, int]], done: Done) -> None:
    """Apply a clear method (none / unmap / write_zeroes) to (offset, blocks) extents of
    freed clusters. Unmap on a base without Deallocate is skipped: it only gives space
    back, and a freed cluster is zeroed again before anyone reuses it."""
    if method == "none" or not extents:
        done(0)
        return
    if method == "unmap" and IOType.UNMAP not in ch.bdev.io_types:
        done(0)
        return
    join = Join(len(extents), done)
    for off, n in extents:
        if method == "unmap":
            submit(ch, IOType.UNMAP, off, n, None, join.one)
        else:
            zero(ch, off, n, join.one)


def flush(ch: IOChannel, done: Done) -> None:
    if IOType.FLUSH not in ch.bdev.io_types:
        done(0)  # a base without Flush has no volatile cache to drain
        return
    submit(ch, IOType.FLUSH, 0, ch.bdev.num_blocks, None, done)


async def wait(start: Callable[[Done], None]) -> int:
    """Run a callback-style operation from the control plane and return its status."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def done(status: int) -> None:
        loop.call_soon_threadsafe(_settle, fut, status)

    start(done)
    return await fut


def _settle(fut: asyncio.Future[int], status: int) -> None:
    if not fut.done():
        fut.set_result(status)


async def read(ch: IOChannel, offset_bytes: int, nbytes: int) -> bytes:
    """Bytes of the base (block-aligned range) from the control plane; OSError on failure."""
    bs = ch.bdev.block_size
    buf = memoryview(bytearray(nbytes))
    st = await wait(lambda d: submit(ch, IOType.READ, offset_bytes // bs, nbytes // bs, buf, d))
    if st:
        raise OSError(f"read of {nbytes} bytes at {offset_bytes} failed: NVMe status {st:#x}")
    return bytes(buf)


def failed(status: int) -> int:
    """A child's failure as the parent's status (a base's status passes through)."""
    return status or Status.INTERNAL_ERROR
