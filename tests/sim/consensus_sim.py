"""A deterministic network simulator for the consensus core (no sockets, no clock, no sleeps).

Everything random comes from one ``random.Random(seed)``: message delays, drops, duplicates
(and so reordering), partitions that heal, crash-restarts of validators (a crash can fall
between any two actions of one core call; the restarted core is rebuilt from the last
``Persist`` payload that was executed and the app's durable chain), Byzantine equivocators
(sign conflicting proposals and votes for two blocks) and "twins" (two honest-code processes
sharing one key; together one faulty validator).

After every executed action the invariants are checked:

* agreement: no two honest processes decide different blocks at one height;
* validity: a decided block was proposed by someone and passed the app's validation;
* no double sign: an honest validator never broadcasts two different signed messages for one
  (height, round, type), across restarts too;
* evidence is only ever recorded against faulty validators.

Then, once the partitions healed and crashed validators restarted, every honest validator must
decide ``heights`` blocks before a step cap (liveness).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ledger.codec import EMPTY_HASH, hash_bytes, hash_value, unpack
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
    SignatureCache,
)
from ledger.errors import TfgridError
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

CHAIN_ID = "sim-chain"
GENESIS_TIME = 0
_KEYS: dict[int, KeyPair] = {}


def key(i: int) -> KeyPair:
    if i not in _KEYS:
        _KEYS[i] = KeyPair.from_seed(hashlib.blake2b(b"sim-validator-%d" % i,
                                                     digest_size=32).digest())
    return _KEYS[i]


class SimFailure(AssertionError):
    """An invariant broke; the message names the seed."""


# ------------------------------------------------------------------------------- the app


class SimApp:
    """A deterministic test app: blocks with random-ish payloads, accepting any well-formed
    block of the right height, previous hash, time and last commit. Its chain is durable
    (it survives a crash of the process that owns it)."""

    def __init__(self, validators: ValidatorSet, me: bytes | None, salt: int) -> None:
        self.validators = validators
        self.me = me if me is not None else validators.members[0]
        self.salt = salt
        self.blocks: list[Block] = []
        self.commits: list[Commit] = []
        self.pending = False
        self.proposed = 0

    @property
    def height(self) -> int:
        return len(self.blocks)

    @property
    def last_time(self) -> int:
        return self.blocks[-1].header.time_ms if self.blocks else GENESIS_TIME

    @property
    def last_commit(self) -> Commit | None:
        return self.commits[-1] if self.commits else None

    def make_block(self, height: int, time_ms: int, last_commit: Commit | None,
                   extra: bytes = b"") -> Block:
        self.proposed += 1
        seed = hash_value([self.salt, height, self.proposed, extra])
        txs = tuple(hash_bytes(seed + bytes([i])) for i in range(seed[0] % 3))
        prev = self.blocks[-1].hash() if self.blocks else EMPTY_HASH
        state_root = hash_value([prev, merkle_root([hash_bytes(t) for t in txs])])
        header = Header(CHAIN_ID, height, time_ms, prev,
                        EMPTY_HASH if last_commit is None else last_commit.hash(),
                        merkle_root([hash_bytes(t) for t in txs]), state_root,
                        self.validators.hash(), self.validators.hash(), self.me)
        return Block(header, txs, last_commit)

    # App protocol
    def propose(self, height: int, round: int, time_ms: int, last_commit: Commit | None) -> Block:
        if height != self.height + 1:
            raise SimFailure(f"asked to propose height {height} at app height {self.height}")
        return self.make_block(height, time_ms, last_commit)

    def validate(self, block: Block, now_ms: int) -> bool:
        h = block.header
        if h.height != self.height + 1 or h.chain_id != CHAIN_ID:
            return False
        if h.prev_hash != (self.blocks[-1].hash() if self.blocks else EMPTY_HASH):
            return False
        if h.time_ms <= self.last_time or h.proposer not in self.validators:
            return False
        lc = block.last_commit
        if h.height > 1:
            if lc is None or lc.height != h.height - 1 or lc.block_hash != h.prev_hash \
                    or len(lc.signatures) < self.validators.quorum:
                return False
        try:
            block.check_shape()
        except Exception:
            return False
        return True

    def commit(self, block: Block, commit: Commit) -> None:
        if block.header.height != self.height + 1 or commit.block_hash != block.hash():
            raise SimFailure("app.commit called out of order")
        self.blocks.append(block)
        self.commits.append(commit)
        self.pending = False

    def has_pending_txs(self) -> bool:
        return self.pending


# ------------------------------------------------------------------------------ the sim


HONEST, BYZANTINE, TWIN = "honest", "byzantine", "twin"

CoreFactory = Callable[..., Consensus]


@dataclass
class SimParams:
    n: int = 4
    heights: int = 3
    byzantine: int = 0  # equivocating validators
    twins: int = 0  # validators run by two processes with one key
    crashes: int = 0  # crash-restarts of honest validators during the chaos period
    partitions: int = 0  # partitions (each heals) during the chaos period
    mute_deciders_ms: int = 0  # adversary: delay all messages of a process that just decided
    targeted: bool = False  # adversarial scheduling against locks (see _targeted_delay)
    # Byzantine extra votes for every proposal it sees: to a random "subset", to "all" or "none"
    # (then it only splits its own votes: the real one to some, a nil vote to the others)
    byz_extra_votes: str = "subset"
    drop: float = 0.0
    steady_drop: float = 0.0  # loss that goes on after the chaos period (rebroadcast copes)
    duplicate: float = 0.0
    min_delay: int = 1
    max_delay: int = 200
    slow: float = 0.02  # probability of a very late message
    chaos_ms: int = 6_000
    empty_block_interval_ms: int = 0
    inject_txs: bool = True  # with an empty-block interval: txs arrive at random times
    step_cap: int = 200_000
    time_cap_ms: int = 400_000
    config: ConsensusConfig = field(default_factory=ConsensusConfig)
    check_liveness: bool = True


@dataclass
class Proc:
    idx: int
    slot: int  # validator index
    role: str
    key: KeyPair
    app: SimApp
    core: Consensus | None = None
    wal: bytes | None = None
    alive: bool = True
    incarnation: int = 0
    crash_armed: bool = False
    byz_voted: set[tuple[int, int, int, bytes]] = field(default_factory=set)


class Sim:
    def __init__(self, seed: int, params: SimParams,
                 core_factory: CoreFactory = Consensus) -> None:
        self.seed = seed
        self.p = params
        self.rng = random.Random(seed)
        self.factory = core_factory
        self.now = 0
        self.steps = 0
        self._seq = 0
        self.events: list[tuple[int, int, str, Any]] = []
        self.validators = ValidatorSet.of([key(i).public_key for i in range(params.n)])
        self.sigcache = SignatureCache()
        self.config = dataclasses.replace(
            params.config, empty_block_interval_ms=params.empty_block_interval_ms)
        keys_by_slot = {self.validators.index(key(i).public_key): key(i) for i in range(params.n)}
        f = self.validators.f
        if params.byzantine + params.twins > f:
            raise ValueError("more faulty validators than the protocol tolerates")
        slots = list(range(params.n))
        self.rng.shuffle(slots)
        roles: dict[int, str] = {}
        for s in slots[: params.byzantine]:
            roles[s] = BYZANTINE
        for s in slots[params.byzantine: params.byzantine + params.twins]:
            roles[s] = TWIN
        self.procs: list[Proc] = []
        for s in range(params.n):
            role = roles.get(s, HONEST)
            for _ in range(2 if role == TWIN else 1):
                idx = len(self.procs)
                k = keys_by_slot[s]
                self.procs.append(Proc(idx, s, role, k, SimApp(self.validators, k.public_key,
                                                               seed * 1000 + idx)))
        # invariants
        self.decided: dict[int, bytes] = {}
        self.proposed: set[bytes] = set()
        self.signed: dict[tuple[bytes, int, int, str], tuple[Any, ...]] = {}
        self.faulty_keys = {pr.key.public_key for pr in self.procs if pr.role != HONEST}
        self.evidence: list[tuple[Vote, Vote]] = []
        self.partitions: list[tuple[int, int, frozenset[int]]] = []
        self.height_roles: dict[int, tuple[int, int]] = {}
        self.first_proposed: dict[int, bytes] = {}
        self.muted_until: dict[int, int] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self._all_done = False
        self._decisions_changed = False
        self._nil_votes: dict[tuple[int, int, int, int], Vote] = {}
        self._plan()

    # -- setup --------------------------------------------------------------------------

    def fail(self, what: str) -> SimFailure:
        return SimFailure(f"seed={self.seed} n={self.p.n} t={self.now}ms: {what}")

    def _push(self, t: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, payload))

    def _plan(self) -> None:
        p, rng = self.p, self.rng
        for _ in range(p.partitions):
            start = rng.randrange(0, max(1, p.chaos_ms))
            end = min(p.chaos_ms, start + rng.randrange(500, 5_000))
            side = frozenset(i for i in range(len(self.procs)) if rng.random() < 0.5)
            self.partitions.append((start, end, side))
        honest = [pr.idx for pr in self.procs if pr.role == HONEST]
        for _ in range(p.crashes):
            self._push(rng.randrange(0, max(1, p.chaos_ms)), "crash", rng.choice(honest))
        if p.empty_block_interval_ms > 0 and p.inject_txs:
            t = 0
            while t < p.chaos_ms * 3:
                t += rng.randrange(200, 4_000)
                self._push(t, "txs", rng.randrange(len(self.procs)))
        for pr in self.procs:
            self._push(rng.randrange(0, 50), "boot", pr.idx)

    def _new_core(self, pr: Proc) -> Consensus:
        return self.factory(
            chain_id=CHAIN_ID, validators=self.validators, key=pr.key, app=pr.app,
            config=self.config, height=pr.app.height + 1,
            last_block_time_ms=pr.app.last_time, snapshot=pr.wal,
            last_commit=pr.app.last_commit, signature_cache=self.sigcache)

    # -- network ------------------------------------------------------------------------

    def _cut(self, a: int, b: int) -> bool:
        for start, end, side in self.partitions:
            if start <= self.now < end and ((a in side) != (b in side)):
                return True
        return False

    def _targeted_delay(self, src: int, dst: int, msg: tuple[Any, ...]) -> int:
        """Adversarial scheduling aimed at the lock. Per height, the first proposed block X
        is the target; one honest process is "lucky" (gets X's precommits at once) and one is
        "late" (gets X's proposal late, so it prevotes nil).
        Everybody else's view of X's precommits lags by seconds: the lucky one can decide X
        while the others move on to later rounds where only their locks on X stop them from
        deciding another block."""
        m = msg[1]
        roles = self.height_roles.get(m.height)
        if roles is None:
            honest = [pr.idx for pr in self.procs if pr.role == HONEST]
            self.rng.shuffle(honest)
            roles = self.height_roles[m.height] = (honest[0], honest[-1])
        lucky, late = roles
        target = self.first_proposed.get(m.height)
        if msg[0] == "proposal" and target is None:
            target = self.first_proposed[m.height] = m.block_hash
        if m.block_hash != target:
            return 0
        if dst == late and msg[0] == "proposal":
            return self.rng.randrange(2_000, 6_000)
        if msg[0] == "vote" and m.kind == PRECOMMIT and dst != lucky:
            return self.rng.randrange(2_000, 6_000)
        return 0

    def _delay(self) -> int:
        if self.rng.random() < self.p.slow:
            return self.rng.randrange(self.p.max_delay, 4_000)
        return self.rng.randrange(self.p.min_delay, self.p.max_delay + 1)

    def send(self, src: int, dst: int, msg: tuple[Any, ...]) -> None:
        if src == dst or self._cut(src, dst):
            return
        chaos = self.now < self.p.chaos_ms
        if self.rng.random() < (self.p.drop if chaos else self.p.steady_drop):
            return
        delay = self._delay()
        if chaos and self.p.targeted:
            delay += self._targeted_delay(src, dst, msg)
        muted = self.muted_until.get(src, 0)
        if muted > self.now:
            delay += muted - self.now
        self._push(self.now + delay, "msg", (dst, msg))
        if chaos and self.rng.random() < self.p.duplicate:
            self._push(self.now + self._delay(), "msg", (dst, msg))

    def broadcast(self, src: int, msg: tuple[Any, ...], to: list[int] | None = None) -> None:
        for dst in (range(len(self.procs)) if to is None else to):
            self.send(src, dst, msg)

    # -- running ------------------------------------------------------------------------

    def run(self) -> None:
        """Run to completion. Raises :class:`SimFailure` naming the seed on a violation."""
        while self.events:
            if self.p.check_liveness and self.all_done:
                return
            self.steps += 1
            if self.steps > self.p.step_cap:
                break
            t, _, kind, payload = heapq.heappop(self.events)
            if t > self.p.time_cap_ms:
                break
            self.now = max(self.now, t)
            self._event(kind, payload)
        if self.p.check_liveness and not self._done():
            heights = {pr.idx: (pr.role, pr.app.height) for pr in self.procs}
            raise self.fail(f"liveness: not every honest validator decided "
                            f"{self.p.heights} heights: {heights}")

    def _done(self) -> bool:
        return all(pr.app.height >= self.p.heights for pr in self.procs if pr.role == HONEST)

    @property
    def all_done(self) -> bool:
        if not self._all_done and self._decisions_changed:
            self._decisions_changed = False
            self._all_done = self._done()
        return self._all_done

    def _event(self, kind: str, payload: Any) -> None:
        if kind == "msg":
            dst, msg = payload
            pr = self.procs[dst]
            if not pr.alive or pr.core is None:
                return
            if pr.role == BYZANTINE and msg[0] == "proposal":
                self._byz_vote_for(pr, msg[1])
            if msg[0] == "proposal":
                acts = pr.core.on_proposal(msg[1], msg[2], self.now)
            else:
                acts = pr.core.on_vote(msg[1], self.now)
            self.stats["deliveries"] += 1
            self._execute(pr, acts)
        elif kind == "timeout":
            idx, inc, to = payload
            pr = self.procs[idx]
            if pr.alive and pr.incarnation == inc and pr.core is not None:
                self._execute(pr, pr.core.on_timeout(to, self.now))
        elif kind == "boot":
            pr = self.procs[payload]
            pr.core = self._new_core(pr)
            self._execute(pr, pr.core.start(self.now))
        elif kind == "crash":
            pr = self.procs[payload]
            if pr.alive:
                pr.crash_armed = True
        elif kind == "restart":
            pr = self.procs[payload]
            pr.alive = True
            pr.incarnation += 1
            pr.core = self._new_core(pr)
            self._execute(pr, pr.core.start(self.now))
        elif kind == "txs":
            pr = self.procs[payload]
            pr.app.pending = True
            if pr.alive and pr.core is not None:
                self._execute(pr, pr.core.on_txs_available(self.now))
        elif kind == "certified":
            idx, inc, items = payload
            pr = self.procs[idx]
            for block, commit in items:
                if not (pr.alive and pr.incarnation == inc and pr.core is not None):
                    return
                if block.header.height != pr.core.height:
                    continue
                try:
                    acts = pr.core.on_certified_block(block, commit, self.now)
                except TfgridError as exc:
                    if pr.role == HONEST:
                        raise self.fail(f"catch-up of honest {pr.idx} failed: {exc!r}") from exc
                    return  # a faulty process may have forked off: it stays behind
                self._execute(pr, acts)
        else:  # pragma: no cover
            raise AssertionError(kind)

    def _execute(self, pr: Proc, acts: list[Action]) -> None:
        stop = len(acts) + 1
        if pr.crash_armed:
            # the process dies somewhere between two of these actions
            stop = self.rng.randrange(0, len(acts) + 1)
        for i, a in enumerate(acts):
            if i == stop:
                break
            self._act(pr, a)
        if pr.crash_armed:
            pr.crash_armed = False
            self.stats["crashes"] += 1
            pr.alive = False
            pr.core = None
            self._push(self.now + self.rng.randrange(100, 3_000), "restart", pr.idx)

    def _act(self, pr: Proc, a: Action) -> None:
        if isinstance(a, Persist):
            pr.wal = a.snapshot
        elif isinstance(a, BroadcastProposal):
            self._check_signed(pr, a.proposal.proposer, a.proposal.height, a.proposal.round, 0,
                               (a.proposal.block_hash, a.proposal.valid_round),
                               a.proposal.to_wire())
            self.proposed.add(a.block.hash())
            if pr.role == BYZANTINE:
                self._byz_propose(pr, a.proposal, a.block)
            else:
                self.broadcast(pr.idx, ("proposal", a.proposal, a.block))
        elif isinstance(a, BroadcastVote):
            v = a.vote
            self._check_signed(pr, v.validator, v.height, v.round, v.kind, (v.block_hash,),
                               v.to_wire())
            if pr.role == BYZANTINE and v.validator == pr.key.public_key:
                self._byz_vote(pr, v)
            else:
                self.broadcast(pr.idx, ("vote", v))
        elif isinstance(a, ScheduleTimeout):
            self._push(self.now + a.delay_ms, "timeout", (pr.idx, pr.incarnation, a.timeout))
        elif isinstance(a, Decided):
            self._decisions_changed = True
            self._check_decided(pr, a.block, a.commit)
            if self.p.mute_deciders_ms and self.now < self.p.chaos_ms:
                self.muted_until[pr.idx] = self.now + self.p.mute_deciders_ms
        elif isinstance(a, RecordEvidence):
            self._check_evidence(a.first, a.second)
        elif isinstance(a, CatchUp):
            self._catch_up(pr, a.height)
        else:  # pragma: no cover
            raise AssertionError(a)

    # -- invariants ---------------------------------------------------------------------

    def _check_signed(self, pr: Proc, signer: bytes, h: int, r: int, kind: int,
                      content: tuple[Any, ...], wire: list[Any]) -> None:
        if pr.role != HONEST or signer != pr.key.public_key:
            return
        k = (signer, h, r, "proposal" if kind == 0 else str(kind))
        prev = self.signed.get(k)
        if prev is None:
            self.signed[k] = content
            # sign-before-send: the last executed Persist already holds this message
            snap = unpack(pr.wal) if pr.wal is not None else None
            held = snap is not None and snap[3] == h and (
                wire in snap[9] if kind else snap[10] is not None and snap[10][0] == wire)
            # (a height the app already committed is final: the core may relay its own
            # precommit from that block's certificate even if a crash lost the Persist)
            if not held and h > pr.app.height:
                raise self.fail(f"validator {pr.idx} broadcast {k[1:]} before persisting it")
        elif prev != content:
            raise self.fail(f"double sign by honest validator {pr.idx} at {k[1:]}: "
                            f"{prev!r} then {content!r}")

    def _check_decided(self, pr: Proc, block: Block, commit: Commit) -> None:
        if pr.role != HONEST:
            return
        h = block.header.height
        bh = block.hash()
        if commit.block_hash != bh or commit.height != h:
            raise self.fail(f"process {pr.idx} decided with a mismatched commit at {h}")
        if bh not in self.proposed:
            raise self.fail(f"validity: process {pr.idx} decided an unproposed block at {h}")
        first = self.decided.setdefault(h, bh)
        if first != bh:
            raise self.fail(f"agreement: process {pr.idx} decided {bh.hex()[:12]} at height "
                            f"{h}, another honest process decided {first.hex()[:12]}")

    def _check_evidence(self, a: Vote, b: Vote) -> None:
        same = (a.validator, a.height, a.round, a.kind) == (b.validator, b.height, b.round, b.kind)
        if not same or a.block_hash == b.block_hash:
            raise self.fail(f"bogus evidence {a} / {b}")
        if a.validator not in self.faulty_keys:
            raise self.fail(f"evidence against an honest validator: {a} / {b}")
        self.evidence.append((a, b))

    # -- catch-up -----------------------------------------------------------------------

    def _catch_up(self, pr: Proc, height: int) -> None:
        self.stats["catchups"] += 1
        sources = [q for q in self.procs if q.idx != pr.idx and q.app.height >= height
                   and q.role == HONEST]
        if not sources:
            return
        src = self.rng.choice(sources)
        items = [(src.app.blocks[h - 1], src.app.commits[h - 1])
                 for h in range(height, src.app.height + 1)][:4]
        self._push(self.now + self._delay() + self._delay(), "certified",
                   (pr.idx, pr.incarnation, items))

    # -- Byzantine behaviour ------------------------------------------------------------

    def _others(self, pr: Proc) -> list[int]:
        return [q.idx for q in self.procs if q.idx != pr.idx]

    def _split(self, pr: Proc) -> tuple[list[int], list[int]]:
        others = self._others(pr)
        self.rng.shuffle(others)
        cut = self.rng.randrange(0, len(others) + 1)
        return others[:cut], others[cut:]

    def _byz_targets(self, pr: Proc, kind: int, h: int, bh: bytes
                     ) -> tuple[list[int], list[int]]:
        """Who gets the Byzantine's vote for ``bh`` and who gets a nil vote instead."""
        if not self.p.targeted or bh == NIL:
            return self._split(pr)
        others = self._others(pr)
        lucky, late = self.height_roles.get(h, (-1, -1))
        if bh != self.first_proposed.get(h):
            return others, []  # help any other block everywhere
        if kind == PREVOTE:  # a polka for the target everywhere but at the late one
            return [i for i in others if i != late], [late]
        return [lucky], [i for i in others if i != lucky]  # only the lucky one can decide

    def _byz_send(self, pr: Proc, kind: int, h: int, r: int, bh: bytes,
                  real: list[int], nil: list[int]) -> None:
        if (h, r, kind, bh) not in pr.byz_voted:
            pr.byz_voted.add((h, r, kind, bh))
            v = Vote(kind, h, r, bh, pr.key.public_key).signed(pr.key, CHAIN_ID)
            self.broadcast(pr.idx, ("vote", v), real)
        if nil and bh != NIL:
            k = (pr.idx, kind, h, r)
            w = self._nil_votes.get(k)
            if w is None:
                w = self._nil_votes[k] = Vote(kind, h, r, NIL, pr.key.public_key).signed(
                    pr.key, CHAIN_ID)
            self.broadcast(pr.idx, ("vote", w), nil)

    def _byz_propose(self, pr: Proc, prop: Proposal, block: Block) -> None:
        """Propose two different blocks to two groups, and vote for both."""
        alt_block = pr.app.make_block(block.header.height, block.header.time_ms,
                                      block.last_commit, extra=b"alt")
        # a fresh block (valid round -1): it needs no polka, only validators' locks stop it
        alt = Proposal(prop.height, prop.round, alt_block.hash(), -1,
                       pr.key.public_key).signed(pr.key, CHAIN_ID)
        self.proposed.add(alt_block.hash())
        if self.p.targeted:
            target = self.first_proposed.get(prop.height)
            if target is None:
                a, b = self._others(pr), []  # its block becomes the target X
            else:
                lucky = self.height_roles.get(prop.height, (-1, -1))[0]
                b = [i for i in self._others(pr) if i != lucky]
                a = [lucky]
        else:
            a, b = self._split(pr)
        self.broadcast(pr.idx, ("proposal", prop, block), a)
        self.broadcast(pr.idx, ("proposal", alt, alt_block), b)
        for bh, to in ((prop.block_hash, a), (alt.block_hash, b)):
            for kind in (PREVOTE, PRECOMMIT):
                real, nil = self._byz_targets(pr, kind, prop.height, bh)
                self._byz_send(pr, kind, prop.height, prop.round, bh,
                               [i for i in real if i in to], nil)

    def _byz_vote(self, pr: Proc, v: Vote) -> None:
        """Send its core's vote to some, a conflicting nil vote to the others."""
        real, nil = self._byz_targets(pr, v.kind, v.height, v.block_hash)
        if v.block_hash != NIL:
            pr.byz_voted.add((v.height, v.round, v.kind, v.block_hash))
        self.broadcast(pr.idx, ("vote", v), real)
        self._byz_send(pr, v.kind, v.height, v.round, v.block_hash, [], nil)
        if self.rng.random() < 0.05:
            # noise from the future: far rounds and heights (bounded memory, no false skips)
            h = v.height + self.rng.choice([0, 0, 1, 5])
            r = v.round + self.rng.randrange(2, 60)
            w = Vote(v.kind, h, r, NIL, pr.key.public_key).signed(pr.key, CHAIN_ID)
            self.broadcast(pr.idx, ("vote", w))

    def _byz_vote_for(self, pr: Proc, prop: Proposal) -> None:
        """Prevote and precommit every proposal it sees (to a random subset, or all)."""
        if self.p.byz_extra_votes == "none":
            return
        for kind in (PREVOTE, PRECOMMIT):
            if self.p.targeted:
                real, nil = self._byz_targets(pr, kind, prop.height, prop.block_hash)
            else:
                real = self._others(pr) if self.p.byz_extra_votes == "all" \
                    else self._split(pr)[0]
                nil = []
            self._byz_send(pr, kind, prop.height, prop.round, prop.block_hash, real, nil)


def random_params(seed: int, n: int, heights: int = 2) -> SimParams:
    """The fault mix of one seed of the CI sweep: up to f faulty validators (equivocators and
    twins), crash-restarts, partitions, drops, duplicates, slow links, empty-block waiting,
    and sometimes the targeted (anti-lock) adversarial scheduler."""
    r = random.Random(seed * 7919 + n)
    f = (n - 1) // 3
    byz = r.randrange(0, f + 1)
    twins = r.randrange(0, f - byz + 1)
    return SimParams(
        n=n, heights=heights, byzantine=byz, twins=twins,
        crashes=r.choice([0, 0, 1, 2]), partitions=r.choice([0, 0, 1, 2]),
        drop=r.choice([0.0, 0.05, 0.2]), steady_drop=r.choice([0.0, 0.0, 0.1]),
        duplicate=r.choice([0.0, 0.1]),
        max_delay=r.choice([50, 200, 600]),
        empty_block_interval_ms=r.choice([0, 0, 0, 1500]),
        targeted=byz > 0 and r.random() < 0.3,
        mute_deciders_ms=r.choice([0, 0, 3000]),
    )
