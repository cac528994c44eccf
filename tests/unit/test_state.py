"""The ledger state machine: every tx type, every refusal, billing, grace, minting, determinism."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ledger import keyspace
from ledger.codec import hash_bytes, pack
from ledger.errors import ConfigError, InvalidTx, MalformedFrame
from ledger.keys import KeyPair
from ledger.state import (
    GIB,
    PARAM_DEFAULTS,
    TX_TYPES,
    LedgerState,
    Params,
    TxOutcome,
    decode_entry,
    deployment_hash,
    max_spend,
    node_status,
    sign_deployment,
    verify_deployment,
)
from ledger.tx import Tx
from ledger.types import Genesis, ValidatorSet

CHAIN = "state-test"
T0 = 1_000_000
FEE = 10
PARAMS = {
    "min_fee": FEE,
    "billing_period_ms": 10_000,
    "grace_period_ms": 25_000,
    "minting_period_ms": 60_000,
    "price_per_core": 1_000,
    "price_per_gib_memory": 500,
    "price_per_gib_storage": 10,
    "burn_percent": 20,
    "mint_per_core": 100,
    "mint_per_gib_memory": 10,
    "mint_per_gib_storage": 1,
    "max_clock_drift_ms": 5_000,
    "uptime_down_after_ms": 20_000,
    "max_deployment_size": 2_048,
}


def kp(i: int) -> KeyPair:
    return KeyPair.from_seed(bytes([i]) * 32)


ALICE, BOB, CAROL, NODE, NODE2, VAL = (kp(i) for i in range(1, 7))  # CAROL has no twin
RICH = 10**9


def genesis(params: dict[str, int] | None = None,
            accounts: tuple[tuple[bytes, int], ...] | None = None) -> Genesis:
    if accounts is None:
        accounts = tuple((k.public_key, RICH) for k in (ALICE, BOB, CAROL, NODE, NODE2))
    return Genesis(CHAIN, T0, ValidatorSet.of([VAL.public_key]), accounts,
                   tuple(sorted((PARAMS if params is None else params).items())))


def deployment(cpu: int = 1, memory: int = GIB, disk: int = GIB, name: str = "web",
               **extra: Any) -> dict[str, Any]:
    return {"name": name, "workloads": [
        {"name": "hello", "kind": "container", "cpu": cpu, "memory": memory, "disk": disk,
         "image": "sha256:00", **extra}]}


CAPACITY = {"cores": 4, "memory": 8 * GIB, "storage": 100 * GIB}


class World:
    """A chain driven block by block, with nonces tracked per sender."""

    def __init__(self, g: Genesis | None = None) -> None:
        self.state = LedgerState.from_genesis(g or genesis())
        self.height = 0
        self.time = T0
        self._queued: dict[bytes, int] = {}

    def tx(self, key: KeyPair, type_: str, body: dict[str, Any], *, fee: int = FEE,
           nonce: int | None = None) -> bytes:
        if nonce is None:
            nonce = self.state.next_nonce(key.public_key) + self._queued.get(key.public_key, 0)
            self._queued[key.public_key] = self._queued.get(key.public_key, 0) + 1
        return Tx(type_, key.public_key, nonce, fee, body).signed(key, CHAIN).encode()

    def block(self, *txs: bytes, dt: int = 1_000) -> list[TxOutcome]:
        self.height += 1
        self.time += dt
        result = self.state.apply_block(self.height, self.time, list(txs))
        self.state = result.state
        self._queued.clear()
        return result.outcomes

    def ok(self, *txs: bytes, dt: int = 1_000) -> None:
        outcomes = self.block(*txs, dt=dt)
        assert [(o.code, o.message) for o in outcomes] == [("ok", "")] * len(txs)

    def advance_to(self, time_ms: int) -> None:
        self.block(dt=time_ms - self.time)

    def entry(self, key: bytes) -> dict[str, Any]:
        e = self.state.get_entry(key)
        assert e is not None
        return e

    def balance(self, key: KeyPair) -> int:
        return self.state.balance(key.public_key)

    def contract_body(self, node_id: int = 1, owner: KeyPair = BOB, kind: str = "deployment",
                      dep: dict[str, Any] | None = None) -> dict[str, Any]:
        dep = deployment() if dep is None else dep
        h, sig = sign_deployment(owner, CHAIN, dep)
        return {"node_id": node_id, "kind": kind, "deployment": dep, "deployment_hash": h,
                "signature": sig}

    def setup_grid(self, *, contract: bool = True) -> None:
        """alice: twin + farm 1; bob: twin; NODE: node 1 reporting; bob's contract 1 on it."""
        self.ok(self.tx(ALICE, "twin_register", {"name": "alice", "endpoint": "10.0.0.1:7000"}),
                self.tx(BOB, "twin_register", {"name": "bob", "endpoint": ""}))
        self.ok(self.tx(ALICE, "farm_create", {"name": "Farm 1", "country": "BE"}))
        self.ok(self.tx(NODE, "node_register", {
            "farm_id": 1, "capacity": CAPACITY, "location": {"country": "BE", "city": "Gent"},
            "endpoint": "10.0.0.9:9900"}))
        self.ok(self.tx(NODE, "uptime_report", {"time_ms": self.time + 1_000}))
        if contract:
            self.ok(self.tx(BOB, "contract_create", self.contract_body()))


