"""The storage client's error family.

Every error :mod:`threebot.storage` raises derives from :class:`StorageError` (itself a
:class:`ledger.errors.TfgridError`); no third-party exception (cryptography, zfec, msgpack,
OSError, trio) leaks out of the public API. Messages name the cause in one line, because the
CLI prints them as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

from ledger.errors import TfgridError


class StorageError(TfgridError):
    """Base of the storage client's errors."""


class BadCapability(StorageError):
    """A capability string is malformed: wrong prefix, not base32, wrong length or version,
    checksum mismatch (a typo), or a verify capability given where a read capability is needed."""


class BadParameters(StorageError):
    """Coding parameters (k, n, segment size, chunk or page size) are out of the supported range."""


class AuthenticationFailed(StorageError):
    """Decryption failed: the key is wrong or the ciphertext (a segment or the manifest) was
    altered. Never retried with the same bytes."""


class CorruptRecord(StorageError):
    """A stored record (chunk, hash page, manifest shard) is malformed, belongs elsewhere, or does
    not match the hashes that authenticate it. ``blocks`` lists the pinpointed bad block
    positions (segment numbers) when the record is a chunk."""

    def __init__(self, message: str, blocks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.blocks = tuple(blocks)


class NotEnoughShards(StorageError):
    """Fewer than ``needed`` good shards (or manifest shards) could be had.

    ``reachable`` is how many were good; ``failed`` maps each missing, slow, dead or corrupt
    node (by id, or by shard index when no node is known) to the reason.
    """

    def __init__(
        self, what: str, needed: int, reachable: int, failed: dict[str, str] | None = None
    ) -> None:
        failed = dict(failed or {})
        detail = ""
        if failed:
            listed = ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:8])
            more = "" if len(failed) <= 8 else f", and {len(failed) - 8} more"
            detail = f" (nodes {listed}{more})"
        super().__init__(
            f"only {reachable} of the {needed} {what} needed are reachable{detail}"
        )
        self.needed = needed
        self.reachable = reachable
        self.failed = failed


class BadManifest(StorageError):
    """A manifest decrypted but does not describe a valid object (unknown version, codec or
    cipher; sizes or placement inconsistent)."""


class PlacementError(StorageError):
    """The grid has too few usable nodes (up, with free storage, distinct) for the object."""


class NamespaceError(StorageError):
    """A namespace contract could not be created, updated or reached (refused by the ledger,
    the node reported an error, or no endpoint within the deadline)."""


class ShardStoreError(StorageError):
    """A shard store refused a request or broke the protocol; ``code`` is the store's reason
    (``not_found``, ``quota_exceeded``, ``bad_signature``, ...) or ``unreachable``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LocalIndexError(StorageError):
    """The local object index in the home cannot be read or written."""
