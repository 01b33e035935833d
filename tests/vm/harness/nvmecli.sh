#!/bin/bash
# nvme-cli 2.13 and libnvme 1.13 (Debian trixie) in $VMDIR/nvmecli: bookworm's nvme-cli 2.3
# can neither derive nor insert TLS keys (gen-tls-key --insert, check-tls-key) nor
# `connect --tls`. The guest runs it as
#   $VMDIR/nvmecli/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path <that dir> \
#       $VMDIR/nvmecli/usr/sbin/nvme ...
# Prints $VMDIR/nvmecli.
exec "$(dirname "$0")/trixie-fetch.sh" nvmecli usr/sbin/nvme \
  nvme-cli libnvme1t64 libjson-c5 libkeyutils1 libssl3t64 libzstd1 zlib1g libc6
