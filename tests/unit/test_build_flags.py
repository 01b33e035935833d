"""Portable builds (issue 15 item 4): the compiled parts must run on any x86-64-v2 CPU.

A reference tool built with `-march=native` on an AVX-512 host died with SIGILL on the AMD
machines here. So: no host-specific flag in what the build scripts pass, host-specific
flags in the environment's CFLAGS dropped, nothing beyond x86-64-v2 in the objects we
ship (apart from code the CPU is asked about first: crc32c.c's SSE4.2 path, itself part
of v2), and the C sources compile for arm64 too.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from blocktarget import _fastpath_build as build

ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS = ["_fastpath", "_uring", "_pmem", "_tls"]
# Mnemonics (AT&T, as objdump prints them) and registers of instruction sets beyond
# x86-64-v2: AVX/AVX2/AVX-512 (VEX/EVEX: v-prefixed, ymm/zmm/k registers), BMI1/2,
# LZCNT, MOVBE, FMA, F16C.
BEYOND_V2 = re.compile(
    r"%[yz]mm\d|%k[0-7]\b|\t(v[a-z0-9]+|andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|"
    r"rorx|sarx|shlx|shrx|tzcnt|lzcnt|movbe)\s")


def test_build_scripts_pass_no_host_specific_flags() -> None:
    for script in sorted((ROOT / "blocktarget").glob("_*_build.py")):
        text = script.read_text()
        for flag in re.findall(r"-m(?:arch|tune|cpu)=[\w.-]+", text):
            # the only mention allowed is the pattern that removes them
            assert "native" in flag or flag in ("-march=x86-64", "-march=x86-64-v2"), \
                (script.name, flag)
    assert build.host_specific(" ".join(build.COMPILE_ARGS)) == []
    # nor in the Makefile, setup.py or pyproject.toml
    for f in ("Makefile", "setup.py", "pyproject.toml"):
        assert "native" not in (ROOT / f).read_text(), f


def test_host_specific_flags_in_the_environment_are_dropped() -> None:
    env = {"CFLAGS": "-O2 -march=native -g", "CPPFLAGS": "-mtune=native -DX=1"}
    dropped = build.sanitize_env(env)
    assert dropped == ["-march=native", "-mtune=native"]
    assert env == {"CFLAGS": "-O2 -g", "CPPFLAGS": "-DX=1"}
    assert build.host_specific("-march=skylake-avx512 -march=x86-64-v2 -mcpu=native") == [
        "-march=skylake-avx512", "-mcpu=native"]


def test_python_build_flags_are_portable() -> None:
    """setuptools compiles with CPython's own CFLAGS too: they must not be host-specific
    (if they were, the interpreter itself would be the problem; say so clearly)."""
    for var in ("CFLAGS", "OPT", "CCSHARED", "LDSHARED"):
        flags = sysconfig.get_config_var(var) or ""
        assert build.host_specific(flags) == [], f"CPython was built with {var}={flags}"


def _built(name: str) -> Path | None:
    found = sorted((ROOT / "blocktarget").glob(f"{name}.*.so"))
    return found[0] if found else None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 objects only")
@pytest.mark.parametrize("name", EXTENSIONS)
def test_objects_use_nothing_beyond_x86_64_v2(name: str) -> None:
    so = _built(name)
    if so is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"blocktarget.{name} is not built")
        pytest.skip(f"blocktarget.{name} is not built")
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the objects"
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                          text=True, check=True).stdout
    bad = [line.strip() for line in text.splitlines() if BEYOND_V2.search(line)]
    assert not bad, f"{so.name}: instructions beyond x86-64-v2: {bad[:10]}"


def test_the_crc32c_is_chosen_at_run_time() -> None:
    from blocktarget.nvme import fastlane

    if not fastlane.AVAILABLE:
        pytest.skip("blocktarget._fastpath is not built")
    impl = fastlane.crc32c_impl()
    assert impl in ("sse4.2", "armv8-crc", "table")
    if platform.machine() == "x86_64":
        flags = Path("/proc/cpuinfo").read_text()
        assert (impl == "sse4.2") == (" sse4_2" in flags)


CROSS = shutil.which("aarch64-linux-gnu-gcc")


@pytest.mark.skipif(CROSS is None and os.environ.get("CI") != "true",
                    reason="no aarch64 cross compiler (gcc-aarch64-linux-gnu)")
def test_c_sources_compile_for_arm64(tmp_path: Path) -> None:
    assert CROSS, "CI=true: gcc-aarch64-linux-gnu must be installed to check the arm64 build"
    for src in build.SOURCES:
        r = subprocess.run([CROSS, *build.COMPILE_ARGS, "-Wall", "-Werror", "-c", str(src),
                            "-I", str(build.CSRC), "-o", str(tmp_path / (src.stem + ".o"))],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{src.name}:\n{r.stderr}"
    # the CRC instruction path is compiled in (chosen at run time from HWCAP)
    dump = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(tmp_path / "crc32c.o")],
                          capture_output=True, text=True).stdout
    assert "crc32cx" in dump
