"""Deployment latency on a devnet: contract submitted -> container running -> "ok" committed.

Starts a devnet with the real command line (``tfgrid devnet up --nodes N``: 4 validator and N
node-agent processes on this machine), pushes a busybox image, then deploys ``--contracts``
single-container contracts one after the other (``node: auto``; placement and signing as
``tfgrid deploy`` does them happen before the clock starts), each measured from the moment the
signed ``contract_create`` is handed to a validator (all watched concurrently, polled every
10 ms):

* create committed: the ``contract_create`` is in a committed block (its proven txresult);
* running: the container is ``running`` in ``runc state`` under its node's runc root;
* ok committed: the contract's state is ``deployed`` (the node's signed result, committed in a
  block and read back with a proof).

Each contract is cancelled (without waiting) after it is measured. The limit it is measured
against, in the same run: a bare ``runc run --detach`` of the same image and the same OCI config
builder (no agent, no ledger, no network namespace), from the command to ``running``.

    sudo .venv/bin/python bench/deploy_latency.py [--contracts 20] [--nodes 3]
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

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cli import chain  # noqa: E402
from cli.deploy import image_sources, pick_node  # noqa: E402
from cli.home import Home  # noqa: E402
from cli.manifest import Manifest, build_deployment, parse_manifest  # noqa: E402
from cli.node import grid_nodes  # noqa: E402
from ledger import keyspace  # noqa: E402
from ledger.client import LedgerClient  # noqa: E402
from ledger.state import sign_deployment  # noqa: E402
from ledger.tx import Tx  # noqa: E402
from zos_agent.images import ImageStore, build_busybox_rootfs, push_image  # noqa: E402
from zos_agent.oci import ContainerSpec, build_config  # noqa: E402

POLL_S = 0.01
TIMEOUT_S = 120.0


def tfgrid(home: Path, *args: str) -> Any:
    script = Path(sys.executable).parent / "tfgrid"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TFGRID_HOME", None)
    proc = subprocess.run([*argv, "--home", str(home), "--json", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"tfgrid {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return (f"p50 {pct(values, 50) * 1000:7.0f} ms   p95 {pct(values, 95) * 1000:7.0f} ms   "
            f"min {min(values) * 1000:6.0f}   max {max(values) * 1000:6.0f}   "
            f"mean {statistics.fmean(values) * 1000:6.0f}")


def runc_status(runc_root: Path, wid: str) -> str | None:
    proc = subprocess.run(["runc", "--root", str(runc_root), "state", wid],
                          capture_output=True, text=True, check=False)
    return json.loads(proc.stdout).get("status") if proc.returncode == 0 else None


# -- the baseline: bare runc ------------------------------------------------------------------


def bare_runc(image_tar: Path, image: str, work: Path, runs: int) -> list[float]:
    """Seconds from `runc run --detach` to a running container, ``runs`` times."""
    store = ImageStore(work / "cache")
    rootfs = trio.run(store.ensure, image, [image_tar.resolve().as_uri()])
    runc_root = work / "runc"
    times = []
    for i in range(runs):
        wid = f"bare{os.getpid()}-{i}"
        bundle = work / "bundles" / wid
        volume = bundle / "data"
        volume.mkdir(parents=True)
        spec = ContainerSpec(workload_id=wid, image=image, command=["sleep", "3600"],
                             cpu=1, memory=64 << 20, disk=32 << 20)
        config = build_config(spec, rootfs=rootfs, volume=volume, netns_path=None,
                              hostname=wid, cgroups_path=f"/tfgrid-bench/{wid}")
        (bundle / "config.json").write_text(json.dumps(config))
        t0 = time.perf_counter()
        subprocess.run(["runc", "--root", str(runc_root), "run", "--detach", "--bundle",
                        str(bundle), wid], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=60)
        while runc_status(runc_root, wid) != "running":
            time.sleep(POLL_S)
        times.append(time.perf_counter() - t0)
        subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", wid],
                       capture_output=True, check=False, timeout=60)
    try:
        Path("/sys/fs/cgroup/memory/tfgrid-bench").rmdir()
    except OSError:
        pass
    for controller in Path("/sys/fs/cgroup").iterdir():
        try:
            (controller / "tfgrid-bench").rmdir()
        except OSError:
            pass
    return times


# -- the grid ---------------------------------------------------------------------------------


async def measure_one(client: LedgerClient, home: Home, manifest: Manifest,
                      roots: dict[int, Path]) -> dict[str, float]:
    """Deploy ``manifest`` and time it from the submission of its signed contract_create:
    {"cid", "created", "running", "ok"} (seconds)."""
    key = home.load_identity()
    genesis = home.load_genesis()
    # Placement, sealing and signing as `tfgrid deploy` does them, before the clock starts.
    grid = await grid_nodes(client, genesis)
    node = pick_node(grid.nodes, manifest.node, manifest.resources())
    deployment = build_deployment(manifest, image_sources=image_sources(home, manifest),
                                  seal=lambda v: v)
    dep_hash, signature = sign_deployment(key, genesis.chain_id, deployment)
    tx = Tx("contract_create", key.public_key, await client.next_nonce(key.public_key),
            chain.default_fee(genesis), {
                "node_id": node.id, "kind": "deployment", "deployment": deployment,
                "deployment_hash": dep_hash, "signature": signature}).signed(key, genesis.chain_id)
    # This bench is the only one creating contracts: the next id is ours.
    cid = await chain.counter(client, "next_contract_id")
    wid = f"c{cid}-main"
    times: dict[str, float] = {"cid": cid}

    async def submit() -> None:
        await client.submit(tx)
        while True:  # polled: the ledger pushes headers, not tx outcomes
            outcome = await chain.read_entry(client, keyspace.tx_result(tx.hash()))
            if outcome is not None:
                break
            await trio.sleep(POLL_S)
        if outcome["code"] != "ok":
            raise SystemExit(f"contract_create failed: {outcome}")
        times["created"] = time.perf_counter() - t0

    async def watch_runc() -> None:
        while True:
            status = await trio.to_thread.run_sync(runc_status, roots[node.id], wid)
            if status == "running":
                times["running"] = time.perf_counter() - t0
                return
            await trio.sleep(POLL_S)

    async def watch_ledger() -> None:
        while True:
            entry = await chain.read_entry(client, keyspace.contract(cid))
            if entry is not None and entry["state"] == "deployed":
                times["ok"] = time.perf_counter() - t0
                return
            if entry is not None and entry["state"] == "error":
                raise SystemExit(f"contract {cid} failed: {entry['results']}")
            await trio.sleep(POLL_S)

    t0 = time.perf_counter()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit)
            nursery.start_soon(watch_runc)
            nursery.start_soon(watch_ledger)
    await chain.send_tx(client, key, genesis, "contract_cancel", {"contract_id": cid})
    return times


async def measure_grid(devnet: Path, image: str,
                       contracts: int) -> tuple[list[float], list[float], list[float]]:
    """Per contract: seconds from submission to (create committed, running, ok committed)."""
    home = Home(devnet)
    status = tfgrid(devnet, "devnet", "status")
    roots = {int(n["id"]): devnet / n["name"] / "runc" for n in status["nodes"]}
    created: list[float] = []
    running: list[float] = []
    committed: list[float] = []
    async with chain.open_client(home) as client:
        for i in range(contracts):
            manifest = parse_manifest("\n".join([
                f"name: bench-{i}", "workloads:", "  - name: main", f"    image: {image}",
                '    command: ["sleep", "3600"]', "    memory: 64MiB", "    disk: 32MiB", ""]))
            t = await measure_one(client, home, manifest, roots)
            created.append(t["created"])
            running.append(t["running"])
            committed.append(t["ok"])
            print(f"  contract {int(t['cid']):3d}: create committed {t['created'] * 1000:5.0f} ms,"
                  f" running {t['running'] * 1000:5.0f} ms, ok committed {t['ok'] * 1000:5.0f} ms",
                  flush=True)
    return created, running, committed


async def _block_interval(devnet: Path) -> float:
    home = Home(devnet)
    async with LedgerClient(home.load_genesis(), list(home.load_context().peers)) as client:
        first, _ = await client.latest()
        await trio.sleep(6)
        last, _ = await client.latest()
    return (last.time_ms - first.time_ms) / max(1, last.height - first.height) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contracts", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the devnet directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: node agents and the baseline run runc")
    work = Path(tempfile.mkdtemp(prefix="tfgrid-deploy-bench."))
    devnet = work / "devnet"
    try:
        image_tar_dir = work / "images"
        rootfs = build_busybox_rootfs(work / "busybox")
        image, _sources = push_image(rootfs, image_tar_dir)
        image_tar = image_tar_dir / f"{image.split(':', 1)[1]}.tar"

        bare = bare_runc(image_tar, image, work / "bare", args.contracts)

        t = time.perf_counter()
        tfgrid(devnet, "devnet", "up", "--validators", "4", "--nodes", str(args.nodes),
               "--farms", str(min(3, args.nodes)), "--dir", str(devnet), "--timeout", "120")
        up_s = time.perf_counter() - t
        tfgrid(devnet, "twin", "register", "bench")
        pushed = tfgrid(devnet, "image", "push", "--local", str(rootfs))
        assert pushed["image"] == image
        interval = trio.run(_block_interval, devnet)
        print(f"machine: {os.cpu_count()} cpus; devnet of 4 validators and {args.nodes} node "
              f"agents up in {up_s:.1f} s; mean block interval while idle {interval:.2f} s")
        print(f"{args.contracts} contracts, one at a time, node: auto:")
        created, running, committed = trio.run(measure_grid, devnet, image, args.contracts)
    finally:
        if (devnet / "devnet.json").exists():
            tfgrid(devnet, "devnet", "down")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"submit -> create committed  : {summary(created)}")
    print(f"submit -> container running : {summary(running)}")
    print(f"submit -> ok committed      : {summary(committed)}")
    print(f"bare `runc run -d` (limit)  : {summary(bare)}")


if __name__ == "__main__":
    main()
