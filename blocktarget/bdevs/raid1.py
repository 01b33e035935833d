"""raid1 bdev: a mirror over two or more base bdevs.

Writes (and write-zeroes, unmap, flush) go to every healthy leg and succeed when at least
one leg succeeded; reads (and compare) go to one healthy leg, round robin per channel,
and are retried on the next healthy leg when that leg fails. A leg whose I/O fails is
marked failed for the whole array (every reactor stops using it at once, the flag being
one shared attribute) and the array is reported degraded; with no healthy leg left it is
offline and I/O fails (reads with Unrecovered Read Error, writes with Write Fault).

What this mirror does not do, stated so nobody relies on it:

* No superblock. LBA n of the array is LBA n of every leg, nothing is written to the
  legs but data, and membership lives only in the running target and its saved config.
  save_config lists the failed legs in `failed_base_bdevs` (our extension of SPDK's
  call), so a restart from a config saved after a failure keeps the stale leg out of
  I/O; a restart from a config saved before the failure would not know and would read
  stale data from it.
* No rebuild/resync. A failed leg stays failed until the array is deleted; a new or
  returning leg is never copied into. At create the legs are assumed identical (as
  SPDK assumes without a superblock): mirror blank or equal devices only.
* No strip size (it means nothing for a mirror; SPDK rejects it for raid1 too).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..bdev import BdevIO, BdevModule, IOType, Status, check_uuid, register_module
from ..errors import InvalidParams, Unsupported
from ..params import Param, Schema, non_empty
from ._stack import StackedBdev, StackedChannel, adopt_buffer, claim_bases, inherited

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor

log = logging.getLogger("blocktarget.bdev.raid1")

_READS = (IOType.READ, IOType.COMPARE)
# statuses that say something about the data asked for, not about the leg's health
_NOT_A_LEG_FAILURE = frozenset({Status.COMPARE_FAILURE})


class Leg:
    """One mirror member's health, shared by every reactor."""

    __slots__ = ("name", "failed", "reason", "failed_at")

    def __init__(self, name: str) -> None:
        self.name = name
        self.failed = False
        self.reason = ""
        self.failed_at = 0.0


class _Fanout:
    """One write-like I/O spread over the healthy legs."""

    __slots__ = ("io", "left", "ok", "status")

    def __init__(self, io: BdevIO, left: int) -> None:
        self.io = io
        self.left = left
        self.ok = 0
        self.status = 0


class Raid1Channel(StackedChannel):
    bdev: Raid1Bdev

    def __init__(self, bdev: Raid1Bdev, reactor: Reactor | None) -> None:
        super().__init__(bdev, reactor)
        self._next = 0  # round-robin position for reads

    def _submit(self, io: BdevIO) -> None:
        if io.type in _READS:
            self._read(io, tried=0)
            return
        legs = self.bdev.legs
        healthy = [i for i, leg in enumerate(legs) if not leg.failed]
        if not healthy:
            self.complete(io, Status.WRITE_FAULT if io.type != IOType.FLUSH
                          else Status.INTERNAL_ERROR)
            return
        fan = _Fanout(io, len(healthy))
        for i in healthy:
            self.forward(io, self.base_channels[i], done=self._write_done, ctx=(fan, i))

    def _write_done(self, child: BdevIO) -> None:
        _io, (fan, i) = child.ctx
        if child.status:
            self._leg_failed(i, child.status)
            if not fan.status:
                fan.status = child.status
        else:
            fan.ok += 1
        fan.left -= 1
        if fan.left == 0:
            # one good copy is a completed write: the array is degraded, not wrong
            self.complete(fan.io, Status.SUCCESS if fan.ok else fan.status)

    def _read(self, io: BdevIO, tried: int) -> None:
        legs = self.bdev.legs
        n = len(legs)
        for step in range(n):
            i = (self._next + step) % n
            if not legs[i].failed and not tried & (1 << i):
                self._next = (i + 1) % n
                self.forward(io, self.base_channels[i], done=self._read_done,
                             ctx=(tried | (1 << i), i))
                return
        self.complete(io, io.status or Status.UNRECOVERED_READ_ERROR)

    def _read_done(self, child: BdevIO) -> None:
        io, (tried, i) = child.ctx
        status = child.status
        if not status or status in _NOT_A_LEG_FAILURE:
            adopt_buffer(io, child)
            self.complete(io, status)
            return
        self._leg_failed(i, status)
        io.status = status  # reported if no other leg can serve it
        self._read(io, tried)

    def _leg_failed(self, i: int, status: int) -> None:
        if status in _NOT_A_LEG_FAILURE:
            return
        self.bdev.fail_leg(i, f"I/O failed with NVMe status {status:#05x}")


