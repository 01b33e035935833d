"""Virtual bdevs (passthru, delay, error, raid1, split) on a started target.

Every I/O goes through the bdev's IOChannel on a real reactor thread, with real data in
malloc bases underneath, because the stacking code's hazards are exactly there: base
channels taken per reactor, offsets, zero-copy read buffers handed up through layers,
completions that arrive later on the reactor's loop. Control goes through the JSON-RPC
core, so the error codes asserted are the ones clients see.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from blocktarget.app import Target
from blocktarget.bdev import BdevIO, IOType, Status
from blocktarget.bdevs.error import Injection
from blocktarget.config import Settings

ENODEV, EEXIST, EBUSY, EOPNOTSUPP = -errno.ENODEV, -errno.EEXIST, -errno.EBUSY, -errno.EOPNOTSUPP
BS = 512
_ids = itertools.count(1)


def settings(cores: list[int]) -> Settings:
    return Settings(cores=cores, rpc_http=None, rpc_unix=None, metrics=False)


@pytest.fixture
async def t() -> AsyncIterator[Target]:
    target = Target(settings([0]))
    await target.start()
    yield target
    await target.stop()


@pytest.fixture
async def t2() -> AsyncIterator[Target]:
    """Two reactors (the host has two cores): leg state must be shared between them."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("needs two cores")
    target = Target(settings(cores))
    await target.start()
    yield target
    await target.stop()


async def rpc(t: Target, method: str, **params: Any) -> dict[str, Any]:
    return await t.dispatcher.handle(
        {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params})


async def ok(t: Target, method: str, **params: Any) -> Any:
    resp = await rpc(t, method, **params)
    assert "error" not in resp, resp
    return resp["result"]


async def err(t: Target, method: str, **params: Any) -> tuple[int, str]:
    resp = await rpc(t, method, **params)
    assert "result" not in resp, resp
    e = resp["error"]
    assert e["code"] != -32603, f"user error reported as internal: {e}"
    return e["code"], e["message"]


async def malloc(t: Target, name: str, blocks: int = 1024, bs: int = BS) -> None:
    await ok(t, "bdev_malloc_create", name=name, num_blocks=blocks, block_size=bs)


async def io(t: Target, name: str, kind: IOType, offset: int = 0, blocks: int = 1,
             buf: Any = None, reactor: int = 0) -> tuple[BdevIO, float]:
    """Submit one I/O on a reactor; returns the completed BdevIO and its latency (s),
    both measured on the reactor itself."""
    r = t.reactors[reactor]
    bdev = t.bdevs.get(name)

    def run() -> asyncio.Future[tuple[BdevIO, float]]:
        fut = asyncio.get_running_loop().create_future()
        start = time.perf_counter()

        def done(x: BdevIO) -> None:
            assert not fut.done(), "completed twice"
            fut.set_result((x, time.perf_counter() - start))

        bdev.get_io_channel(r).submit(BdevIO(kind, offset, blocks, buf, done))
        return fut

    return await asyncio.wait_for(r.call(run), 10)


