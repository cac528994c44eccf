"""The shard-store protocol without I/O: messages, signatures, replay window, connection rules."""

from __future__ import annotations

import mmap
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.codec import pack
from ledger.errors import LocalProtocolError
from ledger.keys import KeyPair
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


def raw_frame(header: Any, payload: bytes = b"") -> bytes:
    """A frame of any header (not only a valid map) and payload."""
    body = pack(header)
    return struct.pack(">II", len(body), len(payload)) + body + payload


def feed(conn: w.ServerConnection, req: Any, payload: bytes = b"", *,
         into: bool = False) -> w.Request | w.NeedData:
    """Give ``conn`` a request (or a raw header map and payload) and take the next request;
    ``into``: read it the way the store reads a socket, for a connection with a payload
    buffer (see :func:`drive`)."""
    frame = w.ClientConnection.send(req) if hasattr(req, "to_wire") else raw_frame(req, payload)
    if into:
        return drive(conn, FakeSocket(frame, [1 << 30]))
    conn.receive_data(frame)
    return conn.next_request()


class FakeSocket:
    """A byte stream that gives at most the next of ``sizes`` (cycled) bytes per read, and
    records each read as (start, length, into the payload buffer)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes = data, sizes
        self.pos = 0
        self.reads: list[tuple[int, int, bool]] = []

    def _next(self, n: int) -> int:
        return min(n, self.sizes[len(self.reads) % len(self.sizes)], len(self.data) - self.pos)

    def recv(self, n: int) -> bytes:
        k = self._next(n)
        self.reads.append((self.pos, k, False))
        self.pos += k
        return self.data[self.pos - k : self.pos]

    def recv_into(self, view: memoryview) -> int:
        k = self._next(len(view))
        view[:k] = self.data[self.pos : self.pos + k]
        self.reads.append((self.pos, k, True))
        self.pos += k
        return k


def drive(conn: w.ServerConnection, sock: FakeSocket) -> w.Request | w.NeedData:
    """The next request, read as the store's driver reads a socket (zos_agent.shardstore
    serve_connection): the prefix and header with reads of at most ``head_needed`` bytes,
    the payload with ``recv_into`` the connection's buffer. NEED_DATA at the end of data."""
    while isinstance(req := conn.next_request(), w.NeedData):
        view = conn.payload_view()
        if view is not None:
            got = sock.recv_into(view)
            if not got:
                return w.NEED_DATA
            conn.commit_payload(got)
        else:
            data = sock.recv(conn.head_needed)
            if not data:
                return w.NEED_DATA
            conn.receive_data(data)
    return req


def response_frame(resp: w.Response) -> bytes:
    """An answer as the store encodes it, without a server connection's state."""
    head, payload = w.encode_frame(w.response_to_wire(resp), w.response_payload(resp))
    return head + payload


def hash_bytes(data: bytes) -> bytes:
    return w.content_hash(data)


_H = w.content_hash(b"")


# -- requests --------------------------------------------------------------------------------


def test_upload_put_append_stored_sequence() -> None:
    data = bytes(range(256)) * 10_000  # 2.56 MB: a put and two appends
    reqs = w.upload_requests(OWNER, CHAIN, NS, SID, data, nonce=5)
    assert [type(r) for r in reqs] == [w.Put, w.Append, w.Append]
    put = reqs[0]
    assert isinstance(put, w.Put)
    assert put.hash == w.content_hash(data)
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
        assert w.parse_response(w.response_to_wire(resp), w.response_payload(resp)) == resp
        client = w.ClientConnection()
        client.receive_data(response_frame(resp))
        assert client.next_response() == resp
    with pytest.raises(w.ShardRefused) as info:
        w.raise_for_error(w.Error(w.ErrorCode.QUOTA_EXCEEDED, "full"))
    assert info.value.code is w.ErrorCode.QUOTA_EXCEEDED


def test_signed_bytes_are_the_documented_ones() -> None:
    put = w.make_put(OWNER, CHAIN, NS, SID, 3, b"abc", 11, shard_hash=hash_bytes(b"abc"))
    expected = pack(["tfgrid/shard/v2", CHAIN, ["put", NS, SID, 3, hash_bytes(b"abc"), 11]])
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


