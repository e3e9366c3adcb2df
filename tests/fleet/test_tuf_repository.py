"""The fleet's TUF repository on real files and real Ed25519 keys, checked with python-tuf's own API."""

import hashlib
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from fleet.errors import InvalidRequest, NotFound
from fleet.store import FleetDataDir
from fleet.tuf_repository import (
    Expiries,
    KeyPolicy,
    MetadataNotFound,
    TufRepository,
    TufRepositoryError,
    archive_target_name,
    delta_target_name,
)

CUSTOM = {"model": "surface_defect", "version": 2, "format": "onnx"}


@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    repo = TufRepository(tmp_path / "tuf", tmp_path / "secrets" / "tuf")
    repo.init()
    return repo


def load(repo: TufRepository, role: str, version: int | None = None) -> Metadata[Any]:
    return Metadata.from_bytes(repo.metadata_bytes(role, version))


def root_of(repo: TufRepository, version: int | None = None) -> Root:
    signed = load(repo, "root", version).signed
    assert isinstance(signed, Root)
    return signed


def verify_chain(repo: TufRepository) -> None:
    """What a device does: each role signed by its threshold of the keys root names; meta hashes match."""
    root_md = load(repo, "root")
    for role in ("targets", "snapshot", "timestamp"):
        root_md.signed.verify_delegate(role, load(repo, role).signed_bytes, load(repo, role).signatures)
    timestamp = load(repo, "timestamp").signed
    assert isinstance(timestamp, Timestamp)
    timestamp.snapshot_meta.verify_length_and_hashes(
        repo.metadata_bytes("snapshot", timestamp.snapshot_meta.version)
    )
    snapshot = load(repo, "snapshot").signed
    assert isinstance(snapshot, Snapshot)
    meta = snapshot.meta["targets.json"]
    meta.verify_length_and_hashes(repo.metadata_bytes("targets", meta.version))


def test_init_publishes_four_signed_roles_with_their_expiries(repo: TufRepository) -> None:
    verify_chain(repo)
    root = root_of(repo)
    assert root.consistent_snapshot is True
    assert {role: repo.version(role) for role in ("root", "targets", "snapshot", "timestamp")} == {
        "root": 1,
        "targets": 1,
        "snapshot": 1,
        "timestamp": 1,
    }
    now = datetime.now(UTC)
    for role, days in (("root", 365), ("targets", 90), ("snapshot", 7), ("timestamp", 1)):
        expires = load(repo, role).signed.expires
        assert abs(expires - (now + timedelta(days=days))) < timedelta(minutes=1), role
    # One distinct key per role by default, all Ed25519.
    keyids = [k for role in root.roles.values() for k in role.keyids]
    assert len(keyids) == len(set(keyids)) == 4
    assert {root.keys[k].keytype for k in keyids} == {"ed25519"}
    files = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert files == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]


def test_private_keys_are_owner_only(repo: TufRepository) -> None:
    assert stat.S_IMODE(repo.keys_dir.stat().st_mode) == 0o700
    keys = list(repo.keys_dir.rglob("*.pem"))
    assert len(keys) == 4
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.stem in root_of(repo).keys
    published = b"".join(p.read_bytes() for p in repo.metadata_dir.iterdir())
    assert b"PRIVATE KEY" not in published


def test_init_twice_is_refused(repo: TufRepository) -> None:
    with pytest.raises(TufRepositoryError, match="already holds"):
        repo.init()


def test_in_data_dir_keeps_files_and_keys_apart(tmp_path: Path) -> None:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    repo = TufRepository.in_data_dir(data)
    repo.init()
    assert repo.metadata_dir == data.root / "tuf" / "metadata"
    assert repo.keys_dir == data.secrets / "tuf"
    assert len(list(data.secrets.joinpath("tuf").rglob("*.pem"))) == 4


