"""NVMe/TCP queue pair (placeholder until the wire protocol lands: closes the socket)."""

from __future__ import annotations

import asyncio
from typing import Any


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def make_qpair_protocol(target: Any, reactor: Any, addr: Any) -> asyncio.BaseProtocol:
    return _Refuse()
