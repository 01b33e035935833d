"""libnvme's own TLS keys against ours, and secure concatenation (issue 17's loose ends).

test_kernel_tls.py inserts the TLS PSK derived here (nvme/tls_keys.py) into the guest's
`.nvme` keyring, because bookworm's nvme-cli 2.3 can neither derive nor insert one. Here
trixie's nvme-cli 2.13 / libnvme 1.13 (harness/nvmecli.sh, run on its own loader) does
it from the configured interchange key: `check-tls-key --insert` for identity versions 0
and 1, whose keyring entries (description = PSK identity, payload = TLS PSK) are
compared with ours. They differ from RFC 8446's (libnvme 1.13 does not length-prefix
HKDF's label and context, and puts the length little-endian); ours in libnvme's encoding
match, and the target, told the encoding by a version 1 identity's digest, accepts them:
`nvme connect --tls` with only libnvme's keys in the keyring,
and again with an empty keyring and `--tls-key <interchange key>` (libnvme derives and
inserts on its own), each with fio verify against blocktarget on the host. The same boot
tries secure concatenation (`nvme connect --concat` after DH-HMAC-CHAP), which the 6.12
guest kernel does not have.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration.target_proc import free_port, listen_address

from blocktarget.nvme.tls_keys import ConfiguredPsk, identity_for, tls_psk

from .harness.vm import Guest
from .test_kernel_auth import _gen_key, _nvme_cli
from .test_kernel_host import PRELUDE, serve

NQN = "nqn.2026-01.io.blocktarget:tls-libnvme"
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:71510000-0000-4000-8000-00000000000a"
HOST_D = "nqn.2014-08.org.nvmexpress:uuid:71510000-0000-4000-8000-00000000000d"
HARNESS = Path(__file__).resolve().parent / "harness"


def _fetch(script: str, vm: Guest) -> Path:
    r = subprocess.run([str(HARNESS / script)], capture_output=True, text=True, timeout=600,
                       env={"VMDIR": str(vm.vmdir), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    if r.returncode != 0:
        pytest.fail(f"{script}: cannot fetch Debian trixie's packages: {r.stderr[-2000:]}")
    return Path(r.stdout.strip())


SCRIPT = r"""
set -x
for m in tls gcm ghash-generic ghash-clmulni-intel aesni-intel; do
  modprobe -d $VMDIR/kernel $m 2>/dev/null || echo "no module $m"; done
L=$TLSHD/usr/lib/x86_64-linux-gnu
printf '[authenticate]\nkeyrings=.nvme\n' > tlshd.conf
$L/ld-linux-x86-64.so.2 --library-path $L $TLSHD/usr/sbin/tlshd -s -c tlshd.conf > tlshd.log 2>&1 &
sleep 1
NL=$NVMECLI/usr/lib/x86_64-linux-gnu
nv() { $NL/ld-linux-x86-64.so.2 --library-path $NL $NVMECLI/usr/sbin/nvme "$@"; }
nv version > nvme_version.txt || exit 10
# 1. libnvme derives the TLS PSKs from the configured key and inserts them
for v in 0 1; do
  nv check-tls-key --keydata="$KEY_A" --hostnqn=$HOST_A --subsysnqn=$NQN --identity=$v \
    --insert > check$v.txt 2>&1 || exit 11
