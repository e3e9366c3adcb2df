"""The artifact stores: the data dir's folder, and an S3 bucket on a real S3-compatible server.

The S3 tests run s3rver as its own process over HTTP (tests/fleet/test_artifacts_s3server.py says
why that server) and a real FleetService on SQLite, with publishing captured instead of sent.
"""

import asyncio
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fleet.deltas
from edgefleet.procs import free_port
from fleet.artifacts import (
    ArtifactMissing,
    ArtifactStoreError,
    FolderStore,
    StoreOptions,
    archive_key,
    delta_key,
    open_store,
)
from fleet.db import open_database
from fleet.errors import InvalidRequest
from fleet.server import ServeOptions, serve
from fleet.service import FleetService
from fleet.store import FleetDataDir
from protocol.frames import ChunkUnavailable, decode_chunk, decode_chunk_answer
from protocol.messages import ChunkRequest, UpdateOffer, decode
from protocol.targets import archive_target_name, delta_target_name
from tests.fleet.test_artifacts_s3server import ACCESS_KEY, SECRET_KEY, S3Server, running_s3_server
from tests.fleet.test_service import recording_publishes
from tests.health_reports import health_report

MODEL = "surface-defect"
MiB = 1024 * 1024


# -- the folder store (today's layout) -------------------------------------------------------------
def test_the_folder_store_keeps_artifacts_where_they_always_were(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "artifacts")
    store.check()
    source = tmp_path / "v1.tar"
    source.write_bytes(bytes(range(256)) * 64)
    store.put(archive_key(MODEL, 1), source)
    assert (tmp_path / "artifacts" / MODEL / "1.tar").read_bytes() == source.read_bytes()
    assert store.size(archive_key(MODEL, 1)) == 256 * 64
    assert store.read(archive_key(MODEL, 1), 250, 10) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    with store.local_file(archive_key(MODEL, 1)) as path:
        assert path == tmp_path / "artifacts" / MODEL / "1.tar"
    assert not store.exists(delta_key(MODEL, 1, 2))
    with pytest.raises(ArtifactMissing, match="vanished"):
        store.read(delta_key(MODEL, 1, 2), 0, 10)
    for bad in ("../escape.tar", "/etc/passwd", "a//b", "a/./b"):
        with pytest.raises(InvalidRequest, match="plain names"):
            store.put(bad, source)


# -- the S3 store -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("s3rver")) as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """s3rver's keys in the standard variables, and nothing of this machine's own AWS set-up (no
    ~/.aws files; no instance-metadata lookups, which would leave the loopback)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


FleetFactory = Callable[..., FleetService]


@pytest.fixture
def s3_fleet(s3_server: S3Server, aws_env: pytest.MonkeyPatch, tmp_path: Path) -> FleetFactory:
    """A FleetService on a fresh data dir whose artifacts live in `bucket`."""

    def make(bucket: str, name: str = "fleet", cache_mb: int = 64) -> FleetService:
        data = FleetDataDir(tmp_path / name)
        data.make_dirs()
        options = StoreOptions(f"s3://{bucket}/fleet-a", s3_server.endpoint, cache_mb=cache_mb)
        return recording_publishes(
            FleetService(
                data, open_database(data.database), "mqtt://127.0.0.1:1883", 4096, open_store(options, data)
            )
        )

    return make


def _offers(service: FleetService) -> dict[str, UpdateOffer]:
    return {topic.split("/")[2]: decode(UpdateOffer, payload) for topic, payload in service.sent}  # type: ignore[attr-defined]


def _download(service: FleetService, device_id: str, update_id: str, payload: str, total: int) -> bytes:
    """What a device gets by asking for every chunk in turn."""
    served = bytearray()
    while len(served) < total:
        request = ChunkRequest(update_id=update_id, offset=len(served), length=4096, payload=payload)  # type: ignore[arg-type]
        served += decode_chunk(service.chunk_for(device_id, request)).data  # a refusal raises, saying why
    return bytes(served)


def _update(service: FleetService, version: int, devices: list[str]) -> dict[str, str]:
    return {
        u["device_id"]: u["update_id"] for u in asyncio.run(service.start_update(MODEL, version, devices))
    }


