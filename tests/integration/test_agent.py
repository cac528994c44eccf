"""The node agent end to end: 4 real validators, real agent processes, real runc containers.

Each test starts its own agent (own data dir, runc root, bridge and subnet) on one shared
cluster whose genesis funds the agents' node keys (created before the genesis, as devnet
does). At module teardown every agent is killed and whatever it left on the host (containers,
volumes, network objects) is removed by its own names.
"""

from __future__ import annotations

import os
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from ledger import keyspace
from ledger.client import LedgerClient
from ledger.config import write_genesis
from ledger.keys import KeyPair
from ledger.state import sign_deployment
from ledger.types import Genesis
from tests.conftest import CHAIN_ID, FAST_CONSENSUS, Cluster
from tests.integration.agentkit import (
    AgentProc,
    cleanup_agent,
    container,
    contract,
    create_contract,
    entry,
    send,
    wait_for,
    write_config,
)
from zos_agent.capacity import apply_reserve, measure
from zos_agent.identity import load_or_create_node_key
from zos_agent.images import build_busybox_rootfs, push_image
from zos_agent.secrets import seal_secret

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runc") is None,
                       reason="real containers need root and runc"),
]

RICH = 10**15
SECRET = "s3cret-value-7f1c9d"
PARAMS = {"billing_period_ms": 2000, "grace_period_ms": 4000}
FARMER = KeyPair.from_seed(b"\x51" * 32)
OWNER = KeyPair.from_seed(b"\x52" * 32)
POOR = KeyPair.from_seed(b"\x53" * 32)
POOR_FUNDS = 1_600_000  # the fees plus about one billing period of a 1-core container


@dataclass
class Grid:
    root: Path
    cluster: Cluster
    genesis: Genesis
    genesis_path: Path
    image: str
    sources: list[str]
    farm_id: int
    agents: dict[str, AgentProc] = field(default_factory=dict)

    def agent(self, name: str, **settings: Any) -> AgentProc:
        a = self.agents[name]
        write_config(a.config, farm_id=self.farm_id,
                     peers=[f"{h}:{p}" for h, p in self.cluster.addrs],
                     genesis=str(self.genesis_path), data_dir=str(a.data_dir),
                     agent_id=a.agent_id, subnet_index=a.subnet_index, uptime_interval_s=2,
                     reconcile_interval_s=1, stall_timeout_s=10, country="BE", city="Ghent",
                     log_level="DEBUG", **settings)
        return a

    def client(self) -> LedgerClient:
        return LedgerClient(self.genesis, self.cluster.addrs, timeout_s=5.0)


AGENT_NAMES = ("a1", "a2")


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    root = tmp_path_factory.mktemp("agentgrid")
    agents = {}
    for i, name in enumerate(AGENT_NAMES):
        data = root / name / "data"
        # A short agent id per module run so that leftovers of a crashed run never collide.
        agents[name] = AgentProc(name, data, root / name / "agent.toml",
                                 f"t{os.getpid() % 10000}{name}", 200 + i)
    node_keys = [load_or_create_node_key(a.data_dir) for a in agents.values()]
    accounts = [(FARMER.public_key, RICH), (OWNER.public_key, RICH), (POOR.public_key, POOR_FUNDS)]
    accounts += [(k.public_key, RICH) for k in node_keys]
    cluster = Cluster(root / "cluster", 4, accounts=accounts, empty_block_interval_ms=300,
                      consensus=dict(FAST_CONSENSUS), params=PARAMS)
    genesis_path = root / "genesis.json"
    write_genesis(genesis_path, cluster.genesis)
    image, sources = push_image(build_busybox_rootfs(root / "rootfs"), root / "images")
    cluster.start_all()
    try:
        async def setup() -> int:
            async with LedgerClient(cluster.genesis, cluster.addrs) as client:
                await send(client, FARMER, CHAIN_ID, "twin_register", {"name": "farmer", "endpoint": ""})
                await send(client, FARMER, CHAIN_ID, "farm_create", {"name": "farm one", "country": "BE"})
                await send(client, OWNER, CHAIN_ID, "twin_register", {"name": "owner", "endpoint": ""})
                await send(client, POOR, CHAIN_ID, "twin_register", {"name": "poor", "endpoint": ""})
                counters = await entry(client, keyspace.counters())
                assert counters is not None
                return int(counters["next_farm_id"]) - 1

        farm_id = trio.run(setup)
        g = Grid(root, cluster, cluster.genesis, genesis_path, image, sources, farm_id, agents)
        yield g
    finally:
        for a in agents.values():
            cleanup_agent(a)
        cluster.stop_all()


