"""A one-process ledger peer that can lie: for testing what clients verify.

:class:`FakeLedger` keeps a real certified chain: every block applies the submitted txs with
the real state machine (:class:`ledger.state.LedgerState`), and is precommitted by the real
validator keys of its genesis, so headers, commits and state proofs all verify. On top of
that a test can

- ``forge(key, value)``: write an entry straight into the state of the next block, bypassing
  the state machine (a contract with a bad signature that a real validator would refuse); the
  block is still certified, so the entry comes with a valid proof;
- ``lie(key, value)``: answer queries for ``key`` with ``value`` but the proof of the real
  entry, which cannot verify.

It serves the client half of :mod:`ledger.api` (status, block, query, submit_tx,
subscribe_headers) on two real loopback TCP ports, one that lies (``addr``) and one that
tells the truth about the same chain (``honest_addr``), and records every submitted tx.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from ledger.api import CLIENT_MAX_FRAME
from ledger.codec import EMPTY_HASH, hash_bytes
from ledger.errors import InvalidTx, TfgridError
from ledger.keys import KeyPair
from ledger.mempool import Mempool
from ledger.state import LedgerState
from ledger.tx import Tx
from ledger.types import PRECOMMIT, Block, Commit, Genesis, Header, Vote, merkle_root
from ledger.wire import NEED_DATA, FrameDecoder, encode_frame


class FakeLedger:
    def __init__(self, genesis: Genesis, validator_keys: list[KeyPair]) -> None:
        self.genesis = genesis
        self.keys = validator_keys
        self.state = LedgerState.from_genesis(genesis)
        self.blocks: list[Block] = []
        self.commits: list[Commit] = []
        self.states: list[LedgerState] = []
        self.mempool = Mempool()
        self.submitted: list[Tx] = []
        self.forged: dict[bytes, bytes | None] = {}
        self.lies: dict[bytes, bytes | None] = {}
        self._subscribers: set[trio.abc.Stream] = set()
        self.new_block = trio.Event()
        self.addr: tuple[str, int] = ("", 0)
        self.honest_addr: tuple[str, int] = ("", 0)

    @property
    def height(self) -> int:
        return len(self.blocks)

    def forge(self, key: bytes, value: bytes | None) -> None:
        self.forged[key] = value

    def lie(self, key: bytes, value: bytes | None) -> None:
        self.lies[key] = value

    def submit(self, tx: Tx) -> bytes:
        """Admit a tx as a validator's mempool would. Raises :class:`InvalidTx`."""
        tx_hash = self.mempool.add(tx.encode(), self.state, self.genesis.chain_id)
        self.submitted.append(tx)
        return tx_hash

    def make_block(self) -> Block:
        """Apply the pending txs and forged entries; certify and append the block."""
        h = self.height + 1
        txs = self.mempool.reap(1000, 4 << 20)
        prev_time = self.blocks[-1].header.time_ms if self.blocks else self.genesis.genesis_time_ms
        now = max(time.time_ns() // 1_000_000, prev_time + 1)
        result = self.state.apply_block(h, now, txs)
        state = result.state
        if self.forged:
            state = LedgerState(self.genesis, state.tree.update(self.forged), state.params)
            self.forged = {}
        vset = self.genesis.validators
        last_commit = self.commits[-1] if self.commits else None
        header = Header(
            chain_id=self.genesis.chain_id, height=h, time_ms=now,
            prev_hash=self.blocks[-1].hash() if self.blocks else EMPTY_HASH,
            last_commit_hash=EMPTY_HASH if last_commit is None else last_commit.hash(),
            txs_root=merkle_root([hash_bytes(t) for t in txs]), state_root=state.root,
            validators_hash=vset.hash(), next_validators_hash=vset.hash(),
            proposer=vset.proposer(h, 0))
        block = Block(header, tuple(txs), last_commit)
        votes = [Vote(PRECOMMIT, h, 0, header.hash(), k.public_key).signed(k, header.chain_id)
                 for k in self.keys]
        self.blocks.append(block)
        self.commits.append(Commit.from_votes(votes))
        self.states.append(state)
        self.state = state
        self.mempool.update(txs, state, self.genesis.chain_id)
        self.new_block.set()
        self.new_block = trio.Event()
        return block

    # -- serving ---------------------------------------------------------------------------

    async def run(self, *, block_interval_s: float = 0.3,
                  task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        liars = await trio.open_tcp_listeners(0, host="127.0.0.1")
        honest = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.addr = liars[0].socket.getsockname()[:2]
        self.honest_addr = honest[0].socket.getsockname()[:2]

        async def handle_honestly(stream: trio.SocketStream) -> None:
            await self._handle(stream, lying=False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, liars)
            nursery.start_soon(trio.serve_listeners, handle_honestly, honest)
            nursery.start_soon(self._block_loop, block_interval_s)
            task_status.started(self.addr)

    async def _block_loop(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            block = self.make_block()
            frame = encode_frame({"push": "header", "block": block.to_wire(),
                                  "commit": self.commits[-1].to_wire()}, CLIENT_MAX_FRAME)
            for s in list(self._subscribers):
                try:
                    await s.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.discard(s)

    async def _handle(self, stream: trio.SocketStream, lying: bool = True) -> None:
        decoder = FrameDecoder(CLIENT_MAX_FRAME)
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                decoder.receive_data(data)
                while (msg := decoder.next_message()) is not NEED_DATA:
                    reply = self._answer(stream, msg, lying)
                    await stream.send_all(encode_frame(reply, CLIENT_MAX_FRAME))
        except (trio.BrokenResourceError, trio.ClosedResourceError, TfgridError):
            return
        finally:
            self._subscribers.discard(stream)

    def _answer(self, stream: trio.abc.Stream, msg: Any, lying: bool) -> dict[str, Any]:
        rid = msg.get("id")
        params = msg.get("params", {})
        try:
            result = self._dispatch(stream, msg.get("method"), params, lying)
        except InvalidTx as exc:
            return {"id": rid, "error": {"code": exc.code, "message": exc.message}}
        except LookupError as exc:
            return {"id": rid, "error": {"code": "not_found", "message": str(exc)}}
        return {"id": rid, "result": result}

    def _dispatch(self, stream: trio.abc.Stream, method: str, params: dict[str, Any],
                  lying: bool) -> Any:
        if method == "status":
            return {"chain_id": self.genesis.chain_id, "height": self.height,
                    "block_hash": self.blocks[-1].hash() if self.blocks else b"",
                    "validators": [k.public_key.hex() for k in self.keys], "peers": 0,
                    "mempool": len(self.mempool)}
        if method == "block":
            h = params.get("height") or self.height
            if not 1 <= h <= self.height:
                raise LookupError(f"no block at height {h}")
            return {"block": self.blocks[h - 1].to_wire(), "commit": self.commits[h - 1].to_wire()}
        if method == "query":
            key = params["key"]
            h = self.height
            state = self.states[-1] if self.states else self.state
            value = self.lies[key] if lying and key in self.lies else state.get(key)
            return {"height": h, "value": value, "proof": state.prove(key).to_wire()}
        if method == "submit_tx":
            tx = Tx.decode(params["tx"])
            return {"accepted": True, "tx_hash": self.submit(tx)}
        if method == "subscribe_headers":
            self._subscribers.add(stream)
            return {"subscribed": True}
        raise LookupError(f"no method {method!r}")
