"""A guard against test files that leave DMA-style memory mapped.

The NVMe driver's DMA regions and io_uring's buffers are MAP_SHARED anonymous
mappings: a test that does not close what made them keeps them for the whole session
(one file once left 4.4 GiB, and the suite's process reached 5.5 GiB). The limit is far
above what any file legitimately keeps to its end, so the check does not flake.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

LIMIT = 256 << 20


def shared_anon_bytes() -> int:
    """Bytes of MAP_SHARED|MAP_ANONYMOUS mappings (``/dev/zero (deleted)`` in maps)."""
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if "/dev/zero" in line:
                start, end = line.split(None, 1)[0].split("-")
                total += int(end, 16) - int(start, 16)
    return total


@pytest.fixture(scope="module", autouse=True)
def _no_shared_memory_left_mapped() -> Iterator[None]:
    before = shared_anon_bytes()
    yield
    if shared_anon_bytes() - before > LIMIT:
        gc.collect()  # (what only a cycle still holds is not a leak)
        grown = shared_anon_bytes() - before
        if grown > LIMIT:
            pytest.fail(f"this file left {grown >> 20} MiB of shared anonymous memory "
                        "mapped (DMA allocators or io_uring buffers not closed)")
