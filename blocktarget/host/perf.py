"""``blocktarget perf``: a load generator over the host library, in the spirit of
spdk_nvme_perf and fio.

Design notes:

* Two engines run the I/O loop. The C engine (:mod:`.fastperf`, csrc/perf.c; the
  default, ``--engine auto``) runs each phase of a connection's workload in one C call
  with the GIL released, at a small fraction of the Python engine's CPU per I/O, so
  that the target, not the initiator, limits a benchmark. The Python engine below
  (:class:`_Engine`, ``--engine python``) is its reference and runs what the C engine
  does not (``--journal``); both produce the same results, messages and errors, and the
  result names the engine that ran.
* The Python I/O loop is callback driven on :meth:`QueuePair.submit_cb`, not one coroutine
  per I/O: a completion resubmits from inside ``data_received``, so every completion in
  a TCP segment turns into a new command in the same loop iteration and they all leave
  in one ``writelines``. Coroutines would cost a Task step per I/O.
* Latency goes into a log-linear histogram (:class:`LatencyHistogram`: exact below 128
  ns, then 64 buckets per power of two, so < 1.6 % error) — fixed memory however long
  the run, and histograms of several processes merge by adding counts, which keeps
  percentiles exact across ``--connections`` workers (averaging percentiles is wrong).
* ``--connections N`` runs N worker processes (the GIL makes one Python process the
  bottleneck long before the target is), each with its own controller connection and
  a disjoint slice of the working set, started together behind a barrier.
* ``--verify`` writes blocks carrying (magic, LBA, generation) and checks every read
  against the generation last acknowledged for that block: a stale block, a block
  written to the wrong LBA or a torn one all show. Workloads that read first prefill
  the worker's slice (generation 1) so every read is checkable; two commands never
  touch the same block at once, so the expected generation is always defined.
* ``--journal FILE`` (with ``--verify``, one connection) makes that knowledge outlive
  the process and the target: every write is sent with FUA and journaled before it is
  submitted and again once acknowledged (:mod:`.journal`); a run first reads every
  journaled block back and proves no acknowledged write was lost, then writes on
  from there. Losing the connection (the target was killed) ends such a run without
  losing the journal; ``--check-only`` only checks.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import random
import re
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from blocktarget.nvme import spec

from . import fastperf
from .connection import Completion, QueuePair
from .controller import Controller, connect
from .fastperf import CEngine
from .journal import Journal, check_unit

__all__ = [
    "ENGINES",
    "WORKLOADS",
    "LatencyHistogram",
    "OpStats",
    "PerfConfig",
    "PerfResult",
    "format_result",
    "make_pattern",
    "parse_size",
    "run_perf",
    "run_perf_async",
    "verify_pattern",
]

WORKLOADS = ("read", "write", "randread", "randwrite", "rw", "randrw")
ENGINES = ("auto", "c", "python")

# ---------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """'4096', '4k', '4K', '4KiB', '128k', '1M' -> bytes (binary units, as fio and
    spdk_nvme_perf read them)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _SIZE_MULT[m.group(2).lower()]


# ------------------------------------------------------------------------ histogram


