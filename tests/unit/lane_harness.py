"""The differential harness of the C lane's tests: two real in-process targets side by
side, one with the lane (the default) and one with ``c_fast_path: false`` (the Python
path, the reference), each with an admin and an I/O queue pair brought up through ICReq,
Connect and CC.EN as a host would, fed the same bytes and compared (test_fastpath.py
says what is compared). A `Layout` says which bdevs back which namespaces; the default
is memory and null bdevs, test_fastpath_uring.py puts files behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import crc32c

from blocktarget.app import Target
from blocktarget.bdev import IOType
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

NQN = "nqn.2026-01.io.blocktarget.test:fastlane"
HOSTID = uuid.UUID("11111111-2222-3333-4444-555555555555")
HOSTNQN = f"nqn.2014-08.org.nvmexpress:uuid:{HOSTID}"
PSDT_SGL = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT
SGL_ICD = spec.SGL_ID_INCAPSULE
SGL_TR = spec.SGL_ID_TRANSPORT
READ, WRITE = int(spec.IoOpcode.READ), int(spec.IoOpcode.WRITE)
FLUSH, WZ = int(spec.IoOpcode.FLUSH), int(spec.IoOpcode.WRITE_ZEROES)
DSM, COMPARE = int(spec.IoOpcode.DATASET_MANAGEMENT), int(spec.IoOpcode.COMPARE)
FUA = 1 << 30
MDTS = 32768
ICD = 8192
# nsid -> (bdev, block size, blocks); nsid 3 is a null bdev, nsid 4 is attached only by
# the namespace test, nsid 5 is the second half of a split malloc ("MS", 64 blocks) and
# nsid 6 a passthru over a null bdev ("N1"). Every layout keeps these geometries, so the
# command builders below serve them all.
BDEVS = {1: ("M512", 512, 512), 2: ("M4K", 4096, 96), 3: ("N0", 512, 1024),
         4: ("MX", 4096, 32), 5: ("MSp1", 4096, 32), 6: ("PN", 512, 256)}
# every bdev whose memory and statistics are compared (the stacked ones and their bases)
ALL_BDEVS = [v[0] for v in BDEVS.values()] + ["MS", "MSp0", "N1"]
EXPORTED = (1, 2, 3, 5, 6)


def _memory_bdevs(workdir: Any) -> list[dict[str, Any]]:
    bdevs = [{"method": "bdev_null_create" if name.startswith("N") else "bdev_malloc_create",
              "params": {"name": name, "num_blocks": nb, "block_size": bs}}
             for name, bs, nb in BDEVS.values() if name not in ("MSp1", "PN")]
    return bdevs + [
        {"method": "bdev_malloc_create",
         "params": {"name": "MS", "num_blocks": 64, "block_size": 4096}},
        {"method": "bdev_split_create", "params": {"base_bdev": "MS", "split_count": 2}},
        {"method": "bdev_null_create", "params": {"name": "N1", "num_blocks": 256,
                                                  "block_size": 512}},
        {"method": "bdev_passthru_create", "params": {"base_bdev_name": "N1", "name": "PN"}},
    ]


@dataclass
class Layout:
    """What backs each namespace: the bdev RPCs (given the side's own directory), the
    nsid -> bdev name of each namespace, the bdevs whose statistics and contents are
    compared, and how to read a bdev's contents (None: it has none worth comparing)."""

    bdevs: Callable[[Any], list[dict[str, Any]]] = _memory_bdevs
    namespaces: dict[int, str] = field(default_factory=lambda: {n: BDEVS[n][0]
                                                                for n in EXPORTED})
    compared: list[str] = field(default_factory=lambda: list(ALL_BDEVS))
    contents: Callable[[Any], bytes | None] = (
        lambda b: bytes(b.mem) if b.host_memory() is not None else None)
    ordered: bool = True  # completions in command order (False: any order, async I/O)
    # run before the config (given the target and the side's directory): bdevs that no
    # RPC can make here (test_fastpath_nvme.py's fake PCIe controllers)
    setup: Callable[[Any, Any], Any] | None = None
    # I/O of the side still at a backend other than io_uring (None: none)
    pending: Callable[[Any], bool] | None = None


MEMORY = Layout()
OPTS = {"max_io_size": MDTS, "io_unit_size": MDTS, "in_capsule_data_size": ICD}
SMALL_CHUNK = {**OPTS, "io_unit_size": 8192}  # reads over 8 KiB: several C2HData PDUs


def pattern(n: int, seed: int) -> bytes:
    base = bytes((seed * 31 + i * 7) & 0xFF for i in range(256))
    return (base * (n // 256 + 1))[:n]


# How capsules and H2CData are encoded: what the connection under test negotiated
# (see `encoding`); plain by default.
WIRE: dict[str, Any] = {"hdgst": False, "ddgst": False, "pda": 0}


def wire(p: pdu.Pdu) -> bytes:
    return b"".join(bytes(b) for b in pdu.encode(p, **WIRE))


@contextlib.contextmanager
def encoding(icreq: pdu.ICReq) -> Any:
    """Build PDUs with the digests ``icreq`` asks for (the target grants them all)."""
    saved = dict(WIRE)
    WIRE.update(hdgst=icreq.header_digest, ddgst=icreq.data_digest)
    try:
        yield
    finally:
        WIRE.update(saved)


# ------------------------------------------------------------------ the two sides

class Tr:
    """Enough of asyncio.Transport for Qpair: keeps every byte and counts pauses. With
    ``pause_at`` set it plays a host that stops reading: once that many bytes were
    written it calls the protocol's pause_writing(), as a full socket buffer would."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False
        self.pauses = 0
        self.resumes = 0
        self.pause_at: int | None = None
        self.qp: Qpair | None = None

    def writelines(self, bufs: Any) -> None:
        for b in bufs:
            self.out += b
        if self.pause_at is not None and len(self.out) >= self.pause_at and self.qp:
            self.pause_at = None
            self.qp.pause_writing()

    def write(self, b: Any) -> None:
        self.out += b

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 4420)}.get(
            name, default)


class Side:
    """One real target with an admin and an I/O queue pair connected to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lane: bool, opts: dict[str, Any],
                 *, cattr: int = 0, icreq: pdu.ICReq | None = None, sqsize: int = 31,
                 layout: Layout = MEMORY, workdir: Any = None) -> None:
        self.loop = loop
        self.layout = layout
        self.target = Target(Settings(
            cores=[0], rpc_http=None, rpc_unix=None, metrics=False, pin=False,
            allowed_dirs=None if workdir is None else [str(workdir)]))
        if layout.setup is not None:
            loop.run_until_complete(layout.setup(self.target, workdir))
        bdevs = layout.bdevs(workdir)
        doc = {"subsystems": [
            {"subsystem": "bdev", "config": bdevs},
            {"subsystem": "nvmf", "config": [
                {"method": "nvmf_create_transport",
                 "params": {"trtype": "TCP", **opts, "c_fast_path": lane}},
                {"method": "nvmf_create_subsystem",
                 "params": {"nqn": NQN, "allow_any_host": True, "ana_reporting": True}},
                *({"method": "nvmf_subsystem_add_ns",
                   "params": {"nqn": NQN, "namespace": {"bdev_name": name, "nsid": n}}}
                  for n, name in layout.namespaces.items()),
                {"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": {
                     "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                     "trsvcid": "4420"}}}]}]}
        loop.run_until_complete(self.target.apply_config(doc, "fastlane-test"))
        self.sub = self.target.subsystems.find(NQN)
        self.addr = next(iter(self.sub.listeners))
        # (host_wait_us 0: the host's end runs on the loop's own thread, so a C poller
        # waiting for its next command would only wait out its time)
        self.reactor = Reactor(index=0, core=0, pin=False, host_wait_us=0)
        self.reactor.loop = loop
        self.reactor.tid = threading.get_native_id()
        for i, name in enumerate(ALL_BDEVS):
            b = self.target.bdevs.find(name)
            if b is not None and b.host_memory() is not None:
                b.mem[:] = pattern(len(b.mem), i + 1)  # reads return something non-trivial
        self.admin, _ = self._connect(0, spec.CNTLID_DYNAMIC, 0, pdu.ICReq())
        assert self.admin.ctrl is not None
        self.io, self.tr = self._connect(1, self.admin.ctrl.cntlid, cattr, icreq or pdu.ICReq(),
                                         sqsize)
        self.lane = self.io._lane
        self.tr.out.clear()  # ICResp and the Connect response
        self.base_pdus = self.io.rx_pdus

    def bdev(self, name: str) -> Any:
        return self.target.bdevs.get(name)

    def _connect(self, qid: int, cntlid: int, cattr: int, icreq: pdu.ICReq,
                 sqsize: int = 31) -> tuple[Qpair, Tr]:
        tr = Tr()
        qp = Qpair(self.target, self.reactor, self.addr)
        qp.connection_made(tr)  # type: ignore[arg-type]
        qp.data_received(wire(icreq))
        with encoding(icreq):
            qp.data_received(wire(
                pdu.CapsuleCmd(build_connect_sqe(1, qid, sqsize, 0, cattr=cattr),
                               build_connect_data(HOSTID.bytes, cntlid, NQN, HOSTNQN))))
            if qid == 0:
                cc = (spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT)
                      | (spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT))
                qp.data_received(wire(pdu.CapsuleCmd(build_property_set_sqe(
                    2, spec.Property.CC, cc))))
        self.run()
        assert qp.ctrl is not None, "connect failed"
        return qp, tr

    def run(self) -> None:
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))
        if not self.layout.ordered:
            self.settle()

    def busy(self) -> bool:
        """Is I/O still at an asynchronous backend (the lane's or the Python path's)?"""
        from blocktarget.bdevs import uring

        io = getattr(self, "io", None)  # (None while connecting)
        lane = io._lane if io is not None else None
        ring = uring._Ring._rings.get(self.reactor)
        return bool((lane is not None and lane.c is not None and lane.c.io_inflight)
                    or (ring is not None and (ring.ops or ring.lane_busy()))
                    or (self.layout.pending is not None and self.layout.pending(self)))

    def settle(self, timeout: float = 10.0) -> None:
        """Run the loop until every I/O the feed started has completed and been sent."""
        deadline = time.monotonic() + timeout
        while True:
            self.loop.run_until_complete(asyncio.sleep(0.0005))
            if not self.busy():
                for _ in range(3):
                    self.loop.run_until_complete(asyncio.sleep(0))
                if not self.busy():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"I/O still in flight after {timeout} s")

    def taken(self) -> int:
        """Commands the lane executed on this side so far."""
        return 0 if self.lane is None else int(self.lane.executed)

    def state(self) -> dict[str, Any]:
        qp = self.io
        # a reader of the counters: C keeps a lent socket's until asked (nvme/netpoll.py)
        qp.reactor.fold_stats()
        k = qp.counters
        stats = {}
        for name in self.layout.compared:
            bd = self.bdev(name)
            total = bd.stats_total()
            for t in IOType:
                assert sum(total.latency_buckets[t]) == total.ops[t], (name, t)
                assert total.latency_sum_ns[t] >= 0
            stats[name] = (total.ops, total.bytes, total.errors)
        ctrl = self.admin.ctrl
        lane_r2ts = qp._lane.r2t_pending() if qp._lane is not None else {}
        return {
            "sqhd": qp.sqhd, "rx_pdus": qp.rx_pdus - self.base_pdus,
            "counters": (k.read_cmds, k.write_cmds, k.read_blocks_bytes, k.write_bytes),
            "stats": stats,
            # outstanding commands of either path (the lane's are writes waiting for
            # data; their ttags differ by design, so only their number is compared)
            "requests": sorted([*qp.requests, *(t.cid for t in lane_r2ts.values())]),
            "r2t": len(qp.r2t_pending) + len(lane_r2ts),
            "closed": qp.closed, "closing": self.tr.closing,
            "pauses": (self.tr.pauses, self.tr.resumes),
            "errors": ctrl.error_count if ctrl is not None else None,
            "budget": (qp.budget_held, qp.budget.used, qp.budget.read_pauses, qp.budget.waits,
                       len(qp.budget.waiting), qp._budget_paused),
            "backlog": len(qp._backlog),
            "mem": {name: self.layout.contents(self.bdev(name))
                    for name in self.layout.compared},
        }


# ------------------------------------------------------------------ ttags
# The two sides name the same write's R2T differently (the Python path counts ttags from
# 0, the lane's are 0x8000 + its slot): a ttag is an opaque handle the host echoes. So
# outputs are compared with the lane's R2T ttags replaced by the reference's (the i-th
# R2T of one side is the i-th of the other), and H2CData fed to the lane side carries the
# lane's ttag for the reference's. Header digests are recomputed, keeping a bad one bad.

_T_H2C, _T_R2T = int(pdu.PduType.H2C_DATA), int(pdu.PduType.R2T)
_T_TERM = int(pdu.PduType.C2H_TERM_REQ)
_T_C2H, _T_RESP = int(pdu.PduType.C2H_DATA), int(pdu.PduType.CAPSULE_RESP)


def _walk(buf: bytes | bytearray) -> list[tuple[int, int, int]]:
    """(offset, type, plen) of the whole PDUs in ``buf``, as far as they frame."""
    out, pos = [], 0
    while len(buf) - pos >= 8:
        plen = struct.unpack_from("<I", buf, pos + 4)[0]
        if plen < 8 or plen > len(buf) - pos:
            break
        out.append((pos, buf[pos], plen))
        pos += plen
    return out


def _by_command(buf: bytes) -> dict[int, list[bytes]]:
    """Each command id's PDUs, in order (anything else under -1)."""
    out: dict[int, list[bytes]] = {}
    for pos, t, plen in _walk(buf):
        if t in (_T_C2H, _T_R2T):
            cid = struct.unpack_from("<H", buf, pos + 8)[0]
        elif t == _T_RESP:
            cid = struct.unpack_from("<H", buf, pos + 20)[0]
        else:
            cid = -1
        out.setdefault(cid, []).append(bytes(buf[pos:pos + plen]))
    return out


def _r2t_ttags(buf: bytes) -> list[int]:
    return [struct.unpack_from("<H", buf, pos + 10)[0] for pos, t, _ in _walk(buf)
            if t == _T_R2T]


def _set_ttag(buf: bytearray, pos: int, ttag: int) -> None:
    """Rewrite the ttag of the 24-byte data header at ``pos`` (and its digest)."""
    has_digest = buf[pos + 1] & pdu.FLAG_HDGST and len(buf) - pos >= 28
    if has_digest:
        old = struct.unpack_from("<I", buf, pos + 24)[0] ^ crc32c.crc32c(bytes(buf[pos:pos + 24]))
    struct.pack_into("<H", buf, pos + 10, ttag)
    if has_digest:
        struct.pack_into("<I", buf, pos + 24, crc32c.crc32c(bytes(buf[pos:pos + 24])) ^ old)


class Pair:
    """The reference side (Python path only) and the lane side, fed identically."""

    def __init__(self, opts: dict[str, Any] | None = None, *, workdir: Any = None,
                 reference: Callable[[], Any] = contextlib.nullcontext, **kw: Any) -> None:
        """``reference``: a context in which the reference side is made (its bdevs then
        use their Python engines where they have another: pmem)."""
        self.loop = asyncio.new_event_loop()
        dirs = [None, None]
        if workdir is not None:  # each side's files in a directory of its own
            dirs = [workdir / "ref", workdir / "fast"]
            for d in dirs:
                d.mkdir(exist_ok=True)
        with reference():
            self.ref = Side(self.loop, False, opts or OPTS, workdir=dirs[0], **kw)
        self.fast = Side(self.loop, True, opts or OPTS, workdir=dirs[1], **kw)
        assert self.ref.io._lane is None

    def close(self) -> None:
        for s in (self.ref, self.fast):
            for qp in (s.io, s.admin):
                qp.close("test over")
        self.release()
        self.loop.close()

    def release(self) -> None:
        """The sides' bdev channels go, so their io_uring rings do (a ring lives while its
        reactor has a channel on it: left open, every test's ring stayed in
        uring._Ring._rings for the rest of the session, which test_bdev_uring checks).
        (Only io_uring's: closing an NVMe PCIe channel deletes its hardware queue with an
        admin command, which a fake controller served between reactor turns never
        answers here: each close waited out the admin timeout, 60 s.)"""
        for s in (self.ref, self.fast):
            for b in list(s.target.bdevs):
                if b.module == "uring":
                    b.close_channel(s.reactor)

    def ttag_map(self) -> dict[int, int]:
        """The reference side's R2T ttags -> the lane side's, for the same writes (the
        latest R2T of each: a ttag names one write at a time)."""
        return dict(zip(_r2t_ttags(bytes(self.ref.tr.out)), _r2t_ttags(bytes(self.fast.tr.out)),
                        strict=False))

    def for_fast(self, data: bytes) -> bytes:
        """``data`` as the lane side must see it: H2CData under its own ttags."""
        m = self.ttag_map()
        buf = bytearray(data)
        for pos, t, _plen in _walk(buf):
            if t == _T_H2C and len(buf) - pos >= 24:
                ttag = struct.unpack_from("<H", buf, pos + 10)[0]
                if ttag in m:
                    _set_ttag(buf, pos, m[ttag])
        return bytes(buf)

    def feed(self, *chunks: bytes) -> None:
        whole = b"".join(chunks)
        fast = self.for_fast(whole)
        cuts = [0]
        for c in chunks:
            cuts.append(cuts[-1] + len(c))
        for side, data in ((self.ref, whole), (self.fast, fast)):
            for a, b in zip(cuts, cuts[1:], strict=False):
                if not side.io.closed:
                    side.io.data_received(data[a:b])
            side.run()

    def fast_output(self) -> bytes:
        """The lane side's output with the reference side's ttags in its R2Ts."""
        ref = iter(_r2t_ttags(bytes(self.ref.tr.out)))
        back = {v: k for k, v in self.ttag_map().items()}
        buf = bytearray(self.fast.tr.out)
        for pos, t, plen in _walk(buf):
            if t == _T_R2T:
                theirs = next(ref, None)  # the i-th R2T of one side is the i-th of the other
                if theirs is not None:
                    _set_ttag(buf, pos, theirs)
            elif t == _T_TERM and plen >= 48 and buf[pos + 24] == _T_H2C:
                # a C2HTermReq carries the offending H2CData header, with the lane's ttag
                ttag = struct.unpack_from("<H", buf, pos + 34)[0]
                if ttag in back:
                    struct.pack_into("<H", buf, pos + 34, back[ttag])
        return bytes(buf)

    def check(self) -> None:
        a, b = self.ref, self.fast
        ra, rb = bytes(a.tr.out), self.fast_output()
        if not a.layout.ordered:
            # asynchronous I/O completes in any order on either side: compare what each
            # command got (its PDUs, in order), not how the commands interleave
            ga, gb = _by_command(ra), _by_command(rb)
            if ga != gb:
                cid = next(c for c in sorted(set(ga) | set(gb)) if ga.get(c) != gb.get(c))
                show = [[x[:32].hex() + (f"..({len(x)})" if len(x) > 32 else "")
                         for x in g.get(cid, [])] for g in (ga, gb)]
                raise AssertionError(f"cid {cid}: python {show[0]} lane {show[1]}")
            ra = rb = b""
        if ra != rb:
            i = next((i for i, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y),
                     min(len(ra), len(rb)))
            raise AssertionError(f"output differs at byte {i} of {len(ra)}/{len(rb)}: "
                                 f"python {ra[i:i + 24].hex()} lane {rb[i:i + 24].hex()}")
        sa, sb = a.state(), b.state()
        if sa["closed"]:
            # the Python path does not count the PDUs of a batch that ended in a
            # protocol error (the count is the stall watch's, which closing stops)
            del sa["rx_pdus"], sb["rx_pdus"]
        for name in sa["mem"]:
            x, y = sa["mem"][name], sb["mem"][name]
            if x != y:
                i = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v),
                         min(len(x or b""), len(y or b"")))
                raise AssertionError(f"{name} differs at byte {i} (block {i // 512} of 512 "
                                     f"B, {i // 4096} of 4 KiB): python "
                                     f"{(x or b'')[i:i + 16].hex()} lane "
                                     f"{(y or b'')[i:i + 16].hex()}")
        for key in sa:
            if key == "pauses" and sb[key] == (None, None):
                continue  # (over a real socket: the transport's own, see net_harness.py)
            assert sa[key] == sb[key], f"{key}: python {sa[key]!r:.300} lane {sb[key]!r:.300}"
        # the reactor's counter (metrics, nvmf_get_stats) counts what the lane executed
        assert a.reactor.stats.c_lane_commands == 0
        assert b.reactor.stats.c_lane_commands == b.taken()

    def taken(self) -> int:
        return self.fast.taken()


# ------------------------------------------------------------------ commands

def cmd(opc: int, cid: int, nsid: int, slba: int = 0, nlb: int = 1, *, data: bytes | None = None,
        sgl_len: int | None = None, sgl_id: int | None = None, flags: int = PSDT_SGL,
        sgl_addr: int = 0, cdw12: int = 0, cdw11: int = 0, cdw10: int | None = None) -> bytes:
    """One capsule PDU. A write carries its data in capsule unless ``data`` is b""."""
    bs = BDEVS.get(nsid, ("", 512, 0))[1]
    n = nlb * bs
    if data is None:
        data = pattern(n, cid) if opc == WRITE else b""
    if sgl_id is None:
        sgl_id = SGL_ICD if data else SGL_TR
    sqe = build_sqe(opc, cid, nsid, flags=flags, sgl_addr=sgl_addr,
                    sgl_len=n if sgl_len is None else sgl_len, sgl_id=sgl_id,
                    cdw10=(slba & 0xFFFFFFFF) if cdw10 is None else cdw10,
                    cdw11=(slba >> 32) | cdw11, cdw12=((nlb - 1) & 0xFFFF) | cdw12)
    return wire(pdu.CapsuleCmd(sqe, data))


def rd(cid: int, nsid: int = 2, slba: int = 0, nlb: int = 1, **kw: Any) -> bytes:
    return cmd(READ, cid, nsid, slba, nlb, **kw)


def wr(cid: int, nsid: int = 2, slba: int = 0, nlb: int = 1, **kw: Any) -> bytes:
    return cmd(WRITE, cid, nsid, slba, nlb, **kw)


def with_pdo(capsule: bytes, pdo: int) -> bytes:
    """The same capsule with its data placed at ``pdo`` (padding after the header)."""
    plen = struct.unpack_from("<I", capsule, 4)[0]
    head = bytearray(capsule[:72])
    head[3] = pdo
    struct.pack_into("<I", head, 4, plen + pdo - 72)
    return bytes(head) + bytes(pdo - 72) + capsule[72:]


def with_flags(capsule: bytes, flags: int) -> bytes:
    return capsule[:1] + bytes([flags]) + capsule[2:]


