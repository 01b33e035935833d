"""NVMe-oF methods: transports, subsystems, namespaces, hosts, listeners.

SPDK's names and parameter shapes (so SPDK's client and SPDK-shaped config files work),
plus the card's compact `subsystem_add` / `subsystem_remove` / `subsystem_get`, which are
compositions of the same operations rather than second implementations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import AlreadyExists, InvalidParams, NoSuchDevice
from ..nvme.subsystem import (
    ANA_STATES,
    DISCOVERY_NQN,
    MAX_CNTLID,
    ListenAddress,
    Subsystem,
    check_ascii_field,
    check_nqn,
)
from ..params import Param, Schema, non_negative, positive, validate
from ..rpc import method
from ..transport_opts import TRANSPORT_SCHEMA, TransportOptions

if TYPE_CHECKING:
    from ..app import Target

TGT = Param("tgt_name", str, help="accepted for SPDK compatibility; one target per process")


def _subsys(target: Target, nqn: str) -> Subsystem:
    if nqn == DISCOVERY_NQN:
        raise InvalidParams("the discovery subsystem cannot be changed")
    return target.subsystems.get(nqn)


# ---- transports -------------------------------------------------------------


@method("nvmf_create_transport", TRANSPORT_SCHEMA, section="nvmf")
def nvmf_create_transport(target: Target, params: dict[str, Any]) -> bool:
    """Create the TCP transport with SPDK's options (only TCP exists here)."""
    opts = TransportOptions.from_params(params)
    if opts.trtype in target.transports:
        raise AlreadyExists(f"transport {opts.trtype} already exists")
    target.transports[opts.trtype] = opts
    return True


