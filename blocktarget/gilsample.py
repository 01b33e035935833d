"""How much of a reactor thread's CPU time holds the GIL, sampled (csrc/gil.c).

Why: a reactor's CPU is Python (the GIL held), the C data plane's calls (released,
timed around each call: ``ReactorStats.gil_released_ns``) and the rest, which holds no
GIL either: the event loop waiting in epoll, the kernel's work on the thread outside our
calls (io_uring task work, softirqs). Only the first serializes reactors, and it cannot
be told from the third by timing our own code; nor does the kernel split a thread's time
into user and system precisely here (tick accounting). So a timer on the thread's CPU
clock asks, every ``PERIOD_US`` of its CPU time, whether the thread holds the GIL at that
instant (py-spy --gil's question, asked from inside): held samples x the period is an
unbiased estimate of the CPU time spent holding it, within a few percent over ten
seconds of busy reactor (one sample per 10 ms of CPU time, each weighted by the periods it
stands for). Not more often: each sample is a signal, nearly free natively but not in a
QEMU guest under TCG, where at the kernel's tick (250 Hz, the rate a 1 ms period gave)
its delivery cost the reactor ~14 % of its CPU per QD1 command (bench/RESULTS.md).

Without the extension (or when the signal is taken) there is no sampler and readers fall
back to the upper bound: everything outside the C calls counted as held.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

try:
    from ._fastpath import ffi, lib
except ImportError:  # not built: no sampler
    ffi = lib = None

PERIOD_US = 10_000
# BLOCKTARGET_GIL_SAMPLING=0 switches it off (the signal then never fires)
ENABLED = os.environ.get("BLOCKTARGET_GIL_SAMPLING", "1") != "0"


class GilSampler:
    """The sampler of the thread that started it."""

    __slots__ = ("_s",)

    def __init__(self, s: Any) -> None:
        self._s = s

    @classmethod
    def start(cls) -> GilSampler | None:
        """Sample the calling thread (a reactor's, from inside it); None when it cannot
        be (logged once per reason)."""
        if lib is None or not ENABLED or not hasattr(lib, "bt_gil_sampler_start"):
            return None
        err = ffi.new("int *")
        s = lib.bt_gil_sampler_start(PERIOD_US, err)
        if s == ffi.NULL:
            log.warning("no GIL sampling on this reactor: %s", os.strerror(-err[0]))
            return None
        return cls(s)

    @property
    def samples(self) -> int:
        return int(self._s.samples)

    @property
    def held(self) -> int:
        return int(self._s.held)

    @property
    def period_ns(self) -> int:
        return int(self._s.period_us) * 1000

    def held_ns(self) -> int:
        """CPU time with the GIL held, estimated: held samples x the period."""
        return self.held * self.period_ns

    def stop(self) -> None:
        lib.bt_gil_sampler_stop(self._s)
