"""LedgerGrid (the storage client's view of the ledger) against a real validator in this
process: twin lookup, node views, namespace contracts created, found by owner scan and by
hint, the node's endpoint report, growth (contract_update) and cancel."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from ledger.client import LedgerClient
from ledger.config import init_validator_home, make_genesis
from ledger.keys import KeyPair
from ledger.node import serve
from tests.conftest import CHAIN_ID, FAST_CONSENSUS, FUNDS
from tests.integration.agentkit import send
from threebot.storage.errors import NamespaceError
from threebot.storage.grid import LedgerGrid

GIB = 1 << 30


async def test_ledger_grid_namespaces(tmp_path: Path) -> None:
    validator = KeyPair.from_seed(b"\xc1" * 32)
    owner, other, node_key = (KeyPair.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
    genesis = make_genesis(CHAIN_ID, [validator.public_key],
                           [(k.public_key, FUNDS) for k in (owner, other, node_key)], {},
                           int(time.time() * 1000))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    addr = ("127.0.0.1", int(listeners[0].socket.getsockname()[1]))
    for listener in listeners:
        await listener.aclose()
    init_validator_home(tmp_path / "v", genesis=genesis, seed=validator.seed, listen=addr,
                        peers=[addr], empty_block_interval_ms=60_000, consensus=FAST_CONSENSUS)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, tmp_path / "v")
            async with LedgerClient(genesis, [addr], poll_interval_s=0.05) as client:
                grid = LedgerGrid(client, genesis, owner, os.urandom)
                with pytest.raises(NamespaceError, match="no twin"):
                    await grid.own_twin()
                await send(client, owner, CHAIN_ID, "twin_register", {"name": "alice", "endpoint": ""})
                await send(client, other, CHAIN_ID, "twin_register", {"name": "bob", "endpoint": ""})
                await send(client, owner, CHAIN_ID, "farm_create", {"name": "f1", "country": "BE"})
                await send(client, node_key, CHAIN_ID, "node_register", {
                    "farm_id": 1, "capacity": {"cores": 4, "memory": 8 * GIB, "storage": 100 * GIB},
                    "location": {"country": "BE", "city": "Gent"}, "endpoint": "127.0.0.1:1"})
                await send(client, node_key, CHAIN_ID, "uptime_report", {"time_ms": int(time.time() * 1000)})
                twin = await grid.own_twin()
                [node] = await grid.nodes()
                assert (node.id, node.farm, node.country, node.up) == (1, 1, "BE", True)
                assert node.free_storage == 100 * GIB

                cid = await grid.create_namespace(node.id, GIB)
                view = await grid.namespace(cid)
                assert view is not None
                assert (view.node, view.owner, view.quota, view.state, view.endpoint) == (1, twin, GIB, "created", "")
                assert (await grid.nodes())[0].free_storage == 99 * GIB

                await send(client, node_key, CHAIN_ID, "contract_result", {
                    "contract_id": cid, "version": 1, "workloads": [
                        {"name": "shards", "state": "ok", "message": "", "endpoint": "127.0.0.1:7001"}]})
                view = await grid.namespace(cid)
                assert view is not None
                assert (view.state, view.endpoint) == ("deployed", "127.0.0.1:7001")
                assert await grid.namespaces(twin) == [view]
                assert await grid.namespaces(twin, hints=[cid]) == [view]
                assert await grid.namespaces(twin + 1) == []

                await grid.resize_namespace(cid, 3 * GIB)
                view = await grid.namespace(cid)
                assert view is not None
                assert (view.quota, view.state, view.endpoint) == (3 * GIB, "created", "")

                await grid.cancel_namespace(cid)
                assert await grid.namespace(cid) is None
                assert await grid.namespaces(twin) == []
                with pytest.raises(NamespaceError, match="refused"):
                    await grid.cancel_namespace(cid)
            nursery.cancel_scope.cancel()
