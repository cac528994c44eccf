"""The shard-store wire protocol (sans-IO): messages, signing, replay protection, framing,
and the shard content hash.

This is the one module of ``zos_agent`` that ``threebot`` may import (design section 1): the
store (:mod:`zos_agent.shardstore`) and the storage client both speak through it. It does no
I/O; the trio drivers own the sockets and files.

Transport
---------
TCP. Protocol version 2 frames carry bulk data outside msgpack, so that neither end copies a
chunk into or out of an encoded map::

    0   header length H  u32 big-endian (1..MAX_HEADER)
    4   payload length P u32 big-endian (0..MAX_CHUNK)
    8   H bytes: the header, a canonical msgpack map (the message's fields)
    8+H P bytes: the payload, raw (the ``data`` of put, append and the ``data`` answer)

Both lengths are checked on the 8-byte prefix, before any body byte is buffered: a header
above :data:`MAX_HEADER` or a payload above :data:`MAX_CHUNK` is a remote protocol error; the
store answers ``too_large`` and closes that connection only. Every message other than put,
append and ``data`` has ``P = 0`` (else ``malformed``). So a frame is at most
:data:`MAX_FRAME` bytes. Requests and responses strictly alternate per connection (a client
may pipeline; answers come in order).

The sans-IO connections give the encoded frame in two parts, ``(head, payload)`` with
``head`` = prefix + header and ``payload`` the caller's buffer untouched
(:meth:`ClientConnection.send_parts`, :meth:`ServerConnection.send_parts`): a driver sends
``head`` then, if not empty, ``payload``. On receipt the payload is copied at most once
(joined from the received chunks; taken as it is when it arrived as one chunk), and
:attr:`ClientConnection.needed` / :attr:`ServerConnection.needed` say how many bytes the frame
being read still lacks, so a driver can ask the socket for that much. A server connection
given a payload buffer (the store's, one per connection) is not copied into at all: its driver
receives each payload straight into the buffer (:meth:`ServerConnection.payload_view`,
:meth:`ServerConnection.commit_payload`) and the request's ``data`` is a view of it.

Chunking (why frames are small although shards are not)
-------------------------------------------------------
A 64 MiB object becomes 20 shards of a little over 4 MiB; bigger objects make bigger shards.
Rather than raising the frame limit with every object size, a shard is moved in chunks of at
most :data:`MAX_CHUNK` (1 MiB) of data per frame, so a connection never makes the store buffer
more than ~1 MiB, and shards up to :data:`MAX_SHARD_SIZE` fit:

- upload: one signed ``put`` that announces the shard's total ``size`` and carries the first
  chunk, then unsigned ``append`` frames on the same connection with the following chunks in
  order (``offset`` = bytes sent so far). The chunk that reaches ``size`` commits the shard
  (atomically: temp file, fsync, rename); a shard of at most 1 MiB is a single ``put``.
  The upload session belongs to the connection: closing the connection aborts it, and an
  ``append`` that does not continue the open upload is a protocol error (``bad_state``) that
  closes the connection. One upload at a time per connection; open more connections for
  parallel uploads.
- download: ``get`` with ``offset`` and ``length`` (at most :data:`MAX_CHUNK`); each answer
  carries the shard's total ``size`` and ``hash``; a read past the end returns fewer (or no)
  bytes. Reads aligned to :data:`BLOCK_SIZE` touch the fewest stored blocks.

Content hash
------------
A shard's ``hash`` (in ``put``, ``append``, ``stored``, ``data``, ``verified`` and the store's
file header) is :func:`content_hash`: the data is cut into :data:`BLOCK_SIZE` blocks (the last
one shorter; none for an empty shard), each block is hashed with BLAKE3-256, and the shard
hash is BLAKE3-256 of ``CONTENT_DOMAIN || size u64be || block size u32be || block hashes``.
The store keeps the block hashes (it checks every block it reads against its own), so the
data is hashed once, block by block, whether it arrives in one piece or in chunks
(:class:`ContentHasher` does it incrementally).

Requests (every request's header also has ``"v": 2``)
-----------------------------------------------------
==========  =======================================================================================
op          header fields; payload
==========  =======================================================================================
put         ns:int, shard_id:bytes32, size:int, hash:bytes (32 or empty), nonce:int, owner:bytes32,
            sig:bytes64; payload: the first chunk, ``min(size, MAX_CHUNK)`` bytes
append      ns, shard_id, offset:int, hash:bytes (32 or empty; checked against the whole shard
            when this chunk completes it); payload: the chunk (1..MAX_CHUNK bytes)
get         ns, shard_id, offset:int, length:int (0..MAX_CHUNK)
delete      ns, shard_id, nonce, owner, sig
stat        ns
verify      ns, shard_id  (the store re-hashes the whole shard; no data is sent)
==========  =======================================================================================

Responses: header ``{"v": 2, "ok": True, "r": kind, ...}`` or
``{"v": 2, "ok": False, "code", "message"}``.

==========  ==================================================  ===============================
r           header fields; payload                              answers
==========  ==================================================  ===============================
accepted    received:int (bytes of the upload so far)           a put/append that is not last
stored      size, hash (:func:`content_hash` of the shard)      the put/append that completed it
data        size, hash, offset; payload: the bytes read         get
deleted     freed:int (bytes of quota released)                 delete
stat        used, quota, count                                  stat
verified    size, hash                                          verify
==========  ==================================================  ===============================

Signed bytes (writes and deletes)
---------------------------------
``ledger.codec.signing_bytes("tfgrid/shard/v2", chain_id, [op, ns, shard_id, size, hash, nonce])``
signed with the namespace owner's ed25519 key (the contract's ``owner_key``); a delete signs
``size = 0`` and ``hash = b""``. The data itself is not signed (a put that signs the shard's
hash binds it). The contract id ``ns`` names exactly one node's namespace and the chain id one
grid, so a signature cannot be replayed on another node or chain. A ``put`` that signs the
shard's hash binds the content to the owner (the store refuses to commit other bytes:
``bad_hash``); a streaming client that cannot know the hash before sending signs ``b""`` and
checks the ``hash`` in the ``stored`` answer (and its own Merkle roots on read).

Replay protection
-----------------
Each signed request carries a ``nonce`` (1 .. 2**63-1) that must be unique per namespace. The
store keeps, per namespace and on disk (so a restart does not reopen old requests), the set of
the last :data:`REPLAY_WINDOW` accepted nonces and a ``floor``: a nonce is refused (``replay``)
if it is at or below the floor or already in the set. When the set overflows, its smallest
nonce becomes the floor. Nonces need not arrive in order (parallel connections are fine) but
must not lag the newest by more than the window; :func:`next_nonce` (microseconds of wall
clock, made strictly increasing) does that across client restarts. The store records a nonce
on disk before it acts on the request: a crash in between loses the request, never repeats it.

Error codes (:class:`ErrorCode`); the fatal ones close the connection after the answer:
``malformed``*, ``too_large`` (* when a frame), ``unsupported_version``*, ``bad_state``*,
``unknown_namespace``, ``not_owner``, ``bad_signature``, ``replay``, ``quota_exceeded``,
``not_found``, ``corrupt``, ``bad_hash``, ``internal``.

Quota counts shard data bytes (what ``size`` says), reserved when a ``put`` is accepted, so
an upload that would not fit is refused before any byte is written. Replacing a shard id
(a new ``put`` of an existing id) is allowed; the old size is released when the new one
commits.
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import blake3

from ledger import keys
from ledger.codec import HASH_SIZE, pack, signing_bytes, unpack
from ledger.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedFrame,
    RemoteProtocolError,
    TfgridError,
)
from ledger.wire import NEED_DATA as NEED_DATA
from ledger.wire import NeedData as NeedData

PROTOCOL_VERSION: Final = 2
SIGN_DOMAIN: Final = "tfgrid/shard/v2"
CONTENT_DOMAIN: Final = b"tfgrid/shard/content/v1\x00"
SHARD_ID_SIZE: Final = 32
MAX_CHUNK: Final = 1 << 20
# Room for every field of a put (ids, hash, key, signature, map keys) several times over.
MAX_HEADER: Final = 4096
_PREFIX: Final = struct.Struct(">II")  # header length, payload length
PREFIX_SIZE: Final = _PREFIX.size
# The largest frame either side may send: prefix, header and a full chunk.
MAX_FRAME: Final = PREFIX_SIZE + MAX_HEADER + MAX_CHUNK
MAX_SHARD_SIZE: Final = 1 << 32
BLOCK_SIZE: Final = 256 * 1024
REPLAY_WINDOW: Final = 1024
MAX_NONCE: Final = (1 << 63) - 1
_MAX_MESSAGE: Final = 256

Bytes = bytes | bytearray | memoryview
"""What the sending side accepts as data: any bytes-like buffer (sent without a copy)."""


def nbytes(data: Bytes) -> int:
    """The length in bytes of a bytes-like buffer."""
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _flat(data: Bytes) -> Bytes:
    """``data`` as a flat byte buffer (a memoryview of another format or shape is cast)."""
    if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
        return data.cast("B") if data.c_contiguous else data.tobytes()
    return data


class ErrorCode(enum.StrEnum):
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_STATE = "bad_state"
    UNKNOWN_NAMESPACE = "unknown_namespace"
    NOT_OWNER = "not_owner"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"
    QUOTA_EXCEEDED = "quota_exceeded"
    NOT_FOUND = "not_found"
    CORRUPT = "corrupt"
    BAD_HASH = "bad_hash"
    INTERNAL = "internal"


class ShardRefused(TfgridError):
    """The store refused a well-formed request (bad signature, replay, quota, not found, ...).

    Raised by the store's request checks and by :func:`raise_for_error` on the client side;
    ``code`` is an :class:`ErrorCode`. The connection stays usable.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class ShardProtocolError(RemoteProtocolError):
    """The peer broke the protocol (malformed or oversized frame, bad field, out-of-order
    append, unsupported version). The store answers with ``code`` and closes the connection;
    a client closes its connection to that store."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# content hash


def block_hash(block: Bytes) -> bytes:
    """BLAKE3-256 of one block (at most :data:`BLOCK_SIZE` bytes) of a shard."""
    return blake3.blake3(block).digest()


def table_content_hash(size: int, table: Bytes, block_size: int = BLOCK_SIZE) -> bytes:
    """The content hash of a ``size``-byte shard whose block hashes are ``table`` (32 bytes
    per block, in order): BLAKE3-256 of the domain tag, the size, the block size and the
    table."""
    h = blake3.blake3(CONTENT_DOMAIN)
    h.update(struct.pack(">QI", size, block_size))
    h.update(table)
    return h.digest()


def content_hash(data: Bytes) -> bytes:
    """The content hash of a whole shard (the ``hash`` of put, stored, data and verified)."""
    hasher = ContentHasher()
    hasher.update(data)
    return hasher.finish()[1]


class ContentHasher:
    """:func:`content_hash` fed piece by piece: every byte is hashed once, in its block."""

    __slots__ = ("size", "_table", "_block", "_block_len")

    def __init__(self) -> None:
        self.size = 0
        self._table: list[bytes] = []
        self._block: blake3.blake3 | None = None  # the unfinished block, if any
        self._block_len = 0

    def update(self, data: Bytes) -> None:
        view = memoryview(_flat(data))
        n = len(view)
        self.size += n
        if self._block is not None:
            take = min(n, BLOCK_SIZE - self._block_len)
            self._block.update(view[:take])
            self._block_len += take
            view = view[take:]
            if self._block_len < BLOCK_SIZE:
                return
            self._table.append(self._block.digest())
            self._block, self._block_len = None, 0
        while len(view) >= BLOCK_SIZE:
            self._table.append(blake3.blake3(view[:BLOCK_SIZE]).digest())
            view = view[BLOCK_SIZE:]
        if view:
            self._block, self._block_len = blake3.blake3(view), len(view)

    def finish(self) -> tuple[bytes, bytes]:
        """(the block-hash table, the content hash) of everything fed so far (more may be
        fed afterwards)."""
        hashes = self._table if self._block is None else [*self._table, self._block.digest()]
        table = b"".join(hashes)
        return table, table_content_hash(self.size, table)


# ---------------------------------------------------------------------------------------------
# field checks


def _bad(message: str) -> ShardProtocolError:
    return ShardProtocolError(ErrorCode.MALFORMED, message)


def _fields(msg: dict[str, Any], required: frozenset[str]) -> None:
    keys_ = frozenset(msg)
    if keys_ != required:
        missing = sorted(required - keys_)
        extra = sorted(keys_ - required)
        raise _bad(f"fields: missing {missing}, unexpected {extra}")


def _int(msg: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = msg[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise _bad(f"{name}={value} outside {lo}..{hi}")
    return value


def _bytes(msg: dict[str, Any], name: str, sizes: tuple[int, ...]) -> bytes:
    value = msg[name]
    if not isinstance(value, bytes):
        raise _bad(f"{name} must be bytes")
    if len(value) not in sizes:
        raise _bad(f"{name} must be {' or '.join(map(str, sizes))} bytes, got {len(value)}")
    return value


def _check_chunk(payload: bytes | memoryview) -> None:
    if len(payload) > MAX_CHUNK:
        raise ShardProtocolError(ErrorCode.TOO_LARGE, f"chunk of {len(payload)} bytes > {MAX_CHUNK}")


def _no_payload(what: str, payload: bytes | memoryview) -> None:
    if payload:
        raise _bad(f"{what} carries no payload, got {len(payload)} bytes")


def _ns(msg: dict[str, Any]) -> int:
    return _int(msg, "ns", 0, MAX_NONCE)


def _sid(msg: dict[str, Any]) -> bytes:
    return _bytes(msg, "shard_id", (SHARD_ID_SIZE,))


def _check_local(ok: bool, message: str) -> None:
    if not ok:
        raise LocalProtocolError(message)


# ---------------------------------------------------------------------------------------------
# requests

_PUT = frozenset({"v", "op", "ns", "shard_id", "size", "hash", "nonce", "owner", "sig"})
_APPEND = frozenset({"v", "op", "ns", "shard_id", "offset", "hash"})
_GET = frozenset({"v", "op", "ns", "shard_id", "offset", "length"})
_DELETE = frozenset({"v", "op", "ns", "shard_id", "nonce", "owner", "sig"})
_STAT = frozenset({"v", "op", "ns"})
_VERIFY = frozenset({"v", "op", "ns", "shard_id"})


@dataclass(frozen=True, slots=True)
class Put:
    """Start (and, if ``data`` is the whole shard, finish) an upload of ``size`` bytes.

    ``data`` travels as the frame's payload (received: ``bytes``, or a memoryview of the
    store's payload buffer, see :class:`ServerConnection`; sent: any bytes-like)."""

    ns: int
    shard_id: bytes
    size: int
    hash: bytes
    nonce: int
    owner: bytes
    sig: bytes
    data: Bytes

    @property
    def is_complete(self) -> bool:
        return nbytes(self.data) == self.size

    def signed_body(self) -> list[Any]:
        return ["put", self.ns, self.shard_id, self.size, self.hash, self.nonce]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION, "op": "put", "ns": self.ns, "shard_id": self.shard_id,
            "size": self.size, "hash": self.hash, "nonce": self.nonce, "owner": self.owner,
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, msg: dict[str, Any], payload: bytes | memoryview = b"") -> Put:
        _fields(msg, _PUT)
        size = _int(msg, "size", 0, MAX_SHARD_SIZE)
        _check_chunk(payload)
        data = payload
        if len(data) != min(size, MAX_CHUNK):
            raise _bad(f"a put carries the first min(size, {MAX_CHUNK}) bytes, got {len(data)}")
        return cls(
            ns=_ns(msg), shard_id=_sid(msg), size=size,
            hash=_bytes(msg, "hash", (0, HASH_SIZE)), nonce=_int(msg, "nonce", 1, MAX_NONCE),
            owner=_bytes(msg, "owner", (keys.PUBLIC_KEY_SIZE,)),
            sig=_bytes(msg, "sig", (keys.SIGNATURE_SIZE,)), data=data,
        )


