"""Run host tools (runc, ip, iptables, mount, mkfs) from trio with a deadline and typed errors.

Every external command the runtime issues goes through :func:`run`, so that a hung tool can
never stall the agent loop and no ``subprocess``/``OSError`` leaks out of the package.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import trio

from zos_agent.errors import RuntimeFailure

DEFAULT_TIMEOUT = 30.0
_STDERR_TAIL = 2000


async def run(
    argv: Sequence[str],
    *,
    time_limit: float = DEFAULT_TIMEOUT,
    error: type[RuntimeFailure] = RuntimeFailure,
    check: bool = True,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv``, capturing stdout and stderr.

    Raises ``error`` (a :class:`RuntimeFailure` subclass) when the program is missing, does not
    finish within ``time_limit`` seconds (it is then killed), or exits non-zero while ``check``.
    """
    try:
        with trio.fail_after(time_limit):
            proc = await trio.run_process(
                list(argv),
                stdin=stdin if stdin is not None else b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError as exc:
        raise error(f"{argv[0]} timed out after {time_limit:g}s: {' '.join(argv)}") from exc
    except OSError as exc:
        raise error(f"cannot run {argv[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        raise error(describe_failure(argv, proc))
    return proc


def describe_failure(argv: Sequence[str], proc: subprocess.CompletedProcess[bytes]) -> str:
    err = (proc.stderr or b"").decode(errors="replace").strip()[-_STDERR_TAIL:]
    return f"{' '.join(argv)} exited {proc.returncode}: {err or '(no stderr)'}"
