"""Deterministic network simulation of the consensus core over thousands of seeds.

Each seed draws its own fault mix (see ``consensus_sim.random_params``) and the simulator
checks agreement, validity and no double-signing after every action, and liveness once the
chaos period is over. A failure names its seed; reproduce one with::

    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests/sim'); import consensus_sim as s; \
s.Sim(SEED, s.random_params(SEED, N, heights=HEIGHTS)).run()"

(the failure message prints that exact line).

``TFGRID_SIM_SEEDS`` (default 2000) sets the number of seeds per validator-set size.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
from consensus_sim import (
    BYZANTINE,
    TWIN,
    Sim,
    SimFailure,
    SimParams,
    random_params,
)

SEEDS = int(os.environ.get("TFGRID_SIM_SEEDS", "2000"))
CHUNK = 100
CHUNKS = [(start, min(start + CHUNK, SEEDS)) for start in range(0, SEEDS, CHUNK)]


def run_chunk(n: int, start: int, stop: int) -> collections.Counter[str]:
    totals: collections.Counter[str] = collections.Counter()
    for seed in range(start, stop):
        # every fourth seed runs three heights, the others two (CPU budget)
        heights = 3 if seed % 4 == 0 else 2
        sim = Sim(seed, random_params(seed, n, heights=heights))
        try:
            sim.run()
        except SimFailure as exc:
            repro = (f"import sys; sys.path.insert(0, 'tests/sim'); import consensus_sim as s; "
                     f"s.Sim({seed}, s.random_params({seed}, {n}, heights={heights})).run()")
            pytest.fail(f"{exc}\nparams: {sim.p}\nreproduce: .venv/bin/python -c \"{repro}\"")
        totals.update(sim.stats)
        totals["evidence"] += len(sim.evidence)
        totals["byzantine"] += sum(1 for pr in sim.procs if pr.role == BYZANTINE)
        totals["twins"] += sum(1 for pr in sim.procs if pr.role == TWIN) // 2
        totals["heights"] += len(sim.decided)
    return totals


def check_faults_happened(totals: collections.Counter[str], seeds: int) -> None:
    """The sweep must not pass vacuously: faults of every kind really occurred."""
    assert totals["heights"] >= 2 * seeds
    if seeds >= CHUNK:
        for what in ("crashes", "evidence", "byzantine", "twins", "catchups"):
            assert totals[what] > 0, f"no {what} in {seeds} seeds: {dict(totals)}"


@pytest.mark.parametrize(("start", "stop"), CHUNKS, ids=[f"seeds{a}-{b - 1}" for a, b in CHUNKS])
def test_sim_four_validators(start: int, stop: int) -> None:
    check_faults_happened(run_chunk(4, start, stop), stop - start)


@pytest.mark.parametrize(("start", "stop"), CHUNKS, ids=[f"seeds{a}-{b - 1}" for a, b in CHUNKS])
def test_sim_seven_validators(start: int, stop: int) -> None:
    check_faults_happened(run_chunk(7, start, stop), stop - start)


def test_a_seed_replays_identically_in_another_process() -> None:
    """Determinism across interpreter runs (str/bytes hash randomisation must not matter)."""
    code = (
        "import sys; sys.path.insert(0, 'tests/sim'); import consensus_sim as s\n"
        "sim = s.Sim(11, s.random_params(11, 7, heights=3)); sim.run()\n"
        "print(sim.steps, sim.now, sorted((h, b.hex()) for h, b in sim.decided.items()))\n"
    )
    root = Path(__file__).resolve().parents[2]
    outs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        outs.append(subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True,
                                   capture_output=True, text=True).stdout)
    assert outs[0] == outs[1]
    assert outs[0].strip()


def test_crash_between_any_two_actions_never_double_signs() -> None:
    """A crash-heavy sweep: every honest validator crashes several times, each time at a
    random point of a core call's action list, and restarts from its last executed Persist."""
    for seed in range(60):
        params = SimParams(n=4, heights=4, crashes=8, chaos_ms=1_500, drop=0.05,
                           max_delay=300)
        sim = Sim(10_000 + seed, params)
        try:
            sim.run()
        except SimFailure as exc:
            pytest.fail(str(exc))
        assert sim.stats["crashes"] >= 2


def test_empty_blocks_wait_for_txs_or_the_interval() -> None:
    """With an empty-block interval and no txs, an idle chain makes one block per interval."""
    params = SimParams(n=4, heights=4, empty_block_interval_ms=5_000, inject_txs=False,
                       max_delay=50)
    sim = Sim(7, params)
    sim.run()
    times = [0] + [b.header.time_ms for b in sim.procs[0].app.blocks]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) >= 4
    assert all(5_000 <= g < 5_000 + 1_000 for g in gaps), times
    # idle: only wait_txs timers ran between blocks, no rebroadcast or round timers
    assert sim.stats["deliveries"] < 4 * 12 * len(gaps) * 2
