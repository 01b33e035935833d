"""DH-HMAC-CHAP engine (blocktarget.nvme.auth): key format, transforms, responses,
message layouts, both state machines and every failure reason.

Known answers come from outside the engine: the FFDHE primes are re-derived from RFC
7919's formula, the key transforms are the values nvme-cli 2.3 prints for a given secret
(`nvme gen-dhchap-key -s <hex> -m <hash> -n <nqn>` outputs the transformed key), and the
response vectors are computed here straight from the spec's concatenation, written out
independently of the engine. Budget: < 3 s.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import struct
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktarget.nvme import ffdhe
from blocktarget.nvme.auth import (
    FAILURE_SIZE,
    NEGOTIATE_SIZE,
    AuthFailure,
    AuthRejected,
    ControllerAuth,
    DhchapKey,
    DhchapOptions,
    DhExchange,
    DhGroup,
    HashId,
    HostAuth,
    MsgId,
    Reason,
    Step,
    augmented_challenge,
    ctrl_response,
    host_response,
)

pytestmark = pytest.mark.timeout(60)

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f8e5f2c-3c2a-4b7e-9d7c-4f1b2a3c4d5e"
SUBNQN = "nqn.2026-01.io.blocktarget:auth"

# nvme-cli 2.3: gen-dhchap-key -s <bytes(range(n)).hex()> -m <h> -l <n> -n HOSTNQN
NVME_CLI_TRANSFORMED = {
    1: "DHHC-1:01:M3oLLAUKWDF6deOIrdj3PLswwLL2EO3Gv5bZ08m6dk1Atn6M:",
    2: "DHHC-1:02:SNnc5fEzi4yixsrLdjaBN3MdB5QnelF2QebjJRqYJJbLC41v5whLSgdW3HcX1BN1j3cxCw==:",
    3: "DHHC-1:03:LAY3AJ6qbl9HG0CmkTHH2oDUNXTKVhnaN25tZh8h4I6MPJVnLgL6zXyXSxqSjo2/MaBzGmTD9mBw"
       "bgDHyr651qA04zg=:",
}
# nvme-cli 2.3: gen-dhchap-key -s 000102..1f -m 0 (untransformed: the secret itself)
NVME_CLI_PLAIN = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"


# ---------------------------------------------------------------------------- primes


def _floor_2n_e(n: int) -> int:
    """floor(2^n * e) from the series sum 1/k!, with 64 guard bits."""
    acc, term, k = 0, 1 << (n + 64), 0
    while term:
        acc += term
        k += 1
        term //= k
    return acc >> 64


@pytest.mark.parametrize("bits", sorted(ffdhe.PRIMES))
def test_ffdhe_primes_are_rfc7919(bits: int) -> None:
    x = ffdhe.RFC7919_X[bits]
    p = (1 << bits) - (1 << (bits - 64)) + ((_floor_2n_e(bits - 130) + x) << 64) - 1
    assert ffdhe.PRIMES[bits] == p
    assert p.bit_length() == bits


# ---------------------------------------------------------------------------- keys


def test_plain_key_from_nvme_cli() -> None:
    key = DhchapKey.parse(NVME_CLI_PLAIN)
    assert key.secret == bytes(range(32)) and key.hash_id == 0
    assert key.encode() == NVME_CLI_PLAIN
    assert key.transform(HOSTNQN) == key.secret  # 00: used as is


@pytest.mark.parametrize("hash_id", [1, 2, 3])
def test_transform_matches_nvme_cli(hash_id: int) -> None:
    n = 16 + 16 * hash_id
    key = DhchapKey(bytes(range(n)), hash_id)
    expect = DhchapKey.parse(NVME_CLI_TRANSFORMED[hash_id]).secret
    assert key.transform(HOSTNQN) == expect
    assert key.transform(SUBNQN) != expect  # bound to the NQN


@pytest.mark.parametrize("hash_id,length", [(0, 32), (0, 48), (0, 64), (1, 32), (2, 48),
                                            (3, 64), (1, 64)])
def test_encode_parse_roundtrip(hash_id: int, length: int) -> None:
    key = DhchapKey.generate(hash_id, length)
    text = key.encode()
    assert text.startswith(f"DHHC-1:{hash_id:02d}:") and text.endswith(":")
    assert DhchapKey.parse(text) == key
    assert DhchapKey.parse(text[:-1] + "\n") == key  # trailing colon optional, whitespace


def _with_crc(secret: bytes) -> str:
    return base64.b64encode(secret + zlib.crc32(secret).to_bytes(4, "little")).decode()


@pytest.mark.parametrize("text,why", [
    ("", "not a DH-HMAC-CHAP key"),
    ("DHHC-2:00:" + _with_crc(bytes(32)) + ":", "not a DH-HMAC-CHAP key"),
    ("DHHC-1:04:" + _with_crc(bytes(32)) + ":", "hash indicator"),
    ("DHHC-1:1:" + _with_crc(bytes(32)) + ":", "hash indicator"),
    ("DHHC-1:00:" + _with_crc(bytes(31)) + ":", "32, 48 or 64 bytes"),
    ("DHHC-1:00:" + _with_crc(bytes(65)) + ":", "32, 48 or 64 bytes"),
    ("DHHC-1:00:!!!!" + _with_crc(bytes(32)) + ":", "not base64"),
    ("DHHC-1:00:" + base64.b64encode(bytes(36)).decode() + ":", "CRC-32"),
    ("DHHC-1:00:" + _with_crc(bytes(32)) + ":extra:", "not a DH-HMAC-CHAP key"),
])
def test_parse_errors_name_the_problem_not_the_key(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as exc:
        DhchapKey.parse(text)
    b64 = text.split(":")[2] if text.count(":") >= 2 else ""
    assert not b64 or b64 not in str(exc.value)


def test_repr_never_shows_the_secret() -> None:
    key = DhchapKey.generate(1)
    for s in (repr(key), str(key), f"{key}", repr([key])):
        assert key.secret.hex() not in s and key.encode()[10:20] not in s
        assert "32 bytes" in s


@pytest.fixture(scope="module")
def nvme_cli() -> str:
    path = shutil.which("nvme") or ("/usr/sbin/nvme" if os.path.exists("/usr/sbin/nvme") else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvme-cli is missing (Debian package 'nvme-cli')")
        pytest.skip("nvme-cli not installed")
    return path


@pytest.mark.parametrize("hash_id", [0, 1, 2, 3])
def test_nvme_cli_accepts_our_keys_and_we_accept_its(nvme_cli: str, hash_id: int) -> None:
    ours = DhchapKey.generate(hash_id).encode()
    r = subprocess.run([nvme_cli, "check-dhchap-key", "-k", ours], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0 and "Key is valid" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([nvme_cli, "gen-dhchap-key", "-m", str(hash_id), "-n", HOSTNQN],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0
    assert DhchapKey.parse(r.stdout).hash_id == hash_id
    damaged = ours[:12] + ("A" if ours[12] != "A" else "B") + ours[13:]
    r = subprocess.run([nvme_cli, "check-dhchap-key", "-k", damaged], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode != 0
    with pytest.raises(ValueError):
        DhchapKey.parse(damaged)


# ---------------------------------------------------------------------------- responses


def _spec_response(hash_name: str, key: bytes, chal: bytes, seq: int, tid: int,
                   role: bytes, a: str, b: str) -> bytes:
    """The spec's concatenation, spelled out field by field (no shared code)."""
    m = hmac.new(key, digestmod=hash_name)
    m.update(chal)
    m.update(seq.to_bytes(4, "little"))
    m.update(tid.to_bytes(2, "little"))
    m.update(b"\x00")  # SC_C: no secure channel concatenation
    m.update(role)
    m.update(a.encode())
    m.update(b"\x00")
    m.update(b.encode())
    return m.digest()


