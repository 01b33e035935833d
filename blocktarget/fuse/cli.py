"""``blocktarget fuse-export``: remote namespaces as files, for hosts without nvme-tcp.

The command stays in the foreground (like ``nvme connect`` it has no daemon mode;
run it under systemd or with ``&``) and prints one line when the files are ready.
SIGTERM and SIGINT unmount and exit 0; a mount removed by someone else
(``fusermount3 -u``) ends it the same way. Exit 1: the target or FUSE could not be
used (the message says which); 2: bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from blocktarget.host.cli import tls_key_arg
from blocktarget.host.connection import NvmeStatusError

from .device import DeviceError, RemoteController
from .export import Export, file_name
from .mount import FuseUnavailable

__all__ = ["add_commands", "run_remote_export"]

log = logging.getLogger(__name__)


async def run_remote_export(args: argparse.Namespace) -> int:
    remote = RemoteController(
        args.traddr, args.trsvcid, args.nqn, nr_io_queues=args.nr_io_queues,
        queue_size=args.queue_size, hostnqn=args.hostnqn, hdgst=args.hdr_digest,
        ddgst=args.data_digest, timeout=args.timeout, reconnect_delay=args.reconnect_delay,
        ctrl_loss_tmo=args.ctrl_loss_tmo, tls_key=tls_key_arg(args))
    await remote.open()
    try:
        assert remote.ctrl is not None
        nsids = args.nsid or await remote.ctrl.active_ns_list()
        if not nsids:
            raise DeviceError(0, f"{args.nqn} has no active namespaces")
        devices = [(file_name(n), await remote.namespace(n)) for n in nsids]
        export = Export(args.mountpoint, devices, fsname=f"blocktarget:{args.nqn}",
                        allow_other=args.allow_other, fuse_device=args.fuse_device,
                        close_devices=remote.close)
        export.mount()
    except BaseException:
        await remote.close()
        raise
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(sig: int) -> None:
        if not stopping:
            log.info("signal %d: unmounting %s", sig, export.mountpoint)
            stopping.append(loop.create_task(export.shutdown()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    for name, dev in devices:
        print(f"blocktarget fuse-export: {export.mountpoint}/{name} = {args.nqn} "
              f"nsid {getattr(dev, 'nsid', '?')}, {dev.num_blocks} blocks of "
              f"{dev.block_size} bytes", flush=True)
    await export.serve()
    for t in stopping:
        await t
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        return runner(run_remote_export(args))
    except FuseUnavailable as exc:
        print(f"blocktarget fuse-export: {exc}", file=sys.stderr)
        return 1
    except (NvmeStatusError, ConnectionError, OSError, TimeoutError, ValueError) as exc:
        # (ValueError: a malformed key, or --tls without --tls-key)
        print(f"blocktarget fuse-export: {args.traddr}:{args.trsvcid} {args.nqn}: "
              f"{exc or type(exc).__name__}", file=sys.stderr)
        return 1


def add_commands(sub: Any) -> None:
    """Register ``fuse-export`` on the main parser's subparsers."""
    p = sub.add_parser(
        "fuse-export", help="serve remote namespaces as files through FUSE",
        description="Connect to an NVMe/TCP subsystem and present each namespace as a file "
        "(nvme0n<nsid>) in MOUNTPOINT, for hosts without a kernel NVMe/TCP initiator. "
        "Runs until SIGTERM/SIGINT or unmount.")
    p.add_argument("-a", "--traddr", required=True, help="target address")
    p.add_argument("-s", "--trsvcid", type=int, default=4420, help="target port (default 4420)")
    p.add_argument("-n", "--nqn", required=True, help="subsystem NQN")
    p.add_argument("--nsid", type=int, action="append",
                   help="namespace to export (repeatable; default every active namespace)")
    p.add_argument("-q", "--hostnqn", help="host NQN (default /etc/nvme/hostnqn or a uuid NQN)")
    p.add_argument("-g", "--hdr-digest", action="store_true", help="enable header digest")
    p.add_argument("-G", "--data-digest", action="store_true", help="enable data digest")
    p.add_argument("--tls", action="store_true",
                   help="NVMe/TCP over TLS 1.3 with a pre-shared key (needs --tls-key)")
    p.add_argument("--tls-key", metavar="NVMeTLSkey-1:..|FILE",
                   help="the configured PSK (nvme gen-tls-key), or a file holding it")
    p.add_argument("-i", "--nr-io-queues", type=int, default=1, help="I/O queues (default 1)")
    p.add_argument("-Q", "--queue-size", type=int, default=128,
                   help="I/O queue entries (default 128)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="per-command timeout, seconds (default 30)")
    p.add_argument("--reconnect-delay", type=float, default=1.0,
                   help="seconds between reconnect attempts (default 1)")
    p.add_argument("--ctrl-loss-tmo", type=float, default=60.0,
                   help="seconds without a connection before I/O fails with EIO (default 60)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users reach the mount (file modes still apply)")
    p.add_argument("--fuse-device", help="FUSE device node (default /dev/fuse)")
    p.add_argument("-v", "--verbose", action="store_true", help="log reconnects and requests")
    p.add_argument("mountpoint", help="an existing empty directory")
    p.set_defaults(func=_main)
