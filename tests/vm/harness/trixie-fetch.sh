#!/bin/bash
# Usage: trixie-fetch.sh NAME BINARY PACKAGE...
# Fetch Debian trixie packages (a program and the trixie libraries it runs on) into
# $VMDIR/NAME, for guest tools that bookworm lacks or has too old. Trixie's binaries need
# trixie's glibc, so the guest runs them with the loader from the same tree:
#   $VMDIR/NAME/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path <that dir> \
#       $VMDIR/NAME/BINARY ...
# apt works on a private trixie source list and private state under $VMDIR/trixie-apt: the
# host's own apt sources and lists are not touched. Idempotent (done when BINARY is
# there): prints $VMDIR/NAME.
set -euo pipefail
NAME=$1 BINARY=$2
shift 2
VMDIR=${VMDIR:-$HOME/.cache/blocktarget/vm}
OUT=$VMDIR/$NAME
if [ -x "$OUT/$BINARY" ]; then echo "$OUT"; exit 0; fi
mirror=$(sed -n 's/^URIs: *\(.*debian\/\?\)$/\1/p' /etc/apt/sources.list.d/debian.sources \
         2>/dev/null | head -1)
A=$VMDIR/trixie-apt
mkdir -p "$A/etc" "$A/lists/partial" "$A/cache/archives/partial"
printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
  "${mirror:-http://deb.debian.org/debian}" /usr/share/keyrings/debian-archive-keyring.gpg \
  > "$A/etc/trixie.sources"
opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$A/etc"
      -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o Debug::NoLocking=1)
echo "$NAME: fetching trixie's $* " >&2
apt-get -qq "${opts[@]}" update >&2
dl=$(mktemp -d "$VMDIR/$NAME-dl.XXXXXX")
chmod 755 "$dl"  # apt's _apt sandbox user writes here when we are root
(cd "$dl" && apt-get -qq "${opts[@]}" download "$@" 2>&1 | grep -v unsandboxed >&2 || true)
mkdir "$dl/root"
for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$dl/root"; done
[ -x "$dl/root/$BINARY" ] || { echo "$NAME: $BINARY did not download" >&2; exit 1; }
cat "$dl"/*.deb | sha256sum | cut -c1-16 > "$dl/root/PACKAGES.sha256"
rm -rf "$OUT"
mv "$dl/root" "$OUT"
rm -rf "$dl"
echo "$OUT"
