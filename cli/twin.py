"""`tfgrid twin register|lookup`: the 3Bot phonebook."""

from __future__ import annotations

from typing import Any

import click

from cli import chain
from cli.output import emit, json_option
from ledger import keyspace
from ledger.client import LedgerClient
from ledger.config import parse_hostport
from ledger.errors import NotFound


@click.group()
def twin() -> None:
    """Twins: the phonebook of 3Bots (unique name, public key, endpoint)."""


@twin.command()
@json_option
@click.argument("name")
@click.option("--endpoint", default="", metavar="HOST:PORT",
              help="Where this twin's 3Bot receives messages (may be empty for now).")
@click.pass_context
def register(ctx: click.Context, name: str, endpoint: str) -> None:
    """Register NAME for this home's identity."""
    if endpoint:
        parse_hostport(endpoint)  # fail early, with a clear message, on a malformed endpoint
    home = chain.home_of(ctx)
    key = home.load_identity()
    genesis = home.load_genesis()

    async def go() -> dict[str, Any]:
        async with chain.open_client(home) as client:
            await chain.send_tx(client, key, genesis, "twin_register",
                                {"name": name, "endpoint": endpoint})
            doc = await twin_by_name(client, name)
            if doc is None:
                raise NotFound(f"twin {name!r} was registered but cannot be read back")
            return doc

    emit(ctx, chain.run(go))


@twin.command()
@json_option
@click.argument("name")
@click.pass_context
def lookup(ctx: click.Context, name: str) -> None:
    """Look NAME up in the phonebook (verified against the chain)."""
    home = chain.home_of(ctx)

    async def go() -> dict[str, Any] | None:
        async with chain.open_client(home) as client:
            return await twin_by_name(client, name)

    doc = chain.run(go)
    if doc is None:
        raise NotFound(f"no twin named {name!r}")
    emit(ctx, doc)


def twin_doc(entry: dict[str, Any]) -> dict[str, Any]:
    """A twin entry as the user contract shows it: {"id","name","public_key","endpoint"}."""
    pk = entry.get("public_key", b"")
    return {
        "id": entry.get("id"),
        "name": entry.get("name"),
        "public_key": pk.hex() if isinstance(pk, bytes) else pk,
        "endpoint": entry.get("endpoint") or "",
    }


async def twin_by_id(client: LedgerClient, twin_id: int) -> dict[str, Any] | None:
    entry = await chain.read_entry(client, keyspace.twin(twin_id))
    return None if entry is None else twin_doc(entry)


async def twin_by_name(client: LedgerClient, name: str) -> dict[str, Any] | None:
    index = await chain.read_entry(client, keyspace.twin_by_name(name))
    return None if index is None else await twin_by_id(client, int(index["twin"]))


async def twin_of_key(client: LedgerClient, public_key: bytes) -> dict[str, Any] | None:
    index = await chain.read_entry(client, keyspace.twin_by_key(public_key))
    return None if index is None else await twin_by_id(client, int(index["twin"]))
