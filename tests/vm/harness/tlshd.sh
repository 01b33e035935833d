#!/bin/bash
# Fetch tlshd (Debian trixie's ktls-utils 1.0) and the trixie libraries it runs on into
# $VMDIR/tlshd, for the kernel NVMe/TCP host's TLS handshakes in the guest (the kernel hands
# each handshake to this user-space daemon). Bookworm has no ktls-utils, and trixie's
# gnutls needs trixie's glibc, so the guest runs it with the loader from the same tree:
#   $VMDIR/tlshd/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path <that dir> \
#       $VMDIR/tlshd/usr/sbin/tlshd -s -c tlshd.conf
# apt works on a private trixie source list and private state under $VMDIR/trixie-apt: the
# host's own apt sources and lists are not touched. Idempotent: prints $VMDIR/tlshd.
set -euo pipefail
VMDIR=${VMDIR:-$HOME/.cache/blocktarget/vm}
OUT=$VMDIR/tlshd
PACKAGES="ktls-utils libgnutls30t64 libnettle8t64 libhogweed6t64 libp11-kit0 libtasn1-6
          libidn2-0 libunistring5 libgmp10 libc6 libffi8 libglib2.0-0t64 libmount1 libblkid1
          libpcre2-8-0 libselinux1 zlib1g libatomic1 libnl-3-200 libnl-genl-3-200 libkeyutils1"
if [ -x "$OUT/usr/sbin/tlshd" ]; then echo "$OUT"; exit 0; fi
mirror=$(sed -n 's/^URIs: *\(.*debian\/\?\)$/\1/p' /etc/apt/sources.list.d/debian.sources \
         2>/dev/null | head -1)
A=$VMDIR/trixie-apt
mkdir -p "$A/etc" "$A/lists/partial" "$A/cache/archives/partial"
printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
  "${mirror:-http://deb.debian.org/debian}" /usr/share/keyrings/debian-archive-keyring.gpg \
  > "$A/etc/trixie.sources"
opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$A/etc"
      -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o Debug::NoLocking=1)
echo "tlshd: fetching trixie's ktls-utils and its libraries" >&2
apt-get -qq "${opts[@]}" update >&2
dl=$(mktemp -d "$VMDIR/tlshd-dl.XXXXXX")
chmod 755 "$dl"  # apt's _apt sandbox user writes here when we are root
# shellcheck disable=SC2086  # the package list is split on purpose
(cd "$dl" && apt-get -qq "${opts[@]}" download $PACKAGES 2>&1 | grep -v unsandboxed >&2 || true)
mkdir "$dl/root"
for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$dl/root"; done
[ -x "$dl/root/usr/sbin/tlshd" ] || { echo "tlshd: ktls-utils did not download" >&2; exit 1; }
cat "$dl"/*.deb | sha256sum | cut -c1-16 > "$dl/root/PACKAGES.sha256"
rm -rf "$OUT"
mv "$dl/root" "$OUT"
rm -rf "$dl"
echo "$OUT"
