"""The receive arena (nvme/rx_arena.py) and the decoder's frozen input.

What must hold: bytes read into the arena are never overwritten (PDU payloads are views
of them and outlive later reads), the decoder keeps frozen input without copying it,
and a PDU begun with only a few bytes does not keep an arena alive.
"""

from __future__ import annotations

from blocktarget.nvme import pdu as P
from blocktarget.nvme import rx_arena
from blocktarget.nvme.pdu import HOST_TO_CONTROLLER as H2C
from blocktarget.nvme.pdu import CapsuleCmd, Decoder, H2CData, ICReq
from blocktarget.nvme.rx_arena import RxArena


def wire(p: P.Pdu) -> bytes:
    return b"".join(bytes(b) for b in P.encode(p))


def live_decoder() -> Decoder:
    dec = Decoder(expect=H2C)
    assert dec.feed(wire(ICReq())) == [ICReq()]
    return dec


def read_into(arena: RxArena, data: bytes) -> memoryview:
    """What the event loop does: read into room(), then the protocol takes the bytes."""
    room = arena.room()
    room[: len(data)] = data
    return arena.take(len(data))


def test_reads_never_overwrite_earlier_bytes() -> None:
    arena = RxArena()
    views = [read_into(arena, bytes([i]) * 40_000) for i in range(12)]  # > 3 arenas
    for i, v in enumerate(views):
        assert bytes(v) == bytes([i]) * 40_000
    # a fresh arena once less than MIN_ROOM is left; the old one lives while viewed
    per_arena = (rx_arena.SIZE - rx_arena.MIN_ROOM) // 40_000 + 1  # 5 reads of 40,000
    assert len({id(v.obj) for v in views}) == -(-12 // per_arena)
    assert len(arena.room()) >= rx_arena.MIN_ROOM


def test_frozen_input_is_decoded_in_place() -> None:
    arena = RxArena()
    h2c = H2CData(cccid=1, ttag=2, datao=0, data=b"\x5a" * 65536, last=True)
    cmd = CapsuleCmd(b"\x01" * 64, b"\x33" * 8192)
    data = read_into(arena, wire(cmd) + wire(h2c))
    got = live_decoder().feed(data, frozen=True)
    assert got == [cmd, h2c]
    # the payloads are views of the arena itself: no copy was made
    assert got[0].data.obj is data.obj and got[1].data.obj is data.obj
    # without the promise the decoder copies (the buffer could change under it)
    got = live_decoder().feed(data)
    assert got[1].data.obj is not data.obj


def test_a_pdu_begun_copies_only_a_few_bytes_out() -> None:
    arena = RxArena()
    h2c = wire(H2CData(cccid=1, ttag=2, datao=0, data=b"\x11" * 65536, last=True))
    dec = live_decoder()
    # a few bytes of the next PDU: copied out, so they pin no arena
    assert dec.feed(read_into(arena, h2c[:100]), frozen=True) == []
    dec.own_pending(4096)
    assert dec.to_boundary() == len(h2c) - 100
    # (the decoder's buffered bytes are its own now, not a view of the arena)
    assert dec._view.obj is not arena.mem.obj, "100 buffered bytes keep the arena alive"  # type: ignore[union-attr]
    # most of a PDU: kept as a view (its rest is on the way), decoded once complete
    dec2 = live_decoder()
    assert dec2.feed(read_into(arena, h2c[:60_000]), frozen=True) == []
    dec2.own_pending(4096)
    first, second = dec.feed(h2c[100:]), dec2.feed(h2c[60_000:])
    assert len(first) == len(second) == 1 and bytes(first[0].data) == bytes(second[0].data)
