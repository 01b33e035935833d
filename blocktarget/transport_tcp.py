"""NVMe/TCP transport, socket side: listeners and the hand-off of connections to reactors.

Listening sockets live on the control-plane loop; each accepted socket is handed, as a
plain file object, to one reactor (round robin, or least connections with the
transport's `placement` option) and wrapped there in a queue-pair
protocol, so from then on every byte of that connection is handled by that reactor only.
One listening socket serves every subsystem that lists its address, and the discovery
controller on it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import RpcError
from .tcp_limits import ConnectionLimiter, ConnSlot, DataBudget, budget_for

if TYPE_CHECKING:
    from .app import Target
    from .nvme.subsystem import ListenAddress, Subsystem
    from .reactor import Reactor

log = logging.getLogger(__name__)

ProtocolFactory = Callable[["Target", "Reactor", "ListenAddress"], asyncio.BaseProtocol]


def _default_factory() -> ProtocolFactory:
    from .nvme.qpair import make_qpair_protocol

    return make_qpair_protocol


class Listener:
    def __init__(self, addr: ListenAddress, sock: socket.socket) -> None:
        self.addr = addr
        self.sock = sock
        self.accepted = 0


class TcpTransport:
    def __init__(self, target: Target, protocol_factory: ProtocolFactory | None = None) -> None:
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.listeners: dict[ListenAddress, Listener] = {}
        self.protocol_factory = protocol_factory or _default_factory()
        # live queue pairs, by reactor index; each set is touched only by its reactor
        self.qpairs: dict[int, set[Any]] = {r.index: set() for r in target.reactors}
        self.limiter = ConnectionLimiter()
        # R2T buffer budgets, by reactor index, each touched only by its reactor
        self.budgets: dict[int, DataBudget] = {}
        # TLS outcomes on secure listeners, by reactor index then kind ("established",
        # or a TlsProtocol failure kind), each dict touched only by its reactor
        self.tls_counts: dict[int, dict[str, int]] = {r.index: {} for r in target.reactors}

    # ---- listening ----
    async def listen(self, addr: ListenAddress) -> None:
        if addr in self.listeners:
            return
        family = socket.AF_INET6 if addr.adrfam == "IPv6" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr.traddr, addr.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            msg = ("address already in use" if exc.errno == errno.EADDRINUSE
                   else exc.strerror or str(exc))
            raise RpcError(f"cannot listen on {addr}: {msg}", -(exc.errno or errno.EIO)) from None
        listener = Listener(addr, sock)
        self.listeners[addr] = listener
        self.loop.add_reader(sock.fileno(), self._accept, listener)
        log.info("NVMe/TCP target listening on %s", addr)

    async def unlisten(self, addr: ListenAddress) -> None:
        listener = self.listeners.pop(addr, None)
        if listener is None:
            return
        self.loop.remove_reader(listener.sock.fileno())
        listener.sock.close()
        log.info("stopped listening on %s", addr)

    def _accept(self, listener: Listener) -> None:
        for _ in range(64):  # bounded so one busy port cannot starve the control loop
            try:
                conn, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", listener.addr, exc)
                return
            listener.accepted += 1
            opts = self.target.transports.get("TCP")
            slot = self.limiter.admit(str(peer[0]) if peer else "?",
                                      opts.max_connections if opts else 0,
                                      opts.max_connections_per_address if opts else 0)
            if slot is None:
                # closed before any reactor sees it: costs the host a reconnect, us nothing
                n = self.limiter.refused_global + self.limiter.refused_per_address
                if n & (n - 1) == 0:  # 1, 2, 4, 8...: a flood must not flood the log
                    log.warning("refusing connection from %s on %s: connection limit "
                                "reached (%d open; %d refused so far)", peer, listener.addr,
                                self.limiter.open, n)
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reactor = self.target.reactors.pick(opts.placement if opts else "round_robin")
            reactor.send(self._adopt, reactor, conn, listener.addr, slot)

    async def _adopt(self, reactor: Reactor, conn: socket.socket, addr: ListenAddress,
                     slot: ConnSlot | None = None) -> None:
        """On the reactor: wrap the socket in a queue-pair protocol owned by this reactor
        (behind TLS on a secure listener: the queue pair is made once it is up)."""
        loop = asyncio.get_running_loop()

        def make_qpair() -> asyncio.BaseProtocol:
            proto = self.protocol_factory(self.target, reactor, addr)
            proto.conn_slot = slot  # type: ignore[attr-defined]  # released on unregister
            return proto

        make = make_qpair
        if addr in self.target.subsystems.secure:
            make = self._tls_factory(reactor, addr, conn, slot, make_qpair)

        try:
            await loop.connect_accepted_socket(make, sock=conn)
        except OSError:
            conn.close()
            self.limiter.release(slot)
            reactor.stats.adopt_failed += 1  # never registered: not a live connection

    def _tls_factory(self, reactor: Reactor, addr: ListenAddress, conn: socket.socket,
                     slot: ConnSlot | None, inner: Callable[[], asyncio.BaseProtocol],
                     ) -> Callable[[], asyncio.BaseProtocol]:
        from .nvme.secure_channel import resolver
        from .tls import TlsSession
        from .tls_transport import TlsProtocol

        counts = self.tls_counts.setdefault(reactor.index, {})
        opts = self.target.transports.get("TCP")
        kernel_tls = getattr(opts, "tls_record_layer", "auto") == "auto"
        # the handshake gets what a plain connection gets to send its Connect
        timeout = float(getattr(opts, "stall_timeout_sec", 30))  # (0: never, as there)
        try:
            host, port = conn.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"

        def failed(kind: str, message: str) -> None:
            counts[kind] = counts.get(kind, 0) + 1
            if kind != "record":  # (after the handshake, the queue pair releases it)
                self.limiter.release(slot)
            # names and reasons only: neither OpenSSL's nor our messages carry keys
            log.warning("TLS on %s from %s failed (%s): %s", addr, peer, kind, message)

        def established(session: Any) -> None:
            counts["established"] = counts.get("established", 0) + 1
            layer = session.record_layer
            counts[f"record_layer_{layer}"] = counts.get(f"record_layer_{layer}", 0) + 1
            why = f" ({session.ktls_why})" if layer == "user" and session.ktls_why else ""
            log.info("TLS from %s on %s: %s, identity %s, record layer %s%s", peer, addr,
                     session.cipher, session.identity.decode(errors="replace"), layer, why)

        def make() -> asyncio.BaseProtocol:
            return TlsProtocol(TlsSession(True, resolver(self.target, addr)), inner,
                               on_failure=failed, on_established=established,
                               kernel_tls=kernel_tls, handshake_timeout=timeout)

        return make

    def tls_stats(self) -> dict[str, int]:
        """TLS outcomes on secure listeners, summed over reactors (metrics, RPC)."""
        out: dict[str, int] = {}
        for counts in list(self.tls_counts.values()):
            for k, v in list(counts.items()):
                out[k] = out.get(k, 0) + v
        return out

    # ---- reactors' bookkeeping (called on the reactor that owns the qpair) ----
    def register_qpair(self, reactor: Reactor, qpair: Any) -> None:
        self.qpairs.setdefault(reactor.index, set()).add(qpair)
        reactor.own("connection", qpair)
        reactor.stats.connections_opened += 1

    def unregister_qpair(self, reactor: Reactor, qpair: Any) -> None:
        self.qpairs.get(reactor.index, set()).discard(qpair)
        reactor.disown("connection", qpair)
        reactor.stats.connections_closed += 1
        self.limiter.release(getattr(qpair, "conn_slot", None))

    def budget(self, reactor: Reactor) -> DataBudget:
        """This reactor's share of the R2T buffer budget (made on first use, on it)."""
        b = self.budgets.get(reactor.index)
        if b is None:
            opts = self.target.transports.get("TCP")
            if opts is None:
                from .transport_opts import TransportOptions

                opts = TransportOptions()
            b = self.budgets[reactor.index] = budget_for(
                opts.num_shared_buffers * opts.io_unit_size, len(self.target.reactors),
                opts.max_qpair_buffer_bytes or (1 << 62))
        return b

    async def _close_matching(self, pred: Callable[[Any], bool], reason: str) -> int:
        def close_on(reactor: Reactor) -> int:
            n = 0
            for qp in list(self.qpairs.get(reactor.index, ())):
                if pred(qp):
                    qp.close(reason)
                    n += 1
            return n

        return sum(await self.target.reactors.broadcast(close_on))

    async def disconnect_subsystem(self, sub: Subsystem) -> int:
        return await self._close_matching(
            lambda qp: getattr(qp, "subsystem", None) is sub, f"subsystem {sub.nqn} removed"
        )

    async def disconnect_host(self, sub: Subsystem, hostnqn: str) -> int:
        return await self._close_matching(
            lambda qp: getattr(qp, "subsystem", None) is sub
            and getattr(qp, "hostnqn", None) == hostnqn,
            f"host {hostnqn} removed from {sub.nqn}",
        )

    async def close(self) -> None:
        for addr in list(self.listeners):
            await self.unlisten(addr)
        await self._close_matching(lambda qp: True, "target shutting down")
        # give closing transports a moment to flush on their reactors
        await asyncio.sleep(0.05)

    def connection_count(self) -> int:
        return sum(len(s) for s in self.qpairs.values())
