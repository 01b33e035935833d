"""A reactor's NVMe queue pair sleeps while nothing is outstanding on it (issue 15).

Its poller is dormant (reactor.set_dormant) once a turn finds no command at the device,
none waiting and no reset under way, so an idle reactor makes no timed poll turns (it
made one every idle_poll_us before). What gives it work kicks the reactor; the health
tick runs from a loop timer meanwhile. Held here against the fake controllers of
test_nvme_driver (the Python path, on real reactor threads) and test_netpoll's socket
pairs (the C lane and the C socket poller, fake device with memory doorbells).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_nvme_driver import FakeIommu, FakeNvme, StubTarget, _io

from blocktarget.bdev import BdevIO, IOType
from blocktarget.bdevs import nvme_pcie
from blocktarget.nvme.driver.ctrlr import TICK_INTERVAL_S, Controller, Options
from blocktarget.nvme.driver.dma import DmaAllocator


@pytest.fixture
def iommu() -> FakeIommu:
    return FakeIommu()


@pytest.fixture
def stub_target() -> Iterator[StubTarget]:
    """test_nvme_driver's: two reactor threads (on one core where there is one)."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    t = StubTarget(cores if len(cores) == 2 else cores * 2)
    t.reactors.start()
    yield t
    t.reactors.stop()