class LatencyHistogram:
    """Log-linear latency histogram in nanoseconds (HdrHistogram's bucketing).

    Values below 2*SUB are exact; above, each power of two is split into SUB equal
    buckets, so a reported percentile is within 1/SUB of the truth. Memory is fixed
    (about 2,200 counters up to ~18 minutes), whatever the number of samples.
    """

    SUB_BITS = 6
    SUB = 1 << SUB_BITS
    MAX_SHIFT = 34
    NBUCKETS = (MAX_SHIFT + 2) * SUB

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts = [0] * self.NBUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    @classmethod
    def index(cls, v: int) -> int:
        if v < 2 * cls.SUB:
            return max(v, 0)
        shift = v.bit_length() - cls.SUB_BITS - 1
        if shift > cls.MAX_SHIFT:
            return cls.NBUCKETS - 1
        return (shift << cls.SUB_BITS) + (v >> shift)

    @classmethod
    def bucket_bounds(cls, idx: int) -> tuple[int, int]:
        """[low, high) of values counted in bucket ``idx``."""
        shift = max(idx // cls.SUB - 1, 0)
        mant = idx - (shift << cls.SUB_BITS)
        return mant << shift, (mant + 1) << shift

    def record(self, v: int) -> None:
        if v < 0:
            v = 0
        self.counts[self.index(v)] += 1
        if self.count == 0 or v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
        self.count += 1
        self.total += v

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        if other.count:
            c = self.counts
            for i, n in enumerate(other.counts):
                if n:
                    c[i] += n
            self.min = other.min if not self.count else min(self.min, other.min)
            self.max = max(self.max, other.max)
            self.count += other.count
            self.total += other.total
        return self

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, p: float) -> float:
        """The value below which ``p`` percent of samples fall (bucket midpoint,
        clamped to the observed min/max); 0 when empty."""
        if not self.count:
            return 0.0
        if not 0 <= p <= 100:
            raise ValueError("percentile must be within 0..100")
        if p == 100:
            return float(self.max)
        target = max(1, math.ceil(self.count * p / 100.0))
        seen = 0
        last = self.NBUCKETS - 1
        for i, n in enumerate(self.counts):
            if n:
                seen += n
                if seen >= target:
                    if i == last:  # the overflow bucket has no upper bound
                        return float(self.max)
                    low, high = self.bucket_bounds(i)
                    mid = (low + high - 1) / 2.0
                    return float(min(max(mid, self.min), self.max))
        return float(self.max)  # pragma: no cover - counts and count disagree

    def to_dict(self) -> dict[str, Any]:
        """Sparse form for sending between processes and for JSON."""
        return {
            "count": self.count, "total": self.total, "min": self.min, "max": self.max,
            "buckets": {str(i): n for i, n in enumerate(self.counts) if n},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyHistogram:
        h = cls()
        h.count, h.total, h.min, h.max = d["count"], d["total"], d["min"], d["max"]
        for i, n in d["buckets"].items():
            h.counts[int(i)] = n
        return h


# -------------------------------------------------------------------------- pattern

_PATTERN_HDR = struct.Struct("<4sQI")
PATTERN_MAGIC = b"BTVP"
UNKNOWN_GEN = 0xFFFFFFFF


def make_pattern(slba: int, nlb: int, lba_size: int, gen: int) -> bytes:
    """Blocks slba..slba+nlb-1, each its 16-byte (magic, LBA, generation) stamp repeated
    over the whole block, so a torn or shifted block fails too."""
    reps = lba_size // _PATTERN_HDR.size
    tail = lba_size - reps * _PATTERN_HDR.size
    pack = _PATTERN_HDR.pack
    parts = []
    for lba in range(slba, slba + nlb):
        stamp = pack(PATTERN_MAGIC, lba, gen)
        parts.append(stamp * reps + stamp[:tail])
    return b"".join(parts)


def verify_pattern(data: Any, slba: int, nlb: int, lba_size: int, gen: int) -> str | None:
    """None when ``data`` is what :func:`make_pattern` wrote, else what is wrong with
    the first bad block (readable, for the error report)."""
    mv = memoryview(data)
    if mv.nbytes != nlb * lba_size:
        return f"got {mv.nbytes} bytes, expected {nlb * lba_size}"
    if mv == make_pattern(slba, nlb, lba_size, gen):
        return None
    for i in range(nlb):
        lba = slba + i
        block = mv[i * lba_size:(i + 1) * lba_size]
        if block == make_pattern(lba, 1, lba_size, gen):
            continue
        magic, got_lba, got_gen = _PATTERN_HDR.unpack_from(block)
        if magic != PATTERN_MAGIC:
            return f"LBA {lba}: no pattern (starts {bytes(block[:16]).hex()})"
        if got_lba != lba:
            return f"LBA {lba}: holds the block of LBA {got_lba} (generation {got_gen})"
        if got_gen != gen:
            return f"LBA {lba}: generation {got_gen}, expected {gen}"
        return f"LBA {lba}: stamp right but block body corrupt"
    return None  # pragma: no cover - whole compare failed, no block did


# --------------------------------------------------------------------------- config


@dataclass(slots=True)
class PerfConfig:
    addr: str
    port: int
    nqn: str
    workload: str = "randread"
    io_size: int = 4096
    qd: int = 32
    time_s: float = 10.0
    rwmixread: int = 70
    connections: int = 1
    nsid: int = 1
    verify: bool = False
    hdgst: bool = False
    ddgst: bool = False
    hostnqn: str | None = None
    size: int = 0  # working set in bytes; 0 = whole namespace
    progress: bool = True
    seed: int | None = None
    journal: str | None = None  # file of acknowledged writes (see module docstring)
    check_only: bool = False  # with journal: check it, run no workload
    journal_sync: bool = False  # fsync each acknowledgement (host power-loss safety)
    engine: str = "auto"  # the I/O loop: "c" (fastperf.py), "python" (_Engine), "auto"
    copy_data: bool = False  # C engine: land read data in buffers even unverified
    busy_poll: bool = False  # C engine: spin on the socket, never sleep (latency runs)
    # DH-HMAC-CHAP keys (DHHC-1:..); never part of the printed result
    dhchap_secret: str | None = field(default=None, repr=False)
    dhchap_ctrl_secret: str | None = field(default=None, repr=False)
    tls_key: str | None = field(default=None, repr=False)  # NVMeTLSkey-1 text or its file

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
        if self.engine == "c" and (why := fastperf.unsupported(self)) is not None:
            raise ValueError(f"--engine c: {why} (use --engine auto or python)")
        if self.busy_poll:
            if self.engine == "python":
                raise ValueError("--busy-poll: only the C engine spins (not --engine python)")
            if (why := fastperf.unsupported(self)) is not None:
                raise ValueError(f"--busy-poll: only the C engine spins, and this run needs "
                                 f"the Python engine ({why})")
        if self.io_size <= 0:
            raise ValueError("io size must be positive")
        if not 1 <= self.qd <= 65534:
            raise ValueError("queue depth must be 1..65534")
        if self.time_s <= 0:
            raise ValueError("time must be positive")
        if not 0 <= self.rwmixread <= 100:
            raise ValueError("rwmixread must be 0..100")
        if self.connections < 1:
            raise ValueError("connections must be at least 1")
        if self.size < 0:
            raise ValueError("size must not be negative")
        if self.journal is not None:
            if not self.verify:
                raise ValueError("--journal needs --verify (it journals verify generations)")
            if self.connections != 1:
                raise ValueError("--journal works with one connection (-c 1)")
        elif self.check_only:
            raise ValueError("--check-only needs --journal FILE")

    @property
    def read_share(self) -> int:
        """Percent of I/O that are reads."""
        w = self.workload
        if w in ("read", "randread"):
            return 100
        if w in ("write", "randwrite"):
            return 0
        return self.rwmixread

    @property
    def random(self) -> bool:
        return self.workload.startswith("rand")


@dataclass(slots=True)
class OpStats:
    ops: int = 0
    bytes: int = 0
    errors: int = 0
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)

    def merge(self, other: OpStats) -> OpStats:
        self.ops += other.ops
        self.bytes += other.bytes
        self.errors += other.errors
        self.hist.merge(other.hist)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "bytes": self.bytes, "errors": self.errors,
                "hist": self.hist.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpStats:
        return cls(d["ops"], d["bytes"], d["errors"], LatencyHistogram.from_dict(d["hist"]))


