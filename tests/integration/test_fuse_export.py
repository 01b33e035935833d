"""`blocktarget fuse-export` and the fuse_export_* RPCs against a real target process.

Local tools (fio, mkfs.ext4, e2fsck) reach the namespace through the exported file, the
way a host without nvme-tcp would. Skipped with the reason when /dev/fuse cannot be
used here; under CI=true (CI has /dev/fuse) that is a failure instead. Every mount is
unmounted in teardown, whatever the test did.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktarget.bdevs import uring

from .target_proc import (
    Launcher,
    RunningTarget,
    blocktarget_cmd,
    config,
    free_port,
    listen_address,
    malloc,
)

NQN = "nqn.2026-01.io.blocktarget:fuse"
MiB = 1 << 20
ENGINE = "uring" if uring.uring_unavailable_reason() is None else "threads"
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def _fuse_why() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 missing (Debian package fuse3), needed to unmount"
    if os.geteuid() != 0:
        return "not root: mounting would go through fusermount3 (covered by CI as root)"
    return None


@pytest.fixture(autouse=True)
def _need_fuse() -> None:
    why = _fuse_why()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"FUSE unusable in CI: {why}")
        pytest.skip(why)


def _mounted(path: Path) -> bool:
    """From /proc/mounts: stat(2) of a mount whose server died fails with ENOTCONN, so
    `mountpoint` would call it unmounted and leave it behind."""
    with open("/proc/mounts", encoding="utf-8") as fh:
        points = [line.split()[1].encode().decode("unicode_escape") for line in fh]
    return str(path) in points


def _unmount(path: Path) -> None:
    if _mounted(path):
        if subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False,
                          capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "mnt"
    d.mkdir()
    try:
        yield d
    finally:
        _unmount(d)


def export_config(port: int, bdevs: list[dict[str, Any]]) -> dict[str, Any]:
    nvmf: list[dict[str, Any]] = [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
    ]
    for i, b in enumerate(bdevs, 1):
        nvmf.append({"method": "nvmf_subsystem_add_ns",
                     "params": {"nqn": NQN,
                                "namespace": {"bdev_name": b["params"]["name"], "nsid": i}}})
    nvmf.append({"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": listen_address(port)}})
    return config(bdevs, nvmf)


class FuseExport:
    """One `blocktarget fuse-export` process."""

    def __init__(self, port: int, mountpoint: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.mountpoint = mountpoint
        self.log = mountpoint.parent / f"fuse-{mountpoint.name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                blocktarget_cmd("fuse-export", "-a", "127.0.0.1", "-s", str(port), "-n", NQN,
                                "-v", *args, str(mountpoint)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, **(env or {})))

    def wait_ready(self, name: str = "nvme0n1", timeout: float = 20.0) -> Path:
        deadline = time.monotonic() + timeout
        f = self.mountpoint / name
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fuse-export exited {self.proc.returncode}:\n"
                                     f"{self.output()}")
            if b"fuse-export: " in self.log.read_bytes() and f.exists():
                return f
            time.sleep(0.05)
        raise AssertionError(f"fuse-export not ready:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"fuse-export ignored signal {sig}:\n{self.output()}") from None


@pytest.fixture
def exports() -> Iterator[list[FuseExport]]:
    made: list[FuseExport] = []
    try:
        yield made
    finally:
        for e in made:
            if e.proc.poll() is None:
                e.proc.kill()
                e.proc.wait(10)
            _unmount(e.mountpoint)


def _start(exports: list[FuseExport], port: int, mountpoint: Path, *args: str,
           **kw: Any) -> tuple[FuseExport, Path]:
    e = FuseExport(port, mountpoint, *args, **kw)
    exports.append(e)
    return e, e.wait_ready()


def _malloc_target(running_target: Launcher, mib: int = 64,
                   block_size: int = 4096) -> tuple[RunningTarget, int]:
    port = free_port()
    t = running_target(export_config(port, [malloc("M0", mib * MiB // block_size,
                                                   block_size)]))
    return t, port


def _fio(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    if shutil.which("fio") is None:
        pytest.fail("fio is missing (Debian package fio, in scripts/system-deps.sh)")
    # no verify state files left in the working directory
    return subprocess.run(["fio", "--output-format=terse", "--verify_state_save=0", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _punch(fd: int, off: int, length: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(off),
                      ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---- data path -------------------------------------------------------------------------


def test_fio_verify_random_4k_and_sequential_128k(running_target: Launcher, mnt: Path,
                                                   exports: list[FuseExport]) -> None:
    _t, port = _malloc_target(running_target)
    e, f = _start(exports, port, mnt)
    r = _fio("--name=rand4k", f"--filename={f}", "--size=16m", "--rw=randwrite", "--bs=4k",
             "--direct=1", "--ioengine=libaio", "--iodepth=16", "--verify=crc32c",
             "--do_verify=1")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _fio("--name=seq128k", f"--filename={f}", "--size=32m", "--offset=16m", "--rw=write",
             "--bs=128k", "--ioengine=psync", "--numjobs=1", "--verify=crc32c")
    assert r.returncode == 0, r.stdout + r.stderr
    # concurrent writers to one file (FOPEN_PARALLEL_DIRECT_WRITES), each its own region
    r = _fio("--name=par", f"--filename={f}", "--size=8m", "--offset_increment=8m",
             "--numjobs=4", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=psync",
             "--verify=crc32c", "--group_reporting")
    assert r.returncode == 0, r.stdout + r.stderr
    assert e.stop() == 0, e.output()
    assert not _mounted(mnt)


def test_mkfs_ext4_then_e2fsck_clean(running_target: Launcher, mnt: Path,
                                     exports: list[FuseExport]) -> None:
    _t, port = _malloc_target(running_target)
    e, f = _start(exports, port, mnt)
    # mkfs discards the whole file first (fallocate punch-hole -> Deallocate)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", str(f)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["e2fsck", "-f", "-n", str(f)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert e.stop() == 0


def test_unaligned_rmw_punch_hole_and_fsync(running_target: Launcher, mnt: Path,
                                            exports: list[FuseExport]) -> None:
    _t, port = _malloc_target(running_target, block_size=512)
    _e, f = _start(exports, port, mnt)
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"A" * 8192, 0)
        os.pwrite(fd, b"hello", 510)  # straddles two 512-byte blocks
        expect = bytearray(b"A" * 8192)
        expect[510:515] = b"hello"
        assert os.pread(fd, 8192, 0) == expect
        # many small writes sharing blocks, concurrently: none may lose another's bytes
        threads = [threading.Thread(target=os.pwrite,
                                    args=(fd, bytes([65 + i]) * 7, 4096 + 7 * i))
                   for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = os.pread(fd, 280, 4096)
        assert got == b"".join(bytes([65 + i]) * 7 for i in range(40))
        os.fsync(fd)
        before = os.pread(fd, 8192, 0)
        _punch(fd, 100, 4000)  # partial edges zeroed by writes, whole blocks deallocated
        got = os.pread(fd, 8192, 0)
        assert got[:100] == expect[:100] and got[100:4100] == bytes(4000)
        assert got[4100:] == before[4100:]
    finally:
        os.close(fd)


@pytest.fixture
def open_mnt() -> Iterator[Path]:
    """A mountpoint other users can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="bt-fuse-", dir="/tmp"))
    d.chmod(0o755)
    (d / "mnt").mkdir()
    try:
        yield d / "mnt"
    finally:
        _unmount(d / "mnt")
        shutil.rmtree(d, ignore_errors=True)


