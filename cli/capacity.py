"""`tfgrid capacity [--by farm|country|node]`: the operators' report.

``total`` and ``reserved`` add up every registered node (reserved: what live contracts hold);
``free`` adds up what is not reserved on the nodes that are *up*, since only those can take a
new contract. ``groups`` splits the same figures by farm, country or node (empty without
``--by``). All sizes are bytes, cores are whole cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click

from cli import chain
from cli.node import RESOURCES, NodeInfo, grid_nodes
from cli.output import emit, human_bytes, json_option, table

GROUPINGS = ("farm", "country", "node")


def _zero() -> dict[str, int]:
    return dict.fromkeys(RESOURCES, 0)


def _add(acc: dict[str, int], res: dict[str, int]) -> None:
    for r in RESOURCES:
        acc[r] += res[r]


def summarize(nodes: Iterable[NodeInfo]) -> dict[str, Any]:
    """{"total","reserved","free","nodes_up","nodes_down"} over ``nodes``."""
    total, reserved, free = _zero(), _zero(), _zero()
    up = down = 0
    for n in nodes:
        _add(total, n.total())
        _add(reserved, n.reserved())
        if n.up:
            _add(free, n.free())
            up += 1
        else:
            down += 1
    return {"total": total, "reserved": reserved, "free": free, "nodes_up": up,
            "nodes_down": down}


def _keys(by: str) -> Callable[[NodeInfo], Any]:
    return {"farm": lambda n: n.farm, "country": lambda n: n.country,
            "node": lambda n: n.id}[by]


def capacity_doc(nodes: list[NodeInfo], by: str | None) -> dict[str, Any]:
    """The `capacity` document; each group carries its key under the ``by`` name."""
    doc = summarize(nodes)
    groups: list[dict[str, Any]] = []
    if by is not None:
        key = _keys(by)
        members: dict[Any, list[NodeInfo]] = {}
        for n in nodes:
            members.setdefault(key(n), []).append(n)
        for k in sorted(members):
            group: dict[str, Any] = {by: k}
            if by == "node":
                n = members[k][0]
                group.update(farm=n.farm, country=n.country, status=n.status)
            group.update(summarize(members[k]))
            groups.append(group)
    doc["groups"] = groups
    return doc


def _cores_mem_disk(res: dict[str, int]) -> str:
    return f"{res['cores']} / {human_bytes(res['memory'])} / {human_bytes(res['storage'])}"


def _human(doc: dict[str, Any], by: str | None) -> str:
    rows = [{"scope": "grid", **doc}]
    if by is not None:
        rows += [{"scope": f"{by} {g[by]}", **g} for g in doc["groups"]]
    shown = [{"scope": r["scope"], "total": _cores_mem_disk(r["total"]),
              "reserved": _cores_mem_disk(r["reserved"]), "free": _cores_mem_disk(r["free"]),
              "up": r["nodes_up"], "down": r["nodes_down"]} for r in rows]
    return "cores / memory / storage\n" + table(
        shown, [("scope", "scope"), ("total", "total"), ("reserved", "reserved"),
                ("free", "free (up nodes)"), ("up", "up"), ("down", "down")])


@click.command()
@json_option
@click.option("--by", type=click.Choice(GROUPINGS), default=None,
              help="Also report per farm, country or node.")
@click.pass_context
def capacity(ctx: click.Context, by: str | None) -> None:
    """Total, reserved and free capacity of the grid; nodes up and down."""
    home = chain.home_of(ctx)
    genesis = home.load_genesis()

    async def go() -> list[NodeInfo]:
        async with chain.open_client(home) as client:
            return (await grid_nodes(client, genesis)).nodes

    emit(ctx, capacity_doc(chain.run(go), by), lambda d: _human(d, by))