async def write(t: Target, name: str, offset: int, data: bytes, reactor: int = 0) -> int:
    x, _ = await io(t, name, IOType.WRITE, offset, len(data) // BS, data, reactor)
    return x.status


async def read(t: Target, name: str, offset: int, blocks: int, reactor: int = 0
               ) -> tuple[int, bytes]:
    x, _ = await io(t, name, IOType.READ, offset, blocks, None, reactor)
    return x.status, bytes(x.buf) if x.buf is not None else b""


def base_bytes(t: Target, name: str, offset: int, blocks: int) -> bytes:
    mem = t.bdevs.get(name).mem  # type: ignore[attr-defined]
    return bytes(mem[offset * BS:(offset + blocks) * BS])


def pattern(blocks: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(blocks * BS))


# ---- passthru and the shared stacking rules ------------------------------------------


async def test_passthru_forwards_real_data(t: Target) -> None:
    await malloc(t, "M0")
    assert await ok(t, "bdev_passthru_create", base_bdev_name="M0", name="P0") == "P0"
    data = pattern(4, 1)
    assert await write(t, "P0", 10, data) == Status.SUCCESS
    assert base_bytes(t, "M0", 10, 4) == data, "the write must land in the base"
    status, got = await read(t, "P0", 10, 4)
    assert status == Status.SUCCESS and got == data
    p0 = t.bdevs.get("P0")
    m0 = t.bdevs.get("M0")
    assert (p0.num_blocks, p0.block_size, p0.io_types, p0.write_cache) == (
        m0.num_blocks, m0.block_size, m0.io_types, m0.write_cache)
    desc = (await ok(t, "bdev_get_bdevs", name="P0"))[0]
    assert desc["driver_specific"] == {"passthru": {"name": "P0", "base_bdev_name": "M0"}}
    assert (await ok(t, "bdev_get_bdevs", name="M0"))[0]["claimed_by"] == "passthru P0"
    # a caller-supplied read buffer is filled, not replaced
    buf = bytearray(4 * BS)
    x, _ = await io(t, "P0", IOType.READ, 10, 4, buf)
    assert x.status == 0 and x.buf is buf and bytes(buf) == data
    x, _ = await io(t, "P0", IOType.WRITE_ZEROES, 10, 2)
    assert x.status == 0 and base_bytes(t, "M0", 10, 2) == bytes(2 * BS)


async def test_claimed_base_cannot_be_deleted_or_reused(t: Target) -> None:
    await malloc(t, "M0")
    await ok(t, "bdev_passthru_create", base_bdev_name="M0", name="P0")
    code, msg = await err(t, "bdev_malloc_delete", name="M0")
    assert code == EBUSY and "passthru P0" in msg
    code, msg = await err(t, "bdev_delay_create", base_bdev_name="M0", name="D0",
                          avg_read_latency=0, p99_read_latency=0, avg_write_latency=0,
                          p99_write_latency=0)
    assert code == EBUSY and "already claimed by passthru P0" in msg
    assert "D0" not in t.bdevs
    # exported virtual bdev: the namespace's claim protects it the same way
    await ok(t, "nvmf_create_subsystem", nqn="nqn.2026-01.io.test:v", allow_any_host=True)
    await ok(t, "nvmf_subsystem_add_ns", nqn="nqn.2026-01.io.test:v",
             namespace={"bdev_name": "P0"})
    code, _ = await err(t, "bdev_passthru_delete", name="P0")
    assert code == EBUSY
    await ok(t, "nvmf_delete_subsystem", nqn="nqn.2026-01.io.test:v")
    await ok(t, "bdev_passthru_delete", name="P0")
    assert t.bdevs.get("M0").claimed_by is None
    await ok(t, "bdev_malloc_delete", name="M0")


async def test_base_channel_closed_with_last_user(t: Target) -> None:
    await malloc(t, "M0")
    await ok(t, "bdev_passthru_create", base_bdev_name="M0", name="P0")
    await write(t, "P0", 0, pattern(1))
    m0 = t.bdevs.get("M0")
    assert set(m0.channels) == {0}, "the stack opened the base's channel on reactor 0"
    await ok(t, "bdev_passthru_delete", name="P0")
    assert m0.channels == {}, "deleting the only user closes the base channel"
    assert m0.stats_total().ops[IOType.WRITE] == 1, "its counters are kept"


async def test_missing_base_and_bad_params(t: Target) -> None:
    code, msg = await err(t, "bdev_passthru_create", base_bdev_name="nope", name="P0")
    assert code == ENODEV and "'nope'" in msg
    code, msg = await err(t, "bdev_passthru_create", name="P0")
    assert code == -32602 and "base_bdev_name" in msg
    code, _ = await err(t, "bdev_passthru_delete", name="nope")
    assert code == ENODEV
    await malloc(t, "M0")
    code, msg = await err(t, "bdev_passthru_delete", name="M0")
    assert code == ENODEV and "not passthru" in msg


async def test_bdev_create_generic_makes_every_virtual_type(t: Target) -> None:
    for n in ("A", "B", "C", "D", "E", "F"):
        await malloc(t, n)
    assert await ok(t, "bdev_create", type="passthru", base_bdev_name="A", name="P") == "P"
    assert await ok(t, "bdev_create", type="delay", base_bdev_name="B", name="D0",
                    avg_read_latency=0, p99_read_latency=0, avg_write_latency=0,
                    p99_write_latency=0) == "D0"
    assert await ok(t, "bdev_create", type="error", base_name="C") == "EE_C"
    assert await ok(t, "bdev_create", type="raid1", name="R", raid_level="raid1",
                    base_bdevs=["D", "E"]) == "R"
    assert await ok(t, "bdev_create", type="split", base_bdev="F", split_count=2) == [
        "Fp0", "Fp1"]
    for name in ("P", "D0", "EE_C", "R", "Fp0", "Fp1"):
        assert await write(t, name, 0, pattern(1)) == 0


# ---- delay --------------------------------------------------------------------------


async def test_delay_latency_within_bounds_and_p99(t: Target) -> None:
    """The configured latency is a floor (asserted exactly). The ceilings allow for a
    loaded machine, whose reactor may run a due timer well over 0.1 s late (seen with 2
    busy cores): they catch a latency in the wrong unit or the p99 given in place of
    the average (hence a p99 of 1 s, far above both the average and the ceiling)."""
    await malloc(t, "M0")
    await ok(t, "bdev_delay_create", base_bdev_name="M0", name="D0", avg_read_latency=20_000,
             p99_read_latency=20_000, avg_write_latency=2_000, p99_write_latency=1_000_000)
    for _ in range(3):
        x, lat = await io(t, "D0", IOType.READ, 0, 1)
        assert x.status == 0
        assert 0.020 <= lat < 0.020 + 0.5, f"read latency {lat * 1e3:.1f} ms, want ~20 ms"
    # one write in a hundred (the hundredth, per channel) gets the p99 latency
    lats = []
    for i in range(100):
        x, lat = await io(t, "D0", IOType.WRITE, i, 1, pattern(1, i))
        assert x.status == 0
        lats.append(lat)
    assert lats[99] >= 1.0
    assert all(0.002 <= lat < 0.5 for lat in lats[:99]), sorted(lats)[-3:]
    assert statistics.median(lats[:99]) < 0.010, "the average is the average latency"
    assert base_bytes(t, "M0", 99, 1) == pattern(1, 99), "the data still goes down"
    # unmap is not delayed
    x, lat = await io(t, "D0", IOType.UNMAP, 0, 1)
    assert x.status == 0 and lat < 0.100


async def test_delay_update_latency_live(t: Target) -> None:
    await malloc(t, "M0")
    # the p99 (1 s, never reached in two reads) is far above what the ceilings tell
    # apart, so they can allow for a loaded machine's late timers (see above)
    await ok(t, "bdev_delay_create", base_bdev_name="M0", name="D0", avg_read_latency=0,
             p99_read_latency=1_000_000, avg_write_latency=0, p99_write_latency=0)
    _, lat = await io(t, "D0", IOType.READ)
    assert lat < 0.5
    assert await ok(t, "bdev_delay_update_latency", delay_bdev_name="D0",
                    latency_type="avg_read", latency_us=30_000) is True
    _, lat = await io(t, "D0", IOType.READ)
    assert 0.030 <= lat < 0.030 + 0.5
    ds = (await ok(t, "bdev_get_bdevs", name="D0"))[0]["driver_specific"]["delay"]
    assert ds["avg_read_latency"] == 30_000 and ds["p99_read_latency"] == 1_000_000
    cfg = [e for e in t.save_config()["subsystems"][0]["config"]
           if e["method"] == "bdev_delay_create"]
    assert cfg[0]["params"]["avg_read_latency"] == 30_000, "save_config keeps the change"
    code, msg = await err(t, "bdev_delay_update_latency", delay_bdev_name="D0",
                          latency_type="p99_read", latency_us=10)
    assert code == -32602 and "below the average" in msg
    code, _ = await err(t, "bdev_delay_update_latency", delay_bdev_name="D0",
                        latency_type="p50_read", latency_us=10)
    assert code == -32602
    code, msg = await err(t, "bdev_delay_update_latency", delay_bdev_name="M0",
                          latency_type="avg_read", latency_us=10)
    assert code == ENODEV and "not a delay bdev" in msg


async def test_delay_create_checks(t: Target) -> None:
    await malloc(t, "M0")
    code, msg = await err(t, "bdev_delay_create", base_bdev_name="M0", name="D0",
                          avg_read_latency=10, p99_read_latency=5, avg_write_latency=0,
                          p99_write_latency=0)
    assert code == -32602 and "p99 read latency" in msg
    assert t.bdevs.get("M0").claimed_by is None, "a refused create leaves no claim"
    code, msg = await err(t, "bdev_delay_create", base_bdev_name="M0", name="D0",
                          avg_read_latency=-1, p99_read_latency=0, avg_write_latency=0,
                          p99_write_latency=0)
    assert code == -32602 and "avg_read_latency" in msg


async def test_delay_delete_completes_held_io(t: Target) -> None:
    await malloc(t, "M0")
    await ok(t, "bdev_delay_create", base_bdev_name="M0", name="D0", avg_read_latency=0,
             p99_read_latency=0, avg_write_latency=10_000_000, p99_write_latency=10_000_000)
    r = t.reactors[0]
    bdev = t.bdevs.get("D0")
    done: list[BdevIO] = []

    def submit() -> None:
        bdev.get_io_channel(r).submit(BdevIO(IOType.WRITE, 0, 1, pattern(1), done.append))

    await r.call(submit)
    assert done == []
    t0 = time.monotonic()
    await ok(t, "bdev_delay_delete", name="D0")
    await r.call(lambda: None)
    assert len(done) == 1 and done[0].status == 0, "held I/O completes, it is not lost"
    assert time.monotonic() - t0 < 1


# ---- error --------------------------------------------------------------------------


async def test_error_failure_count_and_status(t: Target) -> None:
    await malloc(t, "M0")
    assert await ok(t, "bdev_error_create", base_name="M0") == "EE_M0"
    assert await write(t, "EE_M0", 0, pattern(1)) == 0
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="write",
             error_type="failure", num=2)
    assert await write(t, "EE_M0", 1, pattern(1, 1)) == Status.INTERNAL_ERROR
    assert await write(t, "EE_M0", 1, pattern(1, 1)) == Status.INTERNAL_ERROR
    assert base_bytes(t, "M0", 1, 1) == bytes(BS), "a failed write never reaches the base"
    assert await write(t, "EE_M0", 1, pattern(1, 1)) == 0, "num=2: the third succeeds"
    status, got = await read(t, "EE_M0", 0, 2)
    assert status == 0 and got == pattern(1) + pattern(1, 1), "reads were never armed"
    # a chosen status, by name or number, and SPDK's nvme_failure sct/sc
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="read", error_type="failure",
             num=1, status="unrecovered_read_error")
    assert (await read(t, "EE_M0", 0, 1))[0] == Status.UNRECOVERED_READ_ERROR
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="all",
             error_type="nvme_failure", num=1, nvme_sct=2, nvme_sc=0x86)
    assert (await read(t, "EE_M0", 0, 1))[0] == 0x286  # access denied
    assert await write(t, "EE_M0", 0, pattern(1)) == 0x286, "'all' arms each type"
    x, _ = await io(t, "EE_M0", IOType.FLUSH, 0, 0)
    assert x.status == 0x286
    x, _ = await io(t, "EE_M0", IOType.FLUSH, 0, 0)
    assert x.status == 0
    # clear disarms everything
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="all", num=100)
    ds = (await ok(t, "bdev_get_bdevs", name="EE_M0"))[0]["driver_specific"]["error"]
    assert ds["injections"]["read"] == {"error_type": "failure", "remaining": 100,
                                        "status": Status.INTERNAL_ERROR}
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="clear",
             error_type="failure")
    assert (await read(t, "EE_M0", 0, 1))[0] == 0


