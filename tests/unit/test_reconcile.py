"""Table tests of the pure reconcile core: desired vs observed vs memory -> actions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from zos_agent.oci import ContainerSpec
from zos_agent.reconcile import (
    BACKOFF_BASE_MS,
    BACKOFF_MAX_MS,
    CRASH_LOOP_RESTARTS,
    REPORT_RETRY_MS,
    STABLE_AFTER_MS,
    Action,
    Adopt,
    ContractView,
    Create,
    Delete,
    Desired,
    Observed,
    ReconcileMemory,
    Report,
    Restart,
    Result,
    Update,
    backoff_ms,
    parse_workload_id,
    reconcile,
    workload_id,
)

IMAGE = "sha256:" + "ab" * 32
T0 = 1_700_000_000_000


def spec(cid: int, name: str, *, restart: str = "always", command: str = "sleep 1000",
         ports: tuple[int, ...] = ()) -> ContainerSpec:
    return ContainerSpec(workload_id=workload_id(cid, name), image=IMAGE,
                         command=["sh", "-c", command], ports=list(ports), restart=restart)


def desired(cid: int, name: str, version: int = 1, **kw: object) -> Desired:
    return Desired(contract_id=cid, version=version, name=name,
                   spec=spec(cid, name, **kw))  # type: ignore[arg-type]


def view(cid: int, *ds: Desired, state: str = "created", version: int = 1,
         results: dict[str, Result] | None = None, errors: dict[str, str] | None = None,
         names: tuple[str, ...] | None = None) -> ContractView:
    return ContractView(contract_id=cid, version=version, state=state,
                        names=names if names is not None else tuple(d.name for d in ds),
                        desired=ds, errors=errors or {}, results=results or {})


def running(d: Desired) -> Observed:
    return Observed(d.workload_id, "running", d.spec.spec_hash(), None)


def stopped(d: Desired, code: int | None) -> Observed:
    return Observed(d.workload_id, "stopped", d.spec.spec_hash(), code)


class FakeNode:
    """Applies actions the way the agent's driver does, against a dict 'runtime' and a dict
    'ledger results', so multi-pass scenarios can be checked."""

    def __init__(self) -> None:
        self.observed: dict[str, Observed] = {}
        self.memory = ReconcileMemory()
        self.ledger: dict[int, dict[str, Result]] = {}
        self.fail_create: str | None = None
        self.log: list[Action] = []

    def views(self, *vs: ContractView) -> dict[int, ContractView]:
        return {v.contract_id: replace(v, results=self.ledger.get(v.contract_id, {}))
                for v in vs}

    def step(self, now: int, *vs: ContractView, commit_reports: bool = True) -> list[Action]:
        plan = reconcile(self.views(*vs), self.observed, self.memory, now)
        self.memory = plan.memory
        for a in plan.actions:
            self.log.append(a)
            match a:
                case Create(d) | Update(d) | Adopt(d):
                    if self.fail_create is not None:
                        self.memory = self.memory.failed(d, self.fail_create, now)
                        continue
                    self.observed[d.workload_id] = running(d)
                    eps = [f"10.0.0.1:{p}" for p in d.spec.ports]
                    self.memory = self.memory.created(d, eps, now)
                case Restart(d):
                    self.observed[d.workload_id] = running(d)
                    self.memory = self.memory.restarted(d.workload_id)
                case Delete(wid):
                    self.observed.pop(wid, None)
                    self.memory = self.memory.deleted(wid)
                case Report(cid, _version, results):
                    if commit_reports:
                        self.ledger.setdefault(cid, {}).update(dict(results))
        return plan.actions


# -- pure helpers ---------------------------------------------------------------------------


def test_workload_ids_round_trip() -> None:
    assert workload_id(12, "web") == "c12-web"
    assert parse_workload_id("c12-web") == (12, "web")
    assert parse_workload_id("c12-my-app") == (12, "my-app")
    assert parse_workload_id("x12-web") is None
    assert parse_workload_id("c-web") is None


@pytest.mark.parametrize(("n", "ms"), [(0, BACKOFF_BASE_MS), (1, 2 * BACKOFF_BASE_MS),
                                       (3, 8 * BACKOFF_BASE_MS), (20, BACKOFF_MAX_MS),
                                       (10_000, BACKOFF_MAX_MS)])
def test_backoff_doubles_up_to_the_cap(n: int, ms: int) -> None:
    assert backoff_ms(n) == ms


# -- single-pass table ----------------------------------------------------------------------

D1 = desired(1, "web", ports=(80,))
D1_NEW = desired(1, "web", version=2, ports=(80,), command="sleep 2000")
D2 = desired(2, "job", restart="never")


@pytest.mark.parametrize(
    ("case", "contracts", "observed", "expect"),
    [
        ("wanted, absent -> create", [view(1, D1)], {}, [Create(D1)]),
        ("wanted, running -> adopt (endpoints unknown)", [view(1, D1)],
         {D1.workload_id: running(D1)}, [Adopt(D1)]),
        ("spec changed -> update", [view(1, D1_NEW, version=2)],
         {D1.workload_id: running(D1)}, [Update(D1_NEW)]),
        ("not wanted -> delete", [], {D1.workload_id: running(D1)}, [Delete(D1.workload_id)]),
        ("cancelled contract -> delete", [view(1, D1, state="cancelled")],
         {D1.workload_id: running(D1)}, [Delete(D1.workload_id)]),
        ("stopped, policy always -> restart", [view(1, D1)], {D1.workload_id: stopped(D1, 0)},
         [Restart(D1)]),
        ("created but never started -> restart", [view(2, D2)],
         {D2.workload_id: Observed(D2.workload_id, "created", D2.spec.spec_hash())},
         [Restart(D2)]),
        ("never, exited 0 -> nothing to do", [view(2, D2)], {D2.workload_id: stopped(D2, 0)},
         [Report(2, 1, (("job", Result("ok", "exited with code 0")),))]),
    ],
)
def test_one_pass(case: str, contracts: list[ContractView], observed: dict[str, Observed],
                  expect: list[Action]) -> None:
    # Memory that knows every observed container (no adoption) unless the case is about it.
    plan = reconcile({c.contract_id: c for c in contracts}, observed, ReconcileMemory(), T0)
    got = [a for a in plan.actions if not isinstance(a, Report) or isinstance(expect[-1], Report)]
    assert got == expect, case


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [("always", 0, True), ("always", 1, True), ("always", None, True),
     ("on-failure", 0, False), ("on-failure", 3, True), ("on-failure", None, True),
     ("never", 0, False), ("never", 3, False), ("never", None, False)],
)
def test_restart_policy(policy: str, code: int | None, restart: bool) -> None:
    node = FakeNode()
    d = desired(5, "svc", restart=policy)
    v = view(5, d)
    node.step(T0, v)
    node.observed[d.workload_id] = stopped(d, code)
    actions = node.step(T0 + 10 * BACKOFF_BASE_MS, v)
    assert (Restart(d) in actions) is restart
    if not restart:
        want = Result("ok", "exited with code 0") if code == 0 else Result(
            "error", "exited" if code is None else f"exited with code {code}")
        assert node.ledger[5]["svc"] == want


# -- multi-pass scenarios -------------------------------------------------------------------


def test_create_then_report_ok_with_endpoint_then_quiet() -> None:
    node = FakeNode()
    v = view(1, D1)
    assert node.step(T0, v) == [Create(D1)]
    # The next pass reports the result; the one after has nothing to do.
    assert node.step(T0 + 1, v) == [Report(1, 1, (("web", Result("ok", "", "10.0.0.1:80")),))]
    assert node.step(T0 + 2, v) == []
    assert node.ledger[1] == {"web": Result("ok", "", "10.0.0.1:80")}


def test_idempotent_running_the_output_twice_yields_nothing_new() -> None:
    node = FakeNode()
    vs = (view(1, D1), view(2, D2), view(3, desired(3, "a"), desired(3, "b")))
    node.step(T0, *vs)
    node.step(T0 + 1, *vs)
    assert node.step(T0 + 2, *vs) == []
    before = (dict(node.observed), node.memory)
    assert node.step(T0 + 3, *vs) == []
    assert (dict(node.observed), node.memory) == before


def test_report_in_flight_is_not_repeated_until_retry() -> None:
    node = FakeNode()
    v = view(1, D1)
    node.step(T0, v)
    first = node.step(T0 + 1, v, commit_reports=False)
    assert len(first) == 1
    assert isinstance(first[0], Report)
    # Not committed yet: the same pass again does not send it twice ...
    assert node.step(T0 + 2, v, commit_reports=False) == []
    # ... until the retry time, when it is sent again.
    assert node.step(T0 + 1 + REPORT_RETRY_MS, v, commit_reports=False) == first


def test_restart_backoff_grows_and_resets_after_a_stable_run() -> None:
    node = FakeNode()
    d = desired(7, "flaky")
    v = view(7, d)
    node.step(T0, v)
    now = T0
    restarts_at = []
    for _ in range(4):
        node.observed[d.workload_id] = stopped(d, 1)
        # Step time forward 100 ms at a time until the restart happens.
        while True:
            now += 100
            plan = reconcile(node.views(v), node.observed, node.memory, now)
            if Restart(d) in plan.actions:
                node.step(now, v)
                restarts_at.append(now)
                break
            assert plan.wake_at_ms is not None
            assert plan.wake_at_ms > now
    gaps = [b - a for a, b in zip([T0, *restarts_at], restarts_at, strict=False)]
    assert gaps == [backoff_ms(0), backoff_ms(1), backoff_ms(2), backoff_ms(3)]
    assert node.memory.workloads[d.workload_id].restarts == 4
    # Up for STABLE_AFTER_MS: the count resets, the next crash restarts after the base delay.
    now += STABLE_AFTER_MS
    node.step(now, v)
    assert node.memory.workloads[d.workload_id].restarts == 0
    node.observed[d.workload_id] = stopped(d, 1)
    assert Restart(d) in node.step(now + BACKOFF_BASE_MS, v)


def test_crash_loop_is_reported_as_error_once() -> None:
    node = FakeNode()
    d = desired(8, "boom")
    v = view(8, d)
    node.step(T0, v)
    now = T0
    for _ in range(CRASH_LOOP_RESTARTS + 3):
        node.observed[d.workload_id] = stopped(d, 2)
        now += BACKOFF_MAX_MS
        node.step(now, v)
        node.step(now + 1, v)
    r = node.ledger[8]["boom"]
    assert r.state == "error"
    assert "crash loop" in r.message
    assert "exit code 2" in r.message
    reports = [a for a in node.log if isinstance(a, Report)]
    # ok once, then the crash loop once: not one report per crash or per pass.
    assert [dict(a.results)["boom"].state for a in reports] == ["ok", "error"]


def test_failed_create_is_reported_and_retried_with_backoff() -> None:
    node = FakeNode()
    node.fail_create = "image sha256:ab.. could not be fetched"
    v = view(1, D1)
    assert node.step(T0, v) == [Create(D1)]
    assert node.step(T0 + 1, v) == [
        Report(1, 1, (("web", Result("error", "image sha256:ab.. could not be fetched")),))]
    assert node.step(T0 + 2, v) == []  # backoff: no new attempt yet
    node.fail_create = None
    assert node.step(T0 + BACKOFF_BASE_MS, v) == [Create(D1)]
    assert node.step(T0 + BACKOFF_BASE_MS + 1, v) == [
        Report(1, 1, (("web", Result("ok", "", "10.0.0.1:80")),))]


def test_update_recreates_and_reports_the_new_version() -> None:
    node = FakeNode()
    node.step(T0, view(1, D1))
    node.step(T0 + 1, view(1, D1))
    v2 = view(1, D1_NEW, version=2)
    node.ledger[1] = {}  # contract_update resets the results on the ledger
    assert node.step(T0 + 2, v2) == [Update(D1_NEW)]
    assert node.observed[D1.workload_id].spec_hash == D1_NEW.spec.spec_hash()
    acts = node.step(T0 + 3, v2)
    assert acts == [Report(1, 2, (("web", Result("ok", "", "10.0.0.1:80")),))]


def test_cancel_deletes_then_reports_deleted_then_forgets() -> None:
    node = FakeNode()
    a, b = desired(4, "a"), desired(4, "b")
    live = view(4, a, b)
    node.step(T0, live)
    node.step(T0 + 1, live)
    cancelled = view(4, state="cancelled", names=("a", "b"))
    assert node.step(T0 + 2, cancelled) == [Delete(a.workload_id), Delete(b.workload_id)]
    assert node.step(T0 + 3, cancelled) == [
        Report(4, 1, (("a", Result("deleted")), ("b", Result("deleted"))))]
    assert node.step(T0 + 4, cancelled) == []
    assert node.memory.contract_ids() == set()


def test_deleted_is_reported_even_when_the_first_report_is_lost() -> None:
    """The memory keeps a deleted workload until the ledger shows it deleted, so the
    follower keeps reading its (cancelled, off-the-node-list) contract."""
    node = FakeNode()
    a = desired(4, "a")
    node.step(T0, view(4, a))
    node.step(T0 + 1, view(4, a))
    cancelled = view(4, state="cancelled", names=("a",))
    node.step(T0 + 2, cancelled)
    lost = node.step(T0 + 3, cancelled, commit_reports=False)
    assert lost == [Report(4, 1, (("a", Result("deleted")),))]
    node.memory = replace(node.memory, reports={})  # even if the report memory is lost
    assert node.memory.contract_ids() == {4}
    assert node.step(T0 + 4, cancelled) == lost
    node.step(T0 + 5, cancelled)
    assert node.memory.contract_ids() == set()


def test_delete_of_undesired_after_agent_restart() -> None:
    """After a crash the memory may be gone: what runs and is not wanted is still deleted,
    what is wanted and runs is adopted, never created twice."""
    node = FakeNode()
    keep, drop = desired(1, "keep"), desired(2, "drop")
    node.step(T0, view(1, keep), view(2, drop))
    node.memory = ReconcileMemory()  # the agent lost its memory file
    acts = node.step(T0 + 1, view(1, keep), view(2, drop, state="cancelled"))
    assert acts == [Delete(drop.workload_id), Adopt(keep)]
    assert Create(keep) not in node.log[2:]


def test_grace_keeps_running() -> None:
    node = FakeNode()
    node.step(T0, view(1, D1))
    node.step(T0 + 1, view(1, D1))
    assert node.step(T0 + 2, view(1, D1, state="grace")) == []
    assert D1.workload_id in node.observed


def test_refused_contract_reports_each_workload_error_and_runs_nothing() -> None:
    node = FakeNode()
    v = view(9, names=("x", "y"),
             errors={"x": "bad owner signature", "y": "bad owner signature"})
    assert node.step(T0, v) == [Report(9, 1, (("x", Result("error", "bad owner signature")),
                                              ("y", Result("error", "bad owner signature"))))]
    assert node.observed == {}
    assert node.step(T0 + 1, v) == []


def test_long_messages_are_cut_to_the_ledger_limit() -> None:
    r = Result("error", "x" * 5000, "e" * 400)
    assert len(r.message) == 1024
    assert len(r.endpoint) == 256


def test_memory_round_trips_through_json() -> None:
    node = FakeNode()
    node.step(T0, view(1, D1), view(2, D2))
    node.step(T0 + 1, view(1, D1), view(2, D2), commit_reports=False)
    text = node.memory.to_json()
    assert ReconcileMemory.from_json(text) == node.memory


def test_a_clock_that_jumps_back_does_not_stretch_the_backoff() -> None:
    node = FakeNode()
    d = desired(6, "svc")
    v = view(6, d)
    node.step(T0, v)
    node.observed[d.workload_id] = stopped(d, 1)
    # The wall clock went back an hour: the restart is due after the base delay from now.
    back = T0 - 3_600_000
    assert Restart(d) not in node.step(back, v)
    assert Restart(d) in node.step(back + BACKOFF_BASE_MS, v)
