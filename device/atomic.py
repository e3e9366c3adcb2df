"""Crash-safe file writes: temp file, fsync, rename, fsync of the folder."""

import json
import os
from pathlib import Path
from typing import Any

from models.fsutil import fsync_dir


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """After a crash at any instant `path` holds either the old bytes or `data`, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:  # write() of a file object loops until every byte is written
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode)


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` in one rename, so readers see the old or the new target, never none."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
