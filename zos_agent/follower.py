"""Pull what the ledger wants from this node, and trust none of it without proof.

Two halves:

- :func:`check_contract` (pure, table-tested): a contract entry -> :class:`ContractView`. It
  refuses, with a reason that is reported on the ledger, any contract whose deployment does
  not hash to its ``deployment_hash``, whose signature does not verify with the owner's key,
  whose owner key is not the owner twin's key, or that is assigned to another node; and any
  workload that cannot run here (malformed fields, a secret not sealed to this node).
- :class:`ProvenReader` (trio): reads state entries from the configured peers, each answer
  checked with a Merkle proof against a header the light client verified. A peer whose
  proof fails is lying (or broken): its claim is kept so that the agent can refuse the
  contract and say why, but it is never acted on. A peer that is merely behind (its state
  is older than a header already verified) or unreachable is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

import trio

from ledger import keyspace
from ledger.api import CLIENT_MAX_FRAME
from ledger.client import LedgerClient
from ledger.codec import hash_value, unpack
from ledger.errors import (
    InvalidTx,
    LedgerTimeout,
    LedgerUnavailable,
    MalformedFrame,
    NotFound,
    RemoteProtocolError,
    TfgridError,
    VerificationError,
)
from ledger.keys import KeyPair
from ledger.smt import Proof
from ledger.state import verify_deployment
from ledger.wire import NEED_DATA, FrameDecoder, encode_frame
from zos_agent.errors import InvalidSpec
from zos_agent.namespaces import NamespaceWant, namespace_workload
from zos_agent.oci import ContainerSpec
from zos_agent.reconcile import ContractView, Desired, Result, workload_id
from zos_agent.secrets import SecretError, unseal_secret

log = logging.getLogger("zos_agent.follower")

Peer = tuple[str, int]
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]
RESTART_POLICIES = ("always", "on-failure", "never")


# ---------------------------------------------------------------------------------------------
# pure verification


class Refused(TfgridError):
    """A contract (or one workload of it) must not run here; the message says why."""


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise Refused(why)


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v: Any, what: str) -> list[str]:
    _need(isinstance(v, list) and all(isinstance(x, str) for x in v),
          f"{what} must be a list of strings")
    return list(v)


def _str_map(v: Any, what: str) -> dict[str, Any]:
    _need(isinstance(v, dict) and all(isinstance(k, str) for k in v),
          f"{what} must be a map keyed by name")
    return dict(v)


def container_spec(cid: int, w: Mapping[str, Any], node_key: KeyPair) -> tuple[ContainerSpec,
                                                                              tuple[str, ...]]:
    """The runnable spec and image sources of one container workload of contract ``cid``.

    Raises :class:`Refused` naming the field that is wrong or the secret that does not open.
    """
    name = w.get("name")
    _need(isinstance(name, str), "workload name must be a string")
    image = w.get("image")
    _need(isinstance(image, str), "image must be a string")
    command = _str_list(w.get("command"), "command")
    env = _str_map(w.get("env", {}), "env")
    _need(all(isinstance(v, str) for v in env.values()), "env values must be strings")
    sealed = _str_map(w.get("secret_env", {}), "secret_env")
    secret_env: dict[str, str] = {}
    for var, value in sorted(sealed.items()):
        _need(isinstance(value, bytes), f"secret_env {var} must be a sealed value (bytes)")
        try:
            secret_env[var] = unseal_secret(node_key, value).decode()
        except SecretError as exc:
            raise Refused(f"secret_env {var}: {exc}") from None
        except UnicodeDecodeError:
            raise Refused(f"secret_env {var} is not UTF-8 text") from None
    sources = _str_list(w.get("image_sources", []), "image_sources")
    ports = w.get("ports", [])
    _need(isinstance(ports, list) and all(_is_int(p) for p in ports),
          "ports must be a list of integers")
    restart = w.get("restart", "always")
    _need(restart in RESTART_POLICIES,
          f"restart must be one of {', '.join(RESTART_POLICIES)}")
    for r in ("cpu", "memory", "disk"):
        _need(_is_int(w.get(r)), f"{r} must be an integer")
    try:
        spec = ContainerSpec(workload_id=workload_id(cid, str(name)), image=str(image),
                             command=command, env=env, secret_env=secret_env,
                             cpu=int(w["cpu"]), memory=int(w["memory"]), disk=int(w["disk"]),
                             ports=list(ports), restart=str(restart))
    except InvalidSpec as exc:
        raise Refused(str(exc)) from None
    return spec, tuple(sources)


def _results(entry: Mapping[str, Any]) -> dict[str, Result]:
    out: dict[str, Result] = {}
    raw = entry.get("results", [])
    if not isinstance(raw, list):
        return out
    for r in raw:
        if isinstance(r, dict) and all(isinstance(r.get(k), str)
                                       for k in ("name", "state", "message", "endpoint")):
            out[r["name"]] = Result(r["state"], r["message"], r["endpoint"])
    return out


def workload_names(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """The workload names of a contract entry's deployment (empty if malformed)."""
    dep = entry.get("deployment")
    wls = dep.get("workloads") if isinstance(dep, dict) else None
    if not isinstance(wls, list):
        return ()
    names = [w.get("name") for w in wls if isinstance(w, dict)]
    return tuple(sorted({n for n in names if isinstance(n, str)}))


