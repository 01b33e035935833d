"""delay bdev: adds latency to a base bdev, for testing hosts and stacks under slow media.

Same model as SPDK's vbdev_delay: the I/O goes to the base at once and its completion
is held back for the configured latency (so the latency seen is base + delay). Reads use
the read latencies, writes and write-zeroes the write latencies; unmap, flush, compare
and reset pass through undelayed. One I/O in a hundred, per channel and direction, gets
the p99 latency instead of the average: a counter rather than a random draw, so a test
or a benchmark sees the same tail every run.

Latencies live on the bdev and are read per I/O, so `bdev_delay_update_latency` takes
effect on every reactor at once without messages. The hold is a `call_later` on the
channel's reactor loop, re-armed if the loop's timer fires early, so the configured
latency is a floor; above it, the loop's timer resolution (1 ms with uvloop) and the
reactor's load add to it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..bdev import BdevIO, BdevModule, IOType, check_uuid, register_module
from ..errors import InvalidParams
from ..params import Param, Schema, non_empty, non_negative
from ._stack import StackedBdev, StackedChannel, adopt_buffer, claim_bases, inherited

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor

LATENCY_TYPES = ("avg_read", "p99_read", "avg_write", "p99_write")
P99_EVERY = 100  # the 1-in-100 I/O that gets the p99 latency


class DelayChannel(StackedChannel):
    bdev: DelayBdev

    def __init__(self, bdev: DelayBdev, reactor: Reactor | None) -> None:
        super().__init__(bdev, reactor)
        self._loop = reactor.loop if reactor is not None else None
        self._count = [0, 0]  # reads, writes: picks the p99 I/O
        self._held: dict[BdevIO, tuple[asyncio.TimerHandle, int]] = {}

    def _submit(self, io: BdevIO) -> None:
        self.forward(io, self.base_channels[0], done=self._base_done)

    def _latency_us(self, io_type: IOType) -> int:
        if io_type == IOType.READ:
            i = 0
        elif io_type in (IOType.WRITE, IOType.WRITE_ZEROES):
            i = 1
        else:
            return 0
        self._count[i] += 1
        lat = self.bdev.latency_us
        p99 = self._count[i] % P99_EVERY == 0
        return lat[("p99_" if p99 else "avg_") + ("read" if i == 0 else "write")]

    def _base_done(self, child: BdevIO) -> None:
        io = child.ctx[0]
        adopt_buffer(io, child)
        us = self._latency_us(io.type)
        if us <= 0:
            self.complete(io, child.status)
            return
        self._hold(io, child.status, time.perf_counter() + us / 1e6)

    def _hold(self, io: BdevIO, status: int, deadline: float) -> None:
        loop = self._loop or asyncio.get_running_loop()
        delay = deadline - time.perf_counter()
        self._held[io] = (loop.call_later(delay, self._release, io, status, deadline), status)

    def _release(self, io: BdevIO, status: int, deadline: float) -> None:
        # libuv measures timers from the time cached at the start of the loop iteration,
        # so one may fire up to a millisecond early: hold the rest, the latency is a floor
        if time.perf_counter() < deadline:
            self._hold(io, status, deadline)
            return
        self._held.pop(io, None)
        self.complete(io, status)

    def close(self) -> None:
        # Complete what is still held rather than dropping it: the submitter is waiting.
        held, self._held = self._held, {}
        for io, (handle, status) in held.items():
            handle.cancel()
            self.complete(io, status)
        super().close()


class DelayBdev(StackedBdev):
    def __init__(self, *, latency_us: dict[str, int], **kw: Any) -> None:
        super().__init__(**kw)
        self.latency_us = latency_us

    def create_channel(self, reactor: Reactor | None) -> DelayChannel:
        return DelayChannel(self, reactor)

    def set_latency(self, latency_type: str, us: int) -> None:
        """Change one latency; the dict is replaced whole so a reactor reading it mid-
        update sees either the old or the new set, never a mix."""
        if latency_type not in LATENCY_TYPES:
            raise InvalidParams(f"parameter 'latency_type' must be one of "
                                f"{', '.join(LATENCY_TYPES)}, got {latency_type!r}")
        new = dict(self.latency_us)
        new[latency_type] = us
        _check_order(new)
        self.latency_us = new
        self.create_params = {**self.create_params, **_spdk_names(new)}

    def driver_specific(self) -> dict[str, Any]:
        return {"delay": {"name": self.name, "base_bdev_name": self.bases[0].name,
                          **_spdk_names(self.latency_us)}}


def _spdk_names(lat: dict[str, int]) -> dict[str, int]:
    return {f"{k}_latency": v for k, v in lat.items()}


def _check_order(lat: dict[str, int]) -> None:
    for kind in ("read", "write"):
        if lat[f"p99_{kind}"] < lat[f"avg_{kind}"]:
            raise InvalidParams(
                f"p99 {kind} latency ({lat[f'p99_{kind}']} us) is below the average "
                f"{kind} latency ({lat[f'avg_{kind}']} us)")


SCHEMA = Schema((
    Param("base_bdev_name", str, required=True, check=non_empty),
    Param("name", str, required=True, check=non_empty),
    Param("uuid", str, check=check_uuid),
    Param("avg_read_latency", int, required=True, check=non_negative, help="microseconds"),
    Param("p99_read_latency", int, required=True, check=non_negative, help="microseconds"),
    Param("avg_write_latency", int, required=True, check=non_negative, help="microseconds"),
    Param("p99_write_latency", int, required=True, check=non_negative, help="microseconds"),
))


def create(params: dict[str, Any], target: Target) -> DelayBdev:
    lat = {k: params[f"{k}_latency"] for k in LATENCY_TYPES}
    _check_order(lat)
    name = params["name"]
    links = claim_bases(target, [params["base_bdev_name"]], f"delay {name}")
    base = links[0].base
    return DelayBdev(
        latency_us=lat,
        links=links,
        name=name,
        num_blocks=base.num_blocks,
        uuid=params.get("uuid") or "",
        product_name="delay",
        module="delay",
        **inherited([base]),
        create_method="bdev_delay_create",
        create_params={"base_bdev_name": base.name, **_spdk_names(lat)},
    )


MODULE = register_module(BdevModule(
    name="delay",
    create=create,
    schema=SCHEMA,
    create_method="bdev_delay_create",
    delete_method="bdev_delay_delete",
    description="adds configurable average and p99 latency to a base bdev",
    needs_target=True,
))
