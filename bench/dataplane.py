"""The C data plane end to end, per backend (issue 15 item 8): the lane against the Python
path in one run, with `blocktarget perf`'s C engine as the initiator, and where the
reactor's time goes (GIL held or not).

For each backend (malloc, null, a uring bdev on a /dev/shm file, on a file of the
checkout's disk and on a loop block device over a /dev/shm file (`uring-loop`, attached
and detached by the bench: loopdev.py; root and /dev/loop-control needed), malloc with
header and data digests), one blocktarget target with one
reactor pinned to CPU 0 is started twice, with the C lane (the default) and with
`c_fast_path: false` (every command on the Python path), the two alternating over
`--reps`; `blocktarget perf --engine c --busy-poll` (spinning on its socket, as
spdk_nvme_perf does, so no initiator wakeup is in a latency) runs each workload from
CPU 1 (taskset), after
one sequential write of the whole namespace (no first-touch page faults in what is
measured). The table gives medians:

- IOPS, and the ratio lane / Python path (same run, same machine state);
- target CPU µs per I/O (utime + stime of the target process over the perf run);
- the reactor's busy time per I/O in three parts: holding the GIL (sampled on the
  thread's CPU clock, blocktarget/gilsample.py: `blocktarget_reactor_gil_held_seconds`),
  in the C data plane's calls (the GIL released:
  `blocktarget_reactor_gil_released_seconds`, the lane's calls and the C socket poller's,
  less its spinning with nothing to do, shown apart as "C spin": released but no work)
  and neither (the event loop's epoll and the kernel's work on the thread outside our
  calls: `blocktarget_reactor_gil_free_other_seconds`); the share is the held part of
  the work, and in brackets the upper bound that counts everything outside the C calls
  as held (the only figure a tree without the sampler gives);
- the reactor scaling that GIL share predicts (Amdahl: 1 / (f + (1 - f) / N) for the
  held fraction f), for 1, 2, 4, 8 and 16 reactors on as many cores.

`--before TREE` compares with the lane of another checkout (built in place) instead of
the Python path: a change's before and after, alternating in one run.

SPDK's figures on this machine kind (measured outside, given in issue 15; SPDK's binaries
are not available here) are printed beside the rows they exist for, as a reference to
read ratios against, never as a same-run comparison.

    .venv/bin/python bench/dataplane.py [--time 5] [--reps 3]
        [--backends malloc,null,uring-shm,uring-disk,uring-loop,digests,pmem] [--workloads ...]
        [--markdown]

`pmem` is a pmem pool on /dev/shm (msync persistence, as on tmpfs; PMEM_IS_PMEM_FORCE=1
in the environment for the cache-flush path of real persistent memory).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loopdev  # noqa: E402
from initiator import commit, loadavg, machine  # noqa: E402
from tcp_perf import NQN, ROOT, Target  # noqa: E402

from blocktarget.rpc_client import RpcClient  # noqa: E402

WORKLOADS: list[tuple[str, str, int, int]] = [
    ("4K randread QD32", "randread", 4096, 32),
    ("4K randwrite QD32", "randwrite", 4096, 32),
    ("128K read QD32", "read", 131072, 32),
    ("128K write QD32", "write", 131072, 32),
    ("4K randread QD1", "randread", 4096, 1),
]
BACKENDS = ("malloc", "null", "uring-shm", "uring-disk", "uring-loop", "digests", "pmem")
# SPDK v26.05 nvmf_tgt, one core, spdk_nvme_perf on the other (issue 15, 2026-12-07, this
# machine kind): IOPS (QD1: mean latency in µs). They are SPDK's aio on a loop device over
# tmpfs: the same device as uring-loop; beside uring-shm (our uring bdev on the tmpfs
# file itself) as the nearest reference.
SPDK = {("malloc", "4K randread QD32"): 225_000, ("malloc", "128K read QD32"): 1751 * 8,
        ("null", "4K randread QD32"): 245_000, ("null", "128K write QD32"): 17_500,
        ("uring-shm", "4K randread QD32"): 37_700, ("uring-shm", "4K randwrite QD32"): 36_400,
        ("uring-loop", "4K randread QD32"): 37_700, ("uring-loop", "4K randwrite QD32"): 36_400,
        ("digests", "4K randread QD32"): 157_000}
SPDK_QD1_US = {"malloc": 33.5}
NS = 65536  # 4 KiB blocks: 256 MiB
# What the lane (with the reactor's C socket poller, the default) is compared with:
# --baseline python: every command on the Python path; nonet: the same lane called from
# the event loop's per-read callbacks (c_net_poll false), what the poller replaced.
BASELINES = {"python": ("Python path", {"c_fast_path": False}),
             "nonet": ("lane without C poller", {"c_net_poll": False})}


def bdev_for(backend: str, workdir: Path, loop: str | None = None) -> dict:
    """The bdev RPC for `backend`; uring-loop: on the device `loop` (see attach_loop)."""
    if backend in ("malloc", "digests"):
        return {"method": "bdev_malloc_create",
                "params": {"name": "B0", "num_blocks": NS, "block_size": 4096}}
    if backend == "null":
        return {"method": "bdev_null_create",
                "params": {"name": "B0", "num_blocks": NS, "block_size": 4096}}
    if backend == "pmem":
        from blocktarget.bdevs import pmem

        pool = workdir / "b0.pool"  # (workdir: on /dev/shm, see main)
        pmem.create_pool_file(str(pool), NS, 4096, lanes=1)
        return {"method": "bdev_pmem_create", "params": {"name": "B0", "pmem_file": str(pool)}}
    path = workdir / "b0.img"  # (workdir: on /dev/shm for uring-shm, see main)
    if backend == "uring-loop":
        assert loop is not None
        return {"method": "bdev_uring_create",
                "params": {"name": "B0", "filename": loop, "block_size": 4096}}
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, NS * 4096)
    return {"method": "bdev_uring_create",
            "params": {"name": "B0", "filename": str(path), "block_size": 4096}}


def attach_loop(workdir: Path) -> loopdev.LoopDevice:
    """uring-loop: a loop device over a file of NS blocks in workdir (on /dev/shm)."""
    backing = workdir / "b0.img"
    with open(backing, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, NS * 4096)
    try:
        return loopdev.LoopDevice(str(backing))
    except OSError as exc:  # (no root, no loop driver: say so, no trace)
        raise SystemExit(f"uring-loop: {exc}") from None


def reactor_times(t: Target, sock: Path) -> tuple[int, int, int, int | None]:
    """(busy ns, ns in the C data plane's calls, of those the C socket poller's spinning
    with nothing to do, ns holding the GIL by the reactors' samplers or None where a
    reactor has none: a tree from before them) of the target's reactors."""
    with RpcClient(unix=str(sock), timeout=10) as c:
        busy = sum(r["busy"] for r in c.call("framework_get_reactors")["reactors"])
        groups = c.call("nvmf_get_stats")["poll_groups"]
    free = sum(g.get("gil_released_ns", 0) for g in groups)
    idle = sum(g.get("net_idle_ns", 0) for g in groups)
    held: int | None = None
    if all(g.get("gil_sample_period_ns") for g in groups):
        held = sum(g["gil_held_samples"] * g["gil_sample_period_ns"] for g in groups)
    return busy, free, idle, held


