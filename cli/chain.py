"""Talking to the ledger from a command: the light client, signed transactions, verified reads.

Every read goes through :class:`ledger.client.LedgerClient`, which verifies commits and
proofs; nothing here trusts a single peer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import trio

from cli.home import Home
from cli.output import settings
from ledger import keys, keyspace
from ledger.client import LedgerClient
from ledger.errors import InvalidTx
from ledger.state import Params, TxOutcome, decode_entry
from ledger.tx import Tx
from ledger.types import Genesis

T = TypeVar("T")

CLIENT_TIMEOUT_S = 5.0
TX_TIMEOUT_S = 30.0


class TxFailed(InvalidTx):
    """A transaction of ``tx_type`` was refused by a peer or failed in its block."""

    def __init__(self, tx_type: str, code: str, message: str) -> None:
        super().__init__(code, message)
        self.tx_type = tx_type
        self.args = (f"{tx_type} failed ({code}): {message}",)

    def __str__(self) -> str:
        return str(self.args[0])


def home_of(ctx: click.Context) -> Home:
    return Home(settings(ctx).home)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run one async step of a command in its own trio loop."""
    return trio.run(fn)


def open_client(home: Home, *, peers: list[tuple[str, int]] | None = None) -> LedgerClient:
    """A light client for the home's ledger context. Raises ConfigError without a context."""
    ctx = home.load_context()
    return LedgerClient(home.load_genesis(), peers if peers is not None else list(ctx.peers),
                        timeout_s=CLIENT_TIMEOUT_S)


def default_fee(genesis: Genesis) -> int:
    """The fee a command pays unless told otherwise: the chain's minimum."""
    return Params.from_genesis(genesis).min_fee


async def send_tx(client: LedgerClient, key: keys.KeyPair, genesis: Genesis, type_: str,
                  body: dict[str, Any], *, fee: int | None = None) -> TxOutcome:
    """Sign, submit and wait until the tx is committed.

    Raises :class:`TxFailed` (an InvalidTx with the ledger's code) if a peer refused it or it
    failed in its block, :class:`LedgerTimeout` if it was not committed in time.
    """
    nonce = await client.next_nonce(key.public_key)
    tx = Tx(type_, key.public_key, nonce, default_fee(genesis) if fee is None else fee,
            body).signed(key, genesis.chain_id)
    try:
        outcome = await client.submit_and_wait(tx, timeout_s=TX_TIMEOUT_S)
    except InvalidTx as exc:
        raise TxFailed(type_, exc.code, exc.message) from exc
    if outcome.code != "ok":  # submit_and_wait raises on failure; never report one as success
        raise TxFailed(type_, outcome.code, outcome.message)
    return outcome


async def read_entry(client: LedgerClient, key: bytes) -> dict[str, Any] | None:
    """The decoded state entry under ``key`` (verified by proof), or None if absent."""
    value, _height = await client.query(key)
    return None if value is None else decode_entry(key, value)


MAX_PARALLEL_READS = 8


async def read_entries(client: LedgerClient, keys_: list[bytes]) -> list[dict[str, Any] | None]:
    """:func:`read_entry` for many keys, a few at a time in parallel; results in order."""
    out: list[dict[str, Any] | None] = [None] * len(keys_)
    limit = trio.CapacityLimiter(MAX_PARALLEL_READS)

    async def one(i: int) -> None:
        async with limit:
            out[i] = await read_entry(client, keys_[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(keys_)):
            nursery.start_soon(one, i)
    return out


async def counter(client: LedgerClient, name: str, default: int = 1) -> int:
    """One field of the proven counters entry (e.g. ``next_node_id``)."""
    counters = await read_entry(client, keyspace.counters())
    return int((counters or {}).get(name, default))
