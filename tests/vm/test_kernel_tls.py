"""The secure channel against Linux (issue 17 items 2-4). First the kernel host: the 6.12 guest's
nvme-tcp with TLS (CONFIG_NVME_TCP_TLS), its handshake done by tlshd (Debian trixie's
ktls-utils 1.0 with gnutls, fetched by harness/tlshd.sh and run on its own loader) and its
record layer in the guest kernel's kTLS, against blocktarget on this host, whose record
layer is OpenSSL in user space.

The guest's nvme-cli 2.3 can neither insert TLS keys nor `connect --tls`, so the guest
adds the TLS PSK to the kernel's `.nvme` keyring itself (add_key(2), key type "psk",
description = the PSK identity, as newer nvme-cli's `gen-tls-key --insert` does) and
connects through /dev/nvme-fabrics with the kernel's `tls` option. The key it inserts is
the one derived here from the configured key (nvme/tls_keys.py): the kernel looks the key
up by identity and tlshd uses it as is, so this run proves the handshake and the record
layers interoperate; the derivation itself is checked against OpenSSL's TLS 1.3 KDF in
tests/unit/test_tls_keys.py, and against libnvme's own (trixie's nvme-cli 2.13 inserting
its keys) in test_kernel_tls_libnvme.py.

One boot: TLS connect with 2 I/O queues, fio crc32c verify, disconnect; a host whose
keyring holds a wrong key is refused; a plain connect to the secure listener is refused;
a host without a PSK still works on the plain listener beside it. The target's log and
counters say the same, and hold no key material. Then, in the guest (whose kernel has
kTLS), the target with its record layer in kernel TLS, and our initiator against the
Linux target (nvmet with tlshd as the TLS server).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.target_proc import RunningTarget, free_port, listen_address

from blocktarget.nvme.tls_keys import ConfiguredPsk, identity_for, tls_psk

from .harness.vm import Guest
from .test_kernel_host import PRELUDE, serve

NQN = "nqn.2026-01.io.blocktarget:tls"
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:71500000-0000-4000-8000-00000000000a"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:71500000-0000-4000-8000-00000000000b"
HOST_C = "nqn.2014-08.org.nvmexpress:uuid:71500000-0000-4000-8000-00000000000c"
HARNESS = Path(__file__).resolve().parent / "harness"


@pytest.fixture
def tlshd(vm: Guest) -> Path:
    """trixie's tlshd under $VMDIR (downloaded once by harness/tlshd.sh)."""
    r = subprocess.run([str(HARNESS / "tlshd.sh")], capture_output=True, text=True,
                       timeout=600, env={"VMDIR": str(vm.vmdir), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    if r.returncode != 0:
        pytest.fail(f"cannot fetch tlshd (ktls-utils from Debian trixie): {r.stderr[-2000:]}")
    return Path(r.stdout.strip())


@pytest.fixture
def keys() -> dict[str, ConfiguredPsk]:
    return {"a": ConfiguredPsk.generate(1), "b": ConfiguredPsk.generate(1)}


@pytest.fixture
def target(tmp_path: Path, keys: dict[str, ConfiguredPsk]) -> Iterator[RunningTarget]:
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)
    keyring = []
    for name, psk in keys.items():
        p = keydir / name
        p.write_text(psk.encode() + "\n")
        p.chmod(0o600)
        keyring.append({"method": "keyring_file_add_key",
                        "params": {"name": f"psk_{name}", "path": str(p)}})
    secure, plain = free_port(), free_port()
    cfg = {"subsystems": [
        {"subsystem": "keyring", "config": keyring},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "M0", "num_blocks": 65536, "block_size": 512}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": NQN, "allow_any_host": False, "serial_number": "BTTLS001"}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
            {"method": "nvmf_subsystem_add_host",
             "params": {"nqn": NQN, "host": HOST_A, "psk": "psk_a"}},
            {"method": "nvmf_subsystem_add_host",
             "params": {"nqn": NQN, "host": HOST_B, "psk": "psk_b"}},
            {"method": "nvmf_subsystem_add_host", "params": {"nqn": NQN, "host": HOST_C}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(secure),
                        "secure_channel": True}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(plain)}},
        ]},
    ]}
    yield from serve(tmp_path, cfg, secure_port=secure, plain_port=plain)


