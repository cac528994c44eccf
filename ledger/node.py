"""The validator daemon: a thin trio driver around the consensus core and the ledger state.

One TCP port serves validators and clients. A connection whose first frame is a ``hello`` is a
validator (mutual handshake, :mod:`ledger.peer`); anything else is a client speaking the
request/response methods of :mod:`ledger.api`. The driver feeds network events and timer
expiries to the sans-IO :class:`~ledger.consensus.Consensus` core and executes the actions
it returns, in order and synchronously: nothing awaits between a ``Persist`` and the
actions after it, so a cancellation or crash can never reorder a signature before its
write-ahead record.

Time: trio's clock drives every timer; the wall clock is read only for block times
(``now_ms`` handed to the core and used by :meth:`LedgerApp.validate`).

Run ``python -m ledger.node --home DIR``: it prints ``listening HOST:PORT`` once ready and
stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from ledger import api
from ledger.codec import EMPTY_HASH, hash_bytes
from ledger.config import ValidatorConfig, format_hostport, load_validator_home
from ledger.consensus import (
    BroadcastProposal,
    BroadcastVote,
    CatchUp,
    Consensus,
    Decided,
    Persist,
    RecordEvidence,
    ScheduleTimeout,
    Timeout,
)
from ledger.errors import (
    ConfigError,
    InvalidBlock,
    InvalidTx,
    LedgerTimeout,
    LocalProtocolError,
    MalformedFrame,
    RemoteProtocolError,
    StorageError,
    TfgridError,
    VerificationError,
)
from ledger.keys import KeyPair
from ledger.mempool import Mempool
from ledger.peer import Connection, SelfConnection, error_code, handshake
from ledger.state import BlockResult, LedgerState
from ledger.store import Store
from ledger.tx import VerifiedTxs
from ledger.types import Block, Commit, Genesis, Header, Proposal, Vote, merkle_root
from ledger.wire import NEED_DATA, encode_frame

log = logging.getLogger("ledger.node")

KEEP_STATES = 16  # recent heights whose state can be queried with proofs
MAX_CONNECTIONS = 1024  # inbound; our own dials to validators do not count
FIRST_FRAME_TIMEOUT_S = 30.0  # an inbound connection that says nothing is closed
MAX_KEY_SUBSCRIPTIONS = 1024  # per connection
MAX_QUERY_KEY = 1024
HANDSHAKE_TIMEOUT_S = 5.0
DIAL_TIMEOUT_S = 5.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
STATUS_INTERVAL_S = 1.0
CATCHUP_GRACE_S = 0.3
CATCHUP_REQUEST_TIMEOUT_S = 5.0
GOSSIP_TX_QUEUE = 20_000  # txs from peers awaiting admission; beyond it they are dropped
# Txs admitted here reach the other validators in batches of up to TX_GOSSIP_BATCH, at most one
# frame per peer every TX_GOSSIP_INTERVAL_S: a tx after a quiet spell goes at once, under load
# the frames carry what was admitted meanwhile (a frame per tx costs each peer more than the
# admission of the tx itself, apart from its signature check).
TX_GOSSIP_INTERVAL_S = 0.01
TX_GOSSIP_BATCH = 512
TX_ADMIT_SLICE = 32  # gossiped txs admitted between two checkpoints
CLIENT_BURST = 8  # buffered requests of one client answered between two checkpoints


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class RequestError(TfgridError):
    """A client request refused with an error response; the connection stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# the App: what consensus decides about


