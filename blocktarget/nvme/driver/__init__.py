"""User-space PCIe NVMe driver over VFIO: registers, DMA memory, polled queue pairs.

Layers, lowest first (each importable and testable without the ones above it):

* ``regs``   — controller register layout and decoding over any 32-bit MMIO window.
* ``vfio``   — container/group/device ioctls, BAR mapping, IOMMU DMA mapping (cffi).
* ``dma``    — hugepage-backed DMA memory with IOVAs, and per-queue buffer pools.
* ``qpair``  — one SQ/CQ pair: ring memory, doorbells, phase-bit polling, PRPs, timeouts.
* ``ctrlr``  — bring-up, Identify, I/O queue creation, Abort, reset, hot-remove.

Nothing here imports the target (bdev, reactor): the nvme bdev in ``bdevs/nvme_pcie.py``
binds one I/O queue pair to each reactor and polls it from that reactor's poller.
"""
