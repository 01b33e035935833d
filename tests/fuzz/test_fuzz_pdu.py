"""Runs the atheris PDU-decoder fuzzer (fuzz_pdu.py) for a bounded time; any crash fails.

    FUZZ_PDU_SECONDS=600 pytest tests/fuzz/test_fuzz_pdu.py   # a longer campaign

libFuzzer runs in a subprocess (it owns the process: signals, exit codes, RSS limit) with
the committed seed corpus read-only and new inputs written to a temporary directory, so
a CI run never changes the repository. A crash leaves its reproducer in the test's tmp
directory, named in the failure message: `python tests/fuzz/fuzz_pdu.py <file>` replays it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("FUZZ_PDU_SECONDS", "30"))

pytestmark = pytest.mark.fuzz


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(SECONDS + 120)
def test_pdu_decoder_fuzz_bounded(tmp_path: Path) -> None:
    if not _atheris_available():
        if os.environ.get("CI") == "true":
            pytest.fail("atheris is missing (pip install -e '.[test]')")
        pytest.skip("atheris not installed")
    new = tmp_path / "corpus"
    new.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [sys.executable, str(HERE / "fuzz_pdu.py"), f"-max_total_time={SECONDS}",
           "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={artifacts}/",
           "-print_final_stats=1", str(new), str(HERE / "corpus")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 90,
                          cwd=tmp_path)
    crashes = sorted(p.name for p in artifacts.iterdir())
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0 and not crashes, (
        f"fuzzer failed (rc {proc.returncode}); reproducers in {artifacts}: {crashes}\n{tail}")
    runs = [ln for ln in proc.stderr.splitlines() if ln.startswith("Done ")]
    assert runs, f"fuzzer did not finish normally:\n{tail}"
    print(runs[-1])
