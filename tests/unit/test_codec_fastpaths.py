"""The codec's and the tx decoder's fast paths against plain reference implementations: the same
bytes, the same verdicts, the same errors, at the nesting limit too."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.codec import pack, unpack
from ledger.errors import EncodingError, InvalidTx, MalformedFrame
from ledger.tx import MAX_TX_SIZE, Tx

MAX_DEPTH = 32  # ledger.codec's nesting limit


def ref_canonical(value: Any, depth: int = 0) -> Any:
    """codec.pack's canonical form, written plainly: every value visited by a call."""
    if depth > MAX_DEPTH:
        raise EncodingError("value nested too deeply")
    if value is None or isinstance(value, bool | int | bytes | str):
        return value
    if isinstance(value, float):
        raise EncodingError("floats are not allowed in canonical encoding")
    if isinstance(value, list | tuple):
        return [ref_canonical(v, depth + 1) for v in value]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise EncodingError(f"map keys must be str, got {type(k).__name__}")
        return {k: ref_canonical(value[k], depth + 1) for k in sorted(value)}
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise EncodingError(f"cannot encode {type(value).__name__}")


def ref_pack(value: Any) -> bytes:
    return bytes(msgpack.packb(ref_canonical(value), use_bin_type=True))


def ref_reject_floats(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise MalformedFrame("value nested too deeply")
    if isinstance(value, float):
        raise MalformedFrame("floats are not allowed")
    if isinstance(value, list):
        for v in value:
            ref_reject_floats(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            ref_reject_floats(v, depth + 1)


def ref_decode(data: bytes) -> Tx:
    """Tx.decode as the canonical re-pack comparison it stands for."""
    if len(data) > MAX_TX_SIZE:
        raise InvalidTx("too_large", "")
    try:
        f = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
        ref_reject_floats(f)
    except Exception as exc:
        raise InvalidTx("malformed", "") from exc
    if not (isinstance(f, list) and len(f) == 6):
        raise InvalidTx("malformed", "")
    type_, sender, nonce, fee, body, sig = f
    if not (isinstance(type_, str) and type_ and isinstance(sender, bytes) and len(sender) == 32
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
                    for v in (nonce, fee))
            and isinstance(body, dict) and isinstance(sig, bytes) and len(sig) == 64):
        raise InvalidTx("malformed", "")
    try:
        canonical = ref_pack(f)
    except EncodingError as exc:
        raise InvalidTx("malformed", "") from exc
    if canonical != data:
        raise InvalidTx("malformed", "")
    return Tx(type_, sender, nonce, fee, body, sig)


def outcome(fn: Any, arg: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(arg)
    except (EncodingError, MalformedFrame) as exc:
        return type(exc).__name__, str(exc)
    except InvalidTx as exc:
        return "InvalidTx", exc.code


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.binary(max_size=8), st.text(max_size=4),
                    st.sampled_from([0.5, -2.25, 1e300]))
keys = st.one_of(st.sampled_from(["a", "b", "c", "to", "amount", "zz", "B"]),
                 st.binary(min_size=1, max_size=2))
values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.tuples(kids, kids), st.dictionaries(keys, kids, max_size=4)),
    max_leaves=20)


def nested(depth: int, leaf: Any, in_map: bool) -> Any:
    v = leaf
    for _ in range(depth):
        v = {"k": v} if in_map else [v]
    return v


@settings(max_examples=400, deadline=None)
@given(values)
def test_pack_is_the_plain_canonical_encoding(value: Any) -> None:
    assert outcome(pack, value) == outcome(ref_pack, value)


@pytest.mark.parametrize("depth", range(29, 35))
@pytest.mark.parametrize("leaf", [1, "s", None, b"b", 1.5, [], {}, [1], {"a": 1}])
@pytest.mark.parametrize("in_map", [False, True])
def test_pack_and_unpack_at_the_nesting_limit(depth: int, leaf: Any, in_map: bool) -> None:
    value = nested(depth, leaf, in_map)
    assert outcome(pack, value) == outcome(ref_pack, value)
    data = msgpack.packb(value, use_bin_type=True)

    def ref_unpack(d: bytes) -> Any:
        v = msgpack.unpackb(d, raw=False, strict_map_key=True)
        ref_reject_floats(v)
        return v

    assert outcome(unpack, data) == outcome(ref_unpack, data)
    tx = msgpack.packb(["transfer", b"s" * 32, 0, 10, {"x": value}, b"g" * 64],
                       use_bin_type=True)
    assert outcome(Tx.decode, tx) == outcome(ref_decode, tx)


@settings(max_examples=400, deadline=None)
@given(body=st.dictionaries(st.one_of(st.text(max_size=3), keys), values, max_size=4),
       nonce=st.integers(-1, 2**64 - 1),
       flip=st.integers(0, 400), byte=st.integers(0, 255), unsorted=st.booleans())
def test_tx_decode_gives_the_verdicts_of_a_canonical_repack(
        body: dict[Any, Any], nonce: int, flip: int, byte: int, unsorted: bool) -> None:
    if unsorted:
        body = dict(reversed(list(body.items())))
    try:
        data = msgpack.packb(["transfer", b"s" * 32, nonce, 10, body, b"g" * 64],
                             use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    for raw in (data, data[:flip] + bytes([byte]) + data[flip + 1:]):
        assert outcome(Tx.decode, raw) == outcome(ref_decode, raw)
