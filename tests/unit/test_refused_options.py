"""SPDK options that change security or durability and that blocktarget does not serve are
refused, never accepted and dropped (issue 17, item 0): a namespace asked to be hidden
must not be visible to every host, reservations asked to persist must not be volatile.
secure_channel and psk are served (TLS, tests/integration/test_tls.py); what remains of
them here is that they are refused when they cannot be served as asked.

Each option is refused with JSON-RPC -32602 naming it, through the dispatcher as the HTTP
and Unix servers call it; the same option in a config file fails the load (the process
then exits 2, see tests/integration/test_process.py). The "off" value SPDK's clients and
SPDK's own save_config send (false, 0, "match_any") still loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_config import load, with_call, write
from test_rpc_methods import HOST, NQN, NQN2, call, free_port, listen_address, ok, with_subsystem
from test_rpc_methods import target as target  # noqa: F401  (fixture)

from blocktarget.config import ConfigError
from blocktarget.errors import InvalidParams
from blocktarget.params import Param, Schema, validate

INVALID = -32602


async def refused(t: Any, method: str, params: dict[str, Any], name: str) -> str:
    resp = await call(t, method, params)
    assert "result" not in resp, (method, params, resp)
    assert resp["error"]["code"] == INVALID, resp
    msg = resp["error"]["message"]
    assert f"parameter '{name}'" in msg and "not supported" in msg, msg
    return msg


# (method, params needing the subsystem of with_subsystem, refused name, bad value, off value)
# (no_auto_visible was refused here until namespace masking came: test_ns_masking.py)
CASES: list[tuple[str, dict[str, Any], str, Any, Any]] = [
    ("bdev_malloc_create", {"name": "MX", "num_blocks": 64, "block_size": 512},
     "dif_type", 1, 0),
    ("bdev_null_create", {"name": "NX", "num_blocks": 64, "block_size": 512}, "dif_type", 1, 0),
    ("nvmf_create_transport", {"trtype": "TCP"}, "dif_insert_or_strip", True, False),
]


@pytest.mark.parametrize(("method", "base", "name", "bad", "off"), CASES,
                         ids=[f"{c[0]}.{c[2]}" for c in CASES])
async def test_refused_at_run_time(target: Any, method: str, base: dict[str, Any], name: str,
                                   bad: Any, off: Any) -> None:
    await with_subsystem(target)
    await ok(target, "bdev_malloc_create", name="M1", num_blocks=64, block_size=512)
    params = json.loads(json.dumps(base))
    if params.get("listen_address") == "PORT":
        params["listen_address"] = listen_address(free_port())
    msg = await refused(target, method, dict(params, **{name: bad}), name)
    assert str(bad) not in msg or name == "dif_type", "no key name or material echoed"
    # The refusal left nothing behind: the same call with the option off succeeds.
    await ok(target, method, **dict(params, **{name: off}))


async def test_refused_inside_namespace_object(target: Any) -> None:
    """SPDK nests most namespace options in `namespace`; ptpl_file asks for reservations
    persisted across power loss, which this target has not: refused, not dropped."""
    await with_subsystem(target)
    await ok(target, "bdev_malloc_create", name="M1", num_blocks=64, block_size=512)
    for name, value in (("ptpl_file", "/tmp/ptpl.json"),):
        await refused(target, "nvmf_subsystem_add_ns",
                      {"nqn": NQN, "namespace": {"bdev_name": "M1", name: value}}, name)
    assert [n["nsid"] for n in (await ok(target, "nvmf_get_subsystems", nqn=NQN))[0]
            ["namespaces"]] == [1], "no namespace was added by a refused call"


async def test_secure_and_plain_never_share_an_address(target: Any) -> None:
    """One socket serves every subsystem on an address: a secure request on a plain
    address (or the reverse) is refused, not half-served, and nothing is recorded."""
    await with_subsystem(target)
    await ok(target, "nvmf_create_subsystem", nqn=NQN2, allow_any_host=True)
    plain, secure = listen_address(free_port()), listen_address(free_port())
    await ok(target, "nvmf_subsystem_add_listener", nqn=NQN, listen_address=plain)
    await ok(target, "nvmf_subsystem_add_listener", nqn=NQN, listen_address=secure,
             sock_impl="ssl")  # SPDK's TLS socket: the same as secure_channel
    for addr, secure_channel in ((plain, True), (secure, False)):
        resp = await call(target, "nvmf_subsystem_add_listener", {
            "nqn": NQN2, "listen_address": addr, "secure_channel": secure_channel})
        assert resp["error"]["code"] == INVALID, resp
        assert "one address is either secure or plain" in resp["error"]["message"]
    assert (await ok(target, "nvmf_get_subsystems", nqn=NQN2))[0]["listen_addresses"] == []
    got = await ok(target, "nvmf_subsystem_get_listeners", nqn=NQN)
    assert [li["secure_channel"] for li in got] == [False, True]


async def test_psk_must_be_a_tls_key(target: Any, tmp_path: Path) -> None:
    await with_subsystem(target)
    resp = await call(target, "nvmf_subsystem_add_host", {"nqn": NQN, "host": HOST,
                                                          "psk": "nokey"})
    assert resp["error"]["code"] == -19  # ENODEV, as for a missing DH-HMAC-CHAP key
    assert resp["error"]["message"] == "key 'nokey' does not exist"
    p = tmp_path / "dhchap"
    p.write_text("DHHC-1:00:" + "A" * 43 + "=:")
    p.chmod(0o600)
    await ok(target, "keyring_file_add_key", name="dh", path=str(p))
    resp = await call(target, "nvmf_subsystem_add_host", {"nqn": NQN, "host": HOST, "psk": "dh"})
    msg = resp["error"]["message"]
    assert resp["error"]["code"] == INVALID and "not a TLS PSK" in msg and "AAAA" not in msg
    assert (await ok(target, "nvmf_get_subsystems", nqn=NQN))[0]["hosts"] == []


async def test_discovery_filter(target: Any) -> None:
    """Only SPDK's default (every allowed host sees every entry) is served."""
    await ok(target, "nvmf_set_config", discovery_filter="match_any")
    resp = await call(target, "nvmf_set_config", {"discovery_filter": "transport,address"})
    assert resp["error"]["code"] == INVALID and "discovery_filter" in resp["error"]["message"]


