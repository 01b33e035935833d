"""The discovery controller of blocktarget's target: entries per asking host (allow-lists
apply), GENCTR moving with every configuration change, referrals managed by SPDK's RPCs
(nvmf_discovery_add_referral / _remove_referral / _get_referrals), and an IPv6 listener
reached and discovered over ::1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktarget.host import connect, discover
from blocktarget.nvme import spec, structs
from blocktarget.rpc_client import RpcCallError

from .nvme_target_util import NQN, Tgt, start_target
from .target_proc import Launcher, free_port, listen_address, malloc

pytestmark = pytest.mark.timeout(60)

RESTRICTED = "nqn.2016-06.io.blocktarget.test:restricted"
ALLOWED = "nqn.2014-08.org.nvmexpress:uuid:22222222-3333-4444-5555-666666666666"
OTHER = "nqn.2014-08.org.nvmexpress:uuid:77777777-8888-9999-aaaa-bbbbbbbbbbbb"
SPDK_RPC = str(Path(sys.executable).with_name("spdk-rpc"))
T = spec.SubsystemType


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        t = start_target(launcher, bdevs=[malloc("Malloc0", 4096, 512),
                                          malloc("Malloc1", 1024, 512),
                                          malloc("Spare0", 1024, 512)])
        t.rpc("nvmf_create_subsystem", nqn=RESTRICTED, allow_any_host=False)
        t.rpc("nvmf_subsystem_add_ns", nqn=RESTRICTED, namespace={"bdev_name": "Malloc1"})
        t.rpc("nvmf_subsystem_add_host", nqn=RESTRICTED, host=ALLOWED)
        t.rpc("nvmf_subsystem_add_listener", nqn=RESTRICTED,
              listen_address=listen_address(t.port))
        yield t
    finally:
        launcher.cleanup()


async def genctr(t: Tgt, hostnqn: str | None = None) -> int:
    c = await connect(t.addr, t.port, spec.DISCOVERY_NQN, hostnqn=hostnqn, kato_ms=0,
                      timeout=10)
    try:
        return structs.parse_discovery_log(
            await c.get_log_page(spec.LogPage.DISCOVERY, 1024)).genctr
    finally:
        await c.disconnect()


def by_nqn(entries: list[structs.DiscoveryEntry]) -> dict[str, structs.DiscoveryEntry]:
    return {e.subnqn: e for e in entries}


async def test_entries_follow_the_allow_list(tgt: Tgt) -> None:
    anyone = await discover(tgt.addr, tgt.port, OTHER, timeout=10)
    assert anyone[0].subtype == T.CURRENT_DISCOVERY  # the discovery service itself first
    assert anyone[0].subnqn == spec.DISCOVERY_NQN
    assert NQN in by_nqn(anyone) and RESTRICTED not in by_nqn(anyone)
    allowed = by_nqn(await discover(tgt.addr, tgt.port, ALLOWED, timeout=10))
    for nqn in (NQN, RESTRICTED):
        e = allowed[nqn]
        assert (e.trtype, e.adrfam, e.subtype) == (spec.TransportType.TCP,
                                                   spec.AddressFamily.IPV4, T.NVME)
        assert (e.traddr, e.trsvcid) == ("127.0.0.1", str(tgt.port))
        assert e.cntlid == spec.CNTLID_DYNAMIC and e.asqsz == 128
        assert e.treq & spec.TREQ_SECURE_CHANNEL_MASK == spec.Treq.SECURE_CHANNEL_NOT_REQUIRED
        assert e.tsas[0] == spec.TcpSecType.NONE
    assert allowed[NQN].portid == allowed[RESTRICTED].portid  # one port, one id
    # Allowing a host makes the subsystem appear in its log.
    tgt.rpc("nvmf_subsystem_add_host", nqn=RESTRICTED, host=OTHER)
    try:
        assert RESTRICTED in by_nqn(await discover(tgt.addr, tgt.port, OTHER, timeout=10))
    finally:
        tgt.rpc("nvmf_subsystem_remove_host", nqn=RESTRICTED, host=OTHER)
    assert RESTRICTED not in by_nqn(await discover(tgt.addr, tgt.port, OTHER, timeout=10))


async def test_genctr_moves_with_every_change(tgt: Tgt) -> None:
    g = await genctr(tgt)
    assert await genctr(tgt) == g  # reading changes nothing
    nqn = "nqn.2016-06.io.blocktarget.test:genctr"
    port = free_port()
    steps = [
        ("nvmf_create_subsystem", {"nqn": nqn, "allow_any_host": True}),
        ("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": "Spare0"}}),
        ("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": listen_address(port)}),
        ("nvmf_subsystem_add_host", {"nqn": nqn, "host": ALLOWED}),
        ("nvmf_discovery_add_referral", {"address": {"trtype": "tcp", "traddr": "127.0.0.9",
                                                     "trsvcid": "4430"}}),
        ("nvmf_discovery_remove_referral", {"address": {"trtype": "tcp",
                                                        "traddr": "127.0.0.9",
                                                        "trsvcid": "4430"}}),
        ("nvmf_subsystem_remove_ns", {"nqn": nqn, "nsid": 1}),
        ("nvmf_delete_subsystem", {"nqn": nqn}),
    ]
    for method, params in steps:
        tgt.rpc(method, **params)
        g2 = await genctr(tgt)
        assert g2 > g, f"GENCTR did not move after {method}"
        g = g2


async def test_referrals(tgt: Tgt) -> None:
    addr = {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.2", "trsvcid": "4430"}
    other_nqn = "nqn.2016-06.io.elsewhere:cnode1"
    assert tgt.rpc("nvmf_discovery_get_referrals") == []
    g0 = await genctr(tgt)
    assert tgt.rpc("nvmf_discovery_add_referral", address=addr) is True
    assert tgt.rpc("nvmf_discovery_add_referral", address=addr) is True  # again: no-op
    g1 = await genctr(tgt)
    assert g1 == g0 + 1
    tgt.rpc("nvmf_discovery_add_referral", address=dict(addr, trsvcid="4431"),
            subnqn=other_nqn, secure_channel=True)
    assert tgt.rpc("nvmf_discovery_get_referrals") == [
        {"address": addr, "secure_channel": False, "subnqn": spec.DISCOVERY_NQN},
        {"address": dict(addr, trsvcid="4431"), "secure_channel": True, "subnqn": other_nqn},
    ]
    # In the log page, for any host (referrals have no allow-list here).
    refs = [e for e in await discover(tgt.addr, tgt.port, OTHER, timeout=10)
            if e.traddr == "127.0.0.2"]
    assert [(e.subtype, e.trsvcid, e.subnqn) for e in refs] == [
        (T.REFERRAL, "4430", spec.DISCOVERY_NQN), (T.NVME, "4431", other_nqn)]
    assert refs[0].treq & 3 == spec.Treq.SECURE_CHANNEL_NOT_REQUIRED
    assert refs[1].treq & 3 == spec.Treq.SECURE_CHANNEL_REQUIRED
    assert all(e.cntlid == spec.CNTLID_DYNAMIC for e in refs)
    # save_config writes them back in the shape nvmf_discovery_add_referral takes.
    saved = tgt.rpc("save_config")
    nvmf = next(s for s in saved["subsystems"] if s["subsystem"] == "nvmf")["config"]
    assert [c["params"] for c in nvmf if c["method"] == "nvmf_discovery_add_referral"] == \
        tgt.rpc("nvmf_discovery_get_referrals")
    # Removing: by address (and subnqn when it is not the discovery NQN).
    tgt.rpc("nvmf_discovery_remove_referral", address=addr)
    with pytest.raises(RpcCallError):
        tgt.rpc("nvmf_discovery_remove_referral", address=addr)
    tgt.rpc("nvmf_discovery_remove_referral", address=dict(addr, trsvcid="4431"),
            subnqn=other_nqn)
    assert tgt.rpc("nvmf_discovery_get_referrals") == []
    assert not [e for e in await discover(tgt.addr, tgt.port, OTHER, timeout=10)
                if e.traddr == "127.0.0.2"]
    # Bad parameters.
    for bad in ({"address": {"trtype": "tcp", "traddr": "127.0.0.2"}},  # no port
                {"address": {"trtype": "rdma", "traddr": "127.0.0.2", "trsvcid": "1"}},
                {"address": {"trtype": "tcp", "traddr": "not-an-ip", "trsvcid": "1"}},
                {"address": addr, "subnqn": "bad nqn"}):
        with pytest.raises(RpcCallError):
            tgt.rpc("nvmf_discovery_add_referral", **bad)


def test_referrals_with_spdk_rpc_client(tgt: Tgt) -> None:
    """SPDK's own rpc.py shapes the parameters; they must be accepted as they come."""
    if not Path(SPDK_RPC).exists():
        pytest.skip("spdk-rpc (PyPI spdk) not installed")
    sock = tgt.proc.sock_path

    def spdk(*args: str) -> str:
        r = subprocess.run([SPDK_RPC, "-s", sock, *args], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    spdk("nvmf_discovery_add_referral", "-t", "tcp", "-a", "127.0.0.3", "-s", "4432",
         "-f", "ipv4")
    spdk("nvmf_discovery_add_referral", "-t", "tcp", "-a", "127.0.0.3", "-s", "4433", "-k",
         "-n", "discovery")
    try:
        got = tgt.rpc("nvmf_discovery_get_referrals")
        assert [(r["address"]["trsvcid"], r["secure_channel"], r["subnqn"]) for r in got] == [
            ("4432", False, spec.DISCOVERY_NQN), ("4433", True, spec.DISCOVERY_NQN)]
        assert '"traddr": "127.0.0.3"' in spdk("nvmf_discovery_get_referrals")
    finally:
        spdk("nvmf_discovery_remove_referral", "-t", "tcp", "-a", "127.0.0.3", "-s", "4432")
        spdk("nvmf_discovery_remove_referral", "-t", "tcp", "-a", "127.0.0.3", "-s", "4433")
    assert tgt.rpc("nvmf_discovery_get_referrals") == []


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
async def test_ipv6_listener(tgt: Tgt) -> None:
    port6 = free_port()
    addr6 = {"trtype": "tcp", "adrfam": "ipv6", "traddr": "::1", "trsvcid": str(port6)}
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=addr6)
    try:
        # Discovery over IPv6 shows the IPv6 listener...
        entries = await discover("::1", port6, OTHER, timeout=10)
        six = [e for e in entries if e.subnqn == NQN and e.adrfam == spec.AddressFamily.IPV6]
        assert [(e.traddr, e.trsvcid) for e in six] == [("::1", str(port6))]
        # ... and a host connects and does I/O over it.
        c = await connect("::1", port6, NQN, timeout=10)
        try:
            await c.write(1, 7, b"\x66" * 512)
            assert bytes(await c.read(1, 7, 1)) == b"\x66" * 512
        finally:
            await c.disconnect()
        # Discovery through the IPv4 port lists both of the subsystem's listeners.
        v4 = [e for e in await discover(tgt.addr, tgt.port, OTHER, timeout=10)
              if e.subnqn == NQN]
        assert {(e.adrfam, e.traddr) for e in v4} == {
            (spec.AddressFamily.IPV4, "127.0.0.1"), (spec.AddressFamily.IPV6, "::1")}
        sub = tgt.rpc("nvmf_get_subsystems", nqn=NQN)[0]
        assert {"trtype": "TCP", "adrfam": "IPv6", "traddr": "::1",
                "trsvcid": str(port6)} in sub["listen_addresses"]
    finally:
        tgt.rpc("nvmf_subsystem_remove_listener", nqn=NQN, listen_address=addr6)


async def test_wildcard_listener_entry_names_the_address_used(tgt: Tgt) -> None:
    """A listener on 0.0.0.0 is listed with the address the host reached us at: a host
    cannot connect to "0.0.0.0" from another machine."""
    port = free_port()
    wild = {"trtype": "tcp", "adrfam": "ipv4", "traddr": "0.0.0.0", "trsvcid": str(port)}
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=wild)
    try:
        entries = await discover("127.0.0.1", port, OTHER, timeout=10)
        mine = [e for e in entries if e.trsvcid == str(port)]
        assert {(e.subtype, e.traddr) for e in mine} == {
            (T.CURRENT_DISCOVERY, "127.0.0.1"), (T.NVME, "127.0.0.1")}
        c = await connect("127.0.0.1", port, NQN, timeout=10)
        await c.disconnect()
    finally:
        tgt.rpc("nvmf_subsystem_remove_listener", nqn=NQN, listen_address=wild)
