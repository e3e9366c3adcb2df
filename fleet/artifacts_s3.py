"""The S3-compatible artifact store, with a bounded read-through cache on the fleet's disk.

A rollout reads each chunk of a payload once per device: 1,000 devices and a 9-chunk delta are
9,000 reads. They come from a whole-object copy on the fleet's disk (one GET per object, kept in
an LRU cache bounded in bytes), and by a ranged GET of that chunk alone only while the copy is
being fetched, or when the object is larger than the cache. Nothing reads a whole object into
memory.

Credentials, first found wins: the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`); `<data>/secrets/s3-credentials` (AWS credentials-file
format, `[default]`, 0600); the rest of boto3's chain (`AWS_PROFILE`, ~/.aws, an instance role).
They are never logged nor put in an error message; only where they came from is.
"""

import configparser
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from fleet.artifacts import (
    DEFAULT_CACHE_MB,
    ArtifactMissing,
    ArtifactStore,
    ArtifactStoreError,
    check_key,
)
from fleet.errors import InvalidRequest

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REFUSED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "403",
}
_MISSING = {"NoSuchKey", "NotFound", "404"}
_WRONG_REGION = {
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "301",
}
PREFETCHES_AT_ONCE = 2  # whole-object downloads in the background, beside a rollout's ranged GETs


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str = ""  # "" or "some/prefix/": prepended to every key
    endpoint_url: str | None = None  # None: AWS itself
    region: str | None = None  # None: boto3's (AWS_REGION, ~/.aws/config) or its default
    cache_bytes: int = DEFAULT_CACHE_MB * MiB
    # Multipart above 64 MiB, in 16 MiB parts: a 2 GiB model is 128 parts (S3 allows 10,000).
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "S3Settings":
        """`s3://BUCKET[/PREFIX]` and the other options as `S3Settings` fields."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
            raise ArtifactStoreError(f"--artifact-store {url!r} must be s3://BUCKET[/PREFIX]")
        if not _BUCKET.match(parsed.netloc) or ".." in parsed.netloc:
            raise ArtifactStoreError(
                f"{parsed.netloc!r} is not a valid bucket name: 3-63 lower-case letters, digits, '.' and '-'"
            )
        prefix = parsed.path.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except InvalidRequest as e:
                raise ArtifactStoreError(f"the prefix in {url!r}: {e}") from e
            prefix += "/"
        endpoint = options.get("endpoint_url")
        if endpoint is not None:
            checked = urlparse(endpoint)
            if checked.scheme not in ("http", "https") or not checked.hostname:
                raise ArtifactStoreError(
                    f"--s3-endpoint-url {endpoint!r} must be http(s)://HOST[:PORT], e.g. http://minio:9000"
                )
        return cls(bucket=parsed.netloc, prefix=prefix, **options)


@dataclass(frozen=True)
class Credentials:
    """Where the S3 keys come from; the keys themselves are kept out of repr and messages."""

    source: str
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def resolve_credentials(file: Path) -> Credentials:
    """The environment's keys, else the data dir's credentials file, else boto3's own chain."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return Credentials("the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables")
    if not file.exists():
        return Credentials("boto3's default chain (no AWS_ACCESS_KEY_ID and no " + str(file) + ")")
    if file.stat().st_mode & 0o077:
        raise ArtifactStoreError(f"{file} holds S3 keys and others can read it: chmod 600 {file}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(file)
    except configparser.Error:
        raise ArtifactStoreError(  # the parser's message could quote a key: not shown
            f"{file} is not in AWS credentials-file format ([default], aws_access_key_id = ..., "
            "aws_secret_access_key = ...)"
        ) from None
    section = parser["default"] if parser.has_section("default") else None
    key = section.get("aws_access_key_id") if section else None
    secret = section.get("aws_secret_access_key") if section else None
    if not key or not secret:
        raise ArtifactStoreError(f"{file} needs aws_access_key_id and aws_secret_access_key under [default]")
    token = section.get("aws_session_token") if section else None
    return Credentials(str(file), key.strip(), secret.strip(), token.strip() if token else None)


def _client(settings: S3Settings, credentials: Credentials, *, interactive: bool) -> Any:
    """A boto3 S3 client. `interactive`: for a device's chunk, which waits for it (short timeouts,
    one retry); otherwise for whole-object transfers in the background."""
    session = boto3.session.Session(
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.session_token,
        region_name=settings.region,
    )
    config = Config(
        connect_timeout=3 if interactive else 10,
        read_timeout=10 if interactive else 60,
        retries={"max_attempts": 2 if interactive else 4, "mode": "standard"},
        max_pool_connections=16,
        # S3-compatible stores (MinIO, Ceph, ...) do not all take boto3's default CRC trailers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Buckets as paths, not host names: what S3-compatible endpoints (and plain IPs) serve.
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
        user_agent_extra="edgefleet",
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


class DiskCache:
    """Whole objects on the fleet's disk, least recently used out first, at most `limit` bytes.

    Room is made before a download starts (`reserve`), so files being written count against the
    bound too. Files in use by a `local_file` block are pinned: eviction passes over them, so the
    cache may hold more than `limit` only while they are in use. A read that opens a file just
    evicted gets FileNotFoundError and falls back to a ranged GET.
    """

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self.tmp = folder / ".tmp"
        self.evicted = 0
        self.bytes = 0  # in the cache
        self.reserved = 0  # being written to .tmp/, to be admitted
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        """What a previous run left is kept (objects never change), oldest modified first out."""
        shutil.rmtree(self.tmp, ignore_errors=True)  # downloads cut short by the last exit
        self.tmp.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for path in self.folder.rglob("*"):
            if not path.is_file() or self.tmp in path.parents:
                continue
            key = path.relative_to(self.folder).as_posix()
            try:
                check_key(key)
            except InvalidRequest:
                path.unlink(missing_ok=True)
                continue
            stat = path.stat()
            found.append((stat.st_mtime, key, stat.st_size))
        with self._lock:
            for _, key, size in sorted(found):
                self._entries[key] = size
                self.bytes += size
            self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, size: int) -> bool:
        return size <= self.limit

    def size_of(self, key: str) -> int | None:
        with self._lock:
            return self._entries.get(key)

    def touch(self, key: str) -> Path | None:
        """The cached file of `key` (now the most recently used), or None."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self.folder / key

    def acquire(self, key: str) -> Path | None:
        """Like `touch`, and pinned until `release`."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            self._pins[key] += 1
            return self.folder / key

    def release(self, key: str) -> None:
        with self._lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]
            self._evict()

    def reserve(self, size: int) -> bool:
        """Make room for `size` more bytes (evicting the least recently used); False if it cannot fit."""
        if not self.fits(size):
            return False
        with self._lock:
            self.reserved += size
            self._evict()
        return True

    def unreserve(self, size: int) -> None:
        with self._lock:
            self.reserved -= size

    def new_temp(self) -> Path:
        """An empty file in .tmp/ to write a download into (the folder is made again if emptied)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        os.close(fd)
        return Path(name)

    def admit(self, key: str, tmp: Path, *, reserved: int, pin: bool) -> Path:
        """Move the finished file `tmp`, written in room `reserve`d for it, in as `key`."""
        size = tmp.stat().st_size
        target = self.folder / key
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.reserved -= reserved
            os.replace(tmp, target)
            self.bytes += size - self._entries.get(key, 0)
            self._entries[key] = size
            self._entries.move_to_end(key)
            if pin:
                self._pins[key] += 1
            self._evict()
        return target

    def forget(self, key: str) -> None:
        """`key`'s file went away under us (someone emptied the cache folder): fetch it anew."""
        with self._lock:
            size = self._entries.pop(key, None)
            if size is not None:
                self.bytes -= size

    def _evict(self) -> None:
        for key in list(self._entries):  # oldest first
            if self.bytes + self.reserved <= self.limit:
                return
            if self._pins[key]:
                continue
            self.bytes -= self._entries.pop(key)
            self.evicted += 1
            (self.folder / key).unlink(missing_ok=True)


