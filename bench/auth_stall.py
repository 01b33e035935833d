#!/usr/bin/env python3
"""Does DH-HMAC-CHAP stall I/O? A QD1 verified I/O stream, quiet vs while hosts authenticate.

One host runs a QD1 stream of 4 KiB writes, each read back and compared, and records the
latency of every command. It runs in phases: "quiet" (no one else connects) and "storm"
(``--hosts`` other hosts connect ``--queues`` I/O queues each, disconnect and connect
again, for the whole phase, every queue authenticating with DH-HMAC-CHAP at
``--dhgroup``, as the Linux host does). The phases alternate ``--rounds`` times in one
run, so both see the same machine. Printed: p50/p99/max of the stream per phase and
the p99 ratio storm/quiet (the goal: within 2x), authentications per second during the
storm, and each reactor's event-loop stalls measured directly: a callback every 1 ms on
every reactor, its largest gap and the time lost in gaps over 5 ms.

The target runs in this process (as `blocktarget start` does: reactor threads, RPC off)
so the reactors can be probed; every host runs in a process of its own, so a host's own
DH computation (our initiator's, GIL-bound) stalls only itself. On a small machine the
storm hosts, which stand for other machines, compete for the same CPUs as the target
and the stream: ``--storm-nice`` lowers their priority (default 0: none; niced, they
can starve on a machine busy with other work, and then there is no storm to speak of).
``--auth-workers 0`` shows the old behaviour (the exponentiations on the reactors).

    .venv/bin/python bench/auth_stall.py [--seconds 5] [--rounds 2] [--hosts 8]
        [--queues 8] [--dhgroup ffdhe8192] [--auth-workers N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NQN = "nqn.2016-06.io.blocktarget.bench:auth-stall"
STREAM_HOST = "nqn.2014-08.org.nvmexpress:uuid:5e5e5e5e-0000-4000-8000-000000000000"
BLOCK = 4096
BLOCKS = 16384  # 64 MiB malloc namespace
PROBE_PERIOD = 0.001
STALL_OVER = 0.005  # a gap longer than this counts as a stall


def storm_host(i: int) -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:5e5e5e5e-0000-4000-8000-{i + 1:012d}"


def git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=repo, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "blocktarget", "bench"],
                               capture_output=True, text=True, cwd=repo,
                               timeout=10).stdout.strip()
        return out + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- the hosts (subprocesses)


async def stream_main(port: int) -> int:
    """The measured host: on "run SECONDS" from stdin, a QD1 write+read+compare stream;
    prints the latencies (µs) of every command as one JSON line."""
    from blocktarget.host import connect

    ctrl = await connect("127.0.0.1", port, NQN, hostnqn=STREAM_HOST, nr_io_queues=1)
    rng = random.Random(1)
    pool = [os.urandom(BLOCK) for _ in range(64)]
    loop = asyncio.get_running_loop()
    # warm up (first-touch of the malloc bdev's pages, the host's buffers)
    for i in range(200):
        await ctrl.write(1, i, pool[i % 64])
        await ctrl.read(1, i, 1)
    print("ready", flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.startswith("run "):
                return 0
            end = time.monotonic() + float(line.split()[1])
            lat: list[float] = []
            t_start = time.monotonic()
            while time.monotonic() < end:
                data = pool[rng.randrange(64)]
                lba = rng.randrange(BLOCKS)
                t0 = time.perf_counter()
                await ctrl.write(1, lba, data)
                t1 = time.perf_counter()
                got = await ctrl.read(1, lba, 1)
                t2 = time.perf_counter()
                if bytes(got) != data:
                    print(json.dumps({"error": f"LBA {lba}: data read back differs"}), flush=True)
                    return 1
                lat += ((t1 - t0) * 1e6, (t2 - t1) * 1e6)
            print(json.dumps({"start": t_start, "end": time.monotonic(), "lat_us": lat}),
                  flush=True)
    finally:
        await ctrl.disconnect()


async def storm_main(port: int, hostnqn: str, key_file: str, queues: int, nice: int) -> int:
    """A storm host: connect (every queue authenticates), disconnect, again, until its
    stdin closes. Prints when each connect completed (CLOCK_MONOTONIC, the same in every
    process) and what failed."""
    from blocktarget.host import connect

    if nice:
        os.nice(nice)
    secret = Path(key_file).read_text().strip()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("started", flush=True)
    connects: list[float] = []
    errors: list[str] = []
    while not stop.is_set():
        try:
            ctrl = await connect("127.0.0.1", port, NQN, hostnqn=hostnqn, nr_io_queues=queues,
                                 dhchap_secret=secret, kato_ms=0, timeout=30)
            connects.append(time.monotonic())
            print("connected", flush=True)
            await ctrl.disconnect()
        except Exception as exc:  # reported; a refused storm would make the figures lie
            errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
    print(json.dumps({"connects": connects, "errors": errors}), flush=True)
    return 0


# ---------------------------------------------------------------- the target (here)


class GcClock:
    """CPU time each thread spent in the garbage collector (gc.callbacks run in the
    thread that collects). A full collection walks every object of the process, tens of
    ms in a target with many connections: a stall, but not one of authentication's."""

    def __init__(self) -> None:
        self.by_thread: dict[int, float] = {}
        self.longest: dict[int, float] = {}
        self._start: dict[int, float] = {}
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        tid = threading.get_ident()
        if phase == "start":
            self._start[tid] = time.thread_time()
        elif tid in self._start:
            d = time.thread_time() - self._start.pop(tid)
            self.by_thread[tid] = self.by_thread.get(tid, 0.0) + d
            self.longest[tid] = max(self.longest.get(tid, 0.0), d)

    def close(self) -> None:
        gc.callbacks.remove(self._cb)


