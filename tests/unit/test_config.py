"""Genesis files and validator homes: round trips and clear refusals."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ledger.config import (
    format_hostport,
    init_validator_home,
    load_validator_home,
    make_genesis,
    parse_hostport,
    read_genesis,
    write_genesis,
)
from ledger.errors import ConfigError
from ledger.keys import KeyPair

KEYS = [KeyPair.from_seed(bytes([i + 1]) * 32) for i in range(4)]
USER = KeyPair.from_seed(b"\x55" * 32)


def test_genesis_round_trip_is_exact_and_readable(tmp_path: Path) -> None:
    g = make_genesis("unit-chain", [k.public_key for k in reversed(KEYS)],
                     [(USER.public_key, 123), (KEYS[0].public_key, 5)], {"min_fee": 7, "a": 1}, 42)
    path = tmp_path / "genesis.json"
    write_genesis(path, g)
    again = read_genesis(path)
    assert again == g
    assert again.hash() == g.hash()
    doc = json.loads(path.read_text())
    assert doc["chain_id"] == "unit-chain"
    assert doc["validators"] == sorted(k.public_key.hex() for k in KEYS)
    assert {"address": USER.public_key.hex(), "balance": 123} in doc["accounts"]
    assert doc["params"] == {"a": 1, "min_fee": 7}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("chain_id"), "missing field 'chain_id'"),
        (lambda d: d.update(chain_id=""), "chain id"),
        (lambda d: d.update(validators=["zz"]), "not hex"),
        (lambda d: d.update(validators=[]), "validator set"),
        (lambda d: d["accounts"].append(dict(d["accounts"][0])), "listed twice"),
        (lambda d: d["accounts"][0].update(balance=-1), "balance"),
        (lambda d: d.update(params={"min_fee": 1.5}), "min_fee"),
        (lambda d: d.update(genesis_time_ms="now"), "genesis time"),
    ],
)
def test_bad_genesis_files_name_the_problem(tmp_path: Path, mutate: object, needle: str) -> None:
    path = tmp_path / "genesis.json"
    write_genesis(path, make_genesis("c", [KEYS[0].public_key], [(USER.public_key, 1)], {}, 1))
    doc = json.loads(path.read_text())
    mutate(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=needle) as info:
        read_genesis(path)
    assert str(path) in str(info.value)


def test_missing_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing"):
        read_genesis(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_genesis(tmp_path / "bad.json")


def test_validator_home_round_trip(tmp_path: Path) -> None:
    g = make_genesis("unit-chain", [k.public_key for k in KEYS], [], {}, 1)
    home = tmp_path / "v0"
    peers = [("127.0.0.1", 7001), ("::1", 7002)]
    init_validator_home(home, genesis=g, seed=KEYS[0].seed, listen=("127.0.0.1", 7000),
                        peers=peers, empty_block_interval_ms=1500,
                        consensus={"timeout_propose_ms": 300})
    assert stat.S_IMODE((home / "validator.key").stat().st_mode) == 0o600
    cfg, g2, key = load_validator_home(home)
    assert g2 == g
    assert key.public_key == KEYS[0].public_key
    assert cfg.listen == ("127.0.0.1", 7000)
    assert cfg.peers == peers
    assert cfg.empty_block_interval_ms == 1500
    assert cfg.consensus.empty_block_interval_ms == 1500
    assert cfg.consensus.timeout_propose_ms == 300
    assert cfg.store_path == home / "ledger.sqlite"


def test_home_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    g = make_genesis("unit-chain", [k.public_key for k in KEYS], [], {}, 1)
    init_validator_home(tmp_path, genesis=g, seed=KEYS[0].seed, listen=("h", 1), peers=[])
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        init_validator_home(tmp_path, genesis=g, seed=KEYS[1].seed, listen=("h", 1), peers=[])


def test_home_key_must_be_a_validator(tmp_path: Path) -> None:
    g = make_genesis("unit-chain", [k.public_key for k in KEYS], [], {}, 1)
    with pytest.raises(ConfigError, match="not in the genesis validator set"):
        init_validator_home(tmp_path, genesis=g, seed=USER.seed, listen=("h", 1), peers=[])


def test_load_refuses_a_readable_key(tmp_path: Path) -> None:
    g = make_genesis("unit-chain", [k.public_key for k in KEYS], [], {}, 1)
    init_validator_home(tmp_path, genesis=g, seed=KEYS[0].seed, listen=("h", 1), peers=[])
    os.chmod(tmp_path / "validator.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_validator_home(tmp_path)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"listen": "nohost"}, "HOST:PORT"),
        ({"listen": "h:99999"}, "outside"),
        ({"peers": ["h:x"]}, "non-numeric"),
        ({"empty_block_interval_ms": -5}, "empty_block_interval_ms"),
        ({"consensus": {"timeout_bogus_ms": 1}}, "unknown consensus setting"),
        ({"consensus": {"timeout_propose_ms": "fast"}}, "timeout_propose_ms"),
        ({"max_block_txs": 0}, "max_block_txs"),
        ({"max_block_bytes": 64 * 1024 * 1024}, "max_block_bytes"),
    ],
)
def test_bad_config_files(tmp_path: Path, edit: dict[str, object], needle: str) -> None:
    g = make_genesis("unit-chain", [k.public_key for k in KEYS], [], {}, 1)
    init_validator_home(tmp_path, genesis=g, seed=KEYS[0].seed, listen=("h", 1), peers=[])
    doc = json.loads((tmp_path / "config.json").read_text())
    doc.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=needle):
        load_validator_home(tmp_path)


def test_bad_key_file(tmp_path: Path) -> None:
    g = make_genesis("unit-chain", [k.public_key for k in KEYS], [], {}, 1)
    init_validator_home(tmp_path, genesis=g, seed=KEYS[0].seed, listen=("h", 1), peers=[])
    (tmp_path / "validator.key").write_text("abcd\n")
    with pytest.raises(ConfigError, match="64 hex"):
        load_validator_home(tmp_path)
    (tmp_path / "validator.key").unlink()
    with pytest.raises(ConfigError, match="missing"):
        load_validator_home(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_validator_home(tmp_path / "absent")


@pytest.mark.parametrize("addr", [("127.0.0.1", 80), ("::1", 26656), ("example.org", 0)])
def test_hostport_round_trip(addr: tuple[str, int]) -> None:
    assert parse_hostport(format_hostport(addr)) == addr
