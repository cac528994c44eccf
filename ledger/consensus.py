"""Sans-IO Tendermint consensus core.

This is Algorithm 1 of Buchman, Kwon, Milosevic, "The latest gossip on BFT consensus"
(arXiv 1807.04938) for n = 3f + 1 equal-power validators, as a pure state machine: the driver
feeds it events (``on_proposal``, ``on_vote``, ``on_timeout``, ...) together with the current
time, and executes the returned actions in order. The core does no I/O, reads no clock and
draws no randomness; it signs with the injected key and verifies every incoming signature.

Rules (line numbers refer to Algorithm 1 of the paper; ``q`` = 2f+1 = ``validators.quorum``)::

    StartRound(r)    round := r, step := propose; the proposer proposes validValue (with
                     validRound) if it has one, else a fresh block from App.propose;
                     everybody else schedules timeout_propose(r)                       (11-21)
    L22  proposal(r, v, -1) while propose          -> prevote v if valid(v) and lock allows, else nil
    L28  proposal(r, v, vr) + q prevotes(vr, v), 0 <= vr < r, while propose
                                                    -> prevote v if valid(v) and lock allows, else nil
    L34  q prevotes(r, any) while prevote, first time  -> schedule timeout_prevote(r)
    L36  q prevotes(r, v) with valid(v) while step >= prevote, first time
                                                    -> if prevote: lock v, precommit v; always: validValue := v
    L44  q prevotes(r, nil) while prevote           -> precommit nil
    L47  q precommits(r, any), first time           -> schedule timeout_precommit(r)
    L49  q precommits(any round, v) with valid(v)   -> decide v: App.commit, next height
    L55  f+1 validators at rounds > r               -> StartRound(that round)
    L57/61/65 timeouts of the current (height, round, step) -> prevote nil / precommit nil / next round

"The lock allows v" (the heart of safety) is :meth:`Consensus._lock_allows`: lockedRound <= vr
or lockedValue = v (with vr = -1 for a fresh proposal). A block is identified by its header hash,
so the block of a quorum may come from any verified proposal of this height.

Additions around the paper's algorithm:

* Signer guard / write-ahead log. Before any newly signed proposal or vote is broadcast the core
  emits ``Persist(snapshot)`` holding the height, round, lock, valid block and every message it
  signed at this height. A core rebuilt from that snapshot resumes the same round, keeps its lock,
  and re-broadcasts what it already signed instead of signing anew: it never signs two different
  messages for one (height, round, type).
* Empty blocks: with ``empty_block_interval_ms > 0`` a new height waits (step ``wait_txs``)
  until the app has transactions, the interval since the last block passed, or another validator
  already works on this height.
* Liveness under loss: a ``rebroadcast`` timer re-sends our own messages of the height and the
  precommits of the last decided block; ``CatchUp`` asks the driver to fetch committed blocks
  when f+1 validators are ahead of us or a quorum precommitted a block we do not have.
* Equivocation: two different verified votes of one validator for one (height, round, type)
  yield ``RecordEvidence`` once.
* Bounded memory: messages for heights beyond height+1 are only counted (for catch-up), a few
  per validator are buffered for height+1, votes of rounds beyond round+1 keep only each
  validator's latest round.

Driver contract (what a trio driver does with each action, strictly in list order):

* ``Persist(snapshot)``: write it durably (e.g. ``Store.save_snapshot``, fsync) *before*
  executing any later action; on restart pass the last written one as ``snapshot=``.
  If the process dies between two actions, only what was executed happened.
* ``BroadcastProposal`` / ``BroadcastVote``: gossip to every validator peer (best effort; the
  core re-sends on its ``rebroadcast`` timer). Votes may be other validators' (relayed).
* ``ScheduleTimeout(t, delay)``: call ``on_timeout(t, now)`` ``delay`` ms later. Never cancel:
  stale timeouts are ignored by the core. Timers die with the process; ``start`` re-arms.
* ``Decided(block, commit)``: the app already committed it; notify subscribers, update the
  mempool. ``commit`` is the certificate to serve with the block.
* ``RecordEvidence(a, b)``: store it (``Store.add_evidence``).
* ``CatchUp(h)``: fetch committed block ``h`` (and later ones) with certificates from peers and
  feed each to ``on_certified_block`` in height order; it may be emitted again while behind.
* Call ``on_txs_available`` when the mempool goes from empty to non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ledger import keys
from ledger.codec import pack, unpack
from ledger.errors import InvalidBlock, LocalProtocolError, MalformedFrame, VerificationError
from ledger.types import NIL, PRECOMMIT, PREVOTE, Block, Commit, Proposal, ValidatorSet, Vote

__all__ = [
    "Action",
    "App",
    "BroadcastProposal",
    "BroadcastVote",
    "CatchUp",
    "Consensus",
    "ConsensusConfig",
    "Decided",
    "Persist",
    "RecordEvidence",
    "ScheduleTimeout",
    "SignatureCache",
    "Timeout",
    "decode_snapshot_height",
    "STEP_WAIT_TXS",
    "STEP_PROPOSE",
    "STEP_PREVOTE",
    "STEP_PRECOMMIT",
]

SNAPSHOT_DOMAIN = "tfgrid/consensus-wal"
SNAPSHOT_VERSION = 1

STEP_WAIT_TXS = "wait_txs"
STEP_PROPOSE = "propose"
STEP_PREVOTE = "prevote"
STEP_PRECOMMIT = "precommit"
TIMEOUT_REBROADCAST = "rebroadcast"
_STEP_ORDER = {STEP_WAIT_TXS: 0, STEP_PROPOSE: 1, STEP_PREVOTE: 2, STEP_PRECOMMIT: 3}
_TIMEOUT_STEPS = frozenset(
    {STEP_PROPOSE, STEP_PREVOTE, STEP_PRECOMMIT, STEP_WAIT_TXS, TIMEOUT_REBROADCAST}
)

# Memory bounds for messages that are not (yet) about our height and round.
_NEXT_HEIGHT_PER_VALIDATOR = 4  # buffered votes per validator for height + 1
_NEXT_HEIGHT_PROPOSALS = 2  # buffered proposals for height + 1
_AHEAD_ROUND_PER_VALIDATOR = 4  # votes kept of a validator's latest round beyond round + 1
_PROPOSALS_PER_ROUND = 2  # distinct proposals kept per round (an equivocating proposer)
_RECHECK_INVALID_MS = 1000  # how long an invalid verdict on a block is trusted


class App(Protocol):
    """The deterministic application the core decides blocks for (injected, synchronous)."""

    def propose(self, height: int, round: int, time_ms: int, last_commit: Commit | None) -> Block:
        """A new block for ``height`` with header time ``time_ms``, carrying ``last_commit``."""
        ...

    def validate(self, block: Block, now_ms: int) -> bool:
        """Full check of a proposed block (shape, time, txs, state root); False if invalid."""
        ...

    def commit(self, block: Block, commit: Commit) -> None:
        """Durably store and apply a decided block; returns once it is on disk."""
        ...

    def has_pending_txs(self) -> bool:
        """True if the mempool holds transactions for the next block."""
        ...


@dataclass(frozen=True, slots=True)
class ConsensusConfig:
    timeout_propose_ms: int = 1000
    timeout_propose_delta_ms: int = 500
    timeout_prevote_ms: int = 500
    timeout_prevote_delta_ms: int = 500
    timeout_precommit_ms: int = 500
    timeout_precommit_delta_ms: int = 500
    empty_block_interval_ms: int = 0
    rebroadcast_ms: int = 1000

    def timeout_ms(self, step: str, round_: int) -> int:
        if step == STEP_PROPOSE:
            return self.timeout_propose_ms + round_ * self.timeout_propose_delta_ms
        if step == STEP_PREVOTE:
            return self.timeout_prevote_ms + round_ * self.timeout_prevote_delta_ms
        if step == STEP_PRECOMMIT:
            return self.timeout_precommit_ms + round_ * self.timeout_precommit_delta_ms
        raise LocalProtocolError(f"no round timeout for step {step!r}")


# ----------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Timeout:
    height: int
    round: int
    step: str  # "propose", "prevote", "precommit", "wait_txs" or "rebroadcast"


@dataclass(frozen=True, slots=True)
class Persist:
    """Durably write ``snapshot``; later actions must not run before it is on disk."""

    snapshot: bytes


@dataclass(frozen=True, slots=True)
class BroadcastProposal:
    proposal: Proposal
    block: Block


@dataclass(frozen=True, slots=True)
class BroadcastVote:
    vote: Vote


@dataclass(frozen=True, slots=True)
class ScheduleTimeout:
    """Call ``on_timeout(timeout)`` after ``delay_ms``. Stale timeouts are ignored by the core."""

    timeout: Timeout
    delay_ms: int


@dataclass(frozen=True, slots=True)
class Decided:
    """``block`` was decided and ``App.commit`` has returned."""

    block: Block
    commit: Commit


@dataclass(frozen=True, slots=True)
class RecordEvidence:
    """``first`` and ``second`` are validly signed, conflicting votes of one validator."""

    first: Vote
    second: Vote


@dataclass(frozen=True, slots=True)
class CatchUp:
    """We are behind: fetch the committed block at ``height`` (our current height) and the ones
    after it from peers, and feed each to ``on_certified_block`` in height order."""

    height: int


Action = (
    Persist | BroadcastProposal | BroadcastVote | ScheduleTimeout | Decided | RecordEvidence | CatchUp
)


# ------------------------------------------------------------------------- signature cache


class SignatureCache:
    """Remembers votes and proposals whose signatures verified, so each costs one ed25519 check
    (and one canonical encoding) however often it is gossiped to us.

    Bounded (oldest entries are dropped first). Only successful checks are cached: a verdict is
    a pure function of the chain id and the signed message, so sharing one cache between several
    cores in one process (the simulator does) changes nothing but the CPU spent.
    """

    def __init__(self, max_entries: int = 20_000) -> None:
        self._max = max_entries
        self._ok: dict[tuple[str, Vote | Proposal], None] = {}

    def _remember(self, k: tuple[str, Vote | Proposal]) -> None:
        if len(self._ok) >= self._max:
            del self._ok[next(iter(self._ok))]
        self._ok[k] = None

    def vote_ok(self, chain_id: str, vote: Vote) -> bool:
        k = (chain_id, vote)
        if k in self._ok:
            return True
        if not keys.is_valid(vote.validator, vote.sign_bytes(chain_id), vote.signature):
            return False
        self._remember(k)
        return True

    def proposal_ok(self, chain_id: str, p: Proposal) -> bool:
        k = (chain_id, p)
        if k in self._ok:
            return True
        if not keys.is_valid(p.proposer, p.sign_bytes(chain_id), p.signature):
            return False
        self._remember(k)
        return True


# ----------------------------------------------------------------------------- the core


@dataclass(slots=True)
class _RoundVotes:
    """Verified votes of one (round, kind), by block hash.

    As in the paper, a quorum for a value counts the distinct validators that voted for it, so
    an equivocator counts for each value it signed; ``total`` counts every validator once.
    """

    first: dict[bytes, Vote] = field(default_factory=dict)  # each validator's first vote
    by_hash: dict[bytes, dict[bytes, Vote]] = field(default_factory=dict)
    extra: dict[bytes, int] = field(default_factory=dict)  # conflicting votes kept

    def has(self, vote: Vote) -> bool:
        return self.by_hash.get(vote.block_hash, {}).get(vote.validator) == vote

    def total(self) -> int:
        return len(self.first)

    def count(self, block_hash: bytes) -> int:
        return len(self.by_hash.get(block_hash, ()))


class Consensus:
    """One validator's (or follower's) Tendermint state machine.

    ``height`` is the next height to decide, ``last_block_time_ms`` the time of block
    ``height - 1`` (the genesis time at height 1) and ``last_commit`` its certificate (None at
    height 1, or unknown: then App.propose must find it itself). ``snapshot`` is the payload
    of the last ``Persist`` action the driver executed; one for an older height is ignored.
    ``key`` None (or a key outside the set) makes a follower that decides but never signs.

    Raises :class:`LocalProtocolError` for a snapshot that is malformed or from a later height
    than ``height`` (the store lost committed blocks: refusing to sign is the only safe choice).
    """

    def __init__(
        self,
        *,
        chain_id: str,
        validators: ValidatorSet,
        key: keys.KeyPair | None,
        app: App,
        config: ConsensusConfig,
        height: int,
        last_block_time_ms: int,
        snapshot: bytes | None = None,
        last_commit: Commit | None = None,
        signature_cache: SignatureCache | None = None,
    ) -> None:
        if height < 1:
            raise LocalProtocolError("consensus height starts at 1")
        self._chain_id = chain_id
        self._vals = validators
        self._key = key if key is not None and key.public_key in validators else None
        self._me = self._key.public_key if self._key is not None else None
        self._app = app
        self._cfg = config
        self._sigs = signature_cache if signature_cache is not None else SignatureCache()
        self._q = validators.quorum
        self._f1 = validators.f + 1
        self._height = height
        self._last_time = last_block_time_ms
        self._last_commit = last_commit
        self._started = False
        self._changes = 0  # bumped by every state change an incoming message can cause
        # messages for height + 1, already verified: per validator votes, and proposals
        self._next_votes: dict[bytes, list[Vote]] = {}
        self._next_proposals: list[tuple[Proposal, Block]] = []
        # highest height seen (verified) per validator, for heights above ours
        self._ahead_height: dict[bytes, int] = {}
        # memos keyed by object identity; each entry holds its object so the id stays unique
        self._hash_memo: dict[int, tuple[Block, bytes]] = {}
        self._encode_memo: dict[int, tuple[Block, bytes]] = {}
        self._reset_height()
        self._resumed = False
        if snapshot is not None:
            self._restore(snapshot)

    # -- public state ------------------------------------------------------------------

    @property
    def height(self) -> int:
        return self._height

    @property
    def round(self) -> int:
        return self._round

    @property
    def step(self) -> str:
        return self._step

    @property
    def locked_round(self) -> int:
        return self._locked_round

    @property
    def valid_round(self) -> int:
        return self._valid_round

    @property
    def last_commit(self) -> Commit | None:
        return self._last_commit

    # -- per-height state --------------------------------------------------------------

    def _reset_height(self) -> None:
        self._round = 0
        self._step = STEP_WAIT_TXS
        self._locked_round = -1
        self._locked_block: Block | None = None
        self._valid_round = -1
        self._valid_block: Block | None = None
        self._proposals: dict[int, list[tuple[Proposal, Block]]] = {}
        self._blocks: dict[bytes, Block] = {}
        self._valid_cache: dict[bytes, tuple[bool, int]] = {}
        self._votes: dict[tuple[int, int], _RoundVotes] = {}
        self._ahead_votes: dict[bytes, tuple[int, list[Vote]]] = {}
        self._ahead_proposals: dict[bytes, tuple[Proposal, Block]] = {}
        self._max_round: dict[bytes, int] = {}
        self._evidence_seen: set[tuple[bytes, int, int]] = set()
        self._prevote_timer_rounds: set[int] = set()
        self._precommit_timer_rounds: set[int] = set()
        self._l36_rounds: set[int] = set()
        self._signed_votes: dict[tuple[int, int], Vote] = {}
        self._signed_proposal: tuple[Proposal, Block] | None = None
        self._rebroadcast_pending = False
        self._catchup_sent = False
        self._missing_sent: set[bytes] = set()

    # -- snapshot (WAL) ------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The signer-guard record: what a restarted core needs to never equivocate.

        Canonical msgpack: [domain, version, chain_id, height, round, locked_round, locked_ref,
        valid_round, valid_ref, [signed votes], [signed proposal, block_ref] | None,
        last_commit | None, [encoded blocks], [polka]] where a ``*_ref`` indexes the block
        list (-1: none), so the block that is usually locked, valid and proposed is written
        once, and ``polka`` holds the 2f+1 prevotes that justify the valid block: after a
        restart the core must still be able to show them to validators locked elsewhere
        (some may come from a Byzantine validator that will not send them again).
        """
        blocks: list[Block] = []

        def ref(block: Block | None) -> int:
            if block is None:
                return -1
            for i, b in enumerate(blocks):
                if b is block or self._hash(b) == self._hash(block):
                    return i
            blocks.append(block)
            return len(blocks) - 1

        prop = self._signed_proposal
        fields = [
            SNAPSHOT_DOMAIN,
            SNAPSHOT_VERSION,
            self._chain_id,
            self._height,
            self._round,
            self._locked_round,
            ref(self._locked_block),
            self._valid_round,
            ref(self._valid_block),
            [v.to_wire() for _, v in sorted(self._signed_votes.items())],
            None if prop is None else [prop[0].to_wire(), ref(prop[1])],
            None if self._last_commit is None else self._last_commit.to_wire(),
        ]
        fields.append([self._encoded(b) for b in blocks])
        fields.append([v.to_wire() for v in self._polka()])
        return pack(fields)

    def _restore(self, data: bytes) -> None:
        try:
            f = unpack(data)
            if not (isinstance(f, list) and len(f) == 14 and f[0] == SNAPSHOT_DOMAIN):
                raise MalformedFrame("not a consensus snapshot")
            if f[1] != SNAPSHOT_VERSION:
                raise MalformedFrame(f"unsupported consensus snapshot version {f[1]!r}")
            if f[2] != self._chain_id:
                raise MalformedFrame("consensus snapshot of another chain")
            height, round_ = f[3], f[4]
            if not (isinstance(height, int) and isinstance(round_, int) and round_ >= 0):
                raise MalformedFrame("consensus snapshot: bad height/round")
            if height > self._height:
                raise LocalProtocolError(
                    f"consensus snapshot is for height {height} but the store is only at "
                    f"{self._height - 1}: refusing to sign"
                )
            last_commit = None if f[11] is None else Commit.from_wire(f[11])
            if last_commit is not None and self._last_commit is None \
                    and last_commit.height == self._height - 1:
                self._last_commit = last_commit
            if height < self._height:
                return  # a record of a decided height: nothing to guard any more
            if not isinstance(f[12], list):
                raise MalformedFrame("consensus snapshot: bad block list")
            blocks = [_decode_block(b) for b in f[12]]

            def deref(i: Any) -> Block | None:
                if not isinstance(i, int) or not -1 <= i < len(blocks):
                    raise MalformedFrame("consensus snapshot: bad block reference")
                return None if i == -1 else blocks[i]

            locked, valid = deref(f[6]), deref(f[8])
            if not (isinstance(f[9], list) and isinstance(f[13], list)):
                raise MalformedFrame("consensus snapshot: bad votes")
            votes = [Vote.from_wire(v) for v in f[9]]
            polka = [Vote.from_wire(v) for v in f[13]]
            prop = None
            if f[10] is not None:
                pw = f[10]
                if not (isinstance(pw, list) and len(pw) == 2):
                    raise MalformedFrame("consensus snapshot: bad proposal")
                pblock = deref(pw[1])
                if pblock is None:
                    raise MalformedFrame("consensus snapshot: proposal without block")
                prop = (Proposal.from_wire(pw[0]), pblock)
            lr, vr = f[5], f[7]
            if not (isinstance(lr, int) and isinstance(vr, int)) \
                    or (lr >= 0) != (locked is not None) or (vr >= 0) != (valid is not None):
                raise MalformedFrame("consensus snapshot: bad lock")
        except MalformedFrame as exc:
            raise LocalProtocolError(f"unusable consensus snapshot: {exc}") from exc
        self._resumed = True
        self._round = round_
        self._locked_round, self._locked_block = lr, locked
        self._valid_round, self._valid_block = vr, valid
        for b in blocks:
            self._blocks[self._hash(b)] = b
        for v in votes:
            self._signed_votes[(v.round, v.kind)] = v
        if prop is not None:
            self._signed_proposal = prop
        for v in polka:
            if v.height == self._height and self._verify_vote(v):
                self._store_vote(v, 0, [])

    def _hash(self, block: Block) -> bytes:
        """block.hash(), remembered per block object (gossip hands us the same one often)."""
        e = self._hash_memo.get(id(block))
        if e is not None and e[0] is block:
            return e[1]
        if len(self._hash_memo) >= 64:
            self._hash_memo.clear()
        h = block.hash()
        self._hash_memo[id(block)] = (block, h)
        return h

    def _encoded(self, block: Block) -> bytes:
        e = self._encode_memo.get(id(block))
        if e is not None and e[0] is block:
            return e[1]
        if len(self._encode_memo) >= 8:
            self._encode_memo.clear()
        data = block.encode()
        self._encode_memo[id(block)] = (block, data)
        return data

    def _persist(self, acts: list[Action]) -> None:
        acts.append(Persist(self.snapshot()))

    # -- driver entry points -----------------------------------------------------------

    def start(self, now_ms: int) -> list[Action]:
        """Begin (or, from a snapshot, resume) the current height. Call once."""
        if self._started:
            raise LocalProtocolError("Consensus.start called twice")
        self._started = True
        acts: list[Action] = []
        if self._resumed:
            self._begin_round(self._round, now_ms, acts)
            signed_kinds = [k for (r, k) in self._signed_votes if r == self._round]
            if PRECOMMIT in signed_kinds:
                self._step = STEP_PRECOMMIT
            elif PREVOTE in signed_kinds:
                self._step = STEP_PREVOTE
            for (_, _), v in sorted(self._signed_votes.items()):
                acts.append(BroadcastVote(v))
                self._store_vote(v, now_ms, acts)
            self._schedule_rebroadcast(acts)
        else:
            self._enter_height(now_ms, acts)
        self._progress(now_ms, acts)
        return acts

    def on_proposal(self, proposal: Proposal, block: Block, now_ms: int) -> list[Action]:
        """A proposal with its block from a peer. Bad or irrelevant ones are ignored."""
        acts: list[Action] = []
        before = self._changes
        self._receive_proposal(proposal, block, now_ms, acts, verified=False)
        if self._changes != before or acts:
            self._progress(now_ms, acts)
        return acts

    def on_vote(self, vote: Vote, now_ms: int) -> list[Action]:
        """A vote from a peer. Bad or irrelevant ones are ignored."""
        acts: list[Action] = []
        before = self._changes
        self._receive_vote(vote, now_ms, acts, verified=False)
        if self._changes != before or acts:  # most gossip is a duplicate: skip the rules
            self._progress(now_ms, acts)
        return acts

    def on_timeout(self, timeout: Timeout, now_ms: int) -> list[Action]:
        acts: list[Action] = []
        if timeout.height != self._height or timeout.step not in _TIMEOUT_STEPS:
            return acts
        step, r = timeout.step, timeout.round
        if step == TIMEOUT_REBROADCAST:
            self._rebroadcast_pending = False
            if self._step != STEP_WAIT_TXS:
                self._rebroadcast(acts)
                self._schedule_rebroadcast(acts)
        elif step == STEP_WAIT_TXS:
            if self._step == STEP_WAIT_TXS:
                self._begin_round(0, now_ms, acts)
        elif r != self._round:
            pass
        elif step == STEP_PROPOSE and self._step == STEP_PROPOSE:  # L57
            self._step = STEP_PREVOTE
            self._sign_vote(PREVOTE, NIL, now_ms, acts)
        elif step == STEP_PREVOTE and self._step == STEP_PREVOTE:  # L61
            self._step = STEP_PRECOMMIT
            self._sign_vote(PRECOMMIT, NIL, now_ms, acts)
        elif step == STEP_PRECOMMIT and self._step != STEP_WAIT_TXS:  # L65
            self._begin_round(r + 1, now_ms, acts)
        self._progress(now_ms, acts)
        return acts

    def on_txs_available(self, now_ms: int) -> list[Action]:
        acts: list[Action] = []
        if self._started and self._step == STEP_WAIT_TXS:
            self._begin_round(0, now_ms, acts)
            self._progress(now_ms, acts)
        return acts

    def on_certified_block(self, block: Block, commit: Commit, now_ms: int) -> list[Action]:
        """A committed block for our current height, fetched during catch-up.

        Blocks for other heights are ignored. Raises :class:`VerificationError` if ``commit``
        is not a valid certificate of ``block`` (the same checks as ``Commit.verify``, through
        the signature cache), :class:`InvalidBlock` if the app rejects a certified block (then
        more than a third of the validators are faulty, or the app is), and
        :class:`LocalProtocolError` before ``start``.
        """
        if not self._started:
            raise LocalProtocolError("call Consensus.start before feeding it blocks")
        acts: list[Action] = []
        if block.header.height != self._height or commit.height != self._height:
            return acts
        if self._hash(block) != commit.block_hash:
            raise VerificationError("commit certifies another block")
        self._verify_commit(commit)
        if not self._valid(block, now_ms):
            raise InvalidBlock(f"certified block at height {self._height} fails validation")
        self._decide(block, commit, now_ms, acts)
        self._progress(now_ms, acts)
        return acts

    # -- rules -------------------------------------------------------------------------

    def _lock_allows(self, block_hash: bytes, valid_round: int) -> bool:
        """L22/L28: may we prevote for a proposal of ``block_hash`` justified by ``valid_round``
        (-1 for a fresh proposal)? This check is what makes two quorums impossible."""
        return self._locked_round <= valid_round or (
            self._locked_block is not None and self._hash(self._locked_block) == block_hash
        )

    def _valid(self, block: Block, now_ms: int) -> bool:
        """valid(v) of the paper: App.validate, remembered per block. A "no" is asked again
        after a second: time rules (a block from a proposer whose clock runs ahead) can flip."""
        h = self._hash(block)
        cached = self._valid_cache.get(h)
        if cached is not None and (cached[0] or now_ms - cached[1] < _RECHECK_INVALID_MS):
            return cached[0]
        ok = block.header.height == self._height and block.header.chain_id == self._chain_id
        if ok:
            try:
                block.check_shape()
            except VerificationError:
                ok = False
        ok = ok and bool(self._app.validate(block, now_ms))
        self._valid_cache[h] = (ok, now_ms)
        return ok

    def _votes_at(self, round_: int, kind: int) -> _RoundVotes:
        rv = self._votes.get((round_, kind))
        if rv is None:
            rv = self._votes[(round_, kind)] = _RoundVotes()
        return rv

    def _progress(self, now: int, acts: list[Action]) -> None:
        """Fire every rule whose condition holds, until none does."""
        while self._step != STEP_WAIT_TXS:
            target = self._skip_target()
            if target > self._round:  # L55
                self._begin_round(target, now, acts)
                continue
            if self._try_decide(now, acts):  # L49
                continue
            r = self._round
            if self._step == STEP_PROPOSE and self._try_prevote(r, now, acts):  # L22, L28
                continue
            prevotes = self._votes_at(r, PREVOTE)
            if self._step == STEP_PREVOTE and r not in self._prevote_timer_rounds \
                    and prevotes.total() >= self._q:  # L34
                self._prevote_timer_rounds.add(r)
                self._schedule(STEP_PREVOTE, r, acts)
            if self._step != STEP_PROPOSE and r not in self._l36_rounds \
                    and self._try_lock(r, prevotes, now, acts):  # L36
                continue
            if self._step == STEP_PREVOTE and prevotes.count(NIL) >= self._q:  # L44
                self._step = STEP_PRECOMMIT
                self._sign_vote(PRECOMMIT, NIL, now, acts)
                continue
            if r not in self._precommit_timer_rounds \
                    and self._votes_at(r, PRECOMMIT).total() >= self._q:  # L47
                self._precommit_timer_rounds.add(r)
                self._schedule(STEP_PRECOMMIT, r, acts)
            break
        self._check_catchup(acts)

    def _try_prevote(self, r: int, now: int, acts: list[Action]) -> bool:
        props = self._proposals.get(r)
        if not props:
            return False
        p, block = props[0]
        vr = p.valid_round
        if vr >= 0 and self._votes_at(vr, PREVOTE).count(p.block_hash) < self._q:
            return False  # L28 needs the polka of vr; wait for it (or timeout_propose)
        ok = self._valid(block, now) and self._lock_allows(p.block_hash, vr)
        self._step = STEP_PREVOTE
        self._sign_vote(PREVOTE, p.block_hash if ok else NIL, now, acts)
        return True

    def _try_lock(self, r: int, prevotes: _RoundVotes, now: int, acts: list[Action]) -> bool:
        for bh, voters in prevotes.by_hash.items():
            if bh == NIL or len(voters) < self._q:
                continue
            block = self._blocks.get(bh)
            if block is None or not self._valid(block, now):
                continue
            self._l36_rounds.add(r)
            self._valid_round, self._valid_block = r, block
            if self._step == STEP_PREVOTE:
                self._locked_round, self._locked_block = r, block
                self._step = STEP_PRECOMMIT
                self._sign_vote(PRECOMMIT, bh, now, acts)  # its Persist carries the lock
            elif self._key is not None:
                self._persist(acts)
            return True
        return False

    def _try_decide(self, now: int, acts: list[Action]) -> bool:
        for (_, kind), rv in self._votes.items():
            if kind != PRECOMMIT or rv.total() < self._q:
                continue
            for bh, voters in rv.by_hash.items():
                if bh == NIL or len(voters) < self._q:
                    continue
                block = self._blocks.get(bh)
                if block is None:
                    if bh not in self._missing_sent:
                        self._missing_sent.add(bh)
                        acts.append(CatchUp(self._height))
                    continue
                if not self._valid(block, now):
                    continue
                self._decide(block, Commit.from_votes(list(voters.values())), now, acts)
                return True
        return False

    def _skip_target(self) -> int:
        if len(self._max_round) < self._f1:
            return -1
        return sorted(self._max_round.values(), reverse=True)[self._f1 - 1]

    # -- transitions ---------------------------------------------------------------------

    def _enter_height(self, now: int, acts: list[Action]) -> None:
        """Start the current height: wait for txs (empty-block interval) or start round 0."""
        interval = self._cfg.empty_block_interval_ms
        if interval > 0 and not self._app.has_pending_txs():
            self._step = STEP_WAIT_TXS
        else:
            self._begin_round(0, now, acts)
        votes = [v for vs in self._next_votes.values() for v in vs]
        props = self._next_proposals
        self._next_votes, self._next_proposals = {}, []
        for p, b in props:
            self._receive_proposal(p, b, now, acts, verified=True)
        for v in votes:
            self._receive_vote(v, now, acts, verified=True)
        if self._step == STEP_WAIT_TXS:
            delay = max(0, self._last_time + interval - now)
            acts.append(ScheduleTimeout(Timeout(self._height, 0, STEP_WAIT_TXS), delay))

    def _begin_round(self, r: int, now: int, acts: list[Action]) -> None:
        """StartRound(r) (L11)."""
        self._round = r
        self._step = STEP_PROPOSE
        self._schedule_rebroadcast(acts)
        # votes that were too far ahead to keep may be in range now
        for val, (vr, vs) in list(self._ahead_votes.items()):
            if vr <= r + 1:
                del self._ahead_votes[val]
                for v in vs:
                    self._store_vote(v, now, acts)
        for val, (p, b) in list(self._ahead_proposals.items()):
            if p.round <= r + 1:
                del self._ahead_proposals[val]
                self._store_proposal(p, b)
        if self._me is not None and self._vals.proposer(self._height, r) == self._me:
            self._propose(r, now, acts)
        else:
            self._schedule(STEP_PROPOSE, r, acts)

    def _propose(self, r: int, now: int, acts: list[Action]) -> None:
        if self._key is None or self._me is None:
            return
        sp = self._signed_proposal
        if sp is not None and sp[0].round == r:
            # already signed for this round (before a restart): send exactly that again
            acts.append(BroadcastProposal(sp[0], sp[1]))
            self._store_proposal(sp[0], sp[1])
            self._relay_polka(acts)
            return
        if sp is not None and sp[0].round > r:
            return  # never sign for a round older than one we signed in
        if self._valid_block is not None:
            block, vr = self._valid_block, self._valid_round
        else:
            t = max(now, self._last_time + 1)
            block = self._app.propose(self._height, r, t, self._last_commit)
            vr = -1
        prop = Proposal(self._height, r, self._hash(block), vr, self._me).signed(
            self._key, self._chain_id)
        self._signed_proposal = (prop, block)
        self._persist(acts)
        acts.append(BroadcastProposal(prop, block))
        self._store_proposal(prop, block)
        self._relay_polka(acts)

    def _sign_vote(self, kind: int, block_hash: bytes, now: int, acts: list[Action]) -> None:
        if self._key is None or self._me is None:
            return
        r = self._round
        existing = self._signed_votes.get((r, kind))
        if existing is not None:
            # signed before a restart: the guard re-sends that vote, never a different one
            acts.append(BroadcastVote(existing))
            self._store_vote(existing, now, acts)
            return
        if any(sr > r for sr, _ in self._signed_votes):
            return
        vote = Vote(kind, self._height, r, block_hash, self._me).signed(self._key, self._chain_id)
        self._signed_votes[(r, kind)] = vote
        self._persist(acts)
        acts.append(BroadcastVote(vote))
        self._store_vote(vote, now, acts)

    def _decide(self, block: Block, commit: Commit, now: int, acts: list[Action]) -> None:
        self._app.commit(block, commit)
        acts.append(Decided(block, commit))
        self._last_commit = commit
        self._last_time = block.header.time_ms
        self._height += 1
        for v, hgt in list(self._ahead_height.items()):
            if hgt <= self._height:
                del self._ahead_height[v]
        self._reset_height()
        self._enter_height(now, acts)

    def _schedule(self, step: str, r: int, acts: list[Action]) -> None:
        acts.append(ScheduleTimeout(Timeout(self._height, r, step), self._cfg.timeout_ms(step, r)))

    def _schedule_rebroadcast(self, acts: list[Action]) -> None:
        if not self._rebroadcast_pending and self._cfg.rebroadcast_ms > 0:
            self._rebroadcast_pending = True
            acts.append(ScheduleTimeout(Timeout(self._height, 0, TIMEOUT_REBROADCAST),
                                        self._cfg.rebroadcast_ms))

    def _rebroadcast(self, acts: list[Action]) -> None:
        sp = self._signed_proposal
        if sp is not None and sp[0].round == self._round:
            acts.append(BroadcastProposal(sp[0], sp[1]))
        for (r, kind), v in sorted(self._signed_votes.items()):
            # the last two rounds help others catch up on rounds; an older precommit for a
            # block may still complete that round's decision somewhere
            if r >= self._round - 1 or (kind == PRECOMMIT and v.block_hash != NIL):
                acts.append(BroadcastVote(v))
        self._relay_polka(acts)
        lc = self._last_commit
        if lc is not None:
            for val, sig in lc.signatures:
                acts.append(BroadcastVote(Vote(PRECOMMIT, lc.height, lc.round, lc.block_hash,
                                               val, sig)))
        # Still behind after a whole period (f+1 validators already at a later height), or
        # still missing a block a quorum precommitted: ask (again) for the committed block.
        self._missing_sent.clear()
        if len(self._ahead_height) >= self._f1:
            acts.append(CatchUp(self._height))

    def _polka(self) -> list[Vote]:
        """Others' prevotes for our valid block in its round (the polka that justifies it)."""
        vb = self._valid_block
        if vb is None:
            return []
        rv = self._votes.get((self._valid_round, PREVOTE))
        if rv is None:
            return []
        return [v for v in rv.by_hash.get(self._hash(vb), {}).values() if v.validator != self._me]

    def _relay_polka(self, acts: list[Action]) -> None:
        """Re-send the 2f+1 prevotes that justify our valid block (some may come from a
        Byzantine validator that sent them to us only). Without this relay, validators locked in
        later rounds could never be shown why to prevote our validValue: the paper assumes
        that correct processes relay what they receive."""
        for v in self._polka():
            acts.append(BroadcastVote(v))

    def _check_catchup(self, acts: list[Action]) -> None:
        # f+1 validators (so at least one honest) two or more heights ahead: at least our
        # block is committed and we missed its precommits; do not wait for a rebroadcast.
        if self._catchup_sent:
            return
        far = self._height + 2
        if sum(1 for h in self._ahead_height.values() if h >= far) >= self._f1:
            self._catchup_sent = True
            acts.append(CatchUp(self._height))

    # -- incoming messages ---------------------------------------------------------------

    def _verify_vote(self, vote: Vote) -> bool:
        return self._sigs.vote_ok(self._chain_id, vote)

    def _verify_commit(self, commit: Commit) -> None:
        """Same checks as :meth:`Commit.verify`, through the signature cache."""
        seen: set[bytes] = set()
        for val, sig in commit.signatures:
            if val not in self._vals:
                raise VerificationError("commit signed by a key outside the validator set")
            if val in seen:
                raise VerificationError("commit lists a validator twice")
            if not self._verify_vote(Vote(PRECOMMIT, commit.height, commit.round,
                                          commit.block_hash, val, sig)):
                raise VerificationError("commit carries a signature that does not verify")
            seen.add(val)
        if len(seen) < self._q:
            raise VerificationError(
                f"commit has {len(seen)} precommits, needs {self._q} of {self._vals.n}")

    def _note_ahead(self, validator: bytes, height: int) -> None:
        if height > self._ahead_height.get(validator, self._height):
            self._ahead_height[validator] = height
            self._changes += 1

    def _wake(self, sender: bytes, now: int, acts: list[Action]) -> None:
        """Another validator works on this height: stop waiting for txs."""
        if self._step == STEP_WAIT_TXS and self._started and sender != self._me:
            self._begin_round(0, now, acts)

    def _receive_vote(self, vote: Vote, now: int, acts: list[Action], *, verified: bool) -> None:
        if vote.kind not in (PREVOTE, PRECOMMIT) or vote.validator not in self._vals \
                or not isinstance(vote.height, int) or not isinstance(vote.round, int) \
                or vote.round < 0:
            return
        h = vote.height
        if h < self._height:
            return
        if h > self._height + 1:
            if h > self._ahead_height.get(vote.validator, 0) and self._verify_vote(vote):
                self._note_ahead(vote.validator, h)
            return
        if h == self._height + 1:
            buf = self._next_votes.setdefault(vote.validator, [])
            if vote in buf or len(buf) >= _NEXT_HEIGHT_PER_VALIDATOR:
                return
            if verified or self._verify_vote(vote):
                buf.append(vote)
                self._note_ahead(vote.validator, h)
            return
        # our height
        rv = self._votes.get((vote.round, vote.kind))
        if rv is not None and rv.has(vote):
            return  # duplicate
        if vote.round > self._round + 1:
            ahead = self._ahead_votes.get(vote.validator)
            if ahead is not None and (ahead[0] > vote.round or vote in ahead[1]
                                      or len(ahead[1]) >= _AHEAD_ROUND_PER_VALIDATOR):
                return
            if not (verified or self._verify_vote(vote)):
                return
            if ahead is None or ahead[0] < vote.round:
                self._ahead_votes[vote.validator] = (vote.round, [vote])
            else:
                ahead[1].append(vote)
            self._changes += 1
            self._note_round(vote.validator, vote.round)
            self._wake(vote.validator, now, acts)
            return
        if not (verified or self._verify_vote(vote)):
            return
        self._wake(vote.validator, now, acts)
        self._store_vote(vote, now, acts)

    def _store_vote(self, vote: Vote, now: int, acts: list[Action]) -> None:
        """Count a verified vote of our height (or record its conflict with a counted one)."""
        rv = self._votes_at(vote.round, vote.kind)
        val, bh = vote.validator, vote.block_hash
        known = rv.first.get(val)
        self._changes += 1
        if known is None:
            rv.first[val] = vote
            rv.by_hash.setdefault(bh, {})[val] = vote
            self._note_round(val, vote.round)
            return
        if val in rv.by_hash.get(bh, {}):
            return
        k = (val, vote.round, vote.kind)
        if k not in self._evidence_seen:
            self._evidence_seen.add(k)
            acts.append(RecordEvidence(known, vote))
        # Count the equivocator for this value too (the paper counts senders per value). Keep
        # one conflicting vote per validator, more only for values f+1 validators voted for
        # (some honest one did): that bounds memory and keeps every vote a quorum may need.
        extra = rv.extra.get(val, 0)
        if extra < 1 or rv.count(bh) >= self._f1:
            rv.extra[val] = extra + 1
            rv.by_hash.setdefault(bh, {})[val] = vote

    def _note_round(self, validator: bytes, round_: int) -> None:
        if round_ > self._max_round.get(validator, -1):
            self._max_round[validator] = round_
            self._changes += 1

    def _receive_proposal(self, p: Proposal, block: Block, now: int, acts: list[Action], *,
                          verified: bool) -> None:
        if not isinstance(p.height, int) or not isinstance(p.round, int) or p.round < 0 \
                or p.proposer not in self._vals:
            return
        h = p.height
        if h < self._height:
            return
        if h > self._height + 1:
            if h > self._ahead_height.get(p.proposer, 0) and self._verify_proposal(p):
                self._note_ahead(p.proposer, h)
            return
        if p.proposer != self._vals.proposer(h, p.round) or not -1 <= p.valid_round < p.round:
            return
        if block.header.height != h or self._hash(block) != p.block_hash:
            return
        if h == self._height + 1:
            if len(self._next_proposals) >= _NEXT_HEIGHT_PROPOSALS \
                    or any(q == p for q, _ in self._next_proposals):
                return
            if verified or self._verify_proposal(p):
                self._next_proposals.append((p, block))
                self._note_ahead(p.proposer, h)
            return
        props = self._proposals.get(p.round, [])
        if any(q == p for q, _ in props):
            return
        if p.round > self._round + 1:
            # keep only each proposer's latest such proposal; a round skip may reach it
            ahead = self._ahead_proposals.get(p.proposer)
            if (ahead is None or ahead[0].round < p.round) and (
                    verified or self._verify_proposal(p)):
                self._ahead_proposals[p.proposer] = (p, block)
                self._note_round(p.proposer, p.round)
                self._wake(p.proposer, now, acts)
            return
        if len(props) >= _PROPOSALS_PER_ROUND and not self._has_support(p.block_hash):
            return
        if not (verified or self._verify_proposal(p)):
            return
        self._wake(p.proposer, now, acts)
        self._store_proposal(p, block)

    def _store_proposal(self, p: Proposal, block: Block) -> None:
        props = self._proposals.setdefault(p.round, [])
        if any(q == p for q, _ in props):
            return
        props.append((p, block))
        self._changes += 1
        self._blocks.setdefault(p.block_hash, block)
        self._note_round(p.proposer, p.round)

    def _has_support(self, block_hash: bytes) -> bool:
        """f+1 votes of some round for ``block_hash``: at least one honest validator saw it."""
        return any(rv.count(block_hash) >= self._f1 for rv in self._votes.values())

    def _verify_proposal(self, p: Proposal) -> bool:
        return self._sigs.proposal_ok(self._chain_id, p)


def _decode_block(data: Any) -> Block:
    if not isinstance(data, bytes):
        raise MalformedFrame("consensus snapshot: block is not bytes")
    return Block.from_wire(unpack(data))


def decode_snapshot_height(data: bytes) -> int:
    """The height a consensus snapshot was taken at (for drivers and tools).

    Raises :class:`MalformedFrame` if ``data`` is not a consensus snapshot.
    """
    f: Any = unpack(data)
    if not (isinstance(f, list) and len(f) == 14 and f[0] == SNAPSHOT_DOMAIN
            and isinstance(f[3], int)):
        raise MalformedFrame("not a consensus snapshot")
    return int(f[3])
