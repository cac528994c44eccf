"""The reconcile core: what the ledger wants vs what runs here -> actions. Pure, no I/O.

Inputs (all immutable):

- ``contracts``: one :class:`ContractView` per contract this node has to act on, built by the
  follower from verified ledger entries: the live contracts assigned to the node, plus any
  contract that still has something here (a container, a remembered workload, a report in
  flight) so that a cancelled one is cleaned up and reported ``deleted``.
- ``observed``: the runtime's containers (:class:`Observed`), after an agent restart too.
- ``memory``: :class:`ReconcileMemory`, the little the agent must remember across passes and
  crashes (restart counts and times, published endpoints, the last failure per workload,
  reports in flight). The driver persists it after every action.
- ``now_ms``: the agent's wall clock in milliseconds. Wall-clock because the times kept in the
  memory must still mean something after the agent restarts (trio's clock starts anew in
  every process); a clock that jumps back is clamped, so it never stretches a backoff.

Rules, per workload id ``c<contract>-<name>``:

==============================================  ==========================================
situation                                       action
==============================================  ==========================================
observed, wanted by no contract                 Delete (runtime wipes bundle, volume, logs)
wanted, not observed                            Create (after the create backoff if the
                                                last attempt failed)
wanted, observed with another spec hash         Update (recreate with the new spec)
wanted, running, endpoints unknown (the agent   Adopt (the runtime's idempotent create
crashed between create and remembering)          returns the endpoints; never a duplicate)
wanted, stopped, policy says restart            Restart when ``started + backoff(n)`` passed
wanted, stopped, policy says stay stopped       nothing; reported ok (exit 0) or error
==============================================  ==========================================

Contract states: created/deployed/error run their workloads; ``grace`` (unpaid, the owner may
still pay) keeps them running untouched; ``cancelled`` (by the owner, or at the end of grace)
deletes them, volume and logs included, and reports each workload ``deleted``.

Restart policy: ``always`` restarts any exit; ``on-failure`` restarts a non-zero (or unknown)
exit code; ``never`` does not restart. A container left in runc's ``created`` state (the agent
died between ``runc create`` and ``runc start``) is started whatever the policy. The backoff
before the n-th restart in a row is ``min(BACKOFF_BASE_MS * 2**n, BACKOFF_MAX_MS)`` after the
previous start; a container that stays up ``STABLE_AFTER_MS`` resets the count.

Reports: for every contract the wanted per-workload results (ok + endpoint, error + reason,
deleted) are compared with what the ledger shows for the contract's version; differences go
out in one :class:`Report`. A report is not repeated while it is in flight (``REPORT_RETRY_MS``),
which keeps the core idempotent: feeding it its own memory back with unchanged observations
yields no new action.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ledger.codec import hash_value
from ledger.errors import ConfigError
from zos_agent.oci import ContainerSpec

if TYPE_CHECKING:  # namespaces imports this module at run time
    from zos_agent.namespaces import NamespaceWant

BACKOFF_BASE_MS = 1_000
BACKOFF_MAX_MS = 300_000
STABLE_AFTER_MS = 60_000
CRASH_LOOP_RESTARTS = 5  # this many restarts in a row are reported as an error
REPORT_RETRY_MS = 30_000
MAX_MESSAGE = 1024  # ledger limits of a result's fields
MAX_ENDPOINT = 256
MEMORY_VERSION = 1

# contract states as the ledger names them
LIVE_STATES = ("created", "deployed", "error", "grace")
_WID = re.compile(r"c([0-9]{1,19})-(.+)")


def workload_id(contract_id: int, name: str) -> str:
    """The runtime id of workload ``name`` of a contract (also the runc container id)."""
    return f"c{contract_id}-{name}"


def parse_workload_id(wid: str) -> tuple[int, str] | None:
    """``(contract_id, name)`` of a workload id, or None if it is not one of ours."""
    m = _WID.fullmatch(wid)
    return None if m is None else (int(m.group(1)), m.group(2))


def backoff_ms(restarts: int) -> int:
    """The wait before restart number ``restarts + 1`` in a row (``restarts`` done so far)."""
    return min(BACKOFF_BASE_MS << min(restarts, 30), BACKOFF_MAX_MS)


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True, slots=True)
class Result:
    """One workload's result as the ledger stores it."""

    state: str  # "ok" | "error" | "deleted"
    message: str = ""
    endpoint: str = ""

    def __post_init__(self) -> None:
        # The ledger refuses longer fields; cut here so what we compare is what it stores.
        if len(self.message) > MAX_MESSAGE:
            object.__setattr__(self, "message", self.message[:MAX_MESSAGE - 3] + "...")
        if len(self.endpoint) > MAX_ENDPOINT:
            object.__setattr__(self, "endpoint", self.endpoint[:MAX_ENDPOINT])

    def to_map(self, name: str) -> dict[str, str]:
        return {"name": name, "state": self.state, "message": self.message,
                "endpoint": self.endpoint}


