"""SPDK's bdev_nvme_* methods, one entry point per operation whatever the transport.

`trtype: tcp` attaches a remote NVMe/TCP controller (bdevs/nvme_tcp.py). `trtype: pcie`
belongs to the local NVMe driver over VFIO (bdevs/nvme_pcie.py, separate work): when
that module is in the build it gets the call, with its own parameter schema, and its
controllers are found by detach/reset by name; when it is not, pcie is refused with a
clear error, as are transports this target has no initiator for (rdma, fc).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..bdevs import nvme_tcp
from ..errors import InvalidParams, NoSuchDevice, Unsupported
from ..params import Param, Schema, validate
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target

Attach = Callable[["Target", dict[str, Any]], Awaitable[list[str]]]


def _pcie() -> Any:
    """The local NVMe (VFIO) bdev module when this build has it, else None."""
    try:
        from ..bdevs import nvme_pcie
    except ImportError:
        return None
    return nvme_pcie if hasattr(nvme_pcie, "attach_pcie") else None


def _attacher(trtype: str) -> tuple[Schema, Attach]:
    if trtype == "tcp":
        return nvme_tcp.SCHEMA, nvme_tcp.attach
    if trtype == "pcie":
        pcie = _pcie()
        if pcie is None:
            raise Unsupported(
                "trtype PCIe is not available in this build: local NVMe SSDs need the "
                "user-space VFIO driver; remote controllers attach with trtype TCP")
        return pcie.ATTACH_SCHEMA, pcie.attach_pcie
    raise InvalidParams(f"parameter 'trtype' {trtype!r} is not supported (have TCP, PCIe)")


@method("bdev_nvme_attach_controller", Schema(
    (Param("name", str, required=True), Param("trtype", str, required=True)),
    allow_extra=True,  # each transport checks the rest with its own schema
), section="bdev")
async def bdev_nvme_attach_controller(target: Target, params: dict[str, Any]) -> list[str]:
    """Attach an NVMe controller; returns the bdevs made, one per namespace (<name>n<nsid>)."""
    schema, attach = _attacher(params["trtype"].lower())
    return await attach(target, validate(schema, params))


def _pcie_controller(name: str) -> Any:
    pcie = _pcie()
    if pcie is None:
        return None
    return next((c for c in pcie.controllers() if getattr(c, "name", None) == name), None)


def _unknown(name: str) -> NoSuchDevice:
    return NoSuchDevice(f"NVMe controller '{name}' does not exist")


@method("bdev_nvme_detach_controller", Schema(
    (Param("name", str, required=True),),
    # SPDK detaches one path by trid; with one path per controller here they only filter
    extra_ok=frozenset({"trtype", "traddr", "adrfam", "trsvcid", "subnqn", "hostaddr",
                        "hostsvcid"}),
), in_config=False)
async def bdev_nvme_detach_controller(target: Target, params: dict[str, Any]) -> bool:
    """Detach a controller and delete its bdevs; refused while any of them is in use."""
    name = params["name"]
    if name in nvme_tcp.controllers(target):
        await nvme_tcp.detach(target, name)
    elif _pcie_controller(name) is not None:
        await _pcie().detach_pcie(target, name)
    else:
        raise _unknown(name)
    return True


@method("bdev_nvme_get_controllers", Schema((Param("name", str),)), in_config=False)
def bdev_nvme_get_controllers(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Attached controllers with their state (enabled, failed + reason) and I/O queues;
    PCIe controllers in brief (bdev_nvme_get_controllers_pcie has their detail)."""
    out = [c.describe() for c in nvme_tcp.controllers(target).values()]
    pcie = _pcie()
    for c in pcie.controllers() if pcie is not None else ():
        out.append({"name": c.name, "ctrlrs": [{"state": "enabled", "trid": {
            "trtype": "PCIe", "traddr": getattr(c, "traddr", "")}}]})
    if params.get("name"):
        out = [c for c in out if c["name"] == params["name"]]
        if not out:
            raise _unknown(params["name"])
    return out


@method("bdev_nvme_reset_controller", Schema(
    (Param("name", str, required=True),), extra_ok=frozenset({"cntlid"}),
), in_config=False)
async def bdev_nvme_reset_controller(target: Target, params: dict[str, Any]) -> bool:
    """Reconnect a controller in place (e.g. after the remote came back); bdevs stay."""
    name = params["name"]
    ctrl = nvme_tcp.controllers(target).get(name)
    if ctrl is not None:
        await ctrl.reset()
    elif _pcie_controller(name) is not None:
        await _pcie().reset_pcie(target, name)
    else:
        raise _unknown(name)
    return True
