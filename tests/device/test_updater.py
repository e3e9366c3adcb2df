"""The updater against an in-memory fleet: every check that must hold before a model is used."""

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.engine.engine import Engine
from device.slots import ModelSlots
from device.updater import Updater, UpdateRecord
from models.package_delta import build_package_delta, manifest_sha256
from models.signing import key_id, sign
from protocol.frames import Chunk
from protocol.messages import SignedUpdate, UpdateMetadata, UpdateOffer, UpdateState, UpdateStatus


class MemoryFleet:
    """Implements FleetTransport over bytes in memory."""

    def __init__(self, payload: bytes, delta: bytes = b"") -> None:
        self.payloads = {"package": payload, "delta": delta}
        self.fetched = {"package": 0, "delta": 0}
        self.statuses: list[UpdateStatus] = []

    async def publish_update_status(self, status: UpdateStatus) -> None:
        self.statuses.append(status)

    async def fetch_chunk(
        self, update_id: str, offset: int, length: int, timeout: float, payload: str = "package"
    ) -> Chunk:
        data = self.payloads[payload][offset : offset + length]
        self.fetched[payload] += len(data)
        return Chunk(update_id, offset, len(self.payloads[payload]), data)

    @property
    def states(self) -> list[str]:
        return [s.state.value for s in self.statuses]


def offer_for(
    payload: bytes, key: Ed25519PrivateKey, *, version: int = 2, **overrides: object
) -> UpdateOffer:
    fields = {
        "update_id": "u1",
        "model_name": "surface-defect",
        "version": version,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "created": time.time(),
        "expires": time.time() + 3600,
        **overrides,
    }
    metadata = UpdateMetadata.model_validate(fields)
    kid, signature = sign(metadata.model_dump(mode="json"), key)
    return UpdateOffer(
        update=SignedUpdate(metadata=metadata, key_id=kid, signature=signature), chunk_size=64 * 1024
    )


@pytest.fixture
def serving_v1(engine: Engine, data_dir: Path) -> Engine:
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    engine.serve(engine.prepare(slots.active_dir(), slots.active_manifest()))
    return engine


def make_updater(data_dir: Path, engine: Engine, fleet: MemoryFleet, key: Ed25519PrivateKey) -> Updater:
    return Updater(
        "dev-a", data_dir, engine, fleet, {key_id(key.public_key()): key.public_key()}, probation_s=0
    )


def journal_as_if(data_dir: Path, offer: UpdateOffer, state: UpdateState, reason: str = "") -> None:
    """The journal an agent would have left, written by the updater's own serializer."""
    record = UpdateRecord(update=offer.update, state=state, reason=reason, target_slot="b", previous_slot="a")
    (data_dir / "update-journal.json").write_text(json.dumps(record.to_json()))


def switched_to_v2(data_dir: Path, archives: dict[int, Path]) -> ModelSlots:
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    slots.unpack_into("b", archives[2])
    slots.activate("b")
    return slots


def run_offer(updater: Updater, offer: UpdateOffer) -> None:
    asyncio.run(updater.handle_offer(offer))


def assert_still_serving_v1(engine: Engine, data_dir: Path) -> None:
    assert engine.get("surface-defect").manifest.version == 1
    assert ModelSlots(data_dir / "models" / "surface-defect").active_slot() == "a"


def test_good_update_is_committed(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, signing_key)
    run_offer(updater, offer_for(payload, signing_key))
    assert fleet.states == [
        "offered",
        "downloading",
        "verifying",
        "applying",
        "staged",
        "testing",
        "probation",
        "committed",
    ]
    assert serving_v1.get("surface-defect").manifest.version == 2
    assert ModelSlots(data_dir / "models" / "surface-defect").active_slot() == "b"
    journal = json.loads((data_dir / "update-journal.json").read_text())
    assert journal["state"] == "committed" and journal["target_slot"] == "b"
    assert not list((data_dir / "downloads").iterdir()), "the download is removed after commit"