@dataclass(frozen=True, slots=True)
class Append:
    """The next chunk of the upload open on this connection (``data``: the payload, typed
    as a put's)."""

    ns: int
    shard_id: bytes
    offset: int
    data: Bytes
    hash: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION, "op": "append", "ns": self.ns, "shard_id": self.shard_id,
            "offset": self.offset, "hash": self.hash,
        }

    @classmethod
    def from_wire(cls, msg: dict[str, Any], payload: bytes | memoryview = b"") -> Append:
        _fields(msg, _APPEND)
        _check_chunk(payload)
        data = payload
        if not data:
            raise _bad("an append carries at least one byte")
        return cls(
            ns=_ns(msg), shard_id=_sid(msg), offset=_int(msg, "offset", 1, MAX_SHARD_SIZE),
            data=data, hash=_bytes(msg, "hash", (0, HASH_SIZE)),
        )


@dataclass(frozen=True, slots=True)
class Get:
    ns: int
    shard_id: bytes
    offset: int = 0
    length: int = MAX_CHUNK

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION, "op": "get", "ns": self.ns, "shard_id": self.shard_id,
            "offset": self.offset, "length": self.length,
        }

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Get:
        _fields(msg, _GET)
        return cls(
            ns=_ns(msg), shard_id=_sid(msg), offset=_int(msg, "offset", 0, MAX_SHARD_SIZE),
            length=_int(msg, "length", 0, MAX_CHUNK),
        )


