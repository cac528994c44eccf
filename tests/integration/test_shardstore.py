"""The shard store over real TCP on 127.0.0.1: in-process (``nursery.start(serve_shards)``) and
as the ``python -m zos_agent.shardstore`` child process the agent runs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from ledger.codec import hash_bytes, pack
from ledger.keys import KeyPair
from zos_agent import shardstore
from zos_agent import shardwire as w
from zos_agent.blocksock import BlockingSocket
from zos_agent.shardstore import (
    DIRECT_ALIGN,
    HEADER_FIXED,
    MAGIC,
    STREAM_LINGER_S,
    STREAM_WORKERS,
    AlignedBuffer,
    Corrupt,
    Handback,
    NamespaceDir,
    ShardStore,
    ShardWriter,
    data_offset,
    read_range,
    serve_connection,
    serve_shards,
    verify_file,
    write_namespaces_file,
)

content_hash = w.content_hash

REPO = Path(__file__).resolve().parent.parent.parent
CHAIN = "test-chain"
OWNER = KeyPair.from_seed(b"\x11" * 32)
STRANGER = KeyPair.from_seed(b"\x22" * 32)
NS = 42
QUOTA = 8 * w.MAX_CHUNK
# stream_workers for the tests run both ways: every request on the event loop (0), and
# streaming connections served by worker threads (the default)
STREAMS = [pytest.param(0, id="loop"), pytest.param(STREAM_WORKERS, id="threads")]


class Client:
    """A minimal shard-store client for the tests (the real one is threebot.storage)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = w.ClientConnection()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def response(self) -> w.Response:
        while True:
            resp = self.conn.next_response()
            if not isinstance(resp, w.NeedData):
                return resp
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError("store closed the connection")
            self.conn.receive_data(bytes(data))

    async def call(self, req: w.Request) -> w.Response:
        head, body = self.conn.send_parts(req)  # as the real client: head, then the payload
        await self.stream.send_all(head)
        if body:
            await self.stream.send_all(body)
        return await self.response()

    async def upload(self, ns: int, sid: bytes, data: bytes, nonce: int,
                     key: KeyPair = OWNER) -> w.Response:
        resp: w.Response = w.Error(w.ErrorCode.INTERNAL, "nothing sent")
        for req in w.upload_requests(key, CHAIN, ns, sid, data, nonce):
            resp = await self.call(req)
            if isinstance(resp, w.Error):
                return resp
        return resp

    async def download(self, ns: int, sid: bytes) -> bytes | w.Error:
        out = bytearray()
        while True:
            resp = await self.call(w.Get(ns, sid, len(out), w.MAX_CHUNK))
            if isinstance(resp, w.Error):
                return resp
            assert isinstance(resp, w.Data)
            out += resp.data
            if len(out) >= resp.size:
                assert content_hash(out) == resp.hash
                return bytes(out)

    async def closed(self) -> bool:
        """True once the store has closed this connection."""
        with trio.fail_after(10):
            while True:
                try:
                    data = await self.stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    return True
                if not data:
                    return True


@asynccontextmanager
async def connect(addr: tuple[str, int]) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        yield Client(stream)


def code(resp: w.Response) -> w.ErrorCode | None:
    return resp.code if isinstance(resp, w.Error) else None


def sid(n: int) -> bytes:
    return hash_bytes(b"shard-%d" % n)


def payload(n: int, size: int) -> bytes:
    return random.Random(n).randbytes(size)


class Nonces:
    def __init__(self) -> None:
        self.last = 0

    def __call__(self) -> int:
        self.last += 1
        return self.last


@pytest.fixture
def table() -> dict[int, w.NamespaceInfo]:
    return {NS: w.NamespaceInfo(OWNER.public_key, QUOTA)}


@asynccontextmanager
async def running_store(data_dir: Path, table: dict[int, w.NamespaceInfo],
                        **kw: Any) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(lambda task_status: serve_shards(
            data_dir, lambda: table, CHAIN, "127.0.0.1", 0, task_status=task_status, **kw))
        yield addr
        nursery.cancel_scope.cancel()


