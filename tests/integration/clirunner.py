"""Running the real `tfgrid` command line from integration tests, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def tfgrid_argv() -> list[str]:
    """The installed console script, or the module when the venv has no script."""
    script = Path(sys.executable).parent / "tfgrid"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_tfgrid(home: Path, *args: str, ok: bool, timeout_s: float) -> Result:
    """Run `tfgrid --home HOME ARGS...`; with ``ok`` the command must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TFGRID_HOME"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([*tfgrid_argv(), "--home", str(home), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if ok:
        assert result.code == 0, f"tfgrid {' '.join(args)} failed: {result.stderr}"
    return result
