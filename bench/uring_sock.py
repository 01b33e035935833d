"""io_uring for socket I/O vs the event loop's epoll path (issue 7, item 2).

SPDK's uring sock module replaces epoll_wait + recv + sendmsg (three system calls per
wake-up) with one io_uring_submit_and_wait that both posts the next receive and the
replies. Whether that would pay off for blocktarget is a question about the floor under
its per-I/O cost, so it is measured on the raw-TCP model of `bench/rawtcp.py`: a server on
core 0 answers every 72-byte request (a command capsule) with what a read costs on the
wire (24-byte C2HData header, the data, 24-byte response), a pipelined client on core 1
keeps 1 or 32 requests in flight. Both servers send the replies of one wake-up as one
contiguous slice of a prebuilt buffer, so they differ only in how they talk to the kernel:

- ``epoll``: uvloop (libuv: epoll_wait, read, write), ``data_received`` -> ``write``;
- ``io_uring``: liburing through a small cffi module built on first use (the project's
  own liburing binding covers files only), one ``io_uring_submit_and_wait`` per turn
  carrying the re-armed recv and the send; partial sends are resumed.

The figure is the server's CPU µs per request (utime+stime from /proc), which moves far
less with machine noise than the rate. Run:

    .venv/bin/python bench/uring_sock.py [--time 3] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rawtcp import HDR, REQ, RESP, _cpu, client  # noqa: E402

MAX_BATCH = 64  # replies prebuilt; the client never has more than 32 outstanding
RECV_BUF = 64 * 1024
UD_RECV, UD_SEND = 1, 2

_CDEF = """
struct io_uring;
struct io_uring *bt_ring_new(unsigned entries);
int bt_prep_recv(struct io_uring *ring, int fd, void *buf, size_t len, unsigned long long ud);
int bt_prep_send(struct io_uring *ring, int fd, const void *buf, size_t len, unsigned long long ud);
int bt_submit_and_wait(struct io_uring *ring, unsigned n);
int bt_reap(struct io_uring *ring, unsigned long long *ud, int *res, int max);
"""

_SRC = """
#include <liburing.h>
#include <stdlib.h>