@pytest.mark.parametrize("prefix", [
    struct.pack(">II", w.MAX_HEADER + 1, 0),  # oversized header
    struct.pack(">II", 100, w.MAX_CHUNK + 1),  # oversized payload
    struct.pack(">II", 2**32 - 1, 2**32 - 1),
])
def test_oversized_frame_is_refused_before_its_body(prefix: bytes) -> None:
    conn = w.ServerConnection()
    with pytest.raises(w.ShardProtocolError) as exc:
        conn.receive_data(prefix)  # the prefix alone: nothing of the body is needed
    assert exc.value.code is w.ErrorCode.TOO_LARGE
    frame = w.ServerConnection.error_frame(exc.value)
    client = w.ClientConnection()
    client.receive_data(frame)
    resp = client.next_response()
    assert isinstance(resp, w.Error)
    assert resp.code is w.ErrorCode.TOO_LARGE
    assert resp.fatal
    # the client refuses an oversized answer the same way, split prefix or not
    client = w.ClientConnection()
    client.receive_data(prefix[:5])
    with pytest.raises(w.ShardProtocolError) as exc:
        client.receive_data(prefix[5:])
    assert exc.value.code is w.ErrorCode.TOO_LARGE


def test_a_full_chunk_put_fits_the_frame_limit() -> None:
    data = b"\xff" * (3 * w.MAX_CHUNK)
    for req in w.upload_requests(OWNER, CHAIN, 2**62, SID, data, w.MAX_NONCE):
        head, payload = w.ClientConnection.send_parts(req)
        assert len(head) <= w.PREFIX_SIZE + w.MAX_HEADER
        assert len(payload) == w.MAX_CHUNK
        assert len(head) + len(payload) <= w.MAX_FRAME
    big = w.Data(w.MAX_SHARD_SIZE, hash_bytes(b""), 0, data[: w.MAX_CHUNK])
    server = w.ServerConnection()
    feed(server, w.Get(NS, SID))
    head, payload = server.send_parts(big)
    assert payload is big.data  # not copied
    assert len(head) + len(payload) <= w.MAX_FRAME
    with pytest.raises(LocalProtocolError):
        w.ClientConnection.send_parts(w.Append(NS, SID, 1, b"x" * (w.MAX_CHUNK + 1)))


def test_send_parts_does_not_copy_the_payload() -> None:
    buf = bytearray(b"q" * (2 * w.MAX_CHUNK))
    chunk = memoryview(buf)[w.MAX_CHUNK :]
    head, payload = w.ClientConnection.send_parts(w.Append(NS, SID, w.MAX_CHUNK, chunk))
    assert payload is chunk
    assert struct.unpack(">II", head[:8]) == (len(head) - 8, w.MAX_CHUNK)
    # a put of a memoryview of another format is sent as its bytes
    words = memoryview(bytearray(8)).cast("I")
    put = w.make_put(OWNER, CHAIN, NS, SID, 8, words, 1)
    got = roundtrip_request(put)
    assert isinstance(got, w.Put)
    assert got.data == bytes(8)


def test_a_payload_split_across_many_receives() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    put = w.make_put(OWNER, CHAIN, NS, SID, len(data), data, 3)
    frame = w.ClientConnection.send(put)
    conn = w.ServerConnection()
    assert conn.needed == w.PREFIX_SIZE
    sizes = [1, 2, 3, 5, 8, 13, 999, 65536]
    pos = i = 0
    while pos < len(frame):
        assert conn.next_request() is w.NEED_DATA
        n = sizes[i % len(sizes)]
        conn.receive_data(frame[pos : pos + n])
        pos, i = pos + n, i + 1
        assert conn.needed == max(len(frame) - pos, 0) or pos < w.PREFIX_SIZE
    got = conn.next_request()
    assert got == put
    assert conn.needed == w.PREFIX_SIZE


def test_a_payload_received_as_one_chunk_is_not_copied() -> None:
    data = b"p" * 5000
    head, payload = w.ClientConnection.send_parts(w.make_put(OWNER, CHAIN, NS, SID, 5000, data, 3))
    conn = w.ServerConnection()
    conn.receive_data(head)
    assert conn.next_request() is w.NEED_DATA
    assert conn.needed == len(data)
    conn.receive_data(payload)
    got = conn.next_request()
    assert isinstance(got, w.Put)
    assert got.data is payload


