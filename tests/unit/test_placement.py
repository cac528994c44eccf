"""Node placement for `tfgrid deploy` and the `tfgrid capacity` report: pure functions over
node entries as the ledger stores them."""

from __future__ import annotations

from typing import Any

import pytest

from cli.capacity import capacity_doc, summarize
from cli.deploy import NoCapacity, pick_node
from cli.manifest import NodeChoice
from cli.node import NodeInfo

GIB = 1 << 30


def node(nid: int, farm: int, country: str, *, cores: int = 4, memory: int = 8 * GIB,
         storage: int = 100 * GIB, used: tuple[int, int, int] = (0, 0, 0),
         status: str = "up") -> NodeInfo:
    entry: dict[str, Any] = {
        "id": nid, "farm": farm, "public_key": bytes([nid]) * 32,
        "capacity": {"cores": cores, "memory": memory, "storage": storage},
        "used": {"cores": used[0], "memory": used[1], "storage": used[2]},
        "location": {"country": country, "city": "x"}, "endpoint": "",
        "last_uptime_ms": 1000 if status == "up" else 0,
    }
    return NodeInfo(entry, status)


def res(cpu: int, memory: int, disk: int = 0) -> dict[str, int]:
    return {"cpu": cpu, "memory": memory, "disk": disk}


GRID = [
    node(1, 1, "BE", used=(3, GIB, 0)),
    node(2, 1, "BE", used=(1, GIB, 0)),
    node(3, 2, "EG", used=(0, 0, 0), status="down"),
    node(4, 3, "US", cores=2, used=(0, 7 * GIB, 0)),
]


def test_auto_picks_the_up_node_with_most_free_cores() -> None:
    assert pick_node(GRID, NodeChoice("auto"), res(1, GIB)).id == 2  # 3 free; node 3 is down


def test_auto_skips_nodes_without_room() -> None:
    # node 2 lacks memory for 7.5 GiB; node 4 has 1 GiB free; node 1 has 7 GiB free
    with pytest.raises(NoCapacity, match=r"no node that is up has room .* \(4 nodes, 3 up"):
        pick_node(GRID, NodeChoice("auto"), res(1, 7 * GIB + GIB // 2))
    assert pick_node(GRID, NodeChoice("auto"), res(1, 6 * GIB + GIB // 2)).id == 2


def test_ties_go_to_more_memory_then_the_lower_id() -> None:
    nodes = [node(5, 1, "BE", used=(0, GIB, 0)), node(6, 1, "BE"), node(7, 1, "BE")]
    assert pick_node(nodes, NodeChoice("auto"), res(1, GIB)).id == 6


def test_farm_placement_stays_in_the_farm() -> None:
    assert pick_node(GRID, NodeChoice("farm", 3), res(1, GIB // 2)).id == 4
    with pytest.raises(NoCapacity, match="in farm 2 that is up"):
        pick_node(GRID, NodeChoice("farm", 2), res(1, GIB))
    with pytest.raises(NoCapacity, match="farm 9 has no nodes"):
        pick_node(GRID, NodeChoice("farm", 9), res(1, GIB))
    with pytest.raises(NoCapacity, match="no nodes yet"):
        pick_node([], NodeChoice("auto"), res(1, GIB))


def test_summary_counts_free_only_on_up_nodes() -> None:
    doc = summarize(GRID)
    assert doc["total"] == {"cores": 14, "memory": 32 * GIB, "storage": 400 * GIB}
    assert doc["reserved"] == {"cores": 4, "memory": 9 * GIB, "storage": 0}
    # node 3 (down) offers nothing: free = (1+3+2) cores, (7+7+1) GiB, 300 GiB
    assert doc["free"] == {"cores": 6, "memory": 15 * GIB, "storage": 300 * GIB}
    assert (doc["nodes_up"], doc["nodes_down"]) == (3, 1)


@pytest.mark.parametrize(("by", "keys"), [("farm", [1, 2, 3]), ("country", ["BE", "EG", "US"]),
                                          ("node", [1, 2, 3, 4])])
def test_groups(by: str, keys: list[Any]) -> None:
    doc = capacity_doc(GRID, by)
    assert [g[by] for g in doc["groups"]] == keys
    for part in ("total", "reserved", "free"):
        for r in ("cores", "memory", "storage"):
            assert sum(g[part][r] for g in doc["groups"]) == doc[part][r]
    assert sum(g["nodes_up"] for g in doc["groups"]) == doc["nodes_up"]


def test_no_grouping_and_empty_grid() -> None:
    assert capacity_doc(GRID, None)["groups"] == []
    empty = capacity_doc([], "farm")
    assert empty["total"] == {"cores": 0, "memory": 0, "storage": 0}
    assert empty["groups"] == []
    assert (empty["nodes_up"], empty["nodes_down"]) == (0, 0)


def test_node_documents() -> None:
    doc = GRID[0].doc()
    assert doc == {"id": 1, "farm": 1, "country": "BE", "cores": 4, "memory": 8 * GIB,
                   "storage": 100 * GIB, "status": "up", "last_uptime": 1000}
    assert GRID[2].doc()["last_uptime"] is None
    shown = GRID[0].show_doc([7, 9])
    assert shown["free"] == {"cores": 1, "memory": 7 * GIB, "storage": 100 * GIB}
    assert shown["reserved"] == {"cores": 3, "memory": GIB, "storage": 0}
    assert shown["contracts"] == [7, 9]
    # reserved above capacity (capacity lowered under live contracts) shows no negative room
    over = node(8, 1, "BE", cores=2, used=(3, 0, 0))
    assert over.free()["cores"] == 0
