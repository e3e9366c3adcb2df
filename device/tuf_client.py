"""The device's TUF client: python-tuf's ngclient Updater, fed over the fleet's own transport.

The Updater does the TUF client workflow (root chain, timestamp, snapshot, targets; signatures,
thresholds, expiry, rollback and mix-and-match checks). This module gives it a fetcher that asks
the fleet for files through one callable, `fetch(url, max_length, deadline_s) -> bytes`, and
bounds every download: TUF's own client no longer defends against slow retrieval, so each fetch
has a deadline, a stalled one is abandoned, and it is retried a bounded number of times.

The trust anchor is the root provisioned at enrollment (`bootstrap`); every refresh re-verifies
the chain of newer roots from it, so a tampered metadata folder cannot replace it. The Updater is
synchronous: on the device's event loop run it in a worker thread, with `fetch_over_loop`
adapting the link's async request/response.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile  # type: ignore[attr-defined,unused-ignore]
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from device.atomic import write_atomic
from device.errors import ConfigError, DeviceError, UpdateRejected

# The `type: ignore` above: python-tuf re-exports these names without __all__, which mypy's
# no_implicit_reexport (on through the project's strict settings) does not follow.

log = logging.getLogger(__name__)

FetchFn = Callable[[str, int, float], bytes]
"""`fetch(url, max_length, deadline_s)`: the file's bytes (never more than `max_length`).

Raise FileNotFoundError when the fleet does not hold the file (that ends a root walk and is not
retried), TimeoutError or another OSError on a transport failure (retried). `deadline_s` is the
time this one attempt may take; the fetcher abandons it after that whether or not it returned.
"""

DEFAULT_DEADLINE_S = 10.0
DEFAULT_ATTEMPTS = 3
_UNBOUNDED_FETCH_MAX = 5_000_000  # only reached through FetcherInterface.fetch(), which ngclient does not use


class TufClientError(DeviceError):
    """Base of this module's errors."""


class TrustNotProvisioned(ConfigError):
    """The device has no trusted TUF root; it gets one at enrollment (`bootstrap`)."""


class TrustAlreadyProvisioned(ConfigError):
    """A different trusted root is already provisioned; re-enroll the device to replace it."""


class MetadataRejected(UpdateRejected):
    """The fleet's TUF metadata failed a check; nothing was trusted from it."""


class MetadataExpired(MetadataRejected):
    """Metadata past its expiry: a frozen or stale repository (freeze attack)."""


class MetadataVersionRejected(MetadataRejected):
    """A version that goes back or does not match what the newer role names (rollback, mix-and-match)."""


class MetadataSignatureRejected(MetadataRejected):
    """Too few valid signatures by the keys the trusted root names for the role."""


class MetadataTooLarge(MetadataRejected):
    """More bytes than the metadata's declared or configured maximum (endless data)."""


class TargetRejected(UpdateRejected):
    """A target that is not listed, or whose length or sha256 differs from the signed ones."""


class FetchFailed(TufClientError):
    """The fleet could not be reached for a file after every retry; try again later."""


class FetchTimedOut(FetchFailed):
    """Every attempt to fetch a file stalled past its deadline (slow retrieval)."""


