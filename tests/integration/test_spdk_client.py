"""SPDK's own JSON-RPC client (PyPI `spdk`, its `spdk-rpc` command) against our socket,
unmodified: operators and SPDK-based tooling must be able to drive the target as they
drive SPDK's nvmf_tgt, including the client-side save_config and load_config."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .target_proc import Launcher, RunningTarget, config, free_port, port_free

SPDK_RPC = str(Path(sys.executable).with_name("spdk-rpc"))
NQN = "nqn.2026-01.io.test:spdk"
HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


class SpdkRpc:
    """`spdk-rpc --server`: one process runs many commands, each a fresh connection, each
    ending in **STATUS=0/1 (how SPDK's own test scripts drive rpc.py quickly)."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([SPDK_RPC, "--server"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, *args: str) -> tuple[int, str]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(shlex.join(["-s", self.sock, *args]) + "\n")
        self.proc.stdin.flush()
        lines = []
        for line in self.proc.stdout:
            if line.startswith("**STATUS="):
                return int(line.strip().split("=")[1]), "".join(lines)
            lines.append(line)
        raise AssertionError(f"spdk-rpc exited: {''.join(lines)}")

    def ok(self, *args: str) -> str:
        status, out = self.run(*args)
        assert status == 0, f"spdk-rpc {' '.join(args)} failed:\n{out}"
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args))

    def fails(self, *args: str) -> dict[str, Any]:
        """The JSON-RPC error object SPDK's client printed."""
        status, out = self.run(*args)
        assert status == 1, out
        return json.loads(out[out.index("response:") + len("response:"):])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def spdk(running_target: Launcher) -> Iterator[tuple[RunningTarget, SpdkRpc]]:
    assert Path(SPDK_RPC).exists(), "SPDK's client is a test dependency (pip package 'spdk')"
    t = running_target(config())
    client = SpdkRpc(t.sock_path)
    try:
        yield t, client
    finally:
        client.close()


def test_spdk_rpc_every_method(spdk: tuple[RunningTarget, SpdkRpc]) -> None:
    t, rpc = spdk
    v = rpc.json("spdk_get_version")
    assert v["version"].startswith("blocktarget v")
    methods = rpc.json("rpc_get_methods")
    assert "nvmf_subsystem_add_ns" in methods
    assert rpc.json("framework_get_reactors")["reactors"][0]["lcore"] == 0

    assert rpc.ok("bdev_malloc_create", "-b", "Malloc0", "-u",
                  "11111111-2222-3333-4444-555555555555", "4", "512").strip() == "Malloc0"
    assert rpc.ok("bdev_null_create", "Null0", "8", "4096").strip() == "Null0"
    bdevs = {b["name"]: b for b in rpc.json("bdev_get_bdevs")}
    assert bdevs["Malloc0"]["num_blocks"] == 8192 and bdevs["Malloc0"]["block_size"] == 512
    assert bdevs["Malloc0"]["uuid"] == "11111111-2222-3333-4444-555555555555"
    assert bdevs["Null0"]["num_blocks"] == 2048 and bdevs["Null0"]["block_size"] == 4096

    rpc.ok("nvmf_create_transport", "-t", "TCP", "-c", "4096", "-q", "64")
    [tr] = rpc.json("nvmf_get_transports")
    assert tr["trtype"] == "TCP" and tr["max_queue_depth"] == 64
    assert tr["in_capsule_data_size"] == 4096
    rpc.ok("nvmf_create_subsystem", NQN, "-s", "SPDK0001", "-d", "SPDK-model", "-m", "8")
    rpc.ok("nvmf_subsystem_add_ns", NQN, "Malloc0")  # rpc.py prints nothing for this one
    rpc.ok("nvmf_subsystem_add_ns", "-n", "7", "-g", "000102030405060708090A0B0C0D0E0F", NQN,
           "Null0")
    port = free_port()
    rpc.ok("nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", str(port),
           "-f", "ipv4")
    assert not port_free(port)
    rpc.ok("nvmf_subsystem_add_host", NQN, HOST)
    rpc.ok("nvmf_subsystem_allow_any_host", "--allow-any-host", NQN)
    [sub] = rpc.json("nvmf_get_subsystems", NQN)
    assert sub["serial_number"] == "SPDK0001" and sub["model_number"] == "SPDK-model"
    assert sub["max_namespaces"] == 8 and sub["allow_any_host"] is True
    assert [(n["nsid"], n["bdev_name"]) for n in sub["namespaces"]] == [(1, "Malloc0"),
                                                                         (7, "Null0")]
    assert sub["namespaces"][1]["nguid"] == "000102030405060708090A0B0C0D0E0F"
    assert sub["hosts"] == [{"nqn": HOST}]
    assert sub["listen_addresses"][0]["trsvcid"] == str(port)
    rpc.ok("nvmf_subsystem_allow_any_host", "--no-allow-any-host", NQN)
    assert rpc.json("nvmf_get_subsystems", NQN)[0]["allow_any_host"] is False

    # SPDK's error reporting shows our codes
    e = rpc.fails("bdev_malloc_delete", "Malloc0")
    assert e["code"] == -16 and "in use by subsystem" in e["message"]
    e = rpc.fails("nvmf_subsystem_add_ns", NQN, "Ghost")
    assert e == {"code": -19, "message": "bdev 'Ghost' does not exist"}
    e = rpc.fails("nvmf_create_subsystem", NQN)
    assert e["code"] == -17

    saved = json.loads(rpc.ok("save_config"))
    assert [s["subsystem"] for s in saved["subsystems"]] == ["bdev", "nvmf"]

    rpc.ok("nvmf_subsystem_remove_host", NQN, HOST)
    rpc.ok("nvmf_subsystem_remove_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", str(port),
           "-f", "ipv4")
    assert port_free(port)
    rpc.ok("nvmf_subsystem_remove_ns", NQN, "1")
    rpc.ok("bdev_malloc_delete", "Malloc0")
    rpc.ok("nvmf_delete_subsystem", NQN)
    rpc.ok("bdev_null_delete", "Null0")
    assert rpc.json("bdev_get_bdevs") == []
    assert [s["nqn"] for s in rpc.json("nvmf_get_subsystems")] == [
        "nqn.2014-08.org.nvmexpress.discovery"]
    e = rpc.fails("bdev_null_delete", "Null0")
    assert e["code"] == -19
    assert t.running()


