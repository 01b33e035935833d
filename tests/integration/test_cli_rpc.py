"""`blocktarget rpc` against a live target: the operator's command-line client.

Exit statuses are part of the interface (0 ok, 1 the call failed or the target is
unreachable, 2 the command line itself is wrong), so scripts can tell them apart.
"""

from __future__ import annotations

import json

import pytest

from .target_proc import Launcher, RunningTarget, config, malloc, run_cli

NQN = "nqn.2026-01.io.test:cli"


@pytest.fixture(scope="module")
def live(module_launcher: Launcher) -> RunningTarget:
    return module_launcher(config([malloc("Base")]))


def cli(t: RunningTarget, *args: str, http: bool = False):  # noqa: ANN201
    where = ["--http", t.http_addr] if http else ["-s", t.sock_path]
    return run_cli("rpc", *where, *args)


def test_params_are_typed_and_nested(live: RunningTarget) -> None:
    r = cli(live, "bdev_create", "--param", "type=malloc", "--param", "name=CliM",
            "-p", "size_mb=1", "-p", "block_size=4096")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == "CliM"
    [b] = json.loads(cli(live, "bdev_get_bdevs", "--param", "name=CliM").stdout)
    assert (b["num_blocks"], b["block_size"]) == (256, 4096)
    r = cli(live, "nvmf_create_subsystem", "-p", f"nqn={NQN}", "-p", "allow_any_host=true",
            "-p", "serial_number=SN12345")
    assert r.returncode == 0, r.stderr
    [sub] = json.loads(cli(live, "nvmf_get_subsystems", "-p", f"nqn={NQN}").stdout)
    assert sub["allow_any_host"] is True and sub["serial_number"] == "SN12345"
    r = cli(live, "nvmf_subsystem_add_ns", "-p", f"nqn={NQN}", "-p", "namespace.bdev_name=CliM",
            "-p", "namespace.nsid=3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == 3
    [sub] = json.loads(cli(live, "nvmf_get_subsystems", "-p", f"nqn={NQN}").stdout)
    assert [(n["nsid"], n["bdev_name"]) for n in sub["namespaces"]] == [(3, "CliM")]


def test_json_and_http(live: RunningTarget) -> None:
    r = cli(live, "bdev_null_create", "--json", '{"name": "CliN", "num_blocks": 16}', http=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == "CliN"
    # --json and --param combine; --param wins
    r = cli(live, "bdev_get_bdevs", "--json", '{"name": "Base"}', "-p", "name=CliN")
    assert json.loads(r.stdout)[0]["name"] == "CliN"
    r = run_cli("rpc", "--http", f"http://{live.http_addr}/", "spdk_get_version")
    assert r.returncode == 0 and json.loads(r.stdout)["version"].startswith("blocktarget")
    r = cli(live, "bdev_delete", "-p", "name=CliN", http=True)
    assert r.returncode == 0 and json.loads(r.stdout) is True


def test_rpc_errors_exit_1_with_code(live: RunningTarget) -> None:
    for http in (False, True):
        r = cli(live, "bdev_get_bdevs", "-p", "name=nope", http=http)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.strip() == ("blocktarget rpc: bdev_get_bdevs: bdev 'nope' does not exist "
                                    "(code -19)")
        r = cli(live, "no_such_method", http=http)
        assert r.returncode == 1 and "(code -32601)" in r.stderr
        # a VALUE that parses as JSON is JSON: 12345 is a number, and the error says so
        r = cli(live, "nvmf_create_subsystem", "-p", "nqn=nqn.2026-01.io.test:x",
                "-p", "serial_number=12345", http=http)
        assert r.returncode == 1
        assert "parameter 'serial_number' must be string, got int (code -32602)" in r.stderr


def test_claimed_bdev_error_from_cli(live: RunningTarget) -> None:
    live.rpc("bdev_null_create", name="Held", num_blocks=8)
    live.rpc("subsystem_add", nqn="nqn.2026-01.io.test:held", namespaces=[{"bdev_name": "Held"}])
    r = cli(live, "bdev_delete", "-p", "name=Held")
    assert r.returncode == 1
    assert "bdev 'Held' is in use by subsystem nqn.2026-01.io.test:held; remove that first " \
           "(code -16)" in r.stderr
    assert json.loads(cli(live, "subsystem_remove", "-p",
                          "nqn=nqn.2026-01.io.test:held").stdout) is True
    assert cli(live, "bdev_delete", "-p", "name=Held").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "novalue"], "--param 'novalue': expected KEY=VALUE"),
        (["-p", "=x"], "--param '=x': expected KEY=VALUE"),
        (["--json", "[1]"], "--json must be a JSON object"),
        (["--json", "{bad"], "Expecting property name"),
        (["-p", "a=1", "-p", "a.b=2"], "--param 'a.b=2': a is not an object"),
    ],
)
def test_bad_command_line_exit_2(live: RunningTarget, args: list[str], message: str) -> None:
    r = cli(live, "bdev_get_bdevs", *args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_unreachable_target(tmp_path) -> None:
    r = run_cli("rpc", "-s", str(tmp_path / "none.sock"), "spdk_get_version")
    assert r.returncode == 1
    assert f"cannot reach the target at {tmp_path / 'none.sock'}" in r.stderr
    r = run_cli("rpc", "--http", "127.0.0.1:1", "spdk_get_version")
    assert r.returncode == 1 and "cannot reach the target at 127.0.0.1:1" in r.stderr