@dataclass(frozen=True, slots=True)
class Delete:
    ns: int
    shard_id: bytes
    nonce: int
    owner: bytes
    sig: bytes

    def signed_body(self) -> list[Any]:
        return ["delete", self.ns, self.shard_id, 0, b"", self.nonce]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION, "op": "delete", "ns": self.ns, "shard_id": self.shard_id,
            "nonce": self.nonce, "owner": self.owner, "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Delete:
        _fields(msg, _DELETE)
        return cls(
            ns=_ns(msg), shard_id=_sid(msg), nonce=_int(msg, "nonce", 1, MAX_NONCE),
            owner=_bytes(msg, "owner", (keys.PUBLIC_KEY_SIZE,)),
            sig=_bytes(msg, "sig", (keys.SIGNATURE_SIZE,)),
        )


@dataclass(frozen=True, slots=True)
class Stat:
    ns: int

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "op": "stat", "ns": self.ns}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Stat:
        _fields(msg, _STAT)
        return cls(ns=_ns(msg))


@dataclass(frozen=True, slots=True)
class Verify:
    ns: int
    shard_id: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "op": "verify", "ns": self.ns, "shard_id": self.shard_id}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Verify:
        _fields(msg, _VERIFY)
        return cls(ns=_ns(msg), shard_id=_sid(msg))


