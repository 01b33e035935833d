"""DH-HMAC-CHAP in-band authentication (NVMe base spec 2.x 8.3.4, TP 8006), sans-I/O.

Bytes of Authentication Send go in, bytes for Authentication Receive come out; no
sockets, no queues, no clocks. The target (`ControllerAuth`) and our initiator
(`HostAuth`) share the key format, the message codec and the response formulas, so a
change to one side is tested against the other.

The pieces, in the order a transaction uses them:

- `DhchapKey`: the `DHHC-1:hh:<base64(secret || crc32)>:` text `nvme gen-dhchap-key`
  prints. ``hh`` names the hash that *transforms* the secret before use
  (HMAC(secret, NQN || "NVMe-over-Fabrics")), 00 = use as is. The transform binds a
  key to one NQN, so a leaked transformed key is useless for another host.
- messages: AUTH_Negotiate (host offers hash functions and DH groups), Challenge
  (controller picks, sends C1, a sequence number and its DH public value), Reply (host
  response R1, optional challenge C2 for the controller, its DH value), Success1
  (optional controller response R2), Success2 (host accepts R2), Failure1/Failure2.
- responses: R = HMAC(K', C || seqnum || t_id || sc_c || role || nqn || 0 || nqn');
  with a DH group, C is first augmented to HMAC(H(g^xy mod p), C), so the exchange
  also proves both ends hold the same fresh session secret.

Secrets never appear in a repr, an exception text or a log line.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import itertools
import os
import secrets
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import dh as _crypto_dh

from . import ffdhe

# ---------------------------------------------------------------------------
# identifiers
# ---------------------------------------------------------------------------

SECP_DHCHAP = 0xE9  # the NVMe security protocol of Authentication Send/Receive
SPSP0 = 0x01
SPSP1 = 0x01
AUTH_ID_DHCHAP = 0x01  # protocol descriptor id in AUTH_Negotiate
MAX_IDS = 30  # hash ids and DH group ids per descriptor


class HashId(enum.IntEnum):
    SHA256 = 1
    SHA384 = 2
    SHA512 = 3


class DhGroup(enum.IntEnum):
    NULL = 0
    FFDHE2048 = 1
    FFDHE3072 = 2
    FFDHE4096 = 3
    FFDHE6144 = 4
    FFDHE8192 = 5


HASH_NAME = {HashId.SHA256: "sha256", HashId.SHA384: "sha384", HashId.SHA512: "sha512"}
HASH_LEN = {HashId.SHA256: 32, HashId.SHA384: 48, HashId.SHA512: 64}
DHGROUP_NAME = {g: g.name.lower() for g in DhGroup}
DHGROUP_BITS = {DhGroup.FFDHE2048: 2048, DhGroup.FFDHE3072: 3072, DhGroup.FFDHE4096: 4096,
                DhGroup.FFDHE6144: 6144, DhGroup.FFDHE8192: 8192}
DIGEST_BY_NAME = {v: k for k, v in HASH_NAME.items()}
DHGROUP_BY_NAME = {v: k for k, v in DHGROUP_NAME.items()}


class AuthType(enum.IntEnum):
    COMMON = 0x00
    DHCHAP = 0x01


class MsgId(enum.IntEnum):
    NEGOTIATE = 0x00
    CHALLENGE = 0x01
    REPLY = 0x02
    SUCCESS1 = 0x03
    SUCCESS2 = 0x04
    FAILURE2 = 0xF0
    FAILURE1 = 0xF1


RC_FAILED = 0x01  # the only reason code; the explanation says why


class Reason(enum.IntEnum):
    """Reason code explanations of AUTH_Failure1/2."""

    FAILED = 0x01
    PROTOCOL_UNUSABLE = 0x02
    CONCAT_MISMATCH = 0x03
    HASH_UNUSABLE = 0x04
    DHGROUP_UNUSABLE = 0x05
    INCORRECT_PAYLOAD = 0x06
    INCORRECT_MESSAGE = 0x07


class AuthFailure(Exception):
    """A transaction ends; ``reason`` goes into the Failure message."""

    def __init__(self, reason: Reason, why: str) -> None:
        super().__init__(why)
        self.reason = Reason(reason)


class AuthRejected(Exception):
    """The peer sent a Failure message (host side: the controller refused us)."""

    def __init__(self, reason: int) -> None:
        try:
            name = Reason(reason).name
        except ValueError:
            name = f"0x{reason:02x}"
        super().__init__(f"authentication refused by the peer: {name}")
        self.reason = reason


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------

KEY_PREFIX = "DHHC-1"
KEY_LENGTHS = (32, 48, 64)


@dataclass(frozen=True, repr=False)
class DhchapKey:
    """A DH-HMAC-CHAP secret. ``hash_id`` 0 means the secret is used untransformed."""

    secret: bytes = field(compare=True)
    hash_id: int = 0

    def __repr__(self) -> str:  # never the secret
        return f"DhchapKey(hash={self.hash_id:02d}, {len(self.secret)} bytes)"

    __str__ = __repr__

    @classmethod
    def parse(cls, text: str) -> DhchapKey:
        """Parse ``DHHC-1:hh:<base64>:``; the error names what is wrong, not the key.

        Like the Linux host, the secret may be 32, 48 or 64 bytes whatever ``hh`` is,
        and the trailing colon is optional; the CRC-32 trailer must match."""
        text = text.strip()
        parts = text.split(":")
        if len(parts) == 4 and parts[3] == "":
            parts = parts[:3]
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            raise ValueError("not a DH-HMAC-CHAP key (expected DHHC-1:hh:<base64>:)")
        tag, b64 = parts[1], parts[2]
        if len(tag) != 2 or not tag.isdigit() or int(tag) > 3:
            raise ValueError("DH-HMAC-CHAP key: hash indicator must be 00, 01, 02 or 03")
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ValueError("DH-HMAC-CHAP key: the key part is not base64") from None
        if len(raw) - 4 not in KEY_LENGTHS:
            raise ValueError("DH-HMAC-CHAP key: secret must be 32, 48 or 64 bytes "
                             f"(got {max(len(raw) - 4, 0)})")
        secret, crc = raw[:-4], raw[-4:]
        if zlib.crc32(secret) != int.from_bytes(crc, "little"):
            raise ValueError("DH-HMAC-CHAP key: CRC-32 check failed (key damaged?)")
        return cls(secret, int(tag))

    def encode(self) -> str:
        crc = zlib.crc32(self.secret).to_bytes(4, "little")
        return f"{KEY_PREFIX}:{self.hash_id:02d}:{base64.b64encode(self.secret + crc).decode()}:"

    @classmethod
    def generate(cls, hash_id: int = 0, length: int | None = None) -> DhchapKey:
        """A fresh random key (as `nvme gen-dhchap-key`): length follows the hash."""
        if length is None:
            length = HASH_LEN[HashId(hash_id)] if hash_id else 32
        if length not in KEY_LENGTHS:
            raise ValueError("key length must be 32, 48 or 64")
        return cls(secrets.token_bytes(length), hash_id)

    def transform(self, nqn: str) -> bytes:
        """The key actually used for HMAC: bound to the NQN of its owner."""
        if self.hash_id == 0:
            return self.secret
        name = HASH_NAME[HashId(self.hash_id)]
        return hmac.new(self.secret, nqn.encode() + b"NVMe-over-Fabrics", name).digest()


# ---------------------------------------------------------------------------
# response formulas
# ---------------------------------------------------------------------------


def augmented_challenge(hash_id: int, session_key: bytes, challenge: bytes) -> bytes:
    """C' = HMAC(H(session key), C): ties the response to the DH exchange."""
    name = HASH_NAME[HashId(hash_id)]
    return hmac.new(hashlib.new(name, session_key).digest(), challenge, name).digest()


