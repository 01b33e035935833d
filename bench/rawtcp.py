"""The raw-TCP ceiling: what a Python event-loop server on this machine can do at all.

A uvloop server on core 0 answers every 72-byte request (the size of a command
capsule) with the bytes a read costs on the wire: a 24-byte C2HData header, the data
(4 KiB or 128 KiB, one preallocated buffer, no copy) and a 24-byte response, written with
one `writelines` per batch of requests, exactly like the target's flush. There is no
NVMe work at all. A pipelined client on core 1 keeps 32 requests in flight. The
server's CPU per request is the floor under blocktarget's "target CPU µs/IO"; the rest
of that figure is our Python. Used by `vs_spdk.py --raw-tcp`; runnable alone:

    .venv/bin/python bench/rawtcp.py [--time 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REQ = 72
HDR = 24
RESP = 24
CASES = (("4 KiB reads, QD32", 4096, False), ("4 KiB reads, QD32, recv_into", 4096, True),
         ("128 KiB reads, QD32", 131072, False))


def serve(size: int, buffered: bool = False) -> None:
    """Server role (runs in its own process, pinned to core 0). ``buffered``: receive
    with recv_into a preallocated buffer (asyncio.BufferedProtocol) instead of the
    fresh bytes object per read that data_received gets."""
    import asyncio

    import uvloop

    payload = [bytes(HDR), memoryview(bytes(size)), bytes(RESP)]

    class Buffered(asyncio.BufferedProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.tr = transport
            self.pending = 0
            self.buf = bytearray(256 * 1024)
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            k, self.pending = divmod(self.pending + nbytes, REQ)
            self.tr.writelines(payload * k)  # type: ignore[attr-defined]

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.tr = transport
            self.pending = 0
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            n = self.pending + len(data)
            k, self.pending = divmod(n, REQ)
            self.tr.writelines(payload * k)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Buffered if buffered else Echo, "127.0.0.1", 0)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def client(port: int, size: int, secs: float, qd: int) -> None:
    """Client role (core 1): keep ``qd`` requests in flight, count answered ones."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    per = HDR + size + RESP
    req = bytes(REQ)
    buf = bytearray(1 << 20)
    s.sendall(req * qd)
    got = done = 0
    end = time.monotonic() + secs
    while time.monotonic() < end:
        got += s.recv_into(buf)
        k, got = divmod(got, per)
        if k:
            done += k
            s.sendall(req * k)
    print(done, flush=True)


def raw_tcp_ceiling(secs: int, log: Callable[[str], None]) -> list[dict]:
    res = []
    me = str(Path(__file__).resolve())
    for label, size, buffered in CASES:
        srv = subprocess.Popen(["taskset", "-c", "0", sys.executable, me, "--serve",
                                str(size), *(["--buffered"] if buffered else [])],
                               stdout=subprocess.PIPE, text=True)
        try:
            port = int(srv.stdout.readline())  # type: ignore[union-attr]
            c0 = _cpu(srv.pid)
            t0 = time.monotonic()
            out = subprocess.run(["taskset", "-c", "1", sys.executable, me, "--client",
                                  str(port), str(size), str(secs)], capture_output=True,
                                 text=True, timeout=secs + 30)
            wall = time.monotonic() - t0
            cpu = _cpu(srv.pid) - c0
        finally:
            srv.kill()
            srv.wait()
        ops = int(out.stdout.strip() or 0)
        r = {"label": label, "ops": ops / secs, "mibs": ops * size / secs / 2**20,
             "cpu_us_per_op": cpu * 1e6 / ops if ops else 0.0, "wall": wall}
        log(f"raw tcp {label}: {r['ops']:,.0f} ops/s {r['mibs']:,.1f} MiB/s server cpu "
            f"{r['cpu_us_per_op']:.2f} µs/op, load {os.getloadavg()[0]:.1f}")
        res.append(r)
    return res


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=3)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--buffered", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.buffered)
        return 0
    if args.client:
        port, size, secs = args.client
        client(int(port), int(size), float(secs), 32)
        return 0
    for r in raw_tcp_ceiling(args.time, lambda m: print(m, file=sys.stderr)):
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
