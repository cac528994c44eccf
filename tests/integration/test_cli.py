"""The `tfgrid` command line against a real devnet: 4 validator processes on 127.0.0.1.

Every command runs as its own process, exactly as a user types it; the assertions are on the
JSON documents of the user contract (design section 7), exit codes and stderr. The devnet is
shared by the tests of this module and always torn down, by its recorded pids only.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ledger.config import read_genesis
from ledger.state import Params
from tests.integration.clirunner import Result, run_tfgrid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 120.0


def tfgrid(home: Path, *args: str, ok: bool = True) -> Result:
    """Run `tfgrid --home HOME ARGS...`; with ``ok`` the command must succeed."""
    return run_tfgrid(home, *args, ok=ok, timeout_s=COMMAND_TIMEOUT_S)


def _recorded_pids(devnet_dir: Path) -> list[tuple[int, int]]:
    doc = json.loads((devnet_dir / "devnet.json").read_text())
    return [(v["process"]["pid"], v["process"]["started"])
            for v in doc["validators"] if v["process"] is not None]


def _alive(pid: int, started: int) -> bool:
    """Same test as the CLI: the pid exists, is not a zombie, and has the recorded start time."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == started


@dataclass(frozen=True)
class Devnet:
    home: Path  # the devnet directory, which is also a tfgrid home
    base: Path  # scratch space for other homes

    def run(self, *args: str, ok: bool = True) -> Result:
        return tfgrid(self.home, *args, ok=ok)


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devnet]:
    base = tmp_path_factory.mktemp("cli")
    home = base / "devnet"
    recorded: list[tuple[int, int]] = []
    try:
        up = tfgrid(home, "devnet", "up", "--validators", "4", "--nodes", "0", "--dir", str(home),
                    "--json")
        doc = up.json()
        assert [v["name"] for v in doc["validators"]] == [f"validator-{i}" for i in range(1, 5)]
        assert all(v["alive"] and v["height"] >= 1 for v in doc["validators"])
        yield Devnet(home, base)
    finally:
        if (home / "devnet.json").exists():
            recorded = _recorded_pids(home)
            tfgrid(home, "devnet", "down", ok=False)
        # Safety net so that a broken `devnet down` cannot leak processes into other tests:
        # only the processes this devnet recorded, each checked by pid and start time.
        for pid, started in recorded:
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)


def new_home(net: Devnet, name: str) -> tuple[Path, str]:
    """A second home with its own identity, pointed at the devnet's validators."""
    home = net.base / name
    address = tfgrid(home, "identity", "create", "--json").json()["address"]
    peers = ",".join(v["address"] for v in net.run("devnet", "status", "--json").json()["validators"])
    tfgrid(home, "context", "set", "--peers", peers, "--genesis", str(net.home / "genesis.json"))
    return home, address


def min_fee(net: Devnet) -> int:
    return Params.from_genesis(read_genesis(net.home / "genesis.json")).min_fee


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.code != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tfgrid: error: ")
    for f in fragments:
        assert f in lines[0]


def test_devnet_home_has_funded_identity(devnet: Devnet) -> None:
    me = devnet.run("identity", "show", "--json").json()
    assert set(me) == {"address", "twin"}
    assert len(me["address"]) == 64
    bal = devnet.run("account", "balance", "--json").json()
    assert set(bal) == {"address", "balance"}
    assert bal["address"] == me["address"]
    assert bal["balance"] > 0
    context = devnet.run("context", "show", "--json").json()
    assert len(context["peers"]) == 4
    assert len(context["validators"]) == 4


def test_ledger_status_fields(devnet: Devnet) -> None:
    st = devnet.run("ledger", "status", "--json").json()
    assert set(st) >= {"height", "block_hash", "chain_id", "validators", "peer"}
    assert st["height"] >= 1
    assert len(bytes.fromhex(st["block_hash"])) == 32
    assert st["chain_id"].startswith("devnet-")
    assert len(st["validators"]) == 4
    # the global flag works as well as the per-command one
    assert devnet.run("--json", "ledger", "status").json()["chain_id"] == st["chain_id"]


def test_transfer_moves_balance(devnet: Devnet) -> None:
    bob_home, bob = new_home(devnet, "bob")
    before = devnet.run("account", "balance", "--json").json()["balance"]
    out = devnet.run("account", "transfer", bob, "1234567", "--json").json()
    assert out["to"] == bob
    assert out["amount"] == 1234567
    after = devnet.run("account", "balance", "--json").json()["balance"]
    assert before - after == 1234567 + min_fee(devnet)
    # seen from bob's own home (its own context, its own light client) and by address
    assert tfgrid(bob_home, "account", "balance", "--json").json() == {
        "address": bob, "balance": 1234567}
    assert devnet.run("account", "balance", bob, "--json").json()["balance"] == 1234567


def test_overspending_is_one_line_error(devnet: Devnet) -> None:
    carol_home, _carol = new_home(devnet, "carol")
    me = devnet.run("identity", "show", "--json").json()["address"]
    result = tfgrid(carol_home, "account", "transfer", me, "1", ok=False)
    assert_one_line_error(result, "insufficient_funds")