Request = Put | Append | Get | Delete | Stat | Verify
SignedRequest = Put | Delete

_REQUESTS: dict[str, type[Put] | type[Append] | type[Get] | type[Delete] | type[Stat] | type[Verify]] = {
    "put": Put, "append": Append, "get": Get, "delete": Delete, "stat": Stat, "verify": Verify,
}


def parse_request(msg: Any, payload: bytes | memoryview = b"") -> Request:
    """A request from a decoded frame's header map and payload.

    Raises :class:`ShardProtocolError` (``malformed``, ``too_large``, ``unsupported_version``).
    """
    if not isinstance(msg, dict):
        raise _bad("a request is a map")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ShardProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {msg.get('v')!r} (this store speaks {PROTOCOL_VERSION})",
        )
    op = msg.get("op")
    cls = _REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise _bad(f"unknown op {op!r}")
    if cls is Put:
        return Put.from_wire(msg, payload)
    if cls is Append:
        return Append.from_wire(msg, payload)
    _no_payload(f"a {op}", payload)
    return cls.from_wire(msg)


def request_payload(req: Request) -> Bytes:
    """The payload that travels with ``req`` (``b""`` but for put and append)."""
    return req.data if isinstance(req, Put | Append) else b""


# ---------------------------------------------------------------------------------------------
# responses


@dataclass(frozen=True, slots=True)
class Accepted:
    received: int


