"""NVM I/O commands of blocktarget's target and their exact error statuses: Read, Write
(FUA), Flush, Write Zeroes (DEAC), Dataset Management, Compare; LBA range, namespace,
MDTS, SGL type/length/offset and in-capsule size checks. Raw queues, so that what the
target answers - and that it answers at all, without R2T for a refused write - is seen.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from blocktarget.nvme import pdu, spec, structs

from .nvme_target_util import (
    G,
    RawController,
    RawQueue,
    Tgt,
    raw_controller,
    start_target,
)
from .target_proc import Launcher, malloc

pytestmark = pytest.mark.timeout(60)

NS_BLOCKS = 65536
S = spec.GenericStatus
LBA_RANGE = (G, S.LBA_OUT_OF_RANGE)
INVALID_NS = (G, S.INVALID_NS)
INVALID_FIELD = (G, S.INVALID_FIELD)
SGL_LENGTH = (G, S.DATA_SGL_LENGTH_INVALID)
SGL_TYPE = (G, S.SGL_DESCRIPTOR_TYPE_INVALID)
OK = (0, 0)
IO = spec.IoOpcode


@pytest.fixture(scope="module")
def tgt() -> Iterator[Tgt]:
    launcher = Launcher()
    try:
        yield start_target(launcher, bdevs=[malloc("Malloc0", NS_BLOCKS, 512),
                                            malloc("Malloc1", 1024, 4096)],
                           ns=[{"bdev_name": "Malloc0", "nsid": 1},
                               {"bdev_name": "Malloc1", "nsid": 2}])
    finally:
        launcher.cleanup()


@pytest_asyncio.fixture
async def ctrl(tgt: Tgt) -> AsyncIterator[RawController]:
    async with raw_controller(tgt) as c:
        yield c


@pytest.fixture
def q(ctrl: RawController) -> RawQueue:
    return ctrl.io[0]


def lba(slba: int, nlb: int, extra12: int = 0) -> dict[str, int]:
    return {"cdw10": slba & 0xFFFFFFFF, "cdw11": slba >> 32, "cdw12": (nlb - 1) | extra12}


# ----------------------------------------------------------------- data commands


async def test_write_read_fua_across_paths(q: RawQueue) -> None:
    """In-capsule and R2T writes, FUA, and reads that come back byte for byte."""
    small = os.urandom(4096)
    assert (await q.write(1, 10, small, in_capsule=True)).ok
    assert (await q.read(1, 10, 8)).data == small
    big = os.urandom(131072)
    r = await q.write(1, 1000, big)
    assert r.ok and type(r.pdus[0]) is pdu.R2T and r.pdus[0].r2tl == 131072
    assert (await q.read(1, 1000, 256)).data == big
    fua = os.urandom(8192)
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=8192, **lba(2000, 16, spec.RwFlags.FUA)),
                    data_out=fua)
    assert r.ok
    assert (await q.read(1, 2000, 16)).data == fua
    # 4 KiB-block namespace
    d = os.urandom(8192)
    assert (await q.write(2, 5, d, block=4096)).ok
    assert (await q.read(2, 5, 2, block=4096)).data == d


async def test_flush(q: RawQueue) -> None:
    assert (await q.run(q.sqe(IO.FLUSH, 1))).ok
    # VWC reports flush broadcast unsupported: FFFFFFFFh is an invalid namespace.
    assert (await q.run(q.sqe(IO.FLUSH, spec.NSID_ALL))).status == INVALID_NS
    assert (await q.run(q.sqe(IO.FLUSH, 5))).status == INVALID_NS


async def test_write_zeroes_and_deallocate(q: RawQueue) -> None:
    data = os.urandom(16 * 512)
    assert (await q.write(1, 3000, data)).ok
    assert (await q.run(q.sqe(IO.WRITE_ZEROES, 1, **lba(3000, 4)))).ok
    got = (await q.read(1, 3000, 16)).data
    assert got[:2048] == bytes(2048) and got[2048:] == data[2048:]
    # DEAC: deallocate; DLFEAT says deallocated blocks read as zeroes.
    assert (await q.run(q.sqe(IO.WRITE_ZEROES, 1, **lba(3008, 4, 1 << 25)))).ok
    got = (await q.read(1, 3000, 16)).data
    assert got[4096:6144] == bytes(2048) and got[6144:] == data[6144:]
    assert (await q.run(q.sqe(IO.WRITE_ZEROES, 1, **lba(NS_BLOCKS - 2, 4)))).status == \
        LBA_RANGE
    assert (await q.run(q.sqe(IO.WRITE_ZEROES, 9, **lba(0, 1)))).status == INVALID_NS


async def test_dataset_management(q: RawQueue) -> None:
    data = os.urandom(32 * 512)
    assert (await q.write(1, 4000, data)).ok
    ranges = structs.build_dsm_ranges([structs.DsmRange(0, 4, 4000),
                                       structs.DsmRange(0, 8, 4016)])
    dsm = q.sqe(IO.DATASET_MANAGEMENT, 1, sgl_len=len(ranges),
                sgl_id=spec.SGL_ID_INCAPSULE, cdw10=1, cdw11=spec.DsmAttr.AD)
    assert (await q.run(dsm, ranges)).ok
    got = (await q.read(1, 4000, 32)).data
    assert got[:2048] == bytes(2048) and got[2048:8192] == data[2048:8192]
    assert got[8192:12288] == bytes(4096) and got[12288:] == data[12288:]
    # Without AD the ranges are only hints: nothing changes.
    assert (await q.write(1, 4000, data)).ok
    hint = q.sqe(IO.DATASET_MANAGEMENT, 1, sgl_len=len(ranges),
                 sgl_id=spec.SGL_ID_INCAPSULE, cdw10=1, cdw11=0)
    assert (await q.run(hint, ranges)).ok
    assert (await q.read(1, 4000, 32)).data == data
    # A range past the end; fewer range bytes than NR announces.
    bad = structs.build_dsm_ranges([structs.DsmRange(0, 8, NS_BLOCKS - 4)])
    r = await q.run(q.sqe(IO.DATASET_MANAGEMENT, 1, sgl_len=len(bad),
                          sgl_id=spec.SGL_ID_INCAPSULE, cdw10=0, cdw11=spec.DsmAttr.AD), bad)
    assert r.status == LBA_RANGE
    r = await q.run(q.sqe(IO.DATASET_MANAGEMENT, 1, sgl_len=len(bad),
                          sgl_id=spec.SGL_ID_INCAPSULE, cdw10=3, cdw11=spec.DsmAttr.AD), bad)
    assert r.status == SGL_LENGTH


async def test_compare(q: RawQueue) -> None:
    data = os.urandom(4096)
    assert (await q.write(1, 5000, data)).ok
    r = await q.run(q.sqe(IO.COMPARE, 1, sgl_len=4096, sgl_id=spec.SGL_ID_INCAPSULE,
                          **lba(5000, 8)), data)
    assert r.ok
    other = bytearray(data)
    other[4095] ^= 1
    r = await q.run(q.sqe(IO.COMPARE, 1, sgl_len=4096, sgl_id=spec.SGL_ID_INCAPSULE,
                          **lba(5000, 8)), bytes(other))
    assert r.status == (spec.Sct.MEDIA_ERROR, spec.MediaStatus.COMPARE_FAILURE)
    assert r.cqe is not None and r.cqe.status & spec.STATUS_DNR
    # Larger than in-capsule data: the compare data comes by R2T.
    big = os.urandom(65536)
    assert (await q.write(1, 6000, big)).ok
    r = await q.run(q.sqe(IO.COMPARE, 1, sgl_len=65536, **lba(6000, 128)), data_out=big)
    assert r.ok and type(r.pdus[0]) is pdu.R2T
    assert (await q.run(q.sqe(IO.COMPARE, 1, sgl_len=512, sgl_id=spec.SGL_ID_INCAPSULE,
                              **lba(NS_BLOCKS, 1)), bytes(512))).status == LBA_RANGE


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize(("slba", "nlb"), [(NS_BLOCKS, 1), (NS_BLOCKS - 1, 2), (1 << 40, 1)])
async def test_lba_out_of_range(q: RawQueue, slba: int, nlb: int) -> None:
    assert (await q.read(1, slba, nlb)).status == LBA_RANGE
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=512 * nlb, sgl_id=spec.SGL_ID_INCAPSULE,
                          **lba(slba, nlb)), bytes(512 * nlb))
    assert r.status == LBA_RANGE
    assert r.cqe is not None and r.cqe.status & spec.STATUS_DNR


async def test_invalid_namespace(q: RawQueue) -> None:
    for nsid in (0, 3, 32, 1000, spec.NSID_ALL):
        assert (await q.read(nsid, 0, 1)).status == INVALID_NS, nsid
    r = await q.run(q.sqe(IO.WRITE, 3, sgl_len=512, **lba(0, 1)), data_out=bytes(512))
    assert r.status == INVALID_NS


async def test_transfer_beyond_mdts(q: RawQueue) -> None:
    """256 KiB > MDTS (128 KiB): Invalid Field, and for a write no R2T is ever sent
    (no buffer is allocated for a transfer the target will refuse)."""
    r = await q.read(1, 0, 512)
    assert r.status == INVALID_FIELD and r.data == b""
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=512 * 512, **lba(0, 512)),
                    data_out=bytes(512 * 512))
    assert r.status == INVALID_FIELD
    assert [type(p) for p in r.pdus] == [pdu.CapsuleResp]
    assert (await q.read(1, 0, 256)).ok  # exactly MDTS is fine


async def test_sgl_descriptor_type_unsupported(q: RawQueue) -> None:
    keyed = spec.sgl_id(spec.SglType.KEYED_DATA_BLOCK, 0)  # RDMA-style: not on TCP
    assert (await q.run(q.sqe(IO.READ, 1, sgl_len=512, sgl_id=keyed, **lba(0, 1)))).status \
        == SGL_TYPE
    # In-capsule data described by a transport SGL.
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=512, sgl_id=spec.SGL_ID_TRANSPORT,
                          **lba(0, 1)), bytes(512))
    assert r.status == SGL_TYPE


async def test_sgl_length_mismatch(q: RawQueue) -> None:
    # SGL says 1 KiB, the command reads one 512-byte block.
    assert (await q.run(q.sqe(IO.READ, 1, sgl_len=1024, **lba(0, 1)))).status == SGL_LENGTH
    # In-capsule SGL length differs from the data in the capsule.
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=1024, sgl_id=spec.SGL_ID_INCAPSULE,
                          **lba(0, 2)), bytes(512))
    assert r.status == SGL_LENGTH
    # An in-capsule SGL with no data in the capsule.
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=512, sgl_id=spec.SGL_ID_INCAPSULE,
                          **lba(0, 1)))
    assert r.status == SGL_LENGTH


async def test_in_capsule_data_over_ioccsz(q: RawQueue) -> None:
    """16 KiB in the capsule when IOCCSZ allows 8 KiB: the command fails with Data SGL
    Length Invalid; the connection stays usable."""
    data = os.urandom(16384)
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=16384, sgl_id=spec.SGL_ID_INCAPSULE,
                          **lba(7000, 32)), data)
    assert r.status == SGL_LENGTH
    assert (await q.write(1, 7000, data)).ok  # the same through R2T works
    assert (await q.read(1, 7000, 32)).data == data
    ok = os.urandom(8192)  # exactly the limit is still in-capsule
    assert (await q.write(1, 7100, ok, in_capsule=True)).ok


async def test_other_capsule_errors(q: RawQueue) -> None:
    # In-capsule data at a non-zero offset (ICDOFF is 0).
    r = await q.run(q.sqe(IO.WRITE, 1, sgl_len=512, sgl_id=spec.SGL_ID_INCAPSULE,
                          sgl_addr=16, **lba(0, 1)), bytes(512))
    assert r.status == (G, S.INVALID_SGL_OFFSET)
    # PRPs (PSDT 0) do not exist on fabrics.
    assert (await q.run(q.sqe(IO.READ, 1, sgl_len=512, flags=0, **lba(0, 1)))).status == \
        INVALID_FIELD
    # Data in the capsule of a command that reads.
    r = await q.run(q.sqe(IO.READ, 1, sgl_len=512, sgl_id=spec.SGL_ID_INCAPSULE,
                          **lba(0, 1)), bytes(512))
    assert r.status == INVALID_FIELD
    # A command id still in use: the new command fails, the old one is unaffected.
    sqe = q.sqe(IO.WRITE, 1, sgl_len=4096, **lba(8000, 8))
    cid = int.from_bytes(sqe[2:4], "little")
    r = await q.run(sqe, answer_r2t=False)
    r2t = r.pdus[-1]
    dup = await q.run(q.sqe(IO.READ, 1, cid=cid, sgl_len=512, **lba(0, 1)))
    assert dup.status == (G, S.CID_CONFLICT)
    data = os.urandom(4096)
    await q.send(pdu.H2CData(cccid=cid, ttag=r2t.ttag, datao=0, data=data))
    assert (await q.collect(cid)).ok
    assert (await q.read(1, 8000, 8)).data == data


async def test_many_outstanding_commands(q: RawQueue) -> None:
    """A full queue of mixed commands in one burst, answered in any order, all right."""
    datas = {}
    burst = b""
    for i in range(32):
        d = os.urandom(1024)
        sqe = q.sqe(IO.WRITE, 1, sgl_len=1024, sgl_id=spec.SGL_ID_INCAPSULE,
                    **lba(9000 + 2 * i, 2))
        datas[int.from_bytes(sqe[2:4], "little")] = (9000 + 2 * i, d)
        burst += q.encode(pdu.CapsuleCmd(sqe, d))
    await q.send_bytes(burst)
    seen = set()
    while len(seen) < 32:
        p = await q.recv()
        assert type(p) is pdu.CapsuleResp
        cqe = structs.parse_cqe(p.cqe)
        assert cqe.status == 0
        seen.add(cqe.cid)
    assert seen == set(datas)
    for slba, d in datas.values():
        assert (await q.read(1, slba, 2)).data == d