SCRIPT = r"""
set -x
for m in tls gcm ghash-generic ghash-clmulni-intel aesni-intel; do
  modprobe -d $VMDIR/kernel $m 2>/dev/null || echo "no module $m"; done
L=$TLSHD/usr/lib/x86_64-linux-gnu
printf '[debug]\nloglevel=1\n[authenticate]\nkeyrings=.nvme\n' > tlshd.conf
$L/ld-linux-x86-64.so.2 --library-path $L $TLSHD/usr/sbin/tlshd -s -c tlshd.conf > tlshd.log 2>&1 &
sleep 1
# the TLS PSKs into the kernel's .nvme keyring: A's right key, B's wrong one
/usr/bin/python3 - > keys.txt <<PY || exit 10
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
ring = [int(l.split()[0], 16) for l in open("/proc/keys") if " .nvme: " in l][0]
for ident, hexkey in ((os.environ["ID_A"], os.environ["KEY_A"]),
                      (os.environ["ID_B"], os.environ["KEY_B_WRONG"])):
    key = bytes.fromhex(hexkey)
    serial = libc.syscall(248, b"psk", ident.encode(), key, len(key), ring)  # add_key
    assert serial > 0, ctypes.get_errno()
    print("added", serial)
PY
fabrics() {  # fabrics HOSTNQN PORT [extra options]
  local uuid=${1##*uuid:}
  echo -n "nqn=$NQN,transport=tcp,traddr=$HOST_ADDR,trsvcid=$2,hostnqn=$1,hostid=$uuid$3" \
    > /dev/nvme-fabrics
}
# 1. TLS, admin + 2 I/O queues, fio verify
fabrics $HOST_A $SECURE ",nr_io_queues=2,tls" || exit 11
dev=$(nsdev $NQN 1) || exit 12
ctrl=$(basename $(ctrldev $NQN)) || exit 13
cat /sys/class/nvme/$ctrl/queue_count > queue_count.txt 2>/dev/null || true
cat /sys/class/nvme/$ctrl/tls_key > tls_key.txt 2>/dev/null || true
fio --name=t1 --filename=$dev --rw=randwrite --bs=4k --size=4M --ioengine=libaio --direct=1 \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --output=fio1.txt || exit 14
fio --name=t2 --filename=$dev --rw=write --bs=128k --offset=8M --size=8M --ioengine=libaio \
    --direct=1 --iodepth=4 --verify=crc32c --verify_fatal=1 --output=fio2.txt || exit 15
nvme disconnect -n $NQN > disc1.txt || exit 16
sleep 0.5
# 2. a wrong key: the handshake fails, no controller
if fabrics $HOST_B $SECURE ",tls" 2> wrong.txt; then exit 17; fi
# 3. plain NVMe/TCP to the secure listener: refused
if fabrics $HOST_C $SECURE "" 2> plain.txt; then exit 18; fi
ls /sys/class/nvme/ > ctrls_after_refusals.txt
# 4. the plain listener beside it still serves a host without a PSK
fabrics $HOST_C $PLAIN "" || exit 19
dev=$(nsdev $NQN 1) || exit 20
dd if=$dev of=/dev/null bs=64k count=16 iflag=direct status=none || exit 21
nvme disconnect -n $NQN || exit 22
dmesg > dmesg.txt
echo DONE
"""


