"""DMA memory comes back when an NVMe controller goes away.

The driver's DMA regions are MAP_SHARED anonymous mappings (``/dev/zero`` in
/proc/self/maps) that nothing but ``DmaAllocator.close`` unmaps: a teardown path that
forgets it leaks them for the life of the target. Each test here repeats a life cycle
and checks that the process's mapping count, and the IOMMU's, return to where they were.
"""

from __future__ import annotations

import asyncio
from typing import Any

from test_nvme_driver import FakeIommu, FakeNvme, _io, stub_target  # noqa: F401

from blocktarget.bdev import IOType
from blocktarget.nvme.driver.ctrlr import Controller
from blocktarget.nvme.driver.dma import DmaAllocator

ROUNDS = 4


def shared_anon_mappings() -> int:
    """How many MAP_SHARED|MAP_ANONYMOUS mappings this process holds (the kernel shows
    them as ``/dev/zero (deleted)``)."""
    with open("/proc/self/maps") as f:
        return sum("/dev/zero" in line for line in f)


async def _attached(target: Any, name: str) -> tuple[Controller, DmaAllocator, FakeIommu]:
    from blocktarget.bdevs import nvme_pcie

    iommu = FakeIommu()
    alloc = DmaAllocator(iommu, name=name, use_hugepages=False)
    c = Controller(FakeNvme(iommu, blocks=1024), alloc, name=name)
    c.init(2)
    await nvme_pcie.register_controller(target, name, "0000:00:06.0", c,
                                        {"name": name, "traddr": "0000:00:06.0"})
    b = target.bdevs.get(f"{name}n1")
    for r in target.reactors:  # a queue pair per reactor, with its buffer pool
        io = await asyncio.to_thread(_io, r, b, IOType.WRITE, 0, 8, bytes(8 * 512))
        assert io.status == 0
    assert alloc.mapped_bytes > 0 and iommu.maps
    return c, alloc, iommu


async def test_detach_and_reset_give_dma_memory_back(stub_target: Any) -> None:  # noqa: F811
    from blocktarget.bdevs import nvme_pcie

    start = shared_anon_mappings()
    for i in range(ROUNDS):
        c, alloc, iommu = await _attached(stub_target, f"Td{i}")
        await nvme_pcie.reset_pcie(stub_target, f"Td{i}")
        mapped = alloc.mapped_bytes
        await nvme_pcie.reset_pcie(stub_target, f"Td{i}")
        assert alloc.mapped_bytes == mapped, "a reset reuses the queues' memory"
        await nvme_pcie.detach_pcie(stub_target, f"Td{i}")
        assert c.closed and alloc.mapped_bytes == 0 and not iommu.maps
        assert shared_anon_mappings() == start, f"round {i}"


async def test_deleting_the_last_bdev_gives_dma_memory_back(stub_target: Any) -> None:  # noqa: F811
    """The target's shutdown path: the bdev registry destroys each bdev; the last one of a
    controller closes it (and its allocator)."""
    start = shared_anon_mappings()
    for i in range(ROUNDS):
        c, alloc, iommu = await _attached(stub_target, f"Tb{i}")
        b = stub_target.bdevs.get(f"Tb{i}n1")
        stub_target.bdevs.remove(b)
        await stub_target.reactors.broadcast(b.close_channel)  # (as Target.delete_bdev)
        await asyncio.to_thread(b.destruct)
        assert c.closed and alloc.mapped_bytes == 0 and not iommu.maps
        assert shared_anon_mappings() == start, f"round {i}"


async def test_queue_churn_reuses_dma_memory(stub_target: Any) -> None:  # noqa: F811
    """A reactor's queue pair torn down and made again (the bdev's channels closed and
    reopened) takes no new DMA memory: the old rings and buffers are reused."""
    from blocktarget.bdevs import nvme_pcie

    c, alloc, iommu = await _attached(stub_target, "Tq")
    b = stub_target.bdevs.get("Tqn1")
    sizes = []
    for _ in range(ROUNDS + 2):
        await stub_target.reactors.broadcast(b.close_channel)
        assert not c.io_queues
        for r in stub_target.reactors:
            io = await asyncio.to_thread(_io, r, b, IOType.READ, 0, 64)
            assert io.status == 0
        sizes.append(alloc.mapped_bytes)
    assert sizes[-1] == sizes[1], sizes
    await nvme_pcie.detach_pcie(stub_target, "Tq")
    assert alloc.mapped_bytes == 0 and not iommu.maps
