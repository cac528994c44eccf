"""Genesis files and validator homes.

A validator home is a directory holding everything one validator needs::

    home/genesis.json     the chain's genesis (JSON, bytes as lowercase hex)
    home/validator.key    the validator's ed25519 seed as hex, mode 0600
    home/config.json      listen address, peers, block and consensus timing
    home/ledger.sqlite    the store (created by the daemon)

Every problem with these files is a :class:`~ledger.errors.ConfigError` whose message names
the file and what is wrong with it, because an operator reads it, not a program.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ledger import keys
from ledger.consensus import ConsensusConfig
from ledger.errors import ConfigError, MalformedFrame
from ledger.keys import KeyPair
from ledger.types import Genesis, ValidatorSet

GENESIS_FILE = "genesis.json"
KEY_FILE = "validator.key"
CONFIG_FILE = "config.json"
STORE_FILE = "ledger.sqlite"

DEFAULT_MAX_BLOCK_TXS = 2000
DEFAULT_MAX_BLOCK_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_FUTURE_MS = 5000
# A block travels whole in one client frame (block method, header pushes): keep its txs well
# under api.CLIENT_MAX_FRAME, leaving room for the header, the commit and encoding overhead.
MAX_BLOCK_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True)
class ValidatorConfig:
    """What a validator daemon needs besides its genesis and key.

    ``max_future_ms`` is how far ahead of the local clock a proposed block's time may be.
    """

    home: Path
    listen: tuple[str, int]
    peers: list[tuple[str, int]]
    empty_block_interval_ms: int
    consensus: ConsensusConfig
    max_block_txs: int = DEFAULT_MAX_BLOCK_TXS
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS
    store_path: Path = field(default=Path())

    def __post_init__(self) -> None:
        if self.store_path == Path():
            object.__setattr__(self, "store_path", self.home / STORE_FILE)


# ---------------------------------------------------------------------------------------------
# host:port


def parse_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6). Raises :class:`ConfigError`."""
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"{what} {text!r} must look like HOST:PORT")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"{what} {text!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} has a non-numeric port") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {text!r} has a port outside 0..65535")
    return host, port


