"""The on-disk format of a logical volume store: pure bytes in, records out.

Layout on the base bdev (byte offsets; every region starts on a base block):

    0                 super block (one base block): geometry, written once at create
    md_offset         metadata slot 0  \\ two copies of the whole metadata, each with
    md_offset+slot    metadata slot 1  /  a generation number and a CRC
    data_offset       cluster 0, cluster 1, ... (the metadata says how many: a store grows
                      with its base, up to the max_clusters its slots are sized for)

Crash consistency: an update writes the *whole* new metadata, with generation g+1, into
the slot that does not hold generation g, then flushes the base bdev. A reader takes the
valid slot (magic, store UUID and CRC all match) with the higher generation. A crash
before the flush completes leaves slot g intact (the store as before); a torn slot fails
its CRC. So every metadata change is one atomic step, whatever the base does with a
torn write. The super block never changes after create; deleting the store zeroes it,
and a torn super block fails its CRC: the store is then gone, as after the delete.

The cost is a rewrite of the metadata per change, bounded by 12 bytes per allocated
cluster (runs of consecutive clusters coalesce) and 100 bytes per volume, written up to
its length only: fine for control-plane changes and for first writes to thin clusters at
the sizes measured (bench/lvol_overhead.py); a journal is the next step if it shows.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field

SB_MAGIC = b"BTLVSTOR"
MD_MAGIC = b"BTLVMETA"
VERSION = 1
NAME_MAX = 63  # as SPDK (SPDK_LVOL_NAME_MAX - 1, and the same for a store's name)
MAX_VOLUMES = 1024
DEFAULT_CLUSTER_SIZE = 4 * 1024 * 1024
GROW_FACTOR = 4  # metadata room for a base up to this many times its size at create
MAX_CLUSTERS = (1 << 32) - 1  # cluster numbers are 32-bit in the maps
UNMAPPED = -1

FLAG_THIN = 1
FLAG_READ_ONLY = 2
FLAG_SNAPSHOT = 4
CLEAR_METHODS = ("none", "unmap", "write_zeroes")

# magic, version, lvs uuid, block size, cluster size, md offset, md slot size,
# data offset, total clusters, base blocks at create; then a CRC32 of all that
_SB = struct.Struct("<8sI16sIQQQQQQ")
_MD_HEAD = struct.Struct("<8s16sQI")  # magic, lvs uuid, generation, payload length
_CRC = struct.Struct("<I")
# uuid, parent uuid (zeroes: none), clusters, clusters read through the parent, flags,
# clear method, run count
_VOL = struct.Struct("<16s16sQQIBI")
_RUN = struct.Struct("<III")  # first virtual cluster, first physical cluster, count
_VOL_MAX = _VOL.size + 1 + NAME_MAX


class FormatError(Exception):
    """The bytes are not a (valid) store; the message says which check failed."""


@dataclass(frozen=True)
class SuperBlock:
    uuid: str
    block_size: int
    cluster_size: int
    md_offset: int
    md_slot_size: int
    data_offset: int
    max_clusters: int  # what the metadata slots have room for: the store can grow to it
    base_blocks: int

    def encode(self) -> bytes:
        body = _SB.pack(SB_MAGIC, VERSION, uuidlib.UUID(self.uuid).bytes, self.block_size,
                        self.cluster_size, self.md_offset, self.md_slot_size,
                        self.data_offset, self.max_clusters, self.base_blocks)
        raw = body + _CRC.pack(zlib.crc32(body))
        return raw + bytes(self.block_size - len(raw))

    def slot_offset(self, slot: int) -> int:
        return self.md_offset + slot * self.md_slot_size

    def cluster_offset(self, pcluster: int) -> int:
        return self.data_offset + pcluster * self.cluster_size

    def clusters_on(self, base_bytes: int) -> int:
        """How many clusters a base of this size holds (at most max_clusters)."""
        return min(self.clusters_fitting(base_bytes), self.max_clusters)

    def clusters_fitting(self, base_bytes: int) -> int:
        """How many clusters fit on a base of this size, were the metadata unbounded."""
        return max(0, (base_bytes - self.data_offset) // self.cluster_size)


def decode_super(raw: bytes) -> SuperBlock | None:
    """The super block in the first bytes of a base bdev; None when there is none (no
    magic); FormatError when the magic is there but the rest does not hold."""
    if raw[:8] != SB_MAGIC:
        return None
    n = _SB.size
    if len(raw) < n + 4:
        raise FormatError("super block truncated")
    (crc,) = _CRC.unpack_from(raw, n)
    if zlib.crc32(raw[:n]) != crc:
        raise FormatError("super block CRC mismatch")
    (_, version, u, bs, cs, mdo, mds, do, total, blocks) = _SB.unpack_from(raw)
    if version != VERSION:
        raise FormatError(f"super block version {version} (this build reads {VERSION})")
    return SuperBlock(str(uuidlib.UUID(bytes=u)), bs, cs, mdo, mds, do, total, blocks)


def md_slot_size(total_clusters: int, block_size: int) -> int:
    """Room for the worst case: every volume at its longest name, every cluster its own run."""
    need = (_MD_HEAD.size + _CRC.size + 1 + NAME_MAX + 12 + MAX_VOLUMES * _VOL_MAX
            + _RUN.size * total_clusters)
    return -(-need // block_size) * block_size


def geometry(base_blocks: int, block_size: int, cluster_size: int, lvs_uuid: str,
             max_bytes: int | None = None) -> SuperBlock:
    """Lay a store out on a base of `base_blocks`; FormatError when nothing fits.

    The data region starts cluster-aligned (capped at 1 MiB alignment) so clusters sit on
    the base's natural boundaries. The metadata slots lie before it, so their size, and
    with it the most clusters the store can ever have, is fixed here: room for
    `max_bytes` of clusters when given (the operator's max_growable_size), else for
    GROW_FACTOR times the clusters that fit after them (found by shrinking a first guess
    until it holds). bdev_lvol_grow_lvstore extends a store up to that."""
    if cluster_size % block_size:
        raise FormatError(f"cluster size {cluster_size} is not a multiple of the base "
                          f"block size {block_size}")
    size = base_blocks * block_size
    align = min(cluster_size, 1 << 20)
    if max_bytes is not None:
        return _fixed_geometry(size, block_size, cluster_size, lvs_uuid, max_bytes, align)
    total = size // cluster_size
    while total > 0:
        most = min(total * GROW_FACTOR, MAX_CLUSTERS)
        slot = md_slot_size(most, block_size)
        data = -(-(block_size + 2 * slot) // align) * align
        if data + total * cluster_size <= size:
            return SuperBlock(lvs_uuid, block_size, cluster_size, block_size, slot, data,
                              most, base_blocks)
        total = min(total - 1, (size - data) // cluster_size)
    raise FormatError(f"a base of {size} bytes holds no {cluster_size}-byte cluster after "
                      "the metadata")


def _fixed_geometry(size: int, block_size: int, cluster_size: int, lvs_uuid: str,
                    max_bytes: int, align: int) -> SuperBlock:
    if max_bytes < size:
        raise FormatError(f"the most the store may grow to ({max_bytes} bytes) is less "
                          f"than the base's {size} bytes")
    most = max_bytes // cluster_size
    if most > MAX_CLUSTERS:
        raise FormatError(f"the most the store may grow to ({max_bytes} bytes) is more "
                          f"than {MAX_CLUSTERS} clusters of {cluster_size} bytes")
    slot = md_slot_size(most, block_size)
    data = -(-(block_size + 2 * slot) // align) * align
    if data + cluster_size > size:
        raise FormatError(f"metadata with room for {most} clusters takes {data} bytes: "
                          f"the base's {size} bytes hold no {cluster_size}-byte cluster "
                          "after it (choose a smaller max_growable_size)")
    return SuperBlock(lvs_uuid, block_size, cluster_size, block_size, slot, data, most,
                      size // block_size)


@dataclass
class VolumeRecord:
    """One volume as the metadata holds it; `map` is virtual cluster -> physical cluster
    for the allocated clusters only (thin volumes have holes, thick ones none)."""

    uuid: str
    name: str
    num_clusters: int
    thin: bool = False
    read_only: bool = False
    clear_method: str = "unmap"
    map: dict[int, int] = field(default_factory=dict)
    # a clone reads the clusters it has not written from its parent (a snapshot), and
    # so on up the chain; a cluster belongs to exactly one volume all the same
    parent: str | None = None
    snapshot: bool = False
    # the first clusters a clone may read from its parent: a clone shrunk and grown
    # again reads zeroes, not the parent's data, in the part it gave up
    parent_clusters: int = 0

    def copy(self) -> VolumeRecord:
        return VolumeRecord(self.uuid, self.name, self.num_clusters, self.thin,
                            self.read_only, self.clear_method, dict(self.map), self.parent,
                            self.snapshot, self.parent_clusters)


@dataclass
class Metadata:
    name: str
    total_clusters: int = 0  # data clusters in use by the store (grows with the base)
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)  # by uuid, in order

    def copy(self) -> Metadata:
        return Metadata(self.name, self.total_clusters,
                        {u: v.copy() for u, v in self.volumes.items()})


def runs(m: dict[int, int]) -> list[tuple[int, int, int]]:
    """A cluster map as (virtual start, physical start, count) runs."""
    out: list[tuple[int, int, int]] = []
    for v in sorted(m):
        p = m[v]
        if out:
            v0, p0, n = out[-1]
            if v == v0 + n and p == p0 + n:
                out[-1] = (v0, p0, n + 1)
                continue
        out.append((v, p, 1))
    return out


def _name(s: str) -> bytes:
    b = s.encode()
    if len(b) > NAME_MAX:
        raise FormatError(f"name {s!r} is longer than {NAME_MAX} bytes")
    return bytes([len(b)]) + b


def encode_metadata(md: Metadata, lvs_uuid: str, generation: int, slot_size: int,
                    block_size: int = 512) -> bytes:
    """One metadata slot's bytes, padded to whole blocks: only what is used is written
    (whatever an older, longer copy left after it lies outside the length and CRC)."""
    parts = [_name(md.name), struct.pack("<QI", md.total_clusters, len(md.volumes))]
    for v in md.volumes.values():
        rs = runs(v.map)
        flags = ((FLAG_THIN if v.thin else 0) | (FLAG_READ_ONLY if v.read_only else 0)
                 | (FLAG_SNAPSHOT if v.snapshot else 0))
        parent = uuidlib.UUID(v.parent).bytes if v.parent else bytes(16)
        parts.append(_VOL.pack(uuidlib.UUID(v.uuid).bytes, parent, v.num_clusters,
                               v.parent_clusters, flags,
                               CLEAR_METHODS.index(v.clear_method), len(rs)))
        parts.append(_name(v.name))
        parts.extend(_RUN.pack(*r) for r in rs)
    payload = b"".join(parts)
    head = _MD_HEAD.pack(MD_MAGIC, uuidlib.UUID(lvs_uuid).bytes, generation, len(payload))
    body = head + payload
    raw = body + _CRC.pack(zlib.crc32(body))
    if len(raw) > slot_size:
        raise FormatError(f"metadata of {len(raw)} bytes exceeds its slot of {slot_size}")
    return raw + bytes(-len(raw) % block_size)


def decode_metadata(raw: bytes, lvs_uuid: str) -> tuple[int, Metadata] | None:
    """(generation, metadata) of a slot, or None when the slot is not a complete, valid
    copy for this store (never written, torn by a crash, or left by another store)."""
    h = _MD_HEAD.size
    if len(raw) < h + 4 or raw[:8] != MD_MAGIC:
        return None
    _, u, gen, length = _MD_HEAD.unpack_from(raw)
    if u != uuidlib.UUID(lvs_uuid).bytes or h + length + 4 > len(raw):
        return None
    (crc,) = _CRC.unpack_from(raw, h + length)
    if zlib.crc32(raw[:h + length]) != crc:
        return None
    p = memoryview(raw)[h:h + length]
    off = 0

    def name() -> str:
        nonlocal off
        n = p[off]
        s = bytes(p[off + 1:off + 1 + n]).decode()
        off += 1 + n
        return s

    md = Metadata(name())
    md.total_clusters, count = struct.unpack_from("<QI", p, off)
    off += 12
    for _ in range(count):
        ub, pb, clusters, through, flags, clear, nruns = _VOL.unpack_from(p, off)
        off += _VOL.size
        v = VolumeRecord(str(uuidlib.UUID(bytes=ub)), name(), clusters,
                         bool(flags & FLAG_THIN), bool(flags & FLAG_READ_ONLY),
                         CLEAR_METHODS[clear],
                         parent=str(uuidlib.UUID(bytes=pb)) if any(pb) else None,
                         snapshot=bool(flags & FLAG_SNAPSHOT), parent_clusters=through)
        for _ in range(nruns):
            v0, p0, n = _RUN.unpack_from(p, off)
            off += _RUN.size
            for i in range(n):
                v.map[v0 + i] = p0 + i
        md.volumes[v.uuid] = v
    return gen, md


def resolve(md: Metadata, vol: VolumeRecord, vc: int) -> int:
    """The physical cluster a read of virtual cluster vc finds: the volume's own, else
    its parent's, up the chain; UNMAPPED (reads zeroes) when none has it."""
    v: VolumeRecord | None = vol
    for _ in range(len(md.volumes)):
        if v is None or vc >= v.num_clusters:
            return UNMAPPED
        p = v.map.get(vc)
        if p is not None:
            return p
        if vc >= v.parent_clusters:
            return UNMAPPED
        v = md.volumes.get(v.parent) if v.parent else None
    return UNMAPPED
