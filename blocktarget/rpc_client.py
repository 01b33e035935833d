"""A small synchronous JSON-RPC client for the CLI and tests (Unix socket or HTTP)."""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any

from .rpc import _StreamDecoder

_ids = itertools.count(1)


class RpcCallError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


class RpcClient:
    """Talks to a target over its Unix socket (default) or, given a URL, over HTTP."""

    def __init__(self, unix: str | None = None, http: str | None = None,
                 timeout: float = 60.0, *, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        if not unix and not http:
            raise ValueError("need a Unix socket path or an HTTP URL")
        self.unix = unix
        self.http = http if not http or http.startswith("http") else f"http://{http}"
        self.timeout = timeout
        self.token = token  # HTTP only: the Unix socket's file mode is its access control
        self._ssl: ssl.SSLContext | None = None
        if self.http and self.http.startswith("https:"):
            self._ssl = ssl.create_default_context(cafile=tls_ca)
            if tls_cert:
                self._ssl.load_cert_chain(tls_cert, tls_key)
        self._sock: socket.socket | None = None
        self._dec = _StreamDecoder()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, request: Any) -> Any:
        """Send any JSON value, return the decoded response (None for notifications)."""
        body = json.dumps(request).encode()
        if self.http:
            headers = {"Content-Type": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            req = urllib.request.Request(self.http, data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout,
                                            context=self._ssl) as resp:
                    data = resp.read()
            except urllib.error.HTTPError as exc:
                data = exc.read()
            return json.loads(data) if data else None
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(self.timeout)
            self._sock.connect(self.unix)  # type: ignore[arg-type]
        self._sock.sendall(body)
        if isinstance(request, dict) and "id" not in request:
            return None
        while True:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("target closed the RPC connection")
            values = self._dec.feed(chunk)
            if values:
                return values[0]

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(_ids)}
        if params:
            req["params"] = params
        resp = self.raw(req)
        if "error" in resp:
            e = resp["error"]
            raise RpcCallError(e.get("code", 0), e.get("message", ""), e.get("data"))
        return resp["result"]
