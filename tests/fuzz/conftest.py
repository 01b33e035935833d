"""Fuzzing tier: bounded-time fuzzers that run in CI like any other test.

The marker lets a developer skip them (`-m "not fuzz"`) or run only them (`-m fuzz`);
their duration is set by environment variables so CI can stay bounded while a longer
campaign is one variable away (see each test's docstring).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: bounded-time fuzzing (tests/fuzz); set "
                            "FUZZ_PDU_SECONDS / LIVE_FUZZ_STREAMS to run longer")
