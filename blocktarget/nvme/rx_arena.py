"""Receive memory for one reactor's NVMe/TCP connections, read into by the kernel.

Why: with a plain asyncio Protocol the event loop reads each socket into its own buffer
and then copies the bytes into a new ``bytes`` object for ``data_received``; for 128 KiB
writes that copy was one of three user-space passes over every byte (bench/RESULTS.md,
"Why 128K writes stay behind"). As a BufferedProtocol the queue pair instead hands the
loop a slice of this arena to read into, and decodes the bytes where they landed.

The arena is never written twice: each read takes the next unused part, and when less
than ``MIN_ROOM`` is left a fresh arena is allocated; an old one is freed by the garbage
collector once no PDU payload (a view into it) is alive. That makes the received bytes
immutable, as the decoder requires of its input (``Decoder.feed(frozen=True)``). One
arena per reactor, not per connection: an idle connection holds none of it, and a
reactor reads one socket at a time (the loop calls get_buffer, reads, then
buffer_updated for the same connection before anything else runs).
"""

from __future__ import annotations

from .fastlane import new_buffer

SIZE = 256 * 1024  # the event loop's own read size (uvloop reads up to 256 KiB)
MIN_ROOM = 64 * 1024  # below this, a read gets a fresh arena


class RxArena:
    __slots__ = ("mem", "used")

    def __init__(self) -> None:
        self.mem: memoryview | None = None
        self.used = 0

    def room(self) -> memoryview:
        """Where the next read may land."""
        mem = self.mem
        if mem is None or SIZE - self.used < MIN_ROOM:
            mem = self.mem = new_buffer(SIZE)
            self.used = 0
        return mem[self.used :]

    def take(self, n: int) -> memoryview:
        """The ``n`` bytes the read put at the start of ``room()``, now frozen."""
        start = self.used
        self.used = start + n
        return self.mem[start : start + n]  # type: ignore[index]