def agent_processes(agent: AgentProc) -> list[psutil.Process]:
    """The agent and its helpers: its descendants, and the detached per-container shims
    (they name the agent's runc root on their command line)."""
    root = psutil.Process(agent.pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if any(a.endswith("shim.py") for a in cmdline) and str(agent.runc_root) in cmdline:
            procs[p.pid] = p
    return list(procs.values())


def listening_sockets(agent: AgentProc, exclude: set[int]) -> list[Any]:
    """LISTEN sockets held by the agent's processes, except the ``exclude`` subtrees (the
    containers: a workload may listen, the agent never does)."""
    procs = agent_processes(agent)
    skip: set[int] = set()
    for p in procs:
        if p.pid in exclude:
            skip |= {p.pid, *(c.pid for c in p.children(recursive=True))}
    found = []
    for p in procs:
        if p.pid in skip:
            continue
        try:
            found += [c for c in p.net_connections(kind="all") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


async def http_get(endpoint: str) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(f"http://{endpoint}/", timeout=5) as r:
            return bytes(r.read())

    return await trio.to_thread.run_sync(get)


def results(c: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in c["results"]}


def log_lines(agent: AgentProc, wid: str) -> list[str]:
    path = agent.data_dir / "logs" / f"{wid}.log"
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def container_pid(agent: AgentProc, wid: str) -> int | None:
    for c in agent.runc_list():
        if c["id"] == wid and c["status"] == "running":
            return int(c["pid"])
    return None


async def test_register_deploy_restart_adopt_cancel(grid: Grid) -> None:
    a = grid.agent("a1")
    node_id = a.start()
    async with grid.client() as client:
        # -- registered on its farm with the measured capacity minus the 10% reserve
        node = await entry(client, keyspace.node(node_id))
        assert node is not None
        assert node["farm"] == grid.farm_id
        assert node["public_key"] == load_or_create_node_key(a.data_dir).public_key
        assert node["capacity"] == apply_reserve(measure(a.data_dir), 10).to_map()
        assert node["location"] == {"country": "BE", "city": "Ghent"}
        await wait_for("an uptime report",
                       lambda: _node_field(client, node_id, "last_uptime_ms"), 20)

        # -- capacity changes are re-reported (here: a configured override, after a restart)
        assert a.stop(signal.SIGTERM) == 0
        big = {"cores": 8, "memory": 16 << 30, "storage": 200 << 30}
        grid.agent("a1", capacity=big)
        assert a.start() == node_id
        assert await _node_field(client, node_id, "capacity") == big

        # -- deploy: a web server with a secret, and a process that keeps exiting
        node_key = bytes(node["public_key"])
        web = container("web", grid.image, grid.sources,
                        ["sh", "-c", 'printf %s "$TOKEN" > /data/token; exec httpd -f -p 8080 -h /www'],
                        ports=(8080,), env={"GREETING": "hi"},
                        secret_env={"TOKEN": seal_secret(node_key, SECRET.encode())})
        side = container("side", grid.image, grid.sources, ["sleep", "100000"])
        crash = container("crash", grid.image, grid.sources,
                          ["sh", "-c", "echo run; sleep 1; exit 3"], restart="on-failure")
        cid = await create_contract(client, OWNER, CHAIN_ID, node_id, "web", [web, side])
        cid2 = await create_contract(client, OWNER, CHAIN_ID, node_id, "crasher", [crash])

        async def deployed() -> dict[str, Any] | None:
            c = await contract(client, cid)
            return c if c["state"] == "deployed" else None

        c = await wait_for("contract deployed", deployed, 90)
        r = results(c)
        assert r["web"]["state"] == "ok"
        assert r["web"]["endpoint"].startswith("127.0.0.1:")
        assert b"hello from tfgrid busybox" in await http_get(r["web"]["endpoint"])
        web_id, side_id, crash_id = f"c{cid}-web", f"c{cid}-side", f"c{cid2}-crash"
        token = a.data_dir / "volumes" / web_id / "token"
        assert token.read_text() == SECRET

        # -- no listening socket in the agent or its helpers (containers excluded)
        container_pids = {int(x["pid"]) for x in a.runc_list() if x["pid"]}
        shims = [p for p in agent_processes(a) if p.pid != a.pid and p.pid not in container_pids]
        assert len(shims) >= 3  # one per container, so the check below covers them
        assert listening_sockets(a, container_pids) == []

        # -- a container whose process exits is restarted (on-failure, exit 3)
        await wait_for("crash restarted",
                       lambda: _async(len([x for x in log_lines(a, crash_id) if x == "run"]) >= 3),
                       60)

        # -- kill -9 the agent; meanwhile one container disappears entirely
        web_pid = container_pid(a, web_id)
        assert web_pid is not None
        a.stop(signal.SIGKILL)
        await trio.run_process(["runc", "--root", str(a.runc_root), "delete", "--force",
                                side_id])
        shutil.rmtree(a.data_dir / "bundles" / side_id)
        a.start()

        async def side_back() -> bool:
            return container_pid(a, side_id) is not None

        await wait_for("missing container recreated", side_back, 60)
        await trio.sleep(3)  # a few more passes: nothing may be created twice
        ids = [x["id"] for x in a.runc_list()]
        assert sorted(ids) == sorted(set(ids))
        assert web_id in ids
        assert container_pid(a, web_id) == web_pid  # adopted, not recreated or restarted
        assert b"hello" in await http_get(r["web"]["endpoint"])

        # -- update: only the changed workload is recreated; version 2 is reported deployed
        side_pid = container_pid(a, side_id)
        side2 = dict(side, command=["sleep", "200000"])
        dep2 = {"name": "web", "workloads": [web, side2]}
        h2, sig2 = sign_deployment(OWNER, CHAIN_ID, dep2)
        await send(client, OWNER, CHAIN_ID, "contract_update",
                   {"contract_id": cid, "deployment": dep2, "deployment_hash": h2,
                    "signature": sig2})

        async def v2_deployed() -> bool:
            c = await contract(client, cid)
            return bool(c["version"] == 2 and c["state"] == "deployed")

        await wait_for("version 2 deployed", v2_deployed, 60)
        assert container_pid(a, web_id) == web_pid
        assert container_pid(a, side_id) not in (None, side_pid)

        # -- a clean stop (SIGTERM) leaves the workloads running
        assert a.stop(signal.SIGTERM) == 0
        assert container_pid(a, web_id) == web_pid
        assert b"hello" in await http_get(r["web"]["endpoint"])
        a.start()

        # -- cancel: containers deleted, files wiped, results "deleted"
        await send(client, OWNER, CHAIN_ID, "contract_cancel", {"contract_id": cid})

        async def all_deleted() -> bool:
            rs = results(await contract(client, cid))
            return all(rs.get(n, {}).get("state") == "deleted" for n in ("web", "side"))

        await wait_for("results deleted", all_deleted, 60)
        ids = [x["id"] for x in a.runc_list()]
        assert web_id not in ids
        assert side_id not in ids
        for wid in (web_id, side_id):
            assert not (a.data_dir / "bundles" / wid).exists()
            assert not (a.data_dir / "volumes" / f"{wid}.img").exists()
            assert not (a.data_dir / "volumes" / wid).exists()
            assert not (a.data_dir / "logs" / f"{wid}.log").exists()
        assert (await contract(client, cid))["state"] == "cancelled"

        # -- the secret never reached the ledger (nor the agent's log)
        latest = (await client.latest())[0].height
        for h in range(1, latest + 1):
            block = await client.block(h)
            assert SECRET.encode() not in block.encode()
        assert SECRET not in a.log.read_text()
        await send(client, OWNER, CHAIN_ID, "contract_cancel", {"contract_id": cid2})


async def test_unpaid_contract_goes_to_grace_then_is_cancelled_and_collected(grid: Grid) -> None:
    a = grid.agent("a2", capacity={"cores": 4, "memory": 8 << 30, "storage": 100 << 30})
    node_id = a.start()
    async with grid.client() as client:
        node = await entry(client, keyspace.node(node_id))
        assert node is not None
        assert node["capacity"] == {"cores": 4, "memory": 8 << 30, "storage": 100 << 30}
        job = container("job", grid.image, grid.sources, ["sleep", "100000"])
        cid = await create_contract(client, POOR, CHAIN_ID, node_id, "unpaid", [job])
        wid = f"c{cid}-job"
        seen: list[str] = []

        async def state_is(want: str) -> bool:
            s = (await contract(client, cid))["state"]
            if not seen or seen[-1] != s:
                seen.append(s)
            return s == want

        await wait_for("grace", lambda: state_is("grace"), 60, 0.1)
        assert container_pid(a, wid) is not None  # grace keeps it running
        await wait_for("cancelled", lambda: state_is("cancelled"), 60, 0.1)

        async def collected() -> bool:
            rs = results(await contract(client, cid))
            return rs.get("job", {}).get("state") == "deleted"

        await wait_for("job deleted", collected, 60)
        assert wid not in [x["id"] for x in a.runc_list()]
        assert not (a.data_dir / "volumes" / f"{wid}.img").exists()
        assert not (a.data_dir / "bundles" / wid).exists()
        assert "grace" in seen


async def _node_field(client: LedgerClient, node_id: int, name: str) -> Any:
    node = await entry(client, keyspace.node(node_id))
    return None if node is None else node.get(name)


async def _async(value: Any) -> Any:
    return value
