"""One metadata change at a time, across reactors and the control plane.

A store's metadata is shared by every reactor (a first write to a thin cluster allocates
on the reactor that received it) and by the control plane (create, resize, delete).
Each change is a read-copy-modify of the whole metadata followed by a slot write and a
flush, so two changes must not overlap: the `Turnstile` admits one holder, queues the
rest in arrival order, and starts the next holder *on its own thread* (a reactor's I/O
channels may only be touched by that reactor). Nothing blocks: a holder's work is a
chain of I/O callbacks that ends by calling `leave()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..reactor import Reactor


def run_on(reactor: Reactor | None, fn: Callable[..., Any], *args: Any) -> None:
    """Call fn on the reactor's thread: now when already there (or without a reactor,
    as in unit tests where every channel completes synchronously), else soon."""
    loop = reactor.loop if reactor is not None else None
    if loop is None or reactor is None or reactor.on_reactor():
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)


class Turnstile:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._queue: deque[Callable[[], None]] = deque()

    def enter(self, start: Callable[[], None]) -> None:
        """Run `start` (from whichever thread admits it: `start` moves to its own) when
        the turnstile is free; its work must end with `leave()`."""
        with self._lock:
            if self._busy:
                self._queue.append(start)
                return
            self._busy = True
        start()

    def leave(self) -> None:
        with self._lock:
            if not self._queue:
                self._busy = False
                return
            nxt = self._queue.popleft()
        nxt()

    @property
    def busy(self) -> bool:
        return self._busy

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold the turnstile from the control plane's event loop for the block's
        duration. A caller cancelled while queued (an RPC timeout) leaves as soon as it
        would have been admitted, so the queue never stalls."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.enter(lambda: loop.call_soon_threadsafe(self._admit, fut))
        await fut
        try:
            yield
        finally:
            self.leave()

    def _admit(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            self.leave()
        else:
            fut.set_result(None)
