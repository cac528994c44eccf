"""Deploying containers through the `tfgrid` command line on a 3-node devnet.

Everything runs as a user would type it: `tfgrid devnet up --nodes 3 --farms 3` starts 4
validators and 3 real node agents (root, real runc), `tfgrid image push` publishes a busybox
rootfs, `tfgrid deploy` creates contracts. Assertions are on the JSON documents of the user
contract, on `runc list` of each node's own runc root, on HTTP answered by a published port,
and on the containers' files. The devnet is shared by this module and always torn down with
`tfgrid devnet down`, which must leave no container of its agents behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from cli.home import Home
from ledger import keyspace
from ledger.client import LedgerClient
from ledger.codec import pack
from tests.integration.clirunner import Result, run_tfgrid, tfgrid_argv
from zos_agent.images import build_busybox_rootfs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="node agents run containers: needs root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc (apt-get install runc)"),
]

REPO = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 240.0
WAIT_S = 60.0
MIB = 1 << 20


def tfgrid(home: Path, *args: str, ok: bool = True) -> Result:
    """Run `tfgrid --home HOME ARGS...`; with ``ok`` the command must succeed."""
    return run_tfgrid(home, *args, ok=ok, timeout_s=COMMAND_TIMEOUT_S)


def one_line_error(result: Result) -> str:
    assert result.code != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tfgrid: error: ")
    return lines[0]


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.25)


def _alive(pid: int, started: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == started


def runc_ids(runc_root: Path) -> list[str]:
    if not runc_root.is_dir():
        return []
    out = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return sorted(line for line in out.split() if line)


@dataclass(frozen=True)
class Grid:
    home: Path  # the devnet directory, a tfgrid home
    base: Path
    image: str

    def run(self, *args: str, ok: bool = True) -> Result:
        return tfgrid(self.home, *args, ok=ok)

    def status(self) -> dict[str, Any]:
        return dict(self.run("devnet", "status", "--json").json())

    def node_name(self, node_id: int) -> str:
        """The devnet name (node-K) of ledger node ``node_id``."""
        return next(n["name"] for n in self.status()["nodes"] if n["id"] == node_id)

    def runc_root(self, name: str) -> Path:
        return self.home / name / "runc"

    def manifest(self, name: str, text: str) -> Path:
        path = self.base / f"{name}.yaml"
        path.write_text(text)
        return path

    def contract(self, cid: int) -> dict[str, Any]:
        return dict(self.run("contract", "show", str(cid), "--json").json())


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    base = tmp_path_factory.mktemp("deploy")
    home = base / "devnet"
    recorded: list[tuple[int, int]] = []
    try:
        up = tfgrid(home, "devnet", "up", "--validators", "4", "--nodes", "3", "--farms", "3",
                    "--dir", str(home), "--timeout", "120", "--json").json()
        assert [n["name"] for n in up["nodes"]] == ["node-1", "node-2", "node-3"]
        assert all(n["alive"] and n["status"] == "up" for n in up["nodes"])
        tfgrid(home, "twin", "register", "deployer")
        rootfs = build_busybox_rootfs(base / "busybox")
        pushed = tfgrid(home, "image", "push", str(rootfs), "--local", "--json").json()
        assert set(pushed) == {"image", "sources"}
        assert pushed["image"].startswith("sha256:")
        assert all(s.startswith("file://") for s in pushed["sources"])
        # pushing the same tree again gives the same content address
        again = tfgrid(home, "image", "push", str(rootfs), "--local", "--json").json()
        assert again["image"] == pushed["image"]
        yield Grid(home, base, pushed["image"])
    finally:
        if (home / "devnet.json").exists():
            doc = json.loads((home / "devnet.json").read_text())
            recorded = [(p["process"]["pid"], p["process"]["started"])
                        for p in [*doc["validators"], *doc["nodes"]] if p["process"]]
            down = tfgrid(home, "devnet", "down", "--json", ok=False)
            # Safety net: only the processes this devnet recorded, by pid and start time.
            for pid, started in recorded:
                if _alive(pid, started):
                    os.kill(pid, signal.SIGKILL)
            assert down.code == 0, down.stderr
            for node in doc["nodes"]:
                assert runc_ids(home / node["name"] / "runc") == [], "devnet down left containers"
                assert not Path(f"/sys/class/net/tfb{node['agent_id']}").exists()


def sleeper(image: str, name: str = "sleeper", **extra: str) -> str:
    lines = [f"name: {name}", *(f"{k}: {v}" for k, v in extra.items()), "workloads:",
             "  - name: main", f"    image: {image}",
             '    command: ["sh", "-c", "echo started $GREETING $TOKEN; sleep 3600"]',
             "    env: {GREETING: hi}", "    secret_env: {TOKEN: s3cret-value}",
             "    cpu: 1", "    memory: 64MiB", "    disk: 32MiB", "    restart: always"]
    return "\n".join(lines) + "\n"


def test_node_list_and_show(grid: Grid) -> None:
    nodes = grid.run("node", "list", "--json").json()
    assert len(nodes) == 3
    for n in nodes:
        assert set(n) >= {"id", "farm", "country", "cores", "memory", "storage", "status",
                          "last_uptime"}
        assert n["status"] == "up"
        assert n["cores"] >= 1
        assert n["memory"] > 0
        assert n["storage"] > 0
        assert isinstance(n["last_uptime"], int)
    # three farms in three different countries, one node each
    assert len({n["farm"] for n in nodes}) == 3
    assert len({n["country"] for n in nodes}) == 3
    shown = grid.run("node", "show", str(nodes[0]["id"]), "--json").json()
    assert {k: shown[k] for k in nodes[0]} == {**nodes[0], "last_uptime": shown["last_uptime"]}
    assert set(shown["reserved"]) == set(shown["free"]) == {"cores", "memory", "storage"}
    err = one_line_error(grid.run("node", "show", "999", ok=False))
    assert "no node 999" in err


def test_capacity_report(grid: Grid) -> None:
    nodes = grid.run("node", "list", "--json").json()
    doc = grid.run("capacity", "--json").json()
    assert set(doc) >= {"total", "reserved", "free", "nodes_up", "nodes_down", "groups"}
    for part in ("total", "reserved", "free"):
        assert set(doc[part]) == {"cores", "memory", "storage"}
    assert doc["total"]["cores"] == sum(n["cores"] for n in nodes)
    assert doc["total"]["memory"] == sum(n["memory"] for n in nodes)
    assert doc["nodes_up"] + doc["nodes_down"] == 3
    assert doc["groups"] == []
    for by in ("farm", "country", "node"):
        grouped = grid.run("capacity", "--by", by, "--json").json()
        assert len(grouped["groups"]) == 3
        for g in grouped["groups"]:
            assert by in g
            assert set(g) >= {"total", "reserved", "free", "nodes_up", "nodes_down"}
        assert sum(g["total"]["cores"] for g in grouped["groups"]) == doc["total"]["cores"]
        assert sum(g["nodes_up"] + g["nodes_down"] for g in grouped["groups"]) == 3


def _ledger_contract(grid: Grid, cid: int) -> dict[str, Any]:
    """The raw contract entry, read with a proof, for checks the CLI does not show."""
    home = Home(grid.home)

    async def go() -> dict[str, Any]:
        ctx = home.load_context()
        async with LedgerClient(home.load_genesis(), list(ctx.peers)) as client:
            from cli.chain import read_entry

            entry = await read_entry(client, keyspace.contract(cid))
            assert entry is not None
            return entry

    return trio.run(go)


def test_deploy_runs_on_its_node_only_then_cancel_removes_it(grid: Grid) -> None:
    deployed = grid.run("deploy", str(grid.manifest("sleeper", sleeper(grid.image))),
                        "--json").json()
    assert set(deployed) >= {"contract", "node", "state"}
    assert deployed["state"] == "deployed"
    cid, node_id = deployed["contract"], deployed["node"]
    wid = f"c{cid}-main"

    shown = grid.contract(cid)
    assert shown["id"] == cid
    assert shown["node"] == node_id
    assert shown["state"] == "deployed"
    assert set(shown) >= {"id", "owner", "node", "state", "workloads"}
    (w,) = shown["workloads"]
    assert set(w) >= {"name", "kind", "state", "message", "endpoint"}
    assert (w["name"], w["kind"], w["state"]) == ("main", "container", "ok")
    assert cid in [c["id"] for c in grid.run("contract", "list", "--json").json()]

    # It runs under its own node's runc root, and under no other.
    name = grid.node_name(node_id)
    for n in ("node-1", "node-2", "node-3"):
        ids = runc_ids(grid.runc_root(n))
        assert (wid in ids) == (n == name), (n, ids)
    state = json.loads(subprocess.run(
        ["runc", "--root", str(grid.runc_root(name)), "state", wid], capture_output=True,
        text=True, check=True).stdout)
    assert state["status"] == "running"

    # The secret reached the container, but the public ledger only holds ciphertext.
    log = grid.home / name / "logs" / f"{wid}.log"
    wait_until(lambda: log.exists() and "started hi s3cret-value" in log.read_text(),
               "the container's output")
    entry = _ledger_contract(grid, cid)
    assert b"s3cret-value" not in pack(entry)
    assert isinstance(entry["deployment"]["workloads"][0]["secret_env"]["TOKEN"], bytes)
    assert "s3cret-value" not in json.dumps(shown)

    bundle = grid.home / name / "bundles" / wid
    assert bundle.exists()
    record = json.loads((grid.home / "devnet.json").read_text())
    agent_id = next(n["agent_id"] for n in record["nodes"] if n["name"] == name)
    netns = Path(f"/run/netns/tf-{agent_id}-{wid}")
    assert netns.exists()
    cancelled = grid.run("contract", "cancel", str(cid), "--json").json()
    assert cancelled["state"] == "cancelled"
    assert [w["state"] for w in cancelled["workloads"]] == ["deleted"]
    assert wid not in runc_ids(grid.runc_root(name))
    assert not bundle.exists()
    assert not log.exists()
    # nothing of it is left on the node: no volume, no bundle, no log, no network namespace
    assert list((grid.home / name).rglob(f"*{wid}*")) == []
    assert not netns.exists()
    assert grid.contract(cid)["state"] == "cancelled"
    # cancelling twice is refused by nobody: the contract simply stays cancelled
    assert grid.run("contract", "cancel", str(cid), "--no-wait", "--json").json()["state"] \
        == "cancelled"


def test_httpd_answers_at_its_endpoint(grid: Grid) -> None:
    manifest = grid.manifest("web", "\n".join([
        "name: web", "workloads:", "  - name: httpd", f"    image: {grid.image}",
        '    command: ["httpd", "-f", "-p", "80", "-h", "/www"]',
        "    ports: [80]", "    memory: 64MiB", "    disk: 16MiB", ""]))
    deployed = grid.run("deploy", str(manifest), "--json").json()
    cid = deployed["contract"]
    (w,) = grid.contract(cid)["workloads"]
    host, _, port = w["endpoint"].rpartition(":")
    assert host, w
    assert port.isdigit(), w
    body = ""
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://{w['endpoint']}/", timeout=5) as resp:
                body = resp.read().decode()
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)
    assert "hello from tfgrid busybox" in body
    grid.run("contract", "cancel", str(cid))
    # the published port is gone with the container
    with pytest.raises(urllib.error.URLError, match="refused"):
        urllib.request.urlopen(f"http://{w['endpoint']}/", timeout=2)


def test_more_than_the_node_has_free_is_refused_by_the_ledger(grid: Grid) -> None:
    node = grid.run("node", "list", "--json").json()[0]
    too_many_cores = sleeper(grid.image, "greedy", node=str(node["id"])).replace(
        "cpu: 1", f"cpu: {node['cores'] + 1}")
    err = one_line_error(grid.run("deploy", str(grid.manifest("greedy", too_many_cores)),
                                  ok=False))
    assert "contract_create failed (overbooked)" in err
    assert f"node {node['id']}" in err
    too_much_memory = sleeper(grid.image, "hungry", node=str(node["id"])).replace(
        "memory: 64MiB", f"memory: {node['memory'] + MIB}")
    err = one_line_error(grid.run("deploy", str(grid.manifest("hungry", too_much_memory)),
                                  ok=False))
    assert "overbooked" in err
    # auto placement says no node has room, before anything is signed
    auto = sleeper(grid.image, "huge").replace("cpu: 1", "cpu: 1000")
    err = one_line_error(grid.run("deploy", str(grid.manifest("huge", auto)), ok=False))
    assert "no node that is up has room" in err


def test_bad_manifest_is_one_line_naming_the_field(grid: Grid) -> None:
    bad = sleeper(grid.image).replace("memory: 64MiB", "memory: 64 potatoes")
    err = one_line_error(grid.run("deploy", str(grid.manifest("bad", bad)), ok=False))
    assert "workloads[0] (main).memory" in err


def test_node_reason_when_a_workload_fails(grid: Grid) -> None:
    missing = "sha256:" + "0" * 64
    text = "\n".join(["name: broken", "workloads:", "  - name: main", f"    image: {missing}",
                      f"    image_sources: [\"file://{grid.base}/no-such-image.tar\"]",
                      '    command: ["true"]', "    memory: 16MiB", "    disk: 16MiB", ""])
    result = grid.run("deploy", str(grid.manifest("broken", text)), ok=False)
    err = one_line_error(result)
    assert "failed: workload main:" in err
    cid = int(err.split("contract ")[1].split()[0])
    shown = grid.contract(cid)
    assert shown["state"] == "error"
    assert shown["workloads"][0]["state"] == "error"
    assert shown["workloads"][0]["message"]
    grid.run("contract", "cancel", str(cid))


def test_no_wait_returns_at_once(grid: Grid) -> None:
    deployed = grid.run("deploy", str(grid.manifest("later", sleeper(grid.image, "later"))),
                        "--no-wait", "--json").json()
    # The command does not wait, though a quick node may already have reported.
    assert deployed["state"] in ("created", "deployed")
    cid = deployed["contract"]
    wait_until(lambda: grid.contract(cid)["state"] == "deployed", "the deployment")
    grid.run("contract", "cancel", str(cid))


def test_stop_and_start_one_node(grid: Grid) -> None:
    node3 = next(n for n in grid.status()["nodes"] if n["name"] == "node-3")
    text = sleeper(grid.image, "on-three", node=str(node3["id"]))
    cid = grid.run("deploy", str(grid.manifest("on-three", text)), "--json").json()["contract"]
    wid = f"c{cid}-main"
    assert runc_ids(grid.runc_root("node-3")) == [wid]

    stopped = grid.run("devnet", "stop", "node-3", "--json").json()
    assert stopped == {"name": "node-3", "stopped": True}
    node3 = next(n for n in grid.status()["nodes"] if n["name"] == "node-3")
    assert node3["alive"] is False
    assert node3["pid"] is None
    assert set(node3) >= {"name", "id", "pid", "alive", "data_dir"}
    # the others keep running, and so does the stopped agent's container
    assert all(n["alive"] for n in grid.status()["nodes"] if n["name"] != "node-3")
    state = subprocess.run(["runc", "--root", str(grid.runc_root("node-3")), "state", wid],
                           capture_output=True, text=True, check=True).stdout
    assert json.loads(state)["status"] == "running"
    pid_before = json.loads(state)["pid"]

    started = grid.run("devnet", "start", "node-3", "--json").json()
    assert started["name"] == "node-3"
    assert started["status"] == "up"
    assert started["id"] == node3["id"]
    node3 = next(n for n in grid.status()["nodes"] if n["name"] == "node-3")
    assert node3["alive"] is True
    assert isinstance(node3["pid"], int)
    err = one_line_error(grid.run("devnet", "start", "node-3", ok=False))
    assert "already running" in err
    # The restarted agent adopted its container: same process, no duplicate, still deployed.
    # Checking that nothing happens needs a window: devnet agents reconcile every 2 s (and on
    # every block), so a wrong re-create would show within this one.
    time.sleep(3)
    assert runc_ids(grid.runc_root("node-3")) == [wid]
    state = subprocess.run(["runc", "--root", str(grid.runc_root("node-3")), "state", wid],
                           capture_output=True, text=True, check=True).stdout
    assert json.loads(state)["pid"] == pid_before
    assert grid.contract(cid)["state"] == "deployed"
    grid.run("contract", "cancel", str(cid))
    assert runc_ids(grid.runc_root("node-3")) == []


def test_node_run_registers_a_node_of_ones_own(grid: Grid) -> None:
    """`tfgrid node run` in the foreground: prints the key to fund, registers once funded,
    reports uptime, and exits 0 on SIGTERM. (Last in this module: it adds a fourth node.)"""
    from cli.devnet_nodes import pick_subnet_indexes, used_subnet_indexes
    from zos_agent.network import NodeNetwork

    farm = grid.run("farm", "list", "--json").json()[0]
    agent_id = f"t{os.getpid() % 100000}"
    subnet = pick_subnet_indexes(1, used_subnet_indexes())[0]
    env = {k: v for k, v in os.environ.items() if k != "TFGRID_HOME"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    err_log = grid.base / "node-run.err"
    with open(err_log, "wb") as err:
        proc = subprocess.Popen(
            [*tfgrid_argv(), "--home", str(grid.home), "node", "run", "--farm", str(farm["id"]),
             "--data-dir", str(grid.base / "own-node"), "--country", "NL", "--city", "Delft",
             "--agent-id", agent_id, "--subnet-index", str(subnet)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        wait_until(lambda: "node key " in err_log.read_text(), "the node key line")
        first = next(ln for ln in err_log.read_text().splitlines() if "node key " in ln)
        address = first.split("node key ")[1].split()[0]
        assert len(address) == 64
        grid.run("account", "transfer", address, "100000000")

        def registered() -> bool:
            nodes = grid.run("node", "list", "--json").json()
            return any(n["country"] == "NL" and n["status"] == "up" for n in nodes)

        wait_until(registered, "the new node registered and up")
        mine = next(n for n in grid.run("node", "list", "--json").json() if n["country"] == "NL")
        assert mine["farm"] == farm["id"]
        assert grid.run("node", "show", str(mine["id"]), "--json").json()["public_key"] == address
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        trio.run(NodeNetwork(agent_id=agent_id, subnet_index=subnet).teardown)
