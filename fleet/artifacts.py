"""Where the fleet keeps model archives and deltas: a folder on its disk, or an S3-compatible store.

Everything else in the fleet names an artifact by its key (`<model>/<version>.tar`,
`<model>/deltas/<from>-<to>.pdelta`) and goes through `ArtifactStore`: put a file, ask its size,
read one byte range (a chunk for a device), or borrow a whole local file for the work that needs
one (building a delta, hashing for TUF). The folder store keeps today's layout under
`<data>/artifacts/`, so existing data dirs keep working; the S3 store (`fleet/artifacts_s3.py`)
keeps a bounded read-through cache of whole objects on the fleet's disk.
"""

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.errors import FleetError, InvalidRequest
from models.fsutil import fsync_dir

if TYPE_CHECKING:
    from fleet.store import FleetDataDir

DEFAULT_CACHE_MB = 2048
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactStoreError(FleetError):
    """The artifact store cannot be reached, refused the fleet, or failed; the message says what to do."""


class ArtifactMissing(ArtifactStoreError):
    """An artifact the fleet registered is no longer in the store."""


def archive_key(model_name: str, version: int) -> str:
    return check_key(f"{model_name}/{version}.tar")


def delta_key(model_name: str, base_version: int, version: int) -> str:
    return check_key(f"{model_name}/deltas/{base_version}-{version}.pdelta")


def check_key(key: str) -> str:
    """A key is relative, '/'-separated plain names: it can neither leave the folder nor the prefix."""
    if not all(_SEGMENT.match(part) for part in key.split("/")):
        raise InvalidRequest(f"artifact key {key!r} must be '/'-separated plain names")
    return key


class ArtifactStore(ABC):
    """One place to keep immutable artifacts (a key is written once, or again with the same bytes)."""

    @abstractmethod
    def url(self, key: str) -> str:
        """Where `key` lies, for operators and the registry (a path or an s3:// URL; no secrets)."""

    @abstractmethod
    def check(self) -> None:
        """Raise ArtifactStoreError, saying what to fix, when the store cannot be used; at start."""

    @abstractmethod
    def put(self, key: str, source: Path, *, sha256: str | None = None, move: bool = False) -> None:
        """Store the file `source` under `key`, atomically (readers see no half object).

        `sha256` (when the caller knows it) lets a store skip bytes it already holds; `move` lets
        it take `source` instead of copying it (the caller's temp file, on the store's scratch disk).
        """

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The size of `key` in bytes, or None when the store does not hold it."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def read(self, key: str, offset: int, length: int) -> bytes:
        """At most `length` bytes of `key` from `offset`, never the whole object into memory.

        Raises ArtifactMissing when the object is gone, ArtifactStoreError when the store fails.
        """

    def read_local(self, key: str, offset: int, length: int) -> bytes | None:
        """Like `read` when the bytes are on the fleet's disk; None when they would need the network
        (so an event loop can read here and hand only the misses to a thread)."""
        return self.read(key, offset, length)

    @abstractmethod
    def local_file(self, key: str) -> AbstractContextManager[Path]:
        """The whole of `key` as a file on the fleet's disk, valid until the block ends."""

    @property
    @abstractmethod
    def scratch(self) -> Path:
        """A folder for temp files that `put(..., move=True)` can take without copying."""

    def prefetch(self, key: str) -> None:  # noqa: B027 (a no-op unless the store is remote)
        """Start fetching `key` to the fleet's disk in the background; devices will ask for it soon."""

    def describe(self) -> dict[str, object]:
        """Counters for operators (cache hits, GETs...); the folder store has none."""
        return {}


class FolderStore(ArtifactStore):
    """Artifacts as plain files under one folder: `<root>/<model>/<version>.tar` as before."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def url(self, key: str) -> str:
        return str(self.path(key))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as e:
            raise ArtifactStoreError(
                f"cannot write artifacts to {self.root}: {e}; fix its owner or mode"
            ) from e

    @property
    def scratch(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def put(self, key: str, source: Path, *, sha256: str | None = None, move: bool = False) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if move:
                os.replace(source, tmp)  # same disk (the scratch folder): a rename, no copy
            else:
                shutil.copyfile(source, tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self.path(key), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError as e:
            raise ArtifactMissing(
                f"artifact {self.url(key)} has vanished from the fleet's disk; restore it from a backup, "
                "or push the same package again"
            ) from e

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise ArtifactMissing(f"artifact {self.url(key)} is not on the fleet's disk")
        yield path


@dataclass(frozen=True)
class StoreOptions:
    """How `fleet serve` was told to keep artifacts (`--artifact-store` and friends)."""

    url: str | None = None  # "s3://BUCKET[/PREFIX]"; None: the data dir's artifacts/ folder
    s3_endpoint_url: str | None = None  # MinIO, Ceph RGW, ...; None: AWS itself
    s3_region: str | None = None
    cache_mb: int = DEFAULT_CACHE_MB  # the local read-through cache of S3 objects


def open_store(options: StoreOptions, data: "FleetDataDir") -> ArtifactStore:
    """The store `options` name, checked: reachable, the bucket there, the credentials accepted."""
    if options.url is None:
        if options.s3_endpoint_url:
            raise ArtifactStoreError("--s3-endpoint-url needs --artifact-store s3://BUCKET[/PREFIX]")
        store: ArtifactStore = FolderStore(data.artifacts)
    elif options.url.startswith("s3://"):
        try:
            from fleet.artifacts_s3 import S3Settings, S3Store  # boto3 only where S3 is used
        except ImportError as e:
            raise ArtifactStoreError(
                f"--artifact-store {options.url} needs boto3: pip install 'edgefleet[s3]' ({e})"
            ) from e
        if options.cache_mb < 0:
            raise ArtifactStoreError(f"--artifact-cache-mb must be 0 or more, got {options.cache_mb}")
        settings = S3Settings.from_url(
            options.url,
            endpoint_url=options.s3_endpoint_url,
            region=options.s3_region,
            cache_bytes=options.cache_mb * 1024 * 1024,
        )
        store = S3Store(settings, data.artifact_cache, credentials_file=data.secrets / S3_CREDENTIALS_FILE)
    else:
        raise ArtifactStoreError(
            f"--artifact-store {options.url!r} is not understood: give s3://BUCKET[/PREFIX], "
            "or leave it out to keep artifacts in the data dir"
        )
    store.check()
    return store


S3_CREDENTIALS_FILE = "s3-credentials"  # in the data dir's secrets/, AWS credentials-file format
