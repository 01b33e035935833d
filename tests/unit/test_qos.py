"""The rate limiter's arithmetic (qos.py) on a clock the test moves: admission, debt,
refill up to the burst, which buckets a read or a write draws on, and the checks of
bdev_set_qos_limit's values. The limits under real load are
tests/integration/test_qos.py."""

from __future__ import annotations

import pytest

from blocktarget import qos
from blocktarget.errors import InvalidParams
from blocktarget.qos import MB, Qos, QosLimits


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(qos.time, "monotonic", c)
    return c


def test_iops_limit_admits_a_burst_then_paces(clock: Clock) -> None:
    q = Qos(QosLimits(rw_ios_per_sec=1000), 512)
    burst = int(1000 * qos.BURST_S)
    assert all(q.admit(False, 4096) == 0.0 for _ in range(burst))
    wait = q.admit(False, 4096)
    assert 0 < wait <= 0.001 + 1e-9
    clock.t += 0.001  # one I/O's worth of time
    assert q.admit(True, 4096) == 0.0
    assert q.admit(True, 4096) > 0
    # over 2 s of steady demand exactly the rate gets through (plus nothing banked)
    n = 0
    for _ in range(2000):
        clock.t += 0.001
        while q.admit(False, 4096) == 0.0:
            n += 1
    assert n == 2000


def test_refill_is_capped_at_the_burst(clock: Clock) -> None:
    q = Qos(QosLimits(rw_ios_per_sec=2000), 512)
    while q.admit(False, 512) == 0.0:
        pass
    clock.t += 60  # a minute idle banks only BURST_S worth
    n = 0
    while q.admit(False, 512) == 0.0:
        n += 1
    assert n == int(2000 * qos.BURST_S)


def test_bandwidth_debt_lets_a_big_io_through_and_delays_the_next(clock: Clock) -> None:
    q = Qos(QosLimits(rw_mbytes_per_sec=1), 512)  # burst: 50 ms = 52,428 bytes
    assert q.admit(True, 128 * 1024) == 0.0  # more than the burst: admitted, into debt
    debt = 128 * 1024 - MB * qos.BURST_S
    wait = q.admit(True, 4096)
    assert wait == pytest.approx(debt / MB, rel=1e-6)
    clock.t += wait * 0.99
    assert q.admit(True, 4096) > 0  # still in debt
    clock.t += wait * 0.01 + 0.001
    assert q.admit(True, 4096) == 0.0


def test_read_and_write_limits_draw_on_their_own_buckets(clock: Clock) -> None:
    q = Qos(QosLimits(r_mbytes_per_sec=1, w_mbytes_per_sec=2), 512)
    while q.admit(False, 4096) == 0.0:
        pass
    assert q.admit(True, 4096) == 0.0  # reads exhausted, writes are not
    while q.admit(True, 4096) == 0.0:
        pass
    clock.t += 0.01
    assert q.admit(False, 4096) == 0.0  # reads refilled while writes were drawn
    # rw_mbytes counts both directions
    both = Qos(QosLimits(rw_mbytes_per_sec=1), 512)
    while both.admit(False, 4096) == 0.0:
        pass
    assert both.admit(True, 4096) > 0


def test_every_limit_must_have_tokens(clock: Clock) -> None:
    q = Qos(QosLimits(rw_ios_per_sec=1000, w_mbytes_per_sec=1), 512)
    assert q.admit(True, 1 << 20) == 0.0  # 1 MiB write: one I/O, the byte bucket in debt
    assert q.admit(False, 512) == 0.0  # a read draws on I/Os only
    assert q.admit(True, 512) > 0


def test_updated_keeps_unnamed_limits_and_checks_values() -> None:
    a = QosLimits().updated({"rw_ios_per_sec": 20000})
    b = a.updated({"w_mbytes_per_sec": 5})
    assert b.describe() == {"rw_ios_per_sec": 20000, "rw_mbytes_per_sec": 0,
                            "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 5}
    assert b.updated({"rw_ios_per_sec": 0}).describe()["rw_ios_per_sec"] == 0
    assert not QosLimits().any() and b.any()
    with pytest.raises(InvalidParams, match="not a multiple of 1000"):
        a.updated({"rw_ios_per_sec": 1500})
    with pytest.raises(InvalidParams, match="non-negative"):
        a.updated({"r_mbytes_per_sec": -1})
