"""What the TLS secure channel costs with the record layer in the kernel and in user space
(issue 17 item 5), in one QEMU guest: this host's kernel has no kTLS, the guest's has.

Two targets run in the guest, each with a plain and a secure listener on its own
subsystem: one with the transport's default ``tls_record_layer: "auto"`` (the record
layer handed to kernel TLS after the handshake), one with ``"user"`` (OpenSSL keeps it in
user space). The client of both is the guest's Linux NVMe/TCP host (nvme-tcp, 2 I/O
queues, TLS handshakes by trixie's tlshd, its own record layer in kTLS) with fio on its
block device, pinned to vCPU 1; the targets' reactors are on vCPU 0. In every round each
target gets a plain and a TLS connection, the order flipping from round to round, so
that both see the same machine. Per fio run: IOPS, the target process's CPU (utime +
stime from /proc, which includes the kernel's kTLS work done in its system calls) and the
guest's whole busy CPU (all vCPUs: fio, the host's nvme-tcp and its kTLS, softirqs), each
per I/O. nvmf_get_transports of each target says which record layer its connections got.

Under TCG the absolute figures say little (every instruction is emulated, AES-NI
included); the ratios TLS/plain per record layer are the result.

    PYTHONPATH=$PWD .venv/bin/python bench/tls_cost_vm.py [--time 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vm.harness.vm import PROJECT_ROOT, Guest, ensure_vm  # noqa: E402

from blocktarget.nvme.tls_keys import ConfiguredPsk, identity_for, tls_psk  # noqa: E402

HARNESS = ROOT / "tests" / "vm" / "harness"
NQN = "nqn.2026-01.io.blocktarget:tlscost-"  # + the record layer
HOST_TLS = "nqn.2014-08.org.nvmexpress:uuid:7c050000-0000-4000-8000-000000000001"
HOST_PLAIN = "nqn.2014-08.org.nvmexpress:uuid:7c050000-0000-4000-8000-000000000002"
LAYERS = {"kernel": ("auto", 4420, 4421), "user": ("user", 4430, 4431)}
WORKLOADS = (("randread", "4k", 32), ("read", "128k", 32))

GUEST = r"""
set -euo pipefail
for m in tls gcm ghash-generic ghash-clmulni-intel aesni-intel af_alg algif_aead; do
  modprobe -d $VMDIR/kernel $m 2>/dev/null || echo "no module $m"; done
grep -qw tls /proc/sys/net/ipv4/tcp_available_ulp || { echo "the guest has no kTLS" >&2; exit 3; }
echo 15 > /sys/module/nvme_core/parameters/admin_timeout
L=$TLSHD/usr/lib/x86_64-linux-gnu
printf '[authenticate]\nkeyrings=.nvme\n' > tlshd.conf
$L/ld-linux-x86-64.so.2 --library-path $L $TLSHD/usr/sbin/tlshd -s -c tlshd.conf > tlshd.log 2>&1 &
sleep 1
$PY insert_keys.py keys.json
chmod 600 psk
. ./ports.sh
BT="$PY -m blocktarget"
cpu() { awk '{print $14 + $15}' /proc/$1/stat; }
sys_busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
declare -A TPID
for layer in $LAYERS; do
  sed "s|@RUNDIR@|$RUNDIR|" cfg-$layer.json.in > cfg-$layer.json
  $BT start -c cfg-$layer.json -r /tmp/bt-$layer.sock --http "" > target-$layer.log 2>&1 &
  TPID[$layer]=$!
done
for layer in $LAYERS; do
  for i in $(seq 1 600); do [ -S /tmp/bt-$layer.sock ] && break; sleep 0.1; done
  [ -S /tmp/bt-$layer.sock ] || { echo "target $layer did not start" >&2; exit 4; }
