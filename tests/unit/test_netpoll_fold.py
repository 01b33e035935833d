"""The lazy fold of a lent connection's counters (nvme/netpoll.py, fastlane.Lane.fold).

C reports a lent connection to Python only for events Python acts on; the counters
(the lane's commands, the bdev channels' operations, bytes and latency histogram, the
SMART counts, the stall watch's PDUs, the queue's budget share) stay in C until a reader
asks, the poller's timer runs, or the connection is given back or closed. These tests
hold the folded figures to the Python path's (the reference side of net_harness) at each
of those moments, with no poll in between, and show that Python is not called per
connection when nothing needs it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from lane_harness import OPTS, pattern, rd, wire, wr
from net_harness import SockPair
from test_netpoll import SQFLOW_OFF, _uring_layout

from blocktarget.bdev import LATENCY_BUCKETS_NS, IOType
from blocktarget.nvme import admin, netpoll, pdu
from blocktarget.nvme.fastlane import lib
from blocktarget.rpc_methods import nvmf_stats

pytestmark = pytest.mark.skipif(not netpoll.AVAILABLE and os.environ.get("CI") != "true",
                                reason="blocktarget._fastpath is not built (no compiler)")


@pytest.fixture(autouse=True)
def _built() -> None:
    if not netpoll.AVAILABLE:
        pytest.fail("CI=true but blocktarget._fastpath is not built: the C poller is untested")


@pytest.fixture
def no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poller's fold timer out of the way: only readers and give-back fold."""
    monkeypatch.setattr(netpoll, "FOLD_S", 3600.0)


def _mix(n: int, base: int = 10) -> bytes:
    """n reads and n one-block writes of namespace 2, interleaved. No two writes of one
    batch overlap: at io_uring they may complete in any order, so the block would hold
    either's data (the lane and the Python path need not agree)."""
    assert n <= 32
    return b"".join(rd(base + 2 * i, 2, i % 8) + wr(base + 2 * i + 1, 2, 16 + i)
                    for i in range(n))


def _channel_stats(side: Any, name: str) -> tuple[Any, ...]:
    """The bdev's totals as the Python path keeps them (plain reads: no fold)."""
    st = side.bdev(name).stats_total()
    return (list(st.ops), list(st.bytes), [sum(b) for b in st.latency_buckets])


def _name(p: SockPair) -> str:
    return p.fast.layout.namespaces[2]


def test_bounds_shared_with_python() -> None:
    """C's histogram buckets are the Python path's (set from one tuple)."""
    assert [lib.bt_lat_bounds[i] for i in range(len(LATENCY_BUCKETS_NS))] == list(
        LATENCY_BUCKETS_NS)


@pytest.mark.parametrize("backend", ["memory", "uring"])
def test_reader_gets_exact_figures_without_a_poll(backend: str, no_timer: None,
                                                  tmp_path: Path) -> None:
    """I/O served in C leaves Python's counters behind (nothing visited the
    connection); nvmf_get_stats' reader (run on the reactor) folds them, and then
    every figure is the Python path's, exactly, with no poll in between."""
    kw: dict[str, Any] = {}
    if backend == "uring":
        kw = {"layout": _uring_layout(), "workdir": tmp_path, "sqsize": 127,
              "cattr": SQFLOW_OFF}
    p = SockPair(OPTS, **kw)
    synced = []
    real_sync = netpoll.sync

    def counting_sync(qp: Any) -> None:
        synced.append(qp)
        real_sync(qp)

    netpoll.sync = counting_sync  # type: ignore[assignment]
    try:
        assert p.fast.io._net is not None
        p.feed(_mix(24))
        qp, lane, r = p.fast.io, p.fast.io._lane, p.fast.reactor
        assert qp._net is not None and lane.executed == 48
        # Python was not called for the connection: nothing needed it
        assert synced == []
        # ... so its counters lag (they are C's until someone asks)
        assert r.stats.c_lane_commands < 48
        name = _name(p)
        ref_ops = list(p.ref.bdev(name).stats_total().ops)
        assert _channel_stats(p.fast, name)[0] != ref_ops
        # the budget is exact anyway (added after every C call, one sum for all)
        assert qp.budget.used == p.ref.io.budget.used
        group = nvmf_stats._group(p.fast.target, r)  # the reader, on the reactor
        assert group["c_lane_commands"] == r.stats.c_lane_commands == 48
        ops, nbytes, nbuckets = _channel_stats(p.fast, name)
        assert ops == ref_ops
        assert nbytes == list(p.ref.bdev(name).stats_total().bytes)
        assert nbuckets == ops  # every command in one bucket, none smeared or lost
        assert ops[IOType.READ] == ops[IOType.WRITE] == 24
        k, rk = qp.counters, p.ref.io.counters
        assert (k.read_cmds, k.write_cmds, k.read_blocks_bytes, k.write_bytes) == (
            rk.read_cmds, rk.write_cmds, rk.read_blocks_bytes, rk.write_bytes)
        assert qp.rx_pdus - p.fast.base_pdus == p.ref.io.rx_pdus - p.ref.base_pdus
        # SMART as the host reads it on the admin queue (same reactor: folded there)
        p.feed(_mix(3, base=200))
        assert admin._smart(p.fast.admin.ctrl)[32:112] == admin._smart(p.ref.admin.ctrl)[32:112]
        p.check()  # (its state() is a reader too: the whole state, compared)
    finally:
        netpoll.sync = real_sync  # type: ignore[assignment]
        p.close()