async def test_error_queue_depth_only_under_load(t: Target) -> None:
    await malloc(t, "M0")
    await ok(t, "bdev_error_create", base_name="M0")
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="read", num=1,
             queue_depth=2)
    assert (await read(t, "EE_M0", 0, 1))[0] == 0, "one outstanding: below queue_depth"
    r = t.reactors[0]
    bdev = t.bdevs.get("EE_M0")
    done: list[BdevIO] = []

    def two_at_once() -> None:
        ch = bdev.get_io_channel(r)
        # the first is held by a pending injection so the second sees depth 2
        bdev.inject("write", Injection("pending", 1))
        ch.submit(BdevIO(IOType.WRITE, 0, 1, pattern(1), done.append))
        ch.submit(BdevIO(IOType.READ, 0, 1, None, done.append))

    await r.call(two_at_once)
    assert [d.status for d in done] == [Status.INTERNAL_ERROR]
    assert await ok(t, "bdev_error_resume_pending", name="EE_M0") == 1
    await r.call(lambda: None)
    assert [d.status for d in done] == [Status.INTERNAL_ERROR, 0]


async def test_error_pending_resume_and_abort(t: Target) -> None:
    await malloc(t, "M0")
    await ok(t, "bdev_error_create", base_name="M0")
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="write",
             error_type="pending", num=2)
    r = t.reactors[0]
    bdev = t.bdevs.get("EE_M0")
    done: list[BdevIO] = []

    def submit(off: int) -> None:
        bdev.get_io_channel(r).submit(BdevIO(IOType.WRITE, off, 1, pattern(1, off),
                                             done.append))

    await r.call(submit, 3)
    await asyncio.sleep(0.05)
    assert done == [], "a pending I/O hangs like a stuck device"
    assert (await ok(t, "bdev_get_bdevs", name="EE_M0"))[0]["driver_specific"]["error"][
        "pending_ios"] == 1
    assert await ok(t, "bdev_error_resume_pending", name="EE_M0") == 1
    await r.call(lambda: None)
    assert [d.status for d in done] == [0] and base_bytes(t, "M0", 3, 1) == pattern(1, 3)
    await r.call(submit, 4)
    await ok(t, "bdev_error_delete", name="EE_M0")
    assert [d.status for d in done] == [0, Status.ABORTED_BY_REQUEST], \
        "deleting the bdev aborts what it held"
    assert t.bdevs.get("M0").claimed_by is None


