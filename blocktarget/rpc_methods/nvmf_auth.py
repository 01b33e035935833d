"""DH-HMAC-CHAP configuration methods (SPDK names): nvmf_set_config's dhchap_digests /
dhchap_dhgroups, and nvmf_subsystem_set_keys to change a host's keys in place (the
next authentication, including a host's re-authentication, uses the new keys).

Keys are named, never inlined: `nvmf_subsystem_add_host` and `nvmf_subsystem_set_keys`
take keyring names, checked here to exist and to hold DHHC-1 secrets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidParams, NoSuchDevice
from ..nvme.auth import DhchapKey, DhchapOptions
from ..nvme.subsystem import DISCOVERY_NQN
from ..params import Param, Schema
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target


def check_host_keys(target: Target, dhchap_key: str | None,
                    dhchap_ctrlr_key: str | None) -> None:
    """The named keys exist in the keyring and are DH-HMAC-CHAP secrets; a controller
    key needs a host key (bidirectional authentication starts from the host's)."""
    if dhchap_ctrlr_key and not dhchap_key:
        raise InvalidParams("parameter 'dhchap_ctrlr_key' requires 'dhchap_key'")
    for param, name in (("dhchap_key", dhchap_key), ("dhchap_ctrlr_key", dhchap_ctrlr_key)):
        if not name:
            continue
        key = target.keyring.find(name)
        if key is None:
            raise NoSuchDevice(f"parameter '{param}': key '{name}' is not in the keyring")
        try:
            DhchapKey.parse(key.material)
        except ValueError as exc:
            raise InvalidParams(f"parameter '{param}': key '{name}': {exc}") from None


def host_keys(target: Target, extra: dict[str, Any]) -> tuple[DhchapKey, DhchapKey | None] | None:
    """The parsed keys of one host entry, or None when the host has no DH-HMAC-CHAP key."""
    name = extra.get("dhchap_key")
    if not name:
        return None
    hk = DhchapKey.parse(target.keyring.get(name).material)
    cname = extra.get("dhchap_ctrlr_key")
    ck = DhchapKey.parse(target.keyring.get(cname).material) if cname else None
    return hk, ck


def _names(kind: str, parse: Any) -> Any:
    def check(value: list[Any]) -> str | None:
        if not all(isinstance(v, str) for v in value):
            return f"must be a list of {kind} names"
        try:
            parse(value)
        except ValueError as exc:
            return str(exc)
        return None
    return check


def _match_any_only(value: list[Any]) -> str | None:
    bad = [v for v in value if v != "match_any"]
    return f"must be [\"match_any\"]: filters {bad} are not implemented" if bad else None


@method(
    "nvmf_set_config",
    Schema(
        (Param("dhchap_digests", list, check=_names("digest", DhchapOptions.parse_digests)),
         Param("dhchap_dhgroups", list, check=_names("dhgroup", DhchapOptions.parse_dhgroups)),
         # SPDK's other filters hide entries from hosts; refused rather than ignored
         Param("discovery_filter", str, choices=("match_any",),
               help="every allowed host sees every listener of its subsystems"),
         Param("discovery_filters", list, check=_match_any_only,
               help="SPDK's newer list form of discovery_filter: only [\"match_any\"]")),
        extra_ok=frozenset({"admin_cmd_passthru", "poll_groups_mask"}),
    ),
    section="nvmf",
)
def nvmf_set_config(target: Target, params: dict[str, Any]) -> bool:
    """Target-wide NVMe-oF options: the DH-HMAC-CHAP hash functions and DH groups
    allowed in negotiation (default all; the strongest pair the host offers wins)."""
    if params.get("dhchap_digests") is not None:
        target.dhchap.digests = DhchapOptions.parse_digests(params["dhchap_digests"])
    if params.get("dhchap_dhgroups") is not None:
        target.dhchap.dhgroups = DhchapOptions.parse_dhgroups(params["dhchap_dhgroups"])
    return True


@method(
    "nvmf_subsystem_set_keys",
    Schema((Param("nqn", str, required=True), Param("host", str, required=True),
            Param("dhchap_key", str), Param("dhchap_ctrlr_key", str),
            Param("tgt_name", str))),
    in_config=False,
)
def nvmf_subsystem_set_keys(target: Target, params: dict[str, Any]) -> bool:
    """Replace (or, with none given, clear) a host's DH-HMAC-CHAP keys. Connected
    queues stay up; the keys apply from the next authentication transaction."""
    if params["nqn"] == DISCOVERY_NQN:
        raise InvalidParams("the discovery subsystem cannot be changed")
    sub = target.subsystems.get(params["nqn"])
    if params["host"] not in sub.hosts:
        raise NoSuchDevice(f"host '{params['host']}' is not in '{sub.nqn}'")
    check_host_keys(target, params.get("dhchap_key"), params.get("dhchap_ctrlr_key"))
    target.subsystems.set_host_keys(sub, params["host"], params.get("dhchap_key"),
                                    params.get("dhchap_ctrlr_key"))
    return True
