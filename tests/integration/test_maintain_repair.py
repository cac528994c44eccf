"""Auto-repair against real shard stores (in-process, loopback TCP; the in-memory grid of
test_storage_inprocess): two nodes die, and the next round of the maintainer brings the
object back to 20 of 20 shards on other nodes."""

from __future__ import annotations

import math
from pathlib import Path

import trio

from tests.integration.test_storage_inprocess import make_env, shard_nodes, write_file
from threebot.storage.maintain import Policy, RoundEvent, maintain

INTERVAL_S = 1.0


async def test_losing_two_shards_is_repaired_within_one_interval(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            grid, client = await make_env(tmp_path, nursery)
            data = write_file(tmp_path / "kept.bin", 150_000, seed=3)
            cap = (await client.put(tmp_path / "kept.bin")).cap
            send, events = trio.open_memory_channel[RoundEvent](math.inf)
            nursery.start_soon(maintain, client, Policy(interval_s=INTERVAL_S, repair_at=18),
                               send.send_nowait)

            first = await events.receive()
            assert (first.round, first.outcome, first.healthy) == (0, "ok", 20)

            lost = (await shard_nodes(client, cap))[:2]
            for node in lost:
                grid.kill(node)
            killed_at = trio.current_time()

            second = await events.receive()
            assert (second.round, second.outcome) == (1, "repaired"), second
            assert (second.healthy, second.healthy_after) == (18, 20)
            # Round 1 started one interval after round 0, so within one interval of the loss.
            assert trio.current_time() - killed_at < INTERVAL_S + 10

            after = await client.check(cap)
            assert (after.healthy, after.total) == (20, 20)
            assert not set(lost) & set(await shard_nodes(client, cap))
            out = tmp_path / "out.bin"
            await client.get(cap, out)
            assert out.read_bytes() == data

            third = await events.receive()
            assert (third.round, third.outcome, third.healthy) == (2, "ok", 20)
            nursery.cancel_scope.cancel()
