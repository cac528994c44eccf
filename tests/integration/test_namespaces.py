"""The agent's side of namespace workloads: the shard-store child process supervised by
:class:`ShardService` (start on the first namespace, endpoint as the result, reload, wipe,
restart after a crash, stop with the last namespace, exit when the agent dies)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from ledger.keys import KeyPair
from tests.conftest import free_ports
from tests.integration.test_shardstore import CHAIN, Client, code, connect, payload, sid
from zos_agent import shardwire as w
from zos_agent.errors import InvalidSpec
from zos_agent.namespaces import (
    NamespaceWant,
    ShardService,
    namespace_table,
    namespace_workload,
    views_namespaces,
)
from zos_agent.reconcile import ContractView, Result

REPO = Path(__file__).resolve().parent.parent.parent
OWNER = KeyPair.from_seed(b"\x11" * 32)


def want(cid: int, name: str = "ns", quota: int = 1 << 24) -> NamespaceWant:
    return NamespaceWant(cid, name, OWNER.public_key, quota)


def test_namespace_workload_checks_its_fields() -> None:
    ok = namespace_workload(5, {"name": "a", "kind": "namespace", "cpu": 0, "memory": 0,
                                "disk": 1000}, OWNER.public_key)
    assert ok == NamespaceWant(5, "a", OWNER.public_key, 1000)
    for bad in ({"name": "a", "disk": 0}, {"name": "a", "disk": True}, {"disk": 5},
                {"name": "a", "disk": 5, "cpu": 1}, {"name": "a", "disk": "5"}):
        with pytest.raises(InvalidSpec):
            namespace_workload(5, bad, OWNER.public_key)
    table = namespace_table([want(1, "a", 10), want(1, "b", 5), want(2, "c", 7)])
    assert table == {1: w.NamespaceInfo(OWNER.public_key, 15),
                     2: w.NamespaceInfo(OWNER.public_key, 7)}


@asynccontextmanager
async def service(tmp_path: Path) -> AsyncIterator[ShardService]:
    svc = ShardService(tmp_path, chain_id=CHAIN, host="127.0.0.1", port=free_ports(1)[0],
                       log_level="WARNING")
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


def addr(svc: ShardService) -> tuple[str, int]:
    return svc.host, svc.port


@pytest.mark.slow
async def test_service_serves_namespaces_while_wanted(tmp_path: Path) -> None:
    async with service(tmp_path) as svc:
        assert await svc.apply([]) == {}
        assert svc.starts == 0  # no namespace: no process, no socket
        results = await svc.apply([want(3, "a"), want(3, "b"), want(4)])
        ok = Result("ok", "", svc.endpoint)
        assert results == {(3, "a"): ok, (3, "b"): ok, (4, "ns"): ok}
        assert svc.endpoint == f"127.0.0.1:{svc.port}"
        data = payload(1, w.MAX_CHUNK + 1)
        async with connect(addr(svc)) as c:
            assert isinstance(await c.upload(3, sid(1), data, 1), w.Stored)
            assert await c.call(w.Stat(3)) == w.StatResult(len(data), 2 << 24, 1)
            assert isinstance(await c.upload(4, sid(1), b"x", 1), w.Stored)
            # contract 4 cancelled: its namespace goes at once, its shards are wiped
            await svc.apply([want(3, "a"), want(3, "b")], gone={4})
            assert not (svc.store_dir / "ns" / "4").exists()
            assert 4 not in svc.on_disk()
            await eventually_code(c, w.Stat(4), w.ErrorCode.UNKNOWN_NAMESPACE)
            assert await c.download(3, sid(1)) == data
        # held (unreadable) contract 3 keeps its namespace as it was
        results = await svc.apply([], keep={3})
        assert results == {}
        assert 3 in svc.table
        assert svc.starts == 1
        async with connect(addr(svc)) as c:
            assert await c.download(3, sid(1)) == data
        # the last namespace cancelled: the process stops, the port is free again
        await svc.apply([], gone={3})
        await wait_port_free(svc.port)
        assert svc.on_disk() == set()
        # a new namespace starts it again
        assert (await svc.apply([want(9)]))[(9, "ns")].state == "ok"
        assert svc.starts == 2


@pytest.mark.slow
async def test_service_restarts_a_crashed_store(tmp_path: Path) -> None:
    async with service(tmp_path) as svc:
        await svc.apply([want(1)])
        proc = svc._proc
        assert proc is not None
        async with connect(addr(svc)) as c:
            assert isinstance(await c.upload(1, sid(1), b"kept", 1), w.Stored)
        proc.kill()  # by pid: the child this service started
        await poll_until(lambda: svc.starts >= 2 and svc.ready)
        results = await svc.apply([want(1)])
        assert results[(1, "ns")].state == "ok"
        async with connect(addr(svc)) as c:
            assert await c.download(1, sid(1)) == b"kept"
            # the replay window survived the crash
            assert code(await c.upload(1, sid(2), b"again", 1)) is w.ErrorCode.REPLAY


@pytest.mark.slow
async def test_busy_port_is_the_workloads_error(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        svc = ShardService(tmp_path, chain_id=CHAIN, host="127.0.0.1", port=port,
                           log_level="WARNING")
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            result = (await svc.apply([want(1)]))[(1, "ns")]
            assert result.state == "error"
            assert "cannot listen" in result.message
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_store_exits_when_the_agent_dies(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    ns_file = tmp_path / "namespaces.json"
    # A stand-in agent: starts the store with its own pid as --parent-pid, prints the
    # store's pid, then waits to be killed.
    agent_code = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'zos_agent.shardstore', '--data-dir',"
        f" {str(tmp_path / 'data')!r}, '--listen', '127.0.0.1:{port}', '--namespaces-file',"
        f" {str(ns_file)!r}, '--chain-id', {CHAIN!r}, '--parent-pid', str(os.getpid())],"
        " stdout=subprocess.PIPE)\n"
        "line = p.stdout.readline()\n"
        "print(p.pid, line.decode().strip(), flush=True)\n"
        "time.sleep(600)\n"
    )
    agent = await trio.lowlevel.open_process([sys.executable, "-c", agent_code], cwd=REPO,
                                             stdout=subprocess.PIPE)
    try:
        assert agent.stdout is not None
        with trio.fail_after(30):
            out = b""
            while not out.endswith(b"\n"):
                chunk = await agent.stdout.receive_some(256)
                assert chunk, "stand-in agent exited"
                out += chunk
        store_pid_text, listening = out.decode().split(" ", 1)
        assert listening.startswith("listening")
        store_pid = int(store_pid_text)
        async with connect(("127.0.0.1", port)) as c:
            assert code(await c.call(w.Stat(1))) is w.ErrorCode.UNKNOWN_NAMESPACE
        agent.kill()  # kill -9 of the agent (by pid)
        await agent.wait()
        await poll_until(lambda: not _alive(store_pid))
        await wait_port_free(port)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()


async def poll_until(done: Callable[[], bool]) -> None:
    """Poll state that another process changes (no event to wait on)."""
    with trio.fail_after(30):
        while True:
            if done():
                return
            await trio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def wait_port_free(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.05)


async def eventually_code(c: Client, req: w.Request, want_code: w.ErrorCode) -> None:
    with trio.fail_after(10):
        while True:
            if code(await c.call(req)) is want_code:
                return
            await trio.sleep(0.02)


def test_no_stray_processes_left() -> None:
    # Every process these tests started was stopped by pid; none is left behind as ours.
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())],
                              capture_output=True, text=True, check=False).stdout
    assert "zos_agent.shardstore" not in children


def test_views_say_what_to_keep_and_what_to_wipe() -> None:
    views = {
        1: ContractView(1, 1, "deployed"),
        2: ContractView(2, 1, "created", hold=True),
        3: ContractView(3, 2, "cancelled"),
        4: ContractView(4, 1, "missing"),
        5: ContractView(5, 1, "grace"),
    }
    wants, keep, gone = views_namespaces(views)
    assert wants == []  # these views carry no namespace workloads
    assert keep == {2}
    assert gone == {3, 4}