async def test_remote_bdev_protection_checks_refused(target: Any) -> None:
    """prchk_* ask the initiator to verify protection information: not implemented."""
    base = {"name": "R0", "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "9",
            "subnqn": NQN}
    for name in ("prchk_reftag", "prchk_guard"):
        await refused(target, "bdev_nvme_attach_controller", dict(base, **{name: True}), name)
    await refused(target, "bdev_nvme_attach_controller", dict(base, psk="key0"), "psk")


@pytest.mark.parametrize("name", ["ptpl_file", "discovery_filter"])
async def test_refused_in_config_file(tmp_path: Path, name: str) -> None:
    if name == "ptpl_file":
        doc = with_call("nvmf_subsystem_add_ns", {
            "nqn": "nqn.2026-01.io.test:a",
            "namespace": {"bdev_name": "Null0", "ptpl_file": "/tmp/p.json"}}, "nvmf")
        entry = "subsystems[1].config[4] (nvmf_subsystem_add_ns)"
        want = "parameter 'ptpl_file' is not supported"
    else:
        doc = with_call("nvmf_set_config", {"discovery_filter": "address"}, "nvmf")
        entry = "subsystems[1].config[4] (nvmf_set_config)"
        want = "parameter 'discovery_filter' must be one of"
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as ei:
        t = await load(path)
        await t.stop()
    assert str(ei.value).startswith(f"{path}: {entry}: {want}"), str(ei.value)


def test_schema_refused_semantics() -> None:
    schema = Schema((Param("a", int),), refused={"x": "why"})
    for off in (False, 0, "", None):
        assert validate(schema, {"a": 1, "x": off}) == {"a": 1}
    with pytest.raises(InvalidParams, match=r"parameter 'x' is not supported: why"):
        validate(schema, {"x": True})
    extra = Schema((), allow_extra=True, refused={"x": "why"})
    assert validate(extra, {"y": 2, "x": False}) == {"y": 2}
