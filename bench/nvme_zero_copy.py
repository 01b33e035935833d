"""Zero-copy vs copying data path between NVMe/TCP and the nvme (PCIe) bdev, host side.

One process: a target with one reactor exports a namespace of the fake PCIe NVMe
controller from tests/unit/test_nvme_driver.py (its "device" reads and writes our DMA
memory through a fake IOMMU, in Python), and the project's initiator runs 128 KiB reads
and writes at QD8 with data digests over 127.0.0.1. Each round runs both data paths:
zero-copy (the default: R2T data received into the queue's DMA buffers, large H2CData
payloads by the kernel itself, C2H sent from them), "no-direct-rx" (lent buffers, but
the payload copied in from the received ``bytes``: ``qpair.DIRECT_RX_MIN`` out of reach)
and copying (lending switched off, ``lend_cap = 0``, the path used before). Write cells
also print how many payload bytes the kernel received straight into DMA memory and how
many were copied into it (``rx_direct_bytes``/``rx_copied_bytes``).

What this measures is CPU per I/O of the whole process (target + initiator + fake
device), so the difference between the rows is the copies saved, diluted by everything
else; no real device time is in it. Alternate rounds to see the noise of a shared host.

    .venv/bin/python bench/nvme_zero_copy.py [--time 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_nvme_driver import FakeIommu, FakeNvme  # noqa: E402

from blocktarget.app import Target  # noqa: E402
from blocktarget.bdevs import nvme_pcie  # noqa: E402
from blocktarget.config import Settings  # noqa: E402
from blocktarget.host.controller import connect  # noqa: E402
from blocktarget.nvme import qpair  # noqa: E402
from blocktarget.nvme.driver.ctrlr import Controller  # noqa: E402
from blocktarget.nvme.driver.dma import DmaAllocator  # noqa: E402
from blocktarget.rpc import call_method  # noqa: E402

NQN = "nqn.2026-01.io.blocktarget.bench:zerocopy"
IO_BYTES = 128 * 1024
QD = 8


async def _setup() -> tuple[Target, int]:
    t = Target(Settings(cores=sorted(os.sched_getaffinity(0))[:1], rpc_http=None,
                        rpc_unix=None, metrics=False, pin=False))
    await t.start()
    iommu = FakeIommu()
    alloc = DmaAllocator(iommu, name="bench", use_hugepages=False)
    dev = FakeNvme(iommu, blocks=16384)
    c = Controller(dev, alloc, name="Zb")
    c.init(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await nvme_pcie.register_controller(t, "Zb", "0000:00:09.0", c,
                                        {"name": "Zb", "traddr": "0000:00:09.0"})
    for method, params in (
        ("nvmf_create_transport", {"trtype": "TCP"}),
        ("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": True}),
        ("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "Zbn1"}}),
        ("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": {
            "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}}),
    ):
        await call_method(t, method, params)
    return t, port


async def main(seconds: float, rounds: int) -> None:
    t, port = await _setup()
    ctrl = await connect("127.0.0.1", port, NQN, nr_io_queues=1, ddgst=True)
    data = os.urandom(IO_BYTES)
    nlb = IO_BYTES // 512
    await ctrl.write(1, 0, data)
    pc = nvme_pcie.get_controller("Zb")
    direct_min = qpair.DIRECT_RX_MIN
    print(f"{'round':>5} {'path':12} {'op':5} {'IOPS':>7} {'MiB/s':>7} {'CPU us/IO':>10}"
          f"  rx direct/copied bytes")
    for rnd in range(1, rounds + 1):
        for mode in ("zero-copy", "no-direct-rx", "copy"):
            for rq in pc.queues.values():
                rq.lend_cap = 0 if mode == "copy" else max(1, rq.q.pool.max_count // 2)
            qpair.DIRECT_RX_MIN = direct_min if mode == "zero-copy" else 1 << 62
            for kind in ("read", "write"):
                c0 = pc.data_path_counters()
                n = 0
                t0 = time.perf_counter()
                cpu0 = time.process_time()

                async def worker(kind: str = kind, t0: float = t0) -> None:
                    nonlocal n
                    while time.perf_counter() - t0 < seconds:
                        if kind == "read":
                            await ctrl.read(1, 0, nlb)
                        else:
                            await ctrl.write(1, nlb, data)
                        n += 1

                await asyncio.gather(*[worker() for _ in range(QD)])
                el = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                c1 = pc.data_path_counters()
                rx = (f"  {c1['rx_direct_bytes'] - c0['rx_direct_bytes']}/"
                      f"{c1['rx_copied_bytes'] - c0['rx_copied_bytes']}"
                      if kind == "write" else "")
                print(f"{rnd:>5} {mode:12} {kind:5} {n / el:7.0f} "
                      f"{n * IO_BYTES / el / 2**20:7.1f} {cpu / n * 1e6:10.0f}{rx}")
    qpair.DIRECT_RX_MIN = direct_min
    print("data path counters:", pc.data_path_counters())
    print(f"load average: {os.getloadavg()}")
    await ctrl.disconnect()
    await t.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=float, default=2.0, help="seconds per cell")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(args.time, args.rounds))
