"""Light-client verification: what a ledger peer serves is checked, never trusted.

Pure and synchronous (no I/O, no clock): :class:`LightState` pins the genesis (chain id and
validator set) and remembers the hashes of the headers it has verified, by height. The trio
:mod:`ledger.client` feeds it every header, block and state proof a peer returns.

Rules, in the order they are checked:

- A header is trusted only with a commit that certifies exactly it: more than 2/3 of the
  pinned validator set precommitted ``header.hash()`` at ``header.height`` for this chain id,
  and the header names the pinned set (``validators_hash``) and chain id.
- A block is trusted only if its header is, and its body matches the header
  (:meth:`Block.check_shape`) and its last commit points at its parent.
- Two certified headers at one height with different hashes (directly, or implied by a
  certified child whose ``prev_hash`` differs from what we hold) are a fork of the validator
  set: :class:`ConflictingHeaders`. It is raised every time, never retried or forgotten; more
  than a third of the validators are faulty and nothing a peer says can be relied on.
- A header presented as the latest that is lower than the highest height already verified is
  stale (:class:`VerificationError`); the caller should ask another peer.
- A state entry (value or absence) is trusted only with a proof against the state root of a
  header that was verified here, or, before the first block, against the genesis state root
  the caller computed from the pinned genesis.

Validator-set changes are not followed: there is no transaction that changes the set, so a
header naming a different set fails verification loudly rather than being trusted.
"""

from __future__ import annotations

from ledger.errors import ConflictingHeaders, LocalProtocolError, VerificationError
from ledger.smt import Proof, verify_proof
from ledger.types import Block, Commit, Genesis, Header

DEFAULT_MAX_HEADERS = 4096


