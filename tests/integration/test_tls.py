"""NVMe/TCP over TLS 1.3 with pre-shared keys, against a running target (issue 17).

Peers: OpenSSL's own client (`openssl s_client -psk`, an implementation that shares
nothing with ours but libssl) for the handshake, our initiator (`tls_key`) for I/O with
verification, SPDK's rpc.py for the configuration. A secure listener refuses plain
connections and wrong or unknown keys (logged and counted), a plain listener beside it
keeps serving, and no key material reaches the RPC output or save_config.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktarget import tls
from blocktarget.host import connect
from blocktarget.nvme import spec, structs
from blocktarget.nvme.tls_keys import ConfiguredPsk, identity_for, tls_psk

from .nvme_target_util import NQN, Tgt, start_target
from .target_proc import Launcher, free_port, listen_address, malloc

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not tls.AVAILABLE and os.environ.get("CI") != "true",
                       reason=tls.WHY_NOT or "no TLS"),
]

HOST = "nqn.2014-08.org.nvmexpress:uuid:7e1a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8"
STRANGER = "nqn.2014-08.org.nvmexpress:uuid:00000000-1111-2222-3333-999999999999"
SPDK_RPC = str(Path(sys.executable).with_name("spdk-rpc"))


class Setup:
    def __init__(self, t: Tgt, psk: ConfiguredPsk, port: int, key_text: str) -> None:
        self.t, self.psk, self.port, self.key_text = t, psk, port, key_text


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    launcher = Launcher()
    d = tmp_path_factory.mktemp("tlskeys")
    psk = ConfiguredPsk.generate(1)
    path = d / "psk0"
    path.write_text(psk.encode() + "\n")
    path.chmod(0o600)
    try:
        t = start_target(launcher, bdevs=[malloc("Malloc0", 8192, 512)], allow_any_host=False)
        t.rpc("keyring_file_add_key", name="psk0", path=str(path))
        t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=HOST, psk="psk0")
        t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=STRANGER)
        port = free_port()
        t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(port),
              secure_channel=True)
        yield Setup(t, psk, port, psk.encode())
    finally:
        launcher.cleanup()


def tls_counts(s: Setup) -> dict[str, int]:
    return s.t.rpc("nvmf_get_transports", trtype="TCP")[0]["tls"]["connections"]


def s_client(port: int, identity: str, key: bytes, suite: str) -> subprocess.CompletedProcess:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl (Debian package 'openssl') is missing")
    return subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ciphersuites",
         suite, "-psk", key.hex(), "-psk_identity", identity, "-brief"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)


def test_openssl_s_client_handshakes(setup: Setup) -> None:
    ident = identity_for(setup.psk, HOST, NQN)
    before = tls_counts(setup).get("established", 0)
    r = s_client(setup.port, str(ident), tls_psk(setup.psk, ident), "TLS_AES_128_GCM_SHA256")
    out = r.stdout + r.stderr
    assert "CONNECTION ESTABLISHED" in out and "TLSv1.3" in out, out
    assert "TLS_AES_128_GCM_SHA256" in out, out
    assert tls_counts(setup).get("established", 0) == before + 1


def test_openssl_wrong_key_and_unknown_identity_fail(setup: Setup) -> None:
    ident = identity_for(setup.psk, HOST, NQN)
    before = tls_counts(setup)
    r = s_client(setup.port, str(ident), bytes(32), "TLS_AES_128_GCM_SHA256")
    assert "CONNECTION ESTABLISHED" not in r.stdout + r.stderr
    r = s_client(setup.port, f"NVMe0R01 {STRANGER} {NQN}", bytes(32), "TLS_AES_128_GCM_SHA256")
    assert "CONNECTION ESTABLISHED" not in r.stdout + r.stderr
    r = s_client(setup.port, "client1", bytes(32), "TLS_AES_128_GCM_SHA256")
    assert "CONNECTION ESTABLISHED" not in r.stdout + r.stderr
    after = tls_counts(setup)
    assert after.get("handshake", 0) == before.get("handshake", 0) + 1, after
    assert after.get("refused", 0) == before.get("refused", 0) + 2, after


async def test_initiator_io_over_tls(setup: Setup) -> None:
    c = await connect("127.0.0.1", setup.port, NQN, hostnqn=HOST, nr_io_queues=2,
                      tls_key=setup.key_text, timeout=10)
    try:
        pattern = os.urandom(128 * 1024)  # larger than a TLS record: several per PDU
        await c.write(1, 64, pattern)
        got = await c.read(1, 64, len(pattern) // 512)
        assert bytes(got) == pattern
        small = os.urandom(4096)
        await asyncio.gather(*(c.write(1, 1000 + 8 * i, small) for i in range(32)))
        reads = await asyncio.gather(*(c.read(1, 1000 + 8 * i, 8) for i in range(32)))
        assert all(bytes(r) == small for r in reads)
    finally:
        await c.disconnect()


async def test_identity_v1_and_sha384(setup: Setup, tmp_path: Path) -> None:
    from blocktarget.host.tls import HostPsk

    c = await connect("127.0.0.1", setup.port, NQN, hostnqn=HOST, timeout=10,
                      tls_key=HostPsk.load(setup.key_text, identity_version=1))
    await c.disconnect()
    # a SHA-384 key for a second host
    host2 = HOST[:-1] + "9"
    psk2 = ConfiguredPsk.generate(2)
    p = tmp_path / "psk384"
    p.write_text(psk2.encode())
    p.chmod(0o600)
    setup.t.rpc("keyring_file_add_key", name="psk384", path=str(p))
    setup.t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=host2, psk="psk384")
    c = await connect("127.0.0.1", setup.port, NQN, hostnqn=host2, tls_key=str(p), timeout=10)
    await c.write(1, 7, b"\xa5" * 512)
    assert bytes(await c.read(1, 7, 1)) == b"\xa5" * 512
    await c.disconnect()


async def test_wrong_key_plain_and_mismatch_refused(setup: Setup) -> None:
    before = tls_counts(setup)
    with pytest.raises(ConnectionError):
        await connect("127.0.0.1", setup.port, NQN, hostnqn=HOST, timeout=5,
                      tls_key=ConfiguredPsk.generate(1).encode())
    with pytest.raises((ConnectionError, TimeoutError)):
        await connect("127.0.0.1", setup.port, NQN, hostnqn=HOST, timeout=5)
    after = tls_counts(setup)
    assert after.get("handshake", 0) == before.get("handshake", 0) + 1, after
    assert after.get("plain", 0) == before.get("plain", 0) + 1, after


async def test_plain_listener_beside_and_psk_host_needs_tls(setup: Setup) -> None:
    """The fixture's plain listener still serves a host without a PSK; a host with one
    is refused there (its key would protect nothing in the clear)."""
    from blocktarget.host.connection import NvmeStatusError

    c = await connect("127.0.0.1", setup.t.port, NQN, hostnqn=STRANGER, timeout=10)
    await c.read(1, 0, 1)
    await c.disconnect()
    with pytest.raises(NvmeStatusError):
        await connect("127.0.0.1", setup.t.port, NQN, hostnqn=HOST, timeout=10)


def test_discovery_says_tls_and_config_keeps_no_key(setup: Setup) -> None:
    async def log() -> list[structs.DiscoveryEntry]:
        c = await connect("127.0.0.1", setup.t.port, spec.DISCOVERY_NQN, hostnqn=STRANGER,
                          kato_ms=0, timeout=10)
        try:
            return structs.parse_discovery_log(
                await c.get_log_page(spec.LogPage.DISCOVERY, 4096)).entries
        finally:
            await c.disconnect()

    by_port = {e.trsvcid: e for e in asyncio.run(log()) if e.subnqn == NQN}
    sec, plain = by_port[str(setup.port)], by_port[str(setup.t.port)]
    assert sec.treq & spec.TREQ_SECURE_CHANNEL_MASK == spec.Treq.SECURE_CHANNEL_REQUIRED
    assert sec.tsas[0] == spec.TcpSecType.TLS13 and plain.tsas[0] == spec.TcpSecType.NONE
    saved = json.dumps(setup.t.rpc("save_config"))
    listed = json.dumps([setup.t.rpc("nvmf_get_subsystems"), setup.t.rpc("keyring_get_keys"),
                         setup.t.rpc("nvmf_subsystem_get_listeners", nqn=NQN)])
    b64 = setup.key_text.split(":")[2]
    for text in (saved, listed):
        assert b64 not in text and b64[:16] not in text and setup.psk.key.hex() not in text
    assert '"secure_channel": true' in saved and '"psk": "psk0"' in saved
    transports = setup.t.rpc("nvmf_get_transports")[0]["tls"]
    assert transports["available"] is True
    assert transports["record_layer"] == ("kernel" if transports["ktls_available"] else "user")


def test_spdk_rpc_configures_tls(setup: Setup) -> None:
    if not Path(SPDK_RPC).exists():
        pytest.fail("spdk-rpc (PyPI spdk, a test dependency) is not installed")
    sock = setup.t.proc.sock_path
    port = free_port()
    host3 = HOST[:-1] + "3"

    def spdk(*args: str) -> None:
        r = subprocess.run([SPDK_RPC, "-s", sock, *args], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr

    spdk("nvmf_subsystem_add_host", NQN, host3, "--psk", "psk0")
    spdk("nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", str(port),
         "-f", "ipv4", "-k")
    listeners = setup.t.rpc("nvmf_subsystem_get_listeners", nqn=NQN)
    assert {(li["address"]["trsvcid"], li["secure_channel"]) for li in listeners} >= {
        (str(port), True), (str(setup.port), True), (str(setup.t.port), False)}
    ident = identity_for(setup.psk, host3, NQN)
    r = s_client(port, str(ident), tls_psk(setup.psk, ident), "TLS_AES_128_GCM_SHA256")
    assert "CONNECTION ESTABLISHED" in r.stdout + r.stderr, r.stdout + r.stderr


def test_cli_connect_and_perf_with_tls(setup: Setup, tmp_path: Path) -> None:
    """`blocktarget connect/perf --tls --tls-key FILE`, the operator's way in."""
    from .target_proc import run_cli

    key = tmp_path / "host.psk"
    key.write_text(setup.key_text)
    key.chmod(0o600)
    common = ["-a", "127.0.0.1", "-s", str(setup.port), "-n", NQN, "--hostnqn", HOST,
              "--tls", "--tls-key", str(key)]
    r = run_cli("connect", *common)
    assert r.returncode == 0, r.stderr
    assert "TLS          TLS_AES_128_GCM_SHA256" in r.stdout, r.stdout
    r = run_cli("perf", *common, "-w", "randrw", "-o", "4k", "-q", "8", "-t", "2",
                "--verify", "--size", "4M", "--json", "--quiet", timeout=60)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["config"]["tls"] is True and "tls_key" not in res["config"]
    assert res["engine"] == "python" and res["verify_failures"] == 0, res
    assert res["verified_reads"] > 0 and res["total"]["ops"] > 0, res
    assert res["total"]["errors"] == 0, res
    assert setup.key_text not in r.stdout + r.stderr
    # a key without --tls (or --tls without a key) is an error, not plain TCP
    r = run_cli("connect", *common[:-3], "--tls-key", str(key))
    assert r.returncode != 0 and "--tls and --tls-key go together" in r.stderr
    # the C engine cannot read TLS: asked for it, perf says so
    r = run_cli("perf", *common, "--engine", "c", "-t", "1")
    assert r.returncode == 2 and "--tls runs on the Python engine" in r.stderr