@dataclass(slots=True)
class PerfResult:
    config: PerfConfig
    elapsed_s: float = 0.0
    read: OpStats = field(default_factory=OpStats)
    write: OpStats = field(default_factory=OpStats)
    verify_failures: int = 0
    verified_reads: int = 0
    messages: list[str] = field(default_factory=list)
    qd: int = 0  # the queue depth actually used per connection
    worker_errors: int = 0  # workers that failed (multi-process runs)
    cpu_s: float = 0.0  # initiator CPU time during the run, summed over workers
    journal_checked: int = 0  # journaled units read back before the run
    journal_lost: int = 0  # of them, units missing an acknowledged write
    journal_landed: int = 0  # of them, units holding a write that was in flight
    journal_acked: int = 0  # writes this run journaled as acknowledged
    aborted: str = ""  # journal runs: why the run ended early (connection lost)
    engine: str = ""  # the I/O loop that ran: "c" or "python"
    engine_note: str = ""  # --engine auto chose Python: why

    @property
    def total(self) -> OpStats:
        return OpStats().merge(self.read).merge(self.write)

    @property
    def ok(self) -> bool:
        return not (self.read.errors or self.write.errors or self.verify_failures
                    or self.worker_errors or self.aborted)

    def merge(self, other: PerfResult) -> PerfResult:
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.read.merge(other.read)
        self.write.merge(other.write)
        self.verify_failures += other.verify_failures
        self.verified_reads += other.verified_reads
        self.messages.extend(other.messages)
        self.qd = other.qd or self.qd
        self.cpu_s += other.cpu_s
        self.engine = other.engine or self.engine
        self.engine_note = other.engine_note or self.engine_note
        return self

    def to_wire(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s, "read": self.read.to_dict(),
                "write": self.write.to_dict(), "verify_failures": self.verify_failures,
                "verified_reads": self.verified_reads, "messages": self.messages,
                "qd": self.qd, "cpu_s": self.cpu_s, "engine": self.engine,
                "engine_note": self.engine_note}

    @classmethod
    def from_wire(cls, config: PerfConfig, d: dict[str, Any]) -> PerfResult:
        return cls(config, d["elapsed_s"], OpStats.from_dict(d["read"]),
                   OpStats.from_dict(d["write"]), d["verify_failures"], d["verified_reads"],
                   list(d["messages"]), d["qd"], cpu_s=d.get("cpu_s", 0.0),
                   engine=d.get("engine", ""), engine_note=d.get("engine_note", ""))

    def summary(self) -> dict[str, Any]:
        """Numbers for --json and tests: IOPS, MiB/s, latency (us) per direction."""
        def one(s: OpStats) -> dict[str, Any]:
            el = self.elapsed_s or 1.0
            h = s.hist
            return {
                "ops": s.ops, "errors": s.errors,
                "iops": s.ops / el, "mib_s": s.bytes / el / (1 << 20),
                "lat_us": {
                    "mean": h.mean / 1e3, "min": h.min / 1e3, "max": h.max / 1e3,
                    "p50": h.percentile(50) / 1e3, "p99": h.percentile(99) / 1e3,
                    "p99.9": h.percentile(99.9) / 1e3,
                },
            }

        cfg = asdict(self.config)
        cfg.pop("hostnqn", None)
        cfg.pop("dhchap_secret", None)
        cfg.pop("dhchap_ctrl_secret", None)
        cfg["tls"] = cfg.pop("tls_key", None) is not None  # whether, never the key
        ops = self.read.ops + self.write.ops
        return {
            "config": cfg, "elapsed_s": self.elapsed_s, "qd": self.qd,
            "engine": self.engine, "engine_note": self.engine_note,
            "initiator_cpu": {
                "seconds": self.cpu_s,
                "percent_of_one_core": 100.0 * self.cpu_s / (self.elapsed_s or 1.0),
                "us_per_io": self.cpu_s * 1e6 / ops if ops else 0.0,
            },
            "read": one(self.read), "write": one(self.write), "total": one(self.total),
            "verify_failures": self.verify_failures, "verified_reads": self.verified_reads,
            "journal": {"checked": self.journal_checked, "lost": self.journal_lost,
                        "landed": self.journal_landed, "acked": self.journal_acked,
                        "aborted": self.aborted} if self.config.journal else None,
            "messages": self.messages[:20],
        }