@dataclass(frozen=True, slots=True)
class Stored:
    size: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes of a stored shard (``data``: the payload; on the store's side a view of the
    connection's read buffer, valid until the answer is sent)."""

    size: int
    hash: bytes
    offset: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Deleted:
    freed: int


@dataclass(frozen=True, slots=True)
class StatResult:
    used: int
    quota: int
    count: int


@dataclass(frozen=True, slots=True)
class Verified:
    size: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str

    @property
    def fatal(self) -> bool:
        """True if the store closes the connection after sending this error."""
        return self.code in _FATAL


_FATAL: Final = frozenset(
    {ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.BAD_STATE}
)

Response = Accepted | Stored | Data | Deleted | StatResult | Verified | Error

_RESPONSE_FIELDS: dict[str, frozenset[str]] = {
    "accepted": frozenset({"received"}),
    "stored": frozenset({"size", "hash"}),
    "data": frozenset({"size", "hash", "offset"}),
    "deleted": frozenset({"freed"}),
    "stat": frozenset({"used", "quota", "count"}),
    "verified": frozenset({"size", "hash"}),
}
_BIG: Final = 1 << 64


def response_to_wire(resp: Response) -> dict[str, Any]:
    """The header map of a response (a ``data`` answer's bytes are its payload)."""
    head: dict[str, Any] = {"v": PROTOCOL_VERSION}
    match resp:
        case Error(code=code, message=message):
            return head | {"ok": False, "code": code.value, "message": message[:_MAX_MESSAGE]}
        case Accepted(received=received):
            return head | {"ok": True, "r": "accepted", "received": received}
        case Stored(size=size, hash=h):
            return head | {"ok": True, "r": "stored", "size": size, "hash": h}
        case Data(size=size, hash=h, offset=offset):
            return head | {"ok": True, "r": "data", "size": size, "hash": h, "offset": offset}
        case Deleted(freed=freed):
            return head | {"ok": True, "r": "deleted", "freed": freed}
        case StatResult(used=used, quota=quota, count=count):
            return head | {"ok": True, "r": "stat", "used": used, "quota": quota, "count": count}
        case Verified(size=size, hash=h):
            return head | {"ok": True, "r": "verified", "size": size, "hash": h}
    raise LocalProtocolError(f"not a response: {resp!r}")  # pragma: no cover - exhaustive


def response_payload(resp: Response) -> bytes | memoryview:
    """The payload that travels with ``resp`` (``b""`` but for a ``data`` answer)."""
    return resp.data if isinstance(resp, Data) else b""


def parse_response(msg: Any, payload: bytes = b"") -> Response:
    """A response from a decoded frame's header map and payload.

    Raises :class:`ShardProtocolError` if malformed."""
    if not isinstance(msg, dict) or msg.get("v") != PROTOCOL_VERSION:
        raise _bad(f"a response is a version-{PROTOCOL_VERSION} map")
    ok = msg.get("ok")
    if ok is not True or msg.get("r") != "data":
        _no_payload("this answer", payload)
    if ok is False:
        _fields(msg, frozenset({"v", "ok", "code", "message"}))
        code, message = msg["code"], msg["message"]
        if not isinstance(message, str) or not isinstance(code, str):
            raise _bad("error code and message are strings")
        try:
            return Error(ErrorCode(code), message[:_MAX_MESSAGE])
        except ValueError:
            raise _bad(f"unknown error code {code!r}") from None
    if ok is not True:
        raise _bad("ok must be a bool")
    kind = msg.get("r")
    fields = _RESPONSE_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise _bad(f"unknown response kind {kind!r}")
    _fields(msg, fields | {"v", "ok", "r"})
    match kind:
        case "accepted":
            return Accepted(_int(msg, "received", 0, MAX_SHARD_SIZE))
        case "stored":
            return Stored(_int(msg, "size", 0, MAX_SHARD_SIZE), _bytes(msg, "hash", (HASH_SIZE,)))
        case "data":
            _check_chunk(payload)
            return Data(
                _int(msg, "size", 0, MAX_SHARD_SIZE), _bytes(msg, "hash", (HASH_SIZE,)),
                _int(msg, "offset", 0, MAX_SHARD_SIZE), payload,
            )
        case "deleted":
            return Deleted(_int(msg, "freed", 0, MAX_SHARD_SIZE))
        case "stat":
            return StatResult(
                _int(msg, "used", 0, _BIG), _int(msg, "quota", 0, _BIG), _int(msg, "count", 0, _BIG)
            )
        case _:
            return Verified(_int(msg, "size", 0, MAX_SHARD_SIZE), _bytes(msg, "hash", (HASH_SIZE,)))


def raise_for_error(resp: Response) -> Response:
    """Return ``resp``, or raise :class:`ShardRefused` if it is an :class:`Error`."""
    if isinstance(resp, Error):
        raise ShardRefused(resp.code, resp.message)
    return resp


# ---------------------------------------------------------------------------------------------
# client-side builders


def request_sign_bytes(chain_id: str, body: list[Any]) -> bytes:
    """The exact bytes an owner signs for a put or delete (``body`` from ``signed_body()``)."""
    return signing_bytes(SIGN_DOMAIN, chain_id, body)


def next_nonce(last: int, now_us: int) -> int:
    """A nonce above ``last``: ``now_us`` (wall-clock microseconds, passed in) unless the clock
    has not moved past ``last``. Keeps nonces increasing across client restarts."""
    return max(last + 1, now_us, 1)


def make_put(
    key: keys.KeyPair, chain_id: str, ns: int, shard_id: bytes, size: int, first_chunk: Bytes,
    nonce: int, *, shard_hash: bytes = b"",
) -> Put:
    """A signed ``put`` of a ``size``-byte shard whose first chunk is ``first_chunk`` (any
    bytes-like; it is sent as it is, not copied).

    Pass ``shard_hash`` (:func:`content_hash` of the whole shard) when it is known to bind the
    content to the signature; a streaming upload passes nothing. Raises
    :class:`LocalProtocolError` for arguments the store would refuse as malformed.
    """
    first_chunk = _flat(first_chunk)
    _check_local(len(shard_id) == SHARD_ID_SIZE, "shard ids are 32 bytes")
    _check_local(0 <= size <= MAX_SHARD_SIZE, f"shard size must be 0..{MAX_SHARD_SIZE}")
    _check_local(nbytes(first_chunk) == min(size, MAX_CHUNK), "first chunk is min(size, MAX_CHUNK)")
    _check_local(len(shard_hash) in (0, HASH_SIZE), "shard hash is 32 bytes or empty")
    _check_local(1 <= nonce <= MAX_NONCE, "nonce must be 1..2**63-1")
    _check_local(0 <= ns <= MAX_NONCE, "ns must be a contract id")
    unsigned = Put(ns, shard_id, size, shard_hash, nonce, key.public_key, b"", first_chunk)
    sig = key.sign(request_sign_bytes(chain_id, unsigned.signed_body()))
    return Put(ns, shard_id, size, shard_hash, nonce, key.public_key, sig, first_chunk)


def make_delete(key: keys.KeyPair, chain_id: str, ns: int, shard_id: bytes, nonce: int) -> Delete:
    """A signed ``delete``. Raises :class:`LocalProtocolError` on bad arguments."""
    _check_local(len(shard_id) == SHARD_ID_SIZE, "shard ids are 32 bytes")
    _check_local(1 <= nonce <= MAX_NONCE, "nonce must be 1..2**63-1")
    unsigned = Delete(ns, shard_id, nonce, key.public_key, b"")
    sig = key.sign(request_sign_bytes(chain_id, unsigned.signed_body()))
    return Delete(ns, shard_id, nonce, key.public_key, sig)


def upload_requests(
    key: keys.KeyPair, chain_id: str, ns: int, shard_id: bytes, data: Bytes, nonce: int
) -> list[Put | Append]:
    """Every request of an in-memory upload: a ``put`` that signs the whole shard's
    :func:`content_hash`, then the ``append`` chunks (memoryview slices of ``data``, not
    copies). Send them in order on one connection; the last answer is ``stored``."""
    view = memoryview(_flat(data))
    size = len(view)
    shard_hash = content_hash(view)
    reqs: list[Put | Append] = [
        make_put(key, chain_id, ns, shard_id, size, view[:MAX_CHUNK], nonce,
                 shard_hash=shard_hash)
    ]
    for offset in range(MAX_CHUNK, size, MAX_CHUNK):
        chunk = view[offset : offset + MAX_CHUNK]
        last = offset + len(chunk) == size
        reqs.append(Append(ns, shard_id, offset, chunk, shard_hash if last else b""))
    return reqs


# ---------------------------------------------------------------------------------------------
# server-side checks


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """What the store knows of a namespace: the contract owner's key and the quota in bytes."""

    owner: bytes
    quota: int


class ReplayWindow:
    """Per-namespace nonces already used: a ``floor`` (everything at or below is used) and the
    set of at most :data:`REPLAY_WINDOW` accepted nonces above it. Persist it with
    :meth:`to_wire` before acting on a request."""

    __slots__ = ("floor", "_seen")

    def __init__(self, floor: int = 0, seen: frozenset[int] | set[int] = frozenset()) -> None:
        self.floor = floor
        self._seen = {n for n in seen if n > floor}
        self._trim()

    def is_fresh(self, nonce: int) -> bool:
        return nonce > self.floor and nonce not in self._seen

    def record(self, nonce: int) -> None:
        """Mark ``nonce`` used. Raises :class:`ShardRefused` (``replay``) if it already was."""
        if not self.is_fresh(nonce):
            raise ShardRefused(ErrorCode.REPLAY, f"nonce {nonce} was already used or is too old")
        self._seen.add(nonce)
        self._trim()

    def _trim(self) -> None:
        while len(self._seen) > REPLAY_WINDOW:
            smallest = min(self._seen)
            self._seen.discard(smallest)
            self.floor = max(self.floor, smallest)

    def copy(self) -> ReplayWindow:
        return ReplayWindow(self.floor, set(self._seen))

    def to_wire(self) -> dict[str, Any]:
        return {"v": 1, "floor": self.floor, "seen": sorted(self._seen)}

    @classmethod
    def from_wire(cls, msg: Any) -> ReplayWindow:
        """Raises :class:`MalformedFrame` if ``msg`` is not a saved window."""
        if not isinstance(msg, dict) or set(msg) != {"v", "floor", "seen"} or msg["v"] != 1:
            raise MalformedFrame("not a replay window")
        floor, seen = msg["floor"], msg["seen"]
        if not isinstance(floor, int) or not isinstance(seen, list):
            raise MalformedFrame("not a replay window")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in seen):
            raise MalformedFrame("replay window nonces are integers")
        return cls(floor, set(seen))