def accounts_total(state: LedgerState) -> int:
    return sum(decode_entry(k, v)["balance"] for k, v in state.tree.items()
               if k.startswith(b"acct/"))


def assert_supply(state: LedgerState) -> None:
    c = state.counters()
    total = accounts_total(state)
    assert total == c["supply"]
    assert total + c["burned"] == c["genesis_supply"] + c["minted"]


# ---------------------------------------------------------------------------------------------
# Genesis and params


def test_genesis_entries() -> None:
    s = LedgerState.from_genesis(genesis())
    assert s.balance(ALICE.public_key) == RICH
    assert s.next_nonce(ALICE.public_key) == 0
    assert s.next_nonce(VAL.public_key) == 0
    c = s.counters()
    assert c["genesis_supply"] == 5 * RICH
    assert c["last_billing_ms"] == T0
    params = s.get_entry(keyspace.params())
    assert params == {**PARAM_DEFAULTS, **PARAMS}


def test_genesis_defaults_and_bad_params() -> None:
    assert Params.from_genesis(genesis(params={})).to_map() == PARAM_DEFAULTS
    with pytest.raises(ConfigError, match="billing_period_ms"):
        Params.from_genesis(genesis(params={"billing_period_ms": 0}))
    with pytest.raises(ConfigError, match="burn_percent"):
        Params.from_genesis(genesis(params={"burn_percent": 101}))
    with pytest.raises(ConfigError, match="twice"):
        LedgerState.from_genesis(genesis(accounts=((ALICE.public_key, 1), (ALICE.public_key, 2))))


def test_reload_from_items_gives_same_root() -> None:
    w = World()
    w.setup_grid()
    again = LedgerState.from_items(w.state.genesis, w.state.tree.items())
    assert again.root == w.state.root
    assert again.get(keyspace.contract(1)) == w.state.get(keyspace.contract(1))


def test_empty_block_changes_nothing() -> None:
    w = World()
    before = w.state.root
    assert w.block() == []
    assert w.state.root == before


# ---------------------------------------------------------------------------------------------
# Each tx type, accepted


def test_transfer() -> None:
    w = World()
    raw = w.tx(ALICE, "transfer", {"to": VAL.public_key, "amount": 1234})
    w.ok(raw)
    assert w.balance(ALICE) == RICH - 1234 - FEE
    assert w.state.balance(VAL.public_key) == 1234
    assert w.state.next_nonce(ALICE.public_key) == 1
    assert w.entry(keyspace.tx_result(hash_bytes(raw))) == {
        "height": 1, "code": "ok", "message": ""}
    assert w.state.counters()["burned"] == FEE
    assert_supply(w.state)


def test_several_txs_of_one_sender_in_one_block() -> None:
    w = World()
    w.ok(*(w.tx(ALICE, "transfer", {"to": BOB.public_key, "amount": 1}) for _ in range(5)))
    assert w.state.next_nonce(ALICE.public_key) == 5
    assert w.balance(BOB) == RICH + 5


def test_twin_register_and_update() -> None:
    w = World()
    w.ok(w.tx(ALICE, "twin_register", {"name": "alice", "endpoint": "host.example:7000"}))
    twin = w.entry(keyspace.twin(1))
    assert twin == {"id": 1, "name": "alice", "public_key": ALICE.public_key,
                    "endpoint": "host.example:7000", "db_head": None, "created_ms": T0 + 1_000}
    assert w.entry(keyspace.twin_by_name("alice")) == {"twin": 1}
    assert w.entry(keyspace.twin_by_key(ALICE.public_key)) == {"twin": 1}
    w.ok(w.tx(ALICE, "twin_update", {"db_head": b"\x01" * 40}))
    w.ok(w.tx(ALICE, "twin_update", {"endpoint": "[::1]:7001"}))
    twin = w.entry(keyspace.twin(1))
    assert (twin["endpoint"], twin["db_head"]) == ("[::1]:7001", b"\x01" * 40)
    w.ok(w.tx(ALICE, "twin_update", {"db_head": None}))
    assert w.entry(keyspace.twin(1))["db_head"] is None


def test_farm_node_uptime() -> None:
    w = World()
    w.setup_grid(contract=False)
    assert w.entry(keyspace.farm(1)) == {"id": 1, "owner": 1, "name": "Farm 1", "country": "BE",
                                         "pricing_policy": 1, "created_ms": T0 + 2_000}
    node = w.entry(keyspace.node(1))
    assert node["farm"] == 1
    assert node["capacity"] == CAPACITY
    assert node["used"] == {"cores": 0, "memory": 0, "storage": 0}
    assert node["location"] == {"country": "BE", "city": "Gent"}
    assert node["status"] == "up"
    assert node["last_uptime_ms"] == w.time
    assert w.entry(keyspace.node_by_key(NODE.public_key)) == {"node": 1}
    assert node_status(node, w.time + 20_000, PARAMS["uptime_down_after_ms"]) == "up"
    assert node_status(node, w.time + 20_001, PARAMS["uptime_down_after_ms"]) == "down"
    # Uptime between two reports within uptime_down_after_ms is credited.
    w.ok(w.tx(NODE, "uptime_report", {"time_ms": w.time + 3_000}), dt=3_000)
    assert w.entry(keyspace.node(1))["uptime_ms"] == 3_000
    # A gap longer than that is not.
    w.ok(w.tx(NODE, "uptime_report", {"time_ms": w.time + 25_000}), dt=25_000)
    assert w.entry(keyspace.node(1))["uptime_ms"] == 3_000


