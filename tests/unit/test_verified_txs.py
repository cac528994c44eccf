"""The hot path of tx checking: canonical decode, the verified-tx memo shared by the mempool and
block execution, and the mempool's recheck after a block. Each fast path must give the verdicts
of the plain one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import keys
from ledger.codec import hash_bytes
from ledger.errors import InvalidTx, LocalProtocolError
from ledger.keys import KeyPair
from ledger.mempool import Mempool
from ledger.state import _HANDLERS, LedgerState, _Exec, _Overlay
from ledger.tx import Tx, VerifiedTxs, decode_verified
from ledger.types import Genesis, ValidatorSet

CHAIN = "verified-test"
FEE = 10
ALICE, BOB, CAROL, VAL = (KeyPair.from_seed(bytes([0x40 + i]) * 32) for i in range(4))
SENDERS = (ALICE, BOB, CAROL)


def make_state(balance: int = 1_000) -> LedgerState:
    g = Genesis(CHAIN, 0, ValidatorSet.of([VAL.public_key]),
                tuple((k.public_key, balance) for k in SENDERS), (("min_fee", FEE),))
    return LedgerState.from_genesis(g)


def signed(key: KeyPair, nonce: int, type_: str, body: dict[str, Any], *,
           chain: str = CHAIN) -> bytes:
    return Tx(type_, key.public_key, nonce, FEE, body).signed(key, chain).encode()


def transfer(key: KeyPair, nonce: int, amount: int = 1) -> bytes:
    return signed(key, nonce, "transfer", {"to": VAL.public_key, "amount": amount})


def twin(key: KeyPair, nonce: int, name: str) -> bytes:
    return signed(key, nonce, "twin_register", {"name": name, "endpoint": ""})


@pytest.fixture
def count_verifies(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls = [0]
    real = keys.is_valid

    def counting(public_key: bytes, message: bytes, signature: bytes) -> bool:
        calls[0] += 1
        return real(public_key, message, signature)

    monkeypatch.setattr(keys, "is_valid", counting)
    return lambda: calls[0]


# -- decode -------------------------------------------------------------------------------------


def test_decode_refuses_bytes_map_keys_as_malformed() -> None:
    raw = msgpack.packb(["transfer", ALICE.public_key, 0, FEE, {b"to": 1}, b"s" * 64],
                        use_bin_type=True)
    with pytest.raises(InvalidTx) as info:
        Tx.decode(raw)
    assert info.value.code == "malformed"


def test_decode_refuses_unsorted_keys_and_non_minimal_ints() -> None:
    good = Tx.decode(transfer(ALICE, 0))
    fields = [good.type, good.sender, good.nonce, good.fee, good.body, good.signature]
    unsorted = dict(reversed(list(good.body.items())))
    for raw in (msgpack.packb([*fields[:4], unsorted, fields[5]], use_bin_type=True),
                transfer(ALICE, 0).replace(b"\x0a", b"\xcc\x0a", 1)):
        with pytest.raises(InvalidTx) as info:
            Tx.decode(raw)
        assert info.value.code == "malformed"


def test_decode_verified_is_decode_then_verify() -> None:
    raw = transfer(ALICE, 3, amount=5)
    assert decode_verified(raw, CHAIN) == Tx.decode(raw)
    with pytest.raises(InvalidTx) as info:
        decode_verified(transfer(ALICE, 0), "another-chain")
    assert info.value.code == "bad_signature"
    # A body whose canonical form differs from its insertion order is signed canonically.
    raw = signed(ALICE, 0, "transfer", {"amount": 1, "to": VAL.public_key})
    decode_verified(raw, CHAIN)
    Tx.decode(raw).verify(CHAIN)


# -- the memo -----------------------------------------------------------------------------------


def test_memo_is_bounded_oldest_first() -> None:
    memo = VerifiedTxs(CHAIN, max_entries=2)
    raws = [transfer(ALICE, i) for i in range(3)]
    for raw in raws:
        memo.decode(raw, hash_bytes(raw))
    assert len(memo) == 2
    assert memo.get(hash_bytes(raws[0])) is None
    assert memo.get(hash_bytes(raws[2])) == Tx.decode(raws[2])
    memo.discard([hash_bytes(raws[2])])
    assert len(memo) == 1
    with pytest.raises(LocalProtocolError):
        VerifiedTxs(CHAIN, max_entries=0)


def test_memo_does_not_keep_failures(count_verifies: Callable[[], int]) -> None:
    memo = VerifiedTxs(CHAIN)
    forged = signed(BOB, 0, "transfer", {"to": VAL.public_key, "amount": 1}, chain="other")
    for _ in range(2):
        with pytest.raises(InvalidTx):
            memo.decode(forged, hash_bytes(forged))
    assert count_verifies() == 2
    assert len(memo) == 0


def test_one_signature_check_per_tx_from_admission_to_commit(
        count_verifies: Callable[[], int]) -> None:
    s = make_state()
    memo = VerifiedTxs(CHAIN)
    pool = Mempool(verified=memo)
    raws = [transfer(ALICE, 0), transfer(ALICE, 1), transfer(BOB, 0)]
    for raw in raws:
        pool.add(raw, s, CHAIN)
    assert count_verifies() == 3
    block = pool.reap(2, 10**6)
    proposed = s.apply_block(1, 1_000, block, verified=memo)  # proposer
    again = s.apply_block(1, 1_000, block, verified=memo)  # a validator, same memo
    assert count_verifies() == 3
    assert proposed.state.root == again.state.root
    pool.update(block, proposed.state, CHAIN)
    assert memo.get(hash_bytes(raws[0])) is None  # committed txs leave the memo
    assert memo.get(hash_bytes(raws[2])) is not None


def test_memo_of_another_chain_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        make_state().apply_block(1, 1_000, [], verified=VerifiedTxs("other"))
    with pytest.raises(LocalProtocolError):
        Mempool(verified=VerifiedTxs("other")).add(transfer(ALICE, 0), make_state(), CHAIN)


def test_bad_txs_in_a_block_get_the_same_outcomes_with_the_memo() -> None:
    s = make_state()
    forged = Tx.decode(transfer(BOB, 0))
    forged_raw = Tx(forged.type, CAROL.public_key, 0, FEE, forged.body,
                    forged.signature).encode()
    txs = [transfer(ALICE, 0), forged_raw, b"\x01\x02", transfer(ALICE, 0), transfer(ALICE, 1)]
    memo = VerifiedTxs(CHAIN)
    memo.decode(txs[0], hash_bytes(txs[0]))
    plain = s.apply_block(1, 1_000, txs)
    fast = s.apply_block(1, 1_000, txs, verified=memo)
    assert [o.code for o in plain.outcomes] == ["ok", "bad_signature", "malformed", "bad_nonce",
                                                "ok"]
    assert fast.outcomes == plain.outcomes
    assert fast.changes == plain.changes
    assert fast.state.root == plain.state.root


# -- recheck after a block ----------------------------------------------------------------------


def reference_update(pool: Mempool, committed: list[bytes], state: LedgerState) -> list[bytes]:
    """What the mempool holds after a block by the plain rule: every remaining tx rechecked
    with check_tx in arrival order, a failing sender dropped with its later txs."""
    gone = {hash_bytes(r) for r in committed}
    out: list[bytes] = []
    pending: dict[bytes, list[Tx]] = {}
    dropped: set[bytes] = set()
    for h in pool.hashes():
        raw = pool.get(h)
        assert raw is not None
        if h in gone:
            continue
        tx = Tx.decode(raw)
        if tx.sender in dropped:
            continue
        nonce = state.next_nonce(tx.sender)
        if tx.nonce < nonce:
            continue
        mine = pending.setdefault(tx.sender, [])
        try:
            state.check_tx(tx, expected_nonce=nonce + len(mine), verify_signature=False)
            spend = sum(t.fee + int(t.body.get("amount", 0)) for t in [*mine, tx])
            if state.balance(tx.sender) < spend:
                raise InvalidTx("insufficient_funds", "")
        except InvalidTx:
            dropped.add(tx.sender)
            continue
        mine.append(tx)
        out.append(raw)
    return out


_op = st.tuples(st.sampled_from(range(3)), st.sampled_from(["transfer", "twin"]),
                st.sampled_from([1, 150, 300, 450]), st.sampled_from(["ann", "bob", "cy"]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=14), other=st.lists(_op, max_size=5),
       take=st.integers(min_value=0, max_value=14), with_memo=st.booleans())
def test_update_keeps_what_a_full_recheck_keeps(ops: list[tuple[int, str, int, str]],
                                                 other: list[tuple[int, str, int, str]],
                                                 take: int, with_memo: bool) -> None:
    s = make_state()
    pool = Mempool(verified=VerifiedTxs(CHAIN) if with_memo else None)

    def build(op: tuple[int, str, int, str], nonce: int) -> bytes:
        who, kind, amount, name = op
        key = SENDERS[who]
        return transfer(key, nonce, amount) if kind == "transfer" else twin(key, nonce, name)

    for op in ops:
        key = SENDERS[op[0]]
        try:
            pool.add(build(op, pool.pending_nonce(key.public_key, s)), s, CHAIN)
        except InvalidTx:
            pass
    # The block: some of the pool, then txs this validator never saw (they can take names,
    # spend balances, use up nonces).
    block = pool.reap(take, 10**6)
    nonces = {k.public_key: s.next_nonce(k.public_key) for k in SENDERS}
    for raw in block:
        tx = Tx.decode(raw)
        nonces[tx.sender] = tx.nonce + 1
    for op in other:
        sender = SENDERS[op[0]].public_key
        block.append(build(op, nonces[sender]))
        nonces[sender] += 1
    result = s.apply_block(1, 1_000, block)
    expected = reference_update(pool, block, result.state)
    pool.update(block, result.state, CHAIN)
    assert pool.reap(100, 10**6) == expected
    assert pool.size_bytes == sum(map(len, expected))
    for k in SENDERS:
        n = result.state.next_nonce(k.public_key)
        mine = [r for r in expected if Tx.decode(r).sender == k.public_key]
        assert pool.pending_nonce(k.public_key, result.state) == n + len(mine)


# -- check_tx skips executing transfers ---------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(balance=st.integers(0, 2_000), fee=st.integers(FEE, 600), amount=st.integers(1, 1_500),
       to_self=st.booleans(), to_new=st.booleans())
def test_a_transfer_the_balance_covers_never_fails_executing(
        balance: int, fee: int, amount: int, to_self: bool, to_new: bool) -> None:
    """What lets check_tx skip executing a transfer: once the balance covers fee + amount, the
    transfer executes, in check_tx's context and in a block."""
    s = make_state(balance=balance)
    to = ALICE.public_key if to_self else (KeyPair.from_seed(b"\x77" * 32).public_key if to_new
                                           else BOB.public_key)
    raw = Tx("transfer", ALICE.public_key, 0, fee, {"to": to, "amount": amount}).signed(
        ALICE, CHAIN).encode()
    tx = Tx.decode(raw)
    if balance < fee + amount:
        with pytest.raises(InvalidTx) as info:
            s.check_tx(tx)
        assert info.value.code == "insufficient_funds"
        return
    s.check_tx(tx)
    # the execution check_tx skips, done as check_tx would
    c = s.counters()
    ex = _Exec(_Overlay(s.get), s._env, 0, int(c["last_billing_ms"]), check_only=True)
    ex.credit(tx.sender, -tx.fee)
    validate, execute = _HANDLERS["transfer"]
    execute(ex, tx, validate(tx, s._env))
    assert [o.code for o in s.apply_block(1, 1_000, [raw]).outcomes] == ["ok"]
