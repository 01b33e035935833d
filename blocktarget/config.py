"""Config files: SPDK's JSON config shape plus a "blocktarget" object of process settings.

A config is a list of RPC calls replayed in order, so everything a config can do an
operator can also do by RPC, and `save_config` can write it back. Loading is all or
nothing: the file is parsed, the settings checked, and every call replayed into a target
that is not yet serving anything; the first failure names the file, the entry and the
problem, and the process exits with status 2 before any socket is opened.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
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
# Control-plane bounds (issue 8): one JSON-RPC request is a few KiB in practice; a whole
# load_config stays far below 1 MiB. Connections: operators' scripts, not thousands.
DEFAULT_RPC_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_RPC_MAX_CONNECTIONS = 64
# A request begun must be whole within this; idle clients stay until their slot is
# needed unless an idle timeout is set (rpc_guard.py says why).
DEFAULT_RPC_REQUEST_TIMEOUT_SEC = 30
DEFAULT_RPC_IDLE_TIMEOUT_SEC = 0
MIN_TOKEN_CHARS = 16  # a bearer token shorter than this is guessable: refused
_HTTP_KEYS = {"address", "token", "token_file", "tls_cert", "tls_key", "tls_client_ca"}
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


MAX_DEVICE_WAIT_US = 10_000
# (nvme/netpoll.BUDGET_NS: a host wait ends with the C poller's call, within its budget)
MAX_HOST_WAIT_US = 500


@dataclass
class Settings:
    cores: list[int] = field(default_factory=list)
    rpc_http: str | None = DEFAULT_HTTP
    rpc_unix: str | None = DEFAULT_UNIX
    metrics: bool = True
    log_level: str = "info"
    busy_poll_us: int = 200
    idle_poll_us: int = 1000
    # the C poller's sleep slices while only NVMe device I/O is outstanding (0: spin)
    device_wait_us: int = 10
    # the busy-poll window follows the host's pace (reactor.Reactor.adaptive_window)
    adaptive_window: bool = True
    # the C poller sleeps for the host's next command (reactor.Reactor.host_wait_us)
    host_wait_us: int = 500
    # socket polling per reactor: "event" | "adaptive" | "busy", or a list with one mode
    # per reactor; None = reactor.DEFAULT_POLL_MODE (see reactor.py for what each costs)
    poll_mode: Any = None
    pin: bool = True
    raw_cores: Any = None  # as written, for save_config
    # None: paths.DEFAULT_ALLOWED_DIRS (see paths.py for why)
    allowed_dirs: list[str] | None = None
    rpc_token: str | None = field(default=None, repr=False)  # never logged or saved
    rpc_token_file: str | None = None
    rpc_tls_cert: str | None = None
    rpc_tls_key: str | None = None
    rpc_tls_client_ca: str | None = None
    rpc_max_request_bytes: int = DEFAULT_RPC_MAX_REQUEST_BYTES
    rpc_max_connections: int = DEFAULT_RPC_MAX_CONNECTIONS
    rpc_request_timeout_sec: int = DEFAULT_RPC_REQUEST_TIMEOUT_SEC
    rpc_idle_timeout_sec: int = DEFAULT_RPC_IDLE_TIMEOUT_SEC
    # DH-HMAC-CHAP worker processes (nvme/dh_workers.py); None = automatic, 0 = none:
    # the exponentiations then run on the reactors and stall their I/O
    auth_workers: int | None = None

    def describe(self) -> dict[str, Any]:
        http: Any = self.rpc_http
        extra = {k: v for k, v in (("token_file", self.rpc_token_file),
                                   ("tls_cert", self.rpc_tls_cert),
                                   ("tls_key", self.rpc_tls_key),
                                   ("tls_client_ca", self.rpc_tls_client_ca)) if v}
        if http is not None and extra:
            # an inline token is left out on purpose: save_config output travels over
            # RPC and into files; a saved non-loopback config then refuses to start
            # until the operator gives it a token_file, which is the safe failure
            http = {"address": http, **extra}
        rpc: dict[str, Any] = {"http": http, "unix": self.rpc_unix}
        if self.rpc_max_request_bytes != DEFAULT_RPC_MAX_REQUEST_BYTES:
            rpc["max_request_bytes"] = self.rpc_max_request_bytes
        if self.rpc_max_connections != DEFAULT_RPC_MAX_CONNECTIONS:
            rpc["max_connections"] = self.rpc_max_connections
        if self.rpc_request_timeout_sec != DEFAULT_RPC_REQUEST_TIMEOUT_SEC:
            rpc["request_timeout_sec"] = self.rpc_request_timeout_sec
        if self.rpc_idle_timeout_sec != DEFAULT_RPC_IDLE_TIMEOUT_SEC:
            rpc["idle_timeout_sec"] = self.rpc_idle_timeout_sec
        d: dict[str, Any] = {
            "rpc": rpc,
            "metrics": self.metrics,
            "log_level": self.log_level,
        }
        if self.raw_cores is not None:
            d["cores"] = self.raw_cores
        if self.busy_poll_us != 200 or self.idle_poll_us != 1000:
            d["poll"] = {"busy_us": self.busy_poll_us, "idle_us": self.idle_poll_us}
        if self.device_wait_us != 10:
            d.setdefault("poll", {})["device_wait_us"] = self.device_wait_us
        if not self.adaptive_window:
            d.setdefault("poll", {})["adaptive_window"] = False
        if self.host_wait_us != 500:
            d.setdefault("poll", {})["host_wait_us"] = self.host_wait_us
        if self.poll_mode is not None:
            d.setdefault("poll", {})["mode"] = self.poll_mode
        if not self.pin:
            d["pin"] = False
        if self.allowed_dirs is not None:
            d["allowed_dirs"] = list(self.allowed_dirs)
        if self.auth_workers is not None:
            d["auth_workers"] = self.auth_workers
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


def _parse_poll_mode(mode: Any, n_reactors: int, source: str) -> Any:
    """One mode for every reactor, or a list with one per reactor (in cores order)."""
    from .reactor import check_poll_mode

    modes = mode if isinstance(mode, list) else [mode]
    if isinstance(mode, list) and len(mode) != n_reactors:
        raise ConfigError(f"{source}: blocktarget.poll.mode lists {len(mode)} modes for "
                          f"{n_reactors} reactors")
    for m in modes:
        try:
            check_poll_mode(m)
        except ValueError as exc:
            raise ConfigError(f"{source}: blocktarget.poll.mode: {exc}") from None
    return mode


def parse_settings(doc: dict[str, Any], source: str) -> Settings:
    bt = doc.get("blocktarget", {})
    if not isinstance(bt, dict):
        raise ConfigError(f"{source}: 'blocktarget' must be an object")
    unknown = set(bt) - {"cores", "rpc", "metrics", "log_level", "poll", "pin", "allowed_dirs",
                         "auth_workers"}
    if unknown:
        raise ConfigError(f"{source}: blocktarget: unknown setting '{sorted(unknown)[0]}'")
    s = Settings()
    try:
        s.cores = parse_cores(bt.get("cores"))
    except ValueError as exc:
        raise ConfigError(f"{source}: blocktarget.cores: {exc}") from None
    s.raw_cores = bt.get("cores")
    rpc = bt.get("rpc", {})
    if not isinstance(rpc, dict) or set(rpc) - {"http", "unix", "max_request_bytes",
                                                "max_connections", "request_timeout_sec",
                                                "idle_timeout_sec"}:
        raise ConfigError(f"{source}: blocktarget.rpc must be an object with 'http' and 'unix' "
                          "(and optionally 'max_request_bytes', 'max_connections', "
                          "'request_timeout_sec', 'idle_timeout_sec')")
    for key, attr, low in (("max_request_bytes", "rpc_max_request_bytes", 1024),
                           ("max_connections", "rpc_max_connections", 1),
                           ("request_timeout_sec", "rpc_request_timeout_sec", 1),
                           ("idle_timeout_sec", "rpc_idle_timeout_sec", 0)):
        if key in rpc:
            v = rpc[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{source}: blocktarget.rpc.{key} must be an integer >= {low}")
            setattr(s, attr, v)
    if "http" in rpc:
        http = rpc["http"]
        if isinstance(http, dict):
            _parse_http_object(s, http, source)
            http = http.get("address")
        s.rpc_http = http
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
    if not isinstance(poll, dict) or set(poll) - {"busy_us", "idle_us", "mode",
                                                  "device_wait_us", "adaptive_window",
                                                  "host_wait_us"}:
        raise ConfigError(f"{source}: blocktarget.poll must be an object with busy_us, "
                          "idle_us, mode, device_wait_us, adaptive_window, host_wait_us")
    if "adaptive_window" in poll:
        if not isinstance(poll["adaptive_window"], bool):
            raise ConfigError(f"{source}: blocktarget.poll.adaptive_window must be true "
                              "or false")
        s.adaptive_window = poll["adaptive_window"]
    if "mode" in poll:
        s.poll_mode = _parse_poll_mode(poll["mode"], len(s.cores), source)
    for key, attr in (("busy_us", "busy_poll_us"), ("idle_us", "idle_poll_us"),
                      ("device_wait_us", "device_wait_us"),
                      ("host_wait_us", "host_wait_us")):
        if key in poll:
            v = poll[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{source}: blocktarget.poll.{key} must be an integer >= 0")
            setattr(s, attr, v)
    if s.device_wait_us > MAX_DEVICE_WAIT_US:
        raise ConfigError(f"{source}: blocktarget.poll.device_wait_us must be at most "
                          f"{MAX_DEVICE_WAIT_US} (a slice longer than that is no polling)")
    if s.host_wait_us > MAX_HOST_WAIT_US:
        raise ConfigError(f"{source}: blocktarget.poll.host_wait_us must be at most "
                          f"{MAX_HOST_WAIT_US} (the C poller's call, in which it waits, lasts no longer)")
    pin = bt.get("pin", True)
    if not isinstance(pin, bool):
        raise ConfigError(f"{source}: blocktarget.pin must be true or false")
    s.pin = pin
    if bt.get("allowed_dirs") is not None:  # null: the default (paths.py)
        dirs = bt["allowed_dirs"]
        if not isinstance(dirs, list) or not all(isinstance(d, str) and d for d in dirs):
            raise ConfigError(f"{source}: blocktarget.allowed_dirs must be a list of "
                              "directory paths")
        s.allowed_dirs = list(dirs)
    workers = bt.get("auth_workers")
    if workers is not None:  # null: automatic (dh_workers.default_workers)
        if not isinstance(workers, int) or isinstance(workers, bool) or not 0 <= workers <= 64:
            raise ConfigError(f"{source}: blocktarget.auth_workers must be an integer "
                              "from 0 to 64, or null")
        s.auth_workers = workers
    return s


def _parse_http_object(s: Settings, http: dict[str, Any], source: str) -> None:
    """`"http": {"address": ..., "token" | "token_file": ..., "tls_*": ...}`."""
    where = f"{source}: blocktarget.rpc.http"
    unknown = set(http) - _HTTP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown setting '{sorted(unknown)[0]}' "
                          f"(known: {', '.join(sorted(_HTTP_KEYS))})")
    if not isinstance(http.get("address"), str):
        raise ConfigError(f"{where}.address must be 'HOST:PORT'")
    for key in _HTTP_KEYS - {"address"}:
        v = http.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"{where}.{key} must be a non-empty string")
    if http.get("token") and http.get("token_file"):
        raise ConfigError(f"{where}: give 'token' or 'token_file', not both")
    s.rpc_token = http.get("token")
    s.rpc_token_file = http.get("token_file")
    s.rpc_tls_cert = http.get("tls_cert")
    s.rpc_tls_key = http.get("tls_key")
    s.rpc_tls_client_ca = http.get("tls_client_ca")
    if bool(s.rpc_tls_cert) != bool(s.rpc_tls_key):
        raise ConfigError(f"{where}: tls_cert and tls_key go together")
    if s.rpc_tls_client_ca and not s.rpc_tls_cert:
        raise ConfigError(f"{where}: tls_client_ca needs tls_cert and tls_key")


def is_loopback_host(host: str) -> bool:
    """Only literal loopback addresses and "localhost" count: any other name may resolve
    to an interface reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_rpc_access(s: Settings, source: str) -> None:
    """Read the token file and refuse an HTTP server others can reach without a lock.

    Called once the command line has had its say (it may move the HTTP address), before
    anything is bound. A non-loopback address needs a bearer token or TLS with client
    certificates; a token is checked on every request wherever the server listens."""
    if s.rpc_token_file:
        try:
            with open(s.rpc_token_file, encoding="utf-8") as f:
                token = f.read().strip()
                st = os.fstat(f.fileno())
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"{source}: blocktarget.rpc.http.token_file "
                              f"{s.rpc_token_file}: cannot read: {why}") from None
        if st.st_mode & 0o077:
            logging.getLogger(__name__).warning(
                "RPC token file %s is readable by other users (mode %o): chmod 600 it",
                s.rpc_token_file, st.st_mode & 0o777)
        s.rpc_token = token
    if s.rpc_token is not None and len(s.rpc_token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{source}: blocktarget.rpc.http: the bearer token must be at least "
                          f"{MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)")
    if s.rpc_http is None:
        return
    host, _ = parse_http_address(s.rpc_http)
    if is_loopback_host(host):
        return
    if s.rpc_token or (s.rpc_tls_cert and s.rpc_tls_client_ca):
        return
    raise ConfigError(
        f"{source}: refusing to serve HTTP RPC on non-loopback address {s.rpc_http} without "
        "authentication: set blocktarget.rpc.http.token_file (or token), or tls_cert + "
        "tls_key + tls_client_ca for client certificates; or bind 127.0.0.1")


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
