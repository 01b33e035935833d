"""NVMe completion interrupts (issue 15): I/O queues raise MSI-X vectors, delivered by
vfio-pci as eventfds, and the reactor's C socket poller sleeps on them while the lane's
commands are at the device, instead of waiting in timed device-wait slices (each of
which, in a QEMU guest, cost the reactor more CPU than the slice lasted).

Held here against the fake controllers behind a FakeVfio (test_nvme_driver): the
driver asks for a vector per I/O queue and creates each CQ with IEN and IV = qid;
``interrupts: false`` and a device without vectors keep every queue polled. Over a
socket lent to the C poller, a device with latency (cfake_nvme's C model on its own
thread) is waited for in one sleep per command, woken by the interrupt, where the
polled queue takes several slices; in event mode the lane's I/O asks nothing of the
reactor's Python poller. Every byte as the Python path's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cfake_nvme import CNvme, DeviceIommu
from lane_harness import OPTS, rd, wr
from net_harness import SockPair
from test_fastpath_nvme import LANE_NVME, NVME_LAYOUT, _queues, attacher, stop_fakes
from test_netpoll import SQFLOW_OFF, _lent
from test_netpoll_window import _qd1
from test_nvme_dormant import _queue, _quiet, _runs_over, _until
from test_nvme_dormant import stub_target as stub_target  # noqa: F401 (the fixture)
from test_nvme_driver import FakeIommu, FakeNvme, FakeVfio, StubTarget, _io, structs

from blocktarget.bdev import BdevIO, IOType
from blocktarget.bdevs import nvme_pcie
from blocktarget.nvme import fastlane, spec
from blocktarget.nvme.driver.ctrlr import TICK_INTERVAL_S, Controller, Options, buffer_prps
from blocktarget.nvme.driver.dma import DmaAllocator


@pytest.fixture(autouse=True)
def _fakes() -> Iterator[None]:
    yield
    stop_fakes()


def _controller(vectors: int, **opts: Any) -> tuple[FakeNvme, FakeVfio, Controller, Any]:
    iommu = FakeIommu()
    dev = FakeNvme(iommu, max_queues=4)
    vfio = FakeVfio(dev, vectors)
    alloc = DmaAllocator(iommu, name="irq", use_hugepages=False)
    opts.setdefault("interrupts", True)  # (off by default: asked for, as an attach would)
    c = Controller(dev, alloc, name="irq", options=Options(**opts), device=vfio)
    c.init(2)
    return dev, vfio, c, alloc


def _readable(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_each_io_queue_gets_its_vector_and_the_device_signals_it() -> None:
    """init(2) (two reactors; the fake grants the two queues asked for) on a device with
    8 vectors: vectors 0-2 enabled (the admin queue's, one per granted I/O queue);
    queue qid's CQ is created with IEN and IV = qid; a completion on it signals that
    eventfd and no other; close() gives them back."""
    dev, vfio, c, alloc = _controller(8)
    try:
        assert c.irq_efds == vfio.efds and len(c.irq_efds) == 3
        assert c.describe()["interrupt_vectors"] == 3
        q1, q2 = c.create_io_queue(16), c.create_io_queue(16)
        assert {q1.qid, q2.qid} == {1, 2}
        for q in (q1, q2):
            assert q.irq_efd == c.irq_efds[q.qid]
            assert dev.cqs[q.qid]["iv"] == q.qid
            assert q.cring is None or q.cring.c.irq_efd == q.irq_efd
        for fd in c.irq_efds:
            _readable(fd)
        buf = q2.get_buffer()
        assert buf is not None
        out: list[int] = []
        prp1, prp2 = buffer_prps(buf, 512)
        q2.submit(spec.IoOpcode.READ, 1, prp1=prp1, prp2=prp2, cdw10=0, cdw12=0,
                  cb=lambda st, dw0: out.append(st))
        q2.flush_doorbell()
        assert _readable(q2.irq_efd) == 1
        assert _readable(q1.irq_efd) == 0
        q2.process_completions()
        assert out == [0]
        q2.put_buffer(buf)
    finally:
        c.close()
        alloc.close()
    assert vfio.closed and not vfio.efds


def test_a_queue_beyond_the_vectors_is_polled() -> None:
    """Two vectors for two I/O queues: the first queue interrupts, the second (no vector
    of its own) is created with IEN=0."""
    dev, vfio, c, alloc = _controller(2)
    try:
        assert len(c.irq_efds) == 2
        q1, q2 = c.create_io_queue(16), c.create_io_queue(16)
        assert q1.irq_efd == c.irq_efds[1] and dev.cqs[q1.qid]["iv"] == 1
        assert q2.irq_efd == -1 and dev.cqs[q2.qid]["iv"] == -1
    finally:
        c.close()
        alloc.close()


@pytest.mark.parametrize("case", ["option off", "one vector", "no vectors"])
def test_queues_stay_polled_without_vectors_or_when_told(case: str) -> None:
    """``interrupts: false`` is honoured (no vector asked for, CQs created with IEN=0),
    and a device with fewer than two vectors (none for an I/O queue) is polled."""
    vectors, opts = {"option off": (8, {"interrupts": False}), "one vector": (1, {}),
                     "no vectors": (0, {})}[case]
    dev, vfio, c, alloc = _controller(vectors, **opts)
    try:
        assert c.irq_efds == [] and vfio.efds == []
        q = c.create_io_queue(16)
        assert q.irq_efd == -1 and dev.cqs[q.qid]["iv"] == -1
        assert q.cring is None or q.cring.c.irq_efd == -1
    finally:
        c.close()
        alloc.close()


def slow_device(latency_us: int) -> Any:
    def make(blocks: int, block_size: int) -> CNvme:
        # (its thread naps 20 us at a time when idle, and holds each doorbell's
        # commands latency_us: a device slower than the reactor's 10 us slices)
        return CNvme(DeviceIommu(), blocks=blocks, block_size=block_size, mqes=127,
                     spin_us=0, sleep_us=20, latency_us=latency_us)
    return make


def _layout(irq: bool, latency_us: int = 300) -> Any:
    return dataclasses.replace(NVME_LAYOUT, setup=attacher(slow_device(latency_us), irq=irq))


@contextlib.contextmanager
def _lent_pair(irq: bool, latency_us: int = 300) -> Iterator[tuple[SockPair, Any]]:
    """The two sides over the slow fake controllers (behind FakeVfio when ``irq``), the
    lane's connection lent to the C poller after a first read, and the queue of
    namespace 2's controller (B) on its reactor; closed on the way out."""
    if not (fastlane.AVAILABLE and LANE_NVME):
        pytest.fail("the C lane was built without its NVMe backend")
    p = SockPair(OPTS, layout=_layout(irq, latency_us), cattr=SQFLOW_OFF)
    try:
        p.feed(rd(900, 2, 0))
        p.check()
        assert _lent(p)
        yield p, next(rq for rq in _queues(p.fast) if rq.owner.name == "B")
    finally:
        p.close()


def _qd1_waits(irq: bool, mode: str, latency_us: int = 300) -> dict[str, Any]:
    """40 QD1 reads through an NVMe namespace over a socket lent to the C poller, the
    device ``latency_us`` per command: the poller's counters over them, bytes checked."""
    with _lent_pair(irq, latency_us) as (p, rq_b):
        r = p.fast.reactor
        r.set_poll_mode(mode)
        rqs = list(_queues(p.fast))
        assert all((rq.q.irq_efd >= 0) == irq for rq in rqs)
        kicks = [0]
        for rq in rqs:  # (the reactor's Python poll the lane's I/O asks for)
            rq._kick = lambda k=rq._kick: (kicks.__setitem__(0, kicks[0] + 1), k())
        ctx = rq_b.lane_ctx
        st = p.stats
        w0, i0, c0 = st.net_device_waits, st.net_irq_wakes, int(ctx.c_reaped)
        _qd1(p, 10, 40, 0)
        st = p.stats
        out = {"waits": st.net_device_waits - w0, "irq": st.net_irq_wakes - i0,
               "c_reaped": int(ctx.c_reaped) - c0, "kicks": kicks[0],
               "dormant": rq_b.poller.dormant}
        p.settle_fast()
        p.check()
        # a mixed stream after it, every byte as the Python path's
        p.feed(b"".join(wr(200 + i, 2, (i * 7) % 90, 1 + i % 2) if i % 2 else
                        rd(200 + i, 1 + i % 2, i % 60, 1 + i % 3) for i in range(16)))
        p.check()
        assert ctx.lane_inflight == 0 and ctx.bufs_out == 0
        return out


def test_the_c_poller_sleeps_on_the_interrupt_not_in_slices() -> None:
    """Adaptive polling, a device (1 ms a command) far slower than the device-wait
    slice: with interrupts each command costs one sleep, ended by its interrupt or by
    the call's time budget (the event loop then waits for the interrupt), and the C
    poller reaps every completion; polled, the same commands take many slices each
    (about 30 on a quiet machine; a loaded one stretches each slice, so fewer)."""
    irq = _qd1_waits(True, "adaptive", 1000)
    polled = _qd1_waits(False, "adaptive", 1000)
    assert irq["c_reaped"] == 40 and polled["c_reaped"] == 40, (irq, polled)
    assert irq["irq"] >= 36, irq  # (a completion may land before the sleep: no wake)
    assert polled["irq"] == 0
    assert polled["waits"] >= 2 * 40, polled
    assert irq["waits"] * 2 <= polled["waits"], (irq, polled)


def test_event_mode_leaves_the_lanes_device_io_to_the_interrupt() -> None:
    """Event mode: the lane's commands at an interrupting queue ask for no poll turn of
    the reactor's Python poller (no kick, the queue's poller stays dormant); the epoll
    set wakes the loop when the device posts, and the C poller answers."""
    irq = _qd1_waits(True, "event")
    assert irq["c_reaped"] == 40 and irq["irq"] >= 36, irq
    assert irq["kicks"] == 0 and irq["dormant"], irq
    polled = _qd1_waits(False, "event")
    # (the polled queue needs the Python poller: a kick a command, but for those done
    # within the submitting call, which a loaded machine can stretch past the device)
    assert polled["kicks"] >= 30, polled


def test_interrupt_eventfds_leave_the_epoll_set_with_their_queue() -> None:
    """The C poller watches a duplicate of the queue's eventfd and closes it when the
    queue goes (so a closed device descriptor never leaves a stale number in its set)."""
    with _lent_pair(True) as (p, rq):
        np_ = p.fast.reactor.net_poller
        n = np_.n
        i = next(k for k in range(n.nnvmeqs) if n.nvmeqs[k] == rq.lane_ctx)
        dup = n.nvme_efd[i]
        assert dup >= 0 and dup != rq.q.irq_efd
        assert os.path.samestat(os.fstat(dup), os.fstat(rq.q.irq_efd))
        np_.drop_nvmeq(rq)
        with pytest.raises(OSError):
            os.fstat(dup)
        assert all(n.nvmeqs[k] != rq.lane_ctx for k in range(n.nnvmeqs))


def test_lane_commands_an_interrupt_was_to_announce_survive_the_queue_leaving_the_poller(
) -> None:
    """The lane's read is at an interrupting queue (the device stopped: it holds it),
    the queue's Python poller asleep (the interrupt was to wake the C poller); the
    queue leaves the C poller: the event loop watches the interrupt again, and the
    reply comes once the device completes it, reaped by the Python poller."""
    with _lent_pair(True) as (p, rq):
        r = p.fast.reactor
        r.set_poll_mode("event")
        dev = rq.owner.ctrlr.mmio
        dev.stop()
        cmd = rd(10, 2, 5)  # (the host's read: at the device, held there)
        p.ref.io.data_received(cmd)
        p.ref.run()
        p.fast.send(p.for_fast(cmd))
        deadline = time.monotonic() + 5
        while not rq.lane_ctx.lane_inflight:
            assert time.monotonic() < deadline, "the lane never submitted the read"
            p.fast.pump(0, settle=1)
        assert rq.lane_ctx.lane_inflight == 1 and rq.poller.dormant
        r.net_poller.drop_nvmeq(rq)
        assert r.poll_scheduled and rq.net_poller is None
        p.loop.run_until_complete(asyncio.sleep(0.01))
        assert rq.poller.dormant and rq.irq_watched()  # (the loop's watch: no timed turns)
        c_reaped = int(rq.lane_ctx.c_reaped)
        dev.start()
        p.settle_fast()
        p.check()
        assert rq.lane_ctx.lane_inflight == 0
        assert int(rq.lane_ctx.c_reaped) == c_reaped  # (the Python poller's reap)


async def test_the_python_path_sleeps_on_the_interrupt(stub_target: StubTarget) -> None:
    """The Python path on a reactor thread (no C poller): a command the device holds
    leaves the queue's poller dormant (the event loop watches the interrupt; only the
    health tick's turns run), and the device's completion, signalled on the vector,
    wakes the reactor at once; no late wake."""
    iommu = FakeIommu()
    alloc = DmaAllocator(iommu, name="Irq", use_hugepages=False)
    dev = FakeNvme(iommu)
    c = Controller(dev, alloc, name="Irq", options=Options(interrupts=True),
                   device=FakeVfio(dev))
    c.init(2)
    await nvme_pcie.register_controller(stub_target, "Irq", "0000:00:07.0", c,
                                        {"name": "Irq", "traddr": "0000:00:07.0"})
    try:
        b = stub_target.bdevs.get("Irqn1")
        r0 = stub_target.reactors[0]
        assert (await asyncio.to_thread(_io, r0, b, IOType.FLUSH, 0, 0)).status == 0
        rq = _queue("Irq", r0)
        assert rq.q.irq_efd >= 0 and rq.irq_watched() and rq.net_poller is None
        await asyncio.to_thread(_until, lambda: rq.poller.dormant)
        dev.hold_io = 1
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        r0.send(lambda: b.get_io_channel(r0).submit(
            BdevIO(IOType.WRITE, 9, 1, b"\xa5" * 512, fut.set_result))).result(5)
        # (the submission's kick spins the reactor's busy-poll window first: on a loaded
        # machine the count could start inside it, 20-40 turns in its 200 us)
        await asyncio.to_thread(_quiet, r0, rq)
        runs = await _runs_over(r0, 0.3)
        assert rq.poller.dormant and rq.q.outstanding == 1
        # (polled, the dormancy test counts >= 20 turns in 200 ms; here the tick's few)
        assert runs <= 10, f"{runs} poll turns in 300 ms with the interrupt watched"
        t0 = time.monotonic()
        with dev.lock:
            qid, raw = dev.held.pop()
            st, dw0 = dev._io(raw)
            dev.post(qid, structs.parse_sqe(raw).cid, st, dw0)
        assert (await asyncio.wrap_future(fut)).status == 0
        took = time.monotonic() - t0
        assert took < TICK_INTERVAL_S / 2, f"completion noticed after {took * 1000:.0f} ms"
        assert dev.storage[1][9 * 512:10 * 512] == b"\xa5" * 512
        assert rq.late_wakes == 0

        # an interrupt that never comes: the health tick reaps the completion
        await asyncio.to_thread(_until, lambda: rq.poller.dormant)
        dev.hold_io = 1
        fut = concurrent.futures.Future()
        r0.send(lambda: b.get_io_channel(r0).submit(
            BdevIO(IOType.READ, 9, 1, None, fut.set_result))).result(5)
        await asyncio.sleep(0.05)
        efds, dev.irq_efds = dev.irq_efds, []  # (the vector stays silent)
        with dev.lock:
            qid, raw = dev.held.pop()
            st, dw0 = dev._io(raw)
            dev.post(qid, structs.parse_sqe(raw).cid, st, dw0)
        dev.irq_efds = efds
        t0 = time.monotonic()
        io = await asyncio.wrap_future(fut)
        took = time.monotonic() - t0
        assert io.status == 0 and bytes(io.buf) == b"\xa5" * 512
        assert took < 2 * TICK_INTERVAL_S + 0.05, f"reaped after {took * 1000:.0f} ms"
    finally:
        await nvme_pcie.detach_pcie(stub_target, "Irq")
        alloc.close()
    assert rq._irq_fd == -1  # (its duplicate closed with the queue)
