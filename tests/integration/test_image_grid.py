"""Images in grid storage: `tfgrid image push` stores the tar as an object and prints its read
capability as a source; a node's ImageStore fetches a ``tfs:`` source through the
``python -m threebot.storage.fetch`` child (the agent never imports threebot) and verifies the
digest like any other source.

The grid is real except for the node agents: one validator and 20 shard stores run in this
trio process on loopback TCP, and a stand-in for each node's agent does what the agent's
namespace hook does (serve each namespace contract of its node, report ok + endpoint). The
fetch child is a real process talking to them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from cli.gridstore import open_storage
from cli.home import Home, LedgerContext
from cli.image import local_sources
from cli.main import cli
from ledger import keyspace
from ledger.client import LedgerClient
from ledger.config import init_validator_home, make_genesis, write_genesis
from ledger.keys import KeyPair
from ledger.node import serve
from tests.conftest import CHAIN_ID, FAST_CONSENSUS, FUNDS
from tests.integration.agentkit import entry, send
from threebot.storage import codec as c
from zos_agent import shardstore
from zos_agent import shardwire as w
from zos_agent.errors import ImageError
from zos_agent.images import GridSource, ImageStore

pytestmark = pytest.mark.slow

GIB = 1 << 30
NODES = 20


@dataclass
class StandInNode:
    """One node: its key, its shard store, and the namespaces it serves."""

    key: KeyPair
    data_dir: Path
    node_id: int = 0
    endpoint: str = ""
    table: dict[int, w.NamespaceInfo] = field(default_factory=dict)
    reported: set[tuple[int, int]] = field(default_factory=set)


async def serve_namespaces(client: LedgerClient, node: StandInNode) -> None:
    """The agent's namespace duty for one node: every live namespace contract on it is served
    by its store and reported ok with the store's endpoint (again after each update)."""
    while True:
        listed = await entry(client, keyspace.node_contracts(node.node_id))
        for cid in (listed or {}).get("contracts", []):
            con = await entry(client, keyspace.contract(int(cid)))
            if con is None or con["kind"] != "namespace" or con["state"] == "cancelled":
                continue
            version = int(con["version"])
            if (int(cid), version) in node.reported:
                continue
            node.table[int(cid)] = w.NamespaceInfo(bytes(con["owner_key"]),
                                                   int(con["resources"]["disk"]))
            await send(client, node.key, CHAIN_ID, "contract_result", {
                "contract_id": int(cid), "version": version, "workloads": [
                    {"name": "shards", "state": "ok", "message": "", "endpoint": node.endpoint}]})
            node.reported.add((int(cid), version))
        await trio.sleep(0.1)


@dataclass
class LedgerStorage:
    peers: list[tuple[str, int]]
    genesis_path: Path
    owner: KeyPair
    home: Home


@pytest.fixture
async def grid(tmp_path: Path) -> AsyncIterator[LedgerStorage]:
    validator = KeyPair.from_seed(b"\xc2" * 32)
    owner = KeyPair.from_seed(b"\x01" * 32)
    nodes = [StandInNode(KeyPair.from_seed(bytes([0x40 + i]) * 32), tmp_path / f"node{i}")
             for i in range(NODES)]
    genesis = make_genesis(CHAIN_ID, [validator.public_key],
                           [(k.public_key, FUNDS) for k in [owner] + [n.key for n in nodes]], {},
                           int(time.time() * 1000))
    genesis_path = tmp_path / "genesis.json"
    write_genesis(genesis_path, genesis)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    addr = ("127.0.0.1", int(listeners[0].socket.getsockname()[1]))
    for listener in listeners:
        await listener.aclose()
    init_validator_home(tmp_path / "v", genesis=genesis, seed=validator.seed, listen=addr,
                        peers=[addr], empty_block_interval_ms=60_000, consensus=FAST_CONSENSUS)
    home = Home(tmp_path / "home")
    home.root.mkdir()
    home.save_context(LedgerContext((addr,), CHAIN_ID, genesis_path))
    home.save_identity(owner)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve, tmp_path / "v")
        async with LedgerClient(genesis, [addr], poll_interval_s=0.05) as client:
            await send(client, owner, CHAIN_ID, "twin_register", {"name": "imager", "endpoint": ""})
            await send(client, owner, CHAIN_ID, "farm_create", {"name": "f1", "country": "BE"})
            # The stores and stand-in agents live in a nursery inside the client's block, so
            # they are gone before the client closes.
            async with trio.open_nursery() as agents:

                async def register(i: int, node: StandInNode) -> None:
                    await send(client, node.key, CHAIN_ID, "node_register", {
                        "farm_id": 1,
                        "capacity": {"cores": 4, "memory": 8 * GIB, "storage": 100 * GIB},
                        "location": {"country": "BE", "city": "Gent"},
                        "endpoint": f"127.0.0.1:{i + 1}"})
                    await send(client, node.key, CHAIN_ID, "uptime_report",
                               {"time_ms": int(time.time() * 1000)})
                    found = await entry(client, keyspace.node_by_key(node.key.public_key))
                    assert found is not None
                    node.node_id = int(found["node"])

                    def table(node: StandInNode = node) -> dict[int, w.NamespaceInfo]:
                        return dict(node.table)

                    host, port = await agents.start(shardstore.serve_shards, node.data_dir, table,
                                                    CHAIN_ID, "127.0.0.1", 0)
                    node.endpoint = f"{host}:{port}"
                    agents.start_soon(serve_namespaces, client, node)

                async with trio.open_nursery() as reg:
                    for i, node in enumerate(nodes):
                        reg.start_soon(register, i, node)
                yield LedgerStorage([addr], genesis_path, owner, home)
                agents.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def make_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello from the grid\n")
    (root / "etc" / "motd").write_text("stored 16-of-20\n")
    (root / "blob").write_bytes(hashlib.sha256(b"seed").digest() * 5000)  # 160 KB
    return root


