"""The node agents of a devnet: farms in different countries, one agent process per node.

Layout inside the devnet directory D::

    D/farmer-K/           a tfgrid home (identity + context) of the twin owning farm K
    D/node-K/             node K's data directory: node.key, agent.json (its config),
                          agent.log, runc/ (its runc root), bundles/, volumes/, images/, logs/

Every node key is created (``zos_agent.identity``) and funded at genesis, so the agent can
pay the fees of its registration, uptime reports and results. Farms are created once the
chain runs, by their farmers' twins. The machine is split among the nodes: each registers
1/N of the memory and disk (80% of them) and at least one core, so the grid's capacity report
stays honest about what one machine can hold.

Agents are named by network objects after their agent id (``<chain suffix>-nK``), and each gets
its own container subnet index, chosen among those no other bridge on this machine uses: two
devnets on one machine never touch each other's bridges, rules, runc roots or cgroups.

Each node also gets its own ``shard_port`` (its shard store serves storage namespaces on
127.0.0.1:port), recorded in devnet.json so a restarted agent serves at the same endpoint.
The ports are taken below the kernel's ephemeral range, so the outgoing connections of a busy
devnet never take the port of a stopped node's store.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import trio

from cli.home import Home, LedgerContext, write_json
from cli.procs import ProcessRecord
from ledger.config import format_hostport
from ledger.errors import TfgridError
from zos_agent.identity import load_or_create_node_key
from zos_agent.images import ImageStore
from zos_agent.network import NodeNetwork
from zos_agent.runtime import Runtime

NODE_FUNDS = 10_000_000_000  # base units per node key: a million minimum fees
FARMER_FUNDS = 1_000_000_000
AGENT_CONFIG = "agent.json"
AGENT_LOG = "agent.log"
UPTIME_INTERVAL_S = 10.0  # devnet nodes are "down" 30 s after their last report
RECONCILE_INTERVAL_S = 4.0  # full passes (runtime included); blocks only trigger a ledger check
SUBNET_BASE = "10.213"  # zos_agent.network's default base: <base>.<subnet index>.0/24
MACHINE_SHARE_PERCENT = 80
# Farms go to different countries, in this order (then the list repeats).
LOCATIONS: tuple[tuple[str, str], ...] = (
    ("BE", "Ghent"), ("EG", "Cairo"), ("US", "Denver"), ("NL", "Utrecht"), ("JP", "Osaka"),
    ("BR", "Recife"), ("KE", "Nairobi"), ("DE", "Berlin"), ("IN", "Pune"), ("CA", "Halifax"),
    ("FI", "Tampere"), ("AU", "Perth"), ("AR", "Rosario"), ("ZA", "Durban"), ("KR", "Busan"),
    ("FR", "Lyon"), ("MX", "Puebla"), ("NG", "Ibadan"), ("CH", "Basel"), ("VN", "Hue"),
)


@dataclass(frozen=True, slots=True)
class DevnetFarm:
    name: str  # "farmer-K": also the farmer's home directory under D
    country: str
    city: str
    farm_id: int | None  # on the ledger, once created

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "country": self.country, "city": self.city,
                "farm_id": self.farm_id}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> DevnetFarm:
        return cls(str(d["name"]), str(d["country"]), str(d["city"]),
                   None if d["farm_id"] is None else int(d["farm_id"]))


@dataclass(frozen=True, slots=True)
class DevnetNode:
    name: str  # "node-K": also its data directory under D
    farm: str  # the DevnetFarm name
    public_key: str  # hex of the node key
    agent_id: str
    subnet_index: int
    proc: ProcessRecord | None  # None while stopped
    shard_port: int = 0  # 0: serves no storage (devnets recorded before shard ports)

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "farm": self.farm, "public_key": self.public_key,
                "agent_id": self.agent_id, "subnet_index": self.subnet_index,
                "shard_port": self.shard_port,
                "process": None if self.proc is None else self.proc.to_doc()}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> DevnetNode:
        p = d["process"]
        return cls(str(d["name"]), str(d["farm"]), str(d["public_key"]), str(d["agent_id"]),
                   int(d["subnet_index"]),
                   None if p is None else ProcessRecord(int(p["pid"]), int(p["started"])),
                   int(d.get("shard_port", 0)))


def data_dir(root: Path, node: DevnetNode) -> Path:
    return root / node.name


def runc_root(root: Path, node: DevnetNode) -> Path:
    return data_dir(root, node) / "runc"


def log_file(root: Path, node: DevnetNode) -> Path:
    return data_dir(root, node) / AGENT_LOG


def config_file(root: Path, node: DevnetNode) -> Path:
    return data_dir(root, node) / AGENT_CONFIG


def farmer_home(root: Path, farm: DevnetFarm) -> Home:
    return Home(root / farm.name)


# -- creation -------------------------------------------------------------------------------


def plan_farms(n_farms: int) -> list[DevnetFarm]:
    return [DevnetFarm(f"farmer-{k + 1}", *LOCATIONS[k % len(LOCATIONS)], None)
            for k in range(n_farms)]


def used_subnet_indexes() -> set[int]:
    """Subnet indexes some interface on this machine already has an address in."""
    base = ipaddress.IPv4Network(f"{SUBNET_BASE}.0.0/16")
    used: set[int] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                ip = ipaddress.IPv4Address(a.address)
            except ValueError:
                continue
            if ip in base:
                used.add(int(ip.packed[2]))
    return used


def pick_subnet_indexes(count: int, taken: set[int]) -> list[int]:
    """``count`` indexes in 1..254 outside ``taken``. Raises TfgridError if there are not enough."""
    free = [i for i in range(1, 255) if i not in taken]
    if len(free) < count:
        raise TfgridError(f"only {len(free)} container subnets ({SUBNET_BASE}.X.0/24) are free "
                          f"on this machine, {count} nodes need one each")
    return free[:count]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_shard_ports(count: int, *, host: str = "127.0.0.1",
                     rng: random.Random | None = None) -> list[int]:
    """``count`` distinct ports free on ``host`` now, outside the ephemeral range (outgoing
    connections never take them), starting at a random place so that two devnets made at
    the same time rarely try the same ones. Raises TfgridError if too few are free."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10_000, 65_536) if not low <= p <= high]
    start = (rng or random.Random()).randrange(len(candidates))
    out: list[int] = []
    for p in candidates[start:] + candidates[:start]:
        if len(out) == count:
            break
        if _bindable(host, p):
            out.append(p)
    if len(out) < count:
        raise TfgridError(f"only {len(out)} free ports for shard stores on {host}, "
                          f"{count} nodes need one each")
    return out