GC = GcClock()


class Probe:
    """A callback every PROBE_PERIOD on one reactor. The wall-clock gap between two runs
    is how long the loop could not serve anything; the reactor thread's CPU time over
    the gap tells a stall of its own making (CPU ~ gap: it was computing, e.g. a DH
    exponentiation) from the machine's (the thread was not scheduled)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.samples: list[tuple[float, float, float, float]] = []  # time, gap, CPU, GC CPU
        self.stopped = False
        self._last = self._last_cpu = 0.0
        loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._tid = threading.get_ident()
        self._last, self._last_cpu = time.monotonic(), time.thread_time()
        self._last_gc = GC.by_thread.get(self._tid, 0.0)
        self.loop.call_later(PROBE_PERIOD, self._tick)

    def _tick(self) -> None:
        now, cpu, gcc = time.monotonic(), time.thread_time(), GC.by_thread.get(self._tid, 0.0)
        self.samples.append((now, now - self._last, cpu - self._last_cpu, gcc - self._last_gc))
        self._last, self._last_cpu, self._last_gc = now, cpu, gcc
        if not self.stopped:
            self.loop.call_later(PROBE_PERIOD, self._tick)

    def window(self, start: float, end: float) -> list[tuple[float, float, float]]:
        return [(g, c, gcc) for t, g, c, gcc in list(self.samples) if start <= t <= end]


def stall_stats(ticks: list[tuple[float, float, float]]) -> dict[str, float]:
    """max_gap_ms: the loop's longest stall; max_busy_ms: the most CPU the reactor
    thread spent between two ticks (one stretch of work, DH or not), and
    max_busy_no_gc_ms the same without the garbage collector's part; stall_ms: time in
    gaps over STALL_OVER; cpu_ms: the reactor thread's CPU over the window."""
    return {"max_gap_ms": max((g for g, _, _ in ticks), default=0.0) * 1e3,
            "max_busy_ms": max((c for _, c, _ in ticks), default=0.0) * 1e3,
            "max_busy_no_gc_ms": max((c - gcc for _, c, gcc in ticks), default=0.0) * 1e3,
            "max_gc_ms": max((gcc for _, _, gcc in ticks), default=0.0) * 1e3,
            "stall_ms": sum(g - PROBE_PERIOD for g, _, _ in ticks if g > STALL_OVER) * 1e3,
            "cpu_ms": sum(c for _, c, _ in ticks) * 1e3,
            "ticks": len(ticks)}


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def dh_cpu_ms(group: int) -> float:
    """CPU time of one exponentiation of ``group`` on this machine (the target does two
    per queue: key pair, shared secret); CPU, not wall time, so that a loaded machine
    does not inflate it. The median of key pairs and shared secrets alike."""
    from blocktarget.nvme import auth

    peer = auth.DhExchange(group)
    times = []
    for _ in range(3):
        t = time.thread_time()
        x, pub = auth.dh_keypair(group)
        t1 = time.thread_time()
        auth.dh_shared(group, x, pub, peer.public)
        times += [t1 - t, time.thread_time() - t1]
    return statistics.median(times) * 1e3


