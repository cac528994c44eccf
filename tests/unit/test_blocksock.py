"""BlockingSocket: a worker thread's blocking reads and writes on a duplicate of a non-blocking
socket, with deadlines on a clock it is given and trio's cancellation checks."""

from __future__ import annotations

import array
import math
import os
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from zos_agent.blocksock import BlockingSocket, Quiet

Pair = tuple[socket.socket, socket.socket]
HANG_GUARD_S = 10  # generous: every wait below ends long before unless something is broken


class FakeClock:
    """A clock the test sets (``now``); counts how often it was read, and lets a test wait
    until a thread has read it some number of times (each read after the first one of a wait
    follows a poll slice with nothing to do).

    Backstop: after ``give_up_after`` reads (far more poll slices than HANG_GUARD_S holds) it
    jumps to infinity, so that a thread that should have stopped otherwise (cancelled, or
    woken by data) ends with Quiet, and the test fails instead of hanging on the thread."""

    def __init__(self, now: float = 0.0, give_up_after: int = 300) -> None:
        self.now = now
        self.reads = 0
        self._give_up_after = give_up_after
        self._changed = threading.Condition()

    def __call__(self) -> float:
        with self._changed:
            self.reads += 1
            self._changed.notify_all()
            if self.reads > self._give_up_after:
                return math.inf
        return self.now

    def wait_reads(self, n: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.reads >= n, timeout=HANG_GUARD_S)

    async def reads_at_least(self, n: int) -> None:
        assert await trio.to_thread.run_sync(self.wait_reads, n)


async def in_thread(call: Callable[[], object],
                    meanwhile: Callable[[list[object]], Awaitable[None]]) -> object:
    """Run ``call`` in a worker thread while ``meanwhile(outcome)`` runs here (``outcome``
    stays empty until the thread ends); what the call returned, or the exception it raised."""
    outcome: list[object] = []

    async def worker() -> None:
        try:
            outcome.append(await trio.to_thread.run_sync(call))
        except Exception as exc:
            outcome.append(exc)

    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            await meanwhile(outcome)
    assert len(outcome) == 1
    return outcome[0]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """(ours, peer): ours non-blocking, as trio's sockets are; the peer blocking, with a
    timeout so that a broken test cannot hang on it."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.settimeout(HANG_GUARD_S)
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


@pytest.fixture
def tcp_pair() -> Iterator[Pair]:
    """The same over TCP on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    ours.setblocking(False)
    peer.settimeout(HANG_GUARD_S)
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


def test_recv_into_and_recv_take_what_has_arrived(pair: Pair) -> None:
    ours, peer = pair
    bs = BlockingSocket(ours.fileno(), clock=FakeClock())
    try:
        peer.sendall(b"hello, world")
        buf = bytearray(5)
        assert bs.recv_into(memoryview(buf), 1.0) == 5
        assert buf == b"hello"
        two = bytearray(100)
        assert bs.recv_into(memoryview(two)[:2], 1.0) == 2  # at most the view
        assert two[:3] == b", \x00"
        assert bs.recv(100, 1.0) == b"world"
    finally:
        bs.close()


async def test_a_read_waits_for_data_that_arrives_later(pair: Pair) -> None:
    ours, peer = pair
    clock = FakeClock()
    bs = BlockingSocket(ours.fileno(), clock=clock)
    buf = bytearray(100)

    async def meanwhile(outcome: list[object]) -> None:
        await clock.reads_at_least(3)  # two poll slices went by with nothing
        assert not outcome
        peer.sendall(b"late")

    assert await in_thread(lambda: bs.recv_into(memoryview(buf), 1.0), meanwhile) == 4
    assert buf[:4] == b"late"
    bs.close()


async def test_wait_readable_returns_once_data_is_there(pair: Pair) -> None:
    ours, peer = pair
    clock = FakeClock()
    bs = BlockingSocket(ours.fileno(), clock=clock)

    async def meanwhile(outcome: list[object]) -> None:
        await clock.reads_at_least(2)
        assert not outcome
        peer.sendall(b"x")

    assert await in_thread(lambda: bs.wait_readable(1.0), meanwhile) is None
    assert bs.recv(10, 1.0) == b"x"  # waiting consumed nothing
    clock.now = 1.0
    with pytest.raises(Quiet):
        bs.wait_readable(1.0)
    bs.close()


async def test_send_all_of_several_mib_while_the_peer_reads(pair: Pair) -> None:
    ours, peer = pair
    data = random.Random(1).randbytes(8 << 20 | 12_345)  # far more than the socket buffers
    bs = BlockingSocket(ours.fileno(), clock=FakeClock())
    received = bytearray()

    def read_all() -> None:
        while len(received) < len(data):
            chunk = peer.recv(1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, read_all)
            await trio.to_thread.run_sync(bs.send_all, memoryview(data), 1.0)
    assert received == data
    bs.close()


def test_send_all_takes_any_bytes_like_buffer(pair: Pair) -> None:
    ours, peer = pair
    bs = BlockingSocket(ours.fileno(), clock=FakeClock())
    words = array.array("I", range(1000))  # a view of 4-byte items: sent as its bytes
    bs.send_all(memoryview(words), 1.0)
    bs.send_all(bytearray(b"ab"), 1.0)
    bs.send_all(b"", 1.0)
    bs.send_all(b"cd", 1.0)
    want = words.tobytes() + b"abcd"
    got = bytearray()
    while len(got) < len(want):
        got += peer.recv(len(want) - len(got))
    assert got == want
    bs.close()


