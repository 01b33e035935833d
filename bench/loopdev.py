"""A loop block device over a file, for the benches' `uring-loop` backend.

Issue 15 compares the uring bdev on a kernel block device with SPDK's aio bdev on a loop
device over a tmpfs file; this makes that device. It is attached with LOOP_CONFIGURE
(one ioctl: the file, the flags and the block size at once, so no window where another
process sees a half-set device) and LO_FLAGS_AUTOCLEAR, so the kernel detaches it when
its last opener closes it: a bench that is killed leaves no device behind once the
target using it has exited too. `close()` detaches it at once as well.

Loop devices need CAP_SYS_ADMIN and the loop driver (/dev/loop-control); containers
often have neither, hence `unavailable_reason()` for a clear message instead of a trace.
The ioctl numbers and struct layouts are those of <linux/loop.h>.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
# struct loop_info64: five __u64, four __u32 (lo_flags the last), file name and crypt
# name (64 bytes each), key (32), lo_init[2]: 232 bytes. struct loop_config: fd,
# block_size, the loop_info64, __reserved[8].
_INFO64 = "5Q4I64s64s32s2Q"
_CONFIG = "=II" + _INFO64 + "8Q"
assert struct.calcsize(_CONFIG) == 304
ATTACH_TRIES = 8  # a free device another process takes first: ask again, this often


def unavailable_reason() -> str | None:
    """Why no loop device can be attached here, or None."""
    try:
        fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open /dev/loop-control: {exc.strerror}"
    os.close(fd)
    return None


class LoopDevice:
    """/dev/loopN over `backing` (a regular file), attached until close()."""

    def __init__(self, backing: str, *, block_size: int = 512, direct_io: bool = False) -> None:
        why = unavailable_reason()
        if why is not None:
            raise OSError(errno.ENODEV, f"no loop device: {why}")
        flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
        bfd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.path, self._fd = self._attach(bfd, block_size, flags, backing)
        finally:
            os.close(bfd)  # (the loop device holds its own reference to the file)

    @staticmethod
    def _attach(bfd: int, block_size: int, flags: int, backing: str) -> tuple[str, int]:
        name = os.fsencode(os.path.abspath(backing))[:63]
        cfg = struct.pack(_CONFIG, bfd, block_size, 0, 0, 0, 0, 0, 0, 0, 0, flags,
                          name, b"", b"", 0, 0, *([0] * 8))
        last: OSError | None = None
        for _ in range(ATTACH_TRIES):
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            path = f"/dev/loop{n}"
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, cfg)
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EBUSY:  # EBUSY: taken since GET_FREE answered
                    raise
                last = exc
                continue
            return path, fd
        raise OSError(errno.EBUSY, f"no free loop device after {ATTACH_TRIES} tries: {last}")

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            fcntl.ioctl(self._fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EBUSY):
                raise
            # ENXIO: already gone; EBUSY: still open elsewhere (a target not yet
            # exited): AUTOCLEAR detaches it when that opener closes
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
