"""DH-HMAC-CHAP interop: the Linux 6.12 kernel host (nvme-cli 2.3, in QEMU) against
blocktarget on this host.

Keys come from the real tool (`nvme gen-dhchap-key`), live in 0600 files named in the
target's keyring, and reach the host as `nvme connect --dhchap-secret/--dhchap-ctrl-secret`.
One boot covers, in order:

1. bidirectional authentication, SHA-256 + ffdhe2048 forced by `nvmf_set_config`
   (the kernel offers every hash and group; the target picks from its allowed set), on
   the admin queue and both I/O queues, then fio verify;
2. re-authentication: the target's keys for the host are rotated by RPC, the guest writes
   the new secret to /sys/class/nvme/nvmeX/dhchap_secret, the kernel re-authenticates
   every queue, and I/O after it verifies;
3. SHA-512 + ffdhe4096 unidirectional for a second host (groups changed by RPC);
   then every group allowed again: the target picks ffdhe8192, the strongest the kernel
   offers, whose exponentiations run in the target's DH worker processes (issue 18);
4. a wrong secret and a missing secret refused: connect fails, no namespace appears.

The target's log proves which hash/group each queue negotiated (one line per queue), and
must not contain any secret. Budget: one boot, ~60-100 s under TCG (the guest's ffdhe8192
alone takes ~20 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.target_proc import RunningTarget, free_port, listen_address

from .harness.vm import Guest
from .test_kernel_host import PRELUDE, serve

NQN = "nqn.2026-01.io.blocktarget:auth"
HOST_BI = "nqn.2014-08.org.nvmexpress:uuid:a0a0a0a0-0000-4000-8000-00000000b001"
HOSTID_BI = "a0a0a0a0-0000-4000-8000-00000000b001"
HOST_UNI = "nqn.2014-08.org.nvmexpress:uuid:a0a0a0a0-0000-4000-8000-00000000b002"
HOSTID_UNI = "a0a0a0a0-0000-4000-8000-00000000b002"


def _nvme_cli() -> str:
    path = shutil.which("nvme") or "/usr/sbin/nvme"
    if not os.path.exists(path):
        if os.environ.get("CI") == "true":
            pytest.fail("nvme-cli is missing on the host (the guest runs the host's binary)")
        pytest.skip("nvme-cli not installed")
    return path


def _gen_key(nvme: str, hmac_id: int, nqn: str) -> str:
    r = subprocess.run([nvme, "gen-dhchap-key", f"--hmac={hmac_id}", f"--nqn={nqn}"],
                       capture_output=True, text=True, timeout=10, check=True)
    key = r.stdout.strip()
    assert key.startswith(f"DHHC-1:{hmac_id:02d}:"), key
    return key


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    nvme = _nvme_cli()
    return {"key1": _gen_key(nvme, 1, HOST_BI), "ckey": _gen_key(nvme, 1, NQN),
            "key2": _gen_key(nvme, 1, HOST_BI), "ckey2": _gen_key(nvme, 0, NQN),
            "keyu": _gen_key(nvme, 3, HOST_UNI)}


def _config(port: int, keydir: Path, keys: dict[str, str]) -> dict:
    keyring = []
    for name, text in keys.items():
        path = keydir / f"{name}.key"
        path.write_text(text + "\n")
        path.chmod(0o600)
        keyring.append({"method": "keyring_file_add_key",
                        "params": {"name": name, "path": str(path)}})
    la = listen_address(port)
    return {"subsystems": [
        {"subsystem": "keyring", "config": keyring},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "M0", "num_blocks": 65536, "block_size": 512}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_set_config", "params": {"dhchap_digests": ["sha256"],
                                                     "dhchap_dhgroups": ["ffdhe2048"]}},
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": NQN, "allow_any_host": False, "serial_number": "BTAUTH01"}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "M0"}}},
            {"method": "nvmf_subsystem_add_host",
             "params": {"nqn": NQN, "host": HOST_BI, "dhchap_key": "key1",
                        "dhchap_ctrlr_key": "ckey"}},
            {"method": "nvmf_subsystem_add_host",
             "params": {"nqn": NQN, "host": HOST_UNI, "dhchap_key": "keyu"}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": la}},
        ]},
    ]}


@pytest.fixture
def target(tmp_path: Path, keys: dict[str, str]) -> Iterator[RunningTarget]:
    port = free_port()
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)
    yield from serve(tmp_path, _config(port, keydir, keys), nvme_port=port)


SCRIPT = r"""
set -x
conn() { nvme connect -t tcp -a $HOST_ADDR -s $PORT -n $NQN "$@"; }
has_ctrl() { for c in /sys/class/nvme/nvme*; do
  [ -e $c/subsysnqn ] && [ "$(cat $c/subsysnqn)" = "$NQN" ] && return 0; done; return 1; }