def test_several_frames_in_one_receive() -> None:
    data = b"k" * (2 * w.MAX_CHUNK + 77)
    reqs = w.upload_requests(OWNER, CHAIN, NS, SID, data, 4)
    stream = b"".join(w.ClientConnection.send(r) for r in reqs)
    conn = w.ServerConnection()
    conn.receive_data(stream + w.ClientConnection.send(w.Stat(NS))[:3])
    window = w.ReplayWindow()
    for req in reqs:
        got = conn.next_request()
        assert got == req
        if isinstance(got, w.Put):
            w.authorize(got, INFO, CHAIN, window)
        assert conn.upload is None or isinstance(got, w.Append)
        conn.send(w.Stored(len(data), hash_bytes(data)) if req is reqs[-1]
                  else w.Accepted(req.offset + len(req.data) if isinstance(req, w.Append)
                                  else len(req.data)))
    assert conn.next_request() is w.NEED_DATA  # the stat is not complete yet
    conn.receive_data(w.ClientConnection.send(w.Stat(NS))[3:])
    assert conn.next_request() == w.Stat(NS)
    # answers, several in one receive, on the client side
    client = w.ClientConnection()
    answers: list[w.Response] = [w.Accepted(1), w.Data(3, hash_bytes(b"abc"), 0, b"abc"),
                                 w.Data(3, hash_bytes(b"abc"), 3, b""), w.Deleted(3)]
    client.receive_data(b"".join(map(response_frame, answers)))
    assert [client.next_response() for _ in answers] == answers
    assert client.next_response() is w.NEED_DATA


# -- receiving payloads into the connection's buffer -----------------------------------------


def frame_spans(reqs: list[w.Request]) -> tuple[bytes, list[tuple[int, int, int]]]:
    """The requests' frames as one stream, and each frame's (start, end of header, end)."""
    spans, parts, pos = [], [], 0
    for req in reqs:
        head, payload = w.ClientConnection.send_parts(req)
        spans.append((pos, pos + len(head), pos + len(head) + len(payload)))
        parts += [head, bytes(payload)]
        pos = spans[-1][2]
    return b"".join(parts), spans


def answer(conn: w.ServerConnection, req: w.Request, total: int) -> None:
    """What the store would answer to each request of an upload (to advance the state)."""
    if isinstance(req, w.Put | w.Append):
        received = (req.offset if isinstance(req, w.Append) else 0) + len(req.data)
        conn.send(w.Accepted(received) if received < total else w.Stored(total, _H))
    else:
        conn.send(w.StatResult(0, 0, 0))


@pytest.mark.parametrize("sizes", [
    [1 << 30],  # each read gets all it asks for
    [1, 2, 3, 5, 8, 13, 999, 65536],
    [7, 4096, 1, 300_000],
])
def test_payloads_are_received_into_one_buffer(sizes: list[int]) -> None:
    data = bytes(range(256)) * 9000  # 2.3 MB: a put, an append of a full chunk, a short one
    reqs: list[w.Request] = [*w.upload_requests(OWNER, CHAIN, NS, SID, data, 3), w.Stat(NS),
                             w.Get(NS, SID, 1, 2)]
    stream, spans = frame_spans(reqs)
    sock = FakeSocket(stream, sizes)
    conn = w.ServerConnection(payload_buffer=True)
    assert conn.payload_view() is None
    assert conn.head_needed == conn.needed == w.PREFIX_SIZE
    buffers = set()
    for req in reqs:
        got = drive(conn, sock)
        assert got == req
        if isinstance(got, w.Put | w.Append):
            # a view of the connection's one buffer, not a copy; page-aligned (an anonymous
            # mapping), so the store can write it with O_DIRECT as it is
            assert isinstance(got.data, memoryview)
            assert isinstance(got.data.obj, mmap.mmap)
            assert len(got.data.obj) == w.MAX_CHUNK
            buffers.add(id(got.data.obj))
        answer(conn, got, len(data))
        del got
    assert len(buffers) == 1
    assert drive(conn, sock) is w.NEED_DATA
    assert sock.pos == len(stream)
    assert conn.needed == conn.head_needed == w.PREFIX_SIZE
    # no read crosses from a frame's head into its payload or into the next frame, and
    # every payload byte came in through recv_into
    for start, n, into in sock.reads[:-1]:  # the last one found the end of the data
        frame = next(s for s in spans if s[0] <= start < s[2])
        assert start + n <= (frame[2] if into else frame[1])
        assert into == (start >= frame[1])


