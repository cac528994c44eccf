"""The container runtime: runc driven from trio, one OCI bundle per workload.

Layout under ``data_dir``::

    bundles/<id>/config.json   the OCI config (0600: it holds the unsealed secret env)
    bundles/<id>/meta.json     spec hash, ports, disk, endpoints (what restart() and list() need)
    bundles/<id>/shim.json     pid + start time of the container's shim
    bundles/<id>/exit.json     exit code of the last run, written by the shim
    volumes/<id>.img, <id>/    the /data volume (see :mod:`zos_agent.volumes`)
    logs/<id>.log, .log.1      container stdout+stderr, capped (see :mod:`zos_agent.shim`)

State lives in runc (``--root``, one per agent so agents sharing a machine never see each
other's containers) and on disk, never only in the agent's memory: after an agent restart
:meth:`Runtime.list` recovers every container with its spec hash (a config.json annotation),
so the agent adopts running containers instead of creating duplicates.

Each container is started through a shim (:mod:`zos_agent.shim`) that outlives the agent,
holds the container's stdio pipe (capped log) and records its exit code. No tty, no console
socket: nothing in the agent's process tree listens.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ledger.codec import hash_bytes
from zos_agent import cmd
from zos_agent.errors import InvalidSpec, RuntimeFailure
from zos_agent.images import ImageStore
from zos_agent.network import NodeNetwork
from zos_agent.oci import SPEC_HASH_ANNOTATION, ContainerSpec, build_config
from zos_agent.volumes import VolumeManager

DEFAULT_LOG_LIMIT = 1024 * 1024
SHIM = Path(__file__).with_name("shim.py")
SHIM_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
_POLL = 0.02
_META_VERSION = 1
_RUNNING = {"running", "created", "pausing", "paused"}


@dataclass(frozen=True)
class ContainerState:
    """What the runtime observes of one container.

    ``status`` is "running", "created" or "stopped" (a bundle with no runc container, e.g.
    after a reboot, is "stopped"); ``exit_code`` is the last run's exit status (128+N when
    killed by signal N) or None when unknown; ``endpoints`` are the published "host:port".
    """

    workload_id: str
    status: str
    pid: int
    spec_hash: str
    exit_code: int | None
    endpoints: tuple[str, ...] = field(default=())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _process_alive(pid: int, starttime: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0] != b"Z" and int(fields[19]) == starttime


def _host_nameservers() -> list[str]:
    """Nameservers from the host's resolv.conf that a container can reach (not loopback)."""
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            if not (parts[1].startswith("127.") or parts[1] == "::1"):
                out.append(parts[1])
    return out[:3]


