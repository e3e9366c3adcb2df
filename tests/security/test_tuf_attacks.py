"""One test per attack TUF defends against, each refused by the device's real TUF client.

Ported from python-tuf's own scenarios (tests/test_updater_top_level_update.py,
test_updater_key_rotations.py, the repository simulator) onto the fleet's real repository:
the attacker owns the wire (`Wire.overrides`) and, where a scenario says so, stolen or fresh
Ed25519 keys. Nothing is mocked on the device side: python-tuf's Updater makes every decision.
"""

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from device.tuf_client import (
    FetchTimedOut,
    MetadataExpired,
    MetadataRejected,
    MetadataSignatureRejected,
    MetadataTooLarge,
    MetadataVersionRejected,
    TargetRejected,
    TufClient,
)
from fleet.tuf_repository import Expiries, KeyPolicy
from tests.security.conftest import TARGET, MakeWorld, World
from tests.security.tuf_harness import (
    METADATA_PREFIX as M,
)
from tests.security.tuf_harness import (
    RepoHttpServer,
    forge,
    repo_signers,
    target_url,
    wait_until,
)

ROOT_2_OF_3 = KeyPolicy(counts={"root": 3}, thresholds={"root": 2})


def custom(version: int) -> dict[str, Any]:
    return {"model": "surface_defect", "version": version, "format": "onnx"}


def causes(error: BaseException | None) -> list[str]:
    """The messages of an error and of everything it was raised from."""
    found = []
    while error is not None:
        found.append(str(error))
        error = error.__cause__ or error.__context__
    return found


def publish_more(world: World, version: int = 3) -> None:
    """The operator publishes another target: targets, snapshot and timestamp all move on."""
    world.repo.add_target(world.archive, f"surface_defect/{version}.tar", custom(version))


def forged_snapshot_and_timestamp(world: World, mutate_snapshot: Any) -> tuple[int, bytes, bytes]:
    """With stolen snapshot and timestamp keys: a new snapshot (changed) and a timestamp naming it."""
    repo = world.repo
    snapshot = forge(repo.metadata_bytes("snapshot"), repo_signers(repo, "snapshot"), mutate_snapshot)
    version = Metadata.from_bytes(snapshot).signed.version

    def name_it(ts: Any) -> None:
        ts.version += 1
        ts.snapshot_meta = MetaFile.from_data(version, snapshot, ["sha256"])

    timestamp = forge(repo.metadata_bytes("timestamp"), repo_signers(repo, "timestamp"), name_it)
    return version, snapshot, timestamp


# -- rollback ---------------------------------------------------------------------------------


def test_rollback_replayed_older_timestamp_refused(world: World) -> None:
    client = world.client()
    client.refresh()
    old = world.repo.metadata_bytes("timestamp")
    world.repo.refresh_timestamp()
    client.refresh()
    trusted = client.trusted_versions()["timestamp"]

    world.wire.overrides[M + "timestamp.json"] = old
    # A fresh client on the same data dir: the protection survives a restart.
    with pytest.raises(MetadataVersionRejected, match="timestamp version"):
        world.client().refresh()
    assert world.client().trusted_versions()["timestamp"] == trusted


def test_rollback_timestamp_naming_older_snapshot_refused(world: World) -> None:
    client = world.client()
    client.refresh()
    old_version, old_snapshot = world.repo.version("snapshot"), world.repo.metadata_bytes("snapshot")
    publish_more(world)
    client.refresh()

    def back(ts: Any) -> None:  # stolen timestamp key: newer timestamp, older (genuine) snapshot
        ts.version += 1
        ts.snapshot_meta = MetaFile.from_data(old_version, old_snapshot, ["sha256"])

    ts = forge(world.repo.metadata_bytes("timestamp"), repo_signers(world.repo, "timestamp"), back)
    world.wire.overrides[M + "timestamp.json"] = ts
    with pytest.raises(MetadataVersionRejected, match="snapshot version"):
        world.client().refresh()


