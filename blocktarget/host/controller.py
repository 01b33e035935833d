"""An NVMe-oF controller as the host sees it: an admin queue, N I/O queues, keep-alive.

The bring-up order is the one the Linux host follows (``drivers/nvme/host/fabrics.c``,
``core.c``): admin Connect with the dynamic controller ID, Property Get CAP and VS,
Property Set CC.EN=1 and wait for CSTS.RDY, Identify Controller, Set Features Number
of Queues, Asynchronous Event Configuration, then one Connect per I/O queue naming the
controller ID the admin Connect returned. Teardown mirrors it: I/O queues first, then
CC.SHN=normal on the admin queue, wait for CSTS.SHST=complete, close.

Decisions:

* The admin queue has 32 entries (Linux ``NVME_AQ_DEPTH``) and KATO goes in the admin
  Connect only; the I/O queue Connects carry none, as Linux sends them.
* A queue of N entries carries at most N-1 commands (the SQ ring's full condition), so
  ``queue_size`` commands in flight need ``queue_size + 1`` entries; ``perf`` asks for
  that, within CAP.MQES.
* Keep Alive is sent every KATO/2. A keep-alive that fails or times out closes the
  controller: the target will have torn it down, and every later command would fail
  more confusingly.
* Reads and writes go to the I/O queues round robin; ``qid=`` pins one (tests).
* Transfers larger than MDTS are not split here: the caller (``perf``, tests of the MDTS
  status) decides; :attr:`Controller.max_transfer` says what the controller accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from blocktarget.nvme import spec, structs

from .auth import AuthenticationError, HostSecrets, authenticate
from .connection import ADMIN_ICD_MAX, Completion, NvmeStatusError, QueuePair, Response
from .tls import HostPsk

__all__ = [
    "Controller",
    "NamespaceInfo",
    "connect",
    "default_hostid",
    "default_hostnqn",
    "discover",
    "read_discovery_log",
]

log = logging.getLogger(__name__)

ADMIN_QUEUE_SIZE = 32
DEFAULT_ADMIN_TIMEOUT = 30.0
_HOSTNQN_FILE = "/etc/nvme/hostnqn"
_HOSTID_FILE = "/etc/nvme/hostid"
_FABRICS = spec.FABRICS_OPCODE


@functools.cache
def _process_uuid() -> uuid.UUID:
    return uuid.uuid4()


def default_hostnqn() -> str:
    """/etc/nvme/hostnqn when present (what nvme-cli uses), else a UUID NQN that stays
    the same for the life of this process, so reconnects look like the same host."""
    with contextlib.suppress(OSError):
        with open(_HOSTNQN_FILE, encoding="utf-8") as f:
            value = f.read().strip()
        if value:
            return value
    return f"{spec.NQN_UUID_PREFIX}{_process_uuid()}"


def default_hostid(hostnqn: str | None = None) -> bytes:
    """/etc/nvme/hostid, else the UUID inside a UUID-form host NQN, else the process UUID."""
    with contextlib.suppress(OSError, ValueError):
        with open(_HOSTID_FILE, encoding="utf-8") as f:
            return uuid.UUID(f.read().strip()).bytes
    if hostnqn and hostnqn.startswith(spec.NQN_UUID_PREFIX):
        with contextlib.suppress(ValueError):
            return uuid.UUID(hostnqn[len(spec.NQN_UUID_PREFIX):]).bytes
    return _process_uuid().bytes


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    nsid: int
    nsze: int  # blocks
    ncap: int
    lba_size: int
    ms: int  # metadata bytes per block

    @property
    def size_bytes(self) -> int:
        return self.nsze * self.lba_size


@dataclass(slots=True)
class _Options:
    addr: str
    port: int
    subnqn: str
    hostnqn: str
    hostid: bytes
    nr_io_queues: int
    queue_size: int
    kato_ms: int
    hdgst: bool
    ddgst: bool
    disable_sqflow: bool
    timeout: float
    dhchap: HostSecrets | None = None  # DH-HMAC-CHAP keys (--dhchap-secret ...)
    tls: HostPsk | None = None  # TLS 1.3 PSK of every queue (--tls-key)

    def tls_params(self) -> tuple[bytes, bytes, int] | None:
        return self.tls.for_queue(self.hostnqn, self.subnqn) if self.tls else None


class Controller:
    """A connected controller; build with :func:`connect`."""

    def __init__(self, opts: _Options) -> None:
        self.opts = opts
        self.admin_q: QueuePair | None = None
        self.io_queues: list[QueuePair] = []
        self.cntlid = 0
        self.cap = 0
        self.vs = 0
        self.cc = 0
        self.id_ctrl: dict[str, Any] = {}
        self.max_transfer = 0  # bytes, 0 = no limit
        self.io_queue_size = 0
        self._rr = 0
        self._ka_task: asyncio.Task[None] | None = None
        self._ns: dict[int, NamespaceInfo] = {}
        self._closed = False

    # ---------------------------------------------------------------- properties

    @property
    def subnqn(self) -> str:
        return self.opts.subnqn

    @property
    def hostnqn(self) -> str:
        return self.opts.hostnqn

    @property
    def is_discovery(self) -> bool:
        return self.opts.subnqn == spec.DISCOVERY_NQN

    @property
    def connected(self) -> bool:
        return not self._closed and self.admin_q is not None and not self.admin_q.closed

    @property
    def mqes(self) -> int:
        """Maximum queue entries (1's based) from CAP."""
        return (self.cap & spec.CAP_MQES_MASK) + 1

    def __repr__(self) -> str:
        return (f"<Controller {self.opts.subnqn} at {self.opts.addr}:{self.opts.port} "
                f"cntlid {self.cntlid} io_queues {len(self.io_queues)}>")

    # ---------------------------------------------------------------- bring-up

    async def _fabrics_connect(self, qp: QueuePair, qid: int, sqsize: int, kato: int,
                               cntlid: int) -> int:
        o = self.opts
        cattr = spec.CONNECT_CATTR_DISABLE_SQFLOW if o.disable_sqflow else 0
        data = structs.build_connect_data(o.hostid, cntlid, o.subnqn, o.hostnqn)
        r = await qp.submit(
            _FABRICS, spec.FabricsType.CONNECT,
            cdw10=spec.CONNECT_RECFMT | (qid << 16), cdw11=sqsize | (cattr << 16), cdw12=kato,
            data_out=data, timeout=o.timeout,
        )
        st = r.completion.status
        if st:
            what = f"Connect (qid {qid}) to {o.subnqn}"
            if (spec.status_sct(st) == spec.Sct.COMMAND_SPECIFIC
                    and spec.status_sc(st) == spec.FabricsStatus.CONNECT_INVALID_PARAM):
                dw0 = r.completion.dw0
                where = "data" if dw0 & spec.CONNECT_IATTR_DATA else "command"
                what += f" [invalid parameter at {where} offset {dw0 & 0xFFFF}]"
            raise NvmeStatusError(st, what, fabrics=True, completion=r.completion)
        if r.completion.dw0 & (spec.CONNECT_AUTHREQ_ATR | spec.CONNECT_AUTHREQ_ASCR):
            if o.dhchap is None:
                raise AuthenticationError(
                    f"{o.subnqn} requires DH-HMAC-CHAP authentication (qid {qid}); "
                    "give a host secret (--dhchap-secret)", 0)
            await authenticate(qp, o.dhchap, hostnqn=o.hostnqn, subnqn=o.subnqn,
                               timeout=o.timeout)
        return r.completion.dw0 & 0xFFFF

    async def reauthenticate(self) -> None:
        """Run DH-HMAC-CHAP again on every queue (admin and I/O) while I/O goes on,
        as the Linux host does when its secret changes."""
        o = self.opts
        if o.dhchap is None:
            raise ValueError("no DH-HMAC-CHAP secret configured")
        queues = [q for q in (self.admin_q, *self.io_queues) if q is not None]
        await asyncio.gather(*(authenticate(q, o.dhchap, hostnqn=o.hostnqn, subnqn=o.subnqn,
                                            timeout=o.timeout) for q in queues))

    def set_dhchap(self, secret: str, ctrl_secret: str | None = None) -> None:
        """Change the keys used by the next (re-)authentication."""
        self.opts.dhchap = HostSecrets.parse(secret, ctrl_secret)

    async def _bring_up(self) -> None:
        o = self.opts
        admin = await QueuePair.open(o.addr, o.port, qid=0, depth=ADMIN_QUEUE_SIZE - 1,
                                     hdgst=o.hdgst, ddgst=o.ddgst, timeout=o.timeout,
                                     tls=o.tls_params())
        admin.icd_max = ADMIN_ICD_MAX
        self.admin_q = admin
        try:
            self.cntlid = await self._fabrics_connect(
                admin, 0, ADMIN_QUEUE_SIZE - 1, o.kato_ms, spec.CNTLID_DYNAMIC
            )
            self.cap = await self.property_get(spec.Property.CAP, 8)
            self.vs = await self.property_get(spec.Property.VS)
            await self._enable()
            self.id_ctrl = await self.identify_ctrl()
            mdts = self.id_ctrl["mdts"]
            mpsmin = (self.cap >> spec.CAP_MPSMIN_SHIFT) & 0xF
            self.max_transfer = (1 << (12 + mpsmin + mdts)) if mdts else 0
            if not self.is_discovery:
                await self._setup_io_queues()
            if o.kato_ms:
                self._ka_task = asyncio.get_running_loop().create_task(
                    self._keep_alive_loop(), name=f"keep-alive {o.subnqn}"
                )
        except BaseException:
            await self._teardown(shutdown=False)
            raise

    async def _enable(self) -> None:
        cc = (spec.CcCss.NVM << spec.CC_CSS_SHIFT) | (spec.IOSQES_NVM << spec.CC_IOSQES_SHIFT) \
            | (spec.IOCQES_NVM << spec.CC_IOCQES_SHIFT) | spec.CC_EN
        await self.property_set(spec.Property.CC, cc)
        self.cc = cc
        # CAP.TO is in 500 ms units: the worst case the controller promises for RDY.
        to = max(((self.cap >> spec.CAP_TO_SHIFT) & 0xFF) * 0.5, 1.0)
        await self._wait_csts(lambda v: bool(v & spec.CSTS_RDY), min(to, 60.0), "CSTS.RDY")

    async def _wait_csts(self, done: Any, timeout: float, what: str) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.001
        while True:
            csts = await self.property_get(spec.Property.CSTS)
            if csts & spec.CSTS_CFS:
                raise ConnectionError(
                    f"controller fatal status (CSTS {csts:#x}) waiting for {what}")
            if done(csts):
                return csts
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what} (CSTS {csts:#x})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _setup_io_queues(self) -> None:
        o = self.opts
        self.io_queues = []
        want = o.nr_io_queues
        if want <= 0:
            return
        r = await self.set_features(spec.FeatureId.NUM_QUEUES,
                                    (want - 1) | ((want - 1) << spec.NUM_QUEUES_NCQR_SHIFT))
        granted = min((r.dw0 & 0xFFFF) + 1, (r.dw0 >> 16) + 1)
        n = min(want, granted)
        if n < want:
            log.info("%s: asked for %d I/O queues, controller granted %d", o.subnqn, want, n)
        oaes = self.id_ctrl.get("oaes", 0)
        aen = oaes & (spec.AenConfig.NS_ATTR | spec.AenConfig.FW_ACTIVATION
                      | spec.AenConfig.ANA_CHANGE)
        if aen:
            await self.set_features(spec.FeatureId.ASYNC_EVENT, aen)
        qsize = max(2, min(o.queue_size, self.mqes))
        maxcmd = self.id_ctrl.get("maxcmd", 0)
        if maxcmd:
            qsize = min(qsize, maxcmd + 1)
        self.io_queue_size = qsize
        ioccsz = self.id_ctrl.get("ioccsz", 0)
        icd = max(0, ioccsz * 16 - spec.SQE_SIZE)
        if self.id_ctrl.get("icdoff", 0):
            # Data at an offset inside the capsule would need padding we do not send;
            # every known target uses 0, so just use R2T for such a controller.
            icd = 0

        async def one(qid: int) -> QueuePair:
            qp = await QueuePair.open(o.addr, o.port, qid=qid, depth=qsize - 1, hdgst=o.hdgst,
                                      ddgst=o.ddgst, timeout=o.timeout, tls=o.tls_params())
            qp.icd_max = icd
            try:
                await self._fabrics_connect(qp, qid, qsize - 1, 0, self.cntlid)
            except BaseException:
                qp.close()
                raise
            return qp

        results = await asyncio.gather(*(one(q) for q in range(1, n + 1)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        self.io_queues = [r for r in results if isinstance(r, QueuePair)]
        if errors:
            raise errors[0]

    async def _keep_alive_loop(self) -> None:
        kato = self.opts.kato_ms / 1000.0
        interval = kato / 2
        try:
            while True:
                await asyncio.sleep(interval)
                if self.admin_q is None or self.admin_q.closed:
                    return
                r = await self.admin_q.submit(spec.AdminOpcode.KEEP_ALIVE, timeout=kato)
                if r.completion.status:
                    raise NvmeStatusError(r.completion.status, "Keep Alive")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("%s: keep-alive failed, closing the controller: %s", self.opts.subnqn, exc)
            self._ka_task = None
            await self._teardown(shutdown=False)

    # ---------------------------------------------------------------- teardown

    async def disconnect(self, *, timeout: float = 5.0) -> None:
        """Orderly shutdown: I/O queues (Fabrics Disconnect when OFCS says it is
        supported), then CC.SHN=normal and wait for CSTS.SHST=complete, then close."""
        await self._teardown(shutdown=True, timeout=timeout)

    async def close(self) -> None:
        """Abrupt close: drop the connections without telling the controller."""
        await self._teardown(shutdown=False)

    async def _teardown(self, *, shutdown: bool, timeout: float = 5.0) -> None:
        ka, self._ka_task = self._ka_task, None
        if ka is not None and ka is not asyncio.current_task():
            ka.cancel()
            with contextlib.suppress(BaseException):
                await ka
        queues, self.io_queues = self.io_queues, []
        if shutdown and self.id_ctrl.get("ofcs", 0) & spec.Ofcs.DISCONNECT:
            await asyncio.gather(*(self._fabrics_disconnect(q, timeout) for q in queues),
                                 return_exceptions=True)
        for q in queues:
            q.close()
        admin = self.admin_q
        if admin is not None and not admin.closed and shutdown and self.cc & spec.CC_EN:
            try:
                async with asyncio.timeout(timeout):
                    await self.property_set(spec.Property.CC,
                                            self.cc | (spec.Shn.NORMAL << spec.CC_SHN_SHIFT))
                    rtd3e = self.id_ctrl.get("rtd3e", 0) / 1e6
                    await self._wait_csts(
                        lambda v: (v & spec.CSTS_SHST_MASK) >> spec.CSTS_SHST_SHIFT
                        == spec.Shst.COMPLETE,
                        max(rtd3e, timeout), "shutdown (CSTS.SHST)",
                    )
            except (Exception, TimeoutError) as exc:
                log.warning("%s: shutdown did not complete cleanly: %s", self.opts.subnqn, exc)
        self._closed = True
        if admin is not None:
            admin.close()
        for q in [*queues, *([admin] if admin else [])]:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await q.wait_closed()

    async def _fabrics_disconnect(self, qp: QueuePair, timeout: float) -> None:
        if qp.closed:
            return
        with contextlib.suppress(Exception):
            await qp.submit(_FABRICS, spec.FabricsType.DISCONNECT, cdw10=spec.CONNECT_RECFMT,
                            timeout=timeout)

    async def reconnect(self) -> None:
        """Drop every connection and bring the controller up again with the same
        host identity and options (a new controller ID on the target)."""
        await self._teardown(shutdown=False)
        self._closed = False
        self._ns.clear()
        self.cc = 0
        await self._bring_up()

    async def __aenter__(self) -> Controller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    # ---------------------------------------------------------------- raw commands

    def _admin(self) -> QueuePair:
        q = self.admin_q
        if q is None or self._closed:
            raise ConnectionError(f"controller {self.opts.subnqn} is not connected")
        return q

    def _io_queue(self, qid: int | None) -> QueuePair:
        qs = self.io_queues
        if not qs:
            raise ConnectionError(f"controller {self.opts.subnqn} has no I/O queues")
        if qid is not None:
            if not 1 <= qid <= len(qs):
                raise ValueError(f"no I/O queue {qid} (have 1..{len(qs)})")
            return qs[qid - 1]
        self._rr = (self._rr + 1) % len(qs)
        return qs[self._rr]

    async def admin(self, opcode: int, nsid: int = 0, cdw10: int = 0, cdw11: int = 0,
                    cdw12: int = 0, cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, *,
                    data_out: Any = None, in_len: int = 0, in_buf: Any = None,
                    check: bool = True, timeout: float | None = None, **kw: Any) -> Response:
        """Any admin (or fabrics, opcode 7Fh with the fctype as ``nsid``) command.
        ``check=False`` returns failed statuses instead of raising NvmeStatusError."""
        r = await self._admin().submit(
            opcode, nsid, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15, data_out=data_out,
            in_len=in_len, in_buf=in_buf,
            timeout=self.opts.timeout if timeout is None else timeout, **kw,
        )
        if check and r.completion.status:
            raise _status_error(r.completion, opcode, nsid, admin=True)
        return r

    async def io(self, opcode: int, nsid: int = 0, cdw10: int = 0, cdw11: int = 0,
                 cdw12: int = 0, cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, *,
                 data_out: Any = None, in_len: int = 0, in_buf: Any = None,
                 check: bool = True, qid: int | None = None, timeout: float | None = None,
                 **kw: Any) -> Response:
        """Any I/O command on an I/O queue (round robin unless ``qid``). A command
        that outlives ``timeout`` (default: the connect timeout, 30 s as Linux's
        io_timeout) tears the queue down, as in the module docstring."""
        r = await self._io_queue(qid).submit(
            opcode, nsid, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15, data_out=data_out,
            in_len=in_len, in_buf=in_buf,
            timeout=self.opts.timeout if timeout is None else timeout, **kw,
        )
        if check and r.completion.status:
            raise _status_error(r.completion, opcode, nsid, admin=False)
        return r

    async def property_get(self, offset: int, size: int = 4) -> int:
        r = await self.admin(_FABRICS, spec.FabricsType.PROPERTY_GET,
                             cdw10=spec.PropertySize.SIZE_8 if size == 8 else 0, cdw11=offset)
        return r.completion.result64 if size == 8 else r.completion.dw0

    async def property_set(self, offset: int, value: int, size: int = 4) -> None:
        await self.admin(_FABRICS, spec.FabricsType.PROPERTY_SET,
                         cdw10=spec.PropertySize.SIZE_8 if size == 8 else 0, cdw11=offset,
                         cdw12=value & 0xFFFFFFFF, cdw13=value >> 32)

    # ---------------------------------------------------------------- admin helpers

    async def identify(self, cns: int, nsid: int = 0, cntid: int = 0, cnssid: int = 0,
                       csi: int = 0) -> bytes:
        cdw10, cdw11 = structs.encode_identify(cns, cntid, cnssid, csi)
        r = await self.admin(spec.AdminOpcode.IDENTIFY, nsid, cdw10, cdw11,
                             in_len=spec.IDENTIFY_DATA_SIZE)
        return bytes(r.data or b"")

    async def identify_ctrl(self) -> dict[str, Any]:
        return structs.parse_identify_ctrl(await self.identify(spec.Cns.CTRL))

    async def identify_ns(self, nsid: int) -> dict[str, Any]:
        return structs.parse_identify_ns(await self.identify(spec.Cns.NS, nsid))

    async def namespace(self, nsid: int, *, refresh: bool = False) -> NamespaceInfo:
        """Size and block size of a namespace (cached; the I/O helpers need it)."""
        info = self._ns.get(nsid)
        if info is None or refresh:
            ns = await self.identify_ns(nsid)
            if ns["nsze"] == 0:
                raise NvmeStatusError(spec.make_status(0, spec.GenericStatus.INVALID_NS),
                                      f"namespace {nsid}")
            fmt = ns["lbaf"][structs.flbas_index(ns["flbas"])]
            info = NamespaceInfo(nsid, ns["nsze"], ns["ncap"], 1 << fmt.lbads, fmt.ms)
            self._ns[nsid] = info
        return info

    async def active_ns_list(self) -> list[int]:
        out: list[int] = []
        after = 0
        while True:
            page = structs.parse_ns_list(await self.identify(spec.Cns.ACTIVE_NS_LIST, after))
            out.extend(page)
            if len(page) < spec.NS_LIST_MAX:
                return out
            after = page[-1]

    async def ns_descriptors(self, nsid: int) -> list[tuple[int, bytes]]:
        return structs.parse_ns_desc_list(await self.identify(spec.Cns.NS_DESC_LIST, nsid))

    async def get_log_page(self, lid: int, length: int, offset: int = 0,
                           nsid: int = spec.NSID_ALL, rae: bool = False, lsp: int = 0) -> bytes:
        """``length`` bytes of log ``lid`` from ``offset``; split into MDTS-sized reads
        (at most 64 KiB each) so a long discovery log works on any controller."""
        want = (length + 3) & ~3
        step = min(self.max_transfer or 65536, 65536)
        parts: list[bytes] = []
        pos = 0
        while pos < want:
            n = min(step, want - pos)
            cdw10, cdw11, cdw12, cdw13, cdw14 = structs.encode_get_log_page(
                lid, n, offset + pos, lsp=lsp, rae=rae or pos + n < want
            )
            r = await self.admin(spec.AdminOpcode.GET_LOG_PAGE, nsid, cdw10, cdw11, cdw12,
                                 cdw13, cdw14, in_len=n)
            parts.append(bytes(r.data or b""))
            pos += n
        return b"".join(parts)[:length]

    async def get_features(self, fid: int, cdw11: int = 0, *, sel: int = 0, nsid: int = 0,
                           in_len: int = 0) -> Response:
        r = await self.admin(spec.AdminOpcode.GET_FEATURES, nsid,
                             (fid & 0xFF) | (sel << spec.GET_FEATURES_SEL_SHIFT), cdw11,
                             in_len=in_len)
        return r

    async def set_features(self, fid: int, cdw11: int = 0, cdw12: int = 0, *,
                           save: bool = False, nsid: int = 0, data: Any = None,
                           cdw13: int = 0, cdw14: int = 0, cdw15: int = 0) -> Completion:
        r = await self.admin(spec.AdminOpcode.SET_FEATURES, nsid,
                             (fid & 0xFF) | (spec.SET_FEATURES_SAVE if save else 0), cdw11,
                             cdw12, cdw13, cdw14, cdw15, data_out=data)
        return r.completion

    async def smart_log(self, nsid: int = spec.NSID_ALL) -> dict[str, Any]:
        return structs.parse_smart_log(
            await self.get_log_page(spec.LogPage.SMART, spec.SMART_LOG_SIZE, nsid=nsid)
        )

    async def keep_alive(self) -> None:
        await self.admin(spec.AdminOpcode.KEEP_ALIVE)

    async def async_event_request(self) -> Awaitable[int]:
        """Post one Asynchronous Event Request; returns an awaitable of the event's
        CQE dword 0 (type, info, log page: see spec.make_aen_result). It stays
        outstanding until an event happens or the controller goes away (then the
        awaitable raises ConnectionError)."""
        q = self._admin()
        await q.wait_slot()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def done(cpl: Completion | None, data: Any) -> None:
            if fut.done():
                return
            if cpl is None:
                fut.set_exception(data)
            elif cpl.status:
                fut.set_exception(_status_error(cpl, spec.AdminOpcode.ASYNC_EVENT_REQUEST, 0,
                                                admin=True))
            else:
                fut.set_result(cpl.dw0)

        q.submit_cb(done, spec.AdminOpcode.ASYNC_EVENT_REQUEST)
        # Nobody may ever await an AER that is failed by disconnect: do not warn then.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut

    # ---------------------------------------------------------------- I/O helpers

    async def _lba_size(self, nsid: int) -> int:
        info = self._ns.get(nsid)
        if info is None:
            info = await self.namespace(nsid)
        return info.lba_size

    async def read(self, nsid: int, slba: int, nlb: int, buf: Any = None, *,
                   qid: int | None = None) -> memoryview:
        """Read ``nlb`` blocks; into ``buf`` when given (returned as a view of it)."""
        n = nlb * await self._lba_size(nsid)
        r = await self.io(spec.IoOpcode.READ, nsid, slba & 0xFFFFFFFF, slba >> 32,
                          (nlb - 1) & 0xFFFF, in_len=n, in_buf=buf, qid=qid)
        assert r.data is not None
        return r.data[:n]

    async def write(self, nsid: int, slba: int, data: Any, fua: bool = False, *,
                    qid: int | None = None) -> Completion:
        lba = await self._lba_size(nsid)
        size = memoryview(data).nbytes
        if size == 0 or size % lba:
            raise ValueError(f"write of {size} bytes is not a positive multiple of {lba}")
        nlb = size // lba
        cdw12 = ((nlb - 1) & 0xFFFF) | (spec.RwFlags.FUA if fua else 0)
        r = await self.io(spec.IoOpcode.WRITE, nsid, slba & 0xFFFFFFFF, slba >> 32, cdw12,
                          data_out=data, qid=qid)
        return r.completion

    async def compare(self, nsid: int, slba: int, data: Any, *, check: bool = True,
                      qid: int | None = None) -> Completion:
        """Compare; a mismatch raises NvmeStatusError (Compare Failure) unless
        ``check=False``, which returns the completion to inspect."""
        lba = await self._lba_size(nsid)
        nlb = memoryview(data).nbytes // lba
        r = await self.io(spec.IoOpcode.COMPARE, nsid, slba & 0xFFFFFFFF, slba >> 32,
                          (nlb - 1) & 0xFFFF, data_out=data, check=check, qid=qid)
        return r.completion

    async def flush(self, nsid: int = spec.NSID_ALL, *, qid: int | None = None) -> Completion:
        return (await self.io(spec.IoOpcode.FLUSH, nsid, qid=qid)).completion

    async def write_zeroes(self, nsid: int, slba: int, nlb: int, deallocate: bool = False, *,
                           qid: int | None = None) -> Completion:
        cdw12 = ((nlb - 1) & 0xFFFF) | (spec.RwFlags.DEAC if deallocate else 0)
        r = await self.io(spec.IoOpcode.WRITE_ZEROES, nsid, slba & 0xFFFFFFFF, slba >> 32,
                          cdw12, qid=qid)
        return r.completion

    async def dsm_deallocate(self, nsid: int, ranges: Iterable[tuple[int, int]], *,
                             qid: int | None = None) -> Completion:
        """Deallocate (trim) ``ranges`` of (slba, nlb)."""
        rs = [structs.DsmRange(0, nlb, slba) for slba, nlb in ranges]
        if not 1 <= len(rs) <= spec.DSM_MAX_RANGES:
            raise ValueError(f"DSM takes 1..{spec.DSM_MAX_RANGES} ranges")
        r = await self.io(spec.IoOpcode.DATASET_MANAGEMENT, nsid, len(rs) - 1,
                          spec.DsmAttr.AD, data_out=structs.build_dsm_ranges(rs), qid=qid)
        return r.completion


def _status_error(cpl: Completion, opcode: int, nsid: int, *, admin: bool) -> NvmeStatusError:
    if opcode == _FABRICS:
        try:
            name = spec.FabricsType(nsid & 0xFF).name
        except ValueError:
            name = f"fctype {nsid & 0xFF:#x}"
        return NvmeStatusError(cpl.status, f"Fabrics {name}", fabrics=True, completion=cpl)
    try:
        name = (spec.AdminOpcode(opcode) if admin else spec.IoOpcode(opcode)).name
    except ValueError:
        name = f"opcode {opcode:#x}"
    kind = "admin" if admin else "I/O"
    return NvmeStatusError(cpl.status, f"{kind} {name}", completion=cpl)


async def connect(
    addr: str,
    port: int,
    subnqn: str,
    *,
    hostnqn: str | None = None,
    hostid: bytes | str | None = None,
    nr_io_queues: int = 1,
    queue_size: int = 128,
    kato_ms: int = 5000,
    hdgst: bool = False,
    ddgst: bool = False,
    disable_sqflow: bool = False,
    timeout: float = DEFAULT_ADMIN_TIMEOUT,
    dhchap_secret: str | None = None,
    dhchap_ctrl_secret: str | None = None,
    tls_key: str | HostPsk | None = None,
) -> Controller:
    """Connect the admin queue and ``nr_io_queues`` I/O queues to ``subnqn``.

    ``dhchap_secret`` (a ``DHHC-1:..`` key) lets every queue pass DH-HMAC-CHAP when the
    controller asks for it; with ``dhchap_ctrl_secret`` the controller must prove it
    holds that key too (bidirectional). A refusal raises AuthenticationError.

    ``tls_key`` (a ``NVMeTLSkey-1:..`` key, a file holding one, or a HostPsk) runs every
    queue over TLS 1.3 with the PSK derived for this host and subsystem; a refused
    handshake raises ConnectionError.

    ``queue_size`` is the number of entries per I/O queue (capped by CAP.MQES; each
    queue then carries ``queue_size - 1`` commands). ``kato_ms`` 0 disables keep-alive
    (and is what a discovery connection uses). Raises NvmeStatusError when the target
    refuses (e.g. CONNECT_INVALID_HOST), ConnectionError/TimeoutError on transport
    failures.
    """
    hostnqn = hostnqn or default_hostnqn()
    if hostid is None:
        hid = default_hostid(hostnqn)
    elif isinstance(hostid, str):
        hid = uuid.UUID(hostid).bytes
    else:
        hid = bytes(hostid)
    if subnqn == spec.DISCOVERY_NQN:
        nr_io_queues = 0
    if queue_size < 2:
        raise ValueError("queue_size must be at least 2")
    if dhchap_ctrl_secret and not dhchap_secret:
        raise ValueError("a controller secret needs a host secret (dhchap_secret)")
    secrets = HostSecrets.parse(dhchap_secret, dhchap_ctrl_secret) if dhchap_secret else None
    tls = HostPsk.load(tls_key) if isinstance(tls_key, str) else tls_key
    ctrl = Controller(_Options(addr, port, subnqn, hostnqn, hid, nr_io_queues, queue_size,
                               kato_ms, hdgst, ddgst, disable_sqflow, timeout, secrets, tls))
    await ctrl._bring_up()
    return ctrl


async def discover(addr: str, port: int, hostnqn: str | None = None, *,
                   hostid: bytes | str | None = None, hdgst: bool = False, ddgst: bool = False,
                   timeout: float = DEFAULT_ADMIN_TIMEOUT, retries: int = 10,
                   tls_key: str | HostPsk | None = None) -> list[structs.DiscoveryEntry]:
    """Read the discovery log the way a host must: header, then header + entries,
    then the header again; if GENCTR moved the log changed under us, so start over.
    ``tls_key``: through a secure port, with the PSK identity naming the discovery NQN."""
    ctrl = await connect(addr, port, spec.DISCOVERY_NQN, hostnqn=hostnqn, hostid=hostid,
                         kato_ms=0, hdgst=hdgst, ddgst=ddgst, timeout=timeout,
                         tls_key=tls_key)
    try:
        return await read_discovery_log(ctrl, retries=retries)
    finally:
        await ctrl.disconnect()


async def read_discovery_log(ctrl: Controller, *,
                             retries: int = 10) -> list[structs.DiscoveryEntry]:
    """The discovery log of a connected (discovery) controller, read consistently."""
    hdr_len = spec.DISCOVERY_LOG_HEADER_SIZE
    for _ in range(retries):
        head = structs.parse_discovery_log(
            await ctrl.get_log_page(spec.LogPage.DISCOVERY, hdr_len, rae=True)
        )
        if head.numrec == 0:
            entries: Sequence[structs.DiscoveryEntry] = []
        else:
            full = await ctrl.get_log_page(
                spec.LogPage.DISCOVERY, hdr_len + head.numrec * spec.DISCOVERY_LOG_ENTRY_SIZE,
                rae=True,
            )
            log_ = structs.parse_discovery_log(full)
            if log_.genctr != head.genctr:
                continue
            entries = log_.entries
        again = structs.parse_discovery_log(
            await ctrl.get_log_page(spec.LogPage.DISCOVERY, hdr_len)
        )
        if again.genctr == head.genctr:
            return list(entries)
        log.info("discovery log changed while reading (genctr %d -> %d), retrying",
                 head.genctr, again.genctr)
    raise ConnectionError(f"discovery log kept changing over {retries} attempts")
