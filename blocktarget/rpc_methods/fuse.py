"""FUSE exports of local bdevs: ``fuse_export_start`` / ``fuse_export_stop`` / ``fuse_export_get``.

A mount is an operator action on this machine, like mounting a filesystem, so these
calls are not replayed from a config file and save_config does not write them. The
bdev is not claimed (as SPDK's ublk and nbd exports do not): a namespace may export the
same bdev at the same time, with the same caveats as two hosts sharing a namespace.
Exports still mounted when the process exits are unmounted by an atexit hook, after
the reactors have stopped (their I/O then fails with EIO rather than hanging).
"""

from __future__ import annotations

import asyncio
import atexit
import os
from typing import TYPE_CHECKING, Any

from ..errors import AlreadyExists, NoSuchDevice, RpcError
from ..fuse.export import LocalExport
from ..fuse.mount import FuseUnavailable
from ..params import Param, Schema, non_empty
from ..paths import check_path
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target

_EXPORTS: dict[str, LocalExport] = {}


def _stop_all() -> None:
    for mp in list(_EXPORTS):
        exp = _EXPORTS.pop(mp)
        try:
            exp.stop(timeout=5.0)
        except Exception:  # noqa: BLE001,S110 - best effort at exit
            pass


atexit.register(_stop_all)


@method(
    "fuse_export_start",
    Schema((
        Param("bdev_name", str, required=True, check=non_empty),
        Param("mountpoint", str, required=True, check=non_empty,
              help="an existing empty directory; the file appears as MOUNTPOINT/<bdev_name>"),
        Param("allow_other", bool, default=False,
              help="let other users reach the mount (file modes still apply)"),
    )),
    in_config=False,
)
async def fuse_export_start(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """Serve a local bdev as a file through FUSE (I/O goes through a reactor's channel)."""
    bdev = target.bdevs.get(params["bdev_name"])
    # a mount hides whatever lies below it: only inside the allowed directories
    check_path(target, params["mountpoint"], "FUSE mountpoint")
    mp = os.path.abspath(params["mountpoint"])
    if mp in _EXPORTS:
        raise AlreadyExists(f"{mp} already serves bdev '{_EXPORTS[mp].bdev.name}'")
    reactor = min(target.reactors, key=lambda r: (target.reactors.load(r), r.index))
    exp = LocalExport(bdev, reactor, mp, allow_other=params["allow_other"])
    _EXPORTS[mp] = exp
    try:
        await asyncio.to_thread(exp.start)
    except FuseUnavailable as exc:
        del _EXPORTS[mp]
        raise RpcError(str(exc), -19) from None  # -ENODEV, as SPDK's ublk for no driver
    except BaseException:
        del _EXPORTS[mp]
        raise
    return exp.describe()


@method(
    "fuse_export_stop",
    Schema((Param("mountpoint", str, required=True, check=non_empty),)),
    in_config=False,
)
async def fuse_export_stop(target: Target, params: dict[str, Any]) -> bool:
    """Unmount, finish requests in flight, then Flush the bdev."""
    mp = os.path.abspath(params["mountpoint"])
    exp = _EXPORTS.pop(mp, None)
    if exp is None:
        raise NoSuchDevice(f"no FUSE export at {mp}")
    await asyncio.to_thread(exp.stop)
    return True


@method("fuse_export_get", in_config=False)
def fuse_export_get(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every FUSE export of this process with its request and error counts."""
    return [e.describe() for e in _EXPORTS.values()]
