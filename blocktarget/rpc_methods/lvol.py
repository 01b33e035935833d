"""Logical volume methods: they live with the rest of the lvol code (blocktarget/lvol/rpc.py);
importing it here registers them, and the store examiner, with the target."""

from ..lvol import rpc  # noqa: F401