def create_node_keys(root: Path, names: list[str]) -> list[bytes]:
    """Create each node's data directory and key; their public keys in order."""
    return [load_or_create_node_key(root / name).public_key for name in names]


def plan_nodes(names: list[str], farms: list[DevnetFarm], public_keys: list[bytes],
               chain_suffix: str, taken_subnets: set[int]) -> list[DevnetNode]:
    """Nodes spread round-robin over the farms, each with its agent id, subnet index and
    shard port."""
    subnets = pick_subnet_indexes(len(names), taken_subnets)
    ports = pick_shard_ports(len(names))
    return [DevnetNode(name, farms[k % len(farms)].name, public_keys[k].hex(),
                       f"{chain_suffix}-n{k + 1}", subnets[k], None, ports[k])
            for k, name in enumerate(names)]


def machine_share(root: Path, n_nodes: int) -> dict[str, int]:
    """The capacity one of ``n_nodes`` devnet nodes registers: its share of this machine."""
    n = max(1, n_nodes)
    cores = max(1, (psutil.cpu_count(logical=True) or 1) // n)
    memory = psutil.virtual_memory().total * MACHINE_SHARE_PERCENT // 100 // n
    storage = psutil.disk_usage(str(root)).total * MACHINE_SHARE_PERCENT // 100 // n
    mib = 1 << 20
    return {"cores": cores, "memory": memory // mib * mib, "storage": storage // mib * mib}


def save_farmer_home(root: Path, farm: DevnetFarm, seed: bytes,
                     peers: list[tuple[str, int]], chain_id: str) -> None:
    from ledger.keys import KeyPair

    home = farmer_home(root, farm)
    home.save_identity(KeyPair.from_seed(seed))
    home.save_context(LedgerContext(tuple(peers), chain_id, root / "genesis.json"))


def write_agent_config(root: Path, node: DevnetNode, *, farm_id: int, country: str, city: str,
                       peers: list[tuple[str, int]], capacity: dict[str, int]) -> Path:
    """Write the node's agent config (zos_agent.config, JSON form); return its path."""
    path = config_file(root, node)
    write_json(path, {
        "farm_id": farm_id,
        "peers": [format_hostport(p) for p in peers],
        "genesis": str((root / "genesis.json").resolve()),
        "data_dir": str(data_dir(root, node).resolve()),
        "country": country,
        "city": city,
        "agent_id": node.agent_id,
        "subnet_index": node.subnet_index,
        "shard_port": node.shard_port,
        "host_address": "127.0.0.1",
        "uptime_interval_s": UPTIME_INTERVAL_S,
        "reconcile_interval_s": RECONCILE_INTERVAL_S,
        "capacity": capacity,
    }, mode=0o600)
    return path


# -- clean-up -------------------------------------------------------------------------------


def runc_containers(root: Path, node: DevnetNode) -> list[str]:
    """Ids of the containers runc knows under this node's runc root (only there)."""
    runc = runc_root(root, node)
    if not runc.is_dir():
        return []
    try:
        out = subprocess.run(["runc", "--root", str(runc), "list", "-q"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise TfgridError(f"cannot list the containers of {node.name}: {exc}") from exc
    return [line.strip() for line in out.splitlines() if line.strip()]


async def cleanup_node(root: Path, node: DevnetNode) -> list[str]:
    """Remove every container of a *stopped* agent (runc state, network, volume, bundle) and
    the agent's host network (bridge, iptables chains). Returns the removed container ids.

    Only this node's runc root and agent id are touched. Raises TfgridError.
    """
    ddir = data_dir(root, node)
    network = NodeNetwork(agent_id=node.agent_id, subnet_index=node.subnet_index)
    runtime = Runtime(runc_root=runc_root(root, node), data_dir=ddir,
                      images=ImageStore(ddir / "images"), network=network)
    ids = sorted(set(await runtime.list()) | set(runc_containers(root, node)))
    for wid in ids:
        await runtime.delete(wid)
    await network.teardown()
    return ids


async def cleanup_nodes(root: Path, nodes: list[DevnetNode]) -> tuple[dict[str, list[str]],
                                                                        list[str]]:
    """:func:`cleanup_node` for each node; (removed containers per node, errors)."""
    removed: dict[str, list[str]] = {}
    errors: list[str] = []

    async def one(node: DevnetNode) -> None:
        try:
            removed[node.name] = await cleanup_node(root, node)
        except TfgridError as exc:
            errors.append(f"{node.name}: {exc}")

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(one, node)
    return removed, errors


def is_root() -> bool:
    return os.geteuid() == 0
