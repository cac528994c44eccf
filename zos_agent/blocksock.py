"""A worker thread's blocking reads and writes on a trio socket.

The shard store's event loop pays for every wake-up: a 1 MiB frame arrives over loopback in
several reads, each one a trip through trio's scheduler (``wait_readable``, epoll, task
switch). While a connection streams data (an upload's appends, a run of gets) the store hands
the connection to a worker thread instead, which drives the same sans-IO
:class:`~zos_agent.shardwire.ServerConnection` with plain ``poll(2)`` and ``recv_into``, and
does the file work in the same thread: no thread hop and no scheduler trip per frame.

:class:`BlockingSocket` is that thread's view of the socket. It works on a duplicate of the
socket's descriptor (the event loop keeps its own), which shares the non-blocking mode: a read
or write that would block waits in ``poll`` for at most :data:`SLICE_S` at a time, then asks
trio whether the task that started the thread was cancelled
(:func:`trio.from_thread.check_cancelled`), so a cancelled store never waits on a thread for
longer than that.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Final, TypeVar

import trio

from zos_agent import shardwire as w

T = TypeVar("T")

SLICE_S: Final = 0.1  # longest poll(2) between two cancellation checks


class Quiet(Exception):
    """Nothing arrived (or could be sent) before the deadline."""


class BlockingSocket:
    """Blocking ``recv_into``/``recv``/``send_all`` with deadlines, for a worker thread, on a
    duplicate of a connected non-blocking socket's descriptor.

    Deadlines are times of ``clock``. Errors: :class:`Quiet`
    at a deadline, :class:`trio.BrokenResourceError` if the connection broke,
    :class:`trio.Cancelled` (from the thread's trio task) if it was cancelled.
    """

    def __init__(self, fd: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sock = socket.socket(fileno=os.dup(fd))
        self._in = select.poll()
        self._in.register(self._sock.fileno(), select.POLLIN)
        self._out = select.poll()
        self._out.register(self._sock.fileno(), select.POLLOUT)

    def close(self) -> None:
        self._sock.close()

    def _wait(self, poller: select.poll, deadline: float) -> None:
        while True:
            left = deadline - self._clock()
            if left <= 0:
                raise Quiet
            if poller.poll(min(left, SLICE_S) * 1000):
                return
            trio.from_thread.check_cancelled()

    def wait_readable(self, deadline: float) -> None:
        """Return once a read would not block (data or end of stream); :class:`Quiet` at
        ``deadline``."""
        self._wait(self._in, deadline)

    def recv_into(self, view: memoryview, deadline: float) -> int:
        """Receive into the start of ``view``: how many bytes (0: the peer closed)."""
        return self._read(lambda: self._sock.recv_into(view), deadline)

    def recv(self, n: int, deadline: float) -> bytes:
        """At most ``n`` bytes (``b""``: the peer closed)."""
        return self._read(lambda: self._sock.recv(n), deadline)

    def _read(self, call: Callable[[], T], deadline: float) -> T:
        while True:
            try:
                return call()
            except BlockingIOError:
                self._wait(self._in, deadline)
            except OSError as exc:
                raise _broken(exc) from exc

    def send_all(self, data: w.Bytes, deadline: float) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                self._wait(self._out, deadline)
                continue
            except OSError as exc:
                raise _broken(exc) from exc
            view = view[sent:]


def _broken(exc: OSError) -> trio.BrokenResourceError:
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.BrokenResourceError("socket closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
