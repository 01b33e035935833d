"""The keyring: named secrets whose material stays in files (SPDK's `keyring_file`).

Configuration names a key ("key0"); only the keyring knows the file it came from and
its content. So `save_config`, RPC output and logs carry names and paths, never
secrets, and rotating a secret is a file write plus `keyring_file_remove_key` /
`keyring_file_add_key`.

A key file must be a regular file owned by the user running the target and readable by
nobody else (mode 0600 or stricter), as SPDK demands: a secret that others can read is
not a secret, and a refusal at add time is better than a quiet leak. The content is
read once, when the key is added, so nothing on the I/O reactors ever touches the file
system.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import AlreadyExists, InvalidParams, NoSuchDevice, NotPermitted

MAX_KEY_FILE = 4096  # a DHHC-1 key is < 100 bytes; a larger "key" is a mistake


@dataclass(frozen=True, repr=False)
class Key:
    name: str
    path: str
    module: str = "keyring_file"
    _material: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return f"Key({self.name!r}, {self.path!r})"

    @property
    def material(self) -> str:
        """The secret text (for the authentication engine only)."""
        return self._material


def read_key_file(path: str) -> str:
    """Read a key file after checking it is ours and private; errors name the file."""
    if not os.path.isabs(path):
        raise InvalidParams(f"key file path '{path}' must be absolute")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoSuchDevice(f"key file '{path}' does not exist") from None
    except OSError as exc:
        raise InvalidParams(f"cannot open key file '{path}': {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidParams(f"key file '{path}' is not a regular file")
        if st.st_uid != os.geteuid():
            raise NotPermitted(f"key file '{path}' is not owned by the target's user "
                               f"(uid {st.st_uid}, we are {os.geteuid()})")
        if st.st_mode & 0o077:
            raise NotPermitted(f"invalid permissions for key file '{path}': "
                               f"0{stat.S_IMODE(st.st_mode):o} (must be 0600 or stricter)")
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise InvalidParams(f"key file '{path}' is larger than {MAX_KEY_FILE} bytes")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidParams(f"key file '{path}' is not ASCII text") from None
    if not text:
        raise InvalidParams(f"key file '{path}' is empty")
    return text


class Keyring:
    """Keys by name. Changed only from the control-plane thread."""

    def __init__(self) -> None:
        self._keys: dict[str, Key] = {}

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._keys.values()))

    def __len__(self) -> int:
        return len(self._keys)

    def add_file_key(self, name: str, path: str) -> Key:
        if not name or not name.isprintable() or "/" in name:
            raise InvalidParams(f"key name {name!r} is not valid")
        if name in self._keys:
            raise AlreadyExists(f"key '{name}' already exists")
        key = Key(name, path, _material=read_key_file(path))
        self._keys[name] = key
        return key

    def remove(self, name: str) -> Key:
        key = self._keys.pop(name, None)
        if key is None:
            raise NoSuchDevice(f"key '{name}' does not exist")
        return key

    def find(self, name: str) -> Key | None:
        return self._keys.get(name)

    def get(self, name: str) -> Key:
        key = self._keys.get(name)
        if key is None:
            raise NoSuchDevice(f"key '{name}' does not exist")
        return key
