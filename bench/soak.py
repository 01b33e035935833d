"""Soak: connection churn and 1,000 concurrent hosts against a real target, for a bounded
time, sampling the target's RSS and open file descriptors from /proc.

Each round (until the duration is spent and at least the requested churn is done):

1. churn: connect / write a block / read it back and compare / disconnect, by
   `--churn-parallel` workers of blocktarget's initiator;
2. concurrent: `--concurrent` controllers (each an admin queue and one I/O queue, so
   two TCP connections) opened and held at once, each writing and verifying its own
   block, then `--io-rounds` rounds of I/O on all of them, then all disconnected; while
   they are held the target is asked (`nvmf_get_stats`) how many admin and I/O queue
   pairs it serves, and its fds are read at that moment;
3. quiescent point: once `nvmf_get_stats` shows no queue pair and no pending request,
   and the fd count is back within 2 of the baseline (or `FD_SETTLE_S` has passed: a
   leak never comes back), RSS and fds are recorded.

Growth is judged on the quiescent points, where the target should be back to the same
state every round: fds must return to the baseline exactly (every socket closed), and
RSS may rise over the first round (the allocator's arenas grow to the peak once) but not
keep rising; the slope over later rounds is reported per round and per minute. A
sampler thread also records RSS/fds every `--sample` seconds for the start/end/max
figures. Zero errors of any kind are expected.

    .venv/bin/python bench/soak.py                    # 10 minutes, >= 10,000 churned
    .venv/bin/python bench/soak.py --ci               # ~60 s (tests/soak runs this)
    .venv/bin/python bench/soak.py --duration 3600    # longer

The soak process raises its own RLIMIT_NOFILE (2 fds per controller); the target
raises its own at start (blocktarget.app.raise_fd_limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blocktarget.host.controller import Controller, connect  # noqa: E402
from blocktarget.rpc_client import RpcClient  # noqa: E402

NQN = "nqn.2026-01.io.blocktarget:soak"
BS = 4096
NB = 8192


# --------------------------------------------------------------------- the target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Target:
    """`blocktarget start` in a private directory, ready once it says READY=1."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.sock = str(workdir / "rpc.sock")
        cfg = {"blocktarget": {"cores": [0, 1], "rpc": {"unix": self.sock, "http": None},
                               "log_level": "warning"},
               "subsystems": [
                   {"subsystem": "bdev", "config": [
                       {"method": "bdev_malloc_create",
                        "params": {"name": "M0", "num_blocks": NB, "block_size": BS}}]},
                   {"subsystem": "nvmf", "config": [
                       {"method": "nvmf_create_transport",
                        "params": {"trtype": "TCP", "max_connections": 0,
                                   "max_connections_per_address": 0}},
                       {"method": "nvmf_create_subsystem",
                        "params": {"nqn": NQN, "allow_any_host": True,
                                   "max_cntlid": 65519}},
                       {"method": "nvmf_subsystem_add_ns",
                        "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
                       {"method": "nvmf_subsystem_add_listener",
                        "params": {"nqn": NQN, "listen_address": {
                            "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                            "trsvcid": str(port)}}}]}]}
        self.config = workdir / "target.json"
        self.config.write_text(json.dumps(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        notify_path = str(self.workdir / "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.2)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        with open(self.workdir / "target.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "blocktarget", "start", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if b"READY=1" in notify.recv(256):
                        return
                except TimeoutError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("target did not start:\n" + self.log())
        finally:
            notify.close()

    def log(self) -> str:
        return (self.workdir / "target.log").read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rpc(self, method: str, **params: Any) -> Any:
        with RpcClient(unix=self.sock, timeout=30) as c:
            return c.call(method, params or None)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def proc_sample(pid: int) -> tuple[int, int]:
    """(RSS KiB, open fds) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.pid, self.every = pid, every
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            rss, fds = proc_sample(self.pid)
            self.samples.append((time.monotonic() - self.t0, rss, fds))
            self.halt.wait(self.every)


# ------------------------------------------------------------------------- the load


@dataclass
class Counters:
    churned: int = 0
    concurrent_opened: int = 0
    held: list[dict[str, int]] = field(default_factory=list)
    verified_ios: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.messages) < 10:
            self.messages.append(what)


def block(lba: int, tag: int) -> bytes:
    stamp = lba.to_bytes(8, "little") + tag.to_bytes(8, "little")
    return stamp * (BS // 16)


async def write_verify(ctrl: Controller, lba: int, tag: int, c: Counters) -> None:
    data = block(lba, tag)
    await ctrl.write(1, lba, data)
    got = bytes(await ctrl.read(1, lba, 1))
    if got != data:
        c.error(f"LBA {lba}: read back something else than tag {tag}")
    else:
        c.verified_ios += 2


async def churn(port: int, n: int, parallel: int, c: Counters) -> None:
    todo = iter(range(n))

    async def worker(w: int) -> None:
        lba = NB - 1 - w  # churners own the last blocks; concurrent hosts the first
        for i in todo:
            try:
                ctrl = await connect("127.0.0.1", port, NQN, timeout=30)
                try:
                    await write_verify(ctrl, lba, i, c)
                finally:
                    await ctrl.disconnect()
                c.churned += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                c.error(f"churn {i}: {type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker(w) for w in range(parallel)))


def qpair_counts(t: Target) -> dict[str, int]:
    """What the target itself says it holds, summed over its poll groups."""
    groups = t.rpc("nvmf_get_stats")["poll_groups"]
    return {k: sum(g[k] for g in groups) for k in ("current_admin_qpairs", "current_io_qpairs",
                                                     "unconnected_qpairs", "pending_requests")}


async def concurrent(t: Target, n: int, io_rounds: int, c: Counters,
                     batch: int = 50) -> None:
    port = t.port
    ctrls: list[Controller] = []
    try:
        for start in range(0, n, batch):
            got = await asyncio.gather(
                *(connect("127.0.0.1", port, NQN, timeout=60) for _ in range(start,
                                                                          min(n, start + batch))),
                return_exceptions=True)
            for g in got:
                if isinstance(g, BaseException):
                    c.error(f"concurrent connect: {type(g).__name__}: {g}")
                else:
                    ctrls.append(g)
        c.concurrent_opened = max(c.concurrent_opened, len(ctrls))
        # Asked, not sampled: a periodic /proc sample can miss the peak or count a
        # transient RPC socket, which once made an exact fd-count assertion fail by one.
        held = await asyncio.to_thread(qpair_counts, t)
        held["fds"] = proc_sample(t.pid)[1]
        held["controllers"] = len(ctrls)
        c.held.append(held)
        for r in range(io_rounds):
            res = await asyncio.gather(*(write_verify(x, i, r, c) for i, x in enumerate(ctrls)),
                                       return_exceptions=True)
            for g in res:
                if isinstance(g, BaseException):
                    c.error(f"concurrent I/O: {type(g).__name__}: {g}")
    finally:
        res = await asyncio.gather(*(x.disconnect() for x in ctrls), return_exceptions=True)
        for g in res:
            if isinstance(g, BaseException):
                c.error(f"disconnect: {type(g).__name__}: {g}")


# A queue pair leaves the target's counts when it closes, but its socket's fd goes a
# little later: the event loop closes it on a later turn, after flushing what is still
# buffered for the host. Under load (other processes on the 2 CPUs) that once took long
# enough for a quiescent point to count 21 such fds. Waiting for them, bounded, keeps the
# point exact without hiding a leak (leaked fds never close).
FD_SETTLE_S = 10.0


def settled_fds(pid: int, baseline: int | None, timeout: float = FD_SETTLE_S) -> tuple[int, float]:
    """(fds, seconds waited): with a baseline, the first count within 2 of it, else the
    last count at the timeout; without one, a count unchanged over 0.5 s."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = proc_sample(pid)[1]
    while True:
        if baseline is not None and abs(last - baseline) <= 2:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5 if baseline is None else 0.05)
        now = proc_sample(pid)[1]
        if baseline is None and now == last:
            break
        last = now
    return last, round(time.monotonic() - t0, 2)


def quiescent(t: Target, timeout: float = 30) -> dict[str, int]:
    """Wait until the target holds no connection and no request."""
    deadline = time.monotonic() + timeout
    while True:
        s = qpair_counts(t)
        if not any(s.values()):
            return s
        if time.monotonic() > deadline:
            raise RuntimeError(f"target still holds {s} after every host left")
        time.sleep(0.05)


# ------------------------------------------------------------------------- the run


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    churn_total: int = 10_000
    churn_per_round: int = 1000
    churn_parallel: int = 8
    concurrent: int = 1000
    io_rounds: int = 3
    sample_s: float = 0.5


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope; 0 for fewer than two points."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def raise_own_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft < need:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is below the {need} fds needed")
    return soft


async def soak(t: Target, cfg: SoakConfig, progress: Any = None) -> dict[str, Any]:
    c = Counters()
    # warm-up: the first connection and I/O load code paths and caches once
    await churn(t.port, 20, 4, c)
    quiescent(t)
    sampler = Sampler(t.pid, cfg.sample_s)
    fds0, _ = settled_fds(t.pid, None)
    rss0 = proc_sample(t.pid)[0]
    sampler.start()
    start = time.monotonic()
    points: list[dict[str, Any]] = []
    rounds = 0
    try:
        while (time.monotonic() - start < cfg.duration_s or c.churned < cfg.churn_total):
            rounds += 1
            await churn(t.port, cfg.churn_per_round, cfg.churn_parallel, c)
            await concurrent(t, cfg.concurrent, cfg.io_rounds, c)
            quiescent(t)
            fds, waited = settled_fds(t.pid, fds0)
            rss = proc_sample(t.pid)[0]
            points.append({"round": rounds, "t": round(time.monotonic() - start, 1),
                           "rss_kib": rss, "fds": fds, "fd_settle_s": waited,
                           "churned": c.churned})
            if progress is not None:
                print(f"round {rounds}: {points[-1]}, errors {c.errors}", file=progress,
                      flush=True)
            if c.errors:
                break
    finally:
        sampler.halt.set()
        sampler.join()
    elapsed = time.monotonic() - start
    samples = sampler.samples
    later = points[1:]  # after the first round the allocator has seen the peak once
    rss_per_round = slope([p["round"] for p in later], [p["rss_kib"] for p in later])
    rss_per_min = slope([p["t"] / 60 for p in later], [p["rss_kib"] for p in later])
    return {
        "config": asdict(cfg), "elapsed_s": round(elapsed, 1), "rounds": rounds,
        "churned": c.churned, "concurrent": c.concurrent_opened,
        "verified_ios": c.verified_ios, "errors": c.errors, "messages": c.messages,
        "rss_kib": {"start": rss0, "end": points[-1]["rss_kib"] if points else rss0,
                    "max": max(s[1] for s in samples),
                    "after_first_round": points[0]["rss_kib"] if points else rss0,
                    "slope_per_round_after_first": round(rss_per_round, 1),
                    "slope_per_minute_after_first": round(rss_per_min, 1)},
        "fds": {"start": fds0, "end": points[-1]["fds"] if points else fds0,
                "max": max(s[2] for s in samples)},
        "held": c.held,
        "quiescent_points": points,
        "samples": len(samples),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ci", action="store_true",
                    help="short mode: 60 s, 400 churned per round (what tests/soak runs)")
    ap.add_argument("--duration", type=float, help="seconds (default 600; --ci 60)")
    ap.add_argument("--churn", type=int, help="connect/disconnect cycles at least "
                    "(default 10,000; --ci 0: as many as fit)")
    ap.add_argument("--churn-per-round", type=int, help="default 1000; --ci 400")
    ap.add_argument("--churn-parallel", type=int, default=8)
    ap.add_argument("--concurrent", type=int, default=1000, help="controllers held at once")
    ap.add_argument("--io-rounds", type=int, default=3)
    ap.add_argument("--sample", type=float, default=0.5, help="sampling period, seconds")
    ap.add_argument("--json", metavar="FILE", help="write the report here too")
    args = ap.parse_args()
    cfg = SoakConfig(
        duration_s=args.duration or (60.0 if args.ci else 600.0),
        churn_total=args.churn if args.churn is not None else (0 if args.ci else 10_000),
        churn_per_round=args.churn_per_round or (400 if args.ci else 1000),
        churn_parallel=args.churn_parallel, concurrent=args.concurrent,
        io_rounds=args.io_rounds, sample_s=args.sample)
    limit = raise_own_fd_limit(2 * cfg.concurrent + 2 * cfg.churn_parallel + 256)
    work = Path(tempfile.mkdtemp(prefix="bt-soak-", dir="/tmp"))
    t = Target(work, free_port())
    t.start()
    try:
        try:
            import uvloop

            report = uvloop.run(soak(t, cfg, sys.stderr))
        except ImportError:  # pragma: no cover
            report = asyncio.run(soak(t, cfg, sys.stderr))
    finally:
        status = t.stop()
    report["soak_fd_limit"] = limit
    report["target_exit_status"] = status
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report["errors"] == 0 and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
