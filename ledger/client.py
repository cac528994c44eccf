"""The async light client: talks to any ledger peer of a configured set, trusts none of them.

Every answer is verified by :class:`ledger.light.LightState` before it is returned: blocks and
headers by their commit (more than 2/3 of the pinned genesis validators), state entries by a
Merkle proof against a verified header's state root. A peer that fails, stalls or serves
something unverifiable is set aside for a while (``bad_peer_s``) and the next peer is asked.
Two certified headers at one height raise :class:`ConflictingHeaders`, which is never retried.

Errors raised by the public methods (all :class:`~ledger.errors.TfgridError`; no trio, OS or
msgpack exception leaks out):

- :class:`InvalidTx` when a peer refuses a submitted transaction (``submit``), or when a
  transaction was committed with a failure code (``submit_and_wait``);
- :class:`ConflictingHeaders` when the validator set forked;
- :class:`NotFound` when the peers agree that the requested block does not exist;
- :class:`LedgerTimeout` when no peer answered within ``timeout_s`` each, or ``wait_tx``
  ran out of time;
- :class:`LedgerUnavailable` when every peer failed, with each peer's reason in the message;
- :class:`LocalProtocolError` when the client is used after :meth:`LedgerClient.aclose`.

Wire: framed msgpack (:mod:`ledger.wire`) with the request shapes of :mod:`ledger.api`. One
pooled connection per peer carries requests one at a time; each header subscription has a
connection of its own, since pushes arrive unsolicited.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from ledger import keyspace
from ledger.api import CLIENT_MAX_FRAME
from ledger.codec import unpack
from ledger.errors import (
    ConfigError,
    ConflictingHeaders,
    InvalidTx,
    LedgerTimeout,
    LedgerUnavailable,
    LocalProtocolError,
    MalformedFrame,
    NotFound,
    RemoteProtocolError,
    TfgridError,
    VerificationError,
)
from ledger.light import LightState
from ledger.smt import Proof
from ledger.state import LedgerState, TxOutcome
from ledger.tx import Tx
from ledger.types import Block, Commit, Genesis, Header
from ledger.wire import NEED_DATA, FrameDecoder, encode_frame

T = TypeVar("T")
Peer = tuple[str, int]
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]

_RECEIVE_CHUNK = 64 * 1024
# After a fail-over the subscription fetches at most this many skipped blocks so that the
# caller still sees every height; a longer gap jumps to the new head.
MAX_BACKFILL = 64
MAX_CONNS_PER_PEER = 4
_NOT_FOUND_CODES = frozenset({"not_found"})


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """The chain as last verified through ``peer`` ("host:port")."""

    chain_id: str
    height: int
    block_hash: bytes  # b"" at height 0
    validators: list[bytes]
    peer: str


class _Refused(TfgridError):
    """A peer answered a request with an error response (the connection stays usable)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _peer_name(peer: Peer) -> str:
    return f"{peer[0]}:{peer[1]}"


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise MalformedFrame(what)


def _field_int(result: dict[str, Any], name: str) -> int:
    v = result.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise MalformedFrame(f"result field {name!r} must be a non-negative integer")
    return v


