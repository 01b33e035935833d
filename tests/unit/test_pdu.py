"""Tests for the sans-I/O NVMe/TCP PDU codec (blocktarget.nvme.pdu)."""

from __future__ import annotations

import struct

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktarget.nvme import pdu as P
from blocktarget.nvme.pdu import (
    R2T,
    C2HData,
    CapsuleCmd,
    CapsuleResp,
    DataDigestError,
    Decoder,
    Fes,
    H2CData,
    ICReq,
    ICResp,
    PduType,
    ProtocolError,
    TermReq,
    encode,
)

H2C = P.HOST_TO_CONTROLLER
C2H = P.CONTROLLER_TO_HOST


def wire(pdu: P.Pdu, **kw: object) -> bytes:
    return b"".join(bytes(b) for b in encode(pdu, **kw))


def sqe(cid: int = 0x1234, opcode: int = 0x01) -> bytes:
    b = bytearray(64)
    b[0] = opcode
    b[2:4] = cid.to_bytes(2, "little")
    return bytes(b)


def cqe(cid: int = 0x1234, status: int = 0) -> bytes:
    b = bytearray(16)
    b[12:14] = cid.to_bytes(2, "little")
    b[14:16] = status.to_bytes(2, "little")
    return bytes(b)


def live_decoder(
    expect: str, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0, **kw: int
) -> Decoder:
    """A decoder past connection init, configured like a real connection would."""
    dec = Decoder(expect=expect, **kw)
    ic = ICReq() if expect == H2C else ICResp()
    assert dec.feed(wire(ic)) == [ic]
    dec.set_digests(hdgst, ddgst)
    dec.set_pda(pda)
    return dec


H2C_SAMPLES: list[P.Pdu] = [
    CapsuleCmd(sqe(1)),
    CapsuleCmd(sqe(2), bytes(range(256)) * 4),
    CapsuleCmd(sqe(3), b"\x01"),
    H2CData(cccid=7, ttag=3, datao=4096, data=b"\xab" * 4096, last=True),
    H2CData(cccid=7, ttag=3, datao=0, data=b"hello", last=False),
    TermReq(c2h=False, fes=Fes.INVALID_HEADER_FIELD, fei=2, data=bytes(range(72))),
    TermReq(c2h=False, fes=Fes.PDU_SEQUENCE_ERROR),
]
C2H_SAMPLES: list[P.Pdu] = [
    CapsuleResp(cqe(9)),
    C2HData(cccid=9, datao=0, data=b"\x5a" * 8192, last=True, success=True),
    C2HData(cccid=9, datao=512, data=b"abc", last=False),
    C2HData(cccid=9, datao=0, data=b"abcd", last=True, success=False),
    R2T(cccid=5, ttag=17, r2to=65536, r2tl=131072),
    TermReq(c2h=True, fes=Fes.HEADER_DIGEST_ERROR, fei=0, data=bytes(24)),
]
DIGEST_MODES = [(False, False), (True, False), (False, True), (True, True)]


# --------------------------------------------------------------------- constants


def test_numbers_match_spec() -> None:
    assert [int(t) for t in PduType] == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert (P.FLAG_HDGST, P.FLAG_DDGST, P.FLAG_DATA_LAST, P.FLAG_DATA_SUCCESS) == (1, 2, 4, 8)
    assert Fes.INVALID_HEADER_FIELD == 1
    assert Fes.PDU_SEQUENCE_ERROR == 2
    assert Fes.HEADER_DIGEST_ERROR == 3
    assert Fes.DATA_TRANSFER_OUT_OF_RANGE == 4
    assert Fes.DATA_TRANSFER_LIMIT_EXCEEDED == Fes.R2T_LIMIT_EXCEEDED == 5
    assert Fes.UNSUPPORTED_PARAMETER == 6
    assert [P.pdu_header_len(t) for t in PduType] == [128, 128, 24, 24, 72, 24, 24, 24, 24]
    with pytest.raises(ValueError):
        P.pdu_header_len(8)


# -------------------------------------------------------------- wire encodings


def test_icreq_matches_capture() -> None:
    bufs = encode(ICReq())
    assert b"".join(bufs) == bytes.fromhex("0000800080000000") + bytes(120)