def test_bad_signature_is_refused_before_download(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    offer = offer_for(payload, Ed25519PrivateKey.generate())  # signed by a key the device does not trust
    run_offer(make_updater(data_dir, serving_v1, fleet, signing_key), offer)
    assert fleet.states == ["failed"]
    assert "unknown key" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)
    assert not (data_dir / "update-journal.json").exists(), "a refused offer never enters the journal"


def test_tampered_metadata_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload, signing_key)
    forged = offer.update.model_copy(
        update={"metadata": offer.update.metadata.model_copy(update={"version": 9})}
    )
    fleet = MemoryFleet(payload)
    run_offer(make_updater(data_dir, serving_v1, fleet, signing_key), UpdateOffer(update=forged))
    assert fleet.states == ["failed"] and "does not verify" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)


def test_payload_that_does_not_match_its_hash_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    altered = bytearray(payload)
    altered[len(altered) // 2] ^= 0xFF
    fleet = MemoryFleet(bytes(altered))
    run_offer(make_updater(data_dir, serving_v1, fleet, signing_key), offer_for(payload, signing_key))
    assert fleet.states[-1] == "failed" and "sha256" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)
    assert not list((data_dir / "downloads").iterdir()), "a bad payload is discarded"


def test_truncated_payload_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload[: len(payload) // 2])
    run_offer(make_updater(data_dir, serving_v1, fleet, signing_key), offer_for(payload, signing_key))
    assert fleet.states[-1] == "failed" and "does not fit" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)


def test_older_version_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[1].read_bytes()
    fleet = MemoryFleet(payload)
    run_offer(
        make_updater(data_dir, serving_v1, fleet, signing_key), offer_for(payload, signing_key, version=1)
    )
    assert fleet.states == ["failed"] and "not newer" in fleet.statuses[-1].reason


def test_package_that_contradicts_its_metadata_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()  # holds v2, signed as v3
    fleet = MemoryFleet(payload)
    run_offer(
        make_updater(data_dir, serving_v1, fleet, signing_key), offer_for(payload, signing_key, version=3)
    )
    assert fleet.states[-1] == "failed" and "signed metadata says" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)


def test_restart_mid_update_fails_it_and_keeps_the_old_model(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload, signing_key)
    journal_as_if(data_dir, offer, UpdateState.APPLYING)
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, signing_key)
    asyncio.run(updater.recover())
    assert fleet.states == ["failed"] and "restarted during applying" in fleet.statuses[0].reason
    assert updater.state is UpdateState.FAILED
    assert_still_serving_v1(serving_v1, data_dir)


def test_a_repeated_offer_is_answered_with_the_journaled_state(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, signing_key)
    offer = offer_for(payload, signing_key)
    run_offer(updater, offer)
    run_offer(updater, offer)  # e.g. re-sent by the fleet after the device reconnected
    assert fleet.states[-2:] == ["committed", "committed"]
    assert serving_v1.get("surface-defect").manifest.version == 2


