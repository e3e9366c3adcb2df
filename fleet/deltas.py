"""Package deltas between registered versions, built once on demand and kept in the artifact store.

Building costs seconds of CPU per pair (much more for large models), so each (from, to) pair is
built at most once and then served from the store (`fleet/artifacts.py`: the data dir's folder, or
an S3 bucket other fleet servers share); concurrent builders of one pair are serialised.
`BackgroundBuilds` builds them ahead of a rollout (when a version is registered or a device reports
running an older one), so a rollout's POST does not wait on one.
"""

import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from fleet.artifacts import ArtifactStore, archive_key, delta_key
from models.package import hash_file, unpack
from models.package_delta import build_package_delta, read_index

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class DeltaArtifact:
    key: str  # in the artifact store
    base_version: int
    base_manifest_sha256: str
    manifest_sha256: str
    sha256: str
    size: int


def delta_path(artifacts: Path, model_name: str, base_version: int, version: int) -> Path:
    """Where the folder store keeps a delta (`artifacts/<name>/deltas/<from>-<to>.pdelta`)."""
    return artifacts / delta_key(model_name, base_version, version)


def _lock_for(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def package_delta(store: ArtifactStore, model_name: str, base_version: int, version: int) -> DeltaArtifact:
    """The delta from `base_version` to `version`, built now if the store does not hold it yet.

    Built ones go to the store, so another fleet server on the same bucket (or this one after it
    lost its disk) finds them instead of building them again.
    """
    key = delta_key(model_name, base_version, version)
    with _lock_for(store.url(key)):
        if not store.exists(key):
            with (
                store.local_file(archive_key(model_name, base_version)) as base_archive,
                store.local_file(archive_key(model_name, version)) as archive,
                tempfile.TemporaryDirectory(dir=store.scratch, prefix=".build-") as tmp,
            ):
                base, target, out = Path(tmp) / "base", Path(tmp) / "target", Path(tmp) / "out.pdelta"
                unpack(base_archive, base)
                unpack(archive, target)
                build_package_delta(base, target, out)
                store.put(key, out, move=True)
        with store.local_file(key) as path:
            index = read_index(path)
            entry = hash_file(path)
    return DeltaArtifact(
        key=key,
        base_version=index.base.version,
        base_manifest_sha256=index.base.manifest_sha256,
        manifest_sha256=index.target.manifest_sha256,
        sha256=entry.sha256,
        size=entry.size,
    )


class BackgroundBuilds:
    """Delta builds ahead of a rollout, one at a time on a daemon thread, each key at most once.

    A rollout's first offers then find the delta on disk instead of building it while devices wait
    for their offers; a build that is still running when the rollout starts is waited for by
    `package_delta`'s lock. A daemon thread: a build cut short by the process ending leaves no
    partial delta (`build_package_delta` writes a temp file and renames it).
    """

    def __init__(self, name: str = "edgefleet-delta-builds") -> None:
        self.name = name
        self.failed = 0
        self._queue: queue.SimpleQueue[tuple[Hashable, Callable[[], object]]] = queue.SimpleQueue()
        self._seen: set[Hashable] = set()
        self._pending = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, key: Hashable, build: Callable[[], object]) -> bool:
        """Queue `build` unless `key` was scheduled before; True when it was queued now."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((key, build))
        return True

    def forget(self, key: Hashable) -> None:
        """Let `key` be scheduled again (its artifact went away, or its build failed)."""
        with self._lock:
            self._seen.discard(key)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued build has ended; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def _work(self) -> None:
        while True:
            key, build = self._queue.get()
            try:
                build()
            except Exception:  # the rollout builds it again on demand and reports why it cannot
                self.failed += 1
                self.forget(key)
                log.exception("building delta %s ahead of time failed", key)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()