def test_timer_folds_when_nobody_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures read without asking (plain attribute reads from another thread, as the
    old metrics path did) are at most FOLD_S behind: the poller folds on a timer."""
    monkeypatch.setattr(netpoll, "FOLD_S", 0.05)
    p = SockPair(OPTS)
    try:
        p.feed(_mix(10))
        r = p.fast.reactor
        name = _name(p)
        p.fast.loop.run_until_complete(asyncio.sleep(0.2))  # (no I/O, no reader)
        assert r.stats.c_lane_commands == p.fast.io._lane.executed == 20
        ops, nbytes, nbuckets = _channel_stats(p.fast, name)
        assert ops == list(p.ref.bdev(name).stats_total().ops)
        assert nbuckets == ops
        assert p.fast.io._net is not None  # (still lent: the timer folded it)
    finally:
        p.close()


@pytest.mark.parametrize("backend", ["memory", "uring"])
def test_nothing_lost_when_the_connection_closes_between_folds(
        backend: str, no_timer: None, tmp_path: Path) -> None:
    """A connection that closes before anyone folded its counters: give-back and close
    fold them, and I/O still at io_uring when it closed is counted as it completes."""
    kw: dict[str, Any] = {}
    if backend == "uring":
        kw = {"layout": _uring_layout(), "workdir": tmp_path, "sqsize": 127,
              "cattr": SQFLOW_OFF}
    p = SockPair(OPTS, **kw)
    try:
        p.feed(_mix(16))
        r = p.fast.reactor
        name = _name(p)
        lane = p.fast.io._lane
        before = r.stats.c_lane_commands
        assert before < 32  # (not folded yet)
        if backend == "uring":
            # more reads sent, and the connection closed while they may be at the ring
            p.fast.send(b"".join(rd(300 + i, 2, i) for i in range(8)))
            for _ in range(50):
                p.fast.loop.run_until_complete(asyncio.sleep(0))
                if lane.c.io_inflight or lane.executed > 32:
                    break
        p.fast.io.close("test: closed between folds")
        p.fast.settle()  # (the ring's last completions, counted by the closed lane)
        executed = lane.executed
        assert executed >= 32
        assert r.stats.c_lane_commands == executed
        ops, nbytes, nbuckets = _channel_stats(p.fast, name)
        assert ops[IOType.WRITE] == 16
        assert ops[IOType.READ] == executed - 16
        assert nbytes[IOType.READ] == p.fast.bdev(name).block_size * ops[IOType.READ]
        assert nbuckets == ops
        # the queue's budget went back whole
        assert p.fast.io.budget.used == 0 and p.fast.io.budget_held == 0
    finally:
        p.close()


def test_budget_exact_while_lent_and_back(no_timer: None) -> None:
    """R2T writes waiting for their data hold the reactor's budget: the used total is
    the Python path's after every poll, unfolded; folded, the queue's share too; and
    all of it comes back once the data has come and the writes are done."""
    p = SockPair(OPTS)
    try:
        cmds = b"".join(wr(400 + i, 2, 8 * i, 2, data=b"") for i in range(3))
        p.feed(cmds)
        qp = p.fast.io
        assert qp._lane.c.r2t_waiting == 3
        held = p.ref.io.budget_held
        assert held > 0
        assert qp.budget.used == p.ref.io.budget.used == held
        qp.reactor.fold_stats()
        assert qp.budget_held == held
        host = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
        host._ic_done = True
        r2ts = [x for x in host.feed(bytes(p.ref.tr.out)) if type(x) is pdu.R2T]
        assert len(r2ts) == 3
        p.feed(b"".join(wire(pdu.H2CData(x.cccid, x.ttag, 0, pattern(x.r2tl, x.cccid), True))
                        for x in r2ts))
        assert qp.budget.used == p.ref.io.budget.used == 0
        p.check()
    finally:
        p.close()
