"""A fake PCIe NVMe controller whose I/O queues run in C, on a thread of their own
(fake_nvme_dev.c), for measuring the NVMe lane as it runs against hardware.

test_nvme_driver.MemBarNvme models the whole controller in Python: its I/O needs the
GIL and, in bench/hotpath.py, a turn between the reactor's loop turns, so every batch
took a second loop turn (the Python poller, netpoll.reap, bt_net_reap) that a real
device, reaped by the reactor's C poller in the submitting call, does not
(bench/RESULTS.md, "Where the io_uring and NVMe lanes' CPU per command goes"). Here the
registers and the admin queue stay Python's (bring-up, Identify, queue creation), and
the I/O queues are handed to the C model, which watches their doorbells in the fake
BAR's memory, moves data through the PRPs to and from its own memory and posts
completions, GIL-free. Error injection (held commands, aborts, removal) stays with
MemBarNvme, which the tests that need it keep using.

The C is compiled at first use with cffi (portable flags only, as the extension's) into
a per-user cache keyed by the sources' hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from test_nvme_driver import FakeIommu, MemBarNvme

from blocktarget.nvme.driver import regs

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fake_nvme_dev.c"
HEADER = HERE / "fake_nvme_dev.h"
# as blocktarget/_fastpath_build.py: nothing that ties the object to this CPU
COMPILE_ARGS = ["-O2", "-std=gnu11", "-fno-strict-aliasing", "-pthread"]

_MOD: Any = None


def _module() -> Any:
    """The compiled model (built once per source version, then imported from the cache)."""
    global _MOD
    if _MOD is not None:
        return _MOD
    from cffi import FFI

    text = HEADER.read_text()
    m = re.search(r"/\* ---- cdef begin ---- \*/\n(.*?)/\* ---- cdef end ---- \*/", text, re.S)
    assert m is not None, "fake_nvme_dev.h: no cdef section"
    digest = hashlib.sha256(SOURCE.read_bytes() + text.encode()
                            + sys.version.encode()).hexdigest()[:16]
    name = f"_bt_fake_nvme_{digest}"
    cache = Path(tempfile.gettempdir()) / f"bt-fake-nvme-{os.getuid()}"
    cache.mkdir(exist_ok=True)
    so = cache / (name + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if not so.exists():
        ffi = FFI()
        ffi.cdef(m.group(1))
        ffi.set_source(name, '#include "fake_nvme_dev.h"', sources=[str(SOURCE)],
                       include_dirs=[str(HERE)], extra_compile_args=COMPILE_ARGS,
                       libraries=["pthread"])
        # built apart, then renamed in: a concurrent build never leaves a half file
        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        built = Path(ffi.compile(tmpdir=str(tmp)))
        os.replace(built, so)
        shutil.rmtree(tmp, ignore_errors=True)  # (the C and object files cffi left)
    spec = importlib.util.spec_from_file_location(name, so)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _MOD = mod
    return mod


class DeviceIommu(FakeIommu):
    """FakeIommu that also tells the C models attached to it of every mapping."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[CNvme] = []

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        super().map_dma(vaddr, iova, size)
        for d in self.devices:
            d._map(iova, vaddr, size)

    def unmap_dma(self, iova: int, size: int) -> None:
        for d in self.devices:
            d._unmap(iova)
        super().unmap_dma(iova, size)


