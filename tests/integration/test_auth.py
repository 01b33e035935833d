"""DH-HMAC-CHAP against a real `blocktarget start` process: the keyring and host-key
RPCs, Connect's AUTHREQ, the gate before authentication (exact statuses on raw queues),
uni- and bidirectional authentication with verified I/O through our initiator,
restricted digests/groups, wrong secrets refused, re-authentication with rotated keys
while I/O runs, the authentication timeout, save_config round trip, and the
connect/perf CLI with --dhchap-secret. Secrets must never show in logs, RPC output or
saved configs. Budget: ~25 s (two target processes).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktarget.host import connect
from blocktarget.host.auth import AuthenticationError, HostSecrets, authenticate
from blocktarget.nvme import spec
from blocktarget.nvme.auth import (
    SECP_DHCHAP,
    DhchapKey,
    HostAuth,
    MsgId,
    Reason,
)
from blocktarget.nvme.structs import build_auth_sqe
from blocktarget.rpc_client import RpcCallError

from .nvme_target_util import (
    CS,
    HOSTID,
    NQN,
    G,
    RawQueue,
    Tgt,
    open_queue,
    random_data,
    sct_sc,
    start_target,
)
from .target_proc import Launcher, free_port, listen_address, malloc, run_cli

pytestmark = pytest.mark.timeout(120)

HOST_UNI = "nqn.2014-08.org.nvmexpress:uuid:6a1c1b7e-2f4d-4c8e-9a3b-0c2d4e6f8a10"  # raw queues
HOST_BI = "nqn.2014-08.org.nvmexpress:uuid:11111111-0000-4000-8000-000000000001"
HOST_ROT = "nqn.2014-08.org.nvmexpress:uuid:11111111-0000-4000-8000-000000000002"
HOST_NOKEY = "nqn.2014-08.org.nvmexpress:uuid:11111111-0000-4000-8000-000000000003"
AUTH_REQUIRED = (CS, spec.FabricsStatus.AUTH_REQUIRED)


class Keys:
    """Key files (0600) in a private directory, and their text for the host side."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.text: dict[str, str] = {}

    def make(self, name: str, hash_id: int = 1, mode: int = 0o600) -> str:
        text = DhchapKey.generate(hash_id).encode()
        path = self.dir / f"{name}.key"
        path.write_text(text + "\n")
        os.chmod(path, mode)
        self.text[name] = text
        return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tgt, Keys]]:
    launcher = Launcher()
    keys = Keys(tmp_path_factory.mktemp("keys"))
    try:
        t = start_target(launcher, allow_any_host=False)
        for name, h in (("key_uni", 1), ("key_bi", 2), ("ckey_bi", 3), ("key_rot", 0)):
            t.rpc("keyring_file_add_key", name=name, path=keys.make(name, h))
        t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=HOST_UNI, dhchap_key="key_uni")
        t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=HOST_BI, dhchap_key="key_bi",
              dhchap_ctrlr_key="ckey_bi")
        t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=HOST_ROT, dhchap_key="key_rot")
        t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=HOST_NOKEY)
        yield t, keys
    finally:
        launcher.cleanup()


def assert_no_secrets(text: str, keys: Keys) -> None:
    for name, k in keys.text.items():
        b64 = k.split(":")[2]
        assert b64 not in text and b64[:16] not in text, f"secret of {name} leaked"


# ---------------------------------------------------------------- configuration


