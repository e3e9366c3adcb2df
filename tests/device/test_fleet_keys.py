"""The device adopts the fleet's keys document only as a TUF-signed target, and keeps it offline."""

from pathlib import Path
from typing import Any

import pytest

from device.errors import ConfigError
from device.fleet_keys import FleetKeys
from device.tuf_client import MetadataRejected, TufClient, bootstrap
from fleet.keyring import FleetKeyring
from fleet.tuf_repository import TufRepository
from protocol.keys_document import KEYS_FORMAT, KeysDocumentError, canonical
from protocol.sealed import fleet_key_id
from protocol.targets import KEYS_TARGET
from tests.security.tuf_harness import METADATA_PREFIX, Wire, forge, repo_signers

Fleet = tuple[TufRepository, FleetKeyring]
Device = tuple[FleetKeys, TufClient, Wire]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    repo = TufRepository(tmp_path / "fleet" / "tuf", tmp_path / "fleet" / "keys")
    repo.init()
    return repo, FleetKeyring(tmp_path / "fleet" / "keyring")


def publish(repo: TufRepository, ring: FleetKeyring) -> None:
    repo.publish_document(KEYS_TARGET, ring.document_bytes(), {"format": KEYS_FORMAT})


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet) -> Device:
    repo, _ = fleet
    folder = tmp_path / "device"
    bootstrap(folder, repo.trusted_root())
    wire = Wire(repo)
    return FleetKeys(folder / "fleet-keys.json"), TufClient(folder, wire), wire


def test_before_any_document_field_tokens_are_refused_and_enrollment_key_is_used(tmp_path: Path) -> None:
    keys = FleetKeys(tmp_path / "fleet-keys.json")
    assert keys.field_trust() is None
    with pytest.raises(ConfigError, match="enroll"):
        keys.telemetry_key()


def test_refresh_adopts_the_signed_document_and_follows_rotations(fleet: Fleet, device: Device) -> None:
    repo, ring = fleet
    keys, tuf, _ = device
    assert not keys.refresh(tuf), "a fleet that publishes no document changes nothing"
    publish(repo, ring)
    changes: list[int] = []
    keys.on_change(lambda d: changes.append(d.serial))
    assert keys.refresh(tuf)
    assert keys.telemetry_key()[0] == ring.current_telemetry_key()[0]
    assert not keys.refresh(tuf), "the same serial again is no change"
    new = ring.rotate_telemetry()
    repo.rotate_key("targets")  # signing keys rotate too: the device walks to the new root
    publish(repo, ring)
    assert keys.refresh(tuf)
    assert keys.telemetry_key()[0] == new and changes == [1, 2]
    # Kept across a restart, for a device that comes back up offline.
    again = FleetKeys(keys.path)
    assert again.serial() == 2 and fleet_key_id(again.telemetry_key()[1]) == new


def test_a_document_not_signed_by_the_fleet_is_refused(fleet: Fleet, device: Device) -> None:
    repo, ring = fleet
    keys, tuf, wire = device
    publish(repo, ring)
    attacker = FleetKeyring(ring.folder.parent / "attacker")
    forged_doc = attacker.document_bytes()

    def swap(signed: Any) -> None:
        target = signed.targets[KEYS_TARGET]
        target.unrecognized_fields["custom"]["document"] = forged_doc.decode()

    version = repo.version("targets")
    url = f"{METADATA_PREFIX}{version}.targets.json"
    # Another document, signed with a key that is not the targets key: TUF refuses the metadata
    # (its hash is not the one the snapshot names, nor its signature the targets role's).
    wire.overrides[url] = forge(repo.metadata_bytes("targets"), repo_signers(repo, "snapshot"), swap)
    with pytest.raises(MetadataRejected):
        keys.refresh(tuf)
    assert keys.document is None


def test_an_older_serial_is_refused(fleet: Fleet, device: Device) -> None:
    repo, ring = fleet
    keys, tuf, _ = device
    ring.rotate_telemetry()
    publish(repo, ring)
    keys.refresh(tuf)
    stale = canonical({**ring.document(), "serial": 1})
    with pytest.raises(KeysDocumentError, match="older"):
        keys.apply(stale)
    assert keys.serial() == 2
