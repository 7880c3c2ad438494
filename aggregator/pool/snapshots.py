"""Snapshots stored content-addressed: ``<root>/<sha[:2]>/<sha>.jpg``.

Written (temp file, then rename) before the batch that references them commits, so a committed
event never points at a missing file; a crash in between leaves at most an unreferenced file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from aggregator.fileperms import DIR_MODE, FILE_MODE, private_dir


class SnapshotStore:
    def __init__(self, root: Path | str) -> None:
        self.root = private_dir(Path(root))

    def path_of(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / f"{sha256}.jpg"

    def put(self, jpeg: bytes) -> str:
        sha = hashlib.sha256(jpeg).hexdigest()
        path = self.path_of(sha)
        if not path.exists():
            path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            # Residents' pictures: readable by the service's user only.
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(jpeg)
            tmp.replace(path)
        return sha

    def get(self, sha256: str) -> bytes | None:
        try:
            return self.path_of(sha256).read_bytes()
        except (FileNotFoundError, ValueError):
            return None
