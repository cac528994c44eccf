"""The client end of the shard-store protocol over trio streams.

A thin driver of :class:`zos_agent.shardwire.ClientConnection` (the one sans-IO module both
sides share): requests answered in order on one connection (several may be in flight), every
wait bounded by a timeout, every failure mapped to :class:`ShardStoreError` with a stable
``code`` (the store's own error code, or ``unreachable``, ``timeout``, ``protocol``).
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

import trio

from ledger import keys
from ledger.errors import LocalProtocolError
from threebot.storage.errors import ShardStoreError
from zos_agent import shardwire as w

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]
# A read asks the socket for what the answer being read still lacks, clamped to
# _RECV.._MAX_RECV (reads of 512 KiB or more cost 2-4 times the CPU per byte: each one
# allocates its full size).
_RECV = 1 << 16
_MAX_RECV = 1 << 18
_JOIN_BELOW = 1 << 16  # a payload this small is sent in one piece with its head
_ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port). Raises :class:`ShardStoreError`."""
    m = _ENDPOINT.fullmatch(endpoint or "")
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ShardStoreError("unreachable", f"no usable endpoint {endpoint!r}")
    return m.group(1).strip("[]"), int(m.group(2))


async def open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class NonceSource:
    """Strictly increasing nonces for signed writes, seeded from a microsecond clock (passed
    in) so that they also increase across client restarts, as the store's replay window wants."""

    def __init__(self, clock_us: Callable[[], int]) -> None:
        self._clock_us = clock_us
        self._last = 0

    def next(self) -> int:
        self._last = w.next_nonce(self._last, self._clock_us())
        return self._last


