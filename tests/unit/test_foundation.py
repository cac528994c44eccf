"""Canonical codec, keys, chain types, tx envelope and framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import codec, keys, wire
from ledger.errors import (
    BadSignature,
    ConfigError,
    EncodingError,
    FrameTooLarge,
    InvalidTx,
    MalformedFrame,
    VerificationError,
)
from ledger.tx import MAX_TX_SIZE, Tx
from ledger.types import (
    PRECOMMIT,
    PREVOTE,
    Block,
    Commit,
    Genesis,
    Header,
    ValidatorSet,
    Vote,
    merkle_root,
)

CHAIN = "test-chain"
KEYS = [keys.KeyPair.from_seed(bytes([i]) * 32) for i in range(1, 5)]
VSET = ValidatorSet.of([k.public_key for k in KEYS])

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(values)
def test_pack_round_trips_and_is_canonical(value: object) -> None:
    data = codec.pack(value)
    assert codec.pack(codec.unpack(data)) == data


def test_map_order_does_not_change_encoding() -> None:
    assert codec.pack({"b": 1, "a": 2}) == codec.pack({"a": 2, "b": 1})


@pytest.mark.parametrize("bad", [1.5, {1: "x"}, object(), [2.0]])
def test_pack_refuses_non_canonical_values(bad: object) -> None:
    with pytest.raises(EncodingError):
        codec.pack(bad)


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b"\xcb" + b"\x00" * 8, b""])
def test_unpack_refuses_garbage_and_floats(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        codec.unpack(data)


def test_signing_bytes_bind_domain_and_chain() -> None:
    a = codec.signing_bytes("d1", "c1", [1])
    assert a != codec.signing_bytes("d2", "c1", [1])
    assert a != codec.signing_bytes("d1", "c2", [1])


def test_mnemonic_round_trip_and_bad_checksum() -> None:
    words = keys.new_mnemonic(b"\x07" * 32)
    assert len(words.split()) == 24
    k1 = keys.KeyPair.from_mnemonic(words)
    assert keys.KeyPair.from_mnemonic("  " + words.replace(" ", "  ") + "\n") == k1
    broken = words.split()
    broken[0], broken[1] = broken[1], broken[0]
    if broken != words.split():
        with pytest.raises(ConfigError):
            keys.KeyPair.from_mnemonic(" ".join(broken))
    with pytest.raises(ConfigError):
        keys.KeyPair.from_mnemonic("not a mnemonic at all")
    assert "seed" not in repr(k1)


def test_verify_rejects_forgery() -> None:
    sig = KEYS[0].sign(b"msg")
    keys.verify(KEYS[0].public_key, b"msg", sig)
    with pytest.raises(BadSignature):
        keys.verify(KEYS[1].public_key, b"msg", sig)
    with pytest.raises(BadSignature):
        keys.verify(KEYS[0].public_key, b"msh", sig)
    with pytest.raises(BadSignature):
        keys.verify(b"short", b"msg", sig)


def test_validator_set_thresholds() -> None:
    for n, f, q in [(1, 0, 1), (4, 1, 3), (7, 2, 5), (10, 3, 7)]:
        vs = ValidatorSet.of([bytes([i]) * 32 for i in range(n)])
        assert (vs.f, vs.quorum) == (f, q)
    with pytest.raises(MalformedFrame):
        ValidatorSet(tuple(reversed(VSET.members)))
    with pytest.raises(MalformedFrame):
        ValidatorSet((VSET.members[0], VSET.members[0]))


def _commit(signers: list[keys.KeyPair], block_hash: bytes, chain: str = CHAIN) -> Commit:
    votes = [Vote(PRECOMMIT, 5, 0, block_hash, k.public_key).signed(k, chain) for k in signers]
    return Commit.from_votes(votes)


def test_commit_verification() -> None:
    bh = b"\x11" * 32
    _commit(KEYS[:3], bh).verify(CHAIN, VSET)
    with pytest.raises(VerificationError, match="needs 3"):
        _commit(KEYS[:2], bh).verify(CHAIN, VSET)
    with pytest.raises(VerificationError):
        _commit(KEYS[:3], bh, chain="other").verify(CHAIN, VSET)
    outsider = keys.KeyPair.from_seed(b"\x99" * 32)
    with pytest.raises(VerificationError, match="outside"):
        _commit([*KEYS[:2], outsider], bh).verify(CHAIN, VSET)
    c = _commit(KEYS[:3], bh)
    dup = Commit(c.height, c.round, c.block_hash, (*c.signatures, c.signatures[0]))
    with pytest.raises(VerificationError, match="twice"):
        dup.verify(CHAIN, VSET)
    prevotes = [Vote(PREVOTE, 5, 0, bh, k.public_key).signed(k, CHAIN) for k in KEYS[:3]]
    with pytest.raises(VerificationError):
        Commit.from_votes(prevotes).verify(CHAIN, VSET)


def test_block_wire_round_trip_and_shape() -> None:
    txs = (b"tx1", b"tx2", b"tx3")
    header = Header(CHAIN, 1, 1000, codec.EMPTY_HASH, codec.EMPTY_HASH,
                    merkle_root([codec.hash_bytes(t) for t in txs]), b"\x02" * 32,
                    VSET.hash(), VSET.hash(), KEYS[0].public_key)
    block = Block(header, txs, None)
    block.check_shape()
    again = Block.from_wire(codec.unpack(block.encode()))
    assert again == block
    assert again.hash() == block.hash()
    with pytest.raises(VerificationError):
        Block(header, txs[:2], None).check_shape()


def test_genesis_round_trip() -> None:
    g = Genesis(CHAIN, 5, VSET, ((KEYS[0].public_key, 100),), (("a", 1), ("b", 2)))
    assert Genesis.from_wire(codec.unpack(codec.pack(g.to_wire()))) == g
    assert g.param("b", 0) == 2
    assert g.param("zz", 9) == 9


def test_tx_sign_decode_verify() -> None:
    tx = Tx("transfer", b"", 0, 10, {"to": KEYS[1].public_key, "amount": 5}).signed(KEYS[0], CHAIN)
    raw = tx.encode()
    back = Tx.decode(raw)
    assert back == tx
    back.verify(CHAIN)
    with pytest.raises(InvalidTx) as err:
        back.verify("other-chain")
    assert err.value.code == "bad_signature"
    forged = Tx(tx.type, tx.sender, tx.nonce, tx.fee, {"to": KEYS[1].public_key, "amount": 6},
                tx.signature)
    with pytest.raises(InvalidTx):
        forged.verify(CHAIN)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xc1", "malformed"),
        (codec.pack([1, 2, 3]), "malformed"),
        (codec.pack(["t", b"x" * 32, -1, 0, {}, b"s" * 64]), "malformed"),
        (codec.pack(["t", b"x" * 31, 0, 0, {}, b"s" * 64]), "malformed"),
        (b"\x00" * (MAX_TX_SIZE + 1), "too_large"),
    ],
)
def test_tx_decode_refuses_bad_input(raw: bytes, code: str) -> None:
    with pytest.raises(InvalidTx) as err:
        Tx.decode(raw)
    assert err.value.code == code


def test_frames_split_anywhere() -> None:
    msgs = [{"id": i, "method": "status", "params": {}} for i in range(5)]
    stream = b"".join(wire.encode_frame(m) for m in msgs)
    dec = wire.FrameDecoder()
    got = []
    for i in range(0, len(stream), 3):
        dec.receive_data(stream[i:i + 3])
        while (m := dec.next_message()) is not wire.NEED_DATA:
            got.append(m)
    assert got == msgs


def test_oversized_frame_is_refused_before_body() -> None:
    dec = wire.FrameDecoder(max_frame_size=100)
    with pytest.raises(FrameTooLarge):
        dec.receive_data((101).to_bytes(4, "big"))


def test_malformed_frame_body() -> None:
    dec = wire.FrameDecoder()
    dec.receive_data((1).to_bytes(4, "big") + b"\xc1")
    with pytest.raises(MalformedFrame):
        dec.next_message()