def test_cli_discover_over_tls(setup: Setup, tmp_path: Path) -> None:
    """Discovery through the secure port: the identity names the discovery NQN, and the
    target takes the host's key for a subsystem it may reach there."""
    from .target_proc import run_cli

    key = tmp_path / "host.psk"
    key.write_text(setup.key_text)
    key.chmod(0o600)
    r = run_cli("discover", "-a", "127.0.0.1", "-s", str(setup.port), "-q", HOST, "--tls",
                "--tls-key", str(key), "--json")
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)["records"]
    secure = [e for e in recs if e["subnqn"] == NQN and e["trsvcid"] == str(setup.port)]
    assert secure and secure[0]["treq"] & spec.TREQ_SECURE_CHANNEL_MASK == \
        spec.Treq.SECURE_CHANNEL_REQUIRED
    # a host without a key for anything on that port is refused at the handshake
    r = run_cli("discover", "-a", "127.0.0.1", "-s", str(setup.port), "-q", STRANGER,
                "--tls", "--tls-key", ConfiguredPsk.generate(1).encode(), "--timeout", "5")
    assert r.returncode != 0 and "TLS" in r.stderr, r.stderr


def test_stalled_handshake_is_closed(tmp_path: Path) -> None:
    """A peer that connects to a secure port and sends nothing (or half a ClientHello)
    is closed after stall_timeout_sec and counted, like a plain one that never sends its
    Connect: it must not hold a connection slot."""
    import socket
    import time

    launcher = Launcher()
    try:
        t = start_target(launcher, transport={"stall_timeout_sec": 1})
        port = free_port()
        t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(port),
              secure_channel=True)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, no more
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by the target
            assert 0.5 < time.monotonic() - t0 < 8
        counts = t.rpc("nvmf_get_transports")[0]["tls"]["connections"]
        assert counts.get("timeout") == 1, counts
    finally:
        launcher.cleanup()


