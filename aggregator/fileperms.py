"""Private files and directories: the pool holds residents' data and operators' password
hashes, so its file, WAL and shared memory are 0600 in a 0700 directory, and so are the
snapshots. Set when created and tightened again on every open (a copy or an older version may
have left them readable)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "private_file", "tighten"]

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def tighten(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` when it exists, is ours and is looser. Shared directories are
    left alone: one with the sticky bit (``/tmp``) or owned by someone else is not ours."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_ISVTX:
        return
    if stat.S_IMODE(st.st_mode) & ~mode:
        try:
            path.chmod(mode)
        except OSError as exc:
            log.warning("could not make %s private (mode %o): %s", path, mode, exc)
        else:
            log.info("made %s private (mode %o was %o)", path, mode, stat.S_IMODE(st.st_mode))


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700, or tighten it if it exists."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tighten(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty as 0600 unless it exists, then tighten it (before a library such as
    SQLite creates it with the process umask)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, FILE_MODE)
    os.close(fd)
    tighten(path, FILE_MODE)
    return path
