"""pmem pool methods with SPDK's names and parameters (bdev_pmem_create/_delete come from
the bdev module itself).

Creating and deleting a pool file is an operator action on storage, like mkfs: it is not
part of a target's state, so these methods are not allowed in a config file and
save_config never writes them; the bdev that opens the pool is. Work that touches the
whole file (allocation, the consistency check) runs in a worker thread so the control
plane keeps answering.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..bdev import check_block_size
from ..bdevs import pmem
from ..params import Param, Schema, non_empty, positive
from ..paths import check_path
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target


def _lanes(value: int) -> str | None:
    return None if 1 <= value <= pmem.MAX_LANES else f"must be between 1 and {pmem.MAX_LANES}"


def _free_per_lane(value: int) -> str | None:
    if 1 <= value <= pmem.MAX_FREE_PER_LANE:
        return None
    return f"must be between 1 and {pmem.MAX_FREE_PER_LANE}"


@method(
    "bdev_pmem_create_pool",
    Schema((
        Param("pmem_file", str, required=True, check=non_empty),
        Param("num_blocks", int, required=True, check=positive,
              help="usable blocks (the file is slightly larger: metadata and free blocks)"),
        Param("block_size", int, required=True, check=check_block_size),
        Param("lanes", int, check=_lanes,
              help="concurrent writers without contention; default: the number of reactors"),
        Param("free_blocks_per_lane", int, default=pmem.DEFAULT_FREE_PER_LANE,
              check=_free_per_lane, help="blocks one lane writes per metadata round"),
    )),
    aliases=("create_pmem_pool",),
    in_config=False,
)
async def bdev_pmem_create_pool(target: Target, params: dict[str, Any]) -> bool:
    """Create a pool file laid out for block-atomic writes (refuses an existing file)."""
    check_path(target, params["pmem_file"], "pmem pool")
    lanes = params["lanes"] or len(target.reactors)
    await asyncio.to_thread(
        pmem.create_pool_file, params["pmem_file"], params["num_blocks"],
        params["block_size"], lanes, params["free_blocks_per_lane"])
    return True


@method(
    "bdev_pmem_get_pool_info",
    Schema((Param("pmem_file", str, required=True, check=non_empty),)),
    aliases=("pmem_pool_info",),
    in_config=False,
)
async def bdev_pmem_get_pool_info(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Geometry of a pool, after a full consistency check unless a bdev has it open."""
    check_path(target, params["pmem_file"], "pmem pool")
    return [await asyncio.to_thread(pmem.pool_info, params["pmem_file"])]


@method(
    "bdev_pmem_delete_pool",
    Schema((Param("pmem_file", str, required=True, check=non_empty),)),
    aliases=("delete_pmem_pool",),
    in_config=False,
)
def bdev_pmem_delete_pool(target: Target, params: dict[str, Any]) -> bool:
    """Remove a pool file; refused while a bdev uses it or when the file is not a pool."""
    check_path(target, params["pmem_file"], "pmem pool")
    pmem.delete_pool_file(params["pmem_file"])
    return True
