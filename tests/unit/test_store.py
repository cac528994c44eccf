"""The SQLite store, on real files: round trips, refusals, corruption, and kill -9 at any instant.

This file doubles as the child process of the crash test: ``python test_store.py child DB``
writes blocks until it is killed, printing each height once it is durably saved.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.codec import EMPTY_HASH, hash_bytes
from ledger.errors import StorageError
from ledger.keys import KeyPair
from ledger.store import MAX_EVIDENCE, SCHEMA_VERSION, Store
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

CHAIN = "store-test"
KEY = KeyPair.from_seed(b"\x01" * 32)
OTHER_KEY = KeyPair.from_seed(b"\x02" * 32)
REPO = Path(__file__).resolve().parents[2]


def make_genesis(chain_id: str = CHAIN) -> Genesis:
    return Genesis(chain_id, 1_000, ValidatorSet.of([KEY.public_key]), ((KEY.public_key, 10**9),),
                   (("block_ms", 1000),))


def commit_for(block: Block) -> Commit:
    vote = Vote(PRECOMMIT, block.header.height, 0, block.hash(), KEY.public_key).signed(KEY, CHAIN)
    return Commit.from_votes([vote])


@functools.cache
def block_at(height: int, chain_id: str = CHAIN) -> Block:
    """The deterministic test chain: block ``height`` extends ``block_at(height - 1)``."""
    txs = tuple(b"tx-%d-%d" % (height, i) for i in range(height % 4))
    if height == 1:
        prev_hash, last_commit = EMPTY_HASH, None
    else:
        prev = block_at(height - 1, chain_id)
        prev_hash, last_commit = prev.hash(), commit_for(prev)
    header = Header(
        chain_id=chain_id, height=height, time_ms=1_000 + 1_000 * height, prev_hash=prev_hash,
        last_commit_hash=EMPTY_HASH if last_commit is None else last_commit.hash(),
        txs_root=merkle_root([hash_bytes(t) for t in txs]),
        state_root=hash_bytes(b"state-%d" % height), validators_hash=b"\x22" * 32,
        next_validators_hash=b"\x22" * 32, proposer=KEY.public_key,
    )
    return Block(header, txs, last_commit)


def changes_at(height: int) -> dict[bytes, bytes | None]:
    """The state changes block ``height`` makes: overwrites, inserts of varying size, deletes."""
    return {
        b"counter": b"%d" % height,
        b"slot-%d" % (height % 17): b"v%d" % height,
        b"tmp-%d" % height: b"x" * (500 * (height % 7)),
        b"tmp-%d" % (height - 2): None,
    }


def state_up_to(height: int) -> dict[bytes, bytes]:
    state: dict[bytes, bytes] = {}
    for h in range(1, height + 1):
        for k, v in changes_at(h).items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
    return state


def save_chain(store: Store, upto: int) -> None:
    for h in range(store.height() + 1, upto + 1):
        b = block_at(h)
        store.save_block(b, commit_for(b), changes_at(h))


def check_consistent(store: Store) -> int:
    """Every saved block has its commit, the chain links, the state is exactly the sum of the
    changes of blocks 1..height(). Returns the height."""
    height = store.height()
    for h in range(1, height + 1):
        assert store.block(h) == block_at(h)
        assert store.commit(h) == commit_for(block_at(h))
        assert store.block_hash(h) == block_at(h).hash()
    assert store.block(height + 1) is None
    assert store.commit(height + 1) is None
    assert dict(store.state_items()) == state_up_to(height)
    return height


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "ledger.sqlite")
    s.init_genesis(make_genesis())
    return s


# ---------------------------------------------------------------------------- round trips


def test_fresh_store_is_empty(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.sqlite") as s:
        assert s.height() == 0
        assert s.genesis() is None
        assert s.block(1) is None
        assert s.commit(1) is None
        assert list(s.state_items()) == []
        assert s.load_snapshot() is None
        assert s.evidence() == []


def test_pragmas_wal_and_full_sync(store: Store) -> None:
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    s = Store(path)
    s.init_genesis(make_genesis())
    save_chain(s, 30)
    s.save_snapshot(b"signer state 1")
    s.save_snapshot(b"signer state 2")
    v1 = Vote(PREVOTE, 5, 1, b"\x0a" * 32, KEY.public_key).signed(KEY, CHAIN)
    v2 = Vote(PREVOTE, 5, 1, b"\x0b" * 32, KEY.public_key).signed(KEY, CHAIN)
    s.add_evidence(v1, v2)
    assert check_consistent(s) == 30
    assert s.state_get(b"counter") == b"30"
    assert s.state_get(b"tmp-1") is None
    s.close()
    s.close()  # idempotent

    with Store(path) as again:
        assert again.genesis() == make_genesis()
        assert check_consistent(again) == 30
        assert again.load_snapshot() == b"signer state 2"
        assert again.evidence() == [(v1, v2)]
        save_chain(again, 35)
        assert check_consistent(again) == 35


def test_state_items_pages_through_a_large_state(store: Store) -> None:
    changes: dict[bytes, bytes | None] = {b"": b"empty key"}
    changes.update({b"key-%05d" % i: b"%d" % i for i in range(2_500)})
    b = block_at(1)
    store.save_block(b, commit_for(b), changes)
    items = list(store.state_items())
    assert items == sorted((k, v) for k, v in changes.items() if v is not None)


def test_evidence_is_deduplicated_and_checked(store: Store) -> None:
    def vote(h: int, r: int, tag: bytes, kind: int = PRECOMMIT, key: KeyPair = KEY) -> Vote:
        return Vote(kind, h, r, tag * 32, key.public_key).signed(key, CHAIN)

    store.add_evidence(vote(3, 0, b"a"), vote(3, 0, b"b"))
    store.add_evidence(vote(3, 0, b"a"), vote(3, 0, b"c"))  # same slot: kept once
    store.add_evidence(vote(3, 0, b"a", PREVOTE), vote(3, 0, b"b", PREVOTE))
    store.add_evidence(vote(3, 0, b"a", key=OTHER_KEY), vote(3, 0, b"b", key=OTHER_KEY))
    assert [(a.kind, a.validator, b.block_hash[:1]) for a, b in store.evidence()] == [
        (PRECOMMIT, KEY.public_key, b"b"),
        (PREVOTE, KEY.public_key, b"b"),
        (PRECOMMIT, OTHER_KEY.public_key, b"b"),
    ]
    with pytest.raises(StorageError):
        store.add_evidence(vote(3, 0, b"a"), vote(3, 1, b"b"))  # different rounds
    with pytest.raises(StorageError):
        store.add_evidence(vote(3, 0, b"a"), vote(3, 0, b"a"))  # the same vote twice
    with pytest.raises(StorageError):
        store.add_evidence(vote(3, 0, b"a"), vote(3, 0, b"b", key=OTHER_KEY))
    assert MAX_EVIDENCE >= 1_000


# ---------------------------------------------------------------------------- refusals


def test_genesis_is_idempotent_and_a_different_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Store(path) as s:
        s.init_genesis(make_genesis())
        s.init_genesis(make_genesis())
        with pytest.raises(StorageError, match="belongs to chain"):
            s.init_genesis(make_genesis("another-chain"))
    with Store(path) as s:
        with pytest.raises(StorageError, match="belongs to chain"):
            s.init_genesis(make_genesis("another-chain"))
        assert s.genesis() == make_genesis()


def test_non_consecutive_heights_refused(store: Store) -> None:
    b2 = block_at(2)
    with pytest.raises(StorageError, match="not the next height"):
        store.save_block(b2, commit_for(b2), {})
    save_chain(store, 3)
    for h in (1, 3, 5):
        b = block_at(h)
        with pytest.raises(StorageError, match="not the next height"):
            store.save_block(b, commit_for(b), {b"junk": b"x"})
    assert check_consistent(store) == 3


def test_block_not_extending_the_chain_refused(store: Store) -> None:
    save_chain(store, 2)
    stray = block_at(3, "elsewhere")  # same height, a different chain of hashes
    with pytest.raises(StorageError):
        store.save_block(stray, commit_for(stray), {})
    assert check_consistent(store) == 2


def test_block_of_another_chain_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.sqlite") as s:
        s.init_genesis(make_genesis("another-chain"))
        b = block_at(1)
        with pytest.raises(StorageError, match="chain"):
            s.save_block(b, commit_for(b), {})
        assert s.height() == 0


def test_commit_for_another_block_refused(store: Store) -> None:
    b1 = block_at(1)
    with pytest.raises(StorageError, match="commit"):
        store.save_block(b1, commit_for(block_at(2)), {})
    assert store.height() == 0


def test_second_open_refused_while_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    first = Store(path)
    with pytest.raises(StorageError, match="already open"):
        Store(path)
    first.close()
    Store(path).close()


def test_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.height()
    with pytest.raises(StorageError, match="closed"):
        store.save_snapshot(b"x")


# ---------------------------------------------------------------------------- bad files


def test_garbage_file_gives_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a database, just some bytes. " * 200)
    with pytest.raises(StorageError, match="corrupt or not a ledger database"):
        Store(path)
    # The failed open released its lock: the file can be replaced and opened again.
    path.unlink()
    Store(path).close()


def test_truncated_file_gives_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Store(path) as s:
        s.init_genesis(make_genesis())
        for h in range(1, 41):
            b = block_at(h)
            s.save_block(b, commit_for(b), {b"big-%d" % h: os.urandom(3000)})
    size = path.stat().st_size
    assert size > 40 * 3000
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StorageError):
        Store(path)


def test_scribbled_pages_give_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Store(path) as s:
        s.init_genesis(make_genesis())
        for h in range(1, 41):
            b = block_at(h)
            s.save_block(b, commit_for(b), {b"big-%d" % h: b"y" * 3000})
    data = bytearray(path.read_bytes())
    rng = random.Random(1)
    page = 4096
    for p in range(2, len(data) // page, 3):  # every third page after the schema page
        start = p * page
        data[start:start + 64] = rng.randbytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="corrupt"):
        Store(path)


def test_empty_file_is_a_fresh_store(tmp_path: Path) -> None:
    # SQLite treats a zero-length file as an empty database; so do we (the node then syncs).
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"")
    with Store(path) as s:
        assert s.height() == 0
        s.init_genesis(make_genesis())
        save_chain(s, 2)
        assert check_consistent(s) == 2


def test_foreign_sqlite_database_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="not a tfgrid ledger store"):
        Store(path)


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        Store(path)


def test_disk_full_rolls_back_the_whole_block(store: Store) -> None:
    save_chain(store, 3)
    # Cap the file at its current size plus a little: SQLite reports SQLITE_FULL, exactly as
    # on a full disk.
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    b4 = block_at(4)
    huge: dict[bytes, bytes | None] = {b"huge-%d" % i: b"z" * 4000 for i in range(50)}
    huge.update(changes_at(4))
    with pytest.raises(StorageError, match="disk full"):
        store.save_block(b4, commit_for(b4), huge)
    assert check_consistent(store) == 3
    # Room again: the same block goes in, and the store is still sound.
    store._conn.execute("PRAGMA max_page_count = 1073741823")
    store.save_block(b4, commit_for(b4), changes_at(4))
    assert check_consistent(store) == 4


# ---------------------------------------------------------------------------- kill -9


def _child_main(db: str) -> None:
    """Write the test chain forever, printing each height once save_block has returned."""
    s = Store(Path(db))
    s.init_genesis(make_genesis())
    while True:
        h = s.height() + 1
        b = block_at(h)
        s.save_block(b, commit_for(b), changes_at(h))
        s.save_snapshot(b"snapshot-%d" % h)
        sys.stdout.write(f"{h}\n")
        sys.stdout.flush()


@pytest.mark.slow
def test_kill_9_at_any_instant_leaves_a_consistent_store(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    reported = 0
    for round_ in range(8):
        proc = subprocess.Popen(
            [sys.executable, __file__, "child", str(db)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
        )
        assert proc.stdout is not None
        # Let it save a random number of blocks; the kill then lands wherever the child is,
        # most likely inside the next save_block.
        target = reported + rng.randint(1, 25)
        while reported < target:
            line = proc.stdout.readline()
            if not line:
                _, err = proc.communicate()
                pytest.fail(f"child died (seed {seed}, round {round_}): {err.decode()}")
            reported = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()

        with Store(db) as s:
            height = check_consistent(s)
            # Nothing that was reported as saved is lost; at most one more block got in.
            assert reported <= height <= reported + 1, f"seed {seed}"
            snapshot = s.load_snapshot()
            assert snapshot in (b"snapshot-%d" % height, b"snapshot-%d" % (height - 1))
        reported = height


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child_main(sys.argv[2])
