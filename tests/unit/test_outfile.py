"""OutputFile: the bytes written are the bytes on disk, with or without O_DIRECT."""

from __future__ import annotations

import errno
import os
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from threebot.storage.outfile import ALIGN, OutputFile


def offsets(pieces: list[bytes]) -> list[int]:
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    return starts[:-1]


def write_pieces(directory: Path, pieces: list[bytes], max_piece: int,
                 order: list[int] | None = None) -> tuple[bytes, bool]:
    """Write ``pieces`` (in ``order``, default first to last) into a new file; its bytes and
    whether it was still written with O_DIRECT at the end."""
    fd, tmp = tempfile.mkstemp(dir=directory)
    out = OutputFile(fd, tmp, max_piece, sum(map(len, pieces)))
    at = offsets(pieces)
    try:
        for i in range(len(pieces)) if order is None else order:
            out.write_at(at[i], pieces[i])
        direct = out.direct
        out.finish()
        assert out.size == sum(map(len, pieces))
    finally:
        out.close()
        os.close(fd)
    return Path(tmp).read_bytes(), direct


@pytest.mark.parametrize("sizes", [
    [1 << 20, 1 << 20, 12_345],  # whole segments, then a short last one (padded, cut back)
    [1 << 20],
    [ALIGN, ALIGN * 3, 1],
    [1000, 1 << 20, 5000],  # unaligned from the first piece on: the page cache path
    [],
])
def test_bytes_on_disk_are_the_bytes_written(tmp_path: Path, sizes: list[int]) -> None:
    pieces = [os.urandom(n) for n in sizes]
    data, _ = write_pieces(tmp_path, pieces, 1 << 20)
    assert data == b"".join(pieces)


def test_direct_where_the_filesystem_allows_it(tmp_path: Path) -> None:
    # The tests' temporary directory is on the machine's disk (ext4 on CI): O_DIRECT works.
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.fail(f"{tmp_path} does not take O_DIRECT; this test needs a disk-backed tmp dir")
    data, direct = write_pieces(tmp_path, [b"a" * (1 << 20), b"b" * 10], 1 << 20)
    assert direct
    assert data == b"a" * (1 << 20) + b"b" * 10


@pytest.mark.parametrize("sizes", [
    [1 << 20] * 6 + [12_345],  # whole segments and a short last one, padded when direct
    [ALIGN * 2 + 100] * 5,  # aligned starts, unaligned lengths: padding would clobber the next
    [1000] * 9 + [17],  # nothing aligned: the page cache
])
def test_pieces_written_in_any_order_and_from_threads(tmp_path: Path, sizes: list[int]) -> None:
    """A get's decoding threads write segments where they belong, as each is decoded: any
    order, several at once. No piece may clobber another (a direct write pads only the
    file's last piece)."""
    pieces = [os.urandom(n) for n in sizes]
    backwards = list(range(len(pieces)))[::-1]
    data, _ = write_pieces(tmp_path, pieces, max(sizes), order=backwards)
    assert data == b"".join(pieces)

    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, max(sizes), sum(sizes))
    at = offsets(pieces)
    try:
        with ThreadPoolExecutor(3) as pool:
            # shuffled, then run three at a time
            order = random.Random(7).sample(range(len(pieces)), len(pieces))
            list(pool.map(lambda i: out.write_at(at[i], pieces[i]), order))
        out.finish()
    finally:
        out.close()
        os.close(fd)
    assert Path(tmp).read_bytes() == b"".join(pieces)


def test_a_piece_outside_the_file_is_refused(tmp_path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 1 << 20, 10_000)
    try:
        for offset, n in [(9_000, 1_001), (-1, 5), (0, (1 << 20) + 1)]:
            with pytest.raises(OSError, match="does not fit") as info:
                out.write_at(offset, bytes(n))
            assert info.value.errno == errno.EINVAL
        out.write_at(9_000, bytes(1_000))  # the last byte is in
    finally:
        out.close()
        os.close(fd)


def test_tmpfs_round_trips() -> None:
    # tmpfs takes O_DIRECT on recent kernels and refuses it on older ones: either way the
    # bytes must come out right.
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("/dev/shm (tmpfs) is missing on this machine")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        pieces = [os.urandom(1 << 20), os.urandom(777)]
        data, _ = write_pieces(Path(d), pieces, 1 << 20)
    assert data == b"".join(pieces)


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [os.urandom(1 << 20), os.urandom(1 << 20), os.urandom(99)]
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 1 << 20, sum(map(len, pieces)))
    assert out.direct
    real_pwrite = os.pwrite

    def picky(target: int, data: bytes | memoryview, offset: int) -> int:
        if target != fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(target, data, offset)

    monkeypatch.setattr(os, "pwrite", picky)
    try:
        for offset, piece in zip(offsets(pieces), pieces, strict=True):
            out.write_at(offset, piece)
        assert not out.direct
        out.finish()
    finally:
        out.close()
        os.close(fd)
    assert Path(tmp).read_bytes() == b"".join(pieces)


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 1 << 20, 1 << 20)

    def full(target: int, data: bytes | memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    try:
        with pytest.raises(OSError, match="No space") as info:
            out.write_at(0, b"x" * (1 << 20))
        assert info.value.errno == errno.ENOSPC
    finally:
        out.close()
        os.close(fd)


def test_small_pieces_never_go_direct(tmp_path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 100, 1000)
    try:
        assert not out.direct
    finally:
        out.close()
        os.close(fd)


def test_a_failing_fill_writes_nothing(tmp_path: Path) -> None:
    """A get decrypts into the buffer it writes from: a segment that does not authenticate
    raises in ``fill`` and must leave the file as it was."""
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 1 << 20, 2 << 20)
    try:
        def bad(dest: memoryview) -> None:
            dest[:10] = b"garbage!!!"
            raise ValueError("does not authenticate")

        with pytest.raises(ValueError, match="authenticate"):
            out.fill_at(0, 1 << 20, bad)
        out.write_at(1 << 20, b"b" * (1 << 20))
        out.finish()
    finally:
        out.close()
        os.close(fd)
    assert Path(tmp).read_bytes() == bytes(1 << 20) + b"b" * (1 << 20)


def test_an_empty_piece_still_calls_fill(tmp_path: Path) -> None:
    """The empty object is one segment of zero bytes whose tag must still be checked."""
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 1 << 20, 0)
    seen: list[int] = []
    try:
        out.fill_at(0, 0, lambda dest: seen.append(len(dest)))
        out.finish()
    finally:
        out.close()
        os.close(fd)
    assert seen == [0]
    assert Path(tmp).read_bytes() == b""
