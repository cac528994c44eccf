"""The agent's configuration: one file (TOML, or JSON for a ``.json`` name) plus flags.

Example ``zos-agent.toml`` (paths are relative to the file's directory)::

    farm_id = 1
    peers = ["127.0.0.1:7001", "127.0.0.1:7002"]   # ledger peers (host:port)
    genesis = "genesis.json"                         # pins chain id and validator set
    data_dir = "/var/lib/zos"                        # node key, containers, volumes, memory
    reserve_percent = 10          # share of cores, memory and disk kept for the system
    uptime_interval_s = 60        # uptime reports
    capacity_interval_s = 300     # re-measure capacity; node_update when it changed
    reconcile_interval_s = 5      # full reconcile at least this often (blocks: ledger check)
    country = "BE"                # node location registered on the ledger
    city = "Ghent"
    host_address = "127.0.0.1"    # where published container ports are reachable
    agent_id = "n1"               # names host network objects (bridge tfb<agent_id>)
    shard_port = 7500             # storage namespaces served on host_address:shard_port
                                  # (0 or absent: this node serves no storage)
    subnet_index = 1              # this agent's container /24 (devnet: one per agent)
    runc_root = ""                # default <data_dir>/runc
    log_file = ""                 # default: stderr only
    log_level = "INFO"

    [capacity]                    # optional: registered instead of the measurement
    cores = 2
    memory = 4294967296
    storage = 107374182400

Nothing else is read: no environment variables, no socket, no RPC.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ledger.config import parse_hostport
from ledger.errors import ConfigError
from zos_agent.capacity import Capacity

_AGENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,11}")  # bridge names are at most 15 bytes
_COUNTRY = re.compile(r"[A-Z]{2}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class AgentConfig:
    farm_id: int
    peers: list[tuple[str, int]]
    genesis: Path
    data_dir: Path
    reserve_percent: int = 10
    uptime_interval_s: float = 60.0
    capacity_interval_s: float = 300.0
    reconcile_interval_s: float = 5.0
    country: str = "ZZ"  # ISO 3166 "unknown"
    city: str = ""
    host_address: str = "127.0.0.1"
    agent_id: str = ""  # default: derived from the node key
    subnet_index: int = 1
    shard_port: int = 0
    runc_root: Path | None = None
    log_file: Path | None = None
    log_level: str = "INFO"
    capacity: Capacity | None = None
    # Ledger client timing (seconds): each request, and how long a silent header
    # subscription is tolerated before failing over.
    request_timeout_s: float = 5.0
    stall_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check(self)

    @property
    def runc_root_dir(self) -> Path:
        return self.runc_root if self.runc_root is not None else self.data_dir / "runc"


def _check(c: AgentConfig) -> None:
    if not isinstance(c.farm_id, int) or isinstance(c.farm_id, bool) or c.farm_id < 1:
        raise ConfigError("farm_id must be a positive integer")
    if not c.peers:
        raise ConfigError("at least one ledger peer is needed (peers)")
    if not 0 <= c.reserve_percent < 100:
        raise ConfigError("reserve_percent must be in 0..99")
    for name in ("uptime_interval_s", "capacity_interval_s", "reconcile_interval_s",
                 "request_timeout_s", "stall_timeout_s"):
        v = getattr(c, name)
        if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"{name} must be a positive number of seconds")
    if not _COUNTRY.fullmatch(c.country):
        raise ConfigError(f"country {c.country!r} must be two upper-case letters")
    if len(c.city) > 64:
        raise ConfigError("city is at most 64 characters")
    if c.agent_id and not _AGENT_ID.fullmatch(c.agent_id):
        raise ConfigError(f"agent_id {c.agent_id!r} must be 1-12 of a-z 0-9 - (starting with a letter or digit)")
    if not isinstance(c.shard_port, int) or not 0 <= c.shard_port <= 65535:
        raise ConfigError("shard_port must be in 0..65535 (0: no storage)")
    if not isinstance(c.subnet_index, int) or not 1 <= c.subnet_index <= 254:
        raise ConfigError("subnet_index must be in 1..254")
    if c.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")


_SCALARS: dict[str, type | tuple[type, ...]] = {
    "farm_id": int, "reserve_percent": int, "subnet_index": int, "shard_port": int,
    "uptime_interval_s": (int, float), "capacity_interval_s": (int, float),
    "reconcile_interval_s": (int, float), "request_timeout_s": (int, float),
    "stall_timeout_s": (int, float),
    "country": str, "city": str, "host_address": str, "agent_id": str, "log_level": str,
}
_PATHS = ("genesis", "data_dir", "runc_root", "log_file")
_KNOWN = {f.name for f in fields(AgentConfig)}


def from_mapping(doc: Mapping[str, Any], *, base: Path, source: str) -> dict[str, Any]:
    """Typed keyword arguments for :class:`AgentConfig` from a parsed file or flags.

    Relative paths are taken relative to ``base``. Raises :class:`ConfigError` naming
    ``source`` for unknown keys or wrong types.
    """
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in _KNOWN:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        if key in _SCALARS:
            want = _SCALARS[key]
            if isinstance(value, bool) or not isinstance(value, want):
                raise ConfigError(f"{source}: {key} has the wrong type")
            out[key] = value
        elif key in _PATHS:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a path")
            out[key] = (base / value) if value else None
        elif key == "peers":
            if isinstance(value, str):
                value = [p for p in value.split(",") if p.strip()]
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{source}: peers must be a list of host:port")
            out[key] = [parse_hostport(p.strip(), what="ledger peer") for p in value]
        elif key == "capacity":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: capacity must be a table of cores/memory/storage")
            try:
                out[key] = Capacity.from_map(value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    return out


def read_file(path: Path) -> dict[str, Any]:
    """Parse a config file into keyword arguments. Raises :class:`ConfigError`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            doc = json.loads(raw)
        else:
            doc = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    return from_mapping(doc, base=path.resolve().parent, source=str(path))


def load(path: Path | None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """The config of ``path`` (if any) with ``overrides`` (already typed, e.g. from flags)
    on top. Raises :class:`ConfigError` when a required setting is missing or invalid."""
    kwargs = read_file(path) if path is not None else {}
    kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for required in ("farm_id", "peers", "genesis", "data_dir"):
        if required not in kwargs or kwargs[required] is None:
            raise ConfigError(f"missing setting {required!r} (config file or --{required.replace('_', '-')})")
    return AgentConfig(**kwargs)


def with_agent_id(cfg: AgentConfig, node_public_key: bytes) -> AgentConfig:
    """``cfg`` with its agent id defaulted from the node key (stable across restarts)."""
    if cfg.agent_id:
        return cfg
    return replace(cfg, agent_id=node_public_key.hex()[:8])
