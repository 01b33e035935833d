"""The uring bdev against real files: data written through an IOChannel on a started
reactor must be in the file (read back with plain os.pread, not only through the bdev),
unmap must punch a real hole, and each fallback (buffered I/O, fallocate modes, the
threads engine, no io_uring at all) is reached through the condition that causes it
wherever this machine can produce it.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.bdev import MODULES, BdevIO, IOType, Status
from blocktarget.bdevs import uring  # registers the module (no other bdev type needed)
from blocktarget.errors import InvalidParams, RpcError, Unsupported
from blocktarget.params import validate
from blocktarget.reactor import Reactor

AVAILABLE = sorted(os.sched_getaffinity(0))
URING_WHY = uring.uring_unavailable_reason()
needs_uring = pytest.mark.skipif(URING_WHY is not None, reason=f"no io_uring: {URING_WHY}")
ENGINES = [pytest.param("uring", marks=needs_uring), "threads"]
MiB = 1 << 20


def make(**params: Any) -> uring.UringBdev:
    mod = MODULES["uring"]
    return mod.create(validate(mod.schema, {"name": "U0", **params}))


def new_file(path: Path, size: int = 4 * MiB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def odirect_ok(directory: str) -> bool:
    """Does this file system take O_DIRECT (tmpfs does since Linux 6.6)?"""
    p = os.path.join(directory, f".odirect-probe-{os.getpid()}")
    try:
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        if os.path.exists(p):
            os.unlink(p)
    os.close(fd)
    return True


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(0, AVAILABLE[-1])
    r.start()
    yield r
    r.stop()


@pytest.fixture(params=["disk", "shm"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the repo's disk (ext4 here: O_DIRECT) and one on /dev/shm (tmpfs)."""
    if request.param == "disk":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = Path(f"/dev/shm/bt-uring-test-{os.getpid()}-{id(request)}")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Driver:
    """Submits BdevIOs on the reactor thread and waits for their completions."""

    def __init__(self, reactor: Reactor, bdev: uring.UringBdev) -> None:
        self.r = reactor
        self.bdev = bdev
        self.ch = reactor.send(bdev.get_io_channel, reactor).result(5)

    def many(self, ios: list[BdevIO], timeout: float = 30) -> list[BdevIO]:
        fut: concurrent.futures.Future[list[BdevIO]] = concurrent.futures.Future()
        left = [len(ios)]
        on_reactor: list[bool] = []

        def done(io: BdevIO) -> None:
            on_reactor.append(self.r.on_reactor())
            left[0] -= 1
            if left[0] == 0:
                fut.set_result(ios)

        def go() -> None:
            for io in ios:
                io.cb = done
                self.ch.submit(io)

        self.r.send(go).result(5)
        out = fut.result(timeout)
        assert all(on_reactor), "completions must run on the channel's reactor"
        return out

    def io(self, t: IOType, off: int = 0, n: int = 0, buf: Any = None, *,
           fua: bool = False) -> BdevIO:
        return self.many([BdevIO(t, off, n, buf, fua=fua)])[0]

    def close(self) -> None:
        self.r.send(self.bdev.close_channel, self.r).result(5)


