"""The C lane of a queue pair: whole receive buffers of plain reads, in-capsule writes and
flushes executed by one C call (blocktarget/csrc/lane.c says what it takes and why it
stays identical to the Python path; blocktarget/_fastpath_build.py how it is built).

A lane belongs to one I/O queue pair and runs on its reactor. Which namespaces it serves
is the bdevs' decision (`IOChannel.lane_target`): memory (malloc), null, and split or
passthru over either. Header and data digests and the host's PDU alignment are done in C
too. A receive buffer starts in the lane only when the queue is in its plain steady
state: connected and enabled, nothing outstanding (every command the lane takes
completes inside the call, so it never meets a busy command id or a full queue), no
held-back PDUs, the decoder between PDUs. Whatever the lane does not take goes to the
Python path unchanged; the Python path remains the reference for every byte.

What the Python path would have recorded is recorded here too: the queue's SQ head, the
controller's SMART counters, the stall watch's PDU count, and each bdev channel's
operation, byte and latency statistics (latency: the C call's time shared out evenly over
its commands, the only clock there is), on every channel the I/O would have passed
through (a split's and its base's).
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Any

from ..bdev import LANE_MEM, LANE_NULL, LATENCY_BUCKETS_NS, IOType
from . import spec

try:
    from .._fastpath import ffi, lib
except ImportError:  # not built (no compiler at install time): the Python path only
    ffi = lib = None

if TYPE_CHECKING:
    from .qpair import Qpair

AVAILABLE = lib is not None
# Commands per C call: output is handed to the socket between calls, so a host that is
# not reading is noticed (pause_writing) as in the Python path (qpair.OUT_BATCH).
BATCH = 64
# Output bytes per C call (one buffer): below glibc's mmap threshold as the reactor sets it
# (reactor.MMAP_THRESHOLD), so the buffer comes from the heap, not a fresh mapping.
MAX_OUT = 1 << 20
_READ = int(IOType.READ)
_WRITE = int(IOType.WRITE)
_FLUSH = int(IOType.FLUSH)
# what a namespace's bdev must support for the lane to run each of its commands
_LANE_IO = frozenset({IOType.READ, IOType.WRITE, IOType.FLUSH})
_now_ns = time.perf_counter_ns
_bucket = bisect.bisect_left
_alloc = ffi.new_allocator(should_clear_after_alloc=False) if AVAILABLE else None


def new_buffer(n: int) -> memoryview:
    """``n`` writable bytes, not zero-filled when the extension is there (a bytearray's
    zero fill costs as much as the copy the caller avoids)."""
    if _alloc is None:
        return memoryview(bytearray(n))
    return memoryview(ffi.buffer(_alloc("unsigned char[]", n)))


def create(qp: Qpair) -> Lane | None:
    """A lane for ``qp`` (an I/O queue that just connected), or None when it cannot have
    one: the extension is missing or switched off."""
    if not AVAILABLE or not getattr(qp.opts, "c_fast_path", True) or qp.qid <= 0:
        return None
    return Lane(qp)


def crc32c_impl() -> str:
    """Which CRC32C the C lane's digests use on this CPU (chosen at load time)."""
    return ffi.string(lib.bt_crc32c_impl()).decode() if AVAILABLE else "none"