def test_rollback_snapshot_naming_older_targets_refused(world: World) -> None:
    publish_more(world)
    client = world.client()
    client.refresh()
    current = world.repo.version("targets")
    older = world.repo.metadata_bytes("targets", current - 1)

    def back(snapshot: Any) -> None:
        snapshot.version += 1
        snapshot.meta["targets.json"] = MetaFile.from_data(current - 1, older, ["sha256"])

    version, snapshot, ts = forged_snapshot_and_timestamp(world, back)
    world.wire.overrides |= {M + "timestamp.json": ts, M + f"{version}.snapshot.json": snapshot}
    with pytest.raises(MetadataVersionRejected, match=r"targets\.json"):
        world.client().refresh()
    assert world.client().trusted_versions()["targets"] == current


# -- freeze -----------------------------------------------------------------------------------


def test_freeze_expired_timestamp_refused(make_world: MakeWorld) -> None:
    world = make_world(expiries=Expiries(timestamp=timedelta(seconds=3)))
    frozen = world.repo.metadata_bytes("timestamp")
    world.client().refresh()  # fresh: accepted
    world.wire.overrides[M + "timestamp.json"] = frozen  # the attacker keeps the device on it
    world.repo.refresh_timestamp()
    expires = Metadata.from_bytes(frozen).signed.expires
    wait_until(lambda: datetime.now(UTC) > expires, timeout_s=6)
    with pytest.raises(MetadataExpired, match="timestamp"):
        world.client().refresh()


# -- mix-and-match ----------------------------------------------------------------------------


def test_mix_and_match_targets_from_another_state_refused(world: World) -> None:
    world.client().refresh()
    other_state = world.repo.metadata_bytes("targets")  # genuine, signed, but an older state
    publish_more(world)
    wanted = world.repo.version("targets")
    world.wire.overrides[M + f"{wanted}.targets.json"] = other_state
    with pytest.raises(MetadataRejected, match=r"[Ll]ength|hash"):
        world.client().refresh()


def test_mix_and_match_targets_version_not_the_snapshots_refused(world: World) -> None:
    # Stolen snapshot and timestamp keys, no targets key: the snapshot names targets v+1 without a
    # hash and the attacker serves the genuine current targets under that name.
    current = world.repo.version("targets")

    def ahead(snapshot: Any) -> None:
        snapshot.version += 1
        snapshot.meta["targets.json"] = MetaFile(current + 1)

    version, snapshot, ts = forged_snapshot_and_timestamp(world, ahead)
    world.wire.overrides |= {
        M + "timestamp.json": ts,
        M + f"{version}.snapshot.json": snapshot,
        M + f"{current + 1}.targets.json": world.repo.metadata_bytes("targets"),
    }
    with pytest.raises(MetadataVersionRejected, match=f"Expected targets v{current + 1}"):
        world.client().refresh()


# -- arbitrary software -----------------------------------------------------------------------


