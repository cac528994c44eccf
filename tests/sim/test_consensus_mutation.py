"""Mutation test: the simulator must catch a core whose lock check was removed.

``NoLockCheck`` prevotes for any valid proposal whatever it is locked on (lines 22-23 and 28-29
of Algorithm 1 without ``lockedRound <= vr or lockedValue = v``). With an equivocating
Byzantine validator and the targeted adversarial scheduler, a bounded seed search must find an
agreement violation; the same seeds with the real core must stay safe and live.
"""

from __future__ import annotations

import pytest
from consensus_sim import Sim, SimFailure, SimParams

from ledger.consensus import Consensus

SEARCH = 200  # the search is bounded; about one seed in ten breaks the mutant


class NoLockCheck(Consensus):
    def _lock_allows(self, block_hash: bytes, valid_round: int) -> bool:
        return True


def attack_params(n: int, *, liveness: bool) -> SimParams:
    return SimParams(n=n, heights=2, byzantine=(n - 1) // 3, max_delay=300,
                     mute_deciders_ms=5_000, targeted=True, chaos_ms=10_000,
                     check_liveness=liveness, time_cap_ms=10_000 if not liveness else 400_000)


def first_violation(n: int) -> tuple[int, str] | None:
    for seed in range(SEARCH):
        try:
            Sim(seed, attack_params(n, liveness=False), NoLockCheck).run()
        except SimFailure as exc:
            if "agreement" in str(exc):
                return seed, str(exc)
            raise
    return None


@pytest.mark.parametrize("n", [4, 7])
def test_removing_the_lock_check_breaks_agreement(n: int) -> None:
    found = first_violation(n)
    assert found is not None, f"no agreement violation in {SEARCH} seeds: the sim is too weak"
    seed, message = found
    print(f"lock check removed, n={n}: seed {seed} breaks agreement: {message}")
    # the very same schedules are safe (and live once the chaos ends) with the lock check
    for s in range(seed + 1):
        try:
            Sim(s, attack_params(n, liveness=True)).run()
        except SimFailure as exc:
            pytest.fail(f"the real core failed under the attack schedule: {exc}")
