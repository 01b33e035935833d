"""null bdev: writes are discarded and reads return zeroes, for benchmarking the path
around a backend. Reads share one zero buffer, so a null bdev costs no memory."""

from __future__ import annotations

from typing import Any

from ..bdev import (
    LANE_NULL,
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


class NullChannel(IOChannel):
    _zeros = memoryview(bytes(1 << 20))

    def lane_target(self) -> LaneTarget | None:
        return LaneTarget(LANE_NULL, None, 0, (self,))

    def _submit(self, io: BdevIO) -> None:
        if io.type == IOType.READ:
            n = io.num_blocks * self.bdev.block_size
            if io.buf is None:
                if n > len(self._zeros):
                    NullChannel._zeros = memoryview(bytes(n))
                io.buf = self._zeros[:n]
            else:
                io.buf[:n] = bytes(n)
        elif io.type == IOType.COMPARE:
            if any(bytes(io.buf)):
                self.complete(io, Status.COMPARE_FAILURE)
                return
        self.complete(io, Status.SUCCESS)


class NullBdev(Bdev):
    def create_channel(self, reactor: Any) -> IOChannel:
        return NullChannel(self, reactor)


SCHEMA = Schema(
    (
        Param("name", str, required=True, check=non_empty),
        Param("num_blocks", int, check=positive),
        Param("size_mb", int, check=positive),
        Param("total_size", int, check=positive, help="MiB (SPDK's older parameter name)"),
        Param("block_size", int, default=512, check=check_block_size),
        Param("uuid", str, check=check_uuid),
        Param("md_size", int, default=0),
    ),
    extra_ok=frozenset({"dif_is_head_of_md", "dif_pi_format", "physical_block_size"}),
    refused={"dif_type": "end-to-end protection information (DIF/DIX) is not implemented"},
)


def create(params: dict[str, Any]) -> Bdev:
    if params.get("total_size") is not None and params.get("size_mb") is None:
        params = dict(params, size_mb=params["total_size"])
    if params.get("md_size"):
        from ..errors import InvalidParams

        raise InvalidParams("parameter 'md_size' is not supported (no metadata)")
    bs = params["block_size"]
    nb = blocks_from_params(params)
    return NullBdev(
        name=params["name"],
        block_size=bs,
        num_blocks=nb,
        uuid=params.get("uuid") or "",
        product_name="Null disk",
        module="null",
        write_cache=False,
        io_types=frozenset(
            {IOType.READ, IOType.WRITE, IOType.FLUSH, IOType.UNMAP, IOType.WRITE_ZEROES,
             IOType.COMPARE, IOType.RESET}
        ),
        create_method="bdev_null_create",
        create_params={"num_blocks": nb, "block_size": bs},
    )


MODULE = register_module(
    BdevModule(
        name="null",
        create=create,
        schema=SCHEMA,
        create_method="bdev_null_create",
        delete_method="bdev_null_delete",
        description="discards writes, reads zeroes (benchmarks)",
    )
)
