#!/usr/bin/env python3
"""Write the seed corpus of valid PDU streams for fuzz_pdu.py (tests/fuzz/corpus/).

Each seed is `cfg byte, step byte, stream` (see fuzz_pdu.py). The streams are what real
hosts and targets send at the start of a connection, so mutations start from deep inside
the protocol instead of from random bytes. Rerun after changing the input layout:

    python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from blocktarget.nvme import pdu, spec  # noqa: E402
from blocktarget.nvme.structs import (  # noqa: E402
    build_connect_data,
    build_connect_sqe,
    build_property_set_sqe,
    build_sqe,
    pack_cqe,
)

CORPUS = Path(__file__).resolve().parent / "corpus"
NQN = "nqn.2026-01.io.blocktarget:default"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100"
HOSTID = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100").bytes
PSDT = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT


def enc(*pdus: pdu.Pdu, hd: bool = False, dd: bool = False, pda: int = 0) -> bytes:
    out = b""
    for p in pdus:
        ic = type(p) in (pdu.ICReq, pdu.ICResp, pdu.TermReq)
        out += b"".join(bytes(x) for x in pdu.encode(p, hdgst=hd and not ic,
                                                      ddgst=dd and not ic, pda=pda))
    return out


def h2c_streams(hd: bool, dd: bool) -> dict[str, bytes]:
    dg = (pdu.DGST_HEADER if hd else 0) | (pdu.DGST_DATA if dd else 0)
    ic = pdu.ICReq(pfv=0, hpda=0, dgst=dg, maxr2t=0)
    connect = pdu.CapsuleCmd(build_connect_sqe(1, 0, 31, 0),
                             build_connect_data(HOSTID, 0xFFFF, NQN, HOSTNQN))
    io_connect = pdu.CapsuleCmd(build_connect_sqe(1, 1, 127, 0),
                                build_connect_data(HOSTID, 1, NQN, HOSTNQN))
    cc = spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT) | (
        spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT)
    prop = pdu.CapsuleCmd(build_property_set_sqe(2, spec.Property.CC, cc))
    ident = pdu.CapsuleCmd(build_sqe(spec.AdminOpcode.IDENTIFY, 3, 0, flags=PSDT,
                                     sgl_len=4096, sgl_id=spec.SGL_ID_TRANSPORT,
                                     cdw10=spec.Cns.CTRL))
    write_icd = pdu.CapsuleCmd(build_sqe(spec.IoOpcode.WRITE, 4, 1, flags=PSDT, sgl_len=512,
                                         sgl_id=spec.SGL_ID_INCAPSULE), bytes(range(256)) * 2)
    write_r2t = pdu.CapsuleCmd(build_sqe(spec.IoOpcode.WRITE, 5, 1, flags=PSDT,
                                         sgl_len=4096, sgl_id=spec.SGL_ID_TRANSPORT,
                                         cdw12=7))
    h2c = [pdu.H2CData(cccid=5, ttag=0, datao=0, data=b"\xa5" * 2048, last=False),
           pdu.H2CData(cccid=5, ttag=0, datao=2048, data=b"\x5a" * 2048, last=True)]
    read = pdu.CapsuleCmd(build_sqe(spec.IoOpcode.READ, 6, 1, flags=PSDT, sgl_len=4096,
                                    sgl_id=spec.SGL_ID_TRANSPORT, cdw12=7))
    term = pdu.TermReq(c2h=False, fes=pdu.Fes.PDU_SEQUENCE_ERROR)
    kw = {"hd": hd, "dd": dd}
    return {
        "icreq": enc(ic),
        "admin_connect": enc(ic, connect, **kw),
        "admin_enable_identify": enc(ic, connect, prop, ident, **kw),
        "io_connect_write_icd": enc(ic, io_connect, write_icd, **kw),
        "io_write_r2t_h2c": enc(ic, io_connect, write_r2t, *h2c, **kw),
        "io_read": enc(ic, io_connect, read, **kw),
        "term_req": enc(ic, term),
        "term_before_ic": enc(term),
    }


def c2h_streams(hd: bool, dd: bool) -> dict[str, bytes]:
    dg = (pdu.DGST_HEADER if hd else 0) | (pdu.DGST_DATA if dd else 0)
    ic = pdu.ICResp(pfv=0, cpda=0, dgst=dg, maxh2cdata=131072)
    kw = {"hd": hd, "dd": dd}
    return {
        "icresp_connect_resp": enc(ic, pdu.CapsuleResp(pack_cqe(1, 0, 1, 0, 1)), **kw),
        "r2t": enc(ic, pdu.R2T(cccid=5, ttag=0, r2to=0, r2tl=4096), **kw),
        "c2h_success": enc(ic, pdu.C2HData(cccid=6, datao=0, data=bytes(4096), last=True,
                                           success=True), **kw),
        "c2h_then_resp": enc(ic, pdu.C2HData(cccid=6, datao=0, data=b"x" * 1000, last=True),
                             pdu.CapsuleResp(pack_cqe(6, 0, 2, 1)), **kw),
        "c2h_term": enc(ic, pdu.TermReq(c2h=True, fes=pdu.Fes.INVALID_HEADER_FIELD, fei=4,
                                        data=bytes(24))),
    }


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    n = 0
    for hd, dd in ((False, False), (True, True), (True, False)):
        suffix = ("_hd" if hd else "") + ("_dd" if dd else "")
        cfg = (2 if hd else 0) | (4 if dd else 0)
        for name, stream in h2c_streams(hd, dd).items():
            (CORPUS / f"h2c_{name}{suffix}").write_bytes(bytes([cfg, 0]) + stream)
            n += 1
        for name, stream in c2h_streams(hd, dd).items():
            (CORPUS / f"c2h_{name}{suffix}").write_bytes(bytes([cfg | 1, 0]) + stream)
            n += 1
    # the same admin bring-up fed in awkward pieces
    stream = h2c_streams(False, False)["admin_enable_identify"]
    for step in (1, 7, 64):
        (CORPUS / f"h2c_admin_split_{step}").write_bytes(bytes([0, step]) + stream)
        n += 1
    print(f"wrote {n} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
