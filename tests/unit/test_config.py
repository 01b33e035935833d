"""Config loading: every failure must name the file, the entry and the problem.

The operator's only feedback from a failed `blocktarget start` is one stderr line, so the
message is the contract; each case asserts all three parts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blocktarget.app import Target
from blocktarget.config import (
    DEFAULT_CONFIG,
    DEFAULT_NQN,
    ConfigError,
    Settings,
    parse_settings,
    read_file,
)

GOOD: dict[str, Any] = {
    "blocktarget": {
        "cores": [0],
        "rpc": {"http": "127.0.0.1:9109", "unix": "/tmp/bt-test.sock"},
        "metrics": False,
        "log_level": "WARNING",
        "poll": {"busy_us": 50, "idle_us": 500, "device_wait_us": 0, "adaptive_window": False,
                 "host_wait_us": 200},
        "pin": False,
        "auth_workers": 0,
    },
    "subsystems": [
        {
            "subsystem": "bdev",
            "config": [
                {"method": "bdev_malloc_create",
                 "params": {"name": "Malloc0", "num_blocks": 256, "block_size": 4096}},
                {"method": "bdev_null_create",
                 "params": {"name": "Null0", "num_blocks": 1024, "block_size": 512}},
                {"method": "bdev_wait_for_examine"},
            ],
        },
        {
            "subsystem": "nvmf",
            "config": [
                {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": "nqn.2026-01.io.test:a", "allow_any_host": True}},
                {"method": "nvmf_subsystem_add_ns",
                 "params": {"nqn": "nqn.2026-01.io.test:a",
                            "namespace": {"bdev_name": "Malloc0", "nsid": 3}}},
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": "nqn.2026-01.io.test:a",
                            "listen_address": {"trtype": "tcp", "traddr": "127.0.0.1",
                                               "trsvcid": "4999"}}},
            ],
        },
    ],
}


def write(tmp_path: Path, doc: Any, name: str = "target.json") -> str:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


async def load(path: str) -> Target:
    doc = read_file(path)
    target = Target(parse_settings(doc, path))
    try:
        await target.apply_config(doc, path)
    except BaseException:
        await target.stop()
        raise
    return target


async def fails(tmp_path: Path, doc: Any) -> str:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as ei:
        target = await load(path)
        await target.stop()
    msg = str(ei.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    return msg


def with_call(method: str, params: Any, section: str = "bdev") -> dict[str, Any]:
    """GOOD's calls plus one more at the end of a section (so the index is known)."""
    doc = json.loads(json.dumps(GOOD))
    for sub in doc["subsystems"]:
        if sub["subsystem"] == section:
            sub["config"].append({"method": method, "params": params})
            return doc
    raise AssertionError(section)


async def test_good_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    target = await load(path)
    try:
        s = target.settings
        assert s.cores == [0] and s.rpc_http == "127.0.0.1:9109"
        assert s.rpc_unix == "/tmp/bt-test.sock" and s.metrics is False
        assert s.log_level == "warning"
        assert (s.busy_poll_us, s.idle_poll_us, s.device_wait_us) == (50, 500, 0)
        assert s.adaptive_window is False and not target.reactors[0].adaptive_window
        assert s.host_wait_us == 200 and target.reactors[0].host_wait_us == 200
        assert s.pin is False and s.auth_workers == 0
        assert not target.dh_workers.enabled, "auth_workers 0: DH on the reactors"
        assert [b.name for b in target.bdevs] == ["Malloc0", "Null0"]
        sub = target.subsystems.get("nqn.2026-01.io.test:a")
        assert list(sub.namespaces) == [3]
        assert sub.namespaces[3].bdev is target.bdevs.get("Malloc0")
        assert target.bdevs.get("Malloc0").claimed_by == "subsystem nqn.2026-01.io.test:a"
        assert [str(a) for a in sub.listeners] == ["127.0.0.1:4999"]
        assert "TCP" in target.transports
        assert not target.started, "loading a config starts nothing"
    finally:
        await target.stop()


async def test_settings_defaults() -> None:
    s = parse_settings({}, "x.json")
    assert s == Settings(cores=s.cores)
    assert s.rpc_http == "127.0.0.1:9009" and s.rpc_unix == "/var/tmp/blocktarget.sock"
    assert s.metrics is True and s.log_level == "info"
    s = parse_settings({"blocktarget": {"cores": "0x1", "rpc": {"http": None, "unix": None}}},
                       "x.json")
    assert s.cores == [0] and s.raw_cores == "0x1"
    assert s.rpc_http is None and s.rpc_unix is None, "null disables a server"


