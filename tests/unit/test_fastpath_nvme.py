"""The C lane on PCIe NVMe (csrc/be_nvme.c, nvme/driver/cring.py), held to the Python path
like the other backends: lane_harness's two targets, with NVMe namespaces of fake PCIe
controllers behind them.

The controller is test_nvme_driver's FakeNvme (a behavioural model: registers, queues
in "DMA" memory reached only through a fake IOMMU, its own PRP walker), with one change
the C lane needs: its doorbells are real memory (test_nvme_driver.MemBarNvme), which C
writes as it writes a mapped BAR, and which the device watches from a thread of its own,
as hardware watches its registers. Admin doorbells still reach it through write32,
synchronously.

Each side has its own controllers: nsid 1 (512-byte blocks), nsid 2 (4 KiB), nsid 5 the
second half of a split NVMe namespace, nsid 6 a passthru over one; nsid 3 stays a null
bdev. Both sides keep the queue pair's ring state in C (the Python path then submits
through it too); only the lane side's transport runs the lane. I/O completes
asynchronously and in any order, so each feed runs until everything it started is
answered, and outputs are compared per command; contents of the namespaces, statistics,
SMART counters and budgets as everywhere.

What the lane must give back to the Python path is provoked for real: the device failing
commands (the namespace shrinks under the bdev: LBA Out of Range), a controller reset
with the lane's commands at the device, the device holding commands past their timeout
(Abort), and a connection closed with I/O at the device.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from lane_harness import (
    FLUSH,
    FUA,
    OPTS,
    SMALL_CHUNK,
    Layout,
    Pair,
    cmd,
    encoding,
    pattern,
    rd,
    wire,
    wr,
)
from test_fastpath import CASES, ICREQS, _r2ts, finish_r2t
from test_nvme_driver import FakeIommu, FakeVfio, MemBarNvme

from blocktarget.bdevs import nvme_pcie
from blocktarget.nvme import fastlane, pdu
from blocktarget.nvme.driver.ctrlr import Controller, Options
from blocktarget.nvme.driver.dma import DmaAllocator

LANE_NVME = fastlane.AVAILABLE and hasattr(fastlane.lib, "bt_nvmeq_new")
pytestmark = pytest.mark.skipif(not fastlane.AVAILABLE, reason="the C lane is not built")


_FAKES: list[MemBarNvme] = []
# The fakes' DMA allocators: nothing else closes them (Pair.release leaves NVMe channels
# open, see there), and each kept ~12 MiB of shared memory mapped for the rest of the
# session: 860 mappings, 5 GiB, in a full run.
_ALLOCS: list[DmaAllocator] = []
_VFIOS: list[FakeVfio] = []  # (their eventfds, closed once the devices stopped)


def stop_fakes() -> None:
    """Stop the fake devices, then unmap their DMA memory: in that order, as a fake's
    thread writes completions and read data there until it stops."""
    while _FAKES:
        _FAKES.pop().stop()
    while _ALLOCS:
        _ALLOCS.pop().close()
    while _VFIOS:
        _VFIOS.pop().close()

# fake controller -> (block size, blocks): nsid 1, nsid 2, the split's base, the
# passthru's base, in lane_harness.BDEVS's geometries
CTRLS = {"A": (512, 512), "B": (4096, 96), "C": (4096, 64), "D": (512, 256)}
NAMESPACES = {1: "An1", 2: "Bn1", 3: "N0", 5: "Cn1p1", 6: "PD"}
COMPARED = ["An1", "Bn1", "N0", "Cn1", "Cn1p0", "Cn1p1", "Dn1", "PD"]


def membar_device(blocks: int, block_size: int) -> MemBarNvme:
    """The Python model with memory doorbells (the one that can misbehave on request)."""
    return MemBarNvme(FakeIommu(), blocks=blocks, block_size=block_size, mqes=127)


def attacher(make: Callable[[int, int], MemBarNvme] = membar_device, irq: bool = False) -> Any:
    """The layout's setup: a fake controller per namespace geometry, made by ``make``
    (blocks, block size), attached as nvme bdevs (register_controller: the attach
    without VFIO), contents patterned. ``irq``: behind a FakeVfio, so that its I/O
    queues raise MSI-X interrupts (eventfds)."""

    async def attach(target: Any, workdir: Any) -> None:
        for i, (name, (bs, blocks)) in enumerate(CTRLS.items()):
            dev = make(blocks, bs)
            _FAKES.append(dev)
            dev.storage[1][:] = pattern(bs * blocks, i + 1)
            alloc = DmaAllocator(dev.iommu, name=name, use_hugepages=False)
            _ALLOCS.append(alloc)
            vfio = None
            if irq:
                vfio = FakeVfio(dev)
                _VFIOS.append(vfio)
            c = Controller(dev, alloc, name=name,
                           options=Options(io_queue_depth=64, interrupts=irq), device=vfio)
            c.init(1)
            await nvme_pcie.register_controller(target, name, f"0000:00:0{i}.0", c,
                                                {"name": name, "traddr": f"0000:00:0{i}.0"})
            # (the two sides' controllers have the same names: the registry of attached
            # controllers, which only RPCs look names up in, keeps neither)
            nvme_pcie._CONTROLLERS.pop(name, None)

    return attach


_attach = attacher()


def _bdevs(workdir: Any) -> list[dict[str, Any]]:
    return [
        {"method": "bdev_null_create", "params": {"name": "N0", "num_blocks": 1024,
                                                  "block_size": 512}},
        {"method": "bdev_split_create", "params": {"base_bdev": "Cn1", "split_count": 2}},
        {"method": "bdev_passthru_create", "params": {"base_bdev_name": "Dn1", "name": "PD"}},
    ]


def _contents(bdev: Any) -> bytes | None:
    owner = getattr(bdev, "owner", None)
    if isinstance(owner, nvme_pcie.PcieController):
        return bytes(owner.ctrlr.mmio.storage[bdev.ns.nsid])
    return None


def _queues(side: Any) -> Iterator[Any]:
    for b in side.target.bdevs:
        owner = getattr(b, "owner", None)
        if isinstance(owner, nvme_pcie.PcieController):
            yield from owner.queues.values()


def _pending(side: Any) -> bool:
    return any(rq.q.outstanding or rq.q.waiting for rq in _queues(side))


NVME_LAYOUT = Layout(bdevs=_bdevs, namespaces=NAMESPACES, compared=COMPARED,
                     contents=_contents, ordered=False, setup=_attach, pending=_pending)


@pytest.fixture(autouse=True)
def _fakes() -> Iterator[None]:
    if not LANE_NVME:
        pytest.fail("the C lane was built without its NVMe backend")
    yield
    stop_fakes()


def _pair(opts: dict[str, Any] | None = None, **kw: Any) -> Pair:
    p = Pair(opts or OPTS, layout=NVME_LAYOUT, **kw)
    for side in (p.ref, p.fast):
        for rq in _queues(side):
            assert rq.lane_ctx is not None  # (the ring state is C's on both sides)
    return p


def _lane_io(p: Pair) -> int:
    return sum(rq.lane_reads + rq.lane_writes for rq in _queues(p.fast))


@pytest.mark.parametrize("icreq", ["plain", "all"])
@pytest.mark.parametrize("opts", [OPTS, SMALL_CHUNK], ids=["chunk=mdts", "chunk=8k"])
def test_cases_match_python(opts: dict[str, Any], icreq: str) -> None:
    """test_fastpath's case table on NVMe: every case between a read and a write, the
    lane taking what it takes (reads, writes in capsule and by R2T, FUA, Flush, on the
    device, split and passthru over it, and null beside them)."""
    ic = ICREQS[icreq]
    with encoding(ic):
        p = _pair(opts, icreq=ic)
        try:
            for i, case in enumerate(CASES):
                cid = 100 + i * 3
                before = p.taken()
                p.feed(rd(cid, 1, i) + case.build(cid + 1) + wr(cid + 2, 1, 200 + i))
                p.check()
                if not p.ref.io.closed and (p.ref.io.requests or p.ref.io.r2t_pending):
                    finish_r2t(p)
                if not (case.raw and ic.dgst):
                    assert p.taken() - before == (3 if case.take else 1), case.name
                if p.ref.io.closed:
                    p.close()
                    p = _pair(opts, icreq=ic)
            assert _lane_io(p) > 0  # (the device was used by the lane, not a copy)
        finally:
            p.close()


def _sides(p: Pair) -> tuple[Any, Any]:
    return p.ref, p.fast


def _dev(side: Any, name: str) -> MemBarNvme:
    return side.bdev(name).owner.ctrlr.mmio


def test_random_streams_match_python() -> None:
    """Random mixes of good and bad commands (none overlapping another in flight with
    it), then the data of the writes waiting for it, in random pieces."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from test_fastpath import HYP, _r2t_answers, streams
    from test_fastpath_uring import _apart

    totals = [0, 0]
    ic = ICREQS["all"]

    @settings(HYP, max_examples=25)
    @given(streams(), st.data())
    def run(s: tuple[bytes, list[int]], more: Any) -> None:
        data = _apart(s[0])
        p = _pair(SMALL_CHUNK, icreq=ic)
        try:
            cut = more.draw(st.integers(0, len(data)))
            p.feed(*(x for x in (data[:cut], data[cut:]) if x))
            p.check()
            if not p.ref.io.closed and p.ref.io.r2t_pending:
                answers = _apart(_r2t_answers(p, more.draw, extra=False))
                cut = more.draw(st.integers(1, max(len(answers) - 1, 1)))
                p.feed(answers[:cut], answers[cut:])
                p.check()
            totals[0] += p.taken()
            totals[1] += 1
        finally:
            p.close()
            stop_fakes()

    with encoding(ic):
        run()
    assert totals[0] > totals[1] // 2, f"{totals[0]} lane commands in {totals[1]} runs"


