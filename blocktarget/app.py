"""Target: the composition root. It owns the registries, the reactors, the transport and
the control plane, and starts and stops them in an order that never leaves a half-open
target behind, and that makes "ready" observable from outside:

1. the config is replayed in-process (methods called directly, nothing listening yet);
2. the reactors start;
3. the NVMe/TCP listeners bind and accept (a host may connect from here on);
4. the HTTP RPC/metrics server starts;
5. the Unix RPC socket appears, atomically (bound and listening under a temporary name,
   then renamed into place), so its existence means everything above is serving;
6. ``ready`` is set (``framework_wait_init`` returns), then systemd gets READY=1.

Scripts, SPDK's tools, systemd and Kubernetes probes all wait for the socket, READY=1 or a
first RPC answer; each of those therefore implies that every listener in the config
accepts. There is no pre-init RPC state (SPDK's ``--wait-for-rpc``): configuration that
must exist before hosts connect belongs in the config file; changes at run time go
through RPC (``load_config`` included). Shutdown runs in reverse.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import resource
import signal
from typing import Any

from . import __version__
from .bdev import EXAMINERS, MODULES, Bdev, BdevRegistry
from .config import ConfigError, Settings, prepare_rpc_access, replay
from .errors import AlreadyExists, NoSuchDevice, RpcError
from .keyring import Keyring
from .nvme.auth import DhchapOptions
from .nvme.controller import ControllerTable
from .nvme.dh_workers import DhWorkers
from .nvme.subsystem import NOT_IN_DISCOVERY_LOG, ListenAddress, Subsystem, SubsystemRegistry
from .reactor import DEFAULT_POLL_MODE, ReactorPool, default_cores
from .rpc import (
    Dispatcher,
    UnixRpcServer,
    build_http_app,
    http_guard,
    load_methods,
    parse_http_address,
    server_ssl_context,
)
from .rpc_guard import guarded_site
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
        self.keyring = Keyring()
        self.dhchap = DhchapOptions()  # DH-HMAC-CHAP digests/groups (nvmf_set_config)
        self.reactors = ReactorPool(
            self.settings.cores or default_cores(),
            pin=self.settings.pin,
            busy_poll_us=self.settings.busy_poll_us,
            idle_poll_us=self.settings.idle_poll_us,
            device_wait_us=self.settings.device_wait_us,
            adaptive_window=self.settings.adaptive_window,
            host_wait_us=self.settings.host_wait_us,
            poll_modes=(DEFAULT_POLL_MODE if self.settings.poll_mode is None
                        else self.settings.poll_mode),
        )
        # DH-HMAC-CHAP exponentiations off the reactors; no process until the first one
        self.dh_workers = self._dh_workers()
        self.dispatcher = Dispatcher(self)
        self.started = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tcp: Any = None  # transport_tcp.TcpTransport once started
        self._unix: UnixRpcServer | None = None
        self._http_runner: Any = None
        self.http_port: int | None = None
        self._stop_event: asyncio.Event | None = None
        self.metrics_registry: Any = None
        # set once everything in the config serves (start() step 6); framework_wait_init
        # waits for it. Created on first use so a Target built outside a loop works.
        self._ready: asyncio.Event | None = None

    @property
    def ready(self) -> asyncio.Event:
        """Set when every listener accepts and the RPC servers are up (cleared on stop)."""
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    def _dh_workers(self) -> DhWorkers:
        """On the CPUs the reactors are not pinned to, when there are such CPUs."""
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            allowed = set()
        free = allowed - {r.core for r in self.reactors} if self.settings.pin else allowed
        return DhWorkers(self.settings.auth_workers, cpus=free or allowed or None)

    # ---- config ----
    async def apply_config(self, doc: dict[str, Any], source: str) -> int:
        return await replay(self, doc, source)

    def save_config(self) -> dict[str, Any]:
        """The running state as a config; replaying it rebuilds the same target."""
        # None: another bdev of the same create call writes it (split parts, remote namespaces)
        bdev_calls = [e for b in self.bdevs if (e := b.config_entry()) is not None]
        # (rate limits after every bdev: a limited one may be made by another's call)
        bdev_calls += [{"method": "bdev_set_qos_limit",
                        "params": {"name": b.name, **b.qos.limits.describe()}}
                       for b in self.bdevs if b.qos is not None]
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
                for host in sorted(ns.visible_hosts or ()):
                    nvmf_calls.append({"method": "nvmf_ns_add_host", "params": {
                        "nqn": sub.nqn, "nsid": ns.nsid, "host": host}})
            for host, extra in sub.hosts.items():
                nvmf_calls.append({"method": "nvmf_subsystem_add_host",
                                   "params": {"nqn": sub.nqn, "host": host, **extra}})
            for addr in sub.listeners:
                lp: dict[str, Any] = {"nqn": sub.nqn, "listen_address": addr.describe()}
                if addr in self.subsystems.secure:
                    lp["secure_channel"] = True
                nvmf_calls.append({"method": "nvmf_subsystem_add_listener", "params": lp})
            for (addr, grp), state in sorted(sub.ana_states.items(), key=lambda kv: (
                    str(kv[0][0]), kv[0][1])):
                nvmf_calls.append({"method": "nvmf_subsystem_listener_set_ana_state", "params": {
                    "nqn": sub.nqn, "listen_address": addr.describe(), "ana_state": state,
                    "anagrpid": grp}})
        for ref in self.subsystems.referrals:
            nvmf_calls.append({"method": "nvmf_discovery_add_referral", "params": dict(ref)})
        if not self.dhchap.is_default():
            nvmf_calls.insert(0, {"method": "nvmf_set_config", "params": self.dhchap.describe()})
        sections = [
            {"subsystem": "bdev", "config": bdev_calls},
            {"subsystem": "nvmf", "config": nvmf_calls},
        ]
        if len(self.keyring):  # key names and paths only: the material stays in the files
            sections.insert(0, {"subsystem": "keyring", "config": [
                {"method": "keyring_file_add_key", "params": {"name": k.name, "path": k.path}}
                for k in self.keyring]})
        return {"blocktarget": self.settings.describe(), "subsystems": sections}

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
        for bdev in bdevs:
            for examine in EXAMINERS:  # e.g. an lvol store on it comes back
                await _maybe_await(examine(self, bdev))
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
        """Tell connected hosts: namespace changes to the subsystem's controllers, an
        ANA state change to the controllers connected through that listener (AEN, and
        their queues' inaccessible sets), anything else to discovery controllers (their
        log page changed)."""
        from .nvme import spec

        for ctrl in self.controllers.all():
            loop = ctrl.reactor.loop
            if loop is None or ctrl.dead:
                continue
            if ctrl.discovery:
                if event not in NOT_IN_DISCOVERY_LOG:  # (ANA, masking, sizes)
                    loop.call_soon_threadsafe(
                        ctrl.post_event, spec.AsyncEventType.NOTICE,
                        spec.AsyncEventNotice.DISCOVERY_LOG_CHANGE, spec.LogPage.DISCOVERY)
            elif ctrl.subsystem is not sub:
                continue
            elif event in ("ns_added", "ns_removed", "ns_resized"):
                if not detail.visible_to(ctrl.hostnqn):
                    continue  # a masked namespace this host does not see
                ctrl.refresh_ana()  # the namespace's group may be inaccessible here
                loop.call_soon_threadsafe(ctrl.ns_changed, detail.nsid)
            elif event == "ns_visibility":
                ns, host = detail
                if ctrl.hostnqn == host:
                    ctrl.refresh_ana()
                    loop.call_soon_threadsafe(ctrl.ns_changed, ns.nsid)
            elif event == "ana_changed" and ctrl.listener == detail:
                ctrl.ana_changed()

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
        """Start serving, in the order of the module docstring; on any failure everything
        started so far is stopped again and the error raised."""
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if not self.dh_workers.enabled and self.settings.auth_workers != 0:
            self.dh_workers = self._dh_workers()  # (a restart)
        try:
            self.reactors.start()
        except OSError as exc:
            raise StartupError(f"cannot start reactors: {exc}") from None
        self.started = True
        try:
            if self.settings.metrics:
                from .metrics import make_registry

                self.metrics_registry = make_registry(self)
            unix = self._unix_server()
            if unix is not None:
                # before anything binds: "in use by another running target" or "not a
                # socket" is the clearer message, and nothing is served in vain
                await self._check_unix(unix)
            from .transport_tcp import TcpTransport

            self.tcp = TcpTransport(self)
            for addr in sorted(self.subsystems.all_listen_addresses(), key=str):
                try:
                    await self.tcp.listen(addr)
                except RpcError as exc:  # worded already ("cannot listen on ...: address ...")
                    raise StartupError(exc.message) from None
            await self._start_http()
            if unix is not None:
                await self._start_unix(unix)
        except BaseException:
            await self.stop()
            raise
        self.ready.set()
        log.info(
            "blocktarget %s started: %d reactor(s) on cores %s, %d bdev(s), %d subsystem(s)",
            self.version, len(self.reactors), [r.core for r in self.reactors],
            len(self.bdevs), len(self.subsystems),
        )

    def _unix_server(self) -> UnixRpcServer | None:
        s = self.settings
        if not s.rpc_unix:
            return None
        return UnixRpcServer(self.dispatcher, s.rpc_unix,
                             max_request_bytes=s.rpc_max_request_bytes,
                             max_connections=s.rpc_max_connections,
                             request_timeout=s.rpc_request_timeout_sec,
                             idle_timeout=s.rpc_idle_timeout_sec)

    async def _check_unix(self, unix: UnixRpcServer) -> None:
        try:
            await unix.check_path()
        except OSError as exc:
            raise StartupError(f"cannot serve RPC on {unix.path}: {_why(exc)}") from None

    async def _start_unix(self, unix: UnixRpcServer) -> None:
        try:
            await unix.start()
        except OSError as exc:
            raise StartupError(f"cannot serve RPC on {unix.path}: {_why(exc)}") from None
        self._unix = unix
        log.info("RPC listening on unix:%s", unix.path)

    async def _start_http(self) -> None:
        s = self.settings
        if s.rpc_http:
            from aiohttp import web

            host, port = parse_http_address(s.rpc_http)
            try:  # second line of defence for in-process users; the CLI checked already
                prepare_rpc_access(s, "settings")
            except ConfigError as exc:
                raise StartupError(str(exc)) from None
            metrics = None
            if self.metrics_registry is not None:
                from .metrics import metrics_handler

                metrics = metrics_handler(self.metrics_registry, self.reactors.fold_stats)
            guard = http_guard(s.rpc_max_connections, s.rpc_request_timeout_sec)
            app = build_http_app(self.dispatcher, token=s.rpc_token,
                                 max_request_bytes=s.rpc_max_request_bytes,
                                 max_connections=s.rpc_max_connections, metrics=metrics,
                                 guard=guard, request_timeout=s.rpc_request_timeout_sec)
            ssl_ctx = None
            if s.rpc_tls_cert and s.rpc_tls_key:
                try:
                    ssl_ctx = server_ssl_context(s.rpc_tls_cert, s.rpc_tls_key,
                                                 s.rpc_tls_client_ca)
                except (OSError, ValueError) as exc:
                    raise StartupError(f"RPC TLS: {exc}") from None
            # idle keep-alive connections: HTTP clients reconnect at will, so aiohttp's
            # usual 75 s unless an idle timeout is set. Lingering (reading the unread
            # rest of a refused or timed-out body so the client sees our answer before
            # the close) 2 s, not aiohttp's 10: a slow sender is held that much longer.
            runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                   keepalive_timeout=s.rpc_idle_timeout_sec or 75,
                                   lingering_time=2.0)
            await runner.setup()
            site = guarded_site(runner, guard, host, port, ssl_context=ssl_ctx)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                raise StartupError(f"cannot serve RPC on http://{s.rpc_http}: {_why(exc)}") from None
            self._http_runner = runner
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.http_port = server.sockets[0].getsockname()[1]
            log.info("RPC listening on %s://%s (metrics at /metrics%s)",
                     "https" if ssl_ctx else "http", s.rpc_http,
                     "; bearer token required" if s.rpc_token else "")

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    async def wait_stopped(self) -> None:
        assert self._stop_event is not None
        await self._stop_event.wait()

    async def stop(self) -> None:
        """Stop accepting, close connections (outstanding I/O completes), then the rest.

        The reverse of start(): the Unix socket goes first, so while it exists the
        listeners still accept."""
        if self._ready is not None:
            self._ready.clear()
        if self._unix is not None:
            await self._unix.stop()
            self._unix = None
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        if self.tcp is not None:
            await self.tcp.close()
            self.tcp = None
        if self.started:
            self.reactors.stop()
            self.started = False
        # after the connections: their pending jobs were cancelled or are dropped
        await asyncio.to_thread(self.dh_workers.shutdown)
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
    raise_fd_limit()
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


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force.

    Every NVMe/TCP connection is a socket and the transport admits thousands of them
    (max_connections), while many systems start processes with a soft limit of 1024:
    accept() would fail with EMFILE far below the configured limit (found by the soak
    test's 1,000 concurrent hosts, each an admin and an I/O queue). The hard limit is
    what the operator allows (systemd LimitNOFILE=); the soft one is only a default, so
    servers raise it, as this does. Never lowers it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, want, exc)
    return soft


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
