"""`tfgrid bot run`: the 3Bot daemon in the foreground.

Its first duty is keeping the home's stored objects alive (:mod:`threebot.storage.maintain`):
every interval it checks each object of the home's index and repairs those down to the
threshold. Messaging, sharing and the private database are later duties of the same daemon.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import click
import trio

from cli import chain
from cli.gridstore import open_storage
from cli.home import Home
from cli.output import json_option, want_json
from threebot.storage.maintain import (
    DEFAULT_INTERVAL_S,
    DEFAULT_REPAIR_AT,
    Policy,
    RoundEvent,
    maintain,
)


@click.group()
def bot() -> None:
    """The 3Bot daemon (today: automatic storage repair)."""


def _line(e: RoundEvent) -> str:
    health = "" if e.healthy is None else f" {e.healthy}/{e.total}"
    after = "" if e.healthy_after is None else f" -> {e.healthy_after}/{e.total}"
    why = f": {e.message}" if e.message else ""
    return f"round {e.round}: {e.name} {e.outcome}{health}{after}{why}"


@bot.command()
@json_option
@click.option("--interval", "interval_s", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_INTERVAL_S, show_default=True, metavar="SECONDS",
              help="Time between checks of every stored object.")
@click.option("--repair-at", type=click.IntRange(1, 19), default=DEFAULT_REPAIR_AT,
              show_default=True, metavar="HEALTHY",
              help="Repair an object when this many or fewer of its 20 shards are good.")
@click.option("--once", is_flag=True, help="Run one round and exit.")
@click.pass_context
def run(ctx: click.Context, interval_s: float, repair_at: int, once: bool) -> None:
    """Run the 3Bot in the foreground until SIGINT/SIGTERM.

    For now the daemon does one thing: it keeps this home's stored objects (`storage put`,
    `image push`) repaired. Every interval it checks each one and repairs those down to
    --repair-at good shards (16-of-20 survives only 4 losses). Messaging (`bot send`,
    `bot inbox`, `bot share`) and the private database come in a later issue.

    Prints one line per object and round (--json: one JSON object per line); lost
    objects and failed repairs go to stderr.
    """
    home = chain.home_of(ctx)
    policy = Policy(interval_s=interval_s, repair_at=repair_at)
    as_json = want_json(ctx)

    def show(e: RoundEvent) -> None:
        if as_json:
            click.echo(json.dumps(e.doc()))
        else:
            click.echo(_line(e), err=e.outcome in ("lost", "failed"))

    if not as_json:
        click.echo(f"3Bot: checking the objects of {home.root} every {interval_s:g}s, "
                   f"repairing at {repair_at} or fewer good shards of 20", err=True)
    chain.run(lambda: _serve(home, policy, show, 1 if once else None))


async def _serve(home: Home, policy: Policy, show: Callable[[RoundEvent], None],
                 rounds: int | None) -> None:
    async with open_storage(home) as storage:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                await maintain(storage, policy, show, rounds=rounds)
                nursery.cancel_scope.cancel()