class RecordedStore(ShardStore):
    """A ShardStore that keeps how each streaming thread's turn ended."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.handbacks: list[Handback] = []

    async def stream(self, *args: Any, **kw: Any) -> Handback:
        back = await super().stream(*args, **kw)
        self.handbacks.append(back)
        return back


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> list[RecordedStore]:
    """The stores serve_shards makes from now on (to read ``streamed``), in order."""
    made: list[RecordedStore] = []

    class Recording(RecordedStore):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(shardstore, "ShardStore", Recording)
    return made


# -- in-process ------------------------------------------------------------------------------


@pytest.mark.parametrize("streams", STREAMS)
async def test_put_get_roundtrip_in_chunks(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    nonce = Nonces()
    big = payload(1, 3 * w.MAX_CHUNK + 12_345)  # a put and three appends
    async with running_store(tmp_path, table, stream_workers=streams) as addr, connect(addr) as c:
        stored = await c.upload(NS, sid(1), big, nonce())
        assert stored == w.Stored(len(big), content_hash(big))
        assert await c.download(NS, sid(1)) == big
        # an unaligned range crossing a block boundary
        r = await c.call(w.Get(NS, sid(1), w.BLOCK_SIZE - 7, 100))
        assert isinstance(r, w.Data)
        assert r.data == big[w.BLOCK_SIZE - 7 : w.BLOCK_SIZE + 93]
        r = await c.call(w.Get(NS, sid(1), len(big) - 5, w.MAX_CHUNK))
        assert isinstance(r, w.Data)
        assert r.data == big[-5:]
        assert await c.call(w.Verify(NS, sid(1))) == w.Verified(len(big), content_hash(big))
        # empty and small shards; replacing a shard
        assert await c.upload(NS, sid(2), b"", nonce()) == w.Stored(0, content_hash(b""))
        assert await c.download(NS, sid(2)) == b""
        r = await c.call(w.Get(NS, sid(2), 0, 10))
        assert r == w.Data(0, content_hash(b""), 0, b"")
        assert await c.call(w.Verify(NS, sid(2))) == w.Verified(0, content_hash(b""))
        assert await c.upload(NS, sid(3), b"old", nonce()) == w.Stored(3, content_hash(b"old"))
        assert await c.upload(NS, sid(3), b"newer", nonce()) == w.Stored(5, content_hash(b"newer"))
        assert await c.download(NS, sid(3)) == b"newer"
        assert await c.call(w.Stat(NS)) == w.StatResult(len(big) + 5, QUOTA, 3)
        # delete
        assert await c.call(w.make_delete(OWNER, CHAIN, NS, sid(3), nonce())) == w.Deleted(5)
        assert code(await c.call(w.Get(NS, sid(3)))) is w.ErrorCode.NOT_FOUND
        assert code(await c.call(w.make_delete(OWNER, CHAIN, NS, sid(3), nonce()))) is \
            w.ErrorCode.NOT_FOUND
        assert await c.call(w.Stat(NS)) == w.StatResult(len(big), QUOTA, 2)
        assert code(await c.call(w.Stat(NS + 1))) is w.ErrorCode.UNKNOWN_NAMESPACE
        assert code(await c.call(w.Get(NS + 1, sid(1)))) is w.ErrorCode.UNKNOWN_NAMESPACE


@pytest.mark.parametrize("streams", STREAMS)
async def test_pipelined_requests_are_answered_in_order(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    """The storage client keeps several requests in flight per connection: the store reads
    them from its buffer one by one and answers each in turn (no change on its side)."""
    from threebot.storage.shardclient import ShardConnection, ShardUpload

    big = payload(7, 4 * w.MAX_CHUNK + 999)  # a put and four appends, up to 3 in flight
    async with running_store(tmp_path, table, stream_workers=streams) as addr:
        async def tcp(host: str, port: int) -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, port)

        endpoint = f"{addr[0]}:{addr[1]}"
        async with await ShardConnection.open(endpoint, tcp, 5.0, 10.0) as conn:
            up = ShardUpload(conn, OWNER, CHAIN, NS, sid(7), len(big), 1, depth=3)
            for i in range(0, len(big), 100_000):
                await up.write(big[i:i + 100_000])
            assert up.stored == w.Stored(len(big), content_hash(big))
            assert conn.pending == 0
        async with await ShardConnection.open(endpoint, tcp, 5.0, 10.0) as conn:
            spans = [(off, min(300_000, len(big) - off)) for off in range(0, len(big), 300_000)]
            for off, length in spans:
                await conn.send_request(w.Get(NS, sid(7), off, length))
            assert conn.pending == len(spans)
            got = bytearray()
            for off, _ in spans:
                resp = await conn.receive_response()
                assert isinstance(resp, w.Data)
                assert resp.offset == off
                got += resp.data
            assert bytes(got) == big
            assert await conn.get_object(NS, sid(7), len(big)) == big  # in turn again


@pytest.mark.parametrize("streams", STREAMS)
async def test_client_uploads_from_memoryviews(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    """ShardUpload fed 64 KiB memoryview blocks, odd sizes and one piece larger than a
    frame; put_object from a memoryview; the empty shard; the stored hash is the client's
    content_hash each time."""
    from threebot.storage.shardclient import ShardConnection, ShardUpload

    big = payload(8, 2 * w.MAX_CHUNK + 4321)
    view = memoryview(big)
    async with running_store(tmp_path, table, stream_workers=streams) as addr:
        async def tcp(host: str, port: int) -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, port)

        endpoint = f"{addr[0]}:{addr[1]}"
        points = [0, 1 << 16, (1 << 16) + 7, w.MAX_CHUNK + 65546, len(big)]
        odd = list(zip(points, points[1:], strict=False))  # one piece spans several frames
        for n, cuts in enumerate([[(i, i + (1 << 16)) for i in range(0, len(big), 1 << 16)],
                                  odd]):
            async with await ShardConnection.open(endpoint, tcp, 5.0, 10.0) as conn:
                up = ShardUpload(conn, OWNER, CHAIN, NS, sid(20 + n), len(big), 100 + n)
                for a, b in cuts:
                    await up.write(view[a:b])
                assert up.complete
                assert up.stored == w.Stored(len(big), content_hash(big))
                assert await conn.get_object(NS, sid(20 + n), len(big)) == big
        async with await ShardConnection.open(endpoint, tcp, 5.0, 10.0) as conn:
            await conn.put_object(OWNER, CHAIN, NS, sid(22), view[5:], 110)
            assert await conn.get_object(NS, sid(22), len(big)) == big[5:]
            v = await conn.verify(NS, sid(22))
            assert v == w.Verified(len(big) - 5, content_hash(big[5:]))
            up = ShardUpload(conn, OWNER, CHAIN, NS, sid(23), 0, 111)
            await up.write(b"")
            await up.write(b"")  # nothing more is sent
            assert up.stored == w.Stored(0, content_hash(b""))
            assert await conn.get_object(NS, sid(23), 10) == b""


@pytest.mark.parametrize("streams", STREAMS)
async def test_a_whole_upload_in_one_send(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    """Several frames in one TCP write (and a frame split over many): answered in order."""
    data = payload(9, 2 * w.MAX_CHUNK + 3)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(30), data, 1)
    blob = b"".join(w.ClientConnection.send(r) for r in reqs)
    async with running_store(tmp_path, table, stream_workers=streams) as addr, connect(addr) as c:
        await c.send_raw(blob)
        assert [await c.response() for _ in reqs] == [
            w.Accepted(w.MAX_CHUNK), w.Accepted(2 * w.MAX_CHUNK), w.Stored(len(data), content_hash(data))]
        frame = w.ClientConnection.send(w.Get(NS, sid(30), 5, 1000))
        for i in range(len(frame)):
            await c.send_raw(frame[i : i + 1])
        assert await c.response() == w.Data(len(data), content_hash(data), 5, data[5:1005])


@pytest.mark.parametrize("streams", STREAMS)
async def test_payloads_trickling_in_over_tcp(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    """The store receives payloads straight into its connection buffer: frames whose head and
    payload arrive in pieces of every size, and frames sent together, come out intact."""
    data = payload(12, 2 * w.MAX_CHUNK + 4321)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(12), data, 1)
    blob = b"".join(w.ClientConnection.send(r) for r in reqs)
    rng = random.Random(12)
    async with running_store(tmp_path, table, stream_workers=streams) as addr, connect(addr) as c:
        pos = 0
        while pos < len(blob):
            n = rng.choice((1, 7, 100, 4096, 65_536, 300_001))
            await c.send_raw(blob[pos : pos + n])
            pos += n
            await trio.lowlevel.checkpoint()
        assert [await c.response() for _ in reqs] == [
            w.Accepted(w.MAX_CHUNK), w.Accepted(2 * w.MAX_CHUNK),
            w.Stored(len(data), content_hash(data))]
        # an upload, a get and a stat sent as one write: the next frame's bytes never mix
        # with a payload
        other = payload(13, w.MAX_CHUNK + 5)
        reqs2 = [*w.upload_requests(OWNER, CHAIN, NS, sid(13), other, 2),
                 w.Get(NS, sid(12), w.MAX_CHUNK - 3, 10), w.Stat(NS)]
        await c.send_raw(b"".join(w.ClientConnection.send(r) for r in reqs2))
        assert [await c.response() for _ in reqs2] == [
            w.Accepted(w.MAX_CHUNK), w.Stored(len(other), content_hash(other)),
            w.Data(len(data), content_hash(data), w.MAX_CHUNK - 3,
                   data[w.MAX_CHUNK - 3 : w.MAX_CHUNK + 7]),
            w.StatResult(len(data) + len(other), QUOTA, 2)]
        assert await c.download(NS, sid(13)) == other
        assert await c.download(NS, sid(12)) == data


async def test_a_stream_other_than_a_socket_is_served(tmp_path: Path,
                                                      table: dict[int, w.NamespaceInfo]) -> None:
    """serve_connection over any trio stream (here a memory stream): the generic path."""
    store = ShardStore(tmp_path, lambda: table, CHAIN)
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = w.ClientConnection()
    data = payload(14, w.MAX_CHUNK + 77)

    async def call(req: w.Request) -> w.Response:
        await client_end.send_all(conn.send(req))
        while isinstance(resp := conn.next_response(), w.NeedData):
            conn.receive_data(await client_end.receive_some(1 << 16))
        return resp

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_end, store)
        for req in w.upload_requests(OWNER, CHAIN, NS, sid(14), data, 1):
            resp = await call(req)
        assert resp == w.Stored(len(data), content_hash(data))
        got = await call(w.Get(NS, sid(14), 0, w.MAX_CHUNK))
        rest = await call(w.Get(NS, sid(14), w.MAX_CHUNK, w.MAX_CHUNK))
        assert isinstance(got, w.Data)
        assert isinstance(rest, w.Data)
        assert got.data + rest.data == data
        await client_end.aclose()


@pytest.mark.parametrize("streams", STREAMS)
async def test_unsigned_foreign_and_replayed_writes_are_refused(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    nonce = Nonces()
    async with running_store(tmp_path, table, stream_workers=streams) as addr, connect(addr) as c:
        assert code(await c.upload(NS, sid(1), b"x", nonce(), key=STRANGER)) is \
            w.ErrorCode.NOT_OWNER
        put = w.make_put(OWNER, CHAIN, NS, sid(1), 1, b"x", nonce())
        forged = w.Put(put.ns, put.shard_id, put.size, put.hash, put.nonce, put.owner,
                       STRANGER.sign(w.request_sign_bytes(CHAIN, put.signed_body())), put.data)
        assert code(await c.call(forged)) is w.ErrorCode.BAD_SIGNATURE
        assert isinstance(await c.call(put), w.Stored)
        assert code(await c.call(put)) is w.ErrorCode.REPLAY
        dele = w.make_delete(OWNER, CHAIN, NS, sid(1), nonce())
        assert code(await c.call(w.make_delete(STRANGER, CHAIN, NS, sid(1), nonce()))) is \
            w.ErrorCode.NOT_OWNER
        assert await c.call(dele) == w.Deleted(1)
        assert isinstance(await c.call(w.make_put(OWNER, CHAIN, NS, sid(1), 1, b"y", nonce())),
                          w.Stored)
        assert code(await c.call(dele)) is w.ErrorCode.REPLAY  # the shard stays
        assert await c.download(NS, sid(1)) == b"y"
        # A hash signed for other content is never committed.
        lie = w.make_put(OWNER, CHAIN, NS, sid(4), 2, b"ab", nonce(), shard_hash=content_hash(b"cd"))
        assert code(await c.call(lie)) is w.ErrorCode.BAD_HASH
        assert code(await c.call(w.Get(NS, sid(4)))) is w.ErrorCode.NOT_FOUND
        # the connection kept working through every refusal
        assert await c.call(w.Stat(NS)) == w.StatResult(1, QUOTA, 1)


@pytest.mark.parametrize("streams", STREAMS)
async def test_quota_is_enforced_and_counts_uploads_in_flight(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    nonce = Nonces()
    async with running_store(tmp_path, table, stream_workers=streams) as addr, \
            connect(addr) as a, connect(addr) as b:
        half = QUOTA // 2
        assert isinstance(await a.upload(NS, sid(1), payload(1, half), nonce()), w.Stored)
        # b opens an upload of the remaining half: reserved while in flight
        first = await b.call(w.make_put(OWNER, CHAIN, NS, sid(2), half, payload(2, w.MAX_CHUNK),
                                        nonce()))
        assert first == w.Accepted(w.MAX_CHUNK)
        assert code(await a.upload(NS, sid(3), b"z", nonce())) is w.ErrorCode.QUOTA_EXCEEDED
        # an abandoned upload gives its reservation back
        await b.stream.aclose()
        with trio.fail_after(10):
            while True:
                r = await a.upload(NS, sid(3), b"z", nonce())
                if isinstance(r, w.Stored):
                    break
                await trio.sleep(0.01)
        assert code(await a.upload(NS, sid(4), payload(4, half), nonce())) is \
            w.ErrorCode.QUOTA_EXCEEDED
        assert await a.call(w.Stat(NS)) == w.StatResult(half + 1, QUOTA, 2)
        assert await a.download(NS, sid(1)) == payload(1, half)
        assert not list((tmp_path / "ns" / str(NS) / "tmp").iterdir())


@pytest.mark.parametrize("streams", STREAMS)
async def test_corrupt_shard_is_never_served(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    nonce = Nonces()
    data = payload(7, 2 * w.BLOCK_SIZE + 100)
    nsdir = NamespaceDir(tmp_path, NS)
    async with running_store(tmp_path, table, stream_workers=streams) as addr, connect(addr) as c:
        for n in (1, 2, 3):
            assert isinstance(await c.upload(NS, sid(n), data, nonce()), w.Stored)
        # flip one data byte in the second block of shard 1
        path = nsdir.shard_path(sid(1))
        raw = bytearray(path.read_bytes())
        raw[-150] ^= 0x01
        _rewrite(path, bytes(raw))
        assert code(await c.call(w.Get(NS, sid(1), w.BLOCK_SIZE, 10))) is w.ErrorCode.CORRUPT
        assert code(await c.call(w.Verify(NS, sid(1)))) is w.ErrorCode.CORRUPT
        r = await c.call(w.Get(NS, sid(1), 0, 10))  # an intact block is still served
        assert isinstance(r, w.Data)
        assert r.data == data[:10]
        assert r.hash == content_hash(data)
        # a damaged block-hash table entry (block 0 of shard 1): reads of that block and
        # verify refuse it
        raw = bytearray(path.read_bytes())
        raw[HEADER_FIXED + 5] ^= 0x10
        _rewrite(path, bytes(raw))
        assert code(await c.call(w.Get(NS, sid(1), 0, 10))) is w.ErrorCode.CORRUPT
        # a damaged header, and a torn (truncated) file
        path2 = nsdir.shard_path(sid(2))
        raw = bytearray(path2.read_bytes())
        raw[10] ^= 0x80
        _rewrite(path2, bytes(raw))
        assert code(await c.call(w.Get(NS, sid(2)))) is w.ErrorCode.CORRUPT
        path3 = nsdir.shard_path(sid(3))
        _rewrite(path3, path3.read_bytes()[: data_offset(3) + w.BLOCK_SIZE + 5])
        assert code(await c.call(w.Get(NS, sid(3), w.BLOCK_SIZE, 10))) is w.ErrorCode.CORRUPT
        assert code(await c.call(w.Verify(NS, sid(3)))) is w.ErrorCode.CORRUPT
        # a file of the previous format version (magic b"TFSHARD\x02") reads as corrupt
        assert isinstance(await c.upload(NS, sid(4), data, nonce()), w.Stored)
        path4 = nsdir.shard_path(sid(4))
        raw = bytearray(path4.read_bytes())
        assert raw[:8] == b"TFSHARD\x03"
        raw[7] = 2
        _rewrite(path4, bytes(raw))
        assert code(await c.call(w.Get(NS, sid(4)))) is w.ErrorCode.CORRUPT
        assert code(await c.call(w.Verify(NS, sid(4)))) is w.ErrorCode.CORRUPT
        # the owner can replace a corrupt shard
        assert isinstance(await c.upload(NS, sid(1), data, nonce()), w.Stored)
        assert await c.download(NS, sid(1)) == data


# -- O_DIRECT files ---------------------------------------------------------------------------


def _rewrite(path: Path, raw: bytes) -> None:
    """Replace a shard file's bytes in place, flushed to disk: the store reads the data with
    O_DIRECT (Linux writes dirty cached pages back before a direct read of them anyway)."""
    with path.open("r+b") as f:
        f.write(raw)
        f.truncate(len(raw))
        f.flush()
        os.fsync(f.fileno())


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _direct_supported(directory: Path) -> bool:
    probe = directory / ".direct-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    os.close(fd)
    return True


def _write_shard(directory: Path, n: int, data: bytes, chunks: list[int]) -> tuple[Path, bytes]:
    """``data`` through a ShardWriter in pieces of the ``chunks`` sizes (the rest: one more),
    committed as ``directory / shard<n>``; (its path, the shard hash)."""
    writer = ShardWriter(directory, sid(n), len(data))
    at = 0
    for size in [*chunks, len(data) - sum(chunks)]:
        writer.write(data[at : at + size])
        at += size
    shard_hash = writer.finish()
    path = directory / f"shard{n}"
    os.replace(writer.path, path)
    return path, shard_hash


def _read_all(path: Path, buffer: AlignedBuffer) -> bytes:
    out = bytearray()
    while True:
        hdr, data = read_range(path, len(out), w.MAX_CHUNK, buffer)
        out += data
        if len(out) >= hdr.size:
            return bytes(out)


# sizes that are neither multiples of 4096 nor of the block size (and some that are)
ODD_SIZES = [1, 4095, 4097, w.BLOCK_SIZE + 1, 3 * w.BLOCK_SIZE - 100, w.MAX_CHUNK + 8192,
             2 * w.MAX_CHUNK + w.BLOCK_SIZE + 12_345]


@pytest.mark.parametrize("size", ODD_SIZES)
async def test_odd_sized_shard_roundtrips_and_its_file_is_exact(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], size: int) -> None:
    data = payload(size, size)
    async with running_store(tmp_path, table) as addr, connect(addr) as c:
        assert await c.upload(NS, sid(1), data, 1) == w.Stored(size, content_hash(data))
        assert await c.download(NS, sid(1)) == data
        assert await c.call(w.Verify(NS, sid(1))) == w.Verified(size, content_hash(data))
        tail = await c.call(w.Get(NS, sid(1), max(size - 3, 0), w.MAX_CHUNK))
        assert isinstance(tail, w.Data)
        assert tail.data == data[-3:]
    raw = NamespaceDir(tmp_path, NS).shard_path(sid(1)).read_bytes()
    blocks = -(-size // w.BLOCK_SIZE)
    start = data_offset(blocks)
    assert start % DIRECT_ALIGN == 0
    assert start >= HEADER_FIXED + 32 * blocks
    assert raw[:8] == MAGIC
    assert len(raw) == start + size  # the direct writes' padding is cut off
    assert raw[HEADER_FIXED + 32 * blocks : start] == bytes(start - HEADER_FIXED - 32 * blocks)
    assert raw[start:] == data


async def test_the_store_writes_and_reads_with_o_direct(tmp_path: Path,
                                                        table: dict[int, w.NamespaceInfo],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests' temporary directory is on the machine's disk (ext4 here and on CI), which
    # takes O_DIRECT; a tmp dir that does not would hide what this test checks, so say so.
    if not _direct_supported(tmp_path):
        pytest.fail(f"{tmp_path} refuses O_DIRECT; run the tests with a disk-backed tmp dir")
    seen: list[tuple[str, bool]] = []
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def pwrite(fd: int, data: Any, offset: int) -> int:
        seen.append(("write", _is_direct(fd)))
        return real_pwrite(fd, data, offset)

    def preadv(fd: int, buffers: Any, offset: int) -> int:
        seen.append(("read", _is_direct(fd)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "preadv", preadv)
    data = payload(3, 2 * w.MAX_CHUNK + 5000)
    async with running_store(tmp_path, table) as addr, connect(addr) as c:
        assert await c.upload(NS, sid(1), data, 1) == w.Stored(len(data), content_hash(data))
        writes = [direct for op, direct in seen if op == "write"]
        assert writes  # 2 chunks, the padded tail and the header region
        assert all(writes)
        seen.clear()
        assert await c.download(NS, sid(1)) == data
        assert await c.call(w.Verify(NS, sid(1))) == w.Verified(len(data), content_hash(data))
        reads = [direct for op, direct in seen if op == "read"]
        assert reads
        assert all(reads)


def test_whole_pages_at_an_aligned_address_are_written_without_a_copy(tmp_path: Path) -> None:
    """The store receives payloads into a page-aligned buffer; the writer writes such chunks
    with O_DIRECT as they are. Bytes objects, a tail and a misaligned view go through the
    bounce buffer; the file is the same either way."""
    if not _direct_supported(tmp_path):
        pytest.fail(f"{tmp_path} refuses O_DIRECT; run the tests with a disk-backed tmp dir")
    data = payload(31, 2 * w.MAX_CHUNK + 5000)
    aligned = mmap.mmap(-1, w.MAX_CHUNK)
    writer = ShardWriter(tmp_path, sid(1), len(data))
    assert writer.direct
    for start in (0, w.MAX_CHUNK):  # the buffer is reused, as the store reuses its own
        aligned[:] = data[start : start + w.MAX_CHUNK]
        writer.write(memoryview(aligned))
    assert writer.copied == 0
    writer.write(data[2 * w.MAX_CHUNK :])
    assert writer.copied == 5000
    assert writer.finish() == content_hash(data)
    path = tmp_path / "whole"
    os.replace(writer.path, path)
    assert _read_all(path, AlignedBuffer()) == data
    assert verify_file(path).shard_hash == content_hash(data)

    odd = mmap.mmap(-1, 3 * DIRECT_ALIGN)
    odd[1 : 1 + 2 * DIRECT_ALIGN] = data[: 2 * DIRECT_ALIGN]
    writer = ShardWriter(tmp_path, sid(2), 2 * DIRECT_ALIGN)
    writer.write(memoryview(odd)[1 : 1 + 2 * DIRECT_ALIGN])  # whole pages, misaligned
    assert writer.copied == 2 * DIRECT_ALIGN
    assert writer.finish() == content_hash(data[: 2 * DIRECT_ALIGN])


@pytest.mark.parametrize("chunks", [
    [1, 4095, 70_000, w.MAX_CHUNK, 3, w.MAX_CHUNK - 1],  # appends may be any size
    [w.MAX_CHUNK, w.MAX_CHUNK],
    [],
])
def test_writer_takes_chunks_of_any_size(tmp_path: Path, chunks: list[int]) -> None:
    data = payload(9, sum(chunks) + 777)
    path, shard_hash = _write_shard(tmp_path, 1, data, chunks)
    assert shard_hash == content_hash(data)
    assert path.stat().st_size == data_offset(-(-len(data) // w.BLOCK_SIZE)) + len(data)
    assert _read_all(path, AlignedBuffer()) == data
    assert verify_file(path).shard_hash == shard_hash


def test_padding_past_the_data_is_zeros_never_stale_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The last chunk is padded to 4096 bytes in the bounce buffer, which still holds the
    # previous chunk: the padding must be zeros. finish() cuts it off; without the cut it
    # would be on disk.
    stale, last = b"\xaa" * w.MAX_CHUNK, b"\x55" * 100
    data = stale + last
    path, _ = _write_shard(tmp_path, 1, data, [w.MAX_CHUNK])
    start = data_offset(-(-len(data) // w.BLOCK_SIZE))
    assert path.stat().st_size == start + len(data)
    monkeypatch.setattr(os, "ftruncate", lambda fd, length: None)
    path2, _ = _write_shard(tmp_path, 2, data, [w.MAX_CHUNK])
    raw = path2.read_bytes()
    assert len(raw) == start + w.MAX_CHUNK + _round_up(len(last))
    assert raw[start + len(data) :] == bytes(len(raw) - start - len(data))
    assert raw[start : start + len(data)] == data


def _round_up(n: int) -> int:
    return -(-n // DIRECT_ALIGN) * DIRECT_ALIGN


def _refuse_direct_open(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refusing_open)


def _refuse_direct_io(monkeypatch: pytest.MonkeyPatch) -> None:
    # A filesystem that opens with O_DIRECT but refuses the transfers.
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if _is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    def preadv(fd: int, buffers: Any, offset: int) -> int:
        if _is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "preadv", preadv)


@pytest.mark.parametrize("refuse", [_refuse_direct_open, _refuse_direct_io])
@pytest.mark.parametrize("size", [100_000, 2 * w.MAX_CHUNK + 777])
async def test_a_filesystem_refusing_o_direct_is_written_and_read_buffered(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], monkeypatch: pytest.MonkeyPatch,
        refuse: Callable[[pytest.MonkeyPatch], None], size: int) -> None:
    refuse(monkeypatch)
    data = payload(size, size)
    # the writer itself: buffered from the start (open refused) or from its first write
    path, shard_hash = _write_shard(tmp_path, 1, data, [w.MAX_CHUNK] * (size // w.MAX_CHUNK))
    assert shard_hash == content_hash(data)
    assert path.stat().st_size == data_offset(-(-size // w.BLOCK_SIZE)) + size
    assert _read_all(path, AlignedBuffer()) == data
    writer = ShardWriter(tmp_path, sid(2), size)
    writer.write(data[: min(size, w.MAX_CHUNK)])
    if refuse is _refuse_direct_open or size > w.MAX_CHUNK:
        assert not writer.direct
    writer.discard()
    # the whole store
    async with running_store(tmp_path / "store", table) as addr, connect(addr) as c:
        assert await c.upload(NS, sid(1), data, 1) == w.Stored(size, content_hash(data))
        assert await c.download(NS, sid(1)) == data
        assert await c.call(w.Verify(NS, sid(1))) == w.Verified(size, content_hash(data))
        stored = NamespaceDir(tmp_path / "store", NS).shard_path(sid(1))
        assert stored.stat().st_size == data_offset(-(-size // w.BLOCK_SIZE)) + size
        # a flipped byte is still caught on this path
        raw = bytearray(stored.read_bytes())
        raw[-1] ^= 0x01
        _rewrite(stored, bytes(raw))
        assert code(await c.call(w.Get(NS, sid(1), size - 1, 1))) is w.ErrorCode.CORRUPT
        assert code(await c.call(w.Verify(NS, sid(1)))) is w.ErrorCode.CORRUPT


def test_direct_reads_see_bytes_written_through_the_page_cache(tmp_path: Path) -> None:
    # The corruption tests change shard files with ordinary writes; the store's O_DIRECT
    # reads must see those changes (and a short file must read as corrupt, not padding).
    data = payload(4, 3 * w.BLOCK_SIZE + 10)
    path, _ = _write_shard(tmp_path, 1, data, [])
    buffer = AlignedBuffer()
    raw = bytearray(path.read_bytes())
    raw[data_offset(4) + w.BLOCK_SIZE + 7] ^= 0x40
    path.write_bytes(bytes(raw))  # dirty in the page cache, not fsynced
    assert read_range(path, 0, 10, buffer)[1] == data[:10]
    with pytest.raises(Corrupt, match="block 1 does not match"):
        read_range(path, w.BLOCK_SIZE, 10, buffer)
    with pytest.raises(Corrupt, match="block 1 does not match"):
        verify_file(path)
    _rewrite(path, bytes(raw[: data_offset(4) + 3 * w.BLOCK_SIZE + 5]))
    with pytest.raises(Corrupt, match="shorter"):
        read_range(path, 3 * w.BLOCK_SIZE, 10, buffer)
    with pytest.raises(Corrupt, match="shorter"):
        verify_file(path)
    # a buffer smaller than a read is replaced by one large enough
    small = AlignedBuffer()
    small.get(DIRECT_ALIGN)
    assert read_range(path, 0, w.BLOCK_SIZE, small)[1] == data[: w.BLOCK_SIZE]


@pytest.mark.parametrize("streams", STREAMS)
async def test_bad_frames_close_only_their_connection(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    nonce = Nonces()
    data = payload(9, 2 * w.MAX_CHUNK + 1)
    async with running_store(tmp_path, table, stream_workers=streams) as addr, \
            connect(addr) as good:
        # good has an upload half done while the others misbehave
        reqs = w.upload_requests(OWNER, CHAIN, NS, sid(1), data, nonce())
        assert isinstance(await good.call(reqs[0]), w.Accepted)
        for prefix in (struct.pack(">II", w.MAX_HEADER + 1, 0),  # oversized header
                       struct.pack(">II", 200, w.MAX_CHUNK + 1)):  # oversized payload
            async with connect(addr) as big:
                await big.send_raw(prefix + b"\x00" * 1000)
                r = await big.response()
                assert code(r) is w.ErrorCode.TOO_LARGE
                assert await big.closed()
        async with connect(addr) as junk:
            await junk.send_raw(struct.pack(">II", 4, 0) + b"\xc1\xc1\xc1\xc1")
            assert code(await junk.response()) is w.ErrorCode.MALFORMED
            assert await junk.closed()
        async with connect(addr) as extra:  # a payload on a message that has none
            header = pack(w.Stat(NS).to_wire())
            await extra.send_raw(struct.pack(">II", len(header), 3) + header + b"xyz")
            assert code(await extra.response()) is w.ErrorCode.MALFORMED
            assert await extra.closed()
        async with connect(addr) as wrong:
            head, _ = w.encode_frame({"v": 1, "op": "stat", "ns": NS})
            await wrong.send_raw(head)
            assert code(await wrong.response()) is w.ErrorCode.UNSUPPORTED_VERSION
            assert await wrong.closed()
        async with connect(addr) as stray:
            await stray.send_raw(stray.conn.send(w.Append(NS, sid(1), w.MAX_CHUNK, b"x")))
            assert code(await stray.response()) is w.ErrorCode.BAD_STATE
            assert await stray.closed()
        for req in reqs[1:]:
            resp = await good.call(req)
        assert resp == w.Stored(len(data), content_hash(data))
        assert await good.download(NS, sid(1)) == data


@pytest.mark.parametrize("streams", STREAMS)
async def test_idle_connection_is_closed(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    async with running_store(tmp_path, table, idle_timeout_s=0.2,
                             stream_workers=streams) as addr, connect(addr) as c:
        put = w.make_put(OWNER, CHAIN, NS, sid(1), w.MAX_CHUNK + 1, b"q" * w.MAX_CHUNK, 1)
        assert isinstance(await c.call(put), w.Accepted)
        assert await c.closed()
        async with connect(addr) as d:  # the reservation went with it
            assert await d.call(w.Stat(NS)) == w.StatResult(0, QUOTA, 0)


async def test_connections_are_bounded(tmp_path: Path,
                                       table: dict[int, w.NamespaceInfo]) -> None:
    async with running_store(tmp_path, table, max_connections=2) as addr, \
            connect(addr) as a, connect(addr) as b:
        assert isinstance(await a.call(w.Stat(NS)), w.StatResult)
        assert isinstance(await b.call(w.Stat(NS)), w.StatResult)
        async with connect(addr) as extra:
            assert await extra.closed()
        await a.stream.aclose()
        with trio.fail_after(10):
            while True:  # the freed slot is taken back once the store saw a close
                async with connect(addr) as again:
                    try:
                        if isinstance(await again.call(w.Stat(NS)), w.StatResult):
                            break
                    except (EOFError, trio.BrokenResourceError):
                        pass
                await trio.sleep(0.01)
        assert isinstance(await b.call(w.Stat(NS)), w.StatResult)


async def test_replay_refused_after_restart(tmp_path: Path,
                                            table: dict[int, w.NamespaceInfo]) -> None:
    put = w.make_put(OWNER, CHAIN, NS, sid(1), 3, b"abc", 77)
    dele = w.make_delete(OWNER, CHAIN, NS, sid(1), 78)
    async with running_store(tmp_path, table) as addr, connect(addr) as c:
        assert isinstance(await c.call(put), w.Stored)
        assert await c.call(dele) == w.Deleted(3)
    async with running_store(tmp_path, table) as addr, connect(addr) as c:
        assert code(await c.call(put)) is w.ErrorCode.REPLAY
        assert code(await c.call(dele)) is w.ErrorCode.REPLAY
        assert code(await c.call(w.Get(NS, sid(1)))) is w.ErrorCode.NOT_FOUND
        assert isinstance(await c.call(w.make_put(OWNER, CHAIN, NS, sid(1), 3, b"abc", 79)),
                          w.Stored)
    async with running_store(tmp_path, table) as addr, connect(addr) as c:
        assert await c.call(w.Stat(NS)) == w.StatResult(3, QUOTA, 1)  # usage survives too


@pytest.mark.parametrize("streams", STREAMS)
async def test_namespace_table_changes_take_effect(tmp_path: Path, streams: int) -> None:
    table: dict[int, w.NamespaceInfo] = {}
    async with running_store(tmp_path, table, stream_workers=streams) as addr, connect(addr) as c:
        assert code(await c.upload(NS, sid(1), b"a", 1)) is w.ErrorCode.UNKNOWN_NAMESPACE
        table[NS] = w.NamespaceInfo(OWNER.public_key, 2)
        assert isinstance(await c.upload(NS, sid(1), b"a", 2), w.Stored)
        assert code(await c.upload(NS, sid(2), b"bc", 3)) is w.ErrorCode.QUOTA_EXCEEDED
        table[NS] = w.NamespaceInfo(OWNER.public_key, 3)  # contract updated: bigger quota
        assert isinstance(await c.upload(NS, sid(2), b"bc", 4), w.Stored)
        del table[NS]
        assert code(await c.call(w.Get(NS, sid(1)))) is w.ErrorCode.UNKNOWN_NAMESPACE


# -- streaming threads -----------------------------------------------------------------------

# A linger longer than any pause of these tests: once a streaming thread has a connection it
# keeps it until a request it does not serve comes (or the connection ends), so which requests
# it answers is known.
LONG_LINGER = 10.0


def _tmp_files(data_dir: Path) -> list[Path]:
    """The namespace's uploads in progress (ShardWriter temp files)."""
    return list(NamespaceDir(data_dir, NS).tmp.iterdir())


