"""TLS PSKs (issue 17 item 1): the interchange format against nvme-cli (gen-tls-key,
check-tls-key), HKDF-Expand-Label against OpenSSL's own TLS 1.3 KDF (`openssl kdf
TLS13-KDF`, an implementation that shares nothing with ours), identities, and that no
message or repr carries key material.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest

from blocktarget.nvme.tls_keys import (
    ConfiguredPsk,
    PskIdentity,
    TlsKeyError,
    hkdf_expand_label,
    hkdf_extract,
    identity_for,
    psk_digest,
    tls_psk,
)

HOST = "nqn.2014-08.org.nvmexpress:uuid:0c8a4d1e-1111-2222-3333-444444444444"
SUB = "nqn.2026-01.io.blocktarget:tls"


def tool(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing (Debian package '{package}')")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture(scope="module")
def nvme_cli() -> str:
    return tool("nvme", "nvme-cli")


@pytest.fixture(scope="module")
def openssl() -> str:
    return tool("openssl", "openssl")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=10)


# ---- interchange format, with nvme-cli as the peer -----------------------------------


@pytest.mark.parametrize("hmac_id", [1, 2])
def test_nvme_cli_keys_parse_and_reencode(nvme_cli: str, hmac_id: int) -> None:
    r = run(nvme_cli, "gen-tls-key", "--hmac", str(hmac_id))
    assert r.returncode == 0, r.stderr
    text = r.stdout.strip()
    psk = ConfiguredPsk.parse(text)
    assert psk.hash_id == hmac_id and len(psk.key) == (32 if hmac_id == 1 else 48)
    assert psk.encode() == text


# nvme-cli 2.3 refuses hash 00 ("Invalid HMAC identifier 0"), which the spec allows and
# newer libnvme accepts: 00 keys are covered by test_untransformed_key_is_the_retained_key
@pytest.mark.parametrize("hash_id", [1, 2])
def test_nvme_cli_accepts_ours_and_agrees_on_damage(nvme_cli: str, hash_id: int) -> None:
    psk = ConfiguredPsk.generate(hash_id)
    ours = psk.encode()
    r = run(nvme_cli, "check-tls-key", "-k", ours)
    assert r.returncode == 0 and "Key is valid" in r.stdout, r.stdout + r.stderr
    i = len("NVMeTLSkey-1:01:") + 3
    damaged = ours[:i] + ("A" if ours[i] != "A" else "B") + ours[i + 1:]
    assert run(nvme_cli, "check-tls-key", "-k", damaged).returncode != 0
    with pytest.raises(TlsKeyError, match="CRC-32"):
        ConfiguredPsk.parse(damaged)


@pytest.mark.parametrize(("text", "problem"), [
    ("DHHC-1:01:AAAA:", "not a TLS PSK"),
    ("NVMeTLSkey-1:03:" + base64.b64encode(bytes(36)).decode() + ":", "hash indicator"),
    ("NVMeTLSkey-1:01:" + base64.b64encode(bytes(52)).decode() + ":", "must be 32 bytes"),
    ("NVMeTLSkey-1:02:" + base64.b64encode(bytes(36)).decode() + ":", "must be 48 bytes"),
    ("NVMeTLSkey-1:00:" + base64.b64encode(bytes(20)).decode() + ":", "32 or 48"),
    ("NVMeTLSkey-1:01:not*base64:", "not base64"),
])
def test_bad_keys_named_without_material(text: str, problem: str) -> None:
    with pytest.raises(TlsKeyError, match=problem) as ei:
        ConfiguredPsk.parse(text)
    assert text.split(":")[2][:8] not in str(ei.value) or not text.split(":")[2][:8]


def test_repr_never_shows_the_key() -> None:
    psk = ConfiguredPsk.generate(2)
    for s in (repr(psk), str(psk), f"{psk}", repr([psk])):
        assert psk.key.hex() not in s and psk.encode()[16:30] not in s and "48 bytes" in s


# ---- HKDF, with OpenSSL's TLS 1.3 KDF as the peer --------------------------------------


def openssl_expand_label(openssl: str, hash_id: int, prk: bytes, label: str,
                         context: bytes, length: int) -> bytes:
    r = run(openssl, "kdf", "-keylen", str(length), "-kdfopt",
            f"digest:{'SHA256' if hash_id == 1 else 'SHA384'}", "-kdfopt", "mode:EXPAND_ONLY",
            "-kdfopt", f"hexkey:{prk.hex()}", "-kdfopt", "prefix:tls13 ",
            "-kdfopt", f"label:{label}", "-kdfopt", f"hexdata:{context.hex()}", "TLS13-KDF")
    assert r.returncode == 0, r.stderr
    return bytes.fromhex(r.stdout.strip().replace(":", ""))


def openssl_extract(openssl: str, hash_id: int, ikm: bytes) -> bytes:
    r = run(openssl, "kdf", "-keylen", str(32 if hash_id == 1 else 48), "-kdfopt",
            f"digest:{'SHA256' if hash_id == 1 else 'SHA384'}", "-kdfopt", "mode:EXTRACT_ONLY",
            "-kdfopt", f"hexkey:{ikm.hex()}", "HKDF")
    assert r.returncode == 0, r.stderr
    return bytes.fromhex(r.stdout.strip().replace(":", ""))


@pytest.mark.parametrize("hash_id", [1, 2])
def test_derivation_matches_openssl(openssl: str, hash_id: int) -> None:
    psk = ConfiguredPsk.generate(hash_id)
    n = len(psk.key)
    prk = openssl_extract(openssl, hash_id, psk.key)
    assert prk == hkdf_extract(hash_id, psk.key)
    retained = openssl_expand_label(openssl, hash_id, prk, "HostNQN", HOST.encode(), n)
    assert psk.retained(HOST) == retained
    for version in (0, 1):
        ident = identity_for(psk, HOST, SUB, version)
        context = (str(ident) if version == 0 else f"{hash_id:02d} {ident.digest}").encode()
        want = openssl_expand_label(openssl, hash_id, openssl_extract(openssl, hash_id, retained),
                                    "nvme-tls-psk", context, n)
        assert tls_psk(psk, ident) == want
    # A label/context longer than one HKDF block is produced block by block.
    assert hkdf_expand_label(hash_id, prk, b"x", b"y", 100) == openssl_expand_label(
        openssl, hash_id, prk, "x", b"y", 100)


def test_untransformed_key_is_the_retained_key() -> None:
    for n, h in ((32, 1), (48, 2)):
        psk = ConfiguredPsk(os.urandom(n), 0)
        assert psk.retained(HOST) == psk.key and psk.cipher_hash == h


# ---- identities ---------------------------------------------------------------------------


def test_identity_text_and_parse() -> None:
    psk = ConfiguredPsk.generate(1)
    v0 = identity_for(psk, HOST, SUB)
    assert str(v0) == f"NVMe0R01 {HOST} {SUB}"
    assert PskIdentity.parse(str(v0).encode()) == v0
    v1 = identity_for(psk, HOST, SUB, version=1)
    assert str(v1).startswith(f"NVMe1R01 {HOST} {SUB} ") and len(v1.digest) == 44
    assert v1.digest == psk_digest(1, psk.retained(HOST), HOST, SUB)
    assert PskIdentity.parse(str(v1)) == v1
    v2 = identity_for(ConfiguredPsk.generate(2), HOST, SUB, version=1)
    assert str(v2).startswith("NVMe1R02 ") and len(v2.digest) == 64


@pytest.mark.parametrize("text", [
    "", "NVMe0R03 a b", "NVMe2R01 a b", "NVMe0X01 a b", "NVMe0R01 a", "NVMe0R01 a b c",
    "NVMe1R01 a b", "client1",
])
def test_bad_identities(text: str) -> None:
    with pytest.raises(TlsKeyError):
        PskIdentity.parse(text)


def test_identity_must_fit_the_key() -> None:
    psk = ConfiguredPsk.generate(1)
    other = ConfiguredPsk.generate(1)
    with pytest.raises(TlsKeyError, match="hash 02"):
        tls_psk(psk, PskIdentity(0, False, 2, HOST, SUB))
    with pytest.raises(TlsKeyError, match="digest"):
        tls_psk(psk, identity_for(other, HOST, SUB, version=1))
    with pytest.raises(TlsKeyError, match="generated"):
        tls_psk(psk, PskIdentity(0, True, 1, HOST, SUB))
    # A different subsystem or host gives a different TLS PSK (the binding works).
    base = tls_psk(psk, identity_for(psk, HOST, SUB))
    assert tls_psk(psk, identity_for(psk, HOST, SUB + "x")) != base
    assert tls_psk(psk, identity_for(psk, HOST[:-1] + "5", SUB)) != base


# ---- libnvme 1.13's encoding, with what the real tool put in the guest's keyring ---------
# (trixie's `nvme check-tls-key --insert --identity 0|1` with this configured key, host and
# subsystem; read back from the kernel's .nvme keyring by tests/vm/test_kernel_tls_libnvme.py)
LIBNVME_KEY = "NVMeTLSkey-1:01:REPwD0pZTrcNiJt1TxtRq9b34NM9zK5TXaG1Donr4DKA30UA:"
LIBNVME_HOST = "nqn.2014-08.org.nvmexpress:uuid:71510000-0000-4000-8000-00000000000a"
LIBNVME_SUB = "nqn.2026-01.io.blocktarget:tls-libnvme"
LIBNVME_V0 = "12508e19eca00a7d67f4a29badb9a23bcd098a37674f007178e81ca9e1f7eb70"
LIBNVME_V1_DIGEST = "l5Vogd264Pqjznn46C25tYEhgVDhb26pMXEgHlymphM="
LIBNVME_V1 = "67f3fac7d0286ac57d42a61f465e3d91cfe1d80c26e769a40b908ed70c84de25"


def test_libnvme_keys_known_answers() -> None:
    psk = ConfiguredPsk.parse(LIBNVME_KEY)
    v1 = identity_for(psk, LIBNVME_HOST, LIBNVME_SUB, 1, libnvme=True)
    assert v1.digest == LIBNVME_V1_DIGEST
    # the target recognises libnvme's version 1 identity by its digest
    assert tls_psk(psk, PskIdentity.parse(str(v1))).hex() == LIBNVME_V1
    v0 = identity_for(psk, LIBNVME_HOST, LIBNVME_SUB, 0)
    assert tls_psk(psk, v0, libnvme=True).hex() == LIBNVME_V0
    # RFC 8446's encoding gives other keys (the version 0 identity cannot tell them apart)
    assert tls_psk(psk, v0).hex() != LIBNVME_V0
    rfc1 = identity_for(psk, LIBNVME_HOST, LIBNVME_SUB, 1)
    assert rfc1.digest != LIBNVME_V1_DIGEST
    assert tls_psk(psk, rfc1) != tls_psk(psk, v1)


def test_libnvme_encoding_needs_a_transformed_key() -> None:
    """With hash 00 the retained PSK is the configured key under both encodings, so a
    version 1 digest cannot tell them apart: RFC 8446's TLS PSK, and a digest that
    matches neither is refused."""
    psk = ConfiguredPsk(os.urandom(32), 0)
    v1 = identity_for(psk, HOST, SUB, 1, libnvme=True)
    assert v1 == identity_for(psk, HOST, SUB, 1)
    assert tls_psk(psk, v1) != tls_psk(psk, v1, libnvme=True)
    with pytest.raises(TlsKeyError, match="digest"):
        tls_psk(ConfiguredPsk.generate(1), identity_for(ConfiguredPsk.generate(1), HOST, SUB, 1,
                                                        libnvme=True))
