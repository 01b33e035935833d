#!/usr/bin/env python3
"""The uring bdev against `fio --ioengine=io_uring` on the same file, on one core.

The bdev is driven in-process, the way the NVMe/TCP layer drives it: BdevIOs submitted
through an IOChannel on one started reactor (pinned to `--core`), reads without a caller
buffer (so each read costs the copy out of the aligned buffer that the target's read path
pays too), a fixed number in flight. fio runs the same workload on the same file with
`--direct=1 --cpus_allowed=<core>`. Runs alternate between the two `--rounds` times and the
median of each cell is reported, because this machine's disk and CPUs are shared.

Beside the headline ratio it measures the choices the module makes (how completions are
noticed: eventfd, a reactor poller, or both; when SQEs are submitted), at QD1 and QD32,
plus how often an idle reactor with an open channel wakes up.

    .venv/bin/python bench/uring_vs_fio.py [--time 3] [--rounds 3] [--core N]
                                           [--file PATH] [--size-mb 512] [--markdown]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blocktarget.bdev import BdevIO, IOType  # noqa: E402
from blocktarget.bdevs import uring  # noqa: E402
from blocktarget.params import validate  # noqa: E402
from blocktarget.reactor import Reactor  # noqa: E402


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio's --rw
    bs: int
    qd: int


RANDREAD_QD32 = Workload("4K randread QD32", "randread", 4096, 32)
RANDREAD_QD1 = Workload("4K randread QD1", "randread", 4096, 1)
SEQREAD_128K = Workload("128K read QD32", "read", 131072, 32)


@dataclass
class Result:
    iops: float
    mib_s: float
    lat_us: float
    cpu_pct: float


def make_file(path: Path, size: int) -> None:
    """Real data (not a sparse file: a hole reads as zeroes without touching the disk)."""
    if path.exists() and path.stat().st_size >= size and path.stat().st_blocks * 512 >= size:
        return
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(chunk[i % 251:] + chunk[: i % 251])
        f.flush()
        os.fsync(f.fileno())


# ---- fio -----------------------------------------------------------------------------


def run_fio(path: Path, w: Workload, seconds: float, core: int) -> Result:
    cmd = ["fio", "--name=bench", f"--filename={path}", "--ioengine=io_uring", "--direct=1",
           f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.qd}", f"--runtime={seconds}",
           "--time_based", f"--cpus_allowed={core}", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    rd = job["read"]
    return Result(rd["iops"], rd["bw_bytes"] / (1 << 20), rd["clat_ns"]["mean"] / 1000,
                  job["usr_cpu"] + job["sys_cpu"])


def fio_cmd_text(w: Workload, seconds: float, core: int) -> str:
    return (f"fio --name=bench --filename=FILE --ioengine=io_uring --direct=1 --rw={w.rw} "
            f"--bs={w.bs // 1024}k --iodepth={w.qd} --runtime={seconds:g} --time_based "
            f"--cpus_allowed={core}")


# ---- the bdev --------------------------------------------------------------------------


def run_bdev(path: Path, w: Workload, seconds: float, core: int, *, reap: str,
             submit_now: bool, engine: str = "uring") -> tuple[Result, int, float]:
    """The result, then the idle reactor's poller runs per second and CPU % afterwards."""
    uring.REAP_MODE = reap
    uring.SUBMIT_NOW = submit_now
    mod = uring.MODULE
    bdev = mod.create(validate(mod.schema, {"name": "bench", "filename": str(path),
                                            "block_size": 4096, "engine": engine}))
    assert bdev.direct, f"O_DIRECT refused on {path}: benchmark a file on a real disk"
    r = Reactor(0, core)
    r.start()
    try:
        nb = w.bs // 4096
        span = bdev.num_blocks // nb
        rnd = random.Random(1)
        offsets = [rnd.randrange(span) * nb for _ in range(1 << 16)]

        def go() -> concurrent.futures.Future[tuple[int, float, int]]:
            fut: concurrent.futures.Future[tuple[int, float, int]] = concurrent.futures.Future()
            ch = bdev.get_io_channel(r)
            st = {"n": 0, "inflight": 0, "seq": 0, "stop": False}
            t0 = time.monotonic()
            c0 = r.cpu_ns()
            deadline = t0 + seconds
            seq = w.rw == "read"

            def submit() -> None:
                i = st["n"] + st["inflight"]
                if seq:
                    off = st["seq"]
                    st["seq"] = (off + nb) % (span * nb)
                else:
                    off = offsets[i & 0xFFFF]
                st["inflight"] += 1
                ch.submit(BdevIO(IOType.READ, off, nb, None, done))

            def done(io: BdevIO) -> None:
                if io.status:
                    raise RuntimeError(f"read failed: {io.status:#x}")
                st["inflight"] -= 1
                st["n"] += 1
                if not st["stop"] and not st["n"] & 63 and time.monotonic() >= deadline:
                    st["stop"] = True
                if not st["stop"]:
                    submit()
                elif st["inflight"] == 0:
                    fut.set_result((st["n"], time.monotonic() - t0, r.cpu_ns() - c0))

            for _ in range(w.qd):
                submit()
            return fut

        n, dt, cpu = r.send(go).result(30).result(seconds + 30)
        # the reactor idle with the channel still open: how often does it wake?
        runs0, c0 = r.stats.poll_runs, r.cpu_ns()
        time.sleep(1.0)
        idle_wakeups = r.stats.poll_runs - runs0
        idle_cpu = (r.cpu_ns() - c0) / 1e9
        r.send(bdev.close_channel, r).result(10)
    finally:
        r.stop()
        bdev.destruct()
    iops = n / dt
    res = Result(iops, iops * w.bs / (1 << 20), w.qd / iops * 1e6, cpu / 1e9 / dt * 100)
    return res, idle_wakeups, idle_cpu * 100  # over the 1 s idle window: per s, and CPU %


