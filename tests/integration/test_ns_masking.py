"""Namespace masking (issue 16 item 6) against a real target process: a namespace added
with `no_auto_visible` is seen only by the hosts `nvmf_ns_add_host` names — in Identify
(active list, namespace data, descriptors), the ANA log and the SMART log's nsid check —
and its I/O fails for any other host as for an absent namespace; a change reaches that
host's connected controllers as a namespace-attribute event and nobody else's; the
methods' errors; save_config and a restart from it; SPDK's rpc.py driving the methods.

Two hosts (two host NQNs) through our initiator, with the C lane on (the default): the
lane's namespace table leaves masked namespaces out, so their I/O takes the Python path,
which fails it. Budget: about 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.host import Controller, connect
from blocktarget.nvme import spec, structs
from blocktarget.rpc_client import RpcCallError

from .nvme_target_util import HOSTID, HOSTNQN
from .target_proc import Launcher, RunningTarget, config, free_port, listen_address, malloc

pytestmark = pytest.mark.timeout(90)

NQN = "nqn.2026-01.io.blocktarget.test:masking"
OTHER = "nqn.2014-08.org.nvmexpress:uuid:" + str(uuid.uuid4())
MAXNS = 4
NS_AEN = spec.make_aen_result(spec.AsyncEventType.NOTICE, spec.AsyncEventNotice.NS_ATTR_CHANGED,
                              spec.LogPage.CHANGED_NS)
INVALID_NS = spec.make_status(spec.Sct.GENERIC, spec.GenericStatus.INVALID_NS, dnr=True)
BS = 512


def nvmf_calls(port: int) -> list[dict[str, Any]]:
    """nsid 1 visible to all; 2 masked, visible to HOSTNQN; 3 masked, visible to none
    (no_auto_visible beside `namespace` there, as older SPDK clients send it)."""
    return [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {
            "nqn": NQN, "allow_any_host": True, "ana_reporting": True,
            "max_namespaces": MAXNS}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {
            "bdev_name": "M1", "nsid": 1}}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {
            "bdev_name": "M2", "nsid": 2, "no_auto_visible": True}}},
        {"method": "nvmf_ns_add_host", "params": {"nqn": NQN, "nsid": 2, "host": HOSTNQN}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "no_auto_visible": True,
                                                       "namespace": {"bdev_name": "M3",
                                                                     "nsid": 3}}},
        {"method": "nvmf_subsystem_add_listener", "params": {
            "nqn": NQN, "listen_address": listen_address(port)}},
    ]


class Masked:
    def __init__(self, proc: RunningTarget, port: int) -> None:
        self.proc, self.port = proc, port

    def rpc(self, method: str, **params: Any) -> Any:
        return self.proc.rpc(method, **params)

    def set_host(self, method: str, nsid: int, host: str) -> None:
        """Change visibility; I/O sent after this returns sees it (sync_reactors)."""
        assert self.rpc(method, nqn=NQN, nsid=nsid, host=host) is True
        self.proc.sync_reactors()


@pytest.fixture(scope="module")
def masked() -> Iterator[Masked]:
    launcher = Launcher()
    port = free_port()
    try:
        t = launcher(config([malloc(f"M{i}", 2048, BS) for i in (1, 2, 3)], nvmf_calls(port)),
                     cores=[0, 1])
        yield Masked(t, port)
    finally:
        launcher.cleanup()


@contextlib.asynccontextmanager
async def host(port: int, hostnqn: str = HOSTNQN) -> AsyncIterator[Controller]:
    hostid = HOSTID if hostnqn == HOSTNQN else str(uuid.uuid5(uuid.NAMESPACE_URL, hostnqn))
    c = await connect("127.0.0.1", port, NQN, hostnqn=hostnqn, hostid=hostid, timeout=10)
    try:
        yield c
    finally:
        await c.disconnect()


async def read_status(c: Controller, nsid: int) -> int:
    r = await c.io(spec.IoOpcode.READ, nsid, 0, 0, 0, in_len=BS, check=False)
    return r.completion.status


async def write_read(c: Controller, nsid: int, lba: int, fill: int) -> bytes:
    data = bytes([fill]) * BS
    w = await c.io(spec.IoOpcode.WRITE, nsid, lba, 0, 0, data_out=data, check=False)
    assert w.completion.status == 0, hex(w.completion.status)
    r = await c.io(spec.IoOpcode.READ, nsid, lba, 0, 0, in_len=BS, check=False)
    assert r.completion.status == 0
    return bytes(r.data)


async def ana_nsids(c: Controller) -> list[int]:
    length = spec.ANA_LOG_HEADER_SIZE + MAXNS * (spec.ANA_GROUP_DESC_SIZE + 4)
    _, groups = structs.parse_ana_log(await c.get_log_page(spec.LogPage.ANA, length))
    return sorted(n for g in groups for n in g.nsids)


async def not_done(fut: Any, seconds: float = 0.5) -> bool:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(fut), seconds)
        return False
    return True


async def test_each_host_sees_only_its_namespaces(masked: Masked) -> None:
    async with host(masked.port) as a, host(masked.port, OTHER) as b:
        assert await a.active_ns_list() == [1, 2]
        assert await b.active_ns_list() == [1]
        assert await ana_nsids(a) == [1, 2] and await ana_nsids(b) == [1]
        # a masked namespace reads as inactive (zeroed data) and has no descriptors
        assert (await b.identify_ns(2))["nsze"] == 0
        assert (await a.identify_ns(2))["nsze"] == 2048
        st = await b.admin(spec.AdminOpcode.IDENTIFY, 2,
                           *structs.encode_identify(spec.Cns.NS_DESC_LIST), in_len=4096,
                           check=False)
        assert st.completion.status == INVALID_NS
        # I/O: as for an absent namespace for the host that may not see it
        assert await write_read(a, 2, 7, 0xA2) == bytes([0xA2]) * BS
        assert await read_status(b, 2) == INVALID_NS
        assert await read_status(a, 3) == INVALID_NS
        assert await read_status(b, 3) == INVALID_NS
        w = await b.io(spec.IoOpcode.WRITE, 2, 7, 0, 0, data_out=bytes(BS), check=False)
        assert w.completion.status == INVALID_NS
        assert await write_read(a, 2, 7, 0xA2) == bytes([0xA2]) * BS  # untouched by b
        assert await write_read(b, 1, 0, 0x11) == bytes([0x11]) * BS
        # the SMART log of a namespace the host cannot see is refused as for a missing one
        r = await b.admin(spec.AdminOpcode.GET_LOG_PAGE, 2,
                          *structs.encode_get_log_page(spec.LogPage.SMART, 512, 0),
                          in_len=512, check=False)
        assert r.completion.status != 0
        r = await a.admin(spec.AdminOpcode.GET_LOG_PAGE, 2,
                          *structs.encode_get_log_page(spec.LogPage.SMART, 512, 0),
                          in_len=512, check=False)
        assert r.completion.status == 0


async def test_add_and_remove_host_live_with_event_to_that_host_only(masked: Masked) -> None:
    async with host(masked.port) as a, host(masked.port, OTHER) as b:
        for c in (a, b):
            await c.set_features(spec.FeatureId.ASYNC_EVENT, spec.AenConfig.NS_ATTR)
        aer_a, aer_b = await a.async_event_request(), await b.async_event_request()
        masked.set_host("nvmf_ns_add_host", 3, OTHER)
        assert await asyncio.wait_for(aer_b, 5) == NS_AEN
        assert await not_done(aer_a)  # a's view did not change
        changed = structs.parse_changed_ns_list(
            await b.get_log_page(spec.LogPage.CHANGED_NS, 4096))
        assert changed == [3]
        assert await b.active_ns_list() == [1, 3]
        assert await write_read(b, 3, 3, 0xB3) == bytes([0xB3]) * BS
        assert await read_status(a, 3) == INVALID_NS

        aer_b = await b.async_event_request()
        masked.set_host("nvmf_ns_remove_host", 3, OTHER)
        assert await asyncio.wait_for(aer_b, 5) == NS_AEN
        assert await b.active_ns_list() == [1]
        assert await read_status(b, 3) == INVALID_NS
        # shown to the other host now: its controller hears of it and reads what b wrote
        masked.set_host("nvmf_ns_add_host", 3, HOSTNQN)
        try:
            assert await asyncio.wait_for(aer_a, 5) == NS_AEN
            assert structs.parse_changed_ns_list(
                await a.get_log_page(spec.LogPage.CHANGED_NS, 4096)) == [3]
            r = await a.io(spec.IoOpcode.READ, 3, 3, 0, 0, in_len=BS)
            assert bytes(r.data) == bytes([0xB3]) * BS
        finally:
            masked.set_host("nvmf_ns_remove_host", 3, HOSTNQN)
        assert await read_status(a, 3) == INVALID_NS


async def test_a_masked_namespace_added_live_notifies_only_its_hosts(masked: Masked) -> None:
    masked.rpc("bdev_malloc_create", name="M4", num_blocks=64, block_size=BS)
    try:
        async with host(masked.port) as a, host(masked.port, OTHER) as b:
            for c in (a, b):
                await c.set_features(spec.FeatureId.ASYNC_EVENT, spec.AenConfig.NS_ATTR)
            aer_a, aer_b = await a.async_event_request(), await b.async_event_request()
            masked.rpc("nvmf_subsystem_add_ns", nqn=NQN,
                       namespace={"bdev_name": "M4", "nsid": 4, "no_auto_visible": True})
            masked.proc.sync_reactors()
            assert await not_done(aer_a) and await not_done(aer_b, 0.1)
            assert await a.active_ns_list() == [1, 2]
            masked.set_host("nvmf_ns_add_host", 4, HOSTNQN)
            assert await asyncio.wait_for(aer_a, 5) == NS_AEN
            assert await not_done(aer_b)
            assert await a.active_ns_list() == [1, 2, 4]
            # removing the namespace tells only the hosts that saw it
            aer_a = await a.async_event_request()
            await a.get_log_page(spec.LogPage.CHANGED_NS, 4096)  # (re-arms the event)
            masked.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=4)
            assert await asyncio.wait_for(aer_a, 5) == NS_AEN
            assert await not_done(aer_b)
    finally:
        with contextlib.suppress(RpcCallError):
            masked.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=4)
        masked.rpc("bdev_malloc_delete", name="M4")


def test_errors_are_clear(masked: Masked) -> None:
    def err(**p: Any) -> RpcCallError:
        method = p.pop("method", "nvmf_ns_add_host")
        with pytest.raises(RpcCallError) as ei:
            masked.rpc(method, **{"nqn": NQN, **p})
        return ei.value

    e = err(nsid=1, host=OTHER)
    assert e.code == -32602 and "visible to every host" in str(e) and "no_auto_visible" in str(e)
    e = err(nsid=2, host=HOSTNQN)
    assert e.code == -17 and "already visible" in str(e)
    e = err(method="nvmf_ns_remove_host", nsid=2, host=OTHER)
    assert e.code == -19 and "not visible" in str(e)
    e = err(nsid=9, host=OTHER)
    assert e.code == -19 and "nsid 9 does not exist" in str(e)
    e = err(nsid=2)
    assert e.code == -32602 and "host" in str(e)
    e = err(method="nvmf_subsystem_add_ns", namespace={"bdev_name": "M1",
                                                       "no_auto_visible": "yes"})
    assert e.code == -32602 and "no_auto_visible" in str(e)


def test_get_subsystems_save_config_and_restart(masked: Masked) -> None:
    sub = next(s for s in masked.rpc("nvmf_get_subsystems") if s["nqn"] == NQN)
    by = {ns["nsid"]: ns for ns in sub["namespaces"]}
    assert "no_auto_visible" not in by[1]
    assert by[2]["no_auto_visible"] is True and by[2]["hosts"] == [{"nqn": HOSTNQN}]
    assert by[3]["no_auto_visible"] is True and by[3]["hosts"] == []
    saved = masked.rpc("save_config")
    calls = [e for s in saved["subsystems"] if s["subsystem"] == "nvmf" for e in s["config"]]
    adds = {e["params"]["namespace"]["nsid"]: e["params"]["namespace"] for e in calls
            if e["method"] == "nvmf_subsystem_add_ns"}
    assert adds[2]["no_auto_visible"] is True and adds[3]["no_auto_visible"] is True
    assert "no_auto_visible" not in adds[1]
    assert [e["params"] for e in calls if e["method"] == "nvmf_ns_add_host"] == [
        {"nqn": NQN, "nsid": 2, "host": HOSTNQN}]
    # a new process from the saved config masks the same way
    saved.pop("blocktarget", None)
    port = free_port()
    text = json.dumps(saved).replace(f'"{masked.port}"', f'"{port}"')
    launcher = Launcher()
    try:
        launcher(json.loads(text), cores=[0])

        async def check() -> None:
            async with host(port) as a, host(port, OTHER) as b:
                assert await a.active_ns_list() == [1, 2]
                assert await b.active_ns_list() == [1]
                assert await read_status(b, 2) == INVALID_NS

        asyncio.run(check())
    finally:
        launcher.cleanup()


def test_spdk_client_drives_masking(masked: Masked) -> None:
    """SPDK's own rpc.py: `nvmf_subsystem_add_ns -i` (no auto visible, sent inside
    `namespace`), `nvmf_ns_add_host`, `nvmf_ns_remove_host`."""
    from .test_spdk_client import SPDK_RPC, SpdkRpc

    if not Path(SPDK_RPC).exists():
        pytest.fail(f"{SPDK_RPC} is missing (the spdk package is a test dependency)")
    masked.rpc("bdev_malloc_create", name="M5", num_blocks=64, block_size=BS)
    rpc = SpdkRpc(masked.proc.sock_path)
    try:
        rpc.ok("nvmf_subsystem_add_ns", NQN, "M5", "-n", "4", "-i")
        rpc.ok("nvmf_ns_add_host", NQN, "4", OTHER)
        ns = {n["nsid"]: n for s in rpc.json("nvmf_get_subsystems") if s["nqn"] == NQN
              for n in s["namespaces"]}[4]
        assert ns["no_auto_visible"] is True and ns["hosts"] == [{"nqn": OTHER}]

        async def visible() -> tuple[list[int], list[int]]:
            async with host(masked.port) as a, host(masked.port, OTHER) as b:
                return await a.active_ns_list(), await b.active_ns_list()

        assert asyncio.run(visible()) == ([1, 2], [1, 4])
        rpc.ok("nvmf_ns_remove_host", NQN, "4", OTHER)
        assert asyncio.run(visible()) == ([1, 2], [1])
        err = rpc.fails("nvmf_ns_add_host", NQN, "1", OTHER)
        assert err["code"] == -32602 and "visible to every host" in err["message"]
    finally:
        rpc.close()
        with contextlib.suppress(RpcCallError):
            masked.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=4)
        masked.rpc("bdev_malloc_delete", name="M5")
