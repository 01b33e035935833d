"""pmem reads sent from the pool's blocks (lane.c pmem_read_held, be_pmem.c
bt_pmem_read_map): over a socket lent to the reactor's C poller, a read of 32 KiB or more
is not copied into the output; its blocks are held in the read-tracking table until one
sendmsg per lane call took them.

Held to the Python path byte for byte over real sockets (net_harness.SockPair, pools as
test_fastpath_pmem.py makes them): multi-block reads in one and in several C2HData PDUs,
with digests and padding, between writes (in capsule and by R2T) that must be answered in
order, partial sends (small socket buffers: the rest copied into the queue before the
blocks are let go), a block with the error flag among held reads. And the BTT's promise
with a writer on another lane of the same pool racing the reads: every block the host
receives is wholly one version, never torn.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lane_harness import OPTS, Layout, rd, wr
from net_harness import SockPair
from test_fastpath import ICREQS, finish_r2t
from test_fastpath_pmem import PMEM_LAYOUT, _contents, _mark_bad, _pmem_bdevs

from blocktarget.bdevs import pmem
from blocktarget.nvme import netpoll

pytestmark = [
    pytest.mark.skipif(not pmem.libpmem_available(),
                       reason="blocktarget._pmem not built (libpmem-dev missing)"),
    pytest.mark.skipif(not netpoll.AVAILABLE and os.environ.get("CI") != "true",
                       reason="blocktarget._fastpath is not built (no compiler)"),
]

# reads up to 128 KiB (the lane sends those of 32 KiB and more from the pool)
BIG = {**OPTS, "max_io_size": 131072, "io_unit_size": 131072}
BIG_SMALL_CHUNK = {**BIG, "io_unit_size": 8192}  # several C2HData PDUs per read


@pytest.fixture(autouse=True)
def _built() -> None:
    if not netpoll.AVAILABLE:
        pytest.fail("CI=true but blocktarget._fastpath is not built: the C poller is untested")


@pytest.fixture
def where() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="bt-pmem-send-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _pair(where: Path, opts: dict[str, Any], layout: Layout = PMEM_LAYOUT,
          **kw: Any) -> SockPair:
    work = where / f"pair{len(list(where.iterdir()))}"
    work.mkdir()
    from test_fastpath_pmem import _python_engine

    return SockPair(opts, layout=layout, workdir=work, reference=_python_engine, **kw)


def _sent(p: SockPair) -> int:
    return int(p.fast.io._lane.c.pmem_sent)


@pytest.mark.parametrize("icreq", ["plain", "all"])
@pytest.mark.parametrize("opts", [BIG, BIG_SMALL_CHUNK], ids=["one-pdu", "chunk=8k"])
def test_large_reads_match_python(where: Path, opts: dict[str, Any], icreq: str) -> None:
    """Large reads of 4 KiB and 512-byte blocks (runs of consecutive physical blocks and
    scattered ones, blocks that read as zeroes), between writes that move blocks and
    must be answered in command order, small reads copied as before."""
    ic = ICREQS[icreq]
    from lane_harness import encoding

    with encoding(ic):
        p = _pair(where, opts, icreq=ic)
        try:
            # scatter the map: writes move blocks to other physical blocks
            p.feed(b"".join(wr(i, 2, (i * 37) % 96, 1) for i in range(1, 24)))
            p.check()
            p.feed(rd(30, 2, 0, 32) + rd(31, 2, 40, 8) + wr(32, 2, 41, 2) + rd(33, 2, 40, 8)
                   + rd(34, 2, 3, 1) + rd(35, 1, 0, 64) + rd(36, 1, 100, 256)
                   + rd(37, 5, 0, 16) + rd(38, 2, 64, 32))
            p.check()
            assert _sent(p) == 7, _sent(p)
            # blocks that read as zeroes, then a write by R2T between held reads
            p.feed(rd(40, 2, 60, 16) + wr(41, 2, 2, 4, data=b"") + rd(42, 2, 0, 16))
            p.check()
            finish_r2t(p)
            p.check()
            p.feed(rd(43, 2, 0, 16))
            p.check()
            assert _sent(p) == 10
        finally:
            p.close()


def test_partial_sends_copy_the_rest(where: Path) -> None:
    """Small socket buffers: the socket takes part of the held reads' bytes; the rest is
    copied into the queue before the blocks are let go, and sent as the host reads."""
    p = _pair(where, BIG_SMALL_CHUNK, sndbuf=4096, rcvbuf=65536, sqsize=127)
    try:
        batch = b"".join(rd(i, 2, (i * 11) % 64, 32) + wr(500 + i, 2, 70 + i % 20, 1)
                         for i in range(6))
        p.feed(batch)
        p.check()
        assert p.taken() == 12 and p.fast.io._net.blocked > 0
        assert _sent(p) >= 1  # (the first of a call; later ones wait behind the queue)
    finally:
        p.close()


def test_media_error_among_held_reads(where: Path) -> None:
    """A block with the error flag in a read that follows held reads: that read goes
    to the Python path (Unrecovered Read Error) with the rest of the batch, the held
    ones are sent first."""
    p = _pair(where, BIG)
    try:
        for side in (p.ref, p.fast):
            _mark_bad(side, "M4K", 50)
        p.feed(rd(1, 2, 0, 16) + rd(2, 2, 16, 16) + rd(3, 2, 40, 16) + rd(4, 2, 64, 16))
        p.check()
        assert p.ref.admin.ctrl.error_count == 1 == p.fast.admin.ctrl.error_count
        assert _sent(p) == 2
    finally:
        p.close()


# ---- a writer on another lane of the same pool ----

BS, NB = 4096, 96


def _block(lba: int, version: int) -> bytes:
    return struct.pack("<II", lba, version) * (BS // 8)


def _two_lane_bdevs(workdir: Path) -> list[dict[str, Any]]:
    """test_fastpath_pmem's pools, M4K made again with two lanes: the queue pair's
    reactor reads through lane 0, the test's thread writes through lane 1."""
    bdevs = _pmem_bdevs(workdir)
    path = workdir / "M4K.pool"
    path.unlink()
    pmem.create_pool_file(str(path), NB, BS, lanes=2, free_per_lane=4)
    pool, fd = pmem.open_pool(str(path))
    try:
        pool.write(1, 0, NB, memoryview(b"".join(_block(b, 0) for b in range(NB))))
    finally:
        pool.close()
        os.close(fd)
    return bdevs


