"""The TLS 1.3 PSK session (blocktarget/tls.py) and its asyncio adapter (tls_transport.py):
our client against our server in memory, then OpenSSL's s_client (a real peer) against
the adapter on a socket: TLS 1.3 only, the two NVMe suites only, the suite that goes
with the identity's hash even when the client prefers the other, failures classified.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest

from blocktarget import tls
from blocktarget.tls import TlsError, TlsSession, offered_hash
from blocktarget.tls_transport import TlsProtocol

pytestmark = pytest.mark.skipif(not tls.AVAILABLE and os.environ.get("CI") != "true",
                                reason=tls.WHY_NOT or "no TLS")

KEYS = {1: bytes(range(32)), 2: bytes(range(100, 148))}
IDS = {1: b"NVMe0R01 nqn.h nqn.s", 2: b"NVMe0R02 nqn.h nqn.s"}


def resolve(ident: bytes) -> tuple[bytes, int] | None:
    for h, i in IDS.items():
        if ident == i:
            return KEYS[h], h
    return None


def pump(a: TlsSession, b: TlsSession) -> None:
    for _ in range(6):
        for src, dst in ((a, b), (b, a)):
            data = src.outgoing()
            if data:
                dst.receive(data)


@pytest.mark.parametrize("h", [1, 2])
def test_memory_pair(h: int) -> None:
    server = TlsSession(True, resolve)
    client = TlsSession(False, identity=IDS[h], key=KEYS[h], hash_id=h)
    pump(client, server)
    assert server.established and client.established
    assert server.cipher == client.cipher == tls.CIPHERS[h]
    assert server.identity == IDS[h]
    big = os.urandom(300_000)  # many records each way
    client.send([big[:1000], big[1000:]])
    got = server.receive(client.outgoing())
    assert got == big
    server.send(big)
    assert client.receive(server.outgoing()) == big
    server.close()
    client.receive(server.outgoing())
    assert "close_notify" in client.failure


def test_wrong_key_and_unknown_identity() -> None:
    server = TlsSession(True, resolve)
    client = TlsSession(False, identity=IDS[1], key=bytes(32), hash_id=1)
    with pytest.raises(TlsError, match="binder") as ei:
        pump(client, server)
    assert server.refusal == "" and KEYS[1].hex() not in str(ei.value)
    server = TlsSession(True, resolve)
    client = TlsSession(False, identity=b"NVMe0R01 other nqn.s", key=KEYS[1], hash_id=1)
    with pytest.raises(TlsError, match="unknown PSK identity"):
        pump(client, server)


def test_resolver_refusal_and_bug_fail_only_that_handshake() -> None:
    def refuses(ident: bytes) -> Any:
        raise tls.TlsRefused("host has no PSK for that subsystem")

    def broken(ident: bytes) -> Any:
        raise KeyError("bug")

    for res, why in ((refuses, "no PSK for that subsystem"), (broken, "internal error")):
        server = TlsSession(True, res)
        client = TlsSession(False, identity=IDS[1], key=KEYS[1], hash_id=1)
        with pytest.raises(TlsError, match=why):
            pump(client, server)


def test_offered_hash() -> None:
    ident = b"NVMe0R02 h s"
    ext = (len(ident) + 6).to_bytes(2, "big") + len(ident).to_bytes(2, "big") + ident
    assert offered_hash(ext + bytes(4)) == 2
    assert offered_hash(ext.replace(b"R02", b"R01")) == 1
    assert offered_hash(b"\x00\x08\x00\x04abcd") is None and offered_hash(b"") is None


# ---- the adapter on a socket, with openssl s_client as the client -----------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport
        assert transport.get_extra_info("socket") is None  # never lent to the C poller
        assert transport.get_extra_info("tls").established

    def data_received(self, data: bytes) -> None:
        self.t.write(data)
        if data.endswith(b"\n"):
            self.t.close()  # (close_notify, then s_client -ign_eof exits)


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[tuple[str, str]]]]:
    failures: list[tuple[str, str]] = []
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: TlsProtocol(TlsSession(True, resolve), Echo,
                            on_failure=lambda k, m: failures.append((k, m))),
        "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1], failures
    srv.close()


async def s_client(port: int, *args: str) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl (Debian package 'openssl') is missing")
    proc = await asyncio.create_subprocess_exec(
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-ign_eof", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(b"ping-over-tls\n"), 20)
    return out.decode(errors="replace")


async def test_s_client_default_suites_gets_the_psk_suite(server: Any) -> None:
    """s_client offers AES-256 first; with a SHA-256 PSK the server must pick AES-128
    (OpenSSL alone would pick AES-256 and then ignore the PSK)."""
    port, failures = server
    out = await s_client(port, "-tls1_3", "-psk", KEYS[1].hex(), "-psk_identity",
                         IDS[1].decode())
    assert "Ciphersuite: TLS_AES_128_GCM_SHA256" in out and "TLSv1.3" in out, out
    assert "ping-over-tls" in out, out  # echoed back through both record layers
    assert failures == []


@pytest.mark.parametrize(("args", "kind", "why"), [
    (["-tls1_2", "-psk", "00", "-psk_identity", "x"], "handshake", "unsupported protocol"),
    (["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", "-psk", KEYS[1].hex(),
      "-psk_identity", IDS[1].decode()], "handshake", "no shared cipher"),
    (["-tls1_3", "-psk", KEYS[1].hex(), "-psk_identity", "client1"], "refused",
     "unknown PSK identity"),
], ids=["tls1.2", "chacha20", "unknown-identity"])
async def test_s_client_refused(server: Any, args: list[str], kind: str, why: str) -> None:
    port, failures = server
    out = await s_client(port, *args)
    assert "CONNECTION ESTABLISHED" not in out, out
    for _ in range(50):
        if failures:
            break
        await asyncio.sleep(0.02)
    assert failures and failures[0][0] == kind and why in failures[0][1], failures


def test_traffic_secrets_kept_only_until_the_record_layer_is_chosen() -> None:
    server = TlsSession(True, resolve)
    client = TlsSession(False, identity=IDS[1], key=KEYS[1], hash_id=1)
    pump(client, server)
    assert set(server._secrets) == {"CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"}
    assert client._secrets == {}  # (the initiator has no use for them)
    h, tx, rx, seq = server.kernel_handoff()
    assert (h, len(tx), len(rx), seq) == (1, 32, 32, 0) and server._secrets == {}
