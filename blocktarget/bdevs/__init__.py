"""Bdev modules, one per backend type; each registers itself with bdev.register_module."""