def test_the_buffer_is_reused_and_a_request_must_be_finished_first() -> None:
    first, second = b"a" * w.MAX_CHUNK, b"b" * 600
    put = w.make_put(OWNER, CHAIN, NS, SID, w.MAX_CHUNK + 600, first, 1)
    append = w.Append(NS, SID, w.MAX_CHUNK, second)
    stream, _ = frame_spans([put, append])
    sock = FakeSocket(stream, [1 << 30])
    conn = w.ServerConnection(payload_buffer=True)
    got_put = drive(conn, sock)
    assert isinstance(got_put, w.Put)
    assert got_put.data == first
    with pytest.raises(LocalProtocolError):  # the put is not answered yet
        conn.next_request()
    conn.send(w.Accepted(w.MAX_CHUNK))
    got_append = drive(conn, sock)
    assert isinstance(got_append, w.Append)
    assert got_append.data == second
    assert isinstance(got_put.data, memoryview)
    assert isinstance(got_append.data, memoryview)
    assert got_put.data.obj is got_append.data.obj
    assert bytes(got_put.data[:600]) == second  # overwritten: why the store finishes first


def test_payload_buffer_takes_leftovers_from_receive_data() -> None:
    """Frames fed through receive_data, several at once or split anywhere, to a connection
    with a payload buffer: payload bytes already received go into the buffer, the next
    frame's bytes wait for it; then the rest of a payload comes through recv_into."""
    data = bytes(range(251)) * 9000
    reqs: list[w.Request] = [*w.upload_requests(OWNER, CHAIN, NS, SID, data, 3), w.Stat(NS)]
    stream, spans = frame_spans(reqs)
    conn = w.ServerConnection(payload_buffer=True)
    # the whole first frame, the second's head and 100 bytes of its payload, at once
    cut = spans[1][1] + 100
    conn.receive_data(memoryview(stream)[:cut])
    assert conn.next_request() == reqs[0]
    answer(conn, reqs[0], len(data))
    assert conn.next_request() is w.NEED_DATA
    assert conn.needed == spans[1][2] - cut
    assert conn.head_needed == 0
    view = conn.payload_view()
    assert view is not None
    assert len(view) == spans[1][2] - cut
    view[:10] = stream[cut : cut + 10]
    conn.commit_payload(10)
    # the rest of that payload, all of the next frame and a piece of the stat
    conn.receive_data(stream[cut + 10 : spans[3][0] + 3])
    for req in reqs[1:3]:
        got = conn.next_request()
        assert got == req
        answer(conn, req, len(data))
    assert conn.next_request() is w.NEED_DATA
    assert conn.payload_view() is None
    conn.receive_data(stream[spans[3][0] + 3 :])
    assert conn.next_request() == w.Stat(NS)


@settings(deadline=None, max_examples=40)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 700_000)), min_size=1, max_size=30),
       st.integers(0, 2 * w.MAX_CHUNK + 300))
