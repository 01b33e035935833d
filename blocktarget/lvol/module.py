"""The stores of a target and their volumes as bdevs: create, find again, delete.

A store holds one claim on its base bdev (owner ``lvstore``), so the base can be neither
exported nor deleted underneath it, and one control-plane channel to it. Stores are
found again by *examine*: every bdev the target registers is probed for a super block
(bdev.py's examine hook), so after a restart the config only needs the base bdev; the
stores and volumes are not written to save_config (as in SPDK).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import TYPE_CHECKING, Any

from ..bdev import Bdev, ChannelStats, IOType, register_examiner
from ..bdevs._stack import BaseLink
from ..errors import AlreadyExists, Busy, InvalidParams, NoSuchDevice
from . import baseio
from .format import FormatError, VolumeRecord
from .store import LvolStore, StoreError, erase, format_store, probe
from .volume import LVOL_IO_TYPES, LvolBdev

if TYPE_CHECKING:
    from ..app import Target

log = logging.getLogger("blocktarget.lvol")

CLAIM = "lvstore"
EXAMINE_TIMEOUT_S = 10.0  # a base that does not answer a read in this long is not examined


class Stores:
    """A target's open stores, by UUID."""

    def __init__(self) -> None:
        self.by_uuid: dict[str, LvolStore] = {}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.by_uuid.values()))

    def by_name(self, name: str) -> LvolStore | None:
        return next((s for s in self.by_uuid.values() if s.name == name), None)

    def find(self, uuid: str | None, lvs_name: str | None) -> LvolStore:
        """Exactly one of uuid / lvs_name, as SPDK requires."""
        if (uuid is None) == (lvs_name is None):
            raise InvalidParams("give exactly one of 'uuid' and 'lvs_name'")
        s = self.by_uuid.get(uuid) if uuid is not None else self.by_name(str(lvs_name))
        if s is None:
            raise NoSuchDevice(f"lvstore '{uuid or lvs_name}' does not exist")
        return s


def stores_of(target: Target) -> Stores:
    """The target's stores (kept on the target so each target in a process has its own)."""
    stores = target.__dict__.get("lvstores")
    if stores is None:
        stores = target.__dict__["lvstores"] = Stores()
    return stores


def volume_bdev(target: Target, name: str) -> LvolBdev:
    """An lvol by bdev name, UUID or `<lvs>/<lvol>` alias."""
    b = target.bdevs.find(name)
    if not isinstance(b, LvolBdev):
        raise NoSuchDevice(f"lvol '{name}' does not exist")
    return b


def _detach(link: BaseLink) -> None:
    link.put_channel(None)
    link.release()


def make_bdev(store: LvolStore, rec: VolumeRecord) -> LvolBdev:
    base = store.base
    return LvolBdev(
        store=store,
        name=rec.uuid,
        aliases=[f"{store.name}/{rec.name}"],
        uuid=rec.uuid,
        block_size=store.block_size,
        num_blocks=rec.num_clusters * store.blocks_per_cluster,
        product_name="Logical Volume",
        module="lvol",
        write_cache=base.write_cache,
        io_types=LVOL_IO_TYPES if IOType.FLUSH in base.io_types
        else LVOL_IO_TYPES - {IOType.FLUSH},
        create_method="bdev_lvol_create",
    )


async def create_store(target: Target, bdev_name: str, lvs_name: str, cluster_size: int,
                       clear_method: str, max_bytes: int | None = None) -> LvolStore:
    stores = stores_of(target)
    if stores.by_name(lvs_name) is not None:
        raise AlreadyExists(f"lvstore '{lvs_name}' already exists")
    base = target.bdevs.get(bdev_name)
    if IOType.WRITE not in base.io_types or IOType.READ not in base.io_types:
        raise InvalidParams(f"bdev '{base.name}' cannot hold an lvstore: it does not "
                            "both read and write")
    if base.claimed_by is not None:  # exported, stacked on, or holding a store already
        raise Busy(f"bdev '{base.name}' is already claimed by {base.claimed_by}")
    link = BaseLink(base, CLAIM)
    ch = link.get_channel(None)
    try:
        store = await format_store(base, ch, lvs_name, cluster_size, clear_method,
                                   max_bytes)
    except BaseException:
        link.put_channel(None)
        link.release()
        raise
    store.link = link
    store.cp_channel = ch
    stores.by_uuid[store.uuid] = store
    log.info("lvstore %s (%s) created on %s: %d clusters of %d bytes", lvs_name, store.uuid,
             base.name, store.total_clusters, cluster_size)
    return store