def _cache_files(service: FleetService) -> dict[str, int]:
    folder = service.artifacts.cache.folder  # type: ignore[attr-defined]
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_a_registered_archive_is_an_object_in_the_bucket_with_its_bytes(
    s3_server: S3Server, s3_fleet: FleetFactory, archives: dict[int, Path]
) -> None:
    bucket = s3_server.new_bucket()
    service = s3_fleet(bucket)
    view = service.register_model(archives[1])
    stored = s3_server.get(bucket, f"fleet-a/{MODEL}/1.tar")
    assert stored == archives[1].read_bytes()
    assert view["sha256"] == hashlib.sha256(stored).hexdigest()
    head = s3_server.client().head_object(Bucket=bucket, Key=f"fleet-a/{MODEL}/1.tar")
    assert head["Metadata"]["sha256"] == view["sha256"], "the hash rides along, so others can skip it"
    assert service.artifacts.url(archive_key(MODEL, 1)) == f"s3://{bucket}/fleet-a/{MODEL}/1.tar"
    assert not (service.data.artifacts / MODEL).exists(), "nothing kept in the folder store"
    listed = service.tuf.target(archive_target_name(MODEL, 1))
    assert listed is not None and listed.hashes["sha256"] == view["sha256"]


def test_a_large_archive_goes_up_in_parts(
    s3_server: S3Server, aws_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fleet.artifacts_s3 import S3Settings, S3Store

    bucket = s3_server.new_bucket()
    settings = S3Settings.from_url(
        f"s3://{bucket}",
        endpoint_url=s3_server.endpoint,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
    )
    store = S3Store(settings, tmp_path / "cache", tmp_path / "secrets" / "s3-credentials")
    store.check()
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(12 * MiB))
    store.put("big/1.tar", big)
    assert s3_server.get(bucket, "big/1.tar") == big.read_bytes()
    assert "partNumber=3" in s3_server.log.read_text(), "12 MiB in 5 MiB parts: three parts"
    assert store.read("big/1.tar", 7 * MiB, 100) == big.read_bytes()[7 * MiB : 7 * MiB + 100]


