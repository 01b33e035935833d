"""CPU cost of the target's per-command Python path, in process, without sockets.

A real `Target` (malloc bdev, 4 KiB blocks) and a real `Qpair` are brought up through
ICReq, admin Connect, CC.EN and an I/O queue Connect, exactly as a host would; then
batches of `--batch` read (or write) capsules are fed to `data_received` as one chunk,
the way one socket wake-up delivers them at QD32, and the flush runs. The figure is
process CPU µs per command. It leaves out what the kernel and uvloop cost (socket
reads and writes), so it is the part of `vs_spdk.py`'s "target CPU µs/IO" that this
code controls, measured without the other engineers' load moving it: use it to judge a
hot-path change, and vs_spdk.py for the whole figure.

    .venv/bin/python bench/hotpath.py [--ops 200000] [--batch 32] [--size 4096] [--write]
        [--digests] [--python-path] [--backend malloc|null|split|uring-shm|uring-disk|uring-loop|pmem|nvme]
        [--pmem-python-engine] [--socket [--spin]]

`--backend` puts another bdev behind the namespace: null, a split part of a malloc bdev,
or a uring bdev on a file in /dev/shm (tmpfs: the page cache is the device) or on the
checkout's disk (O_DIRECT where the file system allows it), or on a loop block device
over a /dev/shm file (`uring-loop`: issue 15's "kernel block device" row; the bench
attaches it and detaches it, see loopdev.py; it needs root and /dev/loop-control). With io_uring the loop runs
until every command is answered, completions noticed through the ring's eventfd only
(no busy polling, whose spinning would count as CPU): the figure is the CPU the target
spends per command, the kernel's share for the file included, waiting excluded. The reactor thread's own
CPU is given apart from the other threads' (io_uring's io-wq workers, to which the kernel
punts the I/O a file system cannot do without blocking: tmpfs reads and writes, ext4
writes): that difference is device time, while what the kernel does inline in the
reactor's io_uring_enter (ext4 page-cache reads) stays in the reactor's figure.

`pmem` is a pmem pool on /dev/shm: tmpfs, so `pmem_is_pmem` is false and every BTT step
msyncs; run with PMEM_IS_PMEM_FORCE=1 in the environment for the cache-flush path of
real persistent memory. Its BTT runs in C (csrc/be_pmem.c) on both paths when the
extension is built; `--pmem-python-engine` gives the Python path the Python BTT instead.

`--backend nvme` puts a PCIe NVMe namespace behind it: the user-space driver over a fake
controller (doorbells in memory, the driver's DMA memory behind a fake IOMMU) whose I/O
queues a C model serves (tests/unit/cfake_nvme.py: it watches the SQ doorbells, copies
through the PRPs, posts completions with the phase bit, GIL-free). Where the reactor does
not spin, the model completes what was rung between the loop's turns, untimed; with
--spin it runs on a thread of its own, as hardware does, and the reactor's C poller reaps
its completions in the call that submitted them. Either way the figure is the target's
CPU per command (the lane's SQEs, doorbell, CQ polling, or the Python path's), the
device's excluded (its thread's CPU is printed apart); the clock is the reactor thread's.
`--nvme-device csync` has the C model complete the commands at their doorbell, inside the
target's own C call (the queue pair's doorbell hook, bt_nvme.h's db_hook; no thread), as
an SSD done within the poller's sweep: a batch is reaped and answered in the call that
submitted it, whatever the poll mode, and the model's CPU in those calls (its own clock,
CLOCK_THREAD_CPUTIME_ID around its work) is subtracted from the reactor's.
`--nvme-device python` takes the unit tests' Python model instead (MemBarNvme, served
between turns, or on a Python thread with --spin): the harness of the figures before
this option, whose device model's allocations and cache footprint weighed on the timed
turns (bench/RESULTS.md, "The NVMe lane against a device model in C").

`--socket` serves the I/O queue pair over a real loopback TCP connection instead of
feeding `data_received`: the queue pair lends its socket to the reactor's C poller
(csrc/net.c) as in the target, so the figure is the steady state of a served
connection: the poller's receive, lane and send calls, the NVMe queue pairs' sweep by the
poller, and the Python glue between them; the kernel's socket work on the reactor's
thread is in it (the host's side, in the same thread, is not: only the event loop's
turns are timed, with the thread's CPU clock). Reads and in-capsule writes.
`--spin` runs the reactor as the target does by default (poll mode "adaptive"): the C
poller keeps polling, the GIL released, for the reactor's busy-poll window after its
last work instead of returning at once, so a batch's NVMe completions are reaped in the
call that submitted it; the fake device then runs in a thread of its own (as hardware
does, its time not the reactor thread's), and the poller's spinning with nothing to do
(its idle_ns, as bench/dataplane.py's "C spin") and the CPU of its sleeps waiting for the
device (device_wait_us slices: a timer set and taken, ≈ 17-40 µs of CPU each on this VM,
as long as the device takes) are subtracted from the figure. `--device-wait-us 0` makes
the poller spin for the device instead (that spinning then counts as idle).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any

from blocktarget.app import Target
from blocktarget.config import Settings
from blocktarget.nvme import pdu, spec
from blocktarget.nvme.qpair import Qpair
from blocktarget.nvme.structs import (
    build_connect_data,
    build_connect_sqe,
    build_property_set_sqe,
    build_sqe,
)
from blocktarget.reactor import Reactor

try:
    from blocktarget.reactor import tune_allocator
except ImportError:  # older trees (A/B runs against a checkout without it)
    tune_allocator = None  # type: ignore[assignment]

NQN = "nqn.2026-01.io.blocktarget:hotpath"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100"
HOSTID = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100").bytes
PSDT_SGL = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT
BLOCKS = 65536


class CountingTransport:
    """Counts what would go to the socket; keeps nothing, as a drained socket would."""

    def __init__(self) -> None:
        self.bufs = 0
        self.nbytes = 0
        self.last = bytearray()
        self.keep = True

    def writelines(self, bufs: Any) -> None:
        for b in bufs:
            self.bufs += 1
            self.nbytes += len(b)
            if self.keep:
                self.last += b

    def write(self, b: Any) -> None:
        self.writelines([b])

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 4420)}.get(
            name, default)


def _sys_time() -> float:
    """The process's system CPU seconds, to the microsecond (os.times() rounds to 10 ms,
    0.2 µs per command over 50,000 commands: coarser than what it is meant to show)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def wire(p: pdu.Pdu, qp: Qpair) -> bytes:
    return b"".join(bytes(b) for b in pdu.encode(p, hdgst=qp.hdgst, ddgst=qp.ddgst))


