"""Fixtures for tests that need a Linux guest (kernel NVMe/TCP initiator, nvmet, VFIO).

Without QEMU or the guest kernel these tests skip locally, so a laptop without the tools can
still run the rest of the suite; in CI (``CI=true``) a missing tool must not hide a whole tier
of tests, so the same condition fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness.vm import HOST_ADDR, Guest, VMUnavailable, ensure_vm, vm_available

__all__ = ["HOST_ADDR"]

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a Linux guest in QEMU (slow; fails in CI when QEMU is missing)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/vm boots a guest, so `-m "not vm"` must deselect all of it."""
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.vm)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"VM tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"VM tests skipped: {reason}")


@pytest.fixture(scope="session")
def vm() -> Guest:
    """A guest configuration; each ``vm.run(script)`` boots a fresh VM (about 5 s under TCG)."""
    ok, reason = vm_available()
    if not ok:
        _unavailable(reason)
    try:
        vmdir = ensure_vm()
    except VMUnavailable as exc:
        _unavailable(str(exc))
    return Guest(vmdir)
