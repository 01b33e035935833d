"""Logical volume methods with SPDK's names, parameters and result shapes, so SPDK's
`rpc.py` drives them unmodified.

None of them may appear in a config file: stores and volumes live on their base bdev and
come back when it is created (examine), as in SPDK, whose save_config has no lvol lines
either. Sizes are MiB (`size_in_mib`), rounded up to whole clusters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import AlreadyExists, Busy
from ..params import Param, Schema, non_empty, positive
from ..rpc import method
from .format import CLEAR_METHODS, DEFAULT_CLUSTER_SIZE
from .module import (
    add_volume_bdev,
    create_store,
    delete_store,
    describe_store,
    describe_volume,
    stores_of,
    volume_bdev,
)
from .store import LvolStore, check_name

if TYPE_CHECKING:
    from ..app import Target

MIB = 1024 * 1024
LVOL_CLEAR_METHODS = ("default", *CLEAR_METHODS)


def _name_free(target: Target, store: LvolStore, name: str) -> None:
    """A new volume's `<lvs>/<name>` alias must not name a bdev already."""
    alias = f"{store.name}/{name}"
    if target.bdevs.find(alias) is not None:
        raise AlreadyExists(f"bdev '{alias}' already exists")


def _cluster_size(value: int) -> str | None:
    if value < 4096 or value > (1 << 30) or value & (value - 1):
        return "must be a power of two between 4096 and 1 GiB"
    return None


@method("bdev_lvol_create_lvstore", Schema((
    Param("bdev_name", str, required=True, check=non_empty),
    Param("lvs_name", str, required=True, check=non_empty),
    Param("cluster_sz", int, default=DEFAULT_CLUSTER_SIZE, check=_cluster_size,
          help="bytes per cluster, the unit of allocation (default 4 MiB)"),
    Param("clear_method", str, default="unmap", choices=CLEAR_METHODS,
          help="what is done to the data region at create: unmap (when the base can "
               "deallocate), write_zeroes or none; new clusters are zeroed on allocation "
               "whatever this is"),
    Param("num_md_pages_per_cluster_ratio", int, check=positive,
          help="accepted for SPDK's clients; the metadata here is sized for the worst case"),
    Param("md_page_size", int, check=positive,
          help="accepted for SPDK's clients; metadata is written in base blocks here"),
    Param("max_growable_size_mib", int, check=positive,
          help="the most the store may grow to (bdev_lvol_grow_lvstore), in MiB; the "
               "metadata region before the data is sized for it now (12 bytes per "
               "cluster, twice) and cannot grow later. Default: four times the base"),
)), in_config=False)
async def bdev_lvol_create_lvstore(target: Target, params: dict[str, Any]) -> str:
    """Create a logical volume store on a base bdev (claimed from then on); returns its UUID."""
    most = params["max_growable_size_mib"]
    store = await create_store(target, params["bdev_name"], params["lvs_name"],
                               params["cluster_sz"], params["clear_method"],
                               None if most is None else most * MIB)
    return store.uuid


_WHICH_STORE = (
    Param("uuid", str, check=non_empty, help="the store's UUID (or lvs_name)"),
    Param("lvs_name", str, check=non_empty, help="the store's name (or uuid)"),
)


