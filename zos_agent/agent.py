"""The node agent's trio driver: register, report uptime, follow the ledger, reconcile.

Tasks (one nursery, :meth:`Agent.run`):

- registration first: the node key is registered on its farm with the measured capacity
  (``node_register``), or its capacity/location updated (``node_update``) if they changed;
- ``_uptime_loop``: an ``uptime_report`` every ``uptime_interval_s`` (wall-clock ``time_ms``,
  the only wall-clock value the agent sends);
- ``_capacity_loop``: re-measures every ``capacity_interval_s``, ``node_update`` on change;
- ``_header_loop``: follows verified committed headers; each one wakes the reconciler;
- ``_reconcile_loop``: runtime.list() + proven contracts -> :func:`reconcile` -> actions,
  executed one by one, the memory file rewritten after each, so a kill -9 at any instant
  leaves a state the next start reconciles from (runtime operations are idempotent).
  A pass woken by a new block first reads the ledger only; if the node's contract views are
  what the last full pass saw, it stops there (most blocks carry other nodes' uptime reports).
  Full passes (runtime included) still run at least every ``reconcile_interval_s``, right
  after a pass that acted, and whenever :meth:`Agent.kick` is called.

Clocks: loop intervals and timeouts use trio's clock; the reconcile core gets wall-clock
milliseconds (``clock_ms``) because the backoff times it keeps in the memory file must stay
comparable across agent restarts; uptime reports carry wall-clock time as the ledger expects.

The agent holds no listening socket: its only inputs are the ledger (outbound connections
through the light client) and its data directory. Stopping it (SIGTERM, cancellation) leaves
every container running; the next start adopts them.
"""

from __future__ import annotations

import builtins
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any, Protocol, cast

import trio

from ledger import keyspace
from ledger.client import LedgerClient
from ledger.errors import (
    ConfigError,
    ConflictingHeaders,
    InvalidTx,
    LedgerUnavailable,
    NotFound,
    TfgridError,
)
from ledger.keys import KeyPair
from ledger.state import PARAM_DEFAULTS
from ledger.tx import Tx
from ledger.types import Genesis, Header
from zos_agent.capacity import Capacity, node_capacity
from zos_agent.config import AgentConfig
from zos_agent.errors import AgentError
from zos_agent.follower import Follower
from zos_agent.namespaces import ShardService, views_namespaces
from zos_agent.oci import ContainerSpec
from zos_agent.reconcile import (
    Adopt,
    ContractView,
    Create,
    Delete,
    Desired,
    Observed,
    Plan,
    ReconcileMemory,
    Report,
    Restart,
    Result,
    Update,
    parse_workload_id,
    reconcile,
)

log = logging.getLogger("zos_agent")