@pytest.mark.parametrize("op", ["recv_into", "recv", "wait_readable"])
def test_quiet_when_the_deadline_has_passed_and_nothing_arrived(pair: Pair, op: str) -> None:
    ours, _ = pair
    clock = FakeClock(now=5.0)
    bs = BlockingSocket(ours.fileno(), clock=clock)
    calls: dict[str, Callable[[], object]] = {
        "recv_into": lambda: bs.recv_into(memoryview(bytearray(10)), 5.0),
        "recv": lambda: bs.recv(10, 4.0),
        "wait_readable": lambda: bs.wait_readable(5.0),
    }
    with pytest.raises(Quiet):
        calls[op]()
    bs.close()


async def test_quiet_once_the_clock_passes_the_deadline_while_waiting(pair: Pair) -> None:
    """A read waits through poll slices while the clock is before its deadline, and gives up
    (Quiet) at the first look after the clock got there."""
    ours, peer = pair
    clock = FakeClock()
    bs = BlockingSocket(ours.fileno(), clock=clock)

    async def meanwhile(outcome: list[object]) -> None:
        await clock.reads_at_least(3)
        clock.now = 1.999
        reads = clock.reads
        await clock.reads_at_least(reads + 2)
        assert not outcome  # still before the deadline: still waiting
        clock.now = 2.0

    assert isinstance(await in_thread(lambda: bs.recv(10, 2.0), meanwhile), Quiet)
    peer.sendall(b"after")  # nothing was lost: the socket reads on
    assert bs.recv(10, 3.0) == b"after"
    bs.close()


async def test_quiet_when_the_peer_does_not_read_what_send_all_sends(pair: Pair) -> None:
    ours, peer = pair
    clock = FakeClock()
    bs = BlockingSocket(ours.fileno(), clock=clock)

    async def meanwhile(outcome: list[object]) -> None:
        await clock.reads_at_least(3)  # the buffers are full: it waits to write
        assert not outcome
        clock.now = 1.5

    assert isinstance(await in_thread(lambda: bs.send_all(bytes(32 << 20), 1.0), meanwhile), Quiet)
    bs.close()


def test_end_of_stream_reads_as_zero_and_empty(pair: Pair) -> None:
    ours, peer = pair
    bs = BlockingSocket(ours.fileno(), clock=FakeClock())
    peer.sendall(b"last")
    peer.shutdown(socket.SHUT_WR)
    assert bs.recv(100, 1.0) == b"last"
    assert bs.recv_into(memoryview(bytearray(10)), 1.0) == 0
    assert bs.recv(10, 1.0) == b""
    bs.wait_readable(1.0)  # end of stream: a read would not block
    bs.close()


def test_a_reset_connection_is_a_broken_resource(pair: Pair) -> None:
    ours, peer = pair
    bs = BlockingSocket(ours.fileno(), clock=FakeClock())
    bs.send_all(b"never read", 1.0)
    peer.close()  # with unread data: the connection is reset
    with pytest.raises(trio.BrokenResourceError, match="socket connection broken"):
        bs.recv(10, 1.0)
    with pytest.raises(trio.BrokenResourceError, match="socket connection broken"):
        bs.send_all(b"more", 1.0)  # EPIPE
    bs.close()


async def test_a_tcp_reset_ends_a_waiting_read(tcp_pair: Pair) -> None:
    ours, peer = tcp_pair
    clock = FakeClock()
    bs = BlockingSocket(ours.fileno(), clock=clock)

    async def meanwhile(outcome: list[object]) -> None:
        await clock.reads_at_least(2)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # an RST

    got = await in_thread(lambda: bs.recv_into(memoryview(bytearray(10)), 1.0), meanwhile)
    assert isinstance(got, trio.BrokenResourceError)
    assert "reset" in str(got).lower()
    bs.close()


def test_close_closes_the_duplicate_only(pair: Pair) -> None:
    ours, peer = pair
    before = set(os.listdir("/proc/self/fd"))
    bs = BlockingSocket(ours.fileno(), clock=FakeClock())
    assert len(set(os.listdir("/proc/self/fd")) - before) == 1  # its own descriptor
    bs.close()
    assert set(os.listdir("/proc/self/fd")) == before
    os.fstat(ours.fileno())
    ours.send(b"ping")
    assert peer.recv(4) == b"ping"
    peer.sendall(b"pong")
    assert ours.recv(4) == b"pong"
    with pytest.raises(trio.BrokenResourceError, match="socket closed"):
        bs.recv(4, 1.0)
    with pytest.raises(trio.BrokenResourceError, match="socket closed"):
        bs.send_all(b"x", 1.0)


@pytest.mark.parametrize("op", ["recv_into", "send_all"])
async def test_a_cancelled_task_ends_its_threads_wait(pair: Pair, op: str) -> None:
    """A thread waiting with a deadline far away raises trio.Cancelled at its next check
    once the task that started it is cancelled; the socket is still usable afterwards."""
    ours, peer = pair
    clock = FakeClock()
    bs = BlockingSocket(ours.fileno(), clock=clock)
    far = 1e9
    work: dict[str, Callable[[], object]] = {
        "recv_into": lambda: bs.recv_into(memoryview(bytearray(10)), far),
        "send_all": lambda: bs.send_all(bytes(32 << 20), far),  # more than the buffers take
    }
    returned = False
    with trio.fail_after(HANG_GUARD_S):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_once_waiting() -> None:
                    await clock.reads_at_least(2)  # a poll slice went by: it is waiting
                    scope.cancel()

                nursery.start_soon(cancel_once_waiting)
                await trio.to_thread.run_sync(work[op])
                returned = True
    assert scope.cancelled_caught
    assert not returned
    if op == "recv_into":
        peer.sendall(b"still")
        assert bs.recv(10, far) == b"still"
    bs.close()
