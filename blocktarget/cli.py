"""Command line: `blocktarget start|rpc|version` (and the host-side commands as they land).

Exit statuses: 0 success, 1 runtime failure (address in use, RPC error), 2 bad usage or
bad config — so scripts can tell "fix your file" from "something is in the way".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from . import __version__
from .config import (
    DEFAULT_CONFIG,
    DEFAULT_UNIX,
    ConfigError,
    parse_settings,
    prepare_rpc_access,
    read_file,
)


def _start(args: argparse.Namespace) -> int:
    source = args.config or "<embedded default config>"
    try:
        doc = read_file(args.config) if args.config else json.loads(json.dumps(DEFAULT_CONFIG))
        settings = parse_settings(doc, source)
        if args.cores is not None:
            from .reactor import parse_cores

            try:
                settings.cores = parse_cores(args.cores)
                settings.raw_cores = args.cores
            except ValueError as exc:
                raise ConfigError(f"--cores: {exc}") from None
        if args.rpc_socket is not None:
            settings.rpc_unix = args.rpc_socket or None
        if args.http is not None:
            settings.rpc_http = args.http or None
        if args.log_level:
            settings.log_level = args.log_level
        if args.allowed_dir:
            settings.allowed_dirs = [*(settings.allowed_dirs or []), *args.allowed_dir]
        try:
            prepare_rpc_access(settings, source)
        except ValueError as exc:  # a bad --http address
            raise ConfigError(f"--http: {exc}") from None
    except ConfigError as exc:
        print(f"blocktarget: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    if args.dry_run:
        return _dry_run(settings, doc, source)
    from .app import run

    try:
        import uvloop

        return uvloop.run(run(settings, doc, source))
    except ImportError:  # pragma: no cover
        return asyncio.run(run(settings, doc, source))


def _dry_run(settings: Any, doc: dict[str, Any], source: str) -> int:
    from .app import Target

    async def check() -> int:
        target = Target(settings, dry_run=True)
        try:
            n = await target.apply_config(doc, source)
        except ConfigError as exc:
            print(f"blocktarget: {exc}", file=sys.stderr)
            return 2
        finally:
            await target.stop()
        print(f"{source}: OK ({n} calls; {len(target.bdevs)} bdev(s), "
              f"{len(target.subsystems)} subsystem(s), cores {settings.cores})")
        return 0

    return asyncio.run(check())


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _parse_value(text: str) -> Any:
    """--param values are JSON when they parse as JSON (numbers, true, null, objects)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_params(pairs: list[str], json_text: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if json_text:
        loaded = json.loads(json_text)
        if not isinstance(loaded, dict):
            raise ValueError("--json must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {pair!r}: expected KEY=VALUE")
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--param {pair!r}: {p} is not an object")
        node[leaf] = _parse_value(value)
    return params


def _rpc(args: argparse.Namespace) -> int:
    from .rpc_client import RpcCallError, RpcClient

    try:
        params = build_params(args.param or [], args.json)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"blocktarget rpc: {exc}", file=sys.stderr)
        return 2
    try:
        token = rpc_token(args)
    except OSError as exc:
        print(f"blocktarget rpc: --token-file {args.token_file}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    try:
        with RpcClient(unix=args.socket, http=args.http, timeout=args.timeout, token=token,
                       tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                       tls_key=args.tls_key) as client:
            result = client.call(args.method, params or None)
    except RpcCallError as exc:
        print(f"blocktarget rpc: {args.method}: {exc.message} (code {exc.code})", file=sys.stderr)
        return 1
    except OSError as exc:
        where = args.http or args.socket
        print(f"blocktarget rpc: cannot reach the target at {where}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def rpc_token(args: argparse.Namespace) -> str | None:
    """--token, else --token-file, else $BLOCKTARGET_RPC_TOKEN (sent only over HTTP)."""
    if args.token:
        return str(args.token)
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("BLOCKTARGET_RPC_TOKEN") or None


def _version(args: argparse.Namespace) -> int:
    print(f"blocktarget {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blocktarget",
        description="NVMe-over-Fabrics (NVMe/TCP) block storage target.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="start a target (embedded default config without -c)",
                       description="Start a target and serve until SIGTERM/SIGINT.")
    s.add_argument("-c", "--config", help="JSON config file (SPDK's shape + 'blocktarget')")
    s.add_argument("--dry-run", action="store_true",
                   help="validate the config (replay it without serving) and exit")
    s.add_argument("-m", "--cores", help="reactor cores: list '0,1', range '0-1' or mask '0x3'")
    s.add_argument("-r", "--rpc-socket", help="Unix RPC socket path ('' disables)")
    s.add_argument("--http", help="HTTP RPC/metrics address HOST:PORT ('' disables)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--allowed-dir", action="append", metavar="DIR",
                   help="a directory RPCs may open files in (repeatable; adds to "
                   "blocktarget.allowed_dirs, whose default is /var/lib/blocktarget)")
    s.set_defaults(func=_start)

    r = sub.add_parser("rpc", help="call a JSON-RPC method on a running target",
                       description="Call a method, e.g. `blocktarget rpc bdev_get_bdevs` or "
                       "`blocktarget rpc bdev_create --param type=malloc --param name=M1 "
                       "--param size_mb=64`.")
    r.add_argument("method")
    r.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="a parameter (repeatable; VALUE parsed as JSON when it is; "
                   "dotted keys nest: namespace.bdev_name=Malloc0)")
    r.add_argument("--json", help="all parameters as one JSON object")
    r.add_argument("-s", "--socket", default=DEFAULT_UNIX, help="Unix socket path")
    r.add_argument("--http", help="use HTTP at this URL or HOST:PORT instead of the socket")
    r.add_argument("--token", help="HTTP bearer token (prefer --token-file or the "
                   "BLOCKTARGET_RPC_TOKEN environment variable: argv is visible in ps)")
    r.add_argument("--token-file", help="file holding the HTTP bearer token")
    r.add_argument("--tls-ca", help="CA bundle to verify an https:// target with")
    r.add_argument("--tls-cert", help="client certificate for an https:// target")
    r.add_argument("--tls-key", help="key of --tls-cert")
    r.add_argument("-t", "--timeout", type=float, default=60.0)
    r.set_defaults(func=_rpc)

    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=_version)

    _add_host_commands(sub)
    _add_setup_command(sub)
    from . import docgen

    docgen.add_commands(sub)
    return p


def _add_setup_command(sub: Any) -> None:
    """`blocktarget setup` (vfio-pci binding, hugepages) lives in blocktarget.setup_cmd."""
    from . import setup_cmd

    setup_cmd.add_commands(sub)


def _add_host_commands(sub: Any) -> None:
    """Host-side commands (discover, connect, perf) live in blocktarget.host."""
    try:
        from .host import cli as host_cli
    except ImportError:
        return
    host_cli.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
