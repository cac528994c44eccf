"""A running validator facing bad input: broken frames, bad handshakes, refused transactions.

Each refusal is a clear error (or, for framing errors, an error frame and a closed
connection); the validators keep running, and nothing refused reaches a block: the chain is
configured to make blocks only for transactions, so an unchanged height and block hash
show that the state is unchanged.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from ledger import api, keyspace
from ledger.client import LedgerClient
from ledger.config import init_validator_home
from ledger.keys import KeyPair
from ledger.peer import auth_message, hello_message, new_challenge
from ledger.tx import Tx
from tests.conftest import FAST_CONSENSUS, MIN_FEE, ApiError, Cluster, RawClient, transfer

pytestmark = pytest.mark.slow

ALICE = KeyPair.from_seed(b"\x31" * 32)
BOB = KeyPair.from_seed(b"\x32" * 32)
POOR = KeyPair.from_seed(b"\x33" * 32)
OUTSIDER = KeyPair.from_seed(b"\x34" * 32)  # not a validator
RICH = 10**15
POOR_FUNDS = 50_000


@dataclass
class Running:
    cluster: Cluster
    twin_tx: Tx  # alice's committed twin registration (nonce 0)
    height: int
    block_hash: bytes

    @property
    def addr(self) -> tuple[str, int]:
        return self.cluster[0].addr


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    # Blocks only when there are transactions (the empty-block interval is an hour).
    c = Cluster(tmp_path_factory.mktemp("bad-input"), 4,
                accounts=[(ALICE.public_key, RICH), (BOB.public_key, RICH),
                          (POOR.public_key, POOR_FUNDS)],
                empty_block_interval_ms=3_600_000, consensus=dict(FAST_CONSENSUS), params={})
    try:
        c.start_all()
        twin_tx = Tx("twin_register", ALICE.public_key, 0, MIN_FEE,
                     {"name": "alice", "endpoint": "127.0.0.1:9000"}).signed(ALICE, c.genesis.chain_id)

        async def setup() -> tuple[int, bytes]:
            async with LedgerClient(c.genesis, c.addrs) as client:
                await client.submit_and_wait(twin_tx, timeout_s=30)
                # every validator has the block before the baseline is taken
                status = await client.status()
            for i in range(len(c)):
                await c.wait_height(i, status.height)
            return status.height, status.block_hash

        height, block_hash = trio.run(setup)
        yield Running(c, twin_tx, height, block_hash)
    finally:
        c.stop_all()


async def assert_unchanged(r: Running) -> None:
    """All validators alive, at the baseline height and block, with empty mempools."""
    for i, v in enumerate(r.cluster.validators):
        assert v.alive, f"{v.name} died"
        status = await r.cluster.status(i)
        assert status["height"] == r.height
        assert status["block_hash"] == r.block_hash
        assert status["mempool"] == 0


async def expect_closed_with_error(client: RawClient, code: str) -> None:
    """The validator answers one error frame with ``code`` and closes the connection."""
    msg = await client.receive()
    assert isinstance(msg, dict)
    assert msg["error"]["code"] == code
    assert msg["error"]["message"]
    assert await client.receive() is None


async def refused(r: Running, tx: Tx | bytes) -> ApiError:
    client = await RawClient.connect(r.addr)
    try:
        raw = tx if isinstance(tx, bytes) else tx.encode()
        with pytest.raises(ApiError) as info:
            await client.call("submit_tx", {"tx": raw})
        # the connection stays usable after a refusal
        assert (await client.call("status"))["height"] == r.height
    finally:
        await client.aclose()
    return info.value


# -- framing -------------------------------------------------------------------------------------


async def test_malformed_frame(running: Running) -> None:
    client = await RawClient.connect(running.addr)
    try:
        await client.send_bytes(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1 is never msgpack
        await expect_closed_with_error(client, "malformed")
    finally:
        await client.aclose()
    await assert_unchanged(running)


async def test_oversized_frame(running: Running) -> None:
    client = await RawClient.connect(running.addr)
    try:
        # Only the length prefix: the validator must refuse before waiting for the body.
        await client.send_bytes(struct.pack(">I", api.CLIENT_MAX_FRAME + 1))
        await expect_closed_with_error(client, "frame_too_large")
    finally:
        await client.aclose()
    await assert_unchanged(running)


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: validator\r\n\r\n", "frame_too_large"),
        (b"\x00\x00\x00\x08\xff\xfe\xfd\xfc\x00\x01\x02\x03", "malformed"),
        (b"\x00\x00\x00\x01\xca", "malformed"),  # truncated float32
    ],
)
async def test_garbage_bytes(running: Running, garbage: bytes, code: str) -> None:
    client = await RawClient.connect(running.addr)
    try:
        await client.send_bytes(garbage)
        await expect_closed_with_error(client, code)
    finally:
        await client.aclose()
    await assert_unchanged(running)


@pytest.mark.parametrize("message", [[1, 2, 3], "status", {"method": "status"}, {"id": "x"}])
async def test_frames_that_are_not_requests(running: Running, message: Any) -> None:
    client = await RawClient.connect(running.addr)
    try:
        await client.send(message)
        await expect_closed_with_error(client, "malformed")
    finally:
        await client.aclose()
    await assert_unchanged(running)


async def test_bad_requests_are_refused_but_keep_the_connection(running: Running) -> None:
    client = await RawClient.connect(running.addr)
    try:
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("no_such_method", {}, "unknown_method"),
            ("block", {"height": -1}, "bad_request"),
            ("block", {"height": running.height + 100}, "not_found"),
            ("query", {"key": "not bytes"}, "bad_request"),
            ("query", {"key": b"x", "height": running.height + 100}, "not_found"),
        ]
        for method, params, code in cases:
            with pytest.raises(ApiError) as info:
                await client.call(method, params)
            assert info.value.code == code
        assert (await client.call("status"))["height"] == running.height
    finally:
        await client.aclose()
    await assert_unchanged(running)


# -- validator handshake -------------------------------------------------------------------------


async def test_handshake_from_a_non_validator_is_refused(running: Running) -> None:
    g = running.cluster.genesis
    client = await RawClient.connect(running.addr)
    try:
        await client.send(hello_message(g.chain_id, g.hash(), OUTSIDER, new_challenge()))
        await expect_closed_with_error(client, "protocol_error")
    finally:
        await client.aclose()
    await assert_unchanged(running)


async def test_handshake_for_another_chain_is_refused(running: Running) -> None:
    g = running.cluster.genesis
    key = running.cluster.keys[1]
    client = await RawClient.connect(running.addr)
    try:
        await client.send(hello_message("other-chain", g.hash(), key, new_challenge()))
        await expect_closed_with_error(client, "protocol_error")
    finally:
        await client.aclose()
    await assert_unchanged(running)


async def test_handshake_with_a_stolen_identity_is_refused(running: Running) -> None:
    """A validator's public key without its private key: the auth signature fails."""
    g = running.cluster.genesis
    victim = running.cluster.keys[1]
    client = await RawClient.connect(running.addr)
    try:
        await client.send(hello_message(g.chain_id, g.hash(), victim, new_challenge()))
        hello = await client.receive()
        assert "hello" in hello
        auth = await client.receive()
        assert "auth" in auth
        # sign the validator's challenge with the wrong key
        await client.send(auth_message(OUTSIDER, g.chain_id, hello["hello"]["challenge"], g.hash()))
        await expect_closed_with_error(client, "protocol_error")
    finally:
        await client.aclose()
    await assert_unchanged(running)


