"""blocktarget vs SPDK's nvmf_tgt (issue 7): medians of alternating runs, ratios, CPU cost.

Per repetition each target is started once (blocktarget on reactor core 0, nvmf_tgt with
`-m 0x1`), every workload is driven by spdk_nvme_perf on core 1, and the target is
stopped; the order of the two targets alternates between repetitions so slow drifts in
machine load fall on both. The table gives medians over the repetitions, the ratio
blocktarget/SPDK, IOPS per target CPU-second and target CPU µs per I/O (utime+stime of
the target process from /proc/<pid>/stat over the run; nvmf_tgt spins, so its CPU is
its wall time). CPU per I/O is the figure to compare changes by: on this shared 2-core
machine it moves far less than IOPS.

Extra sections (each optional): memory (RSS per idle connection over N idle
connections, RSS with a 1 GiB malloc bdev before and after it is written), the raw-TCP
ceiling (a uvloop server doing nothing but answering 72-byte requests with 4 KiB
responses, the floor of any Python event-loop target), reactor polling policies (QD1
latency and idle CPU), and reactor scaling (1 vs 2 reactors, 2 connections).

    .venv/bin/python bench/vs_spdk.py [--time 3] [--reps 3] [--markdown]
        [--memory] [--raw-tcp] [--polling] [--scaling] [--only blocktarget]
        [--initiators spdk_nvme_perf,'blocktarget perf'] [--tree DIR]

Needs SPDK's nvmf_tgt and spdk_nvme_perf, optional tools (bench/spdk_tools.py: $SPDK_TOOLS,
then .tools/spdk in the checkout, then PATH), except for `--only blocktarget --initiators
'blocktarget perf'`; without them anything else says they are not available and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spdk_tools import unavailable_reason  # noqa: E402
from tcp_perf import ROOT, Target, run_bt_perf, run_spdk_perf  # noqa: E402

WORKLOADS: list[tuple[str, str, int, int]] = [
    ("4K randread QD1", "randread", 4096, 1),
    ("4K randread QD32", "randread", 4096, 32),
    ("4K randwrite QD32", "randwrite", 4096, 32),
    ("128K read QD32", "read", 131072, 32),
    ("128K write QD32", "write", 131072, 32),
]
MALLOC = {"method": "bdev_malloc_create",
          "params": {"name": "B0", "num_blocks": 65536, "block_size": 4096}}  # 256 MiB
# blocktarget with the C lane off (`c_fast_path: false`): every command on the Python path
PY_PATH = "blocktarget-py"
MALLOC_1G = {"method": "bdev_malloc_create",
             "params": {"name": "B0", "num_blocks": 262144, "block_size": 4096}}


def commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "blocktarget",
                            "bench"], capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted" if dirty else "")


def uptime() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------ the main table

INITIATORS = {"spdk_nvme_perf": run_spdk_perf, "blocktarget perf": run_bt_perf}


def measure(t: Target, rw: str, size: int, qd: int, secs: int,
            initiator: str = "spdk_nvme_perf") -> dict:
    """One initiator run (on core 1) against a running target, with the target's CPU."""
    cpu0 = t.cpu_seconds()
    t0 = time.monotonic()
    r = INITIATORS[initiator](t.port, rw, size, qd, secs)
    r["cpu_s"] = t.cpu_seconds() - cpu0
    r["wall_s"] = time.monotonic() - t0
    r["load"] = os.getloadavg()[0]
    if r.get("iops"):
        # spdk_nvme_perf's IOPS are over its -t seconds; CPU is over the whole run
        # (connect + teardown, ~0.3 s), so µs/IO is slightly pessimistic for both.
        r["cpu_us_per_io"] = r["cpu_s"] * 1e6 / (r["iops"] * secs)
        r["iops_per_cpu_s"] = r["iops"] * secs / r["cpu_s"] if r["cpu_s"] else 0.0
    return r


