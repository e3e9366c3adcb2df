"""What the fleet does, independent of how it is asked: devices, models, updates, ingest.

The API and the MQTT worker are thin shells over this class. Publishing goes through the
`publish` callable it is given, so tests can watch what would be sent.
"""

import asyncio
import functools
import logging
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fleet import broker_auth, maintenance, rollouts
from fleet.db import Device, ModelVersion, TelemetryRecordRow, Update, UpdateEvent
from fleet.deltas import DeltaArtifact, delta_path, package_delta
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.field_tokens import FieldTokens
from fleet.ingest import Arrival, TelemetryIngest
from fleet.key_rotation import publish_keys_document
from fleet.keyring import FleetKeyring
from fleet.store import FleetDataDir
from fleet.tuf_repository import TufRepository
from models.errors import ModelError
from models.fsutil import replace_private
from models.package import hash_file, unpack
from models.package_delta import manifest_sha256
from models.signing import load_public_key
from protocol import topics
from protocol.frames import Chunk, encode_chunk
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
    ) -> None:
        self.data = data
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
        with self.sessions.begin() as s:
            existing = s.scalars(
                select(ModelVersion).where(
                    ModelVersion.name == manifest.name, ModelVersion.version == manifest.version
                )
            ).first()
            if existing is not None:
                if existing.sha256 == digest.sha256:
                    return self._model_view(existing)
                raise Conflict(
                    f"{manifest.name} v{manifest.version} exists with other bytes; bump the version"
                )
            target = self.data.artifacts / manifest.name / f"{manifest.version}.tar"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(archive, target)
            row = ModelVersion(
                name=manifest.name,
                version=manifest.version,
                sha256=digest.sha256,
                size=digest.size,
                path=str(target),
                manifest=manifest.model_dump(mode="json", by_alias=True),
            )
            s.add(row)
            s.flush()
            # Listed in TUF last: a device can only ever be offered what the registry holds.
            self.tuf.add_target(
                target,
                archive_target_name(manifest.name, manifest.version),
                {
                    "model": manifest.name,
                    "version": manifest.version,
                    "format": "package-tar",
                    "manifest_sha256": manifest_digest,
                },
            )
            return self._model_view(row)

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
        """Sign an offer of `model_name` v`version` for each device and publish it."""
        if not device_ids:
            raise InvalidRequest("name at least one device")
        with self.sessions() as s:
            model = s.scalars(
                select(ModelVersion).where(ModelVersion.name == model_name, ModelVersion.version == version)
            ).first()
            if model is None:
                raise NotFound(f"model {model_name} v{version} is not registered; push it first")
            bases: dict[str, ModelVersion | None] = {}
            for device_id in device_ids:
                device = s.get(Device, device_id)
                if device is None:
                    raise NotFound(f"no device {device_id!r}")
                bases[device_id] = self._delta_base(s, device, model)
            s.expunge_all()
        deltas: dict[int, DeltaPayload | None] = {}
        for base_version, base_row in {b.version: b for b in bases.values() if b is not None}.items():
            deltas[base_version] = await asyncio.to_thread(self._delta_payload, base_row, model)
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
        for update in created:
            await self._send_offer(update)
        with self.sessions() as s:
            return [self._update_view(s, s.get(Update, u.id)) for u in created]  # type: ignore[arg-type]

    @staticmethod
    def _delta_base(s: Session, device: Device, model: ModelVersion) -> ModelVersion | None:
        """The registered version this device last reported running, when a delta from it makes sense."""
        reported = (device.last_health or {}).get("models", [])
        running = next((m.get("version") for m in reported if m.get("name") == model.name), None)
        if not isinstance(running, int) or running >= model.version:
            return None
        return s.scalars(
            select(ModelVersion).where(ModelVersion.name == model.name, ModelVersion.version == running)
        ).first()

    def _delta_payload(self, base: ModelVersion, model: ModelVersion) -> DeltaPayload | None:
        """The package delta from `base` to `model`, or None when it would not save bytes or fails."""
        try:
            artifact = package_delta(
                self.data.artifacts,
                model.name,
                base.version,
                Path(base.path),
                model.version,
                Path(model.path),
            )
        except ModelError as e:
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
        listed = self.tuf.target(name)
        if listed is not None and listed.hashes.get("sha256") == artifact.sha256:
            return
        self.tuf.add_target(
            Path(model.path),
            archive_target_name(model.name, model.version),
            {
                "model": model.name,
                "version": model.version,
                "format": "package-tar",
                "manifest_sha256": artifact.manifest_sha256,
            },
            deltas={artifact.base_version: artifact.path},
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
        for update in created:
            await self._send_offer(update)
        with self.sessions() as s:
            return [self._update_view(s, s.get(Update, u.id)) for u in created]  # type: ignore[arg-type]

    async def _send_offer(self, update: Update) -> None:
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
        offer = offer.model_copy(update={"switch_windows": self.switch_windows(update.device_id)})
        topic = topics.device_topic(update.device_id, topics.CMD_UPDATE)
        await self.publish(topic, encode(offer), 1)

    def switch_windows(self, device_id: str) -> list[tuple[float, float]]:
        """When the device may switch models: its groups' next maintenance windows; [] = any time."""
        with self.sessions() as s:
            spans = maintenance.upcoming_windows(s, device_id, self.clock(), count=SWITCH_WINDOWS_AHEAD)
        return spans or []

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
        with self.sessions.begin() as s:
            device = s.get(Device, device_id)
            if device is None:
                return
            device.online = state.online
            device.last_seen = time.time()
            device.agent_version = state.agent_version
            if state.public_key and device.public_key is None and _is_ed25519_pem(state.public_key):
                device.public_key = state.public_key  # pinned: a later, different key is not accepted
            elif state.public_key and state.public_key != device.public_key:
                log.warning("device %s presented a different public key; keeping the pinned one", device_id)
            open_updates = list(
                s.scalars(
                    select(Update).where(Update.device_id == device_id, Update.state.not_in(FINAL_STATES))
                )
            )
        if state.online:
            # Offers made while the device was away, and updates whose end it may not have reported:
            # the device starts a new offer, or re-reports what its journal says about an old one.
            for update in open_updates:
                await self._send_offer(update)

    def on_health(self, device_id: str, health: Health) -> None:
        with self.sessions.begin() as s:
            device = s.get(Device, device_id)
            if device is None:
                return
            device.last_seen = time.time()
            if health.seq > device.health_seq or health.seq == 0:
                device.health_seq = health.seq
                device.last_health = health.model_dump(mode="json")

    def on_update_status(self, device_id: str, status: UpdateStatus) -> None:
        """Record a device's report on its own update; the update's state stops moving once final."""
        with self.sessions.begin() as s:
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

    def chunk_for(self, device_id: str, request: ChunkRequest) -> bytes | None:
        """The frame answering a chunk request, read from the artifact; None for a request not allowed."""
        with self.sessions() as s:
            update = s.get(Update, request.update_id)
            if update is None or update.device_id != device_id or "update" not in update.offer:
                return None
            model = s.get(ModelVersion, update.model_version_id)
            assert model is not None
            delta = update.offer.get("update", {}).get("delta")
        if request.payload == "delta":
            if not delta:
                return None
            path = delta_path(self.data.artifacts, model.name, delta["base_version"], model.version)
            total = int(delta["size"])
        else:
            path, total = Path(model.path), model.size
        if request.offset >= total:
            return None
        with open(path, "rb") as f:
            f.seek(request.offset)
            data = f.read(min(request.length, total - request.offset))
        return encode_chunk(Chunk(update_id=request.update_id, offset=request.offset, total=total, data=data))