def test_icreq_fields_and_no_digest() -> None:
    raw = wire(ICReq(pfv=0, hpda=3, dgst=3, maxr2t=0x11223344), hdgst=True, ddgst=True)
    assert len(raw) == 128
    assert raw[:8] == bytes.fromhex("0000800080000000")  # no HDGSTF, plen 128
    assert raw[8:16] == bytes.fromhex("0000030344332211")


def test_icresp_fields() -> None:
    raw = wire(ICResp(cpda=1, dgst=2, maxh2cdata=131072), hdgst=True)
    assert raw[:8] == bytes.fromhex("0100800080000000")
    assert struct.unpack_from("<HBBI", raw, 8) == (0, 1, 2, 131072)


def test_capsule_cmd_header() -> None:
    bufs = encode(CapsuleCmd(sqe(), bytes(1024)))
    head = bufs[0]
    assert (head[0], head[1], head[2], head[3]) == (4, 0, 72, 72)
    assert struct.unpack_from("<I", head, 4)[0] == 1096
    assert len(head) == 72 and head[8:] == sqe()


@pytest.mark.parametrize(
    ("hdgst", "ddgst", "pda", "pdo", "plen", "flags"),
    [
        (False, False, 0, 72, 72 + 1024, 0),
        (True, False, 0, 76, 76 + 1024, 1),
        (True, True, 0, 76, 76 + 1024 + 4, 3),
        (False, False, 3, 80, 80 + 1024, 0),  # 16-byte alignment
        (True, True, 31, 128, 128 + 1024 + 4, 3),  # 128-byte alignment
    ],
)
def test_capsule_cmd_layout(
    hdgst: bool, ddgst: bool, pda: int, pdo: int, plen: int, flags: int
) -> None:
    data = bytes(range(256)) * 4
    raw = wire(CapsuleCmd(sqe(), data), hdgst=hdgst, ddgst=ddgst, pda=pda)
    assert len(raw) == plen
    assert raw[1] == flags and raw[3] == pdo
    assert struct.unpack_from("<I", raw, 4)[0] == plen
    if hdgst:
        assert raw[72:76] == struct.pack("<I", crc32c.crc32c(raw[:72]))
    assert raw[72 + 4 * hdgst : pdo] == bytes(pdo - 72 - 4 * hdgst)  # zero padding
    assert raw[pdo : pdo + 1024] == data
    if ddgst:
        assert raw[-4:] == struct.pack("<I", crc32c.crc32c(data))


def test_capsule_without_data_has_no_pdo_or_ddgst() -> None:
    raw = wire(CapsuleCmd(sqe()), hdgst=True, ddgst=True, pda=3)
    assert len(raw) == 76
    assert raw[1] == P.FLAG_HDGST and raw[3] == 0


def test_data_pdu_layouts() -> None:
    raw = wire(H2CData(1, 2, 3, b"x" * 10, last=True), hdgst=True, ddgst=True)
    assert raw[:4] == bytes([6, 1 | 2 | 4, 24, 28])
    assert struct.unpack_from("<IHHII", raw, 4) == (28 + 10 + 4, 1, 2, 3, 10)
    raw = wire(C2HData(1, 3, b"x" * 10, last=True, success=True))
    assert raw[:4] == bytes([7, 4 | 8, 24, 24])
    assert struct.unpack_from("<IHHII", raw, 4) == (34, 1, 0, 3, 10)
    raw = wire(R2T(1, 2, 3, 4), hdgst=True, ddgst=True)
    assert raw[:4] == bytes([9, 1, 24, 0]) and len(raw) == 28
    assert struct.unpack_from("<IHHII", raw, 4) == (28, 1, 2, 3, 4)


def test_term_req_layout() -> None:
    raw = wire(TermReq(c2h=True, fes=1, fei=0xAABBCCDD, data=b"h" * 200), hdgst=True)
    assert raw[:4] == bytes([3, 0, 24, 0])
    assert struct.unpack_from("<IHI", raw, 4) == (24 + 128, 1, 0xAABBCCDD)  # FEI at 10
    assert raw[14:24] == bytes(10)
    assert raw[24:] == b"h" * 128  # truncated to 128 bytes
    assert wire(TermReq(c2h=False, fes=2))[0] == 2