def test_kernel_host_tls(vm: Guest, tlshd: Path, target: RunningTarget,
                         keys: dict[str, ConfiguredPsk]) -> None:
    ida = identity_for(keys["a"], HOST_A, NQN)
    idb = identity_for(keys["b"], HOST_B, NQN)
    wrong = ConfiguredPsk.generate(1)
    env = {"RPC_PORT": str(target.http_port), "NQN": NQN, "TLSHD": str(tlshd),
           "SECURE": str(target.secure_port), "PLAIN": str(target.plain_port),  # type: ignore[attr-defined]
           "HOST_A": HOST_A, "HOST_B": HOST_B, "HOST_C": HOST_C,
           "ID_A": str(ida), "KEY_A": tls_psk(keys["a"], ida).hex(),
           "ID_B": str(idb), "KEY_B_WRONG": tls_psk(wrong, identity_for(wrong, HOST_B, NQN)).hex()}
    res = vm.run(PRELUDE + SCRIPT, env=env, timeout=300)
    rd = res.rundir
    tlshd_log = (rd / "tlshd.log").read_text() if (rd / "tlshd.log").exists() else ""
    assert res.rc == 0, (res.output[-4000:], tlshd_log[-3000:])
    assert "DONE" in res.output
    for f in ("fio1.txt", "fio2.txt"):
        assert "err= 0" in (rd / f).read_text()
    qc = (rd / "queue_count.txt").read_text().strip()
    if qc:
        assert int(qc) == 3
    # tlshd: every queue of host A handshook with TLS 1.3 AES-128-GCM, B's failed
    assert tlshd_log.count("was successful") >= 3, tlshd_log[-3000:]
    assert "(TLS1.3)-(ECDHE-SECP256R1)-(AES-128-GCM)" in tlshd_log or "AES-128-GCM" in tlshd_log
    log = target.log()
    ok = [ln for ln in log.splitlines() if "TLS from" in ln and str(ida) in ln]
    assert len(ok) >= 3 and all("TLS_AES_128_GCM_SHA256" in ln for ln in ok), ok
    assert "failed (handshake)" in log and "failed (plain)" in log, log[-3000:]
    counts = target.rpc("nvmf_get_transports")[0]["tls"]["connections"]
    assert counts.get("established", 0) >= 3 and counts.get("handshake", 0) >= 1, counts
    assert counts.get("plain", 0) >= 1, counts
    for psk in (*keys.values(), wrong):
        b64 = psk.encode().split(":")[2]
        assert b64[:16] not in log and psk.key.hex() not in log
    assert env["KEY_A"] not in log


KTLS_SCRIPT = r"""
set -x
for m in tls gcm ghash-generic ghash-clmulni-intel aesni-intel; do
  modprobe -d $VMDIR/kernel $m 2>/dev/null || echo "no module $m"; done
cat /proc/sys/net/ipv4/tcp_available_ulp > ulp.txt
chmod 600 psk_a
SOCK=/tmp/bt.sock
$PY -m blocktarget start -c cfg.json -r $SOCK --http "" > target.log 2>&1 &
for i in $(seq 1 100); do [ -S $SOCK ] && break; sleep 0.2; done
# 1. our initiator (user-space TLS) against the target's kernel TLS
$PY -m blocktarget perf -a 127.0.0.1 -s $SECURE -n $NQN --hostnqn $HOST_A --tls \
    --tls-key psk_a -w randrw -o 4k -q 8 -t 3 --size 4M --verify --json --quiet \
    > perf.json 2> perf.err || exit 10
$PY -m blocktarget perf -a 127.0.0.1 -s $SECURE -n $NQN --hostnqn $HOST_A --tls \
    --tls-key psk_a -w read -o 128k -q 4 -t 2 --size 8M --verify --json --quiet \
    > perf128.json 2>> perf.err || exit 11
# 2. the kernel host (tlshd, kTLS) against the target's kernel TLS: kTLS on both ends
L=$TLSHD/usr/lib/x86_64-linux-gnu
printf '[authenticate]\nkeyrings=.nvme\n' > tlshd.conf
$L/ld-linux-x86-64.so.2 --library-path $L $TLSHD/usr/sbin/tlshd -s -c tlshd.conf > tlshd.log 2>&1 &
sleep 1
/usr/bin/python3 -c '
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
ring = [int(l.split()[0], 16) for l in open("/proc/keys") if " .nvme: " in l][0]
key = bytes.fromhex(os.environ["KEY_A"])
assert libc.syscall(248, b"psk", os.environ["ID_A"].encode(), key, len(key), ring) > 0
' || exit 12
echo -n "nqn=$NQN,transport=tcp,traddr=127.0.0.1,trsvcid=$SECURE,hostnqn=$HOST_A,hostid=${HOST_A##*uuid:},nr_io_queues=2,tls" \
  > /dev/nvme-fabrics || exit 13
dev=$(nsdev $NQN 1) || exit 14
fio --name=k1 --filename=$dev --rw=randwrite --bs=4k --size=4M --offset=16M --ioengine=libaio \
    --direct=1 --iodepth=8 --verify=crc32c --verify_fatal=1 --output=fio1.txt || exit 15
fio --name=k2 --filename=$dev --rw=write --bs=128k --size=8M --offset=24M --ioengine=libaio \
    --direct=1 --iodepth=4 --verify=crc32c --verify_fatal=1 --output=fio2.txt || exit 16
nvme disconnect -n $NQN || exit 17
$PY -m blocktarget rpc -s $SOCK nvmf_get_transports > transports.json || exit 18
$PY -m blocktarget rpc -s $SOCK nvmf_get_stats > stats.json || exit 19
kill %1
wait %1
echo DONE
"""