BACKENDS = ("malloc", "null", "split", "uring-shm", "uring-disk", "uring-loop", "pmem", "nvme")
# uring-loop: the loop device run() attached for this run ({"dev": loopdev.LoopDevice})
LOOP: dict[str, Any] = {}


# --lvol: namespace 1 is a thick logical volume of BLOCKS blocks on the backend's bdev
# (which then has LVOL_EXTRA more, for the store's metadata), 4 MiB clusters
LVOL: dict[str, Any] = {"on": False, "cow": None, "cluster": 4 << 20}
LVOL_EXTRA = 2048
LVOL_COW_BATCHES = 512  # distinct batches of --lvol-cow (32 x 512 writes: every cluster)


def backend_bdevs(backend: str, workdir: str) -> list[dict[str, Any]]:
    """The bdev RPCs that make namespace 1's bdev "M0" of BLOCKS 4 KiB blocks (with
    --lvol, the base of the volume: LVOL_EXTRA more)."""
    blocks = _blocks()
    return [_with_blocks(e, blocks) for e in _backend_bdevs(backend, workdir, blocks)]


def _blocks() -> int:
    blocks = BLOCKS + (LVOL_EXTRA if LVOL["on"] else 0)
    if LVOL["cow"] is not None:
        blocks += BLOCKS  # (room for the copies)
    return blocks


def _with_blocks(entry: dict[str, Any], blocks: int) -> dict[str, Any]:
    p = entry["params"]
    if "num_blocks" in p and p["num_blocks"] == BLOCKS:
        return {**entry, "params": {**p, "num_blocks": blocks}}
    return entry


def _backend_bdevs(backend: str, workdir: str, blocks: int) -> list[dict[str, Any]]:
    if backend == "nvme":  # (the controller is attached by setup(): "NVn1")
        return [{"method": "bdev_passthru_create",
                 "params": {"base_bdev_name": "NVn1", "name": "M0"}}]
    if backend == "malloc":
        return [{"method": "bdev_malloc_create",
                 "params": {"name": "M0", "num_blocks": BLOCKS, "block_size": 4096}}]
    if backend == "null":
        return [{"method": "bdev_null_create",
                 "params": {"name": "M0", "num_blocks": BLOCKS, "block_size": 4096}}]
    if backend == "split":  # the second half of a malloc bdev twice the size
        return [{"method": "bdev_malloc_create",
                 "params": {"name": "MB", "num_blocks": 2 * BLOCKS, "block_size": 4096}},
                {"method": "bdev_split_create", "params": {"base_bdev": "MB", "split_count": 2}},
                {"method": "bdev_passthru_create",
                 "params": {"base_bdev_name": "MBp1", "name": "M0"}}]
    if backend == "pmem":
        from blocktarget.bdevs import pmem

        path = os.path.join(workdir, "hotpath.pool")
        pmem.create_pool_file(path, BLOCKS, 4096, lanes=1)
        pool, fd = pmem.open_pool(path)  # every block written: reads copy, not zero-fill
        try:
            chunk = memoryview(bytes(range(256)) * (1 << 12))  # 256 blocks
            for lba in range(0, BLOCKS, 256):
                pool.write(0, lba, 256, chunk)
        finally:
            pool.close()
            os.close(fd)
        return [{"method": "bdev_pmem_create", "params": {"name": "M0", "pmem_file": path}}]
    if backend == "uring-loop":  # the device setup() attached, over such a file
        path = LOOP["dev"].path
    else:
        path = os.path.join(workdir, "hotpath.img")
        with open(path, "wb") as f:  # allocated, so reads do not just see holes
            os.posix_fallocate(f.fileno(), 0, blocks * 4096)
    return [{"method": "bdev_uring_create",
             "params": {"name": "M0", "filename": path, "block_size": 4096}}]


def _attach_loop(workdir: str, blocks: int) -> str:
    """A loop device over a file of `blocks` 4 KiB blocks in workdir, for this run
    (run() detaches it); its path."""
    import loopdev

    backing = os.path.join(workdir, "hotpath.img")
    with open(backing, "wb") as f:  # allocated, so reads do not just see holes
        os.posix_fallocate(f.fileno(), 0, blocks * 4096)
    try:
        LOOP["dev"] = loopdev.LoopDevice(backing)
    except OSError as exc:  # (no root, no loop driver: say so, no trace)
        raise SystemExit(f"--backend uring-loop: {exc}") from None
    return LOOP["dev"].path


