"""Reactors: core selection, pinned threads, message passing, pollers.

Pinning and back-off are observable facts (the kernel's affinity list, how often a poller
ran), so the tests look at those rather than at the reactor's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Iterator

import pytest

from blocktarget.reactor import LOOP_KIND, Reactor, ReactorPool, parse_cores

AVAILABLE = sorted(os.sched_getaffinity(0))
TWO = len(AVAILABLE) >= 2


def cpus_allowed(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


# ---- parse_cores ----------------------------------------------------------------


def test_cores_default_is_all_available() -> None:
    assert parse_cores(None) == AVAILABLE[:1]  # one reactor by default, as SPDK's -m 0x1


def test_cores_forms() -> None:
    c0 = AVAILABLE[0]
    assert parse_cores([c0]) == [c0]
    assert parse_cores(str(c0)) == [c0]
    assert parse_cores(hex(1 << c0)) == [c0]
    assert parse_cores(hex(1 << c0).upper().replace("X", "x")) == [c0]
    assert parse_cores(1 << c0) == [c0], "a JSON integer is a mask, as in SPDK's -m"
    assert parse_cores(f" [{c0}] ") == [c0]
    if TWO:
        a, b = AVAILABLE[:2]
        assert parse_cores([b, a]) == [b, a], "order as written: reactor i runs on cores[i]"
        assert parse_cores(f"{a},{b}") == [a, b]
        assert parse_cores(f"{a}, {b}") == [a, b]
        assert parse_cores(hex((1 << a) | (1 << b))) == [a, b]
        if b == a + 1:
            assert parse_cores(f"{a}-{b}") == [a, b]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "non-empty list of integers"),
        ([True], "non-empty list of integers"),
        (["0"], "non-empty list of integers"),
        (1.5, "must be a list or a hex mask"),
        (True, "must be a list or a hex mask"),
        ({"0": 1}, "must be a list or a hex mask"),
        ("0x0", "no cores selected"),
        ("", "no cores selected"),
        ("3-1", "no cores selected"),
        ([0, 0], "duplicate cores"),
        ("0,0", "duplicate cores"),
        ([1000], "cores [1000] are not available to this process"),
        ("0x" + "f" * 64, "are not available to this process"),
        ("abc", "cannot parse cores 'abc'"),
        ("0x", "cannot parse cores '0x'"),
        ("-1", "cannot parse cores '-1'"),
        ("0-x", "cannot parse cores"),
    ],
)
def test_cores_errors(spec: object, message: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_cores(spec)
    assert message in str(ei.value)


# ---- reactor lifecycle and messages ------------------------------------------------------


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(0, AVAILABLE[-1], busy_poll_us=1000, idle_poll_us=50_000)
    r.start()
    yield r
    r.stop()


def test_start_pins_thread_and_runs_own_loop(reactor: Reactor) -> None:
    assert reactor.running and reactor.tid != threading.get_native_id()
    assert cpus_allowed(reactor.tid) == str(reactor.core)
    # pinning is per thread: the starting thread keeps its affinity
    assert sorted(os.sched_getaffinity(0)) == AVAILABLE
    assert reactor.send(threading.get_native_id).result(5) == reactor.tid
    assert reactor.send(lambda: os.sched_getaffinity(0)).result(5) == {reactor.core}
    assert type(reactor.loop).__module__.startswith("uvloop" if LOOP_KIND == "uvloop" else "asyncio")


def test_unpinned_reactor_keeps_affinity() -> None:
    r = Reactor(0, AVAILABLE[0], pin=False)
    r.start()
    try:
        assert set(map(int, _expand(cpus_allowed(r.tid)))) == set(AVAILABLE)
    finally:
        r.stop()


def _expand(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_pin_to_unavailable_core_fails_start() -> None:
    r = Reactor(0, 1000)
    with pytest.raises(OSError):
        r.start()
    assert not r.running


def test_send_result_args_and_exception(reactor: Reactor) -> None:
    assert reactor.send(lambda a, b: a + b, 2, 3).result(5) == 5
    fut = reactor.send(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fut.result(5)
    # the reactor survives a failing message
    assert reactor.send(lambda: "still here").result(5) == "still here"
    assert reactor.stats.messages >= 3


def test_send_coroutine_runs_on_reactor_loop(reactor: Reactor) -> None:
    async def work(x: int) -> tuple[int, int]:
        await asyncio.sleep(0.01)
        assert asyncio.get_running_loop() is reactor.loop
        return x * 2, threading.get_native_id()

    assert reactor.send(work, 21).result(5) == (42, reactor.tid)

    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        reactor.send(fail).result(5)


async def test_call_from_another_loop(reactor: Reactor) -> None:
    """The control plane awaits reactors from its own loop through `call`."""
    assert await reactor.call(lambda: threading.get_native_id()) == reactor.tid

    async def coro() -> str:
        return "ok"

    assert await reactor.call(coro) == "ok"
    with pytest.raises(ValueError):
        await reactor.call(int, "x")


def test_call_inline_on_own_reactor(reactor: Reactor) -> None:
    async def outer() -> int:
        # already on the reactor: runs inline instead of queueing a message to itself
        return await reactor.call(lambda: threading.get_native_id())

    assert reactor.send(outer).result(5) == reactor.tid


def test_stop_resolves_outstanding_message() -> None:
    """A sender waiting on a message must not hang when the reactor stops under it."""
    r = Reactor(0, AVAILABLE[0])
    r.start()
    fut = r.send(asyncio.sleep, 100)
    time.sleep(0.05)
    r.stop()
    assert not r.running
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(2)
    assert r.loop is not None and r.loop.is_closed()


# ---- pollers ------------------------------------------------------------------------------


def test_poller_busy_then_backs_off(reactor: Reactor) -> None:
    state = {"budget": 0}

    def poll() -> int:
        if state["budget"] > 0:
            state["budget"] -= 1
            return 1
        return 0

    poller = reactor.send(reactor.register_poller, poll, "test").result(5)
    # with work pending the reactor polls back to back
    state["budget"] = 300
    deadline = time.monotonic() + 5
    while state["budget"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state["budget"] == 0, "300 work items should drain within 5 s of busy polling"
    assert poller.work == 300
    # idle: after the 1 ms busy window it polls every 50 ms, not continuously. Each poll
    # schedules the next >= 50 ms later, so a window of T seconds holds at most T/0.05 + 1
    # polls however late the threads run (a spinning poller would show thousands); and
    # it keeps polling: 3 more polls come, sooner or later on a loaded machine.
    time.sleep(0.1)
    t0 = time.monotonic()
    before = poller.runs
    time.sleep(0.5)
    idle_runs = poller.runs - before
    window = time.monotonic() - t0
    assert idle_runs <= window / 0.05 + 2, \
        f"idle poller ran {idle_runs} times in {window:.2f} s (50 ms period)"
    deadline = time.monotonic() + 10
    while poller.runs - before < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert poller.runs - before >= 3, "the idle poller stopped polling"
    # kick: work arrives, the reactor polls now rather than at the next idle tick
    state["budget"] = 50
    t0 = time.monotonic()
    reactor.loop.call_soon_threadsafe(reactor.kick)
    while state["budget"] and time.monotonic() - t0 < 5:
        time.sleep(0.001)
    assert state["budget"] == 0
    desc = reactor.describe()
    assert desc["pollers"] == [{"name": "test", "runs": poller.runs, "work": poller.work,
                                "errors": 0, "failing": 0, "dormant": False}]
    # unregistered: it never runs again
    reactor.send(reactor.unregister_poller, poller).result(5)
    runs = poller.runs
    time.sleep(0.15)
    assert poller.runs == runs
    assert reactor.stats.poll_work >= 350


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_failing_poller_is_retried_with_backoff_not_dropped(
        reactor: Reactor, caplog: pytest.LogCaptureFixture) -> None:
    """A poller that raises (an NVMe queue's completion handler, say) is called again after
    a growing pause: dropping it would leave its I/O never completed. Its neighbours run
    every poll meanwhile, and the log has its traceback without one line per call."""
    calls = {"n": 0}

    def bad() -> int:
        calls["n"] += 1
        raise RuntimeError("poller bug")

    good_runs = {"n": 0}

    def good() -> int:
        good_runs["n"] += 1
        return 1  # keeps the reactor spinning: polls as fast as it can

    reactor.send(reactor.register_poller, bad, "bad").result(5)
    reactor.send(reactor.register_poller, good, "good").result(5)
    assert wait_for(lambda: calls["n"] >= 6)
    # 1 + 2 + 4 + 8 + 16 ms of pauses before the 6th call: while "good" ran every poll
    assert good_runs["n"] > 2 * calls["n"]
    assert [p.name for p in reactor.pollers] == ["bad", "good"]
    bad_poller = reactor.pollers[0]
    assert bad_poller.failing >= 6 and bad_poller.errors == bad_poller.failing
    assert reactor.stats.poller_errors >= 6
    assert caplog.text.count("poller bad failed") == 1
    assert "RuntimeError: poller bug" in caplog.text
    desc = reactor.describe()["pollers"][0]
    assert desc["name"] == "bad" and desc["errors"] >= 6
    reactor.send(reactor.unregister_poller, bad_poller).result(5)
    reactor.send(reactor.unregister_poller, reactor.pollers[0]).result(5)


def test_poller_that_recovers_is_called_every_poll_again(
        reactor: Reactor, caplog: pytest.LogCaptureFixture) -> None:
    state = {"calls": 0, "fail": 3}

    def flaky() -> int:
        state["calls"] += 1
        if state["fail"]:
            state["fail"] -= 1
            raise OSError("transient")
        return 1

    poller = reactor.send(reactor.register_poller, flaky, "flaky").result(5)
    assert wait_for(lambda: state["calls"] >= 50)
    assert poller.failing == 0 and poller.errors == 3 and poller.runs >= 40
    assert "poller flaky works again after 3 failures" in caplog.text
    reactor.send(reactor.unregister_poller, poller).result(5)


def test_dormant_pollers_get_no_idle_poll_but_run_when_kicked(reactor: Reactor) -> None:
    """A poller its owner put to sleep (set_dormant) gets no timed idle poll; a kick
    still polls every poller, the sleeping one too; the idle poll comes back as soon as
    one poller is awake, and a sleeping poller that raises is woken for its retries."""
    calls = {"a": 0, "b": 0, "fail": False}

    def pa() -> int:
        calls["a"] += 1
        if calls["fail"]:
            raise RuntimeError("owner bug")
        return 0

    def pb() -> int:
        calls["b"] += 1
        return 0

    a = reactor.send(reactor.register_poller, pa, "a").result(5)
    b = reactor.send(reactor.register_poller, pb, "b").result(5)
    reactor.send(reactor.set_dormant, a, True).result(5)
    reactor.send(reactor.set_dormant, b, True).result(5)
    time.sleep(0.06)
    runs = reactor.stats.poll_runs
    time.sleep(0.3)
    assert reactor.stats.poll_runs - runs == 0, "no timed poll while every poller sleeps"
    before = calls["b"]
    reactor.loop.call_soon_threadsafe(reactor.kick)
    assert wait_for(lambda: calls["b"] > before), "a kick polls the sleeping pollers"
    reactor.send(lambda: (reactor.set_dormant(a, False), reactor.kick())).result(5)
    time.sleep(0.05)
    before = calls["b"]
    time.sleep(0.2)
    # (idle_poll_us is 50 ms here: 4 in 200 ms, 2 on a loaded machine)
    assert calls["b"] - before >= 2, "one awake poller: the idle poll every idle_poll_us"
    # asleep again, then failing: its retries need the timed poll, so it wakes
    reactor.send(reactor.set_dormant, a, True).result(5)
    calls["fail"] = True
    reactor.loop.call_soon_threadsafe(reactor.kick)
    assert wait_for(lambda: a.errors >= 4), "a failing poller is retried"
    assert not a.dormant
    reactor.send(reactor.unregister_poller, a).result(5)
    reactor.send(reactor.unregister_poller, b).result(5)
    assert reactor._awake == 0 and not reactor.pollers


def test_busy_idle_accounting(reactor: Reactor) -> None:
    def spin() -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass

    reactor.send(spin).result(5)
    time.sleep(0.05)
    d = reactor.describe()
    assert d["lcore"] == reactor.core and d["tid"] == reactor.tid
    assert d["busy"] >= 40_000_000, "50 ms of CPU spent on the reactor thread"
    assert d["idle"] > 0
    assert abs(d["busy_seconds"] - d["busy"] / 1e9) < 1e-9


# ---- pool ------------------------------------------------------------------------------------


async def test_pool_broadcast_runs_on_every_reactor() -> None:
    cores = AVAILABLE[:2] if TWO else AVAILABLE[:1] * 2
    pool = ReactorPool(cores, pin=TWO)
    pool.start()
    try:
        assert len(pool) == 2 and [r.index for r in pool] == [0, 1]
        got = await pool.broadcast(lambda r: (r.index, threading.get_native_id()))
        assert got == [(0, pool[0].tid), (1, pool[1].tid)]
        assert pool[0].tid != pool[1].tid
        if TWO:
            assert [cpus_allowed(r.tid) for r in pool] == [str(c) for c in cores]

        async def acoro(r: Reactor) -> int:
            await asyncio.sleep(0)
            return r.core

        assert await pool.broadcast(acoro) == cores
        # round robin placement
        assert [pool.pick().index for _ in range(5)] == [0, 1, 0, 1, 0]
    finally:
        pool.stop()
    assert not any(r.running for r in pool)


def test_pool_start_failure_stops_started_reactors() -> None:
    pool = ReactorPool([AVAILABLE[0], 1000])
    with pytest.raises(OSError):
        pool.start()
    assert not pool[0].running


def test_describe_while_reactor_changes_ownership() -> None:
    """framework_get_reactors and /metrics read `owned` from the control-plane thread
    while the reactor adds and drops connections; reading must never raise."""
    import sys

    class Conn:
        def __str__(self) -> str:  # Python code inside the iteration lets the GIL switch
            return "conn"

    r = Reactor(0, AVAILABLE[0], pin=False)
    stop = threading.Event()
    conns = [Conn() for _ in range(300)]

    def churn() -> None:
        while not stop.is_set():
            for c in conns:
                r.own("connection", c)
            for c in conns:
                r.disown("connection", c)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        end = time.monotonic() + 0.8
        n = 0
        while time.monotonic() < end:
            d = r.describe()
            assert all(c == "conn" for c in d["connections"])
            n += 1
    finally:
        stop.set()
        t.join(5)
        sys.setswitchinterval(old)
    assert n > 10