def test_twin_register_lookup_and_duplicate(devnet: Devnet) -> None:
    dave_home, dave = new_home(devnet, "dave")
    devnet.run("account", "transfer", dave, str(10 * min_fee(devnet)))
    registered = tfgrid(dave_home, "twin", "register", "dave", "--endpoint", "127.0.0.1:7001",
                        "--json").json()
    looked_up = devnet.run("twin", "lookup", "dave", "--json").json()
    assert set(looked_up) == {"id", "name", "public_key", "endpoint"}
    assert looked_up == registered
    assert looked_up["name"] == "dave"
    assert looked_up["public_key"] == dave
    assert looked_up["endpoint"] == "127.0.0.1:7001"
    assert tfgrid(dave_home, "identity", "show", "--json").json() == {
        "address": dave, "twin": looked_up["id"]}
    # a second twin of the same name, from another key: refused by the ledger
    erin_home, erin = new_home(devnet, "erin")
    devnet.run("account", "transfer", erin, str(10 * min_fee(devnet)))
    assert_one_line_error(tfgrid(erin_home, "twin", "register", "dave", ok=False), "name_taken")
    assert_one_line_error(devnet.run("twin", "lookup", "nobody-here", ok=False), "nobody-here")


def test_farm_create_and_list(devnet: Devnet) -> None:
    devnet.run("twin", "register", "devnet-owner")
    me = devnet.run("identity", "show", "--json").json()
    farm = devnet.run("farm", "create", "north", "--country", "be", "--json").json()
    assert farm["name"] == "north"
    assert farm["country"] == "BE"
    assert farm["owner"] == me["twin"]
    listed = devnet.run("farm", "list", "--json").json()
    assert farm in listed
    assert [f["id"] for f in listed] == sorted(f["id"] for f in listed)


def test_farm_without_twin_is_one_line_error(devnet: Devnet) -> None:
    frank_home, frank = new_home(devnet, "frank")
    devnet.run("account", "transfer", frank, str(10 * min_fee(devnet)))
    assert_one_line_error(tfgrid(frank_home, "farm", "create", "x", "--country", "NL", ok=False),
                          "twin")


def test_usage_errors_are_one_line(devnet: Devnet) -> None:
    assert_one_line_error(devnet.run("account", "transfer", ok=False), "Missing argument")
    assert_one_line_error(devnet.run("no-such-command", ok=False), "no-such-command")
    assert_one_line_error(devnet.run("devnet", "up", "--nodes", "3", "--farms", "0", "--dir",
                                     str(devnet.base / "n"), ok=False), "--farms")
    assert not (devnet.base / "n").exists()


def _height(net: Devnet) -> int:
    return int(net.run("ledger", "status", "--json").json()["height"])


def test_stop_and_start_one_validator(devnet: Devnet) -> None:
    stopped = devnet.run("devnet", "stop", "validator-2", "--json").json()
    assert stopped == {"name": "validator-2", "stopped": True}
    status = devnet.run("devnet", "status", "--json").json()
    v2 = next(v for v in status["validators"] if v["name"] == "validator-2")
    assert v2["alive"] is False
    assert v2["pid"] is None
    # three of four validators are a quorum: the chain keeps committing, txs still land
    h0 = _height(devnet)
    grace_home, grace = new_home(devnet, "grace")
    devnet.run("account", "transfer", grace, "5")
    assert _height(devnet) > h0
    assert tfgrid(grace_home, "account", "balance", "--json").json()["balance"] == 5

    started = devnet.run("devnet", "start", "validator-2", "--json").json()
    assert started["name"] == "validator-2"
    assert started["height"] >= h0
    status = devnet.run("devnet", "status", "--json").json()
    assert set(status) >= {"home", "validators", "nodes", "bots"}
    assert status["nodes"] == []
    for v in status["validators"]:
        assert set(v) >= {"name", "pid", "alive", "height", "address"}
        assert v["alive"] is True
        assert isinstance(v["pid"], int)
    v2 = next(v for v in status["validators"] if v["name"] == "validator-2")
    # the restarted validator answers for itself and has caught up with the others
    deadline = time.monotonic() + 30
    while True:
        st = devnet.run("ledger", "status", "--peer", v2["address"], "--json").json()
        if st["height"] >= h0 + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st["height"] >= h0 + 1


def test_down_stops_every_recorded_process(devnet: Devnet) -> None:
    recorded = _recorded_pids(devnet.home)
    assert len(recorded) == 4
    assert all(_alive(pid, started) for pid, started in recorded)
    down = devnet.run("devnet", "down", "--json").json()
    assert sorted(down["stopped"]) == [f"validator-{i}" for i in range(1, 5)]
    assert not any(_alive(pid, started) for pid, started in recorded)
    status = devnet.run("devnet", "status", "--json").json()
    assert not any(v["alive"] for v in status["validators"])
    # and a stopped devnet resumes with its chain: the funded identity is still funded
    resumed = devnet.run("devnet", "up", "--json").json()
    assert all(v["alive"] for v in resumed["validators"])
    assert devnet.run("account", "balance", "--json").json()["balance"] > 0