def test_arbitrary_software_tampered_target_refused(world: World, tmp_path: Path) -> None:
    client = world.client()
    client.refresh()
    genuine = world.archive.read_bytes()
    tampered = bytearray(genuine)
    tampered[len(tampered) // 2] ^= 0x01
    local = tmp_path / "tampered.tar"
    local.write_bytes(bytes(tampered))
    with pytest.raises(TargetRejected, match="not the signed"):
        client.verify_target(TARGET, local)

    world.wire.targets[target_url(TARGET, genuine)] = bytes(tampered)
    dest = tmp_path / "dl" / "2.tar"
    with pytest.raises(TargetRejected):
        client.download_target(TARGET, dest)
    assert not dest.exists()


def test_arbitrary_software_truncated_target_refused(world: World, tmp_path: Path) -> None:
    client = world.client()
    local = tmp_path / "short.tar"
    local.write_bytes(world.archive.read_bytes()[:-1])
    with pytest.raises(TargetRejected, match=r"[Ll]ength"):
        client.verify_target(TARGET, local)


def test_arbitrary_software_targets_signed_without_targets_key_refused(world: World) -> None:
    # The online snapshot and timestamp keys are stolen; the targets key is not. The attacker lists
    # their own package, signs targets with a key of their own and chains snapshot and timestamp.
    evil = CryptoSigner.generate_ed25519()
    current = world.repo.version("targets")

    def add_malware(targets: Any) -> None:
        targets.version += 1
        targets.targets["surface_defect/9.tar"] = TargetFile.from_data("surface_defect/9.tar", b"malware")

    forged_targets = forge(world.repo.metadata_bytes("targets"), [evil], add_malware)

    def name_it(snapshot: Any) -> None:
        snapshot.version += 1
        snapshot.meta["targets.json"] = MetaFile.from_data(current + 1, forged_targets, ["sha256"])

    version, snapshot, ts = forged_snapshot_and_timestamp(world, name_it)
    world.wire.overrides |= {
        M + "timestamp.json": ts,
        M + f"{version}.snapshot.json": snapshot,
        M + f"{current + 1}.targets.json": forged_targets,
    }
    client = world.client()
    with pytest.raises(MetadataSignatureRejected, match="targets"):
        client.refresh()
    with pytest.raises(MetadataSignatureRejected):
        client.target_info("surface_defect/9.tar")


def test_arbitrary_software_timestamp_signed_by_unknown_key_refused(world: World) -> None:
    evil = CryptoSigner.generate_ed25519()
    world.wire.overrides[M + "timestamp.json"] = forge(
        world.repo.metadata_bytes("timestamp"), [evil], lambda ts: setattr(ts, "version", ts.version + 1)
    )
    with pytest.raises(MetadataSignatureRejected, match="timestamp"):
        world.client().refresh()


# -- endless data -----------------------------------------------------------------------------


def test_endless_data_timestamp_over_max_length_refused(world: World) -> None:
    client = world.client()
    limit = client.config.timestamp_max_length
    # Still valid JSON with the genuine signature: only its size gives it away.
    world.wire.overrides[M + "timestamp.json"] = world.repo.metadata_bytes("timestamp") + b" " * limit
    with pytest.raises(MetadataTooLarge):
        client.refresh()
    assert (M + "timestamp.json", limit) in world.wire.requests


def test_endless_data_snapshot_longer_than_timestamp_says_refused(world: World) -> None:
    version = world.repo.version("snapshot")
    genuine = world.repo.metadata_bytes("snapshot")
    world.wire.overrides[M + f"{version}.snapshot.json"] = genuine + b" " * 100_000
    with pytest.raises(MetadataTooLarge):
        world.client().refresh()
    assert (M + f"{version}.snapshot.json", len(genuine)) in world.wire.requests


def test_endless_data_target_longer_than_declared_refused(world: World, tmp_path: Path) -> None:
    client = world.client()
    genuine = world.archive.read_bytes()
    url = target_url(TARGET, genuine)
    world.wire.targets[url] = genuine + b"\0" * 65536
    with pytest.raises(TargetRejected, match="longer"):
        client.download_target(TARGET, tmp_path / "2.tar")
    assert (url, len(genuine)) in world.wire.requests  # the transport was told the signed length


# -- key thresholds ---------------------------------------------------------------------------


def _bump(signed: Any) -> None:
    signed.version += 1


def test_threshold_root_with_fewer_signatures_refused(make_world: MakeWorld) -> None:
    world = make_world(ROOT_2_OF_3)
    client = world.client()
    client.refresh()
    root, stolen = world.repo.metadata_bytes("root"), repo_signers(world.repo, "root")
    evil = CryptoSigner.generate_ed25519()

    def take_timestamp_role(r: Any) -> None:
        r.version += 1
        for keyid in list(r.roles["timestamp"].keyids):
            r.revoke_key(keyid, "timestamp")
        r.add_key(evil.public_key, "timestamp")

    world.wire.overrides[M + "2.root.json"] = forge(root, stolen[:1], take_timestamp_role)
    with pytest.raises(MetadataSignatureRejected, match="root was signed by 1/2"):
        client.refresh()
    assert client.trusted_versions()["root"] == 1

    # Control: two of the three keys do meet the threshold.
    world.wire.overrides[M + "2.root.json"] = forge(root, stolen[:2], _bump)
    client.refresh()
    assert client.trusted_versions()["root"] == 2


def test_threshold_timestamp_with_fewer_signatures_refused(make_world: MakeWorld) -> None:
    world = make_world(KeyPolicy(counts={"timestamp": 2}, thresholds={"timestamp": 2}))
    world.client().refresh()
    stolen = repo_signers(world.repo, "timestamp")
    world.wire.overrides[M + "timestamp.json"] = forge(
        world.repo.metadata_bytes("timestamp"), stolen[:1], _bump
    )
    with pytest.raises(MetadataSignatureRejected, match="timestamp was signed by 1/2"):
        world.client().refresh()


# -- duplicate keys ---------------------------------------------------------------------------


def test_duplicate_signatures_by_one_key_counted_once(make_world: MakeWorld) -> None:
    world = make_world(ROOT_2_OF_3)
    one = repo_signers(world.repo, "root")[:1]
    doc = json.loads(forge(world.repo.metadata_bytes("root"), one, _bump))
    doc["signatures"] = doc["signatures"] * 2  # the same key's signature twice, for threshold 2
    world.wire.overrides[M + "2.root.json"] = json.dumps(doc).encode()
    client = world.client()
    with pytest.raises(MetadataRejected) as refused:
        client.refresh()
    assert "Multiple signatures found for keyid" in " ".join(causes(refused.value))
    assert client.trusted_versions()["root"] == 1


def test_one_key_under_two_keyids_counted_once(make_world: MakeWorld) -> None:
    # A root (validly signed by 2 of 3 root keys) lists one timestamp key under two key ids with
    # threshold 2: one private key would then meet a threshold meant for two.
    world = make_world(ROOT_2_OF_3)
    evil = CryptoSigner.generate_ed25519()
    alias = SSlibKey("a" * 64, evil.public_key.keytype, evil.public_key.scheme, dict(evil.public_key.keyval))

    def alias_key(r: Any) -> None:
        r.version += 1
        for keyid in list(r.roles["timestamp"].keyids):
            r.revoke_key(keyid, "timestamp")
        r.add_key(evil.public_key, "timestamp")
        r.add_key(alias, "timestamp")
        r.roles["timestamp"].threshold = 2

    root_signers = repo_signers(world.repo, "root")[:2]
    world.wire.overrides[M + "2.root.json"] = forge(
        world.repo.metadata_bytes("root"), root_signers, alias_key
    )
    world.wire.overrides[M + "timestamp.json"] = forge(
        world.repo.metadata_bytes("timestamp"),
        [evil, CryptoSigner(evil._private_key, alias)],
        _bump,
    )
    client = world.client()
    with pytest.raises(MetadataSignatureRejected, match="several key ids"):
        client.refresh()
    with pytest.raises(MetadataSignatureRejected):
        client.target_info(TARGET)


# -- key rotation -----------------------------------------------------------------------------


def test_rotation_root_signed_only_by_new_keys_refused(world: World) -> None:
    new = CryptoSigner.generate_ed25519()

    def replace_root_key(r: Any) -> None:
        r.version += 1
        for keyid in list(r.roles["root"].keyids):
            r.revoke_key(keyid, "root")
        r.add_key(new.public_key, "root")

    world.wire.overrides[M + "2.root.json"] = forge(
        world.repo.metadata_bytes("root"), [new], replace_root_key
    )
    client = world.client()
    with pytest.raises(MetadataSignatureRejected, match="root was signed by 0/1"):
        client.refresh()
    assert client.trusted_versions()["root"] == 1


def test_rotation_root_signed_by_old_and_new_accepted(make_world: MakeWorld) -> None:
    world = make_world(ROOT_2_OF_3)
    client = world.client()
    client.refresh()
    old_keys = set(Metadata.from_bytes(world.repo.metadata_bytes("root")).signed.roles["root"].keyids)

    assert world.repo.rotate_key("root") == 2  # all three root keys replaced
    client.refresh()
    assert client.trusted_versions()["root"] == 2
    new_keys = set(Metadata.from_bytes(world.repo.metadata_bytes("root")).signed.roles["root"].keyids)
    assert new_keys.isdisjoint(old_keys) and len(new_keys) == 3

    # The chain goes on with the new root keys alone, and a device enrolled at v1 follows it.
    world.repo.rotate_key("targets")
    client.refresh()
    assert client.trusted_versions()["root"] == 3
    assert client.target_info(TARGET) is not None


def test_rotation_old_timestamp_key_refused_after_rotation(world: World) -> None:
    old = repo_signers(world.repo, "timestamp")
    client = world.client()
    client.refresh()
    world.repo.rotate_key("timestamp")
    client.refresh()
    world.wire.overrides[M + "timestamp.json"] = forge(
        world.repo.metadata_bytes("timestamp"), old, lambda ts: setattr(ts, "version", ts.version + 10)
    )
    with pytest.raises(MetadataSignatureRejected, match="timestamp was signed by 0/1"):
        world.client().refresh()


@dataclass
class MdVersion:
    keys: list[int]
    threshold: int
    sigs: list[int]
    refused: bool = False


# python-tuf's root_rotation_cases (tests/test_updater_key_rotations.py), played after the fleet's
# own root v1: the first listed version is also signed by the fleet's root key (it rotates away
# from it), the rest exactly as in python-tuf.
ROOT_ROTATION_CASES: dict[str, list[MdVersion]] = {
    "1-of-1 key rotation": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 1]),
        MdVersion(keys=[2], threshold=1, sigs=[2]),
    ],
    "1-of-1 key rotation, unused signatures": [
        MdVersion(keys=[1], threshold=1, sigs=[3, 1, 4]),
        MdVersion(keys=[2], threshold=1, sigs=[3, 2, 1, 4]),
        MdVersion(keys=[2], threshold=1, sigs=[3, 2, 4]),
    ],
    "1-of-1 key rotation fail: not signed with old key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 3, 4], refused=True),
    ],
    "1-of-1 key rotation fail: not signed with new key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[1, 3, 4], refused=True),
    ],
    "3-of-5, one key rotated": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 1]),
    ],
    "3-of-5, one key rotate fails: not signed with 3 new keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4], refused=True),
    ],
    "3-of-5, one key rotate fails: not signed with 3 old keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5], refused=True),
    ],
    "3-of-5, all keys rotated, with intermediate step": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[0, 2, 4, 5, 6, 7]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[5, 6, 7]),
    ],
    "1-of-3 threshold bump to 2-of-3 fails: new threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[2], refused=True),
    ],
    "2-of-3 threshold decrease to 1-of-3": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
    ],
    "2-of-3 threshold decr. to 1-of-3 fails: old threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1], refused=True),
    ],
}