def test_node_update_capacity_location_endpoint() -> None:
    w = World()
    w.setup_grid()
    bigger = {"cores": 8, "memory": 16 * GIB, "storage": 200 * GIB}
    w.ok(w.tx(NODE, "node_update", {"capacity": bigger}))
    w.ok(w.tx(NODE, "node_update", {"location": {"country": "NL", "city": ""},
                                    "endpoint": "10.1.1.1:9901"}))
    node = w.entry(keyspace.node(1))
    assert node["capacity"] == bigger
    assert node["location"] == {"country": "NL", "city": ""}
    assert node["endpoint"] == "10.1.1.1:9901"
    assert node["used"]["cores"] == 1


def test_contract_lifecycle() -> None:
    w = World()
    w.setup_grid()
    c = w.entry(keyspace.contract(1))
    assert (c["owner"], c["owner_key"], c["node"], c["farm"], c["kind"]) == (
        2, BOB.public_key, 1, 1, "deployment")
    assert (c["state"], c["version"], c["results"]) == ("created", 1, [])
    assert c["resources"] == {"cpu": 1, "memory": GIB, "disk": GIB}
    verify_deployment(c["owner_key"], CHAIN, c["deployment"], c["deployment_hash"],
                      c["signature"])
    assert w.entry(keyspace.node_contracts(1)) == {"contracts": [1]}
    assert w.entry(keyspace.node(1))["used"] == {"cores": 1, "memory": GIB, "storage": GIB}

    def result(state: str, version: int = 1) -> bytes:
        return w.tx(NODE, "contract_result", {"contract_id": 1, "version": version, "workloads": [
            {"name": "hello", "state": state, "message": "m", "endpoint": "10.0.0.9:8080"}]})

    w.ok(result("ok"))
    assert w.entry(keyspace.contract(1))["state"] == "deployed"
    w.ok(result("error"))
    c = w.entry(keyspace.contract(1))
    assert c["state"] == "error"
    assert c["results"] == [{"name": "hello", "state": "error", "message": "m",
                             "endpoint": "10.0.0.9:8080"}]
    w.ok(result("ok"))
    assert w.entry(keyspace.contract(1))["state"] == "deployed"

    # Update: bigger, re-reserved, version 2, back to created with no results.
    body = w.contract_body(dep=deployment(cpu=3, name="web2"))
    del body["node_id"], body["kind"]
    w.ok(w.tx(BOB, "contract_update", {"contract_id": 1, **body}))
    c = w.entry(keyspace.contract(1))
    assert (c["state"], c["version"], c["results"]) == ("created", 2, [])
    assert w.entry(keyspace.node(1))["used"]["cores"] == 3
    assert w.block(result("ok", version=1))[0].code == "stale_result"
    w.ok(result("ok", version=2))
    assert w.entry(keyspace.contract(1))["state"] == "deployed"

    bob_before = w.balance(BOB)
    w.ok(w.tx(BOB, "contract_cancel", {"contract_id": 1}))
    c = w.entry(keyspace.contract(1))
    assert c["state"] == "cancelled"
    assert w.state.get(keyspace.node_contracts(1)) is None
    assert w.entry(keyspace.node(1))["used"] == {"cores": 0, "memory": 0, "storage": 0}
    assert w.balance(BOB) < bob_before - FEE  # the run-up since the last billing was settled
    # The node may still report the workloads deleted; the contract stays cancelled.
    w.ok(result("deleted", version=2))
    assert w.entry(keyspace.contract(1))["state"] == "cancelled"
    assert_supply(w.state)


def test_namespace_contract() -> None:
    w = World()
    w.setup_grid(contract=False)
    ns = {"name": "ns1", "workloads": [{"name": "shards", "kind": "namespace", "cpu": 0,
                                        "memory": 0, "disk": 10 * GIB}]}
    w.ok(w.tx(BOB, "contract_create", w.contract_body(kind="namespace", dep=ns)))
    assert w.entry(keyspace.contract(1))["kind"] == "namespace"
    assert w.entry(keyspace.node(1))["used"] == {"cores": 0, "memory": 0, "storage": 10 * GIB}
    out = w.block(w.tx(BOB, "contract_create", w.contract_body(kind="namespace")))
    assert out[0].code == "bad_deployment"