class Raid1Bdev(StackedBdev):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.legs = [Leg(link.base.name) for link in self.links]

    def create_channel(self, reactor: Reactor | None) -> Raid1Channel:
        return Raid1Channel(self, reactor)

    def fail_leg(self, i: int, reason: str) -> None:
        leg = self.legs[i]
        if leg.failed:
            return
        leg.failed, leg.reason, leg.failed_at = True, reason, time.time()
        left = sum(not x.failed for x in self.legs)
        if left:
            log.warning("raid1 %s: leg %s failed (%s); array degraded, %d of %d legs left",
                        self.name, leg.name, reason, left, len(self.legs))
        else:
            log.error("raid1 %s: leg %s failed (%s); no healthy leg left, array offline",
                      self.name, leg.name, reason)

    @property
    def operational(self) -> int:
        return sum(not leg.failed for leg in self.legs)

    @property
    def state(self) -> str:
        """SPDK's state word: online while any leg serves I/O (see `degraded`)."""
        return "online" if self.operational else "offline"

    @property
    def degraded(self) -> bool:
        return 0 < self.operational < len(self.legs)

    def raid_info(self) -> dict[str, Any]:
        """The shape of SPDK's bdev_raid_get_bdevs entry, plus degraded/failed detail."""
        return {
            "name": self.name,
            "uuid": self.uuid,
            "strip_size_kb": 0,
            "state": self.state,
            "degraded": self.degraded,
            "raid_level": "raid1",
            "superblock": False,
            "num_base_bdevs": len(self.legs),
            "num_base_bdevs_discovered": len(self.legs),
            "num_base_bdevs_operational": self.operational,
            "base_bdevs_list": [
                {"name": leg.name, "uuid": link.base.uuid, "is_configured": True,
                 "data_offset": 0, "data_size": self.num_blocks,
                 "state": "failed" if leg.failed else "online",
                 **({"failed_reason": leg.reason} if leg.failed else {})}
                for leg, link in zip(self.legs, self.links, strict=True)
            ],
        }

    def driver_specific(self) -> dict[str, Any]:
        return {"raid": self.raid_info()}

    def config_entry(self) -> dict[str, Any]:
        params: dict[str, Any] = {"name": self.name, "raid_level": "raid1", "strip_size_kb": 0,
                                  "base_bdevs": [leg.name for leg in self.legs],
                                  "uuid": self.uuid}
        failed = [leg.name for leg in self.legs if leg.failed]
        if failed:
            params["failed_base_bdevs"] = failed
        return {"method": "bdev_raid_create", "params": params}


SCHEMA = Schema(
    (
        Param("name", str, required=True, check=non_empty),
        Param("raid_level", str, required=True),
        Param("base_bdevs", (list, str), required=True,
              help="list of names (or one whitespace-separated string, as SPDK's CLI)"),
        Param("strip_size_kb", int, default=0),
        Param("strip_size", int, help="SPDK's older name of strip_size_kb"),
        Param("uuid", str, check=check_uuid),
        Param("superblock", bool, default=False),
        Param("failed_base_bdevs", list, default=[],
              help="legs that start failed (written by save_config after a failure)"),
    ),
)


def create(params: dict[str, Any], target: Target) -> Raid1Bdev:
    level = params["raid_level"].lower()
    if level not in ("raid1", "1"):
        raise Unsupported(f"raid_level {params['raid_level']!r} is not implemented "
                          "(only raid1 is)")
    if params["strip_size_kb"] or params.get("strip_size"):
        raise InvalidParams("strip size is not supported by raid1 (give 0 or leave it out)")
    if params["superblock"]:
        raise Unsupported("raid1 superblocks are not implemented: membership is kept in "
                          "the target's config (see save_config)")
    names = params["base_bdevs"]
    if isinstance(names, str):
        names = names.split()
    if not all(isinstance(n, str) and n for n in names):
        raise InvalidParams("parameter 'base_bdevs' must be a list of bdev names")
    if len(names) < 2:
        raise InvalidParams("raid1 needs at least two base bdevs")
    bases = [target.bdevs.get(n) for n in names]
    sizes = {b.block_size for b in bases}
    if len(sizes) > 1:
        raise InvalidParams(f"base bdevs have different block sizes {sorted(sizes)}")
    failed = params["failed_base_bdevs"]
    unknown = [n for n in failed if n not in names]
    if unknown:
        raise InvalidParams(f"failed_base_bdevs {unknown} are not in base_bdevs")
    if len(set(failed)) >= len(names):
        raise InvalidParams("failed_base_bdevs leaves no healthy leg")
    name = params["name"]
    links = claim_bases(target, [b.name for b in bases], f"raid1 {name}")
    raid = Raid1Bdev(
        links=links,
        name=name,
        num_blocks=min(b.num_blocks for b in bases),
        uuid=params.get("uuid") or "",
        product_name="Raid Volume",
        module="raid1",
        **inherited(bases, io_types=frozenset(
            {IOType.READ, IOType.WRITE, IOType.FLUSH, IOType.UNMAP, IOType.WRITE_ZEROES,
             IOType.COMPARE})),
        create_method="bdev_raid_create",
    )
    for i, n in enumerate(names):
        if n in failed:
            raid.fail_leg(i, "failed before this start (from the config)")
    return raid


MODULE = register_module(BdevModule(
    name="raid1",
    create=create,
    schema=SCHEMA,
    create_method="bdev_raid_create",
    delete_method=None,  # bdev_raid_delete takes SPDK's clear_sb: rpc_methods/bdev_virtual.py
    description="mirror over two or more base bdevs (no superblock, no rebuild)",
    needs_target=True,
))
