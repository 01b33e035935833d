"""The block-device layer: one interface for every backend.

A `Bdev` is a named array of blocks. I/O goes through an `IOChannel`, one per (bdev,
reactor), created on the reactor that uses it, so a backend can keep per-core resources
(an io_uring, an NVMe queue pair) and the per-bdev statistics are kept per reactor
without locks; readers (RPC, metrics) add the channels up at read time.

Completion status is an NVMe-compatible integer, `(sct << 8) | sc`, so the NVMe layer
can copy a backend's failure into a CQE without translating it.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import enum
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import AlreadyExists, Busy, InvalidParams, NoSuchDevice
from .params import Schema
from .qos import Qos, QosLimits

if TYPE_CHECKING:
    from .reactor import Reactor


class IOType(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    UNMAP = 3
    WRITE_ZEROES = 4
    COMPARE = 5
    RESET = 6


IO_TYPE_NAMES = {t: t.name.lower() for t in IOType}


class Status(enum.IntEnum):
    """NVMe status as (sct << 8) | sc; the subset a backend can produce."""

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    DATA_TRANSFER_ERROR = 0x004
    INTERNAL_ERROR = 0x006
    ABORTED_BY_REQUEST = 0x007
    ABORTED_SQ_DELETION = 0x008
    INVALID_NAMESPACE = 0x00B
    LBA_OUT_OF_RANGE = 0x080
    CAPACITY_EXCEEDED = 0x081
    NAMESPACE_NOT_READY = 0x082
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281
    COMPARE_FAILURE = 0x285
    ACCESS_DENIED = 0x286


# Latency histogram bucket upper bounds, in nanoseconds (Prometheus exports seconds).
LATENCY_BUCKETS_NS: tuple[int, ...] = (
    10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 25_000_000, 50_000_000, 100_000_000, 250_000_000, 1_000_000_000,
)


# bound once: these run twice per I/O, and module attribute lookups showed in profiles
_now_ns = time.perf_counter_ns
_bucket = bisect.bisect_left


class DataBuffer(Protocol):
    """Memory a bdev channel lends for one I/O's data (its own DMA memory), so data moves
    between the network and the device without a copy through Python objects.

    ``mem`` is writable and at least as long as asked for. Whoever holds it calls
    ``release()`` exactly once, when nothing can touch ``mem`` any more: for write data
    after the bdev I/O completed (or when the command never ran), for read data after
    the transport has taken the bytes (see nvme/qpair.py ``_reap_sent``).
    ``rx_direct``/``rx_copied``: bytes of write data the transport had the kernel
    receive straight into ``mem`` / copied into it, for the lender's counters."""

    mem: memoryview
    rx_direct: int
    rx_copied: int

    def release(self) -> None: ...


class BdevIO:
    """One I/O request. `buf` is data to write, or (for reads) the buffer to fill; a
    backend that can hand out its own memory (malloc) may set `buf` on a read whose
    caller left it None, which is the zero-copy read path.

    `dma` is the lending protocol (see `DataBuffer`): on a write, the buffer the data
    was received into, lent by this channel's `alloc_data_buffer` (the caller keeps it
    and releases it after completion); on a read, a caller that can release lent memory
    sets it to True, and a backend that completes with its own memory in `buf` replaces
    it with the `DataBuffer` the caller must release. None (the default): no lending."""

    __slots__ = (
        "type", "offset_blocks", "num_blocks", "buf", "fua", "cb", "status", "start_ns",
        "ctx", "channel", "dma",
    )

    def __init__(
        self,
        type: IOType,
        offset_blocks: int = 0,
        num_blocks: int = 0,
        buf: Any = None,
        cb: Callable[[BdevIO], None] | None = None,
        *,
        fua: bool = False,
        ctx: Any = None,
        dma: Any = None,
    ) -> None:
        self.type = type
        self.offset_blocks = offset_blocks
        self.num_blocks = num_blocks
        self.buf = buf
        self.fua = fua
        self.cb = cb
        self.status = Status.SUCCESS
        self.start_ns = 0
        self.ctx = ctx
        self.channel: IOChannel | None = None
        self.dma = dma


