"""Properties of the state machine over random op sequences across many blocks.

Random transfers, contract creation/update/cancellation, node results and uptime reports,
drains and top-ups, with block time advancing by random steps across billing, grace and
minting boundaries. After every block: the supply invariant, no negative balance, node
reservations equal to their live contracts and within capacity, node contract lists in sync
with contract states. Replaying the same blocks (from genesis, or from a reloaded state) gives
the same roots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import keyspace
from ledger.keys import KeyPair
from ledger.state import GIB, LedgerState, decode_entry, sign_deployment
from ledger.tx import Tx
from ledger.types import Genesis, ValidatorSet

CHAIN = "props"
T0 = 5_000
FEE = 10
PARAMS = {
    "min_fee": FEE, "billing_period_ms": 10_000, "grace_period_ms": 25_000,
    "minting_period_ms": 30_000, "price_per_core": 1_000, "price_per_gib_memory": 300,
    "price_per_gib_storage": 7, "burn_percent": 35, "mint_per_core": 70,
    "mint_per_gib_memory": 9, "mint_per_gib_storage": 1, "max_clock_drift_ms": 3_000,
    "uptime_down_after_ms": 15_000, "max_deployment_size": 4_096,
}


def kp(i: int) -> KeyPair:
    return KeyPair.from_seed(bytes([i]) * 32)


USERS = [kp(i) for i in range(1, 5)]  # twins that buy capacity
FARMER = kp(10)
BANK = kp(11)  # tops users up
NODES = [kp(i) for i in range(20, 23)]
VAL = kp(30)
CAPACITY = {"cores": 4, "memory": 8 * GIB, "storage": 100 * GIB}

GENESIS = Genesis(
    CHAIN, T0, ValidatorSet.of([VAL.public_key]),
    tuple(sorted([(u.public_key, 30_000) for u in USERS] + [(FARMER.public_key, 10**6),
                 (BANK.public_key, 10**12)] + [(n.public_key, 10**6) for n in NODES])),
    tuple(sorted(PARAMS.items())))


@dataclass(frozen=True)
class Op:
    kind: str
    a: int = 0
    b: int = 0
    c: int = 0
    flag: bool = True


ops = st.one_of(
    st.builds(Op, st.just("transfer"), st.integers(0, 3), st.integers(0, 3),
              st.integers(0, 40_000)),
    st.builds(Op, st.just("create"), st.integers(0, 3), st.integers(1, 4), st.integers(0, 7)),
    st.builds(Op, st.just("update"), st.integers(0, 3), st.integers(1, 8), st.integers(0, 7),
              st.booleans()),
    st.builds(Op, st.just("cancel"), st.integers(0, 3), st.integers(1, 8), flag=st.booleans()),
    st.builds(Op, st.just("result"), st.integers(0, 2), st.integers(1, 8), st.integers(0, 2),
              st.booleans()),
    st.builds(Op, st.just("uptime"), st.integers(0, 2), st.integers(-4_000, 4_000)),
    st.builds(Op, st.just("drain"), st.integers(0, 3)),
    st.builds(Op, st.just("fund"), st.integers(0, 3), st.integers(1, 50_000)),
)
blocks = st.lists(st.tuples(st.integers(1, 40_000), st.lists(ops, max_size=6)),
                  min_size=1, max_size=20)


def _deployment(size: int, name: str) -> dict[str, Any]:
    cpu, mem, disk = size % 3, (size // 3) % 3, size % 5
    return {"name": name, "workloads": [
        {"name": "w", "kind": "container", "cpu": cpu, "memory": mem * 2 * GIB,
         "disk": disk * 20 * GIB}]}


class Builder:
    """Turns ops into signed txs against the current state, tracking nonces in a block."""

    def __init__(self, state: LedgerState) -> None:
        self.state = state
        self.queued: dict[bytes, int] = {}
        self.serial = 0

    def tx(self, key: KeyPair, type_: str, body: dict[str, Any]) -> bytes:
        n = self.state.next_nonce(key.public_key) + self.queued.get(key.public_key, 0)
        self.queued[key.public_key] = self.queued.get(key.public_key, 0) + 1
        return Tx(type_, key.public_key, n, FEE, body).signed(key, CHAIN).encode()

    def contract(self, cid: int) -> dict[str, Any] | None:
        return self.state.get_entry(keyspace.contract(cid))

    def build(self, op: Op, time_ms: int) -> bytes | None:
        self.serial += 1
        if op.kind == "transfer":
            return self.tx(USERS[op.a], "transfer", {"to": USERS[op.b].public_key,
                                                     "amount": op.c})
        if op.kind == "create":
            owner = USERS[op.a]
            dep = _deployment(op.c, f"d{self.serial}")
            h, sig = sign_deployment(owner, CHAIN, dep)
            return self.tx(owner, "contract_create", {
                "node_id": op.b, "kind": "deployment", "deployment": dep,
                "deployment_hash": h, "signature": sig})
        if op.kind in ("update", "cancel"):
            c = self.contract(op.b)
            owner = USERS[op.a]
            if op.flag and c is not None:
                owner = next((u for u in USERS if u.public_key == c["owner_key"]), owner)
            if op.kind == "cancel":
                return self.tx(owner, "contract_cancel", {"contract_id": op.b})
            dep = _deployment(op.c, f"u{self.serial}")
            h, sig = sign_deployment(owner, CHAIN, dep)
            return self.tx(owner, "contract_update", {
                "contract_id": op.b, "deployment": dep, "deployment_hash": h, "signature": sig})
        if op.kind == "result":
            c = self.contract(op.b)
            node = NODES[op.a]
            version = 1
            if op.flag and c is not None:
                node = NODES[int(c["node"]) - 1]
                version = int(c["version"])
            state = ("ok", "error", "deleted")[op.c]
            return self.tx(node, "contract_result", {
                "contract_id": op.b, "version": version,
                "workloads": [{"name": "w", "state": state, "message": "", "endpoint": ""}]})
        if op.kind == "uptime":
            return self.tx(NODES[op.a], "uptime_report", {"time_ms": max(0, time_ms + op.b)})
        if op.kind == "drain":
            user = USERS[op.a]
            amount = self.state.balance(user.public_key) - FEE * 3
            if amount <= 0:
                return None
            return self.tx(user, "transfer", {"to": BANK.public_key, "amount": amount})
        if op.kind == "fund":
            return self.tx(BANK, "transfer", {"to": USERS[op.a].public_key, "amount": op.b})
        raise AssertionError(op.kind)


def setup_blocks() -> list[tuple[int, list[bytes]]]:
    s = LedgerState.from_genesis(GENESIS)
    b = Builder(s)
    first = [b.tx(FARMER, "twin_register", {"name": "farmer", "endpoint": ""})]
    first += [b.tx(u, "twin_register", {"name": f"user{i}", "endpoint": ""})
              for i, u in enumerate(USERS)]
    r = s.apply_block(1, T0 + 100, first)
    assert {o.code for o in r.outcomes} == {"ok"}
    b = Builder(r.state)
    second = [b.tx(FARMER, "farm_create", {"name": "farm", "country": "EG"})]
    r = r.state.apply_block(2, T0 + 200, second)
    b = Builder(r.state)
    third = [b.tx(n, "node_register", {
        "farm_id": 1, "capacity": CAPACITY, "location": {"country": "EG", "city": "Cairo"},
        "endpoint": ""}) for n in NODES]
    r3 = r.state.apply_block(3, T0 + 300, third)
    assert {o.code for o in r3.outcomes} == {"ok"}
    return [(T0 + 100, first), (T0 + 200, second), (T0 + 300, third)]


SETUP = setup_blocks()


def check_invariants(s: LedgerState) -> None:
    entries = {k: decode_entry(k, v) for k, v in s.tree.items()}
    balances = [e["balance"] for k, e in entries.items() if k.startswith(b"acct/")]
    assert min(balances) >= 0
    c = s.counters()
    assert sum(balances) == c["supply"]
    assert sum(balances) + c["burned"] == c["genesis_supply"] + c["minted"]
    contracts = {e["id"]: e for k, e in entries.items() if k.startswith(b"contract/")}
    assert len(contracts) == c["next_contract_id"] - 1
    for nid in range(1, c["next_node_id"]):
        node = entries[keyspace.node(nid)]
        listed = entries.get(keyspace.node_contracts(nid), {"contracts": []})["contracts"]
        live = sorted(i for i, e in contracts.items()
                      if e["node"] == nid and e["state"] != "cancelled")
        assert listed == live
        used = {"cores": 0, "memory": 0, "storage": 0}
        for i in live:
            r = contracts[i]["resources"]
            used["cores"] += r["cpu"]
            used["memory"] += r["memory"]
            used["storage"] += r["disk"]
        assert node["used"] == used
        assert all(used[k] <= node["capacity"][k] for k in used)
    for e in contracts.values():
        assert e["state"] in ("created", "deployed", "error", "grace", "cancelled")
        assert (e["state"] == "grace") == (e["grace_since_ms"] > 0)
        assert (e["state"] == "grace") == (e["resume_state"] is not None)
        assert e["accrued"] >= 0


Applied = list[tuple[int, list[bytes]]]


def run(script: list[tuple[int, list[Op]]]) -> tuple[list[bytes], Applied, LedgerState]:
    """Build and apply the blocks; returns the roots, the blocks as applied, the last state."""
    s = LedgerState.from_genesis(GENESIS)
    applied: Applied = []
    roots = []
    for h, (t, txs) in enumerate(SETUP, start=1):
        s = s.apply_block(h, t, txs).state
    t = SETUP[-1][0]
    for dt, block_ops in script:
        t += dt
        b = Builder(s)
        txs = [raw for raw in (b.build(op, t) for op in block_ops) if raw is not None]
        result = s.apply_block(len(SETUP) + len(applied) + 1, t, txs)
        assert len(result.outcomes) == len(txs)
        assert s.tree.update(result.changes).root == result.state.root
        s = result.state
        check_invariants(s)
        applied.append((t, txs))
        roots.append(s.root)
    return roots, applied, s


def replay(applied: Applied, reload_at: int) -> list[bytes]:
    s = LedgerState.from_genesis(GENESIS)
    for h, (t, txs) in enumerate(SETUP, start=1):
        s = s.apply_block(h, t, txs).state
    roots = []
    for i, (t, txs) in enumerate(applied):
        if i == reload_at:
            s = LedgerState.from_items(GENESIS, list(s.tree.items()))
        s = s.apply_block(len(SETUP) + i + 1, t, txs).state
        roots.append(s.root)
    return roots


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=blocks, reload_at=st.integers(0, 20))
def test_invariants_and_determinism(script: list[tuple[int, list[Op]]], reload_at: int) -> None:
    roots, applied, _ = run(script)
    assert replay(applied, reload_at) == roots


def test_long_run_reaches_grace_cancellation_and_minting() -> None:
    """A fixed scenario long enough to exercise every economic path at least once."""
    script: list[tuple[int, list[Op]]] = []
    script.append((1_000, [Op("create", 0, 1, 4), Op("create", 1, 2, 4), Op("uptime", 0, 0),
                           Op("uptime", 1, 0), Op("fund", 1, 100_000)]))
    for i in range(30):
        step = [Op("uptime", 0, 0), Op("uptime", 1, 0)]
        if i == 2:  # block time 21_300: no billing boundary, so the drain amount is exact
            step.append(Op("drain", 0))
        script.append((5_000, step))
    roots, applied, s2 = run(script)
    assert replay(applied, 10) == roots
    c = s2.counters()
    assert c["minted"] > 0
    assert c["burned"] > 0
    drained = s2.get_entry(keyspace.contract(1))
    paying = s2.get_entry(keyspace.contract(2))
    assert drained is not None
    assert paying is not None
    assert drained["state"] == "cancelled"  # went to grace, then past the grace period
    assert paying["state"] == "created"
    assert paying["paid"] > 0
