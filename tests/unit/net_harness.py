"""lane_harness over real sockets: the lane side's I/O queue pair is a real TCP
connection on loopback, served by the reactor's C poller (nvme/netpoll.py, csrc/net.c),
against the reference side (the Python path, fed directly) as in test_fastpath.py.

The host's end is a plain non-blocking socket: what a feed sends goes through the kernel,
arrives in whatever pieces the kernel makes of it, and what the target sends is read
back and compared byte for byte with the reference's output. The event loop is asyncio's
or uvloop's (the reactors' own), so the transports whose sockets are lent to C are the
real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import uvloop
from lane_harness import OPTS, Pair, Side

from blocktarget.nvme import pdu
from blocktarget.nvme.qpair import Qpair

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class HostEnd:
    """The host's end of the I/O queue's connection: keeps every byte received (as
    lane_harness.Tr keeps every byte written). ``reading`` False plays a host that
    stopped reading."""

    # (read pauses are the transport's business here, lending pauses it: not compared)
    pauses = resumes = None

    def __init__(self, sock: socket.socket, qp: Qpair) -> None:
        self.sock = sock
        self.qp = qp
        self.out = bytearray()
        self.reading = True
        self.eof = False
        self.pending = b""  # bytes still to send (the target is not reading)

    @property
    def closing(self) -> bool:
        return self.qp.closed

    def pull(self) -> None:
        while self.reading and not self.eof:
            try:
                b = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except ConnectionError:
                self.eof = True
                return
            if not b:
                self.eof = True
                return
            self.out += b

    def push(self) -> None:
        while self.pending:
            try:
                n = self.sock.send(self.pending)
            except BlockingIOError:
                return
            except ConnectionError:
                self.pending = b""
                return
            self.pending = self.pending[n:]


class SockSide(Side):
    """A Side whose I/O queue pair is served over a real socket."""

    def __init__(self, *a: Any, sndbuf: int = 0, rcvbuf: int = 0, **kw: Any) -> None:
        self.sndbuf, self.rcvbuf = sndbuf, rcvbuf
        super().__init__(*a, **kw)

    def _connect(self, qid: int, cntlid: int, cattr: int, icreq: pdu.ICReq,
                 sqsize: int = 31) -> tuple[Qpair, Any]:
        if qid == 0:
            return super()._connect(qid, cntlid, cattr, icreq, sqsize)
        from lane_harness import HOSTID, HOSTNQN, NQN, encoding, wire

        from blocktarget.nvme.structs import build_connect_data, build_connect_sqe

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        host = socket.create_connection(lsock.getsockname())
        srv, _ = lsock.accept()
        lsock.close()
        if self.sndbuf:  # small buffers: partial sends and EAGAIN in the target
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        if self.rcvbuf:
            host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        host.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (a piece, at once)
        host.setblocking(False)
        qp = Qpair(self.target, self.reactor, self.addr)
        self.loop.run_until_complete(self.loop.connect_accepted_socket(lambda: qp, srv))
        end = HostEnd(host, qp)
        self.end = end
        self.send(wire(icreq))
        self.pump(128)
        with encoding(icreq):
            self.send(wire(pdu.CapsuleCmd(build_connect_sqe(1, qid, sqsize, 0, cattr=cattr),
                                          build_connect_data(HOSTID.bytes, cntlid, NQN,
                                                             HOSTNQN))))
        self.pump(128 + 24 + (4 if icreq.header_digest else 0))
        assert qp.ctrl is not None, "connect failed"
        return qp, end

    def send(self, data: bytes) -> None:
        self.end.pending += data
        self.end.push()

    def pump(self, expected: int, timeout: float = 10.0, settle: int = 3) -> None:
        """Run the loop until the host has ``expected`` bytes (or the connection ended),
        then a little longer: anything more would be a difference too."""
        end = self.end
        deadline = time.monotonic() + timeout
        while True:
            end.push()
            self.loop.run_until_complete(asyncio.sleep(0))
            end.pull()
            if (len(end.out) >= expected and not end.pending) or end.eof:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the host got {len(end.out)} of {expected} bytes "
                                     f"({len(end.pending)} not sent) in {timeout} s")
            self.loop.run_until_complete(asyncio.sleep(0.0002))
        for _ in range(settle):
            self.loop.run_until_complete(asyncio.sleep(0.001))
            end.pull()

    def run(self) -> None:
        super().run()
        end = getattr(self, "end", None)  # (None while the admin queue connects)
        if end is not None:
            end.pull()


class SockPair(Pair):
    """The reference side fed directly, the lane side over a socket served by C."""

    def __init__(self, opts: dict[str, Any] | None = None, *, loop: str = "uvloop",
                 workdir: Any = None, sndbuf: int = 0, rcvbuf: int = 0,
                 reference: Callable[[], Any] = contextlib.nullcontext,
                 **kw: Any) -> None:
        """``reference``: a context the reference side is made in (as Pair's)."""
        self.loop = LOOPS[loop]()
        dirs = [None, None]
        if workdir is not None:
            dirs = [workdir / "ref", workdir / "fast"]
            for d in dirs:
                d.mkdir(exist_ok=True)
        with reference():
            self.ref = Side(self.loop, False, opts or OPTS, workdir=dirs[0], **kw)
        self.fast = SockSide(self.loop, True, opts or OPTS, workdir=dirs[1], sndbuf=sndbuf,
                             rcvbuf=rcvbuf, **kw)
        assert self.ref.io._lane is None and self.fast.io._lane is not None
        assert self.fast.io._net_ok, "the socket is not eligible for the C poller"

    @property
    def stats(self) -> Any:
        """The lane's reactor's stats, folded first, as every reader does (the C
        poller's counters stay in C until folded: nvme/netpoll.py)."""
        r = self.fast.reactor
        r.fold_stats()
        return r.stats

    def feed(self, *chunks: bytes) -> None:
        whole = b"".join(chunks)
        fast = self.for_fast(whole)
        for c in chunks:
            if not self.ref.io.closed:
                self.ref.io.data_received(c)
        self.ref.run()
        pos = 0
        for c in chunks:  # (the kernel may join or split them: that is the point)
            self.fast.send(fast[pos:pos + len(c)])
            pos += len(c)
            self.fast.pump(0, settle=1)
        self.settle_fast()

    def settle_fast(self) -> None:
        want = len(self.ref.tr.out)
        self.fast.pump(want)
        if not self.fast.layout.ordered:
            self.fast.settle()
            self.fast.pump(want)

    def check(self) -> None:
        super().check()
        qp = self.fast.io
        if qp._net is not None:  # lent: C alone reads the socket
            assert qp._net.attached and not qp.transport.is_reading()

    def close(self) -> None:
        for s in (self.ref, self.fast):
            for qp in (s.io, s.admin):
                qp.close("test over")
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))
        self.fast.end.sock.close()
        assert self.fast.reactor.net_poller is None, "the C poller outlived its sockets"
        self.release()
        self.loop.close()
