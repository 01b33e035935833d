"""Fabrics commands of blocktarget's target: Connect (every refusal with its exact status
and, for Connect Invalid Parameters, IATTR/IPO naming the offending byte), commands
before Connect and before CC.EN, Property Get/Set (CAP, VS, CC, CSTS incl. shutdown),
Disconnect. Raw queues, so the exact CQE is seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blocktarget.nvme import pdu, spec
from blocktarget.nvme.structs import CONNECT_DATA_OFFSETS

from .nvme_target_util import (
    CS,
    G,
    RawQueue,
    Tgt,
    open_queue,
    raw_controller,
    sct_sc,
    start_target,
)
from .target_proc import Launcher, listen_address

pytestmark = pytest.mark.timeout(60)

RESTRICTED = "nqn.2016-06.io.blocktarget.test:restricted"
ALLOWED = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
MAX_QD = 64
MAX_IO_QUEUES = 4
IATTR = spec.CONNECT_IATTR_DATA
INVALID_PARAM = (CS, spec.FabricsStatus.CONNECT_INVALID_PARAM)
SEQUENCE = (G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR)
INVALID_FIELD = (G, spec.GenericStatus.INVALID_FIELD)
INVALID_OPCODE = (G, spec.GenericStatus.INVALID_OPCODE)


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        t = start_target(launcher, transport={"max_queue_depth": MAX_QD,
                                              "max_io_qpairs_per_ctrlr": MAX_IO_QUEUES})
        t.rpc("bdev_malloc_create", name="Restricted0", num_blocks=2048, block_size=512)
        t.rpc("nvmf_create_subsystem", nqn=RESTRICTED, allow_any_host=False)
        t.rpc("nvmf_subsystem_add_ns", nqn=RESTRICTED, namespace={"bdev_name": "Restricted0"})
        t.rpc("nvmf_subsystem_add_host", nqn=RESTRICTED, host=ALLOWED)
        t.rpc("nvmf_subsystem_add_listener", nqn=RESTRICTED,
              listen_address=listen_address(t.port))
        yield t
    finally:
        launcher.cleanup()


async def admin_queue(t: Tgt, *, enable: bool = True, **kw: object) -> RawQueue:
    q = await open_queue(t.addr, t.port)
    cqe = await q.connect(0, **kw)  # type: ignore[arg-type]
    assert cqe.status == 0, sct_sc(cqe)
    if enable:
        await q.enable()
    return q


async def refused(t: Tgt, qid: int = 0, **kw: object) -> tuple[tuple[int, int], int]:
    """Connect on a fresh connection; returns ((sct, sc), dw0) of the refusal."""
    q = await open_queue(t.addr, t.port)
    try:
        cqe = await q.connect(qid, **kw)  # type: ignore[arg-type]
        assert cqe.status != 0, "Connect unexpectedly succeeded"
        assert cqe.status & spec.STATUS_DNR, "a Connect refusal is not worth retrying"
        return sct_sc(cqe), cqe.dw0
    finally:
        await q.close()


# ------------------------------------------------------------------------- Connect


async def test_connect_unknown_subsystem(tgt: Tgt) -> None:
    st, dw0 = await refused(tgt, subnqn="nqn.2016-06.io.blocktarget.test:nobody")
    assert st == INVALID_PARAM
    assert dw0 == IATTR | CONNECT_DATA_OFFSETS["subnqn"] == IATTR | 256


async def test_connect_host_not_on_allow_list(tgt: Tgt) -> None:
    st, _ = await refused(tgt, subnqn=RESTRICTED)
    assert st == (CS, spec.FabricsStatus.CONNECT_INVALID_HOST)
    q = await open_queue(tgt.addr, tgt.port)
    try:
        assert (await q.connect(0, RESTRICTED, hostnqn=ALLOWED)).status == 0
    finally:
        await q.close()


async def test_connect_bad_recfmt(tgt: Tgt) -> None:
    st, _ = await refused(tgt, recfmt=1)
    assert st == (CS, spec.FabricsStatus.CONNECT_INCOMPATIBLE_FORMAT)


@pytest.mark.parametrize("sqsize", [0, spec.MIN_ADMIN_MAX_SQ_SIZE - 2, 128, 0xFFFF])
async def test_connect_admin_sqsize_out_of_range(tgt: Tgt, sqsize: int) -> None:
    """Admin SQ: at least 32 entries (spec minimum), at most max_aq_depth (128)."""
    st, dw0 = await refused(tgt, sqsize=sqsize)
    assert (st, dw0) == (INVALID_PARAM, 44)  # SQSIZE at SQE byte 44, IATTR clear


async def test_connect_admin_sqsize_limits_accepted(tgt: Tgt) -> None:
    for sqsize in (spec.MIN_ADMIN_MAX_SQ_SIZE - 1, 127):
        q = await open_queue(tgt.addr, tgt.port)
        try:
            assert (await q.connect(0, sqsize=sqsize)).status == 0
        finally:
            await q.close()


async def test_connect_admin_static_cntlid(tgt: Tgt) -> None:
    """Only the dynamic controller model is offered: an admin Connect must ask for
    controller id FFFFh."""
    st, dw0 = await refused(tgt, cntlid=1)
    assert (st, dw0) == (INVALID_PARAM, IATTR | CONNECT_DATA_OFFSETS["cntlid"])


async def test_connect_admin_zero_hostid(tgt: Tgt) -> None:
    st, dw0 = await refused(tgt, hostid=bytes(16))
    assert (st, dw0) == (INVALID_PARAM, IATTR | CONNECT_DATA_OFFSETS["hostid"])


async def test_connect_io_queue_checks(tgt: Tgt) -> None:
    admin = await admin_queue(tgt, enable=False)
    cntlid = admin.cntlid
    try:
        # Before CC.EN=1 the controller takes no I/O queues.
        st, _ = await refused(tgt, 1, cntlid=cntlid)
        assert st == SEQUENCE
        await admin.enable()
        # Unknown controller id: IPO points into the data at CNTLID.
        st, dw0 = await refused(tgt, 1, cntlid=cntlid + 100)
        assert (st, dw0) == (INVALID_PARAM, IATTR | 16)
        # Host identity must match the admin queue's.
        st, dw0 = await refused(tgt, 1, cntlid=cntlid,
                                hostnqn="nqn.2014-08.org.nvmexpress:uuid:"
                                        "99999999-9999-9999-9999-999999999999")
        assert (st, dw0) == (INVALID_PARAM, IATTR | 512)
        st, dw0 = await refused(tgt, 1, cntlid=cntlid, hostid=bytes(range(16)))
        assert (st, dw0) == (INVALID_PARAM, IATTR | 0)
        # SQSIZE: 0 is never valid; at most max_queue_depth entries.
        for sqsize in (0, MAX_QD):
            st, dw0 = await refused(tgt, 1, cntlid=cntlid, sqsize=sqsize)
            assert (st, dw0) == (INVALID_PARAM, 44)
        # QID beyond max_io_qpairs_per_ctrlr.
        st, dw0 = await refused(tgt, MAX_IO_QUEUES + 1, cntlid=cntlid)
        assert (st, dw0) == (INVALID_PARAM, 42)
        # Grant only 2 queues with Set Features Number of Queues: qid 3 is refused.
        r = await admin.admin(spec.AdminOpcode.SET_FEATURES,
                              cdw10=spec.FeatureId.NUM_QUEUES, cdw11=(1 << 16) | 1)
        assert r.ok and r.cqe is not None and r.cqe.dw0 == (1 << 16) | 1
        st, dw0 = await refused(tgt, 3, cntlid=cntlid)
        assert (st, dw0) == (INVALID_PARAM, 42)
        # A queue id may be connected once.
        io1 = await open_queue(tgt.addr, tgt.port)
        try:
            assert (await io1.connect(1, cntlid=cntlid, sqsize=MAX_QD - 1)).status == 0
            st, dw0 = await refused(tgt, 1, cntlid=cntlid)
            assert (st, dw0) == (INVALID_PARAM, 42)
            # The queue count is fixed once I/O queues exist.
            r = await admin.admin(spec.AdminOpcode.SET_FEATURES,
                                  cdw10=spec.FeatureId.NUM_QUEUES, cdw11=0)
            assert r.status == SEQUENCE
        finally:
            await io1.close()
    finally:
        await admin.close()


async def test_connect_io_queue_to_discovery(tgt: Tgt) -> None:
    admin = await admin_queue(tgt, subnqn=spec.DISCOVERY_NQN)
    try:
        st, dw0 = await refused(tgt, 1, subnqn=spec.DISCOVERY_NQN, cntlid=admin.cntlid)
        assert (st, dw0) == (INVALID_PARAM, 42)
    finally:
        await admin.close()


async def test_dynamic_controller_ids_are_distinct(tgt: Tgt) -> None:
    qs = [await admin_queue(tgt, enable=False) for _ in range(3)]
    try:
        ids = [q.cntlid for q in qs]
        assert len(set(ids)) == 3 and all(0 < i < 0xFFF0 for i in ids)
    finally:
        for q in qs:
            await q.close()


# --------------------------------------------------------- commands out of sequence


async def test_commands_before_connect(tgt: Tgt) -> None:
    q = await open_queue(tgt.addr, tgt.port)
    try:
        r = await q.admin(spec.AdminOpcode.IDENTIFY, in_len=4096, cdw10=spec.Cns.CTRL)
        assert r.status == SEQUENCE
        assert sct_sc(await q.property_get(spec.Property.CSTS)) == SEQUENCE
        r = await q.read(1, 0, 1)
        assert r.status == SEQUENCE
        # ... and the queue still takes its Connect afterwards.
        assert (await q.connect(0)).status == 0
        # A second Connect on a connected queue is out of sequence too.
        cqe = await q.connect(0)
        assert sct_sc(cqe) == SEQUENCE
    finally:
        await q.close()


async def test_admin_commands_before_enable(tgt: Tgt) -> None:
    q = await admin_queue(tgt, enable=False)
    try:
        r = await q.admin(spec.AdminOpcode.IDENTIFY, in_len=4096, cdw10=spec.Cns.CTRL)
        assert r.status == SEQUENCE
        assert (await q.property_get(spec.Property.VS)).status == 0  # properties work
    finally:
        await q.close()


# ----------------------------------------------------------------------- properties


async def test_properties(tgt: Tgt) -> None:
    q = await admin_queue(tgt, enable=False)
    try:
        cap = await q.property_get(spec.Property.CAP, 8)
        assert cap.status == 0
        v = cap.result64
        assert (v & spec.CAP_MQES_MASK) + 1 == MAX_QD  # CAP.MQES from max_queue_depth
        assert (v >> spec.CAP_TO_SHIFT) & 0xFF > 0
        assert (v >> spec.CAP_CSS_SHIFT) & 1  # NVM command set
        assert (v >> spec.CAP_MPSMIN_SHIFT) & 0xF == 0  # 4 KiB pages
        # CAP is 8 bytes: a 4-byte read is refused.
        assert sct_sc(await q.property_get(spec.Property.CAP, 4)) == INVALID_FIELD
        vs = (await q.property_get(spec.Property.VS)).dw0
        assert vs >= spec.make_version(1, 3)
        assert (await q.property_get(spec.Property.CSTS)).dw0 == 0
        # Enable: CC reads back, CSTS.RDY follows.
        cc = (spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT)
              | (spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT))
        assert (await q.property_set(spec.Property.CC, cc)).status == 0
        assert (await q.property_get(spec.Property.CC)).dw0 == cc
        assert (await q.property_get(spec.Property.CSTS)).dw0 & spec.CSTS_RDY
        # Invalid offsets and read-only properties.
        assert sct_sc(await q.property_get(0x30)) == INVALID_FIELD
        assert sct_sc(await q.property_set(spec.Property.CAP, 0, 8)) == INVALID_FIELD
        assert sct_sc(await q.property_set(spec.Property.CSTS, 1)) == INVALID_FIELD
        # Normal shutdown: CSTS.SHST reports "complete" and the status reads back.
        shn = cc | (spec.Shn.NORMAL << spec.CC_SHN_SHIFT)
        assert (await q.property_set(spec.Property.CC, shn)).status == 0
        csts = (await q.property_get(spec.Property.CSTS)).dw0
        assert (csts & spec.CSTS_SHST_MASK) >> spec.CSTS_SHST_SHIFT == spec.Shst.COMPLETE
        # Clearing SHN clears SHST.
        assert (await q.property_set(spec.Property.CC, cc)).status == 0
        csts = (await q.property_get(spec.Property.CSTS)).dw0
        assert csts & spec.CSTS_SHST_MASK == 0 and csts & spec.CSTS_RDY
    finally:
        await q.close()


async def test_disable_closes_io_queues(tgt: Tgt) -> None:
    """CC.EN 1 -> 0 is a controller reset: CSTS.RDY clears, its I/O queues go away."""
    async with raw_controller(tgt) as c:
        cc = (await c.admin.property_get(spec.Property.CC)).dw0
        assert (await c.admin.property_set(spec.Property.CC, cc & ~spec.CC_EN)).status == 0
        assert not (await c.admin.property_get(spec.Property.CSTS)).dw0 & spec.CSTS_RDY
        assert await c.io[0].closed_by_target()


async def test_property_commands_on_io_queue(tgt: Tgt) -> None:
    async with raw_controller(tgt) as c:
        assert sct_sc(await c.io[0].property_get(spec.Property.VS)) == INVALID_OPCODE
        assert sct_sc(await c.io[0].property_set(spec.Property.CC, 0)) == INVALID_OPCODE


async def test_unknown_fabrics_command_type(tgt: Tgt) -> None:
    async with raw_controller(tgt) as c:
        r = await c.admin.run(c.admin.fabrics_sqe(0x7E))
        assert r.status == INVALID_OPCODE


# ----------------------------------------------------------------------- Disconnect


async def test_disconnect_io_queue(tgt: Tgt) -> None:
    async with raw_controller(tgt, nr_io=2) as c:
        q1, q2 = c.io
        r = await q1.run(q1.fabrics_sqe(spec.FabricsType.DISCONNECT, cdw10=0))
        assert r.ok
        assert await q1.closed_by_target()
        # The other queue and the admin queue are untouched; qid 1 may connect again.
        assert (await q2.read(1, 0, 1)).ok
        again = await open_queue(tgt.addr, tgt.port)
        try:
            assert (await again.connect(1, cntlid=c.cntlid)).status == 0
            assert (await again.read(1, 0, 8)).ok
        finally:
            await again.close()


async def test_disconnect_on_admin_queue(tgt: Tgt) -> None:
    async with raw_controller(tgt) as c:
        r = await c.admin.run(c.admin.fabrics_sqe(spec.FabricsType.DISCONNECT))
        assert r.status == (CS, spec.FabricsStatus.INVALID_QUEUE_TYPE)
        assert (await c.admin.property_get(spec.Property.VS)).status == 0


async def test_closing_admin_queue_ends_controller(tgt: Tgt) -> None:
    async with raw_controller(tgt) as c:
        cntlid = c.cntlid
        await c.admin.close()
        assert await c.io[0].closed_by_target()
        st, dw0 = await refused(tgt, 2, cntlid=cntlid)
        assert (st, dw0) == (INVALID_PARAM, IATTR | 16)


async def test_connect_sq_flow_control_and_sqhd(tgt: Tgt) -> None:
    """Without CATTR's SQ flow control disable, every CQE carries the SQ head, which
    advances by one per command (mod SQSIZE+1) - Connect itself was entry 0."""
    async with raw_controller(tgt, io_sqsize=3) as c:
        q = c.io[0]
        heads = []
        for _ in range(6):
            r = await q.read(1, 0, 1)
            assert r.cqe is not None and r.ok
            heads.append(r.cqe.sqhd)
        assert heads == [2, 3, 0, 1, 2, 3]
        # ... and no C2HData carries SUCCESS: the host needs the CQE's SQHD.
        assert [type(p) for p in r.pdus] == [pdu.C2HData, pdu.CapsuleResp]
        assert not r.pdus[0].success