class ShardConnection:
    """One connection to a shard store. Use :meth:`open`; close with :meth:`aclose`.

    After any error other than a refusal by the store (``ShardStoreError`` with a shardwire
    code) the connection is broken and must not be reused.
    """

    def __init__(self, stream: trio.abc.Stream, endpoint: str, timeout_s: float) -> None:
        self.endpoint = endpoint
        self._stream = stream
        self._conn = w.ClientConnection()
        self._timeout_s = timeout_s
        self.broken = False
        self.pending = 0  # requests sent whose answers have not been received yet

    @classmethod
    async def open(cls, endpoint: str, connect: Connector, connect_timeout_s: float,
                   timeout_s: float) -> ShardConnection:
        """Connect to ``endpoint``; each later request may take ``timeout_s``.

        Raises :class:`ShardStoreError` (``unreachable``/``timeout``).
        """
        host, port = parse_endpoint(endpoint)
        try:
            with trio.fail_after(connect_timeout_s):
                stream = await connect(host, port)
        except trio.TooSlowError:
            raise ShardStoreError(
                "timeout", f"{endpoint}: no connection within {connect_timeout_s:g}s") from None
        except OSError as exc:
            raise ShardStoreError("unreachable", f"{endpoint}: {exc.strerror or exc}") from None
        return cls(stream, endpoint, timeout_s)

    async def aclose(self) -> None:
        self.broken = True
        await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> ShardConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map transport and protocol failures to :class:`ShardStoreError` (connection broken)."""
        try:
            yield
        except ShardStoreError:
            self.broken = True
            raise
        except trio.TooSlowError:
            self.broken = True
            raise ShardStoreError("timeout", f"{self.endpoint}: no answer within {self._timeout_s:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.broken = True
            raise ShardStoreError("unreachable", f"{self.endpoint}: {exc}") from None
        except (w.ShardProtocolError, LocalProtocolError) as exc:
            self.broken = True
            raise ShardStoreError("protocol", f"{self.endpoint}: {exc}") from None

    async def send_request(self, req: w.Request) -> None:
        """Send ``req`` without waiting for its answer (pipelining): the store answers requests
        in order, so every request sent must later be matched by one :meth:`receive_response`.

        Raises :class:`ShardStoreError` (``timeout``, ``unreachable``; the connection is then
        broken).
        """
        if self.broken:
            raise ShardStoreError("unreachable", f"{self.endpoint}: connection already failed")
        with self._errors(), trio.fail_after(self._timeout_s):
            head, payload = self._conn.send_parts(req)  # the payload is not copied
            if w.nbytes(payload) < _JOIN_BELOW:
                await self._stream.send_all(head + payload if payload else head)
            else:
                await self._stream.send_all(head)
                await self._stream.send_all(payload)
        self.pending += 1

    async def receive_response(self) -> w.Response:
        """The (non-error) answer to the oldest request sent and not yet answered.

        Raises :class:`ShardStoreError`: the store's code when it refused the request (the
        connection is then broken if the refusal is fatal or other requests are in flight),
        else ``timeout``, ``unreachable`` or ``protocol`` (the connection is then broken).
        """
        if self.broken:
            raise ShardStoreError("unreachable", f"{self.endpoint}: connection already failed")
        if self.pending <= 0:
            self.broken = True
            raise ShardStoreError("protocol", f"{self.endpoint}: no request awaits an answer")
        with self._errors(), trio.fail_after(self._timeout_s):
            while True:
                resp = self._conn.next_response()
                if not isinstance(resp, w.NeedData):
                    break
                data = await self._stream.receive_some(
                    min(max(self._conn.needed, _RECV), _MAX_RECV))
                if not data:
                    raise ShardStoreError("unreachable", f"{self.endpoint}: the store closed the connection")
                self._conn.receive_data(data)
        self.pending -= 1
        if isinstance(resp, w.Error):
            if resp.fatal or self.pending:
                self.broken = True
            raise ShardStoreError(resp.code.value, f"{self.endpoint}: {resp.message}")
        return resp

    async def request(self, req: w.Request) -> w.Response:
        """Send ``req`` and return the (non-error) answer (no other request may be in flight).

        Raises :class:`ShardStoreError`: the store's code when it refused the request, else
        ``timeout``, ``unreachable`` or ``protocol`` (the connection is then broken).
        """
        if self.pending:
            self.broken = True
            raise ShardStoreError("protocol", f"{self.endpoint}: a request while others are in flight")
        await self.send_request(req)
        return await self.receive_response()

    async def get_object(self, ns: int, shard_id: bytes, max_size: int) -> bytes:
        """A whole stored object of at most ``max_size`` bytes, by ranged gets (the chunks
        joined once; an object of one chunk is returned as received)."""
        parts: list[bytes | memoryview] = []
        got = 0
        while True:
            resp = await self.request(w.Get(ns, shard_id, got, w.MAX_CHUNK))
            if not isinstance(resp, w.Data) or resp.offset != got:
                raise self.unexpected("get")
            if resp.size > max_size:
                raise ShardStoreError("corrupt", f"{self.endpoint}: object of {resp.size} bytes, "
                                                 f"at most {max_size} expected")
            parts.append(resp.data)
            got += len(resp.data)
            if got >= resp.size or not resp.data:
                break
        if got != resp.size:
            raise self.unexpected("get (short object)")
        first = parts[0]  # bytes as received from a socket: a single part is returned as is
        return first if len(parts) == 1 and isinstance(first, bytes) else b"".join(parts)

    async def get_range(self, ns: int, shard_id: bytes, offset: int,
                        length: int) -> bytes | memoryview:
        """``length`` (<= MAX_CHUNK) bytes at ``offset``; fewer only at the object's end."""
        resp = await self.request(w.Get(ns, shard_id, offset, length))
        if not isinstance(resp, w.Data) or resp.offset != offset or len(resp.data) > length:
            raise self.unexpected("get")
        return resp.data

    async def put_object(self, key: keys.KeyPair, chain_id: str, ns: int, shard_id: bytes,
                         data: w.Bytes, nonce: int) -> None:
        """Store ``data`` whole (the put signs its content hash; the chunks are sent as slices
        of ``data``, not copies); replaces an existing object."""
        reqs = w.upload_requests(key, chain_id, ns, shard_id, data, nonce)
        for i, req in enumerate(reqs):
            resp = await self.request(req)
            want = w.Stored if i == len(reqs) - 1 else w.Accepted
            if not isinstance(resp, want):
                raise self.unexpected("put")

    async def delete(self, key: keys.KeyPair, chain_id: str, ns: int, shard_id: bytes,
                     nonce: int) -> bool:
        """Delete an object; False if it was not there."""
        try:
            await self.request(w.make_delete(key, chain_id, ns, shard_id, nonce))
        except ShardStoreError as exc:
            if exc.code == w.ErrorCode.NOT_FOUND.value:
                return False
            raise
        return True

    async def verify(self, ns: int, shard_id: bytes) -> w.Verified:
        resp = await self.request(w.Verify(ns, shard_id))
        if not isinstance(resp, w.Verified):
            raise self.unexpected("verify")
        return resp

    async def stat(self, ns: int) -> w.StatResult:
        resp = await self.request(w.Stat(ns))
        if not isinstance(resp, w.StatResult):
            raise self.unexpected("stat")
        return resp

    def unexpected(self, what: str) -> ShardStoreError:
        self.broken = True
        return ShardStoreError("protocol", f"{self.endpoint}: unexpected answer to {what}")