def test_any_mix_of_reads_gives_the_same_requests(reads: list[tuple[bool, int]],
                                                  size: int) -> None:
    """Reads of any size, each either a receive_data of raw bytes (which may run past the
    frame) or a recv_into the payload view when there is one: the requests are those a
    connection without a buffer decodes."""
    data = (bytes(range(253)) * (size // 253 + 1))[:size]
    reqs: list[w.Request] = [w.Stat(NS), *w.upload_requests(OWNER, CHAIN, NS, SID, data, 3),
                             w.Verify(NS, SID)]
    stream, _ = frame_spans(reqs)
    conn = w.ServerConnection(payload_buffer=True)
    pos = i = 0
    got: list[w.Request] = []
    while len(got) < len(reqs):
        req = conn.next_request()
        if not isinstance(req, w.NeedData):
            got.append(req)
            assert req == reqs[len(got) - 1]  # compared before the buffer is reused
            answer(conn, req, len(data))
            continue
        raw, n = reads[i % len(reads)]
        i += 1
        view = conn.payload_view()
        if view is not None and not raw:
            k = min(n, len(view))
            view[:k] = stream[pos : pos + k]
            conn.commit_payload(k)
        else:
            k = min(n, len(stream) - pos)
            conn.receive_data(stream[pos : pos + k])
        pos += k
    assert pos == len(stream)


def test_payload_buffer_limits_and_misuse() -> None:
    # the prefix is checked before anything else is read, the buffer is not even allocated
    for prefix in (struct.pack(">II", w.MAX_HEADER + 1, 0), struct.pack(">II", 9, w.MAX_CHUNK + 1)):
        conn = w.ServerConnection(payload_buffer=True)
        sock = FakeSocket(prefix + b"\0" * 100, [1 << 30])
        with pytest.raises(w.ShardProtocolError) as exc:
            drive(conn, sock)
        assert exc.value.code is w.ErrorCode.TOO_LARGE
        assert sock.pos == w.PREFIX_SIZE
    # a full chunk fits; committing more than the payload lacks is the driver's bug
    put = w.make_put(OWNER, CHAIN, NS, SID, w.MAX_CHUNK, b"m" * w.MAX_CHUNK, 1)
    head, _ = w.ClientConnection.send_parts(put)
    conn = w.ServerConnection(payload_buffer=True)
    with pytest.raises(LocalProtocolError):
        conn.commit_payload(1)  # no payload being received
    conn.receive_data(head)
    assert conn.next_request() is w.NEED_DATA
    view = conn.payload_view()
    assert view is not None
    assert len(view) == w.MAX_CHUNK == conn.needed
    with pytest.raises(LocalProtocolError):
        conn.commit_payload(w.MAX_CHUNK + 1)
    with pytest.raises(LocalProtocolError):
        conn.commit_payload(-1)
    view[:] = b"m" * w.MAX_CHUNK
    conn.commit_payload(w.MAX_CHUNK)
    assert conn.payload_view() is None
    with pytest.raises(LocalProtocolError):
        conn.commit_payload(1)  # complete: nothing more to receive into
    assert conn.next_request() == put


def test_the_payload_buffer_is_allocated_on_the_first_payload() -> None:
    """A connection that only reads (gets, verifies) never holds a payload buffer."""
    import tracemalloc

    def peak(reqs: list[w.Request]) -> int:
        conn = w.ServerConnection(payload_buffer=True)
        sock = FakeSocket(frame_spans(reqs)[0], [1 << 30])
        tracemalloc.start()
        try:
            for req in reqs:
                got = drive(conn, sock)
                assert got == req
                answer(conn, got, w.MAX_CHUNK + 1)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak([w.Get(NS, SID, i, 100) for i in range(50)]) < w.MAX_CHUNK // 2
    put = w.make_put(OWNER, CHAIN, NS, SID, w.MAX_CHUNK + 1, b"p" * w.MAX_CHUNK, 1)
    assert peak([w.Get(NS, SID), put]) >= w.MAX_CHUNK


# -- the content hash ------------------------------------------------------------------------


def test_content_hash_is_the_documented_one() -> None:
    import blake3

    data = bytes(range(256)) * 2049  # two full blocks and a short one
    table = b"".join(blake3.blake3(data[i : i + w.BLOCK_SIZE]).digest()
                     for i in range(0, len(data), w.BLOCK_SIZE))
    assert len(table) == 3 * 32
    expected = blake3.blake3(w.CONTENT_DOMAIN + struct.pack(">QI", len(data), w.BLOCK_SIZE)
                             + table).digest()
    assert w.content_hash(data) == expected
    hasher = w.ContentHasher()
    hasher.update(data)
    assert hasher.finish() == (table, expected)
    # the empty shard: no blocks
    empty = blake3.blake3(w.CONTENT_DOMAIN + struct.pack(">QI", 0, w.BLOCK_SIZE)).digest()
    assert w.content_hash(b"") == empty == w.ContentHasher().finish()[1]
    assert w.content_hash(b"\0") != empty
    # a shard that fills its blocks exactly differs from one a byte longer or shorter
    exact = b"e" * w.BLOCK_SIZE
    assert len({w.content_hash(exact), w.content_hash(exact + b"e"),
                w.content_hash(exact[:-1])}) == 3


@settings(deadline=None, max_examples=60)
@given(st.lists(st.integers(0, 3 * w.BLOCK_SIZE), max_size=6), st.integers(0, 250))
def test_content_hash_does_not_depend_on_how_data_is_fed(sizes: list[int], seed: int) -> None:
    total = sum(sizes)
    data = (bytes(range(251)) * (total // 251 + 2))[seed : seed + total]
    hasher = w.ContentHasher()
    pos = 0
    for n in sizes:
        hasher.update(memoryview(data)[pos : pos + n])
        pos += n
    assert hasher.finish()[1] == w.content_hash(data)
    assert hasher.size == len(data)


# -- malformed frames and messages -----------------------------------------------------------


GOOD_PUT = w.make_put(OWNER, CHAIN, NS, SID, 1, b"a", 1).to_wire()


@pytest.mark.parametrize(("msg", "payload", "code"), [
    ([1, 2], b"", w.ErrorCode.MALFORMED),
    ({"op": "get"}, b"", w.ErrorCode.UNSUPPORTED_VERSION),
    ({**GOOD_PUT, "v": 1}, b"a", w.ErrorCode.UNSUPPORTED_VERSION),
    ({**GOOD_PUT, "op": "rename"}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "extra": 1}, b"a", w.ErrorCode.MALFORMED),
    ({k: v for k, v in GOOD_PUT.items() if k != "sig"}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "shard_id": b"short"}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "ns": -1}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "ns": True}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "nonce": 0}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "size": 2}, b"a", w.ErrorCode.MALFORMED),  # first chunk must be min(size, chunk)
    (GOOD_PUT, b"", w.ErrorCode.MALFORMED),  # ... and it travels as the payload
    (GOOD_PUT, b"ab", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "size": w.MAX_SHARD_SIZE + 1}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "hash": b"x" * 31}, b"a", w.ErrorCode.MALFORMED),
    ({**GOOD_PUT, "data": b"a"}, b"a", w.ErrorCode.MALFORMED),  # data is not a header field
    ({**w.Get(NS, SID).to_wire(), "length": w.MAX_CHUNK + 1}, b"", w.ErrorCode.MALFORMED),
    (w.Get(NS, SID).to_wire(), b"x", w.ErrorCode.MALFORMED),  # a payload where none belongs
    (w.Stat(NS).to_wire(), b"x", w.ErrorCode.MALFORMED),
    (w.make_delete(OWNER, CHAIN, NS, SID, 1).to_wire(), b"x", w.ErrorCode.MALFORMED),
    (w.Append(NS, SID, 5, b"x").to_wire(), b"", w.ErrorCode.MALFORMED),  # an empty append
    (w.Append(NS, SID, 5, b"x").to_wire(), b"x", w.ErrorCode.BAD_STATE),  # no upload open
])
@pytest.mark.parametrize("into", [False, True], ids=["receive_data", "payload_buffer"])
def test_malformed_requests_are_protocol_errors(msg: Any, payload: bytes,
                                                code: w.ErrorCode, into: bool) -> None:
    conn = w.ServerConnection(payload_buffer=into)
    with pytest.raises(w.ShardProtocolError) as exc:
        feed(conn, msg, payload, into=into)
    assert exc.value.code is code
    assert w.Error(code, "").fatal


