"""The shard store: the on-disk store of storage namespaces and its trio server.

The protocol is :mod:`zos_agent.shardwire`; this module does the files and the sockets.
The agent runs it as a child process while the node has namespace contracts (the agent
itself holds no listening socket)::

    python -m zos_agent.shardstore --data-dir D --listen HOST:PORT \\
        --namespaces-file F --chain-id C

It prints ``listening HOST:PORT`` on stdout once it accepts connections, re-reads ``F`` when
the file changes (polled every second) or on SIGHUP, and stops on SIGTERM/SIGINT or, with
``--parent-pid``, when that process (the agent) is gone.

Layout of ``data_dir`` (format version 3)::

    ns/<contract id>/shards/<first 2 hex>/<64 hex of the shard id>   committed shards
    ns/<contract id>/tmp/          uploads in progress (emptied when the namespace is loaded)
    ns/<contract id>/replay        the namespace's replay window (msgpack, replaced atomically)
    trash/                         namespaces being wiped (emptied at start)

A shard file is a header followed by the data::

    0    magic b"TFSHARD\\x03" (the last byte is the format version; other versions read as
         corrupt)
    8    size u64 | block size u32 | block count u32        (big-endian)
    24   shard hash (:func:`zos_agent.shardwire.content_hash` of the data: BLAKE3-256 over a
         domain tag, the size, the block size and the block-hash table)
    56   header check (BLAKE3-256 of bytes 0..56)
    88   block-hash table: BLAKE3-256 of each BLOCK_SIZE block of the data
    88 + 32 * blocks: zeros up to the data offset, the next multiple of 4096
    data offset: the data (``size`` bytes; the file ends with them)

The data starts on a 4096-byte boundary so that it is written and read with ``O_DIRECT``
(offsets, lengths and buffer addresses multiples of 4096), bypassing the page cache: copying
into the page cache was the largest kernel cost of a put on a devnet (measured on ext4 for
256 MiB: buffered pwrite + fsync 0.30 CPU-s, direct from one reused aligned buffer, the copy
into it included, 0.03; reading an uncached file 0.21 buffered, 0.02 direct). The price:
nothing stays cached, so every get waits for the disk (no readahead either). Where the
filesystem refuses ``O_DIRECT`` (``EINVAL``) the same files are written and read buffered.

Each byte is hashed once on upload (its block's hash; the shard hash is computed from the
table). A read checks the header and every block it returns against its hash (a mismatch is
``corrupt``, never data); ``verify`` checks the whole file (every block, and the table
against the shard hash). A write goes to ``tmp/``, is
fsynced, renamed into place and the directory fsynced, so after a crash a shard is either
the old complete file or the new complete file. Quota usage is recomputed from the headers
when a namespace is loaded, so it survives restarts and crashes.

Namespaces file (written by the agent, replaced atomically)::

    {"version": 1, "namespaces": {"<contract id>": {"owner": "<hex key>", "quota": <bytes>}}}
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import secrets
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import blake3
import trio

from ledger.codec import HASH_SIZE, pack, unpack
from ledger.config import format_hostport, parse_hostport
from ledger.errors import ConfigError, MalformedFrame, TfgridError
from zos_agent import shardwire as w
from zos_agent.blocksock import BlockingSocket, Quiet

log = logging.getLogger("zos_agent.shardstore")

MAGIC: Final = b"TFSHARD\x03"
_FIXED = struct.Struct(">8sQII32s")  # magic, size, block size, blocks, shard hash
HEADER_FIXED: Final = _FIXED.size + HASH_SIZE  # 88
# O_DIRECT wants file offsets, lengths and buffer addresses aligned to the device's logical
# block (512 or 4096 bytes): 4096 suits both, and is the page size, so an anonymous mmap
# (page-aligned) is an aligned buffer. A device with larger blocks refuses (EINVAL): buffered.
DIRECT_ALIGN: Final = 4096
_O_DIRECT: Final[int] = getattr(os, "O_DIRECT", 0)  # 0: no O_DIRECT here (not Linux)
# The largest span of whole blocks a get reads: MAX_CHUNK bytes at any offset touch at most
# this many blocks (the size of a connection's read buffer, see AlignedBuffer).
_READ_SPAN: Final = (w.MAX_CHUNK // w.BLOCK_SIZE + 1) * w.BLOCK_SIZE
IDLE_TIMEOUT_S: Final = 60.0
MAX_CONNECTIONS: Final = 256
RELOAD_POLL_S: Final = 1.0
# A connection over a TCP socket receives each request's payload straight into one buffer of
# MAX_CHUNK bytes (socket.recv_into; nothing allocated or copied per frame), and its prefix
# and header with reads of at most what they lack. Over any other stream it asks for what
# the frame being read still lacks, but at least _RECV and at most _MAX_RECV bytes:
# measured here, reads of 512 KiB or more cost 2-4 times the CPU per byte of 64-256 KiB
# reads (each read allocates its full size).
_RECV: Final = 64 * 1024
_MAX_RECV: Final = 256 * 1024
_JOIN_BELOW: Final = 64 * 1024  # a payload this small is sent in one piece with its head
_VERIFY_SPAN: Final = 4  # blocks read at once by verify_file (into one reused buffer)
# Worker threads doing file work at once, store-wide: each holds up to a frame (1 MiB) or a
# verify span, so this bounds the store's memory whatever the number of clients.
FILE_WORKERS: Final = 2
# Connections streaming in a worker thread of their own at once, store-wide (see
# zos_agent.blocksock): past that, a connection is served by the event loop alone. The thread
# gives the connection back to the event loop when its client sends nothing for
# STREAM_LINGER_S, and after STREAM_TURN_S in all, so a slow client never keeps one for long.
STREAM_WORKERS: Final = 4
STREAM_LINGER_S: Final = 0.25
STREAM_TURN_S: Final = 5.0


def _hash(data: w.Bytes) -> bytes:
    return blake3.blake3(data).digest()


def _blocks(size: int, block_size: int = w.BLOCK_SIZE) -> int:
    return -(-size // block_size)


def _align_up(n: int) -> int:
    return -(-n // DIRECT_ALIGN) * DIRECT_ALIGN


def data_offset(blocks: int) -> int:
    """Where the data of a shard of ``blocks`` blocks starts in its file: after the header and
    the block-hash table, rounded up to :data:`DIRECT_ALIGN`."""
    return _align_up(HEADER_FIXED + HASH_SIZE * blocks)


class Corrupt(TfgridError):
    """A stored shard does not match its hashes (or its header is damaged)."""


class Missing(TfgridError):
    """No shard with that id is stored."""


# ---------------------------------------------------------------------------------------------
# files (synchronous; the server runs these in worker threads)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, directory fsync."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class AlignedBuffer:
    """A page-aligned buffer for ``O_DIRECT`` reads and writes, reused: an anonymous mmap
    (page-aligned, zero-filled; a page takes memory only once touched), mapped on first use.

    :meth:`get` maps a larger one when asked for more than it has. A view of the buffer must
    not be kept past :meth:`close` (or a larger :meth:`get`): the mapping then stays until
    the last view goes (closing it with views alive raises BufferError, which is ignored).
    """

    __slots__ = ("_map", "_min_size")

    def __init__(self, min_size: int = 0) -> None:
        self._map: mmap.mmap | None = None
        self._min_size = min_size

    def get(self, size: int) -> mmap.mmap:
        """The buffer, at least ``size`` bytes (and at least the ``min_size`` it was made
        with, so that it is mapped once for the usual sizes)."""
        if self._map is None or len(self._map) < size:
            self.close()
            self._map = mmap.mmap(-1, _align_up(max(size, self._min_size, 1)))
        return self._map

    @property
    def mapped(self) -> bool:
        return self._map is not None

    def close(self) -> None:
        if self._map is not None:
            old, self._map = self._map, None
            # Last resort: a view still alive (e.g. in a traceback) keeps the pages mapped
            # until it goes; the mmap object unmaps them then.
            with contextlib.suppress(BufferError):
                old.close()


def _open_direct(path: Path, flags: int, same_as: int) -> int | None:
    """``path`` opened again with ``flags | O_DIRECT``; None if the filesystem refuses
    ``O_DIRECT`` (EINVAL), or if ``path`` no longer names the file open as ``same_as`` (a
    shard replaced or deleted in between: the caller goes on with ``same_as``, whose header
    it read, buffered)."""
    if not _O_DIRECT:
        return None
    try:
        fd = os.open(path, flags | _O_DIRECT)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    st, want = os.fstat(fd), os.fstat(same_as)
    if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
        os.close(fd)
        return None
    return fd


def _read_into(fd: int, direct_fd: int | None, buf: memoryview, offset: int, length: int) -> int:
    """Read ``length`` bytes at ``offset`` into ``buf``; the count read (fewer only if the file
    ends before). With ``direct_fd`` and an aligned ``offset`` this is one ``O_DIRECT`` read
    of ``length`` rounded up to :data:`DIRECT_ALIGN` (``buf`` must be page-aligned and that
    long; past the end of the file it returns less); whatever that does not read (refused,
    or a short read) is read buffered through ``fd``."""
    got = 0
    if direct_fd is not None and offset % DIRECT_ALIGN == 0:
        try:
            got = min(os.preadv(direct_fd, [buf[: _align_up(length)]], offset), length)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # e.g. a device with blocks larger than 4096
                raise
    while got < length:
        n = os.preadv(fd, [buf[got:length]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def _page_aligned(view: memoryview) -> bool:
    """Whether a (non-empty, C-contiguous) view starts at a page boundary: it can then be
    written with ``O_DIRECT`` as it is. A read-only view (``bytes``) reads as not aligned."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0
    except (TypeError, ValueError):
        return False