def chap_response(hash_id: int, key: bytes, challenge: bytes, seqnum: int, tid: int,
                  sc_c: int, role: bytes, nqn_a: str, nqn_b: str,
                  session_key: bytes | None = None) -> bytes:
    """HMAC(K', C || seqnum(le32) || t_id(le16) || sc_c || role || nqn_a || 0 || nqn_b).

    Host response: role "HostHost", nqn_a = host NQN, nqn_b = subsystem NQN, K' = host
    key transformed with the host NQN. Controller response: role "Controller", the NQNs
    swapped, K' = controller key transformed with the subsystem NQN."""
    name = HASH_NAME[HashId(hash_id)]
    if session_key:
        challenge = augmented_challenge(hash_id, session_key, challenge)
    msg = b"".join((challenge, struct.pack("<IHB", seqnum, tid, sc_c), role,
                    nqn_a.encode(), b"\0", nqn_b.encode()))
    return hmac.new(key, msg, name).digest()


def host_response(key: DhchapKey, hash_id: int, challenge: bytes, seqnum: int, tid: int,
                  hostnqn: str, subnqn: str, session_key: bytes | None = None) -> bytes:
    return chap_response(hash_id, key.transform(hostnqn), challenge, seqnum, tid, 0,
                         b"HostHost", hostnqn, subnqn, session_key)


