"""The JSON-RPC core on hostile input: the Unix-socket stream decoder and the Dispatcher.

-32603 (Internal error) is what the Dispatcher answers when a method raised something
that is not an RpcError, i.e. a bug; every bad request must instead get the precise code
(-32600 invalid request, -32601 unknown method, -32602 bad params, or the method's own
errno-style code). The stream decoder may only raise StreamParseError (a ValueError)
and must return exactly the complete values it was given.

Methods are called with parameters built from their own schemas (right names, random
JSON values and types) so validation and the handlers behind it are both reached.
Methods that reach outside the process with operator-chosen values (files, mounts,
PCI devices, remote targets) are left out: random paths are not hostile input to a
control plane that only operators can reach, and creating them here would litter.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktarget.app import Target
from blocktarget.config import Settings
from blocktarget.errors import INTERNAL_ERROR
from blocktarget.rpc import REGISTRY, StreamParseError, _StreamDecoder, load_methods

load_methods()

# reach outside the process: files, FUSE mounts, VFIO/PCI, remote NVMe/TCP targets
EXTERNAL = {
    "bdev_nvme_attach_controller", "bdev_nvme_attach_controller_pcie",
    "bdev_pmem_create", "bdev_pmem_create_pool", "bdev_pmem_delete_pool",
    "bdev_pmem_get_pool_info", "bdev_uring_create", "fuse_export_start", "fuse_export_stop",
    "load_config", "bdev_create",
}
METHODS = sorted(n for n, m in REGISTRY.by_name.items()
                 if m.name not in EXTERNAL and n not in EXTERNAL)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-5, 4096),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["M0", "Malloc0", "nqn.2026-01.io.test:a", "127.0.0.1", "4420", "tcp",
                     "TCP", "ipv4", "", "0x3", "read", "write", "all", "1", "raid1"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)

SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


class RpcSim:
    """A target that is configured but not started (no sockets), with its own loop."""

    def __init__(self, tmp: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.target = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False,
                                      pin=False))
        # it stands for a serving target: framework_wait_init, which waits for start(),
        # must answer (else it waits forever; test_rpc_methods covers the waiting)
        self.target.ready.set()
        self.tmp = tmp

    def handle(self, request: Any) -> Any:
        return self.loop.run_until_complete(self.target.dispatcher.handle(request))

    def close(self) -> None:
        self.loop.run_until_complete(self.target.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def rpc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RpcSim]:
    tmp = str(tmp_path_factory.mktemp("rpcfuzz"))
    cwd = os.getcwd()
    os.chdir(tmp)  # anything a method might write lands here
    sim = RpcSim(tmp)
    try:
        yield sim
    finally:
        sim.close()
        os.chdir(cwd)


def no_internal_error(resp: Any) -> None:
    for r in resp if isinstance(resp, list) else [resp]:
        if isinstance(r, dict) and "error" in r:
            assert r["error"]["code"] != INTERNAL_ERROR, r["error"]


@st.composite
def schema_params(draw: Any, name: str) -> dict[str, Any]:
    m = REGISTRY.by_name[name]
    params: dict[str, Any] = {}
    for p in m.schema.params:
        if draw(st.integers(0, 4)) == 0:
            continue  # leave it out (required ones too, sometimes)
        if p.choices and draw(st.booleans()):
            params[p.name] = draw(st.sampled_from(list(p.choices)))
        else:
            params[p.name] = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        params[draw(st.text(max_size=10))] = draw(json_values)
    return params


@st.composite
def requests(draw: Any) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(json_values)  # anything at all
    req: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2]))}
    name = draw(st.one_of(st.sampled_from(METHODS), st.text(max_size=20)))
    req["method"] = name if kind != 1 else draw(json_values)
    if name in REGISTRY.by_name and kind > 2:
        req["params"] = draw(schema_params(name))
    elif draw(st.booleans()):
        req["params"] = draw(json_values)
    if draw(st.integers(0, 4)):
        req["id"] = draw(st.one_of(st.integers(-10, 10**6), st.text(max_size=5), json_values))
    return req


@SETTINGS
@given(st.one_of(requests(), st.lists(requests(), max_size=5)))
def test_dispatcher_never_internal_error(rpc: RpcSim, request: Any) -> None:
    resp = rpc.handle(request)
    no_internal_error(resp)
    json.dumps(resp)  # whatever comes back must be serialisable for the wire


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_method_with_schema_shaped_params(rpc: RpcSim, name: str, data: Any) -> None:
    """Every method (not only the ones a random pick happens to reach) gets its own
    parameters with random values."""
    params = data.draw(schema_params(name))
    resp = rpc.handle({"jsonrpc": "2.0", "id": 1, "method": name, "params": params})
    no_internal_error(resp)
    json.dumps(resp)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_stream_decoder_on_random_bytes(data: bytes, step: int) -> None:
    dec = _StreamDecoder()
    try:
        for i in range(0, len(data), step):
            for v in dec.feed(data[i:i + step]):
                assert isinstance(v, dict | list)
    except StreamParseError as exc:
        assert isinstance(exc, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values.filter(lambda v: isinstance(v, dict | list)), min_size=1,
                max_size=5), st.binary(max_size=40), st.integers(1, 30))
def test_stream_decoder_values_then_garbage(values: list[Any], tail: bytes, step: int) -> None:
    """Complete values are returned exactly, whatever follows them and however split;
    the garbage after them may only produce StreamParseError (carrying earlier values)."""
    wire = b" ".join(json.dumps(v).encode() for v in values) + b"\n" + tail
    dec = _StreamDecoder()
    got: list[Any] = []
    try:
        for i in range(0, len(wire), step):
            got.extend(dec.feed(wire[i:i + step]))
    except StreamParseError as exc:
        got.extend(exc.values)
    assert got[:len(values)] == values
