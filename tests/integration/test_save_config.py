"""start -> change by RPC -> save_config to a file -> stop -> restart with it -> same target.

Hosts keep a namespace's identity by its NGUID/UUID and nsid; if a restart changed them,
multipath and filesystems on the host would see a different disk. So the comparison is
of everything a host or operator can see, not only of names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .target_proc import (
    Launcher,
    RunningTarget,
    config,
    free_port,
    listen_address,
    malloc,
    port_free,
    run_cli,
)

NQN_A = "nqn.2026-01.io.test:save-a"
NQN_B = "nqn.2026-01.io.test:save-b"
HOST1 = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001"
HOST2 = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000002"


def observable_state(t: RunningTarget) -> dict[str, Any]:
    bdevs = t.rpc("bdev_get_bdevs")
    return {
        "bdevs": [{k: b[k] for k in ("name", "uuid", "block_size", "num_blocks", "product_name",
                                     "claimed", "claimed_by", "write_cache")} for b in bdevs],
        "subsystems": t.rpc("nvmf_get_subsystems"),
        "transports": t.rpc("nvmf_get_transports"),
        "cores": [r["lcore"] for r in t.rpc("framework_get_reactors")["reactors"]],
    }


def test_round_trip(running_target: Launcher, tmp_path: Path) -> None:
    p1, p2, p3 = free_port(), free_port(), free_port()
    first = running_target(config(
        [malloc("Boot0", 128, 4096)],
        [{"method": "nvmf_create_transport", "params": {"trtype": "TCP", "max_queue_depth": 96}}],
    ))

    # change everything by RPC, over both transports
    first.rpc("bdev_create", type="malloc", name="M512", num_blocks=300, block_size=512)
    first.http_rpc("bdev_malloc_create", name="M4k", num_blocks=64, block_size=4096,
                   uuid="5e6f3a1c-9d47-4c36-b1a8-1234567890ab")
    first.rpc("bdev_null_create", name="N0", num_blocks=1000, block_size=512)
    first.rpc("bdev_create", type="null", name="Gone", num_blocks=8)
    first.rpc("bdev_delete", name="Gone")
    first.rpc("nvmf_create_subsystem", nqn=NQN_A, serial_number="SAVE-A", model_number="Saver",
              max_namespaces=16, min_cntlid=5, max_cntlid=500)
    first.rpc("nvmf_subsystem_add_ns", nqn=NQN_A, namespace={"bdev_name": "M512"})
    first.rpc("nvmf_subsystem_add_ns", nqn=NQN_A, namespace={
        "bdev_name": "M4k", "nsid": 9, "nguid": "F0E0D0C0B0A090807060504030201000",
        "uuid": "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9", "eui64": "A1B2C3D4E5F60718"})
    first.rpc("nvmf_subsystem_add_ns", nqn=NQN_A, namespace={"bdev_name": "Boot0", "nsid": 4})
    first.rpc("nvmf_subsystem_remove_ns", nqn=NQN_A, nsid=4)  # a gap must stay a gap
    first.rpc("nvmf_subsystem_add_host", nqn=NQN_A, host=HOST1)
    first.rpc("nvmf_subsystem_add_host", nqn=NQN_A, host=HOST2)
    first.rpc("nvmf_subsystem_remove_host", nqn=NQN_A, host=HOST1)
    first.rpc("nvmf_subsystem_add_listener", nqn=NQN_A, listen_address=listen_address(p1))
    first.rpc("nvmf_subsystem_add_listener", nqn=NQN_A, listen_address=listen_address(p2))
    first.http_rpc("subsystem_add", nqn=NQN_B, allow_any_host=True,
                   namespaces=[{"bdev_name": "N0", "nsid": 2}],
                   listeners=[listen_address(p2), listen_address(p3)])
    first.rpc("nvmf_subsystem_remove_listener", nqn=NQN_B, listen_address=listen_address(p3))
    before = observable_state(first)
    sub_a = next(s for s in before["subsystems"] if s["nqn"] == NQN_A)
    assert [n["nsid"] for n in sub_a["namespaces"]] == [1, 9]
    assert sub_a["hosts"] == [{"nqn": HOST2}] and sub_a["allow_any_host"] is False

    # save the way an operator would: the CLI's stdout into a file
    r = run_cli("rpc", "-s", first.sock_path, "save_config")
    assert r.returncode == 0, r.stderr
    saved = tmp_path / "saved.json"
    saved.write_text(r.stdout)
    doc = json.loads(r.stdout)
    assert doc["blocktarget"]["rpc"] == {"http": first.http_addr, "unix": first.sock_path}
    assert doc["blocktarget"]["cores"] == [0]
    assert "Gone" not in r.stdout
    assert first.stop() == 0
    assert port_free(p1) and port_free(p2) and port_free(p3)

    # restart from the file as written (its own RPC addresses are the first target's)
    dry = run_cli("start", "-c", str(saved), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    second = running_target(doc)
    assert second.config == doc, "started from exactly the saved content"
    assert (second.sock_path, second.http_port) == (first.sock_path, first.http_port)
    after = observable_state(second)
    assert after == before
    assert not port_free(p1) and not port_free(p2) and port_free(p3)

    # and saving again gives the same file: the round trip is a fixed point
    assert json.loads(run_cli("rpc", "-s", second.sock_path, "save_config").stdout) == doc


def test_round_trip_with_two_reactors_and_defaults(running_target: Launcher) -> None:
    """Settings the operator wrote (cores as a mask, log level) survive the round trip."""
    import os

    cores = sorted(os.sched_getaffinity(0))[:2]
    mask = hex(sum(1 << c for c in cores))
    first = running_target(config([malloc("M")], cores=mask, log_level="warning"), cores=None)
    saved = first.rpc("save_config")
    assert saved["blocktarget"]["cores"] == mask
    assert saved["blocktarget"]["log_level"] == "warning"
    before = observable_state(first)
    assert first.stop() == 0
    second = running_target(saved, cores=None)
    assert observable_state(second) == before
