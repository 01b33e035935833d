"""bench/spdk_tools.py: where SPDK's optional tools are found, and why one cannot be used
(issue 18 item 5). The order is $SPDK_TOOLS alone when set, else .tools/spdk in the
checkout, then PATH; never a path of one machine. Stand-in executables play the tools: only
the lookup and the start check are under test here, not SPDK.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    """A fresh copy of the module, its checkout root at tmp/checkout, PATH = tmp/bin only."""
    spec = importlib.util.spec_from_file_location("spdk_tools_under_test",
                                                  ROOT / "bench" / "spdk_tools.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "ROOT", tmp_path / "checkout")
    monkeypatch.delenv("SPDK_TOOLS", raising=False)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return mod


def tool(directory: Path, name: str, stderr: str = "", mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / name
    p.write_text(f"#!/bin/sh\necho 'usage: {name} [options]'\n"
                 + (f"echo '{stderr}' >&2\nexit 127\n" if stderr else "exit 0\n"))
    p.chmod(mode)
    return p


def test_not_found_says_where_it_looked_and_what_to_set(tools: ModuleType,
                                                        tmp_path: Path) -> None:
    assert tools.find_tool("nvmf_tgt") is None
    why = tools.tool_unavailable_reason("nvmf_tgt")
    assert why is not None and "SPDK's nvmf_tgt is not available" in why
    assert str(tmp_path / "checkout" / ".tools" / "spdk") in why and "PATH" in why
    assert "SPDK_TOOLS" in why
    assert tools.unavailable_reason("nvmf_tgt", "spdk_nvme_perf") == why


def test_checkout_dir_before_path(tools: ModuleType, tmp_path: Path) -> None:
    on_path = tool(tmp_path / "bin", "spdk_nvme_perf")
    assert tools.find_tool("spdk_nvme_perf") == on_path
    assert tools.tool_unavailable_reason("spdk_nvme_perf") is None
    in_checkout = tool(tmp_path / "checkout" / ".tools" / "spdk", "spdk_nvme_perf")
    assert tools.find_tool("spdk_nvme_perf") == in_checkout


def test_spdk_tools_alone_decides_when_set(tools: ModuleType, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tool(tmp_path / "bin", "nvmf_tgt")
    tool(tmp_path / "checkout" / ".tools" / "spdk", "nvmf_tgt")
    build = tmp_path / "spdk" / "build" / "bin"
    build.mkdir(parents=True)
    monkeypatch.setenv("SPDK_TOOLS", str(build))
    assert tools.find_tool("nvmf_tgt") is None, "neither PATH nor .tools/spdk when it is set"
    why = tools.tool_unavailable_reason("nvmf_tgt")
    assert why is not None and str(build) in why and "PATH" not in why
    tgt = tool(build, "nvmf_tgt")
    assert tools.find_tool("nvmf_tgt") == tgt
    assert tools.unavailable_reason("nvmf_tgt") is None


def test_not_executable_is_not_found(tools: ModuleType, tmp_path: Path) -> None:
    tool(tmp_path / "bin", "nvmf_tgt", mode=0o644)
    assert tools.find_tool("nvmf_tgt") is None


def test_a_tool_that_cannot_start_says_why(tools: ModuleType, tmp_path: Path) -> None:
    err = ("spdk_nvme_perf: error while loading shared libraries: libnuma.so.1: "
           "cannot open shared object file: No such file or directory")
    p = tool(tmp_path / "bin", "spdk_nvme_perf", stderr=err)
    why = tools.tool_unavailable_reason("spdk_nvme_perf")
    assert why is not None and why.startswith(f"SPDK's {p} cannot start here")
    assert "libnuma.so.1" in why
    assert os.access(p, os.X_OK)