class CNvme(MemBarNvme):
    """MemBarNvme whose I/O queues the C model serves from its own thread.

    ``spin_us``: the thread spins that long after its last command, then sleeps
    ``sleep_us`` at a time (a device has its own silicon; this one shares the host's
    cores, so it naps when idle). ``latency_us``: a fixed latency per doorbell's worth
    of commands (0: as fast as the copy). ``start`` False: no thread; service() runs a
    pass from the caller's thread.

    ``sync``: no thread; the commands complete at their doorbell write, on the writer's
    thread: the controller's queue pairs get the model's entry point as their doorbell
    hook (sq_doorbell_hook, bt_nvme.h's db_hook), Python's doorbell writes call it too.
    The target's C poller then reaps a batch in the call that submitted it, as an SSD
    done within its sweep; the model's CPU inside those calls is counted (sync_cpu_ns)
    for a benchmark to subtract."""

    def __init__(self, iommu: DeviceIommu, *, spin_us: int = 200, sleep_us: int = 10,
                 latency_us: int = 0, start: bool = True, sync: bool = False,
                 **kw: Any) -> None:
        if not isinstance(iommu, DeviceIommu):
            raise TypeError("CNvme needs a DeviceIommu (its mappings are told to C)")
        super().__init__(iommu, thread=False, **kw)
        mod = _module()
        self._ffi, self._lib = mod.ffi, mod.lib
        ffi, lib = self._ffi, self._lib
        d = lib.fdev_new(ffi.cast("uint32_t *", self._bar_addr), spin_us * 1000,
                         sleep_us * 1000, latency_us * 1000)
        if d == ffi.NULL:
            raise MemoryError("fake NVMe device")
        self._dev = d
        # the thread stops before the memory it reads (the BAR, the namespaces) goes
        weakref.finalize(self, lib.fdev_free, d)
        self._mem: dict[int, Any] = {}
        for nsid in list(self.storage):
            mem = ffi.new("unsigned char[]", self.blocks * self.bs)
            self._mem[nsid] = mem
            self.storage[nsid] = ffi.buffer(mem)  # type: ignore[assignment]
            if lib.fdev_set_ns(d, nsid, mem, self.blocks, self.bs):
                raise ValueError(f"fake NVMe device: namespace {nsid} out of its range")
        iommu.devices.append(self)
        for iova, (vaddr, size) in iommu.maps.items():
            self._map(iova, vaddr, size)
        self.running = False
        self.sync = sync
        if start and not sync:
            self.start()

    # ---- the C model ----
    def start(self) -> None:
        if self.sync:
            return  # (nothing to run: the doorbells drive it)
        r = self._lib.fdev_start(self._dev)
        if r:
            raise OSError(-r, "fake NVMe device thread")
        self.running = True

    def stop(self) -> None:
        self._lib.fdev_stop(self._dev)
        self.running = False

    def cpu_ns(self) -> int:
        """CPU time of the device's thread(s) so far (not the reactor's)."""
        return int(self._lib.fdev_thread_cpu_ns(self._dev))

    def sync_cpu_ns(self) -> int:
        """CPU time the synchronous device spent in the callers' threads so far."""
        return self.stats()["sync_cpu_ns"]

    def sq_doorbell_hook(self) -> tuple[int, int] | None:
        """(entry point, context) addresses for a queue pair's doorbell hook, or None
        (a device with a thread: it watches the doorbells itself)."""
        if not self.sync:
            return None
        ffi = self._ffi
        fn = ffi.addressof(self._lib, "fdev_doorbell")
        return int(ffi.cast("uintptr_t", fn)), int(ffi.cast("uintptr_t", self._dev))

    def stats(self) -> dict[str, int]:
        st = self._ffi.new("struct fdev_stats *")
        self._lib.fdev_stats(self._dev, st)
        return {k: int(getattr(st, k)) for k in dir(st)}

    def _map(self, iova: int, vaddr: int, size: int) -> None:
        if self._lib.fdev_map(self._dev, iova, self._ffi.cast("unsigned char *", vaddr), size):
            raise RuntimeError("fake NVMe device: too many IOMMU mappings")

    def _unmap(self, iova: int) -> None:
        self._lib.fdev_unmap(self._dev, iova)

    # ---- what the Python model does differently ----
    def service(self) -> None:
        """Have every command rung so far completed (bench/hotpath.py, between the
        loop's turns, untimed: the device's time left out): the thread, when it runs,
        is waited for; else a pass runs from the caller's thread."""
        if self.removed:
            return
        if not self.running:
            self._lib.fdev_service(self._dev)
            return
        deadline = time.monotonic() + 10
        while not self._lib.fdev_idle(self._dev):
            if time.monotonic() > deadline:
                raise TimeoutError("the C device did not catch up in 10 s")

    def write32(self, off: int, value: int) -> None:
        if off >= regs.DOORBELL_BASE + 2 * self.stride and not self.removed:
            self.bar[off // 4] = value  # an I/O queue's doorbell: the C model's
            if self.sync:
                self._lib.fdev_doorbell(self._dev)
            return
        super().write32(off, value)

    def _set_cc(self, value: int) -> None:
        was = self.cc & 1
        super()._set_cc(value)
        if was and not value & 1:
            self._lib.fdev_reset(self._dev)

    def _admin(self, raw: bytes) -> tuple[int, int]:
        status, dw0 = super()._admin(raw)
        op = raw[0]
        qid = int.from_bytes(raw[40:42], "little")
        size = int.from_bytes(raw[42:44], "little") + 1
        prp1 = int.from_bytes(raw[24:32], "little")
        if status == 0 and op == 0x05:  # Create I/O CQ
            r = self._lib.fdev_add_cq(self._dev, qid, prp1, size)
            iv = self.cqs[qid]["iv"]
            if r == 0 and iv >= 0:  # (IEN: its vector's eventfd fires after each pass)
                r = self._lib.fdev_set_cq_irq(self._dev, qid, self.irq_efds[iv])
        elif status == 0 and op == 0x01:  # Create I/O SQ
            r = self._lib.fdev_add_sq(self._dev, qid, prp1, size,
                                      int.from_bytes(raw[46:48], "little"))
        elif op in (0x00, 0x04):  # Delete I/O SQ / CQ
            self._lib.fdev_del_q(self._dev, qid, op == 0x04)
            r = 0
        else:
            r = 0
        if r:
            raise RuntimeError(f"fake NVMe device: queue {qid} not taken ({r})")
        return status, dw0