def run_table(args: argparse.Namespace, tmp: Path, log: Callable[[str], None]) -> list[dict]:
    targets = ["blocktarget", "spdk"] if args.only is None else [args.only]
    if args.python_path and args.only != "spdk":
        targets.insert(1, PY_PATH)
    loads = [w for w in WORKLOADS if args.workloads is None or w[0] in args.workloads]
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for rep in range(args.reps):
        order = targets if rep % 2 == 0 else targets[::-1]
        for name in order:
            t = Target(name, "malloc", tmp, bdev=MALLOC, bt_extra=args.bt_extra,
                       bt_tree=args.tree,
                       transport={"c_fast_path": False} if name == PY_PATH else None)
            try:
                time.sleep(0.3)  # let startup CPU settle out of the first window
                for ini in args.initiators:
                    for label, rw, size, qd in loads:
                        r = measure(t, rw, size, qd, args.time, ini)
                        runs.setdefault((label, ini, name), []).append(r)
                        log(f"rep {rep} {name:11} {ini:16} {label:18} {fmt_run(r)}")
            finally:
                t.stop()
    rows = []
    for ini in args.initiators:
        for label, _rw, _size, _qd in loads:
            rows.append(_median_row(runs, targets, label, ini))
    return rows


def _median_row(runs: dict, targets: list[str], label: str, ini: str) -> dict:
    row: dict = {"workload": label, "initiator": ini}
    for name in targets:
        rs = [r for r in runs.get((label, ini, name), []) if r.get("iops")]
        if not rs:
            row[name] = None
            continue
        row[name] = {k: statistics.median(r[k] for r in rs)
                     for k in ("iops", "mibs", "lat_us", "cpu_us_per_io",
                               "iops_per_cpu_s", "load")}
        row[name]["n"] = len(rs)
        row[name]["cpu_range"] = (min(r["cpu_us_per_io"] for r in rs),
                                  max(r["cpu_us_per_io"] for r in rs))
    return row


def fmt_run(r: dict) -> str:
    if not r.get("iops"):
        return f"ERROR {r.get('error', '')!r}"
    return (f"{r['iops']:>10,.0f} IOPS {r['mibs']:>8,.1f} MiB/s {r['lat_us']:>8,.1f} µs "
            f"cpu {r['cpu_us_per_io']:6.2f} µs/IO  load {r['load']:.1f}")


def table_markdown(rows: list[dict], have_spdk: bool) -> list[str]:
    hdr = ("| workload | initiator | blocktarget IOPS | MiB/s | mean lat µs "
           "| target CPU µs/IO (range) | IOPS per CPU-s |")
    if have_spdk:
        hdr += (" SPDK IOPS | MiB/s | mean lat µs | CPU µs/IO | IOPS per CPU-s "
                "| ratio bt/SPDK | goal |")
    out = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    goals = {"4K randread QD32": "≥ 0.50",
             "4K randwrite QD32": "≥ 0.50", "128K read QD32": "≥ 0.80",
             "128K write QD32": "≥ 0.80"}
    for row in rows:
        b = row.get("blocktarget")
        line = f"| {row['workload']} | {row['initiator']} |"
        if b:
            lo, hi = b["cpu_range"]
            line += (f" {b['iops']:,.0f} | {b['mibs']:,.1f} | {b['lat_us']:,.1f} |"
                     f" {b['cpu_us_per_io']:.2f} ({lo:.2f}–{hi:.2f}) | {b['iops_per_cpu_s']:,.0f} |")
        else:
            line += " – | – | – | – | – |"
        if have_spdk:
            s = row.get("spdk")
            if s:
                line += (f" {s['iops']:,.0f} | {s['mibs']:,.1f} | {s['lat_us']:,.1f} |"
                         f" {s['cpu_us_per_io']:.2f} | {s['iops_per_cpu_s']:,.0f} |")
            else:
                line += " – | – | – | – | – |"
            ratio = b["iops"] / s["iops"] if b and s else 0.0
            goal = goals.get(row["workload"], "")
            if b and s and row["workload"].endswith("QD1"):
                goal = f"lat {b['lat_us'] / s['lat_us']:.1f}× SPDK's (goal ≤ 2×)"
            line += f" {ratio:.2f} | {goal} |"
        out.append(line)
    return out


