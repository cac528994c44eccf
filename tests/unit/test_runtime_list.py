"""Runtime.list() runs runc only when runc's root holds a container (full reconcile passes
list every few seconds; a node with only storage namespaces has none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zos_agent.errors import RuntimeFailure
from zos_agent.images import ImageStore
from zos_agent.runtime import Runtime


def make(tmp_path: Path) -> Runtime:
    # A runc that cannot be run: any call to it fails loudly.
    return Runtime(runc_root=tmp_path / "runc", data_dir=tmp_path / "data",
                   images=ImageStore(tmp_path / "images"), network=None,
                   runc=str(tmp_path / "no-such-runc"))


async def test_no_runc_call_without_containers(tmp_path: Path) -> None:
    rt = make(tmp_path)
    assert await rt.list() == {}  # no root at all
    (tmp_path / "runc").mkdir()
    (tmp_path / "runc" / "not-a-container").write_text("")  # runc keeps directories only
    assert await rt.list() == {}


async def test_runc_asked_once_its_root_holds_a_container(tmp_path: Path) -> None:
    rt = make(tmp_path)
    (tmp_path / "runc" / "c1-web").mkdir(parents=True)
    with pytest.raises(RuntimeFailure, match="cannot run"):
        await rt.list()
