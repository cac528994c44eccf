"""The mempool: admission, nonce sequencing, bounds, reaping and recheck after a block."""

from __future__ import annotations

from typing import Any

import pytest

from ledger.codec import hash_bytes
from ledger.errors import InvalidTx, LocalProtocolError
from ledger.keys import KeyPair
from ledger.mempool import Mempool
from ledger.state import LedgerState
from ledger.tx import Tx
from ledger.types import Genesis, ValidatorSet

CHAIN = "mempool-test"
FEE = 10
ALICE, BOB, CAROL, VAL = (KeyPair.from_seed(bytes([i]) * 32) for i in range(1, 5))


def make_state(balance: int = 1_000_000) -> LedgerState:
    g = Genesis(CHAIN, 0, ValidatorSet.of([VAL.public_key]),
                tuple((k.public_key, balance) for k in (ALICE, BOB, CAROL)),
                (("min_fee", FEE),))
    return LedgerState.from_genesis(g)


def transfer(key: KeyPair, nonce: int, amount: int = 1, *, fee: int = FEE,
             to: KeyPair = VAL, **extra: Any) -> bytes:
    body = {"to": to.public_key, "amount": amount, **extra}
    return Tx("transfer", key.public_key, nonce, fee, body).signed(key, CHAIN).encode()


def code_of(pool: Mempool, raw: bytes, state: LedgerState) -> str:
    with pytest.raises(InvalidTx) as info:
        pool.add(raw, state, CHAIN)
    return info.value.code


def test_add_and_reap_in_nonce_order() -> None:
    s = make_state()
    pool = Mempool()
    raws = [transfer(ALICE, 0), transfer(BOB, 0), transfer(ALICE, 1), transfer(ALICE, 2)]
    hashes = [pool.add(r, s, CHAIN) for r in raws]
    assert hashes == [hash_bytes(r) for r in raws]
    assert len(pool) == 4
    assert hashes[0] in pool
    assert pool.get(hashes[1]) == raws[1]
    assert pool.reap(10, 10**6) == raws
    assert pool.reap(2, 10**6) == raws[:2]
    assert pool.pending_nonce(ALICE.public_key, s) == 3
    assert pool.size_bytes == sum(map(len, raws))


def test_refusals() -> None:
    s = make_state()
    pool = Mempool()
    pool.add(transfer(ALICE, 0), s, CHAIN)
    assert code_of(pool, transfer(ALICE, 0), s) == "duplicate"
    assert code_of(pool, transfer(ALICE, 0, amount=2), s) == "bad_nonce"  # nonce pending
    assert code_of(pool, transfer(ALICE, 2), s) == "bad_nonce"  # gap
    assert code_of(pool, transfer(BOB, 0, fee=FEE - 1), s) == "fee_too_low"
    assert code_of(pool, transfer(BOB, 0, memo="x"), s) == "bad_body"
    assert code_of(pool, b"\x01\x02", s) == "malformed"
    assert code_of(pool, b"\x00" * 70_000, s) == "too_large"
    forged = Tx.decode(transfer(BOB, 0))
    forged_raw = Tx(forged.type, CAROL.public_key, 0, FEE, forged.body,
                    forged.signature).encode()
    assert code_of(pool, forged_raw, s) == "bad_signature"
    assert code_of(pool, Tx("mint", BOB.public_key, 0, FEE, {}).signed(BOB, CHAIN).encode(),
                   s) == "unknown_type"
    assert len(pool) == 1


def test_pending_spend_counts_toward_balance() -> None:
    s = make_state(balance=1_000)
    pool = Mempool()
    pool.add(transfer(ALICE, 0, amount=600), s, CHAIN)
    assert code_of(pool, transfer(ALICE, 1, amount=400), s) == "insufficient_funds"
    pool.add(transfer(ALICE, 1, amount=380), s, CHAIN)
    assert code_of(pool, transfer(ALICE, 2, amount=1), s) == "insufficient_funds"