DELETED = Result("deleted")


@dataclass(frozen=True, slots=True)
class Desired:
    """A container the ledger wants here, verified and ready for the runtime."""

    contract_id: int
    version: int
    name: str
    spec: ContainerSpec
    image_sources: tuple[str, ...] = ()

    @property
    def workload_id(self) -> str:
        return self.spec.workload_id


@dataclass(frozen=True, slots=True)
class ContractView:
    """What the verified ledger says about one contract.

    ``state`` is the ledger's contract state, or ``"missing"`` when no such contract exists.
    ``names`` are the workload names of the current deployment (what results may be reported
    for). ``desired`` are its runnable containers; ``errors`` maps a workload name to why it
    cannot run (verification failures refuse every workload of the contract). ``results`` is
    what the ledger currently shows for this version. ``hold`` marks a contract that could
    not be read with a valid proof right now: whatever runs of it is left exactly as it is
    (neither deleted nor restarted), and only its ``errors`` are reported.
    """

    contract_id: int
    version: int
    state: str
    names: tuple[str, ...] = ()
    desired: tuple[Desired, ...] = ()
    errors: Mapping[str, str] = field(default_factory=dict)
    results: Mapping[str, Result] = field(default_factory=dict)
    hold: bool = False
    namespaces: tuple[NamespaceWant, ...] = ()  # its storage namespace workloads

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass(frozen=True, slots=True)
class Observed:
    """A container as the runtime sees it."""

    workload_id: str
    status: str  # "running" | "stopped" | "created"
    spec_hash: str
    exit_code: int | None = None


# ---------------------------------------------------------------------------------------------
# memory


@dataclass(frozen=True, slots=True)
class WorkloadMemory:
    contract_id: int
    spec_hash: str
    started_ms: int = 0  # when we last created or restarted it
    restarts: int = 0  # restarts in a row without a stable run
    known: bool = False  # created (or adopted) with this spec: endpoint is valid
    endpoint: str = ""
    failures: int = 0  # failed create/restart attempts in a row
    failed_ms: int = 0
    error: str = ""  # the last failure, reported until an attempt succeeds
    last_exit: int | None = None  # exit code seen at the last restart
    gone: bool = False  # deleted here; kept until the ledger shows it "deleted"


@dataclass(frozen=True, slots=True)
class SentReport:
    version: int
    digest: str
    sent_ms: int


