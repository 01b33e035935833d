#!/usr/bin/env python3
"""Live-socket fuzzer: hostile NVMe/TCP streams at a real target while a good host works.

    python tests/fuzz/live_fuzz.py [--streams 10000] [--concurrency 24] [--seed N]
                                   [--results bench/RESULTS.md]

It starts a real `blocktarget start` process (tests/integration/target_proc.py) with a
malloc namespace, then, at the same time:

* a well-behaved initiator (blocktarget.host, in its own process so the fuzzer's CPU use
  cannot starve its keep-alives) writes random data at random LBAs and reads it back,
  counting every failed command, transport error and data mismatch;
* `--concurrency` workers open short connections to 127.0.0.1 and send one stream each:
  mutations of valid ICReq / Connect / Property / Identify / capsule / H2CData streams
  (bit flips, interesting values in header fields, truncation, insertion, splicing, a
  huge PLEN), random garbage, oversized PDUs (a capsule or H2CData near or past the
  decoder's limit, really sent), delivered at once, in small pieces, or as slowloris
  halves with a pause in between. After its stream the worker half-closes (FIN); the
  target must then close the connection.

Figures: streams tried; target crashes (the process exited); hangs (after the stream
ended the target neither answered - when the stream began with an intact ICReq, an
ICResp or TermReq is owed - nor closed within --hang-timeout seconds of our FIN);
unhandled exceptions in the target's log; the good host's operations and errors.
Everything but the number of streams must be zero.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from blocktarget.nvme import pdu, spec  # noqa: E402
from blocktarget.nvme.structs import (  # noqa: E402
    build_connect_data,
    build_connect_sqe,
    build_property_get_sqe,
    build_property_set_sqe,
    build_sqe,
)

NQN = "nqn.2026-01.io.blocktarget.test:livefuzz"
FUZZ_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100"
FUZZ_HOSTID = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100").bytes
PSDT = spec.Psdt.SGL_MPTR_CONTIG << spec.PSDT_SHIFT
BLOCK = 512
NUM_BLOCKS = 131072  # 64 MiB
GOOD_BLOCKS = 65536  # the good host writes only the first half; fuzz writes land anywhere
MAX_PDU = 131072 + 64 * 1024  # the target's decoder limit with default transport options


# ------------------------------------------------------------------ valid streams

def enc(*pdus: Any, hd: bool = False, dd: bool = False) -> bytes:
    out = b""
    for p in pdus:
        plain = type(p) in (pdu.ICReq, pdu.TermReq)
        out += b"".join(bytes(x) for x in pdu.encode(p, hdgst=hd and not plain,
                                                      ddgst=dd and not plain))
    return out


def base_streams() -> list[bytes]:
    """Valid streams a host could send from the first byte, to mutate."""
    out = []
    cc = spec.CC_EN | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT) | (
        spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT)
    for hd, dd in ((False, False), (True, True), (False, True)):
        dg = (pdu.DGST_HEADER if hd else 0) | (pdu.DGST_DATA if dd else 0)
        ic = pdu.ICReq(pfv=0, hpda=0, dgst=dg, maxr2t=0)
        kw = {"hd": hd, "dd": dd}
        admin = pdu.CapsuleCmd(build_connect_sqe(1, 0, 31, 0),
                               build_connect_data(FUZZ_HOSTID, 0xFFFF, NQN, FUZZ_HOSTNQN))
        disc = pdu.CapsuleCmd(build_connect_sqe(1, 0, 31, 0),
                              build_connect_data(FUZZ_HOSTID, 0xFFFF, spec.DISCOVERY_NQN,
                                                 FUZZ_HOSTNQN))
        r2t_connect = pdu.CapsuleCmd(build_sqe(spec.FABRICS_OPCODE, 1, spec.FabricsType.CONNECT,
                                               flags=PSDT, sgl_len=1024,
                                               sgl_id=spec.SGL_ID_TRANSPORT, cdw10=0,
                                               cdw11=31))
        r2t_connect_data = pdu.H2CData(cccid=1, ttag=0, datao=0, last=True,
                                       data=build_connect_data(FUZZ_HOSTID, 0xFFFF, NQN,
                                                               FUZZ_HOSTNQN))
        enable = pdu.CapsuleCmd(build_property_set_sqe(2, spec.Property.CC, cc))
        csts = pdu.CapsuleCmd(build_property_get_sqe(3, spec.Property.CSTS))
        ident = pdu.CapsuleCmd(build_sqe(spec.AdminOpcode.IDENTIFY, 4, 0, flags=PSDT,
                                         sgl_len=4096, sgl_id=spec.SGL_ID_TRANSPORT,
                                         cdw10=spec.Cns.CTRL))
        ident_ns = pdu.CapsuleCmd(build_sqe(spec.AdminOpcode.IDENTIFY, 5, 1, flags=PSDT,
                                            sgl_len=4096, sgl_id=spec.SGL_ID_TRANSPORT,
                                            cdw10=spec.Cns.NS))
        log = pdu.CapsuleCmd(build_sqe(spec.AdminOpcode.GET_LOG_PAGE, 6, spec.NSID_ALL,
                                       flags=PSDT, sgl_len=512, sgl_id=spec.SGL_ID_TRANSPORT,
                                       cdw10=spec.LogPage.SMART | (127 << 16)))
        dlog = pdu.CapsuleCmd(build_sqe(spec.AdminOpcode.GET_LOG_PAGE, 6, 0, flags=PSDT,
                                        sgl_len=4096, sgl_id=spec.SGL_ID_TRANSPORT,
                                        cdw10=spec.LogPage.DISCOVERY | (1023 << 16)))
        feat = pdu.CapsuleCmd(build_sqe(spec.AdminOpcode.SET_FEATURES, 7, 0, flags=PSDT,
                                        cdw10=spec.FeatureId.NUM_QUEUES, cdw11=0x00030003))
        aer = pdu.CapsuleCmd(build_sqe(spec.AdminOpcode.ASYNC_EVENT_REQUEST, 8, 0,
                                       flags=PSDT))
        io_connect = pdu.CapsuleCmd(build_connect_sqe(1, 1, 63, 0),
                                    build_connect_data(FUZZ_HOSTID, 1, NQN, FUZZ_HOSTNQN))
        w_icd = pdu.CapsuleCmd(build_sqe(spec.IoOpcode.WRITE, 9, 1, flags=PSDT, sgl_len=4096,
                                         sgl_id=spec.SGL_ID_INCAPSULE, cdw10=GOOD_BLOCKS,
                                         cdw12=7), os.urandom(4096))
        w_r2t = pdu.CapsuleCmd(build_sqe(spec.IoOpcode.WRITE, 10, 1, flags=PSDT,
                                         sgl_len=16384, sgl_id=spec.SGL_ID_TRANSPORT,
                                         cdw10=GOOD_BLOCKS + 64, cdw12=31))
        h2c = [pdu.H2CData(cccid=10, ttag=0, datao=0, data=os.urandom(8192), last=False),
               pdu.H2CData(cccid=10, ttag=0, datao=8192, data=os.urandom(8192), last=True)]
        read = pdu.CapsuleCmd(build_sqe(spec.IoOpcode.READ, 11, 1, flags=PSDT, sgl_len=8192,
                                        sgl_id=spec.SGL_ID_TRANSPORT, cdw10=GOOD_BLOCKS,
                                        cdw12=15))
        term = pdu.TermReq(c2h=False, fes=pdu.Fes.PDU_SEQUENCE_ERROR)
        out += [
            enc(ic),
            enc(ic, admin, **kw),
            enc(ic, disc, dlog, **kw),
            enc(ic, r2t_connect, r2t_connect_data, **kw),
            enc(ic, admin, enable, csts, ident, ident_ns, log, feat, aer, **kw),
            enc(ic, io_connect, w_icd, w_r2t, *h2c, read, **kw),
            enc(ic, admin, enable, w_r2t, *h2c, **kw),  # I/O on the admin queue
            enc(ic, term),
        ]
    return out


ICREQ = enc(pdu.ICReq())


# ------------------------------------------------------------------ mutations

INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x18,
               0x48, 0x5A, 0x01]


def pdu_offsets(stream: bytes) -> list[int]:
    """Start offsets of the PDUs in a valid stream (walking PLEN)."""
    offs, pos = [], 0
    while pos + 8 <= len(stream):
        offs.append(pos)
        plen = int.from_bytes(stream[pos + 4:pos + 8], "little")
        if plen < 8:
            break
        pos += plen
    return offs


def mutate(rng: random.Random, bases: list[bytes]) -> tuple[str, bytes]:
    base = rng.choice(bases)
    kind = rng.choices(
        ["bitflip", "header", "truncate", "insert", "splice", "huge_plen", "garbage",
         "oversized", "repeat", "valid"],
        weights=[18, 22, 10, 8, 8, 8, 8, 6, 6, 6])[0]
    b = bytearray(base)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "header":
        # interesting values in the header fields of one PDU (type, flags, hlen, pdo,
        # plen, and the first bytes of the type-specific header / SQE)
        offs = pdu_offsets(base)
        start = rng.choice(offs)
        for _ in range(rng.randint(1, 4)):
            i = start + rng.randrange(min(72, len(b) - start))
            if rng.random() < 0.7:
                b[i] = rng.choice(INTERESTING)
            else:
                w = rng.choice([2, 4])
                val = rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x10000,
                                  rng.getrandbits(32)])
                b[i:i + w] = val.to_bytes(4, "little")[:w]
    elif kind == "truncate":
        b = b[:rng.randrange(1, len(b))]
    elif kind == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    elif kind == "splice":
        other = rng.choice(bases)
        b = b[:rng.randrange(len(b))] + other[rng.randrange(len(other)):]
    elif kind == "huge_plen":
        offs = pdu_offsets(base)
        start = rng.choice(offs)
        val = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, MAX_PDU + 1, MAX_PDU, 1 << 20,
                          rng.getrandbits(32)])
        b[start + 4:start + 8] = val.to_bytes(4, "little")
    elif kind == "garbage":
        b = bytearray(rng.randbytes(rng.randint(1, 4096)))
        if rng.random() < 0.5:
            b[0:0] = ICREQ  # garbage after a valid connection init
    elif kind == "oversized":
        b = bytearray(oversized(rng))
    elif kind == "repeat":
        offs = pdu_offsets(base)
        if len(offs) > 1:
            s = rng.choice(offs[1:])
            chunk = base[s:]
            b = bytearray(base) + chunk * rng.randint(1, 20)
    return kind, bytes(b)


def oversized(rng: random.Random) -> bytes:
    """A PDU at or past the decoder's limit, with the bytes really sent."""
    ic = ICREQ
    which = rng.randrange(3)
    if which == 0:  # a capsule with far more in-capsule data than advertised
        n = rng.choice([MAX_PDU - 72, MAX_PDU - 72 + 4, 1 << 17, 9000])
        sqe = build_sqe(spec.IoOpcode.WRITE, 1, 1, flags=PSDT, sgl_len=n,
                        sgl_id=spec.SGL_ID_INCAPSULE)
        return ic + enc(pdu.CapsuleCmd(sqe, bytes(n)))
    if which == 1:  # an H2CData larger than MAXH2CDATA, for no R2T
        n = rng.choice([131072 + 4, MAX_PDU - 24, 65536])
        return ic + enc(pdu.H2CData(cccid=1, ttag=0, datao=0, data=bytes(n), last=True))
    # a header promising a big PDU, then that many bytes of noise
    hdr = bytearray(enc(pdu.CapsuleCmd(bytes(64), b"x")))[:72]
    plen = rng.choice([MAX_PDU, MAX_PDU - 8, 1 << 20])
    hdr[4:8] = plen.to_bytes(4, "little")
    hdr[3] = 72  # pdo
    return ic + bytes(hdr) + rng.randbytes(min(plen, 1 << 20) - 72)


