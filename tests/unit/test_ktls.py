"""Kernel TLS hand-off (blocktarget/ktls.py): the crypto_info the kernel takes, byte for
byte (linux/tls.h: struct tls12_crypto_info_aes_gcm_{128,256}), with the keys and IVs of
RFC 8446 7.3 computed by OpenSSL's own TLS 1.3 KDF (`openssl kdf TLS13-KDF`). The
hand-off itself needs a kernel with kTLS: tests/vm/test_kernel_tls.py runs it in the
guest (this host's kernel has none), where our initiator and the kernel host do I/O.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from blocktarget import ktls


def openssl_label(hash_id: int, secret: bytes, label: str, n: int) -> bytes:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl (Debian package 'openssl') is missing")
    r = subprocess.run(
        [openssl, "kdf", "-keylen", str(n), "-kdfopt",
         f"digest:{'SHA256' if hash_id == 1 else 'SHA384'}", "-kdfopt", "mode:EXPAND_ONLY",
         "-kdfopt", f"hexkey:{secret.hex()}", "-kdfopt", "prefix:tls13 ",
         "-kdfopt", f"label:{label}", "-kdfopt", "hexdata:", "TLS13-KDF"],
        capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return bytes.fromhex(r.stdout.strip().replace(":", ""))


@pytest.mark.parametrize(("hash_id", "cipher", "keylen"), [(1, 51, 16), (2, 52, 32)])
def test_crypto_info_layout(hash_id: int, cipher: int, keylen: int) -> None:
    secret = os.urandom(32 if hash_id == 1 else 48)
    info = ktls.crypto_info(hash_id, secret, rec_seq=3)
    assert len(info) == 4 + 8 + keylen + 4 + 8
    version, ctype = struct.unpack_from("=HH", info)
    assert (version, ctype) == (0x0304, cipher)
    key = openssl_label(hash_id, secret, "key", keylen)
    iv = openssl_label(hash_id, secret, "iv", 12)
    assert info[4:12] == iv[4:] and info[12:12 + keylen] == key
    assert info[12 + keylen:16 + keylen] == iv[:4]
    assert info[-8:] == (3).to_bytes(8, "big")


def test_wrong_secret_length_refused() -> None:
    with pytest.raises(ktls.KtlsUnavailable):
        ktls.crypto_info(2, bytes(32))
