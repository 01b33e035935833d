"""Logical volumes in the C lane (csrc/lane_lvol.c, lvol/lanemap.py), held to the Python
path with the lane harness: the same commands on a target with the lane and one
without, every byte sent, the base's data region, the bdev statistics (the volumes' and
the base's), the SMART counters and the volumes' cluster maps compared after each step.

Each side has one store (16 KiB clusters) on a malloc bdev, on a uring bdev (a file
on the repo's disk and one on /dev/shm), on a pmem bdev (the BTT under the volumes' map:
two translations in C), or on a passthru over the second half of a split malloc bdev
(two offset remaps under the map), with a thin volume (nsid 2), a thick one
(nsid 4), a clone (nsid 5) of a snapshot (nsid 8, read-only) of a thick volume, and that
origin (nsid 7, since the snapshot a clone of it too). The data region is filled with a
pattern first, so a clone's reads through its snapshot return something recognisable.

What the lane takes: reads and writes inside one cluster the volume owns, reads of a
parent's cluster and of unmapped ones (zeroes). What it leaves to the Python path, and
the test checks it does: first writes (allocation, copy-on-write), commands crossing a
cluster, Flush, writes to the snapshot. Then: a snapshot taken while lane writes are at
io_uring holds them all, and the origin's next writes land in new clusters.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lane_harness import BDEVS, DSM, FLUSH, OPTS, WZ, Layout, Pair, cmd, pattern, rd, wr
from test_fastpath import finish_r2t

from blocktarget.bdevs import pmem, uring
from blocktarget.nvme import fastlane
from blocktarget.rpc import call_method

pytestmark = pytest.mark.skipif(not fastlane.AVAILABLE and os.environ.get("CI") != "true",
                                reason="blocktarget._fastpath is not built (no compiler)")

CLUSTER = 16384
BPC = CLUSTER // 4096  # 4 KiB blocks per cluster
VOL_BLOCKS = 256  # 1 MiB volumes
VOLS = {2: "lvs/thin", 4: "lvs/thick", 5: "lvs/clone", 7: "lvs/orig", 8: "lvs/snap",
        9: "lvs/big"}
BIG_BLOCKS = 8192  # lvs/big: a thin volume of 32 MiB, twice its store
BASE = "LB"
BASE_BLOCKS = 4096  # 16 MiB
SPLIT_UNDER = "LBM"  # split kind: a malloc bdev of two halves, BASE a passthru on the second


@pytest.fixture(autouse=True)
def _geometry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every volume namespace has 4 KiB blocks (the command builders look them up)."""
    if not fastlane.AVAILABLE:
        pytest.fail("CI=true but blocktarget._fastpath is not built: the C lane is untested")
    for nsid, name in VOLS.items():
        monkeypatch.setitem(BDEVS, nsid, (name, 4096, BIG_BLOCKS if nsid == 9 else VOL_BLOCKS))


def _base(kind: str, workdir: Path) -> list[tuple[str, dict[str, Any]]]:
    if kind == "malloc":
        return [("bdev_malloc_create", {"name": BASE, "num_blocks": BASE_BLOCKS,
                                        "block_size": 4096})]
    if kind == "split":
        return [("bdev_malloc_create", {"name": SPLIT_UNDER, "num_blocks": 2 * BASE_BLOCKS,
                                        "block_size": 4096}),
                ("bdev_split_create", {"base_bdev": SPLIT_UNDER, "split_count": 2}),
                ("bdev_passthru_create", {"base_bdev_name": f"{SPLIT_UNDER}p1",
                                          "name": BASE})]
    if kind == "pmem":
        pool = str(workdir / "base.pool")
        return [("bdev_pmem_create_pool", {"pmem_file": pool, "num_blocks": BASE_BLOCKS,
                                           "block_size": 4096}),
                ("bdev_pmem_create", {"name": BASE, "pmem_file": pool})]
    path = workdir / "base.img"
    path.write_bytes(bytes(BASE_BLOCKS * 4096))
    return [("bdev_uring_create", {"name": BASE, "filename": str(path), "block_size": 4096})]


