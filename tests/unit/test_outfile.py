"""OutputFile: the bytes written are the bytes on disk, with or without O_DIRECT."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from threebot.storage.outfile import ALIGN, OutputFile


def write_pieces(directory: Path, pieces: list[bytes], max_piece: int) -> tuple[bytes, bool]:
    fd, tmp = tempfile.mkstemp(dir=directory)
    out = OutputFile(fd, tmp, max_piece)
    try:
        direct = out.direct
        for piece in pieces:
            out.write(piece)
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
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 1 << 20)
    assert out.direct
    real_pwrite = os.pwrite

    def picky(target: int, data: bytes | memoryview, offset: int) -> int:
        if target != fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(target, data, offset)

    monkeypatch.setattr(os, "pwrite", picky)
    pieces = [os.urandom(1 << 20), os.urandom(1 << 20), os.urandom(99)]
    try:
        for piece in pieces:
            out.write(piece)
        assert not out.direct
        out.finish()
    finally:
        out.close()
        os.close(fd)
    assert Path(tmp).read_bytes() == b"".join(pieces)


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 1 << 20)

    def full(target: int, data: bytes | memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    try:
        with pytest.raises(OSError, match="No space") as info:
            out.write(b"x" * (1 << 20))
        assert info.value.errno == errno.ENOSPC
    finally:
        out.close()
        os.close(fd)


def test_small_pieces_never_go_direct(tmp_path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    out = OutputFile(fd, tmp, 100)
    try:
        assert not out.direct
    finally:
        out.close()
        os.close(fd)
