"""The project's QEMU guest harness; ``vm`` is the API, ``bootstrap.sh`` prepares the guest."""
