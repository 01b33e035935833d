"""The control plane's connection table (rpc_guard.py): slots, and which idle client
gives way when they are full. Driven end to end, with real sockets against a real
target, by tests/integration/test_rpc_access.py."""

from __future__ import annotations

import pytest

from blocktarget.config import ConfigError, parse_settings
from blocktarget.rpc_guard import ConnTable


def test_table_admits_up_to_the_limit_then_refuses_busy_clients() -> None:
    t = ConnTable(2, evict_after=1.0)
    assert t.admit("a", 0.0) == (True, None)
    assert t.admit("b", 0.0) == (True, None)
    t.busy("a")
    t.busy("b")
    assert t.admit("c", 100.0) == (False, None) and t.refused == 1
    t.release("a")
    assert t.admit("c", 100.0) == (True, None) and len(t) == 2


def test_table_longest_idle_gives_way_but_not_a_briefly_idle_one() -> None:
    t = ConnTable(3, evict_after=1.0)
    for k, now in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        t.admit(k, now)
    t.busy("a")  # a request in progress: never evicted
    assert t.admit("d", 1.5) == (False, None)  # b idle 0.5 s, c not yet: nobody
    assert t.admit("d", 3.5) == (True, "b") and t.evicted == 1
    t.idle("a", 3.6)
    assert t.admit("e", 5.0) == (True, "c")  # c idle since 2.0, a only since 3.6
    t.release("b")  # the evicted client's own cleanup later: harmless
    assert len(t) == 3


def test_rpc_timeout_settings() -> None:
    s = parse_settings({"blocktarget": {"rpc": {"request_timeout_sec": 5,
                                                "idle_timeout_sec": 600}}}, "t.json")
    assert (s.rpc_request_timeout_sec, s.rpc_idle_timeout_sec) == (5, 600)
    d = s.describe()["rpc"]
    assert d["request_timeout_sec"] == 5 and d["idle_timeout_sec"] == 600
    default = parse_settings({"blocktarget": {}}, "t.json")
    assert (default.rpc_request_timeout_sec, default.rpc_idle_timeout_sec) == (30, 0)
    assert "request_timeout_sec" not in default.describe()["rpc"]
    for key, bad, low in (("request_timeout_sec", 0, 1), ("idle_timeout_sec", -1, 0),
                          ("request_timeout_sec", True, 1), ("idle_timeout_sec", "9", 0)):
        with pytest.raises(ConfigError, match=f"rpc.{key} must be an integer >= {low}"):
            parse_settings({"blocktarget": {"rpc": {key: bad}}}, "t.json")