def test_bounds() -> None:
    s = make_state()
    pool = Mempool(max_txs=2)
    pool.add(transfer(ALICE, 0), s, CHAIN)
    pool.add(transfer(BOB, 0), s, CHAIN)
    assert code_of(pool, transfer(CAROL, 0), s) == "mempool_full"
    one = transfer(ALICE, 0)
    small = Mempool(max_bytes=len(one) * 2)
    small.add(one, s, CHAIN)
    small.add(transfer(BOB, 0), s, CHAIN)
    assert code_of(small, transfer(CAROL, 0), s) == "mempool_full"
    with pytest.raises(LocalProtocolError):
        Mempool(max_txs=0)


def test_reap_skips_all_later_txs_of_a_blocked_sender() -> None:
    s = make_state()
    pool = Mempool()
    a0 = Tx("twin_register", ALICE.public_key, 0, FEE,
            {"name": "a" * 32, "endpoint": "h" * 200 + ":1"}).signed(ALICE, CHAIN).encode()
    a1 = transfer(ALICE, 1)
    b0 = transfer(BOB, 0)
    for r in (a0, a1, b0):
        pool.add(r, s, CHAIN)
    assert len(a0) > len(b0) + len(a1)
    assert pool.reap(10, len(b0) + len(a1)) == [b0]


def test_chain_id_mismatch_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Mempool().add(transfer(ALICE, 0), make_state(), "other")


def test_update_drops_included_and_rechecks() -> None:
    s = make_state(balance=1_000)
    pool = Mempool()
    a = [transfer(ALICE, i, amount=100) for i in range(3)]
    b0 = transfer(BOB, 0, amount=100)
    c0 = transfer(CAROL, 0, amount=100)
    for r in (*a, b0, c0):
        pool.add(r, s, CHAIN)
    # The block includes ALICE's first tx and another tx from BOB with the same nonce that
    # drains him: BOB's pending tx is now stale.
    b_other = transfer(BOB, 0, amount=1_000 - FEE)
    result = s.apply_block(1, 1_000, [a[0], b_other])
    assert [o.code for o in result.outcomes] == ["ok", "ok"]
    pool.update([a[0], b_other], result.state, CHAIN)
    assert pool.reap(10, 10**6) == [a[1], a[2], c0]
    assert hash_bytes(b0) not in pool
    # A committed tx resubmitted is a duplicate.
    assert code_of(pool, a[0], result.state) == "duplicate"


def test_update_drops_a_sender_whose_funds_went() -> None:
    s = make_state(balance=1_000)
    pool = Mempool()
    a = [transfer(ALICE, i, amount=300) for i in range(3)]
    for r in a:
        pool.add(r, s, CHAIN)
    # ALICE's funds went elsewhere (a tx this validator never saw, nonce 0): the pending
    # nonce-0 tx is stale and the rest are out of sequence or unaffordable.
    drain = transfer(ALICE, 0, amount=1_000 - FEE, to=BOB)
    result = s.apply_block(1, 1_000, [drain])
    pool.update([drain], result.state, CHAIN)
    assert len(pool) == 0
    assert pool.size_bytes == 0


def test_update_keeps_sequence_after_partial_inclusion() -> None:
    s = make_state()
    pool = Mempool()
    a = [transfer(ALICE, i) for i in range(4)]
    for r in a:
        pool.add(r, s, CHAIN)
    result = s.apply_block(1, 1_000, a[:2])
    pool.update(a[:2], result.state, CHAIN)
    assert pool.reap(10, 10**6) == a[2:]
    assert pool.pending_nonce(ALICE.public_key, result.state) == 4
    pool.add(transfer(ALICE, 4), result.state, CHAIN)
    assert len(pool) == 3


def test_stale_nonce_is_refused() -> None:
    s = make_state()
    first = transfer(ALICE, 0)
    s = s.apply_block(1, 1_000, [first]).state
    pool = Mempool()
    assert code_of(pool, transfer(ALICE, 0, amount=7), s) == "bad_nonce"
    assert code_of(pool, first, s) == "duplicate"
    pool.add(transfer(ALICE, 1), s, CHAIN)
