"""Signed transactions: the envelope every state change travels in.

A transaction is ``[type, sender, nonce, fee, body, signature]`` where ``body`` is a
str-keyed map whose schema depends on ``type`` (checked by the state machine). The signature
covers ``[type, sender, nonce, fee, body]`` under the ``tfgrid/tx/v1`` domain and the chain id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from ledger import keys
from ledger.codec import hash_bytes, pack, signing_bytes
from ledger.errors import InvalidTx, LocalProtocolError

DOMAIN_TX = "tfgrid/tx/v1"
MAX_TX_SIZE = 64 * 1024
_MAX_DEPTH = 32  # the nesting limit of ledger.codec, counted from the tx list


@dataclass(frozen=True, slots=True)
class Tx:
    type: str
    sender: bytes
    nonce: int
    fee: int
    body: dict[str, Any]
    signature: bytes = b""

    def sign_bytes(self, chain_id: str) -> bytes:
        return signing_bytes(DOMAIN_TX, chain_id,
                             [self.type, self.sender, self.nonce, self.fee, self.body])

    def signed(self, key: keys.KeyPair, chain_id: str) -> Tx:
        unsigned = Tx(self.type, key.public_key, self.nonce, self.fee, self.body)
        return Tx(self.type, key.public_key, self.nonce, self.fee, self.body,
                  key.sign(unsigned.sign_bytes(chain_id)))

    def encode(self) -> bytes:
        return pack([self.type, self.sender, self.nonce, self.fee, self.body, self.signature])

    def hash(self) -> bytes:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> Tx:
        """Parse an encoded transaction. Raises :class:`InvalidTx` ("malformed"/"too_large").

        Only the canonical encoding (:func:`ledger.codec.pack` of the six fields) is accepted,
        so a tx has exactly one byte string and one hash.
        """
        if len(data) > MAX_TX_SIZE:
            raise InvalidTx("too_large", f"transaction is {len(data)} bytes, limit {MAX_TX_SIZE}")
        try:
            f = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                                max_bin_len=MAX_TX_SIZE, max_str_len=MAX_TX_SIZE,
                                max_array_len=MAX_TX_SIZE, max_map_len=MAX_TX_SIZE,
                                max_ext_len=0)
        except Exception as exc:  # msgpack raises a zoo of types on garbage
            raise InvalidTx("malformed", f"not valid msgpack: {exc.__class__.__name__}") from exc
        if not (isinstance(f, list) and len(f) == 6):
            raise InvalidTx("malformed", "a transaction is a list of 6 fields")
        type_, sender, nonce, fee, body, sig = f
        if not isinstance(type_, str) or not type_:
            raise InvalidTx("malformed", "transaction type must be a string")
        if not isinstance(sender, bytes) or len(sender) != keys.PUBLIC_KEY_SIZE:
            raise InvalidTx("malformed", "sender must be a 32-byte public key")
        for name, v in (("nonce", nonce), ("fee", fee)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 2**63:
                raise InvalidTx("malformed", f"{name} must be a non-negative integer")
        if not isinstance(body, dict):
            raise InvalidTx("malformed", "body must be a map")
        if not isinstance(sig, bytes) or len(sig) != keys.SIGNATURE_SIZE:
            raise InvalidTx("malformed", "signature must be 64 bytes")
        # The same verdict as comparing with codec.pack(f), at a fraction of its cost: pack
        # sorts map keys and refuses non-str keys and floats; with those checked here, the
        # plain msgpack encoding of the decoded fields is the canonical one.
        _check_canonical(body, 1)
        if msgpack.packb(f, use_bin_type=True) != data:
            raise InvalidTx("malformed", "transaction is not canonically encoded")
        return cls(type_, sender, nonce, fee, body, sig)

    def verify(self, chain_id: str) -> None:
        """Raises :class:`InvalidTx` with code ``bad_signature``."""
        if not keys.is_valid(self.sender, self.sign_bytes(chain_id), self.signature):
            raise InvalidTx("bad_signature", "transaction signature does not verify")


def _check_canonical(value: Any, depth: int) -> None:
    """Raises :class:`InvalidTx` ``malformed`` unless ``value`` (decoded msgpack) is in the
    canonical form of :func:`ledger.codec.pack`: str map keys in sorted order, no floats,
    nesting within the codec's limit."""
    if isinstance(value, dict | list) and value and depth >= _MAX_DEPTH:
        raise InvalidTx("malformed", "transaction nested too deeply")  # its items are deeper
    if isinstance(value, dict):
        prev: str | None = None
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidTx("malformed", "map keys must be strings")
            if prev is not None and k <= prev:
                raise InvalidTx("malformed", "transaction is not canonically encoded")
            prev = k
            if isinstance(v, dict | list | float):
                _check_canonical(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict | list | float):
                _check_canonical(v, depth + 1)
    elif isinstance(value, float):
        raise InvalidTx("malformed", "floats are not allowed")


