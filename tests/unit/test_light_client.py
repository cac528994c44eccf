"""LedgerClient against in-process fake peers speaking the api.py frames over memory streams.

Time is trio's MockClock (``autojump_clock``): timeouts and stalls are asserted at exact
instants, nothing sleeps for real. Memory streams rather than loopback sockets because the
autojump clock would otherwise jump while the kernel still holds bytes in flight.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing

from ledger import keyspace
from ledger.api import CLIENT_MAX_FRAME
from ledger.client import LedgerClient
from ledger.codec import hash_bytes, pack
from ledger.errors import (
    ConfigError,
    ConflictingHeaders,
    InvalidTx,
    LedgerTimeout,
    LedgerUnavailable,
    LocalProtocolError,
    NotFound,
)
from ledger.tx import Tx
from ledger.types import Header
from ledger.wire import NEED_DATA, FrameDecoder, encode_frame
from tests.unit.chainmaker import GENESIS, KEYS, ChainMaker, sign_commit

TIMEOUT = 5.0


class FakePeer:
    """A ledger peer serving a :class:`ChainMaker` chain, honestly unless told otherwise.

    ``behaviour``: "honest", "dead" (refuses connections), "stall" (reads, never answers),
    "bad_proof" (tampers with queried values), "forged" (serves blocks with a 2-of-4 commit),
    "fork" (serves a fork certified by all four keys), "oversized" (announces a huge frame),
    "refuse" (refuses every tx), "garbage" (answers with a wrong request id), "swallow"
    (acts on requests, never answers).
    ``upto`` caps the height it admits to (a lagging peer).
    """

    def __init__(self, chain: ChainMaker, behaviour: str = "honest",
                 upto: int | None = None) -> None:
        self.chain = chain
        self.behaviour = behaviour
        self.upto = upto
        self.connects = 0
        self.requests: list[str] = []
        self.txs: list[bytes] = []
        self._subscribers: list[tuple[trio.abc.Stream, trio.Lock]] = []

    @property
    def height(self) -> int:
        return self.chain.height if self.upto is None else min(self.upto, self.chain.height)

    async def serve(self, stream: trio.abc.Stream) -> None:
        decoder = FrameDecoder(CLIENT_MAX_FRAME)
        lock = trio.Lock()
        try:
            while True:
                msg = decoder.next_message()
                if msg is NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    decoder.receive_data(data)
                    continue
                self.requests.append(msg["method"])
                if self.behaviour == "stall":
                    continue
                if self.behaviour == "swallow":  # takes the request, the answer is lost
                    self.answer(msg["method"], msg["params"])
                    continue
                if self.behaviour == "oversized":
                    async with lock:
                        await stream.send_all(struct.pack(">I", CLIENT_MAX_FRAME + 1))
                    continue
                reply: dict[str, Any] = {"id": msg["id"] + (1 if self.behaviour == "garbage" else 0)}
                try:
                    reply["result"] = self.answer(msg["method"], msg["params"])
                except _Refusal as exc:
                    reply["error"] = {"code": exc.code, "message": exc.message}
                async with lock:
                    await stream.send_all(encode_frame(reply))
                if msg["method"] == "subscribe_headers":
                    self._subscribers.append((stream, lock))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        c = self.chain
        if method == "status":
            top = c.block(self.height) if self.height else None
            return {"chain_id": GENESIS.chain_id, "height": self.height,
                    "block_hash": top.hash() if top else b"",
                    "validators": [k.hex() for k in GENESIS.validators.members],
                    "peers": 3, "mempool": 0}
        if method == "block":
            h = params["height"] or self.height
            if h > self.height or h < 1:
                raise _Refusal("not_found", f"no committed block at height {h}")
            return self.block_wire(h)
        if method == "query":
            h = self.height
            tree = c.tree(h)
            value = tree.get(params["key"])
            if self.behaviour == "bad_proof" and value is not None:
                value = b"tampered" + value
            return {"height": h, "value": value, "proof": tree.prove(params["key"]).to_wire()}
        if method == "submit_tx":
            raw = params["tx"]
            if self.behaviour == "refuse":
                raise _Refusal("bad_nonce", "expected nonce 7")
            if raw in self.txs:
                raise _Refusal("duplicate", "already in the mempool")
            self.txs.append(raw)
            return {"accepted": True, "tx_hash": hash_bytes(raw)}
        if method == "subscribe_headers":
            return {"subscribed": True}
        raise _Refusal("unknown_method", method)

    def block_wire(self, h: int) -> dict[str, Any]:
        block, commit = self.chain.block(h), self.chain.commit(h)
        if self.behaviour == "forged":
            commit = sign_commit(block.header, KEYS[:2])
        if self.behaviour == "fork" and h == self.height:
            block = self.chain.fork(h)
            commit = sign_commit(block.header, KEYS)
        return {"block": block.to_wire(), "commit": commit.to_wire()}

    async def publish(self, h: int) -> None:
        """Push block ``h`` to every header subscriber."""
        frame = encode_frame({"push": "header", **self.block_wire(h)})
        for stream, lock in list(self._subscribers):
            try:
                async with lock:
                    await stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove((stream, lock))


class _Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


class Net:
    """Fake peers by port, reached through memory streams served in the test's nursery."""

    def __init__(self, nursery: trio.Nursery, chain: ChainMaker) -> None:
        self.nursery = nursery
        self.chain = chain
        self.peers: dict[int, FakePeer] = {}

    def add(self, behaviour: str = "honest", upto: int | None = None) -> tuple[str, int]:
        port = 7000 + len(self.peers)
        self.peers[port] = FakePeer(self.chain, behaviour, upto)
        return ("fake", port)

    def peer(self, addr: tuple[str, int]) -> FakePeer:
        return self.peers[addr[1]]

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        peer = self.peers[port]
        peer.connects += 1
        if peer.behaviour == "dead":
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(peer.serve, server_end)
        return client_end

    def client(self, *addrs: tuple[str, int], **kw: Any) -> LedgerClient:
        kw.setdefault("timeout_s", TIMEOUT)
        return LedgerClient(GENESIS, list(addrs), connect=self.connect, **kw)


