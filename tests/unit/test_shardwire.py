"""The shard-store protocol without I/O: messages, signatures, replay window, connection rules."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.codec import hash_bytes, pack
from ledger.errors import LocalProtocolError
from ledger.keys import KeyPair
from ledger.wire import encode_frame
from zos_agent import shardwire as w

CHAIN = "test-chain"
OWNER = KeyPair.from_seed(b"\x01" * 32)
OTHER = KeyPair.from_seed(b"\x02" * 32)
NS = 7
INFO = w.NamespaceInfo(OWNER.public_key, 10 * w.MAX_CHUNK)
SID = bytes(range(32))


def roundtrip_request(req: w.Request) -> w.Request:
    """Through bytes and a server connection, as the store sees it."""
    conn = w.ServerConnection()
    conn.receive_data(w.ClientConnection.send(req))
    got = conn.next_request()
    assert not isinstance(got, w.NeedData)
    return got


def feed(conn: w.ServerConnection, req: Any) -> w.Request | w.NeedData:
    msg = req.to_wire() if hasattr(req, "to_wire") else req
    conn.receive_data(encode_frame(msg, w.MAX_FRAME))
    return conn.next_request()


# -- requests --------------------------------------------------------------------------------


def test_upload_put_append_stored_sequence() -> None:
    data = bytes(range(256)) * 10_000  # 2.56 MB: a put and two appends
    reqs = w.upload_requests(OWNER, CHAIN, NS, SID, data, nonce=5)
    assert [type(r) for r in reqs] == [w.Put, w.Append, w.Append]
    put = reqs[0]
    assert isinstance(put, w.Put)
    assert put.hash == hash_bytes(data)
    assert put.size == len(data)
    assert b"".join(r.data for r in reqs) == data
    server, client = w.ServerConnection(), w.ClientConnection()
    window = w.ReplayWindow()
    received = 0
    for i, req in enumerate(reqs):
        server.receive_data(client.send(req))
        got = server.next_request()
        assert got == req
        if isinstance(got, w.Put):
            w.authorize(got, INFO, CHAIN, window)
        received += len(req.data)
        resp: w.Response = (w.Stored(len(data), hash_bytes(data)) if i == len(reqs) - 1
                            else w.Accepted(received))
        client.receive_data(server.send(resp))
        assert client.next_response() == resp
    assert server.upload is None
    assert not window.is_fresh(5)


def test_small_shard_is_one_put() -> None:
    reqs = w.upload_requests(OWNER, CHAIN, NS, SID, b"tiny", nonce=1)
    assert len(reqs) == 1
    assert isinstance(reqs[0], w.Put)
    assert reqs[0].is_complete
    empty = w.upload_requests(OWNER, CHAIN, NS, SID, b"", nonce=2)
    assert len(empty) == 1
    assert empty[0].data == b""
    assert roundtrip_request(empty[0]) == empty[0]


def test_get_delete_stat_verify_roundtrip() -> None:
    for req in (w.Get(NS, SID, 5, 100), w.make_delete(OWNER, CHAIN, NS, SID, 9), w.Stat(NS),
                w.Verify(NS, SID)):
        assert roundtrip_request(req) == req


def test_responses_roundtrip() -> None:
    h = hash_bytes(b"x")
    for resp in (w.Accepted(3), w.Stored(3, h), w.Data(10, h, 2, b"abc"), w.Deleted(10),
                 w.StatResult(1, 2, 3), w.Verified(3, h),
                 w.Error(w.ErrorCode.REPLAY, "nope")):
        assert w.parse_response(w.response_to_wire(resp)) == resp
    with pytest.raises(w.ShardRefused) as info:
        w.raise_for_error(w.Error(w.ErrorCode.QUOTA_EXCEEDED, "full"))
    assert info.value.code is w.ErrorCode.QUOTA_EXCEEDED


def test_signed_bytes_are_the_documented_ones() -> None:
    put = w.make_put(OWNER, CHAIN, NS, SID, 3, b"abc", 11, shard_hash=hash_bytes(b"abc"))
    expected = pack(["tfgrid/shard/v1", CHAIN, ["put", NS, SID, 3, hash_bytes(b"abc"), 11]])
    assert w.request_sign_bytes(CHAIN, put.signed_body()) == expected
    dele = w.make_delete(OWNER, CHAIN, NS, SID, 12)
    assert dele.signed_body() == ["delete", NS, SID, 0, b"", 12]


# -- authorization ---------------------------------------------------------------------------


def test_good_put_and_delete_are_authorized() -> None:
    window = w.ReplayWindow()
    w.authorize(w.make_put(OWNER, CHAIN, NS, SID, 1, b"a", 1), INFO, CHAIN, window)
    w.authorize(w.make_delete(OWNER, CHAIN, NS, SID, 2), INFO, CHAIN, window)
    assert not window.is_fresh(1)
    assert not window.is_fresh(2)
    assert window.is_fresh(3)


def _code(req: w.SignedRequest, info: w.NamespaceInfo | None = INFO,
          window: w.ReplayWindow | None = None, chain: str = CHAIN) -> w.ErrorCode:
    window = window if window is not None else w.ReplayWindow()
    before = window.to_wire()
    with pytest.raises(w.ShardRefused) as exc:
        w.authorize(req, info, chain, window)
    assert window.to_wire() == before  # a refused request uses no nonce
    return exc.value.code


def test_wrong_owner_is_refused() -> None:
    assert _code(w.make_put(OTHER, CHAIN, NS, SID, 1, b"a", 1)) is w.ErrorCode.NOT_OWNER
    assert _code(w.make_delete(OTHER, CHAIN, NS, SID, 1)) is w.ErrorCode.NOT_OWNER


def test_bad_signature_is_refused() -> None:
    put = w.make_put(OWNER, CHAIN, NS, SID, 1, b"a", 1)
    forged = w.Put(put.ns, put.shard_id, put.size, put.hash, put.nonce, OWNER.public_key,
                   OTHER.sign(w.request_sign_bytes(CHAIN, put.signed_body())), put.data)
    assert _code(forged) is w.ErrorCode.BAD_SIGNATURE
    # A valid signature over other fields does not carry over.
    moved = w.Put(NS + 1, put.shard_id, put.size, put.hash, put.nonce, put.owner, put.sig,
                  put.data)
    assert _code(moved, w.NamespaceInfo(OWNER.public_key, 100)) is w.ErrorCode.BAD_SIGNATURE
    other_id = w.Delete(NS, b"\x00" * 32, 1, OWNER.public_key,
                        w.make_delete(OWNER, CHAIN, NS, SID, 1).sig)
    assert _code(other_id) is w.ErrorCode.BAD_SIGNATURE
    assert _code(put, chain="other-chain") is w.ErrorCode.BAD_SIGNATURE


def test_unknown_namespace_is_refused() -> None:
    assert _code(w.make_put(OWNER, CHAIN, NS, SID, 1, b"a", 1), None) is \
        w.ErrorCode.UNKNOWN_NAMESPACE


def test_replay_is_refused() -> None:
    window = w.ReplayWindow()
    put = w.make_put(OWNER, CHAIN, NS, SID, 1, b"a", 100)
    w.authorize(put, INFO, CHAIN, window)
    assert _code(put, window=window) is w.ErrorCode.REPLAY
    # Out of order is fine; the same nonce on another request is not.
    w.authorize(w.make_delete(OWNER, CHAIN, NS, SID, 50), INFO, CHAIN, window)
    assert _code(w.make_delete(OWNER, CHAIN, NS, SID, 100), window=window) is w.ErrorCode.REPLAY


def test_replay_window_survives_persistence_and_overflow() -> None:
    window = w.ReplayWindow()
    for n in range(1, w.REPLAY_WINDOW + 11):
        window.record(n)
    assert window.floor == 10
    for n in (1, 10, 11, w.REPLAY_WINDOW + 10):
        assert not window.is_fresh(n)
    restored = w.ReplayWindow.from_wire(window.to_wire())
    assert restored.to_wire() == window.to_wire()
    with pytest.raises(w.ShardRefused):
        restored.record(500)
    restored.record(w.REPLAY_WINDOW + 11)


@given(st.lists(st.integers(1, 5000), max_size=3000))
def test_replay_window_never_accepts_a_nonce_twice(nonces: list[int]) -> None:
    window = w.ReplayWindow()
    accepted: set[int] = set()
    for n in nonces:
        if window.is_fresh(n):
            assert n not in accepted
            window.record(n)
            accepted.add(n)
        window = w.ReplayWindow.from_wire(window.to_wire()) if n % 97 == 0 else window


# -- malformed and oversized -----------------------------------------------------------------


def test_oversized_frame_is_refused_before_its_body() -> None:
    conn = w.ServerConnection()
    with pytest.raises(w.ShardProtocolError) as exc:
        conn.receive_data(struct.pack(">I", w.MAX_FRAME + 1))
    assert exc.value.code is w.ErrorCode.TOO_LARGE
    frame = w.ServerConnection.error_frame(exc.value)
    client = w.ClientConnection()
    client.receive_data(frame)
    resp = client.next_response()
    assert isinstance(resp, w.Error)
    assert resp.code is w.ErrorCode.TOO_LARGE
    assert resp.fatal


def test_a_full_chunk_put_fits_the_frame_limit() -> None:
    data = b"\xff" * (3 * w.MAX_CHUNK)
    for req in w.upload_requests(OWNER, CHAIN, 2**62, SID, data, w.MAX_NONCE):
        assert len(w.ClientConnection.send(req)) <= w.MAX_FRAME + 4
    big = w.Data(w.MAX_SHARD_SIZE, hash_bytes(b""), 0, data[: w.MAX_CHUNK])
    assert len(encode_frame(w.response_to_wire(big), w.MAX_FRAME)) <= w.MAX_FRAME + 4


GOOD_PUT = w.make_put(OWNER, CHAIN, NS, SID, 1, b"a", 1).to_wire()


@pytest.mark.parametrize(("msg", "code"), [
    ([1, 2], w.ErrorCode.MALFORMED),
    ({"op": "get"}, w.ErrorCode.UNSUPPORTED_VERSION),
    ({**GOOD_PUT, "v": 2}, w.ErrorCode.UNSUPPORTED_VERSION),
    ({**GOOD_PUT, "op": "rename"}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "extra": 1}, w.ErrorCode.MALFORMED),
    ({k: v for k, v in GOOD_PUT.items() if k != "sig"}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "shard_id": b"short"}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "ns": -1}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "ns": True}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "nonce": 0}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "size": 2}, w.ErrorCode.MALFORMED),  # first chunk must be min(size, chunk)
    ({**GOOD_PUT, "size": w.MAX_SHARD_SIZE + 1}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "hash": b"x" * 31}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "data": "a"}, w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "data": b"a" * (w.MAX_CHUNK + 1), "size": w.MAX_CHUNK + 1},
     w.ErrorCode.TOO_LARGE),
    ({**w.Get(NS, SID).to_wire(), "length": w.MAX_CHUNK + 1}, w.ErrorCode.MALFORMED),
    (w.Append(NS, SID, 5, b"x").to_wire(), w.ErrorCode.BAD_STATE),  # no upload open
])
def test_malformed_requests_are_protocol_errors(msg: Any, code: w.ErrorCode) -> None:
    conn = w.ServerConnection()
    with pytest.raises(w.ShardProtocolError) as exc:
        feed(conn, msg)
    assert exc.value.code is code
    assert w.Error(code, "").fatal


def test_garbage_bytes_are_malformed() -> None:
    conn = w.ServerConnection()
    conn.receive_data(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    with pytest.raises(w.ShardProtocolError) as exc:
        conn.next_request()
    assert exc.value.code is w.ErrorCode.MALFORMED


def test_append_must_continue_the_open_upload() -> None:
    data = b"z" * (2 * w.MAX_CHUNK + 10)
    put, *appends = w.upload_requests(OWNER, CHAIN, NS, SID, data, 1)
    conn = w.ServerConnection()
    feed(conn, put)
    conn.send(w.Accepted(w.MAX_CHUNK))
    assert conn.upload is not None
    assert conn.upload.received == w.MAX_CHUNK
    bad = [
        w.Append(NS, SID, w.MAX_CHUNK + 1, b"z"),  # a gap
        w.Append(NS, b"\x09" * 32, w.MAX_CHUNK, b"z"),  # another shard
        w.Append(NS + 1, SID, w.MAX_CHUNK, b"z"),  # another namespace
        w.Append(NS, SID, 2 * w.MAX_CHUNK, b"z" * w.MAX_CHUNK),  # offset wrong
        w.Stat(NS),  # something else in the middle of an upload
    ]
    for req in bad:
        fresh = w.ServerConnection()
        feed(fresh, put)
        fresh.send(w.Accepted(w.MAX_CHUNK))
        with pytest.raises(w.ShardProtocolError) as exc:
            feed(fresh, req)
        assert exc.value.code is w.ErrorCode.BAD_STATE
    # past the announced size
    over = w.ServerConnection()
    feed(over, w.make_put(OWNER, CHAIN, NS, SID, w.MAX_CHUNK + 1, b"z" * w.MAX_CHUNK, 1))
    over.send(w.Accepted(w.MAX_CHUNK))
    with pytest.raises(w.ShardProtocolError):
        feed(over, w.Append(NS, SID, w.MAX_CHUNK, b"zz"))
    # the good continuation
    assert feed(conn, appends[0]) == appends[0]


def test_an_error_answer_closes_the_upload() -> None:
    put = w.make_put(OWNER, CHAIN, NS, SID, w.MAX_CHUNK + 1, b"z" * w.MAX_CHUNK, 1)
    conn = w.ServerConnection()
    feed(conn, put)
    conn.send(w.Error(w.ErrorCode.QUOTA_EXCEEDED, "full"))
    assert conn.upload is None
    with pytest.raises(w.ShardProtocolError):
        feed(conn, w.Append(NS, SID, w.MAX_CHUNK, b"z"))


def test_connection_misuse_is_a_local_error() -> None:
    conn = w.ServerConnection()
    with pytest.raises(LocalProtocolError):
        conn.send(w.Deleted(1))
    feed(conn, w.Stat(NS))
    with pytest.raises(LocalProtocolError):
        conn.next_request()
    with pytest.raises(LocalProtocolError):
        conn.send(w.Accepted(1))  # accepted only answers a put/append
    with pytest.raises(LocalProtocolError):
        w.make_put(OWNER, CHAIN, NS, SID, 3, b"ab", 1)
    with pytest.raises(LocalProtocolError):
        w.make_delete(OWNER, CHAIN, NS, b"short", 1)


@pytest.mark.parametrize("msg", [
    [], {"v": 1, "ok": 1}, {"v": 1, "ok": True, "r": "nope"},
    {"v": 1, "ok": False, "code": "weird", "message": ""},
    {"v": 1, "ok": True, "r": "stored", "size": 1, "hash": b"short"},
    {"v": 1, "ok": True, "r": "stat", "used": 1, "quota": 2},
])
def test_malformed_responses_are_protocol_errors(msg: Any) -> None:
    with pytest.raises(w.ShardProtocolError):
        w.parse_response(msg)


def test_next_nonce_increases() -> None:
    assert w.next_nonce(0, 1000) == 1000
    assert w.next_nonce(1000, 1000) == 1001
    assert w.next_nonce(5, 0) == 6
