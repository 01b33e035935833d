"""JSON-RPC 2.0: the method registry, the protocol core, and its two servers.

The protocol core (`Dispatcher.handle`) takes decoded JSON and returns the response
object, so HTTP, the Unix socket and the config loader share one implementation of
method lookup, parameter checking and error codes. The Unix socket speaks SPDK's framing
(a bare stream of JSON values, no length prefix, no newline requirement) so SPDK's own
`rpc.py` client works against it unmodified.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import inspect
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RpcError,
)
from .params import Schema, validate
from .rpc_guard import (
    DEFAULT_IDLE_TIMEOUT_SEC,
    DEFAULT_REQUEST_TIMEOUT_SEC,
    ConnTable,
    HttpGuard,
)

if TYPE_CHECKING:
    from aiohttp import web

    from .app import Target

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20  # default bound of one request (blocktarget.rpc.max_request_bytes)
MAX_CONNECTIONS = 64  # default bound of concurrent RPC connections / HTTP requests
UNAUTHORIZED = -32001  # server-defined JSON-RPC code: missing or wrong bearer token
SERVER_BUSY = -32002  # server-defined: too many concurrent RPC connections
REQUEST_TIMEOUT = -32003  # server-defined: a request not completed in time (rpc_guard.py)
_SUN_PATH_MAX = 108  # sockaddr_un.sun_path on Linux, the terminating NUL included

Handler = Callable[["Target", dict[str, Any]], Any]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Handler
    schema: Schema
    aliases: tuple[str, ...] = ()
    doc: str = ""
    # Whether a config file may contain this call (state-changing methods replayed at start).
    in_config: bool = True
    # Part of the target's state that save_config groups it under ("bdev", "nvmf", ...).
    section: str = ""


@dataclass
class MethodRegistry:
    methods: dict[str, Method] = field(default_factory=dict)
    by_name: dict[str, Method] = field(default_factory=dict)

    def register(
        self,
        name: str,
        schema: Schema | None = None,
        *,
        aliases: tuple[str, ...] = (),
        in_config: bool = True,
        section: str = "",
    ) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            m = Method(name, fn, schema or Schema(), aliases, inspect.getdoc(fn) or "",
                       in_config, section)
            for n in (name, *aliases):
                if n in self.by_name:
                    raise ValueError(f"RPC method {n} registered twice")
                self.by_name[n] = m
            self.methods[name] = m
            return fn

        return deco

    def get(self, name: str) -> Method | None:
        return self.by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self.by_name)


REGISTRY = MethodRegistry()
method = REGISTRY.register


def load_methods() -> MethodRegistry:
    """Import every module in blocktarget/rpc_methods so its methods register.

    `bdev` goes first: it registers the SPDK-named create/delete methods of every bdev
    module, which a module-specific file may then extend with its own methods.
    """
    import importlib
    import pkgutil

    from . import rpc_methods

    names = sorted(m.name for m in pkgutil.iter_modules(rpc_methods.__path__)
                   if not m.name.startswith("_"))
    for name in ["bdev"] + [n for n in names if n != "bdev"]:
        importlib.import_module(f"{rpc_methods.__name__}.{name}")
    return REGISTRY


async def call_method(target: Target, name: str, params: Any) -> Any:
    """Run one method by name with raw params; raises RpcError on any user error."""
    m = REGISTRY.get(name)
    if m is None:
        raise RpcError(f"Method not found: {name}", METHOD_NOT_FOUND)
    checked = validate(m.schema, params)
    result = m.fn(target, checked)
    if inspect.isawaitable(result):
        result = await result
    return result


def _error(id_: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id_, "error": err}


class Dispatcher:
    """Turns decoded JSON-RPC requests (single or batch) into response objects."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.calls = 0
        self.errors = 0

    async def handle(self, request: Any) -> Any:
        """Return a response, a list of responses, or None (notifications only)."""
        if isinstance(request, list):
            if not request:
                return _error(None, INVALID_REQUEST, "Invalid Request: empty batch")
            responses = []
            for item in request:
                r = await self._handle_one(item)
                if r is not None:
                    responses.append(r)
            return responses or None
        return await self._handle_one(request)

    async def _handle_one(self, req: Any) -> dict[str, Any] | None:
        self.calls += 1
        if not isinstance(req, dict):
            self.errors += 1
            return _error(None, INVALID_REQUEST, "Invalid Request: not an object")
        id_ = req.get("id")
        is_notification = "id" not in req
        if (
            req.get("jsonrpc") != "2.0"
            or not isinstance(req.get("method"), str)
            or ("params" in req and not isinstance(req["params"], dict | list | type(None)))
            or not (id_ is None or isinstance(id_, str | int | float))
            or isinstance(id_, bool)
        ):
            self.errors += 1
            valid_id = isinstance(id_, str | int) and not isinstance(id_, bool)
            return _error(id_ if valid_id else None, INVALID_REQUEST, "Invalid Request")
        params = req.get("params")
        if isinstance(params, list):
            self.errors += 1
            return None if is_notification else _error(
                id_, -32602, "Invalid params: positional params are not supported")
        try:
            result = await call_method(self.target, req["method"], params)
        except RpcError as exc:
            self.errors += 1
            return None if is_notification else _error(id_, exc.code, exc.message, exc.data)
        except Exception as exc:  # a bug, not a user error: log it, report -32603
            self.errors += 1
            log.exception("RPC %s failed", req["method"])
            return None if is_notification else _error(
                id_, INTERNAL_ERROR, f"Internal error: {type(exc).__name__}: {exc}")
        if is_notification:
            return None
        return {"jsonrpc": "2.0", "id": id_, "result": result}