def run_perf(port: int, rw: str, size: int, qd: int, secs: float, digests: bool) -> dict:
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "blocktarget", "perf", "-a",
           "127.0.0.1", "-s", str(port), "-n", NQN, "-w", rw, "-o", str(size), "-q", str(qd),
           "-t", str(secs), "--json", "--quiet", "--engine", "c", "--busy-poll",
           *(["-g", "-G"] if digests else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 120)
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"error": (r.stdout + r.stderr)[-300:]}
    tot = doc["total"]
    return {"iops": tot["iops"], "ops": tot["ops"], "errors": tot["errors"],
            "lat_us": tot["lat_us"]["mean"]}


def warm_up(port: int, digests: bool) -> None:
    """Write the whole namespace once, so no measured run pays first-touch page faults
    (a fresh malloc bdev's pages fault in as they are first written: 32 per 128 KiB)."""
    run_perf(port, "write", 131072, 32, 1.0 + NS * 4096 / 400e6, digests)


def measure(t: Target, sock: Path, wl: tuple[str, str, int, int], secs: float,
            digests: bool) -> dict:
    _label, rw, size, qd = wl
    warm_up(t.port, digests)
    cpu0 = t.cpu_seconds()
    busy0, free0, idle0, held0 = reactor_times(t, sock)
    r = run_perf(t.port, rw, size, qd, secs, digests)
    cpu = t.cpu_seconds() - cpu0
    busy1, free1, idle1, held1 = reactor_times(t, sock)
    if "error" in r or not r["ops"]:
        return r
    n = r["ops"]
    r["tgt_us"] = cpu * 1e6 / n
    r["free_us"] = (free1 - free0) / 1e3 / n
    # upper bound: everything outside the C calls counted as held (the only figure
    # before the sampler); sampled: the GIL held, and the rest outside both
    r["ub_us"] = max((busy1 - busy0) - (free1 - free0), 0) / 1e3 / n
    if held0 is not None and held1 is not None:
        r["held_us"] = (held1 - held0) / 1e3 / n
        r["other_us"] = max(r["ub_us"] - r["held_us"], 0.0)
    r["idle_us"] = (idle1 - idle0) / 1e3 / n
    return r


