"""What this node offers the grid: cores, memory and data-disk storage, minus a reserve.

Measured with psutil; the reserve (a percentage of each resource, kept for the system and the
agent itself) is subtracted, rounding in the system's favour. A configured override replaces
the measurement (devnet runs many agents on one machine; tests want small fixed numbers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ledger.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Capacity:
    cores: int
    memory: int  # bytes
    storage: int  # bytes

    def to_map(self) -> dict[str, int]:
        return {"cores": self.cores, "memory": self.memory, "storage": self.storage}

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Capacity:
        """Raises :class:`ConfigError` unless ``m`` has non-negative integer cores, memory and
        storage."""
        vals = []
        for name in ("cores", "memory", "storage"):
            v = m.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"capacity {name} must be a non-negative integer")
            vals.append(v)
        return cls(*vals)


def apply_reserve(raw: Capacity, reserve_percent: int) -> Capacity:
    """``raw`` minus ``reserve_percent`` of each resource (at least one core stays reserved
    when the reserve is not zero and the machine has more than one)."""
    if not 0 <= reserve_percent < 100:
        raise ConfigError("reserve_percent must be in 0..99")

    def keep(v: int) -> int:
        return v * (100 - reserve_percent) // 100

    cores = keep(raw.cores)
    if reserve_percent and raw.cores > 1 and cores == raw.cores:
        cores -= 1
    return Capacity(cores, keep(raw.memory), keep(raw.storage))


def measure(data_dir: Path) -> Capacity:
    """The machine's logical cores, total memory, and the size of the disk holding
    ``data_dir``. Raises :class:`ConfigError` if the data disk cannot be examined."""
    try:
        storage = psutil.disk_usage(str(data_dir)).total
    except OSError as exc:
        raise ConfigError(f"cannot measure the data disk {data_dir}: {exc}") from None
    return Capacity(psutil.cpu_count(logical=True) or 1, psutil.virtual_memory().total, storage)


def node_capacity(data_dir: Path, reserve_percent: int,
                  override: Capacity | None = None) -> Capacity:
    """What to register: ``override`` if configured, else the measurement minus the reserve."""
    if override is not None:
        return override
    return apply_reserve(measure(data_dir), reserve_percent)
