"""Placeholder until the node network lands (same API)."""

from __future__ import annotations

from pathlib import Path


class NodeNetwork:
    def __init__(self, *, agent_id: str, subnet_index: int, host_address: str = "127.0.0.1") -> None:
        self.agent_id = agent_id
        self.subnet_index = subnet_index
        self.host_address = host_address

    async def setup(self) -> None:
        raise NotImplementedError

    async def attach(self, workload_id: str, ports: list[int]) -> tuple[Path, list[str]]:
        raise NotImplementedError

    async def detach(self, workload_id: str) -> None:
        raise NotImplementedError

    async def teardown(self) -> None:
        raise NotImplementedError