# ---------------------------------------------------------------------------
# Unix socket server (SPDK framing)


class StreamParseError(ValueError):
    """Malformed input; `values` are the complete values decoded before it in the same
    chunk, which the server must still answer (a client may have pipelined them)."""

    def __init__(self, message: str, values: list[Any]) -> None:
        super().__init__(message)
        self.values = values


class _StreamDecoder:
    """Splits a byte stream into JSON values (objects or arrays, as JSON-RPC sends).

    A value ends where its brackets balance outside strings; scanning for that keeps
    "incomplete, wait for more" apart from "malformed" without re-parsing the buffer.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self._pos = 0  # scan position inside the current value
        self._depth = 0
        self._in_str = False
        self._escape = False

    def __len__(self) -> int:
        return len(self.buf)

    def feed(self, data: bytes) -> list[Any]:
        self.buf += data
        out: list[Any] = []
        buf = self.buf
        i = self._pos
        n = len(buf)
        while i < n:
            c = buf[i]
            if self._depth == 0:
                if c in b" \t\r\n":
                    i += 1
                    continue
                if c not in b"{[":
                    raise StreamParseError("Parse error: expected a JSON object or array", out)
                del buf[:i]
                n = len(buf)
                i = 0
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    try:
                        out.append(json.loads(bytes(buf[: i + 1])))
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise StreamParseError(f"Parse error: {exc}", out) from None
                    del buf[: i + 1]
                    n = len(buf)
                    i = 0
                    continue
            i += 1
        if self._depth == 0:
            del buf[:i]
            i = 0
        self._pos = i
        return out


class UnixRpcServer:
    """SPDK-framed JSON-RPC on a 0600 Unix socket. Bounded: one request (one JSON value)
    may not exceed ``max_request_bytes`` and at most ``max_connections`` clients are
    served at once; past either bound the client gets a JSON-RPC error and is closed.
    A request must arrive whole, and its response be taken, within ``request_timeout``;
    idle clients give way to new ones when the slots are full (rpc_guard.py says why)."""

    def __init__(self, dispatcher: Dispatcher, path: str, *,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SEC,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SEC) -> None:
        self.dispatcher = dispatcher
        self.path = path
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.table = ConnTable(max_connections)
        self.timed_out = 0  # clients closed mid-request
        self.server: asyncio.AbstractServer | None = None

    @property
    def active(self) -> int:
        return len(self.table)

    @property
    def refused(self) -> int:
        return self.table.refused

    async def check_path(self) -> None:
        """Raise OSError unless the socket path can be taken: a non-socket file there is
        never replaced, nor a socket another process still serves (EADDRINUSE). A stale
        socket (its process killed) may stay: start() replaces it atomically."""
        if os.path.exists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            if await _socket_alive(self.path):
                raise OSError(
                    errno.EADDRINUSE, f"RPC socket {self.path} is in use by another running target"
                )

    async def start(self) -> None:
        """Serve on ``path``. The socket is bound and listening under a temporary name in
        the same directory and then renamed into place, so the path never exists without
        accepting: a client that waits for the file and connects at once is never
        refused (the target creates it last, as its readiness signal; app.py)."""
        await self.check_path()
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
            tmp = os.path.join(directory, f".bt{os.getpid()}")  # as short as it gets
        if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
            # no room for a temporary name: bind in place; the file then exists for the
            # moment between bind() and listen() without accepting
            tmp = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if tmp != self.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)  # left by a killed process with our pid
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # stale (check_path said so)
            old = os.umask(0o177)  # created 0600: the socket is full control of the target
            try:
                sock.bind(tmp)
            finally:
                os.umask(old)
            os.chmod(tmp, 0o600)
            sock.listen(128)
            sock.setblocking(False)
            self.server = await asyncio.start_unix_server(self._client, sock=sock)
        except BaseException:
            sock.close()
            if tmp != self.path:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        if tmp != self.path:
            try:
                os.rename(tmp, self.path)  # atomic; replaces a stale socket
            except BaseException:
                self.server.close()
                self.server = None
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except TimeoutError:
                pass
            self.server = None
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        admitted, victim = self.table.admit(writer, loop.time())
        if victim is not None:
            # closed without a word: anything sent now would be read by that client as
            # the answer to its next request
            log.info("RPC: closing the longest idle client to admit a new one")
            victim.close()
        if not admitted:
            writer.write(json.dumps(_error(
                None, SERVER_BUSY, f"too many RPC connections (limit {self.max_connections}); "
                "try again later")).encode())
            try:
                await writer.drain()
            except ConnectionError:
                pass
            writer.close()
            return
        dec = _StreamDecoder()
        deadline: float | None = None  # of the request begun (its first byte + timeout)
        idle_since = loop.time()
        try:
            while True:
                now = loop.time()
                if len(dec) and self.request_timeout > 0:
                    if deadline is None:
                        deadline = now + self.request_timeout
                    wait: float | None = deadline - now
                else:
                    deadline = None
                    wait = (idle_since + self.idle_timeout - now) if self.idle_timeout > 0 \
                        else None
                try:
                    data = await asyncio.wait_for(reader.read(65536), wait)
                except TimeoutError:
                    if len(dec):
                        self.timed_out += 1
                        log.warning("RPC: request not complete within %g s: closing the "
                                    "client", self.request_timeout)
                        writer.write(json.dumps(_error(
                            None, REQUEST_TIMEOUT, "request not complete within "
                            f"{self.request_timeout:g} s")).encode())
                    break  # (idle past idle_timeout: closed quietly)
                if not data:
                    break
                if len(dec) + len(data) > self.max_request_bytes:
                    # the buffer holds only the unfinished value: that one is too big
                    writer.write(json.dumps(_error(
                        None, INVALID_REQUEST,
                        f"request too large (limit {self.max_request_bytes} bytes)")).encode())
                    break
                parse_error: StreamParseError | None = None
                try:
                    requests = dec.feed(data)
                except StreamParseError as exc:
                    parse_error, requests = exc, exc.values
                if requests:
                    self.table.busy(writer)
                for req in requests:
                    resp = await self.dispatcher.handle(req)
                    if resp is not None:
                        writer.write(json.dumps(resp).encode())
                        await self._drain(writer)
                if parse_error is not None:
                    writer.write(json.dumps(_error(None, PARSE_ERROR, str(parse_error))).encode())
                    break
                if requests:
                    deadline = None  # any rest buffered is the next request
                    idle_since = loop.time()
                    if not len(dec):
                        self.table.idle(writer, idle_since)
                elif len(dec):
                    self.table.busy(writer)  # a request begun: not evictable
            await self._drain(writer)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self.table.release(writer)
            writer.close()

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """A client that does not read its responses holds a slot: bounded like a
        request (TimeoutError ends the client)."""
        if self.request_timeout > 0:
            await asyncio.wait_for(writer.drain(), self.request_timeout)
        else:
            await writer.drain()


async def _socket_alive(path: str) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_unix_connection(path), 1)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


# ---------------------------------------------------------------------------
# HTTP (aiohttp)


def http_handler(dispatcher: Dispatcher, max_request_bytes: int = MAX_REQUEST_BYTES,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SEC,
                 ) -> Callable[[web.Request], Awaitable[web.Response]]:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        try:
            # a body sent slowly holds a connection like slow headers do: same bound
            body = await asyncio.wait_for(request.read(), request_timeout or None)
        except TimeoutError:
            resp = web.json_response(_error(
                None, REQUEST_TIMEOUT,
                f"request not complete within {request_timeout:g} s"), status=408)
            resp.force_close()
            return resp
        except web.HTTPRequestEntityTooLarge:
            resp = web.json_response(_error(
                None, INVALID_REQUEST,
                f"request too large (limit {max_request_bytes} bytes)"), status=413)
            resp.force_close()  # the rest of the body is never read
            return resp
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return web.json_response(_error(None, PARSE_ERROR, f"Parse error: {exc}"))
        resp = await dispatcher.handle(req)
        if resp is None:
            return web.Response(status=204)
        return web.json_response(resp)

    return handle


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``token``, compared in constant time (the
    time taken must not tell an attacker how many leading characters were right)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def http_guard(max_connections: int = MAX_CONNECTIONS,
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SEC) -> HttpGuard:
    """The connection cap and header timeout of the HTTP server (rpc_guard.py)."""
    return HttpGuard(
        max_connections, request_timeout,
        json.dumps(_error(None, SERVER_BUSY, f"too many RPC connections (limit "
                          f"{max_connections}); try again later")).encode(),
        json.dumps(_error(None, REQUEST_TIMEOUT, "request headers not complete within "
                          f"{request_timeout:g} s")).encode())


def build_http_app(dispatcher: Dispatcher, *, token: str | None = None,
                   max_request_bytes: int = MAX_REQUEST_BYTES,
                   max_connections: int = MAX_CONNECTIONS,
                   metrics: Callable[[web.Request], Awaitable[Any]] | None = None,
                   guard: HttpGuard | None = None,
                   request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SEC,
                   ) -> web.Application:
    """The aiohttp application: JSON-RPC on POST / and /rpc, Prometheus on GET /metrics.

    One middleware guards every route: first the bearer token (when configured,
    wherever the server listens; 401 with a JSON-RPC error body), then a bound on
    requests in progress (503). Bodies over ``max_request_bytes`` get 413 and the
    connection is closed. With ``guard`` (served through `rpc_guard.guarded_site`) it
    also tells the guard when a request's headers are in, which stops their timer."""
    from aiohttp import web

    in_flight = 0

    def refuse(status: int, code: int, message: str) -> web.Response:
        resp = web.json_response(_error(None, code, message), status=status)
        resp.force_close()
        return resp

    @web.middleware
    async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
        if guard is None:
            return await checked(request, handler)
        guard.started(request.protocol)
        try:
            return await checked(request, handler)
        finally:
            guard.finished(request.protocol)

    async def checked(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal in_flight
        if token is not None and not bearer_ok(request.headers.get("Authorization"), token):
            resp = refuse(401, UNAUTHORIZED,
                          "Unauthorized: missing or wrong bearer token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="blocktarget"'
            return resp
        if in_flight >= max_connections:
            return refuse(503, SERVER_BUSY,
                          f"too many RPC requests in progress (limit {max_connections})")
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    app = web.Application(client_max_size=max_request_bytes, middlewares=[gate])
    rpc = http_handler(dispatcher, max_request_bytes, request_timeout)
    app.router.add_post("/", rpc)
    app.router.add_post("/rpc", rpc)
    if metrics is not None:
        app.router.add_get("/metrics", metrics)
    return app


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> Any:
    """TLS for the HTTP server; with ``client_ca`` every client must present a
    certificate signed by it (that is then the authentication, instead of a token)."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def parse_http_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9009', '[::1]:9009' or ':9009' -> (host, port)."""
    text = text.strip()
    if text.startswith("http://"):
        text = text[len("http://") :].rstrip("/")
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad HTTP address {text!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)