# ---- driver ----------------------------------------------------------------------------


def median(results: list[Result]) -> Result:
    return Result(*(statistics.median(getattr(x, f) for x in results)
                    for f in ("iops", "mib_s", "lat_us", "cpu_pct")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--core", type=int, default=sorted(os.sched_getaffinity(0))[-1])
    ap.add_argument("--file", type=Path, default=REPO / "bench" / ".uring_vs_fio.img")
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the data file for a rerun")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    why = uring.uring_unavailable_reason()
    if why is not None:
        print(f"io_uring unavailable: {why}", file=sys.stderr)
        return 1
    if shutil.which("fio") is None:
        print("fio is not installed", file=sys.stderr)
        return 1
    make_file(args.file, args.size_mb << 20)

    default = (uring.REAP_MODE, uring.SUBMIT_NOW)
    variants = [(m, s) for m in ("hybrid", "eventfd", "poller") for s in (False, True)]
    cells: dict[tuple[str, str], list[Result]] = {}
    idle: dict[str, list[tuple[int, float]]] = {}
    plan: list[tuple[Workload, list[tuple[str, bool]]]] = [
        (RANDREAD_QD32, variants), (RANDREAD_QD1, variants), (SEQREAD_128K, [default]),
    ]
    try:
        for rnd in range(args.rounds):
            for w, vs in plan:
                cells.setdefault((w.name, "fio"), []).append(
                    run_fio(args.file, w, args.time, args.core))
                for reap, now in vs:
                    label = f"{reap}{', submit each' if now else ''}"
                    res, wake, idle_cpu = run_bdev(args.file, w, args.time, args.core,
                                                   reap=reap, submit_now=now)
                    cells.setdefault((w.name, label), []).append(res)
                    idle.setdefault(reap, []).append((wake, idle_cpu))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        uring.REAP_MODE, uring.SUBMIT_NOW = default
        if not args.keep:
            args.file.unlink(missing_ok=True)

    dlabel = f"{default[0]}{', submit each' if default[1] else ''}"
    rows = []
    for w, vs in plan:
        f = median(cells[(w.name, "fio")])
        rows.append((w.name, "fio io_uring", f, None))
        for reap, now in vs:
            label = f"{reap}{', submit each' if now else ''}"
            m = median(cells[(w.name, label)])
            tag = f"uring bdev ({label}{' = default' if label == dlabel else ''})"
            rows.append((w.name, tag, m, m.iops / f.iops))
    load = os.getloadavg()
    if args.markdown:
        print(f"\nCommand: `.venv/bin/python bench/uring_vs_fio.py --time {args.time:g} "
              f"--rounds {args.rounds} --core {args.core} --markdown`, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"load average {load[0]:.1f} at the end.\n")
        print("| workload | engine | IOPS | MiB/s | mean lat µs | CPU % | ratio bdev/fio |")
        print("|---|---|---|---|---|---|---|")
        for name, tag, r, ratio in rows:
            print(f"| {name} | {tag} | {r.iops:,.0f} | {r.mib_s:,.1f} | {r.lat_us:,.0f} | "
                  f"{r.cpu_pct:.0f} | {'' if ratio is None else f'{ratio:.2f}'} |")
        print("\n| completion mode | idle reactor: poller runs/s | idle reactor CPU % |")
        print("|---|---|---|")
        for reap, ws in idle.items():
            print(f"| {reap} | {statistics.median(w for w, _ in ws):,.0f} | "
                  f"{statistics.median(c for _, c in ws):.2f} |")
        print("\nfio commands:\n")
        for w, _ in plan:
            print(f"    {fio_cmd_text(w, args.time, args.core)}")
    else:
        for name, tag, r, ratio in rows:
            extra = "" if ratio is None else f"  ratio {ratio:.2f}"
            print(f"{name:18} {tag:45} {r.iops:10,.0f} IOPS {r.mib_s:9,.1f} MiB/s "
                  f"{r.lat_us:8,.0f} µs {r.cpu_pct:5.0f}% CPU{extra}")
        for reap, ws in idle.items():
            print(f"idle reactor with {reap}: {statistics.median(w for w, _ in ws):,.0f} "
                  f"poller runs/s, {statistics.median(c for _, c in ws):.2f}% CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
