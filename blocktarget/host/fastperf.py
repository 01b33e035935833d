"""The C engine of ``blocktarget perf``: one connection's I/O loop in csrc/perf.c.

Why: the Python engine (:class:`blocktarget.host.perf._Engine`) costs about 10 µs of
CPU per I/O, while one target reactor serves a 4 KiB read in about 5; an initiator that
slow measures itself, not the target. The C loop costs a fraction of a microsecond of
its own per I/O (the kernel's TCP work is most of what is left), so on a machine with a
core for the target and a core for the initiator, the target is what limits a run.

The split (DESIGN.md §3, host side):

* Python keeps the control path. The controller is connected, enabled, identified and
  the I/O queue connected by the host library (ICReq/ICResp negotiate digests, CPDA,
  MAXH2CDATA; Identify gives IOCCSZ, MDTS and the namespace's geometry), exactly as for
  the Python engine. Keep-alive keeps running on the admin queue in the event loop
  throughout.
* For each phase (the --verify prefill, the timed run, the --verify read-back) the
  I/O queue lends its socket (:meth:`QueuePair.lend_socket`: reading paused, a
  duplicate descriptor) to one C call that runs the whole phase in a thread of its own
  with the GIL released (cffi releases it around every call), and returns with nothing
  outstanding. The event loop stays free meanwhile: progress lines, keep-alive, and
  in-process peers (tests) go on. Live counters are read from the shared struct.
* Results are the Python engine's: the same :class:`~blocktarget.host.perf.OpStats`
  (the C histogram has LatencyHistogram's buckets, so results merge across engines and
  worker processes and percentiles stay exact), the same verify counters, and the same
  messages, built here from the events the C loop records (verify failures keep the
  data read, so :func:`verify_pattern` words them exactly as the Python engine would).
* Failures are the Python engine's too: what connection.py's queue pair would raise
  (TransportError with the FES for a protocol violation or a C2HTermReq,
  ConnectionResetError for a lost connection) is raised here, after the queue pair is
  closed with it. A command that never completes ends the run after
  :data:`IO_TIMEOUT_S` instead of hanging it.

Not in C: ``--journal`` (a crash checker whose every write is journaled and FUA; its
speed is the journal's) and anything else :func:`unsupported` names: those runs use the
Python engine, and the result says which engine ran and why.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from blocktarget.nvme import pdu, spec

from .connection import QueuePair, TransportError

if TYPE_CHECKING:
    from .perf import PerfConfig, PerfResult

try:
    from .._fastpath import ffi, lib
except ImportError:  # built without a compiler: the Python engine only
    ffi = lib = None

__all__ = ["AVAILABLE", "IO_TIMEOUT_S", "CEngine", "unsupported"]

log = logging.getLogger(__name__)

AVAILABLE = lib is not None
# No completion for this long with commands outstanding ends the run (Linux's
# io_timeout is 30 s too).
IO_TIMEOUT_S = 30.0
_EVENTS = 10  # perf.py's _MAX_MESSAGES: no more can be reported anyway


def unsupported(cfg: PerfConfig) -> str | None:
    """Why ``cfg`` cannot run on the C engine (None: it can)."""
    if cfg.journal is not None:
        return "--journal runs on the Python engine"
    if cfg.tls_key is not None:
        return "--tls runs on the Python engine (the C loop reads the socket: ciphertext)"
    if not AVAILABLE:
        return "the C extension (blocktarget._fastpath) is not built"
    return None


def _hist(d: Any) -> Any:
    from .perf import LatencyHistogram

    h = LatencyHistogram()
    h.counts = list(ffi.unpack(d.hist, LatencyHistogram.NBUCKETS))
    h.count, h.total, h.max = d.lat_count, d.lat_total, d.lat_max
    h.min = d.lat_min if d.lat_count else 0
    return h


class CEngine:
    """Keeps ``qd`` commands in flight on one queue pair until the deadline, in C.

    The interface is :class:`blocktarget.host.perf._Engine`'s (``run``, ``prefill``,
    ``read_back``, live ``ops``/``bytes``/``lat_sum``, ``result``, ``depth``).
    ``land``: receive read data into per-command buffers even when nothing reads it
    (by default such payloads are dropped, large ones without being copied at all).
    """

    kind = "c"

    def __init__(self, qp: QueuePair, cfg: PerfConfig, nsid: int, lba_size: int,
                 first_unit: int, units: int, qd: int, result: PerfResult, *,
                 land: bool = False, spin: bool = False) -> None:
        if not AVAILABLE:
            raise RuntimeError(unsupported(cfg))
        self.qp = qp
        self.cfg = cfg
        self.lba_size = lba_size
        self.nlb = cfg.io_size // lba_size
        self.first_unit = first_unit
        self.units = units
        self.result = result
        self.journal = None
        # With --verify two commands never share a block: no more slots than blocks.
        self.depth = min(qd, units) if cfg.verify else qd
        self.rng = random.Random(cfg.seed)
        self.gens = ffi.new("uint32_t[]", units) if cfg.verify else None
        from .perf import LatencyHistogram

        nb = LatencyHistogram.NBUCKETS
        self._keep: list[Any] = []
        p = self._p = ffi.new("struct bt_perf *")
        p.hdgst, p.ddgst = qp.hdgst, qp.ddgst
        p.cpda = qp.cpda
        p.hpda = 0  # what connection.py's ICReq says (and its decoder checks)
        p.maxh2cdata = qp.maxh2cdata
        p.icd_max = qp.icd_max
        p.max_pdu = pdu.DEFAULT_MAX_PDU_SIZE
        p.qd = self.depth
        p.nsid = nsid
        p.lba_size = lba_size
        p.io_size = cfg.io_size
        p.first_unit = first_unit
        p.units = units
        p.read_share = cfg.read_share
        p.random = cfg.random
        p.verify = cfg.verify
        p.land = land
        p.spin = spin
        p.timeout_ns = int(IO_TIMEOUT_S * 1e9)
        p.next_gen = 2
        if self.gens is not None:
            p.gens = self.gens
        wbuf = ffi.new("unsigned char[]", os.urandom(cfg.io_size))
        p.wbuf = wbuf
        ev = ffi.new("struct bt_perf_event[]", _EVENTS)
        p.ev, p.ev_max = ev, _EVENTS
        self._keep += [wbuf, ev]
        if cfg.verify:
            ev_data = ffi.new("unsigned char[]", _EVENTS * cfg.io_size)
            p.ev_data = ev_data
            self._keep.append(ev_data)
        for d in (p.rd, p.wr):
            h = ffi.new("uint64_t[]", nb)
            d.hist = h
            self._keep.append(h)

    # ------------------------------------------------------------- live counters

    @property
    def ops(self) -> int:
        p = self._p
        return p.rd.ops + p.wr.ops

    @property
    def bytes(self) -> int:
        p = self._p
        return p.rd.bytes + p.wr.bytes

    @property
    def lat_sum(self) -> int:
        p = self._p
        return p.rd.lat_total + p.wr.lat_total

    # ---------------------------------------------------------------- phases

    async def _phase(self, mode: int, duration_s: float = 0.0) -> None:
        p = self._p
        p.mode = mode
        p.duration_ns = int(duration_s * 1e9)
        p.seed = self.rng.getrandbits(64)
        p.stop = 0
        before = (p.verified_reads, p.verify_failures)
        async with self.qp.lend_socket() as fd:
            p.fd = fd
            try:
                rc = await _run_in_thread(p)
            except asyncio.CancelledError:
                # stopped mid-stream: what is on the wire belongs to no Python command
                self.qp.close(ConnectionAbortedError(errno.ECONNABORTED, "perf cancelled"))
                raise
        res = self.result
        res.verified_reads += p.verified_reads - before[0]
        res.verify_failures += p.verify_failures - before[1]
        self._messages(mode)
        if rc:
            self._fatal(rc)

    def _messages(self, mode: int) -> None:
        from .perf import _MAX_MESSAGES, verify_pattern

        p, res = self._p, self.result
        io = self.cfg.io_size
        for i in range(p.nev):
            e = p.ev[i]
            if e.kind == lib.BT_PERF_EV_STATUS:
                name = spec.status_name(e.status)
                if mode == lib.BT_PERF_PREFILL:
                    res.messages.append(f"prefill: some writes failed ({name})")
                    break  # the Python engine reports the first failure only
                if mode == lib.BT_PERF_READBACK:
                    text = f"verify read of unit {e.unit}: {name}"
                else:
                    text = f"{'read' if e.is_read else 'write'} of unit {e.unit}: {name}"
            else:
                data = bytes(ffi.buffer(p.ev_data + i * io, io))
                slba = (self.first_unit + e.unit) * self.nlb
                text = f"verify: {verify_pattern(data, slba, self.nlb, self.lba_size, e.gen)}"
            if len(res.messages) < _MAX_MESSAGES:
                res.messages.append(text)

    def _fatal(self, rc: int) -> None:
        """Raise what connection.py's queue pair would have, after closing it."""
        p, qp = self._p, self.qp
        where = f"qid {qp.qid} {qp.peer}"
        msg = ffi.string(p.msg).decode(errors="replace")
        exc: BaseException
        if rc == lib.BT_PERF_PROTOCOL:
            log.warning("%s: %s", where, msg)
            exc = TransportError(f"{where}: {msg}", fes=p.fes or None)
        elif rc == lib.BT_PERF_TERMREQ:
            try:
                name = pdu.Fes(p.fes).name
            except ValueError:
                name = str(p.fes)
            text = (f"controller terminated the connection (C2HTermReq {name}, "
                    f"fei {p.fei:#x})")
            log.warning("%s: %s", where, text)
            exc = TransportError(f"{where}: {text}", fes=p.fes)
        elif rc == lib.BT_PERF_CLOSED:
            why = f": [Errno {p.err}] {os.strerror(p.err)}" if p.err else ""
            exc = ConnectionResetError(errno.ECONNRESET,
                                       f"connection to {qp.peer} (qid {qp.qid}) lost{why}")
        elif rc == lib.BT_PERF_TIMEOUT:
            log.warning("%s: %s", where, msg)
            exc = TransportError(f"{where}: {msg}")
        elif rc == lib.BT_PERF_ABORTED:
            exc = asyncio.CancelledError()
        elif rc == lib.BT_PERF_NOMEM:
            raise MemoryError(f"perf C engine: {msg}")
        else:
            raise ValueError(f"perf C engine: {msg}")
        qp.close(exc)
        raise exc

    async def prefill(self, progress: TextIO | None) -> None:
        """Write generation 1 over this worker's slice so every read can be checked."""
        if progress is not None:
            mib = self.units * self.cfg.io_size / (1 << 20)
            print(f"prefilling {mib:.1f} MiB for --verify ...", file=progress, flush=True)
        await self._phase(lib.BT_PERF_PREFILL)

    async def read_back(self, progress: TextIO | None) -> None:
        """After the timed run, read every block this run wrote and check it."""
        gens = self.gens
        assert gens is not None
        if progress is not None:
            n = sum(1 for g in ffi.unpack(gens, self.units) if g not in (0, 1, 0xFFFFFFFF))
            if n:
                print(f"verifying {n} written blocks of {self.cfg.io_size} B ...",
                      file=progress, flush=True)
        await self._phase(lib.BT_PERF_READBACK)

    async def run(self) -> None:
        cpu0 = time.process_time()
        try:
            await self._phase(lib.BT_PERF_TIMED, self.cfg.time_s)
        finally:
            p, res = self._p, self.result
            res.elapsed_s = p.elapsed_ns / 1e9
            res.cpu_s = time.process_time() - cpu0
            from .perf import OpStats

            res.read = OpStats(p.rd.ops, p.rd.bytes, p.rd.errors, _hist(p.rd))
            res.write = OpStats(p.wr.ops, p.wr.bytes, p.wr.errors, _hist(p.wr))


async def _run_in_thread(p: Any) -> int:
    """bt_perf_run(p) in a thread of its own, the event loop free meanwhile; if this
    task is cancelled the C loop is told to stop (within its 100 ms poll) and waited
    for, so nothing it uses is freed under it."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def done(rc: int | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(rc)  # type: ignore[arg-type]

    def body() -> None:
        try:
            rc = lib.bt_perf_run(p)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(done, None, exc)
        else:
            try:
                loop.call_soon_threadsafe(done, rc, None)
            except RuntimeError:  # pragma: no cover - the loop closed under us
                pass

    th = threading.Thread(target=body, name="perf-c", daemon=True)
    th.start()
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        p.stop = 2
        th.join()
        raise
