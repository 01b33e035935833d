"""One NVMe/TCP queue pair on the target: the connection's state machine.

Bytes from the socket go through the sans-I/O `pdu.Decoder`; each command capsule
becomes a `Request`, whose host-to-controller data arrives either in the capsule or
through R2T/H2CData, and whose controller-to-host data leaves as C2HData PDUs. The
command itself is handled by a dispatch table (fabrics, admin or I/O) that completes
the request, possibly later, from a bdev completion. Everything here runs on the one
reactor that owns the connection.

A protocol violation sends a C2HTermReq with the decoder's FES/FEI and closes the
socket; a bad command only fails that command.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from ..tcp_limits import QUEUE_OVERFLOW, DataBudget, StallWatch
from . import auth_cmd, fastlane, netpoll, pdu, spec
from .controller import QpairCounters
from .dispatch import dispatch
from .rx_arena import RxArena
from .structs import Sqe, parse_sqe

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor
    from .controller import Controller
    from .subsystem import ListenAddress, Subsystem

log = logging.getLogger(__name__)

G = spec.Sct.GENERIC
SC_INVALID_FIELD = spec.make_status(G, spec.GenericStatus.INVALID_FIELD, dnr=True)
SC_INVALID_OPCODE = spec.make_status(G, spec.GenericStatus.INVALID_OPCODE, dnr=True)
SC_SGL_TYPE = spec.make_status(G, spec.GenericStatus.SGL_DESCRIPTOR_TYPE_INVALID, dnr=True)
SC_SGL_LENGTH = spec.make_status(G, spec.GenericStatus.DATA_SGL_LENGTH_INVALID, dnr=True)
SC_SGL_OFFSET = spec.make_status(G, spec.GenericStatus.INVALID_SGL_OFFSET, dnr=True)
SC_CID_CONFLICT = spec.make_status(G, spec.GenericStatus.CID_CONFLICT, dnr=True)
SC_SEQUENCE = spec.make_status(G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR, dnr=True)
SC_TRANSIENT = spec.make_status(G, spec.GenericStatus.TRANSIENT_TRANSPORT_ERROR)
SC_ABORTED_SQ_DELETION = spec.make_status(G, spec.GenericStatus.ABORTED_SQ_DELETION)
SC_INTERNAL = spec.make_status(G, spec.GenericStatus.INTERNAL)

# Output buffers (PDU headers and payloads) queued in one batch before they are handed
# to the socket early, so that a host not reading is noticed (pause_writing) within
# the batch: ~32 responses. See _congested.
OUT_BATCH = 64
ADMIN_ICD = 8192  # in-capsule data accepted on admin queues (Connect data is 1 KiB)
MAXH2CDATA = 0x20000  # largest H2CData payload we accept (ICResp), as SPDK's 128 KiB
# An H2CData payload into lent DMA memory with at least this much still to arrive is
# received by the kernel straight into that memory (see _try_direct); below it, the
# protocol switch costs more than the copy it saves.
DIRECT_RX_MIN = 16384
# Reads smaller than this are copied out of the receive arena (see buffer_updated).
RX_COPY_BELOW = 4096

FABRICS_OPCODE = spec.FABRICS_OPCODE
DIR_NONE = int(spec.DataTransfer.NONE)
DIR_H2C = int(spec.DataTransfer.HOST_TO_CTRL)
OPC_WRITE = int(spec.IoOpcode.WRITE)

_FCTYPE_DIR: dict[int, int] = {
    spec.FabricsType.PROPERTY_SET: DIR_NONE,
    spec.FabricsType.CONNECT: DIR_H2C,
    spec.FabricsType.PROPERTY_GET: DIR_NONE,
    spec.FabricsType.AUTH_SEND: DIR_H2C,
    spec.FabricsType.AUTH_RECV: int(spec.DataTransfer.CTRL_TO_HOST),
    spec.FabricsType.DISCONNECT: DIR_NONE,
}


class Request:
    """One command from capsule to completion."""

    __slots__ = ("qp", "sqe", "cid", "data", "xfer_len", "received", "ttag", "nsid",
                 "done", "abort_requested", "opcode", "io", "bad_data", "icd_held", "dma")

    def __init__(self, qp: Qpair, sqe: Sqe) -> None:
        self.qp = qp
        self.sqe = sqe
        self.cid = sqe.cid
        self.opcode = sqe.opcode
        self.nsid = sqe.nsid
        self.data: Any = None  # host-to-controller data once received
        self.xfer_len = sqe.sgl_len
        self.received = 0
        self.ttag = -1
        self.done = False
        self.abort_requested = False
        self.io: Any = None
        self.bad_data = False  # an H2CData PDU of this command failed its data digest
        self.icd_held = 0  # in-capsule data bytes counted in the budget until completion
        # write data received straight into the bdev channel's DMA memory (a DataBuffer,
        # see bdev.py); held until the command is over, then released (finish)
        self.dma: Any = None

    # ---- completion (on the qpair's reactor) ----
    def complete(self, status: int = 0, dw0: int = 0, dw1: int = 0) -> None:
        if self.done:
            if self.dma is not None:
                # the connection went away while the bdev still used the memory: the
                # bdev's completion is the first moment it is free
                self.dma.release()
                self.dma = None
            return
        self.done = True
        self.qp.finish(self, status, dw0, dw1)

    def complete_data(self, buf: Any, status: int = 0, dw0: int = 0,
                      lent: Any = None) -> None:
        """Send controller-to-host data (at most the host's SGL length), then complete.
        An SGL of length 0 takes no data (as SPDK): sending it anyway would give the host
        C2HData for a command without a buffer, which hosts treat as a transport error.
        ``lent``: ``buf`` is memory a bdev lent (a DataBuffer); it is sent without a
        copy and released once the transport has taken the bytes."""
        if self.done:
            if lent is not None:
                lent.release()
            return
        if status == 0 and buf is not None and len(buf) and self.xfer_len:
            qp = self.qp
            qp.send_c2h(self, buf, lent)
            self.done = True
            if qp.c2h_success_ok and not dw0:
                qp.finish(self, 0, 0, 0, response_sent=True)
            else:
                qp.finish(self, 0, dw0, 0)
            return
        if lent is not None:
            lent.release()
        self.complete(status, dw0)

    def fail(self, status: int) -> None:
        self.complete(status)


class Qpair(asyncio.BufferedProtocol):
    """The target side of one NVMe/TCP connection (one queue: admin or I/O).

    A BufferedProtocol: the loop reads into the reactor's receive arena (get_buffer) and
    the bytes are decoded where they landed (rx_arena.py says why); ``data_received`` is
    the same path for bytes from elsewhere (tests, the end of a direct receive)."""

    def __init__(self, target: Target, reactor: Reactor, addr: ListenAddress) -> None:
        self.target = target
        self.reactor = reactor
        self.addr = addr
        self.opts = opts = target.transports.get("TCP") or _default_opts()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.local_addr: str | None = None  # our end of the socket, set on connection
        # The largest PDU a conforming host sends: a capsule with in-capsule data (admin
        # queues take 8 KiB) or an H2CData of at most MAXH2CDATA, plus header, padding
        # and digests. A capsule with more in-capsule data than we advertise, but inside
        # this bound, is still decoded and failed as a command (DATA_SGL_LENGTH_INVALID);
        # anything larger cannot be buffered and ends the connection (FES 05h).
        self.decoder = pdu.Decoder(
            expect=pdu.HOST_TO_CONTROLLER,
            max_pdu_size=max(opts.max_io_size, opts.in_capsule_data_size, ADMIN_ICD,
                             MAXH2CDATA) + 64 * 1024)
        self.hdgst = False
        self.ddgst = False
        self.hpda = 0
        self.maxr2t = 0
        self.ic_done = False
        self.qid = -1
        self.sqsize = 0
        self.sqhd = 0
        self.sq_flow_disabled = False
        self.ctrl: Controller | None = None
        self.subsystem: Subsystem | None = None
        self.hostnqn = ""
        # DH-HMAC-CHAP (auth_cmd.py): while auth_pending, dispatch answers everything but
        # Authentication Send/Receive with AUTH_REQUIRED; auth is the open transaction.
        self.auth_pending = False
        self.auth: Any = None
        # a DH job of `auth` in a worker process (a Future), and the Authentication
        # commands that arrived meanwhile: (handler, request), handled in order after it
        self.auth_job: Any = None
        self.auth_waiting: list[Any] = []
        self.requests: dict[int, Request] = {}
        self.channels: dict[int, Any] = {}  # nsid -> (namespace, bdev channel)
        self.r2t_pending: dict[int, Request] = {}  # ttag -> request awaiting H2CData
        self._next_ttag = 0
        self.closed = False
        self.counters = QpairCounters()
        self.icd_limit = opts.in_capsule_data_size
        self.maxh2cdata = MAXH2CDATA
        # C2HData payload per PDU: the transport's io_unit_size (SPDK's unit of data
        # buffers), never more than one maximum transfer.
        self.c2h_chunk = max(min(opts.io_unit_size, opts.max_io_size), 4096)
        self.c2h_success_ok = False
        self._out: list[Any] = []
        self._flush_scheduled = False
        # ---- resource limits (tcp_limits.py): R2T buffer budget, stall watch ----
        self.budget_held = 0  # R2T buffer bytes this connection holds
        self.budget_queued = False  # waiting in the reactor budget's queue
        self.r2t_waiting: deque[Request] = deque()  # writes waiting for buffers
        self._budget_paused = False  # not read: its in-capsule data overran the budget
        self.rx_pdus = 0  # PDUs received (per receive call): the stall watch's clock
        tcp = target.tcp
        self.budget = tcp.budget(reactor) if tcp is not None else _unbounded_budget()
        self._watch: StallWatch | None = None
        self._watch_handle: asyncio.TimerHandle | None = None
        self._write_paused_at: float | None = None  # host not reading since (loop time)
        self._backlog: list[Any] = []  # PDUs received while the host was not reading
        # ---- read data sent from lent DMA memory (see _reap_sent) ----
        self._lent_new: list[Any] = []  # lent buffers whose PDUs are in _out
        self._lent_wait: deque[tuple[int, list[Any]]] = deque()  # (end mark, buffers)
        self._tx = 0  # bytes handed to the transport while lent buffers are tracked
        self._tx_transport: Any = None
        self._reap_handle: asyncio.TimerHandle | None = None
        self._reap_delay = 0.0
        self._reap_deadline = float("inf")
        # ---- write data received straight into lent DMA memory (see _try_direct) ----
        self._lends = False  # a bdev lent write memory on this connection (sticky)
        self._rx_req: Request | None = None  # whose payload is being received directly
        self._rx_view: memoryview | None = None  # where (the PDU's slice of req.dma.mem)
        self._rx_pos = 0  # bytes of it already in
        self._direct_rx: _DirectReceiver | None = None
        # the C lane (fastlane.py), created when an I/O queue connects, if it may have one
        self._lane: fastlane.Lane | None = None
        # ---- the socket lent to the reactor's C poller (netpoll.py) ----
        self._net: Any = None  # its struct bt_conn while lent
        self._net_ok = False  # this connection may lend its socket (netpoll.eligible)
        self._net_fd = -1
        self._net_high = 0  # the transport's high write mark, which C keeps too
        self._net_handle: Any = None
        self._net_seen = [0, 0]
        self._net_rings: tuple[Any, ...] = ()  # its lane's rings while lent (NetPoller.lend)
        self._rx_depth = 0  # inside data_received: nothing is lent mid-buffer
        self._net_retry: asyncio.TimerHandle | None = None  # see netpoll.try_lend

    def __str__(self) -> str:
        who = f"qid {self.qid}" if self.qid >= 0 else "unconnected"
        return f"{self.peer} {who}" + (f" ctrl {self.ctrl.cntlid}" if self.ctrl else "")

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        local = transport.get_extra_info("sockname")
        # the address the host reached us at (what a wildcard listener means to it)
        self.local_addr = local[0] if local else None
        tcp = self.target.tcp
        if tcp is not None:
            tcp.register_qpair(self.reactor, self)
        self._arm_watch()
        # Output queued beyond this means the host is not reading: pause_writing() then
        # stops reading its commands. High enough that a healthy host never gets there.
        high = max(4 * self.opts.max_io_size, 1 << 20)
        self._net_high = high
        set_limits = getattr(transport, "set_write_buffer_limits", None)
        if set_limits is not None:  # (unit tests drive Qpair with fake transports)
            set_limits(high=high, low=high // 4)
        log.debug("connection from %s on %s", self.peer, self.addr)

    def pause_writing(self) -> None:
        """The host stopped reading what we send. Stop reading its commands until it
        catches up: each would only queue more output (a read's data) without bound.
        The stall watch closes the connection if it never does."""
        loop = self.reactor.loop
        self._write_paused_at = loop.time() if loop is not None else 0.0
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The host caught up: handle the PDUs held back, then read again."""
        self._write_paused_at = None
        if self.transport is None or self.closed or self.transport.is_closing():
            return
        backlog, self._backlog = self._backlog, []
        for p in backlog:
            if self.closed or len(self._out) > OUT_BATCH:
                if self.closed or self._congested(backlog, p):
                    return
            self._handle_pdu(p)
        self._flush()  # (may lend the socket to C: then C reads it, not the transport)
        if (not self.closed and self._write_paused_at is None and not self._budget_paused
                and self._net is None):
            self.transport.resume_reading()

    def _congested(self, pdus: list[Any], p: Any) -> bool:
        """Output is piling up within one batch: hand it to the socket now. If the host
        is not reading it (pause_writing fired), keep the PDUs from ``p`` on for
        resume_writing and stop: a batch of reads must not queue unbounded data."""
        self._flush()
        self._flush_scheduled = True  # (data_received flushes once more at its end)
        if self._write_paused_at is None:
            return False
        i = next(i for i, x in enumerate(pdus) if x is p)
        self._backlog.extend(pdus[i:])
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown("connection lost" if exc is None else f"connection lost: {exc}")
        self._release_lent()  # the socket is closed: it reads no memory any more

    def get_buffer(self, sizehint: int) -> memoryview:
        arena = self.reactor.rx_arena
        if arena is None:
            arena = self.reactor.rx_arena = RxArena()
        return arena.room()

    def buffer_updated(self, nbytes: int) -> None:
        data = self.reactor.rx_arena.take(nbytes)
        if nbytes < RX_COPY_BELOW:
            # small reads (a QD1 capsule, a dribbling host) are copied: cheaper than
            # the bookkeeping, and they keep no arena alive
            self.data_received(bytes(data))
            return
        self.data_received(data, frozen=True)
        if not self.decoder.idle:
            # a PDU begun: its few bytes must not keep the arena alive (a PDU of which
            # most has come stays a view: its rest is on the way, or the stall watch
            # closes the connection)
            self.decoder.own_pending(RX_COPY_BELOW)

    def data_received(self, data: bytes | memoryview, frozen: bool = False) -> None:
        if self.reactor.spin_on_io:
            self.reactor.note_io()  # adaptive/busy polling: keep the loop spinning
        # Responses queued while this batch is handled go out in the one _flush() at the
        # end, so they need no call_soon'd flush: that was one extra loop callback per
        # wake-up (measurable at QD1). Completions arriving later schedule as usual.
        self._flush_scheduled = True
        self._rx_depth += 1
        try:
            lane = self._lane
            if lane is not None and len(data):
                if lane.carrying:
                    # the rest of a capsule the lane kept from the last buffer
                    handed, data = lane.carry(data)
                    if handed is not None:
                        self._decode(handed)  # not the lane's: Python's, before the rest
                    if not len(data) or self.closed:
                        return
                if lane.receiving:
                    # the rest of an H2CData PDU the lane is receiving is the lane's
                    data = lane.rx(data)
                    if not len(data):
                        return
                need = self.decoder.to_boundary()
                if 0 < need < len(data):
                    # finish the PDU in progress first, so the rest starts on a boundary
                    self._decode(memoryview(data)[:need], frozen)
                    data = memoryview(data)[need:]
                if lane.usable():
                    data = lane.feed(data)
                    if not len(data):
                        return
            self._decode(data, frozen)
            if self._lends and not self.closed and self._rx_view is None:
                self._try_direct()
        finally:
            self._rx_depth -= 1
            self._flush()  # also on the early returns: resets _flush_scheduled

    def _decode(self, chunk: Any, frozen: bool = False) -> None:
        """The Python path: decode every complete PDU in ``chunk`` and handle each."""
        while not self.closed:
            try:
                pdus = self.decoder.feed(chunk, frozen)
            except pdu.DataDigestError as err:
                # the PDUs before the damaged one, and that one, were received too
                self.rx_pdus += len(err.pdus) + 1
                for p in err.pdus:
                    self._handle_pdu(p)
                self._data_digest_error(err)
                chunk = b""  # the decoder stays usable: go on with what is buffered
                continue
            except pdu.ProtocolError as err:
                for p in err.pdus:
                    if self.closed:
                        return
                    self._handle_pdu(p)
                if not self.closed:
                    self.terminate(err)
                return
            self.rx_pdus += len(pdus)
            for p in pdus:
                if (self.closed or len(self._out) > OUT_BATCH
                        or self._write_paused_at is not None):
                    if self.closed or self._congested(pdus, p):
                        return
                self._handle_pdu(p)
            # the decoder pauses after ICReq so digests can be switched on first
            if pdus and type(pdus[-1]) is pdu.ICReq and self.decoder.buffered:
                chunk = b""
                continue
            break

    # ---- write data received by the kernel straight into lent DMA memory ----
    def _try_direct(self) -> None:
        """If the PDU being received is an H2CData whose request has lent memory
        (bdev.DataBuffer: the NVMe PCIe bdev's DMA buffer) and whose payload still has
        DIRECT_RX_MIN bytes or more to come, have the kernel receive the rest of it
        straight into that memory: the socket read becomes the only copy, as SPDK's
        readv() into its DMA buffers. The transport is switched to a BufferedProtocol
        (uvloop and asyncio read into get_buffer()'s memory) for the payload's remainder
        only; the staging through Python bytes stays for everything else, where it is
        cheaper. Only a PDU that would be placed as is qualifies: any error (unknown
        ttag, range, size, aborted command, digest) leaves it to the normal path."""
        got = self.decoder.data_header(DIRECT_RX_MIN)
        if got is None:
            return
        p, n = got
        req = self.r2t_pending.get(p.ttag)
        if (req is None or req.cid != p.cccid or req.done or req.bad_data
                or req.dma is None or p.datao != req.received
                or p.datao + n > req.xfer_len or n > self.maxh2cdata):
            return
        transport = self.transport
        set_protocol = getattr(transport, "set_protocol", None)
        if set_protocol is None or transport is None or transport.is_closing():
            return  # (unit tests' fake transports)
        dma = req.dma
        view = dma.mem[p.datao : p.datao + n]
        copied = self.decoder.divert(p, view)
        dma.rx_copied += copied
        self._rx_req, self._rx_view, self._rx_pos = req, view, copied
        if self._direct_rx is None:
            self._direct_rx = _DirectReceiver(self)
        set_protocol(self._direct_rx)

    def _direct_received(self, nbytes: int) -> None:
        """The kernel put ``nbytes`` more of the payload in place; once it is complete,
        back to data_received, which emits the PDU (after its data digest, if any)."""
        view = self._rx_view
        if view is None or self.closed:
            return
        self._rx_pos += nbytes
        req = self._rx_req
        if req is not None and req.dma is not None:
            req.dma.rx_direct += nbytes
        if self._rx_pos < len(view):
            if self.reactor.spin_on_io:
                self.reactor.note_io()
            return
        self.decoder.end_divert()
        if self.transport is not None:
            self.transport.set_protocol(self)
        self.data_received(b"")

    # ---- output ----
    def _send(self, p: pdu.Pdu) -> None:
        self._out.extend(pdu.encode(p, hdgst=self.hdgst, ddgst=self.ddgst, pda=self.hpda))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.reactor.loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._net is not None:  # the socket is C's: one queue for everything sent
            if self._out:
                out, self._out = self._out, []
                netpoll.write(self, out)
            return
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, []
            self.transport.writelines(out)
            if self._lent_new or self._lent_wait:
                self._tx_written(out)
        else:
            self._out.clear()
            if self._lent_new:  # never handed to a socket
                lent, self._lent_new = self._lent_new, []
                for b in lent:
                    b.release()
        if self._net_ok and not self._rx_depth:
            netpoll.try_lend(self)  # the steady state: lend the socket to C

    # ---- the socket lent to the reactor's C poller (netpoll.py) ----
    def _net_events(self) -> None:
        netpoll.events(self)

    def _net_back(self) -> None:
        """Take the socket back from C (it met input the lane does not take, the end of
        the stream, or the Python path has a command to do): the transport reads again,
        and what C received but did not run is handled as if just read."""
        _ev, first, rest = netpoll.give_back(self)
        t = self.transport
        if (t is not None and not self.closed and not t.is_closing()
                and self._write_paused_at is None and not self._budget_paused):
            t.resume_reading()
        if first is None and rest is None:
            return
        self._rx_depth += 1
        self._flush_scheduled = True
        try:
            if first is not None:
                self._decode(first)  # a capsule the lane carried but does not take
            if rest is not None and not self.closed:
                self.data_received(rest)
        finally:
            self._rx_depth -= 1
            self._flush()

    # ---- lent read data: released once the socket has it ----
    def _tx_written(self, out: list[Any]) -> None:
        """Count what ``writelines`` took and start waiting for the lent buffers in it.

        Neither transport copies a memoryview it cannot send at once (verified in the
        sources): uvloop's ``writelines`` appends ``memoryview(data).cast('b')`` to its
        buffer and, when libuv's queue is not empty (or the protocol is paused), defers
        the write to the end of the loop iteration; a partial write becomes a
        ``uv_write`` that pins the views (PyObject_GetBuffer) until libuv has written
        them. asyncio's selector transport (3.12+) keeps unsent views in a deque too
        (3.11 copied them into a bytearray). So a lent buffer may be reused only when
        its bytes have left the transport's buffer. Both count unsent bytes in
        ``get_write_buffer_size()`` (uvloop: its buffer + libuv's write_queue_size,
        which drops as bytes reach the kernel) and send in order, so a batch is gone
        once fewer bytes are pending than were written after it."""
        self._tx += sum(map(len, out))
        self._tx_transport = self.transport
        if self._lent_new:
            self._lent_wait.append((self._tx, self._lent_new))
            self._lent_new = []
            self._reap_delay = 0.0
        self._reap_sent()

    def _reap_sent(self) -> None:
        wait = self._lent_wait
        t = self._tx_transport
        if not wait or t is None:
            return
        sent = self._tx - t.get_write_buffer_size()
        while wait and wait[0][0] <= sent:
            for b in wait.popleft()[1]:
                b.release()
        if not wait:
            self._tx = 0
            self._tx_transport = None
            return
        loop = self.reactor.loop
        if self._reap_handle is None and loop is not None:
            # soon (uvloop sends deferred writes at the end of this iteration), then
            # backing off to 10 ms while the host is slow to read
            self._reap_handle = loop.call_later(self._reap_delay, self._reap_timer)
            self._reap_delay = min(max(self._reap_delay * 2, 0.0002), 0.01)

    def _reap_timer(self) -> None:
        self._reap_handle = None
        t = self._tx_transport
        loop = self.reactor.loop
        if (self.closed and t is not None and loop is not None
                and loop.time() >= self._reap_deadline):
            # closed by us with read data still queued: a host that reads nothing must
            # not keep the device's buffers; give it 5 s, then drop what is unsent
            t.abort()
            self._release_lent()
            return
        self._reap_sent()

    def _release_lent(self) -> None:
        """The transport is gone (or never got the data): release every lent buffer."""
        if self._reap_handle is not None:
            self._reap_handle.cancel()
            self._reap_handle = None
        lent, self._lent_new = self._lent_new, []
        while self._lent_wait:
            lent.extend(self._lent_wait.popleft()[1])
        self._tx = 0
        self._tx_transport = None
        for b in lent:
            b.release()

    def terminate(self, err: pdu.ProtocolError) -> None:
        """Fatal transport error: C2HTermReq (unless forbidden), then close."""
        log.warning("%s: protocol error, terminating: %s (fes %d fei %d)", self, err,
                    err.fes, err.fei)
        if err.send_term_req and self.transport is not None:
            self._out.extend(pdu.encode(err.term_req(c2h=True)))
        self._flush()
        self.close(f"protocol error: {err}")

    def _fatal(self, fes: int, fei: int, why: str, header: bytes = b"") -> None:
        self.terminate(pdu.ProtocolError(why, fes=fes, fei=fei, header=header))

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        log.info("%s: closing (%s)", self, reason or "closed")
        self._net_ok = False
        if self._net is not None:
            netpoll.give_back(self)  # (its unsent output first, then ours, then close)
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self._teardown(reason)

    def close_threadsafe(self, reason: str) -> None:
        """Close from any thread (controller teardown runs on the admin queue's reactor)."""
        if self.reactor.on_reactor():
            self.close(reason)
        elif self.reactor.loop is not None:
            self.reactor.loop.call_soon_threadsafe(self.close, reason)

    def _teardown(self, reason: str) -> None:
        if self.closed and self.transport is None:
            return
        self.closed = True
        self._net_ok = False
        if self._net_retry is not None:
            self._net_retry.cancel()
            self._net_retry = None
        if self._net is not None:
            netpoll.give_back(self, send=False)  # (the transport is gone)
        if self.auth_job is not None or self.auth_waiting:
            auth_cmd.on_teardown(self)
        for req in list(self.requests.values()):
            req.done = True  # bdev completions arriving later are dropped
        for req in self.r2t_pending.values():
            if req.dma is not None:  # still receiving: no bdev I/O holds the memory
                req.dma.release()
                req.dma = None
        self.requests.clear()
        self.r2t_pending.clear()
        self.r2t_waiting.clear()
        self._backlog.clear()
        if self._lane is not None:
            self._lane.fold()  # (its budget held too, before the queue's goes back)
        self.budget.drop(self)
        if self._lane is not None:
            self._lane.close()
            self._lane = None
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        ctrl = self.ctrl
        if ctrl is not None:
            ctrl.remove_qpair(self.qid, self)
            if self.qid == 0:
                ctrl.teardown(reason or "admin queue closed")
                self.target.controllers.remove(ctrl)
        tcp = self.target.tcp
        if tcp is not None:
            tcp.unregister_qpair(self.reactor, self)
        if self._lent_wait or self._lent_new:
            # closed by us: the transport may still be sending read data from lent
            # memory; _reap_sent goes on until it has (or connection_lost, or 5 s)
            loop = self.reactor.loop
            self._reap_deadline = loop.time() + 5.0 if loop is not None else 0.0
            for b in self._lent_new:
                b.release()  # (close() flushed _out; these never reached the socket)
            self._lent_new = []
            if self._tx_transport is None or loop is None:
                self._release_lent()
            else:
                self._reap_sent()
        self.transport = None

    # ---- PDUs ----
    def _handle_pdu(self, p: pdu.Pdu) -> None:
        t = type(p)
        if t is pdu.CapsuleCmd:
            self._capsule(p)  # type: ignore[arg-type]
        elif t is pdu.H2CData:
            self._h2c_data(p)  # type: ignore[arg-type]
        elif t is pdu.ICReq:
            self._icreq(p)  # type: ignore[arg-type]
        elif t is pdu.TermReq:
            log.warning("%s: host terminated the connection: fes %d fei %d", self, p.fes, p.fei)
            self.close("H2CTermReq from host")

    def _icreq(self, p: pdu.ICReq) -> None:
        if p.pfv != 0:
            self._fatal(pdu.Fes.UNSUPPORTED_PARAMETER, pdu.OFFSET_IC_PFV, "unsupported PFV")
            return
        if p.hpda > pdu.MAX_PDA:
            self._fatal(pdu.Fes.INVALID_HEADER_FIELD, pdu.OFFSET_IC_PDA, "HPDA out of range")
            return
        self.hpda = p.hpda
        self.maxr2t = p.maxr2t
        self.hdgst = p.header_digest and self.opts.header_digest
        self.ddgst = p.data_digest and self.opts.data_digest
        dgst = (pdu.DGST_HEADER if self.hdgst else 0) | (pdu.DGST_DATA if self.ddgst else 0)
        self._out.extend(pdu.encode(pdu.ICResp(pfv=0, cpda=0, dgst=dgst,
                                               maxh2cdata=self.maxh2cdata)))
        self.decoder.set_digests(self.hdgst, self.ddgst)
        self.decoder.set_pda(0)
        self.ic_done = True
        self._flush()

    def _capsule(self, p: pdu.CapsuleCmd) -> None:
        sqe = parse_sqe(p.sqe)
        if self.qid >= 0 and not self.sq_flow_disabled:
            self.sqhd = (self.sqhd + 1) % (self.sqsize + 1)
            if self._lane is not None and self._lane.c is not None:
                # (the lane's responses to I/O completing later carry the SQ head too)
                self._lane.c.sqhd = self.sqhd
        req = Request(self, sqe)
        if self.qid <= 0:
            log.debug("%s: admin cid %d opcode 0x%02x fctype %d cdw10 0x%x cdw11 0x%x", self,
                      sqe.cid, sqe.opcode, sqe.fctype, sqe.cdw10, sqe.cdw11)
        prev = self.requests.get(sqe.cid)
        lane = self._lane
        if prev is not None:
            if prev.opcode == spec.AdminOpcode.ASYNC_EVENT_REQUEST and self.qid == 0:
                # SPDK's host forgets its held AERs at shutdown and reuses their ids;
                # the forgotten AER must then never complete.
                prev.done = True
            else:
                # A host reusing a busy command id is broken; fail the new one only.
                self._respond(sqe.cid, SC_CID_CONFLICT)
                return
        elif lane is not None and lane.inflight:
            # the C lane's commands are outstanding commands of this queue too
            if lane.busy(sqe.cid):
                self._respond(sqe.cid, SC_CID_CONFLICT)
                return
            if len(self.requests) + lane.inflight > self.sqsize:
                self._queue_overflow(sqe)
                return
        elif self.qid >= 0 and len(self.requests) > self.sqsize:
            self._queue_overflow(sqe)
            return
        self.requests[sqe.cid] = req
        # plain ints, not DataTransfer(...): building an enum per command is measurable
        if sqe.opcode == FABRICS_OPCODE:
            direction = _FCTYPE_DIR.get(sqe.fctype, sqe.fctype & 3)
        else:
            direction = sqe.opcode & 3
        sgl_id = sqe.sgl_id
        length = sqe.sgl_len
        icd = p.data
        if sqe.psdt == 0 and sqe.opcode != spec.FABRICS_OPCODE:
            req.fail(SC_INVALID_FIELD)  # PRPs do not exist on fabrics
            return
        if len(icd):
            if sgl_id != spec.SGL_ID_INCAPSULE:
                req.fail(SC_SGL_TYPE)
                return
            if sqe.sgl_addr != 0:
                req.fail(SC_SGL_OFFSET)
                return
            limit = ADMIN_ICD if self.qid <= 0 else self.icd_limit
            if length != len(icd) or length > limit:
                req.fail(SC_SGL_LENGTH)
                return
            if direction != DIR_H2C:
                req.fail(SC_INVALID_FIELD)
                return
            req.data = icd
            req.received = length
            req.icd_held = length
            if not self.budget.hold(self, length) and not self.r2t_pending:
                # (a connection with an R2T outstanding keeps reading: its data is what
                # returns the buffers)
                self._budget_paused = True
                if self.transport is not None:
                    self.transport.pause_reading()
            self._execute(req)
            return
        if length == 0 or direction == DIR_NONE:
            req.xfer_len = 0 if direction == DIR_NONE else length
            self._execute(req)
            return
        if sgl_id == spec.SGL_ID_INCAPSULE:
            # the SGL promises in-capsule data the capsule does not carry
            req.fail(SC_SGL_LENGTH)
            return
        if sgl_id != spec.SGL_ID_TRANSPORT:
            req.fail(SC_SGL_TYPE)
            return
        if length > self.opts.max_io_size and self.qid > 0:
            # over MDTS: the I/O handler reports Invalid Field; never allocate for it
            self._execute(req)
            return
        if self.qid <= 0 and length > max(self.opts.max_io_size, ADMIN_ICD):
            # Buffers are sized from the host's SGL length (the R2T buffer, zero-filled
            # log pages), so on the admin queue and before Connect it is bounded by MDTS
            # too, as SPDK does for every queue (found by the fuzzer: one 4 GiB SGL cost
            # 4 GiB of RSS).
            req.fail(SC_SGL_LENGTH)
            return
        if direction == DIR_H2C and self.qid < 0:
            # Before Connect only one Connect may wait for its data; anything else is
            # refused by dispatch (Command Sequence Error) without buffering its data.
            is_connect = (sqe.opcode == FABRICS_OPCODE
                          and sqe.fctype == spec.FabricsType.CONNECT)
            if not is_connect or self.r2t_pending:
                self._execute(req)
                return
        if direction == DIR_H2C:
            self._start_r2t(req)
        else:
            self._execute(req)

    def channel_of(self, ns: Any) -> tuple[Any, Any]:
        """(namespace, this reactor's channel to its bdev), cached per queue pair by nsid;
        a namespace replaced under the same nsid gets its own channel."""
        cached = self.channels.get(ns.nsid)
        if cached is None or cached[0] is not ns:
            cached = self.channels[ns.nsid] = (ns, ns.bdev.get_io_channel(self.reactor))
        return cached

    # ---- host to controller data ----
    def _start_r2t(self, req: Request) -> None:
        """Ask for the data once buffers for it fit the budget; until then the write
        waits (in order) and nothing is allocated for it."""
        if self.r2t_waiting or not self.budget.take(self, req.xfer_len):
            self.r2t_waiting.append(req)
            return
        self._send_r2t(req)

    def resume_r2t(self) -> None:
        """Called by the budget when buffers were returned: read again if in-capsule
        data had paused us, and start waiting writes."""
        if self._budget_paused:
            self._budget_paused = False
            if (self.transport is not None and not self.closed
                    and self._write_paused_at is None and self._net is None):
                self.transport.resume_reading()
        waiting = self.r2t_waiting
        while waiting and not self.closed:
            req = waiting[0]
            if req.done:
                waiting.popleft()
                continue
            if not self.budget.take(self, req.xfer_len):
                return  # queued again, at the tail
            waiting.popleft()
            self._send_r2t(req)

    def _send_r2t(self, req: Request) -> None:
        # ttags from 0x8000 up are the C lane's (fastlane.py): ours stay below
        ttag = self._next_ttag
        self._next_ttag = (self._next_ttag + 1) & 0x7FFF
        while ttag in self.r2t_pending:
            ttag = self._next_ttag
            self._next_ttag = (self._next_ttag + 1) & 0x7FFF
        req.ttag = ttag
        req.data = None  # _h2c_data allocates it unless one PDU brings the whole transfer
        if req.opcode == OPC_WRITE and self.qid > 0:
            self._lend_write_buffer(req)
        self.r2t_pending[ttag] = req
        self._send(pdu.R2T(cccid=req.cid, ttag=ttag, r2to=0, r2tl=req.xfer_len))

    def _lend_write_buffer(self, req: Request) -> None:
        """Let the namespace's bdev channel lend memory for the data (the NVMe PCIe bdev
        lends the DMA buffer the command's PRPs will point at), so the data lands where
        the device reads it. The channel is found and cached as io._channel does (the
        write needs it anyway); for other bdevs this costs two lookups per R2T."""
        sub = self.subsystem
        ns = sub.visible_ns(req.nsid, self.hostnqn) if sub is not None else None
        if ns is None:
            return  # dispatch fails the command
        try:
            cached = self.channel_of(ns)
        except Exception:  # (e.g. a removed device): the write fails it properly
            return
        alloc = cached[1].alloc_data_buffer
        if alloc is not None:
            req.dma = alloc(req.xfer_len)
            if req.dma is not None:
                self._lends = True  # from now on data_received looks for large payloads

    def _h2c_data(self, p: pdu.H2CData, corrupt: bool = False) -> None:
        """Place one H2CData PDU. ``corrupt``: its data digest failed; the PDU is still
        checked and counted (the host goes on sending the rest of the transfer), but
        the command will fail with Transient Transport Error instead of executing."""
        req = self.r2t_pending.get(p.ttag)
        if req is None and self._lane is not None and self._lane.owns_ttag(p.ttag):
            # one of the C lane's writes: it places the data itself (the PDU spanned
            # receive buffers), unless something about it is unusual: then the Python
            # path takes the write over and handles it as its own
            if not corrupt and self._lane.h2c(p):
                return
            req = self._adopt(p.ttag)
        if req is None or req.cid != p.cccid:
            self._fatal(pdu.Fes.INVALID_HEADER_FIELD,
                        pdu.OFFSET_TTAG if req is None else pdu.OFFSET_CCCID,
                        f"H2CData for unknown ttag {p.ttag} / cccid {p.cccid}",
                        self._h2c_header(p))
            return
        n = len(p.data)
        direct = p.data is self._rx_view  # received straight into req.dma.mem
        if direct:
            self._rx_req = self._rx_view = None
            if req.done and req.dma is not None:  # (finish() left it to us: release now)
                req.dma.release()
                req.dma = None
        # FEI is defined only for Invalid Header Field / Unsupported Parameter (the
        # offending field's offset); for the other FES values it is reserved: 0.
        if p.datao != req.received or p.datao + n > req.xfer_len:
            self._fatal(pdu.Fes.DATA_TRANSFER_OUT_OF_RANGE, 0,
                        f"H2CData offset {p.datao}+{n} outside expected {req.received} "
                        f"of {req.xfer_len}", self._h2c_header(p))
            return
        if n > self.maxh2cdata:
            self._fatal(pdu.Fes.DATA_TRANSFER_LIMIT_EXCEEDED, 0,
                        f"H2CData of {n} bytes exceeds MAXH2CDATA", self._h2c_header(p))
            return
        if corrupt:
            req.bad_data = True
        elif not req.done:
            dma = req.dma
            if dma is not None:
                if not direct:
                    dma.mem[p.datao : p.datao + n] = p.data
                    dma.rx_copied += n
                if req.data is None:
                    req.data = dma.mem[: req.xfer_len]
            elif n == req.xfer_len:
                # The whole transfer in one PDU (datao is 0, checked above): keep the
                # decoder's view (immutable bytes) instead of zero-filling a buffer and
                # copying into it; that was two of the four passes over a 128 KiB write.
                req.data = p.data
            else:
                if req.data is None:
                    req.data = memoryview(bytearray(req.xfer_len))
                req.data[p.datao : p.datao + n] = p.data
        req.received += n
        if req.received == req.xfer_len:
            if not p.last:
                self._fatal(pdu.Fes.PDU_SEQUENCE_ERROR, 0,
                            "last H2CData PDU without DATA_LAST", self._h2c_header(p))
                return
            del self.r2t_pending[p.ttag]
            if req.done:
                pass  # aborted while its data was on the way: nothing left to do
            elif req.bad_data:
                req.fail(SC_TRANSIENT)
            else:
                self._execute(req)
        elif p.last:
            self._fatal(pdu.Fes.PDU_SEQUENCE_ERROR, 0,
                        "DATA_LAST before all R2T data was sent", self._h2c_header(p))

    def redo(self, sqe_bytes: bytes, data: bytes | None, corrupt: bool = False) -> None:
        """A command the C lane took that did not succeed there (fastlane.Lane._redo):
        run it again from the start on the Python path, which answers it (with the
        bdev's error status, typically). Its capsule was counted when it came (SQ head);
        its data, for a write, is the lane's copy. ``corrupt``: its data came with a
        data digest that did not match: failed, as _h2c_data fails such a write."""
        sqe = parse_sqe(sqe_bytes)
        req = Request(self, sqe)
        if corrupt:
            log.warning("%s: data digest error on cid %d", self, sqe.cid)
            self.requests[sqe.cid] = req
            req.fail(SC_TRANSIENT)
            return
        if (sqe.opcode & 3) == DIR_NONE:
            req.xfer_len = 0
        if data is not None:
            req.data = data
            req.received = len(data)
        self.requests[sqe.cid] = req
        self._execute(req)

    def _adopt(self, ttag: int) -> Request | None:
        """Take one of the C lane's writes waiting for its data over as a Request of the
        Python path, with what data came so far (fastlane.Lane.adopt)."""
        got = self._lane.adopt(ttag) if self._lane is not None else None
        if got is None:
            return None
        sqe_bytes, data, received = got
        req = Request(self, parse_sqe(sqe_bytes))
        req.ttag = ttag
        req.data = data
        req.received = received
        self.requests[req.cid] = req
        self.r2t_pending[ttag] = req  # (its budget is already in budget_held)
        return req

    def abort_waiting(self, cid: int) -> bool:
        """Abort command ``cid`` if it is still waiting for its R2T data (it has not
        started, so nothing in the bdev needs undoing). Its ttag stays known so data the
        host already sent is consumed quietly rather than treated as a protocol error."""
        if cid not in self.requests and self._lane is not None:
            ttag = self._lane.r2t_of(cid)
            if ttag >= 0:
                self._adopt(ttag)
        req = self.requests.get(cid)
        if req is None or req.done or req.ttag < 0 or req.ttag not in self.r2t_pending:
            return False
        req.fail(spec.make_status(G, spec.GenericStatus.ABORTED_BY_REQUEST))
        return True

    def _h2c_header(self, p: pdu.H2CData) -> bytes:
        """The offending PDU's header for the C2HTermReq (re-encoded: same bytes)."""
        return bytes(pdu.encode(p, hdgst=self.hdgst, ddgst=self.ddgst)[0][:24])

    def _data_digest_error(self, err: pdu.DataDigestError) -> None:
        """Fail the command whose data was corrupted; the connection stays up (spec).

        A capsule's in-capsule data: the command is failed at once, never executed.
        H2CData: the transfer is followed to its end, then the command fails."""
        log.warning("%s: data digest error on cid %d", self, err.cccid)
        p = err.pdu
        if type(p) is pdu.H2CData:
            self._h2c_data(p, corrupt=True)
            return
        if type(p) is pdu.CapsuleCmd:
            sqe = parse_sqe(p.sqe)
            if self.qid >= 0 and not self.sq_flow_disabled:
                self.sqhd = (self.sqhd + 1) % (self.sqsize + 1)
                if self._lane is not None and self._lane.c is not None:
                    self._lane.c.sqhd = self.sqhd
            if sqe.cid in self.requests or (self._lane is not None
                                            and self._lane.busy(sqe.cid)):
                self._respond(sqe.cid, SC_CID_CONFLICT)
                return
            req = Request(self, sqe)
            self.requests[sqe.cid] = req
            req.fail(SC_TRANSIENT)

    # ---- dispatch ----
    def _execute(self, req: Request) -> None:
        try:
            dispatch(self, req)
        except Exception:
            log.exception("%s: opcode 0x%02x failed", self, req.opcode)
            req.fail(SC_INTERNAL)

    # ---- controller to host data ----
    def send_c2h(self, req: Request, buf: Any, lent: Any = None) -> None:
        """Send read data. A view of live bdev memory is snapshotted first: the socket
        may still hold it after a later write to the same blocks completes, which would
        tear the block the host reads and break the data digest computed here.
        Memory lent for this one read (``lent``, a DataBuffer) is sent as is: nothing
        else writes it until it is released, after the transport took the bytes."""
        xfer = req.xfer_len
        total = len(buf)
        if xfer and xfer < total:
            total = xfer
        if lent is not None:
            data = buf if len(buf) == total else buf[:total]
            self._lent_new.append(lent)  # (digests below are computed before release)
        else:
            data = _wire_data(buf, total)
        chunk = self.c2h_chunk
        if total <= chunk:  # the common case: one PDU, no slicing
            self._out.extend(pdu.encode_c2h(req.cid, 0, data, True, self.c2h_success_ok,
                                            self.hdgst, self.ddgst, self.hpda))
        else:
            mv = memoryview(data)
            success = self.c2h_success_ok
            out = self._out
            hdgst, ddgst, pda, cid = self.hdgst, self.ddgst, self.hpda, req.cid
            off = 0
            while off < total:
                n = min(chunk, total - off)
                last = off + n >= total
                out.extend(pdu.encode_c2h(cid, off, mv[off : off + n], last, success and last,
                                          hdgst, ddgst, pda))
                off += n
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.reactor.loop.call_soon(self._flush)  # type: ignore[union-attr]

    def finish(self, req: Request, status: int, dw0: int, dw1: int,
               response_sent: bool = False) -> None:
        if self.requests.get(req.cid) is req:
            del self.requests[req.cid]
        if req.dma is not None and req is not self._rx_req:
            # the command is over: its lent write memory goes back (unless the kernel is
            # receiving its data into it: then when that payload is complete, _h2c_data)
            req.dma.release()
            req.dma = None
        if self.closed:
            return  # (teardown returned every buffer of the connection)
        if status:
            log.debug("%s: cid %d opcode 0x%02x failed: %s", self, req.cid, req.opcode,
                      spec.status_name(status, req.opcode == spec.FABRICS_OPCODE))
        if status and self.ctrl is not None:
            try:
                self.ctrl.record_error(max(self.qid, 0), req.cid, status, req.nsid)
            except Exception:  # bookkeeping must never cost the host its completion
                log.exception("%s: recording an error log entry failed", self)
        if not response_sent:
            self._respond(req.cid, status, dw0, dw1)
        if req.ttag >= 0:
            # its R2T buffer, after the response: a waiting write's R2T may go out now
            self.budget.give_back(self, req.xfer_len)
        elif req.icd_held:
            self.budget.give_back(self, req.icd_held)

    def _respond(self, cid: int, status: int, dw0: int = 0, dw1: int = 0) -> None:
        if self._net is not None:  # (lent: C moved the SQ head, folded lazily)
            self.sqhd = self._lane.c.sqhd  # type: ignore[union-attr]
        sqhd = 0 if self.sq_flow_disabled else self.sqhd
        qid = self.qid
        self._out.append(pdu.encode_resp(cid, status, sqhd, qid if qid > 0 else 0, dw0, dw1,
                                         self.hdgst))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.reactor.loop.call_soon(self._flush)  # type: ignore[union-attr]

    # ---- limits ----
    def _queue_overflow(self, sqe: Sqe) -> None:
        """More commands outstanding than the queue has entries (SQSIZE+1): the host
        ignores the size it asked for in Connect. As SPDK and Linux do, end the
        connection instead of buffering without bound."""
        self.budget.closed_by[QUEUE_OVERFLOW] += 1
        self._fatal(pdu.Fes.PDU_SEQUENCE_ERROR, 0,
                    f"command cid {sqe.cid} exceeds the queue size ({self.sqsize + 1} "
                    "commands outstanding)")

    def _arm_watch(self) -> None:
        opts = self.opts
        stall, r2t = opts.stall_timeout_sec, opts.r2t_timeout_sec
        period = StallWatch.period(stall, r2t)
        loop = self.reactor.loop
        if period is None or loop is None:
            return
        self._watch = StallWatch(stall, r2t, loop.time())
        self._watch_handle = loop.call_later(period, self._check_watch, period)

    def _check_watch(self, period: float) -> None:
        """Timer, per connection: close it when the host has gone quiet on us."""
        self._watch_handle = None
        watch, loop = self._watch, self.reactor.loop
        if self.closed or watch is None or loop is None:
            return
        if self._net is not None and self._lane is not None:
            self._lane.fold()  # (lent: the PDUs C took, counted lazily)
        verdict = watch.check(loop.time(), connected=self.qid >= 0,
                              # (not read while paused for the budget: not its stall)
                              buffered=0 if self._budget_paused else (
                                  self.decoder.buffered + self._lane_partial()
                                  + (self._net.pend_len if self._net is not None else 0)),
                              pdus=self.rx_pdus,
                              r2t_pending=self._all_r2t_pending(),
                              write_paused_since=self._write_paused_at)
        if verdict is not None:
            kind, why = verdict
            self.budget.closed_by[kind] += 1
            log.warning("%s: %s: closing the connection", self, why)
            self.close(why)
            return
        self._watch_handle = loop.call_later(period, self._check_watch, period)

    def _lane_partial(self) -> int:
        """Bytes of a PDU the C lane has begun receiving (for the stall watch)."""
        lane = self._lane
        c = lane.c if lane is not None else None
        if c is None:
            return 0
        return c.carry_len + (c.rx_off + 1 if c.rx_left or c.rx_dleft else 0)

    def _all_r2t_pending(self) -> Any:
        """Every write waiting for data, the Python path's and the C lane's."""
        lane = self._lane
        if lane is None or not lane.inflight:
            return self.r2t_pending
        return {**self.r2t_pending, **lane.r2t_pending()}

    # ---- after Connect ----
    def connected(self, ctrl: Controller, qid: int, sqsize: int, cattr: int) -> None:
        self.ctrl = ctrl
        self.subsystem = ctrl.subsystem
        self.hostnqn = ctrl.hostnqn
        self.qid = qid
        self.sqsize = sqsize
        self.sq_flow_disabled = bool(cattr & spec.CONNECT_CATTR_DISABLE_SQFLOW)
        self.sqhd = 1 % (sqsize + 1)  # the Connect itself was the first entry
        self.c2h_success_ok = self.sq_flow_disabled and self.opts.c2h_success
        ctrl.add_qpair(qid, self)
        self._lane = fastlane.create(self)
        if netpoll.eligible(self):
            self._net_ok = True
            self._net_handle = fastlane.ffi.new_handle(self)


def _wire_data(buf: Any, total: int) -> bytes | memoryview:
    """The first ``total`` bytes of read data, safe to queue on the socket.

    Immutable memory (``bytes``, or a view of it: the null bdev's zeroes, admin pages)
    goes out as is, without a copy. Anything mutable (a malloc bdev's memory) is
    snapshotted: the transport may still hold the buffer after a later write to the same
    blocks completed, which would tear the block the host reads and break the data
    digest computed when the PDU was queued (seen with randrw and digests)."""
    t = type(buf)
    if t is bytes:
        return buf if len(buf) == total else memoryview(buf)[:total]
    if t is memoryview and buf.ndim == 1 and buf.format == "B":
        if buf.readonly and type(buf.obj) is bytes:
            return buf if len(buf) == total else buf[:total]
        return buf.tobytes() if len(buf) == total else buf[:total].tobytes()
    mv = memoryview(buf).cast("B")
    if mv.readonly and type(mv.obj) is bytes:
        return mv[:total]
    return mv[:total].tobytes()


class _DirectReceiver(asyncio.BufferedProtocol):
    """The connection's protocol while an H2CData payload is received straight into
    lent memory (Qpair._try_direct): get_buffer() is the payload's remainder, so the
    kernel writes nothing else there, and every other event goes to the Qpair."""

    __slots__ = ("qp",)

    def __init__(self, qp: Qpair) -> None:
        self.qp = qp

    def get_buffer(self, sizehint: int) -> memoryview:
        qp = self.qp
        view = qp._rx_view
        if view is None:  # never while reading: the Qpair switched back first
            raise RuntimeError(f"{qp}: no payload to receive into")
        return view[qp._rx_pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self.qp._direct_received(nbytes)

    def eof_received(self) -> bool | None:
        return self.qp.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.qp.connection_lost(exc)

    def pause_writing(self) -> None:
        self.qp.pause_writing()

    def resume_writing(self) -> None:
        self.qp.resume_writing()


def _unbounded_budget() -> DataBudget:
    """For a queue pair without a transport (unit tests drive Qpair directly)."""
    return DataBudget(limit=1 << 62, per_qpair=1 << 62)


def _default_opts() -> Any:
    from ..transport_opts import TransportOptions

    return TransportOptions()


def make_qpair_protocol(target: Target, reactor: Reactor, addr: ListenAddress) -> Qpair:
    return Qpair(target, reactor, addr)