# -- refused transactions ------------------------------------------------------------------------


async def test_bad_signature(running: Running) -> None:
    chain = running.cluster.genesis.chain_id
    good = transfer(ALICE, BOB.public_key, 5, 1, chain_id=chain)
    forged = Tx(good.type, good.sender, good.nonce, good.fee, good.body,
                BOB.sign(good.sign_bytes(chain)))
    err = await refused(running, forged)
    assert err.code == "bad_signature"
    # signed for another chain: same refusal
    err = await refused(running, transfer(ALICE, BOB.public_key, 5, 1, chain_id="other-chain"))
    assert err.code == "bad_signature"
    await assert_unchanged(running)


async def test_replayed_and_skipped_nonces(running: Running) -> None:
    chain = running.cluster.genesis.chain_id
    # the very same committed transaction again
    err = await refused(running, running.twin_tx)
    assert err.code == "duplicate"
    # a new transaction reusing the spent nonce 0
    err = await refused(running, transfer(ALICE, BOB.public_key, 5, 0, chain_id=chain))
    assert err.code == "bad_nonce"
    # skipping ahead: the next nonce is 1
    err = await refused(running, transfer(ALICE, BOB.public_key, 5, 7, chain_id=chain))
    assert err.code == "bad_nonce"
    assert "1" in err.message
    await assert_unchanged(running)


