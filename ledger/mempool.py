"""The bounded, pure mempool: txs admitted against the committed state, waiting for a block.

Rules:

- A tx enters only if :meth:`LedgerState.check_tx` accepts it with ``expected_nonce`` = the
  sender's committed next nonce + the number of that sender's pending txs. So each sender's
  pending txs always form a gap-free nonce run starting at the committed next nonce, and
  their arrival order is their nonce order.
- The sender's balance must cover the fees and transfer amounts of all its pending txs plus the
  new one (``insufficient_funds``).
- Same bytes twice -> ``duplicate``; a second tx for a nonce already pending -> ``bad_nonce``;
  no room (count or bytes) -> ``mempool_full``. Nothing is ever evicted to make room.
- After each committed block, :meth:`update` drops the included txs and rechecks the rest
  against the new state in arrival order; a sender's tx that no longer passes is dropped with
  all of that sender's later ones (they could never be included without it). Only a sender's
  first pending tx can depend on state beyond the sender's account, so only it gets the full
  :meth:`LedgerState.check_tx` again; the later ones get what can have changed for them (nonce
  sequence, balance against the pending spends), their stateless checks having passed at
  admission.
- With a :class:`~ledger.tx.VerifiedTxs` shared with block execution, a tx's signature is
  checked once per validator: here at admission, or by whichever comes first.

Nothing here does I/O or reads a clock; the driver calls it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ledger import keyspace
from ledger.codec import hash_bytes
from ledger.errors import InvalidTx, LocalProtocolError
from ledger.state import LedgerState, max_spend
from ledger.tx import MAX_TX_SIZE, Tx, VerifiedTxs, verify_decoded


@dataclass(frozen=True, slots=True)
class _Entry:
    raw: bytes
    tx: Tx
    tx_hash: bytes


class Mempool:
    """Pending transactions, bounded by count and total bytes."""

    def __init__(self, *, max_txs: int = 10_000, max_bytes: int = 32 * 1024 * 1024,
                 verified: VerifiedTxs | None = None) -> None:
        if max_txs <= 0 or max_bytes <= 0:
            raise LocalProtocolError("mempool bounds must be positive")
        self.max_txs = max_txs
        self.max_bytes = max_bytes
        self.verified = verified  # shared with block execution; committed txs leave it
        self._txs: dict[bytes, _Entry] = {}  # insertion (arrival) order
        self._by_sender: dict[bytes, dict[int, bytes]] = {}  # sender -> nonce -> hash
        self._spend: dict[bytes, int] = {}  # sender -> max_spend of its pending txs
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._txs)

    def __contains__(self, tx_hash: object) -> bool:
        return tx_hash in self._txs

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def hashes(self) -> Iterator[bytes]:
        """Pending tx hashes in arrival order."""
        return iter(list(self._txs))

    def get(self, tx_hash: bytes) -> bytes | None:
        e = self._txs.get(tx_hash)
        return None if e is None else e.raw

    def pending_nonce(self, sender: bytes, state: LedgerState) -> int:
        """The nonce the sender's next tx must carry, counting its pending txs."""
        return state.next_nonce(sender) + len(self._by_sender.get(sender, {}))

    def add(self, raw: bytes, state: LedgerState, chain_id: str) -> bytes:
        """Admit an encoded tx; returns its hash.

        Raises :class:`InvalidTx`: the codes of :meth:`LedgerState.check_tx`, and
        ``duplicate``, ``mempool_full``, ``bad_nonce`` (nonce already pending or out of
        sequence), ``insufficient_funds`` (counting pending spends).
        """
        self._check_chain(state, chain_id)
        if len(raw) > MAX_TX_SIZE:
            raise InvalidTx("too_large", f"transaction is {len(raw)} bytes, limit {MAX_TX_SIZE}")
        tx_hash = hash_bytes(raw)
        if tx_hash in self._txs:
            raise InvalidTx("duplicate", "transaction is already in the mempool")
        if len(self._txs) >= self.max_txs or self._bytes + len(raw) > self.max_bytes:
            raise InvalidTx("mempool_full", "the mempool is full, try again later")
        known = None if self.verified is None else self.verified.get(tx_hash)
        tx = Tx.decode(raw) if known is None else known
        committed, balance = state.nonce_and_balance(tx.sender)
        if tx.nonce < committed and state.get(keyspace.tx_result(tx_hash)) is not None:
            raise InvalidTx("duplicate", "transaction is already committed")
        pending = self._by_sender.get(tx.sender, {})
        if tx.nonce in pending:
            raise InvalidTx("bad_nonce", f"a transaction with nonce {tx.nonce} is already pending")
        if self.verified is not None and known is None:
            # Verified before check_tx's other checks, as check_tx itself would.
            verify_decoded(tx, chain_id)
            self.verified.add(tx_hash, tx)
        state.check_tx(tx, expected_nonce=committed + len(pending),
                       verify_signature=self.verified is None, encoded_size=len(raw))
        self._check_spend(tx, balance)
        self._insert(_Entry(raw, tx, tx_hash))
        return tx_hash

    def reap(self, max_txs: int, max_bytes: int) -> list[bytes]:
        """Up to ``max_txs`` txs totalling at most ``max_bytes``, in arrival order.

        Each sender's txs come in nonce order without gaps: once one of a sender's txs does
        not fit, none of its later ones is taken.
        """
        out: list[bytes] = []
        used = 0
        blocked: set[bytes] = set()
        for e in self._txs.values():
            if len(out) >= max_txs:
                break
            if e.tx.sender in blocked:
                continue
            if used + len(e.raw) > max_bytes:
                blocked.add(e.tx.sender)
                continue
            out.append(e.raw)
            used += len(e.raw)
        return out

    def update(self, committed: Sequence[bytes], state: LedgerState, chain_id: str) -> None:
        """After a block: drop its txs, then recheck the rest against ``state``."""
        self._check_chain(state, chain_id)
        included = [hash_bytes(raw) for raw in committed]
        for h in included:
            self._remove(h)
        if self.verified is not None:
            self.verified.discard(included)
        old = list(self._txs.values())
        self._txs.clear()
        self._by_sender.clear()
        self._spend.clear()
        self._bytes = 0
        dropped: set[bytes] = set()
        accounts: dict[bytes, tuple[int, int]] = {}  # sender -> committed nonce, balance
        for e in old:
            sender = e.tx.sender
            if sender in dropped:
                continue
            account = accounts.get(sender)
            if account is None:
                account = accounts[sender] = state.nonce_and_balance(sender)
            committed_nonce, balance = account
            if e.tx.nonce < committed_nonce:
                continue  # included by this block or a replacement was: stale
            expected = committed_nonce + len(self._by_sender.get(sender, {}))
            try:
                if e.tx.nonce == committed_nonce:
                    # The sender's next tx: everything again (without the signature), incl.
                    # executing it against the new state.
                    state.check_tx(e.tx, expected_nonce=expected, verify_signature=False,
                                   encoded_size=len(e.raw))
                elif e.tx.nonce != expected:
                    raise InvalidTx("bad_nonce", f"nonce {e.tx.nonce} is not the expected "
                                    f"{expected}")
                # Later ones passed the stateless checks at admission and check_tx would not
                # execute them: what is left is the balance, counting the pending spends.
                self._check_spend(e.tx, balance)
            except InvalidTx:
                dropped.add(sender)
                continue
            self._insert(e)

    # -- internals ------------------------------------------------------------------------

    def _check_chain(self, state: LedgerState, chain_id: str) -> None:
        if chain_id != state.genesis.chain_id:
            raise LocalProtocolError(
                f"mempool used with chain {chain_id!r} but the state is of "
                f"{state.genesis.chain_id!r}")
        if self.verified is not None and self.verified.chain_id != chain_id:
            raise LocalProtocolError(
                f"mempool used with chain {chain_id!r} but its verified txs are of "
                f"{self.verified.chain_id!r}")

    def _check_spend(self, tx: Tx, balance: int) -> None:
        total = max_spend(tx) + self._spend.get(tx.sender, 0)
        if balance < total:
            raise InvalidTx("insufficient_funds",
                            f"balance {balance} does not cover {total} with the pending txs")

    def _insert(self, e: _Entry) -> None:
        self._txs[e.tx_hash] = e
        self._by_sender.setdefault(e.tx.sender, {})[e.tx.nonce] = e.tx_hash
        self._spend[e.tx.sender] = self._spend.get(e.tx.sender, 0) + max_spend(e.tx)
        self._bytes += len(e.raw)

    def _remove(self, tx_hash: bytes) -> None:
        e = self._txs.pop(tx_hash, None)
        if e is None:
            return
        self._bytes -= len(e.raw)
        left = self._spend.pop(e.tx.sender, 0) - max_spend(e.tx)
        if left > 0:
            self._spend[e.tx.sender] = left
        by_nonce = self._by_sender.get(e.tx.sender)
        if by_nonce is not None:
            by_nonce.pop(e.tx.nonce, None)
            if not by_nonce:
                del self._by_sender[e.tx.sender]
