"""The journal of acknowledged writes behind ``blocktarget perf --verify --journal FILE``.

Why it exists: ``--verify`` alone keeps the generation of each block in memory, so it
cannot say anything about a target that was killed and restarted, or about a checker
that was itself killed. The journal carries that knowledge across processes: a later
run (or ``--check-only``) reads every journaled block back and proves it holds the
generation last acknowledged for it, or one that was still in flight when the target
(or the checker) died. A generation that is neither is an acknowledged write lost.

Durability of the data (what an "acknowledged" write promises): the perf engine sends
every journaled write with FUA, so an acknowledgement means the data is on stable
media even on a bdev with a volatile write cache (a file bdev reports one; the target
turns FUA into write + flush there). The alternative, plain writes made durable by a
later Flush, would have to journal acknowledgements only once a Flush completed after
them; FUA keeps the rule "acknowledged = durable" per write, at the price of a flush
per write on cached bdevs, which a crash test does not mind.

Durability of the journal itself: one ``os.write`` per record on an ``O_APPEND``
descriptor, no user-space buffering, so a record is in the kernel the moment the call
returns and survives ``kill -9`` of the checker. (A power loss of the host machine is
out of scope; ``sync=True`` fsyncs each acknowledgement for that, slowly.) The intent
record goes out before the command is submitted and the acknowledgement after its
completion: a checker killed between the two leaves the write "in flight", which is
exactly what it was as far as anyone can prove.

Records, one text line each (a torn last line, from a checker killed mid-write, is
ignored)::

    H <io_size> <lba_size> <nsid>   header, once, first line
    I <slba> <gen>                  write submitted (in flight)
    A <slba> <gen>                  write acknowledged with success (FUA): durable
    F <slba> <gen>                  write failed: contents now unknown
    C <slba> <gen>                  a check read this generation back (resolved)
    U <slba>                        a check found a unit mixing in-flight generations
    G <gen>                         highest generation used so far (after compaction)

After a check the journal is compacted (:meth:`Journal.compact`) to one record per
unit, so a thousand crash cycles do not make each check replay a thousand runs.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BlockCheck", "Journal", "JournalState", "check_unit", "replay"]

_STAMP = struct.Struct("<4sQI")
_MAGIC = b"BTVP"  # perf.PATTERN_MAGIC (perf imports us, so the value is repeated here)


@dataclass
class JournalState:
    """What the records say about each journaled unit (keyed by its first LBA).

    ``acked[slba]`` is the generation the unit must hold (None: unknown, after a failed
    write or a mixed check); ``pending[slba]`` the generations written since then and
    never acknowledged, any of which may have landed."""

    io_size: int = 0
    lba_size: int = 0
    nsid: int = 0
    acked: dict[int, int | None] = field(default_factory=dict)
    pending: dict[int, set[int]] = field(default_factory=dict)
    max_gen: int = 0
    records: int = 0

    def units(self) -> list[int]:
        return sorted(set(self.acked) | set(self.pending))


def replay(path: str) -> JournalState:
    """Read a journal file; an absent or empty file is an empty state."""
    st = JournalState()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return st
    lines = raw.split(b"\n")
    lines.pop()  # after the last newline: empty, or a torn record never completed
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        kind = parts[0]
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"{path}: line {n} is not a journal record: {line[:60]!r}") from None
        if kind == b"H" and len(nums) == 3:
            st.io_size, st.lba_size, st.nsid = nums
            continue
        if kind == b"G" and len(nums) == 1:
            st.max_gen = max(st.max_gen, nums[0])
            continue
        if kind == b"U" and len(nums) == 1:
            st.acked[nums[0]] = None
            st.pending.pop(nums[0], None)
            st.records += 1
            continue
        if kind not in (b"I", b"A", b"F", b"C") or len(nums) != 2:
            raise ValueError(f"{path}: line {n} is not a journal record: {line[:60]!r}")
        slba, gen = nums
        st.max_gen = max(st.max_gen, gen)
        st.records += 1
        if kind == b"I":
            st.pending.setdefault(slba, set()).add(gen)
        elif kind == b"A" or kind == b"C":
            st.acked[slba] = gen
            st.pending.pop(slba, None)
        else:  # F: the target failed it; the blocks may hold anything now
            st.acked[slba] = None
            st.pending.pop(slba, None)
    if st.records and not st.io_size:
        raise ValueError(f"{path}: journal has records but no header line")
    return st


class Journal:
    """Appends records; see the module docstring for why each is one ``os.write``."""

    def __init__(self, path: str, io_size: int, lba_size: int, nsid: int, *,
                 sync: bool = False) -> None:
        self.path = path
        self.state = replay(path)
        st = self.state
        if st.io_size and (st.io_size, st.lba_size, st.nsid) != (io_size, lba_size, nsid):
            raise ValueError(
                f"journal {path} was written with io size {st.io_size}, block size "
                f"{st.lba_size}, nsid {st.nsid}; this run has {io_size}, {lba_size}, {nsid}")
        self.sync = sync
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not st.io_size:
            os.write(self.fd, b"H %d %d %d\n" % (io_size, lba_size, nsid))
            st.io_size, st.lba_size, st.nsid = io_size, lba_size, nsid

    def intent(self, slba: int, gen: int) -> None:
        os.write(self.fd, b"I %d %d\n" % (slba, gen))

    def acked(self, slba: int, gen: int) -> None:
        os.write(self.fd, b"A %d %d\n" % (slba, gen))
        if self.sync:
            os.fsync(self.fd)

    def failed(self, slba: int, gen: int) -> None:
        os.write(self.fd, b"F %d %d\n" % (slba, gen))

    def resolved(self, slba: int, gen: int | None) -> None:
        os.write(self.fd, b"U %d\n" % slba if gen is None else b"C %d %d\n" % (slba, gen))
        self.state.acked[slba] = gen
        self.state.pending.pop(slba, None)

    def compact(self, st: JournalState) -> None:
        """Rewrite the journal as the state ``st`` alone (after a check resolved it), so
        it does not grow without bound over a thousand crash cycles. Crash-safe: the
        new file is written and fsynced beside the old one, then renamed over it; a
        kill at any point leaves the old journal or the new one, both complete."""
        lines = [b"H %d %d %d\n" % (st.io_size, st.lba_size, st.nsid)]
        for slba in st.units():
            gen = st.acked.get(slba, -1)
            if gen is None:
                lines.append(b"U %d\n" % slba)
            elif gen >= 0:
                lines.append(b"A %d %d\n" % (slba, gen))
            for g in sorted(st.pending.get(slba, ())):
                lines.append(b"I %d %d\n" % (slba, g))
        lines.append(b"G %d\n" % st.max_gen)  # generations must never repeat
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        old, self.fd = self.fd, os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.close(old)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class BlockCheck:
    """The verdict on one unit read back: ``gen`` what it holds (None when its blocks
    disagree or carry no stamp), ``lost`` a description when an acknowledged write is
    missing, ``landed`` whether an in-flight generation is what it holds."""

    gen: int | None
    lost: str | None = None
    landed: bool = False


def _block_gen(block: memoryview, lba: int) -> int | None:
    """The generation a block is stamped with; None if it is not one whole stamp of
    this LBA repeated (never written, written elsewhere, or torn)."""
    magic, got_lba, gen = _STAMP.unpack_from(block)
    if magic != _MAGIC or got_lba != lba:
        return None
    stamp = bytes(block[:_STAMP.size])
    reps, tail = divmod(block.nbytes, _STAMP.size)
    if block != stamp * reps + stamp[:tail]:
        return None
    return gen


def check_unit(data: Any, slba: int, nlb: int, lba_size: int, acked: int | None,
               pending: set[int]) -> BlockCheck:
    """Judge one unit read back after a restart against what the journal says.

    Each block is judged on its own: NVMe promises atomicity per block, not per
    multi-block command, so an in-flight write may have landed on some blocks only.
    A block must hold the acknowledged generation or one of the in-flight ones; with
    no acknowledged generation known, anything goes (nothing was promised)."""
    mv = memoryview(data).cast("B")
    gens: list[int | None] = []
    for i in range(nlb):
        lba = slba + i
        got = _block_gen(mv[i * lba_size:(i + 1) * lba_size], lba)
        if acked is not None and got != acked and got not in pending:
            what = "no stamp of this LBA (lost, misplaced or torn)" if got is None \
                else f"generation {got}"
            flight = f", in flight {sorted(pending)}" if pending else ""
            return BlockCheck(None, lost=f"LBA {lba}: {what}, last acknowledged "
                                         f"generation {acked}{flight}")
        gens.append(got)
    first = gens[0]
    same = first is not None and all(g == first for g in gens)
    if not same:
        return BlockCheck(None)
    return BlockCheck(first, landed=first != acked and first in pending)