def test_contracts_fill_a_node_exactly() -> None:
    w = World()
    w.setup_grid(contract=False)
    txs = [w.tx(BOB, "contract_create", w.contract_body(dep=deployment(name=f"d{i}")))
           for i in range(5)]
    codes = [o.code for o in w.block(*txs)]
    assert codes == ["ok"] * 4 + ["overbooked"]  # 4 cores
    assert w.entry(keyspace.node_contracts(1)) == {"contracts": [1, 2, 3, 4]}
    w.ok(w.tx(BOB, "contract_cancel", {"contract_id": 2}))
    assert w.entry(keyspace.node_contracts(1)) == {"contracts": [1, 3, 4]}
    w.ok(w.tx(BOB, "contract_create", w.contract_body(dep=deployment(name="again"))))
    assert w.entry(keyspace.node_contracts(1)) == {"contracts": [1, 3, 4, 5]}


# ---------------------------------------------------------------------------------------------
# Refusals: each in a block (code, and only txresult + fee/nonce change) and at check_tx.

NO_FEE = {"bad_signature", "bad_nonce", "fee_too_low"}  # refused before the fee is taken

Build = Callable[[World], bytes]


def _signed_by(w: World, signer: KeyPair, claimed: KeyPair, type_: str,
               body: dict[str, Any]) -> bytes:
    nonce = w.state.next_nonce(claimed.public_key)
    good = Tx(type_, claimed.public_key, nonce, FEE, body)
    bad_sig = signer.sign(good.sign_bytes(CHAIN))
    return Tx(type_, claimed.public_key, nonce, FEE, body, bad_sig).encode()


def _too_big(w: World) -> bytes:
    return w.tx(BOB, "contract_create", w.contract_body(dep=deployment(blob="x" * 3_000)))


def _bad_dep_sig(w: World) -> bytes:
    body = w.contract_body()
    body["signature"] = ALICE.sign(b"something else")
    return w.tx(BOB, "contract_create", body)


def _bad_dep_hash(w: World) -> bytes:
    body = w.contract_body()
    body["deployment_hash"] = b"\x00" * 32
    return w.tx(BOB, "contract_create", body)


def _result(key: KeyPair, cid: int = 1, version: int = 1, name: str = "hello") -> Build:
    return lambda w: w.tx(key, "contract_result", {"contract_id": cid, "version": version,
                                                   "workloads": [{"name": name, "state": "ok",
                                                                  "message": "",
                                                                  "endpoint": ""}]})


def _node_register(key: KeyPair, farm: int = 1, **over: Any) -> Build:
    body = {"farm_id": farm, "capacity": CAPACITY, "location": {"country": "BE", "city": "X"},
            "endpoint": "10.0.0.2:1", **over}
    return lambda w: w.tx(key, "node_register", body)