async def test_error_corrupt_data(t: Target) -> None:
    await malloc(t, "M0")
    await ok(t, "bdev_error_create", base_name="M0")
    data = pattern(2, 5)
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="write",
             error_type="corrupt_data", num=1, corrupt_offset=3, corrupt_value=0xFF)
    assert await write(t, "EE_M0", 0, data) == 0, "corruption is silent"
    stored = base_bytes(t, "M0", 0, 2)
    assert stored[3] == data[3] ^ 0xFF and stored[:3] + stored[4:] == data[:3] + data[4:]
    await write(t, "EE_M0", 0, data)
    await ok(t, "bdev_error_inject_error", name="EE_M0", io_type="read",
             error_type="corrupt_data", num=1, corrupt_offset=BS, corrupt_value=1)
    status, got = await read(t, "EE_M0", 0, 2)
    assert status == 0 and got[BS] == data[BS] ^ 1
    assert base_bytes(t, "M0", 0, 2) == data, "a corrupted read never changes the base"
    assert (await read(t, "EE_M0", 0, 2))[1] == data
    code, msg = await err(t, "bdev_error_inject_error", name="EE_M0", io_type="read",
                          error_type="corrupt_data", num=1)
    assert code == -32602 and "corrupt_value" in msg


async def test_error_rpc_errors(t: Target) -> None:
    await malloc(t, "M0")
    code, _ = await err(t, "bdev_error_create", base_name="nope")
    assert code == ENODEV
    await ok(t, "bdev_error_create", base_name="M0")
    code, _ = await err(t, "bdev_error_create", base_name="M0")
    assert code in (EEXIST, EBUSY)
    code, msg = await err(t, "bdev_error_inject_error", name="M0", io_type="read")
    assert code == ENODEV and "not a error bdev" in msg
    code, _ = await err(t, "bdev_error_inject_error", name="EE_M0", io_type="reads")
    assert code == -32602
    code, msg = await err(t, "bdev_error_inject_error", name="EE_M0", io_type="read",
                          error_type="nomem")
    assert code == EOPNOTSUPP and "nomem" in msg
    code, msg = await err(t, "bdev_error_inject_error", name="EE_M0", io_type="read",
                          status="no_such_status")
    assert code == -32602 and "UNRECOVERED_READ_ERROR" in msg
    code, msg = await err(t, "bdev_error_inject_error", name="EE_M0", io_type="read",
                          status=0)
    assert code == -32602 and "not a failing" in msg
    cfg = t.save_config()["subsystems"][0]["config"]
    assert cfg[-1] == {"method": "bdev_error_create",
                       "params": {"base_name": "M0", "uuid": t.bdevs.get("EE_M0").uuid}}


