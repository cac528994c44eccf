"""`tfgrid devnet up|status|down|stop|start`: a whole grid on this machine, as real processes.

A devnet directory D is also a tfgrid home (context + funded identity), so after
``tfgrid devnet up --dir D`` every other command works with ``--home D``. Its processes are
recorded in D/devnet.json by pid and start time; ``down`` stops exactly those.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import click
import trio

import ledger
from cli import chain
from cli import devnet_nodes as dn
from cli.devnet_nodes import DevnetFarm, DevnetNode
from cli.home import (
    FORMAT_VERSION,
    Home,
    LedgerContext,
    read_json,
    write_json,
)
from cli.network import create_network, free_ports
from cli.output import emit, json_option, progress, progress_done, settings, table
from cli.procs import ProcessRecord, is_alive, spawn, stop, stop_all
from ledger import keys, keyspace
from ledger.client import LedgerClient
from ledger.config import format_hostport, parse_hostport
from ledger.errors import ConfigError, LedgerTimeout, NotFound, TfgridError
from ledger.state import Params, node_status
from ledger.types import Genesis

DEVNET_FUNDS = 1_000_000_000_000  # base units given to the devnet's own identity at genesis
DEFAULT_VALIDATORS = 4
DEFAULT_NODES = 20
DEFAULT_FARMS = 5
UP_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.25
STATUS_TIMEOUT_S = 1.0
LOG_FILE = "validator.log"
# Devnet chain parameters: periods of seconds to minutes, so that billing, grace, minting and
# node up/down show within a demo (production-like chains use hours and weeks).
DEVNET_PARAMS: dict[str, int] = {
    "billing_period_ms": 10_000,
    "grace_period_ms": 60_000,
    "minting_period_ms": 60_000,
    "uptime_down_after_ms": 30_000,
}


@dataclass(frozen=True, slots=True)
class DevnetValidator:
    name: str
    listen: tuple[str, int]
    public_key: str  # hex
    proc: ProcessRecord | None  # None while stopped

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "listen": format_hostport(self.listen),
                "public_key": self.public_key,
                "process": None if self.proc is None else self.proc.to_doc()}



@dataclass(frozen=True, slots=True)
class Devnet:
    root: Path
    chain_id: str
    validators: tuple[DevnetValidator, ...]
    farms: tuple[DevnetFarm, ...] = ()
    nodes: tuple[DevnetNode, ...] = ()

    @property
    def file(self) -> Path:
        return Home(self.root).devnet_file

    def validator_home(self, v: DevnetValidator) -> Path:
        return self.root / v.name

    def log_file(self, v: DevnetValidator) -> Path:
        return self.validator_home(v) / LOG_FILE

    def names(self) -> list[str]:
        return [v.name for v in self.validators] + [n.name for n in self.nodes]

    def _unknown(self, name: str) -> NotFound:
        return NotFound(f"no process named {name!r} in this devnet "
                        f"(it has {', '.join(self.names())})")

    def get(self, name: str) -> DevnetValidator:
        """The validator called ``name``. Raises :class:`NotFound`."""
        for v in self.validators:
            if v.name == name:
                return v
        raise self._unknown(name)

    def node(self, name: str) -> DevnetNode:
        """The node called ``name``. Raises :class:`NotFound`."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise self._unknown(name)

    def farm(self, name: str) -> DevnetFarm:
        for f in self.farms:
            if f.name == name:
                return f
        raise ConfigError(f"devnet record {self.file}: unknown farm {name!r}")

    def is_node(self, name: str) -> bool:
        return any(n.name == name for n in self.nodes)

    def with_validator(self, new: DevnetValidator) -> Devnet:
        return replace(self, validators=tuple(new if v.name == new.name else v
                                              for v in self.validators))

    def with_node(self, new: DevnetNode) -> Devnet:
        return replace(self, nodes=tuple(new if n.name == new.name else n for n in self.nodes))

    def with_farm(self, new: DevnetFarm) -> Devnet:
        return replace(self, farms=tuple(new if f.name == new.name else f for f in self.farms))

    def save(self) -> None:
        write_json(self.file, {"version": FORMAT_VERSION, "chain_id": self.chain_id,
                               "validators": [v.to_doc() for v in self.validators],
                               "farms": [f.to_doc() for f in self.farms],
                               "nodes": [n.to_doc() for n in self.nodes], "bots": []})

    @classmethod
    def load(cls, root: Path) -> Devnet:
        """Raises :class:`ConfigError` if ``root`` holds no (valid) devnet."""
        path = Home(root).devnet_file
        if not path.exists():
            raise ConfigError(f"{root} is not a devnet (no {path.name}): run `tfgrid devnet up`")
        doc = read_json(path, "devnet record")
        try:
            validators = tuple(
                DevnetValidator(
                    name=str(v["name"]), listen=parse_hostport(str(v["listen"])),
                    public_key=str(v["public_key"]),
                    proc=None if v["process"] is None else ProcessRecord(
                        int(v["process"]["pid"]), int(v["process"]["started"])),
                )
                for v in doc["validators"]
            )
            farms = tuple(DevnetFarm.from_doc(f) for f in doc.get("farms", []))
            nodes = tuple(DevnetNode.from_doc(n) for n in doc.get("nodes", []))
            return cls(root, str(doc["chain_id"]), validators, farms, nodes)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"devnet record {path} is malformed: {exc}") from exc

    def alive(self) -> list[DevnetValidator]:
        return [v for v in self.validators if v.proc is not None and is_alive(v.proc)]

    def alive_nodes(self) -> list[DevnetNode]:
        return [n for n in self.nodes if n.proc is not None and is_alive(n.proc)]

    def peers(self) -> list[tuple[str, int]]:
        return [v.listen for v in self.validators]


