"""The light client against real validator processes over real TCP on 127.0.0.1.

Every bound here is a deadline for progress (blocks come every ~0.5 s), never a sleep.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing

import pytest
import trio

from ledger import keyspace
from ledger.client import LedgerClient
from ledger.errors import InvalidTx, LedgerUnavailable
from ledger.keys import KeyPair
from ledger.state import decode_entry
from ledger.types import Header
from tests.conftest import CHAIN_ID, FUNDS, Cluster, transfer

pytestmark = pytest.mark.slow

DEADLINE_S = 60


async def balance(client: LedgerClient, address: bytes) -> int:
    key = keyspace.account(address)
    value, _height = await client.query(key)
    return 0 if value is None else int(decode_entry(key, value)["balance"])


async def test_status_submit_wait_and_proven_queries(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded])
    alice, bob = funded[0], funded[1]
    with trio.fail_after(DEADLINE_S):
        async with LedgerClient(c.genesis, c.addrs) as client:
            status = await client.status()
            assert status.chain_id == CHAIN_ID
            assert status.validators == list(c.genesis.validators.members)
            assert await client.next_nonce(alice.public_key) == 0
            before = await balance(client, bob.public_key)

            outcome = await client.submit_and_wait(transfer(alice, bob.public_key, 1234, 0))
            assert outcome.code == "ok"
            assert await balance(client, bob.public_key) == before + 1234
            assert await client.next_nonce(alice.public_key) == 1

            # A replayed nonce is refused by the peer with its code.
            with pytest.raises(InvalidTx) as info:
                await client.submit(transfer(alice, bob.public_key, 1, 0))
            assert info.value.code == "bad_nonce"

            header, commit = await client.latest()
            assert commit.block_hash == header.hash()
            block = await client.block(header.height)
            assert block.header == header


async def test_header_subscription_is_consecutive_and_verified(
    cluster_factory: Callable[..., Cluster],
) -> None:
    c = cluster_factory(4)
    seen: list[Header] = []
    with trio.fail_after(DEADLINE_S):
        async with LedgerClient(c.genesis, c.addrs) as client:
            async with aclosing(client.headers()) as it:
                async for header in it:
                    seen.append(header)
                    if len(seen) == 4:
                        break
    heights = [h.height for h in seen]
    assert heights == list(range(heights[0], heights[0] + 4))
    assert all(b.prev_hash == a.hash() for a, b in zip(seen, seen[1:], strict=False))


async def test_fails_over_when_a_validator_dies(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded])
    alice, bob = funded[0], funded[1]
    with trio.fail_after(DEADLINE_S):
        async with LedgerClient(c.genesis, c.addrs, timeout_s=2.0,
                                stall_timeout_s=5.0) as client:
            heights: list[int] = []
            async with aclosing(client.headers()) as it:
                async for header in it:
                    heights.append(header.height)
                    if len(heights) == 1:
                        first = await client.status()
                        assert first.peer == f"127.0.0.1:{c[0].addr[1]}"
                        c.kill(0)  # the peer we talk to, and the subscription's
                    if len(heights) == 4:
                        break
            # Three of four validators keep committing; the client moved to one of them.
            assert heights == list(range(heights[0], heights[0] + 4))
            status = await client.status()
            assert status.peer != f"127.0.0.1:{c[0].addr[1]}"
            assert status.height > first.height
            outcome = await client.submit_and_wait(transfer(alice, bob.public_key, 5, 0))
            assert outcome.code == "ok"


async def test_all_validators_down_is_unavailable(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory(4)
    with trio.fail_after(DEADLINE_S):
        async with LedgerClient(c.genesis, c.addrs, timeout_s=2.0) as client:
            await client.status()
            c.stop_all()
            with pytest.raises(LedgerUnavailable) as info:
                await client.query(keyspace.account(b"\x00" * 32))
    for v in c.validators:
        assert f"127.0.0.1:{v.addr[1]}" in str(info.value)
