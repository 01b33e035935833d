"""The C lane on io_uring (csrc/be_uring.c), held to the Python path like the memory
backends in test_fastpath.py: the same harness, with files behind the namespaces.

Each side has its own copies of the files (on the repo's disk, where O_DIRECT works, and
on /dev/shm); every namespace but nsid 3 (null) is a uring bdev: nsid 1 (512-byte
blocks), nsid 2 (4 KiB), nsid 5 the second half of a split uring bdev, nsid 6 a passthru
over one. I/O completes asynchronously on both sides and in any order, so each feed is
run until everything it started has completed and been answered, and outputs are
compared per command; files, statistics, SMART counters and budgets as before.

What the lane must give back to the Python path is provoked for real: a file truncated
under the bdev (short reads and writes past the new end: the Python path does the
command again and answers with its error status) and a connection closed with I/O in
flight (the lane lets the kernel finish with its buffers, then frees them).

Budget: about 30 s.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lane_harness import (
    ALL_BDEVS,
    BDEVS,
    FLUSH,
    FUA,
    MDTS,
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

from blocktarget.bdevs import uring
from blocktarget.nvme import fastlane, pdu

LANE_URING = fastlane.AVAILABLE and bool(fastlane.lib.bt_uring_available())
WHY = uring.uring_unavailable_reason()
pytestmark = [
    pytest.mark.skipif(WHY is not None, reason=f"no io_uring here: {WHY}"),
    pytest.mark.skipif(not LANE_URING and os.environ.get("CI") != "true",
                       reason="the C lane was built without liburing"),
]

# name -> (block size, blocks): the geometries of lane_harness.BDEVS, in files
FILES = {"M512": (512, 512), "M4K": (4096, 96), "MX": (4096, 32), "MS": (4096, 64),
         "N1": (512, 256)}


def _file_bdevs(workdir: Path) -> list[dict[str, Any]]:
    bdevs = []
    for i, name in enumerate(ALL_BDEVS):
        if name not in FILES:
            continue
        bs, nb = FILES[name]
        path = workdir / f"{name}.img"
        path.write_bytes(pattern(bs * nb, i + 1))
        bdevs.append({"method": "bdev_uring_create",
                      "params": {"name": name, "filename": str(path), "block_size": bs}})
    return bdevs + [
        {"method": "bdev_null_create", "params": {"name": "N0", "num_blocks": 1024,
                                                  "block_size": 512}},
        {"method": "bdev_split_create", "params": {"base_bdev": "MS", "split_count": 2}},
        {"method": "bdev_passthru_create", "params": {"base_bdev_name": "N1", "name": "PN"}},
    ]


def _contents(bdev: Any) -> bytes | None:
    name = getattr(bdev, "filename", None)
    return Path(name).read_bytes() if name else None


FILE_LAYOUT = Layout(bdevs=_file_bdevs, contents=_contents, ordered=False)


@pytest.fixture(autouse=True)
def _built() -> None:
    if not LANE_URING:
        pytest.fail("CI=true but the C lane has no io_uring backend (liburing missing?)")


@pytest.fixture(params=["disk", "shm"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "disk":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = Path(f"/dev/shm/bt-lane-uring-{os.getpid()}-{id(request)}")
    d.mkdir()
    try:
        yield d
    finally:
        for f in d.rglob("*"):
            if f.is_file():
                f.unlink()
        for sub in sorted(d.rglob("*"), reverse=True):
            sub.rmdir()
        d.rmdir()


def _pair(where: Path, opts: dict[str, Any] | None = None, **kw: Any) -> Pair:
    work = where / f"pair{len(list(where.iterdir()))}"
    work.mkdir()
    p = Pair(opts or OPTS, layout=FILE_LAYOUT, workdir=work, **kw)
    for side in (p.ref, p.fast):
        assert side.bdev("M4K").engine == "uring"
    return p


@pytest.mark.parametrize("icreq", ["plain", "all"])
@pytest.mark.parametrize("opts", [OPTS, SMALL_CHUNK], ids=["chunk=mdts", "chunk=8k"])
def test_cases_match_python(where: Path, opts: dict[str, Any], icreq: str) -> None:
    """test_fastpath's case table on files: every case between a read and a write, the
    lane taking what it takes (reads, writes in capsule and by R2T, FUA, Flush, on
    uring, split and passthru over it, and null beside them)."""
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
            assert p.fast.io._lane.c.submitted > 0  # (the ring was used, not a copy)
        finally:
            p.close()


def _apart(stream: bytes) -> bytes:
    """The PDUs of ``stream`` minus any command whose blocks another one kept before it
    writes or reads while either writes: asynchronous I/O in flight together completes in
    any order (on both sides differently), so overlapping reads and writes would have no
    one right answer to compare. What does not parse as a capsule is kept as it is."""
    out, pos, used = [], 0, []
    while len(stream) - pos >= 8:
        plen = struct.unpack_from("<I", stream, pos + 4)[0]
        if plen < 8 or plen > len(stream) - pos:
            break
        pdu_bytes = stream[pos:pos + plen]
        pos += plen
        if pdu_bytes[0] == 0x04 and plen >= 72:
            opc = pdu_bytes[8]
            nsid, slba = struct.unpack_from("<I", pdu_bytes, 12)[0], \
                struct.unpack_from("<Q", pdu_bytes, 48)[0]
            nlb = (struct.unpack_from("<I", pdu_bytes, 56)[0] & 0xFFFF) + 1
            write = opc in (0x01, 0x08, 0x09)  # write, write zeroes, dsm: touch blocks
            key = (nsid, slba, slba + nlb, write)
            if any(k[0] == nsid and k[1] < key[2] and key[1] < k[2] and (k[3] or write)
                   for k in used):
                continue
            used.append(key)
        out.append(pdu_bytes)
    return b"".join(out) + stream[pos:]


def test_random_streams_match_python(tmp_path: Path) -> None:
    """Random mixes of good and bad commands (none overlapping another in flight with
    it, see _apart), then the data of the writes waiting for it, in random pieces."""
    totals = [0, 0]
    ic = ICREQS["all"]

    @settings(HYP, max_examples=60)
    @given(streams(), st.data())
    def run(s: tuple[bytes, list[int]], more: Any) -> None:
        data = _apart(s[0])
        p = _pair(tmp_path, SMALL_CHUNK, icreq=ic)
        try:
            cut = more.draw(st.integers(0, len(data)))
            p.feed(*(x for x in (data[:cut], data[cut:]) if x))
            p.check()
            if not p.ref.io.closed and p.ref.io.r2t_pending:
                answers = _apart(_r2t_answers(p, more.draw, extra=False))
                cut = more.draw(st.integers(1, max(len(answers) - 1, 1)))
                p.feed(answers[:cut], answers[cut:])
                p.check()
            totals[0] += p.taken()
            totals[1] += 1
        finally:
            p.close()

    with encoding(ic):
        run()
    # (equality would also hold if the lane never ran: it must have, often)
    assert totals[0] > totals[1] // 2, f"{totals[0]} lane commands in {totals[1]} runs"


def test_many_outstanding_complete_in_any_order(where: Path) -> None:
    """A queue's worth of reads, writes and flushes at once, on several namespaces: the
    lane holds them all at the ring and answers each as it completes."""
    p = _pair(where, sqsize=127)
    try:
        stream = b"".join(
            (rd(i, 2, i % 96, 1 + i % 4 if i % 96 + 4 <= 96 else 1) if i % 3 == 0 else
             wr(i, 1, (i // 3) * 12, 1 + i % 8) if i % 3 == 1 else  # (apart: see _apart)
             cmd(FLUSH, i, 5, sgl_len=0) if i % 9 == 2 else rd(i, 6, i % 200, 8))
            for i in range(120))
        p.feed(stream)
        p.check()
        assert p.taken() == 120
        assert p.fast.io._lane.c.submitted >= 120
        assert p.fast.io._lane.inflight == 0
    finally:
        p.close()


def test_r2t_writes_and_fua_on_files(where: Path) -> None:
    p = _pair(where)
    try:
        p.feed(wr(1, 2, 8, 4, data=b"") + wr(2, 1, 64, 40, data=b"", cdw12=FUA)
               + wr(3, 5, 0, 2, cdw12=FUA))
        p.check()
        r1, r2 = _r2ts(p)
        p.feed(wire(pdu.H2CData(1, r1.ttag, 0, pattern(r1.r2tl, 7), True))
               + wire(pdu.H2CData(2, r2.ttag, 0, pattern(r2.r2tl, 8)[:4096], False)))
        p.feed(wire(pdu.H2CData(2, r2.ttag, 4096, pattern(r2.r2tl, 8)[4096:], True)))
        p.check()
        p.feed(rd(4, 2, 8, 4) + rd(5, 1, 64, 40))  # (once written: reads in flight with a
        p.check()                                  # write may see either, on either side)
        assert p.taken() == 5
        assert _contents(p.fast.bdev("M4K"))[8 * 4096:12 * 4096] == pattern(r1.r2tl, 7)
    finally:
        p.close()


def test_errors_at_the_file_go_back_to_python(where: Path) -> None:
    """The file shrinks under the bdev: reads and writes past its new end come back
    short; the lane gives them to the Python path, which does them again and answers
    with its error status (and the rest of the batch stays the lane's)."""
    p = _pair(where)
    try:
        p.feed(rd(1, 2, 90) + wr(2, 2, 91))
        p.check()
        for side in (p.ref, p.fast):
            os.truncate(side.bdev("M4K").filename, 80 * 4096)
        # reads past the new end (whole, and across it) beside good ones
        p.feed(rd(3, 2, 85) + rd(4, 2, 1) + rd(6, 2, 79, 2) + rd(7, 1, 3))
        p.check()
        errors = p.ref.admin.ctrl.error_count
        assert errors == 2 and p.fast.admin.ctrl.error_count == errors
        assert p.taken() == 4  # (the two good reads of the second feed, and the first two)
        # a write past the end extends the file (a regular file's way): not an error
        p.feed(wr(5, 2, 95, 1))
        p.check()
        assert p.ref.admin.ctrl.error_count == errors
        lane = p.fast.io._lane
        assert lane.inflight == 0 and lane.c.redo == 0
    finally:
        p.close()


def test_connection_closed_with_io_in_flight(where: Path) -> None:
    """The host goes away while the lane's I/O is at the kernel: the lane is freed only
    once the kernel is done with its buffers, and the reactor's budget is whole."""
    p = _pair(where)
    try:
        side = p.fast
        side.io.data_received(b"".join(wr(i, 2, i, 2) for i in range(16))
                              + b"".join(rd(100 + i, 1, i, 16) for i in range(16)))
        lane = side.io._lane
        assert lane.c.io_inflight > 0
        side.io.connection_lost(None)
        assert side.io._lane is None and side.io.budget.used == 0
        side.settle()
        ring = uring._Ring._rings.get(side.reactor)
        assert ring is None or not ring.lane_busy()
    finally:
        p.close()
    assert MDTS and BDEVS  # (imported for the case table's geometry)


def test_r2t_data_received_across_buffers_on_files(where: Path) -> None:
    """Write data that arrives in pieces of a receive buffer each (as from a real socket):
    the lane receives the payload itself and submits the write once it is whole."""
    ic = ICREQS["hdgst+ddgst"]
    with encoding(ic):
        p = _pair(where, icreq=ic)
        try:
            for i, cut in enumerate((30, 100, 5000, 16000)):
                p.feed(wr(20 + i, 2, 8 + 4 * i, 4, data=b""))
                r = _r2ts(p)[-1]
                h = wire(pdu.H2CData(20 + i, r.ttag, 0, pattern(r.r2tl, i), True))
                p.feed(h[:cut], h[cut:])
                p.check()
                assert p.fast.io._lane.inflight == 0
            assert p.fast.io._lane.c.rx_pdus == 4 and p.taken() == 4
            p.feed(b"".join(rd(40 + i, 2, 8 + 4 * i, 4) for i in range(4)))
            p.check()
        finally:
            p.close()
