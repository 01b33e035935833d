"""Connection slots and timeouts of the control plane (Unix socket and HTTP JSON-RPC).

Both servers bound their clients to ``rpc.max_connections``. A bound alone is a lock:
clients that connect and then stall would hold every slot. So:

- a request begun must be complete within ``request_timeout_sec`` of its first byte
  (a slowloris client trickling bytes does not extend it), and its response must be
  taken within the same time; then the client is closed;
- a client idle between requests may stay (SPDK's ``rpc.py --server``, as SPDK's test
  scripts run it, holds one connection for a whole session), unless
  ``idle_timeout_sec`` is set; but when every slot is taken, the client idle the
  longest gives way to the new one (`ConnTable`). Idle clients cost a file descriptor,
  never anyone's access; a slow one mid-request is bounded by the request timeout.

aiohttp has no timeout for slowly sent request headers, so `GuardedHttpProtocol` wraps
each of its connections: it starts a timer at the first byte of a request and the
server's middleware stops it once the headers are parsed (`HttpGuard.started`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_SEC = 30
DEFAULT_IDLE_TIMEOUT_SEC = 0  # 0: idle clients stay until their slot is needed
EVICT_IDLE_AFTER_S = 1.0  # a client between two quick calls is not "idle" yet


class ConnTable:
    """Slots of one server's clients, with the idle time of each (sans-I/O).

    ``admit`` returns the client to close to make room (the longest idle one, idle for
    at least ``evict_after`` seconds), or refuses when every client is busy."""

    def __init__(self, limit: int, evict_after: float = EVICT_IDLE_AFTER_S) -> None:
        self.limit = limit
        self.evict_after = evict_after
        self.idle_since: dict[Any, float | None] = {}  # None: a request in progress
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.idle_since)

    def admit(self, key: Any, now: float) -> tuple[bool, Any]:
        """(admitted, client to close or None)."""
        victim = None
        if len(self.idle_since) >= self.limit:
            oldest = None
            for k, since in self.idle_since.items():
                if since is not None and now - since >= self.evict_after and (
                        oldest is None or since < oldest):
                    oldest, victim = since, k
            if victim is None:
                self.refused += 1
                return False, None
            del self.idle_since[victim]
            self.evicted += 1
        self.idle_since[key] = now
        return True, victim

    def busy(self, key: Any) -> None:
        if key in self.idle_since:
            self.idle_since[key] = None

    def idle(self, key: Any, now: float) -> None:
        if key in self.idle_since:
            self.idle_since[key] = now

    def release(self, key: Any) -> None:
        self.idle_since.pop(key, None)


def _http_error(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class HttpGuard:
    """Per-server state of the HTTP guard: the slot table, the timeout, and which
    wrapper holds which aiohttp protocol (so the middleware can find it)."""

    def __init__(self, max_connections: int, request_timeout: float,
                 busy_body: bytes, timeout_body: bytes) -> None:
        self.table = ConnTable(max_connections)
        self.request_timeout = request_timeout
        self.busy_response = _http_error("503 Service Unavailable", busy_body)
        self.timeout_response = _http_error("408 Request Timeout", timeout_body)
        self.by_inner: dict[Any, GuardedHttpProtocol] = {}
        self.header_timeouts = 0

    def factory(self, inner_factory: Callable[[], Any]) -> Callable[[], GuardedHttpProtocol]:
        return lambda: GuardedHttpProtocol(inner_factory(), self)

    def started(self, inner: Any) -> None:
        """Middleware: a request's headers are in; stop its header timer."""
        w = self.by_inner.get(inner)
        if w is not None:
            w.request_started()

    def finished(self, inner: Any) -> None:
        w = self.by_inner.get(inner)
        if w is not None:
            w.request_finished()


class GuardedHttpProtocol(asyncio.Protocol):
    """Wraps one aiohttp connection: admission against the slot table, and the timer
    on request headers. Everything else is passed through unchanged."""

    def __init__(self, inner: Any, guard: HttpGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.in_request = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        ok, victim = self.guard.table.admit(self, loop.time())
        if victim is not None:
            log.info("HTTP RPC: closing the longest idle connection to admit a new one")
            victim.evict()
        if not ok:
            transport.write(self.guard.busy_response)  # type: ignore[attr-defined]
            transport.close()
            return
        self.admitted = True
        self.guard.by_inner[self.inner] = self
        self.inner.connection_made(transport)

    def evict(self) -> None:
        self.guard.table.release(self)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if not self.in_request and self.timer is None and self.guard.request_timeout > 0:
            self.guard.table.busy(self)
            self.timer = asyncio.get_running_loop().call_later(
                self.guard.request_timeout, self._timed_out)
        self.inner.data_received(data)

    def _timed_out(self) -> None:
        self.timer = None
        if self.in_request or self.transport is None or self.transport.is_closing():
            return
        self.guard.header_timeouts += 1
        log.warning("HTTP RPC: request headers not complete within %g s: closing",
                    self.guard.request_timeout)
        self.transport.write(self.guard.timeout_response)
        self.transport.close()

    def request_started(self) -> None:
        self.in_request = True
        self.guard.table.busy(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def request_finished(self) -> None:
        # a pipelined request whose headers had partly arrived meanwhile is left to
        # aiohttp's keep-alive timer (it closes a connection with no complete request)
        self.in_request = False
        self.guard.table.idle(self, asyncio.get_running_loop().time())

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.guard.table.release(self)
        if self.admitted:
            self.guard.by_inner.pop(self.inner, None)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()


def guarded_site(runner: Any, guard: HttpGuard, host: str, port: int, *,
                 ssl_context: Any = None) -> Any:
    """An aiohttp TCPSite whose connections go through ``guard``."""
    from aiohttp import web

    class GuardedTCPSite(web.TCPSite):
        async def start(self) -> None:
            await web.BaseSite.start(self)  # registers the site with the runner
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                guard.factory(runner.server), host, port, ssl=ssl_context,
                reuse_address=True)

    return GuardedTCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
