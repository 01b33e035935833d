"""Getting a /dev/fuse channel mounted, and unmounting it.

As root we do what libfuse does first: open the device and mount(2) it ourselves, so
nothing but the kernel is needed. Otherwise ``fusermount3`` (setuid, Debian package
``fuse3``) mounts for us and hands the opened device back over a socket (libfuse's
``_FUSE_COMMFD`` protocol). ``BLOCKTARGET_FUSE_MOUNT=fusermount`` forces the helper
path; ``BLOCKTARGET_FUSE_DEVICE`` (or the ``device`` argument) names another device
node, which is how tests simulate a machine without /dev/fuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass

__all__ = ["FuseUnavailable", "Mount", "mount", "unmount", "DEFAULT_DEVICE"]

DEFAULT_DEVICE = "/dev/fuse"
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


class FuseUnavailable(RuntimeError):
    """FUSE cannot be used here: no device, no permission, or the mount was refused."""


@dataclass
class Mount:
    fd: int
    mountpoint: str
    helper: bool  # mounted by fusermount3, so unmount through it too


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _options(fd: int | None, allow_other: bool) -> str:
    opts = ["default_permissions"]
    if fd is not None:
        opts = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}", *opts]
    if allow_other:
        opts.append("allow_other")
    return ",".join(opts)


def _check_mountpoint(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FuseUnavailable(f"mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FuseUnavailable(f"mountpoint {path} is not a directory")


def _open_device(device: str) -> int:
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FuseUnavailable(
            f"{device} does not exist: this kernel has no FUSE support loaded "
            "(modprobe fuse), or the container was started without --device /dev/fuse"
        ) from None
    except PermissionError:
        raise FuseUnavailable(
            f"{device}: permission denied (run as root, or make the device usable by this "
            "user and install fuse3 for fusermount3)") from None
    except OSError as exc:
        raise FuseUnavailable(f"cannot open {device}: {exc.strerror}") from None


def mount(mountpoint: str, *, fsname: str, allow_other: bool = False,
          device: str | None = None) -> Mount:
    """Mount an empty FUSE filesystem at ``mountpoint``; returns the channel fd
    (non-blocking). Raises FuseUnavailable with the reason a user can act on."""
    mountpoint = os.path.abspath(mountpoint)
    _check_mountpoint(mountpoint)
    device = device or os.environ.get("BLOCKTARGET_FUSE_DEVICE") or DEFAULT_DEVICE
    helper = os.environ.get("BLOCKTARGET_FUSE_MOUNT") == "fusermount" or os.geteuid() != 0
    if helper:
        # fusermount3 opens /dev/fuse itself; check ours first so the error names it
        # (fusermount3 3.14 opens it with the caller's fsuid, so a device this user
        # cannot open fails there too: checked by running it as nobody)
        os.close(_open_device(device))
        fd = _fusermount(mountpoint, fsname, allow_other)
    else:
        fd = _open_device(device)
        libc = _libc()
        rc = libc.mount(fsname.encode(), mountpoint.encode(), b"fuse.blocktarget",
                        MS_NOSUID | MS_NODEV, _options(fd, allow_other).encode())
        if rc != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise FuseUnavailable(f"mount of {mountpoint} failed: {os.strerror(err)}")
    os.set_blocking(fd, False)
    return Mount(fd, mountpoint, helper)


def _fusermount(mountpoint: str, fsname: str, allow_other: bool) -> int:
    exe = shutil.which("fusermount3")
    if exe is None:
        raise FuseUnavailable("fusermount3 not found (install the Debian package fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = f"rw,nosuid,nodev,fsname={fsname},subtype=blocktarget," + _options(None,
                                                                                    allow_other)
        proc = subprocess.run(
            [exe, "-o", opts, "--", mountpoint], pass_fds=(theirs.fileno(),),
            env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
            capture_output=True, text=True, timeout=30, check=False)
        theirs.close()
        if proc.returncode != 0:
            raise FuseUnavailable(f"fusermount3 could not mount {mountpoint}: "
                                  f"{proc.stderr.strip() or proc.returncode}")
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise FuseUnavailable("fusermount3 mounted but sent no file descriptor")
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def unmount(m: Mount, *, lazy: bool = False) -> None:
    """Unmount; ``lazy`` detaches a mount that is still busy (open files keep working
    until we stop answering, then fail with ENOTCONN)."""
    if m.helper:
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), m.mountpoint]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise OSError(errno.EBUSY, proc.stderr.strip() or "fusermount3 -u failed")
        return
    libc = _libc()
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if libc.umount2(m.mountpoint.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {m.mountpoint}: {os.strerror(err)}")
