"""`blocktarget setup` against a fake /sys and /proc: discovery, the refusals, binding.

The fake kernel reacts to the writes setup makes (driver_override, unbind,
drivers_probe, nr_hugepages) the way Linux does, so the whole config/reset flow runs;
the real kernel flow is covered in tests/vm/test_vfio_nvme.py.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import pytest

from blocktarget import setup_cmd
from blocktarget.setup_cmd import Host, SetupError


class FakeKernel(Host):
    """Host over a tmp tree whose sysfs files behave like the kernel's."""

    def write(self, path: Path, value: str) -> None:
        rel = path.relative_to(self.root).as_posix()
        v = value.strip()
        if rel.endswith("/driver/unbind"):
            bdf = v
            (self.pci / bdf / "driver").unlink()
            return
        if rel == "sys/bus/pci/drivers_probe":
            bdf = v
            override = (self.pci / bdf / "driver_override").read_text().strip()
            drv = override or "nvme"
            if (self.drivers / drv).exists():
                _link(self.pci / bdf / "driver", self.drivers / drv)
            return
        if rel.endswith("/nr_hugepages"):
            d = path.parent
            want = int(v)
            got = min(want, 48)  # the fake machine has room for 48 pages
            (d / "nr_hugepages").write_text(f"{got}\n")
            (d / "free_hugepages").write_text(f"{got}\n")
            return
        path.write_text(value)


def _link(link: Path, target: Path) -> None:
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def _device(root: Path, bdf: str, *, driver: str | None, group: int | None,
            nvme_name: str | None = None, partitions: int = 0) -> None:
    d = root / "sys/bus/pci/devices" / bdf
    d.mkdir(parents=True)
    (d / "class").write_text("0x010802\n")
    (d / "vendor").write_text("0x144d\n")
    (d / "device").write_text("0xa808\n")
    (d / "numa_node").write_text("0\n")
    (d / "driver_override").write_text("(null)\n")
    if driver:
        _link(d / "driver", root / "sys/bus/pci/drivers" / driver)
    if group is not None:
        g = root / f"sys/kernel/iommu_groups/{group}"
        (g / "devices").mkdir(parents=True, exist_ok=True)
        (g / "devices" / bdf).mkdir()
        _link(d / "iommu_group", g)
    if nvme_name:
        ns = d / "nvme" / nvme_name[:nvme_name.rindex("n")] / nvme_name
        ns.mkdir(parents=True)
        (ns / "dev").write_text("259:0\n")
        for p in range(1, partitions + 1):
            part = ns / f"{nvme_name}p{p}"
            part.mkdir()
            (part / "partition").write_text(f"{p}\n")
            (part / "dev").write_text(f"259:{p}\n")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for drv in ("nvme", "vfio-pci"):
        (tmp_path / "sys/bus/pci/drivers" / drv).mkdir(parents=True)
    (tmp_path / "sys/bus/pci/drivers_probe").write_text("")
    hp = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    hp.mkdir(parents=True)
    (hp / "nr_hugepages").write_text("0\n")
    (hp / "free_hugepages").write_text("0\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 1000 kB\nHugepagesize:       2048 kB\n")
    (tmp_path / "proc/mounts").write_text(
        "sysfs /sys sysfs rw 0 0\n/dev/nvme0n1p2 / ext4 rw 0 0\n")
    (tmp_path / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    # the boot disk (root fs on a partition) and a spare data disk
    _device(tmp_path, "0000:01:00.0", driver="nvme", group=3, nvme_name="nvme0n1",
            partitions=2)
    _device(tmp_path, "0000:02:00.0", driver="nvme", group=4, nvme_name="nvme1n1")
    return tmp_path


def _run(host: Host, *argv: str) -> tuple[int, str]:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    setup_cmd.add_commands(sub)
    args = p.parse_args(["setup", *argv])
    out = io.StringIO()
    rc = setup_cmd.main(args, host=host, out=out)
    return rc, out.getvalue()


def test_status_shows_devices_and_what_uses_them(root: Path) -> None:
    rc, out = _run(FakeKernel(root), "status")
    assert rc == 0
    assert "IOMMU: on, 2 groups" in out and "vfio-pci: loaded" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("0000:01:00.0"))
    assert "144d:a808" in line and "nvme" in line and "nvme0n1, nvme0n1p1, nvme0n1p2" in line
    assert "in use: nvme0n1p2 is mounted on /" in line
    assert "in use" not in next(ln for ln in out.splitlines() if ln.startswith("0000:02:00.0"))


def test_config_binds_free_disks_and_never_the_mounted_one(root: Path) -> None:
    host = FakeKernel(root)
    rc, out = _run(host, "--hugemem", "64")
    assert rc == 0, "in all-devices mode a busy boot disk is expected, not an error"
    assert "hugepages: reserved 32 x 2048 kB = 64 MiB" in out
    assert "0000:01:00.0 (144d:a808): NOT touched: nvme0n1p2 is mounted on /" in out
    assert "0000:02:00.0 (144d:a808): nvme -> vfio-pci (IOMMU group 4" in out
    assert host.describe("0000:02:00.0").driver == "vfio-pci"
    assert host.describe("0000:01:00.0").driver == "nvme"
    # idempotent
    rc, out = _run(host, "--hugemem", "64")
    assert "0000:02:00.0 (144d:a808): already bound to vfio-pci" in out
    assert "32 needed: unchanged" in out


def test_config_named_busy_device_fails(root: Path) -> None:
    rc, out = _run(FakeKernel(root), "--pci", "01:00.0", "--hugemem", "0")
    assert rc == 1
    assert "NOT touched" in out and "hugepages" not in out