def target_doc(port: int, keydir: Path, hosts: int, dhgroup: str) -> dict[str, Any]:
    from blocktarget.nvme.auth import DhchapKey

    keyring, add_hosts = [], [{"method": "nvmf_subsystem_add_host",
                               "params": {"nqn": NQN, "host": STREAM_HOST}}]
    for i in range(hosts):
        path = keydir / f"host{i}.key"
        path.write_text(DhchapKey.generate(1).encode() + "\n")
        os.chmod(path, 0o600)
        keyring.append({"method": "keyring_file_add_key",
                        "params": {"name": f"key{i}", "path": str(path)}})
        add_hosts.append({"method": "nvmf_subsystem_add_host",
                          "params": {"nqn": NQN, "host": storm_host(i), "dhchap_key": f"key{i}"}})
    return {"subsystems": [
        {"subsystem": "keyring", "config": keyring},
        {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create", "params": {
            "name": "M0", "num_blocks": BLOCKS, "block_size": BLOCK}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_set_config", "params": {"dhchap_dhgroups": [dhgroup]}},
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": False}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                                                           "namespace": {"bdev_name": "M0"}}},
            *add_hosts,
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address": {
                "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                "trsvcid": str(port)}}},
        ]},
    ]}


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise RuntimeError(f"host process {proc.pid} exited ({await proc.wait()})")
    return line.decode()


