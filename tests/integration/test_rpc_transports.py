"""Both RPC transports against a live target: every method of the issue, the error codes
on the wire, and each transport's framing (SPDK's bare JSON stream; HTTP POST)."""

from __future__ import annotations

import errno
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blocktarget.rpc_client import RpcCallError

from .target_proc import Launcher, RunningTarget, config, free_port, listen_address, port_free

NQN = "nqn.2026-01.io.test:rpc"
NQN2 = "nqn.2026-01.io.test:rpc2"
HOST = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100"

Call = Callable[..., Any]


@pytest.fixture(scope="module")
def live(module_launcher: Launcher) -> RunningTarget:
    return module_launcher(config())


@pytest.fixture(params=["unix", "http"])
def transport_target(request: pytest.FixtureRequest,
                     running_target: Launcher) -> Iterator[tuple[RunningTarget, Call]]:
    """A fresh target per transport, so the whole method list runs from a clean state."""
    t = running_target(config())
    yield t, (t.rpc if request.param == "unix" else t.http_rpc)


def code_of(call: Call, method: str, **params: Any) -> tuple[int, str]:
    with pytest.raises(RpcCallError) as ei:
        call(method, **params)
    assert ei.value.code != -32603, ei.value
    return ei.value.code, ei.value.message


ISSUE_METHODS = {
    "bdev_create", "bdev_delete", "bdev_get_bdevs", "bdev_get_iostat", "subsystem_add",
    "subsystem_remove", "subsystem_get", "bdev_malloc_create", "bdev_malloc_delete",
    "bdev_null_create", "bdev_null_delete", "nvmf_create_transport", "nvmf_get_transports",
    "nvmf_create_subsystem", "nvmf_delete_subsystem", "nvmf_subsystem_add_ns",
    "nvmf_subsystem_remove_ns", "nvmf_subsystem_add_listener", "nvmf_subsystem_remove_listener",
    "nvmf_subsystem_add_host", "nvmf_subsystem_remove_host", "nvmf_subsystem_allow_any_host",
    "nvmf_get_subsystems", "rpc_get_methods", "spdk_get_version", "framework_get_reactors",
    "save_config", "load_config",
}


