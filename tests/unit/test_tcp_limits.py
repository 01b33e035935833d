"""The sans-I/O pieces of the NVMe/TCP resource limits (tcp_limits.py), one at a time.
The same limits are driven end to end on raw sockets in tests/integration/test_limits.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from blocktarget.errors import InvalidParams
from blocktarget.tcp_limits import (
    NO_CONNECT,
    R2T_TIMEOUT,
    STALL,
    ConnectionLimiter,
    DataBudget,
    StallWatch,
    budget_for,
)
from blocktarget.transport_opts import TransportOptions

# ---- connections ----------------------------------------------------------------


def test_limiter_global_and_per_address() -> None:
    lim = ConnectionLimiter()
    a = [lim.admit("10.0.0.1", 4, 2) for _ in range(3)]
    assert a[0] and a[1] and a[2] is None
    assert lim.refused_per_address == 1
    b = [lim.admit("10.0.0.2", 4, 2) for _ in range(3)]
    assert b[0] and b[1] and b[2] is None  # the global 4 before the per-address 2
    assert lim.refused_global == 1 and lim.refused_per_address == 1
    assert lim.admit("10.0.0.3", 4, 2) is None and lim.refused_global == 2
    assert lim.open == 4 and lim.by_address == {"10.0.0.1": 2, "10.0.0.2": 2}
    lim.release(a[0])
    lim.release(a[0])  # released once, whoever sees the end first
    assert lim.open == 3 and lim.by_address["10.0.0.1"] == 1
    assert lim.admit("10.0.0.3", 4, 2) is not None
    lim.release(None)  # a connection that never had a slot


def test_limiter_zero_means_unlimited_and_threads_agree() -> None:
    lim = ConnectionLimiter()
    slots: list[Any] = []

    def churn() -> None:
        for _ in range(2000):
            s = lim.admit("h", 0, 0)
            assert s is not None
            slots.append(s)
            lim.release(s)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lim.open == 0 and lim.by_address == {} and len(slots) == 8000


# ---- data buffers --------------------------------------------------------------------


class User:
    """A queue pair as the budget sees it: bytes held, a resume callback."""

    def __init__(self, budget: DataBudget, name: str, log: list[str]) -> None:
        self.budget = budget
        self.name = name
        self.log = log
        self.budget_held = 0
        self.budget_queued = False
        self.wants: list[int] = []

    def want(self, n: int) -> None:
        """Ask for buffers in order, as _start_r2t does."""
        if self.wants or not self.budget.take(self, n):
            self.wants.append(n)
        else:
            self.log.append(f"{self.name}:{n}")

    def resume_r2t(self) -> None:
        while self.wants:
            if not self.budget.take(self, self.wants[0]):
                return
            self.log.append(f"{self.name}:{self.wants.pop(0)}")


def test_budget_per_connection_then_global_in_order() -> None:
    b = DataBudget(limit=300, per_qpair=200)
    log: list[str] = []
    x, y = User(b, "x", log), User(b, "y", log)
    x.want(100)
    x.want(100)
    x.want(100)  # over x's 200: waits
    y.want(100)  # fits the reactor (300)
    y.want(50)  # reactor full: waits
    assert log == ["x:100", "x:100", "y:100"] and b.used == 300 and b.waits == 2
    b.give_back(x, 100)  # x was first in line, but y's 50 fits now too
    assert log[3:] == ["x:100"] and b.used == 300
    b.give_back(x, 100)
    assert log[4:] == ["y:50"] and b.used == 250 and not b.waiting
    assert b.high_water == 300


def test_budget_first_buffer_always_goes_through() -> None:
    """A transfer larger than the share must not wait forever on an idle reactor."""
    b = budget_for(limit_total=64, reactors=2, per_qpair=16)
    assert b.limit == 32
    log: list[str] = []
    u = User(b, "u", log)
    u.want(1000)
    assert log == ["u:1000"] and b.used == 1000


def test_budget_drop_returns_everything_and_wakes_others() -> None:
    b = DataBudget(limit=100, per_qpair=100)
    log: list[str] = []
    x, y = User(b, "x", log), User(b, "y", log)
    x.want(100)
    y.want(10)
    assert y.budget_queued
    x.wants.append(5)  # x waits too (its own limit)
    x.budget_queued = True
    b.waiting.append(x)
    b.drop(x)  # x's connection closes
    assert x.budget_held == 0 and not x.budget_queued and x not in b.waiting
    assert log == ["x:100", "y:10"] and b.used == 10


def test_transport_options_validate_limits() -> None:
    o = TransportOptions.from_params({"max_connections": 10, "stall_timeout_sec": 0})
    assert o.max_connections == 10 and o.stall_timeout_sec == 0
    for bad in ({"num_shared_buffers": 0}, {"max_connections": -1},
                {"r2t_timeout_sec": -5}, {"max_qpair_buffer_bytes": True}):
        with pytest.raises(InvalidParams):
            TransportOptions.from_params(bad)
    saved = TransportOptions().config_params()
    assert "stall_timeout_sec" not in saved and saved["num_shared_buffers"] == 511
    assert TransportOptions.from_params({"r2t_timeout_sec": 5}).config_params()[
        "r2t_timeout_sec"] == 5


# ---- time ----------------------------------------------------------------------------


def test_watch_period() -> None:
    assert StallWatch.period(30, 30) == 7.5
    assert StallWatch.period(0, 8) == 2
    assert StallWatch.period(0, 0) is None
    assert StallWatch.period(0.01, 0) == 0.05


def check(w: StallWatch, now: float, *, connected: bool = True, buffered: int = 0,
          pdus: int = 0, r2t: dict[int, Any] | None = None) -> str | None:
    v = w.check(now, connected=connected, buffered=buffered, pdus=pdus,
                r2t_pending=r2t or {})
    return None if v is None else v[0]


def test_watch_no_connect() -> None:
    w = StallWatch(30, 30, now=0)
    assert check(w, 29, connected=False) is None
    assert check(w, 31, connected=False) == NO_CONNECT
    assert check(StallWatch(30, 30, now=0), 31, connected=True) is None


def test_watch_slowloris_trickle_is_a_stall() -> None:
    """Bytes keep arriving, but no PDU completes: that is a stall."""
    w = StallWatch(10, 0, now=0)
    for t in range(0, 11, 2):
        assert check(w, t, buffered=1 + t, pdus=5) is None
    assert check(w, 12, buffered=13, pdus=5) == STALL


def test_watch_busy_connection_is_not_a_stall() -> None:
    """Always part of the next PDU buffered, but PDUs keep completing."""
    w = StallWatch(10, 0, now=0)
    for t in range(0, 100, 2):
        assert check(w, t, buffered=100, pdus=t) is None
    # idle with nothing buffered is not a stall either
    for t in range(100, 200, 5):
        assert check(w, t, buffered=0, pdus=100) is None


def test_watch_r2t_timeout_is_per_request_and_total() -> None:
    w = StallWatch(0, 10, now=0)
    a, b = object(), object()
    assert check(w, 0, r2t={1: a}) is None
    assert check(w, 6, r2t={1: a, 2: b}) is None
    assert check(w, 10, r2t={2: b}) is None  # a answered
    assert check(w, 15, r2t={2: b}) is None
    assert check(w, 17, r2t={2: b}) == R2T_TIMEOUT
    w = StallWatch(0, 10, now=0)
    assert check(w, 0, r2t={1: a}) is None
    assert check(w, 8, r2t={1: b}) is None  # ttag 1 reused by another command: new clock
    assert check(w, 17, r2t={1: b}) is None
    assert check(w, 19, r2t={1: b}) == R2T_TIMEOUT


def test_watch_disabled() -> None:
    w = StallWatch(0, 0, now=0)
    assert check(w, 1e6, connected=False, buffered=5, r2t={1: object()}) is None


def test_budget_in_capsule_data_is_held_then_pauses_until_returned() -> None:
    """In-capsule data has arrived already: it is always accounted, in the same budget
    as R2T buffers; past the limit its connection is queued to be resumed (not read
    meanwhile), and R2Ts of others wait, until buffers come back."""
    b = DataBudget(limit=100, per_qpair=1000)
    log: list[str] = []

    class IcdUser(User):
        def resume_r2t(self) -> None:
            self.log.append(f"{self.name}:resumed")
            super().resume_r2t()

    u, y = IcdUser(b, "u", log), User(b, "y", log)
    assert b.hold(u, 60)
    assert not b.hold(u, 60)  # 120 > 100: accounted, and u must stop reading
    assert b.used == 120 and u.budget_held == 120 and u.budget_queued and b.read_pauses == 1
    y.want(10)  # an R2T of another connection waits behind it
    assert log == [] and b.waits == 1
    b.give_back(u, 60)  # under the limit again: both go on, in arrival order
    assert log == ["u:resumed", "y:10"] and b.used == 70 and not b.waiting
    assert b.high_water == 120
    b.drop(u)
    assert b.used == 10