@pytest.fixture(scope="module")
def key_pool() -> list[CryptoSigner]:
    return [CryptoSigner.generate_ed25519() for _ in range(10)]


@pytest.mark.parametrize("versions", list(ROOT_ROTATION_CASES.values()), ids=list(ROOT_ROTATION_CASES))
def test_root_rotation_sequences(
    world: World, key_pool: list[CryptoSigner], versions: list[MdVersion]
) -> None:
    base = world.repo.metadata_bytes("root")
    fleet_root = repo_signers(world.repo, "root")
    for n, spec in enumerate(versions):

        def shape(r: Any, spec: MdVersion = spec, n: int = n) -> None:
            r.version = 2 + n
            for keyid in list(r.roles["root"].keyids):
                r.revoke_key(keyid, "root")
            for k in spec.keys:
                r.add_key(key_pool[k].public_key, "root")
            r.roles["root"].threshold = spec.threshold

        signers = [key_pool[k] for k in spec.sigs] + (fleet_root if n == 0 else [])
        world.wire.overrides[M + f"{2 + n}.root.json"] = forge(base, signers, shape)

    client = world.client()
    if versions[-1].refused:
        with pytest.raises(MetadataSignatureRejected):
            client.refresh()
        assert client.trusted_versions()["root"] == len(versions)
    else:
        client.refresh()
        assert client.trusted_versions()["root"] == 1 + len(versions)


