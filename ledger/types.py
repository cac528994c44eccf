"""Chain data types: validator sets, genesis, headers, blocks, votes, proposals, commits.

Each type is immutable and has ``to_wire()`` (a canonical list, what gets packed and hashed)
and ``from_wire(obj)`` which validates untrusted input and raises :class:`MalformedFrame`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger import keys
from ledger.codec import EMPTY_HASH, HASH_SIZE, hash_bytes, hash_value, pack, signing_bytes
from ledger.errors import MalformedFrame, VerificationError

PREVOTE = 1
PRECOMMIT = 2
NIL = b""  # block hash of a nil vote

DOMAIN_HEADER = "tfgrid/header/v1"
DOMAIN_VOTE = "tfgrid/vote/v1"
DOMAIN_PROPOSAL = "tfgrid/proposal/v1"


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise MalformedFrame(what)


def _int(v: Any, what: str, lo: int = 0) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{what}: bad integer")
    return int(v)


def _bytes(v: Any, what: str, size: int | None = None) -> bytes:
    _need(isinstance(v, bytes), f"{what}: expected bytes")
    if size is not None:
        _need(len(v) == size, f"{what}: expected {size} bytes")
    return bytes(v)


def _list(v: Any, what: str, length: int | None = None) -> list[Any]:
    _need(isinstance(v, list), f"{what}: expected a list")
    if length is not None:
        _need(len(v) == length, f"{what}: expected {length} fields")
    return list(v)


def merkle_root(leaves: list[bytes]) -> bytes:
    """Binary Merkle root of already-hashed leaves (RFC 6962 style domain bytes)."""
    if not leaves:
        return EMPTY_HASH
    level = [hash_bytes(b"\x00" + leaf) for leaf in leaves]
    while len(level) > 1:
        nxt = [hash_bytes(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@dataclass(frozen=True, slots=True)
class ValidatorSet:
    """Equal-power validators, identified by ed25519 public keys, in canonical (sorted) order."""

    members: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise MalformedFrame("validator set is empty")
        if list(self.members) != sorted(set(self.members)):
            raise MalformedFrame("validator set must be sorted and without duplicates")
        for m in self.members:
            _bytes(m, "validator", keys.PUBLIC_KEY_SIZE)

    @classmethod
    def of(cls, members: list[bytes]) -> ValidatorSet:
        return cls(tuple(sorted(set(members))))

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def f(self) -> int:
        """The number of faulty validators tolerated."""
        return (self.n - 1) // 3

    @property
    def quorum(self) -> int:
        """More than two thirds: the smallest count q with 3q > 2n."""
        return (2 * self.n) // 3 + 1

    def proposer(self, height: int, round_: int) -> bytes:
        return self.members[(height + round_) % self.n]

    def index(self, key: bytes) -> int:
        return self.members.index(key)

    def __contains__(self, key: object) -> bool:
        return key in self.members

    def hash(self) -> bytes:
        return hash_value(["tfgrid/validators/v1", list(self.members)])

    def to_wire(self) -> list[Any]:
        return list(self.members)

    @classmethod
    def from_wire(cls, obj: Any) -> ValidatorSet:
        return cls(tuple(_bytes(m, "validator", keys.PUBLIC_KEY_SIZE) for m in _list(obj, "validators")))


@dataclass(frozen=True, slots=True)
class Genesis:
    """The chain's first state. ``params`` are integer-valued economic and timing parameters."""

    chain_id: str
    genesis_time_ms: int
    validators: ValidatorSet
    accounts: tuple[tuple[bytes, int], ...]
    params: tuple[tuple[str, int], ...] = ()

    def param(self, name: str, default: int) -> int:
        return dict(self.params).get(name, default)

    def to_wire(self) -> list[Any]:
        return [
            self.chain_id,
            self.genesis_time_ms,
            self.validators.to_wire(),
            [[a, b] for a, b in self.accounts],
            [[k, v] for k, v in self.params],
        ]

    @classmethod
    def from_wire(cls, obj: Any) -> Genesis:
        f = _list(obj, "genesis", 5)
        _need(isinstance(f[0], str) and 0 < len(f[0]) <= 64, "genesis: chain_id")
        accounts = tuple(
            (_bytes(a[0], "account", keys.PUBLIC_KEY_SIZE), _int(a[1], "balance"))
            for a in (_list(x, "account", 2) for x in _list(f[3], "accounts"))
        )
        params = []
        for p in _list(f[4], "params"):
            p = _list(p, "param", 2)
            _need(isinstance(p[0], str), "param name")
            params.append((str(p[0]), _int(p[1], "param value")))
        return cls(
            chain_id=f[0],
            genesis_time_ms=_int(f[1], "genesis_time"),
            validators=ValidatorSet.from_wire(f[2]),
            accounts=accounts,
            params=tuple(sorted(params)),
        )

    def hash(self) -> bytes:
        return hash_value(["tfgrid/genesis/v1", self.to_wire()])


