"""Helpers for tests that run real node agents: agent processes, deployments, cleanup.

An :class:`AgentProc` is one ``python -m zos_agent.main`` process with its own data dir, runc
root, agent id and subnet. :func:`cleanup_agent` removes what an agent left on the host (its
containers, volumes, network objects): it is called at teardown for every agent a test made,
whatever state the test left it in, and touches nothing named after another agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ledger import keyspace
from ledger.client import LedgerClient
from ledger.codec import unpack
from ledger.keys import KeyPair
from ledger.state import sign_deployment
from ledger.tx import Tx
from tests.conftest import REPO, _read_line

MIB = 1024 * 1024
AGENT_START_TIMEOUT_S = 60.0


@dataclass
class AgentProc:
    name: str
    data_dir: Path
    config: Path
    agent_id: str
    subnet_index: int
    proc: subprocess.Popen[bytes] | None = None
    node_id: int | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.data_dir.parent / f"{self.name}.log"

    @property
    def runc_root(self) -> Path:
        return self.data_dir / "runc"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> int:
        """Start the agent and wait for its ``node <id>`` line; returns the node id."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zos_agent.main", "--config", str(self.config)],
                stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None
        line = _read_line(self.proc.stdout, AGENT_START_TIMEOUT_S)
        if not line.startswith(b"node "):
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"{self.name} did not start: {line!r}; log:\n{self.tail()}")
        self.node_id = int(line.split()[1])
        return self.node_id

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return ""

    def runc_list(self) -> list[dict[str, Any]]:
        out = subprocess.run(["runc", "--root", str(self.runc_root), "list", "-f", "json"],
                             capture_output=True, check=True, timeout=30).stdout
        return list(json.loads(out) or [])


def write_config(path: Path, **settings: Any) -> Path:
    """A TOML agent config (strings, numbers, lists of strings, one [capacity] table)."""
    lines = []
    capacity = settings.pop("capacity", None)
    for k, v in settings.items():
        lines.append(f"{k} = {json.dumps(v)}")
    if capacity:
        lines.append("[capacity]")
        lines += [f"{k} = {v}" for k, v in capacity.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cleanup_agent(agent: AgentProc) -> None:
    """Stop the agent and remove its containers, volumes and network (outside any trio run)."""
    agent.stop(signal.SIGKILL)
    from zos_agent.images import ImageStore
    from zos_agent.network import NodeNetwork
    from zos_agent.runtime import Runtime

    async def clean() -> None:
        network = NodeNetwork(agent_id=agent.agent_id, subnet_index=agent.subnet_index)
        runtime = Runtime(runc_root=agent.runc_root, data_dir=agent.data_dir,
                          images=ImageStore(agent.data_dir / "images"), network=network)
        for wid in await runtime.list():
            await runtime.delete(wid)
        await network.teardown()

    trio.run(clean)


# -- ledger helpers -----------------------------------------------------------------------------


async def send(client: LedgerClient, key: KeyPair, chain_id: str, tx_type: str,
               body: dict[str, Any], *, fee: int = 10_000) -> None:
    nonce = await client.next_nonce(key.public_key)
    tx = Tx(tx_type, key.public_key, nonce, fee, body).signed(key, chain_id)
    await client.submit_and_wait(tx)


async def entry(client: LedgerClient, key: bytes) -> dict[str, Any] | None:
    value, _height = await client.query(key)
    return None if value is None else dict(unpack(value))


async def contract(client: LedgerClient, cid: int) -> dict[str, Any]:
    c = await entry(client, keyspace.contract(cid))
    assert c is not None, f"contract {cid} does not exist"
    return c


async def wait_for(what: str, predicate: Any, timeout_s: float = 60.0,
                   interval_s: float = 0.25) -> Any:
    """Await ``predicate()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await trio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def container(name: str, image: str, sources: list[str], command: list[str], *,
              ports: tuple[int, ...] = (), restart: str = "always",
              env: dict[str, str] | None = None, secret_env: dict[str, bytes] | None = None,
              cpu: int = 1, memory: int = 64 * MIB, disk: int = 32 * MIB) -> dict[str, Any]:
    """One container workload of a deployment, in the schema of cli/manifest.py."""
    return {"name": name, "kind": "container", "image": image, "image_sources": sources,
            "command": command, "env": env or {}, "secret_env": secret_env or {},
            "cpu": cpu, "memory": memory, "disk": disk, "ports": list(ports),
            "restart": restart}


async def create_contract(client: LedgerClient, owner: KeyPair, chain_id: str, node_id: int,
                          name: str, workloads: list[dict[str, Any]]) -> int:
    """Submit a signed contract_create; returns the new contract id."""
    deployment = {"name": name, "workloads": workloads}
    dep_hash, sig = sign_deployment(owner, chain_id, deployment)
    before = await entry(client, keyspace.counters())
    assert before is not None
    await send(client, owner, chain_id, "contract_create",
               {"node_id": node_id, "kind": "deployment", "deployment": deployment,
                "deployment_hash": dep_hash, "signature": sig})
    # Our tx was the only contract_create in flight for this owner: find it by owner + name.
    after = await entry(client, keyspace.counters())
    assert after is not None
    for cid in range(int(after["next_contract_id"]) - 1, int(before["next_contract_id"]) - 1, -1):
        c = await contract(client, cid)
        if c["owner_key"] == owner.public_key and c["deployment"]["name"] == name:
            return cid
    raise AssertionError("the created contract was not found")