# 1. bidirectional, all queues authenticated, I/O verified
conn --hostnqn=$HOST_BI --hostid=$HOSTID_BI --nr-io-queues=2 \
     --dhchap-secret="$KEY1" --dhchap-ctrl-secret="$CKEY" > conn1.txt 2>&1 || exit 10
dev=$(nsdev $NQN 1) || exit 11
ctrl=$(basename $(ctrldev $NQN)) || exit 12
cat /sys/class/nvme/$ctrl/queue_count > queue_count.txt 2>/dev/null || true
fio --name=a1 --filename=$dev --rw=randwrite --bs=4k --size=4M --ioengine=libaio --direct=1 \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --output=fio1.txt || exit 13
# 2. re-authentication with rotated keys, one key at a time (each write to sysfs makes
#    the kernel re-authenticate every queue at once): target first, then the host
setkeys() { rpc '{"jsonrpc":"2.0","id":1,"method":"nvmf_subsystem_set_keys","params":{"nqn":"'$NQN'","host":"'$HOST_BI'","dhchap_key":"'$1'","dhchap_ctrlr_key":"'$2'"}}'; }
setkeys key2 ckey > rot1.txt || exit 14
grep -q '"result": *true' rot1.txt || exit 15
echo -n "$KEY2" > /sys/class/nvme/$ctrl/dhchap_secret || exit 16
sleep 3
setkeys key2 ckey2 > rot2.txt || exit 17
grep -q '"result": *true' rot2.txt || exit 17
echo -n "$CKEY2" > /sys/class/nvme/$ctrl/dhchap_ctrl_secret || exit 17
sleep 3
dd if=/dev/urandom of=/tmp/blob bs=64k count=64 status=none
dd if=/tmp/blob of=$dev bs=64k oflag=direct status=none || exit 18
dd if=$dev of=/tmp/back bs=64k count=64 iflag=direct status=none || exit 19
cmp /tmp/blob /tmp/back || exit 20
fio --name=a2 --filename=$dev --rw=randrw --bs=4k --offset=8M --size=4M --ioengine=libaio --direct=1 \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --output=fio2.txt || exit 21
nvme disconnect -n $NQN > disc1.txt || exit 22
sleep 0.5
# 3. another host, unidirectional, SHA-512 + ffdhe4096 (allowed set changed by RPC)
rpc '{"jsonrpc":"2.0","id":2,"method":"nvmf_set_config","params":{"dhchap_digests":["sha512"],"dhchap_dhgroups":["ffdhe4096"]}}' || exit 23
conn --hostnqn=$HOST_UNI --hostid=$HOSTID_UNI --nr-io-queues=1 --dhchap-secret="$KEYU" \
     > conn3.txt 2>&1 || exit 24
dev=$(nsdev $NQN 1) || exit 25
dd if=$dev of=/tmp/back2 bs=64k count=64 iflag=direct status=none || exit 26
cmp /tmp/blob /tmp/back2 || exit 27
nvme disconnect -n $NQN || exit 28
sleep 0.5
rpc '{"jsonrpc":"2.0","id":3,"method":"nvmf_set_config","params":{"dhchap_digests":["sha256","sha384","sha512"],"dhchap_dhgroups":["null","ffdhe2048","ffdhe3072","ffdhe4096","ffdhe6144","ffdhe8192"]}}' || exit 33
# (the target allows KATO for authenticating, and the guest kernel's own ffdhe8192
#  takes ~9 s per exponentiation under TCG on a loaded machine: 60 s, not 5)
conn --hostnqn=$HOST_UNI --hostid=$HOSTID_UNI --nr-io-queues=2 --dhchap-secret="$KEYU" \
     --keep-alive-tmo=60 > conn3b.txt 2>&1 || exit 34
