"""Storage namespace workloads: what the agent does for them.

A namespace workload (``{"name", "kind": "namespace", "cpu": 0, "memory": 0, "disk": quota}``)
is served by the node's shard store (:mod:`zos_agent.shardstore`), which the agent runs as a
child process only while the node has at least one namespace, so that the agent process itself
never holds a listening socket. :class:`ShardService` is that supervisor:

- :meth:`ShardService.run` (a task in the agent's nursery) starts ``python -m
  zos_agent.shardstore`` when the first namespace appears, restarts it with backoff if it
  dies, stops it (SIGTERM) when the last namespace goes or the agent stops. The child is
  told the agent's pid and exits if the agent dies (even by kill -9), so a restarted agent
  finds its port free.
- :meth:`ShardService.apply` (called once per reconcile pass, before results are reported)
  rewrites the namespaces file atomically when the wanted set changed (the child re-reads it
  at once on SIGHUP), wipes the directories of cancelled namespaces, and returns each
  namespace workload's result: ``ok`` with the endpoint ``host:port`` once the store listens,
  or ``error`` with why it does not.

The shard protocol names a namespace by its contract id. A contract with several namespace
workloads gets one namespace whose quota is the sum of theirs; every one of them reports the
same endpoint.

Files: ``<data_dir>/shards/namespaces.json`` and the store's data under ``<data_dir>/shards``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from ledger.config import format_hostport
from ledger.errors import ConfigError
from zos_agent import shardstore
from zos_agent.errors import InvalidSpec
from zos_agent.reconcile import ContractView, Result
from zos_agent.shardwire import MAX_NONCE, NamespaceInfo

log = logging.getLogger("zos_agent.namespaces")

START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0
RESTART_MIN_S: Final = 0.5
RESTART_MAX_S: Final = 30.0
# Contract states in which a namespace's shards are deleted for good.
GONE_STATES: Final = ("cancelled", "missing")


@dataclass(frozen=True, slots=True)
class NamespaceWant:
    """A namespace workload of a verified, live contract."""

    contract_id: int
    name: str
    owner_key: bytes
    quota: int


def namespace_workload(contract_id: int, workload: Mapping[str, Any],
                       owner_key: bytes) -> NamespaceWant:
    """The namespace a ``kind: namespace`` workload asks for.

    Raises :class:`InvalidSpec` if its name or quota (``disk``, bytes) is unusable or it
    asks for cpu or memory (a namespace is disk only).
    """
    name, disk = workload.get("name"), workload.get("disk")
    if not isinstance(name, str) or not name:
        raise InvalidSpec("a namespace workload needs a name")
    if not isinstance(disk, int) or isinstance(disk, bool) or not 0 < disk <= MAX_NONCE:
        raise InvalidSpec(f"namespace {name!r}: disk (the quota in bytes) must be a positive "
                          "integer")
    for other in ("cpu", "memory"):
        if workload.get(other, 0) != 0:
            raise InvalidSpec(f"namespace {name!r}: {other} must be 0")
    if len(owner_key) != 32:
        raise InvalidSpec("contract owner key is not an ed25519 key")
    return NamespaceWant(contract_id, name, owner_key, disk)


def namespace_table(wants: Iterable[NamespaceWant]) -> dict[int, NamespaceInfo]:
    """One entry per contract (quotas of its namespace workloads added up)."""
    table: dict[int, NamespaceInfo] = {}
    for want in wants:
        old = table.get(want.contract_id)
        quota = want.quota + (old.quota if old is not None else 0)
        table[want.contract_id] = NamespaceInfo(want.owner_key, quota)
    return table


class ShardService:
    """Supervises the shard-store child process for the agent (module docstring)."""

    def __init__(self, data_dir: Path, *, chain_id: str, host: str, port: int,
                 python: str = sys.executable, log_level: str = "INFO",
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if not 0 < port < 65536:
            raise ConfigError(f"shard store port {port} must be 1..65535 (a stable endpoint)")
        self.store_dir = data_dir / "shards"
        self.namespaces_file = self.store_dir / "namespaces.json"
        self.chain_id = chain_id
        self.host = host
        self.port = port
        self.python = python
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.endpoint = format_hostport((host, port))
        self.table: dict[int, NamespaceInfo] = {}
        # idle (no child) -> starting -> ready -> stopping (no namespace left) -> idle
        #                             starting/ready -> exited (it died) -> backoff -> starting
        self.phase = "idle"
        self.error = ""  # why the last child is not serving
        self.starts = 0
        self._proc: trio.Process | None = None
        self._child_error = ""
        self._changed = trio.Event()  # the table changed
        self._phase_changed = trio.Event()

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self._phase_changed.set()
        self._phase_changed = trio.Event()

    # -- what the reconcile pass calls --------------------------------------------------------

    def on_disk(self) -> set[int]:
        """Contracts that still have a namespace directory here (the follower must keep
        reading them so that a cancelled one is wiped and reported deleted)."""
        return shardstore.namespaces_on_disk(self.store_dir)

    async def apply(self, wants: Iterable[NamespaceWant], *, keep: Iterable[int] = (),
                    gone: Iterable[int] = ()) -> dict[tuple[int, str], Result]:
        """Make the store serve exactly ``wants`` (plus, unchanged, the namespaces of the
        contracts in ``keep``: those the ledger could not be read for right now), wipe the
        namespaces of the contracts in ``gone`` (cancelled or no longer existing), and return
        the result of every wanted namespace workload, keyed by (contract id, name).

        Waits (up to the start timeout) for a store that is being started. Never raises for
        a store that cannot run: that is the workloads' ``error`` result.
        """
        wants = list(wants)
        table = namespace_table(wants)
        for cid in keep:
            if cid not in table and cid in self.table:
                table[cid] = self.table[cid]
        if table != self.table:
            await trio.to_thread.run_sync(self._write_table, table)
            log.info("namespaces: %s", sorted(table) or "none")
            self.table = table
            if self._proc is not None and self._proc.returncode is None:
                self._proc.send_signal(signal.SIGHUP)
            self._changed.set()
        for cid in sorted(set(gone) - set(table)):
            if await trio.to_thread.run_sync(shardstore.wipe_namespace, self.store_dir, cid):
                log.info("wiped namespace %d (contract gone)", cid)
        if table:
            # A store being started (or stopped and started again) is worth waiting for; one
            # in its crash backoff is reported failing at once rather than holding up the pass.
            with trio.move_on_after(self.start_timeout_s):
                while self.phase not in ("ready", "backoff"):
                    await self._phase_changed.wait()
        if self.ready:
            ok = Result("ok", "", self.endpoint)
            return {(w.contract_id, w.name): ok for w in wants}
        reason = f"shard store not serving: {self.error or 'starting'}"
        return {(w.contract_id, w.name): Result("error", reason) for w in wants}

    def _write_table(self, table: Mapping[int, NamespaceInfo]) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        shardstore.write_namespaces_file(self.namespaces_file, table)

    # -- the supervisor task -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Keep the child running while there are namespaces; until cancelled (which stops
        the child)."""
        task_status.started()
        delay = RESTART_MIN_S
        try:
            while True:
                if not self.table:
                    self._set_phase("idle")
                    self._changed = trio.Event()
                    await self._changed.wait()
                    continue
                self._set_phase("starting")
                started = trio.current_time()
                await self._run_child()
                if self.phase == "stopping":
                    continue  # stopped on purpose
                if trio.current_time() - started > RESTART_MAX_S:
                    delay = RESTART_MIN_S  # it had been up a while: not a crash loop
                log.warning("shard store stopped (%s); restarting in %.1fs", self.error, delay)
                self._set_phase("backoff")
                await trio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_S)
        finally:
            self._set_phase("idle")

    async def _run_child(self) -> None:
        """Start the child; return when it exits, or once stopped when the namespaces are
        gone (phase ``stopping``)."""
        self._child_error = ""
        self.starts += 1
        argv = [self.python, "-m", "zos_agent.shardstore", "--data-dir", str(self.store_dir),
                "--listen", self.endpoint, "--namespaces-file", str(self.namespaces_file),
                "--chain-id", self.chain_id, "--log-level", self.log_level,
                "--parent-pid", str(os.getpid())]
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            self.error = f"cannot start: {exc.strerror or exc}"
            self._set_phase("exited")
            return
        self._proc = proc
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stderr, proc)
                nursery.start_soon(self._read_stdout, proc)
                nursery.start_soon(self._stop_when_unwanted, proc, nursery.cancel_scope)
                nursery.start_soon(self._start_watchdog, proc)
                rc = await proc.wait()
                if self.phase != "stopping":
                    self.error = self._child_error or f"exited with code {rc}"
                    self._set_phase("exited")
                nursery.cancel_scope.cancel()
        finally:
            self._proc = None
            with trio.CancelScope(shield=True):
                await self._stop(proc)

    async def _start_watchdog(self, proc: trio.Process) -> None:
        with trio.move_on_after(self.start_timeout_s):
            while self.phase == "starting":
                await self._phase_changed.wait()
        if self.phase == "starting":
            self._child_error = f"did not listen within {self.start_timeout_s:.0f}s"
            proc.kill()

    async def _stop_when_unwanted(self, proc: trio.Process, scope: trio.CancelScope) -> None:
        while self.table:
            self._changed = trio.Event()
            await self._changed.wait()
        log.info("no namespaces left: stopping the shard store")
        self._set_phase("stopping")
        await self._stop(proc)
        scope.cancel()

    async def _read_stdout(self, proc: trio.Process) -> None:
        if proc.stdout is None:
            return
        buf = b""
        async with proc.stdout:
            while True:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"listening ") and self.phase == "starting":
                        log.info("shard store %s (pid %d)", line.decode(errors="replace"),
                                 proc.pid)
                        self.error = ""
                        self._set_phase("ready")
                buf = buf[-4096:]

    async def _read_stderr(self, proc: trio.Process) -> None:
        if proc.stderr is None:
            return
        buf = b""
        async with proc.stderr:
            while True:
                chunk = await proc.stderr.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode(errors="replace").strip()
                    if line:
                        log.info("%s", line)
                        if line.startswith("shardstore: "):  # its one-line fatal error
                            self._child_error = line.removeprefix("shardstore: ")[:200]
                buf = buf[-4096:]

    @staticmethod
    async def _stop(proc: trio.Process) -> None:
        if proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT_S):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def views_namespaces(views: Mapping[int, ContractView]
                     ) -> tuple[list[NamespaceWant], set[int], set[int]]:
    """``(wants, keep, gone)`` for :meth:`ShardService.apply` from the follower's contract
    views: the namespaces of live contracts, the held contracts (unreadable right now: keep
    serving what they had), the cancelled or vanished ones (wipe).
    """
    wants = [n for v in views.values() if v.live and not v.hold for n in v.namespaces]
    keep = {cid for cid, v in views.items() if v.hold}
    gone = {cid for cid, v in views.items() if v.state in GONE_STATES and not v.hold}
    return wants, keep, gone