@pytest.mark.parametrize("hash_id,name", [(1, "sha256"), (2, "sha384"), (3, "sha512")])
def test_response_known_answers(hash_id: int, name: str) -> None:
    hk = DhchapKey(bytes(range(32)), 1)
    ck = DhchapKey(bytes(range(100, 148)), 2)
    hl = {1: 32, 2: 48, 3: 64}[hash_id]
    c1, c2 = bytes([0xA5]) * hl, bytes([0x5A]) * hl
    k_host = hmac.new(hk.secret, HOSTNQN.encode() + b"NVMe-over-Fabrics", "sha256").digest()
    k_ctrl = hmac.new(ck.secret, SUBNQN.encode() + b"NVMe-over-Fabrics", "sha384").digest()
    r1 = host_response(hk, hash_id, c1, 0x01020304, 0xBEEF, HOSTNQN, SUBNQN)
    assert r1 == _spec_response(name, k_host, c1, 0x01020304, 0xBEEF, b"HostHost",
                                HOSTNQN, SUBNQN)
    r2 = ctrl_response(ck, hash_id, c2, 7, 0xBEEF, HOSTNQN, SUBNQN)
    assert r2 == _spec_response(name, k_ctrl, c2, 7, 0xBEEF, b"Controller", SUBNQN, HOSTNQN)
    # with a DH session key the challenge is first augmented: HMAC(H(g^xy), C)
    sess = bytes(range(256))
    aug = hmac.new(hashlib.new(name, sess).digest(), c1, name).digest()
    assert augmented_challenge(hash_id, sess, c1) == aug
    assert host_response(hk, hash_id, c1, 9, 1, HOSTNQN, SUBNQN, sess) == _spec_response(
        name, k_host, aug, 9, 1, b"HostHost", HOSTNQN, SUBNQN)


