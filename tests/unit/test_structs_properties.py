"""Every `nvme.structs` parser on hostile bytes: it returns, or raises ValueError.

These parsers read what the other end of a connection sent (Connect data on the target;
Identify, log pages and discovery logs on the initiator). Callers catch ValueError to
turn bad data into an NVMe status or a host-side error; any other exception (struct.error,
IndexError, OverflowError, ...) would escape that handling and tear down the connection
or the tool. The CDW decoders take any 32-bit values and must never raise at all.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktarget.nvme import spec, structs

SIZES = [0, 1, 15, 16, 63, 64, 512, 1023, 1024, 1025, 4095, 4096, 4097]

# every parse_* function, named, so a new parser without a property fails this list
PARSERS = sorted(name for name, fn in inspect.getmembers(structs, inspect.isfunction)
                 if name.startswith("parse_") and fn.__module__ == structs.__name__)


def blobs() -> Any:
    """Random bytes, lengths clustered around the structure sizes that matter."""
    return st.one_of(
        st.binary(max_size=5000),
        st.sampled_from(SIZES).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
        st.sampled_from(SIZES).map(lambda n: b"\xff" * n),
    )


def call_parser(name: str, data: bytes, extra: int) -> Any:
    fn = getattr(structs, name)
    params = list(inspect.signature(fn).parameters)
    if name == "parse_dsm_ranges":
        return fn(data, extra % 300)
    if len(params) > 1 and params[1] == "offset":
        return fn(data, extra % 128)
    return fn(data)


def test_parser_list_is_complete() -> None:
    assert len(PARSERS) >= 15, PARSERS


@pytest.mark.parametrize("name", PARSERS)
@settings(max_examples=200, deadline=None)
@given(data=blobs(), extra=st.integers(0, 1 << 16), as_view=st.booleans())
def test_parser_returns_or_raises_value_error(name: str, data: bytes, extra: int,
                                             as_view: bool) -> None:
    buf: Any = memoryview(data) if as_view else data
    try:
        call_parser(name, buf, extra)
    except ValueError:
        pass


u32 = st.integers(0, 0xFFFFFFFF)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=64, max_size=64), u32, u32, u32, u32, st.booleans())
def test_cdw_decoders_never_raise(sqe_bytes: bytes, cdw10: int, cdw11: int, cdw12: int,
                                  cdw13: int, rae: bool) -> None:
    """Command fields come straight off the wire: the field decoders take anything."""
    sqe = structs.parse_sqe(sqe_bytes)
    structs.connect_fields(sqe)
    structs.property_fields(sqe)
    structs.auth_fields(sqe)
    structs.decode_identify(cdw10, cdw11)
    args = structs.decode_get_log_page(cdw10, cdw11, cdw12, cdw13)
    assert args.numd >= 0 if hasattr(args, "numd") else True
    structs.flbas_index(cdw10 & 0xFF)
    _ = sqe.fctype, sqe.fuse, sqe.psdt, sqe.sgl_type, sqe.sgl_subtype, sqe.slba, sqe.nlb


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=9000), st.integers(0, 2**64 - 1), st.integers(0, 2**32))
def test_slice_log_any_offset_and_length(page: bytes, offset: int, length: int) -> None:
    """Get Log Page's LPO is 64-bit and NUMD 32-bit: slicing never raises or overruns."""
    try:
        out = structs.slice_log(page, offset, length)
    except ValueError:
        return
    assert len(out) <= length


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1024, max_size=1024))
def test_connect_data_round_trip_or_value_error(data: bytes) -> None:
    """Whatever parses re-encodes to a record that parses to the same fields."""
    try:
        cd = structs.parse_connect_data(data)
    except ValueError:
        return
    try:
        again = structs.build_connect_data(cd.hostid, cd.cntlid, cd.subnqn, cd.hostnqn)
    except ValueError:
        return  # e.g. an NQN longer than its field once re-encoded
    assert structs.parse_connect_data(again)[:4] == cd[:4]
    assert spec.CONNECT_DATA_SIZE == len(again)
