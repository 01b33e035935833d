"""Prometheus metrics, computed at scrape time from the counters reactors already keep.

Nothing here runs on the I/O path: the bdev channels and reactors keep plain integers
that only their own thread writes, and this collector adds them up when Prometheus asks.
Names follow Prometheus conventions: `_total` counters, base units (bytes, seconds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from .bdev import LATENCY_BUCKETS_NS, IOType

if TYPE_CHECKING:
    from aiohttp import web

    from .app import Target

_BUCKET_LABELS = [f"{ns / 1e9:g}" for ns in LATENCY_BUCKETS_NS] + ["+Inf"]
_IO_TYPES = {t: t.name.lower() for t in IOType}


# Families of modules that keep state of their own (lvol stores): each source is called
# with the target at scrape time and yields metric families.
SOURCES: list[Callable[[Any], Iterator[Any]]] = []


class TargetCollector(Collector):
    def __init__(self, target: Target) -> None:
        self.target = target
        self.start_time = time.time()

    def collect(self) -> Iterator[Any]:  # noqa: C901 - one family after another
        t = self.target
        info = InfoMetricFamily("blocktarget", "blocktarget build and process information")
        info.add_metric([], {"version": t.version, "pid": str(os.getpid())})
        yield info
        yield GaugeMetricFamily("blocktarget_start_time_seconds",
                                "Unix time the target started", value=self.start_time)

        # ---- bdevs ----
        ops = CounterMetricFamily("blocktarget_bdev_ops", "Completed bdev I/O operations",
                                  labels=["bdev", "type"])
        errs = CounterMetricFamily("blocktarget_bdev_errors", "Failed bdev I/O operations",
                                   labels=["bdev", "type"])
        rbytes = CounterMetricFamily("blocktarget_bdev_read_bytes", "Bytes read from the bdev",
                                     labels=["bdev"])
        wbytes = CounterMetricFamily("blocktarget_bdev_written_bytes",
                                     "Bytes written to the bdev", labels=["bdev"])
        lat = HistogramMetricFamily("blocktarget_bdev_io_latency_seconds",
                                    "bdev I/O latency from submit to completion",
                                    labels=["bdev", "type"])
        size = GaugeMetricFamily("blocktarget_bdev_size_bytes", "bdev capacity", labels=["bdev"])
        claimed = GaugeMetricFamily("blocktarget_bdev_claimed",
                                    "1 if the bdev is used by a namespace or virtual bdev",
                                    labels=["bdev", "module"])
        qos_limit = GaugeMetricFamily(
            "blocktarget_bdev_qos_limit",
            "Rate limit set by bdev_set_qos_limit (I/Os or MB per second; absent: none)",
            labels=["bdev", "limit"])
        qos_delayed = CounterMetricFamily(
            "blocktarget_bdev_qos_delayed",
            "Reads and writes that waited for the bdev's rate limits", labels=["bdev"])
        for b in t.bdevs:
            if b.qos is not None:
                for name, value in b.qos.limits.describe().items():
                    if value:
                        qos_limit.add_metric([b.name, name], value)
            if b.qos is not None or b.qos_delayed:
                qos_delayed.add_metric([b.name], b.qos_delayed)
            st = b.stats_total()
            size.add_metric([b.name], b.size_bytes)
            claimed.add_metric([b.name, b.module], 1 if b.claimed_by else 0)
            rbytes.add_metric([b.name], st.bytes[IOType.READ])
            wbytes.add_metric([b.name], st.bytes[IOType.WRITE])
            for io_type, name in _IO_TYPES.items():
                n = st.ops[io_type]
                ops.add_metric([b.name, name], n)
                errs.add_metric([b.name, name], st.errors[io_type])
                if io_type in (IOType.READ, IOType.WRITE, IOType.FLUSH, IOType.UNMAP,
                               IOType.WRITE_ZEROES):
                    acc = 0
                    buckets = []
                    for label, count in zip(_BUCKET_LABELS, st.latency_buckets[io_type],
                                            strict=True):
                        acc += count
                        buckets.append((label, acc))
                    lat.add_metric([b.name, name], buckets, st.latency_sum_ns[io_type] / 1e9)
        yield from (ops, errs, rbytes, wbytes, lat, size, claimed, qos_limit, qos_delayed)

        # ---- reactors ----
        busy = CounterMetricFamily("blocktarget_reactor_busy_seconds",
                                   "CPU time used by the reactor thread", labels=["reactor", "core"])
        idle = CounterMetricFamily("blocktarget_reactor_idle_seconds",
                                   "Wall time the reactor thread was not on a CPU",
                                   labels=["reactor", "core"])
        msgs = CounterMetricFamily("blocktarget_reactor_messages",
                                   "Messages run on the reactor", labels=["reactor"])
        polls = CounterMetricFamily("blocktarget_reactor_poll_runs",
                                    "Poller loop iterations", labels=["reactor"])
        poll_err = CounterMetricFamily(
            "blocktarget_reactor_poller_errors",
            "Poller calls that raised (the poller is called again after a growing pause; "
            "a rising count is a bug or a failing device, see the log)", labels=["reactor"])
        conns = GaugeMetricFamily("blocktarget_reactor_connections",
                                  "NVMe/TCP connections owned by the reactor", labels=["reactor"])
        opened = CounterMetricFamily("blocktarget_reactor_connections_opened",
                                     "Connections accepted by the reactor", labels=["reactor"])
        lane = CounterMetricFamily("blocktarget_reactor_c_lane_commands",
                                   "NVMe commands executed by the C data plane (reads, writes "
                                   "and flushes it serves)", labels=["reactor"])
        released = CounterMetricFamily(
            "blocktarget_reactor_gil_released_seconds",
            "Reactor time in the C data plane's calls, which run without the GIL",
            labels=["reactor"])
        held = CounterMetricFamily(
            "blocktarget_reactor_gil_held_seconds",
            "Reactor CPU time holding the GIL (Python): the share that serializes "
            "reactors. Sampled on the thread's CPU clock where "
            "blocktarget_reactor_gil_sampled is 1; else all CPU time outside the C data "
            "plane's calls (an upper bound)", labels=["reactor"])
        outside = CounterMetricFamily(
            "blocktarget_reactor_gil_free_other_seconds",
            "Reactor CPU time neither holding the GIL nor in the C data plane's calls: the "
            "event loop's epoll and the kernel's work on the thread outside them (busy "
            "minus released minus held; 0 where the GIL is not sampled)",
            labels=["reactor"])
        sampled = GaugeMetricFamily(
            "blocktarget_reactor_gil_sampled",
            "1 where the reactor's GIL-held time is sampled, 0 where it is the upper bound",
            labels=["reactor"])
        net_pdus = CounterMetricFamily(
            "blocktarget_reactor_c_poller_pdus",
            "PDUs taken by the reactor's C socket poller (sockets of queue pairs in their "
            "steady state, served without a Python call per read)", labels=["reactor"])
        net_idle = CounterMetricFamily(
            "blocktarget_reactor_c_poller_idle_seconds",
            "Of the GIL-released time, the C socket poller's waiting for a socket with "
            "something to do (spinning, as the reactor's poll mode would)",
            labels=["reactor"])
        irq_wakes = CounterMetricFamily(
            "blocktarget_reactor_c_poller_irq_wakes",
            "Wake-ups of the reactor's C socket poller by an NVMe queue's completion "
            "interrupt (MSI-X eventfd), instead of waiting for the device in timed slices",
            labels=["reactor"])
        host_waits = CounterMetricFamily(
            "blocktarget_reactor_c_poller_host_waits",
            "Sleeps of the reactor's C socket poller for the host's next command "
            "(poll.host_wait_us) instead of returning to the event loop; outcome: "
            "caught (a command or a device completion ended it), loop (the event loop's "
            "own work did), timeout",
            labels=["reactor", "outcome"])
        cpu_mode = CounterMetricFamily("blocktarget_reactor_cpu_seconds",
                                       "Reactor thread CPU time by mode",
                                       labels=["reactor", "mode"])
        for r in t.reactors:
            labels = [str(r.index), str(r.core)]
            cpu = r.cpu_ns()
            busy.add_metric(labels, cpu / 1e9)
            idle.add_metric(labels, max(r.wall_ns() - cpu, 0) / 1e9)
            msgs.add_metric([str(r.index)], r.stats.messages)
            polls.add_metric([str(r.index)], r.stats.poll_runs)
            poll_err.add_metric([str(r.index)], r.stats.poller_errors)
            conns.add_metric([str(r.index)], len(r.owned.get("connection", ())))
            opened.add_metric([str(r.index)], r.stats.connections_opened)
            lane.add_metric([str(r.index)], r.stats.c_lane_commands)
            free, held_ns, other_ns, is_sampled = r.gil_split_ns(cpu)
            released.add_metric([str(r.index)], free / 1e9)
            held.add_metric([str(r.index)], held_ns / 1e9)
            outside.add_metric([str(r.index)], other_ns / 1e9)
            sampled.add_metric([str(r.index)], int(is_sampled))
            net_pdus.add_metric([str(r.index)], r.stats.net_pdus)
            net_idle.add_metric([str(r.index)], r.stats.net_idle_ns / 1e9)
            irq_wakes.add_metric([str(r.index)], r.stats.net_irq_wakes)
            st = r.stats
            host_waits.add_metric([str(r.index), "caught"], st.net_host_catches)
            host_waits.add_metric([str(r.index), "loop"], st.net_host_loop_wakes)
            host_waits.add_metric([str(r.index), "timeout"], st.net_host_waits
                                  - st.net_host_catches - st.net_host_loop_wakes)
            user, system = r.cpu_split_ns()
            cpu_mode.add_metric([str(r.index), "user"], user / 1e9)
            cpu_mode.add_metric([str(r.index), "system"], system / 1e9)
        yield from (busy, idle, msgs, polls, poll_err, conns, opened, lane, released, held,
                    outside, sampled, net_pdus, net_idle, irq_wakes, host_waits, cpu_mode)

        # ---- subsystems ----
        subs = GaugeMetricFamily("blocktarget_subsystems", "NVM subsystems configured")
        subs.add_metric([], len(t.subsystems))
        yield subs
        nss = GaugeMetricFamily("blocktarget_subsystem_namespaces", "Namespaces per subsystem",
                                labels=["nqn"])
        ctrls = GaugeMetricFamily("blocktarget_subsystem_connections",
                                  "Queue-pair connections per subsystem", labels=["nqn"])
        per_sub: dict[str, int] = {}
        if t.tcp is not None:
            for qset in list(t.tcp.qpairs.values()):
                for qp in list(qset):
                    sub = getattr(qp, "subsystem", None)
                    if sub is not None:
                        per_sub[sub.nqn] = per_sub.get(sub.nqn, 0) + 1
        for s in t.subsystems:
            nss.add_metric([s.nqn], len(s.namespaces))
            ctrls.add_metric([s.nqn], per_sub.get(s.nqn, 0))
        yield from (nss, ctrls)
        yield from _limit_families(t)
        for source in SOURCES:
            yield from source(t)
        extra = getattr(t, "extra_metrics", None)
        if extra is not None:
            yield from extra()

        # ---- control plane ----
        rpc = CounterMetricFamily("blocktarget_rpc_requests", "JSON-RPC requests handled")
        rpc.add_metric([], t.dispatcher.calls)
        rpce = CounterMetricFamily("blocktarget_rpc_errors", "JSON-RPC requests that failed")
        rpce.add_metric([], t.dispatcher.errors)
        yield from (rpc, rpce)


def _limit_families(t: Target) -> Iterator[Any]:
    """NVMe/TCP resource limits (tcp_limits.py): open connections against their bound,
    refusals, connections closed by a limit, R2T buffer use against its budget."""
    tcp = t.tcp
    opts = t.transports.get("TCP")
    conns = GaugeMetricFamily("blocktarget_tcp_connections",
                              "Open NVMe/TCP connections (all reactors)")
    limit = GaugeMetricFamily("blocktarget_tcp_connections_limit",
                              "max_connections of the TCP transport (0: unlimited)")
    refused = CounterMetricFamily("blocktarget_tcp_connections_refused",
                                  "Connections closed at accept by a connection limit",
                                  labels=["limit"])
    closed = CounterMetricFamily("blocktarget_tcp_connections_closed_by_limit",
                                 "Connections closed for a stalled PDU, a missing Connect, an "
                                 "unanswered R2T or a queue overflow", labels=["reason"])
    used = GaugeMetricFamily("blocktarget_tcp_r2t_buffer_bytes",
                             "R2T and in-capsule data buffer bytes held", labels=["reactor"])
    budget = GaugeMetricFamily("blocktarget_tcp_r2t_buffer_limit_bytes",
                               "R2T data buffer budget of the reactor", labels=["reactor"])
    waits = CounterMetricFamily("blocktarget_tcp_r2t_buffer_waits",
                                "Writes whose R2T waited for buffers", labels=["reactor"])
    pauses = CounterMetricFamily("blocktarget_tcp_icd_read_pauses",
                                 "Connections not read from because their in-capsule data "
                                 "overran the buffer budget", labels=["reactor"])
    limit.add_metric([], opts.max_connections if opts is not None else 0)
    from .tcp_limits import CLOSE_REASONS

    by_reason = dict.fromkeys(CLOSE_REASONS, 0)  # every reason, from 0
    if tcp is not None:
        conns.add_metric([], tcp.limiter.open)
        refused.add_metric(["total"], tcp.limiter.refused_global)
        refused.add_metric(["per_address"], tcp.limiter.refused_per_address)
        for index, b in sorted(list(tcp.budgets.items())):
            used.add_metric([str(index)], b.used)
            budget.add_metric([str(index)], b.limit)
            waits.add_metric([str(index)], b.waits)
            pauses.add_metric([str(index)], b.read_pauses)
            for reason, n in list(b.closed_by.items()):
                by_reason[reason] = by_reason.get(reason, 0) + n
    else:
        conns.add_metric([], 0)
    for reason, n in sorted(by_reason.items()):
        closed.add_metric([reason], n)
    yield from (conns, limit, refused, closed, used, budget, waits, pauses)
    yield _tls_family(t)


TLS_OUTCOMES = ("established", "plain", "refused", "handshake", "record", "closed",
                "timeout")


def _tls_family(t: Target) -> Any:
    """Connections to secure listeners by TLS outcome (tls_transport.TlsProtocol's kinds):
    a rising "refused" or "handshake" is a host with a wrong or unknown key."""
    fam = CounterMetricFamily(
        "blocktarget_tls_connections",
        "Connections to secure (TLS) listeners by outcome: established, plain (an ICReq "
        "without TLS), refused (unknown PSK identity), handshake (other failure, e.g. a "
        "wrong key), record (a bad record later), closed (mid-handshake), timeout (no "
        "handshake within stall_timeout_sec)",
        labels=["outcome"])
    got = t.tcp.tls_stats() if t.tcp is not None else {}
    for outcome in TLS_OUTCOMES:
        fam.add_metric([outcome], got.get(outcome, 0))
    return fam


def make_registry(target: Target) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TargetCollector(target))
    return registry


def metrics_handler(registry: CollectorRegistry,
                    before: Callable[[], Awaitable[Any]] | None = None,
                    ) -> Callable[[web.Request], Awaitable[Any]]:
    """The /metrics handler; ``before`` is awaited first (the reactors fold the counters
    C keeps for lent connections, nvme/netpoll.py, so a scrape reads them exact)."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        if before is not None:
            await before()
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle
