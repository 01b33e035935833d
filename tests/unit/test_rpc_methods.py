"""Every RPC method's success and error paths, through the JSON-RPC core.

Requests go through `rpc.Dispatcher.handle` exactly as the HTTP and Unix servers hand them
over, so the codes asserted here are what clients see. SPDK's clients branch on the codes
(-19 no such device, -17 exists, -16 busy, -32602 bad params), hence exact values.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from blocktarget.app import Target
from blocktarget.bdev import BdevIO, IOType
from blocktarget.config import Settings
from blocktarget.rpc import REGISTRY, Dispatcher, http_handler

ENODEV, EEXIST, EBUSY = -errno.ENODEV, -errno.EEXIST, -errno.EBUSY
NQN = "nqn.2026-01.io.test:one"
NQN2 = "nqn.2026-01.io.test:two"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
_ids = itertools.count(1)


def settings(**kw: Any) -> Settings:
    return Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False, **kw)


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target(settings())
    yield t
    await t.stop()


@pytest.fixture
async def started() -> AsyncIterator[Target]:
    t = Target(settings())
    await t.start()
    yield t
    await t.stop()


async def raw(t: Target, request: Any) -> Any:
    return await t.dispatcher.handle(request)


async def call(t: Target, method: str, params: Any = None) -> dict[str, Any]:
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": next(_ids), "method": method}
    if params is not None:
        req["params"] = params
    resp = await raw(t, req)
    assert resp["jsonrpc"] == "2.0" and resp["id"] == req["id"]
    return resp


async def ok(t: Target, method: str, **params: Any) -> Any:
    resp = await call(t, method, params or None)
    assert "error" not in resp, resp
    return resp["result"]


async def err(t: Target, method: str, params: Any = None) -> tuple[int, str]:
    resp = await call(t, method, params)
    assert "result" not in resp, resp
    e = resp["error"]
    assert e["code"] != -32603, f"user error reported as internal: {e}"
    return e["code"], e["message"]


async def with_subsystem(t: Target, bdev: str | None = "M0") -> None:
    if bdev:
        await ok(t, "bdev_malloc_create", name=bdev, num_blocks=64, block_size=512)
    await ok(t, "nvmf_create_subsystem", nqn=NQN, allow_any_host=False)
    if bdev:
        await ok(t, "nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": bdev})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def listen_address(port: int | str) -> dict[str, str]:
    return {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}


# ---- JSON-RPC protocol ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "echoed_id"),
    [
        (5, None),
        ("x", None),
        (None, None),
        ({"method": "spdk_get_version", "id": 1}, 1),  # no jsonrpc
        ({"jsonrpc": "1.0", "method": "spdk_get_version", "id": 1}, 1),
        ({"jsonrpc": "2.0", "method": 5, "id": 1}, 1),
        ({"jsonrpc": "2.0", "id": 1}, 1),
        ({"jsonrpc": "2.0", "method": "spdk_get_version", "params": "x", "id": 1}, 1),
        ({"jsonrpc": "2.0", "method": "spdk_get_version", "params": 3, "id": 1}, 1),
        # an id that is not a valid id is not echoed
        ({"jsonrpc": "2.0", "method": "spdk_get_version", "id": {"a": 1}}, None),
        ({"jsonrpc": "2.0", "method": "spdk_get_version", "id": [1]}, None),
        ({"jsonrpc": "2.0", "method": "spdk_get_version", "id": True}, None),
    ],
)
async def test_invalid_request(target: Target, request_: Any, echoed_id: int | None) -> None:
    resp = await raw(target, request_)
    assert resp["error"]["code"] == -32600
    assert resp["jsonrpc"] == "2.0"
    assert resp["id"] is echoed_id or (type(resp["id"]) is int and resp["id"] == echoed_id)


async def test_invalid_request_echoes_valid_id(target: Target) -> None:
    resp = await raw(target, {"jsonrpc": "1.0", "method": "x", "id": "abc"})
    assert resp == {"jsonrpc": "2.0", "id": "abc",
                    "error": {"code": -32600, "message": "Invalid Request"}}


async def test_method_not_found(target: Target) -> None:
    resp = await raw(target, {"jsonrpc": "2.0", "method": "no_such", "id": 7})
    assert resp["id"] == 7 and resp["error"]["code"] == -32601
    assert "no_such" in resp["error"]["message"]


async def test_positional_params_rejected(target: Target) -> None:
    resp = await raw(target, {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "params": [1],
                              "id": 1})
    assert resp["error"]["code"] == -32602


@pytest.mark.parametrize("id_", [0, -1, "s", None, 1.5, 2**40])
async def test_ids_echoed(target: Target, id_: Any) -> None:
    resp = await raw(target, {"jsonrpc": "2.0", "method": "spdk_get_version", "id": id_})
    assert resp["id"] == id_ and "result" in resp


async def test_params_null_and_empty(target: Target) -> None:
    for params in (None, {}):
        resp = await raw(target, {"jsonrpc": "2.0", "method": "bdev_get_bdevs",
                                  "params": params, "id": 1})
        assert resp["result"] == []


async def test_notifications_return_nothing_but_act(target: Target) -> None:
    assert await raw(target, {"jsonrpc": "2.0", "method": "bdev_null_create",
                              "params": {"name": "N", "num_blocks": 8}}) is None
    assert target.bdevs.get("N").num_blocks == 8
    # an error in a notification is not reported either
    assert await raw(target, {"jsonrpc": "2.0", "method": "no_such"}) is None
    assert await raw(target, {"jsonrpc": "2.0", "method": "bdev_null_create",
                              "params": {"name": "N", "num_blocks": 8}}) is None
    assert await raw(target, {"jsonrpc": "2.0", "method": "bdev_get_bdevs",
                              "params": [1]}) is None


async def test_batch(target: Target) -> None:
    resp = await raw(target, [
        {"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8},
         "id": 1},
        {"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "N2", "num_blocks": 8}},
        {"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8},
         "id": 2},
        {"jsonrpc": "2.0", "method": "nope", "id": 3},
        5,
        {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 4},
    ])
    assert [r["id"] for r in resp] == [1, 2, 3, None, 4]
    assert resp[0]["result"] == "N"
    assert resp[1]["error"]["code"] == EEXIST
    assert resp[2]["error"]["code"] == -32601
    assert resp[3]["error"]["code"] == -32600
    assert [b["name"] for b in resp[4]["result"]] == ["N", "N2"], "in order, notification ran"


async def test_batch_edge_cases(target: Target) -> None:
    assert (await raw(target, []))["error"]["code"] == -32600
    # a batch of notifications only: nothing at all comes back
    assert await raw(target, [{"jsonrpc": "2.0", "method": "spdk_get_version"}] * 2) is None


async def test_dispatcher_counts(target: Target) -> None:
    d = Dispatcher(target)
    await d.handle({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1})
    await d.handle({"jsonrpc": "2.0", "method": "nope", "id": 2})
    await d.handle([{"jsonrpc": "2.0", "method": "nope", "id": 3}, 1])
    assert (d.calls, d.errors) == (4, 3)


async def test_internal_error_only_for_bugs(target: Target, monkeypatch) -> None:
    """-32603 is kept for real bugs: it must still be well-formed and not leak a traceback."""
    def broken(t: Target, p: dict) -> None:
        raise RuntimeError("bug")

    m = REGISTRY.get("spdk_get_version")
    assert m is not None
    monkeypatch.setitem(REGISTRY.by_name, "spdk_get_version", replace(m, fn=broken))
    resp = await raw(target, {"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1})
    assert resp["error"]["code"] == -32603
    assert resp["error"]["message"] == "Internal error: RuntimeError: bug"


async def test_http_parse_error_and_notification() -> None:
    """The HTTP handler maps a body that is not JSON to -32700 and notifications to 204."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    t = Target(settings())
    app = web.Application()
    app.router.add_post("/", http_handler(t.dispatcher))
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/", data=b'{"jsonrpc": "2.0", "method"')
        body = await r.json()
        assert r.status == 200 and body["error"]["code"] == -32700 and body["id"] is None
        r = await client.post("/", data=b"\xff\xfe")
        assert (await r.json())["error"]["code"] == -32700
        r = await client.post("/", json={"jsonrpc": "2.0", "method": "spdk_get_version"})
        assert r.status == 204 and await r.read() == b""
        r = await client.post("/", json=[{"jsonrpc": "2.0", "method": "spdk_get_version",
                                          "id": 9}])
        assert (await r.json())[0]["id"] == 9
    await t.stop()


