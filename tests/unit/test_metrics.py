"""Prometheus collector over a target whose bdev channels did real I/O.

The collector only adds up counters the reactors keep, so the test drives I/O on a
reactor's own channel (as the data path will) and checks the scrape reports exactly
that I/O, in Prometheus' conventions, and that promtool accepts the text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blocktarget.app import Target
from blocktarget.bdev import LATENCY_BUCKETS_NS, BdevIO, IOType, Status
from blocktarget.config import Settings
from blocktarget.metrics import TargetCollector, make_registry


def promtool_or_skip() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (install Debian package 'prometheus')")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    return path


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None))
    await t.start()
    await t.dispatcher.handle({"jsonrpc": "2.0", "id": 1, "method": "bdev_malloc_create",
                               "params": {"name": "Malloc0", "num_blocks": 64,
                                          "block_size": 4096}})
    await t.dispatcher.handle({"jsonrpc": "2.0", "id": 2, "method": "bdev_null_create",
                               "params": {"name": "Null0", "num_blocks": 64}})
    await t.dispatcher.handle({"jsonrpc": "2.0", "id": 3, "method": "nope"})
    yield t
    await t.stop()


def io_on_reactor(t: Target, bdev_name: str, plan: list[tuple[IOType, int, int]]) -> list[int]:
    """Submit IOs on reactor 0's channel, from the reactor thread; returns statuses."""
    bdev = t.bdevs.get(bdev_name)
    reactor = t.reactors[0]

    def run(r) -> list[int]:
        ch = bdev.get_io_channel(r)
        done: list[BdevIO] = []
        for io_type, off, n in plan:
            buf = os.urandom(n * bdev.block_size) if io_type == IOType.WRITE else None
            ch.submit(BdevIO(io_type, off, n, buf, done.append))
        return [io.status for io in done]

    return reactor.send(run, reactor).result(5)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_scrape_reports_reactor_io(target: Target) -> None:
    statuses = io_on_reactor(target, "Malloc0", [
        (IOType.WRITE, 0, 2), (IOType.WRITE, 2, 1), (IOType.READ, 0, 3), (IOType.READ, 64, 1),
        (IOType.FLUSH, 0, 0), (IOType.UNMAP, 0, 4)])
    assert statuses == [0, 0, 0, Status.LBA_OUT_OF_RANGE, 0, 0]
    io_on_reactor(target, "Null0", [(IOType.READ, 0, 8)] * 5)

    text = generate_latest(make_registry(target)).decode()
    s = samples(text)
    m = (("bdev", "Malloc0"),)
    assert s[("blocktarget_bdev_read_bytes_total", m)] == 3 * 4096
    assert s[("blocktarget_bdev_written_bytes_total", m)] == 3 * 4096
    assert s[("blocktarget_bdev_read_bytes_total", (("bdev", "Null0"),))] == 5 * 8 * 512
    assert s[("blocktarget_bdev_ops_total", (("bdev", "Malloc0"), ("type", "write")))] == 2
    assert s[("blocktarget_bdev_ops_total", (("bdev", "Malloc0"), ("type", "read")))] == 1
    assert s[("blocktarget_bdev_ops_total", (("bdev", "Malloc0"), ("type", "unmap")))] == 1
    assert s[("blocktarget_bdev_errors_total", (("bdev", "Malloc0"), ("type", "read")))] == 1
    assert s[("blocktarget_bdev_size_bytes", m)] == 64 * 4096
    assert s[("blocktarget_bdev_claimed", (("bdev", "Malloc0"), ("module", "malloc")))] == 0

    # histogram: cumulative buckets in seconds, +Inf == _count == ops, _sum > 0
    lab = (("bdev", "Malloc0"), ("type", "write"))
    buckets = [(le, v) for (name, labels), v in s.items()
               if name == "blocktarget_bdev_io_latency_seconds_bucket"
               and dict(labels).get("bdev") == "Malloc0" and dict(labels)["type"] == "write"
               for le in [dict(labels)["le"]]]
    assert len(buckets) == len(LATENCY_BUCKETS_NS) + 1
    values = [v for _, v in sorted(buckets, key=lambda b: float(b[0]))]
    assert values == sorted(values), "buckets are cumulative"
    assert values[-1] == 2
    assert ("+Inf", 2.0) in buckets and ("1e-05", values[0]) in buckets
    assert s[("blocktarget_bdev_io_latency_seconds_count", lab)] == 2
    assert 0 < s[("blocktarget_bdev_io_latency_seconds_sum", lab)] < 5

    r = (("core", "0"), ("reactor", "0"))
    assert s[("blocktarget_reactor_busy_seconds_total", r)] > 0
    assert s[("blocktarget_reactor_idle_seconds_total", r)] >= 0
    assert s[("blocktarget_reactor_messages_total", (("reactor", "0"),))] >= 2
    assert s[("blocktarget_rpc_requests_total", ())] == 3
    assert s[("blocktarget_rpc_errors_total", ())] == 1
    assert s[("blocktarget_info", (("pid", str(os.getpid())), ("version", target.version)))] == 1


async def test_counters_survive_bdev_channel_close(target: Target) -> None:
    io_on_reactor(target, "Null0", [(IOType.WRITE, 0, 1)] * 3)
    reactor = target.reactors[0]
    bdev = target.bdevs.get("Null0")
    reactor.send(bdev.close_channel, reactor).result(5)
    s = samples(generate_latest(make_registry(target)).decode())
    assert s[("blocktarget_bdev_written_bytes_total", (("bdev", "Null0"),))] == 3 * 512


async def test_subsystem_metrics(target: Target) -> None:
    d = target.dispatcher
    await d.handle({"jsonrpc": "2.0", "id": 1, "method": "subsystem_add", "params": {
        "nqn": "nqn.2026-01.io.test:m", "namespaces": [{"bdev_name": "Malloc0"}]}})
    s = samples(generate_latest(make_registry(target)).decode())
    assert s[("blocktarget_subsystems", ())] == 1
    nqn = (("nqn", "nqn.2026-01.io.test:m"),)
    assert s[("blocktarget_subsystem_namespaces", nqn)] == 1
    assert s[("blocktarget_subsystem_connections", nqn)] == 0
    assert s[("blocktarget_bdev_claimed", (("bdev", "Malloc0"), ("module", "malloc")))] == 1


async def test_collector_reads_without_messages(target: Target) -> None:
    """A scrape must not queue work on reactors (nothing on the I/O path)."""
    before = target.reactors[0].stats.messages
    for _ in range(3):
        list(TargetCollector(target).collect())
    assert target.reactors[0].stats.messages == before


async def test_promtool_accepts_scrape(target: Target, tmp_path) -> None:
    promtool = promtool_or_skip()
    io_on_reactor(target, "Malloc0", [(IOType.WRITE, 0, 1), (IOType.READ, 0, 1)])
    text = generate_latest(make_registry(target))
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", "no lint warnings either"
