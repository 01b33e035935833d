"""Sans-I/O codec for NVMe/TCP PDUs: bytes in -> PDU objects -> bytes out.

Shared by the target (``transport_tcp``) and the Python initiator (``host/``), so it
imports nothing of ours and never touches a socket: the caller owns the I/O and the
event loop, this module owns the wire format. That keeps every framing rule testable
byte by byte (the h11 model).

Wire facts (NVMe TCP Transport Specification 1.0, checked against Linux
``include/linux/nvme-tcp.h`` and ``drivers/nvme/{host,target}/tcp.c``): all integers
are little-endian; every PDU starts with the 8-byte common header
``type, flags, hlen, pdo, plen``; digests are CRC32C stored as a LE u32, the header
digest after the ``hlen`` header bytes, the data digest after the data. ICReq/ICResp
and TermReq PDUs never carry digests.

Choices worth knowing (the spec leaves them to the receiver, or the implementations
disagree):

* FEI (fatal error information) is the byte offset of the offending field for
  ``INVALID_HEADER_FIELD`` (see the ``OFFSET_*`` constants) and 0 otherwise. When
  several fields are wrong, the lowest offset is reported, as the spec asks.
* ``ProtocolError.header`` holds the 8-byte common header for errors found in it
  (type, flags, hlen, pdo, plen, limits) and the full ``hlen`` header for errors found
  later (digests, type-specific fields). It is therefore the same however the stream
  was split, which keeps errors reproducible.
* Reserved fields and flag bits are ignored on receipt (NVMe: receivers do not check
  reserved fields). PDO is only meaningful when a PDU carries data, so it is ignored
  otherwise. Digest flags are not reserved: HDGSTF must match the negotiated header
  digest on every digestible PDU, and DDGSTF must match the negotiated data digest on
  every PDU that carries data (as Linux and SPDK hosts send them).
* Data digest errors are *not* fatal. The spec (and SPDK, host and target) completes
  the affected command with Transient Transport Error (SCT 0, SC 0x22) and keeps the
  connection; the Linux target instead tears the connection down. Framing is still
  intact after a bad data digest (the header was valid), so the decoder raises
  :class:`DataDigestError` (a :class:`ProtocolError` subclass, so a caller that only
  catches ProtocolError gets the Linux behaviour), carrying the decoded PDU and its
  command id, and stays usable: the next ``feed()`` continues with the following PDU.
* A received TermReq whose length is invalid must not be answered with another
  TermReq (FreeBSD and the spec: terminate silently), hence
  ``ProtocolError.send_term_req``.
* The codec checks framing, not negotiation: PFV, the hpda/cpda range, MAXR2T and
  MAXH2CDATA values are judged by the connection, which reports them as
  UNSUPPORTED_PARAMETER with the ``OFFSET_IC_*`` offsets as FEI.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from crc32c import crc32c as _crc32c

__all__ = [
    "CONTROLLER_TO_HOST",
    "DEFAULT_MAX_PDU_SIZE",
    "DGST_DATA",
    "DGST_HEADER",
    "DIGEST_LEN",
    "FLAG_DATA_LAST",
    "FLAG_DATA_SUCCESS",
    "FLAG_DDGST",
    "FLAG_HDGST",
    "HOST_TO_CONTROLLER",
    "MAX_PDA",
    "PDU_HEADER_LEN",
    "TERM_REQ_MAX_DATA",
    "C2HData",
    "CapsuleCmd",
    "CapsuleResp",
    "DataDigestError",
    "Decoder",
    "Fes",
    "H2CData",
    "ICReq",
    "ICResp",
    "Pdu",
    "PduType",
    "ProtocolError",
    "R2T",
    "TermReq",
    "decode_one",
    "encode",
    "pdu_header_len",
]


class PduType(IntEnum):
    """PDU type byte. Bit 0 is the direction: even = host to controller."""

    IC_REQ = 0x00
    IC_RESP = 0x01
    H2C_TERM_REQ = 0x02
    C2H_TERM_REQ = 0x03
    CAPSULE_CMD = 0x04
    CAPSULE_RESP = 0x05
    H2C_DATA = 0x06
    C2H_DATA = 0x07
    R2T = 0x09


# Common header flags.
FLAG_HDGST: Final = 0x01
FLAG_DDGST: Final = 0x02
FLAG_DATA_LAST: Final = 0x04
FLAG_DATA_SUCCESS: Final = 0x08

# ICReq/ICResp ``dgst`` bits.
DGST_HEADER: Final = 0x01
DGST_DATA: Final = 0x02


class Fes(IntEnum):
    """Fatal Error Status of a H2C/C2H TermReq."""

    INVALID_HEADER_FIELD = 0x01
    PDU_SEQUENCE_ERROR = 0x02
    HEADER_DIGEST_ERROR = 0x03
    DATA_TRANSFER_OUT_OF_RANGE = 0x04
    DATA_TRANSFER_LIMIT_EXCEEDED = 0x05
    R2T_LIMIT_EXCEEDED = 0x05  # same code; the spec names it per direction
    UNSUPPORTED_PARAMETER = 0x06


# Byte offsets of header fields, used as FEI values (and handy for callers that raise
# UNSUPPORTED_PARAMETER about an ICReq field themselves).
OFFSET_TYPE: Final = 0
OFFSET_FLAGS: Final = 1
OFFSET_HLEN: Final = 2
OFFSET_PDO: Final = 3
OFFSET_PLEN: Final = 4
OFFSET_IC_PFV: Final = 8
OFFSET_IC_PDA: Final = 10  # hpda / cpda
OFFSET_IC_DGST: Final = 11
OFFSET_IC_MAXR2T: Final = 12  # maxr2t / maxh2cdata
OFFSET_TERM_FES: Final = 8
OFFSET_TERM_FEI: Final = 10
OFFSET_CCCID: Final = 8
OFFSET_TTAG: Final = 10
OFFSET_DATAO: Final = 12  # also R2TO
OFFSET_DATAL: Final = 16  # also R2TL

PDU_HEADER_LEN: Final[dict[PduType, int]] = {
    PduType.IC_REQ: 128,
    PduType.IC_RESP: 128,
    PduType.H2C_TERM_REQ: 24,
    PduType.C2H_TERM_REQ: 24,
    PduType.CAPSULE_CMD: 72,  # 8 + 64-byte SQE
    PduType.CAPSULE_RESP: 24,  # 8 + 16-byte CQE
    PduType.H2C_DATA: 24,
    PduType.C2H_DATA: 24,
    PduType.R2T: 24,
}

DIGEST_LEN: Final = 4
COMMON_HEADER_LEN: Final = 8
TERM_REQ_MAX_DATA: Final = 128  # offending header bytes a TermReq may carry
MAX_PDA: Final = 31  # hpda/cpda are 0's based dwords: alignment up to 128 bytes
DEFAULT_MAX_PDU_SIZE: Final = 1024 * 1024 + 1024

HOST_TO_CONTROLLER: Final = "host-to-controller"
CONTROLLER_TO_HOST: Final = "controller-to-host"

SQE_LEN: Final = 64
CQE_LEN: Final = 16
_IC_LEN: Final = 128
_TERM_HLEN: Final = 24
_TERM_MAX_PLEN: Final = _TERM_HLEN + TERM_REQ_MAX_DATA


def pdu_header_len(pdu_type: int) -> int:
    """Header length (without digest) the spec fixes for ``pdu_type``."""
    return PDU_HEADER_LEN[PduType(pdu_type)]


# --------------------------------------------------------------------------- PDUs

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True)
class ICReq:
    """Initialize Connection Request; ``hpda`` is the host's PDU data alignment."""

    pfv: int = 0
    hpda: int = 0
    dgst: int = 0
    maxr2t: int = 0  # 0's based

    @property
    def header_digest(self) -> bool:
        return bool(self.dgst & DGST_HEADER)

    @property
    def data_digest(self) -> bool:
        return bool(self.dgst & DGST_DATA)