def test_size_permissions_and_end_of_device(running_target: Launcher, open_mnt: Path,
                                            exports: list[FuseExport]) -> None:
    mnt = open_mnt
    _t, port = _malloc_target(running_target, mib=8)
    _e, f = _start(exports, port, mnt, "--allow-other")
    st = f.stat()
    assert st.st_size == 8 * MiB
    assert oct(st.st_mode & 0o777) == oct(0o600) and st.st_uid == os.getuid()
    assert [p.name for p in mnt.iterdir()] == ["nvme0n1"]
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x" * 4096, 8 * MiB)
        assert exc.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 4096, 8 * MiB - 1024) == 1024  # cut at the end
        assert os.pread(fd, 4096, 8 * MiB) == b""
        with pytest.raises(OSError) as exc:
            os.truncate(f, 4 * MiB)
        assert exc.value.errno == errno.EPERM
    finally:
        os.close(fd)
    # another user: the mode is enforced (default_permissions)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run([*nobody, "head", "-c1", str(f)], capture_output=True, text=True,
                       check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    os.chmod(f, 0o644)
    assert f.stat().st_mode & 0o777 == 0o644
    r = subprocess.run([*nobody, "head", "-c1", str(f)], capture_output=True, check=False)
    assert r.returncode == 0


# ---- connection loss -------------------------------------------------------------------


