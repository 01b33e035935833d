"""NVMe/TCP TLS pre-shared keys: the interchange format, the retained PSK, the PSK
identity and the TLS PSK derived from them (NVMe TCP transport spec, TP 8011/8018).

The operator configures one key per (host, subsystem) pair in the PSK interchange
format `NVMeTLSkey-1:hh:<base64(key || crc32(key))>:` as `nvme gen-tls-key` prints it;
hh names the hash that turns the configured PSK into the retained PSK (00: none, the
configured PSK is the retained one; 01 SHA-256 with a 32-byte key; 02 SHA-384 with a
48-byte key). The PSK that TLS uses is never the configured key itself: it is bound to
the PSK identity that the host offers in its ClientHello, which names both NQNs:

    retained = HKDF-Expand-Label(HKDF-Extract(0, configured), "HostNQN", hostnqn, L)
    identity = "NVMe0R<hh> <hostnqn> <subnqn>"                  (version 0)
             | "NVMe1R<hh> <hostnqn> <subnqn> <digest>"         (version 1)
    tls psk  = HKDF-Expand-Label(HKDF-Extract(0, retained), "nvme-tls-psk", context, L)

with context = the whole identity (version 0) or "<hh> <digest>" (version 1), digest =
base64(HMAC(retained, hostnqn " " subnqn " NVMe-over-Fabrics")), and hh of the identity
the hash of the TLS cipher suite (01: TLS_AES_128_GCM_SHA256, 02: TLS_AES_256_GCM_SHA384).
HKDF-Expand-Label is RFC 8446's, with its length-prefixed "tls13 " label and context, as
SPDK does. libnvme as Debian trixie ships it (1.13, nvme-cli 2.13; checked in the QEMU
guest, tests/vm/test_kernel_tls_libnvme.py) encodes HKDF's info differently: the length
in host byte order (little-endian on x86) and neither label nor context length-prefixed
("libnvme encoding" here). Its keys then differ from ours for both identity versions.
A version 1 identity tells which encoding the host used (its digest is computed from the
retained PSK, which differs), so the target accepts either there; a version 0 identity
does not, and is RFC 8446 only.

Pure functions of bytes and text: the handshake (nvme/tls.py) and the host side both use
them, and no repr or message here ever shows key material.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import zlib
from dataclasses import dataclass, field

PREFIX = "NVMeTLSkey-1"
HASHES = {1: "sha256", 2: "sha384"}  # identity / interchange hash indicator -> hashlib
HASH_LEN = {1: 32, 2: 48}
CIPHERS = {1: "TLS_AES_128_GCM_SHA256", 2: "TLS_AES_256_GCM_SHA384"}
HMAC_SEED = b"NVMe-over-Fabrics"


class TlsKeyError(ValueError):
    """A key or identity that cannot be used; the message never contains the key."""


@dataclass(frozen=True, repr=False)
class ConfiguredPsk:
    """A configured PSK as the interchange format carries it."""

    key: bytes = field(compare=True)
    hash_id: int = 0  # 0: used as the retained PSK unchanged

    def __repr__(self) -> str:
        return f"ConfiguredPsk(hash={self.hash_id:02d}, {len(self.key)} bytes)"

    __str__ = __repr__

    @property
    def cipher_hash(self) -> int:
        """The hash of the TLS cipher suite this key goes with: the transform's, or by
        the key's length when it is not transformed (32 bytes SHA-256, 48 SHA-384)."""
        return self.hash_id or (1 if len(self.key) == 32 else 2)

    @classmethod
    def parse(cls, text: str) -> ConfiguredPsk:
        """Parse ``NVMeTLSkey-1:hh:<base64>:``; the CRC-32 trailer must match."""
        parts = text.strip().split(":")
        if len(parts) == 4 and parts[3] == "":
            parts = parts[:3]
        if len(parts) != 3 or parts[0] != PREFIX:
            raise TlsKeyError("not a TLS PSK in interchange format "
                              "(expected NVMeTLSkey-1:hh:<base64>:)")
        tag, b64 = parts[1], parts[2]
        if tag not in ("00", "01", "02"):
            raise TlsKeyError("TLS PSK: hash indicator must be 00, 01 or 02")
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError:
            raise TlsKeyError("TLS PSK: the key part is not base64") from None
        key, crc = raw[:-4], raw[-4:]
        hash_id = int(tag)
        allowed = (HASH_LEN[hash_id],) if hash_id else (32, 48)
        if len(key) not in allowed:
            raise TlsKeyError(f"TLS PSK: key must be {' or '.join(map(str, allowed))} bytes "
                              f"for hash {tag} (got {max(len(key), 0)})")
        if zlib.crc32(key) != int.from_bytes(crc, "little"):
            raise TlsKeyError("TLS PSK: CRC-32 check failed (key damaged?)")
        return cls(key, hash_id)

    def encode(self) -> str:
        crc = zlib.crc32(self.key).to_bytes(4, "little")
        return f"{PREFIX}:{self.hash_id:02d}:{base64.b64encode(self.key + crc).decode()}:"

    @classmethod
    def generate(cls, hash_id: int = 1) -> ConfiguredPsk:
        """A fresh random key, as `nvme gen-tls-key --hmac hash_id`."""
        return cls(secrets.token_bytes(HASH_LEN[hash_id or 1]), hash_id)

    def retained(self, hostnqn: str, libnvme: bool = False) -> bytes:
        """The retained PSK: bound to the host NQN unless the hash indicator is 00."""
        if self.hash_id == 0:
            return self.key
        return hkdf_expand_label(self.hash_id, hkdf_extract(self.hash_id, self.key),
                                 b"HostNQN", hostnqn.encode(), len(self.key), libnvme)


