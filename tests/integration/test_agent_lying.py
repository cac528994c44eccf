"""The real agent against a ledger peer that lies, over real loopback TCP.

The peer (:mod:`tests.integration.fakeledger`) serves a chain certified by real validator keys
whose state holds, next to an honest contract, a contract signed by someone other than its
owner and one whose deployment does not match its hash (written into the state directly: a
real validator refuses both at contract_create), and it answers for one more contract with a
tampered entry and a proof that cannot verify. The agent must run only the honest contract and
report each of the others as an error with the reason, in a signed contract_result.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ledger import keyspace
from ledger.codec import pack, unpack
from ledger.config import make_genesis, write_genesis
from ledger.keys import KeyPair
from ledger.state import sign_deployment
from ledger.tx import Tx
from tests.integration.agentkit import AgentProc, cleanup_agent, container, wait_for, write_config
from tests.integration.fakeledger import FakeLedger
from zos_agent.identity import load_or_create_node_key
from zos_agent.images import build_busybox_rootfs, push_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runc") is None,
                       reason="real containers need root and runc"),
]

CHAIN = "lying-test"
VALIDATORS = [KeyPair.from_seed(bytes([0x70 + i]) * 32) for i in range(4)]
FARMER = KeyPair.from_seed(b"\x61" * 32)
OWNER = KeyPair.from_seed(b"\x62" * 32)
MALLORY = KeyPair.from_seed(b"\x63" * 32)
FUNDS = 10**15


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    a = AgentProc("liar-a", tmp_path / "a" / "data", tmp_path / "a" / "agent.toml",
                  f"l{os.getpid() % 10000}", 210)
    yield a
    cleanup_agent(a)


class Chain:
    """Submits txs from test keys to the fake ledger with their next nonces."""

    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger = ledger

    async def send(self, key: KeyPair, tx_type: str, body: dict[str, Any]) -> None:
        nonce = self.ledger.mempool.pending_nonce(key.public_key, self.ledger.state)
        tx = Tx(tx_type, key.public_key, nonce, 10_000, body).signed(key, CHAIN)
        self.ledger.submit(tx)
        h = tx.hash()
        await wait_for(f"{tx_type} committed",
                       lambda: _now(self.ledger.state.get(keyspace.tx_result(h)) is not None), 10)
        outcome = unpack(self.ledger.state.get(keyspace.tx_result(h)) or b"")
        assert outcome["code"] == "ok", outcome


async def _now(v: Any) -> Any:
    return v


def reports(ledger: FakeLedger, node_key: bytes) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for tx in ledger.submitted:
        if tx.sender == node_key and tx.type == "contract_result":
            out.setdefault(tx.body["contract_id"], []).extend(tx.body["workloads"])
    return out


async def test_forged_and_unproven_contracts_are_refused_and_reported(
        agent: AgentProc, tmp_path: Path) -> None:
    node_key = load_or_create_node_key(agent.data_dir)
    genesis = make_genesis(CHAIN, [k.public_key for k in VALIDATORS],
                           [(k.public_key, FUNDS) for k in (FARMER, OWNER, MALLORY, node_key)],
                           {}, int(time.time() * 1000))
    write_genesis(tmp_path / "genesis.json", genesis)
    image, sources = push_image(build_busybox_rootfs(tmp_path / "rootfs"), tmp_path / "images")
    ledger = FakeLedger(genesis, VALIDATORS)
    chain = Chain(ledger)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(ledger.run)
        await chain.send(FARMER, "twin_register", {"name": "farmer", "endpoint": ""})
        await chain.send(FARMER, "farm_create", {"name": "f", "country": "NL"})
        await chain.send(OWNER, "twin_register", {"name": "owner", "endpoint": ""})
        write_config(agent.config, farm_id=1, peers=[f"{host}:{port}"],
                     genesis=str(tmp_path / "genesis.json"), data_dir=str(agent.data_dir),
                     agent_id=agent.agent_id, subnet_index=agent.subnet_index,
                     uptime_interval_s=5, reconcile_interval_s=1, log_level="DEBUG",
                     capacity={"cores": 8, "memory": 16 << 30, "storage": 100 << 30})
        node_id = await trio.to_thread.run_sync(agent.start)

        async def deploy(name: str) -> int:
            dep = {"name": name, "workloads": [
                container("w", image, sources, ["sleep", "100000"])]}
            h, sig = sign_deployment(OWNER, CHAIN, dep)
            await chain.send(OWNER, "contract_create", {"node_id": node_id, "kind": "deployment",
                                                        "deployment": dep, "deployment_hash": h,
                                                        "signature": sig})
            return int(ledger.state.counters()["next_contract_id"]) - 1

        honest = await deploy("honest")
        entry = ledger.state.get_entry(keyspace.contract(honest))
        assert entry is not None
        # The next contract is served, from its first block on, as a tampered entry with the
        # proof of the real one.
        lied_about = int(ledger.state.counters()["next_contract_id"])
        tampered = dict(entry, id=lied_about,
                        deployment=dict(entry["deployment"], name="tampered"))
        ledger.lie(keyspace.contract(lied_about), pack(tampered))
        assert await deploy("lied-about") == lied_about

        # Signed by Mallory, not by the owner the contract names (hash is right).
        bad_sig = dict(entry, id=100, deployment=dict(entry["deployment"], name="bad-sig"))
        h, sig = sign_deployment(MALLORY, CHAIN, bad_sig["deployment"])
        bad_sig.update(deployment_hash=h, signature=sig)
        # The owner's genuine hash and signature, over another deployment.
        bad_hash = dict(entry, id=101, deployment=dict(entry["deployment"], name="bad-hash"))
        ledger.forge(keyspace.contract(100), pack(bad_sig))
        ledger.forge(keyspace.contract(101), pack(bad_hash))
        ledger.forge(keyspace.node_contracts(node_id),
                     pack({"contracts": [honest, lied_about, 100, 101]}))

        async def all_reported() -> dict[int, list[dict[str, Any]]] | None:
            r = reports(ledger, node_key.public_key)
            return r if {honest, lied_about, 100, 101} <= set(r) else None

        got = await wait_for("four reports", all_reported, 60)
        assert {w["state"] for w in got[honest]} == {"ok"}
        (sig_r,) = {w["message"]: w for w in got[100]}.values()
        assert sig_r["state"] == "error"
        assert "signature does not verify" in sig_r["message"]
        (hash_r,) = {w["message"]: w for w in got[101]}.values()
        assert hash_r["state"] == "error"
        assert "does not match the contract's deployment hash" in hash_r["message"]
        lie_r = got[lied_about][0]
        assert lie_r["state"] == "error"
        assert "without a valid proof" in lie_r["message"]
        # The refusals are on the chain, as the node's signed results.
        async def forged_state() -> Any:
            c = ledger.state.get_entry(keyspace.contract(100))
            return c is not None and c["state"] == "error"

        await wait_for("the refusal committed", forged_state, 10)
        # Only the honest contract runs.
        ids = sorted(c["id"] for c in agent.runc_list())
        assert ids == [f"c{honest}-w"]
        nursery.cancel_scope.cancel()