def test_keyring_rpcs(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    listed = t.rpc("keyring_get_keys")
    by_name = {k["name"]: k for k in listed}
    assert by_name["key_bi"]["path"].endswith("key_bi.key")
    assert by_name["key_bi"]["refcnt"] == 2 and by_name["key_bi"]["module"] == "keyring_file"
    assert_no_secrets(json.dumps(listed), keys)
    assert_no_secrets(json.dumps(t.rpc("nvmf_get_subsystems")), keys)

    def refused(path: str, code: int, match: str, name: str = "bad") -> None:
        with pytest.raises(RpcCallError) as exc:
            t.rpc("keyring_file_add_key", name=name, path=path)
        assert exc.value.code == code and match in exc.value.message, exc.value.message

    refused(keys.make("world", mode=0o644), -1, "invalid permissions")
    refused(keys.make("group", mode=0o640), -1, "0640")
    refused("relative.key", -32602, "must be absolute")
    refused(str(keys.dir / "missing.key"), -19, "does not exist")
    refused(str(keys.dir), -32602, "not a regular file")
    refused(keys.make("dup"), -17, "already exists", name="key_uni")
    if os.geteuid() == 0:
        p = keys.make("foreign")
        os.chown(p, 65534, 65534)
        refused(p, -1, "not owned")
    with pytest.raises(RpcCallError) as exc:
        t.rpc("keyring_file_remove_key", name="key_bi")
    assert exc.value.code == -16 and HOST_BI in exc.value.message
    t.rpc("keyring_file_add_key", name="spare", path=keys.make("spare"))
    t.rpc("keyring_file_remove_key", name="spare")
    assert "spare" not in {k["name"] for k in t.rpc("keyring_get_keys")}
    with pytest.raises(RpcCallError) as exc:
        t.rpc("keyring_file_remove_key", name="spare")
    assert exc.value.code == -19


def test_add_host_key_checks(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    host = "nqn.2014-08.org.nvmexpress:uuid:11111111-0000-4000-8000-0000000000ff"
    (keys.dir / "notakey.key").write_text("hello\n")
    os.chmod(keys.dir / "notakey.key", 0o600)
    t.rpc("keyring_file_add_key", name="notakey", path=str(keys.dir / "notakey.key"))
    cases = [({"dhchap_key": "nosuch"}, -19, "not in the keyring"),
             ({"dhchap_key": "notakey"}, -32602, "not a DH-HMAC-CHAP key"),
             ({"dhchap_ctrlr_key": "ckey_bi"}, -32602, "requires 'dhchap_key'")]
    for params, code, match in cases:
        with pytest.raises(RpcCallError) as exc:
            t.rpc("nvmf_subsystem_add_host", nqn=NQN, host=host, **params)
        assert exc.value.code == code and match in exc.value.message
    assert host not in {h["nqn"] for h in t.rpc("nvmf_get_subsystems", nqn=NQN)[0]["hosts"]}
    with pytest.raises(RpcCallError) as exc:
        t.rpc("nvmf_set_config", dhchap_digests=["md5"])
    assert "unknown digest" in exc.value.message
    with pytest.raises(RpcCallError) as exc:
        t.rpc("nvmf_subsystem_set_keys", nqn=NQN, host=host, dhchap_key="key_uni")
    assert exc.value.code == -19


# ---------------------------------------------------------------- the gate, raw


async def _raw_send(q: RawQueue, msg: bytes, *, secp: int = SECP_DHCHAP,
                    tl: int | None = None, r2t: bool = False) -> tuple[int, int]:
    """Authentication Send with the message in the capsule, or fetched by R2T."""
    sqe = build_auth_sqe(spec.FabricsType.AUTH_SEND, q.cid(), secp, 1, 1,
                         len(msg) if tl is None else tl, sgl_len=len(msg),
                         sgl_id=spec.SGL_ID_TRANSPORT if r2t else spec.SGL_ID_INCAPSULE)
    r = await (q.run(sqe, data_out=msg) if r2t else q.run(sqe, msg))
    assert r.cqe is not None
    return sct_sc(r.cqe)


async def _raw_recv(q: RawQueue, al: int = 4096) -> tuple[tuple[int, int], bytes]:
    sqe = build_auth_sqe(spec.FabricsType.AUTH_RECV, q.cid(), SECP_DHCHAP, 1, 1, al,
                         sgl_len=al, sgl_id=spec.SGL_ID_TRANSPORT)
    r = await q.run(sqe)
    assert r.cqe is not None
    return sct_sc(r.cqe), r.data or b""


async def test_gate_and_exact_statuses(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    key = DhchapKey.parse(keys.text["key_uni"])
    q = await open_queue(t.addr, t.port)
    try:
        cqe = await q.connect(0, NQN, hostnqn=HOST_UNI)
        assert cqe.status == 0 and cqe.dw0 & spec.CONNECT_AUTHREQ_ATR
        # nothing but Authentication Send/Receive before authentication
        assert sct_sc(await q.property_get(spec.Property.CAP, 8)) == AUTH_REQUIRED
        r = await q.admin(spec.AdminOpcode.IDENTIFY, in_len=4096, cdw10=1)
        assert r.status == AUTH_REQUIRED
        assert r.cqe is not None and spec.status_dnr(r.cqe.status)
        # command-level checks: wrong SECP, TL 0, TL != data length -> NVMe status
        h = HostAuth(hostnqn=HOST_UNI, subnqn=NQN, host_key=key)
        neg = h.negotiate()
        assert await _raw_send(q, neg, secp=0xEA) == (G, spec.GenericStatus.INVALID_FIELD)
        assert await _raw_send(q, neg, tl=0) == (G, spec.GenericStatus.INVALID_FIELD)
        assert await _raw_send(q, neg, tl=len(neg) - 1) == (
            G, spec.GenericStatus.DATA_SGL_LENGTH_INVALID)
        # a full transaction by hand, then the queue works
        assert await _raw_send(q, neg) == (0, 0)
        st, ch = await _raw_recv(q)
        assert st == (0, 0) and ch[1] == MsgId.CHALLENGE
        assert await _raw_send(q, h.reply(ch), r2t=True) == (0, 0)  # data by R2T
        st, s1 = await _raw_recv(q)
        assert st == (0, 0) and h.success1(s1) is None
        assert (await q.property_get(spec.Property.CAP, 8)).status == 0
    finally:
        await q.close()


async def test_protocol_error_gets_failure1_then_close(env: tuple[Tgt, Keys]) -> None:
    t, _ = env
    q = await open_queue(t.addr, t.port)
    try:
        assert (await q.connect(0, NQN, hostnqn=HOST_UNI)).status == 0
        st, msg = await _raw_recv(q)  # Receive before any Negotiate
        assert st == (0, 0) and len(msg) == 4096 and not any(msg[8:])  # zero-filled
        assert msg[0] == 0 and msg[1] == MsgId.FAILURE1 and msg[6] == 1
        assert msg[7] == Reason.INCORRECT_MESSAGE
        assert await q.closed_by_target()
    finally:
        await q.close()


async def test_host_without_key_cannot_authenticate(env: tuple[Tgt, Keys]) -> None:
    t, _ = env
    q = await open_queue(t.addr, t.port)
    try:
        cqe = await q.connect(0, NQN, hostnqn=HOST_NOKEY)
        assert cqe.status == 0 and not cqe.dw0 & spec.CONNECT_AUTHREQ_ATR
        h = HostAuth(hostnqn=HOST_NOKEY, subnqn=NQN, host_key=DhchapKey.generate())
        assert await _raw_send(q, h.negotiate()) == (G, spec.GenericStatus.COMMAND_SEQUENCE_ERROR)
        assert (await q.property_get(spec.Property.CAP, 8)).status == 0
    finally:
        await q.close()


async def test_unauthenticated_queue_times_out(env: tuple[Tgt, Keys]) -> None:
    t, _ = env
    q = await open_queue(t.addr, t.port)
    try:
        assert (await q.connect(0, NQN, hostnqn=HOST_UNI, kato=1000)).status == 0
        assert await q.closed_by_target(timeout=4.0)
    finally:
        await q.close()


# ---------------------------------------------------------------- our initiator


async def _verify_io(ctrl, seed: int, blocks: int = 256) -> None:  # type: ignore[no-untyped-def]
    data = random_data(blocks * 512)
    await ctrl.write(1, seed * blocks, data)
    assert bytes(await ctrl.read(1, seed * blocks, blocks)) == data


async def test_unidirectional_with_io(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    async with await connect(t.addr, t.port, NQN, hostnqn=HOST_UNI, hostid=HOSTID,
                             nr_io_queues=2, dhchap_secret=keys.text["key_uni"]) as ctrl:
        for i in range(4):
            await _verify_io(ctrl, i)


async def test_bidirectional_and_restricted_negotiation(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    secret, ctrl_secret = keys.text["key_bi"], keys.text["ckey_bi"]
    async with await connect(t.addr, t.port, NQN, hostnqn=HOST_BI, nr_io_queues=2,
                             dhchap_secret=secret, dhchap_ctrl_secret=ctrl_secret) as ctrl:
        await _verify_io(ctrl, 10)
        # defaults: the strongest pair both sides offer
        h = await authenticate(ctrl.io_queues[0], HostSecrets.parse(secret, ctrl_secret),
                               hostnqn=HOST_BI, subnqn=NQN, timeout=10)
        assert (h.digest, h.dhgroup) == (3, 5)
        t.rpc("nvmf_set_config", dhchap_digests=["sha256"], dhchap_dhgroups=["ffdhe2048"])
        try:
            h = await authenticate(ctrl.admin_q, HostSecrets.parse(secret, ctrl_secret),
                                   hostnqn=HOST_BI, subnqn=NQN, timeout=10)
            assert (h.digest, h.dhgroup) == (1, 1)
            await _verify_io(ctrl, 11)
        finally:
            t.rpc("nvmf_set_config", dhchap_digests=["sha256", "sha384", "sha512"],
                  dhchap_dhgroups=["null", "ffdhe2048", "ffdhe3072", "ffdhe4096",
                                   "ffdhe6144", "ffdhe8192"])


async def test_wrong_secrets_are_refused(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    with pytest.raises(AuthenticationError) as exc:
        await connect(t.addr, t.port, NQN, hostnqn=HOST_UNI,
                      dhchap_secret=DhchapKey.generate(1).encode())
    assert exc.value.reason == Reason.FAILED
    # the controller does not hold the key we expect it to: our host refuses it
    with pytest.raises(AuthenticationError) as exc:
        await connect(t.addr, t.port, NQN, hostnqn=HOST_BI, dhchap_secret=keys.text["key_bi"],
                      dhchap_ctrl_secret=DhchapKey.generate(1).encode())
    assert exc.value.reason == Reason.FAILED
    # bidirectional asked of a host entry without a controller key
    with pytest.raises(AuthenticationError):
        await connect(t.addr, t.port, NQN, hostnqn=HOST_UNI, dhchap_secret=keys.text["key_uni"],
                      dhchap_ctrl_secret=DhchapKey.generate(1).encode())
    with pytest.raises(AuthenticationError, match="requires DH-HMAC-CHAP"):
        await connect(t.addr, t.port, NQN, hostnqn=HOST_UNI)
    assert_no_secrets(t.proc.log(), keys)


async def test_reauthentication_with_rotated_keys_during_io(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    async with await connect(t.addr, t.port, NQN, hostnqn=HOST_ROT, nr_io_queues=2,
                             dhchap_secret=keys.text["key_rot"]) as ctrl:
        stop = asyncio.Event()
        done = 0

        async def io_loop() -> None:
            nonlocal done
            while not stop.is_set():
                await _verify_io(ctrl, 20 + done % 8, 16)
                done += 1

        io = asyncio.create_task(io_loop())
        await asyncio.sleep(0.1)
        await ctrl.reauthenticate()  # same key
        t.rpc("keyring_file_add_key", name="key_rot2", path=keys.make("key_rot2", 2))
        t.rpc("nvmf_subsystem_set_keys", nqn=NQN, host=HOST_ROT, dhchap_key="key_rot2")
        ctrl.set_dhchap(keys.text["key_rot2"])
        await ctrl.reauthenticate()  # every queue, new key, I/O running
        await asyncio.sleep(0.1)
        stop.set()
        await io
        assert done > 0
        # the old key no longer passes: the queue that tried is closed
        ctrl.set_dhchap(keys.text["key_rot"])
        with pytest.raises(AuthenticationError):
            await authenticate(ctrl.io_queues[1], ctrl.opts.dhchap, hostnqn=HOST_ROT,
                               subnqn=NQN, timeout=10)
        await asyncio.wait_for(ctrl.io_queues[1].wait_closed(), 5)
    # and a fresh connection with the new key works
    async with await connect(t.addr, t.port, NQN, hostnqn=HOST_ROT,
                             dhchap_secret=keys.text["key_rot2"]) as ctrl:
        await _verify_io(ctrl, 30)
    t.rpc("nvmf_subsystem_set_keys", nqn=NQN, host=HOST_ROT, dhchap_key="key_rot")


# ---------------------------------------------------------------- CLI


def test_cli_connect_and_perf_with_secrets(env: tuple[Tgt, Keys]) -> None:
    t, keys = env
    common = ["-a", t.addr, "-s", str(t.port), "-n", NQN]
    r = run_cli("connect", *common, "-q", HOST_BI, "--dhchap-secret", keys.text["key_bi"],
                "--dhchap-ctrl-secret", keys.text["ckey_bi"])
    assert r.returncode == 0, r.stderr
    r = run_cli("perf", *common, "--hostnqn", HOST_UNI, "-S", keys.text["key_uni"],
                "-w", "randrw", "-q", "8", "-t", "1", "--verify", "--json", "--quiet",
                "--size", "4M")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["workload"] == "randrw"
    assert_no_secrets(r.stdout + r.stderr, keys)
    r = run_cli("connect", *common, "-q", HOST_UNI, "-S", DhchapKey.generate(1).encode())
    assert r.returncode == 1 and "authentication refused" in r.stderr
    r = run_cli("connect", *common, "-q", HOST_UNI, "-S", "DHHC-1:00:bogus:")
    assert r.returncode == 1 and "DH-HMAC-CHAP key" in r.stderr


# ---------------------------------------------------------------- save_config


async def test_save_config_round_trip(running_target: Launcher, tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    port = free_port()
    doc = {"subsystems": [
        {"subsystem": "keyring", "config": [
            {"method": "keyring_file_add_key", "params": {"name": "k1", "path": keys.make("k1")}},
            {"method": "keyring_file_add_key", "params": {"name": "c1", "path": keys.make("c1")}},
        ]},
        {"subsystem": "bdev", "config": [malloc("M0", 8192, 512)]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_set_config", "params": {"dhchap_digests": ["sha384"],
                                                     "dhchap_dhgroups": ["ffdhe3072"]}},
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                                                           "namespace": {"bdev_name": "M0"}}},
            {"method": "nvmf_subsystem_add_host", "params": {
                "nqn": NQN, "host": HOST_BI, "dhchap_key": "k1", "dhchap_ctrlr_key": "c1"}},
            {"method": "nvmf_subsystem_add_listener", "params": {
                "nqn": NQN, "listen_address": listen_address(port)}},
        ]},
    ]}
    first = running_target(doc)
    saved = first.rpc("save_config")
    text = json.dumps(saved)
    assert_no_secrets(text, keys)
    sections = [s["subsystem"] for s in saved["subsystems"]]
    assert sections.index("keyring") < sections.index("nvmf")
    keyring = next(s for s in saved["subsystems"] if s["subsystem"] == "keyring")["config"]
    assert [c["params"]["name"] for c in keyring] == ["k1", "c1"]
    nvmf = next(s for s in saved["subsystems"] if s["subsystem"] == "nvmf")["config"]
    assert nvmf[0] == {"method": "nvmf_set_config", "params": {
        "dhchap_digests": ["sha384"], "dhchap_dhgroups": ["ffdhe3072"]}}
    host = next(c for c in nvmf if c["method"] == "nvmf_subsystem_add_host")
    assert host["params"]["dhchap_key"] == "k1" and host["params"]["dhchap_ctrlr_key"] == "c1"
    first.stop()
    saved.pop("blocktarget", None)
    second = running_target(saved)
    assert second.rpc("save_config")["subsystems"] == saved["subsystems"]
    secrets = HostSecrets.parse(keys.text["k1"], keys.text["c1"])
    async with await connect("127.0.0.1", port, NQN, hostnqn=HOST_BI,
                             dhchap_secret=keys.text["k1"],
                             dhchap_ctrl_secret=keys.text["c1"]) as ctrl:
        await _verify_io(ctrl, 1)
        h = await authenticate(ctrl.admin_q, secrets, hostnqn=HOST_BI, subnqn=NQN, timeout=10)
        assert (h.digest, h.dhgroup) == (2, 2)  # the restriction survived the restart

