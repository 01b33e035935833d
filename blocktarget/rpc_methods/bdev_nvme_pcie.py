"""RPC methods of the local (PCIe, VFIO) nvme bdev.

SPDK's names (``bdev_nvme_attach_controller {"trtype": "PCIe", ...}``, detach, reset,
get_controllers) live in bdev_nvme.py and dispatch on the transport to
``bdevs/nvme_pcie.py``; save_config writes the SPDK name. The ``_pcie`` methods here are
the same operations addressed to this driver directly, plus the driver's detail in
``bdev_nvme_get_controllers_pcie`` (queues, resets, timeouts, DMA memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..bdevs import nvme_pcie
from ..params import Param, Schema
from ..rpc import method

if TYPE_CHECKING:
    from ..app import Target

_NAME = Schema((Param("name", str, required=True),))


@method("bdev_nvme_attach_controller_pcie", nvme_pcie.ATTACH_SCHEMA, section="bdev")
async def bdev_nvme_attach_controller_pcie(target: Target, params: dict[str, Any]) -> list[str]:
    """Attach a local NVMe controller through VFIO (`blocktarget setup` binds it first);
    one bdev per namespace, named <name>n<nsid>.

    All the DMA memory its I/O queues will use (one queue per reactor: io_queue_size - 1
    buffers of max_transfer_kb each, with their PRP lists) is taken and faulted in here,
    so when the hugepage pool is short the attach fails at once with -12 (ENOMEM) and a
    message saying how much it needed and what was free; a config with it then exits 2."""
    return await nvme_pcie.attach_pcie(target, params)


@method("bdev_nvme_detach_controller_pcie", _NAME, in_config=False)
async def bdev_nvme_detach_controller_pcie(target: Target, params: dict[str, Any]) -> bool:
    """Detach: shut the controller down and give the device back to vfio-pci; refused
    while a subsystem namespace uses one of its bdevs."""
    await nvme_pcie.detach_pcie(target, params["name"])
    return True


@method("bdev_nvme_reset_controller_pcie", _NAME, in_config=False)
async def bdev_nvme_reset_controller_pcie(target: Target, params: dict[str, Any]) -> bool:
    """Reset the controller (disable, enable, re-create queues); I/O in flight is
    re-submitted, not failed."""
    await nvme_pcie.reset_pcie(target, params["name"])
    return True


@method("bdev_nvme_get_controllers_pcie", Schema((Param("name", str),)), in_config=False)
def bdev_nvme_get_controllers_pcie(target: Target, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Attached PCIe controllers with their queues, resets, timeouts and DMA memory."""
    ctrls = nvme_pcie.controllers()
    if params.get("name"):
        ctrls = [nvme_pcie.get_controller(params["name"])]
    out = []
    for c in ctrls:
        d = c.ctrlr.describe()
        d.update(name=c.name, trid={"trtype": "PCIe", "traddr": c.traddr},
                 bdevs=[b.name for b in c.bdevs],
                 queues=[rq.q.describe() for rq in list(c.queues.values())])
        out.append(d)
    return out
