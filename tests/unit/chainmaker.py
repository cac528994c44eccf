"""A tiny certified chain for light-client tests: real keys, real commits, real state proofs.

Not a consensus engine: :class:`ChainMaker` just builds well-formed blocks on top of each other,
keeps the state tree of each height, and has a quorum of the validator keys precommit them, the
way honest (or, for fork tests, Byzantine) validators would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ledger.codec import EMPTY_HASH, hash_bytes
from ledger.keys import KeyPair
from ledger.smt import SMT
from ledger.state import LedgerState
from ledger.types import (
    PRECOMMIT,
    Block,
    Commit,
    Genesis,
    Header,
    ValidatorSet,
    Vote,
    merkle_root,
)

CHAIN_ID = "light-test"
KEYS = [KeyPair.from_seed(bytes([i]) * 32) for i in range(1, 5)]
OUTSIDERS = [KeyPair.from_seed(bytes([i]) * 32) for i in range(101, 105)]
VALIDATORS = ValidatorSet.of([k.public_key for k in KEYS])
GENESIS = Genesis(chain_id=CHAIN_ID, genesis_time_ms=1_000_000, validators=VALIDATORS,
                  accounts=((KEYS[0].public_key, 10**12),))


def sign_commit(header: Header, signers: list[KeyPair], *, chain_id: str | None = None,
                round_: int = 0) -> Commit:
    """Precommits by ``signers`` for ``header``, packed as a commit."""
    cid = header.chain_id if chain_id is None else chain_id
    votes = [Vote(PRECOMMIT, header.height, round_, header.hash(), k.public_key).signed(k, cid)
             for k in signers]
    return Commit.from_votes(votes)


@dataclass
class ChainMaker:
    """Builds blocks 1, 2, ... each certified by ``KEYS`` (all four by default)."""

    genesis: Genesis = GENESIS
    blocks: list[Block] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    trees: list[SMT] = field(default_factory=list)

    @property
    def height(self) -> int:
        return len(self.blocks)

    def genesis_tree(self) -> SMT:
        """The state before block 1, as every validator derives it from the genesis."""
        return LedgerState.from_genesis(self.genesis).tree

    def tree(self, height: int) -> SMT:
        return self.trees[height - 1] if height else self.genesis_tree()

    def block(self, height: int) -> Block:
        return self.blocks[height - 1]

    def commit(self, height: int) -> Commit:
        return self.commits[height - 1]

    def make(self, changes: dict[bytes, bytes | None] | None = None,
             txs: tuple[bytes, ...] = (), *, chain_id: str | None = None,
             validators: ValidatorSet | None = None) -> Block:
        """The next block (not appended): ``changes`` applied to the current state."""
        h = self.height + 1
        prev = self.blocks[-1] if self.blocks else None
        last_commit = self.commits[-1] if self.commits else None
        base = self.tree(self.height)
        tree = base.update(changes or {})
        vset = validators or self.genesis.validators
        header = Header(
            chain_id=chain_id or self.genesis.chain_id,
            height=h,
            time_ms=self.genesis.genesis_time_ms + 1000 * h,
            prev_hash=EMPTY_HASH if prev is None else prev.hash(),
            last_commit_hash=EMPTY_HASH if last_commit is None else last_commit.hash(),
            txs_root=merkle_root([hash_bytes(t) for t in txs]),
            state_root=tree.root,
            validators_hash=vset.hash(),
            next_validators_hash=vset.hash(),
            proposer=vset.proposer(h, 0),
        )
        return Block(header, txs, last_commit)

    def append(self, changes: dict[bytes, bytes | None] | None = None,
               txs: tuple[bytes, ...] = (), signers: list[KeyPair] | None = None,
               ) -> tuple[Block, Commit]:
        """Build, certify and append the next block."""
        block = self.make(changes, txs)
        commit = sign_commit(block.header, KEYS if signers is None else signers)
        base = self.tree(self.height)
        self.blocks.append(block)
        self.commits.append(commit)
        self.trees.append(base.update(changes or {}))
        return block, commit

    def fork(self, height: int, txs: tuple[bytes, ...] = (b"fork",)) -> Block:
        """A different block at ``height`` with the same parent (not certified)."""
        other = ChainMaker(self.genesis, self.blocks[:height - 1], self.commits[:height - 1],
                           self.trees[:height - 1])
        return other.make({b"fork": b"yes"}, txs)