def authorize(
    req: SignedRequest, info: NamespaceInfo | None, chain_id: str, window: ReplayWindow
) -> None:
    """Check that ``req`` is signed by the namespace owner and is not a replay, and record its
    nonce in ``window`` (the caller persists the window before acting).

    Raises :class:`ShardRefused` with ``unknown_namespace``, ``not_owner``, ``bad_signature``
    or ``replay``; ``window`` is unchanged then.
    """
    if info is None:
        raise ShardRefused(ErrorCode.UNKNOWN_NAMESPACE, f"no namespace {req.ns} on this node")
    if req.owner != info.owner:
        raise ShardRefused(ErrorCode.NOT_OWNER, f"key {req.owner.hex()[:16]}... does not own namespace {req.ns}")
    try:
        keys.verify(info.owner, request_sign_bytes(chain_id, req.signed_body()), req.sig)
    except BadSignature:
        raise ShardRefused(ErrorCode.BAD_SIGNATURE, "signature does not verify") from None
    window.record(req.nonce)


# ---------------------------------------------------------------------------------------------
# connections


def encode_frame(header: dict[str, Any], payload: Bytes = b"") -> tuple[bytes, Bytes]:
    """A frame as ``(head, payload)``: ``head`` is the prefix and the canonical msgpack header,
    ``payload`` is the given buffer, not copied (send ``head`` then ``payload``).

    Raises :class:`LocalProtocolError` if the header or the payload is over its limit.
    """
    body = pack(header)
    payload = _flat(payload)
    size = nbytes(payload)
    if not 0 < len(body) <= MAX_HEADER:
        raise LocalProtocolError(f"refusing to send a {len(body)}-byte header (limit {MAX_HEADER})")
    if size > MAX_CHUNK:
        raise LocalProtocolError(f"refusing to send a {size}-byte payload (limit {MAX_CHUNK})")
    return _PREFIX.pack(len(body), size) + body, payload


