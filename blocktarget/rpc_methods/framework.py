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
async def framework_wait_init(target: Target, params: dict[str, Any]) -> bool:
    """Returns true once everything in the config serves (a call before that waits).

    "Serves" means every NVMe/TCP listener of the config accepts and the RPC servers are
    up. The Unix socket is created last, so a call through it returns at once; a call
    over HTTP, which starts a moment earlier, may wait for that moment. SPDK's tools
    call this before configuring a target."""
    await target.ready.wait()
    return True


@method("save_config", in_config=False)
def save_config(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """The running state as a config file body (restart with it to get the same target)."""
    return target.save_config()


# SPDK's rpc.py implements save_config on the client: it lists the subsystems, then asks
# for each one's config. Both come from Target.save_config so the two paths cannot differ.
_SUBSYSTEM_DEPS = {"keyring": [], "bdev": [], "nvmf": ["bdev"]}


@method("framework_get_subsystems", in_config=False)
def framework_get_subsystems(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Config sections in dependency order, in SPDK's shape (used by SPDK's save_config)."""
    return [{"subsystem": s["subsystem"], "depends_on": _SUBSYSTEM_DEPS.get(s["subsystem"], [])}
            for s in target.save_config()["subsystems"]]


@method(
    "framework_get_config",
    Schema((Param("name", str, required=True), Param("with_batches", bool, default=False))),
    in_config=False,
)
def framework_get_config(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """One section's replayable calls (SPDK's save_config calls this per subsystem)."""
    for s in target.save_config()["subsystems"]:
        if s["subsystem"] == params["name"]:
            return s["config"]
    raise InvalidParams(f"parameter 'name': subsystem '{params['name']}' not found")


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
