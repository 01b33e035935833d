"""nvmf_create_transport options as blocktarget's target honours them, seen on the wire:
max_queue_depth (CAP.MQES, Connect SQSIZE), max_io_qpairs_per_ctrlr, in_capsule_data_size
(IOCCSZ; larger writes take R2T), max_io_size (MDTS), io_unit_size (C2HData size),
c2h_success (only with SQ flow control disabled), header/data digests; and where
connections are placed on reactors (round robin, or least connections).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from blocktarget.host import connect
from blocktarget.nvme import pdu, spec

from .nvme_target_util import (
    CS,
    NQN,
    G,
    RawQueue,
    Tgt,
    open_queue,
    raw_controller,
    sct_sc,
    start_target,
)
from .target_proc import Launcher

pytestmark = pytest.mark.timeout(60)

IO = spec.IoOpcode
SQFLOW_OFF = spec.CONNECT_CATTR_DISABLE_SQFLOW
TUNED = {"max_queue_depth": 32, "max_io_qpairs_per_ctrlr": 2, "in_capsule_data_size": 1024,
         "max_io_size": 131072, "io_unit_size": 32768, "c2h_success": True}
PLAIN = {"max_io_size": 65536, "c2h_success": False, "header_digest": False,
         "data_digest": False, "placement": "least_connections"}


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    la = Launcher()
    try:
        yield la
    finally:
        la.cleanup()


@pytest.fixture(scope="module")
def tuned(launcher: Launcher) -> Tgt:
    return start_target(launcher, transport=TUNED)


@pytest.fixture(scope="module")
def plain(launcher: Launcher) -> Tgt:
    """No C2H SUCCESS, no digests, 64 KiB transfers, least-connections placement."""
    return start_target(launcher, cores=(0, 1), transport=PLAIN)


@pytest.fixture(scope="module")
def round_robin(launcher: Launcher) -> Tgt:
    return start_target(launcher, cores=(0, 1))


def test_options_reported(tuned: Tgt, plain: Tgt) -> None:
    t = tuned.rpc("nvmf_get_transports")[0]
    assert {k: t[k] for k in TUNED} == TUNED
    p = plain.rpc("nvmf_get_transports")[0]
    assert {k: p[k] for k in PLAIN} == PLAIN
    # placement is validated, and written back by save_config only when not default
    saved = plain.rpc("save_config")
    nvmf = next(s for s in saved["subsystems"] if s["subsystem"] == "nvmf")["config"]
    params = next(c["params"] for c in nvmf if c["method"] == "nvmf_create_transport")
    assert params["placement"] == "least_connections"
    saved = tuned.rpc("save_config")
    nvmf = next(s for s in saved["subsystems"] if s["subsystem"] == "nvmf")["config"]
    params = next(c["params"] for c in nvmf if c["method"] == "nvmf_create_transport")
    assert "placement" not in params


# ---------------------------------------------------------------- queue limits


async def test_max_queue_depth(tuned: Tgt) -> None:
    async with raw_controller(tuned, io_sqsize=31) as c:
        cap = (await c.admin.property_get(spec.Property.CAP, 8)).result64
        assert (cap & spec.CAP_MQES_MASK) + 1 == 32
        r = await c.admin.admin(spec.AdminOpcode.IDENTIFY, in_len=4096, cdw10=spec.Cns.CTRL)
        assert int.from_bytes(r.data[514:516], "little") == 32  # MAXCMD
        q = await open_queue(tuned.addr, tuned.port)
        try:
            cqe = await q.connect(2, cntlid=c.cntlid, sqsize=32)  # 33 entries: too many
            assert (sct_sc(cqe), cqe.dw0) == ((CS, spec.FabricsStatus.CONNECT_INVALID_PARAM),
                                              44)
        finally:
            await q.close()


async def test_max_io_qpairs_per_ctrlr(tuned: Tgt) -> None:
    async with raw_controller(tuned, nr_io=0) as c:
        r = await c.admin.admin(spec.AdminOpcode.GET_FEATURES, cdw10=spec.FeatureId.NUM_QUEUES)
        assert r.cqe is not None and r.cqe.dw0 == (1 << 16) | 1
        r = await c.admin.admin(spec.AdminOpcode.SET_FEATURES,
                                cdw10=spec.FeatureId.NUM_QUEUES, cdw11=(15 << 16) | 15)
        assert r.cqe is not None and r.cqe.dw0 == (1 << 16) | 1  # asked 16, granted 2
        qs = []
        try:
            for qid in (1, 2):
                q = await open_queue(tuned.addr, tuned.port)
                qs.append(q)
                assert (await q.connect(qid, cntlid=c.cntlid, sqsize=31)).status == 0
            q = await open_queue(tuned.addr, tuned.port)
            qs.append(q)
            cqe = await q.connect(3, cntlid=c.cntlid, sqsize=31)
            assert (sct_sc(cqe), cqe.dw0) == ((CS, spec.FabricsStatus.CONNECT_INVALID_PARAM),
                                              42)
        finally:
            for q in qs:
                await q.close()


# ------------------------------------------------------------------- data sizes


async def test_in_capsule_data_size(tuned: Tgt) -> None:
    async with raw_controller(tuned, io_sqsize=31) as c:
        r = await c.admin.admin(spec.AdminOpcode.IDENTIFY, in_len=4096, cdw10=spec.Cns.CTRL)
        ioccsz = int.from_bytes(r.data[1792:1796], "little")
        assert ioccsz * 16 - 64 == 1024
        q = c.io[0]
        d = os.urandom(1024)
        assert (await q.write(1, 0, d, in_capsule=True)).ok
        big = os.urandom(1536)
        r = await q.write(1, 10, big, in_capsule=True)
        assert r.status == (G, spec.GenericStatus.DATA_SGL_LENGTH_INVALID)
        r = await q.write(1, 10, big)  # over IOCCSZ: R2T
        assert r.ok and [type(p) for p in r.pdus] == [pdu.R2T, pdu.CapsuleResp]
        assert (await q.read(1, 10, 3)).data == big
        assert (await q.read(1, 0, 2)).data == d


async def test_max_io_size_is_mdts(tuned: Tgt, plain: Tgt) -> None:
    for t, mdts in ((tuned, 5), (plain, 4)):
        async with raw_controller(t, io_sqsize=31) as c:
            r = await c.admin.admin(spec.AdminOpcode.IDENTIFY, in_len=4096,
                                    cdw10=spec.Cns.CTRL)
            assert r.data[77] == mdts  # 2^mdts 4 KiB pages
            limit = 4096 << mdts
            assert (await c.io[0].read(1, 0, limit // 512)).ok
            r = await c.io[0].read(1, 0, 2 * limit // 512)
            assert r.status == (G, spec.GenericStatus.INVALID_FIELD)


async def test_io_unit_size_splits_c2h_data(tuned: Tgt, plain: Tgt) -> None:
    """A 128 KiB read with io_unit_size 32 KiB arrives as 4 C2HData PDUs; with the
    default io_unit_size (128 KiB) and max_io_size 64 KiB, a 64 KiB read is one PDU."""
    async with raw_controller(tuned, io_sqsize=31) as c:
        q = c.io[0]
        data = os.urandom(131072)
        assert (await q.write(1, 100, data)).ok
        r = await q.read(1, 100, 256)
        c2h = [p for p in r.pdus if type(p) is pdu.C2HData]
        assert [(p.datao, len(p.data), p.last) for p in c2h] == [
            (0, 32768, False), (32768, 32768, False), (65536, 32768, False),
            (98304, 32768, True)]
        assert r.data == data and type(r.pdus[-1]) is pdu.CapsuleResp
    async with raw_controller(plain) as c:
        r = await c.io[0].read(1, 0, 128)
        assert [type(p) for p in r.pdus] == [pdu.C2HData, pdu.CapsuleResp]
        assert len(r.pdus[0].data) == 65536


async def test_c2h_success(tuned: Tgt, plain: Tgt) -> None:
    """DATA_SUCCESS replaces the CapsuleResp only when c2h_success is on and the host
    disabled SQ flow control at Connect; otherwise a CapsuleResp follows the data and
    carries SQHD (0 when flow control is off: the field is then reserved)."""
    async with raw_controller(tuned, io_sqsize=31, cattr=SQFLOW_OFF) as c:
        r = await c.io[0].read(1, 0, 256)
        assert r.cqe is None and len(r.data) == 131072
        assert r.pdus[-1].success and r.pdus[-1].last
        assert not any(p.success for p in r.pdus[:-1])
        # Errors still come as a CapsuleResp.
        assert (await c.io[0].read(1, 1 << 30, 1)).status == (
            G, spec.GenericStatus.LBA_OUT_OF_RANGE)
    async with raw_controller(tuned, io_sqsize=31) as c:
        r = await c.io[0].read(1, 0, 8)
        assert r.cqe is not None and r.cqe.sqhd == 2 and not r.pdus[0].success
    async with raw_controller(plain, cattr=SQFLOW_OFF) as c:
        r = await c.io[0].read(1, 0, 8)
        assert r.cqe is not None and r.ok and r.cqe.sqhd == 0
        assert not r.pdus[0].success


async def test_digests_refused_when_disabled(plain: Tgt) -> None:
    q = await RawQueue.open(plain.addr, plain.port)
    try:
        resp = await q.icreq(hdgst=True, ddgst=True)
        assert resp.dgst == 0  # the host asked, the transport does not allow them
        assert (await q.connect(0)).status == 0  # and the queue works without
    finally:
        await q.close()
    # A host that insists (as Linux and our initiator do) gives up.
    with pytest.raises(ConnectionError):
        await connect(plain.addr, plain.port, NQN, hdgst=True, timeout=5)


# -------------------------------------------------------------------- placement


def connections(t: Tgt) -> list[list[str]]:
    return [r["connections"] for r in t.rpc("framework_get_reactors")["reactors"]]


async def wait_counts(t: Tgt, want: list[int]) -> list[list[str]]:
    for _ in range(100):
        got = connections(t)
        if [len(c) for c in got] == want:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"connections per reactor {[len(c) for c in got]}, wanted {want}")


async def placement_run(t: Tgt) -> list[int]:
    """4 connections, then the ones on reactor 1 close, then 2 new: where do they go?"""
    await wait_counts(t, [0, 0])  # earlier tests' connections are gone
    qs = [await open_queue(t.addr, t.port) for _ in range(4)]
    got = await wait_counts(t, [2, 2])
    on_r1 = {c.split()[0] for c in got[1]}
    keep: list[RawQueue] = []
    for q in qs:
        local: Any = q.writer.get_extra_info("sockname")
        if f"{local[0]}:{local[1]}" in on_r1:
            await q.close()
        else:
            keep.append(q)
    await wait_counts(t, [2, 0])
    for _ in range(2):
        keep.append(await open_queue(t.addr, t.port))
    await asyncio.sleep(0.1)
    counts = [len(c) for c in connections(t)]
    for q in keep:
        await q.close()
    await wait_counts(t, [0, 0])
    return counts


async def test_round_robin_placement(round_robin: Tgt) -> None:
    assert await placement_run(round_robin) == [3, 1]


async def test_least_connections_placement(plain: Tgt) -> None:
    assert await placement_run(plain) == [2, 2]


def test_placement_validated(launcher: Launcher, round_robin: Tgt) -> None:
    from blocktarget.rpc_client import RpcCallError

    with pytest.raises(RpcCallError) as ei:
        round_robin.rpc("nvmf_create_transport", trtype="TCP", placement="random")
    assert "placement" in str(ei.value)