def test_an_oversized_payload_given_directly_is_too_large() -> None:
    with pytest.raises(w.ShardProtocolError) as exc:
        w.parse_request({**GOOD_PUT, "size": w.MAX_CHUNK + 1}, b"a" * (w.MAX_CHUNK + 1))
    assert exc.value.code is w.ErrorCode.TOO_LARGE


@pytest.mark.parametrize("frame", [
    struct.pack(">II", 3, 0) + b"\xc1\xc1\xc1",  # not msgpack
    struct.pack(">II", 0, 0),  # no header at all
    struct.pack(">II", 2, 0) + pack(7) + pack(7),  # two values
])
def test_garbage_bytes_are_malformed(frame: bytes) -> None:
    conn = w.ServerConnection()
    conn.receive_data(frame)
    with pytest.raises(w.ShardProtocolError) as exc:
        conn.next_request()
    assert exc.value.code is w.ErrorCode.MALFORMED


@pytest.mark.parametrize("into", [False, True], ids=["receive_data", "payload_buffer"])
def test_append_must_continue_the_open_upload(into: bool) -> None:
    data = b"z" * (2 * w.MAX_CHUNK + 10)
    put, *appends = w.upload_requests(OWNER, CHAIN, NS, SID, data, 1)
    conn = w.ServerConnection(payload_buffer=into)
    feed(conn, put, into=into)
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
        fresh = w.ServerConnection(payload_buffer=into)
        feed(fresh, put, into=into)
        fresh.send(w.Accepted(w.MAX_CHUNK))
        with pytest.raises(w.ShardProtocolError) as exc:
            feed(fresh, req, into=into)
        assert exc.value.code is w.ErrorCode.BAD_STATE
    # past the announced size
    over = w.ServerConnection(payload_buffer=into)
    feed(over, w.make_put(OWNER, CHAIN, NS, SID, w.MAX_CHUNK + 1, b"z" * w.MAX_CHUNK, 1),
         into=into)
    over.send(w.Accepted(w.MAX_CHUNK))
    with pytest.raises(w.ShardProtocolError):
        feed(over, w.Append(NS, SID, w.MAX_CHUNK, b"zz"), into=into)
    # the good continuation
    assert feed(conn, appends[0], into=into) == appends[0]


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



