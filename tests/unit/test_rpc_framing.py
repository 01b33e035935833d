"""The Unix socket's stream decoder (SPDK framing: JSON values back to back, no delimiter).

TCP-like streams split and merge writes arbitrarily, so every test feeds the same bytes
in every possible split and checks the decoded values do not depend on the split.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktarget.rpc import StreamParseError, _StreamDecoder


def feed_all(chunks: list[bytes]) -> list[Any]:
    dec = _StreamDecoder()
    out: list[Any] = []
    for c in chunks:
        out.extend(dec.feed(c))
    assert len(dec) == 0 or not bytes(dec.buf).strip(), "complete input leaves nothing behind"
    return out


def every_split(data: bytes) -> list[list[bytes]]:
    """One chunk; every two-way split; byte by byte."""
    splits = [[data], [bytes([b]) for b in data]]
    splits += [[data[:i], data[i:]] for i in range(1, len(data))]
    return splits


REQ = {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1,
       "params": {"name": "a}b{c]d[e\"f\\g", "nested": {"l": [1, [2, {"x": "}"}]]}}}
TRICKY_STRINGS = ['}', '{', '"', '\\', '\\"}', 'a\\\\"b', '\u00e9\u4e2d\U0001f600', "]]]", "\n\t"]


@pytest.mark.parametrize("indent", [None, 2])
def test_single_object_at_every_split(indent: int | None) -> None:
    data = json.dumps(REQ, indent=indent).encode()
    for chunks in every_split(data):
        assert feed_all(chunks) == [REQ]


def test_several_objects_in_one_chunk_and_across_chunks() -> None:
    objs = [REQ, {"jsonrpc": "2.0", "method": "x", "id": 2}, [REQ, {"a": []}], {}]
    data = b"".join(json.dumps(o).encode() for o in objs)
    for chunks in every_split(data):
        assert feed_all(chunks) == objs


def test_whitespace_between_and_around() -> None:
    data = b" \n\t{\"a\": 1}\r\n\n  {\"b\": [ 1 , 2 ]}  \n"
    for chunks in every_split(data):
        assert feed_all(chunks) == [{"a": 1}, {"b": [1, 2]}]


def test_spdk_client_framing() -> None:
    """SPDK's rpc.py sends indented JSON joined by newlines (its batch flush)."""
    reqs = [{"jsonrpc": "2.0", "method": "m", "id": i, "params": {"k": "v{"}} for i in range(3)]
    data = "\n".join(json.dumps(r, indent=2) for r in reqs).encode()
    for chunks in every_split(data):
        assert feed_all(chunks) == reqs


@pytest.mark.parametrize("s", TRICKY_STRINGS)
def test_strings_with_brackets_quotes_and_escapes(s: str) -> None:
    obj = {"k": s, s: [s, {"in": s}]}
    for ensure_ascii in (True, False):
        data = json.dumps(obj, ensure_ascii=ensure_ascii).encode()
        data = data + data
        for chunks in every_split(data):
            assert feed_all(chunks) == [obj, obj]


def test_partial_value_waits() -> None:
    dec = _StreamDecoder()
    assert dec.feed(b'{"a": "}') == []
    assert dec.feed(b'"') == []
    assert dec.feed(b"}") == [{"a": "}"}]
    assert dec.feed(b"  ") == []
    assert dec.feed(b"[1,") == []
    assert dec.feed(b"2]{}") == [[1, 2], {}]


def test_utf8_split_inside_a_character() -> None:
    obj = {"name": "\u00e9\u4e2d\U0001f600"}
    data = json.dumps(obj, ensure_ascii=False).encode()
    for chunks in every_split(data):
        assert feed_all(chunks) == [obj]


@pytest.mark.parametrize(
    "data",
    [
        b"x",
        b"1",
        b'"str"',
        b"null",
        b"}",
        b"]",
        b'{"a": 1} x',
        b'{"a": tru}',
        b'{"a" 1}',
        b'{"a": 1,}',
        b"[1 2]",
        b'{"a": "\xff"}',
        b'{"a": 1]',
    ],
)
def test_invalid_input(data: bytes) -> None:
    for chunks in every_split(data):
        dec = _StreamDecoder()
        with pytest.raises(ValueError, match="^Parse error"):
            for c in chunks:
                dec.feed(c)


def test_valid_values_before_garbage_are_kept() -> None:
    """A pipelined request before garbage must still be answered, in any split."""
    dec = _StreamDecoder()
    assert dec.feed(b'{"a": 1}') == [{"a": 1}]
    with pytest.raises(ValueError):
        dec.feed(b"garbage")
    dec = _StreamDecoder()
    with pytest.raises(StreamParseError) as ei:
        dec.feed(b'{"a": 1} [2]\n{"b": x}')
    assert ei.value.values == [{"a": 1}, [2]]
    assert str(ei.value).startswith("Parse error")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(
        blacklist_categories=("Cs",))),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=15,
)
_top = st.lists(_json, max_size=4) | st.dictionaries(st.text(max_size=5), _json, max_size=4)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_top, min_size=1, max_size=4), cuts=st.lists(st.integers(0, 10_000)),
       ascii_=st.booleans(), sep=st.sampled_from(["", " ", "\n", "\r\n\t "]))
def test_any_json_any_split(values: list[Any], cuts: list[int], ascii_: bool, sep: str) -> None:
    data = sep.join(json.dumps(v, ensure_ascii=ascii_) for v in values).encode()
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert feed_all(chunks) == values