done
sleep 1
nsdev() {
  for i in $(seq 1 100); do
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
      [ "$(cat $s/subsysnqn 2>/dev/null)" = "$1" ] || continue
      d=$(ls $s | grep -E '^nvme[0-9]+n1$' | head -1 || true)
      [ -n "$d" ] && [ -b /dev/$d ] && { echo /dev/$d; return 0; }
    done
    sleep 0.1
  done
  return 1
}
for round in $(seq 1 $ROUNDS); do
  kinds="plain tls"; [ $((round % 2)) = 0 ] && kinds="tls plain"
  for layer in $LAYERS; do
    nqn=$NQN$layer
    for kind in $kinds; do
      v=P_${layer}_$kind; port=${!v}; host=$HOST_PLAIN; opt=""
      [ $kind = tls ] && { host=$HOST_TLS; opt=",tls"; }
      echo -n "nqn=$nqn,transport=tcp,traddr=127.0.0.1,trsvcid=$port,hostnqn=$host,hostid=${host##*uuid:},nr_io_queues=2$opt" \
        > /dev/nvme-fabrics
      dev=$(nsdev $nqn)
      for wl in $WORKLOADS; do
        IFS=: read rw bs qd <<< "$wl"
        name=$layer-$kind-$rw-$bs-$round
        c0=$(cpu ${TPID[$layer]}); s0=$(sys_busy)
        fio --name=w --filename=$dev --rw=$rw --bs=$bs --direct=1 --ioengine=libaio \
            --iodepth=$qd --time_based --runtime=$T --size=48M --norandommap \
            --randrepeat=0 --cpus_allowed=1 --output-format=json --output=fio-$name.json
        s1=$(sys_busy); c1=$(cpu ${TPID[$layer]})
        echo "{\"layer\": \"$layer\", \"kind\": \"$kind\", \"rw\": \"$rw\", \"bs\": \"$bs\", \"qd\": $qd, \"round\": $round, \"cpu_ticks\": $((c1 - c0)), \"sys_ticks\": $((s1 - s0))}" >> results.jsonl
      done
      nvme disconnect -n $nqn > /dev/null
      sleep 0.5
    done
  done
done
for layer in $LAYERS; do
  $BT rpc -s /tmp/bt-$layer.sock nvmf_get_transports > transports-$layer.json
  kill ${TPID[$layer]}; wait ${TPID[$layer]} || true