@dataclass(frozen=True, slots=True)
class Vote:
    kind: int  # PREVOTE or PRECOMMIT
    height: int
    round: int
    block_hash: bytes  # NIL for a nil vote
    validator: bytes
    signature: bytes = b""

    def sign_bytes(self, chain_id: str) -> bytes:
        return signing_bytes(
            DOMAIN_VOTE, chain_id, [self.kind, self.height, self.round, self.block_hash]
        )

    def signed(self, key: keys.KeyPair, chain_id: str) -> Vote:
        return Vote(self.kind, self.height, self.round, self.block_hash, key.public_key,
                    key.sign(self.sign_bytes(chain_id)))

    def verify(self, chain_id: str) -> None:
        """Raises :class:`BadSignature`."""
        keys.verify(self.validator, self.sign_bytes(chain_id), self.signature)

    def to_wire(self) -> list[Any]:
        return [self.kind, self.height, self.round, self.block_hash, self.validator, self.signature]

    @classmethod
    def from_wire(cls, obj: Any) -> Vote:
        f = _list(obj, "vote", 6)
        kind = _int(f[0], "vote kind")
        _need(kind in (PREVOTE, PRECOMMIT), "vote kind")
        bh = _bytes(f[3], "vote block hash")
        _need(len(bh) in (0, HASH_SIZE), "vote block hash length")
        return cls(kind, _int(f[1], "height", 1), _int(f[2], "round"), bh,
                   _bytes(f[4], "voter", keys.PUBLIC_KEY_SIZE),
                   _bytes(f[5], "signature", keys.SIGNATURE_SIZE))


@dataclass(frozen=True, slots=True)
class Commit:
    """More than 2/3 precommits for one block at one (height, round): its certificate."""

    height: int
    round: int
    block_hash: bytes
    signatures: tuple[tuple[bytes, bytes], ...]  # (validator key, signature), sorted by key

    def to_wire(self) -> list[Any]:
        return [self.height, self.round, self.block_hash, [[k, s] for k, s in self.signatures]]

    @classmethod
    def from_wire(cls, obj: Any) -> Commit:
        f = _list(obj, "commit", 4)
        sigs = []
        for x in _list(f[3], "commit signatures"):
            x = _list(x, "commit signature", 2)
            sigs.append((_bytes(x[0], "signer", keys.PUBLIC_KEY_SIZE),
                         _bytes(x[1], "signature", keys.SIGNATURE_SIZE)))
        return cls(_int(f[0], "height", 1), _int(f[1], "round"),
                   _bytes(f[2], "commit block hash", HASH_SIZE), tuple(sigs))

    @classmethod
    def from_votes(cls, votes: list[Vote]) -> Commit:
        v0 = votes[0]
        sigs = sorted({(v.validator, v.signature) for v in votes})
        return cls(v0.height, v0.round, v0.block_hash, tuple(sigs))

    def hash(self) -> bytes:
        return hash_value(["tfgrid/commit/v1", self.to_wire()])

    def verify(self, chain_id: str, validators: ValidatorSet) -> None:
        """Check that more than 2/3 of ``validators`` precommitted this block.

        Raises :class:`VerificationError` naming what is wrong.
        """
        seen: set[bytes] = set()
        for key, sig in self.signatures:
            if key not in validators:
                raise VerificationError("commit signed by a key outside the validator set")
            if key in seen:
                raise VerificationError("commit lists a validator twice")
            vote = Vote(PRECOMMIT, self.height, self.round, self.block_hash, key, sig)
            if not keys.is_valid(key, vote.sign_bytes(chain_id), sig):
                raise VerificationError("commit carries a signature that does not verify")
            seen.add(key)
        if len(seen) < validators.quorum:
            raise VerificationError(
                f"commit has {len(seen)} precommits, needs {validators.quorum} of {validators.n}"
            )


