"""The owner's local index of stored objects (in the home): what `storage ls` lists, which
namespaces the owner's objects use (so that `rm` cancels only namespaces nothing else needs).

It holds read capabilities, so it is written like the identity file: mode 0600, atomically
(temp file, fsync, rename). It is a cache of the owner's own actions, never needed to read an
object: a capability alone finds its manifest through the ledger.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from threebot.storage.errors import LocalIndexError

INDEX_VERSION = 1


@dataclass(frozen=True, slots=True)
class IndexEntry:
    cap: str
    name: str
    size: int
    created_ms: int
    namespaces: tuple[int, ...]

    def doc(self) -> dict[str, Any]:
        return {"cap": self.cap, "name": self.name, "size": self.size,
                "created": self.created_ms, "namespaces": list(self.namespaces)}


class LocalIndex:
    """``path`` is a JSON file (created on first write)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[IndexEntry]:
        """Raises :class:`LocalIndexError` if the file exists but cannot be read."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LocalIndexError(f"{self.path}: {exc.strerror or exc}") from None
        try:
            doc = json.loads(raw)
            if doc.get("version") != INDEX_VERSION:
                raise ValueError(f"unknown version {doc.get('version')!r}")
            return [IndexEntry(str(e["cap"]), str(e["name"]), int(e["size"]), int(e["created_ms"]),
                               tuple(int(n) for n in e["namespaces"])) for e in doc["objects"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LocalIndexError(f"{self.path}: not a storage index ({exc})") from None

    def _write(self, entries: list[IndexEntry]) -> None:
        doc = {"version": INDEX_VERSION, "objects": [asdict(e) for e in entries]}
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".index-", dir=self.path.parent)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise LocalIndexError(f"{self.path}: {exc.strerror or exc}") from None

    def get(self, cap: str) -> IndexEntry | None:
        return next((e for e in self.entries() if e.cap == cap), None)

    def put(self, entry: IndexEntry) -> None:
        """Add or replace the entry of ``entry.cap``."""
        self._write([e for e in self.entries() if e.cap != entry.cap] + [entry])

    def remove(self, cap: str) -> None:
        self._write([e for e in self.entries() if e.cap != cap])

    def namespaces(self) -> set[int]:
        return {n for e in self.entries() for n in e.namespaces}
