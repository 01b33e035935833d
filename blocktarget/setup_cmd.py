"""``blocktarget setup``: prepare the host for the user-space NVMe driver (SPDK's setup.sh).

* ``blocktarget setup [--pci BDF ...] [--hugemem MiB] [--force]`` reserves hugepages,
  loads vfio-pci and binds NVMe controllers to it (all of them by default, or the ones
  named), using ``driver_override`` so that exactly these functions change driver and
  nothing else re-binds behind our back. The hugepage default and limit follow the
  machine's MemTotal (blocktarget/memory.py): a request that would leave the system too
  little is refused with exit status 2 before anything is touched, unless ``--force``.
* ``blocktarget setup reset [--pci BDF ...]`` gives them back to the kernel's driver.
* ``blocktarget setup status`` shows hugepages, the IOMMU, and every NVMe controller
  with its driver, IOMMU group and block devices.

Safety first: a controller with a mounted file system, active swap, or a holder
(device-mapper, md, LVM) on any of its namespaces or partitions is never touched, and a
device still open by a process (a running target) is not handed back. Every action is
printed, so the operator sees what changed.

Filesystem paths hang off ``root`` so the discovery and the refusals are testable against
a fake /sys and /proc tree.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .memory import default_hugemem_kb, max_hugemem_kb, mib, min_left_kb, read_meminfo

NVME_CLASS = "0x010802"
_NS_RE = re.compile(r"^(nvme\d+)(c\d+)?(n\d+)$")
VFIO_DRIVER = "vfio-pci"


class SetupError(Exception):
    """A step cannot be done; the message says why and what to do."""


class UnsafeRequest(SetupError):
    """The request would leave the machine too little memory; exit status 2 (a bad
    request, like a bad config), and nothing has been touched."""


@dataclass
class PciNvme:
    bdf: str
    vendor: str
    device: str
    driver: str | None
    group: int | None
    numa: int
    blockdevs: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)  # human-readable reasons

    @property
    def ids(self) -> str:
        return f"{self.vendor.removeprefix('0x')}:{self.device.removeprefix('0x')}"


class Host:
    """The machine's /sys and /proc (under ``root``), read and written by setup."""

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)
        self.pci = self.root / "sys/bus/pci/devices"
        self.drivers = self.root / "sys/bus/pci/drivers"

    # ---- reading ----
    def _read(self, path: Path, default: str = "") -> str:
        try:
            return path.read_text().strip()
        except OSError:
            return default

    def nvme_devices(self) -> list[PciNvme]:
        out = []
        try:
            entries = sorted(self.pci.iterdir())
        except OSError:
            return []
        for d in entries:
            if self._read(d / "class") != NVME_CLASS:
                continue
            out.append(self.describe(d.name))
        return out

    def describe(self, bdf: str) -> PciNvme:
        d = self.pci / bdf
        if not d.exists():
            raise SetupError(f"no PCI device {bdf}")
        driver = None
        try:
            driver = os.path.basename(os.readlink(d / "driver"))
        except OSError:
            pass
        group = None
        try:
            group = int(os.path.basename(os.readlink(d / "iommu_group")))
        except (OSError, ValueError):
            pass
        numa = int(self._read(d / "numa_node", "-1") or -1)
        dev = PciNvme(bdf, self._read(d / "vendor"), self._read(d / "device"), driver, group,
                      numa)
        dev.blockdevs = self.block_devices(bdf)
        dev.in_use = self.uses(dev.blockdevs)
        return dev

    def block_devices(self, bdf: str) -> list[str]:
        """Namespaces and partitions the kernel driver exposes for this controller."""
        names: list[str] = []
        d = self.pci / bdf / "nvme"
        try:
            ctrls = sorted(d.iterdir())
        except OSError:
            return names
        for ctrl in ctrls:
            for ns in sorted(ctrl.iterdir()):
                m = _NS_RE.match(ns.name)
                if not m or not (ns / "dev").exists():
                    continue  # ng* char devices hold no file systems
                if m.group(2):
                    # a path of a shared namespace (nvme0c0n1): the block device that
                    # gets mounted is the multipath head, nvme0n1
                    head = m.group(1) + m.group(3)
                    names.append(head)
                    names += self._partitions(self.root / "sys/class/block", head)
                    continue
                names.append(ns.name)
                names += sorted(p.name for p in ns.iterdir()
                                if p.name.startswith(ns.name + "p") and (p / "partition").exists())
        return sorted(set(names), key=names.index)

    def _partitions(self, block: Path, disk: str) -> list[str]:
        try:
            return sorted(p.name for p in (block / disk).iterdir()
                          if p.name.startswith(disk + "p") and (p / "partition").exists())
        except OSError:
            return []

    def uses(self, blockdevs: list[str]) -> list[str]:
        reasons: list[str] = []
        if not blockdevs:
            return reasons
        names = set(blockdevs)
        for line in self._read(self.root / "proc/mounts").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].startswith("/dev/"):
                src = parts[0]
                real = os.path.basename(os.path.realpath(src)) if self.root == Path("/") \
                    else os.path.basename(src)
                if real in names or os.path.basename(src) in names:
                    reasons.append(f"{os.path.basename(src)} is mounted on {parts[1]}")
        for line in self._read(self.root / "proc/swaps").splitlines()[1:]:
            parts = line.split()
            if parts and os.path.basename(parts[0]) in names:
                reasons.append(f"{os.path.basename(parts[0])} is active swap")
        for name in blockdevs:
            for holders in (self.root / "sys/class/block" / name / "holders",):
                try:
                    held = sorted(p.name for p in holders.iterdir())
                except OSError:
                    continue
                if held:
                    reasons.append(f"{name} is held by {', '.join(held)} (dm/md/LVM)")
        return reasons

    def iommu_groups(self) -> int:
        try:
            return len(list((self.root / "sys/kernel/iommu_groups").iterdir()))
        except OSError:
            return 0

    def hugepages(self) -> dict[int, tuple[int, int]]:
        """{page size in kB: (total, free)}"""
        out: dict[int, tuple[int, int]] = {}
        base = self.root / "sys/kernel/mm/hugepages"
        try:
            dirs = sorted(base.iterdir())
        except OSError:
            return out
        for d in dirs:
            try:
                kb = int(d.name.removeprefix("hugepages-").removesuffix("kB"))
            except ValueError:
                continue
            out[kb] = (int(self._read(d / "nr_hugepages", "0") or 0),
                       int(self._read(d / "free_hugepages", "0") or 0))
        return out

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo under ``root`` (kB): tests describe a 2 GiB or a 24 GiB machine."""
        return read_meminfo(self.root / "proc/meminfo")

    def default_hugepage_kb(self) -> int:
        return self.meminfo().get("Hugepagesize", 2048)

    def mem_total_kb(self) -> int:
        """MemTotal in kB; 0 when unknown."""
        return self.meminfo().get("MemTotal", 0)

    def vfio_loaded(self) -> bool:
        return (self.drivers / VFIO_DRIVER).exists()

    def group_users(self, group: int) -> list[int]:
        """PIDs holding /dev/vfio/<group> open (a running target, a VM)."""
        target = f"/dev/vfio/{group}"
        pids = []
        proc = self.root / "proc"
        try:
            entries = list(proc.iterdir())
        except OSError:
            return pids
        for p in entries:
            if not p.name.isdigit():
                continue
            try:
                fds = list((p / "fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd) == target:
                        pids.append(int(p.name))
                        break
                except OSError:
                    continue
        return pids

    # ---- writing ----
    def write(self, path: Path, value: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            raise SetupError(f"writing {value.strip()!r} to {path} failed: "
                             f"{exc.strerror or exc}") from None

    def bind(self, bdf: str, driver: str | None) -> str | None:
        """Move ``bdf`` to ``driver`` (None: whatever the kernel picks); returns the
        driver bound afterwards."""
        d = self.pci / bdf
        self.write(d / "driver_override", (driver or "") + "\n")
        cur = self.describe(bdf).driver
        if cur is not None and cur != driver:
            self.write(d / "driver" / "unbind", bdf)
        if self.describe(bdf).driver is None:
            try:
                self.write(self.root / "sys/bus/pci/drivers_probe", bdf)
            except SetupError:
                if driver is not None:
                    raise
        for _ in range(50):  # probing is asynchronous for some drivers
            now = self.describe(bdf).driver
            if now == driver or driver is None:
                return now
            time.sleep(0.02)
        return self.describe(bdf).driver


# ---------------------------------------------------------------------------
# actions


def _modprobe(mod: str, out: TextIO) -> None:
    exe = shutil.which("modprobe") or "/sbin/modprobe"
    proc = subprocess.run([exe, mod], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"modprobe {mod} failed: {proc.stderr.strip() or proc.returncode} "
                         f"(load it by hand, then run setup again)")
    print(f"loaded kernel module {mod}", file=out)


@dataclass
class HugepagePlan:
    """How many pages of the default size to have reserved, and why."""

    page_kb: int
    pages: int
    why: str  # how the number was chosen, for the operator
    warning: str = ""  # printed with the result (a forced request, an oversized pool)


def plan_hugepages(host: Host, hugemem_mb: int | None, force: bool = False) -> HugepagePlan:
    """Decide the reservation before anything is touched.

    ``None`` is the default: min(2048 MiB, 25% of MemTotal) within the limit. An explicit
    request that would leave the system less than it must keep (memory.py) raises
    UnsafeRequest unless ``force``; so does any request when MemTotal is unknown."""
    kb = host.default_hugepage_kb()
    total_kb = host.mem_total_kb()
    other_kb = sum(size * n for size, (n, _) in host.hugepages().items() if size != kb)
    if hugemem_mb is not None and hugemem_mb < 0:
        raise UnsafeRequest(f"--hugemem {hugemem_mb}: must be 0 or more MiB")
    if not total_kb:
        if force and hugemem_mb is not None:
            return HugepagePlan(kb, -(-hugemem_mb * 1024 // kb), f"--hugemem {hugemem_mb}",
                                "MemTotal unknown: reserved without the safety check (--force)")
        raise UnsafeRequest(f"cannot read MemTotal from {host.root / 'proc/meminfo'}, so "
                            "cannot tell how much memory hugepages may take; pass --hugemem "
                            "MiB --force to reserve anyway")
    left = min_left_kb(total_kb)
    limit = max(0, max_hugemem_kb(total_kb) - other_kb)
    rule = (f"at least {mib(left)} of this machine's {mib(total_kb)} must stay outside "
            "hugepages: max(25%, min(1 GiB, 50%)) of MemTotal")
    if other_kb:
        rule += f"; {mib(other_kb)} are already in pools of other page sizes"
    if hugemem_mb is None:
        want_kb = default_hugemem_kb(total_kb, kb, other_kb)
        why = f"default: min(2048 MiB, 25% of MemTotal {mib(total_kb)})"
        if want_kb < min(2048 * 1024, total_kb // 4) // kb * kb:
            why += f", cut to the {mib(limit)} allowed ({rule})"
        return HugepagePlan(kb, want_kb // kb, why)
    pages = -(-hugemem_mb * 1024 // kb)  # whole pages, rounded up
    if pages * kb <= limit:
        return HugepagePlan(kb, pages, f"--hugemem {hugemem_mb}")
    have, _ = host.hugepages().get(kb, (0, 0))
    if pages <= have:  # already reserved (by someone): nothing more is taken
        return HugepagePlan(kb, pages, f"--hugemem {hugemem_mb}")
    msg = (f"--hugemem {hugemem_mb} would leave the system "
           f"{mib(max(0, total_kb - other_kb - pages * kb))}; {rule}, so at most "
           f"{mib(limit)} may be reserved here")
    if not force:
        raise UnsafeRequest(f"{msg}. Ask for less, or add --force if this machine really "
                            "has nothing else to run")
    return HugepagePlan(kb, pages, f"--hugemem {hugemem_mb}", f"{msg} (--force)")


def reserve_hugepages(host: Host, plan: HugepagePlan, out: TextIO) -> None:
    kb, want = plan.page_kb, plan.pages
    path = host.root / f"sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages"
    total, free = host.hugepages().get(kb, (0, 0))
    if plan.warning:
        print(f"hugepages: warning: {plan.warning}", file=out)
    if total >= want:
        print(f"hugepages: {total} x {kb} kB reserved ({free} free), {want} needed: "
              f"unchanged ({plan.why})", file=out)
        _warn_if_oversized(host, out)
        return
    host.write(path, f"{want}\n")
    total, free = host.hugepages().get(kb, (0, 0))
    note = "" if total >= want else (
        f" -- only {total} of {want}: memory is fragmented or short; free memory or reserve "
        "at boot (hugepages= on the kernel command line)")
    print(f"hugepages: reserved {total} x {kb} kB = {total * kb // 1024} MiB "
          f"({free} free; {plan.why}){note}", file=out)


def _warn_if_oversized(host: Host, out: TextIO) -> None:
    """A pool reserved earlier (by hand, at boot, by an old setup) may already take more
    than the system can spare: not ours to shrink, but worth a line."""
    total_kb = host.mem_total_kb()
    held = sum(size * n for size, (n, _) in host.hugepages().items())
    if total_kb and held > max_hugemem_kb(total_kb):
        print(f"hugepages: warning: pools hold {mib(held)} of {mib(total_kb)}, leaving less "
              f"than the {mib(min_left_kb(total_kb))} the system should keep; `blocktarget "
              "setup reset --release-hugepages` gives them back", file=out)


def _select(host: Host, pci: list[str] | None) -> list[PciNvme]:
    from .nvme.driver.pci import normalize_bdf

    if not pci:
        return host.nvme_devices()
    out = []
    for raw in pci:
        try:
            bdf = normalize_bdf(raw)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        dev = host.describe(bdf)
        if host._read(host.pci / bdf / "class") != NVME_CLASS:
            raise SetupError(f"{bdf} is not an NVMe controller (class "
                             f"{host._read(host.pci / bdf / 'class') or '?'})")
        out.append(dev)
    return out


def _lookup_user(user: str) -> tuple[int, int]:
    import pwd

    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise SetupError(f"--user {user!r}: no such user") from None
    return pw.pw_uid, pw.pw_gid


def grant_group(host: Host, group: int, user: str, out: TextIO) -> None:
    """Give ``user`` the VFIO group node, as SPDK's setup.sh does with TARGET_USER.

    The hardened systemd unit runs the target as an unprivileged user; without this the
    only choice would be running it as root. Pinning DMA memory also needs a memlock
    limit, which only the service manager can grant, hence the hint.
    """
    uid, gid = _lookup_user(user)
    node = host.root / f"dev/vfio/{group}"
    if not node.exists():
        raise SetupError(f"{node} does not exist (is vfio-pci bound?)")
    os.chown(node, uid, gid)
    os.chmod(node, 0o660)
    print(f"  /dev/vfio/{group}: owner {user} (mode 0660); the service also needs "
          "LimitMEMLOCK=infinity (or ulimit -l unlimited) to pin DMA memory", file=out)


def release_hugepages(host: Host, out: TextIO) -> None:
    """Return reserved hugepages to the kernel; pages still in use stay (the kernel
    keeps them as surplus until freed), and we say how many."""
    for kb, (total, _free) in sorted(host.hugepages().items()):
        if not total:
            continue
        host.write(host.root / f"sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages", "0\n")
        left, _ = host.hugepages().get(kb, (0, 0))
        note = f", {left} still in use by a process" if left else ""
        print(f"hugepages {kb} kB: released {total - left} of {total}{note}", file=out)


def config(host: Host, pci: list[str] | None, hugemem: int | None, out: TextIO,
           load: bool = True, user: str | None = None, force: bool = False) -> int:
    """Reserve hugepages and bind to vfio-pci; returns the exit status (1 when a named
    device was refused). ``hugemem`` in MiB: None for the machine's default, 0 to leave
    hugepages alone."""
    if user is not None:
        _lookup_user(user)  # a typo fails before anything is touched
    plan = plan_hugepages(host, hugemem, force) if hugemem != 0 else None  # idem
    if host.iommu_groups() == 0:
        raise SetupError("no IOMMU groups: the IOMMU is off. Enable VT-d/AMD-Vi in the "
                         "firmware and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD); "
                         "blocktarget's driver does not run without an IOMMU")
    if plan is not None:
        if plan.pages:
            reserve_hugepages(host, plan, out)
        else:
            print(f"hugepages: none reserved ({plan.why}); the driver then uses 4 KiB pages "
                  "where the IOMMU maps them. --hugemem MiB --force reserves anyway", file=out)
    if not host.vfio_loaded():
        if not load:
            raise SetupError("vfio-pci is not loaded")
        _modprobe("vfio-pci", out)
    devices = _select(host, pci)
    if not devices:
        print("no NVMe controllers found", file=out)
        return 0
    refused = 0
    for dev in devices:
        label = f"{dev.bdf} ({dev.ids})"
        if dev.driver == VFIO_DRIVER:
            print(f"{label}: already bound to vfio-pci (IOMMU group {dev.group})", file=out)
            if user is not None and dev.group is not None:
                grant_group(host, dev.group, user, out)
            continue
        if dev.in_use:
            print(f"{label}: NOT touched: {'; '.join(dev.in_use)}", file=out)
            refused += 1
            continue
        if dev.group is None:
            print(f"{label}: NOT touched: no IOMMU group", file=out)
            refused += 1
            continue
        was = dev.driver or "no driver"
        now = host.bind(dev.bdf, VFIO_DRIVER)
        if now != VFIO_DRIVER:
            raise SetupError(f"{label}: still bound to {now or 'no driver'} after binding "
                             "vfio-pci")
        print(f"{label}: {was} -> vfio-pci (IOMMU group {dev.group}, /dev/vfio/{dev.group})",
              file=out)
        if user is not None:
            grant_group(host, dev.group, user, out)
        from .nvme.driver.pci import group_devices, pci_driver

        others = [f"{d} ({pci_driver(d) or 'no driver'})" for d in group_devices(dev.group)
                  if d != dev.bdf and pci_driver(d) not in (None, VFIO_DRIVER, "pcieport")]
        if others and host.root == Path("/"):
            print(f"  warning: IOMMU group {dev.group} also holds {', '.join(others)}; the "
                  "group is not viable until they are bound to vfio-pci too", file=out)
    # only an explicitly named device that was refused is an error; in "all" mode a
    # busy boot disk is the expected case
    return 1 if refused and pci else 0


def reset(host: Host, pci: list[str] | None, out: TextIO, force: bool = False,
          hugepages: bool = False) -> int:
    devices = _select(host, pci)
    if not pci:
        devices = [d for d in devices if d.driver == VFIO_DRIVER]
    if hugepages:
        release_hugepages(host, out)
    if not devices:
        print("no NVMe controllers bound to vfio-pci", file=out)
        return 0
    status = 0
    for dev in devices:
        label = f"{dev.bdf} ({dev.ids})"
        if dev.driver not in (VFIO_DRIVER, None):
            print(f"{label}: bound to {dev.driver}, nothing to do", file=out)
            continue
        users = host.group_users(dev.group) if dev.group is not None else []
        if users and not force:
            print(f"{label}: NOT released: /dev/vfio/{dev.group} is open by pid "
                  f"{', '.join(map(str, users))}; detach it there first "
                  "(bdev_nvme_detach_controller) or stop that process", file=out)
            status = 1
            continue
        now = host.bind(dev.bdf, None)
        where = now or ("no driver (load the kernel's nvme module: modprobe nvme, then "
                        f"echo {dev.bdf} > /sys/bus/pci/drivers_probe)")
        print(f"{label}: vfio-pci -> {where}", file=out)
    return status


def status(host: Host, out: TextIO) -> int:
    hp = host.hugepages()
    if hp:
        for kb, (total, free) in sorted(hp.items()):
            print(f"hugepages {kb} kB: {total} total, {free} free "
                  f"({total * kb // 1024} MiB)", file=out)
    else:
        print("hugepages: none configured", file=out)
    total_kb = host.mem_total_kb()
    if total_kb:
        kb = host.default_hugepage_kb()
        other = sum(size * n for size, (n, _) in hp.items() if size != kb)
        print(f"memory: {mib(total_kb)} total; hugepages may take up to "
              f"{mib(max_hugemem_kb(total_kb))} (at least {mib(min_left_kb(total_kb))} stays "
              f"outside); `setup` reserves {mib(default_hugemem_kb(total_kb, kb, other))} by "
              "default", file=out)
        _warn_if_oversized(host, out)
    groups = host.iommu_groups()
    print(f"IOMMU: {'on, ' + str(groups) + ' groups' if groups else 'off (no IOMMU groups)'}",
          file=out)
    print(f"vfio-pci: {'loaded' if host.vfio_loaded() else 'not loaded'}", file=out)
    devices = host.nvme_devices()
    if not devices:
        print("NVMe controllers: none", file=out)
        return 0
    print(f"{'BDF':<14}{'vendor:dev':<12}{'driver':<10}{'group':<7}{'numa':<6}block devices",
          file=out)
    for d in devices:
        blk = ", ".join(d.blockdevs) or "-"
        if d.in_use:
            blk += "  [in use: " + "; ".join(d.in_use) + "]"
        print(f"{d.bdf:<14}{d.ids:<12}{d.driver or '-':<10}"
              f"{'-' if d.group is None else d.group:<7}{d.numa:<6}{blk}", file=out)
    return 0


# ---------------------------------------------------------------------------
# CLI


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "setup", help="bind NVMe SSDs to vfio-pci and reserve hugepages (like SPDK setup.sh)",
        description="Prepare NVMe controllers for blocktarget's user-space driver: reserve "
        "hugepages, load vfio-pci, bind the controllers (default: every NVMe controller "
        "without a mounted file system). `setup reset` gives them back to the kernel, "
        "`setup status` shows the state.")
    p.add_argument("action", nargs="?", choices=["config", "reset", "status"],
                   default="config")
    p.add_argument("--pci", action="append", metavar="BDF",
                   help="only this controller (repeatable), e.g. 0000:01:00.0")
    p.add_argument("--hugemem", type=int, default=None, metavar="MiB",
                   help="hugepage memory to reserve (default: min(2048, 25%% of MemTotal); "
                   "0 leaves hugepages alone). Refused (exit 2) if it would leave the system "
                   "less than max(25%%, min(1 GiB, 50%%)) of MemTotal, unless --force")
    p.add_argument("--force", action="store_true",
                   help="config: reserve --hugemem even past the safe limit; reset: release "
                   "devices even while a process holds them open")
    p.add_argument("--user", metavar="USER",
                   help="config: give USER the /dev/vfio group nodes so a non-root target "
                   "(e.g. the systemd unit's User=) can open them")
    p.add_argument("--release-hugepages", action="store_true",
                   help="reset: also give the reserved hugepages back to the kernel")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, host: Host | None = None, out: TextIO = sys.stdout) -> int:
    host = host or Host()
    try:
        if args.action == "status":
            return status(host, out)
        if host.root == Path("/") and os.geteuid() != 0:
            raise SetupError("needs root (writes /sys and /proc)")
        if args.action == "reset":
            return reset(host, args.pci, out, force=args.force,
                         hugepages=getattr(args, "release_hugepages", False))
        return config(host, args.pci, args.hugemem, out, user=getattr(args, "user", None),
                      force=args.force)
    except UnsafeRequest as exc:
        print(f"blocktarget setup: {exc}", file=sys.stderr)
        return 2
    except SetupError as exc:
        print(f"blocktarget setup: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"blocktarget setup: {exc}", file=sys.stderr)
        return 1 if exc.errno != errno.EACCES else 2
