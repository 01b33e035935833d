"""TLS between a socket's asyncio transport and an NVMe/TCP protocol (either side).

`TlsProtocol` is the socket's protocol: it runs the handshake on a `tls.TlsSession`
and, once it is done, creates the inner protocol (the target's queue pair, the
initiator's) and hands it a `TlsTransport` that encrypts what it writes; what arrives
is decrypted and given to the inner protocol's `data_received`. The protocol core above
never sees a TLS byte, and never sees the socket either: `get_extra_info("socket")` is
None, so nothing lends the fd of a TLS connection to the C poller (which would read
ciphertext as PDUs); the C lane still serves its commands, from decrypted buffers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .tls import TlsError, TlsSession

log = logging.getLogger(__name__)

ICREQ_TYPE = 0x00  # the first byte of a plain NVMe/TCP connection (ICReq PDU type)
TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record


class TlsTransport:
    """What the inner protocol writes to: plaintext in, records out on the socket."""

    def __init__(self, proto: TlsProtocol) -> None:
        self._p = proto

    def write(self, data: bytes | memoryview) -> None:
        self.writelines([data])

    def writelines(self, data: Any) -> None:
        p = self._p
        raw = p.raw
        if raw is None or raw.is_closing():
            return
        try:
            p.session.send(list(data))
        except TlsError as exc:
            p.fail("record", str(exc))
            return
        out = p.session.outgoing()
        if out:
            raw.write(out)

    def get_write_buffer_size(self) -> int:
        # OpenSSL copied the plaintext into records at once: no caller's buffer is held
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._p.raw is not None:
            self._p.raw.set_write_buffer_limits(high=high, low=low)

    def pause_reading(self) -> None:
        if self._p.raw is not None:
            self._p.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._p.raw is not None:
            self._p.raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self._p.raw
        return raw is not None and raw.is_reading()

    def is_closing(self) -> bool:
        raw = self._p.raw
        return raw is None or raw.is_closing()

    def close(self) -> None:
        p = self._p
        if p.raw is None or p.raw.is_closing():
            return
        p.session.close()
        out = p.session.outgoing()
        if out:
            p.raw.write(out)
        p.raw.close()

    def abort(self) -> None:
        if self._p.raw is not None:
            self._p.raw.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return default  # ciphertext: not for anyone who reads PDUs from the fd
        if name == "tls":
            return self._p.session
        raw = self._p.raw
        return raw.get_extra_info(name, default) if raw is not None else default


class TlsProtocol(asyncio.Protocol):
    """The socket's protocol for one TLS connection (see the module doc).

    With ``kernel_tls`` (the target's default), a server session whose kernel offers kTLS
    hands the record layer to it right after the handshake (ktls.py): the inner protocol
    then gets the socket's own transport, and this object drops out of the connection.
    When the kernel cannot (no kTLS, or records already buffered here), the connection
    stays in user space; ``session.ktls_why`` says why.

    ``on_failure(kind, message)`` hears of a connection that ends before or outside a
    clean TLS life: kind "plain" (an NVMe/TCP ICReq where a ClientHello was due),
    "refused" (the PSK identity is unknown or not allowed: the session's refusal),
    "handshake" (any other handshake failure: a wrong key fails the binder check),
    "record" (a record that does not authenticate), "closed" (closed mid-handshake),
    "timeout" (no complete handshake within ``handshake_timeout`` seconds: a peer that
    connects and stalls must not hold a connection slot, as the queue pair's own stall
    watch only starts once the handshake is done)."""

    def __init__(self, session: TlsSession, inner_factory: Callable[[], asyncio.BaseProtocol],
                 on_failure: Callable[[str, str], None] | None = None,
                 on_established: Callable[[TlsSession], None] | None = None,
                 kernel_tls: bool = False, handshake_timeout: float = 0.0) -> None:
        self.session = session
        self.kernel_tls = kernel_tls
        self.handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self.inner_factory = inner_factory
        self.inner: Any = None
        self.raw: Any = None
        self.on_failure = on_failure
        self.on_established = on_established
        self._first = True
        self._failed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        out = self.session.outgoing()  # a client's ClientHello
        if out:
            transport.write(out)  # type: ignore[attr-defined]
        if self.handshake_timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(
                self.handshake_timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.inner is None and not self._failed:
            self.fail("timeout", f"no TLS handshake within {self.handshake_timeout:g} s")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def fail(self, kind: str, message: str) -> None:
        if self._failed:
            return
        self._failed = True
        self._stop_timer()
        if self.on_failure is not None:
            self.on_failure(kind, message)
        raw = self.raw
        if raw is not None and not raw.is_closing():
            alert = self.session.outgoing()
            if alert:
                raw.write(alert)
            raw.close()

    def data_received(self, data: bytes) -> None:
        if self._failed:
            return
        if self._first and data:
            self._first = False
            if self.session.server and data[0] == ICREQ_TYPE:
                self.fail("plain", "plain NVMe/TCP connection (ICReq) on a secure listener")
                return
        try:
            plain = self.session.receive(data)
        except TlsError as exc:
            established = self.session.established
            kind = "record" if established else ("refused" if self.session.refusal
                                                 else "handshake")
            self.fail(kind, str(exc))
            return
        out = self.session.outgoing()
        if out and self.raw is not None:
            self.raw.write(out)
        if self.inner is None:
            if not self.session.established:
                return
            self._stop_timer()
            if self.kernel_tls and self._to_kernel(plain):
                return
            self.session._secrets.clear()  # user space from here: nothing needs them
            self.inner = self.inner_factory()
            self.inner.tls_session = self.session  # (what Connect checks the NQNs against)
            if self.on_established is not None:
                self.on_established(self.session)
            self.inner.connection_made(TlsTransport(self))
        if plain:
            self.inner.data_received(plain)

    def _to_kernel(self, plain: bytes) -> bool:
        """Try the kTLS hand-off; True when the socket's transport now serves the inner
        protocol directly (this object is out of the connection). ``plain``: what came
        decrypted with the handshake, handed up after the switch (its answers must be
        the kernel's first records)."""
        from .ktls import KtlsUnavailable, install

        raw = self.raw
        session = self.session
        try:
            sock = raw.get_extra_info("socket") if raw is not None else None
            if sock is None or raw.get_write_buffer_size():
                raise KtlsUnavailable("handshake output still queued")
            h, tx, rx, rx_seq = session.kernel_handoff()
            install(sock, h, tx, rx, rx_seq)
        except KtlsUnavailable as exc:
            session.ktls_why = str(exc)
            return False
        except OSError as exc:  # the ULP is on but the keys were refused: unusable socket
            self.fail("record", str(exc))
            return True
        session.record_layer = "kernel"
        inner = self.inner_factory()
        inner.tls_session = session
        if self.on_established is not None:
            self.on_established(session)
        self._failed = True  # (nothing more reaches this object)
        raw.set_protocol(inner)
        inner.connection_made(raw)
        if plain:
            inner.data_received(plain)
        return True

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.inner is not None:
            self.inner.connection_lost(exc)
        elif not self._failed:
            self._failed = True
            if self.on_failure is not None:
                self.on_failure("closed", "connection closed during the TLS handshake"
                                + (f": {exc}" if exc else ""))
        self.raw = None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
