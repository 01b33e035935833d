"""Process-level methods: introspection, version, reactors, whole-config save and load."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import ConfigError
from ..errors import InvalidParams
from ..params import Param, Schema
from ..rpc import REGISTRY, method

if TYPE_CHECKING:
    from ..app import Target


@method(
    "rpc_get_methods",
    Schema((Param("current", bool, default=False), Param("include_aliases", bool, default=True))),
    in_config=False,
)
def rpc_get_methods(target: Target, params: dict[str, Any]) -> list[str]:
    """Names of all methods (SPDK's aliases included unless include_aliases is false)."""
    if params["include_aliases"]:
        return REGISTRY.names()
    return sorted(REGISTRY.methods)


@method("rpc_get_method_docs", in_config=False)
def rpc_get_method_docs(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method with its aliases, parameters and description (for the RPC reference)."""
    out = []
    for name in sorted(REGISTRY.methods):
        m = REGISTRY.methods[name]
        out.append({
            "name": name,
            "aliases": list(m.aliases),
            "description": m.doc,
            "params": [
                {"name": p.name, "type": getattr(p.type, "__name__", str(p.type)),
                 "required": p.required, "default": p.default, "help": p.help}
                for p in m.schema.params
            ],
        })
    return out


@method("spdk_get_version", in_config=False)
def spdk_get_version(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """Version in SPDK's shape so SPDK tooling can tell what it talks to."""
    major, minor, patch = (__version__.split(".") + ["0", "0"])[:3]
    return {
        "version": f"blocktarget v{__version__}",
        "fields": {"major": int(major), "minor": int(minor), "patch": int(patch), "suffix": ""},
    }


@method("framework_get_reactors", in_config=False)
def framework_get_reactors(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """Each reactor: core, thread id, busy/idle time (ns), pollers, owned connections."""
    return {
        "tick_rate": 1_000_000_000,
        "pid": __import__("os").getpid(),
        "reactors": [r.describe() for r in target.reactors],
    }


@method("framework_wait_init", in_config=False)
def framework_wait_init(target: Target, params: dict[str, Any]) -> bool:
    """SPDK clients call this before configuring; initialisation is done before RPC starts."""
    return True


@method("save_config", in_config=False)
def save_config(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """The running state as a config file body (restart with it to get the same target)."""
    return target.save_config()


@method(
    "load_config",
    Schema((Param("subsystems", list, required=True), Param("blocktarget", dict))),
    in_config=False,
)
async def load_config(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """Apply a config's calls to the running target, all or nothing.

    The calls are first replayed into a scratch target that holds a copy of the current
    state; only if every call succeeds there are they applied for real, so a bad entry
    leaves the running target untouched. Process settings ("blocktarget") need a restart.
    """
    from ..app import Target as TargetCls

    doc = {"subsystems": params["subsystems"]}
    scratch = TargetCls(target.settings, dry_run=True)
    try:
        await scratch.apply_config({"subsystems": target.save_config()["subsystems"]}, "current")
        await scratch.apply_config(doc, "load_config")
    except ConfigError as exc:
        raise InvalidParams(str(exc)) from None
    finally:
        await scratch.stop()
    t0 = time.monotonic()
    try:
        applied = await target.apply_config(doc, "load_config")
    except ConfigError as exc:
        raise InvalidParams(str(exc)) from None
    return {"applied": applied, "seconds": round(time.monotonic() - t0, 6)}
