"""Remote NVMe/TCP namespaces as bdevs, through the blocktarget.host initiator.

`bdev_nvme_attach_controller {name, trtype: "tcp", traddr, trsvcid, subnqn, ...}`
connects to another NVMe/TCP target (another blocktarget, SPDK, Linux nvmet) and makes
one bdev per active namespace, `<name>n<nsid>`. This is how replication composes
(DESIGN §8): a raid1 over remote bdevs, exported again.

Where the pieces live, and why:

* The admin queue (Connect, Identify, Keep Alive) is a `host.Controller` on the control
  loop, the one that runs the RPCs: asyncio objects belong to one loop, and admin
  traffic never sits on the I/O path.
* Each reactor opens its own I/O queue pair (qid = reactor index + 1) on its own loop,
  lazily, the first time a channel is created there: a reactor's I/O to the remote never
  crosses threads, and the target need not be started for attach to work (config
  replay attaches before reactors run). I/O submitted while the queue is connecting
  waits in a backlog; so does I/O beyond the queue's depth.
* When the remote grants fewer I/O queues than there are reactors, reactor k borrows
  the queue of reactor k mod granted: its I/Os are posted to that reactor and their
  completions posted back (two thread hops, correct rather than fast).
* Transfers above the remote's MDTS (or 65536 blocks) are split into several commands.

Failures are reported, not hidden: a lost connection (the remote died) or a failed
Keep Alive (it hangs) marks the controller failed; every I/O in flight and every I/O
after it completes with Namespace Not Ready (NVMe 0x82, without DNR: "not now, maybe
later"), statuses the remote returns are passed up as they are, and both
`bdev_get_bdevs` (driver_specific) and `bdev_nvme_get_controllers` show the state and
the reason. Recovery is explicit: `bdev_nvme_reset_controller` reconnects in place
(a new controller on the remote; the bdevs, and any namespace exporting them, stay),
or detach and attach again. There is no automatic reconnect loop (SPDK's
reconnect_delay_sec / ctrlr_loss_timeout_sec are accepted and ignored).

Not supported: namespaces with metadata (skipped with a warning), namespaces that appear
after attach (no AEN handling; reset or re-attach to pick them up), TLS/PSK and
DH-HMAC-CHAP (the host library has neither).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid as uuidlib
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..bdev import Bdev, BdevIO, IOChannel, IOType, Status, check_block_size
from ..errors import AlreadyExists, InvalidParams, NoSuchDevice, RpcError
from ..host.connection import NvmeStatusError, QueuePair
from ..host.controller import Controller, connect, default_hostnqn
from ..nvme import spec, structs
from ..params import Param, Schema, non_empty

if TYPE_CHECKING:
    from ..app import Target
    from ..reactor import Reactor, ReactorPool

log = logging.getLogger("blocktarget.bdev.nvme_tcp")

NOT_READY = Status.NAMESPACE_NOT_READY
KATO_MS = 10_000  # SPDK's default keep_alive_timeout_ms
DEFAULT_TIMEOUT = 10.0  # seconds for connects and admin commands
QUEUE_SIZE = 128
MAX_NLB = 0x10000  # NLB is a 16-bit 0's based field
MAX_DSM_NLB = 0xFFFFFFFF

# Completion callback of one NVMe command: (bdev status, read data or None).
Done = Callable[[int, Any], None]

SCHEMA = Schema(
    (
        Param("name", str, required=True, check=non_empty),
        Param("trtype", str, required=True),
        Param("traddr", str, required=True, check=non_empty),
        Param("adrfam", str, default="ipv4", choices=("ipv4", "ipv6", "IPv4", "IPv6")),
        Param("trsvcid", (str, int), default="4420"),
        Param("subnqn", str, required=True, check=non_empty),
        Param("hostnqn", str),
        Param("hostid", str),
        Param("hdgst", bool, default=False),
        Param("ddgst", bool, default=False),
        Param("disable_sq_flow_control", bool, default=False),
        Param("fabrics_connect_timeout_us", int),
    ),
    # sent by SPDK's rpc.py or found in SPDK configs; accepted, not modelled (see above)
    extra_ok=frozenset({
        "priority", "hostaddr", "hostsvcid", "multipath",
        "ctrlr_loss_timeout_sec", "reconnect_delay_sec", "fast_io_fail_timeout_sec",
        "max_bdevs", "allow_unrecognized_csi", "multipath_opts", "num_io_queues",
    }),
    refused={"prchk_reftag": "end-to-end protection information (DIF/DIX) is not implemented", "prchk_guard": "end-to-end protection information (DIF/DIX) is not implemented",
             "psk": "no TLS secure channel in this build"},
)


# ---------------------------------------------------------------------------
# per-reactor I/O queue


class ReactorQueue:
    """One I/O queue pair of a remote controller, owned by one reactor's loop."""

    def __init__(self, ctrl: RemoteController, key: int, qid: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.ctrl = ctrl
        self.key = key
        self.qid = qid
        self.loop = loop
        self.generation = ctrl.generation
        self.qp: QueuePair | None = None
        self.state = "connecting"
        self.reason = ""
        self.backlog: deque[tuple[Done, tuple[Any, ...]]] = deque()
        self.commands = 0
        self.errors = 0
        self._task = loop.create_task(self._connect(), name=f"{ctrl.name} qid {qid}")

    async def _connect(self) -> None:
        c = self.ctrl
        try:
            if c.admin is None or c.state != "enabled":
                raise ConnectionError(f"controller is {c.state}: {c.reason}")
            qp = await QueuePair.open(c.host, c.port, qid=self.qid, depth=c.io_queue_size - 1,
                                      hdgst=c.hdgst, ddgst=c.ddgst, timeout=c.timeout)
            qp.icd_max = c.icd_max
            self.qp = qp
            opts = c.admin.opts
            cattr = spec.CONNECT_CATTR_DISABLE_SQFLOW if opts.disable_sqflow else 0
            r = await qp.submit(
                spec.FABRICS_OPCODE, spec.FabricsType.CONNECT,
                cdw10=spec.CONNECT_RECFMT | (self.qid << 16),
                cdw11=(c.io_queue_size - 1) | (cattr << 16),
                data_out=structs.build_connect_data(opts.hostid, c.cntlid, opts.subnqn,
                                                    opts.hostnqn),
                timeout=c.timeout,
            )
            if r.completion.status:
                raise NvmeStatusError(r.completion.status, f"Connect (qid {self.qid})",
                                      fabrics=True)
        except asyncio.CancelledError:
            self.fail("closed while connecting", quiet=True)
            raise
        except Exception as exc:  # any failure to connect is this queue's failure
            self.fail(f"cannot open I/O queue {self.qid}: {exc}")
            return
        if self.state != "connecting":  # closed meanwhile
            qp.close()
            return
        self.state = "ready"
        self._drain()

    # ---- I/O (on self.loop) ----
    def submit(self, done: Done, *cmd: Any) -> None:
        """Send one command: (opcode, nsid, cdw10, cdw11, cdw12, data_out, in_len, in_buf)."""
        if self.state == "ready" and not self.backlog:
            qp = self.qp
            assert qp is not None
            if qp.outstanding < qp.depth:
                self._send(done, cmd)
                return
        if self.state == "failed":
            self.errors += 1
            done(NOT_READY, None)
            return
        self.backlog.append((done, cmd))

    def _send(self, done: Done, cmd: tuple[Any, ...]) -> None:
        opcode, nsid, cdw10, cdw11, cdw12, data_out, in_len, in_buf = cmd
        assert self.qp is not None
        self.commands += 1
        try:
            self.qp.submit_cb(functools.partial(self._completed, done), opcode, nsid, cdw10,
                              cdw11, cdw12, 0, 0, 0, data_out, in_len, in_buf)
        except Exception as exc:  # the connection broke under us
            self.fail(f"I/O queue {self.qid}: {exc}")
            self.errors += 1
            done(NOT_READY, None)

    def _completed(self, done: Done, cpl: Any, data: Any) -> None:
        if cpl is None:  # the connection failed; data is the exception
            self.fail(f"I/O queue {self.qid} lost: {data}")
            self.errors += 1
            done(NOT_READY, None)
            return
        status = cpl.status & 0x7FF  # sct << 8 | sc, as bdev statuses are
        if status:
            self.errors += 1
        done(status, data)
        if self.backlog:
            self._drain()

    def _drain(self) -> None:
        qp = self.qp
        backlog = self.backlog
        while backlog and self.state == "ready" and qp is not None and qp.outstanding < qp.depth:
            done, cmd = backlog.popleft()
            self._send(done, cmd)

    def fail(self, reason: str, *, quiet: bool = False) -> None:
        """Stop using this queue: fail what is in flight and what waits (on self.loop)."""
        if self.state == "failed":
            return
        self.state, self.reason = "failed", reason
        if not quiet:
            log.warning("%s: %s", self.ctrl.name, reason)
        qp, self.qp = self.qp, None
        if qp is not None:
            qp.close()  # outstanding commands complete through _completed(None, exc)
        backlog, self.backlog = self.backlog, deque()
        for done, _ in backlog:
            self.errors += 1
            done(NOT_READY, None)

    def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        self.fail("closed", quiet=True)

    def describe(self) -> dict[str, Any]:
        qp = self.qp
        return {"qid": self.qid, "state": self.state, "reason": self.reason or None,
                "outstanding": qp.outstanding if qp is not None else 0,
                "backlog": len(self.backlog), "commands": self.commands, "errors": self.errors}


# ---------------------------------------------------------------------------
# controller


class RemoteController:
    """One attached remote controller: its admin queue, I/O queues and namespaces."""

    def __init__(self, name: str, params: dict[str, Any], reactors: ReactorPool,
                 registry: dict[str, RemoteController]) -> None:
        self.name = name
        self.registry = registry  # the target's controllers, which this one leaves at detach
        self.params = params
        self.host = params["traddr"]
        self.port = int(params["trsvcid"])
        self.subnqn = params["subnqn"]
        self.hdgst = params["hdgst"]
        self.ddgst = params["ddgst"]
        us = params.get("fabrics_connect_timeout_us")
        self.timeout = us / 1e6 if us else DEFAULT_TIMEOUT
        self.reactors = reactors
        self.admin: Controller | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state = "connecting"
        self.reason = ""
        self.generation = 0
        self.cntlid = 0
        self.granted = 0
        self.io_queue_size = 2
        self.icd_max = 0
        self.max_blocks: dict[int, int] = {}
        self.queues: dict[int, ReactorQueue] = {}  # reactor key -> queue (-1: control loop)
        self.namespaces: dict[int, RemoteNamespace] = {}
        self._watch: asyncio.Task[None] | None = None

    # ---- bring-up (control loop) ----
    async def connect(self) -> None:
        p = self.params
        self.loop = asyncio.get_running_loop()
        try:
            self.admin = await connect(
                self.host, self.port, self.subnqn, hostnqn=p.get("hostnqn") or default_hostnqn(),
                hostid=p.get("hostid"), nr_io_queues=0, kato_ms=KATO_MS, hdgst=self.hdgst,
                ddgst=self.ddgst, disable_sqflow=p["disable_sq_flow_control"],
                timeout=self.timeout,
            )
        except NvmeStatusError as exc:
            raise RpcError(f"cannot attach {self.subnqn} at {self.host}:{self.port}: {exc}",
                           -5) from None  # EIO, as SPDK reports failed attaches
        except (OSError, TimeoutError) as exc:
            raise RpcError(f"cannot attach {self.subnqn} at {self.host}:{self.port}: "
                           f"{exc or type(exc).__name__}", -5) from None
        try:
            await self._setup()
        except BaseException:
            admin, self.admin = self.admin, None
            await admin.close()
            raise
        self.state, self.reason = "enabled", ""
        self._watch = self.loop.create_task(self._watch_admin(self.admin, self.generation))

    async def _setup(self) -> None:
        a = self.admin
        assert a is not None
        self.cntlid = a.cntlid
        if a.is_discovery:
            raise InvalidParams(f"{self.subnqn} is a discovery subsystem, not storage")
        want = len(self.reactors) + 1  # one per reactor, one for the control loop
        cpl = await a.set_features(spec.FeatureId.NUM_QUEUES,
                                   (want - 1) | ((want - 1) << spec.NUM_QUEUES_NCQR_SHIFT))
        self.granted = min(want, (cpl.dw0 & 0xFFFF) + 1, (cpl.dw0 >> 16) + 1)
        if self.granted < want:
            log.info("%s: %d I/O queues granted for %d reactors; some reactors share",
                     self.name, self.granted, len(self.reactors))
        qsize = max(2, min(QUEUE_SIZE, a.mqes))
        if a.id_ctrl.get("maxcmd"):
            qsize = min(qsize, a.id_ctrl["maxcmd"] + 1)
        self.io_queue_size = qsize
        icd = max(0, a.id_ctrl.get("ioccsz", 0) * 16 - spec.SQE_SIZE)
        self.icd_max = 0 if a.id_ctrl.get("icdoff", 0) else icd

    async def _watch_admin(self, admin: Controller, generation: int) -> None:
        """The admin queue closes when the remote goes away or Keep Alive fails."""
        q = admin.admin_q
        if q is None:
            return
        with contextlib.suppress(Exception):
            await q.wait_closed()
        if generation == self.generation and self.state == "enabled":
            reason = f"admin queue lost: {q.error or 'connection closed'}"
            self.mark_failed(reason)

    def mark_failed(self, reason: str) -> None:
        """Fail the controller and every reactor's queue (from the control loop)."""
        self.state, self.reason = "failed", reason
        log.error("%s (%s at %s:%d): %s", self.name, self.subnqn, self.host, self.port, reason)
        for q in list(self.queues.values()):
            _post(q.loop, q.fail, reason)

    async def reset(self) -> None:
        """Reconnect in place: a new controller on the remote, the same bdevs here."""
        if self.admin is None:
            raise NoSuchDevice(f"controller '{self.name}' is not attached")
        self.state, self.reason = "resetting", ""
        if self._watch is not None:
            self._watch.cancel()
        old = dict(self.queues)
        for q in old.values():
            _post(q.loop, q.close)
        try:
            await self.admin.reconnect()
            await self._setup()
        except Exception as exc:
            self.state, self.reason = "failed", f"reset failed: {exc}"
            raise RpcError(f"cannot reset controller '{self.name}': {exc}", -5) from None
        for nsid, bdev in self.namespaces.items():
            info = await self.admin.namespace(nsid, refresh=True)
            if info.nsze != bdev.num_blocks or info.lba_size != bdev.block_size:
                log.warning("%s: namespace %d changed geometry across reset (%d x %d -> %d x "
                            "%d); I/O beyond the new size will fail", self.name, nsid,
                            bdev.num_blocks, bdev.block_size, info.nsze, info.lba_size)
        # Only now: a reactor that reopened its queue before the new controller existed
        # would fail it and keep it failed.
        self.generation += 1  # reactors open fresh queues on their next I/O
        self.state = "enabled"
        assert self.loop is not None
        self._watch = self.loop.create_task(self._watch_admin(self.admin, self.generation))

    async def detach(self) -> None:
        """Close every I/O queue on its reactor, then shut the admin queue down."""
        self.state = "deleting"
        if self._watch is not None:
            self._watch.cancel()
        for key, q in list(self.queues.items()):
            reactor = self.reactors[key] if key >= 0 else None
            if reactor is not None and reactor.running:
                with contextlib.suppress(Exception):
                    await reactor.call(q.close)
            elif key < 0:
                q.close()
        self.queues.clear()
        if self.admin is not None:
            admin, self.admin = self.admin, None
            if admin.connected:
                await admin.disconnect(timeout=2.0)
            else:
                await admin.close()

    # ---- reactors ----
    def queue_for(self, reactor: Reactor | None) -> ReactorQueue:
        """This reactor's queue, opened on first use or after a reset (on that reactor)."""
        key = reactor.index if reactor is not None else -1
        q = self.queues.get(key)
        if q is not None and q.generation == self.generation:
            return q
        if q is not None:
            q.close()
        loop = reactor.loop if reactor is not None else asyncio.get_running_loop()
        assert loop is not None
        qid = key + 1 if key >= 0 else len(self.reactors) + 1
        q = ReactorQueue(self, key, qid, loop)
        if qid > self.granted:  # only the control loop gets here: reactors borrow
            q.fail(f"no I/O queue left for qid {qid} ({self.granted} granted)")
        self.queues[key] = q
        return q

    def owner_of(self, reactor: Reactor | None) -> Reactor | None:
        """The reactor whose queue `reactor` uses (itself unless queues ran short)."""
        if reactor is None or reactor.index < self.granted:
            return reactor
        return self.reactors[reactor.index % max(self.granted, 1)]

    # ---- reporting ----
    def trid(self) -> dict[str, Any]:
        adrfam = "IPv6" if self.params["adrfam"].lower() == "ipv6" else "IPv4"
        return {"trtype": "TCP", "adrfam": adrfam, "traddr": self.host,
                "trsvcid": str(self.port), "subnqn": self.subnqn}

    def describe(self) -> dict[str, Any]:
        """SPDK's bdev_nvme_get_controllers entry, plus queue states and the failure."""
        a = self.admin
        return {
            "name": self.name,
            "ctrlrs": [{
                "state": self.state,
                "failure_reason": self.reason or None,
                "trid": self.trid(),
                "cntlid": self.cntlid,
                "host": {"nqn": a.hostnqn if a else self.params.get("hostnqn"),
                         "addr": "", "svcid": ""},
                "io_queues_granted": self.granted,
                "io_queues": {str(k): q.describe() for k, q in sorted(self.queues.items())},
            }],
        }

    def config_params(self) -> dict[str, Any]:
        p = self.params
        out = {"name": self.name, "trtype": "TCP", "adrfam": p["adrfam"].lower(),
               "traddr": self.host, "trsvcid": str(self.port), "subnqn": self.subnqn,
               "hdgst": self.hdgst, "ddgst": self.ddgst}
        # the identity actually used, so a restart is the same host to an allow-list
        hostnqn = self.admin.hostnqn if self.admin is not None else p.get("hostnqn")
        if hostnqn:
            out["hostnqn"] = hostnqn
        if p.get("hostid"):
            out["hostid"] = p["hostid"]
        if p.get("fabrics_connect_timeout_us"):
            out["fabrics_connect_timeout_us"] = p["fabrics_connect_timeout_us"]
        return out


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run fn on loop from any thread; a closed loop (stopped reactor) has nothing left."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


# ---------------------------------------------------------------------------
# namespace bdev


class _Parts:
    """A transfer split into several commands: one status, one completion."""

    __slots__ = ("io", "left", "status")

    def __init__(self, io: BdevIO, left: int) -> None:
        self.io = io
        self.left = left
        self.status = 0


class RemoteChannel(IOChannel):
    bdev: RemoteNamespace

    def __init__(self, bdev: RemoteNamespace, reactor: Reactor | None) -> None:
        super().__init__(bdev, reactor)
        ctrl = bdev.ctrl
        self.owner = ctrl.owner_of(reactor)
        self.borrowing = self.owner is not reactor
        self.queue: ReactorQueue | None = None if self.borrowing else ctrl.queue_for(reactor)

    def _submit(self, io: BdevIO) -> None:
        if self.borrowing:
            owner = self.owner
            assert owner is not None and owner.loop is not None and self.reactor is not None
            home = self.reactor.loop
            assert home is not None

            def back(status: int) -> None:
                _post(home, self.complete, io, status)

            _post(owner.loop, self._run_on, owner, io, back)
            return
        q = self.queue
        assert q is not None
        if q.generation != self.bdev.ctrl.generation:
            q = self.queue = self.bdev.ctrl.queue_for(self.reactor)
        self._run(q, io, functools.partial(self.complete, io))

    def _run_on(self, owner: Reactor, io: BdevIO, finish: Callable[[int], None]) -> None:
        """On the owner reactor: use its queue for a borrowing reactor's I/O."""
        try:
            self._run(self.bdev.ctrl.queue_for(owner), io, finish)
        except Exception:
            self.bdev.log_exception(io)
            finish(Status.INTERNAL_ERROR)

    def _run(self, q: ReactorQueue, io: BdevIO, finish: Callable[[int], None]) -> None:
        """Turn one BdevIO into NVMe commands on queue q; finish(status) once."""
        ns = self.bdev
        nsid, bs = ns.nsid, ns.block_size
        t = io.type
        if t == IOType.FLUSH:
            q.submit(lambda st, _d: finish(st), spec.IoOpcode.FLUSH, nsid, 0, 0, 0, None, 0, None)
            return
        if t == IOType.UNMAP:
            ranges = []
            lba, left = io.offset_blocks, io.num_blocks
            while left:
                n = min(left, MAX_DSM_NLB)
                ranges.append(structs.DsmRange(0, n, lba))
                lba, left = lba + n, left - n
            chunks = [ranges[i:i + spec.DSM_MAX_RANGES]
                      for i in range(0, len(ranges), spec.DSM_MAX_RANGES)] or [[]]
            parts = _Parts(io, len(chunks))
            for chunk in chunks:
                if not chunk:  # an unmap of zero blocks: nothing to tell the remote
                    self._part_done(parts, finish, 0, None)
                    continue
                q.submit(functools.partial(self._part_done, parts, finish),
                         spec.IoOpcode.DATASET_MANAGEMENT, nsid, len(chunk) - 1,
                         spec.DsmAttr.AD, 0, structs.build_dsm_ranges(chunk), 0, None)
            return
        opcode = _OPCODES.get(t)
        if opcode is None:
            finish(Status.INVALID_OPCODE)
            return
        step = ns.max_blocks if t != IOType.WRITE_ZEROES else MAX_NLB
        total = io.num_blocks
        if total == 0:
            finish(Status.SUCCESS)
            return
        fua = spec.RwFlags.FUA if io.fua and t == IOType.WRITE else 0
        buf = io.buf
        if t == IOType.READ and total > step and buf is None:
            buf = io.buf = memoryview(bytearray(total * bs))
        mv = memoryview(buf).cast("B") if buf is not None else None
        n_parts = -(-total // step)
        parts = _Parts(io, n_parts)
        for k in range(n_parts):
            first = k * step
            nlb = min(step, total - first)
            slba = io.offset_blocks + first
            part = mv[first * bs:(first + nlb) * bs] if mv is not None else None
            cdw12 = (nlb - 1) | fua
            if t == IOType.READ:
                done = (functools.partial(self._read_done, parts, finish) if n_parts == 1
                        else functools.partial(self._part_done, parts, finish))
                q.submit(done, opcode, nsid, slba & 0xFFFFFFFF, slba >> 32, cdw12, None,
                         nlb * bs, part)
            elif t == IOType.WRITE_ZEROES:
                q.submit(functools.partial(self._part_done, parts, finish), opcode, nsid,
                         slba & 0xFFFFFFFF, slba >> 32, cdw12, None, 0, None)
            else:  # WRITE, COMPARE
                q.submit(functools.partial(self._part_done, parts, finish), opcode, nsid,
                         slba & 0xFFFFFFFF, slba >> 32, cdw12, part, 0, None)

    @staticmethod
    def _read_done(parts: _Parts, finish: Callable[[int], None], status: int,
                   data: Any) -> None:
        io = parts.io
        if not status and io.buf is None:
            io.buf = data  # the received payload itself: no copy
        finish(status)

    @staticmethod
    def _part_done(parts: _Parts, finish: Callable[[int], None], status: int,
                   _data: Any) -> None:
        if status and not parts.status:
            parts.status = status
        parts.left -= 1
        if parts.left == 0:
            finish(parts.status)


_OPCODES = {
    IOType.READ: spec.IoOpcode.READ,
    IOType.WRITE: spec.IoOpcode.WRITE,
    IOType.COMPARE: spec.IoOpcode.COMPARE,
    IOType.WRITE_ZEROES: spec.IoOpcode.WRITE_ZEROES,
}


class RemoteNamespace(Bdev):
    def __init__(self, *, ctrl: RemoteController, nsid: int, max_blocks: int,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.ctrl = ctrl
        self.nsid = nsid
        self.max_blocks = max_blocks

    def create_channel(self, reactor: Reactor | None) -> RemoteChannel:
        return RemoteChannel(self, reactor)

    def driver_specific(self) -> dict[str, Any]:
        c = self.ctrl
        a = c.admin
        id_ctrl = a.id_ctrl if a is not None else {}
        return {"nvme": [{
            "trid": c.trid(),
            "ctrlr_data": {
                "cntlid": c.cntlid,
                "vendor_id": f"{id_ctrl.get('vid', 0):#06x}",
                "model_number": str(id_ctrl.get("mn", "")).strip(),
                "serial_number": str(id_ctrl.get("sn", "")).strip(),
                "firmware_revision": str(id_ctrl.get("fr", "")).strip(),
                "subnqn": c.subnqn,
            },
            "ns_data": {"id": self.nsid},
            "state": c.state,
            "failure_reason": c.reason or None,
        }]}

    def config_entry(self) -> dict[str, Any] | None:
        # one attach call recreates every namespace: the first one still here writes it
        first = min((b for b in self.ctrl.namespaces.values() if not b.removed),
                    key=lambda b: b.nsid, default=None)
        if first is not self:
            return None
        return {"method": "bdev_nvme_attach_controller", "params": self.ctrl.config_params()}

    async def destruct(self) -> None:
        c = self.ctrl
        c.namespaces.pop(self.nsid, None)
        if not c.namespaces:
            await c.detach()
            if c.registry.get(c.name) is c:
                del c.registry[c.name]


# ---------------------------------------------------------------------------
# attach / detach (control loop)

# Per target (a load_config scratch target has its own); weak so targets can go away.
_REGISTRIES: weakref.WeakKeyDictionary[Any, dict[str, RemoteController]] = (
    weakref.WeakKeyDictionary())


def controllers(target: Target) -> dict[str, RemoteController]:
    """The remote controllers attached to `target`, by name."""
    return _REGISTRIES.setdefault(target, {})


async def attach(target: Target, params: dict[str, Any]) -> list[str]:
    """Connect, make one bdev per active namespace, register them; all or nothing."""
    name = params["name"]
    ctrls = controllers(target)
    if name in ctrls:
        raise AlreadyExists(f"NVMe controller '{name}' already exists")
    try:
        port = int(params["trsvcid"])
    except ValueError:
        raise InvalidParams(f"parameter 'trsvcid' {params['trsvcid']!r} is not a port") from None
    if not 0 < port < 65536:
        raise InvalidParams(f"parameter 'trsvcid' {port} is not a port")
    if params.get("hostid"):
        try:
            uuidlib.UUID(params["hostid"])
        except ValueError:
            raise InvalidParams("parameter 'hostid' is not a UUID") from None
    ctrl = RemoteController(name, params, target.reactors, ctrls)
    ctrls[name] = ctrl  # reserve the name while connecting
    bdevs: list[RemoteNamespace] = []
    try:
        await ctrl.connect()
        bdevs = await _namespaces(ctrl, target)
        added = []
        try:
            for b in bdevs:
                target.bdevs.add(b)
                added.append(b)
        except RpcError:
            for b in added:
                target.bdevs.remove(b)
            raise
    except BaseException:
        ctrls.pop(name, None)
        ctrl.namespaces.clear()
        await ctrl.detach()
        raise
    log.info("attached %s: %s at %s:%d (cntlid %d, %d I/O queues), bdevs %s", name,
             ctrl.subnqn, ctrl.host, ctrl.port, ctrl.cntlid, ctrl.granted,
             [b.name for b in bdevs])
    return [b.name for b in bdevs]


async def _namespaces(ctrl: RemoteController, target: Target) -> list[RemoteNamespace]:
    a = ctrl.admin
    assert a is not None
    oncs = a.id_ctrl.get("oncs", 0)
    io_types = {IOType.READ, IOType.WRITE, IOType.FLUSH}
    if oncs & spec.Oncs.COMPARE:
        io_types.add(IOType.COMPARE)
    if oncs & spec.Oncs.DSM:
        io_types.add(IOType.UNMAP)
    if oncs & spec.Oncs.WRITE_ZEROES:
        io_types.add(IOType.WRITE_ZEROES)
    model = str(a.id_ctrl.get("mn", "")).strip() or "NVMe disk"
    out: list[RemoteNamespace] = []
    for nsid in await a.active_ns_list():
        info = await a.namespace(nsid)
        bname = f"{ctrl.name}n{nsid}"
        if info.ms:
            log.warning("%s: namespace %d has %d metadata bytes per block; skipped (no "
                        "metadata support)", ctrl.name, nsid, info.ms)
            continue
        if check_block_size(info.lba_size):
            log.warning("%s: namespace %d block size %d unsupported; skipped", ctrl.name, nsid,
                        info.lba_size)
            continue
        if target.bdevs.find(bname) is not None:
            raise AlreadyExists(f"bdev '{bname}' already exists")
        ns_uuid = await _ns_uuid(a, nsid)
        if ns_uuid and any(b.uuid == ns_uuid for b in target.bdevs):
            ns_uuid = ""  # a second path to the same namespace: no multipath here
        max_blocks = MAX_NLB
        if a.max_transfer:
            max_blocks = max(1, min(MAX_NLB, a.max_transfer // info.lba_size))
        b = RemoteNamespace(
            ctrl=ctrl, nsid=nsid, max_blocks=max_blocks,
            name=bname, block_size=info.lba_size, num_blocks=info.nsze, uuid=ns_uuid,
            product_name=model, module="nvme", write_cache=bool(a.id_ctrl.get("vwc", 0) & 1),
            io_types=frozenset(io_types), create_method="bdev_nvme_attach_controller",
        )
        ctrl.namespaces[nsid] = b
        out.append(b)
    return out


async def _ns_uuid(a: Controller, nsid: int) -> str:
    """The namespace's UUID (or NGUID) so hosts of the re-export see the same identity."""
    try:
        descs = await a.ns_descriptors(nsid)
    except (NvmeStatusError, ValueError):
        return ""
    for nidt, value in descs:
        if nidt == spec.NidType.UUID and any(value):
            return str(uuidlib.UUID(bytes=bytes(value)))
    for nidt, value in descs:
        if nidt == spec.NidType.NGUID and any(value):
            return str(uuidlib.UUID(bytes=bytes(value)))
    return ""


async def detach(target: Target, name: str) -> None:
    """Delete every namespace bdev (refused while any is in use), then the controller."""
    ctrl = controllers(target).get(name)
    if ctrl is None:
        raise NoSuchDevice(f"NVMe controller '{name}' does not exist")
    for b in ctrl.namespaces.values():
        target.bdevs.check_removable(b.name)
    if not ctrl.namespaces:
        controllers(target).pop(name, None)
        await ctrl.detach()
        return
    for b in sorted(ctrl.namespaces.values(), key=lambda b: b.nsid):
        await target.delete_bdev(b.name)
