"""Kernel TLS (the "tls" TCP upper-layer protocol) for a connection whose TLS 1.3
handshake OpenSSL did over memory buffers (tls.TlsSession).

Once the kernel holds the record keys, the socket reads and writes plaintext again: the
connection goes back to the ordinary queue pair on its socket, with the C poller and the
C lane, and the CPU spends the AES-GCM work in the kernel instead of in OpenSSL plus the
copies of the memory-BIO design.

The keys come from the session's traffic secrets (RFC 8446 7.3: key = HKDF-Expand-Label(
secret, "key", "", key length), iv = HKDF-Expand-Label(secret, "iv", "", 12)); the
kernel's struct tls12_crypto_info_aes_gcm_{128,256} takes the iv's first 4 bytes as the
salt and the other 8 as the iv, and the record sequence number: 0 for what we send (the
switch happens right after the handshake, before any output; no session tickets), and
for what we receive the number of records already decrypted in user space. Anything
else (a partial record buffered, output still queued) keeps the connection in user
space (TlsSession.kernel_handoff says why) rather than risk a record out of sequence.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from .nvme.tls_keys import HASH_LEN, hkdf_expand_label
from .tls import ktls_available

SOL_TLS = 282
TCP_ULP = 31
TLS_TX, TLS_RX = 1, 2
TLS_1_3_VERSION = 0x0304
# cipher suite hash id -> (kernel cipher type, key length)
_CIPHER = {1: (51, 16), 2: (52, 32)}  # TLS_CIPHER_AES_GCM_128, TLS_CIPHER_AES_GCM_256


class KtlsUnavailable(Exception):
    """Why this connection keeps its record layer in user space."""


def crypto_info(hash_id: int, secret: bytes, rec_seq: int = 0) -> bytes:
    """struct tls12_crypto_info_aes_gcm_{128,256} for one direction."""
    cipher, keylen = _CIPHER[hash_id]
    if len(secret) != HASH_LEN[hash_id]:
        raise KtlsUnavailable("traffic secret of the wrong length")
    key = hkdf_expand_label(hash_id, secret, b"key", b"", keylen)
    iv = hkdf_expand_label(hash_id, secret, b"iv", b"", 12)
    return (struct.pack("=HH", TLS_1_3_VERSION, cipher) + iv[4:] + key + iv[:4]
            + rec_seq.to_bytes(8, "big"))


def install(sock: Any, hash_id: int, tx_secret: bytes, rx_secret: bytes,
            rx_seq: int = 0) -> None:
    """Hand the record layer of ``sock`` to the kernel; raises KtlsUnavailable."""
    if not ktls_available():
        raise KtlsUnavailable("the kernel offers no kTLS (tls module not loaded)")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        raise KtlsUnavailable(f"TCP_ULP tls: {exc.strerror}") from None
    try:
        sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(hash_id, tx_secret))
        sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(hash_id, rx_secret, rx_seq))
    except OSError as exc:
        # the ULP cannot be removed again: this socket is unusable for user-space TLS
        raise OSError(exc.errno, f"kTLS keys refused: {exc.strerror}") from None
