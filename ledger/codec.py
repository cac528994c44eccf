"""Canonical encoding and hashing.

Everything that is signed or hashed goes through :func:`pack`: msgpack of a canonical form
(lists with a fixed field order, str-keyed maps sorted by key, integers, bytes, str, bool,
None; no floats). Signed bytes are additionally prefixed by a domain tag and the chain id so
that a signature for one purpose or one chain can never be replayed as another.
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

import msgpack

from ledger.errors import EncodingError, MalformedFrame

HASH_SIZE = 32
EMPTY_HASH = b"\x00" * HASH_SIZE

# Nesting and size caps for decoding untrusted bytes.
_MAX_DEPTH = 32
_LEAVES = frozenset({type(None), bool, int, bytes, str})  # exact types: canonical as they are


def _canonical(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise EncodingError("value nested too deeply")
    if value is None or isinstance(value, bool | int | bytes | str):
        return value
    if isinstance(value, float):
        raise EncodingError("floats are not allowed in canonical encoding")
    # Leaves that are already canonical are taken as they are instead of through a call each
    # (a block is thousands of tx byte strings); only where they are not too deep.
    if isinstance(value, list | tuple):
        if depth < _MAX_DEPTH:
            return [v if type(v) in _LEAVES else _canonical(v, depth + 1) for v in value]
        return [_canonical(v, depth + 1) for v in value]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise EncodingError(f"map keys must be str, got {type(k).__name__}")
        if depth < _MAX_DEPTH:
            return {k: v if type(v) in _LEAVES else _canonical(v, depth + 1)
                    for k, v in sorted(value.items())}
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise EncodingError(f"cannot encode {type(value).__name__}")


def pack(value: Any) -> bytes:
    """Encode ``value`` canonically. Raises :class:`EncodingError` for unsupported values."""
    try:
        return cast(bytes, msgpack.packb(_canonical(value, 0), use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodingError(str(exc)) from exc


def unpack(data: bytes, *, max_size: int = 16 * 1024 * 1024) -> Any:
    """Decode msgpack from an untrusted source.

    Raises :class:`MalformedFrame` if the bytes are not exactly one valid msgpack value,
    contain floats or extension types, or exceed ``max_size``.
    """
    if len(data) > max_size:
        raise MalformedFrame(f"encoded value of {len(data)} bytes exceeds {max_size}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=1_000_000,
            max_map_len=1_000_000,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise MalformedFrame(f"not valid msgpack: {exc.__class__.__name__}") from exc
    _reject_floats(value, 0)
    return value


def _reject_floats(value: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise MalformedFrame("value nested too deeply")
    if isinstance(value, float):
        raise MalformedFrame("floats are not allowed")
    if isinstance(value, list | dict):
        items = value if isinstance(value, list) else value.values()
        leaves_ok = depth < _MAX_DEPTH  # else even a leaf below is too deep
        for v in items:
            if not (leaves_ok and type(v) in _LEAVES):
                _reject_floats(v, depth + 1)


def hash_bytes(data: bytes) -> bytes:
    """BLAKE2b-256 of ``data``."""
    return hashlib.blake2b(data, digest_size=HASH_SIZE).digest()


def hash_value(value: Any) -> bytes:
    """BLAKE2b-256 of the canonical encoding of ``value``."""
    return hash_bytes(pack(value))


def signing_bytes(domain: str, chain_id: str, value: Any) -> bytes:
    """The exact bytes that get signed: domain tag, chain id, canonical body."""
    return pack([domain, chain_id, value])
