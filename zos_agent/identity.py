"""The node's identity: an ed25519 key generated on first boot and kept on the data disk.

``<data_dir>/node.key`` holds the 32-byte seed as hex, mode 0600. It is created once, with
``O_EXCL`` on a temp file and an atomic rename, so two agents racing on one data dir (or an
agent killed mid-write) can never leave a half-written key or replace an existing one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from ledger.errors import ConfigError
from ledger.keys import KeyPair

KEY_FILE = "node.key"


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def read_node_key(data_dir: Path) -> KeyPair:
    """Read ``<data_dir>/node.key``. Raises :class:`ConfigError` if it is missing,
    readable by others, or not 64 hex characters."""
    path = key_path(data_dir)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the node key ({exc})") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"{path} is accessible by other users "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"{path}: the node key must be 64 hex characters")
    return KeyPair.from_seed(seed)


def load_or_create_node_key(data_dir: Path,
                            entropy: Callable[[int], bytes] = os.urandom) -> KeyPair:
    """The node key of ``data_dir``, generated (from ``entropy``) if there is none yet.

    Creates ``data_dir`` (mode 0700) if needed. Raises :class:`ConfigError` if the directory
    or key cannot be written or an existing key is unusable.
    """
    path = key_path(data_dir)
    if path.exists():
        return read_node_key(data_dir)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        seed = entropy(32)
        if len(seed) != 32:
            raise ConfigError("entropy source returned the wrong number of bytes")
        tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, seed.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails if another process created the key meanwhile: theirs wins.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise ConfigError(f"cannot create the node key {path}: {exc.strerror or exc}") from None
    return read_node_key(data_dir)
