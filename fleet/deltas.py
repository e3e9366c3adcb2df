"""Package deltas between registered versions, built once on demand and kept beside the artifacts.

Building costs seconds of CPU per pair (much more for large models), so each (from, to) pair is
built at most once and then served from disk; concurrent builders of one pair are serialised.
"""

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from models.package import hash_file, unpack
from models.package_delta import build_package_delta, read_index

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class DeltaArtifact:
    path: Path
    base_version: int
    base_manifest_sha256: str
    manifest_sha256: str
    sha256: str
    size: int


def delta_path(artifacts: Path, model_name: str, base_version: int, version: int) -> Path:
    return artifacts / model_name / "deltas" / f"{base_version}-{version}.pdelta"


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def package_delta(
    artifacts: Path, model_name: str, base_version: int, base_archive: Path, version: int, archive: Path
) -> DeltaArtifact:
    """The delta from `base_archive` to `archive`, built now if it is not on disk yet."""
    path = delta_path(artifacts, model_name, base_version, version)
    with _lock_for(path):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
                base, target = Path(tmp) / "base", Path(tmp) / "target"
                unpack(base_archive, base)
                unpack(archive, target)
                build_package_delta(base, target, path)
    index = read_index(path)
    entry = hash_file(path)
    return DeltaArtifact(
        path=path,
        base_version=index.base.version,
        base_manifest_sha256=index.base.manifest_sha256,
        manifest_sha256=index.target.manifest_sha256,
        sha256=entry.sha256,
        size=entry.size,
    )