def amdahl(f: float, n: int) -> float:
    return 1.0 / (f + (1.0 - f) / n)


def med(rs: list[dict], key: str) -> float:
    vals = [r[key] for r in rs if key in r]
    return statistics.median(vals) if vals else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=5.0, help="seconds per perf run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS))
    ap.add_argument("--workloads", type=lambda s: s.split(","), default=None,
                    help="labels, comma-separated (default: all)")
    ap.add_argument("--markdown", action="store_true", help="append to bench/RESULTS.md")
    ap.add_argument("--poll-mode", choices=("event", "adaptive", "busy"), default=None,
                    help="the target reactor's poll.mode (default: the target's own); "
                    "event makes every QD1 command a loop wake-up with its Python turn, "
                    "as a slow host (a QEMU guest) does with the adaptive window at 0")
    ap.add_argument("--baseline", choices=sorted(BASELINES), default="python",
                    help="what the lane is compared with (see BASELINES)")
    ap.add_argument("--before", type=Path, default=None, metavar="TREE",
                    help="compare with the lane of another checkout (built in place) "
                         "instead: before/after a change")
    args = ap.parse_args()
    wls = [w for w in WORKLOADS if args.workloads is None or w[0] in args.workloads]
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = f"commit {commit()}, {machine()}, {started}, {loadavg()} at start" + (
        f", poll mode {args.poll_mode}" if args.poll_mode else "")
    print(head, file=sys.stderr)
    rows = []
    for backend in args.backends:
        digests = backend == "digests"
        for wl in wls:
            runs: dict[str, list[dict]] = {"lane": [], "python": []}
            for rep in range(args.reps):
                order = ["lane", "python"] if rep % 2 == 0 else ["python", "lane"]
                for path in order:
                    # uring-disk: the file on the checkout's disk (/tmp may be tmpfs)
                    where = {"uring-shm": "/dev/shm", "pmem": "/dev/shm",
                             "uring-loop": "/dev/shm", "uring-disk": str(ROOT / "bench")}
                    with tempfile.TemporaryDirectory(prefix="dataplane-",
                                                     dir=where.get(backend)) as tmp, \
                            contextlib.ExitStack() as devs:
                        loop = None
                        if backend == "uring-loop":  # (detached when the run is over)
                            loop = devs.enter_context(attach_loop(Path(tmp))).path
                        transport = ({"c_fast_path": True} if path == "lane"
                                     or args.before else dict(BASELINES[args.baseline][1]))
                        if digests:
                            transport.update(header_digest=True, data_digest=True)
                        tree = args.before if path == "python" else None
                        t = Target("blocktarget", backend, Path(tmp), cores=(0,),
                                   bdev=bdev_for(backend, Path(tmp), loop),
                                   transport=transport,
                                   bt_extra={"allowed_dirs": [tmp, *([loop] if loop else [])],
                                             **({"poll": {"mode": args.poll_mode}}
                                                if args.poll_mode else {})},
                                   bt_tree=tree)
                        try:
                            time.sleep(0.3)
                            r = measure(t, Path(tmp) / "bt.sock", wl, args.time, digests)
                        finally:
                            t.stop()
                        runs[path].append(r)
                        print(f"{backend:10} {wl[0]:18} {path:6} {r}", file=sys.stderr)
            lane, py = runs["lane"], runs["python"]
            row = {"backend": backend, "workload": wl[0], "qd": wl[3],
                   "lane_iops": med(lane, "iops"), "py_iops": med(py, "iops"),
                   "lane_lat": med(lane, "lat_us"), "py_lat": med(py, "lat_us"),
                   "lane_us": med(lane, "tgt_us"), "py_us": med(py, "tgt_us"),
                   "free_us": med(lane, "free_us"), "held_us": med(lane, "held_us"),
                   "ub_us": med(lane, "ub_us"), "other_us": med(lane, "other_us"),
                   "idle_us": med(lane, "idle_us"), "sampled": all("held_us" in r for r in lane),
                   "b_held_us": med(py, "held_us"), "b_free_us": med(py, "free_us"),
                   "b_ub_us": med(py, "ub_us"), "b_idle_us": med(py, "idle_us"),
                   "b_sampled": all("held_us" in r for r in py),
                   "errors": sum(r.get("errors", 0) for r in lane + py),
                   "failed": [r["error"] for r in lane + py if "error" in r][:1]}
            rows.append(row)
    base = BASELINES[args.baseline][0]
    if args.before:
        rev = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        base = f"lane at {rev}"
    lines = [f"Run of {started}: {head}.", "",
             f"| backend | workload | IOPS lane | IOPS {base} | lane / baseline | "
             f"target CPU µs/IO lane ({base}) | GIL held / released / neither µs/IO "
             "(lane) | GIL-held share, sampled (upper bound) | predicted scaling "
             f"1/2/4/8/16 reactors | GIL held / released µs/IO, share ({base}) | "
             "SPDK (issue 15) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def share(held: float, ub: float, free: float, idle: float) -> float:
        # the held part of the work: the reactor's CPU time (everything outside the C
        # calls, ub, and the calls) less the C poller's spinning with nothing to do
        # (released, but no work)
        busy = ub + free - idle
        return held / busy if busy > 0 else 1.0

    for r in rows:
        held = r["held_us"] if r["sampled"] else r["ub_us"]
        f = share(held, r["ub_us"], r["free_us"], r["idle_us"])
        fub = share(r["ub_us"], r["ub_us"], r["free_us"], r["idle_us"])
        b_held = r["b_held_us"] if r["b_sampled"] else r["b_ub_us"]
        fb = share(b_held, r["b_ub_us"], r["b_free_us"], r["b_idle_us"])
        scale = "/".join(f"{amdahl(f, n):.1f}" for n in (1, 2, 4, 8, 16))
        if r["qd"] == 1:
            lane_v, py_v = f"{r['lane_lat']:.1f} µs", f"{r['py_lat']:.1f} µs"
            ratio = f"{r['py_lat'] / r['lane_lat']:.2f}" if r["lane_lat"] else "-"
            spdk = SPDK_QD1_US.get(r["backend"])
            ref = (f"{spdk} µs (lane {r['lane_lat'] / spdk:.2f}×)" if spdk else "-")
        else:
            lane_v, py_v = f"{r['lane_iops']:,.0f}", f"{r['py_iops']:,.0f}"
            ratio = f"{r['lane_iops'] / r['py_iops']:.2f}" if r["py_iops"] else "-"
            spdk = SPDK.get((r["backend"], r["workload"]))
            ref = f"{spdk:,} (lane {r['lane_iops'] / spdk:.2f})" if spdk else "-"
        lines.append(
            f"| {r['backend']} | {r['workload']} | {lane_v} | {py_v} | {ratio} | "
            f"{r['lane_us']:.2f} ({r['py_us']:.2f}) | {held:.2f} / "
            f"{r['free_us'] - r['idle_us']:.2f}"
            + (f" (+{r['idle_us']:.2f} C spin)" if r["idle_us"] >= 0.005 else "")
            + (f" / {r['other_us']:.2f}" if r["sampled"] else " / -") + " | "
            f"{f:.0%} ({fub:.0%}) | {scale} | {b_held:.2f} / "
            f"{r['b_free_us'] - r['b_idle_us']:.2f}, {fb:.0%}"
            + ("" if r["b_sampled"] else " (upper bound)") + f" | {ref} |")
        if r["errors"] or r["failed"]:
            lines.append(f"|  | errors {r['errors']} {r['failed']} | | | | | | | | | |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        cmd = "    .venv/bin/python bench/dataplane.py " + " ".join(sys.argv[1:])
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + cmd + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
