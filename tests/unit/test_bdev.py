"""bdev core and the malloc/null modules.

The NVMe layer will copy `io.status` straight into a CQE, so statuses are checked as exact
NVMe values; malloc is checked for real data (not only "it completed"), because the data
path's tests will trust it as the reference disk.
"""

from __future__ import annotations

import os

import pytest

from blocktarget.bdev import (
    LATENCY_BUCKETS_NS,
    MODULES,
    Bdev,
    BdevIO,
    BdevRegistry,
    IOType,
    Status,
    blocks_from_params,
    load_builtin_modules,
)
from blocktarget.errors import AlreadyExists, Busy, InvalidParams, NoSuchDevice
from blocktarget.params import validate
from blocktarget.reactor import Reactor

load_builtin_modules()


def make(module: str, **params: object) -> Bdev:
    mod = MODULES[module]
    return mod.create(validate(mod.schema, params))


def run_io(ch, io_type: IOType, offset: int = 0, blocks: int = 0, buf=None) -> BdevIO:
    """Submit and return the completed IO; malloc and null complete inline."""
    done: list[BdevIO] = []
    io = BdevIO(io_type, offset, blocks, buf, done.append)
    ch.submit(io)
    assert done == [io], "the callback must run exactly once"
    return io


# ---- registry ----------------------------------------------------------------


def test_registry_add_get_find_remove() -> None:
    reg = BdevRegistry()
    a = make("null", name="A", num_blocks=8)
    a.aliases.append("alias-a")
    reg.add(a)
    assert len(reg) == 1 and "A" in reg
    assert reg.get("A") is a
    assert reg.find("alias-a") is a
    assert reg.find(a.uuid) is a, "SPDK lets bdevs be named by uuid"
    assert reg.find("B") is None
    with pytest.raises(NoSuchDevice) as ei:
        reg.get("B")
    assert ei.value.code == -19 and "'B'" in ei.value.message
    reg.remove(a)
    assert a.removed and len(reg) == 0 and "A" not in reg


def test_registry_duplicates() -> None:
    reg = BdevRegistry()
    a = make("null", name="A", num_blocks=8)
    reg.add(a)
    with pytest.raises(AlreadyExists) as ei:
        reg.add(make("null", name="A", num_blocks=8))
    assert ei.value.code == -17 and "'A' already exists" in ei.value.message
    with pytest.raises(AlreadyExists, match="uuid"):
        reg.add(make("null", name="B", num_blocks=8, uuid=a.uuid))
    b = make("null", name="alias-of-c", num_blocks=8)
    c = make("null", name="C", num_blocks=8)
    c.aliases.append("alias-of-c")
    reg.add(c)
    with pytest.raises(AlreadyExists):
        reg.add(b)  # a name may not shadow another bdev's alias
    assert [x.name for x in reg] == ["A", "C"]


def test_claims_make_delete_busy() -> None:
    reg = BdevRegistry()
    a = make("malloc", name="M", num_blocks=16)
    reg.add(a)
    a.claim("subsystem nqn.x")
    a.claim("subsystem nqn.x")  # idempotent for the same owner
    with pytest.raises(Busy) as ei:
        a.claim("raid1 R0")
    assert ei.value.code == -16 and "already claimed by subsystem nqn.x" in ei.value.message
    with pytest.raises(Busy) as ei:
        reg.check_removable("M")
    assert ei.value.code == -16
    assert "in use by subsystem nqn.x" in ei.value.message
    a.release("someone else")  # only the owner can release
    assert a.claimed_by == "subsystem nqn.x"
    assert a.describe()["claimed"] is True
    a.release("subsystem nqn.x")
    assert reg.check_removable("M") is a
    assert a.describe()["claimed"] is False
    a.destruct()


# ---- creation parameters ----------------------------------------------------------


