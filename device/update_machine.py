"""The update state machine: states, events and one transition table, with no I/O.

The orchestrator (`updater.py`) asks `next_state` before every step and journals the answer
before it acts, so a crash leaves a record of exactly how far the update got.
"""

from enum import StrEnum

from protocol.messages import UpdateState as S


class Event(StrEnum):
    OFFER = "offer"
    ACCEPT = "accept"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    APPLIED = "applied"
    LOADED = "loaded"
    SWITCHED = "switched"
    HEALTHY = "healthy"
    FAIL = "fail"
    ROLL_BACK = "roll_back"
    RESUME = "resume"


TRANSITIONS: dict[tuple[S, Event], S] = {
    (S.IDLE, Event.OFFER): S.OFFERED,
    (S.OFFERED, Event.ACCEPT): S.DOWNLOADING,
    (S.DOWNLOADING, Event.DOWNLOADED): S.VERIFYING,
    (S.VERIFYING, Event.VERIFIED): S.APPLYING,
    (S.APPLYING, Event.APPLIED): S.STAGED,
    (S.STAGED, Event.LOADED): S.TESTING,
    (S.TESTING, Event.SWITCHED): S.PROBATION,
    (S.PROBATION, Event.HEALTHY): S.COMMITTED,
    (S.PROBATION, Event.ROLL_BACK): S.ROLLED_BACK,
}
# Before the switch a failure leaves the old slot active: the update simply failed.
for _state in (S.OFFERED, S.DOWNLOADING, S.VERIFYING, S.APPLYING, S.STAGED, S.TESTING):
    TRANSITIONS[(_state, Event.FAIL)] = S.FAILED
# After the switch a failure must put the old slot back.
TRANSITIONS[(S.PROBATION, Event.FAIL)] = S.ROLLED_BACK
# A restart while the payload was checked or unpacked: back to the download, which keeps the part of
# the file already on disk; the payload is checked and the slot written again from the start.
for _state in (S.VERIFYING, S.APPLYING):
    TRANSITIONS[(_state, Event.RESUME)] = S.DOWNLOADING
# A rollback asked for outside an update (fleet command, local API): its own record, straight to the end.
TRANSITIONS[(S.IDLE, Event.ROLL_BACK)] = S.ROLLED_BACK


class IllegalTransition(RuntimeError):
    pass


def next_state(state: S, event: Event) -> S:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.value!r} is not allowed in state {state.value!r}") from None
