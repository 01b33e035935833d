"""The lvol store's on-disk format and allocator, byte for byte and cluster for cluster."""

from __future__ import annotations

import uuid

import pytest

from blocktarget.lvol.alloc import ClusterAllocator, IoEpochs, NoSpace
from blocktarget.lvol.format import (
    MAX_VOLUMES,
    NAME_MAX,
    FormatError,
    Metadata,
    VolumeRecord,
    decode_metadata,
    decode_super,
    encode_metadata,
    geometry,
    md_slot_size,
    runs,
)

U = str(uuid.UUID(int=1))


def test_geometry_fits_and_aligns() -> None:
    sb = geometry(64 * 2048, 512, 1 << 20, U)  # 64 MiB of 512-byte blocks, 1 MiB clusters
    assert sb.data_offset % (1 << 20) == 0
    assert sb.md_offset == 512 and sb.slot_offset(1) == 512 + sb.md_slot_size
    assert sb.slot_offset(1) + sb.md_slot_size <= sb.data_offset
    total = sb.clusters_on(64 << 20)
    assert sb.data_offset + total * sb.cluster_size <= 64 << 20
    assert total == 63  # one cluster's room goes to the metadata
    assert sb.max_clusters == 4 * 63  # room to grow with the base
    assert sb.md_slot_size >= md_slot_size(sb.max_clusters, 512)
    assert sb.clusters_on(1 << 30) == sb.max_clusters
    # 4 MiB clusters align the data region at 1 MiB, not 4 MiB
    sb4 = geometry(64 * 2048, 512, 4 << 20, U)
    assert sb4.data_offset == 1 << 20 and sb4.clusters_on(64 << 20) == 15


def test_geometry_refuses_what_cannot_hold_a_cluster() -> None:
    with pytest.raises(FormatError, match="holds no"):
        geometry(2048, 512, 1 << 20, U)  # 1 MiB base, 1 MiB clusters
    with pytest.raises(FormatError, match="not a multiple"):
        geometry(1 << 20, 4096, 6144, U)


def test_super_block_round_trip_and_damage() -> None:
    sb = geometry(32768, 4096, 1 << 20, U)
    raw = sb.encode()
    assert len(raw) == 4096
    assert decode_super(raw) == sb
    assert decode_super(bytes(4096)) is None  # no store
    torn = bytearray(raw)
    torn[40] ^= 1
    with pytest.raises(FormatError, match="CRC"):
        decode_super(bytes(torn))


def _md() -> Metadata:
    md = Metadata("lvs0", 100)
    md.volumes[str(uuid.UUID(int=2))] = VolumeRecord(
        str(uuid.UUID(int=2)), "thin", 100, thin=True, map={0: 5, 1: 6, 2: 7, 9: 1})
    md.volumes[str(uuid.UUID(int=3))] = VolumeRecord(
        str(uuid.UUID(int=3)), "ro", 2, read_only=True, clear_method="none", map={0: 2, 1: 3})
    return md


def test_metadata_round_trip_keeps_order_and_maps() -> None:
    md = _md()
    raw = encode_metadata(md, U, 7, 4096)
    assert len(raw) == 512  # written up to its length, in whole blocks
    with pytest.raises(FormatError, match="exceeds its slot"):
        encode_metadata(md, U, 7, 64)
    gen, back = decode_metadata(raw, U)  # type: ignore[misc]
    assert gen == 7 and back == md
    assert list(back.volumes) == list(md.volumes)
    assert runs(md.volumes[str(uuid.UUID(int=2))].map) == [(0, 5, 3), (9, 1, 1)]


def test_metadata_slot_rejected_when_torn_foreign_or_empty() -> None:
    raw = encode_metadata(_md(), U, 3, 4096)
    assert decode_metadata(bytes(4096), U) is None
    assert decode_metadata(raw, str(uuid.UUID(int=9))) is None  # another store's slot
    for pos in (20, 40, 60):  # any flipped bit in header or payload
        torn = bytearray(raw)
        torn[pos] ^= 0x10
        assert decode_metadata(bytes(torn), U) is None


def test_metadata_worst_case_fits_its_slot() -> None:
    total = 1000
    slot = md_slot_size(total, 512)
    md = Metadata("n" * NAME_MAX)
    per = total // MAX_VOLUMES + 1
    p = 0
    for i in range(MAX_VOLUMES):
        v = VolumeRecord(str(uuid.UUID(int=i + 10)), f"{i:0{NAME_MAX}d}", 4 * per, thin=True)
        for k in range(per):
            if p < total:
                v.map[2 * k] = p  # every cluster its own run
                p += 1
        md.volumes[v.uuid] = v
    assert slot - 512 < len(encode_metadata(md, U, 1, slot)) <= slot
    with pytest.raises(FormatError, match="longer than"):
        encode_metadata(Metadata("x" * (NAME_MAX + 1)), U, 1, slot)


def test_allocator_derived_from_maps_refuses_double_owner() -> None:
    a = ClusterAllocator.from_maps(10, [("a", {0: 1, 1: 2}), ("b", {0: 5})])
    assert a.free_count == 7
    assert a.allocate(3) == [0, 3, 4]
    with pytest.raises(NoSpace):
        a.allocate(5)
    with pytest.raises(ValueError, match="owned by both a and b"):
        ClusterAllocator.from_maps(10, [("a", {0: 1}), ("b", {3: 1})])
    with pytest.raises(ValueError, match="outside"):
        ClusterAllocator.from_maps(10, [("a", {0: 10})])


def test_limbo_waits_for_older_io() -> None:
    a = ClusterAllocator(4)
    e = IoEpochs()
    got = a.allocate(4)
    old_io = e.start()  # an I/O submitted before the release
    a.to_limbo(got[:2], e.advance())
    a.reclaim(e.oldest_busy())
    assert a.free_count == 0 and a.limbo_count == 2
    new_io = e.start()  # started after the release: does not hold the clusters back
    e.done(old_io)
    a.reclaim(e.oldest_busy())
    assert a.free_count == 2 and a.limbo_count == 0
    e.done(new_io)
    with pytest.raises(ValueError, match="twice"):
        a.release([got[0]])