def decode_verified(data: bytes, chain_id: str) -> Tx:
    """:meth:`Tx.decode` then :meth:`Tx.verify` under ``chain_id``.

    Raises :class:`InvalidTx` (``malformed``, ``too_large``, ``bad_signature``).
    """
    tx = Tx.decode(data)
    verify_decoded(tx, chain_id)
    return tx


def verify_decoded(tx: Tx, chain_id: str) -> None:
    """:meth:`Tx.verify` for a tx returned by :meth:`Tx.decode`. Raises :class:`InvalidTx`
    ``bad_signature``."""
    # A decoded tx is canonical, so msgpack of its fields is exactly Tx.sign_bytes (which
    # would canonicalise the body again first).
    msg = msgpack.packb([DOMAIN_TX, chain_id, [tx.type, tx.sender, tx.nonce, tx.fee, tx.body]],
                        use_bin_type=True)
    if not keys.is_valid(tx.sender, msg, tx.signature):
        raise InvalidTx("bad_signature", "transaction signature does not verify")


class VerifiedTxs:
    """A bounded memo of transactions whose exact bytes decoded and verified under one chain id.

    Keyed by the tx hash, which covers the signature and the signed fields: bytes with this
    hash decode to this tx and verify, so neither needs doing again. The mempool fills it at
    admission and block execution reads it, so each validator checks a tx's signature once
    rather than at admission, proposal or validation, and commit. Oldest entries go first
    when it is full (a later lookup just decodes and verifies again).
    """

    def __init__(self, chain_id: str, *, max_entries: int = 50_000) -> None:
        if max_entries <= 0:
            raise LocalProtocolError("max_entries must be positive")
        self.chain_id = chain_id
        self.max_entries = max_entries
        self._txs: dict[bytes, Tx] = {}

    def __len__(self) -> int:
        return len(self._txs)

    def get(self, tx_hash: bytes) -> Tx | None:
        return self._txs.get(tx_hash)

    def add(self, tx_hash: bytes, tx: Tx) -> None:
        """Remember ``tx``; the caller decoded it from bytes hashing to ``tx_hash`` and
        verified its signature under :attr:`chain_id`."""
        if tx_hash in self._txs:
            return
        if len(self._txs) >= self.max_entries:
            del self._txs[next(iter(self._txs))]
        self._txs[tx_hash] = tx

    def decode(self, raw: bytes, tx_hash: bytes) -> Tx:
        """The verified tx of ``raw`` (whose hash is ``tx_hash``), from memory or checked now.

        Raises :class:`InvalidTx` like :func:`decode_verified`.
        """
        tx = self._txs.get(tx_hash)
        if tx is None:
            tx = decode_verified(raw, self.chain_id)
            self.add(tx_hash, tx)
        return tx

    def discard(self, tx_hashes: Iterable[bytes]) -> None:
        for h in tx_hashes:
            self._txs.pop(h, None)
