"""``python -m threebot.storage.fetch --peers H:P[,H:P...] --genesis FILE CAP OUT``: read one
grid-storage object into ``OUT``.

The node agent runs this as a child process to fetch ``tfs:`` image sources, so that
``zos_agent`` never imports ``threebot`` (design §1). It needs no identity of its own: reading
takes only the read capability and the ledger (to find the owner's namespaces, with proofs), so
a throwaway key stands in for the client key that only writes would use.

``CAP`` may be ``-`` to read the capability from stdin (keeps it out of the process list).
Exit status: 0 when ``OUT`` holds the whole, authenticated object; 1 with one line on stderr
when it could not be read (``OUT`` then does not exist); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from ledger import keys
from ledger.client import LedgerClient
from ledger.config import parse_hostport, read_genesis
from ledger.errors import TfgridError
from threebot.storage.client import StorageClient
from threebot.storage.grid import LedgerGrid
from threebot.storage.index import LocalIndex

LEDGER_TIMEOUT_S = 10.0


def _clock_us() -> int:
    return time.time_ns() // 1000


async def fetch(peers: list[tuple[str, int]], genesis_path: Path, cap: str, out: Path) -> int:
    """Read the object of read capability ``cap`` into ``out``; return its size.

    Raises :class:`~ledger.errors.TfgridError` (a bad genesis, an unreachable ledger, any
    :class:`~threebot.storage.errors.StorageError` of ``get``).
    """
    genesis = read_genesis(genesis_path)
    reader_key = keys.KeyPair.from_seed(os.urandom(32))
    with tempfile.TemporaryDirectory(prefix="tfs-fetch-") as scratch:
        # An index that stays empty: a reader has no objects of its own.
        index = LocalIndex(Path(scratch) / "index.json")
        async with LedgerClient(genesis, peers, timeout_s=LEDGER_TIMEOUT_S) as ledger:
            grid = LedgerGrid(ledger, genesis, reader_key, os.urandom)
            client = StorageClient(grid, reader_key, index, random_bytes=os.urandom,
                                   clock_us=_clock_us)
            return await client.get(cap, out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m threebot.storage.fetch",
                                description="Read one grid-storage object into a file.")
    p.add_argument("--peers", required=True, help="ledger peers, HOST:PORT[,HOST:PORT...]")
    p.add_argument("--genesis", required=True, type=Path, help="genesis file of the chain")
    p.add_argument("cap", metavar="CAP", help="read capability (tfs:...), or - for stdin")
    p.add_argument("out", metavar="OUT", type=Path, help="output file")
    args = p.parse_args(argv)
    try:
        peers = [parse_hostport(x.strip(), what="ledger peer")
                 for x in args.peers.split(",") if x.strip()]
        cap = sys.stdin.readline().strip() if args.cap == "-" else args.cap
        trio.run(fetch, peers, args.genesis, cap, args.out)
    except TfgridError as exc:
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