@method("bdev_lvol_get_lvstores", Schema(_WHICH_STORE), in_config=False)
def bdev_lvol_get_lvstores(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Stores with their geometry and free clusters (all, or one by uuid or lvs_name)."""
    stores = stores_of(target)
    if params["uuid"] is None and params["lvs_name"] is None:
        return [describe_store(s) for s in stores]
    return [describe_store(stores.find(params["uuid"], params["lvs_name"]))]


@method("bdev_lvol_delete_lvstore", Schema(_WHICH_STORE), in_config=False)
async def bdev_lvol_delete_lvstore(target: Target, params: dict[str, Any]) -> bool:
    """Delete a store and all its volumes (refused while one is in use) and release the base."""
    await delete_store(target, stores_of(target).find(params["uuid"], params["lvs_name"]))
    return True


@method("bdev_lvol_grow_lvstore", Schema(_WHICH_STORE), in_config=False)
async def bdev_lvol_grow_lvstore(target: Target, params: dict[str, Any]) -> bool:
    """Take in the space a grown base bdev now has: grow the file or device, then
    `bdev_uring_rescan` (or `bdev_aio_rescan`) it live, or recreate it. Refused (-28,
    nothing changed) when the base holds more than `max_growable_size`, which the
    metadata region was sized for at create (four times the base unless
    `max_growable_size_mib` said otherwise)."""
    await stores_of(target).find(params["uuid"], params["lvs_name"]).grow()
    return True


@method("bdev_lvol_rename_lvstore", Schema((
    Param("old_name", str, required=True, check=non_empty),
    Param("new_name", str, required=True, check=non_empty),
)), in_config=False)
async def bdev_lvol_rename_lvstore(target: Target, params: dict[str, Any]) -> bool:
    """Rename a store; its volumes' aliases follow (`<new>/<lvol>`)."""
    stores = stores_of(target)
    store = stores.find(None, params["old_name"])
    new = params["new_name"]
    if new == store.name:
        return True
    check_name("lvstore", new)
    if stores.by_name(new) is not None:
        raise AlreadyExists(f"lvstore '{new}' already exists")
    await store.rename(new)
    for b in target.bdevs:
        if getattr(b, "store", None) is store:
            b.aliases = [f"{new}/{b.record.name}"]  # type: ignore[attr-defined]
    return True


@method("bdev_lvol_create", Schema((
    Param("lvol_name", str, required=True, check=non_empty),
    Param("size_in_mib", int, required=True, check=positive),
    Param("thin_provision", bool, default=False,
          help="allocate clusters on first write instead of all now"),
    Param("uuid", str, check=non_empty, help="the store's UUID (or lvs_name)"),
    Param("lvs_name", str, check=non_empty, help="the store's name (or uuid)"),
    Param("clear_method", str, default="default", choices=LVOL_CLEAR_METHODS,
          help="what is done to clusters this volume frees (delete, shrink, deallocate): "
               "unmap (the default), write_zeroes or none"),
)), in_config=False)
async def bdev_lvol_create(target: Target, params: dict[str, Any]) -> str:
    """Create a volume in a store; returns its UUID, which is also its bdev name."""
    store = stores_of(target).find(params["uuid"], params["lvs_name"])
    clear = params["clear_method"]
    _name_free(target, store, params["lvol_name"])
    rec = await store.create_volume(params["lvol_name"], params["size_in_mib"] * MIB,
                                    params["thin_provision"],
                                    "unmap" if clear == "default" else clear)
    await add_volume_bdev(target, store, rec)
    return rec.uuid


@method("bdev_lvol_get_lvols", Schema((
    Param("lvs_uuid", str, check=non_empty),
    Param("lvs_name", str, check=non_empty),
)), in_config=False)
def bdev_lvol_get_lvols(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes (all, or one store's by lvs_uuid or lvs_name)."""
    stores = stores_of(target)
    if params["lvs_uuid"] is None and params["lvs_name"] is None:
        chosen = list(stores)
    else:
        chosen = [stores.find(params["lvs_uuid"], params["lvs_name"])]
    return [describe_volume(s, v) for s in chosen for v in s.md.volumes.values()]


_NAME = Schema((Param("name", str, required=True, check=non_empty,
                      help="the volume's UUID or <lvs>/<lvol> alias"),))


@method("bdev_lvol_resize", Schema((
    *_NAME.params,
    Param("size_in_mib", int, required=True, check=positive),
)), in_config=False)
async def bdev_lvol_resize(target: Target, params: dict[str, Any]) -> bool:
    """Grow or shrink a volume, live; hosts get a Namespace Attribute Changed event."""
    bdev = volume_bdev(target, params["name"])
    store = bdev.store
    rec = await store.resize_volume(bdev.uuid, params["size_in_mib"] * MIB)
    blocks = rec.num_clusters * store.blocks_per_cluster
    if blocks != bdev.num_blocks:
        bdev.num_blocks = blocks
        target.subsystems.bdev_resized(bdev)
    return True


@method("bdev_lvol_rename", Schema((
    Param("old_name", str, required=True, check=non_empty,
          help="the volume's UUID or <lvs>/<lvol> alias"),
    Param("new_name", str, required=True, check=non_empty, help="the new lvol name"),
)), in_config=False)
async def bdev_lvol_rename(target: Target, params: dict[str, Any]) -> bool:
    """Rename a volume (its UUID, and so its bdev name, stays)."""
    bdev = volume_bdev(target, params["old_name"])
    new = params["new_name"]
    check_name("lvol", new)
    alias = f"{bdev.store.name}/{new}"
    other = target.bdevs.find(alias)
    if other is not None and other is not bdev:
        raise AlreadyExists(f"bdev '{alias}' already exists")
    await bdev.store.set_volume(bdev.uuid, name=new)
    bdev.aliases = [alias]
    return True


@method("bdev_lvol_snapshot", Schema((
    Param("lvol_name", str, required=True, check=non_empty,
          help="the volume's UUID or <lvs>/<lvol> alias"),
    Param("snapshot_name", str, required=True, check=non_empty),
)), in_config=False)
async def bdev_lvol_snapshot(target: Target, params: dict[str, Any]) -> str:
    """Take a read-only, point-in-time snapshot of a volume, live; returns its UUID. The
    volume becomes a thin clone of it (its first write to each cluster copies it)."""
    bdev = volume_bdev(target, params["lvol_name"])
    store = bdev.store
    _name_free(target, store, params["snapshot_name"])
    rec = await store.snapshot_volume(bdev.uuid, params["snapshot_name"])
    await add_volume_bdev(target, store, rec)
    return rec.uuid


@method("bdev_lvol_clone", Schema((
    Param("snapshot_name", str, required=True, check=non_empty,
          help="the snapshot's UUID or <lvs>/<lvol> alias"),
    Param("clone_name", str, required=True, check=non_empty),
)), in_config=False)
async def bdev_lvol_clone(target: Target, params: dict[str, Any]) -> str:
    """Create a writable thin clone of a snapshot; returns its UUID."""
    bdev = volume_bdev(target, params["snapshot_name"])
    store = bdev.store
    _name_free(target, store, params["clone_name"])
    rec = await store.clone_volume(bdev.uuid, params["clone_name"])
    await add_volume_bdev(target, store, rec)
    return rec.uuid


@method("bdev_lvol_inflate", _NAME, in_config=False)
async def bdev_lvol_inflate(target: Target, params: dict[str, Any]) -> bool:
    """Give a volume a cluster of its own for every cluster (copies of what it reads
    through its parents, or zeroes): it ends thick and independent. Live: the volume
    stays in use, clusters are copied a batch at a time."""
    bdev = volume_bdev(target, params["name"])
    await bdev.store.detach(bdev.uuid, inflate=True)
    return True


@method("bdev_lvol_decouple_parent", _NAME, in_config=False)
async def bdev_lvol_decouple_parent(target: Target, params: dict[str, Any]) -> bool:
    """Copy into a clone the clusters its parent snapshot owns; the parent's parent
    becomes its parent, so the snapshot may then be deleted. Live, like inflate."""
    bdev = volume_bdev(target, params["name"])
    await bdev.store.detach(bdev.uuid, inflate=False)
    return True


@method("bdev_lvol_set_read_only", _NAME, in_config=False)
async def bdev_lvol_set_read_only(target: Target, params: dict[str, Any]) -> bool:
    """Make a volume read-only, durably: writes then fail with Namespace Write Protected."""
    bdev = volume_bdev(target, params["name"])
    await bdev.store.set_volume(bdev.uuid, read_only=True)
    return True


@method("bdev_lvol_delete", _NAME, in_config=False)
async def bdev_lvol_delete(target: Target, params: dict[str, Any]) -> bool:
    """Delete a volume and free its clusters (cleared by its clear method); refused while
    it is exported or stacked on."""
    bdev = volume_bdev(target, params["name"])
    if bdev.claimed_by is not None:
        raise Busy(f"lvol '{bdev.aliases[0]}' is in use by {bdev.claimed_by}; "
                   "remove that first")
    store = bdev.store
    store.refuse_if_cloned(bdev.uuid)  # (again, under the store's turnstile, on delete)
    await target.delete_bdev(bdev.name)  # channels closed: no I/O is left in flight
    try:
        await store.delete_volume(bdev.uuid)
    except BaseException:
        bdev.removed = False
        target.bdevs.add(bdev)  # the metadata still has it: so does the registry
        raise
    return True
