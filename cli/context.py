"""`tfgrid context set|show`: which ledger this home talks to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli import chain
from cli.home import Home, LedgerContext, parse_peers, read_genesis_file
from cli.output import emit, json_option, pairs
from ledger.config import format_hostport
from ledger.errors import ConfigError


@click.group()
def context() -> None:
    """The ledger peers and the pinned genesis (chain id, validator set) of this home."""


@context.command(name="set")
@json_option
@click.option("--peers", required=True, metavar="HOST:PORT,...",
              help="Ledger validators to talk to (any one is enough; all are verified).")
@click.option("--genesis", "genesis_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The chain's genesis.json (copied into the home). "
              "Defaults to the one the home already has.")
@click.pass_context
def set_(ctx: click.Context, peers: str, genesis_file: Path | None) -> None:
    """Point this home at a ledger."""
    home = chain.home_of(ctx)
    peer_list = parse_peers(peers)
    source = genesis_file if genesis_file is not None else home.genesis_file
    if not source.exists() and genesis_file is None:
        raise ConfigError(f"{home.root} has no genesis yet: pass --genesis FILE "
                          "(the chain's genesis.json)")
    genesis = read_genesis_file(source)
    home.root.mkdir(parents=True, exist_ok=True)
    if source.resolve() != home.genesis_file.resolve():
        home.genesis_file.write_bytes(source.read_bytes())
    home.save_context(LedgerContext(tuple(peer_list), genesis.chain_id, home.genesis_file))
    emit(ctx, context_doc(home), pairs_human)


@context.command()
@json_option
@click.pass_context
def show(ctx: click.Context) -> None:
    """The peers, chain id, genesis file and validator set of this home."""
    emit(ctx, context_doc(chain.home_of(ctx)), pairs_human)


def context_doc(home: Home) -> dict[str, Any]:
    ctx = home.load_context()
    genesis = home.load_genesis()
    return {
        "home": str(home.root),
        "peers": [format_hostport(p) for p in ctx.peers],
        "chain_id": ctx.chain_id,
        "genesis": str(ctx.genesis_path),
        "validators": [v.hex() for v in genesis.validators.members],
    }


def pairs_human(doc: dict[str, Any]) -> str:
    return pairs({**doc, "validators": "\n" + "\n".join(f"  {v}" for v in doc["validators"])})