def setup(loop: asyncio.AbstractEventLoop, digests: bool, backend: str = "malloc",
          workdir: str = "") -> tuple[Target, Reactor, Any]:
    allowed = [workdir]
    if backend == "uring-loop":  # the bdev's file: the device, outside workdir
        allowed.append(_attach_loop(workdir, _blocks()))
    target = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False,
                             pin=False, allowed_dirs=allowed if workdir else None))
    if backend == "nvme":
        loop.run_until_complete(_attach_fake_nvme(target))
    ns_bdev = "M0"
    if LVOL["on"]:
        loop.run_until_complete(target.apply_config(
            {"subsystems": [{"subsystem": "bdev", "config": backend_bdevs(backend, workdir)}]},
            "hotpath-base"))
        ns_bdev = loop.run_until_complete(_thick_volume(target))
    doc = {"subsystems": [
        {"subsystem": "bdev", "config": [] if LVOL["on"] else backend_bdevs(backend, workdir)},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": ns_bdev, "nsid": 1}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": {
                 "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}},
        ]},
    ]}
    try:
        loop.run_until_complete(target.apply_config(doc, "hotpath"))
    finally:
        for dev in FAKE_DEVICES if backend == "nvme" else ():
            dev.stop()
            dev.thread = None
            dev._stop.clear()
    addr = next(iter(target.subsystems.find(NQN).listeners))
    reactor = Reactor(index=0, core=0, pin=False)
    # (the host's end runs on this thread: a C poller waiting for its next command would
    # only wait out its time; set, not passed, so an older tree's Reactor takes it too)
    reactor.host_wait_us = 0
    reactor.loop = loop
    reactor.tid = threading.get_native_id()
    return target, reactor, addr


FAKE_DEVICES: list[Any] = []


async def _thick_volume(target: Target) -> str:
    """A store on M0 and a thick volume of BLOCKS blocks on it (every cluster mapped:
    the figure is the cluster lookup's, not allocation's); its alias."""
    from blocktarget.rpc import call_method

    await call_method(target, "bdev_lvol_create_lvstore",
                      {"bdev_name": "M0", "lvs_name": "lvs", "cluster_sz": LVOL["cluster"],
                       "clear_method": "none"})
    await call_method(target, "bdev_lvol_create",
                      {"lvs_name": "lvs", "lvol_name": "v", "size_in_mib": BLOCKS * 4096 >> 20,
                       "thin_provision": False})
    return "lvs/v"


# --nvme-device: "c", the C device model on a thread of its own (tests/unit/cfake_nvme.py),
# or "python", the unit tests' Python model served between the loop's turns
NVME_DEVICE: dict[str, Any] = {"kind": "c", "wait_us": None, "spin_us": 20000}


def _is_c_device(dev: Any) -> bool:
    return hasattr(dev, "cpu_ns")


async def _attach_fake_nvme(target: Target) -> None:
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "tests", "unit"))
    from test_nvme_driver import FakeIommu, MemBarNvme

    from blocktarget.bdevs import nvme_pcie
    from blocktarget.nvme.driver.ctrlr import Controller
    from blocktarget.nvme.driver.dma import DmaAllocator

    if NVME_DEVICE["kind"] in ("c", "csync"):
        from cfake_nvme import CNvme, DeviceIommu

        iommu: Any = DeviceIommu()
        # (--spin: the model's thread spins through the gaps between batches, as a
        # controller's own silicon is always there: a doorbell is seen at once)
        dev: Any = CNvme(iommu, blocks=BLOCKS, block_size=4096, mqes=127,
                         spin_us=NVME_DEVICE["spin_us"], sync=NVME_DEVICE["kind"] == "csync")
    else:
        iommu = FakeIommu()
        dev = MemBarNvme(iommu, thread=False, blocks=BLOCKS, block_size=4096, mqes=127)
    alloc = DmaAllocator(iommu, name="hotpath", use_hugepages=False)
    c = Controller(dev, alloc, name="NV")
    c.init(1)
    if not _is_c_device(dev):
        # the device answers from a thread while the bdevs are made (a volume store's
        # examine reads them from the control plane, which no reactor turn serves here);
        # setup() stops it: then it is served only between reactor turns
        dev.thread = threading.Thread(target=dev._run, name="fake-nvme", daemon=True)
        dev.thread.start()
    await nvme_pcie.register_controller(target, "NV", "0000:00:09.0", c,
                                        {"name": "NV", "traddr": "0000:00:09.0"})
    nvme_pcie._CONTROLLERS.pop("NV", None)  # (each run attaches its own)
    FAKE_DEVICES[:] = [dev]


def _start_devices(spin: bool) -> bool:
    """--socket: which devices run on threads of their own from now on (with --spin:
    the C model, spinning while it has work as a controller's own silicon would, or the
    Python one), the others served between the loop's turns, untimed; whether any is."""
    serve = False
    for dev in FAKE_DEVICES:
        if getattr(dev, "sync", False):
            continue  # (done at the doorbell, in the target's call: nothing to serve)
        if not spin:
            serve = True
        elif _is_c_device(dev):
            dev.start()
        else:
            dev.POLL_S = 0.00002
            dev.thread = threading.Thread(target=dev._run, name="fake-nvme", daemon=True)
            dev.thread.start()
    return serve


def _devices_cpu_ns() -> int:
    return sum(dev.cpu_ns() for dev in FAKE_DEVICES if _is_c_device(dev))


def _devices_sync_ns() -> int:
    """The synchronous devices' CPU so far, spent inside the reactor's calls."""
    return sum(dev.sync_cpu_ns() for dev in FAKE_DEVICES if getattr(dev, "sync", False))


