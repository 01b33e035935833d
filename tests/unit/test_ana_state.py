"""ANA state bookkeeping of a subsystem, without sockets: per-listener states, default
groups, change counts, the nsids an I/O queue must refuse, the events observers get,
and the ANA log page a controller builds from it."""

from __future__ import annotations

from typing import Any

import pytest

from blocktarget.bdevs import malloc
from blocktarget.errors import InvalidParams, NoSuchDevice
from blocktarget.nvme import spec, structs
from blocktarget.nvme.admin import _ana
from blocktarget.nvme.subsystem import ListenAddress, Subsystem, SubsystemRegistry

NQN = "nqn.2026-01.io.blocktarget.test:ana"
P1 = ListenAddress.from_params({"traddr": "127.0.0.1", "trsvcid": "4420"})
P2 = ListenAddress.from_params({"traddr": "127.0.0.1", "trsvcid": "4421"})


def bdev(name: str) -> Any:
    return malloc.create({"name": name, "num_blocks": 16, "block_size": 512, "md_size": 0,
                          "uuid": None, "size_mb": None})


@pytest.fixture
def reg() -> tuple[SubsystemRegistry, Subsystem, list[tuple[str, Any]]]:
    r = SubsystemRegistry()
    events: list[tuple[str, Any]] = []
    r.observers.append(lambda ev, sub, detail: events.append((ev, detail)))
    sub = Subsystem(NQN, ana_reporting=True, max_namespaces=4)
    r.add(sub)
    r.add_listener(sub, P1)
    r.add_listener(sub, P2)
    r.add_namespace(sub, bdev("A"), nsid=1)
    r.add_namespace(sub, bdev("B"), nsid=2)
    r.add_namespace(sub, bdev("C"), nsid=3, anagrpid=2)
    events.clear()
    return r, sub, events


def test_default_group_is_the_nsid(reg: Any) -> None:
    _, sub, _ = reg
    assert {n.nsid: n.anagrpid for n in sub.ns_list()} == {1: 1, 2: 2, 3: 2}
    assert sub.ana_groups() == {1: [1], 2: [2, 3]}
    assert [n.config_params().get("anagrpid") for n in sub.ns_list()] == [None, None, 2]


def test_states_are_per_listener_and_group(reg: Any) -> None:
    r, sub, events = reg
    genctr = r.genctr
    assert r.set_ana_state(sub, P2, "inaccessible", 2) is True
    assert events == [("ana_changed", P2)]
    assert r.genctr == genctr  # the discovery log did not change
    assert sub.ana_state(P2, 2) == "inaccessible" and sub.ana_state(P1, 2) == "optimized"
    assert sub.inaccessible_nsids(P2) == {2, 3} and sub.inaccessible_nsids(P1) == set()
    assert sub.ana_chgcnt == 1 and sub.ana_group_chgcnt[(P2, 2)] == 1
    # the same state again: no change, no event, no count
    assert r.set_ana_state(sub, P2, "inaccessible", 2) is False
    assert len(events) == 1 and sub.ana_chgcnt == 1
    # every group at once, then back to the default (which is not stored)
    r.set_ana_state(sub, P2, "non_optimized")
    assert {sub.ana_state(P2, g) for g in range(1, 5)} == {"non_optimized"}
    assert sub.inaccessible_nsids(P2) == set()
    r.set_ana_state(sub, P2, "optimized")
    assert sub.ana_states == {}
    assert sub.ana_chgcnt == 3


def test_removing_a_listener_forgets_its_states(reg: Any) -> None:
    r, sub, _ = reg
    r.set_ana_state(sub, P2, "inaccessible")
    r.remove_listener(sub, P2)
    assert sub.ana_states == {} and sub.ana_group_chgcnt == {}


@pytest.mark.parametrize("args, exc, words", [
    (("sideways", None), InvalidParams, "ana_state"),
    (("persistent_loss", None), InvalidParams, "ana_state"),
    (("optimized", 5), InvalidParams, "anagrpid"),
    (("optimized", 0), None, None),  # 0 = not given = all groups (as SPDK)
])
def test_set_errors(reg: Any, args: tuple[str, int | None], exc: Any, words: str) -> None:
    r, sub, _ = reg
    if exc is None:
        r.set_ana_state(sub, P1, *args)
        return
    with pytest.raises(exc, match=words):
        r.set_ana_state(sub, P1, *args)


def test_unknown_listener_and_disabled_reporting(reg: Any) -> None:
    r, sub, _ = reg
    other = ListenAddress.from_params({"traddr": "127.0.0.1", "trsvcid": "9"})
    with pytest.raises(NoSuchDevice):
        r.set_ana_state(sub, other, "optimized")
    plain = Subsystem("nqn.2026-01.io.blocktarget.test:plain")
    r.add(plain)
    r.add_listener(plain, P1)
    with pytest.raises(InvalidParams, match="ANA reporting is disabled"):
        r.set_ana_state(plain, P1, "inaccessible")
    assert plain.inaccessible_nsids(P1) == set()


def test_anagrpid_beyond_max_namespaces_is_refused(reg: Any) -> None:
    r, sub, _ = reg
    b = bdev("D")
    with pytest.raises(InvalidParams, match="anagrpid"):
        r.add_namespace(sub, b, nsid=4, anagrpid=5)
    assert b.claimed_by is None  # a refused namespace leaves its bdev free


def test_ana_log_is_the_listeners_view(reg: Any) -> None:
    r, sub, _ = reg
    r.set_ana_state(sub, P2, "inaccessible", 2)

    class Ctrl:  # the fields _ana reads
        subsystem = sub
        listener = P2
        hostnqn = "nqn.2014-08.org.nvmexpress:uuid:ana-state-test"

    chg, groups = structs.parse_ana_log(_ana(Ctrl(), rgo=False))  # type: ignore[arg-type]
    assert chg == 1
    assert groups == [structs.AnaGroup(1, spec.AnaState.OPTIMIZED, (1,), 0),
                      structs.AnaGroup(2, spec.AnaState.INACCESSIBLE, (2, 3), 1)]
    Ctrl.listener = P1
    _, groups = structs.parse_ana_log(_ana(Ctrl(), rgo=True))  # type: ignore[arg-type]
    assert [(g.grpid, g.state, g.nsids) for g in groups] == [
        (1, spec.AnaState.OPTIMIZED, ()), (2, spec.AnaState.OPTIMIZED, ())]
