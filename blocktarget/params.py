"""Declarative parameter schemas for RPC methods and config entries.

One schema per method serves three readers: the JSON-RPC dispatcher (-32602 naming the
bad parameter), the config loader (the same message, prefixed with file and entry), and
`rpc_get_methods`/docs. Hand-written checks in each method would drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidParams

_MISSING = object()


@dataclass(frozen=True)
class Param:
    name: str
    type: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    help: str = ""
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    choices: Sequence[Any] | None = None


@dataclass(frozen=True)
class Schema:
    params: tuple[Param, ...] = ()
    allow_extra: bool = False  # SPDK sends fields we may not model; most methods reject
    extra_ok: frozenset[str] = field(default_factory=frozenset)  # accepted and ignored
    # SPDK options that change security or durability and that this target does not
    # serve: accepted only when off (absent, false, 0, "", null, SPDK's clients send
    # them so), refused otherwise with the reason, so that no request for a secure or
    # durable setup is silently served without it
    refused: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [p.name for p in self.params]


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return {int: "integer", str: "string", bool: "boolean", list: "array", dict: "object"}.get(
        t, t.__name__
    )


def _is_type(value: Any, t: type | tuple[type, ...]) -> bool:
    types = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true must not pass as an integer
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def validate(schema: Schema, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the params with defaults filled in, or raise InvalidParams naming the field."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidParams("params must be an object")
    out: dict[str, Any] = {}
    known = {p.name for p in schema.params}
    for key in params:
        if key in schema.refused:
            if params[key]:
                raise InvalidParams(f"parameter '{key}' is not supported: {schema.refused[key]}")
            continue
        if key not in known and key not in schema.extra_ok and not schema.allow_extra:
            raise InvalidParams(f"unknown parameter '{key}'")
    for p in schema.params:
        value = params.get(p.name, _MISSING)
        if value is _MISSING or value is None:
            if p.required:
                raise InvalidParams(f"missing required parameter '{p.name}'")
            out[p.name] = p.default
            continue
        if not _is_type(value, p.type):
            raise InvalidParams(
                f"parameter '{p.name}' must be {_type_name(p.type)}, got {type(value).__name__}"
            )
        if p.choices is not None and value not in p.choices:
            allowed = ", ".join(repr(c) for c in p.choices)
            raise InvalidParams(f"parameter '{p.name}' must be one of {allowed}, got {value!r}")
        if p.check is not None:
            problem = p.check(value)
            if problem:
                raise InvalidParams(f"parameter '{p.name}' {problem}")
        out[p.name] = value
    if schema.allow_extra:
        for key, value in params.items():
            if key not in schema.refused:
                out.setdefault(key, value)
    return out


def positive(value: int) -> str | None:
    return None if value > 0 else "must be positive"


def non_negative(value: int) -> str | None:
    return None if value >= 0 else "must not be negative"


def non_empty(value: str) -> str | None:
    return None if value else "must not be empty"