def connect(loop: asyncio.AbstractEventLoop, target: Target, reactor: Reactor, addr: Any,
            qid: int, cntlid: int, digests: bool) -> Qpair:
    tr = CountingTransport()
    qp = Qpair(target, reactor, addr)
    qp.connection_made(tr)  # type: ignore[arg-type]
    dg = (pdu.DGST_HEADER | pdu.DGST_DATA) if digests else 0
    qp.data_received(wire(pdu.ICReq(dgst=dg), qp))
    qp.data_received(wire(pdu.CapsuleCmd(build_connect_sqe(1, qid, 127, 0), build_connect_data(
        HOSTID, cntlid, NQN, HOSTNQN)), qp))
    if qid == 0:
        cc = (spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT)
              | (spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT))
        qp.data_received(wire(pdu.CapsuleCmd(build_property_set_sqe(2, spec.Property.CC, cc)),
                              qp))
    loop.run_until_complete(asyncio.sleep(0))
    assert qp.ctrl is not None, "connect failed"
    return qp


def _nothing() -> None:
    pass


class HostSocket:
    """The host's end of a loopback connection whose target end a Qpair serves."""

    def __init__(self, loop: asyncio.AbstractEventLoop, qp: Qpair) -> None:
        import socket

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        host = socket.create_connection(lsock.getsockname())
        srv, _ = lsock.accept()
        lsock.close()
        for sk in (host, srv):  # (a batch of writes in one send; no blocking)
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        # both ends, as the target sets on the connections it accepts: without it on
        # the target's end, Nagle held the second part of a batch's replies (a batch
        # answered in two sends: completions arriving while C reaps) until the host's
        # delayed ACK, and the loop slept in epoll up to the 0.2 s fold timer
        for sk in (host, srv):
            sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host.setblocking(False)
        self.sock = host
        self.loop = loop
        self.got = 0
        loop.run_until_complete(loop.connect_accepted_socket(lambda: qp, srv))

    def send(self, data: bytes) -> None:
        mv = memoryview(data)
        while mv:
            try:
                n = self.sock.send(mv)
            except BlockingIOError:
                self.turn()
                continue
            mv = mv[n:]

    def pull(self) -> int:
        """Bytes received since the last call (nothing kept: the host drops them)."""
        n = 0
        while True:
            try:
                b = self.sock.recv(1 << 20)
            except BlockingIOError:
                return n
            if not b:
                raise ConnectionError("the target closed the connection")
            n += len(b)

    def turn(self, block: bool = False) -> None:
        """One iteration of the event loop, as a running loop makes it (asyncio's own
        step: no run_forever()/stop() around each, whose start-up per call is not the
        target's cost and would weigh on a backend that needs two turns per batch).
        ``block``: the turn waits in epoll for something to do, as the target's loop
        does, instead of returning at once (see ``exchange``)."""
        once = getattr(self.loop, "_run_once", None)
        if once is None:  # (another loop: one run_forever() per turn)
            self.loop.call_soon(self.loop.stop)
            self.loop.run_forever()
            return
        if not block:
            self.loop.call_soon(_nothing)  # (a turn that never blocks in epoll)
        asyncio.events._set_running_loop(self.loop)
        try:
            once()
        finally:
            asyncio.events._set_running_loop(None)

    serve_devices = True  # (False: the devices run in threads of their own)
    # the timed CPU by a turn's place in its batch: the first, the second, any later one
    by_turn = [0.0, 0.0, 0.0]
    turns = 0  # the loop's turns in exchange(), to report them per batch

    def exchange(self, data: bytes, expect: int, timed: list[float]) -> None:
        """Send ``data``, run the loop until ``expect`` bytes came back (the loop's turns
        timed with the thread's CPU clock, the fake devices served between them).

        Turns block in epoll, as the target's loop does, unless a fake device must be
        served between them (it would never complete a command the loop waits for):
        turns that never blocked spun while io-wq did a tmpfs read (uring-shm: 5 turns
        per batch of 32, 4 of them empty), counting the wait for the device as the
        reactor's CPU (bench/RESULTS.md, "Where the io_uring and NVMe lanes' CPU per
        command goes")."""
        self.send(data)
        clock = time.thread_time
        got = 0
        deadline = time.monotonic() + 30
        block = not (self.serve_devices and FAKE_DEVICES)
        nth = 0
        while got < expect:
            c0 = clock()
            self.turn(block)
            self.turns += 1
            dt = clock() - c0
            timed[0] += dt
            self.by_turn[min(nth, 2)] += dt
            nth += 1
            got += self.pull()
            if self.serve_devices:
                for dev in FAKE_DEVICES:
                    dev.service()
            if time.monotonic() > deadline:
                raise AssertionError(f"the host got {got} of {expect} bytes")


def connect_socket(loop: asyncio.AbstractEventLoop, target: Target, reactor: Reactor,
                   addr: Any, cntlid: int) -> tuple[Qpair, HostSocket]:
    """The I/O queue pair over a loopback socket (see --socket)."""
    qp = Qpair(target, reactor, addr)
    host = HostSocket(loop, qp)
    timed = [0.0]
    host.exchange(wire(pdu.ICReq(), qp), 128, timed)
    host.exchange(wire(pdu.CapsuleCmd(build_connect_sqe(1, 1, 127, 0), build_connect_data(
        HOSTID, cntlid, NQN, HOSTNQN)), qp), 24, timed)
    assert qp.ctrl is not None, "connect failed"
    return qp, host


def deliver(qp: Qpair, data: bytes, reads: int, copy: bool) -> None:
    """Hand ``data`` to the queue pair as the event loop would: whole (``reads`` 0), or
    in socket reads of ``reads`` bytes, each either read into the queue pair's receive
    arena (get_buffer/buffer_updated, what the target does) or, with ``copy``, copied
    into a new bytes first (what a plain Protocol under uvloop gets). Both therefore copy
    once here: into the arena stands for the kernel's copy (not ours on a real socket),
    into bytes for the event loop's (ours), so equal figures mean the arena saves one
    user-space copy per byte received."""
    if not reads:
        qp.data_received(data)
        return
    mv = memoryview(data)
    off = 0
    while off < len(data):
        if copy or not hasattr(qp, "buffer_updated"):
            piece = mv[off : off + reads]
            qp.data_received(bytes(piece))
        else:  # a read takes what fits in the room it is given, as recv_into does
            room = qp.get_buffer(-1)
            piece = mv[off : off + min(reads, len(room))]
            room[: len(piece)] = piece
            qp.buffer_updated(len(piece))
        off += len(piece)


