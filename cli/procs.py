"""Background processes that a devnet owns, identified by pid *and* start time.

A recorded pid alone could be reused by an unrelated process after ours exited, so every
record keeps the kernel's start time of the process (``/proc/PID/stat`` field 22, in clock
ticks since boot: exact, no float comparison), and nothing is ever signalled unless both
match. Processes are never looked up or signalled by name. Linux only, like the grid.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.05
KILL_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    pid: int
    started: int  # start time in clock ticks since boot

    def to_doc(self) -> dict[str, int]:
        return {"pid": self.pid, "started": self.started}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of ``pid``, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ".
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def spawn(argv: list[str], *, log_path: Path, env: dict[str, str]) -> ProcessRecord:
    """Start ``argv`` in its own session, stdin from /dev/null, stdout+stderr appended to the log.

    The process outlives this one: nobody waits for it, ``stop`` ends it. Raises OSError.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawn(
            argv[0], argv, env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null_fd, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(log_fd)
        os.close(null_fd)
    st = _stat(pid)  # our unreaped child: present even if it already exited
    if st is None:
        raise OSError(f"{argv[0]} vanished right after it started; see {log_path}")
    return ProcessRecord(pid, st[1])


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is an exited child of this process."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_alive(rec: ProcessRecord) -> bool:
    """True if the recorded process (same pid and start time) runs and is not a zombie."""
    _reap(rec.pid)
    st = _stat(rec.pid)
    return st is not None and st[1] == rec.started and st[0] not in ("Z", "X")


def _signal(rec: ProcessRecord, sig: signal.Signals) -> None:
    if is_alive(rec):
        try:
            os.kill(rec.pid, sig)
        except ProcessLookupError:
            pass


def _wait_dead(recs: list[ProcessRecord], timeout_s: float) -> list[ProcessRecord]:
    """Wait until all of ``recs`` are gone or ``timeout_s`` passed; return the survivors."""
    deadline = time.monotonic() + timeout_s
    while True:
        survivors = [r for r in recs if is_alive(r)]
        if not survivors or time.monotonic() >= deadline:
            return survivors
        time.sleep(POLL_S)


def stop_all(recs: list[ProcessRecord], *, grace_s: float = 10.0) -> None:
    """SIGTERM all, then SIGKILL those still alive after ``grace_s`` (one shared deadline).

    Raises OSError if a process survives SIGKILL.
    """
    for rec in recs:
        _signal(rec, signal.SIGTERM)
    survivors = _wait_dead(recs, grace_s)
    for rec in survivors:
        _signal(rec, signal.SIGKILL)
    survivors = _wait_dead(survivors, KILL_WAIT_S)
    if survivors:
        raise OSError(f"process(es) {', '.join(str(r.pid) for r in survivors)} survived SIGKILL")


def stop(rec: ProcessRecord, *, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if still alive after ``grace_s``. Raises OSError if it survives."""
    stop_all([rec], grace_s=grace_s)
