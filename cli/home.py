"""The home directory of a tfgrid user: which ledger to talk to and who we are there.

Layout (every file versioned, written atomically)::

    HOME/context.json    {"version": 1, "peers": ["host:port", ...], "chain_id": str,
                          "genesis": path of the genesis file (relative to HOME or absolute)}
    HOME/genesis.json    the pinned genesis (validator set) when the home owns a copy
    HOME/identity.json   {"version": 1, "seed": hex, "address": hex}, mode 0600
    HOME/devnet.json     present when HOME is a devnet (see cli.devnet)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import keys
from ledger.config import format_hostport, parse_hostport, read_genesis
from ledger.errors import ConfigError
from ledger.types import Genesis

CONTEXT_FILE = "context.json"
IDENTITY_FILE = "identity.json"
GENESIS_FILE = "genesis.json"
DEVNET_FILE = "devnet.json"
FORMAT_VERSION = 1


def parse_peers(text: str) -> list[tuple[str, int]]:
    """A comma-separated list of HOST:PORT. Raises :class:`ConfigError` if empty or malformed."""
    peers = [parse_hostport(p.strip(), what="peer") for p in text.split(",") if p.strip()]
    if not peers:
        raise ConfigError("no peers given (expected HOST:PORT,...)")
    for host, port in peers:
        if port == 0:
            raise ConfigError(f"peer {format_hostport((host, port))} has port 0")
    return peers


def write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``; the file never exists with looser permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, doc: Any, *, mode: int = 0o644) -> None:
    write_private(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object. Raises :class:`ConfigError` if missing, unreadable or not an object."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is unreadable: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    if doc.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{what} {path} has unsupported version {doc.get('version')!r}")
    return doc


@dataclass(frozen=True, slots=True)
class LedgerContext:
    """Which ledger a home talks to: its peers and the genesis that pins its validator set."""

    peers: tuple[tuple[str, int], ...]
    chain_id: str
    genesis_path: Path


@dataclass(frozen=True, slots=True)
class Home:
    root: Path

    @property
    def context_file(self) -> Path:
        return self.root / CONTEXT_FILE

    @property
    def identity_file(self) -> Path:
        return self.root / IDENTITY_FILE

    @property
    def genesis_file(self) -> Path:
        return self.root / GENESIS_FILE

    @property
    def devnet_file(self) -> Path:
        return self.root / DEVNET_FILE

    # -- context ---------------------------------------------------------------------------

    def has_context(self) -> bool:
        return self.context_file.exists()

    def load_context(self) -> LedgerContext:
        """Raises :class:`ConfigError` if the home has no (valid) context."""
        if not self.context_file.exists():
            raise ConfigError(
                f"{self.root} has no ledger context: run `tfgrid context set --peers HOST:PORT "
                "--genesis FILE` or `tfgrid devnet up`"
            )
        doc = read_json(self.context_file, "context")
        peers = doc.get("peers")
        chain_id = doc.get("chain_id")
        genesis = doc.get("genesis")
        if not (isinstance(peers, list) and peers and all(isinstance(p, str) for p in peers)):
            raise ConfigError(f"context {self.context_file}: peers must be a list of HOST:PORT")
        if not isinstance(chain_id, str) or not isinstance(genesis, str):
            raise ConfigError(f"context {self.context_file}: chain_id and genesis are required")
        path = Path(genesis)
        return LedgerContext(
            peers=tuple(parse_hostport(p, what="peer") for p in peers),
            chain_id=chain_id,
            genesis_path=path if path.is_absolute() else self.root / path,
        )

    def save_context(self, ctx: LedgerContext) -> None:
        try:
            genesis = str(ctx.genesis_path.relative_to(self.root))
        except ValueError:
            genesis = str(ctx.genesis_path.resolve())
        write_json(self.context_file, {
            "version": FORMAT_VERSION,
            "peers": [format_hostport(p) for p in ctx.peers],
            "chain_id": ctx.chain_id,
            "genesis": genesis,
        })

    def load_genesis(self) -> Genesis:
        """The genesis this home's context pins; checks it belongs to the context's chain.

        Raises :class:`ConfigError`.
        """
        ctx = self.load_context()
        genesis = read_genesis_file(ctx.genesis_path)
        if genesis.chain_id != ctx.chain_id:
            raise ConfigError(
                f"genesis {ctx.genesis_path} is for chain {genesis.chain_id!r}, "
                f"the context says {ctx.chain_id!r}"
            )
        return genesis

    # -- identity --------------------------------------------------------------------------

    def has_identity(self) -> bool:
        return self.identity_file.exists()

    def load_identity(self) -> keys.KeyPair:
        """Raises :class:`ConfigError` if the home has no (valid) identity."""
        if not self.identity_file.exists():
            raise ConfigError(
                f"{self.root} has no identity: run `tfgrid identity create` or "
                "`tfgrid identity restore`"
            )
        doc = read_json(self.identity_file, "identity")
        seed_hex = doc.get("seed")
        try:
            seed = bytes.fromhex(seed_hex) if isinstance(seed_hex, str) else b""
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ConfigError(f"identity {self.identity_file}: seed must be 32 bytes of hex")
        kp = keys.KeyPair.from_seed(seed)
        if doc.get("address") not in (None, kp.address):
            raise ConfigError(f"identity {self.identity_file}: address does not match its seed")
        return kp

    def save_identity(self, kp: keys.KeyPair) -> None:
        write_json(
            self.identity_file,
            {"version": FORMAT_VERSION, "seed": kp.seed.hex(), "address": kp.address},
            mode=0o600,
        )


def read_genesis_file(path: Path) -> Genesis:
    """Read a genesis file written by ``ledger.config.write_genesis``. Raises ConfigError."""
    if not path.exists():
        raise ConfigError(f"genesis file not found: {path}")
    return read_genesis(path)