class ChannelStats:
    """Per-reactor counters for one bdev; only the owning reactor writes them."""

    __slots__ = ("ops", "bytes", "errors", "latency_sum_ns", "latency_buckets")

    def __init__(self) -> None:
        n = len(IOType)
        self.ops = [0] * n
        self.bytes = [0] * n
        self.errors = [0] * n
        self.latency_sum_ns = [0] * n
        # one extra bucket for +Inf
        self.latency_buckets = [[0] * (len(LATENCY_BUCKETS_NS) + 1) for _ in range(n)]


class IOChannel:
    """A bdev's per-reactor I/O path. Backends subclass and implement `_submit`.

    `alloc_data_buffer`, when a backend defines it, lends memory for a write's data
    before it arrives (``nbytes -> DataBuffer | None``; None: use ordinary memory). It
    is a class attribute, None here, so a caller tests it once per channel and other
    backends pay nothing."""

    alloc_data_buffer: Callable[[int], DataBuffer | None] | None = None

    def __init__(self, bdev: Bdev, reactor: Reactor | None) -> None:
        self.bdev = bdev
        self.reactor = reactor
        self.stats = ChannelStats()
        self.outstanding = 0
        # I/Os waiting for the bdev's rate limit (qos.py), in order, and the timer that
        # submits them; None until the first has to wait
        self.qos_queue: collections.deque[BdevIO] | None = None
        self._qos_timer: Any = None

    def __str__(self) -> str:
        return f"{self.bdev.name}"

    def submit(self, io: BdevIO) -> None:
        """Validate, account and hand to the backend; completion arrives via io.cb."""
        bdev = self.bdev
        io.channel = self
        io.start_ns = _now_ns()
        self.outstanding += 1
        if io.type not in bdev.io_types:
            self.complete(io, Status.INVALID_OPCODE)
            return
        if io.offset_blocks < 0 or io.num_blocks < 0 or (
            io.offset_blocks + io.num_blocks > bdev.num_blocks
        ):
            self.complete(io, Status.LBA_OUT_OF_RANGE)
            return
        qos = bdev.qos
        if qos is not None and (io.type == IOType.READ or io.type == IOType.WRITE):
            if self.qos_queue or qos.admit(io.type == IOType.WRITE,
                                           io.num_blocks * bdev.block_size):
                self._qos_hold(io)
                return
        self._start(io)

    def _start(self, io: BdevIO) -> None:
        try:
            self._submit(io)
        except Exception:
            self.bdev.log_exception(io)
            self.complete(io, Status.INTERNAL_ERROR)

    # ---- rate limits (qos.py) ----
    def _qos_hold(self, io: BdevIO) -> None:
        q = self.qos_queue
        if q is None:
            q = self.qos_queue = collections.deque()
        q.append(io)
        self.bdev.qos_delayed += 1
        if self._qos_timer is None:
            self._qos_schedule(0.001)

    def _qos_schedule(self, delay: float) -> None:
        loop = self.reactor.loop if self.reactor is not None else None
        if loop is None:
            loop = asyncio.get_event_loop()
        self._qos_timer = loop.call_later(delay, self._qos_release)

    def _qos_release(self) -> None:
        """Submit the waiting I/Os the limit now allows, oldest first; all of them once
        the limit is gone."""
        self._qos_timer = None
        q = self.qos_queue
        block_size = self.bdev.block_size
        while q:
            io = q[0]
            qos = self.bdev.qos
            if qos is not None:
                wait = qos.admit(io.type == IOType.WRITE, io.num_blocks * block_size)
                if wait:
                    self._qos_schedule(wait)
                    return
            q.popleft()
            self._start(io)

    def _submit(self, io: BdevIO) -> None:
        raise NotImplementedError

    def complete(self, io: BdevIO, status: int = Status.SUCCESS) -> None:
        io.status = status
        self.outstanding -= 1
        st = self.stats
        t = io.type
        if status:
            st.errors[t] += 1
        else:
            st.ops[t] += 1
            st.bytes[t] += io.num_blocks * self.bdev.block_size
            lat = _now_ns() - io.start_ns
            st.latency_sum_ns[t] += lat
            st.latency_buckets[t][_bucket(LATENCY_BUCKETS_NS, lat)] += 1
        cb = io.cb
        if cb is not None:
            cb(io)

    def close(self) -> None:
        """Release per-reactor resources; called on the channel's reactor."""

    def lane_target(self) -> LaneTarget | None:
        """What the NVMe/TCP C lane (nvme/fastlane.py) may do with this channel's blocks
        itself, or None (the default): every I/O then takes the Python path. A backend
        says so only when the lane's execution is the same as its own, byte for byte and
        counter for counter."""
        return None


