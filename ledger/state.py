"""The ledger state machine: pure, deterministic, driven by block time only.

Every validator that applies the same blocks (height, block time, encoded txs) to the same
state gets the same entries and the same state root. Nothing here reads a clock, a random
source or a file; time is the block time passed to :meth:`LedgerState.apply_block`.

Units
-----
All amounts are integers in base units (1 TFT = 10**7 units). Memory and storage are bytes;
cpu is whole cores; times are milliseconds of block time.

Genesis parameters (``Genesis.params``; unknown names are ignored, missing ones default)
------------------------------------------------------------------------------------------
==========================  ===============  ====================================================
name                        default          meaning
==========================  ===============  ====================================================
min_fee                     10_000           smallest fee a tx may carry (fees are burned)
billing_period_ms           3_600_000        contracts are billed at each multiple of this
                                             after genesis time
grace_period_ms             1_209_600_000    an unpaid contract stays in grace this long, then is
                                             cancelled (at the first billing boundary after)
minting_period_ms           86_400_000       nodes' farms are rewarded at each multiple of this
price_per_core              1_000_000        per reserved core per billing period
price_per_gib_memory        500_000          per reserved GiB of memory per billing period
price_per_gib_storage       10_000           per reserved GiB of disk per billing period
burn_percent                35               share of each contract payment that is burned
mint_per_core               10_000_000       per core per minting period at 100% uptime
mint_per_gib_memory         2_000_000        per GiB memory per minting period at 100% uptime
mint_per_gib_storage        100_000          per GiB storage per minting period at 100% uptime
max_clock_drift_ms          60_000           |uptime report time - block time| allowed
uptime_down_after_ms        3_600_000        a node is "down" this long after its last report
max_deployment_size         16_384           bytes of a canonically encoded deployment
==========================  ===============  ====================================================

Economics and the supply invariant
----------------------------------
``sum(balances) + burned == genesis_supply + minted`` holds after every block, because money
only moves in these ways: a transfer moves it between accounts; a fee is burned (the sender
loses it, ``burned`` grows); a contract payment moves it from the owner to the farm owner minus
``burn_percent`` which is burned; a minting reward is credited to the farm owner and added to
``minted``. The counters entry also keeps ``supply`` (= the sum of balances).

Fees are burned rather than paid to the proposer: the state machine does not know the
proposer, and burning keeps the invariant with no extra accounting.

Transactions in a block
-----------------------
Each encoded tx is processed in order:

1. undecodable -> ``malformed`` / ``too_large``; bad signature -> ``bad_signature``; nonce not
   exactly the sender's next nonce -> ``bad_nonce``; fee below ``min_fee`` -> ``fee_too_low``;
   balance below the fee -> ``insufficient_funds``. These change nothing but the txresult.
2. Otherwise the fee is burned and the sender's nonce advances, whatever happens next (so a
   failing tx cannot be replayed and the sender's later txs stay in sequence).
3. The body is checked and executed; if it fails (``unknown_type``, ``bad_body``, ``name_taken``,
   ``overbooked``, ...) its own changes are discarded: only the fee and the nonce stay.

Every tx gets a ``txresult/<hash>`` entry ``{"height", "code", "message"}`` (code ``"ok"`` on
success). A ``bad_nonce`` outcome never overwrites an existing txresult: the replay of an
executed tx must not hide the outcome of its first execution.

Periodic work happens at the start of a block, before its txs: if the block time reached one or
more billing boundaries since the last billing, contracts are billed once up to the latest such
boundary (prorated by elapsed time, so skipped boundaries are paid too); same for minting.

Billing a live contract at boundary ``B``: ``owed = accrued + rate x (B - billed_until_ms) /
billing_period_ms`` (``rate`` from the reserved resources and the prices; ``accrued`` holds what
was run up at the old size before a ``contract_update``). If the owner's balance covers it, the
owner pays the farm owner (``burn_percent`` of it burned) and a contract in grace is restored
to the state it had; if not, a contract enters ``grace`` with ``grace_since_ms = B`` and the debt
is kept in ``accrued``; a contract already in grace for ``grace_period_ms`` or more is cancelled
(its debt forgiven, its resources released). ``contract_cancel`` settles what is owed up to the
block time as far as the owner's balance allows.

Minting at boundary ``B``: a node up at ``B`` (last report within ``uptime_down_after_ms``) is
credited the time since its last counted report; uptime between two reports is credited when the
gap is at most ``uptime_down_after_ms``. Each node's farm owner receives ``(cores x mint_per_core
+ GiB memory x mint_per_gib_memory + GiB storage x mint_per_gib_storage) x uptime_ms /
minting_period_ms``; the node's period uptime is then reset.

Contract states (transitions; anything else is refused with ``bad_state``)::

    created  --all workloads ok-->  deployed      created/deployed/error --any error--> error
    deployed/error --update--> created            created/deployed/error --unpaid--> grace
    grace --paid at a boundary--> (state before grace)   grace --grace period over--> cancelled
    created/deployed/error/grace --owner cancels--> cancelled   (terminal)

Entries (key from :mod:`ledger.keyspace` -> canonical msgpack map)
-------------------------------------------------------------------
- ``account(addr)``: {"balance": int, "nonce": int}
- ``twin(id)``: {"id", "name", "public_key": bytes, "endpoint": str, "db_head": bytes|None,
  "created_ms"}
- ``twin_by_name(name)``, ``twin_by_key(pk)``: {"twin": id}
- ``farm(id)``: {"id", "owner": twin id, "name", "country", "pricing_policy", "created_ms"}
- ``node(id)``: {"id", "farm", "public_key", "capacity": {"cores","memory","storage"},
  "used": {"cores","memory","storage"} (reserved by live contracts), "location": {"country",
  "city"}, "endpoint", "status": "up"|"down" (as of its last report or minting boundary; use
  :func:`node_status` with a header time), "last_uptime_ms" (block time of the last report, 0 if
  none), "reported_time_ms" (the node's own time in it), "uptime_ms" (credited this minting
  period), "uptime_counted_ms", "created_ms", "updated_ms"}
- ``node_by_key(pk)``: {"node": id}
- ``node_contracts(node id)``: {"contracts": [live contract ids, ascending]}
- ``contract(id)``: {"id", "owner": twin id, "owner_key": bytes, "node", "farm", "kind",
  "deployment": map, "deployment_hash": bytes, "signature": bytes, "version": int (1, +1 per
  update), "resources": {"cpu","memory","disk"}, "state", "resume_state": str|None,
  "grace_since_ms" (0 when not in grace), "billed_until_ms", "accrued", "paid" (total paid),
  "results": [{"name","state","message","endpoint"}] (sorted by name), "created_ms",
  "updated_ms"}
- ``tx_result(hash)``: {"height", "code", "message"}
- ``counters()``: {"next_twin_id", "next_farm_id", "next_node_id", "next_contract_id",
  "burned", "minted", "supply", "genesis_supply", "last_billing_ms", "last_minting_ms"}
- ``params()``: {param name: value} as resolved at genesis

Transaction bodies (``Tx.body``; unknown fields are refused with ``bad_body``)
-----------------------------------------------------------------------------
- ``transfer``: {"to": bytes(32), "amount": int > 0}
- ``twin_register``: {"name": str, "endpoint": str ("" or "host:port")}; names are 2-32 chars of
  ``a-z 0-9 - _`` starting with a letter or digit; one twin per key
- ``twin_update``: {"endpoint"?: str, "db_head"?: bytes (<= 1024) | None}; at least one
- ``farm_create``: {"name": str, "country": str (2 upper-case letters), "pricing_policy"?: int
  (default 1; only 1 exists)}; sender must own a twin
- ``node_register`` (sender = the node key): {"farm_id": int, "capacity": {"cores": int,
  "memory": int, "storage": int}, "location": {"country": str, "city": str}, "endpoint": str}
- ``node_update`` (node key): {"capacity"?, "location"?, "endpoint"?}; at least one; capacity
  below what live contracts reserve is refused (``below_reserved``)
- ``uptime_report`` (node key): {"time_ms": int}
- ``contract_create``: {"node_id": int, "kind": "deployment"|"namespace", "deployment": map,
  "deployment_hash": bytes(32), "signature": bytes(64)}; sender must own a twin. A deployment
  is {"name": str, "workloads": [{"name": str, "kind": "container"|"namespace", "cpu": int,
  "memory": int, "disk": int, ...other fields opaque to the ledger}], ...} (1-64 workloads,
  unique names; a "namespace" contract holds only namespace workloads).
  ``deployment_hash = deployment_hash(deployment)``, ``signature`` by the sender over
  :func:`deployment_sign_bytes` (see :func:`sign_deployment`).
- ``contract_update`` (owner): {"contract_id": int, "deployment", "deployment_hash",
  "signature"}; results are reset, version + 1, state -> created
- ``contract_cancel`` (owner): {"contract_id": int}
- ``contract_result`` (the contract's node key): {"contract_id": int, "version": int (must be the
  contract's version), "workloads": [{"name": str, "state": "ok"|"error"|"deleted",
  "message": str (<= 1024), "endpoint": str (<= 256)}]} (1-64, merged by name)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from ledger import keys, keyspace
from ledger.codec import HASH_SIZE, hash_bytes, hash_value, pack, signing_bytes, unpack
from ledger.errors import ConfigError, InvalidTx, LocalProtocolError, MalformedFrame
from ledger.smt import SMT, Proof
from ledger.tx import MAX_TX_SIZE, Tx, VerifiedTxs, decode_verified
from ledger.types import Genesis

GIB = 1 << 30
MAX_UINT = 2**63 - 1  # every integer field of a body is below this (msgpack-safe sums)
DOMAIN_DEPLOYMENT = "tfgrid/deployment/v1"

PARAM_DEFAULTS: dict[str, int] = {
    "min_fee": 10_000,
    "billing_period_ms": 3_600_000,
    "grace_period_ms": 1_209_600_000,
    "minting_period_ms": 86_400_000,
    "price_per_core": 1_000_000,
    "price_per_gib_memory": 500_000,
    "price_per_gib_storage": 10_000,
    "burn_percent": 35,
    "mint_per_core": 10_000_000,
    "mint_per_gib_memory": 2_000_000,
    "mint_per_gib_storage": 100_000,
    "max_clock_drift_ms": 60_000,
    "uptime_down_after_ms": 3_600_000,
    "max_deployment_size": 16_384,
}

CONTRACT_KINDS = ("deployment", "namespace")
WORKLOAD_KINDS = ("container", "namespace")
RESULT_STATES = ("ok", "error", "deleted")
CONTRACT_STATES = ("created", "deployed", "error", "grace", "cancelled")
PRICING_POLICIES = (1,)
MAX_WORKLOADS = 64
MAX_MESSAGE = 1024
MAX_ENDPOINT = 256
MAX_DB_HEAD = 1024

_TWIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{1,31}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,63}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


@dataclass(frozen=True, slots=True)
class Params:
    """The resolved genesis parameters (see the module docstring)."""

    min_fee: int
    billing_period_ms: int
    grace_period_ms: int
    minting_period_ms: int
    price_per_core: int
    price_per_gib_memory: int
    price_per_gib_storage: int
    burn_percent: int
    mint_per_core: int
    mint_per_gib_memory: int
    mint_per_gib_storage: int
    max_clock_drift_ms: int
    uptime_down_after_ms: int
    max_deployment_size: int

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> Params:
        """Raises :class:`ConfigError` if a parameter is out of range."""
        values = {name: genesis.param(name, default) for name, default in PARAM_DEFAULTS.items()}
        for name, v in values.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_UINT:
                raise ConfigError(f"genesis parameter {name} must be a non-negative integer")
        for name in ("billing_period_ms", "minting_period_ms", "max_deployment_size"):
            if values[name] <= 0:
                raise ConfigError(f"genesis parameter {name} must be positive")
        if values["burn_percent"] > 100:
            raise ConfigError("genesis parameter burn_percent must be at most 100")
        return cls(**values)

    def to_map(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class TxOutcome:
    """What happened to one tx of a block: code ``"ok"`` or an :class:`InvalidTx` code."""

    tx_hash: bytes
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BlockResult:
    state: LedgerState
    outcomes: list[TxOutcome]
    changes: dict[bytes, bytes | None]  # only keys whose value actually changed


# ---------------------------------------------------------------------------------------------
# Helpers for clients: deployment signatures, node status, entry decoding, spend.


def deployment_hash(deployment: Mapping[str, Any]) -> bytes:
    """BLAKE2b-256 of the canonical deployment."""
    return hash_value(dict(deployment))


def deployment_sign_bytes(chain_id: str, dep_hash: bytes) -> bytes:
    """The bytes a contract owner signs for a deployment."""
    return signing_bytes(DOMAIN_DEPLOYMENT, chain_id, dep_hash)


def sign_deployment(key: keys.KeyPair, chain_id: str,
                    deployment: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """``(deployment_hash, signature)`` for a contract_create/contract_update body."""
    h = deployment_hash(deployment)
    return h, key.sign(deployment_sign_bytes(chain_id, h))


def verify_deployment(owner_key: bytes, chain_id: str, deployment: Mapping[str, Any],
                      dep_hash: bytes, signature: bytes) -> None:
    """Check a deployment against its hash and its owner's signature.

    Raises :class:`InvalidTx` ``bad_deployment_hash`` or ``bad_deployment_signature``.
    """
    if deployment_hash(deployment) != dep_hash:
        raise InvalidTx("bad_deployment_hash", "deployment_hash is not the hash of deployment")
    if not keys.is_valid(owner_key, deployment_sign_bytes(chain_id, dep_hash), signature):
        raise InvalidTx("bad_deployment_signature",
                        "deployment signature does not verify with the owner's key")


def node_status(node: Mapping[str, Any], now_ms: int, uptime_down_after_ms: int) -> str:
    """``"up"`` if the node reported uptime within ``uptime_down_after_ms`` of ``now_ms``."""
    last = int(node.get("last_uptime_ms", 0))
    return "up" if last > 0 and now_ms - last <= uptime_down_after_ms else "down"


def max_spend(tx: Tx) -> int:
    """The most a tx can take from its sender's balance when it is applied (fee + transfer)."""
    amount = 0
    if tx.type == "transfer":
        a = tx.body.get("amount")
        if isinstance(a, int) and not isinstance(a, bool) and a > 0:
            amount = a
    return tx.fee + amount