def _pwrite_all(fd: int, data: w.Bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, read without a copy when one ``pread`` returns them all
    (the usual case). Raises :class:`Corrupt` if the file ends before."""
    first = os.pread(fd, length, offset)
    if len(first) == length:
        return first
    parts = [first]
    got = len(first)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            raise Corrupt("shard file is shorter than its header says")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ShardHeader:
    size: int
    block_size: int
    blocks: int
    shard_hash: bytes

    @property
    def data_offset(self) -> int:
        return data_offset(self.blocks)

    def encode(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, self.size, self.block_size, self.blocks, self.shard_hash)
        return fixed + _hash(fixed)

    @classmethod
    def decode(cls, raw: bytes) -> ShardHeader:
        """Raises :class:`Corrupt` unless ``raw`` is an intact version-3 header."""
        if len(raw) != HEADER_FIXED:
            raise Corrupt("shard file is shorter than a header")
        view = memoryview(raw)
        if _hash(view[: _FIXED.size]) != view[_FIXED.size :]:
            raise Corrupt("shard header does not match its check hash")
        magic, size, block_size, blocks, shard_hash = _FIXED.unpack_from(raw)
        if magic != MAGIC or block_size < 1 or blocks != _blocks(size, block_size):
            raise Corrupt("shard header is not a version-3 header")
        return cls(size, block_size, blocks, shard_hash)


class ShardWriter:
    """One upload: data goes into a temp file as it arrives, each block hashed once
    (:class:`~zos_agent.shardwire.ContentHasher`) from the bytes given.

    The file is written with ``O_DIRECT`` where the filesystem takes it. A chunk of whole
    pages at a page-aligned address (as the store's payload buffer gives them) is written as it
    is when nothing waits in the bounce buffer. Any other chunk is copied into one page-aligned
    bounce buffer of :data:`~zos_agent.shardwire.MAX_CHUNK` bytes (mapped on first need,
    reused) and written from there once the buffer is full, so every write is whole pages at
    an aligned offset (chunks are MAX_CHUNK bytes but the last; a shorter one just waits in
    the buffer for the next). The rest is written
    by :meth:`finish`, zero-padded to :data:`DIRECT_ALIGN` (never bytes of an earlier
    chunk), and the file is cut to its exact length. If the filesystem refuses ``O_DIRECT``
    (at open or on a write: EINVAL) the writer goes on buffered, writing each chunk as it
    comes.
    """

    def __init__(self, tmp_dir: Path, shard_id: bytes, size: int) -> None:
        self.size = size
        self.path = tmp_dir / f"{shard_id.hex()}.{secrets.token_hex(4)}"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # O_DIRECT through a second open: an open(O_CREAT | O_DIRECT) that the filesystem
        # refuses has already created the file, so it could not simply be retried.
        try:
            direct_fd = _open_direct(self.path, os.O_WRONLY, fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        if direct_fd is not None:
            os.close(fd)
            fd = direct_fd
        self._fd: int | None = fd
        self._direct = direct_fd is not None
        self._base = data_offset(_blocks(size))
        self._hasher = w.ContentHasher()
        self._bounce = AlignedBuffer(max(w.MAX_CHUNK, self._base))
        self._staged = 0  # bytes in the bounce buffer, not yet written (direct only)
        self.copied = 0  # bytes that went through the bounce buffer (direct only)
        self._flushed = 0  # data bytes written to the file (data offset + this: next write)
        self.written = 0

    @property
    def direct(self) -> bool:
        """True while the file is written with ``O_DIRECT``."""
        return self._direct

    def write(self, data: w.Bytes) -> None:
        n = w.nbytes(data)
        if self._fd is None or self.written + n > self.size:
            raise OSError(errno.EINVAL, "write past the announced shard size")
        if self._direct:
            self._stage(self._fd, memoryview(data).cast("B"))
        else:
            _pwrite_all(self._fd, data, self._base + self._flushed)
            self._flushed += n
        self.written += n
        self._hasher.update(data)

    def _stage(self, fd: int, src: memoryview) -> None:
        if not self._staged and src and len(src) % DIRECT_ALIGN == 0 and _page_aligned(src):
            # Whole pages at a page-aligned address (the store's payload buffer), nothing
            # staged: written as they are, without the copy into the bounce buffer.
            try:
                _pwrite_all(fd, src, self._base + self._flushed)
                self._flushed += len(src)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            # Refused: the bounce buffer below rewrites the same bytes (or goes buffered).
        buf = self._bounce.get(w.MAX_CHUNK)
        room = w.MAX_CHUNK
        while src:
            take = min(len(src), room - self._staged)
            buf[self._staged : self._staged + take] = src[:take]  # a copy; no view is kept
            self._staged += take
            self.copied += take
            src = src[take:]
            if self._staged == room:
                self._write_bounce(fd, room, self._base + self._flushed)
                self._flushed += room
                self._staged = 0
                if not self._direct:  # refused just now: the rest goes as it is
                    _pwrite_all(fd, src, self._base + self._flushed)
                    self._flushed += len(src)
                    return

    def _write_bounce(self, fd: int, length: int, offset: int) -> None:
        """Write the first ``length`` bytes of the bounce buffer at ``offset``: direct, or
        buffered from now on if the filesystem refuses the direct write."""
        if self._direct:
            try:
                _pwrite_all(fd, memoryview(self._bounce.get(length))[:length], offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            # Whatever the failed write did is rewritten below with the same bytes.
            log.info("%s: O_DIRECT write refused, writing buffered", self.path.parent)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            self._direct = False
        _pwrite_all(fd, memoryview(self._bounce.get(length))[:length], offset)

    def write_and_finish(self, data: w.Bytes) -> bytes | None:
        """:meth:`write`, then :meth:`finish` if that completed the shard: its hash, or None
        while the shard is incomplete (one call, so one worker-thread hop per frame)."""
        self.write(data)
        return self.finish() if self.written == self.size else None

    def finish(self) -> bytes:
        """Write the rest of the data and the header, cut the file to its length and fsync;
        the shard hash. The file is still the temp file."""
        fd = self._fd
        if fd is None or self.written != self.size:
            raise OSError(errno.EINVAL, "shard incomplete")
        if self._staged:
            padded = _align_up(self._staged)
            buf = self._bounce.get(padded)
            buf[self._staged : padded] = bytes(padded - self._staged)
            self._write_bounce(fd, padded, self._base + self._flushed)
            self._flushed += self._staged
            self._staged = 0
        table, shard_hash = self._hasher.finish()
        header = ShardHeader(self.size, w.BLOCK_SIZE, _blocks(self.size), shard_hash)
        region = header.encode() + table
        if self._direct:  # the header region, zero-padded to the data offset
            buf = self._bounce.get(self._base)
            buf[: len(region)] = region
            buf[len(region) : self._base] = bytes(self._base - len(region))
            self._write_bounce(fd, self._base, 0)
        else:
            _pwrite_all(fd, region, 0)
        # The last direct write went past the end of the data (padding), and a buffered
        # file of a small shard may end before the data offset: exactly header + data.
        os.ftruncate(fd, self._base + self.size)
        os.fsync(fd)
        self._close()
        return shard_hash

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._bounce.close()

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)


def _read_header(fd: int) -> ShardHeader:
    return ShardHeader.decode(os.pread(fd, HEADER_FIXED, 0))


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise Missing("no such shard") from None


def _check_blocks(data: bytes | memoryview, table: bytes, block_size: int, first: int) -> None:
    """Every block of ``data`` (blocks ``first``...) against its entry of ``table``; hashed
    through memoryview slices, not copies. Raises :class:`Corrupt`."""
    view, hashes = memoryview(data), memoryview(table)
    for i in range(-(-len(data) // block_size)):
        if _hash(view[i * block_size : (i + 1) * block_size]) != hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE]:
            raise Corrupt(f"block {first + i} does not match its hash")


def read_range(path: Path, offset: int, length: int,
               buffer: AlignedBuffer) -> tuple[ShardHeader, bytes | memoryview]:
    """The header and ``length`` bytes at ``offset`` (fewer at the end of the shard), every
    block they touch checked against its hash. Raises :class:`Missing`, :class:`Corrupt`.

    The blocks are read into ``buffer`` (with ``O_DIRECT`` where the filesystem takes it;
    the header and the table through the page cache) and the answer is a view of it, not a
    copy: it is valid until ``buffer`` is used again.
    """
    fd = _open(path)
    try:
        hdr = _read_header(fd)
        end = min(offset + length, hdr.size)
        if offset >= end:
            return hdr, b""
        bs = hdr.block_size
        first, last = offset // bs, (end - 1) // bs
        table = _pread_exact(fd, HASH_SIZE * (last - first + 1), HEADER_FIXED + HASH_SIZE * first)
        start = first * bs
        stop = min((last + 1) * bs, hdr.size)
        view = memoryview(buffer.get(_align_up(stop - start)))
        direct_fd = _open_direct(path, os.O_RDONLY, fd)
        try:
            if _read_into(fd, direct_fd, view, hdr.data_offset + start, stop - start) < stop - start:
                raise Corrupt("shard file is shorter than its header says")
        finally:
            if direct_fd is not None:
                os.close(direct_fd)
        _check_blocks(view[: stop - start], table, bs, first)
        return hdr, view[offset - start : end - start]
    finally:
        os.close(fd)


def verify_file(path: Path) -> ShardHeader:
    """Check the whole shard (header, every block against the table, the table against the
    shard hash) reading :data:`_VERIFY_SPAN` blocks at a time into one buffer (``O_DIRECT``
    where the filesystem takes it). Raises :class:`Missing`, :class:`Corrupt`."""
    fd = _open(path)
    buffer = AlignedBuffer()
    direct_fd: int | None = None
    try:
        hdr = _read_header(fd)
        table = _pread_exact(fd, HASH_SIZE * hdr.blocks, HEADER_FIXED)
        if w.table_content_hash(hdr.size, table, hdr.block_size) != hdr.shard_hash:
            raise Corrupt("block-hash table does not match the shard hash")
        direct_fd = _open_direct(path, os.O_RDONLY, fd)
        _verify_blocks(fd, direct_fd, hdr, table, buffer)
        if os.fstat(fd).st_size != hdr.data_offset + hdr.size:
            raise Corrupt("shard file has trailing bytes")
        return hdr
    finally:
        if direct_fd is not None:
            os.close(direct_fd)
        os.close(fd)
        buffer.close()


def _verify_blocks(fd: int, direct_fd: int | None, hdr: ShardHeader, table: bytes,
                   buffer: AlignedBuffer) -> None:
    # A function of its own so that its views of the buffer are gone when verify_file
    # closes it (unless an exception's traceback holds them: AlignedBuffer.close).
    span = min(hdr.block_size * _VERIFY_SPAN, hdr.size)
    view = memoryview(buffer.get(_align_up(span)))
    for first in range(0, hdr.blocks, _VERIFY_SPAN):
        start = first * hdr.block_size
        want = min(span, hdr.size - start)
        if _read_into(fd, direct_fd, view, hdr.data_offset + start, want) < want:
            raise Corrupt("shard file is shorter than its header says")
        end = min(first + _VERIFY_SPAN, hdr.blocks)
        _check_blocks(view[:want], table[first * HASH_SIZE : end * HASH_SIZE], hdr.block_size, first)


def stored_size(path: Path) -> int:
    """Quota bytes a stored file accounts for: its data size, or the whole file if the
    header is damaged (it still takes that much disk until the owner deletes it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return _read_header(fd).size
    except Corrupt:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Scan:
    used: int
    count: int
    window: w.ReplayWindow


class NamespaceDir:
    """Paths of one namespace's directory and the synchronous operations on it."""

    def __init__(self, data_dir: Path, ns: int) -> None:
        self.root = namespace_dir(data_dir, ns)
        self.shards = self.root / "shards"
        self.tmp = self.root / "tmp"
        self.replay = self.root / "replay"

    def shard_path(self, shard_id: bytes) -> Path:
        h = shard_id.hex()
        return self.shards / h[:2] / h

    def load(self) -> Scan:
        """Create the directories if needed, drop unfinished uploads, count what is stored,
        read the replay window. Raises :class:`ConfigError` if the replay file is damaged
        (refusing is safer than accepting old nonces again)."""
        for d in (self.root, self.shards, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        used = count = 0
        for sub in self.shards.iterdir():
            for f in sub.iterdir():
                if f.name.startswith("."):
                    continue
                used += stored_size(f)
                count += 1
        try:
            window = w.ReplayWindow.from_wire(unpack(self.replay.read_bytes()))
        except FileNotFoundError:
            window = w.ReplayWindow()
        except (OSError, MalformedFrame) as exc:
            raise ConfigError(f"{self.replay}: replay window unreadable ({exc})") from None
        return Scan(used, count, window)

    def save_window(self, window: w.ReplayWindow) -> None:
        replace_file(self.replay, pack(window.to_wire()))

    def commit(self, writer: ShardWriter, shard_id: bytes) -> int:
        """Rename a finished upload into place; the size of the shard it replaced (0: new)."""
        final = self.shard_path(shard_id)
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            fsync_dir(self.shards)
        old = stored_size(final) if final.exists() else -1
        os.replace(writer.path, final)
        fsync_dir(final.parent)
        return old

    def delete(self, shard_id: bytes) -> int:
        """Remove a shard; its size. Raises :class:`Missing`."""
        path = self.shard_path(shard_id)
        size = stored_size(path)
        try:
            path.unlink()
        except FileNotFoundError:
            raise Missing("no such shard") from None
        fsync_dir(path.parent)
        return size


def namespace_dir(data_dir: Path, ns: int) -> Path:
    return data_dir / "ns" / str(ns)


def namespaces_on_disk(data_dir: Path) -> set[int]:
    """Contract ids that have a namespace directory under ``data_dir``."""
    try:
        return {int(p.name) for p in (data_dir / "ns").iterdir() if p.name.isdigit()}
    except FileNotFoundError:
        return set()


def wipe_namespace(data_dir: Path, ns: int) -> bool:
    """Remove a namespace's directory and every shard in it (a cancelled contract).

    The directory is first renamed into ``trash/`` so that a crash midway never leaves a half
    namespace in place. Returns False if there was nothing to wipe.
    """
    src = namespace_dir(data_dir, ns)
    if not src.exists():
        return False
    trash = data_dir / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    dst = trash / f"{ns}.{secrets.token_hex(4)}"
    os.replace(src, dst)
    fsync_dir(src.parent)
    shutil.rmtree(dst, ignore_errors=True)
    return True


def empty_trash(data_dir: Path) -> None:
    shutil.rmtree(data_dir / "trash", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# namespaces file


def write_namespaces_file(path: Path, table: Mapping[int, w.NamespaceInfo]) -> None:
    """Atomically replace the namespaces file with ``table``."""
    doc = {"version": 1, "namespaces": {
        str(ns): {"owner": info.owner.hex(), "quota": info.quota}
        for ns, info in sorted(table.items())}}
    replace_file(path, json.dumps(doc, sort_keys=True, indent=1).encode())


def read_namespaces_file(path: Path) -> dict[int, w.NamespaceInfo]:
    """The table of a namespaces file; empty if the file does not exist.

    Raises :class:`ConfigError` if it cannot be read or is malformed.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
        if doc.get("version") != 1 or not isinstance(doc.get("namespaces"), dict):
            raise ValueError("not a version-1 namespaces file")
        out: dict[int, w.NamespaceInfo] = {}
        for key, item in doc["namespaces"].items():
            owner = bytes.fromhex(item["owner"])
            quota = item["quota"]
            if (not key.isdigit() or len(owner) != 32 or not isinstance(quota, int)
                    or isinstance(quota, bool) or quota < 0):
                raise ValueError(f"bad entry {key!r}")
            out[int(key)] = w.NamespaceInfo(owner, quota)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return out


# ---------------------------------------------------------------------------------------------
# the store (trio side)


@dataclass(slots=True)
class _Namespace:
    dir: NamespaceDir
    used: int
    count: int
    window: w.ReplayWindow
    reserved: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(slots=True)
class Session:
    """Per-connection state: the open upload, if any, and the buffer gets read into."""

    writer: ShardWriter | None = None
    ns: _Namespace | None = None
    expected_hash: bytes = b""
    reserved: int = 0
    # A get's answer is a view of this buffer, overwritten by the connection's next get:
    # serve_connection sends each answer before it reads the next request. Mapped on the
    # first get (sized for the largest one, _READ_SPAN), kept until the connection closes.
    read_buffer: AlignedBuffer = field(default_factory=lambda: AlignedBuffer(_READ_SPAN))

    def release(self) -> None:
        """Abort the open upload: its temp file goes, its quota reservation is returned."""
        if self.writer is not None:
            self.writer.discard()
        if self.ns is not None:
            self.ns.reserved -= self.reserved
        self.writer, self.ns, self.expected_hash, self.reserved = None, None, b"", 0

    def close(self) -> None:
        """The connection is over: :meth:`release`, and unmap the read buffer."""
        self.release()
        self.read_buffer.close()


@dataclass(slots=True)
class Handback:
    """How a worker thread's turn at streaming a connection ended: the client closed it
    (``eof``), or paused or took too long (nothing else set), or a request is left for the
    event loop to answer (``req``; for an append the thread already wrote, ``outcome`` is
    the shard hash if that completed the shard, or why the write failed)."""

    eof: bool = False
    req: w.Request | None = None
    outcome: bytes | Exception | None = None
    answered: int = 0  # requests the thread answered itself


def _refuse(code: w.ErrorCode, message: str) -> w.ShardRefused:
    return w.ShardRefused(code, message)


class ShardStore:
    """Namespaces under ``data_dir``; ``namespaces()`` says which exist, their owners and
    quotas (re-read on every request, so reloads take effect at once)."""

    def __init__(self, data_dir: Path, namespaces: Callable[[], Mapping[int, w.NamespaceInfo]],
                 chain_id: str, *, stream_workers: int = STREAM_WORKERS,
                 stream_linger_s: float = STREAM_LINGER_S) -> None:
        self.data_dir = data_dir
        self.namespaces = namespaces
        self.chain_id = chain_id
        self._loaded: dict[int, _Namespace] = {}
        self._load_lock = trio.Lock()
        self._files = trio.CapacityLimiter(FILE_WORKERS)
        self._stream_workers = stream_workers  # 0: every request on the event loop
        self._streams = trio.CapacityLimiter(max(stream_workers, 1))
        self._stream_linger_s = stream_linger_s
        self.streamed = 0  # requests answered in streaming threads (a statistic)
        self.idle_releases = 0  # times a quiet connection gave its buffers back

    async def _namespace(self, ns: int) -> tuple[_Namespace, w.NamespaceInfo]:
        info = self.namespaces().get(ns)
        if info is None:
            self._loaded.pop(ns, None)
            raise _refuse(w.ErrorCode.UNKNOWN_NAMESPACE, f"no namespace {ns} on this node")
        state = self._loaded.get(ns)
        if state is not None:
            return state, info
        async with self._load_lock:  # one scan per namespace, even for concurrent requests
            state = self._loaded.get(ns)
            if state is None:
                d = NamespaceDir(self.data_dir, ns)
                try:
                    scan = await trio.to_thread.run_sync(d.load)
                except ConfigError as exc:
                    log.error("namespace %d: %s", ns, exc)
                    raise _refuse(w.ErrorCode.INTERNAL, "namespace unavailable") from None
                state = _Namespace(d, scan.used, scan.count, scan.window)
                self._loaded[ns] = state
        return state, info

    async def handle(self, req: w.Request, session: Session,
                     written: bytes | Exception | None = None) -> w.Response:
        """The answer to one request. Never raises for a refused request: the answer is an
        :class:`~zos_agent.shardwire.Error`, and any error closes the session's upload.

        ``written``: the request is an append that a streaming thread already wrote, and
        this is the :class:`Handback` outcome: the shard hash (the append completed the
        shard: check and commit it) or the write's error."""
        try:
            if written is not None and isinstance(req, w.Append):
                if isinstance(written, Exception):
                    raise written
                return await self._written(session, req.shard_id, written, req.hash)
            match req:
                case w.Put():
                    return await self._put(req, session)
                case w.Append():
                    return await self._append(req, session)
                case w.Get():
                    return await self._get(req, session)
                case w.Delete():
                    return await self._delete(req)
                case w.Stat():
                    ns, info = await self._namespace(req.ns)
                    return w.StatResult(ns.used, info.quota, ns.count)
                case w.Verify():
                    return await self._verify(req)
        except w.ShardRefused as exc:
            session.release()
            return w.Error(exc.code, exc.message)
        except OSError as exc:
            session.release()
            log.error("namespace %d: %s", req.ns, exc)
            return w.Error(w.ErrorCode.INTERNAL, f"storage error: {exc.strerror or exc}")
        raise AssertionError(f"unhandled request {req!r}")  # pragma: no cover - exhaustive

    async def _authorize(self, ns: _Namespace, info: w.NamespaceInfo,
                         req: w.SignedRequest, extra: Callable[[], None] | None = None) -> None:
        """Signature, replay and (``extra``) other checks, then the nonce is on disk."""
        async with ns.lock:
            trial = ns.window.copy()
            w.authorize(req, info, self.chain_id, trial)
            if extra is not None:
                extra()
            await trio.to_thread.run_sync(ns.dir.save_window, trial)
            ns.window = trial

    async def _put(self, req: w.Put, session: Session) -> w.Response:
        ns, info = await self._namespace(req.ns)

        def quota() -> None:
            free = info.quota - ns.used - ns.reserved
            if req.size > free:
                raise _refuse(w.ErrorCode.QUOTA_EXCEEDED,
                              f"{req.size} bytes do not fit: {max(free, 0)} of {info.quota} free")

        await self._authorize(ns, info, req, quota)
        ns.reserved += req.size
        session.ns, session.reserved, session.expected_hash = ns, req.size, req.hash
        data, tmp = req.data, ns.dir.tmp

        def start() -> tuple[ShardWriter, bytes | None]:
            # One worker-thread hop: create the temp file and write the first chunk.
            writer = ShardWriter(tmp, req.shard_id, req.size)
            try:
                return writer, writer.write_and_finish(data)
            except BaseException:
                writer.discard()
                raise

        session.writer, shard_hash = await trio.to_thread.run_sync(start, limiter=self._files)
        return await self._written(session, req.shard_id, shard_hash, b"")

    async def _append(self, req: w.Append, session: Session) -> w.Response:
        if session.writer is None or session.ns is None:
            raise _refuse(w.ErrorCode.BAD_STATE, "no upload open")
        if self.namespaces().get(req.ns) is None:
            raise _refuse(w.ErrorCode.UNKNOWN_NAMESPACE, f"namespace {req.ns} was removed")
        shard_hash = await trio.to_thread.run_sync(
            session.writer.write_and_finish, req.data, limiter=self._files)
        return await self._written(session, req.shard_id, shard_hash, req.hash)

    async def _written(self, session: Session, shard_id: bytes, shard_hash: bytes | None,
                       check: bytes) -> w.Response:
        """The answer after a chunk was written: ``accepted``, or (``shard_hash`` given: the
        shard is complete and fsynced) check the hashes and commit."""
        writer, ns = session.writer, session.ns
        if writer is None or ns is None:  # _put sets both; _append checked them
            raise _refuse(w.ErrorCode.BAD_STATE, "no upload open")
        if shard_hash is None:
            return w.Accepted(writer.written)
        for want in (session.expected_hash, check):
            if want and want != shard_hash:
                raise _refuse(w.ErrorCode.BAD_HASH, "the data does not match the given hash")
        async with ns.lock:
            old = await trio.to_thread.run_sync(ns.dir.commit, writer, shard_id)
            ns.used += writer.size - max(old, 0)
            ns.count += old < 0
        session.writer = None  # committed: nothing left to discard
        session.release()
        return w.Stored(writer.size, shard_hash)

    async def _get(self, req: w.Get, session: Session) -> w.Response:
        ns, _ = await self._namespace(req.ns)
        path = ns.dir.shard_path(req.shard_id)
        try:
            hdr, data = await trio.to_thread.run_sync(
                read_range, path, req.offset, req.length, session.read_buffer,
                limiter=self._files)
        except Missing:
            raise _refuse(w.ErrorCode.NOT_FOUND, "no such shard") from None
        except Corrupt as exc:
            log.warning("namespace %d shard %s: %s", req.ns, req.shard_id.hex(), exc)
            raise _refuse(w.ErrorCode.CORRUPT, str(exc)) from None
        # A view of the read buffer, not a copy: the answer is sent before the next read.
        return w.Data(hdr.size, hdr.shard_hash, req.offset, data)

    async def _verify(self, req: w.Verify) -> w.Response:
        ns, _ = await self._namespace(req.ns)
        try:
            hdr = await trio.to_thread.run_sync(
                verify_file, ns.dir.shard_path(req.shard_id), limiter=self._files)
        except Missing:
            raise _refuse(w.ErrorCode.NOT_FOUND, "no such shard") from None
        except Corrupt as exc:
            log.warning("namespace %d shard %s: %s", req.ns, req.shard_id.hex(), exc)
            raise _refuse(w.ErrorCode.CORRUPT, str(exc)) from None
        return w.Verified(hdr.size, hdr.shard_hash)

    async def _delete(self, req: w.Delete) -> w.Response:
        ns, info = await self._namespace(req.ns)
        await self._authorize(ns, info, req)
        async with ns.lock:
            try:
                size = await trio.to_thread.run_sync(ns.dir.delete, req.shard_id)
            except Missing:
                raise _refuse(w.ErrorCode.NOT_FOUND, "no such shard") from None
            ns.used -= size
            ns.count -= 1
        return w.Deleted(size)

    @property
    def stream_linger_s(self) -> float:
        return self._stream_linger_s

    def release_idle(self, conn: w.ServerConnection, session: Session) -> bool:
        """Give back a quiet connection's buffers (payload and read buffer); True if it held
        any. Counted in :attr:`idle_releases`."""
        held = conn.holds_buffer or session.read_buffer.mapped
        conn.release_buffer()
        session.read_buffer.close()
        self.idle_releases += held
        return held

    @property
    def streams(self) -> bool:
        """Whether this store serves streaming connections in worker threads at all."""
        return self._stream_workers > 0

    def can_stream(self) -> bool:
        """Whether a streaming worker thread is free."""
        return self.streams and self._streams.available_tokens > 0

    async def stream(self, conn: w.ServerConnection, session: Session,
                     sock: BlockingSocket, idle_timeout_s: float) -> Handback:
        """Serve the connection's appends (to the open upload) and gets in a worker thread,
        receiving, writing or reading, and answering each there, until the client pauses or
        another request comes; see :class:`Handback`. Raises what the event loop's own
        receiving would (:class:`~zos_agent.shardwire.ShardProtocolError`,
        :class:`trio.BrokenResourceError`, :class:`trio.TooSlowError`)."""
        tally = [0]  # counted even when the turn ends in an exception
        try:
            return await trio.to_thread.run_sync(self._stream, conn, session, sock,
                                                 idle_timeout_s, tally, limiter=self._streams)
        finally:
            self.streamed += tally[0]

    def _stream(self, conn: w.ServerConnection, session: Session, sock: BlockingSocket,
                idle_timeout_s: float, tally: list[int]) -> Handback:
        # In the worker thread: the event loop waits for it, touching neither the connection
        # nor the session meanwhile. Only the common case is served here; anything else (a
        # namespace not loaded yet, a refusal, an error) goes back to the event loop, whose
        # handle() answers it as it answers every request.
        clock = time.monotonic
        turn_ends = clock() + STREAM_TURN_S
        while True:
            req = conn.next_request()
            if isinstance(req, w.NeedData):
                now = clock()
                if now >= turn_ends:
                    return Handback(answered=tally[0])
                try:
                    if (view := conn.payload_view()) is not None:
                        got = sock.recv_into(view, now + self._stream_linger_s)
                        if not got:
                            return Handback(eof=True, answered=tally[0])
                        conn.commit_payload(got)
                    else:
                        data = sock.recv(conn.head_needed, now + self._stream_linger_s)
                        if not data:
                            return Handback(eof=True, answered=tally[0])
                        conn.receive_data(data)
                except Quiet:
                    return Handback(answered=tally[0])
                continue
            answer: w.Accepted | w.Data | bytes | Exception | None
            if isinstance(req, w.Append):
                answer = self._stream_append(req, session)
            elif isinstance(req, w.Get):
                answer = self._stream_get(req, session)
            else:
                answer = None
            if not isinstance(answer, w.Accepted | w.Data):
                return Handback(req=req, outcome=answer, answered=tally[0])
            head, payload = conn.send_parts(answer)
            try:
                deadline = clock() + idle_timeout_s
                sock.send_all(head, deadline)
                if w.nbytes(payload):
                    sock.send_all(payload, deadline)
            except Quiet:
                raise trio.TooSlowError from None
            tally[0] += 1

    def _stream_append(self, req: w.Append, session: Session) -> w.Accepted | bytes | Exception:
        """Write an append's data: ``accepted``, the shard hash if that completed the shard,
        or the error."""
        writer = session.writer
        if writer is None:
            return _refuse(w.ErrorCode.BAD_STATE, "no upload open")
        if self.namespaces().get(req.ns) is None:
            return _refuse(w.ErrorCode.UNKNOWN_NAMESPACE, f"namespace {req.ns} was removed")
        try:
            shard_hash = writer.write_and_finish(req.data)
        except OSError as exc:
            return exc
        return w.Accepted(writer.written) if shard_hash is None else shard_hash

    def _stream_get(self, req: w.Get, session: Session) -> w.Data | None:
        """A get's answer, or None to leave the get to the event loop (a namespace it has not
        loaded, a missing or corrupt shard: answered, and logged, there)."""
        ns = self._loaded.get(req.ns)
        if ns is None or self.namespaces().get(req.ns) is None:
            return None
        try:
            hdr, data = read_range(ns.dir.shard_path(req.shard_id), req.offset, req.length,
                                   session.read_buffer)
        except (Missing, Corrupt, OSError):
            return None
        return w.Data(hdr.size, hdr.shard_hash, req.offset, data)


async def serve_connection(stream: trio.abc.Stream, store: ShardStore, *,
                           idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
    """Serve one client until it closes, breaks the protocol or stays idle too long.

    Whatever goes wrong ends this connection only (its upload is discarded).
    """
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    # Over a socket: one payload buffer for the connection's whole life (see _RECV), and a
    # worker thread may take the connection over while an upload or a run of gets streams
    # (see ShardStore.stream): after an ``accepted`` or a ``data`` answer, if one is free.
    conn = w.ServerConnection(payload_buffer=sock is not None)
    blocking: BlockingSocket | None = None
    if sock is not None and store.streams:
        try:
            blocking = BlockingSocket(sock.fileno())
        except OSError as exc:  # no descriptor left for the duplicate: the event loop alone
            log.warning("serving a connection without a streaming thread: %s", exc)
    session = Session()
    stream_next = False
    try:
        while True:
            if stream_next and blocking is not None and store.can_stream():
                stream_next = False
                back = await store.stream(conn, session, blocking, idle_timeout_s)
                if back.eof:
                    return
                if back.req is None:  # the client paused: the event loop waits for it
                    continue
                stream_next = await _answer(stream, conn, store, session, back.req,
                                            back.outcome, idle_timeout_s)
                del back  # it holds the request's data: a view of the payload buffer
            else:
                req = conn.next_request()
                if isinstance(req, w.NeedData):
                    with trio.fail_after(idle_timeout_s):
                        if sock is None:
                            data = await stream.receive_some(min(max(conn.needed, _RECV), _MAX_RECV))
                        elif (view := conn.payload_view()) is not None:
                            got = await _recv_into(sock, view)
                            if not got:
                                return
                            conn.commit_payload(got)
                            continue
                        elif (conn.needed == w.PREFIX_SIZE
                              and (conn.holds_buffer or session.read_buffer.mapped)):
                            # Between requests, holding buffers: if the client stays quiet,
                            # give them back (an idle connection then holds none).
                            with trio.move_on_after(store.stream_linger_s) as quiet:
                                data = await stream.receive_some(conn.head_needed)
                            if quiet.cancelled_caught:
                                store.release_idle(conn, session)
                                data = await stream.receive_some(conn.head_needed)
                        else:  # the prefix or the header: never past it, into the payload
                            data = await stream.receive_some(conn.head_needed)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                # Over a socket, a put's or append's ``data`` is a view of the connection's
                # payload buffer, which the next frame's payload overwrites. That is safe
                # because a request is finished with before anything more is received:
                # handle() returns only once the worker thread that writes and hashes
                # ``data`` is done (to_thread.run_sync waits for it even when cancelled), and
                # nothing keeps ``data`` afterwards (the Session and ServerConnection.upload
                # keep sizes and hashes, never the bytes). The streaming thread, likewise,
                # writes an append's data before it receives more. Keep it so: a request type
                # that kept ``data`` past handle() would see it change. The other way round,
                # a get's answer is a view of session.read_buffer, which the connection's
                # next get overwrites: it is sent (below) before the next request is read, so
                # before that get. Keep that too: no answer may be queued or sent later.
                # And no reference to either may outlive its turn here (hence the del, and
                # _answer's locals): release_idle() frees the buffers of a quiet connection.
                stream_next = await _answer(stream, conn, store, session, req, None,
                                            idle_timeout_s)
                del req
    except w.ShardProtocolError as exc:
        log.info("closing a connection: %s", exc)
        with trio.move_on_after(1.0):
            try:
                await stream.send_all(conn.error_frame(exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    finally:
        session.close()
        if blocking is not None:
            blocking.close()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def _answer(stream: trio.abc.Stream, conn: w.ServerConnection, store: ShardStore,
                  session: Session, req: w.Request, written: bytes | Exception | None,
                  idle_timeout_s: float) -> bool:
    """Handle ``req`` and send the answer; whether it was ``accepted`` or ``data`` (after
    which more of the same is likely next: a streaming thread may take over)."""
    resp = await store.handle(req, session, written)
    head, payload = conn.send_parts(resp)
    with trio.fail_after(idle_timeout_s):
        if w.nbytes(payload) < _JOIN_BELOW:
            await stream.send_all(head + payload if payload else head)
        else:
            await stream.send_all(head)
            await stream.send_all(payload)
    return isinstance(resp, w.Accepted | w.Data)


async def _recv_into(sock: trio.socket.SocketType, view: memoryview) -> int:
    """``sock.recv_into(view)``, a failure raised as the stream error ``receive_some`` raises."""
    try:
        return await sock.recv_into(view)
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


async def serve_shards(data_dir: Path, namespaces: Callable[[], Mapping[int, w.NamespaceInfo]],
                       chain_id: str, host: str, port: int, *,
                       idle_timeout_s: float = IDLE_TIMEOUT_S,
                       max_connections: int = MAX_CONNECTIONS,
                       stream_workers: int = STREAM_WORKERS,
                       stream_linger_s: float = STREAM_LINGER_S,
                       task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
    """Serve the shard store on ``host:port`` until cancelled; ``started((host, port))``
    with the bound port (``port`` 0 picks one). At most ``max_connections`` at once; a
    connection silent for ``idle_timeout_s`` (mid-frame or between requests) is closed.
    Up to ``stream_workers`` connections at once are served by worker threads while they
    stream (see :meth:`ShardStore.stream`; 0: none, everything on the event loop), each
    handed back to the event loop when its client is silent for ``stream_linger_s``.

    Raises :class:`ConfigError` if the address cannot be bound.
    """
    await trio.to_thread.run_sync(lambda: data_dir.mkdir(parents=True, exist_ok=True))
    await trio.to_thread.run_sync(empty_trash, data_dir)
    store = ShardStore(data_dir, namespaces, chain_id, stream_workers=stream_workers,
                       stream_linger_s=stream_linger_s)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {format_hostport((host, port))}: "
                          f"{exc.strerror or exc}") from None
    bound = listeners[0].socket.getsockname()
    log.info("shard store on %s", format_hostport((host, bound[1])))

    slots = trio.Semaphore(max_connections)

    async def handler(stream: trio.SocketStream) -> None:
        # Bounded: past the limit a new connection is closed at once (each one may hold an
        # upload's temp file and a frame buffer).
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            log.warning("refusing a connection: %d open", max_connections)
            await trio.aclose_forcefully(stream)
            return
        try:
            await serve_connection(stream, store, idle_timeout_s=idle_timeout_s)
        except Exception:
            # A bug met by one request must not take every other client's store down: this
            # connection is closed (serve_connection's finally), the others go on.
            log.exception("connection handler failed")
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started((host, int(bound[1])))


# ---------------------------------------------------------------------------------------------
# the child process


class NamespacesWatcher:
    """The namespaces file's table, re-read when the file changes or on :meth:`reload`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self.table: dict[int, w.NamespaceInfo] = {}
        self.reload()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self) -> None:
        """Re-read the file; on a bad file the previous table stays (logged)."""
        stamp = self._stat()
        try:
            self.table = read_namespaces_file(self.path)
        except ConfigError as exc:
            log.error("keeping the previous namespaces: %s", exc)
        self._stamp = stamp
        log.info("namespaces: %s", sorted(self.table) or "none")

    def poll(self) -> None:
        if self._stat() != self._stamp:
            self.reload()

    async def watch(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as hups:
            async with trio.open_nursery() as nursery:
                async def on_hup() -> None:
                    async for _ in hups:
                        self.reload()

                nursery.start_soon(on_hup)
                while True:
                    await trio.sleep(RELOAD_POLL_S)
                    self.poll()


async def _exit_with_parent(parent_pid: int, scope: trio.CancelScope) -> None:
    # The agent may die by kill -9: the store must not outlive it holding the port that the
    # agent's next start needs (orphans are re-parented, so the parent pid changes). Nothing
    # signals a parent's death portably, hence the poll.
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await trio.sleep(RELOAD_POLL_S)
    log.warning("parent %d is gone: stopping", parent_pid)
    scope.cancel()


async def run_child(data_dir: Path, listen: tuple[str, int], namespaces_file: Path,
                    chain_id: str, parent_pid: int | None = None) -> None:
    """The body of ``python -m zos_agent.shardstore``."""
    watcher = NamespacesWatcher(namespaces_file)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stops:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.watch)
            if parent_pid is not None:
                nursery.start_soon(_exit_with_parent, parent_pid, nursery.cancel_scope)
            host, port = await nursery.start(
                serve_shards, data_dir, lambda: watcher.table, chain_id, *listen)
            print(f"listening {format_hostport((host, port))}", flush=True)
            async for signum in stops:
                log.info("stopping on signal %d", signum)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zos_agent.shardstore",
                                     description="Serve a node's storage namespaces.")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--namespaces-file", required=True, type=Path)
    parser.add_argument("--chain-id", required=True)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the agent) is gone")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s shardstore %(levelname)s %(message)s")
    try:
        listen = parse_hostport(args.listen, what="--listen")
        trio.run(run_child, args.data_dir, listen, args.namespaces_file, args.chain_id,
                 args.parent_pid)
    except (ConfigError, BaseExceptionGroup) as exc:
        error = _config_error(exc)
        if error is None:
            raise
        # One line the agent shows as the namespace workloads' error.
        print(f"shardstore: {error}", file=sys.stderr)
        return 2
    return 0


def _config_error(exc: BaseException) -> ConfigError | None:
    """The configuration error inside ``exc`` (trio wraps task errors in groups)."""
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _config_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
