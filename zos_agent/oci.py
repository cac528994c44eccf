"""The OCI runtime config (``config.json``) for one container workload. Pure: no I/O.

What every container gets, whatever its manifest says (design section 4):
- a read-only rootfs (the image cache is shared between containers of one image) plus one
  writable volume at ``/data`` (its quota is the volume's size) and a small tmpfs at ``/tmp``;
- own pid, mount, uts, ipc and network namespaces (the network one is a path prepared by the
  node network, or a fresh empty one);
- ``noNewPrivileges``, a short capability allow-list, no devices beyond the runc defaults,
  masked ``/proc`` entries, cgroup cpu quota, memory limit (no swap) and a pids limit;
- no terminal: stdio are plain fds owned by the shim (no console socket, nothing listens).

``spec_hash`` covers exactly the fields whose change needs the container re-created; it is
stored as an annotation in config.json so that a restarted agent recovers it from runc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.codec import hash_value
from zos_agent.errors import InvalidSpec

OCI_VERSION = "1.0.2"
SPEC_HASH_ANNOTATION = "org.tfgrid.spec-hash"
WORKLOAD_ANNOTATION = "org.tfgrid.workload"
DATA_MOUNT = "/data"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD_US = 100_000
PIDS_LIMIT = 1024
NOFILE_LIMIT = 1024
TMPFS_SIZE = 64 * 1024 * 1024
RESTART_POLICIES = ("always", "on-failure", "never")

# What a typical server process needs and nothing more: bind low ports, drop to another user,
# chown its files, signal its own children. Everything else (SYS_ADMIN, NET_ADMIN, NET_RAW,
# MKNOD, SYS_CHROOT, AUDIT_WRITE, DAC_OVERRIDE, ...) is dropped from every set.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_FOWNER",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETGID",
    "CAP_SETUID",
)

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# Also used as runc container ids, file names, netns and cgroup names.
_WORKLOAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_IMAGE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _clean(value: object) -> bool:
    """A string an exec argument or env value can hold: UTF-8 encodable, no NUL."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class ContainerSpec:
    """One container workload as the runtime needs it (secret env already unsealed).

    Raises :class:`InvalidSpec` on construction when a field cannot be run.
    """

    workload_id: str
    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    cpu: int = 1
    memory: int = 256 * 1024 * 1024
    disk: int = 64 * 1024 * 1024
    ports: list[int] = field(default_factory=list)
    restart: str = "always"

    def __post_init__(self) -> None:
        if not _WORKLOAD_ID.match(self.workload_id):
            raise InvalidSpec(f"workload id {self.workload_id!r} must match {_WORKLOAD_ID.pattern}")
        if not _IMAGE.match(self.image):
            raise InvalidSpec(f"image {self.image!r} is not sha256:<64 hex digits>")
        if not self.command or not all(_clean(a) for a in self.command):
            raise InvalidSpec("command must be a non-empty list of UTF-8 strings without NUL")
        for name, values in (("env", self.env), ("secret_env", self.secret_env)):
            for k, v in values.items():
                if not (isinstance(k, str) and _ENV_NAME.match(k) and _clean(v)):
                    raise InvalidSpec(f"{name} entry {k!r} is not NAME=string")
        both = set(self.env) & set(self.secret_env)
        if both:
            raise InvalidSpec(f"names in both env and secret_env: {sorted(both)}")
        for name, value in (("cpu", self.cpu), ("memory", self.memory), ("disk", self.disk)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidSpec(f"{name} must be a positive integer, got {value!r}")
        if len(set(self.ports)) != len(self.ports) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in self.ports
        ):
            raise InvalidSpec(f"ports must be distinct integers in 1..65535, got {self.ports!r}")
        if self.restart not in RESTART_POLICIES:
            raise InvalidSpec(f"restart must be one of {RESTART_POLICIES}, got {self.restart!r}")

    def spec_hash(self) -> str:
        """Hex BLAKE2b-256 of the canonical encoding of every field whose change needs the
        container re-created. The restart policy is the agent's business and is left out."""
        return hash_value(
            [
                "tfgrid.container.v1",
                self.image,
                list(self.command),
                dict(self.env),
                dict(self.secret_env),
                self.cpu,
                self.memory,
                self.disk,
                sorted(self.ports),
            ]
        ).hex()

    def environment(self) -> list[str]:
        """``NAME=value`` strings: PATH (unless given), env, then secret env, each sorted."""
        out = [] if "PATH" in self.env or "PATH" in self.secret_env else [f"PATH={DEFAULT_PATH}"]
        out += [f"{k}={self.env[k]}" for k in sorted(self.env)]
        out += [f"{k}={self.secret_env[k]}" for k in sorted(self.secret_env)]
        return out


def build_config(
    spec: ContainerSpec,
    *,
    rootfs: Path,
    volume: Path,
    netns_path: Path | None,
    hostname: str,
    cgroups_path: str | None = None,
    extra_mounts: list[tuple[Path, str]] | None = None,
) -> dict[str, Any]:
    """The OCI ``config.json`` document for ``spec``.

    ``volume`` is the host directory mounted read-write at /data; ``netns_path`` the network
    namespace to join (None: a new, empty one); ``cgroups_path`` defaults to
    ``/tfgrid/<workload id>``; ``extra_mounts`` are (host file, container path) read-only binds
    (e.g. resolv.conf).
    """
    caps = list(CAPABILITIES)
    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "network", "path": str(netns_path)} if netns_path else {"type": "network"},
    ]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={TMPFS_SIZE}"],
        },
        {
            "destination": DATA_MOUNT,
            "type": "bind",
            "source": str(volume),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        },
    ]
    for host_file, dest in extra_mounts or []:
        mounts.append(
            {
                "destination": dest,
                "type": "bind",
                "source": str(host_file),
                "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
            }
        )
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(spec.command),
            "env": spec.environment(),
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE_LIMIT, "soft": NOFILE_LIMIT}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "annotations": {
            SPEC_HASH_ANNOTATION: spec.spec_hash(),
            WORKLOAD_ANNOTATION: spec.workload_id,
        },
        "linux": {
            "cgroupsPath": cgroups_path or f"/tfgrid/{spec.workload_id}",
            "namespaces": namespaces,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": spec.memory, "swap": spec.memory},
                "cpu": {"quota": spec.cpu * CPU_PERIOD_US, "period": CPU_PERIOD_US},
                "pids": {"limit": PIDS_LIMIT},
            },
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
