"""The pmem bdev on a real libpmem mapping: data through I/O channels on started reactors,
concurrent lanes, persistence across reopen, the RPC methods and their errors, save_config.

Pools live on /dev/shm (tmpfs: `pmem_is_pmem` is false there, so the msync path runs);
the crash-consistency proof is in test_pmem_crash.py, `kill -9` in
tests/integration/test_pmem_kill.py.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.app import Target
from blocktarget.bdev import MODULES, BdevIO, IOType, Status, load_builtin_modules
from blocktarget.bdevs import pmem
from blocktarget.config import Settings
from blocktarget.errors import Busy, InvalidParams, NoSuchDevice, Unsupported
from blocktarget.params import validate
from blocktarget.reactor import Reactor

load_builtin_modules()

pytestmark = pytest.mark.skipif(not pmem.libpmem_available(),
                                reason="blocktarget._pmem not built (libpmem-dev missing)")

ENODEV, EEXIST, EBUSY = -errno.ENODEV, -errno.EEXIST, -errno.EBUSY
_ids = itertools.count(1)
CORE = sorted(os.sched_getaffinity(0))[0]


@pytest.fixture
def pool_dir() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="bt-pmem-", dir=base)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_bdev(path: Path, name: str = "P0") -> pmem.PmemBdev:
    mod = MODULES["pmem"]
    bdev = mod.create(validate(mod.schema, {"name": name, "pmem_file": str(path)}))
    assert isinstance(bdev, pmem.PmemBdev)
    return bdev


def run_io(ch: Any, io_type: IOType, offset: int = 0, blocks: int = 0, buf: Any = None,
           fua: bool = False) -> BdevIO:
    done: list[BdevIO] = []
    io = BdevIO(io_type, offset, blocks, buf, done.append, fua=fua)
    ch.submit(io)
    assert done == [io], "pmem completes inline, exactly once"
    return io


# ---- layout ------------------------------------------------------------------------


def test_layout_and_info_block_round_trip() -> None:
    lay = pmem.Layout.compute(1000, 4096, 2, 4)
    assert lay.entry_size == 4 and lay.internal_blocks == 1008
    assert lay.flogoff == 4096 and lay.mapoff % 4096 == 0 and lay.dataoff % 4096 == 0
    assert lay.file_size == lay.backupoff + 4096
    info = lay.pack_info(b"u" * 16)
    assert len(info) == 4096
    assert pmem.Layout.unpack_info(info) == (lay, b"u" * 16)
    # past 2^30 physical blocks the map needs 8-byte entries
    assert pmem.Layout.compute((1 << 30) - 8, 512, 2, 4).entry_size == 4
    assert pmem.Layout.compute((1 << 30) - 7, 512, 2, 4).entry_size == 8
    with pytest.raises(ValueError):
        pmem.Layout.compute(1 << 31, 512, 1, 1, 4)


def test_fletcher64_matches_pmdk_definition() -> None:
    # lo = sum of 32-bit words, hi = sum of the running lo values (both mod 2^32)
    data = (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (3).to_bytes(4, "little")
    assert pmem.fletcher64(data) == (1 + 3 + 6) << 32 | 6


# ---- data path -----------------------------------------------------------------------


def test_io_on_started_reactors(pool_dir: Path) -> None:
    """Real data through each reactor's channel, each reactor on its own lane."""
    path = pool_dir / "pool"
    pmem.create_pool_file(str(path), 256, 4096, lanes=2, free_per_lane=4)
    bdev = make_bdev(path)
    assert bdev.write_cache is False, "every write persists before it completes"
    r0, r1 = Reactor(0, CORE, pin=False), Reactor(1, CORE, pin=False)
    r0.start()
    r1.start()
    try:
        blob = os.urandom(256 * 4096)

        def work(r: Reactor, half: int) -> list[int]:
            ch = bdev.get_io_channel(r)
            assert isinstance(ch, pmem.PmemChannel) and ch.lane == r.index
            statuses = []
            base = half * 128
            for lba in range(base, base + 128, 16):  # 64 KiB writes: 4 slots per chunk
                statuses.append(run_io(ch, IOType.WRITE, lba, 16,
                                       blob[lba * 4096:(lba + 16) * 4096]).status)
            rd = run_io(ch, IOType.READ, base, 128)
            statuses.append(int(bytes(rd.buf) != blob[base * 4096:(base + 128) * 4096]))
            return statuses

        f0 = r0.send(work, r0, 0)
        f1 = r1.send(work, r1, 1)
        assert f0.result(10) == [0] * 9 and f1.result(10) == [0] * 9

        def more(r: Reactor) -> dict[str, Any]:
            ch = bdev.get_io_channel(r)
            out: dict[str, Any] = {}
            out["fua"] = run_io(ch, IOType.WRITE, 0, 1, b"\xaa" * 4096, fua=True).status
            out["flush"] = run_io(ch, IOType.FLUSH, 0, 256).status
            out["unmap"] = run_io(ch, IOType.UNMAP, 1, 2).status
            out["wz"] = run_io(ch, IOType.WRITE_ZEROES, 3, 1).status
            out["read"] = bytes(run_io(ch, IOType.READ, 0, 5).buf)
            out["cmp_ok"] = run_io(ch, IOType.COMPARE, 4, 1, blob[4 * 4096:5 * 4096]).status
            out["cmp_bad"] = run_io(ch, IOType.COMPARE, 4, 1, bytes(4096)).status
            out["range"] = run_io(ch, IOType.READ, 255, 2).status
            into = bytearray(4096)
            out["into"] = run_io(ch, IOType.READ, 4, 1, memoryview(into)).status
            out["into_data"] = bytes(into)
            return out

        out = r1.send(more, r1).result(10)
        assert out["fua"] == out["flush"] == out["unmap"] == out["wz"] == 0
        assert out["read"] == b"\xaa" * 4096 + bytes(3 * 4096) + blob[4 * 4096:5 * 4096]
        assert out["cmp_ok"] == Status.SUCCESS and out["cmp_bad"] == Status.COMPARE_FAILURE
        assert out["range"] == Status.LBA_OUT_OF_RANGE
        assert out["into"] == 0 and out["into_data"] == blob[4 * 4096:5 * 4096]
        r0.send(bdev.close_channel, r0).result(5)
        r1.send(bdev.close_channel, r1).result(5)
        st = bdev.stats_total()
        assert st.ops[IOType.WRITE] == 17 and st.bytes[IOType.WRITE] == 2 * 128 * 4096 + 4096
    finally:
        r0.stop()
        r1.stop()
    assert bdev.pool.check() == []
    bdev.destruct()

    # everything is on the media: a fresh open reads it back
    again = make_bdev(path, "P1")
    ch = again.get_io_channel(None)
    data = bytes(run_io(ch, IOType.READ, 0, 256).buf)
    assert data[:4096] == b"\xaa" * 4096 and data[4096:4 * 4096] == bytes(3 * 4096)
    assert data[4 * 4096:] == blob[4 * 4096:]
    again.close_channel(None)
    again.destruct()


