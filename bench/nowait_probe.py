"""Can the kernel read or write this file without blocking (issue 15 item 8)?

io_uring issues a read or write inline, in the submitter's io_uring_enter, only when the
file says it can do I/O without blocking (FMODE_NOWAIT); otherwise it punts the request to
an io-wq worker thread at once, a thread wake-up per request. preadv2/pwritev2 with
RWF_NOWAIT ask the same question of the same flag: EOPNOTSUPP means every io_uring
request on such a file goes to io-wq (tmpfs on Linux 6.18: bench/RESULTS.md, "tmpfs,
io-wq and a loop device"). Prints one line per open mode (buffered, O_DIRECT).

    .venv/bin/python bench/nowait_probe.py /dev/shm/some.img [/dev/loop0 ...]

To count the punts of a real run: `perf stat -e io_uring:io_uring_queue_async_work`
around `bench/hotpath.py --socket` (one event per request punted).
"""

from __future__ import annotations

import errno
import mmap
import os
import sys


def probe(path: str, direct: bool) -> str:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        return f"cannot open: {exc.strerror}"
    buf = mmap.mmap(-1, 4096)  # (page-aligned, as O_DIRECT wants)
    try:
        out = []
        for name, call in (("read", os.preadv), ("write", os.pwritev)):
            try:
                if name == "write":  # (the block's own bytes back: nothing changes)
                    os.preadv(fd, [buf], 0)
                call(fd, [buf], 0, os.RWF_NOWAIT)
                out.append(f"{name} RWF_NOWAIT ok")
            except OSError as exc:
                what = "not supported" if exc.errno == errno.EOPNOTSUPP else exc.strerror
                out.append(f"{name} RWF_NOWAIT {what} ({errno.errorcode.get(exc.errno)})")
        return ", ".join(out)
    finally:
        buf.close()
        os.close(fd)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    for path in sys.argv[1:]:
        for direct in (False, True):
            print(f"{path} {'O_DIRECT' if direct else 'buffered'}: {probe(path, direct)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