def refused_view(cid: int, entry: Mapping[str, Any] | None, reason: str) -> ContractView | None:
    """A view that runs nothing and reports ``reason`` for every workload of ``entry``.

    None when the entry is too malformed to name a version and workloads (nothing can be
    reported then; the caller logs it)."""
    if entry is None:
        return None
    version = entry.get("version")
    names = workload_names(entry)
    if not _is_int(version) or version < 1 or not names:
        return None
    return ContractView(contract_id=cid, version=int(version), state="created", names=names,
                        errors={n: reason for n in names}, results=_results(entry))


def check_contract(cid: int, entry: Mapping[str, Any], *, chain_id: str, node_id: int,
                   owner_twin_key: bytes | None, node_key: KeyPair) -> ContractView | None:
    """Verify contract ``cid`` (its decoded, proven entry) and build its view.

    ``owner_twin_key`` is the proven public key of the owner twin (None: no such twin).
    Returns None for an entry too malformed to report on. Never raises.
    """
    state = entry.get("state")
    version = entry.get("version")
    if not isinstance(state, str) or not _is_int(version) or entry.get("id") != cid:
        return None
    names = workload_names(entry)
    results = _results(entry)
    if state == "cancelled":
        return ContractView(contract_id=cid, version=int(version), state=state, names=names,
                            results=results)
    try:
        _need(entry.get("node") == node_id,
              f"contract is assigned to node {entry.get('node')!r}, not this node ({node_id})")
        owner_key = entry.get("owner_key")
        dep, dep_hash, sig = (entry.get("deployment"), entry.get("deployment_hash"),
                              entry.get("signature"))
        if not (isinstance(owner_key, bytes) and isinstance(dep, dict)
                and isinstance(dep_hash, bytes) and isinstance(sig, bytes)):
            raise Refused("contract lacks its owner key, deployment, hash or signature")
        _need(owner_twin_key is not None, f"owner twin {entry.get('owner')!r} does not exist")
        _need(owner_key == owner_twin_key,
              f"contract owner key is not the key of owner twin {entry.get('owner')!r}")
        try:
            verify_deployment(owner_key, chain_id, dep, dep_hash, sig)
        except InvalidTx as exc:
            if exc.code == "bad_deployment_hash":
                raise Refused("deployment does not match the contract's deployment hash") from None
            raise Refused("deployment signature does not verify with the owner's key") from None
        except TfgridError as exc:  # e.g. an unencodable deployment
            raise Refused(f"deployment cannot be verified: {exc}") from None
    except Refused as exc:
        return refused_view(cid, entry, f"refused: {exc}")

    desired: list[Desired] = []
    namespaces: list[NamespaceWant] = []
    errors: dict[str, str] = {}
    workloads = dep.get("workloads")
    for w in workloads if isinstance(workloads, list) else []:
        if not isinstance(w, dict) or not isinstance(w.get("name"), str):
            continue
        wname = str(w["name"])
        if w.get("kind") == "namespace":
            try:
                namespaces.append(namespace_workload(cid, w, owner_key))
            except InvalidSpec as exc:
                errors[wname] = f"refused: {exc}"
            continue
        if w.get("kind") != "container":
            errors[wname] = f"workload kind {w.get('kind')!r} is not supported by this node"
            continue
        try:
            spec, sources = container_spec(cid, w, node_key)
        except Refused as exc:
            errors[wname] = f"refused: {exc}"
            continue
        desired.append(Desired(contract_id=cid, version=int(version), name=wname, spec=spec,
                               image_sources=sources))
    return ContractView(contract_id=cid, version=int(version), state=state, names=names,
                        desired=tuple(desired), errors=errors, results=results,
                        namespaces=tuple(namespaces))


# ---------------------------------------------------------------------------------------------
# proven reads


@dataclass(frozen=True, slots=True)
class Claim:
    """What a peer served for a key without a valid proof."""

    peer: str
    value: bytes | None
    reason: str


class Unverifiable(VerificationError):
    """Peers answered for ``key`` but none with a valid proof (and none verifiably)."""

    def __init__(self, key: bytes, claims: list[Claim]) -> None:
        super().__init__("; ".join(f"{c.peer}: {c.reason}" for c in claims))
        self.key = key
        self.claims = claims


