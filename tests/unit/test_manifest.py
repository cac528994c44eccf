"""Deployment manifests: parsing, one-line errors naming the field, and the deployment map."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cli.manifest import (
    DEFAULT_CPU,
    DEFAULT_DISK,
    DEFAULT_MEMORY,
    ManifestError,
    NodeChoice,
    build_deployment,
    load_manifest,
    parse_manifest,
    parse_size,
)
from ledger.codec import pack, unpack
from ledger.state import GIB, Params, _check_deployment

IMAGE = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32

FULL = f"""
name: web
node: auto
workloads:
  - name: hello
    kind: container
    image: {IMAGE}
    command: ["sh", "-c", "echo hello; sleep 3600"]
    env: {{GREETING: hi, PORT: 8080}}
    secret_env: {{TOKEN: s3cret}}
    cpu: 1
    memory: 256MiB
    disk: 1GiB
    ports: [8080]
    restart: always
"""


def minimal(**fields: Any) -> str:
    w: dict[str, Any] = {"name": "app", "image": IMAGE, "command": ["true"]}
    w.update(fields)
    return yaml.safe_dump({"name": "d", "workloads": [w]})


def error_of(text: str) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, source="m.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("m.yaml: ")
    return message


def test_full_manifest_of_the_design() -> None:
    m = parse_manifest(FULL)
    assert m.name == "web"
    assert m.node == NodeChoice("auto")
    (w,) = m.workloads
    assert w.name == "hello"
    assert w.image == IMAGE
    assert w.command == ("sh", "-c", "echo hello; sleep 3600")
    assert w.env == {"GREETING": "hi", "PORT": "8080"}
    assert w.secret_env == {"TOKEN": "s3cret"}
    assert (w.cpu, w.memory, w.disk) == (1, 256 * 2**20, 2**30)
    assert w.ports == (8080,)
    assert w.restart == "always"
    assert w.image_sources is None
    assert m.resources() == {"cpu": 1, "memory": 256 * 2**20, "disk": 2**30}


def test_defaults() -> None:
    (w,) = parse_manifest(minimal()).workloads
    assert (w.cpu, w.memory, w.disk) == (DEFAULT_CPU, DEFAULT_MEMORY, DEFAULT_DISK)
    assert (w.ports, w.env, w.secret_env, w.restart) == ((), {}, {}, "always")
    assert w.kind == "container"


@pytest.mark.parametrize(("node", "expected"), [
    ("auto", NodeChoice("auto")),
    (3, NodeChoice("node", 3)),
    ("7", NodeChoice("node", 7)),
    ({"farm": 2}, NodeChoice("farm", 2)),
])
def test_node_choices(node: Any, expected: NodeChoice) -> None:
    text = yaml.safe_dump({"name": "d", "node": node,
                           "workloads": [{"name": "a", "image": IMAGE, "command": ["true"]}]})
    assert parse_manifest(text).node == expected


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("512", 512), ("1KiB", 1024), ("1Ki", 1024), ("256MiB", 256 << 20),
    ("256mib", 256 << 20), ("1GiB", 1 << 30), ("2TiB", 2 << 40), ("1.5GiB", 3 << 29),
    ("1KB", 1000), ("3M", 3_000_000), ("1G", 10**9), ("10B", 10), (" 4 MiB ", 4 << 20),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "1.3B", "1 XB", "-1MiB", "1e6", "0x10"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ManifestError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**50),
       st.sampled_from([("B", 1), ("KiB", 1024), ("MiB", 1 << 20), ("GiB", 1 << 30),
                        ("KB", 1000), ("GB", 10**9)]))
def test_size_units_multiply(n: int, unit: tuple[str, int]) -> None:
    assert parse_size(f"{n}{unit[0]}") == n * unit[1]
    assert parse_size(n) == n


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "manifest: is empty"),
    ("- a\n- b\n", "manifest: must be a mapping, got a list"),
    ("name: [unclosed\n", "not valid YAML at line"),
    ("workloads: []\n", "name: is required"),
    ("name: web\n", "workloads: is required"),
    ("name: web\nworkloads: []\n", "workloads: must be a non-empty list"),
    ("name: 'bad name'\nworkloads: [x]\n", "name: 'bad name' must be"),
    ("name: web\nnodes: auto\nworkloads: [x]\n", "nodes: unknown field"),
    ("name: web\nnode: somewhere\nworkloads: [x]\n", "node: must be auto, a node id"),
    ("name: web\nnode: 0\nworkloads: [x]\n", "node: node id 0 must be 1 or more"),
    ("name: web\nnode: {farm: x}\nworkloads: [x]\n", "node.farm: must be a farm id"),
    ("name: web\nnode: {pool: 1}\nworkloads: [x]\n", "node.pool: unknown field"),
    ("name: web\nworkloads: [x]\n", "workloads[0]: must be a mapping, got a string"),
])
def test_top_level_errors(text: str, fragment: str) -> None:
    assert fragment in error_of(text)


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"name": "Hello_World"}, "workloads[0].name: 'Hello_World' must be"),
    ({"name": "x" * 33}, "must be at most 32 characters"),
    ({"kind": "vm"}, "workloads[0] (app).kind: 'vm' is not supported"),
    ({"image": "busybox:latest"}, "workloads[0] (app).image: 'busybox:latest' is not an image"),
    ({"image": "sha256:" + "AB" * 32}, ".image:"),
    ({"command": "echo hi"}, ".command: must be a list of strings"),
    ({"command": []}, ".command: must be a non-empty list"),
    ({"command": ["sleep", 5]}, ".command[1]: must be a string, got a number (quote it)"),
    ({"env": ["A=1"]}, ".env: must be a mapping of NAME: value, got a list"),
    ({"env": {"1A": "x"}}, ".env: '1A' is not a variable name"),
    ({"env": {"A": True}}, ".env.A: must be a string, got a boolean (quote it)"),
    ({"env": {"A": 1.5}}, ".env.A: must be a string, got a number"),
    ({"env": {"A": "x"}, "secret_env": {"A": "y"}}, ".secret_env: A is also in env"),
    ({"cpu": 0}, ".cpu: must be a whole number of cores (1 or more), got 0"),
    ({"cpu": 1.5}, ".cpu: must be a whole number of cores"),
    ({"cpu": "2"}, ".cpu: must be a whole number of cores"),
    ({"memory": "256MB!"}, "workloads[0] (app).memory: '256MB!' is not a size"),
    ({"memory": "1KiB"}, ".memory: '1KiB' is below the minimum"),
    ({"memory": True}, ".memory: True is not a size"),
    ({"disk": "lots"}, ".disk: 'lots' is not a size"),
    ({"ports": 80}, ".ports: must be a list of port numbers, got a number"),
    ({"ports": [0]}, ".ports[0]: 0 is not a port number"),
    ({"ports": [80, 70000]}, ".ports[1]: 70000 is not a port number"),
    ({"ports": [80, 80]}, ".ports: lists a port twice"),
    ({"restart": "sometimes"}, ".restart: 'sometimes' must be one of always, on-failure, never"),
    ({"image_sources": "file:///x"}, ".image_sources: must be a non-empty list"),
    ({"image_sources": ["ftp://x"]}, ".image_sources[0]: 'ftp://x' must be"),
    ({"comand": ["x"]}, "workloads[0].comand: unknown field"),
])
def test_workload_errors(fields: dict[str, Any], fragment: str) -> None:
    assert fragment in error_of(minimal(**fields))


def test_missing_workload_fields() -> None:
    text = yaml.safe_dump({"name": "d", "workloads": [{"image": IMAGE}]})
    assert "workloads[0].name: is required" in error_of(text)
    text = yaml.safe_dump({"name": "d", "workloads": [{"name": "a", "command": ["x"]}]})
    assert "workloads[0] (a).image: is required" in error_of(text)
    text = yaml.safe_dump({"name": "d", "workloads": [{"name": "a", "image": IMAGE}]})
    assert "workloads[0] (a).command: is required" in error_of(text)


def test_duplicate_workload_names() -> None:
    w = {"name": "a", "image": IMAGE, "command": ["true"]}
    text = yaml.safe_dump({"name": "d", "workloads": [w, dict(w)]})
    assert "workloads[1].name: 'a' is used twice" in error_of(text)


def test_too_many_workloads() -> None:
    ws = [{"name": f"w{i}", "image": IMAGE, "command": ["true"]} for i in range(65)]
    assert "has 65 entries, at most 64" in error_of(yaml.safe_dump({"name": "d", "workloads": ws}))


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("#" * 300_000)
    with pytest.raises(ManifestError, match="larger than"):
        load_manifest(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(binary)
    good = tmp_path / "good.yaml"
    good.write_text(FULL)
    assert load_manifest(good).name == "web"


def _fake_seal(plaintext: bytes) -> bytes:
    return b"sealed:" + plaintext[::-1]


def test_build_deployment_is_canonical_and_accepted_by_the_ledger() -> None:
    m = parse_manifest(FULL)
    dep = build_deployment(m, image_sources={IMAGE: ["file:///images/ab.tar"]}, seal=_fake_seal)
    assert dep == {
        "name": "web",
        "workloads": [{
            "name": "hello", "kind": "container", "image": IMAGE,
            "image_sources": ["file:///images/ab.tar"],
            "command": ["sh", "-c", "echo hello; sleep 3600"],
            "env": {"GREETING": "hi", "PORT": "8080"},
            "secret_env": {"TOKEN": b"sealed:terc3s"},
            "cpu": 1, "memory": 256 << 20, "disk": 1 << 30, "ports": [8080],
            "restart": "always",
        }],
    }
    assert unpack(pack(dep)) == dep  # nothing that canonical msgpack cannot carry
    assert b"s3cret" not in pack(dep)
    params = Params.from_genesis(_genesis())
    assert _check_deployment(dep, "deployment", params) == m.resources()


def test_build_deployment_sources() -> None:
    text = textwrap.dedent(f"""
        name: two
        workloads:
          - {{name: a, image: {IMAGE}, command: ["true"]}}
          - {{name: b, image: {OTHER}, command: ["true"], image_sources: ["https://x/y.tar"]}}
    """)
    m = parse_manifest(text)
    assert m.images() == [IMAGE, OTHER]
    dep = build_deployment(m, image_sources={IMAGE: ["file:///a.tar"]}, seal=_fake_seal)
    assert [w["image_sources"] for w in dep["workloads"]] == [["file:///a.tar"],
                                                              ["https://x/y.tar"]]
    with pytest.raises(ManifestError, match=r"workload a: image sha256:abab.* has no source"):
        build_deployment(m, image_sources={}, seal=_fake_seal)


def test_resources_sum_over_workloads() -> None:
    text = textwrap.dedent(f"""
        name: pair
        workloads:
          - {{name: a, image: {IMAGE}, command: ["true"], cpu: 2, memory: 1GiB, disk: 0}}
          - {{name: b, image: {IMAGE}, command: ["true"], cpu: 1, memory: 512MiB, disk: 2GiB}}
    """)
    assert parse_manifest(text).resources() == {"cpu": 3, "memory": GIB + GIB // 2,
                                                "disk": 2 * GIB}


def _genesis() -> Any:
    from ledger.config import make_genesis
    from ledger.keys import KeyPair

    return make_genesis("test", [KeyPair.from_seed(b"\x01" * 32).public_key], [], {}, 0)
