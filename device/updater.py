"""Runs one update at a time through the state machine, journaling each state before acting on it.

The order of checks is the security argument: the fleet's TUF metadata (signatures, thresholds,
expiry, rollback) and the version are checked before a byte is downloaded, the payload's sha256
(the one the signed targets name) before it is unpacked, the package's own hashes while it is
unpacked, and the golden vectors before the switch. The active slot is never written.

After the proof the switch waits for a maintenance window and an idle line (device/switch_gate.py);
after it, probation (device/probation.py) watches the new model and rolls it back by itself. What
happens at boot (crash-looping models, interrupted updates) is in device/update_boot.py, rollbacks
asked for by the fleet or a field engineer in device/rollback.py, the resumable download in
device/download.py.
"""

import asyncio
import contextlib
import errno
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from device import rollback
from device.atomic import write_json_atomic
from device.download import CHUNK_ATTEMPTS, CHUNK_TIMEOUT_S, PayloadDownload, verify_payload
from device.engine.engine import Engine, ServingModel
from device.errors import DeviceError, UpdateRejected
from device.line import LineState
from device.probation import Probation
from device.shadow import ShadowConfig, ShadowGate, ShadowHub
from device.slots import ModelSlots
from device.switch_gate import switch_wait
from device.transport import FleetTransport
from device.tuf_client import TufClient
from device.update_boot import MAX_FAILED_STARTS, count_crashed_start
from device.update_machine import Event, next_state
from device.update_record import UpdateRecord
from models.errors import ModelError
from models.manifest import Manifest
from models.package import verify_package
from models.package_delta import apply_package_delta, manifest_sha256
from protocol.messages import (
    DeltaPayload,
    UpdateMetadata,
    UpdateOffer,
    UpdateState,
    UpdateStatus,
)
from protocol.targets import archive_target_name, delta_target_name

__all__ = ["CHUNK_ATTEMPTS", "CHUNK_TIMEOUT_S", "UpdateRecord", "Updater"]

