"""Our initiator's DH-HMAC-CHAP against SPDK's nvmf_tgt, an independent implementation
of the target side (its keyring, nvmf_subsystem_add_host with dhchap keys): uni- and
bidirectional authentication with verified I/O, the strongest pair SPDK picks from
what we offer (SHA-512, ffdhe8192), and wrong keys refused both ways. SPDK is an
optional tool (project rule; $SPDK_TOOLS, .tools/spdk or PATH, see bench/spdk_tools.py):
skipped, saying why, when nvmf_tgt is not available, in CI too.
Budget: ~5 s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktarget.host import connect
from blocktarget.host.auth import AuthenticationError, HostSecrets, authenticate
from blocktarget.host.connection import QueuePair
from blocktarget.host.controller import default_hostid
from blocktarget.nvme import spec, structs
from blocktarget.nvme.auth import DhchapKey, Reason

from .spdk_target import RESTRICTED_NQN, Layout, SpdkTarget, SpdkUnavailable, free_port

pytestmark = [pytest.mark.timeout(120), pytest.mark.spdk]

HOST_UNI = "nqn.2014-08.org.nvmexpress:uuid:22222222-0000-4000-8000-000000000001"
HOST_BI = "nqn.2014-08.org.nvmexpress:uuid:22222222-0000-4000-8000-000000000002"


@pytest.fixture(scope="module")
def spdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SpdkTarget, dict[str, str]]]:
    try:
        t = SpdkTarget(Layout(free_port())).start()
    except SpdkUnavailable as exc:
        pytest.skip(str(exc))
    d: Path = tmp_path_factory.mktemp("spdkkeys")
    keys = {"k_uni": DhchapKey.generate(1).encode(), "k_bi": DhchapKey.generate(0).encode(),
            "c_bi": DhchapKey.generate(2).encode()}
    try:
        for name, text in keys.items():
            p = d / name
            p.write_text(text)
            os.chmod(p, 0o600)
            t.rpc("keyring_file_add_key", name=name, path=str(p))
        t.rpc("nvmf_subsystem_add_host", nqn=RESTRICTED_NQN, host=HOST_UNI, dhchap_key="k_uni")
        t.rpc("nvmf_subsystem_add_host", nqn=RESTRICTED_NQN, host=HOST_BI, dhchap_key="k_bi",
              dhchap_ctrlr_key="c_bi")
        yield t, keys
    finally:
        t.stop()


async def _io(ctrl) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(64 * 512)
    await ctrl.write(1, 128, data)
    assert bytes(await ctrl.read(1, 128, 64)) == data


async def test_unidirectional_vs_spdk(spdk: tuple[SpdkTarget, dict[str, str]]) -> None:
    t, keys = spdk
    async with await connect(t.addr, t.port, RESTRICTED_NQN, hostnqn=HOST_UNI,
                             dhchap_secret=keys["k_uni"]) as ctrl:
        await _io(ctrl)


async def test_bidirectional_vs_spdk(spdk: tuple[SpdkTarget, dict[str, str]]) -> None:
    t, keys = spdk
    async with await connect(t.addr, t.port, RESTRICTED_NQN, hostnqn=HOST_BI, nr_io_queues=2,
                             dhchap_secret=keys["k_bi"], dhchap_ctrl_secret=keys["c_bi"]) as ctrl:
        await _io(ctrl)
    # one transaction on a fresh queue pair, to see what SPDK chose
    qp = await QueuePair.open(t.addr, t.port, qid=0, depth=31, timeout=10)
    try:
        data = structs.build_connect_data(default_hostid(HOST_BI), spec.CNTLID_DYNAMIC,
                                          RESTRICTED_NQN, HOST_BI)
        r = await qp.submit(spec.FABRICS_OPCODE, spec.FabricsType.CONNECT,
                            cdw10=spec.CONNECT_RECFMT, cdw11=31, data_out=data, timeout=10)
        assert r.completion.status == 0 and r.completion.dw0 & spec.CONNECT_AUTHREQ_ATR
        h = await authenticate(qp, HostSecrets.parse(keys["k_bi"], keys["c_bi"]),
                               hostnqn=HOST_BI, subnqn=RESTRICTED_NQN, timeout=10)
        assert (h.digest, h.dhgroup) == (3, 5)  # SPDK: strongest pair -> sha512, ffdhe8192
    finally:
        qp.close()


async def test_wrong_keys_vs_spdk(spdk: tuple[SpdkTarget, dict[str, str]]) -> None:
    t, keys = spdk
    with pytest.raises(AuthenticationError) as exc:
        await connect(t.addr, t.port, RESTRICTED_NQN, hostnqn=HOST_UNI,
                      dhchap_secret=DhchapKey.generate(1).encode())
    assert exc.value.reason == Reason.FAILED
    with pytest.raises(AuthenticationError) as exc:
        await connect(t.addr, t.port, RESTRICTED_NQN, hostnqn=HOST_BI,
                      dhchap_secret=keys["k_bi"],
                      dhchap_ctrl_secret=DhchapKey.generate(2).encode())
    assert exc.value.reason == Reason.FAILED