@dataclass(frozen=True, slots=True)
class Header:
    chain_id: str
    height: int
    time_ms: int
    prev_hash: bytes
    last_commit_hash: bytes
    txs_root: bytes
    state_root: bytes
    validators_hash: bytes
    next_validators_hash: bytes
    proposer: bytes

    def to_wire(self) -> list[Any]:
        return [self.chain_id, self.height, self.time_ms, self.prev_hash, self.last_commit_hash,
                self.txs_root, self.state_root, self.validators_hash,
                self.next_validators_hash, self.proposer]

    @classmethod
    def from_wire(cls, obj: Any) -> Header:
        f = _list(obj, "header", 10)
        _need(isinstance(f[0], str), "header chain_id")
        return cls(f[0], _int(f[1], "height", 1), _int(f[2], "time"),
                   _bytes(f[3], "prev_hash", HASH_SIZE), _bytes(f[4], "last_commit_hash", HASH_SIZE),
                   _bytes(f[5], "txs_root", HASH_SIZE), _bytes(f[6], "state_root", HASH_SIZE),
                   _bytes(f[7], "validators_hash", HASH_SIZE),
                   _bytes(f[8], "next_validators_hash", HASH_SIZE),
                   _bytes(f[9], "proposer", keys.PUBLIC_KEY_SIZE))

    def hash(self) -> bytes:
        """The block hash: BLAKE2b-256 over the canonical header."""
        return hash_value([DOMAIN_HEADER, self.to_wire()])


@dataclass(frozen=True, slots=True)
class Block:
    header: Header
    txs: tuple[bytes, ...]  # encoded signed transactions
    last_commit: Commit | None  # certificate of block height-1 (None at height 1)

    def hash(self) -> bytes:
        return self.header.hash()

    def to_wire(self) -> list[Any]:
        return [self.header.to_wire(), list(self.txs),
                None if self.last_commit is None else self.last_commit.to_wire()]

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def from_wire(cls, obj: Any) -> Block:
        f = _list(obj, "block", 3)
        txs = tuple(_bytes(t, "tx") for t in _list(f[1], "txs"))
        lc = None if f[2] is None else Commit.from_wire(f[2])
        return cls(Header.from_wire(f[0]), txs, lc)

    def check_shape(self) -> None:
        """Cheap internal consistency: txs root and last-commit hash match the header."""
        h = self.header
        if merkle_root([hash_bytes(t) for t in self.txs]) != h.txs_root:
            raise VerificationError("block txs do not match the header's txs root")
        lc_hash = EMPTY_HASH if self.last_commit is None else self.last_commit.hash()
        if lc_hash != h.last_commit_hash:
            raise VerificationError("block last commit does not match the header")
        if (h.height == 1) != (self.last_commit is None):
            raise VerificationError("only the first block lacks a last commit")


@dataclass(frozen=True, slots=True)
class Proposal:
    height: int
    round: int
    block_hash: bytes
    valid_round: int  # -1 if none
    proposer: bytes
    signature: bytes = b""

    def sign_bytes(self, chain_id: str) -> bytes:
        return signing_bytes(DOMAIN_PROPOSAL, chain_id,
                             [self.height, self.round, self.block_hash, self.valid_round])

    def signed(self, key: keys.KeyPair, chain_id: str) -> Proposal:
        return Proposal(self.height, self.round, self.block_hash, self.valid_round,
                        key.public_key, key.sign(self.sign_bytes(chain_id)))

    def verify(self, chain_id: str) -> None:
        keys.verify(self.proposer, self.sign_bytes(chain_id), self.signature)

    def to_wire(self) -> list[Any]:
        return [self.height, self.round, self.block_hash, self.valid_round, self.proposer,
                self.signature]

    @classmethod
    def from_wire(cls, obj: Any) -> Proposal:
        f = _list(obj, "proposal", 6)
        vr = f[3]
        _need(isinstance(vr, int) and not isinstance(vr, bool) and vr >= -1, "valid_round")
        return cls(_int(f[0], "height", 1), _int(f[1], "round"),
                   _bytes(f[2], "proposal block hash", HASH_SIZE), int(vr),
                   _bytes(f[4], "proposer", keys.PUBLIC_KEY_SIZE),
                   _bytes(f[5], "signature", keys.SIGNATURE_SIZE))
