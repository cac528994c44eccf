"""Connections of the validator daemon: framing, bounded send queues, the validator handshake.

Every TCP connection (client or validator, inbound or outbound) is a :class:`Connection`:
frames are read through a bounded :class:`~ledger.wire.FrameDecoder`, and everything we
send goes through a bounded queue drained by the connection's own sender task. A peer that
does not read fast enough fills its queue and is dropped: sending never waits, so a slow
peer can never stall consensus.

The validator handshake (see :mod:`ledger.api`) is pure: :func:`hello_message`,
:func:`parse_hello`, :func:`auth_message` and :func:`check_auth` build and check the
messages; :func:`handshake` runs them over a connection. Both sides send a fresh random
challenge and sign the other's challenge together with their own key and the genesis hash,
under the ``tfgrid/handshake/v1`` domain and the chain id, so a signature can neither be
replayed on another connection nor on another chain. Only members of the genesis validator
set are accepted.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from typing import Any

import trio

from ledger import api, keys
from ledger.codec import signing_bytes
from ledger.errors import (
    FrameTooLarge,
    LedgerTimeout,
    LocalProtocolError,
    MalformedFrame,
    RemoteProtocolError,
)
from ledger.keys import KeyPair
from ledger.types import ValidatorSet
from ledger.wire import NEED_DATA, FrameDecoder, encode_frame

log = logging.getLogger(__name__)

CHALLENGE_SIZE = 32
RECEIVE_CHUNK = 256 * 1024
SEND_BATCH_BYTES = 256 * 1024


class SelfConnection(RemoteProtocolError):
    """The handshake reached our own daemon (a peer list that names ourselves)."""


class _Decoder(FrameDecoder):
    """A frame decoder whose limit can be raised once the peer has authenticated.

    Connections start at the client limit; only an authenticated validator may send the
    larger peer frames. ``FrameDecoder`` keeps its limit in ``_max``.
    """

    def raise_limit(self, max_frame_size: int) -> None:
        self._max = max(self._max, max_frame_size)


class Connection:
    """One TCP connection with framed receive and a bounded, never-blocking send queue.

    The owner runs :meth:`run_sender` in a nursery and assigns :attr:`cancel_scope` (the
    scope that :meth:`abort` cancels to tear the connection down).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        remote: str,
        max_frame: int = api.CLIENT_MAX_FRAME,
        max_queue_frames: int = 65536,
        max_queue_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.stream = stream
        self.remote = remote
        self.max_send_frame = max_frame
        self.peer_key: bytes | None = None  # set once the validator handshake succeeded
        self.cancel_scope: trio.CancelScope | None = None
        self.sender_done = trio.Event()
        self.closed = False
        self._decoder = _Decoder(max_frame)
        self._max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self._send, self._recv = trio.open_memory_channel[bytes](max_queue_frames)
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}

    def raise_frame_limit(self, max_frame: int) -> None:
        self._decoder.raise_limit(max_frame)
        self.max_send_frame = max(self.max_send_frame, max_frame)

    # -- receiving -----------------------------------------------------------------------------

    async def receive(self) -> Any:
        """The next message, or ``None`` at end of stream.

        Raises :class:`MalformedFrame` / :class:`FrameTooLarge` (remote errors); a broken
        socket is reported as end of stream.
        """
        # Yield even when a message is already buffered: a peer that pipelines many frames
        # must not monopolise the event loop.
        await trio.lowlevel.checkpoint()
        while True:
            msg = self._decoder.next_message()
            if msg is not NEED_DATA:
                return msg
            try:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self._decoder.receive_data(bytes(data))

    def receive_buffered(self) -> Any:
        """The next message if it is already buffered, else :data:`~ledger.wire.NEED_DATA`;
        no I/O and no checkpoint. Raises like :meth:`receive`."""
        return self._decoder.next_message()

    # -- sending -------------------------------------------------------------------------------

    def send(self, message: Any) -> bool:
        """Queue ``message``; ``False`` if the connection is gone or was dropped as too slow."""
        try:
            frame = encode_frame(message, self.max_send_frame)
        except LocalProtocolError:
            log.exception("refusing to send an oversized frame to %s", self.remote)
            return False
        return self.send_frame(frame)

    def send_frame(self, frame: bytes) -> bool:
        """Queue an already encoded frame (to encode a broadcast once for many peers)."""
        if self.closed:
            return False
        if self._queued_bytes + len(frame) > self._max_queue_bytes:
            self._drop("send queue bytes exceeded")
            return False
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            self._drop("send queue full")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self._queued_bytes += len(frame)
        return True

    async def run_sender(self) -> None:
        """Drain the queue into the socket, coalescing queued frames into one write."""
        try:
            async for frame in self._recv:
                batch = [frame]
                size = len(frame)
                while size < SEND_BATCH_BYTES:
                    try:
                        nxt = self._recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(nxt)
                    size += len(nxt)
                self._queued_bytes -= size
                await self.stream.send_all(b"".join(batch) if len(batch) > 1 else frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._drop("connection lost while sending")
        finally:
            self.sender_done.set()

    def finish(self) -> None:
        """Stop accepting messages; the sender flushes what is queued, then stops."""
        self.closed = True
        self._send.close()

    async def flush_and_close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (bounded by ``timeout_s``), then tear the connection down."""
        self.finish()
        with trio.move_on_after(timeout_s):
            await self.sender_done.wait()
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self._send.close()
        for ch in self._pending.values():
            ch.close()
        self._pending.clear()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    def _drop(self, why: str) -> None:
        if not self.closed:
            log.warning("dropping connection %s: %s", self.remote, why)
        self.abort()

    # -- requests over this connection ---------------------------------------------------------

    async def request(self, method: str, params: dict[str, Any], *, timeout_s: float) -> Any:
        """Call a client method on the other side; returns its ``result``.

        Raises :class:`LedgerTimeout`, :class:`RemoteProtocolError` (the peer answered an
        error or went away).
        """
        rid = next(self._ids)
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[rid] = send
        try:
            if not self.send({"id": rid, "method": method, "params": params}):
                raise RemoteProtocolError(f"connection to {self.remote} is closed")
            with trio.move_on_after(timeout_s):
                try:
                    reply = await recv.receive()
                except trio.EndOfChannel:
                    raise RemoteProtocolError(f"connection to {self.remote} closed") from None
                if "error" in reply:
                    err = reply["error"]
                    raise RemoteProtocolError(f"{self.remote} refused {method}: {err!r}")
                return reply.get("result")
            raise LedgerTimeout(f"{self.remote} did not answer {method} in {timeout_s}s")
        finally:
            self._pending.pop(rid, None)

    def deliver_response(self, msg: dict[str, Any]) -> None:
        """Hand a response frame to the :meth:`request` waiting for its id (unknown ids ignored)."""
        rid = msg.get("id")
        ch = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if ch is not None:
            try:
                ch.send_nowait(msg)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass


# ---------------------------------------------------------------------------------------------
# handshake messages (pure)


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_SIZE)


def hello_message(chain_id: str, genesis_hash: bytes, key: KeyPair, challenge: bytes) -> dict[str, Any]:
    return {"hello": {"chain_id": chain_id, "genesis_hash": genesis_hash,
                      "key": key.public_key, "challenge": challenge}}


def parse_hello(
    msg: Any, *, chain_id: str, genesis_hash: bytes, validators: ValidatorSet, own_key: bytes
) -> tuple[bytes, bytes]:
    """The peer's (key, challenge) from its hello.

    Raises :class:`RemoteProtocolError` for a bad shape, another chain or genesis, a key
    outside the validator set, and :class:`SelfConnection` for our own key.
    """
    if not isinstance(msg, dict) or not isinstance(msg.get("hello"), dict):
        raise MalformedFrame("expected a hello")
    h = msg["hello"]
    if h.get("chain_id") != chain_id:
        raise RemoteProtocolError(f"peer is on chain {h.get('chain_id')!r}, not {chain_id!r}")
    if h.get("genesis_hash") != genesis_hash:
        raise RemoteProtocolError("peer has a different genesis")
    key = h.get("key")
    challenge = h.get("challenge")
    if not isinstance(key, bytes) or len(key) != keys.PUBLIC_KEY_SIZE:
        raise MalformedFrame("hello: key must be 32 bytes")
    if not isinstance(challenge, bytes) or len(challenge) != CHALLENGE_SIZE:
        raise MalformedFrame(f"hello: challenge must be {CHALLENGE_SIZE} bytes")
    if key == own_key:
        raise SelfConnection("connected to ourselves")
    if key not in validators:
        raise RemoteProtocolError(f"key {key.hex()} is not a validator of this chain")
    return key, challenge


def _auth_bytes(chain_id: str, challenge: bytes, signer: bytes, genesis_hash: bytes) -> bytes:
    return signing_bytes(api.DOMAIN_HANDSHAKE, chain_id, [challenge, signer, genesis_hash])


def auth_message(key: KeyPair, chain_id: str, their_challenge: bytes, genesis_hash: bytes) -> dict[str, Any]:
    sig = key.sign(_auth_bytes(chain_id, their_challenge, key.public_key, genesis_hash))
    return {"auth": {"signature": sig}}


def check_auth(
    msg: Any, *, chain_id: str, their_key: bytes, our_challenge: bytes, genesis_hash: bytes
) -> None:
    """Raises :class:`RemoteProtocolError` unless ``msg`` proves possession of ``their_key``."""
    if not isinstance(msg, dict) or not isinstance(msg.get("auth"), dict):
        raise MalformedFrame("expected an auth message")
    sig = msg["auth"].get("signature")
    if not isinstance(sig, bytes) or not keys.is_valid(
        their_key, _auth_bytes(chain_id, our_challenge, their_key, genesis_hash), sig
    ):
        raise RemoteProtocolError("handshake signature does not verify")


async def handshake(
    conn: Connection,
    *,
    key: KeyPair,
    chain_id: str,
    genesis_hash: bytes,
    validators: ValidatorSet,
    their_hello: Any | None = None,
) -> bytes:
    """Run the mutual handshake; returns the peer's validator key.

    The dialing side passes ``their_hello=None`` and speaks first; the accepting side passes
    the hello it already read. Raises :class:`RemoteProtocolError` (including
    :class:`SelfConnection`); the caller bounds the time it may take.
    """
    challenge = new_challenge()
    if their_hello is None:
        conn.send(hello_message(chain_id, genesis_hash, key, challenge))
        their_hello = await conn.receive()
        if their_hello is None:
            raise RemoteProtocolError("peer closed during the handshake")
        their_key, their_challenge = parse_hello(
            their_hello, chain_id=chain_id, genesis_hash=genesis_hash,
            validators=validators, own_key=key.public_key)
        conn.send(auth_message(key, chain_id, their_challenge, genesis_hash))
    else:
        their_key, their_challenge = parse_hello(
            their_hello, chain_id=chain_id, genesis_hash=genesis_hash,
            validators=validators, own_key=key.public_key)
        conn.send(hello_message(chain_id, genesis_hash, key, challenge))
        conn.send(auth_message(key, chain_id, their_challenge, genesis_hash))
    reply = await conn.receive()
    if reply is None:
        raise RemoteProtocolError("peer closed during the handshake")
    check_auth(reply, chain_id=chain_id, their_key=their_key, our_challenge=challenge,
               genesis_hash=genesis_hash)
    conn.peer_key = their_key
    conn.raise_frame_limit(api.PEER_MAX_FRAME)
    return their_key


def error_code(exc: RemoteProtocolError) -> str:
    """The ``code`` of the error response sent before closing a connection for ``exc``."""
    if isinstance(exc, FrameTooLarge):
        return "frame_too_large"
    if isinstance(exc, MalformedFrame):
        return "malformed"
    return "protocol_error"