def _setup(kind: str) -> Any:
    """The base, its store and the volumes, made by their RPCs (volumes are not config
    lines: the store on the base brings them back) before the config exports them."""

    async def setup(target: Any, workdir: Path) -> None:
        def lv(name: str, thin: bool) -> tuple[str, dict[str, Any]]:
            return "bdev_lvol_create", {"lvs_name": "lvs", "lvol_name": name,
                                        "size_in_mib": 1, "thin_provision": thin}

        calls = [
            *_base(kind, workdir),
            ("bdev_lvol_create_lvstore", {"bdev_name": BASE, "lvs_name": "lvs",
                                          "cluster_sz": CLUSTER, "clear_method": "none"}),
            lv("thin", True), lv("thick", False), lv("orig", False),
            ("bdev_lvol_snapshot", {"lvol_name": "lvs/orig", "snapshot_name": "snap"}),
            ("bdev_lvol_clone", {"snapshot_name": "lvs/snap", "clone_name": "clone"}),
            ("bdev_lvol_create", {"lvs_name": "lvs", "lvol_name": "big",
                                  "size_in_mib": BIG_BLOCKS * 4096 >> 20,
                                  "thin_provision": True}),
        ]
        for method, params in calls:
            await call_method(target, method, params)

    return setup


def _data_offset(side: Any) -> int:
    return side.target.bdevs.get(VOLS[2]).store.sb.data_offset


DATA_START = 4 * 1024 * 1024  # past the metadata slots of this geometry (checked in _fill)