def format_hostport(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# genesis


def make_genesis(
    chain_id: str,
    validators: list[bytes],
    accounts: list[tuple[bytes, int]],
    params: Mapping[str, int],
    time_ms: int,
) -> Genesis:
    """Build a canonical genesis (validators, accounts and params sorted).

    Raises :class:`ConfigError` for an empty or over-long chain id, bad keys, duplicate or
    negative accounts, or non-integer params.
    """
    if not isinstance(chain_id, str) or not 0 < len(chain_id) <= 64:
        raise ConfigError("chain id must be 1 to 64 characters")
    if not _is_int(time_ms) or time_ms < 0:
        raise ConfigError("genesis time must be a non-negative integer of milliseconds")
    if len(set(validators)) != len(validators):
        raise ConfigError("a validator key is listed twice")
    seen: set[bytes] = set()
    for address, balance in accounts:
        if not isinstance(address, bytes) or len(address) != keys.PUBLIC_KEY_SIZE:
            raise ConfigError("an account address must be a 32-byte public key")
        if address in seen:
            raise ConfigError(f"account {address.hex()} is listed twice")
        if not _is_int(balance) or balance < 0:
            raise ConfigError(f"account {address.hex()} has a negative or non-integer balance")
        seen.add(address)
    for name, value in params.items():
        if not isinstance(name, str) or not _is_int(value) or value < 0:
            raise ConfigError(f"genesis param {name!r} must be a non-negative integer")
    try:
        vset = ValidatorSet.of(list(validators))
    except MalformedFrame as exc:
        raise ConfigError(f"bad validator set: {exc}") from None
    return Genesis(
        chain_id=chain_id,
        genesis_time_ms=time_ms,
        validators=vset,
        accounts=tuple(sorted((bytes(a), int(b)) for a, b in accounts)),
        params=tuple(sorted((k, int(v)) for k, v in params.items())),
    )


def genesis_to_json(g: Genesis) -> dict[str, Any]:
    return {
        "chain_id": g.chain_id,
        "genesis_time_ms": g.genesis_time_ms,
        "validators": [v.hex() for v in g.validators.members],
        "accounts": [{"address": a.hex(), "balance": b} for a, b in g.accounts],
        "params": dict(g.params),
    }


def genesis_from_json(doc: Any, *, source: str = "genesis") -> Genesis:
    """Parse the JSON form of a genesis. Raises :class:`ConfigError` naming ``source``."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    try:
        chain_id = doc["chain_id"]
        time_ms = doc["genesis_time_ms"]
        validators = [_hex(v, f"{source}: validator") for v in _json_list(doc["validators"])]
        accounts = []
        for entry in _json_list(doc.get("accounts", [])):
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: each account is an object with address and balance")
            accounts.append((_hex(entry["address"], f"{source}: account address"),
                             entry["balance"]))
        params = doc.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: params must be an object of integers")
    except KeyError as exc:
        raise ConfigError(f"{source}: missing field {exc.args[0]!r}") from None
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise ConfigError(f"{source}: {exc}") from None
    try:
        return make_genesis(chain_id, validators, accounts, params, time_ms)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def write_genesis(path: Path, g: Genesis) -> None:
    """Write ``g`` as human-readable JSON (atomically)."""
    _write_atomic(path, (json.dumps(genesis_to_json(g), indent=2) + "\n").encode(), 0o644)


def read_genesis(path: Path) -> Genesis:
    """Read a genesis file. Raises :class:`ConfigError` if missing or invalid."""
    return genesis_from_json(_read_json(path), source=str(path))


# ---------------------------------------------------------------------------------------------
# validator home


def init_validator_home(
    home: Path,
    *,
    genesis: Genesis,
    seed: bytes,
    listen: tuple[str, int],
    peers: list[tuple[str, int]],
    empty_block_interval_ms: int = 2000,
    consensus: Mapping[str, int] | None = None,
) -> None:
    """Create a validator home. ``consensus`` optionally overrides ConsensusConfig fields.

    Raises :class:`ConfigError` if the home already holds a key (never overwrite a
    validator's identity) or the seed is not a member of the genesis validator set.
    """
    key = KeyPair.from_seed(seed)
    if key.public_key not in genesis.validators:
        raise ConfigError(f"validator key {key.address} is not in the genesis validator set")
    if not _is_int(empty_block_interval_ms) or empty_block_interval_ms < 0:
        raise ConfigError("empty_block_interval_ms must be a non-negative integer")
    overrides = dict(consensus or {})
    _check_consensus_overrides(overrides, source="consensus overrides")
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    if (home / KEY_FILE).exists():
        raise ConfigError(f"{home / KEY_FILE} already exists; refusing to overwrite a validator key")
    _write_atomic(home / KEY_FILE, (seed.hex() + "\n").encode(), 0o600)
    write_genesis(home / GENESIS_FILE, genesis)
    doc = {
        "listen": format_hostport(listen),
        "peers": [format_hostport(p) for p in peers],
        "empty_block_interval_ms": empty_block_interval_ms,
        "consensus": overrides,
    }
    _write_atomic(home / CONFIG_FILE, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)


def load_validator_home(home: Path) -> tuple[ValidatorConfig, Genesis, KeyPair]:
    """Read and check a validator home. Raises :class:`ConfigError` naming the bad file."""
    home = Path(home)
    if not home.is_dir():
        raise ConfigError(f"validator home {home} does not exist (run `tfgrid ledger init`)")
    genesis = read_genesis(home / GENESIS_FILE)
    key = _read_key(home / KEY_FILE)
    if key.public_key not in genesis.validators:
        raise ConfigError(
            f"{home / KEY_FILE}: key {key.address} is not in the genesis validator set"
        )
    cfg_path = home / CONFIG_FILE
    doc = _read_json(cfg_path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    src = str(cfg_path)
    listen = parse_hostport(doc.get("listen", ""), what=f"{src}: listen")
    peers = [parse_hostport(p, what=f"{src}: peer") for p in _json_list(doc.get("peers", []))]
    interval = doc.get("empty_block_interval_ms", 2000)
    if not _is_int(interval) or interval < 0:
        raise ConfigError(f"{src}: empty_block_interval_ms must be a non-negative integer")
    overrides = doc.get("consensus", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{src}: consensus must be an object of integers")
    _check_consensus_overrides(overrides, source=src)
    overrides = {**overrides, "empty_block_interval_ms": interval}
    limits: dict[str, int] = {}
    for name, default, most in (("max_block_txs", DEFAULT_MAX_BLOCK_TXS, 100_000),
                                ("max_block_bytes", DEFAULT_MAX_BLOCK_BYTES, MAX_BLOCK_BYTES),
                                ("max_future_ms", DEFAULT_MAX_FUTURE_MS, 3_600_000)):
        value = doc.get(name, default)
        if not _is_int(value) or not 0 < value <= most:
            raise ConfigError(f"{src}: {name} must be an integer from 1 to {most}")
        limits[name] = value
    cfg = ValidatorConfig(
        home=home,
        listen=listen,
        peers=peers,
        empty_block_interval_ms=interval,
        consensus=ConsensusConfig(**overrides),
        max_block_txs=limits["max_block_txs"],
        max_block_bytes=limits["max_block_bytes"],
        max_future_ms=limits["max_future_ms"],
    )
    return cfg, genesis, key


# ---------------------------------------------------------------------------------------------
# helpers


def _check_consensus_overrides(overrides: Mapping[str, Any], *, source: str) -> None:
    known = {f.name for f in fields(ConsensusConfig)}
    for name, value in overrides.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown consensus setting {name!r}")
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{source}: consensus setting {name!r} must be a non-negative integer")


def _read_key(path: Path) -> KeyPair:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"{path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the key ({exc})") from None
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path}: the key must be 64 hex characters") from None
    if len(seed) != 32:
        raise ConfigError(f"{path}: the key must be 64 hex characters (32 bytes)")
    return KeyPair.from_seed(seed)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file created with ``mode`` (so a key is never briefly world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen beyond mode
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not hex") from None


def _json_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError("expected a JSON list")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