@pytest.mark.parametrize("group", [DhGroup.FFDHE2048, DhGroup.FFDHE3072])
def test_dh_exchange_agrees_and_rejects_bad_values(group: DhGroup) -> None:
    a, b = DhExchange(group), DhExchange(group)
    size = {DhGroup.FFDHE2048: 256, DhGroup.FFDHE3072: 384}[group]
    assert len(a.public) == size
    s = a.shared(b.public)
    assert s == b.shared(a.public) and len(s) == size
    p = ffdhe.PRIMES[size * 8]
    assert pow(2, 1, p) != int.from_bytes(a.public, "big")  # not a trivial exponent
    for bad in (1, p - 1, p, 0):
        with pytest.raises(AuthFailure) as exc:
            a.shared(bad.to_bytes(size, "big"))
        assert exc.value.reason == Reason.FAILED
    with pytest.raises(AuthFailure) as exc:
        a.shared(b.public[1:])
    assert exc.value.reason == Reason.INCORRECT_PAYLOAD


# ---------------------------------------------------------------------------- transactions


def _pair(host_key: DhchapKey, ctrl_key: DhchapKey | None, *, target_host_key=None,
          target_ctrl_key=None, options=None, digests=(1, 2, 3), dhgroups=(0, 1, 2, 3, 4, 5)):
    h = HostAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=host_key, ctrl_key=ctrl_key,
                 digests=digests, dhgroups=dhgroups)
    c = ControllerAuth(hostnqn=HOSTNQN, subnqn=SUBNQN,
                       host_key=target_host_key or host_key,
                       ctrl_key=target_ctrl_key if target_ctrl_key is not None else ctrl_key,
                       options=options)
    return h, c


def _run(h: HostAuth, c: ControllerAuth) -> None:
    c.send(h.negotiate())
    c.send(h.reply(c.receive(4096)))
    s2 = h.success1(c.receive(4096))
    if s2 is not None:
        c.send(s2)


