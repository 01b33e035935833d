"""Admin commands of blocktarget's target through the Python initiator (exact statuses
via raw `admin()` calls) and raw queues where the host library would hide the detail:
Identify, log pages, features, Keep Alive enforcement, AER, Abort, unsupported opcodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from blocktarget import __version__
from blocktarget.host import Controller, NvmeStatusError, connect
from blocktarget.nvme import pdu, spec, structs

from .nvme_target_util import (
    CS,
    HOSTID,
    HOSTNQN,
    NQN,
    G,
    RawQueue,
    Tgt,
    open_queue,
    raw_controller,
    sct_sc,
    start_target,
)
from .target_proc import Launcher, listen_address, malloc

pytestmark = pytest.mark.timeout(60)

NS1_UUID = "3b241101-e2bb-4255-8caf-4136c566a962"
NS1_NGUID = "00112233445566778899aabbccddeeff"
NS1_EUI64 = "0123456789abcdef"
NULLSUB = "nqn.2016-06.io.blocktarget.test:nullsub"
SERIAL = "BTADMIN0001"
INVALID_FIELD = (G, spec.GenericStatus.INVALID_FIELD)
INVALID_NS = (G, spec.GenericStatus.INVALID_NS)
INVALID_OPCODE = (G, spec.GenericStatus.INVALID_OPCODE)
INVALID_LOG_PAGE = (CS, spec.CommandStatus.INVALID_LOG_PAGE)
FW_REV = __version__[:8]


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    null_bdev = {"method": "bdev_null_create",
                 "params": {"name": "Null0", "num_blocks": 4096, "block_size": 512}}
    port_listen: dict[str, Any] = {}
    try:
        t = start_target(
            launcher, cores=(0, 1), serial=SERIAL,
            bdevs=[malloc("Malloc0", 65536, 512), malloc("Malloc1", 2048, 4096),
                   malloc("Spare0", 1024, 512), malloc("Spare1", 1024, 512), null_bdev],
            ns=[{"bdev_name": "Malloc0", "nsid": 1, "uuid": NS1_UUID, "nguid": NS1_NGUID,
                 "eui64": NS1_EUI64},
                {"bdev_name": "Malloc1", "nsid": 2}],
        )
        port_listen.update(listen_address(t.port))
        t.rpc("nvmf_create_subsystem", nqn=NULLSUB, allow_any_host=True)
        t.rpc("nvmf_subsystem_add_ns", nqn=NULLSUB, namespace={"bdev_name": "Null0"})
        t.rpc("nvmf_subsystem_add_listener", nqn=NULLSUB, listen_address=port_listen)
        yield t
    finally:
        launcher.cleanup()


@contextlib.asynccontextmanager
async def host(t: Tgt, nqn: str = NQN, **kw: Any) -> AsyncIterator[Controller]:
    c = await connect(t.addr, t.port, nqn, hostnqn=HOSTNQN, hostid=HOSTID, timeout=10, **kw)
    try:
        yield c
    finally:
        await c.disconnect()


def st(r: Any) -> tuple[int, int]:
    return spec.status_sct(r.completion.status), spec.status_sc(r.completion.status)


async def admin_status(c: Controller, opcode: int, **kw: Any) -> tuple[int, int]:
    return st(await c.admin(opcode, check=False, **kw))


# ------------------------------------------------------------------------- Identify


async def test_identify_controller(tgt: Tgt) -> None:
    async with host(tgt) as c:
        idc = c.id_ctrl
        assert idc["mn"] == "blocktarget"  # no model_number in the config: the default
        assert idc["sn"] == SERIAL
        assert idc["fr"] == FW_REV
        assert idc["subnqn"] == NQN
        assert idc["cntlid"] == c.cntlid
        assert idc["cntrltype"] == spec.CtrlType.IO
        assert idc["ver"] >= spec.make_version(1, 3)
        assert idc["ctratt"] & spec.Ctratt.HOST_ID_128
        assert idc["mdts"] == 5  # 128 KiB (max_io_size default) in 4 KiB pages
        assert idc["ioccsz"] == (64 + 8192) // 16 and idc["iorcsz"] == 1
        assert idc["icdoff"] == 0 and idc["msdbd"] == 1
        assert idc["sqes"] == spec.SQES_NVM and idc["cqes"] == spec.CQES_NVM
        assert idc["maxcmd"] == 128
        assert idc["nn"] == 32
        oncs = spec.Oncs.COMPARE | spec.Oncs.DSM | spec.Oncs.WRITE_ZEROES
        assert idc["oncs"] & oncs == oncs
        assert idc["vwc"] & spec.Vwc.PRESENT  # malloc bdevs have a volatile "cache"
        assert idc["oaes"] & spec.AenConfig.NS_ATTR
        assert idc["kas"] > 0 and idc["aerl"] == 3 and idc["elpe"] == 63
        assert idc["lpa"] & spec.Lpa.CMD_EFFECTS
        assert len(idc["ieee"]) == 3 and idc["ieee"] != bytes(3)
        assert idc["sgls"] & 0x3  # SGLs supported


async def test_identify_namespaces_and_descriptors(tgt: Tgt) -> None:
    async with host(tgt) as c:
        assert await c.active_ns_list() == [1, 2]
        r = await c.admin(spec.AdminOpcode.IDENTIFY, 1, spec.Cns.ACTIVE_NS_LIST,
                          in_len=4096)
        assert structs.parse_ns_list(bytes(r.data or b"")) == [2]  # ids above nsid
        ns1 = await c.identify_ns(1)
        assert (ns1["nsze"], ns1["ncap"], ns1["nuse"]) == (65536, 65536, 65536)
        assert ns1["lbaf"][structs.flbas_index(ns1["flbas"])].lbads == 9
        assert ns1["nguid"] == bytes.fromhex(NS1_NGUID)
        assert ns1["eui64"] == bytes.fromhex(NS1_EUI64)
        descs = dict(await c.ns_descriptors(1))
        assert descs[spec.NidType.EUI64] == bytes.fromhex(NS1_EUI64)
        assert descs[spec.NidType.NGUID] == bytes.fromhex(NS1_NGUID)
        assert descs[spec.NidType.UUID] == uuid.UUID(NS1_UUID).bytes
        assert descs[spec.NidType.CSI] == bytes([spec.Csi.NVM])
        # Without ids in the config: the bdev's UUID, and the NGUID derived from it.
        bdev = tgt.rpc("bdev_get_bdevs", name="Malloc1")[0]
        ns2 = await c.identify_ns(2)
        assert ns2["lbaf"][structs.flbas_index(ns2["flbas"])].lbads == 12
        descs2 = dict(await c.ns_descriptors(2))
        assert descs2[spec.NidType.UUID] == uuid.UUID(bdev["uuid"]).bytes
        assert descs2[spec.NidType.NGUID] == uuid.UUID(bdev["uuid"]).bytes
        assert ns2["nguid"] == descs2[spec.NidType.NGUID]
        assert spec.NidType.EUI64 not in descs2
        # ... and what nvmf_get_subsystems reports is the same.
        sub = tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]
        by_nsid = {n["nsid"]: n for n in sub["namespaces"]}
        assert by_nsid[1]["uuid"] == NS1_UUID and by_nsid[1]["nguid"] == NS1_NGUID.upper()
        assert by_nsid[2]["uuid"] == bdev["uuid"]


async def test_identify_inactive_and_invalid_nsid(tgt: Tgt) -> None:
    async with host(tgt) as c:
        # An allocated-but-inactive nsid reads as zeroes...
        assert await c.identify(spec.Cns.NS, 5) == bytes(4096)
        # ... nsid 0 and ids beyond NN are invalid.
        for nsid in (0, 33):
            assert await admin_status(c, spec.AdminOpcode.IDENTIFY, nsid=nsid,
                                      cdw10=spec.Cns.NS, in_len=4096) == INVALID_NS
        assert await admin_status(c, spec.AdminOpcode.IDENTIFY, nsid=5,
                                  cdw10=spec.Cns.NS_DESC_LIST, in_len=4096) == INVALID_NS
        assert await admin_status(c, spec.AdminOpcode.IDENTIFY, nsid=0xFFFFFFFE,
                                  cdw10=spec.Cns.ACTIVE_NS_LIST, in_len=4096) == INVALID_NS
        assert await admin_status(c, spec.AdminOpcode.IDENTIFY, cdw10=0x15,
                                  in_len=4096) == INVALID_FIELD


# ------------------------------------------------------------------------ log pages


async def test_error_log_records_failed_commands(tgt: Tgt) -> None:
    async with host(tgt) as c:
        before = structs.parse_error_log(await c.get_log_page(spec.LogPage.ERROR, 4096))
        assert before == []  # a fresh controller has no errors
        r = await c.io(spec.IoOpcode.READ, 99, 0, 0, 0, in_len=512, check=False)
        assert st(r) == INVALID_NS
        assert await admin_status(c, spec.AdminOpcode.GET_LOG_PAGE,
                                  cdw10=0xBF | (127 << 16), in_len=512) == INVALID_LOG_PAGE
        entries = structs.parse_error_log(await c.get_log_page(spec.LogPage.ERROR, 4096))
        assert [e.error_count for e in entries] == [2, 1]  # newest first
        admin_e, io_e = entries
        assert (admin_e.sqid, io_e.sqid) == (0, 1)
        assert io_e.nsid == 99
        assert io_e.status == spec.make_status(G, spec.GenericStatus.INVALID_NS, dnr=True)
        assert admin_e.status == spec.make_status(CS, spec.CommandStatus.INVALID_LOG_PAGE,
                                                  dnr=True)
        smart = await c.smart_log()
        assert smart["num_err_log_entries"] == 2


async def test_smart_counts_what_the_host_did(tgt: Tgt) -> None:
    async with host(tgt) as c:
        s0 = await c.smart_log()
        assert (s0["data_units_read"], s0["data_units_written"]) == (0, 0)
        assert (s0["host_read_commands"], s0["host_write_commands"]) == (0, 0)
        data = os.urandom(131072)
        for i in range(10):
            await c.write(1, 20000 + i * 256, data)
        for i in range(5):
            await c.read(1, 20000 + i * 256, 256)
        await c.write(2, 100, os.urandom(4096))  # ns 2 counts too (controller-wide)
        # The counts of commands the reactor's C poller answered reach the controller
        # once that poll returns, which may be just after the host has its answer: a
        # count may lag by one poll (as a drive's SMART counters are updated lazily).
        deadline = time.monotonic() + 2
        while True:
            s = await c.smart_log()
            if (s["host_write_commands"], s["host_read_commands"]) == (11, 5) \
                    or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        # Data units are thousands of 512-byte units, rounded up.
        assert s["data_units_written"] == math.ceil((10 * 131072 + 4096) / 512 / 1000)
        assert s["data_units_read"] == math.ceil(5 * 131072 / 512 / 1000)
        assert (s["host_write_commands"], s["host_read_commands"]) == (11, 5)
        assert s["critical_warning"] == 0 and s["avail_spare"] == 100
        assert 273 < s["temperature"] < 373
        assert s["power_cycles"] >= 1


async def test_firmware_slot_log(tgt: Tgt) -> None:
    async with host(tgt) as c:
        afi, revs = structs.parse_fw_slot_log(
            await c.get_log_page(spec.LogPage.FW_SLOT, spec.FW_SLOT_LOG_SIZE))
        assert afi & 0x7 == 1 and revs[0] == FW_REV == c.id_ctrl["fr"]
        assert all(r == "" for r in revs[1:])


async def test_commands_supported_and_effects(tgt: Tgt) -> None:
    async with host(tgt) as c:
        admin, io = structs.parse_cmd_effects_log(
            await c.get_log_page(spec.LogPage.CMD_EFFECTS, spec.CMD_EFFECTS_LOG_SIZE))
        A = spec.AdminOpcode
        for op in (A.GET_LOG_PAGE, A.IDENTIFY, A.ABORT, A.SET_FEATURES, A.GET_FEATURES,
                   A.ASYNC_EVENT_REQUEST, A.KEEP_ALIVE):
            assert admin[op] & spec.CmdEffects.CSUPP, op
        assert 0x80 not in admin  # Format NVM: not supported, not listed
        Io = spec.IoOpcode
        for op in (Io.READ, Io.WRITE, Io.FLUSH, Io.COMPARE, Io.WRITE_ZEROES,
                   Io.DATASET_MANAGEMENT):
            assert io[op] & spec.CmdEffects.CSUPP, op
        for op in (Io.WRITE, Io.WRITE_ZEROES, Io.DATASET_MANAGEMENT):
            assert io[op] & spec.CmdEffects.LBCC  # they change logical block content
        assert not io[Io.READ] & spec.CmdEffects.LBCC
        assert 0x0D not in io  # reservations: not supported


async def test_log_page_errors(tgt: Tgt) -> None:
    async with host(tgt) as c:
        for lid in (0xBF, spec.LogPage.DISCOVERY, 0x0C):  # 0Ch: ANA is off here
            assert await admin_status(c, spec.AdminOpcode.GET_LOG_PAGE,
                                      cdw10=lid | (127 << 16), in_len=512) == INVALID_LOG_PAGE
        # Offsets must be dword aligned and inside the page.
        d10, d11, _, d13, d14 = structs.encode_get_log_page(spec.LogPage.SMART, 512)
        assert st(await c.admin(spec.AdminOpcode.GET_LOG_PAGE, spec.NSID_ALL, d10, d11, 2,
                                d13, d14, in_len=512, check=False)) == INVALID_FIELD
        cdw = structs.encode_get_log_page(spec.LogPage.SMART, 512, 8192)
        assert st(await c.admin(spec.AdminOpcode.GET_LOG_PAGE, spec.NSID_ALL, *cdw,
                                in_len=512, check=False)) == INVALID_FIELD
        # A partial read is the right slice of the whole page.
        whole = await c.get_log_page(spec.LogPage.CMD_EFFECTS, 4096)
        assert await c.get_log_page(spec.LogPage.CMD_EFFECTS, 64, offset=1024) == \
            whole[1024:1088]


async def test_discovery_controller_log_and_commands(tgt: Tgt) -> None:
    async with host(tgt, spec.DISCOVERY_NQN, kato_ms=0) as c:
        assert c.id_ctrl["cntrltype"] == spec.CtrlType.DISCOVERY
        assert c.id_ctrl["subnqn"] == spec.DISCOVERY_NQN
        page = await c.get_log_page(spec.LogPage.DISCOVERY, 4096)
        log = structs.parse_discovery_log(page)
        assert log.numrec >= 2 and {NQN, NULLSUB} <= {e.subnqn for e in log.entries}
        assert await admin_status(c, spec.AdminOpcode.GET_LOG_PAGE,
                                  cdw10=spec.LogPage.SMART | (127 << 16),
                                  in_len=512) == INVALID_LOG_PAGE
        # Only discovery commands: Abort or Namespace-specific Identify are not.
        assert await admin_status(c, spec.AdminOpcode.ABORT) == INVALID_OPCODE
        assert await admin_status(c, spec.AdminOpcode.IDENTIFY, nsid=1, cdw10=spec.Cns.NS,
                                  in_len=4096) == INVALID_FIELD


async def test_changed_namespace_list(tgt: Tgt) -> None:
    async with host(tgt) as c:
        async def changed(rae: bool = False) -> list[int]:
            return structs.parse_changed_ns_list(
                await c.get_log_page(spec.LogPage.CHANGED_NS, 4096, rae=rae))

        assert await changed() == []
        tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Spare0",
                                                            "nsid": 7})
        try:
            tgt.sync_reactors()  # the change reaches the controller as a message
            assert await changed(rae=True) == [7]
            assert await changed(rae=True) == [7]  # RAE: kept
            assert await changed() == [7]  # read without RAE: cleared afterwards
            assert await changed() == []
        finally:
            tgt.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=7)
        tgt.sync_reactors()
        assert await changed() == [7]
        assert 7 not in await c.active_ns_list()


# ------------------------------------------------------------------------- features


async def test_features(tgt: Tgt) -> None:
    async with host(tgt, nr_io_queues=2) as c:
        F = spec.FeatureId

        async def get(fid: int, cdw11: int = 0, sel: int = 0) -> int:
            return (await c.get_features(fid, cdw11, sel=sel)).completion.dw0

        async def set_(fid: int, cdw11: int, *, save: bool = False) -> tuple[int, int]:
            r = await c.admin(spec.AdminOpcode.SET_FEATURES,
                              cdw10=fid | (spec.SET_FEATURES_SAVE if save else 0),
                              cdw11=cdw11, check=False)
            return st(r)

        # Number of queues: what connect() asked for and got (2), now fixed.
        assert await get(F.NUM_QUEUES) == (1 << 16) | 1
        assert await set_(F.NUM_QUEUES, 0) == (G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR)
        # Async event configuration round trip (connect() enabled NS attribute notices).
        assert await get(F.ASYNC_EVENT) == spec.AenConfig.NS_ATTR
        assert await set_(F.ASYNC_EVENT, 0) == (0, 0)
        assert await get(F.ASYNC_EVENT) == 0
        # KATO: the Connect value (5 s), then changed.
        assert await get(F.KATO) == 5000
        assert await set_(F.KATO, 7000) == (0, 0)
        assert await get(F.KATO) == 7000
        # Host identifier: the 128-bit one from Connect; EXHID must be set; not settable.
        r = await c.get_features(F.HOST_ID, 1, in_len=16)
        assert bytes(r.data or b"") == HOSTID
        assert await admin_status(c, spec.AdminOpcode.GET_FEATURES, cdw10=F.HOST_ID,
                                  in_len=16) == (G, spec.GenericStatus.HOST_ID_INCONSISTENT_FORMAT)
        assert await set_(F.HOST_ID, 1) == (G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR)
        # Temperature threshold: over (default 343 K) and under thresholds, sensor 0.
        assert await get(F.TEMP_THRESH) & 0xFFFF == 343
        assert await set_(F.TEMP_THRESH, 350) == (0, 0)
        assert await get(F.TEMP_THRESH) & 0xFFFF == 350
        assert await get(F.TEMP_THRESH, sel=spec.FeatureSelect.DEFAULT) & 0xFFFF == 343
        assert await set_(F.TEMP_THRESH, (1 << 20) | 250) == (0, 0)
        assert await get(F.TEMP_THRESH, 1 << 20) & 0xFFFF == 250
        assert await get(F.TEMP_THRESH) & 0xFFFF == 350
        assert await set_(F.TEMP_THRESH, (1 << 16) | 300) == INVALID_FIELD  # no sensor 1
        assert await set_(F.TEMP_THRESH, (2 << 20) | 300) == INVALID_FIELD
        # Volatile write cache: malloc has one; it cannot be turned off from here.
        assert await get(F.VOLATILE_WC) == 1
        assert await set_(F.VOLATILE_WC, 1) == (0, 0)
        assert await set_(F.VOLATILE_WC, 0) == (CS, spec.CommandStatus.FEATURE_NOT_CHANGEABLE)
        # Simple features: arbitration, power management (state 0 only), coalescing.
        assert await set_(F.ARBITRATION, 0x3) == (0, 0)
        assert await get(F.ARBITRATION) == 0x3
        assert await set_(F.POWER_MGMT, 1) == INVALID_FIELD
        assert await set_(F.POWER_MGMT, 0) == (0, 0)
        assert await set_(F.IRQ_COALESCE, 0x0A04) == (0, 0)
        assert await get(F.IRQ_COALESCE) == 0x0A04
        assert await get(F.IRQ_COALESCE, sel=spec.FeatureSelect.DEFAULT) == 0
        # Nothing is saveable; supported capabilities say "changeable".
        for fid in (F.ARBITRATION, F.TEMP_THRESH, F.ASYNC_EVENT, F.KATO):
            assert await set_(fid, 0, save=True) == (CS,
                                                     spec.CommandStatus.FEATURE_ID_NOT_SAVEABLE)
        assert await get(F.ARBITRATION, sel=spec.FeatureSelect.SUPPORTED_CAPABILITIES) == 0x4
        # Unknown feature ids.
        assert await set_(0x7F, 0) == INVALID_FIELD
        assert await admin_status(c, spec.AdminOpcode.GET_FEATURES, cdw10=0x7F) == \
            INVALID_FIELD


async def test_volatile_write_cache_follows_the_bdev(tgt: Tgt) -> None:
    async with host(tgt, NULLSUB) as c:
        assert not c.id_ctrl["vwc"] & spec.Vwc.PRESENT  # null bdevs have no cache
        assert (await c.get_features(spec.FeatureId.VOLATILE_WC)).completion.dw0 == 0
        r = await c.admin(spec.AdminOpcode.SET_FEATURES, cdw10=spec.FeatureId.VOLATILE_WC,
                          cdw11=1, check=False)
        assert st(r) == (CS, spec.CommandStatus.FEATURE_NOT_CHANGEABLE)


# ----------------------------------------------------------------------- keep alive


async def test_kato_expiry_tears_the_controller_down(tgt: Tgt) -> None:
    """KATO 1 s and no Keep Alive: within ~2 x KATO the controller is gone, its I/O
    queues closed, and the command still waiting for its data never completes."""
    async with raw_controller(tgt, kato=1000) as c:
        q = c.io[0]
        sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=4096, cdw10=0, cdw12=7)
        r = await q.run(sqe, answer_r2t=False)
        assert type(r.pdus[-1]) is pdu.R2T  # outstanding, waiting for data
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await q.closed_by_target(timeout=2.5)
        assert await c.admin.closed_by_target(timeout=0.5)
        assert loop.time() - t0 < 2.0
        again = await open_queue(tgt.addr, tgt.port)
        try:
            cqe = await again.connect(2, cntlid=c.cntlid)
            assert sct_sc(cqe) == (CS, spec.FabricsStatus.CONNECT_INVALID_PARAM)
        finally:
            await again.close()


async def test_keep_alive_commands_keep_it(tgt: Tgt) -> None:
    async with raw_controller(tgt, kato=1000) as c:
        for _ in range(8):  # 1.6 s: well past KATO, but refreshed every 200 ms
            await asyncio.sleep(0.2)
            assert (await c.admin.admin(spec.AdminOpcode.KEEP_ALIVE)).ok
        assert (await c.io[0].read(1, 0, 1)).ok


async def test_set_features_kato_starts_the_timer(tgt: Tgt) -> None:
    async with raw_controller(tgt, kato=0) as c:
        await asyncio.sleep(0.3)
        r = await c.admin.admin(spec.AdminOpcode.SET_FEATURES, cdw10=spec.FeatureId.KATO,
                                cdw11=400)
        assert r.ok
        assert await c.io[0].closed_by_target(timeout=2.0)


async def test_host_library_kato_expiry(tgt: Tgt) -> None:
    """The same through the initiator: stop its keep-alive task, its queues fail."""
    c = await connect(tgt.addr, tgt.port, NQN, kato_ms=1000, timeout=10)
    try:
        assert c._ka_task is not None
        c._ka_task.cancel()
        aer = await c.async_event_request()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(aer, 3.0)
        with pytest.raises(ConnectionError):
            await c.read(1, 0, 1)
    finally:
        await c.close()


# ------------------------------------------------------------------------------ AER


def _changed(dw0: int) -> None:
    assert dw0 & 0x7 == spec.AsyncEventType.NOTICE
    assert (dw0 >> 8) & 0xFF == spec.AsyncEventNotice.NS_ATTR_CHANGED
    assert (dw0 >> 16) & 0xFF == spec.LogPage.CHANGED_NS


async def test_aen_namespace_changes_only_when_enabled(tgt: Tgt) -> None:
    async with host(tgt) as c:
        await c.set_features(spec.FeatureId.ASYNC_EVENT, 0)
        aer = await c.async_event_request()
        tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Spare1",
                                                            "nsid": 9})
        try:
            tgt.sync_reactors()  # the controller has handled the change
            log = structs.parse_changed_ns_list(
                await c.get_log_page(spec.LogPage.CHANGED_NS, 4096))
            # (a notice would have come on this admin queue ahead of the log page)
            assert not aer.done()  # disabled: no notice ...
            assert log == [9]  # ... but the log still records the change
            await c.set_features(spec.FeatureId.ASYNC_EVENT, spec.AenConfig.NS_ATTR)
        finally:
            tgt.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=9)
        _changed(await asyncio.wait_for(aer, 5))
        # Until the log page is read, further changes of that kind raise no new event.
        aer = await c.async_event_request()
        tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Spare1",
                                                            "nsid": 9})
        try:
            tgt.sync_reactors()
            log = structs.parse_changed_ns_list(
                await c.get_log_page(spec.LogPage.CHANGED_NS, 4096))
            assert not aer.done()
            assert log == [9]
        finally:
            tgt.rpc("nvmf_subsystem_remove_ns", nqn=NQN, nsid=9)
        _changed(await asyncio.wait_for(aer, 5))


async def test_aer_limit(tgt: Tgt) -> None:
    async with host(tgt) as c:
        aers = [await c.async_event_request() for _ in range(c.id_ctrl["aerl"] + 1)]
        extra = await c.async_event_request()
        with pytest.raises(NvmeStatusError) as ei:
            await asyncio.wait_for(extra, 5)
        assert (ei.value.sct, ei.value.sc) == (CS, spec.CommandStatus.ASYNC_EVENT_LIMIT_EXCEEDED)
        assert not any(a.done() for a in aers)


async def test_discovery_log_change_aen(tgt: Tgt) -> None:
    async with host(tgt, spec.DISCOVERY_NQN, kato_ms=0) as c:
        await c.set_features(spec.FeatureId.ASYNC_EVENT, spec.AenConfig.DISCOVERY_LOG_CHANGE)
        before = structs.parse_discovery_log(
            await c.get_log_page(spec.LogPage.DISCOVERY, 1024)).genctr
        aer = await c.async_event_request()
        nqn = "nqn.2016-06.io.blocktarget.test:aen"
        tgt.rpc("nvmf_create_subsystem", nqn=nqn, allow_any_host=True)
        try:
            dw0 = await asyncio.wait_for(aer, 5)
            assert dw0 & 0x7 == spec.AsyncEventType.NOTICE
            assert (dw0 >> 8) & 0xFF == spec.AsyncEventNotice.DISCOVERY_LOG_CHANGE
            assert (dw0 >> 16) & 0xFF == spec.LogPage.DISCOVERY
            after = structs.parse_discovery_log(
                await c.get_log_page(spec.LogPage.DISCOVERY, 1024)).genctr
            assert after > before
        finally:
            tgt.rpc("nvmf_delete_subsystem", nqn=nqn)


# ---------------------------------------------------------------------------- Abort


async def test_abort(tgt: Tgt) -> None:
    """A command waiting for its R2T data is aborted (ABORTED_BY_REQUEST, Abort dw0 = 0);
    data the host had already sent for it is swallowed; unknown or running commands
    are reported not aborted (dw0 bit 0). Two I/O queues: consecutive connections land
    on different reactors, so both the local and the cross-reactor path run."""
    async with raw_controller(tgt, nr_io=2) as c:
        reactors = tgt.rpc("framework_get_reactors")["reactors"]
        assert len(reactors) == 2
        for q in c.io:
            sqe = q.sqe(spec.IoOpcode.WRITE, 1, sgl_len=4096, cdw10=300, cdw12=7)
            cid = int.from_bytes(sqe[2:4], "little")
            r = await q.run(sqe, answer_r2t=False)
            r2t = r.pdus[-1]
            assert type(r2t) is pdu.R2T
            ab = await c.admin.admin(spec.AdminOpcode.ABORT, cdw10=q.qid | (cid << 16))
            assert ab.ok and ab.cqe is not None and ab.cqe.dw0 & 1 == 0
            victim = await q.collect(cid)
            assert victim.status == (G, spec.GenericStatus.ABORTED_BY_REQUEST)
            # The host's data for it arrives anyway: consumed, no protocol error.
            await q.send(pdu.H2CData(cccid=cid, ttag=r2t.ttag, datao=0, data=bytes(4096)))
            assert (await q.read(1, 0, 1)).ok
            # Nothing outstanding: not aborted.
            ab = await c.admin.admin(spec.AdminOpcode.ABORT, cdw10=q.qid | (0x777 << 16))
            assert ab.ok and ab.cqe is not None and ab.cqe.dw0 & 1 == 1
        ab = await c.admin.admin(spec.AdminOpcode.ABORT, cdw10=9 | (1 << 16))  # no sq 9
        assert ab.ok and ab.cqe is not None and ab.cqe.dw0 & 1 == 1


# ------------------------------------------------------------------ unknown opcodes


async def test_unsupported_opcodes(tgt: Tgt) -> None:
    async with host(tgt) as c:
        for op in (0x7D, 0x80, 0x10, 0x11, 0x0D, 0xC0):  # incl. Format, FW commit, vendor
            assert await admin_status(c, op) == INVALID_OPCODE, hex(op)
        for op in (0x7E, 0x0D, 0x04, 0x0C, 0x80):  # incl. reservations, Verify...
            r = await c.io(op, 1, check=False)
            assert st(r) == INVALID_OPCODE, hex(op)
        # Fused operations are not supported (FUSES = 0).
        r = await c.io(spec.IoOpcode.READ, 1, 0, 0, 0, in_len=512, check=False,
                       flags=0x40 | 0x1)
        assert st(r) == INVALID_FIELD
        # Still fine afterwards.
        await c.write(1, 0, bytes(512))


async def test_raw_queue_admin_unknown_opcode(tgt: Tgt) -> None:
    q: RawQueue = await open_queue(tgt.addr, tgt.port)
    try:
        assert (await q.connect(0)).status == 0
        await q.enable()
        r = await q.admin(0x7C)
        assert r.status == INVALID_OPCODE
    finally:
        await q.close()
