"""`tfgrid farm create|list`: a farmer's group of nodes."""

from __future__ import annotations

from typing import Any

import click

from cli import chain
from cli.output import emit, json_option, table
from cli.twin import twin_of_key
from ledger import keyspace
from ledger.client import LedgerClient
from ledger.errors import ConfigError, NotFound

_COLUMNS = [("id", "id"), ("name", "name"), ("owner", "owner twin"), ("country", "country")]


@click.group()
def farm() -> None:
    """Farms: a farmer's group of nodes, owned by a twin."""


@farm.command()
@json_option
@click.argument("name")
@click.option("--country", required=True, metavar="CC", help="ISO 3166 two-letter country code.")
@click.pass_context
def create(ctx: click.Context, name: str, country: str) -> None:
    """Create farm NAME owned by this identity's twin (register a twin first)."""
    cc = country.strip().upper()
    if len(cc) != 2 or not cc.isalpha() or not cc.isascii():
        raise ConfigError(f"--country {country!r} is not a two-letter country code")
    home = chain.home_of(ctx)
    key = home.load_identity()
    genesis = home.load_genesis()

    async def go() -> dict[str, Any]:
        async with chain.open_client(home) as client:
            owner = await twin_of_key(client, key.public_key)
            if owner is None:
                raise NotFound("this identity has no twin: run `tfgrid twin register NAME` first")
            await chain.send_tx(client, key, genesis, "farm_create",
                                {"name": name, "country": cc})
            # Ours is the newest farm of this owner with this name: look from the newest down.
            for farm_id in range(await _next_farm_id(client) - 1, 0, -1):
                entry = await chain.read_entry(client, keyspace.farm(farm_id))
                if entry is not None and entry["name"] == name and entry["owner"] == owner["id"]:
                    return farm_doc(entry)
            raise NotFound(f"farm {name!r} was created but cannot be read back")

    emit(ctx, chain.run(go), lambda d: table([d], _COLUMNS))


@farm.command(name="list")
@json_option
@click.pass_context
def list_(ctx: click.Context) -> None:
    """All farms on the ledger."""
    home = chain.home_of(ctx)

    async def go() -> list[dict[str, Any]]:
        async with chain.open_client(home) as client:
            return await list_farms(client)

    emit(ctx, chain.run(go), lambda rows: table(rows, _COLUMNS, empty="no farms yet"))


def farm_doc(entry: dict[str, Any]) -> dict[str, Any]:
    return {"id": entry.get("id"), "name": entry.get("name"), "owner": entry.get("owner"),
            "country": entry.get("country")}


async def list_farms(client: LedgerClient) -> list[dict[str, Any]]:
    """Every farm, in id order, each read with its proof."""
    farms = []
    for farm_id in range(1, await _next_farm_id(client)):
        entry = await chain.read_entry(client, keyspace.farm(farm_id))
        if entry is not None:
            farms.append(farm_doc(entry))
    return farms


async def _next_farm_id(client: LedgerClient) -> int:
    counters = await chain.read_entry(client, keyspace.counters())
    return int((counters or {}).get("next_farm_id", 1))
