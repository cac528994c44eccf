"""``zos-agent --config FILE [flags]``: run the node agent in the foreground.

Also what ``tfgrid node run`` calls (:func:`run_agent`). Logs go to stderr (and ``log_file``
if configured). Once the node is registered one line ``node <id>`` is printed on stdout.
SIGTERM or SIGINT stops the agent cleanly; containers keep running and are adopted by the
next start. Exit status: 0 after a signal, 2 for a configuration error, 1 for anything
else that stops the agent (e.g. a forked validator set).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ledger.client import LedgerClient
from ledger.config import read_genesis
from ledger.errors import ConfigError, ConflictingHeaders, TfgridError
from zos_agent import config as agent_config
from zos_agent.agent import Agent
from zos_agent.config import AgentConfig
from zos_agent.follower import Follower, ProvenReader
from zos_agent.identity import load_or_create_node_key
from zos_agent.images import GridSource, ImageStore
from zos_agent.namespaces import ShardService
from zos_agent.network import NodeNetwork
from zos_agent.runtime import Runtime

log = logging.getLogger("zos_agent")


async def serve(cfg: AgentConfig, *,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the agent of ``cfg`` until cancelled; ``started(node_id)`` once registered.

    Raises :class:`ConfigError` (bad genesis, unusable data dir, not root), and
    :class:`ConflictingHeaders` when the validators forked.
    """
    key = load_or_create_node_key(cfg.data_dir)
    cfg = agent_config.with_agent_id(cfg, key.public_key)
    genesis = read_genesis(cfg.genesis)
    if os.geteuid() != 0:
        raise ConfigError("the agent runs containers with runc and must run as root")
    network = NodeNetwork(agent_id=cfg.agent_id, subnet_index=cfg.subnet_index,
                          host_address=cfg.host_address)
    runtime = Runtime(runc_root=cfg.runc_root_dir, data_dir=cfg.data_dir,
                      images=ImageStore(cfg.data_dir / "images",
                                       grid=GridSource(tuple(cfg.peers), cfg.genesis)),
                      network=network)
    async with LedgerClient(genesis, cfg.peers, timeout_s=cfg.request_timeout_s,
                            stall_timeout_s=cfg.stall_timeout_s) as client:
        reader = ProvenReader(client, cfg.peers, timeout_s=cfg.request_timeout_s)
        try:
            await network.setup()
            follower = Follower(reader, chain_id=genesis.chain_id, node_key=key)
            shards = (ShardService(cfg.data_dir, chain_id=genesis.chain_id,
                                   host=cfg.host_address, port=cfg.shard_port)
                      if cfg.shard_port else None)
            agent = Agent(cfg, key=key, genesis=genesis, client=client, follower=follower,
                          runtime=runtime, shards=shards)
            log.info("agent %s starting: data dir %s, peers %s", cfg.agent_id, cfg.data_dir,
                     ", ".join(f"{h}:{p}" for h, p in cfg.peers))
            async with trio.open_nursery() as nursery:
                node_id = await nursery.start(agent.run)
                task_status.started(node_id)
        finally:
            with trio.CancelScope(shield=True):
                await reader.aclose()


async def _main_async(cfg: AgentConfig) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s, stopping (containers keep running)",
                             signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            node_id = await nursery.start(serve, cfg)
            print(f"node {node_id}", flush=True)


def setup_logging(cfg: AgentConfig) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg.log_file is not None:
        cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(cfg.log_file))
    logging.basicConfig(level=cfg.log_level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_agent(cfg: AgentConfig) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT; returns the exit status."""
    setup_logging(cfg)
    try:
        trio.run(_main_async, cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConflictingHeaders as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1
    except TfgridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: Sequence[str] | None) -> tuple[Path | None, dict[str, Any]]:
    p = argparse.ArgumentParser(prog="zos-agent", description="Run a tfgrid node agent.")
    p.add_argument("--config", type=Path, help="config file (TOML, or JSON if .json)")
    p.add_argument("--farm-id", type=int)
    p.add_argument("--peers", help="ledger peers, HOST:PORT[,HOST:PORT...]")
    p.add_argument("--genesis", help="genesis file")
    p.add_argument("--data-dir", help="data directory (node key, containers, volumes)")
    p.add_argument("--reserve-percent", type=int)
    p.add_argument("--uptime-interval", dest="uptime_interval_s", type=float)
    p.add_argument("--capacity-interval", dest="capacity_interval_s", type=float)
    p.add_argument("--reconcile-interval", dest="reconcile_interval_s", type=float)
    p.add_argument("--country")
    p.add_argument("--city")
    p.add_argument("--host-address")
    p.add_argument("--agent-id")
    p.add_argument("--subnet-index", type=int)
    p.add_argument("--log-file")
    p.add_argument("--log-level", choices=agent_config.LOG_LEVELS)
    args = vars(p.parse_args(argv))
    path = args.pop("config")
    flags = {k: v for k, v in args.items() if v is not None}
    return path, agent_config.from_mapping(flags, base=Path.cwd(), source="command line")


def main(argv: Sequence[str] | None = None) -> None:
    try:
        path, overrides = parse_args(argv)
        cfg = agent_config.load(path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_agent(cfg))


if __name__ == "__main__":
    main()
