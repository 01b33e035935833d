"""NVM subsystems, their namespaces, host allow-lists and listen addresses.

These objects are what the control plane manages and what the NVMe/TCP data path reads.
They are changed only from the control-plane thread; every change bumps the target-wide
generation counter (the discovery log's GENCTR) and is announced to observers, which is
how controllers learn to send namespace-changed and discovery-changed async events.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import AlreadyExists, InvalidParams, NoSuchDevice

if TYPE_CHECKING:
    from ..bdev import Bdev

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
DEFAULT_MODEL = "blocktarget"
DEFAULT_SERIAL = "00000000000000000000"
MAX_NQN_LEN = 223
# Controller ids 0xFFF0..0xFFFF are reserved (0xFFFF = dynamic, 0xFFFE = static).
MAX_CNTLID = 0xFFEF

_NQN_DATE = re.compile(r"^nqn\.\d{4}-\d{2}\.[A-Za-z0-9.-]+(:.+)?$")
_NQN_UUID = re.compile(r"^nqn\.2014-08\.org\.nvmexpress:uuid:[0-9a-fA-F-]{36}$")


def check_nqn(nqn: str) -> str | None:
    """Reject NQNs that real hosts would refuse, with the reason (NVMe base spec 4.5)."""
    if not nqn:
        return "must not be empty"
    if len(nqn.encode()) > MAX_NQN_LEN:
        return f"is longer than {MAX_NQN_LEN} bytes"
    if nqn == DISCOVERY_NQN or _NQN_UUID.match(nqn) or _NQN_DATE.match(nqn):
        return None
    return "is not a valid NQN (nqn.yyyy-mm.reverse.domain[:name] or nqn.2014-08.org.nvmexpress:uuid:<uuid>)"


def check_ascii_field(limit: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if not value.isascii() or not value.isprintable():
            return "must be printable ASCII"
        if len(value) > limit:
            return f"must be at most {limit} characters"
        return None

    return check


@dataclass(frozen=True)
class ListenAddress:
    trtype: str  # "TCP"
    adrfam: str  # "IPv4" | "IPv6"
    traddr: str
    trsvcid: str

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> ListenAddress:
        if not isinstance(p, dict):
            raise InvalidParams("parameter 'listen_address' must be an object")
        trtype = str(p.get("trtype", "tcp")).upper()
        if trtype != "TCP":
            raise InvalidParams(f"parameter 'trtype' {p.get('trtype')!r} is not supported (only tcp)")
        traddr = p.get("traddr")
        if not isinstance(traddr, str) or not traddr:
            raise InvalidParams("missing required parameter 'traddr'")
        try:
            ip = ipaddress.ip_address(traddr.strip("[]"))
        except ValueError:
            raise InvalidParams(f"parameter 'traddr' {traddr!r} is not an IP address") from None
        adrfam = p.get("adrfam")
        want = "IPv4" if ip.version == 4 else "IPv6"
        if adrfam is not None and str(adrfam).lower() != want.lower():
            raise InvalidParams(f"parameter 'adrfam' {adrfam!r} does not match traddr {traddr}")
        svc = p.get("trsvcid", "4420")
        try:
            port = int(str(svc))
        except ValueError:
            raise InvalidParams(f"parameter 'trsvcid' {svc!r} is not a port number") from None
        if not 0 < port < 65536:
            raise InvalidParams(f"parameter 'trsvcid' {svc!r} is not a port number")
        return cls("TCP", want, str(ip), str(port))

    @property
    def port(self) -> int:
        return int(self.trsvcid)

    def describe(self) -> dict[str, str]:
        return {"trtype": self.trtype, "adrfam": self.adrfam, "traddr": self.traddr,
                "trsvcid": self.trsvcid}

    def __str__(self) -> str:
        host = f"[{self.traddr}]" if self.adrfam == "IPv6" else self.traddr
        return f"{host}:{self.trsvcid}"


@dataclass(eq=False)
class Namespace:
    nsid: int
    bdev: Bdev
    uuid: str
    nguid: str  # 32 hex digits
    eui64: str | None = None  # 16 hex digits
    anagrpid: int = 1
    # Namespace masking (SPDK's no_auto_visible): None, visible to every host the
    # subsystem admits; else only to these host NQNs (nvmf_ns_add_host). Replaced whole,
    # never changed in place: reactors read it on the I/O path without a lock.
    visible_hosts: frozenset[str] | None = None

    def visible_to(self, hostnqn: str) -> bool:
        hosts = self.visible_hosts
        return hosts is None or hostnqn in hosts

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "nsid": self.nsid,
            "bdev_name": self.bdev.name,
            "name": self.bdev.name,
            "nguid": self.nguid.upper(),
            "uuid": self.uuid,
            "anagrpid": self.anagrpid,
        }
        if self.eui64:
            d["eui64"] = self.eui64.upper()
        if self.visible_hosts is not None:
            d["no_auto_visible"] = True
            d["hosts"] = [{"nqn": h} for h in sorted(self.visible_hosts)]
        return d

    def config_params(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bdev_name": self.bdev.name, "nsid": self.nsid,
                             "uuid": self.uuid, "nguid": self.nguid.upper()}
        if self.eui64:
            d["eui64"] = self.eui64.upper()
        if self.anagrpid != self.nsid:  # the default group is the nsid (as SPDK)
            d["anagrpid"] = self.anagrpid
        if self.visible_hosts is not None:  # (its hosts: nvmf_ns_add_host calls)
            d["no_auto_visible"] = True
        return d


@dataclass(eq=False)
class Subsystem:
    nqn: str
    serial_number: str = DEFAULT_SERIAL
    model_number: str = DEFAULT_MODEL
    allow_any_host: bool = False
    max_namespaces: int = 32
    min_cntlid: int = 1
    max_cntlid: int = MAX_CNTLID
    ana_reporting: bool = False
    subtype: str = "NVMe"
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespaces: dict[int, Namespace] = field(default_factory=dict)
    listeners: list[ListenAddress] = field(default_factory=list)
    # ANA state of (listener, group) when it is not "optimized" (SPDK's default), and
    # the change count at each group's last change; see the ANA methods below.
    ana_states: dict[tuple[ListenAddress, int], str] = field(default_factory=dict)
    ana_group_chgcnt: dict[tuple[ListenAddress, int], int] = field(default_factory=dict)
    ana_chgcnt: int = 0
    # bumped on every change to this subsystem (namespaces, ANA states, hosts, listeners):
    # what a queue pair caches about its namespaces (nvme/fastlane.py) is rebuilt then
    generation: int = 0

    def host_allowed(self, hostnqn: str) -> bool:
        return self.allow_any_host or hostnqn in self.hosts

    def listener_allowed(self, addr: ListenAddress) -> bool:
        """Hosts may connect only through the subsystem's own listen addresses."""
        for li in self.listeners:
            if li.trsvcid == addr.trsvcid and (
                li.traddr == addr.traddr or li.traddr in ("0.0.0.0", "::")
            ):
                return True
        return False

    def ns_list(self) -> list[Namespace]:
        return [self.namespaces[k] for k in sorted(self.namespaces)]

    def visible_ns(self, nsid: int, hostnqn: str) -> Namespace | None:
        """The namespace as one host sees it: a masked one it may not see is absent."""
        ns = self.namespaces.get(nsid)
        return ns if ns is not None and ns.visible_to(hostnqn) else None

    def visible_nsids(self, hostnqn: str) -> list[int]:
        return [ns.nsid for ns in self.ns_list() if ns.visible_to(hostnqn)]

    # ---- ANA (asymmetric namespace access) ----
    # A controller sees each ANA group in the state its listener has for that group:
    # the same namespace can be optimized through one port and inaccessible through
    # another, which is what lets a host's multipath move I/O between ports (and, with
    # the same subsystem NQN and namespace ids on two targets, between targets).

    def ana_state(self, addr: ListenAddress | None, grpid: int) -> str:
        if addr is None:
            return "optimized"
        return self.ana_states.get((addr, grpid), "optimized")

    def ana_groups(self, hostnqn: str | None = None) -> dict[int, list[int]]:
        """ANA group id -> its nsids (only groups that hold a namespace exist for hosts);
        with ``hostnqn``, only the namespaces that host may see."""
        groups: dict[int, list[int]] = {}
        for ns in self.ns_list():
            if hostnqn is None or ns.visible_to(hostnqn):
                groups.setdefault(ns.anagrpid, []).append(ns.nsid)
        return groups

    def inaccessible_nsids(self, addr: ListenAddress | None) -> frozenset[int]:
        """Namespaces whose I/O must fail with a path status through ``addr``: what an
        I/O queue pair keeps precomputed, so the I/O path pays one falsy test."""
        if not self.ana_reporting or addr is None or not self.ana_states:
            return frozenset()
        states = self.ana_states
        # list(): one C-level snapshot, as reactors call this while RPCs may change it
        return frozenset(ns.nsid for ns in list(self.namespaces.values())
                         if states.get((addr, ns.anagrpid)) in ANA_NO_IO_STATES)

    def describe_listener(self, addr: ListenAddress) -> dict[str, Any]:
        """One nvmf_subsystem_get_listeners entry (SPDK's shape: ana_states lists every
        possible group, 1..max_namespaces, when ANA reporting is on)."""
        d: dict[str, Any] = {"address": addr.describe()}
        if self.ana_reporting:
            d["ana_states"] = [{"ana_group": g, "ana_state": self.ana_state(addr, g)}
                               for g in range(1, self.max_namespaces + 1)]
        return d

    def describe(self) -> dict[str, Any]:
        """The shape of one SPDK nvmf_get_subsystems entry."""
        d: dict[str, Any] = {
            "nqn": self.nqn,
            "subtype": self.subtype,
            "listen_addresses": [li.describe() for li in self.listeners],
            "allow_any_host": self.allow_any_host,
            "hosts": [{"nqn": h, **extra} for h, extra in self.hosts.items()],
        }
        if self.subtype == "NVMe":
            d.update(
                serial_number=self.serial_number,
                model_number=self.model_number,
                max_namespaces=self.max_namespaces,
                min_cntlid=self.min_cntlid,
                max_cntlid=self.max_cntlid,
                ana_reporting=self.ana_reporting,
                namespaces=[ns.describe() for ns in self.ns_list()],
            )
        return d


