"""The C lane on pmem pools (lane.c's BT_BE_PMEM over csrc/be_pmem.c), held to the Python
path with the same harness as the memory and io_uring backends.

Every namespace but nsid 3 (null) is a pmem bdev: nsid 1 (512-byte blocks), nsid 2
(4 KiB), nsid 5 the second half of a split pmem bdev, nsid 6 a passthru over one. Both
sides start from copies of the same pool files (same UUIDs, same contents). The
reference side's pools run the Python engine of the BTT (`pmem.USE_C_ENGINE` off while it
is made), the lane side's the C engine, which its lane and its Python path share. After
each feed, besides every byte sent and the queue's state, the pools are compared as
recovery sees them (map flags and every block's data; `_contents` says why not the files
byte for byte), each checked for consistency. Free lists are small (4
blocks per lane) so that multi-block writes take several chunks.

What the lane must leave to the Python path is provoked for real: a block whose map
entry carries the error flag (the lane's read is refused in C and done again by the
Python path, which answers Unrecovered Read Error), and a pool that refuses writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lane_harness import (
    ALL_BDEVS,
    FUA,
    OPTS,
    SMALL_CHUNK,
    Layout,
    Pair,
    cmd,
    encoding,
    pattern,
    rd,
    wire,
    wr,
)
from test_fastpath import CASES, HYP, ICREQS, _r2t_answers, _r2ts, finish_r2t, streams

from blocktarget.bdev import LANE_PMEM
from blocktarget.bdevs import pmem
from blocktarget.nvme import fastlane, pdu, spec

pytestmark = [
    pytest.mark.skipif(not pmem.libpmem_available(),
                       reason="blocktarget._pmem not built (libpmem-dev missing)"),
    pytest.mark.skipif(not fastlane.AVAILABLE and os.environ.get("CI") != "true",
                       reason="blocktarget._fastpath is not built (no compiler)"),
]

# name -> (block size, blocks): the geometries of lane_harness.BDEVS, as pools
POOLS = {"M512": (512, 512), "M4K": (4096, 96), "MX": (4096, 32), "MS": (4096, 64),
         "N1": (512, 256)}
FREE_PER_LANE = 4
_templates: dict[str, Path] = {}


def _template_dir() -> Path:
    """Pool files made once (the Python engine writes a pattern into every block) and
    copied for each side, so both start from identical bytes."""
    if not _templates:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        d = Path(tempfile.mkdtemp(prefix="bt-lane-pmem-tpl-", dir=base))
        for i, name in enumerate(ALL_BDEVS):
            if name not in POOLS:
                continue
            bs, nb = POOLS[name]
            path = d / f"{name}.pool"
            pmem.create_pool_file(str(path), nb, bs, lanes=1, free_per_lane=FREE_PER_LANE)
            pool, fd = pmem.open_pool(str(path))
            try:
                pool.write(0, 0, nb, memoryview(pattern(nb * bs, i + 1)))
            finally:
                pool.close()
                os.close(fd)
            _templates[name] = path
    return next(iter(_templates.values())).parent


def _pmem_bdevs(workdir: Path) -> list[dict[str, Any]]:
    tpl = _template_dir()
    bdevs = []
    for name in POOLS:
        path = workdir / f"{name}.pool"
        shutil.copyfile(tpl / f"{name}.pool", path)
        bdevs.append({"method": "bdev_pmem_create",
                      "params": {"name": name, "pmem_file": str(path)}})
    return bdevs + [
        {"method": "bdev_null_create", "params": {"name": "N0", "num_blocks": 1024,
                                                  "block_size": 512}},
        {"method": "bdev_split_create", "params": {"base_bdev": "MS", "split_count": 2}},
        {"method": "bdev_passthru_create", "params": {"base_bdev_name": "N1", "name": "PN"}},
    ]


def _contents(bdev: Any) -> bytes | None:
    """What a pool holds, as recovery would find it: its info block, then every LBA's map
    flags and the data it reads (zeroes where the map says so), after checking that no
    physical block is owned twice or lost. Not the file byte for byte: the lane commits
    the writes of one batch as a group (csrc/be_pmem.c, bt_pmem_write_group), which puts
    them in other free blocks and flog pairs than the Python path's one-by-one writes.
    That the C engine's single writes leave the same bytes as Python's is
    test_pmem_engine.py's (byte for byte, flushes and drains in order)."""
    path = getattr(bdev, "path", None)
    if not path or bdev.module != "pmem":
        return None
    problems = bdev.pool.check()
    assert problems == [], f"{bdev.name}: {problems}"
    raw = Path(path).read_bytes()
    layout, _uuid = pmem.Layout.unpack_info(raw[:pmem.INFO_SIZE])
    es, bs, shift = layout.entry_size, layout.block_size, layout.entry_size * 8 - 2
    fmt = "<I" if es == 4 else "<Q"
    out = [raw[:pmem.INFO_SIZE]]
    for lba in range(layout.num_blocks):
        (entry,) = struct.unpack_from(fmt, raw, layout.mapoff + lba * es)
        flags = entry >> shift
        out.append(bytes([flags]))
        if flags == 3:
            block = entry & ((1 << shift) - 1)
            out.append(raw[layout.dataoff + block * bs:layout.dataoff + (block + 1) * bs])
    return b"".join(out)


