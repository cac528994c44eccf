"""`tfgrid contract list|show|cancel`: contracts, with the node's signed per-workload results.

A contract's ``state`` is the ledger's (created, deployed, error, grace, cancelled; see
:mod:`ledger.state`); each workload's ``state`` is what its node last reported (ok, error,
deleted) or ``pending`` while the node has reported nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import trio

from cli import chain
from cli.node import node_hint
from cli.output import emit, json_option, progress, progress_done, table
from cli.twin import twin_of_key
from ledger import keyspace
from ledger.client import LedgerClient
from ledger.errors import LedgerTimeout, LedgerUnavailable, NotFound, TfgridError

PENDING = "pending"
POLL_INTERVAL_S = 0.5
CANCEL_TIMEOUT_S = 60.0


class ContractFailed(TfgridError):
    """A contract's node reported an error, or the contract ended before it was deployed."""


def contract_doc(entry: dict[str, Any]) -> dict[str, Any]:
    """The `contract show` document: {"id","owner","node","state","workloads":[{"name",
    "kind","state","message","endpoint"}]} plus the deployment name and version."""
    results = {str(r["name"]): r for r in entry.get("results", [])}
    workloads = []
    for w in entry.get("deployment", {}).get("workloads", []):
        r = results.get(str(w.get("name")))
        workloads.append({
            "name": w.get("name"),
            "kind": w.get("kind"),
            "state": PENDING if r is None else r.get("state"),
            "message": "" if r is None else r.get("message", ""),
            "endpoint": "" if r is None else r.get("endpoint", ""),
        })
    return {
        "id": int(entry["id"]),
        "owner": int(entry["owner"]),
        "node": int(entry["node"]),
        "state": entry.get("state"),
        "workloads": workloads,
        "name": entry.get("deployment", {}).get("name"),
        "version": int(entry.get("version", 1)),
    }


async def read_contract(client: LedgerClient, contract_id: int) -> dict[str, Any]:
    """The contract entry, read with its proof. Raises :class:`NotFound`."""
    entry = await chain.read_entry(client, keyspace.contract(contract_id))
    if entry is None:
        raise NotFound(f"no contract {contract_id} on the ledger")
    return entry


def failure_reason(doc: dict[str, Any]) -> str:
    """The node's reasons for the failed workloads of a contract document, on one line."""
    bad = [w for w in doc["workloads"] if w["state"] == "error"]
    return "; ".join(f"workload {w['name']}: {w['message'] or 'error'}" for w in bad) or \
        f"contract is {doc['state']}"


async def wait_contract(client: LedgerClient, contract_id: int, *, timeout_s: float,
                        done: Callable[[dict[str, Any]], bool],
                        what: str) -> dict[str, Any]:
    """Poll the contract until ``done(doc)``; return its last document.

    A peer that is briefly unreachable is retried until the deadline. Raises
    :class:`LedgerTimeout` after ``timeout_s`` (the message says what is still pending).
    """
    doc: dict[str, Any] | None = None
    with trio.move_on_after(timeout_s):
        while True:
            try:
                doc = contract_doc(await read_contract(client, contract_id))
            except (LedgerTimeout, LedgerUnavailable):
                pass
            else:
                if done(doc):
                    progress_done()
                    return doc
                states = ", ".join(f"{w['name']} {w['state']}" for w in doc["workloads"])
                progress(f"contract {contract_id} on node {doc['node']}: {doc['state']} "
                         f"({states})")
            await trio.sleep(POLL_INTERVAL_S)
    progress_done()
    if doc is None:
        raise LedgerTimeout(f"contract {contract_id}: no ledger peer answered within "
                            f"{timeout_s:.0f}s")
    waiting = ", ".join(f"{w['name']} {w['state']}" for w in doc["workloads"])
    raise LedgerTimeout(f"contract {contract_id} on node {doc['node']} is {doc['state']}, "
                        f"not {what}, after {timeout_s:.0f}s (workloads: {waiting})")


