"""Pieces of `blocktarget perf` that need no peer: the latency histogram, the verify
pattern, size/argument parsing, result merging and formatting."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blocktarget.cli import build_parser
from blocktarget.host.cli import format_discovery_entry, perf_config
from blocktarget.host.controller import default_hostid, default_hostnqn
from blocktarget.host.perf import (
    LatencyHistogram,
    OpStats,
    PerfConfig,
    PerfResult,
    format_result,
    make_pattern,
    parse_size,
    verify_pattern,
)
from blocktarget.nvme import spec, structs

H = LatencyHistogram

# ------------------------------------------------------------------------ histogram


def test_buckets_are_contiguous_and_cover_their_values() -> None:
    prev_high = 0
    for idx in range(H.NBUCKETS - 1):
        low, high = H.bucket_bounds(idx)
        assert low == prev_high, idx
        assert high > low
        assert H.index(low) == idx and H.index(high - 1) == idx
        prev_high = high


@given(st.integers(0, 1 << 40))
def test_relative_bucket_width_is_bounded(v: int) -> None:
    low, high = H.bucket_bounds(H.index(v))
    assert low <= v < high or v >= 1 << 40
    if v >= 2 * H.SUB:
        assert (high - low) / low <= 1 / H.SUB + 1e-12


def test_percentiles_match_exact_within_bucket_error() -> None:
    rng = random.Random(7)
    samples = [int(rng.lognormvariate(11, 0.8)) for _ in range(50_000)]  # ~60 us median
    h = H()
    for s in samples:
        h.record(s)
    ordered = sorted(samples)
    for p in (1, 50, 90, 99, 99.9, 100):
        exact = ordered[max(0, math.ceil(len(ordered) * p / 100) - 1)]
        assert abs(h.percentile(p) - exact) <= exact / H.SUB + 1, p
    assert h.count == len(samples)
    assert h.min == ordered[0] and h.max == ordered[-1]
    assert h.mean == pytest.approx(sum(samples) / len(samples))
    assert h.percentile(0) >= h.min and h.percentile(100) == h.max


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(3)
    parts = [[rng.randrange(1, 10_000_000) for _ in range(2000)] for _ in range(4)]
    merged = H()
    for part in parts:
        h = H()
        for v in part:
            h.record(v)
        merged.merge(H.from_dict(json.loads(json.dumps(h.to_dict()))))  # across processes
    whole = H()
    for v in (v for part in parts for v in part):
        whole.record(v)
    assert merged.counts == whole.counts
    assert (merged.count, merged.total, merged.min, merged.max) == (
        whole.count, whole.total, whole.min, whole.max)
    for p in (50, 99, 99.9):
        assert merged.percentile(p) == whole.percentile(p)


def test_empty_and_edge_values() -> None:
    h = H()
    assert h.percentile(99) == 0.0 and h.mean == 0.0
    h.merge(H())
    assert h.count == 0
    h.record(-5)  # clock oddity: clamps to 0
    h.record(1 << 50)  # beyond the last bucket: kept in it, max stays exact
    assert h.count == 2 and h.min == 0 and h.max == 1 << 50
    assert h.percentile(100) == 1 << 50
    with pytest.raises(ValueError):
        h.percentile(101)


def test_memory_is_bounded() -> None:
    h = H()
    for v in range(0, 1 << 36, 1 << 20):
        h.record(v)
    assert len(h.counts) == H.NBUCKETS < 3000


# -------------------------------------------------------------------------- pattern


@pytest.mark.parametrize("lba_size", [512, 4096, 520])
def test_pattern_roundtrip_and_detection(lba_size: int) -> None:
    data = make_pattern(100, 4, lba_size, 7)
    assert len(data) == 4 * lba_size
    assert verify_pattern(data, 100, 4, lba_size, 7) is None
    assert "generation 7, expected 8" in verify_pattern(data, 100, 4, lba_size, 8)
    # A block written to the wrong place.
    shifted = make_pattern(101, 4, lba_size, 7)
    assert "holds the block of LBA 101" in verify_pattern(shifted, 100, 4, lba_size, 7)
    # A torn block: stamp intact, body corrupt.
    torn = bytearray(data)
    torn[2 * lba_size + 100] ^= 1
    assert "LBA 102" in verify_pattern(bytes(torn), 100, 4, lba_size, 7)
    assert "no pattern" in verify_pattern(bytes(len(data)), 100, 4, lba_size, 7)
    assert "bytes" in verify_pattern(data[:-1], 100, 4, lba_size, 7)


def test_pattern_blocks_differ_by_lba_and_generation() -> None:
    a = make_pattern(0, 1, 512, 1)
    assert a != make_pattern(1, 1, 512, 1) and a != make_pattern(0, 1, 512, 2)


# ------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("128k", 131072),
    ("1M", 1 << 20), ("2g", 2 << 30), (512, 512), (" 8 k ", 8192),
])
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "4x", "-4k", "1.5M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def _perf_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["perf", "-a", "127.0.0.1", "-n", "nqn.x:y", *argv])


def test_perf_arguments() -> None:
    cfg = perf_config(_perf_args("-s", "4421", "-w", "randrw", "-o", "128k", "-q", "64",
                                 "-t", "2.5", "--rwmixread", "30", "--connections", "3",
                                 "--nsid", "2", "--verify", "-g", "-G", "--size", "64M"))
    assert (cfg.port, cfg.workload, cfg.io_size, cfg.qd, cfg.time_s) == (
        4421, "randrw", 131072, 64, 2.5)
    assert (cfg.rwmixread, cfg.connections, cfg.nsid, cfg.size) == (30, 3, 2, 64 << 20)
    assert cfg.verify and cfg.hdgst and cfg.ddgst and cfg.random and cfg.read_share == 30
    d = perf_config(_perf_args())
    assert (d.port, d.workload, d.io_size, d.qd, d.time_s, d.rwmixread) == (
        4420, "randread", 4096, 32, 10.0, 70)
    assert d.read_share == 100 and d.random and not d.verify


@pytest.mark.parametrize(("workload", "share", "rand"), [
    ("read", 100, False), ("write", 0, False), ("randread", 100, True),
    ("randwrite", 0, True), ("rw", 70, False), ("randrw", 70, True),
])
def test_workload_shapes(workload: str, share: int, rand: bool) -> None:
    cfg = PerfConfig("a", 1, "n", workload=workload)
    assert (cfg.read_share, cfg.random) == (share, rand)


@pytest.mark.parametrize("argv", [["-q", "0"], ["-t", "0"], ["--rwmixread", "101"],
                                  ["--connections", "0"], ["-o", "0"]])
def test_perf_rejects_bad_values(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        perf_config(_perf_args(*argv))


def test_perf_rejects_unknown_workload() -> None:
    with pytest.raises(SystemExit):
        _perf_args("-w", "trim")


def test_host_commands_registered() -> None:
    p = build_parser()
    a = p.parse_args(["discover", "-a", "10.0.0.1", "-s", "8009", "-q", "nqn.h:1"])
    assert (a.traddr, a.trsvcid, a.hostnqn) == ("10.0.0.1", 8009, "nqn.h:1")
    a = p.parse_args(["connect", "-a", "h", "-n", "nqn.s:1", "--nr-io-queues", "4", "-g"])
    assert (a.nr_io_queues, a.hdr_digest, a.data_digest, a.trsvcid) == (4, True, False, 4420)


# ------------------------------------------------------------------------- results


def _result(ops: int, lat: int, elapsed: float = 2.0) -> PerfResult:
    r = PerfResult(PerfConfig("127.0.0.1", 4420, "nqn.x:y"), elapsed_s=elapsed, qd=32)
    s = OpStats()
    for _ in range(ops):
        s.ops += 1
        s.bytes += 4096
        s.hist.record(lat)
    r.read = s
    return r


def test_result_merge_and_summary() -> None:
    a = _result(1000, 100_000)
    b = _result(3000, 300_000, elapsed=2.1)
    b2 = PerfResult.from_wire(b.config, json.loads(json.dumps(b.to_wire())))
    a.merge(b2)
    s = a.summary()
    assert a.elapsed_s == 2.1
    assert s["read"]["ops"] == 4000
    assert s["read"]["iops"] == pytest.approx(4000 / 2.1)
    assert s["read"]["mib_s"] == pytest.approx(4000 * 4096 / 2.1 / (1 << 20))
    assert s["read"]["lat_us"]["mean"] == pytest.approx(250.0)
    assert s["read"]["lat_us"]["p50"] == pytest.approx(300.0, rel=1 / 64)
    assert s["total"]["ops"] == 4000 and s["write"]["ops"] == 0
    text = format_result(a)
    assert "read" in text and "total" in text and "IOPS" in text
    assert a.ok
    a.write.errors = 1
    assert not a.ok


# ------------------------------------------------------------------------ host ids


def test_default_host_identity_is_stable() -> None:
    nqn = default_hostnqn()
    assert nqn == default_hostnqn()
    assert nqn.startswith("nqn.")
    assert len(default_hostid(nqn)) == 16
    assert default_hostid(nqn) == default_hostid(nqn)


def test_discovery_entry_format() -> None:
    e = structs.DiscoveryEntry(
        trtype=spec.TransportType.TCP, adrfam=spec.AddressFamily.IPV4,
        subtype=spec.SubsystemType.NVME, treq=spec.Treq.SECURE_CHANNEL_NOT_REQUIRED,
        portid=1, cntlid=0xFFFF, asqsz=32, trsvcid="4420", traddr="10.0.0.1",
        subnqn="nqn.2026-01.io.blocktarget:default", tsas=structs.tcp_tsas())
    text = format_discovery_entry(0, e)
    for line in ("trtype:  tcp", "adrfam:  ipv4", "subtype: nvme subsystem",
                 "treq:    not required", "trsvcid: 4420", "traddr:  10.0.0.1",
                 "subnqn:  nqn.2026-01.io.blocktarget:default", "sectype: none"):
        assert line in text


def test_engine_arguments() -> None:
    d = perf_config(_perf_args())
    assert (d.engine, d.copy_data) == ("auto", False)
    c = perf_config(_perf_args("--engine", "python", "--copy-data"))
    assert (c.engine, c.copy_data) == ("python", True)
    with pytest.raises(SystemExit):
        _perf_args("--engine", "rust")
    with pytest.raises(ValueError, match="--journal runs on the Python engine"):
        perf_config(_perf_args("--engine", "c", "--verify", "--journal", "/tmp/x.journal"))
    j = perf_config(_perf_args("--verify", "--journal", "/tmp/x.journal"))
    assert j.engine == "auto"  # and the run picks Python (tests/integration/test_perf_engines)