REFUSALS: list[tuple[str, Build, str]] = [
    ("replayed nonce", lambda w: w.tx(ALICE, "transfer", {"to": VAL.public_key, "amount": 1},
                                      nonce=w.state.next_nonce(ALICE.public_key) - 1),
     "bad_nonce"),
    ("skipped nonce", lambda w: w.tx(ALICE, "transfer", {"to": VAL.public_key, "amount": 1},
                                     nonce=w.state.next_nonce(ALICE.public_key) + 1),
     "bad_nonce"),
    ("bad signature", lambda w: _signed_by(w, CAROL, ALICE, "transfer",
                                           {"to": VAL.public_key, "amount": 1}),
     "bad_signature"),
    ("fee too low", lambda w: w.tx(ALICE, "transfer", {"to": VAL.public_key, "amount": 1},
                                   fee=FEE - 1), "fee_too_low"),
    ("cannot pay the fee", lambda w: w.tx(VAL, "transfer", {"to": ALICE.public_key, "amount": 1}),
     "insufficient_funds"),
    ("malformed bytes", lambda w: b"\x93\x01\x02\x03", "malformed"),
    ("transfer over balance",
     lambda w: w.tx(ALICE, "transfer", {"to": VAL.public_key, "amount": RICH}),
     "insufficient_funds"),
    ("zero transfer", lambda w: w.tx(ALICE, "transfer", {"to": VAL.public_key, "amount": 0}),
     "bad_body"),
    ("unknown tx type", lambda w: w.tx(ALICE, "mint_me_money", {}), "unknown_type"),
    ("extra body field",
     lambda w: w.tx(ALICE, "transfer", {"to": VAL.public_key, "amount": 1, "memo": "x"}),
     "bad_body"),
    ("missing body field", lambda w: w.tx(ALICE, "transfer", {"to": VAL.public_key}),
     "bad_body"),
    ("duplicate twin name",
     lambda w: w.tx(CAROL, "twin_register", {"name": "alice", "endpoint": ""}), "name_taken"),
    ("second twin for a key",
     lambda w: w.tx(ALICE, "twin_register", {"name": "alice2", "endpoint": ""}), "twin_exists"),
    ("bad twin name",
     lambda w: w.tx(CAROL, "twin_register", {"name": "Carol!", "endpoint": ""}), "bad_name"),
    ("one-letter twin name",
     lambda w: w.tx(CAROL, "twin_register", {"name": "c", "endpoint": ""}), "bad_name"),
    ("bad endpoint",
     lambda w: w.tx(CAROL, "twin_register", {"name": "carol", "endpoint": "nohost"}),
     "bad_endpoint"),
    ("bad endpoint port",
     lambda w: w.tx(CAROL, "twin_register", {"name": "carol", "endpoint": "h:70000"}),
     "bad_endpoint"),
    ("twin update without twin", lambda w: w.tx(CAROL, "twin_update", {"endpoint": ""}),
     "no_twin"),
    ("empty twin update", lambda w: w.tx(ALICE, "twin_update", {}), "bad_body"),
    ("farm without twin",
     lambda w: w.tx(CAROL, "farm_create", {"name": "f", "country": "BE"}), "no_twin"),
    ("farm bad country",
     lambda w: w.tx(ALICE, "farm_create", {"name": "f", "country": "be"}), "bad_country"),
    ("farm unknown pricing policy",
     lambda w: w.tx(ALICE, "farm_create", {"name": "f", "country": "BE", "pricing_policy": 9}),
     "unknown_pricing_policy"),
    ("node on unknown farm", _node_register(CAROL, farm=7), "unknown_farm"),
    ("node registered twice", _node_register(NODE), "node_exists"),
    ("node negative capacity",
     _node_register(CAROL, capacity={"cores": -1, "memory": 0, "storage": 0}), "bad_body"),
    ("node update below reserved",
     lambda w: w.tx(NODE, "node_update",
                    {"capacity": {"cores": 0, "memory": 8 * GIB, "storage": 100 * GIB}}),
     "below_reserved"),
    ("node update by a non-node", lambda w: w.tx(BOB, "node_update", {"endpoint": ""}),
     "unknown_node"),
    ("uptime by a non-node", lambda w: w.tx(BOB, "uptime_report", {"time_ms": w.time}),
     "unknown_node"),
    ("contract without twin", lambda w: w.tx(CAROL, "contract_create", w.contract_body(
        owner=CAROL)), "no_twin"),
    ("contract on unknown node",
     lambda w: w.tx(BOB, "contract_create", w.contract_body(node_id=9)), "unknown_node"),
    ("overbooking", lambda w: w.tx(BOB, "contract_create", w.contract_body(
        dep=deployment(cpu=4))), "overbooked"),
    ("overbooking memory", lambda w: w.tx(BOB, "contract_create", w.contract_body(
        dep=deployment(memory=8 * GIB))), "overbooked"),
    ("deployment too large", _too_big, "deployment_too_large"),
    ("deployment bad signature", _bad_dep_sig, "bad_deployment_signature"),
    ("deployment bad hash", _bad_dep_hash, "bad_deployment_hash"),
    ("deployment without workloads", lambda w: w.tx(BOB, "contract_create", w.contract_body(
        dep={"name": "x", "workloads": []})), "bad_deployment"),
    ("deployment unknown workload kind", lambda w: w.tx(BOB, "contract_create", w.contract_body(
        dep={"name": "x", "workloads": [{"name": "a", "kind": "vm", "cpu": 1, "memory": 0,
                                         "disk": 0}]})), "bad_deployment"),
    ("deployment duplicate workload", lambda w: w.tx(BOB, "contract_create", w.contract_body(
        dep={"name": "x", "workloads": [deployment()["workloads"][0]] * 2})), "bad_deployment"),
    ("contract bad kind", lambda w: w.tx(BOB, "contract_create", w.contract_body(kind="vm")),
     "bad_body"),
    ("cancel by another twin",
     lambda w: w.tx(ALICE, "contract_cancel", {"contract_id": 1}), "not_owner"),
    ("update by another twin", lambda w: w.tx(ALICE, "contract_update", {
        "contract_id": 1, **{k: v for k, v in w.contract_body(owner=ALICE).items()
                             if k not in ("node_id", "kind")}}), "not_owner"),
    ("cancel unknown contract",
     lambda w: w.tx(BOB, "contract_cancel", {"contract_id": 5}), "unknown_contract"),
    ("result by another node", _result(NODE2), "not_node"),
    ("result by a non-node", _result(BOB), "not_node"),
    ("result stale version", _result(NODE, version=2), "stale_result"),
    ("result unknown workload", _result(NODE, name="nope"), "unknown_workload"),
    ("result unknown contract", _result(NODE, cid=3), "unknown_contract"),
]


def _refusal_world() -> World:
    """The grid of setup_grid plus NODE2 as node 2 (not the node of contract 1)."""
    w = World()
    w.setup_grid()
    w.ok(_node_register(NODE2)(w))
    return w


@pytest.mark.parametrize(("build", "code"), [pytest.param(b, c, id=n) for n, b, c in REFUSALS])
def test_refusal_in_block_changes_only_result_and_fee(build: Build, code: str) -> None:
    w = _refusal_world()
    before = w.state
    raw = build(w)
    outcomes = w.block(raw)
    assert outcomes[0].code == code, outcomes[0].message
    assert outcomes[0].message
    changed = {k for k in set(before.tree.items()) ^ set(w.state.tree.items())}
    changed_keys = {k for k, _ in changed}
    tx_key = keyspace.tx_result(hash_bytes(raw))
    assert w.entry(tx_key) == {"height": w.height, "code": code, "message": outcomes[0].message}
    try:
        tx = Tx.decode(raw)
    except InvalidTx:
        assert changed_keys == {tx_key}
        return
    sender_key = keyspace.account(tx.sender)
    fee_taken = before.balance(tx.sender) - w.state.balance(tx.sender)
    if code in NO_FEE or before.balance(tx.sender) < FEE:
        assert changed_keys == {tx_key}
        assert fee_taken == 0
    else:
        assert changed_keys == {tx_key, sender_key, keyspace.counters()}
        assert fee_taken == FEE
        assert w.state.next_nonce(tx.sender) == tx.nonce + 1
        assert w.state.counters()["burned"] == before.counters()["burned"] + FEE
    assert_supply(w.state)


