"""Real validator processes on 127.0.0.1: commits, fault tolerance, catch-up, crash safety."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ledger.keys import KeyPair
from tests.conftest import FUNDS, Cluster, RawClient, poll, transfer

pytestmark = pytest.mark.slow


async def test_four_validators_commit_transfers(
    cluster_factory: Callable[..., Cluster], funded: list[KeyPair]
) -> None:
    c = cluster_factory(4, accounts=[(k.public_key, FUNDS) for k in funded])
    alice, bob = funded[0], funded[1]
    client = await RawClient.connect(c[0].addr)
    hashes = [await client.submit(transfer(alice, bob.public_key, 1000 + i, i)) for i in range(5)]
    await client.aclose()

    async def all_in() -> bool:
        from ledger import keyspace
        from ledger.codec import unpack

        for i in range(4):
            for h in hashes:
                client = await RawClient.connect(c[i].addr)
                try:
                    res = await client.call("query", {"key": keyspace.tx_result(h), "height": 0})
                finally:
                    await client.aclose()
                if res["value"] is None:
                    return False
                assert unpack(res["value"])["code"] == "ok"
        return True

    await poll(all_in, timeout_s=30, what="5 transfers committed on all validators")
