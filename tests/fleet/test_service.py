"""The fleet's logic on a real SQLite file, with publishing captured instead of sent."""

import asyncio
import hashlib
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device.tuf_client import TufClient, bootstrap
from fleet.db import open_database
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.service import FleetService
from fleet.store import FleetDataDir
from models.package_delta import apply_package_delta
from models.signing import public_key_pem
from protocol import topics
from protocol.frames import ChunkUnavailable, decode_chunk, decode_chunk_answer
from protocol.messages import (
    ChunkRequest,
    DeviceState,
    TelemetryRecord,
    UpdateOffer,
    UpdateState,
    UpdateStatus,
    decode,
    encode,
)
from protocol.sealed import seal
from protocol.targets import archive_target_name, delta_target_name
from tests.conftest import ZOO
from tests.health_reports import health_report


@pytest.fixture
def service(tmp_path: Path) -> FleetService:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    return recording_publishes(
        FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", chunk_size=4096)
    )


def recording_publishes(service: FleetService) -> FleetService:
    """The service with what it publishes kept in `service.sent` as (topic, payload), no broker."""
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        sent.append((topic, payload))

    service.publish = publish
    service.sent = sent  # type: ignore[attr-defined]
    return service


def test_enrollment_gives_credentials_and_the_tuf_root(service: FleetService, tmp_path: Path) -> None:
    enrollment = service.add_device("cam-1")
    assert enrollment["mqtt_password"] and enrollment["fleet_url"] == "mqtt://127.0.0.1:1883"
    bootstrap(tmp_path, enrollment["tuf_root"].encode())  # a valid, self-signed TUF root
    passwd = service.data.password_file.read_text()
    assert passwd.startswith("cam-1:$7$") and enrollment["mqtt_password"] not in passwd
    with pytest.raises(Conflict):
        service.add_device("cam-1")
    with pytest.raises(InvalidRequest, match="invalid device id"):
        service.add_device("../../etc")


