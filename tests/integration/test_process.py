"""The `blocktarget` process as operators meet it: start, dry run, signals, ports, pinning.

Each test starts a real process on private addresses (see target_proc.py) and checks what
an operator can observe: exit status, the one stderr line, sockets in the filesystem and
in the kernel, thread affinity in /proc.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from blocktarget import __version__
from blocktarget.cli import build_parser
from blocktarget.config import DEFAULT_NQN

from .target_proc import (
    Launcher,
    config,
    free_port,
    listen_address,
    malloc,
    port_free,
    run_cli,
)

AVAILABLE = sorted(os.sched_getaffinity(0))
NQN = "nqn.2026-01.io.test:proc"


def subsystem_with_listener(port: int, bdev: str = "M0") -> list[dict]:
    return [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                                                       "namespace": {"bdev_name": bdev}}},
        {"method": "nvmf_subsystem_add_listener",
         "params": {"nqn": NQN, "listen_address": listen_address(port)}},
    ]


def task_affinity(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def affinity_text(cores: list[int]) -> str:
    """The kernel's list form for a set of cores ('0-1', '0,2')."""
    out, run = [], [cores[0]]
    for c in cores[1:]:
        if c == run[-1] + 1:
            run.append(c)
        else:
            out.append(run)
            run = [c]
    out.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)


# ---- CLI basics ------------------------------------------------------------------------------


def test_version() -> None:
    r = run_cli("version")
    assert r.returncode == 0 and r.stdout == f"blocktarget {__version__}\n"


def test_help_for_every_subcommand() -> None:
    r = run_cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: blocktarget")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = list(sub.choices)
    assert {"start", "rpc", "version"} <= set(commands)
    for cmd in commands:
        r = run_cli(cmd, "--help")
        assert r.returncode == 0, (cmd, r.stderr)
        assert r.stdout.startswith(f"usage: blocktarget {cmd}"), (cmd, r.stdout)
        assert cmd in r.stdout
    start_help = run_cli("start", "--help").stdout
    for opt in ("--config", "-c", "--dry-run", "--rpc-socket", "--http", "--cores"):
        assert opt in start_help
    rpc_help = run_cli("rpc", "--help").stdout
    for opt in ("--param", "--json", "--http", "--socket"):
        assert opt in rpc_help


def test_no_command_is_usage_error() -> None:
    r = run_cli()
    assert r.returncode == 2 and "usage:" in r.stderr


# ---- dry run ----------------------------------------------------------------------------------


def test_dry_run_good_config(tmp_path: Path) -> None:
    port = free_port()
    doc = config([malloc("M0")], subsystem_with_listener(port), cores=[AVAILABLE[0]],
                 rpc={"http": f"127.0.0.1:{free_port()}", "unix": str(tmp_path / "s.sock")})
    path = tmp_path / "good.json"
    path.write_text(json.dumps(doc))
    r = run_cli("start", "-c", str(path), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{path}: OK (5 calls; 1 bdev(s), 1 subsystem(s)")
    assert not (tmp_path / "s.sock").exists(), "a dry run serves nothing"
    assert port_free(port)


def test_dry_run_embedded_default() -> None:
    r = run_cli("start", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "<embedded default config>: OK (5 calls; 1 bdev(s), 1 subsystem(s)" in r.stdout


BAD_CONFIGS = {
    "bad_json": ('{"subsystems": [\n  {"subsystem": "bdev",, }]}',
                 "invalid JSON at line 2 column 24"),
    "unknown_method": (config([{"method": "bdev_mallocc_create", "params": {}}]),
                       "subsystems[0].config[0]: unknown method 'bdev_mallocc_create'"),
    "bad_param_type": (config([malloc("M0"), {"method": "bdev_null_create",
                                              "params": {"name": "N", "num_blocks": "8"}}]),
                       "subsystems[0].config[1] (bdev_null_create): "
                       "parameter 'num_blocks' must be integer, got str"),
    "unknown_param": (config([{"method": "bdev_malloc_create",
                               "params": {"name": "M", "num_blocks": 8, "blocks": 1}}]),
                      "subsystems[0].config[0] (bdev_malloc_create): unknown parameter 'blocks'"),
    "unknown_bdev": (config([malloc("M0")], [
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                                                       "namespace": {"bdev_name": "M1"}}}]),
                     "subsystems[1].config[1] (nvmf_subsystem_add_ns): bdev 'M1' does not exist"),
    "bad_cores": (config(cores="0xz"), "blocktarget.cores: cannot parse cores '0xz'"),
    "bad_setting": (config(metric=True), "blocktarget: unknown setting 'metric'"),
    "bad_rpc_address": (config(rpc={"http": "nohost"}), "blocktarget.rpc.http: bad HTTP address"),
    "bad_log_level": (config(log_level="loud"), "blocktarget.log_level must be one of"),
    # issue 17: a security or durability option is served as asked or refused
    "secure_on_plain": (config([malloc("M0")], [
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN + "2"}},
        {"method": "nvmf_subsystem_add_listener", "params": {
            "nqn": NQN, "listen_address": listen_address(4997)}},
        {"method": "nvmf_subsystem_add_listener", "params": {
            "nqn": NQN + "2", "secure_channel": True, "listen_address": listen_address(4997)}}]),
        "subsystems[1].config[3] (nvmf_subsystem_add_listener): listener "),
    "psk_missing": (config([malloc("M0")], [
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
        {"method": "nvmf_subsystem_add_host", "params": {
            "nqn": NQN, "host": "nqn.2014-08.org.nvmexpress:uuid:1", "psk": "key0"}}]),
        "subsystems[1].config[1] (nvmf_subsystem_add_host): key 'key0' does not exist"),
    "ptpl_file": (config([malloc("M0")], [
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
        {"method": "nvmf_subsystem_add_ns", "params": {
            "nqn": NQN, "namespace": {"bdev_name": "M0", "ptpl_file": "/tmp/ptpl"}}}]),
        "subsystems[1].config[1] (nvmf_subsystem_add_ns): parameter 'ptpl_file' is not "
        "supported"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "start"])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, kind: str, dry_run: bool) -> None:
    doc, problem = BAD_CONFIGS[kind]
    sock = tmp_path / "s.sock"
    if isinstance(doc, dict):
        doc = json.loads(json.dumps(doc))
        doc.setdefault("blocktarget", {}).setdefault("rpc", {}).setdefault("unix", str(sock))
        doc["blocktarget"]["rpc"].setdefault("http", f"127.0.0.1:{free_port()}")
        doc = json.dumps(doc)
    path = tmp_path / f"{kind}.json"
    path.write_text(doc)
    t0 = time.monotonic()
    r = run_cli("start", "-c", str(path), *(["--dry-run"] if dry_run else []))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and problem in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not sock.exists(), "nothing starts half-way"
    assert time.monotonic() - t0 < 10