CHECK_TX_SKIPS = {"malformed"}  # not a Tx at all: refused by Tx.decode


@pytest.mark.parametrize(("build", "code"),
                         [pytest.param(b, c, id=n) for n, b, c in REFUSALS
                          if c not in CHECK_TX_SKIPS])
def test_refusal_at_check_tx(build: Build, code: str) -> None:
    w = _refusal_world()
    root = w.state.root
    tx = Tx.decode(build(w))
    with pytest.raises(InvalidTx) as info:
        w.state.check_tx(tx)
    assert info.value.code == code
    assert w.state.root == root


def test_malformed_is_refused_by_decode() -> None:
    with pytest.raises(InvalidTx, match="malformed"):
        Tx.decode(b"\x93\x01\x02\x03")


def test_clock_drift_refused_in_block_only() -> None:
    w = World()
    w.setup_grid(contract=False)
    drift = PARAMS["max_clock_drift_ms"]
    early = w.tx(NODE, "uptime_report", {"time_ms": w.time + 1_000 - drift - 1})
    w.state.check_tx(Tx.decode(early))  # check_tx has no block time
    assert [o.code for o in w.block(early)] == ["clock_drift"]
    late = w.tx(NODE, "uptime_report", {"time_ms": w.time + 1_000 + drift + 1})
    assert [o.code for o in w.block(late)] == ["clock_drift"]
    edge = w.tx(NODE, "uptime_report", {"time_ms": w.time + 1_000 + drift})
    w.ok(edge)


def test_check_tx_accepts_good_txs_and_sequenced_nonces() -> None:
    w = World()
    w.setup_grid(contract=False)
    tx = Tx.decode(w.tx(BOB, "contract_create", w.contract_body()))
    w.state.check_tx(tx)
    # A tx queued behind a pending one: nonce checked against expected_nonce, no state run.
    later = Tx.decode(w.tx(CAROL, "farm_create", {"name": "f", "country": "BE"}, nonce=1))
    w.state.check_tx(later, expected_nonce=1)
    with pytest.raises(InvalidTx, match="bad_nonce"):
        w.state.check_tx(later, expected_nonce=2)
    with pytest.raises(InvalidTx, match="no_twin"):
        w.state.check_tx(Tx.decode(w.tx(CAROL, "farm_create", {"name": "f", "country": "BE"},
                                        nonce=0)))


def test_check_tx_wrong_chain_is_bad_signature() -> None:
    w = World()
    tx = Tx("transfer", ALICE.public_key, 0, FEE, {"to": BOB.public_key, "amount": 1})
    with pytest.raises(InvalidTx, match="bad_signature"):
        w.state.check_tx(tx.signed(ALICE, "other-chain"))


def test_replay_keeps_first_txresult() -> None:
    w = World()
    raw = w.tx(ALICE, "transfer", {"to": BOB.public_key, "amount": 5})
    w.ok(raw)
    assert [o.code for o in w.block(raw)] == ["bad_nonce"]
    assert w.entry(keyspace.tx_result(hash_bytes(raw))) == {
        "height": 1, "code": "ok", "message": ""}
    assert [o.code for o in w.block(raw, raw)] == ["bad_nonce", "bad_nonce"]


def test_duplicate_in_one_block() -> None:
    w = World()
    raw = w.tx(ALICE, "transfer", {"to": BOB.public_key, "amount": 5})
    assert [o.code for o in w.block(raw, raw)] == ["ok", "bad_nonce"]
    assert w.entry(keyspace.tx_result(hash_bytes(raw)))["code"] == "ok"


def test_failed_tx_consumes_nonce_so_later_ones_stay_in_sequence() -> None:
    w = World()
    bad = w.tx(ALICE, "transfer", {"to": BOB.public_key, "amount": 10 * RICH})
    good = w.tx(ALICE, "transfer", {"to": BOB.public_key, "amount": 1})
    assert [o.code for o in w.block(bad, good)] == ["insufficient_funds", "ok"]
    assert w.balance(ALICE) == RICH - 2 * FEE - 1


# ---------------------------------------------------------------------------------------------
# Billing, grace, minting


