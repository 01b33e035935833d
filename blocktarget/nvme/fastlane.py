"""The C lane of a queue pair: whole receive buffers of reads, writes (in-capsule or by
R2T and H2CData) and flushes executed by one C call (blocktarget/csrc/lane.c says what it
takes and why it stays identical to the Python path; blocktarget/_fastpath_build.py how
it is built).

A lane belongs to one I/O queue pair and runs on its reactor. Which namespaces it serves
is the bdevs' decision (`IOChannel.lane_target`): memory (malloc), null, files and block
devices through the reactor's io_uring (uring), pmem pools (the BTT in C,
csrc/be_pmem.c, which the pmem bdev's Python path calls too), PCIe NVMe namespaces
through the reactor's hardware queue pair (nvme_pcie; csrc/be_nvme.c,
nvme/driver/cring.py), split or passthru over any of them, and logical volumes over any
of them (the volume's cluster map in C: csrc/bt_lvol.h, lvol/lanemap.py). Header and
data digests and the host's PDU alignment are done in C too. A receive buffer starts in
the lane only when the queue is in its steady state: connected and enabled, no command
of the Python path outstanding, no held-back PDUs, the decoder between PDUs, nobody
waiting for the reactor's buffer budget. The lane's own commands (writes waiting for
their data, I/O at io_uring) may be outstanding: the Python path asks the lane about
them where it must (a busy command id, a full queue, an H2CData it decoded, Abort, the
stall watch) and takes one over (`adopt`) for anything unusual. I/O at io_uring (or an
NVMe queue pair) completes in C when the reactor reaps its ring (bdevs/uring.py;
driver/cring.py for NVMe), which then calls `drain` on each lane with something to send;
what did not succeed there comes back to the Python path to be done again (`_redo`).
Whatever the lane does not take goes to the Python path unchanged; the Python path
remains the reference for every byte.

What the Python path would have recorded is recorded here too: the queue's SQ head, the
controller's SMART counters, the stall watch's PDU count, the reactor's buffer budget, and
each bdev channel's operation, byte and latency statistics on every channel the I/O would
have passed through (a split's and its base's; for a volume's read its map answers with
zeroes, the volume's alone: `_zero_entries`). C keeps them all as cumulative counters,
the latency histogram included (each command in its own bucket: from submission to
completion at an asynchronous backend, else its lane call's time shared out over the
call's commands, the only clock there is), so that Python may add them up whenever it
likes (`fold`), on the lane's reactor thread, with nothing lost or smeared. When: after
every lane call made from Python (the receive path below, completions Python reaps); for
a socket lent to the reactor's C poller only when someone needs the figures (nvme/
netpoll.py has that rule).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..bdev import (
    LANE_MEM,
    LANE_NULL,
    LANE_NVME,
    LANE_PMEM,
    LANE_URING,
    LATENCY_BUCKETS_NS,
    IOType,
    LaneTarget,
    lane_target_of,
)
from . import spec

try:
    from .._fastpath import ffi, lib
except ImportError:  # not built (no compiler at install time): the Python path only
    ffi = lib = None

if TYPE_CHECKING:
    from .qpair import Qpair

AVAILABLE = lib is not None
if AVAILABLE:  # the histogram's buckets, in C as in the Python path (one source)
    assert len(LATENCY_BUCKETS_NS) == 15 and lib.BT_LAT_BUCKETS == 16
    for _i, _b in enumerate(LATENCY_BUCKETS_NS):
        lib.bt_lat_bounds[_i] = _b
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
_alloc = ffi.new_allocator(should_clear_after_alloc=False) if AVAILABLE else None
_ST = ((_READ, 0), (_WRITE, 1), (_FLUSH, 2))  # IOType -> enum bt_stat
R2T_LIST_MAX = 1024  # lane R2Ts reported to the stall watch per check (slots are fewer)
CHUNKS = 64  # output pieces taken from the lane per C call


def new_buffer(n: int) -> memoryview:
    """``n`` writable bytes, not zero-filled when the extension is there (a bytearray's
    zero fill costs as much as the copy the caller avoids)."""
    if _alloc is None:
        return memoryview(bytearray(n))
    return memoryview(ffi.buffer(_alloc("unsigned char[]", n)))


def chunk_view(ch: Any) -> Any:
    """A piece of C output (a ``struct bt_chunk``) as a buffer for the socket that gives
    its memory back once nothing refers to it any more (uvloop keeps views of what it
    could not send at once): a read sent from the NVMe DMA buffer the device wrote goes
    back to its queue pair's pool, anything else to the heap."""
    if ch.dma:
        start = ffi.gc(ffi.cast("unsigned char *", ch.start),
                       lambda _p, b=ch.owner: lib.bt_nvme_buf_put(b))
        return ffi.buffer(start, ch.len)
    owner = ffi.gc(ffi.cast("unsigned char *", ch.owner), lib.bt_free)
    off = ch.start - owner
    if off == 0:
        return ffi.buffer(owner, ch.len)
    return memoryview(ffi.buffer(owner, off + ch.len))[off:]  # (keeps the owner alive)