def _c2h_payloads(out: bytes) -> dict[int, bytearray]:
    """Each read's data by command id, from the host's plain byte stream."""
    data: dict[int, bytearray] = {}
    pos = 0
    while pos < len(out):
        typ, _flags, hlen, pdo = out[pos:pos + 4]
        (plen,) = struct.unpack_from("<I", out, pos + 4)
        if typ == 0x07:
            cid, datao, n = struct.unpack_from("<H2xII", out, pos + 8)
            buf = data.setdefault(cid, bytearray())
            assert datao == len(buf)
            buf += out[pos + pdo:pos + pdo + n]
        else:
            assert typ == 0x05 and plen == hlen == 24
            assert struct.unpack_from("<H", out, pos + 22)[0] >> 1 == 0, "a read failed"
        pos += plen
    return data


def test_reads_race_a_writer_on_another_lane(where: Path) -> None:
    """A thread writes runs of blocks through the pool's other lane (the C engine, the
    GIL released) while the host reads the same blocks with large reads sent from the
    pool: every block received is whole, its LBA's, one version, old or new."""
    layout = Layout(bdevs=_two_lane_bdevs, contents=_contents)
    p = _pair(where, BIG, layout=layout, sqsize=127)
    try:
        pool = p.fast.bdev("M4K").pool
        assert len(pool.lanes) == 2 and p.fast.io.channel_of(
            p.fast.sub.namespaces[2])[1].lane == 0
        stop = threading.Event()
        written = [0]

        def writer() -> None:
            rng = random.Random(7)
            v = 1
            while not stop.is_set():
                lba = rng.randrange(NB)
                n = min(rng.randint(1, 6), NB - lba)
                pool.write(1, lba, n, memoryview(b"".join(_block(lba + i, v)
                                                          for i in range(n))))
                v += 1
                written[0] = v

        t = threading.Thread(target=writer, name="lane1-writer")
        t.start()
        versions: set[int] = set()
        blocks = 0
        try:
            deadline = time.monotonic() + 2.0
            cid = 0
            while time.monotonic() < deadline:
                end = p.fast.end
                end.out.clear()
                reads = [(cid + i, (i * 8) % 64, 32) for i in range(12)]
                cid = (cid + 12) % 4096
                resp = 0 if p.fast.io.c2h_success_ok else 24
                want = sum(n * BS + 24 + resp for _c, _lba, n in reads)  # (one PDU each)
                p.fast.send(b"".join(rd(c, 2, lba, n) for c, lba, n in reads))
                p.fast.pump(want, settle=0)
                got = _c2h_payloads(bytes(end.out))
                for c, lba, n in reads:
                    buf = got[c]
                    assert len(buf) == n * BS
                    for i in range(n):
                        blk = bytes(buf[i * BS:(i + 1) * BS])
                        b_lba, ver = struct.unpack_from("<II", blk)
                        assert b_lba == lba + i and blk == _block(b_lba, ver), (
                            f"LBA {lba + i}: a torn or misplaced block")
                        versions.add(ver)
                        blocks += 1
        finally:
            stop.set()
            t.join()
        assert written[0] > 100 and len(versions) > 10, (written[0], len(versions))
        assert _sent(p) * 32 == blocks
        assert pool.check() == []
    finally:
        p.close()


def test_switched_off_without_a_lent_socket(where: Path) -> None:
    """The same reads with the C poller off (`c_net_poll: false`: the lane run from the
    event loop's callbacks) are copied into the output, as before."""
    from test_fastpath_pmem import _pair as lane_pair

    p = lane_pair(where, BIG)
    try:
        p.feed(rd(1, 2, 0, 32) + rd(2, 1, 0, 64))
        p.check()
        assert p.taken() == 2 and p.fast.io._lane.c.pmem_sent == 0
    finally:
        p.close()

