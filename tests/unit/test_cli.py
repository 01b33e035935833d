"""Command-line parsing that does not need a running target."""

from __future__ import annotations

import pytest

from blocktarget.cli import build_params, build_parser
from blocktarget.rpc import parse_http_address


def test_build_params_types_and_nesting() -> None:
    assert build_params(["name=M0", "size_mb=64", "flag=true", "x=null", "f=1.5"], None) == {
        "name": "M0", "size_mb": 64, "flag": True, "x": None, "f": 1.5}
    assert build_params(["namespace.bdev_name=M0", "namespace.nsid=2", "nqn=nqn.a:b"], None) == {
        "namespace": {"bdev_name": "M0", "nsid": 2}, "nqn": "nqn.a:b"}
    assert build_params(["k=a=b"], None) == {"k": "a=b"}, "only the first '=' splits"
    assert build_params(["hosts=[\"h1\"]"], None) == {"hosts": ["h1"]}
    assert build_params(["name=x"], '{"name": "y", "n": 1}') == {"name": "x", "n": 1}
    assert build_params([], None) == {}


@pytest.mark.parametrize(
    ("pairs", "json_text", "message"),
    [
        (["novalue"], None, "expected KEY=VALUE"),
        (["=v"], None, "expected KEY=VALUE"),
        (["a=1", "a.b=2"], None, "a is not an object"),
        ([], "[1]", "--json must be a JSON object"),
    ],
)
def test_build_params_errors(pairs: list[str], json_text: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_params(pairs, json_text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9009", ("127.0.0.1", 9009)),
        (":9009", ("127.0.0.1", 9009)),
        ("[::1]:9009", ("::1", 9009)),
        ("http://127.0.0.1:80/", ("127.0.0.1", 80)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_parse_http_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_http_address(text) == expected


@pytest.mark.parametrize("text", ["localhost", "1.2.3.4:0", "1.2.3.4:65536", "h:p", ""])
def test_parse_http_address_errors(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_http_address(text)


def test_parser_options() -> None:
    p = build_parser()
    a = p.parse_args(["start", "-c", "x.json", "--dry-run", "-m", "0x3", "-r", "", "--http",
                      ":1"])
    assert (a.config, a.dry_run, a.cores, a.rpc_socket, a.http) == ("x.json", True, "0x3", "",
                                                                   ":1")
    a = p.parse_args(["rpc", "m", "-p", "a=1", "--param", "b=2", "--json", "{}"])
    assert (a.method, a.param, a.json, a.socket) == ("m", ["a=1", "b=2"], "{}",
                                                     "/var/tmp/blocktarget.sock")