def test_encode_passes_payload_through() -> None:
    payload = memoryview(bytearray(b"z" * 4096))
    bufs = encode(C2HData(1, 0, payload), ddgst=True)
    assert bufs[1] is payload and len(bufs) == 3
    bufs = encode(H2CData(1, 2, 0, payload))
    assert bufs[1] is payload and len(bufs) == 2


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode(CapsuleCmd(bytes(63)))
    with pytest.raises(ValueError):
        encode(CapsuleResp(bytes(15)))
    with pytest.raises(ValueError):
        encode(H2CData(1, 1, 0, b""))
    with pytest.raises(ValueError):
        encode(C2HData(1, 0, b"x", last=False, success=True))
    with pytest.raises(ValueError):
        encode(R2T(1, 1, 0, 1), pda=32)
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]


# -------------------------------------------------------------------- round trip


@pytest.mark.parametrize(("hdgst", "ddgst"), DIGEST_MODES)
@pytest.mark.parametrize("pda", [0, 3])
@pytest.mark.parametrize(
    ("expect", "pdu"), [(H2C, p) for p in H2C_SAMPLES] + [(C2H, p) for p in C2H_SAMPLES]
)
def test_round_trip(expect: str, pdu: P.Pdu, hdgst: bool, ddgst: bool, pda: int) -> None:
    raw = wire(pdu, hdgst=hdgst, ddgst=ddgst, pda=pda)
    dec = live_decoder(expect, hdgst=hdgst, ddgst=ddgst, pda=pda)
    assert dec.feed(raw) == [pdu]
    assert dec.buffered == 0
    assert P.decode_one(raw, hdgst=hdgst, ddgst=ddgst, pda=pda) == pdu


@pytest.mark.parametrize("pdu", [ICReq(0, 5, 3, 7), ICResp(0, 2, 1, 65536)])
def test_round_trip_ic(pdu: P.Pdu) -> None:
    raw = wire(pdu, hdgst=True, ddgst=True, pda=3)
    assert P.decode_one(raw) == pdu
    assert Decoder(expect=C2H if isinstance(pdu, ICResp) else H2C).feed(raw) == [pdu]
    assert pdu.header_digest == bool(pdu.dgst & 1)  # type: ignore[union-attr]
    assert pdu.data_digest == bool(pdu.dgst & 2)  # type: ignore[union-attr]


def test_cid_helpers() -> None:
    assert CapsuleCmd(sqe(0xBEEF)).cid == 0xBEEF
    assert CapsuleResp(cqe(0xCAFE)).cid == 0xCAFE


def _stream(expect: str, hdgst: bool, ddgst: bool, pda: int) -> tuple[bytes, list[P.Pdu]]:
    pdus = H2C_SAMPLES if expect == H2C else C2H_SAMPLES
    return b"".join(wire(p, hdgst=hdgst, ddgst=ddgst, pda=pda) for p in pdus), pdus


@pytest.mark.parametrize(("hdgst", "ddgst"), DIGEST_MODES)
@pytest.mark.parametrize("pda", [0, 3])
@pytest.mark.parametrize("expect", [H2C, C2H])
def test_many_pdus_in_one_feed(expect: str, hdgst: bool, ddgst: bool, pda: int) -> None:
    raw, pdus = _stream(expect, hdgst, ddgst, pda)
    dec = live_decoder(expect, hdgst=hdgst, ddgst=ddgst, pda=pda)
    assert dec.feed(raw) == pdus


@pytest.mark.parametrize(("hdgst", "ddgst"), [(False, False), (True, True)])
@pytest.mark.parametrize("expect", [H2C, C2H])
def test_split_at_every_boundary(expect: str, hdgst: bool, ddgst: bool) -> None:
    pdus = (
        [CapsuleCmd(sqe(1), b"abcdefgh"), H2CData(1, 2, 0, b"0123456789"), CapsuleCmd(sqe(2))]
        if expect == H2C
        else [CapsuleResp(cqe(1)), C2HData(1, 0, b"0123456789", True, True), R2T(1, 2, 3, 4)]
    )
    raw = b"".join(wire(p, hdgst=hdgst, ddgst=ddgst, pda=3) for p in pdus)
    for cut in range(len(raw) + 1):
        dec = live_decoder(expect, hdgst=hdgst, ddgst=ddgst, pda=3)
        got = dec.feed(raw[:cut]) + dec.feed(raw[cut:])
        assert got == pdus, cut
        assert dec.buffered == 0


