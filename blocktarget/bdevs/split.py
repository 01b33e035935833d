"""split bdev: one base bdev cut into N equal parts, `<base>p0` .. `<base>p<N-1>`.

Part i is blocks [i*size, (i+1)*size) of the base; its I/O is forwarded with that offset,
which is all a split does. Without `split_size_mb` the base is divided evenly and the
remainder (less than N blocks) is left unused, as SPDK does.

The parts share one claim on the base and one base channel per reactor; the claim is
released when the last part is gone, so deleting one part (bdev_delete) leaves the rest
working, and bdev_split_delete removes them all. A part's UUID is derived from the base's
and its index, so a restart from save_config gives hosts the same namespace IDs.
save_config writes the one bdev_split_create call that made the parts (through the
first part still present).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from ..bdev import BdevIO, BdevModule, LaneTarget, lane_target_of, register_module
from ..errors import InvalidParams
from ..params import Param, Schema, non_empty, positive
from ._stack import BaseLink, StackedBdev, StackedChannel, inherited

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor


class SplitChannel(StackedChannel):
    bdev: SplitPart

    def _submit(self, io: BdevIO) -> None:
        self.forward(io, self.base_channels[0], self.bdev.offset_blocks)

    def lane_target(self) -> LaneTarget | None:
        base = lane_target_of(self.base_channels[0])
        if base is None or (base.lvol is not None and self.bdev.offset_blocks):
            return None  # (a part of a volume: the remap would have to precede its map)
        return base.under(self, self.bdev.offset_blocks * self.bdev.block_size)


class SplitGroup:
    """The parts made by one bdev_split_create: their shared claim on the base."""

    def __init__(self, link: BaseLink, split_count: int, split_size_mb: int | None) -> None:
        self.link = link
        self.split_count = split_count
        self.split_size_mb = split_size_mb
        self.parts: list[SplitPart] = []
        self.live = 0

    def part_gone(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.link.release()


class SplitPart(StackedBdev):
    def __init__(self, *, group: SplitGroup, index: int, offset_blocks: int, **kw: Any) -> None:
        super().__init__(links=[group.link], **kw)
        self.group = group
        self.index = index
        self.offset_blocks = offset_blocks
        group.parts.append(self)
        group.live += 1

    def create_channel(self, reactor: Reactor | None) -> SplitChannel:
        return SplitChannel(self, reactor)

    def destruct(self) -> None:
        self.group.part_gone()  # the claim is the group's, not this part's

    def driver_specific(self) -> dict[str, Any]:
        return {"split": {"base_bdev": self.group.link.base.name,
                          "offset_blocks": self.offset_blocks}}

    def config_entry(self) -> dict[str, Any] | None:
        first = next((p for p in self.group.parts if not p.removed), None)
        if first is not self:
            return None
        params: dict[str, Any] = {"base_bdev": self.group.link.base.name,
                                  "split_count": self.group.split_count}
        if self.group.split_size_mb:
            params["split_size_mb"] = self.group.split_size_mb
        return {"method": "bdev_split_create", "params": params}


SCHEMA = Schema((
    Param("base_bdev", str, required=True, check=non_empty),
    Param("split_count", int, required=True, check=positive),
    Param("split_size_mb", int, check=lambda v: None if v >= 0 else "must not be negative"),
))


def create(params: dict[str, Any], target: Target) -> list[SplitPart]:
    base = target.bdevs.get(params["base_bdev"])
    count, size_mb = params["split_count"], params.get("split_size_mb") or None
    if size_mb:
        size_bytes = size_mb * 1024 * 1024
        if size_bytes % base.block_size:
            raise InvalidParams(f"split_size_mb {size_mb} is not a multiple of the "
                                f"block size {base.block_size}")
        part_blocks = size_bytes // base.block_size
        if part_blocks * count > base.num_blocks:
            raise InvalidParams(
                f"{count} parts of {size_mb} MiB do not fit in '{base.name}' "
                f"({base.size_bytes // (1024 * 1024)} MiB)")
    else:
        part_blocks = base.num_blocks // count
        if part_blocks == 0:
            raise InvalidParams(f"'{base.name}' has {base.num_blocks} blocks, fewer than "
                                f"split_count {count}")
    names = [f"{base.name}p{i}" for i in range(count)]
    taken = [n for n in names if target.bdevs.find(n) is not None]
    if taken:
        from ..errors import AlreadyExists

        raise AlreadyExists(f"bdev '{taken[0]}' already exists")
    group = SplitGroup(BaseLink(base, f"split {base.name}"), count, size_mb)
    base_uuid = uuidlib.UUID(base.uuid)
    return [
        SplitPart(
            group=group,
            index=i,
            offset_blocks=i * part_blocks,
            name=name,
            num_blocks=part_blocks,
            uuid=str(uuidlib.uuid5(base_uuid, f"split{i}")),
            product_name="Split Disk",
            module="split",
            **inherited([base]),
            create_method="bdev_split_create",
        )
        for i, name in enumerate(names)
    ]


MODULE = register_module(BdevModule(
    name="split",
    create=create,
    schema=SCHEMA,
    create_method="bdev_split_create",
    delete_method=None,  # bdev_split_delete takes the base's name: rpc_methods/bdev_virtual.py
    description="cuts a base bdev into equal parts",
    needs_target=True,
))