class FrameReader:
    """Sans-IO decoder of frames: feed bytes with :meth:`receive_data`, take ``(header map,
    payload)`` pairs with :meth:`next_frame`.

    Received chunks are kept as they are; a frame's payload is taken without a copy when it
    is exactly one received chunk, else joined once from slices of the chunks. Both lengths
    are checked as soon as a frame's prefix is in: a :class:`ShardProtocolError`
    (``too_large``) then, before any of its body is buffered beyond what already arrived.

    With ``payload_buffer=True``, payloads are received straight into one page-aligned buffer
    of :data:`MAX_CHUNK` bytes instead (an anonymous mapping), made on the first frame that has
    a payload (a
    connection that only reads never holds one) and reused for every later frame: once a
    frame's prefix and header are in, :meth:`payload_view` is a writable view of the payload
    bytes still missing; a driver receives into it (``socket.recv_into``) and reports how
    many bytes it got with :meth:`commit_payload`. Reading at most :attr:`head_needed` bytes at a time
    until then never reads past the header, so no payload byte is copied; payload bytes that
    did arrive through :meth:`receive_data` are copied into the buffer, and bytes of the
    next frame stay queued. :meth:`next_frame` then gives the payload as a memoryview of the
    buffer, valid only until the next call of :meth:`receive_data`, :meth:`commit_payload`
    or :meth:`next_frame` (which may reuse the buffer for the next frame).
    """

    __slots__ = ("_chunks", "_pos", "_buffered", "_lengths", "_into", "_buf", "_head", "_filled")

    def __init__(self, payload_buffer: bool = False) -> None:
        self._chunks: deque[bytes] = deque()
        self._pos = 0  # bytes of _chunks[0] already taken
        self._buffered = 0  # bytes received and not taken
        self._lengths: tuple[int, int] | None = None  # (H, P) of the frame being read
        self._into = payload_buffer
        self._buf: memoryview | None = None  # the payload buffer, once a payload came
        # With a payload buffer, once the frame's header is in: the header, and how many
        # payload bytes _buf holds (the queued chunks then hold bytes of later frames only).
        self._head: bytes | None = None
        self._filled = 0

    @property
    def needed(self) -> int:
        """Bytes still missing before the frame being read is complete (at least 1 when
        :meth:`next_frame` answered :data:`NEED_DATA`)."""
        if self._lengths is None:
            return max(PREFIX_SIZE - self._buffered, 0)
        head, payload = self._lengths
        if self._head is not None:
            return payload - self._filled
        return max(head + payload - self._buffered, 0)

    @property
    def head_needed(self) -> int:
        """Bytes still missing before the frame's prefix, then its header, are complete (0
        once both are): as much as a driver may read without reading into the payload."""
        if self._lengths is None:
            return max(PREFIX_SIZE - self._buffered, 0)
        if self._head is not None:
            return 0
        return max(self._lengths[0] - self._buffered, 0)

    def receive_data(self, data: Bytes) -> None:
        """Raises :class:`ShardProtocolError` (``too_large``) if a frame announces too much."""
        n = nbytes(data)
        if not n:
            return
        if self._head is not None and self._lengths is not None and self._buf is not None:
            # The payload goes into the buffer (the queue is empty while it is incomplete).
            missing = self._lengths[1] - self._filled
            if missing:
                view = memoryview(_flat(data))
                take = min(missing, n)
                self._buf[self._filled : self._filled + take] = view[:take]
                self._filled += take
                if take == n:
                    return
                data = view[take:]
        chunk = data if type(data) is bytes else bytes(data)
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._advance()

    def payload_view(self) -> memoryview | None:
        """With a payload buffer, once the frame's prefix and header are in and part of its
        payload is not: a writable view of exactly the missing payload bytes (fill its start,
        then :meth:`commit_payload`). None otherwise: read up to :attr:`head_needed` bytes and
        :meth:`receive_data` them, or call :meth:`next_frame`."""
        if self._head is None or self._lengths is None or self._buf is None:
            return None
        payload = self._lengths[1]
        if self._filled == payload:
            return None
        return self._buf[self._filled : payload]

    def commit_payload(self, n: int) -> None:
        """Record that the first ``n`` bytes of :meth:`payload_view` were filled.

        Raises :class:`LocalProtocolError` if no payload is being received or ``n`` is more
        than it lacks.
        """
        if self._head is None or self._lengths is None:
            raise LocalProtocolError("no payload is being received into the buffer")
        missing = self._lengths[1] - self._filled
        if not 0 <= n <= missing:
            raise LocalProtocolError(f"{n} bytes committed; the payload lacks {missing}")
        self._filled += n

    @property
    def holds_buffer(self) -> bool:
        """Whether the payload buffer is allocated."""
        return self._buf is not None

    def release_buffer(self) -> bool:
        """Drop the payload buffer, if no payload is being received into it (the next
        payload gets a new one); whether it was dropped. A view of it given out by
        :meth:`next_frame` keeps its memory until that view goes."""
        if self._head is not None:
            return False
        self._buf = None
        return True

    def _advance(self) -> None:
        """Read the prefix once it is in and, with a payload buffer, take the header once it
        is in and move the payload bytes already queued into the buffer."""
        if self._lengths is None:
            if self._buffered < PREFIX_SIZE:
                return
            head, payload = _PREFIX.unpack(self._take(PREFIX_SIZE))
            if head > MAX_HEADER:
                raise ShardProtocolError(
                    ErrorCode.TOO_LARGE, f"frame header of {head} bytes exceeds limit {MAX_HEADER}")
            if payload > MAX_CHUNK:
                raise ShardProtocolError(
                    ErrorCode.TOO_LARGE, f"frame payload of {payload} bytes exceeds limit {MAX_CHUNK}")
            self._lengths = (head, payload)
        if not self._into or self._head is not None:
            return
        head, payload = self._lengths
        if self._buffered < head:
            return
        self._head = self._take(head)
        self._filled = min(payload, self._buffered)
        if payload:
            if self._buf is None:
                # Page-aligned (an anonymous mapping), so that the store can write a payload
                # to disk with O_DIRECT straight from here.
                self._buf = memoryview(mmap.mmap(-1, MAX_CHUNK))
            self._take_into(self._buf[: self._filled])

    def next_frame(self) -> tuple[Any, bytes | memoryview] | NeedData:
        """The next frame's decoded header and its payload, or :data:`NEED_DATA`. The payload
        is ``bytes``, or with a payload buffer a memoryview of it (see the class).

        Raises :class:`ShardProtocolError` (``too_large``, ``malformed``).
        """
        self._advance()
        if self._lengths is None:
            return NEED_DATA
        head, payload = self._lengths
        body: bytes | memoryview
        if self._into:
            if self._head is None or self._filled < payload:
                return NEED_DATA
            raw = self._head
            body = self._buf[:payload] if payload and self._buf is not None else b""
            self._head, self._filled = None, 0
        else:
            if self._buffered < head + payload:
                return NEED_DATA
            raw = self._take(head)
            body = self._take(payload)
        self._lengths = None
        try:
            msg = unpack(raw, max_size=MAX_HEADER)
        except MalformedFrame as exc:
            raise ShardProtocolError(ErrorCode.MALFORMED, f"frame header: {exc}") from None
        return msg, body

    def _take_into(self, dest: memoryview) -> None:
        """Copy the next ``len(dest)`` buffered bytes into ``dest`` (there are that many)."""
        n = len(dest)
        self._buffered -= n
        done = 0
        while done < n:
            chunk, pos = self._chunks[0], self._pos
            take = min(len(chunk) - pos, n - done)
            dest[done : done + take] = memoryview(chunk)[pos : pos + take]
            done += take
            if pos + take == len(chunk):
                self._chunks.popleft()
                self._pos = 0
            else:
                self._pos = pos + take

    def _take(self, n: int) -> bytes:
        """The next ``n`` buffered bytes (the caller checked that there are that many)."""
        if n == 0:
            return b""
        self._buffered -= n
        first, pos = self._chunks[0], self._pos
        avail = len(first) - pos
        if avail > n:
            self._pos = pos + n
            return first[pos : pos + n]
        if avail == n:
            self._chunks.popleft()
            self._pos = 0
            return first if pos == 0 else first[pos:]
        parts: list[bytes | memoryview] = []
        while n:
            chunk, pos = self._chunks[0], self._pos
            avail = len(chunk) - pos
            if avail > n:
                parts.append(memoryview(chunk)[pos : pos + n])
                self._pos = pos + n
                break
            parts.append(memoryview(chunk)[pos:] if pos else chunk)
            self._chunks.popleft()
            self._pos = 0
            n -= avail
        return b"".join(parts)


@dataclass(slots=True)
class Upload:
    """The upload open on a server connection."""

    ns: int
    shard_id: bytes
    size: int
    hash: bytes
    received: int


