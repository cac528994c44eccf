"""The auto-repair decision (pure) and the maintainer's rounds on trio's MockClock."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from ledger.errors import LedgerUnavailable
from threebot.storage.client import CheckReport, RepairReport, ShardHealth
from threebot.storage.errors import NotEnoughShards, PlacementError
from threebot.storage.index import IndexEntry
from threebot.storage.maintain import Action, Policy, RoundEvent, decide, maintain


@pytest.mark.parametrize(("healthy", "manifests", "repair_at", "want"), [
    (20, 20, 18, Action.NOTHING),
    (19, 20, 18, Action.NOTHING),
    (18, 20, 18, Action.REPAIR),   # two shards gone: repair while 2 more may still fail
    (16, 20, 18, Action.REPAIR),   # the last moment a repair is possible
    (15, 20, 18, Action.LOST),
    (0, 0, 18, Action.LOST),
    (20, 18, 18, Action.REPAIR),   # manifest copies count too
    (20, 19, 18, Action.NOTHING),
    (19, 20, 19, Action.REPAIR),   # a stricter owner
    (17, 20, 16, Action.NOTHING),  # a laxer one
    (16, 20, 16, Action.REPAIR),
])
def test_decide(healthy: int, manifests: int, repair_at: int, want: Action) -> None:
    assert decide(healthy, manifests, 16, 20, repair_at) is want


def test_policy_bounds() -> None:
    for bad in ({"interval_s": 0}, {"repair_at": 0}, {"repair_at": 20}):
        with pytest.raises(ValueError, match="must be"):
            Policy(**bad)


def report(cap: str, healthy: int, manifests: int = 20) -> CheckReport:
    shards = tuple(ShardHealth(i, 100 + i, "ok" if i < healthy else "unreachable")
                   for i in range(20))
    return CheckReport(cap, 1, 1000, 16, 20, shards, manifests)


class ScriptedClient:
    """Objects whose health each round comes from a script; repair takes ``repair_s``."""

    def __init__(self, script: dict[str, list[int | Exception]], repair_s: float = 0.0) -> None:
        self.script = script
        self.health = {cap: 20 for cap in script}
        self.repair_s = repair_s
        self.calls: list[tuple[float, str, str]] = []
        self.rounds: dict[str, int] = {cap: 0 for cap in script}

    def ls(self) -> list[IndexEntry]:
        return [IndexEntry(cap, f"obj-{cap}", 1000, 0, ()) for cap in self.script]

    async def check(self, cap_text: str, *, deep: bool = False) -> CheckReport:
        self.calls.append((trio.current_time(), "check", cap_text))
        step = self.rounds[cap_text]
        self.rounds[cap_text] += 1
        script = self.script[cap_text]
        got = script[min(step, len(script) - 1)]
        if isinstance(got, Exception):
            raise got
        return report(cap_text, got)

    async def repair(self, cap_text: str, *, deep: bool = False) -> RepairReport:
        self.calls.append((trio.current_time(), "repair", cap_text))
        await trio.sleep(self.repair_s)
        before = report(cap_text, 18)
        return RepairReport(cap_text, before, (), (), 2, 20)


async def test_rounds_check_every_interval_and_repair_at_the_threshold(
        autojump_clock: MockClock) -> None:
    client = ScriptedClient({"a": [20, 19, 18, 20], "b": [20, 20, 20, 15]})
    events: list[RoundEvent] = []
    t0 = trio.current_time()
    await maintain(client, Policy(interval_s=60, repair_at=18), events.append, rounds=4)
    checks = [(t - t0, cap) for t, kind, cap in client.calls if kind == "check"]
    assert checks == [(0, "a"), (0, "b"), (60, "a"), (60, "b"), (120, "a"), (120, "b"),
                      (180, "a"), (180, "b")]
    assert [(t - t0, cap) for t, kind, cap in client.calls if kind == "repair"] == [(120, "a")]
    assert [(e.round, e.name, e.outcome, e.healthy, e.healthy_after) for e in events] == [
        (0, "obj-a", "ok", 20, None), (0, "obj-b", "ok", 20, None),
        (1, "obj-a", "ok", 19, None), (1, "obj-b", "ok", 20, None),
        (2, "obj-a", "repaired", 18, 20), (2, "obj-b", "ok", 20, None),
        (3, "obj-a", "ok", 20, None), (3, "obj-b", "lost", 15, None)]
    assert trio.current_time() - t0 == 180  # the last round does not sleep after itself


async def test_an_overrunning_round_is_followed_at_once(autojump_clock: MockClock) -> None:
    client = ScriptedClient({"a": [17, 20, 20]}, repair_s=90)
    t0 = trio.current_time()
    await maintain(client, Policy(interval_s=60), lambda e: None, rounds=3)
    assert [(t - t0, kind) for t, kind, _ in client.calls] == [
        (0, "check"), (0, "repair"), (90, "check"), (150, "check")]


async def test_errors_become_events_and_the_loop_goes_on(autojump_clock: MockClock) -> None:
    client = ScriptedClient({
        "a": [LedgerUnavailable("no ledger peer answered"), 20],
        "b": [NotEnoughShards("manifest shards", 16, 3), 20],
        "c": [17]})

    async def no_room(cap_text: str, *, deep: bool = False) -> RepairReport:
        raise PlacementError("the grid has only 2 usable nodes")

    client.repair = no_room  # type: ignore[method-assign]
    events: list[RoundEvent] = []
    await maintain(client, Policy(interval_s=10), events.append, rounds=2)
    assert [(e.round, e.cap, e.outcome) for e in events] == [
        (0, "a", "failed"), (0, "b", "lost"), (0, "c", "failed"),
        (1, "a", "ok"), (1, "b", "ok"), (1, "c", "failed")]
    assert events[0].message == "no ledger peer answered"
    assert "usable nodes" in events[2].message
    assert events[2].doc()["healthy"] == 17
