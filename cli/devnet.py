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
from ledger import keys
from ledger.client import LedgerClient
from ledger.config import format_hostport, parse_hostport
from ledger.errors import ConfigError, LedgerTimeout, NotFound, TfgridError
from ledger.types import Genesis

DEVNET_FUNDS = 1_000_000_000_000  # base units given to the devnet's own identity at genesis
DEFAULT_VALIDATORS = 4
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

    @property
    def file(self) -> Path:
        return Home(self.root).devnet_file

    def validator_home(self, v: DevnetValidator) -> Path:
        return self.root / v.name

    def log_file(self, v: DevnetValidator) -> Path:
        return self.validator_home(v) / LOG_FILE

    def get(self, name: str) -> DevnetValidator:
        for v in self.validators:
            if v.name == name:
                return v
        names = ", ".join(v.name for v in self.validators)
        raise NotFound(f"no process named {name!r} in this devnet (it has {names})")

    def with_validator(self, new: DevnetValidator) -> Devnet:
        return replace(self, validators=tuple(new if v.name == new.name else v
                                              for v in self.validators))

    def save(self) -> None:
        write_json(self.file, {"version": FORMAT_VERSION, "chain_id": self.chain_id,
                               "validators": [v.to_doc() for v in self.validators],
                               "nodes": [], "bots": []})

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
            return cls(root, str(doc["chain_id"]), validators)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"devnet record {path} is malformed: {exc}") from exc

    def alive(self) -> list[DevnetValidator]:
        return [v for v in self.validators if v.proc is not None and is_alive(v.proc)]


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


def _stop_all(net: Devnet) -> tuple[Devnet, list[str]]:
    """Stop every recorded process at once; return the devnet record and who was running."""
    running = [v for v in net.validators if v.proc is not None and is_alive(v.proc)]
    stop_all([v.proc for v in running if v.proc is not None])
    net = replace(net, validators=tuple(replace(v, proc=None) for v in net.validators))
    net.save()
    return net, [v.name for v in running]


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


# -- documents -----------------------------------------------------------------------------


def _status_doc(net: Devnet, genesis: Genesis) -> dict[str, Any]:
    alive = {v.name for v in net.alive()}
    heights = trio.run(_heights, genesis, [v for v in net.validators if v.name in alive])
    return {
        "home": str(net.root),
        "validators": [
            {"name": v.name, "pid": None if v.proc is None else v.proc.pid,
             "alive": v.name in alive, "height": heights.get(v.name),
             "address": format_hostport(v.listen), "public_key": v.public_key}
            for v in net.validators
        ],
        "nodes": [],
        "bots": [],
    }


def _status_human(doc: dict[str, Any]) -> str:
    return "\n".join([
        f"devnet {doc['home']}",
        table(doc["validators"], [("name", "name"), ("pid", "pid"), ("alive", "alive"),
                                  ("height", "height"), ("address", "address")]),
        "nodes: none (node agents are not available yet)",
    ])


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
@click.option("--nodes", "n_nodes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Number of node agents.")
@_dir_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=UP_TIMEOUT_S,
              show_default=True, help="Seconds to wait until the grid is healthy.")
@click.pass_context
def up(ctx: click.Context, n_validators: int | None, n_nodes: int, directory: Path | None,
       timeout_s: float) -> None:
    """Start a devnet in DIR (or resume a stopped one) and make DIR a funded home."""
    if n_nodes > 0:
        raise ConfigError("node agents are not available yet: run `devnet up --nodes 0`")
    root = _devnet_dir(ctx, directory)
    home = Home(root)
    if home.devnet_file.exists():
        net = Devnet.load(root)
        if net.alive():
            raise ConfigError(f"a devnet is already running in {root} "
                              "(`tfgrid devnet status`, `tfgrid devnet down`)")
        if n_validators is not None and n_validators != len(net.validators):
            raise ConfigError(f"{root} holds a devnet of {len(net.validators)} validators, "
                              f"not {n_validators}; use another --dir for a new one")
    else:
        net = _create(root, n_validators or DEFAULT_VALIDATORS)
    genesis = home.load_genesis()
    try:
        for v in net.validators:
            net = _start(net, v)
        trio.run(_wait_committing, net, genesis, [v.name for v in net.validators], timeout_s)
    except BaseException:
        _stop_all(net)  # never leave half a devnet running behind an error
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


def _create(root: Path, n_validators: int) -> Devnet:
    home = Home(root)
    if home.has_context() or home.has_identity():
        raise ConfigError(f"{root} is already a tfgrid home; choose an empty --dir for a devnet")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; choose an empty --dir for a devnet")
    kp = keys.KeyPair.from_mnemonic(keys.new_mnemonic(os.urandom(32)))
    listens = [("127.0.0.1", p) for p in free_ports("127.0.0.1", n_validators)]
    genesis, specs = create_network(
        root, chain_id=f"devnet-{os.urandom(3).hex()}", listens=listens,
        accounts=[(kp.public_key, DEVNET_FUNDS)], params=DEVNET_PARAMS,
    )
    home.save_identity(kp)
    home.save_context(LedgerContext(tuple(listens), genesis.chain_id, home.genesis_file))
    net = Devnet(root, genesis.chain_id, tuple(
        DevnetValidator(s.name, s.listen, s.address, None) for s in specs))
    net.save()
    return net


@devnet.command()
@json_option
@_dir_option
@click.pass_context
def status(ctx: click.Context, directory: Path | None) -> None:
    """Every devnet process: pid, alive, height, address."""
    net = Devnet.load(_devnet_dir(ctx, directory))
    emit(ctx, _status_doc(net, Home(net.root).load_genesis()), _status_human)


@devnet.command()
@json_option
@_dir_option
@click.pass_context
def down(ctx: click.Context, directory: Path | None) -> None:
    """Stop every process this devnet started (its data stays; `devnet up` resumes it)."""
    net = Devnet.load(_devnet_dir(ctx, directory))
    t0 = time.monotonic()
    net, stopped = _stop_all(net)
    doc = {"home": str(net.root), "stopped": stopped,
           "seconds": round(time.monotonic() - t0, 2)}
    emit(ctx, doc, lambda d: f"stopped {', '.join(d['stopped']) or 'nothing (all were down)'}")


@devnet.command(name="stop")
@json_option
@click.argument("name")
@_dir_option
@click.pass_context
def stop_cmd(ctx: click.Context, name: str, directory: Path | None) -> None:
    """Stop one process of the devnet (e.g. validator-2), for fault drills."""
    net = Devnet.load(_devnet_dir(ctx, directory))
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
              show_default=True, help="Seconds to wait until it has caught up.")
@click.pass_context
def start_cmd(ctx: click.Context, name: str, directory: Path | None, timeout_s: float) -> None:
    """Start one stopped process of the devnet again and wait until it follows the chain."""
    net = Devnet.load(_devnet_dir(ctx, directory))
    v = net.get(name)
    if v.proc is not None and is_alive(v.proc):
        raise ConfigError(f"{name} is already running (pid {v.proc.pid})")
    genesis = Home(net.root).load_genesis()
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
