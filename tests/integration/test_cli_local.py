"""The `tfgrid` commands that need no ledger, the error boundary, and devnet process records.

Fast: commands run in-process through ``cli.main.main``; the process tests use `sleep`.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from cli import procs
from cli.main import main
from ledger import keys


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tfgrid: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_identity_create_show_and_file_mode(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--home", str(tmp_path), "identity", "create", "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"address", "mnemonic"}
    assert len(doc["mnemonic"].split()) == 24
    assert keys.KeyPair.from_mnemonic(doc["mnemonic"]).address == doc["address"]
    mode = stat.S_IMODE((tmp_path / "identity.json").stat().st_mode)
    assert mode == 0o600
    # without a ledger context, show still tells the address (no twin can be known)
    code, out, _ = run(capsys, "--json", "--home", str(tmp_path), "identity", "show")
    assert code == 0
    assert json.loads(out) == {"address": doc["address"], "twin": None}
    # never silently replace a key
    code, out, err = run(capsys, "--home", str(tmp_path), "identity", "create")
    assert code == 1
    assert out == ""
    assert doc["address"] in one_line_error(err)


def test_identity_restore_from_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words = keys.new_mnemonic(bytes(range(32)))
    (tmp_path / "words").write_text(words + "\n")
    code, out, _ = run(capsys, "--home", str(tmp_path / "h"), "--json", "identity", "restore",
                       "--mnemonic-file", str(tmp_path / "words"))
    assert code == 0
    assert json.loads(out) == {"address": keys.KeyPair.from_mnemonic(words).address}
    # restoring the same words again is fine; a wrong checksum is a one-line error
    assert run(capsys, "--home", str(tmp_path / "h"), "identity", "restore",
               "--mnemonic-file", str(tmp_path / "words"))[0] == 0
    (tmp_path / "bad").write_text(" ".join(words.split()[:-1] + ["abandon"]))
    code, _, err = run(capsys, "--home", str(tmp_path / "h2"), "identity", "restore",
                       "--mnemonic-file", str(tmp_path / "bad"))
    assert code == 1
    assert "mnemonic" in one_line_error(err)


def test_commands_without_context_say_what_to_do(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "--home", str(tmp_path), "identity", "create")
    for argv in (("account", "balance"), ("ledger", "status"), ("twin", "lookup", "x"),
                 ("farm", "list"), ("devnet", "status")):
        code, out, err = run(capsys, "--home", str(tmp_path), *argv)
        assert code == 1, argv
        assert out == ""
        line = one_line_error(err)
        assert "tfgrid context set" in line or "devnet up" in line


def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--home", str(tmp_path), "account", "transfer", "abc")
    assert code == 2
    assert "Missing argument" in one_line_error(err)
    code, _, err = run(capsys, "--home", str(tmp_path), "context", "set", "--peers", "nope")
    assert code == 1
    assert "HOST:PORT" in one_line_error(err)
    code, _, err = run(capsys, "--home", str(tmp_path), "farm", "create", "f", "--country", "B3")
    assert code == 1
    assert "country" in one_line_error(err)


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--debug", "--home", str(tmp_path), "account", "balance")
    assert code == 1
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("tfgrid: error: ")


def test_bad_devnet_shape_is_refused_before_anything_is_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "devnet", "up", "--nodes", "2", "--farms", "0",
                       "--dir", str(tmp_path / "d"))
    assert code == 2
    assert "--farms" in one_line_error(err)
    assert not (tmp_path / "d").exists()


def test_process_records_stop_exactly_their_process(tmp_path: Path) -> None:
    env = dict(os.environ)
    rec = procs.spawn(["/bin/sleep", "60"], log_path=tmp_path / "sleep.log", env=env)
    try:
        assert procs.is_alive(rec)
        # A record whose start time differs is another process that reused the pid: not ours.
        impostor = procs.ProcessRecord(rec.pid, rec.started + 1)
        assert not procs.is_alive(impostor)
        procs.stop(impostor, grace_s=0.1)
        assert procs.is_alive(rec)
        procs.stop(rec, grace_s=5.0)
        assert not procs.is_alive(rec)
    finally:
        procs.stop(rec, grace_s=0.1)


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('ready', flush=True); time.sleep(60)"
    log = tmp_path / "stubborn.log"
    rec = procs.spawn([sys.executable, "-c", code], log_path=log, env=dict(os.environ))
    try:
        while "ready" not in log.read_text():  # the handler is installed once it says so
            assert procs.is_alive(rec)
            time.sleep(0.01)
        procs.stop(rec, grace_s=0.2)
        assert not procs.is_alive(rec)
    finally:
        procs.stop(rec, grace_s=0.1)