def test_target_kernel_tls_in_guest(vm: Guest, tlshd: Path) -> None:
    """The target's record layer in kernel TLS: a guest kernel has it (this host's has
    not), so the target runs in the guest, with our initiator (user-space TLS) and the
    kernel host (tlshd + kTLS) as its peers."""
    import json
    import sys

    from .harness.vm import PROJECT_ROOT

    psk = ConfiguredPsk.generate(1)
    ida = identity_for(psk, HOST_A, NQN)
    secure = 4433
    cfg = {"blocktarget": {"cores": [0], "metrics": False}, "subsystems": [
        {"subsystem": "keyring", "config": [
            {"method": "keyring_file_add_key", "params": {"name": "psk_a", "path": "RUNDIR/psk_a"}}]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "M0", "num_blocks": 16384, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": False}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
            {"method": "nvmf_subsystem_add_host",
             "params": {"nqn": NQN, "host": HOST_A, "psk": "psk_a"}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "secure_channel": True, "listen_address": {
                 "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": str(secure)}}}]}]}
    # the key file's path is the run dir's, known only in the guest: patched there
    script = KTLS_SCRIPT.replace("chmod 600 psk_a",
                                 "sed -i \"s|RUNDIR|$RUNDIR|\" cfg.json; chmod 600 psk_a")
    env = {"PY": sys.executable, "PYTHONPATH": str(PROJECT_ROOT), "NQN": NQN,
           "HOST_A": HOST_A, "SECURE": str(secure), "TLSHD": str(tlshd), "ID_A": str(ida),
           "KEY_A": tls_psk(psk, ida).hex()}
    res = vm.run(PRELUDE + script, env=env, timeout=400, memory_mb=1536,
                 files={"cfg.json": json.dumps(cfg), "psk_a": psk.encode() + "\n"})
    rd = res.rundir
    log = (rd / "target.log").read_text() if (rd / "target.log").exists() else ""
    assert res.rc == 0, (res.output[-4000:], log[-3000:])
    assert "tls" in (rd / "ulp.txt").read_text().split()
    for f in ("perf.json", "perf128.json"):
        doc = json.loads((rd / f).read_text())
        assert doc["verify_failures"] == 0 and doc["verified_reads"] > 0, doc
        assert doc["total"]["errors"] == 0
    for f in ("fio1.txt", "fio2.txt"):
        assert "err= 0" in (rd / f).read_text()
    layers = [ln for ln in log.splitlines() if "TLS from" in ln]
    assert layers and all("record layer kernel" in ln for ln in layers), layers
    counts = json.loads((rd / "transports.json").read_text())[0]["tls"]
    assert counts["record_layer"] == "kernel"
    c = counts["connections"]
    assert c.get("record_layer_kernel", 0) == c.get("established", -1) >= 2 + 2 + 3, c
    # on kTLS the connections are plain sockets again: the C lane and the C poller serve
    # them (nvmf_get_stats: commands the lane ran, PDUs the poller took)
    stats = json.loads((rd / "stats.json").read_text())

    def total(node: object, key: str) -> int:
        if isinstance(node, dict):
            return sum(v if k == key and isinstance(v, int) else total(v, key)
                       for k, v in node.items())
        if isinstance(node, list):
            return sum(total(v, key) for v in node)
        return 0

    assert total(stats, "c_lane_commands") > 0 and total(stats, "net_pdus") > 0, stats
    assert psk.encode().split(":")[2][:16] not in log and env["KEY_A"] not in log


