#!/usr/bin/env python3
"""Coverage-guided fuzzer (atheris/libFuzzer) for the sans-I/O NVMe/TCP PDU decoder.

    python tests/fuzz/fuzz_pdu.py -max_total_time=60 [CORPUS_DIR ...]

Input layout (so the committed seeds under tests/fuzz/corpus/ are real streams):

    byte 0   bit 0: direction (0 = host-to-controller, as the target decodes)
             bit 1/2: header/data digest switched on after the ICReq/ICResp
             bits 3-4: our PDA (0..3)
    byte 1   split step: feed the stream in pieces of this many bytes (0 = all at once)
    rest     the byte stream, as it would arrive on the socket

Oracles, beyond "nothing but ProtocolError/DataDigestError escapes":
  * a fatal ProtocolError carries a FES that builds and encodes a TermReq, and the
    decoder stays dead (the next feed raises it again);
  * every decoded PDU re-encodes, and the re-encoding decodes to the same PDU
    (the codec never invents or loses fields);
  * the PDUs decoded do not depend on how the stream was split (one feed vs pieces).

The decoder module is imported under atheris.instrument_imports(), so libFuzzer's
coverage feedback steers the inputs into its branches; it is the code under test.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["blocktarget.nvme.pdu"]):
    from blocktarget.nvme import pdu  # noqa: E402

MAX_PDU = 1 << 16  # the input is at most a few KiB: a small limit reaches that branch too


def _same(a: pdu.Pdu, b: pdu.Pdu) -> bool:
    """Field-wise equality with payloads compared as bytes."""
    if type(a) is not type(b):
        return False
    for name in type(a).__slots__:  # type: ignore[attr-defined]
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, memoryview | bytes | bytearray):
            x, y = bytes(x), bytes(y)
        if x != y:
            return False
    return True


def decode_stream(cfg: int, step: int, stream: bytes) -> tuple[list[pdu.Pdu], object]:
    """Decode like a connection does; returns the PDUs and how it ended."""
    expect = pdu.CONTROLLER_TO_HOST if cfg & 1 else pdu.HOST_TO_CONTROLLER
    ic_type = pdu.ICResp if cfg & 1 else pdu.ICReq
    dec = pdu.Decoder(expect=expect, max_pdu_size=MAX_PDU)
    dec.set_pda((cfg >> 3) & 3)
    out: list[pdu.Pdu] = []
    chunks = [stream] if step == 0 else [stream[i:i + step]
                                         for i in range(0, len(stream), step)]
    chunks.append(b"")  # one last empty feed resumes a decoder paused after ICReq
    for chunk in chunks:
        while True:
            try:
                got = dec.feed(chunk)
            except pdu.DataDigestError as err:
                out.extend(err.pdus)
                out.append(err.pdu)
                assert 0 <= err.cccid <= 0xFFFF
                chunk = b""
                continue  # recoverable: the decoder goes on with what is buffered
            except pdu.ProtocolError as err:
                out.extend(err.pdus)
                term = err.term_req(c2h=not cfg & 1)
                b"".join(bytes(x) for x in pdu.encode(term))
                try:
                    dec.feed(b"")
                except pdu.ProtocolError:
                    pass
                else:
                    raise AssertionError("decoder usable after a fatal error") from None
                return out, ("fatal", int(err.fes), err.fei)
            out.extend(got)
            if got and type(got[-1]) is ic_type:
                dec.set_digests(bool(cfg & 2), bool(cfg & 4))
                if dec.buffered:
                    chunk = b""
                    continue
            break
    return out, ("ok", dec.buffered)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - libFuzzer's name
    if len(data) < 2:
        return
    cfg, step, stream = data[0], data[1], data[2:]
    pdus, end = decode_stream(cfg, step, stream)
    if step:
        # the same stream in one piece must give the same PDUs and the same ending
        whole, end1 = decode_stream(cfg, 0, stream)
        assert len(whole) == len(pdus) and all(map(_same, whole, pdus)), "split-dependent"
        assert end1 == end, (end1, end)
    after_ic = False
    for p in pdus:
        # digests apply to what follows the ICReq/ICResp (TermReq ignores them); the
        # decoder checks received PDOs against its own alignment: encode with that
        hd, dd = after_ic and bool(cfg & 2), after_ic and bool(cfg & 4)
        pda = (cfg >> 3) & 3
        wire = b"".join(bytes(x) for x in pdu.encode(p, hdgst=hd, ddgst=dd, pda=pda))
        again = pdu.decode_one(wire, hdgst=hd, ddgst=dd, pda=pda, max_pdu_size=MAX_PDU + 64)
        assert _same(again, p), (p, again)
        after_ic = after_ic or type(p) in (pdu.ICReq, pdu.ICResp)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
