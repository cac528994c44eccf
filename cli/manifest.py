"""Deployment manifests: the YAML a developer writes, checked, and the deployment it becomes.

A manifest (design section 7)::

    name: web
    node: auto            # or a node id, or {farm: ID}
    workloads:
      - name: hello
        kind: container
        image: sha256:...  # from `tfgrid image push`
        command: ["sh", "-c", "echo hello; sleep 3600"]
        env: {GREETING: hi}
        secret_env: {TOKEN: s3cret}
        cpu: 1             # whole cores                       [default 1]
        memory: 256MiB     # bytes, or a size with a unit      [default 256MiB]
        disk: 1GiB         # the writable /data volume         [default 1GiB]
        ports: [8080]      # published on the node's address   [default none]
        restart: always    # or on-failure, never              [default always]
        image_sources: [file:///...]   # optional: where nodes fetch the image

Sizes are integers (bytes) or a number with a unit: ``Ki``/``KiB``, ``Mi``/``MiB``,
``Gi``/``GiB``, ``Ti``/``TiB`` (powers of 1024), ``K``/``KB``/``M``/``MB``/``G``/``GB``/
``T``/``TB`` (powers of 1000) or ``B``.

Everything here is pure: :func:`parse_manifest` turns text into a :class:`Manifest` or raises
:class:`ManifestError` with one line that names the offending field; :func:`build_deployment`
turns a manifest into the canonical deployment map signed into a ``contract_create``.

The deployment map (what node agents read; every value canonical-msgpack-safe)::

    {"name": str, "workloads": [
        {"name": str, "kind": "container", "image": "sha256:<hex>",
         "image_sources": [str, ...], "command": [str, ...], "env": {str: str},
         "secret_env": {str: bytes (sealed to the node's key)}, "cpu": int, "memory": int,
         "disk": int, "ports": [int, ...], "restart": "always"|"on-failure"|"never"}, ...]}

Secret values never appear in clear in the deployment: the caller passes a ``seal`` function
(anonymous sealed box to the chosen node's key) and only its ciphertext is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from ledger.errors import ConfigError

MAX_MANIFEST_BYTES = 256 * 1024
MAX_WORKLOADS = 64
MAX_NAME = 32
DEFAULT_CPU = 1
DEFAULT_MEMORY = 256 * 1024**2
DEFAULT_DISK = 1024**3
DEFAULT_RESTART = "always"
RESTART_POLICIES = ("always", "on-failure", "never")
WORKLOAD_KINDS = ("container",)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Workload names become parts of container ids and host names on the node: keep them plain.
_WORKLOAD_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMAGE = re.compile(r"sha256:[0-9a-f]{64}")
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2,
    "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}
_SOURCE_SCHEMES = ("file://", "http://", "https://")

_TOP_FIELDS = ("name", "node", "workloads")
_WORKLOAD_FIELDS = ("name", "kind", "image", "image_sources", "command", "env", "secret_env",
                    "cpu", "memory", "disk", "ports", "restart")


class ManifestError(ConfigError):
    """A manifest is not valid; the message is one line naming the field."""


@dataclass(frozen=True, slots=True)
class NodeChoice:
    """Where the deployment goes: ``auto`` (any node up with room), one node, or one farm."""

    mode: str  # "auto" | "node" | "farm"
    id: int | None = None

    def describe(self) -> str:
        return "auto" if self.mode == "auto" else f"{self.mode} {self.id}"


@dataclass(frozen=True, slots=True)
class ContainerWorkload:
    name: str
    image: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, str] = field(default_factory=dict)
    cpu: int = DEFAULT_CPU
    memory: int = DEFAULT_MEMORY
    disk: int = DEFAULT_DISK
    ports: tuple[int, ...] = ()
    restart: str = DEFAULT_RESTART
    image_sources: tuple[str, ...] | None = None  # None: resolve from the local image store
    kind: str = "container"


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    node: NodeChoice
    workloads: tuple[ContainerWorkload, ...]

    def resources(self) -> dict[str, int]:
        """What the deployment reserves on its node: ``{"cpu", "memory", "disk"}``."""
        return {"cpu": sum(w.cpu for w in self.workloads),
                "memory": sum(w.memory for w in self.workloads),
                "disk": sum(w.disk for w in self.workloads)}

    def images(self) -> list[str]:
        """The distinct images the workloads use, in first-use order."""
        return list(dict.fromkeys(w.image for w in self.workloads))


# -- parsing --------------------------------------------------------------------------------


def load_manifest(path: Path) -> Manifest:
    """Read and parse the manifest file ``path``. Raises :class:`ManifestError`."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path} is not UTF-8 text") from exc
    return parse_manifest(text, source=str(path))