@dataclass(slots=True)
class ICResp:
    """Initialize Connection Response; ``cpda`` is the controller's alignment."""

    pfv: int = 0
    cpda: int = 0
    dgst: int = 0
    maxh2cdata: int = 131072

    @property
    def header_digest(self) -> bool:
        return bool(self.dgst & DGST_HEADER)

    @property
    def data_digest(self) -> bool:
        return bool(self.dgst & DGST_DATA)


@dataclass(slots=True)
class TermReq:
    """H2CTermReq (``c2h=False``) or C2HTermReq; ``data`` is the offending header."""

    c2h: bool
    fes: int
    fei: int = 0
    data: bytes = b""


@dataclass(slots=True)
class CapsuleCmd:
    """Command capsule: the 64-byte SQE plus optional in-capsule data."""

    sqe: bytes | memoryview
    data: bytes | memoryview = b""

    @property
    def cid(self) -> int:
        return int.from_bytes(self.sqe[2:4], "little")


@dataclass(slots=True)
class CapsuleResp:
    """Response capsule: the 16-byte CQE."""

    cqe: bytes | memoryview

    @property
    def cid(self) -> int:
        return int.from_bytes(self.cqe[12:14], "little")


@dataclass(slots=True)
class H2CData:
    cccid: int
    ttag: int
    datao: int
    data: bytes | memoryview
    last: bool = True


@dataclass(slots=True)
class C2HData:
    cccid: int
    datao: int
    data: bytes | memoryview
    last: bool = True
    success: bool = False


@dataclass(slots=True)
class R2T:
    cccid: int
    ttag: int
    r2to: int
    r2tl: int


Pdu = ICReq | ICResp | TermReq | CapsuleCmd | CapsuleResp | H2CData | C2HData | R2T


# ------------------------------------------------------------------------- errors


class ProtocolError(Exception):
    """A fatal NVMe/TCP transport error; the connection must be terminated.

    ``fes``/``fei``/``header`` are what the TermReq to the peer should carry
    (:meth:`term_req` builds it). ``pdus`` holds the PDUs the same ``feed()`` call
    decoded before the error, so the caller can still act on them in order.
    """

    def __init__(
        self,
        message: str,
        *,
        fes: int,
        fei: int = 0,
        header: Buffer = b"",
        send_term_req: bool = True,
    ) -> None:
        super().__init__(message)
        self.fes: int = fes
        self.fei: int = fei
        self.header: bytes = bytes(header[:TERM_REQ_MAX_DATA])
        self.send_term_req: bool = send_term_req
        self.pdus: list[Pdu] = []

    def term_req(self, *, c2h: bool) -> TermReq:
        """The TermReq reporting this error (``c2h=True`` when we are the controller)."""
        return TermReq(c2h=c2h, fes=self.fes, fei=self.fei, data=self.header)

    def _again(self) -> ProtocolError:
        # A fresh copy, so PDUs delivered with the first raise are not delivered twice.
        return ProtocolError(
            str(self),
            fes=self.fes,
            fei=self.fei,
            header=self.header,
            send_term_req=self.send_term_req,
        )