def test_rollback_interrupted_before_the_link_moved_is_finished_at_boot(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    slots = switched_to_v2(data_dir, archives)
    offer = offer_for(archives[2].read_bytes(), signing_key)
    journal_as_if(data_dir, offer, UpdateState.ROLLED_BACK, reason="errors")
    updater = make_updater(data_dir, serving_v1, MemoryFleet(b""), signing_key)
    assert updater.repair_slots_at_boot("surface-defect", active_is_broken=False)
    assert slots.active_slot() == "a"


def test_a_broken_slot_after_a_switch_falls_back_at_boot(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    slots = switched_to_v2(data_dir, archives)
    (slots.slot_dir("b") / "model.onnx").write_bytes(b"")  # as after a power cut before the data hit the disk
    offer = offer_for(archives[2].read_bytes(), signing_key)
    journal_as_if(data_dir, offer, UpdateState.PROBATION)
    fleet = MemoryFleet(b"")
    updater = make_updater(data_dir, serving_v1, fleet, signing_key)
    assert not updater.repair_slots_at_boot("surface-defect", active_is_broken=False)
    assert updater.repair_slots_at_boot("surface-defect", active_is_broken=True)
    assert slots.active_manifest().version == 1
    asyncio.run(updater.recover())
    assert fleet.states == ["failed"] and "old model kept" in fleet.statuses[0].reason


@pytest.fixture(scope="module")
def v1_to_v2_delta(tmp_path_factory: pytest.TempPathFactory, zoo: Path) -> bytes:
    path = tmp_path_factory.mktemp("pdelta") / "v1-v2.pdelta"
    build_package_delta(zoo / "v1", zoo / "v2", path)
    return path.read_bytes()


def delta_fields(delta: bytes, zoo: Path, **overrides: object) -> dict[str, object]:
    return {
        "base_version": 1,
        "base_manifest_sha256": manifest_sha256(zoo / "v1"),
        "sha256": hashlib.sha256(delta).hexdigest(),
        "size": len(delta),
        "manifest_sha256": manifest_sha256(zoo / "v2"),
        **overrides,
    }


def test_a_delta_update_rebuilds_the_new_package_from_the_active_slot(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    signing_key: Ed25519PrivateKey,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    offer = offer_for(payload, signing_key, delta=delta_fields(v1_to_v2_delta, zoo))
    run_offer(make_updater(data_dir, serving_v1, fleet, signing_key), offer)
    assert fleet.states[-1] == "committed"
    assert fleet.fetched == {"package": 0, "delta": len(v1_to_v2_delta)}
    downloaded = next(s for s in fleet.statuses if s.state is UpdateState.VERIFYING)
    assert downloaded.detail == {"payload": "delta", "bytes": len(v1_to_v2_delta)}
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    assert slots.active_manifest().version == 2
    for path in (zoo / "v2").iterdir():
        assert (slots.active_dir() / path.name).read_bytes() == path.read_bytes()


def test_a_delta_for_another_base_is_skipped_for_the_whole_package(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    signing_key: Ed25519PrivateKey,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    other_base = delta_fields(v1_to_v2_delta, zoo, base_manifest_sha256=manifest_sha256(zoo / "v2"))
    run_offer(
        make_updater(data_dir, serving_v1, fleet, signing_key),
        offer_for(payload, signing_key, delta=other_base),
    )
    assert fleet.states[-1] == "committed"
    assert fleet.fetched == {"package": len(payload), "delta": 0}


def test_a_delta_that_does_not_rebuild_the_signed_manifest_installs_nothing(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    signing_key: Ed25519PrivateKey,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    wrong = delta_fields(v1_to_v2_delta, zoo, manifest_sha256=manifest_sha256(zoo / "v1"))
    run_offer(
        make_updater(data_dir, serving_v1, fleet, signing_key), offer_for(payload, signing_key, delta=wrong)
    )
    assert fleet.states[-1] == "failed" and "signed metadata" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    assert list(slots.slot_dir("b").iterdir()) == [], "no half-built package is left in the inactive slot"
    assert not list((data_dir / "downloads").iterdir())


def test_a_restart_while_downloading_resumes_from_the_last_whole_chunk(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], signing_key: Ed25519PrivateKey
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload, signing_key)  # 64 KiB chunks
    journal_as_if(data_dir, offer, UpdateState.DOWNLOADING)
    record = json.loads((data_dir / "update-journal.json").read_text())
    record["chunk_size"] = offer.chunk_size
    (data_dir / "update-journal.json").write_text(json.dumps(record))
    (data_dir / "downloads").mkdir()
    kept = 3 * offer.chunk_size
    # Three whole chunks and a torn fourth, as a power cut leaves them.
    (data_dir / "downloads" / "u1.package.part").write_bytes(payload[: kept + 1000])
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, signing_key)
    asyncio.run(updater.recover())
    assert fleet.states[-1] == "committed", fleet.statuses[-1].reason
    assert fleet.fetched["package"] == len(payload) - kept
    assert serving_v1.get("surface-defect").manifest.version == 2