# ---- raid1 --------------------------------------------------------------------------


async def make_mirror(t: Target) -> None:
    await malloc(t, "M0")
    await malloc(t, "M1")
    await ok(t, "bdev_error_create", base_name="M1")
    assert await ok(t, "bdev_raid_create", name="R0", raid_level="raid1",
                    base_bdevs=["M0", "EE_M1"]) == "R0"


async def test_raid1_writes_all_reads_balanced(t: Target) -> None:
    await make_mirror(t)
    data = pattern(8, 3)
    assert await write(t, "R0", 16, data) == 0
    assert base_bytes(t, "M0", 16, 8) == data and base_bytes(t, "M1", 16, 8) == data
    for _ in range(10):
        status, got = await read(t, "R0", 16, 8)
        assert status == 0 and got == data
    reads = [t.bdevs.get(n).stats_total().ops[IOType.READ] for n in ("M0", "M1")]
    assert reads == [5, 5], f"round robin over two legs, got {reads}"
    x, _ = await io(t, "R0", IOType.UNMAP, 16, 1)
    assert x.status == 0 and base_bytes(t, "M1", 16, 1) == bytes(BS)
    x, _ = await io(t, "R0", IOType.COMPARE, 17, 1, data[BS:2 * BS])
    assert x.status == 0
    x, _ = await io(t, "R0", IOType.COMPARE, 17, 1, bytes(BS))
    assert x.status == Status.COMPARE_FAILURE
    info = (await ok(t, "bdev_raid_get_bdevs", category="online"))[0]
    assert info["state"] == "online" and info["degraded"] is False, \
        "a compare mismatch says nothing about a leg's health"
    assert info["num_base_bdevs_operational"] == 2
    assert t.bdevs.get("R0").num_blocks == 1024


