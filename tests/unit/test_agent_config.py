"""The agent's own inputs: config file and flags, node key on the data disk, capacity."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ledger.errors import ConfigError
from zos_agent import config
from zos_agent.capacity import Capacity, apply_reserve, measure, node_capacity
from zos_agent.identity import key_path, load_or_create_node_key, read_node_key
from zos_agent.main import parse_args

TOML = """
farm_id = 3
peers = ["127.0.0.1:7001", "[::1]:7002"]
genesis = "genesis.json"
data_dir = "data"
reserve_percent = 20
uptime_interval_s = 15
country = "BE"
city = "Ghent"
agent_id = "n1"
subnet_index = 4

[capacity]
cores = 2
memory = 1024
storage = 2048
"""


def test_toml_config_with_relative_paths(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(TOML)
    cfg = config.load(p)
    assert cfg.farm_id == 3
    assert cfg.peers == [("127.0.0.1", 7001), ("::1", 7002)]
    assert cfg.genesis == tmp_path / "genesis.json"
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.runc_root_dir == tmp_path / "data" / "runc"
    assert cfg.reserve_percent == 20
    assert cfg.uptime_interval_s == 15
    assert cfg.capacity == Capacity(2, 1024, 2048)
    assert cfg.reconcile_interval_s == 5.0  # default


def test_json_config_and_flag_overrides(tmp_path: Path) -> None:
    p = tmp_path / "agent.json"
    p.write_text(json.dumps({"farm_id": 1, "peers": "127.0.0.1:1,127.0.0.1:2",
                             "genesis": "/g.json", "data_dir": "/d"}))
    path, flags = parse_args(["--config", str(p), "--farm-id", "9", "--peers", "10.0.0.1:5",
                              "--uptime-interval", "2.5", "--country", "NL"])
    cfg = config.load(path, flags)
    assert cfg.farm_id == 9
    assert cfg.peers == [("10.0.0.1", 5)]
    assert cfg.uptime_interval_s == 2.5
    assert cfg.country == "NL"
    assert cfg.genesis == Path("/g.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('farm_id = 1\npeers = ["h:1"]\ngenesis = "g"\n', "missing setting 'data_dir'"),
        ('farm_id = 1\npeers = ["h:1"]\ngenesis = "g"\ndata_dir = "d"\nshell = true\n',
         "unknown setting 'shell'"),
        ('farm_id = "one"\npeers = ["h:1"]\ngenesis = "g"\ndata_dir = "d"\n',
         "farm_id has the wrong type"),
        ('farm_id = 0\npeers = ["h:1"]\ngenesis = "g"\ndata_dir = "d"\n',
         "farm_id must be a positive integer"),
        ('farm_id = 1\npeers = ["nocolon"]\ngenesis = "g"\ndata_dir = "d"\n', "HOST:PORT"),
        ('farm_id = 1\npeers = []\ngenesis = "g"\ndata_dir = "d"\n', "at least one ledger peer"),
        ('farm_id = 1\npeers = ["h:1"]\ngenesis = "g"\ndata_dir = "d"\nreserve_percent = 100\n',
         "reserve_percent"),
        ('farm_id = 1\npeers = ["h:1"]\ngenesis = "g"\ndata_dir = "d"\nagent_id = "Node_1"\n',
         "agent_id"),
        ('farm_id = 1\npeers = ["h:1"]\ngenesis = "g"\ndata_dir = "d"\ncountry = "be"\n',
         "country"),
        ('farm_id = 1\npeers = ["h:1"]\ngenesis = "g"\ndata_dir = "d"\n[capacity]\ncores = -1\n',
         "capacity"),
        ("farm_id = [", "cannot parse"),
    ],
)
def test_bad_configs_are_refused_with_the_setting_named(tmp_path: Path, text: str,
                                                        message: str) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config.load(p)


def test_agent_id_defaults_from_the_node_key(tmp_path: Path) -> None:
    cfg = config.load(None, {"farm_id": 1, "peers": [("h", 1)], "genesis": tmp_path,
                             "data_dir": tmp_path})
    assert config.with_agent_id(cfg, bytes.fromhex("ab" * 32)).agent_id == "abababab"


# -- identity ---------------------------------------------------------------------------------


def test_node_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    calls: list[int] = []

    def entropy(n: int) -> bytes:
        calls.append(n)
        return b"\x07" * n

    k1 = load_or_create_node_key(data, entropy)
    k2 = load_or_create_node_key(data, entropy)
    assert k1 == k2
    assert calls == [32]
    assert stat.S_IMODE(key_path(data).stat().st_mode) == 0o600
    assert read_node_key(data) == k1
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


def test_node_key_refuses_loose_permissions_and_garbage(tmp_path: Path) -> None:
    load_or_create_node_key(tmp_path)
    os.chmod(key_path(tmp_path), 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_node_key(tmp_path)
    os.chmod(key_path(tmp_path), 0o600)
    key_path(tmp_path).write_text("not hex\n")
    with pytest.raises(ConfigError, match="64 hex"):
        load_or_create_node_key(tmp_path)


# -- capacity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "percent", "want"),
    [
        (Capacity(8, 1000, 2000), 0, Capacity(8, 1000, 2000)),
        (Capacity(8, 1000, 2000), 10, Capacity(7, 900, 1800)),
        (Capacity(2, 1000, 2000), 10, Capacity(1, 900, 1800)),  # at least one core kept back
        (Capacity(1, 1000, 2000), 10, Capacity(0, 900, 1800)),
        (Capacity(16, 999, 7), 25, Capacity(12, 749, 5)),  # rounds in the system's favour
    ],
)
def test_reserve(raw: Capacity, percent: int, want: Capacity) -> None:
    assert apply_reserve(raw, percent) == want


def test_measure_and_override(tmp_path: Path) -> None:
    m = measure(tmp_path)
    assert m.cores >= 1
    assert m.memory > 0
    assert m.storage > 0
    assert node_capacity(tmp_path, 10) == apply_reserve(m, 10)
    assert node_capacity(tmp_path, 10, Capacity(1, 2, 3)) == Capacity(1, 2, 3)
    with pytest.raises(ConfigError):
        apply_reserve(m, 100)