def _parse_block(result: dict[str, Any]) -> tuple[Block, Commit]:
    return Block.from_wire(result.get("block")), Commit.from_wire(result.get("commit"))


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class _Conn:
    """One framed connection to a peer. Requests on it are serialized by a lock."""

    def __init__(self, peer: Peer, stream: trio.abc.Stream) -> None:
        self.peer = peer
        self.stream = stream
        self.broken = False
        self.subscribed = False
        self._decoder = FrameDecoder(CLIENT_MAX_FRAME)
        self._next_id = 1
        self._lock = trio.Lock()
        self._pushes: deque[dict[str, Any]] = deque()

    async def _receive(self) -> dict[str, Any]:
        while True:
            msg = self._decoder.next_message()
            if msg is not NEED_DATA:
                _need(isinstance(msg, dict), "a message must be a map")
                return dict(msg)
            data = await self.stream.receive_some(_RECEIVE_CHUNK)
            if not data:
                raise RemoteProtocolError("peer closed the connection")
            self._decoder.receive_data(bytes(data))

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its ``result`` map.

        Raises :class:`_Refused` for an error response; anything else that goes wrong
        (including cancellation mid-request) leaves the connection marked broken.
        """
        async with self._lock:
            if self.broken:
                raise RemoteProtocolError("connection is broken")
            rid = self._next_id
            self._next_id += 1
            # Encoding failures are ours (LocalProtocolError) and must not blame the peer.
            frame = encode_frame({"id": rid, "method": method, "params": params},
                                 CLIENT_MAX_FRAME)
            done = False
            try:
                await self.stream.send_all(frame)
                while True:
                    msg = await self._receive()
                    if "push" in msg:
                        if not self.subscribed:
                            raise RemoteProtocolError("unsolicited push on a request connection")
                        self._pushes.append(msg)
                        continue
                    if "id" not in msg and isinstance(msg.get("error"), dict):
                        # The peer closes the connection for a protocol error and says why.
                        raise RemoteProtocolError(
                            f"peer closed the connection: {msg['error'].get('code')!r}")
                    if msg.get("id") != rid:
                        raise RemoteProtocolError(
                            f"response id {msg.get('id')!r}, expected {rid}")
                    done = True
                    break
            finally:
                if not done:
                    self.broken = True
        if "error" in msg:
            err = msg["error"]
            _need(isinstance(err, dict), "error must be a map")
            code, message = err.get("code"), err.get("message", "")
            _need(isinstance(code, str) and isinstance(message, str), "error code/message")
            raise _Refused(code, message)
        result = msg.get("result")
        if not isinstance(result, dict):
            raise MalformedFrame("result must be a map")
        return result

    async def next_push(self) -> dict[str, Any]:
        """The next unsolicited message on a subscribed connection."""
        if self._pushes:
            return self._pushes.popleft()
        async with self._lock:
            done = False
            try:
                msg = await self._receive()
                done = True
            finally:
                if not done:
                    self.broken = True
        if "push" not in msg:
            self.broken = True
            raise RemoteProtocolError("a response that answers no request")
        return msg

    async def aclose(self) -> None:
        self.broken = True
        await trio.aclose_forcefully(self.stream)


class LedgerClient:
    """A verifying client of the ledger peers ``peers`` for the chain of ``genesis``.

    Use as ``async with LedgerClient(genesis, peers) as client:`` (or call :meth:`aclose`).
    ``timeout_s`` bounds each attempt at one peer; ``stall_timeout_s`` is how long a header
    subscription waits for the next block before it fails over; ``poll_interval_s`` paces
    :meth:`wait_tx`. ``connect`` opens a stream to (host, port) (TCP unless a test injects
    in-memory streams). Raises :class:`ConfigError` if ``peers`` is empty or the genesis is
    invalid.
    """

    def __init__(
        self,
        genesis: Genesis,
        peers: Sequence[tuple[str, int]],
        *,
        timeout_s: float = 5.0,
        stall_timeout_s: float = 30.0,
        poll_interval_s: float = 0.5,
        bad_peer_s: float = 30.0,
        connect: Connector | None = None,
    ) -> None:
        if not peers:
            raise ConfigError("no ledger peers configured")
        self._genesis = genesis
        self._peers: list[Peer] = [(str(h), int(p)) for h, p in peers]
        self._timeout_s = timeout_s
        self._stall_s = stall_timeout_s
        self._poll_s = poll_interval_s
        self._bad_peer_s = bad_peer_s
        self._connect: Connector = connect if connect is not None else _open_tcp
        # The state before block 1 follows from the pinned genesis alone: computed here, it
        # lets a client prove entries of a chain that has not committed a block yet.
        self._light = LightState(genesis, genesis_root=LedgerState.from_genesis(genesis).root)
        # Idle request connections per peer; each attempt leases one for itself, so that
        # concurrent callers do not queue behind each other on one connection.
        self._idle: dict[Peer, list[_Conn]] = {p: [] for p in self._peers}
        self._leased: set[_Conn] = set()
        self._limits = {p: trio.CapacityLimiter(MAX_CONNS_PER_PEER) for p in self._peers}
        self._subscriptions: set[_Conn] = set()
        self._bad_until: dict[Peer, float] = {}
        self._preferred: Peer | None = None
        self._closed = False

    @property
    def light(self) -> LightState:
        """The verified-header store (read it, do not feed it)."""
        return self._light

    async def __aenter__(self) -> LedgerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection. The client cannot be used afterwards."""
        self._closed = True
        conns = [c for idle in self._idle.values() for c in idle]
        conns += list(self._leased) + list(self._subscriptions)
        for idle in self._idle.values():
            idle.clear()
        self._subscriptions.clear()
        for conn in conns:
            await conn.aclose()

    # -- public API -------------------------------------------------------------------------

    async def status(self) -> ChainStatus:
        """The chain id, pinned validators and latest verified height and block hash."""

        async def attempt(conn: _Conn) -> ChainStatus:
            res = await conn.request("status", {})
            if res.get("chain_id") != self._genesis.chain_id:
                raise VerificationError(f"peer serves chain {res.get('chain_id')!r}")
            if _field_int(res, "height") == 0 and self._light.height == 0:
                block_hash = b""
                height = 0
            else:
                block, _commit = await self._fetch_block(conn, 0)
                height, block_hash = block.header.height, block.hash()
            return ChainStatus(self._genesis.chain_id, height, block_hash,
                               list(self._genesis.validators.members), _peer_name(conn.peer))

        return await self._with_failover("status", attempt)

    async def latest(self) -> tuple[Header, Commit]:
        """The newest verified header and its commit (never older than one seen before)."""

        async def attempt(conn: _Conn) -> tuple[Header, Commit]:
            block, commit = await self._fetch_block(conn, 0)
            return block.header, commit

        return await self._with_failover("latest", attempt)

    async def block(self, height: int) -> Block:
        """The block at ``height`` (0: the latest), verified against its commit.

        Raises :class:`NotFound` if the peers do not have it.
        """
        if height < 0:
            raise LocalProtocolError("block height must not be negative")

        async def attempt(conn: _Conn) -> Block:
            return (await self._fetch_block(conn, height))[0]

        return await self._with_failover(f"block {height}", attempt)

    async def submit(self, tx: Tx) -> bytes:
        """Hand ``tx`` to a peer's mempool; return its hash.

        Raises :class:`InvalidTx` with the peer's code when it refuses the transaction.
        """
        raw = tx.encode()
        tx_hash = tx.hash()
        sent_before = False

        async def attempt(conn: _Conn) -> bytes:
            nonlocal sent_before
            resend = sent_before
            sent_before = True
            try:
                res = await conn.request("submit_tx", {"tx": raw})
            except _Refused as exc:
                # An earlier peer may have taken the tx before its connection failed, and
                # gossiped it here: the tx is in the mempools, which is what we wanted.
                if resend and exc.code == "duplicate":
                    return tx_hash
                raise InvalidTx(exc.code, exc.message) from None
            if res.get("tx_hash") != tx_hash:
                raise VerificationError("peer acknowledged a different transaction hash")
            return tx_hash

        return await self._with_failover("submit", attempt)

    async def query(self, key: bytes) -> tuple[bytes | None, int]:
        """The value of ``key`` (None: absent) at the latest height, proven; and that height."""

        async def attempt(conn: _Conn) -> tuple[bytes | None, int]:
            res = await conn.request("query", {"key": key, "height": 0})
            height = _field_int(res, "height")
            value = res.get("value")
            _need(value is None or isinstance(value, bytes), "query value")
            proof = Proof.from_wire(res.get("proof"))
            if height == 0:  # no block yet: the pinned genesis fixes the state
                self._light.verify_genesis_state(key, value, proof)
                return value, height
            self._light.check_fresh(height)
            header = self._light.header(height)
            if header is None:
                block, _commit = await self._fetch_block(conn, height)
                header = block.header
            self._light.verify_state(header, key, value, proof)
            return value, height

        return await self._with_failover("query", attempt)

    async def wait_tx(self, tx_hash: bytes, *, timeout_s: float = 30.0) -> TxOutcome:
        """Poll the proven ``txresult`` entry of ``tx_hash`` until the tx is committed.

        Raises :class:`LedgerTimeout` if it is not committed within ``timeout_s``.
        """
        key = keyspace.tx_result(tx_hash)
        last_error: TfgridError | None = None
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    value, _height = await self.query(key)
                except (LedgerUnavailable, LedgerTimeout) as exc:
                    # Peers restarting or briefly unreachable: keep trying until the deadline.
                    last_error = exc
                else:
                    if value is not None:
                        return _decode_outcome(tx_hash, value)
                await trio.sleep(self._poll_s)
        why = "" if last_error is None else f" (last error: {last_error})"
        raise LedgerTimeout(f"transaction {tx_hash.hex()} not committed within {timeout_s}s{why}")

    async def submit_and_wait(self, tx: Tx, *, timeout_s: float = 30.0) -> TxOutcome:
        """Submit ``tx`` and wait for its outcome.

        Raises :class:`InvalidTx` if a peer refused it or it failed inside its block.
        """
        tx_hash = await self.submit(tx)
        outcome = await self.wait_tx(tx_hash, timeout_s=timeout_s)
        if outcome.code != "ok":
            raise InvalidTx(outcome.code, outcome.message)
        return outcome

    async def next_nonce(self, address: bytes) -> int:
        """The nonce the next transaction of ``address`` must carry (proven committed state)."""
        value, _height = await self.query(keyspace.account(address))
        if value is None:
            return 0
        entry = _decode_map(value, "account")
        nonce = entry.get("nonce", 0)
        if not isinstance(nonce, int) or isinstance(nonce, bool) or nonce < 0:
            raise VerificationError("account entry carries a malformed nonce")
        return nonce

    async def headers(self) -> AsyncIterator[Header]:
        """Each newly committed header from the first push on, verified, in height order.

        Heights skipped during a fail-over are fetched (at most ``MAX_BACKFILL`` of them;
        beyond that the iteration jumps to the new head). Fails over to the next peer when the current one errs, serves something
        unverifiable, or sends nothing for ``stall_timeout_s``. Raises
        :class:`LedgerUnavailable` when every peer failed in a row, and
        :class:`ConflictingHeaders` on a fork. Close it with ``aclosing()`` when done early.
        """
        self._check_open()
        last: int | None = None
        sub = _Subscription(self)
        try:
            while True:
                block = await sub.next_block(last)
                height = block.header.height
                if last is not None and height > last + 1:
                    for missing in range(max(last + 1, height - MAX_BACKFILL), height):
                        yield (await self.block(missing)).header
                yield block.header
                last = height
        finally:
            await sub.aclose()

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("the ledger client is closed")

    def _peer_order(self) -> list[Peer]:
        """Healthy peers first (the last one that answered leading), then set-aside peers by
        the time their penalty ends, so that a fully degraded set is still tried."""
        now = trio.current_time()
        good = [p for p in self._peers if self._bad_until.get(p, -math.inf) <= now]
        if self._preferred in good:
            good.remove(self._preferred)
            good.insert(0, self._preferred)
        bad = sorted((p for p in self._peers if p not in good), key=lambda p: self._bad_until[p])
        return good + bad

    def _mark_bad(self, peer: Peer) -> None:
        self._bad_until[peer] = trio.current_time() + self._bad_peer_s
        if self._preferred == peer:
            self._preferred = None

    @asynccontextmanager
    async def _lease(self, peer: Peer) -> AsyncIterator[_Conn]:
        """A connection to ``peer`` for one attempt, back to the idle pool if still healthy."""
        async with self._limits[peer]:
            idle = self._idle[peer]
            conn = idle.pop() if idle else None
            if conn is None:
                conn = _Conn(peer, await self._connect(*peer))
            self._leased.add(conn)
            try:
                yield conn
            finally:
                self._leased.discard(conn)
                if conn.broken or self._closed:
                    await conn.aclose()
                else:
                    idle.append(conn)

    async def _drop(self, peer: Peer) -> None:
        """Close the idle connections of a peer that just failed."""
        idle, self._idle[peer] = self._idle[peer], []
        for conn in idle:
            await conn.aclose()

    async def _fetch_block(self, conn: _Conn, height: int) -> tuple[Block, Commit]:
        """Fetch and verify the block at ``height`` (0: the peer's latest) from ``conn``."""
        res = await conn.request("block", {"height": height})
        block, commit = _parse_block(res)
        self._light.verify_block(block, commit, latest=height == 0)
        if height and block.header.height != height:
            raise VerificationError(
                f"asked for block {height}, peer served block {block.header.height}")
        return block, commit

    async def _with_failover(self, what: str, attempt: Callable[[_Conn], Awaitable[T]]) -> T:
        self._check_open()
        reasons: list[str] = []
        timeouts = not_found = objections = 0
        for peer in self._peer_order():
            name = _peer_name(peer)
            try:
                with trio.fail_after(self._timeout_s):
                    async with self._lease(peer) as conn:
                        result = await attempt(conn)
            except ConflictingHeaders:
                raise
            except _Refused as exc:
                # A well-formed refusal: the peer is healthy, it just cannot answer this.
                if exc.code in _NOT_FOUND_CODES:
                    not_found += 1
                else:
                    objections += 1
                reasons.append(f"{name} refused: {exc}")
            except trio.TooSlowError:
                timeouts += 1
                reasons.append(f"{name}: no answer within {self._timeout_s}s")
                self._mark_bad(peer)
                await self._drop(peer)
            except VerificationError as exc:
                objections += 1
                reasons.append(f"{name} served something unverifiable: {exc}")
                self._mark_bad(peer)
                await self._drop(peer)
            except (RemoteProtocolError, OSError, trio.BrokenResourceError,
                    trio.ClosedResourceError) as exc:
                reasons.append(f"{name}: {_describe(exc)}")
                self._mark_bad(peer)
                await self._drop(peer)
            else:
                self._preferred = peer
                self._bad_until.pop(peer, None)
                return result
        summary = f"{what}: " + "; ".join(reasons)
        # Unreachable peers do not contradict "not found"; a peer that answered otherwise does.
        if not_found and not objections:
            raise NotFound(f"no ledger peer has {summary}")
        if timeouts == len(reasons):
            raise LedgerTimeout(f"no ledger peer answered {summary}")
        raise LedgerUnavailable(f"no ledger peer could answer {summary}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        return "connection lost"
    if isinstance(exc, OSError):
        return f"cannot connect ({exc.strerror or exc or exc.__class__.__name__})"
    return str(exc) or exc.__class__.__name__


def _decode_map(value: bytes, what: str) -> dict[str, Any]:
    try:
        entry = unpack(value)
    except MalformedFrame as exc:
        raise VerificationError(f"{what} entry is not canonical msgpack") from exc
    if not isinstance(entry, dict):
        raise VerificationError(f"{what} entry is not a map")
    return entry


def _decode_outcome(tx_hash: bytes, value: bytes) -> TxOutcome:
    entry = _decode_map(value, "txresult")
    code, message = entry.get("code"), entry.get("message", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise VerificationError("txresult entry lacks a code or message")
    return TxOutcome(tx_hash=tx_hash, code=code, message=message)


class _Subscription:
    """The connection behind :meth:`LedgerClient.headers`, with fail-over across peers."""

    def __init__(self, client: LedgerClient) -> None:
        self._client = client
        self._conn: _Conn | None = None

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._client._subscriptions.discard(conn)
            await conn.aclose()

    async def _subscribe(self, peer: Peer) -> _Conn:
        c = self._client
        with trio.fail_after(c._timeout_s):
            conn = _Conn(peer, await c._connect(*peer))
            c._subscriptions.add(conn)
            self._conn = conn
            conn.subscribed = True
            res = await conn.request("subscribe_headers", {})
        if res.get("subscribed") is not True:
            raise RemoteProtocolError("subscription not acknowledged")
        return conn

    async def next_block(self, after: int | None) -> Block:
        """The next pushed block above height ``after``, verified.

        A peer that pushes nothing new for the stall timeout (old headers, as a lagging peer
        after a fail-over sends, are verified but do not count) is left for the next one.
        Raises :class:`LedgerUnavailable` after every peer failed once in a row,
        :class:`ConflictingHeaders` on a fork."""
        c = self._client
        reasons: list[str] = []
        tried: set[Peer] = set()
        while True:
            c._check_open()
            peer: Peer | None = None
            try:
                conn = self._conn
                if conn is None:
                    candidates = [p for p in c._peer_order() if p not in tried]
                    if not candidates:
                        raise LedgerUnavailable(
                            "header subscription failed at every peer: " + "; ".join(reasons))
                    peer = candidates[0]
                    tried.add(peer)
                    conn = await self._subscribe(peer)
                peer = conn.peer
                with trio.fail_after(c._stall_s):
                    while True:
                        msg = await conn.next_push()
                        if msg.get("push") != "header":
                            raise RemoteProtocolError(f"unexpected push {msg.get('push')!r}")
                        block, commit = _parse_block(msg)
                        c._light.verify_block(block, commit)
                        if after is None or block.header.height > after:
                            return block
            except ConflictingHeaders:
                raise
            except (trio.TooSlowError, VerificationError, RemoteProtocolError, _Refused,
                    OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if peer is None:
                    raise  # pragma: no cover - only _check_open/LedgerUnavailable get here
                if isinstance(exc, trio.TooSlowError):
                    why = "stalled"
                elif isinstance(exc, TfgridError):
                    why = str(exc)
                else:
                    why = _describe(exc)
                reasons.append(f"{_peer_name(peer)}: {why}")
                c._mark_bad(peer)
                await self.aclose()