# -- fast-forward recovery --------------------------------------------------------------------


def test_fast_forward_recovery_after_timestamp_key_rotation(world: World) -> None:
    stolen = repo_signers(world.repo, "timestamp")
    world.client().refresh()
    world.wire.overrides[M + "timestamp.json"] = forge(
        world.repo.metadata_bytes("timestamp"), stolen, lambda ts: setattr(ts, "version", 99999)
    )
    world.client().refresh()  # the attacker's timestamp got in: the device now trusts v99999
    assert world.client().trusted_versions()["timestamp"] == 99999
    world.wire.overrides.clear()

    world.repo.refresh_timestamp()
    with pytest.raises(MetadataVersionRejected):  # the honest timestamp now looks like a rollback
        world.client().refresh()

    world.repo.rotate_key("timestamp")
    client = world.client()
    client.refresh()
    assert client.trusted_versions()["timestamp"] == world.repo.version("timestamp") < 99999
    assert client.target_info(TARGET) is not None


def test_fast_forward_recovery_after_snapshot_key_rotation(world: World) -> None:
    world.client().refresh()
    version, snapshot, ts = forged_snapshot_and_timestamp(world, lambda s: setattr(s, "version", 99999))
    world.wire.overrides |= {M + "timestamp.json": ts, M + f"{version}.snapshot.json": snapshot}
    world.client().refresh()
    assert world.client().trusted_versions()["snapshot"] == 99999
    world.wire.overrides.clear()

    world.repo.rotate_key("snapshot")
    world.repo.rotate_key("timestamp")
    client = world.client()
    client.refresh()
    assert client.trusted_versions()["snapshot"] == world.repo.version("snapshot") < 99999