class DeadlineFetcher(FetcherInterface):
    """A TUF fetcher over `fetch`: one deadline per attempt, bounded retries, a hard size cap."""

    def __init__(
        self,
        fetch: FetchFn,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_delay_s: float = 0.2,
    ) -> None:
        if deadline_s <= 0 or attempts < 1 or retry_delay_s < 0:
            raise ValueError("deadline_s must be > 0, attempts >= 1 and retry_delay_s >= 0")
        self._fetch_fn = fetch
        self.deadline_s = deadline_s
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.abandoned = 0  # attempts given up on at their deadline, for the status page

    def _fetch(self, url: str) -> Iterator[bytes]:
        yield self.get(url, _UNBOUNDED_FETCH_MAX)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        data = self.get(url, max_length)
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            yield f

    def download_bytes(self, url: str, max_length: int) -> bytes:
        return self.get(url, max_length)

    def get(self, url: str, max_length: int) -> bytes:
        """The file at `url`, at most `max_length` bytes, or a tuf DownloadError saying why not."""
        last: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.retry_delay_s * 2 ** (attempt - 1))
            try:
                data = self._attempt(url, max_length)
            except FileNotFoundError as e:
                raise tuf_errors.DownloadHTTPError(f"{url} is not on the fleet", 404) from e
            except OSError as e:  # TimeoutError and ConnectionError are OSErrors too
                last = e
                log.warning("fetch of %s failed (attempt %d/%d): %s", url, attempt + 1, self.attempts, e)
                continue
            except Exception as e:
                raise tuf_errors.DownloadError(f"fetch of {url} failed: {e}") from e
            if len(data) > max_length:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"{url}: got {len(data)} bytes, more than the {max_length} allowed"
                )
            return data
        if isinstance(last, TimeoutError):
            raise tuf_errors.SlowRetrievalError(
                f"{url}: {self.attempts} attempts each stalled past {self.deadline_s}s"
            ) from last
        raise tuf_errors.DownloadError(f"{url}: {self.attempts} attempts failed, last: {last}") from last

    def _attempt(self, url: str, max_length: int) -> bytes:
        """Run one fetch in its own thread and stop waiting at the deadline.

        The transport is asked to honour the deadline itself; waiting in another thread makes it
        hold even when the transport does not (a slow drip that never trips a socket timeout).
        """
        box: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)

        def run() -> None:
            try:
                box.put((True, self._fetch_fn(url, max_length, self.deadline_s)))
            except BaseException as e:
                box.put((False, e))

        threading.Thread(target=run, name="tuf-fetch", daemon=True).start()
        try:
            ok, value = box.get(timeout=self.deadline_s)
        except queue.Empty:
            self.abandoned += 1
            raise TimeoutError(f"no complete answer within {self.deadline_s}s; abandoned") from None
        if not ok:
            raise value
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"fetch returned {type(value).__name__}, not bytes")
        return bytes(value)


