"""`tfgrid ledger init|run|status`: a validator network's genesis, a validator, the chain head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from cli import chain
from cli.home import parse_peers
from cli.network import DEFAULT_EMPTY_BLOCK_INTERVAL_MS, create_network, free_ports
from cli.output import emit, json_option, pairs, table
from ledger import keys
from ledger.config import format_hostport, parse_hostport
from ledger.errors import ConfigError


@click.group(name="ledger")
def ledger() -> None:
    """The ledger: create a validator network, run a validator, see the chain head."""


def _parse_assignments(values: tuple[str, ...], what: str) -> list[tuple[str, int]]:
    out = []
    for v in values:
        name, sep, num = v.partition("=")
        if not sep or not name or not num.strip().isdigit():
            raise ConfigError(f"{what} {v!r} is not NAME=INTEGER")
        out.append((name.strip(), int(num)))
    return out


@ledger.command()
@json_option
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--validators", "count", type=click.IntRange(1, 100), default=4, show_default=True,
              help="Number of validators (4 tolerates one faulty).")
@click.option("--chain-id", default=None, help="Chain id (default: tfgrid-<random>).")
@click.option("--listen", default=None, metavar="HOST:PORT,...",
              help="One listen address per validator (default: free ports on 127.0.0.1).")
@click.option("--fund", multiple=True, metavar="ADDRESS=AMOUNT",
              help="Genesis balance for an address (repeatable).")
@click.option("--param", multiple=True, metavar="NAME=VALUE",
              help="Integer chain parameter, e.g. min_fee=1 (repeatable).")
@click.option("--empty-block-interval-ms", type=click.IntRange(min=0),
              default=DEFAULT_EMPTY_BLOCK_INTERVAL_MS, show_default=True,
              help="When idle, make a block this often (0: back to back).")
@click.pass_context
def init(ctx: click.Context, directory: Path, count: int, chain_id: str | None,
         listen: str | None, fund: tuple[str, ...], param: tuple[str, ...],
         empty_block_interval_ms: int) -> None:
    """Create genesis and one validator home per validator in DIRECTORY.

    Each home (DIRECTORY/validator-N) holds a fresh key and the others as peers; copy it to
    its machine and start it with `tfgrid ledger run HOME`.
    """
    if listen is not None:
        listens = parse_peers(listen)
        if len(listens) != count:
            raise ConfigError(f"--listen names {len(listens)} addresses for {count} validators")
    else:
        listens = [("127.0.0.1", p) for p in free_ports("127.0.0.1", count)]
    accounts = [(keys.parse_address(a), amount) for a, amount in _parse_assignments(fund, "--fund")]
    params = dict(_parse_assignments(param, "--param"))
    genesis, specs = create_network(
        directory, chain_id=chain_id or f"tfgrid-{os.urandom(3).hex()}", listens=listens,
        accounts=accounts, params=params, empty_block_interval_ms=empty_block_interval_ms,
    )
    doc = {"chain_id": genesis.chain_id, "genesis": str(directory / "genesis.json"),
           "validators": [s.to_doc() for s in specs]}
    peers = ",".join(format_hostport(s.listen) for s in specs)

    def human(d: dict[str, Any]) -> str:
        return "\n".join([
            f"chain {d['chain_id']}, genesis {d['genesis']}",
            table(d["validators"], [("name", "name"), ("listen", "listen"), ("home", "home")]),
            "",
            "start each validator:   tfgrid ledger run HOME",
            f"point a home at them:   tfgrid context set --peers {peers} "
            f"--genesis {d['genesis']}",
        ])

    emit(ctx, doc, human)


@ledger.command()
@click.argument("validator_home", type=click.Path(file_okay=False, exists=True, path_type=Path))
def run(validator_home: Path) -> None:
    """Run the validator whose home is VALIDATOR_HOME in the foreground (Ctrl-C stops it)."""
    from ledger import node  # the daemon and its dependencies load only for this command

    node.main(["--home", str(validator_home)])


@ledger.command()
@json_option
@click.option("--peer", default=None, metavar="HOST:PORT",
              help="Ask this validator instead of the context's peers.")
@click.pass_context
def status(ctx: click.Context, peer: str | None) -> None:
    """Height, block hash, chain id and validator set of the latest committed block."""
    home = chain.home_of(ctx)
    peers = None if peer is None else [parse_hostport(peer)]

    async def go() -> dict[str, Any]:
        async with chain.open_client(home, peers=peers) as client:
            st = await client.status()
            return {"height": st.height, "block_hash": st.block_hash.hex(),
                    "chain_id": st.chain_id, "validators": [v.hex() for v in st.validators],
                    "peer": st.peer}

    emit(ctx, chain.run(go), lambda d: pairs({**d, "validators": len(d["validators"])}))
