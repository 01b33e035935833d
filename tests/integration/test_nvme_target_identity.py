"""Identity that hosts see and keep: model "blocktarget" unless configured, firmware
revision = package version, serial from the config, and namespace UUID/NGUID/EUI-64
that survive a restart - from the config when it gives them, and from save_config's
output when it did not (the saved config records the generated ones).
"""

from __future__ import annotations

from typing import Any

import pytest

from blocktarget import __version__
from blocktarget.host import connect
from blocktarget.nvme import spec

from .nvme_target_util import NQN, nvmf_target_config
from .target_proc import Launcher, RunningTarget, free_port, malloc

pytestmark = pytest.mark.timeout(90)

NS1 = {"bdev_name": "Malloc0", "nsid": 1, "uuid": "5f1d8c2e-7a44-4e0b-9b6e-2c1f0a9d8e77",
       "nguid": "F0E1D2C3B4A5968778695A4B3C2D1E0F", "eui64": "A1B2C3D4E5F60718"}


async def identity(port: int) -> dict[str, Any]:
    c = await connect("127.0.0.1", port, NQN, timeout=10)
    try:
        idc = c.id_ctrl
        out: dict[str, Any] = {k: idc[k] for k in ("sn", "mn", "fr", "ieee", "subnqn", "ver",
                                                  "cntrltype", "mdts", "ioccsz", "nn")}
        for nsid in (1, 2):
            ns = await c.identify_ns(nsid)
            out[f"ns{nsid}"] = (ns["nguid"], ns["eui64"], sorted(await c.ns_descriptors(nsid)))
        return out
    finally:
        await c.disconnect()


async def test_identity_stable_across_restarts() -> None:
    port = free_port()
    cfg = nvmf_target_config(port, serial="BTIDENT0001",
                             bdevs=[malloc("Malloc0", 2048, 512), malloc("Malloc1", 2048, 512)],
                             ns=[NS1, {"bdev_name": "Malloc1", "nsid": 2}])
    launcher = Launcher()
    try:
        first: RunningTarget = launcher(cfg)
        a = await identity(port)
        saved = first.rpc("save_config")
        assert first.stop() == 0

        assert a["mn"] == "blocktarget" and a["sn"] == "BTIDENT0001"
        assert a["fr"] == __version__[:8] and a["subnqn"] == NQN
        assert a["cntrltype"] == spec.CtrlType.IO
        descs1 = dict(a["ns1"][2])
        assert descs1[spec.NidType.NGUID] == bytes.fromhex(NS1["nguid"])
        assert descs1[spec.NidType.EUI64] == bytes.fromhex(NS1["eui64"])
        assert a["ns1"][0] == bytes.fromhex(NS1["nguid"])

        # The same config again: everything the config names is the same.
        second = launcher(cfg)
        b = await identity(port)
        assert second.stop() == 0
        assert {k: v for k, v in b.items() if k != "ns2"} == \
            {k: v for k, v in a.items() if k != "ns2"}

        # The saved config: even the generated ids of namespace 2 come back.
        saved.pop("blocktarget", None)  # fresh RPC addresses for the new process
        third = launcher(saved)
        c = await identity(port)
        assert third.stop() == 0
        assert c == a
    finally:
        launcher.cleanup()


async def test_model_number_from_config() -> None:
    port = free_port()
    launcher = Launcher()
    try:
        launcher(nvmf_target_config(port, model="Acme Block 9000"))
        c = await connect("127.0.0.1", port, NQN, timeout=10)
        try:
            assert c.id_ctrl["mn"] == "Acme Block 9000"
            assert c.id_ctrl["fr"] == __version__[:8]
        finally:
            await c.disconnect()
    finally:
        launcher.cleanup()