class Lane:
    __slots__ = ("qp", "c", "nsmem", "entries", "generation", "ana", "last", "sizes", "stats")

    def __init__(self, qp: Qpair) -> None:
        self.qp = qp
        c = ffi.new("struct bt_lane *")
        c.max_io_size = qp.opts.max_io_size
        c.icd_limit = qp.icd_limit
        c.c2h_chunk = qp.c2h_chunk
        c.sqsize = qp.sqsize
        c.qid = qp.qid
        c.flow_disabled = qp.sq_flow_disabled
        c.c2h_success = qp.c2h_success_ok
        c.hdgst = qp.hdgst
        c.ddgst = qp.ddgst
        c.hpda = qp.hpda
        self.c = c
        self.nsmem: Any = None  # struct bt_ns[] (the C side of `entries`)
        # (namespace, channels its I/O passes through, buffer export keeping the memory
        # mapped or None) per slot
        self.entries: list[tuple[Any, tuple[Any, ...], Any]] = []
        self.generation = -1
        self.ana: Any = None
        self.last: list[list[int]] = []  # per slot: counters already folded into stats
        self.sizes = ffi.new("size_t *"), ffi.new("unsigned *")
        self.stats = qp.reactor.stats  # c_lane_commands, for metrics and nvmf_get_stats

    def close(self) -> None:
        """Drop the memory exports (a deleted malloc bdev may then be unmapped)."""
        self.entries = []
        self.nsmem = None
        self.c.ns = ffi.NULL
        self.c.nns = 0

    def invalidate(self) -> None:
        """The subsystem's namespaces or ANA states changed (controller.refresh_ana, on
        this reactor): let go of the table now rather than at the next command, so the
        memory of a namespace being removed is not held by an idle connection (malloc's
        destruct can then unmap it); it is rebuilt when the lane is next used."""
        self._fold(0, 0)
        self.close()
        self.generation = -1

    # ---- the namespace table ----
    def _refresh(self) -> None:
        """(Re)build the table of namespaces this queue may run in C, after any change
        to the subsystem or to this path's ANA states. Folds the old table's counters
        first, so no statistic is lost."""
        qp = self.qp
        sub = qp.subsystem
        self.invalidate()
        entries = []
        inaccessible = qp.ana_inaccessible
        if sub is not None:
            for nsid, ns in sorted(sub.namespaces.items()):
                if inaccessible and nsid in inaccessible:
                    continue
                bdev = ns.bdev
                if not _LANE_IO <= bdev.io_types:
                    continue
                t = qp.channel_of(ns)[1].lane_target()
                if t is None:
                    continue
                size = bdev.num_blocks * bdev.block_size
                mem = None
                if t.kind == LANE_MEM:
                    if t.mem is None or len(t.mem) < t.offset + size:
                        continue
                    mem = ffi.from_buffer(t.mem, require_writable=True)
                elif t.kind != LANE_NULL:
                    continue
                entries.append((ns, t, mem))
        if entries:
            arr = ffi.new("struct bt_ns[]", len(entries))
            for i, (ns, t, mem) in enumerate(entries):
                e = arr[i]
                e.nsid = ns.nsid
                e.block_size = ns.bdev.block_size
                e.num_blocks = ns.bdev.num_blocks
                e.backend = t.kind
                e.write_cache = ns.bdev.write_cache
                if mem is not None:
                    e.mem = ffi.cast("unsigned char *", mem) + t.offset
            self.nsmem = arr
            self.c.ns = arr
            self.c.nns = len(entries)
        self.entries = [(ns, t.channels, mem) for ns, t, mem in entries]
        self.last = [[0] * 6 for _ in entries]
        self.generation = sub.generation if sub is not None else -1
        self.ana = inaccessible

    def _fold(self, ncmds: int, elapsed_ns: int) -> None:
        """Add what the C side counted since the last fold to the stats of every channel
        each namespace's I/O passes through."""
        arr = self.nsmem
        if arr is None:
            return
        per_cmd = elapsed_ns // ncmds if ncmds else 0
        bucket = _bucket(LATENCY_BUCKETS_NS, per_cmd)
        for i, (_ns, channels, _mem) in enumerate(self.entries):
            e = arr[i]
            last = self.last[i]
            now = (e.reads, e.read_bytes, e.writes, e.write_bytes, e.flushes, e.flush_bytes)
            if now == tuple(last):
                continue
            for t, k in ((_READ, 0), (_WRITE, 2), (_FLUSH, 4)):
                n = now[k] - last[k]
                if not n:
                    continue
                nbytes = now[k + 1] - last[k + 1]
                for ch in channels:
                    st = ch.stats
                    st.ops[t] += n
                    st.bytes[t] += nbytes
                    st.latency_sum_ns[t] += per_cmd * n
                    st.latency_buckets[t][bucket] += n
            last[:] = now

    # ---- the receive path ----
    def usable(self) -> bool:
        """Whether the next receive buffer may start in the lane. Every condition is one
        under which the Python path would do something the lane does not: answer with a
        sequence or auth error, meet a busy command id or a full queue (something is
        outstanding), hold PDUs back for a host not reading, finish a PDU already begun
        or received directly, or account in-capsule data in the reactor's budget."""
        qp = self.qp
        ctrl = qp.ctrl
        if (qp.closed or qp.requests or qp._backlog or qp._write_paused_at is not None
                or qp._rx_view is not None or qp.auth_pending or ctrl is None
                or not ctrl.csts & spec.CSTS_RDY or not qp.decoder.idle):
            return False
        budget = qp.budget
        if budget.waiting or budget.used + qp.icd_limit > budget.limit:
            # The Python path holds each in-capsule write's data in the reactor's R2T
            # budget: one that overruns it pauses reading this connection, and every
            # give-back wakes waiting connections. The lane does neither, so it only
            # runs while no write could overrun the budget and nobody waits on it.
            return False
        sub = qp.subsystem
        if sub is None or sub.generation != self.generation or qp.ana_inaccessible is not self.ana:
            self._refresh()
        return self.nsmem is not None

    def feed(self, data: Any) -> Any:
        """Execute the leading commands of ``data`` the lane takes; returns the rest
        (possibly empty) for the Python path."""
        qp = self.qp
        c = self.c
        src = ffi.from_buffer("unsigned char[]", data)
        total = len(src)
        pos = 0
        out_len, ncmds = self.sizes
        run = lib.bt_lane_run
        while pos < total:
            taken = run(c, src + pos, total - pos, BATCH, MAX_OUT, ffi.NULL, out_len, ncmds)
            if not taken:
                break
            buf = _alloc("unsigned char[]", out_len[0])
            n = ncmds[0]
            c.sqhd = qp.sqhd
            before = c.read_cmds, c.read_bytes, c.write_cmds, c.write_bytes
            t0 = _now_ns()
            run(c, src + pos, taken, n, MAX_OUT, buf, out_len, ncmds)
            elapsed = _now_ns() - t0
            qp.sqhd = c.sqhd
            pos += taken
            qp.rx_pdus += n
            self.stats.c_lane_commands += n
            k = qp.counters
            k.read_cmds += c.read_cmds - before[0]
            k.read_blocks_bytes += c.read_bytes - before[1]
            k.write_cmds += c.write_cmds - before[2]
            k.write_bytes += c.write_bytes - before[3]
            self._fold(n, elapsed)
            qp._out.append(ffi.buffer(buf))
            if pos < total:
                # hand this batch to the socket before the next, as the Python path
                # does every OUT_BATCH responses; stop if the host is not reading
                qp._flush()
                qp._flush_scheduled = True
                if qp._write_paused_at is not None or qp.closed:
                    break
        if pos == 0:
            return data
        return memoryview(data)[pos:] if pos < total else b""
