"""One NVMe/TCP queue pair seen from the host: one TCP connection, one SQ/CQ pair.

The wire format lives in :mod:`blocktarget.nvme.pdu`; this module owns what the codec
cannot know: which command a PDU belongs to, where its data goes, when it is complete.
It is an :class:`asyncio.Protocol` rather than a stream pair because the read path must
decode every PDU of a segment in one call (a stream would wake one coroutine per read)
and the write path must coalesce the PDUs of many commands into one ``writelines``
(one syscall per loop iteration instead of one per command).

Choices (each checked against Linux ``drivers/nvme/host/tcp.c`` and SPDK
``lib/nvme/nvme_tcp.c``):

* ICReq: PFV 0, HPDA 0 (we accept data at any dword offset), MAXR2T 0 (one R2T in
  flight per command, what both reference hosts ask for). A controller that does not
  enable exactly the digests we asked for is refused, as Linux does: silently running
  without a digest the user asked for would hide the very errors it is there to catch.
* Every command carries PSDT = 01b (SGL, "MPTR contiguous"): the Linux target rejects
  anything else with Invalid Field, fabrics commands included.
* Writes up to the in-capsule limit (``icd_max``: IOCCSZ*16 - 64 on I/O queues, 8 KiB
  on the admin queue as Linux uses) travel in the capsule; larger ones wait for R2T
  and are sent as H2CData PDUs of at most MAXH2CDATA bytes, the last one flagged LAST.
* C2HData must arrive in order (DATAO equal to the bytes received so far) and inside
  the command's buffer; anything else is fatal (H2CTermReq, then close). A C2HData
  with SUCCESS completes the command without a CapsuleResp.
* A data digest mismatch is not fatal (the framing is intact): the command completes
  with Transient Transport Error once its completion arrives, as the spec asks.
* A command that does not complete within its timeout tears the connection down and
  fails everything outstanding, like Linux error recovery: reusing the CID of a
  command the controller may still answer would be worse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from blocktarget.nvme import pdu, spec

__all__ = [
    "ADMIN_ICD_MAX",
    "Completion",
    "NvmeStatusError",
    "QueuePair",
    "Response",
    "TransportError",
]

log = logging.getLogger(__name__)

ADMIN_ICD_MAX = 8192  # in-capsule data the Linux host uses on admin queues (Connect data)
PSDT_SGL = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT  # 0x40

_SQE = struct.Struct("<BBHIIIQQI3xBIIIIII")
_CQE = struct.Struct("<IIHHHH")
_new_tuple = tuple.__new__


class Completion(NamedTuple):
    """The parts of a CQE a caller can use; ``status`` is spec's 15-bit form."""

    status: int
    dw0: int
    dw1: int
    sqhd: int

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def result64(self) -> int:
        """Dwords 0-1 as one value (an 8-byte Property Get)."""
        return self.dw0 | (self.dw1 << 32)


class Response(NamedTuple):
    """A completed command: its completion and, for reads, the data received."""

    completion: Completion
    data: memoryview | None


class NvmeStatusError(Exception):
    """A command completed with a non-zero NVMe status."""

    def __init__(self, status: int, what: str = "command", *, fabrics: bool = False,
                 completion: Completion | None = None) -> None:
        self.status = status
        self.sct = spec.status_sct(status)
        self.sc = spec.status_sc(status)
        self.name = spec.status_name(status, fabrics=fabrics)
        self.completion = completion
        super().__init__(
            f"{what} failed: {self.name} (sct {self.sct:#x}, sc {self.sc:#04x})"
        )


class TransportError(ConnectionError):
    """The NVMe/TCP connection failed (TermReq, protocol violation, timeout)."""

    def __init__(self, message: str, *, fes: int | None = None) -> None:
        super().__init__(errno.ECONNABORTED, message)
        self.fes = fes

    def __str__(self) -> str:
        return str(self.args[1])


# cb(completion, data) on completion; cb(None, exception) when the queue pair fails.
Callback = Callable[[Completion | None, Any], None]


class _Cmd:
    """Per-CID state of an outstanding command."""

    __slots__ = ("cb", "in_buf", "in_len", "out", "received", "sent", "short_ok",
                 "status_override")

    def __init__(self) -> None:
        self.cb: Callback | None = None
        self.out: memoryview | None = None  # data to send on R2T (None: in capsule / none)
        self.in_len = 0
        self.in_buf: memoryview | None = None
        self.received = 0
        self.sent = 0
        self.status_override = 0
        self.short_ok = False  # less data than in_len is no error (Authentication Receive)


