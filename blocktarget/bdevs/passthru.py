"""passthru bdev: forwards every I/O unchanged to one base bdev.

It exists to be copied. A new virtual bdev (encryption, compression, QoS, ...) starts
as this file with a new name; everything it must get right is already here and small:

1. claim the base at create, so nobody deletes or exports it underneath us
   (`claim_bases`; the claim is released by `StackedBdev.destruct`);
2. take geometry and capabilities from the base (`inherited`), so hosts see exactly
   what the stack can do;
3. forward I/O on the same reactor (`StackedChannel.forward`): this is the one method
   a new bdev changes, to transform data or status on the way down or up;
4. write itself back in save_config (`create_method` + `create_params`), after its base,
   which the registry's creation order guarantees;
5. register with a parameter schema, which gives it `bdev_passthru_create` /
   `bdev_passthru_delete`, `bdev_create {"type": "passthru"}` and config support.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..bdev import BdevIO, BdevModule, LaneTarget, check_uuid, lane_target_of, register_module
from ..params import Param, Schema, non_empty
from ._stack import StackedBdev, StackedChannel, claim_bases, inherited

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor


class PassthruChannel(StackedChannel):
    def _submit(self, io: BdevIO) -> None:
        # (3) The whole data path. A transforming bdev would e.g. encrypt io.buf here for
        # writes, or pass `done=` to forward() and decrypt the child's buffer for reads.
        self.forward(io, self.base_channels[0])

    def lane_target(self) -> LaneTarget | None:
        # the C lane may read and write the base's blocks directly only because this
        # bdev passes them through unchanged: a transforming bdev returns None here
        base = lane_target_of(self.base_channels[0])
        return None if base is None else base.under(self)


class PassthruBdev(StackedBdev):
    def create_channel(self, reactor: Reactor | None) -> PassthruChannel:
        return PassthruChannel(self, reactor)

    def driver_specific(self) -> dict[str, Any]:
        return {"passthru": {"name": self.name, "base_bdev_name": self.bases[0].name}}


SCHEMA = Schema((
    Param("base_bdev_name", str, required=True, check=non_empty),
    Param("name", str, required=True, check=non_empty),
    Param("uuid", str, check=check_uuid),
))


def create(params: dict[str, Any], target: Target) -> PassthruBdev:
    name = params["name"]
    links = claim_bases(target, [params["base_bdev_name"]], f"passthru {name}")  # (1)
    base = links[0].base
    return PassthruBdev(
        links=links,
        name=name,
        num_blocks=base.num_blocks,
        uuid=params.get("uuid") or "",
        product_name="passthru",
        module="passthru",
        **inherited([base]),  # (2)
        create_method="bdev_passthru_create",  # (4)
        create_params={"base_bdev_name": base.name},
    )


MODULE = register_module(BdevModule(  # (5)
    name="passthru",
    create=create,
    schema=SCHEMA,
    create_method="bdev_passthru_create",
    delete_method="bdev_passthru_delete",
    description="forwards I/O unchanged to a base bdev (template for virtual bdevs)",
    needs_target=True,
))
