"""The device's TUF client against the fleet's real repository, in process and over a real socket."""

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.exceptions import SlowRetrievalError
from tuf.api.metadata import Metadata

from device.errors import ConfigError
from device.tuf_client import (
    DeadlineFetcher,
    FetchFailed,
    FetchTimedOut,
    TargetRejected,
    TrustAlreadyProvisioned,
    TrustNotProvisioned,
    TufClient,
    bootstrap,
    fetch_over_loop,
)
from fleet.tuf_repository import TufRepository
from tests.security.tuf_harness import METADATA_PREFIX, RepoHttpServer, Wire

TARGET = "surface_defect/2.tar"
CUSTOM = {"model": "surface_defect", "version": 2, "format": "onnx"}


@pytest.fixture
def repo(tmp_path: Path, archives: dict[int, Path]) -> TufRepository:
    repo = TufRepository(tmp_path / "fleet" / "tuf", tmp_path / "fleet" / "keys")
    repo.init()
    repo.add_target(archives[2], TARGET, CUSTOM)
    return repo


@pytest.fixture
def wire(repo: TufRepository, archives: dict[int, Path]) -> Wire:
    wire = Wire(repo)
    wire.put_target(TARGET, archives[2].read_bytes())
    return wire


@pytest.fixture
def device_dir(tmp_path: Path, repo: TufRepository) -> Path:
    folder = tmp_path / "device"
    bootstrap(folder, repo.trusted_root())
    return folder


def test_bootstrap_writes_the_trusted_root_once(tmp_path: Path, repo: TufRepository) -> None:
    folder = tmp_path / "dev"
    bootstrap(folder, repo.trusted_root())
    stored = folder / "tuf" / "trusted-root.json"
    assert stored.read_bytes() == repo.trusted_root()
    bootstrap(folder, repo.trusted_root())  # enrollment retried with the same root: fine

    other = TufRepository(tmp_path / "other", tmp_path / "other-keys")
    other.init()
    with pytest.raises(TrustAlreadyProvisioned, match="re-enroll"):
        bootstrap(folder, other.trusted_root())
    assert stored.read_bytes() == repo.trusted_root()


def test_bootstrap_refuses_what_is_not_a_self_signed_root(tmp_path: Path, repo: TufRepository) -> None:
    unsigned = Metadata.from_bytes(repo.trusted_root())
    unsigned.signatures.clear()
    for bad in (b"{}", b"not json", repo.metadata_bytes("timestamp"), unsigned.to_bytes()):
        with pytest.raises(ConfigError, match="not a valid self-signed root"):
            bootstrap(tmp_path / "dev", bad)
    assert not (tmp_path / "dev").exists()


def test_refresh_without_a_trusted_root_says_enroll(tmp_path: Path, wire: Wire) -> None:
    with pytest.raises(TrustNotProvisioned, match="enroll"):
        TufClient(tmp_path / "never-enrolled", wire).refresh()


def test_over_http_lists_verifies_and_downloads_a_target(
    device_dir: Path, wire: Wire, archives: dict[int, Path], tmp_path: Path
) -> None:
    with RepoHttpServer(wire) as server:
        client = TufClient(device_dir, server.fetch())
        client.refresh()
        info = client.target_info(TARGET)
        assert info is not None
        archive = archives[2].read_bytes()
        assert info.length == len(archive)
        assert info.hashes == {"sha256": hashlib.sha256(archive).hexdigest()}
        assert info.custom == CUSTOM
        assert client.verify_target(TARGET, archives[2]) == info
        assert client.target_info("surface_defect/7.tar") is None
        with pytest.raises(TargetRejected, match="not listed"):
            client.verify_target("surface_defect/7.tar", archives[2])
        dest = client.download_target(TARGET, tmp_path / "downloads" / "2.tar")
        assert dest.read_bytes() == archive
    assert client.trusted_versions() == {"root": 1, "timestamp": 2, "snapshot": 2, "targets": 2}


def test_missing_file_to_verify_is_refused_with_a_hint(device_dir: Path, wire: Wire, tmp_path: Path) -> None:
    with pytest.raises(TargetRejected, match="download"):
        TufClient(device_dir, wire).verify_target(TARGET, tmp_path / "absent.tar")


