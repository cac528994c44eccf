"""ed25519 identities: keys from BIP39 mnemonics, signing and verification.

An address is the 32-byte ed25519 public key; people see it as lowercase hex.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing
from mnemonic import Mnemonic

from ledger.errors import BadSignature, ConfigError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_SEED_DOMAIN = b"tfgrid/ed25519-seed/v1"

_bip39 = Mnemonic("english")


def new_mnemonic(entropy: bytes) -> str:
    """A 24-word BIP39 mnemonic for 32 bytes of ``entropy`` (randomness is passed in)."""
    if len(entropy) != 32:
        raise ConfigError("mnemonic entropy must be 32 bytes")
    return str(_bip39.to_mnemonic(entropy))


def seed_from_mnemonic(words: str, passphrase: str = "") -> bytes:
    """The 32-byte ed25519 seed of a BIP39 mnemonic.

    Raises :class:`ConfigError` if the words or their checksum are wrong.
    """
    normalized = " ".join(words.split())
    if not _bip39.check(normalized):
        raise ConfigError("not a valid BIP39 mnemonic (unknown word or bad checksum)")
    bip39_seed = Mnemonic.to_seed(normalized, passphrase)
    return hashlib.blake2b(bip39_seed, digest_size=32, key=_SEED_DOMAIN).digest()


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An ed25519 signing key and its public key (the address)."""

    seed: bytes
    public_key: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        if len(seed) != 32:
            raise ConfigError("an ed25519 seed is 32 bytes")
        sk = nacl.signing.SigningKey(seed)
        return cls(seed=seed, public_key=bytes(sk.verify_key))

    @classmethod
    def from_mnemonic(cls, words: str) -> KeyPair:
        return cls.from_seed(seed_from_mnemonic(words))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of ``message``."""
        return bytes(nacl.signing.SigningKey(self.seed).sign(message).signature)

    @property
    def address(self) -> str:
        return self.public_key.hex()

    def __repr__(self) -> str:  # never print the seed
        return f"KeyPair(public_key={self.public_key.hex()})"


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check a detached ed25519 signature. Raises :class:`BadSignature` if it does not verify."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise BadSignature("malformed key or signature length")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise BadSignature("signature does not verify") from exc


def is_valid(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if the signature verifies; never raises."""
    try:
        verify(public_key, message, signature)
    except BadSignature:
        return False
    return True


def parse_address(text: str) -> bytes:
    """Parse a hex address typed by a person. Raises :class:`ConfigError` on bad input."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ConfigError(f"address {text!r} is not hex") from exc
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ConfigError(f"address {text!r} must be {PUBLIC_KEY_SIZE} bytes of hex")
    return raw
