"""VM tests: the Linux kernel NVMe/TCP initiator in a QEMU guest (see harness/vm.py)."""
