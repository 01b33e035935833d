"""bdev methods: the card's generic ones and SPDK's per-module names, one implementation."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..bdev import MODULES, Bdev, IOType
from ..errors import InvalidParams
from ..params import Param, Schema, validate
from ..qos import LIMIT_NAMES, Qos, QosLimits
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target


@method(
    "bdev_create",
    Schema((Param("type", str, required=True),), allow_extra=True),
    section="bdev",
)
async def bdev_create(target: Target, params: dict[str, Any]) -> str | list[str]:
    """Create a bdev of any type: {"type": "malloc"|"null"|..., module params...}."""
    kind = params.pop("type")
    module = MODULES.get(kind)
    if module is None:
        raise InvalidParams(
            f"parameter 'type' {kind!r} is not a bdev type (have {', '.join(sorted(MODULES))})"
        )
    checked = validate(module.schema, params)
    return _names(await target.create_bdev(module.name, checked))


def _names(made: Bdev | list[Bdev]) -> str | list[str]:
    """One name, or the list of names SPDK returns for calls that make several (split)."""
    return [b.name for b in made] if isinstance(made, list) else made.name


@method("bdev_delete", Schema((Param("name", str, required=True),)), in_config=False)
async def bdev_delete(target: Target, params: dict[str, Any]) -> bool:
    """Delete a bdev of any type; refused while a namespace or virtual bdev uses it."""
    await target.delete_bdev(params["name"])
    return True


def _module_methods() -> None:
    """Register SPDK's bdev_<type>_create / _delete for each module, sharing one body."""
    for module in list(MODULES.values()):

        def make_create(mod_name: str):  # type: ignore[no-untyped-def]
            async def create(target: Target, params: dict[str, Any]) -> str | list[str]:
                return _names(await target.create_bdev(mod_name, params))

            create.__doc__ = f"Create a {mod_name} bdev ({MODULES[mod_name].description})."
            return create

        def make_delete(mod_name: str):  # type: ignore[no-untyped-def]
            async def delete(target: Target, params: dict[str, Any]) -> bool:
                await target.delete_bdev(params["name"], module=mod_name)
                return True

            delete.__doc__ = f"Delete a {mod_name} bdev."
            return delete

        method(module.create_method, module.schema, section="bdev",
               aliases=module.create_aliases)(make_create(module.name))
        if module.delete_method:
            method(module.delete_method, Schema((Param("name", str, required=True),)),
                   aliases=module.delete_aliases,
                   in_config=False)(make_delete(module.name))


def register_module_methods() -> None:
    from ..bdev import load_builtin_modules

    load_builtin_modules()
    _module_methods()


register_module_methods()


@method(
    "bdev_get_bdevs",
    Schema((Param("name", str), Param("timeout", int, default=0))),
    in_config=False,
)
def bdev_get_bdevs(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """List bdevs (or one, by name); an unknown name is ENODEV as in SPDK."""
    if params.get("name"):
        return [target.bdevs.get(params["name"]).describe()]
    return [b.describe() for b in target.bdevs]


@method("bdev_get_iostat", Schema((Param("name", str), Param("per_channel", bool, default=False))),
        in_config=False)
async def bdev_get_iostat(target: Target, params: dict[str, Any]) -> dict[str, Any]:
    """I/O statistics per bdev in SPDK's shape; ticks are nanoseconds (tick_rate 1e9).
    The reactors fold what C counted for lent connections first (nvme/netpoll.py)."""
    await target.reactors.fold_stats()
    if params.get("name"):
        bdevs = [target.bdevs.get(params["name"])]
    else:
        bdevs = list(target.bdevs)
    out = []
    for b in bdevs:
        st = b.stats_total()
        entry: dict[str, Any] = {
            "name": b.name,
            "bytes_read": st.bytes[IOType.READ],
            "num_read_ops": st.ops[IOType.READ],
            "bytes_written": st.bytes[IOType.WRITE],
            "num_write_ops": st.ops[IOType.WRITE],
            "bytes_unmapped": st.bytes[IOType.UNMAP],
            "num_unmap_ops": st.ops[IOType.UNMAP],
            "bytes_copied": 0,
            "num_copy_ops": 0,
            "num_flush_ops": st.ops[IOType.FLUSH],
            "num_write_zeroes_ops": st.ops[IOType.WRITE_ZEROES],
            "num_compare_ops": st.ops[IOType.COMPARE],
            "read_latency_ticks": st.latency_sum_ns[IOType.READ],
            "write_latency_ticks": st.latency_sum_ns[IOType.WRITE],
            "unmap_latency_ticks": st.latency_sum_ns[IOType.UNMAP],
            "io_error": {t.name.lower(): st.errors[t] for t in IOType if st.errors[t]},
        }
        if params["per_channel"]:
            entry["channels"] = [
                {"reactor": key, "num_read_ops": ch.stats.ops[IOType.READ],
                 "num_write_ops": ch.stats.ops[IOType.WRITE],
                 "bytes_read": ch.stats.bytes[IOType.READ],
                 "bytes_written": ch.stats.bytes[IOType.WRITE]}
                for key, ch in sorted(b.channels.items())
            ]
        out.append(entry)
    return {"tick_rate": 1_000_000_000, "ticks": time.monotonic_ns(), "bdevs": out}


@method("bdev_set_qos_limit",
        Schema((Param("name", str, required=True),
                *(Param(n, int, help="0 removes this limit") for n in LIMIT_NAMES))),
        section="bdev")
async def bdev_set_qos_limit(target: Target, params: dict[str, Any]) -> bool:
    """Set rate limits on a bdev (SPDK's names; limits not given stay as they were, 0
    removes one): enforced for the bdev as a whole across every reactor and connection
    (qos.py). A limited bdev, and what is stacked on it, leaves the C lane for the Python
    path, which counts every I/O against the limit."""
    bdev = target.bdevs.get(params["name"])
    changes = {n: params[n] for n in LIMIT_NAMES if params.get(n) is not None}
    if not changes:
        raise InvalidParams(f"give at least one of {', '.join(LIMIT_NAMES)}")
    limits = (bdev.qos.limits if bdev.qos is not None else QosLimits()).updated(changes)
    bdev.qos = Qos(limits, bdev.block_size) if limits.any() else None
    # the queue pairs' C lanes rebuild their namespace tables without (or with) it
    for sub in target.subsystems:
        sub.generation += 1
    for ctrl in target.controllers.all():
        if not ctrl.discovery:
            ctrl.refresh_ana()
    return True


@method("bdev_wait_for_examine", in_config=True, section="bdev")
def bdev_wait_for_examine(target: Target, params: dict[str, Any]) -> bool:
    """Accepted for SPDK configs: bdevs here are ready when created, nothing to wait for."""
    return True