async def test_raid1_read_failure_degrades_and_retries(t2: Target) -> None:
    t = t2
    await make_mirror(t)
    data = pattern(4, 9)
    assert await write(t, "R0", 0, data, reactor=1) == 0
    await ok(t, "bdev_error_inject_error", name="EE_M1", io_type="read", num=1,
             status="UNRECOVERED_READ_ERROR")
    # two reads: one of them goes to the armed leg, fails there and is retried on M0
    for _ in range(2):
        status, got = await read(t, "R0", 0, 4)
        assert status == 0 and got == data, "the host never sees the leg's failure"
    assert await ok(t, "bdev_raid_get_bdevs", category="online") != []
    degraded = await ok(t, "bdev_raid_get_bdevs", category="degraded")
    assert [r["name"] for r in degraded] == ["R0"]
    legs = {b["name"]: b for b in degraded[0]["base_bdevs_list"]}
    assert legs["M0"]["state"] == "online" and legs["EE_M1"]["state"] == "failed"
    assert "0x281" in legs["EE_M1"]["failed_reason"]
    assert degraded[0]["num_base_bdevs_operational"] == 1
    ds = (await ok(t, "bdev_get_bdevs", name="R0"))[0]["driver_specific"]["raid"]
    assert ds["degraded"] is True
    # the other reactor stops using the failed leg too, and writes skip it
    before = t.bdevs.get("M1").stats_total().ops[IOType.READ]
    for _ in range(4):
        assert (await read(t, "R0", 0, 4, reactor=1))[1] == data
    assert t.bdevs.get("M1").stats_total().ops[IOType.READ] == before
    new = pattern(4, 10)
    assert await write(t, "R0", 0, new, reactor=1) == 0
    assert base_bytes(t, "M0", 0, 4) == new and base_bytes(t, "M1", 0, 4) == data, \
        "no rebuild: the failed leg keeps its stale data"
    # the config says which leg failed, so a restart keeps it out
    entry = next(e for e in t.save_config()["subsystems"][0]["config"]
                 if e["method"] == "bdev_raid_create")
    assert entry["params"]["base_bdevs"] == ["M0", "EE_M1"]
    assert entry["params"]["failed_base_bdevs"] == ["EE_M1"]


async def test_raid1_write_failure_and_offline(t: Target) -> None:
    await make_mirror(t)
    await ok(t, "bdev_error_inject_error", name="EE_M1", io_type="write", num=1)
    assert await write(t, "R0", 0, pattern(1)) == 0, "one good copy completes the write"
    assert (await ok(t, "bdev_raid_get_bdevs", category="degraded"))[0]["name"] == "R0"
    # to fail every leg, both must be error bdevs: a new array over two
    await ok(t, "bdev_raid_delete", name="R0", clear_sb=False)
    await ok(t, "bdev_error_create", base_name="M0")
    await ok(t, "bdev_raid_create", name="R1", raid_level="1", base_bdevs="EE_M0 EE_M1")
    await write(t, "R1", 0, pattern(1, 4))
    for leg in ("EE_M0", "EE_M1"):
        await ok(t, "bdev_error_inject_error", name=leg, io_type="read", num=1,
                 status="unrecovered_read_error")
    status, _ = await read(t, "R1", 0, 1)
    assert status == Status.UNRECOVERED_READ_ERROR, "both legs failed: the error shows"
    assert await ok(t, "bdev_raid_get_bdevs", category="offline") != []
    assert await ok(t, "bdev_raid_get_bdevs", category="online") == []
    assert await write(t, "R1", 0, pattern(1)) == Status.WRITE_FAULT
    assert (await read(t, "R1", 0, 1))[0] == Status.UNRECOVERED_READ_ERROR


