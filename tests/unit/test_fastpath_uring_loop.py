"""The C lane on io_uring over a kernel block device: a loop device over a tmpfs file
(issue 15's "kernel block device" row, bench/hotpath.py and bench/dataplane.py's
`uring-loop`), held to the Python path by test_fastpath_uring's own tests.

A block device is not a file: the uring bdev opens it O_DIRECT with its logical block size
(BLKSSZGET), its size is BLKGETSIZE64's, and its reads and writes complete from the
loop driver's worker through the block layer (task work on the reactor), where a tmpfs
file's go to io-wq. Each side's namespaces are loop devices over files of its own,
attached by bench/loopdev.py and detached after the test. Every byte the two sides
answer and every byte left on the devices is compared (`Pair.check`), and a pattern
written through the lane is read back from the backing file, under the device.

Loop devices need root and /dev/loop-control: where there are none the tests are marked
xfail with the reason (they cannot be done here), never passed.

Budget: about 10 s.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_fastpath_uring as tfu
from lane_harness import FLUSH, FUA, Layout, cmd, pattern, rd, wr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import loopdev  # noqa: E402

WHY = loopdev.unavailable_reason()
pytestmark = tfu.pytestmark

# each side's directory -> its devices (name -> LoopDevice), attached by _attach
_DEVICES: dict[str, dict[str, loopdev.LoopDevice]] = {}


async def _attach(target: Any, workdir: Path) -> None:
    """Layout.setup: a loop device over a patterned tmpfs file per namespace file of
    test_fastpath_uring, the devices allowed to the side's target."""
    devs = _DEVICES[str(workdir)] = {}
    for i, name in enumerate(tfu.ALL_BDEVS):
        if name not in tfu.FILES:
            continue
        bs, nb = tfu.FILES[name]
        backing = workdir / f"{name}.img"
        backing.write_bytes(pattern(bs * nb, i + 1))
        devs[name] = loopdev.LoopDevice(str(backing))
        target.settings.allowed_dirs.append(devs[name].path)


def _loop_bdevs(workdir: Path) -> list[dict[str, Any]]:
    bdevs = tfu._file_bdevs(workdir)  # (the files are rewritten: same pattern)
    for b in bdevs:
        p = b["params"]
        if b["method"] == "bdev_uring_create":
            p["filename"] = _DEVICES[str(workdir)][p["name"]].path
    return bdevs


LOOP_LAYOUT = Layout(bdevs=_loop_bdevs, contents=tfu._contents, ordered=False,
                     setup=_attach)


@pytest.fixture
def where(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A /dev/shm directory for the backing files; test_fastpath_uring's pairs made of
    loop devices over them."""
    if WHY is not None:
        pytest.xfail(f"no loop devices here: {WHY}")
    monkeypatch.setattr(tfu, "FILE_LAYOUT", LOOP_LAYOUT)
    d = Path(f"/dev/shm/bt-lane-loop-{os.getpid()}")
    d.mkdir()
    try:
        yield d
    finally:
        for side in [k for k in _DEVICES if k.startswith(str(d) + "/")]:
            for dev in _DEVICES.pop(side).values():
                dev.close()
        for f in sorted(d.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        d.rmdir()


def test_namespaces_are_block_devices(where: Path) -> None:
    p = tfu._pair(where)
    try:
        for side in (p.ref, p.fast):
            b = side.bdev("M4K")
            assert b.filename.startswith("/dev/loop") and b.direct
            info = b.driver_specific()["uring"]
            assert info["block_device"] is True and info["direct_io"] is True
    finally:
        p.close()


def test_cases_match_python(where: Path) -> None:
    tfu.test_cases_match_python(where, tfu.OPTS, "plain")


def test_many_outstanding_complete_in_any_order(where: Path) -> None:
    tfu.test_many_outstanding_complete_in_any_order(where)


def test_r2t_writes_and_fua(where: Path) -> None:
    tfu.test_r2t_writes_and_fua_on_files(where)


def test_lane_writes_reach_the_backing_file(where: Path) -> None:
    """What the lane wrote to the device is in the tmpfs file under it, and what the lane
    read back is those bytes (after FUA and Flush, as a host would ask)."""
    p = tfu._pair(where)
    try:
        data = pattern(4096 * 2, 99)  # (in capsule: ICD 8 KiB)
        p.feed(wr(1, 2, 10, 2, data=data, cdw12=FUA) + cmd(FLUSH, 2, 2, sgl_len=0))
        p.check()
        p.feed(rd(3, 2, 10, 2))
        p.check()
        assert p.taken() == 3
        assert p.fast.io._lane.c.submitted >= 3
        assert bytes(p.fast.tr.out).count(data) == 1  # the read's C2HData carried them
        side = str(where / f"pair{len(list(where.iterdir())) - 1}" / "fast")
        backing = Path(_DEVICES[side]["M4K"].path)
        assert backing.name.startswith("loop")
        with open(where / Path(side).relative_to(where) / "M4K.img", "rb") as f:
            f.seek(10 * 4096)
            assert f.read(len(data)) == data
    finally:
        p.close()


def test_the_bench_device_goes_away(where: Path) -> None:
    """loopdev: attached with AUTOCLEAR (a killed bench leaves no device once its last
    opener has gone) and detached by close() even while another opener still holds it."""
    backing = where / "d.img"
    backing.write_bytes(pattern(1 << 20, 5))
    dev = loopdev.LoopDevice(str(backing))
    sysfs = Path("/sys/block") / Path(dev.path).name / "loop"
    try:
        assert (sysfs / "autoclear").read_text().strip() == "1"
        assert (sysfs / "backing_file").read_text().strip() == str(backing)
        fd = os.open(dev.path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 4096) == pattern(1 << 20, 5)[4096:8192]
            dev.close()
            dev.close()  # (a second close does nothing)
        finally:
            os.close(fd)
        deadline = time.monotonic() + 5  # (detached at the last close, maybe by a worker)
        while (sysfs / "backing_file").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not (sysfs / "backing_file").exists()
    finally:
        dev.close()
