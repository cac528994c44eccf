"""Devnet shard ports: distinct, free, and outside the kernel's ephemeral range (so that the
outgoing connections of a busy devnet never take a stopped node's port)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from cli import devnet_nodes as dn
from cli.devnet_nodes import DevnetNode
from zos_agent import config as agent_config


def test_ports_are_distinct_free_and_not_ephemeral() -> None:
    low, high = dn._ephemeral_range()
    ports = dn.pick_shard_ports(24, rng=random.Random(7))
    assert len(set(ports)) == 24
    assert all(not low <= p <= high for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_skipped() -> None:
    first = dn.pick_shard_ports(1, rng=random.Random(3))[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", first))
        s.listen()
        again = dn.pick_shard_ports(1, rng=random.Random(3))[0]
    assert again != first


def test_the_port_is_recorded_and_written_to_the_agent_config(tmp_path: Path) -> None:
    node = DevnetNode("node-1", "farmer-1", "ab" * 32, "x-n1", 9, None, 23456)
    assert DevnetNode.from_doc(node.to_doc()) == node
    old = node.to_doc()
    del old["shard_port"]  # a devnet recorded before shard ports serves no storage
    assert DevnetNode.from_doc(old).shard_port == 0
    (tmp_path / "node-1").mkdir()
    path = dn.write_agent_config(tmp_path, node, farm_id=1, country="BE", city="Ghent",
                                 peers=[("127.0.0.1", 7001)], capacity={"cores": 1, "memory": 1 << 30,
                                           "storage": 8 << 30})
    assert agent_config.load(path).shard_port == 23456
