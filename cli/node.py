"""`tfgrid node run|list|show`: the machines of the grid, read with proofs from the ledger.

A node's status is computed the way the ledger defines it (:func:`ledger.state.node_status`):
``up`` if its last uptime report is within ``uptime_down_after_ms`` of the newest verified
block time, else ``down``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cli import chain
from cli.output import emit, human_age, human_bytes, json_option, pairs, table
from ledger import keyspace
from ledger.client import LedgerClient
from ledger.errors import ConfigError, NotFound, TfgridError
from ledger.state import Params, node_status
from ledger.types import Genesis

RESOURCES = ("cores", "memory", "storage")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node entry with its status as of the newest verified block time."""

    entry: dict[str, Any]
    status: str

    @property
    def id(self) -> int:
        return int(self.entry["id"])

    @property
    def farm(self) -> int:
        return int(self.entry["farm"])

    @property
    def country(self) -> str:
        return str(self.entry.get("location", {}).get("country", ""))

    @property
    def public_key(self) -> bytes:
        return bytes(self.entry["public_key"])

    @property
    def up(self) -> bool:
        return self.status == "up"

    def total(self) -> dict[str, int]:
        cap = self.entry.get("capacity", {})
        return {r: int(cap.get(r, 0)) for r in RESOURCES}

    def reserved(self) -> dict[str, int]:
        used = self.entry.get("used", {})
        return {r: int(used.get(r, 0)) for r in RESOURCES}

    def free(self) -> dict[str, int]:
        total, reserved = self.total(), self.reserved()
        return {r: max(0, total[r] - reserved[r]) for r in RESOURCES}

    def fits(self, resources: dict[str, int]) -> bool:
        """Whether ``{"cpu","memory","disk"}`` fits in what this node has free."""
        free = self.free()
        return (resources["cpu"] <= free["cores"] and resources["memory"] <= free["memory"]
                and resources["disk"] <= free["storage"])

    def doc(self) -> dict[str, Any]:
        """The `node list` document: {"id","farm","country","cores","memory","storage",
        "status","last_uptime"} (last_uptime: block time in ms of the last report, or None)."""
        total = self.total()
        last = int(self.entry.get("last_uptime_ms", 0))
        return {"id": self.id, "farm": self.farm, "country": self.country,
                "cores": total["cores"], "memory": total["memory"],
                "storage": total["storage"], "status": self.status,
                "last_uptime": last or None}

    def show_doc(self, contracts: list[int]) -> dict[str, Any]:
        """`node show`: the list document plus key, location, endpoint, reserved/free and the
        live contracts assigned to the node."""
        doc = self.doc()
        doc.update({
            "public_key": self.public_key.hex(),
            "city": str(self.entry.get("location", {}).get("city", "")),
            "endpoint": str(self.entry.get("endpoint", "")),
            "reserved": self.reserved(),
            "free": self.free(),
            "contracts": contracts,
        })
        return doc


@dataclass(frozen=True, slots=True)
class GridNodes:
    nodes: list[NodeInfo]
    now_ms: int  # time of the newest verified block, against which status is computed


async def grid_nodes(client: LedgerClient, genesis: Genesis) -> GridNodes:
    """Every registered node, read with proofs, in id order."""
    params = Params.from_genesis(genesis)
    header, _commit = await client.latest()
    next_id = await chain.counter(client, "next_node_id")
    entries = await chain.read_entries(client, [keyspace.node(i) for i in range(1, next_id)])
    nodes = [NodeInfo(e, node_status(e, header.time_ms, params.uptime_down_after_ms))
             for e in entries if e is not None]
    return GridNodes(nodes, header.time_ms)


async def node_info(client: LedgerClient, genesis: Genesis, node_id: int) -> NodeInfo:
    """One node, read with its proof. Raises :class:`NotFound`."""
    params = Params.from_genesis(genesis)
    header, _commit = await client.latest()
    entry = await chain.read_entry(client, keyspace.node(node_id))
    if entry is None:
        raise NotFound(f"no node {node_id} on the ledger (see `tfgrid node list`)")
    return NodeInfo(entry, node_status(entry, header.time_ms, params.uptime_down_after_ms))


async def node_hint(client: LedgerClient, genesis: Genesis, node_id: int) -> str:
    """A suffix for a timeout message saying the node is down, when the ledger says so."""
    try:
        info = await node_info(client, genesis, node_id)
    except TfgridError:
        return ""
    return "" if info.up else f"; node {node_id} is down (no recent uptime report)"


def _list_human(rows: list[dict[str, Any]], now_ms: int) -> str:
    shown = [{**r, "memory": human_bytes(r["memory"]), "storage": human_bytes(r["storage"]),
              "last_uptime": human_age(r["last_uptime"], now_ms)} for r in rows]
    return table(shown, [("id", "id"), ("farm", "farm"), ("country", "country"),
                         ("cores", "cores"), ("memory", "memory"), ("storage", "storage"),
                         ("status", "status"), ("last_uptime", "last uptime")],
                 empty="no nodes yet")


