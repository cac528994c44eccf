"""Writable container volumes with a real size quota.

Each volume is a sparse file of exactly ``disk`` bytes formatted ext4 and loop-mounted at
``<root>/<workload id>``; the container gets that directory at /data, so writing past the quota
fails with ENOSPC inside the container and never fills the node's disk. If loop devices are not
available the volume cannot be made and :class:`RuntimeFailure` says so: the quota is never
silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from zos_agent import cmd
from zos_agent.errors import RuntimeFailure

MIN_VOLUME = 2 * 1024 * 1024
MKFS_TIMEOUT = 120.0


# Local metadata syscalls (stat, a sparse truncate) take microseconds; they stay on the trio
# thread. Everything that does real I/O (mkfs, mount) is a subprocess.
def _is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def _make_sparse(path: Path, size: int) -> None:
    try:
        with open(path, "wb") as f:
            f.truncate(size)
    except OSError as exc:
        raise RuntimeFailure(f"cannot create volume file {path}: {exc}") from exc


class VolumeManager:
    """Volumes under ``root``: ``<id>.img`` (backing file) and ``<id>/`` (mount point)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def image_path(self, workload_id: str) -> Path:
        return self.root / f"{workload_id}.img"

    def mount_path(self, workload_id: str) -> Path:
        return self.root / workload_id

    async def ensure(self, workload_id: str, size: int) -> Path:
        """The mounted volume of ``workload_id``, creating or re-mounting it as needed.

        A volume of another size is recreated empty (a changed ``disk`` re-creates the
        container). Raises :class:`RuntimeFailure` if it cannot be made or mounted.
        """
        if size < MIN_VOLUME:
            raise RuntimeFailure(f"disk of {size} bytes is below the {MIN_VOLUME} byte minimum")
        img = self.image_path(workload_id)
        mnt = self.mount_path(workload_id)
        try:
            current = img.stat().st_size if img.exists() else None
        except OSError as exc:
            raise RuntimeFailure(f"cannot stat {img}: {exc}") from exc
        if current is not None and current != size:
            await self.remove(workload_id)
            current = None
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            mnt.mkdir(exist_ok=True, mode=0o755)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create {mnt}: {exc}") from exc
        if _is_mounted(mnt):
            return mnt
        if current is None:
            tmp = img.with_suffix(".img.tmp")
            _make_sparse(tmp, size)
            await cmd.run(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                 "-L", "tfgrid-data", str(tmp)],
                time_limit=MKFS_TIMEOUT,
            )
            os.replace(tmp, img)
        proc = await cmd.run(
            ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(img), str(mnt)], check=False
        )
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise RuntimeFailure(
                f"cannot loop-mount the {size} byte volume of {workload_id} (loop devices needed"
                f" for the disk quota): {err}"
            )
        return mnt

    async def remove(self, workload_id: str) -> None:
        """Unmount and delete the volume (its data is gone). Idempotent.

        Raises :class:`RuntimeFailure` if it stays mounted.
        """
        mnt = self.mount_path(workload_id)
        for _ in range(50):
            if not _is_mounted(mnt):
                break
            proc = await cmd.run(["umount", str(mnt)], check=False)
            if proc.returncode != 0 and _is_mounted(mnt):
                # Busy just after the container died (its mount namespace is torn down
                # asynchronously); retry briefly before detaching it lazily.
                await trio.sleep(0.05)
        else:
            await cmd.run(["umount", "-l", str(mnt)])
        for p in (self.image_path(workload_id), self.image_path(workload_id).with_suffix(".img.tmp")):
            p.unlink(missing_ok=True)
        try:
            mnt.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RuntimeFailure(f"cannot remove volume mount point {mnt}: {exc}") from exc
