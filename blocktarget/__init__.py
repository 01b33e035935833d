"""blocktarget: an NVMe-over-Fabrics (NVMe/TCP) block-storage target."""

__version__ = "0.1.0"
