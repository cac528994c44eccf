"""Host networking for containers: a bridge per agent, a network namespace per container,
outbound NAT and published ports through kernel DNAT rules (iptables; nothing listens).

Everything created is named after the agent id, so agents sharing a machine never touch each
other's objects:

- bridge ``tfb<agent>`` holding ``<base>.<subnet index>.1/24``;
- per container: network namespace ``tf-<agent>-<workload>`` (``/run/netns/...``), a veth pair
  (host side ``tv<hash>`` on the bridge, ``eth0`` inside) with the next free address;
- iptables chains ``TF-<agent>-PRE`` (nat; jumped to from PREROUTING and OUTPUT: one DNAT rule
  per published port, commented ``tf <workload> <port>``), ``TF-<agent>-POST`` (nat: masquerade
  the subnet going out, and loopback-sourced traffic going in so that a DNAT from 127.0.0.1
  gets replies) and ``TF-<agent>-FWD`` (filter: accept to/from the bridge).

State is recovered from the kernel (netns list, chain contents), never kept only in memory, so
a restarted agent finds its containers' addresses and ports again.

Published host ports are picked in ``PORT_RANGE`` (below the usual ephemeral range), starting
at a hash of (agent, workload, port) and skipping ports any agent already DNATs or any socket
listens on. Host sysctls shared by all agents (``net.ipv4.ip_forward`` and, for a loopback
host address, ``net.ipv4.conf.lo.route_localnet``) are switched on by :meth:`setup` and left
on by :meth:`teardown`, since other agents may still need them.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from pathlib import Path

import trio

from ledger.codec import hash_bytes
from zos_agent import cmd
from zos_agent.errors import NetworkError

PORT_RANGE = (20000, 30000)
NETNS_DIR = Path("/run/netns")
_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")


async def _run(*argv: str, check: bool = True) -> bytes:
    proc = await cmd.run(argv, error=NetworkError, check=check)
    return proc.stdout if proc.returncode == 0 else b""


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


# sysfs/procfs lookups are in-memory and instant; they stay on the trio thread.
def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _netns_with_prefix(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


class NodeNetwork:
    """One agent's container network. Methods raise :class:`NetworkError`."""

    def __init__(
        self,
        *,
        agent_id: str,
        subnet_index: int,
        host_address: str = "127.0.0.1",
        subnet_base: str = "10.213",
        iptables: str = "iptables",
    ) -> None:
        if not _AGENT_ID.match(agent_id):
            raise NetworkError(f"agent id {agent_id!r} must match {_AGENT_ID.pattern}")
        if not 0 <= subnet_index <= 255:
            raise NetworkError(f"subnet index {subnet_index} is not in 0..255")
        self.agent_id = agent_id
        self.subnet_index = subnet_index
        self.host_address = str(ipaddress.IPv4Address(host_address))
        self.subnet = ipaddress.IPv4Network(f"{subnet_base}.{subnet_index}.0/24")
        self.gateway = self.subnet.network_address + 1
        self.bridge = f"tfb{agent_id}"
        self.chain_pre = f"TF-{agent_id}-PRE"
        self.chain_post = f"TF-{agent_id}-POST"
        self.chain_fwd = f"TF-{agent_id}-FWD"
        self.iptables = iptables
        self._lock = trio.Lock()

    # --- names -----------------------------------------------------------------------------

    def netns_name(self, workload_id: str) -> str:
        return f"tf-{self.agent_id}-{workload_id}"

    def netns_path(self, workload_id: str) -> Path:
        return NETNS_DIR / self.netns_name(workload_id)

    def veth_name(self, workload_id: str) -> str:
        return "tv" + hash_bytes(f"{self.agent_id}/{workload_id}".encode()).hex()[:12]

    def _jumps(self) -> list[tuple[str, str, list[str]]]:
        """(table, built-in chain, rule spec) of every jump into our chains."""
        return [
            ("nat", "PREROUTING", ["-j", self.chain_pre]),
            ("nat", "OUTPUT", ["-j", self.chain_pre]),
            ("nat", "POSTROUTING", ["-j", self.chain_post]),
            ("filter", "FORWARD", ["-j", self.chain_fwd]),
        ]

    async def _ipt(self, table: str, *args: str, check: bool = True) -> bytes:
        return await _run(self.iptables, "-w", "5", "-t", table, *args, check=check)

    async def _chain_rules(self, table: str, chain: str) -> list[list[str]]:
        """The rules of ``chain`` as ``iptables -S`` argument lists (without the chain name)."""
        out = await self._ipt(table, "-S", chain, check=False)
        rules = []
        for line in out.decode().splitlines():
            tokens = shlex.split(line)
            if len(tokens) > 2 and tokens[0] == "-A" and tokens[1] == chain:
                rules.append(tokens[2:])
        return rules

    # --- node-wide -------------------------------------------------------------------------

    async def setup(self) -> None:
        """Create the bridge, chains, jumps and NAT rules (idempotent)."""
        async with self._lock:
            if not _link_exists(self.bridge):
                await _run("ip", "link", "add", self.bridge, "type", "bridge")
            addr = f"{self.gateway}/{self.subnet.prefixlen}"
            shown = await _run("ip", "-4", "-o", "addr", "show", "dev", self.bridge)
            if f" {addr} " not in shown.decode():
                await _run("ip", "addr", "add", addr, "dev", self.bridge)
            await _run("ip", "link", "set", self.bridge, "up")
            self._sysctl("net.ipv4.ip_forward", "1")
            if ipaddress.IPv4Address(self.host_address).is_loopback:
                self._sysctl("net.ipv4.conf.lo.route_localnet", "1")
                self._sysctl(f"net.ipv4.conf.{self.bridge}.route_localnet", "1")
            for table, chain in (("nat", self.chain_pre), ("nat", self.chain_post),
                                 ("filter", self.chain_fwd)):
                await self._ipt(table, "-N", chain, check=False)
            await self._ensure_rules("nat", self.chain_post, [
                ["-s", str(self.subnet), "!", "-o", self.bridge, "-j", "MASQUERADE"],
                ["-s", "127.0.0.0/8", "-o", self.bridge, "-j", "MASQUERADE"],
            ])
            await self._ensure_rules("filter", self.chain_fwd, [
                ["-i", self.bridge, "-j", "ACCEPT"],
                ["-o", self.bridge, "-j", "ACCEPT"],
            ])
            for table, chain, spec in self._jumps():
                if not await self._has_rule(table, chain, spec):
                    await self._ipt(table, "-I", chain, "1", *spec)

    async def _has_rule(self, table: str, chain: str, spec: list[str]) -> bool:
        proc = await cmd.run([self.iptables, "-w", "5", "-t", table, "-C", chain, *spec],
                             error=NetworkError, check=False)
        return proc.returncode == 0

    async def _ensure_rules(self, table: str, chain: str, specs: list[list[str]]) -> None:
        for spec in specs:
            if not await self._has_rule(table, chain, spec):
                await self._ipt(table, "-A", chain, *spec)

    def _sysctl(self, name: str, value: str) -> None:
        path = _sysctl_path(name)
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError as exc:
            raise NetworkError(f"cannot set {name}={value}: {exc}") from exc

    async def teardown(self) -> None:
        """Remove every namespace, veth, rule, chain and the bridge this agent created.
        Idempotent; containers still attached lose their network."""
        for name in await self._our_netns():
            await self.detach(name[len(self.netns_name("")):])
        async with self._lock:
            for table, chain, spec in self._jumps():
                while await self._has_rule(table, chain, spec):
                    await self._ipt(table, "-D", chain, *spec)
            for table, chain in (("nat", self.chain_pre), ("nat", self.chain_post),
                                 ("filter", self.chain_fwd)):
                await self._ipt(table, "-F", chain, check=False)
                await self._ipt(table, "-X", chain, check=False)
            if _link_exists(self.bridge):
                await _run("ip", "link", "del", self.bridge)

    # --- per container ---------------------------------------------------------------------

    async def _our_netns(self) -> list[str]:
        return _netns_with_prefix(self.netns_name(""))

    async def _netns_address(self, name: str) -> ipaddress.IPv4Address | None:
        out = await _run("ip", "-n", name, "-4", "-o", "addr", "show", "dev", "eth0", check=False)
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out.decode())
        return ipaddress.IPv4Address(m.group(1)) if m else None

    async def _free_address(self) -> ipaddress.IPv4Address:
        used = {self.gateway}
        for name in await self._our_netns():
            addr = await self._netns_address(name)
            if addr is not None:
                used.add(addr)
        for host in self.subnet.hosts():
            if host not in used:
                return host
        raise NetworkError(f"no free address left in {self.subnet}")

    async def _published(self) -> dict[str, dict[int, int]]:
        """workload id -> {container port: host port}, from our DNAT rules."""
        out: dict[str, dict[int, int]] = {}
        for rule in await self._chain_rules("nat", self.chain_pre):
            comment = rule[rule.index("--comment") + 1] if "--comment" in rule else ""
            parts = comment.split()
            if len(parts) == 3 and parts[0] == "tf" and "--dport" in rule:
                host_port = int(rule[rule.index("--dport") + 1])
                out.setdefault(parts[1], {})[int(parts[2])] = host_port
        return out

    async def _ports_in_use(self) -> set[int]:
        """Host ports DNATed by any agent on this machine, or listened on by anything."""
        out = await self._ipt("nat", "-S", check=False)
        used = {int(m) for m in re.findall(r"--dport (\d+)", out.decode())}
        return used | _listening_ports()

    def _pick_port(self, workload_id: str, port: int, used: set[int]) -> int:
        lo, hi = PORT_RANGE
        seed = hash_bytes(f"{self.agent_id}/{workload_id}/{port}".encode())
        start = int.from_bytes(seed[:4], "big") % (hi - lo)
        for i in range(hi - lo):
            candidate = lo + (start + i) % (hi - lo)
            if candidate not in used:
                return candidate
        raise NetworkError("no free host port to publish on")

    async def attach(self, workload_id: str, ports: list[int]) -> tuple[Path, list[str]]:
        """Give ``workload_id`` a namespace on the bridge and publish ``ports`` (TCP).

        Idempotent: an existing namespace keeps its address and already published ports keep
        their host port. Returns the namespace path and the endpoints ("host:port", in the
        order of ``ports``). Raises :class:`NetworkError`; on failure nothing is left behind.
        """
        async with self._lock:
            try:
                return await self._attach(workload_id, ports)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._detach(workload_id)
                raise

    async def _attach(self, workload_id: str, ports: list[int]) -> tuple[Path, list[str]]:
        ns = self.netns_name(workload_id)
        veth = self.veth_name(workload_id)
        addr = await self._netns_address(ns) if self.netns_path(workload_id).exists() else None
        if addr is None:
            await self._detach(workload_id)  # a half-made namespace from a crash
            addr = await self._free_address()
            await _run("ip", "netns", "add", ns)
            await _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                       "netns", ns)
            await _run("ip", "link", "set", veth, "master", self.bridge, "up")
            await _run("ip", "-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}",
                       "dev", "eth0")
            await _run("ip", "-n", ns, "link", "set", "eth0", "up")
            await _run("ip", "-n", ns, "link", "set", "lo", "up")
            await _run("ip", "-n", ns, "route", "add", "default", "via", str(self.gateway))
        published = (await self._published()).get(workload_id, {})
        if set(published) != set(ports):
            await self._unpublish(workload_id)
            published = {}
            used = await self._ports_in_use()
            for port in ports:
                host_port = self._pick_port(workload_id, port, used)
                used.add(host_port)
                await self._ipt(
                    "nat", "-A", self.chain_pre, "-d", f"{self.host_address}/32", "-p", "tcp",
                    "--dport", str(host_port), "-m", "comment", "--comment",
                    f"tf {workload_id} {port}", "-j", "DNAT", "--to-destination", f"{addr}:{port}",
                )
                published[port] = host_port
        return self.netns_path(workload_id), [
            f"{self.host_address}:{published[p]}" for p in ports
        ]

    async def _unpublish(self, workload_id: str) -> None:
        for rule in await self._chain_rules("nat", self.chain_pre):
            if "--comment" in rule:
                parts = rule[rule.index("--comment") + 1].split()
                if len(parts) == 3 and parts[0] == "tf" and parts[1] == workload_id:
                    await self._ipt("nat", "-D", self.chain_pre, *rule, check=False)

    async def detach(self, workload_id: str) -> None:
        """Remove the namespace, veth and published ports of ``workload_id``. Idempotent."""
        async with self._lock:
            await self._detach(workload_id)

    async def _detach(self, workload_id: str) -> None:
        await self._unpublish(workload_id)
        veth = self.veth_name(workload_id)
        if _link_exists(veth):
            await _run("ip", "link", "del", veth)
        if self.netns_path(workload_id).exists():
            await _run("ip", "netns", "del", self.netns_name(workload_id))