def fetch_over_loop(
    loop: asyncio.AbstractEventLoop,
    afetch: Callable[[str, int, float], Awaitable[bytes]],
) -> FetchFn:
    """Adapt an async fetch on `loop` (the MQTT link's request/response) to a `FetchFn`.

    The returned function blocks, so call the TUF client from a worker thread
    (`asyncio.to_thread`), never from the loop's own thread.
    """

    def fetch(url: str, max_length: int, deadline_s: float) -> bytes:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # blocking here would wait on the very loop that must answer
            raise RuntimeError("call the TUF client from a worker thread (asyncio.to_thread), not the loop")

        async def bounded() -> bytes:
            return await asyncio.wait_for(afetch(url, max_length, deadline_s), deadline_s)

        future = asyncio.run_coroutine_threadsafe(bounded(), loop)
        try:
            return future.result(timeout=deadline_s + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{url}: no answer within {deadline_s}s") from None

    return fetch


def trust_folder(data_dir: Path) -> Path:
    return data_dir / "tuf"


def bootstrap(data_dir: Path, root_bytes: bytes) -> None:
    """Provision the trusted root once, at enrollment; the same bytes again is a no-op.

    The root must be well-formed and signed by a threshold of its own root keys: a wrong file
    here would leave the device trusting nobody (or the wrong party) until re-enrolled.
    """
    try:
        md = Metadata.from_bytes(root_bytes)
        if not isinstance(md.signed, Root):
            raise ValueError(f"it is {md.signed.type} metadata, not root")
        md.verify_delegate(Root.type, md)
    except (tuf_errors.RepositoryError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"the TUF root given at enrollment is not a valid self-signed root: {e}") from e
    folder = trust_folder(data_dir)
    path = folder / "trusted-root.json"
    if path.exists():
        if path.read_bytes() == root_bytes:
            return
        raise TrustAlreadyProvisioned(
            f"{path} already holds a different trusted root; re-enroll the device to replace it"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, root_bytes)


class TufClient:
    """The device's view of the fleet's TUF repository, kept under `<data_dir>/tuf/`."""

    def __init__(
        self,
        data_dir: Path,
        fetch: FetchFn,
        *,
        metadata_base_url: str = "tuf/metadata/",
        targets_base_url: str = "tuf/targets/",
        deadline_s: float = DEFAULT_DEADLINE_S,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_delay_s: float = 0.2,
        config: UpdaterConfig | None = None,
    ) -> None:
        self.folder = trust_folder(data_dir)
        self.metadata_dir = self.folder / "metadata"
        self.trusted_root_path = self.folder / "trusted-root.json"
        self.metadata_base_url = metadata_base_url
        self.targets_base_url = targets_base_url
        self.config = config or UpdaterConfig()
        self.fetcher = DeadlineFetcher(
            fetch, deadline_s=deadline_s, attempts=attempts, retry_delay_s=retry_delay_s
        )
        self._updater: Updater | None = None
        # ngclient supports one user of a metadata folder at a time.
        self._lock = threading.RLock()

    def refresh(self) -> None:
        """Fetch and verify root (chain), timestamp, snapshot and targets; raise if any is refused."""
        with self._lock:
            self._updater = None
            try:
                root_bytes = self.trusted_root_path.read_bytes()
            except FileNotFoundError:
                raise TrustNotProvisioned(
                    f"no trusted TUF root at {self.trusted_root_path}; enroll the device first"
                ) from None
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            with _mapped_errors("metadata"):
                updater = Updater(
                    str(self.metadata_dir),
                    self.metadata_base_url,
                    target_base_url=self.targets_base_url,
                    fetcher=self.fetcher,
                    config=self.config,
                    bootstrap=root_bytes,
                )
                updater.refresh()
            self._check_root_keys_distinct()
            self._updater = updater

    def target_info(self, name: str) -> TargetFile | None:
        """The signed length, hashes and custom fields of `name`, or None if it is not listed."""
        with self._lock:
            if self._updater is None:
                self.refresh()
            assert self._updater is not None
            with _mapped_errors("metadata"):
                return self._updater.get_targetinfo(name)

    def verify_target(self, name: str, path: Path) -> TargetFile:
        """Raise TargetRejected unless the file at `path` is exactly the signed target `name`."""
        info = self._listed(name)
        try:
            with path.open("rb") as f:
                info.verify_length_and_hashes(f)
        except FileNotFoundError:
            raise TargetRejected(f"{path} does not exist; download {name} first") from None
        except tuf_errors.LengthOrHashMismatchError as e:
            raise TargetRejected(f"{path} is not the signed {name}: {e}") from e
        return info

    def download_target(self, name: str, dest: Path) -> Path:
        """Fetch the signed target `name` into `dest` through the fetcher, verified before it lands."""
        info = self._listed(name)
        with self._lock:
            assert self._updater is not None
            dest.parent.mkdir(parents=True, exist_ok=True)
            with _mapped_errors("target"):
                return Path(self._updater.download_target(info, str(dest)))

    def trusted_versions(self) -> dict[str, int]:
        """The version of each role the device trusts now (for the status page)."""
        versions: dict[str, int] = {}
        for role in ("root", "timestamp", "snapshot", "targets"):
            with contextlib.suppress(OSError, tuf_errors.RepositoryError, ValueError):
                data = (self.metadata_dir / f"{role}.json").read_bytes()
                versions[role] = Metadata.from_bytes(data).signed.version
        return versions

    def _listed(self, name: str) -> TargetFile:
        info = self.target_info(name)
        if info is None:
            raise TargetRejected(f"{name} is not listed in the fleet's signed targets; refused")
        return info

    def _check_root_keys_distinct(self) -> None:
        """Refuse a root that lists one key under two keyids: it would count twice toward a threshold.

        python-tuf counts distinct keyids; key ids are not tied to the key bytes, so this checks
        the key material itself.
        """
        root = Metadata.from_bytes((self.metadata_dir / "root.json").read_bytes()).signed
        assert isinstance(root, Root)
        for role_name, role in root.roles.items():
            publics = [str(root.keys[k].keyval.get("public")) for k in role.keyids]
            if len(set(publics)) != len(publics):
                raise MetadataSignatureRejected(
                    f"root v{root.version} lists one {role_name} key under several key ids; refused"
                )


@contextlib.contextmanager
def _mapped_errors(what: str) -> Iterator[None]:
    """Turn python-tuf's errors into the device's, keeping the cause for the log."""
    try:
        yield
    except tuf_errors.ExpiredMetadataError as e:
        raise MetadataExpired(f"{what} expired: {e}") from e
    except tuf_errors.BadVersionNumberError as e:
        raise MetadataVersionRejected(f"{what} version refused: {e}") from e
    except tuf_errors.UnsignedMetadataError as e:
        raise MetadataSignatureRejected(f"{what} signatures refused: {e}") from e
    except tuf_errors.LengthOrHashMismatchError as e:
        if what == "target":
            raise TargetRejected(f"target refused: {e}") from e
        raise MetadataRejected(f"{what} refused: {e}") from e
    except tuf_errors.RepositoryError as e:
        raise MetadataRejected(f"{what} refused: {e}") from e
    except tuf_errors.DownloadLengthMismatchError as e:
        if what == "target":
            raise TargetRejected(f"target longer than signed: {e}") from e
        raise MetadataTooLarge(f"{what} too large: {e}") from e
    except tuf_errors.SlowRetrievalError as e:
        raise FetchTimedOut(str(e)) from e
    except tuf_errors.DownloadError as e:
        raise FetchFailed(str(e)) from e