def lane_target_of(ch: IOChannel) -> LaneTarget | None:
    """What the C lane may do with a channel's blocks: nothing while its bdev has rate
    limits, which only the Python path counts (qos.py). Stacked bdevs ask for their
    base's through this too, so a limit on a base holds for what is stacked on it."""
    return None if ch.bdev.qos is not None else ch.lane_target()


# Backend kinds of the C lane, as `enum bt_backend` in csrc/bt_lane.h numbers them
# (tests/unit/test_fastpath.py checks they agree).
LANE_MEM = 1  # process memory: malloc, and split/passthru over it
LANE_NULL = 2  # reads return zeroes, writes are discarded
LANE_URING = 3  # a file or block device through the reactor's io_uring
LANE_PMEM = 4  # a pmem pool's block translation table in C (csrc/be_pmem.c)
LANE_NVME = 5  # a PCIe NVMe namespace through the reactor's hardware queue pair


@dataclass(frozen=True)
class LaneTarget:
    """A namespace's blocks as the C lane sees them: a backend kind (LANE_*), its
    memory when it is process memory (an object exporting the buffer protocol, held for
    as long as the lane uses it), the byte offset of the namespace in it (a split's
    remap), and every channel an I/O passes through, outermost first, whose statistics
    the Python path would count. For io_uring: the file descriptor and the reactor's
    ring (bdevs/uring.py's _Ring, whose ``lane_ctx`` the lane submits to). For pmem:
    (the pool's ``struct bt_pmem *``, the BTT lane of this reactor); ``offset`` is then
    where the namespace starts in the pool's blocks, in bytes. For NVMe:
    the reactor's queue (bdevs/nvme_pcie.py's ReactorQueue, whose ``lane_ctx`` is the
    queue pair's C ring state) and the namespace's id on the device (``nsid``).
    For a logical volume over any of these: ``lvol``, the volume's cluster map
    (lvol/lanemap.py), which moves each command onto the base, and ``lvol_depth``, how
    many leading channels a read the map answers with zeroes passes through (the
    volume's and any stacked on it: not the base's)."""

    kind: int
    mem: Any
    offset: int
    channels: tuple[IOChannel, ...]
    fd: int = -1
    ring: Any = None
    pmem: Any = None
    nsid: int = 0
    lvol: Any = None
    lvol_depth: int = 0

    def under(self, ch: IOChannel, offset: int = 0) -> LaneTarget:
        """The same blocks seen through a virtual bdev's channel that remaps them by
        ``offset`` bytes (split, passthru). Over a volume only without a remap (the
        volume's map comes first: see `lvol_under`)."""
        assert self.lvol is None or offset == 0, "no remap over a volume's map"
        return LaneTarget(self.kind, self.mem, self.offset + offset, (ch, *self.channels),
                          self.fd, self.ring, self.pmem, self.nsid, self.lvol,
                          self.lvol_depth + 1 if self.lvol is not None else 0)

    def lvol_under(self, ch: IOChannel, lvmap: Any) -> LaneTarget:
        """The base's blocks seen through a logical volume's channel and cluster map."""
        return LaneTarget(self.kind, self.mem, self.offset, (ch, *self.channels), self.fd,
                          self.ring, self.pmem, self.nsid, lvmap, 1)