async def test_dhchap_inside_tls(setup: Setup, tmp_path: Path) -> None:
    """A host with both a PSK and a DH-HMAC-CHAP key authenticates in-band over the TLS
    channel (two separate layers; not the spec's secure concatenation, which derives the
    TLS PSK from the authentication and is not implemented). Without its DH-HMAC-CHAP
    secret, the TLS channel alone is not enough."""
    from blocktarget.host.auth import AuthenticationError
    from blocktarget.host.connection import NvmeStatusError
    from blocktarget.nvme.auth import DhchapKey

    host = HOST[:-1] + "4"
    dh = DhchapKey.generate(1).encode()
    p = tmp_path / "dh.key"
    p.write_text(dh)
    p.chmod(0o600)
    setup.t.rpc("keyring_file_add_key", name="dh4", path=str(p))
    setup.t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=host, psk="psk0", dhchap_key="dh4")
    c = await connect("127.0.0.1", setup.port, NQN, hostnqn=host, tls_key=setup.key_text,
                      dhchap_secret=dh, nr_io_queues=1, timeout=10)
    await c.write(1, 300, b"\x5a" * 512)
    assert bytes(await c.read(1, 300, 1)) == b"\x5a" * 512
    await c.disconnect()
    with pytest.raises((AuthenticationError, NvmeStatusError)):
        await connect("127.0.0.1", setup.port, NQN, hostnqn=host, tls_key=setup.key_text,
                      timeout=10)
    log = setup.t.proc.log()
    assert f"host {host} authenticated" in log and dh.split(":")[2][:16] not in log
