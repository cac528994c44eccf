"""The keys of the authenticated state map, in one place.

Every ledger entry lives under a short prefix. Values are canonical msgpack maps whose
schemas are defined (and documented) in :mod:`ledger.state`. Clients build these keys to
query an entry with its proof.
"""

from __future__ import annotations

import struct

_U64 = struct.Struct(">Q")


def account(address: bytes) -> bytes:
    return b"acct/" + address


def twin(twin_id: int) -> bytes:
    return b"twin/" + _U64.pack(twin_id)


def twin_by_name(name: str) -> bytes:
    return b"twinname/" + name.encode()


def twin_by_key(public_key: bytes) -> bytes:
    return b"twinkey/" + public_key


def farm(farm_id: int) -> bytes:
    return b"farm/" + _U64.pack(farm_id)


def node(node_id: int) -> bytes:
    return b"node/" + _U64.pack(node_id)


def node_by_key(public_key: bytes) -> bytes:
    return b"nodekey/" + public_key


def contract(contract_id: int) -> bytes:
    return b"contract/" + _U64.pack(contract_id)


def node_contracts(node_id: int) -> bytes:
    """The list of live contract ids assigned to a node."""
    return b"nodecontracts/" + _U64.pack(node_id)


def tx_result(tx_hash: bytes) -> bytes:
    """Outcome of a committed transaction: {"height", "code", "message"}."""
    return b"txresult/" + tx_hash


def counters() -> bytes:
    """Next ids, supply totals (burned, minted), last billing/minting times."""
    return b"meta/counters"


def params() -> bytes:
    return b"meta/params"
