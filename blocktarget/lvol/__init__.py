"""Logical volume stores: many volumes carved out of one base bdev, thin or thick.

One module per job: ``format`` (the bytes on the base: super block, two metadata slots),
``alloc`` (free clusters, derived from the volumes' maps), ``serial`` (one metadata change
at a time across reactors), ``baseio`` (I/O on the base from a reactor or the control
plane), ``store`` (the metadata's only way to change, control-plane operations),
``volume`` (the lvol bdev and its I/O path), ``module`` (a target's stores, examine),
``rpc`` (SPDK's bdev_lvol_* methods).
"""
