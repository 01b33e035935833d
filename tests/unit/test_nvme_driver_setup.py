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
    """Host over a tmp tree whose sysfs files behave like the kernel's; the pool of
    2 MiB pages can grow to ``room`` pages (the rest of memory is fragmented or in use)."""

    def __init__(self, root: Path, room: int = 48) -> None:
        super().__init__(root)
        self.room = room

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
            got = min(want, self.room)
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


GIB_KB = 1024 * 1024


def machine(root: Path, mem_total_kb: int) -> None:
    """/proc/meminfo of a machine with this much memory (the kernel's own format)."""
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {mem_total_kb} kB\nMemFree:        {mem_total_kb // 2} kB\n"
        f"MemAvailable:   {mem_total_kb // 2} kB\nHugePages_Total:       0\n"
        "Hugepagesize:       2048 kB\nHugetlb:               0 kB\n")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for drv in ("nvme", "vfio-pci"):
        (tmp_path / "sys/bus/pci/drivers" / drv).mkdir(parents=True)
    (tmp_path / "sys/bus/pci/drivers_probe").write_text("")
    hp = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    hp.mkdir(parents=True)
    (hp / "nr_hugepages").write_text("0\n")
    (hp / "free_hugepages").write_text("0\n")
    machine(tmp_path, 8 * GIB_KB)
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


# ---- how much memory hugepages may take (blocktarget/memory.py) ----------------------------


def _pool(host: Host) -> int:
    return host.hugepages()[2048][0]


def _bound(host: Host) -> bool:
    return host.describe("0000:02:00.0").driver == "vfio-pci"


def test_2gib_guest_default_leaves_room(root: Path) -> None:
    """The machine of the issue: 2 GiB. The default is 25% (512 MiB), not 2,048 MiB."""
    machine(root, 2 * GIB_KB)
    host = FakeKernel(root, room=2048)
    rc, out = _run(host, "--pci", "0000:02:00.0")
    assert rc == 0, out
    assert _pool(host) == 256
    assert ("hugepages: reserved 256 x 2048 kB = 512 MiB (256 free; default: min(2048 MiB, "
            "25% of MemTotal 2048 MiB))") in out
    assert _bound(host)


