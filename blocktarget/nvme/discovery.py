"""The discovery controller's log page: which subsystems a host may reach, and where.

Entries are computed per asking host (allow-lists apply) and carry the target-wide
generation counter, which every configuration change bumps, so a host that re-reads the
header after the entries notices a change made in between and starts over.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from . import spec
from .structs import DiscoveryEntry, build_discovery_log, tcp_tsas
from .subsystem import DISCOVERY_NQN, ListenAddress

if TYPE_CHECKING:
    from ..app import Target

_TREQ = spec.Treq.SECURE_CHANNEL_NOT_REQUIRED  # what nvme-cli names; SQ flow control stays on


def port_id(addr: ListenAddress) -> int:
    """A stable port id per listen address (the same across restarts)."""
    return zlib.crc32(str(addr).encode()) & 0xFFFF


def _entry(addr: ListenAddress, subtype: int, subnqn: str, asqsz: int,
           local: str | None, treq: int = _TREQ, secure: bool = False) -> DiscoveryEntry:
    traddr = addr.traddr
    if traddr in ("0.0.0.0", "::") and local and (":" in local) == (addr.adrfam == "IPv6"):
        # A wildcard listener is reached at the address the host used (when that is of
        # the listener's family; an IPv4 host learns nothing usable about "::" anyway).
        traddr = local
    return DiscoveryEntry(
        trtype=spec.TransportType.TCP,
        adrfam=spec.AddressFamily.IPV4 if addr.adrfam == "IPv4" else spec.AddressFamily.IPV6,
        subtype=subtype,
        treq=treq,
        portid=port_id(addr),
        cntlid=spec.CNTLID_DYNAMIC,
        asqsz=asqsz,
        trsvcid=addr.trsvcid,
        traddr=traddr,
        subnqn=subnqn,
        tsas=tcp_tsas(spec.TcpSecType.TLS13 if secure else spec.TcpSecType.NONE),
    )


def _security(secure: bool) -> tuple[int, bool]:
    """TREQ and whether TSAS says TLS 1.3: a secure listener takes TLS connections only."""
    return (spec.Treq.SECURE_CHANNEL_REQUIRED if secure else _TREQ), secure


def referral_entry(ref: dict[str, Any], asqsz: int) -> DiscoveryEntry:
    """A referral (as nvmf_discovery_add_referral stored it): a pointer to another
    discovery service (subtype 1), or, as SPDK does when the referral names another
    NQN, to an NVM subsystem elsewhere (subtype 2)."""
    addr = ListenAddress.from_params(ref["address"])
    subnqn = ref.get("subnqn") or DISCOVERY_NQN
    subtype = (spec.SubsystemType.REFERRAL if subnqn == DISCOVERY_NQN
               else spec.SubsystemType.NVME)
    treq = (spec.Treq.SECURE_CHANNEL_REQUIRED if ref.get("secure_channel")
            else spec.Treq.SECURE_CHANNEL_NOT_REQUIRED)
    return _entry(addr, subtype, subnqn, asqsz, None, treq)


def discovery_log(target: Target, hostnqn: str, asked_on: ListenAddress,
                  local_addr: str | None = None) -> bytes:
    opts = target.transports.get("TCP")
    asqsz = opts.max_aq_depth if opts else 128
    secure = target.subsystems.secure
    entries = [_entry(asked_on, spec.SubsystemType.CURRENT_DISCOVERY, DISCOVERY_NQN, asqsz,
                      local_addr, *_security(asked_on in secure))]
    for sub in target.subsystems:
        if not sub.host_allowed(hostnqn):
            continue
        for addr in sub.listeners:
            entries.append(_entry(addr, spec.SubsystemType.NVME, sub.nqn, asqsz, local_addr,
                                  *_security(addr in secure)))
    for ref in target.subsystems.referrals:
        entries.append(referral_entry(ref, asqsz))
    return build_discovery_log(target.subsystems.genctr, entries)