async def test_raid1_create_checks(t: Target) -> None:
    await malloc(t, "M0")
    await malloc(t, "M1")
    await malloc(t, "K0", blocks=128, bs=4096)
    code, msg = await err(t, "bdev_raid_create", name="R", raid_level="raid0",
                          base_bdevs=["M0", "M1"], strip_size_kb=64)
    assert code == EOPNOTSUPP and "only raid1" in msg
    code, msg = await err(t, "bdev_raid_create", name="R", raid_level="raid1",
                          base_bdevs=["M0", "M1"], strip_size_kb=64)
    assert code == -32602 and "strip size" in msg
    code, msg = await err(t, "bdev_raid_create", name="R", raid_level="raid1",
                          base_bdevs=["M0"])
    assert code == -32602 and "at least two" in msg
    code, msg = await err(t, "bdev_raid_create", name="R", raid_level="raid1",
                          base_bdevs=["M0", "K0"])
    assert code == -32602 and "block sizes" in msg
    code, msg = await err(t, "bdev_raid_create", name="R", raid_level="raid1",
                          base_bdevs=["M0", "M0"])
    assert code == -32602 and "twice" in msg
    code, msg = await err(t, "bdev_raid_create", name="R", raid_level="raid1",
                          base_bdevs=["M0", "M1"], superblock=True)
    assert code == EOPNOTSUPP and "superblock" in msg
    code, _ = await err(t, "bdev_raid_create", name="R", raid_level="raid1",
                        base_bdevs=["M0", "nope"])
    assert code == ENODEV
    # all or nothing: M1 taken by someone else leaves M0 unclaimed
    await ok(t, "bdev_passthru_create", base_bdev_name="M1", name="P1")
    code, _ = await err(t, "bdev_raid_create", name="R", raid_level="raid1",
                        base_bdevs=["M0", "M1"])
    assert code == EBUSY and t.bdevs.get("M0").claimed_by is None
    code, _ = await err(t, "bdev_raid_delete", name="M0")
    assert code == ENODEV


async def test_raid1_replay_keeps_failed_leg_out(t: Target) -> None:
    await make_mirror(t)
    await ok(t, "bdev_error_inject_error", name="EE_M1", io_type="write", num=1)
    await write(t, "R0", 0, pattern(1))
    doc = t.save_config()
    fresh = Target(settings([0]))
    try:
        await fresh.apply_config({"subsystems": doc["subsystems"]}, "saved")
        raid = fresh.bdevs.get("R0")
        assert [leg.failed for leg in raid.legs] == [False, True]  # type: ignore[attr-defined]
        assert raid.uuid == t.bdevs.get("R0").uuid
    finally:
        await fresh.stop()


# ---- split --------------------------------------------------------------------------


async def test_split_offsets_and_bounds(t: Target) -> None:
    await malloc(t, "M0", blocks=1027)
    names = await ok(t, "bdev_split_create", base_bdev="M0", split_count=4)
    assert names == ["M0p0", "M0p1", "M0p2", "M0p3"]
    parts = [t.bdevs.get(n) for n in names]
    assert [p.num_blocks for p in parts] == [256] * 4, "the remainder is left unused"
    for i, name in enumerate(names):
        assert await write(t, name, 0, pattern(1, i)) == 0
        assert await write(t, name, 255, pattern(1, 100 + i)) == 0
    for i in range(4):
        assert base_bytes(t, "M0", 256 * i, 1) == pattern(1, i)
        assert base_bytes(t, "M0", 256 * i + 255, 1) == pattern(1, 100 + i)
        assert (await read(t, names[i], 255, 1))[1] == pattern(1, 100 + i)
    x, _ = await io(t, "M0p1", IOType.WRITE, 255, 2, pattern(2))
    assert x.status == Status.LBA_OUT_OF_RANGE, "a part never spills into its neighbour"
    assert base_bytes(t, "M0", 512, 1) == pattern(1, 2)
    x, _ = await io(t, "M0p3", IOType.FLUSH, 0, 256)
    assert x.status == 0
    ds = (await ok(t, "bdev_get_bdevs", name="M0p2"))[0]["driver_specific"]
    assert ds == {"split": {"base_bdev": "M0", "offset_blocks": 512}}
    assert t.bdevs.get("M0").claimed_by == "split M0"
    cfg = [e for e in t.save_config()["subsystems"][0]["config"]
           if e["method"] == "bdev_split_create"]
    assert cfg == [{"method": "bdev_split_create",
                    "params": {"base_bdev": "M0", "split_count": 4}}], "written once"