def test_billing_pays_farmer_and_burns_share() -> None:
    w = World()
    w.setup_grid()
    created = w.time
    alice0, bob0 = w.balance(ALICE), w.balance(BOB)
    burned0 = w.state.counters()["burned"]
    # Genesis at T0; billing boundaries every 10 s.
    boundary = T0 + 10_000
    assert created < boundary
    w.advance_to(boundary)
    rate = 1 * 1_000 + 1 * 500 + 1 * 10  # 1 core, 1 GiB memory, 1 GiB disk per period
    owed = rate * (boundary - created) // 10_000
    assert w.balance(BOB) == bob0 - owed
    burn = owed * PARAMS["burn_percent"] // 100
    assert w.balance(ALICE) == alice0 + owed - burn
    assert w.state.counters()["burned"] == burned0 + burn
    c = w.entry(keyspace.contract(1))
    assert (c["billed_until_ms"], c["paid"], c["accrued"]) == (boundary, owed, 0)
    assert w.state.counters()["last_billing_ms"] == boundary
    # Several periods at once (a long gap between blocks) are billed in one go.
    w.advance_to(boundary + 35_000)
    assert w.entry(keyspace.contract(1))["paid"] == owed + 3 * rate
    assert w.state.counters()["last_billing_ms"] == boundary + 30_000
    assert_supply(w.state)


def _poor_bob_world() -> World:
    """BOB keeps just enough to register and contract, then goes broke."""
    w = World()
    w.setup_grid()
    w.ok(w.tx(BOB, "transfer", {"to": CAROL.public_key, "amount": w.balance(BOB) - FEE}))
    assert w.balance(BOB) == 0
    return w


def test_unpaid_contract_enters_grace_then_is_restored() -> None:
    w = _poor_bob_world()
    w.advance_to(T0 + 10_000)
    c = w.entry(keyspace.contract(1))
    assert (c["state"], c["resume_state"], c["grace_since_ms"]) == ("grace", "created",
                                                                      T0 + 10_000)
    assert c["accrued"] > 0
    owed = c["accrued"]
    # Results while in grace update the state it resumes to.
    w.ok(w.tx(NODE, "contract_result", {"contract_id": 1, "version": 1, "workloads": [
        {"name": "hello", "state": "ok", "message": "", "endpoint": ""}]}))
    assert w.entry(keyspace.contract(1))["resume_state"] == "deployed"
    w.ok(w.tx(CAROL, "transfer", {"to": BOB.public_key, "amount": 10**6}))
    w.advance_to(T0 + 20_000)
    c = w.entry(keyspace.contract(1))
    assert (c["state"], c["resume_state"], c["grace_since_ms"]) == ("deployed", None, 0)
    assert c["paid"] == owed + 1_510  # the arrears plus one full period
    assert w.balance(BOB) == 10**6 - owed - 1_510
    assert_supply(w.state)


def test_grace_expires_and_cancels() -> None:
    w = _poor_bob_world()
    w.advance_to(T0 + 10_000)
    assert w.entry(keyspace.contract(1))["state"] == "grace"
    w.advance_to(T0 + 30_000)
    assert w.entry(keyspace.contract(1))["state"] == "grace"  # 20 s < 25 s grace period
    w.advance_to(T0 + 40_000)
    c = w.entry(keyspace.contract(1))
    assert (c["state"], c["accrued"]) == ("cancelled", 0)
    assert w.state.get(keyspace.node_contracts(1)) is None
    assert w.entry(keyspace.node(1))["used"] == {"cores": 0, "memory": 0, "storage": 0}
    # A cancelled contract is no longer billed, and cannot be cancelled again.
    w.ok(w.tx(CAROL, "transfer", {"to": BOB.public_key, "amount": 10**6}))
    w.advance_to(T0 + 50_000)
    assert w.balance(BOB) == 10**6
    assert [o.code for o in w.block(w.tx(BOB, "contract_cancel", {"contract_id": 1}))] == [
        "bad_state"]
    assert_supply(w.state)


def test_cancel_in_grace_settles_what_it_can() -> None:
    w = _poor_bob_world()
    w.advance_to(T0 + 10_000)
    w.ok(w.tx(CAROL, "transfer", {"to": BOB.public_key, "amount": FEE + 3}))
    w.ok(w.tx(BOB, "contract_cancel", {"contract_id": 1}))
    assert w.balance(BOB) == 0
    c = w.entry(keyspace.contract(1))
    assert c["state"] == "cancelled"
    assert c["paid"] == 3
    assert_supply(w.state)