class ShardUpload:
    """A streaming upload of one ``size``-byte shard on a connection of its own: a signed put
    carrying the first MAX_CHUNK bytes, then appends, up to ``depth`` frames in flight (the
    store answers them in order, so it writes one while the next is on the wire). Bytes are
    buffered up to one frame, by reference: a frame is joined once from the pieces given to
    :meth:`write` (or is a slice of one piece, not copied), so a piece must not change after
    it was written."""

    def __init__(self, conn: ShardConnection, key: keys.KeyPair, chain_id: str, ns: int,
                 shard_id: bytes, size: int, nonce: int, depth: int = 2) -> None:
        self._conn = conn
        self._key = key
        self._chain_id = chain_id
        self._ns = ns
        self._sid = shard_id
        self._size = size
        self._nonce = nonce
        self._depth = max(1, depth)
        self._sent = 0
        self._frames = 0
        self._pieces: deque[w.Bytes] = deque()
        self._buffered = 0  # bytes in _pieces
        self._frame: bytearray | None = None  # see _take
        self.stored: w.Stored | None = None

    async def write(self, data: w.Bytes) -> None:
        """Queue ``data`` (any bytes-like); sends full frames. Raises :class:`ShardStoreError`."""
        n = w.nbytes(data)
        if self._sent + self._buffered + n > self._size:
            raise ShardStoreError("protocol", f"shard upload overran its {self._size} bytes")
        if n:
            self._pieces.append(data)
            self._buffered += n
        while self._buffered >= w.MAX_CHUNK:
            await self._send(w.MAX_CHUNK)
        if self._sent + self._buffered == self._size and (self._buffered or self._frames == 0):
            await self._send(self._buffered)

    def _take(self, n: int) -> w.Bytes:
        """The next ``n`` buffered bytes: a piece or a slice of one as it is, else the pieces
        copied into the frame buffer (one copy; valid until the next call)."""
        self._buffered -= n
        if n == 0:
            return b""
        pieces = self._pieces
        first = pieces[0]
        size = w.nbytes(first)
        if size >= n:
            pieces.popleft()
            if size == n:
                return first
            view = memoryview(first).cast("B")
            pieces.appendleft(view[n:])
            return view[:n]
        # Pieces of several blocks are copied into one frame buffer, reused for every frame:
        # joining into a fresh 1 MiB object each time page-faulted its way through new memory
        # while holding the GIL (0.2 s of a 256 MiB put's 1.4 s of GIL time). Reuse is safe
        # because _send() sends each frame (send_all returns once the kernel has the bytes)
        # before it takes the next.
        if self._frame is None:
            self._frame = bytearray(w.MAX_CHUNK)
        frame = memoryview(self._frame)
        pos = 0
        while pos < n:
            piece = pieces.popleft()
            view = memoryview(piece).cast("B") if isinstance(piece, memoryview) else memoryview(piece)
            take = min(len(view), n - pos)
            frame[pos : pos + take] = view[:take]
            if take < len(view):
                pieces.appendleft(view[take:])
            pos += take
        return frame[:n]

    async def _send(self, n: int) -> None:
        while self._conn.pending >= self._depth:
            await self._ack()
        chunk = self._take(n)
        if self._frames == 0:
            req: w.Request = w.make_put(self._key, self._chain_id, self._ns, self._sid,
                                        self._size, chunk, self._nonce)
        else:
            req = w.Append(self._ns, self._sid, self._sent, chunk)
        del chunk
        await self._conn.send_request(req)
        self._sent += n
        self._frames += 1
        if self._sent == self._size:
            while self._conn.pending:
                await self._ack()

    async def _ack(self) -> None:
        resp = await self._conn.receive_response()
        last = self._sent == self._size and self._conn.pending == 0
        if last and isinstance(resp, w.Stored) and resp.size == self._size:
            self.stored = resp
        elif last or not isinstance(resp, w.Accepted):
            raise self._conn.unexpected("upload")

    @property
    def complete(self) -> bool:
        return self.stored is not None
