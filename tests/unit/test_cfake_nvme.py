"""The fake NVMe controller whose I/O queues run in C (cfake_nvme.CNvme), the device of
bench/hotpath.py's NVMe figures: it must move every byte where the PRPs say, answer
errors with the right status, and be reaped by the reactor's C poller as hardware is.

Held to the Python model's behaviour through the driver directly, then through the lane
against the Python path (lane_harness's two targets, each with C devices), then over a
socket lent to the C poller.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cfake_nvme import CNvme, DeviceIommu
from lane_harness import OPTS, Pair, rd, wr
from test_fastpath_nvme import _FAKES, LANE_NVME, NVME_LAYOUT, _queues, attacher, stop_fakes

from blocktarget.nvme import fastlane, netpoll, spec
from blocktarget.nvme.driver.ctrlr import Controller, buffer_prps
from blocktarget.nvme.driver.dma import DmaAllocator

pytestmark = pytest.mark.skipif(not fastlane.AVAILABLE, reason="the C lane is not built")


def c_device(blocks: int, block_size: int) -> CNvme:
    return CNvme(DeviceIommu(), blocks=blocks, block_size=block_size, mqes=127)


C_LAYOUT = dataclasses.replace(NVME_LAYOUT, setup=attacher(c_device))


@pytest.fixture(autouse=True)
def _fakes() -> Iterator[None]:
    yield
    stop_fakes()


def _sync(q: Any, opcode: int, nsid: int = 1, **kw: Any) -> int:
    out: list[int] = []
    q.submit(opcode, nsid, cb=lambda st, dw0: out.append(st), **kw)
    deadline = time.monotonic() + 5
    while not out:
        assert time.monotonic() < deadline, "the C device never completed the command"
        q.process_completions()
    return out[0]


def test_driver_reads_and_writes_through_prp_lists() -> None:
    """The Python driver's commands of one to 32 pages (PRP1 alone, PRP2 a page, PRP2 a
    list; at a page offset too) land in the device's memory byte for byte and come back
    so; a wrong namespace or LBA gets its NVMe status; nothing touched unmapped memory."""
    iommu = DeviceIommu()
    dev = CNvme(iommu, blocks=4096, block_size=512, mqes=127)
    _FAKES.append(dev)
    alloc = DmaAllocator(iommu, name="cfake", use_hugepages=False)
    try:
        c = Controller(dev, alloc, name="cfake")
        c.init(1)
        q = c.create_io_queue(32)
        buf = q.get_buffer()
        assert buf is not None
        for length, lba in ((512, 7), (4096, 8), (8192, 100), (c.max_transfer, 300),
                            (12288, 1000)):
            payload = bytes((i * 7 + length + lba) & 0xFF for i in range(length))
            buf.mem[:length] = payload
            prp1, prp2 = buffer_prps(buf, length)
            assert _sync(q, spec.IoOpcode.WRITE, prp1=prp1, prp2=prp2, cdw10=lba,
                         cdw12=length // 512 - 1) == 0
            assert bytes(dev.storage[1][lba * 512:lba * 512 + length]) == payload
            buf.mem[:length] = bytes(length)
            assert _sync(q, spec.IoOpcode.READ, prp1=prp1, prp2=prp2, cdw10=lba,
                         cdw12=length // 512 - 1) == 0
            assert bytes(buf.mem[:length]) == payload, length
        # a read starting 512 bytes into a page: PRP1 with an offset, then PRP2
        dev.storage[1][0:4096] = bytes(range(256)) * 16
        buf.mem[:] = bytes(len(buf.mem))
        assert _sync(q, spec.IoOpcode.READ, prp1=buf.iova + 512, prp2=buf.iova + 4096,
                     cdw10=0, cdw12=7) == 0
        assert bytes(buf.mem[512:4608]) == bytes(range(256)) * 16
        assert bytes(buf.mem[:512]) == bytes(512)
        assert _sync(q, spec.IoOpcode.READ, nsid=9, prp1=buf.iova, cdw12=0) == 0x00B
        assert _sync(q, spec.IoOpcode.READ, prp1=buf.iova, cdw10=4096, cdw12=0) == 0x080
        assert _sync(q, spec.IoOpcode.FLUSH) == 0
        # a PRP into memory the IOMMU does not map: a data transfer error, no access
        assert _sync(q, spec.IoOpcode.READ, prp1=1 << 60, cdw12=0) == 0x004
        st = dev.stats()
        assert st["dma_faults"] == 1 and st["reads"] == 6 and st["writes"] == 5
        assert dev.cpu_ns() > 0  # (its own thread's, reported apart)
        c.close()
    finally:
        dev.stop()
        _FAKES.remove(dev)
        alloc.close()


def test_lane_against_the_c_device_matches_the_python_path() -> None:
    """Reads and writes of several sizes on every NVMe namespace (512-byte and 4 KiB
    blocks, a split part, a passthru), the lane's side against the Python path's, both
    on C devices: every answer and every byte of every namespace the same, the commands
    done by the C model."""
    if not LANE_NVME:
        pytest.fail("the C lane was built without its NVMe backend")
    p = Pair(OPTS, layout=C_LAYOUT)
    try:
        stream = b"".join(
            rd(i, 1, (i * 13) % 400, 1 + i % 8) if i % 4 == 0 else
            wr(i, 2, (i * 5) % 90, 1 + i % 2) if i % 4 == 1 else
            rd(i, 5, i % 30, 1) if i % 4 == 2 else wr(i, 6, (i * 3) % 200, 1 + i % 4)
            for i in range(28))  # (within the queue's 32 commands)
        p.feed(stream)
        p.check()
        assert not p.fast.io.closed
        p.feed(b"".join(rd(100 + i, n, i, 2) for i, n in enumerate((1, 2, 5, 6))))
        p.check()
        lane = sum(rq.lane_reads + rq.lane_writes for rq in _queues(p.fast))
        assert lane >= 24, lane
        devs = [d for d in _FAKES if isinstance(d, CNvme)]
        assert len(devs) == 8  # (four controllers a side)
        stats = [d.stats() for d in devs]
        assert all(s["dma_faults"] == 0 for s in stats)
        assert sum(s["completions"] for s in stats) >= 2 * 32
    finally:
        p.close()


def test_the_c_poller_reaps_the_c_device_without_python() -> None:
    """Over a socket lent to the reactor's C poller, adaptive polling (the target's
    default): every lane completion is found and answered by the C poller, none by the
    Python poller's reap, as with a real device."""
    from test_netpoll import SQFLOW_OFF, SockPair, _lent

    sweeps = [0]
    reap = netpoll.NetPoller.reap

    def counted(self: Any) -> None:
        sweeps[0] += 1
        reap(self)

    netpoll.NetPoller.reap = counted  # type: ignore[method-assign]
    p = SockPair(OPTS, layout=C_LAYOUT, cattr=SQFLOW_OFF)
    try:
        p.feed(rd(900, 2, 0) + rd(901, 1, 0))
        p.check()
        assert _lent(p)
        p.fast.reactor.set_poll_mode("adaptive")
        rq = next(r for r in _queues(p.fast) if r.owner.name == "B")
        ctx = rq.lane_ctx
        lane0, c0 = ctx.lane_reaped, ctx.c_reaped
        sweeps[0] = 0
        stream = b"".join(rd(i, 2, i % 90, 1 + i % 3) if i % 2 else wr(i, 2, i % 90, 1)
                          for i in range(24))
        p.feed(stream)
        p.check()
        assert ctx.lane_reaped - lane0 == 24
        assert ctx.c_reaped - c0 == 24
        assert sweeps[0] == 0
        assert ctx.lane_inflight == 0 and ctx.bufs_out == 0
    finally:
        netpoll.NetPoller.reap = reap  # type: ignore[method-assign]
        p.close()


