"""TLS 1.3 with external pre-shared keys through OpenSSL (blocktarget._tls), sans I/O.

A `TlsSession` is one connection's TLS state between two memory BIOs: ciphertext in
(`receive`), plaintext out, plaintext in (`send`), ciphertext out (`outgoing`). It never
touches a socket, so the NVMe/TCP protocol core above it keeps receiving plain PDUs and
the same object serves the target's listener and the initiator, and unit tests drive
both ends against each other in memory.

Only TLS 1.3, only the two cipher suites of the NVMe/TCP secure channel
(TLS_AES_128_GCM_SHA256 and TLS_AES_256_GCM_SHA384), no session tickets (each connection
handshakes with its PSK: NVMe/TCP has no resumption), no certificates: a client that
offers no PSK, or one the resolver does not know, fails the handshake.

The record layer runs here, in user space, unless the target hands it to kernel TLS
right after the handshake (ktls.py, with the traffic secrets OpenSSL's key-log callback
gives this session): `ktls_available()` says whether the running kernel offers it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .nvme.tls_keys import CIPHERS

log = logging.getLogger(__name__)

try:
    from ._tls import ffi, lib  # type: ignore[import-not-found]

    AVAILABLE = True
    WHY_NOT = ""
except ImportError as _exc:  # built without libssl-dev
    ffi = lib = None
    AVAILABLE = False
    WHY_NOT = (f"the OpenSSL binding blocktarget._tls is not built ({_exc}); install "
               "libssl-dev and reinstall (make)")

SUITES = ":".join(CIPHERS[h] for h in sorted(CIPHERS))
_CIPHER_ID = {1: b"\x13\x01", 2: b"\x13\x02"}  # IANA TLS 1.3 suite numbers
_CHUNK = 64 * 1024  # plaintext per SSL_read call (a record is at most 16 KiB)

# identity bytes -> (TLS PSK, hash id 1|2), or None when unknown; may raise TlsRefused
Resolver = Callable[[bytes], "tuple[bytes, int] | None"]


class TlsError(Exception):
    """The handshake or a record failed; the message names why, never a key."""


class TlsRefused(Exception):
    """Raised by a resolver: the identity is known but cannot be served (the reason)."""


def require() -> None:
    if not AVAILABLE:
        raise TlsError(WHY_NOT)


def ktls_available() -> bool:
    """Whether this kernel offers kernel TLS (the "tls" TCP upper-layer protocol)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            return "tls" in f.read().split()
    except OSError:
        return False


def _errors() -> str:
    out = []
    buf = ffi.new("char[256]")
    while True:
        e = lib.ERR_get_error()
        if not e:
            break
        lib.ERR_error_string_n(e, buf, 256)
        out.append(ffi.string(buf).decode(errors="replace").split(":", 5)[-1])
    return "; ".join(out) or "no detail from OpenSSL"


class _Contexts:
    """One SSL_CTX per role, made on first use (they are shared, read-only after setup)."""

    server: Any = None
    client: dict[int, Any] = {}

    @classmethod
    def make(cls, server: bool, suites: str) -> Any:
        method = lib.TLS_server_method() if server else lib.TLS_client_method()
        ctx = ffi.gc(lib.SSL_CTX_new(method), lib.SSL_CTX_free)
        if ctx == ffi.NULL:
            raise TlsError(f"SSL_CTX_new failed: {_errors()}")
        ok = (lib.SSL_CTX_set_min_proto_version(ctx, lib.TLS1_3_VERSION) == 1
              and lib.SSL_CTX_set_max_proto_version(ctx, lib.TLS1_3_VERSION) == 1
              and lib.SSL_CTX_set_ciphersuites(ctx, suites.encode()) == 1
              and lib.SSL_CTX_set_num_tickets(ctx, 0) == 1)
        if not ok:
            raise TlsError(f"cannot configure TLS 1.3: {_errors()}")
        lib.SSL_CTX_set_options(ctx, lib.SSL_OP_NO_TICKET)
        if server:
            lib.SSL_CTX_set_psk_find_session_callback(ctx, lib.bt_tls_find_session)
            lib.SSL_CTX_set_client_hello_cb(ctx, lib.bt_tls_client_hello, ffi.NULL)
            # the traffic secrets, for kernel TLS (ktls.py); kept on the session only
            lib.SSL_CTX_set_keylog_callback(ctx, lib.bt_tls_keylog)
        else:
            lib.SSL_CTX_set_psk_use_session_callback(ctx, lib.bt_tls_use_session)
        return ctx

    @classmethod
    def get(cls, server: bool, hash_id: int = 0) -> Any:
        if server:
            if cls.server is None:
                cls.server = cls.make(True, SUITES)
            return cls.server
        if hash_id not in cls.client:  # a client offers the one suite of its PSK's hash
            cls.client[hash_id] = cls.make(False, CIPHERS[hash_id])
        return cls.client[hash_id]


