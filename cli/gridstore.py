"""The home's grid-storage client: one place that builds it, so every command that stores
objects (``image push``, ``storage ...``, ``bot run``) shares the same identity and the same
local object index (``HOME/storage.json``), and ``bot run`` repairs what any of them stored.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from cli.chain import open_client
from cli.home import Home
from threebot.storage.client import Settings, StorageClient
from threebot.storage.grid import LedgerGrid
from threebot.storage.index import LocalIndex

INDEX_FILE = "storage.json"


def index_path(home: Home) -> Path:
    return home.root / INDEX_FILE


def clock_us() -> int:
    return time.time_ns() // 1000


@asynccontextmanager
async def open_storage(home: Home, settings: Settings | None = None) -> AsyncIterator[StorageClient]:
    """A :class:`StorageClient` acting as the home's identity, over a verifying ledger client.

    Raises :class:`~ledger.errors.ConfigError` when the home has no context or identity.
    """
    key = home.load_identity()
    genesis = home.load_genesis()
    # Moving an object creates many short-lived containers (frames, tasks, block lists), so
    # the collector runs often; without this each full pass also walks the ~10^5 objects the
    # imports created, which never die. Measured on a 256 MiB get: 0.3 CPU-s less.
    gc.freeze()
    async with open_client(home) as ledger:
        grid = LedgerGrid(ledger, genesis, key, os.urandom)
        yield StorageClient(grid, key, LocalIndex(index_path(home)), random_bytes=os.urandom,
                            clock_us=clock_us, settings=settings)
