"""The Unix RPC socket appears in one step: bound and listening under a temporary name in
the same directory, then renamed into place (rpc.UnixRpcServer.start). Its existence is
the target's readiness signal, so it must never be there without accepting, must replace
a stale socket atomically, and must leave no temporary file behind, also when the path
is too long for a longer temporary name.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktarget.app import Target
from blocktarget.config import Settings
from blocktarget.rpc import UnixRpcServer


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: not pytest's long tmp_path
    d = Path(tempfile.mkdtemp(prefix="bt-u-", dir="/tmp"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def ask(path: str) -> object:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(json.dumps({"jsonrpc": "2.0", "method": "spdk_get_version",
                              "id": 1}).encode())
        return json.loads(s.recv(65536))["result"]["version"]


async def serve_and_check(path: Path) -> None:
    target = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False))
    server = UnixRpcServer(target.dispatcher, str(path))
    await server.start()
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name], \
            "no temporary name left behind"
        assert str(await asyncio.to_thread(ask, str(path))).startswith("blocktarget v")
    finally:
        await server.stop()
    assert not path.exists()


async def test_socket_replaces_a_stale_one_in_one_step(short_dir: Path) -> None:
    path = short_dir / "rpc.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file of a killed target: nobody accepts
    await serve_and_check(path)


async def test_long_paths_still_work(short_dir: Path) -> None:
    """A long name: the usual temporary name would pass the 107 bytes, a short one is
    used. A deep directory: no temporary name fits at all, the socket is bound in place.
    Both serve, and leave only the socket."""
    long_name = short_dir / ("s" * (107 - len(str(short_dir)) - 1))
    assert len(str(long_name)) == 107
    await serve_and_check(long_name)
    deep = short_dir / ("d" * (105 - len(str(short_dir)) - 1))
    deep.mkdir()
    try:
        await serve_and_check(deep / "s")
    finally:
        deep.rmdir()


async def test_a_live_socket_or_a_file_is_never_replaced(short_dir: Path) -> None:
    path = short_dir / "rpc.sock"
    path.write_text("not a socket")
    target = Target(Settings(cores=[0], rpc_http=None, rpc_unix=None, metrics=False))
    with pytest.raises(OSError, match="exists and is not a socket"):
        await UnixRpcServer(target.dispatcher, str(path)).start()
    assert path.read_text() == "not a socket"
    assert sorted(p.name for p in short_dir.iterdir()) == ["rpc.sock"]
    path.unlink()
    first = UnixRpcServer(target.dispatcher, str(path))
    await first.start()
    try:
        with pytest.raises(OSError, match="in use by another running target"):
            await UnixRpcServer(target.dispatcher, str(path)).start()
        assert sorted(p.name for p in short_dir.iterdir()) == ["rpc.sock"]
    finally:
        await first.stop()