@dataclass(frozen=True, slots=True)
class ReconcileMemory:
    workloads: Mapping[str, WorkloadMemory] = field(default_factory=dict)
    reports: Mapping[int, SentReport] = field(default_factory=dict)

    def contract_ids(self) -> set[int]:
        """Contracts the memory still refers to (the follower keeps fetching them)."""
        return {m.contract_id for m in self.workloads.values()} | set(self.reports)

    # -- outcomes of executed actions (the driver calls these) ---------------------------

    def _with(self, wid: str, m: WorkloadMemory) -> ReconcileMemory:
        return replace(self, workloads={**self.workloads, wid: m})

    def created(self, d: Desired, endpoints: list[str], now_ms: int) -> ReconcileMemory:
        """A Create/Update/Adopt of ``d`` succeeded with these published endpoints."""
        old = self.workloads.get(d.workload_id)
        keep = old is not None and old.spec_hash == d.spec.spec_hash()
        return self._with(d.workload_id, WorkloadMemory(
            contract_id=d.contract_id, spec_hash=d.spec.spec_hash(),
            started_ms=old.started_ms if keep and old is not None and old.known else now_ms,
            restarts=old.restarts if keep and old is not None else 0,
            known=True, endpoint=",".join(endpoints)))

    def failed(self, d: Desired, reason: str, now_ms: int) -> ReconcileMemory:
        """A Create/Update/Adopt/Restart of ``d`` failed."""
        old = self.workloads.get(d.workload_id)
        if old is None or old.spec_hash != d.spec.spec_hash():
            old = WorkloadMemory(contract_id=d.contract_id, spec_hash=d.spec.spec_hash())
        return self._with(d.workload_id, replace(old, failures=old.failures + 1,
                                                 failed_ms=now_ms, error=reason))

    def restarted(self, wid: str) -> ReconcileMemory:
        """A Restart succeeded: clear any failure (the count and time were set when planned)."""
        old = self.workloads.get(wid)
        if old is None:
            return self
        return self._with(wid, replace(old, failures=0, failed_ms=0, error=""))

    def deleted(self, wid: str) -> ReconcileMemory:
        """A Delete succeeded. The workload is remembered as gone until its contract no longer
        needs a "deleted" report (the next pass decides), so the follower keeps reading it."""
        old = self.workloads.get(wid)
        if old is None:
            return self
        return self._with(wid, replace(old, gone=True, known=False, endpoint="", error=""))

    # -- persistence -----------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({
            "version": MEMORY_VERSION,
            "workloads": {wid: {
                "contract_id": m.contract_id, "spec_hash": m.spec_hash,
                "started_ms": m.started_ms, "restarts": m.restarts, "known": m.known,
                "endpoint": m.endpoint, "failures": m.failures, "failed_ms": m.failed_ms,
                "error": m.error, "last_exit": m.last_exit, "gone": m.gone}
                for wid, m in sorted(self.workloads.items())},
            "reports": {str(cid): {"version": r.version, "digest": r.digest,
                                   "sent_ms": r.sent_ms}
                        for cid, r in sorted(self.reports.items())},
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReconcileMemory:
        """Raises :class:`ConfigError` if ``text`` is not a memory this version wrote."""
        try:
            doc = json.loads(text)
            if doc.get("version") != MEMORY_VERSION:
                raise ConfigError(f"agent memory version {doc.get('version')!r} is unknown")
            workloads = {str(wid): WorkloadMemory(
                contract_id=int(m["contract_id"]), spec_hash=str(m["spec_hash"]),
                started_ms=int(m["started_ms"]), restarts=int(m["restarts"]),
                known=bool(m["known"]), endpoint=str(m["endpoint"]),
                failures=int(m["failures"]), failed_ms=int(m["failed_ms"]),
                error=str(m["error"]),
                last_exit=None if m["last_exit"] is None else int(m["last_exit"]),
                gone=bool(m["gone"])) for wid, m in doc["workloads"].items()}
            reports = {int(cid): SentReport(int(r["version"]), str(r["digest"]),
                                            int(r["sent_ms"]))
                       for cid, r in doc["reports"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"agent memory is malformed: {exc!r}") from None
        return cls(workloads, reports)


# ---------------------------------------------------------------------------------------------
# actions


@dataclass(frozen=True, slots=True)
class Create:
    desired: Desired


@dataclass(frozen=True, slots=True)
class Update:
    """Recreate with a new spec (runc cannot change a container in place)."""

    desired: Desired


@dataclass(frozen=True, slots=True)
class Adopt:
    """A running container with our spec whose endpoints we do not know: ask the runtime."""

    desired: Desired


@dataclass(frozen=True, slots=True)
class Restart:
    desired: Desired


@dataclass(frozen=True, slots=True)
class Delete:
    workload_id: str


@dataclass(frozen=True, slots=True)
class Report:
    contract_id: int
    version: int
    results: tuple[tuple[str, Result], ...]  # (workload name, result), sorted by name

    def body(self) -> dict[str, Any]:
        """The ``contract_result`` tx body."""
        return {"contract_id": self.contract_id, "version": self.version,
                "workloads": [r.to_map(name) for name, r in self.results]}


Action = Create | Update | Adopt | Restart | Delete | Report


@dataclass(frozen=True, slots=True)
class Plan:
    actions: list[Action]
    memory: ReconcileMemory
    wake_at_ms: int | None  # run again by then (a restart or retry is due), None: no timer


# ---------------------------------------------------------------------------------------------
# the core


def _restarts_wanted(policy: str, o: Observed) -> bool:
    if o.status == "created":
        return True
    if policy == "always":
        return True
    if policy == "on-failure":
        return o.exit_code != 0
    return False


def _stopped_result(o: Observed) -> Result:
    code = o.exit_code
    if code == 0:
        return Result("ok", "exited with code 0")
    return Result("error", "exited" if code is None else f"exited with code {code}")


def _crash_loop(m: WorkloadMemory, endpoint: str) -> Result:
    # One message for the whole loop (not a count) so that it is reported once, not per crash.
    last = "unknown" if m.last_exit is None else str(m.last_exit)
    return Result("error", f"crash loop: keeps exiting (last exit code {last}); restarting "
                  "with backoff", endpoint)


def reconcile(contracts: Mapping[int, ContractView], observed: Mapping[str, Observed],
              memory: ReconcileMemory, now_ms: int,
              namespace_results: Mapping[tuple[int, str], Result] | None = None) -> Plan:
    """Decide the actions that bring this node to what the ledger wants (module docstring).

    ``namespace_results``: the result of each storage namespace workload, keyed by (contract
    id, name), from :meth:`zos_agent.namespaces.ShardService.apply` (served outside the
    runtime; only reported here).
    """
    ns_results = namespace_results or {}
    actions: list[Action] = []
    wake: list[int] = []
    mem: dict[str, WorkloadMemory] = dict(memory.workloads)
    desired = {d.workload_id: d for c in contracts.values()
               if c.live and not c.hold for d in c.desired}
    held = {cid for cid, c in contracts.items() if c.hold}
    # Per workload id, the result to report (absent: nothing new to say yet).
    results: dict[str, Result] = {}

    def is_held(wid: str, m: WorkloadMemory | None = None) -> bool:
        parsed = parse_workload_id(wid)
        cid = m.contract_id if m is not None else (None if parsed is None else parsed[0])
        return cid in held

    for wid in sorted(observed):
        if wid not in desired and not is_held(wid):
            actions.append(Delete(wid))
    for wid in list(mem):
        m_old = mem[wid]
        if wid in desired or wid in observed or is_held(wid, m_old):
            continue
        parsed = parse_workload_id(wid)
        view = contracts.get(m_old.contract_id)
        if (parsed is not None and view is not None and view.state == "cancelled"
                and parsed[1] in view.names and view.results.get(parsed[1]) != DELETED):
            mem[wid] = replace(m_old, gone=True, known=False, endpoint="", error="")
        else:
            del mem[wid]

    for wid in sorted(desired):
        d = desired[wid]
        spec_hash = d.spec.spec_hash()
        m = mem.get(wid)
        if m is None or m.spec_hash != spec_hash:
            m = WorkloadMemory(contract_id=d.contract_id, spec_hash=spec_hash)
        if m.started_ms > now_ms or m.failed_ms > now_ms:
            # The clock went back (times are wall-clock so that they survive a restart of
            # the agent): never wait for a moment that is now further away than a backoff.
            m = replace(m, started_ms=min(m.started_ms, now_ms),
                        failed_ms=min(m.failed_ms, now_ms))
        o = observed.get(wid)
        retry_at = m.failed_ms + backoff_ms(m.failures - 1) if m.failures else 0
        if m.error:
            results[wid] = Result("error", m.error)
        if o is None or o.spec_hash != spec_hash or (o.status == "running" and not m.known):
            if now_ms >= retry_at:
                if o is None:
                    actions.append(Create(d))
                elif o.spec_hash != spec_hash:
                    actions.append(Update(d))
                else:
                    actions.append(Adopt(d))
            else:
                wake.append(retry_at)
        elif o.status == "running":
            if m.restarts and now_ms - m.started_ms >= STABLE_AFTER_MS:
                m = replace(m, restarts=0)
            elif m.restarts:
                wake.append(m.started_ms + STABLE_AFTER_MS)
            if not m.error:
                if m.restarts >= CRASH_LOOP_RESTARTS:
                    results[wid] = _crash_loop(m, m.endpoint)
                else:
                    results[wid] = Result("ok", "", m.endpoint)
        elif _restarts_wanted(d.spec.restart, o):
            due = max(m.started_ms + backoff_ms(m.restarts), retry_at)
            if now_ms >= due:
                actions.append(Restart(d))
                m = replace(m, restarts=m.restarts + 1, started_ms=now_ms, last_exit=o.exit_code)
            else:
                wake.append(due)
            if m.restarts >= CRASH_LOOP_RESTARTS and not m.error:
                results[wid] = _crash_loop(m, m.endpoint)
        elif not m.error:
            results[wid] = _stopped_result(o)
        mem[wid] = m

    reports: dict[int, SentReport] = {cid: r for cid, r in memory.reports.items() if cid in held}
    for cid in sorted(contracts):
        c = contracts[cid]
        want: dict[str, Result] = {}
        for name in c.names:
            wid = workload_id(cid, name)
            if c.hold:
                if name in c.errors:
                    want[name] = Result("error", c.errors[name])
            elif not c.live:
                if c.state == "cancelled" and wid not in observed:
                    want[name] = Result("deleted")
            elif name in c.errors:
                want[name] = Result("error", c.errors[name])
            elif wid in results:
                want[name] = results[wid]
            elif (cid, name) in ns_results:
                want[name] = ns_results[(cid, name)]
        changed = tuple((n, r) for n, r in sorted(want.items()) if c.results.get(n) != r)
        if not changed:
            continue
        digest = hash_value([c.version, [[n, r.to_map(n)] for n, r in changed]]).hex()
        sent = memory.reports.get(cid)
        if (sent is not None and sent.version == c.version and sent.digest == digest
                and now_ms - sent.sent_ms < REPORT_RETRY_MS):
            reports[cid] = sent
            wake.append(sent.sent_ms + REPORT_RETRY_MS)
            continue
        actions.append(Report(cid, c.version, changed))
        reports[cid] = SentReport(c.version, digest, now_ms)
        wake.append(now_ms + REPORT_RETRY_MS)

    return Plan(actions, ReconcileMemory(mem, reports), min(wake) if wake else None)