def test_every_method(transport_target: tuple[RunningTarget, Call]) -> None:
    t, raw_call = transport_target
    called: set[str] = set()

    def call(method: str, **params: Any) -> Any:
        called.add(method)
        return raw_call(method, **params)

    assert call("spdk_get_version")["version"].startswith("blocktarget v")
    methods = set(call("rpc_get_methods"))
    assert {"bdev_create", "nvmf_get_subsystems", "save_config", "load_config"} <= methods
    [r] = call("framework_get_reactors")["reactors"]
    assert r["lcore"] == 0 and r["tid"] > 0

    # bdevs
    assert call("bdev_create", type="malloc", name="M0", size_mb=1, block_size=4096) == "M0"
    assert call("bdev_create", type="null", name="N0", num_blocks=64) == "N0"
    assert call("bdev_malloc_create", name="M1", num_blocks=128, block_size=512) == "M1"
    assert call("bdev_null_create", name="N1", num_blocks=128, block_size=512) == "N1"
    assert [b["name"] for b in call("bdev_get_bdevs")] == ["M0", "N0", "M1", "N1"]
    [m0] = call("bdev_get_bdevs", name="M0")
    assert (m0["num_blocks"], m0["block_size"]) == (256, 4096)
    stat = call("bdev_get_iostat", name="M0")
    assert stat["bdevs"][0]["num_read_ops"] == 0
    assert code_of(call, "bdev_get_bdevs", name="nope")[0] == -errno.ENODEV
    assert code_of(call, "bdev_create", type="malloc", name="M0", size_mb=1)[0] == -errno.EEXIST

    # transport
    assert call("nvmf_create_transport", trtype="TCP", max_queue_depth=32) is True
    assert call("nvmf_get_transports")[0]["max_queue_depth"] == 32
    assert code_of(call, "nvmf_create_transport", trtype="TCP")[0] == -errno.EEXIST

    # subsystem, namespaces, hosts, listeners
    port = free_port()
    assert call("nvmf_create_subsystem", nqn=NQN, serial_number="SN-RPC") is True
    assert call("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "M0"}) == 1
    assert call("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "N0", "nsid": 4}) == 4
    assert call("nvmf_subsystem_add_host", nqn=NQN, host=HOST) is True
    assert call("nvmf_subsystem_allow_any_host", nqn=NQN, allow_any_host=True) is True
    assert call("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(port))
    assert not port_free(port), "a running target binds a new listener at once"
    [sub] = call("nvmf_get_subsystems", nqn=NQN)
    assert sub["serial_number"] == "SN-RPC" and sub["allow_any_host"] is True
    assert [(n["nsid"], n["bdev_name"]) for n in sub["namespaces"]] == [(1, "M0"), (4, "N0")]
    assert sub["hosts"] == [{"nqn": HOST}]
    assert sub["listen_addresses"] == [
        {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}]
    code, msg = code_of(call, "bdev_delete", name="M0")
    assert code == -errno.EBUSY and msg == f"bdev 'M0' is in use by subsystem {NQN}; " \
                                           "remove that first"
    assert code_of(call, "nvmf_subsystem_add_ns", nqn=NQN,
                   namespace={"bdev_name": "ghost"})[0] == -errno.ENODEV
    assert code_of(call, "nvmf_create_subsystem", nqn=NQN)[0] == -errno.EEXIST

    # the card's compact forms
    s2 = call("subsystem_add", nqn=NQN2, namespaces=[{"bdev_name": "M1"}], hosts=[HOST],
              listeners=[listen_address(port)])
    assert s2["nqn"] == NQN2 and s2["namespaces"][0]["bdev_name"] == "M1"
    assert call("subsystem_get", nqn=NQN2) == s2
    assert [s["nqn"] for s in call("subsystem_get")] == [NQN, NQN2]

    # save and load
    saved = call("save_config")
    assert [s["subsystem"] for s in saved["subsystems"]] == ["bdev", "nvmf"]
    assert call("load_config", subsystems=[{"subsystem": "bdev", "config": [
        {"method": "bdev_null_create", "params": {"name": "Loaded", "num_blocks": 8}}]}]
    )["applied"] == 1
    assert call("bdev_get_bdevs", name="Loaded")[0]["num_blocks"] == 8

    # and take it all apart again
    assert call("nvmf_subsystem_remove_host", nqn=NQN, host=HOST) is True
    assert call("nvmf_subsystem_remove_listener", nqn=NQN, listen_address=listen_address(port))
    assert not port_free(port), "NQN2 still listens there"
    assert call("subsystem_remove", nqn=NQN2) is True
    assert port_free(port), "the last user of the address is gone, so is the socket"
    assert call("nvmf_subsystem_remove_ns", nqn=NQN, nsid=1) is True
    assert call("bdev_delete", name="M0") is True
    assert call("nvmf_delete_subsystem", nqn=NQN) is True
    assert call("bdev_malloc_delete", name="M1") is True
    assert call("bdev_null_delete", name="N0") is True
    assert call("bdev_null_delete", name="N1") is True
    assert call("bdev_delete", name="Loaded") is True
    assert call("bdev_get_bdevs") == []
    assert [s["subtype"] for s in call("nvmf_get_subsystems")] == ["Discovery"]
    assert code_of(call, "nvmf_delete_subsystem", nqn=NQN)[0] == -errno.ENODEV
    code, msg = code_of(call, "nvmf_create_subsystem", nqn="bad nqn")
    assert code == -32602 and "parameter 'nqn'" in msg
    assert code_of(call, "no_such_method")[0] == -32601
    assert t.running()
    assert ISSUE_METHODS <= called, f"not exercised: {sorted(ISSUE_METHODS - called)}"


# ---- Unix socket framing -----------------------------------------------------------------------


def unix_conn(t: RunningTarget) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(t.sock_path)
    return s


def read_values(s: socket.socket, n: int) -> list[Any]:
    """Read exactly n JSON values from the stream (SPDK's client decodes the same way)."""
    dec = json.JSONDecoder()
    buf, out = "", []
    while len(out) < n:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {len(out)} of {n} responses"
        buf += chunk.decode()
        while True:
            buf = buf.lstrip()
            try:
                v, i = dec.raw_decode(buf)
            except ValueError:
                break
            out.append(v)
            buf = buf[i:]
    assert buf.strip() == ""
    return out


def req(method: str, id_: Any = None, **params: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        r["id"] = id_
    if params:
        r["params"] = params
    return r


def test_unix_pipelined_and_notifications(live: RunningTarget) -> None:
    with unix_conn(live) as s:
        data = (json.dumps(req("spdk_get_version", 1))
                + json.dumps(req("bdev_null_create", name="pipe-n", num_blocks=8))  # notification
                + "\n\n" + json.dumps(req("bdev_get_bdevs", 2, name="pipe-n"), indent=2)
                + json.dumps([req("spdk_get_version", 3), req("nope", 4), req("nope")]))
        s.sendall(data.encode())
        r1, r2, r3 = read_values(s, 3)
    assert r1["id"] == 1 and "result" in r1
    assert r2["id"] == 2 and r2["result"][0]["name"] == "pipe-n", "the notification ran first"
    assert [x["id"] for x in r3] == [3, 4] and r3[1]["error"]["code"] == -32601
    live.rpc("bdev_delete", name="pipe-n")


def test_unix_request_split_across_writes(live: RunningTarget) -> None:
    data = json.dumps(req("bdev_get_bdevs", "split", name="nope")).encode()
    with unix_conn(live) as s:
        for i in range(0, len(data), 7):
            s.sendall(data[i:i + 7])
            time.sleep(0.005)
        [r] = read_values(s, 1)
    assert r == {"jsonrpc": "2.0", "id": "split",
                 "error": {"code": -errno.ENODEV, "message": "bdev 'nope' does not exist"}}


def test_unix_parse_error_closes_connection(live: RunningTarget) -> None:
    with unix_conn(live) as s:
        s.sendall(b'{"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1} garbage')
        r1, r2 = read_values(s, 2)
        assert r1["id"] == 1 and "result" in r1
        assert r2["id"] is None and r2["error"]["code"] == -32700
        assert s.recv(100) == b"", "the stream cannot be resynchronised, so it is closed"
    assert live.rpc("spdk_get_version"), "other clients are unaffected"


def test_unix_invalid_request_keeps_connection(live: RunningTarget) -> None:
    with unix_conn(live) as s:
        s.sendall(b'{"id": 5, "method": "spdk_get_version"}[]')
        r1, r2 = read_values(s, 2)
        assert r1 == {"jsonrpc": "2.0", "id": 5,
                      "error": {"code": -32600, "message": "Invalid Request"}}
        assert r2["error"]["code"] == -32600
        s.sendall(json.dumps(req("spdk_get_version", 6)).encode())
        [r3] = read_values(s, 1)
        assert r3["id"] == 6 and "result" in r3


def test_unix_many_clients(live: RunningTarget) -> None:
    conns = [unix_conn(live) for _ in range(20)]
    try:
        for i, c in enumerate(conns):
            c.sendall(json.dumps(req("spdk_get_version", i)).encode())
        for i, c in enumerate(conns):
            assert read_values(c, 1)[0]["id"] == i
    finally:
        for c in conns:
            c.close()


def test_unix_large_batch(live: RunningTarget) -> None:
    batch = [req("bdev_null_create", i, name=f"batch-{i}", num_blocks=8) for i in range(300)]
    with unix_conn(live) as s:
        s.sendall(json.dumps(batch).encode())
        [resp] = read_values(s, 1)
    assert [r["result"] for r in resp] == [f"batch-{i}" for i in range(300)]
    with unix_conn(live) as s:
        s.sendall(json.dumps([req("bdev_delete", name=f"batch-{i}") for i in range(300)]).encode())
        s.sendall(json.dumps(req("bdev_get_bdevs", 1)).encode())
        [r] = read_values(s, 1)
    assert not [b for b in r["result"] if b["name"].startswith("batch-")]


# ---- HTTP ------------------------------------------------------------------------------------------


def test_http_keep_alive_and_paths(live: RunningTarget) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", live.http_port, timeout=10)
    try:
        for i, path in enumerate(["/", "/rpc", "/", "/rpc"]):
            conn.request("POST", path, body=json.dumps(req("spdk_get_version", i)),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and r.getheader("Content-Type").startswith("application/json")
            assert json.loads(r.read())["id"] == i
    finally:
        conn.close()


def test_http_errors(live: RunningTarget) -> None:
    status, body = live.http_post(b'{"jsonrpc": "2.0", "method": ')
    assert status == 200 and json.loads(body)["error"]["code"] == -32700
    status, body = live.http_post(json.dumps(req("spdk_get_version")).encode())
    assert status == 204 and body == b"", "a notification gets no body"
    status, body = live.http_post(json.dumps([req("spdk_get_version", 1), req("x", 2),
                                              req("spdk_get_version")]).encode())
    resp = json.loads(body)
    assert [r["id"] for r in resp] == [1, 2] and resp[1]["error"]["code"] == -32601
    status, body = live.http_post(b"[]")
    assert json.loads(body)["error"]["code"] == -32600
    status, body = live.http_post(json.dumps(req("bdev_get_bdevs", 1, name=5)).encode())
    e = json.loads(body)["error"]
    assert e["code"] == -32602 and "parameter 'name'" in e["message"]
    status, _, _ = live.http_get("/")
    assert status == 405


def test_metrics_endpoint(live: RunningTarget) -> None:
    status, headers, body = live.http_get("/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"# TYPE blocktarget_reactor_busy_seconds_total counter" in body