def test_holders_and_swap_count_as_in_use(root: Path) -> None:
    (root / "proc/mounts").write_text("")
    (root / "sys/class/block/nvme1n1/holders/dm-0").mkdir(parents=True)
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n"
                                     "/dev/nvme0n1p1 partition 100 0 -2\n")
    dev1 = FakeKernel(root).describe("0000:02:00.0")
    assert dev1.in_use == ["nvme1n1 is held by dm-0 (dm/md/LVM)"]
    dev0 = FakeKernel(root).describe("0000:01:00.0")
    assert dev0.in_use == ["nvme0n1p1 is active swap"]


def test_hugepage_shortfall_is_reported(root: Path) -> None:
    rc, out = _run(FakeKernel(root), "--pci", "0000:02:00.0", "--hugemem", "512")
    assert rc == 0
    assert "only 48 of 256" in out


def test_reset_gives_back_unless_a_process_holds_the_group(root: Path) -> None:
    host = FakeKernel(root)
    _run(host, "--pci", "0000:02:00.0", "--hugemem", "0")
    fd_dir = root / "proc/4242/fd"
    fd_dir.mkdir(parents=True)
    (fd_dir / "7").symlink_to("/dev/vfio/4")
    rc, out = _run(host, "reset")
    assert rc == 1 and "open by pid 4242" in out
    assert host.describe("0000:02:00.0").driver == "vfio-pci"
    (fd_dir / "7").unlink()
    rc, out = _run(host, "reset")
    assert rc == 0 and "0000:02:00.0 (144d:a808): vfio-pci -> nvme" in out
    assert host.describe("0000:02:00.0").driver == "nvme"
    rc, out = _run(host, "reset")
    assert "no NVMe controllers bound to vfio-pci" in out


def test_refuses_without_iommu_and_names_the_fix(root: Path) -> None:
    import shutil

    shutil.rmtree(root / "sys/kernel/iommu_groups")
    rc, _ = _run(FakeKernel(root), "--hugemem", "0")
    assert rc == 1
    with pytest.raises(SetupError, match="intel_iommu=on"):
        setup_cmd.config(FakeKernel(root), None, 0, io.StringIO())


def test_bad_addresses(root: Path) -> None:
    with pytest.raises(SetupError, match="not a PCI address"):
        setup_cmd.config(FakeKernel(root), ["nope"], 0, io.StringIO())
    with pytest.raises(SetupError, match="no PCI device 0000:09:00.0"):
        setup_cmd.config(FakeKernel(root), ["9:0.0"], 0, io.StringIO())
    other = root / "sys/bus/pci/devices/0000:03:00.0"
    other.mkdir()
    (other / "class").write_text("0x020000\n")
    with pytest.raises(SetupError, match="not an NVMe controller"):
        setup_cmd.config(FakeKernel(root), ["0000:03:00.0"], 0, io.StringIO())


def test_multipath_path_devices_map_to_their_head(root: Path) -> None:
    """A shared namespace shows up as nvme2c2n1 under the controller; its block device
    (what gets mounted) is the multipath head nvme2n1."""
    _device(root, "0000:05:00.0", driver="nvme", group=5, nvme_name="nvme2c2n1")
    (root / "proc/mounts").write_text("/dev/nvme2n1 /data xfs rw 0 0\n")
    dev = FakeKernel(root).describe("0000:05:00.0")
    assert dev.blockdevs == ["nvme2n1"]
    assert dev.in_use == ["nvme2n1 is mounted on /data"]


def test_cli_wiring() -> None:
    from blocktarget.cli import build_parser

    args = build_parser().parse_args(["setup", "reset", "--pci", "0000:01:00.0"])
    assert args.action == "reset" and args.pci == ["0000:01:00.0"]
    assert args.func is setup_cmd.main


def test_user_gets_the_group_node_and_a_bad_user_touches_nothing(root: Path) -> None:
    import pwd

    host = FakeKernel(root)
    (root / "dev/vfio").mkdir(parents=True)
    (root / "dev/vfio/4").write_text("")
    os.chmod(root / "dev/vfio/4", 0o600)
    rc, out = _run(host, "--pci", "0000:02:00.0", "--hugemem", "0", "--user", "no-such-user-x")
    assert rc == 1 and host.describe("0000:02:00.0").driver == "nvme", "nothing bound"
    me = pwd.getpwuid(os.getuid()).pw_name
    rc, out = _run(host, "--pci", "0000:02:00.0", "--hugemem", "0", "--user", me)
    assert rc == 0, out
    assert f"/dev/vfio/4: owner {me} (mode 0660)" in out and "LimitMEMLOCK" in out
    st = (root / "dev/vfio/4").stat()
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o660
    # already bound: running again still grants (e.g. after a reboot re-created the node)
    os.chmod(root / "dev/vfio/4", 0o600)
    rc, out = _run(host, "--pci", "0000:02:00.0", "--hugemem", "0", "--user", me)
    assert rc == 0 and "already bound" in out
    assert (root / "dev/vfio/4").stat().st_mode & 0o777 == 0o660


def test_reset_can_release_hugepages(root: Path) -> None:
    host = FakeKernel(root)
    _run(host, "--pci", "0000:02:00.0", "--hugemem", "64")
    assert host.hugepages()[2048][0] == 32
    rc, out = _run(host, "reset", "--release-hugepages")
    assert rc == 0 and "hugepages 2048 kB: released 32 of 32" in out
    assert host.hugepages()[2048][0] == 0
    assert host.describe("0000:02:00.0").driver == "nvme"