class S3Store(ArtifactStore):
    """Artifacts as objects `<prefix><key>` in one bucket of an S3-compatible store."""

    def __init__(self, settings: S3Settings, cache_root: Path, credentials_file: Path) -> None:
        self.settings = settings
        self.credentials_file = credentials_file
        self.credentials = resolve_credentials(credentials_file)
        self._bulk = _client(settings, self.credentials, interactive=False)
        self._chunks = _client(settings, self.credentials, interactive=True)
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=4,
            use_threads=True,
        )
        # One cache folder per store: another bucket's object under the same key is another object.
        where = f"{settings.endpoint_url or 'aws'}|{settings.bucket}|{settings.prefix}"
        self.cache = DiskCache(
            cache_root / hashlib.sha256(where.encode()).hexdigest()[:16], settings.cache_bytes
        )
        self.stats: Counter[str] = Counter()
        self._guard = threading.Lock()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._prefetching: set[str] = set()
        self._prefetch_slots = threading.BoundedSemaphore(PREFETCHES_AT_ONCE)
        self._prefetch_done = threading.Condition(self._guard)
        self._sizes: dict[str, int] = {}  # as last seen in the bucket (an object never changes size)

    # -- naming -------------------------------------------------------------------------------
    def _object(self, key: str) -> str:
        return self.settings.prefix + check_key(key)

    def url(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{self._object(key)}"

    @property
    def scratch(self) -> Path:
        self.cache.tmp.mkdir(parents=True, exist_ok=True)
        return self.cache.tmp

    def describe(self) -> dict[str, object]:
        return {
            "store": f"s3://{self.settings.bucket}/{self.settings.prefix}",
            "endpoint": self.settings.endpoint_url or "aws",
            "cache_bytes": self.cache.bytes,
            "cache_limit_bytes": self.cache.limit,
            "cache_objects": len(self.cache),
            "cache_evictions": self.cache.evicted,
            **self.stats,
        }

    # -- the store ----------------------------------------------------------------------------
    def check(self) -> None:
        try:
            self._bulk.head_bucket(Bucket=self.settings.bucket)
        except (BotoCoreError, ClientError) as e:
            raise self._explain(e, "open the bucket") from e
        log.info(
            "artifacts in s3://%s/%s at %s (credentials from %s), cache %d MiB in %s",
            self.settings.bucket,
            self.settings.prefix,
            self.settings.endpoint_url or "AWS",
            self.credentials.source,
            self.cache.limit // MiB,
            self.cache.folder,
        )

    def put(self, key: str, source: Path, *, sha256: str | None = None, move: bool = False) -> None:
        name = self._object(key)
        if sha256 is not None and self._stored_sha256(key) == sha256:
            self.stats["uploads_skipped"] += 1  # another fleet server (or an earlier run) stored it
        else:
            extra = {"Metadata": {"sha256": sha256}} if sha256 else {}
            try:
                self._bulk.upload_file(
                    str(source), self.settings.bucket, name, ExtraArgs=extra, Config=self._transfer
                )
            except (BotoCoreError, ClientError, S3UploadFailedError) as e:
                raise self._explain(e, f"upload {key}", key) from e
            self.stats["uploads"] += 1
        self._adopt(key, source, move)

    def _adopt(self, key: str, source: Path, move: bool) -> None:
        """Keep what was just stored in the cache too: the fleet is about to serve it."""

        def take(tmp: Path) -> None:
            if move:
                os.replace(source, tmp)
            else:
                shutil.copyfile(source, tmp)  # a copy, not a link: the caller may change its file later

        size = source.stat().st_size
        self._sizes[key] = size
        if self._into_cache(key, size, take, pin=False) is None and move:
            source.unlink(missing_ok=True)

    def _into_cache(self, key: str, size: int, write: Callable[[Path], None], *, pin: bool) -> Path | None:
        """`write` a file of `size` bytes into room made for it, then admit it as `key`; None when the
        whole cache is too small for it."""
        if not self.cache.reserve(size):
            return None
        tmp = self.cache.new_temp()
        try:
            write(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            self.cache.unreserve(size)
            raise
        return self.cache.admit(key, tmp, reserved=size, pin=pin)

    def _stored_sha256(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._bulk.head_object(Bucket=self.settings.bucket, Key=self._object(key))
        except ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise self._explain(e, f"look up {key}", key) from e
        except BotoCoreError as e:
            raise self._explain(e, f"look up {key}", key) from e
        return head

    def size(self, key: str) -> int | None:
        """Asked of the bucket, not the cache: a copy on our disk does not mean the store holds it."""
        head = self._head(key)
        if head is None:
            return None
        self._sizes[key] = int(head["ContentLength"])
        return self._sizes[key]

    def read(self, key: str, offset: int, length: int) -> bytes:
        data = self.read_local(key, offset, length)
        if data is not None:
            return data
        return self._ranged_get(key, offset, length)

    def read_local(self, key: str, offset: int, length: int) -> bytes | None:
        path = self.cache.touch(key)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(length)
                self.stats["cache_reads"] += 1
                return data
            except FileNotFoundError:  # evicted since the lookup, or deleted under us
                if not path.exists():
                    self.cache.forget(key)
        self.prefetch(key)  # the next chunks come from disk
        return None

    def _ranged_get(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            answer = self._chunks.get_object(
                Bucket=self.settings.bucket,
                Key=self._object(key),
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            body = answer["Body"]
            try:
                if answer["ResponseMetadata"]["HTTPStatusCode"] != 206:
                    _skip(body, offset)  # a store that ignored the range: stream past, never all of it
                data: bytes = body.read(length)
            finally:
                body.close()
        except ClientError as e:
            if _code(e) == "InvalidRange":
                return b""
            raise self._explain(e, f"read {key}", key) from e
        except BotoCoreError as e:
            raise self._explain(e, f"read {key}", key) from e
        self.stats["ranged_gets"] += 1
        return data

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        path = self._fill(key, pin=True)
        if path is not None:
            try:
                yield path
            finally:
                self.cache.release(key)
            return
        tmp = self._download(key)  # larger than the whole cache: a copy for this block only
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def prefetch(self, key: str) -> None:
        with self._guard:
            if key in self._prefetching or self.cache.size_of(key) is not None:
                return
            if not self.cache.fits(self._sizes.get(key, 0)):
                return  # larger than the whole cache: its chunks come by ranged GETs
            self._prefetching.add(key)
        threading.Thread(
            target=self._prefetch, args=(key,), name="edgefleet-s3-prefetch", daemon=True
        ).start()

    def wait_prefetches(self, timeout: float | None = None) -> bool:
        """Block until no background fetch is running; False on timeout."""
        with self._prefetch_done:
            return self._prefetch_done.wait_for(lambda: not self._prefetching, timeout)

    def _prefetch(self, key: str) -> None:
        try:
            with self._prefetch_slots:
                self._fill(key, pin=False)
        except ArtifactMissing as e:  # the chunk requests that need it log it, once a minute
            log.debug("could not cache %s: %s", key, e)
        except ArtifactStoreError as e:
            log.warning("could not cache %s: %s", key, e)
        except Exception:
            log.exception("could not cache %s", key)
        finally:
            with self._prefetch_done:
                self._prefetching.discard(key)
                self._prefetch_done.notify_all()

    def _fill(self, key: str, *, pin: bool) -> Path | None:
        """`key` in the cache (fetched now if need be), or None when it is larger than the cache."""
        with self._guard:
            lock = self._fetch_locks.setdefault(key, threading.Lock())
        with lock:  # one download per key; whoever waited finds it cached
            path = self.cache.acquire(key) if pin else self.cache.touch(key)
            if path is not None and path.exists():
                return path
            if path is not None:  # deleted under us: fetched again below
                if pin:
                    self.cache.release(key)
                self.cache.forget(key)
            size = self.size(key)
            if size is None:
                raise ArtifactMissing(self._vanished(key))
            return self._into_cache(key, size, functools.partial(self._download_to, key), pin=pin)

    def _download(self, key: str) -> Path:
        """`key` into a temp file of its own, outside the cache's count (it is larger than the cache)."""
        path = self.cache.new_temp()
        try:
            self._download_to(key, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _download_to(self, key: str, path: Path) -> None:
        try:
            self._bulk.download_file(
                self.settings.bucket, self._object(key), str(path), Config=self._transfer
            )
        except (BotoCoreError, ClientError) as e:
            raise self._explain(e, f"download {key}", key) from e
        self.stats["downloads"] += 1

    # -- errors an operator can act on ----------------------------------------------------------
    def _vanished(self, key: str) -> str:
        return (
            f"artifact {self.url(key)} has vanished from the S3 store; restore the object, "
            "or push the same package again (the fleet uploads it anew)"
        )

    def _explain(self, error: Exception, action: str, key: str | None = None) -> ArtifactStoreError:
        where = self.settings.endpoint_url or "AWS S3"
        bucket = self.settings.bucket
        if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, ClientError):
            error = error.__context__
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            return ArtifactStoreError(
                f"no S3 credentials to {action}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write "
                f"them to {self.credentials_file} ([default], aws_access_key_id = ..., "
                "aws_secret_access_key = ...; chmod 600)"
            )
        if isinstance(error, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
            return ArtifactStoreError(
                f"cannot reach the S3 endpoint {where} to {action}: check --s3-endpoint-url and that "
                f"the store is up ({type(error).__name__})"
            )
        if isinstance(error, ReadTimeoutError):
            return ArtifactStoreError(f"the S3 endpoint {where} did not answer in time to {action}")
        if not isinstance(error, ClientError):
            return ArtifactStoreError(f"the S3 store at {where} failed to {action}: {error}")
        code = _code(error)
        if code == "NoSuchBucket" or (key is None and code in _MISSING):
            return ArtifactStoreError(
                f"bucket {bucket!r} does not exist at {where}: create it (e.g. `aws s3 mb s3://{bucket}`), "
                "or name another with --artifact-store s3://BUCKET[/PREFIX]"
            )
        if key is not None and code in _MISSING:
            return ArtifactMissing(self._vanished(key))
        if code in _REFUSED:
            return ArtifactStoreError(
                f"the S3 store at {where} refused the credentials from {self.credentials.source} to "
                f"{action} ({code}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                f"{self.credentials_file}) to a key that may read and write s3://{bucket}/{self.settings.prefix}"
            )
        if code in _WRONG_REGION:
            return ArtifactStoreError(
                f"bucket {bucket!r} is in another region than {self.settings.region or 'the default'}: "
                "name its region with --s3-region"
            )
        message = error.response.get("Error", {}).get("Message", "")
        return ArtifactStoreError(f"the S3 store at {where} failed to {action}: {code} {message}".strip())


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _skip(body: Any, count: int) -> None:
    while count > 0:
        block = body.read(min(count, MiB))
        if not block:
            return
        count -= len(block)