PMEM_LAYOUT = Layout(bdevs=_pmem_bdevs, contents=_contents)


@contextlib.contextmanager
def _python_engine() -> Iterator[None]:
    saved = pmem.USE_C_ENGINE
    pmem.USE_C_ENGINE = False
    try:
        yield
    finally:
        pmem.USE_C_ENGINE = saved


@pytest.fixture(autouse=True)
def _built() -> None:
    if not fastlane.AVAILABLE:
        pytest.fail("CI=true but blocktarget._fastpath is not built: the C lane is untested")


@pytest.fixture(scope="module", autouse=True)
def _cleanup_templates() -> Iterator[None]:
    yield
    if _templates:
        shutil.rmtree(next(iter(_templates.values())).parent, ignore_errors=True)
        _templates.clear()


@pytest.fixture
def where() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="bt-lane-pmem-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _pair(where: Path, opts: dict[str, Any] | None = None, **kw: Any) -> Pair:
    work = where / f"pair{len(list(where.iterdir()))}"
    work.mkdir()
    p = Pair(opts or OPTS, layout=PMEM_LAYOUT, workdir=work, reference=_python_engine, **kw)
    assert p.ref.bdev("M4K").pool.core is None
    assert p.fast.bdev("M4K").pool.core is not None
    return p


def test_backend_numbers_agree() -> None:
    assert fastlane.lib.BT_BE_PMEM == LANE_PMEM


def test_the_lane_serves_pmem(where: Path) -> None:
    p = _pair(where)
    try:
        t = p.fast.io.channel_of(p.fast.sub.namespaces[2])[1].lane_target()
        assert t is not None and t.kind == LANE_PMEM
        p.feed(rd(1, 2, 3, 2) + wr(2, 2, 5, 2) + rd(3, 2, 5, 2) + wr(4, 1, 7, 9)
               + rd(5, 5, 1, 3) + wr(6, 6, 100, 16) + cmd(spec.IoOpcode.FLUSH, 7, 2, sgl_len=0))
        p.check()
        assert p.taken() == 7
        pool = p.fast.bdev("M512").pool
        assert pool.check() == []
    finally:
        p.close()


@pytest.mark.parametrize("icreq", ["plain", "all"])
@pytest.mark.parametrize("opts", [OPTS, SMALL_CHUNK], ids=["chunk=mdts", "chunk=8k"])
def test_cases_match_python(where: Path, opts: dict[str, Any], icreq: str) -> None:
    """test_fastpath's case table on pools: every case between a read and a write."""
    ic = ICREQS[icreq]
    with encoding(ic):
        p = _pair(where, opts, icreq=ic)
        try:
            for i, case in enumerate(CASES):
                cid = 100 + i * 3
                before = p.taken()
                p.feed(rd(cid, 1, i) + case.build(cid + 1) + wr(cid + 2, 1, 200 + i))
                p.check()
                if not p.ref.io.closed and (p.ref.io.requests or p.ref.io.r2t_pending):
                    finish_r2t(p)
                if not (case.raw and ic.dgst):
                    assert p.taken() - before == (3 if case.take else 1), case.name
                if p.ref.io.closed:
                    p.close()
                    p = _pair(where, opts, icreq=ic)
        finally:
            p.close()