_PREFIXES = (b"acct/", b"twin/", b"twinname/", b"twinkey/", b"farm/", b"node/", b"nodekey/",
             b"contract/", b"nodecontracts/", b"txresult/", b"meta/")


def decode_entry(key: bytes, value: bytes) -> dict[str, Any]:
    """The map stored under ``key`` (schemas in the module docstring).

    Raises :class:`MalformedFrame` if the key is not a ledger key or the value not a map.
    """
    if not key.startswith(_PREFIXES):
        raise MalformedFrame(f"not a ledger state key: {key[:32]!r}")
    obj = unpack(value)
    if not isinstance(obj, dict):
        raise MalformedFrame("a ledger entry value must be a map")
    return obj


# ---------------------------------------------------------------------------------------------
# Body schema checks (stateless). Each raises InvalidTx; "bad_body" unless more specific.


def _bad(message: str, code: str = "bad_body") -> InvalidTx:
    return InvalidTx(code, message)


def _fields(body: Any, what: str, required: Iterable[str], optional: Iterable[str] = (),
            *, extra_ok: bool = False) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad(f"{what} must be a map")
    req = tuple(required)
    for name in req:
        if name not in body:
            raise _bad(f"{what}: missing field {name!r}")
    if not extra_ok:
        allowed = set(req) | set(optional)
        for name in sorted(body):
            if name not in allowed:
                raise _bad(f"{what}: unknown field {name!r}")
    return body