def _settle(loop: asyncio.AbstractEventLoop, io: Qpair, reactor: Reactor,
            timed: list[float] | None = None) -> None:
    """Run the loop until no command of ``io`` is outstanding (io_uring: completions;
    NVMe: the fake device is given its turn between loop turns, outside ``timed``)."""
    from blocktarget.bdevs import uring

    ring = uring._Ring._rings.get(reactor)
    clock = time.thread_time
    # io_uring: the loop sleeps until the ring's eventfd says completions are there (a
    # turn of the loop per check would spin this thread while the kernel works, and
    # count that as the target's CPU); the timer only guards against a missed wake-up
    sleep = ring is not None and ring.efd >= 0 and not FAKE_DEVICES
    if sleep and not getattr(ring, "_bench_wakes", False):
        on_efd = ring._on_eventfd

        def woken() -> None:
            on_efd()
            loop.stop()

        loop.remove_reader(ring.efd)
        loop.add_reader(ring.efd, woken)
        ring._bench_wakes = True
    while True:
        lane = getattr(io, "_lane", None)
        busy = io.requests or (lane is not None and lane.inflight) or (
            ring is not None and (ring.ops or ring.lane_busy()))
        if not busy:
            return
        for dev in FAKE_DEVICES:
            dev.service()
        c0 = clock()
        h = loop.call_later(0.005, loop.stop) if sleep else loop.call_soon(loop.stop)
        loop.run_forever()
        h.cancel()
        if timed is not None:
            timed[0] += clock() - c0


