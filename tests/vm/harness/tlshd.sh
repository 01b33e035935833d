#!/bin/bash
# tlshd (Debian trixie's ktls-utils 1.0) and its trixie libraries in $VMDIR/tlshd, for the
# kernel NVMe/TCP host's TLS handshakes in the guest (the kernel hands each handshake to
# this user-space daemon; bookworm has no ktls-utils). The guest runs it as
#   $VMDIR/tlshd/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path <that dir> \
#       $VMDIR/tlshd/usr/sbin/tlshd -s -c tlshd.conf
# Prints $VMDIR/tlshd.
exec "$(dirname "$0")/trixie-fetch.sh" tlshd usr/sbin/tlshd \
  ktls-utils libgnutls30t64 libnettle8t64 libhogweed6t64 libp11-kit0 libtasn1-6 \
  libidn2-0 libunistring5 libgmp10 libc6 libffi8 libglib2.0-0t64 libmount1 libblkid1 \
  libpcre2-8-0 libselinux1 zlib1g libatomic1 libnl-3-200 libnl-genl-3-200 libkeyutils1
