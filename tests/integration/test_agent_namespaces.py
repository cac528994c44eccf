"""Storage namespace workloads end to end: 4 real validators, a real agent process, its
shard-store child, a namespace contract from deploy to cancel (issue 4, shard-store side)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ledger import keyspace
from ledger.client import LedgerClient
from ledger.config import write_genesis
from ledger.keys import KeyPair
from ledger.state import sign_deployment
from tests.conftest import CHAIN_ID, FAST_CONSENSUS, Cluster, free_ports
from tests.integration.agentkit import (
    AgentProc,
    cleanup_agent,
    contract,
    entry,
    send,
    wait_for,
    write_config,
)
from tests.integration.test_shardstore import code, connect, payload, sid
from zos_agent import shardwire as w
from zos_agent.identity import load_or_create_node_key

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runc") is None,
                       reason="the agent needs root and runc"),
]

RICH = 10**15
FARMER = KeyPair.from_seed(b"\x61" * 32)
OWNER = KeyPair.from_seed(b"\x62" * 32)
STRANGER = KeyPair.from_seed(b"\x63" * 32)
QUOTA = 16 * 1024 * 1024


class Setup:
    def __init__(self, root: Path, cluster: Cluster, agent: AgentProc, port: int,
                 farm_id: int) -> None:
        self.root, self.cluster, self.agent, self.port, self.farm_id = (
            root, cluster, agent, port, farm_id)

    def client(self) -> LedgerClient:
        return LedgerClient(self.cluster.genesis, self.cluster.addrs, timeout_s=5.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("nsgrid")
    agent = AgentProc("ns1", root / "ns1" / "data", root / "ns1" / "agent.toml",
                      f"k{os.getpid() % 10000}", 230)
    node_key = load_or_create_node_key(agent.data_dir)
    accounts = [(FARMER.public_key, RICH), (OWNER.public_key, RICH),
                (STRANGER.public_key, RICH), (node_key.public_key, RICH)]
    cluster = Cluster(root / "cluster", 4, accounts=accounts, empty_block_interval_ms=300,
                      consensus=dict(FAST_CONSENSUS), params={})
    genesis_path = root / "genesis.json"
    write_genesis(genesis_path, cluster.genesis)
    cluster.start_all()
    try:
        async def prepare() -> int:
            async with LedgerClient(cluster.genesis, cluster.addrs) as client:
                await send(client, FARMER, CHAIN_ID, "twin_register",
                           {"name": "nsfarmer", "endpoint": ""})
                await send(client, FARMER, CHAIN_ID, "farm_create",
                           {"name": "ns farm", "country": "BE"})
                await send(client, OWNER, CHAIN_ID, "twin_register",
                           {"name": "nsowner", "endpoint": ""})
                counters = await entry(client, keyspace.counters())
                assert counters is not None
                return int(counters["next_farm_id"]) - 1

        farm_id = trio.run(prepare)
        port = free_ports(1)[0]
        write_config(agent.config, farm_id=farm_id,
                     peers=[f"{h}:{p}" for h, p in cluster.addrs],
                     genesis=str(genesis_path), data_dir=str(agent.data_dir),
                     agent_id=agent.agent_id, subnet_index=agent.subnet_index,
                     uptime_interval_s=2, reconcile_interval_s=1, stall_timeout_s=10,
                     log_level="DEBUG", shard_port=port)
        yield Setup(root, cluster, agent, port, farm_id)
    finally:
        cleanup_agent(agent)
        cluster.stop_all()


async def running(agent: AgentProc) -> int:
    """The agent's node id, starting it if an earlier test left it stopped."""
    if agent.proc is not None and agent.proc.poll() is None and agent.node_id is not None:
        return agent.node_id
    return await trio.to_thread.run_sync(agent.start)