async def delete_store(target: Target, store: LvolStore) -> None:
    """Delete every volume and the store; refused while any volume is in use."""
    bdevs = [b for b in target.bdevs if isinstance(b, LvolBdev) and b.store is store]
    busy = [b for b in bdevs if b.claimed_by is not None]
    if busy:
        raise Busy(f"lvol '{busy[0].aliases[0]}' is in use by {busy[0].claimed_by}; "
                   "remove that first")
    async with store.turn.held():
        ch = store.cp_channel
        assert ch is not None
        st = await erase(ch)
        if st:
            raise StoreError(f"lvstore '{store.name}': erasing the super block failed "
                             f"(NVMe status {st:#x})")
        for b in bdevs:
            await target.delete_bdev(b.name)
        for rec in store.md.volumes.values():
            await baseio.wait(lambda d, r=rec: baseio.clear(
                ch, r.clear_method, store.extents(list(r.map.values())), d))
    stores_of(target).by_uuid.pop(store.uuid, None)
    assert isinstance(store.link, BaseLink)
    _detach(store.link)


async def add_volume_bdev(target: Target, store: LvolStore, rec: VolumeRecord) -> LvolBdev:
    bdev = make_bdev(store, rec)
    target.bdevs.add(bdev)
    return bdev


async def examine(target: Target, base: Bdev) -> None:
    """Open the store on a newly registered bdev, if it holds one, with its volumes.
    Nothing here may fail the bdev's creation: problems are logged."""
    if base.claimed_by is not None or IOType.READ not in base.io_types:
        return
    quiet = _Unaccounted(base)
    link = BaseLink(base, CLAIM)
    ch = link.get_channel(None)
    store: LvolStore | None = None
    try:
        store = await asyncio.wait_for(probe(base, ch), EXAMINE_TIMEOUT_S)
    except TimeoutError:  # (before OSError, of which it is a subclass)
        log.error("bdev %s: no answer to the lvstore probe's reads within %s s: any store "
                  "on it is not opened", base.name, EXAMINE_TIMEOUT_S)
    except (FormatError, OSError) as e:
        log.error("bdev %s: lvstore found but not opened: %s", base.name, e)
    except Exception:
        log.exception("bdev %s: examining it for an lvstore failed", base.name)
    stores = stores_of(target)
    if store is not None and (store.uuid in stores.by_uuid
                              or stores.by_name(store.name) is not None):
        log.error("bdev %s: lvstore %s (%s) not opened: a store with that name or UUID is "
                  "already open", base.name, store.name, store.uuid)
        store = None
    if store is None:
        link.put_channel(None)
        link.release()
        quiet.restore()
        return
    quiet.restore()
    store.link = link
    store.cp_channel = ch
    stores.by_uuid[store.uuid] = store
    for rec in store.md.volumes.values():
        try:
            await add_volume_bdev(target, store, rec)
        except AlreadyExists as e:
            log.error("lvstore %s: lvol %s not brought up: %s", store.name, rec.name, e)
    log.info("lvstore %s (%s) found on %s: %d lvols, %d of %d clusters free", store.name,
             store.uuid, base.name, len(store.md.volumes), store.free_clusters(),
             store.total_clusters)


class _Unaccounted:
    """Examine's reads are the target's, not a consumer's: the statistics of the bdev and
    of every bdev under it (iostat, metrics) are put back as they were before it. (The
    control plane is one thread and examine runs as the bdev is created, so no other
    I/O is counted on those reactor-less channels meanwhile.)"""

    def __init__(self, bdev: Bdev) -> None:
        self.saved = []
        todo = [bdev]
        while todo:
            b = todo.pop()
            ch = b.channels.get(-1)
            self.saved.append((b, copy.deepcopy(b.retired),
                               None if ch is None else copy.deepcopy(ch.stats)))
            todo.extend(link.base for link in getattr(b, "links", ()))

    def restore(self) -> None:
        for b, retired, stats in self.saved:
            b.retired = retired
            ch = b.channels.get(-1)
            if ch is not None:
                ch.stats = stats if stats is not None else ChannelStats()


def describe_store(store: LvolStore) -> dict[str, Any]:
    return {
        "uuid": store.uuid,
        "name": store.name,
        "base_bdev": store.base.name,
        "total_data_clusters": store.total_clusters,
        "free_clusters": store.free_clusters(),
        "block_size": store.block_size,
        "cluster_size": store.cluster_size,
        "max_growable_size": store.sb.max_clusters * store.cluster_size,
    }


def describe_volume(store: LvolStore, rec: VolumeRecord) -> dict[str, Any]:
    return {
        "alias": f"{store.name}/{rec.name}",
        "uuid": rec.uuid,
        "name": rec.name,
        "is_thin_provisioned": rec.thin,
        "is_snapshot": rec.snapshot,
        "is_clone": rec.parent is not None,
        "is_esnap_clone": False,
        "is_degraded": False,
        "num_allocated_clusters": len(rec.map),
        "lvs": {"name": store.name, "uuid": store.uuid},
    }


register_examiner(examine)
