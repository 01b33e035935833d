"""`kill -9` of the target under write load on a thin logical volume: no acknowledged
write lost, and the store is found again every time.

The volume lives on a file bdev (io_uring) with 16 KiB clusters and a 4 MiB working set
(256 clusters), so writes keep landing in clusters never written before: kills hit
cluster allocations (the cluster write, the flush, the metadata slot write and its
flush) as well as plain writes. Each cycle starts the target from a config that has only
the file bdev and the export of `lvs/vol` (the store is found by examine), runs
blocktarget's journaling checker (`blocktarget perf --verify --journal`, FUA writes:
acknowledged means durable) until it had writes acknowledged, and SIGKILLs the target a
random moment later. The next cycle's checker first reads every journaled block back;
the metadata must also still be a valid store (else the namespace would be missing).

A process kill leaves the page cache to the kernel, so this proves less than the
crash-point harness (tests/unit/test_lvol_crash.py, which drops unflushed writes too):
it is the end-to-end check with the real process, network and checker.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .target_proc import Launcher, blocktarget_cmd, config, free_port, listen_address
from .test_kill_restart import Totals, count_acks, inode, judge

NQN = "nqn.2026-01.io.blocktarget.test:lvolkill"
BS = 4096
CLUSTER = 16 * 1024
WORKING_SET = 4 << 20
CYCLES = int(os.environ.get("BT_LVOL_KILL_CYCLES", "20"))
BUDGET_S = 300.0


def target_config(img: Path, port: int, export: bool) -> dict[str, Any]:
    bdevs = [{"method": "bdev_uring_create",
              "params": {"name": "U0", "filename": str(img), "block_size": BS}}]
    nvmf: list[dict[str, Any]] = [{"method": "nvmf_create_transport",
                                   "params": {"trtype": "TCP"}}]
    if export:
        nvmf += [
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "lvs/vol", "nsid": 1}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(port)}},
        ]
    return config(bdevs, nvmf, allowed_dirs=[str(img.parent)])


def checker_cmd(port: int, journal: Path, *, check_only: bool = False) -> list[str]:
    cmd = blocktarget_cmd("perf", "-a", "127.0.0.1", "-s", str(port), "-n", NQN,
                          "-w", "randrw", "-M", "30", "-o", str(BS), "-q", "8", "-t", "60",
                          "--size", str(WORKING_SET), "--verify", "--journal", str(journal),
                          "--json", "--quiet")
    return cmd + ["--check-only"] if check_only else cmd


def start_checker(port: int, journal: Path, totals: Totals, acks: int) -> subprocess.Popen:
    """The verifying load, returned once it has `acks` more writes acknowledged (so a
    kill lands on a target under load, not on one still taking connections)."""
    mark = inode(journal)
    p = subprocess.Popen(checker_cmd(port, journal), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while count_acks(journal, mark) < acks:
        if p.poll() is not None:
            judge(p, f"cycle {totals.cycles}", totals)
            raise AssertionError(f"checker ended early: {totals.results[-1]['messages']}")
        assert time.monotonic() < deadline, "the checker got no writes acknowledged"
        time.sleep(0.01)
    return p


def final_check(running_target: Launcher, cfg: dict[str, Any], port: int, journal: Path,
                totals: Totals) -> Any:
    """A last start on one core, every journaled write read back; the target returned
    still running."""
    t = running_target.prepare(cfg, cores=[0]).start()
    p = subprocess.Popen(checker_cmd(port, journal, check_only=True), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    judge(p, "final check", totals)
    assert p.returncode == 0
    return t


@pytest.mark.timeout(BUDGET_S + 60)
def test_kill_restart_thin_lvol(running_target: Launcher, tmp_path: Path) -> None:
    img = tmp_path / "base.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    port = free_port()
    setup = running_target(target_config(img, port, export=False))
    setup.rpc("bdev_lvol_create_lvstore", bdev_name="U0", lvs_name="lvs", cluster_sz=CLUSTER)
    setup.rpc("bdev_lvol_create", lvs_name="lvs", lvol_name="vol", size_in_mib=16,
              thin_provision=True)
    assert setup.stop() == 0

    cfg = target_config(img, port, export=True)
    journal = tmp_path / "ns1.journal"
    rng = random.Random(16)
    totals = Totals()
    start = time.monotonic()
    allocated = []
    while totals.cycles < CYCLES:
        assert time.monotonic() - start < BUDGET_S, (
            f"only {totals.cycles} of {CYCLES} kill cycles fit in {BUDGET_S}s")
        t = running_target.prepare(cfg, cores=[0, 1]).start()
        [v] = t.rpc("bdev_lvol_get_lvols")
        allocated.append(v["num_allocated_clusters"])
        p = start_checker(port, journal, totals, 4)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(t.pid, signal.SIGKILL)
        t.kill()
        judge(p, f"cycle {totals.cycles}", totals)
        totals.cycles += 1
    t = final_check(running_target, cfg, port, journal, totals)
    [v] = t.rpc("bdev_lvol_get_lvols")
    [s] = t.rpc("bdev_lvol_get_lvstores")
    t.stop()
    print(f"{totals.cycles} kills of a thin lvol under load: {totals.acked} FUA writes "
          f"acknowledged, {totals.checked} journaled units read back, 0 lost; clusters "
          f"allocated at each start: {allocated} -> {v['num_allocated_clusters']}")
    assert totals.acked >= 4 * CYCLES and totals.checked >= CYCLES
    # allocations were in flight across the kills, and none leaked or doubled
    assert allocated[-1] > allocated[1] > 0
    assert s["free_clusters"] + v["num_allocated_clusters"] == s["total_data_clusters"]


GROW_CYCLES = int(os.environ.get("BT_LVOL_GROW_KILL_CYCLES", "8"))
GROW_STEP = 1 << 20  # the base file grows by this much each cycle (64 clusters)


@pytest.mark.timeout(BUDGET_S + 60)
def test_kill_during_live_grow_under_load(running_target: Launcher, tmp_path: Path) -> None:
    """Each cycle: FUA write load with allocations on a thin volume, the base file grown,
    `bdev_uring_rescan` and `bdev_lvol_grow_lvstore` called while the load runs, and the
    target SIGKILLed a random moment after the grow began (before, during or after its
    metadata commit; every other cycle only once the grow returned). Every start finds
    the store, with the cluster count it had or the grown one, and the checker reads back
    every acknowledged write."""
    img = tmp_path / "base.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    port = free_port()
    setup = running_target(target_config(img, port, export=False))
    setup.rpc("bdev_lvol_create_lvstore", bdev_name="U0", lvs_name="lvs", cluster_sz=CLUSTER)
    setup.rpc("bdev_lvol_create", lvs_name="lvs", lvol_name="vol", size_in_mib=16,
              thin_provision=True)
    # a thick neighbour takes the first 6 MiB of clusters: the volume's allocations run
    # out of the store's first clusters within a few cycles and go on in grown ones
    setup.rpc("bdev_lvol_create", lvs_name="lvs", lvol_name="pad", size_in_mib=6)
    [s] = setup.rpc("bdev_lvol_get_lvstores")
    assert setup.stop() == 0
    first_total, first_free = s["total_data_clusters"], s["free_clusters"]

    cfg = target_config(img, port, export=True)
    journal = tmp_path / "ns1.journal"
    rng = random.Random(1616)
    totals = Totals()
    start = time.monotonic()
    seen: list[int] = []  # total_data_clusters at each start
    acked: list[bool] = []  # per cycle: the grow's RPC returned before the kill
    allocated: list[int] = []  # the volume's clusters at each start
    while totals.cycles < GROW_CYCLES:
        assert time.monotonic() - start < BUDGET_S, (
            f"only {totals.cycles} of {GROW_CYCLES} kill cycles fit in {BUDGET_S}s")
        t = running_target.prepare(cfg, cores=[0, 1]).start()
        [s] = t.rpc("bdev_lvol_get_lvstores")
        lvols = {v["name"]: v for v in t.rpc("bdev_lvol_get_lvols")}
        used = sum(v["num_allocated_clusters"] for v in lvols.values())
        assert s["free_clusters"] + used == s["total_data_clusters"]
        seen.append(s["total_data_clusters"])
        allocated.append(lvols["vol"]["num_allocated_clusters"])
        p = start_checker(port, journal, totals, 16)  # allocations in every cycle
        os.truncate(img, img.stat().st_size + GROW_STEP)
        grew: list[BaseException | None] = []

        def grow(t: Any = t, grew: list[BaseException | None] = grew) -> None:
            try:
                t.rpc("bdev_uring_rescan", name="U0")
                t.rpc("bdev_lvol_grow_lvstore", lvs_name="lvs")
                grew.append(None)
            except BaseException as e:  # the kill cut the call short
                grew.append(e)

        th = threading.Thread(target=grow)
        th.start()
        if totals.cycles % 2:  # every other grow surely completes: the store keeps
            th.join(15)        # ahead of the volume's allocations, however slow the machine
        time.sleep(rng.uniform(0.0, 0.06))  # (the two RPCs take some 20-50 ms)
        os.kill(t.pid, signal.SIGKILL)
        th.join(15)
        acked.append(grew == [None])
        t.kill()
        judge(p, f"cycle {totals.cycles}", totals)
        totals.cycles += 1
    t = final_check(running_target, cfg, port, journal, totals)
    [s] = t.rpc("bdev_lvol_get_lvstores")
    lvols = {v["name"]: v for v in t.rpc("bdev_lvol_get_lvols")}
    used = sum(v["num_allocated_clusters"] for v in lvols.values())
    allocated.append(lvols["vol"]["num_allocated_clusters"])
    t.rpc("bdev_lvol_grow_lvstore", lvs_name="lvs")  # whatever a kill cut short
    [grown] = t.rpc("bdev_lvol_get_lvstores")
    t.stop()
    seen.append(s["total_data_clusters"])
    print(f"{totals.cycles} kills around a live grow under load: {totals.acked} FUA writes "
          f"acknowledged, {totals.checked} journaled units read back, 0 lost; clusters at "
          f"each start: {seen}; grows acknowledged before the kill: {acked}; the "
          f"volume's clusters at each start: {allocated} ({first_free} free at first)")
    assert totals.acked >= 4 * GROW_CYCLES and totals.checked >= GROW_CYCLES
    # a grow takes all the file holds, so after cycle i the store has its old count or
    # the file's (cycle i grew it to first + i+1 steps), the latter surely when the grow
    # was acknowledged; never a count in between, never more than the base holds
    per_step = GROW_STEP // CLUSTER
    for i, ok in enumerate(acked):
        full = first_total + (i + 1) * per_step
        assert seen[i + 1] == full if ok else seen[i + 1] in (seen[i], full), (i, seen)
    assert grown["total_data_clusters"] == first_total + GROW_CYCLES * per_step
    assert s["free_clusters"] + used == s["total_data_clusters"]
    assert any(acked) and seen[-1] > seen[0]
    # more clusters than the store first had free: some of them are grown ones
    assert allocated[-1] > first_free, (allocated, first_free)