# -- processes -----------------------------------------------------------------------------


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    # The daemon must import this very checkout even when tfgrid is not pip-installed.
    source_root = str(Path(ledger.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows what happened up to a crash
    return env


def _start(net: Devnet, v: DevnetValidator) -> Devnet:
    home = net.validator_home(v)
    rec = spawn([sys.executable, "-m", "ledger.node", "--home", str(home.resolve())],
                log_path=net.log_file(v), env=_node_env())
    net = net.with_validator(replace(v, proc=rec))
    net.save()  # recorded before anything else can fail, so `devnet down` always finds it
    return net


def _stop(net: Devnet, v: DevnetValidator) -> Devnet:
    if v.proc is not None:
        stop(v.proc)
    net = net.with_validator(replace(v, proc=None))
    net.save()
    return net


def _start_node(net: Devnet, n: DevnetNode) -> Devnet:
    """Write the node's agent config (farm, peers, its share of the machine) and start it."""
    farm = net.farm(n.farm)
    if farm.farm_id is None:
        raise TfgridError(f"{n.name}: farm {farm.name} is not on the ledger yet")
    config = dn.write_agent_config(
        net.root, n, farm_id=farm.farm_id, country=farm.country, city=farm.city,
        peers=net.peers(), capacity=dn.machine_share(net.root, len(net.nodes)))
    rec = spawn([sys.executable, "-m", "zos_agent.main", "--config", str(config.resolve())],
                log_path=dn.log_file(net.root, n), env=_node_env())
    net = net.with_node(replace(n, proc=rec))
    net.save()
    return net


def _stop_node(net: Devnet, n: DevnetNode) -> Devnet:
    """SIGTERM the agent (its containers keep running; the next start adopts them)."""
    if n.proc is not None:
        stop(n.proc)
    net = net.with_node(replace(n, proc=None))
    net.save()
    return net


def _stop_all(net: Devnet) -> tuple[Devnet, list[str]]:
    """Stop every recorded process at once; return the devnet record and who was running."""
    running_v = [v for v in net.validators if v.proc is not None and is_alive(v.proc)]
    running_n = net.alive_nodes()
    stop_all([p for p in [*(v.proc for v in running_v), *(n.proc for n in running_n)]
              if p is not None])
    net = replace(net, validators=tuple(replace(v, proc=None) for v in net.validators),
                  nodes=tuple(replace(n, proc=None) for n in net.nodes))
    net.save()
    return net, [v.name for v in running_v] + [n.name for n in running_n]


def _down(net: Devnet) -> tuple[Devnet, list[str], dict[str, list[str]]]:
    """Stop every process, then remove the containers and networks of this devnet's agents.

    Raises :class:`TfgridError` if some clean-up failed (after trying all of it).
    """
    net, stopped = _stop_all(net)
    removed: dict[str, list[str]] = {}
    if net.nodes:
        removed, errors = trio.run(dn.cleanup_nodes, net.root, list(net.nodes))
        if errors:
            raise TfgridError(f"devnet stopped, but clean-up failed: {'; '.join(errors)}")
    return net, stopped, removed


def _last_log_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


# -- health --------------------------------------------------------------------------------


async def _height(genesis: Genesis, listen: tuple[str, int]) -> int | None:
    """The height one validator reports, or None if it does not answer in time."""
    try:
        with trio.move_on_after(STATUS_TIMEOUT_S * 2):
            async with LedgerClient(genesis, [listen], timeout_s=STATUS_TIMEOUT_S) as client:
                return (await client.status()).height
    except (TfgridError, OSError):
        pass
    return None


async def _heights(genesis: Genesis, validators: list[DevnetValidator]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}

    async def one(v: DevnetValidator) -> None:
        out[v.name] = await _height(genesis, v.listen)

    async with trio.open_nursery() as nursery:
        for v in validators:
            nursery.start_soon(one, v)
    return out


async def _wait_committing(net: Devnet, genesis: Genesis, names: list[str],
                           timeout_s: float, *, at_least: int = 0) -> dict[str, int | None]:
    """Wait until every validator in ``names`` answers and the chain commits a new block.

    "New" means above the highest height any of them reported once all answered; each must
    also reach ``at_least`` (a restarted validator catching up with the others). Raises
    :class:`TfgridError` if one of them exits, :class:`LedgerTimeout` after ``timeout_s``.
    """
    watched = [net.get(n) for n in names]
    target: int | None = None
    heights: dict[str, int | None] = {}
    with trio.move_on_after(timeout_s):
        while True:
            for v in watched:
                if v.proc is None or not is_alive(v.proc):
                    log = net.log_file(v)
                    raise TfgridError(f"{v.name} exited during start-up: "
                                      f"{_last_log_line(log) or 'no output'} (log: {log})")
            heights = await _heights(genesis, watched)
            answering = [h for h in heights.values() if h is not None]
            if len(answering) == len(watched):
                if target is None:
                    target = max(max(answering) + 1, at_least)
                if min(answering) >= target:
                    progress_done()
                    return heights
            top = max(answering, default=0)
            progress(f"devnet: {len(answering)}/{len(watched)} validators answering, "
                     f"height {top}")
            await trio.sleep(POLL_INTERVAL_S)
    progress_done()
    silent = [n for n, h in heights.items() if h is None]
    detail = (f"{', '.join(silent)} not answering" if silent
              else f"no new block (heights {heights})")
    logs = ", ".join(str(net.log_file(net.get(n))) for n in (silent or names))
    raise LedgerTimeout(f"devnet not healthy after {timeout_s:.0f}s: {detail}; logs: {logs}")


@dataclass(frozen=True, slots=True)
class NodeLedgerView:
    id: int | None  # None until registered
    status: str  # "up" | "down" | "unregistered"
    last_uptime_ms: int


async def _node_views(client: LedgerClient, genesis: Genesis,
                      nodes: list[DevnetNode]) -> dict[str, NodeLedgerView]:
    """What the ledger says about each node (by its key), read with proofs."""
    params = Params.from_genesis(genesis)
    header, _commit = await client.latest()
    index = await chain.read_entries(
        client, [keyspace.node_by_key(bytes.fromhex(n.public_key)) for n in nodes])
    ids = [None if e is None else int(e["node"]) for e in index]
    entries = await chain.read_entries(client, [keyspace.node(i) for i in ids if i is not None])
    by_id = {int(e["id"]): e for e in entries if e is not None}
    out: dict[str, NodeLedgerView] = {}
    for n, nid in zip(nodes, ids, strict=True):
        entry = by_id.get(nid) if nid is not None else None
        if entry is None:
            out[n.name] = NodeLedgerView(None, "unregistered", 0)
        else:
            out[n.name] = NodeLedgerView(
                nid, node_status(entry, header.time_ms, params.uptime_down_after_ms),
                int(entry.get("last_uptime_ms", 0)))
    return out


async def _wait_nodes_up(net: Devnet, genesis: Genesis, names: list[str], timeout_s: float,
                         *, after_ms: dict[str, int] | None = None) -> dict[str, NodeLedgerView]:
    """Wait until every node in ``names`` is registered and up (with an uptime report newer
    than ``after_ms[name]`` when given: a restarted agent must report again).

    Raises :class:`TfgridError` if an agent exits, :class:`LedgerTimeout` after ``timeout_s``.
    """
    watched = [net.node(n) for n in names]
    views: dict[str, NodeLedgerView] = {}
    since = after_ms or {}

    def ready(name: str) -> bool:
        v = views.get(name)
        return v is not None and v.status == "up" and v.last_uptime_ms > since.get(name, 0)

    async with LedgerClient(genesis, net.peers(), timeout_s=chain.CLIENT_TIMEOUT_S) as client:
        with trio.move_on_after(timeout_s):
            while True:
                for n in watched:
                    if n.proc is None or not is_alive(n.proc):
                        log = dn.log_file(net.root, n)
                        raise TfgridError(f"{n.name} exited during start-up: "
                                          f"{_last_log_line(log) or 'no output'} (log: {log})")
                try:
                    views = await _node_views(client, genesis, watched)
                except (LedgerTimeout, TfgridError):
                    views = {}
                if all(ready(n) for n in names):
                    progress_done()
                    return views
                progress(f"devnet: {sum(ready(n) for n in names)}/{len(names)} nodes up")
                await trio.sleep(POLL_INTERVAL_S * 2)
    progress_done()
    late = [n for n in names if not ready(n)]
    logs = ", ".join(str(dn.log_file(net.root, net.node(n))) for n in late[:3])
    raise LedgerTimeout(f"node(s) {', '.join(late)} not registered and up after "
                        f"{timeout_s:.0f}s; logs: {logs}")


async def _create_farms(net: Devnet, genesis: Genesis) -> Devnet:
    """Each farmer registers its twin (in parallel), then creates its farm (one after the other,
    so that farmer-K owns farm K on a fresh chain). Farms already on the ledger are skipped."""
    todo = [f for f in net.farms if f.farm_id is None]

    async def twin_of(client: LedgerClient, farm: DevnetFarm) -> int | None:
        key = dn.farmer_home(net.root, farm).load_identity()
        index = await chain.read_entry(client, keyspace.twin_by_key(key.public_key))
        return None if index is None else int(index["twin"])

    async def register(client: LedgerClient, farm: DevnetFarm) -> None:
        if await twin_of(client, farm) is None:
            key = dn.farmer_home(net.root, farm).load_identity()
            await chain.send_tx(client, key, genesis, "twin_register",
                                {"name": farm.name, "endpoint": ""})

    async with LedgerClient(genesis, net.peers(), timeout_s=chain.CLIENT_TIMEOUT_S) as client:
        async with trio.open_nursery() as nursery:
            for farm in todo:
                nursery.start_soon(register, client, farm)
        for farm in todo:
            owner = await twin_of(client, farm)
            key = dn.farmer_home(net.root, farm).load_identity()
            await chain.send_tx(client, key, genesis, "farm_create",
                                {"name": f"devnet {farm.name}", "country": farm.country})
            farm_id = None
            for fid in range(await chain.counter(client, "next_farm_id") - 1, 0, -1):
                entry = await chain.read_entry(client, keyspace.farm(fid))
                if entry is not None and int(entry["owner"]) == owner:
                    farm_id = fid
                    break
            if farm_id is None:
                raise NotFound(f"farm of {farm.name} was created but cannot be read back")
            net = net.with_farm(replace(farm, farm_id=farm_id))
            net.save()
    return net


# -- documents -----------------------------------------------------------------------------


def _status_doc(net: Devnet, genesis: Genesis) -> dict[str, Any]:
    alive = {v.name for v in net.alive()}
    heights = trio.run(_heights, genesis, [v for v in net.validators if v.name in alive])
    alive_nodes = {n.name for n in net.alive_nodes()}
    views: dict[str, NodeLedgerView] = {}
    if net.nodes and alive:
        async def read_views() -> dict[str, NodeLedgerView]:
            peers = [v.listen for v in net.validators if v.name in alive]
            with trio.move_on_after(STATUS_TIMEOUT_S * 5):
                async with LedgerClient(genesis, peers, timeout_s=STATUS_TIMEOUT_S) as client:
                    return await _node_views(client, genesis, list(net.nodes))
            return {}

        try:
            views = trio.run(read_views)
        except TfgridError:
            views = {}
    return {
        "home": str(net.root),
        "validators": [
            {"name": v.name, "pid": None if v.proc is None else v.proc.pid,
             "alive": v.name in alive, "height": heights.get(v.name),
             "address": format_hostport(v.listen), "public_key": v.public_key}
            for v in net.validators
        ],
        "nodes": [
            {"name": n.name,
             "id": views[n.name].id if n.name in views else None,
             "pid": None if n.proc is None else n.proc.pid,
             "alive": n.name in alive_nodes,
             "data_dir": str(dn.data_dir(net.root, n)),
             "shard_port": n.shard_port,
             "farm": net.farm(n.farm).farm_id,
             "country": net.farm(n.farm).country,
             "status": views[n.name].status if n.name in views else None}
            for n in net.nodes
        ],
        "bots": [],
    }


def _status_human(doc: dict[str, Any]) -> str:
    lines = [
        f"devnet {doc['home']}",
        table(doc["validators"], [("name", "name"), ("pid", "pid"), ("alive", "alive"),
                                  ("height", "height"), ("address", "address")]),
    ]
    if doc["nodes"]:
        lines.append(table(doc["nodes"], [("name", "name"), ("id", "node id"), ("pid", "pid"),
                                          ("alive", "alive"), ("status", "ledger"),
                                          ("farm", "farm"), ("country", "country"),
                                          ("data_dir", "data dir")]))
    else:
        lines.append("nodes: none (`devnet up --nodes N` starts node agents)")
    return "\n".join(lines)


def _devnet_dir(ctx: click.Context, directory: Path | None) -> Path:
    return (directory if directory is not None else settings(ctx).home).expanduser().absolute()


_dir_option = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The devnet directory (default: the --home directory).")


# -- commands ------------------------------------------------------------------------------


@click.group()
def devnet() -> None:
    """A whole local grid as real background processes (for development and drills)."""


@devnet.command()
@json_option
@click.option("--validators", "n_validators", type=click.IntRange(1, 64), default=None,
              help=f"Number of validators [default: {DEFAULT_VALIDATORS}].")
@click.option("--nodes", "n_nodes", type=click.IntRange(0, 254), default=None,
              help=f"Number of node agents (they run containers: needs root) "
                   f"[default: {DEFAULT_NODES}].")
@click.option("--farms", "n_farms", type=click.IntRange(1, 254), default=None,
              help=f"Number of farms, each in another country; nodes are spread over them "
                   f"[default: {DEFAULT_FARMS}, at most one per node].")
@_dir_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=UP_TIMEOUT_S,
              show_default=True, help="Seconds to wait for each step (validators, nodes).")
@click.pass_context
def up(ctx: click.Context, n_validators: int | None, n_nodes: int | None, n_farms: int | None,
       directory: Path | None, timeout_s: float) -> None:
    """Start a devnet in DIR (or resume a stopped one) and make DIR a funded home."""
    root = _devnet_dir(ctx, directory)
    home = Home(root)
    if home.devnet_file.exists():
        net = Devnet.load(root)
        if net.alive() or net.alive_nodes():
            raise ConfigError(f"a devnet is already running in {root} "
                              "(`tfgrid devnet status`, `tfgrid devnet down`)")
        for what, asked, have in (("validators", n_validators, len(net.validators)),
                                  ("nodes", n_nodes, len(net.nodes)),
                                  ("farms", n_farms, len(net.farms))):
            if asked is not None and asked != have:
                raise ConfigError(f"{root} holds a devnet of {have} {what}, not {asked}; "
                                  "use another --dir for a new one")
        if net.nodes and not dn.is_root():
            raise ConfigError("this devnet has node agents, which run containers with runc "
                              "and need root")
    else:
        nodes = DEFAULT_NODES if n_nodes is None else n_nodes
        farms = n_farms if n_farms is not None else min(DEFAULT_FARMS, nodes)
        if nodes and not dn.is_root():
            raise ConfigError("node agents run containers with runc and need root: run as "
                              "root, or pass --nodes 0 for a ledger-only devnet")
        net = _create(root, n_validators or DEFAULT_VALIDATORS, nodes, farms)
    genesis = home.load_genesis()
    try:
        for v in net.validators:
            net = _start(net, v)
        trio.run(_wait_committing, net, genesis, [v.name for v in net.validators], timeout_s)
        if net.farms:
            net = trio.run(_create_farms, net, genesis)
        for n in net.nodes:
            net = _start_node(net, n)
        if net.nodes:
            trio.run(_wait_nodes_up, net, genesis, [n.name for n in net.nodes], timeout_s)
    except BaseException:
        _down(net)  # never leave half a devnet running behind an error
        raise
    doc = _status_doc(net, genesis)
    doc["chain_id"] = net.chain_id
    doc["identity"] = home.load_identity().address

    def human(d: dict[str, Any]) -> str:
        return "\n".join([
            _status_human(d),
            f"identity {d['identity']} (funded)",
            f"use it:  export TFGRID_HOME={d['home']}   (or pass --home {d['home']})",
        ])

    emit(ctx, doc, human)


def _create(root: Path, n_validators: int, n_nodes: int, n_farms: int) -> Devnet:
    home = Home(root)
    if home.has_context() or home.has_identity():
        raise ConfigError(f"{root} is already a tfgrid home; choose an empty --dir for a devnet")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; choose an empty --dir for a devnet")
    suffix = os.urandom(3).hex()
    kp = keys.KeyPair.from_mnemonic(keys.new_mnemonic(os.urandom(32)))
    farms = dn.plan_farms(n_farms)
    farmer_seeds = [os.urandom(32) for _ in farms]
    node_names = [f"node-{k + 1}" for k in range(n_nodes)]
    node_keys = dn.create_node_keys(root, node_names)
    nodes = dn.plan_nodes(node_names, farms, node_keys, suffix, dn.used_subnet_indexes()) \
        if n_nodes else []
    listens = [("127.0.0.1", p) for p in free_ports("127.0.0.1", n_validators)]
    accounts = [(kp.public_key, DEVNET_FUNDS)]
    accounts += [(keys.KeyPair.from_seed(s).public_key, dn.FARMER_FUNDS) for s in farmer_seeds]
    accounts += [(pk, dn.NODE_FUNDS) for pk in node_keys]
    genesis, specs = create_network(
        root, chain_id=f"devnet-{suffix}", listens=listens, accounts=accounts,
        params=DEVNET_PARAMS,
    )
    home.save_identity(kp)
    home.save_context(LedgerContext(tuple(listens), genesis.chain_id, home.genesis_file))
    for farm, seed in zip(farms, farmer_seeds, strict=True):
        dn.save_farmer_home(root, farm, seed, listens, genesis.chain_id)
    net = Devnet(root, genesis.chain_id, tuple(
        DevnetValidator(s.name, s.listen, s.address, None) for s in specs),
        tuple(farms), tuple(nodes))
    net.save()
    return net


@devnet.command()
@json_option
@_dir_option
@click.pass_context
def status(ctx: click.Context, directory: Path | None) -> None:
    """Every devnet process: pid, alive, height/address (validators), node id/status (nodes)."""
    net = Devnet.load(_devnet_dir(ctx, directory))
    emit(ctx, _status_doc(net, Home(net.root).load_genesis()), _status_human)


@devnet.command()
@json_option
@_dir_option
@click.pass_context
def down(ctx: click.Context, directory: Path | None) -> None:
    """Stop every process this devnet started and remove its agents' containers and
    networks (the chain and node keys stay; `devnet up` resumes and the agents redeploy)."""
    net = Devnet.load(_devnet_dir(ctx, directory))
    t0 = time.monotonic()
    net, stopped, removed = _down(net)
    doc = {"home": str(net.root), "stopped": stopped,
           "removed_containers": sorted(c for ids in removed.values() for c in ids),
           "seconds": round(time.monotonic() - t0, 2)}

    def human(d: dict[str, Any]) -> str:
        text = f"stopped {', '.join(d['stopped']) or 'nothing (all were down)'}"
        if d["removed_containers"]:
            text += f"\nremoved containers {', '.join(d['removed_containers'])}"
        return text

    emit(ctx, doc, human)


@devnet.command(name="stop")
@json_option
@click.argument("name")
@_dir_option
@click.pass_context
def stop_cmd(ctx: click.Context, name: str, directory: Path | None) -> None:
    """Stop one process of the devnet (validator-2, node-3), for fault drills.

    A stopped node agent leaves its containers running; started again, it adopts them."""
    net = Devnet.load(_devnet_dir(ctx, directory))
    if net.is_node(name):
        n = net.node(name)
        was_alive = n.proc is not None and is_alive(n.proc)
        _stop_node(net, n)
    else:
        v = net.get(name)
        was_alive = v.proc is not None and is_alive(v.proc)
        _stop(net, v)
    emit(ctx, {"name": name, "stopped": was_alive},
         lambda d: f"{name} stopped" if d["stopped"] else f"{name} was not running")


@devnet.command(name="start")
@json_option
@click.argument("name")
@_dir_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=UP_TIMEOUT_S,
              show_default=True, help="Seconds to wait until it has caught up / is up.")
