"""The pure OCI config builder: isolation, limits, mounts, env, spec hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zos_agent.errors import InvalidSpec
from zos_agent.oci import (
    CAPABILITIES,
    CPU_PERIOD_US,
    DEFAULT_PATH,
    SPEC_HASH_ANNOTATION,
    ContainerSpec,
    build_config,
)

IMAGE = "sha256:" + "ab" * 32
MIB = 1024 * 1024


def spec(**kw: Any) -> ContainerSpec:
    fields: dict[str, Any] = {
        "workload_id": "c7-web",
        "image": IMAGE,
        "command": ["httpd", "-f", "-p", "80"],
        "env": {"GREETING": "hi"},
        "secret_env": {"TOKEN": "s3cret"},
        "cpu": 2,
        "memory": 256 * MIB,
        "disk": 1024 * MIB,
        "ports": [80],
        "restart": "always",
    }
    fields.update(kw)
    return ContainerSpec(**fields)


def config(s: ContainerSpec | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "rootfs": Path("/cache/rootfs/ab"),
        "volume": Path("/data/volumes/c7-web"),
        "netns_path": Path("/run/netns/tf-a-c7-web"),
        "hostname": "c7-web",
    }
    args.update(kw)
    return build_config(s or spec(), **args)


def test_own_namespaces_and_joined_network() -> None:
    ns = config()["linux"]["namespaces"]
    assert {n["type"] for n in ns} == {"pid", "ipc", "uts", "mount", "network"}
    assert {"type": "network", "path": "/run/netns/tf-a-c7-web"} in ns
    assert all("path" not in n for n in ns if n["type"] != "network")
    fresh = config(netns_path=None)["linux"]["namespaces"]
    assert {"type": "network"} in fresh


def test_privileges_dropped() -> None:
    proc = config()["process"]
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    caps = proc["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert caps[kind] == list(CAPABILITIES)
    assert caps["inheritable"] == []
    assert caps["ambient"] == []
    for dangerous in ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_MKNOD",
                      "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE", "CAP_SYS_MODULE"):
        assert dangerous not in caps["bounding"]
    linux = config()["linux"]
    assert linux["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"]


def test_limits() -> None:
    res = config()["linux"]["resources"]
    assert res["memory"] == {"limit": 256 * MIB, "swap": 256 * MIB}
    assert res["cpu"] == {"quota": 2 * CPU_PERIOD_US, "period": CPU_PERIOD_US}
    assert res["pids"]["limit"] > 0
    assert config(cgroups_path="/tfgrid-x/c7-web")["linux"]["cgroupsPath"] == "/tfgrid-x/c7-web"
    assert config()["linux"]["cgroupsPath"] == "/tfgrid/c7-web"


def test_readonly_rootfs_and_mounts() -> None:
    cfg = config(extra_mounts=[(Path("/b/resolv.conf"), "/etc/resolv.conf")])
    assert cfg["root"] == {"path": "/cache/rootfs/ab", "readonly": True}
    mounts = {m["destination"]: m for m in cfg["mounts"]}
    data = mounts["/data"]
    assert data["type"] == "bind"
    assert data["source"] == "/data/volumes/c7-web"
    assert "rw" in data["options"]
    assert "nosuid" in data["options"]
    assert mounts["/tmp"]["type"] == "tmpfs"
    assert mounts["/proc"]["type"] == "proc"
    assert "ro" in mounts["/sys"]["options"]
    assert "ro" in mounts["/etc/resolv.conf"]["options"]
    assert mounts["/etc/resolv.conf"]["source"] == "/b/resolv.conf"
    assert cfg["hostname"] == "c7-web"


def test_env_includes_secret_env() -> None:
    cfg = config(spec(env={"B": "2", "A": "1"}, secret_env={"TOKEN": "s3cret"}))
    assert cfg["process"]["env"] == [f"PATH={DEFAULT_PATH}", "A=1", "B=2", "TOKEN=s3cret"]
    assert cfg["process"]["args"] == ["httpd", "-f", "-p", "80"]
    own_path = config(spec(env={"PATH": "/opt/bin"}))["process"]["env"]
    assert own_path[0] == "PATH=/opt/bin"
    assert len([e for e in own_path if e.startswith("PATH=")]) == 1


def test_spec_hash_in_annotations() -> None:
    s = spec()
    assert config(s)["annotations"][SPEC_HASH_ANNOTATION] == s.spec_hash()


def test_spec_hash_is_stable() -> None:
    # Pinned: the hash is persisted (config.json annotations) and compared across agent
    # versions and restarts, so an accidental change of its encoding must fail here.
    assert spec().spec_hash() == spec().spec_hash()
    assert spec().spec_hash() == "9f38c738351ce8bdc0b3b30f3f50482b39cf11d420813b2464959ef69b568c98"


@pytest.mark.parametrize(
    "change",
    [
        {"image": "sha256:" + "cd" * 32},
        {"command": ["httpd"]},
        {"env": {"GREETING": "hello"}},
        {"secret_env": {"TOKEN": "other"}},
        {"cpu": 1},
        {"memory": 128 * MIB},
        {"disk": 2048 * MIB},
        {"ports": [80, 443]},
    ],
)
def test_spec_hash_changes_with_what_needs_recreation(change: dict[str, Any]) -> None:
    assert spec(**change).spec_hash() != spec().spec_hash()


def test_spec_hash_ignores_restart_policy_and_port_order() -> None:
    assert spec(restart="never").spec_hash() == spec().spec_hash()
    assert spec(ports=[443, 80]).spec_hash() == spec(ports=[80, 443]).spec_hash()


@given(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=8), max_size=6))
def test_spec_hash_independent_of_env_order(env: dict[str, str]) -> None:
    reordered = dict(reversed(list(env.items())))
    assert spec(env=env, secret_env={}).spec_hash() == spec(env=reordered, secret_env={}).spec_hash()


@pytest.mark.parametrize(
    "bad",
    [
        {"workload_id": "../etc"},
        {"workload_id": ""},
        {"workload_id": "a" * 64},
        {"image": "busybox:latest"},
        {"image": "sha256:" + "AB" * 32},
        {"command": []},
        {"command": ["sh", "a\0b"]},
        {"command": ["sh", "\ud800"]},
        {"env": {"A": "\ud800"}},
        {"env": {"1BAD": "x"}},
        {"env": {"A=B": "x"}},
        {"env": {"TOKEN": "x"}},  # also in secret_env
        {"cpu": 0},
        {"cpu": True},
        {"memory": -1},
        {"disk": 0},
        {"ports": [80, 80]},
        {"ports": [0]},
        {"ports": [70000]},
        {"restart": "sometimes"},
    ],
)
def test_invalid_specs_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidSpec):
        spec(**bad)