def test_chunks_come_from_the_local_copy_and_are_fetched_again_when_it_is_gone(
    s3_server: S3Server, s3_fleet: FleetFactory, archives: dict[int, Path]
) -> None:
    bucket = s3_server.new_bucket()
    service = s3_fleet(bucket)
    service.register_model(archives[2])
    service.add_device("cam-1")
    update_id = _update(service, 2, ["cam-1"])["cam-1"]
    size = archives[2].stat().st_size
    stats = service.artifacts.stats  # type: ignore[attr-defined]

    assert _download(service, "cam-1", update_id, "package", size) == archives[2].read_bytes()
    chunks = -(-size // 4096)
    assert stats["cache_reads"] == chunks and stats["ranged_gets"] == 0, "registered: already on disk"
    inline = asyncio.run(
        service.answer_chunk("cam-1", ChunkRequest(update_id=update_id, offset=8192, length=4096))
    )
    assert decode_chunk(inline or b"").data == archives[2].read_bytes()[8192:12288]

    shutil.rmtree(service.artifacts.cache.folder)  # type: ignore[attr-defined]
    # What the MQTT worker calls on its event loop: a miss goes to a thread, and is still answered.
    first = asyncio.run(
        service.answer_chunk("cam-1", ChunkRequest(update_id=update_id, offset=0, length=4096))
    )
    assert decode_chunk(first or b"").data == archives[2].read_bytes()[:4096]
    assert stats["ranged_gets"] == 1, "the first chunk after the loss comes by a ranged GET"
    assert _download(service, "cam-1", update_id, "package", size) == archives[2].read_bytes()
    assert service.artifacts.wait_prefetches(20)  # type: ignore[attr-defined]
    assert stats["downloads"] == 1, "meanwhile the archive is fetched back whole"
    before = stats["ranged_gets"]
    assert _download(service, "cam-1", update_id, "package", size) == archives[2].read_bytes()
    assert stats["ranged_gets"] == before, "then every chunk is read from the fetched copy"
    assert stats["downloads"] == 1, "one GET of the whole object, not one per device or chunk"


def test_the_cache_keeps_to_its_bound_and_larger_objects_are_read_by_range(
    s3_server: S3Server, s3_fleet: FleetFactory, archives: dict[int, Path]
) -> None:
    bucket = s3_server.new_bucket()
    service = s3_fleet(bucket, cache_mb=3)  # one 2 MiB archive fits, two do not
    for archive in archives.values():
        service.register_model(archive)
    service.add_device("cam-1")
    service.add_device("cam-2")
    updates = {**_update(service, 1, ["cam-1"]), **_update(service, 2, ["cam-2"])}
    for _ in range(2):  # the two archives in turn: each evicts the other
        for device, version in (("cam-1", 1), ("cam-2", 2)):
            size = archives[version].stat().st_size
            served = _download(service, device, updates[device], "package", size)
            assert served == archives[version].read_bytes()
            assert service.artifacts.wait_prefetches(20)  # type: ignore[attr-defined]
            on_disk = _cache_files(service)
            assert sum(on_disk.values()) <= 3 * MiB, on_disk
    assert service.artifacts.cache.evicted >= 2  # type: ignore[attr-defined]

    small = s3_fleet(bucket, name="small-cache", cache_mb=1)  # smaller than any archive
    small.register_model(archives[2])  # already in the bucket: not uploaded again
    assert small.artifacts.stats["uploads_skipped"] == 1  # type: ignore[attr-defined]
    small.add_device("cam-3")
    update_id = _update(small, 2, ["cam-3"])["cam-3"]
    size = archives[2].stat().st_size
    assert _download(small, "cam-3", update_id, "package", size) == archives[2].read_bytes()
    assert _cache_files(small) == {}
    assert small.artifacts.stats["ranged_gets"] == -(-size // 4096)  # type: ignore[attr-defined]


def test_a_delta_is_built_once_kept_in_the_bucket_and_reused_by_a_fresh_fleet(
    s3_server: S3Server, s3_fleet: FleetFactory, archives: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[Path] = []
    real_build = fleet.deltas.build_package_delta

    def counted(base: Path, target: Path, out: Path) -> Any:
        builds.append(out)
        return real_build(base, target, out)

    monkeypatch.setattr(fleet.deltas, "build_package_delta", counted)
    bucket = s3_server.new_bucket()
    first = s3_fleet(bucket, name="first")
    for archive in archives.values():
        first.register_model(archive)
    first.add_device("cam-1")
    first.on_health("cam-1", health_report("cam-1", model=MODEL, version=1))
    first.delta_builds.wait(60)
    update_id = _update(first, 2, ["cam-1"])["cam-1"]
    delta = _offers(first)["cam-1"].update.delta
    assert delta is not None and len(builds) == 1
    in_bucket = s3_server.get(bucket, f"fleet-a/{MODEL}/deltas/1-2.pdelta")
    assert hashlib.sha256(in_bucket).hexdigest() == delta.sha256
    assert _download(first, "cam-1", update_id, "delta", delta.size) == in_bucket

    # Another fleet server (or this one after losing its disk): an empty data dir, the same bucket.
    second = s3_fleet(bucket, name="second")
    for archive in archives.values():
        second.register_model(archive)
    assert second.artifacts.stats["uploads_skipped"] == 2  # type: ignore[attr-defined]
    second.add_device("cam-1")
    second.on_health("cam-1", health_report("cam-1", model=MODEL, version=1))
    second.delta_builds.wait(60)
    update_id = _update(second, 2, ["cam-1"])["cam-1"]
    reused = _offers(second)["cam-1"].update.delta
    assert reused is not None and reused.sha256 == delta.sha256
    assert len(builds) == 1, "found in the bucket, not built again"
    listed = second.tuf.target(delta_target_name(MODEL, 1, 2))
    assert listed is not None and listed.hashes["sha256"] == delta.sha256, "signed by the second fleet too"
    assert _download(second, "cam-1", update_id, "delta", delta.size) == in_bucket


def test_an_object_deleted_behind_the_fleets_back_fails_its_chunks_only(
    s3_server: S3Server, s3_fleet: FleetFactory, archives: dict[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3_server.new_bucket()
    service = s3_fleet(bucket)
    for archive in archives.values():
        service.register_model(archive)
    service.add_device("cam-1")
    service.add_device("cam-2")
    updates = {**_update(service, 2, ["cam-1"]), **_update(service, 1, ["cam-2"])}
    s3_server.client().delete_object(Bucket=bucket, Key=f"fleet-a/{MODEL}/2.tar")
    shutil.rmtree(service.artifacts.cache.folder)  # type: ignore[attr-defined]

    with caplog.at_level(logging.ERROR):
        for offset in (0, 4096):
            request = ChunkRequest(update_id=updates["cam-1"], offset=offset, length=4096)
            answer = decode_chunk_answer(service.chunk_for("cam-1", request) or b"")
            # The device is told it will not come, and why, but not the bucket or its paths.
            assert isinstance(answer, ChunkUnavailable) and answer.retry_after_s is None
            assert (answer.offset, answer.update_id) == (offset, updates["cam-1"])
            assert "push it again" in answer.reason and bucket not in answer.reason
    assert service.artifact_errors["ArtifactMissing"] == 2
    logged = [r.getMessage() for r in caplog.records if "vanished" in r.getMessage()]
    assert len(logged) == 1, "one line per artifact, not one per chunk"
    assert f"s3://{bucket}/fleet-a/{MODEL}/2.tar" in logged[0] and "push the same package again" in logged[0]

    size = archives[1].stat().st_size
    assert _download(service, "cam-2", updates["cam-2"], "package", size) == archives[1].read_bytes()

    service.register_model(archives[2])  # pushing it again puts it back
    request = ChunkRequest(update_id=updates["cam-1"], offset=4096, length=4096)
    assert (
        decode_chunk(service.chunk_for("cam-1", request) or b"").data == archives[2].read_bytes()[4096:8192]
    )


def test_a_fleet_moved_from_its_folder_to_a_bucket_uploads_what_it_registered(
    s3_server: S3Server, aws_env: pytest.MonkeyPatch, archives: dict[int, Path], tmp_path: Path
) -> None:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    on_disk = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", 4096)
    for archive in archives.values():
        on_disk.register_model(archive)
    (data.artifacts / MODEL / "1.tar").unlink()  # lost before the move: reported, not invented

    bucket = s3_server.new_bucket()
    store = open_store(StoreOptions(f"s3://{bucket}/fleet-a", s3_server.endpoint), data)
    moved = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", 4096, store)
    assert moved.check_artifacts() == {"uploaded": [f"{MODEL}/2.tar"], "missing": [f"{MODEL}/1.tar"]}
    assert s3_server.get(bucket, f"fleet-a/{MODEL}/2.tar") == archives[2].read_bytes()
    assert moved.check_artifacts() == {"uploaded": [], "missing": [f"{MODEL}/1.tar"]}


# -- errors at start --------------------------------------------------------------------------------
def _open(server_or_url: S3Server | str, bucket: str, data: FleetDataDir) -> Any:
    endpoint = server_or_url if isinstance(server_or_url, str) else server_or_url.endpoint
    return open_store(StoreOptions(f"s3://{bucket}/fleet-a", endpoint), data)


def test_refused_credentials_a_missing_bucket_or_no_server_stop_the_start_with_what_to_do(
    s3_server: S3Server, aws_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    bucket = s3_server.new_bucket()
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "a-secret-never-shown")
    with pytest.raises(ArtifactStoreError, match="refused the credentials") as refused:
        _open(s3_server, bucket, data)
    assert "AWS_ACCESS_KEY_ID" in str(refused.value) and "environment variables" in str(refused.value)
    assert "a-secret-never-shown" not in str(refused.value) and "AKIAWRONG" not in str(refused.value)

    aws_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with pytest.raises(ArtifactStoreError, match="bucket 'no-such-bucket' does not exist"):
        _open(s3_server, "no-such-bucket", data)
    with pytest.raises(ArtifactStoreError, match=r"cannot reach the S3 endpoint.*--s3-endpoint-url"):
        _open(f"http://127.0.0.1:{free_port()}", bucket, data)
    with pytest.raises(ArtifactStoreError, match="s3://BUCKET"):
        open_store(StoreOptions("s3:/no-bucket"), data)
    with pytest.raises(ArtifactStoreError, match="not a valid bucket name"):
        open_store(StoreOptions("s3://UPPER_case"), data)


def test_credentials_can_come_from_the_data_dirs_secrets(
    s3_server: S3Server, aws_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    bucket = s3_server.new_bucket()
    with pytest.raises(ArtifactStoreError, match=r"no S3 credentials.*s3-credentials"):
        _open(s3_server, bucket, data)
    credentials = data.secrets / "s3-credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    credentials.chmod(0o644)
    with pytest.raises(ArtifactStoreError, match="chmod 600"):
        _open(s3_server, bucket, data)
    credentials.chmod(0o600)
    store = _open(s3_server, bucket, data)
    assert store.credentials.source == str(credentials)
    assert SECRET_KEY not in repr(store.credentials)
    credentials.write_text("[default]\naws_access_key_id = NOT-A-KEY\naws_secret_access_key = x\n")
    with pytest.raises(ArtifactStoreError, match=f"refused the credentials from {credentials}"):
        _open(s3_server, bucket, data)


def test_fleet_serve_stops_before_starting_anything_when_the_store_is_wrong(
    s3_server: S3Server, aws_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    options = ServeOptions(
        tmp_path / "fleet",
        artifacts=StoreOptions("s3://no-such-bucket/fleet", s3_server.endpoint, cache_mb=16),
    )
    with pytest.raises(ArtifactStoreError, match="does not exist"):
        asyncio.run(serve(options, asyncio.Event()))
    assert not (tmp_path / "fleet" / "broker" / "mosquitto.conf").exists(), "no broker was started"
    assert not (tmp_path / "fleet" / "fleet.sqlite").exists()