# ------------------------------------------------------------------ one connection

@dataclass
class Figures:
    streams: int = 0
    bytes_sent: int = 0
    crashes: int = 0
    hangs: int = 0
    target_exceptions: int = 0
    closed_by_target: int = 0  # the target ended the connection before our FIN
    answered: int = 0  # connections where the target sent anything
    connect_failures: int = 0  # could not even open the TCP connection
    target_peak_rss_mb: float = 0.0  # VmHWM: a hostile length that allocates shows here
    good_ops: int = 0
    good_errors: int = 0
    good_first_errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    hang_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def one_stream(port: int, kind: str, stream: bytes, delivery: str, rng: random.Random,
                     hang_timeout: float, fig: Figures) -> None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), hang_timeout)
    except (OSError, TimeoutError):
        fig.connect_failures += 1
        return
    got = 0
    closed_early = False

    async def drain_reader(deadline: float, need_answer: bool) -> bool:
        """Read until EOF (True) or, with need_answer, until any byte (True); False on
        timeout."""
        nonlocal got
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                data = await asyncio.wait_for(reader.read(1 << 16), left)
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not data:
                return True
            got += len(data)
            if need_answer:
                return True

    try:
        if delivery == "whole":
            writer.write(stream)
            await writer.drain()
        elif delivery == "pieces":
            pos = 0
            while pos < len(stream):
                n = rng.choice([1, 2, 3, 7, 8, 9, 64, 100, 1000])
                writer.write(stream[pos:pos + n])
                await writer.drain()
                pos += n
                if rng.random() < 0.05:
                    await asyncio.sleep(0)
        else:  # slowloris halves
            cut = rng.randrange(1, max(len(stream), 2))
            writer.write(stream[:cut])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            writer.write(stream[cut:])
            await writer.drain()
        fig.bytes_sent += len(stream)
    except (ConnectionResetError, BrokenPipeError):
        closed_early = True  # the target closed on us mid-stream: allowed
    try:
        owed = stream[:len(ICREQ)] == ICREQ and not closed_early
        ok = True
        if owed:
            ok = await drain_reader(time.monotonic() + hang_timeout, need_answer=True)
        if ok and not reader.at_eof():
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass
            ok = await drain_reader(time.monotonic() + hang_timeout, need_answer=False)
        elif reader.at_eof():
            fig.closed_by_target += 1
        if not ok:
            fig.hangs += 1
            if len(fig.hang_samples) < 5:
                fig.hang_samples.append(f"{kind}/{delivery}: {stream[:96].hex()}")
        if got:
            fig.answered += 1
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass


# ------------------------------------------------------------------ the good host

GOOD_HOST = r"""
import asyncio, json, os, random, sys, time
from blocktarget.host import connect

async def main(port, nqn):
    ops = errors = 0
    first = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    ctrl = await connect("127.0.0.1", port, nqn, nr_io_queues=1, kato_ms=5000)
    print("READY", flush=True)
    rng = random.Random(7)
    while not stop.is_set():
        nlb = rng.choice([1, 8, 16, 64, 128, 256])
        slba = rng.randrange(0, int(sys.argv[3]) - nlb)
        data = rng.randbytes(nlb * 512)
        try:
            await asyncio.wait_for(ctrl.write(1, slba, data), 20)
            got = await asyncio.wait_for(ctrl.read(1, slba, nlb), 20)
            if bytes(got) != data:
                raise AssertionError(f"data mismatch at lba {slba} nlb {nlb}")
            ops += 2
        except Exception as exc:
            errors += 1
            if len(first) < 5:
                first.append(f"{type(exc).__name__}: {exc}")
            if errors > 50:
                break
            try:
                await ctrl.close()
            except Exception:
                pass
            try:
                ctrl = await connect("127.0.0.1", port, nqn, nr_io_queues=1, kato_ms=5000)
            except Exception as exc2:
                first.append(f"reconnect: {exc2}")
                break
    try:
        await ctrl.close()
    except Exception as exc:
        errors += 1
        first.append(f"close: {exc}")
    print(json.dumps({"ops": ops, "errors": errors, "first": first}), flush=True)

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


# ------------------------------------------------------------------ the run

def target_config(port: int) -> dict[str, Any]:
    from integration.target_proc import listen_address, malloc

    return {"subsystems": [
        {"subsystem": "bdev", "config": [malloc("Malloc0", NUM_BLOCKS, BLOCK)]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "FUZZ0001"}},
            {"method": "nvmf_subsystem_add_ns",
             "params": {"nqn": NQN, "namespace": {"bdev_name": "Malloc0", "nsid": 1}}},
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": listen_address(port)}},
        ]},
    ]}


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


EXC_PATTERNS = re.compile(r"Traceback|Exception in callback|Fatal error on|"
                          r"Unhandled exception|Task exception was never retrieved")


async def fuzz(port: int, target: Any, streams: int, concurrency: int, seed: int,
               hang_timeout: float, fig: Figures, progress: bool) -> None:
    bases = base_streams()
    counter = iter(range(streams))
    master = random.Random(seed)
    seeds = [master.getrandbits(64) for _ in range(streams)]
    done = 0
    t0 = time.monotonic()

    async def worker() -> None:
        nonlocal done
        for i in counter:
            if not target.running():
                return
            rng = random.Random(seeds[i])
            kind, stream = mutate(rng, bases)
            delivery = rng.choices(["whole", "pieces", "slowloris"], weights=[75, 15, 10])[0]
            fig.by_kind[kind] = fig.by_kind.get(kind, 0) + 1
            fig.streams += 1
            await one_stream(port, kind, stream, delivery, rng, hang_timeout, fig)
            done += 1
            if progress and done % 1000 == 0:
                print(f"  {done} streams, {time.monotonic() - t0:.0f} s, hangs {fig.hangs}",
                      file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def run(streams: int = 10000, concurrency: int = 24, seed: int = 1, hang_timeout: float = 10.0,
        cores: list[int] | None = None, progress: bool = False) -> Figures:
    from integration.target_proc import RunningTarget, free_port

    fig = Figures()
    workdir = Path(tempfile.mkdtemp(prefix="bt-fuzz-", dir="/tmp"))
    port = free_port()
    if cores is None:
        cores = sorted(os.sched_getaffinity(0))[:2]
    target = RunningTarget(workdir, target_config(port), cores=cores, http=False)
    good: subprocess.Popen[str] | None = None
    t0 = time.monotonic()
    try:
        target.start()
        good = subprocess.Popen([sys.executable, "-c", GOOD_HOST, str(port), NQN,
                                 str(GOOD_BLOCKS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert good.stdout is not None
        line = good.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"good host did not start: {line!r}")
        asyncio.run(fuzz(port, target, streams, concurrency, seed, hang_timeout, fig,
                         progress))
        if not target.running():
            fig.crashes += 1
        else:
            fig.target_peak_rss_mb = peak_rss_mb(target.pid)
        out, _ = good.communicate(input="", timeout=60)  # EOF on stdin: stop
        res = json.loads(out.strip().splitlines()[-1])
        fig.good_ops, fig.good_errors = res["ops"], res["errors"]
        fig.good_first_errors = res["first"]
        log = target.log()
        fig.target_exceptions = len(EXC_PATTERNS.findall(log))
        if fig.target_exceptions:
            keep = workdir.with_name(workdir.name + "-log")
            shutil.copy(target.log_path, keep)
            fig.hang_samples.append(f"target log kept at {keep}")
    finally:
        if good is not None and good.poll() is None:
            good.kill()
        if target.running():
            target.stop(signal.SIGTERM)
        else:
            target.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    fig.seconds = round(time.monotonic() - t0, 1)
    return fig


def results_section(fig: Figures, cmd: str) -> str:
    date = datetime.date.today().isoformat()
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(fig.by_kind.items()))
    return f"""## Hostile input: `tests/fuzz/live_fuzz.py`