# ---- -32603 never for user errors --------------------------------------------------------------

_WRONG = [None, 0, -1, 2**70, 1.5, True, "", "x", "nqn.2026-01.io.test:one", [], [1], {},
          {"a": 1}, {"bdev_name": 5}, {"traddr": []}, {"trsvcid": [1], "traddr": "127.0.0.1"}]


async def test_no_internal_error_for_any_bad_param(target: Target) -> None:
    """Every method, every declared parameter, values of every JSON type: never -32603."""
    await with_subsystem(target)
    methods = sorted(set(REGISTRY.methods) - {"load_config"}) + ["load_config"]
    for name in methods:
        m = REGISTRY.methods[name]
        for p in m.schema.params:
            for value in _WRONG:
                resp = await call(target, name, {p.name: value})
                if "error" in resp:
                    assert resp["error"]["code"] != -32603, (name, p.name, value, resp)
                base = {q.name: "nqn.2026-01.io.test:one" if q.name == "nqn" else "M0"
                        for q in m.schema.params if q.required}
                resp = await call(target, name, {**base, p.name: value})
                if "error" in resp:
                    assert resp["error"]["code"] != -32603, (name, p.name, value, resp)


# ---- bdevs ----------------------------------------------------------------------------------------


async def test_bdev_create_generic(target: Target) -> None:
    assert await ok(target, "bdev_create", type="malloc", name="M1", size_mb=1,
                    block_size=4096) == "M1"
    assert await ok(target, "bdev_create", type="null", name="N1", num_blocks=100) == "N1"
    u = "6b1c1b54-0a3c-4bd4-9a2b-000000000001"
    assert await ok(target, "bdev_create", type="null", name="N2", num_blocks=8, uuid=u) == "N2"
    bdevs = {b["name"]: b for b in await ok(target, "bdev_get_bdevs")}
    assert (bdevs["M1"]["num_blocks"], bdevs["M1"]["block_size"]) == (256, 4096)
    assert bdevs["M1"]["product_name"] == "Malloc disk"
    assert (bdevs["N1"]["num_blocks"], bdevs["N1"]["block_size"]) == (100, 512)
    assert bdevs["N2"]["uuid"] == u


