"""The storage client (trio): put, get, check, repair, rm, ls.

Flow of ``put``: place the object on ``n`` distinct nodes spread over farms and countries
(reusing the owner's namespaces, creating or growing them as needed, and waiting until each
node reports its namespace's endpoint); stream the file segment by segment: read and encode
in worker threads (two segments at a time, one per core), fan the blocks out to ``n`` shard
uploads that run in parallel, each on its own connection, with bounded queues; upload the
hash pages on a second connection per node; then seal the manifest and store one manifest
shard per node. The capability is returned only once every shard and manifest shard is
stored (a shard whose node failed mid-way is regenerated on a spare node first).

``get`` finds the manifest through the ledger (the owner's namespaces, see
:mod:`threebot.storage.grid`), then reads ``k`` shards in parallel through a window of
segments, starting a spare shard only when one of them fails (dead, corrupt) or a segment waits
too long for its blocks: each segment is decoded as soon as any ``k`` verified blocks are in, so
slow, dead or corrupt nodes are skipped; it writes a temporary file beside the output and
renames it only when the whole object authenticated. Each shard connection keeps ``pipeline``
requests in flight (ranged gets, and appends on put), which the store answers in order.

Memory is bounded by the window (``window`` segments of blocks), a few segments in the worker
threads and ``pipeline`` frames per connection, whatever the object's size.

Where the manifest lives (why a capability survives repair): manifest shard ``i`` is stored
in the namespace that holds shard ``i``, under ``manifest_id(storage index, namespace id)``.
A reader knows the owner twin from the capability, lists that twin's live namespace contracts
on the ledger (proven reads) and asks each for that one id; repair writes the next revision
on the new placement, so nothing in the capability names a node. Stale revisions left on
nodes that were down lose to the newest revision that ``k`` nodes hold.

Who may do what: ``get`` needs the read capability; ``check`` and ``repair`` work with a verify
capability too (repair moves ciphertext only), but writing shards and manifests needs the
namespace owner's key, so ``repair`` and ``rm`` must run as the object's owner.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter, deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from ledger import keys
from ledger.errors import TfgridError
from threebot.storage import codec as c
from threebot.storage.errors import (
    BadCapability,
    BadParameters,
    CorruptRecord,
    NamespaceError,
    NotEnoughShards,
    PlacementError,
    ShardStoreError,
    StorageError,
)
from threebot.storage.grid import Grid, NamespaceView, NodeView
from threebot.storage.index import IndexEntry, LocalIndex
from threebot.storage.outfile import OutputFile
from threebot.storage.shardclient import (
    Connector,
    NonceSource,
    ShardConnection,
    ShardUpload,
    open_tcp,
)
from zos_agent import shardwire as w

T = TypeVar("T")
R = TypeVar("R")
GIB = 1 << 30
MANIFEST_MAX = 4 << 20
PAGE_MAX = c.MAX_RECORD


@dataclass(frozen=True, slots=True)
class Settings:
    """Tunables of the client (defaults fit the design; tests shrink them)."""

    params: c.Params = field(default_factory=c.Params)
    window: int = 32  # segments in flight between the readers and the decoder
    pipeline: int = 2  # requests in flight per shard connection (the store answers in order)
    spare_after_s: float = 1.0  # a get starts a spare shard when a segment waits this long
    workers: int = 2  # threads coding segments (zfec and hashing release the GIL)
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    namespace_timeout_s: float = 120.0
    namespace_poll_s: float = 0.5
    min_quota: int = GIB  # a new namespace reserves at least this much
    straggler_s: float = 2.0  # how long slow nodes get once enough others answered

    def __post_init__(self) -> None:
        # A get reads only within the window: with no segment in it, no reader may ever ask.
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise BadParameters(f"window must be a whole number of segments >= 1, got {self.window!r}")


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PutResult:
    cap: str
    verify_cap: str
    size: int
    k: int
    n: int
    nodes: tuple[int, ...]

    def doc(self) -> dict[str, Any]:
        """The `storage put` document: {"cap","size","k","n","nodes"} (+ "verify_cap")."""
        return {"cap": self.cap, "size": self.size, "k": self.k, "n": self.n,
                "nodes": list(self.nodes), "verify_cap": self.verify_cap}


@dataclass(frozen=True, slots=True)
class ShardHealth:
    index: int
    node: int
    state: str  # ok | missing | corrupt | unreachable
    detail: str = ""

    def doc(self) -> dict[str, Any]:
        return {"index": self.index, "node": self.node, "state": self.state, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class CheckReport:
    cap: str
    revision: int
    size: int
    needed: int
    total: int
    shards: tuple[ShardHealth, ...]
    manifest_shards: int  # nodes holding the current manifest revision

    @property
    def healthy(self) -> int:
        return sum(1 for s in self.shards if s.state == "ok")

    def doc(self) -> dict[str, Any]:
        """The `storage check` document: {"cap","healthy","needed","total","shards":[...]}."""
        return {"cap": self.cap, "healthy": self.healthy, "needed": self.needed,
                "total": self.total, "shards": [s.doc() for s in self.shards],
                "revision": self.revision, "size": self.size,
                "manifest_shards": self.manifest_shards}


@dataclass(frozen=True, slots=True)
class RepairReport:
    cap: str
    before: CheckReport
    moved: tuple[tuple[int, int, int], ...]  # (shard index, from node, to node)
    rewritten: tuple[int, ...]  # shard indexes regenerated in place
    revision: int
    healthy: int

    def doc(self) -> dict[str, Any]:
        return {"cap": self.cap, "revision": self.revision, "healthy": self.healthy,
                "healthy_before": self.before.healthy, "total": self.before.total,
                "moved": [{"index": i, "from": a, "to": b} for i, a, b in self.moved],
                "rewritten": list(self.rewritten)}


@dataclass(frozen=True, slots=True)
class RmReport:
    cap: str
    deleted: int
    failed: dict[int, str]  # node -> why its records could not be deleted
    cancelled: tuple[int, ...]

    def doc(self) -> dict[str, Any]:
        return {"cap": self.cap, "deleted": self.deleted, "cancelled": list(self.cancelled),
                "failed": [{"node": n, "reason": r} for n, r in sorted(self.failed.items())]}


# -- helpers -------------------------------------------------------------------------------------


async def ordered_map(items: AsyncIterable[T], fn: Callable[[T], R], workers: int,
                      sink: Callable[[R], Awaitable[None]]) -> None:
    """``sink(fn(item))`` for every item, in order, with up to ``workers`` calls of ``fn``
    running at once in worker threads (so CPU work never runs on the event loop)."""
    send, recv = trio.open_memory_channel[tuple[trio.Event, list[R]]](workers)
    limiter = trio.CapacityLimiter(workers)

    async def run(item: T, done: trio.Event, out: list[R]) -> None:
        async with limiter:
            out.append(await trio.to_thread.run_sync(fn, item))
        done.set()

    async def feed(nursery: trio.Nursery) -> None:
        async with send:
            async for item in items:
                done, out = trio.Event(), list[R]()
                await send.send((done, out))
                nursery.start_soon(run, item, done, out)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, nursery)
        async with recv:
            async for done, out in recv:
                await done.wait()
                await sink(out[0])


class _Changed:
    """A broadcast 'something changed' signal for tasks that wait on shared state."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _leaf_error(exc: BaseException) -> BaseException | None:
    """The first of our own errors inside (nested) exception groups, else None."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _leaf_error(sub)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, TfgridError) else None


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    """Re-raise our error alone when nurseries wrapped it in exception groups, so callers
    (and the CLI's one-line messages) see the cause, not a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = _leaf_error(group)
        if leaf is None:
            raise
        raise leaf from None


# -- the segment fetcher ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _RequestSizes:
    """How much a get's reader asks a store for at a time.

    Requests cover whole blocks (a block longer than MAX_CHUNK: pieces that never cross its
    end). Then the reader the consumer waits on, nothing in flight, has asked for nothing past
    the start of the block it lacks, so the whole window is its room and its next request
    fits: every window, pipeline and block size makes progress. A chunk that ends inside a
    block stalls: 1 MiB segments at k=16 make 65537-byte blocks, and window 16 with pipeline 1
    asked for MAX_CHUNK (1 MiB), 16 bytes short of block 16, whose segment then waited for
    room that only its own completion could make.

    The store reads every BLOCK_SIZE (256 KiB) block a get touches from disk and checks it
    against its hash, so a range that ends inside one of those costs it that block twice (for
    this request and the next): 768 KiB read and hashed per 512 KiB asked for, with 65537-byte
    blocks. Requests are therefore whole store blocks (the last one up to the end), when the
    window has a client block to spare beyond such a chunk: a reader stopped inside a block
    then still has room for its next request.
    """

    chunk: int
    split: int = 0  # blocks longer than MAX_CHUNK: requests never cross one's end
    align: int = 0  # requests end on multiples of this (the store's block size)

    @classmethod
    def of(cls, block: int, window: int, depth: int) -> _RequestSizes:
        span = min(w.MAX_CHUNK, window * block // depth)
        if block > w.MAX_CHUNK:
            return cls(w.MAX_CHUNK, split=block)
        stored = min(span, (window - 1) * block) // w.BLOCK_SIZE * w.BLOCK_SIZE
        if stored:
            return cls(stored, align=w.BLOCK_SIZE)
        return cls(max(1, span // block) * block)

    def next(self, requested_to: int, end: int) -> int:
        """Bytes to ask for from ``requested_to`` (0: nothing left before ``end``)."""
        want = min(self.chunk, end - requested_to)
        if self.split:
            return min(want, self.split - requested_to % self.split)
        if self.align and requested_to + want < end:
            cut = (requested_to + want) // self.align * self.align
            if cut > requested_to:
                return cut - requested_to
        return want


class _Fetch:
    """Reads shards in parallel and hands out segments as soon as ``k`` verified blocks of each
    are in. Readers stay within ``window`` segments of the consumer; one that lags jumps ahead;
    one that fails (dead, slow, corrupt) is dropped and named in :attr:`failed`.

    Received bytes are checked against their leaves on the event loop itself, not in a worker
    thread: a 512 KiB answer hashes in ~0.1 ms (BLAKE3), less than a thread round trip costs
    the loop; measured on a 256 MiB get, 3 alternating runs each, 1.9-2.2 s -> 1.6-1.85 s and
    client CPU 1.07-1.14 s -> 0.81-1.0 s (and 35 MiB less peak RSS, from fewer threads).
    """

    def __init__(self, client: StorageClient, manifest: c.Manifest, keys_: c.ObjectKeys,
                 endpoints: dict[int, str], failed: dict[int, str], first: int = 0,
                 stop: int | None = None) -> None:
        self._client = client
        self._m = manifest
        self._p = manifest.params
        self._si = keys_.storage_index
        self._endpoints = endpoints
        self.failed = dict(failed)
        self._first = first
        self._stop = self._p.segment_count(manifest.size) if stop is None else stop
        self.position = first
        self._blocks: dict[int, dict[int, c.Block]] = {}
        # Two signals, so a block arriving does not wake every reader (16+ tasks) and the
        # consumer moving on does not wake the loop that collects blocks.
        self._arrived = _Changed()  # blocks came in, or a reader failed: run() looks
        self._advanced = _Changed()  # the consumer moved on: readers may ask for more
        self._alive = set(endpoints) - set(self.failed)

    def _fail(self, shard: int, why: str) -> None:
        self.failed[shard] = why
        self._alive.discard(shard)
        self._arrived.notify()
        self._advanced.notify()

    async def _reader(self, shard: int) -> None:
        entry = self._m.shards[shard]
        ns = entry.placement.ns
        sid = c.shard_id(self._si, shard)
        size = self._m.size
        settings = self._client.settings
        depth = max(1, settings.pipeline)
        sizes = _RequestSizes.of(self._p.block_size(size, 0), settings.window, depth)
        end = self._p.block_offset(size, self._stop - 1) + self._p.block_size(size, self._stop - 1)
        pages: dict[int, list[bytes]] = {}  # the last page's leaves, for a reader that jumps
        inflight: deque[tuple[int, int]] = deque()  # ranges asked for, not yet received
        try:
            async with await self._client.connect(self._endpoints[shard]) as conn:

                async def receive() -> c.Block:
                    offset, length = inflight.popleft()
                    resp = await conn.receive_response()
                    if not isinstance(resp, w.Data) or resp.offset != offset or len(resp.data) > length:
                        raise conn.unexpected("get")
                    if len(resp.data) != length:
                        raise CorruptRecord(f"shard {shard} is shorter than the manifest says")
                    return resp.data

                reader: c.BlockReader | None = None
                while self.position < self._stop:
                    if reader is None or reader.next_segment < self.position:
                        while inflight:  # answers for segments nobody needs any more
                            await receive()
                        reader = c.BlockReader(self._p, size, shard, self.position, self._stop)
                    if reader.done:
                        return
                    page = reader.page_needed()
                    if page is not None:
                        if inflight:  # answers come in order: take them (the reader buffers them)
                            data = await receive()
                            self._take(shard, reader.feed(data))
                            continue
                        if page not in pages:
                            raw = await conn.get_object(ns, c.page_id(self._si, shard, page), PAGE_MAX)
                            leaves = await trio.to_thread.run_sync(
                                c.open_page, raw, self._p, size, shard, page, entry.pages[page])
                            pages = {page: leaves}
                        reader.add_page(page, pages[page])
                        self._take(shard, reader.feed(b""))
                        continue
                    horizon = min(self._stop, self.position + settings.window)
                    room = self._p.block_offset(size, horizon) - reader.requested_to
                    want = sizes.next(reader.requested_to, end)
                    if len(inflight) < depth and want > 0 and room >= want:
                        rng = reader.next_range(want)
                        if rng is not None:
                            await conn.send_request(w.Get(ns, sid, rng[0], rng[1]))
                            inflight.append(rng)
                            continue
                    if inflight:
                        data = await receive()
                        self._take(shard, reader.feed(data))
                        continue
                    if want <= 0:
                        return
                    await self._advanced.wait()
        except (StorageError, TfgridError) as exc:
            self._fail(shard, _reason(exc))

    def _take(self, shard: int, got: list[tuple[int, c.Block]]) -> None:
        k = self._p.k
        for s, block in got:
            if s >= self.position:
                have = self._blocks.setdefault(s, {})
                if len(have) < k:
                    have[shard] = block
        if got:
            self._arrived.notify()

    async def run(self, send: trio.MemorySendChannel[tuple[int, dict[int, c.Block]]]) -> None:
        """Send (segment, ``k`` verified blocks) in order, then close ``send``.

        Reads ``k`` shards (the lowest-numbered: the systematic ones decode cheapest) and starts
        a spare reader only when one of them fails or the next segment waits longer than
        ``spare_after_s`` for its blocks.

        Raises :class:`NotEnoughShards` naming the failed nodes.
        """
        k = self._p.k
        spare_after = self._client.settings.spare_after_s
        spares = sorted(self._alive)
        started: set[int] = set()
        async with send, trio.open_nursery() as nursery:

            def start(count: int) -> None:
                while count > 0 and spares:
                    shard = spares.pop(0)
                    if shard in self._alive:
                        started.add(shard)
                        nursery.start_soon(self._reader, shard)
                        count -= 1

            start(k)
            while self.position < self._stop:
                s = self.position
                have = self._blocks.get(s, {})
                if len(have) >= k:
                    self._blocks.pop(s, None)
                    self.position += 1
                    self._advanced.notify()
                    await send.send((s, have))
                    continue
                reachable = len(self._alive | set(have))
                if reachable < k:
                    raise self.not_enough(reachable)
                start(k - len(started & self._alive))  # replace readers that failed
                with trio.move_on_after(spare_after) as waited:
                    await self._arrived.wait()
                missing = k - len(self._blocks.get(s, {}))
                if waited.cancelled_caught and self.position == s and missing > 0:
                    start(missing)  # readers are slow (or hang): as many more shards as are missing
            nursery.cancel_scope.cancel()

    async def each(self, fn: Callable[[tuple[int, dict[int, c.Block]]], R], workers: int,
                   sink: Callable[[R], Awaitable[None]]) -> None:
        """``sink(fn(segment))`` for every segment in order (``fn`` in worker threads)."""
        send, recv = trio.open_memory_channel[tuple[int, dict[int, c.Block]]](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run, send)
            await ordered_map(recv, fn, workers, sink)

    def not_enough(self, reachable: int) -> NotEnoughShards:
        failed = {f"{self._m.shards[i].placement.node}": why for i, why in self.failed.items()}
        return NotEnoughShards("shards", self._p.k, reachable, failed)


# -- the client ---------------------------------------------------------------------------------


class StorageClient:
    """The grid object store for the holder of ``key`` (the owner of new objects).

    ``random_bytes(n)`` and ``clock_us()`` are the randomness and the wall clock (microseconds,
    for write nonces); ``connect`` opens a stream to a shard store (TCP by default).
    """

    def __init__(self, grid: Grid, key: keys.KeyPair, index: LocalIndex, *,
                 random_bytes: Callable[[int], bytes], clock_us: Callable[[], int],
                 settings: Settings | None = None, connect: Connector = open_tcp) -> None:
        self.grid = grid
        self.key = key
        self.index = index
        self.settings = settings or Settings()
        self._random = random_bytes
        self._clock_us = clock_us
        self._nonces = NonceSource(clock_us)
        self._connector = connect

    async def connect(self, endpoint: str) -> ShardConnection:
        """A connection to the shard store at ``endpoint``. Raises :class:`ShardStoreError`."""
        return await ShardConnection.open(endpoint, self._connector, self.settings.connect_timeout_s,
                                          self.settings.request_timeout_s)

    def _entry(self, cap: c.Capability) -> IndexEntry | None:
        """The local index entry of the object of ``cap`` (read or verify capability)."""
        want = cap.verify_cap()
        for e in self.index.entries():
            with contextlib.suppress(BadCapability):
                if c.parse_cap(e.cap).verify_cap() == want:
                    return e
        return None

    # -- ls --------------------------------------------------------------------------------------

    def ls(self) -> list[IndexEntry]:
        """The objects this home stored (and has not removed), oldest first."""
        return sorted(self.index.entries(), key=lambda e: e.created_ms)

    # -- placement -------------------------------------------------------------------------------

    def _per_node(self, size: int, params: c.Params) -> int:
        """Quota bytes one node needs for one object: its shard, hash pages, manifest shard."""
        pages = params.page_count(size) * (params.leaves_per_page * c.HASH_BYTES + 256)
        return params.shard_bytes(size) + pages + 64 * 1024

    async def _free_in(self, views: Iterable[NamespaceView]) -> dict[int, int]:
        """Free quota bytes of each reachable namespace (by contract id), asked of its store."""
        out: dict[int, int] = {}

        async def one(v: NamespaceView) -> None:
            with contextlib.suppress(ShardStoreError):
                async with await self.connect(v.endpoint) as conn:
                    st = await conn.stat(v.contract)
                    out[v.contract] = max(0, st.quota - st.used)

        async with trio.open_nursery() as nursery:
            for v in views:
                if v.endpoint:
                    nursery.start_soon(one, v)
        return out

    async def _place(self, owner: int, count: int, need: int, exclude: set[int]) -> list[NamespaceView]:
        """``count`` namespaces with ``need`` bytes free on distinct up nodes not in
        ``exclude``, spread over farms and countries; created or grown as needed.

        Raises :class:`PlacementError` when the grid has too few usable nodes, and
        :class:`NamespaceError` when namespaces cannot be brought up.
        """
        nodes = {n.id: n for n in await self.grid.nodes() if n.up and n.id not in exclude}
        mine: dict[int, NamespaceView] = {}
        for v in await self.grid.namespaces(owner, self.index.namespaces()):
            if v.node in nodes and (v.node not in mine or (v.endpoint and not mine[v.node].endpoint)):
                mine[v.node] = v
        free = await self._free_in(mine.values())
        quota_new = max(self.settings.min_quota, need)

        def usable(n: NodeView) -> bool:
            v = mine.get(n.id)
            if v is None:
                return n.free_storage >= quota_new
            # Our namespace there answers: use it, grown if short. It does not answer: the
            # node is not serving it (starting, broken); never open a second one beside it.
            return v.contract in free and (free[v.contract] >= need or n.free_storage >= need)

        candidates = [n for n in nodes.values() if usable(n)]
        chosen = _spread(candidates, count, reuse=set(mine))
        if len(chosen) < count:
            raise PlacementError(
                f"the grid has only {len(candidates)} usable nodes (up, {need} bytes free, distinct) "
                f"for {count} shards ({len(nodes)} nodes up)")
        ready: list[NamespaceView] = []
        failures: dict[int, str] = {}
        spare = [n for n in _spread(candidates, len(candidates), reuse=set(mine)) if n not in chosen]
        todo = list(chosen)
        while todo:
            results = await self._bring_up(todo, mine, free, need, quota_new)
            todo = []
            for node, got in results.items():
                if isinstance(got, NamespaceView):
                    ready.append(got)
                else:
                    failures[node] = got
                    if spare:
                        todo.append(spare.pop(0))
        if len(ready) < count:
            detail = ", ".join(f"{n}: {r}" for n, r in sorted(failures.items())[:6])
            raise NamespaceError(f"only {len(ready)} of {count} namespaces came up ({detail})")
        return ready

    async def _bring_up(self, todo: list[NodeView], mine: dict[int, NamespaceView],
                        free: dict[int, int], need: int, quota_new: int) -> dict[int, NamespaceView | str]:
        """Create/grow the namespaces of ``todo`` and wait for their endpoints."""
        out: dict[int, NamespaceView | str] = {}
        waiting: dict[int, int] = {}
        for n in todo:  # transactions one by one: each needs the account's next nonce
            v = mine.get(n.id)
            try:
                if v is not None and v.contract in free and free[v.contract] >= need and v.endpoint:
                    out[n.id] = v
                    continue
                if v is not None and v.contract in free:
                    grown = v.quota + max(need - free[v.contract], self.settings.min_quota)
                    await self.grid.resize_namespace(v.contract, grown)
                    waiting[n.id] = v.contract
                else:
                    waiting[n.id] = await self.grid.create_namespace(n.id, quota_new)
            except (StorageError, TfgridError) as exc:
                out[n.id] = _reason(exc)

        async def wait_one(node: int, contract: int) -> None:
            out[node] = await self._wait_endpoint(contract)

        async with trio.open_nursery() as nursery:
            for node, contract in waiting.items():
                nursery.start_soon(wait_one, node, contract)
        return out

    async def _wait_endpoint(self, contract: int) -> NamespaceView | str:
        with trio.move_on_after(self.settings.namespace_timeout_s):
            while True:
                try:
                    v = await self.grid.namespace(contract)
                except TfgridError:
                    v = None
                if v is not None and v.endpoint and v.state in ("created", "deployed"):
                    return v
                if v is not None and v.error:
                    return f"the node refused namespace {contract}: {v.error}"
                await trio.sleep(self.settings.namespace_poll_s)
        return f"namespace {contract} reported no endpoint within {self.settings.namespace_timeout_s:g}s"

    # -- put ---------------------------------------------------------------------------------------

    async def put(self, path: Path, *, name: str | None = None) -> PutResult:
        """Store the file at ``path``; return its capabilities and placement.

        Raises :class:`PlacementError`, :class:`NamespaceError`, :class:`NotEnoughShards`
        (too many nodes failed during the upload), :class:`StorageError` (file unreadable,
        shards that could not be placed).
        """
        with _plain_errors():
            return await self._put(Path(path), name)

    async def _put(self, path: Path, name: str | None) -> PutResult:
        params = self.settings.params
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            owner = await self.grid.own_twin()
            cap = c.new_read_cap(owner, self._random(c.KEY_SIZE))
            keys_ = cap.keys()
            placed = await self._place(owner, params.n, self._per_node(size, params), set())
            roots, failed = await self._upload(fd, size, keys_, placed)
        finally:
            os.close(fd)
        manifest = c.Manifest(
            1, size, params,
            tuple(c.ShardEntry(i, c.Placement(v.node, v.contract, v.endpoint), roots[i])
                  for i, v in enumerate(placed)))
        written = await self._write_manifest(manifest, keys_, skip=set(failed))
        for i, why in written.items():
            failed.setdefault(i, why)
        self.index.put(IndexEntry(str(cap), name or path.name, size, self._now_ms(),
                                  tuple(v.contract for v in placed)))
        if failed:
            # Some nodes failed mid-upload: regenerate their shards elsewhere before
            # handing out a capability, or take everything back.
            try:
                report = await self._repair(cap)
            except (StorageError, TfgridError) as exc:
                await self._forget_failed_put(cap)
                raise StorageError(f"{len(failed)} nodes failed during the upload and their shards "
                                   f"could not be placed elsewhere: {exc}") from None
            if report.healthy < params.n:
                await self._forget_failed_put(cap)
                raise StorageError(f"only {report.healthy} of {params.n} shards could be stored")
            manifest = (await self._load_manifest(cap)).manifest
        return PutResult(str(cap), str(cap.verify_cap()), size, params.k, params.n,
                         tuple(s.placement.node for s in manifest.shards))

    async def _forget_failed_put(self, cap: c.ReadCap) -> None:
        with contextlib.suppress(StorageError, TfgridError):
            await self._rm(cap)
        with contextlib.suppress(StorageError):
            self.index.remove(str(cap))

    def _now_ms(self) -> int:
        return self._clock_us() // 1000

    async def _upload(self, fd: int, size: int, keys_: c.ObjectKeys,
                      placed: Sequence[NamespaceView]) -> tuple[list[tuple[bytes, ...]], dict[int, str]]:
        """Stream the object's shards and hash pages to ``placed``; return the page roots and
        the shards whose upload failed (index -> reason)."""
        p = self.settings.params
        count = p.segment_count(size)
        cipher = c.SegmentCipher(keys_.require_data_key(), count)
        coder = c.ErasureCoder(p.k, p.n)
        hasher = c.ShardHasher(p, size)
        failed: dict[int, str] = {}
        # Blocks go to the shard tasks in batches of about one frame (16 blocks of 1 MiB
        # segments), one channel item per shard per frame rather than per block. A batch holds
        # views into its segments' ciphertext, so in flight per shard are: one batch queued,
        # one being written and ``pipeline`` frames on the wire.
        batch_bytes = w.MAX_CHUNK
        chans = [trio.open_memory_channel[list[c.Block]](1) for _ in range(p.n)]
        batches: list[list[c.Block]] = [[] for _ in range(p.n)]
        batched = 0
        pchans = [trio.open_memory_channel[c.PageRecord](2) for _ in range(p.n)]

        async def segments() -> AsyncIterator[int]:
            for s in range(count):
                yield s

        def encode(s: int) -> c.EncodedSegment:
            off, length = p.segment_span(size, s)
            try:
                plain = os.pread(fd, length, off) if length else b""
            except OSError as exc:
                raise StorageError(f"reading the file failed: {exc.strerror or exc}") from None
            if len(plain) != length:
                raise StorageError("the file changed size while it was being stored")
            return c.encode_segment(cipher, coder, s, plain)

        def give_up_if_lost() -> None:
            if len(failed) > p.n - p.k:
                raise NotEnoughShards("shards", p.k, p.n - len(failed),
                                      {str(placed[i].node): why for i, why in failed.items()})

        async def fan_out(seg: c.EncodedSegment) -> None:
            nonlocal batches, batched
            give_up_if_lost()
            pages = hasher.add(seg)  # 20 leaves: cheap; a page is packed once per 16 GiB
            for i in range(p.n):
                batches[i].append(seg.blocks[i])
            batched += len(seg.blocks[0])
            if batched >= batch_bytes or seg.index == count - 1:
                full, batches, batched = batches, [[] for _ in range(p.n)], 0
                for i in range(p.n):
                    await chans[i][0].send(full[i])
            for rec in pages:
                await pchans[rec.shard][0].send(rec)

        async def shard_task(i: int) -> None:
            v = placed[i]
            recv = chans[i][1]
            sid = c.shard_id(keys_.storage_index, i)
            async with recv:
                try:
                    async with await self.connect(v.endpoint) as conn:
                        up = ShardUpload(conn, self.key, self.grid.chain_id, v.contract, sid,
                                         p.shard_bytes(size), self._nonces.next(),
                                         self.settings.pipeline)
                        async for batch in recv:
                            for block in batch:
                                await up.write(block)
                        if not up.complete:
                            raise ShardStoreError("protocol", "the shard upload did not complete")
                except (StorageError, TfgridError) as exc:
                    failed.setdefault(i, _reason(exc))
                    async for _ in recv:  # keep draining: the producer must never wait on us
                        pass

        async def page_task(i: int) -> None:
            v = placed[i]
            recv = pchans[i][1]
            async with recv, contextlib.AsyncExitStack() as stack:
                conn: ShardConnection | None = None
                async for rec in recv:
                    if i in failed:
                        continue
                    try:
                        if conn is None:
                            conn = await stack.enter_async_context(await self.connect(v.endpoint))
                        await conn.put_object(self.key, self.grid.chain_id, v.contract,
                                              c.page_id(keys_.storage_index, i, rec.page), rec.data,
                                              self._nonces.next())
                    except (StorageError, TfgridError) as exc:
                        failed.setdefault(i, _reason(exc))

        async with trio.open_nursery() as nursery:
            for i in range(p.n):
                nursery.start_soon(shard_task, i)
                nursery.start_soon(page_task, i)
            try:
                await ordered_map(segments(), encode, self.settings.workers, fan_out)
            finally:
                for send, _ in chans:
                    await send.aclose()
                for psend, _ in pchans:
                    await psend.aclose()
        give_up_if_lost()
        return list(hasher.page_roots()), failed

    async def _write_manifest(self, manifest: c.Manifest, keys_: c.ObjectKeys,
                              skip: Iterable[int] = ()) -> dict[int, str]:
        """Store the manifest's shards (one per placement); return the failures."""
        records = c.seal_manifest(manifest, keys_, self._random(c.NONCE_SIZE))
        failed: dict[int, str] = {}
        skipped = set(skip)

        async def one(i: int) -> None:
            pl = manifest.placement(i)
            try:
                async with await self.connect(pl.endpoint) as conn:
                    await conn.put_object(self.key, self.grid.chain_id, pl.ns,
                                          c.manifest_id(keys_.storage_index, pl.ns), records[i],
                                          self._nonces.next())
            except (StorageError, TfgridError) as exc:
                failed[i] = _reason(exc)

        async with trio.open_nursery() as nursery:
            for i in range(manifest.params.n):
                if i not in skipped:
                    nursery.start_soon(one, i)
        return failed

    # -- manifest lookup -------------------------------------------------------------------------

    async def _load_manifest(self, cap: c.Capability) -> c.ManifestRead:
        """The newest manifest, found through the owner's namespaces on the ledger (those the
        local index remembers first, then all of the owner's).

        Raises :class:`NotEnoughShards` (manifest shards), :class:`AuthenticationFailed`, or
        :class:`StorageError` when no namespace holds any of it.
        """
        entry = self._entry(cap)
        if entry is not None:
            try:
                return await self._manifest_from(cap, await self.grid.namespaces(cap.owner, entry.namespaces))
            except NotEnoughShards:
                pass  # a repair elsewhere moved shards: ask every namespace of the owner
        return await self._manifest_from(cap, await self.grid.namespaces(cap.owner))

    async def _manifest_from(self, cap: c.Capability, views: Sequence[NamespaceView]) -> c.ManifestRead:
        """Ask each namespace for its manifest shard. Once ``k`` answered, stragglers get
        ``straggler_s`` more, so one slow node does not hold a read up for a full timeout."""
        keys_ = cap.keys()
        records: dict[str, bytes] = {}
        failed: dict[str, str] = {}
        changed = _Changed()
        pending = len(views)
        answered: set[str] = set()

        async def one(v: NamespaceView) -> None:
            nonlocal pending
            label = str(v.node)
            try:
                if not v.endpoint:
                    failed[label] = v.error or "namespace has no endpoint"
                    return
                async with await self.connect(v.endpoint) as conn:
                    records[label] = await conn.get_object(
                        v.contract, c.manifest_id(keys_.storage_index, v.contract), MANIFEST_MAX)
            except ShardStoreError as exc:
                if exc.code != w.ErrorCode.NOT_FOUND.value:
                    failed[label] = _reason(exc)
            finally:
                pending -= 1
                answered.add(label)
                changed.notify()

        async def cut_stragglers(cancel: trio.CancelScope) -> None:
            while pending and len(records) < c.DEFAULT_K:
                await changed.wait()
            with trio.move_on_after(self.settings.straggler_s):
                while pending:
                    await changed.wait()
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            for v in views:
                nursery.start_soon(one, v)
            nursery.start_soon(cut_stragglers, nursery.cancel_scope)
        slow = {str(v.node) for v in views} - answered
        failed.update({label: "too slow" for label in slow})
        try:
            return c.open_manifest(records, keys_)
        except NotEnoughShards as exc:
            if not records and not failed:
                raise StorageError(f"no manifest for this capability on any namespace of twin "
                                   f"{cap.owner} (removed, or never stored)") from None
            # The manifest's shards sit on the object's nodes: to the reader this is the
            # same loss as of the data shards, so it is worded the same way.
            raise NotEnoughShards("shards", exc.needed, exc.reachable,
                                  {**failed, **exc.failed}) from None

    async def _endpoints(self, manifest: c.Manifest) -> tuple[dict[int, str], dict[int, str]]:
        """Current endpoint of each shard's namespace (from the ledger; the manifest's copy if
        the ledger cannot be asked); and the shards whose namespace is gone or has none."""
        endpoints: dict[int, str] = {}
        gone: dict[int, str] = {}

        async def one(i: int) -> None:
            pl = manifest.placement(i)
            try:
                v = await self.grid.namespace(pl.ns)
            except TfgridError:
                endpoints[i] = pl.endpoint
                return
            if v is None:
                gone[i] = f"namespace {pl.ns} on node {pl.node} no longer exists"
            elif v.endpoint:
                endpoints[i] = v.endpoint
            else:
                gone[i] = v.error or f"namespace {pl.ns} on node {pl.node} has no endpoint"

        async with trio.open_nursery() as nursery:
            for i in range(manifest.params.n):
                nursery.start_soon(one, i)
        return endpoints, gone

    # -- get -------------------------------------------------------------------------------------

    async def get(self, cap_text: str, out: Path) -> int:
        """Read the object of read capability ``cap_text`` into ``out``; return its size.

        The file appears at ``out`` only complete and authenticated (temp file + rename).
        Raises :class:`BadCapability`, :class:`NotEnoughShards`,
        :class:`AuthenticationFailed`, :class:`StorageError` (output not writable).
        """
        with _plain_errors():
            return await self._get(c.parse_read_cap(cap_text), Path(out))

    async def _get(self, cap: c.ReadCap, out: Path) -> int:
        keys_ = cap.keys()
        m = (await self._load_manifest(cap)).manifest
        p = m.params
        endpoints, gone = await self._endpoints(m)
        cipher = c.SegmentCipher(keys_.require_data_key(), p.segment_count(m.size))
        coder = c.ErasureCoder(p.k, p.n)
        fetch = _Fetch(self, m, keys_, endpoints, gone)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {out}: {exc.strerror or exc}") from None
        done = False
        output: OutputFile | None = None
        try:
            output = sink = OutputFile(fd, tmp, p.segment_size, m.size)

            def decode_and_write(item: tuple[int, dict[int, c.Block]]) -> None:
                # Decrypted into the buffer it is written from, where it belongs, by the thread
                # that decoded it: no allocation or copy of the plaintext, no hop to a writer,
                # and as many writes in flight as decoding threads (see OutputFile).
                s, blocks = item
                offset, length = p.segment_span(m.size, s)

                def fill(dest: memoryview) -> None:
                    c.decode_segment_into(cipher, coder, p, m.size, s, blocks, dest)

                try:
                    sink.fill_at(offset, length, fill)
                except OSError as exc:
                    raise StorageError(f"cannot write {out}: {exc.strerror or exc}") from None

            async def written(_: None) -> None:
                pass

            await fetch.each(decode_and_write, self.settings.workers, written)
            await trio.to_thread.run_sync(sink.finish)
            os.close(fd)
            fd = -1
            os.replace(tmp, out)
            done = True
        except OSError as exc:
            raise StorageError(f"cannot write {out}: {exc.strerror or exc}") from None
        finally:
            if output is not None:
                output.close()
            if fd >= 0:
                os.close(fd)
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return m.size

    # -- check -----------------------------------------------------------------------------------

    async def check(self, cap_text: str, *, deep: bool = False) -> CheckReport:
        """Per-shard health. A shard is ``ok`` when its store has it whole (the store
        re-hashes it), its size is right and its hash pages match the manifest's roots;
        ``deep`` also reads every block and checks it against its leaf (pinpointing bad
        blocks). Works with a verify capability. Raises like ``get`` when the manifest
        cannot be had."""
        with _plain_errors():
            cap = c.parse_cap(cap_text)
            return await self._check(cap, await self._load_manifest(cap), deep)

    async def _check(self, cap: c.Capability, read: c.ManifestRead, deep: bool) -> CheckReport:
        keys_ = cap.keys()
        m = read.manifest
        p = m.params
        endpoints, gone = await self._endpoints(m)
        health: dict[int, ShardHealth] = {}
        for i, why in gone.items():
            health[i] = ShardHealth(i, m.placement(i).node, "unreachable", why)

        async def one(i: int) -> None:
            pl = m.placement(i)
            try:
                async with await self.connect(endpoints[i]) as conn:
                    await self._check_shard(conn, m, keys_, i, deep)
            except ShardStoreError as exc:
                state = _STORE_STATES.get(exc.code, "corrupt")
                health[i] = ShardHealth(i, pl.node, state, _reason(exc))
            except CorruptRecord as exc:
                health[i] = ShardHealth(i, pl.node, "corrupt", _reason(exc))
            except (StorageError, TfgridError) as exc:
                health[i] = ShardHealth(i, pl.node, "unreachable", _reason(exc))
            else:
                health[i] = ShardHealth(i, pl.node, "ok")

        async with trio.open_nursery() as nursery:
            for i in endpoints:
                nursery.start_soon(one, i)
        return CheckReport(str(cap), m.revision, m.size, p.k, p.n,
                           tuple(health[i] for i in range(p.n)), len(read.used))

    async def _check_shard(self, conn: ShardConnection, m: c.Manifest, keys_: c.ObjectKeys,
                           i: int, deep: bool) -> None:
        p, size, si = m.params, m.size, keys_.storage_index
        ns = m.placement(i).ns
        verified = await conn.verify(ns, c.shard_id(si, i))
        if verified.size != p.shard_bytes(size):
            raise CorruptRecord(f"shard {i} holds {verified.size} bytes, {p.shard_bytes(size)} expected")
        for page in range(p.page_count(size)):
            raw = await conn.get_object(ns, c.page_id(si, i, page), PAGE_MAX)
            leaves = await trio.to_thread.run_sync(c.open_page, raw, p, size, i, page,
                                                   m.shards[i].pages[page])
            if not deep:
                continue
            segs = p.page_segments(size, page)
            reader = c.BlockReader(p, size, i, segs.start, segs.stop)
            reader.add_page(page, leaves)
            while (rng := reader.next_range(w.MAX_CHUNK)) is not None:
                data = await conn.get_range(ns, c.shard_id(si, i), *rng)
                await trio.to_thread.run_sync(reader.feed, data)

    # -- repair ---------------------------------------------------------------------------------

    async def repair(self, cap_text: str, *, deep: bool = False) -> RepairReport:
        """Regenerate missing or corrupt shards (in place when their node answers, else on
        replacement nodes), then store the next manifest revision on every node. The
        capability stays valid. Works with a verify capability, but only for the object's
        owner (shard writes are signed by the namespace owner).

        Raises :class:`NotEnoughShards` when fewer than ``k`` shards are good,
        :class:`BadCapability` when this client's key does not own the object,
        :class:`PlacementError` when no replacement nodes are left.
        """
        with _plain_errors():
            return await self._repair(c.parse_cap(cap_text), deep=deep)

    async def _repair(self, cap: c.Capability, *, deep: bool = False) -> RepairReport:
        keys_ = cap.keys()
        if cap.owner != await self.grid.own_twin():
            raise BadCapability(f"only the owner (twin {cap.owner}) can repair this object: "
                                "shard writes are signed by the namespace owner")
        read = await self._load_manifest(cap)
        before = await self._check(cap, read, deep)
        m = read.manifest
        p = m.params
        bad = [h for h in before.shards if h.state != "ok"]
        good = [h.index for h in before.shards if h.state == "ok"]
        if not bad and len(read.used) == p.n:
            return RepairReport(str(cap), before, (), (), m.revision, p.n)
        if len(good) < p.k:
            failed = {str(h.node): f"{h.state}: {h.detail}" for h in bad}
            raise NotEnoughShards("shards", p.k, len(good), failed)
        in_place = [h.index for h in bad if h.state in ("missing", "corrupt")]
        moving = [h.index for h in bad if h.state == "unreachable"]
        changes: dict[int, c.Placement] = {}
        if moving:
            # Never a node that holds (or held) a shard of this object: its old records
            # could be confused with new ones.
            used = {s.placement.node for s in m.shards} | {pl.node for _, pl in m.retired}
            placed = await self._place(cap.owner, len(moving), self._per_node(m.size, p), used)
            for i, v in zip(moving, placed, strict=True):
                changes[i] = c.Placement(v.node, v.contract, v.endpoint)
        targets = {i: m.placement(i) for i in in_place} | changes
        if targets:
            endpoints, _gone = await self._endpoints(m)
            await self._regenerate(m, keys_, {i: endpoints[i] for i in good}, targets)
        new = m.with_placement(changes, [(i, m.placement(i)) for i in moving])
        written = await self._write_manifest(new, keys_)
        if len(written) > p.n - p.k:
            raise NotEnoughShards("manifest shards", p.k, p.n - len(written),
                                  {str(new.placement(i).node): why for i, why in written.items()})
        # Best effort: clean the retired placements that answer now; keep the others listed
        # so that a later repair or rm still cleans them.
        cleaned = await self._delete_records(new, keys_, list(new.retired))
        if cleaned:
            new = new.without_retired(cleaned).with_placement({})
            await self._write_manifest(new, keys_)
        entry = self._entry(cap)
        if entry is not None:
            self.index.put(IndexEntry(entry.cap, entry.name, entry.size, entry.created_ms,
                                      tuple(s.placement.ns for s in new.shards)))
        return RepairReport(str(cap), before,
                            tuple((i, m.placement(i).node, changes[i].node) for i in moving),
                            tuple(in_place), new.revision, p.n)

    async def _regenerate(self, m: c.Manifest, keys_: c.ObjectKeys, sources: dict[int, str],
                          targets: dict[int, c.Placement]) -> None:
        """Rebuild shards ``targets`` from the good shards at ``sources`` (ciphertext only:
        no data key needed) and stream them, with their hash pages, to the targets."""
        p, size, si = m.params, m.size, keys_.storage_index
        coder = c.ErasureCoder(p.k, p.n)
        wanted = sorted(targets)
        fetch = _Fetch(self, m, keys_, sources, {})
        leaves: dict[int, list[bytes]] = {i: [] for i in wanted}
        async with contextlib.AsyncExitStack() as stack:
            uploads: dict[int, ShardUpload] = {}
            pconns: dict[int, ShardConnection] = {}
            for i in wanted:
                pl = targets[i]
                endpoint = pl.endpoint
                v = await self.grid.namespace(pl.ns)
                if v is not None and v.endpoint:
                    endpoint = v.endpoint
                conn = await stack.enter_async_context(await self.connect(endpoint))
                uploads[i] = ShardUpload(conn, self.key, self.grid.chain_id, pl.ns, c.shard_id(si, i),
                                         p.shard_bytes(size), self._nonces.next(),
                                         self.settings.pipeline)
                pconns[i] = await stack.enter_async_context(await self.connect(endpoint))

            def rebuild(item: tuple[int, dict[int, c.Block]]) -> tuple[int, list[c.Block], list[bytes]]:
                s, blocks = item
                ciphertext = coder.decode(blocks, p.cipher_len(size, s))
                new = coder.encode_some(ciphertext, wanted)
                return s, new, [c.leaf_hash(b) for b in new]

            async def send(result: tuple[int, list[c.Block], list[bytes]]) -> None:
                s, blocks, hashes = result
                for i, block, leaf in zip(wanted, blocks, hashes, strict=True):
                    await uploads[i].write(block)
                    leaves[i].append(leaf)
                if s + 1 == p.segment_count(size) or (s + 1) % p.leaves_per_page == 0:
                    page = s // p.leaves_per_page
                    for i in wanted:
                        if c.merkle_root(leaves[i]) != m.shards[i].pages[page]:
                            raise CorruptRecord(f"regenerated shard {i} does not match its Merkle root")
                        pl = targets[i]
                        await pconns[i].put_object(self.key, self.grid.chain_id, pl.ns,
                                                   c.page_id(si, i, page), c.pack_page(i, page, leaves[i]),
                                                   self._nonces.next())
                        leaves[i] = []

            await fetch.each(rebuild, self.settings.workers, send)
            for i in wanted:
                if not uploads[i].complete:
                    raise ShardStoreError("protocol", f"regenerated shard {i} did not complete")

    async def _delete_records(self, m: c.Manifest, keys_: c.ObjectKeys,
                              where: Sequence[tuple[int, c.Placement]]) -> list[tuple[int, c.Placement]]:
        """Delete shard ``i``'s data and pages and the manifest shard at each placement
        (leaving a manifest shard that a current placement shares); return the placements
        fully cleaned."""
        si, p = keys_.storage_index, m.params
        current = {s.placement.ns for s in m.shards}
        done: list[tuple[int, c.Placement]] = []

        async def one(i: int, pl: c.Placement) -> None:
            with contextlib.suppress(StorageError, TfgridError):
                v = await self.grid.namespace(pl.ns)
                if v is None:  # the namespace is gone, and its data with it
                    done.append((i, pl))
                    return
                async with await self.connect(v.endpoint or pl.endpoint) as conn:
                    ids = [c.shard_id(si, i)]
                    ids += [c.page_id(si, i, page) for page in range(p.page_count(m.size))]
                    if (i, pl) in m.shards_as_placed() or pl.ns not in current:
                        ids.append(c.manifest_id(si, pl.ns))
                    for rid in ids:
                        await conn.delete(self.key, self.grid.chain_id, pl.ns, rid, self._nonces.next())
                done.append((i, pl))

        async with trio.open_nursery() as nursery:
            for i, pl in where:
                nursery.start_soon(one, i, pl)
        return done

    # -- rm -------------------------------------------------------------------------------------

    async def rm(self, cap_text: str) -> RmReport:
        """Delete every shard, hash page and manifest shard of the object on every node it was
        ever placed on, forget it locally, and cancel the namespaces nothing uses any more.

        Nodes that cannot be reached are listed in the report and the local entry stays, so
        ``rm`` can be run again; what they hold is ciphertext under a key nobody else has.
        Raises :class:`BadCapability` when this client's key does not own the object.
        """
        with _plain_errors():
            return await self._rm(c.parse_cap(cap_text))

    async def _rm(self, cap: c.Capability) -> RmReport:
        keys_ = cap.keys()
        if cap.owner != await self.grid.own_twin():
            raise BadCapability(f"only the owner (twin {cap.owner}) can remove this object")
        m = (await self._load_manifest(cap)).manifest
        where = [(s.index, s.placement) for s in m.shards] + list(m.retired)
        done = await self._delete_records(m, keys_, where)
        failed = {pl.node: "unreachable" for item in where if item not in done for pl in (item[1],)}
        cancelled: list[int] = []
        if not failed:
            entry = self._entry(cap)
            if entry is not None:
                self.index.remove(entry.cap)
            cancelled = await self._cancel_unused({pl.ns for _, pl in where})
        return RmReport(str(cap), len(done), failed, tuple(cancelled))

    async def _cancel_unused(self, candidates: set[int]) -> list[int]:
        """Cancel the namespaces among ``candidates`` that no object of the local index uses
        and whose store holds nothing any more."""
        still = self.index.namespaces()
        out: list[int] = []
        for ns in sorted(candidates - still):
            try:
                v = await self.grid.namespace(ns)
                if v is None:
                    continue
                if v.endpoint:
                    async with await self.connect(v.endpoint) as conn:
                        if (await conn.stat(ns)).count:
                            continue
                await self.grid.cancel_namespace(ns)
                out.append(ns)
            except (StorageError, TfgridError):
                continue
        return out


_STORE_STATES = {"not_found": "missing", "unknown_namespace": "missing", "corrupt": "corrupt",
                 "timeout": "unreachable", "unreachable": "unreachable"}


def _spread(nodes: Sequence[NodeView], count: int, reuse: set[int]) -> list[NodeView]:
    """Up to ``count`` distinct nodes spread over as many countries and farms as there are:
    each pick takes a node whose country, then farm, was picked least so far; ties go to nodes
    where the owner already has a namespace (no new contract to pay for), then to the most free
    storage, then to the lowest id (deterministic)."""
    countries: Counter[str] = Counter()
    farms: Counter[int] = Counter()
    pool = list(nodes)
    chosen: list[NodeView] = []
    while pool and len(chosen) < count:
        best = min(pool, key=lambda n: (countries[n.country], farms[n.farm], n.id not in reuse,
                                        -n.free_storage, n.id))
        pool.remove(best)
        chosen.append(best)
        countries[best.country] += 1
        farms[best.farm] += 1
    return chosen