@pytest.mark.parametrize(("msg", "payload"), [
    ([], b""), ({"v": 2, "ok": 1}, b""), ({"v": 2, "ok": True, "r": "nope"}, b""),
    ({"v": 1, "ok": True, "r": "accepted", "received": 1}, b""),
    ({"v": 2, "ok": False, "code": "weird", "message": ""}, b""),
    ({"v": 2, "ok": True, "r": "stored", "size": 1, "hash": b"short"}, b""),
    ({"v": 2, "ok": True, "r": "stat", "used": 1, "quota": 2}, b""),
    ({"v": 2, "ok": True, "r": "stored", "size": 1, "hash": _H}, b"x"),  # payload not allowed
    ({"v": 2, "ok": False, "code": "replay", "message": ""}, b"x"),
    ({"v": 2, "ok": True, "r": "data", "size": 1, "hash": _H, "offset": 0, "data": b"x"}, b""),
])
def test_malformed_responses_are_protocol_errors(msg: Any, payload: bytes) -> None:
    with pytest.raises(w.ShardProtocolError):
        w.parse_response(msg, payload)
    client = w.ClientConnection()
    client.receive_data(raw_frame(msg, payload))
    with pytest.raises(w.ShardProtocolError):
        client.next_response()


def test_next_nonce_increases() -> None:
    assert w.next_nonce(0, 1000) == 1000
    assert w.next_nonce(1000, 1000) == 1001
    assert w.next_nonce(5, 0) == 6


def test_the_payload_buffer_is_released_only_between_frames() -> None:
    """A quiet connection may drop its payload buffer between frames (the next payload gets
    a new one), never while a payload is being received into it."""
    data = bytes(range(256)) * 9000
    reqs = w.upload_requests(OWNER, CHAIN, NS, SID, data, 3)
    stream, _ = frame_spans(reqs)
    conn = w.ServerConnection(payload_buffer=True)
    assert not conn.holds_buffer
    assert conn.release_buffer()  # nothing to drop: fine
    sock = FakeSocket(stream, [1 << 30])
    first = drive(conn, sock)
    assert first == reqs[0]
    assert conn.holds_buffer
    answer(conn, first, len(data))
    del first
    assert conn.release_buffer()
    assert not conn.holds_buffer
    # half of the next frame's payload: the buffer is in use and stays
    half = FakeSocket(stream[sock.pos : sock.pos + 200 + w.MAX_CHUNK // 2], [1 << 30])
    assert drive(conn, half) is w.NEED_DATA
    assert conn.holds_buffer
    assert not conn.release_buffer()
    assert conn.holds_buffer
    rest = FakeSocket(stream[sock.pos + half.pos :], [1 << 30])
    second = drive(conn, rest)
    assert second == reqs[1]