@pytest.mark.parametrize("group", [0, 1, 5])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_transaction_succeeds(group: int, bidirectional: bool) -> None:
    hk = DhchapKey.generate(1)
    ck = DhchapKey.generate(3) if bidirectional else None
    h, c = _pair(hk, ck, dhgroups=[group])
    _run(h, c)
    assert c.step is Step.DONE and c.done and c.bidirectional is bidirectional
    assert (c.digest, c.dhgroup) == (HashId.SHA512, group)  # strongest offered


def test_negotiation_follows_the_allowed_set() -> None:
    hk = DhchapKey.generate(0)
    opts = DhchapOptions(digests=[1], dhgroups=[2])
    h, c = _pair(hk, None, options=opts)
    _run(h, c)
    assert c.done and (c.digest, c.dhgroup) == (1, 2)
    assert (h.digest, h.dhgroup) == (1, 2)


def test_message_layouts() -> None:
    """Offsets as in Linux include/linux/nvme.h (struct nvmf_auth_dhchap_*)."""
    h, c = _pair(DhchapKey.generate(1), DhchapKey.generate(1), dhgroups=[1])
    neg = h.negotiate()
    assert len(neg) == NEGOTIATE_SIZE == 8 + 64
    assert neg[0:2] == b"\x00\x00" and neg[6] == 0 and neg[7] == 1  # sc_c, napd
    assert neg[8] == 1 and neg[10] == 3 and neg[11] == 1  # authid, halen, dhlen
    assert neg[12:15] == b"\x01\x02\x03" and neg[12 + 30] == 1
    assert struct.unpack_from("<H", neg, 4)[0] == h.tid
    c.send(neg)
    ch = c.receive(4096)
    assert ch[0:2] == b"\x01\x01" and ch[6] == 64 and ch[8] == 3 and ch[9] == 1
    assert struct.unpack_from("<H", ch, 10)[0] == 256 and len(ch) == 16 + 64 + 256
    assert struct.unpack_from("<I", ch, 12)[0] != 0  # seqnum
    rep = h.reply(ch)
    assert rep[0:2] == b"\x01\x02" and rep[6] == 64 and rep[8] == 1  # hl, cvalid
    assert struct.unpack_from("<H", rep, 10)[0] == 256 and len(rep) == 16 + 128 + 256
    c.send(rep)
    s1 = c.receive(4096)
    assert s1[0:2] == b"\x01\x03" and s1[6] == 64 and s1[8] == 1 and len(s1) == 16 + 64
    s2 = h.success1(s1)
    assert s2 is not None and s2[0:2] == b"\x01\x04" and len(s2) == 16


def _failure_of(c: ControllerAuth) -> int:
    msg = c.receive(4096)
    assert len(msg) == FAILURE_SIZE and msg[0] == 0 and msg[1] == MsgId.FAILURE1
    assert msg[6] == 1  # reason code: authentication failed
    assert c.failed
    return msg[7]


def test_wrong_host_key_is_refused() -> None:
    h, c = _pair(DhchapKey.generate(1), None, target_host_key=DhchapKey.generate(1),
                 dhgroups=[1])
    c.send(h.negotiate())
    c.send(h.reply(c.receive(4096)))
    assert c.step is Step.REPLY and c.job is not None  # the check needs the DH secret
    c.run_job()
    assert c.step is Step.FAILURE1 and c.job is None
    msg = c.receive(4096)
    assert msg[7] == Reason.FAILED and c.failed
    with pytest.raises(AuthRejected) as exc:
        h.success1(msg)
    assert exc.value.reason == Reason.FAILED


def test_wrong_controller_key_is_detected_by_the_host() -> None:
    hk = DhchapKey.generate(1)
    h, c = _pair(hk, DhchapKey.generate(1), target_ctrl_key=DhchapKey.generate(1))
    c.send(h.negotiate())
    c.send(h.reply(c.receive(4096)))
    with pytest.raises(AuthFailure) as exc:
        h.success1(c.receive(4096))
    assert exc.value.reason == Reason.FAILED
    c.send(h.failure2(exc.value.reason))
    assert c.failed and "rejected" in c.why