@pytest.mark.parametrize(
    ("params", "code", "fragment"),
    [
        ({"name": "X", "size_mb": 1}, -32602, "missing required parameter 'type'"),
        ({"type": "floppy", "name": "X", "size_mb": 1}, -32602, "parameter 'type' 'floppy'"),
        ({"type": 5, "name": "X"}, -32602, "parameter 'type' must be string"),
        ({"type": "malloc", "size_mb": 1}, -32602, "missing required parameter 'name'"),
        ({"type": "malloc", "name": "X"}, -32602, "'num_blocks' (or 'size_mb')"),
        ({"type": "malloc", "name": "X", "size_mb": 1, "num_blocks": 8}, -32602,
         "either 'num_blocks' or 'size_mb'"),
        ({"type": "malloc", "name": "X", "size_mb": 0}, -32602, "parameter 'size_mb' must be"),
        ({"type": "malloc", "name": "X", "size_mb": 1, "block_size": 1000}, -32602,
         "parameter 'block_size'"),
        ({"type": "malloc", "name": "X", "size_mb": 1, "sise": 1}, -32602,
         "unknown parameter 'sise'"),
        ({"type": "null", "name": "X", "num_blocks": 8, "uuid": "u"}, -32602,
         "parameter 'uuid' is not a valid UUID"),
        ({"type": "null", "name": "", "num_blocks": 8}, -32602, "parameter 'name' must not be"),
        ({"type": "null", "name": "X", "num_blocks": 2**64}, -32602,
         "parameter 'num_blocks' is too large"),
        ({"type": "malloc", "name": "X", "num_blocks": 2**62}, -errno.ENOMEM,
         "cannot allocate 2361183241434822606848 bytes for malloc bdev 'X'"),
    ],
)
async def test_bdev_create_errors(target: Target, params: dict, code: int, fragment: str) -> None:
    c, msg = await err(target, "bdev_create", params)
    assert c == code and fragment in msg, msg
    assert len(target.bdevs) == 0


async def test_bdev_create_duplicate(target: Target) -> None:
    await ok(target, "bdev_create", type="null", name="N", num_blocks=8)
    c, msg = await err(target, "bdev_create", {"type": "malloc", "name": "N", "num_blocks": 8})
    assert c == EEXIST and "'N' already exists" in msg
    c, _ = await err(target, "bdev_null_create", {"name": "N", "num_blocks": 8})
    assert c == EEXIST
    assert target.bdevs.get("N").module == "null"


async def test_spdk_bdev_methods(target: Target) -> None:
    # the params SPDK's rpc.py sends
    assert await ok(target, "bdev_malloc_create", name="Malloc0", num_blocks=2048,
                    block_size=512, optimal_io_boundary=0, md_interleave=False) == "Malloc0"
    assert await ok(target, "bdev_null_create", name="Null0", num_blocks=2048, block_size=512,
                    md_size=0) == "Null0"
    c, msg = await err(target, "bdev_malloc_delete", {"name": "Null0"})
    assert c == ENODEV and "null bdev, not malloc" in msg
    c, _ = await err(target, "bdev_null_delete", {"name": "Malloc0"})
    assert c == ENODEV
    assert await ok(target, "bdev_malloc_delete", name="Malloc0") is True
    assert await ok(target, "bdev_null_delete", name="Null0") is True
    assert await ok(target, "bdev_get_bdevs") == []
    for m in ("bdev_malloc_delete", "bdev_null_delete", "bdev_delete"):
        c, msg = await err(target, m, {"name": "Malloc0"})
        assert c == ENODEV and "bdev 'Malloc0' does not exist" == msg
        c, msg = await err(target, m, {})
        assert c == -32602 and msg == "missing required parameter 'name'"


async def test_bdev_delete_claimed_is_busy(target: Target) -> None:
    await with_subsystem(target)
    for m in ("bdev_delete", "bdev_malloc_delete"):
        c, msg = await err(target, m, {"name": "M0"})
        assert c == EBUSY
        assert msg == f"bdev 'M0' is in use by subsystem {NQN}; remove that first"
    [b] = await ok(target, "bdev_get_bdevs", name="M0")
    assert b["claimed"] is True and b["claimed_by"] == f"subsystem {NQN}"
    assert await ok(target, "nvmf_subsystem_remove_ns", nqn=NQN, nsid=1) is True
    assert await ok(target, "bdev_delete", name="M0") is True
    assert "M0" not in target.bdevs


async def test_delete_subsystem_releases_bdevs(target: Target) -> None:
    await with_subsystem(target)
    assert await ok(target, "nvmf_delete_subsystem", nqn=NQN) is True
    assert await ok(target, "bdev_malloc_delete", name="M0") is True


async def test_bdev_get_bdevs(target: Target) -> None:
    await ok(target, "bdev_null_create", name="N", num_blocks=8)
    [b] = await ok(target, "bdev_get_bdevs", name="N", timeout=0)
    assert b["name"] == "N" and b["claimed"] is False
    assert await ok(target, "bdev_get_bdevs", name=b["uuid"]) == [b], "a uuid names a bdev"
    c, msg = await err(target, "bdev_get_bdevs", {"name": "nope"})
    assert c == ENODEV and msg == "bdev 'nope' does not exist"
    c, msg = await err(target, "bdev_get_bdevs", {"name": 5})
    assert c == -32602 and "parameter 'name'" in msg