Measured {date} on this 2-core machine with

    {cmd}

A real target (2 reactors, 64 MiB malloc namespace) receives short connections from
24 concurrent fuzzing workers - mutated ICReq/Connect/Property/Identify/capsule/H2CData
streams, random garbage, oversized PDUs actually sent, huge PLEN values; delivered
whole, in small pieces, or as slowloris halves - while a well-behaved initiator
(blocktarget.host, separate process) writes random data and reads it back. A hang is a
connection where the target, after the stream ended, neither answered (an ICResp or
TermReq is owed when the stream starts with an intact ICReq) nor closed within 10 s of
the fuzzer's FIN.

| figure | value |
|---|---|
| PDU streams tried | {fig.streams} |
| bytes sent | {fig.bytes_sent} |
| target crashes (process exit) | {fig.crashes} |
| hangs | {fig.hangs} |
| unhandled exceptions in the target log | {fig.target_exceptions} |
| good host: verified I/O commands | {fig.good_ops} |
| good host: errors | {fig.good_errors} |
| connections the target ended before the fuzzer's FIN | {fig.closed_by_target} |
| connections the target answered | {fig.answered} |
| target peak RSS (VmHWM) | {fig.target_peak_rss_mb} MiB |
| wall time | {fig.seconds} s |

Stream kinds: {kinds}.

