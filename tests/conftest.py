"""Shared fixtures: validator clusters as real processes, and a raw peer-API client.

``cluster_factory(n, ...)`` creates ``n`` validator homes on free 127.0.0.1 ports and returns
a :class:`Cluster` whose validators run as real ``python -m ledger.node`` subprocesses. At
teardown exactly the processes the fixture started are stopped, by pid (SIGTERM, then SIGKILL
if one does not stop in time); nothing is ever killed by name.

:class:`RawClient` speaks the framed API directly (no verification): the bad-input tests need
to send broken frames, and status polling needs nothing more.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from ledger.config import init_validator_home, make_genesis
from ledger.errors import InvalidTx
from ledger.keys import KeyPair
from ledger.tx import Tx
from ledger.types import Block
from ledger.wire import NEED_DATA, FrameDecoder, encode_frame

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

# Fast round timeouts: loopback needs far less than the production defaults, and recovery
# tests (a stopped proposer) then take a few seconds instead of tens.
FAST_CONSENSUS = {
    "timeout_propose_ms": 500,
    "timeout_propose_delta_ms": 250,
    "timeout_prevote_ms": 250,
    "timeout_prevote_delta_ms": 250,
    "timeout_precommit_ms": 250,
    "timeout_precommit_delta_ms": 250,
    "rebroadcast_ms": 500,
}

CHAIN_ID = "test-chain"
MIN_FEE = 10_000


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------
# raw client


class ApiError(Exception):
    """The validator answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RawClient:
    """One TCP connection speaking framed msgpack requests; no verification at all."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(64 * 1024 * 1024)
        self._next_id = 0

    @classmethod
    async def connect(cls, addr: tuple[str, int]) -> RawClient:
        return cls(await trio.open_tcp_stream(*addr))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, message: Any) -> None:
        await self.stream.send_all(encode_frame(message, 64 * 1024 * 1024))

    async def receive(self, timeout_s: float = 10.0) -> Any:
        """The next message, or None when the validator closed the connection."""
        with trio.fail_after(timeout_s):
            while True:
                msg = self.decoder.next_message()
                if msg is not NEED_DATA:
                    return msg
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                self.decoder.receive_data(data)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; pushes arriving meanwhile are skipped.

        Raises :class:`ApiError` for an error answer, ``EOFError`` if the connection closed.
        """
        self._next_id += 1
        rid = self._next_id
        await self.send({"id": rid, "method": method, "params": params or {}})
        while True:
            msg = await self.receive()
            if msg is None:
                raise EOFError("validator closed the connection")
            if msg.get("id") != rid:
                continue
            if "error" in msg:
                raise ApiError(msg["error"]["code"], msg["error"]["message"])
            return msg["result"]

    async def submit(self, tx: Tx) -> bytes:
        """Submit; raises :class:`InvalidTx` with the validator's code as it refused it."""
        try:
            res = await self.call("submit_tx", {"tx": tx.encode()})
        except ApiError as exc:
            raise InvalidTx(exc.code, exc.message) from None
        return bytes(res["tx_hash"])


async def call_once(addr: tuple[str, int], method: str, params: dict[str, Any] | None = None) -> Any:
    client = await RawClient.connect(addr)
    try:
        return await client.call(method, params)
    finally:
        await client.aclose()


async def poll(predicate: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str,
               interval_s: float = 0.1) -> None:
    """Await ``predicate()`` until it is true; fail the test after ``timeout_s``."""
    deadline = trio.current_time() + timeout_s
    while True:
        if await predicate():
            return
        if trio.current_time() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await trio.sleep(interval_s)


# ---------------------------------------------------------------------------------------------
# clusters of real validator processes