ChangeObserver = Callable[[str, "Subsystem | None", Any], None]

# ANA states an operator may set (SPDK's names and set: "change" is transient and
# "persistent_loss" is not offered), with their ANA log page codes (NVMe base spec).
ANA_STATES = {"optimized": 0x1, "non_optimized": 0x2, "inaccessible": 0x3}
ANA_NO_IO_STATES = frozenset({"inaccessible"})
# events that change what a host sees of one subsystem but not the discovery log
NOT_IN_DISCOVERY_LOG = frozenset({"ana_changed", "ns_visibility", "ns_resized"})


class SubsystemRegistry:
    """All subsystems of the target, plus the generation counter hosts poll in discovery."""

    def __init__(self) -> None:
        self._subsystems: dict[str, Subsystem] = {}
        self.genctr = 0
        self.observers: list[ChangeObserver] = []
        self.referrals: list[dict[str, Any]] = []
        self.discovery = Subsystem(DISCOVERY_NQN, subtype="Discovery", allow_any_host=True)
        # Listen addresses served with TLS only (secure_channel). One socket serves every
        # subsystem on an address, so an address is secure for all of them or for none.
        self.secure: set[ListenAddress] = set()

    def __iter__(self) -> Iterator[Subsystem]:
        return iter(list(self._subsystems.values()))

    def __len__(self) -> int:
        return len(self._subsystems)

    def find(self, nqn: str) -> Subsystem | None:
        if nqn == DISCOVERY_NQN:
            return self.discovery
        return self._subsystems.get(nqn)

    def get(self, nqn: str) -> Subsystem:
        s = self._subsystems.get(nqn)
        if s is None:
            raise NoSuchDevice(f"subsystem '{nqn}' does not exist")
        return s

    def changed(self, event: str, subsys: Subsystem | None, detail: Any = None) -> None:
        if event not in NOT_IN_DISCOVERY_LOG:
            self.genctr += 1
        if subsys is not None:
            subsys.generation += 1
        for obs in list(self.observers):
            obs(event, subsys, detail)

    def bdev_resized(self, bdev: Bdev) -> None:
        """Every namespace on `bdev` changed size: each subsystem's hosts are told (a
        Namespace Attribute Changed event), whichever module resized it."""
        for sub in self:
            for ns in sub.ns_list():
                if ns.bdev is bdev:
                    self.changed("ns_resized", sub, ns)

    # ---- subsystems ----
    def add(self, subsys: Subsystem) -> None:
        if subsys.nqn == DISCOVERY_NQN or subsys.nqn in self._subsystems:
            raise AlreadyExists(f"subsystem '{subsys.nqn}' already exists")
        self._subsystems[subsys.nqn] = subsys
        self.changed("subsystem_added", subsys)

    def remove(self, nqn: str) -> Subsystem:
        subsys = self.get(nqn)
        for ns in list(subsys.namespaces.values()):
            self.remove_namespace(subsys, ns.nsid)
        del self._subsystems[nqn]
        self.changed("subsystem_removed", subsys)
        return subsys

    # ---- namespaces ----
    def add_namespace(
        self,
        subsys: Subsystem,
        bdev: Bdev,
        *,
        nsid: int | None = None,
        uuid: str | None = None,
        nguid: str | None = None,
        eui64: str | None = None,
        anagrpid: int | None = None,
        auto_visible: bool = True,
    ) -> Namespace:
        if nsid is None or nsid == 0:
            nsid = next(i for i in range(1, subsys.max_namespaces + 2) if i not in subsys.namespaces)
        if nsid < 1 or nsid > subsys.max_namespaces or nsid == 0xFFFFFFFF:
            raise InvalidParams(
                f"parameter 'nsid' {nsid} is out of range 1..{subsys.max_namespaces}"
            )
        if nsid in subsys.namespaces:
            raise AlreadyExists(f"nsid {nsid} already exists in subsystem '{subsys.nqn}'")
        ns_uuid = str(uuidlib.UUID(uuid)) if uuid else bdev.uuid
        ns_nguid = _hex_id(nguid, 16, "nguid") if nguid else uuidlib.UUID(ns_uuid).hex
        ns_eui = _hex_id(eui64, 8, "eui64") if eui64 else None
        for other in self:
            for ns in other.namespaces.values():
                if ns.bdev is bdev:
                    raise AlreadyExists(
                        f"bdev '{bdev.name}' is already nsid {ns.nsid} of '{other.nqn}'"
                    )
        # SPDK's default: each namespace is its own ANA group, so states can be set per
        # namespace; namespaces that must move together share an explicit anagrpid.
        grp = anagrpid or nsid
        if not 1 <= grp <= subsys.max_namespaces:
            raise InvalidParams(
                f"parameter 'anagrpid' {grp} is out of range 1..{subsys.max_namespaces}"
            )
        bdev.claim(f"subsystem {subsys.nqn}")
        ns = Namespace(nsid, bdev, ns_uuid, ns_nguid, ns_eui, grp,
                       None if auto_visible else frozenset())
        subsys.namespaces[nsid] = ns
        self.changed("ns_added", subsys, ns)
        return ns

    def remove_namespace(self, subsys: Subsystem, nsid: int) -> Namespace:
        ns = subsys.namespaces.pop(nsid, None)
        if ns is None:
            raise NoSuchDevice(f"nsid {nsid} does not exist in subsystem '{subsys.nqn}'")
        ns.bdev.release(f"subsystem {subsys.nqn}")
        self.changed("ns_removed", subsys, ns)
        return ns

    # ---- namespace masking ----
    def ns_set_host(self, subsys: Subsystem, nsid: int, hostnqn: str, visible: bool) -> None:
        """Make a masked namespace visible (or not) to one host; its connected
        controllers get a namespace-attribute event (observers: "ns_visibility")."""
        ns = subsys.namespaces.get(nsid)
        if ns is None:
            raise NoSuchDevice(f"nsid {nsid} does not exist in subsystem '{subsys.nqn}'")
        hosts = ns.visible_hosts
        if hosts is None:
            raise InvalidParams(
                f"nsid {nsid} of '{subsys.nqn}' is visible to every host: add it with "
                "no_auto_visible to choose its hosts")
        if visible and hostnqn in hosts:
            raise AlreadyExists(f"nsid {nsid} of '{subsys.nqn}' is already visible to "
                                f"'{hostnqn}'")
        if not visible and hostnqn not in hosts:
            raise NoSuchDevice(f"nsid {nsid} of '{subsys.nqn}' is not visible to "
                               f"'{hostnqn}'")
        ns.visible_hosts = hosts | {hostnqn} if visible else hosts - {hostnqn}
        self.changed("ns_visibility", subsys, (ns, hostnqn))

    # ---- hosts ----
    def add_host(self, subsys: Subsystem, hostnqn: str, **extra: Any) -> None:
        if hostnqn in subsys.hosts:
            raise AlreadyExists(f"host '{hostnqn}' is already allowed in '{subsys.nqn}'")
        subsys.hosts[hostnqn] = {k: v for k, v in extra.items() if v is not None}
        self.changed("host_added", subsys, hostnqn)

    def remove_host(self, subsys: Subsystem, hostnqn: str) -> None:
        if hostnqn not in subsys.hosts:
            raise NoSuchDevice(f"host '{hostnqn}' is not in '{subsys.nqn}'")
        del subsys.hosts[hostnqn]
        self.changed("host_removed", subsys, hostnqn)

    def set_host_keys(self, subsys: Subsystem, hostnqn: str, dhchap_key: str | None,
                      dhchap_ctrlr_key: str | None) -> None:
        """Replace a host's DH-HMAC-CHAP key names (keyring names, never secrets)."""
        if hostnqn not in subsys.hosts:
            raise NoSuchDevice(f"host '{hostnqn}' is not in '{subsys.nqn}'")
        entry = subsys.hosts[hostnqn]
        for k, v in (("dhchap_key", dhchap_key), ("dhchap_ctrlr_key", dhchap_ctrlr_key)):
            if v:
                entry[k] = v
            else:
                entry.pop(k, None)
        # no changed(): keys are not in any log page, so hosts need no event

    def set_allow_any_host(self, subsys: Subsystem, allow: bool) -> None:
        subsys.allow_any_host = allow
        self.changed("hosts_changed", subsys)

    # ---- listeners ----
    def add_listener(self, subsys: Subsystem, addr: ListenAddress, secure: bool = False) -> None:
        if addr in subsys.listeners:
            raise AlreadyExists(f"listener {addr} already exists in '{subsys.nqn}'")
        self.check_secure(addr, secure)
        subsys.listeners.append(addr)
        if secure:
            self.secure.add(addr)
        self.changed("listener_added", subsys, addr)

    def check_secure(self, addr: ListenAddress, secure: bool) -> None:
        """An address already in use keeps its kind: a plain listener must not open up a
        secure one (and a secure request must not silently get a plain socket)."""
        if addr in self.all_listen_addresses() and (addr in self.secure) != secure:
            have = "secure (TLS)" if addr in self.secure else "plain"
            raise InvalidParams(f"listener {addr} is already {have} for other subsystems; "
                                "one address is either secure or plain for all of them")

    def remove_listener(self, subsys: Subsystem, addr: ListenAddress) -> None:
        if addr not in subsys.listeners:
            raise NoSuchDevice(f"listener {addr} does not exist in '{subsys.nqn}'")
        subsys.listeners.remove(addr)
        if addr not in self.all_listen_addresses():
            self.secure.discard(addr)
        for key in [k for k in subsys.ana_states if k[0] == addr]:
            del subsys.ana_states[key]
        for key in [k for k in subsys.ana_group_chgcnt if k[0] == addr]:
            del subsys.ana_group_chgcnt[key]
        self.changed("listener_removed", subsys, addr)

    def set_ana_state(self, subsys: Subsystem, addr: ListenAddress, state: str,
                      anagrpid: int | None = None) -> bool:
        """Set the ANA state of one group (or, without ``anagrpid``, of every group) as
        seen through one listener; True when something changed. Controllers connected
        through that listener then get an ANA change event (observers)."""
        if not subsys.ana_reporting:
            raise InvalidParams(f"ANA reporting is disabled in '{subsys.nqn}' "
                                "(create it with ana_reporting: true)")
        if state not in ANA_STATES:
            raise InvalidParams(f"parameter 'ana_state' {state!r} must be one of "
                                f"{', '.join(ANA_STATES)}")
        if anagrpid and not 1 <= anagrpid <= subsys.max_namespaces:  # 0: all (SPDK)
            raise InvalidParams(
                f"parameter 'anagrpid' {anagrpid} is out of range 1..{subsys.max_namespaces}"
            )
        if addr not in subsys.listeners:
            raise NoSuchDevice(f"listener {addr} does not exist in '{subsys.nqn}'")
        grps = [anagrpid] if anagrpid else range(1, subsys.max_namespaces + 1)
        todo = [g for g in grps if subsys.ana_state(addr, g) != state]
        if not todo:
            return False
        # CHGCNT: 64 bits, never 0 once anything changed (0 means "not reported")
        subsys.ana_chgcnt = subsys.ana_chgcnt % 0xFFFFFFFFFFFFFFFF + 1
        for g in todo:
            if state == "optimized":
                subsys.ana_states.pop((addr, g), None)
            else:
                subsys.ana_states[(addr, g)] = state
            subsys.ana_group_chgcnt[(addr, g)] = subsys.ana_chgcnt
        self.changed("ana_changed", subsys, addr)
        return True

    def all_listen_addresses(self) -> set[ListenAddress]:
        return {li for s in self for li in s.listeners}


def _hex_id(value: str, nbytes: int, name: str) -> str:
    text = value.replace("-", "").lower()
    if len(text) != nbytes * 2 or any(c not in "0123456789abcdef" for c in text):
        raise InvalidParams(f"parameter '{name}' must be {nbytes * 2} hex digits")
    return text
