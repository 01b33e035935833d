#!/bin/bash
# The Debian packages blocktarget needs, in one place, by role, and their installation.
#
#   scripts/system-deps.sh run     what `make run` needs: the target and its compiled parts
#   scripts/system-deps.sh test    what `make test` needs: run + every test tier (all of them)
#   scripts/system-deps.sh vm      the VM tier only (tests/vm/harness/bootstrap.sh reads it)
#   scripts/system-deps.sh --list ROLE     print the role's packages, install nothing
#
# Idempotent and fast when everything is there: one dpkg-query per package and no apt at all.
# Missing packages are installed with apt-get as root, or through `sudo -n` (never a password
# prompt). When that is impossible (not root and no password-less sudo, not a Debian system,
# apt failing) it names the missing packages and the command to install them, and goes on
# (exit 0): the parts that need them are then left out, and tests that need them skip with the
# reason. Under CI=true it exits 1 instead, since CI must test everything.
# SKIP_SYSTEM_DEPS=1 skips this script altogether (a machine whose packages are managed
# otherwise).
set -euo pipefail

# --- the lists -------------------------------------------------------------------------------
RUN_PACKAGES=(
  # the venv: python3 itself, and its venv module (Debian splits ensurepip out of python3)
  python3 python3-venv
  # the cffi extensions, compiled when the venv is built (setup.py): a C compiler and Python's
  # headers for all three (_fastpath, the NVMe/TCP C lane), liburing for _uring (the uring
  # bdev's io_uring engine), libpmem for _pmem (the pmem bdev), libssl for _tls (NVMe/TCP's
  # TLS 1.3 secure channel; openssl is the CLI the TLS tests handshake with)
  gcc libc6-dev python3-dev pkg-config liburing-dev libpmem-dev libssl-dev openssl
)
VM_PACKAGES=(
  # VM tier: a QEMU guest with the Linux NVMe/TCP initiator (tests/vm); the guest runs the
  # host's nvme-cli and fio over 9p; zstd/xz-utils unpack the guest kernel's modules
  qemu-system-x86 busybox-static cpio kmod nvme-cli fio zstd xz-utils
)
TEST_PACKAGES=(
  "${RUN_PACKAGES[@]}" "${VM_PACKAGES[@]}"
  # metrics test: promtool checks the alert rules and the scrape
  prometheus
  # deploy tests: systemd-analyze verify, systemd-sysusers
  systemd
  # FUSE export tests: fusermount3, mkfs.ext4/e2fsck
  fuse3 e2fsprogs
  # build-flag tests: the C sources must compile for arm64 too (a cross compiler, and its
  # C library headers, only recommended by the compiler, so not installed with it here),
  # and the objects are inspected with objdump (binutils, with gcc)
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross
)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

list_only=0
if [ "${1:-}" = --list ]; then list_only=1; shift; fi
role=${1:-}
case $role in
  run) PACKAGES=("${RUN_PACKAGES[@]}") ;;
  vm) PACKAGES=("${VM_PACKAGES[@]}") ;;
  test) PACKAGES=("${TEST_PACKAGES[@]}") ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac
if [ $list_only = 1 ]; then printf '%s\n' "${PACKAGES[@]}"; exit 0; fi
[ "${SKIP_SYSTEM_DEPS:-0}" = 1 ] && exit 0

log() { echo "system-deps: $*" >&2; }
give_up() {  # what cannot be installed: say so, then go on (CI: stop)
  log "$1"
  log "${2:-missing Debian packages} for \`make $role\`: ${missing[*]}"
  log "install them with:  sudo apt-get install --no-install-recommends ${missing[*]}"
  if [ "${CI:-}" = true ]; then
    log "CI=true: stopping (CI needs every package)"
    exit 1
  fi
  log "going on without them: what needs them is left out (its tests skip, saying why)"
  exit 0
}

missing=()
if ! command -v dpkg-query >/dev/null; then
  missing=("${PACKAGES[@]}")
  give_up "no dpkg-query: not a Debian system, cannot check or install packages" \
    "Debian 12 packages (install your system's equivalents)"
fi
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  give_up "not root, and sudo is missing or asks for a password"
fi
log "installing ${missing[*]}"
apt_get() {
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -qq -o=Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=600 "$@"
}
apt_get update >/dev/null || give_up "apt-get update failed"
apt_get install -y --no-install-recommends "${missing[@]}" >/dev/null \
  || give_up "apt-get install failed"