async def create_namespace(client: LedgerClient, node_id: int, name: str,
                           workloads: list[dict[str, Any]]) -> int:
    deployment = {"name": name, "workloads": workloads}
    dep_hash, sig = sign_deployment(OWNER, CHAIN_ID, deployment)
    before = await entry(client, keyspace.counters())
    assert before is not None
    await send(client, OWNER, CHAIN_ID, "contract_create",
               {"node_id": node_id, "kind": "namespace", "deployment": deployment,
                "deployment_hash": dep_hash, "signature": sig})
    return int(before["next_contract_id"])


def ns_workload(name: str, disk: int = QUOTA) -> dict[str, Any]:
    return {"name": name, "kind": "namespace", "cpu": 0, "memory": 0, "disk": disk}


def result_of(c: dict[str, Any], name: str) -> dict[str, str] | None:
    return next((r for r in c["results"] if r["name"] == name), None)


async def port_closed(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_namespace_contract_served_survives_agent_kill_and_is_wiped_on_cancel(
        setup: Setup) -> None:
    agent = setup.agent
    node_id = await running(agent)
    endpoint = f"127.0.0.1:{setup.port}"
    assert await port_closed(setup.port)  # no namespace yet: no store, no socket
    async with setup.client() as client:
        cid = await create_namespace(client, node_id, "shards", [ns_workload("store")])
        assert (await contract(client, cid))["kind"] == "namespace"

        async def reported_ok() -> Any:
            c = await contract(client, cid)
            r = result_of(c, "store")
            return c if r is not None and r["state"] == "ok" else None

        c = await wait_for("namespace ok", reported_ok)
        assert result_of(c, "store") == {"name": "store", "state": "ok", "message": "",
                                          "endpoint": endpoint}
        assert c["state"] == "deployed"
        data = payload(5, 3 * w.MAX_CHUNK + 77)
        async with connect(("127.0.0.1", setup.port)) as s:
            assert isinstance(await s.upload(cid, sid(1), data, 1, key=OWNER), w.Stored)
            assert code(await s.upload(cid, sid(2), b"x", 2, key=STRANGER)) is \
                w.ErrorCode.NOT_OWNER
            assert code(await s.upload(cid, sid(3), payload(3, QUOTA), 3, key=OWNER)) is \
                w.ErrorCode.QUOTA_EXCEEDED
            assert await s.call(w.Stat(cid)) == w.StatResult(len(data), QUOTA, 1)

        # kill -9 of the agent: its store follows it; the restarted agent serves again
        agent.stop(signal.SIGKILL)
        await wait_for("store gone with the agent", lambda: port_closed(setup.port))
        await trio.to_thread.run_sync(agent.start)

        async def serving() -> bool:
            try:
                async with connect(("127.0.0.1", setup.port)) as s:
                    return await s.download(cid, sid(1)) == data
            except OSError:
                return False

        await wait_for("store back after the agent restart", serving)
        async with connect(("127.0.0.1", setup.port)) as s:
            assert code(await s.upload(cid, sid(1), data, 1, key=OWNER)) is w.ErrorCode.REPLAY

        # cancel: shards wiped, "deleted" reported, the store stops with the last namespace
        await send(client, OWNER, CHAIN_ID, "contract_cancel", {"contract_id": cid})

        async def deleted() -> Any:
            r = result_of(await contract(client, cid), "store")
            return r is not None and r["state"] == "deleted"

        await wait_for("namespace deleted", deleted)
        assert not (agent.data_dir / "shards" / "ns" / str(cid)).exists()
        await wait_for("store stopped", lambda: port_closed(setup.port))


async def test_malformed_namespace_is_refused(setup: Setup) -> None:
    agent = setup.agent
    node_id = await running(agent)
    async with setup.client() as client:
        cid = await create_namespace(client, node_id, "bad",
                                     [{"name": "b", "kind": "namespace", "cpu": 0,
                                       "memory": 64 * 1024 * 1024, "disk": QUOTA}])

        async def refused() -> Any:
            r = result_of(await contract(client, cid), "b")
            return r if r is not None and r["state"] == "error" else None

        r = await wait_for("namespace refused", refused)
        assert "memory must be 0" in r["message"]
        await send(client, OWNER, CHAIN_ID, "contract_cancel", {"contract_id": cid})
