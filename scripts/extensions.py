"""Which of blocktarget's compiled parts are built, and which could be built here now.

The cffi extensions (blocktarget._fastpath, ._uring, ._pmem, ._tls; one build script each,
blocktarget/_*_build.py, listed in setup.py's cffi_modules) are optional: `pip install` skips one whose
compile fails (no compiler, no liburing-dev, ...) and the install succeeds. So a venv built
before the system had the headers stays without them after the headers arrive, and the
tests that need them skip. The Makefile asks this script, on every `make run`/`make test`,
whether an extension is missing that compiles now, and reinstalls when one is:

    python scripts/extensions.py check STATE     # before: touch STATE when a rebuild is due
    python scripts/extensions.py verify STATE    # after an install: what was built, and why not
    python scripts/extensions.py status          # the same report, no side effects

Run it with the venv's Python (it imports blocktarget and cffi from there).

"Could be built here" is decided by compiling the extension for real, from its own build
script, into a temporary directory: no second list of headers and libraries to keep in step
with the build scripts. A missing header fails in a fraction of a second; the check runs only
for extensions that are missing, so with everything built it costs nothing.

STATE (the Makefile's $(VENV)/.extensions) is a prerequisite of the venv's stamp: `check`
rewrites it, and so makes it newer than the stamp, only when a rebuild is due; otherwise it
stays, or is created, with a timestamp of 1970 that never triggers one.
`verify` exits 1 when an extension that compiles here was still not built by the install
(something other than a missing package is wrong: the report shows the compiler's words), and
under CI=true also when one cannot be built at all (CI installs every package).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import runpy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Extension:
    module: str  # e.g. blocktarget._uring
    build_script: Path
    built: bool = False
    why_not_built: str = ""  # the import error when not built
    buildable: bool | None = None  # None: not tried (it is built)
    why_not_buildable: str = ""


def discover(setup_py: Path) -> list[Extension]:
    """The extensions setup.py builds: its `cffi_modules` entries "path/_x_build.py:ffibuilder",
    each building the module that its FFI's set_source names."""
    root = setup_py.parent
    scripts = re.findall(r"""["']([\w./-]+\.py):ffibuilder["']""", setup_py.read_text())
    out = []
    for rel in scripts:
        script = root / rel
        # the module name is the first argument of set_source() in the build script
        m = re.search(r"""set_source\(\s*["']([\w.]+)["']""", script.read_text())
        if m is None:
            raise SystemExit(f"{script}: no set_source(\"module\", ...) found")
        out.append(Extension(m.group(1), script))
    return out


def probe_import(ext: Extension) -> None:
    try:
        module = importlib.import_module(ext.module)
    except (ImportError, OSError) as exc:  # OSError: a shared library it links is gone
        ext.built, ext.why_not_built = False, f"{type(exc).__name__}: {exc}"
        return
    ext.built = True
    # A build script may say which optional parts of its extension were compiled out but
    # would compile now (`missing_parts(module) -> list[str]`, e.g. the C lane's io_uring
    # backend when liburing-dev came after the venv): then the extension is as good as
    # missing, and a reinstall builds it whole.
    hook = runpy.run_path(str(ext.build_script)).get("missing_parts")
    missing = hook(module) if hook is not None else []
    if missing:
        ext.built = False
        ext.why_not_built = f"built without {', '.join(missing)}"
        ext.buildable = True


@contextlib.contextmanager
def captured_fds(into: Path):
    """Send this process's stdout/stderr (fds 1 and 2, so the compiler's too) to a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(into, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


ERROR_LINE = re.compile(r"fatal error|error:|cannot find -l|No such file|not found|failed",
                        re.IGNORECASE)


def probe_build(ext: Extension) -> None:
    """Compile the extension from its build script into a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="bt-ext-") as td:
        log = Path(td) / "build.log"
        try:
            with captured_fds(log):
                ffibuilder = runpy.run_path(str(ext.build_script))["ffibuilder"]
                built = Path(ffibuilder.compile(tmpdir=str(Path(td) / "out"), verbose=False))
            ok = built.exists()  # optional=True: a failed compile is only a warning
            error = "" if ok else "the compile produced nothing"
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot be built here"
            ok, error = False, f"{type(exc).__name__}: {exc}"
        text = log.read_text(errors="replace")
    ext.buildable = ok
    if not ok:
        lines = [ln.strip() for ln in text.splitlines() if ERROR_LINE.search(ln)]
        ext.why_not_buildable = lines[0] if lines else (error or text.strip()[-300:])


def survey(setup_py: Path, *, try_builds: bool = True) -> list[Extension]:
    exts = discover(setup_py)
    for ext in exts:
        probe_import(ext)
        if not ext.built and ext.buildable is None and try_builds:
            probe_build(ext)
    return exts


def due(exts: list[Extension]) -> list[Extension]:
    """Missing from the install, and compiling here: a reinstall would build them."""
    return [e for e in exts if not e.built and e.buildable]


def describe(ext: Extension) -> str:
    if ext.built:
        return f"{ext.module}: built"
    if ext.buildable:
        return f"{ext.module}: not built, but it compiles here now"
    return f"{ext.module}: not built, cannot be built here: {ext.why_not_buildable}"


def write_state(state: Path, exts: list[Extension]) -> bool:
    """Rewrite STATE (newer than any stamp) iff a rebuild is due; else keep it, or create
    it dated 1970. Returns whether a rebuild is due."""
    rebuild = due(exts)
    if rebuild:
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text("".join(f"{e.module}\n" for e in rebuild))
        return True
    if not state.exists() or state.read_text():
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text("")
        os.utime(state, (0, 0))
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["check", "verify", "status"])
    ap.add_argument("state", nargs="?", type=Path, help="the state file (check, verify)")
    ap.add_argument("--setup-py", type=Path, default=ROOT / "setup.py",
                    help="the setup.py whose cffi_modules to check (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.command != "status" and args.state is None:
        ap.error(f"{args.command} needs the state file")
    # the modules are imported from the tree beside setup.py (where an editable install puts
    # them), and the build scripts import their siblings from there
    sys.path.insert(0, str(args.setup_py.resolve().parent))
    exts = survey(args.setup_py)
    say = lambda msg: print(f"extensions: {msg}", file=sys.stderr)  # noqa: E731

    if args.command == "status":
        for e in exts:
            print(describe(e))
        return 0
    if args.command == "check":
        if write_state(args.state, exts):
            names = ", ".join(e.module for e in due(exts))
            say(f"{names} missing from the venv but compiling here now: rebuilding")
        return 0

    # verify
    status = 0
    for e in exts:
        if e.built:
            continue
        say(describe(e))
        if e.buildable:
            say(f"  the install did not build {e.module} although it compiles here: see pip's "
                f"output above (`{sys.executable} -m pip install -e .` without -q)")
            status = 1
        elif os.environ.get("CI") == "true":
            say("  CI=true: every extension must be built (scripts/system-deps.sh test "
                "installs what they need)")
            status = 1
        else:
            say("  what needs it is left out, and its tests skip saying why; "
                "`scripts/system-deps.sh run` installs the packages")
    write_state(args.state, exts)
    return status


if __name__ == "__main__":
    sys.exit(main())
