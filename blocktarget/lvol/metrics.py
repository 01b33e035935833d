"""Prometheus families of the lvol stores: capacity, free space and failed allocations
per store, allocated clusters per volume (read at scrape time, like every metric)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import metrics
from .module import stores_of
from .volume import LvolBdev

if TYPE_CHECKING:
    from ..app import Target


def families(t: Target) -> Iterator[Any]:
    total = GaugeMetricFamily("blocktarget_lvstore_clusters",
                              "Data clusters of a logical volume store", labels=["lvs"])
    free = GaugeMetricFamily("blocktarget_lvstore_free_clusters",
                             "Clusters of a logical volume store no volume holds",
                             labels=["lvs"])
    size = GaugeMetricFamily("blocktarget_lvstore_cluster_size_bytes",
                             "Cluster size of a logical volume store", labels=["lvs"])
    enospc = CounterMetricFamily("blocktarget_lvstore_out_of_space_errors",
                                 "Writes failed with Capacity Exceeded: they needed a new "
                                 "cluster and the store had none free", labels=["lvs"])
    alloc = GaugeMetricFamily("blocktarget_lvol_allocated_clusters",
                              "Clusters allocated to a logical volume", labels=["bdev", "lvs"])
    for s in stores_of(t):
        total.add_metric([s.name], s.total_clusters)
        free.add_metric([s.name], s.free_clusters())
        size.add_metric([s.name], s.cluster_size)
        enospc.add_metric([s.name], s.enospc_errors)
    for b in t.bdevs:
        if isinstance(b, LvolBdev):
            rec = b.store.md.volumes.get(b.uuid)
            if rec is not None:
                alloc.add_metric([b.name, b.store.name], len(rec.map))
    yield from (total, free, size, enospc, alloc)


metrics.SOURCES.append(families)