@pytest.fixture
def chain() -> ChainMaker:
    c = ChainMaker()
    c.append({keyspace.account(KEYS[0].public_key): pack({"balance": 100, "nonce": 3})})
    c.append({b"twinname/alice": b"\x01"}, txs=(b"tx-a",))
    c.append()
    return c


@pytest.fixture
async def net(nursery: trio.Nursery, chain: ChainMaker) -> AsyncIterator[Net]:
    yield Net(nursery, chain)
    nursery.cancel_scope.cancel()


def a_tx(nonce: int = 3) -> Tx:
    return Tx("transfer", KEYS[0].public_key, nonce, 1,
              {"to": KEYS[1].public_key, "amount": 5}).signed(KEYS[0], GENESIS.chain_id)


async def test_honest_peer_status_latest_block_query(net: Net, chain: ChainMaker) -> None:
    async with net.client(net.add()) as client:
        status = await client.status()
        assert (status.chain_id, status.height, status.peer) == (GENESIS.chain_id, 3, "fake:7000")
        assert status.block_hash == chain.block(3).hash()
        assert status.validators == list(GENESIS.validators.members)
        header, commit = await client.latest()
        assert header == chain.block(3).header
        assert commit.block_hash == header.hash()
        assert await client.block(2) == chain.block(2)
        assert await client.query(b"twinname/alice") == (b"\x01", 3)
        assert await client.query(b"twinname/bob") == (None, 3)
        assert await client.next_nonce(KEYS[0].public_key) == 3
        assert await client.next_nonce(KEYS[1].public_key) == 0


async def test_fails_over_from_a_dead_peer(net: Net) -> None:
    dead, good = net.add("dead"), net.add()
    async with net.client(dead, good) as client:
        assert (await client.status()).peer == "fake:7001"
        # The dead peer is set aside: the next requests go straight to the good one.
        await client.latest()
        await client.query(b"twinname/alice")
    assert net.peer(dead).connects == 1


async def test_fails_over_from_a_stalling_peer_after_the_timeout(net: Net,
                                                                 autojump_clock: Any) -> None:
    stall, good = net.add("stall"), net.add()
    async with net.client(stall, good) as client:
        t0 = trio.current_time()
        header, _ = await client.latest()
        assert trio.current_time() == t0 + TIMEOUT
        assert header.height == 3
        # Set aside now: no second wait.
        await client.query(b"twinname/alice")
        assert trio.current_time() == t0 + TIMEOUT
    assert net.peer(stall).requests == ["block"]


