"""Self-test of the VM harness: if these fail, no other VM test result means anything.

Each check isolates one layer the real tests build on: the guest runs the host's tools and
reports its exit status; the guest kernel's NVMe/TCP host works against Linux's own nvmet (so a
later failure against our target is ours, not the guest's); the guest reaches a server on the
host's loopback, which is how it will reach our target.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

from .harness.vm import HOST_ADDR, Guest

GUEST_DIR = Path(__file__).resolve().parent / "guest"


def test_guest_runs_host_tools(vm: Guest) -> None:
    res = vm.run("nvme version; fio --version; uname -r", timeout=60).check()
    out = res.output
    assert re.search(r"^nvme version \d+\.\d+", out, re.M), out
    assert re.search(r"^fio-\d+\.\d+", out, re.M), out
    assert re.search(r"^6\.12\.\d+\+deb12-amd64$", out, re.M), out
    assert res.boot_seconds is not None and res.boot_seconds < 30, res.boot_seconds


def test_exit_status_propagates(vm: Guest) -> None:
    res = vm.run("echo leaving > left.txt; exit 7", timeout=60)
    assert res.rc == 7, res.console
    assert not res.timed_out
    assert (res.rundir / "left.txt").read_text() == "leaving\n"


def test_nvmet_loopback_kernel_host_and_fio(vm: Guest) -> None:
    script = (GUEST_DIR / "nvmet-loopback.sh").read_text()
    res = vm.run(script, timeout=120).check()
    assert "NVMET_LOOPBACK_OK" in res.output
    assert re.search(r"err= *0", (res.rundir / "fio.txt").read_text())


async def test_guest_reaches_host_loopback(vm: Guest) -> None:
    token = secrets.token_hex(16)
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readline()
        writer.write(b"ack " + data)
        await writer.drain()
        writer.close()
        if not received.done():
            received.set_result(data)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    script = f"""
        set -euo pipefail
        exec 3<>/dev/tcp/{HOST_ADDR}/{port}
        echo {token} >&3
        read -r reply <&3
        echo "reply: $reply"
        [ "$reply" = "ack {token}" ]
    """
    async with server:
        res = await asyncio.to_thread(vm.run, script, timeout=60)
    res.check()
    assert received.done(), "host server got no connection"
    assert received.result() == f"{token}\n".encode()
    assert f"reply: ack {token}" in res.output


def test_a_hung_boot_is_booted_again(vm: Guest, monkeypatch, capsys) -> None:
    """A guest whose script never starts (here a stand-in for QEMU that prints nothing,
    as a boot hung after SeaBIOS did in CI) is killed at BOOT_TIMEOUT_S and booted once
    more with what its first boot left of the timeout, not waited for to the end."""
    from .harness import vm as vmmod

    monkeypatch.setattr(vmmod, "BOOT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(Guest, "qemu_command", lambda self, rundir, **kw: ["sleep", "60"])
    res = vm.run("true", timeout=30)
    assert res.timed_out and res.rc == 124 and res.boot_seconds is None
    assert res.total_seconds < 5, res.total_seconds
    err = capsys.readouterr().err
    assert err.count("booting again") == 1, err