done
cat /proc/loadavg > loadavg.txt
$PY calibrate.py > calibrate-guest.json
echo BENCH_DONE
"""

INSERT_KEYS = r'''
"""The TLS PSKs into the guest kernel's .nvme keyring (add_key(2), type "psk", the
identity as description), where the kernel host looks them up for tlshd."""
import ctypes
import json
import sys
libc = ctypes.CDLL(None, use_errno=True)
ring = [int(ln.split()[0], 16) for ln in open("/proc/keys") if " .nvme: " in ln][0]
for ident, hexkey in json.load(open(sys.argv[1])).items():
    key = bytes.fromhex(hexkey)
    if libc.syscall(248, b"psk", ident.encode(), key, len(key), ring) <= 0:
        raise SystemExit(f"add_key: errno {ctypes.get_errno()}")
'''

# How fast the guest runs AES-GCM, in OpenSSL (the user-space record layer; AES-NI and
# PCLMUL emulated by TCG) and in the kernel's crypto API (gcm(aes) through AF_ALG: the
# implementation kTLS uses), and ordinary interpreted code, against this host: under TCG
# crypto is slowed far more than the rest, so the TLS/plain ratios overweight it, and the
# extra CPU per I/O is compared with what encrypting the payload alone costs.
CALIBRATE = r'''
import json
import socket
import subprocess
import time
out = subprocess.run(["openssl", "speed", "-seconds", "2", "-bytes", "16384", "-evp",
                      "aes-128-gcm"], capture_output=True, text=True).stdout
aes_kb_s = float(out.strip().splitlines()[-1].split()[-1].rstrip("k"))
kernel = None
try:
    alg = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    alg.bind(("aead", "gcm(aes)"))
    alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, bytes(16))
    alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, 16)
    op, _ = alg.accept()
    block, done, t0 = bytes(13 + 16384), 0, time.perf_counter()
    while time.perf_counter() - t0 < 2:
        op.sendmsg_afalg([block], op=socket.ALG_OP_ENCRYPT, iv=bytes(12), assoclen=13)
        op.recv(len(block) + 16)
        done += 16384
    kernel = done / (time.perf_counter() - t0) / 1e6
except OSError:
    pass
t0 = time.perf_counter()
sum(i * i for i in range(2_000_000))
print(json.dumps({"aes_128_gcm_mb_s": aes_kb_s / 1000, "kernel_gcm_aes_mb_s": kernel,
                  "python_loop_s": time.perf_counter() - t0}))
'''


def _config(layer: str) -> dict[str, Any]:
    mode, plain, secure = LAYERS[layer]
    nqn = NQN + layer
    listen = [{"method": "nvmf_subsystem_add_listener", "params": {
        "nqn": nqn, "secure_channel": sec, "listen_address": {
            "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}}}
        for port, sec in ((plain, False), (secure, True))]
    return {"blocktarget": {"cores": [0], "metrics": False},
            "subsystems": [
                {"subsystem": "keyring", "config": [
                    {"method": "keyring_file_add_key",
                     "params": {"name": "psk0", "path": "@RUNDIR@/psk"}}]},
                {"subsystem": "bdev", "config": [
                    {"method": "bdev_malloc_create",
                     "params": {"name": "M0", "num_blocks": 16384, "block_size": 4096}}]},
                {"subsystem": "nvmf", "config": [
                    {"method": "nvmf_create_transport",
                     "params": {"trtype": "TCP", "tls_record_layer": mode}},
                    {"method": "nvmf_create_subsystem",
                     "params": {"nqn": nqn, "allow_any_host": False}},
                    {"method": "nvmf_subsystem_add_ns",
                     "params": {"nqn": nqn, "namespace": {"bdev_name": "M0"}}},
                    {"method": "nvmf_subsystem_add_host",
                     "params": {"nqn": nqn, "host": HOST_TLS, "psk": "psk0"}},
                    {"method": "nvmf_subsystem_add_host",
                     "params": {"nqn": nqn, "host": HOST_PLAIN}},
                    *listen]}]}


def _tlshd(vmdir: Path) -> Path:
    r = subprocess.run([str(HARNESS / "tlshd.sh")], capture_output=True, text=True,
                       timeout=600, env={"VMDIR": str(vmdir),
                                         "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    if r.returncode != 0:
        raise SystemExit(f"cannot fetch tlshd: {r.stderr[-2000:]}")
    return Path(r.stdout.strip())


def run(seconds: float, rounds: int) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    vmdir = ensure_vm()
    tlshd = _tlshd(vmdir)
    psk = ConfiguredPsk.generate(1)
    keys = {}
    for layer in LAYERS:
        ident = identity_for(psk, HOST_TLS, NQN + layer)
        keys[str(ident)] = tls_psk(psk, ident).hex()
    ports = "".join(f"P_{layer}_plain={p}\nP_{layer}_tls={s}\n"
                    for layer, (_, p, s) in LAYERS.items())
    files: dict[str, str] = {"bench.sh": GUEST, "insert_keys.py": INSERT_KEYS,
                             "calibrate.py": CALIBRATE,
                             "keys.json": json.dumps(keys), "psk": psk.encode() + "\n",
                             "ports.sh": ports}
    files.update({f"cfg-{layer}.json.in": json.dumps(_config(layer)) for layer in LAYERS})
    guest = Guest(vmdir, memory_mb=1536)
    res = guest.run(
        "bash ./bench.sh", timeout=600 + rounds * 8 * 2 * (seconds + 15), files=files,
        env={"PY": sys.executable, "T": str(seconds), "ROUNDS": str(rounds), "NQN": NQN,
             "LAYERS": " ".join(LAYERS), "TLSHD": str(tlshd),
             "HOST_TLS": HOST_TLS, "HOST_PLAIN": HOST_PLAIN,
             "WORKLOADS": " ".join(f"{rw}:{bs}:{qd}" for rw, bs, qd in WORKLOADS),
             "PYTHONPATH": os.environ.get("PYTHONPATH", str(PROJECT_ROOT))})
    if res.rc != 0 or "BENCH_DONE" not in res.output:
        sys.stderr.write(res.output[-4000:])
        raise SystemExit(f"guest run failed (rc={res.rc}), see {res.rundir}")
    rd = res.rundir
    hz = os.sysconf("SC_CLK_TCK")  # (the guest's USER_HZ is the same: 100)
    rows = []
    for line in (rd / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        name = f"fio-{r['layer']}-{r['kind']}-{r['rw']}-{r['bs']}-{r['round']}.json"
        job = json.loads((rd / name).read_text())["jobs"][0]["read"]
        ios = job["total_ios"]
        r.update(iops=job["iops"], mib_s=job["bw_bytes"] / (1 << 20), ios=ios,
                 tgt_us=r["cpu_ticks"] / hz / ios * 1e6 if ios else 0.0,
                 sys_us=r["sys_ticks"] / hz / ios * 1e6 if ios else 0.0)
        rows.append(r)
    tls = {layer: json.loads((rd / f"transports-{layer}.json").read_text())[0]["tls"]
           for layer in LAYERS}
    for layer, t in tls.items():  # each target's connections got the layer it names
        c = t["connections"]
        if c.get(f"record_layer_{layer}", 0) != c.get("established", -1) or not c.get(
                "established"):
            raise SystemExit(f"target {layer}: connections {c} (see {rd})")
    here = subprocess.run([sys.executable, "-c", CALIBRATE], capture_output=True, text=True,
                          check=True).stdout
    info = {"tls": tls, "loadavg": (rd / "loadavg.txt").read_text().strip(),
            "calibrate": {"guest": json.loads((rd / "calibrate-guest.json").read_text()),
                          "host": json.loads(here)}}
    return rows, info, rd


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _aes_us(bs: str, mb_s: float | None) -> str:
    """What encrypting one I/O's data costs at the measured speed (the target encrypts
    what it sends: the read data; the PDU headers add little)."""
    if not mb_s:
        return "?"
    return f"{int(bs.rstrip('k')) * 1024 / mb_s:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=float, default=5, help="seconds per fio run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="every run, as JSON")
    args = ap.parse_args()
    host_load = os.getloadavg()
    rows, info, rd = run(args.time, args.rounds)
    if args.json:
        print(json.dumps({"runs": rows, **info}, indent=1))
        return 0
    print(f"{args.rounds} rounds x {args.time:g} s per run, medians; guest run dir {rd}; "
          f"host load average before {host_load[0]:.2f}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; guest /proc/loadavg at the "
          f"end {info['loadavg']}")
    for layer, t in info["tls"].items():
        print(f"- target {layer}: nvmf_get_transports tls.record_layer "
              f"{t['record_layer']!r}, connections {t['connections']}")
    g, h = info["calibrate"]["guest"], info["calibrate"]["host"]
    aes = h["aes_128_gcm_mb_s"] / g["aes_128_gcm_mb_s"]
    loop = g["python_loop_s"] / h["python_loop_s"]
    print(f"- TCG slowdown, guest against this host: AES-128-GCM (openssl speed, 16 KiB) "
          f"{aes:.0f}x ({h['aes_128_gcm_mb_s']:,.0f} -> {g['aes_128_gcm_mb_s']:,.0f} MB/s), "
          f"a Python loop {loop:.0f}x: crypto weighs {aes / loop:.1f}x more in the guest")
    if g.get("kernel_gcm_aes_mb_s"):
        print(f"- the guest kernel's gcm(aes) (AF_ALG, 16 KiB): "
              f"{g['kernel_gcm_aes_mb_s']:,.1f} MB/s")
    print()
    print("| workload | record layer | plain IOPS | TLS IOPS | TLS/plain | "
          "target µs/IO plain | TLS | TLS−plain | AES-GCM of the data alone µs | "
          "guest µs/IO plain | TLS | TLS/plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    speed = {"user": g["aes_128_gcm_mb_s"], "kernel": g.get("kernel_gcm_aes_mb_s")}
    for rw, bs, qd in WORKLOADS:
        for layer in LAYERS:
            m = {kind: {f: _median([r[f] for r in rows if r["layer"] == layer
                                    and r["kind"] == kind and r["rw"] == rw])
                        for f in ("iops", "tgt_us", "sys_us")} for kind in ("plain", "tls")}
            p, t = m["plain"], m["tls"]
            runs = {kind: ", ".join(f"{r['iops']:,.0f}" for r in rows if r["layer"] == layer
                                    and r["kind"] == kind and r["rw"] == rw)
                    for kind in ("plain", "tls")}
            print(f"| {bs} {rw} QD{qd} | {layer} | {p['iops']:,.0f} ({runs['plain']}) | "
                  f"{t['iops']:,.0f} ({runs['tls']}) | {t['iops'] / p['iops']:.2f} | "
                  f"{p['tgt_us']:.0f} | {t['tgt_us']:.0f} | {t['tgt_us'] - p['tgt_us']:+.0f} | "
                  f"{_aes_us(bs, speed[layer])} | "
                  f"{p['sys_us']:.0f} | {t['sys_us']:.0f} | {t['sys_us'] / p['sys_us']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
