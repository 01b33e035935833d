"""`nvmf_get_stats`: SPDK's per-poll-group statistics, one group per reactor.

Why: fault tests (hosts that vanish mid-R2T, connection churn, soak runs) must be able
to prove the target holds nothing for connections that are gone. The numbers come from
the queue pairs themselves, read on their own reactor (a broadcast message), so each
group is a consistent snapshot and nothing is added to the I/O path: commands still
waiting for R2T data (`pending_data_buffer`, and the bytes of their receive buffers),
commands executing (`pending_bdev_io`) and the queue pairs open. After every host has
gone, all of them must read 0 except what other hosts still hold.

SPDK's shape (`tick_rate`, `poll_groups[].name/current_admin_qpairs/current_io_qpairs/
pending_bdev_io/transports[].trtype/pending_data_buffer`) is kept so SPDK tooling reads
it; `pending_data_buffer_bytes`, `pending_requests`, `unconnected_qpairs` and
`c_lane_commands` (commands the C lane executed on this reactor, nvme/fastlane.py) and
`c_pmem_sent` (of those, pmem reads sent from the pool's blocks, csrc/lane.c) are ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..params import Param, Schema
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor


def _group(target: Target, reactor: Reactor) -> dict[str, Any]:
    """Runs on ``reactor``: the connections it owns, counted where they live."""
    reactor.fold_stats()  # (the lent connections' counters C keeps: nvme/netpoll.py)
    tcp = target.tcp
    qps = list(tcp.qpairs.get(reactor.index, ())) if tcp is not None else []
    admin = io = unconnected = requests = waiting = waiting_bytes = 0
    for qp in qps:
        # plain attribute reads: a renamed field must break this loudly, not read 0
        qid = qp.qid
        if qid < 0:
            unconnected += 1
        elif qid == 0:
            admin += 1
        else:
            io += 1
        requests += len(qp.requests)
        waiting += len(qp.r2t_pending)
        waiting_bytes += sum(r.xfer_len for r in qp.r2t_pending.values())
        lane = qp._lane
        c = lane.c if lane is not None else None
        if c is not None:  # the C lane's commands (writes waiting for their data)
            requests += c.inflight
            waiting += c.r2t_waiting
            waiting_bytes += c.r2t_wait_bytes
    return {
        "name": f"nvmf_tgt_poll_group_{reactor.index:03d}",
        "current_admin_qpairs": admin,
        "current_io_qpairs": io,
        "unconnected_qpairs": unconnected,
        "pending_requests": requests,
        "pending_bdev_io": requests - waiting,
        "c_lane_commands": reactor.stats.c_lane_commands,
        "c_pmem_sent": reactor.stats.c_pmem_sent,
        "gil_released_ns": reactor.stats.gil_released_ns,
        # the C socket poller (nvme/netpoll.py): its calls, and sockets lent to it
        "net_polls": reactor.stats.net_polls,
        "net_lends": reactor.stats.net_lends,
        "net_pdus": reactor.stats.net_pdus,
        "net_idle_ns": reactor.stats.net_idle_ns,
        # slices it slept, not spinning, while only NVMe device I/O was outstanding
        "net_device_waits": reactor.stats.net_device_waits,
        # its adaptive busy-poll window (poll.adaptive_window): halved when the host's
        # next command came after the whole window, doubled back when within; the
        # window now (µs)
        "net_window_shrinks": reactor.stats.net_window_shrinks,
        "net_window_grows": reactor.stats.net_window_grows,
        "net_window_us": reactor.stats.net_window_ns // 1000,
        "net_device_wait_ns": reactor.stats.net_device_wait_ns,  # their CPU time
        # wake-ups by an NVMe queue's completion interrupt instead (MSI-X eventfd)
        "net_irq_wakes": reactor.stats.net_irq_wakes,
        # host waits (poll.host_wait_us): begun; ended by the host's command or a
        # device's completion; ended by the event loop's own work (the rest timed out)
        "net_host_waits": reactor.stats.net_host_waits,
        "net_host_catches": reactor.stats.net_host_catches,
        "net_host_loop_wakes": reactor.stats.net_host_loop_wakes,
        "poll_runs": reactor.stats.poll_runs,  # the reactor's Python poll loop's turns
        # the GIL sampler (gilsample.py): samples of the thread's CPU time, those taken
        # with the GIL held, ns of CPU time each stands for (0: no sampler)
        "gil_samples": reactor.gil.samples if reactor.gil is not None else 0,
        "gil_held_samples": reactor.gil.held if reactor.gil is not None else 0,
        "gil_sample_period_ns": reactor.gil.period_ns if reactor.gil is not None else 0,
        "transports": [{"trtype": "TCP", "pending_data_buffer": waiting,
                        "pending_data_buffer_bytes": waiting_bytes}],
    }


@method("nvmf_get_stats", Schema((Param("tgt_name", str),)), in_config=False)
async def nvmf_get_stats(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """Per-reactor queue pairs and outstanding requests (SPDK's poll-group stats)."""
    groups = await target.reactors.broadcast(lambda r: _group(target, r))
    return {"tick_rate": 1_000_000_000, "poll_groups": groups}
