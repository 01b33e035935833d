"""Worker processes for DH-HMAC-CHAP's modular exponentiations, so they stay off the
reactors.

Why: with a DH group a transaction costs the target two exponentiations (our key pair,
then the session secret); for ffdhe8192 that is about 8 ms each on a fast x86 core and
several times more on slower ones, and `cryptography` holds the GIL through them (so
does Python's own `pow`). On a reactor they freeze every connection of that reactor; in
a thread they freeze every reactor, since the GIL is one. The Linux host authenticates
each of its queues, so a host connecting 32 queues used to stall I/O for about a
second. Another process is the only place where the GIL does not matter.

How (decisions, each for a reason):

- A few plain child processes (``python -m blocktarget.nvme.dh_workers``) fed through
  their stdin/stdout pipes, not multiprocessing: its fork start method would copy every
  socket of every connection into the worker (a connection the target closes would stay
  open there) and the locks other threads hold; its spawn and forkserver methods re-run
  the ``__main__`` script of whatever program embeds the Target in each worker. A worker
  here imports nvme.auth and nothing else, and can only run the functions named in
  JOBS, with arguments that are ints and bytes.
- Started at the first job (a target whose hosts use no DH group never starts one), from
  whichever thread submits it: `subprocess` starts a child with vfork, a few ms, and
  the job waits in the pipe while the interpreter comes up. ``auth_workers`` of them
  (default: half the CPUs this process may use, 1 to 4), each with at most
  MAX_INFLIGHT jobs in its pipe, so a write never blocks a reactor; the rest wait in a
  queue that the workers' reader threads feed from. Per-queue ordering in auth_cmd.py
  keeps at most one job per queue, so that queue is bounded by the connections.
- Workers run on the CPUs the target may use minus the reactors' cores when any are
  left (``cpus``; the Target computes it), else on all of them. Set explicitly: a child
  inherits the CPU mask of the thread that starts it, and that is a reactor, pinned to
  its core. They are not niced: measured (bench/RESULTS.md), a worker at nice 10 on a
  machine busy with other work got so little CPU that authentication fell from 19 to 4
  queues/s (a host with many queues then misses the target's deadline for
  authenticating: its keep-alive timeout, 5 s by default on Linux), and the I/O stream
  gained nothing; what protects the reactors is that the GIL is no longer held and
  that the workers run on other cores.
- A worker that dies fails its jobs with `WorkersUnavailable` (the caller computes
  inline: correct, but the stall is back, so it is logged) and is replaced at the next
  job; after MAX_EARLY_DEATHS workers that died before finishing a single job (cannot
  import blocktarget? no processes allowed?) the pool gives up and says so once.
- `shutdown` (with the target) closes the pipes: each worker exits after its current
  job. A target killed outright (SIGKILL, OOM) closes them too, by dying: nothing is
  left behind. Workers ignore SIGINT, SIGTERM and SIGHUP, which reach them with the
  target's (Ctrl-C, `systemctl stop`): their pipe ends them, in order.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import IO, Any

log = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4
MAX_INFLIGHT = 8  # jobs written to one worker's pipe (each < 4 KiB; a pipe holds 64 KiB)
MAX_EARLY_DEATHS = 3
JOBS = ("dh_keypair", "dh_shared")  # nvme.auth functions a worker runs
_FRAME = struct.Struct("<I")


class WorkersUnavailable(RuntimeError):
    """No worker process could run the job; compute it where you are."""


class DhJobError(Exception):
    """The job raised in the worker; the text is ``Type: message``."""


def _allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def default_workers() -> int:
    """Half the CPUs this process may run on (the reactors need the rest), 1 to 4."""
    return max(1, min(MAX_DEFAULT_WORKERS, len(_allowed_cpus()) // 2))


def _write_frame(f: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_FRAME.pack(len(data)) + data)
    f.flush()


def _read_frame(f: IO[bytes]) -> Any:
    """The next object, or None at end of file."""
    head = f.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (n,) = _FRAME.unpack(head)
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


class _Worker:
    def __init__(self, cpus: frozenset[int] | None) -> None:
        import blocktarget

        root = os.path.dirname(os.path.dirname(os.path.abspath(blocktarget.__file__)))
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__, ",".join(map(str, sorted(cpus))) if cpus else ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self.proc.pid
        self.inflight: dict[int, Future[Any]] = {}
        self.finished = 0  # jobs answered
        self.dead = False
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name=f"dh-worker-{self.pid}")
        self.pool: DhWorkers | None = None

    def _read_loop(self) -> None:
        pool = self.pool
        assert pool is not None and self.proc.stdout is not None
        while True:
            try:
                msg = _read_frame(self.proc.stdout)
            except Exception:  # a torn frame: the worker is gone or broken
                msg = None
            if msg is None:
                break
            job_id, ok, value = msg
            with pool._lock:
                fut = self.inflight.pop(job_id, None)
                self.finished += 1
                pool.completed += 1
                pool._pump_locked()
            if fut is not None and fut.set_running_or_notify_cancel():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(DhJobError(value))
        pool._worker_exited(self)


class DhWorkers:
    """The target's DH worker processes (see the module docstring)."""

    def __init__(self, workers: int | None = None, *,
                 cpus: set[int] | frozenset[int] | None = None) -> None:
        self.workers = default_workers() if workers is None else max(0, workers)
        # None: the CPUs of the thread that creates us (not of the one that submits)
        self.cpus = frozenset(cpus) if cpus else frozenset(_allowed_cpus())
        self._lock = threading.Lock()
        self._running: list[_Worker] = []
        self._queue: deque[tuple[int, Future[Any], str, tuple[Any, ...]]] = deque()
        self._ids = itertools.count(1)
        self._closed = False
        self._early_deaths = 0
        self._all: list[_Worker] = []  # every worker started, until reaped (shutdown)
        self.completed = 0  # jobs answered by a worker (tests, diagnostics)

    @property
    def enabled(self) -> bool:
        """False: `submit` returns None and the caller computes inline."""
        return self.workers > 0 and not self._closed

    @property
    def pids(self) -> list[int]:
        """Of the live workers (tests, diagnostics)."""
        with self._lock:
            return [w.pid for w in self._running if not w.dead]

    @property
    def pending(self) -> int:
        """Jobs queued or in a worker (tests, diagnostics)."""
        with self._lock:
            return len(self._queue) + sum(len(w.inflight) for w in self._running)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        """Run ``fn(*args)`` (one of nvme.auth's JOBS) in a worker; None when there are
        no workers (``auth_workers`` 0, given up, or the target stopped). Never blocks
        beyond starting a missing worker (vfork + exec)."""
        name = getattr(fn, "__name__", "")
        if name not in JOBS or getattr(fn, "__module__", "") != "blocktarget.nvme.auth":
            raise ValueError(f"not a DH job: {fn!r}")
        with self._lock:
            if not self.enabled:
                return None
            self._start_locked()
            if not self.enabled:  # could not start any
                return None
            fut: Future[Any] = Future()
            self._queue.append((next(self._ids), fut, name, args))
            self._pump_locked()
            return fut

    def _start_locked(self) -> None:
        while len(self._running) < self.workers:
            try:
                w = _Worker(self.cpus)
            except OSError as exc:
                self._give_up_locked(f"cannot start a worker process: {exc}")
                return
            w.pool = self
            self._running.append(w)
            self._all.append(w)
            w.reader.start()

    def _pump_locked(self) -> None:
        """Write queued jobs to the least busy workers, MAX_INFLIGHT each at most."""
        while self._queue and not self._closed:
            live = [w for w in self._running if not w.dead]
            if not live:
                return
            w = min(live, key=lambda w: len(w.inflight))
            if len(w.inflight) >= MAX_INFLIGHT:
                return
            job_id, fut, name, args = self._queue.popleft()
            if fut.cancelled():
                continue
            w.inflight[job_id] = fut
            try:
                assert w.proc.stdin is not None
                _write_frame(w.proc.stdin, (job_id, name, args))
            except (OSError, ValueError):  # its pipe is closed: the reader will see it die
                w.inflight.pop(job_id, None)
                w.dead = True
                self._queue.appendleft((job_id, fut, name, args))

    def _worker_exited(self, w: _Worker) -> None:
        """From the worker's reader thread, at end of its output."""
        with self._lock:
            w.dead = True
            if w in self._running:
                self._running.remove(w)
            orphans = list(w.inflight.values())
            w.inflight.clear()
            closed = self._closed
            if not closed:
                if w.finished == 0:
                    self._early_deaths += 1
                    if self._early_deaths >= MAX_EARLY_DEATHS:
                        self._give_up_locked(f"{self._early_deaths} worker processes exited "
                                             "before doing any work")
                else:
                    self._early_deaths = 0
                if self.enabled and self._queue:
                    self._start_locked()  # its replacement takes the queued jobs
                    self._pump_locked()
        rc = w.proc.wait()
        with self._lock:
            if w in self._all:  # reaped: nothing left for shutdown to do with it
                self._all.remove(w)
        if not closed:
            log.warning("DH worker %d exited (status %s); %d job(s) fall back to the reactor",
                        w.pid, rc, len(orphans))
        for fut in orphans:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(WorkersUnavailable(f"DH worker {w.pid} exited"))

    def _give_up_locked(self, why: str) -> None:
        log.warning("no DH worker processes (%s): DH-HMAC-CHAP exponentiations run on the "
                    "reactors and stall their I/O while hosts authenticate", why)
        self.workers = 0
        while self._queue:
            _, fut, _, _ = self._queue.popleft()
            if fut.set_running_or_notify_cancel():
                fut.set_exception(WorkersUnavailable(why))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Close the workers' pipes (each exits after its current job, a few ms) and reap
        them; queued jobs are cancelled, running ones' results dropped."""
        with self._lock:
            self._closed = True
            workers, self._all, self._running = self._all, [], []
            queued = list(self._queue)
            self._queue.clear()
        for _, fut, _, _ in queued:
            fut.cancel()
        for w in workers:
            try:
                if w.proc.stdin is not None:
                    w.proc.stdin.close()
            except OSError:
                pass
        for w in workers:
            try:
                w.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.reader.join(timeout)
            for fut in list(w.inflight.values()):
                fut.cancel()


def _worker_main(argv: list[str]) -> int:
    """A worker: jobs in on stdin, results out on stdout, until stdin closes."""
    # Our life is the target's: we exit when it closes our pipe or dies. Signals meant
    # for the whole group (Ctrl-C, a terminal's hangup, systemd's stop, which signals
    # every process of the unit at once) must not kill us first: the target would log a
    # lost worker, and start another, while it stops.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if argv and argv[0]:
        try:
            os.sched_setaffinity(0, {int(c) for c in argv[0].split(",")})
        except (AttributeError, OSError, ValueError):  # (CPUs gone since): stay where we are
            pass
    from blocktarget.nvme import auth

    fns = {name: getattr(auth, name) for name in JOBS}
    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the result pipe
    while True:
        msg = _read_frame(rd)
        if msg is None:
            return 0  # the target closed the pipe, or is gone
        job_id, name, args = msg
        try:
            out = (job_id, True, fns[name](*args))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # (also cryptography's PanicException on odd input)
            out = (job_id, False, f"{type(exc).__name__}: {exc}")
        try:
            _write_frame(wr, out)
        except BrokenPipeError:
            return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
