"""Laying out a validator network on disk: genesis plus one home per validator.

Shared by `tfgrid ledger init` (homes to copy onto machines) and `tfgrid devnet up`.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ledger import keys
from ledger.config import format_hostport, init_validator_home, make_genesis, write_genesis
from ledger.errors import ConfigError
from ledger.types import Genesis

DEFAULT_EMPTY_BLOCK_INTERVAL_MS = 2000


@dataclass(frozen=True, slots=True)
class ValidatorSpec:
    name: str
    home: Path
    listen: tuple[str, int]
    address: str  # the validator's public key, hex

    def to_doc(self) -> dict[str, str]:
        return {"name": self.name, "home": str(self.home), "listen": format_hostport(self.listen),
                "address": self.address}


def validator_name(index: int) -> str:
    """``validator-1``, ``validator-2``, ... (1-based, as people count)."""
    return f"validator-{index + 1}"


def free_ports(host: str, count: int) -> list[int]:
    """Ports the kernel reports free on ``host`` right now (all bound at once, so distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def create_network(
    directory: Path,
    *,
    chain_id: str,
    listens: list[tuple[str, int]],
    accounts: list[tuple[bytes, int]],
    params: dict[str, int],
    empty_block_interval_ms: int = DEFAULT_EMPTY_BLOCK_INTERVAL_MS,
) -> tuple[Genesis, list[ValidatorSpec]]:
    """Write ``directory/genesis.json`` and ``directory/validator-N`` homes, one per listen address.

    Every validator gets a fresh key (randomness from ``os.urandom``) and the others as peers.
    Raises :class:`ConfigError` if a validator home already exists.
    """
    if not listens:
        raise ConfigError("a network needs at least one validator")
    seeds = [os.urandom(32) for _ in listens]
    pubkeys = [keys.KeyPair.from_seed(s).public_key for s in seeds]
    genesis = make_genesis(chain_id, pubkeys, accounts, params, int(time.time() * 1000))
    specs = []
    for i, listen in enumerate(listens):
        home = directory / validator_name(i)
        if home.exists():
            raise ConfigError(f"{home} already exists; refusing to overwrite a validator home")
        specs.append(ValidatorSpec(validator_name(i), home, listen, pubkeys[i].hex()))
    directory.mkdir(parents=True, exist_ok=True)
    write_genesis(directory / "genesis.json", genesis)
    for i, spec in enumerate(specs):
        init_validator_home(
            spec.home, genesis=genesis, seed=seeds[i], listen=spec.listen,
            peers=[p for j, p in enumerate(listens) if j != i],
            empty_block_interval_ms=empty_block_interval_ms,
        )
    return genesis, specs
