"""Table-style unit tests of the sans-IO Tendermint core (ledger.consensus).

One core under test (validator ``ME``) is fed proposals and votes signed by the other
validators' keys; every test asserts on the exact actions it returns. No clock, no sockets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest

from ledger.codec import EMPTY_HASH, hash_bytes, hash_value
from ledger.consensus import (
    Action,
    BroadcastProposal,
    BroadcastVote,
    CatchUp,
    Consensus,
    ConsensusConfig,
    Decided,
    Persist,
    RecordEvidence,
    ScheduleTimeout,
    Timeout,
)
from ledger.errors import LocalProtocolError, VerificationError
from ledger.keys import KeyPair
from ledger.types import (
    NIL,
    PRECOMMIT,
    PREVOTE,
    Block,
    Commit,
    Header,
    Proposal,
    ValidatorSet,
    Vote,
    merkle_root,
)

CHAIN = "unit-chain"
KEYS = [KeyPair.from_seed(hashlib.blake2b(b"unit-%d" % i, digest_size=32).digest())
        for i in range(4)]
VALS = ValidatorSet.of([k.public_key for k in KEYS])
BY_PUB = {k.public_key: k for k in KEYS}
CFG = ConsensusConfig()


def member(i: int) -> KeyPair:
    """The key of validator number ``i`` in canonical order."""
    return BY_PUB[VALS.members[i]]


def proposer_key(height: int, round_: int) -> KeyPair:
    return BY_PUB[VALS.proposer(height, round_)]


@dataclass
class App:
    """A minimal deterministic app: any well-formed block of the right height is valid."""

    me: bytes
    committed: list[tuple[Block, Commit]] = field(default_factory=list)
    pending: bool = False
    invalid: set[bytes] = field(default_factory=set)
    counter: int = 0

    def propose(self, height: int, round: int, time_ms: int, last_commit: Commit | None) -> Block:
        self.counter += 1
        return make_block(height, time_ms, self.me, tag=b"app-%d" % self.counter,
                          last_commit=last_commit)

    def validate(self, block: Block, now_ms: int) -> bool:
        return block.hash() not in self.invalid

    def commit(self, block: Block, commit: Commit) -> None:
        self.committed.append((block, commit))

    def has_pending_txs(self) -> bool:
        return self.pending


def make_block(height: int, time_ms: int, proposer: bytes, *, tag: bytes = b"x",
               last_commit: Commit | None = None) -> Block:
    txs = (tag,)
    root = merkle_root([hash_bytes(t) for t in txs])
    header = Header(CHAIN, height, time_ms, EMPTY_HASH,
                    EMPTY_HASH if last_commit is None else last_commit.hash(), root,
                    hash_value([tag]), VALS.hash(), VALS.hash(), proposer)
    return Block(header, txs, last_commit)


def vote(i: int, kind: int, height: int, round_: int, block_hash: bytes,
         chain: str = CHAIN) -> Vote:
    k = member(i)
    return Vote(kind, height, round_, block_hash, k.public_key).signed(k, chain)


def proposal(height: int, round_: int, block: Block, valid_round: int = -1) -> Proposal:
    k = proposer_key(height, round_)
    return Proposal(height, round_, block.hash(), valid_round, k.public_key).signed(k, CHAIN)


def core_for(i: int, *, height: int = 1, config: ConsensusConfig = CFG,
             snapshot: bytes | None = None, app: App | None = None,
             cls: type[Consensus] = Consensus) -> tuple[Consensus, App]:
    k = member(i)
    app = app if app is not None else App(k.public_key)
    c = cls(chain_id=CHAIN, validators=VALS, key=k, app=app, config=config, height=height,
            last_block_time_ms=0, snapshot=snapshot)
    return c, app


def others(c: Consensus) -> list[int]:
    return [i for i in range(4) if VALS.members[i] != me_of(c)]


def me_of(c: Consensus) -> bytes:
    key = c._key  # noqa: SLF001 - tests look at the injected key
    assert key is not None
    return key.public_key


def not_proposer(height: int, round_: int) -> int:
    """Index of a validator that is not the proposer of (height, round_)."""
    return (VALS.members.index(VALS.proposer(height, round_)) + 1) % 4


def kinds(acts: list[Action]) -> list[str]:
    return [type(a).__name__ for a in acts]


def votes_in(acts: list[Action]) -> list[Vote]:
    return [a.vote for a in acts if isinstance(a, BroadcastVote)]


def timeouts_in(acts: list[Action]) -> list[tuple[Timeout, int]]:
    return [(a.timeout, a.delay_ms) for a in acts if isinstance(a, ScheduleTimeout)]


def last_snapshot(acts: list[Action]) -> bytes:
    snaps = [a.snapshot for a in acts if isinstance(a, Persist)]
    assert snaps
    return snaps[-1]


def feed_votes(c: Consensus, idxs: list[int], kind: int, height: int, round_: int,
               block_hash: bytes, now: int = 0) -> list[Action]:
    acts: list[Action] = []
    for i in idxs:
        acts += c.on_vote(vote(i, kind, height, round_, block_hash), now)
    return acts


# ----------------------------------------------------------------------------- happy path


def test_proposer_happy_path_decides_with_four_validators() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, app = core_for(pidx)
    acts = c.start(now_ms=10)
    # sign-before-send: Persist, then the proposal, then our own prevote (persisted first)
    assert kinds(acts)[:2] == ["ScheduleTimeout", "Persist"]
    assert kinds(acts)[2:5] == ["BroadcastProposal", "Persist", "BroadcastVote"]
    prop = next(a for a in acts if isinstance(a, BroadcastProposal))
    bh = prop.block.hash()
    assert prop.proposal.block_hash == bh
    assert prop.block.header.time_ms == 10
    assert votes_in(acts)[0].kind == PREVOTE
    assert votes_in(acts)[0].block_hash == bh
    assert (c.round, c.step) == (0, "prevote")
    rest = [i for i in range(4) if i != pidx]
    acts = feed_votes(c, rest[:2], PREVOTE, 1, 0, bh)
    # L34 (prevote timer) and L36 (lock + precommit) fire on the same 2f+1th prevote
    assert kinds(acts) == ["ScheduleTimeout", "Persist", "BroadcastVote"]
    assert timeouts_in(acts) == [(Timeout(1, 0, "prevote"), CFG.timeout_prevote_ms)]
    assert votes_in(acts)[0].kind == PRECOMMIT
    assert votes_in(acts)[0].block_hash == bh
    assert (c.locked_round, c.valid_round, c.step) == (0, 0, "precommit")
    acts = feed_votes(c, rest[:1], PRECOMMIT, 1, 0, bh)
    assert not any(isinstance(a, Decided) for a in acts)
    acts = feed_votes(c, rest[1:2], PRECOMMIT, 1, 0, bh, now=20)
    decided = [a for a in acts if isinstance(a, Decided)]
    assert len(decided) == 1
    assert decided[0].block.hash() == bh
    commit = decided[0].commit
    commit.verify(CHAIN, VALS)
    assert (commit.height, commit.round, commit.block_hash) == (1, 0, bh)
    assert app.committed == [(prop.block, commit)]
    assert (c.height, c.round, c.last_commit) == (2, 0, commit)


def test_non_proposer_prevotes_the_proposal_and_waits() -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i)
    acts = c.start(0)
    assert (Timeout(1, 0, "propose"), CFG.timeout_propose_ms) in timeouts_in(acts)
    assert not votes_in(acts)
    block = make_block(1, 5, VALS.proposer(1, 0))
    acts = c.on_proposal(proposal(1, 0, block), block, 1)
    assert kinds(acts) == ["Persist", "BroadcastVote"]
    v = votes_in(acts)[0]
    assert (v.kind, v.height, v.round, v.block_hash) == (PREVOTE, 1, 0, block.hash())
    v.verify(CHAIN)


@pytest.mark.parametrize(
    ("case", "mutate"),
    [
        ("wrong signer", lambda p, b: Proposal(p.height, p.round, p.block_hash, p.valid_round,
                                               member(0).public_key, p.signature)),
        ("bad signature", lambda p, b: Proposal(p.height, p.round, p.block_hash, p.valid_round,
                                                p.proposer, bytes(64))),
        ("hash mismatch", lambda p, b: Proposal(p.height, p.round, EMPTY_HASH, p.valid_round,
                                                p.proposer, p.signature)),
        ("bad valid round", lambda p, b: Proposal(p.height, p.round, p.block_hash, 0,
                                                  p.proposer, p.signature)),
    ],
)
def test_bad_proposals_are_ignored(case: str, mutate: object) -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i)
    c.start(0)
    block = make_block(1, 5, VALS.proposer(1, 0))
    p = mutate(proposal(1, 0, block), block)  # type: ignore[operator]
    assert c.on_proposal(p, block, 1) == [], case
    assert c.step == "propose"


def test_invalid_block_gets_a_nil_prevote() -> None:
    i = not_proposer(1, 0)
    c, app = core_for(i)
    c.start(0)
    block = make_block(1, 5, VALS.proposer(1, 0))
    app.invalid.add(block.hash())
    acts = c.on_proposal(proposal(1, 0, block), block, 1)
    assert votes_in(acts)[0].block_hash == NIL


# ------------------------------------------------------------------- timeouts, round change


def test_timeouts_nil_votes_and_round_change_with_growing_timeouts() -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i)
    c.start(0)
    # a stale or foreign timeout changes nothing
    assert c.on_timeout(Timeout(1, 3, "propose"), 5) == []
    assert c.on_timeout(Timeout(2, 0, "propose"), 5) == []
    acts = c.on_timeout(Timeout(1, 0, "propose"), 1000)
    assert [(v.kind, v.block_hash) for v in votes_in(acts)] == [(PREVOTE, NIL)]
    rest = [j for j in range(4) if j != i]
    acts = feed_votes(c, rest[:1], PREVOTE, 1, 0, NIL)
    assert acts == []
    # 2f+1 prevotes for different things: only the prevote timer (L34)
    acts = c.on_vote(vote(rest[1], PREVOTE, 1, 0, hash_bytes(b"other")), 1001)
    assert timeouts_in(acts) == [(Timeout(1, 0, "prevote"), CFG.timeout_prevote_ms)]
    acts = c.on_timeout(Timeout(1, 0, "prevote"), 1500)
    assert [(v.kind, v.block_hash) for v in votes_in(acts)] == [(PRECOMMIT, NIL)]
    acts = feed_votes(c, rest[:2], PRECOMMIT, 1, 0, NIL)
    assert timeouts_in(acts) == [(Timeout(1, 0, "precommit"), CFG.timeout_precommit_ms)]
    acts = c.on_timeout(Timeout(1, 0, "precommit"), 2000)
    assert c.round == 1
    if VALS.proposer(1, 1) != me_of(c):
        assert c.step == "propose"
        assert (Timeout(1, 1, "propose"),
                CFG.timeout_propose_ms + CFG.timeout_propose_delta_ms) in timeouts_in(acts)


def test_nil_polka_precommits_nil_at_once() -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i)
    c.start(0)
    c.on_timeout(Timeout(1, 0, "propose"), 1000)
    rest = [j for j in range(4) if j != i]
    acts = feed_votes(c, rest[:2], PREVOTE, 1, 0, NIL)
    assert [(v.kind, v.block_hash) for v in votes_in(acts)] == [(PRECOMMIT, NIL)]
    assert c.locked_round == -1


# --------------------------------------------------------------------------------- locking


def lock_on_round0(i: int) -> tuple[Consensus, App, Block]:
    """Core ``i`` sees proposal X of round 0 and a polka for it: it locks on X."""
    c, app = core_for(i)
    c.start(0)
    x = make_block(1, 5, VALS.proposer(1, 0), tag=b"X")
    c.on_proposal(proposal(1, 0, x), x, 1)
    rest = [j for j in range(4) if j != i]
    acts = feed_votes(c, rest[:2], PREVOTE, 1, 0, x.hash())
    assert votes_in(acts)[-1].kind == PRECOMMIT
    assert votes_in(acts)[-1].block_hash == x.hash()
    assert (c.locked_round, c.valid_round) == (0, 0)
    # round 0 ends without a decision
    feed_votes(c, rest[:2], PRECOMMIT, 1, 0, NIL)
    c.on_timeout(Timeout(1, 0, "precommit"), 3000)
    assert c.round == 1
    return c, app, x


def pick_non_proposer_of_round1() -> int:
    for i in range(4):
        if VALS.proposer(1, 0) != VALS.members[i] and VALS.proposer(1, 1) != VALS.members[i]:
            return i
    raise AssertionError("unreachable")


class NoLockCheck(Consensus):
    """The mutation: a core that ignores its lock."""

    def _lock_allows(self, block_hash: bytes, valid_round: int) -> bool:
        return True


@pytest.mark.parametrize(
    ("desc", "cls", "proposal_of", "valid_round", "polka_round", "expect"),
    [
        ("locked: a fresh other block gets nil", Consensus, "Y", -1, None, "nil"),
        ("locked: the locked block again gets a vote", Consensus, "X", 0, 0, "X"),
        ("locked: Y claiming a polka that never formed waits, then nil", Consensus, "Y", 0, 0,
         "nil"),
        ("mutant without the lock check votes Y", NoLockCheck, "Y", -1, None, "Y"),
    ],
)
def test_locking(desc: str, cls: type[Consensus], proposal_of: str, valid_round: int,
                 polka_round: int | None, expect: str) -> None:
    i = pick_non_proposer_of_round1()
    c, app = core_for(i, cls=cls)
    c.start(0)
    x = make_block(1, 5, VALS.proposer(1, 0), tag=b"X")
    y = make_block(1, 6, VALS.proposer(1, 1), tag=b"Y")
    c.on_proposal(proposal(1, 0, x), x, 1)
    rest = [j for j in range(4) if j != i]
    feed_votes(c, rest[:2], PREVOTE, 1, 0, x.hash())
    assert c.locked_round == 0
    feed_votes(c, rest[:2], PRECOMMIT, 1, 0, NIL)
    c.on_timeout(Timeout(1, 0, "precommit"), 3000)
    assert (c.round, c.step) == (1, "propose")
    block = x if proposal_of == "X" else y
    acts = c.on_proposal(proposal(1, 1, block, valid_round), block, 3001)
    if not votes_in(acts):
        acts = c.on_timeout(Timeout(1, 1, "propose"), 6000)
    got = votes_in(acts)[0].block_hash
    want = {"nil": NIL, "X": x.hash(), "Y": y.hash()}[expect]
    assert got == want, desc


def test_lock_is_released_by_a_later_polka() -> None:
    i = pick_non_proposer_of_round1()
    c, _, x = lock_on_round0(i)
    y = make_block(1, 6, VALS.proposer(1, 1), tag=b"Y")
    rest = [j for j in range(4) if j != i]
    # round 1: a polka for Y forms (we prevoted nil: proposal came late), we see it in round 2
    c.on_timeout(Timeout(1, 1, "propose"), 5000)
    c.on_proposal(proposal(1, 1, y), y, 5001)
    acts = feed_votes(c, rest, PREVOTE, 1, 1, y.hash())
    # L36 while in step precommit? we were in prevote: lock moves to Y at round 1
    assert (c.locked_round, c.valid_round) == (1, 1)
    assert votes_in(acts)[-1].kind == PRECOMMIT
    assert votes_in(acts)[-1].block_hash == y.hash()
    assert x.hash() != y.hash()


def test_older_lock_yields_to_a_proposal_with_a_newer_polka() -> None:
    """L28: locked on X in round 0, a proposal of Y in round 2 justified by a round-1 polka
    for Y (which we missed while in round 1) gets our prevote."""
    i = next(j for j in range(4)
             if VALS.members[j] not in {VALS.proposer(1, r) for r in (0, 1, 2)})
    c, _, x = lock_on_round0(i)
    rest = [j for j in range(4) if j != i]
    y = make_block(1, 6, VALS.proposer(1, 1), tag=b"Y")
    c.on_timeout(Timeout(1, 1, "propose"), 5000)  # prevote nil in round 1
    c.on_vote(vote(rest[0], PREVOTE, 1, 2, NIL), 5001)
    c.on_vote(vote(rest[1], PREVOTE, 1, 2, NIL), 5002)
    assert (c.round, c.step) == (2, "propose")  # skipped on f+1 messages of round 2
    feed_votes(c, rest, PREVOTE, 1, 1, y.hash())  # the relayed round-1 polka for Y
    assert c.locked_round == 0
    acts = c.on_proposal(proposal(1, 2, y, valid_round=1), y, 5003)
    assert votes_in(acts)[0].block_hash == y.hash()
    assert x.hash() != y.hash()


def test_valid_value_is_reproposed_with_its_round() -> None:
    # find a validator that proposes in some round r >= 1 of height 1
    i = VALS.members.index(VALS.proposer(1, 1))
    c, app = core_for(i)
    c.start(0)
    x = make_block(1, 5, VALS.proposer(1, 0), tag=b"X")
    c.on_proposal(proposal(1, 0, x), x, 1)
    rest = [j for j in range(4) if j != i]
    feed_votes(c, rest[:2], PREVOTE, 1, 0, x.hash())
    feed_votes(c, rest[:2], PRECOMMIT, 1, 0, NIL)
    acts = c.on_timeout(Timeout(1, 0, "precommit"), 3000)
    props = [a for a in acts if isinstance(a, BroadcastProposal)]
    assert len(props) == 1
    assert props[0].proposal.valid_round == 0
    assert props[0].block.hash() == x.hash()
    # the polka that justifies it is relayed right behind it
    relayed = [v for v in votes_in(acts) if v.round == 0 and v.kind == PREVOTE]
    assert {v.validator for v in relayed} >= {VALS.members[j] for j in rest[:2]}


# ------------------------------------------------------------------------------ round skip


def test_round_skip_on_f_plus_one_messages_of_a_higher_round() -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i)
    c.start(0)
    rest = [j for j in range(4) if j != i]
    assert c.on_vote(vote(rest[0], PREVOTE, 1, 5, NIL), 1) == []
    assert c.round == 0
    acts = c.on_vote(vote(rest[1], PRECOMMIT, 1, 5, NIL), 2)  # f+1 = 2 validators in round 5
    assert c.round == 5
    if VALS.proposer(1, 5) != me_of(c):
        assert (Timeout(1, 5, "propose"), CFG.timeout_propose_ms + 5 * CFG.timeout_propose_delta_ms
                ) in timeouts_in(acts)


# ------------------------------------------------------------------- persistence / restart


def test_restart_rebroadcasts_the_same_vote_and_never_signs_another() -> None:
    i = not_proposer(1, 0)
    c, app = core_for(i)
    c.start(0)
    x = make_block(1, 5, VALS.proposer(1, 0), tag=b"X")
    acts = c.on_proposal(proposal(1, 0, x), x, 1)
    assert kinds(acts) == ["Persist", "BroadcastVote"]
    snap = last_snapshot(acts)
    signed = votes_in(acts)[0]
    # crash right after the Persist; restart from it
    c2, _ = core_for(i, snapshot=snap, app=app)
    acts = c2.start(100)
    assert signed in votes_in(acts)
    assert not any(isinstance(a, Persist) for a in acts)
    assert (c2.round, c2.step) == (0, "prevote")
    # the propose timeout of the old incarnation must not produce a nil prevote
    assert votes_in(c2.on_timeout(Timeout(1, 0, "propose"), 1000)) == []
    # a different proposal for the same round does not get a second prevote
    y = make_block(1, 6, VALS.proposer(1, 0), tag=b"Y")
    for a in c2.on_proposal(proposal(1, 0, y), y, 1001):
        if isinstance(a, BroadcastVote) and a.vote.validator == me_of(c2):
            assert a.vote == signed


def test_restart_keeps_the_lock() -> None:
    i = pick_non_proposer_of_round1()
    c, app = core_for(i)
    c.start(0)
    x = make_block(1, 5, VALS.proposer(1, 0), tag=b"X")
    c.on_proposal(proposal(1, 0, x), x, 1)
    rest = [j for j in range(4) if j != i]
    acts = feed_votes(c, rest[:2], PREVOTE, 1, 0, x.hash())
    snap = last_snapshot(acts)
    c2, _ = core_for(i, snapshot=snap, app=app)
    acts = c2.start(10)
    assert (c2.locked_round, c2.valid_round, c2.step) == (0, 0, "precommit")
    pre = [v for v in votes_in(acts) if v.kind == PRECOMMIT]
    assert pre
    assert pre[0].block_hash == x.hash()
    # move on to round 1 and get a fresh other block: nil, because the lock survived
    feed_votes(c2, rest[:2], PRECOMMIT, 1, 0, NIL)
    c2.on_timeout(Timeout(1, 0, "precommit"), 3000)
    y = make_block(1, 6, VALS.proposer(1, 1), tag=b"Y")
    acts = c2.on_proposal(proposal(1, 1, y), y, 3001)
    assert votes_in(acts)[0].block_hash == NIL


def test_restart_proposer_reproposes_the_same_block() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, app = core_for(pidx)
    acts = c.start(0)
    first = next(a for a in acts if isinstance(a, BroadcastProposal))
    snap = next(a.snapshot for a in acts if isinstance(a, Persist))  # crash after 1st Persist
    c2, _ = core_for(pidx, snapshot=snap, app=app)
    acts = c2.start(50)
    again = [a for a in acts if isinstance(a, BroadcastProposal)]
    assert again == [first]


def test_snapshot_from_an_older_height_is_ignored_and_a_newer_one_refused() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, app = core_for(pidx)
    snap = last_snapshot(c.start(0))
    c2, _ = core_for(pidx, height=2, snapshot=snap)
    assert c2.height == 2
    assert c2.round == 0
    with pytest.raises(LocalProtocolError):
        core_for(pidx, height=1, snapshot=b"garbage")
    c3, _ = core_for(pidx, height=1)
    c3.start(0)
    # a snapshot of height 3 while the store is at height 1: refuse to sign
    c4 = Consensus(chain_id=CHAIN, validators=VALS, key=member(pidx), app=App(b""),
                   config=CFG, height=3, last_block_time_ms=0)
    with pytest.raises(LocalProtocolError):
        core_for(pidx, height=1, snapshot=c4.snapshot())


# ------------------------------------------------------------------------------- evidence


def test_equivocation_yields_evidence_once() -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i)
    c.start(0)
    j = next(k for k in range(4) if k != i)
    a = vote(j, PREVOTE, 1, 0, hash_bytes(b"a"))
    b = vote(j, PREVOTE, 1, 0, hash_bytes(b"b"))
    cc = vote(j, PREVOTE, 1, 0, hash_bytes(b"c"))
    assert c.on_vote(a, 1) == []
    acts = c.on_vote(b, 2)
    assert acts == [RecordEvidence(a, b)]
    assert c.on_vote(cc, 3) == []
    assert c.on_vote(b, 4) == []  # duplicate


@pytest.mark.parametrize(
    ("desc", "make"),
    [
        ("wrong chain", lambda: vote(1, PREVOTE, 1, 0, NIL, chain="other")),
        ("not a validator", lambda: Vote(PREVOTE, 1, 0, NIL, KeyPair.from_seed(b"z" * 32)
                                         .public_key).signed(KeyPair.from_seed(b"z" * 32), CHAIN)),
        ("bad signature", lambda: Vote(PREVOTE, 1, 0, NIL, VALS.members[1], bytes(64))),
        ("old height", lambda: vote(1, PREVOTE, 0 + 1, 0, NIL)),
        ("far future height", lambda: vote(1, PREVOTE, 50, 0, NIL)),
        ("far future round", lambda: vote(1, PREVOTE, 1, 10**6, NIL)),
    ],
)
def test_irrelevant_votes_are_ignored(desc: str, make: object) -> None:
    i = 0
    c, _ = core_for(i, height=1)
    c.start(0)
    v = make()  # type: ignore[operator]
    if desc == "old height":
        c, _ = core_for(i, height=2)
        c.start(0)
    acts = c.on_vote(v, 1)
    assert not any(isinstance(a, (BroadcastVote, Decided, RecordEvidence)) for a in acts), desc
    assert c.round == 0


# --------------------------------------------------------------------------- empty blocks


INTERVAL = ConsensusConfig(empty_block_interval_ms=2000)


def test_waits_for_txs_then_proposes() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, app = core_for(pidx, config=INTERVAL)
    acts = c.start(500)
    assert c.step == "wait_txs"
    assert kinds(acts) == ["ScheduleTimeout"]
    assert timeouts_in(acts) == [(Timeout(1, 0, "wait_txs"), 1500)]
    assert c.on_timeout(Timeout(1, 0, "rebroadcast"), 900) == []
    app.pending = True
    acts = c.on_txs_available(1000)
    assert any(isinstance(a, BroadcastProposal) for a in acts)
    assert c.step == "prevote"


def test_wait_timeout_starts_round_zero() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, _ = core_for(pidx, config=INTERVAL)
    c.start(0)
    acts = c.on_timeout(Timeout(1, 0, "wait_txs"), 2000)
    prop = next(a for a in acts if isinstance(a, BroadcastProposal))
    assert prop.block.header.time_ms == 2000


def test_pending_txs_at_height_start_skip_the_wait() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    k = member(pidx)
    app = App(k.public_key, pending=True)
    c, _ = core_for(pidx, config=INTERVAL, app=app)
    acts = c.start(0)
    assert any(isinstance(a, BroadcastProposal) for a in acts)


def test_a_proposal_from_another_validator_ends_the_wait() -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i, config=INTERVAL)
    c.start(0)
    assert c.step == "wait_txs"
    block = make_block(1, 5, VALS.proposer(1, 0))
    acts = c.on_proposal(proposal(1, 0, block), block, 10)
    assert votes_in(acts)
    assert votes_in(acts)[0].block_hash == block.hash()


def test_decided_height_waits_again() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, app = core_for(pidx, config=INTERVAL)
    app.pending = True
    acts = c.start(0)
    bh = next(a for a in acts if isinstance(a, BroadcastProposal)).block.hash()
    app.pending = False
    rest = [j for j in range(4) if j != pidx]
    feed_votes(c, rest[:2], PREVOTE, 1, 0, bh, now=10)
    acts = feed_votes(c, rest[:2], PRECOMMIT, 1, 0, bh, now=20)
    assert any(isinstance(a, Decided) for a in acts)
    assert (c.height, c.step) == (2, "wait_txs")
    block_time = app.committed[0][0].header.time_ms
    assert (Timeout(2, 0, "wait_txs"), block_time + 2000 - 20) in timeouts_in(acts)


# ---------------------------------------------------------------------- catch-up, rebroadcast


def test_catch_up_when_f_plus_one_validators_are_ahead() -> None:
    i = not_proposer(1, 0)
    c, _ = core_for(i)
    c.start(0)
    rest = [j for j in range(4) if j != i]
    assert c.on_vote(vote(rest[0], PREVOTE, 7, 0, NIL), 1) == []
    acts = c.on_vote(vote(rest[1], PREVOTE, 9, 0, NIL), 2)
    assert acts == [CatchUp(1)]
    assert c.on_vote(vote(rest[2], PREVOTE, 9, 0, NIL), 3) == []  # once


def certified(height: int, block: Block, signers: list[int]) -> Commit:
    return Commit.from_votes([vote(j, PRECOMMIT, height, 0, block.hash()) for j in signers])


def test_certified_block_is_verified_and_committed() -> None:
    i = not_proposer(1, 0)
    c, app = core_for(i)
    c.start(0)
    b = make_block(1, 5, VALS.proposer(1, 0))
    with pytest.raises(VerificationError):
        c.on_certified_block(b, certified(1, b, [0, 1]), 10)  # too few
    other = make_block(1, 5, VALS.proposer(1, 0), tag=b"other")
    with pytest.raises(VerificationError):
        c.on_certified_block(b, certified(1, other, [0, 1, 2]), 10)
    assert c.on_certified_block(make_block(3, 5, VALS.members[0]), certified(3, b, [0, 1, 2]),
                                10) == []
    commit = certified(1, b, [0, 1, 2])
    acts = c.on_certified_block(b, commit, 10)
    assert Decided(b, commit) in acts
    assert app.committed == [(b, commit)]
    assert c.height == 2


def test_rebroadcast_resends_own_votes_and_the_last_commit() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, _ = core_for(pidx)
    acts = c.start(0)
    bh = next(a for a in acts if isinstance(a, BroadcastProposal)).block.hash()
    rest = [j for j in range(4) if j != pidx]
    feed_votes(c, rest, PREVOTE, 1, 0, bh)
    acts = feed_votes(c, rest, PRECOMMIT, 1, 0, bh)
    commit = next(a for a in acts if isinstance(a, Decided)).commit
    assert c.height == 2
    acts = c.on_timeout(Timeout(2, 0, "rebroadcast"), 1000)
    sent = votes_in(acts)
    lc_votes = {(v.validator, v.signature) for v in sent if v.height == 1}
    assert lc_votes == set(commit.signatures)
    assert (Timeout(2, 0, "rebroadcast"), CFG.rebroadcast_ms) in timeouts_in(acts)
    # a rebroadcast timer of an older height is stale
    assert c.on_timeout(Timeout(1, 0, "rebroadcast"), 1000) == []


def test_next_height_messages_are_buffered_and_replayed() -> None:
    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, _ = core_for(pidx)
    acts = c.start(0)
    bh = next(a for a in acts if isinstance(a, BroadcastProposal)).block.hash()
    rest = [j for j in range(4) if j != pidx]
    nxt = make_block(2, 50, VALS.proposer(2, 0), tag=b"h2",
                     last_commit=Commit(1, 0, bh, ()))
    # the next height's proposal arrives before we decided height 1
    assert c.on_proposal(proposal(2, 0, nxt), nxt, 5) == []
    feed_votes(c, rest, PREVOTE, 1, 0, bh)
    acts = feed_votes(c, rest, PRECOMMIT, 1, 0, bh)
    assert c.height == 2
    if VALS.proposer(2, 0) != me_of(c):
        prevotes = [v for v in votes_in(acts) if v.height == 2 and v.kind == PREVOTE]
        assert prevotes
        assert prevotes[0].block_hash == nxt.hash()


# ------------------------------------------------------------------ snapshot format, followers


@pytest.mark.parametrize(
    ("desc", "mutate"),
    [
        ("other chain", lambda f: f.__setitem__(2, "other-chain")),
        ("future version", lambda f: f.__setitem__(1, 99)),
        ("bad block reference", lambda f: f.__setitem__(6, 7)),
        ("lock without block", lambda f: f.__setitem__(5, 3)),
        ("truncated", lambda f: f.pop()),
    ],
)
def test_malformed_snapshots_are_refused(desc: str, mutate: object) -> None:
    from ledger.codec import pack, unpack

    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, _ = core_for(pidx)
    fields = unpack(last_snapshot(c.start(0)))
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(LocalProtocolError):
        core_for(pidx, snapshot=pack(fields))


def test_snapshot_holds_each_block_once() -> None:
    from ledger.codec import unpack

    pidx = VALS.members.index(VALS.proposer(1, 0))
    c, _ = core_for(pidx)
    acts = c.start(0)
    bh = next(a for a in acts if isinstance(a, BroadcastProposal)).block.hash()
    rest = [j for j in range(4) if j != pidx]
    acts = feed_votes(c, rest[:2], PREVOTE, 1, 0, bh)  # locks: locked = valid = proposed
    fields = unpack(last_snapshot(acts))
    assert (fields[5], fields[6], fields[7], fields[8]) == (0, 0, 0, 0)
    assert len(fields[12]) == 1


def test_a_follower_decides_without_signing() -> None:
    app = App(b"")
    c = Consensus(chain_id=CHAIN, validators=VALS, key=None, app=app, config=CFG, height=1,
                  last_block_time_ms=0)
    acts = c.start(0)
    block = make_block(1, 5, VALS.proposer(1, 0))
    acts += c.on_proposal(proposal(1, 0, block), block, 1)
    acts += feed_votes(c, [0, 1, 2], PREVOTE, 1, 0, block.hash())
    acts += feed_votes(c, [0, 1, 2], PRECOMMIT, 1, 0, block.hash())
    assert not any(isinstance(a, (Persist, BroadcastVote, BroadcastProposal)) for a in acts)
    assert [a.block for a in acts if isinstance(a, Decided)] == [block]
    assert c.height == 2


def test_restart_keeps_the_polka_that_justifies_the_valid_block() -> None:
    """After a crash the validator must still be able to show validators locked elsewhere
    the 2f+1 prevotes for its valid block: they may include a Byzantine prevote nobody else
    has, and without them its re-proposal could never be accepted."""
    i = VALS.members.index(VALS.proposer(1, 1))
    c, app = core_for(i)
    c.start(0)
    x = make_block(1, 5, VALS.proposer(1, 0), tag=b"X")
    c.on_proposal(proposal(1, 0, x), x, 1)
    rest = [j for j in range(4) if j != i]
    snap = last_snapshot(feed_votes(c, rest[:2], PREVOTE, 1, 0, x.hash()))
    c2, _ = core_for(i, snapshot=snap, app=app)
    c2.start(10)
    feed_votes(c2, rest[:2], PRECOMMIT, 1, 0, NIL)
    acts = c2.on_timeout(Timeout(1, 0, "precommit"), 3000)
    prop = next(a for a in acts if isinstance(a, BroadcastProposal))
    assert (prop.proposal.valid_round, prop.block.hash()) == (0, x.hash())
    relayed = {v.validator for v in votes_in(acts) if (v.round, v.kind) == (0, PREVOTE)
               and v.block_hash == x.hash()}
    assert relayed >= {VALS.members[j] for j in rest[:2]}


def test_an_invalid_verdict_is_asked_again_later() -> None:
    """Time rules can flip (a proposer whose clock runs ahead): "invalid" is not forever."""
    i = pick_non_proposer_of_round1()
    c, app = core_for(i)
    c.start(0)
    x = make_block(1, 5, VALS.proposer(1, 0), tag=b"X")
    app.invalid.add(x.hash())
    acts = c.on_proposal(proposal(1, 0, x), x, 1)
    assert votes_in(acts)[0].block_hash == NIL
    app.invalid.clear()
    rest = [j for j in range(4) if j != i]
    feed_votes(c, rest[:2], PREVOTE, 1, 0, NIL)
    feed_votes(c, rest[:2], PRECOMMIT, 1, 0, NIL)
    c.on_timeout(Timeout(1, 0, "precommit"), 3000)
    acts = c.on_proposal(proposal(1, 1, x), x, 3001)
    assert votes_in(acts)[0].block_hash == x.hash()
