"""Authentication Send / Receive (fabrics 0x05 / 0x06): DH-HMAC-CHAP on a queue.

The protocol itself is the sans-I/O `auth.ControllerAuth`; this module is the glue
between it and a queue pair:

- Connect: a host whose entry names a `dhchap_key` gets AUTHREQ.ATR in the Connect
  response and its queue is gated (`qp.auth_pending`): dispatch answers anything but
  Authentication Send/Receive with Authentication Required until a transaction
  succeeds. Every queue authenticates on its own, admin and I/O alike (the Linux host
  does exactly that).
- A Negotiate message always opens a new transaction, also on an authenticated queue:
  that is re-authentication. The queue stays usable meanwhile; if the new transaction
  fails the queue is closed, as it is when the first one fails.
- A failed transaction answers the host with AUTH_Failure1 (the NVMe command itself
  succeeds, as in Linux nvmet and SPDK), then the connection is closed.
- A queue that has not authenticated within the keep-alive timeout (120 s without
  one) is closed, so a host cannot park unauthenticated connections.
- Keys are looked up when a transaction starts, so nvmf_subsystem_set_keys applies to
  the next (re-)authentication without touching connected queues.
- The DH exponentiations (the engine's ``job``) run in the target's worker processes
  (dh_workers.py), never on the reactor: a job starts as soon as the message that makes
  it possible is handled (our key pair right after Negotiate, the session secret right
  after Reply) and the Send completes at once. The queue's Authentication commands are
  handled strictly in order: one arriving while a job is in flight waits in
  ``qp.auth_waiting`` and runs when the result is back (`_job_finished`, on the
  reactor), so the Receive that needs it answers then. A queue closed meanwhile drops
  the result; a job not yet started is cancelled (`on_teardown`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import spec
from .auth import (
    DHGROUP_NAME,
    HASH_NAME,
    SECP_DHCHAP,
    SPSP0,
    SPSP1,
    AuthType,
    ControllerAuth,
    DhchapKey,
    DhGroup,
    HashId,
    MsgId,
)
from .dh_workers import WorkersUnavailable
from .structs import auth_fields
from .subsystem import DISCOVERY_NQN

if TYPE_CHECKING:
    from .qpair import Qpair, Request

log = logging.getLogger(__name__)

G = spec.Sct.GENERIC
SC_INVALID_FIELD = spec.make_status(G, spec.GenericStatus.INVALID_FIELD, dnr=True)
SC_SGL_LENGTH = spec.make_status(G, spec.GenericStatus.DATA_SGL_LENGTH_INVALID, dnr=True)
SC_SEQUENCE = spec.make_status(G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR, dnr=True)
DEFAULT_TIMEOUT_S = 120.0
MIN_RECV_LIMIT = 8192  # Receive lengths always accepted (a challenge is at most 1104 bytes)


def _host_entry_keys(qp: Qpair) -> tuple[str, str] | None:
    """The host's keyring names (host key, controller key or ""), None without a key."""
    sub = qp.subsystem
    if sub is None or sub.nqn == DISCOVERY_NQN:
        return None
    entry = sub.hosts.get(qp.hostnqn)
    if not entry or not entry.get("dhchap_key"):
        return None
    return entry["dhchap_key"], entry.get("dhchap_ctrlr_key") or ""


def on_connect(qp: Qpair) -> int:
    """After a successful Connect: gate the queue if the host must authenticate; returns
    the AUTHREQ bits for the Connect response dword 0."""
    if _host_entry_keys(qp) is None:
        return 0
    qp.auth_pending = True
    ctrl = qp.ctrl
    timeout = ctrl.kato_ms / 1000 if ctrl is not None and ctrl.kato_ms else DEFAULT_TIMEOUT_S
    loop = qp.reactor.loop
    if loop is not None:
        loop.call_later(timeout, _expire, qp)
    return spec.CONNECT_AUTHREQ_ATR


def _expire(qp: Qpair) -> None:
    if qp.auth_pending and not qp.closed:
        log.warning("%s: host %s did not authenticate in time", qp, qp.hostnqn)
        qp.close("authentication timed out")


def _new_transaction(qp: Qpair) -> ControllerAuth:
    names = _host_entry_keys(qp)
    host_key: DhchapKey | None = None
    ctrl_key: DhchapKey | None = None
    keyring = qp.target.keyring
    if names is not None:
        try:
            host_key = DhchapKey.parse(keyring.get(names[0]).material)
            if names[1]:
                ctrl_key = DhchapKey.parse(keyring.get(names[1]).material)
        except Exception as exc:  # key gone from the keyring: the host cannot pass
            log.warning("%s: DH-HMAC-CHAP keys of %s unusable: %s", qp, qp.hostnqn, exc)
            host_key = None
    if host_key is None:
        # No usable key (host or key removed since Connect): run the transaction with a
        # random key nobody has, so it fails the way a wrong secret fails.
        host_key = DhchapKey.generate()
    assert qp.subsystem is not None
    return ControllerAuth(hostnqn=qp.hostnqn, subnqn=qp.subsystem.nqn, host_key=host_key,
                          ctrl_key=ctrl_key, options=qp.target.dhchap)


