"""The C engine of the pmem BTT (csrc/be_pmem.c) held to the Python one (bdevs/pmem.py).

* Crash at every persist point of the C engine: test_pmem_crash.py's harness, with the
  pool under test calling C, which stores into the recorder's memory and reports every
  store, flush and drain through callbacks.
* The same operations through both engines leave the same pool, byte for byte, and the
  same sequence of flushes and drains (the order of persists is the format's contract).
* On real libpmem mappings (tmpfs: msync; PMEM_IS_PMEM_FORCE=1: flush and drain) pools
  written by C and by Python are identical files.
* A failed persist leaves the pool refusing writes until it is reopened, and the
  reopened pool is consistent; a block with the error flag reads as a media error.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_pmem_crash import CrashRecorder, _fresh, _layout, run_random_ops

from blocktarget.bdevs import pmem
from blocktarget.bdevs.pmem import MediaError, Pool, PoolBroken, format_pool

pytestmark = pytest.mark.skipif(not pmem.c_engine_available(),
                                reason="blocktarget._fastpath (the C engine) not built")


@pytest.mark.parametrize("entry_size", [4, 8])
@pytest.mark.parametrize("seed", [1, 2])
def test_c_engine_crash_at_every_persist_point(seed: int, entry_size: int) -> None:
    chk = run_random_ops(seed * 100 + entry_size, entry_size, ops=60, core=True)
    assert chk.crashes > 60 * 3
    assert chk.saw_old > 0 and chk.saw_new > 0
    assert chk.recoveries > 0, "no crash point needed recovery: the harness missed step 3-4"


def test_c_engine_one_lane_one_slot() -> None:
    chk = run_random_ops(7, 4, ops=80, num_blocks=6, lanes=1, free_per_lane=1, core=True)
    assert chk.saw_old > 0 and chk.saw_new > 0


def test_c_engine_large_blocks() -> None:
    chk = run_random_ops(11, 4, ops=20, num_blocks=8, block_size=4096, lanes=2,
                         free_per_lane=3, core=True)
    assert chk.saw_old > 0 and chk.saw_new > 0


class TraceRecorder(CrashRecorder):
    """A recorder that also logs every flush and drain, in order."""

    def __init__(self, image: bytes | bytearray) -> None:
        super().__init__(image)
        self.trace: list[tuple[Any, ...]] = []

    def flush(self, off: int, length: int) -> None:
        self.trace.append(("flush", off, length))
        super().flush(off, length)

    def drain(self) -> None:
        self.trace.append(("drain",))
        super().drain()


def _ops(rng: random.Random, layout: Any, n: int) -> list[tuple[Any, ...]]:
    out = []
    for _ in range(n):
        lba = rng.randrange(layout.num_blocks)
        count = rng.randint(1, min(layout.free_per_lane * 3 + 1, layout.num_blocks - lba))
        lane = rng.randrange(layout.lanes)
        kind = rng.choices(["w", "z", "r"], [6, 1, 2])[0]
        out.append((kind, lane, lba, count, rng.randbytes(count * layout.block_size)))
    return out


@pytest.mark.parametrize(("entry_size", "lanes"), [(4, 3), (8, 3), (4, 1)])
def test_same_stores_and_persists_as_python(entry_size: int, lanes: int) -> None:
    """Every flush range and drain in the same order, the same image after each
    operation, the same data read back, the same free lists (a one-lane pool skips a
    flush: both engines alike)."""
    layout = _layout(entry_size, num_blocks=40, lanes=lanes, free_per_lane=3)
    base = _fresh(layout).durable
    recs = [TraceRecorder(base), TraceRecorder(base)]
    pools = [Pool(recs[0], core=False), Pool(recs[1], core=True)]
    assert pools[0].core is None and pools[1].core is not None
    for op in _ops(random.Random(entry_size), layout, 150):
        kind, lane, lba, count, data = op
        got = []
        for pool in pools:
            if kind == "w":
                pool.write(lane, lba, count, memoryview(data))
            elif kind == "z":
                pool.zero(lane, lba, count)
            else:
                out = bytearray(count * layout.block_size)
                pool.read(lane, lba, count, memoryview(out))
                got.append(bytes(out))
        assert recs[0].trace == recs[1].trace, op[:4]
        assert recs[0].cur == recs[1].cur, op[:4]
        if got:
            assert got[0] == got[1]
    assert pools[0].check() == [] and pools[1].check() == []
    assert [[(s.next, s.seq, s.free) for s in ln.slots] for ln in pools[0].lanes] == \
        [[(s.next, s.seq, s.free) for s in ln.slots] for ln in pools[1].lanes]
    assert recs[0].durable == recs[1].durable


def test_persist_points_of_one_block_write_in_c() -> None:
    layout = _layout(4)
    rec = TraceRecorder(_fresh(layout).durable)
    pool = Pool(rec, core=True)
    pool.write(0, 3, 1, memoryview(bytes([7]) * layout.block_size))
    drains = [i for i, t in enumerate(rec.trace) if t[0] == "drain"]
    assert len(drains) == 2
    regions = []
    start = 0
    for d in drains:
        seen = set()
        for _, off, _n in rec.trace[start:d]:
            seen.add("flog" if off < layout.mapoff else "map" if off < layout.dataoff
                     else "data")
        regions.append(seen)
        start = d + 1
    assert regions == [{"data", "flog", "map"}, {"flog"}]
    # the map store (after the last drain) is flushed by the lane's next write, first
    entry = layout.mapoff + 3 * layout.entry_size
    start = len(rec.trace)
    pool.write(0, layout.num_blocks - 1, 1, memoryview(bytes([8]) * layout.block_size))
    first = rec.trace.index(("drain",), start)
    assert any(t[1] <= entry < t[1] + t[2] for t in rec.trace[start:first])


def test_failed_drain_breaks_the_pool_until_reopened() -> None:
    layout = _layout(4, num_blocks=12, lanes=1, free_per_lane=2)
    rec = CrashRecorder(_fresh(layout).durable)
    pool = Pool(rec, core=True)
    bs = layout.block_size
    pool.write(0, 1, 1, memoryview(b"\1" * bs))
    drains = [0]

    def fail_second(r: CrashRecorder) -> None:
        drains[0] += 1
        if drains[0] == 2:
            raise OSError(5, "injected msync failure")

    rec.on_drain = fail_second
    with pytest.raises(OSError, match="injected"):
        pool.write(0, 1, 3, memoryview(b"\2" * 3 * bs))
    with pytest.raises(PoolBroken):
        pool.write(0, 5, 1, memoryview(b"\3" * bs))
    with pytest.raises(PoolBroken):
        pool.zero(0, 5, 1)
    # what survives: block 1 old or new, never torn; the pool consistent after recovery
    again = Pool(CrashRecorder(rec.crash_image()), core=True)
    assert again.check() == []
    out = bytearray(3 * bs)
    again.read(0, 1, 3, memoryview(out))
    assert out[:bs] in (b"\1" * bs, b"\2" * bs)
    again.write(0, 5, 1, memoryview(b"\3" * bs))
    assert again.check() == []


def test_media_error_flag_and_bounds() -> None:
    layout = _layout(4, num_blocks=12)
    rec = CrashRecorder(_fresh(layout).durable)
    pool = Pool(rec, core=True)
    bs = layout.block_size
    pool.write(0, 4, 1, memoryview(b"\5" * bs))
    raw = pool._map[4]
    rec.store(layout.mapoff + 4 * 4, (1 << 30) | (raw & pool._mask), 4)  # flags 01: error
    out = bytearray(2 * bs)
    pool.read(0, 2, 2, memoryview(out))  # beside it: fine
    with pytest.raises(MediaError):
        pool.read(0, 3, 2, memoryview(out))
    with pytest.raises(IndexError):
        pool.read(0, 11, 2, memoryview(out))
    with pytest.raises(IndexError):
        pool.write(layout.lanes, 0, 1, memoryview(out))
    with pytest.raises(ValueError):
        pool.write(0, 0, 3, memoryview(out))  # two blocks of data for three
    pool.write(0, 4, 1, memoryview(b"\6" * bs))  # a write clears the error
    pool.read(0, 4, 1, memoryview(out)[:bs])
    assert out[:bs] == b"\6" * bs


# ---- real libpmem mappings ----------------------------------------------------------

@pytest.fixture
def pool_dir() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="bt-pmem-engine-", dir=base)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


SAME_FILES = r"""
import random, sys
from blocktarget.bdevs import pmem
a, b = sys.argv[1], sys.argv[2]
engines = []
for path, c in ((a, False), (b, True)):
    pmem.USE_C_ENGINE = c
    pool, fd = pmem.open_pool(path)
    assert (pool.core is not None) == c
    engines.append((pool, fd))
