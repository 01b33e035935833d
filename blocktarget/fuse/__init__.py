"""FUSE export: NVMe/TCP namespaces and local bdevs as regular files.

Why our own FUSE protocol code rather than a binding (measured, see bench/RESULTS.md):
pyfuse3 3.5 has no fallocate handler and no FOPEN_PARALLEL_DIRECT_WRITES, so
punch-hole could not reach Deallocate; mfusepy (ctypes, libfuse3 high-level API) has
both but runs every request on a libfuse thread that must hand it to the initiator's
asyncio loop and wait, and measured 2.8x slower per request than pyfuse3 on asyncio.
The kernel protocol needed for one directory of fixed-size files is small
(``proto.py``), and speaking it on the initiator's own loop leaves no thread hop at
all. libfuse is not needed; ``fusermount3`` (Debian ``fuse3``) only when not root.
"""

from .device import BdevDevice, BlockDevice, DeviceError, NvmeDevice, RemoteController
from .export import Export, LocalExport, file_name
from .mount import FuseUnavailable

__all__ = ["BdevDevice", "BlockDevice", "DeviceError", "Export", "FuseUnavailable",
           "LocalExport", "NvmeDevice", "RemoteController", "file_name"]
