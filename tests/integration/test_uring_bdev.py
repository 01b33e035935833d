"""The uring bdev in the real target process: RPC (SPDK names, the aio alias, the generic
bdev_create, errors), save_config round trip, export over NVMe/TCP to blocktarget's own
initiator, and the durability contract under `kill -9`.

What `kill -9` can and cannot show for a file bdev: the kernel keeps a killed process's
page cache, so a write that reached the kernel survives the kill whether or not it was
synced. The kill tests therefore prove that nothing is acknowledged before it left the
process (no ack from a user-space queue, buffer or unsubmitted SQE) and that a restart
finds every acknowledged block whole; that FUA and Flush reach the disk as RWF_DSYNC and
fdatasync is checked at the syscall boundary in tests/unit/test_bdev_uring.py. Losing
power is outside what a test on this machine can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from blocktarget.bdev import BdevIO, IOType
from blocktarget.bdevs import uring
from blocktarget.host.connection import NvmeStatusError
from blocktarget.host.controller import connect
from blocktarget.params import validate
from blocktarget.rpc_client import RpcCallError

from .target_proc import Launcher, config, free_port, listen_address

NQN = "nqn.2026-01.io.blocktarget.test:uring"
MiB = 1 << 20
URING_WHY = uring.uring_unavailable_reason()
ENGINE = "uring" if URING_WHY is None else "threads"


def disk_file(tmp_path: Path, name: str, size: int = 8 * MiB) -> str:
    """A file on the disk the tests run from (pytest's tmp_path), where O_DIRECT works."""
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


def odirect_ok(directory: Path) -> bool:
    p = directory / ".odirect-probe"
    try:
        os.close(os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False
    finally:
        p.unlink(missing_ok=True)


def export_config(port: int, bdevs: list[dict[str, Any]]) -> dict[str, Any]:
    nvmf: list[dict[str, Any]] = [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
    ]
    for i, b in enumerate(bdevs, 1):
        nvmf.append({"method": "nvmf_subsystem_add_ns",
                     "params": {"nqn": NQN,
                                "namespace": {"bdev_name": b["params"]["name"], "nsid": i}}})
    nvmf.append({"method": "nvmf_subsystem_add_listener",
                 "params": {"nqn": NQN, "listen_address": listen_address(port)}})
    return config(bdevs, nvmf)


def uring_call(name: str, filename: str, **params: Any) -> dict[str, Any]:
    return {"method": "bdev_uring_create",
            "params": {"name": name, "filename": filename, **params}}


# ---- RPC ---------------------------------------------------------------------------


def test_rpc_create_delete_aliases_and_errors(running_target: Launcher,
                                              tmp_path: Path) -> None:
    t = running_target(config())
    f1, f2, f3 = (disk_file(tmp_path, n) for n in ("a.img", "b.img", "c.img"))
    methods = t.rpc("rpc_get_methods")
    for m in ("bdev_uring_create", "bdev_uring_delete", "bdev_aio_create", "bdev_aio_delete"):
        assert m in methods

    assert t.rpc("bdev_uring_create", name="U1", filename=f1, engine=ENGINE) == "U1"
    assert t.rpc("bdev_aio_create", name="A1", filename=f2, block_size=4096,
                 engine=ENGINE) == "A1"
    assert t.http_rpc("bdev_create", type="uring", name="C1", filename=f3,
                      engine="threads") == "C1"
    u1 = t.rpc("bdev_get_bdevs", name="U1")[0]
    assert (u1["block_size"], u1["num_blocks"]) == (512, 8 * MiB // 512)
    assert u1["driver_specific"]["uring"] == {
        "filename": f1, "engine": ENGINE, "direct_io": odirect_ok(tmp_path),
        "block_device": False, "readonly": False}
    assert u1["write_cache"] is True
    assert u1["supported_io_types"]["unmap"] and u1["supported_io_types"]["write_zeroes"]
    a1 = t.rpc("bdev_get_bdevs", name="A1")[0]
    assert (a1["block_size"], a1["num_blocks"]) == (4096, 8 * MiB // 4096)
    assert t.rpc("bdev_get_bdevs", name="C1")[0]["driver_specific"]["uring"]["engine"] == (
        "threads")

    def err(method: str, **params: Any) -> RpcCallError:
        with pytest.raises(RpcCallError) as ei:
            t.rpc(method, **params)
        return ei.value

    e = err("bdev_aio_create", name="X", filename=str(tmp_path / "missing.img"),
            engine=ENGINE)
    assert e.code == -2 and "No such file or directory" in e.message
    assert str(tmp_path / "missing.img") in e.message
    e = err("bdev_uring_create", name="X", filename=f1, block_size=1000)
    assert e.code == -32602 and "block_size" in e.message
    e = err("bdev_create", type="uring", name="X", filename=f1, engine="aio")
    assert e.code == -32602 and "engine" in e.message
    e = err("bdev_uring_create", name="X")
    assert e.code == -32602 and "filename" in e.message
    assert err("bdev_uring_create", name="U1", filename=f1, engine=ENGINE).code == -17
    assert len(t.rpc("bdev_get_bdevs")) == 3, "no failed create left anything behind"

    t.rpc("bdev_malloc_create", name="M", num_blocks=16, block_size=512)
    e = err("bdev_uring_delete", name="M")
    assert e.code == -19 and "malloc" in e.message
    assert t.rpc("bdev_aio_delete", name="U1") is True
    assert t.rpc("bdev_uring_delete", name="A1") is True
    assert t.rpc("bdev_delete", name="C1") is True
    assert err("bdev_uring_delete", name="U1").code == -19
    assert [b["name"] for b in t.rpc("bdev_get_bdevs")] == ["M"]
    # each deleted bdev closed its file
    fds = set()
    for fd in os.listdir(f"/proc/{t.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since the listing (a socket)
            fds.add(os.readlink(f"/proc/{t.pid}/fd/{fd}"))
    assert not {f1, f2, f3} & fds


async def test_save_config_round_trip(running_target: Launcher, tmp_path: Path) -> None:
    """Created by RPC, saved, replayed by a new process: same bdevs, same data."""
    port = free_port()
    t = running_target(export_config(port, []))
    f1, f2 = disk_file(tmp_path, "a.img"), disk_file(tmp_path, "b.img")
    t.rpc("bdev_aio_create", name="A", filename=f1, block_size=4096, engine=ENGINE)
    t.rpc("bdev_create", type="uring", name="B", filename=f2, engine="threads",
          uuid="0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9")
    t.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "A", "nsid": 1})
    before = {b["name"]: b for b in t.rpc("bdev_get_bdevs")}
    ctrl = await connect("127.0.0.1", port, NQN, timeout=10)
    data = os.urandom(4 * 4096)
    try:
        await ctrl.write(1, 10, data)
        await ctrl.flush(1)
    finally:
        await ctrl.disconnect()
    saved = t.rpc("save_config")
    calls = [c for s in saved["subsystems"] if s["subsystem"] == "bdev" for c in s["config"]]
    assert {c["method"] for c in calls} == {"bdev_uring_create"}
    assert {c["params"]["name"]: c["params"]["engine"] for c in calls} == {
        "A": ENGINE, "B": "threads"}
    t.stop()

    t2 = running_target(saved)
    after = {b["name"]: b for b in t2.rpc("bdev_get_bdevs")}
    for name in ("A", "B"):
        for key in ("uuid", "block_size", "num_blocks", "driver_specific"):
            assert after[name][key] == before[name][key], (name, key)
    ctrl = await connect("127.0.0.1", port, NQN, timeout=10)
    try:
        assert bytes(await ctrl.read(1, 10, 4)) == data
    finally:
        await ctrl.disconnect()


# ---- NVMe/TCP ------------------------------------------------------------------------


async def test_export_over_nvme_tcp(running_target: Launcher, tmp_path: Path) -> None:
    """Two namespaces on one subsystem: io_uring with 4 KiB blocks on the disk (O_DIRECT)
    and the threads engine with 512-byte blocks; every command the initiator has."""
    port = free_port()
    f1, f2 = disk_file(tmp_path, "ns1.img"), disk_file(tmp_path, "ns2.img")
    t = running_target(export_config(port, [
        uring_call("U4K", f1, block_size=4096, engine=ENGINE),
        uring_call("T512", f2, block_size=512, engine="threads"),
    ]), cores=[0, 1] if len(os.sched_getaffinity(0)) > 1 else [0])
    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=2, timeout=10)
    try:
        idc = await ctrl.identify_ctrl()
        assert idc["vwc"] & 1, "a file has a volatile write cache: hosts must flush"
        for nsid, path, bs in ((1, f1, 4096), (2, f2, 512)):
            ns = await ctrl.namespace(nsid)
            assert (ns.lba_size, ns.nsze) == (bs, 8 * MiB // bs)
            rng = random.Random(nsid)
            written: dict[int, bytes] = {}
            for qid in (1, 2):  # both I/O queues (two reactors when there are two cores)
                for _ in range(20):
                    nlb = rng.choice([1, 2, 8, 32])
                    slba = rng.randrange(0, ns.nsze // 32) * 32
                    data = os.urandom(nlb * bs)
                    await ctrl.write(nsid, slba, data, fua=rng.random() < 0.3, qid=qid)
                    for i in range(nlb):
                        written[slba + i] = data[i * bs:(i + 1) * bs]
            await ctrl.flush(nsid)
            with open(path, "rb") as f:
                for lba, block in written.items():
                    f.seek(lba * bs)
                    assert f.read(bs) == block, f"nsid {nsid} lba {lba} not in the file"
            for lba, block in list(written.items())[:30]:
                assert bytes(await ctrl.read(nsid, lba, 1)) == block
            # a 128 KiB read, compare, write zeroes, deallocate
            big = os.urandom(131072)
            nlb = 131072 // bs
            await ctrl.write(nsid, 0, big)
            assert bytes(await ctrl.read(nsid, 0, nlb)) == big
            await ctrl.compare(nsid, 0, big[: 4 * bs])
            bad = bytearray(big[: 4 * bs])
            bad[-1] ^= 1
            with pytest.raises(NvmeStatusError):
                await ctrl.compare(nsid, 0, bytes(bad))
            await ctrl.write_zeroes(nsid, 1, 2)
            await ctrl.dsm_deallocate(nsid, [(4, 3)])
            got = bytes(await ctrl.read(nsid, 0, 8))
            assert got == big[:bs] + bytes(2 * bs) + big[3 * bs:4 * bs] + bytes(3 * bs) + (
                big[7 * bs:8 * bs])
        st = {b["name"]: b for b in t.rpc("bdev_get_iostat")["bdevs"]}
        assert st["U4K"]["num_write_ops"] >= 41 and st["T512"]["num_read_ops"] >= 31
        assert st["U4K"]["num_flush_ops"] >= 1 and st["U4K"]["num_unmap_ops"] >= 1
    finally:
        await ctrl.disconnect()


# ---- durability: kill -9 -------------------------------------------------------------

BS = 4096
UNIT = struct.Struct("<QQ")


def block(lba: int, gen: int) -> bytes:
    """Every 16 bytes name the block and its generation, so a torn block shows anywhere."""
    return UNIT.pack(lba, gen) * (BS // UNIT.size)


WRITER = textwrap.dedent(r"""
    import os, struct, sys
    from blocktarget.bdev import MODULES, BdevIO, IOType
    from blocktarget.bdevs import uring  # noqa: F401
    from blocktarget.params import validate
    from blocktarget.reactor import Reactor
    path, engine, first, count, gen = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    UNIT = struct.Struct("<QQ")
    mod = MODULES["uring"]
    b = mod.create(validate(mod.schema, {"name": "U", "filename": path, "block_size": 4096,
                                         "engine": engine}))
    r = Reactor(0, sorted(os.sched_getaffinity(0))[0])
    r.start()
    out = sys.stdout.buffer

    def ack(lba):
        out.write(b"%d\n" % lba)
        out.flush()

    def go():
        ch = b.get_io_channel(r)
        # four writes in flight at all times; even LBAs: FUA, odd: write then flush
        state = {"next": first}
        def issue():
            lba = state["next"]
            if lba >= first + count:
                return
            state["next"] += 1
            data = UNIT.pack(lba, gen) * 256
            if lba % 2 == 0:
                ch.submit(BdevIO(IOType.WRITE, lba, 1, data, lambda io: done(io, lba),
                                 fua=True))
            else:
                def written(io):
                    assert io.status == 0, io.status
                    ch.submit(BdevIO(IOType.FLUSH, 0, 0, None, lambda f: done(f, lba)))
                ch.submit(BdevIO(IOType.WRITE, lba, 1, data, written))
        def done(io, lba):
            assert io.status == 0, io.status
            ack(lba)
            issue()
        for _ in range(4):
            issue()
    out.write(b"ready\n")
    out.flush()
    r.send(go)
    import time
    time.sleep(30)
""")


def verify(path: str, expect: dict[int, int], maybe: dict[int, int]) -> None:
    """Read through a new bdev on the file (the "restart"): each acknowledged block holds
    its data; blocks written but not acknowledged hold the old or the new data whole."""
    mod = uring.MODULE
    b = mod.create(validate(mod.schema, {"name": "V", "filename": path, "block_size": BS,
                                         "engine": ENGINE}))
    try:
        ch = b.get_io_channel(None)
        for lba in sorted({*expect, *maybe}):
            got: list[BdevIO] = []
            ch.submit(BdevIO(IOType.READ, lba, 1, None, got.append))
            assert got[0].status == 0
            data = got[0].buf
            if lba in expect:
                assert data == block(lba, expect[lba]), f"acknowledged lba {lba} lost"
            else:
                assert data in (bytes(BS), block(lba, maybe[lba])), f"lba {lba} torn"
        b.close_channel(None)
    finally:
        b.destruct()


@pytest.mark.parametrize("engine", [
    pytest.param("uring", marks=pytest.mark.skipif(URING_WHY is not None,
                                                   reason=f"no io_uring: {URING_WHY}")),
    "threads",
])
def test_kill9_after_each_acknowledgement(tmp_path: Path, engine: str) -> None:
    """100 cycles (each ~0.2 s): a writer process keeps four FUA / write+flush writes in flight and is
    SIGKILLed as soon as a write is acknowledged (more are in flight then); a new bdev on
    the file then finds every write acknowledged in any cycle so far."""
    # the contract is 100 kills for the uring bdev; the threads engine shares the ack
    # path except the worker threads, 30 keep the suite fast
    cycles, per_cycle = (100 if engine == "uring" else 30), 8
    path = disk_file(tmp_path, "kill.img", cycles * per_cycle * BS)
    expect: dict[int, int] = {}
    t0 = time.monotonic()
    rng = random.Random(5)
    for cycle in range(cycles):
        first = cycle * per_cycle
        p = subprocess.Popen([sys.executable, "-c", WRITER, path, engine, str(first),
                              str(per_cycle), str(cycle + 1)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        try:
            line = p.stdout.readline()
            assert line == b"ready\n", (line, p.stderr.read() if p.stderr else b"")
            acks_wanted = rng.randint(1, 3)
            acked: list[int] = []
            while len(acked) < acks_wanted:
                line = p.stdout.readline()
                assert line, f"writer died: {p.stderr.read() if p.stderr else b''!r}"
                acked.append(int(line))
            p.send_signal(signal.SIGKILL)  # the moment after the acknowledgement
            p.wait(10)
            # acks the pipe already holds were also given before the kill
            acked += [int(x) for x in p.stdout.read().split()]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            p.stdout.close()
            if p.stderr:
                p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        for lba in acked:
            expect[lba] = cycle + 1
        maybe = {lba: cycle + 1 for lba in range(first, first + per_cycle)
                 if lba not in expect}
        verify(path, expect, maybe)
    elapsed = time.monotonic() - t0
    assert len(expect) >= cycles
    print(f"{cycles} kill -9 cycles, {len(expect)} acknowledged writes kept, {elapsed:.1f} s")


async def durable_write(ctrl: Any, lba: int, gen: int, acked: list[int], kill_at: int,
                        kill: Any) -> None:
    """Odd LBAs with FUA, even ones written then flushed; `acked` once the host knows,
    and the target killed the moment the `kill_at`th acknowledgement arrives."""
    data = block(lba, gen)
    if lba % 2:
        await ctrl.write(1, lba, data, fua=True)
    else:
        await ctrl.write(1, lba, data)
        await ctrl.flush(1)
    acked.append(lba)
    if len(acked) == kill_at:
        kill()


async def test_kill9_target_over_nvme_tcp(running_target: Launcher, tmp_path: Path) -> None:
    """The real target process and a real host: 10 cycles of 10 acknowledged writes
    (FUA, or write then Flush) with more in flight, `kill -9`, restart from the same
    config, read every acknowledged block back over NVMe/TCP. 100 acknowledged writes in
    all; one kill per 10 (a target start costs about a second, 100 of them too long)."""
    path = disk_file(tmp_path, "tgt.img", 4 * MiB)
    expect: dict[int, int] = {}
    per_cycle = 14  # 10 acknowledged, up to 4 in flight at the kill
    for cycle in range(1, 11):
        port = free_port()
        t = running_target(export_config(port, [uring_call("U", path, block_size=BS,
                                                           engine=ENGINE)]))
        ctrl = await connect("127.0.0.1", port, NQN, timeout=10)
        lbas = range((cycle - 1) * per_cycle, cycle * per_cycle)
        acked: list[int] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            for lba, gen in expect.items():  # everything acknowledged before any kill
                assert bytes(await ctrl.read(1, lba, 1)) == block(lba, gen), lba
            proc = t.proc
            assert proc is not None
            killed = asyncio.Event()

            def kill(proc: Any = proc, killed: asyncio.Event = killed) -> None:
                proc.kill()
                killed.set()

            tasks = [asyncio.create_task(durable_write(ctrl, lba, cycle, acked, 10, kill))
                     for lba in lbas]  # SIGKILL at the 10th ack, the rest still in flight
            while not killed.is_set():
                failed = [x for x in tasks if x.done() and x.exception()]
                assert not failed, failed[0].exception()
                await asyncio.sleep(0.001)
            proc.wait(10)
            kept = list(acked)  # acks already received when the kill landed count too
        finally:
            for x in tasks:
                x.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await ctrl.close()
            t.kill()
        for lba in kept:
            expect[lba] = cycle
        # in flight at the kill: the new data or zeroes (never written), never torn
        with open(path, "rb") as f:
            for lba in lbas:
                if lba not in kept:
                    f.seek(lba * BS)
                    assert f.read(BS) in (bytes(BS), block(lba, cycle)), lba
    assert len(expect) >= 100
    port = free_port()
    t = running_target(export_config(port, [uring_call("U", path, block_size=BS,
                                                       engine=ENGINE)]))
    ctrl = await connect("127.0.0.1", port, NQN, timeout=10)
    try:
        for lba, gen in expect.items():
            assert bytes(await ctrl.read(1, lba, 1)) == block(lba, gen), lba
    finally:
        await ctrl.disconnect()
