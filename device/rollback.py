"""Rollbacks asked for by the fleet (`cmd/rollback`) or a field engineer (local API).

A rollback installs nothing: it serves again the version kept in the other slot, after verifying
that slot's files and proving its model with its golden vectors like any model. It is journaled
as its own record (`rolled_back`, update id = the request id) before the link moves, so a crash
halfway is finished at boot. During a probation it ends that probation in a rollback instead.
Refused (`failed`, nothing changed): the other slot is empty or holds another version, or an update
is under way before its switch.
"""

import asyncio
import time
from typing import TYPE_CHECKING

from device.errors import DeviceError, UpdateRejected
from device.probation import Probation
from device.slots import ModelSlots
from device.update_machine import Event, next_state
from device.update_record import ROLLBACK_FORMAT, UpdateRecord
from models.errors import ModelError
from models.manifest import Manifest
from models.package import verify_package
from models.package_delta import manifest_sha256
from protocol.messages import UpdateMetadata, UpdateState, UpdateStatus

if TYPE_CHECKING:
    from device.updater import Updater


async def roll_back(
    updater: "Updater", model_name: str, to_version: int, reason: str, request_id: str
) -> UpdateStatus:
    record = updater.record
    if record is not None and record.update_id == request_id:  # the same command again
        return await updater.report(record)
    probation = updater.probations.get(model_name)
    if probation is not None:
        status = await _end_probation(updater, probation, model_name, to_version, reason, request_id)
        if status is not None:
            return status
    record = updater.record
    in_progress = record is not None and not record.state.is_final
    if updater.busy or in_progress:
        what = f"{record.update_id} ({record.state.value})" if record is not None else "an update"
        return await _refuse(
            updater,
            request_id,
            model_name,
            to_version,
            f"update {what} is in progress; roll back once it has ended",
        )
    async with updater.lock:
        slots = updater.slots_of(model_name)
        try:
            other, manifest = await asyncio.to_thread(_other_slot, slots, model_name, to_version)
            candidate = await asyncio.to_thread(updater.engine.prepare, slots.slot_dir(other), manifest)
        except (DeviceError, ModelError) as e:
            return await _refuse(updater, request_id, model_name, to_version, str(e))
        leaving = slots.active_slot()
        served = updater.engine.names()
        from_version = updater.engine.get(model_name).manifest.version if model_name in served else None
        meta = UpdateMetadata(
            update_id=request_id,
            model_name=model_name,
            version=manifest.version,
            format=ROLLBACK_FORMAT,
            sha256=manifest_sha256(slots.slot_dir(other)),
            size=max(1, sum(entry.size for entry in manifest.files.values())),
            created=time.time(),
        )
        new = UpdateRecord(update=meta, target_slot=leaving, previous_slot=other)
        new.state = next_state(new.state, Event.ROLL_BACK)
        new.reason = reason
        new.history.append({"state": new.state.value, "ts": time.time(), "reason": reason})
        updater.record = new
        await updater.journal(new)  # first: a crash before the link moves is finished at boot
        await asyncio.to_thread(slots.activate, other)
        replaced = updater.engine.serve(candidate)
        if replaced is not None:
            updater.retire(replaced)
        return await updater.report(new, from_version=from_version, from_slot=leaving, to_slot=other)


async def _end_probation(
    updater: "Updater",
    probation: Probation,
    model_name: str,
    to_version: int,
    reason: str,
    request_id: str,
) -> UpdateStatus | None:
    """Roll back the update in probation; None when its verdict came first (then roll back as usual)."""
    record = updater.record
    assert record is not None and record.previous_slot is not None
    slots = updater.slots_of(model_name)
    try:
        kept = await asyncio.to_thread(verify_package, slots.slot_dir(record.previous_slot))
    except ModelError as e:
        return await _refuse(updater, request_id, model_name, to_version, f"the previous slot fails: {e}")
    if kept.version != to_version:
        return await _refuse(
            updater,
            request_id,
            model_name,
            to_version,
            f"update {record.update_id} replaced v{kept.version}, not v{to_version}; "
            f"roll back to v{kept.version}",
        )
    if not probation.request_rollback(reason):
        return None
    await probation.finished.wait()
    if record.state is not UpdateState.ROLLED_BACK:
        return None
    status = UpdateStatus(
        device_id=updater.device_id,
        update_id=request_id,
        model_name=model_name,
        version=to_version,
        state=UpdateState.ROLLED_BACK,
        reason=record.reason,
        detail={"update_id": record.update_id, "from_version": record.update.version},
    )
    await updater.publish(status)
    return status


def _other_slot(slots: ModelSlots, model_name: str, to_version: int) -> tuple[str, Manifest]:
    if not slots.exists():
        raise UpdateRejected(f"model {model_name!r} is not installed on this device")
    other = slots.inactive_slot()
    folder = slots.slot_dir(other)
    if not (folder / "manifest.json").exists():
        raise UpdateRejected(
            f"the other slot ({other}) of {model_name} is empty: there is no previous version to go back to"
        )
    try:
        manifest = verify_package(folder)
    except ModelError as e:
        raise UpdateRejected(f"the other slot ({other}) of {model_name} fails verification: {e}") from e
    if (manifest.name, manifest.version) != (model_name, to_version):
        raise UpdateRejected(
            f"the other slot ({other}) holds {manifest.name} v{manifest.version}, not v{to_version}: "
            "a rollback only returns to the version kept there"
        )
    return other, manifest


async def _refuse(
    updater: "Updater", request_id: str, model_name: str, to_version: int, reason: str
) -> UpdateStatus:
    status = UpdateStatus(
        device_id=updater.device_id,
        update_id=request_id,
        model_name=model_name,
        version=to_version,
        state=UpdateState.FAILED,
        reason=f"rollback refused: {reason}",
    )
    await updater.publish(status)
    return status