def test_concurrent_lanes_never_read_a_torn_block(pool_dir: Path) -> None:
    """Writers on two lanes hammer the same LBAs while a reader on a third checks that
    every block it copies is whole. A free block being reused under a reader (the race
    the read-tracking table prevents) would show up as a mixed block."""
    path = pool_dir / "pool"
    bs, nb = 65536, 2  # large blocks and few of them: long copies, frequent reuse
    pmem.create_pool_file(str(path), nb, bs, lanes=3, free_per_lane=1)
    bdev = make_bdev(path)
    pool = bdev.pool
    stop = threading.Event()
    errors: list[str] = []

    def writer(lane: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            lba = n % nb
            pattern = bytes([(lane * 100 + n) % 251]) * bs
            pool.write(lane, lba, 1, memoryview(pattern))

    def reader() -> None:
        buf = bytearray(nb * bs)
        view = memoryview(buf)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(errors) < 5:
            pool.read(2, 0, nb, view)
            for b in range(nb):
                block = buf[b * bs:(b + 1) * bs]
                if block.count(block[0]) != bs:
                    errors.append(f"block {b} torn")
        stop.set()

    threads = [threading.Thread(target=writer, args=(lane,)) for lane in (0, 1)]
    threads.append(threading.Thread(target=reader))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
        stop.set()
    assert not errors, errors[:5]
    assert pool.check() == []
    bdev.destruct()


def test_cache_flush_path(pool_dir: Path) -> None:
    """On real persistent memory the bdev persists with pmem_memcpy_nodrain / pmem_flush /
    pmem_drain instead of msync. PMEM_IS_PMEM_FORCE=1 (read by libpmem at load time, so in
    a fresh process) makes libpmem take that path on tmpfs."""
    code = (
        "import os, sys\n"
        "from blocktarget.bdevs import pmem\n"
        "from blocktarget.bdev import BdevIO, IOType\n"
        "path = sys.argv[1]\n"
        "pmem.create_pool_file(path, 128, 4096, 2, 4)\n"
        "b = pmem.create({'name': 'F', 'pmem_file': path})\n"
        "assert b.pool.pm.is_pmem, 'PMEM_IS_PMEM_FORCE ignored'\n"
        "ch = b.get_io_channel(None)\n"
        "data = os.urandom(128 * 4096)\n"
        "out = []\n"
        "for lba in range(0, 128, 9):\n"
        "    n = min(9, 128 - lba)\n"
        "    ch.submit(BdevIO(IOType.WRITE, lba, n, data[lba * 4096:(lba + n) * 4096],"
        " out.append))\n"
        "ch.submit(BdevIO(IOType.UNMAP, 3, 2, None, out.append))\n"
        "ch.submit(BdevIO(IOType.READ, 0, 128, None, out.append))\n"
        "assert all(io.status == 0 for io in out)\n"
        "exp = data[:3 * 4096] + bytes(2 * 4096) + data[5 * 4096:]\n"
        "assert bytes(out[-1].buf) == exp\n"
        "assert b.pool.check() == []\n"
        "b.close_channel(None); b.destruct()\n"
        "b = pmem.create({'name': 'F', 'pmem_file': path})\n"
        "ch = b.get_io_channel(None)\n"
        "ch.submit(BdevIO(IOType.READ, 0, 128, None, out.append))\n"
        "assert bytes(out[-1].buf) == exp\n"
        "print('ok', b.describe()['driver_specific']['pmem']['is_pmem'])\n"
    )
    env = dict(os.environ, PMEM_IS_PMEM_FORCE="1")
    r = subprocess.run([sys.executable, "-c", code, str(pool_dir / "pool")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "True"]


def test_msync_path_on_tmpfs(pool_dir: Path) -> None:
    if os.environ.get("PMEM_IS_PMEM_FORCE") == "1":
        pytest.skip("PMEM_IS_PMEM_FORCE=1 is set for this run")
    path = pool_dir / "pool"
    pmem.create_pool_file(str(path), 16, 512, 1)
    b = make_bdev(path)
    try:
        assert b.describe()["driver_specific"]["pmem"]["is_pmem"] is False
    finally:
        b.destruct()


def test_missing_extension_is_a_clear_create_time_error(monkeypatch: pytest.MonkeyPatch,
                                                       pool_dir: Path) -> None:
    monkeypatch.setattr(pmem, "_pmem", None)
    monkeypatch.setattr(pmem, "_PMEM_IMPORT_ERROR", "No module named 'blocktarget._pmem'")
    with pytest.raises(Unsupported, match="libpmem-dev"):
        make_bdev(pool_dir / "pool")
    with pytest.raises(Unsupported, match="libpmem-dev"):
        pmem.create_pool_file(str(pool_dir / "pool"), 64, 512, 1)


def test_module_imports_without_the_extension() -> None:
    """The bdev registry imports every module; a missing libpmem must hide only pmem."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'blocktarget._pmem':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from blocktarget.bdev import MODULES, load_builtin_modules\n"
        "load_builtin_modules()\n"
        "from blocktarget.bdevs import pmem\n"
        "assert 'pmem' in MODULES and not pmem.libpmem_available()\n"
        "try:\n"
        "    pmem.create({'name': 'x', 'pmem_file': '/nonexistent'})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Unsupported") and "libpmem-dev" in r.stdout


def test_open_errors(pool_dir: Path) -> None:
    with pytest.raises(NoSuchDevice, match="does not exist"):
        make_bdev(pool_dir / "nope")
    junk = pool_dir / "junk"
    junk.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(InvalidParams, match="not a pmem pool"):
        make_bdev(junk)
    bad = pool_dir / "badflog"
    lay = pmem.create_pool_file(str(bad), 64, 512, 1, 2)
    fd = os.open(bad, os.O_RDWR)
    os.pwrite(fd, (1).to_bytes(8, "little"), lay.flogoff + 32 + 24)  # both entries seq 1
    os.close(fd)
    with pytest.raises(InvalidParams, match="not a usable pmem pool: flog slot 0"):
        make_bdev(bad)
    path = pool_dir / "pool"
    pmem.create_pool_file(str(path), 64, 512, 1)
    b = make_bdev(path)
    with pytest.raises(Busy, match="already used by bdev 'P0'"):
        make_bdev(path, "P2")
    b.destruct()
    # another process holding the pool: the flock says so
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
         str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(Busy, match="another process"):
            make_bdev(path)
    finally:
        holder.kill()
        holder.wait()
    make_bdev(path).destruct()


# ---- RPC ---------------------------------------------------------------------------


def settings() -> Settings:
    # pools live under /dev/shm (or a DAX mount): RPCs may only open allowed directories
    return Settings(cores=[CORE], rpc_http=None, rpc_unix=None, metrics=False,
                    allowed_dirs=["/dev/shm", tempfile.gettempdir()])


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target(settings())
    yield t
    await t.stop()


async def call(t: Target, method: str, **params: Any) -> dict[str, Any]:
    req = {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params}
    resp = await t.dispatcher.handle(req)
    assert resp["id"] == req["id"]
    return resp


async def ok(t: Target, method: str, **params: Any) -> Any:
    resp = await call(t, method, **params)
    assert "error" not in resp, resp
    return resp["result"]


async def err(t: Target, method: str, **params: Any) -> tuple[int, str]:
    resp = await call(t, method, **params)
    assert "result" not in resp, resp
    assert resp["error"]["code"] != -32603, resp["error"]
    return resp["error"]["code"], resp["error"]["message"]


async def test_rpc_pool_lifecycle(target: Target, pool_dir: Path) -> None:
    f = str(pool_dir / "pool")
    assert await ok(target, "bdev_pmem_create_pool", pmem_file=f, num_blocks=300,
                    block_size=4096) is True
    info = await ok(target, "bdev_pmem_get_pool_info", pmem_file=f)
    assert info[0]["num_blocks"] == 300 and info[0]["block_size"] == 4096
    assert info[0]["lanes"] == len(target.reactors) and info[0]["consistent"] is True
    assert await ok(target, "bdev_pmem_create", pmem_file=f, name="Pm0") == "Pm0"
    (desc,) = await ok(target, "bdev_get_bdevs", name="Pm0")
    assert desc["num_blocks"] == 300 and desc["write_cache"] is False
    assert desc["uuid"] == info[0]["uuid"], "the bdev takes the pool's UUID by default"
    assert desc["driver_specific"]["pmem"]["pmem_file"] == f
    assert desc["supported_io_types"]["unmap"] and desc["supported_io_types"]["write_zeroes"]
    in_use = await ok(target, "bdev_pmem_get_pool_info", pmem_file=f)
    assert in_use[0]["in_use_by"] == "Pm0"
    code, msg = await err(target, "bdev_pmem_delete_pool", pmem_file=f)
    assert code == EBUSY and "Pm0" in msg
    code, msg = await err(target, "bdev_pmem_create", pmem_file=f, name="Pm1")
    assert code == EBUSY
    code, msg = await err(target, "bdev_pmem_create_pool", pmem_file=f, num_blocks=300,
                          block_size=4096)
    assert code == EEXIST and "already exists" in msg
    assert await ok(target, "bdev_pmem_delete", name="Pm0") is True
    assert await ok(target, "bdev_pmem_delete_pool", pmem_file=f) is True
    assert not os.path.exists(f)
    # the generic method creates one too
    await ok(target, "bdev_pmem_create_pool", pmem_file=f, num_blocks=64, block_size=512,
             lanes=3, free_blocks_per_lane=1)
    assert await ok(target, "bdev_create", type="pmem", pmem_file=f, name="G0") == "G0"
    assert (await ok(target, "bdev_get_bdevs", name="G0"))[0]["driver_specific"]["pmem"][
        "lanes"] == 3
    assert await ok(target, "bdev_delete", name="G0") is True


async def test_rpc_errors(target: Target, pool_dir: Path) -> None:
    missing = str(pool_dir / "missing")
    for method in ("bdev_pmem_get_pool_info", "bdev_pmem_delete_pool"):
        code, msg = await err(target, method, pmem_file=missing)
        assert code == ENODEV and "does not exist" in msg
    code, msg = await err(target, "bdev_pmem_create", pmem_file=missing, name="X")
    assert code == ENODEV and missing in msg and "bdev_pmem_create_pool" in msg
    junk = pool_dir / "junk"
    junk.write_bytes(b"x" * 100_000)
    code, msg = await err(target, "bdev_pmem_delete_pool", pmem_file=str(junk))
    assert code == -32602 and "not a pmem pool" in msg
    assert junk.exists(), "a file that is not a pool is never deleted"
    code, _ = await err(target, "bdev_pmem_get_pool_info", pmem_file=str(junk))
    assert code == -32602
    f = str(pool_dir / "p")
    bad = [
        ({"num_blocks": 10, "block_size": 1000}, "block_size"),
        ({"num_blocks": 0, "block_size": 512}, "num_blocks"),
        ({"num_blocks": 10}, "block_size"),
        ({"num_blocks": "10", "block_size": 512}, "num_blocks"),
        ({"num_blocks": 10, "block_size": 512, "lanes": 0}, "lanes"),
        ({"num_blocks": 10, "block_size": 512, "bogus": 1}, "bogus"),
    ]
    for params, name in bad:
        code, msg = await err(target, "bdev_pmem_create_pool", pmem_file=f, **params)
        assert code == -32602 and name in msg, (params, msg)
    code, msg = await err(target, "bdev_pmem_create_pool", num_blocks=10, block_size=512)
    assert code == -32602 and "pmem_file" in msg
    code, msg = await err(target, "bdev_pmem_create", name="X")
    assert code == -32602 and "pmem_file" in msg
    code, msg = await err(target, "bdev_pmem_create", pmem_file=f, name="X", uuid="nope")
    assert code == -32602 and "uuid" in msg
    code, msg = await err(target, "bdev_pmem_create_pool", pmem_file=str(pool_dir / "no/pool"),
                          num_blocks=10, block_size=512)
    assert code == -errno.ENOENT and "cannot create" in msg
    code, msg = await err(target, "bdev_pmem_create_pool", pmem_file="/proc/nope/pool",
                          num_blocks=10, block_size=512)
    assert code == -errno.EACCES and "outside the allowed directories" in msg
    assert not os.path.exists(f)
    code, msg = await err(target, "bdev_pmem_delete", name="nope")
    assert code == ENODEV
    huge = str(pool_dir / "huge")  # more than the file system holds
    code, msg = await err(target, "bdev_pmem_create_pool", pmem_file=huge,
                          num_blocks=1 << 40, block_size=4096)
    assert code in (-errno.ENOSPC, -errno.EFBIG) and "cannot allocate" in msg
    assert not os.path.exists(huge), "a pool that could not be allocated is removed"


async def test_save_config_round_trip(pool_dir: Path) -> None:
    f = str(pool_dir / "pool")
    first = Target(settings())
    await ok(first, "bdev_pmem_create_pool", pmem_file=f, num_blocks=128, block_size=512)
    await ok(first, "bdev_pmem_create", pmem_file=f, name="Pm0")
    ch = first.bdevs.get("Pm0").get_io_channel(None)
    data = os.urandom(512 * 7)
    assert run_io(ch, IOType.WRITE, 100, 7, data).status == 0
    uuid_before = first.bdevs.get("Pm0").uuid
    doc = first.save_config()
    await first.stop()
    bdev_calls = doc["subsystems"][0]["config"]
    methods = [c["method"] for c in bdev_calls]
    assert methods == ["bdev_pmem_create"], "the pool itself is not part of the config"
    assert bdev_calls[0]["params"] == {"pmem_file": f, "name": "Pm0", "uuid": uuid_before}
    # a pool-creating call is not allowed in a config (an operator action, like mkfs)
    from blocktarget.rpc import REGISTRY

    assert REGISTRY.get("bdev_pmem_create_pool").in_config is False

    second = Target(settings())
    try:
        await second.apply_config(doc, "saved")
        b = second.bdevs.get("Pm0")
        assert b.uuid == uuid_before and b.num_blocks == 128
        got = bytes(run_io(b.get_io_channel(None), IOType.READ, 100, 7).buf)
        assert got == data
    finally:
        await second.stop()