def _contents(b: Any) -> bytes | None:
    """The base's data region as its own reader sees it (the metadata holds each side's
    own UUIDs): a pmem pool's through its BTT (the physical blocks depend on the order
    of writes, which the lane's group commit changes), the split kind's in the malloc
    bdev under the split."""
    start = DATA_START
    if b.name == SPLIT_UNDER:
        return bytes(b.mem[BASE_BLOCKS * 4096 + start:])
    if b.name != BASE or b.module == "passthru":
        return None
    if b.module == "pmem":
        assert b.pool.check() == [], b.pool.check()
        out = bytearray(BASE_BLOCKS * 4096 - start)
        b.pool.read(0, start // 4096, len(out) // 4096, memoryview(out))
        return bytes(out)
    if b.host_memory() is not None:
        return bytes(b.mem[start:])
    return Path(b.filename).read_bytes()[start:]


def _layout(kind: str) -> Layout:
    setup = kind if kind in ("malloc", "split", "pmem") else "uring"
    compared = [BASE, *VOLS.values()] + ([SPLIT_UNDER] if kind == "split" else [])
    return Layout(bdevs=lambda _w: [], setup=_setup(setup), namespaces=dict(VOLS),
                  compared=compared, contents=_contents,
                  ordered=kind in ("malloc", "split", "pmem"))


def _fill(side: Any) -> None:
    """A pattern over the data region, as if volumes had written it (the same on both
    sides: what the thick volumes and the snapshot read)."""
    base = side.target.bdevs.get(BASE)
    off = _data_offset(side)
    assert off <= DATA_START
    data = pattern(BASE_BLOCKS * 4096 - off, 77)
    if base.module == "passthru":
        under = side.target.bdevs.get(SPLIT_UNDER)
        under.mem[BASE_BLOCKS * 4096 + off:] = data
    elif base.module == "pmem":
        assert off % 4096 == 0
        base.pool.write(0, off // 4096, len(data) // 4096, memoryview(data))
    elif base.host_memory() is not None:
        base.mem[off:] = data
    else:
        with open(base.filename, "r+b") as f:
            f.seek(off)
            f.write(data)


def maps(side: Any) -> dict[str, Any]:
    md = side.target.bdevs.get(VOLS[2]).store.md
    return {v.name: (sorted(v.map.items()), v.read_only, v.thin) for v in md.volumes.values()}


@pytest.fixture(params=["malloc", "uring-disk", "uring-shm", "pmem", "split"])
def lvpair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    kind = request.param
    if kind == "pmem" and not pmem.libpmem_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but blocktarget._pmem is not built: lvol on pmem untested")
        pytest.skip("blocktarget._pmem not built (libpmem-dev missing)")
    if kind != "malloc" and uring.uring_unavailable_reason() is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no io_uring: {uring.uring_unavailable_reason()}")
        pytest.skip(f"no io_uring here: {uring.uring_unavailable_reason()}")
    where = tmp_path
    if kind == "uring-shm":
        where = Path(f"/dev/shm/bt-lane-lvol-{os.getpid()}-{id(request)}")
        where.mkdir()
    p = Pair(OPTS, layout=_layout(kind), workdir=where)
    for side in (p.ref, p.fast):
        _fill(side)
    try:
        yield p
    finally:
        p.close()
        if kind == "uring-shm":
            for f in sorted(where.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            where.rmdir()


def check(p: Pair) -> None:
    p.check()
    assert maps(p.ref) == maps(p.fast)


def step(p: Pair, data: bytes, lane: int) -> None:
    """Feed, compare, and check how many of the commands the lane executed."""
    before = p.taken()
    p.feed(data)
    check(p)
    assert p.taken() - before == lane


def test_what_the_lane_takes(lvpair: Pair) -> None:
    p = lvpair
    # thin: unmapped reads are zeroes from C; a first write allocates (Python); then
    # reads and writes of that cluster are the lane's
    step(p, rd(1, 2, 0) + rd(2, 2, 5, 3), 2)
    step(p, wr(3, 2, 1), 0)
    step(p, rd(4, 2, 1) + wr(5, 2, 2, 2), 2)  # (no overlap in a batch: io_uring
    step(p, rd(6, 2, 0, 4), 1)                #  completes in any order)
    # thick: every cluster its own from the start
    step(p, rd(7, 4, 9) + wr(8, 4, 10) + wr(10, 4, 255), 3)
    step(p, rd(9, 4, 8, 4), 1)
    # clone: reads through the snapshot in C; a write copies the cluster first (Python),
    # then it is the clone's own
    step(p, rd(11, 5, 17) + rd(12, 5, 200, 2), 2)
    step(p, wr(13, 5, 17), 0)
    step(p, rd(14, 5, 16, 2) + wr(15, 5, 18), 2)
    # the origin reads the snapshot's clusters too; the snapshot is read-only
    step(p, rd(16, 7, 40) + rd(17, 8, 40), 2)
    step(p, wr(18, 8, 40), 0)
    # crossing a cluster, and Flush: the Python path's (each then finishes before the
    # lane takes the next buffer)
    step(p, rd(19, 4, BPC - 1, 2), 0)
    step(p, cmd(FLUSH, 20, 4), 0)
    # Deallocate of the thin volume's whole cluster 0 (a structural change: the maps are
    # frozen, drained, rebuilt): then its reads are zeroes from C again and its next
    # write allocates anew; Write Zeroes is the Python path's
    step(p, cmd(DSM, 21, 2, data=struct.pack("<IIQ", 0, BPC, 0), sgl_len=16, cdw10=0,
                cdw11=4), 0)
    step(p, rd(22, 2, 1), 1)
    step(p, wr(23, 2, 1), 0)
    step(p, rd(24, 2, 1) + rd(25, 4, 33), 2)
    step(p, cmd(WZ, 26, 4, 33, 1, sgl_len=0), 0)
    step(p, rd(27, 4, 33), 1)
    # a thin volume larger than its store (and its base): the lane's bound is the base's
    step(p, rd(28, 9, BIG_BLOCKS - 1) + rd(29, 9, 5), 2)
    step(p, wr(30, 9, BIG_BLOCKS - 1), 0)
    step(p, rd(31, 9, BIG_BLOCKS - 1) + wr(32, 9, BIG_BLOCKS - 2), 2)
    # writes by R2T: the cluster is looked up once the data is in; a first write or a
    # copy-on-write then goes back to the Python path with its data
    for cid, nsid, slba, nlb, lane in ((40, 2, 40, 4, 0), (42, 2, 41, 2, 1), (44, 5, 60, 4, 0),
                                       (46, 5, 61, 1, 1), (48, 4, 100, 4, 1),
                                       (50, 8, 4, 1, 0), (52, 9, 4000, 4, 0)):
        before = p.taken()
        p.feed(wr(cid, nsid, slba, nlb, data=b""))
        finish_r2t(p)
        check(p)
        assert p.taken() - before == lane, cid
    maps_ = p.fast.target.bdevs.get(VOLS[2]).store.lane.maps
    assert set(maps_) == {p.fast.target.bdevs.get(n).uuid for n in VOLS.values()}
    assert all(m.busy == 0 for m in maps_.values())  # (every lookup let go)


def _random_stream(rng: random.Random, cid0: int, n: int) -> list[bytes]:
    out = []
    used: list[tuple[int, int, int]] = []
    for i in range(n):
        nsid = rng.choice([2, 4, 5, 7, 8])
        nlb = rng.choice([1, 1, 1, 2, 4])
        slba = rng.randrange(0, VOL_BLOCKS - nlb + 1)
        # one command per block range per batch: async I/O completes in any order
        if any(u[0] == nsid and u[1] < slba + nlb and slba < u[2] for u in used):
            continue
        used.append((nsid, slba, slba + nlb))
        cid = cid0 + i
        out.append(wr(cid, nsid, slba, nlb) if rng.random() < 0.5 else rd(cid, nsid, slba, nlb))
    return out


def test_random_mix_matches_python(lvpair: Pair) -> None:
    """Random reads and writes over every volume, in batches: the first writes to thin
    clusters and clones allocate in Python, later ones run in C; bytes, statistics and
    maps equal throughout."""
    p = lvpair
    rng = random.Random(16)
    for batch in range(30):
        # one receive buffer per command, each run to completion: a command the lane
        # leaves to the Python path would otherwise take the rest of its buffer with it
        # (and, at io_uring, what follows while it is outstanding)
        for c in _random_stream(rng, 1000 + batch * 40, 24):
            p.feed(c)
        check(p)
    assert p.taken() > 200


def test_snapshot_while_lane_writes_are_in_flight(tmp_path: Path) -> None:
    """A snapshot taken while the lane has writes at io_uring: the freeze waits for
    them, so the snapshot holds every one of them; the origin's writes after it go to
    new clusters (copy-on-write in Python, then the lane again), the snapshot unchanged."""
    if uring.uring_unavailable_reason() is not None:
        pytest.skip("no io_uring here")
    p = Pair(OPTS, layout=_layout("uring-disk"), workdir=tmp_path)
    try:
        side = p.fast
        _fill(side)
        store = side.target.bdevs.get(VOLS[4]).store
        # writes of new data to the thick volume: all the lane's, at io_uring
        blocks = list(range(0, VOL_BLOCKS, 11))  # (24: within the queue's 32)
        side.io.data_received(b"".join(
            wr(100 + i, 4, b, data=pattern(4096, 500 + b)) for i, b in enumerate(blocks)))
        lane_map = store.lane.maps[side.target.bdevs.get(VOLS[4]).uuid]
        assert lane_map.busy > 0, "the writes were expected at io_uring still"

        async def snapshot() -> Any:
            return await side.target.dispatcher.handle({
                "jsonrpc": "2.0", "id": 1, "method": "bdev_lvol_snapshot",
                "params": {"lvol_name": "lvs/thick", "snapshot_name": "s4"}})

        resp = p.loop.run_until_complete(snapshot())
        assert "result" in resp, resp
        side.settle()
        assert lane_map.busy == 0
        snap = store.volume_by_name("s4")
        base = side.target.bdevs.get(BASE)
        bs = 4096

        def block_of(vol: Any, b: int) -> bytes:
            pc = vol.map[b // BPC]
            with open(base.filename, "rb") as f:
                f.seek(store.sb.cluster_offset(pc) + (b % BPC) * bs)
                return f.read(bs)

        for b in blocks:
            assert block_of(snap, b) == pattern(4096, 500 + b), b
        # the origin is now a clone of s4: its next writes copy a cluster first
        taken = side.taken()
        side.io.data_received(wr(900, 4, 0, data=b"\xab" * bs))
        side.settle()
        side.io.data_received(wr(901, 4, 1, data=b"\xcd" * bs) + rd(902, 4, 0))
        side.settle()
        assert side.taken() - taken == 2  # (the copy-on-write was Python's)
        origin = store.md.volumes[side.target.bdevs.get(VOLS[4]).uuid]
        assert origin.map[0] != snap.map[0]
        assert block_of(snap, 0) == pattern(4096, 500)
        assert block_of(origin, 0) == b"\xab" * bs and block_of(origin, 1) == b"\xcd" * bs
        assert block_of(origin, 3) == block_of(snap, 3)  # (copied from the snapshot)
    finally:
        p.close()


def rpc_both(p: Pair, method: str, **params: Any) -> None:
    for side in (p.ref, p.fast):
        p.loop.run_until_complete(call_method(side.target, method, params))
        side.run()


def test_control_plane_changes_between_commands(lvpair: Pair) -> None:
    """Metadata changes between lane commands (each a structural commit: the maps frozen,
    drained, rebuilt): the clone inflated (its reads and writes then all the lane's, on
    clusters of its own), the origin decoupled from its snapshot (it keeps its data), a
    volume set read-only (its writes the Python path's)."""
    p = lvpair
    step(p, rd(1, 5, 8) + rd(2, 7, 8), 2)
    rpc_both(p, "bdev_lvol_inflate", name=VOLS[5])
    step(p, wr(3, 5, 8) + wr(4, 5, 100), 2)  # (owned now: no copy-on-write)
    step(p, rd(5, 5, 8, 2) + rd(6, 5, 101), 2)
    rpc_both(p, "bdev_lvol_decouple_parent", name=VOLS[7])
    step(p, rd(7, 7, 8) + wr(8, 7, 9), 2)
    step(p, rd(9, 7, 8, 2), 1)
    rpc_both(p, "bdev_lvol_set_read_only", name=VOLS[4])
    step(p, rd(10, 4, 3), 1)
    step(p, wr(11, 4, 3), 0)  # (Namespace Is Write Protected, from the Python path)
    md = p.fast.target.bdevs.get(VOLS[2]).store.md
    clone = md.volumes[p.fast.target.bdevs.get(VOLS[5]).uuid]
    assert clone.parent is None and len(clone.map) == clone.num_clusters