def _uint(v: Any, what: str, *, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= MAX_UINT:
        raise _bad(f"{what} must be an integer >= {lo}")
    return v


def _str(v: Any, what: str, max_len: int) -> str:
    if not isinstance(v, str) or len(v) > max_len:
        raise _bad(f"{what} must be a string of at most {max_len} characters")
    return v


def _bytes(v: Any, what: str, size: int) -> bytes:
    if not isinstance(v, bytes) or len(v) != size:
        raise _bad(f"{what} must be {size} bytes")
    return v


def _endpoint(v: Any, what: str) -> str:
    s = _str(v, what, MAX_ENDPOINT)
    if s == "":
        return s
    host, sep, port = s.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(f"{what} {s!r} is not host:port", "bad_endpoint")
    return s


def _country(v: Any, what: str) -> str:
    s = _str(v, what, 2)
    if not _COUNTRY.fullmatch(s):
        raise _bad(f"{what} {s!r} must be two upper-case letters (ISO 3166)", "bad_country")
    return s


def _capacity(v: Any) -> dict[str, int]:
    c = _fields(v, "capacity", ("cores", "memory", "storage"))
    return {k: _uint(c[k], f"capacity.{k}") for k in ("cores", "memory", "storage")}


def _location(v: Any) -> dict[str, str]:
    loc = _fields(v, "location", ("country", "city"))
    return {"country": _country(loc["country"], "location.country"),
            "city": _str(loc["city"], "location.city", 64)}


def _check_deployment(dep: Any, kind: str, params: Params) -> dict[str, int]:
    """Validate a deployment body; returns the resources it reserves."""
    if not isinstance(dep, dict):
        raise _bad("deployment must be a map", "bad_deployment")
    size = len(pack(dep))
    if size > params.max_deployment_size:
        raise _bad(f"deployment is {size} bytes, limit {params.max_deployment_size}",
                   "deployment_too_large")
    try:
        _fields(dep, "deployment", ("name", "workloads"), extra_ok=True)
        name = _str(dep["name"], "deployment.name", 64)
        if not _LABEL.fullmatch(name):
            raise _bad(f"deployment name {name!r} must match {_LABEL.pattern}")
        wls = dep["workloads"]
        if not isinstance(wls, list) or not 1 <= len(wls) <= MAX_WORKLOADS:
            raise _bad(f"deployment.workloads must be a list of 1 to {MAX_WORKLOADS}")
        total = {"cpu": 0, "memory": 0, "disk": 0}
        seen: set[str] = set()
        for i, w in enumerate(wls):
            w = _fields(w, f"workload {i}", ("name", "kind", "cpu", "memory", "disk"),
                        extra_ok=True)
            wname = _str(w["name"], f"workload {i} name", 64)
            if not _LABEL.fullmatch(wname):
                raise _bad(f"workload name {wname!r} must match {_LABEL.pattern}")
            if wname in seen:
                raise _bad(f"workload name {wname!r} appears twice")
            seen.add(wname)
            wkind = w["kind"]
            if wkind not in WORKLOAD_KINDS:
                raise _bad(f"workload {wname!r} kind must be one of {', '.join(WORKLOAD_KINDS)}")
            if kind == "namespace" and wkind != "namespace":
                raise _bad("a namespace contract holds only namespace workloads")
            for r in total:
                total[r] += _uint(w[r], f"workload {wname!r} {r}")
    except InvalidTx as exc:
        if exc.code == "bad_body":
            raise InvalidTx("bad_deployment", exc.message) from None
        raise
    return total


def _check_results(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_WORKLOADS:
        raise _bad(f"workloads must be a list of 1 to {MAX_WORKLOADS} results")
    out: dict[str, dict[str, str]] = {}
    for i, r in enumerate(v):
        r = _fields(r, f"result {i}", ("name", "state", "message", "endpoint"))
        name = _str(r["name"], f"result {i} name", 64)
        if name in out:
            raise _bad(f"result for workload {name!r} appears twice")
        if r["state"] not in RESULT_STATES:
            raise _bad(f"result state must be one of {', '.join(RESULT_STATES)}")
        out[name] = {"name": name, "state": str(r["state"]),
                     "message": _str(r["message"], "result message", MAX_MESSAGE),
                     "endpoint": _str(r["endpoint"], "result endpoint", MAX_ENDPOINT)}
    return [out[k] for k in sorted(out)]


@dataclass(frozen=True, slots=True)
class _Env:
    chain_id: str
    params: Params


def _v_transfer(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "transfer", ("to", "amount"))
    return {"to": _bytes(b["to"], "to", keys.PUBLIC_KEY_SIZE),
            "amount": _uint(b["amount"], "amount", lo=1)}


def _v_twin_register(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "twin_register", ("name", "endpoint"))
    name = _str(b["name"], "name", 32)
    if not _TWIN_NAME.fullmatch(name):
        raise _bad(f"twin name {name!r}: 2-32 of a-z 0-9 - _, starting with a letter or digit",
                   "bad_name")
    return {"name": name, "endpoint": _endpoint(b["endpoint"], "endpoint")}


def _v_twin_update(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "twin_update", (), ("endpoint", "db_head"))
    if not b:
        raise _bad("twin_update needs endpoint or db_head")
    out: dict[str, Any] = {}
    if "endpoint" in b:
        out["endpoint"] = _endpoint(b["endpoint"], "endpoint")
    if "db_head" in b:
        head = b["db_head"]
        if head is not None and (not isinstance(head, bytes) or len(head) > MAX_DB_HEAD):
            raise _bad(f"db_head must be bytes of at most {MAX_DB_HEAD} or None")
        out["db_head"] = head
    return out


def _v_farm_create(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "farm_create", ("name", "country"), ("pricing_policy",))
    name = _str(b["name"], "name", 64)
    if not _FARM_NAME.fullmatch(name):
        raise _bad(f"farm name {name!r} must match {_FARM_NAME.pattern}", "bad_name")
    policy = _uint(b.get("pricing_policy", 1), "pricing_policy")
    if policy not in PRICING_POLICIES:
        raise _bad(f"pricing policy {policy} does not exist", "unknown_pricing_policy")
    return {"name": name, "country": _country(b["country"], "country"),
            "pricing_policy": policy}


def _v_node_register(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "node_register", ("farm_id", "capacity", "location", "endpoint"))
    return {"farm_id": _uint(b["farm_id"], "farm_id", lo=1), "capacity": _capacity(b["capacity"]),
            "location": _location(b["location"]), "endpoint": _endpoint(b["endpoint"], "endpoint")}


def _v_node_update(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "node_update", (), ("capacity", "location", "endpoint"))
    if not b:
        raise _bad("node_update needs capacity, location or endpoint")
    out: dict[str, Any] = {}
    if "capacity" in b:
        out["capacity"] = _capacity(b["capacity"])
    if "location" in b:
        out["location"] = _location(b["location"])
    if "endpoint" in b:
        out["endpoint"] = _endpoint(b["endpoint"], "endpoint")
    return out


def _v_uptime_report(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "uptime_report", ("time_ms",))
    return {"time_ms": _uint(b["time_ms"], "time_ms")}


def _v_deployment_fields(tx: Tx, env: _Env, body: dict[str, Any], kind: str) -> dict[str, Any]:
    resources = _check_deployment(body["deployment"], kind, env.params)
    dep_hash = _bytes(body["deployment_hash"], "deployment_hash", HASH_SIZE)
    sig = _bytes(body["signature"], "signature", keys.SIGNATURE_SIZE)
    verify_deployment(tx.sender, env.chain_id, body["deployment"], dep_hash, sig)
    return {"deployment": body["deployment"], "deployment_hash": dep_hash, "signature": sig,
            "resources": resources}


def _v_contract_create(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "contract_create",
                ("node_id", "kind", "deployment", "deployment_hash", "signature"))
    kind = b["kind"]
    if kind not in CONTRACT_KINDS:
        raise _bad(f"contract kind must be one of {', '.join(CONTRACT_KINDS)}")
    out = _v_deployment_fields(tx, env, b, kind)
    out["node_id"] = _uint(b["node_id"], "node_id", lo=1)
    out["kind"] = kind
    return out


def _v_contract_update(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "contract_update",
                ("contract_id", "deployment", "deployment_hash", "signature"))
    # The kind is the contract's; checked against the deployment at execution.
    out = _v_deployment_fields(tx, env, b, "deployment")
    out["contract_id"] = _uint(b["contract_id"], "contract_id", lo=1)
    return out


def _v_contract_cancel(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "contract_cancel", ("contract_id",))
    return {"contract_id": _uint(b["contract_id"], "contract_id", lo=1)}


def _v_contract_result(tx: Tx, env: _Env) -> dict[str, Any]:
    b = _fields(tx.body, "contract_result", ("contract_id", "version", "workloads"))
    return {"contract_id": _uint(b["contract_id"], "contract_id", lo=1),
            "version": _uint(b["version"], "version", lo=1),
            "workloads": _check_results(b["workloads"])}


# ---------------------------------------------------------------------------------------------
# Execution: an overlay of pending writes over the committed tree.


_ABSENT: Any = object()
_MAX_READS = 8192  # memoized reads per LedgerState


def _copy(value: Any) -> Any:
    """Deep copy of a decoded entry (maps, lists and immutable leaves)."""
    # Only containers recurse: most entries are flat maps of ints and bytes.
    if isinstance(value, dict):
        return {k: _copy(v) if isinstance(v, dict | list) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) if isinstance(v, dict | list) else v for v in value]
    return value


_SCALARS = (int, bytes, str, bool, type(None))


def _pack_entry(value: dict[str, Any]) -> bytes:
    """:func:`ledger.codec.pack` of an entry map, without its canonicalising walk for a flat
    map whose keys are already in order (most entries: accounts, txresults)."""
    prev = ""
    for k, v in value.items():
        if type(k) is not str or k < prev or type(v) not in _SCALARS:
            return pack(value)
        prev = k
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError):
        return pack(value)  # raises EncodingError as it would have


