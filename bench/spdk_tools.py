"""Where SPDK's tools are, for the benchmarks and the tests that compare against SPDK.

SPDK's binaries (nvmf_tgt, spdk_nvme_perf) are optional tools: they cannot be shipped with
the project, so a machine has them only if its user built or installed SPDK. They are
looked for in $SPDK_TOOLS (a directory, e.g. an SPDK build's build/bin) when it is set,
else in .tools/spdk in this checkout, else on PATH. Whatever uses them skips, or says "not
available", when they are not there, in CI as well (CI=true does not make them required).
SPDK's JSON-RPC client (rpc.py) is not among them: it comes from PyPI (`spdk`).

Standard library only: bench/tcp_perf.py imports it, and so does
tests/integration/spdk_target.py (by path), so the two never disagree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tool_dirs() -> list[Path]:
    """Where SPDK's binaries are looked for, in order; PATH comes after these, unless
    SPDK_TOOLS is set: then it alone decides."""
    env = os.environ.get("SPDK_TOOLS")
    if env:
        return [Path(env).expanduser()]
    return [ROOT / ".tools" / "spdk"]


def find_tool(name: str) -> Path | None:
    """The executable ``name`` (nvmf_tgt, spdk_nvme_perf), or None."""
    for d in tool_dirs():
        p = d / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    if not os.environ.get("SPDK_TOOLS"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def where() -> str:
    dirs = " or ".join(str(d) for d in tool_dirs())
    return dirs if os.environ.get("SPDK_TOOLS") else f"{dirs} or on PATH"


_starts: dict[Path, str | None] = {}


def tool_unavailable_reason(name: str) -> str | None:
    """Why SPDK's ``name`` cannot be used here (not found, or it cannot start: a missing
    shared library), or None when it can."""
    path = find_tool(name)
    if path is None:
        return (f"SPDK's {name} is not available (an optional tool, not found in {where()}; "
                "set SPDK_TOOLS to the directory of an SPDK build's binaries to run this)")
    if path not in _starts:
        try:
            r = subprocess.run([str(path), "-h"], capture_output=True, text=True, timeout=20)
            _starts[path] = (f"SPDK's {path} cannot start here: {r.stderr.strip()[-300:]}"
                             if "error while loading shared libraries" in r.stderr else None)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _starts[path] = f"SPDK's {path} cannot start here: {exc}"
    return _starts[path]


def unavailable_reason(*names: str) -> str | None:
    """The first reason any of ``names`` cannot be used, or None when all can."""
    for name in names:
        why = tool_unavailable_reason(name)
        if why is not None:
            return why
    return None