dev=$(nsdev $NQN 1) || exit 35
dd if=$dev of=/tmp/back3 bs=64k count=64 iflag=direct status=none || exit 36
cmp /tmp/blob /tmp/back3 || exit 36
nvme disconnect -n $NQN || exit 37
sleep 0.5
# 4. refused: a wrong secret, the old (rotated) secret, no secret at all
if conn --hostnqn=$HOST_BI --hostid=$HOSTID_BI --dhchap-secret="$WRONG" > wrong.txt 2>&1; then exit 29; fi
if conn --hostnqn=$HOST_BI --hostid=$HOSTID_BI --dhchap-secret="$KEY1" > old.txt 2>&1; then exit 30; fi
if conn --hostnqn=$HOST_UNI --hostid=$HOSTID_UNI > nokey.txt 2>&1; then exit 31; fi
sleep 1
has_ctrl && exit 32
ls /dev/nvme*n* > devs.txt 2>&1 || true
dmesg > dmesg.txt
echo DONE
"""


def test_kernel_dhchap(vm: Guest, target: RunningTarget, keys: dict[str, str]) -> None:
    env = {"RPC_PORT": str(target.http_port), "PORT": str(target.nvme_port),  # type: ignore[attr-defined]
           "NQN": NQN, "HOST_BI": HOST_BI, "HOSTID_BI": HOSTID_BI, "HOST_UNI": HOST_UNI,
           "HOSTID_UNI": HOSTID_UNI, "KEY1": keys["key1"], "CKEY": keys["ckey"],
           "KEY2": keys["key2"], "CKEY2": keys["ckey2"], "KEYU": keys["keyu"],
           "WRONG": _gen_key(_nvme_cli(), 1, HOST_BI)}
    res = vm.run(PRELUDE + SCRIPT, env=env, timeout=300)
    res.check()
    rd = res.rundir
    assert "DONE" in res.output
    for f in ("fio1.txt", "fio2.txt"):
        assert "err= 0" in (rd / f).read_text()
    qc = (rd / "queue_count.txt").read_text().strip()
    if qc:
        assert int(qc) == 3
    log = target.log()
    dmesg = (rd / "dmesg.txt").read_text()
    # 1: admin + 2 I/O queues, each its own transaction, bidirectional, forced choice
    bi = re.findall(r"host " + re.escape(HOST_BI) + r" authenticated \((\w+), (\w+)(, bidirectional)?\)",
                    log)
    assert bi[:3] == [("sha256", "ffdhe2048", ", bidirectional")] * 3, bi
    # 2: the kernel re-authenticated every queue, twice (host key, then controller key),
    # with the rotated keys, and never had to reconnect
    assert len(re.findall(r"host " + re.escape(HOST_BI) + r" re-authenticated", log)) == 6
    assert "Reconnecting" not in dmesg and "error recovery" not in dmesg
    # 3: SHA-512 / ffdhe4096, unidirectional, admin + 1 I/O queue; then all allowed:
    # ffdhe8192 and SHA-512, the strongest, on the admin queue and 2 I/O queues
    uni = re.findall(r"host " + re.escape(HOST_UNI) + r" authenticated \((\w+), (\w+)(, bidirectional)?\)",
                     log)
    assert uni == [("sha512", "ffdhe4096", "")] * 2 + [("sha512", "ffdhe8192", "")] * 3, uni
    # 4: refusals, as the target saw them
    assert "host response does not match" in log
    assert "connect" in (rd / "nokey.txt").read_text().lower()
    assert "authenticated with hash hmac(sha256) dhgroup ffdhe2048" in dmesg
    assert "authenticated with hash hmac(sha512) dhgroup ffdhe4096" in dmesg
    assert "authenticated with hash hmac(sha512) dhgroup ffdhe8192" in dmesg
    assert dmesg.count("authentication failed, error -129") == 2  # wrong and old secret
    for text in keys.values():
        secret = text.split(":")[2]
        assert secret not in log and secret[:16] not in log