def _uring_target(running_target: Launcher, tmp_path: Path, port: int) -> RunningTarget:
    img = tmp_path / "disk.img"
    if not img.exists():
        with open(img, "wb") as fh:
            fh.truncate(16 * MiB)
    bdev = {"method": "bdev_uring_create",
            "params": {"name": "U0", "filename": str(img), "block_size": 4096,
                       "engine": ENGINE}}
    return running_target(export_config(port, [bdev]))


def test_target_restart_during_io_loses_no_acknowledged_write(
        running_target: Launcher, tmp_path: Path, mnt: Path,
        exports: list[FuseExport]) -> None:
    port = free_port()
    t = _uring_target(running_target, tmp_path, port)
    e, f = _start(exports, port, mnt, "--reconnect-delay", "0.2", "--ctrl-loss-tmo", "60")
    nblocks = 256
    acked: dict[int, int] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def block(i: int, gen: int) -> bytes:
        return (f"{i:08d}:{gen:08d}:".encode() * 300)[:4096]

    def writer() -> None:
        fd = os.open(f, os.O_RDWR)
        try:
            gen = 0
            while not stop.is_set():
                gen += 1
                for i in range(nblocks):
                    os.pwrite(fd, block(i, gen), i * 4096)
                    acked[i] = gen
                os.fsync(fd)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            os.close(fd)

    th = threading.Thread(target=writer)
    th.start()
    try:
        time.sleep(0.5)
        assert not errors
        t.kill()  # kill -9: acknowledged writes are in the file's page cache
        time.sleep(0.5)
        _uring_target(running_target, tmp_path, port)
        time.sleep(1.5)
    finally:
        stop.set()
        th.join(60)
    assert not errors, f"{errors}\n{e.output()}"
    assert "reconnected" in e.output()
    fd = os.open(f, os.O_RDONLY)
    try:
        for i in range(nblocks):
            assert os.pread(fd, 4096, i * 4096) == block(i, acked[i]), f"block {i}"
    finally:
        os.close(fd)
    assert e.stop() == 0, e.output()


def test_target_gone_past_ctrl_loss_tmo_fails_with_eio_then_heals(
        running_target: Launcher, tmp_path: Path, mnt: Path,
        exports: list[FuseExport]) -> None:
    port = free_port()
    t = _uring_target(running_target, tmp_path, port)
    e, f = _start(exports, port, mnt, "--reconnect-delay", "0.2", "--ctrl-loss-tmo", "1.5",
                  "--timeout", "5")
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"z" * 4096, 0)
        os.fsync(fd)
        t.kill()
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"q" * 4096, 4096)
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - t0 < 15
        _uring_target(running_target, tmp_path, port)
        deadline = time.monotonic() + 15
        while True:  # background reconnect heals the export
            try:
                assert os.pread(fd, 4096, 0) == b"z" * 4096
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        os.close(fd)
    assert e.stop() == 0, e.output()


