"""Automatic repair: the 3Bot's watch over the objects it stored.

16-of-20 coding survives the loss of 4 shards, so waiting for the 5th would lose data. Every
``interval_s`` the maintainer runs ``check`` on each object of the home's index and ``repair``
on those whose health reached the threshold: ``repair_at`` (18 by default, "two shards gone")
or fewer good shards, or as few manifest shards. A repair that fails (too few nodes left,
the ledger unreachable) is tried again the next round; nothing here gives up on an object.

The decision is the pure function :func:`decide`; :func:`maintain` is the trio loop around
it. Rounds start every ``interval_s`` on trio's clock (a round that overruns is followed by
the next one at once, never by two), and each object's outcome is handed to ``report`` as a
:class:`RoundEvent`, so the daemon decides how to print it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ledger.errors import TfgridError
from threebot.storage.client import CheckReport, RepairReport
from threebot.storage.errors import NotEnoughShards
from threebot.storage.index import IndexEntry

DEFAULT_INTERVAL_S = 300.0
DEFAULT_REPAIR_AT = 18


@dataclass(frozen=True, slots=True)
class Policy:
    """When to repair. ``repair_at`` must leave room above ``k`` (repair needs ``k`` good
    shards) and below ``n`` (a healthy object must not be repaired every round)."""

    interval_s: float = DEFAULT_INTERVAL_S
    repair_at: int = DEFAULT_REPAIR_AT

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError("interval_s must be positive")
        if not 0 < self.repair_at < 20:
            raise ValueError("repair_at must be in 1..19 (of 20 shards)")


class Action(enum.Enum):
    NOTHING = "ok"
    REPAIR = "repair"
    LOST = "lost"  # fewer than k good shards: nothing to rebuild from (until nodes return)


def decide(healthy: int, manifest_shards: int, needed: int, total: int, repair_at: int) -> Action:
    """What to do with an object whose check found ``healthy`` good shards and
    ``manifest_shards`` copies of the current manifest, coded ``needed``-of-``total``.

    Repair when either count is at or below ``repair_at``, as long as ``needed`` shards are
    left to rebuild from; below that the object is lost for now (a node may come back).
    """
    if healthy < needed:
        return Action.LOST
    if healthy <= min(repair_at, total - 1) or manifest_shards <= min(repair_at, total - 1):
        return Action.REPAIR
    return Action.NOTHING


@dataclass(frozen=True, slots=True)
class RoundEvent:
    """One object's outcome in one round.

    ``outcome`` is ``ok`` (healthy enough), ``repaired`` (``healthy_after`` set), ``lost``
    (too few shards to repair), or ``failed`` (check or repair raised; ``message`` says why).
    """

    round: int
    cap: str
    name: str
    outcome: str
    healthy: int | None
    total: int | None
    healthy_after: int | None = None
    message: str = ""

    def doc(self) -> dict[str, Any]:
        return {"round": self.round, "name": self.name, "cap": self.cap, "outcome": self.outcome,
                "healthy": self.healthy, "total": self.total,
                "healthy_after": self.healthy_after, "message": self.message}


class Maintained(Protocol):
    """What the loop needs of :class:`~threebot.storage.client.StorageClient`."""

    def ls(self) -> list[IndexEntry]: ...

    async def check(self, cap_text: str, *, deep: bool = False) -> CheckReport: ...

    async def repair(self, cap_text: str, *, deep: bool = False) -> RepairReport: ...


async def maintain_one(client: Maintained, entry: IndexEntry, policy: Policy,
                       round_: int) -> RoundEvent:
    """Check one object and repair it if :func:`decide` says so. Never raises our errors:
    they become a ``failed`` (or ``lost``) event."""
    def event(outcome: str, report: CheckReport | None, **extra: Any) -> RoundEvent:
        return RoundEvent(round_, entry.cap, entry.name, outcome,
                          None if report is None else report.healthy,
                          None if report is None else report.total, **extra)

    try:
        report = await client.check(entry.cap)
    except NotEnoughShards as exc:  # not even the manifest can be read
        return event("lost", None, message=str(exc))
    except TfgridError as exc:
        return event("failed", None, message=str(exc) or type(exc).__name__)
    action = decide(report.healthy, report.manifest_shards, report.needed, report.total,
                    policy.repair_at)
    if action is Action.NOTHING:
        return event("ok", report)
    if action is Action.LOST:
        return event("lost", report, message=f"only {report.healthy} of the {report.needed} "
                                              "shards needed are good")
    try:
        repaired = await client.repair(entry.cap)
    except TfgridError as exc:
        return event("failed", report, message=str(exc) or type(exc).__name__)
    return event("repaired", report, healthy_after=repaired.healthy)


async def maintain(client: Maintained, policy: Policy, report: Callable[[RoundEvent], None], *,
                   rounds: int | None = None,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run rounds every ``policy.interval_s`` until cancelled (or ``rounds`` rounds, for
    tests and ``--once``). Each round walks the index as it is at the start of the round,
    one object at a time (repairs are heavy; the bot is not in a hurry)."""
    task_status.started()
    next_start = trio.current_time()
    round_ = 0
    while rounds is None or round_ < rounds:
        try:
            entries = client.ls()
        except TfgridError as exc:  # the index file is unreadable: say so, try next round
            entries = []
            report(RoundEvent(round_, "", "(index)", "failed", None, None, message=str(exc)))
        for entry in entries:
            report(await maintain_one(client, entry, policy, round_))
        round_ += 1
        if rounds is not None and round_ >= rounds:
            return
        # Rounds start on a fixed grid of intervals; one that overran is followed at once.
        next_start = max(next_start + policy.interval_s, trio.current_time())
        await trio.sleep_until(next_start)