def sync_device(blocks: int, block_size: int) -> CNvme:
    return CNvme(DeviceIommu(), blocks=blocks, block_size=block_size, mqes=127, sync=True)


SYNC_LAYOUT = dataclasses.replace(NVME_LAYOUT, setup=attacher(sync_device))


def test_the_synchronous_device_is_reaped_in_the_submitting_call() -> None:
    """The synchronous C device (commands completed at their doorbell, from the target's
    own C call, through the queue pair's doorbell hook) behind every NVMe namespace of
    both sides, the lane's over a socket lent to the C poller in event mode (no spinning):
    every byte the same as the Python path's, every lane completion reaped by the very
    poller call that received its command (no poller call without input reaps one, and
    the Python poller's reap never runs, nor is the reactor's Python poll asked for),
    the device's time counted apart."""
    from net_harness import SockPair
    from test_netpoll import SQFLOW_OFF, _lent

    if not LANE_NVME:
        pytest.fail("the C lane was built without its NVMe backend")
    sweeps = [0]
    calls: list[tuple[int, int]] = []  # (PDUs received, lane completions C reaped)
    reap, poll = netpoll.NetPoller.reap, netpoll.NetPoller.poll
    ctxs: list[Any] = []

    def counted_reap(self: Any) -> None:
        sweeps[0] += 1
        reap(self)

    def counted_poll(self: Any, spin_left: int | None = None) -> None:
        self.fold_counters()
        pdus0 = self.reactor.stats.net_pdus
        c0 = sum(int(c.c_reaped) for c in ctxs)
        poll(self, spin_left)
        self.fold_counters()
        calls.append((self.reactor.stats.net_pdus - pdus0,
                      sum(int(c.c_reaped) for c in ctxs) - c0))

    netpoll.NetPoller.reap = counted_reap  # type: ignore[method-assign]
    netpoll.NetPoller.poll = counted_poll  # type: ignore[method-assign]
    p = SockPair(OPTS, layout=SYNC_LAYOUT, cattr=SQFLOW_OFF)
    try:
        devs = [d for d in _FAKES if isinstance(d, CNvme)]
        assert len(devs) == 8 and all(d.sync and not d.running for d in devs)
        p.feed(rd(900, 2, 0) + rd(901, 1, 0))
        p.check()
        assert _lent(p)
        p.fast.reactor.set_poll_mode("event")  # (no spinning: only the device can be quick)
        ctxs[:] = [rq.lane_ctx for rq in _queues(p.fast)]
        assert ctxs and all(c.db_hook != netpoll.ffi.NULL for c in ctxs)
        kicks = [0]
        for rq in _queues(p.fast):  # (the reactor's Python poll the lane's I/O asks for)
            rq._kick = lambda k=rq._kick: (kicks.__setitem__(0, kicks[0] + 1), k())
        lane0 = sum(int(c.lane_reaped) for c in ctxs)
        creaped0 = sum(int(c.c_reaped) for c in ctxs)
        dev0 = [d.stats() for d in devs]
        sweeps[0] = 0
        calls.clear()
        for base in (0, 100):  # (two batches: reads, writes and both, every namespace)
            stream = b"".join(
                rd(base + i, 1 + i % 2, (i * 11) % 60, 1 + i % 3) if i % 3 == 0 else
                wr(base + i, 5 + i % 2, (i * 3) % 30, 1 + i % 2) if i % 3 == 1 else
                wr(base + i, 2, i % 90, 1) for i in range(24))
            p.feed(stream)
            p.check()
        lane = sum(int(c.lane_reaped) for c in ctxs) - lane0
        assert lane >= 40, lane  # (split and passthru too; the rest is the Python path's)
        assert sum(int(c.c_reaped) for c in ctxs) - creaped0 == lane
        assert sum(r for _, r in calls) == lane
        assert all(pdus > 0 for pdus, r in calls if r), calls
        assert sweeps[0] == 0
        assert kicks[0] == 0  # (nothing left at a device: no poller turn asked for)
        assert all(c.lane_inflight == 0 and c.bufs_out == 0 for c in ctxs)
        after = [d.stats() for d in devs]
        done = sum(a["completions"] - b["completions"] for a, b in zip(after, dev0, strict=True))
        assert done >= lane
        assert all(a["dma_faults"] == 0 for a in after)
        used = [(a["sync_calls"] - b["sync_calls"], a["sync_cpu_ns"] - b["sync_cpu_ns"])
                for a, b in zip(after, dev0, strict=True)]
        assert sum(n for n, _ in used) > 0
        assert all(ns > 0 for n, ns in used if n)  # (counted apart, for a bench to subtract)
    finally:
        netpoll.NetPoller.reap = reap  # type: ignore[method-assign]
        netpoll.NetPoller.poll = poll  # type: ignore[method-assign]
        p.close()


