"""SPDK's nvmf_tgt as a reference NVMe/TCP target for host-side tests and benchmarks.

SPDK's binaries are optional tools, found as bench/spdk_tools.py says ($SPDK_TOOLS, then
.tools/spdk in the checkout, then PATH; re-exported here as :func:`find_tool` and
:func:`tool_unavailable_reason`). When nvmf_tgt is missing or cannot start here,
:class:`SpdkUnavailable` says why and the tests skip with that reason, in CI too.

The JSON config built by :func:`nvmf_config` is SPDK's config shape, which blocktarget
also loads, so the same layout can be served by either target.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from blocktarget.rpc_client import RpcClient

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def _load_spdk_tools() -> ModuleType:
    """bench/spdk_tools.py, the one place that knows where SPDK's tools are."""
    spec = importlib.util.spec_from_file_location("spdk_tools", ROOT / "bench" / "spdk_tools.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_tools = _load_spdk_tools()
find_tool = _tools.find_tool
tool_unavailable_reason = _tools.tool_unavailable_reason

NQN = "nqn.2016-06.io.blocktarget.test:host1"
RESTRICTED_NQN = "nqn.2016-06.io.blocktarget.test:restricted"
ALLOWED_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"


class SpdkUnavailable(Exception):
    """nvmf_tgt is absent or would not start on this machine."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hugepages_ready() -> bool:
    try:
        n = int(Path("/proc/sys/vm/nr_hugepages").read_text())
    except (OSError, ValueError):
        return False
    return n >= 512 and os.path.ismount("/dev/hugepages")


def memory_args() -> list[str]:
    """Hugepages when the machine has them, else SPDK's --no-huge with 1 GiB."""
    return [] if hugepages_ready() else ["--no-huge", "-s", "1024"]


@dataclass
class Layout:
    """What the test target exports: ns 1 has 512-byte blocks, ns 2 4096-byte blocks;
    RESTRICTED_NQN admits only ALLOWED_HOSTNQN."""

    port: int
    nqn: str = NQN
    ns1_blocks: int = 131072  # 64 MiB of 512 B
    ns2_blocks: int = 8192  # 32 MiB of 4 KiB
    restricted_nqn: str = RESTRICTED_NQN
    allowed_hostnqn: str = ALLOWED_HOSTNQN
    transport: dict[str, Any] = field(default_factory=dict)


def nvmf_config(layout: Layout) -> dict[str, Any]:
    listen = {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
              "trsvcid": str(layout.port)}

    def malloc(name: str, blocks: int, bs: int) -> dict[str, Any]:
        return {"method": "bdev_malloc_create",
                "params": {"name": name, "num_blocks": blocks, "block_size": bs}}

    nvmf: list[dict[str, Any]] = [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP", **layout.transport}},
        {"method": "nvmf_create_subsystem",
         "params": {"nqn": layout.nqn, "allow_any_host": True, "serial_number": "BTHOST0001",
                    "model_number": "host test target"}},
        {"method": "nvmf_subsystem_add_ns",
         "params": {"nqn": layout.nqn, "namespace": {"bdev_name": "Malloc0", "nsid": 1}}},
        {"method": "nvmf_subsystem_add_ns",
         "params": {"nqn": layout.nqn, "namespace": {"bdev_name": "Malloc1", "nsid": 2}}},
        {"method": "nvmf_subsystem_add_listener",
         "params": {"nqn": layout.nqn, "listen_address": listen}},
        {"method": "nvmf_create_subsystem",
         "params": {"nqn": layout.restricted_nqn, "allow_any_host": False,
                    "serial_number": "BTHOST0002"}},
        {"method": "nvmf_subsystem_add_host",
         "params": {"nqn": layout.restricted_nqn, "host": layout.allowed_hostnqn}},
        {"method": "nvmf_subsystem_add_ns",
         "params": {"nqn": layout.restricted_nqn, "namespace": {"bdev_name": "Malloc2"}}},
        {"method": "nvmf_subsystem_add_listener",
         "params": {"nqn": layout.restricted_nqn, "listen_address": listen}},
    ]
    # No listener for the discovery NQN: both SPDK and blocktarget serve discovery on
    # every subsystem listener, and blocktarget refuses to configure the discovery NQN.
    bdev = [
        malloc("Malloc0", layout.ns1_blocks, 512),
        malloc("Malloc1", layout.ns2_blocks, 4096),
        malloc("Malloc2", 2048, 512),
        malloc("Spare0", 2048, 512),  # for namespace hot-add (AEN) tests
    ]
    return {"subsystems": [{"subsystem": "bdev", "config": bdev},
                           {"subsystem": "nvmf", "config": nvmf}]}


def unavailable_reason() -> str | None:
    """Why SPDK's nvmf_tgt cannot be used here, or None."""
    return tool_unavailable_reason("nvmf_tgt")


class SpdkTarget:
    """One nvmf_tgt process in a private directory; always killed by :meth:`stop`."""

    def __init__(self, layout: Layout, *, core: int = 0) -> None:
        reason = unavailable_reason()
        if reason:
            raise SpdkUnavailable(reason)
        self.layout = layout
        self.workdir = Path(tempfile.mkdtemp(prefix="spdk-", dir="/tmp"))
        self.sock = str(self.workdir / "spdk.sock")
        self.config_path = self.workdir / "spdk.json"
        self.config_path.write_text(json.dumps(nvmf_config(layout), indent=1))
        self.log_path = self.workdir / "nvmf_tgt.log"
        self.cmd = [str(find_tool("nvmf_tgt")), "-m", hex(1 << core), "-r", self.sock, "--json",
                    str(self.config_path), "--disable-cpumask-locks", *memory_args()]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.layout.port

    def start(self) -> SpdkTarget:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if self.proc.poll() is not None:
                    raise SpdkUnavailable(
                        f"nvmf_tgt exited with {self.proc.returncode} during start:\n"
                        f"{self.log()[-3000:]}")
                if self._listening() and os.path.exists(self.sock):
                    return self
                if time.monotonic() > deadline:
                    raise SpdkUnavailable(
                        f"nvmf_tgt not listening after {START_TIMEOUT}s:\n{self.log()[-3000:]}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        return f"Listening on 127.0.0.1 port {self.port}" in self.log()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def rpc(self, method: str, **params: Any) -> Any:
        with RpcClient(unix=self.sock, timeout=30) as c:
            return c.call(method, params or None)

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SpdkTarget:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
