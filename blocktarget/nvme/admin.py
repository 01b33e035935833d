"""Admin commands, one handler per opcode in a table (like Linux nvmet's admin-cmd.c).

Every structure returned is built whole and then cut to the host's offset/length, so a
handler never has to reason about partial reads.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import __version__
from . import spec
from .controller import AERL, ERROR_LOG_ENTRIES, KAS_100MS
from .discovery import discovery_log
from .structs import (
    AnaGroup,
    LbaFormat,
    PowerState,
    build_ana_log,
    build_changed_ns_list,
    build_cmd_effects_log,
    build_error_log,
    build_fw_slot_log,
    build_identify_ctrl,
    build_identify_ns,
    build_ns_desc_list,
    build_ns_list,
    build_smart_log,
    decode_get_log_page,
    decode_identify,
    slice_log,
)
from .subsystem import ANA_STATES

if TYPE_CHECKING:
    from .controller import Controller
    from .qpair import Qpair, Request
    from .subsystem import Namespace

log = logging.getLogger(__name__)

G = spec.Sct.GENERIC
CS = spec.Sct.COMMAND_SPECIFIC
SC_INVALID_FIELD = spec.make_status(G, spec.GenericStatus.INVALID_FIELD, dnr=True)
SC_INVALID_OPCODE = spec.make_status(G, spec.GenericStatus.INVALID_OPCODE, dnr=True)
SC_INVALID_NS = spec.make_status(G, spec.GenericStatus.INVALID_NS, dnr=True)
SC_INVALID_LOG_PAGE = spec.make_status(CS, spec.CommandStatus.INVALID_LOG_PAGE, dnr=True)
SC_AER_LIMIT = spec.make_status(CS, spec.CommandStatus.ASYNC_EVENT_LIMIT_EXCEEDED, dnr=True)
SC_NOT_SAVEABLE = spec.make_status(CS, spec.CommandStatus.FEATURE_ID_NOT_SAVEABLE, dnr=True)
SC_NOT_CHANGEABLE = spec.make_status(CS, spec.CommandStatus.FEATURE_NOT_CHANGEABLE, dnr=True)
SC_KATO_INVALID = spec.make_status(G, spec.GenericStatus.KEEP_ALIVE_INVALID, dnr=True)
SC_HOSTID_FORMAT = spec.make_status(G, spec.GenericStatus.HOST_ID_INCONSISTENT_FORMAT, dnr=True)
SC_SEQUENCE = spec.make_status(G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR, dnr=True)

# A locally administered company id (CID range: second nibble 0xA), not an IEEE-assigned
# OUI: the field must be filled, and we own no OUI.  Stored least significant byte first.
IEEE_ID = bytes((0x4B, 0x54, 0x0A))
FIRMWARE_REV = __version__[:8]
TEMPERATURE_K = 300  # no sensor behind a software target: a constant room temperature
PROCESS_START = time.monotonic()
# ANA: the states we enter (no "change", no "persistent loss") and ANAGRPID fixed while
# a namespace is attached; ANATT bounds a transition we never report, so it is short.
ANACAP = (spec.Anacap.OPTIMIZED | spec.Anacap.NON_OPTIMIZED | spec.Anacap.INACCESSIBLE
          | spec.Anacap.GRPID_NO_CHANGE)
ANATT_S = 10

Handler = Callable[["Qpair", "Request"], None]


def _ctrl(qp: Qpair) -> Controller:
    assert qp.ctrl is not None
    return qp.ctrl


# ---------------------------------------------------------------- Identify


def identify_controller_data(qp: Qpair) -> bytes:
    ctrl = _ctrl(qp)
    sub = ctrl.subsystem
    opts = qp.opts
    mdts = (opts.max_io_size // 4096).bit_length() - 1
    common = {
        "sn": sub.serial_number[:20],
        "mn": sub.model_number[:40],
        "fr": FIRMWARE_REV,
        "ieee": IEEE_ID,
        "cntlid": ctrl.cntlid,
        "ver": spec.make_version(1, 4, 0),
        "ctratt": spec.Ctratt.HOST_ID_128,
        "mdts": mdts,
        "lpa": spec.Lpa.EXTENDED_DATA | spec.Lpa.CMD_EFFECTS,
        "elpe": ERROR_LOG_ENTRIES - 1,
        "kas": KAS_100MS,
        "maxcmd": opts.max_queue_depth,
        "sgls": spec.Sgls.SUPPORTED | spec.Sgls.OFFSET,
        "subnqn": sub.nqn,
        "ioccsz": (64 + opts.in_capsule_data_size) // 16,
        "iorcsz": 1,
        "msdbd": 1,
        "acl": 3,
        "aerl": AERL,
    }
    if ctrl.discovery:
        return build_identify_ctrl(
            cntrltype=spec.CtrlType.DISCOVERY,
            oaes=spec.AenConfig.DISCOVERY_LOG_CHANGE,
            **{k: v for k, v in common.items() if k not in ("ioccsz", "iorcsz", "msdbd")},
        )
    cache = any(ns.bdev.write_cache for ns in sub.namespaces.values())
    cmic = spec.Cmic.MULTI_CTRL | (spec.Cmic.ANA if sub.ana_reporting else 0)
    oaes = spec.AenConfig.NS_ATTR | (spec.AenConfig.ANA_CHANGE if sub.ana_reporting else 0)
    extra = {}
    if sub.ana_reporting:
        # One group per possible nsid at most (SPDK's limits). MNAN must then be set and
        # not above NN, or Linux refuses ANA ("Invalid MNAN value").
        extra = {"anatt": ANATT_S, "anacap": ANACAP, "anagrpmax": sub.max_namespaces,
                 "nanagrpid": sub.max_namespaces, "mnan": sub.max_namespaces}
    return build_identify_ctrl(
        cntrltype=spec.CtrlType.IO,
        cmic=cmic,
        oaes=oaes,
        rab=6,
        frmw=spec.Frmw.SLOT1_RO | (1 << spec.FRMW_NUM_SLOTS_SHIFT),
        npss=0,
        psd=[PowerState(mp=2500)],
        wctemp=343,
        cctemp=373,
        sqes=spec.SQES_NVM,
        cqes=spec.CQES_NVM,
        nn=sub.max_namespaces,
        oncs=spec.Oncs.COMPARE | spec.Oncs.DSM | spec.Oncs.WRITE_ZEROES,
        vwc=(spec.Vwc.PRESENT if cache else 0) | spec.Vwc.FLUSH_BROADCAST_NOT_SUPPORTED,
        awun=0,
        awupf=0,
        fuses=0,
        **({"mnan": 0} | extra),
        **common,
    )


def identify_ns_data(ns: Namespace, sub_ana: bool) -> bytes:
    b = ns.bdev
    from ..bdev import IOType

    lbads = b.block_size.bit_length() - 1
    dlfeat = 0
    nsfeat = 0
    if IOType.UNMAP in b.io_types:
        nsfeat |= spec.NsFeat.DEALLOC_ERROR
        dlfeat |= spec.Dlfeat.READ_ZEROES | spec.Dlfeat.WRITE_ZEROES_DEALLOC
    return build_identify_ns(
        nsze=b.num_blocks,
        ncap=b.num_blocks,
        nuse=b.num_blocks,
        nsfeat=nsfeat,
        nlbaf=0,
        flbas=0,
        nmic=spec.Nmic.SHARED,
        dlfeat=dlfeat,
        anagrpid=ns.anagrpid if sub_ana else 0,
        nguid=bytes.fromhex(ns.nguid),
        eui64=bytes.fromhex(ns.eui64) if ns.eui64 else bytes(8),
        lbaf=[LbaFormat(ms=0, lbads=lbads, rp=0)],
    )


def identify(qp: Qpair, req: Request) -> None:
    ctrl = _ctrl(qp)
    args = decode_identify(req.sqe.cdw10, req.sqe.cdw11)
    sub = ctrl.subsystem
    nsid = req.sqe.nsid
    cns = args.cns
    if cns == spec.Cns.CTRL:
        req.complete_data(identify_controller_data(qp))
        return
    if ctrl.discovery:
        req.fail(SC_INVALID_FIELD)
        return
    if cns == spec.Cns.NS:
        if nsid == 0 or (nsid > sub.max_namespaces and nsid != spec.NSID_ALL):
            req.fail(SC_INVALID_NS)
            return
        ns = sub.visible_ns(nsid, ctrl.hostnqn)
        if ns is None:
            # an allocated-but-inactive (or broadcast, or masked) nsid reads as zeroes
            req.complete_data(bytes(spec.IDENTIFY_DATA_SIZE))
            return
        req.complete_data(identify_ns_data(ns, sub.ana_reporting))
    elif cns == spec.Cns.ACTIVE_NS_LIST:
        if nsid >= 0xFFFFFFFE:
            req.fail(SC_INVALID_NS)
            return
        req.complete_data(build_ns_list(sub.visible_nsids(ctrl.hostnqn), after=nsid))
    elif cns == spec.Cns.NS_DESC_LIST:
        ns = sub.visible_ns(nsid, ctrl.hostnqn)
        if ns is None:
            req.fail(SC_INVALID_NS)
            return
        descs = []
        if ns.eui64:
            descs.append((spec.NidType.EUI64, bytes.fromhex(ns.eui64)))
        descs.append((spec.NidType.NGUID, bytes.fromhex(ns.nguid)))
        descs.append((spec.NidType.UUID, uuidlib.UUID(ns.uuid).bytes))
        descs.append((spec.NidType.CSI, bytes([spec.Csi.NVM])))
        req.complete_data(build_ns_desc_list(descs))
    elif cns == spec.Cns.CS_CTRL and args.csi == spec.Csi.NVM:
        req.complete_data(bytes(spec.IDENTIFY_DATA_SIZE))  # no NVM-specific limits
    else:
        req.fail(SC_INVALID_FIELD)


# ---------------------------------------------------------------- log pages


def _smart(ctrl: Controller) -> bytes:
    ctrl.fold_local()
    t = ctrl.totals()
    hours = int((time.monotonic() - PROCESS_START) // 3600)
    return build_smart_log(
        critical_warning=0,
        temperature=TEMPERATURE_K,
        avail_spare=100,
        spare_thresh=10,
        percent_used=0,
        data_units_read=-(-t.read_blocks_bytes // 512000),  # units of 1000 x 512 bytes
        data_units_written=-(-t.write_bytes // 512000),
        host_read_commands=t.read_cmds,
        host_write_commands=t.write_cmds,
        power_cycles=1,
        power_on_hours=hours,
        unsafe_shutdowns=0,
        media_errors=0,
        num_err_log_entries=ctrl.error_count,
    )


ADMIN_EFFECTS = spec.CmdEffects.CSUPP
IO_READ_EFFECTS = spec.CmdEffects.CSUPP
IO_WRITE_EFFECTS = spec.CmdEffects.CSUPP | spec.CmdEffects.LBCC


def _effects() -> bytes:
    admin = {op: ADMIN_EFFECTS for op in ADMIN_HANDLERS}
    admin[spec.FABRICS_OPCODE] = ADMIN_EFFECTS
    from .io import IO_HANDLERS

    io = {}
    for op in IO_HANDLERS:
        io[op] = IO_WRITE_EFFECTS if op in (
            spec.IoOpcode.WRITE, spec.IoOpcode.WRITE_ZEROES, spec.IoOpcode.DATASET_MANAGEMENT
        ) else IO_READ_EFFECTS
    return build_cmd_effects_log(admin, io)


def _ana(ctrl: Controller, rgo: bool) -> bytes:
    """The ANA log as this controller sees it: the states of the listener its admin
    queue came through, one descriptor per group that holds a namespace."""
    sub = ctrl.subsystem
    addr = ctrl.listener
    out = [
        AnaGroup(grp, ANA_STATES[sub.ana_state(addr, grp)], tuple(nsids),
                 sub.ana_group_chgcnt.get((addr, grp), 0) if addr is not None else 0)
        for grp, nsids in sorted(sub.ana_groups(ctrl.hostnqn).items())
    ]
    return build_ana_log(sub.ana_chgcnt, out, rgo=rgo)


def get_log_page(qp: Qpair, req: Request) -> None:
    ctrl = _ctrl(qp)
    s = req.sqe
    args = decode_get_log_page(s.cdw10, s.cdw11, s.cdw12, s.cdw13, s.cdw14)
    lid = args.lid
    if args.offset % 4:
        req.fail(SC_INVALID_FIELD)
        return
    page: bytes
    if ctrl.discovery:
        if lid != spec.LogPage.DISCOVERY:
            req.fail(SC_INVALID_LOG_PAGE)
            return
        page = discovery_log(qp.target, ctrl.hostnqn, qp.addr, qp.local_addr)
    elif lid == spec.LogPage.ERROR:
        page = build_error_log(list(ctrl.errors)).ljust(
            ERROR_LOG_ENTRIES * spec.ERROR_LOG_ENTRY_SIZE, b"\0")
    elif lid == spec.LogPage.SMART:
        if (s.nsid not in (0, spec.NSID_ALL)
                and ctrl.subsystem.visible_ns(s.nsid, ctrl.hostnqn) is None):
            req.fail(SC_INVALID_NS if s.nsid > ctrl.subsystem.max_namespaces
                     else SC_INVALID_FIELD)
            return
        page = _smart(ctrl)
    elif lid == spec.LogPage.FW_SLOT:
        page = build_fw_slot_log(1, [FIRMWARE_REV])
    elif lid == spec.LogPage.CHANGED_NS:
        nsids = sorted(ctrl.changed_ns) if not ctrl.changed_ns_overflow else [spec.NSID_ALL]
        page = build_changed_ns_list(nsids)
    elif lid == spec.LogPage.CMD_EFFECTS:
        page = _effects()
    elif lid == spec.LogPage.ANA and ctrl.subsystem.ana_reporting:
        page = _ana(ctrl, bool(args.lsp & spec.ANA_LOG_LSP_RGO))
    else:
        req.fail(SC_INVALID_LOG_PAGE)
        return
    if args.offset > len(page) or args.length > req.xfer_len:
        # NUMD is up to 16 GiB and the part past the page is zero-filled, so it may not
        # ask for more than the host's buffer (SPDK: Invalid Field); the fuzzer found a
        # discovery host could otherwise make the target allocate 16 GiB.
        req.fail(SC_INVALID_FIELD)
        return
    ctrl.log_read(lid, args.rae)
    req.complete_data(slice_log(page, args.offset, args.length))


# ---------------------------------------------------------------- features


def _fid_sel(req: Request) -> tuple[int, int]:
    cdw10 = req.sqe.cdw10
    return cdw10 & 0xFF, (cdw10 >> spec.GET_FEATURES_SEL_SHIFT) & 0x7


SIMPLE_FEATURES = {
    spec.FeatureId.ARBITRATION, spec.FeatureId.POWER_MGMT, spec.FeatureId.ERR_RECOVERY,
    spec.FeatureId.IRQ_COALESCE, spec.FeatureId.IRQ_CONFIG, spec.FeatureId.WRITE_ATOMIC,
}
CHANGEABLE = SIMPLE_FEATURES | {
    spec.FeatureId.TEMP_THRESH, spec.FeatureId.VOLATILE_WC, spec.FeatureId.NUM_QUEUES,
    spec.FeatureId.ASYNC_EVENT, spec.FeatureId.KATO, spec.FeatureId.HOST_ID,
}
DEFAULTS = {
    spec.FeatureId.TEMP_THRESH: 343,
    spec.FeatureId.VOLATILE_WC: 1,
}


def _num_queues_value(n: int) -> int:
    return ((n - 1) << 16) | (n - 1)


def get_features(qp: Qpair, req: Request) -> None:
    ctrl = _ctrl(qp)
    fid, sel = _fid_sel(req)
    if sel == spec.FeatureSelect.SUPPORTED_CAPABILITIES:
        if fid not in CHANGEABLE:
            req.fail(SC_INVALID_FIELD)
            return
        req.complete(0, 0x4 if fid != spec.FeatureId.HOST_ID else 0x4)  # changeable
        return
    if sel == spec.FeatureSelect.SAVED:
        sel = spec.FeatureSelect.CURRENT  # nothing is saveable: saved = current
    if fid == spec.FeatureId.NUM_QUEUES:
        n = ctrl.granted_io_queues if sel == 0 else ctrl.max_io_queues
        req.complete(0, _num_queues_value(max(n, 1)))
    elif fid == spec.FeatureId.KATO:
        req.complete(0, ctrl.kato_ms)
    elif fid == spec.FeatureId.HOST_ID:
        if not req.sqe.cdw11 & 1:
            req.fail(SC_HOSTID_FORMAT)  # fabrics use the 128-bit host identifier
            return
        req.complete_data(ctrl.hostid)
    elif fid == spec.FeatureId.TEMP_THRESH:
        tmpsel = (req.sqe.cdw11 >> 20) & 0x3
        if sel == 1:
            req.complete(0, DEFAULTS[fid])
        elif tmpsel == 1:
            req.complete(0, ctrl.under_temp_threshold | (1 << 20))
        else:
            req.complete(0, ctrl.features[fid] & 0xFFFF)
    elif fid == spec.FeatureId.VOLATILE_WC:
        if ctrl.discovery:
            req.fail(SC_INVALID_FIELD)
            return
        has_cache = any(ns.bdev.write_cache for ns in ctrl.subsystem.namespaces.values())
        req.complete(0, 1 if has_cache else 0)
    elif fid in ctrl.features:
        req.complete(0, ctrl.features[fid] if sel == 0 else DEFAULTS.get(fid, 0))
    else:
        req.fail(SC_INVALID_FIELD)


def set_features(qp: Qpair, req: Request) -> None:
    ctrl = _ctrl(qp)
    fid = req.sqe.cdw10 & 0xFF
    value = req.sqe.cdw11
    if req.sqe.cdw10 & spec.SET_FEATURES_SAVE:
        req.fail(SC_NOT_SAVEABLE)
        return
    if fid == spec.FeatureId.NUM_QUEUES:
        if ctrl.discovery:
            req.fail(SC_INVALID_FIELD)
            return
        nsqr, ncqr = value & 0xFFFF, value >> 16
        if nsqr == 0xFFFF or ncqr == 0xFFFF:
            req.fail(SC_INVALID_FIELD)
            return
        if any(q != 0 for q in ctrl.qpairs):
            req.fail(SC_SEQUENCE)  # only before I/O queues exist
            return
        n = min(nsqr + 1, ncqr + 1, ctrl.max_io_queues)
        ctrl.granted_io_queues = n
        req.complete(0, _num_queues_value(n))
    elif fid == spec.FeatureId.KATO:
        ctrl.set_kato(value)
        req.complete(0)
    elif fid == spec.FeatureId.ASYNC_EVENT:
        ctrl.features[fid] = value
        req.complete(0)
    elif fid == spec.FeatureId.TEMP_THRESH:
        tmpsel = (value >> 16) & 0xF
        thsel = (value >> 20) & 0x3
        if tmpsel not in (0, 0xF) or thsel > 1:
            req.fail(SC_INVALID_FIELD)
            return
        if thsel == 1:
            ctrl.under_temp_threshold = value & 0xFFFF
        else:
            ctrl.features[fid] = value & 0xFFFF
        req.complete(0)
    elif fid == spec.FeatureId.VOLATILE_WC:
        if ctrl.discovery:
            req.fail(SC_INVALID_FIELD)
            return
        has_cache = any(ns.bdev.write_cache for ns in ctrl.subsystem.namespaces.values())
        if (value & 1) != (1 if has_cache else 0):
            # the bdevs decide whether a cache exists; it cannot be switched off here
            req.fail(SC_NOT_CHANGEABLE)
            return
        req.complete(0)
    elif fid == spec.FeatureId.HOST_ID:
        # the host identifier is fixed by Connect on fabrics
        req.fail(SC_SEQUENCE)
    elif fid in SIMPLE_FEATURES:
        if fid == spec.FeatureId.POWER_MGMT and (value & 0x1F) != 0:
            req.fail(SC_INVALID_FIELD)  # power state 0 is the only one
            return
        ctrl.features[fid] = value
        req.complete(0)
    else:
        req.fail(SC_INVALID_FIELD)


# ---------------------------------------------------------------- others


def async_event_request(qp: Qpair, req: Request) -> None:
    ctrl = _ctrl(qp)
    if not ctrl.hold_aer(lambda dw0: req.complete(0, dw0)):
        req.fail(SC_AER_LIMIT)


def keep_alive(qp: Qpair, req: Request) -> None:
    _ctrl(qp).keep_alive()
    req.complete(0)


def abort(qp: Qpair, req: Request) -> None:
    """Abort: a command still waiting for its data is failed (Aborted By Request); one
    already executing runs to completion (dw0 bit 0 = 1 reports "not aborted").

    The victim's queue may live on another reactor: the check runs there, as a message,
    and the answer comes back to this (the admin) reactor, so neither touches the
    other's state."""
    ctrl = _ctrl(qp)
    sqid = req.sqe.cdw10 & 0xFFFF
    cid = req.sqe.cdw10 >> 16
    target_qp = ctrl.qpairs.get(sqid)
    if target_qp is None:
        req.complete(0, 1)
        return
    if target_qp.reactor is qp.reactor:
        req.complete(0, 0 if target_qp.abort_waiting(cid) else 1)
        return
    here, there = qp.reactor.loop, target_qp.reactor.loop
    if here is None or there is None:
        req.complete(0, 1)
        return

    def on_victim_reactor() -> None:
        aborted = target_qp.abort_waiting(cid)
        here.call_soon_threadsafe(req.complete, 0, 0 if aborted else 1)

    there.call_soon_threadsafe(on_victim_reactor)


ADMIN_HANDLERS: dict[int, Handler] = {
    spec.AdminOpcode.IDENTIFY: identify,
    spec.AdminOpcode.GET_LOG_PAGE: get_log_page,
    spec.AdminOpcode.SET_FEATURES: set_features,
    spec.AdminOpcode.GET_FEATURES: get_features,
    spec.AdminOpcode.ASYNC_EVENT_REQUEST: async_event_request,
    spec.AdminOpcode.KEEP_ALIVE: keep_alive,
    spec.AdminOpcode.ABORT: abort,
}

DISCOVERY_ADMIN = {
    spec.AdminOpcode.IDENTIFY, spec.AdminOpcode.GET_LOG_PAGE, spec.AdminOpcode.KEEP_ALIVE,
    spec.AdminOpcode.ASYNC_EVENT_REQUEST, spec.AdminOpcode.SET_FEATURES,
    spec.AdminOpcode.GET_FEATURES,
}
