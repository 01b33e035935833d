"""Zero-copy between NVMe/TCP and the user-space NVMe driver, over the fake controller.

A real target (reactor threads on uvloop, a TCP listener on 127.0.0.1) exports a
namespace of ``FakeNvme`` (tests/unit/test_nvme_driver.py: a PCIe controller model that
reads and writes our DMA memory only through its fake IOMMU and its own PRP walker). The
peer is the project's NVMe/TCP initiator, or a raw socket where the test needs to stop
half-way through a transfer. What is proven:

* write data is received into the very DMA buffer the device's PRPs point at, and read
  data is sent from the buffer the device wrote (no copy; the driver counters agree);
* a large H2CData payload is received by the kernel itself into that buffer: no
  user-space copy and no Python ``bytes`` for it (rx_direct_bytes, bytes seen by
  data_received), digests checked over the DMA memory;
* every lent buffer comes back: after each I/O, with digests on, when the host
  disconnects in the middle of an R2T transfer, and when the host stops reading (the
  buffer stays lent while the socket holds its bytes, then returns).

Budget: about 3 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_nvme_driver import FakeIommu, FakeNvme

from blocktarget.bdevs import nvme_pcie
from blocktarget.nvme import pdu, spec
from blocktarget.nvme.driver.ctrlr import Controller
from blocktarget.nvme.driver.dma import DmaAllocator
from blocktarget.nvme.structs import build_connect_data, build_connect_sqe, build_sqe, parse_cqe

NQN = "nqn.2026-01.io.blocktarget.test:zerocopy"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
PSDT_SGL = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT
BS = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rig:
    """Target + fake controller + spies on the lending hook and the device commands."""

    def __init__(self, target: Any, dev: FakeNvme, port: int) -> None:
        self.target = target
        self.dev = dev
        self.port = port
        self.lent: list[nvme_pcie.LentBuffer] = []
        self.lent_bufs: list[Any] = []  # the DmaBuffer each lent one wraps
        self.submits: list[tuple[int, int, Any]] = []  # (opcode, prp1, DmaBuffer)

    @property
    def pc(self) -> nvme_pcie.PcieController:
        return nvme_pcie.get_controller("Zc")

    def counters(self) -> dict[str, int]:
        return self.pc.data_path_counters()

    def in_use(self) -> int:
        """Pool buffers out of every live queue (lent or under a command)."""
        return sum(rq.q.pool.in_use for rq in self.pc.queues.values())

    async def settle(self, cond: Any, timeout: float = 5.0, what: str = "not reached") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"{what}: {self.counters()}"
            await asyncio.sleep(0.01)

    async def queue_gone(self, cntlid: int, qid: int) -> None:
        """Until the target has dropped I/O queue ``qid`` of controller ``cntlid`` (its
        close reaches the target's reactor asynchronously; a Connect for that qid before
        then is refused as already connected)."""
        ctrl = self.target.controllers.find(NQN, cntlid)
        await self.settle(lambda: qid not in ctrl.qpairs)


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    from blocktarget.app import Target
    from blocktarget.config import Settings
    from blocktarget.rpc import call_method

    t = Target(Settings(cores=sorted(os.sched_getaffinity(0))[:1], rpc_http=None,
                        rpc_unix=None, metrics=False, pin=False))
    await t.start()
    iommu = FakeIommu()
    alloc = DmaAllocator(iommu, name="zc", use_hugepages=False)
    dev = FakeNvme(iommu, blocks=8192)  # 4 MiB, MDTS 128 KiB
    c = Controller(dev, alloc, name="Zc")
    c.init(1)
    port = _free_port()
    r = Rig(t, dev, port)

    orig_lend = nvme_pcie.ReactorQueue.lend

    def lend(self: nvme_pcie.ReactorQueue, nbytes: int) -> Any:
        got = orig_lend(self, nbytes)
        if got is not None:
            r.lent.append(got)
            r.lent_bufs.append(got.buf)
        return got

    monkeypatch.setattr(nvme_pcie.ReactorQueue, "lend", lend)
    await nvme_pcie.register_controller(t, "Zc", "0000:00:07.0", c,
                                        {"name": "Zc", "traddr": "0000:00:07.0"})
    for method, params in (
        ("nvmf_create_transport", {"trtype": "TCP"}),
        ("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": True}),
        ("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "Zcn1"}}),
        ("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": {
            "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}}),
    ):
        await call_method(t, method, params)
    yield r
    await t.stop()


def _spy_submits(rig: Rig) -> None:
    """Record opcode, PRP1 and buffer of every I/O command the bdev submits."""
    for rq in rig.pc.queues.values():
        q = rq.q
        orig = q.submit

        def submit(opcode: int, nsid: int = 0, *, orig: Any = orig, **kw: Any) -> None:
            rig.submits.append((opcode, kw.get("prp1", 0), kw.get("buf")))
            orig(opcode, nsid, **kw)

        q.submit = submit  # type: ignore[method-assign]


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 17 + (i >> 9)) & 0xFF for i in range(n))


@pytest.mark.parametrize("digests", [False, True])
async def test_write_and_read_move_through_dma_memory_without_copies(rig: Rig,
                                                                     digests: bool) -> None:
    from blocktarget.host.controller import connect

    ctrl = await connect("127.0.0.1", rig.port, NQN, hostnqn=HOSTNQN, nr_io_queues=1,
                         hdgst=digests, ddgst=digests)
    try:
        # the first write creates the reactor's hardware queue (spied on from then on);
        # it is zero-copy already: the qpair opens the channel when it sends the R2T
        await ctrl.write(1, 0, _pattern(16 * 1024, 99))
        _spy_submits(rig)
        before = rig.counters()
        assert before["zero_copy_writes"] == 1 and before["copied_writes"] == 0, before
        rig.lent.clear()
        rig.lent_bufs.clear()
        sizes = [16 * 1024, 64 * 1024, 128 * 1024, 12 * 1024 + 512]  # beyond in-capsule
        lba = 64
        written = []
        for i, n in enumerate(sizes):
            data = _pattern(n, i)
            await ctrl.write(1, lba, data)
            written.append((lba, data))
            lba += n // BS + 8
        for lba, data in written:
            got = await ctrl.read(1, lba, len(data) // BS)
            assert bytes(got) == data
            assert rig.dev.storage[1][lba * BS:lba * BS + len(data)] == data
        after = rig.counters()
    finally:
        await ctrl.disconnect()
    k = len(sizes)
    assert after["zero_copy_writes"] - before["zero_copy_writes"] == k, after
    assert after["zero_copy_reads"] - before["zero_copy_reads"] == k, after
    assert after["copied_writes"] == before["copied_writes"], "a write was copied"
    assert after["copied_reads"] == before["copied_reads"], "a read was copied"
    # the device read each write's data from the buffer it was received into
    writes = [(prp1, buf) for op, prp1, buf in rig.submits if op == spec.IoOpcode.WRITE]
    assert len(writes) == k
    assert len(rig.lent) == k, "one lent buffer per R2T write, none more"
    for (prp1, buf), lb, lent_buf in zip(writes, rig.lent, rig.lent_bufs, strict=True):
        assert lb.buf is None, "released after the command"
        assert buf is lent_buf and prp1 == lent_buf.iova, \
            "the command's PRPs point at the memory the data was received into"
    await rig.settle(lambda: rig.counters()["lent_buffers"] == 0 and rig.in_use() == 0)


def _raw(sock: socket.socket, p: Any, digests: bool = False) -> None:
    sock.sendall(_wire(p, digests))


def _wire(p: Any, digests: bool = False) -> bytes:
    return b"".join(bytes(b) for b in pdu.encode(p, hdgst=digests, ddgst=digests))


def _recv_pdu(sock: socket.socket, dec: pdu.Decoder, pending: list[Any]) -> Any:
    while not pending:
        data = sock.recv(1 << 20)
        assert data, "target closed the connection"
        pending.extend(dec.feed(data))
    return pending.pop(0)


def _raw_io_queue(port: int, cntlid: int, digests: bool = False,
                  ) -> tuple[socket.socket, pdu.Decoder, list[Any]]:
    """An I/O queue (qid 2) by hand: ICReq (header and data digests if ``digests``),
    Fabrics Connect."""
    from blocktarget.host.controller import default_hostid

    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    dec = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
    pending: list[Any] = []
    _raw(sock, pdu.ICReq(dgst=pdu.DGST_HEADER | pdu.DGST_DATA if digests else 0))
    assert type(_recv_pdu(sock, dec, pending)) is pdu.ICResp
    dec.set_digests(digests, digests)
    hostid = default_hostid(HOSTNQN)  # the admin queue's, as the initiator sent it
    _raw(sock, pdu.CapsuleCmd(build_connect_sqe(0, 2, 31, 0),
                              build_connect_data(hostid, cntlid, NQN, HOSTNQN)), digests)
    resp = _recv_pdu(sock, dec, pending)
    assert type(resp) is pdu.CapsuleResp and parse_cqe(resp.cqe).status == 0
    return sock, dec, pending


async def test_abort_and_disconnect_mid_r2t_release_the_lent_buffer(rig: Rig) -> None:
    from blocktarget.host.controller import connect

    ctrl = await connect("127.0.0.1", rig.port, NQN, hostnqn=HOSTNQN, nr_io_queues=2)
    try:
        await ctrl.write(1, 0, bytes(4096), qid=1)  # opens the channel
        cntlid = ctrl.cntlid
        # the initiator holds qid 1 and 2; take qid 2's place on a raw socket: close it
        ctrl.io_queues[1].close()
        await rig.queue_gone(cntlid, 2)
        sock, dec, pending = await asyncio.to_thread(_raw_io_queue, rig.port, cntlid)
        n = 64 * 1024

        # Abort of a write waiting for its data: failed at once, buffer released, and
        # the rest of its data (the host may already be sending it) consumed quietly
        sqe = build_sqe(spec.IoOpcode.WRITE, 6, 1, flags=PSDT_SGL, sgl_len=n,
                        sgl_id=spec.SGL_ID_TRANSPORT, cdw10=300, cdw12=n // BS - 1)
        await asyncio.to_thread(_raw, sock, pdu.CapsuleCmd(sqe, b""))
        r2t = await asyncio.to_thread(_recv_pdu, sock, dec, pending)
        assert type(r2t) is pdu.R2T and r2t.cccid == 6
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 1)
        await asyncio.to_thread(_raw, sock, pdu.H2CData(cccid=6, ttag=r2t.ttag, datao=0,
                                                        data=b"\x11" * 4096, last=False))
        r = await ctrl.admin(spec.AdminOpcode.ABORT, cdw10=2 | 6 << 16)
        assert r.completion.dw0 & 1 == 0, "aborted"
        resp = await asyncio.to_thread(_recv_pdu, sock, dec, pending)
        cqe = parse_cqe(resp.cqe)
        assert cqe.cid == 6 and spec.status_sc(cqe.status) == spec.GenericStatus.ABORTED_BY_REQUEST
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 0)
        await asyncio.to_thread(_raw, sock, pdu.H2CData(cccid=6, ttag=r2t.ttag, datao=4096,
                                                        data=b"\x22" * (n - 4096), last=True))

        # disconnect in the middle of a transfer
        sqe = build_sqe(spec.IoOpcode.WRITE, 7, 1, flags=PSDT_SGL, sgl_len=n,
                        sgl_id=spec.SGL_ID_TRANSPORT, cdw10=100, cdw12=n // BS - 1)
        await asyncio.to_thread(_raw, sock, pdu.CapsuleCmd(sqe, b""))
        r2t = await asyncio.to_thread(_recv_pdu, sock, dec, pending)
        assert type(r2t) is pdu.R2T and r2t.r2tl == n
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 1)
        half = pdu.H2CData(cccid=7, ttag=r2t.ttag, datao=0, data=b"\xab" * (n // 2),
                           last=False)
        await asyncio.to_thread(_raw, sock, half)
        await rig.settle(lambda: rig.lent[-1].mem[:n // 2] == b"\xab" * (n // 2))
        assert rig.counters()["lent_buffers"] == 1, "held while the data is arriving"
        sock.close()
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 0)
        assert rig.lent[-1].buf is None
        assert rig.dev.storage[1][100 * BS:101 * BS] == bytes(BS), "never written"
        assert rig.dev.storage[1][300 * BS:301 * BS] == bytes(BS), "aborted: never written"
    finally:
        await ctrl.disconnect()
    await rig.settle(lambda: rig.in_use() == 0)


async def test_read_buffer_is_held_until_the_socket_has_taken_it(rig: Rig) -> None:
    """A host that stops reading: the lent read buffers stay out (the transport still
    holds views of them) and come back, with the right data, once it reads again."""
    from blocktarget.host.controller import connect

    ctrl = await connect("127.0.0.1", rig.port, NQN, hostnqn=HOSTNQN, nr_io_queues=1)
    try:
        data = _pattern(128 * 1024, 5)
        await ctrl.write(1, 0, data)
        qp = ctrl.io_queues[0]
        tr = qp._transport  # (the initiator keeps it private)
        tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        tr.pause_reading()
        reads = [asyncio.ensure_future(ctrl.read(1, 0, 256)) for _ in range(40)]
        # (the target serves the reads in its own time; a loaded machine may take a while)
        await rig.settle(lambda: rig.counters()["lent_buffers"] > 0,
                         what="lent buffers were released while the socket still held them")
        held = rig.counters()["lent_buffers"]
        assert held > 0, "lent buffers were released while the socket still held them"
        cap = next(iter(rig.pc.queues.values())).lend_cap
        assert held <= cap, "at most half the queue's pool is lent"
        assert not any(r.done() for r in reads[-5:])
        tr.resume_reading()
        for got in await asyncio.gather(*reads):
            assert bytes(got) == data
        c = rig.counters()
        assert c["zero_copy_reads"] >= held
        assert c["zero_copy_reads"] + c["copied_reads"] == 40
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 0)
    finally:
        await ctrl.disconnect()
    await rig.settle(lambda: rig.in_use() == 0)


def test_lent_buffer_release_is_idempotent() -> None:
    """Released from two paths (teardown and a late completion) it goes back once."""

    class Q:
        def __init__(self) -> None:
            self.back: list[Any] = []
            self.max_transfer = 4096

        def put_buffer(self, b: Any) -> None:
            self.back.append(b)

    class RQ:
        lent = 1
        rx_direct_bytes = 0
        rx_copied_bytes = 0

        def __init__(self) -> None:
            self.q = Q()

        def put_buffer(self, b: Any) -> None:
            self.q.put_buffer(b)

    rq = RQ()
    buf = type("B", (), {"mem": memoryview(bytearray(4096))})()
    lb = nvme_pcie.LentBuffer(rq, buf, 512)  # type: ignore[arg-type]
    assert len(lb.mem) == 512
    lb.release()
    lb.release()
    assert rq.q.back == [buf] and rq.lent == 0


async def test_controller_reset_resubmits_with_the_lent_buffer(rig: Rig) -> None:
    """A zero-copy write and read held by the device across a controller reset are
    re-submitted with the same PRPs (the lent buffer stays with the command) and
    complete with the right data; nothing is lent afterwards."""
    from blocktarget.host.controller import connect

    ctrl = await connect("127.0.0.1", rig.port, NQN, hostnqn=HOSTNQN, nr_io_queues=1)
    try:
        await ctrl.write(1, 0, bytes(4096 * 4))  # creates the queue
        data = _pattern(128 * 1024, 42)
        rig.dev.hold_io = 1
        w = asyncio.ensure_future(ctrl.write(1, 1024, data))
        await rig.settle(lambda: bool(rig.dev.held))
        assert rig.counters()["lent_buffers"] == 1
        await nvme_pcie.reset_pcie(rig.target, "Zc")
        await asyncio.wait_for(w, 10)
        assert rig.dev.storage[1][1024 * BS:1024 * BS + len(data)] == data
        rig.dev.hold_io = 1
        r = asyncio.ensure_future(ctrl.read(1, 1024, 256))
        await rig.settle(lambda: bool(rig.dev.held))
        await nvme_pcie.reset_pcie(rig.target, "Zc")
        assert bytes(await asyncio.wait_for(r, 10)) == data
        assert rig.pc.ctrlr.resets == 2
        c = rig.counters()
        assert c["zero_copy_writes"] >= 2 and c["zero_copy_reads"] == 1, c
        assert c["copied_writes"] == 0 and c["copied_reads"] == 0, c
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 0)
    finally:
        await ctrl.disconnect()
    await rig.settle(lambda: rig.in_use() == 0)


@pytest.mark.parametrize("digests", [False, True])
async def test_large_h2c_payload_is_received_by_the_kernel_into_the_lent_buffer(
        rig: Rig, digests: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An H2CData payload with >= DIRECT_RX_MIN bytes still to come once its header is
    in is read by the kernel straight into the lent DMA buffer: only the header and the
    payload bytes that came with it pass through Python bytes (data_received) and are
    copied; the rest never does. Sent in pieces with pauses, so the payload takes
    several socket reads. Also: a corrupt data digest over the DMA memory fails the
    command and keeps the connection; an abort in the middle keeps the buffer lent
    until the kernel is done writing into it; a disconnect in the middle releases it."""
    from blocktarget.host.controller import connect
    from blocktarget.nvme import qpair as qpair_mod

    fed = [0]  # bytes the raw queue (qid 2) got as Python bytes objects
    direct = [0]  # bytes the kernel received for it straight into lent memory
    orig_received = qpair_mod.Qpair.data_received
    orig_direct = qpair_mod.Qpair._direct_received

    def data_received(self: Any, data: bytes, frozen: bool = False) -> None:
        if self.qid == 2:
            fed[0] += len(data)
        orig_received(self, data, frozen)

    def direct_received(self: Any, nbytes: int) -> None:
        if self.qid == 2:
            direct[0] += nbytes
        orig_direct(self, nbytes)

    monkeypatch.setattr(qpair_mod.Qpair, "data_received", data_received)
    monkeypatch.setattr(qpair_mod.Qpair, "_direct_received", direct_received)
    n, first = 128 * 1024, 1000
    assert n - first >= qpair_mod.DIRECT_RX_MIN

    def write_cmd(cid: int, lba: int) -> pdu.CapsuleCmd:
        sqe = build_sqe(spec.IoOpcode.WRITE, cid, 1, flags=PSDT_SGL, sgl_len=n,
                        sgl_id=spec.SGL_ID_TRANSPORT, cdw10=lba, cdw12=n // BS - 1)
        return pdu.CapsuleCmd(sqe, b"")

    async def send(sock: socket.socket, data: bytes) -> None:
        """Send one piece and wait until the target has read all of it, so that the
        next piece arrives in a separate socket read (no fixed sleeps: CI may be slow)."""
        want = fed[0] + direct[0] + len(data)
        await asyncio.to_thread(sock.sendall, data)
        await rig.settle(lambda: fed[0] + direct[0] >= want)
        assert fed[0] + direct[0] == want

    def pieces(wire: bytes, payload_at: int, cut: int) -> list[bytes]:
        """Header + ``first`` payload bytes, then the rest in ``cut``-byte pieces."""
        head = payload_at + first
        return [wire[:head]] + [wire[i:i + cut] for i in range(head, len(wire), cut)]

    ctrl = await connect("127.0.0.1", rig.port, NQN, hostnqn=HOSTNQN, nr_io_queues=2)
    try:
        await ctrl.write(1, 0, bytes(4096), qid=1)  # opens the channel
        cntlid = ctrl.cntlid
        ctrl.io_queues[1].close()  # qid 2 is taken over by a raw socket
        await rig.queue_gone(cntlid, 2)
        sock, dec, pending = await asyncio.to_thread(_raw_io_queue, rig.port, cntlid,
                                                     digests)

        async def r2t_for(cid: int, lba: int) -> pdu.R2T:
            await asyncio.to_thread(_raw, sock, write_cmd(cid, lba), digests)
            r2t = await asyncio.to_thread(_recv_pdu, sock, dec, pending)
            assert type(r2t) is pdu.R2T and r2t.cccid == cid and r2t.r2tl == n
            return r2t

        async def status(cid: int) -> int:
            resp = await asyncio.to_thread(_recv_pdu, sock, dec, pending)
            cqe = parse_cqe(resp.cqe)
            assert cqe.cid == cid
            return cqe.status

        # 1. the payload in four pieces: 1000 bytes with the header, then 3 reads
        payload = _pattern(n, 7)
        r2t = await r2t_for(5, 500)
        wire = _wire(pdu.H2CData(5, r2t.ttag, 0, payload, last=True), digests)
        payload_at = wire.index(payload[:64])
        before, fed0 = rig.counters(), fed[0]
        for piece in pieces(wire, payload_at, 44 * 1024):
            await send(sock, piece)
        assert await status(5) == 0
        after = rig.counters()
        assert rig.dev.storage[1][500 * BS:500 * BS + n] == payload
        assert after["rx_direct_bytes"] - before["rx_direct_bytes"] == n - first, after
        assert after["rx_copied_bytes"] - before["rx_copied_bytes"] == first, after
        assert after["zero_copy_writes"] - before["zero_copy_writes"] == 1
        # through Python bytes: the header (and digests), the first 1000 bytes; no more
        assert fed[0] - fed0 == payload_at + first + (4 if digests else 0)

        if digests:  # 2. data digest (computed over the DMA memory) wrong
            r2t = await r2t_for(6, 900)
            wire = bytearray(_wire(pdu.H2CData(6, r2t.ttag, 0, payload, last=True), True))
            wire[-1] ^= 0xFF
            for piece in pieces(bytes(wire), payload_at, 64 * 1024):
                await send(sock, piece)
            assert spec.status_sc(await status(6)) == \
                spec.GenericStatus.TRANSIENT_TRANSPORT_ERROR
            assert rig.dev.storage[1][900 * BS:901 * BS] == bytes(BS), "never written"
            await rig.settle(lambda: rig.counters()["lent_buffers"] == 0)

        # 3. abort while the kernel receives into the buffer: it stays lent until the
        # payload is complete (nothing else may get that memory meanwhile)
        r2t = await r2t_for(7, 1300)
        wire = _wire(pdu.H2CData(7, r2t.ttag, 0, payload, last=True), digests)
        parts = pieces(wire, payload_at, 64 * 1024)
        await send(sock, parts[0])
        await send(sock, parts[1])
        r = await ctrl.admin(spec.AdminOpcode.ABORT, cdw10=2 | 7 << 16)
        assert r.completion.dw0 & 1 == 0, "aborted"
        assert spec.status_sc(await status(7)) == spec.GenericStatus.ABORTED_BY_REQUEST
        await asyncio.sleep(0.05)
        assert rig.counters()["lent_buffers"] == 1, "released while still receiving"
        for piece in parts[2:]:
            await send(sock, piece)
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 0)
        assert rig.dev.storage[1][1300 * BS:1301 * BS] == bytes(BS), "aborted: not written"

        # 4. disconnect in the middle of a payload received directly
        r2t = await r2t_for(8, 1700)
        wire = _wire(pdu.H2CData(8, r2t.ttag, 0, payload, last=True), digests)
        parts = pieces(wire, payload_at, 20000)
        c0 = rig.counters()
        await send(sock, parts[0])
        await send(sock, parts[1])
        assert rig.counters()["lent_buffers"] == 1
        assert rig.lent[-1].mem[:first + 20000] == payload[:first + 20000]
        sock.close()
        await rig.settle(lambda: rig.counters()["lent_buffers"] == 0)
        c1 = rig.counters()
        assert c1["rx_direct_bytes"] - c0["rx_direct_bytes"] == 20000, c1
        assert rig.lent[-1].buf is None
        assert rig.dev.storage[1][1700 * BS:1701 * BS] == bytes(BS), "never written"
    finally:
        await ctrl.disconnect()
    await rig.settle(lambda: rig.in_use() == 0)