def test_root_threshold_two_of_three(tmp_path: Path) -> None:
    repo = TufRepository(tmp_path / "tuf", tmp_path / "keys")
    repo.init(KeyPolicy(counts={"root": 3}, thresholds={"root": 2}))
    root = root_of(repo)
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    md = load(repo, "root")
    assert len(md.signatures) == 3
    md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    one = {k: v for k, v in list(md.signatures.items())[:1]}
    with pytest.raises(UnsignedMetadataError, match="1/2"):
        md.signed.verify_delegate("root", md.signed_bytes, one)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (KeyPolicy(thresholds={"root": 2}, counts={"root": 1}), "threshold 2 needs 1..1"),
        (KeyPolicy(thresholds={"timestamp": 0}), "threshold 0"),
        (KeyPolicy(counts={"mirror": 1}), "unknown TUF role"),
    ],
)
def test_bad_key_policies_are_refused(tmp_path: Path, policy: KeyPolicy, message: str) -> None:
    repo = TufRepository(tmp_path / "tuf", tmp_path / "keys")
    with pytest.raises(InvalidRequest, match=message):
        repo.init(policy)
    assert not repo.initialized


def test_expiries_must_be_positive() -> None:
    with pytest.raises(InvalidRequest, match="timestamp expiry must be positive"):
        Expiries(timestamp=timedelta(0))


def test_add_target_lists_length_hash_and_custom_fields(
    repo: TufRepository, archives: dict[int, Path]
) -> None:
    name = archive_target_name("surface_defect", 2)
    target = repo.add_target(archives[2], name, CUSTOM)
    data = archives[2].read_bytes()
    assert (target.length, target.hashes) == (len(data), {"sha256": hashlib.sha256(data).hexdigest()})
    targets = load(repo, "targets").signed
    assert isinstance(targets, Targets)
    assert targets.targets[name].custom == CUSTOM
    assert [repo.version(r) for r in ("targets", "snapshot", "timestamp")] == [2, 2, 2]
    verify_chain(repo)


def test_deltas_are_their_own_targets(repo: TufRepository, archives: dict[int, Path], tmp_path: Path) -> None:
    delta = tmp_path / "1-2.efd"
    delta.write_bytes(b"EFD1 pretend delta body")
    repo.add_target(archives[2], archive_target_name("surface_defect", 2), CUSTOM, deltas={1: delta})
    targets = load(repo, "targets").signed
    listed = targets.targets[delta_target_name("surface_defect", 1, 2)]
    assert listed.path == "surface_defect/deltas/1-2.pdelta"
    assert listed.length == delta.stat().st_size
    assert listed.hashes["sha256"] == hashlib.sha256(delta.read_bytes()).hexdigest()
    assert listed.custom["base_version"] == 1 and listed.custom["version"] == 2
    assert listed.custom["format"] == "package-delta" and listed.custom["full"] == "surface_defect/2.tar"
    assert repo.version("targets") == 2  # archive and delta in one publication


