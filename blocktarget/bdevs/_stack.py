"""What every virtual bdev needs to sit on top of other bdevs, written once.

A virtual bdev (delay, error, passthru, raid1, split) owns no storage: its channel on a
reactor forwards each `BdevIO` to the base bdev's channel *on the same reactor*, so the
stacked I/O path stays lock-free and never changes thread. This module holds the three
pieces each of them would otherwise repeat:

* `BaseLink`: the claim on one base bdev (taken at create, released at destruct) and a
  per-reactor count of the virtual channels using the base's channel there, so the base
  channel is closed when its last user on that reactor closes (a split's parts share
  one base channel per reactor).
* `StackedChannel`: a channel that opens its bases' channels when created and gives them
  back when closed, plus `forward()`, which submits a child I/O to a base with an offset
  and completes the parent with the child's status (and, for zero-copy reads, its
  buffer).
* `StackedBdev`: geometry and capabilities inherited from the base(s), and `destruct`
  releasing the claims.

The underscore keeps `load_builtin_modules` from importing this as a bdev type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..bdev import Bdev, BdevIO, IOChannel, IOType
from ..errors import InvalidParams

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor


def _key(reactor: Reactor | None) -> int:
    return reactor.index if reactor is not None else -1


class BaseLink:
    """One virtual bdev's hold on one base bdev: its claim and its base channels."""

    def __init__(self, base: Bdev, owner: str) -> None:
        base.claim(owner)  # raises Busy when someone else (a namespace, a raid) has it
        self.base = base
        self.owner = owner
        # reactor key -> virtual channels using base's channel there. Each reactor only
        # touches its own key, so no lock is needed.
        self._users: dict[int, int] = {}

    def get_channel(self, reactor: Reactor | None) -> IOChannel:
        """The base's channel on this reactor; call on that reactor."""
        key = _key(reactor)
        ch = self.base.get_io_channel(reactor)
        self._users[key] = self._users.get(key, 0) + 1
        return ch

    def put_channel(self, reactor: Reactor | None) -> None:
        """Give back a channel from `get_channel`; the last user closes the base's."""
        key = _key(reactor)
        left = self._users.get(key, 0) - 1
        if left > 0:
            self._users[key] = left
            return
        self._users.pop(key, None)
        self.base.close_channel(reactor)

    def release(self) -> None:
        self.base.release(self.owner)


def claim_bases(target: Target, names: Sequence[str], owner: str) -> list[BaseLink]:
    """Look up and claim every base, all or none: a failed claim undoes the others."""
    if len(set(names)) != len(names):
        raise InvalidParams(f"base bdevs {list(names)} name one bdev twice")
    links: list[BaseLink] = []
    try:
        for name in names:
            links.append(BaseLink(target.bdevs.get(name), owner))
    except BaseException:
        for link in links:
            link.release()
        raise
    return links


class StackedChannel(IOChannel):
    """A virtual bdev's channel: holds its bases' channels on the same reactor."""

    bdev: StackedBdev

    def __init__(self, bdev: StackedBdev, reactor: Reactor | None) -> None:
        super().__init__(bdev, reactor)
        self.base_channels: list[IOChannel] = []
        try:
            for link in bdev.links:
                self.base_channels.append(link.get_channel(reactor))
        except BaseException:
            self._put_bases()
            raise

    def _put_bases(self) -> None:
        for link, _ in zip(self.bdev.links, self.base_channels, strict=False):
            link.put_channel(self.reactor)
        self.base_channels = []

    def close(self) -> None:
        self._put_bases()

    def forward(self, io: BdevIO, base_ch: IOChannel, offset_blocks: int = 0,
                done: Callable[[BdevIO], None] | None = None, ctx: Any = None) -> None:
        """Submit a copy of `io` to `base_ch`, shifted by `offset_blocks`.

        Without `done`, the parent completes with the child's status. With `done`, the
        caller decides (`done(child)`; the child's ctx is `(parent, ctx)`).
        """
        child = BdevIO(io.type, io.offset_blocks + offset_blocks, io.num_blocks, io.buf,
                       done or self._forwarded, fua=io.fua, ctx=(io, ctx))
        base_ch.submit(child)

    def _forwarded(self, child: BdevIO) -> None:
        io = child.ctx[0]
        adopt_buffer(io, child)
        self.complete(io, child.status)


def adopt_buffer(io: BdevIO, child: BdevIO) -> None:
    """A read whose caller left `buf` None takes the base's buffer (zero-copy path)."""
    if io.buf is None and child.buf is not None and not child.status:
        io.buf = child.buf


class StackedBdev(Bdev):
    """A bdev made of base bdevs; releases its claims when destroyed."""

    def __init__(self, *, links: list[BaseLink], **kw: Any) -> None:
        super().__init__(**kw)
        self.links = links

    @property
    def bases(self) -> list[Bdev]:
        return [link.base for link in self.links]

    def destruct(self) -> None:
        for link in self.links:
            link.release()


def inherited(bases: Sequence[Bdev], *, io_types: frozenset[IOType] | None = None
              ) -> dict[str, Any]:
    """Bdev fields a virtual bdev takes from its base(s): what all of them can do, and a
    volatile cache if any has one (a Flush must then reach them)."""
    common = frozenset.intersection(*(b.io_types for b in bases))
    if io_types is not None:
        common &= io_types
    return {
        "block_size": bases[0].block_size,
        "write_cache": any(b.write_cache for b in bases),
        "io_types": common,
    }