def test_2gib_guest_refuses_what_would_starve_it(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2,048 MiB (the old default) would leave nothing: exit 2, the reason on stderr, and
    nothing touched -- no pages, no binding. 1 GiB must stay outside hugepages, so 1,024
    MiB is the most, and a page more is refused."""
    machine(root, 2 * GIB_KB)
    host = FakeKernel(root, room=2048)
    for mb in ("2048", "1026"):
        rc, out = _run(host, "--pci", "0000:02:00.0", "--hugemem", mb)
        err = capsys.readouterr().err
        assert rc == 2, (mb, out, err)
        assert out == "" and _pool(host) == 0 and not _bound(host), "nothing touched"
        assert err.startswith(f"blocktarget setup: --hugemem {mb} would leave the system ")
        assert ("at least 1024 MiB of this machine's 2048 MiB must stay outside hugepages"
                in err)
        assert "at most 1024 MiB may be reserved here" in err and "--force" in err
    rc, out = _run(host, "--pci", "0000:02:00.0", "--hugemem", "1024")
    assert rc == 0 and _pool(host) == 512 and _bound(host)


def test_force_reserves_past_the_limit_and_says_so(root: Path) -> None:
    machine(root, 2 * GIB_KB)
    host = FakeKernel(root, room=2048)
    rc, out = _run(host, "--hugemem", "2048", "--force", "--pci", "0000:02:00.0")
    assert rc == 0, out
    assert _pool(host) == 1024
    assert "hugepages: warning: --hugemem 2048 would leave the system 0 MiB" in out
    assert "(--force)" in out
    rc, out = _run(host, "status")
    assert "memory: 2048 MiB total; hugepages may take up to 1024 MiB (at least 1024 MiB " \
           "stays outside); `setup` reserves 512 MiB by default" in out
    assert "hugepages: warning: pools hold 2048 MiB of 2048 MiB" in out


def test_24gib_host_default_and_limit(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 24 GiB host: the default is the 2,048 MiB cap; 25% (6 GiB) must stay outside, so
    18 GiB may be reserved and a page more may not."""
    machine(root, 24 * GIB_KB)
    host = FakeKernel(root, room=1 << 20)
    rc, out = _run(host, "--hugemem", "0", "--pci", "0000:02:00.0")
    assert rc == 0 and _pool(host) == 0, "0 leaves hugepages alone"
    rc, out = _run(host)
    assert rc == 0 and _pool(host) == 1024, out
    assert "= 2048 MiB (1024 free; default: min(2048 MiB, 25% of MemTotal 24576 MiB))" in out
    rc, _ = _run(host, "--hugemem", str(18 * 1024 + 2))
    assert rc == 2 and _pool(host) == 1024
    assert "at least 6144 MiB of this machine's 24576 MiB" in capsys.readouterr().err
    rc, out = _run(host, "--hugemem", str(18 * 1024))
    assert rc == 0 and _pool(host) == 9216, out


def test_small_guest_and_other_page_sizes(root: Path) -> None:
    """A 1 GiB guest (the VM tests' size) keeps half: its default is 256 MiB and the VM
    tests' 64 MiB passes. Pools of other page sizes (1 GiB pages reserved at boot) count
    against the limit, and cut the default."""
    machine(root, GIB_KB)
    host = FakeKernel(root, room=1024)
    rc, out = _run(host, "--hugemem", "64", "--pci", "0000:02:00.0")
    assert rc == 0 and _pool(host) == 32, out
    rc, out = _run(host, "--pci", "0000:02:00.0")
    assert rc == 0 and _pool(host) == 128, out
    machine(root, 4 * GIB_KB)  # at most 3 GiB; two 1 GiB pages leave 1 GiB for 2 MiB pages
    big = root / "sys/kernel/mm/hugepages/hugepages-1048576kB"
    big.mkdir()
    (big / "nr_hugepages").write_text("2\n")
    (big / "free_hugepages").write_text("2\n")
    host.write(root / "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "0\n")
    rc, out = _run(host, "--pci", "0000:02:00.0")
    assert rc == 0 and _pool(host) == 512, out
    assert "default: min(2048 MiB, 25% of MemTotal 4096 MiB)" in out  # 1 GiB: no cut needed
    rc, out = _run(host, "--hugemem", "1026", "--pci", "0000:02:00.0")
    assert rc == 2 and _pool(host) == 512


def test_default_is_cut_and_can_be_nothing(root: Path) -> None:
    machine(root, 2 * GIB_KB)
    big = root / "sys/kernel/mm/hugepages/hugepages-1048576kB"
    big.mkdir()
    (big / "nr_hugepages").write_text("1\n")  # the whole 1 GiB allowance, taken at boot
    (big / "free_hugepages").write_text("1\n")
    host = FakeKernel(root, room=1024)
    rc, out = _run(host, "--pci", "0000:02:00.0")
    assert rc == 0 and _pool(host) == 0
    assert "hugepages: none reserved (default: min(2048 MiB, 25% of MemTotal 2048 MiB), " \
           "cut to the 0 MiB allowed" in out
    assert "1024 MiB are already in pools of other page sizes" in out
    assert _bound(host), "binding goes on: the driver can use 4 KiB pages"


def test_unknown_memtotal_needs_force(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / "proc/meminfo").write_text("Hugepagesize:       2048 kB\n")
    host = FakeKernel(root)
    rc, _ = _run(host, "--hugemem", "64")
    assert rc == 2 and "cannot read MemTotal" in capsys.readouterr().err
    assert _pool(host) == 0
    rc, out = _run(host, "--hugemem", "64", "--force", "--pci", "0000:02:00.0")
    assert rc == 0 and _pool(host) == 32 and "without the safety check" in out


def test_memory_policy_numbers() -> None:
    from blocktarget.memory import default_hugemem_kb, max_hugemem_kb, min_left_kb, read_meminfo

    mib = 1024
    assert [min_left_kb(g * GIB_KB) // mib for g in (1, 2, 3, 4, 8, 24)] == \
        [512, 1024, 1024, 1024, 2048, 6144]
    assert [max_hugemem_kb(g * GIB_KB) // mib for g in (1, 2, 4, 24)] == [512, 1024, 3072, 18432]
    assert [default_hugemem_kb(g * GIB_KB, 2048) // mib for g in (1, 2, 8, 24)] == \
        [256, 512, 2048, 2048]
    assert default_hugemem_kb(1003520, 2048) == 244 * mib, "whole 2 MiB pages, rounded down"
    assert default_hugemem_kb(4 * GIB_KB, 1 << 20) == GIB_KB, "1 GiB pages"
    assert read_meminfo("/nonexistent/meminfo") == {}


def test_status_on_the_real_machine_reads_real_memtotal() -> None:
    """No root needed, nothing written: the numbers come from this machine's meminfo."""
    import subprocess
    import sys

    from blocktarget.memory import max_hugemem_kb, read_meminfo

    total = read_meminfo()["MemTotal"]
    r = subprocess.run([sys.executable, "-m", "blocktarget", "setup", "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (f"memory: {total // 1024} MiB total; hugepages may take up to "
            f"{max_hugemem_kb(total) // 1024} MiB") in r.stdout