def _new_session(ssl: Any, key: bytes, hash_id: int) -> Any:
    sess = lib.SSL_SESSION_new()
    if sess == ffi.NULL:
        return ffi.NULL
    cipher = lib.SSL_CIPHER_find(ssl, _CIPHER_ID[hash_id])
    if (cipher == ffi.NULL or lib.SSL_SESSION_set1_master_key(sess, key, len(key)) != 1
            or lib.SSL_SESSION_set_cipher(sess, cipher) != 1
            or lib.SSL_SESSION_set_protocol_version(sess, lib.TLS1_3_VERSION) != 1):
        lib.SSL_SESSION_free(sess)
        return ffi.NULL
    return sess  # OpenSSL owns it from here


PSK_EXTENSION = 41  # pre_shared_key (RFC 8446 4.2.11)


def offered_hash(ext: bytes) -> int | None:
    """The hash named by the first NVMe PSK identity of a pre_shared_key extension:
    identities<7..2^16-1> of (identity<1..2^16-1>, obfuscated_ticket_age u32), binders."""
    if len(ext) < 4:
        return None
    n = int.from_bytes(ext[2:4], "big")
    head = ext[4 : 4 + min(n, 8)]
    if len(head) == 8 and head.startswith(b"NVMe") and head[6:8] in (b"01", b"02"):
        return int(head[6:8])
    return None


if AVAILABLE:
    @ffi.def_extern()
    def bt_tls_client_hello(ssl: Any, al: Any, arg: Any) -> int:
        """Server, before the cipher suite is chosen: OpenSSL would take the client's
        first preference and then ignore a PSK of another hash (a SHA-256 PSK offered
        with both suites, AES-256 first, fails). The NVMe identity names its hash: offer
        only the suite that goes with it."""
        out = ffi.new("const unsigned char **")
        n = ffi.new("size_t *")
        if lib.SSL_client_hello_get0_ext(ssl, PSK_EXTENSION, out, n) == 1:
            h = offered_hash(bytes(ffi.buffer(out[0], n[0])))
            if h is not None:
                lib.SSL_set_ciphersuites(ssl, CIPHERS[h].encode())
        return lib.SSL_CLIENT_HELLO_SUCCESS

    @ffi.def_extern()
    def bt_tls_find_session(ssl: Any, identity: Any, idlen: int, sessp: Any) -> int:
        """Server: the client offered ``identity``; hand OpenSSL its session, or none."""
        tls: TlsSession = ffi.from_handle(lib.SSL_get_app_data(ssl))
        sessp[0] = ffi.NULL
        ident = bytes(ffi.buffer(identity, idlen))
        tls.identity = ident
        try:
            found = tls.resolver(ident) if tls.resolver is not None else None
        except TlsRefused as exc:
            tls.refusal = str(exc)
            return 1  # no session: the handshake fails (no certificate to fall back on)
        except Exception as exc:  # a resolver bug must fail this handshake only
            tls.refusal = f"internal error looking up the identity: {exc!r}"
            return 1
        if found is None:
            tls.refusal = "unknown PSK identity"
            return 1
        key, hash_id = found
        sessp[0] = _new_session(ssl, key, hash_id)
        tls.refusal = "" if sessp[0] != ffi.NULL else "cannot build the PSK session"
        return 1

    @ffi.def_extern()
    def bt_tls_keylog(ssl: Any, line: Any) -> None:
        """OpenSSL's key log line "<LABEL> <client random> <secret hex>": only the two
        application traffic secrets are kept, in the session, never written anywhere."""
        tls: TlsSession = ffi.from_handle(lib.SSL_get_app_data(ssl))
        parts = ffi.string(line).split(b" ")
        if len(parts) == 3 and parts[0] in (b"CLIENT_TRAFFIC_SECRET_0",
                                            b"SERVER_TRAFFIC_SECRET_0"):
            tls._secrets[parts[0].decode()] = bytes.fromhex(parts[2].decode())

    @ffi.def_extern()
    def bt_tls_use_session(ssl: Any, md: Any, idp: Any, idlenp: Any, sessp: Any) -> int:
        """Client: offer our identity and PSK."""
        tls: TlsSession = ffi.from_handle(lib.SSL_get_app_data(ssl))
        sess = _new_session(ssl, tls._client_key, tls._client_hash)
        if sess == ffi.NULL:
            return 0
        idp[0] = tls._client_id
        idlenp[0] = len(tls.identity)
        sessp[0] = sess
        return 1