async def _drain(proc: asyncio.subprocess.Process) -> str:
    """A storm host's output until its last line (the summary), which is returned."""
    while True:
        line = await _line(proc, 3600)
        if line.startswith("{"):
            return line


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import socket

    from blocktarget.app import Target
    from blocktarget.config import Settings
    from blocktarget.nvme.auth import DHGROUP_BY_NAME

    load_start = os.getloadavg()
    group = int(DHGROUP_BY_NAME[args.dhgroup])
    dh_ms = dh_cpu_ms(group) if group else 0.0
    tmp = Path(tempfile.mkdtemp(prefix="auth-stall-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    settings = Settings(cores=cores or [], rpc_http=None, rpc_unix=None,
                        allowed_dirs=[str(tmp)], auth_workers=args.auth_workers)
    target = Target(settings)
    await target.apply_config(target_doc(port, tmp, args.hosts, args.dhgroup), "auth_stall")
    await target.start()
    probes = [Probe(r.loop) for r in target.reactors]
    me = str(Path(__file__).resolve())
    stream = await asyncio.create_subprocess_exec(
        sys.executable, me, "_stream", str(port), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, limit=1 << 28)  # (one line: every latency)
    phases: dict[str, dict[str, Any]] = {
        name: {"lat_us": [], "gaps": {}, "connects": 0, "seconds": 0.0, "errors": []}
        for name in ("quiet", "storm")}
    try:
        assert (await _line(stream, 60)).strip() == "ready"
        for _ in range(args.rounds):
            for name in ("quiet", "storm"):
                print(f"  {name} ...", file=sys.stderr, flush=True)
                storms: list[asyncio.subprocess.Process] = []
                if name == "storm":
                    for i in range(args.hosts):
                        storms.append(await asyncio.create_subprocess_exec(
                            sys.executable, me, "_storm", str(port), storm_host(i),
                            str(tmp / f"host{i}.key"), str(args.queues), str(args.storm_nice),
                            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
                    for p in storms:
                        assert (await _line(p, 60)).strip() == "started"
                    # measure once the storm is under way: a first host got all its
                    # queues through (then drain the storm hosts' output, or they block)
                    first = await asyncio.wait({asyncio.ensure_future(_line(p, 120))
                                                for p in storms},
                                               return_when=asyncio.FIRST_COMPLETED)
                    for t in first[0]:
                        if t.result().strip() != "connected":
                            raise RuntimeError(f"storm host: {t.result()}")
                    for t in first[1]:
                        t.cancel()
                    drains = [asyncio.ensure_future(_drain(p)) for p in storms]
                assert stream.stdin is not None
                stream.stdin.write(f"run {args.seconds}\n".encode())
                res = json.loads(await _line(stream, args.seconds + 60))
                if "error" in res:
                    raise RuntimeError(res["error"])
                ph = phases[name]
                ph["lat_us"] += res["lat_us"]
                ph["seconds"] += res["end"] - res["start"]
                for k, pr in enumerate(probes):
                    ph["gaps"].setdefault(k, []).extend(pr.window(res["start"], res["end"]))
                for p in storms:
                    assert p.stdin is not None
                    p.stdin.close()
                for d in (drains if storms else []):
                    out = json.loads(await asyncio.wait_for(d, 120))
                    ph["connects"] += sum(res["start"] <= t <= res["end"]
                                          for t in out["connects"])
                    ph["errors"] += out["errors"]
                for p in storms:
                    await p.wait()
    finally:
        if stream.stdin is not None:
            stream.stdin.write(b"quit\n")
        try:
            await asyncio.wait_for(stream.wait(), 15)
        except TimeoutError:
            stream.kill()
            await stream.wait()
        for pr in probes:
            pr.stopped = True
        await target.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    out = summarize(args, phases, dh_ms, len(probes))
    out["load_average"] = {"start": load_start, "end": os.getloadavg()}
    return out


def summarize(args: argparse.Namespace, phases: dict[str, dict[str, Any]], dh_ms: float,
              reactors: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": len(os.sched_getaffinity(0)), "reactors": reactors,
        "auth_workers": args.auth_workers, "hosts": args.hosts, "queues": args.queues,
        "dhgroup": args.dhgroup, "seconds": args.seconds, "rounds": args.rounds,
        "storm_nice": args.storm_nice, "dh_cpu_ms_per_op": dh_ms, "phases": {}}
    for name, ph in phases.items():
        lat = ph["lat_us"]
        per_reactor = [stall_stats(g) for _, g in sorted(ph["gaps"].items())]
        auths = ph["connects"] * (args.queues + 1)
        out["phases"][name] = {
            "ios": len(lat), "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
            "max_us": max(lat, default=0.0), "seconds": ph["seconds"],
            "connects": ph["connects"], "auths": auths,
            "auths_per_s": auths / ph["seconds"] if ph["seconds"] else 0.0,
            "reactors": per_reactor,
            "max_gap_ms": max((r["max_gap_ms"] for r in per_reactor), default=0.0),
            "max_busy_ms": max((r["max_busy_ms"] for r in per_reactor), default=0.0),
            "max_busy_no_gc_ms": max((r["max_busy_no_gc_ms"] for r in per_reactor),
                                     default=0.0),
            "max_gc_ms": max((r["max_gc_ms"] for r in per_reactor), default=0.0),
            "stall_ms": sum(r["stall_ms"] for r in per_reactor),
            "reactor_cpu_ms": sum(r["cpu_ms"] for r in per_reactor),
            "errors": ph["errors"][:5], "error_count": len(ph["errors"])}
    q, st = out["phases"]["quiet"], out["phases"]["storm"]
    out["p99_ratio"] = st["p99_us"] / q["p99_us"] if q["p99_us"] else 0.0
    return out


def report(r: dict[str, Any]) -> str:
    workers = "automatic" if r["auth_workers"] is None else r["auth_workers"]
    lines = [
        f"blocktarget auth stall, commit {r['commit']}, {r['time']}, {r['cpus']} CPUs, "
        f"{r['reactors']} reactor(s), auth_workers {workers}; storm: {r['hosts']} hosts x "
        f"{r['queues']} I/O queues at {r['dhgroup']} (nice {r['storm_nice']}); "
        f"{r['rounds']} x {r['seconds']:g} s per phase; one {r['dhgroup']} exponentiation: "
        f"{r['dh_cpu_ms_per_op']:.1f} ms CPU here (the target does 2 per queue)",
        "",
        "| phase | QD1 I/Os | p50 µs | p99 µs | max µs | auths/s | reactor max gap ms "
        "| reactor max busy ms (of it GC) | reactor stall ms (gaps > 5 ms) | reactor CPU ms |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for name, ph in r["phases"].items():
        lines.append(f"| {name} | {ph['ios']:,} | {ph['p50_us']:,.0f} | {ph['p99_us']:,.0f} | "
                     f"{ph['max_us']:,.0f} | {ph['auths_per_s']:,.0f} | "
                     f"{ph['max_gap_ms']:.1f} | {ph['max_busy_ms']:.1f} "
                     f"({ph['max_gc_ms']:.1f}) | "
                     f"{ph['stall_ms']:,.0f} | {ph['reactor_cpu_ms']:,.0f} |")
    lines.append("")
    lines.append(f"p99 storm / quiet: {r['p99_ratio']:.2f}x (goal: within 2x)")
    la = r.get("load_average")
    if la:
        lines.append("load average " + " ".join(f"{x:.2f}" for x in la["start"]) + " at start, "
                     + " ".join(f"{x:.2f}" for x in la["end"]) + " at the end")
    errs = r["phases"]["storm"]["error_count"]
    if errs:
        lines.append(f"storm connect errors: {errs}, e.g. {r['phases']['storm']['errors'][:2]}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_stream":
        return asyncio.run(stream_main(int(sys.argv[2])))
    if len(sys.argv) > 1 and sys.argv[1] == "_storm":
        a = sys.argv[2:]
        return asyncio.run(storm_main(int(a[0]), a[1], a[2], int(a[3]), int(a[4])))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per phase and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--queues", type=int, default=8, help="I/O queues per storm host")
    ap.add_argument("--dhgroup", default="ffdhe8192")
    ap.add_argument("--auth-workers", type=int, default=None,
                    help="the target's auth_workers (default: automatic; 0: on the reactors)")
    ap.add_argument("--cores", default="", help="reactor cores, e.g. 0,1 (default: all)")
    ap.add_argument("--storm-nice", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    r = asyncio.run(run(args))
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