def run(ops: int, batch: int, size: int, write: bool, digests: bool,
        lane: bool = True, reads: int = 0, copy: bool = False,
        backend: str = "malloc", loop_kind: str = "asyncio", sock: bool = False,
        spin: bool = False) -> dict[str, float]:
    if tune_allocator is not None:
        tune_allocator()  # as ReactorPool.start() does in the target
    if loop_kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    workdir = ""
    if backend.startswith("uring"):
        from blocktarget.bdevs import uring

        uring.REAP_MODE = "eventfd"  # no busy polling: its spinning is not work
        base = ("/dev/shm" if backend in ("uring-shm", "uring-loop")
                else os.path.dirname(os.path.abspath(__file__)))
        workdir = tempfile.mkdtemp(prefix="bt-hotpath-", dir=base)
    elif backend == "pmem":
        workdir = tempfile.mkdtemp(prefix="bt-hotpath-", dir="/dev/shm")
    try:
        if sock:
            return _run_socket(loop, ops, batch, size, write, lane, backend, workdir, spin)
        return _run(loop, ops, batch, size, write, digests, lane, reads, copy, backend, workdir)
    finally:
        if "dev" in LOOP:
            LOOP.pop("dev").close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(loop: asyncio.AbstractEventLoop, ops: int, batch: int, size: int, write: bool,
         digests: bool, lane: bool, reads: int, copy: bool, backend: str,
         workdir: str) -> dict[str, float]:
    target, reactor, addr = setup(loop, digests, backend, workdir)
    admin = connect(loop, target, reactor, addr, 0, spec.CNTLID_DYNAMIC, digests)
    io = connect(loop, target, reactor, addr, 1, admin.ctrl.cntlid, digests)  # type: ignore[union-attr]
    if not lane and hasattr(io, "_lane"):
        io._lane = None  # the Python path, as `c_fast_path: false` gives
    nlb = size // 4096
    opcode = spec.IoOpcode.WRITE if write else spec.IoOpcode.READ
    r2t = write and size > io.icd_limit  # data through R2T / H2CData, as 128 KiB writes
    icd = write and not r2t
    def batch_at(salt: int) -> bytes:
        return b"".join(
            wire(pdu.CapsuleCmd(build_sqe(opcode, cid, 1, flags=PSDT_SGL, sgl_len=size,
                                          sgl_id=spec.SGL_ID_INCAPSULE if icd
                                          else spec.SGL_ID_TRANSPORT,
                                          cdw10=((cid + salt * batch) * 7919 * nlb)
                                          % (BLOCKS - nlb), cdw12=nlb - 1),
                                bytes([cid & 0xFF]) * size if icd else b""), io)
            for cid in range(batch))

    # --lvol-cow: batches at other blocks each round (the same ones on both sides of the
    # A/B), so the run reaches every cluster; else one batch, over and over
    chunks = [batch_at(i) for i in range(LVOL_COW_BATCHES if LVOL["cow"] is not None else 1)]
    chunk = chunks[0]
    if LVOL["cow"]:  # B: a snapshot now, so each cluster's first write copies it
        from blocktarget.rpc import call_method

        loop.run_until_complete(call_method(target, "bdev_lvol_snapshot", {
            "lvol_name": "lvs/v", "snapshot_name": "snap"}))
    tr = io.transport
    tr.keep = r2t  # type: ignore[union-attr]
    tr.last.clear()  # type: ignore[union-attr]  # the ICResp/Connect answers
    host = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
    host._ic_done = True
    host.set_digests(io.hdgst, io.ddgst)
    payload = memoryview(bytes(range(256)) * (size // 256))
    stop, run_once = loop.stop, loop.run_forever
    call_soon = loop.call_soon
    # (the NVMe fake device's time is its own: only the reactor thread's CPU counts)
    nvme = backend == "nvme"
    clock = time.thread_time if nvme else time.process_time
    rounds = max(ops // batch, 1)
    # the reactor's own thread (this one) apart from the process: the difference is the
    # other threads', io_uring's io-wq workers doing the I/O (device time, here)
    thread_clock = time.thread_time
    t0, cpu, rcpu = time.perf_counter(), 0.0, 0.0
    sys0 = _sys_time()
    for rnd in range(rounds):
        chunk = chunks[rnd % len(chunks)]
        c0, r0 = clock(), thread_clock()
        deliver(io, chunk, reads, copy)
        call_soon(stop)  # runs the flush the qpair scheduled, then returns
        run_once()
        if nvme:
            cpu += clock() - c0
            timed = [0.0]
            if not r2t:
                _settle(loop, io, reactor, timed)
            cpu += timed[0]
        else:
            if not r2t:
                _settle(loop, io, reactor)
            cpu += clock() - c0
            rcpu += thread_clock() - r0
        if r2t:  # the host's side (not timed): answer each R2T with one H2CData
            out = bytes(tr.last)  # type: ignore[union-attr]
            tr.last.clear()  # type: ignore[union-attr]
            h2c = b"".join(wire(pdu.H2CData(p.cccid, p.ttag, 0, payload, True), io)
                           for p in host.feed(out) if type(p) is pdu.R2T)
            c0, r0 = clock(), thread_clock()
            deliver(io, h2c, reads, copy)
            call_soon(stop)
            run_once()
            if nvme:
                cpu += clock() - c0
                timed = [0.0]
                _settle(loop, io, reactor, timed)
                cpu += timed[0]
            else:
                _settle(loop, io, reactor)
                cpu += clock() - c0
                rcpu += thread_clock() - r0
            tr.last.clear()  # type: ignore[union-attr]
    wall = time.perf_counter() - t0
    # system CPU: the kernel's part (for pmem on a file, its msyncs: the media's time,
    # which item 8's comparison with the malloc lane leaves out); the untimed host side of
    # the loop makes no system calls
    sys_s = _sys_time() - sys0
    n = rounds * batch
    assert not io.requests, "commands left unanswered"
    copied = 0
    if LVOL["cow"]:  # clusters the first writes after the snapshot copied
        vol = target.bdevs.get("lvs/v")
        copied = len(vol.store.md.volumes[vol.uuid].map)
    io.close("bench over")
    admin.close("bench over")
    _settle(loop, io, reactor)
    loop.close()
    if nvme:
        rcpu = cpu  # (its clock is the reactor thread's already)
    return {"ops": n, "cpu_us": cpu * 1e6 / n, "wall_us": wall * 1e6 / n,
            "reactor_us": rcpu * 1e6 / n, "other_us": max(cpu - rcpu, 0.0) * 1e6 / n,
            "bufs_per_op": tr.bufs / n,  # type: ignore[union-attr]
            "in_lane": getattr(reactor.stats, "c_lane_commands", 0) / n,
            # time in the C lane's calls (GIL released), per command
            "c_us": getattr(reactor.stats, "gil_released_ns", 0) / 1e3 / n,
            "sys_us": sys_s * 1e6 / n, "copied": copied}


def _run_socket(loop: asyncio.AbstractEventLoop, ops: int, batch: int, size: int,
                write: bool, lane: bool, backend: str, workdir: str,
                spin: bool = False) -> dict[str, float]:
    """--socket: the steady state of a connection served by the reactor's C poller."""
    if not lane:
        raise SystemExit("--socket measures the C poller: not with --python-path")
    target, reactor, addr = setup(loop, False, backend, workdir)
    if spin:
        reactor.set_poll_mode("adaptive")
        if NVME_DEVICE["wait_us"] is not None:
            reactor.device_wait_us = NVME_DEVICE["wait_us"]
    serve = _start_devices(spin)
    admin = connect(loop, target, reactor, addr, 0, spec.CNTLID_DYNAMIC, False)
    io, host = connect_socket(loop, target, reactor, addr, admin.ctrl.cntlid)  # type: ignore[union-attr]
    host.serve_devices = serve
    nlb = size // 4096
    opcode = spec.IoOpcode.WRITE if write else spec.IoOpcode.READ
    if write and size > io.icd_limit:
        raise SystemExit("--socket: writes in capsule only (up to the ICD limit)")
    chunk = b"".join(
        wire(pdu.CapsuleCmd(build_sqe(opcode, cid, 1, flags=PSDT_SGL, sgl_len=size,
                                      sgl_id=spec.SGL_ID_INCAPSULE if write
                                      else spec.SGL_ID_TRANSPORT,
                                      cdw10=(cid * 7919 * nlb) % (BLOCKS - nlb), cdw12=nlb - 1),
                            bytes([cid & 0xFF]) * size if write else b""), io)
        for cid in range(batch))
    # what the host gets per batch: a response per write; per read its C2HData PDUs
    # (the last with SUCCESS: no response), as the target is configured
    if write:
        expect = batch * 24
    else:
        pdus = -(-size // io.c2h_chunk)
        expect = batch * (size + 24 * pdus + (0 if io.c2h_success_ok else 24))
    warm = [0.0]
    for _ in range(4):  # (lent after the first answers: the steady state is timed)
        host.exchange(chunk, expect, warm)
    lent = io._net is not None
    if io._lane is not None:  # (a lent socket's counters are folded lazily: the warm-up's now)
        io._lane.fold()
    reactor.fold_stats()  # (and the C poller's own, as every reader does)
    st = reactor.stats
    lane0, rel0 = getattr(st, "c_lane_commands", 0), getattr(st, "gil_released_ns", 0)
    idle0 = st.net_idle_ns
    waits0 = getattr(st, "net_device_waits", 0)
    wcpu0 = getattr(st, "net_device_wait_ns", 0)
    rounds = max(ops // batch, 1)
    timed = [0.0]
    host.turns = 0
    host.by_turn = [0.0, 0.0, 0.0]
    dev0, sync0 = _devices_cpu_ns(), _devices_sync_ns()
    t0 = time.perf_counter()
    for _ in range(rounds):
        host.exchange(chunk, expect, timed)
    wall = time.perf_counter() - t0
    reactor.fold_stats()
    dev_cpu = (_devices_cpu_ns() - dev0) / 1e9  # (the C device's thread: not the reactor's)
    # (the synchronous device's work, inside the reactor's timed calls: the device's)
    dev_sync = (_devices_sync_ns() - sync0) / 1e9
    spun = (st.net_idle_ns - idle0) / 1e9  # (the C poller's spinning with nothing to do)
    # and its sleeps for the device (device_wait_us): waiting, the device's time
    dev_slept = (getattr(st, "net_device_wait_ns", 0) - wcpu0) / 1e9
    n = rounds * batch
    still_lent = io._net is not None
    # NVMe: the share of the lane's completions the C poller's sweep took
    ctxs = [rq.lane_ctx for b in target.bdevs for rq in getattr(
        getattr(b, "owner", None), "queues", {}).values() if rq.lane_ctx is not None]
    lane_reaped = sum(c.lane_reaped for c in ctxs)
    c_share = sum(c.c_reaped for c in ctxs) / lane_reaped if lane_reaped else None
    io.close("bench over")
    admin.close("bench over")
    for _ in range(5):
        host.turn()
    host.sock.close()
    if spin:
        for dev in FAKE_DEVICES:
            dev.stop()
    loop.close()
    return {"ops": n, "cpu_us": (timed[0] - spun - dev_slept - dev_sync) * 1e6 / n,
            "device_sync_us": dev_sync * 1e6 / n,
            "wall_us": wall * 1e6 / n, "spin_us": spun * 1e6 / n,
            "dev_wait_us": dev_slept * 1e6 / n, "turns": host.turns / rounds,
            "by_turn": [t * 1e6 / n for t in host.by_turn],
            "device_us": dev_cpu * 1e6 / n,
            "dev_waits": (getattr(st, "net_device_waits", 0) - waits0) / rounds,
            "bufs_per_op": 0.0, "lent": float(lent and still_lent), "c_reaped": c_share,
            "in_lane": (getattr(st, "c_lane_commands", 0) - lane0) / n,
            "c_us": (getattr(st, "gil_released_ns", 0) - rel0) / 1e3 / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--write", action="store_true",
                    help="writes: in-capsule up to 4 KiB, larger ones through R2T/H2CData")
    ap.add_argument("--digests", action="store_true", help="header and data digests")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--python-path", action="store_true",
                    help="C lane off (as `c_fast_path: false`); default: on where it applies")
    ap.add_argument("--reads", type=int, default=0,
                    help="deliver in socket reads of this many bytes through the receive "
                         "arena (0: one call per batch, no socket reads)")
    ap.add_argument("--copy-reads", action="store_true",
                    help="with --reads: copy each read into a new bytes (a plain Protocol "
                         "under uvloop) instead of reading into the arena")
    ap.add_argument("--backend", choices=BACKENDS, default="malloc",
                    help="the bdev behind the namespace (default: %(default)s)")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="the event loop (the reactors' is uvloop; asyncio's own loop, "
                         "the default here as in the earlier figures, costs more per turn: "
                         "io_uring's completions take a turn of their own)")
    ap.add_argument("--pmem-python-engine", action="store_true",
                    help="pmem: the BTT's Python methods instead of its C engine")
    ap.add_argument("--spin", action="store_true",
                    help="with --socket: poll mode adaptive, the C poller spinning for the "
                         "busy-poll window (its idle spinning subtracted); NVMe: the fake "
                         "device in a thread of its own")
    ap.add_argument("--nvme-device", choices=("c", "csync", "python"), default="c",
                    help="--backend nvme: the fake controller's I/O queues served by a C "
                         "model on a thread of its own, as hardware (default), by the C "
                         "model at the doorbell inside the target's call (csync: its CPU "
                         "there subtracted), or by the unit tests' Python model between "
                         "the loop's turns (the harness of the figures before it)")
    ap.add_argument("--device-wait-us", type=int, default=None,
                    help="--spin: the reactor's device_wait_us (default: the reactor's own, "
                         "10; 0: the C poller spins while the device works, and that "
                         "spinning is subtracted with the rest of its idle spinning)")
    ap.add_argument("--socket", action="store_true",
                    help="serve the queue pair over a loopback socket lent to the reactor's "
                         "C poller (reads and in-capsule writes)")
    ap.add_argument("--lvol", action="store_true",
                    help="A/B: the backend's bdev itself, then a thick logical volume on it "
                         "(4 MiB clusters), alternating --reps times; prints both and the "
                         "volume's CPU per command over the base's")
    ap.add_argument("--lvol-cow", action="store_true",
                    help="A/B on a thick volume: writes spread over all of it, then the same "
                         "writes right after a snapshot (each cluster's first write copies "
                         "it); prints the copy-on-write cost per cluster")
    ap.add_argument("--cluster-kib", type=int, default=4096,
                    help="--lvol-cow: the store's cluster size (default %(default)s KiB)")
    args = ap.parse_args()
    NVME_DEVICE.update(kind=args.nvme_device, wait_us=args.device_wait_us)
    if args.pmem_python_engine:
        from blocktarget.bdevs import pmem

        pmem.USE_C_ENGINE = False
    def once() -> dict[str, float]:
        return run(args.ops, args.batch, args.size, args.write, args.digests,
                   not args.python_path, args.reads, args.copy_reads, args.backend, args.loop,
                   args.socket, args.spin)

    if args.lvol_cow:
        LVOL["cluster"] = args.cluster_kib << 10
        return _lvol_cow_ab(args, once)
    if args.lvol:
        return _lvol_ab(args, once)
    res = [once() for _ in range(args.reps)]
    best = min(res, key=lambda r: r["cpu_us"])
    kind = "write" if args.write else "read"
    print(f"{args.backend} {kind} {args.size} B, batch {args.batch}, digests {args.digests}: "
          f"CPU µs/command min {best['cpu_us']:.2f} (runs: "
          + ", ".join(f"{r['cpu_us']:.2f}" for r in res) + f"), "
          f"of which in C (GIL released) {best['c_us']:.2f}, "
          + (f"socket lent to the C poller: {all(r['lent'] for r in res)}, "
             f"loop turns per batch {best['turns']:.2f} (CPU µs/command in a batch's "
             f"first, second, later turns: "
             + ", ".join(f"{t:.2f}" for t in best["by_turn"]) + "), "
             + (f"NVMe completions reaped by the C poller {best['c_reaped']:.0%}, "
                if best.get("c_reaped") is not None else "")
             + (f"the C device's thread {best['device_us']:.2f} (not counted), "
                if best.get("device_us") else "")
             + (f"the synchronous C device in the reactor's calls "
                f"{best['device_sync_us']:.2f} (subtracted), "
                if best.get("device_sync_us") else "")
             + (f"device-wait slices per batch {best['dev_waits']:.1f} "
                f"({best['dev_wait_us']:.2f} µs/command of CPU, subtracted), "
                if args.spin and args.backend == "nvme" else "") if args.socket
             else f"in the kernel {best['sys_us']:.2f}; the reactor thread "
                  f"{best['reactor_us']:.2f} (min {min(r['reactor_us'] for r in res):.2f}), "
                  f"other threads (io-wq: the kernel doing the I/O) {best['other_us']:.2f}; "
                  f"{res[0]['bufs_per_op']:.2f} buffers/command, ")
          + f"{res[0]['in_lane']:.0%} of commands in the C lane")
    return 0


def _lvol_ab(args: Any, once: Any) -> int:
    """Base and volume alternating (the other engineers' load moves both alike)."""
    base, vol = [], []
    for _ in range(args.reps):
        for on, out in ((False, base), (True, vol)):
            LVOL["on"] = on
            out.append(once())
    LVOL["on"] = False
    kind = "write" if args.write else "read"
    a = min(r["cpu_us"] for r in base)
    b = min(r["cpu_us"] for r in vol)
    print(f"{args.backend} {kind} {args.size} B, batch {args.batch}"
          f"{', socket' if args.socket else ''}: CPU µs/command, min of {args.reps}: "
          f"base {a:.2f} (" + ", ".join(f"{r['cpu_us']:.2f}" for r in base) + f"), "
          f"volume {b:.2f} (" + ", ".join(f"{r['cpu_us']:.2f}" for r in vol) + f"); "
          f"volume/base {b / a:.3f} (median of the pairs' ratios "
          f"{sorted(v['cpu_us'] / u['cpu_us'] for u, v in zip(base, vol, strict=True))[len(vol) // 2]:.3f}); "
          f"in the C lane: base {base[0]['in_lane']:.0%}, "
          f"volume {vol[0]['in_lane']:.0%}; in C (GIL released), min: base "
          f"{min(r['c_us'] for r in base):.3f}, volume {min(r['c_us'] for r in vol):.3f}")
    return 0


def _lvol_cow_ab(args: Any, once: Any) -> int:
    """The volume's write run as it is (A) and right after a snapshot (B), alternating:
    B's extra CPU over its copies is the copy-on-write cost per cluster."""
    if not args.write:
        raise SystemExit("--lvol-cow: a write run (--write)")
    LVOL["on"] = True
    plain, cow = [], []
    try:
        for _ in range(args.reps):
            for snap, out in ((False, plain), (True, cow)):
                LVOL["cow"] = snap
                out.append(once())
    finally:
        LVOL.update(on=False, cow=None)
    a = min(plain, key=lambda r: r["cpu_us"])
    b = min(cow, key=lambda r: r["cpu_us"])
    per_cluster = (b["cpu_us"] - a["cpu_us"]) * b["ops"] / b["copied"] if b["copied"] else 0
    wall = (b["wall_us"] - a["wall_us"]) * b["ops"] / b["copied"] if b["copied"] else 0
    print(f"{args.backend} {args.size} B random writes over a {BLOCKS * 4096 >> 20} MiB "
          f"thick volume, {args.cluster_kib} KiB clusters, {b['ops']} writes, batch "
          f"{args.batch}: CPU µs/command, min of {args.reps}: mapped {a['cpu_us']:.2f} ("
          + ", ".join(f"{r['cpu_us']:.2f}" for r in plain) + "), after a snapshot "
          f"{b['cpu_us']:.2f} (" + ", ".join(f"{r['cpu_us']:.2f}" for r in cow) + f"), "
          f"x{b['cpu_us'] / a['cpu_us']:.2f}; {b['copied']} clusters copied: "
          f"{per_cluster:.0f} µs CPU ({wall:.0f} µs wall) per copy-on-write; in the C lane: "
          f"mapped {a['in_lane']:.0%}, after a snapshot {b['in_lane']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
