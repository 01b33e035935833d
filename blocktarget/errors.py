"""Error types shared by the control plane, the config loader and the bdev layer.

They carry JSON-RPC error codes because the same failure must read the same whether it
came over the RPC socket or from a line of a config file; SPDK uses negative errno values
for "no such device" / "exists" / "busy", and its clients key off them, so we do too.
"""

from __future__ import annotations

import errno

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


class RpcError(Exception):
    """A failure reportable to a JSON-RPC client with a stable code."""

    code: int = INTERNAL_ERROR

    def __init__(self, message: str, code: int | None = None, data: object = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.data = data


class InvalidParams(RpcError):
    code = INVALID_PARAMS


class MethodNotFound(RpcError):
    code = METHOD_NOT_FOUND


class NoSuchDevice(RpcError):
    code = -errno.ENODEV


class AlreadyExists(RpcError):
    code = -errno.EEXIST


class Busy(RpcError):
    code = -errno.EBUSY


class NotPermitted(RpcError):
    code = -errno.EPERM


class Unsupported(RpcError):
    code = -errno.EOPNOTSUPP
