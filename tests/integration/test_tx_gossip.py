"""Tx gossip between real validator processes: batches of txs per frame, malformed batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ledger import keyspace
from ledger.codec import unpack
from ledger.keys import KeyPair
from ledger.node import TX_GOSSIP_BATCH
from ledger.peer import auth_message, check_auth, hello_message, new_challenge
from tests.conftest import FUNDS, Cluster, RawClient, poll, transfer

pytestmark = pytest.mark.slow


async def as_validator(c: Cluster, target: int, key: KeyPair) -> RawClient:
    """A connection to validator ``target`` authenticated with validator key ``key``."""
    g = c.genesis
    client = await RawClient.connect(c[target].addr)
    challenge = new_challenge()
    await client.send(hello_message(g.chain_id, g.hash(), key, challenge))
    hello = await client.receive()
    check_auth(await client.receive(), chain_id=g.chain_id, their_key=c.keys[target].public_key,
               our_challenge=challenge, genesis_hash=g.hash())
    await client.send(auth_message(key, g.chain_id, hello["hello"]["challenge"], g.hash()))
    return client


async def test_a_gossiped_batch_is_admitted_and_a_malformed_one_closes_the_peer(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded],
                        empty_block_interval_ms=3_600_000)  # blocks only for txs
    peer_key = c.keys[1]
    c.stop(1)  # its key is used by this test, as the gossiping peer
    alice, bob = funded[0], funded[1]
    txs = [transfer(alice, bob.public_key, 1, n) for n in range(3)]
    client = await as_validator(c, 0, peer_key)
    try:
        await client.send({"gossip": "txs", "txs": [t.encode() for t in txs]})
        await client.send({"gossip": "tx", "tx": transfer(bob, alice.public_key, 1, 0).encode()})

        async def nonces_are(want: dict[bytes, int]) -> bool:
            for address, nonce in want.items():
                res = await client.call("query", {"key": keyspace.account(address)})
                if res["value"] is None or unpack(res["value"])["nonce"] != nonce:
                    return False
            return True

        await poll(lambda: nonces_are({alice.public_key: 3, bob.public_key: 1}), timeout_s=30,
                   what="the gossiped txs to be committed")
        too_many = [txs[0].encode()] * (TX_GOSSIP_BATCH + 1)
        await client.send({"gossip": "txs", "txs": too_many})
        while (msg := await client.receive()) is not None:
            assert "error" in msg or "gossip" in msg or "push" in msg
    finally:
        await client.aclose()
