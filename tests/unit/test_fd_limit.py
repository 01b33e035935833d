"""The target raises its soft open-files limit at start (blocktarget.app.raise_fd_limit):
a soft limit of 1,024 would make accept() fail with EMFILE near 1,000 connections,
far below the transport's max_connections (tests/soak found it)."""

from __future__ import annotations

import resource

from blocktarget.app import raise_fd_limit


def test_soft_limit_is_raised_to_the_hard_limit_and_never_lowered() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        got = raise_fd_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else now[0]
        assert got == now[0] == want and now[0] > 256
        assert raise_fd_limit() == now[0]  # already there: unchanged
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
