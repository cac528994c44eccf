"""The agent's proven reads against a lying peer next to an honest one (loopback TCP)."""

from __future__ import annotations

import time

import pytest
import trio

from ledger import keyspace
from ledger.client import LedgerClient
from ledger.codec import pack
from ledger.config import make_genesis
from ledger.errors import LedgerUnavailable
from ledger.keys import KeyPair
from tests.integration.agentkit import wait_for
from tests.integration.fakeledger import FakeLedger
from zos_agent.follower import ProvenReader, Unverifiable

VALIDATORS = [KeyPair.from_seed(bytes([0x30 + i]) * 32) for i in range(4)]
KEY = keyspace.contract(5)


async def _true(v: object) -> object:
    return v


async def test_a_valid_proof_wins_and_a_lie_alone_is_refused_with_its_claim() -> None:
    genesis = make_genesis("reader-test", [k.public_key for k in VALIDATORS], [], {},
                           int(time.time() * 1000))
    ledger = FakeLedger(genesis, VALIDATORS)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        ledger.forge(KEY, pack({"id": 5, "truth": True}))
        await wait_for("a block", lambda: _true(ledger.height >= 2), 10)
        ledger.lie(KEY, pack({"id": 5, "truth": False}))
        peers = [ledger.addr, ledger.honest_addr]
        async with LedgerClient(genesis, peers) as client:
            # Liar first: its answer fails the proof, the honest peer's is taken.
            reader = ProvenReader(client, peers)
            assert await reader.get(KEY) == pack({"id": 5, "truth": True})
            # Liar alone: refused, and what it claimed is kept for the report.
            only_liar = ProvenReader(client, [ledger.addr])
            with pytest.raises(Unverifiable) as info:
                await only_liar.get(KEY)
            (claim,) = info.value.claims
            assert claim.value == pack({"id": 5, "truth": False})
            assert "invalid proof" in claim.reason
            # Entries it does not lie about are proven as usual.
            assert await only_liar.get(keyspace.contract(6)) is None
            await reader.aclose()
            await only_liar.aclose()
        # A peer that is not there is unavailable, not a liar.
        async with LedgerClient(genesis, [("127.0.0.1", 1)], timeout_s=1) as client:
            with pytest.raises(LedgerUnavailable):
                await ProvenReader(client, [("127.0.0.1", 1)], timeout_s=1).get(KEY)
        nursery.cancel_scope.cancel()
