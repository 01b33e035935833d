"""cffi build script (API mode) for `blocktarget._fastpath`: the NVMe/TCP data plane in C.

The C lives in real files under blocktarget/csrc/, one per concern (crc32c.c: the
digests; lane.c: the target's command path; be_uring.c: its io_uring backend;
be_pmem.c: the pmem bdev's block translation table; ...), each area with a header
(bt_*.h) whose marked section is also the cdef: Python and C read one declaration of
every shared structure. Every *.c there is compiled into the one extension; a backend
whose library is missing compiles to stubs that say so (be_pmem.c needs none: it calls
libpmem through pointers bdevs/pmem.py takes from blocktarget._pmem).

Why it exists: after every pure-Python saving a 4 KiB read still cost about 7 µs of
Python spread flat over ~15 calls, against SPDK's 2 µs for the whole I/O; no single
function was worth moving, the per-command chain was. lane.c says what it takes and how
it stays identical to the Python path; nvme/fastlane.py is its Python side.

Portable builds only: nothing here may depend on the build host's CPU. No -march,
-mtune or -mcpu flag is added, and host-specific ones found in the environment's CFLAGS
(`-march=native` and the like) are removed before compiling, with a warning: a tool built
so on an AVX-512 host died with SIGILL on the AMD machines here. CPU features are chosen
at run time (crc32c.c). tests/unit/test_build_flags.py checks both the flags and the
built object.

The extension is optional like the others: without a compiler the install succeeds and
the target runs the pure-Python path (also what `"c_fast_path": false` selects).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = sorted(CSRC.glob("bt_*.h"))
SOURCES = sorted(CSRC.glob("*.c"))
# -O2 as the rest of CPython's build; gnu11 for the builtins; nothing CPU-specific
COMPILE_ARGS = ["-O2", "-std=gnu11", "-fno-strict-aliasing"]
# compiler options that tie an object to the CPU it was built on
HOST_SPECIFIC = re.compile(r"^-m(arch|tune|cpu)=native$|^-march=(?!x86-64(-v2)?$)\S+$")


def cdef_of(header: Path) -> str:
    """The declarations between the header's two cdef marker lines."""
    text = header.read_text()
    m = re.search(r"/\* ---- cdef begin ---- \*/\n(.*?)/\* ---- cdef end ---- \*/", text, re.S)
    if m is None:
        raise RuntimeError(f"{header}: no cdef section")
    return m.group(1)


def _lane_first(h: Path) -> tuple[bool, str]:
    return (h.name != "bt_lane.h", h.name)


def host_specific(flags: str) -> list[str]:
    """The flags in ``flags`` that would make the object run only on CPUs like this one."""
    return [f for f in flags.split() if HOST_SPECIFIC.match(f)]


def sanitize_env(env: dict[str, str] = os.environ) -> list[str]:  # type: ignore[assignment]
    """Drop host-specific flags from CFLAGS/CPPFLAGS (in place); returns what was dropped."""
    dropped: list[str] = []
    for var in ("CFLAGS", "CPPFLAGS"):
        flags = env.get(var)
        if not flags:
            continue
        bad = host_specific(flags)
        if bad:
            dropped += bad
            env[var] = " ".join(f for f in flags.split() if f not in bad)
    return dropped


def have_header(header: str) -> bool:
    """Whether the C compiler finds ``header`` (its -dev package is installed)."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    try:
        r = subprocess.run([*cc, "-E", "-x", "c", "-"], input=f"#include <{header}>\n",
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def missing_parts(module: object) -> list[str]:
    """Optional backends the built extension lacks whose libraries are here now, for
    scripts/extensions.py (a venv built before liburing-dev was installed is rebuilt)."""
    lib = module.lib  # type: ignore[attr-defined]
    if have_header("liburing.h") and not lib.bt_uring_available():
        return ["its io_uring backend (liburing.h is here now)"]
    return []


_dropped = sanitize_env()
if _dropped:
    print(f"blocktarget._fastpath: ignoring host-specific compiler flags {_dropped} "
          "(the extension must run on any x86-64-v2 CPU)", file=sys.stderr)

ffibuilder = FFI()
# Optional backends of the lane, each compiled in when its library's headers are here
# (be_uring.c: liburing); without one, those namespaces stay on the Python path.
_macros: list[tuple[str, str | None]] = []
_libraries: list[str] = []
if have_header("liburing.h"):
    _macros.append(("BT_HAVE_URING", "1"))
    _libraries.append("uring")
_headers = sorted(HEADERS, key=_lane_first)
ffibuilder.cdef("".join(cdef_of(h) for h in _headers))
ffibuilder.set_source(
    "blocktarget._fastpath",
    "".join(f'#include "{h.name}"\n' for h in _headers),
    sources=[str(p.relative_to(CSRC.parents[1])) for p in SOURCES],
    include_dirs=[str(CSRC)],
    # (a header changed alone must rebuild too: build_ext compares only these dates)
    depends=sorted(str(p.relative_to(CSRC.parents[1])) for p in CSRC.glob("*.h")),
    define_macros=_macros,
    libraries=_libraries,
    extra_compile_args=COMPILE_ARGS,
    # no compiler: the install still succeeds and the target uses the pure-Python path
    optional=True,
)

if __name__ == "__main__":  # `python blocktarget/_fastpath_build.py` builds it in place
    ffibuilder.compile(verbose=True)
