"""Length-prefixed msgpack frames: a sans-IO decoder plus the encoder.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. Frames above
``max_frame_size`` are a :class:`FrameTooLarge` remote error: the connection is closed
before the body is read, so an attacker cannot make us buffer more than the limit.
"""

from __future__ import annotations

import struct
from typing import Any

from ledger.codec import pack, unpack
from ledger.errors import FrameTooLarge, LocalProtocolError

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


class NeedData:
    """Sentinel: more bytes are needed before the next frame is complete."""


NEED_DATA = NeedData()


def encode_frame(message: Any, max_frame_size: int = DEFAULT_MAX_FRAME) -> bytes:
    body = pack(message)
    if len(body) > max_frame_size:
        raise LocalProtocolError(f"refusing to send a {len(body)}-byte frame (limit {max_frame_size})")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes with :meth:`receive_data`, take messages with :meth:`next_message`."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self._max = max_frame_size
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buf)
            if length > self._max:
                raise FrameTooLarge(f"frame of {length} bytes exceeds limit {self._max}")

    def next_message(self) -> Any:
        """The next decoded message, or :data:`NEED_DATA`.

        Raises :class:`FrameTooLarge` or :class:`MalformedFrame`.
        """
        if len(self._buf) < _LEN.size:
            return NEED_DATA
        (length,) = _LEN.unpack_from(self._buf)
        if length > self._max:
            raise FrameTooLarge(f"frame of {length} bytes exceeds limit {self._max}")
        end = _LEN.size + length
        if len(self._buf) < end:
            return NEED_DATA
        body = bytes(self._buf[_LEN.size:end])
        del self._buf[:end]
        return unpack(body, max_size=self._max)
