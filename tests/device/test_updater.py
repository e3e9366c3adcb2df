"""The updater against an in-memory fleet: every check that must hold before a model is used."""

import asyncio
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from device.engine.engine import Engine
from device.line import LineState
from device.slots import ModelSlots, install_initial
from device.tuf_client import TufClient, bootstrap
from device.update_boot import load_at_boot
from device.updater import MAX_RESUMES, Updater, UpdateRecord
from fleet.tuf_repository import Expiries, MetadataNotFound, TufRepository
from models.package import pack, write_manifest
from models.package_delta import build_package_delta, manifest_sha256
from protocol.frames import Chunk
from protocol.messages import UpdateMetadata, UpdateOffer, UpdateState, UpdateStatus
from protocol.targets import archive_target_name
from tests.conftest import ZOO


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


def new_fleet_tuf(tmp_path: Path, archives: dict[int, Path]) -> TufRepository:
    """The fleet's TUF repository with v1 and v2 of the sample model listed."""
    repo = TufRepository(tmp_path / "tuf", tmp_path / "tuf-keys")
    repo.init()
    for version, archive in archives.items():
        publish(repo, archive, version)
    return repo


def serve_v1(engine: Engine, data_dir: Path) -> Engine:
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    engine.serve(engine.prepare(slots.active_dir(), slots.active_manifest()))
    return engine


@pytest.fixture
def fleet_tuf(tmp_path: Path, archives: dict[int, Path]) -> TufRepository:
    return new_fleet_tuf(tmp_path, archives)


@pytest.fixture
def serving_v1(engine: Engine, data_dir: Path) -> Engine:
    return serve_v1(engine, data_dir)


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


@pytest.mark.parametrize("state", [UpdateState.VERIFYING, UpdateState.APPLYING])
def test_a_restart_while_checking_or_unpacking_goes_back_to_the_download(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    fleet_tuf: TufRepository,
    state: UpdateState,
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload)
    journal_as_if(data_dir, offer, state)
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    (slots.slot_dir("b") / "half-written").parent.mkdir(parents=True, exist_ok=True)
    (slots.slot_dir("b") / "half-written").write_bytes(b"from the run the power cut ended")
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states[0] == "downloading" and fleet.states[-1] == "committed", fleet.states
    assert serving_v1.get("surface-defect").manifest.version == 2
    assert not (slots.slot_dir("b") / "half-written").exists(), "the slot was written again from scratch"
    assert updater.record is not None and updater.record.resumes == 1


