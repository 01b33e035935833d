"""Host-side commands of the ``blocktarget`` CLI: discover, connect, perf.

Option letters follow nvme-cli (``-a`` address, ``-s`` service id, ``-n`` NQN, ``-q``
host NQN, ``-g``/``-G`` header/data digests) and fio/spdk_nvme_perf (``-w -o -q -t``;
``-q`` is the queue depth there, so perf spells the host NQN ``--hostnqn`` only).
Exit statuses as the rest of the CLI: 0 success, 1 runtime failure (refused, I/O or
verify errors), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from typing import Any

from blocktarget.nvme import spec, structs

from .connection import NvmeStatusError
from .controller import connect, discover
from .perf import ENGINES, WORKLOADS, PerfConfig, format_result, parse_size, result_json, run_perf

__all__ = ["add_commands", "format_discovery_entry"]

DEFAULT_PORT = 4420


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def _fail(cmd: str, exc: BaseException) -> int:
    print(f"blocktarget {cmd}: {exc or type(exc).__name__}", file=sys.stderr)
    return 1


_RUNTIME_ERRORS = (NvmeStatusError, ConnectionError, OSError, TimeoutError, RuntimeError)

# ----------------------------------------------------------------------- discover

_TRTYPE = {spec.TransportType.TCP: "tcp", spec.TransportType.RDMA: "rdma",
           spec.TransportType.FC: "fc", spec.TransportType.LOOP: "loop"}
_ADRFAM = {spec.AddressFamily.IPV4: "ipv4", spec.AddressFamily.IPV6: "ipv6",
           spec.AddressFamily.FC: "fc", spec.AddressFamily.IB: "ib"}
_SUBTYPE = {spec.SubsystemType.REFERRAL: "discovery subsystem referral",
            spec.SubsystemType.NVME: "nvme subsystem",
            spec.SubsystemType.CURRENT_DISCOVERY: "current discovery subsystem"}
_SECURE = {0: "not specified", 1: "required", 2: "not required"}
_SECTYPE = {0: "none", 1: "tls1.2", 2: "tls1.3"}


def _treq(treq: int) -> str:
    text = _SECURE.get(treq & spec.TREQ_SECURE_CHANNEL_MASK, "reserved")
    if treq & spec.Treq.DISABLE_SQFLOW:
        text += ", sq flow control disable supported"
    return text


def _eflags(eflags: int) -> str:
    names = [n for bit, n in ((spec.DiscEflags.DUPRETINFO, "duplicate discovery information"),
                              (spec.DiscEflags.EPCSD, "explicit discovery connections"))
             if eflags & bit]
    return ", ".join(names) or "none"


def format_discovery_entry(i: int, e: structs.DiscoveryEntry) -> str:
    """One entry laid out as ``nvme discover`` prints it."""
    sectype = e.tsas[0] if e.trtype == spec.TransportType.TCP and e.tsas else 0
    rows = [
        f"=====Discovery Log Entry {i}======",
        f"trtype:  {_TRTYPE.get(e.trtype, e.trtype)}",
        f"adrfam:  {_ADRFAM.get(e.adrfam, e.adrfam)}",
        f"subtype: {_SUBTYPE.get(e.subtype, e.subtype)}",
        f"treq:    {_treq(e.treq)}",
        f"portid:  {e.portid}",
        f"trsvcid: {e.trsvcid}",
        f"subnqn:  {e.subnqn}",
        f"traddr:  {e.traddr}",
        f"eflags:  {_eflags(e.eflags)}",
    ]
    if e.trtype == spec.TransportType.TCP:
        rows.append(f"sectype: {_SECTYPE.get(sectype, sectype)}")
    return "\n".join(rows)


def _discover(args: argparse.Namespace) -> int:
    async def go() -> int:
        entries = await discover(args.traddr, args.trsvcid, args.hostnqn,
                                 hdgst=args.hdr_digest, ddgst=args.data_digest,
                                 timeout=args.timeout, tls_key=tls_key_arg(args))
        if args.json:
            print(json.dumps({"records": [
                {k: (v.hex() if isinstance(v, bytes) else v) for k, v in e._asdict().items()
                 if k != "tsas"} for e in entries]}, indent=2))
            return 0
        print(f"\nDiscovery Log Number of Records {len(entries)}")
        for i, e in enumerate(entries):
            print(format_discovery_entry(i, e))
        return 0

    try:
        return _run(go())
    except (*_RUNTIME_ERRORS, ValueError) as exc:  # ValueError: a malformed TLS key
        return _fail("discover", exc)


# ------------------------------------------------------------------------ connect


def _hexdump(data: bytes, width: int = 16) -> str:
    return "\n".join(
        f"  {off:08x}  {data[off:off + width].hex(' ')}" for off in range(0, len(data), width)
    )


def tls_key_arg(args: argparse.Namespace) -> str | None:
    """--tls with --tls-key, or neither (ValueError otherwise: a key given without --tls,
    or --tls without a key, must not quietly mean plain TCP)."""
    key = getattr(args, "tls_key", None)
    if bool(getattr(args, "tls", False)) != (key is not None):
        raise ValueError("--tls and --tls-key go together (this initiator has no kernel "
                         "keyring to take the key from)")
    return key


def _connect(args: argparse.Namespace) -> int:
    async def go() -> int:
        t0 = time.monotonic()
        ctrl = await connect(args.traddr, args.trsvcid, args.nqn, hostnqn=args.hostnqn,
                             nr_io_queues=args.nr_io_queues, queue_size=args.queue_size,
                             hdgst=args.hdr_digest, ddgst=args.data_digest,
                             timeout=args.timeout, dhchap_secret=args.dhchap_secret,
                             dhchap_ctrl_secret=args.dhchap_ctrl_secret,
                             tls_key=tls_key_arg(args))
        try:
            idc = ctrl.id_ctrl
            vs = ctrl.vs
            q0 = ctrl.admin_q
            assert q0 is not None
            print(f"connected to {args.nqn} at {args.traddr}:{args.trsvcid} in "
                  f"{(time.monotonic() - t0) * 1e3:.1f} ms")
            print(f"  host NQN     {ctrl.hostnqn}")
            print(f"  cntlid       {ctrl.cntlid}")
            print(f"  model        {idc['mn']}")
            print(f"  serial       {idc['sn']}")
            print(f"  firmware     {idc['fr']}")
            print(f"  NVMe version {vs >> 16}.{(vs >> 8) & 0xFF}.{vs & 0xFF}")
            print(f"  subnqn       {idc['subnqn']}")
            print(f"  I/O queues   {len(ctrl.io_queues)} x {ctrl.io_queue_size} entries "
                  f"(MQES {ctrl.mqes})")
            print(f"  MDTS         {ctrl.max_transfer or 'unlimited'} bytes, in-capsule data "
                  f"{max(0, idc['ioccsz'] * 16 - 64)} bytes, MAXH2CDATA {q0.maxh2cdata}")
            print(f"  digests      header {'on' if q0.hdgst else 'off'}, "
                  f"data {'on' if q0.ddgst else 'off'}")
            t = q0._transport
            session = t.get_extra_info("tls") if t is not None else None
            print(f"  TLS          {session.cipher if session is not None else 'off'}")
            nsids = await ctrl.active_ns_list()
            print(f"  namespaces   {len(nsids)}")
            for nsid in nsids:
                ns = await ctrl.namespace(nsid)
                print(f"    nsid {nsid}: {ns.nsze} blocks of {ns.lba_size} bytes "
                      f"({ns.size_bytes / (1 << 30):.3f} GiB)")
            if nsids and ctrl.io_queues:
                nsid = nsids[0]
                data = bytes(await ctrl.read(nsid, 0, 1))
                print(f"  read nsid {nsid} LBA 0: first 64 bytes")
                print(_hexdump(data[:64]))
        finally:
            await ctrl.disconnect()
        print("disconnected")
        return 0

    try:
        return _run(go())
    except (*_RUNTIME_ERRORS, ValueError) as exc:  # ValueError: a malformed DHHC-1 key
        return _fail("connect", exc)


# --------------------------------------------------------------------------- perf


def perf_config(args: argparse.Namespace) -> PerfConfig:
    """Argparse namespace -> validated PerfConfig (ValueError on bad values)."""
    cfg = PerfConfig(
        addr=args.traddr, port=args.trsvcid, nqn=args.nqn, workload=args.workload,
        io_size=parse_size(args.io_size), qd=args.queue_depth, time_s=args.time,
        rwmixread=args.rwmixread, connections=args.connections, nsid=args.nsid,
        verify=args.verify, hdgst=args.hdr_digest, ddgst=args.data_digest,
        hostnqn=args.hostnqn, size=parse_size(args.size) if args.size else 0,
        progress=not args.quiet, seed=args.seed,
        journal=args.journal, check_only=args.check_only, journal_sync=args.journal_sync,
        engine=args.engine, copy_data=args.copy_data, busy_poll=args.busy_poll,
        dhchap_secret=args.dhchap_secret, dhchap_ctrl_secret=args.dhchap_ctrl_secret,
        tls_key=tls_key_arg(args),
    )
    cfg.validate()
    return cfg


def _perf(args: argparse.Namespace) -> int:
    try:
        cfg = perf_config(args)
    except ValueError as exc:
        print(f"blocktarget perf: {exc}", file=sys.stderr)
        return 2
    try:
        res = run_perf(cfg, progress=None if args.quiet else sys.stderr)
    except ValueError as exc:
        return _fail("perf", exc)
    except _RUNTIME_ERRORS as exc:
        return _fail("perf", exc)
    if args.json:
        print(result_json(res))
    else:
        print(format_result(res))
    return 0 if res.ok else 1


# ------------------------------------------------------------------------ parsers


def _target_args(p: argparse.ArgumentParser, *, nqn: bool, hostnqn_short: bool = True) -> None:
    p.add_argument("-a", "--traddr", required=True, help="target address")
    p.add_argument("-s", "--trsvcid", type=int, default=DEFAULT_PORT,
                   help=f"target port (default {DEFAULT_PORT})")
    if nqn:
        p.add_argument("-n", "--nqn", required=True, help="subsystem NQN")
    if hostnqn_short:
        p.add_argument("-q", "--hostnqn", help="host NQN (default /etc/nvme/hostnqn or a uuid NQN)")
    else:
        p.add_argument("--hostnqn", help="host NQN (default /etc/nvme/hostnqn or a uuid NQN)")
    p.add_argument("-g", "--hdr-digest", action="store_true", help="enable header digest")
    p.add_argument("-G", "--data-digest", action="store_true", help="enable data digest")
    if nqn:  # as nvme-cli's connect (-S / -C)
        p.add_argument("-S", "--dhchap-secret", metavar="DHHC-1:..",
                       help="DH-HMAC-CHAP host secret (nvme gen-dhchap-key)")
        p.add_argument("-C", "--dhchap-ctrl-secret", metavar="DHHC-1:..",
                       help="DH-HMAC-CHAP controller secret: authenticate the controller too")
    p.add_argument("--tls", action="store_true",
                   help="NVMe/TCP over TLS 1.3 with a pre-shared key (needs --tls-key)")
    p.add_argument("--tls-key", metavar="NVMeTLSkey-1:..|FILE",
                   help="the configured PSK (nvme gen-tls-key), or a file holding it: the "
                   "same key the target's keyring has for this host (discover: the key "
                   "for any subsystem the host may reach on that port)")


def add_commands(sub: Any) -> None:
    """Register discover, connect and perf on the main parser's subparsers."""
    d = sub.add_parser("discover", help="read a discovery controller's log (like nvme discover)",
                       description="Connect to the discovery NQN and print its log entries.")
    _target_args(d, nqn=False)
    d.add_argument("--json", action="store_true", help="print the entries as JSON")
    d.add_argument("--timeout", type=float, default=30.0, help="per-command timeout, seconds")
    d.set_defaults(func=_discover)

    c = sub.add_parser("connect", help="smoke test: connect, identify, read LBA 0, disconnect",
                       description="Connect to a subsystem, print what the controller "
                       "reports, read block 0 of the first namespace and disconnect.")
    _target_args(c, nqn=True)
    c.add_argument("-i", "--nr-io-queues", type=int, default=1, help="I/O queues (default 1)")
    c.add_argument("-Q", "--queue-size", type=int, default=128,
                   help="I/O queue entries (default 128)")
    c.add_argument("--timeout", type=float, default=30.0, help="per-command timeout, seconds")
    c.set_defaults(func=_connect)

    p = sub.add_parser("perf", help="load generator (like spdk_nvme_perf / fio)",
                       description="Drive a namespace with a workload and report IOPS, "
                       "bandwidth and latency percentiles; a progress line goes to stderr "
                       "once a second.")
    _target_args(p, nqn=True, hostnqn_short=False)
    p.add_argument("-w", "--workload", choices=WORKLOADS, default="randread")
    p.add_argument("-o", "--io-size", default="4096", help="I/O size, e.g. 4096, 4k, 128k")
    p.add_argument("-q", "--queue-depth", type=int, default=32,
                   help="commands in flight per connection (default 32)")
    p.add_argument("-t", "--time", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("-M", "--rwmixread", type=int, default=70,
                   help="read percentage of rw/randrw (default 70)")
    p.add_argument("-c", "--connections", type=int, default=1,
                   help="connections, each in its own worker process (default 1)")
    p.add_argument("--nsid", type=int, default=1, help="namespace id (default 1)")
    p.add_argument("--size", help="working set (default the whole namespace), e.g. 64M")
    p.add_argument("--verify", action="store_true",
                   help="write (LBA, generation)-stamped blocks and check every read")
    p.add_argument("--journal", metavar="FILE",
                   help="with --verify: journal every write (sent with FUA) before submit "
                   "and once acknowledged; first read every journaled block back and "
                   "fail if an acknowledged write was lost (crash tests)")
    p.add_argument("--check-only", action="store_true",
                   help="with --journal: only check the journaled blocks, no workload")
    p.add_argument("--journal-sync", action="store_true",
                   help="fsync the journal after each acknowledgement (host power loss)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="I/O loop: c (fast, in the C extension), python (the reference), "
                   "auto (default: c unless the run needs python, e.g. --journal)")
    p.add_argument("--copy-data", action="store_true",
                   help="C engine: receive read data into per-command buffers as an "
                   "application would (by default data nobody checks is dropped, large "
                   "payloads without being copied at all)")
    p.add_argument("--busy-poll", action="store_true",
                   help="C engine: spin on the socket instead of sleeping until answers "
                   "come (as spdk_nvme_perf does): a completion's latency without a "
                   "wakeup in it, for a whole core")
    p.add_argument("--seed", type=int, help="random seed (reproducible offsets)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_perf)

    from blocktarget.fuse.cli import add_commands as add_fuse_commands

    add_fuse_commands(sub)
