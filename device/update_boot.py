"""What the agent does with the update journal at boot, before any model serves.

A new model that kills the agent while it loads (a runtime crash: nothing to catch) is found here:
the journal says `loading` was under way, which counts as one failed start. After
`MAX_FAILED_STARTS` in a row in probation the agent goes back to the previous slot before loading
anything. A restart while the new model served fine (a power cut, a watchdog) finds `loading`
clear and counts nothing, so power cycles of a healthy device never roll it back.
"""

import logging
import time
from typing import TYPE_CHECKING

from device.engine.engine import Engine, ServingModel
from device.errors import EngineError, GoldenTestFailed
from device.slots import ModelSlots
from device.update_machine import Event, next_state
from device.update_record import UpdateRecord
from models.errors import ModelError
from protocol.messages import UpdateState

if TYPE_CHECKING:
    from device.updater import Updater

log = logging.getLogger(__name__)
MAX_FAILED_STARTS = 3
PROVE_ATTEMPTS = 3  # a golden run that misses its latency budget at boot may be a busy CPU, not the model
PROVE_PAUSE_S = 1.0


def count_crashed_start(updater: "Updater") -> None:
    """If the agent died while loading the update's model, count it (idempotent)."""
    record = updater.record
    if record is None or not record.loading:
        return
    record.loading = False
    record.failed_starts += 1
    note = f"failed start {record.failed_starts}: the agent died while loading v{record.update.version}"
    record.history.append({"state": record.state.value, "ts": time.time(), "reason": note})
    updater.write_journal(record)
    log.error("update %s: %s", record.update_id, note)


def load_at_boot(updater: "Updater", slots: ModelSlots) -> ServingModel:
    """Load and prove the model `slots` should serve now; roll a crash-looping new model back first.

    Blocking: runs in the agent's worker thread before the pipeline and the API start. What it
    changed in the journal is reported to the fleet by `Updater.recover()`.
    """
    count_crashed_start(updater)
    updater.repair_slots_at_boot(slots.model_name)
    record = updater.record
    in_probation = (
        record is not None
        and record.update.model_name == slots.model_name
        and record.state is UpdateState.PROBATION
        and slots.active_slot() == record.target_slot
    )
    if record is None or not in_probation:
        return prepare_active(updater.engine, slots)
    version = record.update.version
    if record.failed_starts >= MAX_FAILED_STARTS:
        _roll_back_at_boot(
            updater,
            record,
            slots,
            f"v{version} failed to start {record.failed_starts} times in a row "
            "(the agent died while loading it)",
        )
        return prepare_active(updater.engine, slots)
    record.loading = True
    updater.write_journal(record)
    try:
        serving = prepare_active(updater.engine, slots)
    except (ModelError, EngineError) as e:
        # E.g. a power cut before the new slot's files reached the disk, or a runtime that refuses it.
        record.loading = False
        _roll_back_at_boot(updater, record, slots, f"v{version} failed to load at boot: {e}")
        return prepare_active(updater.engine, slots)
    record.loading = False
    record.failed_starts = 0
    updater.write_journal(record)
    return serving


def prepare_active(engine: Engine, slots: ModelSlots) -> ServingModel:
    """Verify, load and prove the active slot's model; a failed golden run is tried again twice.

    Wrong outputs fail every attempt; a latency budget missed while the CPU is busy (other services
    starting at boot) usually passes the next time, and must not roll back a good model.
    """
    attempt = 1
    while True:
        try:
            return engine.prepare(slots.active_dir(), slots.active_manifest())
        except GoldenTestFailed as e:
            if attempt == PROVE_ATTEMPTS:
                raise
            log.warning("%s: %s; trying again (%d of %d)", slots.model_name, e, attempt, PROVE_ATTEMPTS)
            attempt += 1
            time.sleep(PROVE_PAUSE_S)


def _roll_back_at_boot(updater: "Updater", record: UpdateRecord, slots: ModelSlots, reason: str) -> None:
    assert record.previous_slot is not None
    record.state = next_state(record.state, Event.ROLL_BACK)
    record.reason = reason
    record.history.append({"state": record.state.value, "ts": time.time(), "reason": reason})
    updater.write_journal(record)  # first: a crash before the link moves is finished by repair_slots_at_boot
    slots.activate(record.previous_slot)
    updater.unreported = True
    log.error("update %s rolled back at boot: %s", record.update_id, reason)
