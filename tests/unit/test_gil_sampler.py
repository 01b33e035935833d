"""The GIL sampler of a reactor thread (csrc/gil.c, blocktarget/gilsample.py): its
samples follow the thread's CPU time, and tell Python (the GIL held) from C calls that
release it and from the kernel's and the event loop's time outside both; a reactor runs
one and reports the three parts of its CPU time where the metrics and nvmf_get_stats
read them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest
from prometheus_client import generate_latest

from blocktarget import gilsample
from blocktarget.reactor import Reactor

pytestmark = pytest.mark.skipif(gilsample.lib is None and os.environ.get("CI") != "true",
                                reason="blocktarget._fastpath is not built (no compiler)")


@pytest.fixture(autouse=True)
def _built() -> None:
    if gilsample.lib is None:
        pytest.fail("CI=true but blocktarget._fastpath is not built: no GIL sampler")


def _on_thread(work: Any, cpu_s: float) -> tuple[int, int, int, int]:
    """Run ``work`` on a new thread, sampled, until it used ``cpu_s`` of CPU: (samples,
    held, the period in ns, the thread's CPU ns)."""
    out: list[Any] = []

    def run() -> None:
        s = gilsample.GilSampler.start()
        assert s is not None
        t0 = time.thread_time_ns()
        while time.thread_time_ns() - t0 < cpu_s * 1e9:
            work()
        cpu = time.thread_time_ns() - t0
        s.stop()
        out.append((s.samples, s.held, s.period_ns, cpu))

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return out[0]


def test_python_holds_the_gil() -> None:
    """Pure Python: every sample finds the GIL held, and the samples add up to the
    thread's CPU time (within the tick's granularity)."""
    def work() -> None:
        sum(range(2000))

    samples, held, period, cpu = _on_thread(work, 0.4)
    assert samples > 0 and held >= 0.95 * samples
    assert 0.7 * cpu <= samples * period <= 1.3 * cpu + 8_000_000


def test_c_calls_release_it() -> None:
    """CRC32C over 8 MiB per call (cffi releases the GIL around it): few samples find
    the GIL held."""
    lib, ffi = gilsample.lib, gilsample.ffi
    buf = ffi.new("unsigned char[]", 8 << 20)

    def work() -> None:
        lib.bt_crc32c(0, buf, 8 << 20)

    samples, held, _period, _cpu = _on_thread(work, 0.4)
    assert samples > 0 and held <= 0.15 * samples


def test_kernel_time_outside_python_is_not_held() -> None:
    """System calls that release the GIL (socket sends through the kernel's loopback):
    their time is not counted as held, though no C data plane call made it."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    chunk = b"x" * 65536

    def work() -> None:
        for _ in range(16):
            try:
                a.send(chunk)
            except BlockingIOError:
                pass
            try:
                b.recv(1 << 20)
            except BlockingIOError:
                pass

    try:
        samples, held, _period, _cpu = _on_thread(work, 0.4)
    finally:
        a.close()
        b.close()
    assert samples > 0 and held < 0.7 * samples


def test_reactor_reports_its_split() -> None:
    """A reactor samples its own thread from its start; its CPU time splits into the C
    calls, the GIL held (sampled) and the rest, which the metrics report as such."""
    r = Reactor(0, sorted(os.sched_getaffinity(0))[0], pin=False)
    r.start()
    try:
        assert r.gil is not None

        def spin() -> int:
            t0 = time.thread_time_ns()
            while time.thread_time_ns() - t0 < 0.3e9:
                sum(range(1000))
            return r.gil.samples  # type: ignore[union-attr]

        assert r.send(spin).result(10) > 0
        busy = r.cpu_ns()
        released, held, other, sampled = r.gil_split_ns(busy)
        assert sampled and held > 0.2e9 and released == r.stats.gil_released_ns
        assert other == max(busy - released - held, 0)
    finally:
        r.stop()
    assert not r.gil._s.running  # type: ignore[union-attr]


async def test_metrics_say_whether_sampled() -> None:
    from blocktarget.app import Target
    from blocktarget.config import Settings
    from blocktarget.metrics import make_registry

    t = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None))
    await t.start()
    try:
        text = generate_latest(make_registry(t)).decode()
        res = await t.dispatcher.handle({"jsonrpc": "2.0", "id": 1,
                                         "method": "nvmf_get_stats"})
    finally:
        await t.stop()
    assert 'blocktarget_reactor_gil_sampled{reactor="0"} 1.0' in text
    assert "blocktarget_reactor_gil_free_other_seconds_total" in text
    g = res["result"]["poll_groups"][0]
    assert g["gil_sample_period_ns"] == gilsample.PERIOD_US * 1000
    assert g["gil_samples"] >= g["gil_held_samples"] >= 0


def test_two_reactors_each_sample_their_own_thread() -> None:
    """Reactors started together each get a sampler of their own thread (one signal
    handler for the process): busy Python on one is not counted on the other."""
    core = sorted(os.sched_getaffinity(0))[0]
    rs = [Reactor(i, core, pin=False) for i in range(2)]
    for r in rs:
        r.start()
    try:
        assert all(r.gil is not None for r in rs)
        idle0 = rs[1].gil.samples  # type: ignore[union-attr]

        def spin() -> None:
            t0 = time.thread_time_ns()
            while time.thread_time_ns() - t0 < 0.2e9:
                sum(range(1000))

        rs[0].send(spin).result(10)
        periods = 0.2e9 / (gilsample.PERIOD_US * 1000)  # (the spin's CPU, in periods)
        assert rs[0].gil.held >= periods / 2  # type: ignore[union-attr]
        assert rs[1].gil.samples - idle0 < periods / 5  # type: ignore[union-attr]
    finally:
        for r in rs:
            r.stop()