@pytest.mark.parametrize("expect", [H2C, C2H])
def test_one_byte_at_a_time(expect: str) -> None:
    raw, pdus = _stream(expect, True, True, 3)
    dec = live_decoder(expect, hdgst=True, ddgst=True, pda=3)
    got: list[P.Pdu] = []
    for i in range(len(raw)):
        got += dec.feed(raw[i : i + 1])
    assert got == pdus


def test_payload_survives_reuse_of_input_buffer() -> None:
    pdus = [C2HData(1, 0, b"A" * 100), C2HData(1, 100, b"B" * 100)]
    raw = b"".join(wire(p) for p in pdus)
    dec = live_decoder(C2H)
    buf = bytearray(64)  # a BufferedProtocol-style receive buffer, reused every time
    got: list[P.Pdu] = []
    for off in range(0, len(raw), 64):
        n = len(raw[off : off + 64])
        buf[:n] = raw[off : off + 64]
        got += dec.feed(memoryview(buf)[:n])
        buf[:] = b"\xff" * 64  # scribble over it, as the next recv would
    assert got == pdus


def test_mixed_tiny_and_large_chunks() -> None:
    pdus = [H2CData(1, 1, 0, bytes(range(256)) * 400), CapsuleCmd(sqe(), b"i" * 5000)]
    raw = b"".join(wire(p, hdgst=True, ddgst=True, pda=7) for p in pdus)
    dec = live_decoder(H2C, hdgst=True, ddgst=True, pda=7)
    got: list[P.Pdu] = []
    off = 0
    for size in [3, 1, 9000, 2, 5, 70000, 1, 4095, 4096, 10**9]:
        got += dec.feed(bytearray(raw[off : off + size]) if size % 2 else raw[off : off + size])
        off += size
    assert got == pdus and dec.buffered == 0


def test_payload_is_zero_copy_for_bytes_input() -> None:
    raw = wire(C2HData(1, 0, b"Q" * 4096))
    (pdu,) = live_decoder(C2H).feed(raw)
    assert isinstance(pdu, C2HData)
    assert isinstance(pdu.data, memoryview) and pdu.data.obj is raw


def test_accepts_memoryview_of_bytes_and_bytearray() -> None:
    pdu = H2CData(3, 4, 0, b"payload")
    raw = wire(pdu)
    assert live_decoder(H2C).feed(memoryview(raw)) == [pdu]
    assert live_decoder(H2C).feed(bytearray(raw)) == [pdu]


def test_decoding_pauses_after_connection_init() -> None:
    dec = Decoder(expect=H2C)
    cmd = CapsuleCmd(sqe(), b"d" * 8)
    raw = wire(ICReq(dgst=3)) + wire(cmd, hdgst=True, ddgst=True)
    assert dec.feed(raw) == [ICReq(dgst=3)]
    assert dec.buffered == len(raw) - 128
    dec.set_digests(True, True)
    assert dec.feed(b"") == [cmd]


def test_host_accepts_term_req_instead_of_icresp() -> None:
    term = TermReq(c2h=True, fes=Fes.UNSUPPORTED_PARAMETER, fei=10, data=wire(ICReq(hpda=9)))
    dec = Decoder(expect=C2H)
    assert dec.feed(wire(term)) == [term]
    assert dec.feed(wire(ICResp())) == [ICResp()]


def test_unknown_fes_stays_int() -> None:
    (got,) = live_decoder(C2H).feed(wire(TermReq(c2h=True, fes=0x77)))
    assert isinstance(got, TermReq) and got.fes == 0x77


# ------------------------------------------------------------------------ errors


