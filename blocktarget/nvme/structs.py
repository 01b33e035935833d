"""Fixed NVMe / NVMe-oF data layouts: pack and parse, shared by target and initiator.

All integers are little-endian. Offsets were checked against the Linux kernel
(`include/linux/nvme.h`) and SPDK (`include/spdk/nvme_spec.h`, `nvmf_spec.h`), whose
structure definitions and static offset assertions agree on every field used here.

The per-command path (SQE parse, CQE pack) uses one precompiled `struct.Struct` each
and builds no intermediate objects; the admin-path structures (Identify, log pages)
are described by offset tables so that the builder and the parser share one source of
truth and a wrong offset shows up in both directions in the tests.

Status values are the 15-bit representation documented in `spec` (no phase bit).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from . import spec

_new_tuple = tuple.__new__

# ---------------------------------------------------------------------------
# Submission queue entry (64 bytes)
# ---------------------------------------------------------------------------
#   0 opcode u8 | 1 flags u8 (FUSE 1:0, PSDT 7:6) | 2 cid u16 | 4 nsid u32
#   (fabrics: fctype u8 at 4) | 8 cdw2 | 12 cdw3 | 16 mptr u64
#   24 SGL1: addr u64, 32 length u32, 36 reserved[3], 39 id (type 7:4, subtype 3:0)
#      (PRP1 at 24, PRP2 at 32 on PCIe) | 40 cdw10 .. 60 cdw15

_SQE = struct.Struct("<BBHIIIQQI3xBIIIIII")
_SQE_PRP = struct.Struct("<BBHIIIQQQIIIIII")
assert _SQE.size == spec.SQE_SIZE and _SQE_PRP.size == spec.SQE_SIZE


class Sqe(NamedTuple):
    """A parsed submission queue entry, SGL form (NVMe-oF always uses SGL1)."""

    opcode: int
    flags: int
    cid: int
    nsid: int
    cdw2: int
    cdw3: int
    mptr: int
    sgl_addr: int
    sgl_len: int
    sgl_id: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @property
    def fctype(self) -> int:
        return self.nsid & 0xFF

    @property
    def fuse(self) -> int:
        return self.flags & spec.FUSE_MASK

    @property
    def psdt(self) -> int:
        return self.flags >> spec.PSDT_SHIFT

    @property
    def sgl_type(self) -> int:
        return self.sgl_id >> 4

    @property
    def sgl_subtype(self) -> int:
        return self.sgl_id & 0xF

    @property
    def slba(self) -> int:
        return self.cdw10 | (self.cdw11 << 32)

    @property
    def nlb(self) -> int:
        """Number of logical blocks of a read/write-like command (NLB is 0's based)."""
        return (self.cdw12 & spec.RW_NLB_MASK) + 1


def parse_sqe(buf: bytes | bytearray | memoryview, offset: int = 0) -> Sqe:
    """Decode one SQE with a single unpack; no validation (handlers own that).
    A short buffer is a ValueError like every other parser's bad input (struct.error
    is not one, and callers only catch ValueError)."""
    try:
        return _new_tuple(Sqe, _SQE.unpack_from(buf, offset))
    except struct.error as exc:
        raise ValueError(f"SQE: {exc}") from None


def build_sqe(
    opcode: int,
    cid: int,
    nsid: int = 0,
    *,
    flags: int = 0,
    cdw2: int = 0,
    cdw3: int = 0,
    mptr: int = 0,
    sgl_addr: int = 0,
    sgl_len: int = 0,
    sgl_id: int = 0,
    prp1: int | None = None,
    prp2: int | None = None,
    cdw10: int = 0,
    cdw11: int = 0,
    cdw12: int = 0,
    cdw13: int = 0,
    cdw14: int = 0,
    cdw15: int = 0,
) -> bytes:
    """Encode an SQE; the data pointer is either SGL1 (fabrics) or PRP1/PRP2 (PCIe)."""
    if prp1 is not None or prp2 is not None:
        if sgl_addr or sgl_len or sgl_id:
            raise ValueError("give either an SGL or PRPs, not both")
        return _SQE_PRP.pack(
            opcode, flags, cid, nsid, cdw2, cdw3, mptr, prp1 or 0, prp2 or 0,
            cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
        )
    return _SQE.pack(
        opcode, flags, cid, nsid, cdw2, cdw3, mptr, sgl_addr, sgl_len, sgl_id,
        cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
    )


def build_fabrics_sqe(
    fctype: int,
    cid: int,
    *,
    sgl_addr: int = 0,
    sgl_len: int = 0,
    sgl_id: int = 0,
    cdw10: int = 0,
    cdw11: int = 0,
    cdw12: int = 0,
    cdw13: int = 0,
    cdw14: int = 0,
    cdw15: int = 0,
) -> bytes:
    """A fabrics command capsule: opcode 7Fh, fctype at byte 4, bytes 40..63 specific."""
    return _SQE.pack(
        spec.FABRICS_OPCODE, 0, cid, fctype, 0, 0, 0, sgl_addr, sgl_len, sgl_id,
        cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
    )


class ConnectCmd(NamedTuple):
    recfmt: int
    qid: int
    sqsize: int
    cattr: int
    kato: int


def connect_fields(sqe: Sqe) -> ConnectCmd:
    """Connect SQE: recfmt @40, qid @42, sqsize @44 (0's based), cattr @46, kato @48 (ms)."""
    return ConnectCmd(
        sqe.cdw10 & 0xFFFF,
        sqe.cdw10 >> 16,
        sqe.cdw11 & 0xFFFF,
        (sqe.cdw11 >> 16) & 0xFF,
        sqe.cdw12,
    )


def build_connect_sqe(
    cid: int,
    qid: int,
    sqsize: int,
    kato_ms: int = 0,
    *,
    cattr: int = 0,
    recfmt: int = spec.CONNECT_RECFMT,
    sgl_len: int = spec.CONNECT_DATA_SIZE,
    sgl_id: int = spec.SGL_ID_INCAPSULE,
) -> bytes:
    """Connect with its 1024-byte data in capsule (`sqsize` is 0's based)."""
    return build_fabrics_sqe(
        spec.FabricsType.CONNECT, cid, sgl_len=sgl_len, sgl_id=sgl_id,
        cdw10=recfmt | (qid << 16), cdw11=sqsize | ((cattr & 0xFF) << 16), cdw12=kato_ms,
    )


class PropertyCmd(NamedTuple):
    size: int
    offset: int
    value: int


def property_fields(sqe: Sqe) -> PropertyCmd:
    """Property Get/Set: ATTRIB @40 (size code 0 -> 4 bytes, 1 -> 8), OFST @44,
    VALUE @48 (Set only). `size` is returned in bytes (0 for a reserved code)."""
    code = sqe.cdw10 & 0x7
    size = 4 if code == spec.PropertySize.SIZE_4 else 8 if code == spec.PropertySize.SIZE_8 else 0
    return PropertyCmd(size, sqe.cdw11, sqe.cdw12 | (sqe.cdw13 << 32))


def build_property_get_sqe(cid: int, offset: int, size: int = 4) -> bytes:
    return build_fabrics_sqe(
        spec.FabricsType.PROPERTY_GET, cid, cdw10=_property_size_code(size), cdw11=offset
    )


def build_property_set_sqe(cid: int, offset: int, value: int, size: int = 4) -> bytes:
    return build_fabrics_sqe(
        spec.FabricsType.PROPERTY_SET, cid, cdw10=_property_size_code(size), cdw11=offset,
        cdw12=value & 0xFFFFFFFF, cdw13=value >> 32,
    )


def _property_size_code(size: int) -> int:
    if size == 4:
        return spec.PropertySize.SIZE_4
    if size == 8:
        return spec.PropertySize.SIZE_8
    raise ValueError(f"property size must be 4 or 8, not {size}")


class AuthCmd(NamedTuple):
    secp: int
    spsp0: int
    spsp1: int
    length: int


def auth_fields(sqe: Sqe) -> AuthCmd:
    """Authentication Send/Receive: SPSP0 @41, SPSP1 @42, SECP @43, TL/AL @44."""
    return AuthCmd(sqe.cdw10 >> 24, (sqe.cdw10 >> 8) & 0xFF, (sqe.cdw10 >> 16) & 0xFF, sqe.cdw11)


def build_auth_sqe(
    fctype: int, cid: int, secp: int, spsp0: int, spsp1: int, length: int, *,
    sgl_len: int = 0, sgl_id: int = spec.SGL_ID_INCAPSULE,
) -> bytes:
    return build_fabrics_sqe(
        fctype, cid, sgl_len=sgl_len, sgl_id=sgl_id,
        cdw10=(secp << 24) | (spsp1 << 16) | (spsp0 << 8), cdw11=length,
    )


# ---------------------------------------------------------------------------
# Completion queue entry (16 bytes)
# ---------------------------------------------------------------------------
#   0 dw0 | 4 dw1 | 8 sqhd u16 | 10 sqid u16 | 12 cid u16 | 14 status<<1 | phase

_CQE = struct.Struct("<IIHHHH")
assert _CQE.size == spec.CQE_SIZE


class Cqe(NamedTuple):
    dw0: int
    dw1: int
    sqhd: int
    sqid: int
    cid: int
    status: int
    phase: int

    @property
    def result64(self) -> int:
        """Dwords 0-1 as one value (Property Get of an 8-byte property)."""
        return self.dw0 | (self.dw1 << 32)


def pack_cqe(cid: int, status: int, sqhd: int = 0, sqid: int = 0, dw0: int = 0, dw1: int = 0) -> bytes:
    """A fabrics CQE (phase 0); `status` is the 15-bit value from `spec.make_status`."""
    return _CQE.pack(dw0, dw1, sqhd, sqid, cid, status << 1)


def pack_cqe_into(
    buf: bytearray | memoryview, offset: int, cid: int, status: int,
    sqhd: int = 0, sqid: int = 0, dw0: int = 0, dw1: int = 0,
) -> None:
    """Like `pack_cqe` but straight into a PDU buffer, avoiding a copy."""
    _CQE.pack_into(buf, offset, dw0, dw1, sqhd, sqid, cid, status << 1)


def parse_cqe(buf: bytes | bytearray | memoryview, offset: int = 0) -> Cqe:
    try:  # short input: ValueError, as parse_sqe
        dw0, dw1, sqhd, sqid, cid, raw = _CQE.unpack_from(buf, offset)
    except struct.error as exc:
        raise ValueError(f"CQE: {exc}") from None
    return _new_tuple(Cqe, (dw0, dw1, sqhd, sqid, cid, raw >> 1, raw & 1))


def connect_success_dw0(cntlid: int, authreq: int = 0) -> int:
    """Connect response dword 0: CNTLID in 15:0, AUTHREQ bits (spec.CONNECT_AUTHREQ_*)."""
    return cntlid | authreq


def connect_invalid_param_dw0(offset: int, in_data: bool) -> int:
    """Connect Invalid Parameters response dword 0: IPO (byte offset of the bad field)
    in 15:0, IATTR bit 16 set when the offset is into the Connect data, not the SQE."""
    return (spec.CONNECT_IATTR_DATA if in_data else 0) | (offset & 0xFFFF)


# ---------------------------------------------------------------------------
# String fields
# ---------------------------------------------------------------------------


def _pad_ascii(value: str, size: int, name: str) -> bytes:
    """Identify/discovery ASCII fields: left justified, space padded, no terminator."""
    raw = value.encode("ascii")
    if len(raw) > size:
        raise ValueError(f"{name} longer than {size} bytes: {value!r}")
    return raw.ljust(size, b" ")


def _pad_nul(value: str, size: int, name: str) -> bytes:
    """NQN fields: UTF-8, NUL terminated within the field."""
    raw = value.encode("utf-8")
    if len(raw) >= size:
        raise ValueError(f"{name} must be shorter than {size} bytes: {value!r}")
    return raw.ljust(size, b"\0")


def _unpad_ascii(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").rstrip(" ")


def _unpad_nul(raw: bytes) -> str:
    """Decode a NUL-padded UTF-8 field; raises ValueError (UnicodeDecodeError) on bad
    bytes so that Connect can reject the host instead of guessing."""
    return raw.split(b"\0", 1)[0].decode("utf-8")


# ---------------------------------------------------------------------------
# Offset tables for admin-path structures
# ---------------------------------------------------------------------------
# (name, offset, kind, size): kind is a struct code ("B", "H", "I", "Q"), "u128",
# "ascii" (space padded), "nqn" (NUL padded UTF-8) or "raw" (bytes, zero padded).

_Field = tuple[str, int, str, int]
_INT_SIZES = {"B": 1, "H": 2, "I": 4, "Q": 8}


def _f(name: str, offset: int, kind: str, size: int = 0) -> _Field:
    return (name, offset, kind, size or _INT_SIZES.get(kind, 16 if kind == "u128" else 0))


def _pack_fields(
    buf: bytearray, base: int, table: Sequence[_Field], values: Mapping[str, Any], what: str
) -> None:
    known = {f[0] for f in table}
    unknown = set(values) - known
    if unknown:
        raise TypeError(f"unknown {what} fields: {sorted(unknown)}")
    for name, offset, kind, size in table:
        if name not in values:
            continue
        value = values[name]
        pos = base + offset
        if kind in _INT_SIZES:
            struct.pack_into("<" + kind, buf, pos, value)
        elif kind == "u128":
            if not 0 <= value < 1 << 128:
                raise ValueError(f"{name} does not fit 128 bits")
            buf[pos:pos + 16] = value.to_bytes(16, "little")
        elif kind == "ascii":
            buf[pos:pos + size] = _pad_ascii(value, size, name)
        elif kind == "nqn":
            buf[pos:pos + size] = _pad_nul(value, size, name)
        else:
            raw = bytes(value)
            if len(raw) > size:
                raise ValueError(f"{name} longer than {size} bytes")
            buf[pos:pos + len(raw)] = raw


def _unpack_fields(buf: bytes | memoryview, base: int, table: Sequence[_Field]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, offset, kind, size in table:
        pos = base + offset
        if kind in _INT_SIZES:
            out[name] = struct.unpack_from("<" + kind, buf, pos)[0]
        elif kind == "u128":
            out[name] = int.from_bytes(buf[pos:pos + 16], "little")
        elif kind == "ascii":
            out[name] = _unpad_ascii(bytes(buf[pos:pos + size]))
        elif kind == "nqn":
            out[name] = _unpad_nul(bytes(buf[pos:pos + size]))
        else:
            out[name] = bytes(buf[pos:pos + size])
    return out


def _need(buf: bytes | bytearray | memoryview, size: int, what: str) -> memoryview:
    if len(buf) < size:
        raise ValueError(f"{what} needs {size} bytes, got {len(buf)}")
    return memoryview(buf)


# ---------------------------------------------------------------------------
# Connect data (1024 bytes)
# ---------------------------------------------------------------------------

_CONNECT_DATA = struct.Struct("<16sH238x256s256s256x")
assert _CONNECT_DATA.size == spec.CONNECT_DATA_SIZE


class ConnectData(NamedTuple):
    hostid: bytes
    cntlid: int
    subnqn: str
    hostnqn: str


CONNECT_DATA_OFFSETS = {"hostid": 0, "cntlid": 16, "subnqn": 256, "hostnqn": 512}


def build_connect_data(hostid: bytes, cntlid: int, subnqn: str, hostnqn: str) -> bytes:
    if len(hostid) != 16:
        raise ValueError("hostid must be 16 bytes")
    return _CONNECT_DATA.pack(
        bytes(hostid), cntlid,
        _pad_nul(subnqn, spec.NQN_FIELD_LEN, "subnqn"),
        _pad_nul(hostnqn, spec.NQN_FIELD_LEN, "hostnqn"),
    )


def parse_connect_data(buf: bytes | bytearray | memoryview) -> ConnectData:
    """Raises ValueError on a short buffer or NQN bytes that are not UTF-8."""
    mv = _need(buf, spec.CONNECT_DATA_SIZE, "Connect data")
    hostid, cntlid, subnqn, hostnqn = _CONNECT_DATA.unpack_from(mv)
    return ConnectData(hostid, cntlid, _unpad_nul(subnqn), _unpad_nul(hostnqn))


# ---------------------------------------------------------------------------
# Identify Controller (CNS 01h, 4096 bytes)
# ---------------------------------------------------------------------------

IDENTIFY_CTRL_FIELDS: tuple[_Field, ...] = (
    _f("vid", 0, "H"),
    _f("ssvid", 2, "H"),
    _f("sn", 4, "ascii", 20),
    _f("mn", 24, "ascii", 40),
    _f("fr", 64, "ascii", 8),
    _f("rab", 72, "B"),
    _f("ieee", 73, "raw", 3),
    _f("cmic", 76, "B"),
    _f("mdts", 77, "B"),
    _f("cntlid", 78, "H"),
    _f("ver", 80, "I"),
    _f("rtd3r", 84, "I"),
    _f("rtd3e", 88, "I"),
    _f("oaes", 92, "I"),
    _f("ctratt", 96, "I"),
    _f("rrls", 100, "H"),
    _f("cntrltype", 111, "B"),
    _f("fguid", 112, "raw", 16),
    _f("crdt1", 128, "H"),
    _f("crdt2", 130, "H"),
    _f("crdt3", 132, "H"),
    _f("nvmsr", 253, "B"),
    _f("vwci", 254, "B"),
    _f("mec", 255, "B"),
    _f("oacs", 256, "H"),
    _f("acl", 258, "B"),
    _f("aerl", 259, "B"),
    _f("frmw", 260, "B"),
    _f("lpa", 261, "B"),
    _f("elpe", 262, "B"),
    _f("npss", 263, "B"),
    _f("avscc", 264, "B"),
    _f("apsta", 265, "B"),
    _f("wctemp", 266, "H"),
    _f("cctemp", 268, "H"),
    _f("mtfa", 270, "H"),
    _f("hmpre", 272, "I"),
    _f("hmmin", 276, "I"),
    _f("tnvmcap", 280, "u128"),
    _f("unvmcap", 296, "u128"),
    _f("rpmbs", 312, "I"),
    _f("edstt", 316, "H"),
    _f("dsto", 318, "B"),
    _f("fwug", 319, "B"),
    _f("kas", 320, "H"),
    _f("hctma", 322, "H"),
    _f("mntmt", 324, "H"),
    _f("mxtmt", 326, "H"),
    _f("sanicap", 328, "I"),
    _f("hmminds", 332, "I"),
    _f("hmmaxd", 336, "H"),
    _f("nsetidmax", 338, "H"),
    _f("endgidmax", 340, "H"),
    _f("anatt", 342, "B"),
    _f("anacap", 343, "B"),
    _f("anagrpmax", 344, "I"),
    _f("nanagrpid", 348, "I"),
    _f("pels", 352, "I"),
    _f("sqes", 512, "B"),
    _f("cqes", 513, "B"),
    _f("maxcmd", 514, "H"),
    _f("nn", 516, "I"),
    _f("oncs", 520, "H"),
    _f("fuses", 522, "H"),
    _f("fna", 524, "B"),
    _f("vwc", 525, "B"),
    _f("awun", 526, "H"),
    _f("awupf", 528, "H"),
    _f("nvscc", 530, "B"),
    _f("nwpc", 531, "B"),
    _f("acwu", 532, "H"),
    _f("ocfs", 534, "H"),
    _f("sgls", 536, "I"),
    _f("mnan", 540, "I"),
    _f("maxcna", 560, "I"),
    _f("subnqn", 768, "nqn", 256),
    _f("ioccsz", 1792, "I"),
    _f("iorcsz", 1796, "I"),
    _f("icdoff", 1800, "H"),
    _f("fcatt", 1802, "B"),
    _f("msdbd", 1803, "B"),
    _f("ofcs", 1804, "H"),
    _f("dctype", 1806, "B"),
)

IDENTIFY_CTRL_PSD_OFFSET = 2048
IDENTIFY_CTRL_PSD_COUNT = 32
IDENTIFY_CTRL_VS_OFFSET = 3072

_PSD = struct.Struct("<HxBIIBBBBHBxHB9x")
assert _PSD.size == 32


class PowerState(NamedTuple):
    """Power state descriptor; `flags` holds MXPS (bit 0) and NOPS (bit 1), `ips` and
    `apw_aps` are the raw scale/workload bytes at 18 and 22."""

    mp: int = 0
    flags: int = 0
    enlat: int = 0
    exlat: int = 0
    rrt: int = 0
    rrl: int = 0
    rwt: int = 0
    rwl: int = 0
    idlp: int = 0
    ips: int = 0
    actp: int = 0
    apw_aps: int = 0


def build_identify_ctrl(
    *, psd: Sequence[PowerState] = (), vs: bytes = b"", **fields: Any
) -> bytes:
    """Identify Controller data from keyword fields (names as in IDENTIFY_CTRL_FIELDS);
    unset fields are zero. `npss` defaults to len(psd) - 1 when psd is given."""
    if len(psd) > IDENTIFY_CTRL_PSD_COUNT:
        raise ValueError("at most 32 power states")
    if psd and "npss" not in fields:
        fields["npss"] = len(psd) - 1
    buf = bytearray(spec.IDENTIFY_DATA_SIZE)
    _pack_fields(buf, 0, IDENTIFY_CTRL_FIELDS, fields, "Identify Controller")
    for i, ps in enumerate(psd):
        _PSD.pack_into(buf, IDENTIFY_CTRL_PSD_OFFSET + 32 * i, *ps)
    if len(vs) > 1024:
        raise ValueError("vendor specific area is 1024 bytes")
    buf[IDENTIFY_CTRL_VS_OFFSET:IDENTIFY_CTRL_VS_OFFSET + len(vs)] = vs
    return bytes(buf)


def parse_identify_ctrl(buf: bytes | bytearray | memoryview) -> dict[str, Any]:
    """All IDENTIFY_CTRL_FIELDS plus `psd` (npss + 1 PowerState entries)."""
    mv = _need(buf, spec.IDENTIFY_DATA_SIZE, "Identify Controller")
    out = _unpack_fields(mv, 0, IDENTIFY_CTRL_FIELDS)
    count = min(out["npss"] + 1, IDENTIFY_CTRL_PSD_COUNT)
    out["psd"] = [
        PowerState(*_PSD.unpack_from(mv, IDENTIFY_CTRL_PSD_OFFSET + 32 * i)) for i in range(count)
    ]
    return out


# ---------------------------------------------------------------------------
# Identify Namespace (CNS 00h, 4096 bytes)
# ---------------------------------------------------------------------------

IDENTIFY_NS_FIELDS: tuple[_Field, ...] = (
    _f("nsze", 0, "Q"),
    _f("ncap", 8, "Q"),
    _f("nuse", 16, "Q"),
    _f("nsfeat", 24, "B"),
    _f("nlbaf", 25, "B"),
    _f("flbas", 26, "B"),
    _f("mc", 27, "B"),
    _f("dpc", 28, "B"),
    _f("dps", 29, "B"),
    _f("nmic", 30, "B"),
    _f("rescap", 31, "B"),
    _f("fpi", 32, "B"),
    _f("dlfeat", 33, "B"),
    _f("nawun", 34, "H"),
    _f("nawupf", 36, "H"),
    _f("nacwu", 38, "H"),
    _f("nabsn", 40, "H"),
    _f("nabo", 42, "H"),
    _f("nabspf", 44, "H"),
    _f("noiob", 46, "H"),
    _f("nvmcap", 48, "u128"),
    _f("npwg", 64, "H"),
    _f("npwa", 66, "H"),
    _f("npdg", 68, "H"),
    _f("npda", 70, "H"),
    _f("nows", 72, "H"),
    _f("mssrl", 74, "H"),
    _f("mcl", 76, "I"),
    _f("msrc", 80, "B"),
    _f("anagrpid", 92, "I"),
    _f("nsattr", 99, "B"),
    _f("nvmsetid", 100, "H"),
    _f("endgid", 102, "H"),
    _f("nguid", 104, "raw", 16),
    _f("eui64", 120, "raw", 8),
)

IDENTIFY_NS_LBAF_OFFSET = 128
IDENTIFY_NS_LBAF_COUNT = 64
_LBAF = struct.Struct("<HBB")


class LbaFormat(NamedTuple):
    """`lbads` is log2 of the data size; `rp` is the raw byte (bits 1:0 relative perf)."""

    ms: int = 0
    lbads: int = 9
    rp: int = 0


def build_identify_ns(*, lbaf: Sequence[LbaFormat] = (), **fields: Any) -> bytes:
    """Identify Namespace data; `nlbaf` (0's based) defaults to len(lbaf) - 1."""
    if len(lbaf) > IDENTIFY_NS_LBAF_COUNT:
        raise ValueError("at most 64 LBA formats")
    if lbaf and "nlbaf" not in fields:
        fields["nlbaf"] = len(lbaf) - 1
    buf = bytearray(spec.IDENTIFY_DATA_SIZE)
    _pack_fields(buf, 0, IDENTIFY_NS_FIELDS, fields, "Identify Namespace")
    for i, fmt in enumerate(lbaf):
        _LBAF.pack_into(buf, IDENTIFY_NS_LBAF_OFFSET + 4 * i, *fmt)
    return bytes(buf)


def parse_identify_ns(buf: bytes | bytearray | memoryview) -> dict[str, Any]:
    """All IDENTIFY_NS_FIELDS plus `lbaf` (nlbaf + 1 LbaFormat entries)."""
    mv = _need(buf, spec.IDENTIFY_DATA_SIZE, "Identify Namespace")
    out = _unpack_fields(mv, 0, IDENTIFY_NS_FIELDS)
    count = min(out["nlbaf"] + 1, IDENTIFY_NS_LBAF_COUNT)
    out["lbaf"] = [
        LbaFormat(*_LBAF.unpack_from(mv, IDENTIFY_NS_LBAF_OFFSET + 4 * i)) for i in range(count)
    ]
    return out


def flbas_index(flbas: int) -> int:
    """The LBA format index in use: bits 3:0 plus the high bits 6:5 (when nlbaf > 16)."""
    return (flbas & spec.FLBAS_FORMAT_MASK) | ((flbas & spec.FLBAS_FORMAT_MSB_MASK) >> 1)


# ---------------------------------------------------------------------------
# Namespace Identification Descriptor list (CNS 03h) and namespace lists (CNS 02h)
# ---------------------------------------------------------------------------

_NID_HDR = struct.Struct("<BBxx")


def build_ns_desc_list(descs: Iterable[tuple[int, bytes]]) -> bytes:
    """Descriptors (NIDT, value) one after another, terminated by zeros (4096 bytes)."""
    buf = bytearray(spec.IDENTIFY_DATA_SIZE)
    pos = 0
    for nidt, value in descs:
        value = bytes(value)
        expected = spec.NID_LENGTHS.get(nidt)
        if expected is not None and len(value) != expected:
            raise ValueError(f"NIDT {nidt} needs {expected} bytes, got {len(value)}")
        if not 0 < len(value) <= 0xFF:
            raise ValueError("descriptor length must be 1..255")
        end = pos + _NID_HDR.size + len(value)
        if end > len(buf):
            raise ValueError("descriptors do not fit 4096 bytes")
        _NID_HDR.pack_into(buf, pos, nidt, len(value))
        buf[pos + _NID_HDR.size:end] = value
        pos = end
    return bytes(buf)


def parse_ns_desc_list(buf: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    mv = memoryview(buf)
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + _NID_HDR.size <= len(mv):
        nidt, nidl = _NID_HDR.unpack_from(mv, pos)
        if nidt == 0 or nidl == 0:
            break
        start = pos + _NID_HDR.size
        if start + nidl > len(mv):
            raise ValueError("truncated namespace identification descriptor")
        out.append((nidt, bytes(mv[start:start + nidl])))
        pos = start + nidl
    return out


def build_ns_list(nsids: Iterable[int], after: int = 0) -> bytes:
    """Active (or allocated) NSID list: the first 1024 NSIDs greater than `after`, in
    increasing order, zero filled to 4096 bytes."""
    chosen = sorted(n for n in set(nsids) if n > after)[: spec.NS_LIST_MAX]
    return struct.pack(f"<{len(chosen)}I", *chosen).ljust(spec.IDENTIFY_DATA_SIZE, b"\0")


def parse_ns_list(buf: bytes | bytearray | memoryview) -> list[int]:
    mv = memoryview(buf)
    count = min(len(mv) // 4, spec.NS_LIST_MAX)
    out: list[int] = []
    for nsid in struct.unpack_from(f"<{count}I", mv):
        if nsid == 0:
            break
        out.append(nsid)
    return out


# ---------------------------------------------------------------------------
# Log pages
# ---------------------------------------------------------------------------


def slice_log(page: bytes | bytearray | memoryview, offset: int, length: int) -> bytes:
    """The bytes a Get Log Page returns: `length` bytes from `offset`, zero filled past
    the end of the page. Whether an offset beyond the page is an error is the handler's
    decision (it has the command to blame); this never fails."""
    if offset < 0 or length < 0:
        raise ValueError("negative offset or length")
    chunk = bytes(page[offset:offset + length]) if offset < len(page) else b""
    if len(chunk) < length:
        chunk += bytes(length - len(chunk))
    return chunk


class GetLogPageArgs(NamedTuple):
    lid: int
    lsp: int
    rae: bool
    length: int
    lsi: int
    offset: int
    csi: int


def decode_get_log_page(
    cdw10: int, cdw11: int, cdw12: int = 0, cdw13: int = 0, cdw14: int = 0
) -> GetLogPageArgs:
    """CDW10: LID 7:0, LSP 14:8, RAE 15, NUMDL 31:16; CDW11: NUMDU 15:0, LSI 31:16;
    CDW12/13: LPO; CDW14: CSI 31:24. `length` is bytes, (NUMD + 1) * 4."""
    numd = (cdw10 >> 16) | ((cdw11 & 0xFFFF) << 16)
    return GetLogPageArgs(
        cdw10 & 0xFF,
        (cdw10 >> 8) & 0x7F,
        bool(cdw10 & (1 << 15)),
        (numd + 1) * 4,
        cdw11 >> 16,
        cdw12 | (cdw13 << 32),
        cdw14 >> 24,
    )


def encode_get_log_page(
    lid: int, length: int, offset: int = 0, *, lsp: int = 0, rae: bool = False,
    lsi: int = 0, csi: int = 0,
) -> tuple[int, int, int, int, int]:
    """CDW10..CDW14 for the initiator; `length` must be a positive multiple of 4."""
    if length <= 0 or length % 4:
        raise ValueError("log page length must be a positive multiple of 4")
    if offset % 4:
        raise ValueError("log page offset must be dword aligned")
    numd = length // 4 - 1
    cdw10 = lid | ((lsp & 0x7F) << 8) | (int(rae) << 15) | ((numd & 0xFFFF) << 16)
    cdw11 = (numd >> 16) | (lsi << 16)
    return cdw10, cdw11, offset & 0xFFFFFFFF, offset >> 32, csi << 24


class IdentifyArgs(NamedTuple):
    cns: int
    cntid: int
    cnssid: int
    csi: int


def decode_identify(cdw10: int, cdw11: int = 0) -> IdentifyArgs:
    """CDW10: CNS 7:0, CNTID 31:16; CDW11: CNS specific id 15:0, CSI 31:24."""
    return IdentifyArgs(cdw10 & 0xFF, cdw10 >> 16, cdw11 & 0xFFFF, cdw11 >> 24)


def encode_identify(cns: int, cntid: int = 0, cnssid: int = 0, csi: int = 0) -> tuple[int, int]:
    return cns | (cntid << 16), cnssid | (csi << 24)


# Error Information (LID 01h): 64-byte entries -------------------------------

_ERROR_ENTRY = struct.Struct("<QHHHHQIBB2xQH22x")
assert _ERROR_ENTRY.size == spec.ERROR_LOG_ENTRY_SIZE


class ErrorLogEntry(NamedTuple):
    """`status` is the 15-bit status (stored on the wire shifted left by one, as in the
    CQE). `param_error_location` defaults to ERROR_LOCATION_NONE, what the Linux target
    reports when no command field is to blame."""

    error_count: int
    sqid: int
    cid: int
    status: int
    param_error_location: int = spec.ERROR_LOCATION_NONE
    lba: int = 0
    nsid: int = 0
    vs: int = 0
    trtype: int = 0
    cs: int = 0
    trtype_specific: int = 0


def build_error_log(entries: Iterable[ErrorLogEntry]) -> bytes:
    """Entries newest first, as the host expects."""
    out = bytearray()
    for e in entries:
        out += _ERROR_ENTRY.pack(
            e.error_count, e.sqid, e.cid, e.status << 1, e.param_error_location, e.lba,
            e.nsid, e.vs, e.trtype, e.cs, e.trtype_specific,
        )
    return bytes(out)


def parse_error_log(buf: bytes | bytearray | memoryview) -> list[ErrorLogEntry]:
    """Stops at the first entry with a zero error count (an unused slot)."""
    mv = memoryview(buf)
    out: list[ErrorLogEntry] = []
    for pos in range(0, len(mv) - spec.ERROR_LOG_ENTRY_SIZE + 1, spec.ERROR_LOG_ENTRY_SIZE):
        f = list(_ERROR_ENTRY.unpack_from(mv, pos))
        if f[0] == 0:
            break
        f[3] >>= 1
        out.append(ErrorLogEntry(*f))
    return out


# SMART / Health Information (LID 02h): 512 bytes ----------------------------

SMART_LOG_FIELDS: tuple[_Field, ...] = (
    _f("critical_warning", 0, "B"),
    _f("temperature", 1, "H"),
    _f("avail_spare", 3, "B"),
    _f("spare_thresh", 4, "B"),
    _f("percent_used", 5, "B"),
    _f("endurance_group_critical", 6, "B"),
    _f("data_units_read", 32, "u128"),
    _f("data_units_written", 48, "u128"),
    _f("host_read_commands", 64, "u128"),
    _f("host_write_commands", 80, "u128"),
    _f("ctrl_busy_time", 96, "u128"),
    _f("power_cycles", 112, "u128"),
    _f("power_on_hours", 128, "u128"),
    _f("unsafe_shutdowns", 144, "u128"),
    _f("media_errors", 160, "u128"),
    _f("num_err_log_entries", 176, "u128"),
    _f("warning_temp_time", 192, "I"),
    _f("critical_temp_time", 196, "I"),
    *(_f(f"temp_sensor{i + 1}", 200 + 2 * i, "H") for i in range(8)),
    _f("thermal_mgmt_temp1_count", 216, "I"),
    _f("thermal_mgmt_temp2_count", 220, "I"),
    _f("thermal_mgmt_temp1_time", 224, "I"),
    _f("thermal_mgmt_temp2_time", 228, "I"),
)


def build_smart_log(**fields: Any) -> bytes:
    """`temperature` is in Kelvin; data units are thousands of 512-byte units."""
    buf = bytearray(spec.SMART_LOG_SIZE)
    _pack_fields(buf, 0, SMART_LOG_FIELDS, fields, "SMART log")
    return bytes(buf)


def parse_smart_log(buf: bytes | bytearray | memoryview) -> dict[str, Any]:
    return _unpack_fields(_need(buf, spec.SMART_LOG_SIZE, "SMART log"), 0, SMART_LOG_FIELDS)


# Firmware Slot Information (LID 03h): 512 bytes -----------------------------

FW_SLOT_LOG_FIELDS: tuple[_Field, ...] = (
    _f("afi", 0, "B"),
    *(_f(f"frs{i + 1}", 8 + 8 * i, "ascii", 8) for i in range(7)),
)


def build_fw_slot_log(afi: int, revisions: Sequence[str]) -> bytes:
    """AFI: active slot in bits 2:0, next-reset slot in 6:4; revisions for slots 1..7
    (space padded); unnamed slots stay zero."""
    if len(revisions) > 7:
        raise ValueError("at most 7 firmware slots")
    fields: dict[str, Any] = {"afi": afi}
    fields.update({f"frs{i + 1}": rev for i, rev in enumerate(revisions)})
    buf = bytearray(spec.FW_SLOT_LOG_SIZE)
    _pack_fields(buf, 0, FW_SLOT_LOG_FIELDS, fields, "firmware slot log")
    return bytes(buf)


def parse_fw_slot_log(buf: bytes | bytearray | memoryview) -> tuple[int, list[str]]:
    out = _unpack_fields(_need(buf, spec.FW_SLOT_LOG_SIZE, "firmware slot log"), 0,
                         FW_SLOT_LOG_FIELDS)
    return out["afi"], [out[f"frs{i + 1}"] for i in range(7)]


# Changed Namespace List (LID 04h): 1024 NSIDs -------------------------------


def build_changed_ns_list(nsids: Iterable[int]) -> bytes:
    """Up to 1024 changed NSIDs in increasing order; more than that is reported as a
    single FFFFFFFFh entry."""
    chosen = sorted(set(nsids))
    if len(chosen) > spec.MAX_CHANGED_NAMESPACES:
        chosen = [spec.CHANGED_NS_OVERFLOW]
    return struct.pack(f"<{len(chosen)}I", *chosen).ljust(4 * spec.MAX_CHANGED_NAMESPACES, b"\0")


def parse_changed_ns_list(buf: bytes | bytearray | memoryview) -> list[int]:
    return parse_ns_list(buf)


# Commands Supported and Effects (LID 05h): 4096 bytes -----------------------

CMD_EFFECTS_IO_OFFSET = 1024
_EFFECTS = struct.Struct("<256I256I2048x")
assert _EFFECTS.size == spec.CMD_EFFECTS_LOG_SIZE


def build_cmd_effects_log(admin: Mapping[int, int], io: Mapping[int, int]) -> bytes:
    """Maps opcode -> effects (spec.CmdEffects bits) for admin and I/O commands."""
    acs = [0] * 256
    iocs = [0] * 256
    for opcode, effects in admin.items():
        acs[opcode] = int(effects)
    for opcode, effects in io.items():
        iocs[opcode] = int(effects)
    return _EFFECTS.pack(*acs, *iocs)


def parse_cmd_effects_log(buf: bytes | bytearray | memoryview) -> tuple[dict[int, int], dict[int, int]]:
    values = _EFFECTS.unpack_from(_need(buf, spec.CMD_EFFECTS_LOG_SIZE, "command effects log"))
    admin = {op: v for op, v in enumerate(values[:256]) if v}
    io = {op: v for op, v in enumerate(values[256:]) if v}
    return admin, io


# Asymmetric Namespace Access (LID 0Ch) --------------------------------------

_ANA_HDR = struct.Struct("<QH6x")
_ANA_GROUP = struct.Struct("<IIQB15x")
assert _ANA_HDR.size == spec.ANA_LOG_HEADER_SIZE and _ANA_GROUP.size == spec.ANA_GROUP_DESC_SIZE


class AnaGroup(NamedTuple):
    grpid: int
    state: int
    nsids: tuple[int, ...] = ()
    chgcnt: int = 0


def build_ana_log(chgcnt: int, groups: Sequence[AnaGroup], rgo: bool = False) -> bytes:
    """Header then one descriptor per group; with `rgo` (LSP bit 0, "return groups
    only") the NSID lists are omitted and NNSIDS is zero."""
    out = bytearray(_ANA_HDR.pack(chgcnt, len(groups)))
    for g in groups:
        nsids = () if rgo else tuple(sorted(g.nsids))
        out += _ANA_GROUP.pack(g.grpid, len(nsids), g.chgcnt, g.state)
        out += struct.pack(f"<{len(nsids)}I", *nsids)
    return bytes(out)


def parse_ana_log(buf: bytes | bytearray | memoryview) -> tuple[int, list[AnaGroup]]:
    mv = _need(buf, spec.ANA_LOG_HEADER_SIZE, "ANA log")
    chgcnt, ngrps = _ANA_HDR.unpack_from(mv)
    pos = _ANA_HDR.size
    groups: list[AnaGroup] = []
    for _ in range(ngrps):
        if pos + _ANA_GROUP.size > len(mv):
            raise ValueError("truncated ANA group descriptor")
        grpid, nnsids, gchg, state = _ANA_GROUP.unpack_from(mv, pos)
        pos += _ANA_GROUP.size
        if pos + 4 * nnsids > len(mv):
            raise ValueError("truncated ANA NSID list")
        nsids = struct.unpack_from(f"<{nnsids}I", mv, pos)
        pos += 4 * nnsids
        groups.append(AnaGroup(grpid, state & 0xF, nsids, gchg))
    return chgcnt, groups


# Discovery (LID 70h): 1024-byte header, 1024-byte entries -------------------
#   entry: 0 trtype | 1 adrfam | 2 subtype | 3 treq | 4 portid | 6 cntlid | 8 asqsz
#          10 eflags | 32 trsvcid (32, space padded) | 256 subnqn (256, NUL padded)
#          512 traddr (256, space padded) | 768 tsas (256)

_DISC_HDR = struct.Struct("<QQH1006x")
_DISC_ENTRY = struct.Struct("<BBBBHHHH20x32s192x256s256s256s")
assert _DISC_HDR.size == spec.DISCOVERY_LOG_HEADER_SIZE
assert _DISC_ENTRY.size == spec.DISCOVERY_LOG_ENTRY_SIZE

DISCOVERY_ENTRY_OFFSETS = {
    "trtype": 0, "adrfam": 1, "subtype": 2, "treq": 3, "portid": 4, "cntlid": 6,
    "asqsz": 8, "eflags": 10, "trsvcid": 32, "subnqn": 256, "traddr": 512, "tsas": 768,
}


class DiscoveryEntry(NamedTuple):
    trtype: int
    adrfam: int
    subtype: int
    treq: int
    portid: int
    cntlid: int
    asqsz: int
    trsvcid: str
    traddr: str
    subnqn: str
    eflags: int = 0
    tsas: bytes = b""


class DiscoveryLog(NamedTuple):
    genctr: int
    numrec: int
    recfmt: int
    entries: list[DiscoveryEntry]


def tcp_tsas(sectype: int = spec.TcpSecType.NONE) -> bytes:
    """TSAS for TCP: SECTYPE in byte 0, the rest reserved."""
    return bytes([sectype]).ljust(spec.TSAS_LEN, b"\0")


def build_discovery_entry(e: DiscoveryEntry) -> bytes:
    tsas = bytes(e.tsas)
    if len(tsas) > spec.TSAS_LEN:
        raise ValueError("tsas is 256 bytes")
    return _DISC_ENTRY.pack(
        e.trtype, e.adrfam, e.subtype, e.treq, e.portid, e.cntlid, e.asqsz, e.eflags,
        _pad_ascii(e.trsvcid, spec.TRSVCID_LEN, "trsvcid"),
        _pad_nul(e.subnqn, spec.NQN_FIELD_LEN, "subnqn"),
        _pad_ascii(e.traddr, spec.TRADDR_LEN, "traddr"),
        tsas.ljust(spec.TSAS_LEN, b"\0"),
    )


def parse_discovery_entry(buf: bytes | bytearray | memoryview, offset: int = 0) -> DiscoveryEntry:
    try:  # short input: ValueError, as parse_sqe
        (trtype, adrfam, subtype, treq, portid, cntlid, asqsz, eflags,
         trsvcid, subnqn, traddr, tsas) = _DISC_ENTRY.unpack_from(buf, offset)
    except struct.error as exc:
        raise ValueError(f"discovery log entry: {exc}") from None
    return DiscoveryEntry(
        trtype, adrfam, subtype, treq, portid, cntlid, asqsz,
        _unpad_ascii(trsvcid), _unpad_ascii(traddr), _unpad_nul(subnqn), eflags, tsas,
    )


def build_discovery_log(
    genctr: int, entries: Sequence[DiscoveryEntry], recfmt: int = spec.DISCOVERY_LOG_RECFMT
) -> bytes:
    """The whole log: header then NUMREC entries (serve it with `slice_log`)."""
    parts = [_DISC_HDR.pack(genctr, len(entries), recfmt)]
    parts.extend(build_discovery_entry(e) for e in entries)
    return b"".join(parts)


def parse_discovery_log(buf: bytes | bytearray | memoryview) -> DiscoveryLog:
    """Parses the header and as many of the NUMREC entries as the buffer holds (a host
    reads the header alone first to learn NUMREC)."""
    mv = _need(buf, spec.DISCOVERY_LOG_HEADER_SIZE, "discovery log header")
    genctr, numrec, recfmt = _DISC_HDR.unpack_from(mv)
    present = (len(mv) - spec.DISCOVERY_LOG_HEADER_SIZE) // spec.DISCOVERY_LOG_ENTRY_SIZE
    entries = [
        parse_discovery_entry(
            mv, spec.DISCOVERY_LOG_HEADER_SIZE + i * spec.DISCOVERY_LOG_ENTRY_SIZE
        )
        for i in range(min(numrec, present))
    ]
    return DiscoveryLog(genctr, numrec, recfmt, entries)


# ---------------------------------------------------------------------------
# Dataset Management ranges (16 bytes each)
# ---------------------------------------------------------------------------

_DSM_RANGE = struct.Struct("<IIQ")
assert _DSM_RANGE.size == spec.DSM_RANGE_SIZE


class DsmRange(NamedTuple):
    cattr: int
    nlb: int
    slba: int


def parse_dsm_ranges(buf: bytes | bytearray | memoryview, count: int) -> list[DsmRange]:
    """`count` ranges (the command's NR field plus one)."""
    mv = _need(buf, count * spec.DSM_RANGE_SIZE, "DSM ranges")
    return [DsmRange(*r) for r in _DSM_RANGE.iter_unpack(mv[: count * spec.DSM_RANGE_SIZE])]


def build_dsm_ranges(ranges: Iterable[DsmRange]) -> bytes:
    return b"".join(_DSM_RANGE.pack(*r) for r in ranges)