NVMET_SCRIPT = r"""
set -x
for m in tls gcm ghash-generic ghash-clmulni-intel aesni-intel; do
  modprobe -d $VMDIR/kernel $m 2>/dev/null || echo "no module $m"; done
L=$TLSHD/usr/lib/x86_64-linux-gnu
printf '[authenticate]\nkeyrings=.nvme\n' > tlshd.conf
$L/ld-linux-x86-64.so.2 --library-path $L $TLSHD/usr/sbin/tlshd -s -c tlshd.conf > tlshd.log 2>&1 &
sleep 1
/usr/bin/python3 -c '
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
ring = [int(l.split()[0], 16) for l in open("/proc/keys") if " .nvme: " in l][0]
key = bytes.fromhex(os.environ["KEY_A"])
assert libc.syscall(248, b"psk", os.environ["ID_A"].encode(), key, len(key), ring) > 0
' || exit 10
chmod 600 psk_a
(cd /sys/kernel/config/nvmet
 mkdir subsystems/$NQN && echo 0 > subsystems/$NQN/attr_allow_any_host
 mkdir hosts/$HOST_A && ln -s $PWD/hosts/$HOST_A subsystems/$NQN/allowed_hosts/$HOST_A
 mkdir subsystems/$NQN/namespaces/1 && echo -n /dev/ram0 > subsystems/$NQN/namespaces/1/device_path
 echo 1 > subsystems/$NQN/namespaces/1/enable
 mkdir ports/1 && echo tcp > ports/1/addr_trtype && echo ipv4 > ports/1/addr_adrfam
 echo 127.0.0.1 > ports/1/addr_traddr && echo 4420 > ports/1/addr_trsvcid
 echo tls1.3 > ports/1/addr_tsas
 ln -s $PWD/subsystems/$NQN ports/1/subsystems/$NQN) || exit 11
$PY -m blocktarget perf -a 127.0.0.1 -s 4420 -n $NQN --hostnqn $HOST_A --tls --tls-key psk_a \
    -w randrw -o 4k -q 8 -t 3 --size 4M --verify --json --quiet > perf.json 2> perf.err || exit 12
$PY -m blocktarget perf -a 127.0.0.1 -s 4420 -n $NQN --hostnqn $HOST_A --tls --tls-key psk_a \
    -w read -o 128k -q 4 -t 2 --size 8M --verify --json --quiet > perf128.json 2>> perf.err || exit 13
if $PY -m blocktarget connect -a 127.0.0.1 -s 4420 -n $NQN -q $HOST_A --timeout 10 \
    > plain.txt 2>&1; then exit 14; fi
if $PY -m blocktarget connect -a 127.0.0.1 -s 4420 -n $NQN -q $HOST_A --timeout 10 --tls \
    --tls-key "$WRONG" > wrong.txt 2>&1; then exit 15; fi
echo DONE
"""


def test_initiator_tls_against_kernel_target(vm: Guest, tlshd: Path) -> None:
    """The other direction (issue 17 item 3): our initiator's TLS against the Linux
    target (nvmet, addr_tsas tls1.3, tlshd as the server, kTLS) in the guest, with the
    key the guest's keyring holds under the identity our initiator offers."""
    import json
    import sys

    from .harness.vm import PROJECT_ROOT

    psk = ConfiguredPsk.generate(1)
    ida = identity_for(psk, HOST_A, NQN)
    env = {"PY": sys.executable, "PYTHONPATH": str(PROJECT_ROOT), "NQN": NQN,
           "HOST_A": HOST_A, "TLSHD": str(tlshd), "ID_A": str(ida),
           "KEY_A": tls_psk(psk, ida).hex(), "WRONG": ConfiguredPsk.generate(1).encode()}
    res = vm.run(PRELUDE + NVMET_SCRIPT, env=env, timeout=300,
                 files={"psk_a": psk.encode() + "\n"})
    rd = res.rundir
    tlshd_log = (rd / "tlshd.log").read_text() if (rd / "tlshd.log").exists() else ""
    assert res.rc == 0, (res.output[-4000:], tlshd_log[-2000:])
    for f in ("perf.json", "perf128.json"):
        doc = json.loads((rd / f).read_text())
        assert doc["verify_failures"] == 0 and doc["verified_reads"] > 0, doc
        assert doc["total"]["errors"] == 0
    assert tlshd_log.count("was successful") >= 4, tlshd_log[-2000:]  # 2 runs x 2 queues
    assert "failed" in tlshd_log  # the plain and the wrong-key attempts