def test_trust_survives_a_restart_and_follows_rotations(
    device_dir: Path, wire: Wire, repo: TufRepository
) -> None:
    TufClient(device_dir, wire).refresh()
    repo.rotate_key("root")
    repo.rotate_key("snapshot")
    restarted = TufClient(device_dir, wire)
    restarted.refresh()
    assert restarted.trusted_versions()["root"] == 3
    assert restarted.trusted_versions()["snapshot"] == repo.version("snapshot")
    history = sorted(p.name for p in (device_dir / "tuf" / "metadata" / "root_history").iterdir())
    assert history == ["1.root.json", "2.root.json", "3.root.json"]
    # The provisioned anchor is never rewritten: every start re-verifies the chain from it.
    assert (device_dir / "tuf" / "trusted-root.json").read_bytes() == repo.metadata_bytes("root", 1)


def test_root_walk_stops_at_not_found_without_retrying(device_dir: Path, wire: Wire) -> None:
    TufClient(device_dir, wire, retry_delay_s=0.0).refresh()
    assert wire.asked(METADATA_PREFIX + "2.root.json") == 1


def test_transport_errors_are_retried_then_reported(device_dir: Path, wire: Wire) -> None:
    failures = {"left": 2}

    def flaky(url: str, max_length: int, deadline_s: float) -> bytes:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("link down")
        return wire(url, max_length, deadline_s)

    TufClient(device_dir, flaky, attempts=3, retry_delay_s=0.0).refresh()
    assert failures["left"] == 0

    def down(url: str, max_length: int, deadline_s: float) -> bytes:
        raise ConnectionError("link down")

    with pytest.raises(FetchFailed, match="3 attempts failed") as failed:
        TufClient(device_dir, down, attempts=3, retry_delay_s=0.0).refresh()
    assert not isinstance(failed.value, FetchTimedOut)


def test_a_transport_returning_no_bytes_is_an_error(device_dir: Path) -> None:
    with pytest.raises(FetchFailed, match="not bytes"):
        TufClient(device_dir, lambda url, n, d: "text").refresh()  # type: ignore[arg-type,return-value]


def test_deadline_holds_when_the_transport_ignores_it() -> None:
    def ignores_deadline(url: str, max_length: int, deadline_s: float) -> bytes:
        time.sleep(3)
        return b"late"

    fetcher = DeadlineFetcher(ignores_deadline, deadline_s=0.3, attempts=2, retry_delay_s=0.0)
    started = time.monotonic()
    with pytest.raises(SlowRetrievalError, match=r"stalled past 0\.3s"):
        fetcher.download_bytes("tuf/metadata/timestamp.json", 100)
    assert time.monotonic() - started < 1.5
    assert fetcher.abandoned == 2


def test_fetcher_settings_are_checked() -> None:
    for kwargs in ({"deadline_s": 0}, {"attempts": 0}, {"retry_delay_s": -1}):
        with pytest.raises(ValueError, match="deadline_s must be"):
            DeadlineFetcher(lambda u, n, d: b"", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in its own thread, as the agent's is while TUF runs in a worker thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_fetch_over_loop_drives_the_client_from_a_worker_thread(
    device_dir: Path, wire: Wire, loop: asyncio.AbstractEventLoop
) -> None:
    seen_on: set[int] = set()

    async def afetch(url: str, max_length: int, deadline_s: float) -> bytes:
        seen_on.add(threading.get_ident())
        await asyncio.sleep(0)
        return wire(url, max_length, deadline_s)

    client = TufClient(device_dir, fetch_over_loop(loop, afetch))
    client.refresh()
    assert client.target_info(TARGET) is not None
    assert len(seen_on) == 1 and threading.get_ident() not in seen_on


def test_fetch_over_loop_cancels_a_stalled_request(loop: asyncio.AbstractEventLoop) -> None:
    cancelled = threading.Event()

    async def stalls(url: str, max_length: int, deadline_s: float) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    fetch = fetch_over_loop(loop, stalls)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fetch("tuf/metadata/timestamp.json", 100, 0.3)
    assert time.monotonic() - started < 1.5
    assert cancelled.wait(2)


def test_fetch_over_loop_refuses_to_block_its_own_loop(loop: asyncio.AbstractEventLoop) -> None:
    async def afetch(url: str, max_length: int, deadline_s: float) -> bytes:
        return b""

    fetch = fetch_over_loop(loop, afetch)

    async def call_on_loop() -> bytes:
        return fetch("x", 1, 0.5)

    with pytest.raises(RuntimeError, match="worker thread"):
        asyncio.run_coroutine_threadsafe(call_on_loop(), loop).result(timeout=5)
