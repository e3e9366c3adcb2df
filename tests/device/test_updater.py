"""The updater against an in-memory fleet: every check that must hold before a model is used."""

import asyncio
import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

from device.engine.engine import Engine
from device.slots import ModelSlots
from device.tuf_client import TufClient, bootstrap
from device.updater import Updater, UpdateRecord
from fleet.tuf_repository import Expiries, MetadataNotFound, TufRepository
from models.package_delta import build_package_delta, manifest_sha256
from protocol.frames import Chunk
from protocol.messages import UpdateMetadata, UpdateOffer, UpdateState, UpdateStatus
from protocol.targets import archive_target_name


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


def offer_for(payload: bytes, *, version: int = 2, **overrides: object) -> UpdateOffer:
    """An offer as the fleet sends it: unsigned, to be held to the fleet's TUF targets."""
    fields = {
        "update_id": "u1",
        "model_name": "surface-defect",
        "version": version,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "created": time.time(),
        **overrides,
    }
    return UpdateOffer(update=UpdateMetadata.model_validate(fields), chunk_size=64 * 1024)


def publish(repo: TufRepository, archive: Path, version: int, **deltas: object) -> None:
    custom = {"model": "surface-defect", "version": version, "format": "package-tar"}
    repo.add_target(archive, archive_target_name("surface-defect", version), custom, **deltas)  # type: ignore[arg-type]


@pytest.fixture
def fleet_tuf(tmp_path: Path, archives: dict[int, Path]) -> TufRepository:
    """The fleet's TUF repository with v1 and v2 of the sample model listed."""
    repo = TufRepository(tmp_path / "tuf", tmp_path / "tuf-keys")
    repo.init()
    for version, archive in archives.items():
        publish(repo, archive, version)
    return repo


@pytest.fixture
def serving_v1(engine: Engine, data_dir: Path) -> Engine:
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    engine.serve(engine.prepare(slots.active_dir(), slots.active_manifest()))
    return engine


def tuf_client_for(data_dir: Path, repo: TufRepository) -> TufClient:
    """The device's TUF client, enrolled with the repository's root, fetching straight from it."""

    def fetch(url: str, max_length: int, deadline_s: float) -> bytes:
        try:
            return repo.serve_metadata(url.rsplit("/", 1)[-1])
        except MetadataNotFound as e:
            raise FileNotFoundError(str(e)) from None

    bootstrap(data_dir, repo.trusted_root())
    return TufClient(data_dir, fetch)


def make_updater(data_dir: Path, engine: Engine, fleet: MemoryFleet, repo: TufRepository) -> Updater:
    return Updater("dev-a", data_dir, engine, fleet, tuf_client_for(data_dir, repo), probation_s=0)


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
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    run_offer(updater, offer_for(payload))
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


def test_an_offer_the_signed_targets_do_not_list_is_refused_before_download(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer_for(payload, version=9))
    assert fleet.states == ["failed"]
    assert "surface-defect/9.tar is not in the fleet's signed targets" in fleet.statuses[-1].reason
    assert fleet.fetched == {"package": 0, "delta": 0}
    assert_still_serving_v1(serving_v1, data_dir)
    assert not (data_dir / "update-journal.json").exists(), "a refused offer never enters the journal"


def test_an_offer_whose_hash_differs_from_the_signed_target_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    forged = offer_for(payload, sha256=hashlib.sha256(b"something else").hexdigest())
    fleet = MemoryFleet(payload)
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), forged)
    assert fleet.states == ["failed"] and "differs from the signed target" in fleet.statuses[-1].reason
    assert fleet.fetched == {"package": 0, "delta": 0}
    assert_still_serving_v1(serving_v1, data_dir)


def test_expired_fleet_metadata_refuses_every_offer(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], tmp_path: Path
) -> None:
    repo = TufRepository(
        tmp_path / "tuf", tmp_path / "keys", expiries=Expiries(timestamp=timedelta(seconds=1))
    )
    repo.init()
    publish(repo, archives[2], 2)
    updater = make_updater(data_dir, serving_v1, fleet := MemoryFleet(archives[2].read_bytes()), repo)
    time.sleep(1.1)  # a fleet that stopped re-signing looks like a freeze attack
    run_offer(updater, offer_for(archives[2].read_bytes()))
    assert fleet.states == ["failed"] and "expired" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)


def test_payload_that_does_not_match_its_hash_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    altered = bytearray(payload)
    altered[len(altered) // 2] ^= 0xFF
    fleet = MemoryFleet(bytes(altered))
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer_for(payload))
    assert fleet.states[-1] == "failed" and "sha256" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)
    assert not list((data_dir / "downloads").iterdir()), "a bad payload is discarded"


def test_truncated_payload_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload[: len(payload) // 2])
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer_for(payload))
    assert fleet.states[-1] == "failed" and "does not fit" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)


def test_older_version_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[1].read_bytes()
    fleet = MemoryFleet(payload)
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer_for(payload, version=1))
    assert fleet.states == ["failed"] and "not newer" in fleet.statuses[-1].reason


def test_package_that_contradicts_its_metadata_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()  # holds v2, signed as v3
    publish(fleet_tuf, archives[2], 3)
    fleet = MemoryFleet(payload)
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer_for(payload, version=3))
    assert fleet.states[-1] == "failed" and "signed metadata says" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)


def test_restart_mid_update_fails_it_and_keeps_the_old_model(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload)
    journal_as_if(data_dir, offer, UpdateState.APPLYING)
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states == ["failed"] and "restarted during applying" in fleet.statuses[0].reason
    assert updater.state is UpdateState.FAILED
    assert_still_serving_v1(serving_v1, data_dir)