async def test_fails_over_from_a_peer_serving_an_invalid_proof(net: Net) -> None:
    liar, good = net.add("bad_proof"), net.add()
    async with net.client(liar, good) as client:
        assert await client.query(b"twinname/alice") == (b"\x01", 3)
        # The liar is set aside: the next query skips it.
        await client.query(b"twinname/alice")
    assert net.peer(liar).requests == ["query", "block"]
    assert net.peer(good).requests.count("query") == 2


async def test_fails_over_from_a_peer_serving_an_uncertified_block(net: Net) -> None:
    liar, good = net.add("forged"), net.add()
    async with net.client(liar, good) as client:
        header, _ = await client.latest()
        assert header.height == 3
        assert (await client.status()).peer == "fake:7001"


async def test_fails_over_from_protocol_violations(net: Net) -> None:
    big, garbage, good = net.add("oversized"), net.add("garbage"), net.add()
    async with net.client(big, garbage, good) as client:
        assert (await client.latest())[0].height == 3


async def test_a_set_aside_peer_is_still_the_last_resort(net: Net, autojump_clock: Any) -> None:
    first, second = net.add("stall"), net.add()
    async with net.client(first, second, bad_peer_s=30.0) as client:
        await client.latest()  # first stalls, second answers
        assert trio.current_time() == TIMEOUT
        net.peer(first).behaviour = "honest"
        net.peer(second).behaviour = "stall"
        await client.latest()  # second stalls; first is set aside until 35 but still tried
        assert trio.current_time() == 2 * TIMEOUT
    assert net.peer(first).requests == ["block", "block"]
    assert net.peer(second).requests == ["block", "block"]


async def test_fails_over_from_a_stale_peer(net: Net) -> None:
    good, lagging, other = net.add(), net.add(upto=2), net.add()
    async with net.client(good, lagging, other) as client:
        assert (await client.latest())[0].height == 3
        net.peer(good).behaviour = "garbage"
        # Height 3 is held: the lagging peer's "latest" block 2 is stale, "other" answers.
        assert (await client.latest())[0].height == 3
        assert net.peer(lagging).requests == ["block"]
        # A query answered at height 2 is stale too; with everyone else failing, that is
        # the reason given.
        net.peer(other).behaviour = "garbage"
        with pytest.raises(LedgerUnavailable, match="fake:7001 served something unverifiable: stale"):
            await client.query(b"twinname/alice")
        assert net.peer(lagging).requests == ["block", "query"]


async def test_conflicting_headers_are_never_swallowed(net: Net) -> None:
    good, forker, other = net.add(), net.add("fork"), net.add()
    async with net.client(good, forker, other) as client:
        assert (await client.latest())[0].height == 3
        net.peer(good).behaviour = "garbage"
        # good fails, the forker serves a second certified block 3: a fork, raised at once
        # although "other" would have answered honestly.
        with pytest.raises(ConflictingHeaders):
            await client.latest()
        with pytest.raises(ConflictingHeaders):
            await client.block(3)
    assert net.peer(other).requests == []


async def test_refused_submit_maps_to_invalid_tx_without_fail_over(net: Net) -> None:
    refuser, good = net.add("refuse"), net.add()
    async with net.client(refuser, good) as client:
        with pytest.raises(InvalidTx) as info:
            await client.submit(a_tx())
    assert (info.value.code, info.value.message) == ("bad_nonce", "expected nonce 7")
    assert net.peer(good).requests == []


async def test_submit_returns_the_tx_hash(net: Net) -> None:
    addr = net.add()
    tx = a_tx()
    async with net.client(addr) as client:
        assert await client.submit(tx) == tx.hash()
        with pytest.raises(InvalidTx, match="duplicate"):
            await client.submit(tx)
    assert net.peer(addr).txs == [tx.encode()]


async def test_resubmission_after_a_lost_answer_tolerates_duplicate(net: Net,
                                                                     autojump_clock: Any) -> None:
    first, second = net.add("swallow"), net.add()
    tx = a_tx()
    net.peer(second).txs.append(tx.encode())  # as if the first peer had gossiped it
    async with net.client(first, second) as client:
        assert await client.submit(tx) == tx.hash()
        assert trio.current_time() == TIMEOUT
    assert net.peer(first).txs == [tx.encode()]
    assert net.peer(second).requests == ["submit_tx"]