def test_a_restart_before_the_download_began_starts_it(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    journal_as_if(data_dir, offer_for(payload), UpdateState.OFFERED)
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states[0] == "downloading" and fleet.states[-1] == "committed", fleet.states
    assert serving_v1.get("surface-defect").manifest.version == 2


def test_a_payload_that_kills_the_agent_as_it_is_unpacked_fails_after_three_tries(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload)
    record = UpdateRecord(update=offer.update, state=UpdateState.APPLYING, target_slot="b", previous_slot="a")
    record.resumes = MAX_RESUMES  # three restarts in a row already sent it back to the download
    (data_dir / "update-journal.json").write_text(json.dumps(record.to_json()))
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states == ["failed"]
    assert "restarted during applying 4 times (the payload may crash the agent)" in fleet.statuses[0].reason
    assert_still_serving_v1(serving_v1, data_dir)


def test_a_restart_between_writing_the_slot_and_testing_it_tests_the_slot(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    offer = offer_for(payload)
    journal_as_if(data_dir, offer, UpdateState.STAGED)
    ModelSlots(data_dir / "models" / "surface-defect").unpack_into("b", archives[2])
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states[0] == "testing" and fleet.states[-1] == "committed", fleet.states
    assert "downloading" not in fleet.states, "a whole slot is not fetched again"
    assert serving_v1.get("surface-defect").manifest.version == 2


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
    assert updater.repair_slots_at_boot("surface-defect")
    assert slots.active_slot() == "a"


def test_a_broken_slot_after_a_switch_is_rolled_back_at_boot(
    engine: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    slots = switched_to_v2(data_dir, archives)
    (slots.slot_dir("b") / "model.onnx").write_bytes(b"")  # as after a power cut before the data hit the disk
    offer = offer_for(archives[2].read_bytes())
    journal_as_if(data_dir, offer, UpdateState.PROBATION)
    fleet = MemoryFleet(b"")
    updater = make_updater(data_dir, engine, fleet, fleet_tuf)
    serving = load_at_boot(updater, slots)
    assert serving.manifest.version == 1 and slots.active_slot() == "a"
    asyncio.run(updater.recover())
    assert fleet.states == ["rolled_back"], fleet.statuses
    assert "v2 failed to load at boot" in fleet.statuses[0].reason


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


# -- packages other than the sample's two versions ----------------------------------------------------
def repackage(src: Path, dest: Path, version: int, model: bytes | None = None) -> Path:
    """A copy of package folder `src` as `version`, optionally with other model bytes; hashes rewritten."""
    folder = Path(shutil.copytree(src, dest))
    if model is not None:
        (folder / "model.onnx").write_bytes(model)
    fields = json.loads((folder / "manifest.json").read_text())
    fields.pop("files")
    write_manifest(folder, {**fields, "version": version}, ["model.onnx", "golden.npz"])
    return folder


def archive_of(folder: Path) -> Path:
    archive = folder.with_suffix(".tar")
    pack(folder, archive)
    return archive


def commit_v2(updater: Updater, archives: dict[int, Path]) -> None:
    run_offer(updater, offer_for(archives[2].read_bytes()))
    assert updater.state is UpdateState.COMMITTED


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# -- rollback on command ------------------------------------------------------------------------------
def test_a_rollback_on_command_serves_the_other_slot_again(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    fleet = MemoryFleet(archives[2].read_bytes())
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    commit_v2(updater, archives)
    status = asyncio.run(updater.roll_back("surface-defect", 1, "fleet: bad batch", "req-1"))
    assert (status.update_id, status.state, status.version) == ("req-1", UpdateState.ROLLED_BACK, 1)
    assert status.reason == "fleet: bad batch" and status.detail["from_version"] == 2
    assert fleet.statuses[-1] == status, "reported to the fleet under the request id"
    assert_still_serving_v1(serving_v1, data_dir)
    journal = json.loads((data_dir / "update-journal.json").read_text())
    assert journal["state"] == "rolled_back" and journal["update"]["update_id"] == "req-1"
    assert (journal["target_slot"], journal["previous_slot"]) == ("b", "a")
    # The same command again (the fleet re-sends pending ones) changes nothing and says the same.
    again = asyncio.run(updater.roll_back("surface-defect", 1, "fleet: bad batch", "req-1"))
    assert again.state is UpdateState.ROLLED_BACK and serving_v1.get("surface-defect").manifest.version == 1


def test_a_rollback_is_refused_when_the_other_slot_is_empty(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    fleet = MemoryFleet(b"")
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    status = asyncio.run(updater.roll_back("surface-defect", 1, "", "req-2"))
    assert status.state is UpdateState.FAILED and "slot (b) of surface-defect is empty" in status.reason
    assert not (data_dir / "update-journal.json").exists(), "a refused rollback is not journaled"
    assert_still_serving_v1(serving_v1, data_dir)


def test_a_rollback_to_a_version_the_other_slot_lacks_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    updater = make_updater(data_dir, serving_v1, fleet := MemoryFleet(archives[2].read_bytes()), fleet_tuf)
    commit_v2(updater, archives)
    status = asyncio.run(updater.roll_back("surface-defect", 3, "", "req-3"))
    assert status.state is UpdateState.FAILED and "holds surface-defect v1, not v3" in status.reason
    assert fleet.statuses[-1] == status
    assert serving_v1.get("surface-defect").manifest.version == 2
    assert updater.state is UpdateState.COMMITTED, "the journal keeps the committed update"


def test_a_rollback_to_a_damaged_slot_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    updater = make_updater(data_dir, serving_v1, MemoryFleet(archives[2].read_bytes()), fleet_tuf)
    commit_v2(updater, archives)
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    with (slots.slot_dir("a") / "model.onnx").open("r+b") as f:
        f.write(b"\0" * 16)  # bit rot on the card
    status = asyncio.run(updater.roll_back("surface-defect", 1, "", "req-4"))
    assert status.state is UpdateState.FAILED and "fails verification" in status.reason
    assert serving_v1.get("surface-defect").manifest.version == 2 and slots.active_slot() == "b"


def test_a_rollback_during_probation_ends_the_probation(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    fleet = MemoryFleet(archives[2].read_bytes())
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    updater.probation_s = 60  # ends only by the command

    async def scenario() -> UpdateStatus:
        update = asyncio.create_task(updater.handle_offer(offer_for(archives[2].read_bytes())))
        await until(lambda: updater.state is UpdateState.PROBATION)
        started = time.monotonic()
        status = await updater.roll_back("surface-defect", 1, "local: scratches missed", "req-5")
        assert time.monotonic() - started < 5
        await update
        return status

    status = asyncio.run(scenario())
    assert status.update_id == "req-5" and status.state is UpdateState.ROLLED_BACK
    own = [s for s in fleet.statuses if s.update_id == "u1"]
    assert own[-1].state is UpdateState.ROLLED_BACK and own[-1].reason == "local: scratches missed"
    assert_still_serving_v1(serving_v1, data_dir)


def test_a_rollback_during_an_update_before_its_switch_is_refused(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    line = LineState()
    line.set(True, "plc")  # holds the update in `testing`, before its switch
    fleet = MemoryFleet(archives[2].read_bytes())
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    updater.line = line

    async def scenario() -> UpdateStatus:
        update = asyncio.create_task(updater.handle_offer(offer_for(archives[2].read_bytes())))
        await until(lambda: updater.record is not None and updater.record.waiting_for is not None)
        status = await updater.roll_back("surface-defect", 1, "", "req-6")
        line.set(False, "plc")
        await update
        return status

    status = asyncio.run(scenario())
    assert status.state is UpdateState.FAILED and "update u1 (testing) is in progress" in status.reason
    assert fleet.states[-1] == "committed"


# -- disk full ------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 40 MiB filesystem (tmpfs) that can be filled up without touching the machine's disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("filling a disk needs a small filesystem: mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the filesystem refuses with ENOSPC."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


class FillsTheDiskWhenApplying(MemoryFleet):
    """The fleet side of the test; the disk fills (another writer on the device) once `applying` begins."""

    def __init__(self, payload: bytes, disk: Path) -> None:
        super().__init__(payload)
        self.disk = disk
        self.filled = False

    async def publish_update_status(self, status: UpdateStatus) -> None:
        await super().publish_update_status(status)
        if status.state is UpdateState.APPLYING and not self.filled:
            self.filled = True
            fill(self.disk)


def test_a_full_disk_while_applying_fails_the_update_and_leaves_nothing_half_written(
    engine: Engine, small_disk: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    data_dir = small_disk / "data"
    install_initial(data_dir / "models", archives[1])
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    engine.serve(engine.prepare(slots.active_dir(), slots.active_manifest()))
    payload = archives[2].read_bytes()
    fleet = FillsTheDiskWhenApplying(payload, small_disk)
    updater = make_updater(data_dir, engine, fleet, fleet_tuf)
    run_offer(updater, offer_for(payload))
    assert fleet.states[-2:] == ["applying", "failed"], fleet.statuses[-1]
    assert "disk full while applying" in fleet.statuses[-1].reason
    assert_still_serving_v1(engine, data_dir)
    assert slots.active_manifest().version == 1
    assert list(slots.slot_dir("b").iterdir()) == [], "the inactive slot is cleared"
    assert list((data_dir / "downloads").iterdir()) == [], "the download is removed"
    assert json.loads((data_dir / "update-journal.json").read_text())["state"] == "failed"
    # Once space is freed the fleet's next offer goes through.
    (small_disk / "filler").unlink()
    run_offer(updater, offer_for(payload, update_id="u2"))
    assert fleet.states[-1] == "committed" and engine.get("surface-defect").manifest.version == 2


# -- crash-looping and broken new models ----------------------------------------------------------------
def test_a_model_that_fails_to_load_fails_its_update_before_the_switch(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository, tmp_path: Path
) -> None:
    garbage = repackage(ZOO / "v2", tmp_path / "v3", 3, model=b"\x08\x07not a model at all" * 100)
    archive = archive_of(garbage)
    publish(fleet_tuf, archive, 3)
    fleet = MemoryFleet(archive.read_bytes())
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    run_offer(updater, offer_for(archive.read_bytes(), version=3))
    assert fleet.states[-2:] == ["testing", "failed"], fleet.statuses[-1]
    assert "no backend can run surface-defect" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)
    assert list(ModelSlots(data_dir / "models" / "surface-defect").slot_dir("b").iterdir()) == []
    assert json.loads((data_dir / "update-journal.json").read_text())["loading"] is False


def journal_died_loading(data_dir: Path, archives: dict[int, Path], failed_before: int) -> ModelSlots:
    """The journal after the agent died loading v2 in probation, `failed_before` + 1 times in a row."""
    slots = switched_to_v2(data_dir, archives)
    record = UpdateRecord(
        update=offer_for(archives[2].read_bytes()).update,
        state=UpdateState.PROBATION,
        target_slot="b",
        previous_slot="a",
        loading=True,
        failed_starts=failed_before,
    )
    (data_dir / "update-journal.json").write_text(json.dumps(record.to_json()))
    return slots


def test_a_third_death_while_loading_rolls_back_at_boot(
    engine: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    slots = journal_died_loading(data_dir, archives, failed_before=2)
    fleet = MemoryFleet(b"")
    updater = make_updater(data_dir, engine, fleet, fleet_tuf)
    serving = load_at_boot(updater, slots)
    assert serving.manifest.version == 1 and slots.active_slot() == "a"
    asyncio.run(updater.recover())
    assert fleet.states == ["rolled_back"]
    assert fleet.statuses[0].reason == "v2 failed to start 3 times in a row (the agent died while loading it)"


def test_fewer_deaths_while_loading_are_counted_and_the_model_tried_again(
    engine: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    slots = journal_died_loading(data_dir, archives, failed_before=1)
    updater = make_updater(data_dir, engine, MemoryFleet(b""), fleet_tuf)
    serving = load_at_boot(updater, slots)
    assert serving.manifest.version == 2 and slots.active_slot() == "b"
    journal = json.loads((data_dir / "update-journal.json").read_text())
    assert journal["state"] == "probation"
    assert (journal["loading"], journal["failed_starts"]) == (False, 0), "a proven start resets the count"
    assert any("failed start 2" in h.get("reason", "") for h in journal["history"])


def test_restarts_of_a_model_that_loaded_fine_count_nothing(
    engine: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    slots = switched_to_v2(data_dir, archives)
    journal_as_if(data_dir, offer_for(archives[2].read_bytes()), UpdateState.PROBATION)
    for _ in range(5):  # power cycles during a healthy probation
        updater = make_updater(data_dir, Engine(engine.profile), MemoryFleet(b""), fleet_tuf)
        assert load_at_boot(updater, slots).manifest.version == 2
    journal = json.loads((data_dir / "update-journal.json").read_text())
    assert (journal["state"], journal["failed_starts"]) == ("probation", 0)


def _died_proving(data_dir: Path, archives: dict[int, Path], failed_starts: int) -> None:
    ModelSlots(data_dir / "models" / "surface-defect").unpack_into("b", archives[2])
    record = UpdateRecord(
        update=offer_for(archives[2].read_bytes()).update,
        state=UpdateState.TESTING,
        target_slot="b",
        previous_slot="a",
        loading=True,
        failed_starts=failed_starts,
    )
    (data_dir / "update-journal.json").write_text(json.dumps(record.to_json()))


def test_a_death_while_proving_the_new_model_proves_it_again(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    """A power cut while the new model loads is not the model's fault: the staged slot is verified
    and proven again, and the update goes on."""
    _died_proving(data_dir, archives, failed_starts=0)
    fleet = MemoryFleet(b"")
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert "failed" not in fleet.states, fleet.statuses
    assert fleet.states[-1] == "committed"
    assert serving_v1.get("surface-defect").manifest.version == 2


def test_a_model_that_keeps_killing_the_agent_while_loading_fails_at_the_third_start(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    _died_proving(data_dir, archives, failed_starts=2)
    fleet = MemoryFleet(b"")
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states == ["failed"]
    assert "while loading v2 (3 failed start(s) in a row" in fleet.statuses[0].reason
    assert_still_serving_v1(serving_v1, data_dir)
