"""The Python initiator (blocktarget.host) against a real NVMe/TCP target.

Two peers, both loading the same SPDK-shape JSON config (spdk_target.nvmf_config):
blocktarget's own target, always tested, and SPDK's nvmf_tgt, the reference
implementation (if our host and it disagree, our host is wrong), tested when SPDK's
nvmf_tgt is available (an optional tool: $SPDK_TOOLS, .tools/spdk or PATH, see
bench/spdk_tools.py) and skipped, saying why, when not, in CI too. HOST_TEST_TARGETS=spdk
or =blocktarget narrows the run to one of them. Where blocktarget intentionally
differs from SPDK, the test asserts blocktarget's exact behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from blocktarget import __version__
from blocktarget.host import Controller, NvmeStatusError, TransportError, connect, discover
from blocktarget.host.perf import PerfConfig, run_perf_async
from blocktarget.nvme import pdu, spec, structs

from .spdk_target import (
    ALLOWED_HOSTNQN,
    Layout,
    SpdkTarget,
    SpdkUnavailable,
    free_port,
    nvmf_config,
)
from .target_proc import Launcher

pytestmark = [pytest.mark.timeout(120)]

KINDS = [t.strip() for t in os.environ.get("HOST_TEST_TARGETS", "spdk,blocktarget").split(",")
         if t.strip()]
# The `spdk` marker goes on SPDK's instances only: `-m "not spdk"` still tests blocktarget.
TARGETS = [pytest.param(k, marks=pytest.mark.spdk) if k == "spdk" else k for k in KINDS]


@dataclass
class NvmeTarget:
    kind: str
    addr: str
    port: int
    nqn: str
    layout: Layout
    rpc: Callable[..., Any]
    kill: Callable[[], None]  # kill -9, for the target-death test


@contextlib.contextmanager
def running(kind: str, layout: Layout) -> Iterator[NvmeTarget]:
    """One target of `kind` serving `layout`; skips (SPDK only) when it cannot start."""
    if kind == "spdk":
        try:
            t = SpdkTarget(layout).start()
        except SpdkUnavailable as exc:
            pytest.skip(f"SPDK reference target unavailable: {exc}")

        def kill_spdk() -> None:
            assert t.proc is not None
            t.proc.kill()

        try:
            yield NvmeTarget(kind, t.addr, t.port, layout.nqn, layout, t.rpc, kill_spdk)
        finally:
            t.stop()
    elif kind == "blocktarget":
        launcher = Launcher()
        try:
            rt = launcher(nvmf_config(layout))
            yield NvmeTarget(kind, "127.0.0.1", layout.port, layout.nqn, layout, rt.rpc,
                             rt.kill)
        finally:
            launcher.cleanup()
    else:  # pragma: no cover - a typo in HOST_TEST_TARGETS
        pytest.fail(f"unknown target kind {kind!r}")


@pytest.fixture(scope="module", params=TARGETS)
def nvme_target(request: pytest.FixtureRequest) -> Iterator[NvmeTarget]:
    """(addr, port, nqn) of a running target exporting spdk_target.Layout."""
    with running(request.param, Layout(port=free_port())) as t:
        yield t


@contextlib.asynccontextmanager
async def controller(t: NvmeTarget, **kw: Any) -> AsyncIterator[Controller]:
    ctrl = await connect(t.addr, t.port, kw.pop("nqn", t.nqn), timeout=15, **kw)
    try:
        yield ctrl
    finally:
        await ctrl.disconnect()


def sc_of(exc: NvmeStatusError) -> tuple[int, int]:
    return exc.sct, exc.sc


# ----------------------------------------------------------------- discovery/identify


async def test_discover(nvme_target: NvmeTarget) -> None:
    t = nvme_target
    entries = await discover(t.addr, t.port, timeout=15)
    by_nqn = {e.subnqn: e for e in entries}
    # The allow-list applies to discovery: an unknown host does not see the restricted one.
    assert t.nqn in by_nqn and t.layout.restricted_nqn not in by_nqn
    entries = await discover(t.addr, t.port, ALLOWED_HOSTNQN, timeout=15)
    by_nqn = {e.subnqn: e for e in entries}
    for nqn in (t.nqn, t.layout.restricted_nqn):
        e = by_nqn[nqn]
        assert e.trtype == spec.TransportType.TCP
        assert e.adrfam == spec.AddressFamily.IPV4
        assert e.subtype == spec.SubsystemType.NVME
        assert e.traddr == "127.0.0.1"
        assert e.trsvcid == str(t.port)


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
async def test_connect_identify(nvme_target: NvmeTarget, digests: bool) -> None:
    t = nvme_target
    async with controller(t, nr_io_queues=2, hdgst=digests, ddgst=digests) as c:
        assert len(c.io_queues) == 2
        assert all(q.hdgst == digests and q.ddgst == digests for q in c.io_queues)
        assert c.admin_q is not None and c.admin_q.hdgst == digests
        assert 0 < c.cntlid < spec.CNTLID_DYNAMIC
        assert c.vs >= spec.make_version(1, 3)
        idc = c.id_ctrl
        assert idc["subnqn"] == t.nqn
        assert idc["sn"] == "BTHOST0001"
        assert idc["cntlid"] == c.cntlid
        assert idc["sqes"] == spec.SQES_NVM and idc["cqes"] == spec.CQES_NVM
        assert idc["ioccsz"] >= 4 and idc["iorcsz"] >= 1
        assert idc["nn"] >= 2
        assert await c.active_ns_list() == [1, 2]
        ns1 = await c.namespace(1)
        ns2 = await c.namespace(2)
        assert (ns1.nsze, ns1.lba_size) == (t.layout.ns1_blocks, 512)
        assert (ns2.nsze, ns2.lba_size) == (t.layout.ns2_blocks, 4096)
        descs = await c.ns_descriptors(1)
        assert descs and all(nidt in spec.NID_LENGTHS for nidt, _ in descs)
        # Both I/O queues actually work.
        for qid in (1, 2):
            await c.write(1, 10 + qid, bytes([qid]) * 512, qid=qid)
            assert bytes(await c.read(1, 10 + qid, 1, qid=qid)) == bytes([qid]) * 512
        r = await c.get_features(spec.FeatureId.NUM_QUEUES)
        assert (r.completion.dw0 & 0xFFFF) + 1 >= 2
        if t.kind == "blocktarget":
            assert idc["mn"] == "host test target" and idc["fr"] == __version__[:8]
            assert idc["mdts"] == 5 and idc["ioccsz"] == (64 + 8192) // 16
            assert idc["cntrltype"] == spec.CtrlType.IO
            assert r.completion.dw0 == (1 << 16) | 1  # exactly the 2 queues asked for
            assert {nidt for nidt, _ in descs} == {spec.NidType.NGUID, spec.NidType.UUID,
                                                   spec.NidType.CSI}


async def test_restricted_subsystem_refuses_unknown_host(nvme_target: NvmeTarget) -> None:
    t = nvme_target
    with pytest.raises(NvmeStatusError) as ei:
        await connect(t.addr, t.port, t.layout.restricted_nqn, timeout=15)
    assert sc_of(ei.value) == (spec.Sct.COMMAND_SPECIFIC, spec.FabricsStatus.CONNECT_INVALID_HOST)
    assert "CONNECT_INVALID_HOST" in str(ei.value)
    async with controller(t, nqn=t.layout.restricted_nqn, hostnqn=ALLOWED_HOSTNQN) as c:
        assert c.id_ctrl["subnqn"] == t.layout.restricted_nqn


# --------------------------------------------------------------------------- I/O


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
@pytest.mark.parametrize(
    ("nsid", "size"),
    [(1, 512), (1, 4096), (1, 8192), (1, 65536), (1, 131072), (2, 4096), (2, 131072)],
)
async def test_write_read_verify(nvme_target: NvmeTarget, digests: bool, nsid: int,
                                 size: int) -> None:
    """Sizes around the in-capsule limit (ICD vs R2T) and up to MDTS (large C2H)."""
    async with controller(nvme_target, nr_io_queues=2, hdgst=digests, ddgst=digests) as c:
        ns = await c.namespace(nsid)
        nlb = size // ns.lba_size
        base = 1000 + (size // 512) * 7 + (64 if digests else 0) * nlb
        datas = [os.urandom(size) for _ in range(8)]
        await asyncio.gather(*(c.write(nsid, base + i * nlb, d) for i, d in enumerate(datas)))
        got = await asyncio.gather(*(c.read(nsid, base + i * nlb, nlb) for i in range(8)))
        assert [bytes(g) for g in got] == datas
        buf = bytearray(size)
        view = await c.read(nsid, base, nlb, buf)
        assert bytes(view) == datas[0] and bytes(buf) == datas[0]
        # FUA writes are ordinary writes to a malloc bdev, but must be accepted.
        await c.write(nsid, base, datas[1], fua=True)
        assert bytes(await c.read(nsid, base, nlb)) == datas[1]


async def test_flush_write_zeroes_dsm(nvme_target: NvmeTarget) -> None:
    async with controller(nvme_target) as c:
        await c.flush(1)
        # Flush of all namespaces is defined only when VWC says broadcast is supported.
        broadcast = c.id_ctrl["vwc"] & 0x6
        if broadcast == spec.Vwc.FLUSH_BROADCAST_SUPPORTED:
            await c.flush(spec.NSID_ALL)
        elif broadcast == spec.Vwc.FLUSH_BROADCAST_NOT_SUPPORTED:
            with pytest.raises(NvmeStatusError, match="INVALID_NS"):
                await c.flush(spec.NSID_ALL)
        data = os.urandom(16 * 512)
        await c.write(1, 5000, data)
        await c.write_zeroes(1, 5000, 8)
        got = bytes(await c.read(1, 5000, 16))
        assert got[:4096] == bytes(4096) and got[4096:] == data[4096:]
        # Write Zeroes with DEAC: DLFEAT bit 3 says whether the target supports it;
        # SPDK does not and answers Invalid Field.
        idns = await c.identify_ns(1)
        await c.write(1, 5000, data)
        if nvme_target.kind == "blocktarget":
            # malloc bdevs unmap: DEAC is honoured and deallocated blocks read zeroes
            assert idns["dlfeat"] & 0xF == (spec.Dlfeat.WRITE_ZEROES_DEALLOC
                                             | spec.Dlfeat.READ_ZEROES)
        try:
            await c.write_zeroes(1, 5004, 4, deallocate=True)
        except NvmeStatusError as exc:
            assert nvme_target.kind != "blocktarget"
            assert not idns["dlfeat"] & spec.Dlfeat.WRITE_ZEROES_DEALLOC
            assert sc_of(exc) == (spec.Sct.GENERIC, spec.GenericStatus.INVALID_FIELD)
        else:
            got = bytes(await c.read(1, 5000, 16))
            assert got[2048:4096] == bytes(2048) and got[:2048] == data[:2048]
        # DSM deallocate: reads back zeroes when the namespace says so (DLFEAT).
        await c.write(1, 6000, data)
        await c.dsm_deallocate(1, [(6000, 4), (6008, 8)])
        if idns["dlfeat"] & 0x7 == spec.Dlfeat.READ_ZEROES:
            got = bytes(await c.read(1, 6000, 16))
            assert got[:2048] == bytes(2048) and got[4096:] == bytes(4096)
            assert got[2048:4096] == data[2048:4096]


async def test_compare(nvme_target: NvmeTarget) -> None:
    async with controller(nvme_target) as c:
        data = os.urandom(4096)
        await c.write(1, 7000, data)
        assert (await c.compare(1, 7000, data)).status == 0
        other = bytearray(data)
        other[100] ^= 0xFF
        with pytest.raises(NvmeStatusError) as ei:
            await c.compare(1, 7000, bytes(other))
        assert sc_of(ei.value) == (spec.Sct.MEDIA_ERROR, spec.MediaStatus.COMPARE_FAILURE)
        cpl = await c.compare(1, 7000, bytes(other), check=False)
        assert spec.status_sc(cpl.status) == spec.MediaStatus.COMPARE_FAILURE


async def test_error_statuses(nvme_target: NvmeTarget) -> None:
    async with controller(nvme_target) as c:
        ns = await c.namespace(1)
        # LBA out of range: past the end, and a range straddling the end.
        for slba, nlb in ((ns.nsze, 1), (ns.nsze - 1, 2)):
            with pytest.raises(NvmeStatusError) as ei:
                await c.read(1, slba, nlb)
            assert sc_of(ei.value) == (spec.Sct.GENERIC, spec.GenericStatus.LBA_OUT_OF_RANGE)
            with pytest.raises(NvmeStatusError) as ei:
                await c.write(1, slba, bytes(512 * nlb))
            assert sc_of(ei.value) == (spec.Sct.GENERIC, spec.GenericStatus.LBA_OUT_OF_RANGE)
        # Invalid namespace (raw command: the helpers would Identify first).
        r = await c.io(spec.IoOpcode.READ, 99, 0, 0, 0, in_len=512, check=False)
        assert spec.status_sct(r.completion.status) == spec.Sct.GENERIC
        assert spec.status_sc(r.completion.status) == spec.GenericStatus.INVALID_NS
        with pytest.raises(NvmeStatusError, match="INVALID_NS"):
            await c.io(spec.IoOpcode.WRITE, 99, data_out=bytes(512))
        # Unsupported opcodes: Invalid Opcode, never a hang.
        r = await c.io(0x7E, 1, check=False)
        assert spec.status_sc(r.completion.status) == spec.GenericStatus.INVALID_OPCODE
        r = await c.admin(0x7D, check=False)
        assert spec.status_sc(r.completion.status) == spec.GenericStatus.INVALID_OPCODE
        # ... and the connection is still fine afterwards.
        await c.write(1, 0, bytes(512))


async def test_transfer_beyond_mdts(nvme_target: NvmeTarget) -> None:
    """A read longer than MDTS is refused. Targets differ in how: an error status
    (the Linux target) or a C2HTermReq "data transfer limit exceeded" (SPDK). Either
    way the host reports it; it must not hang or corrupt another command."""
    async with controller(nvme_target) as c:
        if not c.max_transfer:
            pytest.skip("no MDTS limit")
        ns = await c.namespace(1)
        nlb = min(c.max_transfer // ns.lba_size * 2, 0x10000)
        try:
            r = await c.io(spec.IoOpcode.READ, 1, 0, 0, nlb - 1, in_len=nlb * ns.lba_size,
                           check=False, timeout=10)
        except TransportError as exc:
            assert nvme_target.kind != "blocktarget", exc
            assert exc.fes == pdu.Fes.DATA_TRANSFER_LIMIT_EXCEEDED, exc
            assert c.io_queues[0].error is not None
        else:
            assert r.completion.status != 0
            if nvme_target.kind == "blocktarget":  # as the Linux target: a status
                assert spec.status_sct(r.completion.status) == spec.Sct.GENERIC
                assert spec.status_sc(r.completion.status) == spec.GenericStatus.INVALID_FIELD
                await c.read(1, 0, c.max_transfer // ns.lba_size)  # and the queue goes on


async def test_log_pages_and_features(nvme_target: NvmeTarget) -> None:
    async with controller(nvme_target) as c:
        bt = nvme_target.kind == "blocktarget"
        await c.write(1, 8000, os.urandom(64 * 1024))
        await c.read(1, 8000, 128)
        smart = await c.smart_log()
        assert smart["critical_warning"] == 0
        assert smart["percent_used"] <= 100
        # Targets differ on whether they count; none may go backwards.
        smart2 = await c.smart_log()
        assert smart2["data_units_written"] >= smart["data_units_written"]
        if bt:  # per-controller counters, exact: 128 of 512 B written and read, once each
            assert (smart["data_units_written"], smart["data_units_read"]) == (1, 1)
            assert (smart["host_write_commands"], smart["host_read_commands"]) == (1, 1)
        err = await c.get_log_page(spec.LogPage.ERROR, 64)
        assert len(err) == 64
        kato = await c.get_features(spec.FeatureId.KATO)
        assert kato.completion.dw0 in (0, 5000) or kato.completion.dw0 >= 5000
        if bt:
            assert kato.completion.dw0 == 5000
        with pytest.raises(NvmeStatusError) as ei:
            await c.get_log_page(0xBF, 512)  # vendor log nobody implements
        if bt:
            assert (ei.value.sct, ei.value.sc) == (spec.Sct.COMMAND_SPECIFIC,
                                                   spec.CommandStatus.INVALID_LOG_PAGE)
            entries = structs.parse_error_log(await c.get_log_page(spec.LogPage.ERROR, 64))
            assert entries[0].status == ei.value.status and entries[0].sqid == 0


# -------------------------------------------------------------------- lifecycle


async def test_keep_alive_keeps_controller(nvme_target: NvmeTarget) -> None:
    async with controller(nvme_target, kato_ms=1000) as c:
        await asyncio.sleep(3.0)  # three KATOs: only our keep-alives keep it alive
        assert c.connected
        await c.write(1, 9000, bytes(512))
        assert bytes(await c.read(1, 9000, 1)) == bytes(512)


async def test_disconnect_and_reconnect(nvme_target: NvmeTarget) -> None:
    t = nvme_target
    c = await connect(t.addr, t.port, t.nqn, nr_io_queues=2, timeout=15)
    try:
        data = os.urandom(4096)
        await c.write(1, 9100, data)
        old = c.cntlid
        await c.reconnect()
        assert c.connected and len(c.io_queues) == 2
        assert c.cntlid != old  # a new controller (dynamic ids advance)
        assert bytes(await c.read(1, 9100, 8)) == data
    finally:
        await c.disconnect()
    assert not c.connected
    with pytest.raises(ConnectionError):
        await c.read(1, 9100, 8)


async def test_async_event_on_namespace_add(nvme_target: NvmeTarget) -> None:
    t = nvme_target
    async with controller(t) as c:
        if not c.id_ctrl["oaes"] & spec.AenConfig.NS_ATTR:
            assert t.kind != "blocktarget"
            pytest.skip("target does not report namespace attribute notices")
        aer = await c.async_event_request()
        t.rpc("nvmf_subsystem_add_ns", nqn=t.nqn, namespace={"bdev_name": "Spare0", "nsid": 3})
        try:
            dw0 = await asyncio.wait_for(aer, 10)
            assert dw0 & 0x7 == spec.AsyncEventType.NOTICE
            assert (dw0 >> 8) & 0xFF == spec.AsyncEventNotice.NS_ATTR_CHANGED
            assert (dw0 >> 16) & 0xFF == spec.LogPage.CHANGED_NS
            changed = await c.get_log_page(spec.LogPage.CHANGED_NS, 4096)
            assert 3 in [int.from_bytes(changed[i:i + 4], "little") for i in range(0, 4096, 4)]
            assert 3 in await c.active_ns_list()
            # Removal is a namespace attribute change too.
            aer = await c.async_event_request()
        finally:
            t.rpc("nvmf_subsystem_remove_ns", nqn=t.nqn, nsid=3)
        dw0 = await asyncio.wait_for(aer, 10)
        assert (dw0 >> 8) & 0xFF == spec.AsyncEventNotice.NS_ATTR_CHANGED
        assert 3 not in await c.active_ns_list()
        # A pending AER fails cleanly at disconnect (no warnings, no hang).
        pending = await c.async_event_request()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(pending, 5)


# -------------------------------------------------------------------------- perf


def _sane(summary: dict[str, Any], key: str) -> None:
    d = summary[key]
    assert d["ops"] > 100 and d["errors"] == 0, d
    assert d["iops"] > 50 and d["mib_s"] > 0
    lat = d["lat_us"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]


@pytest.mark.parametrize(("workload", "size", "verify"), [
    ("randread", 4096, False),
    ("randwrite", 4096, False),
    ("randrw", 8192, True),
    ("write", 131072, True),
])
async def test_perf(nvme_target: NvmeTarget, workload: str, size: int, verify: bool) -> None:
    t = nvme_target
    cfg = PerfConfig(t.addr, t.port, t.nqn, workload=workload, io_size=size, qd=16,
                     time_s=1.5, verify=verify, size=8 << 20, seed=1)
    res = await run_perf_async(cfg)
    s = res.summary()
    assert res.ok, res.messages
    assert 1.4 < s["elapsed_s"] < 10
    _sane(s, "total")
    if cfg.read_share:
        _sane(s, "read")
    if cfg.read_share < 100:
        _sane(s, "write")
    if verify and cfg.read_share:
        assert res.verified_reads > 0 and res.verify_failures == 0


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blocktarget", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_discover_connect(nvme_target: NvmeTarget) -> None:
    t = nvme_target
    r = _cli("discover", "-a", t.addr, "-s", str(t.port))
    assert r.returncode == 0, r.stderr
    assert f"subnqn:  {t.nqn}" in r.stdout and f"trsvcid: {t.port}" in r.stdout
    assert "subtype: nvme subsystem" in r.stdout
    r = _cli("connect", "-a", t.addr, "-s", str(t.port), "-n", t.nqn, "-i", "2", "-g", "-G")
    assert r.returncode == 0, r.stderr
    assert "I/O queues   2 x" in r.stdout and "header on, data on" in r.stdout
    assert "nsid 1: 131072 blocks of 512 bytes" in r.stdout and "disconnected" in r.stdout
    r = _cli("connect", "-a", t.addr, "-s", str(t.port), "-n", t.layout.restricted_nqn)
    assert r.returncode == 1 and "CONNECT_INVALID_HOST" in r.stderr


def test_cli_perf_two_connections(nvme_target: NvmeTarget) -> None:
    t = nvme_target
    r = _cli("perf", "-a", t.addr, "-s", str(t.port), "-n", t.nqn, "-w", "randrw", "-o", "4k",
             "-q", "8", "-t", "2", "-c", "2", "--verify", "--size", "4M", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    s = json.loads(r.stdout)
    _sane(s, "read")
    _sane(s, "write")
    assert s["verify_failures"] == 0 and s["verified_reads"] > 0
    assert "IOPS" in r.stderr  # the live progress line


# ------------------------------------------------- non-default transport options


@pytest.fixture(scope="module", params=TARGETS)
def variant_target(request: pytest.FixtureRequest) -> Iterator[NvmeTarget]:
    """A target without C2H SUCCESS (every read ends with a CapsuleResp) and with 1 KiB
    of in-capsule data (so 2-4 KiB writes take the R2T path): the paths the default
    settings never exercise."""
    layout = Layout(port=free_port(),
                    transport={"c2h_success": False, "in_capsule_data_size": 1024})
    with running(request.param, layout) as t:
        yield t


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
async def test_variant_transport_paths(variant_target: NvmeTarget, digests: bool) -> None:
    t = variant_target
    async with controller(t, hdgst=digests, ddgst=digests, disable_sqflow=digests) as c:
        assert c.id_ctrl["ioccsz"] * 16 - 64 == 1024
        for size in (512, 1024, 1536, 4096, 131072):
            data = os.urandom(size)
            await c.write(1, 2000, data)
            assert bytes(await c.read(1, 2000, size // 512)) == data
    cfg = PerfConfig(t.addr, t.port, t.nqn, workload="randrw", io_size=4096, qd=8,
                     time_s=1.0, verify=True, size=2 << 20, ddgst=digests)
    res = await run_perf_async(cfg)
    assert res.ok, res.messages
    assert res.verified_reads > 0


@pytest.mark.parametrize("kind", TARGETS)
async def test_target_death_fails_io_and_reconnect_recovers(kind: str) -> None:
    """kill -9 of the target with I/O in flight: every command fails with a
    ConnectionError (none hangs); once a target listens again, reconnect() recovers."""
    layout = Layout(port=free_port())
    with running(kind, layout) as t:
        c = await connect(t.addr, t.port, layout.nqn, nr_io_queues=2, kato_ms=2000,
                          timeout=10)
        try:
            await c.write(1, 0, bytes(4096))
            inflight = [asyncio.ensure_future(c.read(1, i * 8, 8)) for i in range(64)]
            t.kill()
            results = await asyncio.wait_for(
                asyncio.gather(*inflight, return_exceptions=True), 20)
            failed = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(r, ConnectionError) for r in failed), failed
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(c.read(1, 0, 8), 20)
            with running(kind, layout):
                await c.reconnect()
                data = os.urandom(4096)
                await c.write(1, 0, data)
                assert bytes(await c.read(1, 0, 8)) == data
                await c.disconnect()
        finally:
            await c.close()