log = logging.getLogger(__name__)
# Restarts while verifying or applying that go back to the download before the update fails.
MAX_RESUMES = 3
DISK_HEADROOM_BYTES = 32 * 1024 * 1024
SWITCH_POLL_S = 0.1  # how soon a switch follows the line going idle or a window opening
RETIRE_GRACE_S = 5.0  # a replaced model stays open this long for a pipeline call still inside it
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def failure_reason(state: UpdateState, e: BaseException) -> str:
    """The reason reported for a failure; a full disk is named as such, wherever it was raised."""
    cause: BaseException | None = e
    for _ in range(10):  # a chain of causes is short; the bound guards against a cycle
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            return (
                f"disk full while {state.value} ({cause.strerror}); old model kept, "
                "partial files and the download removed: free space on the data disk and offer again"
            )
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, DeviceError | ModelError | TimeoutError):
        return str(e)
    return f"{type(e).__name__}: {e}"


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
        line: LineState | None = None,
        shadow: ShadowConfig | None = None,
        shadow_hub: ShadowHub | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.models_dir = data_dir / "models"
        self.download = PayloadDownload(data_dir / "downloads", transport)
        self.journal_path = data_dir / "update-journal.json"
        self.engine = engine
        self.transport = transport
        self.tuf = tuf
        self.probation_s = probation_s
        self.probation_max_error_rate = probation_max_error_rate
        self.line = line
        self.shadow = shadow or ShadowConfig()
        self.shadow_hub = shadow_hub  # None: no shadow runs (nothing feeds live inputs to compare)
        self.clock = clock
        self.record: UpdateRecord | None = self._read_journal()
        self.probations: dict[str, Probation] = {}
        self.unreported = False  # the boot changed the record; recover() tells the fleet
        self.lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    # -- journal ---------------------------------------------------------------------------
    def _read_journal(self) -> UpdateRecord | None:
        if not self.journal_path.exists():
            return None
        return UpdateRecord.from_json(json.loads(self.journal_path.read_text()))

    def write_journal(self, record: UpdateRecord) -> None:
        write_json_atomic(self.journal_path, record.to_json())

    async def journal(self, record: UpdateRecord) -> None:
        await asyncio.to_thread(self.write_journal, record)

    async def step(self, record: UpdateRecord, event: Event, reason: str = "", **detail: Any) -> None:
        """Journal the next state (atomically, before its side effects) and report it to the fleet."""
        record.state = next_state(record.state, event)
        record.reason = reason
        record.waiting_for = None
        record.history.append({"state": record.state.value, "ts": time.time(), "reason": reason})
        await self.journal(record)
        log.info("update %s: %s %s", record.update_id, record.state.value, reason)
        await self.report(record, **detail)

    async def report(self, record: UpdateRecord, **detail: Any) -> UpdateStatus:
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
        await self.publish(status)
        return status

    async def publish(self, status: UpdateStatus) -> None:
        try:
            await self.transport.publish_update_status(status)
        except Exception as e:  # the journal is the truth; the fleet also sees the state in health
            log.warning("could not report %s to the fleet: %s", status.state.value, e)

    @property
    def state(self) -> UpdateState:
        return self.record.state if self.record else UpdateState.IDLE

    @property
    def busy(self) -> bool:
        """An update holds the slots (from the offer until its verdict)."""
        return self.lock.locked()

    def slots_of(self, model_name: str) -> ModelSlots:
        return ModelSlots(self.models_dir / model_name)

    # -- recovery --------------------------------------------------------------------------
    def repair_slots_at_boot(self, model_name: str) -> bool:
        """Before anything loads: finish a rollback journaled before its link moved; True if it moved."""
        record = self.record
        if record is None or record.update.model_name != model_name:
            return False
        if not (record.previous_slot and record.target_slot and record.state is UpdateState.ROLLED_BACK):
            return False
        slots = self.slots_of(model_name)
        if slots.active_slot() != record.target_slot:
            return False
        log.warning(
            "update %s: moving %s back to slot %s", record.update_id, model_name, record.previous_slot
        )
        slots.activate(record.previous_slot)
        return True

    async def recover(self) -> None:
        """After a restart: report what the boot decided, then finish or undo what the journal says.

        Holds the update lock, so an offer that arrives meanwhile waits instead of writing a slot
        a rollback may need.
        """
        async with self.lock:
            count_crashed_start(self)
            record = self.record
            if record is None:
                return
            if self.unreported:
                self.unreported = False
                await self.report(record)
            if record.state.is_final:
                return
            slots = self.slots_of(record.update.model_name)
            if record.state is UpdateState.PROBATION and slots.active_slot() == record.target_slot:
                log.info("update %s: restarted during probation, resuming it", record.update_id)
                async with self._probation_of(record) as probation:
                    await self._probation(record, slots, None, probation)
                return
            if record.state is UpdateState.OFFERED:
                # Died between journaling the verified offer and starting its download.
                log.info("update %s: restarted before its download began; starting it", record.update_id)
                await self.step(record, Event.ACCEPT)
            checking = record.state in (UpdateState.VERIFYING, UpdateState.APPLYING)
            if checking and record.resumes < MAX_RESUMES:
                # The payload on disk is checked again and the inactive slot rewritten from scratch:
                # a power cut is not the update's fault (the soak's 5 failures in 200 were these).
                record.resumes += 1
                log.info(
                    "update %s: restarted while %s (%d of %d); checking the payload again",
                    record.update_id,
                    record.state.value,
                    record.resumes,
                    MAX_RESUMES,
                )
                await self.step(record, Event.RESUME)
            if record.state is UpdateState.DOWNLOADING:
                # Nothing is written outside downloads/ yet; the verified part of the file is kept.
                log.info("update %s: restarted while downloading, resuming", record.update_id)
                offer = UpdateOffer(update=record.update, chunk_size=record.chunk_size)
                candidate = await self._stage(record, slots, offer)
                if candidate is not None:
                    await self._switch_when_allowed(record, slots, candidate)
                return
            if record.state is UpdateState.STAGED and record.target_slot is not None:
                # Died between writing the slot and journaling its test: the slot is whole.
                record.loading = True
                await self.step(record, Event.LOADED)
            # A restart while testing (loading, golden vectors, waiting to switch) proves the staged,
            # re-verified slot again: a power cut is not the model's fault. A model that kills the
            # agent while loading counts a failed start each time (update_boot) and fails at the third.
            testing = record.state is UpdateState.TESTING and record.target_slot is not None
            if testing and record.failed_starts < MAX_FAILED_STARTS:
                log.info(
                    "update %s: restarted while testing (%d failed start(s)); proving it again",
                    record.update_id,
                    record.failed_starts,
                )
                candidate = await self._prove_staged(record, slots)
                if candidate is not None:
                    await self._switch_when_allowed(record, slots, candidate)
                return
            if record.state is UpdateState.PROBATION:
                # Journaled the switch but the link never moved (or was moved back): the old slot is active.
                record.state = UpdateState.TESTING
            reason = f"agent restarted during {record.state.value}"
            if checking:
                reason += f" {record.resumes + 1} times (the payload may crash the agent)"
            if record.failed_starts:
                reason += (
                    f", while loading v{record.update.version} ({record.failed_starts} failed start(s) "
                    "in a row: it may crash the runtime)"
                )
            await self._fail_before_switch(record, slots, reason + "; old model kept")

    # -- the update ------------------------------------------------------------------------
    async def handle_offer(self, offer: UpdateOffer) -> None:
        meta = offer.update
        if self.record and self.record.update_id == meta.update_id:  # answered even while one waits
            await self._repeated_offer(self.record, offer)
            return
        async with self.lock:
            if self.record and self.record.update_id == meta.update_id:  # it came twice while we waited
                await self._repeated_offer(self.record, offer)
                return
            try:
                slots = self._check_offer(meta)
                verified = await asyncio.to_thread(self._verify_with_tuf, meta)
                self._check_disk(verified)
            except UpdateRejected as e:
                # A refused offer never becomes this device's update: the journal keeps the last one.
                refused = UpdateRecord(update=meta, state=UpdateState.FAILED, reason=str(e))
                log.warning("update %s refused: %s", meta.update_id, e)
                await self.report(refused)
                return
            offer = offer.model_copy(update={"update": verified})
            record = UpdateRecord(
                update=verified, chunk_size=offer.chunk_size, switch_windows=list(offer.switch_windows)
            )
            self.record = record
            await self.step(record, Event.OFFER)
            await self.step(record, Event.ACCEPT)
            candidate = await self._stage(record, slots, offer)
            if candidate is not None:
                await self._switch_when_allowed(record, slots, candidate)

    async def _repeated_offer(self, record: UpdateRecord, offer: UpdateOffer) -> None:
        """The fleet sent the offer again (reconnect, new windows): take its windows, say where it is."""
        log.info("offer %s repeated; it is %s", record.update_id, record.state.value)
        if not record.state.is_final and offer.switch_windows != record.switch_windows:
            record.switch_windows = list(offer.switch_windows)
            await self.journal(record)
        await self.report(record, **(record.waiting_for or {}))

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
            payload = await self.download.fetch(record.update_id, offer.chunk_size, kind, size)
            await self.step(record, Event.DOWNLOADED, payload=kind, bytes=size)
            await asyncio.to_thread(verify_payload, payload, size, sha256)
            await self.step(record, Event.VERIFIED)
            record.target_slot = slots.inactive_slot()
            record.previous_slot = slots.active_slot()
            if delta is not None:
                manifest = await asyncio.to_thread(
                    self._apply_delta, slots, record.target_slot, payload, delta.manifest_sha256
                )
            else:
                manifest = await asyncio.to_thread(slots.unpack_into, record.target_slot, payload)
            self._check_package(record, manifest)
            await self.step(record, Event.APPLIED, slot=record.target_slot)
            record.loading = True  # journaled with `testing`: dying from here on counts against the model
            await self.step(record, Event.LOADED)
            return await self._prove(record, slots, manifest)
        except Exception as e:  # any failure before the switch leaves the active slot untouched
            await self._fail_before_switch(record, slots, failure_reason(record.state, e))
            return None

    @staticmethod
    def _check_package(record: UpdateRecord, manifest: Manifest) -> None:
        meta = record.update
        if (manifest.name, manifest.version) != (meta.model_name, meta.version):
            raise UpdateRejected(
                f"package holds {manifest.name} v{manifest.version}, "
                f"the signed metadata says {meta.model_name} v{meta.version}"
            )

    async def _prove(self, record: UpdateRecord, slots: ModelSlots, manifest: Manifest) -> ServingModel:
        """Load the target slot's model and run its golden vectors, with the failed-start bookkeeping."""
        assert record.target_slot is not None
        if not record.loading:
            record.loading = True
            await self.journal(record)
        candidate = await asyncio.to_thread(self.engine.prepare, slots.slot_dir(record.target_slot), manifest)
        record.loading = False
        record.failed_starts = 0
        await self.journal(record)
        return candidate

    async def _prove_staged(self, record: UpdateRecord, slots: ModelSlots) -> ServingModel | None:
        """After a restart: verify the staged slot again and prove its model; None when it failed."""
        assert record.target_slot is not None
        try:
            manifest = await asyncio.to_thread(verify_package, slots.slot_dir(record.target_slot))
            self._check_package(record, manifest)
            return await self._prove(record, slots, manifest)
        except Exception as e:
            await self._fail_before_switch(record, slots, failure_reason(record.state, e))
            return None

    async def _fail_before_switch(self, record: UpdateRecord, slots: ModelSlots, reason: str) -> None:
        """End an update that never switched: free what it wrote (the disk may be full), then journal."""
        record.loading = False
        self.download.discard(record.update_id)
        target = record.target_slot
        if target is not None and slots.exists() and target != slots.active_slot():
            try:
                await asyncio.to_thread(slots.clear, target)
            except OSError as e:
                log.error("could not clear slot %s after a failed update: %s", target, e)
        await self.step(record, Event.FAIL, reason)

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
        return apply_package_delta(payload, slots.active_dir(), slots.clear(slot), manifest_sha)

    def _check_offer(self, meta: UpdateMetadata) -> ModelSlots:
        """What needs no network: the model is installed here and the offer is newer."""
        slots = self.slots_of(meta.model_name)
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

    # -- the switch ------------------------------------------------------------------------
    async def _switch_when_allowed(
        self, record: UpdateRecord, slots: ModelSlots, candidate: ServingModel
    ) -> None:
        try:
            await self._wait_for_switch(record)
        except UpdateRejected as e:  # every window has ended
            candidate.model.close()
            await self._fail_before_switch(record, slots, str(e))
            return
        try:
            await self._switch(record, slots, candidate)
        except Exception as e:  # anything after the switch must put the old slot back
            log.exception("update %s failed after the switch", record.update_id)
            if record.state is UpdateState.PROBATION:
                await self._roll_back(record, slots, None, f"failed after the switch: {e}")

    async def _wait_for_switch(self, record: UpdateRecord) -> None:
        """Hold the proven model until a window is open and the line idle; journaled: a restart waits too."""
        shown: dict[str, Any] | None = None
        while (wait := switch_wait(record.switch_windows, self.line, self.clock())) is not None:
            detail = wait.detail()
            if detail != shown:
                record.waiting_for = detail
                record.history.append({"state": record.state.value, "ts": time.time(), **detail})
                await self.journal(record)
                log.info("update %s: proven, waiting for %s", record.update_id, wait.waiting_for)
                await self.report(record, **detail)
                shown = detail
            await asyncio.sleep(SWITCH_POLL_S)

    async def _switch(self, record: UpdateRecord, slots: ModelSlots, candidate: ServingModel) -> None:
        assert record.target_slot is not None
        async with self._probation_of(record) as probation:
            await self.step(
                record, Event.SWITCHED, golden_p95_ms=candidate.golden_p95_ms, backend=candidate.backend
            )
            await asyncio.to_thread(slots.activate, record.target_slot)
            previous = self.engine.serve(candidate)
            await self._probation(record, slots, previous, probation)

    # -- probation -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _probation_of(self, record: UpdateRecord) -> AsyncIterator[Probation]:
        """Registered before the switch is journaled, so a rollback asked for from then on ends it."""
        name = record.update.model_name
        probation = Probation(self.engine, name, self.probation_s, self.probation_max_error_rate)
        self.probations[name] = probation
        try:
            yield probation
        finally:
            await self._detach_shadow(name)
            self.probations.pop(name, None)
            probation.finished.set()

    async def _probation(
        self,
        record: UpdateRecord,
        slots: ModelSlots,
        previous: ServingModel | None,
        probation: Probation,
    ) -> None:
        """Watch the new model on live traffic (and in shadow); commit it, or roll back by itself."""
        name = record.update.model_name
        if previous is None and self.shadow_hub is not None:
            previous = await self._load_previous(record, slots)
        if self.shadow_hub is not None and previous is not None:
            probation.gate = ShadowGate(self.engine.get(name), previous, self.shadow)
            self.shadow_hub.attach(name, probation.gate)

        async def progress(detail: dict[str, Any]) -> None:
            await self.report(record, **detail)

        probation.on_progress = progress
        verdict = await probation.run()
        await self._detach_shadow(name)  # before `previous` may be closed
        if verdict.reason is not None:
            await self._roll_back(record, slots, previous, verdict.reason, **verdict.detail)
            return
        await self.step(record, Event.HEALTHY, **verdict.detail)
        self.download.discard(record.update_id)
        if previous is not None:
            previous.model.close()

    async def _detach_shadow(self, name: str) -> None:
        if self.shadow_hub is not None:
            await asyncio.to_thread(self.shadow_hub.detach, name)  # waits for a shadow run in flight

    async def _load_previous(self, record: UpdateRecord, slots: ModelSlots) -> ServingModel | None:
        """After a restart in probation: the previous model, for the shadow runs and a quick rollback."""
        assert record.previous_slot is not None
        folder = slots.slot_dir(record.previous_slot)
        try:
            manifest = await asyncio.to_thread(verify_package, folder)
            return await asyncio.to_thread(self.engine.prepare, folder, manifest)
        except (DeviceError, ModelError) as e:
            log.error("previous slot %s cannot be loaded for the shadow runs: %s", record.previous_slot, e)
            return None

    async def _roll_back(
        self,
        record: UpdateRecord,
        slots: ModelSlots,
        previous: ServingModel | None,
        reason: str,
        **detail: Any,
    ) -> None:
        assert record.previous_slot is not None
        # Journal first: after a crash from here on, recovery sees the old slot active or moves it back.
        await self.step(record, Event.ROLL_BACK, reason, **detail)
        await asyncio.to_thread(slots.activate, record.previous_slot)
        if previous is None:
            previous = await asyncio.to_thread(
                self.engine.prepare, slots.active_dir(), slots.active_manifest()
            )
        failed = self.engine.serve(previous)
        if failed is not None and failed is not previous:
            self.retire(failed)

    def retire(self, serving: ServingModel) -> None:
        """Close a model no longer served, after a pipeline or API call still inside it has returned."""

        async def close_later() -> None:
            try:
                await asyncio.sleep(RETIRE_GRACE_S)
            finally:  # also when the agent stops first
                serving.model.close()

        task = asyncio.ensure_future(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- rollbacks on command (device/rollback.py) ------------------------------------------
    async def roll_back(self, model_name: str, to_version: int, reason: str, request_id: str) -> UpdateStatus:
        """Serve `to_version` again from the other slot; the status is reported under `request_id`."""
        return await rollback.roll_back(self, model_name, to_version, reason, request_id)