def _hostname(workload_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", workload_id)[:63].strip("-") or "container"


class Runtime:
    """Creates, lists, restarts and deletes containers with runc. Safe to re-create after a
    crash: every method re-derives what exists from runc and the disk.

    Methods raise :class:`RuntimeFailure` (or its subclasses :class:`ImageError`,
    :class:`NetworkError`) when the host cannot do what is asked.
    """

    def __init__(
        self,
        *,
        runc_root: Path,
        data_dir: Path,
        images: ImageStore,
        network: NodeNetwork | None,
        log_limit: int = DEFAULT_LOG_LIMIT,
        runc: str = "runc",
        cgroup_parent: str | None = None,
    ) -> None:
        self.runc_root = runc_root.absolute()
        self.data_dir = data_dir.absolute()
        self.images = images
        self.network = network
        self.log_limit = log_limit
        self.runc = runc
        # Distinct per runc root, so two agents on one machine never share a cgroup.
        self.cgroup_parent = cgroup_parent or (
            "tfgrid-" + hash_bytes(str(self.runc_root).encode()).hex()[:12]
        )
        self.volumes = VolumeManager(self.data_dir / "volumes")
        self._bundles = self.data_dir / "bundles"
        self._logs = self.data_dir / "logs"
        self._locks: dict[str, trio.Lock] = {}

    # --- paths -----------------------------------------------------------------------------

    def bundle_dir(self, workload_id: str) -> Path:
        return self._bundles / workload_id

    def log_path(self, workload_id: str) -> Path:
        return self._logs / f"{workload_id}.log"

    def cgroups_path(self, workload_id: str) -> str:
        return f"/{self.cgroup_parent}/{workload_id}"

    def _lock(self, workload_id: str) -> trio.Lock:
        return self._locks.setdefault(workload_id, trio.Lock())

    # --- runc ------------------------------------------------------------------------------

    async def _runc(self, *args: str, check: bool = True) -> Any:
        proc = await cmd.run([self.runc, "--root", str(self.runc_root), *args], check=check)
        return proc

    async def _runc_state(self, workload_id: str) -> dict[str, Any] | None:
        proc = await self._runc("state", workload_id, check=False)
        if proc.returncode != 0:
            if b"does not exist" in proc.stderr:
                return None
            raise RuntimeFailure(cmd.describe_failure(["runc", "state", workload_id], proc))
        try:
            state = json.loads(proc.stdout)
        except ValueError as exc:
            raise RuntimeFailure(f"runc state {workload_id}: unparsable output") from exc
        return state if isinstance(state, dict) else None

    def _runc_knows_none(self) -> bool:
        """Whether runc's root holds no container (runc keeps one directory per container
        there): then ``runc list`` need not run. Full reconcile passes list every few
        seconds, and a node with only storage namespaces has no container at all."""
        try:
            return not any(p.is_dir() for p in self.runc_root.iterdir())
        except FileNotFoundError:
            return True

    async def _runc_list(self) -> list[dict[str, Any]]:
        if self._runc_knows_none():
            return []
        proc = await self._runc("list", "--format", "json")
        try:
            items = json.loads(proc.stdout or b"null")
        except ValueError as exc:
            raise RuntimeFailure("runc list: unparsable output") from exc
        return [i for i in items or [] if isinstance(i, dict) and isinstance(i.get("id"), str)]

    # --- observation -----------------------------------------------------------------------

    def _exit_code(self, workload_id: str) -> int | None:
        data = _read_json(self.bundle_dir(workload_id) / "exit.json")
        code = data.get("exit_code") if isinstance(data, dict) else None
        return code if isinstance(code, int) else None

    def _shim_alive(self, workload_id: str) -> bool:
        data = _read_json(self.bundle_dir(workload_id) / "shim.json")
        if not isinstance(data, dict):
            return False
        pid, start = data.get("pid"), data.get("starttime")
        return isinstance(pid, int) and isinstance(start, int) and _process_alive(pid, start)

    def _meta(self, workload_id: str) -> dict[str, Any]:
        data = _read_json(self.bundle_dir(workload_id) / "meta.json")
        return data if isinstance(data, dict) else {}

    def _observe(self, workload_id: str, runc_state: dict[str, Any] | None) -> ContainerState:
        meta = self._meta(workload_id)
        endpoints = tuple(str(e) for e in meta.get("endpoints", []))
        if runc_state is not None:
            status = str(runc_state.get("status", "stopped"))
            annotations = runc_state.get("annotations") or {}
            spec_hash = str(annotations.get(SPEC_HASH_ANNOTATION) or meta.get("spec_hash", ""))
            pid = int(runc_state.get("pid") or 0)
        else:
            status, spec_hash, pid = "stopped", str(meta.get("spec_hash", "")), 0
        if status in _RUNNING:
            return ContainerState(workload_id, "created" if status == "created" else "running",
                                  pid, spec_hash, None, endpoints)
        exit_code = self._exit_code(workload_id)
        if exit_code is None and runc_state is not None and self._shim_alive(workload_id):
            # Init has died but the shim is still draining output before it records the exit
            # code: report it as still running for these few milliseconds.
            return ContainerState(workload_id, "running", 0, spec_hash, None, endpoints)
        return ContainerState(workload_id, "stopped", 0, spec_hash, exit_code, endpoints)

    async def list(self) -> dict[str, ContainerState]:
        """Every container this runtime owns: those runc knows plus bundles on disk.

        Containers that a concurrent create/restart/delete is working on are left out: their
        half-made state (a bundle not yet started) must not look like a crashed container.
        """
        states = {s["id"]: s for s in await self._runc_list()}
        ids = set(states)
        try:
            ids |= {p.name for p in self._bundles.iterdir() if p.is_dir()}
        except FileNotFoundError:
            pass
        busy = {i for i, lock in self._locks.items() if lock.locked()}
        return {i: self._observe(i, states.get(i)) for i in sorted(ids - busy)}

    async def state(self, workload_id: str) -> ContainerState | None:
        """One container's state, or None if neither runc nor the disk knows it."""
        runc_state = await self._runc_state(workload_id)
        if runc_state is None and not self.bundle_dir(workload_id).is_dir():
            return None
        return self._observe(workload_id, runc_state)

    async def logs(self, workload_id: str) -> bytes:
        """The tail (at most ``log_limit`` bytes) of the container's stdout and stderr."""
        path = self.log_path(workload_id)
        data = b""
        for p in (path.with_name(path.name + ".1"), path):
            try:
                data += p.read_bytes()
            except FileNotFoundError:
                pass
        return data[-self.log_limit :]

    # --- lifecycle -------------------------------------------------------------------------

    async def create(
        self, spec: ContainerSpec, image_sources: builtins.list[str]
    ) -> builtins.list[str]:
        """Make ``spec`` run; return its published endpoints ("host:port").

        Idempotent: if a container with this id and spec hash exists (in any state) it is left
        alone. One with another spec hash is replaced (its volume kept if ``disk`` is
        unchanged). If creation fails, whatever this call set up is removed again (keeping
        an existing volume). Raises :class:`RuntimeFailure`, :class:`ImageError`,
        :class:`NetworkError`, :class:`InvalidSpec`.
        """
        wid = spec.workload_id
        async with self._lock(wid):
            spec_hash = spec.spec_hash()
            current = await self._runc_state(wid)
            meta = self._meta(wid)
            if current is not None and meta.get("spec_hash") == spec_hash:
                return [str(e) for e in meta.get("endpoints", [])]
            keep_volume = meta.get("disk") == spec.disk
            had_volume = self.volumes.image_path(wid).exists()
            if current is not None or self.bundle_dir(wid).exists():
                await self._stop_and_remove(wid, keep_volume=keep_volume)
            if spec.ports and self.network is None:
                raise InvalidSpec(f"{wid}: ports need a node network")
            try:
                rootfs = await self.images.ensure(spec.image, image_sources)
                endpoints = await self._start(spec, rootfs)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._stop_and_remove(wid, keep_volume=keep_volume and had_volume)
                raise
            return endpoints

    async def _start(self, spec: ContainerSpec, rootfs: Path) -> builtins.list[str]:
        wid = spec.workload_id
        bundle = self.bundle_dir(wid)
        volume = await self.volumes.ensure(wid, spec.disk)
        netns: Path | None = None
        endpoints: builtins.list[str] = []
        if self.network is not None:
            netns, endpoints = await self.network.attach(wid, list(spec.ports))
        try:
            bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._logs.mkdir(parents=True, exist_ok=True, mode=0o700)
            resolv = bundle / "resolv.conf"
            resolv.write_text("".join(f"nameserver {ns}\n" for ns in _host_nameservers()))
            hosts = bundle / "hosts"
            hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
            config = build_config(
                spec,
                rootfs=rootfs,
                volume=volume,
                netns_path=netns,
                hostname=_hostname(wid),
                cgroups_path=self.cgroups_path(wid),
                extra_mounts=[(resolv, "/etc/resolv.conf"), (hosts, "/etc/hosts")],
            )
            _write_json(bundle / "config.json", config)
            _write_json(
                bundle / "meta.json",
                {
                    "version": _META_VERSION,
                    "spec_hash": spec.spec_hash(),
                    "image": spec.image,
                    "ports": list(spec.ports),
                    "disk": spec.disk,
                    "endpoints": endpoints,
                },
            )
            (bundle / "exit.json").unlink(missing_ok=True)
        except OSError as exc:
            raise RuntimeFailure(f"cannot write the bundle of {wid}: {exc}") from exc
        await self._launch(wid)
        return endpoints

    async def _launch(self, workload_id: str) -> None:
        bundle = self.bundle_dir(workload_id)
        self.runc_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = await cmd.run(
            [sys.executable, "-I", "-S", str(SHIM), self.runc, str(self.runc_root), str(bundle),
             workload_id, str(self.log_path(workload_id)), str(self.log_limit)],
            time_limit=SHIM_TIMEOUT,
            check=False,
        )
        try:
            report = json.loads(proc.stdout.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            report = {"ok": False, "error": proc.stderr.decode(errors="replace")[-2000:]}
        if not (isinstance(report, dict) and report.get("ok")):
            error = report.get("error") if isinstance(report, dict) else report
            await self._runc("delete", "--force", workload_id, check=False)
            raise RuntimeFailure(f"cannot start {workload_id}: {error}")

    async def restart(self, workload_id: str) -> None:
        """Stop the container if it runs, then run it again from its bundle (same volume, same
        network namespace; after a reboot both are set up again). Raises
        :class:`RuntimeFailure` if the container is unknown or does not start."""
        async with self._lock(workload_id):
            meta = self._meta(workload_id)
            if not (self.bundle_dir(workload_id) / "config.json").exists() or not meta:
                raise RuntimeFailure(f"no container {workload_id} to restart")
            await self._stop(workload_id)
            await self._runc("delete", "--force", workload_id, check=False)
            await self.volumes.ensure(workload_id, int(meta["disk"]))
            if self.network is not None:
                _, endpoints = await self.network.attach(workload_id, list(meta.get("ports", [])))
                if endpoints != meta.get("endpoints"):
                    meta["endpoints"] = endpoints
                    _write_json(self.bundle_dir(workload_id) / "meta.json", meta)
            (self.bundle_dir(workload_id) / "exit.json").unlink(missing_ok=True)
            await self._launch(workload_id)

    async def delete(self, workload_id: str) -> None:
        """Kill the container and remove everything it had: runc state, network, volume (its
        data is gone), bundle, logs. Idempotent. Raises :class:`RuntimeFailure`."""
        async with self._lock(workload_id):
            await self._stop_and_remove(workload_id, keep_volume=False)
            for p in (self.log_path(workload_id), self.log_path(workload_id).with_suffix(".log.1")):
                p.unlink(missing_ok=True)
        self._locks.pop(workload_id, None)

    async def delete_all(self) -> None:
        """Delete every container this runtime owns (a node leaving the grid, devnet down).
        Raises :class:`RuntimeFailure`."""
        for workload_id in await self.list():
            await self.delete(workload_id)

    async def _stop(self, workload_id: str) -> None:
        """SIGKILL the container and wait until runc sees it stopped and its shim has exited."""
        state = await self._runc_state(workload_id)
        if state is not None and state.get("status") != "stopped":
            await self._runc("kill", workload_id, "KILL", check=False)
        with trio.move_on_after(STOP_TIMEOUT) as scope:
            while state is not None and state.get("status") != "stopped":
                await trio.sleep(_POLL)
                state = await self._runc_state(workload_id)
            while True:  # the shim is not our child: no event to wait on, poll its /proc entry
                if not self._shim_alive(workload_id):
                    break
                await trio.sleep(_POLL)
        if scope.cancelled_caught:
            raise RuntimeFailure(f"{workload_id} did not stop within {STOP_TIMEOUT:g}s")

    async def _stop_and_remove(self, workload_id: str, *, keep_volume: bool) -> None:
        await self._stop(workload_id)
        proc = await self._runc("delete", "--force", workload_id, check=False)
        if proc.returncode != 0 and b"does not exist" not in proc.stderr:
            raise RuntimeFailure(cmd.describe_failure(["runc", "delete", workload_id], proc))
        if self.network is not None:
            await self.network.detach(workload_id)
        if not keep_volume:
            await self.volumes.remove(workload_id)
        bundle = self.bundle_dir(workload_id)
        await trio.to_thread.run_sync(_rmtree, bundle)
        self._remove_empty_cgroup_parents()

    def _remove_empty_cgroup_parents(self) -> None:
        # runc removes the container's cgroups; the per-agent parent stays unless emptied here.
        for controller in Path("/sys/fs/cgroup").iterdir():
            parent = controller / self.cgroup_parent
            try:
                parent.rmdir()
            except OSError:
                pass  # absent, or other containers still in it


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