class _Stale(TfgridError):
    """A peer answered from a state older than what we verified: behind, not lying."""


class _PeerConn:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(CLIENT_MAX_FRAME)
        self.next_id = 1

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        await self.stream.send_all(encode_frame({"id": rid, "method": method,
                                                 "params": params}, CLIENT_MAX_FRAME))
        while True:
            msg = self.decoder.next_message()
            if msg is NEED_DATA:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise RemoteProtocolError("peer closed the connection")
                self.decoder.receive_data(bytes(data))
                continue
            if not isinstance(msg, dict) or msg.get("id") != rid:
                raise RemoteProtocolError("unexpected message on a request connection")
            if "error" in msg:
                err = msg["error"]
                code = err.get("code") if isinstance(err, dict) else None
                raise RemoteProtocolError(f"peer refused: {code!r}")
            result = msg.get("result")
            if not isinstance(result, dict):
                raise RemoteProtocolError("result must be a map")
            return result


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class ProvenReader:
    """Reads state entries with proofs, verified against the client's verified headers."""

    def __init__(self, client: LedgerClient, peers: Sequence[Peer], *, timeout_s: float = 5.0,
                 connect: Connector | None = None) -> None:
        self._client = client
        self._peers = list(peers)
        self._timeout_s = timeout_s
        self._connect = connect if connect is not None else _open_tcp
        self._conns: dict[Peer, _PeerConn] = {}
        self._locks = {p: trio.Lock() for p in self._peers}
        self._preferred = 0

    async def aclose(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            await trio.aclose_forcefully(c.stream)

    async def _drop(self, peer: Peer) -> None:
        conn = self._conns.pop(peer, None)
        if conn is not None:
            await trio.aclose_forcefully(conn.stream)

    async def get(self, key: bytes) -> bytes | None:
        """The proven value of ``key`` (None: proven absent) at a peer's latest height.

        Raises :class:`Unverifiable` when every answering peer served a bad proof, and
        :class:`LedgerUnavailable` when no peer gave a usable answer otherwise.
        """
        claims: list[Claim] = []
        reasons: list[str] = []
        n = len(self._peers)
        for i in range(n):
            idx = (self._preferred + i) % n
            peer = self._peers[idx]
            name = f"{peer[0]}:{peer[1]}"
            try:
                value = await self._get_from(peer, key)
            except Unverifiable as exc:
                claims.extend(exc.claims)
                await self._drop(peer)
            except _Stale as exc:
                reasons.append(f"{name}: {exc}")
            except (trio.TooSlowError, OSError, trio.BrokenResourceError,
                    trio.ClosedResourceError, RemoteProtocolError, LedgerTimeout,
                    LedgerUnavailable, NotFound) as exc:
                reasons.append(f"{name}: {exc or exc.__class__.__name__}")
                await self._drop(peer)
            else:
                self._preferred = idx
                return value
        if claims:
            raise Unverifiable(key, claims)
        raise LedgerUnavailable(f"query {key!r}: " + "; ".join(reasons))

    async def _get_from(self, peer: Peer, key: bytes) -> bytes | None:
        name = f"{peer[0]}:{peer[1]}"
        async with self._locks[peer]:
            with trio.fail_after(self._timeout_s):
                conn = self._conns.get(peer)
                if conn is None:
                    conn = _PeerConn(await self._connect(*peer))
                    self._conns[peer] = conn
                try:
                    res = await conn.request("query", {"key": key, "height": 0})
                except MalformedFrame as exc:
                    raise RemoteProtocolError(str(exc)) from None
        height, value = res.get("height"), res.get("value")
        if (not isinstance(height, int) or isinstance(height, bool) or height < 0
                or not (value is None or isinstance(value, bytes))):
            raise RemoteProtocolError("malformed query answer")
        light = self._client.light
        if height < light.height:
            raise _Stale(f"peer is at height {height}, already verified {light.height}")
        try:
            proof = Proof.from_wire(res.get("proof"))
            if height == 0:
                light.verify_genesis_state(key, value, proof)
                return value
            header = light.header(height)
            if header is None:
                header = (await self._client.block(height)).header
            light.verify_state(header, key, value, proof)
        except (VerificationError, MalformedFrame) as exc:
            if isinstance(exc, VerificationError) and light.header(height) is None and height:
                raise _Stale(str(exc)) from None
            raise Unverifiable(key, [Claim(name, value, f"invalid proof: {exc}")]) from None
        return value


def decode(value: bytes) -> dict[str, Any] | None:
    """A ledger entry's map, or None if the bytes are not one."""
    try:
        obj = unpack(value)
    except MalformedFrame:
        return None
    return obj if isinstance(obj, dict) else None


# ---------------------------------------------------------------------------------------------
# the follower


def _held(cid: int) -> ContractView:
    """A contract we cannot read now: leave whatever runs of it alone, report nothing."""
    return ContractView(contract_id=cid, version=1, state="unknown", hold=True)


class Follower:
    """Builds the reconcile inputs for one node from proven ledger state.

    Verified views are cached by (contract, version, deployment hash, signature): a contract
    is checked (and its secrets unsealed) once per deployment, not once per block.
    """

    def __init__(self, reader: ProvenReader, *, chain_id: str, node_key: KeyPair) -> None:
        self._reader = reader
        self._chain_id = chain_id
        self._node_key = node_key
        self._checked: dict[int, tuple[tuple[Any, ...], ContractView | None]] = {}

    async def entry(self, key: bytes) -> dict[str, Any] | None:
        """A proven entry, decoded. Raises like :meth:`ProvenReader.get`."""
        raw = await self._reader.get(key)
        return None if raw is None else decode(raw)

    async def node_id(self) -> int | None:
        e = await self.entry(keyspace.node_by_key(self._node_key.public_key))
        return None if e is None or not _is_int(e.get("node")) else int(e["node"])

    async def live_contract_ids(self, node_id: int) -> list[int]:
        e = await self.entry(keyspace.node_contracts(node_id))
        if e is None:
            return []
        ids = e.get("contracts")
        return [int(i) for i in ids if _is_int(i)] if isinstance(ids, list) else []

    async def views(self, node_id: int, also: set[int]) -> dict[int, ContractView]:
        """Views of the node's live contracts plus the contracts in ``also`` (which still
        have something on this node). A contract that cannot be read right now is held
        (whatever runs of it is left alone: nothing is deleted because a peer is unreachable);
        one served without a valid proof is refused, and held too.

        Raises like :meth:`ProvenReader.get` when the node's contract list cannot be read."""
        live = await self.live_contract_ids(node_id)
        out: dict[int, ContractView] = {}
        wanted = set(live) | also
        for cid in list(self._checked):
            if cid not in wanted:
                del self._checked[cid]
        for cid in sorted(wanted):
            try:
                view = await self._view(cid, node_id, is_live=cid in live)
            except Unverifiable as exc:
                claimed = [decode(c.value) for c in exc.claims if c.value is not None]
                entry = next((e for e in claimed if e is not None), None)
                reason = f"refused: contract {cid} was served without a valid proof ({exc})"
                log.warning("%s", reason)
                refused = refused_view(cid, entry, reason)
                # What already runs of it stays as it is: a lying peer must not be able to
                # make this node delete a workload either.
                view = replace(refused, hold=True) if refused is not None else _held(cid)
            except (LedgerUnavailable, LedgerTimeout) as exc:
                log.info("contract %d not readable now: %s", cid, exc)
                view = _held(cid)
            if view is not None:
                out[cid] = view
        return out

    async def _view(self, cid: int, node_id: int, *, is_live: bool) -> ContractView | None:
        entry = await self.entry(keyspace.contract(cid))
        if entry is None:
            return ContractView(contract_id=cid, version=1, state="missing")
        if not is_live and entry.get("state") != "cancelled":
            # Off this node's list but not cancelled: another node's contract (a stale local
            # container id); nothing of it belongs here.
            return ContractView(contract_id=cid, version=1, state="missing")
        try:
            dep_digest = hash_value(entry.get("deployment"))
        except TfgridError:
            dep_digest = None  # unencodable: never cached, check_contract refuses it
        # Everything check_contract looks at, except the results and the live state.
        cache_key = (entry.get("version"), entry.get("deployment_hash"), entry.get("signature"),
                     dep_digest, entry.get("node"), entry.get("owner"), entry.get("owner_key"),
                     entry.get("state") == "cancelled")
        cached = self._checked.get(cid)
        if cached is not None and cached[0] == cache_key and dep_digest is not None:
            if cached[1] is None:
                return None
            base = cached[1]
        else:
            owner = entry.get("owner")
            twin = await self.entry(keyspace.twin(int(owner))) if _is_int(owner) else None
            twin_key = twin.get("public_key") if twin is not None else None
            made = check_contract(cid, entry, chain_id=self._chain_id, node_id=node_id,
                                  owner_twin_key=twin_key if isinstance(twin_key, bytes) else None,
                                  node_key=self._node_key)
            self._checked[cid] = (cache_key, made)
            if made is None:
                log.warning("contract %d is too malformed to run or report on", cid)
                return None
            base = made
        state = entry.get("state")
        # Fresh state and results each time (they change without a new deployment).
        return replace(base, state=state if isinstance(state, str) else base.state,
                       results=_results(entry))
