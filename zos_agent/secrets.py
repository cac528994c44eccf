"""Secret env values sealed to one node's key, so the public ledger only ever holds ciphertext.

A deployment's ``secret_env`` maps a variable name to a sealed value: an anonymous
``crypto_box_seal`` (X25519 + XSalsa20-Poly1305, libsodium's sealed box) to the node's
curve25519 public key, which is derived from its ed25519 node key (the address registered on
the ledger). Anyone who knows the node's address can seal; only the node can open.

The value is not bound to its variable name inside the box: the owner's signature covers the
whole deployment, so nobody but the owner can move a ciphertext to another variable.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.public
import nacl.signing

from ledger import keys
from ledger.keys import KeyPair
from zos_agent.errors import AgentError

MAX_SECRET_VALUE = 8192
# A sealed box adds an ephemeral public key (32) and a MAC (16).
SEAL_OVERHEAD = 48


class SecretError(AgentError):
    """A secret cannot be sealed (bad node key, value too long) or opened (not sealed to this
    node, or tampered with)."""


def _curve_public(node_public_key: bytes) -> nacl.public.PublicKey:
    if len(node_public_key) != keys.PUBLIC_KEY_SIZE:
        raise SecretError("a node public key is 32 bytes")
    try:
        return nacl.signing.VerifyKey(node_public_key).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise SecretError(f"not an ed25519 node key: {exc}") from None


def seal_secret(node_public_key: bytes, value: bytes) -> bytes:
    """Seal ``value`` to the node whose ed25519 address is ``node_public_key``.

    Raises :class:`SecretError` for a malformed key or a value above ``MAX_SECRET_VALUE``.
    """
    if len(value) > MAX_SECRET_VALUE:
        raise SecretError(f"a secret value is at most {MAX_SECRET_VALUE} bytes")
    return bytes(nacl.public.SealedBox(_curve_public(node_public_key)).encrypt(bytes(value)))


def unseal_secret(node_key: KeyPair, sealed: bytes) -> bytes:
    """Open a value sealed to this node. Raises :class:`SecretError` if it was sealed to
    another key or altered."""
    if not isinstance(sealed, bytes) or len(sealed) < SEAL_OVERHEAD:
        raise SecretError("not a sealed value")
    private = nacl.signing.SigningKey(node_key.seed).to_curve25519_private_key()
    try:
        return bytes(nacl.public.SealedBox(private).decrypt(sealed))
    except nacl.exceptions.CryptoError:
        raise SecretError("not sealed to this node's key, or altered") from None
