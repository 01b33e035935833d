"""Ready means ready (issue 18): when the RPC socket file exists, when systemd gets
READY=1, and when `framework_wait_init` returns, every NVMe/TCP listener of the config
accepts.

Each test starts a real `blocktarget start -c FILE` and watches it the way a script,
systemd or SPDK's tools do. The instant the signal is seen, blocktarget's own initiator
connects to every subsystem on every listener (TCP connect, ICReq, Fabrics Connect,
Identify) and to the discovery controller on each port, all at once. A refused
connection there is exactly what users saw ("connection refused" right after the
socket appeared).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import time
from typing import Any

from blocktarget.host.controller import connect
from blocktarget.nvme import spec

from .target_proc import (
    START_TIMEOUT,
    Launcher,
    RunningTarget,
    config,
    free_port,
    listen_address,
    malloc,
)

NQN_A = "nqn.2026-01.io.test:ready-a"
NQN_B = "nqn.2026-01.io.test:ready-b"
POLL_S = 0.0002  # how often the watcher looks: far below the target's start-up steps


def ready_config() -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """Two subsystems on three listener ports (A on two, B on one); the listeners to
    connect to as (subsystem NQN, port)."""
    pa1, pa2, pb = free_port(), free_port(), free_port()
    nvmf = [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}}]
    for nqn, bdev, ports in ((NQN_A, "M0", (pa1, pa2)), (NQN_B, "M1", (pb,))):
        nvmf += [
            {"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": True}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": nqn, "namespace": {"bdev_name": bdev}}},
        ]
        nvmf += [{"method": "nvmf_subsystem_add_listener",
                  "params": {"nqn": nqn, "listen_address": listen_address(p)}} for p in ports]
    return config([malloc("M0"), malloc("M1")], nvmf), [(NQN_A, pa1), (NQN_A, pa2), (NQN_B, pb)]


def launch(t: RunningTarget) -> socket.socket:
    """Start the process with a NOTIFY_SOCKET of our own (returned, not yet read)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(t.workdir / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(t.workdir / "notify"), PYTHONUNBUFFERED="1")
    with open(t.log_path, "wb") as log:
        t.proc = subprocess.Popen(t.cmd, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return notify


def alive(t: RunningTarget, deadline: float) -> None:
    assert t.proc is not None
    assert t.proc.poll() is None, f"target exited with {t.proc.returncode}:\n{t.log()}"
    assert time.monotonic() < deadline, f"target not up after {START_TIMEOUT}s:\n{t.log()}"


async def connect_everything(listeners: list[tuple[str, int]]) -> None:
    """Every subsystem on each of its listeners, and discovery on every port, at once;
    raises (ConnectionRefusedError...) if any of them is not served yet."""
    targets = listeners + [(spec.DISCOVERY_NQN, p) for p in sorted({p for _, p in listeners})]
    ctrls = await asyncio.gather(*(connect("127.0.0.1", port, nqn, timeout=10)
                                   for nqn, port in targets))
    try:
        for ctrl, (nqn, _) in zip(ctrls, targets, strict=True):
            assert ctrl.id_ctrl["subnqn"] == nqn
    finally:
        await asyncio.gather(*(c.disconnect() for c in ctrls))


def wait_ready(notify: socket.socket, t: RunningTarget, deadline: float) -> None:
    notify.settimeout(0.05)
    while True:
        try:
            if b"READY=1" in notify.recv(256):
                return
        except TimeoutError:
            alive(t, deadline)


async def watch_socket_then_connect(t: RunningTarget, listeners: list[tuple[str, int]]) -> None:
    """Poll for the socket file (inside a running loop, so nothing but the poll stands
    between seeing it and connecting); then connect to it and to every listener."""
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(t.sock_path):  # no await: nothing delays the look
        alive(t, deadline)
        time.sleep(POLL_S)
    rpc = socket.socket(socket.AF_UNIX)
    try:
        rpc.connect(t.sock_path)  # the socket file is never there without accepting
    finally:
        rpc.close()
    await connect_everything(listeners)


def test_socket_file_means_every_listener_accepts(running_target: Launcher) -> None:
    """A script polling for the socket file connects the instant it appears: never
    refused, on any listener, nor on the socket itself. Three fresh starts: each is a
    new race between the watcher and the target's start-up."""
    for _ in range(3):
        doc, listeners = ready_config()
        t = running_target.prepare(doc)
        notify = launch(t)
        try:
            asyncio.run(watch_socket_then_connect(t, listeners))
            # systemd hears READY=1 no earlier than the socket exists (checked next test)
            wait_ready(notify, t, time.monotonic() + START_TIMEOUT)
        finally:
            notify.close()
        assert t.stop() == 0, t.log()


def test_ready_notification_means_everything_serves(running_target: Launcher) -> None:
    """What systemd's Type=notify sees: once READY=1 has arrived the socket exists,
    every listener accepts and both RPC servers answer."""
    doc, listeners = ready_config()
    t = running_target.prepare(doc)
    notify = launch(t)
    try:
        wait_ready(notify, t, time.monotonic() + START_TIMEOUT)
        assert os.path.exists(t.sock_path), "READY=1 before the RPC socket existed"
        asyncio.run(connect_everything(listeners))
    finally:
        notify.close()
    assert t.rpc("spdk_get_version") and t.http_rpc("framework_wait_init") is True
    assert t.stop() == 0, t.log()


def test_framework_wait_init_returns_when_everything_serves(running_target: Launcher) -> None:
    """The HTTP server starts a moment before the socket file: a client that gets in
    that early and asks framework_wait_init is answered only when everything serves.
    SPDK's own client asks it over the socket and gets true at once."""
    from spdk.rpc.client import JSONRPCClient

    doc, listeners = ready_config()
    t = running_target.prepare(doc)
    notify = launch(t)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        assert t.http_port is not None
        while True:  # the first moment the HTTP port accepts
            try:
                conn = socket.create_connection(("127.0.0.1", t.http_port), timeout=5)
                break
            except ConnectionRefusedError:
                alive(t, deadline)
                time.sleep(POLL_S)
        body = json.dumps({"jsonrpc": "2.0", "method": "framework_wait_init",
                           "id": 1}).encode()
        conn.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        resp = http.client.HTTPResponse(conn)
        resp.begin()
        assert resp.status == 200 and json.loads(resp.read())["result"] is True
        conn.close()
        assert os.path.exists(t.sock_path), "framework_wait_init returned before the socket"
        asyncio.run(connect_everything(listeners))
        with JSONRPCClient(t.sock_path, timeout=10) as c:
            assert c.call("framework_wait_init") is True
        wait_ready(notify, t, deadline)
    finally:
        notify.close()
    assert t.stop() == 0, t.log()
