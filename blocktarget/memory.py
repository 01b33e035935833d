"""How much of a machine's memory hugepages may take, from /proc/meminfo.

Hugepages reserved in the kernel's pool are lost to everything else: the page cache, the
kernel, and the target's own Python heap. `blocktarget setup` used to reserve 2,048 MiB
whatever the machine; in a 2 GiB guest that was all of it, and the target started
afterwards was killed by the OOM killer minutes later, with nothing in its log. The
policy, shared by `blocktarget setup` and the DMA allocator's warning:

* **Default reservation**: ``min(2048 MiB, 25% of MemTotal)``, rounded down to whole
  hugepages, and never more than the limit below. 1 GiB guest: 244 MiB; 2 GiB: 512 MiB;
  8 GiB and more: 2,048 MiB (several controllers' queues and buffers; the driver
  reserves each controller's need when it is attached and says how much that is).
* **What must stay outside hugepages**: ``max(25% of MemTotal, min(1 GiB, 50% of
  MemTotal))`` -- half of a machine up to 2 GiB, 1 GiB of one between 2 and 4 GiB, a
  quarter of anything larger (the three pieces meet at 2 and 4 GiB). A request that
  would leave less (pools of every page size counted) is refused unless forced. About
  1 GiB is what Debian, the kernel's own allocations and a running target need to live
  without the OOM killer; a small guest cannot spare that much, so it keeps half; on a
  large machine a quarter keeps the page cache useful. So a 1 GiB guest may reserve up
  to about 490 MiB (the VM tests reserve 64), a 2 GiB guest 1 GiB, a 24 GiB host 18 GiB.

MemTotal comes from a meminfo file whose path is a parameter, so tests can describe a
2 GiB or a 24 GiB machine without touching the real one.
"""

from __future__ import annotations

from pathlib import Path

MEMINFO = "/proc/meminfo"
MIB_KB = 1024
GIB_KB = 1024 * 1024
DEFAULT_HUGEMEM_CAP_KB = 2 * GIB_KB  # the default never reserves more than this
DEFAULT_HUGEMEM_SHARE = 4  # ... nor more than 1/4 of MemTotal
MIN_LEFT_KB = GIB_KB  # this stays outside hugepages (a smaller machine keeps half) ...
MIN_LEFT_SHARE = 4  # ... and at least 1/4 of MemTotal


def read_meminfo(path: str | Path = MEMINFO) -> dict[str, int]:
    """The fields of a /proc/meminfo-style file, in kB (page counts as they are); an
    unreadable file gives an empty dict (the callers say what they could not check)."""
    out: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def min_left_kb(mem_total_kb: int) -> int:
    """Memory that must stay outside hugepage pools:
    max(25% of MemTotal, min(1 GiB, 50% of MemTotal))."""
    return max(mem_total_kb // MIN_LEFT_SHARE, min(MIN_LEFT_KB, (mem_total_kb + 1) // 2))


def max_hugemem_kb(mem_total_kb: int) -> int:
    """The most all hugepage pools together may hold."""
    return max(0, mem_total_kb - min_left_kb(mem_total_kb))


def default_hugemem_kb(mem_total_kb: int, hugepage_kb: int, other_pools_kb: int = 0) -> int:
    """The default reservation for the pool of ``hugepage_kb`` pages, whole pages:
    min(2048 MiB, 25% of MemTotal), within what the limit leaves after the pools of
    other page sizes (``other_pools_kb``, e.g. 1 GiB pages reserved at boot)."""
    want = min(DEFAULT_HUGEMEM_CAP_KB, mem_total_kb // DEFAULT_HUGEMEM_SHARE,
               max(0, max_hugemem_kb(mem_total_kb) - other_pools_kb))
    return want // hugepage_kb * hugepage_kb


def mib(kb: int) -> str:
    """kB as whole MiB, the unit --hugemem takes."""
    return f"{kb // MIB_KB} MiB"