async def test_all_peers_failing_is_ledger_unavailable_with_reasons(net: Net) -> None:
    dead, liar, garbage = net.add("dead"), net.add("bad_proof"), net.add("garbage")
    async with net.client(dead, liar, garbage) as client:
        with pytest.raises(LedgerUnavailable) as info:
            await client.query(b"twinname/alice")
    text = str(info.value)
    assert "fake:7000: cannot connect" in text
    assert "fake:7001 served something unverifiable" in text
    assert "fake:7002: response id" in text


async def test_all_peers_stalling_is_a_timeout(net: Net, autojump_clock: Any) -> None:
    a, b = net.add("stall"), net.add("stall")
    async with net.client(a, b) as client:
        t0 = trio.current_time()
        with pytest.raises(LedgerTimeout):
            await client.status()
        assert trio.current_time() == t0 + 2 * TIMEOUT


async def test_missing_block_is_not_found(net: Net) -> None:
    async with net.client(net.add("dead"), net.add(), net.add()) as client:
        with pytest.raises(NotFound):
            await client.block(99)


async def test_wait_tx_polls_the_proven_txresult(net: Net, chain: ChainMaker,
                                                 autojump_clock: Any) -> None:
    tx = a_tx()
    key = keyspace.tx_result(tx.hash())

    async def commit_later() -> None:
        await trio.sleep(1.75)
        chain.append({key: pack({"height": 4, "code": "ok", "message": ""})}, txs=(tx.encode(),))

    async with net.client(net.add(), poll_interval_s=0.5) as client, trio.open_nursery() as n:
        n.start_soon(commit_later)
        outcome = await client.submit_and_wait(tx, timeout_s=10)
        assert trio.current_time() == 2.0
    assert (outcome.tx_hash, outcome.code) == (tx.hash(), "ok")


async def test_submit_and_wait_raises_for_a_tx_failed_in_its_block(net: Net, chain: ChainMaker
                                                                   ) -> None:
    tx = a_tx()
    chain.append({keyspace.tx_result(tx.hash()):
                  pack({"height": 4, "code": "insufficient_funds", "message": "balance 3"})})
    async with net.client(net.add()) as client:
        with pytest.raises(InvalidTx) as info:
            await client.submit_and_wait(tx)
    assert (info.value.code, info.value.message) == ("insufficient_funds", "balance 3")


async def test_wait_tx_times_out(net: Net, autojump_clock: Any) -> None:
    async with net.client(net.add(), poll_interval_s=0.5) as client:
        with pytest.raises(LedgerTimeout):
            await client.wait_tx(b"\x07" * 32, timeout_s=3.0)
        assert trio.current_time() == 3.0


async def test_headers_subscription_verifies_and_fails_over(net: Net, chain: ChainMaker,
                                                            autojump_clock: Any) -> None:
    first, second = net.add(), net.add()
    seen: list[Header] = []

    async def producer() -> None:
        await trio.sleep(1)
        chain.append()  # 4
        await net.peer(first).publish(4)
        await trio.sleep(1)
        chain.append()  # 5: first stalls now, second is subscribed only after the stall
        chain.append()  # 6
        await trio.sleep(40)
        await net.peer(second).publish(6)
        await trio.sleep(1)
        chain.append()  # 7: a forged push from second
        net.peer(second).behaviour = "forged"
        await net.peer(second).publish(7)

    async def collect() -> None:
        async with aclosing(client.headers()) as it:
            async for header in it:
                seen.append(header)

    async with net.client(first, second, stall_timeout_s=30.0) as client:
        async with trio.open_nursery() as n:
            n.start_soon(producer)
            with pytest.raises(LedgerUnavailable, match="fake:7001"):
                await collect()
    # 4 pushed by first at 1; first stalls until 31; 5 backfilled and 6 pushed by second at
    # 42; 7 forged at 43; then first (set aside, still tried) and second stall 30s each.
    assert trio.current_time() == 103
    assert [h.height for h in seen] == [4, 5, 6]
    assert seen == [chain.block(h).header for h in (4, 5, 6)]


async def test_client_is_unusable_after_close(net: Net) -> None:
    client = net.client(net.add())
    await client.latest()
    await client.aclose()
    with pytest.raises(LocalProtocolError):
        await client.latest()


