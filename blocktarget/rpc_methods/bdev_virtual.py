"""Methods of the virtual bdevs beyond create/delete (which rpc_methods/bdev.py generates
from each module): live latency changes, error injection, raid listing, and the deletes
whose SPDK parameters are not just `name` (split by base, raid with `clear_sb`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..bdevs.delay import LATENCY_TYPES, DelayBdev
from ..bdevs.error import INJECT_SCHEMA, ErrorBdev, injection_from_params
from ..bdevs.raid1 import Raid1Bdev
from ..bdevs.split import SplitPart
from ..errors import Busy, NoSuchDevice
from ..params import Param, Schema, non_empty, non_negative
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target
    from ..bdev import Bdev


def _typed(target: Target, name: str, cls: type, what: str) -> Any:
    bdev = target.bdevs.get(name)
    if not isinstance(bdev, cls):
        raise NoSuchDevice(f"bdev '{name}' is not a {what} bdev")
    return bdev


# ---- delay --------------------------------------------------------------------


@method("bdev_delay_update_latency", Schema((
    Param("delay_bdev_name", str, required=True, check=non_empty),
    Param("latency_type", str, required=True, choices=LATENCY_TYPES),
    Param("latency_us", int, required=True, check=non_negative),
)), in_config=False)
def bdev_delay_update_latency(target: Target, params: dict[str, Any]) -> bool:
    """Change one latency of a delay bdev; in effect for the next I/O on every reactor."""
    bdev: DelayBdev = _typed(target, params["delay_bdev_name"], DelayBdev, "delay")
    bdev.set_latency(params["latency_type"], params["latency_us"])
    return True


# ---- error --------------------------------------------------------------------


@method("bdev_error_inject_error", INJECT_SCHEMA, in_config=False)
def bdev_error_inject_error(target: Target, params: dict[str, Any]) -> bool:
    """Arm (or clear) an injection on an error bdev: the next `num` I/Os of `io_type`."""
    bdev: ErrorBdev = _typed(target, params["name"], ErrorBdev, "error")
    bdev.inject(params["io_type"], injection_from_params(params))
    return True


@method("bdev_error_resume_pending", Schema((Param("name", str, required=True),)),
        in_config=False)
async def bdev_error_resume_pending(target: Target, params: dict[str, Any]) -> int:
    """Send the I/Os held by a `pending` injection on to the base; returns how many."""
    bdev: ErrorBdev = _typed(target, params["name"], ErrorBdev, "error")
    n = 0
    if target.started:
        n += sum(await target.reactors.broadcast(bdev.resume_pending))
    return n + bdev.resume_pending(None)


# ---- raid ---------------------------------------------------------------------

RAID_CATEGORIES = ("all", "online", "degraded", "configuring", "offline")


@method("bdev_raid_get_bdevs", Schema((
    Param("category", str, default="all", choices=RAID_CATEGORIES),
)), in_config=False)
def bdev_raid_get_bdevs(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Raid bdevs by state. `degraded` (ours) picks online arrays with a failed leg;
    `configuring` is always empty: arrays are complete when created (no superblock)."""
    cat = params["category"]
    out = []
    for b in target.bdevs:
        if not isinstance(b, Raid1Bdev):
            continue
        if cat == "all" or cat == b.state or (cat == "degraded" and b.degraded):
            out.append(b.raid_info())
    return out


@method("bdev_raid_delete", Schema((
    Param("name", str, required=True),
    Param("clear_sb", bool, default=False, help="accepted; there is no superblock to clear"),
)), in_config=False)
async def bdev_raid_delete(target: Target, params: dict[str, Any]) -> bool:
    """Delete a raid bdev and release its base bdevs (their data is left as it is)."""
    await target.delete_bdev(params["name"], module="raid1")
    return True


# ---- split --------------------------------------------------------------------


@method("bdev_split_delete", Schema((Param("base_bdev", str, required=True),)),
        in_config=False)
async def bdev_split_delete(target: Target, params: dict[str, Any]) -> bool:
    """Delete every part split from a base, releasing the base; all or none."""
    base = target.bdevs.get(params["base_bdev"])
    parts: list[Bdev] = [b for b in target.bdevs
                         if isinstance(b, SplitPart) and b.group.link.base is base]
    if not parts:
        raise NoSuchDevice(f"bdev '{base.name}' is not split")
    busy = [p for p in parts if p.claimed_by is not None]
    if busy:
        raise Busy(f"split part '{busy[0].name}' is in use by {busy[0].claimed_by}; "
                   "remove that first")
    for p in parts:
        await target.delete_bdev(p.name)
    return True
