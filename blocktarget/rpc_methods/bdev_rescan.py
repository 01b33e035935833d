"""Live size changes of file and block-device bdevs: SPDK's `bdev_uring_rescan` and
`bdev_aio_rescan` (one uring module serves both names here).

An operator grows the file (truncate) or the device (LVM, a cloud disk) under a running
target and asks for a rescan: the bdev takes the new size at once, hosts of namespaces
on it get a Namespace Attribute Changed event, and a volume store on it can then take
the space in with bdev_lvol_grow_lvstore. A shrink is taken only while nothing uses the
bdev (as SPDK refuses a block-count decrease on an open bdev): a namespace or a store
past the new end would lose blocks it was promised.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

from ..bdev import Bdev
from ..bdevs.uring import UringBdev
from ..errors import Busy, InvalidParams, RpcError
from ..params import Param, Schema, non_empty
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target

log = logging.getLogger("blocktarget.bdev")


def resize_bdev(target: Target, bdev: Bdev, blocks: int) -> None:
    """Give `bdev` its backing store's new size and tell the hosts that see it."""
    old = bdev.num_blocks
    if blocks == old:
        return
    if blocks < 1:
        raise InvalidParams(f"bdev '{bdev.name}' now holds no whole block of "
                            f"{bdev.block_size} bytes; it keeps its {old} blocks")
    if blocks < old and bdev.claimed_by is not None:
        raise Busy(f"bdev '{bdev.name}' shrank from {old} to {blocks} blocks while in use "
                   f"by {bdev.claimed_by}: refused, it keeps its {old} blocks (remove the "
                   "user first, or grow the backing file back)")
    bdev.num_blocks = blocks
    log.info("bdev %s resized from %d to %d blocks of %d bytes", bdev.name, old, blocks,
             bdev.block_size)
    target.subsystems.bdev_resized(bdev)


@method("bdev_uring_rescan", Schema((Param("name", str, required=True, check=non_empty),)),
        aliases=("bdev_aio_rescan",), in_config=False)
async def bdev_uring_rescan(target: Target, params: dict[str, Any]) -> bool:
    """Read a file or block-device bdev's size again after it was grown (or shrunk,
    while unused): hosts see the new size (Namespace Attribute Changed), and a store on
    it can grow (bdev_lvol_grow_lvstore)."""
    bdev = target.bdevs.get(params["name"])
    if not isinstance(bdev, UringBdev):
        raise InvalidParams(f"bdev '{bdev.name}' is a {bdev.module or 'other'} bdev, not a "
                            "file or block device (bdev_uring_create / bdev_aio_create)")
    try:
        blocks = bdev.device_blocks()
    except OSError as exc:
        e = exc.errno or errno.EIO
        raise RpcError(f"cannot read the size of '{bdev.filename}': {os.strerror(e)}",
                       -e) from None
    resize_bdev(target, bdev, blocks)
    return True
