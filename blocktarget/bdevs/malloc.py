"""malloc bdev: blocks in anonymous memory.

Memory comes from an anonymous mmap rather than a bytearray so that a large bdev costs
resident memory only for blocks actually written, and reads can hand out memoryviews of
the backing store (the zero-copy read path). Volatile by definition: advertised as having
a write cache so hosts know a Flush does not make it durable.
"""

from __future__ import annotations

import errno
import mmap
from typing import Any

from ..bdev import (
    LANE_MEM,
    Bdev,
    BdevIO,
    BdevModule,
    IOChannel,
    IOType,
    LaneTarget,
    Status,
    blocks_from_params,
    check_block_size,
    check_uuid,
    register_module,
)
from ..params import Param, Schema, non_empty, positive

_ZERO_CHUNK = bytes(1 << 20)
_READ = IOType.READ  # module constants: an enum member lookup per I/O showed in profiles
_WRITE = IOType.WRITE


class MallocChannel(IOChannel):
    bdev: MallocBdev

    def lane_target(self) -> LaneTarget | None:
        mem = self.bdev.host_memory()
        return None if mem is None else LaneTarget(LANE_MEM, mem, 0, (self,))

    def _submit(self, io: BdevIO) -> None:
        bdev = self.bdev
        bs = bdev.block_size
        start = io.offset_blocks * bs
        end = start + io.num_blocks * bs
        mem = bdev.mem
        t = io.type
        if t == _READ:
            if io.buf is None:
                io.buf = mem[start:end]
            else:
                io.buf[: end - start] = mem[start:end]
        elif t == _WRITE:
            mem[start:end] = io.buf
        elif t == IOType.UNMAP or t == IOType.WRITE_ZEROES:
            _zero(mem, start, end)
        elif t == IOType.COMPARE:
            if mem[start:end] != io.buf:
                self.complete(io, Status.COMPARE_FAILURE)
                return
        # FLUSH and RESET have nothing to do for memory
        self.complete(io, Status.SUCCESS)


def _zero(mem: memoryview, start: int, end: int) -> None:
    while start < end:
        n = min(end - start, len(_ZERO_CHUNK))
        mem[start : start + n] = _ZERO_CHUNK[:n]
        start += n


class MallocBdev(Bdev):
    def __init__(self, *, size: int, **kw: Any) -> None:
        super().__init__(**kw)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mem = memoryview(self._map)

    def create_channel(self, reactor: Any) -> IOChannel:
        return MallocChannel(self, reactor)

    def host_memory(self) -> Any:
        # the mmap itself, not self.mem: an export of the memoryview would make
        # destruct's mem.release() fail, one of the mmap only defers its unmapping
        return None if self._map.closed else self._map

    def destruct(self) -> None:
        self.mem.release()
        try:
            self._map.close()
        except BufferError:
            # a host's in-flight C2H data still references the memory; the GC frees it
            pass


SCHEMA = Schema(
    (
        Param("name", str, required=True, check=non_empty),
        Param("num_blocks", int, check=positive),
        Param("size_mb", int, check=positive),
        Param("block_size", int, default=512, check=check_block_size),
        Param("uuid", str, check=check_uuid),
        Param("md_size", int, default=0),
    ),
    # SPDK's client sends these for malloc; accepted, not modelled
    extra_ok=frozenset({"optimal_io_boundary", "md_interleave", "dif_is_head_of_md",
                        "physical_block_size", "dif_pi_format"}),
    refused={"dif_type": "end-to-end protection information (DIF/DIX) is not implemented"},
)


def create(params: dict[str, Any]) -> Bdev:
    bs = params["block_size"]
    if bs not in (512, 4096):
        from ..errors import InvalidParams

        raise InvalidParams("parameter 'block_size' must be 512 or 4096 for malloc")
    if params.get("md_size"):
        from ..errors import InvalidParams

        raise InvalidParams("parameter 'md_size' is not supported (no metadata)")
    nb = blocks_from_params(params)
    try:
        return _new_malloc(params, nb, bs)
    except (OverflowError, OSError) as exc:  # the operator asked for more than we can map
        from ..errors import RpcError

        raise RpcError(f"cannot allocate {nb * bs} bytes for malloc bdev "
                       f"'{params['name']}': {exc}", -errno.ENOMEM) from None


def _new_malloc(params: dict[str, Any], nb: int, bs: int) -> Bdev:
    return MallocBdev(
        size=nb * bs,
        name=params["name"],
        block_size=bs,
        num_blocks=nb,
        uuid=params.get("uuid") or "",
        product_name="Malloc disk",
        module="malloc",
        write_cache=True,
        io_types=frozenset(
            {IOType.READ, IOType.WRITE, IOType.FLUSH, IOType.UNMAP, IOType.WRITE_ZEROES,
             IOType.COMPARE, IOType.RESET}
        ),
        create_method="bdev_malloc_create",
        create_params={"num_blocks": nb, "block_size": bs},
    )


MODULE = register_module(
    BdevModule(
        name="malloc",
        create=create,
        schema=SCHEMA,
        create_method="bdev_malloc_create",
        delete_method="bdev_malloc_delete",
        description="RAM-backed bdev (volatile)",
    )
)