def test_bidirectional_request_without_controller_key() -> None:
    hk = DhchapKey.generate(1)
    h = HostAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=hk, ctrl_key=DhchapKey.generate(1))
    c = ControllerAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=hk, ctrl_key=None)
    c.send(h.negotiate())
    c.send(h.reply(c.receive(4096)))
    assert _failure_of(c) == Reason.FAILED


def _negotiate(halen_ids: bytes = b"\x01", dh_ids: bytes = b"\x00", *, sc_c: int = 0,
               napd: int = 1, authid: int = 1, tid: int = 5, halen: int | None = None) -> bytes:
    hdr = struct.pack("<BBHHBB", 0, 0, 0, tid, sc_c, napd)
    desc = struct.pack("<BBBB30s30s", authid, 0, len(halen_ids) if halen is None else halen,
                       len(dh_ids), halen_ids, dh_ids)
    return hdr + desc * napd


@pytest.mark.parametrize("msg,reason", [
    (_negotiate(b"\x07"), Reason.HASH_UNUSABLE),
    (_negotiate(dh_ids=b"\x09"), Reason.DHGROUP_UNUSABLE),
    (_negotiate(sc_c=1), Reason.CONCAT_MISMATCH),
    (_negotiate(authid=2), Reason.PROTOCOL_UNUSABLE),
    (_negotiate(halen=31), Reason.INCORRECT_PAYLOAD),
    (_negotiate()[:40], Reason.INCORRECT_PAYLOAD),
    (_negotiate(napd=0), Reason.INCORRECT_PAYLOAD),
    (b"\x00", Reason.INCORRECT_PAYLOAD),
    (b"\x01\x02" + bytes(70), Reason.INCORRECT_MESSAGE),  # a Reply first
    (b"\x02\x00" + bytes(70), Reason.INCORRECT_MESSAGE),  # unknown auth type
])
def test_negotiate_failures(msg: bytes, reason: Reason) -> None:
    c = ControllerAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=DhchapKey.generate(0),
                       ctrl_key=None, options=DhchapOptions(digests=[1], dhgroups=[0, 1]))
    c.send(msg)
    assert c.step is Step.FAILURE1
    assert _failure_of(c) == reason


def _reply_case(mutate) -> int:  # type: ignore[no-untyped-def]
    hk = DhchapKey.generate(1)
    h, c = _pair(hk, None, dhgroups=[1])
    c.send(h.negotiate())
    rep = bytearray(h.reply(c.receive(4096)))
    c.send(bytes(mutate(rep)))
    return _failure_of(c)


def test_reply_failures() -> None:
    def tid(m: bytearray) -> bytearray:
        m[4] ^= 0xFF
        return m

    def hl(m: bytearray) -> bytearray:
        m[6] = 32
        return m

    def short(m: bytearray) -> bytearray:
        return m[:-1]

    def cvalid_no_seq(m: bytearray) -> bytearray:
        m[8] = 1
        return m

    def bad_dh(m: bytearray) -> bytearray:
        m[16 + 128:] = (1).to_bytes(256, "big")
        return m

    def flip_response(m: bytearray) -> bytearray:
        m[16] ^= 1
        return m

    assert _reply_case(tid) == Reason.INCORRECT_PAYLOAD
    assert _reply_case(hl) == Reason.INCORRECT_PAYLOAD
    assert _reply_case(short) == Reason.INCORRECT_PAYLOAD
    assert _reply_case(cvalid_no_seq) == Reason.INCORRECT_PAYLOAD
    assert _reply_case(bad_dh) == Reason.FAILED
    assert _reply_case(flip_response) == Reason.FAILED