class DataDigestError(ProtocolError):
    """The data digest of one PDU did not match; the stream itself is still in sync.

    The spec's remedy is to fail the command (``cccid``) with Transient Transport
    Error and keep the connection; the decoder stays usable. ``pdu`` is the decoded
    PDU (its data is the corrupt payload). ``fes`` is HEADER_DIGEST_ERROR for callers
    that choose to terminate anyway: the spec defines no data-digest FES and older
    SPDK reported data digest errors with that code.
    """

    def __init__(self, message: str, *, pdu: Pdu, cccid: int, header: Buffer) -> None:
        super().__init__(message, fes=Fes.HEADER_DIGEST_ERROR, fei=0, header=header)
        self.pdu: Pdu = pdu
        self.cccid: int = cccid


# ----------------------------------------------------------------------- encoding

_CH = struct.Struct("<BBBBI")  # common header
_IC = struct.Struct("<BBBBIHBBI")  # ICReq/ICResp up to maxr2t/maxh2cdata (16 bytes)
_TERM = struct.Struct("<BBBBIHI")  # TermReq up to FEI, which sits unaligned at 10
_DATA = struct.Struct("<BBBBIHHIII")  # H2CData/C2HData/R2T incl. 4 reserved bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_KNOWN_MAX = 32  # validated common headers a decoder remembers
_IC_FIELDS = struct.Struct("<HBBI")
_TERM_FIELDS = struct.Struct("<HI")
_DATA_FIELDS = struct.Struct("<HHII")

_IC_PAD = bytes(_IC_LEN - _IC.size)
_TERM_PAD = bytes(_TERM_HLEN - _TERM.size)


