"""The fleet's TUF repository: the signed metadata devices check every update against.

TUF's four top-level roles (root, targets, snapshot, timestamp) built and signed with python-tuf's
Metadata API and Ed25519 keys from securesystemslib; thresholds per role; expiries; versions that
only go up; key rotation through a new root signed by the old and the new root keys. The published
files sit in one folder that the fleet serves to devices over its own transport
(`serve_metadata`); the private keys sit apart, one 0600 PEM per key, under the fleet's secrets.

Consistent snapshots are on: snapshot and targets are published as `N.snapshot.json` and
`N.targets.json` and the last few versions are kept. A device reads timestamp.json first and then
asks for exactly the snapshot version it names, so a refresh that races an operator's publication
still finds a coherent set instead of failing as a mix-and-match. Roots are kept forever: a device
that was offline for months walks the chain N+1, N+2, ... from the root it trusts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined,unused-ignore]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined,unused-ignore]
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from fleet.errors import FleetError, InvalidRequest, NotFound
from fleet.store import FleetDataDir
from models.fsutil import fsync_dir, write_private
from protocol.targets import archive_target_name, delta_target_name

# The `type: ignore`s above: python-tuf and securesystemslib re-export these names without __all__,
# which mypy's no_implicit_reexport (on through the project's strict settings) does not follow.

ROLES: tuple[str, ...] = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){1,3}$")
# What a device may ask for: "3.root.json", "7.snapshot.json", "7.targets.json", "timestamp.json".
_SERVED_NAME = re.compile(
    r"^(?:(?P<version>[1-9][0-9]{0,9})\.)?(?P<role>root|targets|snapshot|timestamp)\.json$"
)
_REQUIRED_CUSTOM = {"model": str, "version": int, "format": str}

S = TypeVar("S", Root, Targets, Snapshot, Timestamp)


class TufRepositoryError(FleetError):
    """The repository's files or keys are missing or inconsistent; the message says what to fix."""


class MetadataNotFound(NotFound):
    """A device asked for a metadata file the repository does not hold (the end of a root walk)."""


@dataclass(frozen=True)
class Expiries:
    """How long each role's metadata stays valid after it is signed.

    The timestamp is short because it is what proves freshness to a device (freeze attacks); the
    fleet re-signs it well before it runs out (`refresh_expiring`).
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        span: timedelta = getattr(self, role)
        return span

    def __post_init__(self) -> None:
        for role in ROLES:
            if self.of(role) <= timedelta(0):
                raise InvalidRequest(f"the {role} expiry must be positive, got {self.of(role)}")


@dataclass(frozen=True)
class KeyPolicy:
    """Keys per role and how many of them must sign. Default: one key, threshold 1, per role."""

    counts: Mapping[str, int] = field(default_factory=dict)
    thresholds: Mapping[str, int] = field(default_factory=dict)

    def threshold(self, role: str) -> int:
        return self.thresholds.get(role, 1)

    def count(self, role: str) -> int:
        return self.counts.get(role, self.threshold(role))

    def check(self) -> None:
        for role in (*self.counts, *self.thresholds):
            if role not in ROLES:
                raise InvalidRequest(f"unknown TUF role {role!r}; use one of {', '.join(ROLES)}")
        for role in ROLES:
            if not 1 <= self.threshold(role) <= self.count(role):
                raise InvalidRequest(
                    f"{role}: threshold {self.threshold(role)} needs 1..{self.count(role)} keys; "
                    "raise the key count or lower the threshold"
                )


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _write_atomic(path: Path, data: bytes) -> None:
    """Publish a file whole or not at all: a device must never read half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _check_distinct_keys(root: Root) -> None:
    """One private key listed under two keyids would count twice toward a threshold: refuse that."""
    for role_name, role in root.roles.items():
        seen: dict[str, str] = {}
        for keyid in role.keyids:
            public = str(root.keys[keyid].keyval.get("public"))
            if public in seen:
                raise TufRepositoryError(
                    f"{role_name}: keys {seen[public]} and {keyid} are the same key; "
                    "a threshold counts distinct keys only"
                )
            seen[public] = keyid