# -- slow retrieval ---------------------------------------------------------------------------


def test_slow_retrieval_stalled_fetch_abandoned_and_retried(world: World) -> None:
    with RepoHttpServer(world.wire, drip_s=0.3) as server:
        server.stalls[M + "timestamp.json"] = 1  # the first answer drips a byte every 0.3 s
        client = TufClient(world.device_dir, server.fetch(), deadline_s=0.6, attempts=3, retry_delay_s=0.0)
        started = time.monotonic()
        client.refresh()
        elapsed = time.monotonic() - started
    assert server.requests.count(M + "timestamp.json") == 2
    assert client.fetcher.abandoned == 1
    assert elapsed < 0.6 + 1.5
    assert client.target_info(TARGET) is not None


def test_slow_retrieval_that_never_ends_raises(world: World) -> None:
    with RepoHttpServer(world.wire, drip_s=0.3) as server:
        server.stalls[M + "timestamp.json"] = 99
        client = TufClient(world.device_dir, server.fetch(), deadline_s=0.5, attempts=3, retry_delay_s=0.0)
        started = time.monotonic()
        with pytest.raises(FetchTimedOut, match="3 attempts"):
            client.refresh()
        elapsed = time.monotonic() - started
    assert server.requests.count(M + "timestamp.json") == 3
    assert client.fetcher.abandoned == 3
    assert 1.5 <= elapsed < 1.5 + 1.5