async def test_bdev_get_iostat(target: Target) -> None:
    await ok(target, "bdev_malloc_create", name="M", num_blocks=64, block_size=4096)
    bdev = target.bdevs.get("M")
    ch = bdev.get_io_channel(target.reactors[0])
    for t, n in ((IOType.WRITE, 2), (IOType.READ, 3), (IOType.READ, 1), (IOType.UNMAP, 4),
                 (IOType.FLUSH, 0)):
        ch.submit(BdevIO(t, 0, n, bytes(n * 4096) if t == IOType.WRITE else None))
    ch.submit(BdevIO(IOType.READ, 100, 1))  # out of range
    st = await ok(target, "bdev_get_iostat", name="M")
    assert st["tick_rate"] == 1_000_000_000
    [e] = st["bdevs"]
    assert e["name"] == "M"
    assert (e["num_read_ops"], e["bytes_read"]) == (2, 4 * 4096)
    assert (e["num_write_ops"], e["bytes_written"]) == (1, 2 * 4096)
    assert (e["num_unmap_ops"], e["bytes_unmapped"]) == (1, 4 * 4096)
    assert e["num_flush_ops"] == 1
    assert e["read_latency_ticks"] > 0 and e["write_latency_ticks"] > 0
    assert e["io_error"] == {"read": 1}
    per = await ok(target, "bdev_get_iostat", name="M", per_channel=True)
    assert per["bdevs"][0]["channels"] == [
        {"reactor": 0, "num_read_ops": 2, "num_write_ops": 1, "bytes_read": 4 * 4096,
         "bytes_written": 2 * 4096}]
    all_ = await ok(target, "bdev_get_iostat")
    assert [b["name"] for b in all_["bdevs"]] == ["M"]
    c, _ = await err(target, "bdev_get_iostat", {"name": "nope"})
    assert c == ENODEV


async def test_bdev_delete_on_started_target_closes_reactor_channels(started: Target) -> None:
    await ok(started, "bdev_malloc_create", name="M", num_blocks=8)
    bdev = started.bdevs.get("M")
    reactor = started.reactors[0]

    def do_io(r: Any) -> int:
        done: list[BdevIO] = []
        bdev.get_io_channel(r).submit(BdevIO(IOType.READ, 0, 1, None, done.append))
        return done[0].status

    assert await reactor.call(do_io, reactor) == 0
    assert len(reactor.owned["channel"]) == 1
    [r] = (await ok(started, "framework_get_reactors"))["reactors"]
    assert r["channels"] == ["M"], "a reactor reports the channels it owns"
    assert await ok(started, "bdev_delete", name="M") is True
    assert bdev.channels == {} and not reactor.owned["channel"]
    assert bdev.retired.ops[IOType.READ] == 1


# ---- transports -------------------------------------------------------------------------------------


async def test_transports(target: Target) -> None:
    assert await ok(target, "nvmf_get_transports") == []
    # SPDK's rpc.py sends flags for every transport type; they must be accepted
    assert await ok(target, "nvmf_create_transport", trtype="TCP", max_queue_depth=64,
                    c2h_success=True, no_srq=False, zcopy=False, dif_insert_or_strip=False,
                    no_wr_batching=False, disable_mappable_bar0=False,
                    disable_adaptive_irq=False, disable_shadow_doorbells=False,
                    disable_command_passthru=False) is True
    [t] = await ok(target, "nvmf_get_transports")
    assert t["trtype"] == "TCP" and t["max_queue_depth"] == 64
    assert await ok(target, "nvmf_get_transports", trtype="tcp") == [t]
    c, msg = await err(target, "nvmf_create_transport", {"trtype": "tcp"})
    assert c == EEXIST and "TCP already exists" in msg
    c, msg = await err(target, "nvmf_get_transports", {"trtype": "RDMA"})
    assert c == ENODEV


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"trtype": "RDMA"}, "parameter 'trtype' 'RDMA'"),
        ({"trtype": "TCP", "max_queue_depth": 1}, "parameter 'max_queue_depth'"),
        ({"trtype": "TCP", "max_queue_depth": 0}, "parameter 'max_queue_depth'"),
        ({"trtype": "TCP", "in_capsule_data_size": 17}, "parameter 'in_capsule_data_size'"),
        ({"trtype": "TCP", "max_io_size": 5000}, "parameter 'max_io_size'"),
        ({"trtype": "TCP", "max_aq_depth": 5000}, "parameter 'max_aq_depth'"),
        ({"trtype": "TCP", "io_unit_size": 100}, "parameter 'io_unit_size'"),
        ({"trtype": "TCP", "bogus": 1}, "unknown parameter 'bogus'"),
    ],
)
async def test_transport_errors(target: Target, params: dict, fragment: str) -> None:
    c, msg = await err(target, "nvmf_create_transport", params)
    assert c == -32602 and fragment in msg, msg
    assert target.transports == {}


# ---- subsystems ---------------------------------------------------------------------------------------


async def test_create_get_delete_subsystem(target: Target) -> None:
    assert await ok(target, "nvmf_create_subsystem", nqn=NQN, serial_number="SN123",
                    model_number="Model X", allow_any_host=True, max_namespaces=4,
                    ana_reporting=True, min_cntlid=10, max_cntlid=20, passthrough=False,
                    enable_nssr=False) is True
    subs = await ok(target, "nvmf_get_subsystems")
    assert [s["nqn"] for s in subs] == ["nqn.2014-08.org.nvmexpress.discovery", NQN]
    assert subs[0]["subtype"] == "Discovery"
    s = subs[1]
    assert s == {
        "nqn": NQN, "subtype": "NVMe", "listen_addresses": [], "allow_any_host": True,
        "hosts": [], "serial_number": "SN123", "model_number": "Model X",
        "max_namespaces": 4, "min_cntlid": 10, "max_cntlid": 20, "ana_reporting": True,
        "namespaces": [],
    }
    assert await ok(target, "nvmf_get_subsystems", nqn=NQN) == [s]
    assert await ok(target, "subsystem_get", nqn=NQN) == s
    assert await ok(target, "subsystem_get") == [s]
    c, msg = await err(target, "nvmf_create_subsystem", {"nqn": NQN})
    assert c == EEXIST and msg == f"subsystem '{NQN}' already exists"
    assert await ok(target, "nvmf_delete_subsystem", nqn=NQN) is True
    for m in ("nvmf_delete_subsystem", "subsystem_remove", "subsystem_get"):
        c, msg = await err(target, m, {"nqn": NQN})
        assert c == ENODEV and msg == f"subsystem '{NQN}' does not exist"
    c, _ = await err(target, "nvmf_get_subsystems", {"nqn": NQN})
    assert c == ENODEV