def test_blocks_from_params() -> None:
    assert blocks_from_params({"num_blocks": 10, "size_mb": None, "block_size": 512}) == 10
    assert blocks_from_params({"num_blocks": None, "size_mb": 2, "block_size": 4096}) == 512
    with pytest.raises(InvalidParams, match="either 'num_blocks' or 'size_mb'"):
        blocks_from_params({"num_blocks": 10, "size_mb": 1, "block_size": 512})
    with pytest.raises(InvalidParams, match="missing required parameter 'num_blocks'"):
        blocks_from_params({"num_blocks": None, "size_mb": None, "block_size": 512})


def test_malloc_params() -> None:
    b = make("malloc", name="M", size_mb=1, block_size=4096)
    assert (b.num_blocks, b.block_size, b.size_bytes) == (256, 4096, 1 << 20)
    assert b.write_cache is True, "RAM is volatile: hosts must know a flush is not durability"
    assert b.config_entry() == {
        "method": "bdev_malloc_create",
        "params": {"num_blocks": 256, "block_size": 4096, "name": "M", "uuid": b.uuid},
    }
    b.destruct()
    with pytest.raises(InvalidParams, match="block_size' must be 512 or 4096"):
        make("malloc", name="M", num_blocks=8, block_size=1024)
    with pytest.raises(InvalidParams, match="power of two"):
        make("malloc", name="M", num_blocks=8, block_size=1000)
    with pytest.raises(InvalidParams, match="md_size"):
        make("malloc", name="M", num_blocks=8, md_size=8)
    with pytest.raises(InvalidParams, match="not a valid UUID"):
        make("malloc", name="M", num_blocks=8, uuid="nope")


def test_null_params_accept_spdk_total_size() -> None:
    b = make("null", name="N", total_size=1, block_size=512)
    assert b.num_blocks == 2048
    assert b.write_cache is False


# ---- malloc data ---------------------------------------------------------------------


@pytest.mark.parametrize("bs", [512, 4096])
def test_malloc_write_read_compare(bs: int) -> None:
    b = make("malloc", name="M", num_blocks=64, block_size=bs)
    ch = b.get_io_channel(None)
    data = os.urandom(3 * bs)
    assert run_io(ch, IOType.WRITE, 5, 3, data).status == Status.SUCCESS

    # read into a caller's buffer
    buf = bytearray(3 * bs)
    assert run_io(ch, IOType.READ, 5, 3, buf).status == Status.SUCCESS
    assert bytes(buf) == data
    # zero-copy read: the backend hands out its own memory
    io = run_io(ch, IOType.READ, 6, 1)
    assert io.status == Status.SUCCESS and bytes(io.buf) == data[bs : 2 * bs]
    # neighbours untouched (fresh anonymous memory is zero)
    assert bytes(run_io(ch, IOType.READ, 4, 1).buf) == bytes(bs)
    assert bytes(run_io(ch, IOType.READ, 8, 1).buf) == bytes(bs)

    assert run_io(ch, IOType.COMPARE, 5, 3, data).status == Status.SUCCESS
    bad = bytearray(data)
    bad[-1] ^= 1
    assert run_io(ch, IOType.COMPARE, 5, 3, bytes(bad)).status == Status.COMPARE_FAILURE
    assert run_io(ch, IOType.FLUSH).status == Status.SUCCESS
    b.close_channel(None)
    b.destruct()


@pytest.mark.parametrize("io_type", [IOType.UNMAP, IOType.WRITE_ZEROES])
@pytest.mark.parametrize("bs", [512, 4096])
def test_malloc_unmap_and_write_zeroes(bs: int, io_type: IOType) -> None:
    b = make("malloc", name="M", num_blocks=16, block_size=bs)
    ch = b.get_io_channel(None)
    data = b"\xa5" * (16 * bs)
    run_io(ch, IOType.WRITE, 0, 16, data)
    assert run_io(ch, io_type, 2, 3).status == Status.SUCCESS
    got = bytes(run_io(ch, IOType.READ, 0, 16).buf)
    assert got[: 2 * bs] == data[: 2 * bs]
    assert got[2 * bs : 5 * bs] == bytes(3 * bs)
    assert got[5 * bs :] == data[5 * bs :]
    b.destruct()


