"""LightState: what a light client accepts and refuses, with real keys and real commits."""

from __future__ import annotations

import dataclasses

import pytest

from ledger.errors import ConflictingHeaders, VerificationError
from ledger.light import LightState
from ledger.types import Block, Commit, Genesis, ValidatorSet
from tests.unit.chainmaker import CHAIN_ID, GENESIS, KEYS, OUTSIDERS, ChainMaker, sign_commit


@pytest.fixture
def chain() -> ChainMaker:
    c = ChainMaker()
    c.append({b"acct/a": b"100", b"acct/b": b"200"}, txs=(b"t1", b"t2"))
    c.append({b"acct/a": b"90"}, txs=(b"t3",))
    c.append({b"acct/b": None})
    return c


def test_verifies_an_honest_chain(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    for h in range(1, chain.height + 1):
        light.verify_block(chain.block(h), chain.commit(h), latest=True)
    assert light.height == 3
    latest = light.latest()
    assert latest is not None
    assert latest.hash() == chain.block(3).hash()


def test_rejects_a_forged_commit_signature(chain: ChainMaker) -> None:
    commit = chain.commit(1)
    (key0, _sig0), *rest = commit.signatures
    forged_sig = KEYS[0].sign(b"something else entirely")
    forged = dataclasses.replace(commit, signatures=((key0, forged_sig), *rest))
    light = LightState(GENESIS)
    with pytest.raises(VerificationError, match="does not verify"):
        light.verify_block(chain.block(1), forged)
    assert light.height == 0


def test_rejects_a_commit_with_signatures_moved_to_another_block(chain: ChainMaker) -> None:
    # Valid signatures for block 1, relabelled as a commit of another block at height 1.
    other = chain.fork(1)
    c1 = chain.commit(1)
    relabelled = Commit(1, 0, other.hash(), c1.signatures)
    with pytest.raises(VerificationError):
        LightState(GENESIS).verify_block(other, relabelled)


def test_rejects_an_insufficient_commit(chain: ChainMaker) -> None:
    two_of_four = sign_commit(chain.block(1).header, KEYS[:2])
    with pytest.raises(VerificationError, match="needs 3 of 4"):
        LightState(GENESIS).verify_block(chain.block(1), two_of_four)


def test_accepts_a_bare_quorum(chain: ChainMaker) -> None:
    three_of_four = sign_commit(chain.block(1).header, KEYS[1:])
    LightState(GENESIS).verify_block(chain.block(1), three_of_four)


def test_rejects_a_commit_by_non_members(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    outsiders = sign_commit(chain.block(1).header, OUTSIDERS)
    with pytest.raises(VerificationError, match="outside the validator set"):
        light.verify_block(chain.block(1), outsiders)
    mixed = sign_commit(chain.block(1).header, [*KEYS[:2], OUTSIDERS[0]])
    with pytest.raises(VerificationError, match="outside the validator set"):
        light.verify_block(chain.block(1), mixed)


def test_rejects_a_chain_run_by_another_validator_set() -> None:
    # Outsiders build a perfectly consistent chain of their own with our chain id.
    theirs = Genesis(CHAIN_ID, GENESIS.genesis_time_ms,
                     ValidatorSet.of([k.public_key for k in OUTSIDERS]), ())
    other = ChainMaker(theirs)
    block = other.make()
    commit = sign_commit(block.header, OUTSIDERS)
    with pytest.raises(VerificationError, match="validator set other than the pinned"):
        LightState(GENESIS).verify_block(block, commit)


def test_rejects_a_wrong_chain_id() -> None:
    c = ChainMaker()
    block = c.make(chain_id="other-chain")
    # Our validators really signed it, for the other chain: still not ours.
    commit = sign_commit(block.header, KEYS)
    with pytest.raises(VerificationError, match="other-chain"):
        LightState(GENESIS).verify_block(block, commit)


def test_rejects_signatures_made_for_another_chain(chain: ChainMaker) -> None:
    # The header claims our chain id but the precommits were signed under another.
    commit = sign_commit(chain.block(1).header, KEYS, chain_id="other-chain")
    with pytest.raises(VerificationError, match="does not verify"):
        LightState(GENESIS).verify_block(chain.block(1), commit)


def test_rejects_a_commit_for_another_height(chain: ChainMaker) -> None:
    with pytest.raises(VerificationError, match="height"):
        LightState(GENESIS).verify_block(chain.block(2), chain.commit(1))


def test_rejects_a_block_whose_body_does_not_match_its_header(chain: ChainMaker) -> None:
    good = chain.block(1)
    tampered = Block(good.header, (b"t1", b"injected"), good.last_commit)
    with pytest.raises(VerificationError, match="txs"):
        LightState(GENESIS).verify_block(tampered, chain.commit(1))


def test_rejects_a_stale_latest_header(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    light.verify_block(chain.block(3), chain.commit(3), latest=True)
    with pytest.raises(VerificationError, match="stale"):
        light.verify_block(chain.block(2), chain.commit(2), latest=True)
    # The same header asked for by height is fine.
    light.verify_block(chain.block(2), chain.commit(2))
    assert light.height == 3
    with pytest.raises(VerificationError, match="stale"):
        light.check_fresh(2)
    light.check_fresh(3)


def test_conflicting_certified_headers_raise_loudly(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    light.verify_block(chain.block(2), chain.commit(2))
    # Byzantine validators (all keys here) certify a second block at height 2.
    evil = chain.fork(2)
    evil_commit = sign_commit(evil.header, KEYS)
    for _ in range(2):  # every time, not just once
        with pytest.raises(ConflictingHeaders, match="height 2"):
            light.verify_block(evil, evil_commit)
    assert light.header(2) == chain.block(2).header


def test_an_uncertified_different_block_is_only_a_bad_peer(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    light.verify_block(chain.block(2), chain.commit(2))
    evil = chain.fork(2)
    weak = sign_commit(evil.header, KEYS[:2])
    with pytest.raises(VerificationError) as info:
        light.verify_block(evil, weak)
    assert not isinstance(info.value, ConflictingHeaders)
    with pytest.raises(VerificationError) as info:
        light.verify_block(evil, chain.commit(2))  # the honest commit, for another block
    assert not isinstance(info.value, ConflictingHeaders)


def test_a_certified_child_of_another_parent_is_a_conflict(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    light.verify_block(chain.block(1), chain.commit(1))
    # A certified fork of the chain from height 1: its block 2 names another parent.
    fork = ChainMaker()
    fork.append({b"x": b"1"}, txs=(b"other",))
    block2, commit2 = fork.append()
    with pytest.raises(ConflictingHeaders, match="descends from"):
        light.verify_block(block2, commit2)
    # And in the other direction: the child known first.
    light2 = LightState(GENESIS)
    light2.verify_block(chain.block(2), chain.commit(2))
    with pytest.raises(ConflictingHeaders):
        light2.verify_block(fork.block(1), fork.commit(1))


def test_linkage_of_consecutive_headers_is_checked_both_ways(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    light.verify_block(chain.block(3), chain.commit(3))
    light.verify_block(chain.block(1), chain.commit(1))
    light.verify_block(chain.block(2), chain.commit(2))
    assert [light.header(h) for h in (1, 2, 3)] == [chain.block(h).header for h in (1, 2, 3)]


def test_state_proofs(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    light.verify_block(chain.block(2), chain.commit(2))
    header = chain.block(2).header
    tree = chain.tree(2)
    light.verify_state(header, b"acct/a", b"90", tree.prove(b"acct/a"))
    light.verify_state(header, b"acct/zz", None, tree.prove(b"acct/zz"))
    with pytest.raises(VerificationError):  # tampered value
        light.verify_state(header, b"acct/a", b"1000000", tree.prove(b"acct/a"))
    with pytest.raises(VerificationError):  # absence claimed for a present key
        light.verify_state(header, b"acct/a", None, tree.prove(b"acct/a"))
    with pytest.raises(VerificationError):  # ... with the proof of some absent key
        light.verify_state(header, b"acct/a", None, tree.prove(b"acct/zz"))
    with pytest.raises(VerificationError):  # a value claimed for an absent key
        light.verify_state(header, b"acct/zz", b"1", tree.prove(b"acct/zz"))
    with pytest.raises(VerificationError):  # an old value, proven in an older state
        light.verify_state(header, b"acct/a", b"100", chain.tree(1).prove(b"acct/a"))


def test_state_proofs_need_a_verified_header(chain: ChainMaker) -> None:
    light = LightState(GENESIS)
    header = chain.block(2).header
    with pytest.raises(VerificationError, match="not been verified"):
        light.verify_state(header, b"acct/a", b"90", chain.tree(2).prove(b"acct/a"))
    # A header with the same height but an invented state root does not pass either.
    light.verify_block(chain.block(2), chain.commit(2))
    fake = dataclasses.replace(header, state_root=chain.tree(1).root)
    with pytest.raises(VerificationError, match="not been verified"):
        light.verify_state(fake, b"acct/a", b"100", chain.tree(1).prove(b"acct/a"))


def test_held_headers_are_bounded(chain: ChainMaker) -> None:
    for _ in range(5):
        chain.append()
    light = LightState(GENESIS, max_headers=3)
    for h in range(1, chain.height + 1):
        light.verify_block(chain.block(h), chain.commit(h))
    assert light.height == 8
    assert [h for h in range(1, 9) if light.header(h) is not None] == [6, 7, 8]
    # Older than everything held: verified, not kept.
    light.verify_block(chain.block(2), chain.commit(2))
    assert light.header(2) is None
    assert light.height == 8
