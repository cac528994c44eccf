"""The pieces of `tfgrid storage` that need no grid: the progress line, the byte-counting
stream under the client, and the argument checks that fail before any connection."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from click.testing import CliRunner

from cli import storage
from cli.main import cli


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_with_a_total() -> None:
    clock = FakeClock()
    p = storage.Progress("put x", 4 << 20, clock)
    clock.now += 2.0
    p.moved = 1 << 20
    line = p.line(clock.now)
    assert line.startswith("put x [" + "#" * 6 + "." * 18 + "]")
    assert " 25% " in line
    assert "1.0 MiB at 512.0 KiB/s" in line


def test_progress_line_without_a_total_and_never_past_100() -> None:
    clock = FakeClock()
    p = storage.Progress("get y", None, clock)
    p.moved = 3000
    assert p.line(clock.now + 1) == "get y: 2.9 KiB at 2.9 KiB/s"
    p.total = 1000
    assert "100%" in p.line(clock.now + 1)


def test_progress_is_silent_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    p = storage.Progress("put z", 10)
    p.add(5)
    p.done()
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", "")


def test_counting_stream_counts_both_directions() -> None:
    counted: list[int] = []

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        counting = storage.CountingStream(a, counted.append)
        await counting.send_all(b"hello")
        assert await b.receive_some(100) == b"hello"
        await b.send_all(b"world!")
        assert await counting.receive_some(100) == b"world!"
        await counting.aclose()

    trio.run(main)
    assert counted == [5, 6]


def test_get_without_output_for_an_unknown_object_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "storage", "get", "tfs:whatever"])
    assert result.exit_code == 2
    assert "pass -o OUT" in result.output


def test_put_of_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "storage", "put",
                                      str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_ls_of_an_empty_home(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "storage", "ls", "--json"])
    assert result.exit_code == 0
    assert result.output.strip() == "[]"
