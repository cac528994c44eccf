"""`tfgrid identity create|restore|show`: the home's ed25519 key, from a BIP39 mnemonic."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from cli import chain
from cli.home import Home
from cli.output import emit, json_option, pairs, want_json
from cli.twin import twin_of_key
from ledger import keys
from ledger.errors import ConfigError


@click.group()
def identity() -> None:
    """Your key on the grid (an address) and the twin registered for it."""


@identity.command()
@json_option
@click.pass_context
def create(ctx: click.Context) -> None:
    """Make a new key from a fresh 24-word mnemonic. The mnemonic is shown only this once."""
    home = chain.home_of(ctx)
    if home.has_identity():
        _refuse_overwrite(home)
    words = keys.new_mnemonic(os.urandom(32))
    kp = keys.KeyPair.from_mnemonic(words)
    home.save_identity(kp)
    doc = {"address": kp.address, "mnemonic": words}
    if want_json(ctx):
        emit(ctx, doc)
        return
    click.echo(f"address   {kp.address}")
    click.echo(f"mnemonic  {words}")
    click.echo(click.style("Write the mnemonic down now: it is the only way to restore this "
                           "identity and it is not shown again.", fg="yellow"), err=True)


@identity.command()
@json_option
@click.option("--mnemonic-file", type=click.File("r"), default=None,
              help="Read the words from this file ('-' for stdin) instead of asking.")
@click.pass_context
def restore(ctx: click.Context, mnemonic_file: Any) -> None:
    """Restore the identity of a mnemonic (asked on a terminal, else read from stdin)."""
    home = chain.home_of(ctx)
    if mnemonic_file is not None:
        words = mnemonic_file.read()
    elif sys.stdin.isatty():
        words = click.prompt("mnemonic", hide_input=True, err=True)
    else:
        words = sys.stdin.read()
    kp = keys.KeyPair.from_mnemonic(words)
    if home.has_identity():
        if home.load_identity().address != kp.address:
            _refuse_overwrite(home)
    else:
        home.save_identity(kp)
    emit(ctx, {"address": kp.address})


@identity.command()
@json_option
@click.pass_context
def show(ctx: click.Context) -> None:
    """The address and, if registered, its twin id (needs a ledger context for the twin)."""
    home = chain.home_of(ctx)
    kp = home.load_identity()
    twin: dict[str, Any] | None = None
    if home.has_context():
        async def lookup() -> dict[str, Any] | None:
            async with chain.open_client(home) as client:
                return await twin_of_key(client, kp.public_key)

        twin = chain.run(lookup)
    doc = {"address": kp.address, "twin": None if twin is None else twin["id"]}
    emit(ctx, doc, lambda d: pairs({
        "address": d["address"],
        "twin": "-" if twin is None else f"{twin['id']} ({twin['name']})",
    }))


def _refuse_overwrite(home: Home) -> NoReturn:
    raise ConfigError(
        f"{home.root} already has an identity ({home.load_identity().address}); refusing to "
        "overwrite it (use another --home)"
    )
