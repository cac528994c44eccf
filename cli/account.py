"""`tfgrid account balance|transfer`: tokens, in integer base units."""

from __future__ import annotations

from typing import Any

import click

from cli import chain
from cli.output import emit, json_option
from cli.twin import twin_by_name
from ledger import keys, keyspace
from ledger.client import LedgerClient
from ledger.errors import NotFound


@click.group()
def account() -> None:
    """Balances and transfers (amounts are integer base units)."""


@account.command()
@json_option
@click.argument("who", required=False, metavar="[ADDRESS|TWIN]")
@click.pass_context
def balance(ctx: click.Context, who: str | None) -> None:
    """The balance of this home's identity, or of an address or twin name."""
    home = chain.home_of(ctx)
    own = None if who else home.load_identity().public_key

    async def go() -> dict[str, Any]:
        async with chain.open_client(home) as client:
            address = own if own is not None else await resolve(client, who or "")
            return {"address": address.hex(), "balance": await balance_of(client, address)}

    emit(ctx, chain.run(go))


@account.command()
@json_option
@click.argument("to", metavar="TO")
@click.argument("amount", type=click.IntRange(min=1))
@click.option("--fee", type=click.IntRange(min=0), default=None,
              help="Fee in base units (default: the chain's minimum).")
@click.pass_context
def transfer(ctx: click.Context, to: str, amount: int, fee: int | None) -> None:
    """Send AMOUNT base units to TO (an address or a twin name); waits for the commit."""
    home = chain.home_of(ctx)
    key = home.load_identity()
    genesis = home.load_genesis()

    async def go() -> dict[str, Any]:
        async with chain.open_client(home) as client:
            dest = await resolve(client, to)
            outcome = await chain.send_tx(client, key, genesis, "transfer",
                                          {"to": dest, "amount": amount}, fee=fee)
            return {"tx": outcome.tx_hash.hex(), "from": key.address, "to": dest.hex(),
                    "amount": amount, "balance": await balance_of(client, key.public_key)}

    emit(ctx, chain.run(go))


async def resolve(client: LedgerClient, who: str) -> bytes:
    """An address typed as hex, or the key of a twin name. Raises NotFound/ConfigError."""
    text = who.strip()
    if len(text) == 2 * keys.PUBLIC_KEY_SIZE and all(c in "0123456789abcdefABCDEF" for c in text):
        return keys.parse_address(text)
    doc = await twin_by_name(client, text)
    if doc is None:
        raise NotFound(f"{who!r} is neither an address (64 hex digits) nor a twin name")
    return bytes.fromhex(doc["public_key"])


async def balance_of(client: LedgerClient, address: bytes) -> int:
    entry = await chain.read_entry(client, keyspace.account(address))
    return 0 if entry is None else int(entry["balance"])
