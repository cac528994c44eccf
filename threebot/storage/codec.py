"""The storage codec: pure, sans-IO. Bytes in, bytes out; randomness is passed in.

Pipeline of one object (design section 5, issue 4)::

    plaintext --segments of S bytes--> AES-256-GCM per segment (random key per object, nonce =
    segment index) --zfec k-of-n per segment--> shard i = block i of every segment, in order,
    stored as one shard-store object on one node --> per shard a Merkle tree over its blocks
    (leaf = hash of one block), its leaves stored in hash pages next to the shard, the page
    roots in the manifest; a reader checks every block it receives against its leaf, so a bad
    block is pinpointed (shard, segment) and that shard's node is dropped.

The manifest (sizes, coding parameters, codec and cipher ids, page roots of every shard,
placement) is encrypted with a key derived from the verify key and itself erasure-coded k-of-n,
one manifest shard per node of the object.

Choice of AEAD, measured on this machine (2-core Intel Xeon with AES-NI, Python 3.11,
cryptography 50, PyNaCl 1.6, one core, 1 MiB messages)::

    XChaCha20-Poly1305 (PyNaCl)           0.59 GB/s
    ChaCha20-Poly1305 (cryptography)      2.7  GB/s
    AES-256-GCM (cryptography, AES-NI)    6.8-7.7 GB/s
    BLAKE2b-256 (hashlib)                 0.62-0.72 GB/s
    BLAKE3-256 (blake3 package)           3.4-3.6 GB/s
    zfec 16-of-20 encode, 1 MiB segment   0.45 GB/s  (4 MiB: 0.25; 256 KiB: 0.44)
    the same with our _gf kernel          7.7 GB/s GFNI, 4.0 AVX2, 0.38 scalar (zfec: 0.28 that day)
    zfec decode, 4 primary blocks lost    0.40 GB/s  (4 MiB: 0.23)
    the same with our _gf kernel          8.5 GB/s GFNI, 5.9 AVX2, 0.4 scalar (1 MiB)

XChaCha20 would cost more than the erasure code itself; AES-256-GCM is ~15x faster and all but
free next to zfec and the block hashes, so it is the cipher (the issue wins over the design's
XChaCha20 here). The code is zfec's, but its arithmetic runs in our _gf kernel with zfec's own
matrices (see :class:`ErasureCoder`), so coding now costs about as little as AES. AES-GCM's
96-bit nonce is safe with a counter because every object has a fresh random key and a
segment is encrypted once; manifests are re-encrypted on repair, so they use
random nonces instead. Segment size 1 MiB: zfec is fastest at 256 KiB-1 MiB (beyond, its
tables fall out of cache); 1 MiB segments give 64 KiB blocks, so one 1 MiB shard-store frame
moves 16 blocks and a 1 GiB object has 1024 leaves per shard (one 32 KiB hash page).

Block hashes (Merkle leaves and nodes) are BLAKE3-256 (format version 2; version 1 used
BLAKE2b): every byte of every block is hashed once by the writer and once by each reader, and at
BLAKE2b's speed those hashes cost more CPU than AES and half as much as zfec; BLAKE3 is ~5x
cheaper. A full segment's ciphertext (S + 16 bytes) divides by k=16 exactly, so its blocks are
views into the ciphertext, never copies.

Keys (BLAKE2b keyed, personalised "tfgrid/storage/1")::

    read key (32 random bytes, in the read capability)
      |-- data key     = KDF(read key, "data")      encrypts segments; only readers have it
      `-- verify key   = KDF(read key, "verify")    (in the verify capability)
            |-- manifest key  = KDF(verify key, "manifest")
            `-- storage index = KDF(verify key, "index")   names every stored record

A verify-capability holder can fetch and decrypt the manifest, check every block against the
Merkle roots, decode ciphertext segments and re-encode lost blocks (repair works on ciphertext),
but never holds the data key. Nodes see only record ids, which are keyed hashes of the storage
index: without a capability they can neither link records of one object nor guess ids.

Capabilities: ``tfs:`` (read) or ``tfsv:`` (verify) + lower-case unpadded base32 of
``version (1) | owner twin id (u64 BE) | key (32) | checksum (4)``; the checksum (BLAKE2b over
prefix and body) catches typos and a verify cap pasted with a read prefix. The owner twin id
locates the manifest: its shards live on the owner's namespace contracts under
``manifest_id(storage index, namespace id)``, so a reader finds them from the ledger alone and
repair can move them without invalidating the capability.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import struct
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import blake3
import zfec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.codec import HASH_SIZE, pack, unpack
from ledger.errors import MalformedFrame, TfgridError
from threebot.storage.errors import (
    AuthenticationFailed,
    BadCapability,
    BadManifest,
    BadParameters,
    CorruptRecord,
    NotEnoughShards,
)

try:
    from threebot.storage import _gf
except ImportError as exc:  # a checkout whose C extension was never built (or is stale)
    raise ImportError(
        "threebot.storage._gf, the storage codec's C extension, is not built: run "
        "./scripts/bootstrap.sh (or pip install -e .) in the tfgrid checkout") from exc

FORMAT_VERSION = 2
CIPHER_ID = "aes-256-gcm"
CODEC_ID = "zfec"
KEY_SIZE = 32
TAG_SIZE = 16
NONCE_SIZE = 12
HASH_BYTES = HASH_SIZE
DEFAULT_K = 16
DEFAULT_N = 20
DEFAULT_SEGMENT_SIZE = 1 << 20
DEFAULT_LEAVES_PER_PAGE = 16_384  # 512 KiB of leaf hashes; one page covers 16 GiB per shard
MAX_SEGMENT_SIZE = 64 << 20
MAX_RECORD = 16 << 20  # no record we write is larger; decoding refuses more

READ_PREFIX = "tfs:"
VERIFY_PREFIX = "tfsv:"
_CAP_VERSION = 1
_CHECKSUM_SIZE = 4
_PERSON = b"tfgrid/storage/1"
_U64 = struct.Struct(">Q")
_SEGMENT_AAD = b"tfgrid/storage/segment/v1"
_MANIFEST_AAD = b"tfgrid/storage/manifest/v1"
_LEAF = b"\x00"
_NODE = b"\x01"
_PAD_HASH = b"\x00" * HASH_SIZE
_DECODE_ROWS_CACHED = 32  # decode matrices kept per ErasureCoder (one per set of blocks used)

# A block or segment in flight: bytes, or a view into a bigger buffer (never copied to slice).
Block = bytes | memoryview


def _kdf(key: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(label, key=key, digest_size=KEY_SIZE, person=_PERSON).digest()


def _u64(value: int) -> bytes:
    return _U64.pack(value)


# -- parameters ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Params:
    """Coding parameters of one object (recorded in its manifest).

    Raises :class:`BadParameters` when a value is out of range.
    """

    k: int = DEFAULT_K
    n: int = DEFAULT_N
    segment_size: int = DEFAULT_SEGMENT_SIZE
    leaves_per_page: int = DEFAULT_LEAVES_PER_PAGE

    def __post_init__(self) -> None:
        for name in ("k", "n", "segment_size", "leaves_per_page"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadParameters(f"{name} must be an integer")
        if not 1 <= self.k <= self.n <= 256:
            raise BadParameters(f"need 1 <= k <= n <= 256, got k={self.k} n={self.n}")
        if not 1 <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise BadParameters(f"segment size {self.segment_size} outside 1..{MAX_SEGMENT_SIZE}")
        if not 1 <= self.leaves_per_page <= 65_536:
            raise BadParameters(f"leaves per page {self.leaves_per_page} outside 1..65536")

    # Geometry. An object always has at least one segment: the empty object is one segment
    # of zero plaintext bytes (its ciphertext is the 16-byte tag), so every object, the empty
    # one included, needs k good shards to be read.

    def segment_count(self, size: int) -> int:
        return max(1, -(-size // self.segment_size))

    def segment_span(self, size: int, index: int) -> tuple[int, int]:
        """(offset, length) of segment ``index`` in the plaintext."""
        offset = index * self.segment_size
        return offset, max(0, min(self.segment_size, size - offset))

    def cipher_len(self, size: int, index: int) -> int:
        return self.segment_span(size, index)[1] + TAG_SIZE

    def block_size(self, size: int, index: int) -> int:
        return -(-self.cipher_len(size, index) // self.k)

    def block_offset(self, size: int, index: int) -> int:
        """Where the block of segment ``index`` starts in a shard (all blocks but the last
        segment's have the size of segment 0's)."""
        return index * self.block_size(size, 0)

    def segment_at(self, size: int, offset: int) -> int:
        """The segment whose block covers shard byte ``offset``."""
        return min(offset // self.block_size(size, 0), self.segment_count(size) - 1)

    def page_count(self, size: int) -> int:
        return -(-self.segment_count(size) // self.leaves_per_page)

    def page_segments(self, size: int, page: int) -> range:
        first = page * self.leaves_per_page
        return range(first, min(first + self.leaves_per_page, self.segment_count(size)))

    def shard_bytes(self, size: int) -> int:
        """Bytes of one shard (the concatenation of its blocks)."""
        last = self.segment_count(size) - 1
        total = last * self.block_size(size, 0)
        return total + self.block_size(size, last)


# -- keys and capabilities -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectKeys:
    """The keys of one object; ``data_key`` is None when built from a verify key."""

    verify_key: bytes
    manifest_key: bytes
    storage_index: bytes
    data_key: bytes | None = None

    @classmethod
    def from_read_key(cls, read_key: bytes) -> ObjectKeys:
        _check_key(read_key)
        verify_key = _kdf(read_key, b"verify")
        base = cls.from_verify_key(verify_key)
        return replace(base, data_key=_kdf(read_key, b"data"))

    @classmethod
    def from_verify_key(cls, verify_key: bytes) -> ObjectKeys:
        _check_key(verify_key)
        return cls(
            verify_key=verify_key,
            manifest_key=_kdf(verify_key, b"manifest"),
            storage_index=_kdf(verify_key, b"index"),
        )

    def require_data_key(self) -> bytes:
        """The data key. Raises :class:`BadCapability` for verify-only keys."""
        if self.data_key is None:
            raise BadCapability("a verify capability cannot decrypt; a read capability is needed")
        return self.data_key


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise BadCapability(f"a key must be {KEY_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class ReadCap:
    """Grants reading (and checking, repairing) one object of twin ``owner``."""

    owner: int
    read_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_owner(self.owner)
        _check_key(self.read_key)

    def __str__(self) -> str:
        return _cap_string(READ_PREFIX, self.owner, self.read_key)

    def keys(self) -> ObjectKeys:
        return ObjectKeys.from_read_key(self.read_key)

    def verify_cap(self) -> VerifyCap:
        return VerifyCap(self.owner, self.keys().verify_key)


@dataclass(frozen=True, slots=True)
class VerifyCap:
    """Grants checking and repairing, never decrypting, one object of twin ``owner``."""

    owner: int
    verify_key: bytes

    def __post_init__(self) -> None:
        _check_owner(self.owner)
        _check_key(self.verify_key)

    def __str__(self) -> str:
        return _cap_string(VERIFY_PREFIX, self.owner, self.verify_key)

    def keys(self) -> ObjectKeys:
        return ObjectKeys.from_verify_key(self.verify_key)

    def verify_cap(self) -> VerifyCap:
        return self


Capability = ReadCap | VerifyCap


def _check_owner(owner: int) -> None:
    if not isinstance(owner, int) or isinstance(owner, bool) or not 0 <= owner < 2**63:
        raise BadCapability("the owner twin id must be an integer in 0..2^63-1")


def _checksum(prefix: str, body: bytes) -> bytes:
    return hashlib.blake2b(prefix.encode() + body, digest_size=_CHECKSUM_SIZE, person=_PERSON).digest()


def _cap_string(prefix: str, owner: int, key: bytes) -> str:
    body = bytes([_CAP_VERSION]) + _u64(owner) + key
    raw = body + _checksum(prefix, body)
    return prefix + base64.b32encode(raw).decode().rstrip("=").lower()


def new_read_cap(owner: int, random_bytes: bytes) -> ReadCap:
    """A read capability for a new object of ``owner``; ``random_bytes`` is 32 fresh random
    bytes (passed in: the caller owns the randomness)."""
    return ReadCap(owner, random_bytes)


def parse_cap(text: str) -> Capability:
    """Parse a ``tfs:`` or ``tfsv:`` string. Raises :class:`BadCapability` naming the defect."""
    if not isinstance(text, str):
        raise BadCapability("a capability is a string")
    text = text.strip()
    if text.startswith(VERIFY_PREFIX):
        prefix = VERIFY_PREFIX
    elif text.startswith(READ_PREFIX):
        prefix = READ_PREFIX
    else:
        raise BadCapability(f"a capability starts with {READ_PREFIX!r} or {VERIFY_PREFIX!r}")
    encoded = text[len(prefix):].upper()
    try:
        raw = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
    except (binascii.Error, ValueError):
        raise BadCapability("the capability is not valid base32 (a character was mistyped?)") from None
    expected = 1 + 8 + KEY_SIZE + _CHECKSUM_SIZE
    if len(raw) != expected:
        raise BadCapability(f"the capability holds {len(raw)} bytes, expected {expected} (truncated?)")
    body, check = raw[:-_CHECKSUM_SIZE], raw[-_CHECKSUM_SIZE:]
    if _checksum(prefix, body) != check:
        raise BadCapability("the capability's checksum does not match (mistyped or truncated)")
    if body[0] != _CAP_VERSION:
        raise BadCapability(f"unsupported capability version {body[0]}")
    (owner,) = _U64.unpack_from(body, 1)
    key = body[9:]
    if owner >= 2**63:
        raise BadCapability("the owner twin id is out of range")
    return ReadCap(owner, key) if prefix == READ_PREFIX else VerifyCap(owner, key)


def parse_read_cap(text: str) -> ReadCap:
    """Like :func:`parse_cap` but refuses a verify capability."""
    cap = parse_cap(text)
    if not isinstance(cap, ReadCap):
        raise BadCapability("this is a verify capability; reading needs the read capability (tfs:)")
    return cap


# -- record ids ----------------------------------------------------------------------------


def _record_id(storage_index: bytes, what: list[Any]) -> bytes:
    return hashlib.blake2b(pack(what), key=storage_index, digest_size=HASH_SIZE, person=_PERSON).digest()


def shard_id(storage_index: bytes, shard: int) -> bytes:
    """Shard-store id of shard ``shard`` (the same on whichever node holds it)."""
    return _record_id(storage_index, ["shard", shard])


def page_id(storage_index: bytes, shard: int, page: int) -> bytes:
    """Shard-store id of hash page ``page`` of shard ``shard``."""
    return _record_id(storage_index, ["page", shard, page])


def manifest_id(storage_index: bytes, namespace: int) -> bytes:
    """Shard-store id of the manifest shard kept in namespace contract ``namespace``.

    Keyed by namespace rather than by shard index: a reader that knows only the owner's
    namespaces asks each for exactly one id, wherever repair has moved the shards.
    """
    return _record_id(storage_index, ["manifest", namespace])


# -- encryption ----------------------------------------------------------------------------


class SegmentCipher:
    """AES-256-GCM over the segments of one object (``count`` segments in all).

    The nonce is the segment index; the associated data binds the segment count too, so a
    truncated or reordered object fails authentication. Thread-safe (no mutable state).
    """

    def __init__(self, data_key: bytes, count: int) -> None:
        _check_key(data_key)
        self._aead = AESGCM(data_key)
        self._count = count

    def _nonce_aad(self, index: int) -> tuple[bytes, bytes]:
        if not 0 <= index < self._count:
            raise CorruptRecord(f"segment {index} outside 0..{self._count - 1}")
        return b"\x00" * 4 + _u64(index), _SEGMENT_AAD + _u64(self._count) + _u64(index)

    def encrypt(self, index: int, plaintext: Block) -> bytes:
        nonce, aad = self._nonce_aad(index)
        return self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, index: int, ciphertext: Block) -> bytes:
        """Raises :class:`AuthenticationFailed` for a wrong key or altered ciphertext."""
        nonce, aad = self._nonce_aad(index)
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise AuthenticationFailed(
                f"segment {index} does not authenticate (wrong key or altered data)"
            ) from None

    def decrypt_into(self, index: int, ciphertext: Block, out: memoryview) -> None:
        """:meth:`decrypt` into ``out`` (exactly ``len(ciphertext) - TAG_SIZE`` bytes), with no
        allocation. When it raises, ``out`` holds garbage: the caller must not use it."""
        if len(ciphertext) < TAG_SIZE or len(out) != len(ciphertext) - TAG_SIZE:
            raise CorruptRecord(f"segment {index}: {len(ciphertext)} bytes of ciphertext for "
                                f"{len(out)} of plaintext")
        nonce, aad = self._nonce_aad(index)
        try:
            self._aead.decrypt_into(nonce, ciphertext, aad, out)
        except InvalidTag:
            raise AuthenticationFailed(
                f"segment {index} does not authenticate (wrong key or altered data)"
            ) from None


# -- erasure coding --------------------------------------------------------------------------


def _unit_blocks(k: int) -> tuple[bytes, ...]:
    """``k`` blocks of ``k`` bytes, block ``j`` the unit vector e_j: coded or decoded by zfec,
    they give the rows of its matrices (see :class:`ErasureCoder`)."""
    return tuple(bytes(j) + b"\x01" + bytes(k - j - 1) for j in range(k))


class ErasureCoder:
    """zfec ``k``-of-``n`` over byte strings of a known length (the one wrapper of zfec): zfec's
    code, computed by :mod:`threebot.storage._gf` from the matrices zfec gives (parity rows
    once, decode rows per set of blocks), byte for byte what zfec computes.

    zfec's encoder and decoder keep only read-only tables after construction and release the
    GIL while coding, as does :mod:`threebot.storage._gf`; the cache of decode matrices is
    guarded by a lock. So one instance may be used from several worker threads at once.
    """

    def __init__(self, k: int, n: int) -> None:
        Params(k=k, n=n)  # range check
        self.k = k
        self.n = n
        self._encoder = zfec.Encoder(k, n)
        self._decoder = zfec.Decoder(k, n)
        # Rows k..n-1 of zfec's encoding matrix, asked of zfec once. Encoding is linear: with
        # primary block j the k-byte unit vector e_j, byte p of parity block r is the
        # coefficient of primary p in r.
        parity = self._encoder.encode(_unit_blocks(k), tuple(range(k, n)))
        self._parity_rows = tuple(bytes(b) for b in parity)
        self._rows: dict[tuple[int, ...], bytes] = {}  # _decode_rows' cache, oldest first
        self._rows_lock = threading.Lock()

    def _primary(self, data: Block) -> tuple[Block, ...]:
        size = -(-len(data) // self.k) if data else 1
        if size * self.k != len(data):  # only a short last segment (or the empty one) is padded
            data = bytes(data) + b"\x00" * (size * self.k - len(data))
        view = memoryview(data)
        return tuple(view[i * size:(i + 1) * size] for i in range(self.k))

    def encode(self, data: Block) -> list[Block]:
        """All ``n`` blocks of ``data`` (each ``ceil(len/k)`` bytes). The primary blocks are
        views into ``data`` (or into its padded copy), not copies; the parity blocks are views
        into one new buffer.

        The parity is zfec's, byte for byte, computed by :mod:`threebot.storage._gf` from
        zfec's own encoding matrix: 16-of-20 on 1 MiB segments, 7.7 GB/s (GFNI) or 4.0 (AVX2)
        against zfec's 0.28 on one core of this machine. zfec stays the reference the tests
        hold it to, and what the matrices are asked of."""
        return self._encode(self._primary(data), range(self.n))

    def encode_some(self, data: Block, wanted: Sequence[int]) -> list[Block]:
        """Blocks ``wanted`` only (used by repair to regenerate lost blocks)."""
        for i in wanted:
            if not 0 <= i < self.n:
                raise BadParameters(f"block number {i} outside 0..{self.n - 1}")
        return self._encode(self._primary(data), wanted)

    def _encode(self, primary: tuple[Block, ...], wanted: Sequence[int]) -> list[Block]:
        k = self.k
        parity = [i for i in wanted if i >= k]
        made: dict[int, Block] = {}
        if parity:
            size = len(primary[0])
            view = memoryview(bytearray(len(parity) * size))
            outs = [view[j * size:(j + 1) * size] for j in range(len(parity))]
            _gf.combine(b"".join(self._parity_rows[i - k] for i in parity), primary, outs)
            made = dict(zip(parity, outs, strict=True))
        return [primary[i] if i < k else made[i] for i in wanted]

    def decode(self, blocks: Mapping[int, Block], length: int) -> Block:
        """The ``length`` bytes that the blocks came from; any ``k`` distinct blocks will do.

        With every primary block at hand they are joined into ``bytes``. Otherwise the missing
        primaries are rebuilt by :mod:`threebot.storage._gf` straight into one buffer for the
        whole segment, and a memoryview of its first ``length`` bytes is returned (no copy).

        Raises :class:`NotEnoughShards` with fewer than ``k`` blocks and
        :class:`CorruptRecord` when block sizes disagree with ``length``.
        """
        k = self.k
        size = -(-length // k) if length else 1
        usable = sorted(i for i in blocks if 0 <= i < self.n)
        if len(usable) < k:
            raise NotEnoughShards("shards", k, len(usable))
        # Primary blocks first: a present primary is its own slice of the data.
        chosen = tuple(usable[:k])
        for i in chosen:
            if len(blocks[i]) != size:
                raise CorruptRecord(f"block {i} is {len(blocks[i])} bytes, expected {size}")
        if chosen[-1] < k:
            joined = b"".join(blocks[i] for i in chosen)
            return joined if len(joined) == length else joined[:length]
        present = set(chosen)
        missing = [i for i in range(k) if i not in present]
        zeros = bytes(size)
        # One pass writes the present primaries into place; _gf overwrites the zeros.
        whole = bytearray().join(blocks[i] if i in present else zeros for i in range(k))
        view = memoryview(whole)
        _gf.combine(
            self._decode_rows(chosen, missing),
            [blocks[i] for i in chosen],
            [view[i * size:(i + 1) * size] for i in missing],
        )
        return view[:length]

    def _decode_rows(self, chosen: tuple[int, ...], missing: Sequence[int]) -> bytes:
        """Rows ``missing`` of the decode matrix for blocks ``chosen`` (cached), asked of zfec:
        decoding is linear, so with block ``chosen[j]`` set to the unit vector e_j the
        rebuilt primary ``i`` is row ``i`` of the matrix."""
        with self._rows_lock:
            rows = self._rows.get(chosen)
            if rows is None:
                rebuilt = self._decoder.decode(_unit_blocks(self.k), chosen)
                rows = b"".join(bytes(rebuilt[i]) for i in missing)
                if len(self._rows) >= _DECODE_ROWS_CACHED:
                    del self._rows[next(iter(self._rows))]
                self._rows[chosen] = rows
            return rows


# -- Merkle trees ----------------------------------------------------------------------------
#
# leaf = H(0x00 || block); node = H(0x01 || left || right); a level of odd length is padded
# with 32 zero bytes. Separate leaf and node prefixes keep a block from posing as a subtree.


def leaf_hash(block: Block) -> bytes:
    """BLAKE3-256 of 0x00 || block (no copy of ``block``; the GIL is released for big ones)."""
    h = blake3.blake3(_LEAF)
    h.update(block)
    return h.digest(HASH_SIZE)


def _node_hash(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(_NODE + left + right).digest(HASH_SIZE)


def _next_level(level: Sequence[bytes]) -> list[bytes]:
    padded = list(level) + ([_PAD_HASH] if len(level) % 2 else [])
    return [_node_hash(padded[i], padded[i + 1]) for i in range(0, len(padded), 2)]


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root of the tree over ``leaves`` (at least one)."""
    if not leaves:
        raise BadParameters("a Merkle tree needs at least one leaf")
    level = list(leaves)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes from leaf ``index`` up to the root."""
    if not 0 <= index < len(leaves):
        raise BadParameters(f"leaf {index} outside 0..{len(leaves) - 1}")
    proof: list[bytes] = []
    level = list(leaves)
    while len(level) > 1:
        sibling = index ^ 1
        proof.append(level[sibling] if sibling < len(level) else _PAD_HASH)
        level = _next_level(level)
        index //= 2
    return proof


def verify_proof(root: bytes, leaf: bytes, index: int, count: int, proof: Sequence[bytes]) -> bool:
    """Whether ``leaf`` is leaf ``index`` of a ``count``-leaf tree with ``root``."""
    if not 0 <= index < count:
        return False
    depth = 0 if count == 1 else math.ceil(math.log2(count))
    if len(proof) != depth:
        return False
    h = leaf
    for sibling in proof:
        h = _node_hash(h, sibling) if index % 2 == 0 else _node_hash(sibling, h)
        index //= 2
    return h == root


# -- stored records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedSegment:
    """One segment after encryption and coding: ``blocks[i]`` goes to shard ``i``."""

    index: int
    blocks: tuple[Block, ...]  # primary blocks are views into the segment's ciphertext
    leaves: tuple[bytes, ...]


def encode_segment(
    cipher: SegmentCipher, coder: ErasureCoder, index: int, plaintext: Block
) -> EncodedSegment:
    """Encrypt, code and hash one segment (CPU-heavy: run it in a worker thread)."""
    blocks = tuple(coder.encode(cipher.encrypt(index, plaintext)))
    return EncodedSegment(index, blocks, tuple(leaf_hash(b) for b in blocks))


def decode_segment(
    cipher: SegmentCipher, coder: ErasureCoder, params: Params, size: int, index: int,
    blocks: Mapping[int, Block],
) -> bytes:
    """Plaintext of segment ``index`` from ``k`` verified blocks (CPU-heavy)."""
    return cipher.decrypt(index, coder.decode(blocks, params.cipher_len(size, index)))


def decode_segment_into(
    cipher: SegmentCipher, coder: ErasureCoder, params: Params, size: int, index: int,
    blocks: Mapping[int, Block], out: memoryview,
) -> None:
    """:func:`decode_segment` into ``out`` (the segment's plaintext length), as a get writes
    it: straight into the buffer it is written to disk from, with no 1 MiB allocation per
    segment (fresh memory page-faults on this VM)."""
    cipher.decrypt_into(index, coder.decode(blocks, params.cipher_len(size, index)), out)


@dataclass(frozen=True, slots=True)
class PageRecord:
    """Hash page ``page`` of shard ``shard``: stored next to the shard as its own object."""

    shard: int
    page: int
    data: bytes


class ShardHasher:
    """Collects every shard's leaves as segments are encoded (fed in segment order) and hands
    back each hash page as soon as it is complete; holds at most one page of leaves per shard,
    so memory stays bounded for objects of any size."""

    def __init__(self, params: Params, size: int) -> None:
        self._p = params
        self._count = params.segment_count(size)
        self._next = 0
        self._leaves: list[list[bytes]] = [[] for _ in range(params.n)]
        self._roots: list[list[bytes]] = [[] for _ in range(params.n)]

    def add(self, seg: EncodedSegment) -> list[PageRecord]:
        """Take the next segment's leaves; return the page records it completed."""
        if seg.index != self._next or seg.index >= self._count:
            raise BadParameters(f"segment {seg.index} out of order (expected {self._next})")
        if len(seg.leaves) != self._p.n:
            raise BadParameters("an encoded segment must carry n leaves")
        self._next += 1
        for i in range(self._p.n):
            self._leaves[i].append(seg.leaves[i])
        if self._next != self._count and self._next % self._p.leaves_per_page:
            return []
        page = seg.index // self._p.leaves_per_page
        out = []
        for i in range(self._p.n):
            leaves, self._leaves[i] = self._leaves[i], []
            self._roots[i].append(merkle_root(leaves))
            out.append(PageRecord(i, page, pack_page(i, page, leaves)))
        return out

    @property
    def done(self) -> bool:
        return self._next == self._count

    def page_roots(self) -> tuple[tuple[bytes, ...], ...]:
        """Per shard, the roots of its hash pages. Only once every segment was added."""
        if not self.done:
            raise BadParameters(f"{self._count - self._next} segments not yet added")
        return tuple(tuple(r) for r in self._roots)


def pack_page(shard: int, page: int, leaves: Sequence[bytes]) -> bytes:
    return pack({"v": FORMAT_VERSION, "t": "page", "shard": shard, "page": page,
                 "leaves": b"".join(leaves)})


def open_page(data: bytes, params: Params, size: int, shard: int, page: int, root: bytes) -> list[bytes]:
    """The leaf hashes in a hash page, checked against the page root from the manifest.

    Raises :class:`CorruptRecord` when malformed, misplaced or not matching ``root``.
    """
    where = f"hash page {page} of shard {shard}"
    try:
        rec = unpack(data, max_size=MAX_RECORD)
    except MalformedFrame:
        raise CorruptRecord(f"{where} is not a valid record") from None
    if not isinstance(rec, dict) or rec.get("v") != FORMAT_VERSION or rec.get("t") != "page":
        raise CorruptRecord(f"{where} is not a version-{FORMAT_VERSION} page record")
    if rec.get("shard") != shard or rec.get("page") != page:
        raise CorruptRecord(f"{where} holds another record (misplaced)")
    raw = rec.get("leaves")
    count = len(params.page_segments(size, page))
    if not isinstance(raw, bytes) or len(raw) != count * HASH_SIZE or count == 0:
        raise CorruptRecord(f"{where} holds the wrong number of leaves")
    leaves = [raw[j * HASH_SIZE:(j + 1) * HASH_SIZE] for j in range(count)]
    if merkle_root(leaves) != root:
        raise CorruptRecord(f"{where} does not match its Merkle root")
    return leaves


class BlockReader:
    """Sans-IO reader of one shard: cuts its byte stream into blocks and checks each block
    against its leaf, for segments ``first`` .. ``stop - 1``.

    Drive it with :meth:`next_range` (what to ask the store for), :meth:`page_needed` /
    :meth:`add_page` (the verified leaves of the page covering the next segment) and
    :meth:`feed` (the bytes received). A block that does not match its leaf raises
    :class:`CorruptRecord` whose ``blocks`` names that segment: the shard's node is lying or
    its disk rotted, and the caller drops it.
    """

    def __init__(self, params: Params, size: int, shard: int, first: int = 0, stop: int | None = None) -> None:
        count = params.segment_count(size)
        stop = count if stop is None else stop
        if not 0 <= first <= stop <= count:
            raise BadParameters(f"segments {first}..{stop} outside 0..{count}")
        self._p = params
        self._size = size
        self.shard = shard
        self.next_segment = first
        self._stop = stop
        self._pieces: deque[memoryview] = deque()  # received, not yet cut into blocks
        self._buffered = 0
        self._requested = params.block_offset(size, first)
        self._end = params.block_offset(size, stop - 1) + params.block_size(size, stop - 1) if stop > first else self._requested
        self._page: int | None = None
        self._leaves: list[bytes] = []

    @property
    def done(self) -> bool:
        return self.next_segment >= self._stop

    @property
    def requested_to(self) -> int:
        """Shard offset up to which bytes have been asked for."""
        return self._requested

    def next_range(self, max_len: int) -> tuple[int, int] | None:
        """(offset, length) of the next bytes to fetch (marks them requested), or None."""
        if self._requested >= self._end:
            return None
        length = min(max_len, self._end - self._requested)
        offset = self._requested
        self._requested += length
        return offset, length

    def page_needed(self) -> int | None:
        """The hash page whose leaves must be added before the next block can be checked."""
        if self.done:
            return None
        page = self.next_segment // self._p.leaves_per_page
        return None if page == self._page else page

    def add_page(self, page: int, leaves: list[bytes]) -> None:
        """Leaves of ``page`` as returned by :func:`open_page` (the previous page is dropped)."""
        if len(leaves) != len(self._p.page_segments(self._size, page)):
            raise BadParameters(f"page {page} needs {len(self._p.page_segments(self._size, page))} leaves")
        self._page = page
        self._leaves = leaves

    def _cut(self, n: int) -> Block:
        """The next ``n`` buffered bytes: a view when they lie in one received piece (the
        usual case: reads are block-aligned), else joined once."""
        first = self._pieces[0]
        if len(first) >= n:
            block: Block = first[:n]
            if len(first) > n:
                self._pieces[0] = first[n:]
            else:
                self._pieces.popleft()
        else:
            parts: list[memoryview] = []
            need = n
            while need:
                piece = self._pieces[0]
                if len(piece) <= need:
                    parts.append(self._pieces.popleft())
                    need -= len(piece)
                else:
                    parts.append(piece[:need])
                    self._pieces[0] = piece[need:]
                    need = 0
            block = b"".join(parts)
        self._buffered -= n
        return block

    def feed(self, data: Block) -> list[tuple[int, Block]]:
        """Take the next received bytes; return the (segment, block) pairs completed and
        verified (blocks may be views into ``data``). Stops early at a page boundary until
        :meth:`add_page` is called (then call ``feed(b"")``). Raises :class:`CorruptRecord`
        on a bad block."""
        if data:
            self._pieces.append(memoryview(data).cast("B"))
            self._buffered += len(data)
        out: list[tuple[int, Block]] = []
        while not self.done and self.page_needed() is None:
            s = self.next_segment
            bs = self._p.block_size(self._size, s)
            if self._buffered < bs:
                break
            block = self._cut(bs)
            leaf = self._leaves[s - (self._page or 0) * self._p.leaves_per_page]
            if leaf_hash(block) != leaf:
                raise CorruptRecord(f"shard {self.shard}: the block of segment {s} does not match its hash", [s])
            self.next_segment += 1
            out.append((s, block))
        if self._buffered > (self._end - self._p.block_offset(self._size, self.next_segment) if not self.done else 0):
            raise CorruptRecord(f"shard {self.shard}: the store sent more bytes than were asked for")
        return out


# -- manifest --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a shard lives: node id, namespace contract id, and the endpoint last seen."""

    node: int
    ns: int
    endpoint: str = ""


@dataclass(frozen=True, slots=True)
class ShardEntry:
    index: int
    placement: Placement
    pages: tuple[bytes, ...]  # roots of the shard's hash pages


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a reader needs besides the capability. ``revision`` grows with every repair;
    ``retired`` lists older placements of shards that repair replaced but could not delete
    (their node was down), so that ``rm`` and later repairs still clean them up."""

    revision: int
    size: int
    params: Params
    shards: tuple[ShardEntry, ...]
    retired: tuple[tuple[int, Placement], ...] = ()
    codec: str = CODEC_ID
    cipher: str = CIPHER_ID

    def __post_init__(self) -> None:
        if not isinstance(self.revision, int) or self.revision < 1:
            raise BadManifest("revision must be a positive integer")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 0 <= self.size < 2**63:
            raise BadManifest("size must be a non-negative integer")
        if self.codec != CODEC_ID or self.cipher != CIPHER_ID:
            raise BadManifest(f"unsupported codec/cipher {self.codec}/{self.cipher}")
        if [s.index for s in self.shards] != list(range(self.params.n)):
            raise BadManifest("the manifest must list shards 0..n-1 in order")
        pages = self.params.page_count(self.size)
        for s in self.shards:
            if len(s.pages) != pages or any(len(r) != HASH_SIZE for r in s.pages):
                raise BadManifest(f"shard {s.index} needs {pages} page roots of {HASH_SIZE} bytes")
        nodes = [s.placement.node for s in self.shards]
        if len(set(nodes)) != len(nodes):
            raise BadManifest("two shards are placed on one node")

    def placement(self, index: int) -> Placement:
        return self.shards[index].placement

    def shards_as_placed(self) -> list[tuple[int, Placement]]:
        return [(s.index, s.placement) for s in self.shards]

    def with_placement(self, changes: Mapping[int, Placement], retire: Iterable[tuple[int, Placement]] = ()) -> Manifest:
        """The next revision, with shards moved to new placements and ``retire`` appended."""
        shards = tuple(
            replace(s, placement=changes[s.index]) if s.index in changes else s for s in self.shards
        )
        retired = tuple(dict.fromkeys((*self.retired, *retire)))
        return replace(self, revision=self.revision + 1, shards=shards, retired=retired)

    def without_retired(self, gone: Iterable[tuple[int, Placement]]) -> Manifest:
        drop = set(gone)
        return replace(self, retired=tuple(r for r in self.retired if r not in drop))

    def to_wire(self) -> dict[str, Any]:
        p = self.params
        return {
            "version": FORMAT_VERSION, "revision": self.revision, "size": self.size,
            "k": p.k, "n": p.n, "segment_size": p.segment_size, "leaves_per_page": p.leaves_per_page,
            "codec": self.codec, "cipher": self.cipher,
            "shards": [
                {"index": s.index, "node": s.placement.node, "ns": s.placement.ns,
                 "endpoint": s.placement.endpoint, "pages": list(s.pages)}
                for s in self.shards
            ],
            "retired": [
                {"index": i, "node": pl.node, "ns": pl.ns, "endpoint": pl.endpoint}
                for i, pl in self.retired
            ],
        }

    @classmethod
    def from_wire(cls, value: Any) -> Manifest:
        """Raises :class:`BadManifest` for any shape or range defect."""
        try:
            return cls._from_wire(value)
        except BadManifest:
            raise
        except (TfgridError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadManifest(f"malformed manifest: {exc}") from None

    @classmethod
    def _from_wire(cls, v: Any) -> Manifest:
        if not isinstance(v, dict):
            raise BadManifest("a manifest is a map")
        if v.get("version") != FORMAT_VERSION:
            raise BadManifest(f"unsupported manifest version {v.get('version')!r}")
        params = Params(v["k"], v["n"], v["segment_size"], v["leaves_per_page"])
        shards = tuple(
            ShardEntry(_int(s["index"]), _placement(s),
                       tuple(_bytes(r) for r in s["pages"]))
            for s in v["shards"]
        )
        retired = tuple((_int(r["index"]), _placement(r)) for r in v["retired"])
        return cls(_int(v["revision"]), _int(v["size"]), params, shards, retired,
                   _str(v["codec"]), _str(v["cipher"]))


def _int(x: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < 2**63:
        raise BadManifest(f"expected a non-negative integer, got {type(x).__name__}")
    return x


def _bytes(x: Any) -> bytes:
    if not isinstance(x, bytes):
        raise BadManifest(f"expected bytes, got {type(x).__name__}")
    return x


def _str(x: Any) -> str:
    if not isinstance(x, str) or len(x) > 256:
        raise BadManifest("expected a short string")
    return x


def _placement(m: Any) -> Placement:
    return Placement(_int(m["node"]), _int(m["ns"]), _str(m["endpoint"]))


def seal_manifest(manifest: Manifest, keys: ObjectKeys, nonce: bytes) -> list[bytes]:
    """The ``n`` manifest-shard records of ``manifest`` (record ``i`` goes with shard ``i``).

    ``nonce`` is 12 fresh random bytes: manifests are re-encrypted on every repair, so a
    counter nonce could repeat under concurrent repairs.
    """
    if len(nonce) != NONCE_SIZE:
        raise BadParameters(f"a manifest nonce is {NONCE_SIZE} bytes")
    p = manifest.params
    body = pack(manifest.to_wire())
    blob = nonce + AESGCM(keys.manifest_key).encrypt(nonce, body, _MANIFEST_AAD + keys.storage_index)
    blocks = ErasureCoder(p.k, p.n).encode(blob)
    hashes = b"".join(leaf_hash(b) for b in blocks)
    return [
        pack({"v": FORMAT_VERSION, "t": "manifest", "rev": manifest.revision, "index": i,
              "k": p.k, "n": p.n, "len": len(blob), "hashes": hashes, "block": block})
        for i, block in enumerate(blocks)
    ]


@dataclass(frozen=True, slots=True)
class ManifestRead:
    """An opened manifest; ``bad`` maps each source whose record was unusable to why, and
    ``stale`` lists sources that hold an older revision (repair rewrites them)."""

    manifest: Manifest
    used: frozenset[str]
    bad: dict[str, str]
    stale: frozenset[str]


@dataclass(frozen=True, slots=True)
class _MShard:
    rev: int
    index: int
    k: int
    n: int
    length: int
    hashes: bytes
    block: bytes


def _parse_mshard(data: bytes) -> _MShard:
    try:
        rec = unpack(data, max_size=MAX_RECORD)
    except MalformedFrame:
        raise CorruptRecord("not a valid manifest record") from None
    if not isinstance(rec, dict) or rec.get("v") != FORMAT_VERSION or rec.get("t") != "manifest":
        raise CorruptRecord(f"not a version-{FORMAT_VERSION} manifest record")
    try:
        m = _MShard(_int(rec["rev"]), _int(rec["index"]), _int(rec["k"]), _int(rec["n"]),
                    _int(rec["len"]), _bytes(rec["hashes"]), _bytes(rec["block"]))
        Params(k=m.k, n=m.n)
    except (KeyError, BadManifest, BadParameters) as exc:
        raise CorruptRecord(f"malformed manifest record: {exc}") from None
    if m.index >= m.n or len(m.hashes) != m.n * HASH_SIZE or m.length > MAX_RECORD:
        raise CorruptRecord("manifest record fields out of range")
    if leaf_hash(m.block) != m.hashes[m.index * HASH_SIZE:(m.index + 1) * HASH_SIZE]:
        raise CorruptRecord("manifest record block does not match its hash")
    return m


def open_manifest(records: Mapping[str, bytes], keys: ObjectKeys) -> ManifestRead:
    """Rebuild the newest manifest from the records fetched from each source (any label).

    Records are grouped by (revision, coding, block hashes); the newest group with ``k``
    distinct blocks that decodes and authenticates wins. Raises :class:`NotEnoughShards`
    when no group has ``k`` blocks, :class:`AuthenticationFailed` when groups had enough
    blocks but none authenticated (a wrong key or forged records).
    """
    bad: dict[str, str] = {}
    groups: dict[tuple[int, int, int, int, bytes], dict[int, tuple[str, bytes]]] = {}
    for source, data in records.items():
        try:
            m = _parse_mshard(data)
        except CorruptRecord as exc:
            bad[source] = str(exc)
            continue
        groups.setdefault((m.rev, m.k, m.n, m.length, m.hashes), {}).setdefault(m.index, (source, m.block))
    best = 0
    needed = DEFAULT_K
    auth_failures = 0
    for key in sorted(groups, key=lambda g: g[0], reverse=True):
        rev, k, n, length, _hashes = key
        members = groups[key]
        best = max(best, len(members))
        if len(members) < k:
            needed = k
            continue
        blob = ErasureCoder(k, n).decode({i: b for i, (_, b) in members.items()}, length)
        try:
            body = AESGCM(keys.manifest_key).decrypt(
                blob[:NONCE_SIZE], blob[NONCE_SIZE:], _MANIFEST_AAD + keys.storage_index
            )
        except (InvalidTag, ValueError):
            auth_failures += 1
            continue
        try:
            manifest = Manifest.from_wire(unpack(body, max_size=MAX_RECORD))
        except MalformedFrame:
            raise BadManifest("the manifest decrypted but is not valid msgpack") from None
        if manifest.revision != rev or manifest.params.k != k or manifest.params.n != n:
            raise BadManifest("the manifest's revision or coding disagrees with its shards")
        used = frozenset(src for src, _ in members.values())
        stale = frozenset(
            src for g, ms in groups.items() if g[0] < rev for src, _ in ms.values()
        ) - used
        return ManifestRead(manifest, used, bad, stale)
    if auth_failures:
        raise AuthenticationFailed("the manifest does not authenticate (wrong capability or forged shards)")
    raise NotEnoughShards("manifest shards", needed, best, bad)