struct io_uring *bt_ring_new(unsigned entries) {
    struct io_uring *r = calloc(1, sizeof(*r));
    if (!r || io_uring_queue_init(entries, r, 0) < 0) { free(r); return NULL; }
    return r;
}
int bt_prep_recv(struct io_uring *ring, int fd, void *buf, size_t len, unsigned long long ud) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe) return -1;
    io_uring_prep_recv(sqe, fd, buf, len, 0);
    sqe->user_data = ud;
    return 0;
}
int bt_prep_send(struct io_uring *ring, int fd, const void *buf, size_t len, unsigned long long ud) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe) return -1;
    io_uring_prep_send(sqe, fd, buf, len, MSG_NOSIGNAL);
    sqe->user_data = ud;
    return 0;
}
int bt_submit_and_wait(struct io_uring *ring, unsigned n) { return io_uring_submit_and_wait(ring, n); }
int bt_reap(struct io_uring *ring, unsigned long long *ud, int *res, int max) {
    struct io_uring_cqe *cqe; unsigned head; int n = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == max) break;
        ud[n] = cqe->user_data; res[n] = cqe->res; n++;
    }
    io_uring_cq_advance(ring, n);
    return n;
}
"""


def _uring_module():  # noqa: ANN202 - a cffi module
    """Build (once, cached) and import the tiny liburing socket binding."""
    out = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blocktarget" / "uring_sock"
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(out))
    try:
        import _bt_uring_sock  # type: ignore[import-not-found]
        return _bt_uring_sock
    except ImportError:
        pass
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(_CDEF)
    ffi.set_source("_bt_uring_sock", _SRC, libraries=["uring"])
    ffi.compile(tmpdir=str(out), verbose=False)
    import _bt_uring_sock  # type: ignore[import-not-found]
    return _bt_uring_sock


def _listen() -> socket.socket:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    return ls


def serve_epoll(size: int) -> None:
    import asyncio

    import uvloop

    per = HDR + size + RESP
    replies = memoryview(bytes(per * MAX_BATCH))

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.tr = transport
            self.pending = 0
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                          socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            k, self.pending = divmod(self.pending + len(data), REQ)
            while k:
                n = min(k, MAX_BATCH)
                self.tr.write(replies[:n * per])  # type: ignore[attr-defined]
                k -= n

    async def main() -> None:
        ls = _listen()
        srv = await asyncio.get_running_loop().create_server(Echo, sock=ls)
        await srv.serve_forever()

    uvloop.run(main())


def serve_uring(size: int) -> None:
    mod = _uring_module()
    ffi, lib = mod.ffi, mod.lib
    per = HDR + size + RESP
    replies = ffi.new("char[]", per * MAX_BATCH)
    rbuf = ffi.new("char[]", RECV_BUF)
    ring = lib.bt_ring_new(64)
    if ring == ffi.NULL:
        raise SystemExit("io_uring_queue_init failed")
    uds = ffi.new("unsigned long long[]", 16)
    res = ffi.new("int[]", 16)
    ls = _listen()
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = conn.fileno()
    pending = 0  # request bytes not yet a whole request
    owed = 0  # replies not yet handed to a send
    left = 0  # bytes of the current send the kernel has not taken yet
    base = 0  # where in `replies` those bytes start
    lib.bt_prep_recv(ring, fd, rbuf, RECV_BUF, UD_RECV)
    while True:
        lib.bt_submit_and_wait(ring, 1)
        for i in range(lib.bt_reap(ring, uds, res, 16)):
            r = res[i]
            if uds[i] == UD_RECV:
                if r <= 0:
                    return  # client gone
                k, pending = divmod(pending + r, REQ)
                owed += k
                lib.bt_prep_recv(ring, fd, rbuf, RECV_BUF, UD_RECV)
            elif r < 0:
                return
            else:
                left -= r
                base += r
                if left:  # partial send: resume where the kernel stopped
                    lib.bt_prep_send(ring, fd, replies + base, left, UD_SEND)
        if not left and owed:
            n = min(owed, MAX_BATCH)
            owed -= n
            left, base = n * per, 0
            lib.bt_prep_send(ring, fd, replies, left, UD_SEND)


def run_case(kind: str, size: int, secs: float, qd: int) -> dict:
    me = str(Path(__file__).resolve())
    srv = subprocess.Popen(["taskset", "-c", "0", sys.executable, me, "--serve", kind,
                            str(size)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())  # type: ignore[union-attr]
        c0 = _cpu(srv.pid)
        out = subprocess.run(["taskset", "-c", "1", sys.executable, me, "--client",
                              str(port), str(size), str(secs), str(qd)], capture_output=True,
                             text=True, timeout=secs + 30)
        cpu = _cpu(srv.pid) - c0
    finally:
        srv.kill()
        srv.wait()
    ops = int(out.stdout.strip() or 0)
    return {"ops": ops / secs, "cpu_us": cpu * 1e6 / ops if ops else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        kind, size = args.serve
        (serve_uring if kind == "io_uring" else serve_epoll)(int(size))
        return 0
    if args.client:
        port, size, secs, qd = args.client
        client(int(port), int(size), float(secs), int(qd))
        return 0
    _uring_module()  # build before timing anything
    print(f"load average {os.getloadavg()[0]:.2f} at start, {args.reps} reps x {args.time} s, "
          "alternating", file=sys.stderr)
    print("| reply size | QD | server | ops/s (median) | server CPU µs/request (median, range) |")
    print("|---|---|---|---|---|")
    for size, qd in ((4096, 1), (4096, 32), (131072, 32)):
        runs: dict[str, list[dict]] = {"epoll": [], "io_uring": []}
        for rep in range(args.reps):
            order = ("epoll", "io_uring") if rep % 2 == 0 else ("io_uring", "epoll")
            for kind in order:
                runs[kind].append(run_case(kind, size, args.time, qd))
        for kind, rs in runs.items():
            cpu = [r["cpu_us"] for r in rs]
            print(f"| {size // 1024} KiB | {qd} | {kind} | {statistics.median(r['ops'] for r in rs):,.0f} "
                  f"| {statistics.median(cpu):.2f} ({min(cpu):.2f}–{max(cpu):.2f}) |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