def test_a_repeated_offer_is_answered_with_the_journaled_state(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    offer = offer_for(payload)
    run_offer(updater, offer)
    run_offer(updater, offer)  # e.g. re-sent by the fleet after the device reconnected
    assert fleet.states[-2:] == ["committed", "committed"]
    assert serving_v1.get("surface-defect").manifest.version == 2


def test_rollback_interrupted_before_the_link_moved_is_finished_at_boot(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    slots = switched_to_v2(data_dir, archives)
    offer = offer_for(archives[2].read_bytes())
    journal_as_if(data_dir, offer, UpdateState.ROLLED_BACK, reason="errors")
    updater = make_updater(data_dir, serving_v1, MemoryFleet(b""), fleet_tuf)
    assert updater.repair_slots_at_boot("surface-defect", active_is_broken=False)
    assert slots.active_slot() == "a"


def test_a_broken_slot_after_a_switch_falls_back_at_boot(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    slots = switched_to_v2(data_dir, archives)
    (slots.slot_dir("b") / "model.onnx").write_bytes(b"")  # as after a power cut before the data hit the disk
    offer = offer_for(archives[2].read_bytes())
    journal_as_if(data_dir, offer, UpdateState.PROBATION)
    fleet = MemoryFleet(b"")
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
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


def sign_delta(
    repo: TufRepository, archives: dict[int, Path], delta: bytes, fields: dict[str, object]
) -> None:
    """List the v1 -> v2 delta in the fleet's targets, with the manifest hashes of `fields`."""
    path = repo.folder / "1-2.pdelta"
    path.write_bytes(delta)
    hashes = {k: fields[k] for k in ("base_manifest_sha256", "manifest_sha256")}
    publish(repo, archives[2], 2, deltas={1: path}, delta_custom={1: hashes})


def test_a_delta_update_rebuilds_the_new_package_from_the_active_slot(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    fleet_tuf: TufRepository,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    fields = delta_fields(v1_to_v2_delta, zoo)
    sign_delta(fleet_tuf, archives, v1_to_v2_delta, fields)
    offer = offer_for(payload, delta=fields)
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer)
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
    fleet_tuf: TufRepository,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    other_base = delta_fields(v1_to_v2_delta, zoo, base_manifest_sha256=manifest_sha256(zoo / "v2"))
    sign_delta(fleet_tuf, archives, v1_to_v2_delta, other_base)
    run_offer(
        make_updater(data_dir, serving_v1, fleet, fleet_tuf),
        offer_for(payload, delta=other_base),
    )
    assert fleet.states[-1] == "committed"
    assert fleet.fetched == {"package": len(payload), "delta": 0}


def test_a_delta_that_does_not_rebuild_the_signed_manifest_installs_nothing(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    fleet_tuf: TufRepository,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    wrong = delta_fields(v1_to_v2_delta, zoo, manifest_sha256=manifest_sha256(zoo / "v1"))
    sign_delta(fleet_tuf, archives, v1_to_v2_delta, wrong)  # a fleet that listed the wrong hash
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer_for(payload, delta=wrong))
    assert fleet.states[-1] == "failed" and "signed metadata" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    assert list(slots.slot_dir("b").iterdir()) == [], "no half-built package is left in the inactive slot"
    assert not list((data_dir / "downloads").iterdir())


def test_a_restart_while_downloading_resumes_from_the_last_whole_chunk(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload)  # 64 KiB chunks
    journal_as_if(data_dir, offer, UpdateState.DOWNLOADING)
    record = json.loads((data_dir / "update-journal.json").read_text())
    record["chunk_size"] = offer.chunk_size
    (data_dir / "update-journal.json").write_text(json.dumps(record))
    (data_dir / "downloads").mkdir()
    kept = 3 * offer.chunk_size
    # Three whole chunks and a torn fourth, as a power cut leaves them.
    (data_dir / "downloads" / "u1.package.part").write_bytes(payload[: kept + 1000])
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states[-1] == "committed", fleet.statuses[-1].reason
    assert fleet.fetched["package"] == len(payload) - kept
    assert serving_v1.get("surface-defect").manifest.version == 2


def test_an_unsigned_delta_is_ignored_for_the_whole_package(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    fleet_tuf: TufRepository,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    offer = offer_for(payload, delta=delta_fields(v1_to_v2_delta, zoo))  # not in the signed targets
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer)
    assert fleet.states[-1] == "committed"
    assert fleet.fetched == {"package": len(payload), "delta": 0}


def test_a_delta_that_differs_from_its_signed_target_refuses_the_offer(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    fleet_tuf: TufRepository,
    v1_to_v2_delta: bytes,
    zoo: Path,
) -> None:
    payload = archives[2].read_bytes()
    fields = delta_fields(v1_to_v2_delta, zoo)
    sign_delta(fleet_tuf, archives, v1_to_v2_delta, fields)
    forged = {**fields, "sha256": hashlib.sha256(b"another delta").hexdigest()}
    fleet = MemoryFleet(payload, v1_to_v2_delta)
    run_offer(make_updater(data_dir, serving_v1, fleet, fleet_tuf), offer_for(payload, delta=forged))
    assert fleet.states == ["failed"] and "delta differs from the signed target" in fleet.statuses[-1].reason
    assert fleet.fetched == {"package": 0, "delta": 0}
    assert_still_serving_v1(serving_v1, data_dir)