def ctrl_response(key: DhchapKey, hash_id: int, challenge: bytes, seqnum: int, tid: int,
                  hostnqn: str, subnqn: str, session_key: bytes | None = None) -> bytes:
    return chap_response(hash_id, key.transform(subnqn), challenge, seqnum, tid, 0,
                         b"Controller", subnqn, hostnqn, session_key)


# ---------------------------------------------------------------------------
# Diffie-Hellman (cryptography's FFDH over the RFC 7919 primes)
# ---------------------------------------------------------------------------


# cryptography >= 45 warns, each time DH numbers are built, that FFDH may be dropped one
# day. DH-HMAC-CHAP is defined over FFDHE, so the warning says nothing to an operator;
# it is silenced by an exact-message filter (not catch_warnings, which swaps the
# process-wide filter list and is unsafe with several reactor threads).
_FFDH_WARNING = r"Diffie-Hellman over finite fields \(FFDH\) is deprecated"


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=_FFDH_WARNING)  # idempotent


_PARAMS: dict[int, _crypto_dh.DHParameters] = {}


def _parameters(group: int) -> _crypto_dh.DHParameters:
    p = _PARAMS.get(group)
    if p is None:
        _quiet()
        p = _crypto_dh.DHParameterNumbers(
            ffdhe.PRIMES[DHGROUP_BITS[DhGroup(group)]], ffdhe.GENERATOR).parameters()
        _PARAMS[group] = p
    return p


# The two modular exponentiations below are the whole cost of a DH transaction (about
# 8 ms each for ffdhe8192 on a current x86 core, several times that on slower ones) and
# `cryptography` holds the GIL through them. They are pure functions of picklable
# arguments so the target can run them in a worker process (nvme/dh_workers.py) while
# its reactor goes on serving I/O; the host side and the sans-I/O engine call them
# directly.


def dh_keypair(group: int) -> tuple[int, bytes]:
    """A fresh ephemeral key of ``group``: (private exponent, public value g^x mod p as
    big-endian bytes of the prime's length)."""
    key = _parameters(group).generate_private_key()
    nums = key.private_numbers()
    size = DHGROUP_BITS[DhGroup(group)] // 8
    return nums.x, nums.public_numbers.y.to_bytes(size, "big")


def dh_shared(group: int, private: int, public: bytes, peer: bytes) -> bytes:
    """g^xy mod p from our key (``private``, ``public``) and the peer's value, as many
    bytes as the prime. The peer value must have passed `DhExchange.check_peer`."""
    _quiet()
    pn = _parameters(group).parameter_numbers()
    ours = _crypto_dh.DHPrivateNumbers(
        private, _crypto_dh.DHPublicNumbers(int.from_bytes(public, "big"), pn)).private_key()
    theirs = _crypto_dh.DHPublicNumbers(int.from_bytes(peer, "big"), pn).public_key()
    return ours.exchange(theirs).rjust(len(public), b"\0")


class DhExchange:
    """One side's ephemeral DH key for one transaction. ``keypair``: one `dh_keypair`
    made elsewhere (a worker process); without it the key is made here."""

    def __init__(self, group: int, keypair: tuple[int, bytes] | None = None) -> None:
        self.group = DhGroup(group)
        self.size = DHGROUP_BITS[self.group] // 8
        self.prime = ffdhe.PRIMES[DHGROUP_BITS[self.group]]
        self._x, self.public = keypair if keypair is not None else dh_keypair(self.group)

    def __repr__(self) -> str:  # never the private exponent
        return f"DhExchange({self.group.name.lower()})"

    def check_peer(self, peer: bytes) -> None:
        """A peer value of the wrong length, or outside 2..p-2 (which would force a
        known secret), is refused."""
        if len(peer) != self.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD,
                              f"DH value of {len(peer)} bytes for {self.group.name.lower()}")
        y = int.from_bytes(peer, "big")
        if not 1 < y < self.prime - 1:
            raise AuthFailure(Reason.FAILED, "peer DH value out of range")

    def shared_args(self, peer: bytes) -> tuple[int, int, bytes, bytes]:
        """`dh_shared`'s arguments for ``peer`` (checked first)."""
        self.check_peer(peer)
        return int(self.group), self._x, self.public, bytes(peer)

    def shared(self, peer: bytes) -> bytes:
        """g^xy mod p, as many bytes as the prime, computed here."""
        return dh_shared(*self.shared_args(peer))


