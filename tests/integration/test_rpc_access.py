"""Control-plane access (issue 8 item 2), against real target processes and the real
`blocktarget rpc` client: the Unix socket's mode, HTTP on loopback unless a bearer token
or TLS client certificates guard it (else the target refuses to start, exit 2), the token
check, TLS with client certificates, request-size and connection bounds, clients that
stall mid-request (Unix socket and HTTP: slow headers, slow body) or sit idle, and the
allowed directories every path-taking method is confined to.

Budget: about 30 s (measured 27 s: a handful of target starts, no I/O; the stalled-client
tests wait out a 1 s request timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blocktarget.rpc_client import RpcCallError, RpcClient

from .target_proc import Launcher, RunningTarget, free_port, run_cli

pytestmark = pytest.mark.timeout(120)

TOKEN = "0123456789abcdef0123456789abcdef"
UNAUTHORIZED = -32001
EACCES = -13


def post(port: int, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def version_req(id_: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version", "id": id_}).encode()


def write_config(tmp_path: Path, bt: dict[str, Any], name: str = "c.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"blocktarget": bt, "subsystems": []}))
    return p


# ---- Unix socket -----------------------------------------------------------------------


def test_unix_socket_is_0600(running_target: Launcher) -> None:
    t = running_target({"subsystems": []})
    st = os.stat(t.sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


# ---- refusing to start ------------------------------------------------------------------


@pytest.mark.parametrize("http", ["0.0.0.0:{port}", "[::]:{port}", "192.0.2.1:{port}",
                                  "example.com:{port}"])
def test_non_loopback_http_without_auth_refuses_to_start(tmp_path: Path, http: str) -> None:
    addr = http.format(port=free_port())
    cfg = write_config(tmp_path, {"rpc": {"http": addr, "unix": None}})
    r = run_cli("start", "-c", str(cfg))
    assert r.returncode == 2, r
    assert "refusing to serve HTTP RPC on non-loopback address" in r.stderr
    assert "token_file" in r.stderr
    # the command-line override is checked the same way
    r = run_cli("start", "-r", "", "--http", addr)
    assert r.returncode == 2 and "non-loopback" in r.stderr, r


def test_bad_token_settings_refuse_to_start(tmp_path: Path) -> None:
    port = free_port()
    cases = [
        ({"address": f"0.0.0.0:{port}", "token": "short"}, "at least 16 characters"),
        ({"address": f"0.0.0.0:{port}", "token_file": str(tmp_path / "missing")},
         "cannot read"),
        ({"address": f"0.0.0.0:{port}", "token": TOKEN, "token_file": "x"}, "not both"),
        ({"address": f"0.0.0.0:{port}", "tls_cert": "c.pem"}, "go together"),
        ({"address": f"0.0.0.0:{port}", "bogus": 1}, "unknown setting 'bogus'"),
    ]
    for http_cfg, why in cases:
        cfg = write_config(tmp_path, {"rpc": {"http": http_cfg, "unix": None}})
        r = run_cli("start", "-c", str(cfg))
        assert r.returncode == 2, (http_cfg, r)
        assert why in r.stderr, (http_cfg, r.stderr)


def test_non_loopback_with_token_file_is_accepted(tmp_path: Path) -> None:
    """Validated without binding (--dry-run): tests stay on loopback."""
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    tf.chmod(0o600)
    cfg = write_config(tmp_path, {"rpc": {"http": {"address": f"0.0.0.0:{free_port()}",
                                                   "token_file": str(tf)}, "unix": None}})
    r = run_cli("start", "-c", str(cfg), "--dry-run")
    assert r.returncode == 0, r


# ---- bearer token -------------------------------------------------------------------------


@pytest.fixture
def token_target(running_target: Launcher, tmp_path: Path) -> RunningTarget:
    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    tf.chmod(0o600)
    port = free_port()
    return running_target({"blocktarget": {"rpc": {
        "http": {"address": f"127.0.0.1:{port}", "token_file": str(tf)}}},
        "subsystems": []})


def test_token_required_on_every_route(token_target: RunningTarget) -> None:
    port = token_target.http_port
    assert port is not None
    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        status, hdrs, body = post(port, version_req(), headers)
        assert status == 401, (headers, status)
        assert hdrs["www-authenticate"].startswith("Bearer")
        err = json.loads(body)["error"]
        assert err["code"] == UNAUTHORIZED and "bearer token" in err["message"]
    status, _, body = post(port, version_req(7), {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["id"] == 7
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        assert r.status == 200 and b"blocktarget_rpc_requests" in r.read()
    finally:
        conn.close()
    # the Unix socket is guarded by its file mode, not the token
    assert token_target.rpc("spdk_get_version")
    # the token never appears in what the target saves
    saved = json.dumps(token_target.rpc("save_config"))
    assert TOKEN not in saved and "token_file" in saved


def test_rpc_client_token_options(token_target: RunningTarget, tmp_path: Path) -> None:
    url = f"127.0.0.1:{token_target.http_port}"
    r = run_cli("rpc", "--http", url, "spdk_get_version")
    assert r.returncode == 1 and "Unauthorized" in r.stderr and str(UNAUTHORIZED) in r.stderr
    r = run_cli("rpc", "--http", url, "--token", TOKEN, "spdk_get_version")
    assert r.returncode == 0 and "version" in r.stdout, r
    tf = tmp_path / "client-token"
    tf.write_text(TOKEN + "\n")
    r = run_cli("rpc", "--http", url, "--token-file", str(tf), "spdk_get_version")
    assert r.returncode == 0, r
    r = run_cli("rpc", "--http", url, "spdk_get_version",
                env={**os.environ, "BLOCKTARGET_RPC_TOKEN": TOKEN})
    assert r.returncode == 0, r
    r = run_cli("rpc", "--http", url, "--token-file", str(tmp_path / "nope"), "x")
    assert r.returncode == 2 and "--token-file" in r.stderr


# ---- TLS with client certificates ------------------------------------------------------------


def _pki(d: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool = False,
             san: x509.GeneralName | None = None, eku: Any = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        if eku is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    out: dict[str, str] = {}

    def save(stem: str, c: x509.Certificate, k: Any) -> None:
        (d / f"{stem}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[stem] = str(d / f"{stem}.pem")
        out[f"{stem}_key"] = str(d / f"{stem}.key")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("bt-test-ca", ca_key, "bt-test-ca", ca_key, ca=True)
    save("ca", ca, ca_key)
    sk = ec.generate_private_key(ec.SECP256R1())
    save("server", cert("127.0.0.1", sk, "bt-test-ca", ca_key,
                        san=x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        eku=ExtendedKeyUsageOID.SERVER_AUTH), sk)
    ck = ec.generate_private_key(ec.SECP256R1())
    save("client", cert("operator", ck, "bt-test-ca", ca_key,
                        eku=ExtendedKeyUsageOID.CLIENT_AUTH), ck)
    return out


def test_tls_client_certificates(running_target: Launcher, tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    port = free_port()
    tls = {"address": f"127.0.0.1:{port}", "tls_cert": pki["server"],
           "tls_key": pki["server_key"], "tls_client_ca": pki["ca"]}
    t = running_target({"blocktarget": {"rpc": {"http": tls}}, "subsystems": []})
    url = f"https://127.0.0.1:{port}"
    with RpcClient(http=url, timeout=10, tls_ca=pki["ca"], tls_cert=pki["client"],
                   tls_key=pki["client_key"]) as c:
        assert c.call("spdk_get_version")["version"]
    r = run_cli("rpc", "--http", url, "--tls-ca", pki["ca"], "--tls-cert", pki["client"],
                "--tls-key", pki["client_key"], "spdk_get_version")
    assert r.returncode == 0, r
    # no client certificate: the handshake fails, no request is served
    ctx = ssl.create_default_context(cafile=pki["ca"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                if not s.recv(100):
                    raise ConnectionError("closed")
    # plain HTTP on the TLS port gets nothing either
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        post(port, version_req())
    assert t.running()
    # with client certificates a non-loopback address is accepted (checked, not bound)
    cfg = write_config(tmp_path, {"rpc": {"http": {**tls, "address": f"0.0.0.0:{port}"},
                                          "unix": None}})
    assert run_cli("start", "-c", str(cfg), "--dry-run").returncode == 0
    # ... but a server certificate alone is not authentication
    del tls["tls_client_ca"]
    cfg = write_config(tmp_path, {"rpc": {"http": {**tls, "address": f"0.0.0.0:{port}"},
                                          "unix": None}})
    r = run_cli("start", "-c", str(cfg), "--dry-run")
    assert r.returncode == 2 and "non-loopback" in r.stderr


# ---- bounds ------------------------------------------------------------------------------


@pytest.fixture
def small_target(running_target: Launcher) -> RunningTarget:
    return running_target({"blocktarget": {"rpc": {"max_request_bytes": 4096,
                                                   "max_connections": 3}},
                           "subsystems": []})


def test_oversized_requests_are_refused_and_closed(small_target: RunningTarget) -> None:
    t = small_target
    big = json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1,
                      "params": {"pad": "x" * 8192}}).encode()
    assert t.http_port is not None
    status, hdrs, body = post(t.http_port, big)
    assert status == 413 and hdrs.get("connection", "").lower() == "close"
    err = json.loads(body)["error"]
    assert err["code"] == -32600 and "request too large (limit 4096 bytes)" in err["message"]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(t.sock_path)
        s.sendall(version_req(1))
        first = s.recv(65536)
        assert json.loads(first)["id"] == 1
        try:
            s.sendall(big)
        except BrokenPipeError:
            pass
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        err = json.loads(data)["error"]
        assert err["code"] == -32600 and "4096" in err["message"]
    assert t.rpc("spdk_get_version"), "the target serves the next client"


def test_unix_connection_limit(small_target: RunningTarget) -> None:
    t = small_target
    held = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(t.sock_path)
            s.sendall(version_req())
            assert "result" in json.loads(s.recv(65536))
            held.append(s)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(t.sock_path)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            err = json.loads(data)["error"]
            assert err["code"] == -32002 and "limit 3" in err["message"]
    finally:
        for s in held:
            s.close()
    for _ in range(50):  # the slots free as the server sees the closes
        try:
            assert t.rpc("spdk_get_version")
            break
        except (RpcCallError, OSError):
            time.sleep(0.05)
    else:
        raise AssertionError("connection slots never freed")


# ---- allowed directories ----------------------------------------------------------------------


def test_allowed_dirs_confine_every_path(running_target: Launcher, tmp_path: Path) -> None:
    ok, outside = tmp_path / "ok", tmp_path / "outside"
    ok.mkdir()
    outside.mkdir()
    for d in (ok, outside):
        with open(d / "disk.img", "wb") as f:
            f.truncate(1 << 20)
    (ok / "link.img").symlink_to(outside / "disk.img")
    (ok / "linkdir").symlink_to(outside)
    t = running_target({"blocktarget": {"allowed_dirs": [str(ok)]}, "subsystems": []})

    def refused(method: str, what: str, **params: Any) -> None:
        with pytest.raises(RpcCallError) as e:
            t.rpc(method, **params)
        assert e.value.code == EACCES, (method, params, e.value)
        assert "outside the allowed directories" in e.value.message
        assert what in e.value.message and str(ok) in e.value.message

    assert t.rpc("bdev_uring_create", name="in", filename=str(ok / "disk.img"),
                 engine="threads") == "in"
    for path in (outside / "disk.img", ok / "link.img", ok / "linkdir" / "disk.img",
                 ok / ".." / "outside" / "disk.img", "/etc/passwd"):
        refused("bdev_uring_create", "bdev file", name="x", filename=str(path),
                engine="threads")
        refused("bdev_create", "bdev file", type="uring", name="x", filename=str(path),
                engine="threads")
    refused("bdev_aio_create", "bdev file", name="x", filename=str(outside / "disk.img"))
    refused("bdev_pmem_create_pool", "pmem pool", pmem_file=str(outside / "pool"),
            num_blocks=64, block_size=512)
    refused("bdev_pmem_get_pool_info", "pmem pool", pmem_file=str(outside / "disk.img"))
    refused("bdev_pmem_delete_pool", "pmem pool", pmem_file=str(outside / "disk.img"))
    refused("bdev_pmem_create", "pmem pool", name="p", pmem_file=str(outside / "pool"))
    t.rpc("bdev_malloc_create", name="M0", num_blocks=256, block_size=512)
    refused("fuse_export_start", "FUSE mountpoint", bdev_name="M0", mountpoint=str(outside))
    assert (outside / "disk.img").stat().st_size == 1 << 20
    assert not (outside / "pool").exists()
    # a config naming a file outside is refused at start, exit 2
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({
        "blocktarget": {"allowed_dirs": [str(ok)], "rpc": {"http": None, "unix": None}},
        "subsystems": [{"subsystem": "bdev", "config": [{
            "method": "bdev_uring_create",
            "params": {"name": "U", "filename": str(outside / "disk.img"),
                       "engine": "threads"}}]}]}))
    r = run_cli("start", "-c", str(cfg), "--dry-run")
    assert r.returncode == 2 and "outside the allowed directories" in r.stderr, r
    r = run_cli("start", "-c", str(cfg), "--dry-run", "--allowed-dir", str(outside))
    assert r.returncode == 0, r


def test_allowed_dirs_default_is_var_lib_blocktarget(running_target: Launcher,
                                                      tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    t = running_target({"blocktarget": {"allowed_dirs": None}, "subsystems": []})
    with pytest.raises(RpcCallError) as e:
        t.rpc("bdev_uring_create", name="x", filename=str(img), engine="threads")
    assert e.value.code == EACCES and "(/var/lib/blocktarget)" in e.value.message


# ---- stalled clients (rpc.request_timeout_sec, idle clients giving way) ------------------

REQ_TIMEOUT_S = 1


@pytest.fixture
def guarded_target(running_target: Launcher) -> RunningTarget:
    return running_target({"blocktarget": {"rpc": {"max_connections": 3,
                                                   "request_timeout_sec": REQ_TIMEOUT_S}},
                           "subsystems": []})


async def _read_to_eof(reader: asyncio.StreamReader, limit: float) -> bytes:
    data = b""
    async with asyncio.timeout(limit):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def _unix_slowloris(t: RunningTarget) -> None:
    slow = [await asyncio.open_unix_connection(t.sock_path) for _ in range(3)]
    t0 = time.monotonic()
    req = version_req(7)

    async def drip(w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            for b in req[:-1]:  # never the closing brace
                w.write(bytes([b]))
                await w.drain()
                await asyncio.sleep(0.1)

    drips = [asyncio.create_task(drip(w)) for _, w in slow]
    await asyncio.sleep(0.3)
    # every slot holds a request in progress: nobody to make room for a 4th client
    r, w = await asyncio.open_unix_connection(t.sock_path)
    err = json.loads(await _read_to_eof(r, 5))["error"]
    assert err["code"] == -32002 and "limit 3" in err["message"], err
    w.close()
    results = await asyncio.gather(*(_read_to_eof(r, REQ_TIMEOUT_S + 5) for r, _ in slow))
    took = time.monotonic() - t0
    for data in results:
        err = json.loads(data)["error"]
        assert err["code"] == -32003 and f"within {REQ_TIMEOUT_S} s" in err["message"], err
    for d in drips:
        d.cancel()
    print(f"unix slowloris: 3 clients trickling 1 byte / 0.1 s closed after {took:.2f} s "
          f"(request_timeout_sec={REQ_TIMEOUT_S}); a 4th meanwhile got -32002")
    assert REQ_TIMEOUT_S <= took <= REQ_TIMEOUT_S + 2, took
    for _, w in slow:
        w.close()


def test_unix_slowloris_clients_are_closed_then_others_served(
        guarded_target: RunningTarget) -> None:
    """Three clients fill every slot, each trickling a request a byte at a time (so never
    idle): a new client is refused while they hold on, each is closed with -32003 one
    request timeout after its first byte, and then the target serves again."""
    asyncio.run(_unix_slowloris(guarded_target))
    assert guarded_target.rpc("spdk_get_version")["version"]


async def _unix_idle(t: RunningTarget) -> None:
    async def call(r: asyncio.StreamReader, w: asyncio.StreamWriter, id_: int) -> None:
        w.write(version_req(id_))
        await w.drain()
        async with asyncio.timeout(5):
            resp = json.loads(await r.read(65536))
        assert resp["id"] == id_ and "result" in resp, resp

    idle = []
    for i in range(3):  # persistent clients, like a session of SPDK's rpc.py
        r, w = await asyncio.open_unix_connection(t.sock_path)
        await call(r, w, i)
        idle.append((r, w))
        await asyncio.sleep(0.1)
    # idle past the request timeout: not a stall, nobody is cut
    await asyncio.sleep(REQ_TIMEOUT_S + 0.5)
    for i, (r, w) in enumerate(idle):
        await call(r, w, 10 + i)
    await asyncio.sleep(1.2)  # all idle for > 1 s: the oldest-idle one gives way
    r, w = await asyncio.open_unix_connection(t.sock_path)
    await call(r, w, 99)
    assert await _read_to_eof(idle[0][0], 5) == b"", "the longest-idle client is closed"
    for i, (r2, w2) in enumerate(idle[1:]):
        await call(r2, w2, 20 + i)
    for _, w2 in [*idle, (r, w)]:
        w2.close()


def test_unix_idle_clients_stay_and_give_way_when_full(guarded_target: RunningTarget) -> None:
    """Persistent clients idle between calls are not cut (idle_timeout_sec 0, even past
    the request timeout); when all 3 slots are taken by idle clients, a new client is
    served and the longest-idle one is closed quietly; the others keep working."""
    asyncio.run(_unix_idle(guarded_target))


def test_spdk_rpc_server_mode_idle_between_calls(guarded_target: RunningTarget) -> None:
    """SPDK's own client in the mode its test scripts use (`rpc.py --server`), idle for
    longer than the request timeout between calls, is served every time."""
    from .test_spdk_client import SPDK_RPC, SpdkRpc

    assert Path(SPDK_RPC).exists(), "SPDK's client is a test dependency (pip package 'spdk')"
    client = SpdkRpc(guarded_target.sock_path)
    try:
        for _ in range(2):
            assert json.loads(client.ok("spdk_get_version"))["version"]
            time.sleep(REQ_TIMEOUT_S + 0.5)
    finally:
        client.close()


def _raw_http(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _recv_all(s: socket.socket) -> bytes:
    """Everything the server sent before it closed. A reset also ends the stream: a
    server that closes while the client's unread bytes sit in its receive buffer (the
    trickling client keeps sending) makes its kernel send RST instead of FIN, and the
    response read before it is what the test checks."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_http_slow_headers_and_body_are_timed_out(guarded_target: RunningTarget) -> None:
    """One client trickles request headers (a byte / 0.1 s, never finishing them),
    another sends headers and part of its body: both get 408 with a -32003 body and are
    closed after the request timeout; a normal request is served meanwhile."""
    port = guarded_target.http_port
    assert port is not None
    head = _raw_http(port)
    body = _raw_http(port)
    t0 = time.monotonic()
    partial = version_req()
    body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(partial) + partial[:10])
    closed_at: dict[str, float] = {}
    got: dict[str, bytes] = {}

    def trickle() -> None:
        with contextlib.suppress(OSError):
            for b in b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                head.sendall(bytes([b]))
                time.sleep(0.1)

    def reader(name: str, s: socket.socket) -> None:
        got[name] = _recv_all(s)
        closed_at[name] = time.monotonic() - t0

    threads = [threading.Thread(target=trickle, daemon=True),
               threading.Thread(target=reader, args=("headers", head)),
               threading.Thread(target=reader, args=("body", body))]
    for th in threads:
        th.start()
    status, _, resp = post(port, version_req(5))
    assert status == 200 and json.loads(resp)["id"] == 5
    for th in threads:
        th.join(REQ_TIMEOUT_S + 8)
    head.close()
    body.close()
    for name in ("headers", "body"):
        data = got[name]
        assert data.startswith(b"HTTP/1.1 408"), (name, data[:200])
        err = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
        assert err["code"] == -32003, (name, err)
        # (a body: + up to 2 s of lingering, so the client reads the 408 before the close)
        assert REQ_TIMEOUT_S - 0.1 <= closed_at[name] <= REQ_TIMEOUT_S + 3.5, closed_at
    print(f"http slow headers: closed after {closed_at['headers']:.2f} s, slow body after "
          f"{closed_at['body']:.2f} s (request_timeout_sec={REQ_TIMEOUT_S})")


def test_http_connection_cap(guarded_target: RunningTarget) -> None:
    """3 connections, each with a request begun: a 4th connection gets 503 (-32002) and
    is closed at once. Once they time out, requests are served again; and when the 3
    slots hold idle keep-alive connections, a new one is served (an idle one gives way)."""
    port = guarded_target.http_port
    assert port is not None
    busy = [_raw_http(port) for _ in range(3)]
    for s in busy:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.2)
    extra = _raw_http(port)
    data = _recv_all(extra)
    extra.close()
    assert data.startswith(b"HTTP/1.1 503"), data[:200]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == -32002
    for s in busy:
        assert _recv_all(s).startswith(b"HTTP/1.1 408")
        s.close()
    status, _, _ = post(port, version_req())
    assert status == 200
    keep = []
    for i in range(3):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/", body=version_req(i), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        r.read()
        keep.append(c)
    time.sleep(1.2)
    status, _, _ = post(port, version_req())
    assert status == 200, "an idle keep-alive connection gives way to a new client"
    for c in keep:
        c.close()
