"""DH-HMAC-CHAP for our initiator: one transaction on one queue, over Authentication
Send/Receive, driven by the same engine the target uses (`nvme.auth.HostAuth`).

The Linux host authenticates every queue right after its Connect when the controller
sets AUTHREQ, and again on demand (re-authentication); `authenticate` is that step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blocktarget.nvme import spec
from blocktarget.nvme.auth import (
    HOST_DHGROUPS,
    HOST_DIGESTS,
    SECP_DHCHAP,
    SPSP0,
    SPSP1,
    AuthFailure,
    AuthRejected,
    DhchapKey,
    HostAuth,
)

from .connection import NvmeStatusError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .connection import QueuePair

log = logging.getLogger(__name__)

RECV_LEN = 4096  # Receive buffer: the largest message (ffdhe8192 challenge) is 1104 bytes
_CDW10 = (SECP_DHCHAP << 24) | (SPSP1 << 16) | (SPSP0 << 8)


class AuthenticationError(ConnectionRefusedError):
    """DH-HMAC-CHAP failed; ``reason`` is the Failure explanation (nvme.auth.Reason)."""

    def __init__(self, message: str, reason: int) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, repr=False)
class HostSecrets:
    """What `--dhchap-secret` / `--dhchap-ctrl-secret` give: the host's key and,
    for bidirectional authentication, the key the controller must prove it holds."""

    host_key: DhchapKey
    ctrl_key: DhchapKey | None = None
    digests: Sequence[int] = HOST_DIGESTS
    dhgroups: Sequence[int] = HOST_DHGROUPS

    def __repr__(self) -> str:
        return f"HostSecrets(bidirectional={self.ctrl_key is not None})"

    @classmethod
    def parse(cls, secret: str, ctrl_secret: str | None = None) -> HostSecrets:
        return cls(DhchapKey.parse(secret),
                   DhchapKey.parse(ctrl_secret) if ctrl_secret else None)


async def _send(qp: QueuePair, msg: bytes, timeout: float | None) -> None:
    r = await qp.submit(spec.FABRICS_OPCODE, spec.FabricsType.AUTH_SEND, cdw10=_CDW10,
                        cdw11=len(msg), data_out=msg, timeout=timeout)
    if r.completion.status:
        raise NvmeStatusError(r.completion.status, f"Authentication Send (qid {qp.qid})",
                              fabrics=True, completion=r.completion)


async def _recv(qp: QueuePair, timeout: float | None) -> bytes:
    r = await qp.submit(spec.FABRICS_OPCODE, spec.FabricsType.AUTH_RECV, cdw10=_CDW10,
                        cdw11=RECV_LEN, in_len=RECV_LEN, timeout=timeout, short_ok=True)
    if r.completion.status:
        raise NvmeStatusError(r.completion.status, f"Authentication Receive (qid {qp.qid})",
                              fabrics=True, completion=r.completion)
    return bytes(r.data) if r.data is not None else b""


async def authenticate(qp: QueuePair, secrets: HostSecrets, *, hostnqn: str, subnqn: str,
                       timeout: float | None = None) -> HostAuth:
    """Run one transaction; returns it (digest/dhgroup chosen) or raises
    AuthenticationError. A response we cannot accept is answered with Failure2 first,
    so the controller learns why before we drop the queue."""
    h = HostAuth(hostnqn=hostnqn, subnqn=subnqn, host_key=secrets.host_key,
                 ctrl_key=secrets.ctrl_key, digests=secrets.digests,
                 dhgroups=secrets.dhgroups)
    try:
        await _send(qp, h.negotiate(), timeout)
        await _send(qp, h.reply(await _recv(qp, timeout)), timeout)
        success2 = h.success1(await _recv(qp, timeout))
        if success2 is not None:
            await _send(qp, success2, timeout)
    except AuthRejected as exc:
        raise AuthenticationError(f"qid {qp.qid}: {exc}", exc.reason) from None
    except AuthFailure as exc:
        try:
            await _send(qp, h.failure2(exc.reason), timeout)
        except Exception:  # best effort: the queue is being dropped anyway
            log.debug("qid %d: Failure2 not delivered", qp.qid)
        raise AuthenticationError(f"qid {qp.qid}: {exc}", exc.reason) from None
    return h
