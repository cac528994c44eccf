"""Idle footprint of the node agent: 20 agents on a devnet, memory and CPU over 60 s.

Starts ``tfgrid devnet up --nodes 20 --farms 5`` (4 validators and 20 real agent processes on
this machine), waits until every node is up, lets the grid idle for ``--seconds`` and then
reports, per agent process: resident memory (RSS, and USS: the pages only it holds) and CPU
time used over the window as a percentage of one core. The validators are reported the same
way, for scale.

Measured against, in the same run: an idle Python process that imported what the agent imports
(trio, pynacl, msgpack, the ledger client and the agent modules) and sleeps: the floor any
Python agent pays before it does anything.

    sudo .venv/bin/python bench/agent_footprint.py [--nodes 20] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
FLOOR_CODE = ("import trio, nacl.signing, msgpack, ledger.client, zos_agent.main, time; "
              "print('ready', flush=True); time.sleep(3600)")


def tfgrid(home: Path, *args: str) -> Any:
    script = Path(sys.executable).parent / "tfgrid"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TFGRID_HOME", None)
    proc = subprocess.run([*argv, "--home", str(home), "--json", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"tfgrid {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def cpu_seconds(p: psutil.Process) -> float:
    """CPU time of ``p`` and of the children it has waited for (an agent's runc runs)."""
    t = p.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def memory(p: psutil.Process) -> tuple[int, int]:
    info = p.memory_full_info()
    return int(info.rss), int(info.uss)


def describe(name: str, procs: list[psutil.Process], cpu0: dict[int, float],
             seconds: float) -> None:
    rss, uss, cpu = [], [], []
    for p in procs:
        r, u = memory(p)
        rss.append(r / MIB)
        uss.append(u / MIB)
        cpu.append((cpu_seconds(p) - cpu0[p.pid]) / seconds * 100)
    print(f"{name} ({len(procs)} processes):")
    print(f"  RSS  MiB: mean {statistics.fmean(rss):6.1f}  min {min(rss):6.1f}  "
          f"max {max(rss):6.1f}  total {sum(rss):7.1f}")
    print(f"  USS  MiB: mean {statistics.fmean(uss):6.1f}  min {min(uss):6.1f}  "
          f"max {max(uss):6.1f}  total {sum(uss):7.1f}")
    print(f"  CPU %   : mean {statistics.fmean(cpu):6.2f}  min {min(cpu):6.2f}  "
          f"max {max(cpu):6.2f}  total {sum(cpu):7.2f}  (% of one core over {seconds:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--farms", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: node agents run runc")
    work = Path(tempfile.mkdtemp(prefix="tfgrid-footprint."))
    devnet = work / "devnet"
    floor = subprocess.Popen([sys.executable, "-c", FLOOR_CODE], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert floor.stdout is not None
        floor.stdout.readline()
        t = time.perf_counter()
        up = tfgrid(devnet, "devnet", "up", "--validators", "4", "--nodes", str(args.nodes),
                    "--farms", str(args.farms), "--dir", str(devnet), "--timeout", "300")
        up_s = time.perf_counter() - t
        agents = [psutil.Process(n["pid"]) for n in up["nodes"]]
        validators = [psutil.Process(v["pid"]) for v in up["validators"]]
        floor_p = psutil.Process(floor.pid)
        everyone = [*agents, *validators, floor_p]
        print(f"machine: {os.cpu_count()} cpus, {psutil.virtual_memory().total / MIB:.0f} MiB; "
              f"devnet of 4 validators and {args.nodes} agents on {args.farms} farms "
              f"up in {up_s:.1f} s; idling {args.seconds:.0f} s")
        cpu0 = {p.pid: cpu_seconds(p) for p in everyone}
        time.sleep(args.seconds)
        status = tfgrid(devnet, "devnet", "status")
        down = [n["name"] for n in status["nodes"] if n["status"] != "up" or not n["alive"]]
        describe("node agents", agents, cpu0, args.seconds)
        describe("validators", validators, cpu0, args.seconds)
        describe("floor: idle python with the agent's imports", [floor_p], cpu0, args.seconds)
        print(f"nodes not up at the end: {', '.join(down) or 'none'}")
    finally:
        floor.kill()
        floor.wait()
        if (devnet / "devnet.json").exists():
            tfgrid(devnet, "devnet", "down")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