@pytest.mark.parametrize(
    ("params", "code", "fragment"),
    [
        ({}, -32602, "missing required parameter 'nqn'"),
        ({"nqn": "not-an-nqn"}, -32602, "parameter 'nqn' is not a valid NQN"),
        ({"nqn": "nqn.2026-01.io.x:" + "a" * 300}, -32602, "parameter 'nqn' is longer than"),
        ({"nqn": "nqn.2014-08.org.nvmexpress.discovery"}, EEXIST, "already exists"),
        ({"nqn": NQN, "serial_number": "x" * 21}, -32602, "parameter 'serial_number' must be at"),
        ({"nqn": NQN, "model_number": "caf\u00e9"}, -32602, "parameter 'model_number' must be"),
        ({"nqn": NQN, "min_cntlid": 5, "max_cntlid": 4}, -32602, "'min_cntlid'/'max_cntlid'"),
        ({"nqn": NQN, "min_cntlid": 0}, -32602, "'min_cntlid'/'max_cntlid'"),
        ({"nqn": NQN, "max_cntlid": 0xFFF0}, -32602, "'min_cntlid'/'max_cntlid'"),
        ({"nqn": NQN, "max_namespaces": 0}, -32602, "parameter 'max_namespaces' must be"),
        ({"nqn": NQN, "allow_any_host": "yes"}, -32602, "parameter 'allow_any_host' must be"),
    ],
)
async def test_create_subsystem_errors(target: Target, params: dict, code: int,
                                       fragment: str) -> None:
    c, msg = await err(target, "nvmf_create_subsystem", params)
    assert c == code and fragment in msg, msg
    assert len(target.subsystems) == 0


async def test_discovery_subsystem_is_read_only(target: Target) -> None:
    d = "nqn.2014-08.org.nvmexpress.discovery"
    c, msg = await err(target, "nvmf_delete_subsystem", {"nqn": d})
    assert c == -32602 and "discovery" in msg
    c, _ = await err(target, "nvmf_subsystem_add_host", {"nqn": d, "host": HOST})
    assert c == -32602


# ---- namespaces ------------------------------------------------------------------------------------------