def test_registry_verifies_and_keeps_versions_immutable(
    service: FleetService, archives: dict[int, Path], tmp_path: Path
) -> None:
    model = service.register_model(archives[1])
    assert (model["name"], model["version"]) == ("surface-defect", 1)
    assert service.register_model(archives[1]) == model  # the same bytes again: idempotent
    corrupt = tmp_path / "corrupt.tar"
    data = bytearray(archives[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a file, not in the tar padding
    corrupt.write_bytes(bytes(data))
    with pytest.raises(InvalidRequest, match="not a valid model package"):
        service.register_model(corrupt)


def device_tuf_client(service: FleetService, folder: Path) -> TufClient:
    def fetch(url: str, max_length: int, deadline_s: float) -> bytes:
        data = service.metadata_file(url.rsplit("/", 1)[-1])
        if data is None:
            raise FileNotFoundError(url)
        return data

    bootstrap(folder, service.tuf.trusted_root())
    return TufClient(folder, fetch)


def test_offer_is_signed_and_chunks_are_served_to_that_device_only(
    service: FleetService, archives: dict[int, Path], tmp_path: Path
) -> None:
    service.add_device("cam-1")
    service.add_device("cam-2")
    service.register_model(archives[2])
    with pytest.raises(NotFound):
        asyncio.run(service.start_update("surface-defect", 9, ["cam-1"]))
    (update,) = asyncio.run(service.start_update("surface-defect", 2, ["cam-1"]))
    topic, payload = service.sent[-1]  # type: ignore[attr-defined]
    assert topic == topics.device_topic("cam-1", topics.CMD_UPDATE)
    offer = decode(UpdateOffer, payload)
    assert offer.update.sha256 == hashlib.sha256(archives[2].read_bytes()).hexdigest()
    client = device_tuf_client(service, tmp_path)
    signed = client.target_info(archive_target_name("surface-defect", 2))
    assert signed is not None, "every registered version is a signed TUF target"
    assert (signed.length, signed.hashes["sha256"]) == (offer.update.size, offer.update.sha256)

    request = ChunkRequest(update_id=update["update_id"], offset=4096, length=4096)
    chunk = decode_chunk(service.chunk_for("cam-1", request) or b"")
    assert chunk.data == archives[2].read_bytes()[4096:8192]
    refused = decode_chunk_answer(service.chunk_for("cam-2", request))
    assert isinstance(refused, ChunkUnavailable), "another device's payload is not served"
    assert refused.reason == "the fleet has no such update for this device" and refused.retry_after_s is None
    unknown = ChunkRequest(update_id="no-such-update", offset=0, length=4096)
    assert decode_chunk_answer(service.chunk_for("cam-2", unknown)) == ChunkUnavailable(
        "no-such-update", 0, refused.reason, None
    ), "an unknown update and another device's are answered alike"
    past = ChunkRequest(update_id=update["update_id"], offset=10**9, length=4096)
    assert "past the payload's end" in decode_chunk_answer(service.chunk_for("cam-1", past)).reason  # type: ignore[union-attr]


def _reports_running(service: FleetService, device_id: str, version: int) -> None:
    service.on_health(device_id, health_report(device_id, model="surface-defect", version=version))


def test_a_device_that_runs_an_older_registered_version_is_offered_a_delta(
    service: FleetService, archives: dict[int, Path], tmp_path: Path
) -> None:
    service.register_model(archives[1])
    service.register_model(archives[2])
    for device_id, runs in (("cam-1", 1), ("cam-2", None)):
        service.add_device(device_id)
        if runs is not None:
            _reports_running(service, device_id, runs)
    updates = asyncio.run(service.start_update("surface-defect", 2, ["cam-1", "cam-2"]))
    offers = {topic.split("/")[2]: decode(UpdateOffer, payload) for topic, payload in service.sent}  # type: ignore[attr-defined]
    assert offers["cam-2"].update.delta is None, "a device that reported no version gets the package"
    delta = offers["cam-1"].update.delta
    assert delta is not None and delta.base_version == 1
    assert delta.size < 0.9 * archives[2].stat().st_size
    signed = device_tuf_client(service, tmp_path / "device").target_info(
        delta_target_name("surface-defect", 1, 2)
    )
    assert signed is not None and signed.hashes["sha256"] == delta.sha256
    assert signed.custom["base_manifest_sha256"] == delta.base_manifest_sha256

    update_id = next(u["update_id"] for u in updates if u["device_id"] == "cam-1")
    served = bytearray()
    while len(served) < delta.size:
        request = ChunkRequest(update_id=update_id, offset=len(served), length=4096, payload="delta")
        served += decode_chunk(service.chunk_for("cam-1", request) or b"").data
    assert hashlib.sha256(served).hexdigest() == delta.sha256
    out = tmp_path / "rebuilt"
    manifest = apply_package_delta(
        _write(tmp_path / "d", bytes(served)), ZOO / "v1", out, delta.manifest_sha256
    )
    assert manifest.version == 2
    other = next(u["update_id"] for u in updates if u["device_id"] == "cam-2")
    no_delta = ChunkRequest(update_id=other, offset=0, length=4096, payload="delta")
    refused = decode_chunk_answer(service.chunk_for("cam-2", no_delta))
    assert isinstance(refused, ChunkUnavailable) and "ask for the package" in refused.reason


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_statuses_move_the_update_until_it_is_final(service: FleetService, archives: dict[int, Path]) -> None:
    service.add_device("cam-1")
    service.register_model(archives[2])
    (update,) = asyncio.run(service.start_update("surface-defect", 2, ["cam-1"]))

    def report(device: str, state: UpdateState) -> None:
        service.on_update_status(
            device,
            UpdateStatus(
                device_id=device,
                update_id=update["update_id"],
                model_name="surface-defect",
                version=2,
                state=state,
            ),
        )

    report("cam-1", UpdateState.DOWNLOADING)
    assert service.get_update(update["update_id"])["state"] == "downloading"
    report("cam-1", UpdateState.COMMITTED)
    report("cam-1", UpdateState.FAILED)  # a late duplicate cannot reopen a final update
    view = service.get_update(update["update_id"])
    assert view["state"] == "committed"
    assert [e["state"] for e in view["events"]] == ["downloading", "committed", "failed"]


def sealed(
    service: FleetService,
    device_key: Ed25519PrivateKey,
    seq: int,
    device_id: str = "cam-1",
    kind: str = "metric",
) -> bytes:
    record = encode(TelemetryRecord(kind=kind, ts=1.0, body={"label": "crack"}))  # type: ignore[arg-type]
    return seal(
        record,
        device_id=device_id,
        seq=seq,
        device_key=device_key,
        fleet_public=service.telemetry_key.public_key(),
        fleet_key_id=service.telemetry_key_id,
    )


@pytest.fixture
def pinned(service: FleetService) -> Ed25519PrivateKey:
    """cam-1 enrolled, its public key pinned from its first online state."""
    key = Ed25519PrivateKey.generate()
    service.add_device("cam-1")
    asyncio.run(
        service.on_device_state(
            "cam-1", DeviceState(device_id="cam-1", online=True, public_key=public_key_pem(key))
        )
    )
    return key


def test_sealed_telemetry_is_stored_once(service: FleetService, pinned: Ed25519PrivateKey) -> None:
    assert service.on_telemetry("cam-1", sealed(service, pinned, 1)) == "stored"
    assert service.on_telemetry("cam-1", sealed(service, pinned, 2, kind="health")) == "stored"
    assert service.on_telemetry("cam-1", sealed(service, pinned, 1)) == "duplicate"  # a replay
    view = service.telemetry("cam-1")
    assert view["counts"] == {"metric": 1, "health": 1}
    assert [r["seq"] for r in view["records"]] == [2, 1]


def test_forged_tampered_and_misaddressed_telemetry_is_rejected(
    service: FleetService, pinned: Ed25519PrivateKey
) -> None:
    forged = sealed(service, Ed25519PrivateKey.generate(), 5)  # not the pinned key
    assert service.on_telemetry("cam-1", forged).startswith("rejected: ForgedSender")
    tampered = bytearray(sealed(service, pinned, 6))
    tampered[-3] ^= 0x01
    assert service.on_telemetry("cam-1", bytes(tampered)).startswith("rejected: Tampered")
    service.add_device("cam-2")
    cam2 = DeviceState(
        device_id="cam-2", online=True, public_key=public_key_pem(Ed25519PrivateKey.generate())
    )
    asyncio.run(service.on_device_state("cam-2", cam2))
    # cam-1's record replayed on cam-2's topic: the envelope names cam-1, so it is not cam-2's to send
    assert service.on_telemetry("cam-2", sealed(service, pinned, 7)).startswith("rejected")
    other_fleet = X25519PrivateKey.generate().public_key()
    unknown = seal(
        b"{}",
        device_id="cam-1",
        seq=8,
        device_key=pinned,
        fleet_public=other_fleet,
        fleet_key_id="0123456789abcdef",
    )
    assert service.on_telemetry("cam-1", unknown).startswith("rejected: UnknownKey")
    assert service.telemetry("cam-1")["counts"] == {}
    assert sum(v for k, v in service.telemetry_counts.items() if k.startswith("rejected")) == 4


def test_records_before_the_key_is_pinned_are_deferred_not_lost(service: FleetService) -> None:
    key = Ed25519PrivateKey.generate()
    service.add_device("cam-1")
    assert service.on_telemetry("cam-1", sealed(service, key, 1)).startswith("deferred")
    asyncio.run(
        service.on_device_state(
            "cam-1", DeviceState(device_id="cam-1", online=True, public_key=public_key_pem(key))
        )
    )
    assert service.on_telemetry("cam-1", sealed(service, key, 1)) == "stored"  # the device's resend


def test_a_changed_device_key_is_not_accepted(service: FleetService, pinned: Ed25519PrivateKey) -> None:
    impostor = Ed25519PrivateKey.generate()
    asyncio.run(
        service.on_device_state(
            "cam-1", DeviceState(device_id="cam-1", online=True, public_key=public_key_pem(impostor))
        )
    )
    assert service.on_telemetry("cam-1", sealed(service, impostor, 1)).startswith("rejected")
    assert service.on_telemetry("cam-1", sealed(service, pinned, 1)) == "stored"


def test_offers_carry_the_devices_maintenance_windows(
    service: FleetService, archives: dict[int, Path]
) -> None:
    from fleet import maintenance
    from fleet.rollout_db import set_labels

    service.register_model(archives[2])
    for device_id in ("cam-1", "cam-2"):
        service.add_device(device_id)
    with service.sessions.begin() as s:
        set_labels(s, "cam-1", ["night-shift"], [])
        maintenance.add_window(s, "night-shift", "0 2 * * *", 60, "Europe/Berlin")
    asyncio.run(service.start_update("surface-defect", 2, ["cam-1", "cam-2"]))
    offers = {topic.split("/")[2]: decode(UpdateOffer, payload) for topic, payload in service.sent}  # type: ignore[attr-defined]
    assert offers["cam-2"].switch_windows == [], "no group window: any time"
    windows = offers["cam-1"].switch_windows
    assert len(windows) >= 14 and all(end - start == 3600 for start, end in windows)
    assert windows[0][1] > time.time(), "the first window is the open or the next one"


def test_a_rollback_made_at_the_device_is_recorded_like_the_fleets(
    service: FleetService, archives: dict[int, Path]
) -> None:
    service.register_model(archives[1])
    service.add_device("cam-1")
    status = UpdateStatus(
        device_id="cam-1",
        update_id="local-abc123",
        model_name="surface-defect",
        version=1,
        state=UpdateState.ROLLED_BACK,
        reason="field engineer via the local API: smearing on line 3",
    )
    service.on_update_status("cam-1", status)
    (view,) = service.list_updates("cam-1")
    assert (view["kind"], view["state"], view["version"]) == ("local", "rolled_back", 1)
    assert "smearing" in service.get_update("local-abc123")["events"][0]["reason"]
    service.on_update_status("cam-2", status.model_copy(update={"device_id": "cam-2"}))
    assert len(service.list_updates()) == 1, "another device cannot report on cam-1's action"