# --------------------------------------------------------------------------- engine

_MAX_MESSAGES = 10


class _Slot:
    __slots__ = ("buf", "cb", "gen", "is_read", "start", "unit")

    def __init__(self) -> None:
        self.buf: memoryview | None = None
        self.cb: Callable[[Completion | None, Any], None] | None = None
        self.start = 0
        self.unit = 0
        self.is_read = True
        self.gen = 0


class _Engine:
    """Keeps ``qd`` commands in flight on one queue pair until the deadline (the Python
    engine: the reference for fastperf.CEngine, and what --journal runs on)."""

    kind = "python"

    def __init__(self, qp: QueuePair, cfg: PerfConfig, nsid: int, lba_size: int,
                 first_unit: int, units: int, qd: int, result: PerfResult) -> None:
        self.qp = qp
        self.cfg = cfg
        self.nsid = nsid
        self.lba_size = lba_size
        self.nlb = cfg.io_size // lba_size
        self.first_unit = first_unit
        self.units = units
        self.qd = qd
        self.result = result
        self.read_share = cfg.read_share
        self.random = cfg.random
        self.verify = cfg.verify
        self.rng = random.Random(cfg.seed)
        self.cursor = 0
        self.inflight = 0
        self.deadline = 0
        self.done: asyncio.Future[None] | None = None
        self.gens: array.array[int] | None = None
        self.busy: set[int] = set()
        self.next_gen = 2
        self.wbuf = os.urandom(cfg.io_size)
        self.journal: Journal | None = None
        self.write_cdw12 = self.nlb - 1  # | FUA when journaling: acknowledged = durable
        # live counters for the progress line
        self.ops = 0
        self.bytes = 0
        self.lat_sum = 0
        self.stopping = False
        self.slots = []
        # With --verify two commands never share a block, so more slots than blocks
        # could never all be busy: cap the depth at the working set.
        for _ in range(min(qd, units) if cfg.verify else qd):
            s = _Slot()
            s.buf = memoryview(bytearray(cfg.io_size))
            s.cb = self._make_cb(s)
            self.slots.append(s)

    @property
    def depth(self) -> int:
        """Commands in flight at most."""
        return len(self.slots)

    def _make_cb(self, slot: _Slot) -> Callable[[Completion | None, Any], None]:
        def cb(cpl: Completion | None, data: Any) -> None:
            self._complete(slot, cpl, data)
        return cb

    def _pick_unit(self) -> int:
        if self.random:
            unit = int(self.rng.random() * self.units)
            if self.verify:
                busy = self.busy
                tries = 0
                while unit in busy and tries < 64:
                    unit = int(self.rng.random() * self.units)
                    tries += 1
                if unit in busy:
                    return -1
        else:
            unit = self.cursor
            if self.verify:
                # Skip blocks still in flight (the working set wrapped under us).
                busy = self.busy
                for _ in range(len(busy)):
                    if unit not in busy:
                        break
                    unit = unit + 1 if unit + 1 < self.units else 0
                if unit in busy:
                    return -1
            self.cursor = unit + 1 if unit + 1 < self.units else 0
        return unit

    def _submit(self, slot: _Slot) -> None:
        now = time.perf_counter_ns()
        if now >= self.deadline or self.stopping:
            self._retire()
            return
        unit = self._pick_unit()
        if unit < 0:
            # Every candidate block is busy (working set smaller than the queue depth):
            # run with fewer commands in flight rather than break the verify invariant.
            self._retire()
            return
        slba = (self.first_unit + unit) * self.nlb
        share = self.read_share
        is_read = share == 100 or (share and self.rng.random() * 100 < share)
        slot.unit = unit
        slot.is_read = bool(is_read)
        slot.start = now
        if self.verify:
            self.busy.add(unit)
        if is_read:
            self.qp.submit_cb(slot.cb, spec.IoOpcode.READ, self.nsid, slba & 0xFFFFFFFF,
                              slba >> 32, self.nlb - 1, 0, 0, 0, None, self.cfg.io_size,
                              slot.buf)
        else:
            if self.verify:
                gen = self.next_gen
                self.next_gen = gen + 1 if gen + 1 < UNKNOWN_GEN else 2
                slot.gen = gen
                data: Any = make_pattern(slba, self.nlb, self.lba_size, gen)
                if self.journal is not None:
                    self.journal.intent(slba, gen)
            else:
                data = self.wbuf
            self.qp.submit_cb(slot.cb, spec.IoOpcode.WRITE, self.nsid, slba & 0xFFFFFFFF,
                              slba >> 32, self.write_cdw12, 0, 0, 0, data)

    def _retire(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _complete(self, slot: _Slot, cpl: Completion | None, data: Any) -> None:
        now = time.perf_counter_ns()
        res = self.result
        if cpl is None:
            # The connection failed: nothing more will complete. Stop for good.
            if self.done is not None and not self.done.done():
                self.done.set_exception(data)
            return
        lat = now - slot.start
        stats = res.read if slot.is_read else res.write
        if cpl.status:
            stats.errors += 1
            if len(res.messages) < _MAX_MESSAGES:
                op = "read" if slot.is_read else "write"
                res.messages.append(
                    f"{op} of unit {slot.unit}: {spec.status_name(cpl.status)}"
                )
            if self.verify and not slot.is_read:
                assert self.gens is not None
                self.gens[slot.unit] = UNKNOWN_GEN  # content now unknown: never verify it
                if self.journal is not None:
                    self.journal.failed((self.first_unit + slot.unit) * self.nlb, slot.gen)
        else:
            stats.ops += 1
            stats.bytes += self.cfg.io_size
            stats.hist.record(lat)
            self.ops += 1
            self.bytes += self.cfg.io_size
            self.lat_sum += lat
            if self.verify:
                self._verify(slot, data)
        if self.verify:
            self.busy.discard(slot.unit)
        try:
            self._submit(slot)
        except (ConnectionError, BlockingIOError) as exc:
            if self.done is not None and not self.done.done():
                self.done.set_exception(exc)

    def _verify(self, slot: _Slot, data: Any) -> None:
        gens = self.gens
        assert gens is not None
        if not slot.is_read:
            gens[slot.unit] = slot.gen
            if self.journal is not None:
                self.journal.acked((self.first_unit + slot.unit) * self.nlb, slot.gen)
                self.result.journal_acked += 1
            return
        gen = gens[slot.unit]
        if gen == 0 or gen == UNKNOWN_GEN:
            return
        slba = (self.first_unit + slot.unit) * self.nlb
        problem = verify_pattern(data, slba, self.nlb, self.lba_size, gen)
        res = self.result
        res.verified_reads += 1
        if problem is not None:
            res.verify_failures += 1
            if len(res.messages) < _MAX_MESSAGES:
                res.messages.append(f"verify: {problem}")

    async def _sweep(self, units: list[int], is_read: bool,
                     on_done: Callable[[int, Completion, Any], None]) -> None:
        """Run one command per unit at the engine's queue depth (untimed phases)."""
        if not units:
            return
        todo = iter(units)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending = 0
        bufs = [memoryview(bytearray(self.cfg.io_size)) for _ in range(min(self.qd, len(units)))]

        def submit_next(buf: memoryview) -> bool:
            nonlocal pending
            unit = next(todo, None)
            if unit is None:
                return False
            slba = (self.first_unit + unit) * self.nlb

            def cb(cpl: Completion | None, data: Any) -> None:
                nonlocal pending
                pending -= 1
                if cpl is None:
                    if not done.done():
                        done.set_exception(data)
                    return
                on_done(unit, cpl, data)
                if not submit_next(buf) and pending == 0 and not done.done():
                    done.set_result(None)

            pending += 1
            if is_read:
                self.qp.submit_cb(cb, spec.IoOpcode.READ, self.nsid, slba & 0xFFFFFFFF,
                                  slba >> 32, self.nlb - 1, 0, 0, 0, None, self.cfg.io_size,
                                  buf)
            else:
                data = make_pattern(slba, self.nlb, self.lba_size, 1)
                self.qp.submit_cb(cb, spec.IoOpcode.WRITE, self.nsid, slba & 0xFFFFFFFF,
                                  slba >> 32, self.nlb - 1, 0, 0, 0, data)
            return True

        for buf in bufs:
            submit_next(buf)
        await done

    async def prefill(self, progress: TextIO | None) -> None:
        """Write generation 1 over this worker's slice so every read can be checked."""
        gens = self.gens
        assert gens is not None
        if progress is not None:
            mib = self.units * self.cfg.io_size / (1 << 20)
            print(f"prefilling {mib:.1f} MiB for --verify ...", file=progress, flush=True)
        failure: list[str] = []

        def on_done(unit: int, cpl: Completion, data: Any) -> None:
            if cpl.status:
                gens[unit] = UNKNOWN_GEN
                if not failure:
                    failure.append(spec.status_name(cpl.status))
            else:
                gens[unit] = 1

        await self._sweep(list(range(self.units)), False, on_done)
        if failure:
            self.result.messages.append(f"prefill: some writes failed ({failure[0]})")

    async def check_journal(self, progress: TextIO | None) -> None:
        """Read every journaled unit back and judge it (see :func:`check_unit`); record
        what each now holds, so in-flight writes that did or did not land are resolved
        before new ones are journaled, and seed the in-memory generations from it."""
        journal, gens = self.journal, self.gens
        assert journal is not None and gens is not None
        st = journal.state
        slbas = st.units()
        self.next_gen = max(self.next_gen, st.max_gen + 1)
        if self.next_gen >= UNKNOWN_GEN:
            raise ValueError(f"journal {journal.path} has used every generation; start a new one")
        if progress is not None and slbas:
            print(f"checking {len(slbas)} journaled units ...", file=progress, flush=True)
        res = self.result

        def on_done(unit: int, cpl: Completion, data: Any) -> None:
            slba = (self.first_unit + unit) * self.nlb
            if cpl.status:
                # unproven either way: fail the run, keep the journal's claim for next time
                res.verify_failures += 1
                if len(res.messages) < _MAX_MESSAGES:
                    res.messages.append(f"journal check: read of LBA {slba} failed: "
                                        f"{spec.status_name(cpl.status)}")
                return
            verdict = check_unit(data, slba, self.nlb, self.lba_size, st.acked.get(slba),
                                 st.pending.get(slba, set()))
            res.journal_checked += 1
            if verdict.lost is not None:
                res.journal_lost += 1
                res.verify_failures += 1
                if len(res.messages) < _MAX_MESSAGES:
                    res.messages.append(f"journal: acknowledged write lost: {verdict.lost}")
                return  # keep the journal's claim: a later check reports it again
            res.journal_landed += verdict.landed
            journal.resolved(slba, verdict.gen)
            if 0 <= unit < self.units:
                gens[unit] = verdict.gen if verdict.gen is not None else UNKNOWN_GEN

        await self._sweep([s // self.nlb - self.first_unit for s in slbas], True, on_done)
        journal.compact(st)

    async def read_back(self, progress: TextIO | None) -> None:
        """After the timed run, read every block this run wrote and check it, as fio's
        verify phase does, so write-only workloads are verified too."""
        gens = self.gens
        assert gens is not None
        units = [u for u in range(self.units) if gens[u] not in (0, 1, UNKNOWN_GEN)]
        if progress is not None and units:
            print(f"verifying {len(units)} written blocks of {self.cfg.io_size} B ...",
                  file=progress, flush=True)
        res = self.result

        def on_done(unit: int, cpl: Completion, data: Any) -> None:
            if cpl.status:
                res.verify_failures += 1
                if len(res.messages) < _MAX_MESSAGES:
                    res.messages.append(f"verify read of unit {unit}: "
                                        f"{spec.status_name(cpl.status)}")
                return
            slba = (self.first_unit + unit) * self.nlb
            problem = verify_pattern(data, slba, self.nlb, self.lba_size, gens[unit])
            res.verified_reads += 1
            if problem is not None:
                res.verify_failures += 1
                if len(res.messages) < _MAX_MESSAGES:
                    res.messages.append(f"verify: {problem}")

        await self._sweep(units, True, on_done)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        start = time.perf_counter_ns()
        cpu0 = time.process_time()
        self.deadline = start + int(self.cfg.time_s * 1e9)
        self.inflight = len(self.slots)
        for slot in self.slots:
            self._submit(slot)
        try:
            await self.done
        finally:
            self.result.elapsed_s = (time.perf_counter_ns() - start) / 1e9
            self.result.cpu_s = time.process_time() - cpu0


# ---------------------------------------------------------------------------- worker


async def _open(cfg: PerfConfig) -> tuple[Controller, int]:
    qsize = cfg.qd + 1
    ctrl = await connect(cfg.addr, cfg.port, cfg.nqn, hostnqn=cfg.hostnqn, nr_io_queues=1,
                         queue_size=qsize, hdgst=cfg.hdgst, ddgst=cfg.ddgst,
                         dhchap_secret=cfg.dhchap_secret,
                         dhchap_ctrl_secret=cfg.dhchap_ctrl_secret, tls_key=cfg.tls_key)
    return ctrl, ctrl.io_queue_size - 1


def _choose_engine(cfg: PerfConfig) -> str | None:
    """None: the C engine runs ``cfg``; else why the Python engine does."""
    if cfg.engine == "python":
        return "--engine python"
    why = fastperf.unsupported(cfg)
    if why is not None and cfg.engine == "c":
        raise ValueError(f"--engine c: {why}")
    return why


async def _prepare(cfg: PerfConfig, index: int, count: int,
                   progress: TextIO | None) -> tuple[Controller, _Engine | CEngine]:
    ctrl, qd = await _open(cfg)
    try:
        ns = await ctrl.namespace(cfg.nsid)
        if cfg.io_size % ns.lba_size:
            raise ValueError(f"io size {cfg.io_size} is not a multiple of the "
                             f"{ns.lba_size}-byte block size")
        if ctrl.max_transfer and cfg.io_size > ctrl.max_transfer:
            raise ValueError(f"io size {cfg.io_size} exceeds the controller's maximum "
                             f"transfer of {ctrl.max_transfer} bytes (MDTS)")
        working = min(cfg.size or ns.size_bytes, ns.size_bytes)
        total_units = working // cfg.io_size
        per = total_units // count
        if per < 1:
            raise ValueError(f"working set of {working} bytes is too small for "
                             f"{count} connection(s) of {cfg.io_size}-byte I/O")
        result = PerfResult(cfg, qd=qd)
        why_python = _choose_engine(cfg)
        eng: _Engine | CEngine
        if why_python is None:
            eng = CEngine(ctrl.io_queues[0], cfg, cfg.nsid, ns.lba_size, index * per, per,
                          qd, result, land=cfg.copy_data, spin=cfg.busy_poll)
        else:
            eng = _Engine(ctrl.io_queues[0], cfg, cfg.nsid, ns.lba_size, index * per, per,
                          qd, result)
            result.engine_note = why_python if cfg.engine == "auto" else ""
        result.engine = eng.kind
        result.qd = eng.depth
        if cfg.verify:
            if isinstance(eng, _Engine):
                eng.gens = array.array("I", bytes(4 * per))
            if cfg.journal is not None:
                assert isinstance(eng, _Engine)
                # no prefill: blocks the journal does not know are simply not verified
                eng.journal = Journal(cfg.journal, cfg.io_size, ns.lba_size, cfg.nsid,
                                      sync=cfg.journal_sync)
                eng.write_cdw12 |= spec.RwFlags.FUA
                await eng.check_journal(progress)
            elif cfg.read_share:
                await eng.prefill(progress)
        return ctrl, eng
    except BaseException:
        await ctrl.close()
        raise


def _progress_line(t: float, ops: int, nbytes: int, lat_sum: int, dt: float) -> str:
    iops = ops / dt if dt else 0.0
    mib = nbytes / dt / (1 << 20) if dt else 0.0
    lat = lat_sum / ops / 1e3 if ops else 0.0
    return f"[{t:5.0f}s] {iops:12,.0f} IOPS {mib:10.2f} MiB/s  avg lat {lat:9.2f} us"


async def run_perf_async(cfg: PerfConfig, progress: TextIO | None = None) -> PerfResult:
    """One connection in this process (the test-friendly path)."""
    cfg.validate()
    ctrl, eng = await _prepare(cfg, 0, 1, progress)
    if cfg.check_only:
        try:
            await ctrl.disconnect()
        finally:
            if eng.journal is not None:
                eng.journal.close()
        return eng.result
    printer: asyncio.Task[None] | None = None
    if progress is not None:
        printer = asyncio.get_running_loop().create_task(_print_progress(eng, progress))
    lost: BaseException | None = None
    try:
        try:
            await eng.run()
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            if eng.journal is None:
                raise
            # The target went away (a crash test kills it): the journal holds every
            # acknowledged write; the next run's check is the verdict.
            lost = exc
            eng.result.aborted = f"connection lost: {exc or type(exc).__name__}"
        if printer is not None:
            printer.cancel()
        if lost is None and cfg.verify and cfg.read_share < 100:
            await eng.read_back(progress)
    finally:
        if printer is not None:
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printer
        if eng.journal is not None:
            eng.journal.close()
        if lost is None:
            await ctrl.disconnect()
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ctrl.close(), 2)
    return eng.result


async def _print_progress(eng: _Engine | CEngine, out: TextIO) -> None:
    start = time.monotonic()
    last = (0, 0, 0)
    last_t = start
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        cur = (eng.ops, eng.bytes, eng.lat_sum)
        d = [c - p for c, p in zip(cur, last, strict=True)]
        print(_progress_line(now - start, d[0], d[1], d[2], now - last_t), file=out, flush=True)
        last, last_t = cur, now


def _worker_main(cfg: PerfConfig, index: int, count: int, barrier: Any, shared: Any,
                 results: Any) -> None:
    """Entry point of one worker process."""
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        res = runner(_worker_async(cfg, index, count, barrier, shared))
        results.put((index, "ok", res.to_wire()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, not lost
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, "error", f"{type(exc).__name__}: {exc}"))


async def _worker_async(cfg: PerfConfig, index: int, count: int, barrier: Any,
                        shared: Any) -> PerfResult:
    cfg.seed = None if cfg.seed is None else cfg.seed + index
    ctrl, eng = await _prepare(cfg, index, count, None)
    try:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120.0)

        async def publish() -> None:
            base = index * 3
            while True:
                shared[base], shared[base + 1], shared[base + 2] = eng.ops, eng.bytes, eng.lat_sum
                await asyncio.sleep(0.1)

        pub = asyncio.get_running_loop().create_task(publish())
        try:
            await eng.run()
        finally:
            pub.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pub
        base = index * 3
        shared[base], shared[base + 1], shared[base + 2] = eng.ops, eng.bytes, eng.lat_sum
        if cfg.verify and cfg.read_share < 100:
            await eng.read_back(None)
    finally:
        await ctrl.disconnect()
    return eng.result


def run_perf(cfg: PerfConfig, progress: TextIO | None = sys.stderr) -> PerfResult:
    """Run the workload; one connection runs in this process, N in N processes."""
    cfg.validate()
    if cfg.connections == 1:
        try:
            import uvloop

            return uvloop.run(run_perf_async(cfg, progress))
        except ImportError:  # pragma: no cover
            return asyncio.run(run_perf_async(cfg, progress))
    return _run_multi(cfg, progress)


def _run_multi(cfg: PerfConfig, progress: TextIO | None) -> PerfResult:
    n = cfg.connections
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n + 1)
    shared = ctx.Array("q", 3 * n, lock=False)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(cfg, i, n, barrier, shared, results),
                    name=f"perf-worker-{i}", daemon=True)
        for i in range(n)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []

    def drain(timeout: float) -> None:
        try:
            idx, kind, payload = results.get(timeout=timeout)
        except queue.Empty:
            return
        if kind == "ok":
            collected[idx] = payload
        else:
            errors.append(f"worker {idx}: {payload}")

    try:
        try:
            barrier.wait(timeout=180.0)
        except Exception:  # BrokenBarrierError: a worker failed to connect or prefill
            deadline = time.monotonic() + 10
            while len(collected) + len(errors) < n and time.monotonic() < deadline:
                drain(0.5)
            raise RuntimeError("; ".join(errors) or "workers failed to start") from None
        start = time.monotonic()
        last = [0, 0, 0]
        last_t = start
        end = start + cfg.time_s + 60.0
        next_tick = start + 1.0
        while len(collected) + len(errors) < n and time.monotonic() < end:
            drain(max(0.0, min(0.2, next_tick - time.monotonic())))
            now = time.monotonic()
            if now >= next_tick and now - start < cfg.time_s + 0.5:
                cur = [sum(shared[k::3]) for k in range(3)]
                if progress is not None:
                    d = [c - p for c, p in zip(cur, last, strict=True)]
                    print(_progress_line(now - start, d[0], d[1], d[2], now - last_t),
                          file=progress, flush=True)
                last, last_t = cur, now
                next_tick += 1.0
        if len(collected) + len(errors) < n:
            errors.append("some workers did not report in time")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if errors and not collected:
        raise RuntimeError("; ".join(errors))
    total = PerfResult(cfg)
    for idx in sorted(collected):
        total.merge(PerfResult.from_wire(cfg, collected[idx]))
    total.messages.extend(errors)
    total.worker_errors = len(errors)
    return total


