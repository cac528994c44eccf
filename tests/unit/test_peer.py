"""The validator handshake and the bounded connection, over in-memory streams (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from ledger import api
from ledger.errors import FrameTooLarge, LedgerTimeout, MalformedFrame, RemoteProtocolError
from ledger.keys import KeyPair
from ledger.peer import (
    Connection,
    SelfConnection,
    auth_message,
    check_auth,
    handshake,
    hello_message,
    new_challenge,
    parse_hello,
)
from ledger.types import ValidatorSet
from ledger.wire import encode_frame

KEYS = [KeyPair.from_seed(bytes([i + 1]) * 32) for i in range(4)]
VALS = ValidatorSet.of([k.public_key for k in KEYS])
OUTSIDER = KeyPair.from_seed(b"\x66" * 32)
CHAIN = "unit-chain"
GHASH = b"\x11" * 32


def pair() -> tuple[Connection, Connection]:
    a, b = trio.testing.memory_stream_pair()
    return Connection(a, remote="a"), Connection(b, remote="b")


async def run_both(dialer_key: KeyPair, acceptor_key: KeyPair, *, dialer_chain: str = CHAIN,
                   dialer_genesis: bytes = GHASH) -> tuple[Any, Any]:
    """Handshake a dialer and an acceptor; returns what each side got (key or exception)."""
    d, a = pair()
    results: dict[str, Any] = {}

    async def dial() -> None:
        try:
            results["d"] = await handshake(d, key=dialer_key, chain_id=dialer_chain,
                                           genesis_hash=dialer_genesis, validators=VALS)
        except RemoteProtocolError as exc:
            results["d"] = exc
        finally:
            d.finish()
            await d.sender_done.wait()
            await d.stream.aclose()

    async def accept() -> None:
        try:
            hello = await a.receive()
            results["a"] = await handshake(a, key=acceptor_key, chain_id=CHAIN,
                                           genesis_hash=GHASH, validators=VALS, their_hello=hello)
        except RemoteProtocolError as exc:
            results["a"] = exc
        finally:
            a.finish()
            await a.sender_done.wait()
            await a.stream.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(d.run_sender)
            n.start_soon(a.run_sender)
            n.start_soon(dial)
            n.start_soon(accept)
    return results["d"], results["a"]


async def test_validators_authenticate_each_other() -> None:
    d, a = await run_both(KEYS[0], KEYS[1])
    assert d == KEYS[1].public_key
    assert a == KEYS[0].public_key


async def test_outsider_is_refused() -> None:
    _d, a = await run_both(OUTSIDER, KEYS[1])
    assert isinstance(a, RemoteProtocolError)
    assert "not a validator" in str(a)


async def test_other_chain_or_genesis_is_refused() -> None:
    _d, a = await run_both(KEYS[0], KEYS[1], dialer_chain="other")
    assert "chain" in str(a)
    _d, a = await run_both(KEYS[0], KEYS[1], dialer_genesis=b"\x22" * 32)
    assert "genesis" in str(a)


async def test_self_connection_is_recognised() -> None:
    _d, a = await run_both(KEYS[0], KEYS[0])
    assert isinstance(a, SelfConnection)


def test_auth_binds_challenge_key_and_genesis() -> None:
    challenge = new_challenge()
    msg = auth_message(KEYS[0], CHAIN, challenge, GHASH)
    check_auth(msg, chain_id=CHAIN, their_key=KEYS[0].public_key, our_challenge=challenge,
               genesis_hash=GHASH)
    for kwargs in (
        {"our_challenge": new_challenge()},
        {"their_key": KEYS[1].public_key},
        {"genesis_hash": b"\x00" * 32},
        {"chain_id": "other"},
    ):
        args: dict[str, Any] = {"chain_id": CHAIN, "their_key": KEYS[0].public_key,
                                "our_challenge": challenge, "genesis_hash": GHASH, **kwargs}
        with pytest.raises(RemoteProtocolError):
            check_auth(msg, **args)


@pytest.mark.parametrize(
    "hello",
    [
        {"hello": "x"},
        {"hello": {"chain_id": CHAIN, "genesis_hash": GHASH, "key": b"short", "challenge": b"c" * 32}},
        {"hello": {"chain_id": CHAIN, "genesis_hash": GHASH, "key": KEYS[1].public_key,
                   "challenge": b"c"}},
        [1, 2],
    ],
)
def test_malformed_hello(hello: Any) -> None:
    with pytest.raises(MalformedFrame):
        parse_hello(hello, chain_id=CHAIN, genesis_hash=GHASH, validators=VALS,
                    own_key=KEYS[0].public_key)


def test_hello_round_trip() -> None:
    challenge = new_challenge()
    msg = hello_message(CHAIN, GHASH, KEYS[2], challenge)
    assert parse_hello(msg, chain_id=CHAIN, genesis_hash=GHASH, validators=VALS,
                       own_key=KEYS[0].public_key) == (KEYS[2].public_key, challenge)


async def test_full_send_queue_drops_the_connection() -> None:
    a, _b = trio.testing.memory_stream_pair()
    conn = Connection(a, remote="slow", max_queue_frames=2)
    scope = trio.CancelScope()  # what the owner would run the connection in
    conn.cancel_scope = scope
    assert conn.send({"n": 1})
    assert conn.send({"n": 2})
    assert not conn.send({"n": 3})  # nobody drains it: dropped, never blocks
    assert conn.closed
    assert scope.cancel_called
    assert not conn.send({"n": 4})


async def test_queued_bytes_are_bounded() -> None:
    a, _b = trio.testing.memory_stream_pair()
    conn = Connection(a, remote="slow", max_queue_bytes=1000)
    assert conn.send({"blob": b"x" * 600})
    assert not conn.send({"blob": b"x" * 600})
    assert conn.closed


async def test_frame_limit_rises_only_after_authentication() -> None:
    a, b = trio.testing.memory_stream_pair()
    conn = Connection(b, remote="peer")
    big = encode_frame({"blob": b"x" * (api.CLIENT_MAX_FRAME + 10)}, api.PEER_MAX_FRAME)
    await a.send_all(big[:4])
    with pytest.raises(FrameTooLarge):
        await conn.receive()
    conn2 = Connection(b, remote="peer")
    conn2.raise_frame_limit(api.PEER_MAX_FRAME)
    async with trio.open_nursery() as n:
        n.start_soon(a.send_all, big)
        msg = await conn2.receive()
    assert len(msg["blob"]) == api.CLIENT_MAX_FRAME + 10


async def test_request_gets_its_response_and_times_out_otherwise() -> None:
    left, right = pair()

    async def responder() -> None:
        msg = await right.receive()
        right.send({"id": msg["id"], "result": {"echo": msg["params"]["x"]}})
        msg = await right.receive()  # the second request is never answered

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(left.run_sender)
            n.start_soon(right.run_sender)
            n.start_soon(responder)

            async def reader() -> None:
                while True:
                    msg = await left.receive()
                    if msg is None:
                        return
                    left.deliver_response(msg)

            n.start_soon(reader)
            assert await left.request("echo", {"x": 5}, timeout_s=1) == {"echo": 5}
            with pytest.raises(LedgerTimeout):
                await left.request("echo", {"x": 6}, timeout_s=0.01)
            n.cancel_scope.cancel()
