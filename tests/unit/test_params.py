"""Parameter schemas: the one place that words -32602 messages for RPC and config alike.

Operators read these messages in two places (an RPC error and a config-file error), so the
tests pin the wording that names the parameter, not just the exception type.
"""

from __future__ import annotations

import pytest

from blocktarget.errors import INVALID_PARAMS, InvalidParams
from blocktarget.params import Param, Schema, non_empty, non_negative, positive, validate

SCHEMA = Schema(
    (
        Param("name", str, required=True, check=non_empty),
        Param("count", int, default=7, check=positive),
        Param("offset", int, default=0, check=non_negative),
        Param("ratio", float),
        Param("flag", bool, default=False),
        Param("mode", str, choices=("fast", "safe")),
        Param("either", (int, str)),
        Param("items", list),
        Param("opts", dict),
    ),
    extra_ok=frozenset({"ignored"}),
)


def _msg(params: object, schema: Schema = SCHEMA) -> str:
    with pytest.raises(InvalidParams) as ei:
        validate(schema, params)  # type: ignore[arg-type]
    assert ei.value.code == INVALID_PARAMS
    return ei.value.message


def test_defaults_filled_and_values_kept() -> None:
    out = validate(SCHEMA, {"name": "x"})
    assert out == {"name": "x", "count": 7, "offset": 0, "ratio": None, "flag": False,
                   "mode": None, "either": None, "items": None, "opts": None}
    out = validate(SCHEMA, {"name": "y", "count": 3, "flag": True, "mode": "safe",
                            "either": "s", "items": [1], "opts": {"a": 1}})
    assert (out["count"], out["flag"], out["mode"], out["either"]) == (3, True, "safe", "s")


def test_null_means_absent() -> None:
    """SPDK's client drops None, but hand-written JSON often sends null for 'default'."""
    assert validate(SCHEMA, {"name": "x", "count": None})["count"] == 7
    assert _msg({"name": None}) == "missing required parameter 'name'"


def test_missing_required() -> None:
    assert _msg({}) == "missing required parameter 'name'"
    assert _msg(None) == "missing required parameter 'name'"


def test_unknown_parameter_named() -> None:
    assert _msg({"name": "x", "nmae": 1}) == "unknown parameter 'nmae'"


def test_extra_ok_accepted_but_not_passed_on() -> None:
    out = validate(SCHEMA, {"name": "x", "ignored": 123})
    assert "ignored" not in out


def test_allow_extra_passes_everything_through() -> None:
    schema = Schema((Param("type", str, required=True),), allow_extra=True)
    assert validate(schema, {"type": "malloc", "size_mb": 1}) == {"type": "malloc", "size_mb": 1}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"name": 5}, "parameter 'name' must be string, got int"),
        ({"name": "x", "count": "5"}, "parameter 'count' must be integer, got str"),
        ({"name": "x", "count": 1.5}, "parameter 'count' must be integer, got float"),
        # JSON true is not an integer, although Python's bool is an int subclass
        ({"name": "x", "count": True}, "parameter 'count' must be integer, got bool"),
        ({"name": "x", "flag": 1}, "parameter 'flag' must be boolean, got int"),
        ({"name": "x", "items": {}}, "parameter 'items' must be array, got dict"),
        ({"name": "x", "opts": []}, "parameter 'opts' must be object, got list"),
        ({"name": "x", "either": 1.5}, "parameter 'either' must be int or str, got float"),
        ({"name": "x", "ratio": "1"}, "parameter 'ratio' must be float, got str"),
    ],
)
def test_type_errors_name_parameter_and_types(params: dict, message: str) -> None:
    assert _msg(params) == message


def test_int_accepted_where_float_expected_but_not_bool() -> None:
    assert validate(SCHEMA, {"name": "x", "ratio": 2})["ratio"] == 2
    assert _msg({"name": "x", "ratio": True}) == "parameter 'ratio' must be float, got bool"


def test_choices() -> None:
    assert _msg({"name": "x", "mode": "turbo"}) == (
        "parameter 'mode' must be one of 'fast', 'safe', got 'turbo'"
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"name": ""}, "parameter 'name' must not be empty"),
        ({"name": "x", "count": 0}, "parameter 'count' must be positive"),
        ({"name": "x", "count": -3}, "parameter 'count' must be positive"),
        ({"name": "x", "offset": -1}, "parameter 'offset' must not be negative"),
    ],
)
def test_checks(params: dict, message: str) -> None:
    assert _msg(params) == message


def test_non_object_params() -> None:
    assert _msg([1, 2]) == "params must be an object"
    assert _msg("name") == "params must be an object"


def test_check_helpers() -> None:
    assert positive(1) is None and positive(0)
    assert non_negative(0) is None and non_negative(-1)
    assert non_empty("a") is None and non_empty("")
