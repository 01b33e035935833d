"""Idle NVMe/TCP connections for memory measurements (used by `vs_spdk.py --memory`).

Each connection is a plain socket that does what a host does before going quiet: ICReq,
then (``connect=True``) a fabrics Connect for an admin queue with no keep-alive, so the
target holds a queue pair, its decoder and a controller for it, as it would for every
real host that connected and sat idle.
"""

from __future__ import annotations

import socket
import uuid

from tcp_perf import NQN

from blocktarget.nvme import pdu
from blocktarget.nvme.structs import build_connect_data, build_connect_sqe, parse_cqe

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:{}"


def _recv_pdu(s: socket.socket, dec: pdu.Decoder) -> pdu.Pdu:
    while True:
        got = dec.feed(b"")
        if got:
            return got[0]
        data = s.recv(65536)
        if not data:
            raise ConnectionError("target closed the connection")
        got = dec.feed(data)
        if got:
            return got[0]


def open_idle_connections(port: int, n: int, *, connect: bool = True) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        dec = pdu.Decoder(expect=pdu.CONTROLLER_TO_HOST)
        s.sendall(b"".join(bytes(b) for b in pdu.encode(pdu.ICReq())))
        if type(_recv_pdu(s, dec)) is not pdu.ICResp:
            raise RuntimeError("no ICResp")
        if connect:
            hostid = uuid.uuid4()
            cmd = pdu.CapsuleCmd(build_connect_sqe(1, 0, 31, 0), build_connect_data(
                hostid.bytes, 0xFFFF, NQN, HOSTNQN.format(hostid)))
            s.sendall(b"".join(bytes(b) for b in pdu.encode(cmd)))
            resp = _recv_pdu(s, dec)
            if type(resp) is not pdu.CapsuleResp or parse_cqe(resp.cqe).status:
                raise RuntimeError(f"Connect failed: {resp!r}")
        socks.append(s)
    return socks
