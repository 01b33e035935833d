"""`kill -9` against the pmem bdev: no acknowledged write lost, no block torn.

Two levels:

* A writer process drives the bdev through an I/O channel as fast as it can (single and
  multi-block writes, unmaps), logging each operation before it starts and again once it
  completed, and is SIGKILLed at a random moment, over and over. After each kill the
  pool is reopened (recovery) and every block must hold exactly what the last completed
  operation left there, except the blocks of the one operation in flight, each of which
  holds its old or its new contents whole. Every block carries its LBA and a generation
  in each 16-byte unit, so a mix of two writes is visible anywhere in the block.
* The real target process exporting a pmem bdev over NVMe/TCP: blocktarget's own
  initiator writes and reads, the target is killed with SIGKILL under load and restarted
  from the config save_config wrote, and every write the host saw acknowledged reads back.

Both run on /dev/shm, and again on a DAX file system when one is mounted.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktarget.bdevs import pmem
from blocktarget.nvme import fastlane

from .target_proc import Launcher, config, free_port, listen_address

pytestmark = pytest.mark.skipif(not pmem.libpmem_available(),
                                reason="blocktarget._pmem not built (libpmem-dev missing)")

BS = 4096
NB = 64
UNIT = struct.Struct("<QQ")  # (lba, generation), repeated over the block
CYCLES = 100  # the durability contract of issue 5: 100 kills, zero acknowledged writes lost
KILL_BUDGET_S = 50.0  # ~7 s here; a machine too slow for 100 kills fails rather than hides it


def dax_dir() -> str | None:
    """A writable directory on a file system mounted with DAX, if any."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for fields in mounts:
        if len(fields) < 4:
            continue
        opts = fields[3].split(",")
        if "dax" in opts or "dax=always" in opts:
            if os.access(fields[1], os.W_OK):
                return fields[1]
    return None


def _locations() -> list[object]:
    dax = dax_dir()
    return [
        pytest.param("/dev/shm", id="shm"),
        pytest.param(dax, id="dax", marks=pytest.mark.skipif(
            dax is None, reason="no DAX file system mounted (no 'dax' option in /proc/mounts)")),
    ]


@pytest.fixture(params=_locations())
def pool_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    base = request.param
    if base == "/dev/shm" and not os.path.isdir(base):
        pytest.skip("/dev/shm is missing")
    d = tempfile.mkdtemp(prefix="bt-pmem-kill-", dir=base)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# A zygote imports blocktarget once and forks one writer per kill cycle (a fresh
# interpreter per cycle would spend most of the time budget importing). A writer logs
# "B <kind> <lba> <count> <gen>" before an operation and "A" after it completed, with
# os.write to a file, so nothing is buffered in the process that gets killed.
ZYGOTE = r"""
import os, random, struct, sys, time
from blocktarget.bdev import BdevIO, IOType, MODULES, load_builtin_modules
from blocktarget.params import validate
load_builtin_modules()
print("ready", flush=True)
for line in sys.stdin:
    if not line.strip():
        continue
    if line.startswith("reap "):
        _, status = os.waitpid(int(line.split()[1]), 0)
        print(status, flush=True)
        continue
    path, log_path, seed, engine = line.split()
    from blocktarget.bdevs import pmem
    pmem.USE_C_ENGINE = engine == "c"
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    try:
        writer(path, log_path, int(seed))
    finally:
        os._exit(1)
"""

WRITER = r"""
def writer(path, log_path, seed):
    mod = MODULES["pmem"]
    bdev = mod.create(validate(mod.schema, {"name": "K", "pmem_file": path}))
    ch = bdev.get_io_channel(None)
    bs, nb = bdev.block_size, bdev.num_blocks
    unit = struct.Struct("<QQ")
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(log, b"R %d %d\n" % (bdev.pool.pm.is_pmem, bdev.pool.core is not None))
    status = []
    while True:
        lba = rng.randrange(nb)
        count = rng.randint(1, min(12, nb - lba))
        gen = time.time_ns()
        if rng.random() < 0.1:
            os.write(log, b"B Z %d %d %d\n" % (lba, count, gen))
            ch.submit(BdevIO(IOType.UNMAP, lba, count, None, status.append))
        else:
            data = b"".join(unit.pack(lba + i, gen) * (bs // 16) for i in range(count))
            os.write(log, b"B W %d %d %d\n" % (lba, count, gen))
            ch.submit(BdevIO(IOType.WRITE, lba, count, data, status.append))
        if status.pop().status != 0:
            os.write(log, b"FAILED\n")
            os._exit(1)
        os.write(log, b"A\n")
"""