async def test_embedded_default_config() -> None:
    """What `blocktarget start` serves without -c: Malloc0 (256 MiB) in the default NQN."""
    target = Target(parse_settings(DEFAULT_CONFIG, "<default>"))
    try:
        assert await target.apply_config(DEFAULT_CONFIG, "<default>") == 5
        m = target.bdevs.get("Malloc0")
        assert m.size_bytes == 256 << 20 and m.module == "malloc"
        sub = target.subsystems.get(DEFAULT_NQN)
        assert sub.allow_any_host and sub.namespaces[1].bdev is m
        assert [a.describe() for a in sub.listeners] == [
            {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}]
        assert target.settings.rpc_http == "127.0.0.1:9009"
        assert target.settings.rpc_unix == "/var/tmp/blocktarget.sock"
    finally:
        await target.stop()


# ---- file-level problems ------------------------------------------------------------------


async def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError) as ei:
        read_file(path)
    assert str(ei.value) == f"{path}: cannot read: No such file or directory"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"subsystems": [}', "invalid JSON at line 1 column 17"),
        ('{\n  "subsystems": [],\n}', "invalid JSON at line 3 column 1"),
        ("", "invalid JSON at line 1 column 1"),
        ("[]", "the top level must be a JSON object"),
    ],
)
async def test_bad_json(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        read_file(path)
    assert str(ei.value).startswith(f"{path}: {problem}")


async def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bin.json"
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_file(str(p))


# ---- entries ------------------------------------------------------------------------------


async def test_unknown_method(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call("bdev_mallok_create", {"name": "X"}))
    assert msg.endswith("subsystems[0].config[3]: unknown method 'bdev_mallok_create'")


async def test_query_method_not_allowed_in_config(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call("bdev_get_bdevs", {}))
    assert "subsystems[0].config[3]: method 'bdev_get_bdevs' cannot be used in a config" in msg


async def test_bad_param_type(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call(
        "bdev_malloc_create", {"name": "M1", "num_blocks": "64", "block_size": 512}))
    assert msg.endswith(
        "subsystems[0].config[3] (bdev_malloc_create): "
        "parameter 'num_blocks' must be integer, got str")


async def test_bad_param_value(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call(
        "bdev_malloc_create", {"name": "M1", "num_blocks": 64, "block_size": 1000}))
    assert "subsystems[0].config[3] (bdev_malloc_create): parameter 'block_size'" in msg


async def test_unknown_param(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call(
        "bdev_null_create", {"name": "N1", "num_blocks": 64, "colour": "blue"}))
    assert msg.endswith("subsystems[0].config[3] (bdev_null_create): unknown parameter 'colour'")


async def test_missing_param(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call("bdev_null_create", {"num_blocks": 64}))
    assert msg.endswith("subsystems[0].config[3] (bdev_null_create): "
                        "missing required parameter 'name'")


async def test_unknown_bdev_referenced(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call(
        "nvmf_subsystem_add_ns",
        {"nqn": "nqn.2026-01.io.test:a", "namespace": {"bdev_name": "Malloc9"}}, "nvmf"))
    assert msg.endswith("subsystems[1].config[4] (nvmf_subsystem_add_ns): "
                        "bdev 'Malloc9' does not exist")


async def test_unknown_subsystem_referenced(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call(
        "nvmf_subsystem_add_host",
        {"nqn": "nqn.2026-01.io.test:zz", "host": "nqn.2026-01.io.test:h"}, "nvmf"))
    assert msg.endswith("subsystems[1].config[4] (nvmf_subsystem_add_host): "
                        "subsystem 'nqn.2026-01.io.test:zz' does not exist")


async def test_duplicate_in_config(tmp_path: Path) -> None:
    msg = await fails(tmp_path, with_call(
        "bdev_malloc_create", {"name": "Malloc0", "num_blocks": 8}))
    assert msg.endswith("subsystems[0].config[3] (bdev_malloc_create): "
                        "bdev 'Malloc0' already exists")


async def test_order_matters(tmp_path: Path) -> None:
    """Replay is in file order: a namespace before its bdev is an unknown bdev."""
    doc = json.loads(json.dumps(GOOD))
    doc["subsystems"].reverse()
    msg = await fails(tmp_path, doc)
    assert "subsystems[0].config[2] (nvmf_subsystem_add_ns): bdev 'Malloc0' does not exist" in msg


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"subsystems": {}}, "'subsystems' must be a list"),
        ({"subsystem": []}, "unknown top-level key 'subsystem'"),
        ({"subsystems": [5]}, "subsystems[0]: must be an object with a 'subsystem' name"),
        ({"subsystems": [{"config": []}]},
         "subsystems[0]: must be an object with a 'subsystem' name"),
        ({"subsystems": [{"subsystem": "bdev", "config": {}}]},
         "subsystems[0].config must be a list"),
        ({"subsystems": [{"subsystem": "bdev", "config": [{"params": {}}]}]},
         "subsystems[0].config[0]: must be an object with a 'method' name"),
        ({"subsystems": [{"subsystem": "bdev", "config": [{"method": 3}]}]},
         "subsystems[0].config[0]: must be an object with a 'method' name"),
        ({"subsystems": [{"subsystem": "bdev",
                          "config": [{"method": "bdev_null_create", "params": []}]}]},
         "subsystems[0].config[0] (bdev_null_create): 'params' must be an object"),
    ],
)
async def test_bad_shape(tmp_path: Path, doc: dict, problem: str) -> None:
    msg = await fails(tmp_path, doc)
    assert msg.endswith(problem), msg


