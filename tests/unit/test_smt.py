"""The sparse Merkle tree against a dict model, its proofs, and its update cost."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.codec import HASH_SIZE, hash_bytes, pack, unpack
from ledger.errors import LocalProtocolError, MalformedFrame, VerificationError
from ledger.smt import EMPTY_ROOT, INNER_TAG, LEAF_TAG, SMT, Proof, verify_proof

# A small key alphabet so that random batches hit the same keys again (updates, deletes of
# present keys) as well as absent ones.
keys_st = st.binary(min_size=0, max_size=2)
values_st = st.binary(min_size=0, max_size=8)
batch_st = st.dictionaries(keys_st, st.none() | values_st, max_size=12)
history_st = st.lists(batch_st, max_size=12)


def apply(model: dict[bytes, bytes], changes: dict[bytes, bytes | None]) -> dict[bytes, bytes]:
    out = dict(model)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def counting_hasher() -> tuple[Callable[[bytes], bytes], list[int]]:
    calls = [0]

    def hasher(data: bytes) -> bytes:
        calls[0] += 1
        return hash_bytes(data)

    return hasher, calls


# ---------------------------------------------------------------------------- the map


def test_empty_tree() -> None:
    t = SMT.empty()
    assert t.root == EMPTY_ROOT == b"\x00" * 32
    assert len(t) == 0
    assert list(t.items()) == []
    assert t.get(b"x") is None
    assert SMT.from_items([]).root == EMPTY_ROOT
    verify_proof(t.root, b"x", None, t.prove(b"x"))


def test_single_entry_root_is_its_leaf_and_deleting_restores_empty() -> None:
    t = SMT.empty().update({b"a": b"1"})
    assert len(t) == 1
    assert t.prove(b"a").siblings == ()
    assert t.update({b"a": None}).root == EMPTY_ROOT


@settings(max_examples=200, deadline=None)
@given(history=history_st, probes=st.lists(keys_st, max_size=10))
def test_matches_dict_model(history: list[dict[bytes, bytes | None]], probes: list[bytes]) -> None:
    tree = SMT.empty()
    model: dict[bytes, bytes] = {}
    versions: list[tuple[SMT, dict[bytes, bytes], bytes]] = [(tree, model, tree.root)]
    for changes in history:
        tree = tree.update(changes)
        model = apply(model, changes)
        versions.append((tree, model, tree.root))
        assert len(tree) == len(model)
        assert dict(tree.items()) == model
        assert len(list(tree.items())) == len(model)
        # The root depends only on the content, never on the history that produced it.
        assert tree.root == SMT.from_items(model.items()).root
        for k in [*model, *changes, *probes]:
            assert tree.get(k) == model.get(k)
    # Every older version is untouched by later updates.
    for old_tree, old_model, old_root in versions:
        assert old_tree.root == old_root
        assert dict(old_tree.items()) == old_model


@settings(max_examples=100, deadline=None)
@given(items=st.dictionaries(keys_st, values_st, max_size=30), seed=st.integers(0, 2**32 - 1))
def test_root_independent_of_insertion_order(items: dict[bytes, bytes], seed: int) -> None:
    order = list(items.items())
    random.Random(seed).shuffle(order)
    one_by_one = SMT.empty()
    for k, v in order:
        one_by_one = one_by_one.update({k: v})
    assert one_by_one.root == SMT.from_items(items.items()).root
    assert one_by_one.root == SMT.empty().update(items).root
    # Insert extra keys and remove them again: same root as never having had them.
    extra = {b"extra-" + k: v for k, v in order[:5]}
    detour = one_by_one.update(extra).update(dict.fromkeys(extra))
    assert detour.root == one_by_one.root


def test_from_items_last_value_wins() -> None:
    t = SMT.from_items([(b"a", b"1"), (b"b", b"2"), (b"a", b"3")])
    assert t.get(b"a") == b"3"
    assert len(t) == 2


def test_update_returns_same_tree_when_nothing_changes() -> None:
    t = SMT.from_items([(b"a", b"1"), (b"b", b"2")])
    assert t.update({}) is t
    assert t.update({b"a": b"1"}) is t
    assert t.update({b"zzz": None}) is t


def test_empty_value_is_present() -> None:
    t = SMT.empty().update({b"k": b""})
    assert t.get(b"k") == b""
    assert b"k" in t
    assert t.root != EMPTY_ROOT
    verify_proof(t.root, b"k", b"", t.prove(b"k"))
    with pytest.raises(VerificationError):
        verify_proof(t.root, b"k", None, t.prove(b"k"))


def test_non_bytes_refused() -> None:
    with pytest.raises(LocalProtocolError):
        SMT.empty().update({"a": b"1"})  # type: ignore[dict-item]
    with pytest.raises(LocalProtocolError):
        SMT.empty().update({b"a": 1})  # type: ignore[dict-item]
    with pytest.raises(LocalProtocolError):
        SMT.from_items([(b"a", "1")])  # type: ignore[list-item]


# ---------------------------------------------------------------------------- proofs


@settings(max_examples=150, deadline=None)
@given(items=st.dictionaries(keys_st, values_st, max_size=40),
       absent=st.lists(st.binary(min_size=3, max_size=4), max_size=10))
def test_every_key_proves_inclusion_and_absent_keys_prove_exclusion(
    items: dict[bytes, bytes], absent: list[bytes]
) -> None:
    tree = SMT.from_items(items.items())
    root = tree.root
    for k, v in items.items():
        proof = tree.prove(k)
        verify_proof(root, k, v, proof)
        with pytest.raises(VerificationError):
            verify_proof(root, k, None, proof)  # present key claimed absent
        with pytest.raises(VerificationError):
            verify_proof(root, k, v + b"!", proof)  # wrong value
    for k in absent:  # longer than keys_st keys, so truly absent
        proof = tree.prove(k)
        verify_proof(root, k, None, proof)
        with pytest.raises(VerificationError):
            verify_proof(root, k, b"", proof)  # absent key claimed present
        with pytest.raises(VerificationError):
            verify_proof(root, k, b"anything", proof)


@settings(max_examples=100, deadline=None)
@given(items=st.dictionaries(keys_st, values_st, min_size=2, max_size=40), data=st.data())
def test_tampered_proofs_fail(items: dict[bytes, bytes], data: st.DataObject) -> None:
    tree = SMT.from_items(items.items())
    root = tree.root
    key = data.draw(st.sampled_from(sorted(items)))
    value = items[key]
    proof = tree.prove(key)
    assert proof.siblings  # two or more entries: the root is an inner node
    # Flip one bit of one sibling.
    i = data.draw(st.integers(0, len(proof.siblings) - 1))
    bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
    sib = bytearray(proof.siblings[i])
    sib[bit // 8] ^= 1 << (bit % 8)
    bad = Proof(proof.siblings[:i] + (bytes(sib),) + proof.siblings[i + 1:], proof.leaf)
    with pytest.raises(VerificationError):
        verify_proof(root, key, value, bad)
    # Drop or add a level.
    with pytest.raises(VerificationError):
        verify_proof(root, key, value, Proof(proof.siblings[1:], proof.leaf))
    with pytest.raises(VerificationError):
        verify_proof(root, key, value, Proof((EMPTY_ROOT, *proof.siblings), proof.leaf))
    # The proof of one key does not serve another key, nor another root.
    other = data.draw(st.sampled_from(sorted(items)))
    if other != key:
        with pytest.raises(VerificationError):
            verify_proof(root, other, items[other], proof)
        with pytest.raises(VerificationError):
            verify_proof(root, other, value, proof)
    with pytest.raises(VerificationError):
        verify_proof(tree.update({key: value + b"x"}).root, key, value, proof)
    # Swap the leaf's value hash for the hash of another value.
    assert proof.leaf is not None
    forged = Proof(proof.siblings, (proof.leaf[0], hash_bytes(value + b"x")))
    with pytest.raises(VerificationError):
        verify_proof(root, key, value + b"x", forged)
    # Claim the key is absent by replacing its leaf with an empty subtree.
    with pytest.raises(VerificationError):
        verify_proof(root, key, None, Proof(proof.siblings, None))


def test_exclusion_proof_refuses_a_leaf_off_the_key_path() -> None:
    # A hand-made, non-canonical root: one leaf placed on the side its path does not lead to.
    # Hash-wise the proof below is consistent with that root; only the path check stops it.
    other = next(b"o%d" % i for i in range(100) if hash_bytes(b"o%d" % i)[0] & 0x80)
    key = next(b"k%d" % i for i in range(100) if not hash_bytes(b"k%d" % i)[0] & 0x80)
    other_path, value_hash = hash_bytes(other), hash_bytes(b"v")
    leaf = hash_bytes(LEAF_TAG + other_path + value_hash)
    root = hash_bytes(INNER_TAG + leaf + EMPTY_ROOT)  # the leaf sits under bit 0
    with pytest.raises(VerificationError, match="not on the key's path"):
        verify_proof(root, key, None, Proof((EMPTY_ROOT,), (other_path, value_hash)))


def test_exclusion_proofs_of_both_kinds_occur() -> None:
    # Two keys whose paths share a first bit leave the other half of the tree empty.
    tree = SMT.from_items((b"k%d" % i, b"v") for i in range(16))
    kinds = set()
    for i in range(500):
        probe = b"p%d" % i
        proof = tree.prove(probe)
        verify_proof(tree.root, probe, None, proof)
        kinds.add(proof.leaf is None)
    assert kinds == {True, False}


# ---------------------------------------------------------------------------- wire form


@settings(max_examples=100, deadline=None)
@given(items=st.dictionaries(keys_st, values_st, max_size=30), key=keys_st)
def test_proof_wire_round_trip(items: dict[bytes, bytes], key: bytes) -> None:
    tree = SMT.from_items(items.items())
    proof = tree.prove(key)
    back = Proof.from_wire(unpack(pack(proof.to_wire())))
    assert back == proof
    verify_proof(tree.root, key, items.get(key), back)


H = b"\x11" * 32


@pytest.mark.parametrize(
    "obj",
    [
        None,
        b"",
        [],
        [[]],
        [[], None, None],
        [None, None],
        [[b"\x11" * 31], None],
        [[b"\x11" * 33], None],
        [["x" * 32], None],
        [[H] * 257, None],
        [[H], b""],
        [[H], [H]],
        [[H], [H, H, H]],
        [[H], [H, b"short"]],
        [[H], [H, 5]],
        {"siblings": [], "leaf": None},
    ],
)
def test_malformed_proof_wire_refused(obj: object) -> None:
    with pytest.raises(MalformedFrame):
        Proof.from_wire(obj)


def test_proof_wire_accepts_256_siblings() -> None:
    assert len(Proof.from_wire([[H] * 256, None]).siblings) == 256


def test_verify_refuses_oversized_and_malformed_proof_objects() -> None:
    with pytest.raises(VerificationError):
        verify_proof(EMPTY_ROOT, b"k", None, Proof((H,) * 257, None))
    with pytest.raises(VerificationError):
        verify_proof(EMPTY_ROOT, b"k", None, Proof((b"short",), None))
    with pytest.raises(VerificationError):
        verify_proof(EMPTY_ROOT, b"k", None, Proof((), (b"short", H)))


# ---------------------------------------------------------------------------- update cost


def test_update_rehashes_only_the_changed_paths() -> None:
    """Count hash computations: an update costs ~ changed keys x depth, never ~ state size."""
    hasher, calls = counting_hasher()
    n = 20_000
    tree = SMT.from_items(((b"key-%d" % i, b"value-%d" % i) for i in range(n)), hasher=hasher)
    assert calls[0] >= n  # the build hashes every entry once...
    depth = tree.depth()
    assert depth <= 64  # ~log2(n) plus a few: the single-leaf subtrees are compressed

    rng = random.Random(7)
    for k in (1, 10, 100):
        changes: dict[bytes, bytes | None] = {}
        for j in range(k):
            kind = j % 3
            if kind == 0:
                changes[b"key-%d" % rng.randrange(n)] = b"changed"
            elif kind == 1:
                changes[b"new-%d-%d" % (k, j)] = b"inserted"
            else:
                changes[b"key-%d" % rng.randrange(n)] = None
        calls[0] = 0
        new = tree.update(changes)
        spent = calls[0]
        bound_depth = max(depth, new.depth())
        # Each changed key rebuilds at most one inner node per level of its path plus its
        # leaf (two hashes: value and leaf).
        assert spent <= len(changes) * (bound_depth + 2), (k, spent, bound_depth)
        assert spent < n // 10
        # ...and the result is the same tree a full rebuild gives.
        model = dict(tree.items())
        model = apply(model, changes)
        assert new.root == SMT.from_items(model.items()).root
        assert tree.update(changes).root == new.root


def test_proof_size_is_logarithmic() -> None:
    tree = SMT.from_items((b"key-%d" % i, b"v") for i in range(4096))
    lengths = [len(tree.prove(b"key-%d" % i).siblings) for i in range(0, 4096, 37)]
    assert max(lengths) <= tree.depth() <= 40
    assert sum(lengths) / len(lengths) < 20  # log2(4096) = 12, plus a little