def lane_markdown(rows: list[dict]) -> list[str]:
    """Issue 7 item 4's before/after: the same target with and without the C lane."""
    out = ["| workload | initiator | C lane IOPS | CPU µs/IO (range) | Python path IOPS "
           "| CPU µs/IO (range) | IOPS ratio lane/Python | CPU ratio Python/lane |",
           "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        b, p = row.get("blocktarget"), row.get(PY_PATH)
        if not b or not p:
            continue
        out.append(
            f"| {row['workload']} | {row['initiator']} | {b['iops']:,.0f} | "
            f"{b['cpu_us_per_io']:.2f} ({b['cpu_range'][0]:.2f}–{b['cpu_range'][1]:.2f}) | "
            f"{p['iops']:,.0f} | {p['cpu_us_per_io']:.2f} "
            f"({p['cpu_range'][0]:.2f}–{p['cpu_range'][1]:.2f}) | {b['iops'] / p['iops']:.2f} | "
            f"{p['cpu_us_per_io'] / b['cpu_us_per_io']:.2f} |")
    return out


# ------------------------------------------------------------------ memory

def rss_per_connection(tmp: Path, n: int, log: Callable[[str], None]) -> dict:
    """Target RSS with ``n`` idle NVMe/TCP connections (ICReq done, then an admin
    Connect, so each holds a queue pair and a controller) minus RSS with none."""
    from memprobe import open_idle_connections

    t = Target("blocktarget", "malloc", tmp, bdev=MALLOC)
    try:
        time.sleep(1.0)
        base = t.rss_kib()
        socks = open_idle_connections(t.port, n, connect=True)
        time.sleep(1.0)
        loaded = t.rss_kib()
        for s in socks:
            s.close()
        time.sleep(1.0)
        after = t.rss_kib()
    finally:
        t.stop()
    per = (loaded - base) / n
    log(f"rss: base {base} KiB, with {n} connections {loaded} KiB ({per:.1f} KiB each), "
        f"after closing {after} KiB")
    return {"n": n, "base_kib": base, "loaded_kib": loaded, "after_kib": after,
            "per_conn_kib": per}


def rss_malloc_1g(tmp: Path, log: Callable[[str], None]) -> dict:
    """RSS with a 1 GiB malloc bdev: at start (the anonymous mapping is untouched) and
    after spdk_nvme_perf has written every block once (then it is all resident)."""
    res: dict = {}
    for name in ("blocktarget", "spdk"):
        if name == "spdk" and unavailable_reason("nvmf_tgt") is not None:
            continue
        t = Target(name, "malloc1g", tmp, bdev=MALLOC_1G, spdk_mem_mb=2048)
        try:
            time.sleep(1.0)
            start = t.rss_kib()
            r = run_spdk_perf(t.port, "write", 131072, 32, 8)
            written = t.rss_kib()
        finally:
            t.stop()
        res[name] = {"start_kib": start, "written_kib": written, "write_mibs": r.get("mibs")}
        log(f"rss 1 GiB malloc {name}: start {start} KiB, after writing "
            f"{r.get('mibs', 0) * 8:.0f} MiB sequentially: {written} KiB")
    return res


# ------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=3, help="seconds per spdk_nvme_perf run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["blocktarget", "spdk"], help="one target only")
    ap.add_argument("--workloads", type=lambda s: s.split(","), default=None,
                    help="comma-separated workload labels (default: all)")
    ap.add_argument("--initiators", type=lambda s: s.split(","),
                    default=["spdk_nvme_perf", "blocktarget perf"],
                    help="comma-separated: spdk_nvme_perf, blocktarget perf")
    ap.add_argument("--tree", type=Path, default=None,
                    help="run blocktarget from this checkout instead (before/after runs: "
                         "git archive <commit> blocktarget | tar -x -C DIR)")
    ap.add_argument("--python-path", action="store_true",
                    help="also run blocktarget with the C lane off (c_fast_path: false), "
                         "alternating with the others, and print the before/after table")
    ap.add_argument("--no-table", action="store_true", help="skip the main table")
    ap.add_argument("--memory", action="store_true", help="RSS figures")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--raw-tcp", action="store_true", help="raw-TCP ceiling")
    ap.add_argument("--polling", action="store_true", help="reactor polling policies")
    ap.add_argument("--scaling", action="store_true", help="1 vs 2 reactors")
    ap.add_argument("--markdown", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    args.bt_extra = None
    why = unavailable_reason("nvmf_tgt", "spdk_nvme_perf")
    have_spdk = why is None
    needs_spdk = (args.only != "blocktarget" or "spdk_nvme_perf" in args.initiators
                  or args.polling or args.scaling or args.memory)
    if needs_spdk and not have_spdk:
        print(f"{why}; without SPDK's tools only --only blocktarget --initiators "
              "'blocktarget perf' runs", file=sys.stderr)
        return 2
    unknown = set(args.initiators) - set(INITIATORS)
    if unknown:
        print(f"unknown initiator {sorted(unknown)[0]!r}; known: {', '.join(INITIATORS)}",
              file=sys.stderr)
        return 2
    if args.only == "blocktarget":
        have_spdk = False

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    md: list[str] = [f"### Run of {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", ""]
    cmd = " ".join(["bench/vs_spdk.py", *(f"'{a}'" if " " in a else a for a in sys.argv[1:])])
    stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    md.append(f"Command: `.venv/bin/python {cmd}` — commit `{commit()}`, {stamp}, "
              f"{args.time} s per run, {args.reps} repetitions; {uptime()} at start.")
    with tempfile.TemporaryDirectory(prefix="vs-spdk-") as tmpdir:
        tmp = Path(tmpdir)
        if not args.no_table:
            rows = run_table(args, tmp, log)
            md += ["", "Medians over the repetitions, malloc bdev (256 MiB, 4 KiB blocks), "
                   "target on core 0, initiator on core 1:", "", *table_markdown(rows, have_spdk)]
            if args.python_path:
                md += ["", "The same runs, blocktarget with the C lane (default) against "
                       "blocktarget with `c_fast_path: false` (Python path):", "",
                       *lane_markdown(rows)]
        if args.memory:
            conn = rss_per_connection(tmp, args.connections, log)
            m1g = rss_malloc_1g(tmp, log)
            md += ["", f"Memory ({uptime()}):", "",
                   "| memory figure | blocktarget | SPDK nvmf_tgt | goal |",
                   "|---|---|---|---|",
                   f"| RSS per idle connection ({conn['n']} connections, admin Connect "
                   f"done) | {conn['per_conn_kib']:.1f} KiB (base {conn['base_kib']:,} KiB, "
                   f"loaded {conn['loaded_kib']:,} KiB) | – | ≤ 64 KiB |"]
            b, s = m1g.get("blocktarget", {}), m1g.get("spdk", {})
            md.append(f"| RSS with 1 GiB malloc bdev, idle | {b.get('start_kib', 0) / 1024:,.0f}"
                      f" MiB | {s.get('start_kib', 0) / 1024:,.0f} MiB | ≤ 1,229 MiB |")
            md.append(f"| RSS with 1 GiB malloc bdev after 8 s of sequential 128K writes | "
                      f"{b.get('written_kib', 0) / 1024:,.0f} MiB | "
                      f"{s.get('written_kib', 0) / 1024:,.0f} MiB | ≤ 1,229 MiB |")
        if args.raw_tcp:
            from rawtcp import raw_tcp_ceiling

            raw = raw_tcp_ceiling(args.time, log)
            md += ["", f"Raw-TCP ceiling, bench/rawtcp.py ({uptime()}):", "",
                   "| raw TCP (uvloop server on core 0, client on core 1) | ops/s | "
                   "MiB/s | server CPU µs/op |", "|---|---|---|---|"]
            for r in raw:
                md.append(f"| {r['label']} | {r['ops']:,.0f} | {r['mibs']:,.1f} | "
                          f"{r['cpu_us_per_op']:.2f} |")
        if args.polling:
            from polling import polling_table

            md += ["", f"Reactor polling, bench/polling.py ({uptime()} at start):", "",
                   *polling_table(tmp, args.time, log)]
        if args.scaling:
            from scaling import scaling_table

            md += ["", f"Reactor scaling, bench/scaling.py ({uptime()} at start):", "",
                   *scaling_table(tmp, args.time, log)]
    md.append("")
    md.append(f"{uptime()} at the end.")
    text = "\n".join(md)
    print(text)
    if args.markdown:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
