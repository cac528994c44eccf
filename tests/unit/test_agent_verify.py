"""What the agent accepts from the ledger: contract verification, workload parsing, secrets.

Pure table tests of :func:`zos_agent.follower.check_contract` and the sealing helpers; the same
checks run end to end against a lying peer in tests/integration/test_agent_lying.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from ledger.keys import KeyPair
from ledger.state import sign_deployment
from zos_agent.follower import check_contract, container_spec, refused_view
from zos_agent.reconcile import Result
from zos_agent.secrets import SecretError, seal_secret, unseal_secret

CHAIN = "verify-test"
OWNER = KeyPair.from_seed(b"\x01" * 32)
OTHER = KeyPair.from_seed(b"\x02" * 32)
NODE = KeyPair.from_seed(b"\x03" * 32)
OTHER_NODE = KeyPair.from_seed(b"\x04" * 32)
IMAGE = "sha256:" + "cd" * 32
NODE_ID = 7


def workload(name: str = "web", **over: Any) -> dict[str, Any]:
    w: dict[str, Any] = {"name": name, "kind": "container", "image": IMAGE,
                         "image_sources": ["file:///images/x.tar"],
                         "command": ["httpd", "-f"], "env": {"A": "1"},
                         "secret_env": {"TOKEN": seal_secret(NODE.public_key, b"t0ken")},
                         "cpu": 1, "memory": 64 << 20, "disk": 32 << 20, "ports": [80],
                         "restart": "always"}
    w.update(over)
    return w


def entry(workloads: list[dict[str, Any]] | None = None, *, signer: KeyPair = OWNER,
          **over: Any) -> dict[str, Any]:
    dep = {"name": "dep", "workloads": workloads or [workload()]}
    h, sig = sign_deployment(signer, CHAIN, dep)
    e: dict[str, Any] = {"id": 3, "owner": 1, "owner_key": OWNER.public_key, "node": NODE_ID,
                         "farm": 1, "kind": "deployment", "deployment": dep,
                         "deployment_hash": h, "signature": sig, "version": 2,
                         "state": "created", "results": []}
    e.update(over)
    return e


def check(e: dict[str, Any], twin_key: bytes | None = OWNER.public_key) -> Any:
    return check_contract(3, e, chain_id=CHAIN, node_id=NODE_ID, owner_twin_key=twin_key,
                          node_key=NODE)


def test_a_valid_contract_becomes_runnable_specs_with_unsealed_secrets() -> None:
    v = check(entry())
    assert v.errors == {}
    assert v.version == 2
    assert v.names == ("web",)
    (d,) = v.desired
    assert d.workload_id == "c3-web"
    assert d.spec.secret_env == {"TOKEN": "t0ken"}
    assert d.spec.env == {"A": "1"}
    assert d.spec.ports == [80]
    assert d.image_sources == ("file:///images/x.tar",)


def _tampered_hash() -> dict[str, Any]:
    e = entry()
    e["deployment"] = dict(e["deployment"], name="other")
    return e


@pytest.mark.parametrize(
    ("case", "e", "twin_key", "reason"),
    [
        ("signed by someone else", entry(signer=OTHER), OWNER.public_key,
         "signature does not verify"),
        ("hash does not match the deployment", _tampered_hash(), OWNER.public_key,
         "does not match the contract's deployment hash"),
        ("owner key is not the twin's", entry(), OTHER.public_key, "not the key of owner twin"),
        ("owner twin missing", entry(), None, "does not exist"),
        ("assigned to another node", entry(node=8), OWNER.public_key, "assigned to node 8"),
        ("signature missing", entry(signature=None), OWNER.public_key, "lacks its owner key"),
    ],
)
def test_refused_contracts_run_nothing_and_report_why(case: str, e: dict[str, Any],
                                                      twin_key: bytes | None, reason: str) -> None:
    v = check(e, twin_key)
    assert v is not None, case
    assert v.desired == ()
    assert set(v.errors) == {"web"}
    assert reason in v.errors["web"], case
    assert v.errors["web"].startswith("refused: ")


@pytest.mark.parametrize(
    ("case", "over", "reason"),
    [
        ("command not a list", {"command": "httpd"}, "command must be a list"),
        ("env value not text", {"env": {"A": 1}}, "env values must be strings"),
        ("port not an integer", {"ports": ["80"]}, "ports must be a list of integers"),
        ("unknown restart policy", {"restart": "sometimes"}, "restart must be one of"),
        ("secret for another node",
         {"secret_env": {"T": seal_secret(OTHER_NODE.public_key, b"x")}},
         "secret_env T: not sealed to this node"),
        ("secret in clear", {"secret_env": {"T": "x"}}, "must be a sealed value"),
        ("bad image", {"image": "busybox:latest"}, "is not sha256"),
        ("zero cpu", {"cpu": 0}, "cpu must be a positive integer"),
        ("memory not int", {"memory": "64M"}, "memory must be an integer"),
    ],
)
def test_bad_workloads_are_refused_one_by_one(case: str, over: dict[str, Any],
                                              reason: str) -> None:
    v = check(entry([workload("bad", **over), workload("good")]))
    assert [d.name for d in v.desired] == ["good"], case
    assert set(v.errors) == {"bad"}
    assert reason in v.errors["bad"], case


def test_namespace_workloads_are_served_not_run() -> None:
    ns = {"name": "ns", "kind": "namespace", "cpu": 0, "memory": 0, "disk": 1 << 30}
    v = check(entry([ns]))
    assert v.desired == ()
    assert v.errors == {}
    assert [(n.name, n.quota) for n in v.namespaces] == [("ns", 1 << 30)]
    bad = check(entry([{**ns, "memory": 1}]))
    assert bad.namespaces == ()
    assert "memory must be 0" in bad.errors["ns"]


def test_a_cancelled_contract_is_not_verified_only_removed() -> None:
    v = check(entry(signer=OTHER, state="cancelled",
                    results=[{"name": "web", "state": "ok", "message": "", "endpoint": "e:1"}]))
    assert v.state == "cancelled"
    assert v.desired == ()
    assert v.errors == {}
    assert v.names == ("web",)
    assert v.results == {"web": Result("ok", "", "e:1")}


@pytest.mark.parametrize("over", [{"version": None}, {"state": 3}, {"id": 4}])
def test_malformed_entries_give_no_view(over: dict[str, Any]) -> None:
    assert check(entry(**over)) is None


def test_refused_view_of_an_unproven_claim() -> None:
    v = refused_view(3, entry(), "refused: served without a valid proof")
    assert v is not None
    assert v.errors == {"web": "refused: served without a valid proof"}
    assert v.desired == ()
    assert refused_view(3, None, "x") is None
    assert refused_view(3, {"version": 1, "deployment": {}}, "x") is None


def test_container_spec_defaults() -> None:
    w = {"name": "w", "kind": "container", "image": IMAGE, "command": ["sh"], "cpu": 1,
         "memory": 1 << 20, "disk": 4 << 20}
    spec, sources = container_spec(9, w, NODE)
    assert spec.restart == "always"
    assert spec.ports == []
    assert spec.env == {}
    assert spec.secret_env == {}
    assert sources == ()


# -- sealing ----------------------------------------------------------------------------------


def test_seal_round_trip_and_ciphertexts_differ() -> None:
    a = seal_secret(NODE.public_key, b"hunter2")
    b = seal_secret(NODE.public_key, b"hunter2")
    assert a != b
    assert b"hunter2" not in a
    assert unseal_secret(NODE, a) == b"hunter2"
    assert unseal_secret(NODE, b) == b"hunter2"


def test_unseal_refuses_other_keys_and_tampering() -> None:
    sealed = seal_secret(NODE.public_key, b"value")
    with pytest.raises(SecretError):
        unseal_secret(OTHER_NODE, sealed)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecretError):
        unseal_secret(NODE, flipped)
    with pytest.raises(SecretError):
        unseal_secret(NODE, b"short")


def test_seal_refuses_bad_keys_and_huge_values() -> None:
    with pytest.raises(SecretError):
        seal_secret(b"\x00" * 31, b"x")
    with pytest.raises(SecretError):
        seal_secret(NODE.public_key, b"x" * 10_000)