def test_update_accrues_old_rate() -> None:
    w = World()
    w.setup_grid()
    created = w.time
    body = w.contract_body(dep=deployment(cpu=2, name="web2"))
    del body["node_id"], body["kind"]
    w.ok(w.tx(BOB, "contract_update", {"contract_id": 1, **body}), dt=2_000)
    updated = w.time
    old_rate, new_rate = 1_510, 2_510
    c = w.entry(keyspace.contract(1))
    assert c["accrued"] == old_rate * (updated - created) // 10_000
    w.advance_to(T0 + 10_000)
    expected = (old_rate * (updated - created) // 10_000
                + new_rate * (T0 + 10_000 - updated) // 10_000)
    assert w.entry(keyspace.contract(1))["paid"] == expected


def test_minting_rewards_uptime_and_capacity() -> None:
    w = World()
    w.setup_grid(contract=False)
    alice0 = w.balance(ALICE)
    first = w.time
    while w.time + 10_000 < T0 + 60_000:
        w.ok(w.tx(NODE, "uptime_report", {"time_ms": w.time + 10_000}), dt=10_000)
    w.advance_to(T0 + 60_000)
    weight = 4 * 100 + 8 * 10 + 100 * 1  # cores, GiB memory, GiB storage per period
    uptime = T0 + 60_000 - first  # up since the first report, still up at the boundary
    reward = weight * uptime // 60_000
    assert reward > 0
    assert w.balance(ALICE) == alice0 + reward
    assert w.state.counters()["minted"] == reward
    node = w.entry(keyspace.node(1))
    assert (node["uptime_ms"], node["status"]) == (0, "up")
    # The next period the node is silent: it goes down and earns nothing.
    w.advance_to(T0 + 120_000)
    assert w.balance(ALICE) == alice0 + reward
    assert w.entry(keyspace.node(1))["status"] == "down"
    assert_supply(w.state)


def test_node_without_reports_gets_nothing() -> None:
    w = World()
    w.ok(w.tx(ALICE, "twin_register", {"name": "alice", "endpoint": ""}))
    w.ok(w.tx(ALICE, "farm_create", {"name": "f", "country": "BE"}))
    w.ok(_node_register(NODE)(w))
    w.advance_to(T0 + 60_000)
    assert w.state.counters()["minted"] == 0


# ---------------------------------------------------------------------------------------------
# Determinism and helpers


def _script(w: World) -> list[list[bytes]]:
    blocks = [
        [w.tx(ALICE, "twin_register", {"name": "alice", "endpoint": ""}),
         w.tx(BOB, "twin_register", {"name": "bob", "endpoint": ""})],
        [w.tx(ALICE, "farm_create", {"name": "f", "country": "BE"})],
        [_node_register(NODE)(w)],
        [w.tx(NODE, "uptime_report", {"time_ms": T0 + 4_000}),
         w.tx(BOB, "contract_create", w.contract_body())],
        [w.tx(ALICE, "transfer", {"to": CAROL.public_key, "amount": 77}),
         w.tx(ALICE, "bogus", {})],
    ]
    return blocks


def test_determinism_two_replays_same_roots() -> None:
    roots = []
    for _ in range(2):
        w = World()
        script_roots = []
        for i, txs in enumerate(_script(w)):
            w.block(*txs, dt=1_000 if i < 4 else 40_000)
            w._queued.clear()
            script_roots.append(w.state.root)
        roots.append(script_roots)
    assert roots[0] == roots[1]
    assert len(set(roots[0])) == len(roots[0])


def test_changes_are_exactly_the_diff() -> None:
    w = World()
    w.setup_grid(contract=False)
    before = w.state
    r = before.apply_block(w.height + 1, w.time + 1_000,
                           [w.tx(BOB, "contract_create", w.contract_body())])
    diff = dict(set(r.state.tree.items()) - set(before.tree.items()))
    assert r.changes == diff  # nothing deleted here
    assert before.tree.update(r.changes).root == r.state.root


def test_decode_entry_and_helpers() -> None:
    w = World()
    w.setup_grid()
    raw = w.state.get(keyspace.contract(1))
    assert raw is not None
    assert decode_entry(keyspace.contract(1), raw)["id"] == 1
    with pytest.raises(MalformedFrame):
        decode_entry(b"nope/1", raw)
    with pytest.raises(MalformedFrame):
        decode_entry(keyspace.contract(1), pack([1, 2]))
    dep = deployment()
    h, sig = sign_deployment(BOB, CHAIN, dep)
    assert h == deployment_hash(dep)
    with pytest.raises(InvalidTx, match="bad_deployment_signature"):
        verify_deployment(ALICE.public_key, CHAIN, dep, h, sig)
    tx = Tx("transfer", ALICE.public_key, 0, 7, {"to": BOB.public_key, "amount": 5})
    assert max_spend(tx) == 12
    assert max_spend(Tx("farm_create", ALICE.public_key, 0, 7, {})) == 7
    assert "transfer" in TX_TYPES
    assert len(TX_TYPES) == 11


def test_update_refusals_and_update_in_grace() -> None:
    w = _poor_bob_world()
    body = w.contract_body(dep=deployment(cpu=5, name="huge"))
    del body["node_id"], body["kind"]
    w.ok(w.tx(CAROL, "transfer", {"to": BOB.public_key, "amount": 10 * FEE}))
    assert [o.code for o in w.block(w.tx(BOB, "contract_update",
                                         {"contract_id": 1, **body}))] == ["overbooked"]
    w.advance_to(T0 + 10_000)
    assert w.entry(keyspace.contract(1))["state"] == "grace"
    body = w.contract_body(dep=deployment(cpu=2, name="other"))
    del body["node_id"], body["kind"]
    w.ok(w.tx(BOB, "contract_update", {"contract_id": 1, **body}))
    c = w.entry(keyspace.contract(1))
    assert (c["state"], c["resume_state"], c["version"]) == ("grace", "created", 2)
    assert w.entry(keyspace.node(1))["used"]["cores"] == 2
    w.ok(w.tx(BOB, "contract_cancel", {"contract_id": 1}))
    w.ok(w.tx(CAROL, "transfer", {"to": BOB.public_key, "amount": 10 * FEE}))
    assert [o.code for o in w.block(w.tx(BOB, "contract_update",
                                         {"contract_id": 1, **body}))] == ["bad_state"]
    assert_supply(w.state)
