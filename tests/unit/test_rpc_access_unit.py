"""Control-plane access pieces, one at a time: the allowed-directories check (paths.py),
the HTTP access settings (config.py), the bearer-token comparison and the aiohttp
application's guards (rpc.py). End to end: tests/integration/test_rpc_access.py."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from blocktarget.config import (
    ConfigError,
    Settings,
    is_loopback_host,
    parse_settings,
    prepare_rpc_access,
)
from blocktarget.paths import PATH_NOT_ALLOWED, PathNotAllowed, check_path, is_within
from blocktarget.rpc import bearer_ok, build_http_app

TOKEN = "t" * 32

# ---- allowed directories ---------------------------------------------------------------


def target(dirs: list[str] | None) -> Any:
    return SimpleNamespace(settings=Settings(allowed_dirs=dirs))


def test_check_path_resolves_links_and_dotdot(tmp_path: Path) -> None:
    ok, out = tmp_path / "ok", tmp_path / "out"
    ok.mkdir()
    out.mkdir()
    (out / "f").write_bytes(b"x")
    (ok / "f").write_bytes(b"x")
    (ok / "to-out").symlink_to(out / "f")
    (ok / "dir-out").symlink_to(out)
    (ok / "to-in").symlink_to(ok / "f")
    t = target([str(ok)])
    assert check_path(t, str(ok / "f"), "bdev file") == str(ok / "f")
    assert check_path(t, str(ok / "to-in"), "bdev file")
    assert check_path(t, str(ok / "new" / "file"), "pmem pool")  # not there yet: fine
    assert check_path(t, str(ok), "FUSE mountpoint")
    for bad in (out / "f", ok / "to-out", ok / "dir-out" / "f", ok / ".." / "out" / "f",
                tmp_path / "okay", "/", "relative/path"):
        with pytest.raises(PathNotAllowed) as e:
            check_path(t, str(bad), "bdev file")
        assert e.value.code == PATH_NOT_ALLOWED and "outside the allowed" in e.value.message
    with pytest.raises(PathNotAllowed, match="resolves to"):
        check_path(t, str(ok / "to-out"), "bdev file")
    for bad in ("", "a\0b"):
        with pytest.raises(PathNotAllowed):
            check_path(t, bad, "key file")


def test_check_path_default_and_allowed_dir_symlink(tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowed, match=r"\(/var/lib/blocktarget\)"):
        check_path(target(None), str(tmp_path / "x"), "bdev file")
    with pytest.raises(PathNotAllowed, match="none configured"):
        check_path(target([]), str(tmp_path / "x"), "bdev file")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)  # an allowed dir named through a link
    assert check_path(target([str(tmp_path / "alias")]), str(real / "x"), "bdev file")
    assert is_within(str(real), [str(real)]) and not is_within(str(real) + "2", [str(real)])


# ---- HTTP access settings ----------------------------------------------------------------


def settings(http: Any, **rpc: Any) -> Settings:
    return parse_settings({"blocktarget": {"rpc": {"http": http, **rpc}}}, "t.json")


def test_http_object_and_describe_keeps_secrets_out(tmp_path: Path) -> None:
    tf = tmp_path / "tok"
    tf.write_text(TOKEN + "\n")
    os.chmod(tf, 0o600)
    s = settings({"address": "0.0.0.0:9009", "token_file": str(tf)}, max_request_bytes=2048,
                 max_connections=5)
    prepare_rpc_access(s, "t.json")
    assert s.rpc_http == "0.0.0.0:9009" and s.rpc_token == TOKEN
    assert (s.rpc_max_request_bytes, s.rpc_max_connections) == (2048, 5)
    d = s.describe()
    assert d["rpc"]["http"] == {"address": "0.0.0.0:9009", "token_file": str(tf)}
    assert TOKEN not in json.dumps(d) and TOKEN not in repr(s)
    again = parse_settings({"blocktarget": d}, "t.json")
    prepare_rpc_access(again, "t.json")
    assert again.rpc_token == TOKEN and again.rpc_max_connections == 5
    inline = settings({"address": "127.0.0.1:9009", "token": TOKEN})
    assert "token" not in json.dumps(inline.describe())
    assert settings("127.0.0.1:9009").describe()["rpc"]["http"] == "127.0.0.1:9009"


@pytest.mark.parametrize(("http", "rpc", "why"), [
    ({"address": 5}, {}, "address must be"),
    ({"address": "0.0.0.0:1", "token": ""}, {}, "non-empty string"),
    ({"address": "0.0.0.0:1", "tls_client_ca": "ca.pem"}, {}, "needs tls_cert"),
    ("127.0.0.1:1", {"max_request_bytes": 10}, "max_request_bytes must be an integer >= 1024"),
    ("127.0.0.1:1", {"max_connections": 0}, "max_connections must be an integer >= 1"),
    ("127.0.0.1:1", {"bogus": 0}, "blocktarget.rpc must be an object"),
])
def test_bad_http_settings(http: Any, rpc: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        settings(http, **rpc)


@pytest.mark.parametrize(("addr", "ok"), [
    ("127.0.0.1:1", True), ("127.8.9.10:1", True), ("[::1]:1", True), ("localhost:1", True),
    (":1", True),  # no host: 127.0.0.1
    ("0.0.0.0:1", False), ("[::]:1", False), ("10.1.2.3:1", False), ("host.example:1", False),
])
def test_exposure_needs_token_or_client_certs(addr: str, ok: bool) -> None:
    s = settings(addr)
    if ok:
        prepare_rpc_access(s, "t.json")
    else:
        with pytest.raises(ConfigError, match="non-loopback"):
            prepare_rpc_access(s, "t.json")
        prepare_rpc_access(settings({"address": addr, "token": TOKEN}), "t.json")
        prepare_rpc_access(settings({"address": addr, "tls_cert": "c", "tls_key": "k",
                                     "tls_client_ca": "ca"}), "t.json")
        with pytest.raises(ConfigError, match="non-loopback"):  # TLS alone is no auth
            prepare_rpc_access(settings({"address": addr, "tls_cert": "c", "tls_key": "k"}),
                               "t.json")


def test_short_token_refused_even_on_loopback() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        prepare_rpc_access(settings({"address": "127.0.0.1:1", "token": "abc"}), "t.json")


def test_loopback_names() -> None:
    assert is_loopback_host("::1") and not is_loopback_host("::") and \
        not is_loopback_host("localhost.example")


def test_allowed_dirs_setting() -> None:
    s = parse_settings({"blocktarget": {"allowed_dirs": ["/a", "/b"]}}, "t.json")
    assert s.allowed_dirs == ["/a", "/b"] and s.describe()["allowed_dirs"] == ["/a", "/b"]
    assert parse_settings({"blocktarget": {"allowed_dirs": None}}, "t").allowed_dirs is None
    assert "allowed_dirs" not in Settings().describe()
    for bad in ("/a", [""], [1]):
        with pytest.raises(ConfigError, match="allowed_dirs must be a list"):
            parse_settings({"blocktarget": {"allowed_dirs": bad}}, "t.json")


# ---- bearer token and the aiohttp guards -------------------------------------------------


def test_bearer_ok() -> None:
    assert bearer_ok(f"Bearer {TOKEN}", TOKEN) and bearer_ok(f"bearer  {TOKEN} ", TOKEN)
    for h in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x",
              "Bearer", f"Bearer {TOKEN.upper()}"):
        assert not bearer_ok(h, TOKEN), h


class SlowDispatcher:
    """Holds every request until released, to fill the in-flight bound."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def handle(self, req: Any) -> Any:
        self.started += 1
        await self.release.wait()
        return {"jsonrpc": "2.0", "id": req.get("id"), "result": True}


async def test_http_app_in_flight_bound_and_size() -> None:
    d = SlowDispatcher()
    app = build_http_app(d, token=TOKEN, max_request_bytes=2048,  # type: ignore[arg-type]
                         max_connections=2)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app)) as client:
        body = {"jsonrpc": "2.0", "method": "m", "id": 1}
        held = [asyncio.create_task(client.post("/", json=body, headers=auth))
                for _ in range(2)]
        while d.started < 2:
            await asyncio.sleep(0.01)
        r = await client.post("/", json=body, headers=auth)
        assert r.status == 503
        assert (await r.json())["error"]["code"] == -32002
        r = await client.post("/", json=body)
        assert r.status == 401, "the token is checked before anything else"
        d.release.set()
        for t in held:
            resp = await t
            assert resp.status == 200 and (await resp.json())["result"] is True
        r = await client.post("/", data=b"{" + b" " * 4096 + b"}", headers=auth)
        assert r.status == 413 and "limit 2048" in (await r.json())["error"]["message"]
