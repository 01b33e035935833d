"""The target's side of the NVMe/TCP secure channel: which PSK a host's TLS identity gets,
and what a TLS connection may then Connect to.

The PSK identity names the host and the subsystem (tls_keys.py), so the key is looked up
as configured for exactly that pair (`nvmf_subsystem_add_host ... psk`), and the TLS
session is then bound to it: Connect on that connection must name the same host and
subsystem, or a host holding a key for one subsystem could reach another through it. A
host given a PSK must come through TLS: its plain Connect is refused, otherwise its key
would protect nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tls import Resolver, TlsRefused
from .spec import DISCOVERY_NQN
from .tls_keys import ConfiguredPsk, PskIdentity, TlsKeyError, tls_psk

if TYPE_CHECKING:
    from ..app import Target
    from .subsystem import ListenAddress, Subsystem


def _host_psk_name(sub: Subsystem, hostnqn: str) -> str | None:
    entry = sub.hosts.get(hostnqn)
    return entry.get("psk") if entry else None


def resolver(target: Target, addr: ListenAddress) -> Resolver:
    """The PSK lookup of connections accepted on the secure listener ``addr``."""

    def resolve(raw: bytes) -> tuple[bytes, int]:
        try:
            ident = PskIdentity.parse(raw)
        except TlsKeyError as exc:
            raise TlsRefused(str(exc)) from None
        subs = target.subsystems
        if ident.subnqn == DISCOVERY_NQN:
            # discovery over TLS: the host's key for any subsystem it may reach here
            names = [n for s in subs if s.listener_allowed(addr)
                     and (n := _host_psk_name(s, ident.hostnqn))]
        else:
            sub = subs.find(ident.subnqn)
            if sub is None or not sub.listener_allowed(addr):
                raise TlsRefused(f"subsystem {ident.subnqn} is not offered on {addr}")
            name = _host_psk_name(sub, ident.hostnqn)
            names = [name] if name else []
        if not names:
            raise TlsRefused(f"host {ident.hostnqn} has no PSK for {ident.subnqn}")
        key = target.keyring.find(names[0])
        if key is None:
            raise TlsRefused(f"PSK '{names[0]}' is no longer in the keyring")
        try:
            return tls_psk(ConfiguredPsk.parse(key.material), ident), ident.hash_id
        except TlsKeyError as exc:
            raise TlsRefused(f"PSK '{names[0]}': {exc}") from None

    return resolve


def connect_problem(qp: Any, sub: Subsystem, hostnqn: str) -> str | None:
    """Why this Connect may not proceed on this connection (None: it may). The TLS
    session is the queue pair's (tls_transport sets it, in user space and in kTLS)."""
    session = getattr(qp, "tls_session", None)
    if session is None:
        if sub.nqn != DISCOVERY_NQN and _host_psk_name(sub, hostnqn):
            return f"host {hostnqn} has a PSK for {sub.nqn}: it must connect with TLS"
        return None
    try:
        ident = PskIdentity.parse(session.identity)
    except TlsKeyError:
        return "TLS identity is not an NVMe PSK identity"
    if ident.hostnqn != hostnqn:
        return f"host NQN {hostnqn} differs from the TLS identity's {ident.hostnqn}"
    if sub.nqn not in (ident.subnqn, DISCOVERY_NQN):
        return f"subsystem {sub.nqn} differs from the TLS identity's {ident.subnqn}"
    return None