async def test_namespaces(target: Target) -> None:
    for n in ("A", "B", "C"):
        await ok(target, "bdev_malloc_create", name=n, num_blocks=8)
    await ok(target, "nvmf_create_subsystem", nqn=NQN, max_namespaces=8)
    assert await ok(target, "nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "A"}) == 1
    u = "0ea1c6f0-2b65-4d49-9f2a-8c0c6b7d3a11"
    ng = "00112233445566778899AABBCCDDEEFF"
    assert await ok(target, "nvmf_subsystem_add_ns", nqn=NQN, namespace={
        "bdev_name": "B", "nsid": 5, "uuid": u, "nguid": ng, "eui64": "0011223344556677",
        "no_auto_visible": False}) == 5
    assert await ok(target, "nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "C"}) == 2
    [s] = await ok(target, "nvmf_get_subsystems", nqn=NQN)
    a = target.bdevs.get("A")
    assert s["namespaces"] == [
        {"nsid": 1, "bdev_name": "A", "name": "A", "uuid": a.uuid,
         "nguid": a.uuid.replace("-", "").upper(), "anagrpid": 1},
        {"nsid": 2, "bdev_name": "C", "name": "C", "uuid": target.bdevs.get("C").uuid,
         "nguid": target.bdevs.get("C").uuid.replace("-", "").upper(), "anagrpid": 2},
        {"nsid": 5, "bdev_name": "B", "name": "B", "uuid": u, "nguid": ng, "anagrpid": 5,
         "eui64": "0011223344556677"},
    ]
    assert await ok(target, "nvmf_subsystem_remove_ns", nqn=NQN, nsid=5) is True
    assert target.bdevs.get("B").claimed_by is None
    c, msg = await err(target, "nvmf_subsystem_remove_ns", {"nqn": NQN, "nsid": 5})
    assert c == ENODEV and msg == f"nsid 5 does not exist in subsystem '{NQN}'"


async def test_namespace_errors(target: Target) -> None:
    await with_subsystem(target)
    await ok(target, "bdev_malloc_create", name="M1", num_blocks=8)
    await ok(target, "nvmf_create_subsystem", nqn=NQN2, max_namespaces=2)
    cases = [
        ({"nqn": NQN, "namespace": {"bdev_name": "nope"}}, ENODEV, "bdev 'nope' does not exist"),
        ({"nqn": NQN2 + "x", "namespace": {"bdev_name": "M1"}}, ENODEV, "does not exist"),
        ({"nqn": NQN, "namespace": {"bdev_name": "M1", "nsid": 1}}, EEXIST,
         f"nsid 1 already exists in subsystem '{NQN}'"),
        ({"nqn": NQN2, "namespace": {"bdev_name": "M0"}}, EEXIST,
         f"bdev 'M0' is already nsid 1 of '{NQN}'"),
        ({"nqn": NQN2, "namespace": {"bdev_name": "M1", "nsid": 3}}, -32602,
         "parameter 'nsid' 3 is out of range 1..2"),
        ({"nqn": NQN2, "namespace": {"bdev_name": "M1", "nsid": -1}}, -32602, "'nsid'"),
        ({"nqn": NQN2, "namespace": {"bdev_name": "M1", "uuid": "zz"}}, -32602, "'uuid'"),
        ({"nqn": NQN2, "namespace": {"bdev_name": "M1", "nguid": "00"}}, -32602,
         "parameter 'nguid' must be 32 hex digits"),
        ({"nqn": NQN2, "namespace": {"bdev_name": "M1", "eui64": "xyz"}}, -32602,
         "parameter 'eui64' must be 16 hex digits"),
        ({"nqn": NQN2, "namespace": {}}, -32602, "missing required parameter 'bdev_name'"),
        ({"nqn": NQN2, "namespace": {"bdev_name": "M1", "colour": 1}}, -32602,
         "unknown parameter 'colour'"),
        ({"nqn": NQN2}, -32602, "missing required parameter 'namespace'"),
        ({"nqn": NQN2, "namespace": "M1"}, -32602, "parameter 'namespace' must be object"),
    ]
    for params, code, fragment in cases:
        c, msg = await err(target, "nvmf_subsystem_add_ns", params)
        assert c == code and fragment in msg, (params, msg)
    assert target.subsystems.get(NQN2).namespaces == {}
    assert target.bdevs.get("M1").claimed_by is None, "a failed add leaves no claim behind"


async def test_subsystem_full(target: Target) -> None:
    await ok(target, "nvmf_create_subsystem", nqn=NQN, max_namespaces=1)
    await ok(target, "bdev_null_create", name="A", num_blocks=8)
    await ok(target, "bdev_null_create", name="B", num_blocks=8)
    await ok(target, "nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "A"})
    c, msg = await err(target, "nvmf_subsystem_add_ns", {"nqn": NQN,
                                                        "namespace": {"bdev_name": "B"}})
    assert c == -32602 and "out of range 1..1" in msg
    assert target.bdevs.get("B").claimed_by is None


# ---- hosts ----------------------------------------------------------------------------------------------------


async def test_hosts(target: Target) -> None:
    await with_subsystem(target, bdev=None)
    assert await ok(target, "nvmf_subsystem_add_host", nqn=NQN, host=HOST) is True
    c, msg = await err(target, "nvmf_subsystem_add_host", {"nqn": NQN, "host": HOST})
    assert c == EEXIST and "already allowed" in msg
    c, msg = await err(target, "nvmf_subsystem_add_host", {"nqn": NQN, "host": "bad host"})
    assert c == -32602 and "parameter 'host' is not a valid NQN" in msg
    c, _ = await err(target, "nvmf_subsystem_add_host", {"nqn": NQN2, "host": HOST})
    assert c == ENODEV
    [s] = await ok(target, "nvmf_get_subsystems", nqn=NQN)
    assert s["hosts"] == [{"nqn": HOST}] and s["allow_any_host"] is False
    assert target.subsystems.get(NQN).host_allowed(HOST)
    assert not target.subsystems.get(NQN).host_allowed(HOST[:-1] + "6")

    assert await ok(target, "nvmf_subsystem_allow_any_host", nqn=NQN, allow_any_host=True)
    assert (await ok(target, "nvmf_get_subsystems", nqn=NQN))[0]["allow_any_host"] is True
    assert target.subsystems.get(NQN).host_allowed(HOST[:-1] + "6")
    assert await ok(target, "nvmf_subsystem_allow_any_host", nqn=NQN, allow_any_host=False)
    assert (await ok(target, "nvmf_get_subsystems", nqn=NQN))[0]["allow_any_host"] is False
    c, msg = await err(target, "nvmf_subsystem_allow_any_host", {"nqn": NQN})
    assert c == -32602 and msg == "missing required parameter 'allow_any_host'"

    assert await ok(target, "nvmf_subsystem_remove_host", nqn=NQN, host=HOST) is True
    c, msg = await err(target, "nvmf_subsystem_remove_host", {"nqn": NQN, "host": HOST})
    assert c == ENODEV and msg == f"host '{HOST}' is not in '{NQN}'"
    assert (await ok(target, "nvmf_get_subsystems", nqn=NQN))[0]["hosts"] == []


# ---- listeners ----------------------------------------------------------------------------------------------


async def test_listeners_config_time(target: Target) -> None:
    """Before start, a listener is recorded (and a TCP transport implied), nothing binds."""
    await with_subsystem(target, bdev=None)
    port = free_port()
    assert await ok(target, "nvmf_subsystem_add_listener", nqn=NQN,
                    listen_address=listen_address(port), secure_channel=False) is True
    assert "TCP" in target.transports
    assert port_bindable(port)
    subs = await ok(target, "nvmf_get_subsystems")
    assert subs[1]["listen_addresses"] == [
        {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}]
    assert subs[0]["listen_addresses"] == subs[1]["listen_addresses"], (
        "the discovery subsystem is reachable on every listener")
    c, msg = await err(target, "nvmf_subsystem_add_listener",
                       {"nqn": NQN, "listen_address": listen_address(port)})
    assert c == EEXIST and "already exists" in msg
    assert await ok(target, "nvmf_subsystem_remove_listener", nqn=NQN,
                    listen_address=listen_address(port)) is True
    c, msg = await err(target, "nvmf_subsystem_remove_listener",
                       {"nqn": NQN, "listen_address": listen_address(port)})
    assert c == ENODEV and "does not exist" in msg


@pytest.mark.parametrize(
    ("addr", "fragment"),
    [
        ({"trtype": "rdma", "traddr": "127.0.0.1", "trsvcid": "4420"}, "parameter 'trtype'"),
        ({"trtype": "tcp", "trsvcid": "4420"}, "missing required parameter 'traddr'"),
        ({"trtype": "tcp", "traddr": "localhost", "trsvcid": "4420"},
         "parameter 'traddr' 'localhost' is not an IP address"),
        ({"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "http"}, "parameter 'trsvcid'"),
        ({"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "70000"}, "parameter 'trsvcid'"),
        ({"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "0"}, "parameter 'trsvcid'"),
        ({"trtype": "tcp", "traddr": "127.0.0.1", "adrfam": "ipv6", "trsvcid": "1"},
         "parameter 'adrfam'"),
    ],
)
async def test_listener_errors(target: Target, addr: dict, fragment: str) -> None:
    await with_subsystem(target, bdev=None)
    c, msg = await err(target, "nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": addr})
    assert c == -32602 and fragment in msg, msg
    assert target.subsystems.get(NQN).listeners == []


async def test_listener_ipv6_normalised(target: Target) -> None:
    await with_subsystem(target, bdev=None)
    await ok(target, "nvmf_subsystem_add_listener", nqn=NQN, listen_address={
        "trtype": "TCP", "traddr": "0:0::1", "trsvcid": "4420"})
    [li] = (await ok(target, "nvmf_get_subsystems", nqn=NQN))[0]["listen_addresses"]
    assert li == {"trtype": "TCP", "adrfam": "IPv6", "traddr": "::1", "trsvcid": "4420"}


async def test_listeners_bind_when_started(started: Target) -> None:
    await with_subsystem(started, bdev=None)
    await ok(started, "nvmf_create_subsystem", nqn=NQN2)
    port = free_port()
    la = listen_address(port)
    await ok(started, "nvmf_subsystem_add_listener", nqn=NQN, listen_address=la)
    assert not port_bindable(port), "a running target binds the listener at once"
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    # the socket is shared: a second subsystem on the same address
    await ok(started, "nvmf_subsystem_add_listener", nqn=NQN2, listen_address=la)
    await ok(started, "nvmf_subsystem_remove_listener", nqn=NQN, listen_address=la)
    assert not port_bindable(port), "still used by the other subsystem"
    await ok(started, "nvmf_delete_subsystem", nqn=NQN2)
    assert port_bindable(port), "closed once no subsystem lists the address"


async def test_listener_address_in_use(started: Target) -> None:
    await with_subsystem(started, bdev=None)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        c, msg = await err(started, "nvmf_subsystem_add_listener",
                           {"nqn": NQN, "listen_address": listen_address(port)})
    assert msg == f"cannot listen on 127.0.0.1:{port}: address already in use"
    assert c == -errno.EADDRINUSE
    assert started.subsystems.get(NQN).listeners == []


# ---- the card's compact forms ------------------------------------------------------------------------------------


async def test_subsystem_add_everything(target: Target) -> None:
    await ok(target, "bdev_create", type="malloc", name="M0", size_mb=1)
    await ok(target, "bdev_create", type="null", name="N0", size_mb=1)
    port = free_port()
    s = await ok(target, "subsystem_add", nqn=NQN, serial_number="S1", hosts=[HOST],
                 namespaces=[{"bdev_name": "M0"}, {"bdev_name": "N0", "nsid": 7}],
                 listeners=[{"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": str(port)}])
    assert s["nqn"] == NQN and s["serial_number"] == "S1" and s["allow_any_host"] is False
    assert s["hosts"] == [{"nqn": HOST}]
    assert [(n["nsid"], n["bdev_name"]) for n in s["namespaces"]] == [(1, "M0"), (7, "N0")]
    assert [a["trsvcid"] for a in s["listen_addresses"]] == [str(port)]
    assert await ok(target, "subsystem_get", nqn=NQN) == s
    c, _ = await err(target, "subsystem_add", {"nqn": NQN})
    assert c == EEXIST
    assert await ok(target, "subsystem_remove", nqn=NQN) is True
    assert await ok(target, "subsystem_get") == []
    assert target.bdevs.get("M0").claimed_by is None


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        ({"hosts": ["bad"]}, -32602, "parameter 'hosts[0]' is not a valid host NQN"),
        ({"hosts": [5]}, -32602, "parameter 'hosts[0]'"),
        ({"namespaces": ["M0"]}, -32602, "parameter 'namespaces[0]' must be an object"),
        ({"namespaces": [{"bdev_name": "M0"}, {"nsid": 2}]}, -32602,
         "namespaces[1]: missing required parameter 'bdev_name'"),
        ({"namespaces": [{"bdev_name": "nope"}]}, ENODEV, "bdev 'nope' does not exist"),
        ({"listeners": [{"traddr": "nowhere"}]}, -32602, "listeners[0]: parameter 'traddr'"),
        ({"listeners": ["x"]}, -32602, "listeners[0]"),
        # detected only while adding: must still leave no subsystem behind
        ({"namespaces": [{"bdev_name": "M0"}, {"bdev_name": "M0"}]}, EEXIST,
         "bdev 'M0' is already nsid 1"),
        ({"namespaces": [{"bdev_name": "M0", "nsid": 99}]}, -32602, "'nsid' 99 is out of range"),
        ({"hosts": [HOST, HOST]}, EEXIST, "already allowed"),
    ],
)
async def test_subsystem_add_is_all_or_nothing(target: Target, extra: dict, code: int,
                                               fragment: str) -> None:
    await ok(target, "bdev_malloc_create", name="M0", num_blocks=8)
    c, msg = await err(target, "subsystem_add", {"nqn": NQN, **extra})
    assert c == code and fragment in msg, msg
    assert target.subsystems.find(NQN) is None
    assert target.bdevs.get("M0").claimed_by is None


# ---- framework -----------------------------------------------------------------------------------------------------

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


async def test_rpc_get_methods(target: Target) -> None:
    names = await ok(target, "rpc_get_methods")
    assert ISSUE_METHODS <= set(names) and names == sorted(names)
    assert set(await ok(target, "rpc_get_methods", include_aliases=False)) >= ISSUE_METHODS
    # SPDK's load_config asks for current=True
    assert await ok(target, "rpc_get_methods", current=True) == names
    docs = {d["name"]: d for d in await ok(target, "rpc_get_method_docs")}
    assert ISSUE_METHODS <= set(docs)
    assert all(docs[n]["description"] for n in ISSUE_METHODS), "every method documents itself"


async def test_spdk_get_version(target: Target) -> None:
    v = await ok(target, "spdk_get_version")
    assert v["version"].startswith("blocktarget v")
    assert set(v["fields"]) == {"major", "minor", "patch", "suffix"}
    assert isinstance(v["fields"]["major"], int)


async def test_framework_get_reactors_started(started: Target) -> None:
    import os

    r = await ok(started, "framework_get_reactors")
    assert r["pid"] == os.getpid() and r["tick_rate"] == 1_000_000_000
    [re_] = r["reactors"]
    assert re_["lcore"] == 0 and re_["tid"] == started.reactors[0].tid != 0
    assert re_["busy"] >= 0 and re_["idle"] >= 0
    assert re_["connections"] == [] and re_["channels"] == []


async def test_framework_get_reactors_not_started(target: Target) -> None:
    r = await ok(target, "framework_get_reactors")
    assert [x["tid"] for x in r["reactors"]] == [0]


async def test_save_config_shape(target: Target) -> None:
    await with_subsystem(target)
    await ok(target, "nvmf_subsystem_add_host", nqn=NQN, host=HOST)
    await ok(target, "nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(4999))
    cfg = await ok(target, "save_config")
    assert set(cfg) == {"blocktarget", "subsystems"}
    assert [s["subsystem"] for s in cfg["subsystems"]] == ["bdev", "nvmf"]
    bdev_calls, nvmf_calls = (s["config"] for s in cfg["subsystems"])
    assert [c["method"] for c in bdev_calls] == ["bdev_malloc_create"]
    assert [c["method"] for c in nvmf_calls] == [
        "nvmf_create_transport", "nvmf_create_subsystem", "nvmf_subsystem_add_ns",
        "nvmf_subsystem_add_host", "nvmf_subsystem_add_listener"]
    # SPDK's client-side save_config asks for the same thing in two steps
    subs = await ok(target, "framework_get_subsystems")
    assert subs == [{"subsystem": "bdev", "depends_on": []},
                    {"subsystem": "nvmf", "depends_on": ["bdev"]}]
    assert await ok(target, "framework_get_config", name="bdev") == bdev_calls
    assert await ok(target, "framework_get_config", name="nvmf") == nvmf_calls
    c, msg = await err(target, "framework_get_config", {"name": "iscsi"})
    assert c == -32602 and "iscsi" in msg


async def test_load_config_applies(target: Target) -> None:
    cfg = {"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "N"}}}]},
    ]}
    r = await ok(target, "load_config", **cfg)
    assert r["applied"] == 3
    assert target.subsystems.get(NQN).namespaces[1].bdev is target.bdevs.get("N")


async def test_load_config_all_or_nothing(target: Target) -> None:
    await ok(target, "bdev_null_create", name="Existing", num_blocks=8)
    cfg = {"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_null_create", "params": {"name": "N1", "num_blocks": 8}},
        {"method": "bdev_null_create", "params": {"name": "Existing", "num_blocks": 8}},
    ]}]}
    c, msg = await err(target, "load_config", cfg)
    assert c == -32602
    assert "load_config: subsystems[0].config[1] (bdev_null_create): " \
           "bdev 'Existing' already exists" in msg
    assert [b.name for b in target.bdevs] == ["Existing"], "N1 must not have been created"
    c, msg = await err(target, "load_config", {"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "nope"}]}]})
    assert c == -32602 and "unknown method 'nope'" in msg
    c, msg = await err(target, "load_config", {})
    assert c == -32602 and "missing required parameter 'subsystems'" in msg


async def test_wait_methods(target: Target) -> None:
    """framework_wait_init answers only once the config's listeners accept: a call made
    before start() waits, and when it returns a host can connect to every listener."""
    port = free_port()
    await ok(target, "bdev_null_create", name="N", num_blocks=8)
    await ok(target, "nvmf_create_subsystem", nqn=NQN, allow_any_host=True)
    await ok(target, "nvmf_subsystem_add_listener", nqn=NQN, listen_address={
        "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)})
    seen: list[bool] = []

    async def wait_then_connect() -> Any:
        result = await ok(target, "framework_wait_init")
        try:  # at the moment it returns, the listener must already accept
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            seen.append(True)
        except OSError:
            seen.append(False)
        return result

    waiter = asyncio.create_task(wait_then_connect())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiter.done(), "framework_wait_init returned before the target started"
    await target.start()
    assert await asyncio.wait_for(waiter, 5) is True
    assert seen == [True]
    assert await ok(target, "framework_wait_init") is True, "and at once when ready"
    assert await ok(target, "bdev_wait_for_examine") is True


async def test_concurrent_requests_do_not_interfere(target: Target) -> None:
    """The dispatcher may be entered by many connections at once."""
    names = [f"N{i}" for i in range(50)]
    results = await asyncio.gather(*(ok(target, "bdev_null_create", name=n, num_blocks=8)
                                     for n in names))
    assert results == names and len(target.bdevs) == 50