class LightState:
    """Verified headers of one chain, by height, bounded to the ``max_headers`` highest.

    Not thread-safe and not async: one owner (a :class:`ledger.client.LedgerClient`) calls it.
    """

    def __init__(self, genesis: Genesis, *, genesis_root: bytes | None = None,
                 max_headers: int = DEFAULT_MAX_HEADERS) -> None:
        """``genesis_root`` is the state root before block 1, computed by the caller from the
        pinned genesis (not taken from a peer); without it, state at height 0 is unprovable."""
        if max_headers < 1:
            raise LocalProtocolError("max_headers must be at least 1")
        self._chain_id = genesis.chain_id
        self._validators = genesis.validators
        self._validators_hash = genesis.validators.hash()
        self._genesis_root = genesis_root
        self._max = max_headers
        self._headers: dict[int, Header] = {}
        self._hashes: dict[int, bytes] = {}
        self._height = 0

    @property
    def chain_id(self) -> str:
        return self._chain_id

    @property
    def height(self) -> int:
        """The highest verified height (0 before anything was verified)."""
        return self._height

    def header(self, height: int) -> Header | None:
        """The verified header at ``height`` if it is still held."""
        return self._headers.get(height)

    def latest(self) -> Header | None:
        """The highest verified header, if any."""
        return self._headers.get(self._height)

    def check_fresh(self, height: int) -> None:
        """Raise :class:`VerificationError` if ``height`` is below the highest verified height.

        Used for anything a peer presents as current (its latest header, a query answered
        "at the latest height"): a lower height means the peer is behind what we already know.
        """
        if height < self._height:
            raise VerificationError(
                f"stale: peer is at height {height}, already verified height {self._height}"
            )

    def verify_commit(self, header: Header, commit: Commit) -> None:
        """Check that ``commit`` certifies ``header`` for the pinned chain and validator set.

        Records nothing. Raises :class:`VerificationError` naming what is wrong.
        """
        if header.chain_id != self._chain_id:
            raise VerificationError(
                f"header is for chain {header.chain_id!r}, expected {self._chain_id!r}"
            )
        if header.height < 1:
            raise VerificationError("header height must be at least 1")
        if header.validators_hash != self._validators_hash:
            raise VerificationError("header names a validator set other than the pinned one")
        if header.proposer not in self._validators:
            raise VerificationError("header proposer is not a validator")
        if commit.height != header.height:
            raise VerificationError(
                f"commit is for height {commit.height}, header is at {header.height}"
            )
        if commit.block_hash != header.hash():
            raise VerificationError("commit certifies a different block than this header")
        commit.verify(self._chain_id, self._validators)

    def verify_header(self, header: Header, commit: Commit, *, latest: bool = False) -> None:
        """Verify ``header`` with its ``commit`` and remember it.

        ``latest`` marks a header the peer presented as its newest: it must not be lower than
        what we already verified. Raises :class:`VerificationError` (also for staleness) or
        :class:`ConflictingHeaders` (a fork: never retry).
        """
        self.verify_commit(header, commit)
        self._accept(header, latest=latest)

    def _accept(self, header: Header, *, latest: bool) -> None:
        """Remember a header whose commit verified (conflict and freshness checks first)."""
        # Conflicts are checked before staleness: a certified fork must surface loudly even
        # when the header is also old.
        self._check_conflicts(header)
        if latest:
            self.check_fresh(header.height)
        self._remember(header)

    def verify_block(self, block: Block, commit: Commit, *, latest: bool = False) -> None:
        """Verify a block body and its header's commit, and remember the header.

        Raises :class:`VerificationError` or :class:`ConflictingHeaders`.
        """
        self.verify_commit(block.header, commit)
        block.check_shape()
        lc = block.last_commit
        if lc is not None:
            if lc.height != block.header.height - 1:
                raise VerificationError("block last commit is not for the previous height")
            if lc.block_hash != block.header.prev_hash:
                raise VerificationError("block last commit does not certify its parent")
        self._accept(block.header, latest=latest)  # its commit verified above: not twice

    def verify_state(
        self, header: Header, key: bytes, value: bytes | None, proof: Proof
    ) -> None:
        """Check that ``key`` maps to ``value`` (None: absent) in the state of ``header``.

        ``header`` must have been verified here and still be held. Raises
        :class:`VerificationError`.
        """
        if self._hashes.get(header.height) != header.hash():
            raise VerificationError(f"header at height {header.height} has not been verified")
        verify_proof(header.state_root, key, value, proof)

    def verify_genesis_state(self, key: bytes, value: bytes | None, proof: Proof) -> None:
        """Check ``key`` -> ``value`` in the state before block 1 (a chain with no block yet).

        Raises :class:`VerificationError`, also when no genesis root was given or a block
        has already been verified (state at height 0 is then stale).
        """
        if self._genesis_root is None:
            raise VerificationError("no genesis state root to prove height-0 state against")
        self.check_fresh(0)
        verify_proof(self._genesis_root, key, value, proof)

    def _check_conflicts(self, header: Header) -> None:
        h = header.height
        block_hash = header.hash()
        known = self._hashes.get(h)
        if known is not None and known != block_hash:
            raise ConflictingHeaders(
                f"two certified headers at height {h}: {known.hex()} and {block_hash.hex()}"
            )
        parent = self._hashes.get(h - 1)
        if parent is not None and header.prev_hash != parent:
            # The validators of height h checked prev_hash, so a certified header naming a
            # different parent implies a second certified block at h - 1.
            raise ConflictingHeaders(
                f"certified header at height {h} descends from {header.prev_hash.hex()}, "
                f"but the verified header at {h - 1} is {parent.hex()}"
            )
        child = self._headers.get(h + 1)
        if child is not None and child.prev_hash != block_hash:
            raise ConflictingHeaders(
                f"certified header at height {h} is {block_hash.hex()}, but the verified "
                f"header at {h + 1} descends from {child.prev_hash.hex()}"
            )

    def _remember(self, header: Header) -> None:
        h = header.height
        if h in self._hashes:
            return
        if len(self._hashes) >= self._max and h < min(self._hashes):
            # Older than everything held and no room: verified, but not worth keeping.
            return
        self._hashes[h] = header.hash()
        self._headers[h] = header
        self._height = max(self._height, h)
        while len(self._hashes) > self._max:
            oldest = min(self._hashes)
            del self._hashes[oldest]
            del self._headers[oldest]