async def test_split_size_mb_delete_and_uuids(t: Target) -> None:
    await malloc(t, "M0", blocks=8192)  # 4 MiB
    names = await ok(t, "bdev_split_create", base_bdev="M0", split_count=3, split_size_mb=1)
    assert [t.bdevs.get(n).num_blocks for n in names] == [2048] * 3
    uuids = [t.bdevs.get(n).uuid for n in names]
    code, msg = await err(t, "bdev_split_create", base_bdev="M0p0", split_count=5,
                          split_size_mb=1)
    assert code == -32602 and "do not fit" in msg
    # one part deleted on its own: the others keep the base claimed and keep working
    await ok(t, "bdev_delete", name="M0p0")
    assert t.bdevs.get("M0").claimed_by == "split M0"
    assert await write(t, "M0p1", 0, pattern(1)) == 0
    assert base_bytes(t, "M0", 2048 * 1, 1) == pattern(1)
    cfg = [e for e in t.save_config()["subsystems"][0]["config"]
           if e["method"] == "bdev_split_create"]
    assert len(cfg) == 1 and cfg[0]["params"]["split_size_mb"] == 1
    # an exported part blocks bdev_split_delete
    await ok(t, "bdev_passthru_create", base_bdev_name="M0p2", name="P")
    code, msg = await err(t, "bdev_split_delete", base_bdev="M0")
    assert code == EBUSY and "M0p2" in msg
    await ok(t, "bdev_passthru_delete", name="P")
    await ok(t, "bdev_split_delete", base_bdev="M0")
    assert not any(n in t.bdevs for n in names)
    assert t.bdevs.get("M0").claimed_by is None
    code, _ = await err(t, "bdev_split_delete", base_bdev="M0")
    assert code == ENODEV
    again = await ok(t, "bdev_split_create", base_bdev="M0", split_count=3, split_size_mb=1)
    assert [t.bdevs.get(n).uuid for n in again] == uuids, "stable namespace identity"


async def test_split_refusals(t: Target) -> None:
    await malloc(t, "M0", blocks=3)
    code, msg = await err(t, "bdev_split_create", base_bdev="M0", split_count=4)
    assert code == -32602 and "fewer than" in msg
    code, _ = await err(t, "bdev_split_create", base_bdev="M0", split_count=0)
    assert code == -32602
    await malloc(t, "M0p0")
    code, msg = await err(t, "bdev_split_create", base_bdev="M0", split_count=2)
    assert code == EEXIST and "M0p0" in msg
    assert t.bdevs.get("M0").claimed_by is None


# ---- a whole stack --------------------------------------------------------------------


async def test_stack_round_trip_through_save_config(t: Target) -> None:
    await make_mirror(t)
    await ok(t, "bdev_split_create", base_bdev="R0", split_count=2)
    await ok(t, "bdev_delay_create", base_bdev_name="R0p1", name="D0", avg_read_latency=10,
             p99_read_latency=20, avg_write_latency=30, p99_write_latency=40)
    await ok(t, "bdev_passthru_create", base_bdev_name="D0", name="P0")
    data = pattern(2, 42)
    assert await write(t, "P0", 5, data) == 0
    assert base_bytes(t, "M0", 512 + 5, 2) == data and base_bytes(t, "M1", 512 + 5, 2) == data
    doc = t.save_config()
    methods = [e["method"] for e in doc["subsystems"][0]["config"]]
    assert methods == ["bdev_malloc_create", "bdev_malloc_create", "bdev_error_create",
                       "bdev_raid_create", "bdev_split_create", "bdev_delay_create",
                       "bdev_passthru_create"], "bases before what stacks on them"
    fresh = Target(settings([0]))
    try:
        await fresh.apply_config({"subsystems": doc["subsystems"]}, "saved")
        assert fresh.save_config()["subsystems"] == doc["subsystems"]
        for b in t.bdevs:
            other = fresh.bdevs.get(b.name)
            assert (other.uuid, other.num_blocks, other.module) == (
                b.uuid, b.num_blocks, b.module)
    finally:
        await fresh.stop()
    # teardown in reverse order releases every claim
    for method, name in (("bdev_passthru_delete", "P0"), ("bdev_delay_delete", "D0")):
        await ok(t, method, name=name)
    await ok(t, "bdev_split_delete", base_bdev="R0")
    await ok(t, "bdev_raid_delete", name="R0")
    await ok(t, "bdev_error_delete", name="EE_M1")
    assert all(b.claimed_by is None for b in t.bdevs)
