"""PCI facts from sysfs that both the driver and `blocktarget setup` need.

Kept apart from vfio.py so that `setup` (and anything else that only looks at sysfs)
does not pay for cffi's C declaration parsing, which takes seconds on a slow machine.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSFS_PCI = Path("/sys/bus/pci/devices")


def normalize_bdf(bdf: str) -> str:
    """Accept 'bb:dd.f' or 'dddd:bb:dd.f' (any case); return the 'dddd:bb:dd.f' sysfs form."""
    text = bdf.strip().lower()
    parts = text.split(":")
    if len(parts) == 2:
        parts = ["0000", *parts]
    try:
        dom, bus, devfn = parts
        dev, fn = devfn.split(".")
        value = f"{int(dom, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{int(fn, 16):x}"
    except ValueError:
        raise ValueError(f"{bdf!r} is not a PCI address (expected like 0000:00:04.0)") from None
    return value


def pci_driver(bdf: str) -> str | None:
    try:
        return os.path.basename(os.readlink(SYSFS_PCI / bdf / "driver"))
    except OSError:
        return None


def iommu_group(bdf: str) -> int | None:
    try:
        return int(os.path.basename(os.readlink(SYSFS_PCI / bdf / "iommu_group")))
    except (OSError, ValueError):
        return None


def group_devices(group: int) -> list[str]:
    path = Path(f"/sys/kernel/iommu_groups/{group}/devices")
    try:
        return sorted(p.name for p in path.iterdir())
    except OSError:
        return []
