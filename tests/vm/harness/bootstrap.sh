#!/bin/bash
# Prepare everything the VM tests need, once, in $VMDIR (idempotent; re-running only redoes what
# is missing or stale):
#   - host packages: QEMU, busybox-static, cpio, kmod, and the nvme-cli/fio/zstd the guest runs
#     over its read-only 9p view of the host root;
#   - /etc/nvme/hostnqn on the host (see "hostnqn" below);
#   - Debian bookworm-backports' 6.12 kernel (built with NVMe auth/TLS/multipath, which bookworm's
#     6.1 lacks), extracted but never installed: $VMDIR/kernel/lib/modules/<kver>, modules
#     decompressed (busybox insmod cannot read .ko.xz) and depmod'ed;
#   - $VMDIR/vmlinux: the ELF kernel taken out of the bzImage, so QEMU boots it through PVH and
#     TCG skips the in-guest decompressor (~4 s per boot);
#   - $VMDIR/initramfs.cpio.gz: busybox + /init (harness/init) + the modules to load at boot.
#
# Usage: bootstrap.sh [--no-install] [EXTRA_MODULE...]
#   EXTRA_MODULE / $BLOCKTARGET_VM_MODULES (space or comma separated): more kernel modules that
#   /init loads at boot. They go into a separate image, initramfs-<mod>+<mod>....cpio.gz (names
#   sorted, LC_ALL=C), so guests that want different sets never rebuild each other's image;
#   vm.py picks the same name from Guest(boot_modules=...). A module only one test needs can
#   also be loaded in the guest with `modprobe -d $VMDIR/kernel <mod>` (the extracted tree is
#   visible over 9p), which needs no image at all.
#
# hostnqn: the guest's nvme-cli reads the host's /etc/nvme/hostnqn (same root). nvme-cli's
# postinst normally creates it; when it is missing we create it here with `nvme gen-hostnqn`, so
# every guest and the host share one stable host NQN and tests need no --hostnqn.
#
# The PCI `nvme` driver is deliberately not in the initramfs: a VFIO test binds QEMU's emulated
# NVMe controller to vfio-pci, which the in-kernel driver would otherwise grab first.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VMDIR=${VMDIR:-$HOME/.cache/blocktarget/vm}
KSERIES=6.12
BASE_MODULES="virtio_pci virtio_net 9pnet_virtio 9p configfs crc32c_generic crc32c-intel
              nvme-core nvme-fabrics nvme-tcp nvmet nvmet-tcp brd"
# the VM tier's host packages: listed once, in scripts/system-deps.sh (role vm)
PACKAGES=$("$HERE/../../../scripts/system-deps.sh" --list vm | xargs)

INSTALL=1
EXTRA=${BLOCKTARGET_VM_MODULES:-}
for a in "$@"; do
  case $a in
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bootstrap.sh: unknown option $a" >&2; exit 2 ;;
    *) EXTRA="$EXTRA $a" ;;
  esac
