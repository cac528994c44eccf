"""Real validator processes on 127.0.0.1: commits, fault tolerance, catch-up, crash safety.

Every wait is a bounded poll of what the validators report (heights via ``status``, blocks
via ``block``); halting is shown by heights that stay put over an observation window several
round timeouts long.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import cast

import pytest
import trio

from ledger import keyspace
from ledger.client import LedgerClient
from ledger.codec import unpack
from ledger.errors import InvalidTx
from ledger.keys import KeyPair
from ledger.peer import auth_message, check_auth, hello_message, new_challenge
from ledger.store import Store
from ledger.types import NIL, PRECOMMIT, PREVOTE, Block, Commit, Header, Vote
from tests.conftest import FUNDS, Cluster, RawClient, poll, transfer

pytestmark = pytest.mark.slow

# With the fast test timeouts a round takes about 1 s; six rounds' worth without a new
# height is a halt, not a slow round.
HALT_WINDOW_S = 6.0


async def heights(c: Cluster, which: list[int]) -> list[int]:
    return [await c.height(i) for i in which]


async def assert_same_chain(c: Cluster, which: list[int], upto: int) -> None:
    """Every validator in ``which`` holds the same block hash at every height 1..upto."""
    for h in range(1, upto + 1):
        hashes = {await c.block_hash(i, h) for i in which}
        assert len(hashes) == 1, f"validators disagree at height {h}"


async def test_four_validators_commit_transfers(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded])
    alice, bob, carol = funded[0], funded[1], funded[2]
    async with LedgerClient(c.genesis, c.addrs) as client:
        outcomes = []
        for i in range(3):
            outcomes.append(await client.submit_and_wait(
                transfer(alice, bob.public_key, 1000 + i, i), timeout_s=20))
        # submitted to another validator than the first one: tx gossip reaches the proposer
        async with LedgerClient(c.genesis, [c[3].addr]) as other:
            outcomes.append(await other.submit_and_wait(
                transfer(carol, bob.public_key, 7, 0), timeout_s=20))
        assert [o.code for o in outcomes] == ["ok"] * 4
        value, _ = await client.query(keyspace.account(bob.public_key))
        assert value is not None
        assert unpack(value)["balance"] == FUNDS + 1000 + 1001 + 1002 + 7
        assert await client.next_nonce(alice.public_key) == 3

    top = min(await heights(c, [0, 1, 2, 3]))
    await assert_same_chain(c, [0, 1, 2, 3], top)


async def test_tolerates_one_down_halts_with_two_down_and_catches_up(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded])
    alice, bob = funded[0], funded[1]
    await c.wait_height(0, 2)

    # One of four down: the other three keep committing transfers.
    c.stop(3)
    client = await RawClient.connect(c[0].addr)
    try:
        start = await c.height(0)
        for nonce in range(3):
            await client.submit(transfer(alice, bob.public_key, 10, nonce))
        for i in (0, 1, 2):
            await c.wait_height(i, start + 2)

        async def nonce_is(n: int) -> bool:
            res = await client.call("query", {"key": keyspace.account(alice.public_key)})
            return bool(unpack(res["value"])["nonce"] == n)

        await poll(lambda: nonce_is(3), timeout_s=30, what="3 transfers with one validator down")

        # Two of four down: no quorum, so no new height, even with a tx waiting.
        c.stop(2)

        async def settled() -> bool:
            a, b = await heights(c, [0, 1])
            return a == b

        await poll(settled, timeout_s=10, what="the two survivors to agree on a height")
        halted_at = await c.height(0)
        await client.submit(transfer(alice, bob.public_key, 10, 3))
        deadline = trio.current_time() + HALT_WINDOW_S
        while trio.current_time() < deadline:
            assert await heights(c, [0, 1]) == [halted_at, halted_at], "committed without quorum"
            await trio.sleep(0.2)
        assert (await c.status(0))["mempool"] == 1
    finally:
        await client.aclose()
    await assert_same_chain(c, [0, 1], halted_at)

    # Both come back: they catch up and the chain moves on (the waiting tx commits).
    c.start(2)
    c.start(3)
    for i in range(4):
        await c.wait_height(i, halted_at + 2, timeout_s=60)
    client = await RawClient.connect(c[2].addr)
    try:
        await poll(lambda: _nonce_at(client, alice, 4), timeout_s=30, what="the waiting tx")
    finally:
        await client.aclose()
    top = min(await heights(c, [0, 1, 2, 3]))
    await assert_same_chain(c, [0, 1, 2, 3], top)


async def _nonce_at(client: RawClient, who: KeyPair, n: int) -> bool:
    res = await client.call("query", {"key": keyspace.account(who.public_key)})
    return bool(unpack(res["value"])["nonce"] >= n)


async def test_kill9_never_double_signs_and_keeps_committed_blocks(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded],
                        empty_block_interval_ms=0)
    victim = 1
    rng = random.Random(1234)
    print("seed 1234")
    await c.wait_height(0, 2)
    survivors = [0, 2, 3]
    kept: dict[int, bytes] = {}

    async def load(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep transfers flowing (to the survivors) so that kills land mid-height."""
        senders = funded[:4]
        nonces = [0] * len(senders)
        clients = [await RawClient.connect(c[i].addr) for i in survivors]
        task_status.started()
        try:
            while True:
                for j, s in enumerate(senders):
                    try:
                        await clients[j % len(clients)].submit(
                            transfer(s, funded[7].public_key, 1, nonces[j]))
                        nonces[j] += 1
                    except InvalidTx:
                        pass  # e.g. a nonce raced ahead of a recheck; the next one fixes it
                await trio.sleep(0.01)
        finally:
            with trio.CancelScope(shield=True):  # close them all even though we are cancelled
                for cl in clients:
                    await cl.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(load)
        for _ in range(3):
            await trio.sleep(rng.uniform(0.2, 1.5))  # a random moment, not an assertion
            before = await c.height(victim)
            for h in range(max(1, before - 3), before + 1):
                kept[h] = await c.block_hash(victim, h)
            c.kill(victim)
            base = max(await heights(c, survivors))
            for i in survivors:
                await c.wait_height(i, base + 2)
            c.start(victim)
            # restarted from its store: every block it had committed is still there
            for h, bh in kept.items():
                assert await c.block_hash(victim, h) == bh
            target = max(await heights(c, survivors))
            await c.wait_height(victim, target + 1, timeout_s=60)
        nursery.cancel_scope.cancel()

    top = min(await heights(c, [0, 1, 2, 3]))
    await assert_same_chain(c, [0, 1, 2, 3], top)
    c.stop_all()
    for v in c.validators:
        with Store(v.home / "ledger.sqlite") as store:
            assert store.evidence() == [], f"{v.name} recorded equivocation"
            # the victim's committed blocks survived every kill -9
            for h, bh in kept.items():
                blk = store.block(h)
                assert blk is not None
                assert blk.hash() == bh
            assert store.height() >= top
    # Double signing would also show as two precommits of the victim in the certificates:
    # each height has exactly one block, so one commit per height is the whole story.
    with Store(c[0].home / "ledger.sqlite") as store:
        for h in range(1, top + 1):
            commit = store.commit(h)
            assert commit is not None
            signers = [k for k, _ in commit.signatures]
            assert len(signers) == len(set(signers))
            for k, sig in commit.signatures:
                Vote(PRECOMMIT, h, commit.round, commit.block_hash, k, sig).verify(c.genesis.chain_id)


