"""The live-socket fuzzer (live_fuzz.py) as a CI test: a real target, a good host doing
verified I/O, and LIVE_FUZZ_STREAMS hostile streams (default 10,000, about 15 s on the
2-core development machine). Crashes, hangs, unhandled exceptions in the target's log
and the good host's errors must all be zero; the peak RSS bound catches a hostile length
turned into an allocation (64 MiB namespace + interpreter stays far below it).

    LIVE_FUZZ_STREAMS=100000 LIVE_FUZZ_SEED=7 pytest tests/fuzz/test_live_fuzz.py -s
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

from .live_fuzz import run

STREAMS = int(os.environ.get("LIVE_FUZZ_STREAMS", "10000"))
SEED = int(os.environ.get("LIVE_FUZZ_SEED", "1"))

pytestmark = pytest.mark.fuzz


@pytest.mark.timeout(120 + STREAMS // 50)
def test_live_fuzz_hostile_streams_while_good_host_works() -> None:
    fig = run(STREAMS, concurrency=24, seed=SEED, hang_timeout=10.0)
    print(json.dumps(asdict(fig), indent=2))
    assert fig.streams == STREAMS
    assert fig.connect_failures == 0
    assert fig.crashes == 0, "the target process exited"
    assert fig.hangs == 0, fig.hang_samples
    assert fig.target_exceptions == 0, fig.hang_samples
    assert fig.good_ops > 0, "the good host did no I/O"
    assert fig.good_errors == 0, fig.good_first_errors
    assert fig.target_peak_rss_mb < 1024, f"target RSS peaked at {fig.target_peak_rss_mb} MiB"