@dataclass(repr=False)
class DhJob:
    """A modular exponentiation a transaction needs before it can go on. ``fn(*args)``
    is pure and picklable, so whoever drives the engine may run it anywhere (the
    target: a worker process) and hand the result back with `ControllerAuth.job_done`;
    ``then`` applies it. The args hold the private exponent: no repr."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    then: Callable[[Any], None]

    def __repr__(self) -> str:
        return f"DhJob({getattr(self.fn, '__name__', '?')})"


# ---------------------------------------------------------------------------
# message codec
# ---------------------------------------------------------------------------

_HDR = struct.Struct("<BBHH")  # auth_type, auth_id, rsvd, t_id
_NEGOTIATE = struct.Struct("<BBHHBB")  # + sc_c, napd
_DESCRIPTOR = struct.Struct("<BBBB30s30s")  # authid, rsvd, halen, dhlen, hash ids, dh ids
_CHALLENGE = struct.Struct("<BBHHBxBBHI")  # hl, hashid, dhgid, dhvlen, seqnum
_REPLY = struct.Struct("<BBHHBxBxHI")  # hl, cvalid, dhvlen, seqnum
_SUCCESS1 = struct.Struct("<BBHHBxB7x")  # hl, rvalid
_SUCCESS2 = struct.Struct("<BBHH10x")
_FAILURE = struct.Struct("<BBHHBB")  # rescode, rescode_exp
NEGOTIATE_SIZE = _NEGOTIATE.size + _DESCRIPTOR.size
SUCCESS2_SIZE = _SUCCESS2.size
FAILURE_SIZE = _FAILURE.size


def header(msg: bytes) -> tuple[int, int, int]:
    """(auth_type, auth_id, t_id) of any message."""
    if len(msg) < _HDR.size:
        raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"message of {len(msg)} bytes")
    t, i, _, tid = _HDR.unpack_from(msg)
    return t, i, tid


def encode_negotiate(tid: int, digests: Iterable[int], dhgroups: Iterable[int]) -> bytes:
    h, d = bytes(digests), bytes(dhgroups)
    return (_NEGOTIATE.pack(AuthType.COMMON, MsgId.NEGOTIATE, 0, tid, 0, 1)
            + _DESCRIPTOR.pack(AUTH_ID_DHCHAP, 0, len(h), len(d), h, d))


def encode_failure(msg_id: int, tid: int, reason: int) -> bytes:
    return _FAILURE.pack(AuthType.COMMON, msg_id, 0, tid, RC_FAILED, reason)


def encode_success2(tid: int) -> bytes:
    return _SUCCESS2.pack(AuthType.DHCHAP, MsgId.SUCCESS2, 0, tid)


# ---------------------------------------------------------------------------
# options (what the target allows; nvmf_set_config dhchap_digests / dhchap_dhgroups)
# ---------------------------------------------------------------------------


def _parse_names(names: Iterable[str], table: dict[str, int], what: str,
                 choices: str) -> list[int]:
    """Configured names -> sorted unique ids; an unknown or empty list is an error."""
    out = []
    for n in names:
        if n not in table:
            raise ValueError(f"unknown {what} {n!r} ({choices})")
        out.append(int(table[n]))
    if not out:
        raise ValueError(f"at least one {what} is required")
    return sorted(set(out))


@dataclass
class DhchapOptions:
    """Allowed hash functions and DH groups. Default: all of them, as SPDK; the
    negotiation picks the strongest pair the host also offers."""

    digests: list[int] = field(default_factory=lambda: [int(h) for h in HashId])
    dhgroups: list[int] = field(default_factory=lambda: [int(g) for g in DhGroup])

    @staticmethod
    def parse_digests(names: Iterable[str]) -> list[int]:
        return _parse_names(names, DIGEST_BY_NAME, "digest", "sha256, sha384, sha512")

    @staticmethod
    def parse_dhgroups(names: Iterable[str]) -> list[int]:
        return _parse_names(names, DHGROUP_BY_NAME, "dhgroup", "null, ffdhe2048 ... ffdhe8192")

    def describe(self) -> dict[str, list[str]]:
        return {"dhchap_digests": [HASH_NAME[HashId(h)] for h in self.digests],
                "dhchap_dhgroups": [DHGROUP_NAME[DhGroup(g)] for g in self.dhgroups]}

    def is_default(self) -> bool:
        return self == DhchapOptions()


# ---------------------------------------------------------------------------
# sequence numbers: one counter per process, random start, never 0 (0 means "no
# bidirectional authentication" in a Reply)
# ---------------------------------------------------------------------------

_SEQ = itertools.count(secrets.randbits(31) + 1)


def next_seqnum() -> int:
    while True:
        s = next(_SEQ) & 0xFFFFFFFF
        if s:
            return s


# ---------------------------------------------------------------------------
# the controller's side of one transaction
# ---------------------------------------------------------------------------


class Step(enum.Enum):
    NEGOTIATE = "negotiate"
    CHALLENGE = "challenge"  # next Receive returns the Challenge
    REPLY = "reply"
    SUCCESS1 = "success1"  # next Receive returns Success1
    SUCCESS2 = "success2"
    FAILURE1 = "failure1"  # next Receive returns Failure1
    DONE = "done"
    FAILED = "failed"


_STRONGEST_DIGESTS = (HashId.SHA512, HashId.SHA384, HashId.SHA256)
_STRONGEST_GROUPS = (DhGroup.FFDHE8192, DhGroup.FFDHE6144, DhGroup.FFDHE4096,
                     DhGroup.FFDHE3072, DhGroup.FFDHE2048, DhGroup.NULL)


class ControllerAuth:
    """One DH-HMAC-CHAP transaction on one queue, target side.

    `send` takes an Authentication Send payload, `receive` makes the Authentication
    Receive payload. Protocol errors never fail the NVMe command: they move the
    transaction to FAILURE1 and the next Receive tells the host why (as Linux nvmet and
    SPDK do). ``done``/``failed`` say when the transaction is over.

    With a DH group the transaction needs two modular exponentiations, the costly part
    (~8 ms of GIL-held CPU each for ffdhe8192 here): our key pair once Negotiate has chosen
    the group, the session secret once the Reply brought the host's value. Each is left
    in ``job`` (a `DhJob`) for the caller to run where it likes and report with
    `job_done`/`job_failed` before the next `send`/`receive`; a caller that does not
    (tests, a target with no DH workers) gets it computed inline by that next call."""

    def __init__(self, *, hostnqn: str, subnqn: str, host_key: DhchapKey,
                 ctrl_key: DhchapKey | None, options: DhchapOptions | None = None,
                 seqnum: Callable[[], int] = next_seqnum,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self.hostnqn = hostnqn
        self.subnqn = subnqn
        self._host_key = host_key
        self._ctrl_key = ctrl_key
        self.options = options or DhchapOptions()
        self._seqnum = seqnum
        self._random = random
        self.step = Step.NEGOTIATE
        self.tid = 0
        self.digest = 0
        self.dhgroup = -1
        self.reason: Reason | None = None
        self.why = ""
        self.bidirectional = False
        self._c1 = b""
        self._s1 = 0
        self._dh: DhExchange | None = None
        self._r2 = b""
        self.job: DhJob | None = None

    @property
    def done(self) -> bool:
        return self.step is Step.DONE

    @property
    def failed(self) -> bool:
        return self.step is Step.FAILED

    def _fail(self, reason: Reason, why: str) -> None:
        self.step = Step.FAILURE1
        self.reason = reason
        self.why = why

    # ---- DH jobs ----
    def job_done(self, result: Any) -> None:
        """The result of ``job`` (computed wherever the caller ran it)."""
        job, self.job = self.job, None
        if job is None:
            return
        try:
            job.then(result)
        except AuthFailure as exc:
            self._fail(exc.reason, str(exc))

    def job_failed(self, why: str) -> None:
        """``job`` could not be computed: the transaction fails (the host may retry)."""
        self.job = None
        self._dh = None
        self._fail(Reason.FAILED, why)

    def run_job(self) -> None:
        """Compute ``job`` here and now."""
        job = self.job
        if job is None:
            return
        try:
            result = job.fn(*job.args)
        except Exception as exc:  # (cryptography refusing a value: the host's doing)
            self.job_failed(f"DH computation failed: {type(exc).__name__}")
            return
        self.job_done(result)

    # ---- Authentication Send ----
    def send(self, msg: bytes) -> None:
        self.run_job()  # a job the caller left pending: the message depends on it
        try:
            auth_type, auth_id, tid = header(msg)
            handler = self._SEND.get((auth_type, auth_id))
            if handler is None:
                raise AuthFailure(Reason.INCORRECT_MESSAGE,
                                  f"unexpected message type {auth_type}/0x{auth_id:02x}")
            handler(self, msg, tid)
        except AuthFailure as exc:
            self._fail(exc.reason, str(exc))

    def _expect(self, step: Step, tid: int | None) -> None:
        if self.step is not step:
            raise AuthFailure(Reason.INCORRECT_MESSAGE, f"message out of order in {self.step.value}")
        if tid is not None and tid != self.tid:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"transaction id {tid} != {self.tid}")

    def _negotiate(self, msg: bytes, tid: int) -> None:
        self._expect(Step.NEGOTIATE, None)
        self.tid = tid
        if len(msg) < _NEGOTIATE.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"negotiate of {len(msg)} bytes")
        _, _, _, _, sc_c, napd = _NEGOTIATE.unpack_from(msg)
        if napd == 0 or len(msg) != _NEGOTIATE.size + napd * _DESCRIPTOR.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"negotiate of {len(msg)} bytes, napd {napd}")
        if sc_c != 0:
            raise AuthFailure(Reason.CONCAT_MISMATCH, "secure channel concatenation is not offered")
        for i in range(napd):
            authid, _, halen, dhlen, hids, dhids = _DESCRIPTOR.unpack_from(
                msg, _NEGOTIATE.size + i * _DESCRIPTOR.size)
            if authid == AUTH_ID_DHCHAP:
                break
        else:
            raise AuthFailure(Reason.PROTOCOL_UNUSABLE, "no DH-HMAC-CHAP protocol descriptor")
        if halen > MAX_IDS or dhlen > MAX_IDS:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"halen {halen} / dhlen {dhlen}")
        offered_h, offered_g = set(hids[:halen]), set(dhids[:dhlen])
        self.digest = next((int(h) for h in _STRONGEST_DIGESTS
                            if h in offered_h and h in self.options.digests), 0)
        if not self.digest:
            raise AuthFailure(Reason.HASH_UNUSABLE, "no hash function in common")
        self.dhgroup = next((int(g) for g in _STRONGEST_GROUPS
                             if g in offered_g and g in self.options.dhgroups), -1)
        if self.dhgroup < 0:
            raise AuthFailure(Reason.DHGROUP_UNUSABLE, "no DH group in common")
        self.step = Step.CHALLENGE
        if self.dhgroup:  # our key pair, ready (computed meanwhile) when the Receive comes
            self.job = DhJob(dh_keypair, (self.dhgroup,), self._keypair_ready)

    def _keypair_ready(self, keypair: tuple[int, bytes]) -> None:
        self._dh = DhExchange(self.dhgroup, keypair)

    def _reply(self, msg: bytes, tid: int) -> None:
        self._expect(Step.REPLY, tid)
        if len(msg) < _REPLY.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"reply of {len(msg)} bytes")
        _, _, _, _, hl, cvalid, dhvlen, seqnum = _REPLY.unpack_from(msg)
        want = HASH_LEN[HashId(self.digest)]
        if hl != want or len(msg) != _REPLY.size + 2 * hl + dhvlen:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"reply hl {hl} dhvlen {dhvlen} "
                              f"in {len(msg)} bytes")
        if cvalid not in (0, 1) or (cvalid and seqnum == 0):
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"cvalid {cvalid} seqnum {seqnum}")
        r1 = msg[_REPLY.size:_REPLY.size + hl]
        c2 = msg[_REPLY.size + hl:_REPLY.size + 2 * hl]
        dhv = msg[_REPLY.size + 2 * hl:]
        dh, self._dh = self._dh, None  # the ephemeral key serves once
        if dh is not None:
            self.job = DhJob(dh_shared, dh.shared_args(dhv),
                             lambda session: self._verify(r1, c2, cvalid, seqnum, session))
        elif dhvlen:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, "DH value with the null DH group")
        else:
            self._verify(r1, c2, cvalid, seqnum, None)

    def _verify(self, r1: bytes, c2: bytes, cvalid: int, seqnum: int,
                session: bytes | None) -> None:
        """The Reply's response checked (with the session secret, if any)."""
        expect = host_response(self._host_key, self.digest, self._c1, self._s1, self.tid,
                               self.hostnqn, self.subnqn, session)
        if not hmac.compare_digest(expect, r1):
            raise AuthFailure(Reason.FAILED, "host response does not match (wrong key?)")
        if cvalid:
            if self._ctrl_key is None:
                raise AuthFailure(Reason.FAILED,
                                  "host asks to authenticate the controller; no controller key")
            self._r2 = ctrl_response(self._ctrl_key, self.digest, c2, seqnum, self.tid,
                                     self.hostnqn, self.subnqn, session)
            self.bidirectional = True
        self.step = Step.SUCCESS1

    def _success2(self, msg: bytes, tid: int) -> None:
        self._expect(Step.SUCCESS2, tid)
        if len(msg) != _SUCCESS2.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"success2 of {len(msg)} bytes")
        self.step = Step.DONE

    def _failure2(self, msg: bytes, tid: int) -> None:
        self._expect(Step.SUCCESS2, tid)
        if len(msg) != _FAILURE.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"failure2 of {len(msg)} bytes")
        self.reason = Reason.FAILED
        self.why = f"host rejected the controller response (explanation {msg[7]})"
        self.step = Step.FAILED

    _SEND: dict[tuple[int, int], Callable[[ControllerAuth, bytes, int], None]] = {
        (AuthType.COMMON, MsgId.NEGOTIATE): _negotiate,
        (AuthType.COMMON, MsgId.FAILURE2): _failure2,
        (AuthType.DHCHAP, MsgId.REPLY): _reply,
        (AuthType.DHCHAP, MsgId.SUCCESS2): _success2,
    }

    # ---- Authentication Receive ----
    def receive(self, al: int) -> bytes:
        """The next message for the host, at most ``al`` bytes long (else Failure1)."""
        self.run_job()
        try:
            if self.step is Step.CHALLENGE:
                return self._challenge(al)
            if self.step is Step.SUCCESS1:
                return self._success1(al)
            if self.step is not Step.FAILURE1:
                self._fail(Reason.INCORRECT_MESSAGE, f"receive in {self.step.value}")
        except AuthFailure as exc:
            self._fail(exc.reason, str(exc))
        self.step = Step.FAILED
        assert self.reason is not None
        return encode_failure(MsgId.FAILURE1, self.tid, self.reason)

    def _challenge(self, al: int) -> bytes:
        hl = HASH_LEN[HashId(self.digest)]
        dhv = self._dh.public if self._dh is not None else b""
        if al < _CHALLENGE.size + hl + len(dhv):
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"receive buffer of {al} bytes too small")
        self._s1 = self._seqnum()
        self._c1 = self._random(hl)
        self.step = Step.REPLY
        return _CHALLENGE.pack(AuthType.DHCHAP, MsgId.CHALLENGE, 0, self.tid, hl, self.digest,
                               self.dhgroup, len(dhv), self._s1) + self._c1 + dhv

    def _success1(self, al: int) -> bytes:
        hl = HASH_LEN[HashId(self.digest)]
        rval = self._r2 if self.bidirectional else b""
        if al < _SUCCESS1.size + len(rval):
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"receive buffer of {al} bytes too small")
        # hl is always set: the Linux host checks it even without a response (SPDK notes it)
        self.step = Step.SUCCESS2 if self.bidirectional else Step.DONE
        return _SUCCESS1.pack(AuthType.DHCHAP, MsgId.SUCCESS1, 0, self.tid, hl,
                              1 if rval else 0) + rval