def test_random_streams_match_python(where: Path) -> None:
    """Random mixes of good and bad commands, then the data of the writes waiting for
    it, in random pieces (synchronous like memory: outputs in order, overlaps allowed)."""
    totals = [0, 0]
    ic = ICREQS["all"]

    @settings(HYP, max_examples=40)
    @given(streams(), st.data())
    def run(s: tuple[bytes, list[int]], more: Any) -> None:
        data, cuts = s
        p = _pair(where, SMALL_CHUNK, icreq=ic)
        try:
            edges = [0, *cuts, len(data)]
            p.feed(*(data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a))
            p.check()
            if not p.ref.io.closed and p.ref.io.r2t_pending:
                answers = _r2t_answers(p, more.draw)
                cut = more.draw(st.integers(1, max(len(answers) - 1, 1)))
                p.feed(answers[:cut], answers[cut:])
                p.check()
            totals[0] += p.taken()
            totals[1] += 1
        finally:
            p.close()

    with encoding(ic):
        run()
    assert totals[0] > totals[1] // 2, f"{totals[0]} lane commands in {totals[1]} runs"


def test_r2t_writes_and_data_across_buffers(where: Path) -> None:
    ic = ICREQS["hdgst+ddgst"]
    with encoding(ic):
        p = _pair(where, icreq=ic)
        try:
            p.feed(wr(1, 2, 8, 4, data=b"") + wr(2, 1, 64, 40, data=b"", cdw12=FUA)
                   + wr(3, 5, 0, 2, cdw12=FUA))
            p.check()
            r1, r2 = _r2ts(p)
            p.feed(wire(pdu.H2CData(1, r1.ttag, 0, pattern(r1.r2tl, 7), True))
                   + wire(pdu.H2CData(2, r2.ttag, 0, pattern(r2.r2tl, 8)[:4096], False)))
            p.feed(wire(pdu.H2CData(2, r2.ttag, 4096, pattern(r2.r2tl, 8)[4096:], True)))
            p.check()
            for i, cut in enumerate((30, 100, 5000, 16000)):
                p.feed(wr(20 + i, 2, 40 + 4 * i, 4, data=b""))
                r = _r2ts(p)[-1]
                h = wire(pdu.H2CData(20 + i, r.ttag, 0, pattern(r.r2tl, i), True))
                p.feed(h[:cut], h[cut:])
                p.check()
            p.feed(rd(4, 2, 8, 4) + rd(5, 1, 64, 40)
                   + b"".join(rd(40 + i, 2, 40 + 4 * i, 4) for i in range(4)))
            p.check()
            assert p.taken() == 13
            assert p.fast.io._lane.c.rx_pdus == 4
        finally:
            p.close()


def _mark_bad(side: Any, name: str, lba: int) -> None:
    """Give a block's map entry the error flag (01), as media damage would."""
    pool = side.bdev(name).pool
    raw = pool._map[lba]
    pool.pm.store(pool._mapoff + lba * pool._es, (1 << pool._shift) | (raw & pool._mask),
                  pool._es)


def test_media_error_goes_back_to_python(where: Path) -> None:
    """A read of a block marked bad: the C engine refuses it, the lane gives the command
    to the Python path, which answers Unrecovered Read Error; reads beside it and the
    rest of the batch stay the lane's; a write over the block clears it."""
    p = _pair(where)
    try:
        for side in (p.ref, p.fast):
            _mark_bad(side, "M4K", 10)
        p.feed(rd(1, 2, 9) + rd(2, 2, 8, 4) + rd(3, 2, 11) + rd(4, 5, 0, 2))
        p.check()
        assert p.ref.admin.ctrl.error_count == 1 == p.fast.admin.ctrl.error_count
        assert p.taken() == 3
        lane = p.fast.io._lane
        assert lane.inflight == 0 and lane.c.redo == 0
        p.feed(wr(5, 2, 10) + rd(6, 2, 8, 4))
        p.check()
        assert p.taken() == 5
    finally:
        p.close()


def test_broken_pool_writes_go_to_python(where: Path) -> None:
    """A pool that refuses writes (a persist failed: here set as the bdev sets it): reads
    stay in the lane; a write in capsule goes to the Python path at once (Write Fault),
    one by R2T when its data is in (the C engine refuses it, the lane hands it over with
    its data)."""
    p = _pair(where)
    try:
        for side in (p.ref, p.fast):
            side.bdev("M4K").pool.set_broken("test: a persist failed")
        p.feed(rd(1, 2, 3) + rd(2, 1, 0))
        p.check()
        assert p.taken() == 2
        p.feed(wr(3, 2, 4, 4, data=b""))
        p.check()
        assert p.fast.io._lane.inflight == 1  # (the lane's R2T)
        finish_r2t(p)
        assert p.ref.admin.ctrl.error_count == 1 == p.fast.admin.ctrl.error_count
        p.feed(wr(4, 2, 3) + rd(5, 2, 3))
        p.check()
        assert p.ref.admin.ctrl.error_count == 2 == p.fast.admin.ctrl.error_count
        assert p.taken() == 2
        lane = p.fast.io._lane
        assert lane.inflight == 0 and lane.c.redo == 0
    finally:
        p.close()