def _decode_stored(key: bytes, raw: bytes) -> dict[str, Any]:
    # Entries were written by this module through codec.pack; msgpack decodes them directly
    # (the untrusted-input float and depth checks of codec.unpack are for peer bytes).
    value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    if not isinstance(value, dict):
        raise MalformedFrame(f"state entry {key!r} is not a map")
    return value


class _Overlay:
    """Pending writes (decoded maps, None = delete) over the committed tree.

    A child overlay is the savepoint of one tx: merged into its parent on success, dropped on
    failure. Writes are encoded once per key, when the block ends. Values handed out are
    copies, so a handler that mutates what it read and then fails leaves nothing behind.
    """

    __slots__ = ("_read", "_parent", "writes")

    def __init__(self, read: Callable[[bytes], bytes | None],
                 parent: _Overlay | None = None) -> None:
        self._read = read
        self._parent = parent
        self.writes: dict[bytes, dict[str, Any] | None] = {}

    def get_map(self, key: bytes) -> dict[str, Any] | None:
        ov: _Overlay | None = self
        while ov is not None:
            found = ov.writes.get(key, _ABSENT)
            if found is not _ABSENT:
                return None if found is None else _copy(found)
            ov = ov._parent
        raw = self._read(key)
        return None if raw is None else _decode_stored(key, raw)

    def child(self) -> _Overlay:
        return _Overlay(self._read, self)

    def merge(self, child: _Overlay) -> None:
        self.writes.update(child.writes)

    def encoded(self) -> dict[bytes, bytes | None]:
        return {k: None if v is None else _pack_entry(v) for k, v in self.writes.items()}

    def owned(self, key: bytes) -> dict[str, Any] | None:
        """The map under ``key`` as a write of this overlay, for the caller to change in place.

        Safe because nothing else holds the maps in ``writes``: :meth:`get_map` hands out
        copies, ``put_map`` stores one, and a merged child is dropped.
        """
        found = self.writes.get(key, _ABSENT)
        if found is _ABSENT:
            found = self.get_map(key)
            if found is None:
                return None
            self.writes[key] = found
        return found  # type: ignore[no-any-return]


