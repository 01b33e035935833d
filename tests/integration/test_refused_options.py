"""A running target refuses, through both JSON-RPC clients that operators use (ours and
SPDK's rpc.py from PyPI `spdk`), the SPDK options it cannot honour that change security
or durability (issue 17, item 0): namespace options it does not implement, a PSK that is
not a TLS key, a secure request on a plain address. A plain listener still comes up,
and the discovery log does not advertise a secure channel for it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktarget.host import connect
from blocktarget.nvme import spec, structs
from blocktarget.rpc_client import RpcCallError

from .nvme_target_util import NQN, Tgt, start_target
from .target_proc import Launcher, free_port, listen_address, malloc

pytestmark = pytest.mark.timeout(60)

SPDK_RPC = str(Path(sys.executable).with_name("spdk-rpc"))
HOST = "nqn.2014-08.org.nvmexpress:uuid:33333333-3333-4444-5555-666666666666"


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        yield start_target(launcher, bdevs=[malloc("Malloc0", 1024, 512),
                                            malloc("Spare0", 1024, 512)])
    finally:
        launcher.cleanup()


def spdk(tgt: Tgt, *args: str) -> subprocess.CompletedProcess[str]:
    if not Path(SPDK_RPC).exists():
        pytest.fail("spdk-rpc (PyPI spdk, a test dependency) is not installed")
    return subprocess.run([SPDK_RPC, "-s", tgt.proc.sock_path, *args], capture_output=True,
                          text=True, timeout=30)


def test_our_client_gets_the_reason(tgt: Tgt) -> None:
    with pytest.raises(RpcCallError) as ei:
        tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(tgt.port),
                secure_channel=True)
    assert ei.value.code in (-32602, -17)  # (-17: the plain listener exists already)
    with pytest.raises(RpcCallError, match="key 'key0' does not exist"):
        tgt.rpc("nvmf_subsystem_add_host", nqn=NQN, host=HOST, psk="key0")
    names = [h["nqn"] for h in tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]["hosts"]]
    assert HOST not in names, "the refused host was not allowed in without its key"
    with pytest.raises(RpcCallError) as ei:
        tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN,
                namespace={"bdev_name": "Spare0", "ptpl_file": "/tmp/ptpl.json"})
    assert ei.value.code == -32602 and "ptpl_file" in ei.value.message


@pytest.mark.parametrize(("args", "name"), [
    (["nvmf_subsystem_add_ns", NQN, "Spare0", "-p", "/tmp/ptpl.json"], "ptpl_file"),
    (["nvmf_set_config", "--discovery-filters", "address"], "discovery_filters"),
    (["bdev_malloc_create", "-b", "Pi0", "-m", "8", "-t", "1", "8", "512"],
     "dif_type"),
], ids=["ptpl-file", "discovery-filter", "malloc-dif"])
def test_spdk_rpc_refused(tgt: Tgt, args: list[str], name: str) -> None:
    port = str(free_port())
    r = spdk(tgt, *[port if a == "PORT" else a for a in args])
    assert r.returncode != 0, r.stdout
    out = r.stdout + r.stderr
    assert "-32602" in out and f"parameter '{name}'" in out, out


def test_spdk_rpc_plain_listener_still_works(tgt: Tgt) -> None:
    """The same commands without the option work, and what is served is what is said."""
    port = free_port()
    r = spdk(tgt, "nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1",
             "-s", str(port), "-f", "ipv4")
    assert r.returncode == 0, r.stderr

    async def check() -> None:
        c = await connect("127.0.0.1", port, spec.DISCOVERY_NQN, kato_ms=0, timeout=10)
        try:
            log = structs.parse_discovery_log(
                await c.get_log_page(spec.LogPage.DISCOVERY, 4096))
        finally:
            await c.disconnect()
        mine = [e for e in log.entries if e.subnqn == NQN and e.trsvcid == str(port)]
        assert mine and all(e.treq & spec.TREQ_SECURE_CHANNEL_MASK
                            == spec.Treq.SECURE_CHANNEL_NOT_REQUIRED for e in mine)

    asyncio.run(check())