def push(home: Home, src: Path) -> dict[str, object]:
    """`tfgrid --json image push SRC` (in a worker thread: the command runs its own trio loop)."""
    result = CliRunner().invoke(cli, ["--home", str(home.root), "--json", "image", "push", str(src)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert isinstance(doc, dict)
    return doc


async def test_image_push_into_grid_storage_and_fetch_from_tfs(
        grid: LedgerStorage, tmp_path: Path) -> None:
    with trio.fail_after(240):
        rootfs = make_rootfs(tmp_path / "rootfs")
        doc = await trio.to_thread.run_sync(push, grid.home, rootfs)
        image = str(doc["image"])
        sources = doc["sources"]
        assert isinstance(sources, list)
        assert len(sources) == 1, "no devnet: no file:// fallback"
        cap = str(sources[0])
        assert cap.startswith("tfs:")
        assert local_sources(grid.home, image) == [cap]  # what `deploy` will put in contracts

        # Pushing the same tree again reuses the stored object.
        again = await trio.to_thread.run_sync(push, grid.home, rootfs)
        assert again == doc

        # The node side: only the tfs: source; the tar in the home is gone too.
        (grid.home.root / "images" / f"{image.removeprefix('sha256:')}.tar").unlink()
        store = ImageStore(tmp_path / "node-cache", grid=GridSource(tuple(grid.peers), grid.genesis_path))
        got = await store.ensure(image, [cap])
        assert (got / "bin" / "hello").read_bytes() == (rootfs / "bin" / "hello").read_bytes()
        assert (got / "blob").read_bytes() == (rootfs / "blob").read_bytes()
        assert (got / "etc" / "motd").read_text() == "stored 16-of-20\n"

        # A capability of another object: the digest check refuses it.
        other = tmp_path / "other.tar"
        other.write_bytes(b"x" * 10_000)
        store2 = ImageStore(tmp_path / "node-cache-2",
                            grid=GridSource(tuple(grid.peers), grid.genesis_path))
        async with open_storage(grid.home) as storage:
            other_cap = (await storage.put(other)).cap
        with pytest.raises(ImageError, match="digest mismatch"):
            await store2.ensure(image, [other_cap])

        # The 3Bot daemon watches the pushed image like any stored object.
        ran = await trio.run_process(
            [sys.executable, "-m", "cli.main", "--home", str(grid.home.root), "--json",
             "bot", "run", "--once"], capture_stdout=True, capture_stderr=True, check=False)
        assert ran.returncode == 0, ran.stderr
        events = [json.loads(line) for line in ran.stdout.decode().splitlines()]
        assert [(e["name"], e["outcome"], e["healthy"]) for e in events] == [
            (f"image {image}", "ok", 20), ("other.tar", "ok", 20)]


async def test_bad_tfs_sources_fail_with_clear_errors(grid: LedgerStorage, tmp_path: Path) -> None:
    image = "sha256:" + "ab" * 32
    store = ImageStore(tmp_path / "cache", grid=GridSource(tuple(grid.peers), grid.genesis_path))
    with trio.fail_after(120):
        with pytest.raises(ImageError, match=r"grid fetch failed: .*capabilit") as bad:
            await store.ensure(image, ["tfs:not-a-capability"])
        assert "\n" not in str(bad.value)
        # Well formed, but nothing was ever stored under it.
        unknown = str(c.new_read_cap(1, b"\x07" * c.KEY_SIZE))
        with pytest.raises(ImageError, match="grid fetch failed: no manifest for this capability"):
            await store.ensure(image, [unknown])
        # An agent without a ledger cannot use tfs: sources at all.
        with pytest.raises(ImageError, match="no ledger"):
            await ImageStore(tmp_path / "c2").ensure(image, [unknown])
