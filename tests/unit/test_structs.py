"""Layouts of blocktarget.nvme.structs: round trips, and absolute offsets checked
byte by byte so that a table typo cannot hide behind a symmetric build/parse pair."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blocktarget.nvme import spec
from blocktarget.nvme import structs as s

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


def le(buf: bytes, offset: int, size: int) -> int:
    return int.from_bytes(buf[offset:offset + size], "little")


# --------------------------------------------------------------------------- spec


def test_spec_spot_values() -> None:
    assert spec.AdminOpcode.GET_LOG_PAGE == 0x02
    assert spec.AdminOpcode.IDENTIFY == 0x06
    assert spec.AdminOpcode.ASYNC_EVENT_REQUEST == 0x0C
    assert spec.AdminOpcode.KEEP_ALIVE == 0x18
    assert spec.IoOpcode.WRITE_ZEROES == 0x08
    assert spec.IoOpcode.DATASET_MANAGEMENT == 0x09
    assert spec.IoOpcode.RESERVATION_RELEASE == 0x15
    assert spec.FABRICS_OPCODE == 0x7F
    assert spec.FabricsType.DISCONNECT == 0x08
    assert spec.GenericStatus.INVALID_SGL_OFFSET == 0x16
    assert spec.GenericStatus.KEEP_ALIVE_INVALID == 0x1A
    assert spec.GenericStatus.TRANSIENT_TRANSPORT_ERROR == 0x22
    assert spec.GenericStatus.NS_NOT_READY == 0x82
    assert spec.CommandStatus.ATTEMPTED_WRITE_TO_RO_RANGE == 0x82
    assert spec.FabricsStatus.AUTH_REQUIRED == 0x91
    assert spec.MediaStatus.DEALLOCATED_OR_UNWRITTEN_BLOCK == 0x87
    assert spec.PathStatus.HOST_PATH_ERROR == 0x70
    assert spec.Cns.CTRL_LIST == 0x13
    assert spec.LogPage.DISCOVERY == 0x70
    assert spec.FeatureId.HOST_ID == 0x81
    assert spec.Property.CSTS == 0x1C and spec.PROPERTY_SIZE[spec.Property.CAP] == 8
    assert spec.SGL_ID_INCAPSULE == 0x01 and spec.SGL_ID_TRANSPORT == 0x5A
    assert spec.AnaState.CHANGE == 0x0F
    assert spec.make_version(1, 4) == 0x00010400
    assert spec.data_transfer(spec.IoOpcode.WRITE) == spec.DataTransfer.HOST_TO_CTRL
    assert spec.data_transfer(spec.FabricsType.PROPERTY_GET) == spec.DataTransfer.NONE


def test_make_status_layout() -> None:
    st_ = spec.make_status(spec.Sct.GENERIC, spec.GenericStatus.INVALID_FIELD, dnr=True)
    assert st_ == 0x4002
    assert spec.status_sct(st_) == 0 and spec.status_sc(st_) == 2 and spec.status_dnr(st_)
    st_ = spec.make_status(spec.Sct.PATH, spec.PathStatus.ANA_INACCESSIBLE, more=True, crd=2)
    assert st_ == 0x2000 | (2 << 11) | 0x300 | 0x02
    with pytest.raises(ValueError):
        spec.make_status(8, 0)
    assert spec.status_name(0x4182, fabrics=True) == "CONNECT_INVALID_PARAM|DNR"
    assert spec.status_name(0x0182) == "ATTEMPTED_WRITE_TO_RO_RANGE"
    assert spec.status_name(0x0502) == "SCT5_SC02"


def test_cqe_status_bit_positions() -> None:
    status = spec.make_status(spec.Sct.GENERIC, spec.GenericStatus.INVALID_FIELD, dnr=True)
    raw = s.pack_cqe(cid=0x1234, status=status, sqhd=7, sqid=1, dw0=0xAABBCCDD, dw1=0x11)
    assert len(raw) == 16
    dw3 = le(raw, 12, 4)
    assert dw3 & 0xFFFF == 0x1234  # CID
    assert (dw3 >> 16) & 1 == 0  # phase, always 0 on fabrics
    assert (dw3 >> 17) & 0xFF == 0x02  # SC
    assert (dw3 >> 25) & 0x7 == 0  # SCT
    assert (dw3 >> 31) & 1 == 1  # DNR
    assert (dw3 >> 30) & 1 == 0  # MORE
    assert le(raw, 14, 2) == 0x8004
    assert le(raw, 0, 4) == 0xAABBCCDD and le(raw, 4, 4) == 0x11
    assert le(raw, 8, 2) == 7 and le(raw, 10, 2) == 1

    media = spec.make_status(spec.Sct.MEDIA_ERROR, spec.MediaStatus.WRITE_FAULT)
    dw3 = le(s.pack_cqe(1, media), 12, 4)
    assert (dw3 >> 25) & 0x7 == 2 and (dw3 >> 17) & 0xFF == 0x80


@given(cid=u16, status=st.integers(0, 0x7FFF), sqhd=u16, sqid=u16, dw0=u32, dw1=u32)
def test_cqe_round_trip(cid: int, status: int, sqhd: int, sqid: int, dw0: int, dw1: int) -> None:
    raw = s.pack_cqe(cid, status, sqhd, sqid, dw0, dw1)
    cqe = s.parse_cqe(raw)
    assert cqe == s.Cqe(dw0, dw1, sqhd, sqid, cid, status, 0)
    assert cqe.result64 == dw0 | (dw1 << 32)
    buf = bytearray(24)
    s.pack_cqe_into(buf, 8, cid, status, sqhd, sqid, dw0, dw1)
    assert bytes(buf[8:]) == raw and s.parse_cqe(buf, 8) == cqe


def test_parse_cqe_phase() -> None:
    raw = bytearray(s.pack_cqe(5, 0x0002))
    raw[14] |= 1
    cqe = s.parse_cqe(raw)
    assert cqe.phase == 1 and cqe.status == 0x0002


# --------------------------------------------------------------------------- SQE


@given(
    opcode=u8, flags=u8, cid=u16, nsid=u32, cdw2=u32, cdw3=u32, mptr=u64, addr=u64, length=u32,
    sgl_id=u8, cdws=st.lists(u32, min_size=6, max_size=6),
)
def test_sqe_round_trip(
    opcode: int, flags: int, cid: int, nsid: int, cdw2: int, cdw3: int, mptr: int,
    addr: int, length: int, sgl_id: int, cdws: list[int],
) -> None:
    raw = s.build_sqe(
        opcode, cid, nsid, flags=flags, cdw2=cdw2, cdw3=cdw3, mptr=mptr, sgl_addr=addr,
        sgl_len=length, sgl_id=sgl_id, cdw10=cdws[0], cdw11=cdws[1], cdw12=cdws[2],
        cdw13=cdws[3], cdw14=cdws[4], cdw15=cdws[5],
    )
    assert len(raw) == 64
    assert s.parse_sqe(raw) == s.Sqe(
        opcode, flags, cid, nsid, cdw2, cdw3, mptr, addr, length, sgl_id, *cdws
    )


def test_sqe_offsets() -> None:
    raw = s.build_sqe(
        spec.IoOpcode.READ, 0xBEEF, 3, flags=spec.CmdFlags.PSDT_SGL_MPTR_CONTIG,
        sgl_addr=0x1122334455667788, sgl_len=4096, sgl_id=spec.SGL_ID_TRANSPORT,
        cdw10=0x10, cdw11=0x1, cdw12=7 | spec.RwFlags.FUA, cdw15=0xCAFE,
    )
    assert raw[0] == 0x02 and raw[1] == 0x40 and le(raw, 2, 2) == 0xBEEF and le(raw, 4, 4) == 3
    assert le(raw, 24, 8) == 0x1122334455667788 and le(raw, 32, 4) == 4096
    assert raw[36:39] == b"\0\0\0" and raw[39] == 0x5A
    assert le(raw, 40, 4) == 0x10 and le(raw, 60, 4) == 0xCAFE
    sqe = s.parse_sqe(memoryview(b"x" * 8 + raw), 8)
    assert sqe.psdt == spec.Psdt.SGL_MPTR_CONTIG and sqe.fuse == 0
    assert sqe.sgl_type == spec.SglType.TRANSPORT_DATA_BLOCK
    assert sqe.sgl_subtype == spec.SglSubtype.TRANSPORT
    assert sqe.slba == 0x1_0000_0010 and sqe.nlb == 8
    assert sqe.cdw12 & spec.RwFlags.FUA


def test_sqe_prp_form() -> None:
    raw = s.build_sqe(spec.AdminOpcode.IDENTIFY, 1, prp1=0x1000, prp2=0x2000, cdw10=1)
    assert le(raw, 24, 8) == 0x1000 and le(raw, 32, 8) == 0x2000 and le(raw, 40, 4) == 1
    with pytest.raises(ValueError):
        s.build_sqe(0, 1, prp1=1, sgl_len=4)


def test_connect_sqe_offsets() -> None:
    raw = s.build_connect_sqe(cid=9, qid=3, sqsize=127, kato_ms=15000,
                              cattr=spec.CONNECT_CATTR_DISABLE_SQFLOW)
    assert raw[0] == 0x7F and raw[4] == spec.FabricsType.CONNECT
    assert le(raw, 2, 2) == 9
    assert le(raw, 40, 2) == 0  # recfmt
    assert le(raw, 42, 2) == 3  # qid
    assert le(raw, 44, 2) == 127  # sqsize
    assert raw[46] == 0x04  # cattr
    assert le(raw, 48, 4) == 15000  # kato
    assert le(raw, 32, 4) == 1024 and raw[39] == 0x01
    sqe = s.parse_sqe(raw)
    assert sqe.opcode == spec.FABRICS_OPCODE and sqe.fctype == spec.FabricsType.CONNECT
    assert s.connect_fields(sqe) == s.ConnectCmd(0, 3, 127, 4, 15000)


def test_property_sqes() -> None:
    raw = s.build_property_get_sqe(4, spec.Property.CAP, size=8)
    assert raw[4] == spec.FabricsType.PROPERTY_GET and raw[40] == 1 and le(raw, 44, 4) == 0
    assert s.property_fields(s.parse_sqe(raw)) == s.PropertyCmd(8, 0, 0)
    raw = s.build_property_set_sqe(5, spec.Property.CC, 0x00460001)
    assert raw[4] == spec.FabricsType.PROPERTY_SET and raw[40] == 0
    assert le(raw, 44, 4) == 0x14 and le(raw, 48, 8) == 0x00460001
    assert s.property_fields(s.parse_sqe(raw)) == s.PropertyCmd(4, 0x14, 0x00460001)
    raw = s.build_property_set_sqe(5, spec.Property.ASQ, 1 << 40, size=8)
    assert s.property_fields(s.parse_sqe(raw)).value == 1 << 40
    with pytest.raises(ValueError):
        s.build_property_get_sqe(1, 0, size=2)


def test_auth_sqe() -> None:
    raw = s.build_auth_sqe(spec.FabricsType.AUTH_SEND, 2, secp=0xE9, spsp0=1, spsp1=2,
                           length=100, sgl_len=100)
    assert raw[41] == 1 and raw[42] == 2 and raw[43] == 0xE9 and le(raw, 44, 4) == 100
    assert s.auth_fields(s.parse_sqe(raw)) == s.AuthCmd(0xE9, 1, 2, 100)


def test_connect_response_dw0() -> None:
    assert s.connect_success_dw0(0x12) == 0x12
    assert s.connect_invalid_param_dw0(256, in_data=True) == 0x10100
    assert s.connect_invalid_param_dw0(42, in_data=False) == 42


# --------------------------------------------------------------------------- Connect data


def test_connect_data_round_trip_and_offsets() -> None:
    hostid = uuid.UUID("12345678-1234-5678-9abc-def012345678").bytes
    raw = s.build_connect_data(hostid, 0xFFFF, "nqn.2026-01.io.blocktarget:a", "nqn.host")
    assert len(raw) == 1024
    assert raw[0:16] == hostid and le(raw, 16, 2) == 0xFFFF
    assert raw[256:256 + 28] == b"nqn.2026-01.io.blocktarget:a" and raw[256 + 28] == 0
    assert raw[512:520] == b"nqn.host" and raw[520] == 0
    assert raw[768:] == bytes(256)
    assert s.parse_connect_data(raw) == s.ConnectData(
        hostid, 0xFFFF, "nqn.2026-01.io.blocktarget:a", "nqn.host"
    )
    assert s.CONNECT_DATA_OFFSETS["hostnqn"] == 512


def test_connect_data_errors() -> None:
    with pytest.raises(ValueError):
        s.parse_connect_data(bytes(1000))
    bad = bytearray(1024)
    bad[256:258] = b"\xff\xfe"
    with pytest.raises(ValueError):
        s.parse_connect_data(bad)
    with pytest.raises(ValueError):
        s.build_connect_data(bytes(16), 1, "n" * 256, "h")
    with pytest.raises(ValueError):
        s.build_connect_data(bytes(15), 1, "n", "h")


# --------------------------------------------------------------------------- Identify


def _distinct_values(table: tuple[tuple[str, int, str, int], ...]) -> dict[str, object]:
    values: dict[str, object] = {}
    for i, (name, _offset, kind, size) in enumerate(table, start=1):
        if kind == "B":
            values[name] = i & 0xFF
        elif kind in ("H", "I", "Q"):
            values[name] = 0x100 + i
        elif kind == "u128":
            values[name] = (1 << 100) + i
        elif kind == "ascii":
            values[name] = f"F{i}"[:size]
        elif kind == "nqn":
            values[name] = f"nqn.test:{i}"
        else:
            values[name] = bytes([i & 0xFF]) * size
    return values


def test_identify_ctrl_round_trip() -> None:
    values = _distinct_values(s.IDENTIFY_CTRL_FIELDS)
    values["npss"] = 1
    psd = [s.PowerState(mp=0x9C4, enlat=0x10, exlat=0x4), s.PowerState(mp=1, flags=2, actp=9)]
    raw = s.build_identify_ctrl(psd=psd, vs=b"vendor", **values)
    assert len(raw) == 4096
    parsed = s.parse_identify_ctrl(raw)
    assert parsed.pop("psd") == psd
    assert parsed == values
    assert raw[3072:3078] == b"vendor"


def test_identify_ctrl_offsets() -> None:
    raw = s.build_identify_ctrl(
        vid=0x1B36, ssvid=0x1AF4, sn="SN0001", mn="blocktarget", fr="0.1.0", rab=6,
        ieee=b"\x01\x02\x03", cmic=spec.Cmic.MULTI_PORT | spec.Cmic.ANA, mdts=5,
        cntlid=0x21, ver=spec.make_version(1, 4), oaes=spec.AenConfig.NS_ATTR,
        ctratt=spec.Ctratt.HOST_ID_128, cntrltype=spec.CtrlType.IO, fguid=b"G" * 16,
        oacs=0, acl=3, aerl=3, frmw=3, lpa=7, elpe=127, kas=10, anatt=10, anacap=0x1F,
        anagrpmax=128, nanagrpid=128, sqes=spec.SQES_NVM, cqes=spec.CQES_NVM, maxcmd=128,
        nn=1024, oncs=spec.Oncs.DSM | spec.Oncs.WRITE_ZEROES, vwc=spec.Vwc.PRESENT,
        sgls=spec.Sgls.SUPPORTED | spec.Sgls.OFFSET, mnan=1024, subnqn="nqn.sub",
        ioccsz=260, iorcsz=1, icdoff=0, fcatt=0, msdbd=1, ofcs=spec.Ofcs.DISCONNECT,
        psd=[s.PowerState(mp=0x9C4)],
    )
    assert le(raw, 0, 2) == 0x1B36 and le(raw, 2, 2) == 0x1AF4
    assert raw[4:24] == b"SN0001".ljust(20)
    assert raw[24:64] == b"blocktarget".ljust(40)
    assert raw[64:72] == b"0.1.0   "
    assert raw[72] == 6 and raw[73:76] == b"\x01\x02\x03" and raw[76] == 0x09
    assert raw[77] == 5 and le(raw, 78, 2) == 0x21 and le(raw, 80, 4) == 0x10400
    assert le(raw, 92, 4) == 0x100 and le(raw, 96, 4) == 1
    assert raw[111] == 1 and raw[112:128] == b"G" * 16
    assert raw[258] == 3 and raw[259] == 3 and raw[260] == 3 and raw[261] == 7
    assert raw[262] == 127 and raw[263] == 0 and le(raw, 320, 2) == 10
    assert raw[342] == 10 and raw[343] == 0x1F and le(raw, 344, 4) == 128
    assert le(raw, 348, 4) == 128
    assert raw[512] == 0x66 and raw[513] == 0x44 and le(raw, 514, 2) == 128
    assert le(raw, 516, 4) == 1024 and le(raw, 520, 2) == 0x0C and raw[525] == 1
    assert le(raw, 536, 4) == (1 | 1 << 20) and le(raw, 540, 4) == 1024
    assert raw[768:776] == b"nqn.sub\0" and raw[1023] == 0
    assert le(raw, 1792, 4) == 260 and le(raw, 1796, 4) == 1 and raw[1803] == 1
    assert le(raw, 1804, 2) == 1
    assert le(raw, 2048, 2) == 0x9C4


def test_identify_ctrl_errors() -> None:
    with pytest.raises(TypeError):
        s.build_identify_ctrl(bogus=1)
    with pytest.raises(ValueError):
        s.build_identify_ctrl(sn="x" * 21)
    with pytest.raises(ValueError):
        s.build_identify_ctrl(subnqn="n" * 256)
    with pytest.raises(ValueError):
        s.parse_identify_ctrl(bytes(100))


def test_identify_ns_round_trip_and_offsets() -> None:
    values = _distinct_values(s.IDENTIFY_NS_FIELDS)
    lbaf = [s.LbaFormat(0, 9, 0), s.LbaFormat(8, 12, 1)]
    values["nlbaf"] = 1
    raw = s.build_identify_ns(lbaf=lbaf, **values)
    parsed = s.parse_identify_ns(raw)
    assert parsed.pop("lbaf") == lbaf
    assert parsed == values

    nguid = bytes(range(16))
    raw = s.build_identify_ns(
        nsze=0x80000, ncap=0x80000, nuse=0x80000, flbas=1, nmic=spec.Nmic.SHARED,
        anagrpid=2, nsattr=spec.NsAttr.WRITE_PROTECTED, nguid=nguid, eui64=b"E" * 8,
        lbaf=[s.LbaFormat(0, 9), s.LbaFormat(0, 12)],
    )
    assert le(raw, 0, 8) == 0x80000 and le(raw, 8, 8) == 0x80000 and le(raw, 16, 8) == 0x80000
    assert raw[25] == 1 and raw[26] == 1 and raw[30] == 1
    assert le(raw, 92, 4) == 2 and raw[99] == 1
    assert raw[104:120] == nguid and raw[120:128] == b"E" * 8
    assert raw[128:132] == b"\x00\x00\x09\x00" and raw[132:136] == b"\x00\x00\x0c\x00"
    assert s.flbas_index(raw[26]) == 1
    assert s.flbas_index(0x21) == 0x11


def test_ns_desc_list() -> None:
    nguid = bytes(range(16))
    u = uuid.uuid4().bytes
    descs = [(spec.NidType.NGUID, nguid), (spec.NidType.UUID, u), (spec.NidType.CSI, b"\0")]
    raw = s.build_ns_desc_list(descs)
    assert len(raw) == 4096
    assert raw[0:4] == b"\x02\x10\x00\x00" and raw[4:20] == nguid
    assert raw[20:24] == b"\x03\x10\x00\x00" and raw[24:40] == u
    assert raw[40:44] == b"\x04\x01\x00\x00" and raw[44] == 0 and raw[45:49] == bytes(4)
    assert s.parse_ns_desc_list(raw) == descs
    with pytest.raises(ValueError):
        s.build_ns_desc_list([(spec.NidType.EUI64, b"short")])


def test_ns_list() -> None:
    raw = s.build_ns_list([5, 1, 3, 3, 9], after=1)
    assert len(raw) == 4096
    assert struct.unpack_from("<4I", raw) == (3, 5, 9, 0)
    assert s.parse_ns_list(raw) == [3, 5, 9]
    big = s.build_ns_list(range(1, 3000))
    assert s.parse_ns_list(big) == list(range(1, 1025))
    assert s.parse_ns_list(s.build_ns_list([], after=0)) == []


def test_identify_args() -> None:
    cdw10, cdw11 = s.encode_identify(spec.Cns.CS_NS, cntid=7, cnssid=3, csi=spec.Csi.ZNS)
    assert cdw10 == 0x00070005 and cdw11 == 0x02000003
    assert s.decode_identify(cdw10, cdw11) == s.IdentifyArgs(5, 7, 3, 2)


# --------------------------------------------------------------------------- log pages


def test_slice_log() -> None:
    page = bytes(range(100))
    assert s.slice_log(page, 0, 10) == page[:10]
    assert s.slice_log(page, 96, 8) == page[96:] + bytes(4)
    assert s.slice_log(page, 200, 8) == bytes(8)
    assert s.slice_log(memoryview(page), 4, 4) == page[4:8]
    assert s.slice_log(page, 0, 0) == b""
    with pytest.raises(ValueError):
        s.slice_log(page, -1, 4)


def test_get_log_page_args() -> None:
    # LID 70h, LSP 5, RAE, NUMD = 0x1_0003 (0's based), LSI 9, LPO 0x1_0000_1000, CSI 2
    cdw10 = 0x70 | (5 << 8) | (1 << 15) | (0x0003 << 16)
    cdw11 = 0x0001 | (9 << 16)
    args = s.decode_get_log_page(cdw10, cdw11, 0x1000, 0x1, 2 << 24)
    assert args == s.GetLogPageArgs(0x70, 5, True, (0x10003 + 1) * 4, 9, 0x1_0000_1000, 2)
    assert s.encode_get_log_page(0x70, (0x10003 + 1) * 4, 0x1_0000_1000, lsp=5, rae=True,
                                 lsi=9, csi=2) == (cdw10, cdw11, 0x1000, 0x1, 2 << 24)
    assert s.decode_get_log_page(*s.encode_get_log_page(2, 512)).length == 512
    with pytest.raises(ValueError):
        s.encode_get_log_page(2, 6)


def test_error_log() -> None:
    status = spec.make_status(spec.Sct.GENERIC, spec.GenericStatus.INVALID_FIELD, dnr=True)
    entries = [
        s.ErrorLogEntry(2, 1, 0x33, status, 40, lba=7, nsid=1, trtype=spec.TransportType.TCP),
        s.ErrorLogEntry(1, 0, 0x10, 0x0001),
    ]
    raw = s.build_error_log(entries) + bytes(64)
    assert len(raw) == 192
    assert le(raw, 0, 8) == 2 and le(raw, 8, 2) == 1 and le(raw, 10, 2) == 0x33
    assert le(raw, 12, 2) == status << 1 and le(raw, 14, 2) == 40 and le(raw, 16, 8) == 7
    assert le(raw, 24, 4) == 1 and raw[29] == 3
    assert s.parse_error_log(raw) == entries


def test_smart_log() -> None:
    raw = s.build_smart_log(
        critical_warning=0, temperature=310, avail_spare=100, spare_thresh=10,
        percent_used=1, data_units_read=(1 << 70) + 5, data_units_written=6,
        host_read_commands=7, host_write_commands=8, power_on_hours=9,
        num_err_log_entries=11, temp_sensor1=300, warning_temp_time=3,
    )
    assert len(raw) == 512
    assert le(raw, 1, 2) == 310 and raw[3] == 100 and raw[4] == 10 and raw[5] == 1
    assert le(raw, 32, 16) == (1 << 70) + 5 and le(raw, 48, 16) == 6
    assert le(raw, 64, 16) == 7 and le(raw, 80, 16) == 8 and le(raw, 128, 16) == 9
    assert le(raw, 176, 16) == 11 and le(raw, 192, 4) == 3 and le(raw, 200, 2) == 300
    parsed = s.parse_smart_log(raw)
    assert parsed["data_units_read"] == (1 << 70) + 5 and parsed["temperature"] == 310
    values = _distinct_values(s.SMART_LOG_FIELDS)
    assert s.parse_smart_log(s.build_smart_log(**values)) == values


def test_fw_slot_log() -> None:
    raw = s.build_fw_slot_log(0x01, ["0.1.0"])
    assert len(raw) == 512 and raw[0] == 1 and raw[8:16] == b"0.1.0   " and raw[16:24] == bytes(8)
    assert s.parse_fw_slot_log(raw) == (1, ["0.1.0", "", "", "", "", "", ""])


def test_changed_ns_list() -> None:
    raw = s.build_changed_ns_list([4, 2])
    assert len(raw) == 4096 and struct.unpack_from("<3I", raw) == (2, 4, 0)
    over = s.build_changed_ns_list(range(1, 1026))
    assert struct.unpack_from("<2I", over) == (0xFFFFFFFF, 0)
    assert s.parse_changed_ns_list(raw) == [2, 4]


def test_cmd_effects_log() -> None:
    admin = {spec.AdminOpcode.IDENTIFY: spec.CmdEffects.CSUPP}
    io = {
        spec.IoOpcode.READ: spec.CmdEffects.CSUPP,
        spec.IoOpcode.WRITE: spec.CmdEffects.CSUPP | spec.CmdEffects.LBCC,
    }
    raw = s.build_cmd_effects_log(admin, io)
    assert len(raw) == 4096
    assert le(raw, 4 * 0x06, 4) == 1
    assert le(raw, 1024 + 4 * 0x02, 4) == 1 and le(raw, 1024 + 4 * 0x01, 4) == 3
    assert s.parse_cmd_effects_log(raw) == (
        {0x06: 1}, {0x01: 3, 0x02: 1}
    )


def test_ana_log() -> None:
    groups = [
        s.AnaGroup(1, spec.AnaState.OPTIMIZED, (3, 1), chgcnt=4),
        s.AnaGroup(2, spec.AnaState.INACCESSIBLE, ()),
    ]
    raw = s.build_ana_log(9, groups)
    assert len(raw) == 16 + 32 + 8 + 32
    assert le(raw, 0, 8) == 9 and le(raw, 8, 2) == 2
    assert le(raw, 16, 4) == 1 and le(raw, 20, 4) == 2 and le(raw, 24, 8) == 4 and raw[32] == 1
    assert struct.unpack_from("<2I", raw, 48) == (1, 3)
    assert le(raw, 56, 4) == 2 and le(raw, 60, 4) == 0 and raw[72] == 3
    assert s.parse_ana_log(raw) == (9, [s.AnaGroup(1, 1, (1, 3), 4), s.AnaGroup(2, 3, (), 0)])
    rgo = s.build_ana_log(9, groups, rgo=True)
    assert len(rgo) == 16 + 64 and le(rgo, 20, 4) == 0
    with pytest.raises(ValueError):
        s.parse_ana_log(raw[:40])


def test_discovery_log() -> None:
    entries = [
        s.DiscoveryEntry(
            trtype=spec.TransportType.TCP, adrfam=spec.AddressFamily.IPV4,
            subtype=spec.SubsystemType.NVME, treq=spec.Treq.SECURE_CHANNEL_NOT_REQUIRED,
            portid=1, cntlid=spec.CNTLID_DYNAMIC, asqsz=32, trsvcid="4420",
            traddr="127.0.0.1", subnqn="nqn.2026-01.io.blocktarget:default",
            tsas=s.tcp_tsas(spec.TcpSecType.NONE),
        ),
        s.DiscoveryEntry(
            spec.TransportType.TCP, spec.AddressFamily.IPV6, spec.SubsystemType.CURRENT_DISCOVERY,
            0, 2, spec.CNTLID_DYNAMIC, 32, "8009", "::1", spec.DISCOVERY_NQN,
            eflags=spec.DiscEflags.DUPRETINFO,
        ),
    ]
    raw = s.build_discovery_log(7, entries)
    assert len(raw) == 1024 * 3
    assert le(raw, 0, 8) == 7 and le(raw, 8, 8) == 2 and le(raw, 16, 2) == 0
    e = raw[1024:2048]
    assert e[0] == 3 and e[1] == 1 and e[2] == 2 and e[3] == 2
    assert le(e, 4, 2) == 1 and le(e, 6, 2) == 0xFFFF and le(e, 8, 2) == 32
    assert e[32:64] == b"4420".ljust(32)
    assert e[256:256 + 34] == b"nqn.2026-01.io.blocktarget:default" and e[256 + 34] == 0
    assert e[512:768] == b"127.0.0.1".ljust(256)
    assert e[768] == 0 and e[769:] == bytes(255)
    assert le(raw, 2048 + 10, 2) == 1
    for name, off in s.DISCOVERY_ENTRY_OFFSETS.items():
        assert 0 <= off < 1024, name

    parsed = s.parse_discovery_log(raw)
    assert parsed.genctr == 7 and parsed.numrec == 2 and parsed.recfmt == 0
    assert parsed.entries[0] == entries[0]
    assert parsed.entries[1] == entries[1]._replace(tsas=bytes(256))
    header_only = s.parse_discovery_log(s.slice_log(raw, 0, 1024))
    assert header_only.numrec == 2 and header_only.entries == []
    with pytest.raises(ValueError):
        s.build_discovery_log(0, [entries[0]._replace(traddr="x" * 257)])


def test_dsm_ranges() -> None:
    ranges = [s.DsmRange(0, 8, 100), s.DsmRange(1, 16, 1 << 40)]
    raw = s.build_dsm_ranges(ranges)
    assert len(raw) == 32 and le(raw, 4, 4) == 8 and le(raw, 8, 8) == 100
    assert s.parse_dsm_ranges(raw, 2) == ranges
    with pytest.raises(ValueError):
        s.parse_dsm_ranges(raw, 3)