async def test_duplicate_twin_name(running: Running) -> None:
    chain = running.cluster.genesis.chain_id
    tx = Tx("twin_register", BOB.public_key, 0, MIN_FEE,
            {"name": "alice", "endpoint": "127.0.0.1:9001"}).signed(BOB, chain)
    err = await refused(running, tx)
    assert err.code == "name_taken"
    await assert_unchanged(running)


async def test_transfer_over_balance(running: Running) -> None:
    chain = running.cluster.genesis.chain_id
    err = await refused(running, transfer(POOR, BOB.public_key, POOR_FUNDS, 0, chain_id=chain))
    assert err.code == "insufficient_funds"
    await assert_unchanged(running)


async def test_unknown_tx_type(running: Running) -> None:
    chain = running.cluster.genesis.chain_id
    tx = Tx("print_money", ALICE.public_key, 1, MIN_FEE, {"amount": 10**9}).signed(ALICE, chain)
    err = await refused(running, tx)
    assert err.code == "unknown_type"
    await assert_unchanged(running)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not msgpack at all \xc1", "malformed"),
        (b"\x93\x01\x02\x03", "malformed"),  # a msgpack list, not a tx envelope
        (b"\x00" * (64 * 1024 + 1), "too_large"),
    ],
)
async def test_malformed_tx_bytes(running: Running, raw: bytes, code: str) -> None:
    err = await refused(running, raw)
    assert err.code == code
    await assert_unchanged(running)


async def test_state_untouched_by_refusals(running: Running) -> None:
    """After all of the above, verified queries show the accounts as the setup left them."""
    from ledger.codec import unpack

    async with LedgerClient(running.cluster.genesis, running.cluster.addrs) as client:
        assert await client.next_nonce(ALICE.public_key) == 1
        assert await client.next_nonce(BOB.public_key) == 0
        poor, _ = await client.query(keyspace.account(POOR.public_key))
        assert poor is not None
        assert unpack(poor)["balance"] == POOR_FUNDS
        owner, _ = await client.query(keyspace.twin_by_name("alice"))
        assert owner is not None
    await assert_unchanged(running)


# -- the daemon's command line -------------------------------------------------------------------


def run_node(home: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ledger.node", "--home", str(home)],
                          capture_output=True, timeout=60, check=False)


async def test_second_daemon_on_a_running_home_refuses(running: Running) -> None:
    """Two processes must never sign with one key: the second one exits with a clear line."""
    proc = run_node(running.cluster[0].home)
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert b"storage error" in proc.stderr
    assert b"Traceback" not in proc.stderr
    await assert_unchanged(running)


def test_missing_home_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_node(tmp_path / "nowhere")
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert proc.stderr.decode().strip().startswith("error: validator home")
    assert b"Traceback" not in proc.stderr


def test_listen_port_in_use_is_a_clear_error(tmp_path: Path, running: Running) -> None:
    g = running.cluster.genesis
    home = tmp_path / "v"
    # the first validator's identity, but a fresh store: only the busy port can stop it
    init_validator_home(home, genesis=g, seed=running.cluster.keys[0].seed,
                        listen=running.cluster[1].addr, peers=[])
    proc = run_node(home)
    assert proc.returncode == 2
    assert b"cannot listen on" in proc.stderr
    assert b"Traceback" not in proc.stderr
