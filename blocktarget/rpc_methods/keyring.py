"""Keyring methods with SPDK's names and parameters: keyring_file_add_key,
keyring_file_remove_key, keyring_get_keys.

Output carries key names and file paths only; the material never leaves the keyring.
A key that a subsystem host still names cannot be removed (SPDK keeps such a key alive
as "removed"; refusing is the clearer default: the operator first changes the host's
keys with nvmf_subsystem_set_keys or removes the host).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import Busy
from ..params import Param, Schema, non_empty
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target

KEY_FIELDS = ("dhchap_key", "dhchap_ctrlr_key", "psk")


def key_users(target: Target, name: str) -> list[str]:
    """Who names key ``name``: "<subsystem NQN>/<host NQN>" entries."""
    users = []
    for sub in target.subsystems:
        for host, extra in sub.hosts.items():
            if any(extra.get(f) == name for f in KEY_FIELDS):
                users.append(f"{sub.nqn}/{host}")
    return users


@method(
    "keyring_file_add_key",
    Schema((Param("name", str, required=True, check=non_empty),
            Param("path", str, required=True, check=non_empty))),
    section="keyring",
)
def keyring_file_add_key(target: Target, params: dict[str, Any]) -> bool:
    """Add a key whose material is in a file (absolute path, owned by us, mode 0600)."""
    target.keyring.add_file_key(params["name"], params["path"])
    return True


@method("keyring_file_remove_key", Schema((Param("name", str, required=True),)),
        in_config=False)
def keyring_file_remove_key(target: Target, params: dict[str, Any]) -> bool:
    """Remove a key (refused while a subsystem host uses it)."""
    target.keyring.get(params["name"])
    users = key_users(target, params["name"])
    if users:
        raise Busy(f"key '{params['name']}' is in use by {', '.join(users)}")
    target.keyring.remove(params["name"])
    return True


@method("keyring_get_keys", in_config=False)
def keyring_get_keys(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """List keys in SPDK's shape: name, module, path, reference count. No secrets."""
    return [{"name": k.name, "module": k.module, "path": k.path, "removed": False,
             "probed": False, "refcnt": 1 + len(key_users(target, k.name))}
            for k in target.keyring]