@method("nvmf_get_transports", Schema((Param("trtype", str), TGT)), in_config=False)
def nvmf_get_transports(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """List transports with their options."""
    out = [_with_tls(target, t.describe()) for t in target.transports.values()]
    if params.get("trtype"):
        out = [t for t in out if t["trtype"].upper() == params["trtype"].upper()]
        if not out:
            raise NoSuchDevice(f"transport {params['trtype']} does not exist")
    return out


def _with_tls(target: Target, d: dict[str, Any]) -> dict[str, Any]:
    """The secure channel's state beside the TCP options (blocktarget's own field)."""
    from .. import tls

    d = dict(d)
    d["tls"] = {
        "available": tls.AVAILABLE,
        # what new TLS connections get: kernel TLS when asked ("auto") and the kernel has
        # it, else OpenSSL in user space; per connection in connections.record_layer_*
        "record_layer": ("none" if not tls.AVAILABLE else "kernel" if (
            d.get("tls_record_layer") == "auto" and tls.ktls_available()) else "user"),
        "ktls_available": tls.ktls_available(),
        "cipher_suites": tls.SUITES.split(":"),
        "connections": target.tcp.tls_stats() if target.tcp is not None else {},
    }
    return d


# ---- subsystems -------------------------------------------------------------

CREATE_SUBSYSTEM = Schema(
    (
        Param("nqn", str, required=True, check=check_nqn),
        Param("serial_number", str, check=check_ascii_field(20)),
        Param("model_number", str, check=check_ascii_field(40)),
        Param("allow_any_host", bool, default=False),
        Param("max_namespaces", int, default=32, check=positive),
        Param("ana_reporting", bool, default=False),
        Param("min_cntlid", int, default=1),
        Param("max_cntlid", int, default=MAX_CNTLID),
        TGT,
    ),
    extra_ok=frozenset({"passthrough", "enable_nssr"}),
)

# Why each security/durability option is refused (see params.Schema.refused).
NO_PTPL = "reservations (and their persist-through-power-loss state) are not implemented"
@method("nvmf_create_subsystem", CREATE_SUBSYSTEM, section="nvmf")
def nvmf_create_subsystem(target: Target, params: dict[str, Any]) -> bool:
    """Create an NVM subsystem (empty: add namespaces, listeners and hosts after)."""
    lo, hi = params["min_cntlid"], params["max_cntlid"]
    if not 1 <= lo <= hi <= MAX_CNTLID:
        raise InvalidParams(
            f"parameters 'min_cntlid'/'max_cntlid' must satisfy 1 <= {lo} <= {hi} <= {MAX_CNTLID}"
        )
    sub = Subsystem(
        nqn=params["nqn"],
        allow_any_host=params["allow_any_host"],
        max_namespaces=params["max_namespaces"],
        ana_reporting=params["ana_reporting"],
        min_cntlid=lo,
        max_cntlid=hi,
    )
    if params.get("serial_number"):
        sub.serial_number = params["serial_number"]
    if params.get("model_number"):
        sub.model_number = params["model_number"]
    target.subsystems.add(sub)
    return True


@method("nvmf_delete_subsystem", Schema((Param("nqn", str, required=True), TGT)),
        in_config=False)
async def nvmf_delete_subsystem(target: Target, params: dict[str, Any]) -> bool:
    """Delete a subsystem: its controllers are disconnected, its bdevs released."""
    sub = _subsys(target, params["nqn"])
    await target.remove_subsystem(sub)
    return True


@method(
    "nvmf_get_subsystems",
    Schema((Param("nqn", str), TGT)),
    in_config=False,
)
def nvmf_get_subsystems(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """List subsystems in SPDK's shape (the discovery subsystem first)."""
    subs = [target.subsystems.discovery, *target.subsystems]
    if params.get("nqn"):
        subs = [s for s in subs if s.nqn == params["nqn"]]
        if not subs:
            raise NoSuchDevice(f"subsystem '{params['nqn']}' does not exist")
    out = []
    for s in subs:
        d = s.describe()
        if s.subtype == "Discovery":
            d["listen_addresses"] = [a.describe() for a in sorted(
                target.subsystems.all_listen_addresses(), key=str)]
        out.append(d)
    return out


# ---- namespaces -------------------------------------------------------------

NS_SCHEMA = Schema(
    (
        Param("bdev_name", str, required=True),
        Param("nsid", int, default=0, check=non_negative),
        Param("uuid", str),
        Param("nguid", str),
        Param("eui64", str),
        Param("anagrpid", int, check=positive),
        Param("no_auto_visible", bool, default=False),
    ),
    extra_ok=frozenset({"hide_metadata"}),
    refused={"ptpl_file": NO_PTPL},
)


@method(
    "nvmf_subsystem_add_ns",
    Schema((Param("nqn", str, required=True), Param("namespace", dict, required=True), TGT,
            Param("no_auto_visible", bool, default=False))),
    section="nvmf",
)
async def nvmf_subsystem_add_ns(target: Target, params: dict[str, Any]) -> int:
    """Add a namespace backed by a bdev; returns its nsid. Connected hosts get an AEN.
    With `no_auto_visible` (in `namespace`, where SPDK's rpc.py puts it, or beside it)
    no host sees it until `nvmf_ns_add_host` names one."""
    sub = _subsys(target, params["nqn"])
    ns = validate(NS_SCHEMA, params["namespace"])
    bdev = target.bdevs.get(ns["bdev_name"])
    try:
        created = target.subsystems.add_namespace(
            sub, bdev, nsid=ns["nsid"] or None, uuid=ns.get("uuid"), nguid=ns.get("nguid"),
            eui64=ns.get("eui64"), anagrpid=ns.get("anagrpid"),
            auto_visible=not (ns["no_auto_visible"] or params["no_auto_visible"]),
        )
    except ValueError as exc:
        raise InvalidParams(f"parameter 'uuid' {exc}") from None
    return created.nsid


NS_HOST_SCHEMA = Schema((Param("nqn", str, required=True), Param("nsid", int, required=True),
                         Param("host", str, required=True), TGT))


@method("nvmf_ns_add_host", NS_HOST_SCHEMA, section="nvmf")
async def nvmf_ns_add_host(target: Target, params: dict[str, Any]) -> bool:
    """Make a namespace added with `no_auto_visible` visible to one host (its
    controllers, connected or not); connected ones get a namespace-attribute event."""
    sub = _subsys(target, params["nqn"])
    target.subsystems.ns_set_host(sub, params["nsid"], params["host"], True)
    return True


@method("nvmf_ns_remove_host", NS_HOST_SCHEMA, in_config=False)
async def nvmf_ns_remove_host(target: Target, params: dict[str, Any]) -> bool:
    """Hide a masked namespace from one host again: its I/O then fails as for an absent
    namespace, and its connected controllers get a namespace-attribute event."""
    sub = _subsys(target, params["nqn"])
    target.subsystems.ns_set_host(sub, params["nsid"], params["host"], False)
    return True


@method("nvmf_subsystem_remove_ns",
        Schema((Param("nqn", str, required=True), Param("nsid", int, required=True), TGT)),
        in_config=False)
async def nvmf_subsystem_remove_ns(target: Target, params: dict[str, Any]) -> bool:
    """Remove a namespace; its bdev is released (and may then be deleted)."""
    sub = _subsys(target, params["nqn"])
    await target.remove_namespace(sub, params["nsid"])
    return True


# ---- listeners ----------------------------------------------------------------

LISTENER_SCHEMA = Schema(
    (
        Param("nqn", str, required=True),
        Param("listen_address", dict, required=True),
        TGT,
        # SPDK's "ssl" implementation is its TLS socket (secure_channel says it here)
        Param("sock_impl", str, choices=("posix", "uring", "ssl"),
              help="SPDK's socket implementation; \"ssl\" means secure_channel"),
    ),
    extra_ok=frozenset({"ana_state", "anagrpid", "secure_channel"}),
)
ADD_LISTENER_SCHEMA = Schema(
    (*LISTENER_SCHEMA.params,
     Param("ana_state", str, choices=tuple(ANA_STATES),
           help="initial ANA state of every group on this listener (default optimized)"),
     Param("secure_channel", bool, default=False,
           help="TLS 1.3 with pre-shared keys only (hosts need a psk); plain ICReqs are "
           "refused")),
    extra_ok=frozenset({"anagrpid"}),
)


@method("nvmf_subsystem_add_listener", ADD_LISTENER_SCHEMA, section="nvmf")
async def nvmf_subsystem_add_listener(target: Target, params: dict[str, Any]) -> bool:
    """Listen on an address for this subsystem (the socket is shared between subsystems).
    With `ana_state` (SPDK), every ANA group starts in that state on this listener."""
    sub = _subsys(target, params["nqn"])
    addr = ListenAddress.from_params(params["listen_address"])
    if addr in sub.listeners:
        raise AlreadyExists(f"listener {addr} already exists in '{sub.nqn}'")
    state = params.get("ana_state")
    if state is not None and not sub.ana_reporting:
        raise InvalidParams(f"ANA reporting is disabled in '{sub.nqn}' "
                            "(create it with ana_reporting: true)")
    secure = bool(params["secure_channel"]) or params.get("sock_impl") == "ssl"
    if secure:
        from .. import tls

        if not tls.AVAILABLE:
            raise InvalidParams(f"parameter 'secure_channel' cannot be served: {tls.WHY_NOT}")
    target.subsystems.check_secure(addr, secure)
    await target.listen(addr)
    target.subsystems.add_listener(sub, addr, secure=secure)
    if state is not None:
        target.subsystems.set_ana_state(sub, addr, state)
    return True


@method(
    "nvmf_subsystem_listener_set_ana_state",
    Schema((Param("nqn", str, required=True), Param("listen_address", dict, required=True),
            Param("ana_state", str, required=True, choices=tuple(ANA_STATES),
                  help="optimized | non_optimized | inaccessible"),
            Param("anagrpid", int, check=non_negative,
                  help="one ANA group (absent or 0: all groups, as SPDK)"),
            TGT)),
    section="nvmf",
)
def nvmf_subsystem_listener_set_ana_state(target: Target, params: dict[str, Any]) -> bool:
    """Set the ANA state of one group (`anagrpid`) or of all groups as seen through one
    listener. Hosts connected through it get an ANA change event; I/O to a namespace
    in an inaccessible group fails with a path status, so multipath hosts move it."""
    sub = _subsys(target, params["nqn"])
    addr = ListenAddress.from_params(params["listen_address"])
    target.subsystems.set_ana_state(sub, addr, params["ana_state"], params.get("anagrpid"))
    return True


@method("nvmf_subsystem_get_listeners", Schema((Param("nqn", str, required=True), TGT)),
        in_config=False)
def nvmf_subsystem_get_listeners(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The subsystem's listeners in SPDK's shape, with each ANA group's state on each
    (`ana_states`, when ANA reporting is on)."""
    sub = _subsys(target, params["nqn"])
    return [{**sub.describe_listener(addr), "secure_channel": addr in target.subsystems.secure}
            for addr in sub.listeners]


@method("nvmf_subsystem_remove_listener", LISTENER_SCHEMA, in_config=False)
async def nvmf_subsystem_remove_listener(target: Target, params: dict[str, Any]) -> bool:
    """Stop offering the subsystem on an address; the socket closes when no one uses it."""
    sub = _subsys(target, params["nqn"])
    addr = ListenAddress.from_params(params["listen_address"])
    target.subsystems.remove_listener(sub, addr)
    await target.unlisten_if_unused(addr)
    return True


# ---- hosts ------------------------------------------------------------------


@method(
    "nvmf_subsystem_add_host",
    Schema(
        (Param("nqn", str, required=True), Param("host", str, required=True, check=check_nqn),
         TGT, Param("dhchap_key", str), Param("dhchap_ctrlr_key", str),
         Param("psk", str, help="keyring key (NVMeTLSkey-1 interchange format) for TLS; the "
               "host must then connect through a secure listener")),
    ),
    section="nvmf",
)
def nvmf_subsystem_add_host(target: Target, params: dict[str, Any]) -> bool:
    """Allow a host NQN to connect to the subsystem. `dhchap_key` / `dhchap_ctrlr_key`
    name keyring keys: the host must then pass DH-HMAC-CHAP (bidirectional with both)."""
    from .nvmf_auth import check_host_keys

    sub = _subsys(target, params["nqn"])
    check_host_keys(target, params.get("dhchap_key"), params.get("dhchap_ctrlr_key"))
    if params.get("psk") is not None:
        check_psk(target, params["psk"])
    target.subsystems.add_host(
        sub, params["host"], dhchap_key=params.get("dhchap_key"),
        dhchap_ctrlr_key=params.get("dhchap_ctrlr_key"), psk=params.get("psk"),
    )
    return True


def check_psk(target: Target, name: str) -> None:
    """The key exists and is a TLS PSK in interchange format (the error never shows it)."""
    from .. import tls
    from ..nvme.tls_keys import ConfiguredPsk, TlsKeyError

    if not tls.AVAILABLE:
        raise InvalidParams(f"parameter 'psk' cannot be served: {tls.WHY_NOT}")
    key = target.keyring.get(name)
    try:
        ConfiguredPsk.parse(key.material)
    except TlsKeyError as exc:
        raise InvalidParams(f"parameter 'psk': key '{name}': {exc}") from None


@method(
    "nvmf_subsystem_remove_host",
    Schema((Param("nqn", str, required=True), Param("host", str, required=True), TGT)),
    in_config=False,
)
async def nvmf_subsystem_remove_host(target: Target, params: dict[str, Any]) -> bool:
    """Revoke a host: it can no longer connect, and its live controllers are dropped."""
    sub = _subsys(target, params["nqn"])
    target.subsystems.remove_host(sub, params["host"])
    await target.disconnect_host(sub, params["host"])
    return True


@method(
    "nvmf_subsystem_allow_any_host",
    Schema((Param("nqn", str, required=True), Param("allow_any_host", bool, required=True),
            TGT)),
    section="nvmf",
)
def nvmf_subsystem_allow_any_host(target: Target, params: dict[str, Any]) -> bool:
    """Turn the host allow-list off (any host may connect) or on."""
    sub = _subsys(target, params["nqn"])
    target.subsystems.set_allow_any_host(sub, params["allow_any_host"])
    return True


# ---- the card's compact forms ---------------------------------------------------

SUBSYSTEM_ADD = Schema(
    (
        Param("nqn", str, required=True, check=check_nqn),
        Param("serial_number", str, check=check_ascii_field(20)),
        Param("model_number", str, check=check_ascii_field(40)),
        Param("allow_any_host", bool, default=False),
        Param("hosts", list, default=[]),
        Param("namespaces", list, default=[]),
        Param("listeners", list, default=[]),
        Param("max_namespaces", int, default=32, check=positive),
        Param("ana_reporting", bool, default=False),
    )
)


@method("subsystem_add", SUBSYSTEM_ADD, in_config=False)
async def subsystem_add(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """Create a subsystem with its hosts, namespaces and listeners in one call.

    All parts are checked before anything is created, so a bad namespace or listener
    leaves no half-made subsystem behind.
    """
    hosts = params["hosts"]
    for i, h in enumerate(hosts):
        if not isinstance(h, str) or check_nqn(h):
            raise InvalidParams(f"parameter 'hosts[{i}]' is not a valid host NQN")
    nss = []
    for i, ns in enumerate(params["namespaces"]):
        if not isinstance(ns, dict):
            raise InvalidParams(f"parameter 'namespaces[{i}]' must be an object")
        try:
            v = validate(NS_SCHEMA, ns)
        except InvalidParams as exc:
            raise InvalidParams(f"namespaces[{i}]: {exc.message}") from None
        target.bdevs.get(v["bdev_name"])
        nss.append(v)
    addrs = []
    for i, li in enumerate(params["listeners"]):
        try:
            addrs.append(ListenAddress.from_params(li))
        except InvalidParams as exc:
            raise InvalidParams(f"listeners[{i}]: {exc.message}") from None
    if target.subsystems.find(params["nqn"]) is not None:
        raise AlreadyExists(f"subsystem '{params['nqn']}' already exists")
    nvmf_create_subsystem(target, validate(CREATE_SUBSYSTEM, {
        k: params[k] for k in ("nqn", "serial_number", "model_number", "allow_any_host",
                               "max_namespaces", "ana_reporting") if params.get(k) is not None
    }))
    sub = target.subsystems.get(params["nqn"])
    try:
        for h in hosts:
            target.subsystems.add_host(sub, h)
        for v in nss:
            target.subsystems.add_namespace(
                sub, target.bdevs.get(v["bdev_name"]), nsid=v["nsid"] or None,
                uuid=v.get("uuid"), nguid=v.get("nguid"), eui64=v.get("eui64"),
                anagrpid=v.get("anagrpid"))
        for a in addrs:
            await target.listen(a)
            target.subsystems.add_listener(sub, a)
    except Exception:
        await target.remove_subsystem(sub)
        raise
    return sub.describe()


@method("subsystem_remove", Schema((Param("nqn", str, required=True),)), in_config=False)
async def subsystem_remove(target: Target, params: dict[str, Any]) -> bool:
    """Remove a subsystem (same as nvmf_delete_subsystem)."""
    await target.remove_subsystem(_subsys(target, params["nqn"]))
    return True


@method("subsystem_get", Schema((Param("nqn", str),)), in_config=False)
def subsystem_get(target: Target, params: dict[str, Any]) -> Any:
    """One subsystem by NQN, or all NVM subsystems."""
    if params.get("nqn"):
        return _subsys(target, params["nqn"]).describe()
    return [s.describe() for s in target.subsystems]


# ---- discovery referrals ---------------------------------------------------------

REFERRAL_SCHEMA = Schema(
    (
        Param("address", dict, required=True),
        Param("subnqn", str, check=check_nqn),
        Param("secure_channel", bool, default=False),
        TGT,
    ),
)


def _referral(params: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a referral: SPDK's parameter shape, normalised, so that
    `save_config` writes back exactly what `nvmf_discovery_add_referral` takes."""
    raw = params["address"]
    if isinstance(raw, dict) and not raw.get("trsvcid"):
        raise InvalidParams("parameter 'address.trsvcid' is required for TCP (the port)")
    addr = ListenAddress.from_params(raw)
    subnqn = params.get("subnqn")
    if subnqn == "discovery":  # SPDK's rpc.py shorthand
        subnqn = DISCOVERY_NQN
    return {"address": addr.describe(), "secure_channel": bool(params.get("secure_channel")),
            "subnqn": subnqn or DISCOVERY_NQN}


def _same_referral(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["address"] == b["address"] and a["subnqn"] == b["subnqn"]


@method("nvmf_discovery_add_referral", REFERRAL_SCHEMA, section="nvmf")
def nvmf_discovery_add_referral(target: Target, params: dict[str, Any]) -> bool:
    """Point hosts that read our discovery log at another discovery service (or, with
    `subnqn`, at a subsystem served elsewhere). Adding the same referral twice is a
    no-op, as in SPDK; a new one changes GENCTR and raises a discovery AEN."""
    ref = _referral(params)
    refs = target.subsystems.referrals
    if any(_same_referral(r, ref) for r in refs):
        return True
    refs.append(ref)
    target.subsystems.changed("referral_added", None, ref)
    return True


@method(
    "nvmf_discovery_remove_referral",
    Schema((Param("address", dict, required=True), Param("subnqn", str), TGT)),
    in_config=False,
)
def nvmf_discovery_remove_referral(target: Target, params: dict[str, Any]) -> bool:
    """Remove a referral added with nvmf_discovery_add_referral (same address/subnqn)."""
    ref = _referral(params)
    refs = target.subsystems.referrals
    for i, r in enumerate(refs):
        if _same_referral(r, ref):
            del refs[i]
            target.subsystems.changed("referral_removed", None, r)
            return True
    raise NoSuchDevice(
        f"no referral to {ListenAddress.from_params(ref['address'])} for {ref['subnqn']}")


@method("nvmf_discovery_get_referrals", Schema((TGT,)), in_config=False)
def nvmf_discovery_get_referrals(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The referrals in our discovery log, in SPDK's shape."""
    return [dict(r, address=dict(r["address"])) for r in target.subsystems.referrals]