def _slots(pool: Any) -> list[tuple[int, int, int]]:
    pool.core.sync_slots(pool.lanes)
    return [(s.next, s.seq, s.free) for ln in pool.lanes for s in ln.slots]


def test_writes_of_one_batch_commit_as_a_group(where: Path) -> None:
    """In-capsule writes to one pool that follow one another in a batch take one
    free-list slot each and share one commit (each slot's flog pair turned once, where
    one-by-one writes turn the first slot's pair each time); a write that overlaps the
    group, or one more than the lane's free list holds, starts the next group. Outputs and
    what every block reads are the Python path's."""
    p = _pair(where)
    try:
        pool, ref = p.fast.bdev("M4K").pool, p.ref.bdev("M4K").pool
        before = _slots(pool)
        ref_before = [(s.next, s.seq, s.free) for s in ref.lanes[0].slots]
        p.feed(b"".join(wr(10 + i, 2, 3 * i, 1) for i in range(FREE_PER_LANE)))
        p.check()
        assert p.taken() == FREE_PER_LANE
        after = _slots(pool)
        assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(before, after, strict=True))
        # one by one (the Python path): only the first slot's pair turned, four times
        ref_after = [(s.next, s.seq, s.free) for s in ref.lanes[0].slots]
        assert ref_after[0][1] != ref_before[0][1] and ref_after[1:] == ref_before[1:]
        # overlaps (LBA 5 twice, 6 inside a two-block write), six writes for four slots,
        # reads in between, a multi-block write beside them
        batch = (wr(20, 2, 5, 1, data=pattern(4096, 1)) + wr(21, 2, 6, 1)
                 + wr(22, 2, 5, 1, data=pattern(4096, 2)) + wr(23, 2, 6, 2) + wr(24, 2, 40, 1)
                 + wr(25, 2, 41, 1) + wr(26, 2, 42, 1) + rd(27, 2, 5, 3) + wr(28, 2, 50, 2)
                 + wr(29, 2, 60, 1) + wr(30, 1, 0, 8) + wr(31, 1, 8, 8))
        p.feed(batch)
        p.check()
        assert p.taken() == FREE_PER_LANE + 12
    finally:
        p.close()


@pytest.mark.parametrize("shape", ["read-after", "capsule-cut", "one-carried"])
def test_a_failed_group_goes_back_to_python_whole(where: Path, shape: str) -> None:
    """A group whose first drain fails (the lane side's pool here runs the C engine over a
    test's memory whose drain raises): the lane answers none of its writes and takes
    them back untaken, with what came after them (a read; a capsule cut by the end of
    the batch, which the lane had begun to carry), so the Python path decodes them in
    order and answers each Write Fault, as the reference does with its pool set broken
    (same bytes: the SQ heads of their turns). One carried capsule alone is handed over
    the same way."""
    from test_pmem_crash import CrashRecorder

    p = _pair(where)
    try:
        bdev = p.fast.bdev("M4K")
        drains: list[int] = []

        def fail(_r: Any) -> None:
            drains.append(1)
            raise OSError(5, "test: the media failed")

        rec = CrashRecorder(Path(bdev.path).read_bytes())
        bdev.pool.close()
        bdev.pool = pmem.Pool(rec, core=True)
        p.fast.io._lane._refresh()
        p.ref.bdev("M4K").pool.set_broken("test: a persist failed")
        rec.on_drain = fail
        group = wr(1, 2, 3) + wr(2, 2, 9) + wr(3, 2, 20, 2)
        if shape == "read-after":
            p.feed(group + rd(4, 1, 0, 2))
            writes = 3
        elif shape == "capsule-cut":
            last = wr(4, 2, 30)
            p.feed(group + last[:100], last[100:])
            writes = 4
        else:
            last = wr(4, 2, 30)
            p.feed(last[:100], last[100:])
            writes = 1
        assert drains == [1]  # one commit for the writes, failed at its first drain
        p.check()
        assert p.ref.admin.ctrl.error_count == writes == p.fast.admin.ctrl.error_count
        assert p.taken() == 0
        lane = p.fast.io._lane
        assert lane.inflight == 0 and lane.c.redo == 0
        assert bdev.pool.check() == []
    finally:
        p.close()
