"""The DH worker processes (nvme/dh_workers.py): results equal to computing inline, only
the DH jobs accepted, a dead worker's jobs handed back and the worker replaced, nothing
left running after shutdown or after the target process dies. Budget: ~3 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from blocktarget.nvme import auth, ffdhe
from blocktarget.nvme.dh_workers import DhJobError, DhWorkers, WorkersUnavailable

pytestmark = pytest.mark.timeout(60)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (reaped, or a zombie of someone else)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def workers() -> Iterator[DhWorkers]:
    w = DhWorkers(2)
    try:
        yield w
    finally:
        w.shutdown()


def test_results_agree_with_inline(workers: DhWorkers) -> None:
    kp = workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048)
    assert kp is not None
    mine = auth.DhExchange(auth.DhGroup.FFDHE2048, kp.result(30))
    peer = auth.DhExchange(auth.DhGroup.FFDHE2048)
    shared = workers.submit(auth.dh_shared, *mine.shared_args(peer.public))
    assert shared is not None
    assert shared.result(30) == peer.shared(mine.public)
    assert len(workers.pids) == 2 and os.getpid() not in workers.pids
    # many at once: more than MAX_INFLIGHT per worker wait in the pool's queue
    futs = [workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048) for _ in range(40)]
    keys = {f.result(30)[0] for f in futs if f is not None}
    assert len(keys) == 40  # fresh private keys, all answered


def test_only_dh_jobs_run_and_errors_come_back(workers: DhWorkers) -> None:
    with pytest.raises(ValueError, match="not a DH job"):
        workers.submit(os.getpid)
    p = ffdhe.PRIMES[2048]  # a peer value DhExchange.check_peer would have refused
    bad = workers.submit(auth.dh_shared, 1, 5, b"\x02" * 256, p.to_bytes(256, "big"))
    assert bad is not None
    with pytest.raises(DhJobError, match="ValueError"):
        bad.result(30)
    ok = workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048)
    assert ok is not None and len(ok.result(30)[1]) == 256  # the worker survived it


def test_no_workers_means_inline() -> None:
    w = DhWorkers(0)
    assert not w.enabled and w.submit(auth.dh_keypair, 1) is None and w.pids == []


def test_dead_worker_fails_its_jobs_and_is_replaced(workers: DhWorkers) -> None:
    first = workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048)
    assert first is not None and first.result(30)
    pids = workers.pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # jobs written now stay in flight
    futs = [workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE8192) for _ in range(4)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for f in futs:
        assert f is not None
        with pytest.raises(WorkersUnavailable):
            f.result(30)
    again = workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048)
    assert again is not None and len(again.result(30)[1]) == 256
    assert workers.pids and not set(workers.pids) & set(pids)


def test_shutdown_reaps_the_workers(workers: DhWorkers) -> None:
    f = workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048)
    assert f is not None and f.result(30)
    pids = workers.pids
    workers.shutdown()
    assert all(_gone(pid, 0.1) for pid in pids)  # reaped by shutdown itself
    assert not workers.enabled and workers.submit(auth.dh_keypair, 1) is None


def test_workers_exit_with_a_killed_target(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of the process that owns the workers leaves nothing running."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from blocktarget.nvme import auth, ffdhe
        from blocktarget.nvme.dh_workers import DhWorkers
        w = DhWorkers(2)
        for f in [w.submit(auth.dh_keypair, 1) for _ in range(4)]:
            f.result(30)
        print(*w.pids, flush=True)
        time.sleep(60)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2
        p.kill()
        p.wait(10)
        assert all(_gone(pid) for pid in pids), "a DH worker outlived its target"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _ignored(pid: int) -> set[int]:
    """The signals process ``pid`` ignores (SigIgn in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigIgn:"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_group_signals_do_not_kill_a_worker(workers: DhWorkers) -> None:
    """Ctrl-C, a hangup and systemd's stop reach every process of the target at once;
    the workers outlive them and end when the target closes their pipes."""
    f = workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048)
    assert f is not None and f.result(30)
    pids = workers.pids
    # A worker ignores them from its first statement on; one still starting its
    # interpreter (the first job went to another) would die of them, be logged and
    # replaced. Wait until each has them ignored, as the kernel shows it.
    group = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    deadline = time.monotonic() + 30
    while not all(_ignored(pid) >= group for pid in pids):
        assert time.monotonic() < deadline, "a DH worker never ignored the group signals"
        time.sleep(0.02)
    for pid in pids:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(pid, sig)
    time.sleep(0.2)
    f = workers.submit(auth.dh_keypair, auth.DhGroup.FFDHE2048)
    assert f is not None and f.result(30) and workers.pids == pids
