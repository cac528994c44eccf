"""`tfgrid deploy MANIFEST`: turn a manifest into a signed contract and wait until it runs.

Steps: parse the manifest (nothing leaves the machine if it is invalid); choose the node
(``auto``: among the nodes that are up and have room, the one with the most free cores, then
memory; ``farm: ID``: the same within one farm; a node id: that node, and the ledger decides
whether it has room); build the deployment with every secret sealed to that node's key; sign
it; submit ``contract_create``; then, unless ``--no-wait``, follow the contract until every
workload is ``ok`` (state ``deployed``) or fail with the node's reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import trio

from cli import chain
from cli.contract import ContractFailed, contract_doc, failure_reason, wait_contract
from cli.home import Home
from cli.image import local_sources
from cli.manifest import Manifest, NodeChoice, build_deployment, load_manifest
from cli.node import NodeInfo, grid_nodes, node_hint, node_info
from cli.output import emit, human_bytes, json_option
from cli.twin import twin_of_key
from ledger import keys, keyspace
from ledger.client import LedgerClient
from ledger.errors import LedgerTimeout, NotFound, TfgridError
from ledger.state import sign_deployment
from ledger.types import Genesis
from zos_agent.secrets import seal_secret

DEPLOY_TIMEOUT_S = 180.0
FIND_ATTEMPTS = 20


class NoCapacity(TfgridError):
    """No node that is up has room for the deployment, or the node asked for is down."""


def _describe(res: dict[str, int]) -> str:
    return (f"cpu {res['cpu']}, memory {human_bytes(res['memory'])}, "
            f"disk {human_bytes(res['disk'])}")


def pick_node(nodes: list[NodeInfo], choice: NodeChoice, resources: dict[str, int]) -> NodeInfo:
    """The node ``auto``/``farm`` placement chooses. Raises :class:`NoCapacity`."""
    pool = [n for n in nodes if choice.mode != "farm" or n.farm == choice.id]
    if not pool:
        where = f"farm {choice.id} has no nodes" if choice.mode == "farm" else "no nodes yet"
        raise NoCapacity(f"cannot place the deployment: {where}")
    fitting = [n for n in pool if n.up and n.fits(resources)]
    if not fitting:
        up = sum(1 for n in pool if n.up)
        scope = f"in farm {choice.id} " if choice.mode == "farm" else ""
        raise NoCapacity(f"no node {scope}that is up has room for {_describe(resources)} "
                         f"({len(pool)} nodes, {up} up; see `tfgrid capacity --by node`)")
    return max(fitting, key=lambda n: (n.free()["cores"], n.free()["memory"], -n.id))


def image_sources(home: Home, manifest: Manifest) -> dict[str, list[str]]:
    """Sources of the manifest's images found in this home's image store."""
    return {img: local_sources(home, img) for img in manifest.images()}


async def _choose(client: LedgerClient, genesis: Genesis, manifest: Manifest) -> NodeInfo:
    if manifest.node.mode == "node" and manifest.node.id is not None:
        # The ledger decides whether the node has room; but a contract on a node that is down
        # would be paid for and not run, so that is refused here.
        info = await node_info(client, genesis, manifest.node.id)
        if not info.up:
            raise NoCapacity(f"node {info.id} is down (no recent uptime report): choose "
                             "another node, or node: auto")
        return info
    grid = await grid_nodes(client, genesis)
    return pick_node(grid.nodes, manifest.node, manifest.resources())


async def _find_contract(client: LedgerClient, node_id: int, owner_key: bytes,
                         dep_hash: bytes) -> int:
    """The id of the live contract on ``node_id`` with our key and deployment hash."""
    for _ in range(FIND_ATTEMPTS):
        listed = await chain.read_entry(client, keyspace.node_contracts(node_id))
        for cid in sorted((int(c) for c in (listed or {}).get("contracts", [])), reverse=True):
            entry = await chain.read_entry(client, keyspace.contract(cid))
            if (entry is not None and bytes(entry["owner_key"]) == owner_key
                    and bytes(entry["deployment_hash"]) == dep_hash):
                return cid
        # The peer that answered may lag the one that committed our tx by a block.
        await trio.sleep(0.25)
    raise NotFound(f"the contract was committed but cannot be found on node {node_id}")


async def deploy_manifest(client: LedgerClient, home: Home, key: keys.KeyPair,
                          genesis: Genesis, manifest: Manifest, *, wait: bool,
                          timeout_s: float) -> dict[str, Any]:
    """Create the contract for ``manifest``; return the `deploy` document.

    Raises :class:`NotFound` (no twin, unknown node), :class:`NoCapacity`,
    :class:`~cli.chain.TxFailed` (the ledger refused, e.g. ``overbooked``),
    :class:`ContractFailed` (the node reported an error) or :class:`LedgerTimeout`.
    """
    if await twin_of_key(client, key.public_key) is None:
        raise NotFound("this identity has no twin: run `tfgrid twin register NAME` first")
    node = await _choose(client, genesis, manifest)
    deployment = build_deployment(
        manifest, image_sources=image_sources(home, manifest),
        seal=lambda value: seal_secret(node.public_key, value))
    dep_hash, signature = sign_deployment(key, genesis.chain_id, deployment)
    try:
        await chain.send_tx(client, key, genesis, "contract_create", {
            "node_id": node.id, "kind": "deployment", "deployment": deployment,
            "deployment_hash": dep_hash, "signature": signature})
    except chain.TxFailed as exc:
        if exc.code != "overbooked":
            raise
        free = (await node_info(client, genesis, node.id)).free()
        have = {"cpu": free["cores"], "memory": free["memory"], "disk": free["storage"]}
        raise chain.TxFailed(exc.tx_type, exc.code,
                             f"{exc.message}: it asks {_describe(manifest.resources())}, "
                             f"node {node.id} has {_describe(have)} free") from None
    cid = await _find_contract(client, node.id, key.public_key, dep_hash)
    if not wait:
        doc = contract_doc(await chain.read_entry(client, keyspace.contract(cid)) or {})
    else:
        try:
            doc = await wait_contract(
                client, cid, timeout_s=timeout_s, what="deployed",
                done=lambda d: d["state"] != "created")
        except LedgerTimeout as exc:
            raise LedgerTimeout(f"{exc}{await node_hint(client, genesis, node.id)}") from None
        if doc["state"] != "deployed":
            raise ContractFailed(f"contract {cid} on node {node.id} failed: "
                                 f"{failure_reason(doc)}")
    return {"contract": cid, "node": node.id, "state": doc["state"],
            "workloads": doc["workloads"]}


def _human(d: dict[str, Any]) -> str:
    lines = [f"contract {d['contract']} on node {d['node']}: {d['state']}"]
    for w in d["workloads"]:
        end = f"  {w['endpoint']}" if w["endpoint"] else ""
        lines.append(f"  {w['name']}: {w['state']}{end}")
    return "\n".join(lines)


@click.command()
@json_option
@click.argument("manifest_path", metavar="MANIFEST",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until every workload is ok (or fail with the node's reason).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=DEPLOY_TIMEOUT_S,
              show_default=True, help="Seconds to wait for the node.")
@click.pass_context
def deploy(ctx: click.Context, manifest_path: Path, wait: bool, timeout_s: float) -> None:
    """Deploy the workloads of a YAML MANIFEST on a node (design section 7)."""
    manifest = load_manifest(manifest_path)
    home = chain.home_of(ctx)
    key = home.load_identity()
    genesis = home.load_genesis()

    async def go() -> dict[str, Any]:
        async with chain.open_client(home) as client:
            return await deploy_manifest(client, home, key, genesis, manifest, wait=wait,
                                         timeout_s=timeout_s)

    emit(ctx, chain.run(go), _human)
