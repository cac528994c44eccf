"""The agent's trio driver with in-memory fakes for the ledger client, follower and runtime.

Time is trio's MockClock: intervals are asserted exactly, nothing sleeps for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from ledger.config import make_genesis
from ledger.errors import InvalidTx
from ledger.keys import KeyPair
from ledger.state import TxOutcome
from ledger.tx import Tx
from zos_agent.agent import NONCE_STUCK_S, Agent, MemoryFile, TxSender
from zos_agent.capacity import Capacity
from zos_agent.config import AgentConfig
from zos_agent.oci import ContainerSpec
from zos_agent.reconcile import (
    BACKOFF_BASE_MS,
    ContractView,
    Desired,
    ReconcileMemory,
    Report,
    workload_id,
)
from zos_agent.runtime import ContainerState

NODE = KeyPair.from_seed(b"\x09" * 32)
GENESIS = make_genesis("loop-test", [KeyPair.from_seed(b"\x01" * 32).public_key], [], {}, 0)
IMAGE = "sha256:" + "ef" * 32


class FakeClient:
    def __init__(self) -> None:
        self.committed = 0
        self.txs: list[Tx] = []
        self.refuse: list[InvalidTx] = []

    async def next_nonce(self, address: bytes) -> int:
        return self.committed

    async def submit(self, tx: Tx) -> bytes:
        if self.refuse:
            raise self.refuse.pop(0)
        self.txs.append(tx)
        return tx.hash()

    async def wait_tx(self, tx_hash: bytes, *, timeout_s: float = 30.0) -> TxOutcome:
        return TxOutcome(tx_hash, "ok", "")


class FakeRuntime:
    def __init__(self) -> None:
        self.containers: dict[str, ContainerState] = {}
        self.calls: list[tuple[str, str]] = []
        self.times: list[float] = []

    async def list(self) -> dict[str, ContainerState]:
        return dict(self.containers)

    async def create(self, spec: ContainerSpec, image_sources: list[str]) -> list[str]:
        self.calls.append(("create", spec.workload_id))
        self.times.append(trio.current_time())
        self.containers[spec.workload_id] = ContainerState(
            spec.workload_id, "running", 100, spec.spec_hash(), None, ("127.0.0.1:9000",))
        return ["127.0.0.1:9000"]

    async def restart(self, workload_id: str) -> None:
        self.calls.append(("restart", workload_id))
        self.times.append(trio.current_time())
        old = self.containers[workload_id]
        self.containers[workload_id] = ContainerState(workload_id, "running", old.pid + 1,
                                                      old.spec_hash, None)

    async def delete(self, workload_id: str) -> None:
        self.calls.append(("delete", workload_id))
        self.containers.pop(workload_id, None)


class FakeFollower:
    def __init__(self, views: dict[int, ContractView]) -> None:
        self.views_ = views

    async def views(self, node_id: int, also: set[int]) -> dict[int, ContractView]:
        return dict(self.views_)


def desired(cid: int = 1, name: str = "w") -> Desired:
    spec = ContainerSpec(workload_id=workload_id(cid, name), image=IMAGE, command=["sleep", "9"],
                         ports=[80])
    return Desired(contract_id=cid, version=1, name=name, spec=spec)


def make_agent(tmp_path: Path, client: FakeClient, follower: FakeFollower,
               runtime: FakeRuntime, clock: list[int]) -> Agent:
    cfg = AgentConfig(farm_id=1, peers=[("127.0.0.1", 1)], genesis=tmp_path / "g.json",
                      data_dir=tmp_path, uptime_interval_s=2.0)
    agent = Agent(cfg, key=NODE, genesis=GENESIS, client=client,  # type: ignore[arg-type]
                  follower=follower, runtime=runtime,  # type: ignore[arg-type]
                  clock_ms=lambda: clock[0])
    agent.node_id = 1
    return agent


# -- TxSender -------------------------------------------------------------------------------


async def test_nonces_run_ahead_of_the_chain_then_resync(autojump_clock: trio.testing.MockClock
                                                         ) -> None:
    client = FakeClient()
    client.committed = 5
    sender = TxSender(client, NODE, "loop-test", 10_000)  # type: ignore[arg-type]
    for _ in range(3):
        await sender.submit("uptime_report", {"time_ms": 1})
    assert [t.nonce for t in client.txs] == [5, 6, 7]
    assert all(t.fee == 10_000 for t in client.txs)
    # A peer that says the nonce is wrong: start again from the committed one, once.
    client.committed = 8
    client.refuse = [InvalidTx("bad_nonce", "nope")]
    await sender.submit("uptime_report", {"time_ms": 2})
    assert client.txs[-1].nonce == 8
    # Pending txs that never commit: after NONCE_STUCK_S, resend from the committed nonce.
    await sender.submit("uptime_report", {"time_ms": 3})
    assert client.txs[-1].nonce == 9
    await trio.sleep(NONCE_STUCK_S + 1)
    await sender.submit("uptime_report", {"time_ms": 4})
    assert client.txs[-1].nonce == 8
    client.refuse = [InvalidTx("insufficient_funds", "poor")]
    with pytest.raises(InvalidTx, match="insufficient_funds"):
        await sender.submit("uptime_report", {"time_ms": 5})


# -- loops ----------------------------------------------------------------------------------


async def test_uptime_reports_at_the_configured_interval(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    client = FakeClient()
    agent = make_agent(tmp_path, client, FakeFollower({}), FakeRuntime(), [0])
    times: list[float] = []
    real_submit = client.submit

    async def submit(tx: Tx) -> bytes:
        times.append(trio.current_time())
        client.committed += 1
        return await real_submit(tx)

    client.submit = submit  # type: ignore[method-assign]
    start = trio.current_time()
    with trio.move_on_after(9):
        await agent._uptime_loop()
    assert [t - start for t in times] == [0, 2, 4, 6, 8]
    assert {t.type for t in client.txs} == {"uptime_report"}
    assert all(isinstance(t.body["time_ms"], int) for t in client.txs)


async def test_reconcile_pass_creates_reports_and_persists(tmp_path: Path) -> None:
    client, runtime, clock = FakeClient(), FakeRuntime(), [1_000]
    d = desired()
    follower = FakeFollower({1: ContractView(1, 1, "created", ("w",), (d,))})
    agent = make_agent(tmp_path, client, follower, runtime, clock)
    await agent.reconcile_once()
    assert runtime.calls == [("create", "c1-w")]
    saved = MemoryFile(tmp_path / "agent-memory.json").load()
    assert saved.workloads["c1-w"].endpoint == "127.0.0.1:9000"
    clock[0] += 1
    plan = await agent.reconcile_once()
    assert plan.actions == [Report(1, 1, (("w", plan.actions[0].results[0][1]),))]  # type: ignore[union-attr]
    (tx,) = client.txs
    assert tx.type == "contract_result"
    assert tx.body == {"contract_id": 1, "version": 1, "workloads": [
        {"name": "w", "state": "ok", "message": "", "endpoint": "127.0.0.1:9000"}]}
    # The report is in flight: the next pass neither repeats it nor touches the runtime.
    assert (await agent.reconcile_once()).actions == []
    assert runtime.calls == [("create", "c1-w")]


async def test_a_restarted_agent_adopts_and_never_duplicates(tmp_path: Path) -> None:
    client, runtime, clock = FakeClient(), FakeRuntime(), [1_000]
    d = desired()
    follower = FakeFollower({1: ContractView(1, 1, "created", ("w",), (d,))})
    await make_agent(tmp_path, client, follower, runtime, clock).reconcile_once()
    # The same data dir after a crash: memory file and runtime survive.
    again = make_agent(tmp_path, client, follower, runtime, clock)
    assert again.memory.workloads["c1-w"].known
    await again.reconcile_once()
    # Even with the memory file lost, a running container is adopted (create is
    # idempotent in the runtime), never deleted and recreated.
    (tmp_path / "agent-memory.json").unlink()
    third = make_agent(tmp_path, client, follower, runtime, clock)
    await third.reconcile_once()
    assert [c for c in runtime.calls if c[0] != "create"] == []
    assert len(runtime.containers) == 1


async def test_memory_file_survives_corruption(tmp_path: Path) -> None:
    mf = MemoryFile(tmp_path / "m.json")
    assert mf.load() == ReconcileMemory()
    mf.save(ReconcileMemory())
    assert mf.load() == ReconcileMemory()
    (tmp_path / "m.json").write_text("{not json")
    assert mf.load() == ReconcileMemory()


async def test_reconcile_loop_wakes_for_a_due_restart(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    client, runtime = FakeClient(), FakeRuntime()
    clock = [0]
    d = desired()
    follower = FakeFollower({1: ContractView(1, 1, "created", ("w",), (d,))})
    agent = make_agent(tmp_path, client, follower, runtime, clock)

    def tick() -> int:
        return int(trio.current_time() * 1000)

    agent.clock_ms = tick
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._reconcile_loop)
        await trio.sleep(0.25)
        assert runtime.calls == [("create", "c1-w")]
        created_at = runtime.times[0]
        state = runtime.containers["c1-w"]
        runtime.containers["c1-w"] = ContainerState("c1-w", "stopped", 0, state.spec_hash, 1)
        agent.kick()  # the runtime changed (as a new block would wake the loop)
        await trio.sleep(0.5)
        assert ("restart", "c1-w") not in runtime.calls  # backoff not over yet
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert runtime.calls.count(("restart", "c1-w")) == 1
    # Exactly the base backoff after the start: the loop slept until the restart was due.
    assert runtime.times[1] - created_at == BACKOFF_BASE_MS / 1000


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_capacity_changes_are_re_reported_once(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    client = FakeClient()
    agent = make_agent(tmp_path, client, FakeFollower({}), FakeRuntime(), [0])
    agent.registered_capacity = Capacity(4, 1 << 30, 10 << 30)
    measured = [Capacity(4, 1 << 30, 10 << 30)]
    agent._capacity = lambda: measured[0]  # type: ignore[method-assign]
    interval = agent.cfg.capacity_interval_s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._capacity_loop)
        await trio.sleep(interval * 2 + 1)
        assert client.txs == []  # unchanged: nothing sent
        measured[0] = Capacity(3, 1 << 30, 10 << 30)  # e.g. a core taken offline
        await trio.sleep(interval)
        await trio.sleep(interval * 3)
        nursery.cancel_scope.cancel()
    (tx,) = client.txs
    assert tx.type == "node_update"
    assert tx.body == {"capacity": {"cores": 3, "memory": 1 << 30, "storage": 10 << 30}}
    assert agent.registered_capacity == measured[0]


async def test_block_woken_passes_skip_the_runtime_while_the_ledger_is_unchanged(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    client, runtime = FakeClient(), FakeRuntime()
    lists: list[float] = []
    real_list = runtime.list

    async def counting_list() -> dict[str, ContainerState]:
        lists.append(trio.current_time())
        return await real_list()

    runtime.list = counting_list  # type: ignore[method-assign]
    follower = FakeFollower({})
    agent = make_agent(tmp_path, client, follower, runtime, [0])
    assert agent.cfg.reconcile_interval_s == 5.0
    # A block before any full pass: the pass is a full one.
    assert await agent.reconcile_once(full=False) is not None
    assert len(lists) == 1
    # Same views: the block-woken pass stops after the ledger read.
    assert await agent.reconcile_once(full=False) is None
    assert len(lists) == 1
    assert agent.ledger_only_passes == 1
    # A new contract for this node: the same pass goes on and acts.
    follower.views_ = {1: ContractView(1, 1, "created", ("w",), (desired(),))}
    plan = await agent.reconcile_once(full=False)
    assert plan is not None
    assert runtime.calls == [("create", "c1-w")]
    assert len(lists) == 2

    # The loop with a block every 0.5 s: full passes still come every reconcile interval,
    # so a crashed container is seen (and restarted) without waiting for a ledger change.
    async def blocks() -> None:
        while True:
            await trio.sleep(0.5)
            agent._kick.set()

    agent.clock_ms = lambda: int(trio.current_time() * 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._reconcile_loop)
        nursery.start_soon(blocks)
        await trio.sleep(1)
        lists.clear()
        await trio.sleep(20.2)
        assert 4 <= len(lists) <= 5  # one full pass per 5 s, not one per block (40 blocks)
        runtime.containers["c1-w"] = ContainerState(
            "c1-w", "stopped", 0, runtime.containers["c1-w"].spec_hash, 1)
        await trio.sleep(5 + 2 * BACKOFF_BASE_MS / 1000)
        nursery.cancel_scope.cancel()
    assert runtime.calls.count(("restart", "c1-w")) == 1
