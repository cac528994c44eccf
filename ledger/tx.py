"""Signed transactions: the envelope every state change travels in.

A transaction is ``[type, sender, nonce, fee, body, signature]`` where ``body`` is a
str-keyed map whose schema depends on ``type`` (checked by the state machine). The signature
covers ``[type, sender, nonce, fee, body]`` under the ``tfgrid/tx/v1`` domain and the chain id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger import keys
from ledger.codec import hash_bytes, pack, signing_bytes, unpack
from ledger.errors import InvalidTx, MalformedFrame

DOMAIN_TX = "tfgrid/tx/v1"
MAX_TX_SIZE = 64 * 1024


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
        """Parse an encoded transaction. Raises :class:`InvalidTx` ("malformed"/"too_large")."""
        if len(data) > MAX_TX_SIZE:
            raise InvalidTx("too_large", f"transaction is {len(data)} bytes, limit {MAX_TX_SIZE}")
        try:
            f = unpack(data, max_size=MAX_TX_SIZE)
        except MalformedFrame as exc:
            raise InvalidTx("malformed", str(exc)) from exc
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
        tx = cls(type_, sender, nonce, fee, body, sig)
        if pack([type_, sender, nonce, fee, body, sig]) != data:
            raise InvalidTx("malformed", "transaction is not canonically encoded")
        return tx

    def verify(self, chain_id: str) -> None:
        """Raises :class:`InvalidTx` with code ``bad_signature``."""
        if not keys.is_valid(self.sender, self.sign_bytes(chain_id), self.signature):
            raise InvalidTx("bad_signature", "transaction signature does not verify")