class LedgerApp:
    """The consensus :class:`~ledger.consensus.App`: builds, checks and commits blocks.

    Holds the latest :class:`LedgerState` (and a few recent ones for queries), the mempool
    and the store. Deterministic given the blocks it is fed; ``now_ms`` only bounds how far
    ahead of our clock a proposed block time may be.
    """

    def __init__(self, *, genesis: Genesis, key: KeyPair, store: Store, mempool: Mempool,
                 cfg: ValidatorConfig) -> None:
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.validators = genesis.validators
        self.key = key
        self.store = store
        self.mempool = mempool
        self.max_block_txs = cfg.max_block_txs
        self.max_block_bytes = cfg.max_block_bytes
        self.max_future_ms = cfg.max_future_ms
        self._vhash = self.validators.hash()
        self._results: dict[bytes, BlockResult] = {}
        self.last_changes: dict[bytes, bytes | None] = {}
        h = store.height()
        if h == 0:
            self.state = LedgerState.from_genesis(genesis)
            self.last_hash = EMPTY_HASH
            self.last_time_ms = genesis.genesis_time_ms
        else:
            last = store.block(h)
            if last is None:
                raise StorageError(f"store claims height {h} but has no block {h}")
            self.state = LedgerState.from_items(genesis, store.state_items())
            if self.state.root != last.header.state_root:
                raise StorageError(
                    f"stored state root {self.state.root.hex()} does not match block {h}'s "
                    f"state root {last.header.state_root.hex()}"
                )
            self.last_hash = last.hash()
            self.last_time_ms = last.header.time_ms
        self.height = h
        self.recent: dict[int, LedgerState] = {h: self.state}

    # -- App protocol --------------------------------------------------------------------------

    def has_pending_txs(self) -> bool:
        return len(self.mempool) > 0

    def propose(self, height: int, round: int, time_ms: int, last_commit: Commit | None) -> Block:
        if height != self.height + 1:
            raise InvalidBlock(f"asked to propose height {height}, next is {self.height + 1}")
        txs = self.mempool.reap(self.max_block_txs, self.max_block_bytes)
        result = self.state.apply_block(height, time_ms, txs, verified=self.mempool.verified)
        header = Header(
            chain_id=self.chain_id,
            height=height,
            time_ms=time_ms,
            prev_hash=self.last_hash,
            last_commit_hash=EMPTY_HASH if last_commit is None else last_commit.hash(),
            txs_root=merkle_root([hash_bytes(t) for t in txs]),
            state_root=result.state.root,
            validators_hash=self._vhash,
            next_validators_hash=self._vhash,
            proposer=self.key.public_key,
        )
        block = Block(header, tuple(txs), last_commit)
        self._results[block.hash()] = result
        return block

    def validate(self, block: Block, now_ms: int) -> bool:
        try:
            self._check(block, now_ms)
        except (TfgridError, ValueError) as exc:
            log.info("rejecting block %d %s: %s", block.header.height, block.hash().hex()[:12], exc)
            return False
        return True

    def commit(self, block: Block, commit: Commit) -> None:
        h = block.header.height
        if h != self.height + 1:
            raise InvalidBlock(f"asked to commit height {h}, next is {self.height + 1}")
        result = self._results.pop(block.hash(), None)
        if result is None:
            # A certified block we never validated (catch-up): execute it now. More than 2/3
            # signed this state root, so a mismatch means our state machine diverged.
            result = self.state.apply_block(h, block.header.time_ms, block.txs,
                                             verified=self.mempool.verified)
            if result.state.root != block.header.state_root:
                raise StorageError(
                    f"executing certified block {h} gives state root {result.state.root.hex()}, "
                    f"the validators signed {block.header.state_root.hex()}: local state diverged"
                )
        changes = result.changes
        if h == 1:
            # Persist the genesis entries with the first block so the store's state_items()
            # is the whole state, whether or not the store wrote genesis entries itself.
            changes = {**dict(LedgerState.from_genesis(self.genesis).tree.items()), **changes}
        self.store.save_block(block, commit, changes)
        self.state = result.state
        self.height = h
        self.last_hash = block.hash()
        self.last_time_ms = block.header.time_ms
        self.last_changes = dict(result.changes)
        self.recent[h] = result.state
        self.recent.pop(h - KEEP_STATES, None)
        self._results.clear()
        self.mempool.update(list(block.txs), self.state, self.chain_id)

    # -- checks --------------------------------------------------------------------------------

    def _check(self, block: Block, now_ms: int) -> None:
        """Raises a :class:`TfgridError` naming the first rule ``block`` breaks."""
        hd = block.header
        if hd.chain_id != self.chain_id:
            raise InvalidBlock(f"block is for chain {hd.chain_id!r}")
        if hd.height != self.height + 1:
            raise InvalidBlock(f"block height {hd.height}, expected {self.height + 1}")
        block.check_shape()
        if hd.prev_hash != self.last_hash:
            raise InvalidBlock("block does not extend our last block")
        if hd.time_ms <= self.last_time_ms:
            raise InvalidBlock("block time is not after the previous block's")
        if hd.time_ms > now_ms + self.max_future_ms:
            raise InvalidBlock(f"block time is {hd.time_ms - now_ms} ms ahead of our clock")
        if hd.proposer not in self.validators:
            raise InvalidBlock("block proposer is not a validator")
        if hd.validators_hash != self._vhash or hd.next_validators_hash != self._vhash:
            raise InvalidBlock("block names another validator set")
        if len(block.txs) > self.max_block_txs:
            raise InvalidBlock(f"block has {len(block.txs)} txs, limit {self.max_block_txs}")
        if sum(len(t) for t in block.txs) > self.max_block_bytes:
            raise InvalidBlock("block txs exceed the size limit")
        if block.last_commit is not None:
            lc = block.last_commit
            if lc.height != self.height or lc.block_hash != self.last_hash:
                raise InvalidBlock("block's last commit is not for our last block")
            lc.verify(self.chain_id, self.validators)
        cached = self._results.get(block.hash())
        if cached is None:
            cached = self.state.apply_block(hd.height, hd.time_ms, block.txs,
                                            verified=self.mempool.verified)
        if cached.state.root != hd.state_root:
            raise InvalidBlock("executing the block gives another state root")
        self._results[block.hash()] = cached

    # -- queries -------------------------------------------------------------------------------

    def state_at(self, height: int) -> tuple[int, LedgerState]:
        """Raises :class:`RequestError` if ``height`` is not committed or no longer kept."""
        if height == 0:
            return self.height, self.state
        if height > self.height:
            raise RequestError("not_found", f"height {height} is not committed yet")
        st = self.recent.get(height)
        if st is None:
            raise RequestError("unavailable", f"state at height {height} is no longer kept; "
                                              f"query a height >= {min(self.recent)}")
        return height, st