@pytest.mark.parametrize(
    ("name", "custom", "deltas", "message"),
    [
        ("../etc/passwd", CUSTOM, None, "target name"),
        ("surface_defect", CUSTOM, None, "target name"),
        ("surface_defect/2.tar", {**CUSTOM, "version": "2"}, None, "'version' must be a int"),
        ("surface_defect/2.tar", {"model": "surface_defect", "version": 2}, None, "'format'"),
        ("surface_defect/2.tar", {**CUSTOM, "version": 0}, None, "at least 1"),
        ("surface_defect/2.tar", CUSTOM, {2: Path("x")}, "version older than 2"),
    ],
)
def test_bad_targets_are_refused_and_publish_nothing(
    repo: TufRepository,
    archives: dict[int, Path],
    name: str,
    custom: dict[str, Any],
    deltas: dict[int, Path] | None,
    message: str,
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        repo.add_target(archives[2], name, custom, deltas=deltas)
    assert repo.version("targets") == 1


def test_missing_archive_is_refused(repo: TufRepository, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="is not a file"):
        repo.add_target(tmp_path / "absent.tar", "surface_defect/2.tar", CUSTOM)


def test_remove_target(repo: TufRepository, archives: dict[int, Path]) -> None:
    repo.add_target(archives[2], "surface_defect/2.tar", CUSTOM)
    repo.remove_target("surface_defect/2.tar")
    assert load(repo, "targets").signed.targets == {}
    assert repo.version("targets") == 3
    with pytest.raises(NotFound, match="not listed"):
        repo.remove_target("surface_defect/2.tar")


def test_refresh_timestamp_bumps_only_the_timestamp(repo: TufRepository) -> None:
    before = load(repo, "timestamp").signed
    assert repo.refresh_timestamp() == 2
    after = load(repo, "timestamp").signed
    assert after.version == 2 and after.expires >= before.expires
    assert after.snapshot_meta == before.snapshot_meta
    assert repo.version("snapshot") == 1
    verify_chain(repo)


def test_refresh_expiring_resigns_what_runs_out(tmp_path: Path) -> None:
    short = Expiries(timestamp=timedelta(hours=1), snapshot=timedelta(hours=5))
    repo = TufRepository(tmp_path / "tuf", tmp_path / "keys", expiries=short)
    repo.init()
    assert repo.refresh_expiring(within=timedelta(minutes=30)) == []
    assert repo.refresh_expiring(within=timedelta(hours=2)) == ["timestamp"]
    assert repo.refresh_expiring(within=timedelta(hours=6)) == ["snapshot", "timestamp"]
    assert repo.refresh_expiring(within=timedelta(days=400)) == ["root", "targets", "snapshot", "timestamp"]
    assert [repo.version(r) for r in ("root", "targets", "snapshot", "timestamp")] == [2, 2, 3, 4]
    verify_chain(repo)


def test_rotate_root_key_signs_new_root_with_old_and_new(repo: TufRepository) -> None:
    old_md = load(repo, "root")
    old_key = old_md.signed.roles["root"].keyids[0]
    assert repo.rotate_key("root") == 2
    new_md = load(repo, "root")
    old_md.verify_delegate("root", new_md)  # a device trusting v1 accepts v2
    new_md.verify_delegate("root", new_md)
    new_key = new_md.signed.roles["root"].keyids[0]
    assert new_key != old_key and set(new_md.signatures) == {old_key, new_key}
    assert not (repo.keys_dir / "root" / f"{old_key}.pem").exists()  # the retired key is destroyed
    assert stat.S_IMODE((repo.keys_dir / "root" / f"{new_key}.pem").stat().st_mode) == 0o600
    assert repo.metadata_bytes("root", 1) == old_md.to_bytes()  # roots are kept for the chain
    verify_chain(repo)


def test_rotate_timestamp_key_resigns_the_timestamp(repo: TufRepository) -> None:
    old = root_of(repo).roles["timestamp"].keyids
    repo.rotate_key("timestamp")
    new = root_of(repo).roles["timestamp"].keyids
    assert set(old).isdisjoint(new)
    assert set(load(repo, "timestamp").signatures) == set(new)
    assert repo.version("timestamp") == 2
    verify_chain(repo)


def test_rotate_one_of_three_root_keys(tmp_path: Path) -> None:
    repo = TufRepository(tmp_path / "tuf", tmp_path / "keys")
    repo.init(KeyPolicy(counts={"root": 3}, thresholds={"root": 2}))
    keys = root_of(repo).roles["root"].keyids
    repo.rotate_key("root", keyids=[keys[0]], threshold=3)
    root = root_of(repo)
    assert keys[0] not in root.roles["root"].keyids and set(keys[1:]) <= set(root.roles["root"].keyids)
    assert root.roles["root"].threshold == 3
    load(repo, "root", 1).verify_delegate("root", load(repo, "root"))


def test_rotation_refusals_publish_nothing(tmp_path: Path) -> None:
    repo = TufRepository(tmp_path / "tuf", tmp_path / "keys")
    repo.init(KeyPolicy(counts={"root": 3}, thresholds={"root": 2}))
    pems_before = sorted(repo.keys_dir.rglob("*.pem"))
    with pytest.raises(InvalidRequest, match=r"threshold 4 needs 1\.\.3"):
        repo.rotate_key("root", threshold=4)
    with pytest.raises(InvalidRequest, match="cannot retire"):
        repo.rotate_key("targets", keyids=["f" * 64])
    with pytest.raises(InvalidRequest, match="unknown TUF role"):
        repo.rotate_key("mirror")
    assert sorted(repo.keys_dir.rglob("*.pem")) == pems_before
    # Two of the three root keys lost: the fleet cannot sign a root the devices would accept.
    for pem in pems_before:
        if pem.parent.name == "root" and len(list(pem.parent.glob("*.pem"))) > 1:
            pem.unlink()
    with pytest.raises(TufRepositoryError, match="restore the keys"):
        repo.rotate_key("timestamp")
    assert repo.version("root") == 1


def test_serve_metadata_answers_only_tuf_names(repo: TufRepository) -> None:
    assert repo.serve_metadata("1.root.json") == repo.metadata_bytes("root", 1)
    assert repo.serve_metadata("timestamp.json") == repo.metadata_bytes("timestamp")
    assert repo.serve_metadata("1.snapshot.json") == repo.metadata_bytes("snapshot")
    for name in (
        "2.root.json",
        "root.json",
        "snapshot.json",
        "3.timestamp.json",
        "../keys/x.pem",
        "1.mirror.json",
    ):
        with pytest.raises(MetadataNotFound):
            repo.serve_metadata(name)


def test_versions_never_go_back_across_instances(repo: TufRepository, archives: dict[int, Path]) -> None:
    repo.add_target(archives[2], "surface_defect/2.tar", CUSTOM)
    reopened = TufRepository(repo.folder, repo.keys_dir)
    reopened.add_target(archives[1], "surface_defect/1.tar", {**CUSTOM, "version": 1})
    assert [reopened.version(r) for r in ("targets", "snapshot", "timestamp")] == [3, 3, 3]
    assert set(load(reopened, "targets").signed.targets) == {"surface_defect/1.tar", "surface_defect/2.tar"}


def test_old_snapshots_are_pruned_roots_kept(tmp_path: Path, archives: dict[int, Path]) -> None:
    repo = TufRepository(tmp_path / "tuf", tmp_path / "keys", keep_versions=2)
    repo.init()
    for version in range(1, 5):
        repo.add_target(archives[2], f"surface_defect/{version}.tar", {**CUSTOM, "version": version})
    repo.rotate_key("root")
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == [
        "1.root.json",
        "2.root.json",
        "4.snapshot.json",
        "4.targets.json",
        "5.snapshot.json",
        "5.targets.json",
        "timestamp.json",
    ]
    verify_chain(repo)


def test_two_workers_publishing_at_once_lose_nothing(repo: TufRepository, archives: dict[int, Path]) -> None:
    workers = [TufRepository(repo.folder, repo.keys_dir) for _ in range(2)]
    errors: list[BaseException] = []

    def publish(worker: TufRepository, first: int) -> None:
        try:
            for version in range(first, first + 5):
                worker.add_target(
                    archives[2], f"surface_defect/{version}.tar", {**CUSTOM, "version": version}
                )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(w, 1 + 10 * i)) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(load(repo, "targets").signed.targets) == 10
    assert repo.version("targets") == 11
    verify_chain(repo)


def test_snapshot_meta_names_the_exact_targets_bytes(repo: TufRepository, archives: dict[int, Path]) -> None:
    repo.add_target(archives[2], "surface_defect/2.tar", CUSTOM)
    snapshot = load(repo, "snapshot").signed
    expected = MetaFile.from_data(2, repo.metadata_bytes("targets", 2), ["sha256"])
    assert snapshot.meta["targets.json"] == expected
