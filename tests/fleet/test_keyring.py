"""The fleet's keyring: telemetry and field-token keys, rotation with grace, revocations, pruning."""

import os
import stat
from pathlib import Path

import pytest

from fleet.errors import InvalidRequest
from fleet.keyring import FIELD_KEY_GRACE_S, FleetKeyring
from fleet.store import FleetDataDir
from protocol.field_token import FieldTrust, issue, verify
from protocol.keys_document import canonical, parse
from protocol.sealed import fleet_key_id, hybrid_supported


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ring(tmp_path: Path, clock: Clock) -> FleetKeyring:
    return FleetKeyring(tmp_path / "keys", telemetry_grace_s=3600, clock=clock)


def test_a_new_keyring_has_one_key_of_each_kind_in_private_files(ring: FleetKeyring) -> None:
    state = ring.state()
    assert list(state.telemetry) == [state.telemetry_current]
    assert list(state.field) == [state.field_current]
    for path in ring.folder.rglob("*"):
        if path.is_file() and path.name != ".lock":
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    document = parse(ring.document_bytes())
    assert document.telemetry_key_id == state.telemetry_current
    assert set(document.field_trust.keys) == {state.field_current}


def test_an_existing_fleet_keeps_its_telemetry_key(tmp_path: Path, clock: Clock) -> None:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    legacy = data.telemetry_key()
    ring = FleetKeyring(data.secrets / "keys", legacy_telemetry_key=data.telemetry_key_path, clock=clock)
    assert ring.current_telemetry_key()[0] == fleet_key_id(legacy.public_key())


def test_rotating_telemetry_keeps_opening_the_old_key_for_its_grace(ring: FleetKeyring, clock: Clock) -> None:
    old = ring.state().telemetry_current
    new = ring.rotate_telemetry()
    assert new != old and ring.current_telemetry_key()[0] == new
    assert set(ring.telemetry_keys()) == {old, new}
    assert parse(ring.document_bytes()).telemetry_key_id == new, "devices are told only the current key"
    clock.now += 3599
    assert ring.prune() == []
    clock.now += 2
    assert ring.prune() == [f"telemetry:{old}"]
    assert set(ring.telemetry_keys()) == {new}
    assert not (ring.folder / "telemetry" / f"{old}.key").exists(), "a retired private key is destroyed"


@pytest.mark.skipif(not hybrid_supported(), reason="this OpenSSL build has no ML-KEM")
def test_rotating_to_the_post_quantum_hybrid(ring: FleetKeyring) -> None:
    kid = ring.rotate_telemetry("mlkem768-x25519")
    document = parse(ring.document_bytes())
    assert document.telemetry_kem == "mlkem768-x25519" and document.telemetry_key_id == kid
    assert kid.startswith("pq-")
    # Reloaded from its file in another process's keyring.
    again = FleetKeyring(ring.folder)
    assert again.current_telemetry_key()[0] == kid


def test_unknown_kem_is_refused(ring: FleetKeyring) -> None:
    with pytest.raises(InvalidRequest, match="unknown telemetry KEM"):
        ring.rotate_telemetry("rsa")


def test_field_key_rotation_keeps_old_tokens_until_they_expire(ring: FleetKeyring, clock: Clock) -> None:
    old_kid, old_key = ring.field_signing_key()
    token, _ = issue(old_key, old_kid, "alice", "viewer", ["cam-1"], 8 * 3600, now=clock.now)
    new_kid = ring.rotate_field_signing()
    trust = parse(ring.document_bytes()).field_trust
    assert set(trust.keys) == {old_kid, new_kid}
    verify(token, trust, "cam-1", now=clock.now + 60)
    clock.now += FIELD_KEY_GRACE_S + 1
    assert ring.prune() == [f"field:{old_kid}"]
    assert set(parse(ring.document_bytes()).field_trust.keys) == {new_kid}


def test_dropping_a_leaked_field_key_distrusts_it_at_once(ring: FleetKeyring) -> None:
    old_kid = ring.state().field_current
    new_kid = ring.rotate_field_signing(drop_old=True)
    assert set(parse(ring.document_bytes()).field_trust.keys) == {new_kid}
    assert not (ring.folder / "field" / f"{old_kid}.pem").exists()


def test_revocations_are_listed_until_the_token_expires(ring: FleetKeyring, clock: Clock) -> None:
    serial = ring.state().serial
    assert ring.revoke("a" * 32, int(clock.now) + 600)
    assert not ring.revoke("a" * 32, int(clock.now) + 600), "listed once"
    assert not ring.revoke("b" * 32, int(clock.now) - 1), "an expired token needs no listing"
    document = parse(ring.document_bytes())
    assert document.serial == serial + 1
    assert document.field_trust.revoked == frozenset({"a" * 32})
    clock.now += 601
    assert ring.prune() == ["revoked:1"]
    assert parse(ring.document_bytes()).field_trust == FieldTrust(
        keys=parse(ring.document_bytes()).field_trust.keys, revoked=frozenset()
    )


def test_a_second_keyring_on_the_same_folder_sees_changes(ring: FleetKeyring) -> None:
    other = FleetKeyring(ring.folder)
    kid = ring.rotate_telemetry()
    assert other.current_telemetry_key()[0] == kid
    assert other.document_bytes() == ring.document_bytes() == canonical(ring.document())


def test_a_damaged_keyring_says_what_to_do(ring: FleetKeyring) -> None:
    ring.state_path.write_text("{")
    with pytest.raises(InvalidRequest, match="not a valid keyring"):
        FleetKeyring(ring.folder).state()