# ---------------------------------------------------------------------------------------------
# the driver


class Node:
    """The validator daemon: sockets, timers and the consensus core for one validator home."""

    def __init__(self, cfg: ValidatorConfig, genesis: Genesis, key: KeyPair, store: Store) -> None:
        self.cfg = cfg
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.genesis_hash = genesis.hash()
        self.validators = genesis.validators
        self.key = key
        self.store = store
        # Signatures are checked once per tx: at admission, or when a block brings it first.
        self.mempool = Mempool(verified=VerifiedTxs(self.chain_id))
        self.app = LedgerApp(genesis=genesis, key=key, store=store, mempool=self.mempool, cfg=cfg)
        self.core = Consensus(
            chain_id=self.chain_id,
            validators=self.validators,
            key=key,
            app=self.app,
            config=cfg.consensus,
            height=self.app.height + 1,
            last_block_time_ms=self.app.last_time_ms,
            snapshot=store.load_snapshot(),
            last_commit=store.commit(self.app.height) if self.app.height else None,
        )
        self.peers: dict[bytes, list[Connection]] = {}
        self.peer_heights: dict[bytes, int] = {}
        self.inbound = 0
        self.header_subs: set[Connection] = set()
        self.key_subs: dict[bytes, set[Connection]] = {}
        self._conn_keys: dict[Connection, set[bytes]] = {}
        self._timers: dict[Timeout, float] = {}
        self._timers_changed = trio.Event()
        self._catchup_target = 0
        self._catchup_wake = trio.Event()
        self._rng = random.Random(key.public_key)  # backoff jitter only
        # Batches of gossiped txs; their total length is bounded by GOSSIP_TX_QUEUE.
        self._gossiped_txs, self._gossiped_rx = trio.open_memory_channel[list[bytes]](math.inf)
        self._gossip_queued = 0
        self.dropped_gossip_txs = 0
        self._tx_outbox: list[bytes] = []  # admitted here, to gossip
        self._tx_outbox_ready = trio.Event()
        self.now_ms: Callable[[], int] = wall_ms

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.cfg.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {format_hostport(self.cfg.listen)}: "
                              f"{exc.strerror or exc}") from None
        sockname = listeners[0].socket.getsockname()
        bound = (str(sockname[0]), int(sockname[1]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle_inbound, listeners)
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._catchup_loop)
            nursery.start_soon(self._status_loop)
            nursery.start_soon(self._gossiped_tx_loop)
            nursery.start_soon(self._tx_gossip_loop)
            for addr in self.cfg.peers:
                if addr not in (self.cfg.listen, bound):
                    nursery.start_soon(self._dial_loop, addr)
            self._execute(self.core.start(self.now_ms()))
            log.info("validator %s at height %d listening on %s", self.key.address[:12],
                     self.app.height, format_hostport(bound))
            task_status.started(bound)

    # -- executing the core's actions ----------------------------------------------------------

    def _execute(self, actions: Sequence[object]) -> None:
        """Carry out ``actions`` in order, synchronously (no checkpoint between them)."""
        for action in actions:
            match action:
                case Persist():
                    self.store.save_snapshot(action.snapshot)
                case BroadcastProposal():
                    self._gossip({"gossip": "proposal", "proposal": action.proposal.to_wire(),
                                  "block": action.block.to_wire()})
                case BroadcastVote():
                    self._gossip({"gossip": "vote", "vote": action.vote.to_wire()})
                case ScheduleTimeout():
                    self._timers[action.timeout] = trio.current_time() + action.delay_ms / 1000
                    self._timers_changed.set()
                case Decided():
                    self._on_decided(action.block, action.commit)
                case RecordEvidence():
                    log.warning("equivocation by %s at height %d round %d",
                                action.first.validator.hex()[:12], action.first.height,
                                action.first.round)
                    self.store.add_evidence(action.first, action.second)
                case CatchUp():
                    self._catchup_target = max(self._catchup_target, action.height)
                    self._catchup_wake.set()
                case _:
                    raise TypeError(f"unknown consensus action {action!r}")

    def _on_decided(self, block: Block, commit: Commit) -> None:
        h = block.header.height
        log.info("committed height %d round %d (%d txs) %s", h, commit.round, len(block.txs),
                 block.hash().hex()[:12])
        for t in [t for t in self._timers if t.height <= h]:
            del self._timers[t]
        if self.header_subs:
            try:
                frame = encode_frame({"push": "header", "block": block.to_wire(),
                                      "commit": commit.to_wire()}, api.CLIENT_MAX_FRAME)
            except LocalProtocolError:
                # Cannot happen within the configured block size limit; never let a
                # notification take consensus down.
                log.exception("header push of height %d does not fit a client frame", h)
            else:
                for conn in list(self.header_subs):
                    conn.send_frame(frame)
        if self.key_subs:
            for k in self.app.last_changes:
                for conn in list(self.key_subs.get(k, ())):
                    conn.send({"push": "event", "key": k, "height": h})
        self._gossip({"gossip": "status", "height": h})

    def _gossip(self, message: dict[str, Any]) -> None:
        if not self.peers:
            return
        frame = encode_frame(message, api.PEER_MAX_FRAME)
        for conns in list(self.peers.values()):
            if conns:
                conns[-1].send_frame(frame)

    # -- timers --------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            deadline = min(self._timers.values(), default=math.inf)
            with trio.move_on_at(deadline):
                await self._timers_changed.wait()
            self._timers_changed = trio.Event()
            now = trio.current_time()
            # by deadline only: Timeout is not orderable, and equal deadlines keep their order
            due = sorted(((d, t) for t, d in self._timers.items() if d <= now), key=lambda x: x[0])
            for d, t in due:
                if self._timers.get(t) == d:
                    del self._timers[t]
                    self._execute(self.core.on_timeout(t, self.now_ms()))

    # -- catching up ---------------------------------------------------------------------------

    async def _catchup_loop(self) -> None:
        while True:
            await self._catchup_wake.wait()
            self._catchup_wake = trio.Event()
            await self._catch_up()

    def _ahead(self) -> int:
        """The highest height we believe is committed somewhere."""
        return max(self._catchup_target, max(self.peer_heights.values(), default=0))

    async def _catch_up(self) -> None:
        graced = False
        while self._ahead() >= self.core.height:
            h = self.core.height
            if not graced and self._ahead() == h:
                # Peers commit a height a few ms before we do in normal operation; give our
                # own votes a moment before fetching what we are about to decide anyway.
                graced = True
                await trio.sleep(CATCHUP_GRACE_S)
                continue
            fetched = await self._fetch_certified(h)
            if fetched is None:
                # Nobody served it (yet): forget the hint; status gossip will wake us again.
                self._catchup_target = min(self._catchup_target, self.app.height)
                await trio.sleep(CATCHUP_GRACE_S)
                return
            block, commit = fetched
            if self.core.height == h:
                log.info("catching up: height %d from a peer", h)
                # More than 2/3 already checked the block time against their clocks; ours
                # being behind must not make us refuse a certified block.
                now = max(self.now_ms(), block.header.time_ms)
                try:
                    actions = self.core.on_certified_block(block, commit, now)
                except (InvalidBlock, VerificationError) as exc:
                    log.error("certified block %d refused: %s", h, exc)
                    await trio.sleep(CATCHUP_GRACE_S)
                    return
                self._execute(actions)

    async def _fetch_certified(self, h: int) -> tuple[Block, Commit] | None:
        candidates = [k for k in self.peers if self.peer_heights.get(k, 0) >= h]
        candidates += [k for k in self.peers if k not in candidates]
        for k in candidates:
            conns = self.peers.get(k)
            if not conns:
                continue
            conn = conns[-1]
            try:
                res = await conn.request("block", {"height": h}, timeout_s=CATCHUP_REQUEST_TIMEOUT_S)
                block, commit = self._parse_certified(res, h)
            except (RemoteProtocolError, LedgerTimeout, VerificationError) as exc:
                log.info("catch-up: %s could not serve height %d: %s", conn.remote, h, exc)
                continue
            return block, commit
        return None

    def _parse_certified(self, res: Any, h: int) -> tuple[Block, Commit]:
        """Raises :class:`MalformedFrame` / :class:`VerificationError` for a bad answer."""
        if not isinstance(res, dict):
            raise MalformedFrame("block result must be a map")
        block = Block.from_wire(res.get("block"))
        commit = Commit.from_wire(res.get("commit"))
        if block.header.height != h or commit.height != h:
            raise VerificationError(f"asked for height {h}, got another height")
        if block.header.chain_id != self.chain_id:
            raise VerificationError("block of another chain")
        if commit.block_hash != block.hash():
            raise VerificationError("commit certifies another block")
        block.check_shape()
        commit.verify(self.chain_id, self.validators)
        return block, commit

    # -- txs from other validators --------------------------------------------------------------

    async def _gossiped_tx_loop(self) -> None:
        async for batch in self._gossiped_rx:  # each receive is a checkpoint: others get turns
            self._gossip_queued -= len(batch)
            added = False
            for i, raw in enumerate(batch):
                if i and i % TX_ADMIT_SLICE == 0:
                    if added:
                        self._execute(self.core.on_txs_available(self.now_ms()))
                        added = False
                    await trio.lowlevel.checkpoint()  # votes and proposals go first
                try:
                    self.mempool.add(raw, self.app.state, self.chain_id)
                except InvalidTx:
                    continue  # duplicates and txs made stale by a block are normal here
                added = True
            if added:
                self._execute(self.core.on_txs_available(self.now_ms()))

    def _queue_tx_gossip(self, raw: bytes) -> None:
        if self.peers:
            self._tx_outbox.append(raw)
            self._tx_outbox_ready.set()

    async def _tx_gossip_loop(self) -> None:
        last = -math.inf
        while True:
            await self._tx_outbox_ready.wait()
            await trio.sleep_until(last + TX_GOSSIP_INTERVAL_S)  # at once if that is past
            self._tx_outbox_ready = trio.Event()
            txs, self._tx_outbox = self._tx_outbox, []
            last = trio.current_time()
            for i in range(0, len(txs), TX_GOSSIP_BATCH):
                self._gossip({"gossip": "txs", "txs": txs[i:i + TX_GOSSIP_BATCH]})

    # -- connections ---------------------------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL_S)
            self._gossip({"gossip": "status", "height": self.app.height})
            if self._ahead() >= self.core.height:
                self._catchup_wake.set()

    async def _handle_inbound(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            remote = format_hostport((str(peer[0]), int(peer[1])))
        except OSError:
            remote = "?"
        if self.inbound >= MAX_CONNECTIONS:
            log.warning("refusing %s: %d inbound connections open", remote, self.inbound)
            await stream.aclose()
            return
        await self._run_connection(stream, remote, outbound=False)

    async def _dial_loop(self, addr: tuple[str, int]) -> None:
        backoff = BACKOFF_MIN_S
        remote = format_hostport(addr)
        while True:
            stream: trio.SocketStream | None = None
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    stream = await trio.open_tcp_stream(*addr)
            except (OSError, trio.TooSlowError):
                stream = None
            if stream is not None:
                started = trio.current_time()
                try:
                    await self._run_connection(stream, remote, outbound=True)
                except SelfConnection:
                    log.info("peer %s is this validator; not dialing it", remote)
                    return
                if trio.current_time() - started > 10 * BACKOFF_MAX_S:
                    backoff = BACKOFF_MIN_S
            await trio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_connection(self, stream: trio.SocketStream, remote: str, *, outbound: bool) -> None:
        """Serve one connection until it closes. Re-raises :class:`SelfConnection` (dialer)."""
        conn = Connection(stream, remote=remote)
        if not outbound:
            self.inbound += 1
        is_self = False
        try:
            async with trio.open_nursery() as nursery:
                conn.cancel_scope = nursery.cancel_scope
                nursery.start_soon(conn.run_sender)
                try:
                    await self._converse(conn, outbound=outbound)
                except SelfConnection:
                    is_self = True
                except RemoteProtocolError as exc:
                    log.info("closing %s: %s", remote, exc)
                    conn.send({"error": {"code": error_code(exc), "message": str(exc)}})
                await conn.flush_and_close()
        finally:
            if not outbound:
                self.inbound -= 1
            self._forget(conn)
            with trio.CancelScope(shield=True):
                await stream.aclose()
        if is_self and outbound:
            raise SelfConnection("connected to ourselves")

    async def _converse(self, conn: Connection, *, outbound: bool) -> None:
        if outbound:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
                key = await self._handshake(conn, None)
            if scope.cancelled_caught:
                raise RemoteProtocolError("handshake timed out")
            await self._serve_validator(conn, key)
            return
        first = None
        with trio.move_on_after(FIRST_FRAME_TIMEOUT_S):
            first = await conn.receive()
        if first is None:
            return
        if isinstance(first, dict) and "hello" in first:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
                key = await self._handshake(conn, first)
            if scope.cancelled_caught:
                raise RemoteProtocolError("handshake timed out")
            await self._serve_validator(conn, key)
            return
        msg = first
        while msg is not None:
            self._on_client_message(conn, msg)
            # A client pipelining requests gets a few answered per turn, so that their
            # responses leave in one write (a write wakes the client: it costs more than
            # answering a request, bar the signature check).
            for _ in range(CLIENT_BURST - 1):
                msg = conn.receive_buffered()
                if msg is NEED_DATA:
                    break
                self._on_client_message(conn, msg)
            msg = await conn.receive()

    async def _handshake(self, conn: Connection, hello: Any) -> bytes:
        return await handshake(conn, key=self.key, chain_id=self.chain_id,
                               genesis_hash=self.genesis_hash, validators=self.validators,
                               their_hello=hello)

    async def _serve_validator(self, conn: Connection, key: bytes) -> None:
        log.info("validator %s connected (%s)", key.hex()[:12], conn.remote)
        self.peers.setdefault(key, []).append(conn)
        conn.send({"gossip": "status", "height": self.app.height})
        while True:
            msg = await conn.receive()
            if msg is None:
                return
            self._on_peer_message(conn, key, msg)

    def _forget(self, conn: Connection) -> None:
        if conn.peer_key is not None:
            conns = self.peers.get(conn.peer_key, [])
            if conn in conns:
                conns.remove(conn)
                log.info("validator %s disconnected (%s)", conn.peer_key.hex()[:12], conn.remote)
            if not conns:
                self.peers.pop(conn.peer_key, None)
                self.peer_heights.pop(conn.peer_key, None)
        self.header_subs.discard(conn)
        for k in self._conn_keys.pop(conn, set()):
            subs = self.key_subs.get(k)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self.key_subs[k]

    # -- validator messages --------------------------------------------------------------------

    def _on_peer_message(self, conn: Connection, key: bytes, msg: Any) -> None:
        """Handle one message from an authenticated validator.

        Raises :class:`RemoteProtocolError` (the connection is closed) for a message that
        breaks the protocol.
        """
        if not isinstance(msg, dict):
            raise MalformedFrame("a message must be a map")
        kind = msg.get("gossip")
        if kind is None:
            if "method" in msg:
                self._on_client_message(conn, msg)
            elif "result" in msg or "error" in msg:
                conn.deliver_response(msg)
            else:
                raise MalformedFrame("unknown message")
            return
        now = self.now_ms()
        match kind:
            case "vote":
                vote = Vote.from_wire(msg.get("vote"))
                self._core_input(lambda: self.core.on_vote(vote, now), conn)
            case "proposal":
                proposal = Proposal.from_wire(msg.get("proposal"))
                block = Block.from_wire(msg.get("block"))
                if block.hash() != proposal.block_hash:
                    raise RemoteProtocolError("proposal names another block")
                self._core_input(lambda: self.core.on_proposal(proposal, block, now), conn)
            case "tx" | "txs":
                raws = [msg.get("tx")] if kind == "tx" else msg.get("txs")
                if not (isinstance(raws, list) and len(raws) <= TX_GOSSIP_BATCH
                        and all(isinstance(raw, bytes) for raw in raws)):
                    raise MalformedFrame(f"tx gossip must carry bytes, at most "
                                         f"{TX_GOSSIP_BATCH} txs per message")
                # Admission (a signature check and more) is queued for the tx task, so that
                # a flood of gossiped txs never delays the votes and proposals behind it.
                if self._gossip_queued + len(raws) > GOSSIP_TX_QUEUE:
                    self.dropped_gossip_txs += len(raws)  # best effort: the origin still has them
                elif raws:
                    self._gossip_queued += len(raws)
                    self._gossiped_txs.send_nowait(raws)
            case "status":
                height = msg.get("height")
                if not isinstance(height, int) or isinstance(height, bool) or height < 0:
                    raise MalformedFrame("status height must be a non-negative integer")
                self.peer_heights[key] = height
                if height >= self.core.height:
                    self._catchup_wake.set()
            case _:
                raise MalformedFrame(f"unknown gossip {kind!r}")

    def _core_input(self, call: Callable[[], Sequence[object]], conn: Connection) -> None:
        try:
            actions = call()
        except (MalformedFrame, VerificationError, InvalidBlock) as exc:
            raise RemoteProtocolError(f"invalid consensus message: {exc}") from None
        self._execute(actions)

    # -- client requests -----------------------------------------------------------------------

    def _on_client_message(self, conn: Connection, msg: Any) -> None:
        """Answer one request. Raises :class:`MalformedFrame` if it is not a request at all."""
        if not isinstance(msg, dict):
            raise MalformedFrame("a request must be a map")
        rid = msg.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise MalformedFrame("a request needs an integer id")
        method = msg.get("method")
        params = msg.get("params", {})
        try:
            if not isinstance(method, str):
                raise RequestError("bad_request", "method must be a string")
            if not isinstance(params, dict):
                raise RequestError("bad_request", "params must be a map")
            result = self._dispatch(conn, method, params)
        except (RequestError, InvalidTx) as exc:
            conn.send({"id": rid, "error": {"code": exc.code, "message": exc.message}})
            return
        except Exception as exc:
            # A bug reached by some input must not take the validator down; this connection
            # is answered and closed. Consensus state is untouched: requests only read it,
            # apart from mempool admission, and never run consensus actions in here.
            log.exception("internal error answering %s", method)
            conn.send({"id": rid, "error": {"code": "internal_error", "message": str(exc)}})
            raise RemoteProtocolError("internal error while answering a request") from None
        conn.send({"id": rid, "result": result})
        if method == "submit_tx":
            # Outside the catch-all above on purpose: an error while executing consensus
            # actions (a failed Persist) must stop the validator, not be answered away.
            self._execute(self.core.on_txs_available(self.now_ms()))

    def _dispatch(self, conn: Connection, method: str, params: dict[str, Any]) -> Any:
        match method:
            case "status":
                return self._status()
            case "submit_tx":
                return self._submit(params)
            case "block":
                return self._block(_param_int(params, "height"))
            case "query":
                return self._query(_param_key(params), _param_int(params, "height", default=0))
            case "subscribe_headers":
                self.header_subs.add(conn)
                return {"subscribed": True}
            case "subscribe_key":
                k = _param_key(params)
                mine = self._conn_keys.setdefault(conn, set())
                if k not in mine and len(mine) >= MAX_KEY_SUBSCRIPTIONS:
                    raise RequestError("too_many_subscriptions",
                                       f"at most {MAX_KEY_SUBSCRIPTIONS} keys per connection")
                mine.add(k)
                self.key_subs.setdefault(k, set()).add(conn)
                return {"subscribed": True}
            case _:
                raise RequestError("unknown_method", f"no method {method!r}")

    def _status(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "height": self.app.height,
            "block_hash": self.app.last_hash if self.app.height else b"",
            "validators": [v.hex() for v in self.validators.members],
            "peers": len(self.peers),
            "mempool": len(self.mempool),
        }

    def _submit(self, params: dict[str, Any]) -> dict[str, Any]:
        raw = params.get("tx")
        if not isinstance(raw, bytes):
            raise InvalidTx("malformed", "params.tx must be the encoded transaction bytes")
        tx_hash = self.mempool.add(raw, self.app.state, self.chain_id)
        self._queue_tx_gossip(raw)
        return {"accepted": True, "tx_hash": tx_hash}

    def _block(self, height: int) -> dict[str, Any]:
        h = self.app.height if height == 0 else height
        block = self.store.block(h) if h > 0 else None
        commit = self.store.commit(h) if block is not None else None
        if block is None or commit is None:
            raise RequestError("not_found", f"no committed block at height {height}")
        return {"block": block.to_wire(), "commit": commit.to_wire()}

    def _query(self, key: bytes, height: int) -> dict[str, Any]:
        h, st = self.app.state_at(height)
        return {"height": h, "value": st.get(key), "proof": st.prove(key).to_wire()}


def _param_int(params: dict[str, Any], name: str, *, default: int | None = None) -> int:
    v = params.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 2**63:
        raise RequestError("bad_request", f"params.{name} must be a non-negative integer")
    return v


def _param_key(params: dict[str, Any]) -> bytes:
    k = params.get("key")
    if not isinstance(k, bytes) or not 0 < len(k) <= MAX_QUERY_KEY:
        raise RequestError("bad_request", f"params.key must be 1 to {MAX_QUERY_KEY} bytes")
    return k


# ---------------------------------------------------------------------------------------------
# entry points


async def serve(home: Path, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the validator of ``home`` until cancelled; ``started()`` with the bound address.

    Raises :class:`ConfigError` (bad home, port in use) and :class:`StorageError`.
    """
    cfg, genesis, key = load_validator_home(home)
    store = Store(cfg.store_path)
    try:
        store.init_genesis(genesis)
        node = Node(cfg, genesis, key, store)
        await node.run(task_status=task_status)
    finally:
        store.close()


async def _main_async(home: Path) -> None:
    # The receiver must outlive the nursery: leaving its block restores the default handlers.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            addr = await nursery.start(serve, home)
            print(f"listening {format_hostport(addr)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m ledger.node --home DIR``: run a validator until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m ledger.node",
                                     description="Run a tfgrid ledger validator.")
    parser.add_argument("--home", required=True, type=Path, help="validator home directory")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        trio.run(_main_async, args.home)
    except BaseException as exc:
        # Errors leave trio wrapped in exception groups; an operator's error is one line.
        err = _operator_error(exc)
        if isinstance(err, ConfigError):
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        if isinstance(err, StorageError):
            print(f"storage error: {err}", file=sys.stderr)
            sys.exit(1)
        raise


def _operator_error(exc: BaseException) -> BaseException | None:
    """The ConfigError/StorageError that ``exc`` is or (in exception groups) contains."""
    if isinstance(exc, ConfigError | StorageError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _operator_error(sub)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    main()
