"""Config files: SPDK's JSON config shape plus a "blocktarget" object of process settings.

A config is a list of RPC calls replayed in order, so everything a config can do an
operator can also do by RPC, and `save_config` can write it back. Loading is all or
nothing: the file is parsed, the settings checked, and every call replayed into a target
that is not yet serving anything; the first failure names the file, the entry and the
problem, and the process exits with status 2 before any socket is opened.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import RpcError
from .reactor import parse_cores
from .rpc import REGISTRY, call_method, parse_http_address

if TYPE_CHECKING:
    from .app import Target

DEFAULT_HTTP = "127.0.0.1:9009"
DEFAULT_UNIX = "/var/tmp/blocktarget.sock"
DEFAULT_NQN = "nqn.2026-01.io.blocktarget:default"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Served when `blocktarget start` is given no --config: a 256 MiB RAM disk on loopback.
DEFAULT_CONFIG: dict[str, Any] = {
    "blocktarget": {
        "rpc": {"http": DEFAULT_HTTP, "unix": DEFAULT_UNIX},
        "metrics": True,
        "log_level": "info",
    },
    "subsystems": [
        {
            "subsystem": "bdev",
            "config": [
                {
                    "method": "bdev_malloc_create",
                    "params": {"name": "Malloc0", "num_blocks": 65536, "block_size": 4096},
                }
            ],
        },
        {
            "subsystem": "nvmf",
            "config": [
                {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                {
                    "method": "nvmf_create_subsystem",
                    "params": {"nqn": DEFAULT_NQN, "allow_any_host": True,
                               "serial_number": "BT0000000000000001",
                               "model_number": "blocktarget"},
                },
                {
                    "method": "nvmf_subsystem_add_ns",
                    "params": {"nqn": DEFAULT_NQN, "namespace": {"bdev_name": "Malloc0"}},
                },
                {
                    "method": "nvmf_subsystem_add_listener",
                    "params": {
                        "nqn": DEFAULT_NQN,
                        "listen_address": {"trtype": "tcp", "adrfam": "ipv4",
                                           "traddr": "127.0.0.1", "trsvcid": "4420"},
                    },
                },
            ],
        },
    ],
}


class ConfigError(Exception):
    """A config problem, already worded for the operator (file, entry, what is wrong)."""


@dataclass
class Settings:
    cores: list[int] = field(default_factory=list)
    rpc_http: str | None = DEFAULT_HTTP
    rpc_unix: str | None = DEFAULT_UNIX
    metrics: bool = True
    log_level: str = "info"
    busy_poll_us: int = 200
    idle_poll_us: int = 1000
    pin: bool = True
    raw_cores: Any = None  # as written, for save_config

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "rpc": {"http": self.rpc_http, "unix": self.rpc_unix},
            "metrics": self.metrics,
            "log_level": self.log_level,
        }
        if self.raw_cores is not None:
            d["cores"] = self.raw_cores
        if self.busy_poll_us != 200 or self.idle_poll_us != 1000:
            d["poll"] = {"busy_us": self.busy_poll_us, "idle_us": self.idle_poll_us}
        if not self.pin:
            d["pin"] = False
        return d


@dataclass(frozen=True)
class Entry:
    """One replayable call and where it came from, for error messages."""

    where: str  # "subsystems[1].config[3]"
    method: str
    params: dict[str, Any]


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:  # raised by read(), not by json.loads
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return doc


def parse_settings(doc: dict[str, Any], source: str) -> Settings:
    bt = doc.get("blocktarget", {})
    if not isinstance(bt, dict):
        raise ConfigError(f"{source}: 'blocktarget' must be an object")
    unknown = set(bt) - {"cores", "rpc", "metrics", "log_level", "poll", "pin"}
    if unknown:
        raise ConfigError(f"{source}: blocktarget: unknown setting '{sorted(unknown)[0]}'")
    s = Settings()
    try:
        s.cores = parse_cores(bt.get("cores"))
    except ValueError as exc:
        raise ConfigError(f"{source}: blocktarget.cores: {exc}") from None
    s.raw_cores = bt.get("cores")
    rpc = bt.get("rpc", {})
    if not isinstance(rpc, dict) or set(rpc) - {"http", "unix"}:
        raise ConfigError(f"{source}: blocktarget.rpc must be an object with 'http' and 'unix'")
    if "http" in rpc:
        s.rpc_http = rpc["http"]
        if s.rpc_http is not None:
            if not isinstance(s.rpc_http, str):
                raise ConfigError(f"{source}: blocktarget.rpc.http must be 'HOST:PORT' or null")
            try:
                parse_http_address(s.rpc_http)
            except ValueError as exc:
                raise ConfigError(f"{source}: blocktarget.rpc.http: {exc}") from None
    if "unix" in rpc:
        s.rpc_unix = rpc["unix"]
        if s.rpc_unix is not None and (not isinstance(s.rpc_unix, str) or not s.rpc_unix):
            raise ConfigError(f"{source}: blocktarget.rpc.unix must be a path or null")
    metrics = bt.get("metrics", True)
    if not isinstance(metrics, bool):
        raise ConfigError(f"{source}: blocktarget.metrics must be true or false")
    s.metrics = metrics
    level = bt.get("log_level", "info")
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise ConfigError(f"{source}: blocktarget.log_level must be one of {', '.join(LOG_LEVELS)}")
    s.log_level = level.lower()
    poll = bt.get("poll", {})
    if not isinstance(poll, dict) or set(poll) - {"busy_us", "idle_us"}:
        raise ConfigError(f"{source}: blocktarget.poll must be an object with busy_us, idle_us")
    for key, attr in (("busy_us", "busy_poll_us"), ("idle_us", "idle_poll_us")):
        if key in poll:
            v = poll[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{source}: blocktarget.poll.{key} must be an integer >= 0")
            setattr(s, attr, v)
    pin = bt.get("pin", True)
    if not isinstance(pin, bool):
        raise ConfigError(f"{source}: blocktarget.pin must be true or false")
    s.pin = pin
    return s


def entries(doc: dict[str, Any], source: str) -> Iterator[Entry]:
    """The calls of a config in order, shape-checked; method names are checked on replay."""
    unknown = set(doc) - {"blocktarget", "subsystems"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key '{sorted(unknown)[0]}'")
    subsystems = doc.get("subsystems", [])
    if not isinstance(subsystems, list):
        raise ConfigError(f"{source}: 'subsystems' must be a list")
    for i, sub in enumerate(subsystems):
        where = f"subsystems[{i}]"
        if not isinstance(sub, dict) or not isinstance(sub.get("subsystem"), str):
            raise ConfigError(f"{source}: {where}: must be an object with a 'subsystem' name")
        calls = sub.get("config")
        if calls is None:
            calls = []
        if not isinstance(calls, list):
            raise ConfigError(f"{source}: {where}.config must be a list")
        for j, call in enumerate(calls):
            w = f"{where}.config[{j}]"
            if not isinstance(call, dict) or not isinstance(call.get("method"), str):
                raise ConfigError(f"{source}: {w}: must be an object with a 'method' name")
            params = call.get("params", {})
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise ConfigError(f"{source}: {w} ({call['method']}): 'params' must be an object")
            yield Entry(w, call["method"], params)


async def replay(target: Target, doc: dict[str, Any], source: str) -> int:
    """Apply the calls of a config to a target; returns how many were applied."""
    count = 0
    for entry in list(entries(doc, source)):
        m = REGISTRY.get(entry.method)
        if m is None:
            raise ConfigError(
                f"{source}: {entry.where}: unknown method '{entry.method}'"
            )
        if not m.in_config:
            raise ConfigError(
                f"{source}: {entry.where}: method '{entry.method}' cannot be used in a config"
            )
        try:
            await call_method(target, entry.method, entry.params)
        except RpcError as exc:
            raise ConfigError(f"{source}: {entry.where} ({entry.method}): {exc.message}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: {entry.where} ({entry.method}): {exc}") from None
        count += 1
    logging.getLogger(__name__).debug("%s: replayed %d calls", source, count)
    return count