def test_many_outstanding_complete_in_any_order() -> None:
    """A queue's worth of reads, writes and flushes at once on several namespaces: the
    lane holds its share of the device's command ids, the rest of the commands go the
    Python path's way through the same queue pair, and all are answered."""
    p = _pair(sqsize=127)
    try:
        stream = b"".join(
            (rd(i, 2, i % 96, 1 + i % 4 if i % 96 + 4 <= 96 else 1) if i % 3 == 0 else
             wr(i, 1, (i // 3) * 12, 1 + i % 8) if i % 3 == 1 else
             cmd(FLUSH, i, 5, sgl_len=0) if i % 9 == 2 else rd(i, 6, i % 200, 8))
            for i in range(120))
        p.feed(stream)
        p.check()
        # each queue pair has 63 command ids, 31 of them the lane's: once a namespace's
        # are all at the device, the rest of the receive buffer is the Python path's
        taken = p.taken()
        assert 31 <= taken < 120
        assert sum(rq.q.submitted for rq in _queues(p.fast)) >= 120 - taken
        assert p.fast.io._lane.inflight == 0
        for rq in _queues(p.fast):
            assert rq.lane_ctx.lane_inflight == 0 and rq.lane_ctx.bufs_out == 0
    finally:
        p.close()


def test_r2t_writes_and_fua() -> None:
    """Writes by R2T (data in one H2CData and in two), in capsule, with FUA: the device
    gets the host's FUA bit, the contents and statistics are the Python path's."""
    p = _pair()
    try:
        seen: list[int] = []
        dev = _dev(p.fast, "Bn1")
        orig = dev._io

        def spy(raw: bytes) -> tuple[int, int]:
            seen.append(int.from_bytes(raw[48:52], "little"))
            return orig(raw)

        dev._io = spy  # type: ignore[method-assign]
        p.feed(wr(1, 2, 8, 4, data=b"") + wr(2, 1, 64, 40, data=b"", cdw12=FUA)
               + wr(3, 5, 0, 2, cdw12=FUA) + wr(4, 2, 20, 1, cdw12=FUA))
        p.check()
        r1, r2 = _r2ts(p)
        p.feed(wire(pdu.H2CData(1, r1.ttag, 0, pattern(r1.r2tl, 7), True))
               + wire(pdu.H2CData(2, r2.ttag, 0, pattern(r2.r2tl, 8)[:4096], False)))
        p.feed(wire(pdu.H2CData(2, r2.ttag, 4096, pattern(r2.r2tl, 8)[4096:], True)))
        p.check()
        p.feed(rd(5, 2, 8, 4) + rd(6, 1, 64, 40))
        p.check()
        assert p.taken() == 6
        assert _contents(p.fast.bdev("Bn1"))[8 * 4096:12 * 4096] == pattern(r1.r2tl, 7)
        assert sorted(x & FUA for x in seen) == [0, 0, FUA]  # write 1, read 5; write 4
    finally:
        p.close()


def test_errors_at_the_device_go_back_to_python() -> None:
    """The namespace shrinks under the bdev: the device fails reads and writes past its
    new end (LBA Out of Range); the lane gives them to the Python path, which does them
    again and answers with the device's status; the rest of the batch stays the lane's."""
    p = _pair()
    try:
        p.feed(rd(1, 2, 90) + wr(2, 2, 91))
        p.check()
        for side in _sides(p):
            _dev(side, "Bn1").blocks = 80
        p.feed(rd(3, 2, 85) + rd(4, 2, 1) + rd(6, 2, 79, 2) + wr(7, 2, 93) + rd(8, 1, 3))
        p.check()
        errors = p.ref.admin.ctrl.error_count
        assert errors == 3 and p.fast.admin.ctrl.error_count == errors
        assert p.taken() == 4  # (the first two, and the two good reads of the second feed)
        lane = p.fast.io._lane
        assert lane.inflight == 0 and lane.c.redo == 0
        for rq in _queues(p.fast):
            assert rq.lane_ctx.lane_inflight == 0 and rq.lane_ctx.bufs_out == 0
    finally:
        p.close()


def test_large_reads_are_sent_from_the_dma_buffer() -> None:
    """A read of 32 KiB or more (one C2HData PDU) goes to the socket from the very DMA
    buffer the device wrote, its header built in the page before the data; the buffer
    returns to the queue pair's pool once the transport lets go of it."""
    p = _pair()
    try:
        fast = p.fast
        kept: list[Any] = []
        tr = fast.tr
        orig = tr.writelines

        def writelines(bufs: Any) -> None:
            bufs = list(bufs)
            kept.extend(bufs)
            orig(bufs)

        tr.writelines = writelines  # type: ignore[method-assign]
        p.feed(rd(1, 1, 0, 64) + rd(2, 2, 0, 8) + rd(3, 2, 9, 1))
        p.check()
        rq = next(rq for rq in _queues(fast) if rq.owner.name == "A")
        lo = min(w.vaddr for w, _ in rq.q.cring.bufs)
        hi = max(w.vaddr + w.size for w, _ in rq.q.cring.bufs)
        ffi_ = fastlane.ffi
        inside = [b for b in kept
                  if lo <= int(ffi_.cast("uintptr_t", ffi_.from_buffer(b))) < hi]
        assert len(inside) == 1 and len(inside[0]) == 24 + 32768  # header + the data
        assert rq.lane_ctx.bufs_out == 1  # (the transport still holds it)
        kept.clear()
        inside.clear()
        import gc

        gc.collect()
        assert rq.lane_ctx.bufs_out == 0
    finally:
        p.close()


def _wait(p: Pair, cond: Any, timeout: float = 10.0, what: str = "") -> None:
    """Run the loop (not waiting for I/O to finish, as Pair.feed does) until cond()."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not reached: {what}"
        p.loop.run_until_complete(asyncio.sleep(0.002))


def _feed_nowait(p: Pair, data: bytes) -> None:
    for side in _sides(p):
        side.io.data_received(data)
    p.loop.run_until_complete(asyncio.sleep(0))


def test_reset_with_lane_commands_at_the_device() -> None:
    """The device holds the commands; the controller is reset under them. The Python
    path re-submits its own after the reset; the lane's go back to the Python path,
    which does them once the queue is back: every command is answered once, as the
    reference answers it. Then the lane serves the queue again."""
    p = _pair()
    try:
        for side in _sides(p):
            _dev(side, "Bn1").hold_io = 4
        _feed_nowait(p, rd(1, 2, 1) + rd(2, 2, 2, 2) + wr(3, 2, 3) + rd(4, 2, 40, 8))
        _wait(p, lambda: all(len(_dev(s, "Bn1").held) == 4 for s in _sides(p)), what="held")
        rq = next(rq for rq in _queues(p.fast) if rq.owner.name == "B")
        assert rq.lane_ctx.lane_inflight == 4
        for side in _sides(p):
            owner = side.bdev("Bn1").owner
            p.loop.run_until_complete(owner.reset())
            assert owner.ctrlr.resets == 1, owner.ctrlr.last_reset
            print(side is p.fast, owner.ctrlr.last_reset)
        for side in _sides(p):
            side.settle()
        p.check()
        assert rq.lane_ctx.lane_inflight == 0 and rq.lane_ctx.bufs_out == 0
        assert p.taken() == 0  # (all four were done again by the Python path)
        p.feed(rd(5, 2, 1) + wr(6, 2, 7))
        p.check()
        assert p.taken() == 2
    finally:
        p.close()


def test_no_lane_while_the_controller_resets() -> None:
    """While the queue pair is suspended for a reset the lane starts nothing (the C side
    refuses, per command): the Python path queues the command until the queue is back.
    A removed device's namespaces are not the lane's at all."""
    p = _pair()
    try:
        side = p.fast
        p.feed(rd(9, 2, 0))  # (the channel and its queue pair are made on first use)
        side.tr.out.clear()
        rq = next(rq for rq in _queues(side) if rq.owner.name == "B")
        rq.q.suspend()
        side.io.data_received(rd(1, 2, 3))
        p.loop.run_until_complete(asyncio.sleep(0.05))
        assert p.taken() == 1 and rq.q.waiting and not side.tr.out
        rq.q.resume()
        side.settle()
        assert side.tr.out[0] == 0x07 and p.taken() == 1
        side.io.data_received(rd(2, 2, 3))
        side.settle()
        assert p.taken() == 2  # (the same table: the lane serves the queue again)
        ch = side.io.channel_of(side.sub.namespaces[2])[1]
        assert ch.lane_target() is not None
        side.bdev("Bn1").owner.ctrlr.removed = True
        assert ch.lane_target() is None
        side.bdev("Bn1").owner.ctrlr.removed = False
    finally:
        p.close()


def test_lane_command_past_its_timeout_is_aborted_and_done_again() -> None:
    """A lane command the device sits on: past the I/O timeout the controller sends an
    Abort for its command id (the lane's clock is kept in C); the device aborts it; the
    lane hands it to the Python path, which does it again; the host gets its data."""
    p = _pair()
    try:
        side = p.fast
        ctrlr = side.bdev("Bn1").owner.ctrlr
        ctrlr.opts.io_timeout_s = 0.2
        dev = _dev(side, "Bn1")
        dev.hold_io = 1
        side.io.data_received(rd(1, 2, 5, 2))
        _wait(p, lambda: ctrlr.aborts_sent == 1, what="an Abort")
        _wait(p, lambda: len(side.tr.out) >= 24 + 8192, what="the answer")
        side.settle()
        c2h = bytes(side.tr.out)
        assert c2h[0] == 0x07 and c2h[24:24 + 8192] == bytes(dev.storage[1][5 * 4096:7 * 4096])
        assert side.admin.ctrl.error_count == 0
        rq = next(rq for rq in _queues(side) if rq.owner.name == "B")
        assert rq.lane_ctx.lane_inflight == 0 and side.io._lane.inflight == 0
        assert rq.lane_reads == 1 and rq.q.submitted == 1  # once by each path
    finally:
        p.close()


def test_connection_closed_with_io_at_the_device() -> None:
    """The host goes away while the lane's commands are at the device: the lane is
    freed only once the device is done with its buffers, which all come back; the
    reactor's budget is whole at once."""
    p = _pair()
    try:
        side = p.fast
        dev = _dev(side, "Bn1")
        dev.hold_io = 8
        side.io.data_received(b"".join(wr(i, 2, 2 * i, 2) for i in range(4))
                              + b"".join(rd(100 + i, 2, 40 + 8 * i, 8) for i in range(4)))
        _wait(p, lambda: len(dev.held) == 8, what="held")
        lane = side.io._lane
        assert lane.c.io_inflight == 8
        rq = next(rq for rq in _queues(side) if rq.owner.name == "B")
        side.io.connection_lost(None)
        assert side.io._lane is None and side.io.budget.used == 0
        assert rq.zombies == {lane}
        dev.release_held()
        _wait(p, lambda: not rq.zombies, what="the lane freed")
        assert lane.c is None and rq.lane_ctx.lane_inflight == 0 and rq.lane_ctx.bufs_out == 0
        assert bytes(dev.storage[1][0:8192]) == pattern(8192, 0)  # (the writes were done)
    finally:
        p.close()


def test_backend_kinds_agree_with_c() -> None:
    """bdev.LANE_* are enum bt_backend's numbers (bt_lane.h)."""
    from blocktarget import bdev

    lib = fastlane.lib
    assert (bdev.LANE_MEM, bdev.LANE_NULL, bdev.LANE_URING, bdev.LANE_NVME) == (
        lib.BT_BE_MEM, lib.BT_BE_NULL, lib.BT_BE_URING, lib.BT_BE_NVME)


def test_device_removed_under_lane_commands() -> None:
    """The device vanishes (registers read all ones) with commands at it: the Python
    path fails its own with ABORTED_SQ_DELETION, the lane hands its own back and the
    Python path fails them the same way; what comes after is the Python path's too."""
    p = _pair()
    try:
        p.feed(rd(9, 2, 0))  # (the queue pairs are made on first use)
        for side in _sides(p):
            _dev(side, "Bn1").hold_io = 2
            side.bdev("Bn1").owner.ctrlr.on_removed = None  # (no namespace removal here)
        _feed_nowait(p, rd(1, 2, 1) + rd(2, 2, 5, 2))
        _wait(p, lambda: all(len(_dev(s, "Bn1").held) == 2 for s in _sides(p)), what="held")
        rq = next(rq for rq in _queues(p.fast) if rq.owner.name == "B")
        assert rq.lane_ctx.lane_inflight == 2
        for side in _sides(p):
            _dev(side, "Bn1").removed = True
        _wait(p, lambda: all(not _pending(s) and not s.io.requests for s in _sides(p)),
              what="answered")
        p.check()
        assert p.ref.admin.ctrl.error_count == 2
        assert rq.lane_ctx.dead and rq.lane_ctx.lane_inflight == 0 and rq.lane_ctx.bufs_out == 0
        before = p.taken()
        p.feed(rd(3, 2, 1) + wr(4, 2, 2))
        p.check()
        assert p.taken() == before and p.ref.admin.ctrl.error_count == 4
    finally:
        p.close()
