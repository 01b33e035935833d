#!/usr/bin/env python3
"""RPC round trips per second: bdev_get_bdevs over HTTP and the Unix socket.

Starts a real `blocktarget` process, then for each bdev count (1, then 1,000 null bdevs)
and each client (HTTP keep-alive with http.client; a persistent Unix-socket connection with
a lean decoder; SPDK's own JSONRPCClient library, which is what operators' tooling uses)
issues back-to-back calls for a fixed time and reports calls/s, latency percentiles and the
target's CPU time per call. CPU per call is the steadier figure on a small, noisy machine:
wall-clock rates move with whatever else the host runs, the target's own CPU cost moves less.

By default the target is confined to CPU 0 and this client to the last CPU, so the two do
not fight over one core.

    .venv/bin/python bench/rpc_latency.py [--duration 3] [--bdevs 1,1000] [--markdown]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the target process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    def __init__(self, workdir: Path, target_cpu: int | None) -> None:
        self.sock = str(workdir / "rpc.sock")
        self.http_port = free_port()
        cfg = {
            "blocktarget": {"cores": [target_cpu if target_cpu is not None else 0],
                            "rpc": {"unix": self.sock, "http": f"127.0.0.1:{self.http_port}"},
                            "log_level": "warning"},
            "subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_null_create",
                 "params": {"name": "Null0", "num_blocks": 1 << 20, "block_size": 4096}}]}],
        }
        path = workdir / "bench.json"
        path.write_text(json.dumps(cfg))
        notify_path = str(workdir / "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(30)

        def confine() -> None:
            if target_cpu is not None:
                os.sched_setaffinity(0, {target_cpu})

        self.log = open(workdir / "target.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blocktarget", "start", "-c", str(path)],
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=confine,
            env=dict(os.environ, NOTIFY_SOCKET=notify_path))
        try:
            while b"READY=1" not in notify.recv(64):
                pass
        except TimeoutError:
            self.stop()
            raise SystemExit("target did not become ready; see target.log") from None
        finally:
            notify.close()

    def cpu_seconds(self) -> float:
        """utime + stime of the whole target process (all threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- clients -----------------------------------------------------------------------------------

REQUEST = {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1}


class HttpClient:
    name = "HTTP keep-alive (http.client)"

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.body = json.dumps(REQUEST).encode()
        self.headers = {"Content-Type": "application/json"}

    def call(self) -> int:
        self.conn.request("POST", "/", body=self.body, headers=self.headers)
        r = self.conn.getresponse()
        data = r.read()
        assert r.status == 200 and "result" in json.loads(data)
        return len(data)

    def close(self) -> None:
        self.conn.close()


class UnixClient:
    """Persistent connection; SPDK framing. Decodes only when the buffer can be complete
    (a response object ends in '}'), so decoding stays linear in the response size."""

    name = "Unix socket, persistent"

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.body = json.dumps(REQUEST).encode()

    def call(self) -> int:
        self.sock.sendall(self.body)
        buf = bytearray()
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("target closed the connection")
            buf += chunk
            if buf.rstrip().endswith(b"}"):
                try:
                    resp = json.loads(buf)
                except ValueError:
                    continue
                assert "result" in resp
                return len(buf)

    def close(self) -> None:
        self.sock.close()


class SpdkClient:
    name = "Unix socket, SPDK JSONRPCClient"

    def __init__(self, path: str) -> None:
        from spdk.rpc.client import JSONRPCClient

        self.client = JSONRPCClient(path, timeout=120)
        self.size = 0

    def call(self) -> int:
        result = self.client.call("bdev_get_bdevs")
        if not self.size:
            self.size = len(json.dumps({"jsonrpc": "2.0", "id": 1, "result": result}))
        return self.size

    def close(self) -> None:
        self.client.close()


# ---- measurement -------------------------------------------------------------------------------


@dataclass
class Result:
    client: str
    bdevs: int
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    response_bytes: int
    target_cpu_us_per_call: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def measure(target: Target, make: Callable[[], Any], bdevs: int, duration: float,
            warmup: float) -> Result:
    client = make()
    try:
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            client.call()
        lat: list[float] = []
        size = 0
        cpu0 = target.cpu_seconds()
        t0 = time.perf_counter()
        end = t0 + duration
        now = t0
        while now < end or len(lat) < 3:
            size = client.call()
            t = time.perf_counter()
            lat.append(t - now)
            now = t
        elapsed = now - t0
        cpu = target.cpu_seconds() - cpu0
    finally:
        client.close()
    lat.sort()
    return Result(client.name, bdevs, len(lat), elapsed, statistics.median(lat) * 1e3,
                  lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, size,
                  cpu / len(lat) * 1e6)


def grow_to(target: Target, bdevs: int) -> None:
    """Create null bdevs in one batch until there are `bdevs` of them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(target.sock)
        s.sendall(json.dumps(REQUEST).encode())
        have = len(_read_one(s)["result"])
        if have >= bdevs:
            return
        batch = [{"jsonrpc": "2.0", "id": i, "method": "bdev_null_create",
                  "params": {"name": f"Null{i}", "num_blocks": 1 << 20, "block_size": 4096}}
                 for i in range(have, bdevs)]
        s.sendall(json.dumps(batch).encode())
        resp = _read_one(s)
        errors = [r for r in resp if "error" in r]
        if errors:
            raise SystemExit(f"creating bdevs failed: {errors[0]}")


def _read_one(s: socket.socket) -> Any:
    buf = bytearray()
    while True:
        buf += s.recv(1 << 20)
        try:
            return json.loads(buf)
        except ValueError:
            continue


def git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=repo, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "blocktarget"],
                               capture_output=True, text=True, timeout=10,
                               cwd=repo).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def table(results: list[Result], markdown: bool) -> str:
    head = ["client", "bdevs", "calls/s", "p50 ms", "p99 ms", "response KiB",
            "target CPU µs/call", "calls"]
    rows = [[r.client, str(r.bdevs), f"{r.rate:,.0f}", f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}",
             f"{r.response_bytes / 1024:,.1f}", f"{r.target_cpu_us_per_call:,.0f}",
             str(r.calls)] for r in results]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--bdevs", default="1,1000", help="comma-separated bdev counts")
    ap.add_argument("--no-spdk", action="store_true", help="skip SPDK's client library")
    ap.add_argument("--no-pin", action="store_true", help="do not separate client and target")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    target_cpu = cpus[0] if pin else None
    if pin:
        os.sched_setaffinity(0, {cpus[-1]})
    clients: list[Callable[[Target], Any]] = [lambda t: HttpClient(t.http_port),
                                              lambda t: UnixClient(t.sock)]
    if not args.no_spdk:
        try:
            import spdk.rpc.client  # noqa: F401

            clients.append(lambda t: SpdkClient(t.sock))
        except ImportError:
            print("SPDK's client library is not installed (pip install spdk); skipping it",
                  file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="bt-bench-", dir="/tmp"))
    results: list[Result] = []
    target = Target(workdir, target_cpu)
    try:
        for n in sorted(int(x) for x in args.bdevs.split(",")):
            grow_to(target, n)
            for make in clients:
                r = measure(target, lambda make=make: make(target), n, args.duration,
                            args.warmup)
                results.append(r)
                print(f"  {r.client:<34} {n:>5} bdevs: {r.rate:>9,.0f} calls/s", file=sys.stderr)
    finally:
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    placement = f"target on CPU {cpus[0]}, client on CPU {cpus[-1]}" if pin else "unpinned"
    print(f"blocktarget RPC latency, commit {git_commit()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, {placement}, "
          f"{args.duration:g} s per cell")
    print(table(results, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ | {"rate": r.rate} for r in results],
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