async def test_header_and_key_subscriptions(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded])
    alice, bob = funded[0], funded[1]
    sub = await RawClient.connect(c[2].addr)
    sender = await RawClient.connect(c[0].addr)
    try:
        assert await sub.call("subscribe_headers") == {"subscribed": True}
        assert await sub.call("subscribe_key", {"key": keyspace.account(bob.public_key)}) == {
            "subscribed": True}
        tx = transfer(alice, bob.public_key, 99, 0)
        await sender.submit(tx)
        heights: list[int] = []
        event_height = None
        tx_height = None
        with trio.fail_after(30):
            while event_height is None or tx_height is None or heights[-1] < event_height:
                msg = await sub.receive()
                assert msg is not None
                if msg["push"] == "header":
                    block = Block.from_wire(msg["block"])
                    Commit.from_wire(msg["commit"]).verify(c.genesis.chain_id, c.genesis.validators)
                    heights.append(block.header.height)
                    if tx.encode() in block.txs:
                        tx_height = block.header.height
                else:
                    assert msg["push"] == "event"
                    assert msg["key"] == keyspace.account(bob.public_key)
                    event_height = msg["height"]
        assert event_height == tx_height
        assert heights == list(range(heights[0], heights[0] + len(heights)))  # in order, no gaps
    finally:
        await sub.aclose()
        await sender.aclose()

    # the light client's verified subscription follows the same chain
    async with LedgerClient(c.genesis, c.addrs) as client:
        seen = []
        with trio.fail_after(30):
            # headers() is an async generator (typed as an iterator): close it when done early
            gen = cast(AsyncGenerator[Header, None], client.headers())
            async with aclosing(gen) as headers:
                async for header in headers:
                    seen.append(header.height)
                    if len(seen) == 3:
                        break
        assert seen == list(range(seen[0], seen[0] + 3))
    # SIGTERM is a clean stop
    assert [c.stop(i) for i in range(4)] == [0, 0, 0, 0]



async def test_conflicting_votes_are_recorded_as_evidence(
    cluster_factory: Callable[..., Cluster]
) -> None:
    """The negative control of the double-sign checks above: a validator key that does sign
    two different prevotes for one (height, round) ends up in the evidence store."""
    c = cluster_factory(4, empty_block_interval_ms=3_600_000)  # no blocks: height 1 stays open
    g = c.genesis
    culprit = c.keys[1]
    c.stop(1)  # its key is used from here on by this test, as a Byzantine peer
    client = await RawClient.connect(c[0].addr)
    try:
        challenge = new_challenge()
        await client.send(hello_message(g.chain_id, g.hash(), culprit, challenge))
        hello = await client.receive()
        check_auth(await client.receive(), chain_id=g.chain_id, their_key=c.keys[0].public_key,
                   our_challenge=challenge, genesis_hash=g.hash())
        await client.send(auth_message(culprit, g.chain_id, hello["hello"]["challenge"], g.hash()))
        votes = [Vote(PREVOTE, 1, 0, bh, culprit.public_key).signed(culprit, g.chain_id)
                 for bh in (b"\x42" * 32, NIL)]
        for vote in votes:
            await client.send({"gossip": "vote", "vote": vote.to_wire()})
        # answered after both votes were handled: frames of one connection are taken in order
        assert (await client.call("status"))["height"] == 0
    finally:
        await client.aclose()
    c.stop(0)
    with Store(c[0].home / "ledger.sqlite") as store:
        evidence = store.evidence()
    assert len(evidence) == 1
    assert {evidence[0][0], evidence[0][1]} == set(votes)