def _layout(hlen: int, hdgst: bool, n: int, ddgst: bool, pda: int) -> tuple[int, int, int]:
    """(pdo, plen, pad) of a PDU with ``n`` data bytes for a receiver with ``pda``."""
    base = hlen + DIGEST_LEN if hdgst else hlen
    if n == 0:
        return 0, base, 0
    align = (pda + 1) * 4
    pdo = -(-base // align) * align
    return pdo, pdo + n + (DIGEST_LEN if ddgst else 0), pdo - base


def _finish(
    head: bytes, hdgst: bool, pad: int, data: bytes | memoryview, ddgst: bool
) -> list[bytes | memoryview]:
    if hdgst:
        head += _U32.pack(_crc32c(head))
    if pad:
        head += bytes(pad)
    if not len(data):
        return [head]
    if ddgst:
        return [head, data, _U32.pack(_crc32c(data))]
    return [head, data]


def _enc_icreq(p: ICReq, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    return [_IC.pack(0, 0, _IC_LEN, 0, _IC_LEN, p.pfv, p.hpda, p.dgst, p.maxr2t) + _IC_PAD]


def _enc_icresp(p: ICResp, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    return [_IC.pack(1, 0, _IC_LEN, 0, _IC_LEN, p.pfv, p.cpda, p.dgst, p.maxh2cdata) + _IC_PAD]


def _enc_term(p: TermReq, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    data = bytes(p.data[:TERM_REQ_MAX_DATA])
    ptype = PduType.C2H_TERM_REQ if p.c2h else PduType.H2C_TERM_REQ
    plen = _TERM_HLEN + len(data)
    return [_TERM.pack(ptype, 0, _TERM_HLEN, 0, plen, p.fes, p.fei) + _TERM_PAD + data]


def _enc_cmd(p: CapsuleCmd, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    sqe = p.sqe
    if len(sqe) != SQE_LEN:
        raise ValueError(f"SQE must be {SQE_LEN} bytes, got {len(sqe)}")
    n = len(p.data)
    flags = (FLAG_HDGST if hdgst else 0) | (FLAG_DDGST if ddgst and n else 0)
    pdo, plen, pad = _layout(72, hdgst, n, ddgst, pda)
    head = _CH.pack(PduType.CAPSULE_CMD, flags, 72, pdo, plen) + bytes(sqe)
    return _finish(head, hdgst, pad, p.data, ddgst)


def _enc_resp(p: CapsuleResp, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    cqe = p.cqe
    if len(cqe) != CQE_LEN:
        raise ValueError(f"CQE must be {CQE_LEN} bytes, got {len(cqe)}")
    flags = FLAG_HDGST if hdgst else 0
    plen = 24 + DIGEST_LEN if hdgst else 24
    head = _CH.pack(PduType.CAPSULE_RESP, flags, 24, 0, plen) + bytes(cqe)
    return _finish(head, hdgst, 0, b"", False)


def _enc_h2c(p: H2CData, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    n = len(p.data)
    if n == 0:
        # Receivers (Linux nvmet) reject a zero DATAL; fail here, not on the wire.
        raise ValueError("H2CData must carry data")
    flags = (
        (FLAG_HDGST if hdgst else 0)
        | (FLAG_DDGST if ddgst else 0)
        | (FLAG_DATA_LAST if p.last else 0)
    )
    pdo, plen, pad = _layout(24, hdgst, n, ddgst, pda)
    head = _DATA.pack(PduType.H2C_DATA, flags, 24, pdo, plen, p.cccid, p.ttag, p.datao, n, 0)
    return _finish(head, hdgst, pad, p.data, ddgst)


def _enc_c2h(p: C2HData, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    n = len(p.data)
    if n == 0:
        raise ValueError("C2HData must carry data")
    if p.success and not p.last:
        raise ValueError("C2HData SUCCESS requires LAST")
    flags = (
        (FLAG_HDGST if hdgst else 0)
        | (FLAG_DDGST if ddgst else 0)
        | (FLAG_DATA_LAST if p.last else 0)
        | (FLAG_DATA_SUCCESS if p.success else 0)
    )
    pdo, plen, pad = _layout(24, hdgst, n, ddgst, pda)
    head = _DATA.pack(PduType.C2H_DATA, flags, 24, pdo, plen, p.cccid, 0, p.datao, n, 0)
    return _finish(head, hdgst, pad, p.data, ddgst)


def _enc_r2t(p: R2T, hdgst: bool, ddgst: bool, pda: int) -> list[bytes | memoryview]:
    flags = FLAG_HDGST if hdgst else 0
    plen = 24 + DIGEST_LEN if hdgst else 24
    head = _DATA.pack(PduType.R2T, flags, 24, 0, plen, p.cccid, p.ttag, p.r2to, p.r2tl, 0)
    return _finish(head, hdgst, 0, b"", False)


_ENCODERS: dict[type, Callable[..., list[bytes | memoryview]]] = {
    ICReq: _enc_icreq,
    ICResp: _enc_icresp,
    TermReq: _enc_term,
    CapsuleCmd: _enc_cmd,
    CapsuleResp: _enc_resp,
    H2CData: _enc_h2c,
    C2HData: _enc_c2h,
    R2T: _enc_r2t,
}


def encode(
    pdu: Pdu, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0
) -> list[bytes | memoryview]:
    """Serialize ``pdu`` into buffers for ``transport.writelines``.

    The payload object is passed through as is (no copy), so a memoryview of a bdev
    buffer goes to the socket directly; it must stay unchanged until written.
    ``pda`` is the *receiver's* alignment (the peer's hpda/cpda). ``hdgst``/``ddgst``
    are the negotiated digests; ICReq/ICResp/TermReq ignore them, and the data digest
    is only added to PDUs that carry data.
    """
    enc = _ENCODERS.get(type(pdu))
    if enc is None:
        raise TypeError(f"not a PDU: {type(pdu).__name__}")
    if not 0 <= pda <= MAX_PDA:
        raise ValueError(f"pda must be 0..{MAX_PDA}, got {pda}")
    return enc(pdu, hdgst, ddgst, pda)


# Hot-path encoders. `encode()` builds a PDU object, looks up its encoder and computes
# the layout for every PDU; the target sends one CapsuleResp (and, for reads, one or
# more C2HData) per I/O, and that generic path cost about 2 µs of the ≈13 µs a 4 KiB
# read took. These produce the same bytes (tests/unit/test_hotpath.py compares them
# with `encode()`) from plain fields, with one struct pack per header.

_RESP = struct.Struct("<BBBBIIIHHHH")  # CapsuleResp: common header + 16-byte CQE
_pack_resp = _RESP.pack


def encode_resp(
    cid: int, status: int, sqhd: int, sqid: int, dw0: int = 0, dw1: int = 0, hdgst: bool = False
) -> bytes:
    """A whole CapsuleResp PDU for the CQE (dw0, dw1, sqhd, sqid, cid, status << 1 with
    phase 0, the fabrics CQE layout); ``status`` is the 15-bit SCT/SC value."""
    # literals: type 5 (CAPSULE_RESP), flags, hlen 24, pdo 0, plen (+4 with HDGST)
    if hdgst:
        head = _pack_resp(5, FLAG_HDGST, 24, 0, 28, dw0, dw1, sqhd, sqid, cid, status << 1)
        return head + _U32.pack(_crc32c(head))
    return _pack_resp(5, 0, 24, 0, 24, dw0, dw1, sqhd, sqid, cid, status << 1)


def encode_c2h(
    cccid: int, datao: int, data: bytes | memoryview, last: bool, success: bool,
    hdgst: bool, ddgst: bool, pda: int,
) -> list[bytes | memoryview]:
    """C2HData buffers for ``writelines``, as ``encode(C2HData(...))``; ``data`` must be
    non-empty and a byte view (it is passed through uncopied)."""
    n = len(data)
    flags = FLAG_DATA_LAST if last else 0
    if success:
        flags |= FLAG_DATA_SUCCESS
    base = 24
    if hdgst:
        flags |= FLAG_HDGST
        base = 28
    if pda:
        align = (pda + 1) * 4
        pdo = -(-base // align) * align
    else:
        pdo = base
    if ddgst:
        flags |= FLAG_DDGST
        head = _DATA.pack(_T_C2H_DATA, flags, 24, pdo, pdo + n + 4, cccid, 0, datao, n, 0)
    else:
        head = _DATA.pack(_T_C2H_DATA, flags, 24, pdo, pdo + n, cccid, 0, datao, n, 0)
    if hdgst:
        head += _U32.pack(_crc32c(head))
    if pdo > base:
        head += bytes(pdo - base)
    if ddgst:
        return [head, data, _U32.pack(_crc32c(data))]
    return [head, data]


# ----------------------------------------------------------------------- decoding

_H2C_TYPES: Final = frozenset(
    {PduType.IC_REQ, PduType.H2C_TERM_REQ, PduType.CAPSULE_CMD, PduType.H2C_DATA}
)
_C2H_TYPES: Final = frozenset(
    {PduType.IC_RESP, PduType.C2H_TERM_REQ, PduType.CAPSULE_RESP, PduType.C2H_DATA, PduType.R2T}
)
_EMPTY: Final = memoryview(b"")
# Plain ints for the per-PDU paths: reading an IntEnum member costs ~65 ns on
# CPython 3.11 (a descriptor call), a module global ~10 ns; the decoder did a dozen.
_T_CAPSULE_CMD: Final = int(PduType.CAPSULE_CMD)
_T_CAPSULE_RESP: Final = int(PduType.CAPSULE_RESP)
_T_H2C_DATA: Final = int(PduType.H2C_DATA)
_T_C2H_DATA: Final = int(PduType.C2H_DATA)
_T_R2T: Final = int(PduType.R2T)
_T_C2H_TERM_REQ: Final = int(PduType.C2H_TERM_REQ)
_T_IC_REQ: Final = int(PduType.IC_REQ)
_FES_INVALID_HEADER: Final = int(Fes.INVALID_HEADER_FIELD)
_FES_VALUES: Final = frozenset(int(f) for f in Fes)
_SMALL: Final = 4096  # inputs below this are coalesced rather than queued
_ACCUMULATE: Final = 65536  # size at which a coalescing buffer is closed

# A validated common header: (type, flags, hlen, pdo, plen, hdgst, data_len, ddgst).
_Header = tuple[int, int, int, int, int, bool, int, bool]


def _as_immutable_view(data: Buffer) -> memoryview:
    """A byte view the caller cannot change under us (copying only if it could)."""
    if type(data) is bytes:
        return memoryview(data)
    if isinstance(data, memoryview) and type(data.obj) is bytes and data.c_contiguous:
        return data if data.format == "B" and data.ndim == 1 else data.cast("B")
    return memoryview(bytes(data))


class Decoder:
    """Incremental decoder for one direction of one NVMe/TCP connection.

    ``expect`` is what *this side receives*: ``"host-to-controller"`` for the target,
    ``"controller-to-host"`` for the initiator. ``pda`` (``set_pda``) is our own
    alignment as advertised in our ICReq/ICResp, against which received PDOs are
    checked. Input is kept as a queue of immutable chunks and parsed in place, so a
    PDU that arrives within one chunk is never copied (``bytes`` input) or copied once
    (mutable input); only PDUs spanning chunks are joined, once, and tiny inputs are
    coalesced. The cost is therefore linear in bytes however the stream is split.
    """

    __slots__ = (
        "_accept",
        "_align",
        "_ddgst",
        "_div",
        "_div_held",
        "_error",
        "_hdgst",
        "_hdr",
        "_ic_done",
        "_known",
        "_ic_type",
        "_max_pdu_size",
        "_more",
        "_more_len",
        "_pda",
        "_pos",
        "_term_type",
        "_view",
    )

    def __init__(self, *, expect: str, max_pdu_size: int = DEFAULT_MAX_PDU_SIZE) -> None:
        if expect == HOST_TO_CONTROLLER:
            self._accept = _H2C_TYPES
            self._ic_type = PduType.IC_REQ
            self._term_type = PduType.H2C_TERM_REQ
        elif expect == CONTROLLER_TO_HOST:
            self._accept = _C2H_TYPES
            self._ic_type = PduType.IC_RESP
            self._term_type = PduType.C2H_TERM_REQ
        else:
            raise ValueError(f"expect must be {HOST_TO_CONTROLLER!r} or {CONTROLLER_TO_HOST!r}")
        self._max_pdu_size = max_pdu_size
        self._hdgst = False
        self._ddgst = False
        self._pda = 0
        self._align = 4
        self._ic_done = False
        self._error: ProtocolError | None = None
        self._hdr: _Header | None = None
        self._view: memoryview = _EMPTY
        self._pos = 0
        self._more: deque[memoryview | bytearray] = deque()
        self._more_len = 0
        # Common headers already validated, by their 8 bytes read as one u64: a stream
        # repeats a handful (every 4 KiB read capsule has the same one), and a hit saves
        # the whole _check_common. Only valid for the current digests/alignment, so
        # cleared when they change; bounded, so a hostile peer cannot grow it.
        self._known: dict[int, _Header] = {}
        # A payload diverted by divert(): (PDU, header tuple, header bytes, destination,
        # complete); _div_held counts its bytes as buffered for the stall watch.
        self._div: list[Any] | None = None
        self._div_held = 0

    # -- configuration ---------------------------------------------------------

    def set_digests(self, hdgst: bool, ddgst: bool) -> None:
        """Apply the digests negotiated by ICReq/ICResp to the PDUs that follow."""
        self._hdgst = bool(hdgst)
        self._ddgst = bool(ddgst)
        self._known.clear()

    def set_pda(self, pda: int) -> None:
        """Set our own PDU data alignment (0's based dwords), as sent to the peer."""
        if not 0 <= pda <= MAX_PDA:
            raise ValueError(f"pda must be 0..{MAX_PDA}, got {pda}")
        self._pda = pda
        self._align = (pda + 1) * 4
        self._known.clear()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as PDUs."""
        return len(self._view) - self._pos + self._more_len + self._div_held

    @property
    def error(self) -> ProtocolError | None:
        """The fatal error that stopped this decoder, if any."""
        return self._error

    # -- input -----------------------------------------------------------------

    def feed(self, data: Buffer, frozen: bool = False) -> list[Pdu]:
        """Add received bytes; return every PDU completed by them, in order.

        Decoding pauses right after an ICReq/ICResp so that the caller can apply the
        negotiated digests and alignment before the next PDU is parsed; bytes already
        buffered are decoded by the next call (``feed(b"")`` will do). A conforming
        peer sends nothing in between, so normally nothing waits.

        Payloads are ``memoryview`` slices of immutable ``bytes`` (or ``b""``): they
        stay valid after later calls and even if the caller reuses ``data``.
        ``frozen``: the caller promises that ``data`` (a byte memoryview) never changes
        (the target's receive arena), so it is kept as is rather than copied.
        Raises :class:`ProtocolError` (the decoder is then dead and every later call
        raises it again) or :class:`DataDigestError` (the decoder stays usable).
        """
        if self._error is not None:
            raise self._error._again()
        if len(data):
            self._push(data, frozen)
        out: list[Pdu] = []
        try:
            self._decode_available(out)
        except DataDigestError as exc:
            exc.pdus = out
            raise
        except ProtocolError as exc:
            self._error = exc
            self._hdr = None
            self._view = _EMPTY
            self._pos = 0
            self._more.clear()
            self._more_len = 0
            self._div = None
            self._div_held = 0
            exc.pdus = out
            raise
        return out

    # -- direct placement of a data payload ----------------------------------------

    def data_header(self, min_left: int) -> tuple[H2CData, int] | None:
        """The H2CData PDU being received, as ``(pdu with empty data, payload length)``,
        once its header (and header digest, and padding) is complete and at least
        ``min_left`` bytes of its payload have yet to arrive; otherwise None.

        For a caller that wants the rest of the payload received straight into its own
        memory (divert). A header that fails its digest or DATAL check gives None: that
        PDU then takes the normal path, which reports the error once it is complete,
        exactly as if nothing had been tried."""
        hdr = self._hdr
        if hdr is None or hdr[0] != _T_H2C_DATA or self._div is not None:
            return None
        pdo = hdr[3]
        got = len(self._view) - self._pos + self._more_len - pdo  # payload bytes in
        if got < 0 or hdr[6] - got < min_left:
            return None
        if len(self._view) - self._pos < pdo:
            self._gather(pdo)  # (copies the header only: the payload is not in yet)
        view, pos, hlen = self._view, self._pos, hdr[2]
        if hdr[5] and _U32.unpack_from(view, pos + hlen)[0] != _crc32c(view[pos : pos + hlen]):
            return None
        cccid, ttag, datao, datal = _DATA_FIELDS.unpack_from(view, pos + 8)
        if datal != hdr[6]:
            return None
        return H2CData(cccid, ttag, datao, b"", bool(hdr[1] & FLAG_DATA_LAST)), datal

    def divert(self, p: H2CData, dest: memoryview) -> int:
        """Take the payload of the PDU ``data_header`` just returned (``p``) out of the
        stream into ``dest`` (exactly the payload's length): the payload bytes already
        buffered are copied there (returns how many) and the caller receives the rest
        into ``dest`` itself, then calls ``end_divert``. Meanwhile the decoder holds no
        other bytes and must not be fed. The PDU comes out of the next ``feed`` after
        ``end_divert`` with ``dest`` as its data, its data digest (if any) checked over
        ``dest`` as for any PDU (DataDigestError)."""
        hdr = self._hdr
        assert hdr is not None and self._div is None and len(dest) == hdr[6]
        view, pos, pdo = self._view, self._pos, hdr[3]
        header = bytes(view[pos : pos + hdr[2]])
        rest = view[pos + pdo :]
        n = len(rest)
        dest[:n] = rest
        more = self._more
        while more:
            chunk = more.popleft()
            dest[n : n + len(chunk)] = chunk
            n += len(chunk)
        self._more_len = 0
        self._view = _EMPTY
        self._pos = 0
        self._hdr = None
        self._div = [p, hdr, header, dest, False]
        self._div_held = pdo + n
        return n

    def end_divert(self) -> None:
        """The diverted payload is complete in its destination."""
        div = self._div
        assert div is not None
        div[4] = True
        self._div_held = div[1][3] + div[1][6]

    def _finish_divert(self, out: list[Pdu]) -> bool:
        """Emit the diverted PDU once its payload and data digest are in."""
        p, hdr, header, dest, complete = self._div  # type: ignore[misc]
        if not complete:
            return False
        got = 0
        if hdr[7]:
            have = len(self._view) - self._pos
            if have + self._more_len < DIGEST_LEN:
                return False
            if have < DIGEST_LEN:
                self._gather(DIGEST_LEN)
            (got,) = _U32.unpack_from(self._view, self._pos)
            self._pos += DIGEST_LEN
        self._div = None
        self._div_held = 0
        p.data = dest
        if hdr[7] and got != _crc32c(dest):
            raise DataDigestError(f"data digest mismatch (cccid {p.cccid})",
                                  pdu=p, cccid=p.cccid, header=header)
        out.append(p)
        return True

    @property
    def idle(self) -> bool:
        """Between PDUs with nothing buffered: the next byte fed starts a PDU."""
        return (self._hdr is None and self._div is None and not self._more
                and self._pos == len(self._view))

    def to_boundary(self) -> int:
        """Bytes still missing from the PDU in progress: 0 when idle, -1 when that is
        not known yet (less than a common header buffered, or a diverted payload)."""
        if self._div is not None:
            return -1
        have = len(self._view) - self._pos + self._more_len
        hdr = self._hdr
        if hdr is None:
            return 0 if have == 0 else -1
        return hdr[4] - have

    def own_pending(self, limit: int) -> None:
        """Copy the bytes of a PDU begun (fewer than ``limit``) out of the caller's frozen
        memory, so a few bytes do not keep a whole receive arena alive."""
        have = len(self._view) - self._pos
        if self._div is not None or (have == 0 and not self._more):
            return
        if have + self._more_len >= limit:
            return
        joined = b"".join([self._view[self._pos :], *self._more])
        self._view = memoryview(joined)
        self._pos = 0
        self._more.clear()
        self._more_len = 0

    def _push(self, data: Buffer, frozen: bool = False) -> None:
        more = self._more
        if self._pos == len(self._view) and not more:
            self._view = data if frozen else _as_immutable_view(data)  # type: ignore[assignment]
            self._pos = 0
            return
        n = len(data) if type(data) is not memoryview else data.nbytes
        if n < _SMALL:
            # Tiny segments go into a bounded bytearray instead of one queued object
            # each, so a peer dribbling bytes costs memory linear in bytes, not calls.
            last = more[-1] if more else None
            if type(last) is bytearray and len(last) < _ACCUMULATE:
                last += data
            else:
                more.append(bytearray(data))
        else:
            more.append(data if frozen else _as_immutable_view(data))  # type: ignore[arg-type]
        self._more_len += n

    def _next_chunk(self) -> memoryview:
        chunk = self._more.popleft()
        self._more_len -= len(chunk)
        # Accumulators are ours and mutable: freeze before handing out views of them.
        return memoryview(bytes(chunk)) if type(chunk) is bytearray else chunk

    def _decode_available(self, out: list[Pdu]) -> None:
        if self._div is not None and not self._finish_divert(out):
            return
        while True:
            have = len(self._view) - self._pos
            if have == 0:
                if not self._more:
                    self._view = _EMPTY  # drop the last chunk; payload views keep theirs
                    self._pos = 0
                    return
                self._view = self._next_chunk()
                self._pos = 0
                continue
            avail = have + self._more_len
            hdr = self._hdr
            if hdr is None:
                if avail < COMMON_HEADER_LEN:
                    return
                if have < COMMON_HEADER_LEN:
                    self._gather(COMMON_HEADER_LEN)
                key = _U64.unpack_from(self._view, self._pos)[0]
                hdr = self._known.get(key)
                if hdr is None:
                    hdr = self._check_common()
                    if (self._ic_done and hdr[0] != self._term_type
                            and len(self._known) < _KNOWN_MAX):
                        self._known[key] = hdr
                self._hdr = hdr
            plen = hdr[4]
            if avail < plen:
                return
            if len(self._view) - self._pos < plen:
                self._gather(plen)
            view, pos = self._view, self._pos
            self._hdr = None
            self._pos = pos + plen
            out.append(self._decode(hdr, view, pos))
            if hdr[0] == self._ic_type:
                self._ic_done = True
                return

    def _gather(self, n: int) -> None:
        """Make the next ``n`` buffered bytes contiguous, copying only those."""
        pieces = [self._view[self._pos :]]
        got = len(pieces[0])
        more = self._more
        while got < n:
            chunk = self._next_chunk()
            need = n - got
            if len(chunk) > need:
                pieces.append(chunk[:need])
                rest = chunk[need:]
                more.appendleft(rest)
                self._more_len += len(rest)
                got = n
            else:
                pieces.append(chunk)
                got += len(chunk)
        self._view = memoryview(b"".join(pieces))
        self._pos = 0

    # -- validation ------------------------------------------------------------

    def _bad(self, fes: int, fei: int, why: str, *, send_term_req: bool = True) -> ProtocolError:
        pos = self._pos
        return ProtocolError(
            why,
            fes=fes,
            fei=fei,
            header=self._view[pos : pos + COMMON_HEADER_LEN],
            send_term_req=send_term_req,
        )

    def _check_common(self) -> _Header:
        """Validate the 8-byte common header before waiting for the rest of the PDU.

        Everything that decides framing is checked here, so a hostile plen is refused
        before we buffer it. Fields are checked in offset order so the lowest
        offending field is the one reported.
        """
        ptype, flags, hlen, pdo, plen = _CH.unpack_from(self._view, self._pos)
        invalid = _FES_INVALID_HEADER
        if ptype not in self._accept:
            raise self._bad(invalid, OFFSET_TYPE, f"unexpected PDU type {ptype:#x}")
        if not self._ic_done:
            if ptype != self._ic_type and ptype != self._term_type:
                raise self._bad(
                    Fes.PDU_SEQUENCE_ERROR, 0, f"PDU type {ptype:#x} before connection init"
                )
        elif ptype == self._ic_type:
            raise self._bad(Fes.PDU_SEQUENCE_ERROR, 0, "second connection init PDU")

        if ptype == self._ic_type:
            # Flags and PDO are reserved; no digests before they are negotiated.
            if hlen != _IC_LEN:
                raise self._bad(invalid, OFFSET_HLEN, f"bad hlen {hlen} for type {ptype:#x}")
            if plen != _IC_LEN:
                raise self._bad(invalid, OFFSET_PLEN, f"bad plen {plen} for type {ptype:#x}")
            return (ptype, flags, hlen, pdo, plen, False, 0, False)

        if ptype == self._term_type:
            # Never digested; a malformed one is answered by closing, not by a TermReq.
            if hlen != _TERM_HLEN:
                raise self._bad(
                    invalid, OFFSET_HLEN, f"bad TermReq hlen {hlen}", send_term_req=False
                )
            if not _TERM_HLEN <= plen <= _TERM_MAX_PLEN:
                raise self._bad(
                    invalid, OFFSET_PLEN, f"bad TermReq plen {plen}", send_term_req=False
                )
            return (ptype, flags, hlen, pdo, plen, False, plen - _TERM_HLEN, False)

        hdgst = self._hdgst
        expected_hlen = PDU_HEADER_LEN[ptype]
        base = expected_hlen + DIGEST_LEN if hdgst else expected_hlen
        has_data = plen > base and ptype not in (_T_CAPSULE_RESP, _T_R2T)
        ddgst = bool(flags & FLAG_DDGST)

        if bool(flags & FLAG_HDGST) != hdgst:
            raise self._bad(invalid, OFFSET_FLAGS, "HDGSTF does not match negotiated digest")
        if has_data and ddgst != self._ddgst:
            raise self._bad(invalid, OFFSET_FLAGS, "DDGSTF does not match negotiated digest")
        if ptype == _T_C2H_DATA and flags & FLAG_DATA_SUCCESS and not flags & FLAG_DATA_LAST:
            raise self._bad(invalid, OFFSET_FLAGS, "C2HData SUCCESS without LAST")
        if hlen != expected_hlen:
            raise self._bad(invalid, OFFSET_HLEN, f"bad hlen {hlen} for type {ptype:#x}")

        if not has_data:
            # CapsuleResp/R2T never carry data; a data PDU must (Linux rejects DATAL 0).
            if plen != base or ptype in (_T_H2C_DATA, _T_C2H_DATA):
                raise self._bad(invalid, OFFSET_PLEN, f"bad plen {plen} for type {ptype:#x}")
            return (ptype, flags, hlen, pdo, plen, hdgst, 0, False)

        if pdo < base or pdo % self._align:
            raise self._bad(
                invalid, OFFSET_PDO, f"bad pdo {pdo} (header end {base}, align {self._align})"
            )
        data_len = plen - pdo - (DIGEST_LEN if ddgst else 0)
        if data_len <= 0:
            raise self._bad(invalid, OFFSET_PLEN, f"plen {plen} leaves no data after pdo {pdo}")
        if plen > self._max_pdu_size:
            raise self._bad(
                Fes.DATA_TRANSFER_LIMIT_EXCEEDED,
                0,
                f"PDU of {plen} bytes exceeds limit {self._max_pdu_size}",
            )
        return (ptype, flags, hlen, pdo, plen, hdgst, data_len, ddgst)

    def _decode(self, hdr: _Header, view: memoryview, pos: int) -> Pdu:
        """Build the PDU from a complete, contiguous buffer at ``view[pos:]``."""
        ptype, flags, hlen, pdo, plen, hdgst, data_len, ddgst = hdr
        if hdgst:
            (got,) = _U32.unpack_from(view, pos + hlen)
            if got != _crc32c(view[pos : pos + hlen]):
                raise ProtocolError(
                    "header digest mismatch",
                    fes=Fes.HEADER_DIGEST_ERROR,
                    header=view[pos : pos + hlen],
                )
        data: bytes | memoryview = view[pos + pdo : pos + pdo + data_len] if data_len else b""
        pdu: Pdu
        if ptype == _T_CAPSULE_CMD:
            pdu = CapsuleCmd(bytes(view[pos + 8 : pos + 72]), data)
            if not ddgst:
                return pdu
        elif ptype == _T_H2C_DATA or ptype == _T_C2H_DATA:
            cccid, ttag, datao, datal = _DATA_FIELDS.unpack_from(view, pos + 8)
            if datal != data_len:
                raise ProtocolError(
                    f"DATAL {datal} does not match PDU data length {data_len}",
                    fes=Fes.INVALID_HEADER_FIELD,
                    fei=OFFSET_DATAL,
                    header=view[pos : pos + hlen],
                )
            last = bool(flags & FLAG_DATA_LAST)
            if ptype == _T_H2C_DATA:
                pdu = H2CData(cccid, ttag, datao, data, last)
            else:
                pdu = C2HData(cccid, datao, data, last, bool(flags & FLAG_DATA_SUCCESS))
        elif ptype == _T_CAPSULE_RESP:
            return CapsuleResp(bytes(view[pos + 8 : pos + 24]))
        elif ptype == _T_R2T:
            return R2T(*_DATA_FIELDS.unpack_from(view, pos + 8))
        elif ptype == self._term_type:
            fes, fei = _TERM_FIELDS.unpack_from(view, pos + 8)
            fes = Fes(fes) if fes in _FES_VALUES else fes
            return TermReq(
                ptype == _T_C2H_TERM_REQ, fes, fei, bytes(view[pos + hlen : pos + plen])
            )
        elif ptype == _T_IC_REQ:
            return ICReq(*_IC_FIELDS.unpack_from(view, pos + 8))
        else:  # IC_RESP; _check_common admitted nothing else
            return ICResp(*_IC_FIELDS.unpack_from(view, pos + 8))

        if ddgst:
            (got,) = _U32.unpack_from(view, pos + plen - DIGEST_LEN)
            if got != _crc32c(data):
                cccid = pdu.cccid if type(pdu) is not CapsuleCmd else pdu.cid
                raise DataDigestError(
                    f"data digest mismatch (cccid {cccid})",
                    pdu=pdu,
                    cccid=cccid,
                    header=view[pos : pos + hlen],
                )
        return pdu


def decode_one(
    data: Buffer,
    *,
    hdgst: bool = False,
    ddgst: bool = False,
    pda: int = 0,
    max_pdu_size: int = DEFAULT_MAX_PDU_SIZE,
) -> Pdu:
    """Decode exactly one complete PDU (tests, tools); direction comes from its type."""
    if not len(data):
        raise ValueError("no data")
    ptype = data[0]
    dec = Decoder(
        expect=CONTROLLER_TO_HOST if ptype & 1 else HOST_TO_CONTROLLER,
        max_pdu_size=max_pdu_size,
    )
    dec._ic_done = ptype not in (PduType.IC_REQ, PduType.IC_RESP)
    dec.set_digests(hdgst, ddgst)
    dec.set_pda(pda)
    pdus = dec.feed(data)
    if len(pdus) != 1 or dec.buffered:
        raise ValueError(f"expected one complete PDU, got {len(pdus)} and {dec.buffered} bytes")
    return pdus[0]