def test_malloc_large_zeroing_crosses_chunk() -> None:
    """Zeroing is done in 1 MiB chunks; a 3 MiB unmap must clear every chunk."""
    b = make("malloc", name="M", size_mb=4, block_size=4096)
    ch = b.get_io_channel(None)
    n = b.num_blocks
    run_io(ch, IOType.WRITE, 0, n, b"\x01" * b.size_bytes)
    run_io(ch, IOType.WRITE_ZEROES, 10, 768)
    got = bytes(run_io(ch, IOType.READ, 0, n).buf)
    assert got[: 10 * 4096].count(1) == 10 * 4096
    assert not any(got[10 * 4096 : 778 * 4096])
    assert got[778 * 4096 :].count(1) == (n - 778) * 4096
    b.destruct()


@pytest.mark.parametrize("module", ["malloc", "null"])
def test_lba_out_of_range(module: str) -> None:
    b = make(module, name="X", num_blocks=16, block_size=512)
    ch = b.get_io_channel(None)
    for off, n in [(16, 1), (15, 2), (-1, 1), (0, 17)]:
        io = run_io(ch, IOType.READ, off, n, bytearray(max(n, 0) * 512))
        assert io.status == Status.LBA_OUT_OF_RANGE == 0x080
    assert run_io(ch, IOType.WRITE, 15, 2, bytes(1024)).status == Status.LBA_OUT_OF_RANGE
    assert run_io(ch, IOType.READ, 15, 1, bytearray(512)).status == Status.SUCCESS
    st = b.stats_total()
    assert st.errors[IOType.READ] == 4 and st.errors[IOType.WRITE] == 1
    assert st.ops[IOType.READ] == 1 and st.bytes[IOType.READ] == 512
    assert ch.outstanding == 0
    b.destruct()


def test_unsupported_io_type_is_invalid_opcode() -> None:
    b = make("null", name="N", num_blocks=8)
    b.io_types = frozenset({IOType.READ})
    io = run_io(b.get_io_channel(None), IOType.WRITE, 0, 1, bytes(512))
    assert io.status == Status.INVALID_OPCODE


def test_backend_exception_becomes_internal_error() -> None:
    """A wrong-sized buffer is a caller bug; it must fail the IO, not escape the reactor."""
    b = make("malloc", name="M", num_blocks=8)
    io = run_io(b.get_io_channel(None), IOType.WRITE, 0, 2, bytes(100))
    assert io.status == Status.INTERNAL_ERROR
    b.destruct()


def test_null_reads_zeroes_and_discards_writes() -> None:
    b = make("null", name="N", num_blocks=4096, block_size=4096)
    ch = b.get_io_channel(None)
    assert run_io(ch, IOType.WRITE, 0, 2, b"\xff" * 8192).status == Status.SUCCESS
    assert bytes(run_io(ch, IOType.READ, 0, 2).buf) == bytes(8192)
    buf = bytearray(b"\xff" * 8192)
    run_io(ch, IOType.READ, 0, 2, buf)
    assert buf == bytes(8192)
    # larger than the shared zero buffer (1 MiB)
    big = run_io(ch, IOType.READ, 0, 512)
    assert len(big.buf) == 2 << 20 and not any(big.buf)
    assert run_io(ch, IOType.COMPARE, 0, 1, bytes(4096)).status == Status.SUCCESS
    assert run_io(ch, IOType.COMPARE, 0, 1, b"\x01" + bytes(4095)).status == (
        Status.COMPARE_FAILURE
    )


# ---- statistics --------------------------------------------------------------------------


