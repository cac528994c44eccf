"""What the storage client needs from the ledger, behind one small interface.

:class:`Grid` is the interface (tests drive the client with an in-memory grid);
:class:`LedgerGrid` implements it with :class:`ledger.client.LedgerClient`: every read is
verified against a committed state root, every write is a signed transaction.

Finding an owner's namespaces: the ledger indexes contracts by node, not by owner, so
:meth:`LedgerGrid.namespaces` reads every node's live-contract list and then those contracts
(``nodes + live contracts`` proven reads, a few in parallel). A reader holding only a
capability needs exactly this to find the manifest; the owner's own client passes the
contract ids it remembers as ``hints`` and skips the scan when they are enough.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ledger import keys, keyspace
from ledger.client import LedgerClient
from ledger.errors import InvalidTx, TfgridError
from ledger.state import Params as LedgerParams
from ledger.state import decode_entry, node_status, sign_deployment
from ledger.tx import Tx
from ledger.types import Genesis
from threebot.storage.errors import NamespaceError, PlacementError

NAMESPACE_WORKLOAD = "shards"
_PARALLEL_READS = 8
_FIND_ATTEMPTS = 40


@dataclass(frozen=True, slots=True)
class NodeView:
    id: int
    farm: int
    country: str
    free_storage: int
    up: bool


@dataclass(frozen=True, slots=True)
class NamespaceView:
    """A live namespace contract: ``endpoint`` is set once its node reported it ``ok``;
    ``error`` holds the node's reason when it reported an error."""

    contract: int
    node: int
    owner: int
    quota: int
    state: str
    endpoint: str = ""
    error: str = ""


class Grid(Protocol):
    """The ledger as the storage client sees it. Errors are :class:`StorageError` subclasses
    or the ledger's own (:class:`~ledger.errors.LedgerUnavailable`, ...)."""

    @property
    def chain_id(self) -> str: ...

    async def own_twin(self) -> int:
        """The twin id of the client's key. Raises :class:`NamespaceError` if it has none."""
        ...

    async def nodes(self) -> list[NodeView]: ...

    async def namespaces(self, owner: int, hints: Iterable[int] = ()) -> list[NamespaceView]:
        """Live namespace contracts of twin ``owner``."""
        ...

    async def namespace(self, contract: int) -> NamespaceView | None:
        """One namespace contract, None when absent or no longer live."""
        ...

    async def create_namespace(self, node: int, quota: int) -> int:
        """A new namespace contract on ``node`` (returns its id). Raises :class:`NamespaceError`."""
        ...

    async def resize_namespace(self, contract: int, quota: int) -> None: ...

    async def cancel_namespace(self, contract: int) -> None: ...


def namespace_deployment(quota: int, tag: bytes) -> dict[str, Any]:
    """The deployment of a namespace contract; ``tag`` (random) makes its hash unique."""
    return {"name": "storage", "tag": tag,
            "workloads": [{"name": NAMESPACE_WORKLOAD, "kind": "namespace", "cpu": 0,
                           "memory": 0, "disk": quota}]}


def namespace_view(entry: dict[str, Any]) -> NamespaceView | None:
    """The view of a contract entry, None unless it is a live namespace contract."""
    if entry.get("kind") != "namespace" or entry.get("state") == "cancelled":
        return None
    endpoint = error = ""
    for r in entry.get("results", []):
        if r.get("name") == NAMESPACE_WORKLOAD:
            if r.get("state") == "ok":
                endpoint = str(r.get("endpoint", ""))
            elif r.get("state") == "error":
                error = str(r.get("message", ""))
    quota = int(entry.get("resources", {}).get("disk", 0))
    return NamespaceView(int(entry["id"]), int(entry["node"]), int(entry["owner"]), quota,
                         str(entry.get("state", "")), endpoint, error)


