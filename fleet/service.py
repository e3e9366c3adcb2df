"""What the fleet does, independent of how it is asked: devices, models, updates, ingest.

The API and the MQTT worker are thin shells over this class. Publishing goes through the
`publish` callable it is given, so tests can watch what would be sent.
"""

import asyncio
import functools
import logging
import tempfile
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer, sessionmaker

from fleet import broker_auth, maintenance, rollouts
from fleet.artifacts import (
    ArtifactMissing,
    ArtifactStore,
    ArtifactStoreError,
    FolderStore,
    archive_key,
    delta_key,
)
from fleet.db import Device, ModelVersion, TelemetryRecordRow, Update, UpdateEvent
from fleet.deltas import BackgroundBuilds, DeltaArtifact, package_delta
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.field_tokens import FieldTokens
from fleet.ingest import Arrival, TelemetryIngest
from fleet.key_rotation import publish_keys_document
from fleet.keyring import FleetKeyring
from fleet.rollout_db import MaintenanceWindow
from fleet.store import FleetDataDir
from fleet.tuf_repository import TufRepository
from models.errors import ModelError
from models.fsutil import replace_private
from models.package import hash_file, unpack
from models.package_delta import manifest_sha256
from models.signing import load_public_key
from protocol import topics
from protocol.frames import Chunk, ChunkUnavailable, encode_chunk, encode_chunk_unavailable
from protocol.keys_document import public_key_text
from protocol.messages import (
    ChunkRequest,
    DeltaPayload,
    DeviceState,
    Health,
    RollbackCommand,
    UpdateMetadata,
    UpdateOffer,
    UpdateState,
    UpdateStatus,
    encode,
)
from protocol.sealed import TelemetryPrivateKey
from protocol.targets import archive_target_name, delta_target_name

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes, int], Awaitable[None]]
# "cancelled" is the fleet's own: an offer withdrawn (its campaign stopped) before the device acted on it.
CANCELLED = "cancelled"
LOCAL_PREFIX = "local-"  # update ids the device made itself (its local API), reported like ours
SWITCH_WINDOWS_AHEAD = 14  # windows per group an offer carries: two weeks of daily windows
FINAL_STATES = {state.value for state in UpdateState if state.is_final} | {CANCELLED}
# Offers awaiting their PUBACK at once: one at a time costs a broker round trip through a busy event
# loop per device (47-64 s for 1,000 devices); all at once, aiomqtt bookkeeping that grows with them.
OFFERS_IN_FLIGHT = 64
# Updates whose payload location chunk_for keeps in memory (an update's offer never changes).
CHUNK_SOURCES_CACHED = 4096
IN_CHUNK = 500  # ids per IN (...) list: under SQLite's bound-parameter limit on old builds


@dataclass(frozen=True)
class _ChunkSource:
    """Where one update's payloads lie: what chunk_for needs, so a chunk costs no database query."""

    device_id: str
    package: str  # artifact keys
    package_size: int
    delta: str | None
    delta_size: int


# A device whose chunk the store cannot give asks again after this long (a store that is down).
CHUNK_RETRY_AFTER_S = 10.0


def _unavailable(request: ChunkRequest, error: ArtifactStoreError) -> ChunkUnavailable:
    """What a device is told when its chunk cannot be read: not the store's own message (bucket
    names and paths are the operator's), which `_artifact_error` logs at the fleet."""
    if isinstance(error, ArtifactMissing):
        reason = "the fleet's artifact store no longer holds this payload; the operator must push it again"
        return ChunkUnavailable(request.update_id, request.offset, reason, None)
    reason = "the fleet cannot read this payload from its artifact store just now"
    return ChunkUnavailable(request.update_id, request.offset, reason, CHUNK_RETRY_AFTER_S)


def _refusal(request: ChunkRequest, reason: str) -> bytes:
    """A chunk request that can never be answered with bytes, answered so the device stops asking."""
    return encode_chunk_unavailable(ChunkUnavailable(request.update_id, request.offset, reason, None))


class _NeedsNetwork:
    """A chunk the artifact store cannot read without waiting on the network."""


Report = tuple[str, DeviceState | Health | UpdateStatus]  # (the topic's device id, what it sent)