def _view(data: Any) -> memoryview:
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class QueuePair(asyncio.Protocol):
    """One NVMe/TCP connection; create with :meth:`open`.

    ``depth`` bounds the commands outstanding at once (CIDs 0..depth-1). The caller
    picks it from the negotiated queue size; submitting when all CIDs are taken waits
    (:meth:`submit`) or raises (:meth:`submit_cb`, the callback-driven fast path used
    by ``perf``).
    """

    def __init__(self, qid: int, depth: int, hdgst: bool, ddgst: bool,
                 loop: asyncio.AbstractEventLoop) -> None:
        if not 1 <= depth <= 0xFFFF:
            raise ValueError("queue depth must be 1..65535")
        self.qid = qid
        self.depth = depth
        self.want_hdgst = hdgst
        self.want_ddgst = ddgst
        self.hdgst = False
        self.ddgst = False
        self.cpda = 0
        self.maxh2cdata = 0
        self.icd_max = ADMIN_ICD_MAX if qid == 0 else 0
        self.icdoff = 0
        self.peer = ""
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._dec = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
        self._dec.set_pda(0)
        self._ic_future: asyncio.Future[None] = loop.create_future()
        self._closed_future: asyncio.Future[None] = loop.create_future()
        self._cmds = [_Cmd() for _ in range(depth)]
        self._free = list(range(depth - 1, -1, -1))
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._out: list[bytes | memoryview] = []
        self._flush_pending = False
        self._receiving = False
        self._error: BaseException | None = None
        self._can_write = True
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._tls_raw: Any = None  # the socket's transport under TLS (see _open_tls)

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, addr: str, port: int, *, qid: int, depth: int, hdgst: bool = False,
                   ddgst: bool = False, timeout: float = 10.0,
                   tls: tuple[bytes, bytes, int] | None = None) -> QueuePair:
        """Connect and complete ICReq/ICResp; raises ConnectionError/TimeoutError.

        ``tls`` = (PSK identity, TLS PSK, hash id): the queue runs over TLS 1.3 with that
        external PSK (host/tls.py derives them); a failed handshake raises ConnectionError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if tls is None:
                _, qp = await loop.create_connection(
                    lambda: cls(qid, depth, hdgst, ddgst, loop), addr, port
                )
            else:
                qp = await cls._open_tls(loop, addr, port, qid, depth, hdgst, ddgst, tls)
            try:
                await qp._ic_future
            except BaseException:
                qp.close()
                raise
        return qp

    @classmethod
    async def _open_tls(cls, loop: asyncio.AbstractEventLoop, addr: str, port: int, qid: int,
                        depth: int, hdgst: bool, ddgst: bool,
                        tls: tuple[bytes, bytes, int]) -> QueuePair:
        from ..tls import TlsSession
        from ..tls_transport import TlsProtocol

        identity, key, hash_id = tls
        qp = cls(qid, depth, hdgst, ddgst, loop)

        def failed(kind: str, message: str) -> None:
            if not qp._ic_future.done():
                qp._ic_future.set_exception(ConnectionError(f"TLS to {addr}:{port}: {message}"))

        session = TlsSession(False, identity=identity, key=key, hash_id=hash_id)
        raw, _ = await loop.create_connection(
            lambda: TlsProtocol(session, lambda: qp, on_failure=failed), addr, port)
        qp._tls_raw = raw  # closed by close() if the handshake never completes
        sock = raw.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return qp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        dgst = (pdu.DGST_HEADER if self.want_hdgst else 0) | (
            pdu.DGST_DATA if self.want_ddgst else 0
        )
        transport.writelines(pdu.encode(pdu.ICReq(pfv=0, hpda=0, dgst=dgst, maxr2t=0)))

    def connection_lost(self, exc: Exception | None) -> None:
        err = self._error
        if err is None:
            err = ConnectionResetError(
                errno.ECONNRESET, f"connection to {self.peer} (qid {self.qid}) lost"
                + (f": {exc}" if exc else "")
            )
            self._error = err
        self._transport = None
        self._fail_all(err)
        if not self._closed_future.done():
            self._closed_future.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = False

    def resume_writing(self) -> None:
        self._can_write = True
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        """Wait until the socket's write buffer is below its high-water mark."""
        if self._can_write or self._transport is None:
            return
        fut = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def outstanding(self) -> int:
        return self.depth - len(self._free)

    def close(self, exc: BaseException | None = None) -> None:
        """Fail outstanding commands with ``exc`` (default: ConnectionAbortedError) and
        close the socket after what is queued has been written."""
        if self._error is None:
            self._error = exc or ConnectionAbortedError(
                errno.ECONNABORTED, f"queue pair {self.qid} to {self.peer} closed"
            )
        self._flush()
        t = self._transport
        if t is not None:
            t.close()
        elif self._tls_raw is not None:
            self._tls_raw.close()
        self._fail_all(self._error)
        if not self._ic_future.done():
            self._ic_future.set_exception(self._error)
            self._ic_future.exception()  # retrieved: the opener re-raises it

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_future)

    @contextlib.asynccontextmanager
    async def lend_socket(self, timeout: float = 10.0) -> AsyncIterator[int]:
        """Lend the connected socket to a data plane outside this object (``perf``'s C
        loop, csrc/perf.c) and take it back afterwards.

        Only between PDUs with nothing outstanding: no command in flight, nothing
        half-decoded, every queued byte written (waited for, up to ``timeout``).
        Reading is paused so the event loop does not race the borrower for bytes, and
        the borrower gets a duplicate descriptor, so a teardown of this queue pair
        meanwhile (a failed keep-alive closes the controller) can never hand its number
        to another file under the borrower's feet. The borrower must leave the stream at
        a PDU boundary with nothing outstanding, or the queue pair must be closed.
        """
        if self._error is not None:
            raise self._error
        if self.outstanding or not self._dec.idle:
            raise RuntimeError(f"queue pair {self.qid} is busy: cannot lend its socket")
        self._flush()
        t = self._transport
        assert t is not None
        async with asyncio.timeout(timeout):
            while t.get_write_buffer_size():
                if self._error is not None:
                    raise self._error
                await asyncio.sleep(0.001)
        sock = t.get_extra_info("socket")
        if sock is None:  # pragma: no cover - every TCP transport has one
            raise RuntimeError("transport has no socket")
        t.pause_reading()
        fd = os.dup(sock.fileno())
        try:
            yield fd
        finally:
            os.close(fd)
            if self._error is None and self._transport is not None:
                self._transport.resume_reading()

    def _fail_all(self, err: BaseException) -> None:
        for cid, cmd in enumerate(self._cmds):
            cb = cmd.cb
            if cb is not None:
                self._release(cid, cmd)
                try:
                    cb(None, err)
                except Exception:  # pragma: no cover - a callback bug must not stop us
                    log.exception("completion callback failed")
        waiters, self._slot_waiters = self._slot_waiters, deque()
        for w in waiters:
            if not w.done():
                w.set_exception(err)
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(err)
        self._drain_waiters = []

    def _fatal(self, message: str, fes: int | None = None, fei: int = 0,
               header: bytes = b"", send_term_req: bool = True) -> None:
        """Terminate the connection: H2CTermReq (when we are the one complaining)."""
        if self._error is not None:
            return
        log.warning("qid %d %s: %s", self.qid, self.peer, message)
        if fes is not None and send_term_req and self._transport is not None:
            self._out.extend(pdu.encode(pdu.TermReq(c2h=False, fes=fes, fei=fei, data=header)))
        self.close(TransportError(f"qid {self.qid} {self.peer}: {message}", fes=fes))

    # ---------------------------------------------------------------- submission

    def _release(self, cid: int, cmd: _Cmd) -> None:
        cmd.cb = None
        cmd.out = None
        cmd.in_buf = None
        self._free.append(cid)
        waiters = self._slot_waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                break

    async def wait_slot(self) -> None:
        """Wait until a CID is free (returns at once if one is)."""
        while not self._free:
            if self._error is not None:
                raise self._error
            fut = self._loop.create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                # Pass the wakeup on so a freed slot is not lost with us.
                if fut.done() and not fut.cancelled() and self._free:
                    self._wake_one()
                raise
        if self._error is not None:
            raise self._error

    def _wake_one(self) -> None:
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def submit_cb(
        self,
        cb: Callback,
        opcode: int,
        nsid: int = 0,
        cdw10: int = 0,
        cdw11: int = 0,
        cdw12: int = 0,
        cdw13: int = 0,
        cdw14: int = 0,
        cdw15: int = 0,
        data_out: Any = None,
        in_len: int = 0,
        in_buf: Any = None,
        *,
        flags: int | None = None,
        cdw2: int = 0,
        cdw3: int = 0,
        mptr: int = 0,
        sgl: tuple[int, int, int] | None = None,
        force_r2t: bool = False,
        short_ok: bool = False,
    ) -> int:
        """Send one command; ``cb(completion, data)`` runs when it completes, or
        ``cb(None, exc)`` if the connection fails first. Returns the CID.

        ``data_out``: bytes to write (in capsule when they fit, else on R2T).
        ``in_len``/``in_buf``: bytes to read; ``in_buf`` (writable, ``in_len`` bytes)
        receives them, otherwise the data is handed to ``cb`` as a read-only view.
        ``flags``/``sgl`` override what we would put in the SQE (tests of error
        statuses); ``force_r2t`` sends even small writes through R2T. ``short_ok``: the
        controller may send less than ``in_len`` (a message whose length the host cannot
        know in advance: SPDK answers Authentication Receive with just the message).
        Raises BlockingIOError when no CID is free (see :meth:`wait_slot`).
        """
        if self._error is not None:
            raise self._error
        if not self._free:
            raise BlockingIOError(errno.EAGAIN, "no free command id")
        cid = self._free.pop()
        cmd = self._cmds[cid]
        inline: Any = b""
        if data_out is not None and len(data_out):
            out = _view(data_out)
            n = out.nbytes
            if n <= self.icd_max and not force_r2t:
                sgl_addr, sgl_len, sgl_id = self.icdoff, n, spec.SGL_ID_INCAPSULE
                inline = out
                cmd.out = None
            else:
                sgl_addr, sgl_len, sgl_id = 0, n, spec.SGL_ID_TRANSPORT
                cmd.out = out
            cmd.in_len = 0
            cmd.in_buf = None
        else:
            cmd.out = None
            cmd.in_len = in_len
            if in_buf is not None:
                buf = _view(in_buf)
                if buf.readonly or buf.nbytes < in_len:
                    self._free.append(cid)
                    raise ValueError("in_buf must be writable and hold in_len bytes")
                cmd.in_buf = buf
            else:
                cmd.in_buf = None
            sgl_addr, sgl_len, sgl_id = 0, in_len, spec.SGL_ID_TRANSPORT if in_len else 0
        if sgl is not None:
            sgl_addr, sgl_len, sgl_id = sgl
        cmd.received = 0
        cmd.sent = 0
        cmd.status_override = 0
        cmd.short_ok = short_ok
        cmd.cb = cb
        sqe = _SQE.pack(
            opcode, PSDT_SGL if flags is None else flags, cid, nsid, cdw2, cdw3, mptr,
            sgl_addr, sgl_len, sgl_id, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
        )
        self._out.extend(
            pdu.encode(pdu.CapsuleCmd(sqe, inline), hdgst=self.hdgst, ddgst=self.ddgst,
                       pda=self.cpda)
        )
        if not self._flush_pending and not self._receiving:
            self._flush_pending = True
            self._loop.call_soon(self._flush)
        return cid

    async def submit(self, opcode: int, nsid: int = 0, cdw10: int = 0, cdw11: int = 0,
                     cdw12: int = 0, cdw13: int = 0, cdw14: int = 0, cdw15: int = 0,
                     *, data_out: Any = None, in_len: int = 0, in_buf: Any = None,
                     timeout: float | None = None, **kw: Any) -> Response:
        """Submit and wait; returns the Response whatever its status (the caller
        decides what a failed status means). ``timeout`` expiring kills the
        connection (see the module docstring) and raises TimeoutError."""
        if not self._free:
            await self.wait_slot()
        fut: asyncio.Future[Response] = self._loop.create_future()
        self.submit_cb(
            functools.partial(_resolve, fut), opcode, nsid, cdw10, cdw11, cdw12, cdw13,
            cdw14, cdw15, data_out, in_len, in_buf, **kw,
        )
        if timeout is None:
            return await fut
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            self._fatal(f"command opcode {opcode:#x} timed out after {timeout}s")
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed by the teardown above; we raise TimeoutError
            raise

    def _flush(self) -> None:
        self._flush_pending = False
        out = self._out
        if not out:
            return
        self._out = []
        t = self._transport
        if t is not None and not t.is_closing():
            t.writelines(out)

    # ---------------------------------------------------------------- receive

    def data_received(self, data: bytes) -> None:
        # Commands submitted by completion callbacks (and H2CData answering R2Ts) are
        # written once, at the end, in one writelines: no extra loop iteration per batch.
        self._receiving = True
        try:
            self._receive(data)
        finally:
            self._receiving = False
            if self._out:
                self._flush()

    def _receive(self, data: bytes) -> None:
        feed = self._dec.feed
        while True:
            try:
                pdus = feed(data)
            except pdu.DataDigestError as exc:
                self._handle(exc.pdus)
                self._data_digest_error(exc)
                data = b""
                continue
            except pdu.ProtocolError as exc:
                self._handle(exc.pdus)
                self._fatal(f"protocol error: {exc}", exc.fes, exc.fei, exc.header,
                            exc.send_term_req)
                return
            if self._handle(pdus) and self._dec.buffered:
                data = b""  # the decoder paused after ICResp; digests are now set
                continue
            return

    def eof_received(self) -> bool:
        return False

    def _handle(self, pdus: list[Any]) -> bool:
        """Act on decoded PDUs in order; True if an ICResp was among them."""
        cmds = self._cmds
        ic = False
        for p in pdus:
            if self._error is not None:
                return ic
            t = type(p)
            if t is pdu.CapsuleResp:
                dw0, dw1, sqhd, _sqid, cid, raw = _CQE.unpack(p.cqe)
                if cid >= self.depth or cmds[cid].cb is None:
                    self._fatal(f"CapsuleResp for unknown cid {cid}")
                    return ic
                cmd = cmds[cid]
                status = raw >> 1
                data: memoryview | None = None
                if cmd.in_len:
                    if status == 0 and cmd.received != cmd.in_len and not cmd.short_ok:
                        status = spec.GenericStatus.DATA_XFER_ERROR
                    data = cmd.in_buf
                if cmd.status_override and status == 0:
                    status = cmd.status_override
                self._complete(cid, cmd, _new_tuple(Completion, (status, dw0, dw1, sqhd)), data)
            elif t is pdu.C2HData:
                self._c2h(p)
            elif t is pdu.R2T:
                self._r2t(p)
            elif t is pdu.TermReq:
                fes = p.fes
                name = fes.name if isinstance(fes, pdu.Fes) else str(fes)
                self._fatal(f"controller terminated the connection (C2HTermReq {name}, "
                            f"fei {p.fei:#x})", None)
                if isinstance(self._error, TransportError):
                    self._error.fes = int(fes)
                return ic
            elif t is pdu.ICResp:
                self._icresp(p)
                ic = True
        return ic

    def _complete(self, cid: int, cmd: _Cmd, cpl: Completion, data: memoryview | None) -> None:
        cb = cmd.cb
        self._release(cid, cmd)
        assert cb is not None
        cb(cpl, data)

    def _icresp(self, p: pdu.ICResp) -> None:
        if p.pfv != 0:
            return self._fatal(f"ICResp PFV {p.pfv} unsupported", pdu.Fes.UNSUPPORTED_PARAMETER,
                               pdu.OFFSET_IC_PFV)
        if p.cpda > pdu.MAX_PDA:
            return self._fatal(f"ICResp CPDA {p.cpda} out of range",
                               pdu.Fes.UNSUPPORTED_PARAMETER, pdu.OFFSET_IC_PDA)
        if p.maxh2cdata < 4096 or p.maxh2cdata % 4:
            return self._fatal(f"ICResp MAXH2CDATA {p.maxh2cdata} invalid",
                               pdu.Fes.UNSUPPORTED_PARAMETER, pdu.OFFSET_IC_MAXR2T)
        if p.header_digest != self.want_hdgst or p.data_digest != self.want_ddgst:
            return self._fatal(
                f"controller enabled header digest {p.header_digest} / data digest "
                f"{p.data_digest}, asked for {self.want_hdgst} / {self.want_ddgst}",
                pdu.Fes.UNSUPPORTED_PARAMETER, pdu.OFFSET_IC_DGST,
            )
        self.cpda = p.cpda
        self.maxh2cdata = p.maxh2cdata
        self.hdgst, self.ddgst = p.header_digest, p.data_digest
        self._dec.set_digests(self.hdgst, self.ddgst)
        if not self._ic_future.done():
            self._ic_future.set_result(None)

    def _c2h(self, p: pdu.C2HData) -> None:
        cid = p.cccid
        cmd = self._cmds[cid] if cid < self.depth else None
        if cmd is None or cmd.cb is None or not cmd.in_len:
            return self._fatal(f"C2HData for cid {cid} which expects no data",
                               pdu.Fes.INVALID_HEADER_FIELD, pdu.OFFSET_CCCID)
        n = len(p.data)
        off = p.datao
        if off != cmd.received or off + n > cmd.in_len:
            return self._fatal(
                f"C2HData cid {cid} offset {off} length {n}: expected offset "
                f"{cmd.received} within {cmd.in_len} bytes",
                pdu.Fes.DATA_TRANSFER_OUT_OF_RANGE, pdu.OFFSET_DATAO,
            )
        buf = cmd.in_buf
        if buf is None:
            if off == 0 and n == cmd.in_len:
                cmd.in_buf = _view(p.data)  # the whole payload in one PDU: no copy
            else:
                buf = cmd.in_buf = memoryview(bytearray(cmd.in_len))
                buf[off:off + n] = p.data
        else:
            buf[off:off + n] = p.data
        cmd.received = off + n
        if p.success:
            if cmd.received != cmd.in_len and not cmd.short_ok:
                return self._fatal(
                    f"C2HData SUCCESS for cid {cid} after {cmd.received} of {cmd.in_len} bytes",
                    pdu.Fes.PDU_SEQUENCE_ERROR,
                )
            status = cmd.status_override
            self._complete(cid, cmd, _new_tuple(Completion, (status, 0, 0, 0)), cmd.in_buf)

    def _r2t(self, p: pdu.R2T) -> None:
        cid = p.cccid
        cmd = self._cmds[cid] if cid < self.depth else None
        if cmd is None or cmd.cb is None or cmd.out is None:
            return self._fatal(f"R2T for cid {cid} which has no data to send",
                               pdu.Fes.PDU_SEQUENCE_ERROR)
        out = cmd.out
        start, length = p.r2to, p.r2tl
        end = start + length
        if length == 0 or start != cmd.sent or end > out.nbytes:
            return self._fatal(
                f"R2T cid {cid} offset {start} length {length}: expected offset {cmd.sent} "
                f"within {out.nbytes} bytes",
                pdu.Fes.DATA_TRANSFER_OUT_OF_RANGE, pdu.OFFSET_DATAO,
            )
        chunk = self.maxh2cdata
        hd, dd, pda = self.hdgst, self.ddgst, self.cpda
        ttag = p.ttag
        extend = self._out.extend
        off = start
        while off < end:
            stop = min(off + chunk, end)
            extend(pdu.encode(pdu.H2CData(cid, ttag, off, out[off:stop], stop == end),
                              hdgst=hd, ddgst=dd, pda=pda))
            off = stop
        cmd.sent = end

    def _data_digest_error(self, exc: pdu.DataDigestError) -> None:
        cid = exc.cccid
        cmd = self._cmds[cid] if cid < self.depth else None
        log.warning("qid %d %s: %s", self.qid, self.peer, exc)
        p = exc.pdu
        if cmd is None or cmd.cb is None or type(p) is not pdu.C2HData:
            return self._fatal(f"data digest error on an unexpected PDU: {exc}",
                               pdu.Fes.HEADER_DIGEST_ERROR, header=exc.header)
        cmd.status_override = spec.GenericStatus.TRANSIENT_TRANSPORT_ERROR
        # Account for the bytes so ordering checks stay meaningful; do not copy them.
        n = len(p.data)
        if p.datao != cmd.received or p.datao + n > cmd.in_len:
            return self._fatal("C2HData out of range", pdu.Fes.DATA_TRANSFER_OUT_OF_RANGE,
                               pdu.OFFSET_DATAO)
        cmd.received += n
        if cmd.in_buf is None:
            cmd.in_buf = memoryview(bytearray(cmd.in_len))
        if p.success:
            self._complete(cid, cmd, _new_tuple(Completion, (cmd.status_override, 0, 0, 0)),
                           cmd.in_buf)


def _resolve(fut: asyncio.Future[Response], cpl: Completion | None, data: Any) -> None:
    if fut.done():
        return
    if cpl is None:
        fut.set_exception(data)
    else:
        fut.set_result(_new_tuple(Response, (cpl, data)))