def expect_error(dec: Decoder, raw: bytes, fes: int, fei: int | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        dec.feed(raw)
    err = info.value
    assert err.fes == fes, err
    if fei is not None:
        assert err.fei == fei, err
    return err


def patch(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_bad_header_digest() -> None:
    raw = bytearray(wire(CapsuleCmd(sqe(), b"x" * 16), hdgst=True))
    raw[10] ^= 0xFF  # corrupt a byte inside the SQE
    err = expect_error(live_decoder(H2C, hdgst=True), bytes(raw), Fes.HEADER_DIGEST_ERROR, 0)
    assert err.header == bytes(raw[:72])  # full header for the TermReq
    assert err.send_term_req


def test_bad_data_digest_is_recoverable() -> None:
    good = C2HData(1, 0, b"second")
    raw = bytearray(wire(C2HData(0x42, 0, b"x" * 32), ddgst=True))
    raw[30] ^= 0x01
    before = CapsuleResp(cqe(7))
    stream = wire(before) + bytes(raw) + wire(good, ddgst=True)
    dec = live_decoder(C2H, ddgst=True)
    with pytest.raises(DataDigestError) as info:
        dec.feed(stream)
    err = info.value
    assert isinstance(err, ProtocolError)
    assert err.cccid == 0x42 and err.pdus == [before]
    assert isinstance(err.pdu, C2HData) and bytes(err.pdu.data) == bytes(raw[24:56])
    assert dec.error is None
    assert dec.feed(b"") == [good]  # the stream is still in sync


def test_bad_data_digest_on_capsule_reports_cid() -> None:
    raw = bytearray(wire(CapsuleCmd(sqe(0x0909), b"y" * 8), hdgst=True, ddgst=True))
    raw[-1] ^= 0x80
    with pytest.raises(DataDigestError) as info:
        live_decoder(H2C, hdgst=True, ddgst=True).feed(bytes(raw))
    assert info.value.cccid == 0x0909


@pytest.mark.parametrize(
    ("expect", "pdu"),
    [
        (H2C, CapsuleResp(cqe())),
        (H2C, R2T(1, 1, 0, 1)),
        (C2H, CapsuleCmd(sqe())),
        (C2H, H2CData(1, 1, 0, b"x")),
    ],
)
def test_wrong_type_for_direction(expect: str, pdu: P.Pdu) -> None:
    err = expect_error(live_decoder(expect), wire(pdu), Fes.INVALID_HEADER_FIELD, P.OFFSET_TYPE)
    assert err.header == wire(pdu)[:8]


def test_unknown_type() -> None:
    raw = patch(wire(R2T(1, 1, 0, 1)), 0, "<B", 8)
    expect_error(live_decoder(C2H), raw, Fes.INVALID_HEADER_FIELD, 0)


def test_bad_hlen() -> None:
    raw = patch(wire(CapsuleCmd(sqe())), 2, "<B", 24)
    expect_error(live_decoder(H2C), raw, Fes.INVALID_HEADER_FIELD, P.OFFSET_HLEN)


def test_bad_icreq_hlen_and_plen() -> None:
    expect_error(Decoder(expect=H2C), patch(wire(ICReq()), 2, "<B", 127), 1, P.OFFSET_HLEN)
    expect_error(Decoder(expect=H2C), patch(wire(ICReq()), 4, "<I", 132), 1, P.OFFSET_PLEN)


def test_misaligned_pdo() -> None:
    raw = wire(CapsuleCmd(sqe(), b"x" * 64))  # pdo 72, fine for pda 0
    live_decoder(H2C).feed(raw)
    expect_error(live_decoder(H2C, pda=3), raw, Fes.INVALID_HEADER_FIELD, P.OFFSET_PDO)


def test_pdo_inside_header() -> None:
    raw = wire(H2CData(1, 1, 0, b"x" * 64), hdgst=True)  # pdo 28
    bad = patch(raw, 3, "<B", 24)  # data would overlap the header digest
    expect_error(live_decoder(H2C, hdgst=True), bad, Fes.INVALID_HEADER_FIELD, P.OFFSET_PDO)


def test_plen_too_large_refused_before_buffering() -> None:
    dec = live_decoder(H2C, max_pdu_size=8192)
    head = wire(H2CData(1, 1, 0, b"x" * 16))[:8]
    big = patch(head, 4, "<I", 8193)
    err = expect_error(dec, big, Fes.DATA_TRANSFER_LIMIT_EXCEEDED, 0)
    assert err.header == big
    ok = wire(H2CData(1, 1, 0, b"x" * (8192 - 24)))
    assert len(live_decoder(H2C, max_pdu_size=8192).feed(ok)) == 1


def test_default_limit_allows_1mib_payload() -> None:
    pdu = H2CData(1, 1, 0, bytes(1024 * 1024))
    assert live_decoder(H2C, hdgst=True, ddgst=True).feed(wire(pdu, hdgst=True, ddgst=True)) == [
        pdu
    ]


@pytest.mark.parametrize(
    ("pdu", "plen"),
    [
        (CapsuleResp(cqe()), 28),  # response with trailing bytes
        (R2T(1, 1, 0, 1), 20),  # shorter than the header
        (CapsuleCmd(sqe()), 70),
    ],
)
def test_bad_plen(pdu: P.Pdu, plen: int) -> None:
    expect = C2H if isinstance(pdu, (CapsuleResp, R2T)) else H2C
    raw = patch(wire(pdu), 4, "<I", plen)
    expect_error(live_decoder(expect), raw, Fes.INVALID_HEADER_FIELD, P.OFFSET_PLEN)


def test_data_pdu_without_data() -> None:
    raw = patch(wire(R2T(1, 1, 0, 0)), 0, "<B", PduType.H2C_DATA)  # a 24-byte H2CData
    expect_error(live_decoder(H2C), raw, Fes.INVALID_HEADER_FIELD, P.OFFSET_PLEN)


def test_datal_mismatch() -> None:
    raw = patch(wire(H2CData(1, 1, 0, b"x" * 32)), 16, "<I", 31)
    err = expect_error(live_decoder(H2C), raw, Fes.INVALID_HEADER_FIELD, P.OFFSET_DATAL)
    assert len(err.header) == 24


def test_icreq_after_icreq() -> None:
    dec = Decoder(expect=H2C)
    assert dec.feed(wire(ICReq())) == [ICReq()]
    err = expect_error(dec, wire(ICReq()), Fes.PDU_SEQUENCE_ERROR)
    assert err.header == wire(ICReq())[:8]


def test_icresp_after_icresp_in_same_segment() -> None:
    dec = Decoder(expect=C2H)
    assert dec.feed(wire(ICResp()) * 2) == [ICResp()]
    expect_error(dec, b"", Fes.PDU_SEQUENCE_ERROR)


@pytest.mark.parametrize(
    ("expect", "pdu"),
    [(H2C, CapsuleCmd(sqe())), (C2H, CapsuleResp(cqe())), (H2C, H2CData(1, 1, 0, b"x"))],
)
def test_pdu_before_connection_init(expect: str, pdu: P.Pdu) -> None:
    expect_error(Decoder(expect=expect), wire(pdu), Fes.PDU_SEQUENCE_ERROR)


def test_digest_flags_must_match_negotiation() -> None:
    # header digest negotiated but not sent
    expect_error(live_decoder(C2H, hdgst=True), wire(CapsuleResp(cqe())), 1, P.OFFSET_FLAGS)
    # header digest sent but not negotiated
    expect_error(live_decoder(C2H), wire(CapsuleResp(cqe()), hdgst=True), 1, P.OFFSET_FLAGS)
    # data digest negotiated but missing on a PDU with data
    expect_error(live_decoder(H2C, ddgst=True), wire(H2CData(1, 1, 0, b"abc")), 1, 1)
    # data digest sent but not negotiated
    expect_error(live_decoder(H2C), wire(H2CData(1, 1, 0, b"abc"), ddgst=True), 1, 1)
    # ... while PDUs without data never carry DDGSTF, even when negotiated
    assert live_decoder(C2H, ddgst=True).feed(wire(R2T(1, 1, 0, 1), ddgst=True)) == [
        R2T(1, 1, 0, 1)
    ]


def test_success_without_last() -> None:
    raw = wire(C2HData(1, 0, b"x", last=True, success=True))
    bad = patch(raw, 1, "<B", P.FLAG_DATA_SUCCESS)
    expect_error(live_decoder(C2H), bad, Fes.INVALID_HEADER_FIELD, P.OFFSET_FLAGS)


def test_lowest_field_is_reported() -> None:
    # bad hlen (2) and bad pdo (3) and bad plen (4): hlen wins
    raw = bytearray(wire(H2CData(1, 1, 0, b"x" * 8)))
    raw[2], raw[3] = 20, 5
    expect_error(live_decoder(H2C), bytes(raw), 1, P.OFFSET_HLEN)


def test_malformed_term_req_is_not_answered() -> None:
    raw = wire(TermReq(c2h=True, fes=1, data=bytes(128)))
    bad = patch(raw, 4, "<I", 24 + 129)
    err = expect_error(live_decoder(C2H), bad, Fes.INVALID_HEADER_FIELD, P.OFFSET_PLEN)
    assert not err.send_term_req


def test_error_term_req_helper() -> None:
    raw = patch(wire(CapsuleCmd(sqe())), 2, "<B", 24)
    err = expect_error(live_decoder(H2C), raw, 1, 2)
    assert err.term_req(c2h=True) == TermReq(c2h=True, fes=1, fei=2, data=raw[:8])
    assert wire(err.term_req(c2h=True))[:4] == bytes([3, 0, 24, 0])


def test_decoder_is_dead_after_error() -> None:
    dec = live_decoder(H2C)
    good = CapsuleCmd(sqe(1))
    bad = patch(wire(CapsuleCmd(sqe(2))), 2, "<B", 24)
    with pytest.raises(ProtocolError) as info:
        dec.feed(wire(good) + bad + wire(good))
    assert info.value.pdus == [good]
    assert dec.error is info.value and dec.buffered == 0
    for data in (b"", wire(good)):
        with pytest.raises(ProtocolError) as again:
            dec.feed(data)
        assert (again.value.fes, again.value.fei, again.value.header) == (1, 2, bad[:8])
        assert again.value.pdus == []


def test_errors_do_not_depend_on_split() -> None:
    raw = bytearray(wire(CapsuleCmd(sqe(), b"x" * 8), hdgst=True))
    raw[9] ^= 1
    raw = bytes(raw)
    for cut in range(len(raw) + 1):
        dec = live_decoder(H2C, hdgst=True)
        with pytest.raises(ProtocolError) as info:
            dec.feed(raw[:cut])
            dec.feed(raw[cut:])
        assert (info.value.fes, info.value.header) == (3, raw[:72])


def test_bad_decoder_config() -> None:
    with pytest.raises(ValueError):
        Decoder(expect="sideways")
    with pytest.raises(ValueError):
        Decoder(expect=H2C).set_pda(32)
    with pytest.raises(ValueError):
        P.decode_one(wire(R2T(1, 1, 0, 1)) * 2)
    with pytest.raises(ValueError):
        P.decode_one(wire(R2T(1, 1, 0, 1))[:-1])


# -------------------------------------------------------------------- property

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
payload = st.binary(min_size=1, max_size=600)

h2c_pdu = st.one_of(
    st.builds(CapsuleCmd, st.binary(min_size=64, max_size=64), st.binary(max_size=600)),
    st.builds(H2CData, u16, u16, u32, payload, st.booleans()),
    st.builds(TermReq, st.just(False), st.integers(1, 6), u32, st.binary(max_size=128)),
)
c2h_pdu = st.one_of(
    st.builds(CapsuleResp, st.binary(min_size=16, max_size=16)),
    st.builds(C2HData, u16, u32, payload, st.just(True), st.booleans()),
    st.builds(C2HData, u16, u32, payload, st.just(False), st.just(False)),
    st.builds(R2T, u16, u16, u32, u32),
    st.builds(TermReq, st.just(True), st.integers(1, 6), u32, st.binary(max_size=128)),
)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[str, list[P.Pdu], bool, bool, int, list[int]]:
    expect = draw(st.sampled_from([H2C, C2H]))
    pdus = draw(st.lists(h2c_pdu if expect == H2C else c2h_pdu, min_size=1, max_size=8))
    hdgst, ddgst = draw(st.booleans()), draw(st.booleans())
    pda = draw(st.sampled_from([0, 1, 3, 7, 31]))
    cuts = draw(st.lists(st.integers(0, 8000), max_size=12))
    return expect, pdus, hdgst, ddgst, pda, cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_property_round_trip_any_split(
    case: tuple[str, list[P.Pdu], bool, bool, int, list[int]],
) -> None:
    expect, pdus, hdgst, ddgst, pda, cuts = case
    raw = b"".join(wire(p, hdgst=hdgst, ddgst=ddgst, pda=pda) for p in pdus)
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    dec = live_decoder(expect, hdgst=hdgst, ddgst=ddgst, pda=pda)
    got: list[P.Pdu] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        got += dec.feed(bytearray(raw[a:b]) if a % 2 else raw[a:b])
    assert got == pdus
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_property_garbage_never_crashes(garbage: bytes, hdgst: bool, ddgst: bool) -> None:
    """Arbitrary bytes either decode, wait for more, or raise ProtocolError."""
    for expect in (H2C, C2H):
        dec = live_decoder(expect, hdgst=hdgst, ddgst=ddgst)
        try:
            dec.feed(garbage)
        except ProtocolError as err:
            assert err.fes in {1, 2, 3, 5} and len(err.header) <= 128


@pytest.mark.parametrize("hdgst", [False, True])
@pytest.mark.parametrize("ddgst", [False, True])
@pytest.mark.parametrize("pda", [0, 3])
def test_divert_h2c_payload_into_caller_memory(hdgst: bool, ddgst: bool, pda: int) -> None:
    """data_header/divert/end_divert: the payload of a large H2CData goes into the
    caller's memory (the bytes already buffered copied, the rest written there by the
    caller), the PDU comes out of the next feed with that memory as its data, its data
    digest checked over it, and the PDUs after it decode as usual."""
    payload = bytes(range(256)) * 256  # 64 KiB
    h2c = P.H2CData(cccid=3, ttag=9, datao=4096, data=payload, last=False)
    after = P.CapsuleCmd(sqe(cid=4), b"")
    raw = wire(h2c, hdgst=hdgst, ddgst=ddgst, pda=pda)
    at = raw.index(payload[:64])
    for good in (True, False):
        dec = live_decoder(H2C, hdgst=hdgst, ddgst=ddgst, pda=pda)
        assert dec.feed(raw[: at - 1]) == []
        assert dec.data_header(1) is None, "header (or its padding) not complete yet"
        assert dec.feed(raw[at - 1 : at + 100]) == []
        assert dec.data_header(len(payload) - 99) is None, "less than asked for is left"
        got = dec.data_header(len(payload) - 100)
        assert got is not None
        p, n = got
        assert (p.cccid, p.ttag, p.datao, p.last, n) == (3, 9, 4096, False, len(payload))
        dest = memoryview(bytearray(n))
        assert dec.divert(p, dest) == 100 and dest[:100] == payload[:100]
        assert dec.buffered == at + 100, "counted for the stall watch"
        dest[100:] = payload[100:]  # (what the kernel does in the target)
        if not good:
            dest[5] ^= 1
        dec.end_divert()
        tail = raw[at + n :] + wire(after, hdgst=hdgst, ddgst=ddgst, pda=pda)
        if ddgst:
            assert dec.feed(tail[:2]) == [], "waits for the whole data digest"
            tail = tail[2:]
        if good or not ddgst:
            out = dec.feed(tail)
            assert out[0].data is dest and out[0] == P.H2CData(3, 9, 4096, dest, False)
            assert out[1:] == [after] and dec.buffered == 0
        else:
            with pytest.raises(P.DataDigestError) as err:
                dec.feed(tail)
            assert err.value.pdu.data is dest and err.value.cccid == 3
            assert bytes(err.value.header) == raw[: len(err.value.header)]
            assert dec.feed(b"") == [after], "the decoder stays usable"


def test_data_header_leaves_bad_headers_to_the_normal_path() -> None:
    """A header failing its digest or DATAL check is not offered for diversion: the PDU
    completes on the normal path, which reports the error as it always did."""
    payload = bytes(32768)
    raw = bytearray(wire(P.H2CData(1, 2, 0, payload, True), hdgst=True))
    raw[10] ^= 1  # (ttag): header digest no longer matches
    dec = live_decoder(H2C, hdgst=True)
    assert dec.feed(bytes(raw[:40])) == [] and dec.data_header(1) is None
    with pytest.raises(ProtocolError) as err:
        dec.feed(bytes(raw[40:]))
    assert err.value.fes == P.Fes.HEADER_DIGEST_ERROR
    raw = bytearray(wire(P.H2CData(1, 2, 0, payload, True)))
    struct.pack_into("<I", raw, 16, 4096)  # DATAL
    dec = live_decoder(H2C)
    assert dec.feed(bytes(raw[:40])) == [] and dec.data_header(1) is None
    with pytest.raises(ProtocolError) as err:
        dec.feed(bytes(raw[40:]))
    assert err.value.fei == P.OFFSET_DATAL