class TufRepository:
    """A TUF repository in `folder`, with its private keys in `keys_dir`.

    Every change re-signs and publishes in the order a device reads backwards (targets, then
    snapshot, then timestamp last), under a file lock, so a reader never sees a timestamp that
    points at a file not yet written and two fleet workers never publish the same version.
    """

    def __init__(
        self,
        folder: Path,
        keys_dir: Path,
        *,
        expiries: Expiries | None = None,
        keep_versions: int = 4,
    ) -> None:
        if keep_versions < 2:
            raise InvalidRequest("keep_versions must be at least 2 so a refresh in flight finds its files")
        self.folder = folder
        self.metadata_dir = folder / "metadata"
        self.keys_dir = keys_dir
        self.expiries = expiries or Expiries()
        self.keep_versions = keep_versions
        self._thread_lock = threading.Lock()

    @classmethod
    def in_data_dir(
        cls, data_dir: FleetDataDir, *, expiries: Expiries | None = None, keep_versions: int = 4
    ) -> TufRepository:
        """The fleet's repository: files in `<data>/tuf/`, private keys in `<data>/secrets/tuf/`."""
        return cls(
            data_dir.root / "tuf", data_dir.secrets / "tuf", expiries=expiries, keep_versions=keep_versions
        )

    # -- set-up -------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.metadata_dir.joinpath("timestamp.json").exists()

    def init(self, policy: KeyPolicy | None = None) -> None:
        """Make the keys and publish root v1, empty targets, snapshot and timestamp v1."""
        policy = policy or KeyPolicy()
        policy.check()
        with self._locked():
            if any(self.metadata_dir.iterdir()):
                raise TufRepositoryError(
                    f"{self.metadata_dir} already holds TUF metadata; open it instead "
                    "(or remove a partial one)"
                )
            now = _now()
            root = Root(expires=now + self.expiries.root, consistent_snapshot=True)
            for role in ROLES:
                for _ in range(policy.count(role)):
                    root.add_key(self._new_key(role).public_key, role)
                root.roles[role].threshold = policy.threshold(role)
            _check_distinct_keys(root)
            root_md = Metadata(root)
            self._sign(root_md, self._signers(root, Root.type))
            self._write_versioned(root_md)
            targets_md = Metadata(Targets(expires=now + self.expiries.targets))
            self._publish_from_targets(root, targets_md)

    # -- what operators do --------------------------------------------------------------------

    def add_target(
        self,
        path: Path,
        name: str,
        custom: Mapping[str, Any],
        *,
        deltas: Mapping[int, Path] | None = None,
        delta_custom: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> TargetFile:
        """Publish a model package archive (and its deltas from older versions) in one new targets.

        `custom` must name the `model`, its `version` and `format`; a delta from version F is
        listed as `<model>/deltas/F-<version>.pdelta` with its own length and sha256, and with
        `delta_custom[F]` (e.g. the manifest hashes a device checks) added to its custom fields.
        """
        self._check_target_name(name)
        checked = self._check_custom(custom)
        files = [self._target_file(path, name, checked)]
        for from_version, delta_path in sorted((deltas or {}).items()):
            if not isinstance(from_version, int) or not 1 <= from_version < checked["version"]:
                raise InvalidRequest(
                    f"a delta must start from a version older than {checked['version']}, got {from_version!r}"
                )
            fields = {
                **checked,
                "format": "package-delta",
                "base_version": from_version,
                "base_format": checked["format"],
                "full": name,
                **(delta_custom or {}).get(from_version, {}),
            }
            delta_name = delta_target_name(checked["model"], from_version, checked["version"])
            files.append(self._target_file(delta_path, delta_name, fields))
        with self._locked():
            root = self._load(Root).signed
            targets_md = self._load(Targets)
            for target in files:
                targets_md.signed.targets[target.path] = target
            self._bump(targets_md.signed, self.expiries.targets)
            self._publish_from_targets(root, targets_md)
        return files[0]

    def publish_document(self, name: str, data: bytes, custom: Mapping[str, Any]) -> TargetFile:
        """List a small document (not a model) as target `name`, its bytes carried in its custom
        field `document` as well, so a device has it with the targets metadata it already fetches.
        Publishing the same bytes again changes nothing and signs nothing."""
        self._check_target_name(name)
        target = TargetFile(
            len(data),
            {"sha256": hashlib.sha256(data).hexdigest()},
            name,
            {"custom": {**custom, "document": data.decode()}},
        )
        with self._locked():
            root = self._load(Root).signed
            targets_md = self._load(Targets)
            listed = targets_md.signed.targets.get(name)
            if listed is not None and listed.hashes == target.hashes:
                return listed
            targets_md.signed.targets[name] = target
            self._bump(targets_md.signed, self.expiries.targets)
            self._publish_from_targets(root, targets_md)
        return target

    def remove_target(self, name: str) -> None:
        """Unlist a target (and nothing else): devices stop finding it after their next refresh."""
        with self._locked():
            root = self._load(Root).signed
            targets_md = self._load(Targets)
            if targets_md.signed.targets.pop(name, None) is None:
                raise NotFound(f"target {name!r} is not listed; nothing to remove")
            self._bump(targets_md.signed, self.expiries.targets)
            self._publish_from_targets(root, targets_md)

    def refresh_timestamp(self) -> int:
        """Re-sign the timestamp with a bumped version and a fresh expiry; return its version."""
        with self._locked():
            root = self._load(Root).signed
            snapshot_bytes, snapshot = self._current_bytes(Snapshot)
            return self._publish_timestamp(root, snapshot.signed.version, snapshot_bytes)

    def refresh_expiring(self, within: timedelta = timedelta(hours=12)) -> list[str]:
        """Re-sign every role whose metadata expires within `within`; return the roles re-signed.

        The fleet runs this on a timer well inside the timestamp's lifetime (hourly, say): a
        device refuses metadata that expired, and that is how it notices a frozen repository.
        """
        deadline = _now() + within
        resigned: list[str] = []
        with self._locked():
            root_md = self._load(Root)
            if root_md.signed.expires <= deadline:
                self._bump(root_md.signed, self.expiries.root)
                self._sign(root_md, self._signers(root_md.signed, Root.type))
                self._write_versioned(root_md)
                resigned.append(Root.type)
            root = root_md.signed
            targets_md = self._load(Targets)
            snapshot_md = self._load(Snapshot)
            timestamp_md = self._load(Timestamp)
            if targets_md.signed.expires <= deadline:
                self._bump(targets_md.signed, self.expiries.targets)
                self._publish_from_targets(root, targets_md)
                resigned += [Targets.type, Snapshot.type, Timestamp.type]
            elif snapshot_md.signed.expires <= deadline:
                self._publish_snapshot(root, snapshot_md.signed.version + 1)
                resigned += [Snapshot.type, Timestamp.type]
            elif timestamp_md.signed.expires <= deadline:
                snapshot_bytes, snapshot = self._current_bytes(Snapshot)
                self._publish_timestamp(root, snapshot.signed.version, snapshot_bytes)
                resigned.append(Timestamp.type)
        return resigned

    def rotate_key(
        self, role: str, *, keyids: Sequence[str] | None = None, threshold: int | None = None
    ) -> int:
        """Replace `keyids` of `role` (default: all its keys) with fresh ones; return the new root version.

        The new root is signed by a threshold of the old root's keys AND of its own (TUF 5.3.4), so
        a device that trusts the old root accepts it, and one signed by new keys alone is refused.
        The retired private keys are destroyed once the new root is published. The role's own
        metadata is then re-signed with its new keys, which is also what lets devices recover
        from a fast-forwarded version signed by a compromised key.
        """
        if role not in ROLES:
            raise InvalidRequest(f"unknown TUF role {role!r}; use one of {', '.join(ROLES)}")
        with self._locked():
            old_md = self._load(Root)
            old_root = old_md.signed
            old_root_signers = self._signers(old_root, Root.type)
            current = list(old_root.roles[role].keyids)
            retiring = list(keyids) if keyids is not None else current
            unknown = sorted(set(retiring) - set(current))
            if unknown or not retiring:
                raise InvalidRequest(
                    f"{role} has keys {', '.join(current)}; cannot retire {', '.join(unknown) or 'none'}"
                )
            new_md = Metadata.from_bytes(old_md.to_bytes())
            new_root = new_md.signed
            fresh = [self._new_key(role) for _ in retiring]
            for keyid in retiring:
                new_root.revoke_key(keyid, role)
            for signer in fresh:
                new_root.add_key(signer.public_key, role)
            if threshold is not None:
                new_root.roles[role].threshold = threshold
            wanted, available = new_root.roles[role].threshold, len(new_root.roles[role].keyids)
            if not 1 <= wanted <= available:
                self._discard_keys(role, [s.public_key.keyid for s in fresh])
                raise InvalidRequest(f"{role}: threshold {wanted} needs 1..{available} keys")
            _check_distinct_keys(new_root)
            self._bump(new_root, self.expiries.root)
            signers = {s.public_key.keyid: s for s in old_root_signers}
            signers.update({s.public_key.keyid: s for s in self._signers(new_root, Root.type)})
            self._sign(new_md, list(signers.values()))
            try:
                old_md.verify_delegate(Root.type, new_md)
                new_md.verify_delegate(Root.type, new_md)
            except UnsignedMetadataError as e:
                self._discard_keys(role, [s.public_key.keyid for s in fresh])
                raise TufRepositoryError(
                    f"cannot sign root v{new_root.version} with enough old and new root keys ({e}); "
                    f"restore the missing root keys into {self.keys_dir / Root.type}"
                ) from e
            self._write_versioned(new_md)
            self._discard_keys(role, retiring)
            if role == Targets.type:
                targets_md = self._load(Targets)
                self._bump(targets_md.signed, self.expiries.targets)
                self._publish_from_targets(new_root, targets_md)
            elif role == Snapshot.type:
                self._publish_snapshot(new_root, self._load(Snapshot).signed.version + 1)
            elif role == Timestamp.type:
                snapshot_bytes, snapshot = self._current_bytes(Snapshot)
                self._publish_timestamp(new_root, snapshot.signed.version, snapshot_bytes)
            return new_root.version

    # -- what devices read --------------------------------------------------------------------

    def metadata_bytes(self, role: str, version: int | None = None) -> bytes:
        """The exact published bytes of `role` (its latest version, or `version`)."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown TUF role {role!r}; use one of {', '.join(ROLES)}")
        if role == Timestamp.type:
            if version is not None:
                raise InvalidRequest("timestamp.json is never versioned in its file name")
            path = self.metadata_dir / "timestamp.json"
        else:
            version = version if version is not None else self._latest_version(role)
            path = self.metadata_dir / f"{version}.{role}.json"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise MetadataNotFound(f"{path.name} is not published") from None

    def serve_metadata(self, filename: str) -> bytes:
        """Answer a device's request for one metadata file by the name TUF's client asks for."""
        match = _SERVED_NAME.fullmatch(filename)
        if match is None:
            raise MetadataNotFound(f"{filename!r} is not a TUF metadata file name")
        version = match["version"]
        role = match["role"]
        if role == Timestamp.type and version is not None:
            raise MetadataNotFound(f"{filename!r}: the timestamp is served as timestamp.json only")
        if role != Timestamp.type and version is None:
            raise MetadataNotFound(f"{filename!r}: this repository serves {role} by version (N.{role}.json)")
        return self.metadata_bytes(role, int(version) if version else None)

    def trusted_root(self) -> bytes:
        """The root a device is provisioned with at enrollment (the latest one)."""
        return self.metadata_bytes(Root.type)

    def target(self, name: str) -> TargetFile | None:
        """The listed target `name` as devices see it now, or None."""
        return self._load(Targets).signed.targets.get(name)

    def version(self, role: str) -> int:
        return int(self._load_role(role).signed.version)

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._thread_lock, open(self.folder / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _new_key(self, role: str) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        write_private(self.keys_dir / role / f"{signer.public_key.keyid}.pem", signer.private_bytes)
        return signer

    def _discard_keys(self, role: str, keyids: Sequence[str]) -> None:
        for keyid in keyids:
            with contextlib.suppress(FileNotFoundError):
                (self.keys_dir / role / f"{keyid}.pem").unlink()

    def _signers(self, root: Root, role: str) -> list[CryptoSigner]:
        """The role's private keys that this fleet holds; an error if fewer than its threshold."""
        signers = []
        for keyid in root.roles[role].keyids:
            path = self.keys_dir / role / f"{keyid}.pem"
            if not path.exists():
                continue
            private = load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise TufRepositoryError(f"{path} is not an Ed25519 private key; restore the original")
            public = SSlibKey.from_crypto(private.public_key())
            if public.keyid != keyid:
                raise TufRepositoryError(
                    f"{path} holds key {public.keyid}, not {keyid}; restore the original"
                )
            signers.append(CryptoSigner(private, public))
        if len(signers) < root.roles[role].threshold:
            raise TufRepositoryError(
                f"{role} needs {root.roles[role].threshold} keys to sign but {self.keys_dir / role} "
                f"holds {len(signers)} of them; restore the keys from backup"
            )
        return signers

    @staticmethod
    def _sign(md: Metadata[Any], signers: Sequence[CryptoSigner]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _bump(self, signed: Signed, lifetime: timedelta) -> None:
        signed.version += 1
        signed.expires = _now() + lifetime

    def _latest_version(self, role: str) -> int:
        suffix = f".{role}.json"
        versions = [
            int(p.name[: -len(suffix)])
            for p in self.metadata_dir.glob(f"*{suffix}")
            if p.name[: -len(suffix)].isdigit()
        ]
        if not versions:
            raise TufRepositoryError(f"no {role} metadata in {self.metadata_dir}; run init first")
        return max(versions)

    def _load_role(self, role: str) -> Metadata[Any]:
        return Metadata.from_bytes(self.metadata_bytes(role))

    def _load(self, kind: type[S]) -> Metadata[S]:
        return cast(Metadata[S], self._load_role(kind.type))

    def _current_bytes(self, kind: type[S]) -> tuple[bytes, Metadata[S]]:
        data = self.metadata_bytes(kind.type)
        return data, cast(Metadata[S], Metadata.from_bytes(data))

    def _write_versioned(self, md: Metadata[Any]) -> bytes:
        data = md.to_bytes()
        role = md.signed.type
        name = "timestamp.json" if role == Timestamp.type else f"{md.signed.version}.{role}.json"
        _write_atomic(self.metadata_dir / name, data)
        return data

    def _publish_from_targets(self, root: Root, targets_md: Metadata[Targets]) -> None:
        self._sign(targets_md, self._signers(root, Targets.type))
        self._write_versioned(targets_md)
        try:
            next_snapshot = self._load(Snapshot).signed.version + 1
        except TufRepositoryError:
            next_snapshot = 1  # init: no snapshot yet
        self._publish_snapshot(root, next_snapshot)

    def _publish_snapshot(self, root: Root, version: int) -> None:
        targets_bytes, targets_md = self._current_bytes(Targets)
        snapshot = Snapshot(version=version, expires=_now() + self.expiries.snapshot)
        # Length and hash let a device bound the download and refuse a swapped file.
        snapshot.meta["targets.json"] = MetaFile.from_data(
            targets_md.signed.version, targets_bytes, ["sha256"]
        )
        snapshot_md = Metadata(snapshot)
        self._sign(snapshot_md, self._signers(root, Snapshot.type))
        snapshot_bytes = self._write_versioned(snapshot_md)
        self._publish_timestamp(root, version, snapshot_bytes)
        self._prune(Snapshot.type, version)
        self._prune(Targets.type, targets_md.signed.version)

    def _publish_timestamp(self, root: Root, snapshot_version: int, snapshot_bytes: bytes) -> int:
        try:
            version = self._load(Timestamp).signed.version + 1
        except MetadataNotFound:
            version = 1
        timestamp = Timestamp(
            version=version,
            expires=_now() + self.expiries.timestamp,
            snapshot_meta=MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"]),
        )
        timestamp_md = Metadata(timestamp)
        self._sign(timestamp_md, self._signers(root, Timestamp.type))
        self._write_versioned(timestamp_md)
        return version

    def _prune(self, role: str, latest: int) -> None:
        for version in range(1, latest - self.keep_versions + 1):
            with contextlib.suppress(FileNotFoundError):
                (self.metadata_dir / f"{version}.{role}.json").unlink()

    @staticmethod
    def _check_target_name(name: str) -> None:
        if not TARGET_NAME.fullmatch(name) or ".." in name.split("/"):
            raise InvalidRequest(
                f"target name {name!r} must look like <model>/<file> (e.g. {archive_target_name('model', 2)})"
            )

    @staticmethod
    def _check_custom(custom: Mapping[str, Any]) -> dict[str, Any]:
        checked = dict(custom)
        for key, kind in _REQUIRED_CUSTOM.items():
            value = checked.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InvalidRequest(f"target custom field {key!r} must be a {kind.__name__}, got {value!r}")
        if checked["version"] < 1:
            raise InvalidRequest(f"model version must be at least 1, got {checked['version']}")
        return checked

    @staticmethod
    def _target_file(path: Path, name: str, custom: Mapping[str, Any]) -> TargetFile:
        if not path.is_file():
            raise InvalidRequest(f"{path} is not a file; give the package archive or delta to publish")
        digest = hashlib.sha256()
        length = 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                length += len(chunk)
        return TargetFile(length, {"sha256": digest.hexdigest()}, name, {"custom": dict(custom)})