class ServerConnection:
    """The store's end of one connection.

    With ``payload_buffer=True`` (see :class:`FrameReader`) the ``data`` of a put or append is
    a memoryview of the connection's payload buffer, overwritten by the next request's
    payload: finish with a request (and drop every reference to its ``data``) before
    receiving more.

    Rules: requests and responses alternate (:meth:`next_request` returns nothing new until
    :meth:`send_parts` answered the previous request). A ``put`` whose answer is ``accepted``
    opens an upload; an ``append`` must continue it exactly (same ns and shard id, ``offset`` =
    bytes received) or it is a ``bad_state`` protocol error; an answer of ``stored`` or any
    error closes the upload. A :class:`ShardProtocolError` from :meth:`receive_data` or
    :meth:`next_request` means: send :meth:`error_frame` and close the connection.
    """

    def __init__(self, payload_buffer: bool = False) -> None:
        self._reader = FrameReader(payload_buffer)
        self._pending: Request | None = None
        self.upload: Upload | None = None

    @property
    def needed(self) -> int:
        """Bytes still missing from the request being received (see :class:`FrameReader`)."""
        return self._reader.needed

    @property
    def head_needed(self) -> int:
        """Bytes a driver may read without reading into a payload (see :class:`FrameReader`)."""
        return self._reader.head_needed

    def receive_data(self, data: Bytes) -> None:
        """Raises :class:`ShardProtocolError` (``too_large``) if a frame announces too much."""
        self._reader.receive_data(data)

    def payload_view(self) -> memoryview | None:
        """Where to receive the rest of the request's payload, with a payload buffer (see
        :meth:`FrameReader.payload_view`)."""
        return self._reader.payload_view()

    def commit_payload(self, n: int) -> None:
        """``n`` bytes were received into :meth:`payload_view`. Raises
        :class:`LocalProtocolError` if that is more than the payload lacks."""
        self._reader.commit_payload(n)

    @property
    def holds_buffer(self) -> bool:
        """Whether the connection's payload buffer is allocated."""
        return self._reader.holds_buffer

    def release_buffer(self) -> bool:
        """Drop the payload buffer unless a payload is being received into it (see
        :meth:`FrameReader.release_buffer`)."""
        return self._reader.release_buffer()

    def next_request(self) -> Request | NeedData:
        """The next request, or :data:`NEED_DATA`. Raises :class:`ShardProtocolError`."""
        if self._pending is not None:
            raise LocalProtocolError("answer the previous request first")
        frame = self._reader.next_frame()
        if isinstance(frame, NeedData):
            return NEED_DATA
        req = parse_request(*frame)
        up = self.upload
        if isinstance(req, Append):
            if up is None or (req.ns, req.shard_id) != (up.ns, up.shard_id):
                raise ShardProtocolError(ErrorCode.BAD_STATE, "append without a matching open upload")
            if req.offset != up.received or req.offset + nbytes(req.data) > up.size:
                raise ShardProtocolError(
                    ErrorCode.BAD_STATE,
                    f"append at {req.offset}+{nbytes(req.data)}; expected offset {up.received} "
                    f"of {up.size}",
                )
        elif up is not None:
            raise ShardProtocolError(ErrorCode.BAD_STATE, f"{type(req).__name__.lower()} during an upload")
        self._pending = req
        return req

    def send_parts(self, resp: Response) -> tuple[bytes, Bytes]:
        """Encode the answer to the pending request as ``(head, payload)`` (the payload, a
        ``data`` answer's bytes, not copied) and advance the upload state."""
        req = self._pending
        if req is None:
            raise LocalProtocolError("no request to answer")
        self._pending = None
        if isinstance(resp, Error) or isinstance(resp, Stored):
            self.upload = None
        elif isinstance(resp, Accepted):
            if isinstance(req, Put):
                self.upload = Upload(req.ns, req.shard_id, req.size, req.hash, nbytes(req.data))
            elif isinstance(req, Append) and self.upload is not None:
                self.upload.received = req.offset + nbytes(req.data)
            else:
                raise LocalProtocolError("accepted answers only a put or an append")
            if resp.received != self.upload.received:
                raise LocalProtocolError("accepted must report the bytes received")
        return encode_frame(response_to_wire(resp), response_payload(resp))

    def send(self, resp: Response) -> bytes:
        """:meth:`send_parts` as one byte string (copies the payload; for tests and tools)."""
        head, payload = self.send_parts(resp)
        return head + payload if nbytes(payload) else head

    @staticmethod
    def error_frame(exc: ShardProtocolError) -> bytes:
        """The frame that tells a peer why its connection is being closed."""
        head, _ = encode_frame(response_to_wire(Error(exc.code, exc.message)))
        return head


class ClientConnection:
    """The client's end of one connection: encode requests, decode answers in order."""

    def __init__(self) -> None:
        self._reader = FrameReader()

    @staticmethod
    def send_parts(req: Request) -> tuple[bytes, Bytes]:
        """``req`` as ``(head, payload)``: send ``head``, then ``payload`` if not empty (the
        request's ``data`` as it was given, not copied)."""
        return encode_frame(req.to_wire(), request_payload(req))

    @staticmethod
    def send(req: Request) -> bytes:
        """:meth:`send_parts` as one byte string (copies the payload; for tests and tools)."""
        head, payload = ClientConnection.send_parts(req)
        return head + payload if nbytes(payload) else head

    @property
    def needed(self) -> int:
        """Bytes still missing from the answer being received (see :class:`FrameReader`)."""
        return self._reader.needed

    def receive_data(self, data: Bytes) -> None:
        """Raises :class:`ShardProtocolError` if the store announces an oversized frame."""
        self._reader.receive_data(data)

    def next_response(self) -> Response | NeedData:
        """The next answer, or :data:`NEED_DATA`. Raises :class:`ShardProtocolError`."""
        frame = self._reader.next_frame()
        if isinstance(frame, NeedData):
            return NEED_DATA
        msg, payload = frame  # bytes: a client's reader has no payload buffer
        return parse_response(msg, payload if isinstance(payload, bytes) else bytes(payload))