class LedgerGrid:
    """:class:`Grid` over a verifying ledger client, acting as ``key``'s twin."""

    def __init__(self, client: LedgerClient, genesis: Genesis, key: keys.KeyPair,
                 random_bytes: Any, *, tx_timeout_s: float = 30.0) -> None:
        self._client = client
        self._genesis = genesis
        self._key = key
        self._random = random_bytes
        self._tx_timeout_s = tx_timeout_s
        self._params = LedgerParams.from_genesis(genesis)
        self._tx_lock = trio.Lock()  # one tx at a time: each needs the next account nonce

    @property
    def chain_id(self) -> str:
        return self._genesis.chain_id

    async def _entry(self, key: bytes) -> dict[str, Any] | None:
        value, _height = await self._client.query(key)
        return None if value is None else decode_entry(key, value)

    async def _entries(self, keys_: Sequence[bytes]) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = [None] * len(keys_)
        limit = trio.CapacityLimiter(_PARALLEL_READS)

        async def one(i: int) -> None:
            async with limit:
                out[i] = await self._entry(keys_[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(keys_)):
                nursery.start_soon(one, i)
        return out

    async def own_twin(self) -> int:
        entry = await self._entry(keyspace.twin_by_key(self._key.public_key))
        if entry is None:
            raise NamespaceError("this identity has no twin: run `tfgrid twin register NAME` first")
        return int(entry["twin"])

    async def _counter(self, name: str) -> int:
        counters = await self._entry(keyspace.counters())
        return int((counters or {}).get(name, 1))

    async def nodes(self) -> list[NodeView]:
        header, _commit = await self._client.latest()
        next_id = await self._counter("next_node_id")
        out = []
        for e in await self._entries([keyspace.node(i) for i in range(1, next_id)]):
            if e is None:
                continue
            cap, used = e.get("capacity", {}), e.get("used", {})
            free = max(0, int(cap.get("storage", 0)) - int(used.get("storage", 0)))
            up = node_status(e, header.time_ms, self._params.uptime_down_after_ms) == "up"
            out.append(NodeView(int(e["id"]), int(e["farm"]),
                                str(e.get("location", {}).get("country", "")), free, up))
        return out

    async def namespace(self, contract: int) -> NamespaceView | None:
        entry = await self._entry(keyspace.contract(contract))
        return None if entry is None else namespace_view(entry)

    async def namespaces(self, owner: int, hints: Iterable[int] = ()) -> list[NamespaceView]:
        hinted = [v for v in await self._entries([keyspace.contract(c) for c in hints])
                  if v is not None]
        if not hinted:
            next_node = await self._counter("next_node_id")
            lists = await self._entries([keyspace.node_contracts(i) for i in range(1, next_node)])
            ids = sorted({int(c) for lst in lists if lst for c in lst.get("contracts", [])})
            hinted = [v for v in await self._entries([keyspace.contract(c) for c in ids])
                      if v is not None]
        views = [namespace_view(e) for e in hinted if int(e.get("owner", -1)) == owner]
        return [v for v in views if v is not None]

    async def _send(self, type_: str, body: dict[str, Any]) -> None:
        async with self._tx_lock:
            nonce = await self._client.next_nonce(self._key.public_key)
            tx = Tx(type_, self._key.public_key, nonce, self._params.min_fee, body).signed(
                self._key, self.chain_id)
            try:
                await self._client.submit_and_wait(tx, timeout_s=self._tx_timeout_s)
            except InvalidTx as exc:
                if exc.code == "overbooked":
                    raise PlacementError(f"{type_} refused: {exc.message}") from None
                raise NamespaceError(f"{type_} refused by the ledger ({exc.code}): {exc.message}") from None

    async def create_namespace(self, node: int, quota: int) -> int:
        deployment = namespace_deployment(quota, self._random(16))
        dep_hash, signature = sign_deployment(self._key, self.chain_id, deployment)
        await self._send("contract_create", {
            "node_id": node, "kind": "namespace", "deployment": deployment,
            "deployment_hash": dep_hash, "signature": signature})
        # The tx result does not carry the new id: find it among the node's live contracts.
        for _ in range(_FIND_ATTEMPTS):
            listed = await self._entry(keyspace.node_contracts(node))
            ids = sorted((int(c) for c in (listed or {}).get("contracts", [])), reverse=True)
            for cid, entry in zip(ids, await self._entries([keyspace.contract(c) for c in ids]), strict=True):
                if entry is not None and bytes(entry["deployment_hash"]) == dep_hash:
                    return cid
            await trio.sleep(0.25)  # a lagging peer may not have the block yet
        raise NamespaceError(f"the namespace contract on node {node} was committed but cannot be found")

    async def resize_namespace(self, contract: int, quota: int) -> None:
        deployment = namespace_deployment(quota, self._random(16))
        dep_hash, signature = sign_deployment(self._key, self.chain_id, deployment)
        await self._send("contract_update", {
            "contract_id": contract, "deployment": deployment,
            "deployment_hash": dep_hash, "signature": signature})

    async def cancel_namespace(self, contract: int) -> None:
        try:
            await self._send("contract_cancel", {"contract_id": contract})
        except TfgridError as exc:
            raise NamespaceError(f"cancelling namespace {contract}: {exc}") from None
