"""The initiator: an asyncio NVMe/TCP host library (and the discover/connect/perf CLI).

Shares the wire codec (``nvme/pdu.py``) and the spec layouts (``nvme/spec.py``,
``nvme/structs.py``) with the target, so both ends read the same numbers.
"""

from __future__ import annotations

from .connection import Completion, NvmeStatusError, QueuePair, Response, TransportError
from .controller import (
    Controller,
    NamespaceInfo,
    connect,
    default_hostid,
    default_hostnqn,
    discover,
    read_discovery_log,
)

__all__ = [
    "Completion",
    "Controller",
    "NamespaceInfo",
    "NvmeStatusError",
    "QueuePair",
    "Response",
    "TransportError",
    "connect",
    "default_hostid",
    "default_hostnqn",
    "discover",
    "read_discovery_log",
]