# ---------------------------------------------------------------------------- output


def format_result(res: PerfResult) -> str:
    cfg = res.config
    s = res.summary()
    lines = [
        f"{cfg.workload} {cfg.io_size} B, QD {res.qd} x {cfg.connections} connection(s), "
        f"{res.elapsed_s:.2f} s, {cfg.nqn} at {cfg.addr}:{cfg.port}"
        + (" [verify]" if cfg.verify else "")
        + (" [hdgst]" if cfg.hdgst else "") + (" [ddgst]" if cfg.ddgst else "")
        + (f", engine {res.engine}" if res.engine else "")
        + (f" ({res.engine_note})" if res.engine_note else ""),
        f"{'':8}{'IOPS':>14}{'MiB/s':>11}{'avg us':>11}{'min us':>10}{'p50 us':>10}"
        f"{'p99 us':>10}{'p99.9 us':>10}{'max us':>11}{'errors':>8}",
    ]

    def row(name: str, d: dict[str, Any]) -> str:
        lat = d["lat_us"]
        return (f"{name:8}{d['iops']:14,.1f}{d['mib_s']:11.2f}{lat['mean']:11.2f}"
                f"{lat['min']:10.2f}{lat['p50']:10.2f}{lat['p99']:10.2f}{lat['p99.9']:10.2f}"
                f"{lat['max']:11.2f}{d['errors']:8d}")

    names: Iterable[str] = [k for k in ("read", "write") if s[k]["ops"] or s[k]["errors"]]
    for k in names:
        lines.append(row(k, s[k]))
    lines.append(row("total", s["total"]))
    cpu = s["initiator_cpu"]
    lines.append(f"initiator CPU: {cpu['percent_of_one_core']:.0f}% of a core, "
                 f"{cpu['us_per_io']:.1f} us per I/O")
    if cfg.verify:
        lines.append(f"verify: {res.verified_reads} reads checked, "
                     f"{res.verify_failures} mismatches")
    if cfg.journal:
        lines.append(f"journal {cfg.journal}: {res.journal_checked} units checked, "
                     f"{res.journal_lost} acknowledged writes lost, {res.journal_landed} "
                     f"in-flight writes landed; {res.journal_acked} FUA writes acknowledged"
                     + (f"; {res.aborted}" if res.aborted else ""))
    for m in res.messages[:_MAX_MESSAGES]:
        lines.append(f"  ! {m}")
    return "\n".join(lines)


def result_json(res: PerfResult) -> str:
    return json.dumps(res.summary(), indent=2)
