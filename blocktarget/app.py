"""Target: the composition root. It owns the registries, the reactors, the transport and
the control plane, and starts and stops them in an order that never leaves a half-open
target behind: config replayed first (nothing listening yet), then reactors, then the RPC
servers, then the NVMe/TCP listeners; shutdown in reverse.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import signal
from typing import Any

from . import __version__
from .bdev import MODULES, Bdev, BdevRegistry
from .config import ConfigError, Settings, replay
from .errors import AlreadyExists, NoSuchDevice, RpcError
from .nvme.controller import ControllerTable
from .nvme.subsystem import ListenAddress, Subsystem, SubsystemRegistry
from .reactor import ReactorPool
from .rpc import Dispatcher, UnixRpcServer, http_handler, load_methods, parse_http_address
from .transport_opts import TransportOptions

log = logging.getLogger("blocktarget")


class StartupError(Exception):
    """The target could not start (address in use, ...); worded for the operator."""


class Target:
    def __init__(self, settings: Settings | None = None, *, dry_run: bool = False) -> None:
        load_methods()
        self.settings = settings or Settings()
        self.dry_run = dry_run
        self.version = __version__
        self.bdevs = BdevRegistry()
        self.subsystems = SubsystemRegistry()
        self.controllers = ControllerTable()
        self.subsystems.observers.append(self._config_changed)
        self.transports: dict[str, TransportOptions] = {}
        self.reactors = ReactorPool(
            self.settings.cores or sorted(os.sched_getaffinity(0)),
            pin=self.settings.pin,
            busy_poll_us=self.settings.busy_poll_us,
            idle_poll_us=self.settings.idle_poll_us,
        )
        self.dispatcher = Dispatcher(self)
        self.started = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tcp: Any = None  # transport_tcp.TcpTransport once started
        self._unix: UnixRpcServer | None = None
        self._http_runner: Any = None
        self.http_port: int | None = None
        self._stop_event: asyncio.Event | None = None
        self.metrics_registry: Any = None

    # ---- config ----
    async def apply_config(self, doc: dict[str, Any], source: str) -> int:
        return await replay(self, doc, source)

    def save_config(self) -> dict[str, Any]:
        """The running state as a config; replaying it rebuilds the same target."""
        # None: another bdev of the same create call writes it (split parts, remote namespaces)
        bdev_calls = [e for b in self.bdevs if (e := b.config_entry()) is not None]
        nvmf_calls: list[dict[str, Any]] = []
        for opts in self.transports.values():
            nvmf_calls.append({"method": "nvmf_create_transport", "params": opts.config_params()})
        for sub in self.subsystems:
            nvmf_calls.append({
                "method": "nvmf_create_subsystem",
                "params": {
                    "nqn": sub.nqn, "serial_number": sub.serial_number,
                    "model_number": sub.model_number, "allow_any_host": sub.allow_any_host,
                    "max_namespaces": sub.max_namespaces, "ana_reporting": sub.ana_reporting,
                    "min_cntlid": sub.min_cntlid, "max_cntlid": sub.max_cntlid,
                },
            })
            for ns in sub.ns_list():
                nvmf_calls.append({"method": "nvmf_subsystem_add_ns",
                                   "params": {"nqn": sub.nqn, "namespace": ns.config_params()}})
            for host, extra in sub.hosts.items():
                nvmf_calls.append({"method": "nvmf_subsystem_add_host",
                                   "params": {"nqn": sub.nqn, "host": host, **extra}})
            for addr in sub.listeners:
                nvmf_calls.append({"method": "nvmf_subsystem_add_listener",
                                   "params": {"nqn": sub.nqn, "listen_address": addr.describe()}})
        for ref in self.subsystems.referrals:
            nvmf_calls.append({"method": "nvmf_discovery_add_referral", "params": dict(ref)})
        return {
            "blocktarget": self.settings.describe(),
            "subsystems": [
                {"subsystem": "bdev", "config": bdev_calls},
                {"subsystem": "nvmf", "config": nvmf_calls},
            ],
        }

    # ---- bdevs ----
    async def create_bdev(self, module: str, params: dict[str, Any]) -> Bdev | list[Bdev]:
        """Create through the module; modules that stack on other bdevs or open
        connections get the target (`needs_target`) and may be coroutines. A module
        that makes several bdevs in one call (split) returns a list: all or none are added."""
        mod = MODULES[module]
        if self.bdevs.find(params.get("name", "")) is not None:
            raise AlreadyExists(f"bdev '{params['name']}' already exists")
        result = mod.create(params, self) if mod.needs_target else mod.create(params)
        made = await result if inspect.isawaitable(result) else result
        bdevs = made if isinstance(made, list) else [made]
        added: list[Bdev] = []
        try:
            for bdev in bdevs:
                self.bdevs.add(bdev)
                added.append(bdev)
        except RpcError:
            for bdev in added:
                self.bdevs.remove(bdev)
            for bdev in bdevs:
                await _maybe_await(bdev.destruct())
            raise
        return made

    async def delete_bdev(self, name: str, module: str | None = None) -> None:
        bdev = self.bdevs.get(name)
        if module is not None and bdev.module != module:
            raise NoSuchDevice(f"bdev '{name}' is a {bdev.module} bdev, not {module}")
        self.bdevs.check_removable(name)
        self.bdevs.remove(bdev)
        if self.started:
            await self.reactors.broadcast(bdev.close_channel)
        bdev.close_channel(None)
        await _maybe_await(bdev.destruct())

    # ---- subsystems ----
    async def remove_namespace(self, sub: Subsystem, nsid: int) -> None:
        self.subsystems.remove_namespace(sub, nsid)

    async def remove_subsystem(self, sub: Subsystem) -> None:
        if self.tcp is not None:
            await self.tcp.disconnect_subsystem(sub)
        if self.subsystems.find(sub.nqn) is sub:
            self.subsystems.remove(sub.nqn)
        for addr in list(sub.listeners):
            await self.unlisten_if_unused(addr)

    async def disconnect_host(self, sub: Subsystem, hostnqn: str) -> None:
        if self.tcp is not None:
            await self.tcp.disconnect_host(sub, hostnqn)

    def _config_changed(self, event: str, sub: Subsystem | None, detail: Any) -> None:
        """Tell connected hosts: namespace changes to the subsystem's controllers,
        anything else to discovery controllers (their log page changed)."""
        from .nvme import spec

        for ctrl in self.controllers.all():
            loop = ctrl.reactor.loop
            if loop is None or ctrl.dead:
                continue
            if ctrl.discovery:
                loop.call_soon_threadsafe(
                    ctrl.post_event, spec.AsyncEventType.NOTICE,
                    spec.AsyncEventNotice.DISCOVERY_LOG_CHANGE, spec.LogPage.DISCOVERY)
            elif event in ("ns_added", "ns_removed") and ctrl.subsystem is sub:
                loop.call_soon_threadsafe(ctrl.ns_changed, detail.nsid)

    # ---- listeners ----
    async def listen(self, addr: ListenAddress) -> None:
        """Bind now when running; at config time binding waits for start()."""
        if "TCP" not in self.transports:
            # SPDK requires nvmf_create_transport first; a default TCP transport is the
            # only sensible meaning of a listener without one, so create it.
            self.transports["TCP"] = TransportOptions()
        if self.started and self.tcp is not None:
            await self.tcp.listen(addr)

    async def unlisten_if_unused(self, addr: ListenAddress) -> None:
        if addr in self.subsystems.all_listen_addresses():
            return
        if self.tcp is not None:
            await self.tcp.unlisten(addr)

    # ---- lifecycle ----
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            self.reactors.start()
        except OSError as exc:
            raise StartupError(f"cannot start reactors: {exc}") from None
        self.started = True
        try:
            if self.settings.metrics:
                from .metrics import make_registry

                self.metrics_registry = make_registry(self)
            await self._start_rpc()
            from .transport_tcp import TcpTransport

            self.tcp = TcpTransport(self)
            for addr in sorted(self.subsystems.all_listen_addresses(), key=str):
                try:
                    await self.tcp.listen(addr)
                except RpcError as exc:  # worded already ("cannot listen on ...: address ...")
                    raise StartupError(exc.message) from None
        except BaseException:
            await self.stop()
            raise
        log.info(
            "blocktarget %s started: %d reactor(s) on cores %s, %d bdev(s), %d subsystem(s)",
            self.version, len(self.reactors), [r.core for r in self.reactors],
            len(self.bdevs), len(self.subsystems),
        )

    async def _start_rpc(self) -> None:
        s = self.settings
        if s.rpc_unix:
            self._unix = UnixRpcServer(self.dispatcher, s.rpc_unix)
            try:
                await self._unix.start()
            except OSError as exc:
                self._unix = None
                raise StartupError(f"cannot serve RPC on {s.rpc_unix}: {_why(exc)}") from None
            log.info("RPC listening on unix:%s", s.rpc_unix)
        if s.rpc_http:
            from aiohttp import web

            host, port = parse_http_address(s.rpc_http)
            app = web.Application(client_max_size=16 * 1024 * 1024)
            handler = http_handler(self.dispatcher)
            app.router.add_post("/", handler)
            app.router.add_post("/rpc", handler)
            if self.metrics_registry is not None:
                from .metrics import metrics_handler

                app.router.add_get("/metrics", metrics_handler(self.metrics_registry))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                raise StartupError(f"cannot serve RPC on http://{s.rpc_http}: {_why(exc)}") from None
            self._http_runner = runner
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.http_port = server.sockets[0].getsockname()[1]
            log.info("RPC listening on http://%s (metrics at /metrics)", s.rpc_http)

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    async def wait_stopped(self) -> None:
        assert self._stop_event is not None
        await self._stop_event.wait()

    async def stop(self) -> None:
        """Stop accepting, close connections (outstanding I/O completes), then the rest."""
        if self.tcp is not None:
            await self.tcp.close()
            self.tcp = None
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        if self._unix is not None:
            await self._unix.stop()
            self._unix = None
        if self.started:
            self.reactors.stop()
            self.started = False
        for b in reversed(list(self.bdevs)):  # stacked bdevs before their bases
            for key in list(b.channels):
                ch = b.channels.pop(key)
                ch.close()
            await _maybe_await(b.destruct())


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another target running?)"
    return exc.strerror or str(exc)


async def run(settings: Settings, doc: dict[str, Any], source: str) -> int:
    """Load the config, start, serve until SIGTERM/SIGINT, stop. Returns the exit status."""
    target = Target(settings)
    try:
        await target.apply_config(doc, source)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, target.request_stop)
    try:
        await target.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    try:
        _notify_ready()
        await target.wait_stopped()
        log.info("stopping")
    finally:
        await target.stop()
    log.info("stopped")
    return 0


def _notify_ready() -> None:
    """sd_notify READY=1 when run under systemd Type=notify; a no-op otherwise."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    import socket

    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"READY=1", path)
        except OSError:
            pass
