"""Runs one update at a time through the state machine, journaling each state before acting on it.

The order of checks is the security argument: the fleet's TUF metadata (signatures, thresholds,
expiry, rollback) and the version are checked before a byte is downloaded, the payload's sha256
(the one the signed targets name) before it is unpacked, the package's own hashes while it is
unpacked, and the golden vectors before the switch. The active slot is never written.
"""

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.atomic import write_json_atomic
from device.engine.engine import Engine, ServingModel
from device.errors import DeviceError, UpdateRejected
from device.slots import ModelSlots
from device.transport import FleetTransport
from device.tuf_client import TufClient
from device.update_machine import Event, next_state
from models.errors import ModelError
from models.manifest import Manifest
from models.package_delta import apply_package_delta, manifest_sha256
from protocol.frames import Chunk
from protocol.messages import (
    DeltaPayload,
    UpdateMetadata,
    UpdateOffer,
    UpdateState,
    UpdateStatus,
)
from protocol.targets import archive_target_name, delta_target_name

log = logging.getLogger(__name__)
CHUNK_TIMEOUT_S = 10.0
CHUNK_ATTEMPTS = 5
DISK_HEADROOM_BYTES = 32 * 1024 * 1024


@dataclass
class UpdateRecord:
    update: UpdateMetadata  # as verified against the fleet's TUF targets
    state: UpdateState = UpdateState.IDLE
    reason: str = ""
    target_slot: str | None = None
    previous_slot: str | None = None
    chunk_size: int = 256 * 1024
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def update_id(self) -> str:
        return self.update.update_id

    def to_json(self) -> dict[str, Any]:
        return {
            "update": self.update.model_dump(mode="json"),
            "state": self.state.value,
            "reason": self.reason,
            "target_slot": self.target_slot,
            "previous_slot": self.previous_slot,
            "chunk_size": self.chunk_size,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UpdateRecord":
        return cls(
            # Journals written before TUF wrapped the metadata with its signature.
            update=UpdateMetadata.model_validate(data["update"].get("metadata", data["update"])),
            state=UpdateState(data["state"]),
            reason=data.get("reason", ""),
            target_slot=data.get("target_slot"),
            previous_slot=data.get("previous_slot"),
            chunk_size=int(data.get("chunk_size", 256 * 1024)),
            history=list(data.get("history", [])),
        )


class Updater:
    def __init__(
        self,
        device_id: str,
        data_dir: Path,
        engine: Engine,
        transport: FleetTransport,
        tuf: TufClient,
        probation_s: float = 30.0,
        probation_max_error_rate: float = 0.2,
    ) -> None:
        self.device_id = device_id
        self.models_dir = data_dir / "models"
        self.downloads = data_dir / "downloads"
        self.journal_path = data_dir / "update-journal.json"
        self.engine = engine
        self.transport = transport
        self.tuf = tuf
        self.probation_s = probation_s
        self.probation_max_error_rate = probation_max_error_rate
        self.record: UpdateRecord | None = self._read_journal()
        self._lock = asyncio.Lock()

    # -- journal ---------------------------------------------------------------------------
    def _read_journal(self) -> UpdateRecord | None:
        if not self.journal_path.exists():
            return None
        return UpdateRecord.from_json(json.loads(self.journal_path.read_text()))

    async def _step(self, record: UpdateRecord, event: Event, reason: str = "", **detail: Any) -> None:
        """Journal the next state (atomically, before its side effects) and report it to the fleet."""
        record.state = next_state(record.state, event)
        record.reason = reason
        record.history.append({"state": record.state.value, "ts": time.time(), "reason": reason})
        await asyncio.to_thread(write_json_atomic, self.journal_path, record.to_json())
        log.info("update %s: %s %s", record.update_id, record.state.value, reason)
        await self._report(record, **detail)

    async def _report(self, record: UpdateRecord, **detail: Any) -> None:
        meta = record.update
        status = UpdateStatus(
            device_id=self.device_id,
            update_id=meta.update_id,
            model_name=meta.model_name,
            version=meta.version,
            state=record.state,
            reason=record.reason,
            detail=detail,
        )
        try:
            await self.transport.publish_update_status(status)
        except Exception as e:  # the journal is the truth; the fleet also sees the state in health
            log.warning("could not report %s to the fleet: %s", record.state.value, e)

    @property
    def state(self) -> UpdateState:
        return self.record.state if self.record else UpdateState.IDLE

    # -- recovery --------------------------------------------------------------------------
    def repair_slots_at_boot(self, model_name: str, active_is_broken: bool) -> bool:
        """Before anything loads: put the previous slot back where the journal says it must be.

        That is after a crash between journaling a rollback and moving the link, and when the active
        slot fails verification right after a switch (a power cut before its files reached the disk).
        Returns whether the link was moved.
        """
        record = self.record
        if record is None or record.update.model_name != model_name:
            return False
        if not (record.previous_slot and record.target_slot):
            return False
        slots = ModelSlots(self.models_dir / model_name)
        rolling_back = record.state is UpdateState.ROLLED_BACK
        in_probation = record.state is UpdateState.PROBATION and active_is_broken
        if (rolling_back or in_probation) and slots.active_slot() == record.target_slot:
            log.warning(
                "update %s: moving %s back to slot %s", record.update_id, model_name, record.previous_slot
            )
            slots.activate(record.previous_slot)
            return True
        return False

    async def recover(self) -> None:
        """After a restart: finish or undo whatever the journal says was under way.

        Holds the update lock, so an offer that arrives meanwhile waits instead of writing a slot
        a rollback may need.
        """
        async with self._lock:
            record = self.record
            if record is None or record.state.is_final:
                return
            slots = ModelSlots(self.models_dir / record.update.model_name)
            if record.state is UpdateState.PROBATION and slots.active_slot() == record.target_slot:
                log.info("update %s: restarted during probation, resuming it", record.update_id)
                await self._probation(record, slots, previous=None)
                return
            if record.state is UpdateState.DOWNLOADING:
                # Nothing is written outside downloads/ yet; the verified part of the file is kept.
                log.info("update %s: restarted while downloading, resuming", record.update_id)
                offer = UpdateOffer(update=record.update, chunk_size=record.chunk_size)
                candidate = await self._stage(record, slots, offer)
                if candidate is not None:
                    await self._switch_or_roll_back(record, slots, candidate)
                return
            if record.state is UpdateState.PROBATION:
                # Journaled the switch but the link never moved (or was moved back): the old slot is active.
                record.state = UpdateState.TESTING
            self._discard_download(record.update_id)
            await self._step(
                record, Event.FAIL, f"agent restarted during {record.state.value}; old model kept"
            )

    # -- the update ------------------------------------------------------------------------
    async def handle_offer(self, offer: UpdateOffer) -> None:
        meta = offer.update
        async with self._lock:
            if self.record and self.record.update_id == meta.update_id:
                log.info("offer %s repeated; it is %s", meta.update_id, self.record.state.value)
                await self._report(self.record)  # so the fleet converges on what the journal says
                return
            try:
                slots = self._check_offer(meta)
                verified = await asyncio.to_thread(self._verify_with_tuf, meta)
                self._check_disk(verified)
            except UpdateRejected as e:
                # A refused offer never becomes this device's update: the journal keeps the last one.
                refused = UpdateRecord(update=meta, state=UpdateState.FAILED, reason=str(e))
                log.warning("update %s refused: %s", meta.update_id, e)
                await self._report(refused)
                return
            offer = offer.model_copy(update={"update": verified})
            record = UpdateRecord(update=verified, chunk_size=offer.chunk_size)
            self.record = record
            await self._step(record, Event.OFFER)
            await self._step(record, Event.ACCEPT)
            candidate = await self._stage(record, slots, offer)
            if candidate is not None:
                await self._switch_or_roll_back(record, slots, candidate)

    async def _switch_or_roll_back(
        self, record: UpdateRecord, slots: ModelSlots, candidate: ServingModel
    ) -> None:
        try:
            await self._switch(record, slots, candidate)
        except Exception as e:  # anything after the switch must put the old slot back
            log.exception("update %s failed after the switch", record.update_id)
            if record.state is UpdateState.PROBATION:
                candidate.model.close()
                await self._roll_back(record, slots, None, f"failed after the switch: {e}")

    async def _stage(
        self, record: UpdateRecord, slots: ModelSlots, offer: UpdateOffer
    ) -> ServingModel | None:
        """Download, verify, unpack into the inactive slot and prove the model. None when it failed."""
        meta = offer.update
        try:
            delta = await asyncio.to_thread(self._usable_delta, meta, slots)
            kind, size, sha256 = (
                ("delta", delta.size, delta.sha256) if delta else ("package", meta.size, meta.sha256)
            )
            payload = await self._download(record, offer.chunk_size, kind, size)
            await self._step(record, Event.DOWNLOADED, payload=kind, bytes=size)
            await asyncio.to_thread(self._verify_payload, payload, size, sha256)
            await self._step(record, Event.VERIFIED)
            record.target_slot = slots.inactive_slot()
            record.previous_slot = slots.active_slot()
            if delta is not None:
                manifest = await asyncio.to_thread(
                    self._apply_delta, slots, record.target_slot, payload, delta.manifest_sha256
                )
            else:
                manifest = await asyncio.to_thread(slots.unpack_into, record.target_slot, payload)
            if (manifest.name, manifest.version) != (meta.model_name, meta.version):
                raise UpdateRejected(
                    f"package holds {manifest.name} v{manifest.version}, "
                    f"the signed metadata says {meta.model_name} v{meta.version}"
                )
            await self._step(record, Event.APPLIED, slot=record.target_slot)
            await self._step(record, Event.LOADED)
            return await asyncio.to_thread(self.engine.prepare, slots.slot_dir(record.target_slot), manifest)
        except Exception as e:  # any failure before the switch leaves the active slot untouched
            reason = (
                str(e)
                if isinstance(e, DeviceError | ModelError | TimeoutError)
                else f"{type(e).__name__}: {e}"
            )
            await self._step(record, Event.FAIL, reason)
            self._discard_download(meta.update_id)
            return None

    @staticmethod
    def _usable_delta(meta: UpdateMetadata, slots: ModelSlots) -> DeltaPayload | None:
        """The offer's delta, when it was built against exactly the package this device runs."""
        if meta.delta is None:
            return None
        if manifest_sha256(slots.active_dir()) != meta.delta.base_manifest_sha256:
            log.info(
                "update %s: its delta is for another base (v%d); fetching the whole package",
                meta.update_id,
                meta.delta.base_version,
            )
            return None
        return meta.delta

    @staticmethod
    def _apply_delta(slots: ModelSlots, slot: str, payload: Path, manifest_sha: str) -> Manifest:
        """Rebuild the new package into the inactive slot from the active one and the delta."""
        try:
            return apply_package_delta(payload, slots.active_dir(), slots.clear(slot), manifest_sha)
        except Exception:
            slots.clear(slot)  # no half-written package is left behind, even in the inactive slot
            raise

    def _check_offer(self, meta: UpdateMetadata) -> ModelSlots:
        """What needs no network: the model is installed here and the offer is newer."""
        slots = ModelSlots(self.models_dir / meta.model_name)
        if not slots.exists():
            raise UpdateRejected(f"model {meta.model_name!r} is not installed on this device")
        installed = slots.active_manifest().version
        if meta.version <= installed:
            raise UpdateRejected(f"version {meta.version} is not newer than the installed {installed}")
        return slots

    def _verify_with_tuf(self, meta: UpdateMetadata) -> UpdateMetadata:
        """Refresh the fleet's TUF metadata and hold the offer to it; returns what may be used.

        The offer itself is unsigned: every size and hash the updater will check later must be the
        one the signed targets name. A delta the targets do not list is dropped (the whole package
        is fetched instead); one they list with other bytes refuses the offer.
        """
        package_name = archive_target_name(meta.model_name, meta.version)
        try:
            self.tuf.refresh()
            package = self.tuf.target_info(package_name)
            delta_name = (
                delta_target_name(meta.model_name, meta.delta.base_version, meta.version)
                if meta.delta
                else ""
            )
            delta = self.tuf.target_info(delta_name) if meta.delta else None
        except DeviceError as e:  # refused, expired or unreachable metadata, or no trusted root
            raise UpdateRejected(f"signed metadata: {e}") from e
        if package is None:
            raise UpdateRejected(f"{package_name} is not in the fleet's signed targets; refused")
        if package.length != meta.size or package.hashes.get("sha256") != meta.sha256:
            raise UpdateRejected(f"the offer's size or sha256 differs from the signed target {package_name}")
        if meta.delta is None:
            return meta
        if delta is None:
            log.warning("update %s: %s is not signed; fetching the whole package", meta.update_id, delta_name)
            return meta.model_copy(update={"delta": None})
        signed = (
            delta.length,
            delta.hashes.get("sha256"),
            delta.custom.get("base_manifest_sha256"),
            delta.custom.get("manifest_sha256"),
        )
        offered = (
            meta.delta.size,
            meta.delta.sha256,
            meta.delta.base_manifest_sha256,
            meta.delta.manifest_sha256,
        )
        if signed != offered:
            raise UpdateRejected(f"the offer's delta differs from the signed target {delta_name}; refused")
        return meta

    def _check_disk(self, meta: UpdateMetadata) -> None:
        free = shutil.disk_usage(self.models_dir).free
        download = meta.delta.size if meta.delta else meta.size
        needed = download + 2 * meta.size + DISK_HEADROOM_BYTES  # payload, unpacked slot, slack
        if free < needed:
            raise UpdateRejected(f"not enough disk: {free} bytes free, {needed} needed")

    async def _download(self, record: UpdateRecord, chunk_size: int, kind: str, size: int) -> Path:
        """Pull the payload chunk by chunk into a .part file, each chunk checked as it arrives.

        Each chunk is on disk (fsync) before the next is asked for, so after a restart the download
        goes on from the last whole chunk; the sha256 of the whole payload is checked afterwards.
        """
        update_id = record.update_id
        self.downloads.mkdir(parents=True, exist_ok=True)
        part = self.downloads / f"{update_id}.{kind}.part"
        offset = 0
        if part.exists():
            offset = min(part.stat().st_size, size) // chunk_size * chunk_size
            if offset:
                log.info(
                    "update %s: resuming the %s download at %d of %d bytes", update_id, kind, offset, size
                )
        with part.open("r+b" if part.exists() else "wb") as out:
            out.truncate(offset)
            out.seek(offset)
            while offset < size:
                length = min(chunk_size, size - offset)
                chunk = await self._fetch_with_retries(update_id, offset, length, kind, size)
                if len(chunk.data) != length:
                    raise UpdateRejected(f"chunk at {offset} does not fit the signed size {size}")
                out.write(chunk.data)
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
                offset += length
        return part

    async def _fetch_with_retries(
        self, update_id: str, offset: int, length: int, kind: str, total: int
    ) -> Chunk:
        misfit: Chunk | None = None
        for attempt in range(1, CHUNK_ATTEMPTS + 1):
            try:
                chunk = await self.transport.fetch_chunk(update_id, offset, length, CHUNK_TIMEOUT_S, kind)
            except TimeoutError:
                log.warning("chunk %s@%d timed out (attempt %d)", update_id, offset, attempt)
                continue
            if chunk.total == total and chunk.offset == offset:
                return chunk
            # Maybe a late answer to an earlier request (another payload or offset): ask again.
            misfit = chunk
        if misfit is not None:
            raise UpdateRejected(
                f"chunk at {offset} does not fit the signed size {total}: the fleet answered "
                f"{len(misfit.data)} bytes at {misfit.offset} of {misfit.total}"
            )
        raise TimeoutError(
            f"download stalled: chunk at offset {offset} did not arrive after {CHUNK_ATTEMPTS} tries"
        )

    @staticmethod
    def _verify_payload(payload: Path, size: int, sha256: str) -> None:
        digest = hashlib.sha256()
        with payload.open("rb") as f:
            while block := f.read(1024 * 1024):
                digest.update(block)
        if payload.stat().st_size != size or digest.hexdigest() != sha256:
            payload.unlink()
            raise UpdateRejected("downloaded payload does not match the signed sha256 and size; discarded")

    def _discard_download(self, update_id: str) -> None:
        for kind in ("package", "delta"):
            (self.downloads / f"{update_id}.{kind}.part").unlink(missing_ok=True)

    async def _switch(self, record: UpdateRecord, slots: ModelSlots, candidate: ServingModel) -> None:
        assert record.target_slot is not None
        await self._step(
            record, Event.SWITCHED, golden_p95_ms=candidate.golden_p95_ms, backend=candidate.backend
        )
        await asyncio.to_thread(slots.activate, record.target_slot)
        previous = self.engine.serve(candidate)
        await self._probation(record, slots, previous)

    async def _probation(
        self, record: UpdateRecord, slots: ModelSlots, previous: ServingModel | None
    ) -> None:
        """Watch the new model on live traffic; roll back by itself if it errs too often."""
        name = record.update.model_name
        await asyncio.sleep(self.probation_s)
        stats = self.engine.get(name).stats
        attempts = stats.inferences + stats.errors
        error_rate = stats.errors / attempts if attempts else 0.0
        if error_rate > self.probation_max_error_rate:
            await self._roll_back(record, slots, previous, f"error rate {error_rate:.0%} during probation")
            return
        await self._step(record, Event.HEALTHY, inferences=stats.inferences)
        self._discard_download(record.update_id)
        if previous is not None:
            previous.model.close()

    async def _roll_back(
        self, record: UpdateRecord, slots: ModelSlots, previous: ServingModel | None, reason: str
    ) -> None:
        assert record.previous_slot is not None
        # Journal first: after a crash from here on, recovery sees the old slot active or moves it back.
        await self._step(record, Event.ROLL_BACK, reason)
        await asyncio.to_thread(slots.activate, record.previous_slot)
        if previous is None:
            previous = await asyncio.to_thread(
                self.engine.prepare, slots.active_dir(), slots.active_manifest()
            )
        failed = self.engine.serve(previous)
        if failed is not None and failed is not previous:
            failed.model.close()