rng = random.Random(3)
L = engines[0][0].layout
for _ in range(300):
    lba = rng.randrange(L.num_blocks)
    n = rng.randint(1, min(40, L.num_blocks - lba))
    lane = rng.randrange(L.lanes)
    data = memoryview(rng.randbytes(n * L.block_size))
    zero = rng.random() < 0.1
    for pool, _ in engines:
        if zero:
            pool.zero(lane, lba, n)
        else:
            pool.write(lane, lba, n, data)
for pool, _ in engines:
    assert pool.check() == []
print(int(engines[1][0].pm.is_pmem))
"""


@pytest.mark.parametrize("force", ["0", "1"], ids=["msync", "flush"])
def test_pool_files_written_by_c_and_python_are_identical(pool_dir: Path, force: str) -> None:
    """Both persistence paths of libpmem (msync on tmpfs; flush/drain with
    PMEM_IS_PMEM_FORCE=1, read by libpmem at load time, hence a fresh process)."""
    a, b = pool_dir / "a", pool_dir / "b"
    layout = pmem.create_pool_file(str(a), 200, 4096, lanes=2, free_per_lane=16)
    shutil.copyfile(a, b)
    env = dict(os.environ, PMEM_IS_PMEM_FORCE=force, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-c", SAME_FILES, str(a), str(b)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [force]
    assert a.read_bytes() == b.read_bytes()
    assert layout.file_size == b.stat().st_size


def test_recorder_pool_formats_like_libpmem() -> None:
    """(The recorder image the harness starts from is what create_pool_file makes.)"""
    layout = _layout(4)
    rec = CrashRecorder(bytes(layout.file_size))
    format_pool(rec, layout, uuid.UUID(int=1).bytes)
    assert Pool(rec, core=True).check() == []


def test_without_the_lane_extension_python_runs_the_btt(pool_dir: Path) -> None:
    """No compiler at install time: blocktarget._fastpath is absent, the pmem bdev runs
    the BTT's Python methods and offers the lane nothing."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'blocktarget._fastpath':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from blocktarget.bdev import BdevIO, IOType, load_builtin_modules\n"
        "load_builtin_modules()\n"
        "from blocktarget.bdevs import pmem\n"
        "assert not pmem.c_engine_available()\n"
        "path = sys.argv[1]\n"
        "pmem.create_pool_file(path, 64, 4096, 1, 4)\n"
        "b = pmem.create({'name': 'P', 'pmem_file': path})\n"
        "assert b.pool.core is None\n"
        "ch = b.get_io_channel(None)\n"
        "assert ch.lane_target() is None\n"
        "out = []\n"
        "ch.submit(BdevIO(IOType.WRITE, 3, 9, bytes([7]) * 9 * 4096, out.append))\n"
        "ch.submit(BdevIO(IOType.READ, 3, 9, None, out.append))\n"
        "assert [io.status for io in out] == [0, 0] and bytes(out[1].buf) == bytes([7]) * 9 * 4096\n"
        "assert b.pool.check() == []\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-c", code, str(pool_dir / "pool")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok"]
