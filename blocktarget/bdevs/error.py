"""error bdev: a base bdev whose I/Os fail on command, for chaos tests.

`bdev_error_create {base_name}` makes `EE_<base>` (SPDK's naming, so SPDK test scripts
work); `bdev_error_inject_error` arms an injection for an I/O type: the next `num`
matching I/Os fail with an NVMe status, hang until resumed (`pending`), or carry
corrupted data (`corrupt_data`: one byte XORed on the way to the base for writes, on the
way back for reads). An injection is one entry per I/O type on the bdev, shared by all
reactors; arming replaces it whole, and its countdown is taken under a lock, which only
I/Os of an armed type ever touch, so an unarmed error bdev costs one dict lookup.

Statuses are NVMe's (the bdev layer's convention): the default `failure` is Internal
Error, `status` picks another (a number, or a name such as "UNRECOVERED_READ_ERROR"),
and SPDK's `nvme_failure` with `nvme_sct`/`nvme_sc` builds one from its parts.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..bdev import BdevIO, BdevModule, IOType, Status, check_uuid, register_module
from ..errors import InvalidParams, Unsupported
from ..params import Param, Schema, non_empty
from ._stack import StackedBdev, StackedChannel, adopt_buffer, claim_bases, inherited

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor

IO_TYPES: dict[str, tuple[IOType, ...]] = {
    "read": (IOType.READ,),
    "write": (IOType.WRITE,),
    "unmap": (IOType.UNMAP,),
    "flush": (IOType.FLUSH,),
    "write_zeroes": (IOType.WRITE_ZEROES,),
    "compare": (IOType.COMPARE,),
    "all": tuple(IOType),
}
ERROR_TYPES = ("failure", "nvme_failure", "pending", "corrupt_data", "nomem")


@dataclass
class Injection:
    error_type: str
    remaining: int
    status: int = Status.INTERNAL_ERROR
    queue_depth: int = 0  # inject only while this many I/Os are outstanding on the channel
    corrupt_offset: int = 0
    corrupt_value: int = 0

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"error_type": self.error_type, "remaining": self.remaining}
        if self.error_type in ("failure", "nvme_failure"):
            d["status"] = self.status
        if self.queue_depth:
            d["queue_depth"] = self.queue_depth
        if self.error_type == "corrupt_data":
            d.update(corrupt_offset=self.corrupt_offset, corrupt_value=self.corrupt_value)
        return d


class ErrorChannel(StackedChannel):
    bdev: ErrorBdev

    def __init__(self, bdev: ErrorBdev, reactor: Reactor | None) -> None:
        super().__init__(bdev, reactor)
        self.pending: deque[BdevIO] = deque()

    def _submit(self, io: BdevIO) -> None:
        bdev = self.bdev
        if io.type == IOType.RESET:
            self._abort_pending()
        inj = bdev.injections.get(io.type)
        if inj is None or not bdev.take(io.type, inj, self.outstanding):
            self.forward(io, self.base_channels[0])
            return
        kind = inj.error_type
        if kind == "pending":
            self.pending.append(io)
        elif kind == "corrupt_data":
            if io.type == IOType.WRITE:
                # corrupt a copy: the caller's buffer is not ours to change
                child = BdevIO(io.type, io.offset_blocks, io.num_blocks, _corrupt(io.buf, inj),
                               self._forwarded, fua=io.fua, ctx=(io, None))
                self.base_channels[0].submit(child)
            else:
                self.forward(io, self.base_channels[0], done=self._corrupt_read,
                             ctx=(inj, io.buf is None))
        else:
            self.complete(io, inj.status)

    def _corrupt_read(self, child: BdevIO) -> None:
        io, (inj, zero_copy) = child.ctx
        adopt_buffer(io, child)
        if not child.status and io.buf is not None:
            if zero_copy:
                # the buffer may be the base's own memory (malloc): corrupt a copy
                io.buf = _corrupt(io.buf, inj)
            else:
                _xor(io.buf, inj)
        self.complete(io, child.status)

    def resume_pending(self) -> int:
        """Send the held I/Os down to the base, as if the device woke up."""
        held, self.pending = self.pending, deque()
        for io in held:
            self.forward(io, self.base_channels[0])
        return len(held)

    def _abort_pending(self) -> None:
        held, self.pending = self.pending, deque()
        for io in held:
            self.complete(io, Status.ABORTED_BY_REQUEST)

    def close(self) -> None:
        self._abort_pending()
        super().close()


def _corrupt(buf: Any, inj: Injection) -> bytearray:
    copy = bytearray(buf)
    _xor(copy, inj)
    return copy


def _xor(buf: Any, inj: Injection) -> None:
    mv = memoryview(buf).cast("B")
    # an offset past this I/O hits its last byte: the I/O is still corrupted, as armed
    off = min(inj.corrupt_offset, mv.nbytes - 1)
    mv[off] ^= inj.corrupt_value


class ErrorBdev(StackedBdev):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.injections: dict[IOType, Injection] = {}
        self._lock = threading.Lock()

    def create_channel(self, reactor: Reactor | None) -> ErrorChannel:
        return ErrorChannel(self, reactor)

    def take(self, io_type: IOType, inj: Injection, outstanding: int) -> bool:
        """Whether this I/O gets the injection; counts it down (any reactor)."""
        if outstanding < inj.queue_depth:
            return False
        with self._lock:
            if inj.remaining <= 0:
                return False
            inj.remaining -= 1
            if inj.remaining == 0 and self.injections.get(io_type) is inj:
                self.injections = {t: i for t, i in self.injections.items() if t != io_type}
        return True

    def inject(self, io_type: str, inj: Injection | None) -> None:
        """Arm (or with None, clear) the injection for io_type; "clear" clears all."""
        with self._lock:
            if io_type == "clear":
                self.injections = {}
                return
            new = dict(self.injections)
            for t in IO_TYPES[io_type]:
                if inj is None:
                    new.pop(t, None)
                elif inj.error_type == "corrupt_data" and t not in (IOType.READ, IOType.WRITE):
                    continue  # only data-carrying I/Os can be corrupted
                else:
                    new[t] = replace(inj)  # each type counts down on its own, as SPDK
            self.injections = new

    def resume_pending(self, reactor: Reactor | None) -> int:
        """Resume the held I/Os of this reactor's channel; run on that reactor."""
        ch = self.channels.get(reactor.index if reactor is not None else -1)
        return ch.resume_pending() if isinstance(ch, ErrorChannel) else 0

    def pending_count(self) -> int:
        return sum(len(ch.pending) for ch in list(self.channels.values())
                   if isinstance(ch, ErrorChannel))

    def driver_specific(self) -> dict[str, Any]:
        injections = {t.name.lower(): inj.describe() for t, inj in self.injections.items()}
        return {"error": {"base_bdev": self.bases[0].name, "injections": injections,
                          "pending_ios": self.pending_count()}}

    def config_entry(self) -> dict[str, Any]:
        # injections are test state, not configuration: only the bdev is written back
        return {"method": "bdev_error_create",
                "params": {"base_name": self.bases[0].name, "uuid": self.uuid}}