done
$PY keyring.py dump > keyring.json || exit 12
# 2. the kernel host with only libnvme's keys
nv connect -t tcp -a $HOST_ADDR -s $SECURE -n $NQN --hostnqn=$HOST_A --hostid=${HOST_A##*uuid:} \
  --nr-io-queues=2 --tls > conn1.txt 2>&1 || exit 13
dev=$(nsdev $NQN 1) || exit 14
cat /sys/class/nvme/$(basename $(ctrldev $NQN))/tls_key > tls_key1.txt 2>/dev/null || true
fio --name=t1 --filename=$dev --rw=randwrite --bs=4k --size=4M --ioengine=libaio --direct=1 \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --output=fio1.txt || exit 15
nv disconnect -n $NQN > disc1.txt || exit 16
sleep 0.5
# 3. an empty keyring: libnvme given the interchange key derives and inserts on its own
$PY keyring.py clear || exit 17
nv connect -t tcp -a $HOST_ADDR -s $SECURE -n $NQN --hostnqn=$HOST_A --hostid=${HOST_A##*uuid:} \
  --nr-io-queues=2 --tls --tls-key="$KEY_A" > conn2.txt 2>&1 || exit 18
dev=$(nsdev $NQN 1) || exit 19
$PY keyring.py dump > keyring2.json || exit 20
fio --name=t2 --filename=$dev --rw=write --bs=128k --offset=8M --size=8M --ioengine=libaio \
    --direct=1 --iodepth=4 --verify=crc32c --verify_fatal=1 --output=fio2.txt || exit 21
nv disconnect -n $NQN > disc2.txt || exit 22
sleep 0.5
# 4. secure concatenation: DH-HMAC-CHAP on the plain listener, then TLS with the PSK the
#    authentication generates
dmesg -c > /dev/null
cat /dev/nvme-fabrics > fabrics_options.txt 2>&1
nv connect -vv -t tcp -a $HOST_ADDR -s $PLAIN -n $NQN --hostnqn=$HOST_D --hostid=${HOST_D##*uuid:} \
  --dhchap-secret="$KEY_D" --concat > concat.txt 2>&1
echo $? > concat_rc.txt
dmesg > concat_dmesg.txt
if c=$(ctrldev $NQN); then
  cat /sys/class/nvme/$(basename $c)/tls_key > concat_tls_key.txt 2>&1
  nv disconnect -n $NQN > /dev/null
fi
echo DONE
"""

KEYRING = r'''
"""The .nvme keyring's "psk" keys (description, payload) as JSON, or "clear" to empty it.
Linking the keyring into our session keyring makes its keys ours to read (possession)."""
import ctypes
import json
import sys
libc = ctypes.CDLL(None, use_errno=True)
KEYCTL = 250  # keyctl(2) on x86-64
GET_KEYRING_ID, LINK, DESCRIBE, CLEAR, READ = 0, 8, 6, 7, 11
ring = [int(ln.split()[0], 16) for ln in open("/proc/keys") if " .nvme: " in ln][0]
if sys.argv[1] == "clear":
    assert libc.syscall(KEYCTL, CLEAR, ring) == 0, ctypes.get_errno()
    raise SystemExit(0)
session = libc.syscall(KEYCTL, GET_KEYRING_ID, -3, 1)  # KEY_SPEC_SESSION_KEYRING, create
assert libc.syscall(KEYCTL, LINK, ring, session) == 0, ctypes.get_errno()
out = []
for ln in open("/proc/keys"):
    f = ln.split()
    if f[7] != "psk":
        continue
    serial = int(f[0], 16)
    buf = ctypes.create_string_buffer(512)
    n = libc.syscall(KEYCTL, DESCRIBE, serial, buf, 512)
    desc = buf.value.decode().split(";", 4)[4] if n > 0 else ""
    n = libc.syscall(KEYCTL, READ, serial, buf, 512)
    out.append({"serial": f"{serial:08x}", "description": desc,
                "payload": buf.raw[:n].hex() if n > 0 else None,
                "read_errno": 0 if n > 0 else ctypes.get_errno()})
print(json.dumps(out))
'''


@dataclass
class Run:
    rd: Path
    rc: int
    output: str
    log: str
    psk: ConfiguredPsk


@pytest.fixture(scope="module")
def boot(vm: Guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One boot for both tests: the key checks and connects, then the concatenation try."""
    tlshd, nvmecli = _fetch("tlshd.sh", vm), _fetch("nvmecli.sh", vm)
    import sys

    tmp = tmp_path_factory.mktemp("libnvme")
    psk = ConfiguredPsk.generate(1)
    key_d = _gen_key(_nvme_cli(), 1, HOST_D)
    keydir = tmp / "keys"
    keydir.mkdir(mode=0o700)
    for name, text in (("psk_a", psk.encode()), ("key_d", key_d)):
        (keydir / name).write_text(text + "\n")
        (keydir / name).chmod(0o600)
    secure, plain = free_port(), free_port()
    cfg = {"subsystems": [
        {"subsystem": "keyring", "config": [
            {"method": "keyring_file_add_key",
             "params": {"name": n, "path": str(keydir / n)}} for n in ("psk_a", "key_d")]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "M0", "num_blocks": 65536, "block_size": 512}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            # (ffdhe2048: a larger group's modexp under TCG outlasts the target's wait)
            {"method": "nvmf_set_config", "params": {"dhchap_digests": ["sha256"],
                                                     "dhchap_dhgroups": ["ffdhe2048"]}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": NQN, "allow_any_host": False, "serial_number": "BTTLS002"}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
            {"method": "nvmf_subsystem_add_host",
             "params": {"nqn": NQN, "host": HOST_A, "psk": "psk_a"}},
            {"method": "nvmf_subsystem_add_host",
             "params": {"nqn": NQN, "host": HOST_D, "dhchap_key": "key_d"}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(secure),
                        "secure_channel": True}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(plain)}},
        ]},
    ]}
    running = serve(tmp, cfg, secure_port=secure, plain_port=plain)
    target = next(running)
    try:
        env = {"RPC_PORT": str(target.http_port), "NQN": NQN, "TLSHD": str(tlshd),
               "NVMECLI": str(nvmecli), "PY": "/usr/bin/python3", "SECURE": str(secure),
               "PLAIN": str(plain), "HOST_A": HOST_A, "HOST_D": HOST_D,
               "KEY_A": psk.encode(), "KEY_D": key_d}
        res = vm.run(PRELUDE + SCRIPT, env=env, timeout=400, files={"keyring.py": KEYRING})
        sys.stderr.write(f"libnvme run dir: {res.rundir}\n")
        log = target.log()
        (res.rundir / "target.log").write_text(log)
        yield Run(res.rundir, res.rc, res.output, log, psk)
    finally:
        running.close()