def _until(cond: Any, timeout: float = 5.0) -> float:
    """Seconds until ``cond()`` held (it must, within ``timeout``)."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition never held"
        time.sleep(0.002)
    return time.monotonic() - t0


async def _attach(target: StubTarget, iommu: FakeIommu, name: str, **opts: Any) -> Any:
    alloc = DmaAllocator(iommu, name=name, use_hugepages=False)
    dev = FakeNvme(iommu)
    c = Controller(dev, alloc, name=name, options=Options(**opts))
    c.init(2)
    await nvme_pcie.register_controller(target, name, "0000:00:06.0", c,
                                        {"name": name, "traddr": "0000:00:06.0"})
    return dev, c, alloc


def _queue(name: str, reactor: Any) -> nvme_pcie.ReactorQueue:
    return nvme_pcie.get_controller(name).queues[reactor.index]


async def _dormant(target: StubTarget, name: str) -> tuple[Any, Any, nvme_pcie.ReactorQueue]:
    """``name``'s namespace, reactor 0 and its queue there, after one flush and once the
    queue sleeps."""
    b = target.bdevs.get(f"{name}n1")
    r0 = target.reactors[0]
    assert (await asyncio.to_thread(_io, r0, b, IOType.FLUSH, 0, 0)).status == 0
    rq = _queue(name, r0)
    await asyncio.to_thread(_quiet, r0, rq)
    return b, r0, rq


def _quiet(r: Any, rq: Any) -> None:
    """Until ``rq``'s poller sleeps and ``r``'s busy-poll window after the last work has
    run out (its turns would count as the sleeping queue's on a loaded machine)."""
    _until(lambda: rq.poller.dormant and not r.poll_scheduled)


async def _runs_over(reactor: Any, seconds: float) -> int:
    before = reactor.stats.poll_runs
    await asyncio.sleep(seconds)
    return reactor.stats.poll_runs - before


async def test_idle_queue_sleeps_and_wakes_for_io(iommu: FakeIommu,
                                                  stub_target: StubTarget) -> None:
    """(a) Idle with a queue registered: no timed poll turns; with a command held at
    the device: one every idle_poll_us, as before. (b) I/O after the dormant period
    completes, woken by its kick (not by the tick timer's late wake)."""
    dev, c, alloc = await _attach(stub_target, iommu, "Idle")
    try:
        b = stub_target.bdevs.get("Idlen1")
        r0 = stub_target.reactors[0]
        payload = bytes(range(256)) * 2
        assert (await asyncio.to_thread(_io, r0, b, IOType.WRITE, 3, 1, payload)).status == 0
        rq = _queue("Idle", r0)
        assert rq.poller is not None
        await asyncio.to_thread(_quiet, r0, rq)
        # (framework_get_reactors says so)
        assert [p["dormant"] for p in r0.describe()["pollers"]
                if p["name"] == rq.poller.name] == [True]
        idle_runs = await _runs_over(r0, 0.2)
        assert idle_runs <= 2, f"{idle_runs} poll turns in 200 ms with nothing outstanding"

        # a command the device holds keeps the queue awake: timed turns as before
        dev.hold_io = 1
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        r0.send(lambda: b.get_io_channel(r0).submit(
            BdevIO(IOType.WRITE, 9, 1, bytes(512), fut.set_result))).result(5)
        busy_runs = await _runs_over(r0, 0.2)
        assert not rq.poller.dormant
        assert busy_runs >= 20, f"only {busy_runs} poll turns in 200 ms with a command out"
        # the device completes it (the fake posts held commands when asked)
        with dev.lock:
            qid, raw = dev.held.pop()
            from test_nvme_driver import structs

            st, dw0 = dev._io(raw)
            dev.post(qid, structs.parse_sqe(raw).cid, st, dw0)
        assert (await asyncio.wrap_future(fut)).status == 0
        await asyncio.to_thread(_until, lambda: rq.poller.dormant)

        # (b) after the dormant period, I/O completes at once
        await asyncio.sleep(0.15)
        t0 = time.monotonic()
        io = await asyncio.to_thread(_io, r0, b, IOType.READ, 3, 1)
        took = time.monotonic() - t0
        assert io.status == 0 and bytes(io.buf) == payload
        assert took < TICK_INTERVAL_S, f"read after dormancy took {took * 1000:.0f} ms"
        assert (await asyncio.to_thread(_io, r0, b, IOType.FLUSH, 0, 0)).status == 0
        assert (await asyncio.to_thread(_io, r0, b, IOType.UNMAP, 3, 1)).status == 0
        assert rq.late_wakes == 0, "every submission kicked the reactor"
    finally:
        await nvme_pcie.detach_pcie(stub_target, "Idle")
        alloc.close()


async def test_device_removed_while_dormant_is_noticed(iommu: FakeIommu,
                                                       stub_target: StubTarget) -> None:
    """(c) The tick runs from its timer while the queue sleeps: a device that reads all
    ones is noticed within two ticks, and its bdevs go away."""
    dev, c, alloc = await _attach(stub_target, iommu, "Gone2")
    try:
        b, r0, rq = await _dormant(stub_target, "Gone2")
        assert await _runs_over(r0, 0.05) <= 1  # (asleep: only the timer can tick)
        dev.removed = True
        took = await asyncio.to_thread(_until, lambda: c.removed)
        assert took < 2 * TICK_INTERVAL_S + 0.1, f"removal noticed after {took:.2f} s"
        for _ in range(100):
            if not len(stub_target.bdevs):
                break
            await asyncio.sleep(0.02)
        assert len(stub_target.bdevs) == 0, "a removed device's bdevs are unregistered"
        assert rq._tick_handle is None, "the released queue's tick timer is cancelled"
    finally:
        alloc.close()


async def test_fatal_status_while_dormant_resets_and_io_goes_on(
        iommu: FakeIommu, stub_target: StubTarget) -> None:
    """(c) CSTS.CFS on an idle controller: the timer's tick asks for the reset, which
    suspends and re-creates the dormant queue; I/O after it completes."""
    dev, c, alloc = await _attach(stub_target, iommu, "Cfs")
    try:
        b, r0, rq = await _dormant(stub_target, "Cfs")
        dev.fatal()
        for _ in range(200):
            if c.resets:
                break
            await asyncio.sleep(0.01)
        assert c.resets == 1, "the idle controller's fatal status was acted on"
        payload = b"\x5a" * 512
        assert (await asyncio.to_thread(_io, r0, b, IOType.WRITE, 7, 1, payload)).status == 0
        assert dev.storage[1][7 * 512:8 * 512] == payload
        await asyncio.to_thread(_until, lambda: rq.poller.dormant)
        assert rq.late_wakes == 0
    finally:
        await nvme_pcie.detach_pcie(stub_target, "Cfs")
        alloc.close()


async def test_stuck_command_times_out_and_abort_is_reaped(
        iommu: FakeIommu, stub_target: StubTarget) -> None:
    """(d) A command the device never completes is aborted after its timeout (the tick
    of the awake queue); the Abort's own completion, on the admin queue, is reaped by a
    later tick, which runs from the timer once the I/O queue is dormant again."""
    dev, c, alloc = await _attach(stub_target, iommu, "Stuck", io_timeout_s=0.2)
    try:
        b, r0, rq = await _dormant(stub_target, "Stuck")
        dev.hold_io = 1
        t0 = time.monotonic()
        io = await asyncio.to_thread(_io, r0, b, IOType.WRITE, 1, 1, bytes(512))
        took = time.monotonic() - t0
        assert io.status == 0x007, "completed by the Abort (ABORTED_BY_REQUEST)"
        assert 0.2 <= took < 0.2 + 3 * TICK_INTERVAL_S + 0.2, f"aborted after {took:.2f} s"
        assert c.aborts_sent == 1 and rq.q.timeouts == 1
        await asyncio.to_thread(_until, lambda: rq.poller.dormant)
        await asyncio.to_thread(_until, lambda: c._aborts_outstanding == 0, 2.0)
        assert c.resets == 0
    finally:
        await nvme_pcie.detach_pcie(stub_target, "Stuck")
        alloc.close()


# ---- the C lane and the C socket poller ---------------------------------------------

fastlane = pytest.importorskip("blocktarget.nvme.fastlane")
LANE = fastlane.AVAILABLE and hasattr(fastlane.lib, "bt_nvmeq_new")


@pytest.mark.skipif(not LANE, reason="the C lane is not built")
@pytest.mark.parametrize("mode", ["event", "adaptive"])
def test_lane_io_after_dormancy_and_held_at_the_device(mode: str) -> None:
    """(b) With the socket lent to the C poller: the lane's queue sleeps while idle, the
    lane's next commands wake it (lane_io_started); commands the device holds keep it
    awake, and are answered once the device completes them."""
    from lane_harness import rd, wr
    from test_netpoll import _complete_held, _lent, _nvme_pair, _nvme_side_queue, _send_held
    from test_netpoll import _stop_fakes as stop

    p = _nvme_pair()
    try:
        r = p.fast.reactor
        r.set_poll_mode(mode)
        rq = _nvme_side_queue(p)
        ctx = rq.lane_ctx
        p.loop.run_until_complete(asyncio.sleep(0.02))
        assert rq.poller.dormant
        runs0 = r.stats.poll_runs
        p.loop.run_until_complete(asyncio.sleep(0.2))
        idle_runs = r.stats.poll_runs - runs0
        assert idle_runs <= 2, f"{idle_runs} poll turns in 200 ms, the lane idle"

        lane0 = ctx.lane_reaped
        p.feed(b"".join(rd(i, 2, i * 3, 1 + i % 2) if i % 2 else wr(i, 2, i * 3)
                        for i in range(1, 9)))
        p.check()
        assert ctx.lane_reaped - lane0 == 8 and _lent(p)

        # the device holds the lane's commands: the queue stays awake until they are done
        p.loop.run_until_complete(asyncio.sleep(0.02))
        assert rq.poller.dormant
        dev = rq.owner.ctrlr.mmio
        _send_held(p, dev, rd(20, 2, 5) + wr(21, 2, 6) + rd(22, 2, 7, 2), 3)
        assert ctx.lane_inflight == 3
        p.loop.run_until_complete(asyncio.sleep(0.05))
        assert not rq.poller.dormant, "lane commands at the device keep the queue awake"
        _complete_held(dev, [2, 0, 1])
        p.settle_fast()
        p.check()
        assert ctx.lane_inflight == 0
        p.loop.run_until_complete(asyncio.sleep(0.02))
        assert rq.poller.dormant and rq.late_wakes == 0
    finally:
        p.close()
        stop()