def _gets(n: int, data: bytes) -> tuple[list[w.Request], list[w.Response]]:
    """Gets of shard ``n`` (holding ``data``) in MAX_CHUNK pieces, and their answers."""
    offsets = range(0, len(data), w.MAX_CHUNK)
    return ([w.Get(NS, sid(n), off, w.MAX_CHUNK) for off in offsets],
            [w.Data(len(data), content_hash(data), off, data[off : off + w.MAX_CHUNK])
             for off in offsets])


def _stored_exactly(data_dir: Path, n: int, data: bytes) -> bool:
    raw = NamespaceDir(data_dir, NS).shard_path(sid(n)).read_bytes()
    start = data_offset(-(-len(data) // w.BLOCK_SIZE))
    return raw[:8] == MAGIC and len(raw) == start + len(data) and raw[start:] == data


@pytest.mark.parametrize("streams", STREAMS)
@pytest.mark.parametrize("pipelined", [False, True], ids=["in-turn", "pipelined"])
async def test_appends_and_gets_after_the_first_answer_are_streamed_by_a_thread(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore],
        streams: int, pipelined: bool) -> None:
    """After an upload's ``accepted`` and a get's ``data`` a worker thread takes the
    connection and answers the appends and gets that follow; the append that completes the
    shard (committed there), the first get and the stat are the event loop's. With
    stream_workers=0 the thread never runs; the answers are the same either way."""
    data = payload(40, 3 * w.MAX_CHUNK + 12_345)  # a put and three appends
    gets, datas = _gets(40, data)
    reqs: list[w.Request] = [*w.upload_requests(OWNER, CHAIN, NS, sid(40), data, 1), *gets,
                             w.Stat(NS)]
    want: list[w.Response] = [
        w.Accepted(w.MAX_CHUNK), w.Accepted(2 * w.MAX_CHUNK), w.Accepted(3 * w.MAX_CHUNK),
        w.Stored(len(data), content_hash(data)), *datas, w.StatResult(len(data), QUOTA, 1)]
    async with running_store(tmp_path, table, stream_workers=streams,
                             stream_linger_s=LONG_LINGER) as addr, connect(addr) as c:
        if pipelined:  # every frame in one write
            await c.send_raw(b"".join(w.ClientConnection.send(r) for r in reqs))
            got = [await c.response() for _ in reqs]
        else:
            got = []
            for i, r in enumerate(reqs):
                if i == 2:  # a pause longer than the default linger: this one is 10 s
                    await trio.sleep(2 * STREAM_LINGER_S)
                got.append(await c.call(r))
        assert got == want
        assert len(stores) == 1
        # appends 1 and 2, gets 2 to 4 (the stat's answer came after the thread's turn ended)
        assert stores[0].streamed == (5 if streams else 0)
        assert [b.answered for b in stores[0].handbacks] == ([2, 3] if streams else [])
        assert await c.download(NS, sid(40)) == data
    assert _stored_exactly(tmp_path, 40, data)
    assert not _tmp_files(tmp_path)


async def test_a_slow_client_is_handed_between_thread_and_event_loop(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore]) -> None:
    """With a short linger the streaming thread gives the connection back whenever the client
    pauses (between frames, in a frame's prefix, header or payload) and takes it again after
    the next ``accepted`` or ``data``: every request is answered, the shard is exact."""
    linger = 0.02
    pause = 5 * linger  # real pauses over real TCP: the thread has let go by then
    data = payload(41, 3 * w.MAX_CHUNK + 777)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(41), data, 1)
    gets, datas = _gets(41, data)
    async with running_store(tmp_path, table, stream_linger_s=linger) as addr, \
            connect(addr) as c:

        async def send_split(req: w.Request, cut: int, *, pause_first: bool) -> w.Response:
            frame = w.ClientConnection.send(req)
            assert 0 < cut < len(frame)
            if pause_first:
                await trio.sleep(pause)
            await c.send_raw(frame[:cut])
            await trio.sleep(pause)
            await c.send_raw(frame[cut:])
            return await c.response()

        def head_len(req: w.Put | w.Append) -> int:
            return len(w.ClientConnection.send(req)) - w.nbytes(req.data)

        assert await c.call(reqs[0]) == w.Accepted(w.MAX_CHUNK)
        # at once the first half of a frame (the thread reads it), then a pause in its payload
        r = await send_split(reqs[1], head_len(reqs[1]) + w.MAX_CHUNK // 2, pause_first=False)
        assert r == w.Accepted(2 * w.MAX_CHUNK)
        # a pause between frames, and one in the middle of the prefix
        assert await send_split(reqs[2], 3, pause_first=True) == w.Accepted(3 * w.MAX_CHUNK)
        # a pause in the header, the frame that completes the shard
        r = await send_split(reqs[3], head_len(reqs[3]) - 5, pause_first=False)
        assert r == w.Stored(len(data), content_hash(data))
        assert await c.call(gets[0]) == datas[0]
        frame = w.ClientConnection.send(gets[1])
        assert await send_split(gets[1], len(frame) // 2, pause_first=False) == datas[1]
        await trio.sleep(pause)
        assert await c.call(gets[2]) == datas[2]
        assert await c.call(gets[3]) == datas[3]
        await trio.sleep(pause)
        assert await c.download(NS, sid(41)) == data
        assert await c.call(w.Verify(NS, sid(41))) == w.Verified(len(data), content_hash(data))
        assert await c.call(w.Stat(NS)) == w.StatResult(len(data), QUOTA, 1)
        # the pauses did end threads' turns (a client pause: no request, no end of stream)
        assert any(b.req is None and not b.eof for b in stores[0].handbacks)
    assert _stored_exactly(tmp_path, 41, data)
    assert not _tmp_files(tmp_path)


async def test_one_worker_streams_one_connection_the_event_loop_serves_the_other(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore]) -> None:
    """stream_workers=1: while connection a holds the thread, b's upload and gets, interleaved
    with a's, are served by the event loop; both come out right."""
    data_a = payload(42, 3 * w.MAX_CHUNK + 5)
    data_b = payload(43, 3 * w.MAX_CHUNK + 6)
    up_a = w.upload_requests(OWNER, CHAIN, NS, sid(42), data_a, 1)
    up_b = w.upload_requests(OWNER, CHAIN, NS, sid(43), data_b, 2)
    gets_a, datas_a = _gets(42, data_a)
    gets_b, datas_b = _gets(43, data_b)
    async with running_store(tmp_path, table, stream_workers=1,
                             stream_linger_s=LONG_LINGER) as addr, \
            connect(addr) as a, connect(addr) as b:
        for i in range(3):
            assert isinstance(await a.call(up_a[i]), w.Accepted)
            assert isinstance(await b.call(up_b[i]), w.Accepted)
        assert await a.call(up_a[3]) == w.Stored(len(data_a), content_hash(data_a))
        assert await b.call(up_b[3]) == w.Stored(len(data_b), content_hash(data_b))
        for i in range(4):
            assert await a.call(gets_a[i]) == datas_a[i]
            assert await b.call(gets_b[i]) == datas_b[i]
        assert await a.call(w.Stat(NS)) == \
            w.StatResult(len(data_a) + len(data_b), QUOTA, 2)
        # The thread answered a's appends 1-2 and gets 2-4, none of b's. It had one turn at
        # b: b's last append, arriving once a's upload let go of the thread (a connection
        # that streamed takes a free thread even mid-frame), completed the shard, which the
        # event loop commits and answers.
        assert stores[0].streamed == 5
        turns = [(bk.answered, isinstance(bk.req, w.Append) and bk.req.shard_id)
                 for bk in stores[0].handbacks]
        assert turns == [(2, sid(42)), (0, sid(43)), (3, False)]
        assert await b.download(NS, sid(42)) == data_a
        assert await a.download(NS, sid(43)) == data_b
    assert _stored_exactly(tmp_path, 42, data_a)
    assert _stored_exactly(tmp_path, 43, data_b)


async def test_cancelling_the_store_ends_a_thread_waiting_mid_frame(
        tmp_path: Path, table: dict[int, w.NamespaceInfo],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A streaming thread waits for the rest of an append (the linger is 30 s); cancelling the
    store ends its wait at the next cancellation check, and the upload is discarded."""
    half = w.MAX_CHUNK // 2
    received: list[int] = []  # bytes each streaming-thread recv_into got
    have_half = threading.Event()
    real_recv_into = BlockingSocket.recv_into

    def recv_into(self: BlockingSocket, view: memoryview, deadline: float) -> int:
        got = real_recv_into(self, view, deadline)
        received.append(got)
        if sum(received) >= half:
            have_half.set()
        return got

    monkeypatch.setattr(BlockingSocket, "recv_into", recv_into)
    data = payload(44, 2 * w.MAX_CHUNK + 1)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(44), data, 1)
    frame = w.ClientConnection.send(reqs[1])
    stream: trio.SocketStream | None = None
    try:
        # The hang guard is shorter than the linger: the thread must notice the cancellation.
        with trio.fail_after(10):
            async with running_store(tmp_path, table, stream_linger_s=30.0) as addr:
                stream = await trio.open_tcp_stream(*addr)
                c = Client(stream)
                assert await c.call(reqs[0]) == w.Accepted(w.MAX_CHUNK)
                await c.send_raw(frame[: len(frame) - w.MAX_CHUNK + half])
                # the thread has it all, and waits for the rest
                assert await trio.to_thread.run_sync(have_half.wait, 10)
                assert len(_tmp_files(tmp_path)) == 1
            # leaving running_store cancelled the store, with the client still connected
            assert not _tmp_files(tmp_path)
            assert await c.closed()
    finally:
        if stream is not None:
            await stream.aclose()


@pytest.mark.parametrize("streams", STREAMS)
async def test_a_namespace_removed_during_a_streamed_upload(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore],
        streams: int) -> None:
    """The contract goes while an upload streams: its next append is refused (as on the event
    loop), the temp file goes at once, and the connection goes on (the refusal is no
    protocol error; the upload is over, so a further append of it is one)."""
    data = payload(45, 3 * w.MAX_CHUNK + 9)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(45), data, 1)
    async with running_store(tmp_path, table, stream_workers=streams,
                             stream_linger_s=LONG_LINGER) as addr, connect(addr) as c:
        assert await c.call(reqs[0]) == w.Accepted(w.MAX_CHUNK)
        assert await c.call(reqs[1]) == w.Accepted(2 * w.MAX_CHUNK)
        assert len(_tmp_files(tmp_path)) == 1
        info = table.pop(NS)
        r = await c.call(reqs[2])
        assert code(r) is w.ErrorCode.UNKNOWN_NAMESPACE
        assert not _tmp_files(tmp_path)
        assert code(await c.call(w.Stat(NS))) is w.ErrorCode.UNKNOWN_NAMESPACE
        assert stores[0].streamed == (1 if streams else 0)  # the first append
        table[NS] = info
        assert await c.call(w.Stat(NS)) == w.StatResult(0, QUOTA, 0)
        assert code(await c.call(w.Get(NS, sid(45)))) is w.ErrorCode.NOT_FOUND
        other = payload(46, QUOTA)  # the whole quota is free
        assert await c.upload(NS, sid(46), other, 2) == w.Stored(QUOTA, content_hash(other))
        assert await c.download(NS, sid(46)) == other
        await c.send_raw(w.ClientConnection.send(reqs[3]))  # the refused upload's last append
        assert code(await c.response()) is w.ErrorCode.BAD_STATE
        assert await c.closed()
    assert not _tmp_files(tmp_path)


@pytest.mark.parametrize("streams", STREAMS)
async def test_a_namespace_removed_during_a_run_of_gets(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore],
        streams: int) -> None:
    data = payload(54, 2 * w.MAX_CHUNK)
    gets, datas = _gets(54, data)
    async with running_store(tmp_path, table, stream_workers=streams,
                             stream_linger_s=LONG_LINGER) as addr, connect(addr) as c:
        assert isinstance(await c.upload(NS, sid(54), data, 1), w.Stored)
        assert await c.call(gets[0]) == datas[0]  # the thread takes over (streams > 0)
        assert await c.call(gets[1]) == datas[1]
        info = table.pop(NS)
        assert code(await c.call(gets[0])) is w.ErrorCode.UNKNOWN_NAMESPACE
        assert stores[0].streamed == (1 if streams else 0)
        table[NS] = info
        assert await c.call(gets[0]) == datas[0]
        assert await c.call(gets[1]) == datas[1]
        assert await c.call(w.Stat(NS)) == w.StatResult(len(data), QUOTA, 1)
        assert stores[0].streamed == (2 if streams else 0)


@pytest.mark.parametrize("streams", STREAMS)
async def test_a_write_error_in_a_streamed_upload_is_answered_and_discards_it(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore],
        monkeypatch: pytest.MonkeyPatch, streams: int) -> None:
    """The disk fills up at an upload's second append (written in the streaming thread):
    the client gets ``internal`` naming the cause, the temp file and the quota reservation
    go, and this and other connections go on."""
    failing = sid(47)
    real_write = ShardWriter.write_and_finish

    def write_and_finish(self: ShardWriter, data: w.Bytes) -> bytes | None:
        if self.path.name.startswith(failing.hex()) and self.written == 2 * w.MAX_CHUNK:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(ShardWriter, "write_and_finish", write_and_finish)
    data = payload(47, 3 * w.MAX_CHUNK + 5)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(47), data, 1)
    other = payload(48, 2 * w.MAX_CHUNK + 3)
    async with running_store(tmp_path, table, stream_workers=streams,
                             stream_linger_s=LONG_LINGER) as addr, \
            connect(addr) as c, connect(addr) as d:
        assert await c.call(reqs[0]) == w.Accepted(w.MAX_CHUNK)
        assert await c.call(reqs[1]) == w.Accepted(2 * w.MAX_CHUNK)
        r = await c.call(reqs[2])
        assert isinstance(r, w.Error)
        assert r.code is w.ErrorCode.INTERNAL
        assert "No space left on device" in r.message
        assert not _tmp_files(tmp_path)
        assert stores[0].streamed == (1 if streams else 0)  # the first append
        assert code(await c.call(w.Get(NS, sid(47)))) is w.ErrorCode.NOT_FOUND
        assert await d.upload(NS, sid(48), other, 2) == w.Stored(len(other), content_hash(other))
        assert await d.download(NS, sid(48)) == other
        # the failed upload's reservation was returned: the rest of the quota fits
        rest = payload(49, QUOTA - len(other))
        assert await c.upload(NS, sid(49), rest, 3) == w.Stored(len(rest), content_hash(rest))
        assert await c.download(NS, sid(49)) == rest
        assert await c.call(w.Stat(NS)) == w.StatResult(QUOTA, QUOTA, 2)
    assert not _tmp_files(tmp_path)


async def test_a_shard_corrupted_under_a_streaming_thread_is_never_served(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore]) -> None:
    """A byte flips between two gets answered by the same streaming thread on one connection:
    the next get of that block is ``corrupt``, never the bad data; intact blocks are still
    served."""
    data = payload(50, 2 * w.BLOCK_SIZE + 100)
    size, shard_hash = len(data), content_hash(data)
    path = NamespaceDir(tmp_path, NS).shard_path(sid(50))
    async with running_store(tmp_path, table, stream_linger_s=LONG_LINGER) as addr, \
            connect(addr) as c:
        assert isinstance(await c.upload(NS, sid(50), data, 1), w.Stored)
        bs = w.BLOCK_SIZE
        # the event loop answers, then the thread takes the connection
        assert await c.call(w.Get(NS, sid(50), 0, 10)) == w.Data(size, shard_hash, 0, data[:10])
        assert await c.call(w.Get(NS, sid(50), bs, 10)) == \
            w.Data(size, shard_hash, bs, data[bs : bs + 10])  # the thread
        raw = bytearray(path.read_bytes())
        raw[-150] ^= 0x01  # a data byte of block 1
        _rewrite(path, bytes(raw))
        assert code(await c.call(w.Get(NS, sid(50), bs, 10))) is w.ErrorCode.CORRUPT
        assert await c.call(w.Get(NS, sid(50), 0, 10)) == w.Data(size, shard_hash, 0, data[:10])
        assert await c.call(w.Get(NS, sid(50), 2 * bs, 10)) == \
            w.Data(size, shard_hash, 2 * bs, data[2 * bs : 2 * bs + 10])  # the thread
        assert code(await c.call(w.Get(NS, sid(50), 0, w.MAX_CHUNK))) is w.ErrorCode.CORRUPT
        assert await c.call(w.Stat(NS)) == w.StatResult(size, QUOTA, 1)
        assert stores[0].streamed == 2  # the corrupt reads were left to the event loop


@pytest.mark.parametrize("streams", STREAMS)
@pytest.mark.parametrize("bad", ["too_large", "out_of_order", "malformed"])
async def test_a_bad_frame_in_a_streamed_upload_closes_only_its_connection(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int, bad: str) -> None:
    data = payload(51, 3 * w.MAX_CHUNK + 1)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(51), data, 1)
    raw, want = {
        "too_large": (struct.pack(">II", 200, w.MAX_CHUNK + 1), w.ErrorCode.TOO_LARGE),
        "out_of_order": (w.ClientConnection.send(reqs[3]), w.ErrorCode.BAD_STATE),  # skips one
        "malformed": (struct.pack(">II", 4, 0) + b"\xc1\xc1\xc1\xc1", w.ErrorCode.MALFORMED),
    }[bad]
    async with running_store(tmp_path, table, stream_workers=streams,
                             stream_linger_s=LONG_LINGER) as addr, \
            connect(addr) as c, connect(addr) as other:
        assert await c.call(reqs[0]) == w.Accepted(w.MAX_CHUNK)
        assert await c.call(reqs[1]) == w.Accepted(2 * w.MAX_CHUNK)
        await c.send_raw(raw)
        assert code(await c.response()) is want
        assert await c.closed()
        assert not _tmp_files(tmp_path)
        whole = payload(52, QUOTA)  # the reservation went with the connection
        assert await other.upload(NS, sid(52), whole, 2) == w.Stored(QUOTA, content_hash(whole))
        assert await other.download(NS, sid(52)) == whole


@pytest.mark.parametrize("streams", STREAMS)
async def test_a_streamed_upload_not_matching_its_signed_hash_is_not_stored(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], streams: int) -> None:
    data = payload(53, 3 * w.MAX_CHUNK + 7)
    reqs = w.upload_requests(OWNER, CHAIN, NS, sid(53), data, 1)
    forged: list[w.Request] = [reqs[0]]
    for r in reqs[1:]:  # the appends carry other bytes than the put signed the hash of
        assert isinstance(r, w.Append)
        forged.append(w.Append(r.ns, r.shard_id, r.offset, bytes(w.nbytes(r.data)), r.hash))
    async with running_store(tmp_path, table, stream_workers=streams,
                             stream_linger_s=LONG_LINGER) as addr, connect(addr) as c:
        assert [await c.call(r) for r in forged[:3]] == [
            w.Accepted(w.MAX_CHUNK), w.Accepted(2 * w.MAX_CHUNK), w.Accepted(3 * w.MAX_CHUNK)]
        assert code(await c.call(forged[3])) is w.ErrorCode.BAD_HASH
        assert not _tmp_files(tmp_path)
        assert code(await c.call(w.Get(NS, sid(53)))) is w.ErrorCode.NOT_FOUND
        assert await c.call(w.Stat(NS)) == w.StatResult(0, QUOTA, 0)
        assert await c.upload(NS, sid(53), data, 2) == w.Stored(len(data), content_hash(data))
        assert await c.download(NS, sid(53)) == data


# -- the child process -----------------------------------------------------------------------


class Child:
    def __init__(self, proc: trio.Process, addr: tuple[str, int]) -> None:
        self.proc = proc
        self.addr = addr


@asynccontextmanager
async def child_store(data_dir: Path, ns_file: Path, port: int = 0) -> AsyncIterator[Child]:
    """``python -m zos_agent.shardstore`` on 127.0.0.1; stopped (by its pid) at exit."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "zos_agent.shardstore", "--data-dir", str(data_dir),
         "--listen", f"127.0.0.1:{port}", "--namespaces-file", str(ns_file),
         "--chain-id", CHAIN, "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(256)
                if not chunk:
                    raise RuntimeError(f"shard store exited: {await proc.wait()}")
                line += chunk
        text = line.decode().strip()
        assert text.startswith("listening 127.0.0.1:")
        yield Child(proc, ("127.0.0.1", int(text.rsplit(":", 1)[1])))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def eventually(ask: Callable[[], Awaitable[w.Response]],
                     ok: Callable[[w.Response], bool]) -> None:
    """Poll another process until ``ok`` (it reloads its file on its own schedule)."""
    with trio.fail_after(10):
        while True:
            if ok(await ask()):
                return
            await trio.sleep(0.05)


@pytest.mark.slow
async def test_child_process_serves_and_reloads_namespaces(tmp_path: Path) -> None:
    ns_file = tmp_path / "namespaces.json"
    write_namespaces_file(ns_file, {})
    async with child_store(tmp_path / "data", ns_file) as child, connect(child.addr) as c:
        assert code(await c.call(w.Stat(NS))) is w.ErrorCode.UNKNOWN_NAMESPACE
        write_namespaces_file(ns_file, {NS: w.NamespaceInfo(OWNER.public_key, QUOTA)})
        child.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: c.call(w.Stat(NS)), lambda r: code(r) is None)
        data = payload(3, w.MAX_CHUNK + 3)
        assert isinstance(await c.upload(NS, sid(1), data, 1), w.Stored)
        assert await c.download(NS, sid(1)) == data
        # a change of the file alone (no signal) is picked up too
        write_namespaces_file(ns_file, {})
        await eventually(lambda: c.call(w.Stat(NS)), lambda r: code(r) is not None)
    async with child_store(tmp_path / "data", ns_file) as child:
        assert child.proc.returncode is None
    assert child.proc.returncode == 0  # SIGTERM is a clean stop


async def until(cond: Callable[[], bool]) -> None:
    """Wait (polling, at most 10 s) until ``cond()``: for what the store does on its own
    after a real-time pause."""
    with trio.fail_after(10):
        while True:
            if cond():
                return
            await trio.sleep(0.01)


@pytest.mark.parametrize("streams", STREAMS)
async def test_a_quiet_connection_gives_its_buffers_back(
        tmp_path: Path, table: dict[int, w.NamespaceInfo], stores: list[RecordedStore],
        streams: int) -> None:
    """Buffers go back once the client is quiet between requests, never mid-upload; the
    connection then serves uploads and gets as before (with new buffers)."""
    nonce = Nonces()
    data = payload(41, 2 * w.MAX_CHUNK + 99)
    async with running_store(tmp_path, table, stream_workers=streams,
                             stream_linger_s=0.05) as addr, connect(addr) as c:
        assert isinstance(await c.upload(NS, sid(1), data, nonce()), w.Stored)
        assert await c.download(NS, sid(1)) == data
        await until(lambda: stores[0].idle_releases >= 1)
        # an upload left open while quiet: its buffer goes too, and it goes on afterwards
        reqs = w.upload_requests(OWNER, CHAIN, NS, sid(2), data, nonce())
        assert isinstance(await c.call(reqs[0]), w.Accepted)
        released = stores[0].idle_releases
        await until(lambda: stores[0].idle_releases > released)
        for req in reqs[1:]:
            resp = await c.call(req)
        assert resp == w.Stored(len(data), content_hash(data))
        assert await c.download(NS, sid(2)) == data
        assert await c.download(NS, sid(1)) == data
        # mid-frame (half a payload received), nothing is released: the frame completes
        more = w.upload_requests(OWNER, CHAIN, NS, sid(3), data, nonce())
        frame = w.ClientConnection.send(more[0])
        released = stores[0].idle_releases
        await c.send_raw(frame[: len(frame) // 2])
        await trio.sleep(0.3)  # several lingers' worth of silence, mid-frame
        assert stores[0].idle_releases == released
        await c.send_raw(frame[len(frame) // 2 :])
        assert isinstance(await c.response(), w.Accepted)


@pytest.mark.slow
async def test_idle_connections_hold_no_buffers_in_the_child_process(tmp_path: Path) -> None:
    """32 connections that each read a shard and opened an upload, then went quiet: the
    store's resident memory goes back down (each held about 2 MiB of buffers while busy)."""
    ns_file = tmp_path / "namespaces.json"
    write_namespaces_file(ns_file, {NS: w.NamespaceInfo(OWNER.public_key, 1 << 30)})
    data = payload(42, 3 * w.MAX_CHUNK)

    def rss_kib(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    async with child_store(tmp_path / "data", ns_file) as child, \
            contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(connect(child.addr))
        assert isinstance(await first.upload(NS, sid(0), data, 1), w.Stored)
        base = rss_kib(child.proc.pid)
        peak = base
        for i in range(32):
            c = await stack.enter_async_context(connect(child.addr))
            r = await c.call(w.Get(NS, sid(0), 0, w.MAX_CHUNK))
            assert isinstance(r, w.Data)
            assert r.data == data[: w.MAX_CHUNK]
            put = w.upload_requests(OWNER, CHAIN, NS, sid(100 + i), data, 10 + i)[0]
            assert isinstance(await c.call(put), w.Accepted)
            peak = max(peak, rss_kib(child.proc.pid))
        assert peak > base + 8 * 1024  # the buffers were really there while busy
        await until(lambda: rss_kib(child.proc.pid) <= base + 4 * 1024)


@pytest.mark.slow
async def test_child_process_kill9_during_writes_never_serves_a_torn_shard(
        tmp_path: Path) -> None:
    ns_file = tmp_path / "namespaces.json"
    quota = 1 << 30
    write_namespaces_file(ns_file, {NS: w.NamespaceInfo(OWNER.public_key, quota)})
    data_dir = tmp_path / "data"
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    seed = rng.randrange(1 << 30)
    print(f"kill -9 test seed {seed}")
    rng = random.Random(seed)
    sizes: dict[int, int] = {}
    acked: set[int] = set()
    nonce = Nonces()
    for round_ in range(3):
        async with child_store(data_dir, ns_file) as child:
            async def writer(c: Client, base: int, child: Child = child) -> None:
                for i in range(base, base + 1000):
                    n = i
                    sizes[n] = rng.choice([10, w.BLOCK_SIZE + 1, w.MAX_CHUNK + 17,
                                           2 * w.MAX_CHUNK + 5])
                    if await c.upload(NS, sid(n), payload(n, sizes[n]), nonce()) == \
                            w.Stored(sizes[n], content_hash(payload(n, sizes[n]))):
                        acked.add(n)

            async with trio.open_nursery() as nursery:
                for k in range(3):
                    c = Client(await trio.open_tcp_stream(*child.addr))
                    nursery.start_soon(_ignore_eof, writer, c, round_ * 10_000 + k * 1000)
                await trio.sleep(0.3 + rng.random() * 0.7)
                child.proc.kill()  # SIGKILL by pid, mid-write
                await child.proc.wait()
    async with child_store(data_dir, ns_file) as child, connect(child.addr) as c:
        used = count = 0
        for n, size in sorted(sizes.items()):
            got = await c.download(NS, sid(n))
            if isinstance(got, w.Error):
                assert got.code is w.ErrorCode.NOT_FOUND, (n, got)
                assert n not in acked  # an acknowledged write is durable
                continue
            assert got == payload(n, size)
            assert isinstance(await c.call(w.Verify(NS, sid(n))), w.Verified)
            used += size
            count += 1
        assert acked
        print(f"{len(sizes)} uploads tried, {len(acked)} acknowledged, {count} stored")
        assert await c.call(w.Stat(NS)) == w.StatResult(used, quota, count)
        assert not list((data_dir / "ns" / str(NS) / "tmp").iterdir())


async def _ignore_eof(fn: Callable[[Client, int], Any], c: Client, base: int) -> None:
    try:
        await fn(c, base)
    except (EOFError, trio.BrokenResourceError, w.ShardProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(c.stream)
