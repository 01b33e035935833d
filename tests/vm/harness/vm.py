"""Run shell scripts inside a throwaway QEMU guest that has the Linux NVMe/TCP initiator.

The host kernel has no nvme-tcp, so the kernel initiator (and nvmet, VFIO, ...) is only
reachable in a guest. Each run boots bookworm-backports' 6.12 kernel under TCG (KVM does not
work on the dev machine, see ../shared/notes/vm-testing.md) with a busybox initramfs whose /init
chroots into the host's own root over read-only 9p: the guest runs the host's nvme-cli, fio and
/usr/bin/python3, so no guest image has to be built or kept in sync. Per-run files travel
through a rw 9p share ("run dir") mounted at the same absolute path in the guest, which is also
the script's working directory. The guest reaches the host's 127.0.0.1 as ``HOST_ADDR``.

Also usable by hand: ``python tests/vm/harness/vm.py 'nvme version'`` (or ``-f script.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # tests/vm/harness/vm.py -> repo
HOST_ADDR = "10.0.2.2"
"""The host's loopback as seen from the guest (QEMU user networking; no port forwards needed)."""
GUEST_ADDR = "10.0.2.15"

HARNESS_DIR = Path(__file__).resolve().parent
BOOTSTRAP = HARNESS_DIR / "bootstrap.sh"
QEMU = "qemu-system-x86_64"

# Runs the guest leaves behind are kept for post-mortems, but not forever.
_RUN_MAX_AGE_S = 24 * 3600
# A guest whose script has not started this long after QEMU did is taken as hung in its
# boot (seen once in CI under TCG: nothing after SeaBIOS's "Booting from ROM" for the
# whole 840 s); boots take 3-7 s on these machines, tens of seconds under load.
BOOT_TIMEOUT_S = 120.0

_CMD_START = re.compile(r"@@CMD_START uptime=([0-9.]+)@@")
_GUEST_EXIT = re.compile(r"@@GUEST_EXIT=(\d+)")


class VMUnavailable(RuntimeError):
    """The guest cannot be prepared on this machine (tools missing, bootstrap failed)."""


def vm_dir() -> Path:
    """Kept outside the repo: the kernel tree is ~400 MB and shared by all checkouts."""
    env = os.environ.get("VMDIR")
    return Path(env) if env else Path.home() / ".cache" / "blocktarget" / "vm"


def env_boot_modules() -> tuple[str, ...]:
    """$BLOCKTARGET_VM_MODULES, which bootstrap.sh also reads, so shell and Python agree."""
    raw = os.environ.get("BLOCKTARGET_VM_MODULES", "").replace(",", " ")
    return tuple(raw.split())


def initramfs_path(vmdir: Path, boot_modules: Iterable[str] = ()) -> Path:
    """Must match bootstrap.sh's naming: one image per extra-module set, names sorted (C)."""
    mods = sorted(set(boot_modules))
    return vmdir / (f"initramfs-{'+'.join(mods)}.cpio.gz" if mods else "initramfs.cpio.gz")


def _is_root_or_sudo() -> bool:
    if os.geteuid() == 0:
        return True
    if not shutil.which("sudo"):
        return False
    probe = subprocess.run(["sudo", "-n", "true"], capture_output=True)
    return probe.returncode == 0


def _artifacts(vmdir: Path) -> list[Path]:
    return [vmdir / "vmlinux", vmdir / "initramfs.cpio.gz", vmdir / "kernel" / "lib" / "modules"]


def vm_available() -> tuple[bool, str]:
    """Cheap check (no network, no bootstrap) so a skip/fail decision is quick and explained."""
    vmdir = vm_dir()
    missing = [p.name for p in _artifacts(vmdir) if not p.exists()]
    if shutil.which(QEMU) and not missing:
        return True, ""
    if not shutil.which("apt-get"):
        what = f"{QEMU} not found" if not shutil.which(QEMU) else f"{missing} missing in {vmdir}"
        return False, f"{what}, and no apt-get to bootstrap the VM harness"
    if not _is_root_or_sudo():
        return False, (
            f"VM harness not bootstrapped ({QEMU} or {', '.join(missing) or 'kernel'} missing) "
            f"and installing it needs root: run sudo {BOOTSTRAP}"
        )
    return True, "needs bootstrap"


_ensured: dict[tuple[str, ...], Path] = {}
_ensure_lock = threading.Lock()