def _text(run: Run, name: str) -> str:
    p = run.rd / name
    return p.read_text() if p.exists() else ""


def test_libnvme_derives_our_keys_and_connects(boot: Run) -> None:
    assert boot.rc == 0, (boot.output[-4000:], _text(boot, "tlshd.log")[-2000:])
    assert "nvme version 2.13" in _text(boot, "nvme_version.txt")
    # the keyring holds what libnvme derived: our derivation in libnvme's encoding of
    # HKDF's info gives the same identities and TLS PSKs, RFC 8446's does not
    got = {k["description"]: k["payload"] for k in json.loads(_text(boot, "keyring.json"))}
    want, rfc = {}, {}
    for version in (0, 1):
        ident = identity_for(boot.psk, HOST_A, NQN, version, libnvme=True)
        want[str(ident)] = tls_psk(boot.psk, ident, libnvme=True).hex()
        ident = identity_for(boot.psk, HOST_A, NQN, version)
        rfc[str(ident)] = tls_psk(boot.psk, ident).hex()
    assert all(v is not None for v in got.values()), _text(boot, "keyring.json")
    assert got == want, (got, want)
    assert not set(got.values()) & set(rfc.values())
    for f in ("fio1.txt", "fio2.txt"):
        assert "err= 0" in _text(boot, f), _text(boot, f)
    # libnvme inserted the key of --tls-key itself, under the version 1 identity
    auto = {k["description"] for k in json.loads(_text(boot, "keyring2.json"))}
    assert auto and auto <= set(want), auto
    # the kernel offered libnvme's version 1 identity, whose digest told the target
    # which encoding to derive with
    ok = [ln for ln in boot.log.splitlines() if "TLS from" in ln and HOST_A in ln]
    assert len(ok) >= 6 and all("NVMe1R01" in ln for ln in ok), ok  # 2 x (admin + 2 I/O)
    assert boot.psk.encode().split(":")[2][:16] not in boot.log


@pytest.mark.xfail(strict=True, reason=(
    "secure concatenation (TLS after DH-HMAC-CHAP, with the PSK it generates) is not "
    "available: the 6.12 guest kernel's fabrics options (/dev/nvme-fabrics) have no "
    "'concat', so nvme-cli 2.13 prints 'option \"concat\" ignored' and connects with "
    "DH-HMAC-CHAP alone, in the clear; blocktarget refuses generated-PSK identities "
    "(NVMe0G..) in turn"))
def test_secure_concatenation(boot: Run) -> None:
    assert boot.rc == 0, boot.output[-4000:]
    assert "concat" in _text(boot, "fabrics_options.txt").split(","), (
        _text(boot, "fabrics_options.txt"), _text(boot, "concat.txt"))
    assert _text(boot, "concat_rc.txt").strip() == "0", _text(boot, "concat.txt")
    tls = [ln for ln in boot.log.splitlines() if "TLS from" in ln and HOST_D in ln]
    assert tls, _text(boot, "concat.txt")
