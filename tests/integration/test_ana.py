"""ANA (asymmetric namespace access) against a real target process, through the Python
initiator: Identify fields, the ANA log page as each listener's controllers see it, the
ANA change event (only to controllers that enabled it, on the listener that changed),
the path status of I/O on an inaccessible path, the RPCs and their errors, save_config.

The kernel's multipath over two target processes is tests/vm/test_multipath.py.
Budget: about 10 s (one target, a handful of connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.host import Controller, connect
from blocktarget.nvme import spec, structs
from blocktarget.rpc_client import RpcCallError

from .nvme_target_util import HOSTID, HOSTNQN
from .target_proc import Launcher, RunningTarget, config, free_port, listen_address, malloc

pytestmark = pytest.mark.timeout(60)

NQN = "nqn.2026-01.io.blocktarget.test:ana"
PLAIN = "nqn.2026-01.io.blocktarget.test:noana"
MAXNS = 4
N = spec.AsyncEventNotice
ANA_AEN = spec.make_aen_result(spec.AsyncEventType.NOTICE, N.ANA_CHANGE, spec.LogPage.ANA)
AEC_ANA = spec.AenConfig.ANA_CHANGE | spec.AenConfig.NS_ATTR
LOG_LEN = spec.ANA_LOG_HEADER_SIZE + MAXNS * (spec.ANA_GROUP_DESC_SIZE + 4)
OPT, NONOPT, INACC = spec.AnaState.OPTIMIZED, spec.AnaState.NON_OPTIMIZED, spec.AnaState.INACCESSIBLE


class Ana:
    def __init__(self, proc: RunningTarget, p1: int, p2: int) -> None:
        self.proc, self.p1, self.p2 = proc, p1, p2

    def rpc(self, method: str, **params: Any) -> Any:
        return self.proc.rpc(method, **params)

    def set_state(self, port: int, state: str, grp: int | None = None) -> Any:
        """Set an ANA state; I/O sent after this returns sees it (the queue pairs learn
        of it in messages to their reactors: RunningTarget.sync_reactors)."""
        p: dict[str, Any] = {"nqn": NQN, "listen_address": listen_address(port),
                             "ana_state": state}
        if grp is not None:
            p["anagrpid"] = grp
        changed = self.rpc("nvmf_subsystem_listener_set_ana_state", **p)
        self.proc.sync_reactors()
        return changed


@pytest.fixture(scope="module")
def ana() -> Iterator[Ana]:
    """Namespaces 1 (group 1, the default = nsid), 2 and 3 (both group 2) on two
    listeners; a subsystem without ANA reporting for the error cases."""
    launcher = Launcher()
    p1, p2 = free_port(), free_port()
    sub = {"nqn": NQN, "allow_any_host": True, "ana_reporting": True,
           "max_namespaces": MAXNS, "serial_number": "BTANA0001",
           "min_cntlid": 100, "max_cntlid": 199}
    nvmf = [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": sub},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {
            "bdev_name": "M1", "nsid": 1}}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {
            "bdev_name": "M2", "nsid": 2}}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {
            "bdev_name": "M3", "nsid": 3, "anagrpid": 2}}},
        {"method": "nvmf_subsystem_add_listener", "params": {
            "nqn": NQN, "listen_address": listen_address(p1)}},
        {"method": "nvmf_subsystem_add_listener", "params": {
            "nqn": NQN, "listen_address": listen_address(p2)}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": PLAIN, "allow_any_host": True}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": PLAIN, "namespace": {
            "bdev_name": "M4"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {
            "nqn": PLAIN, "listen_address": listen_address(p1)}},
    ]
    bdevs = [malloc(f"M{i}", 2048, 512) for i in range(1, 5)]
    try:
        t = launcher(config(bdevs, nvmf), cores=[0, 1])
        yield Ana(t, p1, p2)
    finally:
        launcher.cleanup()


@pytest.fixture(autouse=True)
def _all_optimized(ana: Ana) -> Iterator[None]:
    yield
    for port in (ana.p1, ana.p2):
        ana.set_state(port, "optimized")


@contextlib.asynccontextmanager
async def host(port: int, nqn: str = NQN) -> AsyncIterator[Controller]:
    c = await connect("127.0.0.1", port, nqn, hostnqn=HOSTNQN, hostid=HOSTID, timeout=10)
    try:
        yield c
    finally:
        await c.disconnect()


async def ana_log(c: Controller, rgo: bool = False) -> tuple[int, list[structs.AnaGroup]]:
    raw = await c.get_log_page(spec.LogPage.ANA, LOG_LEN,
                               lsp=spec.ANA_LOG_LSP_RGO if rgo else 0)
    return structs.parse_ana_log(raw)


def states(groups: list[structs.AnaGroup]) -> dict[int, tuple[int, tuple[int, ...]]]:
    return {g.grpid: (g.state, tuple(g.nsids)) for g in groups}


async def io_status(c: Controller, opcode: int, nsid: int) -> int:
    nlb = 1
    if opcode == spec.IoOpcode.READ:
        r = await c.io(opcode, nsid, 0, 0, nlb - 1, in_len=512 * nlb, check=False)
    elif opcode == spec.IoOpcode.WRITE:
        r = await c.io(opcode, nsid, 0, 0, nlb - 1, data_out=bytes(512), check=False)
    else:
        r = await c.io(opcode, nsid, check=False)
    return r.completion.status


async def not_done(fut: Any, seconds: float = 0.5) -> bool:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(fut), seconds)
        return False
    return True


# ------------------------------------------------------------------------- Identify


async def test_identify_reports_ana_and_multi_controller(ana: Ana) -> None:
    async with host(ana.p1) as c:
        idc = c.id_ctrl
        assert idc["cmic"] & spec.Cmic.MULTI_CTRL and idc["cmic"] & spec.Cmic.ANA
        assert idc["oaes"] & spec.AenConfig.ANA_CHANGE
        assert idc["anacap"] == (spec.Anacap.OPTIMIZED | spec.Anacap.NON_OPTIMIZED
                                 | spec.Anacap.INACCESSIBLE | spec.Anacap.GRPID_NO_CHANGE)
        assert idc["anagrpmax"] == idc["nanagrpid"] == MAXNS
        # Linux refuses ANA unless 0 < MNAN <= NN
        assert idc["nn"] == MAXNS and idc["mnan"] == MAXNS
        assert idc["anatt"] > 0
        assert 100 <= c.cntlid <= 199  # min_cntlid/max_cntlid
        assert [(await c.identify_ns(n))["anagrpid"] for n in (1, 2, 3)] == [1, 2, 2]
        assert (await c.identify_ns(1))["nmic"] & spec.Nmic.SHARED
    async with host(ana.p1, PLAIN) as c:
        assert c.id_ctrl["cmic"] & spec.Cmic.MULTI_CTRL
        assert not c.id_ctrl["cmic"] & spec.Cmic.ANA and c.id_ctrl["anacap"] == 0
        assert (await c.identify_ns(1))["anagrpid"] == 0
        r = await c.admin(spec.AdminOpcode.GET_LOG_PAGE, spec.NSID_ALL,
                          *structs.encode_get_log_page(spec.LogPage.ANA, 64, 0),
                          in_len=64, check=False)
        assert spec.status_sc(r.completion.status) == spec.CommandStatus.INVALID_LOG_PAGE


# ---------------------------------------------------------------------- log page


async def test_ana_log_is_per_listener(ana: Ana) -> None:
    async with host(ana.p1) as a, host(ana.p2) as b:
        chg0, groups = await ana_log(a)
        assert states(groups) == {1: (OPT, (1,)), 2: (OPT, (2, 3))}
        ana.set_state(ana.p2, "inaccessible", 2)
        ana.set_state(ana.p2, "non_optimized", 1)
        chg_a, ga = await ana_log(a)
        chg_b, gb = await ana_log(b)
        # CHGCNT counts changes of the subsystem; each group carries its last one
        assert chg_a == chg_b == chg0 + 2
        assert states(ga) == {1: (OPT, (1,)), 2: (OPT, (2, 3))}
        assert states(gb) == {1: (NONOPT, (1,)), 2: (INACC, (2, 3))}
        assert {g.grpid: g.chgcnt for g in gb} == {1: chg0 + 2, 2: chg0 + 1}
        # Return Groups Only: descriptors without NSID lists
        _, rgo = await ana_log(b, rgo=True)
        assert [(g.grpid, g.state, g.nsids) for g in rgo] == [(1, NONOPT, ()), (2, INACC, ())]
        # setting the state a group already has changes nothing
        ana.set_state(ana.p2, "inaccessible", 2)
        assert (await ana_log(b))[0] == chg0 + 2
        # a controller connected after the change sees it at once
        async with host(ana.p2) as b2:
            assert states((await ana_log(b2))[1]) == states(gb)


# ------------------------------------------------------------ I/O and ANA change AEN


async def test_inaccessible_path_fails_io_with_path_status_and_sends_aen(ana: Ana) -> None:
    async with host(ana.p1) as a, host(ana.p2) as b, host(ana.p2) as quiet:
        for c in (a, b):
            await c.set_features(spec.FeatureId.ASYNC_EVENT, AEC_ANA)
        await quiet.set_features(spec.FeatureId.ASYNC_EVENT, spec.AenConfig.NS_ATTR)
        aer_a, aer_b = await a.async_event_request(), await b.async_event_request()
        aer_quiet = await quiet.async_event_request()

        ana.set_state(ana.p2, "inaccessible", 2)
        assert await asyncio.wait_for(aer_b, 5) == ANA_AEN
        assert await not_done(aer_a)  # p1's view did not change
        assert await not_done(aer_quiet, 0.1)  # it did not enable ANA change events

        for op in (spec.IoOpcode.READ, spec.IoOpcode.WRITE, spec.IoOpcode.FLUSH):
            for nsid in (2, 3):
                st = await io_status(b, op, nsid)
                assert (spec.status_sct(st), spec.status_sc(st)) == (
                    spec.Sct.PATH, spec.PathStatus.ANA_INACCESSIBLE), (op, nsid, hex(st))
                assert not spec.status_dnr(st)  # the host must be free to retry elsewhere
            assert await io_status(b, op, 1) == 0  # group 1 is still optimized there
            assert await io_status(a, op, 2) == 0  # and group 2 through p1
        # admin commands stay allowed on an inaccessible namespace
        assert (await b.identify_ns(2))["anagrpid"] == 2
        assert await io_status(b, spec.IoOpcode.READ, 9) == spec.make_status(
            spec.Sct.GENERIC, spec.GenericStatus.INVALID_NS, dnr=True)

        # no further event until the host has read the log page (RAE clear); the read
        # shows it the newest state, and the next change is announced again
        aer_b = await b.async_event_request()
        ana.set_state(ana.p2, "non_optimized", 2)
        assert await not_done(aer_b)
        _, groups = await ana_log(b)
        assert states(groups)[2] == (NONOPT, (2, 3))
        assert await not_done(aer_b, 0.2)
        ana.set_state(ana.p2, "non_optimized", 1)
        assert await asyncio.wait_for(aer_b, 5) == ANA_AEN
        assert await io_status(b, spec.IoOpcode.READ, 2) == 0  # non-optimized still serves

        # a namespace added to an inaccessible group is inaccessible at once
        ana.set_state(ana.p2, "inaccessible", 4)
        ana.rpc("bdev_malloc_create", name="M5", num_blocks=64, block_size=512)
        ana.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "M5", "nsid": 4})
        try:
            ana.proc.sync_reactors()  # the queue pairs have learnt of the namespace
            st = await io_status(b, spec.IoOpcode.READ, 4)
            assert spec.status_sct(st) == spec.Sct.PATH
            assert await io_status(a, spec.IoOpcode.READ, 4) == 0
        finally:
            ana.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=4)
            ana.rpc("bdev_malloc_delete", name="M5")


async def test_state_for_all_groups_and_back(ana: Ana) -> None:
    async with host(ana.p2) as b:
        ana.set_state(ana.p2, "inaccessible")  # no anagrpid: every group
        assert {g.state for g in (await ana_log(b))[1]} == {INACC}
        st = await io_status(b, spec.IoOpcode.READ, 1)
        assert spec.status_sct(st) == spec.Sct.PATH
        ana.set_state(ana.p2, "optimized")
        assert {g.state for g in (await ana_log(b))[1]} == {OPT}
        assert await io_status(b, spec.IoOpcode.READ, 1) == 0


# ------------------------------------------------------------------------------ RPC


def test_get_listeners_shape(ana: Ana) -> None:
    ana.set_state(ana.p2, "inaccessible", 2)
    got = ana.rpc("nvmf_subsystem_get_listeners", nqn=NQN)
    assert [x["address"]["trsvcid"] for x in got] == [str(ana.p1), str(ana.p2)]
    assert got[0]["address"] == {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
                                 "trsvcid": str(ana.p1)}
    assert got[1]["ana_states"] == [
        {"ana_group": 1, "ana_state": "optimized"},
        {"ana_group": 2, "ana_state": "inaccessible"},
        {"ana_group": 3, "ana_state": "optimized"},
        {"ana_group": 4, "ana_state": "optimized"},
    ]
    plain = ana.rpc("nvmf_subsystem_get_listeners", nqn=PLAIN)
    # no ANA: no ana_states (and the listener says it is not a TLS one)
    assert plain == [{"address": plain[0]["address"], "secure_channel": False}]


@pytest.mark.parametrize("params, code, words", [
    ({"ana_state": "sideways"}, -32602, "ana_state"),
    ({"ana_state": "change"}, -32602, "ana_state"),
    ({"ana_state": "optimized", "anagrpid": MAXNS + 1}, -32602, "anagrpid"),
    ({"ana_state": "optimized", "anagrpid": -1}, -32602, "anagrpid"),
    ({"ana_state": "optimized", "port": "other"}, -19, "listener"),
    ({"ana_state": "optimized", "nqn": PLAIN}, -32602, "ANA reporting is disabled"),
    ({"ana_state": "optimized", "nqn": "nqn.2026-01.io.x:none"}, -19, "does not exist"),
    ({}, -32602, "ana_state"),
])
def test_set_ana_state_errors(ana: Ana, params: dict[str, Any], code: int, words: str) -> None:
    p: dict[str, Any] = {"nqn": NQN, "listen_address": listen_address(ana.p1), **params}
    if p.pop("port", None):
        p["listen_address"] = listen_address(free_port())
    with pytest.raises(RpcCallError) as err:
        ana.rpc("nvmf_subsystem_listener_set_ana_state", **p)
    assert err.value.code == code and words in err.value.message, err.value


def test_add_ns_anagrpid_out_of_range(ana: Ana) -> None:
    ana.rpc("bdev_malloc_create", name="M9", num_blocks=64, block_size=512)
    try:
        with pytest.raises(RpcCallError) as err:
            ana.rpc("nvmf_subsystem_add_ns", nqn=NQN,
                    namespace={"bdev_name": "M9", "anagrpid": MAXNS + 1})
        assert err.value.code == -32602 and "anagrpid" in err.value.message
        # the bdev was not claimed by the failed add
        ana.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "M9", "nsid": 4})
        ana.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=4)
    finally:
        ana.rpc("bdev_malloc_delete", name="M9")


async def test_add_listener_with_initial_state_and_save_config(ana: Ana) -> None:
    p3 = free_port()
    la = listen_address(p3)
    with pytest.raises(RpcCallError) as err:
        ana.rpc("nvmf_subsystem_add_listener", nqn=PLAIN, listen_address=la,
                ana_state="inaccessible")
    assert err.value.code == -32602
    ana.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=la,
            ana_state="non_optimized")
    try:
        async with host(p3) as c:
            assert {g.state for g in (await ana_log(c))[1]} == {NONOPT}
        ana.set_state(p3, "inaccessible", 2)
        saved = ana.rpc("save_config")
        calls = [e for s in saved["subsystems"] if s["subsystem"] == "nvmf"
                 for e in s["config"] if e["method"] == "nvmf_subsystem_listener_set_ana_state"]
        assert {(e["params"]["anagrpid"], e["params"]["ana_state"]) for e in calls
                if e["params"]["listen_address"]["trsvcid"] == str(p3)} == {
            (1, "non_optimized"), (2, "inaccessible"), (3, "non_optimized"),
            (4, "non_optimized")}
        before = ana.rpc("nvmf_subsystem_get_listeners", nqn=NQN)
    finally:
        ana.rpc("nvmf_subsystem_remove_listener", nqn=NQN, listen_address=la)
    # the saved config rebuilds the same ANA states in a new process (on new ports)
    saved.pop("blocktarget", None)  # its RPC addresses belong to the running target
    text = json.dumps(saved)
    for old in (ana.p1, ana.p2, p3):
        new = free_port()
        text = text.replace(f'"{old}"', f'"{new}"')
        before = json.loads(json.dumps(before).replace(f'"{old}"', f'"{new}"'))
    launcher = Launcher()
    try:
        t2 = launcher(json.loads(text), cores=[0])
        assert t2.rpc("nvmf_subsystem_get_listeners", nqn=NQN) == before
    finally:
        launcher.cleanup()


def test_spdk_client_drives_ana(ana: Ana) -> None:
    """SPDK's own rpc.py (`spdk-rpc`), unmodified: its argument shapes reach the same
    methods (it sends anagrpid only when given, listen_address grouped)."""
    from .test_spdk_client import SPDK_RPC, SpdkRpc

    if not Path(SPDK_RPC).exists():
        pytest.fail(f"{SPDK_RPC} is missing (the spdk package is a test dependency)")
    rpc = SpdkRpc(ana.proc.sock_path)
    try:
        port = str(ana.p2)
        rpc.ok("nvmf_subsystem_listener_set_ana_state", NQN, "-n", "inaccessible", "-t", "tcp",
               "-a", "127.0.0.1", "-f", "ipv4", "-s", port, "-g", "2")
        rpc.ok("nvmf_subsystem_listener_set_ana_state", NQN, "-n", "non_optimized", "-t", "tcp",
               "-a", "127.0.0.1", "-s", port, "-g", "1")
        got = {x["address"]["trsvcid"]: x.get("ana_states") for x in
               rpc.json("nvmf_subsystem_get_listeners", NQN)}
        assert [s["ana_state"] for s in got[port]] == [
            "non_optimized", "inaccessible", "optimized", "optimized"]
        assert {s["ana_state"] for s in got[str(ana.p1)]} == {"optimized"}
        err = rpc.fails("nvmf_subsystem_listener_set_ana_state", PLAIN, "-n", "inaccessible",
                        "-t", "tcp", "-a", "127.0.0.1", "-s", str(ana.p1))
        assert err["code"] == -32602 and "ANA reporting is disabled" in err["message"]
    finally:
        rpc.close()
