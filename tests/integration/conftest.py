"""Fixtures that run the real `blocktarget` process (see target_proc.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from .target_proc import Launcher


@pytest.fixture
def running_target() -> Iterator[Launcher]:
    """`running_target(config, cores=[0], args=())` starts a target; all die at teardown."""
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.cleanup()


@pytest.fixture(scope="module")
def module_launcher() -> Iterator[Launcher]:
    """For tests that share one target to keep the suite fast (each uses its own names)."""
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.cleanup()


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (install Debian package 'prometheus')")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    return path