def test_spdk_save_config_then_load_config(running_target: Launcher, tmp_path: Path) -> None:
    """SPDK's save_config/load_config run client-side (framework_get_config, then one call
    per entry); the state must come back identical in a fresh target."""
    port = free_port()
    src = running_target(config())
    rpc = SpdkRpc(src.sock_path)
    try:
        rpc.ok("bdev_malloc_create", "-b", "M0", "2", "4096")
        rpc.ok("bdev_null_create", "N0", "4", "512")
        rpc.ok("nvmf_create_transport", "-t", "TCP")
        rpc.ok("nvmf_create_subsystem", NQN, "-s", "SN42")
        rpc.ok("nvmf_subsystem_add_ns", NQN, "M0")
        rpc.ok("nvmf_subsystem_add_ns", "-n", "3", NQN, "N0")
        rpc.ok("nvmf_subsystem_add_host", NQN, HOST)
        rpc.ok("nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s",
               str(port))
        saved = tmp_path / "spdk-saved.json"
        saved.write_text(rpc.ok("save_config"))
        before = (rpc.json("bdev_get_bdevs"), rpc.json("nvmf_get_subsystems"),
                  rpc.json("nvmf_get_transports"))
    finally:
        rpc.close()
    assert src.stop() == 0
    assert "blocktarget" not in json.loads(saved.read_text()), "SPDK's shape exactly"

    dst = running_target(config())
    r = subprocess.run([SPDK_RPC, "-s", dst.sock_path, "load_config", "-j", str(saved)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipped" not in r.stdout
    rpc = SpdkRpc(dst.sock_path)
    try:
        after = (rpc.json("bdev_get_bdevs"), rpc.json("nvmf_get_subsystems"),
                 rpc.json("nvmf_get_transports"))
    finally:
        rpc.close()
    assert after == before
    assert not port_free(port)
    assert dst.stop() == 0
    # the same file also starts a target directly (no blocktarget section: CLI addresses)
    again = running_target(json.loads(saved.read_text()))
    assert again.rpc("nvmf_get_subsystems") == before[1]


def test_spdk_client_library_and_batch(running_target: Launcher) -> None:
    """rpc.client.JSONRPCClient as SPDK-based tools import it, including its batch mode."""
    from spdk.rpc.client import JSONRPCClient, JSONRPCException

    t = running_target(config())
    with JSONRPCClient(t.sock_path, timeout=10) as c:
        assert c.call("bdev_null_create", {"name": "N", "num_blocks": 8}) == "N"
        assert c.bdev_get_bdevs(name="N")[0]["num_blocks"] == 8
        with pytest.raises(JSONRPCException) as ei:
            c.call("bdev_get_bdevs", {"name": "nope"})
        assert '"code": -19' in ei.value.message
    with JSONRPCClient(t.sock_path, timeout=10, batch_mode=True) as c:
        results, errors = c.call_batch([
            {"method": "bdev_null_create", "params": {"name": "B1", "num_blocks": 8}},
            {"method": "bdev_null_create", "params": {"name": "N", "num_blocks": 8}},
            {"method": "bdev_get_bdevs", "params": {"name": "B1"}},
        ])
    assert results[0] == "B1" and results[1][0]["name"] == "B1"
    assert [e["code"] for e in errors] == [-17]