class _Exec:
    """One execution context: an overlay plus block height/time and parameters.

    ``check_only`` is set by :meth:`LedgerState.check_tx`, which has no block time: checks that
    need one (clock drift) are left to block execution.
    """

    def __init__(self, ov: _Overlay, env: _Env, height: int, time_ms: int,
                 check_only: bool = False) -> None:
        self.ov = ov
        self.env = env
        self.params = env.params
        self.height = height
        self.time_ms = time_ms
        self.check_only = check_only

    def child(self) -> _Exec:
        return _Exec(self.ov.child(), self.env, self.height, self.time_ms, self.check_only)

    # maps
    def get_map(self, key: bytes) -> dict[str, Any] | None:
        return self.ov.get_map(key)

    def put_map(self, key: bytes, value: Mapping[str, Any]) -> None:
        """Store ``value``; the caller hands it over (re-put it after any further change)."""
        self.ov.writes[key] = dict(value)

    # typed accessors
    def counters(self) -> dict[str, Any]:
        c = self.get_map(keyspace.counters())
        if c is None:
            raise MalformedFrame("state has no counters entry")
        return c

    def bump_counter(self, name: str, delta: int) -> int:
        """Add ``delta`` to a counter and return its previous value."""
        c = self.counters()
        old = int(c[name])
        c[name] = old + delta
        self.put_map(keyspace.counters(), c)
        return old

    def account(self, address: bytes) -> dict[str, Any]:
        return self.get_map(keyspace.account(address)) or {"balance": 0, "nonce": 0}

    def credit(self, address: bytes, amount: int) -> None:
        if amount == 0:
            return
        a = self.account(address)
        a["balance"] = int(a["balance"]) + amount
        if a["balance"] < 0:
            raise MalformedFrame("balance would go negative")  # a bug: callers check first
        self.put_map(keyspace.account(address), a)

    def burn(self, amount: int) -> None:
        if amount:
            c = self.ov.owned(keyspace.counters())  # every tx burns: no copy per tx
            if c is None:
                raise MalformedFrame("state has no counters entry")
            c["burned"] = int(c["burned"]) + amount
            c["supply"] = int(c["supply"]) - amount

    def mint(self, address: bytes, amount: int) -> None:
        if amount:
            self.credit(address, amount)
            c = self.counters()
            c["minted"] = int(c["minted"]) + amount
            c["supply"] = int(c["supply"]) + amount
            self.put_map(keyspace.counters(), c)

    def lookup(self, key: bytes, field: str) -> int | None:
        m = self.get_map(key)
        return None if m is None else int(m[field])

    def sender_twin(self, sender: bytes) -> dict[str, Any]:
        tid = self.lookup(keyspace.twin_by_key(sender), "twin")
        twin = None if tid is None else self.get_map(keyspace.twin(tid))
        if twin is None:
            raise InvalidTx("no_twin", "the sender has no registered twin")
        return twin

    def sender_node(self, sender: bytes) -> dict[str, Any]:
        nid = self.lookup(keyspace.node_by_key(sender), "node")
        node = None if nid is None else self.get_map(keyspace.node(nid))
        if node is None:
            raise InvalidTx("unknown_node", "the sender is not a registered node key")
        return node

    def farm_owner_key(self, farm_id: int) -> bytes:
        farm = self.get_map(keyspace.farm(farm_id))
        twin = None if farm is None else self.get_map(keyspace.twin(int(farm["owner"])))
        if twin is None:
            raise MalformedFrame(f"farm {farm_id} or its owner twin is missing")
        return bytes(twin["public_key"])

    def pay(self, payer: bytes, payee: bytes, amount: int) -> None:
        """Move ``amount`` from payer to payee, burning ``burn_percent`` of it."""
        if amount <= 0:
            return
        self.credit(payer, -amount)
        burned = amount * self.params.burn_percent // 100
        self.credit(payee, amount - burned)
        self.burn(burned)

    def node_contract_ids(self, node_id: int) -> list[int]:
        m = self.get_map(keyspace.node_contracts(node_id))
        return [] if m is None else [int(x) for x in m["contracts"]]

    def set_node_contract_ids(self, node_id: int, ids: list[int]) -> None:
        key = keyspace.node_contracts(node_id)
        if ids:
            self.put_map(key, {"contracts": sorted(ids)})
        else:
            self.ov.writes[key] = None


def _cost(params: Params, res: Mapping[str, Any], elapsed_ms: int) -> int:
    """Price of ``res`` (cpu cores, memory and disk bytes) held for ``elapsed_ms``."""
    if elapsed_ms <= 0:
        return 0
    per_period_gib = (int(res["cpu"]) * params.price_per_core * GIB
                      + int(res["memory"]) * params.price_per_gib_memory
                      + int(res["disk"]) * params.price_per_gib_storage)
    return per_period_gib * elapsed_ms // (GIB * params.billing_period_ms)


def _owed(params: Params, c: Mapping[str, Any], until_ms: int) -> int:
    return int(c["accrued"]) + _cost(params, c["resources"], until_ms - int(c["billed_until_ms"]))


def _fits(node: Mapping[str, Any], extra: Mapping[str, int], freed: Mapping[str, int]) -> bool:
    cap, used = node["capacity"], node["used"]
    return all(int(used[n]) - int(freed[r]) + int(extra[r]) <= int(cap[n])
               for n, r in (("cores", "cpu"), ("memory", "memory"), ("storage", "disk")))


def _reserve(node: dict[str, Any], res: Mapping[str, Any], sign: int) -> None:
    used = dict(node["used"])
    for n, r in (("cores", "cpu"), ("memory", "memory"), ("storage", "disk")):
        used[n] = int(used[n]) + sign * int(res[r])
    node["used"] = used


_ZERO_RES = {"cpu": 0, "memory": 0, "disk": 0}


def _derive_state(c: Mapping[str, Any]) -> str:
    """created / deployed / error from the node's results for the current deployment."""
    results = {r["name"]: r["state"] for r in c["results"]}
    if "error" in results.values():
        return "error"
    names = [w["name"] for w in c["deployment"]["workloads"]]
    if names and all(results.get(n) == "ok" for n in names):
        return "deployed"
    return "created"


def _release(ex: _Exec, c: dict[str, Any]) -> None:
    """Cancel a contract: free its node resources and drop it from the node's list."""
    nid = int(c["node"])
    node = ex.get_map(keyspace.node(nid))
    if node is not None:
        _reserve(node, c["resources"], -1)
        ex.put_map(keyspace.node(nid), node)
    ex.set_node_contract_ids(nid, [i for i in ex.node_contract_ids(nid) if i != int(c["id"])])
    c["state"] = "cancelled"
    c["resume_state"] = None
    c["grace_since_ms"] = 0
    c["updated_ms"] = ex.time_ms


# ---------------------------------------------------------------------------------------------
# Tx execution (stateful). Each runs in a savepoint; raising InvalidTx discards its writes.