def file_bytes(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# ---- data through a started reactor ---------------------------------------------


@pytest.mark.parametrize("bs", [512, 4096])
@pytest.mark.parametrize("engine", ENGINES)
def test_data_path(reactor: Reactor, location: Path, engine: str, bs: int) -> None:
    path = new_file(location / "disk.img")
    b = make(filename=path, block_size=bs, engine=engine)
    assert b.direct == odirect_ok(str(location)), "O_DIRECT exactly where the fs has it"
    assert (b.block_size, b.num_blocks) == (bs, 4 * MiB // bs)
    d = Driver(reactor, b)
    try:
        data = os.urandom(8 * bs)
        assert d.io(IOType.WRITE, 3, 8, data).status == Status.SUCCESS
        assert d.io(IOType.FLUSH).status == Status.SUCCESS
        assert file_bytes(path, 3 * bs, 8 * bs) == data, "the bytes are in the file"

        # a read the caller gives no buffer for returns bytes (no second copy downstream)
        io = d.io(IOType.READ, 3, 8)
        assert io.status == Status.SUCCESS and isinstance(io.buf, bytes) and io.buf == data
        # into a caller's (unaligned) buffer, and into a slice of a larger one
        buf = bytearray(8 * bs + 1)
        view = memoryview(buf)[1:]
        assert d.io(IOType.READ, 3, 8, view).status == Status.SUCCESS
        assert bytes(view) == data

        # FUA write: acknowledged only once written with RWF_DSYNC
        fua = os.urandom(bs)
        assert d.io(IOType.WRITE, 20, 1, fua, fua=True).status == Status.SUCCESS
        assert file_bytes(path, 20 * bs, bs) == fua

        assert d.io(IOType.COMPARE, 3, 8, data).status == Status.SUCCESS
        bad = bytearray(data)
        bad[5 * bs + 7] ^= 0x40
        assert d.io(IOType.COMPARE, 3, 8, bytes(bad)).status == Status.COMPARE_FAILURE

        # write zeroes and unmap both read back as zeroes; neighbours untouched
        assert d.io(IOType.WRITE_ZEROES, 4, 2).status == Status.SUCCESS
        assert d.io(IOType.UNMAP, 8, 2).status == Status.SUCCESS
        got = d.io(IOType.READ, 3, 8).buf
        assert got[:bs] == data[:bs]
        assert got[bs:3 * bs] == bytes(2 * bs)
        assert got[3 * bs:5 * bs] == data[3 * bs:5 * bs]
        assert got[5 * bs:7 * bs] == bytes(2 * bs)
        assert got[7 * bs:] == data[7 * bs:]
        assert file_bytes(path, 3 * bs, 8 * bs) == got

        # the last block, and one past it
        tail = os.urandom(bs)
        assert d.io(IOType.WRITE, b.num_blocks - 1, 1, tail).status == Status.SUCCESS
        assert d.io(IOType.READ, b.num_blocks - 1, 1).buf == tail
        assert d.io(IOType.READ, b.num_blocks, 1).status == Status.LBA_OUT_OF_RANGE

        st = b.stats_total()
        assert st.ops[IOType.WRITE] == 3 and st.ops[IOType.FLUSH] == 1
        assert st.ops[IOType.COMPARE] == 1 and st.errors[IOType.COMPARE] == 1
        assert d.ch.outstanding == 0
    finally:
        d.close()
        b.destruct()


@pytest.mark.parametrize("engine", ENGINES)
def test_queue_deeper_than_the_ring(reactor: Reactor, tmp_path: Path, engine: str) -> None:
    """More I/O at once than RING_ENTRIES: the excess waits in the backlog, none is lost."""
    bs = 4096
    n = uring.RING_ENTRIES + 200
    path = new_file(tmp_path / "d.img", n * bs)
    b = make(filename=path, block_size=bs, engine=engine)
    d = Driver(reactor, b)
    try:
        blocks = [os.urandom(16) * (bs // 16) for _ in range(n)]
        ios = d.many([BdevIO(IOType.WRITE, i, 1, blocks[i]) for i in range(n)])
        assert all(io.status == Status.SUCCESS for io in ios)
        reads = d.many([BdevIO(IOType.READ, i, 1) for i in range(n)])
        assert [io.buf for io in reads] == blocks
        with open(path, "rb") as f:
            assert f.read() == b"".join(blocks)
    finally:
        d.close()
        b.destruct()


@needs_uring
@pytest.mark.parametrize("mode", ["eventfd", "poller", "hybrid"])
def test_reap_modes(reactor: Reactor, tmp_path: Path, mode: str,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way of noticing completions works; only the poller mode keeps a poller on
    an idle reactor (the other two let it sleep until the eventfd fires)."""
    monkeypatch.setattr(uring, "REAP_MODE", mode)
    path = new_file(tmp_path / "d.img")
    b = make(filename=path, block_size=4096)
    d = Driver(reactor, b)
    try:
        data = [os.urandom(4096) for _ in range(64)]
        d.many([BdevIO(IOType.WRITE, i, 1, data[i]) for i in range(64)])
        assert [io.buf for io in d.many([BdevIO(IOType.READ, i, 1) for i in range(64)])] == data
        pollers = reactor.send(lambda: [p.name for p in reactor.pollers]).result(5)
        assert pollers == (["uring"] if mode == "poller" else [])
    finally:
        d.close()
        b.destruct()
    assert reactor.send(lambda: list(reactor.pollers)).result(5) == []


@needs_uring
def test_one_ring_per_reactor(tmp_path: Path) -> None:
    """Two bdevs on one reactor share its ring; another reactor has its own; the ring
    goes away with the last channel on its reactor."""
    r1, r2 = Reactor(0, AVAILABLE[0]), Reactor(1, AVAILABLE[-1])
    r1.start()
    r2.start()
    a = make(name="A", filename=new_file(tmp_path / "a.img"))
    b = make(name="B", filename=new_file(tmp_path / "b.img"))
    try:
        a1 = r1.send(a.get_io_channel, r1).result(5)
        b1 = r1.send(b.get_io_channel, r1).result(5)
        a2 = r2.send(a.get_io_channel, r2).result(5)
        assert a1.ring is b1.ring and a1.ring is not a2.ring
        assert a1.ring.users == 2
        ring1 = a1.ring
        r1.send(a.close_channel, r1).result(5)
        assert ring1.ring is not None and ring1.users == 1
        r1.send(b.close_channel, r1).result(5)
        assert ring1.ring is None and r1 not in uring._Ring._rings
        r2.send(a.close_channel, r2).result(5)
        assert not uring._Ring._rings
    finally:
        r1.stop()
        r2.stop()
        a.destruct()
        b.destruct()


@needs_uring
def test_channel_closed_with_io_in_flight(reactor: Reactor, tmp_path: Path) -> None:
    """Closing the last channel while I/O is in flight: the I/O still completes, then
    the ring is freed."""
    b = make(filename=new_file(tmp_path / "d.img"), block_size=4096)
    ch = reactor.send(b.get_io_channel, reactor).result(5)
    ring = ch.ring
    fut: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
    statuses: list[int] = []

    def done(io: BdevIO) -> None:
        statuses.append(io.status)
        if len(statuses) == 32:
            fut.set_result(statuses)

    def go() -> None:
        for i in range(32):
            ch.submit(BdevIO(IOType.WRITE, i, 1, bytes(4096), done))
        b.close_channel(reactor)  # same loop pass: nothing has been reaped yet

    reactor.send(go).result(5)
    assert fut.result(10) == [Status.SUCCESS] * 32
    assert reactor.send(lambda: ring.ring).result(5) is None
    b.destruct()


def test_without_a_reactor_completes_inline(tmp_path: Path) -> None:
    """`get_io_channel(None)` (tools, tests): each I/O completes before submit returns."""
    path = new_file(tmp_path / "d.img")
    for engine in ("uring", "threads") if URING_WHY is None else ("threads",):
        b = make(filename=path, block_size=512, engine=engine)
        ch = b.get_io_channel(None)
        done: list[BdevIO] = []
        ch.submit(BdevIO(IOType.WRITE, 1, 2, b"\x5a" * 1024, done.append))
        ch.submit(BdevIO(IOType.READ, 1, 2, None, done.append))
        assert [io.status for io in done] == [0, 0] and done[1].buf == b"\x5a" * 1024
        b.close_channel(None)
        b.destruct()


# ---- unmap / write zeroes: real holes, and the fallbacks ----------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_unmap_punches_a_hole(reactor: Reactor, tmp_path: Path, engine: str) -> None:
    path = new_file(tmp_path / "d.img")
    b = make(filename=path, block_size=4096, engine=engine)
    d = Driver(reactor, b)
    try:
        d.io(IOType.WRITE, 0, 256, os.urandom(MiB))
        d.io(IOType.FLUSH)
        before = os.stat(path).st_blocks
        assert before >= MiB // 512
        assert d.io(IOType.UNMAP, 0, 256).status == Status.SUCCESS
        assert os.stat(path).st_blocks <= before - MiB // 512, "the blocks were freed"
        assert d.io(IOType.READ, 0, 256).buf == bytes(MiB)
        assert b.unmap_modes[0] == uring.PUNCH
    finally:
        d.close()
        b.destruct()


@pytest.mark.parametrize("engine", ENGINES)
def test_write_zeroes_falls_back_where_zero_range_is_missing(
        reactor: Reactor, engine: str) -> None:
    """tmpfs has PUNCH_HOLE but no ZERO_RANGE: the first write zeroes learns that and
    the bdev stops asking; ext4 keeps ZERO_RANGE."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d_ = Path(f"/dev/shm/bt-uring-wz-{os.getpid()}")
    d_.mkdir()
    try:
        b = make(filename=new_file(d_ / "d.img"), block_size=4096, engine=engine)
        d = Driver(reactor, b)
        d.io(IOType.WRITE, 0, 4, b"\xee" * 16384)
        assert d.io(IOType.WRITE_ZEROES, 1, 2).status == Status.SUCCESS
        assert uring.ZERO not in b.zero_modes and b.zero_modes[0] == uring.PUNCH
        assert d.io(IOType.READ, 0, 4).buf == b"\xee" * 4096 + bytes(8192) + b"\xee" * 4096
        d.close()
        b.destruct()
    finally:
        shutil.rmtree(d_, ignore_errors=True)


@needs_uring
def test_fallocate_on_a_thread_when_the_ring_lacks_it(
        reactor: Reactor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.6 have no IORING_OP_FALLOCATE; the ring's probe says so and
    unmap/write zeroes go to the bdev's worker threads (the probe result is forced here:
    this kernel has the opcode)."""
    b = make(filename=new_file(tmp_path / "d.img"), block_size=4096)
    d = Driver(reactor, b)
    monkeypatch.setattr(d.ch.ring, "fallocate_ok", False)
    try:
        d.io(IOType.WRITE, 0, 8, b"\x11" * 8 * 4096)
        assert d.io(IOType.UNMAP, 0, 2).status == Status.SUCCESS
        assert d.io(IOType.WRITE_ZEROES, 6, 2).status == Status.SUCCESS
        assert d.io(IOType.READ, 0, 8).buf == bytes(8192) + b"\x11" * 16384 + bytes(8192)
        assert b._executor is not None, "the work went to the worker threads"
    finally:
        d.close()
        b.destruct()


@pytest.mark.parametrize("engine", ENGINES)
def test_file_shrunk_under_the_bdev_is_a_read_error(
        reactor: Reactor, tmp_path: Path, engine: str) -> None:
    """A read across the new end of file gets a short transfer, is continued, hits EOF
    and fails as an unrecovered read error; it does not return stale or partial data."""
    path = new_file(tmp_path / "d.img", MiB)
    b = make(filename=path, block_size=4096, engine=engine)
    d = Driver(reactor, b)
    try:
        os.truncate(path, 10 * 4096)
        assert d.io(IOType.READ, 8, 4).status == Status.UNRECOVERED_READ_ERROR
        assert d.io(IOType.READ, 8, 2).status == Status.SUCCESS
        assert b.stats_total().errors[IOType.READ] == 1
    finally:
        d.close()
        b.destruct()


# ---- create: parameters, detection, errors ------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_default_block_size_and_config_entry(tmp_path: Path, engine: str) -> None:
    """The default engine is io_uring (left out of the create call here); the threads
    engine is named explicitly and saved as such."""
    path = new_file(tmp_path / "d.img", MiB + 100)
    chosen = {} if engine == "uring" else {"engine": engine}
    b = make(filename=path, uuid="5f1b1c1e-0d4c-4d4e-9a52-1b2c3d4e5f60", **chosen)
    try:
        assert (b.block_size, b.num_blocks) == (512, 2048), "a partial last block is cut"
        assert b.write_cache is True, "a file has a volatile cache: the page cache/disk"
        desc = b.describe()
        assert desc["driver_specific"]["uring"]["filename"] == path
        assert desc["supported_io_types"]["unmap"] and desc["supported_io_types"]["compare"]
        assert b.config_entry() == {
            "method": "bdev_uring_create",
            "params": {"name": "U0", "filename": path, "block_size": 512, "engine": engine,
                       "uuid": "5f1b1c1e-0d4c-4d4e-9a52-1b2c3d4e5f60"},
        }
        again = MODULES["uring"].create(validate(MODULES["uring"].schema,
                                                 b.config_entry()["params"]))
        assert (again.block_size, again.num_blocks, again.uuid) == (
            b.block_size, b.num_blocks, b.uuid)
        again.destruct()
    finally:
        b.destruct()


@pytest.mark.parametrize(("params", "code", "text"), [
    ({"block_size": 1000}, -32602, "power of two"),
    ({"block_size": 256}, -32602, "power of two"),
    ({"engine": "aio"}, -32602, "'engine' must be one of"),
    ({"filename": ""}, -32602, "must not be empty"),
    ({"filename": "/nonexistent/disk.img"}, -errno.ENOENT,
     "cannot open '/nonexistent/disk.img': No such file or directory"),
    ({"filename": "/"}, -32602, "not a regular file or a block device"),
    ({"filename": "/dev/null"}, -32602, "not a regular file or a block device"),
    ({"size": 4}, -32602, "unknown parameter 'size'"),
])
@pytest.mark.parametrize("engine", ENGINES)
def test_create_errors(tmp_path: Path, params: dict[str, Any], code: int, text: str,
                       engine: str) -> None:
    p = {"filename": new_file(tmp_path / "d.img"), "engine": engine, **params}
    with pytest.raises(RpcError) as ei:
        make(**p)
    assert ei.value.code == code and text in ei.value.message, ei.value.message


@pytest.mark.parametrize("engine", ENGINES)
def test_create_errors_file_too_small_and_unreadable(tmp_path: Path, engine: str) -> None:
    empty = new_file(tmp_path / "empty.img", 0)
    with pytest.raises(InvalidParams, match="smaller than one block"):
        make(filename=empty, engine=engine)
    small = new_file(tmp_path / "small.img", 2048)
    with pytest.raises(InvalidParams, match=r"2048 bytes < 4096"):
        make(filename=small, block_size=4096, engine=engine)
    if os.geteuid() != 0:  # root opens anything
        ro = new_file(tmp_path / "ro.img")
        os.chmod(ro, 0o400)
        with pytest.raises(RpcError) as ei:
            make(filename=ro, engine=engine)
        assert ei.value.code == -errno.EACCES


def fds_open_on(path: str) -> list[int]:
    """This process's file descriptors that refer to ``path``."""
    target = os.path.realpath(path)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                out.append(int(fd))
        except FileNotFoundError:  # closed since the listing (by another thread)
            pass
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_no_fd_leak_on_failed_create(tmp_path: Path, engine: str) -> None:
    """A create refused after opening the file (too small for one block) closes it.
    Checked by what the fds refer to rather than by their count: the count of this
    pytest process also moves with other threads and with the garbage collector closing
    sockets earlier tests dropped."""
    small = new_file(tmp_path / "small.img", 1024)
    for _ in range(20):
        with pytest.raises(InvalidParams):
            make(filename=small, block_size=4096, engine=engine)
    assert fds_open_on(small) == []


def test_missing_extension_is_a_clear_create_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What an install without liburing-dev sees: the uring engine names the cause and
    the way out; the threads engine still works."""
    monkeypatch.setattr(uring, "lib", None)
    monkeypatch.setattr(uring, "_IMPORT_ERROR", "No module named 'blocktarget._uring'")
    monkeypatch.setattr(uring, "_probe_result", False)
    path = new_file(tmp_path / "d.img")
    with pytest.raises(Unsupported) as ei:
        make(filename=path)
    msg = ei.value.message
    assert ei.value.code == -errno.EOPNOTSUPP
    assert "liburing-dev" in msg and "\"engine\": \"threads\"" in msg, msg
    make(name="T", filename=path, engine="threads").destruct()
    monkeypatch.setattr(uring, "_probe_result", False)  # forget the simulated verdict


SECCOMP_CHILD = textwrap.dedent(r"""
    import ctypes, json, struct, sys
    # a seccomp filter making io_uring_setup (425) fail with EPERM, as container
    # runtimes' default profiles do
    ins = [(0x20, 0, 0, 0), (0x15, 0, 1, 425), (0x06, 0, 0, 0x00050000 | 1),
           (0x06, 0, 0, 0x7FFF0000)]
    prog_bytes = b"".join(struct.pack("HBBI", *i) for i in ins)
    buf = ctypes.create_string_buffer(prog_bytes)
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Prog(len(ins), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()
    from blocktarget.bdev import MODULES, BdevIO, IOType
    from blocktarget.bdevs import uring  # noqa
    from blocktarget.errors import RpcError
    from blocktarget.params import validate
    mod = MODULES["uring"]
    out = {}
    try:
        mod.create(validate(mod.schema, {"name": "U", "filename": sys.argv[1]}))
    except RpcError as exc:
        out["uring"] = [exc.code, exc.message]
    b = mod.create(validate(mod.schema, {"name": "T", "filename": sys.argv[1],
                                         "engine": "threads"}))
    done = []
    ch = b.get_io_channel(None)
    ch.submit(BdevIO(IOType.WRITE, 0, 1, b"\x42" * 512, done.append))
    ch.submit(BdevIO(IOType.READ, 0, 1, None, done.append))
    out["threads"] = [done[0].status, done[1].buf == b"\x42" * 512]
    print(json.dumps(out))
""")


@needs_uring
def test_seccomp_forbidding_io_uring(tmp_path: Path) -> None:
    """A real seccomp filter on io_uring_setup (what Docker's default profile does):
    create names the reason; "engine": "threads" works in the same process."""
    path = new_file(tmp_path / "d.img")
    p = subprocess.run([sys.executable, "-c", SECCOMP_CHILD, path], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    code, msg = out["uring"]
    assert code == -errno.EOPNOTSUPP
    assert "EPERM" in msg and "seccomp" in msg and "\"engine\": \"threads\"" in msg, msg
    assert out["threads"] == [0, True]


# ---- buffered fallback and block devices (need privileges to set up) ----------------

RAMFS_CHILD = textwrap.dedent(r"""
    import json, logging, os, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from blocktarget.bdev import MODULES, BdevIO, IOType
    from blocktarget.bdevs import uring  # noqa
    from blocktarget.params import validate
    from blocktarget.reactor import Reactor
    import concurrent.futures
    path = os.path.join(sys.argv[1], "d.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    mod = MODULES["uring"]
    r = Reactor(0, sorted(os.sched_getaffinity(0))[0])
    r.start()
    out = {}
    for engine in sys.argv[2:]:
        b = mod.create(validate(mod.schema, {"name": "U", "filename": path,
                                             "block_size": 4096, "engine": engine}))
        ch = r.send(b.get_io_channel, r).result()
        def run(io):
            fut = concurrent.futures.Future()
            io.cb = fut.set_result
            r.send(ch.submit, io).result()
            return fut.result(10)
        data = os.urandom(8192)
        w = run(BdevIO(IOType.WRITE, 2, 2, data, fua=True))
        f = run(BdevIO(IOType.FLUSH))
        z = run(BdevIO(IOType.WRITE_ZEROES, 3, 1))
        rd = run(BdevIO(IOType.READ, 2, 2))
        with open(path, "rb") as fh:
            fh.seek(8192)
            on_disk = fh.read(8192)
        out[engine] = {"direct": b.direct, "status": [w.status, f.status, z.status, rd.status],
                       "data": rd.buf == data[:4096] + bytes(4096) == on_disk}
        r.send(b.close_channel, r).result()
        b.destruct()
    r.stop()
    print(json.dumps(out))
""")


def test_buffered_fallback_on_a_filesystem_without_o_direct(tmp_path: Path) -> None:
    """ramfs has no O_DIRECT (tmpfs has it since Linux 6.6): the bdev warns and uses the
    page cache. ramfs is mounted in a private mount namespace (unshare -m), so nothing
    outside the test sees it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.xfail("unshare(1) not installed: cannot mount a ramfs privately")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    engines = ["uring", "threads"] if URING_WHY is None else ["threads"]
    script = (f"mount -t ramfs ramfs {mnt} && exec {sys.executable} -c \"$CHILD\" {mnt} "
              + " ".join(engines))
    p = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, CHILD=RAMFS_CHILD))
    if p.returncode != 0 and ("Operation not permitted" in p.stderr
                              or "permission denied" in p.stderr.lower()):
        pytest.xfail(f"no privilege for a private ramfs mount: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for engine in engines:
        assert out[engine] == {"direct": False, "status": [0, 0, 0, 0], "data": True}
    assert "using buffered I/O through the page cache" in p.stderr
    assert "does not support O_DIRECT" in p.stderr


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 16 MiB loop device with 4096-byte logical blocks (root only)."""
    losetup = shutil.which("losetup")
    if losetup is None or os.geteuid() != 0:
        pytest.xfail("loop devices need root and losetup(8)")
    backing = new_file(tmp_path / "backing.img", 16 * MiB)
    p = subprocess.run([losetup, "--find", "--show", "--sector-size", "4096", backing],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        pytest.xfail(f"cannot set up a loop device here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "-d", dev], capture_output=True, timeout=30)


@pytest.mark.parametrize("engine", ENGINES)
def test_block_device(reactor: Reactor, loop_device: str, engine: str,
                      caplog: pytest.LogCaptureFixture) -> None:
    """Size from BLKGETSIZE64 and block size from BLKSSZGET; O_DIRECT at the device's
    block size, buffered (with a warning) when asked for smaller blocks."""
    b = make(filename=loop_device, engine=engine)
    try:
        assert (b.block_size, b.num_blocks, b.block_device, b.direct) == (
            4096, 4096, True, True)
        d = Driver(reactor, b)
        data = os.urandom(3 * 4096)
        assert d.io(IOType.WRITE, 1, 3, data, fua=True).status == Status.SUCCESS
        assert d.io(IOType.FLUSH).status == Status.SUCCESS
        assert d.io(IOType.READ, 1, 3).buf == data
        assert d.io(IOType.UNMAP, 2, 1).status == Status.SUCCESS
        assert d.io(IOType.WRITE_ZEROES, 3, 1).status == Status.SUCCESS
        assert d.io(IOType.READ, 1, 3).buf == data[:4096] + bytes(8192)
        assert file_bytes(loop_device, 4096, 3 * 4096) == data[:4096] + bytes(8192)
        d.close()
    finally:
        b.destruct()
    small = make(name="small", filename=loop_device, block_size=512, engine=engine)
    try:
        assert (small.block_size, small.num_blocks, small.direct) == (512, 32768, False)
        assert "below the device's logical block size 4096" in caplog.text
        d = Driver(reactor, small)
        assert d.io(IOType.WRITE, 1, 1, b"\x33" * 512).status == Status.SUCCESS
        assert d.io(IOType.READ, 0, 3).buf == bytes(512) + b"\x33" * 512 + bytes(512)
        d.close()
    finally:
        small.destruct()


class _Recorder:
    """Stands in for the cffi `lib`, recording the rw_flags of each read/write SQE."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.rw_flags: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def bt_prep_rw(self, ring: Any, write: int, fd: int, buf: Any, n: int, off: int,
                   flags: int, ud: int) -> int:
        self.rw_flags.append((write, flags))
        return self._real.bt_prep_rw(ring, write, fd, buf, n, off, flags, ud)


@pytest.mark.parametrize("engine", ENGINES)
def test_fua_write_is_a_dsync_write(reactor: Reactor, tmp_path: Path, engine: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """FUA reaches the kernel as RWF_DSYNC on that one write (O_DIRECT+RWF_DSYNC is a FUA
    write on the device); plain writes do not pay for it."""
    seen: list[tuple[int, int]] = []
    if engine == "uring":
        rec = _Recorder(uring.lib)
        monkeypatch.setattr(uring, "lib", rec)
        seen = rec.rw_flags
    else:
        real = os.pwritev

        def pwritev(fd: int, bufs: Any, off: int, flags: int = 0) -> int:
            seen.append((1, flags))
            return real(fd, bufs, off, flags)

        monkeypatch.setattr(os, "pwritev", pwritev)
    b = make(filename=new_file(tmp_path / "d.img"), block_size=4096, engine=engine)
    d = Driver(reactor, b)
    try:
        assert d.io(IOType.WRITE, 0, 1, bytes(4096)).status == Status.SUCCESS
        assert d.io(IOType.WRITE, 1, 1, bytes(4096), fua=True).status == Status.SUCCESS
        assert [f for w, f in seen if w] == [0, os.RWF_DSYNC]
    finally:
        d.close()
        b.destruct()


@pytest.mark.parametrize("engine", ENGINES)
def test_readonly_as_spdk_configs_write_it(reactor: Reactor, tmp_path: Path,
                                           engine: str) -> None:
    """SPDK's saved bdev_aio_create carries readonly and fallocate: both load; readonly
    opens the file O_RDONLY and refuses writes, unmap and write zeroes."""
    path = new_file(tmp_path / "d.img")
    with open(path, "r+b") as f:
        f.write(b"\x77" * 4096)
    os.chmod(path, 0o444)
    b = make(filename=path, block_size=4096, engine=engine, readonly=True, fallocate=False)
    d = Driver(reactor, b)
    try:
        assert os.readlink(f"/proc/self/fd/{b.fd}") == path
        assert os.O_ACCMODE & int(Path(f"/proc/self/fdinfo/{b.fd}").read_text().split()[3], 8) == (
            os.O_RDONLY)
        assert d.io(IOType.READ, 0, 1).buf == b"\x77" * 4096
        for t in (IOType.WRITE, IOType.UNMAP, IOType.WRITE_ZEROES):
            io = d.io(t, 0, 1, bytes(4096) if t == IOType.WRITE else None)
            assert io.status == Status.INVALID_OPCODE
        assert d.io(IOType.FLUSH).status == Status.SUCCESS
        assert b.describe()["driver_specific"]["uring"]["readonly"] is True
        assert b.config_entry()["params"]["readonly"] is True
    finally:
        d.close()
        b.destruct()


FOURK_CHILD = textwrap.dedent(r"""
    import json, logging, os, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from blocktarget.bdev import MODULES, BdevIO, IOType
    from blocktarget.bdevs import uring  # noqa
    from blocktarget.params import validate
    path = os.path.join(sys.argv[1], "d.img")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
    mod = MODULES["uring"]
    out = {}
    for label, bs in (("detected", None), ("asked 512", 512)):
        p = {"name": "U", "filename": path, "engine": sys.argv[2]}
        if bs:
            p["block_size"] = bs
        b = mod.create(validate(mod.schema, p))
        ch = b.get_io_channel(None)
        done = []
        data = os.urandom(b.block_size)
        ch.submit(BdevIO(IOType.WRITE, 3, 1, data, done.append))
        ch.submit(BdevIO(IOType.READ, 3, 1, None, done.append))
        out[label] = [b.block_size, b.direct, [d.status for d in done], done[1].buf == data]
        b.close_channel(None)
        b.destruct()
    print(json.dumps(out))
""")


@pytest.mark.parametrize("engine", ENGINES)
def test_file_on_a_4k_sector_file_system(loop_device: str, tmp_path: Path,
                                         engine: str) -> None:
    """ext4 on a disk with 4096-byte sectors: O_DIRECT refuses 512-byte I/O. With no
    block_size the bdev takes 4096 and keeps O_DIRECT; asked for 512 it goes buffered
    with a warning. (mkfs + mount in a private mount namespace.)"""
    if shutil.which("mkfs.ext4") is None or shutil.which("unshare") is None:
        pytest.xfail("needs mkfs.ext4 and unshare(1)")
    mk = subprocess.run(["mkfs.ext4", "-q", "-F", loop_device], capture_output=True,
                        text=True, timeout=60)
    assert mk.returncode == 0, mk.stderr
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    script = (f"mount -t ext4 {loop_device} {mnt} && exec {sys.executable} -c \"$CHILD\" "
              f"{mnt} {engine}")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, CHILD=FOURK_CHILD))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["detected"] == [4096, True, [0, 0], True]
    assert out["asked 512"] == [512, False, [0, 0], True]
    assert "O_DIRECT refuses 512-byte blocks here" in p.stderr


def _shared_anon_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("/dev/zero" in line for line in f)


@pytest.mark.parametrize("engine", ENGINES)
def test_closed_channel_unmaps_its_pool_buffers(tmp_path: Path, engine: str) -> None:
    """A channel's aligned buffers (MAP_SHARED anonymous mmaps) go with the channel, not
    whenever the collector runs: opened and closed N times, the count returns."""
    import gc

    path = new_file(tmp_path / "d.img")
    b = make(filename=path, block_size=512, engine=engine)
    try:
        gc.collect()
        gc.disable()  # (so only close() can be what unmaps them)
        start = _shared_anon_mappings()
        for _ in range(4):
            ch = b.get_io_channel(None)
            done: list[BdevIO] = []
            # unaligned caller buffers: each I/O goes through a pool buffer
            for n in (1, 2, 4, 16, 64):
                ch.submit(BdevIO(IOType.WRITE, 1, n, memoryview(bytes(n * 512 + 1))[1:],
                                 done.append))
                ch.submit(BdevIO(IOType.READ, 1, n, None, done.append))
            assert [io.status for io in done] == [0] * 10
            assert sum(len(v) for v in ch.pool.free.values()) >= 1
            del done, ch
            b.close_channel(None)
            assert _shared_anon_mappings() == start
    finally:
        gc.enable()
        b.destruct()
