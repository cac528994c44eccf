"""The ledger's error family.

Every error the ledger package raises derives from :class:`TfgridError`; no third-party
exception (msgpack, nacl, sqlite3, trio) leaks out of the public API.
"""

from __future__ import annotations


class TfgridError(Exception):
    """Base of every error raised by tfgrid packages."""


class LocalProtocolError(TfgridError):
    """Our caller asked for something illegal (a bug on our side or bad local input)."""


class RemoteProtocolError(TfgridError):
    """A peer broke the protocol: malformed or oversized frame, unknown message, bad handshake.

    The connection to that peer is closed; nothing else is harmed.
    """


class MalformedFrame(RemoteProtocolError):
    """A frame could not be decoded as canonical msgpack of the expected shape."""


class FrameTooLarge(RemoteProtocolError):
    """A frame announced a length above the configured maximum."""


class EncodingError(LocalProtocolError):
    """A value cannot be canonically encoded (floats, unsupported types, non-string map keys)."""


class BadSignature(TfgridError):
    """An ed25519 signature did not verify over the canonical bytes."""


class InvalidTx(TfgridError):
    """A transaction was refused; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidBlock(TfgridError):
    """A proposed or fetched block is not valid at its height."""


class VerificationError(TfgridError):
    """The light client could not verify what a peer served (commit, header, proof)."""


class ConflictingHeaders(VerificationError):
    """Two headers at one height both carry valid commits: the validator set forked.

    This is never retried: it means more than a third of the validators are faulty.
    """


class LedgerTimeout(TfgridError):
    """No configured peer answered in time."""


class LedgerUnavailable(TfgridError):
    """Every configured peer failed or refused to answer."""


class NotFound(TfgridError):
    """The requested entry, block or name does not exist."""


class ConfigError(TfgridError):
    """A configuration file, home directory or command-line value is invalid."""


class StorageError(TfgridError):
    """The on-disk store is unusable (corrupt file, full disk, wrong chain)."""
