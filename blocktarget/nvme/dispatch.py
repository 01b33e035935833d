"""Route a command to its handler: fabrics by fctype, admin or I/O by opcode.

One function decides which table applies, so the queue-state rules (nothing but Connect
before Connect, no I/O on the admin queue, discovery controllers answer only discovery
commands, nothing but Property commands before CC.EN, nothing but Authentication
Send/Receive on a queue that owes DH-HMAC-CHAP) live in one readable place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import spec
from .admin import ADMIN_HANDLERS, DISCOVERY_ADMIN
from .fabrics import FABRICS_HANDLERS
from .io import IO_HANDLERS

if TYPE_CHECKING:
    from .qpair import Qpair, Request

G = spec.Sct.GENERIC
SC_INVALID_OPCODE = spec.make_status(G, spec.GenericStatus.INVALID_OPCODE, dnr=True)
SC_SEQUENCE = spec.make_status(G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR, dnr=True)
SC_INVALID_FIELD = spec.make_status(G, spec.GenericStatus.INVALID_FIELD, dnr=True)
SC_AUTH_REQUIRED = spec.make_status(spec.Sct.COMMAND_SPECIFIC, spec.FabricsStatus.AUTH_REQUIRED,
                                    dnr=True)
AUTH_FCTYPES = (spec.FabricsType.AUTH_SEND, spec.FabricsType.AUTH_RECV)


def dispatch(qp: Qpair, req: Request) -> None:
    sqe = req.sqe
    if sqe.opcode == spec.FABRICS_OPCODE:
        fctype = sqe.fctype
        if qp.ctrl is None and fctype != spec.FabricsType.CONNECT:
            req.fail(SC_SEQUENCE)
            return
        if qp.auth_pending and fctype not in AUTH_FCTYPES:
            req.fail(SC_AUTH_REQUIRED)  # as SPDK: only Authentication until it succeeds
            return
        handler = FABRICS_HANDLERS.get(fctype)
        if handler is None:
            req.fail(SC_INVALID_OPCODE)
            return
        handler(qp, req)
        return
    ctrl = qp.ctrl
    if ctrl is None:
        req.fail(SC_SEQUENCE)  # the first command on a queue must be Connect
        return
    if qp.auth_pending:
        req.fail(SC_AUTH_REQUIRED)  # DH-HMAC-CHAP not (yet) passed on this queue
        return
    if qp.qid == 0:
        if not ctrl.csts & spec.CSTS_RDY:
            req.fail(SC_SEQUENCE)  # admin commands wait for CC.EN=1
            return
        if ctrl.discovery and sqe.opcode not in DISCOVERY_ADMIN:
            req.fail(SC_INVALID_OPCODE)
            return
        handler = ADMIN_HANDLERS.get(sqe.opcode)
    else:
        if not ctrl.csts & spec.CSTS_RDY:
            req.fail(SC_SEQUENCE)
            return
        handler = IO_HANDLERS.get(sqe.opcode)
    if handler is None:
        req.fail(SC_INVALID_OPCODE)
        return
    if sqe.fuse:
        req.fail(SC_INVALID_FIELD)  # fused operations are not supported (FUSES = 0)
        return
    handler(qp, req)