# ---------------------------------------------------------------------------
# the host's side of one transaction
# ---------------------------------------------------------------------------

HOST_DIGESTS = (HashId.SHA256, HashId.SHA384, HashId.SHA512)
HOST_DHGROUPS = tuple(DhGroup)


class HostAuth:
    """One DH-HMAC-CHAP transaction on one queue, host side (our initiator).

    negotiate() -> Send; reply(challenge) -> Send; success1(msg) -> Send of Success2
    (bidirectional) or None. Errors raise AuthFailure (send `failure2()` for it when
    the protocol allows) or AuthRejected (the controller sent Failure1)."""

    def __init__(self, *, hostnqn: str, subnqn: str, host_key: DhchapKey,
                 ctrl_key: DhchapKey | None = None,
                 digests: Iterable[int] = HOST_DIGESTS,
                 dhgroups: Iterable[int] = HOST_DHGROUPS, tid: int | None = None,
                 seqnum: Callable[[], int] = next_seqnum,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self.hostnqn = hostnqn
        self.subnqn = subnqn
        self._host_key = host_key
        self._ctrl_key = ctrl_key
        self.digests = [int(d) for d in digests]
        self.dhgroups = [int(g) for g in dhgroups]
        self.tid = secrets.randbits(16) if tid is None else tid
        self._seqnum = seqnum
        self._random = random
        self.digest = 0
        self.dhgroup = -1
        self._c2 = b""
        self._s2 = 0
        self._session: bytes | None = None

    def negotiate(self) -> bytes:
        return encode_negotiate(self.tid, self.digests, self.dhgroups)

    def _check_header(self, msg: bytes, msg_id: int) -> None:
        auth_type, auth_id, tid = header(msg)
        if auth_type == AuthType.COMMON and auth_id == MsgId.FAILURE1:
            raise AuthRejected(msg[7] if len(msg) >= FAILURE_SIZE else 0)
        if auth_type != AuthType.DHCHAP or auth_id != msg_id:
            raise AuthFailure(Reason.INCORRECT_MESSAGE,
                              f"expected message 0x{msg_id:02x}, got {auth_type}/0x{auth_id:02x}")
        if tid != self.tid:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"transaction id {tid} != {self.tid}")

    def reply(self, msg: bytes) -> bytes:
        self._check_header(msg, MsgId.CHALLENGE)
        if len(msg) < _CHALLENGE.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"challenge of {len(msg)} bytes")
        _, _, _, _, hl, hashid, dhgid, dhvlen, s1 = _CHALLENGE.unpack_from(msg)
        if hashid not in self.digests or hl != HASH_LEN.get(hashid):  # type: ignore[call-overload]
            raise AuthFailure(Reason.HASH_UNUSABLE, f"controller chose hash {hashid}")
        if dhgid not in self.dhgroups:
            raise AuthFailure(Reason.DHGROUP_UNUSABLE, f"controller chose DH group {dhgid}")
        if len(msg) < _CHALLENGE.size + hl + dhvlen:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, "challenge shorter than its lengths")
        self.digest, self.dhgroup = hashid, dhgid
        c1 = msg[_CHALLENGE.size:_CHALLENGE.size + hl]
        dhv = msg[_CHALLENGE.size + hl:_CHALLENGE.size + hl + dhvlen]
        mine = b""
        if dhgid:
            ex = DhExchange(dhgid)
            self._session = ex.shared(dhv)
            mine = ex.public
        elif dhvlen:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, "DH value with the null DH group")
        r1 = host_response(self._host_key, hashid, c1, s1, self.tid, self.hostnqn,
                           self.subnqn, self._session)
        if self._ctrl_key is not None:
            self._c2 = self._random(hl)
            self._s2 = self._seqnum()
        return (_REPLY.pack(AuthType.DHCHAP, MsgId.REPLY, 0, self.tid, hl,
                            1 if self._c2 else 0, len(mine), self._s2)
                + r1 + (self._c2 or bytes(hl)) + mine)

    def success1(self, msg: bytes) -> bytes | None:
        self._check_header(msg, MsgId.SUCCESS1)
        if len(msg) < _SUCCESS1.size:
            raise AuthFailure(Reason.INCORRECT_PAYLOAD, f"success1 of {len(msg)} bytes")
        _, _, _, _, hl, rvalid = _SUCCESS1.unpack_from(msg)
        if not self.digest:
            raise AuthFailure(Reason.INCORRECT_MESSAGE, "success1 before a challenge")
        if self._ctrl_key is None:
            return None
        if not rvalid or len(msg) < _SUCCESS1.size + hl:
            raise AuthFailure(Reason.FAILED, "controller sent no response to our challenge")
        expect = ctrl_response(self._ctrl_key, self.digest, self._c2, self._s2, self.tid,
                               self.hostnqn, self.subnqn, self._session)
        if not hmac.compare_digest(expect, msg[_SUCCESS1.size:_SUCCESS1.size + hl]):
            raise AuthFailure(Reason.FAILED, "controller response does not match (wrong key?)")
        return encode_success2(self.tid)

    def failure2(self, reason: int) -> bytes:
        return encode_failure(MsgId.FAILURE2, self.tid, reason)