def block_state(block: bytes, lba: int) -> int:
    """The generation a block holds (0 for zeroes); AssertionError if it is torn."""
    if not any(block):
        return 0
    first = block[:16]
    if block != first * (len(block) // 16):
        raise AssertionError(f"block {lba} is torn: it mixes contents of different writes")
    got_lba, gen = UNIT.unpack(first)
    assert got_lba == lba, f"block {lba} holds the data of block {got_lba}"
    return gen


def parse_log(text: str) -> tuple[list[tuple[str, int, int, int]], tuple[str, int, int, int] | None]:
    """(completed operations, the one in flight or None)."""
    done: list[tuple[str, int, int, int]] = []
    pending = None
    for line in text.splitlines():
        if line.startswith("B "):
            _, kind, lba, count, gen = line.split()
            pending = (kind, int(lba), int(count), int(gen))
        elif line == "A":
            assert pending is not None
            done.append(pending)
            pending = None
    return done, pending


def read_all(path: Path) -> list[bytes]:
    pool, fd = pmem.open_pool(str(path))
    try:
        buf = bytearray(pool.num_blocks * pool.block_size)
        pool.read(0, 0, pool.num_blocks, memoryview(buf))
        assert pool.check() == [], "pool inconsistent after recovery"
    finally:
        pool.close()
        os.close(fd)
    return [bytes(buf[i * BS:(i + 1) * BS]) for i in range(NB)]


@pytest.mark.parametrize("engine", [
    "python",
    pytest.param("c", marks=pytest.mark.skipif(not pmem.c_engine_available(),
                                               reason="blocktarget._fastpath not built"))])
@pytest.mark.parametrize("persist", ["msync", "flush"])
def test_kill_loop(pool_dir: Path, persist: str, engine: str) -> None:
    """`persist`: how the writer makes stores durable, chosen with libpmem's
    PMEM_IS_PMEM_FORCE (0: `pmem_is_pmem` false, the bdev msyncs, as on tmpfs; 1: the
    cache-flush path of real persistent memory), so both code paths meet `kill -9`;
    `engine`: the BTT's Python methods or its C engine (csrc/be_pmem.c)."""
    path = pool_dir / "pool"
    pmem.create_pool_file(str(path), NB, BS, lanes=1, free_per_lane=4)
    model = [0] * NB  # generation each block must hold (0: zeroes)
    rng = random.Random(0x5EED)
    start = time.monotonic()
    cycles = mid_op = acked_total = in_flight_new = 0
    env = dict(os.environ, PMEM_IS_PMEM_FORCE="1" if persist == "flush" else "0")
    zygote = subprocess.Popen([sys.executable, "-c", WRITER + ZYGOTE], text=True, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert zygote.stdin is not None and zygote.stdout is not None
    try:
        assert zygote.stdout.readline().strip() == "ready"
        while cycles < CYCLES and time.monotonic() - start < KILL_BUDGET_S:
            log_path = pool_dir / f"log{cycles}"
            zygote.stdin.write(f"{path} {log_path} {rng.getrandbits(32)} {engine}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            # wait for the writer to be running, then let it write for a random while
            deadline = time.monotonic() + 20
            while not (log_path.exists() and log_path.read_bytes().startswith(b"R ")):
                assert time.monotonic() < deadline, "writer did not start"
                time.sleep(0.002)
            ready = log_path.read_bytes().split(b"\n")[0].split()
            assert ready[1] == (b"1" if persist == "flush" else b"0"), (
                "PMEM_IS_PMEM_FORCE did not select the persistence path")
            assert ready[2] == (b"1" if engine == "c" else b"0"), "not the engine asked for"
            time.sleep(rng.uniform(0.0, 0.1))
            os.kill(pid, signal.SIGKILL)
            zygote.stdin.write(f"reap {pid}\n")
            zygote.stdin.flush()
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"writer ended with status {status}: {log_path.read_text()[-200:]}")
            cycles += 1
            done, pending = parse_log(log_path.read_text())
            acked_total += len(done)
            mid_op += pending is not None
            in_flight_new += verify_after_kill(path, model, done, pending, cycles)
    finally:
        zygote.kill()
        zygote.wait(10)
    elapsed = time.monotonic() - start
    print(f"{persist}: {cycles} kills in {elapsed:.1f}s, {acked_total} acknowledged operations verified, "
          f"{mid_op} kills during an operation, {in_flight_new} in-flight blocks landed")
    assert cycles == CYCLES, f"only {cycles} kill cycles fit in {KILL_BUDGET_S}s"
    assert acked_total > cycles, "the writer hardly wrote: the test proved nothing"
    assert mid_op > 0


def verify_after_kill(path: Path, model: list[int], done: list[tuple[str, int, int, int]],
                      pending: tuple[str, int, int, int] | None, cycle: int) -> int:
    """Check the recovered pool against the log; returns how many in-flight blocks landed."""
    for kind, lba, count, gen in done:
        for i in range(count):
            model[lba + i] = 0 if kind == "Z" else gen
    blocks = read_all(path)
    flight: dict[int, int] = {}
    if pending is not None:
        kind, lba, count, gen = pending
        flight = {lba + i: 0 if kind == "Z" else gen for i in range(count)}
    landed = 0
    for lba in range(NB):
        got = block_state(blocks[lba], lba)
        if got == model[lba]:
            continue
        assert lba in flight and got == flight[lba], (
            f"kill {cycle}: block {lba} holds generation {got}, expected "
            f"{model[lba]} (last acknowledged)"
            + (f" or {flight[lba]} (in flight)" if lba in flight else ""))
        model[lba] = got  # the in-flight write landed for this block
        landed += 1
    return landed



# ---- the real target over NVMe/TCP --------------------------------------------------

NQN = "nqn.2026-01.io.test:pmem"


def pmem_target_config(pool: Path, port: int) -> dict[str, object]:
    return config(
        [{"method": "bdev_pmem_create", "params": {"pmem_file": str(pool), "name": "Pmem0"}}],
        [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
         {"method": "nvmf_create_subsystem",
          "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "PMEM0001"}},
         {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                                                        "namespace": {"bdev_name": "Pmem0"}}},
         {"method": "nvmf_subsystem_add_listener",
          "params": {"nqn": NQN, "listen_address": listen_address(port)}}],
    )


def pattern(lba: int, gen: int) -> bytes:
    return UNIT.pack(lba, gen) * (BS // 16)


async def _verify(port: int, acked: dict[int, int], maybe: dict[int, set[int]]) -> int:
    from blocktarget.host.controller import connect

    ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
    try:
        per = min(NB, ctrl.max_transfer // BS) or NB
        data = b"".join([bytes(await ctrl.read(1, lba, min(per, NB - lba)))
                         for lba in range(0, NB, per)])
    finally:
        await ctrl.disconnect()
    landed = 0
    for lba in range(NB):
        got = block_state(data[lba * BS:(lba + 1) * BS], lba)
        if got != acked.get(lba, 0):
            assert got in maybe.get(lba, ()), (
                f"block {lba}: generation {got}, acknowledged {acked.get(lba, 0)}")
            acked[lba] = got
            landed += 1
    return landed


async def _load(port: int, acked: dict[int, int], maybe: dict[int, set[int]],
                seconds: float, seed: int, stats: dict[str, int]) -> None:
    """Four writers over two I/O queues until the connection dies (the kill)."""
    from blocktarget.host.controller import connect

    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=2, timeout=15)
    rng = random.Random(seed)
    stop = time.monotonic() + seconds

    async def writer(w: int) -> None:
        while time.monotonic() < stop:
            lba = rng.randrange(w * NB // 4, (w + 1) * NB // 4)  # writers own disjoint LBAs
            gen = time.time_ns()
            maybe[lba] = {gen}  # in flight: after a kill the block holds this or acked[lba]
            await ctrl.write(1, lba, pattern(lba, gen), fua=rng.random() < 0.5)
            acked[lba] = gen  # acknowledged: must survive from here on
            del maybe[lba]
            stats["acked"] += 1

    try:
        await asyncio.gather(*(writer(w) for w in range(4)))
    except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            await asyncio.wait_for(ctrl.close(), 2)
        except Exception:  # noqa: BLE001 - the target is gone; nothing to close cleanly
            pass


def _lane_commands(t: Launcher) -> int:
    stats = t.rpc("nvmf_get_stats")
    return sum(g["c_lane_commands"] for g in stats["poll_groups"])


def test_target_export_and_kill(running_target: Launcher, pool_dir: Path) -> None:
    pool = pool_dir / "pool"
    port = free_port()
    first = running_target(config(), cores=[0])
    # the operator creates the pool, then the bdev and the export, all by RPC
    assert first.rpc("bdev_pmem_create_pool", pmem_file=str(pool), num_blocks=NB,
                     block_size=BS) is True
    doc = pmem_target_config(pool, port)
    for call in doc["subsystems"][0]["config"] + doc["subsystems"][1]["config"]:  # type: ignore[index]
        first.rpc(call["method"], **call["params"])
    saved = first.rpc("save_config")
    bdev_methods = [c["method"] for s in saved["subsystems"] if s["subsystem"] == "bdev"
                    for c in s["config"]]
    assert bdev_methods == ["bdev_pmem_create"]

    async def functional() -> None:
        from blocktarget.host.controller import connect

        ctrl = await connect("127.0.0.1", port, NQN, timeout=15)
        try:
            ns = await ctrl.namespace(1)
            assert ns.lba_size == BS and ns.size_bytes == NB * BS
            idc = await ctrl.identify_ctrl()
            assert idc["vwc"] & 1 == 0, "no volatile write cache: every write is durable"
            blob = os.urandom(8 * BS)
            await ctrl.write(1, 8, blob)
            await ctrl.write(1, 20, blob[:BS], fua=True)
            await ctrl.flush(1)
            assert bytes(await ctrl.read(1, 8, 8)) == blob
            assert bytes(await ctrl.read(1, 20, 1)) == blob[:BS]
            await ctrl.write_zeroes(1, 9, 2)
            await ctrl.dsm_deallocate(1, [(12, 1)])
            got = bytes(await ctrl.read(1, 8, 8))
            assert got == blob[:BS] + bytes(2 * BS) + blob[3 * BS:4 * BS] + bytes(BS) + blob[5 * BS:]
            await ctrl.write_zeroes(1, 0, NB)  # back to a known state for the kill test
        finally:
            await ctrl.disconnect()

    asyncio.run(functional())
    # the reads and writes above were the C lane's (the pmem BTT in C), where it is built
    lane_cmds = [_lane_commands(first)]
    if fastlane.AVAILABLE and pmem.c_engine_available():
        assert lane_cmds[0] >= 4, lane_cmds
    first.kill()  # SIGKILL, no shutdown

    acked: dict[int, int] = {}
    maybe: dict[int, set[int]] = {}
    stats = {"acked": 0, "in_flight": 0, "landed": 0}
    rng = random.Random(7)
    for cycle in range(3):
        t = running_target.prepare(saved)
        t.start()
        assert t.rpc("bdev_get_bdevs", name="Pmem0")[0]["num_blocks"] == NB
        stats["landed"] += asyncio.run(_verify(port, acked, maybe))
        stats["in_flight"] += len(maybe)
        maybe.clear()

        async def load_then_kill(t=t, cycle=cycle) -> None:  # type: ignore[no-untyped-def]
            task = asyncio.ensure_future(_load(port, acked, maybe, 10.0, cycle, stats))
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            lane_cmds.append(await asyncio.to_thread(_lane_commands, t))
            os.kill(t.pid, signal.SIGKILL)
            await asyncio.wait_for(task, 15)

        asyncio.run(load_then_kill())
        t.kill()
        assert t.proc is not None and t.proc.returncode == -signal.SIGKILL
    assert len(acked) > NB // 2, "the host hardly wrote before the kills"
    last = running_target.prepare(saved).start()
    stats["landed"] += asyncio.run(_verify(port, acked, maybe))
    stats["in_flight"] += len(maybe)
    print(f"target killed 3 times under load: {stats['acked']} acknowledged writes intact, "
          f"{stats['in_flight']} writes in flight at the kills, {stats['landed']} of them landed; "
          f"C lane commands before each kill: {lane_cmds}")
    assert stats["in_flight"] > 0, "no write was in flight at a kill: the test proved little"
    if fastlane.AVAILABLE and pmem.c_engine_available():
        # the load was served by the lane, killed with its writes in flight
        assert all(n > 0 for n in lane_cmds[1:]), lane_cmds
    info = last.rpc("bdev_pmem_get_pool_info", pmem_file=str(pool))
    assert info[0]["in_use_by"] == "Pmem0"
    last.stop()
    json.dumps(saved)  # the saved config is plain JSON a file can hold