def _check_command(req: Request) -> int:
    """The SQE checks shared by Send and Receive: protocol, sub-protocol, length."""
    f = auth_fields(req.sqe)
    if f.secp != SECP_DHCHAP or f.spsp0 != SPSP0 or f.spsp1 != SPSP1 or f.length == 0:
        return SC_INVALID_FIELD
    if f.length != req.xfer_len:
        return SC_SGL_LENGTH
    return 0


def _settle(qp: Qpair, auth: ControllerAuth) -> bool:
    """Act on a finished transaction; True when the queue was closed."""
    if auth.done:
        qp.auth = None
        if qp.auth_pending:
            qp.auth_pending = False
            log.info("%s: host %s authenticated (%s, %s%s)", qp, qp.hostnqn,
                     HASH_NAME[HashId(auth.digest)], DHGROUP_NAME[DhGroup(auth.dhgroup)],
                     ", bidirectional" if auth.bidirectional else "")
        else:
            log.info("%s: host %s re-authenticated", qp, qp.hostnqn)
        return False
    if auth.failed:
        qp.auth = None
        qp.auth_pending = True
        log.warning("%s: authentication of %s failed: %s", qp, qp.hostnqn, auth.why)
        qp._flush()
        qp.close("authentication failed")
        return True
    return False


def auth_send(qp: Qpair, req: Request) -> None:
    _in_order(qp, req, _send)


def auth_recv(qp: Qpair, req: Request) -> None:
    _in_order(qp, req, _recv)


def _in_order(qp: Qpair, req: Request, handler: Callable[[Qpair, Request], None]) -> None:
    """Run ``handler`` now, or after the job in flight and the commands before it."""
    if qp.auth_job is not None or qp.auth_waiting:
        qp.auth_waiting.append((handler, req))
        return
    handler(qp, req)


def _send(qp: Qpair, req: Request) -> None:
    if _host_entry_keys(qp) is None and qp.auth is None:
        req.fail(SC_SEQUENCE)  # nothing to authenticate (as SPDK)
        return
    status = _check_command(req)
    if status:
        req.fail(status)
        return
    msg = bytes(req.data) if req.data is not None else b""
    is_negotiate = len(msg) >= 2 and msg[0] == AuthType.COMMON and msg[1] == MsgId.NEGOTIATE
    if is_negotiate or qp.auth is None:
        qp.auth = _new_transaction(qp)
    auth = qp.auth
    auth.send(msg)
    req.complete(0)
    if not _settle(qp, auth):
        _start_job(qp, auth)


def _recv(qp: Qpair, req: Request) -> None:
    if _host_entry_keys(qp) is None and qp.auth is None:
        req.fail(SC_SEQUENCE)
        return
    status = _check_command(req)
    if status:
        req.fail(status)
        return
    al = auth_fields(req.sqe).length
    if al > max(qp.opts.max_io_size, MIN_RECV_LIMIT):
        req.fail(SC_INVALID_FIELD)  # never allocate what the host merely asks for
        return
    if qp.auth is None:
        qp.auth = _new_transaction(qp)  # Receive before Negotiate: answered by Failure1
    auth = qp.auth
    msg = auth.receive(al)
    # The whole allocation length, zero-filled after the message, as Linux nvmet does:
    # hosts size their buffer (and their transfer) before they know the message length.
    req.complete_data(msg.ljust(al, b"\0"))
    if not _settle(qp, auth):
        _start_job(qp, auth)


# ---- DH jobs in the worker processes ----


def _start_job(qp: Qpair, auth: ControllerAuth) -> None:
    """Hand the engine's pending job to a worker. Without workers it stays pending and
    the engine computes it inline in the next send/receive (on the reactor)."""
    job = auth.job
    if job is None or qp.closed:
        return
    fut = qp.target.dh_workers.submit(job.fn, *job.args)
    if fut is None:
        return
    qp.auth_job = fut
    loop = qp.reactor.loop

    def done(f: Future[Any]) -> None:  # in a worker's reader thread: to the reactor
        try:
            loop.call_soon_threadsafe(_job_finished, qp, auth, f)  # type: ignore[union-attr]
        except RuntimeError:  # the reactor's loop is closed: the target is stopping
            pass

    fut.add_done_callback(done)


def _job_finished(qp: Qpair, auth: ControllerAuth, fut: Future[Any]) -> None:
    """On the reactor: apply the result, then run the commands that waited for it."""
    if qp.auth_job is not fut:
        return  # the queue was torn down meanwhile: nothing to answer
    qp.auth_job = None
    if qp.closed or fut.cancelled():
        return
    exc = fut.exception()
    if exc is None:
        auth.job_done(fut.result())
    elif isinstance(exc, WorkersUnavailable):  # (logged by the pool)
        auth.run_job()
    else:
        log.warning("%s: DH computation for %s failed: %r", qp, qp.hostnqn, exc)
        auth.job_failed(f"DH computation failed: {type(exc).__name__}")
    if _settle(qp, auth):
        return
    _drain(qp)


def _drain(qp: Qpair) -> None:
    while qp.auth_waiting and qp.auth_job is None and not qp.closed:
        handler, req = qp.auth_waiting.pop(0)
        handler(qp, req)


def on_teardown(qp: Qpair) -> None:
    """The queue is closing: a job not yet started is cancelled, a running one's result
    will be dropped (`_job_finished`), the waiting commands go with the queue."""
    fut: Any = qp.auth_job
    qp.auth_job = None
    if fut is not None:
        fut.cancel()
    qp.auth_waiting.clear()
