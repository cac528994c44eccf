"""The validator's on-disk store: one SQLite file in WAL mode.

What it holds (schema version :data:`SCHEMA_VERSION`)::

    meta      (name TEXT PRIMARY KEY, value BLOB)        schema version, genesis
    blocks    (height INTEGER PRIMARY KEY, hash, data)   encoded blocks, heights 1..height()
    commits   (height INTEGER PRIMARY KEY, data)         the certificate of each block
    state     (key BLOB PRIMARY KEY, value BLOB)         the state after block height()
    snapshot  (id = 0, data)                             the consensus signer-state WAL record
    evidence  (validator, height, round, kind, first, second)   equivocations seen

Crash safety: :meth:`Store.save_block` writes a block, its commit and the state changes it
caused in one SQLite transaction, with ``synchronous=FULL`` so that a returned call is on
disk. After a kill -9 at any instant, reopening shows either all of a block's writes or none
of them. :meth:`Store.save_snapshot` is durable when it returns, so the consensus core can
rely on it before it signs.

One process at a time: the store takes an exclusive ``flock`` on ``<path>.lock`` for as long
as it is open, so a second validator started on the same home fails loudly instead of both
signing with one key.

Every ``sqlite3`` error is mapped to :class:`~ledger.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ledger.codec import EMPTY_HASH, pack, unpack
from ledger.errors import MalformedFrame, StorageError
from ledger.types import Block, Commit, Genesis, Vote

SCHEMA_VERSION = 1

# Equivocation evidence is attacker-influenced (a faulty validator can sign many conflicting
# votes); one record per (validator, height, round, kind) and a hard cap keep it bounded.
MAX_EVIDENCE = 10_000

_STATE_PAGE = 1000  # rows per query when streaming the state

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE blocks (height INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE commits (height INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE state (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 0), data BLOB NOT NULL)",
    "CREATE TABLE evidence (id INTEGER PRIMARY KEY, validator BLOB NOT NULL,"
    " height INTEGER NOT NULL, round INTEGER NOT NULL, kind INTEGER NOT NULL,"
    " first BLOB NOT NULL, second BLOB NOT NULL, UNIQUE (validator, height, round, kind))",
)

T = TypeVar("T")


def _describe(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        return f"disk full ({exc})"
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return f"file is corrupt or not a ledger database ({exc})"
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return f"database is locked by another process ({exc})"
    if name.startswith("SQLITE_IOERR"):
        return f"I/O error ({exc})"
    if name == "SQLITE_READONLY":
        return f"database is read-only ({exc})"
    if name == "SQLITE_CANTOPEN":
        return f"cannot open the database file ({exc})"
    return str(exc)


class Store:
    """The chain, its certificates, the current state and the consensus WAL record.

    Safe to call from several threads (calls are serialised); meant for one process.
    """

    def __init__(self, path: Path) -> None:
        """Open or create the store at ``path``.

        Raises :class:`StorageError` if the file is corrupt, is not a ledger store, has a
        newer schema, cannot use WAL mode, or is already open (in this or another process).
        """
        self._path = Path(path)
        self._lock = threading.RLock()
        self._closed = False
        self._lock_fd = self._take_file_lock()
        try:
            self._conn = self._open()
            self._height = self._call(self._load_height)
        except BaseException:
            self._closed = True
            self._release_file_lock()
            raise

    # ------------------------------------------------------------------ opening

    def _take_file_lock(self) -> int:
        lock_path = Path(str(self._path) + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"{self._path}: cannot create lock file: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"{self._path}: store is already open (another validator on this home?)"
            ) from exc
        return fd

    def _release_file_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"{self._path}: {_describe(exc)}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StorageError(f"{self._path}: cannot switch the database to WAL mode")
            conn.execute("PRAGMA synchronous=FULL")
            # Catch a truncated or scribbled-over file now, not in the middle of a commit.
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StorageError(f"{self._path}: database is corrupt: {'; '.join(problems[:3])}")
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"{self._path}: {_describe(exc)}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute("INSERT INTO meta (name, value) VALUES ('schema', ?)",
                             (SCHEMA_VERSION,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return
        if "meta" not in tables:
            raise StorageError(f"{self._path}: not a tfgrid ledger store")
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row is None or not isinstance(row[0], int):
            raise StorageError(f"{self._path}: ledger store has no schema version")
        version = row[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self._path}: schema version {version} is newer than this program's "
                f"{SCHEMA_VERSION}; upgrade tfgrid"
            )
        if version < SCHEMA_VERSION:  # no older versions have been released yet
            raise StorageError(f"{self._path}: unknown old schema version {version}")

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` under the lock, mapping sqlite errors to :class:`StorageError`."""
        with self._lock:
            if self._closed:
                raise StorageError(f"{self._path}: store is closed")
            try:
                return fn()
            except sqlite3.Error as exc:
                raise StorageError(f"{self._path}: {_describe(exc)}") from exc

    def _write(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``fn`` in one IMMEDIATE transaction: all of it is committed or none."""

        def run() -> None:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite already rolled back (e.g. after SQLITE_FULL)
                raise

        self._call(run)

    def _decode(self, data: Any, what: str, parse: Callable[[Any], T]) -> T:
        if not isinstance(data, bytes):
            raise StorageError(f"{self._path}: {what} is not stored as bytes")
        try:
            return parse(unpack(data))
        except MalformedFrame as exc:
            raise StorageError(f"{self._path}: {what} is corrupt: {exc}") from exc

    def _load_height(self) -> int:
        row = self._conn.execute("SELECT MAX(height) FROM blocks").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    # ------------------------------------------------------------------ genesis

    def init_genesis(self, genesis: Genesis) -> None:
        """Record the chain's genesis; a no-op if this same genesis is already recorded.

        Raises :class:`StorageError` if the store belongs to a different genesis.
        """
        data = pack(genesis.to_wire())

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT value FROM meta WHERE name = 'genesis'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (name, value) VALUES ('genesis', ?)", (data,))
                return
            stored = self._decode(row[0], "genesis", Genesis.from_wire)
            if stored.hash() != genesis.hash():
                raise StorageError(
                    f"{self._path}: store belongs to chain {stored.chain_id!r} with genesis "
                    f"{stored.hash().hex()[:16]}, not {genesis.chain_id!r} with genesis "
                    f"{genesis.hash().hex()[:16]}"
                )

        self._write(write)

    def genesis(self) -> Genesis | None:
        def read() -> Genesis | None:
            row = self._conn.execute("SELECT value FROM meta WHERE name = 'genesis'").fetchone()
            return None if row is None else self._decode(row[0], "genesis", Genesis.from_wire)

        return self._call(read)

    # ------------------------------------------------------------------ blocks

    def height(self) -> int:
        """The last saved height; 0 before the first block."""
        return self._call(lambda: self._height)

    def save_block(self, block: Block, commit: Commit,
                   changes: Mapping[bytes, bytes | None]) -> None:
        """Save ``block`` (at :meth:`height` + 1), its certificate and the state changes it
        made (``None`` deletes a key), all in one atomic, durable transaction.

        Raises :class:`StorageError` if the block is not the next height, does not extend the
        stored chain, belongs to another chain, or ``commit`` is not for this block; or on
        any disk error (then nothing of the block is stored).
        """
        header = block.header
        block_hash = block.hash()
        if commit.height != header.height or commit.block_hash != block_hash:
            raise StorageError(
                f"commit is for height {commit.height} block {commit.block_hash.hex()[:16]}, "
                f"not height {header.height} block {block_hash.hex()[:16]}"
            )
        upserts: list[tuple[bytes, bytes]] = []
        deletes: list[tuple[bytes]] = []
        for key, value in changes.items():
            if not isinstance(key, bytes) or not (value is None or isinstance(value, bytes)):
                raise StorageError("state changes must map bytes to bytes or None")
            if value is None:
                deletes.append((key,))
            else:
                upserts.append((key, value))
        block_data = block.encode()
        commit_data = pack(commit.to_wire())

        def write(conn: sqlite3.Connection) -> None:
            expected = self._height + 1
            if header.height != expected:
                raise StorageError(
                    f"block height {header.height} is not the next height {expected}"
                )
            if expected == 1:
                prev_hash = EMPTY_HASH
            else:
                row = conn.execute("SELECT hash FROM blocks WHERE height = ?",
                                   (expected - 1,)).fetchone()
                if row is None:
                    raise StorageError(f"{self._path}: block {expected - 1} is missing")
                prev_hash = bytes(row[0])
            if expected > 1 and header.prev_hash != prev_hash:
                raise StorageError(
                    f"block {header.height} does not extend the stored block {expected - 1}"
                )
            row = conn.execute("SELECT value FROM meta WHERE name = 'genesis'").fetchone()
            if row is not None:
                chain_id = self._decode(row[0], "genesis", Genesis.from_wire).chain_id
                if header.chain_id != chain_id:
                    raise StorageError(
                        f"block is for chain {header.chain_id!r}, store is {chain_id!r}"
                    )
            conn.execute("INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)",
                         (header.height, block_hash, block_data))
            conn.execute("INSERT INTO commits (height, data) VALUES (?, ?)",
                         (header.height, commit_data))
            if upserts:
                conn.executemany(
                    "INSERT INTO state (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    upserts,
                )
            if deletes:
                conn.executemany("DELETE FROM state WHERE key = ?", deletes)

        try:
            self._write(write)
        except StorageError:
            # If the failure was on COMMIT itself (an I/O error), trust the file, not our guess.
            with self._lock, contextlib.suppress(sqlite3.Error):
                if not self._closed:
                    self._height = self._load_height()
            raise
        with self._lock:
            self._height = header.height

    def block(self, height: int) -> Block | None:
        """The block at ``height``, or ``None`` if not saved. Raises :class:`StorageError`."""

        def read() -> Block | None:
            row = self._conn.execute("SELECT data FROM blocks WHERE height = ?",
                                     (height,)).fetchone()
            return None if row is None else self._decode(row[0], f"block {height}",
                                                         Block.from_wire)

        return self._call(read)

    def block_hash(self, height: int) -> bytes | None:
        """The hash of the block at ``height``, without decoding it."""

        def read() -> bytes | None:
            row = self._conn.execute("SELECT hash FROM blocks WHERE height = ?",
                                     (height,)).fetchone()
            return None if row is None else bytes(row[0])

        return self._call(read)

    def commit(self, height: int) -> Commit | None:
        """The certificate of block ``height``, or ``None``. Raises :class:`StorageError`."""

        def read() -> Commit | None:
            row = self._conn.execute("SELECT data FROM commits WHERE height = ?",
                                     (height,)).fetchone()
            return None if row is None else self._decode(row[0], f"commit {height}",
                                                         Commit.from_wire)

        return self._call(read)

    # ------------------------------------------------------------------ state

    def state_items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every state entry after the last saved block, in key order.

        Reads in pages, so a huge state is never in memory twice; a block saved while the
        caller is iterating may or may not be reflected in later pages.
        """
        def page(after: bytes | None) -> list[tuple[bytes, bytes]]:
            if after is None:
                cur = self._conn.execute(
                    "SELECT key, value FROM state ORDER BY key LIMIT ?", (_STATE_PAGE,))
            else:
                cur = self._conn.execute(
                    "SELECT key, value FROM state WHERE key > ? ORDER BY key LIMIT ?",
                    (after, _STATE_PAGE))
            return [(bytes(k), bytes(v)) for k, v in cur.fetchall()]

        last: bytes | None = None
        while True:
            rows = self._call(functools.partial(page, last))
            yield from rows
            if len(rows) < _STATE_PAGE:
                return
            last = rows[-1][0]

    def state_get(self, key: bytes) -> bytes | None:
        """One state entry after the last saved block, or ``None``."""

        def read() -> bytes | None:
            row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        return self._call(read)

    # ------------------------------------------------------------------ consensus record

    def save_snapshot(self, data: bytes) -> None:
        """Durably replace the consensus WAL record (on disk when this returns)."""
        if not isinstance(data, bytes):
            raise StorageError("snapshot must be bytes")

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO snapshot (id, data) VALUES (0, ?)"
                         " ON CONFLICT (id) DO UPDATE SET data = excluded.data", (data,))

        self._write(write)

    def load_snapshot(self) -> bytes | None:
        def read() -> bytes | None:
            row = self._conn.execute("SELECT data FROM snapshot WHERE id = 0").fetchone()
            return None if row is None else bytes(row[0])

        return self._call(read)

    # ------------------------------------------------------------------ evidence

    def add_evidence(self, first: Vote, second: Vote) -> None:
        """Record an equivocation: two votes of one validator for one (height, round, kind).

        Only the first pair per (validator, height, round, kind) is kept, and at most
        :data:`MAX_EVIDENCE` records in all; further pairs are ignored.
        """
        if (first.validator, first.height, first.round, first.kind) != (
                second.validator, second.height, second.round, second.kind) or first == second:
            raise StorageError("evidence must be two different votes of one validator for "
                               "one height, round and kind")
        data_first = pack(first.to_wire())
        data_second = pack(second.to_wire())

        def write(conn: sqlite3.Connection) -> None:
            (count,) = conn.execute("SELECT COUNT(*) FROM evidence").fetchone()
            if count >= MAX_EVIDENCE:
                return
            conn.execute(
                "INSERT OR IGNORE INTO evidence (validator, height, round, kind, first, second)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (first.validator, first.height, first.round, first.kind, data_first,
                 data_second),
            )

        self._write(write)

    def evidence(self) -> list[tuple[Vote, Vote]]:
        """Every recorded equivocation, oldest first."""

        def read() -> list[tuple[Vote, Vote]]:
            rows = self._conn.execute("SELECT first, second FROM evidence ORDER BY id").fetchall()
            return [(self._decode(a, "evidence", Vote.from_wire),
                     self._decode(b, "evidence", Vote.from_wire)) for a, b in rows]

        return self._call(read)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close the database and release the file lock; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                raise StorageError(f"{self._path}: {_describe(exc)}") from exc
            finally:
                self._release_file_lock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path