@dataclass
class Validator:
    name: str
    home: Path
    addr: tuple[str, int]
    key: KeyPair
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home / "node.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """``n`` validators sharing one genesis; every ``start`` is a new OS process."""

    def __init__(self, root: Path, n: int, *, accounts: list[tuple[bytes, int]],
                 empty_block_interval_ms: int, consensus: dict[str, int],
                 params: dict[str, int]) -> None:
        ports = free_ports(n)
        self.keys = [KeyPair.from_seed(bytes([0xA0 + i]) * 32) for i in range(n)]
        self.genesis = make_genesis(CHAIN_ID, [k.public_key for k in self.keys], accounts, params,
                                    int(time.time() * 1000))
        peers = [("127.0.0.1", p) for p in ports]
        self.validators: list[Validator] = []
        for i, key in enumerate(self.keys):
            home = root / f"v{i}"
            init_validator_home(home, genesis=self.genesis, seed=key.seed, listen=peers[i],
                                peers=peers, empty_block_interval_ms=empty_block_interval_ms,
                                consensus=consensus)
            self.validators.append(Validator(f"v{i}", home, peers[i], key))

    def __getitem__(self, i: int) -> Validator:
        return self.validators[i]

    def __len__(self) -> int:
        return len(self.validators)

    @property
    def addrs(self) -> list[tuple[str, int]]:
        return [v.addr for v in self.validators]

    def start(self, i: int) -> None:
        """Start validator ``i`` and wait (bounded) for its ``listening`` line."""
        v = self.validators[i]
        if v.alive:
            raise RuntimeError(f"{v.name} is already running")
        with open(v.log, "ab") as log:
            v.proc = subprocess.Popen(
                [sys.executable, "-m", "ledger.node", "--home", str(v.home)],
                stdout=subprocess.PIPE, stderr=log, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        assert v.proc.stdout is not None
        line = _read_line(v.proc.stdout, START_TIMEOUT_S)
        if not line.startswith(b"listening "):
            self._stop_proc(v, signal.SIGKILL)
            raise RuntimeError(f"{v.name} did not start: {line!r}; log:\n{v.log.read_text()[-3000:]}")

    def start_all(self) -> None:
        for i in range(len(self)):
            self.start(i)

    def stop(self, i: int) -> int:
        """SIGTERM validator ``i``; returns its exit code."""
        return self._stop_proc(self.validators[i], signal.SIGTERM)

    def kill(self, i: int) -> int:
        """SIGKILL validator ``i`` (a crash); returns its exit code."""
        return self._stop_proc(self.validators[i], signal.SIGKILL)

    def stop_all(self) -> None:
        for v in self.validators:
            self._stop_proc(v, signal.SIGTERM)

    @staticmethod
    def _stop_proc(v: Validator, sig: signal.Signals) -> int:
        proc = v.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()
        v.proc = None
        return proc.returncode

    # -- observations over the API ---------------------------------------------------------------

    async def status(self, i: int) -> dict[str, Any]:
        return dict(await call_once(self.validators[i].addr, "status"))

    async def height(self, i: int) -> int:
        return int((await self.status(i))["height"])

    async def block_hash(self, i: int, height: int) -> bytes:
        res = await call_once(self.validators[i].addr, "block", {"height": height})
        return Block.from_wire(res["block"]).hash()

    async def wait_height(self, i: int, height: int, *, timeout_s: float = 30.0) -> None:
        async def reached() -> bool:
            try:
                return await self.height(i) >= height
            except OSError:
                return False

        await poll(reached, timeout_s=timeout_s, what=f"{self.validators[i].name} at height {height}")


def _read_line(pipe: Any, timeout_s: float) -> bytes:
    """One line from a subprocess pipe, giving up after ``timeout_s`` (no thread, no hang)."""
    sel = selectors.DefaultSelector()
    sel.register(pipe, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout_s
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return buf
            chunk = os.read(pipe.fileno(), 1)
            if not chunk:
                return buf
            buf += chunk
    finally:
        sel.close()
    return buf


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Make clusters of validator homes under ``tmp_path``; their processes die with the test."""
    made: list[Cluster] = []

    def make(n: int = 4, *, accounts: list[tuple[bytes, int]] | None = None,
             empty_block_interval_ms: int = 500, consensus: dict[str, int] | None = None,
             params: dict[str, int] | None = None, start: bool = True) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", n, accounts=accounts or [],
                    empty_block_interval_ms=empty_block_interval_ms,
                    consensus=dict(FAST_CONSENSUS if consensus is None else consensus),
                    params=params or {})
        made.append(c)
        if start:
            c.start_all()
        return c

    yield make
    for c in made:
        c.stop_all()


# ---------------------------------------------------------------------------------------------
# transactions


def transfer(sender: KeyPair, to: bytes, amount: int, nonce: int, *, fee: int = MIN_FEE,
             chain_id: str = CHAIN_ID) -> Tx:
    return Tx("transfer", sender.public_key, nonce, fee, {"to": to, "amount": amount}).signed(
        sender, chain_id)


@pytest.fixture
def funded() -> list[KeyPair]:
    """Eight user keys; pass ``[(k.public_key, FUNDS) for k in funded]`` as accounts."""
    return [KeyPair.from_seed(bytes([0x10 + i]) * 32) for i in range(8)]


FUNDS = 10**15
