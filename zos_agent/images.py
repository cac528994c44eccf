"""Content-addressed rootfs images.

An image is a tar of a root filesystem, named by the SHA-256 of the tar bytes
(``sha256:<hex>``) and fetchable from one or more sources: a local path, a ``file://`` URL, an
``http(s)://`` URL or a grid-storage read capability (``tfs:...``). :class:`ImageStore` fetches the first source that yields bytes with the
right digest, refuses unsafe members (paths escaping the rootfs, device nodes), unpacks once per
digest into ``<cache>/rootfs/<hex>`` (unpacked beside it, then renamed into place, so a crash
never leaves a half-unpacked rootfs that looks complete) and returns that directory.

:func:`push_image` turns a directory or tar into a published blob, :func:`build_busybox_rootfs`
makes the tiny demo image from Debian's busybox-static.

``tfs:`` sources are read by a child process, ``python -m threebot.storage.fetch`` (given the
agent's ledger peers and genesis as a :class:`GridSource`), because the agent must not import
the 3Bot's storage client (design §1). The child writes the object to a file; the digest is
then checked here exactly as for any other source, so the child is trusted with nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from zos_agent.errors import ImageError

_IMAGE = re.compile(r"^sha256:([0-9a-f]{64})$")
_CHUNK = 1024 * 1024
DEFAULT_MAX_IMAGE_SIZE = 4 * 1024 * 1024 * 1024
FETCH_TIMEOUT = 300.0

# Created in every unpacked rootfs: runc needs mount points to exist, and the rootfs is shared
# read-only between containers, so runc must never have to create them itself.
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "data", "etc", "run")
MOUNT_FILES = ("etc/resolv.conf", "etc/hosts", "etc/hostname")


GRID_SCHEME = "tfs:"


@dataclass(frozen=True, slots=True)
class GridSource:
    """How to read ``tfs:`` sources: the ledger peers and genesis file of the agent, and the
    interpreter that runs the fetch child (this one by default)."""

    peers: tuple[tuple[str, int], ...]
    genesis: Path
    python: str = sys.executable


def parse_image(image: str) -> str:
    """The hex digest of ``sha256:<hex>``. Raises :class:`ImageError` if malformed."""
    m = _IMAGE.match(image)
    if not m:
        raise ImageError(f"image reference {image!r} is not sha256:<64 hex digits>")
    return m.group(1)


class ImageStore:
    """A per-agent cache of unpacked images, keyed by digest."""

    def __init__(self, cache_dir: Path, *, max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
                 grid: GridSource | None = None) -> None:
        self.cache_dir = cache_dir
        self.max_image_size = max_image_size
        self.grid = grid
        self._rootfs_dir = cache_dir / "rootfs"
        self._tmp_dir = cache_dir / "tmp"
        self._locks: dict[str, trio.Lock] = {}

    def rootfs(self, image: str) -> Path:
        """Where ``image`` is (or would be) unpacked."""
        return self._rootfs_dir / parse_image(image)

    def has(self, image: str) -> bool:
        return self.rootfs(image).is_dir()

    async def ensure(self, image: str, sources: list[str]) -> Path:
        """The unpacked rootfs of ``image``, fetching and verifying it first if not cached.

        Raises :class:`ImageError` when the reference is malformed, when no source yields bytes
        with the right digest (the message lists why each failed) or when the tar is unsafe.
        """
        hexdigest = parse_image(image)
        dest = self._rootfs_dir / hexdigest
        if dest.is_dir():
            return dest
        lock = self._locks.setdefault(hexdigest, trio.Lock())
        async with lock:
            if dest.is_dir():
                return dest
            if not sources:
                raise ImageError(f"image {image} is not cached and has no sources")
            await trio.to_thread.run_sync(self._prepare_dirs)
            failures: list[str] = []
            for source in sources:
                try:
                    with trio.fail_after(FETCH_TIMEOUT):
                        await trio.to_thread.run_sync(
                            self._fetch_and_unpack, source, hexdigest, abandon_on_cancel=True
                        )
                    return dest
                except trio.TooSlowError:
                    failures.append(f"{source}: timed out after {FETCH_TIMEOUT:g}s")
                except ImageError as exc:
                    failures.append(f"{source}: {exc}")
            raise ImageError(f"image {image}: no usable source ({'; '.join(failures)})")

    def _prepare_dirs(self) -> None:
        self._rootfs_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)

    def _fetch_and_unpack(self, source: str, hexdigest: str) -> None:
        work = Path(tempfile.mkdtemp(prefix=f"{hexdigest[:12]}-", dir=self._tmp_dir))
        try:
            blob = work / "image.tar"
            if source.startswith(GRID_SCHEME):
                got = _fetch_grid(self.grid, source, blob, self.max_image_size)
            else:
                got = _fetch(source, blob, self.max_image_size)
            if got != hexdigest:
                raise ImageError(f"digest mismatch: got sha256:{got}")
            root = work / "rootfs"
            unpack_rootfs(blob, root)
            try:
                os.rename(root, self._rootfs_dir / hexdigest)
            except OSError as exc:
                # Another process sharing this cache won the race: its copy is just as good.
                if not (self._rootfs_dir / hexdigest).is_dir():
                    raise ImageError(f"cannot install rootfs: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _fetch(source: str, dest: Path, max_size: int) -> str:
    """Copy ``source`` to ``dest``; return the sha256 hex of the bytes. Raises ImageError."""
    parsed = urllib.parse.urlparse(source)
    h = hashlib.sha256()
    total = 0
    try:
        if parsed.scheme in ("http", "https"):
            stream = urllib.request.urlopen(source, timeout=60)
        elif parsed.scheme == "file":
            stream = open(urllib.parse.unquote(parsed.path), "rb")
        elif parsed.scheme == "":
            stream = open(source, "rb")
        else:
            raise ImageError(f"unsupported source scheme {parsed.scheme!r}")
        with stream, open(dest, "wb") as out:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
                if total > max_size:
                    raise ImageError(f"larger than the {max_size} byte limit")
                h.update(chunk)
                out.write(chunk)
    except ImageError:
        raise
    except (OSError, ValueError) as exc:  # urllib errors are OSErrors
        raise ImageError(f"fetch failed: {exc}") from exc
    return h.hexdigest()


def _fetch_grid(grid: GridSource | None, cap: str, dest: Path, max_size: int) -> str:
    """Read grid-storage object ``cap`` into ``dest`` through the fetch child; return the
    sha256 hex of its bytes. Raises ImageError with the child's one-line reason."""
    if grid is None:
        raise ImageError("a grid-storage source, but this agent has no ledger to read it with")
    argv = [grid.python, "-m", "threebot.storage.fetch",
            "--peers", ",".join(f"{h}:{p}" for h, p in grid.peers),
            "--genesis", str(grid.genesis), "-", str(dest)]
    try:
        # The capability goes through stdin, not argv: other local users can read argv.
        done = subprocess.run(argv, input=cap.encode() + b"\n", capture_output=True,
                              timeout=FETCH_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ImageError(f"grid fetch timed out after {FETCH_TIMEOUT:g}s") from None
    except OSError as exc:
        raise ImageError(f"cannot run the grid fetch: {exc}") from exc
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1].removeprefix("error: ") if lines else f"exit status {done.returncode}"
        raise ImageError(f"grid fetch failed: {why}")
    try:
        if dest.stat().st_size > max_size:
            raise ImageError(f"larger than the {max_size} byte limit")
        h = hashlib.sha256()
        with open(dest, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise ImageError(f"grid fetch wrote no readable file: {exc}") from exc
    return h.hexdigest()


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # tar_filter refuses absolute and escaping paths and links (also through symlinks already
    # unpacked) and clears setuid/setgid bits, while keeping absolute symlinks, which are
    # normal inside a rootfs. Device nodes are refused on top: a container gets its own /dev.
    # Hard links are checked here too: the 'tar' filter lets an absolute hard link target
    # through, which tarfile then resolves against the host root (a link to /etc/passwd).
    if member.isdev():
        raise ImageError(f"device node {member.name!r} in image")
    if member.islnk():
        target = os.path.realpath(os.path.join(dest, member.linkname))
        if os.path.isabs(member.linkname) or os.path.commonpath(
            [target, os.path.realpath(dest)]
        ) != os.path.realpath(dest):
            raise ImageError(f"hard link {member.name!r} points outside the image")
    try:
        return tarfile.tar_filter(member, dest)
    except tarfile.FilterError as exc:
        raise ImageError(f"unsafe tar member: {exc}") from exc


def unpack_rootfs(blob: Path, root: Path) -> None:
    """Unpack tar ``blob`` into the new directory ``root`` and add the runtime's mount points.

    Raises :class:`ImageError` if the tar is corrupt or has unsafe members.
    """
    root.mkdir(mode=0o755)
    try:
        with tarfile.open(blob, "r:*") as tar:
            tar.errorlevel = 2  # a member that cannot be extracted fails the image
            tar.extractall(root, filter=_member_filter)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(f"cannot unpack: {exc}") from exc
    for d in MOUNT_POINTS:
        p = root / d
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise ImageError(f"/{d} in the image is not a directory")
        p.mkdir(mode=0o755, exist_ok=True)
    for f in MOUNT_FILES:
        p = root / f
        if p.is_symlink():
            raise ImageError(f"/{f} in the image is a symlink")
        if not p.exists():
            p.touch(mode=0o644)
    os.chmod(root, 0o755)


def _tar_dir(src: Path, out: io.BufferedWriter) -> None:
    """A deterministic tar of ``src``: sorted entries, root ownership, zero mtimes."""

    def norm(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(src)
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                arcname = str(rel_dir / name)
                st = os.lstat(path)
                if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    continue  # sockets, fifos, devices have no place in an image
                info = norm(tar.gettarinfo(str(path), arcname))
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


def push_image(src: Path, dest_dir: Path) -> tuple[str, list[str]]:
    """Publish ``src`` (a rootfs directory or an existing tar) as ``<dest_dir>/<hex>.tar``.

    Returns ``("sha256:<hex>", [file:// URL of the blob])``. A directory is tarred
    deterministically, so pushing the same tree twice gives the same reference. Raises
    :class:`ImageError` if ``src`` is neither a directory nor a readable tar.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".push-", suffix=".tar", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if src.is_dir():
                _tar_dir(src, out)
            elif src.is_file():
                if not tarfile.is_tarfile(src):
                    raise ImageError(f"{src} is not a tar file")
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, _CHUNK)
            else:
                raise ImageError(f"{src} is neither a directory nor a tar file")
            out.flush()
            os.fsync(out.fileno())
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        final = dest_dir / f"{h.hexdigest()}.tar"
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except OSError as exc:
        raise ImageError(f"cannot push {src}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return f"sha256:{h.hexdigest()}", [final.resolve().as_uri()]


BUSYBOX = Path("/bin/busybox")
_PT_INTERP = 3


def _has_interpreter(path: Path) -> bool:
    """Whether the ELF file asks for a dynamic loader (a PT_INTERP program header)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return False
        order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
        if head[4] == 2:  # 64-bit
            phoff = int.from_bytes(head[32:40], order)
            phentsize = int.from_bytes(head[54:56], order)
            phnum = int.from_bytes(head[56:58], order)
        else:
            phoff = int.from_bytes(head[28:32], order)
            phentsize = int.from_bytes(head[42:44], order)
            phnum = int.from_bytes(head[44:46], order)
        for i in range(min(phnum, 256)):
            f.seek(phoff + i * phentsize)
            if int.from_bytes(f.read(4), order) == _PT_INTERP:
                return True
    return False


def build_busybox_rootfs(dest: Path, *, busybox: Path = BUSYBOX) -> Path:
    """Make a tiny rootfs in the new directory ``dest`` from a static busybox binary.

    ``bin/`` holds busybox and a symlink per applet, ``etc/`` a passwd and group with root and
    nobody, ``www/index.html`` a page for ``httpd``. Raises :class:`ImageError` if busybox is
    missing or not static (install Debian's busybox-static).
    """
    try:
        listing = subprocess.run(
            [str(busybox), "--list"], capture_output=True, check=True, timeout=10
        ).stdout.decode()
        dynamic = _has_interpreter(busybox)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"cannot run {busybox} (apt-get install busybox-static): {exc}") from exc
    if dynamic:
        raise ImageError(f"{busybox} is dynamically linked; install busybox-static")
    try:
        dest.mkdir(parents=True)
        for d in ("bin", "etc", "www", *MOUNT_POINTS):
            (dest / d).mkdir(mode=0o755, exist_ok=True)
        os.chmod(dest / "tmp", 0o1777)
        shutil.copy2(busybox, dest / "bin" / "busybox")
        os.chmod(dest / "bin" / "busybox", 0o755)
        for applet in sorted(set(listing.split())):
            if applet != "busybox" and "/" not in applet:
                (dest / "bin" / applet).symlink_to("busybox")
        (dest / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        )
        (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (dest / "www" / "index.html").write_text("hello from tfgrid busybox\n")
        for f in MOUNT_FILES:
            (dest / f).touch(mode=0o644)
    except OSError as exc:
        raise ImageError(f"cannot build busybox rootfs in {dest}: {exc}") from exc
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m zos_agent.images build-busybox DEST`` / ``push SRC DEST_DIR``."""
    import json

    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2 and args[0] == "build-busybox":
            print(build_busybox_rootfs(Path(args[1])))
            return 0
        if len(args) == 3 and args[0] == "push":
            image, sources = push_image(Path(args[1]), Path(args[2]))
            print(json.dumps({"image": image, "sources": sources}))
            return 0
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("usage: python -m zos_agent.images build-busybox DEST | push SRC DEST_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
