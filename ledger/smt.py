"""A persistent, compact sparse Merkle tree: the authenticated map behind the state root.

Every key sits at the 256-bit path ``BLAKE2b-256(key)``. The tree is canonical for its
content: an empty subtree is the constant :data:`EMPTY_ROOT`, a subtree holding exactly one
entry is that entry's leaf (stored at the shallowest level where it is alone, so the depth is
about log2(n) and not 256), and a subtree holding two or more entries is an inner node. So
the root depends only on the set of entries, never on the order they were written in.

Hashes (domain separated, so a leaf can never pass for an inner node or vice versa)::

    leaf  = H(LEAF_TAG  || key_path || H(value))
    inner = H(INNER_TAG || left || right)          # an empty child counts as EMPTY_ROOT

Nodes are immutable and shared between versions: :meth:`SMT.update` rebuilds only the
nodes on the paths of the changed keys (cost ~ changed keys x depth) and returns a new tree;
the old tree stays valid and unchanged.

A :class:`Proof` for a key lists the sibling hashes from the root down to where the key's
path ends in the tree, and what is found there: either nothing (an empty subtree) or a leaf.
If that leaf carries the key's own path it proves inclusion of a value; if it carries another
path, or the path ends in an empty subtree, it proves the key is absent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ledger.codec import EMPTY_HASH, HASH_SIZE, hash_bytes
from ledger.errors import LocalProtocolError, MalformedFrame, VerificationError

EMPTY_ROOT = EMPTY_HASH
"""Root (and subtree hash) of an empty tree: 32 zero bytes."""

LEAF_TAG = b"tfgrid/smt/leaf/v1\x00"
INNER_TAG = b"tfgrid/smt/inner/v1\x00"

PATH_BITS = HASH_SIZE * 8
MAX_SIBLINGS = PATH_BITS

Hasher = Callable[[bytes], bytes]


def _bit(path: bytes, depth: int) -> int:
    return (path[depth >> 3] >> (7 - (depth & 7))) & 1


def _same_prefix(a: bytes, b: bytes, nbits: int) -> bool:
    """True if ``a`` and ``b`` agree on their first ``nbits`` bits."""
    whole, rest = divmod(nbits, 8)
    if a[:whole] != b[:whole]:
        return False
    if rest == 0:
        return True
    mask = (0xFF << (8 - rest)) & 0xFF
    return (a[whole] & mask) == (b[whole] & mask)


# ---------------------------------------------------------------------------- nodes
# Empty subtrees are represented by ``None``.


class _Leaf:
    __slots__ = ("path", "key", "value", "value_hash", "hash")

    path: bytes
    key: bytes
    value: bytes
    value_hash: bytes
    hash: bytes
    size: int = 1  # a class constant, not a slot

    def __init__(self, path: bytes, key: bytes, value: bytes, hasher: Hasher) -> None:
        self.path = path
        self.key = key
        self.value = value
        self.value_hash = hasher(value)
        self.hash = hasher(LEAF_TAG + path + self.value_hash)


class _Inner:
    __slots__ = ("left", "right", "size", "hash")

    left: _Node
    right: _Node
    size: int
    hash: bytes

    def __init__(self, left: _Node, right: _Node, hasher: Hasher) -> None:
        self.left = left
        self.right = right
        self.size = (0 if left is None else left.size) + (0 if right is None else right.size)
        lh = EMPTY_ROOT if left is None else left.hash
        rh = EMPTY_ROOT if right is None else right.hash
        self.hash = hasher(INNER_TAG + lh + rh)


_Node = _Leaf | _Inner | None

# One pending write: (path, key, value); value None means delete.
_Change = tuple[bytes, bytes, bytes | None]
_Entry = tuple[bytes, bytes, bytes]


def _join(left: _Node, right: _Node, hasher: Hasher) -> _Node:
    """The canonical node over two children: a lone leaf floats up, empties vanish."""
    if left is None:
        if right is None or isinstance(right, _Leaf):
            return right
    elif right is None and isinstance(left, _Leaf):
        return left
    return _Inner(left, right, hasher)


def _split(items: list[Any], depth: int) -> int:
    """Index of the first item (sorted by path, first field) whose bit at ``depth`` is 1."""
    lo, hi = 0, len(items)
    while lo < hi:  # sorted by path and sharing the prefix above depth: the bit is monotone
        mid = (lo + hi) // 2
        if _bit(items[mid][0], depth):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _build(entries: list[_Entry], depth: int, hasher: Hasher, reuse: _Leaf | None = None) -> _Node:
    """Subtree at ``depth`` over entries sorted by distinct path.

    ``reuse`` is an existing leaf that may end up alone in a subtree: its node (and hash) is
    taken as is instead of being recomputed, since a leaf's hash does not depend on its depth.
    """
    if not entries:
        return None
    if len(entries) == 1:
        path, key, value = entries[0]
        if reuse is not None and path == reuse.path and value is reuse.value:
            return reuse
        return _Leaf(path, key, value, hasher)
    if depth >= PATH_BITS:  # two keys with one BLAKE2b-256 hash: not going to happen
        raise LocalProtocolError("two keys share a 256-bit path")
    i = _split(entries, depth)
    return _join(_build(entries[:i], depth + 1, hasher, reuse),
                 _build(entries[i:], depth + 1, hasher, reuse), hasher)


def _update(node: _Node, depth: int, changes: list[_Change], hasher: Hasher) -> _Node:
    """Apply ``changes`` (sorted by distinct path, all below this node's position)."""
    if not changes:
        return node
    if node is None:
        return _build([(p, k, v) for p, k, v in changes if v is not None], depth, hasher)
    if isinstance(node, _Leaf):
        entries: list[_Entry] = []
        keep: _Leaf | None = node
        for p, k, v in changes:
            if p == node.path:
                if v is not None and v == node.value:
                    continue  # rewriting the same value: the leaf stays as it is
                keep = None
            if v is not None:
                entries.append((p, k, v))
        if keep is not None:
            if not entries:
                return node  # nothing but deletions of absent keys
            entries.append((node.path, node.key, node.value))
            entries.sort(key=lambda e: e[0])
        return _build(entries, depth, hasher, keep)
    i = _split(changes, depth)
    left = _update(node.left, depth + 1, changes[:i], hasher)
    right = _update(node.right, depth + 1, changes[i:], hasher)
    if left is node.left and right is node.right:
        return node
    return _join(left, right, hasher)


def _check_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise LocalProtocolError(f"SMT {what} must be bytes, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------- proofs


@dataclass(frozen=True, slots=True)
class Proof:
    """Sibling hashes from the root down, and what the key's path ends at.

    ``leaf`` is ``None`` when the path ends in an empty subtree, else the ``(path, value
    hash)`` of the leaf found there (the key's own leaf for inclusion, another key's leaf for
    exclusion).

    Wire form: ``[[sibling, ...], None | [leaf_path, leaf_value_hash]]``, each hash 32 bytes,
    at most 256 siblings, root-most sibling first.
    """

    siblings: tuple[bytes, ...]
    leaf: tuple[bytes, bytes] | None

    def to_wire(self) -> list[Any]:
        return [list(self.siblings), None if self.leaf is None else list(self.leaf)]

    @classmethod
    def from_wire(cls, obj: Any) -> Proof:
        """Validate an untrusted proof. Raises :class:`MalformedFrame` on a bad shape."""
        if not isinstance(obj, list) or len(obj) != 2:
            raise MalformedFrame("proof: expected [siblings, leaf]")
        sibs, leaf = obj
        if not isinstance(sibs, list) or len(sibs) > MAX_SIBLINGS:
            raise MalformedFrame(f"proof: siblings must be a list of at most {MAX_SIBLINGS}")
        for s in sibs:
            if not isinstance(s, bytes) or len(s) != HASH_SIZE:
                raise MalformedFrame("proof: sibling must be a 32-byte hash")
        if leaf is None:
            return cls(tuple(sibs), None)
        if (not isinstance(leaf, list) or len(leaf) != 2
                or not all(isinstance(x, bytes) and len(x) == HASH_SIZE for x in leaf)):
            raise MalformedFrame("proof: leaf must be None or [path, value_hash] of 32 bytes each")
        return cls(tuple(sibs), (leaf[0], leaf[1]))


def verify_proof(root: bytes, key: bytes, value: bytes | None, proof: Proof) -> None:
    """Check that under ``root`` the entry for ``key`` is ``value`` (``None``: absent).

    Raises :class:`VerificationError` if the proof does not show exactly that: a wrong value,
    a present key claimed absent, an absent key claimed present, or any tampered hash.
    """
    path = hash_bytes(key)
    n = len(proof.siblings)
    if n > MAX_SIBLINGS:
        raise VerificationError("proof has too many siblings")
    if proof.leaf is None:
        if value is not None:
            raise VerificationError("proof shows the key absent, a value was claimed")
        node_hash = EMPTY_ROOT
    else:
        leaf_path, value_hash = proof.leaf
        if len(leaf_path) != HASH_SIZE or len(value_hash) != HASH_SIZE:
            raise VerificationError("proof leaf has a malformed hash")
        if value is None:
            if leaf_path == path:
                raise VerificationError("proof shows the key present, absence was claimed")
        else:
            if leaf_path != path:
                raise VerificationError("proof ends at another key's leaf, a value was claimed")
            if hash_bytes(value) != value_hash:
                raise VerificationError("proof is for a different value")
        # An honest tree only holds a leaf where its own path leads; refuse anything else.
        if not _same_prefix(leaf_path, path, n):
            raise VerificationError("proof leaf is not on the key's path")
        node_hash = hash_bytes(LEAF_TAG + leaf_path + value_hash)
    for depth in range(n - 1, -1, -1):
        sibling = proof.siblings[depth]
        if len(sibling) != HASH_SIZE:
            raise VerificationError("proof has a malformed sibling")
        if _bit(path, depth):
            node_hash = hash_bytes(INNER_TAG + sibling + node_hash)
        else:
            node_hash = hash_bytes(INNER_TAG + node_hash + sibling)
    if node_hash != root:
        raise VerificationError("proof does not lead to the state root")


# ---------------------------------------------------------------------------- the map


class SMT:
    """An immutable authenticated map from bytes to bytes.

    Build with :meth:`empty` or :meth:`from_items`; :meth:`update` returns a new tree that
    shares every untouched node with this one. ``hasher`` (default BLAKE2b-256) exists so
    tests can count hash computations; it must compute :func:`ledger.codec.hash_bytes`.
    """

    __slots__ = ("_root", "_hasher")

    def __init__(self, root: _Node, hasher: Hasher) -> None:  # internal: use empty/from_items
        self._root = root
        self._hasher = hasher

    @classmethod
    def empty(cls, *, hasher: Hasher = hash_bytes) -> SMT:
        return cls(None, hasher)

    @classmethod
    def from_items(cls, items: Iterable[tuple[bytes, bytes]], *,
                   hasher: Hasher = hash_bytes) -> SMT:
        """A tree holding ``items``; for a key given twice the last value wins.

        Raises :class:`LocalProtocolError` if a key or value is not bytes.
        """
        by_path: dict[bytes, _Entry] = {}
        for key, value in items:
            _check_bytes(key, "key")
            _check_bytes(value, "value")
            path = hash_bytes(key)
            by_path[path] = (path, key, value)
        entries = sorted(by_path.values(), key=lambda e: e[0])
        return cls(_build(entries, 0, hasher), hasher)

    @property
    def root(self) -> bytes:
        """The 32-byte root hash; :data:`EMPTY_ROOT` for an empty tree."""
        return EMPTY_ROOT if self._root is None else self._root.hash

    def __len__(self) -> int:
        return 0 if self._root is None else self._root.size

    def _find(self, path: bytes) -> tuple[list[bytes], _Leaf | None]:
        siblings: list[bytes] = []
        node = self._root
        depth = 0
        while isinstance(node, _Inner):
            inner = node
            if _bit(path, depth):
                other, node = inner.left, inner.right
            else:
                node, other = inner.left, inner.right
            siblings.append(EMPTY_ROOT if other is None else other.hash)
            depth += 1
        return siblings, node

    def get(self, key: bytes) -> bytes | None:
        path = hash_bytes(_check_bytes(key, "key"))
        # _find without collecting siblings, testing bits of the path as one integer: reads
        # are the ledger's hot path (several per tx at admission and execution).
        bits = int.from_bytes(path, "big")
        shift = PATH_BITS - 1
        node = self._root
        while isinstance(node, _Inner):
            node = node.right if (bits >> shift) & 1 else node.left
            shift -= 1
        if node is not None and node.path == path:
            return node.value
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def update(self, changes: Mapping[bytes, bytes | None]) -> SMT:
        """A new tree with ``changes`` applied (``None`` deletes; deleting an absent key is a
        no-op). Only nodes on the changed keys' paths are rebuilt.

        Raises :class:`LocalProtocolError` if a key or value has the wrong type.
        """
        pending: list[_Change] = []
        for key, value in changes.items():
            _check_bytes(key, "key")
            if value is not None:
                _check_bytes(value, "value")
            pending.append((hash_bytes(key), key, value))
        pending.sort(key=lambda c: c[0])
        root = _update(self._root, 0, pending, self._hasher)
        if root is self._root:
            return self
        return SMT(root, self._hasher)

    def prove(self, key: bytes) -> Proof:
        """A proof of the key's value, or of its absence; check it with :func:`verify_proof`."""
        path = hash_bytes(_check_bytes(key, "key"))
        siblings, leaf = self._find(path)
        return Proof(tuple(siblings), None if leaf is None else (leaf.path, leaf.value_hash))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every ``(key, value)``, in the order of the keys' hashes."""
        stack: list[_Node] = [self._root]
        while stack:
            node = stack.pop()
            if isinstance(node, _Leaf):
                yield node.key, node.value
            elif isinstance(node, _Inner):
                stack.append(node.right)
                stack.append(node.left)

    def depth(self) -> int:
        """Length of the longest root-to-leaf path (0 for an empty or single-entry tree)."""
        best = 0
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, d = stack.pop()
            if isinstance(node, _Inner):
                stack.append((node.left, d + 1))
                stack.append((node.right, d + 1))
            elif node is not None:
                best = max(best, d)
        return best

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SMT) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"SMT(root={self.root.hex()}, len={len(self)})"
