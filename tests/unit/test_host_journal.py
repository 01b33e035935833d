"""The journal of acknowledged writes (blocktarget/host/journal.py): replay rules and the
per-unit verdict, without a target (the kill -9 loop in tests/integration/
test_kill_restart.py drives it against a real one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocktarget.host.cli import perf_config
from blocktarget.host.journal import Journal, check_unit, replay
from blocktarget.host.perf import PerfConfig, make_pattern

BS = 512


def test_replay_follows_intent_ack_fail_and_check(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    j = Journal(path, 1024, BS, 1)
    j.intent(0, 5)
    j.acked(0, 5)
    j.intent(0, 6)  # in flight at the "kill"
    j.intent(2, 7)
    j.failed(2, 7)
    j.intent(4, 8)
    j.acked(4, 8)
    j.resolved(4, None)  # a check found unit 4 mixed
    j.intent(6, 9)
    j.acked(6, 9)
    j.intent(6, 10)
    j.resolved(6, 10)  # a check found the in-flight generation landed
    j.close()
    st = replay(path)
    assert (st.io_size, st.lba_size, st.nsid) == (1024, BS, 1)
    assert st.acked == {0: 5, 2: None, 4: None, 6: 10}
    assert st.pending == {0: {6}}
    assert st.max_gen == 10
    assert st.units() == [0, 2, 4, 6]


def test_torn_last_record_is_ignored_and_garbage_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"H 512 512 1\nI 0 3\nA 0 3\nA 0 4")  # checker killed mid-record
    st = replay(str(path))
    assert st.acked == {0: 3} and st.max_gen == 3
    path.write_bytes(b"H 512 512 1\nX 1 2\n")
    with pytest.raises(ValueError, match="line 2 is not a journal record"):
        replay(str(path))
    path.write_bytes(b"A 0 1\n")
    with pytest.raises(ValueError, match="no header"):
        replay(str(path))


def test_journal_refuses_a_different_geometry(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    Journal(path, 4096, 4096, 1).close()
    with pytest.raises(ValueError, match="io size 4096"):
        Journal(path, 8192, 4096, 1)
    assert replay(str(tmp_path / "absent")).units() == []


def test_records_survive_the_writer_without_close(tmp_path: Path) -> None:
    """os.write per record: nothing sits in a user-space buffer of the process."""
    path = str(tmp_path / "j")
    j = Journal(path, BS, BS, 1)
    j.acked(8, 2)
    pid = os.fork()
    if pid == 0:  # a child that appends and dies without closing or flushing anything
        j.intent(8, 3)
        os._exit(0)
    os.waitpid(pid, 0)
    st = replay(path)
    assert st.acked == {8: 2} and st.pending == {8: {3}}
    j.close()


def test_check_unit_verdicts() -> None:
    nlb = 2
    cur = make_pattern(10, nlb, BS, 5)
    new = make_pattern(10, nlb, BS, 6)
    assert check_unit(cur, 10, nlb, BS, 5, set()).gen == 5
    v = check_unit(new, 10, nlb, BS, 5, {6})
    assert v.gen == 6 and v.landed and v.lost is None
    # an in-flight multi-block write may land on some blocks only: allowed, unresolved
    mixed = new[:BS] + cur[BS:]
    v = check_unit(mixed, 10, nlb, BS, 5, {6})
    assert v.lost is None and v.gen is None
    # the acknowledged generation is gone: older data, another LBA's data, zeroes
    older = make_pattern(10, nlb, BS, 4)
    assert "generation 4, last acknowledged generation 5" in check_unit(older, 10, nlb, BS, 5,
                                                                        set()).lost
    assert "no stamp" in check_unit(make_pattern(12, nlb, BS, 5), 10, nlb, BS, 5, set()).lost
    assert "no stamp" in check_unit(bytes(nlb * BS), 10, nlb, BS, 5, {6}).lost
    torn = bytearray(cur)
    torn[100] ^= 1
    assert "LBA 10: no stamp" in check_unit(torn, 10, nlb, BS, 5, set()).lost
    # nothing acknowledged: nothing promised
    assert check_unit(bytes(nlb * BS), 10, nlb, BS, None, {6}).lost is None


def test_perf_options_for_the_journal(tmp_path: Path) -> None:
    from blocktarget.cli import build_parser

    base = ["perf", "-a", "127.0.0.1", "-n", "nqn.x"]
    args = build_parser().parse_args(base + ["--verify", "--journal", str(tmp_path / "j"),
                                             "--check-only"])
    cfg = perf_config(args)
    assert cfg.journal == str(tmp_path / "j") and cfg.check_only
    for bad, msg in ((["--journal", "j"], "needs --verify"),
                     (["--verify", "--journal", "j", "-c", "2"], "one connection"),
                     (["--check-only"], "needs --journal")):
        with pytest.raises(ValueError, match=msg):
            perf_config(build_parser().parse_args(base + bad))
    with pytest.raises(ValueError):
        PerfConfig("a", 1, "n", journal="j").validate()


def test_compaction_keeps_the_state_and_the_highest_generation(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    j = Journal(path, BS, BS, 1)
    for gen in range(2, 200):
        j.intent(gen % 5, gen)
        j.acked(gen % 5, gen)
    j.intent(7, 300)
    j.failed(7, 300)
    j.intent(9, 301)  # a unit whose check found a lost write keeps its claim: unresolved
    j.acked(9, 301)
    j.intent(9, 302)
    j.resolved(0, 195)
    j.resolved(1, None)
    before = replay(path)
    j.compact(before)
    j.close()
    after = replay(path)
    assert after.acked == before.acked and after.pending == before.pending == {9: {302}}
    assert after.max_gen == 302
    assert len(Path(path).read_text().splitlines()) == 1 + 7 + 1 + 1  # H, units, I, G
    assert not Path(path + ".tmp").exists()
