"""Four validators as trio tasks in this process (``nursery.start(serve, home)``).

The same daemon code as the real-process tests, without process start-up: quick to run and
to debug, and it checks that ``serve`` reports its bound address and stops on cancellation.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from ledger.client import LedgerClient
from ledger.config import init_validator_home, make_genesis
from ledger.keys import KeyPair
from ledger.node import serve
from ledger.store import Store
from tests.conftest import CHAIN_ID, FAST_CONSENSUS, FUNDS, transfer


async def test_serve_in_process(tmp_path: Path) -> None:
    keys = [KeyPair.from_seed(bytes([0xC0 + i]) * 32) for i in range(4)]
    alice, bob = KeyPair.from_seed(b"\x01" * 32), KeyPair.from_seed(b"\x02" * 32)
    genesis = make_genesis(CHAIN_ID, [k.public_key for k in keys], [(alice.public_key, FUNDS)],
                           {}, int(time.time() * 1000))
    # Each validator must know the others' ports before it starts: reserve free ones.
    listeners = [await trio.open_tcp_listeners(0, host="127.0.0.1") for _ in keys]
    addrs = [("127.0.0.1", int(ls[0].socket.getsockname()[1])) for ls in listeners]
    for ls in listeners:
        for listener in ls:
            await listener.aclose()
    for i, k in enumerate(keys):
        init_validator_home(tmp_path / f"v{i}", genesis=genesis, seed=k.seed, listen=addrs[i],
                            peers=addrs, empty_block_interval_ms=60_000, consensus=FAST_CONSENSUS)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            bound = [await nursery.start(serve, tmp_path / f"v{i}") for i in range(4)]
            assert bound == addrs
            async with LedgerClient(genesis, addrs) as client:
                outcome = await client.submit_and_wait(transfer(alice, bob.public_key, 5, 0))
                assert outcome.code == "ok"
                height = (await client.status()).height
            nursery.cancel_scope.cancel()

    # cancelled cleanly: the stores are closed (reopenable) and hold the committed block
    for i in range(4):
        with Store(tmp_path / f"v{i}" / "ledger.sqlite") as store:
            assert store.height() >= height - 1  # a validator may trail by the last block
            assert store.evidence() == []