def _rows_human(docs: list[dict[str, Any]]) -> str:
    rows = [{"id": d["id"], "name": d["name"], "node": d["node"], "state": d["state"],
             "workloads": [f"{w['name']}:{w['state']}" for w in d["workloads"]],
             "endpoints": [w["endpoint"] for w in d["workloads"] if w["endpoint"]]}
            for d in docs]
    return table(rows, [("id", "id"), ("name", "name"), ("node", "node"), ("state", "state"),
                        ("workloads", "workloads"), ("endpoints", "endpoints")],
                 empty="no contracts")


def show_human(d: dict[str, Any]) -> str:
    head = (f"contract {d['id']} ({d['name']}, version {d['version']}) of twin {d['owner']} "
            f"on node {d['node']}: {d['state']}")
    return "\n".join([head, table(d["workloads"], [
        ("name", "workload"), ("kind", "kind"), ("state", "state"), ("endpoint", "endpoint"),
        ("message", "message")])])


@click.group()
def contract() -> None:
    """Contracts: what runs where, and the nodes' reports on it."""


@contract.command(name="list")
@json_option
@click.option("--all", "all_owners", is_flag=True, help="Every twin's contracts, not just ours.")
@click.pass_context
def list_(ctx: click.Context, all_owners: bool) -> None:
    """This identity's contracts (every state, oldest first)."""
    home = chain.home_of(ctx)
    key = None if all_owners else home.load_identity()

    async def go() -> list[dict[str, Any]]:
        async with chain.open_client(home) as client:
            owner: int | None = None
            if key is not None:
                twin = await twin_of_key(client, key.public_key)
                if twin is None:
                    return []  # no twin, so no contracts
                owner = int(twin["id"])
            next_id = await chain.counter(client, "next_contract_id")
            entries = await chain.read_entries(
                client, [keyspace.contract(i) for i in range(1, next_id)])
            return [contract_doc(e) for e in entries
                    if e is not None and (owner is None or int(e["owner"]) == owner)]

    emit(ctx, chain.run(go), _rows_human)


@contract.command()
@json_option
@click.argument("contract_id", metavar="ID", type=click.IntRange(min=1))
@click.pass_context
def show(ctx: click.Context, contract_id: int) -> None:
    """One contract: its node, state, and each workload's state, message and endpoint."""
    home = chain.home_of(ctx)

    async def go() -> dict[str, Any]:
        async with chain.open_client(home) as client:
            return contract_doc(await read_contract(client, contract_id))

    emit(ctx, chain.run(go), show_human)


def _all_deleted(doc: dict[str, Any]) -> bool:
    return doc["state"] == "cancelled" and all(
        w["state"] in ("deleted", PENDING) for w in doc["workloads"])


@contract.command()
@json_option
@click.argument("contract_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the node reports every workload deleted.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=CANCEL_TIMEOUT_S,
              show_default=True, help="Seconds to wait for the node.")
@click.pass_context
def cancel(ctx: click.Context, contract_id: int, wait: bool, timeout_s: float) -> None:
    """Cancel contract ID (settles what is owed); its node then deletes the workloads."""
    home = chain.home_of(ctx)
    key = home.load_identity()
    genesis = home.load_genesis()

    async def go() -> dict[str, Any]:
        async with chain.open_client(home) as client:
            entry = await read_contract(client, contract_id)
            if bytes(entry["owner_key"]) != key.public_key:
                raise NotFound(f"contract {contract_id} belongs to twin {entry['owner']}, "
                               "not to this identity")
            if entry["state"] != "cancelled":
                await chain.send_tx(client, key, genesis, "contract_cancel",
                                    {"contract_id": contract_id})
            if not wait:
                return contract_doc(await read_contract(client, contract_id))
            try:
                return await wait_contract(client, contract_id, timeout_s=timeout_s,
                                           done=_all_deleted, what="deleted by its node")
            except LedgerTimeout as exc:
                hint = await node_hint(client, genesis, int(entry["node"]))
                raise LedgerTimeout(f"{exc}{hint}") from None

    emit(ctx, chain.run(go), show_human)