def ensure_vm(boot_modules: Iterable[str] = ()) -> Path:
    """Bootstrap once per process; a file lock serialises pytest workers and parallel sessions.

    ``boot_modules`` (plus $BLOCKTARGET_VM_MODULES) get their own initramfs, loaded by /init at
    boot; pass the same list to ``Guest(boot_modules=...)``. A module that can wait until the
    script runs needs no image: ``Guest.run(..., modules=[...])``.
    """
    key = tuple(sorted(set(boot_modules) | set(env_boot_modules())))
    with _ensure_lock:
        if key in _ensured:
            return _ensured[key]
        vmdir = vm_dir()
        vmdir.parent.mkdir(parents=True, exist_ok=True)
        with open(vmdir.parent / f".{vmdir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            env = dict(os.environ, VMDIR=str(vmdir))
            env["BLOCKTARGET_VM_MODULES"] = " ".join(key)
            proc = subprocess.run(["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise VMUnavailable(
                    f"{BOOTSTRAP} failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}"
                )
            _prune_runs(vmdir / "runs")
        _ensured[key] = vmdir
        return vmdir


def _prune_runs(runs: Path) -> None:
    if not runs.is_dir():
        return
    cutoff = time.time() - _RUN_MAX_AGE_S
    for d in runs.glob("run.*"):
        with contextlib.suppress(OSError):
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)


def host_nqn() -> str:
    """The NQN the guest's nvme-cli presents by default (it reads the host's /etc/nvme)."""
    return Path("/etc/nvme/hostnqn").read_text().strip()


@dataclass
class GuestResult:
    rc: int
    """Exit status of the guest script; 124 on timeout, 125 when the guest gave no status."""
    console: str
    """Everything QEMU printed (kernel messages, /init markers, the script's output)."""
    rundir: Path
    output: str = ""
    """Only the script's stdout+stderr (output.log), free of kernel console noise."""
    timed_out: bool = False
    boot_seconds: float | None = None
    """Host wall time from QEMU start until the script started."""
    total_seconds: float = 0.0
    qemu_rc: int | None = None
    command: list[str] = field(default_factory=list)

    def check(self, expected_rc: int = 0) -> GuestResult:
        """Assert with the console tail in the message, which is what one needs to debug."""
        if self.rc != expected_rc:
            tail = "\n".join(self.console.splitlines()[-60:])
            why = f"timed out after {self.total_seconds:.1f}s" if self.timed_out else ""
            raise AssertionError(
                f"guest rc={self.rc} (expected {expected_rc}) {why}\nrundir: {self.rundir}\n"
                f"--- console tail ---\n{tail}"
            )
        return self


class Guest:
    """A guest configuration; every ``run`` boots a fresh VM, so runs never share state."""

    def __init__(
        self,
        vmdir: Path | None = None,
        *,
        memory_mb: int = 1024,
        smp: int = 2,
        extra_qemu_args: Sequence[str] = (),
        extra_append: Sequence[str] = (),
        runs_dir: Path | None = None,
        echo: bool | None = None,
        boot_modules: Sequence[str] | None = None,
    ) -> None:
        self.vmdir = Path(vmdir) if vmdir is not None else vm_dir()
        if boot_modules is None:
            boot_modules = env_boot_modules()
        self.initramfs = initramfs_path(self.vmdir, boot_modules)
        self.memory_mb = memory_mb
        self.smp = smp
        self.extra_qemu_args = list(extra_qemu_args)
        self.extra_append = list(extra_append)
        self.runs_dir = runs_dir if runs_dir is not None else self.vmdir / "runs"
        if echo is None:
            echo = os.environ.get("BLOCKTARGET_VM_ECHO", "") not in ("", "0")
        self.echo = echo

    @property
    def kernel_release(self) -> str:
        return next((self.vmdir / "kernel" / "lib" / "modules").iterdir()).name

    @property
    def modules_dir(self) -> Path:
        """For ``modprobe -d`` inside the guest: the extracted tree is visible over 9p."""
        return self.vmdir / "kernel"

    def qemu_command(
        self,
        rundir: Path,
        *,
        memory_mb: int | None = None,
        extra_qemu_args: Sequence[str] = (),
        extra_append: Sequence[str] = (),
    ) -> list[str]:
        append = ["console=ttyS0", "quiet", "panic=-1", f"xfer_path={rundir}",
                  f"project_path={PROJECT_ROOT}"]
        append += self.extra_append + list(extra_append)
        return [
            QEMU,
            "-accel", "tcg", "-cpu", "max",
            "-m", str(memory_mb or self.memory_mb), "-smp", str(self.smp),
            "-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(self.vmdir / "vmlinux"),
            "-initrd", str(self.initramfs),
            "-append", " ".join(append),
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={rundir},mount_tag=xfer,security_model=none",
            # the checkout (and its .venv) again at its own path: under /tmp or /var/tmp
            # the host root's copy is hidden by the guest's tmpfs mounts
            "-virtfs",
            f"local,path={PROJECT_ROOT},mount_tag=project,security_model=none,readonly=on",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=",
            *self.extra_qemu_args, *extra_qemu_args,
        ]  # fmt: skip

    def _write_rundir(
        self,
        script: str,
        files: Mapping[str, bytes | str] | None,
        env: Mapping[str, str] | None,
        modules: Sequence[str],
        trace: bool,
    ) -> Path:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        rundir = Path(tempfile.mkdtemp(prefix="run.", dir=self.runs_dir)).resolve()
        rundir.chmod(0o755)
        for name, data in (files or {}).items():
            rel = Path(name)
            if rel.is_absolute() or ".." in rel.parts or rel.name in ("cmd.sh", "rc"):
                raise ValueError(f"files: {name!r} must be a plain relative path")
            dest = rundir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data.encode() if isinstance(data, str) else data)
            dest.chmod(0o755)
        exports = {
            "VMDIR": str(self.vmdir),
            "RUNDIR": str(rundir),
            "HOST_ADDR": HOST_ADDR,
            "GUEST_ADDR": GUEST_ADDR,
            **(env or {}),
        }
        lines = ["#!/bin/bash", "# written by tests/vm/harness/vm.py"]
        lines += [f"export {k}={shlex.quote(str(v))}" for k, v in exports.items()]
        lines += [f"modprobe -d {shlex.quote(str(self.modules_dir))} {m}" for m in modules]
        if trace:
            lines.append("set -x")
        lines.append(script)
        (rundir / "cmd.sh").write_text("\n".join(lines) + "\n")
        return rundir

    def run(
        self,
        script: str,
        *,
        timeout: float = 300,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        modules: Sequence[str] = (),
        trace: bool = False,
        memory_mb: int | None = None,
        extra_qemu_args: Sequence[str] = (),
        extra_append: Sequence[str] = (),
        sparse_files: Mapping[str, int] | None = None,
    ) -> GuestResult:
        """Boot, run ``script`` with bash as root in the run dir, power off; never raises on rc.

        A guest kernel that panics before the script started is booted once more (in a
        new run dir): under TCG with several vCPUs the kernel's early code patching
        occasionally hits a stray int3 (seen once in CI: "Oops: int3" in
        sched_clock_cpu during cpu_latency_qos_init), which says nothing about the test.
        So is one whose boot hangs (no script start within BOOT_TIMEOUT_S), with the
        time the first boot left of ``timeout``.
        """
        kw = dict(files=files, env=env, modules=modules, trace=trace,
                  memory_mb=memory_mb, extra_qemu_args=extra_qemu_args,
                  extra_append=extra_append, sparse_files=sparse_files)
        result = self._run_once(script, timeout=timeout, **kw)  # type: ignore[arg-type]
        why = None
        if (result.rc == 125 and result.boot_seconds is None and not result.timed_out
                and "Kernel panic" in result.console):
            why = "panicked while booting"
        elif result.timed_out and result.boot_seconds is None:
            why = f"did not start its script within {result.total_seconds:.0f} s"
        left = timeout - result.total_seconds
        if why is not None and left > BOOT_TIMEOUT_S / 4:
            print(f"vm: guest kernel {why} ({result.rundir}); booting again",
                  file=sys.stderr, flush=True)
            result = self._run_once(script, timeout=left, **kw)  # type: ignore[arg-type]
        return result

    def _run_once(
        self,
        script: str,
        *,
        timeout: float,
        files: Mapping[str, bytes | str] | None,
        env: Mapping[str, str] | None,
        modules: Sequence[str],
        trace: bool,
        memory_mb: int | None,
        extra_qemu_args: Sequence[str],
        extra_append: Sequence[str],
        sparse_files: Mapping[str, int] | None,
    ) -> GuestResult:
        """One boot of ``run``.

        ``files`` land in the run dir (the script's cwd, same path on host and guest);
        ``modules`` are modprobe'd from the extracted kernel tree before the script starts.
        The script sees VMDIR, RUNDIR, HOST_ADDR and GUEST_ADDR in its environment.
        ``sparse_files`` ({name: bytes}) are created empty (sparse) in the run dir, e.g.
        disk images; ``{rundir}`` in ``extra_qemu_args`` becomes the run dir's path, so a
        device can be backed by one: ``-drive file={rundir}/nvme.img,...``.
        """
        rundir = self._write_rundir(script, files, env, modules, trace)
        for name, size in (sparse_files or {}).items():
            rel = Path(name)
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"sparse_files: {name!r} must be a plain relative path")
            with open(rundir / rel, "wb") as f:
                f.truncate(size)
        extra_qemu_args = [a.replace("{rundir}", str(rundir)) for a in extra_qemu_args]
        cmd = self.qemu_command(
            rundir, memory_mb=memory_mb, extra_qemu_args=extra_qemu_args,
            extra_append=extra_append,
        )  # fmt: skip
        (rundir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
        lines: list[str] = []
        boot: list[float] = []
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            with open(rundir / "console.log", "w", encoding="utf-8") as log:
                for raw in stdout:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    now = time.monotonic() - t0
                    if not boot and _CMD_START.search(line):
                        boot.append(now)
                    lines.append(line)
                    log.write(f"[{now:7.2f}] {line}\n")
                    log.flush()
                    if self.echo:
                        print(f"[vm {now:7.2f}] {line}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, name="vm-console", daemon=True)
        reader.start()
        timed_out = False
        try:
            try:  # (first until the script should have started: a hung boot ends there)
                qemu_rc: int | None = proc.wait(timeout=min(BOOT_TIMEOUT_S, timeout))
            except subprocess.TimeoutExpired:
                if not boot or timeout <= BOOT_TIMEOUT_S:
                    raise
                qemu_rc = proc.wait(timeout=max(timeout - (time.monotonic() - t0), 0.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            qemu_rc = proc.wait()
        except BaseException:  # e.g. pytest-timeout or ^C: never leave a VM running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        reader.join(timeout=10)
        total = time.monotonic() - t0
        console = "\n".join(lines)

        rc_file = rundir / "rc"
        if timed_out:
            rc = 124
        elif rc_file.exists() and rc_file.read_text().strip().isdigit():
            rc = int(rc_file.read_text())
        elif m := _GUEST_EXIT.findall(console):
            rc = int(m[-1])
        else:
            rc = 125
        out_file = rundir / "output.log"
        output = out_file.read_text(errors="replace") if out_file.exists() else ""
        result = GuestResult(
            rc=rc, console=console, rundir=rundir, output=output, timed_out=timed_out,
            boot_seconds=boot[0] if boot else None, total_seconds=total, qemu_rc=qemu_rc,
            command=cmd,
        )  # fmt: skip
        (rundir / "result.txt").write_text(
            f"rc={rc} timed_out={timed_out} qemu_rc={qemu_rc} "
            f"boot_s={result.boot_seconds} total_s={total:.2f}\n"
        )
        return result


def run_in_guest(
    script: str,
    *,
    timeout: float = 300,
    extra_qemu_args: Sequence[str] = (),
    memory_mb: int = 1024,
    files: Mapping[str, bytes | str] | None = None,
    boot_modules: Sequence[str] = (),
    **kwargs,
) -> GuestResult:
    """One-shot convenience: bootstrap if needed, then boot a fresh guest for ``script``.

    Further keyword arguments (env, modules, trace, extra_append) go to :meth:`Guest.run`.
    """
    mods = tuple(boot_modules) + env_boot_modules()
    guest = Guest(ensure_vm(mods), memory_mb=memory_mb, boot_modules=mods)
    return guest.run(
        script, timeout=timeout, files=files, extra_qemu_args=extra_qemu_args, **kwargs
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a shell script in the test guest.")
    ap.add_argument("script", nargs="?", help="shell text to run in the guest")
    ap.add_argument("-f", "--file", type=Path, help="read the script from this file")
    ap.add_argument("-t", "--timeout", type=float, default=300)
    ap.add_argument("-m", "--memory", type=int, default=1024, help="guest RAM in MiB")
    ap.add_argument("-x", "--trace", action="store_true", help="set -x in the guest script")
    ap.add_argument("-q", "--quiet", action="store_true", help="don't echo the console")
    ap.add_argument("--module", action="append", default=[], help="modprobe in the guest")
    args = ap.parse_args(argv)
    if (args.script is None) == (args.file is None):
        ap.error("give either a script or -f FILE")
    script = args.file.read_text() if args.file else args.script
    guest = Guest(ensure_vm(), memory_mb=args.memory, echo=not args.quiet)
    res = guest.run(script, timeout=args.timeout, trace=args.trace, modules=args.module)
    print(
        f"== vm: rc={res.rc} timed_out={res.timed_out} boot_s={res.boot_seconds} "
        f"total_s={res.total_seconds:.2f} rundir={res.rundir}",
        file=sys.stderr,
    )
    return res.rc


if __name__ == "__main__":
    sys.exit(main())