# ---- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "env"])
def test_missing_fuse_device_is_a_clear_error(running_target: Launcher, tmp_path: Path,
                                              mnt: Path, how: str) -> None:
    _t, port = _malloc_target(running_target, mib=8)
    bogus = str(tmp_path / "no-such-fuse")
    args = ["--fuse-device", bogus] if how == "option" else []
    env = dict(os.environ, BLOCKTARGET_FUSE_DEVICE=bogus) if how == "env" else None
    r = subprocess.run(blocktarget_cmd("fuse-export", "-a", "127.0.0.1", "-s", str(port),
                                       "-n", NQN, *args, str(mnt)),
                       capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 1
    assert f"{bogus} does not exist" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_target_and_bad_mountpoint(tmp_path: Path, mnt: Path) -> None:
    r = subprocess.run(blocktarget_cmd("fuse-export", "-a", "127.0.0.1", "-s",
                                       str(free_port()), "-n", NQN, "--timeout", "3",
                                       str(mnt)),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and NQN in r.stderr


# ---- RPC: local bdev ------------------------------------------------------------------


def test_rpc_fuse_export_of_local_bdev(running_target: Launcher, mnt: Path) -> None:
    t = running_target(config([malloc("L0", 4096, 4096)]))
    info = t.rpc("fuse_export_start", bdev_name="L0", mountpoint=str(mnt))
    f = mnt / "L0"
    assert info["file"] == str(f) and info["size"] == 16 * MiB
    assert f.stat().st_size == 16 * MiB
    r = _fio("--name=local", f"--filename={f}", "--size=8m", "--rw=randwrite", "--bs=4k",
             "--direct=1", "--ioengine=libaio", "--iodepth=8", "--verify=crc32c")
    assert r.returncode == 0, r.stdout + r.stderr + t.log()
    with pytest.raises(Exception, match="already serves"):
        t.rpc("fuse_export_start", bdev_name="L0", mountpoint=str(mnt))
    with pytest.raises(Exception, match="does not exist"):
        t.rpc("fuse_export_start", bdev_name="nope", mountpoint=str(mnt))
    assert [x["bdev_name"] for x in t.rpc("fuse_export_get")] == ["L0"]
    assert t.rpc("fuse_export_stop", mountpoint=str(mnt)) is True
    assert not _mounted(mnt)
    with pytest.raises(Exception, match="no FUSE export"):
        t.rpc("fuse_export_stop", mountpoint=str(mnt))
    # the data went to the bdev: export again and read back fio's first block header
    t.rpc("fuse_export_start", bdev_name="L0", mountpoint=str(mnt))
    assert f.read_bytes()[:4096] != bytes(4096)
    t.rpc("fuse_export_stop", mountpoint=str(mnt))


# ---- interrupts (FUSE_INTERRUPT) -------------------------------------------------------

# A caller of one FUSE request, through libc so the syscall's own result is seen
# (Python's os.pread retries on EINTR, PEP 475). SIGUSR1 has a do-nothing handler: a
# request the server answers EINTR returns -1/EINTR; one it keeps serving returns its
# byte count once answered, whatever signals arrived meanwhile.
_CALLER = r"""
import ctypes, errno, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.pread.argtypes = libc.pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                              ctypes.c_size_t, ctypes.c_long]
libc.pread.restype = libc.pwrite.restype = ctypes.c_ssize_t
signal.signal(signal.SIGUSR1, lambda sig, frame: None)
fd = os.open(sys.argv[1], os.O_RDWR)
buf = ctypes.create_string_buffer(sys.argv[3].encode() * 4096 if sys.argv[2] == "write"
                                  else 4096)
print("ready", flush=True)
n = (libc.pread if sys.argv[2] == "read" else libc.pwrite)(fd, buf, 4096, 0)
err = ctypes.get_errno()
print("interrupted" if n < 0 and err == errno.EINTR else
      f"done {n}" if n >= 0 else f"error {errno.errorcode[err]}", flush=True)
"""


class _Caller:
    def __init__(self, f: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CALLER, str(f), *args],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def blocked_for(self, seconds: float) -> bool:
        """Still inside its read/write after ``seconds``."""
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def result(self, timeout: float = 10) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        return out.strip()


def test_interrupt_ends_blocked_reads_and_queued_writes_not_sent_ones(
        running_target: Launcher, mnt: Path, exports: list[FuseExport]) -> None:
    """Budget ~10 s. With the target SIGSTOPped every command stalls: a read interrupted
    by a signal (or SIGKILL) returns at once, a write queued behind another on the same
    block returns EINTR and never reaches the target, and the write whose command was
    already sent ignores the signal and completes when the target resumes."""
    t, port = _malloc_target(running_target, mib=8)
    e, f = _start(exports, port, mnt, "--timeout", "60")
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    callers: list[_Caller] = []
    os.kill(t.pid, signal.SIGSTOP)
    try:
        reader = _Caller(f, "read", "")
        killed = _Caller(f, "read", "")
        callers += [reader, killed]
        assert reader.blocked_for(1.0), "the stalled target answered a read"
        t0 = time.monotonic()
        reader.proc.send_signal(signal.SIGUSR1)
        killed.proc.kill()  # the kernel waits for the server's answer even for SIGKILL
        assert reader.result() == "interrupted"
        assert killed.proc.wait(10) == -signal.SIGKILL
        assert time.monotonic() - t0 < 5

        sent = _Caller(f, "write", "b")
        callers.append(sent)
        assert sent.blocked_for(0.5)
        queued = _Caller(f, "write", "c")  # same block: waits for the range lock
        callers.append(queued)
        assert queued.blocked_for(0.5)
        queued.proc.send_signal(signal.SIGUSR1)
        sent.proc.send_signal(signal.SIGUSR1)
        assert queued.result() == "interrupted"
        assert sent.blocked_for(1.0), "a write already sent to the target was abandoned"
    finally:
        os.kill(t.pid, signal.SIGCONT)
        for c in callers:
            if c.proc.poll() is None and c.blocked_for(10):
                c.proc.kill()
    assert sent.result() == "done 4096"
    assert (mnt / "nvme0n1").read_bytes()[:4096] == b"b" * 4096  # "c" never written
    assert "finishing it" in e.output()
    assert e.stop() == 0, e.output()


# ---- unprivileged mount (fusermount3) --------------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Runs as root inside a private mount namespace (unshare -m): makes /dev/fuse usable by
# other users there only (Debian's udev gives it mode 0666; some machines, this one
# included, leave devtmpfs' 0600, and fusermount3 opens it as the caller), then runs
# fuse-export as nobody, which must mount through the setuid fusermount3, serve I/O to
# nobody, and unmount on SIGTERM. Prints one JSON object of what it saw.
_UNPRIVILEGED = r"""
import json, os, signal, subprocess, sys, time
work, mnt, port, nqn, cmd = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
run = lambda *a: subprocess.run(a, check=True)
run("mount", "-t", "tmpfs", "-o", "mode=755", "btdev", work)
run("mknod", "-m", "666", work + "/fuse", "c", "10", "229")
run("mount", "--bind", work + "/fuse", "/dev/fuse")
out = {}
p = subprocess.Popen([*nobody, *cmd, "fuse-export", "-a", "127.0.0.1", "-s", port, "-n", nqn,
                      "-v", mnt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
out["ready"] = p.stdout.readline()
f = mnt + "/nvme0n1"
if os.path.exists(f) or p.poll() is None:
    with open("/proc/mounts") as fh:
        out["mounts"] = [l for l in fh if " " + mnt + " " in l]
    io = subprocess.run([*nobody, sys.executable, "-c",
        "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); d = os.urandom(65536); "
        "os.pwrite(fd, d, 4096); os.fsync(fd); "
        "print(os.pread(fd, len(d), 4096) == d, os.fstat(fd).st_uid, os.fstat(fd).st_size)",
        f], capture_output=True, text=True)
    out["io"] = io.stdout.strip() + io.stderr.strip()
    p.send_signal(signal.SIGTERM)
try:
    rest, _ = p.communicate(timeout=30)
except subprocess.TimeoutExpired:
    p.kill()
    rest, _ = p.communicate()
out["rc"], out["log"] = p.returncode, rest
with open("/proc/mounts") as fh:
    out["left_mounted"] = any(" " + mnt + " " in l for l in fh)
print(json.dumps(out))
"""


def _unprivileged_why() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create the unprivileged user's private mount namespace"
    fm = shutil.which("fusermount3")
    if fm is None or not os.stat(fm).st_mode & stat.S_ISUID:
        return "fusermount3 is not installed setuid root"
    for tool in ("unshare", "setpriv", "mknod"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux/coreutils) is missing"
    r = subprocess.run([*NOBODY, sys.executable, "-c", "import blocktarget"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"user nobody cannot run this Python/venv: {r.stderr.strip()[-200:]}"
    return None


def test_unprivileged_user_mounts_through_fusermount3(running_target: Launcher,
                                                      tmp_path: Path) -> None:
    """Budget ~5 s. The non-root path end to end: mount by the setuid helper, I/O as
    that user, unmount by the helper on SIGTERM."""
    why = _unprivileged_why()
    if why is not None:
        pytest.xfail(f"cannot run as an unprivileged user here: {why}")
    _t, port = _malloc_target(running_target, mib=8)
    top = Path(tempfile.mkdtemp(prefix="bt-fuse-nr-", dir="/tmp"))
    try:
        top.chmod(0o755)
        (top / "dev").mkdir()
        mnt = top / "mnt"
        mnt.mkdir()
        os.chown(mnt, 65534, 65534)  # fusermount3 wants the user to own/write the mountpoint
        r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                            _UNPRIVILEGED, str(top / "dev"), str(mnt), str(port), NQN,
                            *blocktarget_cmd()], capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        seen = json.loads(r.stdout.strip().splitlines()[-1])
        assert "fuse-export: " in seen["ready"], seen
        [line] = seen["mounts"]
        assert "fuse.blocktarget" in line and "user_id=65534" in line, line  # by fusermount3
        assert seen["io"] == f"True 65534 {8 * MiB}", seen
        assert seen["rc"] == 0 and "unmounting" in seen["log"], seen
        assert not seen["left_mounted"], seen
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_fuse_export_over_tls(running_target: Launcher, mnt: Path, tmp_path: Path,
                              exports: list[FuseExport]) -> None:
    """`fuse-export --tls --tls-key FILE` (issue 17 item 3): a secure listener only, fio
    verify through the file; without the key the export refuses to start, saying why."""
    from blocktarget.nvme.tls_keys import ConfiguredPsk

    host = "nqn.2014-08.org.nvmexpress:uuid:f5e00000-0000-4000-8000-000000000001"
    t, _plain = _malloc_target(running_target)
    key = tmp_path / "psk"
    key.write_text(ConfiguredPsk.generate(1).encode())
    key.chmod(0o600)
    secure = free_port()
    t.rpc("keyring_file_add_key", name="psk0", path=str(key))
    t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=host, psk="psk0")
    t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address=listen_address(secure),
          secure_channel=True)
    e, f = _start(exports, secure, mnt, "-q", host, "--tls", "--tls-key", str(key))
    r = _fio("--name=tls4k", f"--filename={f}", "--size=8m", "--rw=randwrite", "--bs=4k",
             "--direct=1", "--ioengine=libaio", "--iodepth=8", "--verify=crc32c",
             "--do_verify=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert e.stop() == 0, e.output()
    assert t.rpc("nvmf_get_transports")[0]["tls"]["connections"]["established"] >= 2
    bad = subprocess.run(blocktarget_cmd("fuse-export", "-a", "127.0.0.1", "-s", str(secure),
                                         "-n", NQN, "-q", host, "--tls", str(mnt)),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "--tls and --tls-key go together" in bad.stderr
