"""The storage client against real shard stores (zos_agent.shardstore) on loopback TCP, all in
one trio process; the ledger is an in-memory :class:`Grid` (the ledger side has its own tests).

A node is killed by cancelling its store's task: its port then refuses connections, as a
dead machine would; it is also reported down, as the ledger would after missed uptime reports.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import hypothesis
import pytest
import trio
from hypothesis import strategies as st

from ledger import keys
from threebot.storage import codec as c
from threebot.storage.client import Settings, StorageClient
from threebot.storage.errors import (
    BadCapability,
    BadParameters,
    NotEnoughShards,
    PlacementError,
    StorageError,
)
from threebot.storage.grid import NamespaceView, NodeView
from threebot.storage.index import LocalIndex
from threebot.storage.outfile import OutputFile
from threebot.storage.shardclient import ShardConnection
from zos_agent import shardstore
from zos_agent import shardwire as w

CHAIN = "test-chain"
OWNER = 7
PARAMS = c.Params(segment_size=4096, leaves_per_page=8)


@dataclass
class FakeNode:
    view: NodeView
    data_dir: Path
    table: dict[int, w.NamespaceInfo] = field(default_factory=dict)
    endpoint: str = ""
    scope: trio.CancelScope | None = None


class MemoryGrid:
    """:class:`threebot.storage.grid.Grid` in memory, with a real shard store per node."""

    def __init__(self, owner_key: bytes) -> None:
        self.owner_key = owner_key
        self.fake: dict[int, FakeNode] = {}
        self.contracts: dict[int, NamespaceView] = {}
        self.next_contract = 100
        self.created: list[int] = []
        self.cancelled: list[int] = []

    @property
    def chain_id(self) -> str:
        return CHAIN

    async def own_twin(self) -> int:
        return OWNER

    async def nodes(self) -> list[NodeView]:
        return [n.view for n in self.fake.values()]

    async def namespaces(self, owner: int, hints: Iterable[int] = ()) -> list[NamespaceView]:
        views = [await self.namespace(cid) for cid, v in self.contracts.items() if v.owner == owner]
        return [v for v in views if v is not None]

    async def namespace(self, contract: int) -> NamespaceView | None:
        v = self.contracts.get(contract)
        if v is None:
            return None
        node = self.fake[v.node]
        return replace(v, endpoint=node.endpoint)  # a dead node keeps its endpoint: it refuses

    async def create_namespace(self, node: int, quota: int) -> int:
        cid = self.next_contract
        self.next_contract += 1
        self.fake[node].table[cid] = w.NamespaceInfo(self.owner_key, quota)
        self.contracts[cid] = NamespaceView(cid, node, OWNER, quota, "deployed")
        self.created.append(cid)
        return cid

    async def resize_namespace(self, contract: int, quota: int) -> None:
        v = self.contracts[contract]
        self.fake[v.node].table[contract] = w.NamespaceInfo(self.owner_key, quota)
        self.contracts[contract] = replace(v, quota=quota)

    async def cancel_namespace(self, contract: int) -> None:
        v = self.contracts.pop(contract)
        del self.fake[v.node].table[contract]
        self.cancelled.append(contract)

    # -- test controls ---------------------------------------------------------------------

    async def start_node(self, nursery: trio.Nursery, node_id: int) -> None:
        node = self.fake[node_id]
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            with scope:
                await shardstore.serve_shards(node.data_dir, lambda: dict(node.table), CHAIN,
                                              "127.0.0.1", 0, task_status=task_status)

        host, port = await nursery.start(run)
        node.scope = scope
        node.endpoint = f"{host}:{port}"
        node.view = replace(node.view, up=True)

    def kill(self, node_id: int) -> None:
        node = self.fake[node_id]
        assert node.scope is not None
        node.scope.cancel()
        node.view = replace(node.view, up=False)


async def make_env(tmp: Path, nursery: trio.Nursery, count: int = 26, farms: int = 5,
                   settings: Settings | None = None) -> tuple[MemoryGrid, StorageClient]:
    key = keys.KeyPair.from_seed(hashlib.blake2b(b"owner", digest_size=32).digest())
    grid = MemoryGrid(key.public_key)
    for i in range(1, count + 1):
        farm = (i - 1) % farms + 1
        grid.fake[i] = FakeNode(NodeView(i, farm, f"C{farm}", 100 << 30, False), tmp / f"node{i}")
        await grid.start_node(nursery, i)
    rng = random.Random(1)
    clock = [1_700_000_000_000_000]

    def clock_us() -> int:
        clock[0] += 1
        return clock[0]

    client = StorageClient(
        grid, key, LocalIndex(tmp / "home" / "storage.json"),
        random_bytes=lambda n: rng.randbytes(n), clock_us=clock_us,
        settings=settings or Settings(params=PARAMS, window=4, request_timeout_s=5.0,
                                      connect_timeout_s=2.0, namespace_timeout_s=5.0,
                                      namespace_poll_s=0.01, min_quota=1 << 20))
    return grid, client


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[MemoryGrid, StorageClient, Path]]:
    async with trio.open_nursery() as nursery:
        grid, client = await make_env(tmp_path, nursery)
        yield grid, client, tmp_path
        nursery.cancel_scope.cancel()


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".partial")]


async def shard_nodes(client: StorageClient, cap: str) -> list[int]:
    return [s.placement.node for s in (await client._load_manifest(c.parse_cap(cap))).manifest.shards]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 150_000])
async def test_put_get_round_trip(env: tuple[MemoryGrid, StorageClient, Path], size: int) -> None:
    grid, client, tmp = env
    data = write_file(tmp / "in.bin", size, seed=size)
    res = await client.put(tmp / "in.bin")
    assert (res.size, res.k, res.n) == (size, 16, 20)
    assert len(set(res.nodes)) == 20
    assert res.cap.startswith("tfs:")
    assert res.verify_cap.startswith("tfsv:")
    out = tmp / "out.bin"
    assert await client.get(res.cap, out) == size
    assert out.read_bytes() == data
    assert leftovers(tmp) == []
    assert [e.cap for e in client.ls()] == [res.cap]
    doc = res.doc()
    assert set(doc) >= {"cap", "size", "k", "n", "nodes"}


async def test_placement_spreads_and_reuses_namespaces(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    write_file(tmp / "a", 10_000)
    first = await client.put(tmp / "a")
    farms = [grid.fake[n].view.farm for n in first.nodes]
    assert sorted(farms.count(f) for f in set(farms)) == [4, 4, 4, 4, 4]
    created = len(grid.created)
    assert created == 20
    second = await client.put(tmp / "a")
    assert len(grid.created) == created, "the second put must reuse the namespaces"
    assert set(second.nodes) == set(first.nodes)
    assert second.cap != first.cap


async def test_namespaces_grow_when_short(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        grid, client = await make_env(tmp_path, nursery, settings=Settings(
            params=PARAMS, window=4, min_quota=1, namespace_poll_s=0.01))
        write_file(tmp_path / "small", 20_000)
        first = await client.put(tmp_path / "small")
        quotas = {cid: v.quota for cid, v in grid.contracts.items()}
        data = write_file(tmp_path / "big", 200_000, seed=2)
        second = await client.put(tmp_path / "big")
        assert set(second.nodes) == set(first.nodes)
        assert set(grid.contracts) == set(quotas), "grown in place, no second namespace per node"
        assert all(v.quota > quotas[cid] for cid, v in grid.contracts.items())
        await client.get(second.cap, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == data
        nursery.cancel_scope.cancel()


async def test_four_nodes_lost_read_check_repair(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    data = write_file(tmp / "in.bin", 100_000, seed=3)
    res = await client.put(tmp / "in.bin")
    for node in res.nodes[:4]:
        grid.kill(node)
    await client.get(res.cap, tmp / "out1")
    assert (tmp / "out1").read_bytes() == data
    report = await client.check(res.verify_cap)
    assert (report.healthy, report.needed, report.total) == (16, 16, 20)
    assert {s.node for s in report.shards if s.state == "unreachable"} == set(res.nodes[:4])
    repaired = await client.repair(res.cap)
    assert len(repaired.moved) == 4
    assert repaired.revision == 2
    assert {frm for _, frm, _ in repaired.moved} == set(res.nodes[:4])
    new_nodes = {to for _, _, to in repaired.moved}
    assert not new_nodes & set(res.nodes)
    after = await client.check(res.cap)
    assert after.healthy == 20
    assert after.revision == 2
    # the capability still works after four more of the original nodes die
    for node in res.nodes[4:8]:
        grid.kill(node)
    await client.get(res.cap, tmp / "out2")
    assert (tmp / "out2").read_bytes() == data


async def test_five_nodes_lost_fails_cleanly(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    write_file(tmp / "in.bin", 30_000)
    res = await client.put(tmp / "in.bin")
    dead = res.nodes[:5]
    for node in dead:
        grid.kill(node)
    out = tmp / "out.bin"
    with pytest.raises(NotEnoughShards, match=r"only 15 of the 16 shards needed are reachable \(nodes") as info:
        await client.get(res.cap, out)
    assert not out.exists()
    assert leftovers(tmp) == []
    assert all(str(n) in str(info.value) for n in dead)


async def test_corrupt_shard_is_skipped_then_repaired_in_place(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    data = write_file(tmp / "in.bin", 50_000, seed=5)
    res = await client.put(tmp / "in.bin")
    m = (await client._load_manifest(c.parse_cap(res.cap))).manifest
    si = c.parse_cap(res.cap).keys().storage_index
    victim = m.shards[2].placement
    path = shardstore.NamespaceDir(grid.fake[victim.node].data_dir, victim.ns).shard_path(c.shard_id(si, 2))
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    await client.get(res.cap, tmp / "out")
    assert (tmp / "out").read_bytes() == data
    report = await client.check(res.cap)
    states = {s.index: s.state for s in report.shards}
    assert states[2] == "corrupt"
    assert report.healthy == 19
    repaired = await client.repair(res.cap)
    assert repaired.rewritten == (2,)
    assert repaired.moved == ()
    assert (await client.check(res.cap, deep=True)).healthy == 20


async def test_rm_deletes_everything_and_cancels_namespaces(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    write_file(tmp / "a", 20_000, seed=1)
    keep = await client.put(tmp / "a")
    gone = await client.put(tmp / "a")
    report = await client.rm(gone.cap)
    assert report.failed == {}
    assert report.cancelled == (), "namespaces still used by the other object stay"
    with pytest.raises(StorageError, match="no manifest"):
        await client.get(gone.cap, tmp / "x")
    assert [e.cap for e in client.ls()] == [keep.cap]
    report = await client.rm(keep.cap)
    assert len(report.cancelled) == 20
    assert client.ls() == []
    leftover = [p for n in grid.fake.values() for p in (n.data_dir).rglob("*")
                if p.is_file() and "shards" in p.parts]
    assert leftover == []


async def test_no_plaintext_on_any_node(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    text = (b"All happy families are alike; each unhappy family is unhappy in its own way. " * 800)
    (tmp / "book.txt").write_bytes(text)
    await client.put(tmp / "book.txt")
    windows = {text[i:i + 64] for i in range(0, 200)}  # the text repeats with period < 200
    for node in grid.fake.values():
        for path in node.data_dir.rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                assert not any(blob[j:j + 64] in windows for j in range(len(blob) - 63)), path


async def test_verify_cap_checks_but_cannot_read(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    write_file(tmp / "a", 5000)
    res = await client.put(tmp / "a")
    assert (await client.check(res.verify_cap)).healthy == 20
    with pytest.raises(BadCapability, match="verify capability"):
        await client.get(res.verify_cap, tmp / "out")
    with pytest.raises(BadCapability, match="checksum"):
        await client.get(res.cap[:-2] + ("aa" if not res.cap.endswith("aa") else "bb"), tmp / "out")
    assert not (tmp / "out").exists()


async def test_wrong_key_finds_nothing(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    write_file(tmp / "a", 5000)
    await client.put(tmp / "a")
    stranger = str(c.ReadCap(OWNER, bytes(32)))
    with pytest.raises(StorageError, match="no manifest"):
        await client.get(stranger, tmp / "out")


async def test_too_few_nodes_is_a_placement_error(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        grid, client = await make_env(tmp_path, nursery, count=19)
        write_file(tmp_path / "a", 100)
        with pytest.raises(PlacementError, match="only 19 usable nodes"):
            await client.put(tmp_path / "a")
        nursery.cancel_scope.cancel()


async def test_node_dying_during_put_is_replaced(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        grid, client = await make_env(tmp_path, nursery)
        data = write_file(tmp_path / "a", 300_000, seed=9)
        victim = 3
        real_connect = client._connector
        calls = {"n": 0}

        async def flaky(host: str, port: int) -> trio.abc.Stream:
            if f"{host}:{port}" == grid.fake[victim].endpoint:
                calls["n"] += 1
                if calls["n"] > 1:  # the first connection (stat) works, then the node dies
                    grid.kill(victim)
            return await real_connect(host, port)

        client._connector = flaky
        res = await client.put(tmp_path / "a")
        assert victim not in res.nodes
        assert calls["n"] > 1, "the victim was placed and died during the upload"
        assert (await client.check(res.cap)).healthy == 20
        await client.get(res.cap, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == data
        nursery.cancel_scope.cancel()


async def test_unreadable_input_and_output(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    with pytest.raises(StorageError, match="cannot read"):
        await client.put(tmp / "missing")
    write_file(tmp / "a", 10)
    res = await client.put(tmp / "a")
    with pytest.raises(StorageError, match="cannot write"):
        await client.get(res.cap, tmp / "no-such-dir" / "out")


async def black_hole(nursery: trio.Nursery) -> str:
    """A node that accepts connections and never answers."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    await nursery.start(trio.serve_listeners, handler, listeners)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def lying_proxy(nursery: trio.Nursery, upstream: str, target: bytes) -> str:
    """A node whose store is fine but which flips one bit in the data of shard ``target`` it
    serves (it would pass the store's own hashes: only the Merkle leaves catch it)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = upstream.rsplit(":", 1)

    async def handler(stream: trio.SocketStream) -> None:
        server, client = w.ServerConnection(), w.ClientConnection()
        async with stream, await trio.open_tcp_stream(host, int(port)) as up:
            while data := await stream.receive_some(1 << 16):
                server.receive_data(bytes(data))
                while not isinstance(req := server.next_request(), w.NeedData):
                    await up.send_all(client.send(req))
                    while isinstance(resp := client.next_response(), w.NeedData):
                        client.receive_data(bytes(await up.receive_some(1 << 16)))
                    if isinstance(req, w.Get) and req.shard_id == target and isinstance(resp, w.Data) and resp.data:
                        flipped = bytearray(resp.data)
                        flipped[len(flipped) // 2] ^= 0x04
                        resp = replace(resp, data=bytes(flipped))
                    await stream.send_all(server.send(resp))

    await nursery.start(trio.serve_listeners, handler, listeners)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_slow_node_is_skipped(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    data = write_file(tmp / "a", 60_000, seed=11)
    res = await client.put(tmp / "a")
    async with trio.open_nursery() as nursery:
        for node in res.nodes[:3]:
            grid.fake[node].endpoint = await black_hole(nursery)
        start = trio.current_time()
        await client.get(res.cap, tmp / "out")
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert (tmp / "out").read_bytes() == data
    # well under the 5 s request timeout: the slow nodes were not waited for
    assert took < client.settings.straggler_s + 2.0


async def test_lying_node_is_caught_by_merkle_leaves(env: tuple[MemoryGrid, StorageClient, Path]) -> None:
    grid, client, tmp = env
    data = write_file(tmp / "a", 60_000, seed=12)
    res = await client.put(tmp / "a")
    cap = c.parse_cap(res.cap)
    m = (await client._load_manifest(cap)).manifest
    liar = m.shards[5].placement.node
    async with trio.open_nursery() as nursery:
        grid.fake[liar].endpoint = await lying_proxy(
            nursery, grid.fake[liar].endpoint, c.shard_id(cap.keys().storage_index, 5))
        await client.get(res.cap, tmp / "out")
        assert (tmp / "out").read_bytes() == data
        shallow = await client.check(res.cap)
        assert shallow.healthy == 20, "the store's own hashes are fine: only a deep check reads blocks"
        deep = await client.check(res.cap, deep=True)
        bad = [s for s in deep.shards if s.state != "ok"]
        assert [(s.index, s.node, s.state) for s in bad] == [(5, liar, "corrupt")]
        assert "segment" in bad[0].detail
        assert "does not match its hash" in bad[0].detail
        nursery.cancel_scope.cancel()


async def test_disk_full_during_get_leaves_nothing(env: tuple[MemoryGrid, StorageClient, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    grid, client, tmp = env
    write_file(tmp / "a", 30_000)
    res = await client.put(tmp / "a")
    calls = {"n": 0}

    real_write = OutputFile.fill_at

    def full(self: OutputFile, offset: int, n: int, fill: Callable[[memoryview], None]) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, offset, n, fill)

    monkeypatch.setattr(OutputFile, "fill_at", full)
    with pytest.raises(StorageError, match="No space left on device"):
        await client.get(res.cap, tmp / "out")
    assert not (tmp / "out").exists()
    assert leftovers(tmp) == []


def test_sizes_of_test_params() -> None:
    # the test parameters still give several segments and pages per shard
    assert PARAMS.segment_count(150_000) == 37
    assert PARAMS.page_count(150_000) == 5
    assert os.path.sep == "/"


# -- every window / pipeline / geometry makes progress -----------------------------------------
#
# A reader asks for ``chunk`` bytes only when they fit in the window (``window`` segments past
# the consumer), and the consumer moves on only when a segment's blocks are whole. The cases
# pin how ``chunk`` falls against the block size: the whole window, whole blocks under it,
# capped by MAX_CHUNK just short of the window (the devnet hang: 1 MiB segments at k=16 give
# blocks of 65537 bytes, so window 16 and pipeline 1 asked for 1 MiB, 16 bytes short of 16
# blocks; it stalled once the object was longer than two windows), blocks longer than
# MAX_CHUNK, and sizes around segments and pages (empty, one segment, one page, a page and a
# segment, a short last segment). No spare readers (spare_after_s beyond the deadline): the
# ``k`` readers must make progress on their own, a spare would only hide a stall.

MAX = w.MAX_CHUNK
# one block of 65537 bytes per segment and shard: the devnet geometry (1 MiB segments, k=16)
DEVNET_LIKE = c.Params(k=1, n=2, segment_size=MAX // 16 - c.TAG_SIZE + 1, leaves_per_page=8)
WIDE = c.Params(k=2, n=3, segment_size=MAX // 8, leaves_per_page=3)  # blocks of 65544 bytes
ALIGNED = c.Params(k=1, n=2, segment_size=MAX // 16 - c.TAG_SIZE, leaves_per_page=8)  # 65536
HUGE = c.Params(k=1, n=2, segment_size=MAX + 1000, leaves_per_page=2)  # blocks > MAX_CHUNK
SMALL = c.Params(k=4, n=6, segment_size=1024, leaves_per_page=8)  # blocks of 260 bytes
SEG = SMALL.segment_size
PAGE = SMALL.leaves_per_page * SEG

FETCH_CASES = [
    # (params, window, pipeline, size)
    pytest.param(DEVNET_LIKE, 16, 1, 40 * DEVNET_LIKE.segment_size + 123, id="devnet-w16-p1"),
    pytest.param(DEVNET_LIKE, 16, 1, 33 * DEVNET_LIKE.segment_size, id="devnet-w16-p1-33seg"),
    pytest.param(DEVNET_LIKE, 16, 2, 40 * DEVNET_LIKE.segment_size + 123, id="devnet-w16-p2"),
    pytest.param(DEVNET_LIKE, 16, 3, 40 * DEVNET_LIKE.segment_size + 5, id="devnet-w16-p3"),
    pytest.param(DEVNET_LIKE, 17, 1, 40 * DEVNET_LIKE.segment_size + 5, id="devnet-w17-p1"),
    pytest.param(DEVNET_LIKE, 20, 1, 50 * DEVNET_LIKE.segment_size - 1, id="devnet-w20-p1"),
    pytest.param(WIDE, 16, 1, 34 * WIDE.segment_size + 1000, id="wide-w16-p1"),
    pytest.param(WIDE, 12, 1, 30 * WIDE.segment_size - 1, id="wide-w12-p1-chunk-is-window"),
    pytest.param(WIDE, 12, 2, 30 * WIDE.segment_size - 1, id="wide-w12-p2"),
    pytest.param(ALIGNED, 16, 1, 40 * ALIGNED.segment_size + 7, id="aligned-w16-p1"),
    pytest.param(ALIGNED, 20, 1, 48 * ALIGNED.segment_size, id="aligned-w20-p1"),
    pytest.param(HUGE, 1, 1, 3 * HUGE.segment_size + 10, id="huge-blocks-w1-p1"),
    pytest.param(HUGE, 2, 2, 3 * HUGE.segment_size, id="huge-blocks-w2-p2"),
    pytest.param(SMALL, 4, 1, 60 * SEG + 5, id="small-w4-p1-chunk-is-window"),
    pytest.param(SMALL, 1, 1, 30 * SEG, id="small-w1-p1"),
    pytest.param(SMALL, 1, 2, 20 * SEG + 1, id="small-w1-p2-window-under-pipeline"),
    pytest.param(SMALL, 3, 2, 50 * SEG + 100, id="small-w3-p2-chunk-not-blocks"),
    pytest.param(SMALL, 4, 1, 0, id="small-empty"),
    pytest.param(SMALL, 4, 1, SEG, id="small-one-segment"),
    pytest.param(SMALL, 4, 1, PAGE, id="small-one-page"),
    pytest.param(SMALL, 4, 1, PAGE + SEG, id="small-page-plus-one"),
    pytest.param(SMALL, 16, 1, PAGE + SEG - 1, id="small-w16-short-last"),
    pytest.param(SMALL, 100, 4, 3 * PAGE + 1, id="small-window-past-end"),
]


def fetch_settings(params: c.Params, window: int, pipeline: int) -> Settings:
    return Settings(params=params, window=window, pipeline=pipeline, spare_after_s=60.0,
                    request_timeout_s=5.0, connect_timeout_s=2.0, namespace_timeout_s=5.0,
                    namespace_poll_s=0.01, min_quota=1 << 20)


async def round_trip(tmp: Path, params: c.Params, window: int, pipeline: int, size: int,
                     seed: int = 0) -> None:
    """Put ``size`` bytes with ``params``, get them back with ``window`` and ``pipeline`` and
    compare; a stall fails (trio.TooSlowError) instead of hanging."""
    data = write_file(tmp / "in.bin", size, seed=seed)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _grid, client = await make_env(tmp, nursery, count=params.n,
                                           settings=fetch_settings(params, window, pipeline))
            res = await client.put(tmp / "in.bin")
            assert await client.get(res.cap, tmp / "out.bin") == size
            nursery.cancel_scope.cancel()
    assert (tmp / "out.bin").read_bytes() == data


@pytest.mark.parametrize(("params", "window", "pipeline", "size"), FETCH_CASES)
async def test_get_makes_progress_with_any_window_and_pipeline(
        tmp_path: Path, params: c.Params, window: int, pipeline: int, size: int) -> None:
    await round_trip(tmp_path, params, window, pipeline, size, seed=size)


@pytest.mark.parametrize("window", [0, -1, 1.5, True])
def test_window_without_a_segment_is_refused(window: int) -> None:
    with pytest.raises(BadParameters, match="window must be"):
        Settings(window=window)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(window=st.integers(2, 24), pipeline=st.integers(1, 4), k=st.integers(1, 2),
                  off=st.integers(-24, 24), segments=st.integers(1, 52),
                  tail=st.integers(0, 1 << 20), leaves_per_page=st.integers(1, 9))
@hypothesis.example(window=16, pipeline=1, k=1, off=1, segments=40, tail=0, leaves_per_page=8)
@hypothesis.example(window=20, pipeline=1, k=2, off=3, segments=42, tail=406, leaves_per_page=3)
async def test_get_makes_progress_any_geometry(window: int, pipeline: int, k: int, off: int,
                                               segments: int, tail: int,
                                               leaves_per_page: int) -> None:
    # Blocks within a few bytes of MAX_CHUNK / window: a chunk capped by MAX_CHUNK falls just
    # short of, on, or just past the window's end (the first example is the devnet hang).
    block = max(c.TAG_SIZE + 1, MAX // window + off)
    params = c.Params(k=k, n=k, segment_size=block * k - c.TAG_SIZE, leaves_per_page=leaves_per_page)
    segments = min(segments, 2 * window + 4)  # past two windows (where it stalled), no more
    size = max(0, (segments - 1) * params.segment_size + tail % (params.segment_size + 1))
    assert params.block_size(max(size, params.segment_size), 0) == block
    with tempfile.TemporaryDirectory() as tmp:
        await round_trip(Path(tmp), params, window, pipeline, size)


@pytest.mark.parametrize(("window", "pipeline", "aligned"),
                         [(16, 2, True), (16, 1, True), (16, 4, True), (4, 1, False)])
async def test_get_requests_end_on_store_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                window: int, pipeline: int, aligned: bool) -> None:
    """With a block to spare in the window, a get's requests end on the store's BLOCK_SIZE
    boundaries (or at the shard's end), so the store reads and hashes each of its blocks once;
    without one (a chunk of the whole window) they stay whole client blocks."""
    params = DEVNET_LIKE  # 65537-byte blocks: whole blocks never end on a store block
    size = 40 * params.segment_size + 123
    gets: list[tuple[bytes, int, int]] = []
    real_send = ShardConnection.send_request

    async def send_request(self: ShardConnection, req: w.Request) -> None:
        if isinstance(req, w.Get):
            gets.append((req.shard_id, req.offset, req.length))
        await real_send(self, req)

    data = write_file(tmp_path / "in.bin", size)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _grid, client = await make_env(tmp_path, nursery, count=params.n,
                                           settings=fetch_settings(params, window, pipeline))
            res = await client.put(tmp_path / "in.bin")
            monkeypatch.setattr(ShardConnection, "send_request", send_request)
            assert await client.get(res.cap, tmp_path / "out.bin") == size
            nursery.cancel_scope.cancel()
    assert (tmp_path / "out.bin").read_bytes() == data
    # The shard read (k=1): the id asked for many times (the manifest and each hash page are
    # one small get each).
    counts: dict[bytes, int] = {}
    for sid, _, _ in gets:
        counts[sid] = counts.get(sid, 0) + 1
    shard = max(counts, key=lambda sid: counts[sid])
    asked = [(offset, length) for sid, offset, length in gets if sid == shard]
    shard_end = params.block_offset(size, params.segment_count(size) - 1) + params.block_size(
        size, params.segment_count(size) - 1)
    ends = [offset + length for offset, length in asked]
    assert ends[-1] == shard_end
    assert len(ends) > 3
    on_blocks = [e % w.BLOCK_SIZE == 0 for e in ends[:-1]]
    assert all(on_blocks) if aligned else not any(on_blocks)
    # Store blocks read: each once when aligned (touched ranges do not overlap).
    touched = sum((o + n - 1) // w.BLOCK_SIZE - o // w.BLOCK_SIZE + 1 for o, n in asked)
    blocks = -(-shard_end // w.BLOCK_SIZE)
    assert (touched == blocks) if aligned else (touched > blocks)