def create(qp: Qpair) -> Lane | None:
    """A lane for ``qp`` (an I/O queue that just connected), or None when it cannot have
    one: the extension is missing or switched off."""
    if not AVAILABLE or not getattr(qp.opts, "c_fast_path", True) or qp.qid <= 0:
        return None
    return Lane(qp)


def uring_ctx(ring: Any) -> Any:
    """The lane's handle on an io_uring made by blocktarget._uring (its ``struct io_uring
    *``), or None when the lane has no io_uring backend (built without liburing)."""
    if not AVAILABLE or not lib.bt_uring_available():
        return None
    from .._uring import ffi as uffi  # type: ignore[import-not-found]

    u = lib.bt_uring_attach(ffi.cast("void *", int(uffi.cast("uintptr_t", ring))))
    return None if u == ffi.NULL else u


def crc32c_impl() -> str:
    """Which CRC32C the C lane's digests use on this CPU (chosen at load time)."""
    return ffi.string(lib.bt_crc32c_impl()).decode() if AVAILABLE else "none"


class Lane:
    __slots__ = ("qp", "c", "nsmem", "entries", "generation", "ana", "last", "ncmds", "stats",
                 "rings", "urings", "nvmeqs", "closing", "_tokens", "_executed", "_handle", "_seen",
                 "_chunks",
                 "_bud_net", "_submitted")

    def __init__(self, qp: Qpair) -> None:
        self.qp = qp
        c = lib.bt_lane_new(qp.sqsize)
        if c == ffi.NULL:
            raise MemoryError("no memory for the queue's C lane")
        c.max_io_size = qp.opts.max_io_size
        c.icd_limit = qp.icd_limit
        c.c2h_chunk = qp.c2h_chunk
        c.maxh2cdata = qp.maxh2cdata
        c.qid = qp.qid
        c.flow_disabled = qp.sq_flow_disabled
        c.c2h_success = qp.c2h_success_ok
        c.hdgst = qp.hdgst
        c.ddgst = qp.ddgst
        c.hpda = qp.hpda
        self._handle = ffi.new_handle(self)  # how a ring's completions find this lane
        c.handle = self._handle
        self.c = c  # (C memory: freed by close(), never by the garbage collector)
        self.nsmem: Any = None  # struct bt_ns[] (the C side of `entries`)
        # (namespace, channels its I/O passes through, buffer export keeping the memory
        # mapped or None) per slot
        self.entries: list[tuple[Any, tuple[Any, ...], Any]] = []
        # the io_uring rings and NVMe queue pairs (nvme_pcie.ReactorQueue) the table's
        # namespaces use
        self.rings: tuple[Any, ...] = ()
        # of those, the io_uring rings and the NVMe queue pairs (the C socket poller
        # reaps them for the lane while its socket is lent; nvme/netpoll.py)
        self.urings: tuple[Any, ...] = ()
        self.nvmeqs: tuple[Any, ...] = ()
        self.closing = False  # the queue is gone; I/O of the lane's still at a ring
        self.generation = -1
        self.ana: Any = None
        self.last: list[list[int]] = []  # per slot: counters already folded into stats
        self.ncmds = ffi.new("unsigned *")
        self._chunks = ffi.new("struct bt_chunk[]", CHUNKS)
        self.stats = qp.reactor.stats  # c_lane_commands, for metrics and nvmf_get_stats
        self._tokens: dict[tuple[int, int, int], object] = {}  # see r2t_pending
        self._executed = 0  # commands executed, once the C lane is freed
        # the C side's cumulative counters as last recorded on the Python side: SMART
        # read/write commands and bytes, commands, budget taken and given back, I/Os,
        # H2CData PDUs received across buffers
        self._seen = [0] * 10
        self._bud_net = 0  # c.bud_net as last folded
        self._submitted = 0  # c.submitted as last seen by the receive path

    def close(self) -> None:
        """The queue is gone: writes still waiting for data are dropped, as the Python
        path drops its own. I/O at io_uring or an NVMe device is let finish (the kernel or
        the device uses its buffers): the lane stays with its rings (`zombies`) until
        its last completion, counted in
        the bdev statistics as the Python path's channel counts it, then is freed (see
        drain). Then the memory exports go (a deleted malloc bdev may be unmapped)."""
        c = self.c
        if c is None or self.closing:
            return
        self.closing = True
        self._fold_closed()  # (the queue pair folded the rest before its budget went)
        lib.bt_lane_close(c)
        if c.io_inflight:
            for ring in self.rings:
                ring.zombies.add(self)
            return
        self._free()

    def _free(self) -> None:
        c, self.c = self.c, None
        if c is not None:
            self._executed = c.cmds
            lib.bt_lane_free(c)
        for ring in self.rings:
            ring.zombies.discard(self)
        self._handle = None
        self.entries = []
        self.rings = self.urings = self.nvmeqs = ()
        self.nsmem = None

    def invalidate(self) -> None:
        """The subsystem's namespaces or ANA states changed (controller.refresh_ana, on
        this reactor): let go of the table now rather than at the next command, so the
        memory of a namespace being removed is not held by an idle connection (malloc's
        destruct can then unmap it); it is rebuilt when the lane is next used. While the
        lane has commands (writes waiting for data, I/O in flight), which refer to the
        table, it stays, marked stale: nothing new starts on it, and a write whose data
        comes meanwhile goes to the Python path, which decides against the new state."""
        c = self.c
        if c is None:
            return
        self.fold()
        if c.inflight:
            arr = self.nsmem
            for i in range(len(self.entries)):
                arr[i].stale = 1
            return
        self.entries = []
        self.rings = self.urings = self.nvmeqs = ()
        self.nsmem = None
        c.ns = ffi.NULL
        c.nns = 0
        self.generation = -1

    # ---- the namespace table ----
    def _refresh(self) -> None:
        """(Re)build the table of namespaces this queue may run in C, after any change
        to the subsystem or to this path's ANA states (only once the lane has no
        command left on the old one). Folds the old table's counters first, so no
        statistic is lost."""
        qp = self.qp
        sub = qp.subsystem
        self.invalidate()
        entries = []
        inaccessible = qp.ana_inaccessible
        if sub is not None:
            for nsid, ns in sorted(sub.namespaces.items()):
                if inaccessible and nsid in inaccessible:
                    continue
                if not ns.visible_to(qp.hostnqn):
                    continue  # masked: the Python path fails it as an absent namespace
                bdev = ns.bdev
                if not _LANE_IO <= bdev.io_types:
                    continue
                t = lane_target_of(qp.channel_of(ns)[1])
                if t is None:
                    continue
                # the span the lane may touch: the namespace, or under a volume's map
                # the volume's base (a thin volume may be larger than its store)
                span = bdev if t.lvol is None else t.channels[t.lvol_depth].bdev
                size = span.num_blocks * span.block_size
                mem = None
                if t.kind == LANE_MEM:
                    if t.mem is None or len(t.mem) < t.offset + size:
                        continue
                    mem = ffi.from_buffer(t.mem, require_writable=True)
                elif t.kind == LANE_URING:
                    if t.ring is None or t.ring.lane_ctx is None or t.fd < 0:
                        continue
                elif t.kind == LANE_PMEM:
                    if t.pmem is None:
                        continue
                elif t.kind == LANE_NVME:
                    if t.ring is None or t.ring.lane_ctx is None or t.offset % bdev.block_size:
                        continue
                elif t.kind != LANE_NULL:
                    continue
                entries.append((ns, t, mem))
        nreal = len(entries)
        entries += _zero_entries(entries)
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
                if t.kind == LANE_URING:
                    e.fd = t.fd
                    e.fd_offset = t.offset
                    e.ring = t.ring.lane_ctx
                elif t.kind == LANE_PMEM:
                    e.pmem, e.pmem_lane = t.pmem
                    e.fd_offset = t.offset
                elif t.kind == LANE_NVME:
                    e.fd_offset = t.offset
                    e.nvmeq = t.ring.lane_ctx
                    e.hw_nsid = t.nsid
                if t.lvol is not None and i < nreal:  # (a volume's zero entry: after these)
                    e.lv = t.lvol.c
                    e.lv_zero = arr + nreal + sum(1 for x in entries[:i]
                                                  if x[1].lvol is not None)
            self.nsmem = arr
            self.c.ns = arr
            self.c.nns = len(entries)
        self.entries = [(ns, t.channels, mem) for ns, t, mem in entries]
        self.rings = tuple({id(t.ring): t.ring for _ns, t, _m in entries
                            if t.ring is not None}.values())
        self.urings = tuple(r for r in self.rings if any(
            t.ring is r and t.kind == LANE_URING for _ns, t, _m in entries))
        self.nvmeqs = tuple(r for r in self.rings if any(
            t.ring is r and t.kind == LANE_NVME for _ns, t, _m in entries))
        self.last = [[0] * 9 for _ in entries]
        self.generation = sub.generation if sub is not None else -1
        self.ana = inaccessible

    def _fold(self) -> None:
        """Add what the C side counted since the last fold to the stats of every channel
        each namespace's I/O passes through (the histogram's counts C clears as they are
        taken)."""
        arr = self.nsmem
        if arr is None:
            return
        for i, (_ns, channels, _mem) in enumerate(self.entries):
            e = arr[i]
            last = self.last[i]
            for t, k in _ST:
                n = e.ops[k] - last[k]
                if not n:
                    continue
                nbytes = e.bytes[k] - last[k + 3]
                lat = e.lat_ns[k] - last[k + 6]
                touched = e.hist_touched[k]
                e.hist_touched[k] = 0
                hist = e.hist[k]
                got = []
                while touched:
                    b = (touched & -touched).bit_length() - 1
                    touched &= touched - 1
                    got.append((b, hist[b]))
                    hist[b] = 0
                for ch in channels:
                    st = ch.stats
                    st.ops[t] += n
                    st.bytes[t] += nbytes
                    st.latency_sum_ns[t] += lat
                    buckets = st.latency_buckets[t]
                    for b, v in got:
                        buckets[b] += v
                last[k] += n
                last[k + 3] += nbytes
                last[k + 6] += lat

    # ---- what the Python path asks ----
    @property
    def executed(self) -> int:
        """Commands the lane executed in all."""
        return self.c.cmds if self.c is not None else self._executed

    @property
    def inflight(self) -> int:
        """Commands the lane owns now (writes waiting for their data, I/O at a backend,
        commands on their way back to the Python path)."""
        c = self.c
        return c.inflight if c is not None else 0

    def busy(self, cid: int) -> bool:
        c = self.c
        return c is not None and c.inflight > 0 and bool(lib.bt_lane_busy(c, cid))

    def owns_ttag(self, ttag: int) -> bool:
        return ttag >= 0x8000 and self.c is not None and self.c.r2t_waiting > 0

    def r2t_of(self, cid: int) -> int:
        """The ttag of the lane's write waiting for data under ``cid``, or -1."""
        c = self.c
        return lib.bt_lane_r2t_of(c, cid) if c is not None and c.r2t_waiting else -1

    def r2t_pending(self) -> dict[int, object]:
        """The lane's writes waiting for data as the stall watch wants them: ttag -> an
        object that stays the same for as long as that one command waits."""
        c = self.c
        if c is None or not c.r2t_waiting:
            self._tokens = {}
            return {}
        ttags = ffi.new("uint16_t[]", R2T_LIST_MAX)
        cids = ffi.new("uint16_t[]", R2T_LIST_MAX)
        seqs = ffi.new("uint32_t[]", R2T_LIST_MAX)
        n = lib.bt_lane_r2t_list(c, ttags, cids, seqs, R2T_LIST_MAX)
        old, tokens, out = self._tokens, {}, {}
        for i in range(n):
            key = (ttags[i], cids[i], seqs[i])
            tok = old.get(key) or _R2tToken(cids[i])
            tokens[key] = tok
            out[ttags[i]] = tok
        self._tokens = tokens
        return out

    def adopt(self, ttag: int) -> tuple[bytes, Any, int] | None:
        """Take the lane's write waiting for data under ``ttag`` back for the Python
        path: (its SQE, the data so far in a buffer of the whole transfer or None when
        none came yet, bytes received); None when it is no such write."""
        c = self.c
        if c is None:
            return None
        sqe = ffi.new("unsigned char[64]")
        nums = ffi.new("uint32_t[2]")
        buf = bytearray(self.qp.opts.max_io_size)  # (a rare path: zero-filling is fine)
        if lib.bt_lane_adopt(c, ttag, sqe, ffi.from_buffer(buf), nums, nums + 1) != 0:
            return None
        received, length = nums[0], nums[1]
        data = memoryview(buf)[:length] if received else None
        return bytes(ffi.buffer(sqe)), data, received

    # ---- the receive path ----
    def usable(self) -> bool:
        """Whether the next receive buffer may start in the lane. Every condition is one
        under which the Python path would do something the lane does not: answer with a
        sequence or auth error, meet a busy command id or a full queue of its own
        requests, hold PDUs back for a host not reading, finish a PDU already begun or
        received directly, or make a write wait for (or wake one waiting for) the
        reactor's buffer budget."""
        qp = self.qp
        ctrl = qp.ctrl
        if (qp.closed or qp.requests or qp._backlog or qp._write_paused_at is not None
                or qp._rx_view is not None or qp.auth_pending or ctrl is None
                or not ctrl.csts & spec.CSTS_RDY or not qp.decoder.idle
                or qp.budget.waiting or qp.r2t_waiting):
            return False
        sub = qp.subsystem
        if sub is None or sub.generation != self.generation or qp.ana_inaccessible is not self.ana:
            if self.c.inflight:
                self.invalidate()  # (marks the table stale until its commands are done)
                return False
            self._refresh()
        return self.nsmem is not None

    def feed(self, data: Any) -> Any:
        """Execute the leading PDUs of ``data`` the lane takes; returns the rest
        (possibly empty) for the Python path."""
        qp = self.qp
        c = self.c
        src = ffi.from_buffer("unsigned char[]", data)
        total = len(src)
        pos = 0
        ncmds = self.ncmds
        run = lib.bt_lane_run
        while pos < total:
            self._enter()
            t0 = _now_ns()
            taken = run(c, src + pos, total - pos, BATCH, MAX_OUT, ncmds)
            elapsed = _now_ns() - t0
            if not taken:
                break
            pos += taken
            qp.rx_pdus += ncmds[0]
            qp.sqhd = c.sqhd
            self.stats.gil_released_ns += elapsed
            self._sync()
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

    @property
    def receiving(self) -> int:
        """Bytes of an H2CData PDU the lane is receiving that are still to come (the
        next bytes on the connection are the lane's); 0 when between PDUs."""
        c = self.c
        return c.rx_left + c.rx_dleft if c is not None else 0

    def rx(self, data: Any) -> Any:
        """The next bytes of the H2CData PDU the lane is receiving: it takes what belongs
        to the PDU; returns the rest."""
        c = self.c
        src = ffi.from_buffer("unsigned char[]", data)
        self._enter()
        t0 = _now_ns()
        taken = lib.bt_lane_rx(c, src, len(src))
        elapsed = _now_ns() - t0
        self.stats.gil_released_ns += elapsed
        self._sync()
        return memoryview(data)[taken:] if taken < len(src) else b""

    @property
    def carrying(self) -> bool:
        """Does the lane hold the start of a capsule (the next bytes finish it)?"""
        c = self.c
        return c is not None and c.carry_len > 0

    def carry(self, data: Any) -> tuple[bytes | None, Any]:
        """Finish the capsule the lane carries with the first bytes of ``data``: the lane
        executes it if it may; else it comes back whole (or as the bytes that did not
        frame a capsule) for the Python path to handle first. Returns (those bytes or
        None, the rest of ``data``)."""
        qp = self.qp
        c = self.c
        src = ffi.from_buffer("unsigned char[]", data)
        out, nout = ffi.new("unsigned char **"), ffi.new("size_t *")
        run = self.usable()
        self._enter()
        t0 = _now_ns()
        taken = lib.bt_lane_carry(c, src, len(src), run, out, nout, self.ncmds)
        elapsed = _now_ns() - t0
        self.stats.gil_released_ns += elapsed
        qp.rx_pdus += self.ncmds[0]
        qp.sqhd = c.sqhd
        self._sync()
        handed = None
        if nout[0]:
            handed = bytes(ffi.buffer(out[0], nout[0]))
            lib.bt_free(out[0])
        return handed, (memoryview(data)[taken:] if taken < len(src) else b"")

    def h2c(self, p: Any) -> bool:
        """Place an H2CData PDU the Python decoder assembled for one of the lane's
        writes (it spanned receive buffers); False: the lane will not (adopt it)."""
        c = self.c
        if c is None:
            return False
        self._enter()
        t0 = _now_ns()
        data = ffi.from_buffer("unsigned char[]", p.data)
        placed = lib.bt_lane_h2c(c, p.cccid, p.ttag, p.datao, data, len(p.data), p.last)
        elapsed = _now_ns() - t0
        self.stats.gil_released_ns += elapsed
        self._sync()
        return bool(placed)

    def drain(self) -> None:
        """The reactor's ring (or NVMe queue pair) completed some of this lane's I/O (in
        C), reaped by Python: record it, queue the output for the socket, and give the
        Python path what did not succeed. A lane whose socket is lent to the C poller
        (which sent the output already) is folded lazily as the poller's are. A closed
        lane only counts, and is freed after its last completion."""
        c = self.c
        if c is None:
            return
        if self.closing:
            self._fold_closed()
            if not c.io_inflight:
                self._free()
            return
        qp = self.qp
        conn = qp._net
        if conn is None:
            self._sync()
            return
        np = qp.reactor.net_poller
        if np is not None:
            np.take_budget()
        if c.out_len or c.nchunks:  # (output of completions reaped before it was lent)
            lib.bt_net_flush(conn)
        if c.submitted != conn.seen_submitted:
            conn.seen_submitted = c.submitted
            for ring in self.rings:
                ring.lane_io_started()
        if c.redo:
            self._sync()
        qp._net_events()

    def fold(self) -> int:
        """Record what C did since the last fold where the Python path records it (see
        the module doc; the lane's reactor thread only). Idempotent and cheap when
        nothing happened: readers, the poller's timer and give-back call it freely.
        Returns the budget bytes the lane gave back meanwhile."""
        c = self.c
        if c is None:
            return 0
        qp = self.qp
        conn = qp._net
        if conn is not None:  # (lent: the SQ head and the PDUs C took are C's to count)
            qp.sqhd = c.sqhd
            seen = qp._net_seen
            qp.rx_pdus += conn.pdus - seen[0]
            seen[0], seen[1] = conn.pdus, conn.busy_ns
            np = qp.reactor.net_poller
            if np is not None:
                np.take_budget()  # (the reactor's budget exact along with the queue's)
        return self._counters()

    def _enter(self) -> None:
        """Before a C call: the lane sees the queue's SQ head and the reactor's budget as
        the Python path left them."""
        qp = self.qp
        c = self.c
        b = qp.budget
        c.sqhd = qp.sqhd
        c.bud_used = b.used
        c.bud_limit = b.limit
        c.bud_held = qp.budget_held
        c.bud_per_qpair = b.per_qpair

    def _fold_closed(self) -> None:
        """A closed queue's lane: only the commands and the bdev statistics still count
        (its budget went back with the queue pair: tcp_limits.DataBudget.drop)."""
        c = self.c
        done = c.cmds - self._seen[4]
        if done:
            self._seen[4] = c.cmds
            self.stats.c_lane_commands += done
            self._fold()

    def _counters(self) -> int:
        """The counting half of a fold (see fold); returns the budget bytes given back."""
        qp = self.qp
        c = self.c
        seen = self._seen
        now = (c.read_cmds, c.read_bytes, c.write_cmds, c.write_bytes, c.cmds, c.bud_taken,
               c.bud_returned, c.submitted, c.rx_pdus, c.pmem_sent)
        qp.rx_pdus += now[8] - seen[8]
        k = qp.counters
        k.read_cmds += now[0] - seen[0]
        k.read_blocks_bytes += now[1] - seen[1]
        k.write_cmds += now[2] - seen[2]
        k.write_bytes += now[3] - seen[3]
        done = now[4] - seen[4]
        self.stats.c_lane_commands += done
        self.stats.c_pmem_sent += now[9] - seen[9]
        taken, returned = now[5] - seen[5], now[6] - seen[6]
        if taken or returned:
            # what the lane took while lent, the C poller added to the reactor's budget
            # already (NetPoller.take_budget): only the rest goes there from here
            b = qp.budget
            held = taken - returned
            via_net = c.bud_net - self._bud_net
            self._bud_net = c.bud_net
            qp.budget_held += held
            b.used += held - via_net
            if b.used > b.high_water:
                b.high_water = b.used
        seen[:] = now
        if done:  # (the namespaces' counters move only with a command done)
            self._fold()
        return returned

    def _sync(self) -> None:
        """After a lane call from Python, or completions Python reaped: what C did,
        recorded where the Python path records it, its output queued for the socket, I/O
        it started watched for, and the commands it gives back done again by the Python
        path."""
        qp = self.qp
        c = self.c
        returned = self.fold()
        if c.out_len or c.nchunks:
            if qp._net is not None:  # (the socket is lent to C: sent from there)
                lib.bt_net_flush(qp._net)
            else:
                self._take_output()
                if not qp._flush_scheduled:
                    qp._flush_scheduled = True
                    qp.reactor.loop.call_soon(qp._flush)  # type: ignore[union-attr]
        if c.submitted != self._submitted:
            self._submitted = c.submitted
            if qp._net is None:  # (lent: the C poller tells its rings, NetPoller._after)
                for ring in self.rings:
                    ring.lane_io_started()
        if c.redo:
            self._redo()
            if qp._net is not None:
                # the Python path has a command outstanding now: it runs what follows
                # too until that is done (as usable() would have it), so C lets go
                qp._net_back()
        if returned and qp.budget.waiting:
            qp.budget._wake()

    def _take_output(self) -> None:
        """The lane's output, queued for the socket as it lies in C memory: each piece
        is freed once the transport lets go of it (uvloop keeps views of what it could
        not send at once)."""
        c, out, take = self.c, self.qp._out, lib.bt_lane_take_chunks
        chunks = self._chunks
        while True:
            n = take(c, chunks, CHUNKS)
            for i in range(n):
                out.append(chunk_view(chunks[i]))
            if n < CHUNKS:
                return

    def _redo(self) -> None:
        """Commands that did not succeed in the lane (an error or a short transfer at the
        backend, a full ring): the Python path does each again from the start, and its
        answer (an error status, or success after all) is the reference's."""
        c = self.c
        sqe = ffi.new("unsigned char[64]")
        length = ffi.new("uint32_t *")
        failed = ffi.new("int *")
        buf = bytearray(self.qp.opts.max_io_size)
        while self.c is not None and lib.bt_lane_redo(c, sqe, ffi.from_buffer(buf), length,
                                                      failed):
            n = length[0]
            self.qp.redo(bytes(ffi.buffer(sqe)), bytes(buf[:n]) if n else None,
                         corrupt=bool(failed[0]))


def _zero_entries(entries: list[tuple[Any, Any, Any]]) -> list[tuple[Any, Any, Any]]:
    """For each volume's entry, one more (after all the real ones, so the lane never
    finds it by nsid) that counts the reads its map answers with zeroes, on the
    channels such a read passes through in the Python path: the volume's, not the
    base's (csrc/bt_lvol.h)."""
    out = []
    for ns, t, _mem in entries:
        if t.lvol is not None:
            out.append((ns, LaneTarget(LANE_NULL, None, 0, t.channels[:t.lvol_depth],
                                       lvol=t.lvol), None))
    return out


class _R2tToken:
    """Stands for one lane write waiting for data in the stall watch's bookkeeping."""

    __slots__ = ("cid",)

    def __init__(self, cid: int) -> None:
        self.cid = cid