@click.pass_context
def start_cmd(ctx: click.Context, name: str, directory: Path | None, timeout_s: float) -> None:
    """Start one stopped process of the devnet again and wait until it follows the chain
    (a validator) or has reported uptime again (a node)."""
    net = Devnet.load(_devnet_dir(ctx, directory))
    genesis = Home(net.root).load_genesis()
    if net.is_node(name):
        _start_one_node(ctx, net, genesis, name, timeout_s)
        return
    v = net.get(name)
    if v.proc is not None and is_alive(v.proc):
        raise ConfigError(f"{name} is already running (pid {v.proc.pid})")
    others = trio.run(_heights, genesis, [o for o in net.alive() if o.name != name])
    chain_height = max((h for h in others.values() if h is not None), default=0)
    net = _start(net, v)
    try:
        heights = trio.run(partial(_wait_committing, at_least=chain_height),
                           net, genesis, [name], timeout_s)
    except BaseException:
        _stop(net, net.get(name))
        raise
    rec = net.get(name).proc
    emit(ctx, {"name": name, "pid": None if rec is None else rec.pid, "height": heights[name]},
         lambda d: f"{name} running (pid {d['pid']}), at height {d['height']}")


def _start_one_node(ctx: click.Context, net: Devnet, genesis: Genesis, name: str,
                    timeout_s: float) -> None:
    n = net.node(name)
    if n.proc is not None and is_alive(n.proc):
        raise ConfigError(f"{name} is already running (pid {n.proc.pid})")
    if not dn.is_root():
        raise ConfigError("node agents run containers with runc and need root")

    async def last_reports() -> dict[str, int]:
        async with LedgerClient(genesis, net.peers(), timeout_s=chain.CLIENT_TIMEOUT_S) as c:
            views = await _node_views(c, genesis, [n])
        return {k: v.last_uptime_ms for k, v in views.items()}

    before = trio.run(last_reports)
    net = _start_node(net, n)
    try:
        views = trio.run(partial(_wait_nodes_up, after_ms=before), net, genesis, [name],
                         timeout_s)
    except BaseException:
        _stop_node(net, net.node(name))
        raise
    rec = net.node(name).proc
    emit(ctx, {"name": name, "pid": None if rec is None else rec.pid, "id": views[name].id,
               "status": views[name].status},
         lambda d: f"{name} running (pid {d['pid']}), node {d['id']} is {d['status']}")