def test_receive_out_of_order_and_small_buffer() -> None:
    c = ControllerAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=DhchapKey.generate(0),
                       ctrl_key=None)
    assert _failure_of(c) == Reason.INCORRECT_MESSAGE  # Receive before Negotiate
    h, c = _pair(DhchapKey.generate(0), None, dhgroups=[5])
    c.send(h.negotiate())
    msg = c.receive(16 + 64 + 1023)  # ffdhe8192 challenge needs 1104 bytes
    assert msg[1] == MsgId.FAILURE1 and msg[7] == Reason.INCORRECT_PAYLOAD and c.failed


def test_success2_and_failure2_only_when_expected() -> None:
    hk = DhchapKey.generate(0)
    h, c = _pair(hk, None, dhgroups=[0])
    c.send(h.negotiate())
    c.send(h.failure2(Reason.FAILED))  # nothing to reject yet
    assert _failure_of(c) == Reason.INCORRECT_MESSAGE


def test_host_refuses_a_group_it_did_not_offer() -> None:
    hk = DhchapKey.generate(0)
    c = ControllerAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=hk, ctrl_key=None)
    c.send(_negotiate(b"\x01", b"\x01", tid=9))
    ch = c.receive(4096)
    h = HostAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=hk, dhgroups=[0], tid=9)
    with pytest.raises(AuthFailure) as exc:
        h.reply(ch)
    assert exc.value.reason == Reason.DHGROUP_UNUSABLE


def test_options_parse_names() -> None:
    assert DhchapOptions.parse_digests(["sha512", "sha256"]) == [1, 3]
    assert DhchapOptions.parse_dhgroups(["null", "ffdhe8192"]) == [0, 5]
    with pytest.raises(ValueError, match="unknown digest"):
        DhchapOptions.parse_digests(["md5"])
    with pytest.raises(ValueError, match="at least one"):
        DhchapOptions.parse_dhgroups([])
    d = DhchapOptions(digests=[1], dhgroups=[0, 2]).describe()
    assert d == {"dhchap_digests": ["sha256"], "dhchap_dhgroups": ["null", "ffdhe3072"]}
    assert DhchapOptions().is_default() and not DhchapOptions(digests=[1]).is_default()


# ---------------------------------------------------------------------------- hostile input

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=200),
                          st.builds(lambda t, i, rest: bytes([t, i]) + rest,
                                    st.sampled_from([0, 1, 2]),
                                    st.sampled_from([0, 1, 2, 3, 4, 0xF0, 0xF1, 0x55]),
                                    st.binary(max_size=120))),
                min_size=1, max_size=4),
       st.integers(min_value=0, max_value=5000))
def test_controller_survives_any_message_sequence(msgs: list[bytes], al: int) -> None:
    """Whatever a host sends, the engine never raises, never authenticates, and answers
    a Receive with a well-formed message no longer than the host's buffer allows."""
    c = ControllerAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=DhchapKey(bytes(32), 1),
                       ctrl_key=None, options=DhchapOptions(dhgroups=[0]))
    for m in msgs:
        c.send(m)
        assert not c.done
    out = c.receive(al)
    assert out[0] in (0, 1) and not c.done
    if out[1] == MsgId.FAILURE1:
        assert len(out) == FAILURE_SIZE and c.failed and out[7] in set(Reason)
    else:  # a challenge: only after a valid Negotiate
        assert out[1] == MsgId.CHALLENGE and len(out) <= al


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=100))
def test_host_survives_any_controller_message(challenge: bytes, success1: bytes) -> None:
    """A hostile controller can only make our host raise AuthFailure/AuthRejected."""
    h = HostAuth(hostnqn=HOSTNQN, subnqn=SUBNQN, host_key=DhchapKey(bytes(32), 0),
                 ctrl_key=DhchapKey(bytes(32), 0), dhgroups=[0], tid=0)
    try:
        h.reply(b"\x01\x01\x00\x00\x00\x00" + challenge)
    except (AuthFailure, AuthRejected):
        pass
    try:
        h.success1(b"\x01\x03\x00\x00\x00\x00" + success1)
    except (AuthFailure, AuthRejected):
        pass
    else:
        raise AssertionError("a success1 without the right response was accepted")
