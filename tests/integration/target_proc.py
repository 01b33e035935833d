"""A real `blocktarget start` process for integration tests.

Tests talk to the target only the way operators do: a config file, the command line, the
two RPC transports, signals and /proc. Every address is private to the test (a free
HTTP port, a socket in a fresh /tmp directory, free listener ports) so tests can run next
to a developer's own target or another test run.

Readiness comes from the systemd notify protocol the target already speaks (READY=1 once
RPC servers and listeners are up), so a test never races a half-started process.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blocktarget.rpc_client import RpcCallError, RpcClient

START_TIMEOUT = 20.0
# Tests keep their files under the temp directory (pytest's tmp_path) and pools under
# /dev/shm; a target only opens files inside its allowed directories (paths.py), so test
# targets allow these two unless a test's config says otherwise.
TEST_ALLOWED_DIRS = [tempfile.gettempdir(), "/dev/shm"]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick, then released), and
    never one this process handed out before: a test holding a port for a target it
    kills and restarts leaves it free meanwhile, and the restart's own pick (the RPC
    port) once came back as that very port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Could a new listener bind this port? (SO_REUSEADDR, as the target binds.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def listen_address(port: int) -> dict[str, str]:
    return {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}


def blocktarget_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "blocktarget", *args]


def run_cli(*args: str, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blocktarget_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, **kw)


class TargetFailed(Exception):
    pass


class RunningTarget:
    """One target process; `rpc`/`http_rpc` raise RpcCallError for JSON-RPC errors."""

    def __init__(self, workdir: Path, config: dict[str, Any] | None, *,
                 cores: list[int] | None = (0,), args: tuple[str, ...] = (),  # type: ignore[assignment]
                 http: bool = True, unix: bool = True) -> None:
        self.workdir = workdir
        self.sock_path = str(workdir / "rpc.sock")
        self.http_port = free_port() if http else None
        self.http_addr = f"127.0.0.1:{self.http_port}" if http else None
        self.log_path = workdir / "target.log"
        self.proc: subprocess.Popen[bytes] | None = None
        cmd = ["start"]
        if config is not None:
            doc = copy.deepcopy(config)
            bt = doc.setdefault("blocktarget", {})
            rpc = bt.setdefault("rpc", {})
            rpc.setdefault("unix", self.sock_path if unix else None)
            rpc.setdefault("http", self.http_addr)
            if cores is not None:
                bt.setdefault("cores", list(cores))
            bt.setdefault("allowed_dirs", list(TEST_ALLOWED_DIRS))
            self.sock_path = rpc["unix"]
            http_cfg = rpc["http"]
            # "http" may be an object: {"address": ..., "token_file": ...} (rpc access)
            self.http_addr = http_cfg.get("address") if isinstance(http_cfg, dict) else http_cfg
            self.http_port = int(self.http_addr.rsplit(":", 1)[1]) if self.http_addr else None
            self.config = doc
            self.config_path = workdir / "target.json"
            self.config_path.write_text(json.dumps(doc, indent=2))
            cmd += ["-c", str(self.config_path)]
        else:  # the embedded default config, with our own RPC addresses
            self.config = None
            cmd += ["-r", self.sock_path if unix else "", "--http", self.http_addr or ""]
            for d in TEST_ALLOWED_DIRS:
                cmd += ["--allowed-dir", d]
            if cores is not None:
                cmd += ["-m", ",".join(map(str, cores))]
        self.cmd = blocktarget_cmd(*cmd, *args)

    # ---- lifecycle ----
    def start(self) -> RunningTarget:
        notify_path = str(self.workdir / "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            notify.settimeout(0.1)
            while True:
                try:
                    if b"READY=1" in notify.recv(256):
                        break
                except TimeoutError:
                    pass
                if self.proc.poll() is not None:
                    raise TargetFailed(
                        f"target exited with {self.proc.returncode} during start:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TargetFailed(f"target not ready after {START_TIMEOUT}s:\n{self.log()}")
        except BaseException:
            self.kill()
            raise
        finally:
            notify.close()
            os.unlink(notify_path)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the target and wait for it; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TargetFailed(
                f"target ignored signal {sig} for {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---- RPC ----
    def client(self) -> RpcClient:
        return RpcClient(unix=self.sock_path, timeout=30)

    def rpc(self, method: str, **params: Any) -> Any:
        with self.client() as c:
            return c.call(method, params or None)

    def sync_reactors(self) -> None:
        """Return once every reactor has run the messages posted to it before this call.

        An RPC that changes what connected hosts see (a namespace added or removed, an
        ANA state) returns once the change is made; each controller and queue pair then
        learns of it in a message to its own reactor. A host command sent right after the
        RPC can reach that reactor first when it runs late (a loaded machine): the reactor
        handles the socket before the message. nvmf_get_stats is answered by every
        reactor, after the messages queued ahead of it, so commands sent after this call
        find the change applied."""
        self.rpc("nvmf_get_stats")

    def http_rpc(self, method: str, **params: Any) -> Any:
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
        if params:
            req["params"] = params
        status, body = self.http_post(json.dumps(req).encode())
        assert status == 200, (status, body)
        resp = json.loads(body)
        if "error" in resp:
            e = resp["error"]
            raise RpcCallError(e["code"], e["message"], e.get("data"))
        return resp["result"]

    def http_post(self, body: bytes, path: str = "/") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def http_get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


class Launcher:
    """Starts targets in private directories and guarantees they are gone afterwards."""

    def __init__(self) -> None:
        self.targets: list[RunningTarget] = []
        self.dirs: list[str] = []

    def prepare(self, config: dict[str, Any] | None = None, **kw: Any) -> RunningTarget:
        # Unix socket paths are limited to 107 bytes, so not pytest's long tmp_path
        d = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
        self.dirs.append(d)
        t = RunningTarget(Path(d), config, **kw)
        self.targets.append(t)
        return t

    def __call__(self, config: dict[str, Any] | None = None, **kw: Any) -> RunningTarget:
        return self.prepare(config, **kw).start()

    def cleanup(self) -> None:
        for t in self.targets:
            t.kill()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def malloc(name: str, num_blocks: int = 256, block_size: int = 512) -> dict[str, Any]:
    return {"method": "bdev_malloc_create",
            "params": {"name": name, "num_blocks": num_blocks, "block_size": block_size}}


def config(bdev: list[dict[str, Any]] | None = None,
           nvmf: list[dict[str, Any]] | None = None, **bt: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"subsystems": [{"subsystem": "bdev", "config": bdev or []},
                                          {"subsystem": "nvmf", "config": nvmf or []}]}
    if bt:
        doc["blocktarget"] = bt
    return doc