MEMORY_FILE = "agent-memory.json"
# A pending tx whose nonce the chain has not reached after this long was dropped somewhere:
# start again from the committed nonce.
NONCE_STUCK_S = 20.0
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# What a loop logs and survives: ledger trouble, refused txs, a failing host tool or disk.
# Only ConflictingHeaders (a forked validator set) stops the agent.
TRANSIENT = (TfgridError, OSError)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ContainerRuntime(Protocol):
    """What the agent needs of :class:`zos_agent.runtime.Runtime` (tests pass fakes)."""

    async def list(self) -> Mapping[str, Any]: ...

    async def create(self, spec: ContainerSpec,
                     image_sources: builtins.list[str]) -> builtins.list[str]: ...

    async def restart(self, workload_id: str) -> None: ...

    async def delete(self, workload_id: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# small persistent pieces


class MemoryFile:
    """The reconcile memory on disk: JSON, replaced atomically (temp + fsync + rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: bytes | None = None  # what this process last wrote there

    def load(self) -> ReconcileMemory:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return ReconcileMemory()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return ReconcileMemory.from_json(text)
        except ConfigError as exc:
            # Memory is an optimisation (backoff, endpoints, reports in flight): everything
            # in it can be re-derived from the runtime and the ledger.
            log.warning("%s: %s; starting with an empty memory", self.path, exc)
            return ReconcileMemory()

    def save(self, memory: ReconcileMemory) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        data = memory.to_json().encode()
        if data == self._saved:
            return  # unchanged since our last write: no rewrite (and no fsync) per pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._saved = data


class TxSender:
    """Signs and submits the node's transactions, keeping its nonces in sequence.

    Several txs may be pending at once (the mempool queues a sender's consecutive nonces);
    when the chain stops advancing towards our next nonce (a pending tx was dropped), the
    sender starts again from the committed nonce.
    """

    def __init__(self, client: LedgerClient, key: KeyPair, chain_id: str, fee: int) -> None:
        self._client = client
        self._key = key
        self._chain_id = chain_id
        self.fee = fee
        self._lock = trio.Lock()
        self._next: int | None = None
        self._committed = -1
        self._progress_at = 0.0

    async def _nonce(self) -> int:
        committed = await self._client.next_nonce(self._key.public_key)
        now = trio.current_time()
        if committed != self._committed:
            self._committed = committed
            self._progress_at = now
        if self._next is None or committed >= self._next:
            self._next = committed
        elif now - self._progress_at > NONCE_STUCK_S:
            log.info("pending txs %d..%d not committed for %.0fs; resending from %d",
                     committed, self._next - 1, now - self._progress_at, committed)
            self._next = committed
            self._progress_at = now
        return self._next

    async def submit(self, tx_type: str, body: dict[str, Any], *, wait: bool = False,
                     timeout_s: float = 30.0) -> bytes:
        """Submit one tx (and with ``wait``, wait until it is committed).

        Raises :class:`InvalidTx` if it is refused or fails in its block, and the ledger
        errors of :class:`LedgerClient`.
        """
        async with self._lock:
            for attempt in (1, 2):
                nonce = await self._nonce()
                tx = Tx(tx_type, self._key.public_key, nonce, self.fee, body).signed(
                    self._key, self._chain_id)
                try:
                    tx_hash = await self._client.submit(tx)
                except InvalidTx as exc:
                    if exc.code == "bad_nonce" and attempt == 1:
                        self._next = None
                        continue
                    raise
                self._next = nonce + 1
                break
        if wait:
            outcome = await self._client.wait_tx(tx_hash, timeout_s=timeout_s)
            if outcome.code != "ok":
                raise InvalidTx(outcome.code, outcome.message)
        return tx_hash


# ---------------------------------------------------------------------------------------------
# the agent


class Agent:
    """One node's agent. Build it complete, then ``await agent.run()``."""

    def __init__(self, cfg: AgentConfig, *, key: KeyPair, genesis: Genesis,
                 client: LedgerClient, follower: Follower, runtime: ContainerRuntime,
                 shards: ShardService | None = None,
                 clock_ms: Callable[[], int] = wall_ms) -> None:
        self.cfg = cfg
        self.key = key
        self.genesis = genesis
        self.client = client
        self.follower = follower
        self.runtime = runtime
        self.shards = shards  # storage namespaces (None: this node serves no storage)
        self.clock_ms = clock_ms
        self.memory_file = MemoryFile(cfg.data_dir / MEMORY_FILE)
        self.memory = self.memory_file.load()
        self.node_id: int | None = None
        self.registered_capacity: Capacity | None = None
        self.sender = TxSender(client, key, genesis.chain_id, PARAM_DEFAULTS["min_fee"])
        self._kick = trio.Event()
        self._full_wanted = True  # the next pass must observe the runtime too
        # What the last full pass read (``also`` set, views): a block-woken pass that reads
        # the same views has nothing new to act on.
        self._last_ledger: tuple[set[int], dict[int, ContractView]] | None = None
        self._last_observed: set[str] = set()
        self.passes = 0
        self.ledger_only_passes = 0

    # -- entry ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, then run every loop until cancelled; ``started(node_id)``.

        Until the node is registered, failures (ledger unreachable, unknown farm, no funds)
        are logged and retried with backoff. Raises :class:`ConflictingHeaders` if the
        validator set forked (nothing can be trusted then).
        """
        self.sender.fee = await self._retrying("read the fee", self._min_fee)
        node_id = await self._retrying("register the node", self.register)
        log.info("node %d (key %s) on farm %d", node_id, self.key.address, self.cfg.farm_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._uptime_loop)
            nursery.start_soon(self._capacity_loop)
            nursery.start_soon(self._header_loop)
            nursery.start_soon(self._reconcile_loop)
            if self.shards is not None:
                nursery.start_soon(self.shards.run)
            task_status.started(node_id)

    async def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        delay = RETRY_MIN_S
        while True:
            try:
                return await fn()
            except ConflictingHeaders:
                raise
            except TRANSIENT as exc:
                log.warning("cannot %s yet: %s", what, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _min_fee(self) -> int:
        params = await self.follower.entry(keyspace.params())
        fee = (params or {}).get("min_fee", PARAM_DEFAULTS["min_fee"])
        return int(fee) if isinstance(fee, int) else PARAM_DEFAULTS["min_fee"]

    def _capacity(self) -> Capacity:
        return node_capacity(self.cfg.data_dir, self.cfg.reserve_percent, self.cfg.capacity)

    def _location(self) -> dict[str, str]:
        return {"country": self.cfg.country, "city": self.cfg.city}

    async def register(self) -> int:
        """Register this node (or bring its capacity and location up to date); its id.

        Raises :class:`InvalidTx` (unknown farm, no funds for the fee...) and ledger errors.
        """
        cap = self._capacity()
        node_id = await self.follower.node_id()
        if node_id is None:
            if await self.follower.entry(keyspace.farm(self.cfg.farm_id)) is None:
                # Checked first so that a wrong farm id does not burn a fee per retry.
                raise NotFound(f"farm {self.cfg.farm_id} does not exist")
            log.info("registering on farm %d with %s", self.cfg.farm_id, cap)
            await self.sender.submit("node_register", {
                "farm_id": self.cfg.farm_id, "capacity": cap.to_map(),
                "location": self._location(), "endpoint": ""}, wait=True)
            node_id = await self.follower.node_id()
            if node_id is None:
                raise LedgerUnavailable("node_register committed but the node is not visible")
        else:
            node = await self.follower.entry(keyspace.node(node_id)) or {}
            if node.get("farm") != self.cfg.farm_id:
                log.warning("this node key is registered on farm %r, not %d; a node cannot "
                            "move farms", node.get("farm"), self.cfg.farm_id)
            update: dict[str, Any] = {}
            if node.get("capacity") != cap.to_map():
                update["capacity"] = cap.to_map()
            if node.get("location") != self._location():
                update["location"] = self._location()
            if update:
                await self._node_update(update)
        self.node_id = node_id
        self.registered_capacity = cap
        return node_id

    async def _node_update(self, update: dict[str, Any]) -> None:
        log.info("updating the node: %s", update)
        try:
            await self.sender.submit("node_update", update, wait=True)
        except InvalidTx as exc:
            if exc.code != "below_reserved":
                raise
            # Contracts reserve more than the machine now offers: keep serving them.
            log.warning("capacity not lowered: %s", exc.message)

    # -- loops ----------------------------------------------------------------------------

    async def _uptime_loop(self) -> None:
        while True:
            try:
                await self.sender.submit("uptime_report", {"time_ms": wall_ms()})
            except ConflictingHeaders:
                raise
            except TRANSIENT as exc:
                log.warning("uptime report not sent: %s", exc)
            await trio.sleep(self.cfg.uptime_interval_s)

    async def _capacity_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.capacity_interval_s)
            try:
                cap = self._capacity()
                if cap != self.registered_capacity:
                    await self._node_update({"capacity": cap.to_map()})
                    self.registered_capacity = cap
            except ConflictingHeaders:
                raise
            except TRANSIENT as exc:
                log.warning("capacity not updated: %s", exc)

    async def _header_loop(self) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                # headers() is an async generator; its annotation only says AsyncIterator.
                gen = cast(AsyncGenerator[Header, None], self.client.headers())
                async with aclosing(gen) as headers:
                    async for header in headers:
                        log.debug("block %d", header.height)
                        self._kick.set()  # a ledger check; a full pass only if views changed
                        delay = RETRY_MIN_S
            except ConflictingHeaders:
                log.critical("the ledger's validators forked: two certified blocks at one "
                             "height; stopping (containers keep running)")
                raise
            except TRANSIENT as exc:
                log.warning("following headers: %s", exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def kick(self) -> None:
        """Run a full reconcile pass (runtime and ledger) as soon as possible."""
        self._full_wanted = True
        self._kick.set()

    async def _reconcile_loop(self) -> None:
        full_at = trio.current_time()  # when the next full pass is due
        while True:
            with trio.move_on_at(full_at):
                await self._kick.wait()
            self._kick = trio.Event()
            now = trio.current_time()
            full = self._full_wanted or now >= full_at
            self._full_wanted = False
            try:
                plan = await self.reconcile_once(full=full)
            except ConflictingHeaders:
                raise
            except TRANSIENT as exc:
                log.warning("reconcile pass skipped: %s", exc)
                full_at = now + self.cfg.reconcile_interval_s
                continue
            if plan is None:
                continue  # a block changed nothing this node runs: the full pass stays due
            full_at = now + self.cfg.reconcile_interval_s
            if any(not isinstance(a, Report) for a in plan.actions):
                full_at = now  # look again right away: the runtime changed
            elif plan.wake_at_ms is not None:
                full_at = min(full_at,
                              now + max(0.0, (plan.wake_at_ms - self.clock_ms()) / 1000))

    def _also(self, observed: set[str]) -> set[int]:
        also = self.memory.contract_ids()
        also |= {p[0] for p in map(parse_workload_id, observed) if p is not None}
        if self.shards is not None:
            also |= self.shards.on_disk()
        return also

    async def reconcile_once(self, *, full: bool = True) -> Plan | None:
        """One pass: observe, read the ledger, decide, act. Returns the plan it executed.

        With ``full=False`` (a new block) the ledger is read first, and if this node's views
        are the ones the last full pass read, the pass ends there and returns None.
        """
        if self.node_id is None:
            raise AgentError("the node is not registered")
        started = trio.current_time()
        early: tuple[set[int], dict[int, ContractView]] | None = None
        if not full and self._last_ledger is not None:
            also = self._also(self._last_observed)
            views = await self.follower.views(self.node_id, also)
            if (also, views) == self._last_ledger:
                self.ledger_only_passes += 1
                return None
            early = (also, views)
        states = await self.runtime.list()
        observed = {wid: Observed(wid, s.status, s.spec_hash, s.exit_code)
                    for wid, s in states.items()}
        also = self._also(set(observed))
        if early is not None and early[0] == also:
            views = early[1]
        else:
            views = await self.follower.views(self.node_id, also)
        self._last_ledger = (also, views)
        self._last_observed = set(observed)
        ns_results = await self._namespaces(views)
        plan = reconcile(views, observed, self.memory, self.clock_ms(), ns_results)
        self._remember(plan.memory)
        for action in plan.actions:
            await self._execute(action)
        self.passes += 1
        log.debug("pass %d: %d contracts, %d containers, %d actions, %.0f ms", self.passes,
                  len(views), len(observed), len(plan.actions),
                  (trio.current_time() - started) * 1000)
        return plan

    async def _namespaces(self, views: Mapping[int, ContractView]
                          ) -> dict[tuple[int, str], Result]:
        """Serve the storage namespaces the views ask for (wiping cancelled ones before their
        "deleted" is reported); their results."""
        wants, keep, gone = views_namespaces(views)
        if self.shards is None:
            no = Result("error", "this node serves no storage (no shard_port configured)")
            return {(w.contract_id, w.name): no for w in wants}
        return await self.shards.apply(wants, keep=keep, gone=gone)

    def _remember(self, memory: ReconcileMemory) -> None:
        self.memory = memory
        self.memory_file.save(memory)

    async def _execute(self, action: Create | Update | Adopt | Restart | Delete | Report) -> None:
        now = self.clock_ms
        match action:
            case Create(d) | Update(d) | Adopt(d):
                await self._create(action, d)
            case Restart(d):
                log.info("restarting %s (restart %d in a row)", d.workload_id,
                         self.memory.workloads[d.workload_id].restarts
                         if d.workload_id in self.memory.workloads else 0)
                try:
                    await self.runtime.restart(d.workload_id)
                except (AgentError, OSError) as exc:
                    log.warning("restart of %s failed: %s", d.workload_id, exc)
                    self._remember(self.memory.failed(d, f"restart failed: {exc}", now()))
                else:
                    self._remember(self.memory.restarted(d.workload_id))
            case Delete(wid):
                log.info("deleting %s", wid)
                try:
                    await self.runtime.delete(wid)
                except (AgentError, OSError) as exc:
                    log.warning("delete of %s failed (retried next pass): %s", wid, exc)
                else:
                    self._remember(self.memory.deleted(wid))
            case Report():
                states = ", ".join(f"{n}={r.state}" for n, r in action.results)
                log.info("reporting contract %d v%d: %s", action.contract_id, action.version,
                         states)
                try:
                    await self.sender.submit("contract_result", action.body())
                except ConflictingHeaders:
                    raise
                except TRANSIENT as exc:
                    log.warning("report for contract %d not sent: %s", action.contract_id, exc)

    async def _create(self, action: Create | Update | Adopt, d: Desired) -> None:
        verb = type(action).__name__.lower()
        log.info("%s %s", verb, d.workload_id)
        try:
            # For an Update the runtime replaces the container (runc cannot change one in
            # place); for an Adopt it returns the running container's endpoints untouched.
            endpoints = await self.runtime.create(d.spec, list(d.image_sources))
        except (AgentError, OSError) as exc:
            log.warning("%s of %s failed: %s", verb, d.workload_id, exc)
            self._remember(self.memory.failed(d, str(exc), self.clock_ms()))
        else:
            self._remember(self.memory.created(d, endpoints, self.clock_ms()))