def parse_manifest(text: str, *, source: str = "manifest") -> Manifest:
    """Parse and validate manifest YAML. Raises :class:`ManifestError` (one line, names a field)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ManifestError(f"{source}: not valid YAML{where}: {problem}") from None
    return _Parser(source).manifest(doc)


def parse_size(value: Any, what: str = "size") -> int:
    """Bytes from an integer or a string such as ``256MiB``. Raises :class:`ManifestError`."""
    if isinstance(value, bool):
        raise ManifestError(f"{what}: {value!r} is not a size (e.g. 256MiB, 1GiB)")
    if isinstance(value, int):
        if value < 0:
            raise ManifestError(f"{what}: {value} must not be negative")
        return value
    if not isinstance(value, str):
        raise ManifestError(f"{what}: {value!r} is not a size (e.g. 256MiB, 1GiB)")
    m = _SIZE.fullmatch(value)
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise ManifestError(f"{what}: {value!r} is not a size (e.g. 256MiB, 1GiB, or bytes)")
    try:
        exact = Decimal(m.group(1)) * unit
    except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
        raise ManifestError(f"{what}: {value!r} is not a size") from None
    if exact != exact.to_integral_value():
        raise ManifestError(f"{what}: {value!r} is not a whole number of bytes")
    return int(exact)


class _Parser:
    """Validation with the field path in every message (``workloads[0] (web).memory``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ManifestError:
        return ManifestError(f"{self.source}: {where}: {message}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"field names must be text, got {key!r}")
            if key not in allowed:
                raise self.fail(f"{where}.{key}" if where != "manifest" else key,
                                f"unknown field (expected one of: {', '.join(allowed)})")
        return value

    def name(self, value: Any, where: str, pattern: re.Pattern[str], hint: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {_kind(value)}")
        if len(value) > MAX_NAME or not pattern.fullmatch(value):
            raise self.fail(where, f"{value!r} must be at most {MAX_NAME} characters of {hint}")
        return value

    def manifest(self, doc: Any) -> Manifest:
        if doc is None:
            raise self.fail("manifest", "is empty")
        top = self.mapping(doc, "manifest", _TOP_FIELDS)
        if "name" not in top:
            raise self.fail("name", "is required")
        name = self.name(top["name"], "name", _NAME,
                         "letters, digits, '_', '.', '-' (starting with a letter or digit)")
        node = self.node(top.get("node", "auto"))
        if "workloads" not in top:
            raise self.fail("workloads", "is required (a list of workloads)")
        raw = top["workloads"]
        if not isinstance(raw, list) or not raw:
            raise self.fail("workloads", "must be a non-empty list")
        if len(raw) > MAX_WORKLOADS:
            raise self.fail("workloads", f"has {len(raw)} entries, at most {MAX_WORKLOADS}")
        workloads = [self.workload(w, i) for i, w in enumerate(raw)]
        seen: set[str] = set()
        for i, w in enumerate(workloads):
            if w.name in seen:
                raise self.fail(f"workloads[{i}].name", f"{w.name!r} is used twice")
            seen.add(w.name)
        return Manifest(name=name, node=node, workloads=tuple(workloads))

    def node(self, value: Any) -> NodeChoice:
        if value == "auto" or value is None:
            return NodeChoice("auto")
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise self.fail("node", f"node id {value} must be 1 or more")
            return NodeChoice("node", value)
        if isinstance(value, str) and value.isdigit():
            return self.node(int(value))
        if isinstance(value, dict):
            spec = self.mapping(value, "node", ("farm",))
            farm = spec.get("farm")
            if not isinstance(farm, int) or isinstance(farm, bool) or farm < 1:
                raise self.fail("node.farm", f"must be a farm id (1 or more), got {farm!r}")
            return NodeChoice("farm", farm)
        raise self.fail("node", f"must be auto, a node id, or farm: ID; got {value!r}")

    def workload(self, value: Any, index: int) -> ContainerWorkload:
        where = f"workloads[{index}]"
        w = self.mapping(value, where, _WORKLOAD_FIELDS)
        if "name" not in w:
            raise self.fail(f"{where}.name", "is required")
        name = self.name(w["name"], f"{where}.name", _WORKLOAD_NAME,
                         "lower-case letters, digits and '-' (starting with a letter or digit)")
        where = f"{where} ({name})"
        kind = w.get("kind", "container")
        if kind not in WORKLOAD_KINDS:
            raise self.fail(f"{where}.kind",
                            f"{kind!r} is not supported (expected: {', '.join(WORKLOAD_KINDS)})")
        if "image" not in w:
            raise self.fail(f"{where}.image", "is required (sha256:... from `tfgrid image push`)")
        image = w["image"]
        if not isinstance(image, str) or not _IMAGE.fullmatch(image):
            raise self.fail(f"{where}.image", f"{image!r} is not an image reference "
                            "(sha256: and 64 lower-case hex digits, from `tfgrid image push`)")
        workload = ContainerWorkload(
            name=name,
            image=image,
            image_sources=self.sources(w.get("image_sources"), f"{where}.image_sources"),
            command=self.command(w.get("command"), f"{where}.command"),
            env=self.env(w.get("env"), f"{where}.env"),
            secret_env=self.env(w.get("secret_env"), f"{where}.secret_env"),
            cpu=self.cpu(w.get("cpu", DEFAULT_CPU), f"{where}.cpu"),
            memory=self.size(w.get("memory", DEFAULT_MEMORY), f"{where}.memory", minimum=1 << 20),
            disk=self.size(w.get("disk", DEFAULT_DISK), f"{where}.disk", minimum=0),
            ports=self.ports(w.get("ports"), f"{where}.ports"),
            restart=self.restart(w.get("restart", DEFAULT_RESTART), f"{where}.restart"),
        )
        both = sorted(set(workload.env) & set(workload.secret_env))
        if both:
            raise self.fail(f"{where}.secret_env", f"{both[0]} is also in env; use one of them")
        return workload

    def sources(self, value: Any, where: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise self.fail(where, "must be a non-empty list of URLs")
        for i, s in enumerate(value):
            if not isinstance(s, str) or not s.startswith(_SOURCE_SCHEMES):
                raise self.fail(f"{where}[{i}]", f"{s!r} must be a file://, http:// or "
                                "https:// URL")
        return tuple(value)

    def command(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            raise self.fail(where, "is required (a list such as [\"sh\", \"-c\", \"...\"])")
        if isinstance(value, str):
            raise self.fail(where, "must be a list of strings, e.g. [\"sh\", \"-c\", "
                            f"{value!r}]")
        if not isinstance(value, list) or not value:
            raise self.fail(where, "must be a non-empty list of strings")
        for i, arg in enumerate(value):
            if not isinstance(arg, str):
                raise self.fail(f"{where}[{i}]", f"must be a string, got {_kind(arg)} "
                                "(quote it)")
        return tuple(value)

    def env(self, value: Any, where: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping of NAME: value, got {_kind(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not _ENV_NAME.fullmatch(k):
                raise self.fail(where, f"{k!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
            if isinstance(v, str):
                out[k] = v
            elif isinstance(v, int) and not isinstance(v, bool):
                out[k] = str(v)
            else:
                raise self.fail(f"{where}.{k}", f"must be a string, got {_kind(v)} (quote it)")
            if "\x00" in out[k]:
                raise self.fail(f"{where}.{k}", "must not contain a NUL character")
        return out

    def cpu(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self.fail(where, f"must be a whole number of cores (1 or more), got {value!r}")
        return value

    def size(self, value: Any, where: str, *, minimum: int) -> int:
        try:
            n = parse_size(value, "size")
        except ManifestError as exc:
            raise self.fail(where, str(exc).removeprefix("size: ")) from None
        if n < minimum:
            raise self.fail(where, f"{value!r} is below the minimum of {minimum} bytes")
        return n

    def ports(self, value: Any, where: str) -> tuple[int, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list of port numbers, got {_kind(value)}")
        for i, p in enumerate(value):
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
                raise self.fail(f"{where}[{i}]", f"{p!r} is not a port number (1-65535)")
        if len(set(value)) != len(value):
            raise self.fail(where, "lists a port twice")
        return tuple(value)

    def restart(self, value: Any, where: str) -> str:
        if value not in RESTART_POLICIES:
            raise self.fail(where, f"{value!r} must be one of {', '.join(RESTART_POLICIES)}")
        return str(value)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


# -- the deployment -------------------------------------------------------------------------


def build_deployment(manifest: Manifest, *, image_sources: Mapping[str, list[str]],
                     seal: Callable[[bytes], bytes]) -> dict[str, Any]:
    """The canonical deployment map for ``manifest`` (schema in the module docstring).

    ``image_sources`` maps each image reference to where nodes fetch it (used for workloads
    whose manifest names no ``image_sources``); ``seal`` encrypts one secret value to the
    chosen node. Raises :class:`ManifestError` if a workload's image has no source.
    """
    workloads = []
    for w in manifest.workloads:
        sources = list(w.image_sources) if w.image_sources is not None else \
            list(image_sources.get(w.image, []))
        if not sources:
            raise ManifestError(f"workload {w.name}: image {w.image} has no source: push it "
                                "with `tfgrid image push` or list image_sources")
        workloads.append({
            "name": w.name,
            "kind": w.kind,
            "image": w.image,
            "image_sources": sources,
            "command": list(w.command),
            "env": dict(w.env),
            "secret_env": {k: seal(v.encode()) for k, v in w.secret_env.items()},
            "cpu": w.cpu,
            "memory": w.memory,
            "disk": w.disk,
            "ports": list(w.ports),
            "restart": w.restart,
        })
    return {"name": manifest.name, "workloads": workloads}