# ---------------------------------------------------------------------------
# HKDF (RFC 5869) with TLS 1.3's HKDF-Expand-Label (RFC 8446 section 7.1)


def hkdf_extract(hash_id: int, ikm: bytes) -> bytes:
    name = HASHES[hash_id]
    return hmac.new(bytes(HASH_LEN[hash_id]), ikm, name).digest()


def hkdf_expand_label(hash_id: int, prk: bytes, label: bytes, context: bytes,
                      length: int, libnvme: bool = False) -> bytes:
    """RFC 8446's HKDF-Expand-Label; ``libnvme``: the info as libnvme 1.13 on x86 builds
    it (length little-endian, label and context without their length bytes)."""
    full = b"tls13 " + label
    if len(full) > 255 or len(context) > 255:
        raise TlsKeyError("HKDF label or context longer than 255 bytes")
    if libnvme:
        info = length.to_bytes(2, "little") + full + context
    else:
        info = (length.to_bytes(2, "big") + bytes([len(full)]) + full
                + bytes([len(context)]) + context)
    name = HASHES[hash_id]
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), name).digest()
        out += block
        counter += 1
    return out[:length]


# ---------------------------------------------------------------------------
# PSK identity


@dataclass(frozen=True)
class PskIdentity:
    """The parsed PSK identity a host offers: `NVMe<v><R|G><hh> <hostnqn> <subnqn>[ <digest>]`."""

    version: int
    generated: bool  # G: a PSK generated by DH-HMAC-CHAP (secure concatenation)
    hash_id: int
    hostnqn: str
    subnqn: str
    digest: str = ""

    def __str__(self) -> str:
        kind = "G" if self.generated else "R"
        text = f"NVMe{self.version}{kind}{self.hash_id:02d} {self.hostnqn} {self.subnqn}"
        return f"{text} {self.digest}" if self.version == 1 else text

    @classmethod
    def parse(cls, raw: bytes | str) -> PskIdentity:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        parts = text.split(" ")
        head = parts[0]
        if (len(head) != 8 or not head.startswith("NVMe") or head[4] not in "01"
                or head[5] not in "RG" or head[6:] not in ("01", "02")):
            raise TlsKeyError("not an NVMe PSK identity (expected NVMe<0|1><R|G><01|02> ...)")
        version = int(head[4])
        if len(parts) != (4 if version == 1 else 3) or not all(parts[1:]):
            raise TlsKeyError(f"NVMe PSK identity version {version} must have "
                              f"{3 if version else 2} fields after the header")
        return cls(version, head[5] == "G", int(head[6:]), parts[1], parts[2],
                   parts[3] if version == 1 else "")


def psk_digest(hash_id: int, retained: bytes, hostnqn: str, subnqn: str) -> str:
    """The version 1 identity's digest of the retained PSK and both NQNs."""
    mac = hmac.new(retained, f"{hostnqn} {subnqn} ".encode() + HMAC_SEED, HASHES[hash_id])
    return base64.b64encode(mac.digest()).decode()


def identity_for(psk: ConfiguredPsk, hostnqn: str, subnqn: str, version: int = 0,
                 libnvme: bool = False) -> PskIdentity:
    """The identity a host with this key offers to a subsystem (``libnvme``: as libnvme
    1.13 derives it)."""
    h = psk.cipher_hash
    digest = (psk_digest(h, psk.retained(hostnqn, libnvme), hostnqn, subnqn)
              if version == 1 else "")
    return PskIdentity(version, False, h, hostnqn, subnqn, digest)


def tls_psk(psk: ConfiguredPsk, ident: PskIdentity, libnvme: bool = False) -> bytes:
    """The TLS 1.3 external PSK for a host offering ``ident`` with this configured key.

    A version 1 identity whose digest matches only libnvme's retained PSK gets libnvme's
    TLS PSK; ``libnvme`` asks for that encoding for a version 0 identity too (which
    cannot tell). Raises TlsKeyError when the identity cannot go with the key (another
    hash, a generated PSK, a version 1 digest that matches neither encoding)."""
    if ident.generated:
        raise TlsKeyError("generated PSKs (secure concatenation after DH-HMAC-CHAP) "
                          "are not supported")
    if ident.hash_id != psk.cipher_hash:
        raise TlsKeyError(f"identity hash {ident.hash_id:02d} does not match the "
                          f"configured key's {psk.cipher_hash:02d}")
    h = ident.hash_id
    retained = psk.retained(ident.hostnqn, libnvme)
    if ident.version == 1:
        def matches(r: bytes) -> bool:
            return hmac.compare_digest(psk_digest(h, r, ident.hostnqn, ident.subnqn),
                                       ident.digest)

        if not matches(retained):
            other = psk.retained(ident.hostnqn, not libnvme)
            if other == retained or not matches(other):
                raise TlsKeyError("identity digest does not match the configured key")
            retained, libnvme = other, not libnvme
        context = f"{h:02d} {ident.digest}".encode()
    else:
        context = str(ident).encode()
    return hkdf_expand_label(h, hkdf_extract(h, retained), b"nvme-tls-psk", context,
                             HASH_LEN[h], libnvme)