def parse_status(params: dict[str, Any]) -> int:
    """The NVMe status an injected failure completes with."""
    if params.get("error_type") == "nvme_failure":
        sct, sc = params.get("nvme_sct") or 0, params.get("nvme_sc") or 0
        if not 0 <= sct <= 7 or not 0 <= sc <= 0xFF:
            raise InvalidParams("parameters 'nvme_sct' (0..7) and 'nvme_sc' (0..255) out of range")
        status = (sct << 8) | sc
    else:
        raw = params.get("status")
        if raw is None:
            return Status.INTERNAL_ERROR
        if isinstance(raw, str):
            try:
                return Status[raw.upper()]
            except KeyError:
                names = ", ".join(s.name for s in Status if s)
                raise InvalidParams(f"parameter 'status' {raw!r} is not one of {names} "
                                    "(or give the number)") from None
        status = raw
    if not 0 < status <= 0x7FF:
        raise InvalidParams(f"status {status:#x} is not a failing NVMe status "
                            "(sct << 8 | sc, 0x001..0x7ff)")
    return status


INJECT_SCHEMA = Schema((
    Param("name", str, required=True, check=non_empty),
    Param("io_type", str, required=True, choices=("clear", *IO_TYPES)),
    Param("error_type", str, default="failure", choices=ERROR_TYPES),
    Param("num", int, default=1),
    Param("queue_depth", int, default=0),
    Param("status", (int, str), help="NVMe status (number or Status name) for 'failure'"),
    Param("nvme_sct", int),
    Param("nvme_sc", int),
    Param("corrupt_offset", int, default=0),
    Param("corrupt_value", int),
))


def injection_from_params(params: dict[str, Any]) -> Injection | None:
    """Validate an inject_error call; None means "clear" (num 0 also disarms, as SPDK)."""
    kind = params["error_type"]
    if params["io_type"] == "clear":
        return None
    if kind == "nomem":
        raise Unsupported("error_type 'nomem' is not modelled: this bdev layer has no "
                          "out-of-memory retry queue to exercise")
    if params["num"] < 0 or params["queue_depth"] < 0 or params["corrupt_offset"] < 0:
        raise InvalidParams("'num', 'queue_depth' and 'corrupt_offset' must not be negative")
    if params["num"] == 0:
        return None
    inj = Injection(kind, params["num"], queue_depth=params["queue_depth"])
    if kind == "corrupt_data":
        value = params.get("corrupt_value")
        if value is None or not 1 <= value <= 255:
            raise InvalidParams("parameter 'corrupt_value' must be 1..255 for corrupt_data")
        if params["io_type"] not in ("read", "write", "all"):
            raise InvalidParams("corrupt_data applies to read or write I/O only")
        inj.corrupt_offset, inj.corrupt_value = params["corrupt_offset"], value
    elif kind in ("failure", "nvme_failure"):
        inj.status = parse_status(params)
    return inj


SCHEMA = Schema((
    Param("base_name", str, required=True, check=non_empty),
    Param("uuid", str, check=check_uuid),
))


def create(params: dict[str, Any], target: Target) -> ErrorBdev:
    base_name = target.bdevs.get(params["base_name"]).name
    name = f"EE_{base_name}"
    if target.bdevs.find(name) is not None:
        from ..errors import AlreadyExists

        raise AlreadyExists(f"bdev '{name}' already exists")
    links = claim_bases(target, [base_name], f"error {name}")
    base = links[0].base
    return ErrorBdev(
        links=links,
        name=name,
        num_blocks=base.num_blocks,
        uuid=params.get("uuid") or "",
        product_name="Error Injection Disk",
        module="error",
        **inherited([base]),
        create_method="bdev_error_create",
        create_params={"base_name": base.name},
    )


MODULE = register_module(BdevModule(
    name="error",
    create=create,
    schema=SCHEMA,
    create_method="bdev_error_create",
    delete_method="bdev_error_delete",
    description="injects I/O failures on a base bdev (chaos tests)",
    needs_target=True,
))