def test_missing_config_file(tmp_path: Path) -> None:
    r = run_cli("start", "-c", str(tmp_path / "nope.json"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"blocktarget: {tmp_path / 'nope.json'}: cannot read: " \
                               "No such file or directory"


def test_bad_cores_option() -> None:
    r = run_cli("start", "--dry-run", "-m", "7-3")
    assert r.returncode == 2 and r.stderr.strip() == "blocktarget: --cores: no cores selected"


# ---- a running target ------------------------------------------------------------------------------


def test_default_config_start(running_target: Launcher) -> None:
    """`make run`: the embedded default with only the RPC addresses moved aside."""
    if not port_free(4420):
        pytest.skip("port 4420 is in use on this machine; the embedded default needs it")
    t = running_target(None)
    [b] = t.rpc("bdev_get_bdevs")
    assert b["name"] == "Malloc0" and b["num_blocks"] * b["block_size"] == 256 << 20
    assert b["claimed"] is True
    subs = t.rpc("nvmf_get_subsystems")
    [sub] = [s for s in subs if s["nqn"] == DEFAULT_NQN]
    assert sub["listen_addresses"] == [
        {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}]
    assert [n["bdev_name"] for n in sub["namespaces"]] == ["Malloc0"]
    assert sub["allow_any_host"] is True
    assert not port_free(4420), "the default listener is bound"
    assert t.http_rpc("spdk_get_version")["version"] == f"blocktarget v{__version__}"
    assert t.stop() == 0
    assert port_free(4420)


def test_unix_socket_mode_0600(running_target: Launcher) -> None:
    t = running_target(config())
    st = os.stat(t.sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs two CPUs to show per-core pinning")
def test_reactors_pinned_per_core(running_target: Launcher) -> None:
    cores = AVAILABLE[:2]
    t = running_target(config(), cores=cores)
    info = t.rpc("framework_get_reactors")
    assert info["pid"] == t.pid
    reactors = info["reactors"]
    assert [r["lcore"] for r in reactors] == cores
    tids = {int(x) for x in os.listdir(f"/proc/{t.pid}/task")}
    for r in reactors:
        assert r["tid"] in tids, "a reactor is a thread of the target process"
        assert task_affinity(t.pid, r["tid"]) == str(r["lcore"])
        assert r["busy"] >= 0 and r["idle"] > 0
        assert {"connections", "channels", "pollers"} <= set(r)
    assert len({r["tid"] for r in reactors}) == 2
    # the main thread (control plane) stays unpinned
    assert task_affinity(t.pid, t.pid) == affinity_text(AVAILABLE)
    # every pinned thread of the process is a reactor
    pinned = {tid for tid in tids if task_affinity(t.pid, tid) != affinity_text(AVAILABLE)}
    assert pinned == {r["tid"] for r in reactors}


def test_reactor_cores_from_hex_mask(running_target: Launcher) -> None:
    core = AVAILABLE[-1]
    t = running_target(config(cores=hex(1 << core)), cores=None)
    [r] = t.rpc("framework_get_reactors")["reactors"]
    assert r["lcore"] == core and task_affinity(t.pid, r["tid"]) == str(core)
    t2 = running_target(config(), cores=None, args=("-m", str(core)))
    [r] = t2.rpc("framework_get_reactors")["reactors"]
    assert r["lcore"] == core


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(running_target: Launcher, sig: int) -> None:
    port = free_port()
    t = running_target(config([malloc("M0")], subsystem_with_listener(port)))
    assert not port_free(port) and not port_free(t.http_port)
    # open RPC and NVMe/TCP connections must not hold the shutdown up
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(t.sock_path)
    host = socket.create_connection(("127.0.0.1", port), timeout=10)
    keep_alive = http.client.HTTPConnection("127.0.0.1", t.http_port, timeout=10)
    keep_alive.request("POST", "/", body=b'{"jsonrpc": "2.0", "method": "spdk_get_version", '
                                         b'"id": 1}')
    assert keep_alive.getresponse().read()
    try:
        t0 = time.monotonic()
        assert t.stop(sig) == 0, t.log()
        assert time.monotonic() - t0 < 10
        assert host.recv(1) == b"", "the target closed the host connection"
    finally:
        idle.close()
        host.close()
        keep_alive.close()
    assert not os.path.exists(t.sock_path), "the Unix socket is removed"
    assert port_free(port), "the NVMe/TCP listener port is free"
    assert port_free(t.http_port), "the HTTP port is free"
    assert "Traceback" not in t.log()
    assert "stopped" in t.log()


@pytest.mark.parametrize("conflict", ["unix", "http", "listener"])
def test_second_start_fails_address_in_use(running_target: Launcher, conflict: str) -> None:
    port = free_port()
    first = running_target(config([malloc("M0")], subsystem_with_listener(port)))
    doc = json.loads(json.dumps(first.config))
    second = running_target.prepare(doc)
    second_sock = str(second.workdir / "rpc.sock")
    rpc = doc["blocktarget"]["rpc"]
    if conflict in ("http", "listener"):
        rpc["unix"] = second_sock
    if conflict == "listener":
        rpc["http"] = f"127.0.0.1:{free_port()}"
    if conflict == "http":  # listeners bind before the HTTP server: give it its own port
        free_listener = listen_address(free_port())
        for entry in doc["subsystems"][1]["config"]:
            if entry["method"] == "nvmf_subsystem_add_listener":
                entry["params"]["listen_address"] = free_listener
    second.config_path.write_text(json.dumps(doc))
    t0 = time.monotonic()
    r = run_cli("start", "-c", str(second.config_path))
    assert time.monotonic() - t0 < 10, "fails quickly"
    assert r.returncode == 1, r.stderr
    assert "address already in use" in r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, r.stderr
    # the first target is untouched: socket still there and answering
    assert os.path.exists(first.sock_path)
    assert first.rpc("spdk_get_version")
    assert first.http_rpc("bdev_get_bdevs")[0]["name"] == "M0"
    if conflict != "unix":
        assert not os.path.exists(second_sock), "the failed start cleaned up its socket"
    if conflict == "http":
        assert f"cannot serve RPC on http://{rpc['http']}" in r.stderr
        assert port_free(int(free_listener["trsvcid"])), "the listener it bound is closed"
    elif conflict == "unix":  # found before the (equally taken) listener is tried
        assert f"cannot serve RPC on {first.sock_path}: address already in use" in r.stderr
    assert first.stop() == 0


def test_stale_socket_is_replaced(running_target: Launcher) -> None:
    """A socket file left by a killed target must not block the next start."""
    t = running_target.prepare(config())
    s = socket.socket(socket.AF_UNIX)
    s.bind(t.sock_path)
    s.close()  # file stays, nobody listens
    t.start()
    assert t.rpc("spdk_get_version")


def test_kill_9_then_restart(running_target: Launcher) -> None:
    port = free_port()
    doc = config([malloc("M0")], subsystem_with_listener(port))
    t = running_target(doc)
    t.kill()
    assert os.path.exists(t.sock_path), "SIGKILL leaves the socket file behind"
    again = running_target(json.loads(json.dumps(t.config)))
    assert again.rpc("bdev_get_bdevs")[0]["name"] == "M0"


def test_socket_path_occupied_by_a_file(running_target: Launcher) -> None:
    t = running_target.prepare(config())
    Path(t.sock_path).write_text("not a socket")
    r = run_cli("start", "-c", str(t.config_path))
    assert r.returncode == 1
    assert f"{t.sock_path} exists and is not a socket" in r.stderr
    assert Path(t.sock_path).read_text() == "not a socket", "never deletes a non-socket"


def test_unix_only_and_http_only(running_target: Launcher) -> None:
    t = running_target(config(), http=False)
    assert t.http_port is None and t.rpc("spdk_get_version")
    t2 = running_target(config(), unix=False)
    assert t2.http_rpc("spdk_get_version")
    assert not os.path.exists(t2.workdir / "rpc.sock")
