"""Logical volume methods: they live with the rest of the lvol code (blocktarget/lvol/rpc.py);
importing it here registers them, the store examiner and the store metrics with the target."""

from ..lvol import metrics, rpc  # noqa: F401