def test_needs_peers() -> None:
    with pytest.raises(ConfigError):
        LedgerClient(GENESIS, [])



async def test_old_headers_do_not_keep_a_subscription_alive(net: Net, chain: ChainMaker,
                                                            autojump_clock: Any) -> None:
    first, second = net.add(), net.add()
    seen: list[int] = []

    async def producer() -> None:
        await trio.sleep(1)
        chain.append()  # 4
        await net.peer(first).publish(4)
        for _ in range(5):  # first is stuck: it repeats block 4 instead of moving on
            await trio.sleep(10)
            await net.peer(first).publish(4)
        chain.append()  # 5
        await trio.sleep(1)  # t = 52: second is subscribed since 31
        await net.peer(second).publish(5)

    async with net.client(first, second, stall_timeout_s=30.0) as client, \
            trio.open_nursery() as n:
        n.start_soon(producer)
        async with aclosing(client.headers()) as it:
            async for header in it:
                seen.append(header.height)
                if header.height == 5:
                    break
        assert trio.current_time() == 52
    assert seen == [4, 5]


async def test_a_forked_push_raises_conflicting_headers(net: Net, autojump_clock: Any) -> None:
    good, forker = net.add(), net.add("fork")

    async def collect(client: LedgerClient) -> None:
        async with aclosing(client.headers()) as it:
            async for _header in it:
                pass

    async def publish_fork() -> None:
        await trio.sleep(1)
        await net.peer(forker).publish(3)

    async with net.client(good, forker) as client:
        await client.latest()  # honest block 3 from good
        net.peer(good).behaviour = "garbage"  # the subscription moves to the forker
        async with trio.open_nursery() as n:
            n.start_soon(publish_fork)
            with pytest.raises(ConflictingHeaders):
                await collect(client)


async def test_wait_tx_rides_out_a_peer_outage(net: Net, chain: ChainMaker,
                                               autojump_clock: Any) -> None:
    addr = net.add()
    tx = a_tx()
    async with net.client(addr, poll_interval_s=0.5) as client:
        await client.submit(tx)
        net.peer(addr).behaviour = "garbage"

        async def recover() -> None:
            await trio.sleep(3.25)
            chain.append({keyspace.tx_result(tx.hash()):
                          pack({"height": 4, "code": "ok", "message": ""})})
            net.peer(addr).behaviour = "honest"

        async with trio.open_nursery() as n:
            n.start_soon(recover)
            outcome = await client.wait_tx(tx.hash(), timeout_s=10)
            assert trio.current_time() == 3.5
    assert outcome.code == "ok"


async def test_concurrent_requests_do_not_queue_on_one_connection(net: Net,
                                                                  autojump_clock: Any) -> None:
    addr = net.add()
    async with net.client(addr) as client:
        await client.latest()
        results: list[tuple[bytes | None, int]] = []

        async def one() -> None:
            results.append(await client.query(b"twinname/alice"))

        async with trio.open_nursery() as n:
            for _ in range(6):
                n.start_soon(one)
    assert results == [(b"\x01", 3)] * 6
    assert 1 < net.peer(addr).connects <= 4


async def test_state_before_the_first_block_is_proven_from_the_genesis(net: Net) -> None:
    empty = ChainMaker()
    net.chain = empty
    addr = net.add()
    async with net.client(addr) as client:
        status = await client.status()
        assert (status.height, status.block_hash) == (0, b"")
        assert await client.next_nonce(KEYS[0].public_key) == 0
        value, height = await client.query(keyspace.account(KEYS[0].public_key))
        assert height == 0
        assert value is not None
        with pytest.raises(NotFound):
            await client.latest()
        # Once a block is verified, height-0 answers are stale.
        empty.append()
        await client.latest()
        net.peer(addr).upto = 0
        with pytest.raises(LedgerUnavailable, match="stale"):
            await client.query(keyspace.account(KEYS[0].public_key))


async def test_a_lie_about_genesis_state_is_caught(net: Net) -> None:
    net.chain = ChainMaker()
    liar, good = net.add("bad_proof"), net.add()
    async with net.client(liar, good) as client:
        value, height = await client.query(keyspace.account(KEYS[0].public_key))
    assert height == 0
    assert value == net.chain.genesis_tree().get(keyspace.account(KEYS[0].public_key))
    assert net.peer(liar).requests == ["query"]