def test_per_channel_stats_and_histogram() -> None:
    b = make("malloc", name="M", num_blocks=64, block_size=512)
    r1, r2 = Reactor(0, 0), Reactor(1, 0)
    c1, c2 = b.get_io_channel(r1), b.get_io_channel(r2)
    assert b.get_io_channel(r1) is c1, "one channel per reactor"
    assert c1 in r1.owned["channel"] and c2 in r2.owned["channel"]
    for _ in range(3):
        run_io(c1, IOType.WRITE, 0, 2, bytes(1024))
    for _ in range(5):
        run_io(c2, IOType.READ, 0, 4)
    run_io(c2, IOType.UNMAP, 0, 8)

    assert c1.stats.ops[IOType.WRITE] == 3 and c1.stats.ops[IOType.READ] == 0
    assert c2.stats.ops[IOType.READ] == 5 and c2.stats.bytes[IOType.READ] == 5 * 2048
    st = b.stats_total()
    assert st.ops[IOType.WRITE] == 3 and st.bytes[IOType.WRITE] == 3 * 1024
    assert st.ops[IOType.READ] == 5 and st.bytes[IOType.READ] == 5 * 2048
    assert st.ops[IOType.UNMAP] == 1 and st.bytes[IOType.UNMAP] == 8 * 512
    for t in (IOType.READ, IOType.WRITE, IOType.UNMAP):
        assert len(st.latency_buckets[t]) == len(LATENCY_BUCKETS_NS) + 1
        assert sum(st.latency_buckets[t]) == st.ops[t], "every op lands in one bucket"
        assert st.latency_sum_ns[t] > 0
    assert sum(st.latency_buckets[IOType.FLUSH]) == 0

    # closing a channel (its reactor stopped or the bdev went away) keeps its counts
    b.close_channel(r1)
    assert c1 not in r1.owned["channel"]
    assert 0 not in b.channels
    st2 = b.stats_total()
    assert st2.ops == st.ops and st2.bytes == st.bytes
    assert st2.latency_buckets == st.latency_buckets
    b.close_channel(r2)
    b.close_channel(r2)  # closing twice is harmless
    assert b.stats_total().ops == st.ops
    # a new channel on the same reactor starts from zero, totals keep growing
    c1b = b.get_io_channel(r1)
    assert c1b is not c1 and c1b.stats.ops[IOType.WRITE] == 0
    run_io(c1b, IOType.WRITE, 0, 1, bytes(512))
    assert b.stats_total().ops[IOType.WRITE] == 4
    b.destruct()


def test_errors_have_no_latency_sample() -> None:
    b = make("null", name="N", num_blocks=4)
    ch = b.get_io_channel(None)
    run_io(ch, IOType.READ, 10, 1)
    st = b.stats_total()
    assert st.errors[IOType.READ] == 1 and st.ops[IOType.READ] == 0
    assert sum(st.latency_buckets[IOType.READ]) == 0


def test_describe_matches_spdk_shape() -> None:
    b = make("malloc", name="M", num_blocks=32, block_size=4096)
    d = b.describe()
    assert d["name"] == "M" and d["product_name"] == "Malloc disk"
    assert (d["block_size"], d["num_blocks"]) == (4096, 32)
    assert d["supported_io_types"]["write_zeroes"] is True
    assert d["supported_io_types"]["nvme_admin"] is False
    assert set(d["assigned_rate_limits"]) == {
        "rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec"}
    b.destruct()


def test_destruct_with_zero_copy_buffer_outstanding() -> None:
    """A read's zero-copy buffer may still be queued on a socket when the bdev goes away."""
    b = make("malloc", name="M", num_blocks=8)
    ch = b.get_io_channel(None)
    run_io(ch, IOType.WRITE, 0, 1, b"\x07" * 512)
    held = run_io(ch, IOType.READ, 0, 1).buf
    b.close_channel(None)
    b.destruct()
    assert bytes(held) == b"\x07" * 512