def _chunks(items: list[str], size: int = IN_CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _is_ed25519_pem(pem: str) -> bool:
    try:
        load_public_key(pem)
    except ModelError:
        return False
    return True


class FleetService:
    def __init__(
        self,
        data: FleetDataDir,
        sessions: sessionmaker[Session],
        broker_url: str,
        chunk_size: int = 256 * 1024,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.data = data
        # Archives and deltas: the data dir's artifacts/ folder, or an S3 bucket (fleet/artifacts.py).
        self.artifacts = artifacts or FolderStore(data.artifacts)
        self.artifact_errors: Counter[str] = Counter()  # chunk requests not answered, per reason
        self._artifact_error_logged: dict[str, float] = {}
        self._register_lock = threading.Lock()
        self.sessions = sessions
        self.broker_url = broker_url
        self.chunk_size = chunk_size
        self.tuf = TufRepository.in_data_dir(data)
        if not self.tuf.initialized:
            self.tuf.init()
        # Telemetry and field-token keys, rotated by `fleet keys rotate` (fleet/key_rotation.py).
        self.keyring = FleetKeyring(data.secrets / "keys", legacy_telemetry_key=data.telemetry_key_path)
        self.field_tokens = FieldTokens(sessions, self.keyring)
        publish_keys_document(self)
        self.telemetry_counts: Counter[str] = Counter()  # stored, duplicate, rejected:<reason>
        self.pruned: Counter[str] = Counter()  # telemetry rows deleted by retention, per kind
        self._device_keys: dict[str, Ed25519PublicKey] = {}
        self.publish: Publish | None = None
        self.on_credentials_changed: Callable[[], None] = lambda: None
        self.rejected_messages = 0
        self._fleet_password_hash: str | None = None
        self.clock: Callable[[], float] = time.time  # the fleet's clock for campaigns (tests set it)
        # Deltas built ahead of rollouts: on registration and when a device reports an older version.
        self.delta_builds = BackgroundBuilds()
        self._delta_publish_lock = threading.Lock()  # one TUF listing per delta, whoever built it
        self._latest: dict[str, int] | None = None  # model name -> newest registered version
        self._latest_lock = threading.Lock()
        self._chunk_sources: OrderedDict[str, _ChunkSource] = OrderedDict()
        self._chunk_sources_lock = threading.Lock()

    @property
    def telemetry_key(self) -> TelemetryPrivateKey:
        """The key devices seal to now (older ones still open envelopes: `keyring.telemetry_keys()`)."""
        return self.keyring.current_telemetry_key()[1]

    @property
    def telemetry_key_id(self) -> str:
        return self.keyring.current_telemetry_key()[0]

    # -- broker credentials -------------------------------------------------------------------
    def write_broker_auth(self) -> None:
        """The broker's ACL, and its password file for plain mode (TLS mode authenticates by
        certificate and does not read it; devices enrolled with a certificate have no entry)."""
        with self.sessions() as s:
            entries = {d.id: d.mqtt_password_hash for d in s.scalars(select(Device))}
        if self._fleet_password_hash is None:  # PBKDF2 on purpose slow: once per process, not per device
            self._fleet_password_hash = broker_auth.hash_password(self.fleet_mqtt_password)
        entries[broker_auth.FLEET_USER] = self._fleet_password_hash
        # Replaced by a rename, never rewritten in place: Mosquitto may re-read it at any moment.
        replace_private(self.data.password_file, broker_auth.password_file(entries).encode())
        replace_private(self.data.acl_file, broker_auth.acl_file().encode())

    @property
    def fleet_mqtt_password(self) -> str:
        """The fleet workers' broker password (plain mode only; with TLS they show a certificate)."""
        return self.data.secret("broker-fleet-password")

    # -- devices ------------------------------------------------------------------------------
    def add_device(self, device_id: str) -> dict[str, Any]:
        """Register a device and return its enrollment ticket: a one-time token that expires, which the
        device spends on `POST /api/enroll` for a certificate of its own key.

        Plain mode (a broker URL without TLS) also returns the device's broker password and what it
        needs to connect, as before tokens: the only time that password is shown.
        """
        from fleet.enrollment import enrollment_of

        try:
            broker_auth.require_device_name(device_id)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        enrollment = enrollment_of(self)
        password = broker_auth.new_password() if enrollment.plain else None
        with self.sessions.begin() as s:
            if s.get(Device, device_id) is not None:
                raise Conflict(f"device {device_id!r} is already registered")
            hashed = broker_auth.hash_password(password) if password else ""
            s.add(Device(id=device_id, mqtt_password_hash=hashed))
            s.flush()
            token, expires = enrollment.add_token(s, device_id)
        ticket = enrollment.ticket(device_id, token, expires)
        if password is None:
            return ticket
        self.write_broker_auth()
        self.on_credentials_changed()
        return {
            **ticket,
            "fleet_url": self.broker_url,
            "mqtt_password": password,
            "tuf_root": self.tuf.trusted_root().decode(),
            "fleet_telemetry_key": public_key_text(self.telemetry_key.public_key()),
        }

    def list_devices(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [self._device_view(s, d) for d in s.scalars(select(Device).order_by(Device.id))]

    def get_device(self, device_id: str) -> dict[str, Any]:
        with self.sessions() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            return self._device_view(s, device)

    def _device_view(self, s: Session, d: Device) -> dict[str, Any]:
        latest = s.scalars(
            select(Update).where(Update.device_id == d.id).order_by(Update.created.desc()).limit(1)
        ).first()
        return {
            "device_id": d.id,
            "online": d.online,
            "last_seen": d.last_seen,
            "agent_version": d.agent_version,
            "health": d.last_health,
            "latest_update": self._update_view(s, latest) if latest else None,
        }

    # -- models -------------------------------------------------------------------------------
    def register_model(self, archive: Path) -> dict[str, Any]:
        """Verify a package archive completely, then keep it as an artifact; versions are immutable."""
        with tempfile.TemporaryDirectory(dir=self.data.root) as tmp:
            try:
                manifest = unpack(archive, Path(tmp) / "pkg")
                manifest_digest = manifest_sha256(Path(tmp) / "pkg")
            except ModelError as e:
                raise InvalidRequest(f"not a valid model package: {e}") from e
        digest = hash_file(archive)
        key = archive_key(manifest.name, manifest.version)
        # One registration at a time: the upload happens outside the database transaction (it may
        # take minutes to a remote store), and two of one version must not overwrite each other.
        with self._register_lock:
            with self.sessions() as s:
                existing = s.scalars(
                    select(ModelVersion).where(
                        ModelVersion.name == manifest.name, ModelVersion.version == manifest.version
                    )
                ).first()
                known = (existing.sha256, self._model_view(existing)) if existing is not None else None
            if known is not None:
                if known[0] != digest.sha256:
                    raise Conflict(
                        f"{manifest.name} v{manifest.version} exists with other bytes; bump the version"
                    )
                if not self.artifacts.exists(key):  # lost from the store: pushing it again restores it
                    self.artifacts.put(key, archive, sha256=digest.sha256)
                return known[1]
            self.artifacts.put(key, archive, sha256=digest.sha256)
            with self.sessions.begin() as s:
                row = ModelVersion(
                    name=manifest.name,
                    version=manifest.version,
                    sha256=digest.sha256,
                    size=digest.size,
                    path=self.artifacts.url(key),
                    manifest=manifest.model_dump(mode="json", by_alias=True),
                )
                s.add(row)
                s.flush()
                # Listed in TUF last: a device can only ever be offered what the registry holds.
                with self.artifacts.local_file(key) as stored:
                    self.tuf.add_target(
                        stored,
                        archive_target_name(manifest.name, manifest.version),
                        {
                            "model": manifest.name,
                            "version": manifest.version,
                            "format": "package-tar",
                            "manifest_sha256": manifest_digest,
                        },
                    )
                view = self._model_view(row)
        self._registered(manifest.name, manifest.version)
        return view

    def check_artifacts(self) -> dict[str, list[str]]:
        """At start: every registered archive must be in the store. One the store lacks but the data
        dir's artifacts/ folder holds (a fleet moved from the folder to S3) is uploaded; one found
        nowhere is logged, with what to do, and its chunks will fail until it is pushed again."""
        with self.sessions() as s:
            rows = s.execute(select(ModelVersion.name, ModelVersion.version, ModelVersion.sha256)).all()
        legacy = FolderStore(self.data.artifacts)
        found: dict[str, list[str]] = {"uploaded": [], "missing": []}
        for name, version, sha256 in rows:
            key = archive_key(name, version)
            if self.artifacts.exists(key):
                continue
            if not isinstance(self.artifacts, FolderStore) and legacy.exists(key):
                with legacy.local_file(key) as path:
                    self.artifacts.put(key, path, sha256=sha256)
                found["uploaded"].append(key)
                log.info("uploaded %s from the data dir to %s", key, self.artifacts.url(key))
            else:
                found["missing"].append(key)
                log.error(
                    "registered %s v%d is not in the artifact store (%s): push the same package again",
                    name,
                    version,
                    self.artifacts.url(key),
                )
        return found

    def list_models(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = s.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version))
            return [self._model_view(r) for r in rows]

    @staticmethod
    def _model_view(row: ModelVersion) -> dict[str, Any]:
        return {
            "name": row.name,
            "version": row.version,
            "sha256": row.sha256,
            "size": row.size,
            "created": row.created,
        }

    # -- updates ------------------------------------------------------------------------------
    async def start_update(
        self, model_name: str, version: int, device_ids: list[str]
    ) -> list[dict[str, Any]]:
        """Sign an offer of `model_name` v`version` for each device and publish it.

        The database work runs in a thread and the offers go out OFFERS_IN_FLIGHT at a time, so the
        event loop keeps answering the devices' chunk requests while a large rollout starts.
        """
        if not device_ids:
            raise InvalidRequest("name at least one device")
        model, bases = await asyncio.to_thread(self._plan_update, model_name, version, device_ids)
        deltas: dict[int, DeltaPayload | None] = {}
        for base_version, base_row in {b.version: b for b in bases.values() if b is not None}.items():
            deltas[base_version] = await asyncio.to_thread(self._delta_payload, base_row, model)
        created = await asyncio.to_thread(self._create_updates, model, bases, deltas)
        # Devices ask for chunks as soon as they have their offer: have the payloads on disk by then.
        for base_version, delta in deltas.items():
            if delta is not None:
                self.artifacts.prefetch(delta_key(model.name, base_version, model.version))
        if any(base is None or deltas.get(base.version) is None for base in bases.values()):
            self.artifacts.prefetch(archive_key(model.name, model.version))
        await self._send_offers(created)
        return await asyncio.to_thread(self._update_views, [u.id for u in created])

    def _plan_update(
        self, model_name: str, version: int, device_ids: list[str]
    ) -> tuple[ModelVersion, dict[str, ModelVersion | None]]:
        """The model version to offer, and per device the registered version to build a delta from."""
        with self.sessions() as s:
            versions = {
                m.version: m for m in s.scalars(select(ModelVersion).where(ModelVersion.name == model_name))
            }
            model = versions.get(version)
            if model is None:
                raise NotFound(f"model {model_name} v{version} is not registered; push it first")
            devices: dict[str, Device] = {}
            for chunk in _chunks(sorted(set(device_ids))):
                devices.update((d.id, d) for d in s.scalars(select(Device).where(Device.id.in_(chunk))))
            bases: dict[str, ModelVersion | None] = {}
            for device_id in device_ids:
                device = devices.get(device_id)
                if device is None:
                    raise NotFound(f"no device {device_id!r}")
                bases[device_id] = self._delta_base(device, model, versions)
            s.expunge_all()
        return model, bases

    def _create_updates(
        self,
        model: ModelVersion,
        bases: dict[str, ModelVersion | None],
        deltas: dict[int, DeltaPayload | None],
    ) -> list[Update]:
        created = []
        with self.sessions.begin() as s:
            for device_id, base in bases.items():
                update = Update(
                    id=uuid.uuid4().hex[:16], device_id=device_id, model_version_id=model.id, offer={}
                )
                delta = deltas.get(base.version) if base is not None else None
                update.offer = self._offer(update.id, model, delta).model_dump(mode="json")
                s.add(update)
                created.append(update)
        return created

    def _update_views(self, update_ids: list[str]) -> list[dict[str, Any]]:
        """The views of these updates, in this order (one query per IN_CHUNK ids, not one per update)."""
        with self.sessions() as s:
            rows: dict[str, Update] = {}
            for chunk in _chunks(update_ids):
                rows.update((u.id, u) for u in s.scalars(select(Update).where(Update.id.in_(chunk))))
            return [self._update_view(s, rows[u]) for u in update_ids]

    @staticmethod
    def _delta_base(
        device: Device, model: ModelVersion, versions: dict[int, ModelVersion]
    ) -> ModelVersion | None:
        """The registered version this device last reported running, when a delta from it makes sense."""
        running = FleetService._running_version(device.last_health, model.name)
        if running is None or running >= model.version:
            return None
        return versions.get(running)

    @staticmethod
    def _running_version(health: dict[str, Any] | None, model_name: str) -> int | None:
        reported = (health or {}).get("models", [])
        running = next((m.get("version") for m in reported if m.get("name") == model_name), None)
        return running if isinstance(running, int) else None

    # -- deltas built ahead of rollouts -------------------------------------------------------
    def _registered(self, model_name: str, version: int) -> None:
        """A new version is in the registry: build deltas to it from the versions devices run."""
        with self._latest_lock:
            if self._latest is not None and version > self._latest.get(model_name, 0):
                self._latest[model_name] = version
        with self.sessions() as s:
            health = s.scalars(select(Device.last_health).where(Device.last_health.is_not(None)))
            running = {self._running_version(h, model_name) for h in health}
        self._prebuild_deltas((model_name, v) for v in running if v is not None)

    def _latest_versions(self) -> dict[str, int]:
        with self._latest_lock:
            if self._latest is None:
                with self.sessions() as s:
                    rows = s.execute(
                        select(ModelVersion.name, func.max(ModelVersion.version)).group_by(ModelVersion.name)
                    ).all()
                self._latest = {name: int(version) for name, version in rows}
            return self._latest

    def _prebuild_deltas(self, running: Iterable[tuple[str, int]]) -> None:
        """Queue a delta from each (model, version) devices run to that model's newest version."""
        latest = self._latest_versions()
        for name, version in running:
            newest = latest.get(name)
            if newest is not None and version < newest:
                key = (name, version, newest)
                self.delta_builds.schedule(key, functools.partial(self._prebuild_delta, *key))

    def _prebuild_delta(self, model_name: str, base_version: int, version: int) -> None:
        with self.sessions() as s:
            rows = {
                m.version: m
                for m in s.scalars(
                    select(ModelVersion).where(
                        ModelVersion.name == model_name, ModelVersion.version.in_((base_version, version))
                    )
                )
            }
            s.expunge_all()
        if base_version in rows and version in rows:  # a version devices run that was never registered: none
            self._delta_payload(rows[base_version], rows[version])

    def _delta_payload(self, base: ModelVersion, model: ModelVersion) -> DeltaPayload | None:
        """The package delta from `base` to `model`, or None when it would not save bytes or fails."""
        try:
            artifact = package_delta(self.artifacts, model.name, base.version, model.version)
        except (ModelError, ArtifactStoreError) as e:
            log.warning("no delta %s v%d -> v%d: %s", model.name, base.version, model.version, e)
            return None
        if artifact.size >= model.size:
            return None
        self._publish_delta(model, artifact)
        return DeltaPayload(
            base_version=artifact.base_version,
            base_manifest_sha256=artifact.base_manifest_sha256,
            sha256=artifact.sha256,
            size=artifact.size,
            manifest_sha256=artifact.manifest_sha256,
        )

    def _publish_delta(self, model: ModelVersion, artifact: DeltaArtifact) -> None:
        """List the delta in TUF (once): a device uses only payloads the signed targets name."""
        name = delta_target_name(model.name, artifact.base_version, model.version)
        with self._delta_publish_lock:  # a build ahead of time and a rollout may finish together
            listed = self.tuf.target(name)
            if listed is not None and listed.hashes.get("sha256") == artifact.sha256:
                return
            self._list_delta(model, artifact)

    def _list_delta(self, model: ModelVersion, artifact: DeltaArtifact) -> None:
        with (
            self.artifacts.local_file(archive_key(model.name, model.version)) as archive,
            self.artifacts.local_file(artifact.key) as delta,
        ):
            self.tuf.add_target(
                archive,
                archive_target_name(model.name, model.version),
                {
                    "model": model.name,
                    "version": model.version,
                    "format": "package-tar",
                    "manifest_sha256": artifact.manifest_sha256,
                },
                deltas={artifact.base_version: delta},
                delta_custom={
                    artifact.base_version: {
                        "base_manifest_sha256": artifact.base_manifest_sha256,
                        "manifest_sha256": artifact.manifest_sha256,
                    }
                },
            )

    def _offer(self, update_id: str, model: ModelVersion, delta: DeltaPayload | None = None) -> UpdateOffer:
        metadata = UpdateMetadata(
            update_id=update_id,
            model_name=model.name,
            version=model.version,
            sha256=model.sha256,
            size=model.size,
            created=time.time(),
            delta=delta,
        )
        return UpdateOffer(update=metadata, chunk_size=self.chunk_size)

    def metadata_file(self, name: str) -> bytes | None:
        """A TUF metadata file a device asked for, or None when there is no such file (yet)."""
        try:
            return self.tuf.serve_metadata(name)
        except NotFound:
            return None

    async def request_rollback(
        self, model_name: str, version: int, device_ids: list[str], reason: str = ""
    ) -> list[dict[str, Any]]:
        """Ask each device to serve `version` again from its other slot (no download, no downgrade offer).

        Tracked like an update: the device reports `rolled_back` (done) or `failed` with the reason.
        """
        if not device_ids:
            raise InvalidRequest("name at least one device")
        created = []
        with self.sessions.begin() as s:
            model = s.scalars(
                select(ModelVersion).where(ModelVersion.name == model_name, ModelVersion.version == version)
            ).first()
            if model is None:
                raise NotFound(f"model {model_name} v{version} is not registered")
            for device_id in device_ids:
                if s.get(Device, device_id) is None:
                    raise NotFound(f"no device {device_id!r}")
                request_id = uuid.uuid4().hex[:16]
                command = RollbackCommand(
                    request_id=request_id, model_name=model_name, to_version=version, reason=reason
                )
                update = Update(
                    id=request_id,
                    device_id=device_id,
                    model_version_id=model.id,
                    offer={"rollback": command.model_dump(mode="json")},
                )
                s.add(update)
                created.append(update)
        await self._send_offers(created)
        return await asyncio.to_thread(self._update_views, [u.id for u in created])

    async def _send_offers(self, updates: list[Update]) -> None:
        """Publish these offers and rollback commands, OFFERS_IN_FLIGHT at a time.

        After the first that fails, no more are sent (they stay pending and go out again when their
        device next comes online) and that error is raised once those in flight have ended.
        """
        if self.publish is None or not updates:
            return
        offered = [u.device_id for u in updates if "update" in u.offer]
        windows = await asyncio.to_thread(self._switch_windows_of, offered) if offered else {}
        queue = deque(updates)
        errors: list[Exception] = []

        async def sender() -> None:
            while queue and not errors:
                try:
                    await self._send_offer(queue.popleft(), windows)
                except Exception as e:
                    errors.append(e)

        await asyncio.gather(*(sender() for _ in range(min(OFFERS_IN_FLIGHT, len(updates)))))
        if errors:
            raise errors[0]

    async def _send_offer(
        self, update: Update, windows: dict[str, list[tuple[float, float]]] | None = None
    ) -> None:
        if self.publish is None:
            return
        if "local" in update.offer:
            return  # the device's own action: nothing to send
        if "rollback" in update.offer:
            command = RollbackCommand.model_validate(update.offer["rollback"])
            await self.publish(topics.device_topic(update.device_id, topics.CMD_ROLLBACK), encode(command), 1)
            return
        offer = UpdateOffer.model_validate(update.offer)
        # Windows are computed at each send: an offer re-sent after days offline carries current ones.
        spans = (
            windows.get(update.device_id, [])
            if windows is not None
            else self.switch_windows(update.device_id)
        )
        offer = offer.model_copy(update={"switch_windows": spans})
        topic = topics.device_topic(update.device_id, topics.CMD_UPDATE)
        await self.publish(topic, encode(offer), 1)

    def switch_windows(self, device_id: str) -> list[tuple[float, float]]:
        """When the device may switch models: its groups' next maintenance windows; [] = any time."""
        return self._switch_windows_of([device_id]).get(device_id, [])

    def _switch_windows_of(self, device_ids: list[str]) -> dict[str, list[tuple[float, float]]]:
        """`switch_windows` of many devices in one session; devices left out may switch any time."""
        with self.sessions() as s:
            if s.scalars(select(MaintenanceWindow.id).limit(1)).first() is None:
                return {}  # no window in the fleet: no query per device
            now = self.clock()
            out = {}
            for device_id in device_ids:
                spans = maintenance.upcoming_windows(s, device_id, now, count=SWITCH_WINDOWS_AHEAD)
                if spans:
                    out[device_id] = spans
            return out

    def get_update(self, update_id: str) -> dict[str, Any]:
        with self.sessions() as s:
            update = s.get(Update, update_id)
            if update is None:
                raise NotFound(f"no update {update_id!r}")
            return self._update_view(s, update, with_events=True)

    def list_updates(self, device_id: str | None = None) -> list[dict[str, Any]]:
        with self.sessions() as s:
            query = select(Update).order_by(Update.created)
            if device_id:
                query = query.where(Update.device_id == device_id)
            return [self._update_view(s, u) for u in s.scalars(query)]

    @staticmethod
    def _update_view(s: Session, u: Update, with_events: bool = False) -> dict[str, Any]:
        model = s.get(ModelVersion, u.model_version_id)
        view: dict[str, Any] = {
            "update_id": u.id,
            "device_id": u.device_id,
            "kind": "rollback" if "rollback" in u.offer else "local" if "local" in u.offer else "update",
            "model_name": model.name if model else None,
            "version": model.version if model else None,
            "state": u.state,
            "reason": u.reason,
            "created": u.created,
            "updated": u.updated,
        }
        if with_events:
            events = s.scalars(
                select(UpdateEvent).where(UpdateEvent.update_id == u.id).order_by(UpdateEvent.ts)
            )
            view["events"] = [
                {"state": e.state, "reason": e.reason, "ts": e.ts, "detail": e.detail} for e in events
            ]
        return view

    # -- ingest -------------------------------------------------------------------------------
    async def on_device_state(self, device_id: str, state: DeviceState) -> None:
        await self._send_offers(self.record_device_state(device_id, state))

    async def resend_offers(self, updates: list[Update]) -> None:
        """Send again what `record_reports` returned (the MQTT worker records in a thread)."""
        await self._send_offers(updates)

    def record_device_state(self, device_id: str, state: DeviceState) -> list[Update]:
        """Record a device's online state; the open updates to send it again when it came online."""
        return self.record_reports([(device_id, state)])

    def on_health(self, device_id: str, health: Health) -> None:
        self.record_reports([(device_id, health)])

    def on_healths(self, reports: list[tuple[str, Health]]) -> None:
        self.record_reports(list(reports))

    def on_update_status(self, device_id: str, status: UpdateStatus) -> None:
        """Record a device's report on its own update; the update's state stops moving once final."""
        self.record_reports([(device_id, status)])

    def record_reports(self, reports: list[Report]) -> list[Update]:
        """Record device reports (state, health, update statuses) in this order, in one transaction.

        Returns the open updates of devices that came online, to send them again. One transaction
        for many: at 1,000 devices a session and a commit per report cost the fleet more than the
        reports themselves (bench/updates). If it fails, nothing of it is kept; the caller can record
        the reports one by one to keep all but the bad one.
        """
        running: set[tuple[str, int]] = set()
        resend: dict[str, list[Update]] = {}
        with self.sessions.begin() as s:
            preloaded = self._preload(s, reports)
            now = time.time()
            for device_id, message in reports:
                if isinstance(message, UpdateStatus):
                    self._record_status(s, device_id, message)
                elif isinstance(message, Health):
                    if self._record_health(s, device_id, message, now):
                        running.update((m.name, m.version) for m in message.models)
                else:
                    came_online = self._record_state(s, device_id, message)
                    resend.pop(device_id, None)
                    if came_online:
                        # Offers made while the device was away, and updates whose end it may not
                        # have reported: it starts a new offer or re-reports what its journal says.
                        query = select(Update).where(
                            Update.device_id == device_id, Update.state.not_in(FINAL_STATES)
                        )
                        resend[device_id] = list(s.scalars(query))
                        for update in resend[device_id]:
                            update.offer  # noqa: B018 (loaded now: _send_offer reads it after the session)
            del preloaded
        self._prebuild_deltas(running)
        return [update for updates in resend.values() for update in updates]

    @staticmethod
    def _preload(s: Session, reports: list[Report]) -> list[Device | Update]:
        """The devices and updates these reports name, in one query per IN_CHUNK, so s.get finds them
        in the session instead of asking the database once per report. The caller holds the list:
        the session keeps unchanged rows only while something else refers to them. The JSON columns
        no report reads (a device's last health, an update's offer) load only if something asks."""
        device_ids = sorted({device_id for device_id, _ in reports})
        update_ids = sorted({m.update_id for _, m in reports if isinstance(m, UpdateStatus)})
        rows: list[Device | Update] = []
        for chunk in _chunks(device_ids):
            rows += s.scalars(select(Device).where(Device.id.in_(chunk)).options(defer(Device.last_health)))
        for chunk in _chunks(update_ids):
            rows += s.scalars(select(Update).where(Update.id.in_(chunk)).options(defer(Update.offer)))
        return rows

    @staticmethod
    def _record_state(s: Session, device_id: str, state: DeviceState) -> bool:
        """True when a known device says it is online."""
        device = s.get(Device, device_id)
        if device is None:
            return False
        device.online = state.online
        device.last_seen = time.time()
        device.agent_version = state.agent_version
        if state.public_key and device.public_key is None and _is_ed25519_pem(state.public_key):
            device.public_key = state.public_key  # pinned: a later, different key is not accepted
        elif state.public_key and state.public_key != device.public_key:
            log.warning("device %s presented a different public key; keeping the pinned one", device_id)
        return state.online

    @staticmethod
    def _record_health(s: Session, device_id: str, health: Health, now: float) -> bool:
        """True when the device is known."""
        device = s.get(Device, device_id)
        if device is None:
            return False
        device.last_seen = now
        if health.seq > device.health_seq or health.seq == 0:
            device.health_seq = health.seq
            device.last_health = health.model_dump(mode="json")
        return True

    def _record_status(self, s: Session, device_id: str, status: UpdateStatus) -> None:
        update = s.get(Update, status.update_id)
        if update is None and status.update_id.startswith(LOCAL_PREFIX):
            update = self._local_action(s, device_id, status)
        # Only refusals of offers that could not even be parsed carry no update of their own.
        not_its_own = update is None or update.device_id != device_id
        if not_its_own and status.update_id != "invalid-offer":
            log.warning("%s reported on update %s, which is not its own", device_id, status.update_id)
            return
        s.add(
            UpdateEvent(
                update_id=status.update_id,
                device_id=device_id,
                state=status.state.value,
                reason=status.reason[:2048],
                ts=status.ts,
                detail=status.detail,
            )
        )
        if update is None or update.device_id != device_id or update.state in FINAL_STATES:
            return
        update.state = status.state.value
        update.reason = status.reason[:2048]
        update.updated = time.time()
        # Campaigns act on final states and shadow figures only; the steps between cost 4 ms each
        # of bookkeeping at 1,000 devices for nothing (bench/updates).
        if status.state.is_final or rollouts.SHADOW_KEY in status.detail:
            s.flush()
            # In the same transaction: a campaign's abort rule sees every report exactly once.
            rollouts.record_update_report(
                s, status.update_id, device_id, status.state.value, status.detail, now=self.clock()
            )

    @staticmethod
    def _local_action(s: Session, device_id: str, status: UpdateStatus) -> Update | None:
        """A change made at the device (a field engineer's rollback): tracked like a fleet one."""
        model = s.scalars(
            select(ModelVersion).where(
                ModelVersion.name == status.model_name, ModelVersion.version == status.version
            )
        ).first()
        if model is None or s.get(Device, device_id) is None:
            return None
        update = Update(
            id=status.update_id,
            device_id=device_id,
            model_version_id=model.id,
            offer={"local": {"reason": status.reason[:1024]}},
        )
        s.add(update)
        return update

    def cancel_pending(self, update_ids: list[str], reason: str) -> int:
        """Withdraw offers no device has acted on yet, so a reconnecting device is not sent them."""
        with self.sessions.begin() as s:
            rows = s.scalars(select(Update).where(Update.id.in_(update_ids), Update.state == "pending"))
            cancelled = 0
            for update in rows:
                update.state, update.reason, update.updated = CANCELLED, reason[:2048], time.time()
                cancelled += 1
            return cancelled

    # -- sealed telemetry ---------------------------------------------------------------------
    @functools.cached_property
    def telemetry_ingest(self) -> TelemetryIngest:
        """The batched ingest path (fleet/ingest.py); its key cache is `_device_keys`."""
        # The function, read once per batch: a rotation reaches ingest (and its worker processes)
        # without a restart, and keys in their grace period keep opening.
        return TelemetryIngest(
            self.sessions, self.keyring.telemetry_keys, self.telemetry_counts, key_cache=self._device_keys
        )

    def on_telemetry(self, device_id: str, envelope: bytes) -> str:
        """Open, check and store one sealed record (the MQTT worker ingests them in batches).

        Returns 'stored', 'duplicate', 'rejected: <why>', or 'deferred: <why>' when the device's key is
        not pinned yet (its `state` message has not been processed), so the device should resend.
        """
        return self.telemetry_ingest.ingest([Arrival(device_id, envelope)])[0].outcome

    def metrics_snapshot(self) -> dict[str, Any]:
        """Fleet-level numbers for Prometheus: devices online, updates by state, ingest outcomes."""
        with self.sessions() as s:
            devices = dict(s.execute(select(Device.online, func.count()).group_by(Device.online)).all())
            updates = dict(s.execute(select(Update.state, func.count()).group_by(Update.state)).all())
        return {
            "devices_online": devices.get(True, 0),
            "devices_offline": devices.get(False, 0),
            "updates": updates,
            "telemetry": dict(self.telemetry_counts),
            "rejected_messages": self.rejected_messages,
            "pruned": dict(self.pruned),
        }

    def telemetry(self, device_id: str, kind: str | None = None, limit: int = 100) -> dict[str, Any]:
        with self.sessions() as s:
            query = select(TelemetryRecordRow).where(TelemetryRecordRow.device_id == device_id)
            if kind:
                query = query.where(TelemetryRecordRow.kind == kind)
            rows = list(
                s.scalars(query.order_by(TelemetryRecordRow.seq.desc()).limit(max(1, min(limit, 1000))))
            )
            counts = dict(
                s.execute(
                    select(TelemetryRecordRow.kind, func.count())
                    .where(TelemetryRecordRow.device_id == device_id)
                    .group_by(TelemetryRecordRow.kind)
                ).all()
            )
        return {
            "device_id": device_id,
            "counts": counts,
            "records": [{"seq": r.seq, "kind": r.kind, "ts": r.ts, "body": r.body} for r in rows],
        }

    def chunk_for(self, device_id: str, request: ChunkRequest) -> bytes:
        """The frame answering a chunk request: the chunk read from the artifact, or a ChunkUnavailable
        answer (protocol/frames.py) for a request that is not allowed or an artifact the store cannot
        give (that one logged and counted in `artifact_errors`; other updates are served meanwhile)."""
        frame = self._chunk(device_id, request, wait=True)
        assert not isinstance(frame, _NeedsNetwork)
        return frame

    async def answer_chunk(self, device_id: str, request: ChunkRequest) -> bytes:
        """`chunk_for` for the event loop: a chunk on the fleet's disk (the folder store, the S3
        store's cache) is read here; one that needs the network (an S3 cache miss) in a thread."""
        frame = self._chunk(device_id, request, wait=False)
        if isinstance(frame, _NeedsNetwork):
            return await asyncio.to_thread(self.chunk_for, device_id, request)
        return frame

    def _chunk(self, device_id: str, request: ChunkRequest, *, wait: bool) -> bytes | _NeedsNetwork:
        source = self._chunk_source(request.update_id)
        if source is None or source.device_id != device_id:
            # The same answer for an unknown update and another device's: nothing to learn from it.
            return _refusal(request, "the fleet has no such update for this device")
        if request.payload == "delta":
            if source.delta is None:
                return _refusal(request, "this update has no delta; ask for the package")
            key, total = source.delta, source.delta_size
        else:
            key, total = source.package, source.package_size
        if request.offset >= total:
            return _refusal(request, f"offset {request.offset} is past the payload's end ({total} bytes)")
        length = min(request.length, total - request.offset)
        try:
            if wait:
                data: bytes | None = self.artifacts.read(key, request.offset, length)
            else:
                data = self.artifacts.read_local(key, request.offset, length)
                if data is None:
                    return _NeedsNetwork()
        except ArtifactStoreError as e:
            self._artifact_error(key, e)
            return encode_chunk_unavailable(_unavailable(request, e))
        assert data is not None
        return encode_chunk(Chunk(update_id=request.update_id, offset=request.offset, total=total, data=data))

    def _artifact_error(self, key: str, error: ArtifactStoreError) -> None:
        """Count every failed chunk; log each artifact's failure once a minute, not once per chunk."""
        self.artifact_errors[type(error).__name__] += 1
        now = time.monotonic()
        last = self._artifact_error_logged.get(key)
        if last is None or now - last >= 60.0:
            self._artifact_error_logged[key] = now
            log.error("cannot serve chunks of %s: %s", key, error)

    def _chunk_source(self, update_id: str) -> _ChunkSource | None:
        """Where an update's payloads lie, from the database once and then from memory (a rollout of
        1,000 devices asks 9,000 times): an update's offer and model version never change."""
        with self._chunk_sources_lock:
            source = self._chunk_sources.get(update_id)
            if source is not None:
                self._chunk_sources.move_to_end(update_id)
                return source
        with self.sessions() as s:
            update = s.get(Update, update_id)
            if update is None or "update" not in update.offer:
                return None  # not remembered: an unknown id costs the asker a query, not us memory
            model = s.get(ModelVersion, update.model_version_id)
            assert model is not None
            delta = update.offer["update"].get("delta")
            source = _ChunkSource(
                device_id=update.device_id,
                package=archive_key(model.name, model.version),
                package_size=model.size,
                delta=delta_key(model.name, delta["base_version"], model.version) if delta else None,
                delta_size=int(delta["size"]) if delta else 0,
            )
        self.artifacts.prefetch(source.delta or source.package)  # after a restart: to disk, once
        with self._chunk_sources_lock:
            self._chunk_sources[update_id] = source
            while len(self._chunk_sources) > CHUNK_SOURCES_CACHED:
                self._chunk_sources.popitem(last=False)
        return source