Bugs these fuzzers found, fixed: a 4 GiB transport SGL on the admin queue or before
Connect was allocated and zeroed as an R2T buffer (one capsule, 4 GiB of RSS); Get Log
Page zero-filled up to NUMD (16 GiB) regardless of the host's buffer; Identify and other
data commands with an SGL length of 0 still sent C2HData; parse_sqe/parse_cqe/
parse_discovery_entry raised struct.error instead of ValueError on short input.

Also in CI: `tests/fuzz/test_live_fuzz.py` (same run, `LIVE_FUZZ_STREAMS` streams,
default 10,000) and `tests/fuzz/test_fuzz_pdu.py` (the atheris coverage-guided decoder
fuzzer, `FUZZ_PDU_SECONDS`, default 30 s), plus hypothesis properties of every command
parser in tests/unit/test_{{qpair,structs,rpc}}_properties.py.
"""


def write_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find("## Hostile input")
    if start >= 0:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang-timeout", type=float, default=10.0)
    ap.add_argument("--results", type=Path, help="write the figures into this RESULTS.md")
    args = ap.parse_args()
    fig = run(args.streams, args.concurrency, args.seed, args.hang_timeout, progress=True)
    print(json.dumps(asdict(fig), indent=2))
    if args.results:
        cmd = "python tests/fuzz/live_fuzz.py " + " ".join(sys.argv[1:])
        write_results(args.results, results_section(fig, cmd))
    bad = fig.crashes + fig.hangs + fig.good_errors + fig.target_exceptions
    return 1 if bad or fig.good_ops == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
