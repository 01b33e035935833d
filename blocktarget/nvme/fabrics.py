"""Fabrics commands: Connect, Property Get/Set, Disconnect (Authentication Send/Receive:
auth_cmd.py, whose AUTHREQ bits the Connect response carries).

Connect is where a queue pair joins a controller: on the admin queue it creates the
controller (dynamic controller id), on an I/O queue it finds the controller the host
already made. Invalid parameters are reported the spec's way: Connect Invalid
Parameters with IATTR/IPO naming the offending byte, in the SQE or in the Connect data.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import auth_cmd, secure_channel, spec
from .controller import Controller
from .structs import (
    CONNECT_DATA_OFFSETS,
    connect_fields,
    connect_invalid_param_dw0,
    connect_success_dw0,
    parse_connect_data,
    property_fields,
)
from .subsystem import DISCOVERY_NQN

if TYPE_CHECKING:
    from .qpair import Qpair, Request

log = logging.getLogger(__name__)

CS = spec.Sct.COMMAND_SPECIFIC
G = spec.Sct.GENERIC
SC_INVALID_PARAM = spec.make_status(CS, spec.FabricsStatus.CONNECT_INVALID_PARAM, dnr=True)
SC_INVALID_HOST = spec.make_status(CS, spec.FabricsStatus.CONNECT_INVALID_HOST, dnr=True)
SC_INCOMPATIBLE = spec.make_status(CS, spec.FabricsStatus.CONNECT_INCOMPATIBLE_FORMAT, dnr=True)
SC_CTRL_BUSY = spec.make_status(CS, spec.FabricsStatus.CONNECT_CTRL_BUSY, dnr=True)
SC_INVALID_QUEUE_TYPE = spec.make_status(CS, spec.FabricsStatus.INVALID_QUEUE_TYPE, dnr=True)
SC_INVALID_FIELD = spec.make_status(G, spec.GenericStatus.INVALID_FIELD, dnr=True)
SC_INVALID_OPCODE = spec.make_status(G, spec.GenericStatus.INVALID_OPCODE, dnr=True)
SC_SEQUENCE = spec.make_status(G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR, dnr=True)
DISCOVERY_KATO_MS = 120_000  # keep-alive of a discovery controller whose host asked none
SC_HOSTID = spec.make_status(G, spec.GenericStatus.HOST_ID_INCONSISTENT_FORMAT, dnr=True)

# byte offsets of Connect SQE fields, for IPO
OFF_RECFMT, OFF_QID, OFF_SQSIZE, OFF_CATTR, OFF_KATO = 40, 42, 44, 46, 48


def _bad_param(req: Request, offset: int, in_data: bool, why: str) -> None:
    log.info("%s: Connect refused: %s", req.qp, why)
    req.complete(SC_INVALID_PARAM, connect_invalid_param_dw0(offset, in_data))


def connect(qp: Qpair, req: Request) -> None:
    if qp.qid >= 0:
        req.fail(SC_SEQUENCE)  # one Connect per connection
        return
    f = connect_fields(req.sqe)
    if f.recfmt != spec.CONNECT_RECFMT:
        req.complete(SC_INCOMPATIBLE, f.recfmt)
        return
    if req.data is None or len(req.data) < spec.CONNECT_DATA_SIZE:
        req.fail(spec.make_status(G, spec.GenericStatus.DATA_SGL_LENGTH_INVALID, dnr=True))
        return
    try:
        data = parse_connect_data(req.data)
    except ValueError:
        _bad_param(req, CONNECT_DATA_OFFSETS["subnqn"], True, "NQN is not UTF-8")
        return
    target = qp.target
    sub = target.subsystems.find(data.subnqn)
    if sub is None:
        _bad_param(req, CONNECT_DATA_OFFSETS["subnqn"], True,
                   f"unknown subsystem {data.subnqn!r}")
        return
    # An empty host NQN (spdk_nvme_perf sends one) can only pass allow_any_host.
    if sub.nqn != DISCOVERY_NQN and not sub.listener_allowed(qp.addr):
        _bad_param(req, CONNECT_DATA_OFFSETS["subnqn"], True,
                   f"{sub.nqn} is not offered on {qp.addr}")
        return
    if not sub.host_allowed(data.hostnqn):
        log.warning("%s: host %s is not allowed to connect to %s", qp, data.hostnqn, sub.nqn)
        req.complete(SC_INVALID_HOST)
        return
    problem = secure_channel.connect_problem(qp, sub, data.hostnqn)
    if problem is not None:
        log.warning("%s: Connect refused: %s", qp, problem)
        req.complete(SC_INVALID_HOST)
        return
    opts = qp.opts
    if f.qid == 0:
        _connect_admin(qp, req, f, data, sub)
        return
    # ---- I/O queue ----
    if sub.nqn == DISCOVERY_NQN:
        _bad_param(req, OFF_QID, False, "discovery controllers have no I/O queues")
        return
    ctrl = target.controllers.find(sub.nqn, data.cntlid)
    if ctrl is None or ctrl.dead:
        _bad_param(req, CONNECT_DATA_OFFSETS["cntlid"], True,
                   f"no controller {data.cntlid} in {sub.nqn}")
        return
    if ctrl.hostid != data.hostid:
        _bad_param(req, CONNECT_DATA_OFFSETS["hostid"], True,
                   "host identifier differs from the admin queue's")
        return
    if ctrl.hostnqn != data.hostnqn:
        _bad_param(req, CONNECT_DATA_OFFSETS["hostnqn"], True,
                   "host NQN differs from the admin queue's")
        return
    if not ctrl.csts & spec.CSTS_RDY:
        req.fail(SC_SEQUENCE)  # I/O queues only on an enabled controller
        return
    if f.qid > min(ctrl.granted_io_queues, opts.max_io_qpairs_per_ctrlr):
        _bad_param(req, OFF_QID, False, f"qid {f.qid} beyond the granted queue count")
        return
    if f.qid in ctrl.qpairs:
        _bad_param(req, OFF_QID, False, f"qid {f.qid} already connected")
        return
    if f.sqsize == 0 or f.sqsize > opts.max_queue_depth - 1:
        _bad_param(req, OFF_SQSIZE, False, f"sqsize {f.sqsize} out of range")
        return
    qp.connected(ctrl, f.qid, f.sqsize, f.cattr)
    req.complete(0, connect_success_dw0(ctrl.cntlid, auth_cmd.on_connect(qp)))


def _connect_admin(qp: Qpair, req: Request, f, data, sub) -> None:  # type: ignore[no-untyped-def]
    opts = qp.opts
    if data.cntlid != spec.CNTLID_DYNAMIC:
        # Only the dynamic controller model is offered (Identify FCATT bit 0 clear).
        _bad_param(req, CONNECT_DATA_OFFSETS["cntlid"], True,
                   f"static controller id {data.cntlid} requested")
        return
    if f.sqsize < spec.MIN_ADMIN_MAX_SQ_SIZE - 1 or f.sqsize > opts.max_aq_depth - 1:
        _bad_param(req, OFF_SQSIZE, False, f"admin sqsize {f.sqsize} out of range")
        return
    discovery = sub.nqn == DISCOVERY_NQN
    if not discovery and data.hostid == bytes(16):
        # NVMe-oF requires a non-zero 128-bit host identifier on I/O controllers.
        _bad_param(req, CONNECT_DATA_OFFSETS["hostid"], True, "host identifier is zero")
        return
    target = qp.target
    # A discovery controller always has a keep-alive: a host asking for none gets 2
    # minutes (NVMe-oF spec; Linux nvmet and SPDK do the same), so an idle discovery
    # connection cannot hold its slot forever.
    kato = f.kato or (DISCOVERY_KATO_MS if discovery else 0)

    def make(cntlid: int) -> Controller:
        return Controller(
            cntlid=cntlid, subsystem=sub, hostnqn=data.hostnqn, hostid=data.hostid,
            kato_ms=kato, reactor=qp.reactor, max_queue_depth=opts.max_queue_depth,
            max_io_queues=0 if discovery else opts.max_io_qpairs_per_ctrlr,
            discovery=discovery,
        )

    ctrl = target.controllers.allocate(sub, make)
    if ctrl is None:
        req.complete(SC_CTRL_BUSY)
        return
    qp.connected(ctrl, 0, f.sqsize, f.cattr)
    ctrl.start_kato_timer()
    log.info("%s: host %s connected to %s as controller %d (kato %d ms)", qp, data.hostnqn,
             sub.nqn, ctrl.cntlid, kato)
    req.complete(0, connect_success_dw0(ctrl.cntlid, auth_cmd.on_connect(qp)))


def property_get(qp: Qpair, req: Request) -> None:
    ctrl = qp.ctrl
    assert ctrl is not None
    if qp.qid != 0:
        # Properties belong to the admin queue; Linux nvmet and SPDK both answer
        # Invalid Opcode for a fabrics command they do not take on an I/O queue.
        req.fail(SC_INVALID_OPCODE)
        return
    p = property_fields(req.sqe)
    value = ctrl.property_get(p.offset, p.size)
    if value is None:
        req.fail(SC_INVALID_FIELD)
        return
    req.complete(0, value & 0xFFFFFFFF, value >> 32)


def property_set(qp: Qpair, req: Request) -> None:
    ctrl = qp.ctrl
    assert ctrl is not None
    if qp.qid != 0:
        req.fail(SC_INVALID_OPCODE)  # as Property Get above
        return
    p = property_fields(req.sqe)
    if not ctrl.property_set(p.offset, p.size, p.value):
        req.fail(SC_INVALID_FIELD)
        return
    req.complete(0)


def disconnect(qp: Qpair, req: Request) -> None:
    """Fabrics Disconnect deletes the I/O queue it arrives on: complete it, then close.
    The admin queue is not deleted this way (NVMe-oF: Invalid Queue Type); a host ends
    the controller with CC.SHN and by closing the connection."""
    if qp.qid == 0:
        req.fail(SC_INVALID_QUEUE_TYPE)
        return
    req.complete(0)
    qp._flush()
    qp.close("Disconnect command")


def unsupported(qp: Qpair, req: Request) -> None:
    req.fail(SC_INVALID_OPCODE)


FABRICS_HANDLERS = {
    spec.FabricsType.CONNECT: connect,
    spec.FabricsType.PROPERTY_GET: property_get,
    spec.FabricsType.PROPERTY_SET: property_set,
    spec.FabricsType.DISCONNECT: disconnect,
    spec.FabricsType.AUTH_SEND: auth_cmd.auth_send,
    spec.FabricsType.AUTH_RECV: auth_cmd.auth_recv,
}