done
EXTRA=${EXTRA//,/ }
# shellcheck disable=SC2086  # word splitting of module lists is intended throughout
SUFFIX=$(printf '%s\n' $EXTRA | LC_ALL=C sort -u | paste -sd+)
INITRAMFS=$VMDIR/initramfs${SUFFIX:+-$SUFFIX}.cpio.gz
STAMP=${INITRAMFS%.cpio.gz}.stamp

log() { echo "bootstrap: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
apt_quiet() {
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get -qq -o=Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=600 "$@"
}

mkdir -p "$VMDIR"

# --- host packages ---------------------------------------------------------------------------
missing=()
for p in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$INSTALL" = 1 ] || { log "missing packages: ${missing[*]}"; exit 1; }
  log "installing ${missing[*]}"
  apt_quiet update >/dev/null
  apt_quiet install -y --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- hostnqn -----------------------------------------------------------------------------------
if [ ! -s /etc/nvme/hostnqn ]; then
  log "creating /etc/nvme/hostnqn"
  as_root mkdir -p /etc/nvme
  nvme gen-hostnqn | as_root tee /etc/nvme/hostnqn >/dev/null
fi

# --- guest kernel ------------------------------------------------------------------------------
kver() { ls "$VMDIR/kernel/lib/modules" 2>/dev/null | head -1; }
if [ -z "$(kver)" ]; then
  src=/etc/apt/sources.list.d/bookworm-backports.sources
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(sed -n 's/^URIs: *\(.*debian\/\?\)$/\1/p' /etc/apt/sources.list.d/debian.sources \
             2>/dev/null | head -1)
    log "adding $src (mirror ${mirror:-http://deb.debian.org/debian})"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
      "${mirror:-http://deb.debian.org/debian}" /usr/share/keyrings/debian-archive-keyring.gpg \
      | as_root tee "$src" >/dev/null
    apt_quiet update >/dev/null
  fi
  re="^linux-image-${KSERIES//./\\.}\.[0-9]+\+deb12-amd64\$"
  pick() { apt-cache search --names-only "$re" | awk '{print $1}' | sort -V | tail -1; }
  pkg=$(pick)
  if [ -z "$pkg" ]; then apt_quiet update >/dev/null; pkg=$(pick); fi
  [ -n "$pkg" ] || { log "no package matches $re"; exit 1; }
  log "downloading $pkg"
  dl=$(mktemp -d "$VMDIR/dl.XXXXXX")
  chmod 755 "$dl"   # apt's _apt sandbox user writes here when we are root
  (cd "$dl" && apt-get download -qq "$pkg" 2>&1 | grep -v 'unsandboxed' >&2 || true)
  deb=$(ls "$dl"/*.deb)
  dpkg-deb -x "$deb" "$dl/kernel"
  find "$dl/kernel/lib/modules" -name '*.ko.xz' -print0 | xargs -0 -r -P"$(nproc)" -n200 xz -d
  find "$dl/kernel/lib/modules" -name '*.ko.zst' -print0 \
    | xargs -0 -r -P"$(nproc)" -n200 zstd -q -d --rm
  k=$(ls "$dl/kernel/lib/modules" | head -1)
  depmod -b "$dl/kernel" "$k"
  echo "$pkg" > "$dl/kernel/PACKAGE"
  rm -rf "$VMDIR/kernel" "$VMDIR/vmlinux"
  mv "$dl/kernel" "$VMDIR/kernel"
  rm -rf "$dl"
fi
KVER=$(kver)
KROOT=$VMDIR/kernel

# --- vmlinux -----------------------------------------------------------------------------------
if [ ! -s "$VMDIR/vmlinux" ]; then
  log "extracting vmlinux from vmlinuz-$KVER"
  /usr/bin/python3 - "$KROOT/boot/vmlinuz-$KVER" "$VMDIR/vmlinux.tmp" <<'PY'
import lzma
import subprocess
import sys

data = open(sys.argv[1], "rb").read()
zst, xz = data.find(b"\x28\xb5\x2f\xfd"), data.find(b"\xfd7zXZ\x00")
if zst >= 0:  # bookworm-backports 6.12; zstd complains about the bytes after the frame
    out = subprocess.run(["zstd", "-d", "-c"], input=data[zst:], capture_output=True).stdout
elif xz >= 0:  # bookworm 6.1
    out = lzma.LZMADecompressor().decompress(data[xz:])
else:
    sys.exit("no zstd or xz payload in " + sys.argv[1])
if not out.startswith(b"\x7fELF"):
    sys.exit("decompressed payload is not an ELF image")
open(sys.argv[2], "wb").write(out)
PY
  mv "$VMDIR/vmlinux.tmp" "$VMDIR/vmlinux"
fi

# --- initramfs ---------------------------------------------------------------------------------
MODULES=$(printf '%s\n' $BASE_MODULES $EXTRA | awk '!seen[$0]++' | xargs)
stamp="kver=$KVER modules=$MODULES init=$(sha256sum < "$HERE/init" | cut -c1-16)"
stamp="$stamp busybox=$(sha256sum < /bin/busybox | cut -c1-16)"
stamp="$stamp script=$(sha256sum < "$0" | cut -c1-16)"
if [ ! -s "$INITRAMFS" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$stamp" ]; then
  log "building ${INITRAMFS##*/} (kernel $KVER; modules: $MODULES)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work"/{bin,dev,proc,sys,newroot,etc,tmp}
  cp /bin/busybox "$work/bin/busybox"
  cp "$HERE/init" "$work/init"
  chmod 755 "$work/init"
  : > "$work/etc/modules.load"
  for m in $MODULES; do
    deps=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>&1) \
      || { log "kernel $KVER has no module or builtin '$m': $deps"; exit 1; }
    printf '%s\n' "$deps"
  done | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++' | while read -r ko; do
    rel=${ko#"$KROOT"}
    mkdir -p "$work$(dirname "$rel")"
    cp "$ko" "$work$rel"
    echo "$rel" >> "$work/etc/modules.load"
  done
  (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRAMFS.tmp.$$"
  # rename: a VM booting concurrently keeps reading the old file
  mv "$INITRAMFS.tmp.$$" "$INITRAMFS"
  echo "$stamp" > "$STAMP"
  log "${INITRAMFS##*/}: $(wc -l < "$work/etc/modules.load") modules, $(du -h "$INITRAMFS" | cut -f1)"
fi
echo "$VMDIR"