def test_a_quick_device_costs_no_python_pass_per_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host at QD1 slower than the window (a QEMU guest's kernel initiator) makes
    every command one C poller call: with the device done within that call (the
    synchronous C device), the call leaves Python nothing to do (bt_net_poll returns 0:
    no pass over the watch, the budget or the connections; lane_started is not
    reported, the queue pair being swept by the poller), and the counters C keeps come
    out right once folded. Every byte as the Python path's."""
    from net_harness import SockPair
    from test_netpoll import SQFLOW_OFF, _lent
    from test_netpoll_window import _qd1

    if not LANE_NVME:
        pytest.fail("the C lane was built without its NVMe backend")
    settles: list[int] = []
    settle = netpoll.NetPoller._settle

    def counted(self: Any, n: Any, attn: int, spin: int) -> None:
        settles.append(attn)
        settle(self, n, attn, spin)

    monkeypatch.setattr(netpoll.NetPoller, "_settle", counted)
    p = SockPair(OPTS, layout=SYNC_LAYOUT, cattr=SQFLOW_OFF)
    try:
        p.feed(rd(900, 2, 0))
        p.check()
        assert _lent(p)
        r = p.fast.reactor
        r.set_poll_mode("event")
        np_ = r.net_poller
        assert np_.n.quiet_starts  # (the lane's queue pairs, all swept by the poller)
        _qd1(p, 1, 4, 0)
        settles.clear()
        polls0, pdus0 = p.stats.net_polls, p.stats.net_pdus
        ctxs = [rq.lane_ctx for rq in _queues(p.fast)]
        creaped0 = sum(int(c.c_reaped) for c in ctxs)
        _qd1(p, 10, 40, 0.001)
        assert p.stats.net_pdus - pdus0 == 40
        assert p.stats.net_polls - polls0 >= 40
        assert sum(int(c.c_reaped) for c in ctxs) - creaped0 == 40
        assert settles == [], settles  # (no call needed Python after it)
        p.settle_fast()
        p.check()
        assert _lent(p)
    finally:
        p.close()