class TlsSession:
    """One connection's TLS 1.3 PSK session over memory BIOs (see the module doc)."""

    def __init__(self, server: bool, resolver: Resolver | None = None, *,
                 identity: bytes = b"", key: bytes = b"", hash_id: int = 0) -> None:
        require()
        self.server = server
        self.resolver = resolver
        self.identity = identity  # server: what the client offered
        self.refusal = ""  # server: why the resolver gave no key
        self.failure = ""
        self.record_layer = "user"  # "kernel" once ktls.install took it over
        self.ktls_why = ""  # why the kernel did not take it (when it was asked to)
        self._secrets: dict[str, bytes] = {}  # application traffic secrets (keylog)
        self._app_in = 0  # application records decrypted here (the kernel's RX sequence)
        self._app_out = 0  # application writes encrypted here
        self._client_key = key
        self._client_hash = hash_id
        self._client_id = ffi.new("unsigned char[]", identity) if not server else None
        ctx = _Contexts.get(server, hash_id)
        self._ssl = ffi.gc(lib.SSL_new(ctx), lib.SSL_free)
        if self._ssl == ffi.NULL:
            raise TlsError(f"SSL_new failed: {_errors()}")
        self._handle = ffi.new_handle(self)
        lib.SSL_set_app_data(self._ssl, self._handle)
        self._rbio = lib.BIO_new(lib.BIO_s_mem())
        self._wbio = lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(self._ssl, self._rbio, self._wbio)  # the SSL owns both now
        if server:
            lib.SSL_set_accept_state(self._ssl)
        else:
            lib.SSL_set_connect_state(self._ssl)
            self._handshake()
        self._buf = ffi.new("unsigned char[]", _CHUNK)
        self._n = ffi.new("size_t *")

    @property
    def established(self) -> bool:
        return bool(lib.SSL_is_init_finished(self._ssl))

    @property
    def cipher(self) -> str:
        c = lib.SSL_get_current_cipher(self._ssl)
        return ffi.string(lib.SSL_CIPHER_get_name(c)).decode() if c != ffi.NULL else ""

    def _fail(self, what: str) -> TlsError:
        detail = _errors()
        reason = self.refusal or detail
        self.failure = f"{what}: {reason}"
        return TlsError(self.failure)

    def _handshake(self) -> None:
        r = lib.SSL_do_handshake(self._ssl)
        if r == 1:
            return
        err = lib.SSL_get_error(self._ssl, r)
        if err not in (lib.SSL_ERROR_WANT_READ, lib.SSL_ERROR_WANT_WRITE):
            raise self._fail("TLS handshake failed")

    def receive(self, data: bytes | memoryview) -> bytes:
        """Ciphertext from the peer in; the plaintext it completes out (may be empty).
        Raises TlsError when the handshake fails or a record does not authenticate;
        `outgoing()` may then still hold the alert to send."""
        if data:
            n = lib.BIO_write(self._rbio, ffi.from_buffer(data), len(data))
            if n != len(data):
                raise self._fail("TLS receive buffer")
        if not self.established:
            self._handshake()
            if not self.established:
                return b""
        out = []
        while True:
            if lib.SSL_read_ex(self._ssl, self._buf, _CHUNK, self._n) == 1:
                self._app_in += 1  # (one record per call: TLS 1.3, no pipelining)
                out.append(ffi.buffer(self._buf, self._n[0])[:])
                continue
            err = lib.SSL_get_error(self._ssl, 0)
            if err == lib.SSL_ERROR_WANT_READ:
                break
            if err == lib.SSL_ERROR_ZERO_RETURN:
                self.failure = "closed by the peer (close_notify)"
                break
            raise self._fail("TLS record error")
        return b"".join(out)

    def send(self, data: bytes | memoryview | list[Any]) -> None:
        """Plaintext in (one buffer or a list of them, as writelines takes)."""
        if isinstance(data, list):
            data = b"".join(data)
        if not data:
            return
        if lib.SSL_write_ex(self._ssl, ffi.from_buffer(data), len(data), self._n) != 1:
            raise self._fail("TLS send failed")
        self._app_out += 1

    def outgoing(self) -> bytes:
        """Ciphertext for the peer (handshake messages, records, alerts)."""
        n = lib.BIO_ctrl_pending(self._wbio)
        if not n:
            return b""
        buf = ffi.new("unsigned char[]", n)
        got = lib.BIO_read(self._wbio, buf, n)
        return ffi.buffer(buf, max(got, 0))[:]

    def kernel_handoff(self) -> tuple[int, bytes, bytes, int]:
        """(hash id, TX secret, RX secret, RX sequence) for ktls.install, when the kernel
        can take the record layer over right now: server side, the handshake just
        finished, nothing sent yet (TX sequence 0), every record received so far whole
        and decrypted here (the host's first PDUs often come with its Finished: their
        count is the RX sequence, their plaintext goes up before the switch), nothing
        buffered. Raises ktls.KtlsUnavailable saying why not."""
        from .ktls import KtlsUnavailable

        if not (self.server and self.established):
            raise KtlsUnavailable("not an established server session")
        if self._app_out or lib.BIO_ctrl_pending(self._rbio) or lib.BIO_ctrl_pending(
                self._wbio):
            raise KtlsUnavailable("a partial record or output is buffered in user space")
        tx = self._secrets.get("SERVER_TRAFFIC_SECRET_0")
        rx = self._secrets.get("CLIENT_TRAFFIC_SECRET_0")
        if tx is None or rx is None:
            raise KtlsUnavailable("traffic secrets not available")
        h = 1 if self.cipher == "TLS_AES_128_GCM_SHA256" else 2
        self._secrets.clear()  # the kernel takes them, or the connection is closed
        return h, tx, rx, self._app_in

    def close(self) -> None:
        """Queue a close_notify alert (then send `outgoing()`)."""
        if self.established:
            lib.SSL_shutdown(self._ssl)
