"""FUSE_INTERRUPT rules of the session, one request at a time, with a device we control.

The kernel side is covered by tests/integration/test_fuse_export.py (real mount, real
signals); here the session gets requests as bytes and answers into a socket pair, so
each race (interrupt before the command is sent, after, for an answered request) is
set up exactly.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest

from blocktarget.fuse import proto
from blocktarget.fuse.device import BlockDevice
from blocktarget.fuse.mount import Mount
from blocktarget.fuse.session import BlockFile, FuseSession

INO = 2


class GatedDevice(BlockDevice):
    """Reads and writes wait until ``gate`` is set; ``sent`` records what reached us."""

    def __init__(self) -> None:
        self.block_size, self.num_blocks, self.max_blocks = 4096, 16, 16
        self.gate = asyncio.Event()
        self.sent: list[tuple[str, int]] = []
        self.finished: list[tuple[str, int]] = []

    async def _op(self, kind: str, lba: int) -> None:
        self.sent.append((kind, lba))
        await self.gate.wait()
        self.finished.append((kind, lba))

    async def read(self, lba: int, buf: memoryview) -> None:
        await self._op("read", lba)

    async def write(self, lba: int, data: memoryview) -> None:
        await self._op("write", lba)

    async def flush(self) -> None:
        await self._op("flush", 0)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _req(opcode: int, unique: int, body: bytes) -> proto.Request:
    head = proto.IN_HEADER.pack(proto.IN_HEADER.size + len(body), opcode, unique, INO, 0, 0,
                                1, 0, 0)
    return proto.parse_request(memoryview(head + body))


def _read(unique: int, off: int = 0) -> proto.Request:
    return _req(proto.Op.READ, unique, proto.READ_IN.pack(0, off, 4096, 0, 0, 0, 0))


def _write(unique: int, off: int = 0) -> proto.Request:
    body = proto.WRITE_IN.pack(0, off, 4096, 0, 0, 0, 0) + b"w" * 4096
    return _req(proto.Op.WRITE, unique, body)


def _interrupt(unique: int) -> proto.Request:
    return _req(proto.Op.INTERRUPT, unique | (1 << 63), proto.INTERRUPT_IN.pack(unique))


def _replies(sock: socket.socket) -> dict[int, int]:
    """unique -> errno (0 = success) of every answer written so far."""
    out = {}
    while True:
        try:
            msg = sock.recv(1 << 16)
        except BlockingIOError:
            return out
        _len, err, unique = proto.OUT_HEADER.unpack_from(msg)
        out[unique] = -err


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def session(pair: tuple[socket.socket, socket.socket]) -> tuple[FuseSession, GatedDevice]:
    dev = GatedDevice()
    s = FuseSession(Mount(pair[0].fileno(), "/test", False), [BlockFile("nvme0n1", dev, INO)])
    return s, dev


async def test_read_in_flight_is_answered_eintr_at_once(session, pair) -> None:
    s, dev = session
    s._dispatch(_read(10))
    await _settle()
    assert dev.sent == [("read", 0)]
    s._dispatch(_interrupt(10))
    await _settle()
    assert _replies(pair[1]) == {10: errno.EINTR} and s.interrupted == 1
    dev.gate.set()  # the command still completes; its data goes nowhere
    await s.drain()
    assert _replies(pair[1]) == {}


async def test_write_already_sent_runs_to_completion(session, pair) -> None:
    s, dev = session
    s._dispatch(_write(20))
    await _settle()
    assert dev.sent == [("write", 0)]
    s._dispatch(_interrupt(20))
    await _settle()
    assert _replies(pair[1]) == {}  # still serving it
    dev.gate.set()
    await s.drain()
    assert _replies(pair[1]) == {20: 0} and s.interrupted == 0


async def test_write_waiting_for_its_block_is_answered_eintr_and_never_sent(session,
                                                                              pair) -> None:
    s, dev = session
    s._dispatch(_write(30))
    s._dispatch(_write(31))  # same block: waits for 30's range lock
    await _settle()
    assert dev.sent == [("write", 0)]
    s._dispatch(_interrupt(31))
    await _settle()
    assert _replies(pair[1]) == {31: errno.EINTR}
    dev.gate.set()
    await s.drain()
    assert _replies(pair[1]) == {30: 0}
    assert dev.sent == [("write", 0)]  # 31 never reached the device


async def test_interrupt_for_an_answered_request_is_dropped(session, pair) -> None:
    s, dev = session
    dev.gate.set()
    s._dispatch(_read(40))
    await s.drain()
    assert _replies(pair[1]) == {40: 0}
    s._dispatch(_interrupt(40))
    s._dispatch(_interrupt(12345))  # never seen at all
    await _settle()
    assert _replies(pair[1]) == {} and s.interrupted == 0


def test_interrupt_in_layout() -> None:
    # include/uapi/linux/fuse.h: struct fuse_interrupt_in { uint64_t unique; }
    assert proto.INTERRUPT_IN.size == 8 and proto.Op.INTERRUPT == 36
