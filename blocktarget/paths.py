"""Which files the control plane may touch: the `allowed_dirs` setting and its check.

Whoever holds the RPC socket can create bdevs over files, pool files, FUSE mountpoints
and key files. The target often runs as root (VFIO, hugepages), so without a fence one
`bdev_uring_create` over /etc/shadow would export it to the network. Every method that
opens, creates or removes a path by name therefore calls `check_path` first.

The check resolves symlinks and `..` (os.path.realpath) on both sides, so a link planted
inside an allowed directory cannot point outside it, and `allowed/../etc` is `/etc`.

Default when the config sets nothing: `/var/lib/blocktarget` only, the state directory
of the packaged service (deploy/). Not the config file's own directory: it usually holds
secrets (the RPC token file, DH-HMAC-CHAP keys) that must never become readable through
a bdev. An operator with images elsewhere lists their directories in
`blocktarget.allowed_dirs` (or `blocktarget start --allowed-dir DIR`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import RpcError

DEFAULT_ALLOWED_DIRS: tuple[str, ...] = ("/var/lib/blocktarget",)

# -EACCES: what SPDK returns for a path the process may not use
PATH_NOT_ALLOWED = -13


class PathNotAllowed(RpcError):
    """A path outside every allowed directory (JSON-RPC error -13, EACCES)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, PATH_NOT_ALLOWED)


def normalize_dirs(dirs: Iterable[str]) -> tuple[str, ...]:
    """Absolute, symlink-free forms of the configured directories (order kept, no dups)."""
    out: list[str] = []
    for d in dirs:
        real = os.path.realpath(os.path.expanduser(d))
        if real not in out:
            out.append(real)
    return tuple(out)


def is_within(path: str, allowed: Sequence[str]) -> bool:
    """Whether ``path`` (resolved) is one of ``allowed`` or lies below one of them."""
    real = os.path.realpath(path)
    for d in allowed:
        if real == d or real.startswith(d.rstrip("/") + "/"):
            return True
    return False


def allowed_dirs_of(target: Any) -> tuple[str, ...]:
    """The resolved allowed directories of a running target (its settings)."""
    settings = getattr(target, "settings", None)
    dirs = getattr(settings, "allowed_dirs", None)
    return normalize_dirs(DEFAULT_ALLOWED_DIRS if dirs is None else dirs)


def check_path(target: Any, path: str, purpose: str) -> str:
    """Refuse ``path`` unless it resolves inside one of the target's allowed directories.

    ``purpose`` names the use in the error ("bdev file", "pmem pool", "key file",
    "FUSE mountpoint"). Returns the path unchanged, so callers keep what the operator
    wrote (save_config writes it back as given). A path that does not exist yet is
    checked through its nearest existing parent, which is what realpath does.
    """
    if not isinstance(path, str) or not path:
        raise PathNotAllowed(f"{purpose}: empty path")
    if "\0" in path:
        raise PathNotAllowed(f"{purpose} {path!r}: contains a NUL byte")
    allowed = allowed_dirs_of(target)
    if not is_within(path, allowed):
        real = os.path.realpath(path)
        shown = f"{path!r}" + (f" (resolves to {real!r})" if real != os.path.abspath(path)
                               else "")
        where = ", ".join(allowed) if allowed else "none configured"
        raise PathNotAllowed(
            f"{purpose} {shown} is outside the allowed directories ({where}); "
            "add its directory to blocktarget.allowed_dirs")
    return path