def _x_transfer(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    a = ex.account(tx.sender)
    if int(a["balance"]) < b["amount"]:
        raise InvalidTx("insufficient_funds",
                        f"balance {a['balance']} is below the amount {b['amount']}")
    a["balance"] = int(a["balance"]) - b["amount"]  # what credit(sender, -amount) would do
    ex.put_map(keyspace.account(tx.sender), a)
    ex.credit(b["to"], b["amount"])


def _x_twin_register(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    if ex.get_map(keyspace.twin_by_key(tx.sender)) is not None:
        raise InvalidTx("twin_exists", "this key already has a twin")
    if ex.get_map(keyspace.twin_by_name(b["name"])) is not None:
        raise InvalidTx("name_taken", f"twin name {b['name']!r} is taken")
    tid = ex.bump_counter("next_twin_id", 1)
    ex.put_map(keyspace.twin(tid), {
        "id": tid, "name": b["name"], "public_key": tx.sender, "endpoint": b["endpoint"],
        "db_head": None, "created_ms": ex.time_ms})
    ex.put_map(keyspace.twin_by_name(b["name"]), {"twin": tid})
    ex.put_map(keyspace.twin_by_key(tx.sender), {"twin": tid})


def _x_twin_update(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    twin = ex.sender_twin(tx.sender)
    twin.update(b)
    ex.put_map(keyspace.twin(int(twin["id"])), twin)


def _x_farm_create(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    twin = ex.sender_twin(tx.sender)
    fid = ex.bump_counter("next_farm_id", 1)
    ex.put_map(keyspace.farm(fid), {
        "id": fid, "owner": int(twin["id"]), "name": b["name"], "country": b["country"],
        "pricing_policy": b["pricing_policy"], "created_ms": ex.time_ms})


def _x_node_register(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    if ex.get_map(keyspace.node_by_key(tx.sender)) is not None:
        raise InvalidTx("node_exists", "this key is already a registered node")
    if ex.get_map(keyspace.farm(b["farm_id"])) is None:
        raise InvalidTx("unknown_farm", f"farm {b['farm_id']} does not exist")
    nid = ex.bump_counter("next_node_id", 1)
    ex.put_map(keyspace.node(nid), {
        "id": nid, "farm": b["farm_id"], "public_key": tx.sender, "capacity": b["capacity"],
        "used": {"cores": 0, "memory": 0, "storage": 0}, "location": b["location"],
        "endpoint": b["endpoint"], "status": "down", "last_uptime_ms": 0,
        "reported_time_ms": 0, "uptime_ms": 0, "uptime_counted_ms": 0,
        "created_ms": ex.time_ms, "updated_ms": ex.time_ms})
    ex.put_map(keyspace.node_by_key(tx.sender), {"node": nid})


def _x_node_update(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    node = ex.sender_node(tx.sender)
    if "capacity" in b:
        cap, used = b["capacity"], node["used"]
        for n in ("cores", "memory", "storage"):
            if cap[n] < int(used[n]):
                raise InvalidTx("below_reserved",
                                f"capacity {n} {cap[n]} is below the {used[n]} reserved "
                                "by live contracts")
    node.update(b)
    node["updated_ms"] = ex.time_ms
    ex.put_map(keyspace.node(int(node["id"])), node)


def _x_uptime_report(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    node = ex.sender_node(tx.sender)
    now = ex.time_ms
    drift = abs(b["time_ms"] - now)
    if not ex.check_only and drift > ex.params.max_clock_drift_ms:
        raise InvalidTx("clock_drift", f"report time is {drift} ms from block time, "
                        f"limit {ex.params.max_clock_drift_ms}")
    last = int(node["last_uptime_ms"])
    counted = int(node["uptime_counted_ms"])
    if last > 0 and now - last <= ex.params.uptime_down_after_ms:
        node["uptime_ms"] = int(node["uptime_ms"]) + max(0, now - max(counted, last))
    node["uptime_counted_ms"] = max(now, counted)
    node["last_uptime_ms"] = now
    node["reported_time_ms"] = b["time_ms"]
    node["status"] = "up"
    ex.put_map(keyspace.node(int(node["id"])), node)


def _x_contract_create(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    twin = ex.sender_twin(tx.sender)
    nid = b["node_id"]
    node = ex.get_map(keyspace.node(nid))
    if node is None:
        raise InvalidTx("unknown_node", f"node {nid} does not exist")
    if not _fits(node, b["resources"], _ZERO_RES):
        raise InvalidTx("overbooked", f"node {nid} lacks free capacity for this deployment")
    _reserve(node, b["resources"], +1)
    ex.put_map(keyspace.node(nid), node)
    cid = ex.bump_counter("next_contract_id", 1)
    ex.put_map(keyspace.contract(cid), {
        "id": cid, "owner": int(twin["id"]), "owner_key": tx.sender, "node": nid,
        "farm": int(node["farm"]), "kind": b["kind"], "deployment": b["deployment"],
        "deployment_hash": b["deployment_hash"], "signature": b["signature"], "version": 1,
        "resources": b["resources"], "state": "created", "resume_state": None,
        "grace_since_ms": 0, "billed_until_ms": ex.time_ms, "accrued": 0, "paid": 0,
        "results": [], "created_ms": ex.time_ms, "updated_ms": ex.time_ms})
    ex.set_node_contract_ids(nid, [*ex.node_contract_ids(nid), cid])


def _owned_contract(ex: _Exec, tx: Tx, cid: int) -> dict[str, Any]:
    c = ex.get_map(keyspace.contract(cid))
    if c is None:
        raise InvalidTx("unknown_contract", f"contract {cid} does not exist")
    if bytes(c["owner_key"]) != tx.sender:
        raise InvalidTx("not_owner", f"contract {cid} belongs to another twin")
    if c["state"] == "cancelled":
        raise InvalidTx("bad_state", f"contract {cid} is cancelled")
    return c


def _x_contract_update(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    c = _owned_contract(ex, tx, b["contract_id"])
    if c["kind"] == "namespace":
        _check_deployment(b["deployment"], "namespace", ex.params)
    nid = int(c["node"])
    node = ex.get_map(keyspace.node(nid))
    if node is None:
        raise MalformedFrame(f"node {nid} of contract {c['id']} is missing")
    if not _fits(node, b["resources"], c["resources"]):
        raise InvalidTx("overbooked", f"node {nid} lacks free capacity for this deployment")
    _reserve(node, c["resources"], -1)
    _reserve(node, b["resources"], +1)
    ex.put_map(keyspace.node(nid), node)
    # What the old size ran up until now is kept, so billing stays exact across the change.
    c["accrued"] = _owed(ex.params, c, ex.time_ms)
    c["billed_until_ms"] = max(ex.time_ms, int(c["billed_until_ms"]))
    c.update(deployment=b["deployment"], deployment_hash=b["deployment_hash"],
             signature=b["signature"], resources=b["resources"], results=[],
             version=int(c["version"]) + 1, updated_ms=ex.time_ms)
    if c["state"] == "grace":
        c["resume_state"] = "created"
    else:
        c["state"] = "created"
    ex.put_map(keyspace.contract(int(c["id"])), c)


def _x_contract_cancel(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    c = _owned_contract(ex, tx, b["contract_id"])
    owed = _owed(ex.params, c, ex.time_ms)
    payable = min(owed, int(ex.account(tx.sender)["balance"]))
    ex.pay(tx.sender, ex.farm_owner_key(int(c["farm"])), payable)
    c["paid"] = int(c["paid"]) + payable
    c["accrued"] = 0
    c["billed_until_ms"] = max(ex.time_ms, int(c["billed_until_ms"]))
    _release(ex, c)
    ex.put_map(keyspace.contract(int(c["id"])), c)


def _x_contract_result(ex: _Exec, tx: Tx, b: dict[str, Any]) -> None:
    cid = b["contract_id"]
    c = ex.get_map(keyspace.contract(cid))
    if c is None:
        raise InvalidTx("unknown_contract", f"contract {cid} does not exist")
    node = ex.get_map(keyspace.node(int(c["node"])))
    if node is None or bytes(node["public_key"]) != tx.sender:
        raise InvalidTx("not_node", f"only node {c['node']} reports results of contract {cid}")
    if b["version"] != int(c["version"]):
        raise InvalidTx("stale_result", f"contract {cid} is at version {c['version']}, "
                        f"not {b['version']}")
    names = {w["name"] for w in c["deployment"]["workloads"]}
    merged = {r["name"]: r for r in c["results"]}
    for r in b["workloads"]:
        if r["name"] not in names:
            raise InvalidTx("unknown_workload",
                            f"contract {cid} has no workload {r['name']!r}")
        merged[r["name"]] = r
    c["results"] = [merged[k] for k in sorted(merged)]
    c["updated_ms"] = ex.time_ms
    if c["state"] == "grace":
        c["resume_state"] = _derive_state(c)
    elif c["state"] != "cancelled":
        c["state"] = _derive_state(c)
    ex.put_map(keyspace.contract(cid), c)


_Validator = Callable[[Tx, _Env], dict[str, Any]]
_Executor = Callable[[_Exec, Tx, dict[str, Any]], None]

_HANDLERS: dict[str, tuple[_Validator, _Executor]] = {
    "transfer": (_v_transfer, _x_transfer),
    "twin_register": (_v_twin_register, _x_twin_register),
    "twin_update": (_v_twin_update, _x_twin_update),
    "farm_create": (_v_farm_create, _x_farm_create),
    "node_register": (_v_node_register, _x_node_register),
    "node_update": (_v_node_update, _x_node_update),
    "uptime_report": (_v_uptime_report, _x_uptime_report),
    "contract_create": (_v_contract_create, _x_contract_create),
    "contract_update": (_v_contract_update, _x_contract_update),
    "contract_cancel": (_v_contract_cancel, _x_contract_cancel),
    "contract_result": (_v_contract_result, _x_contract_result),
}
TX_TYPES: tuple[str, ...] = tuple(_HANDLERS)
# Types whose execution cannot fail once check_tx's balance check (fee + max_spend) passed: a
# transfer only needs the sender's balance to cover the amount after the fee. check_tx skips
# executing them (the mempool rechecks every sender's next tx after each block).
_SPEND_CHECK_SUFFICES = frozenset({"transfer"})


def _run_body(ex: _Exec, tx: Tx) -> None:
    handler = _HANDLERS.get(tx.type)
    if handler is None:
        raise InvalidTx("unknown_type", f"unknown transaction type {tx.type!r}")
    validate, execute = handler
    execute(ex, tx, validate(tx, ex.env))


# ---------------------------------------------------------------------------------------------
# Periodic work: billing and minting, at block-time boundaries.


def _live_contract_ids(ex: _Exec) -> list[int]:
    ids: list[int] = []
    for nid in range(1, int(ex.counters()["next_node_id"])):
        ids.extend(ex.node_contract_ids(nid))
    return sorted(ids)


def _bill(ex: _Exec, boundary: int) -> None:
    p = ex.params
    for cid in _live_contract_ids(ex):
        key = keyspace.contract(cid)
        c = ex.get_map(key)
        if c is None:
            raise MalformedFrame(f"live contract {cid} is missing")
        owner = bytes(c["owner_key"])
        owed = _owed(p, c, boundary)
        if int(ex.account(owner)["balance"]) >= owed:
            ex.pay(owner, ex.farm_owner_key(int(c["farm"])), owed)
            c["paid"] = int(c["paid"]) + owed
            c["accrued"] = 0
            if c["state"] == "grace":
                c["state"] = c["resume_state"] or "created"
                c["resume_state"] = None
                c["grace_since_ms"] = 0
                c["updated_ms"] = boundary
        elif c["state"] == "grace":
            c["accrued"] = owed
            if boundary - int(c["grace_since_ms"]) >= p.grace_period_ms:
                c["accrued"] = 0  # debt forgiven: the owner could not pay it
                _release(ex, c)
                c["updated_ms"] = boundary
        else:
            c["accrued"] = owed
            c["resume_state"] = c["state"]
            c["state"] = "grace"
            c["grace_since_ms"] = boundary
            c["updated_ms"] = boundary
        c["billed_until_ms"] = max(boundary, int(c["billed_until_ms"]))
        ex.put_map(key, c)


def _mint(ex: _Exec, boundary: int) -> None:
    p = ex.params
    for nid in range(1, int(ex.counters()["next_node_id"])):
        key = keyspace.node(nid)
        node = ex.get_map(key)
        if node is None:
            raise MalformedFrame(f"node {nid} is missing")
        before = dict(node)
        uptime = int(node["uptime_ms"])
        if node_status(node, boundary, p.uptime_down_after_ms) == "up":
            counted = int(node["uptime_counted_ms"])
            uptime += max(0, boundary - counted)
            node["uptime_counted_ms"] = max(boundary, counted)
            node["status"] = "up"
        else:
            node["status"] = "down"
        cap = node["capacity"]
        weight = (int(cap["cores"]) * p.mint_per_core * GIB
                  + int(cap["memory"]) * p.mint_per_gib_memory
                  + int(cap["storage"]) * p.mint_per_gib_storage)
        reward = weight * uptime // (GIB * p.minting_period_ms)
        if reward > 0:
            ex.mint(ex.farm_owner_key(int(node["farm"])), reward)
        node["uptime_ms"] = 0
        if node != before:
            ex.put_map(key, node)


def _periodic(ex: _Exec) -> None:
    p = ex.params
    c = ex.counters()
    last_b, last_m = int(c["last_billing_ms"]), int(c["last_minting_ms"])
    if ex.time_ms - last_b >= p.billing_period_ms:
        boundary = last_b + (ex.time_ms - last_b) // p.billing_period_ms * p.billing_period_ms
        _bill(ex, boundary)
        c = ex.counters()
        c["last_billing_ms"] = boundary
        ex.put_map(keyspace.counters(), c)
    if ex.time_ms - last_m >= p.minting_period_ms:
        boundary = last_m + (ex.time_ms - last_m) // p.minting_period_ms * p.minting_period_ms
        _mint(ex, boundary)
        c = ex.counters()
        c["last_minting_ms"] = boundary
        ex.put_map(keyspace.counters(), c)


# ---------------------------------------------------------------------------------------------


class LedgerState:
    """The immutable ledger state after some block: an SMT of entries plus the genesis."""

    __slots__ = ("genesis", "params", "tree", "_env", "_reads")

    def __init__(self, genesis: Genesis, tree: SMT, params: Params | None = None) -> None:
        self.genesis = genesis
        self.params = params if params is not None else Params.from_genesis(genesis)
        self.tree = tree
        self._env = _Env(genesis.chain_id, self.params)
        # Memo of tree reads (the tree is immutable): admitting a tx reads the sender's and
        # the recipient's accounts and the counters, and so do the sender's next txs.
        self._reads: dict[bytes, bytes | None] = {}

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> LedgerState:
        """The state before block 1. Raises :class:`ConfigError` on a bad genesis."""
        params = Params.from_genesis(genesis)
        seen: set[bytes] = set()
        items: dict[bytes, bytes] = {}
        supply = 0
        for address, balance in genesis.accounts:
            if address in seen:
                raise ConfigError(f"genesis lists account {address.hex()} twice")
            if not 0 <= balance <= MAX_UINT:
                raise ConfigError("genesis balance out of range")
            seen.add(address)
            supply += balance
            items[keyspace.account(address)] = pack({"balance": balance, "nonce": 0})
        if supply > MAX_UINT:
            raise ConfigError("genesis supply out of range")
        t = genesis.genesis_time_ms
        items[keyspace.counters()] = pack({
            "next_twin_id": 1, "next_farm_id": 1, "next_node_id": 1, "next_contract_id": 1,
            "burned": 0, "minted": 0, "supply": supply, "genesis_supply": supply,
            "last_billing_ms": t, "last_minting_ms": t})
        items[keyspace.params()] = pack(params.to_map())
        return cls(genesis, SMT.from_items(items.items()), params)

    @classmethod
    def from_items(cls, genesis: Genesis, items: Iterable[tuple[bytes, bytes]]) -> LedgerState:
        """Reload a state saved by the store (its entries after the last block)."""
        return cls(genesis, SMT.from_items(items))

    @property
    def root(self) -> bytes:
        return self.tree.root

    def get(self, key: bytes) -> bytes | None:
        value = self._reads.get(key, _ABSENT)
        if value is _ABSENT:
            value = self.tree.get(key)
            if len(self._reads) >= _MAX_READS:
                self._reads.clear()
            self._reads[key] = value
        return value  # type: ignore[no-any-return]

    def get_entry(self, key: bytes) -> dict[str, Any] | None:
        """The decoded map under ``key``, or None."""
        raw = self.get(key)
        # Our own entries: decoded as block execution reads them, without the checks that
        # decode_entry makes on bytes from a peer.
        return None if raw is None else _decode_stored(key, raw)

    def prove(self, key: bytes) -> Proof:
        return self.tree.prove(key)

    def next_nonce(self, address: bytes) -> int:
        a = self.get_entry(keyspace.account(address))
        return 0 if a is None else int(a["nonce"])

    def balance(self, address: bytes) -> int:
        a = self.get_entry(keyspace.account(address))
        return 0 if a is None else int(a["balance"])

    def nonce_and_balance(self, address: bytes) -> tuple[int, int]:
        """:meth:`next_nonce` and :meth:`balance` in one read."""
        a = self.get_entry(keyspace.account(address))
        return (0, 0) if a is None else (int(a["nonce"]), int(a["balance"]))

    def counters(self) -> dict[str, Any]:
        c = self.get_entry(keyspace.counters())
        if c is None:
            raise MalformedFrame("state has no counters entry")
        return c

    # -- admission ------------------------------------------------------------------------

    def check_tx(self, tx: Tx, *, expected_nonce: int | None = None,
                 verify_signature: bool = True, encoded_size: int | None = None) -> None:
        """Decide whether ``tx`` may enter the mempool. Raises :class:`InvalidTx`.

        Checks size, signature (against the genesis chain id), type, fee, body schema, nonce
        (``expected_nonce`` overrides the committed next nonce, for txs queued behind the
        sender's pending ones) and that the balance covers fee + transfer amount. When the tx
        is the sender's next one in committed state it is also executed against that state
        (so ``name_taken``, ``overbooked``, ``no_twin``... are refused at submission); a tx
        queued behind pending ones could depend on them, so it gets only the stateless checks.
        ``verify_signature=False`` is for rechecking bytes already verified;
        ``encoded_size`` is ``len(tx.encode())`` when the caller has the bytes at hand.
        """
        size = len(tx.encode()) if encoded_size is None else encoded_size
        if size > MAX_TX_SIZE:
            raise InvalidTx("too_large", f"transaction exceeds {MAX_TX_SIZE} bytes")
        if verify_signature:
            tx.verify(self.genesis.chain_id)
        handler = _HANDLERS.get(tx.type)
        if handler is None:
            raise InvalidTx("unknown_type", f"unknown transaction type {tx.type!r}")
        if tx.fee < self.params.min_fee:
            raise InvalidTx("fee_too_low", f"fee {tx.fee} is below the minimum {self.params.min_fee}")
        validate, execute = handler
        body = validate(tx, self._env)
        account = self.get_entry(keyspace.account(tx.sender))
        committed = 0 if account is None else int(account["nonce"])
        want = committed if expected_nonce is None else expected_nonce
        if tx.nonce != want:
            raise InvalidTx("bad_nonce", f"nonce {tx.nonce} is not the expected {want}")
        spend = max_spend(tx)
        bal = 0 if account is None else int(account["balance"])
        if bal < spend:
            raise InvalidTx("insufficient_funds", f"balance {bal} does not cover {spend}")
        if tx.nonce == committed and tx.type not in _SPEND_CHECK_SUFFICES:
            c = self.counters()
            now = max(int(c["last_billing_ms"]), int(c["last_minting_ms"]))
            ex = _Exec(_Overlay(self.get), self._env, 0, now, check_only=True)
            ex.credit(tx.sender, -tx.fee)
            execute(ex, tx, body)

    # -- execution ------------------------------------------------------------------------

    def apply_block(self, height: int, time_ms: int, txs: Sequence[bytes], *,
                    verified: VerifiedTxs | None = None) -> BlockResult:
        """Apply one block's txs at ``time_ms``; returns the new state, outcomes and changes.

        ``verified`` memoizes decoding and signature checks by tx hash (shared with the
        mempool, which checked most txs already); the result is the same with or without it.
        Never raises for a bad tx (it gets an outcome); raises :class:`MalformedFrame` only if
        this state itself is corrupt, :class:`LocalProtocolError` if ``verified`` is for
        another chain.
        """
        chain_id = self.genesis.chain_id
        if verified is not None and verified.chain_id != chain_id:
            raise LocalProtocolError(f"verified txs of chain {verified.chain_id!r} used with "
                                     f"chain {chain_id!r}")
        ov = _Overlay(self.get)
        ex = _Exec(ov, self._env, height, time_ms)
        _periodic(ex)
        outcomes = [self._apply_tx(ex, raw, verified) for raw in txs]
        changes: dict[bytes, bytes | None] = {}
        for key, value in ov.encoded().items():
            old = self._reads.get(key, _ABSENT)  # not memoized: mostly new txresult keys
            if (self.tree.get(key) if old is _ABSENT else old) != value:
                changes[key] = value
        tree = self.tree.update(changes) if changes else self.tree
        return BlockResult(LedgerState(self.genesis, tree, self.params), outcomes, changes)

    def _apply_tx(self, ex: _Exec, raw: bytes, verified: VerifiedTxs | None) -> TxOutcome:
        tx_hash = hash_bytes(raw)
        try:
            if verified is None:
                tx = decode_verified(raw, self.genesis.chain_id)
            else:
                tx = verified.decode(raw, tx_hash)
            account = ex.account(tx.sender)
            if tx.nonce != int(account["nonce"]):
                raise InvalidTx("bad_nonce", f"nonce {tx.nonce} is not the expected "
                                f"{account['nonce']}")
            if tx.fee < self.params.min_fee:
                raise InvalidTx("fee_too_low",
                                f"fee {tx.fee} is below the minimum {self.params.min_fee}")
            if int(account["balance"]) < tx.fee:
                raise InvalidTx("insufficient_funds",
                                f"balance {account['balance']} does not cover the fee {tx.fee}")
        except InvalidTx as exc:
            return self._record(ex, tx_hash, exc.code, exc.message)
        account["balance"] = int(account["balance"]) - tx.fee
        account["nonce"] = tx.nonce + 1
        ex.put_map(keyspace.account(tx.sender), account)
        ex.burn(tx.fee)
        sub = ex.child()
        try:
            _run_body(sub, tx)
        except InvalidTx as exc:
            return self._record(ex, tx_hash, exc.code, exc.message)
        ex.ov.merge(sub.ov)
        return self._record(ex, tx_hash, "ok", "")

    @staticmethod
    def _record(ex: _Exec, tx_hash: bytes, code: str, message: str) -> TxOutcome:
        key = keyspace.tx_result(tx_hash)
        if not (code == "bad_nonce" and ex.get_map(key) is not None):
            ex.put_map(key, {"code": code, "height": ex.height, "message": message})
        return TxOutcome(tx_hash, code, message)
