"""The C poller's adaptive busy-poll window (poll.adaptive_window; csrc/net.c, bt_net.h).

After a reply the reactor spins its busy-poll window for the host's next command. A
host slower than the window (a QEMU guest's kernel initiator: QD1 latency 3x the
kernel target's with the spinning, 1.64x with none) gains nothing from it and loses
the CPU it needs, so the window halves each time the next command comes later than the
whole of it and doubles back when one comes within it. Here a host thread plays both
hosts over the real socket lent to C, the reactor's loop running on the test's thread,
whose CPU time is the reactor's: a slow host's commands leave the reactor asleep
between them, back-to-back ones get the whole window again; the bytes are the
reference's (the Python path) throughout.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest
from lane_harness import OPTS, rd
from net_harness import SockPair
from test_netpoll import SQFLOW_OFF, _lent, _nvme_pair, _stop_fakes

from blocktarget.nvme import netpoll

pytestmark = pytest.mark.skipif(not netpoll.AVAILABLE and os.environ.get("CI") != "true",
                                reason="blocktarget._fastpath is not built (no compiler)")

WINDOW_US = 5000  # (long against a loaded machine's scheduling, short against PAUSE_S)
PAUSE_S = 0.010  # the slow host's think time between a reply and its next command


@pytest.fixture(autouse=True)
def _built() -> None:
    if not netpoll.AVAILABLE:
        pytest.fail("CI=true but blocktarget._fastpath is not built: the C poller is untested")


def _host(sock: Any, cmds: list[bytes], sizes: list[int], pause: float, got: bytearray,
          errors: list[BaseException]) -> None:
    """QD1: a command, its whole reply, ``pause``, the next."""
    try:
        for c, size in zip(cmds, sizes, strict=True):
            sock.sendall(c)
            want = len(got) + size
            while len(got) < want:
                b = sock.recv(1 << 16)
                if not b:
                    raise ConnectionError("the target closed the connection")
                got += b
            if pause:
                time.sleep(pause)
    except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
        errors.append(exc)


def _qd1(p: SockPair, first: int, n: int, pause: float) -> tuple[float, float]:
    """The host thread sends ``n`` reads at QD1 while the reactor's loop runs here; the
    reactor thread's (CPU, wall) seconds over the run."""
    cmds = [rd(first + i, 2, (first + i) % 64) for i in range(n)]
    sizes = []
    for c in cmds:  # (the reference's reply to each: what the host waits for)
        before = len(p.ref.tr.out)
        p.ref.io.data_received(c)
        p.ref.run()
        sizes.append(len(p.ref.tr.out) - before)
    end = p.fast.end
    got, errors = bytearray(), []
    end.sock.settimeout(10)
    th = threading.Thread(target=_host, args=(end.sock, [p.for_fast(c) for c in cmds],
                                              sizes, pause, got, errors), daemon=True)
    t0, c0 = time.monotonic(), time.thread_time()
    th.start()
    while th.is_alive():
        p.loop.run_until_complete(asyncio.sleep(0.01))
        assert time.monotonic() - t0 < 60, "the host thread never finished"
    cpu, wall = time.thread_time() - c0, time.monotonic() - t0
    end.sock.setblocking(False)
    end.out += got
    assert not errors, errors
    return cpu, wall


def _pair(backend: str) -> SockPair:
    if backend == "nvme":
        return _nvme_pair()
    p = SockPair(OPTS, cattr=SQFLOW_OFF)
    p.feed(rd(900, 2, 0))
    assert _lent(p)
    return p


@pytest.mark.parametrize("backend", ["memory", "nvme"])
def test_window_follows_the_hosts_pace(backend: str) -> None:
    """A host whose next command comes 10 ms after each reply, against a 5 ms window:
    the window halves to nothing within a few commands and the reactor then sleeps
    between commands (its CPU < 25 % of the time; 6-13 % measured, where spinning the
    window took 45-55 % with a 3 ms window and 6 ms pauses). Then a host sending back
    to back: the window grows back to the whole of it."""
    p = _pair(backend)
    try:
        r = p.fast.reactor
        r.set_poll_mode("adaptive")
        r.busy_poll_us = WINDOW_US
        assert r.adaptive_window  # (the default)
        shrinks0, grows0 = p.stats.net_window_shrinks, p.stats.net_window_grows
        _qd1(p, 1, 8, PAUSE_S)  # (the window learns the host's pace)
        n = r.net_poller.n
        assert n.win_ns == 0 and p.stats.net_window_shrinks - shrinks0 >= 3, (
            n.win_ns, p.stats.net_window_shrinks - shrinks0)
        cpu, wall = _qd1(p, 20, 8, PAUSE_S)
        assert cpu < 0.25 * wall, f"the reactor spun for a slow host: {cpu:.3f} s CPU " \
                                 f"in {wall:.3f} s"
        assert n.win_ns == 0 and p.stats.net_window_ns == 0
        # back to back: every command comes well within the window
        _qd1(p, 40, 40, 0)
        assert n.win_ns == WINDOW_US * 1000, n.win_ns
        assert p.stats.net_window_grows - grows0 >= 3
        assert p.stats.net_window_ns > 0
        p.settle_fast()
        p.check()
        assert _lent(p)
    finally:
        p.close()
        if backend == "nvme":
            _stop_fakes()


def test_fixed_window_when_switched_off() -> None:
    """``adaptive_window`` false: the whole window after every reply, slow host or not
    (the behaviour before the option), and nothing counted."""
    p = _pair("memory")
    try:
        r = p.fast.reactor
        r.set_poll_mode("adaptive")
        r.busy_poll_us = WINDOW_US
        r.adaptive_window = False
        shrinks0 = p.stats.net_window_shrinks
        _qd1(p, 1, 6, PAUSE_S)
        assert p.stats.net_window_shrinks == shrinks0
        assert p.stats.net_window_ns == WINDOW_US * 1000
        assert r.net_poller.n.idle_ns > 0  # (it spun: 45 % of the time measured)
        p.settle_fast()
        p.check()
    finally:
        p.close()
