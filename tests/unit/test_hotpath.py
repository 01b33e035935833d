"""The I/O hot path's shortcuts give exactly what the general code gives (issue 7).

- `pdu.encode_resp` / `pdu.encode_c2h` produce the bytes `pdu.encode()` produces, for
  every digest / alignment / flag combination;
- the decoder's cache of validated common headers never lets a header through that the
  full check would refuse (digests switched on later, hostile variety, bounded size);
- `qpair._wire_data` passes immutable memory through uncopied and snapshots mutable
  memory, and a read queued before a write to the same blocks in the same batch still
  carries the old data with a matching data digest (the bug the snapshot fixed);
- reactor poll modes: validation, config parsing, and what each mode does to the loop;
- `reactor.tune_allocator` applies on glibc.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from typing import Any

import pytest

from blocktarget.app import Target
from blocktarget.config import ConfigError, Settings, parse_settings
from blocktarget.nvme import pdu, spec
from blocktarget.nvme.qpair import Qpair, _wire_data
from blocktarget.nvme.structs import (
    build_connect_data,
    build_connect_sqe,
    build_property_set_sqe,
    build_sqe,
    parse_cqe,
)
from blocktarget.reactor import Reactor, ReactorPool, check_poll_mode, tune_allocator

AVAILABLE = sorted(os.sched_getaffinity(0))


def joined(bufs: list[Any]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


# ------------------------------------------------------------------ encoders

@pytest.mark.parametrize("hdgst", [False, True])
@pytest.mark.parametrize("status", [0, 0x4002, 0x7FFF])
def test_encode_resp_matches_encode(hdgst: bool, status: int) -> None:
    from blocktarget.nvme.structs import pack_cqe

    for cid, sqhd, sqid, dw0, dw1 in [(0, 0, 0, 0, 0), (0xFFFF, 127, 3, 0xDEADBEEF, 1),
                                      (17, 1, 1, 0, 0xFFFFFFFF)]:
        want = joined(pdu.encode(pdu.CapsuleResp(pack_cqe(cid, status, sqhd, sqid, dw0, dw1)),
                                 hdgst=hdgst))
        assert pdu.encode_resp(cid, status, sqhd, sqid, dw0, dw1, hdgst) == want


@pytest.mark.parametrize("hdgst", [False, True])
@pytest.mark.parametrize("ddgst", [False, True])
@pytest.mark.parametrize("pda", [0, 1, 3, 31])
@pytest.mark.parametrize("last,success", [(False, False), (True, False), (True, True)])
def test_encode_c2h_matches_encode(hdgst: bool, ddgst: bool, pda: int, last: bool,
                                   success: bool) -> None:
    for n in (1, 512, 4096):
        data = memoryview(bytes(range(256)) * (n // 256 + 1))[:n]
        want = pdu.encode(pdu.C2HData(cccid=9, datao=4096, data=data, last=last,
                                      success=success), hdgst=hdgst, ddgst=ddgst, pda=pda)
        got = pdu.encode_c2h(9, 4096, data, last, success, hdgst, ddgst, pda)
        assert joined(got) == joined(want)
        assert got[1] is data  # the payload is passed through, not copied
        # and the peer's decoder accepts it
        dec = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
        dec._ic_done = True
        dec.set_digests(hdgst, ddgst)
        dec.set_pda(pda)
        (p,) = dec.feed(joined(got))
        assert isinstance(p, pdu.C2HData) and bytes(p.data) == bytes(data)


# ------------------------------------------------------------------ decoder header cache

def _capsule(cid: int, hdgst: bool = False) -> bytes:
    sqe = build_sqe(2, cid, 1, flags=0x40, sgl_len=4096, sgl_id=spec.SGL_ID_TRANSPORT)
    return joined(pdu.encode(pdu.CapsuleCmd(sqe), hdgst=hdgst))


def _h2c_decoder() -> pdu.Decoder:
    dec = pdu.Decoder(expect=pdu.HOST_TO_CONTROLLER)
    assert dec.feed(joined(pdu.encode(pdu.ICReq())))
    return dec


def test_header_cache_is_dropped_when_digests_change() -> None:
    dec = _h2c_decoder()
    assert len(dec.feed(_capsule(1) * 3)) == 3  # this header is now cached
    dec.set_digests(True, False)
    with pytest.raises(pdu.ProtocolError) as err:
        dec.feed(_capsule(2))  # no HDGSTF: refused, not served from the cache
    assert err.value.fes == pdu.Fes.INVALID_HEADER_FIELD
    assert err.value.fei == pdu.OFFSET_FLAGS


def test_header_cache_after_pda_change_refuses_misaligned_data() -> None:
    dec = _h2c_decoder()
    sqe = build_sqe(1, 1, 1, flags=0x40, sgl_len=8, sgl_id=spec.SGL_ID_INCAPSULE)
    wire = joined(pdu.encode(pdu.CapsuleCmd(sqe, bytes(8))))
    assert len(dec.feed(wire * 2)) == 2
    dec.set_pda(31)  # 128-byte alignment: PDO 72 is now wrong
    with pytest.raises(pdu.ProtocolError) as err:
        dec.feed(wire)
    assert err.value.fei == pdu.OFFSET_PDO


def test_header_cache_is_bounded_and_checks_still_run() -> None:
    dec = _h2c_decoder()
    for n in range(1, 200):  # 199 distinct valid headers (in-capsule data of n bytes)
        sqe = build_sqe(1, n, 1, flags=0x40, sgl_len=n, sgl_id=spec.SGL_ID_INCAPSULE)
        (p,) = dec.feed(joined(pdu.encode(pdu.CapsuleCmd(sqe, bytes(n)))))
        assert len(p.data) == n
    assert len(dec._known) <= pdu._KNOWN_MAX
    with pytest.raises(pdu.ProtocolError):  # a bad type is never "known"
        dec.feed(b"\x7f" + _capsule(1)[1:])


# ------------------------------------------------------------------ C2H data

def test_wire_data_passes_immutable_memory_through() -> None:
    b = bytes(range(200))
    assert _wire_data(b, 200) is b
    assert bytes(_wire_data(b, 100)) == b[:100]
    v = memoryview(b)[10:110]
    out = _wire_data(v, 100)
    assert out is v  # a view of bytes: no copy


def test_wire_data_snapshots_mutable_memory() -> None:
    src = bytearray(b"A" * 4096)
    for buf in (memoryview(src), memoryview(src).cast("I"), src):
        out = _wire_data(buf, 4000)
        src[:] = b"B" * 4096  # a later write to the same blocks
        assert bytes(out) == b"A" * 4000
        src[:] = b"A" * 4096


class _Tr:
    def __init__(self) -> None:
        self.out = bytearray()

    def writelines(self, bufs: Any) -> None:
        for b in bufs:
            self.out += b

    def write(self, b: Any) -> None:
        self.out += b

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
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)


NQN = "nqn.2026-01.io.blocktarget.test:hotpath"
HOSTID = uuid.uuid4()
HOSTNQN = f"nqn.2014-08.org.nvmexpress:uuid:{HOSTID}"


@pytest.fixture
def sim() -> Any:
    loop = asyncio.new_event_loop()
    target = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False, pin=False))
    doc = {"subsystems": [
        {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create", "params": {
            "name": "M0", "num_blocks": 256, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M0", "nsid": 1}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address": {
                "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                "trsvcid": "4420"}}}]}]}
    loop.run_until_complete(target.apply_config(doc, "test"))
    reactor = Reactor(index=0, core=0, pin=False, host_wait_us=0)  # (the host: this thread)
    reactor.loop = loop
    reactor.tid = threading.get_native_id()
    addr = next(iter(target.subsystems.find(NQN).listeners))
    yield loop, target, reactor, addr
    loop.close()


def _connect(sim: Any, qid: int, cntlid: int, digests: bool) -> tuple[Qpair, _Tr]:
    loop, target, reactor, addr = sim
    tr = _Tr()
    qp = Qpair(target, reactor, addr)
    qp.connection_made(tr)  # type: ignore[arg-type]
    qp.data_received(joined(pdu.encode(pdu.ICReq(dgst=3 if digests else 0))))
    qp.data_received(joined(pdu.encode(pdu.CapsuleCmd(
        build_connect_sqe(1, qid, 31, 0), build_connect_data(HOSTID.bytes, cntlid, NQN,
                                                             HOSTNQN)),
        hdgst=digests, ddgst=digests)))
    if qid == 0:
        cc = (spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT)
              | (spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT))
        qp.data_received(joined(pdu.encode(pdu.CapsuleCmd(
            build_property_set_sqe(2, spec.Property.CC, cc)), hdgst=digests)))
    loop.run_until_complete(asyncio.sleep(0))
    assert qp.ctrl is not None
    return qp, tr


def test_read_then_write_in_one_batch_reads_old_data_with_valid_digest(sim: Any) -> None:
    """The malloc read hands out a view of live memory; the write right behind it in the
    same batch completes before the flush. The host must get the old block intact,
    with a data digest computed over what it gets (the decoder checks it)."""
    admin, _ = _connect(sim, 0, spec.CNTLID_DYNAMIC, True)
    qp, tr = _connect(sim, 1, admin.ctrl.cntlid, True)  # type: ignore[union-attr]
    sgl = 0x40

    def cmd(opcode: int, cid: int, data: bytes = b"") -> bytes:
        sqe = build_sqe(opcode, cid, 1, flags=sgl, sgl_len=4096, cdw10=7,
                        sgl_id=spec.SGL_ID_INCAPSULE if data else spec.SGL_ID_TRANSPORT)
        return joined(pdu.encode(pdu.CapsuleCmd(sqe, data), hdgst=True, ddgst=True))

    start = len(tr.out)
    qp.data_received(cmd(spec.IoOpcode.WRITE, 10, b"\x11" * 4096))
    qp.data_received(cmd(spec.IoOpcode.READ, 11) + cmd(spec.IoOpcode.WRITE, 12, b"\x22" * 4096)
                     + cmd(spec.IoOpcode.READ, 13))
    sim[0].run_until_complete(asyncio.sleep(0))
    dec = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
    dec._ic_done = True
    dec.set_digests(True, True)
    got: dict[int, bytes] = {}
    status: dict[int, int] = {}
    for p in dec.feed(bytes(tr.out[start:])):  # raises on any digest mismatch
        if isinstance(p, pdu.C2HData):
            got[p.cccid] = bytes(p.data)
        elif isinstance(p, pdu.CapsuleResp):
            c = parse_cqe(p.cqe)
            status[c.cid] = c.status
    assert status == {10: 0, 11: 0, 12: 0, 13: 0}
    assert got[11] == b"\x11" * 4096  # queued before the second write: the old data
    assert got[13] == b"\x22" * 4096


# ------------------------------------------------------------------ polling policy

def test_poll_mode_validation() -> None:
    for m in ("event", "adaptive", "busy"):
        assert check_poll_mode(m) == m
    with pytest.raises(ValueError, match="poll mode must be one of"):
        check_poll_mode("spin")
    with pytest.raises(ValueError, match="2 poll modes for 1 reactors"):
        ReactorPool([AVAILABLE[0]], poll_modes=["event", "busy"])
    pool = ReactorPool([AVAILABLE[0], AVAILABLE[0]], poll_modes=["event", "busy"], pin=False)
    assert [r.poll_mode for r in pool] == ["event", "busy"]


def test_poll_mode_config() -> None:
    core = AVAILABLE[0]
    s = parse_settings({"blocktarget": {"cores": [core], "poll": {"mode": "adaptive"}}}, "t")
    assert s.poll_mode == "adaptive"
    assert s.describe()["poll"]["mode"] == "adaptive"
    s = parse_settings({"blocktarget": {"cores": [core], "poll": {"mode": ["busy"]}}}, "t")
    assert s.poll_mode == ["busy"]
    with pytest.raises(ConfigError, match="poll.mode: poll mode must be one of"):
        parse_settings({"blocktarget": {"cores": [core], "poll": {"mode": "fast"}}}, "t")
    with pytest.raises(ConfigError, match="lists 2 modes for 1 reactors"):
        parse_settings({"blocktarget": {"cores": [core], "poll": {"mode": ["busy", "event"]}}},
                       "t")
    assert parse_settings({"blocktarget": {"cores": [core]}}, "t").poll_mode is None


def _poll_runs_over(r: Reactor, secs: float, before: Any = None) -> int:
    """Polls the reactor ran in ``secs``, counted from the moment ``before`` ran on it
    (in the same message, so a test thread descheduled meanwhile cannot miss the start
    of a spin that ``before`` begins)."""
    def read() -> int:
        if before is not None:
            before()
        return r.stats.poll_runs

    n0 = r.send(read).result(2)
    time.sleep(secs)
    return r.send(lambda: r.stats.poll_runs).result(2) - n0


def _settle(r: Reactor, limit: float) -> float:
    """Wait until the reactor stops polling (no poll over 50 ms); the seconds it took.
    A reactor that never stops gives up after ``limit`` (the caller's check fails)."""
    t0 = time.monotonic()
    n = r.send(lambda: r.stats.poll_runs).result(2)
    while time.monotonic() - t0 < limit:
        time.sleep(0.05)
        n, before = r.send(lambda: r.stats.poll_runs).result(2), n
        if n == before:
            break
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["event", "adaptive", "busy"])
def test_poll_modes_spin_as_documented(mode: str) -> None:
    # busy_poll_us 100 ms: a window long enough that a reactor thread kept off the CPU
    # for a while on a loaded machine still polls in it many times
    r = Reactor(0, AVAILABLE[0], pin=False, busy_poll_us=100_000, poll_mode=mode)
    r.start()
    try:
        # The start-up spin (adaptive: busy_poll_us from the start) is over; waited for
        # rather than slept through, as a loaded machine may run the reactor late. A
        # busy reactor never settles: it is measured as it is.
        settled = _settle(r, 0.1 if mode == "busy" else 5.0)
        idle = _poll_runs_over(r, 0.2)
        # the whole busy_poll_us window after socket activity (timed on the reactor from
        # note_io), counted from note_io itself
        after_io = _poll_runs_over(r, 0.15, before=r.note_io if r.spin_on_io else None)
        _settle(r, 0.1 if mode == "busy" else 5.0)
        later = _poll_runs_over(r, 0.2)
    finally:
        r.stop()
    if mode != "busy":  # 100 ms of spin, not a reactor that spins for ever
        assert settled < 1.0, f"the start-up spin lasted {settled:.2f} s"
    if mode == "busy":
        assert idle > 100 and later > 100  # always spinning
    elif mode == "adaptive":
        assert idle == 0 and later == 0  # asleep when idle
        assert after_io > 10  # spinning within busy_poll_us of socket activity
    else:
        assert idle == 0 and after_io == 0 and later == 0
        assert not r.spin_on_io


def test_tune_allocator_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_allocator() is True