def _res_human(res: dict[str, int]) -> str:
    return (f"{res['cores']} cores, {human_bytes(res['memory'])} memory, "
            f"{human_bytes(res['storage'])} storage")


@click.group()
def node() -> None:
    """Nodes: the machines that run workloads (and `node run`, the agent itself)."""


@node.command(name="list")
@json_option
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Every node with its capacity and status (up: reported uptime recently)."""
    home = chain.home_of(ctx)
    genesis = home.load_genesis()

    async def go() -> GridNodes:
        async with chain.open_client(home) as client:
            return await grid_nodes(client, genesis)

    grid = chain.run(go)
    emit(ctx, [n.doc() for n in grid.nodes], lambda rows: _list_human(rows, grid.now_ms))


@node.command()
@json_option
@click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
@click.pass_context
def show(ctx: click.Context, node_id: int) -> None:
    """One node: capacity, reserved and free resources, status, its live contracts."""
    home = chain.home_of(ctx)
    genesis = home.load_genesis()

    async def go() -> tuple[dict[str, Any], int]:
        async with chain.open_client(home) as client:
            info = await node_info(client, genesis, node_id)
            listed = await chain.read_entry(client, keyspace.node_contracts(node_id))
            header, _ = await client.latest()
            return info.show_doc([int(c) for c in (listed or {}).get("contracts", [])]), \
                header.time_ms

    doc, now_ms = chain.run(go)

    def human(d: dict[str, Any]) -> str:
        return pairs({
            "id": d["id"], "farm": d["farm"], "location": f"{d['country']} {d['city']}".strip(),
            "status": f"{d['status']} (last uptime {human_age(d['last_uptime'], now_ms)})",
            "capacity": _res_human({r: d[r] for r in RESOURCES}),
            "reserved": _res_human(d["reserved"]), "free": _res_human(d["free"]),
            "endpoint": d["endpoint"] or None, "public_key": d["public_key"],
            "contracts": d["contracts"],
        })

    emit(ctx, doc, human)


@node.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Agent config file (TOML, or JSON if it ends in .json).")
@click.option("--farm", "farm_id", type=click.IntRange(min=1), default=None,
              help="The farm this node belongs to.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Node key, containers, volumes, images (the node's data disk).")
@click.option("--country", default=None, metavar="CC", help="Node location: country code.")
@click.option("--city", default=None, help="Node location: city.")
@click.option("--reserve-percent", type=click.IntRange(0, 99), default=None,
              help="Share of the machine kept for the system [default 10].")
@click.option("--host-address", default=None,
              help="Address where published container ports are reachable.")
@click.option("--agent-id", default=None, help="Names this agent's host network objects.")
@click.option("--subnet-index", type=click.IntRange(1, 254), default=None,
              help="This agent's container /24 (distinct per agent on one machine).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.pass_context
def run(ctx: click.Context, config_path: Path | None, farm_id: int | None,
        data_dir: Path | None, country: str | None, city: str | None,
        reserve_percent: int | None, host_address: str | None, agent_id: str | None,
        subnet_index: int | None, log_file: Path | None) -> None:
    """Run the node agent in the foreground (as root) until SIGTERM or Ctrl-C.

    Ledger peers and genesis come from the config file or else from this home's context.
    Stopping the agent leaves its containers running; the next start adopts them.
    """
    from zos_agent import config as agent_config
    from zos_agent.identity import load_or_create_node_key
    from zos_agent.main import run_agent

    in_file = agent_config.read_file(config_path) if config_path is not None else {}
    overrides: dict[str, Any] = {
        "farm_id": farm_id, "data_dir": data_dir, "country": country, "city": city,
        "reserve_percent": reserve_percent, "host_address": host_address,
        "agent_id": agent_id, "subnet_index": subnet_index, "log_file": log_file,
    }
    if "peers" not in in_file or "genesis" not in in_file:
        home = chain.home_of(ctx)
        try:
            context = home.load_context()
        except ConfigError as exc:
            raise ConfigError(f"no ledger peers: give --config with peers and genesis, or "
                              f"use a home with a context ({exc})") from None
        overrides["peers"] = in_file.get("peers", list(context.peers))
        overrides["genesis"] = in_file.get("genesis", context.genesis_path)
    cfg = agent_config.load(config_path, overrides)
    key = load_or_create_node_key(cfg.data_dir)
    click.echo(f"node key {key.address} (it pays its own fees: fund it with "
               f"`tfgrid account transfer {key.address} AMOUNT`)", err=True)
    sys.exit(run_agent(cfg))