@dataclass(eq=False)
class Bdev:
    name: str
    block_size: int
    num_blocks: int
    uuid: str = ""
    product_name: str = "Unknown"
    module: str = ""
    write_cache: bool = False  # volatile write cache: data may be lost without a Flush
    io_types: frozenset[IOType] = frozenset({IOType.READ, IOType.WRITE, IOType.FLUSH})
    md_size: int = 0
    aliases: list[str] = field(default_factory=list)
    claimed_by: str | None = None
    # how save_config recreates this bdev
    create_method: str = ""
    create_params: dict[str, Any] = field(default_factory=dict)
    channels: dict[int, IOChannel] = field(default_factory=dict)
    # counters of channels already closed, so totals never go backwards
    retired: ChannelStats = field(default_factory=ChannelStats)
    removed: bool = False
    # rate limits (bdev_set_qos_limit): None, none set
    qos: Qos | None = field(default=None, repr=False)
    qos_delayed: int = 0  # I/Os that waited for the limits (reactors add; a metric)

    def __post_init__(self) -> None:
        if not self.uuid:
            self.uuid = str(uuidlib.uuid4())

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.num_blocks

    def host_memory(self) -> Any:
        """The whole device as one writable buffer when it is plain process memory (malloc),
        else None. The NVMe/TCP C lane (nvme/fastlane.py) reads and writes it directly;
        holding a buffer export of it also keeps it mapped while the lane uses it."""
        return None

    # ---- channels ----
    def get_io_channel(self, reactor: Reactor | None) -> IOChannel:
        """The channel for this reactor, created on first use (call on that reactor)."""
        key = reactor.index if reactor is not None else -1
        ch = self.channels.get(key)
        if ch is None:
            ch = self.create_channel(reactor)
            self.channels[key] = ch
            if reactor is not None:
                reactor.own("channel", ch)
        return ch

    def create_channel(self, reactor: Reactor | None) -> IOChannel:
        raise NotImplementedError

    def close_channel(self, reactor: Reactor | None) -> None:
        key = reactor.index if reactor is not None else -1
        ch = self.channels.pop(key, None)
        if ch is None:
            return
        _add_stats(self.retired, ch.stats)
        ch.close()
        if reactor is not None:
            reactor.disown("channel", ch)

    # ---- claims ----
    def claim(self, owner: str) -> None:
        if self.claimed_by is not None and self.claimed_by != owner:
            raise Busy(f"bdev '{self.name}' is already claimed by {self.claimed_by}")
        self.claimed_by = owner

    def release(self, owner: str) -> None:
        if self.claimed_by == owner:
            self.claimed_by = None

    # ---- lifecycle ----
    def destruct(self) -> None:
        """Free the backend's resources after every channel is closed."""

    def log_exception(self, io: BdevIO) -> None:
        import logging

        logging.getLogger(f"blocktarget.bdev.{self.module}").exception(
            "bdev %s: %s failed", self.name, IO_TYPE_NAMES.get(io.type, io.type)
        )

    # ---- reporting ----
    def stats_total(self) -> ChannelStats:
        total = ChannelStats()
        _add_stats(total, self.retired)
        for ch in list(self.channels.values()):
            _add_stats(total, ch.stats)
        return total

    def driver_specific(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        """The shape of SPDK's bdev_get_bdevs entry."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "product_name": self.product_name,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "uuid": self.uuid,
            "md_size": self.md_size,
            "assigned_rate_limits": (self.qos.limits if self.qos is not None
                                     else QosLimits()).describe(),
            "claimed": self.claimed_by is not None,
            "claim_type": "exclusive_write" if self.claimed_by is not None else None,
            "claimed_by": self.claimed_by,
            "zoned": False,
            "write_cache": self.write_cache,
            "supported_io_types": {
                "read": IOType.READ in self.io_types,
                "write": IOType.WRITE in self.io_types,
                "unmap": IOType.UNMAP in self.io_types,
                "flush": IOType.FLUSH in self.io_types,
                "reset": IOType.RESET in self.io_types,
                "write_zeroes": IOType.WRITE_ZEROES in self.io_types,
                "compare": IOType.COMPARE in self.io_types,
                "compare_and_write": False,
                "nvme_admin": False,
                "nvme_io": False,
            },
            "driver_specific": self.driver_specific(),
        }

    def config_entry(self) -> dict[str, Any] | None:
        """The create call save_config writes; None when another bdev made by the same
        call writes it (a split's parts, a remote controller's namespaces)."""
        params = dict(self.create_params)
        params["name"] = self.name
        params.setdefault("uuid", self.uuid)
        return {"method": self.create_method, "params": params}


def _add_stats(into: ChannelStats, src: ChannelStats) -> None:
    for i in range(len(IOType)):
        into.ops[i] += src.ops[i]
        into.bytes[i] += src.bytes[i]
        into.errors[i] += src.errors[i]
        into.latency_sum_ns[i] += src.latency_sum_ns[i]
        dst, s = into.latency_buckets[i], src.latency_buckets[i]
        for j in range(len(dst)):
            dst[j] += s[j]


# ---------------------------------------------------------------------------
# modules


@dataclass(frozen=True)
class BdevModule:
    """A bdev type: how to create one from validated params, and under which names."""

    name: str
    create: Callable[..., Any]  # (params) or (params, target) -> Bdev or awaitable
    schema: Schema
    create_method: str  # SPDK's RPC name, e.g. bdev_malloc_create
    delete_method: str | None = None
    description: str = ""
    needs_target: bool = False  # create(params, target): stacked/remote bdevs
    create_aliases: tuple[str, ...] = ()  # e.g. bdev_aio_create for the uring module
    delete_aliases: tuple[str, ...] = ()


MODULES: dict[str, BdevModule] = {}


def register_module(module: BdevModule) -> BdevModule:
    if module.name in MODULES:
        raise ValueError(f"bdev module {module.name} registered twice")
    MODULES[module.name] = module
    return module


def load_builtin_modules() -> None:
    """Import every module in blocktarget/bdevs so each registers itself.

    A new bdev type is one new file there; nothing else needs editing. A module whose
    system library is missing must still import (and fail at create time with a clear
    error), so one absent library never hides the other types.
    """
    import importlib
    import pkgutil

    from . import bdevs

    for info in sorted(pkgutil.iter_modules(bdevs.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{bdevs.__name__}.{info.name}")


# Examiners look at every bdev the target registers for metadata of their own (an lvol
# store's super block) and bring back what it describes, so such bdevs need no config
# line. An examiner handles its own errors: one unreadable base never fails a create.
EXAMINERS: list[Callable[[Any, Bdev], Any]] = []


def register_examiner(fn: Callable[[Any, Bdev], Any]) -> None:
    EXAMINERS.append(fn)


def check_uuid(value: str) -> str | None:
    try:
        uuidlib.UUID(value)
    except ValueError:
        return "is not a valid UUID"
    return None


def check_block_size(value: int) -> str | None:
    if value < 512 or value > 65536 or value & (value - 1):
        return "must be a power of two between 512 and 65536"
    return None


def blocks_from_params(params: dict[str, Any]) -> int:
    """SPDK takes num_blocks; our card also takes size_mb. Exactly one is needed."""
    nb, mb, bs = params.get("num_blocks"), params.get("size_mb"), params["block_size"]
    if nb is not None and mb is not None:
        raise InvalidParams("give either 'num_blocks' or 'size_mb', not both")
    if nb is None and mb is None:
        raise InvalidParams("missing required parameter 'num_blocks' (or 'size_mb')")
    if mb is not None:
        total = mb * 1024 * 1024
        if total % bs:
            raise InvalidParams(f"parameter 'size_mb' is not a multiple of block_size {bs}")
        nb = total // bs
    if nb >= 1 << 64:  # NVMe's namespace size (NSZE) is a 64-bit block count
        raise InvalidParams("parameter 'num_blocks' is too large (at most 2^64-1 blocks)")
    return int(nb)


# ---------------------------------------------------------------------------
# registry


class BdevRegistry:
    """All bdevs by name. Changed only from the control-plane thread."""

    def __init__(self) -> None:
        self._bdevs: dict[str, Bdev] = {}

    def __iter__(self) -> Iterator[Bdev]:
        return iter(list(self._bdevs.values()))

    def __len__(self) -> int:
        return len(self._bdevs)

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def find(self, name: str) -> Bdev | None:
        b = self._bdevs.get(name)
        if b is not None:
            return b
        for b in self._bdevs.values():
            if name in b.aliases or name == b.uuid:
                return b
        return None

    def get(self, name: str) -> Bdev:
        b = self.find(name)
        if b is None:
            raise NoSuchDevice(f"bdev '{name}' does not exist")
        return b

    def add(self, bdev: Bdev) -> None:
        if bdev.name in self._bdevs or self.find(bdev.name) is not None:
            raise AlreadyExists(f"bdev '{bdev.name}' already exists")
        for b in self._bdevs.values():
            if b.uuid == bdev.uuid:
                raise AlreadyExists(f"uuid {bdev.uuid} already used by bdev '{b.name}'")
        self._bdevs[bdev.name] = bdev

    def check_removable(self, name: str) -> Bdev:
        bdev = self.get(name)
        if bdev.claimed_by is not None:
            raise Busy(
                f"bdev '{bdev.name}' is in use by {bdev.claimed_by}; remove that first"
            )
        return bdev

    def remove(self, bdev: Bdev) -> None:
        self._bdevs.pop(bdev.name, None)
        bdev.removed = True