async def test_nothing_half_applied(tmp_path: Path) -> None:
    """A failing entry raises before anything is served; the earlier bdevs are freed."""
    doc = with_call("bdev_null_create", {"name": "N1"})
    path = write(tmp_path, doc)
    target = Target(parse_settings(read_file(path), path))
    with pytest.raises(ConfigError):
        await target.apply_config(read_file(path), path)
    assert not target.started and target.tcp is None
    await target.stop()


# ---- blocktarget settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bt", "problem"),
    [
        ([], "'blocktarget' must be an object"),
        ({"colour": 1}, "blocktarget: unknown setting 'colour'"),
        ({"cores": []}, "blocktarget.cores: cores must be a non-empty list of integers"),
        ({"cores": [1000]}, "blocktarget.cores: cores [1000] are not available"),
        ({"cores": "zz"}, "blocktarget.cores: cannot parse cores 'zz'"),
        ({"cores": 2.5}, "blocktarget.cores: cores must be a list or a hex mask"),
        ({"rpc": "x"}, "blocktarget.rpc must be an object with 'http' and 'unix'"),
        ({"rpc": {"htpp": "x"}}, "blocktarget.rpc must be an object with 'http' and 'unix'"),
        ({"rpc": {"http": 9009}}, "blocktarget.rpc.http must be 'HOST:PORT' or null"),
        ({"rpc": {"http": "localhost"}}, "blocktarget.rpc.http: bad HTTP address"),
        ({"rpc": {"http": "1.2.3.4:70000"}}, "blocktarget.rpc.http: bad HTTP address"),
        ({"rpc": {"unix": ""}}, "blocktarget.rpc.unix must be a path or null"),
        ({"rpc": {"unix": 5}}, "blocktarget.rpc.unix must be a path or null"),
        ({"metrics": "yes"}, "blocktarget.metrics must be true or false"),
        ({"log_level": "verbose"}, "blocktarget.log_level must be one of debug, info"),
        ({"log_level": 3}, "blocktarget.log_level must be one of"),
        ({"poll": {"busy_us": -1}}, "blocktarget.poll.busy_us must be an integer >= 0"),
        ({"poll": {"idle_us": True}}, "blocktarget.poll.idle_us must be an integer >= 0"),
        ({"poll": {"spin": 1}}, "blocktarget.poll must be an object with busy_us, idle_us"),
        ({"poll": {"device_wait_us": -5}}, "blocktarget.poll.device_wait_us must be an integer"),
        ({"poll": {"device_wait_us": 2_000_000}},
         "blocktarget.poll.device_wait_us must be at most 10000"),
        ({"poll": {"adaptive_window": 1}},
         "blocktarget.poll.adaptive_window must be true or false"),
        ({"poll": {"host_wait_us": -1}}, "blocktarget.poll.host_wait_us must be an integer"),
        ({"poll": {"host_wait_us": 501}}, "blocktarget.poll.host_wait_us must be at most 500"),
        ({"pin": 1}, "blocktarget.pin must be true or false"),
        ({"auth_workers": -1}, "blocktarget.auth_workers must be an integer from 0 to 64"),
        ({"auth_workers": "2"}, "blocktarget.auth_workers must be an integer from 0 to 64"),
        ({"auth_workers": True}, "blocktarget.auth_workers must be an integer from 0 to 64"),
    ],
)
def test_bad_settings(bt: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_settings({"blocktarget": bt, "subsystems": []}, "t.json")
    assert str(ei.value).startswith(f"t.json: {problem}"), str(ei.value)


def test_settings_describe_round_trips() -> None:
    s = parse_settings(GOOD, "t.json")
    again = parse_settings({"blocktarget": s.describe()}, "t.json")
    assert again.cores == s.cores and again.rpc_http == s.rpc_http
    assert again.rpc_unix == s.rpc_unix and again.metrics == s.metrics
    assert (again.busy_poll_us, again.idle_poll_us, again.device_wait_us) == (50, 500, 0)
    assert again.adaptive_window is False and again.host_wait_us == 200
    assert "poll" not in parse_settings({}, "t.json").describe()  # (the defaults: none)
    assert again.pin is False and again.log_level == "warning"
    assert again.auth_workers == 0
    assert "auth_workers" not in parse_settings({}, "t.json").describe()  # null: automatic
