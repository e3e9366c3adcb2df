"""Rollout campaigns: one model version to a set of devices in phases, stopped by itself when a phase fails.

Functions over a SQLAlchemy session; the caller owns the transaction, and `now` is epoch seconds so
tests and the service agree on time. The service drives a campaign with three calls:
`offer_next` on a tick (plan, offer, attach), `record_update_report` from `on_update_status`, and the
operator's `pause`/`resume`/`abort`/`rollback`. `status` is what the API and the CLI show.

Phases are cumulative: `count` or `percent` says how many of the devices to update the campaign has
reached by the end of that phase (canary count 1, then 10%, then 100%). A phase is done when each of its
devices committed, failed or rolled back; the next phase starts only then, after the phase's hold, and
only if no abort rule was broken. Abort rules are checked at every report, so a breach stops the
campaign at once, not at the end of the phase.
"""

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import and_, case, func, insert, or_, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from fleet.db import Device, ModelVersion, Update, UpdateEvent
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.rollout_db import Campaign, CampaignDevice, devices_labelled
from protocol.messages import UpdateState

CampaignState = Literal["running", "paused", "aborted", "completed", "rolling_back"]
ACTIVE = ("running", "paused")
FAILED_OUTCOMES = frozenset({UpdateState.FAILED.value, UpdateState.ROLLED_BACK.value})
FINAL_OUTCOMES = FAILED_OUTCOMES | {UpdateState.COMMITTED.value}
SKIPPED = -1  # phase index of a device that already runs the version or a newer one
SHADOW_KEY = "shadow"  # UpdateStatus.detail["shadow"]: the device's shadow run of the new model


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AbortRule(_Spec):
    """Limits for one phase; the campaign aborts by itself when a report breaks one."""

    max_failures: int | None = Field(default=None, ge=0, description="failed devices allowed in the phase")
    max_failure_rate: float | None = Field(
        default=None, ge=0, le=1, description="failed / devices of the phase, 0..1"
    )
    min_agreement: float | None = Field(
        default=None, ge=0, le=1, description="least shadow agreement of new vs old model, 0..1"
    )
    max_p95_increase: float | None = Field(
        default=None, ge=0, description="largest p95 latency growth new vs old, 0.2 = +20%"
    )


class Phase(_Spec):
    name: str = Field(min_length=1, max_length=64)
    count: int | None = Field(default=None, ge=1, description="devices reached by the end of this phase")
    percent: float | None = Field(
        default=None, gt=0, le=100, description="share of the devices reached by the end of this phase"
    )
    hold_minutes: float = Field(default=0, ge=0, description="wait after this phase before the next")
    abort: AbortRule = AbortRule()

    @model_validator(mode="after")
    def _one_size(self) -> "Phase":
        if (self.count is None) == (self.percent is None):
            raise ValueError(f"phase {self.name!r}: give exactly one of count and percent")
        return self

    def reach(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        # Rounded before ceil so 10% of 30 is 3, not 4 from 3.0000000000000004.
        return min(total, math.ceil(round(total * self.percent / 100, 6)))


class Target(_Spec):
    """Devices by id, by group or by tag; a device named by any of them is in."""

    devices: list[str] = []
    groups: list[str] = []
    tags: list[str] = []

    @model_validator(mode="after")
    def _not_empty(self) -> "Target":
        if not (self.devices or self.groups or self.tags):
            raise ValueError("name devices, groups or tags to roll out to")
        return self


class ShadowReport(BaseModel):
    """What a device in probation reports of the new model run in shadow beside the old one."""

    model_config = ConfigDict(extra="ignore")  # newer agents may add figures; these are what gate
    agreement: float = Field(ge=0, le=1)
    p95_ms_old: float = Field(gt=0)
    p95_ms_new: float = Field(ge=0)
    samples: int = Field(default=0, ge=0)


DEFAULT_PHASES = (
    Phase(name="canary", count=1, abort=AbortRule(max_failures=0)),
    Phase(name="10%", percent=10, abort=AbortRule(max_failure_rate=0.1)),
    Phase(name="all", percent=100, abort=AbortRule(max_failure_rate=0.05)),
)

StartUpdate = Callable[[str, int, list[str]], Awaitable[list[dict[str, Any]]]]


# -- creation ---------------------------------------------------------------------------------------
def create_campaign(
    session: Session,
    model_name: str,
    version: int,
    target: Target,
    phases: Iterable[Phase] | None = None,
    *,
    seed: str | None = None,
    now: float | None = None,
) -> str:
    """Resolve the target, assign each device its phase, and return the new campaign's id.

    The order within the target is a hash of (seed, device id): deterministic for one campaign, but
    not the same canary for every campaign. Devices already on `version` or newer are skipped.
    """
    now = time.time() if now is None else now
    phase_list = list(DEFAULT_PHASES if phases is None else phases)
    if not phase_list:
        raise InvalidRequest("give at least one phase")
    model = _model(session, model_name, version)
    device_ids = _resolve(session, target)
    _check_not_in_other_campaign(session, model_name, device_ids)

    campaign_id = uuid.uuid4().hex[:16]
    seed = seed or campaign_id
    installed = _installed_versions(session, device_ids, model_name)
    version_ids = dict(
        session.execute(
            select(ModelVersion.version, ModelVersion.id).where(ModelVersion.name == model_name)
        ).all()
    )
    todo = sorted(
        (d for d in device_ids if (installed[d] or 0) < version),
        key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest(),
    )
    phase_of = _assign_phases(phase_list, len(todo))

    campaign = Campaign(
        id=campaign_id,
        model_version_id=model.id,
        target=target.model_dump(),
        phases=[p.model_dump() for p in phase_list],
        seed=seed,
        state="running",
        next_phase_at=now,
        created=now,
        updated=now,
    )
    session.add(campaign)
    session.flush()  # the campaign row first: campaign_devices refers to it
    todo_set = set(todo)
    ordered = [*todo, *(d for d in device_ids if d not in todo_set)]
    session.execute(
        insert(CampaignDevice),
        [
            {
                "campaign_id": campaign_id,
                "device_id": device_id,
                "phase_index": phase_of[position] if position < len(todo) else SKIPPED,
                "position": position,
                "installed_version": installed[device_id],
                "previous_version_id": _lookup(version_ids, installed[device_id]),
            }
            for position, device_id in enumerate(ordered)
        ],
    )
    if not todo:
        campaign.state = "completed"
        campaign.finished = now
        campaign.reason = f"every targeted device already runs {model_name} v{version} or newer"
    session.flush()
    return campaign_id


def _assign_phases(phases: list[Phase], total: int) -> list[int]:
    """The phase index of each position 0..total-1, from the phases' cumulative reach."""
    out: list[int] = []
    reached = 0
    for index, phase in enumerate(phases):
        reach = phase.reach(total)
        if reach < reached:
            raise InvalidRequest(
                f"phase {phase.name!r} reaches {reach} devices, fewer than the {reached} before it: "
                "count and percent are cumulative"
            )
        out.extend([index] * (reach - reached))
        reached = reach
    if reached < total:
        raise InvalidRequest(
            f"the last phase reaches {reached} of {total} devices; end with a phase of percent 100"
        )
    return out


def _model(session: Session, name: str, version: int) -> ModelVersion:
    model = session.scalars(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    ).first()
    if model is None:
        raise NotFound(f"model {name} v{version} is not registered; push it first")
    return model


def _resolve(session: Session, target: Target) -> list[str]:
    known: set[str] = set()
    for chunk in _chunks(sorted(set(target.devices))):
        known.update(session.scalars(select(Device.id).where(Device.id.in_(chunk))))
    unknown = [d for d in target.devices if d not in known]
    if unknown:
        raise NotFound(f"no device {', '.join(map(repr, unknown))}")
    found = (
        set(target.devices)
        | devices_labelled(session, "group", target.groups)
        | devices_labelled(session, "tag", target.tags)
    )
    if not found:
        raise InvalidRequest(f"the target {target.model_dump()} matches no device; check the labels")
    return sorted(found)


def _check_not_in_other_campaign(session: Session, model_name: str, device_ids: list[str]) -> None:
    """Two campaigns of one model must not both offer to a device: the later offer would race the first."""
    still_updating = and_(
        Campaign.state.in_(ACTIVE), CampaignDevice.phase_index != SKIPPED, CampaignDevice.outcome.is_(None)
    )
    rollback_open = and_(
        Campaign.state == "rolling_back",
        or_(
            CampaignDevice.rollback.in_(("requested", "awaiting")),
            and_(
                CampaignDevice.rollback_update_id.is_not(None), CampaignDevice.rollback.not_in(FINAL_OUTCOMES)
            ),
        ),
    )
    busy = session.execute(
        select(CampaignDevice.device_id, Campaign.id)
        .join(Campaign, Campaign.id == CampaignDevice.campaign_id)
        .join(ModelVersion, ModelVersion.id == Campaign.model_version_id)
        .where(
            ModelVersion.name == model_name,
            CampaignDevice.device_id.in_(device_ids),
            or_(still_updating, rollback_open),
        )
    ).first()
    if busy is not None:
        raise Conflict(
            f"device {busy[0]!r} still waits in campaign {busy[1]} of {model_name}; "
            "let it finish or abort it first"
        )


def _installed_versions(session: Session, device_ids: list[str], model_name: str) -> dict[str, int | None]:
    """What each device runs now: its last health report, else its last committed update."""
    out: dict[str, int | None] = dict.fromkeys(device_ids)
    for chunk in _chunks(device_ids):
        for device in session.scalars(select(Device).where(Device.id.in_(chunk))):
            for model in (device.last_health or {}).get("models") or []:
                if isinstance(model, dict) and model.get("name") == model_name:
                    version = model.get("version")
                    out[device.id] = version if isinstance(version, int) else None
        committed = session.execute(
            select(Update.device_id, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == Update.model_version_id)
            .where(Update.device_id.in_(chunk), ModelVersion.name == model_name, Update.state == "committed")
            .order_by(Update.updated)
        )
        latest = {device_id: version for device_id, version in committed}  # by time: the last one wins
        for device_id, version in latest.items():
            if out[device_id] is None:
                out[device_id] = version
    return out


def _lookup(version_ids: dict[int, int], version: int | None) -> int | None:
    return None if version is None else version_ids.get(version)


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    # Keeps IN (...) lists under SQLite's bound-parameter limit on old builds.
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- planning -----------------------------------------------------------------------------------------
def plan_next(session: Session, campaign_id: str, now: float | None = None) -> list[tuple[str, int]]:
    """The (device id, phase index) pairs to offer now: the current phase's devices with no update yet.

    Offline devices are planned like the others: their offer waits on the broker side of the service
    and is re-sent when they come back. Calling again before `attach_update` returns the same pairs.
    """
    now = time.time() if now is None else now
    campaign = _campaign(session, campaign_id)
    _advance(session, campaign, now)
    if campaign.state != "running" or now < campaign.next_phase_at:
        return []
    rows = session.scalars(
        select(CampaignDevice)
        .where(
            CampaignDevice.campaign_id == campaign_id,
            CampaignDevice.phase_index == campaign.current_phase,
            CampaignDevice.update_id.is_(None),
        )
        .order_by(CampaignDevice.position)
    )
    return [(row.device_id, row.phase_index) for row in rows]


def attach_update(
    session: Session, campaign_id: str, device_id: str, update_id: str, now: float | None = None
) -> None:
    """Tie the update the service created for a planned device to the campaign."""
    attach_updates(session, campaign_id, {device_id: update_id}, now)


def attach_updates(
    session: Session, campaign_id: str, updates: dict[str, str], now: float | None = None
) -> None:
    """`attach_update` for many devices ({device id: update id}) in one pass.

    A device can answer before this runs (a refused offer comes back in milliseconds), so the
    updates' events so far are replayed into the campaign here.
    """
    rows: dict[str, CampaignDevice] = {}
    for chunk in _chunks(sorted(updates)):
        query = select(CampaignDevice).where(
            CampaignDevice.campaign_id == campaign_id, CampaignDevice.device_id.in_(chunk)
        )
        rows.update((row.device_id, row) for row in session.scalars(query))
    for device_id, update_id in updates.items():
        row = rows.get(device_id)
        if row is None:
            raise NotFound(f"device {device_id!r} is not in campaign {campaign_id}")
        if row.update_id not in (None, update_id):
            raise Conflict(
                f"device {device_id!r} already has update {row.update_id} in campaign {campaign_id}"
            )
        row.update_id = update_id
    for event in _events(session, list(updates.values())):
        if updates.get(event.device_id) == event.update_id:
            record_outcome(session, campaign_id, event.device_id, event.state, event.detail, now=now)


def _advance(session: Session, campaign: Campaign, now: float) -> None:
    """Move past every finished phase whose rules held; complete the campaign after the last one."""
    phases = _phases(campaign)
    while campaign.state == "running" and campaign.current_phase < len(phases):
        in_phase = _in_phase(campaign.id, campaign.current_phase)
        unfinished = func.coalesce(func.sum(case((CampaignDevice.outcome.is_(None), 1), else_=0)), 0)
        open_count, done_at = session.execute(
            select(unfinished, func.max(CampaignDevice.outcome_at)).where(in_phase)
        ).one()
        if open_count:
            return
        breach = _breach(session, campaign.id, campaign.current_phase, phases[campaign.current_phase])
        if breach:
            _stop(campaign, "aborted", breach, now)
            return
        campaign.next_phase_at = (done_at or now) + phases[campaign.current_phase].hold_minutes * 60
        campaign.current_phase += 1
        campaign.updated = now
    if campaign.state == "running":
        _stop(campaign, "completed", "", now)


def _in_phase(campaign_id: str, phase_index: int) -> ColumnElement[bool]:
    return and_(CampaignDevice.campaign_id == campaign_id, CampaignDevice.phase_index == phase_index)


# -- reports ------------------------------------------------------------------------------------------
def record_outcome(
    session: Session,
    campaign_id: str,
    device_id: str,
    state: str,
    detail: dict[str, Any] | None = None,
    *,
    now: float | None = None,
) -> str:
    """Take a device's update report into its campaign, abort on a broken rule, return the campaign state.

    Any state may carry shadow figures (`detail["shadow"]`, see ShadowReport); only committed, failed
    and rolled_back end the device's part. The first final state counts; a later one changes nothing.
    """
    now = time.time() if now is None else now
    campaign = _campaign(session, campaign_id)
    row = _member(session, campaign_id, device_id)
    try:
        reported = UpdateState(state)
    except ValueError as e:
        raise InvalidRequest(
            f"unknown update state {state!r}: one of {[s.value for s in UpdateState]}"
        ) from e
    shadow = _shadow(detail)
    if shadow is not None:
        row.agreement, row.p95_ms_old, row.p95_ms_new = shadow.agreement, shadow.p95_ms_old, shadow.p95_ms_new
    if reported.is_final and row.outcome is None:
        row.outcome, row.outcome_at = reported.value, now
        if row.rollback == "awaiting":
            if reported is UpdateState.COMMITTED:
                _mark_for_rollback(row)
            else:
                row.rollback = ""  # it never left its previous version
    campaign.updated = now
    if campaign.state in ACTIVE and row.phase_index != SKIPPED:
        session.flush()
        breach = _breach(session, campaign_id, row.phase_index, _phases(campaign)[row.phase_index])
        if breach:
            _stop(campaign, "aborted", breach, now)
    _advance(session, campaign, now)
    return campaign.state


def record_update_report(
    session: Session,
    update_id: str,
    device_id: str,
    state: str,
    detail: dict[str, Any] | None = None,
    *,
    now: float | None = None,
) -> str | None:
    """`record_outcome` for whichever campaign holds `update_id`; None when no campaign does.

    A rollback update's final state is kept as the device's rollback result instead.
    """
    row = session.scalars(select(CampaignDevice).where(CampaignDevice.update_id == update_id)).first()
    if row is not None and row.device_id == device_id:
        return record_outcome(session, row.campaign_id, device_id, state, detail, now=now)
    back = session.scalars(
        select(CampaignDevice).where(CampaignDevice.rollback_update_id == update_id)
    ).first()
    if back is not None and back.device_id == device_id:
        if state in FINAL_OUTCOMES:
            back.rollback = state
        return _campaign(session, back.campaign_id).state
    return None


def campaign_of_update(session: Session, update_id: str) -> str | None:
    """The state of the campaign that holds `update_id` (as an update or a rollback), or None."""
    row = session.scalars(
        select(CampaignDevice).where(
            or_(CampaignDevice.update_id == update_id, CampaignDevice.rollback_update_id == update_id)
        )
    ).first()
    return None if row is None else _campaign(session, row.campaign_id).state


def _shadow(detail: dict[str, Any] | None) -> ShadowReport | None:
    raw = (detail or {}).get(SHADOW_KEY)
    if raw is None:
        return None
    try:
        return ShadowReport.model_validate(raw)
    except ValidationError:
        return None  # a malformed report gates nothing; status shows the device without figures


def _breach(session: Session, campaign_id: str, phase_index: int, phase: Phase) -> str:
    """Why the phase broke its abort rule, or '' when it holds. Counted in SQL: phases can be large."""
    rule = phase.abort
    in_phase = _in_phase(campaign_id, phase_index)
    is_failed = CampaignDevice.outcome.in_(FAILED_OUTCOMES)
    total, failed = session.execute(
        select(func.count(), func.coalesce(func.sum(case((is_failed, 1), else_=0)), 0)).where(in_phase)
    ).one()
    where = f"phase {phase.name!r}"
    if failed and rule.max_failures is not None and failed > rule.max_failures:
        return (
            f"{where}: {failed} failed, more than {rule.max_failures} allowed "
            f"({_failures(session, in_phase, failed)})"
        )
    if failed and rule.max_failure_rate is not None and failed / total > rule.max_failure_rate:
        return (
            f"{where}: {failed} of {total} failed, above the {rule.max_failure_rate:.0%} allowed "
            f"({_failures(session, in_phase, failed)})"
        )
    if rule.min_agreement is not None:
        row = _first(session, and_(in_phase, CampaignDevice.agreement < rule.min_agreement))
        if row is not None and row.agreement is not None:
            return (
                f"{where}: {row.device_id} shadow agreement {row.agreement:.2%}, "
                f"below the {rule.min_agreement:.2%} required"
            )
    if rule.max_p95_increase is not None:
        slower = CampaignDevice.p95_ms_new > CampaignDevice.p95_ms_old * (1 + rule.max_p95_increase)
        row = _first(session, and_(in_phase, CampaignDevice.p95_ms_old > 0, slower))
        if row is not None and row.p95_ms_old and row.p95_ms_new is not None:
            growth = row.p95_ms_new / row.p95_ms_old - 1
            return (
                f"{where}: {row.device_id} p95 latency {row.p95_ms_old:.1f} -> {row.p95_ms_new:.1f} ms "
                f"(+{growth:.0%}), more than the +{rule.max_p95_increase:.0%} allowed"
            )
    return ""


def _first(session: Session, condition: ColumnElement[bool]) -> CampaignDevice | None:
    query = select(CampaignDevice).where(condition).order_by(CampaignDevice.position).limit(1)
    return session.scalars(query).first()


def _failures(session: Session, in_phase: ColumnElement[bool], count: int) -> str:
    """The first few failed devices of a phase with the reasons they gave."""
    rows = session.execute(
        select(CampaignDevice.device_id, CampaignDevice.outcome, Update.reason)
        .outerjoin(Update, Update.id == CampaignDevice.update_id)
        .where(in_phase, CampaignDevice.outcome.in_(FAILED_OUTCOMES))
        .order_by(CampaignDevice.outcome_at, CampaignDevice.position)
        .limit(3)
    ).all()
    parts = [
        f"{device_id} {outcome}" + (f": {reason}" if reason else "") for device_id, outcome, reason in rows
    ]
    return "; ".join(parts) + ("; ..." if count > 3 else "")


# -- operator actions -----------------------------------------------------------------------------------
def pause(session: Session, campaign_id: str, now: float | None = None) -> None:
    """Stop offering; offers already made stay (the service re-sends them to devices that come back)."""
    campaign = _campaign(session, campaign_id)
    _require(campaign, ("running",), "pause")
    campaign.state, campaign.updated = "paused", time.time() if now is None else now


def resume(session: Session, campaign_id: str, now: float | None = None) -> None:
    campaign = _campaign(session, campaign_id)
    _require(campaign, ("paused",), "resume")
    campaign.state, campaign.updated = "running", time.time() if now is None else now


def abort(
    session: Session, campaign_id: str, reason: str = "aborted by the operator", now: float | None = None
) -> None:
    """Stop the campaign for good; `unstarted_offers` lists the offers the service should withdraw."""
    campaign = _campaign(session, campaign_id)
    _require(campaign, ACTIVE, "abort")
    _stop(campaign, "aborted", reason, time.time() if now is None else now)


def rollback(session: Session, campaign_id: str, now: float | None = None) -> list[tuple[str, int]]:
    """Stop the campaign and return (device id, model version id) to send back to each committed device.

    Committed devices whose previous version the fleet does not hold are marked 'unavailable' and
    left out. Devices still updating are marked 'awaiting': if they commit later, they are due too.
    `offer_next` offers whatever is due, now and on later ticks.
    """
    campaign = _campaign(session, campaign_id)
    _require(campaign, (*ACTIVE, "aborted", "completed"), "roll back")
    for row in _rows(session, campaign_id):
        if row.outcome == UpdateState.COMMITTED.value:
            _mark_for_rollback(row)
        elif row.outcome is None and row.update_id is not None:
            row.rollback = "awaiting"
    now = time.time() if now is None else now
    due = rollback_due(session, campaign_id)
    reason = f"rolling back {len(due)} device(s)" + (f" after: {campaign.reason}" if campaign.reason else "")
    _stop(campaign, "rolling_back", reason, now)
    campaign.finished = None
    return due


def _mark_for_rollback(row: CampaignDevice) -> None:
    row.rollback = "unavailable" if row.previous_version_id is None else "requested"


def rollback_due(session: Session, campaign_id: str) -> list[tuple[str, int]]:
    """(device id, model version id) of the rollbacks requested but not offered yet."""
    rows = session.scalars(
        select(CampaignDevice)
        .where(
            CampaignDevice.campaign_id == campaign_id,
            CampaignDevice.rollback == "requested",
            CampaignDevice.rollback_update_id.is_(None),
        )
        .order_by(CampaignDevice.position)
    )
    return [(row.device_id, row.previous_version_id) for row in rows if row.previous_version_id is not None]


def unstarted_offers(session: Session, campaign_id: str) -> list[str]:
    """Update ids of the campaign that no device has acted on yet (still 'pending' at the service)."""
    _campaign(session, campaign_id)
    return list(
        session.scalars(
            select(Update.id)
            .join(CampaignDevice, CampaignDevice.update_id == Update.id)
            .where(CampaignDevice.campaign_id == campaign_id, Update.state == "pending")
            .order_by(Update.id)
        )
    )


def _require(campaign: Campaign, states: tuple[str, ...], action: str) -> None:
    if campaign.state not in states:
        raise Conflict(f"cannot {action} campaign {campaign.id}: it is {campaign.state}")


def _stop(campaign: Campaign, state: CampaignState, reason: str, now: float) -> None:
    campaign.state, campaign.reason, campaign.updated, campaign.finished = state, reason[:2048], now, now


# -- drivers for the service ------------------------------------------------------------------------------
async def offer_next(
    sessions: sessionmaker[Session],
    campaign_id: str,
    start_update: StartUpdate,
    request_rollback: StartUpdate,
    now: float | None = None,
) -> list[str]:
    """Offer what is due, and attach it; the new update ids.

    Running: the next devices of the current phase, through the service's `start_update`. Rolling
    back: each due device is asked to serve its previous version again from its other slot
    (`request_rollback`; a device never installs an older version as an update).
    Call it from one task per fleet (the tick loop): two concurrent calls would offer twice.
    The database work runs in threads, so the caller's event loop keeps serving devices meanwhile.
    """
    rolling_back, batches = await asyncio.to_thread(_due, sessions, campaign_id, now)
    created: list[str] = []
    for (name, version), device_ids in sorted(batches.items()):
        views = await (request_rollback if rolling_back else start_update)(name, version, device_ids)
        await asyncio.to_thread(_attach, sessions, campaign_id, rolling_back, views, now)
        created.extend(view["update_id"] for view in views)
    return created


def _due(
    sessions: sessionmaker[Session], campaign_id: str, now: float | None
) -> tuple[bool, dict[tuple[str, int], list[str]]]:
    """Whether the campaign rolls back, and the devices due per (model name, version) to send."""
    with sessions.begin() as s:
        campaign = _campaign(s, campaign_id)
        model = s.get(ModelVersion, campaign.model_version_id)
        assert model is not None
        batches: dict[tuple[str, int], list[str]] = {}
        if campaign.state == "rolling_back":
            for device_id, version_id in rollback_due(s, campaign_id):
                previous = s.get(ModelVersion, version_id)
                assert previous is not None
                batches.setdefault((previous.name, previous.version), []).append(device_id)
            return True, batches
        planned = [device_id for device_id, _ in plan_next(s, campaign_id, now)]
        if planned:
            batches[(model.name, model.version)] = planned
        return False, batches


def _attach(
    sessions: sessionmaker[Session],
    campaign_id: str,
    rolling_back: bool,
    views: list[dict[str, Any]],
    now: float | None,
) -> None:
    with sessions.begin() as s:
        if rolling_back:
            for view in views:
                _member(s, campaign_id, view["device_id"]).rollback_update_id = view["update_id"]
        else:
            attach_updates(s, campaign_id, {v["device_id"]: v["update_id"] for v in views}, now)


def active_campaigns(session: Session) -> list[str]:
    """Ids of the campaigns a tick should drive: running, paused (reports still count), rolling back."""
    query = select(Campaign.id).where(Campaign.state.in_((*ACTIVE, "rolling_back")))
    return list(session.scalars(query.order_by(Campaign.created)))


# -- views ----------------------------------------------------------------------------------------------
def status(session: Session, campaign_id: str) -> dict[str, Any]:
    """The campaign as the API and `fleet rollout status` show it: phases, devices, their timelines."""
    campaign = _campaign(session, campaign_id)
    model = session.get(ModelVersion, campaign.model_version_id)
    rows = _rows(session, campaign_id)
    update_ids = [u for row in rows for u in (row.update_id, row.rollback_update_id) if u]
    updates = {u.id: u for u in session.scalars(select(Update).where(Update.id.in_(update_ids)))}
    timelines: dict[str, list[dict[str, Any]]] = {}
    for event in _events(session, update_ids):
        timelines.setdefault(event.update_id, []).append(
            {"state": event.state, "ts": event.ts, "reason": event.reason}
        )
    versions = {
        m.id: m.version
        for m in session.scalars(
            select(ModelVersion).where(ModelVersion.id.in_({r.previous_version_id for r in rows} - {None}))
        )
    }
    phases = _phases(campaign)
    planned = [row for row in rows if row.phase_index != SKIPPED]
    done = sum(row.outcome in FINAL_OUTCOMES for row in planned)
    return {
        **_summary(campaign, model),
        "target": campaign.target,
        "progress": done / len(planned) if planned else 1.0,
        "phases": [
            _phase_view(campaign, i, p, [r for r in planned if r.phase_index == i])
            for i, p in enumerate(phases)
        ],
        "skipped": [row.device_id for row in rows if row.phase_index == SKIPPED],
        "devices": [
            {
                "device_id": row.device_id,
                "phase": row.phase_index,
                "update_id": row.update_id,
                "update_state": updates[row.update_id].state if row.update_id in updates else None,
                "outcome": row.outcome,
                "installed_version": row.installed_version,
                "previous_version": versions.get(row.previous_version_id)
                if row.previous_version_id
                else None,
                "shadow": None
                if row.agreement is None
                else {"agreement": row.agreement, "p95_ms_old": row.p95_ms_old, "p95_ms_new": row.p95_ms_new},
                "rollback": row.rollback or None,
                "rollback_update_id": row.rollback_update_id,
                "timeline": timelines.get(row.update_id or "", []),
                "rollback_timeline": timelines.get(row.rollback_update_id or "", []),
            }
            for row in rows
        ],
    }


def list_campaigns(session: Session) -> list[dict[str, Any]]:
    out = []
    for campaign in session.scalars(select(Campaign).order_by(Campaign.created)):
        out.append(_summary(campaign, session.get(ModelVersion, campaign.model_version_id)))
    return out


def _summary(campaign: Campaign, model: ModelVersion | None) -> dict[str, Any]:
    return {
        "campaign_id": campaign.id,
        "model_name": model.name if model else None,
        "version": model.version if model else None,
        "state": campaign.state,
        "reason": campaign.reason,
        "current_phase": campaign.current_phase,
        "next_phase_at": campaign.next_phase_at,
        "created": campaign.created,
        "updated": campaign.updated,
        "finished": campaign.finished,
    }


def _phase_view(campaign: Campaign, index: int, phase: Phase, rows: list[CampaignDevice]) -> dict[str, Any]:
    counts = {"devices": len(rows), "offered": sum(r.update_id is not None for r in rows)}
    for outcome in sorted(FINAL_OUTCOMES):
        counts[outcome] = sum(r.outcome == outcome for r in rows)
    counts["in_progress"] = counts["offered"] - sum(r.outcome is not None for r in rows)
    if index < campaign.current_phase:
        state = "done"
    elif index == campaign.current_phase:
        state = "active" if campaign.state == "running" else campaign.state
    else:
        state = "waiting" if campaign.state in ACTIVE else "not started"
    return {"index": index, "name": phase.name, "state": state, "abort": phase.abort.model_dump(), **counts}


# -- lookups --------------------------------------------------------------------------------------------
def _campaign(session: Session, campaign_id: str) -> Campaign:
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise NotFound(f"no rollout campaign {campaign_id!r}")
    return campaign


def _member(session: Session, campaign_id: str, device_id: str) -> CampaignDevice:
    row = session.get(CampaignDevice, (campaign_id, device_id))
    if row is None:
        raise NotFound(f"device {device_id!r} is not in campaign {campaign_id}")
    return row


def _phases(campaign: Campaign) -> list[Phase]:
    return [Phase.model_validate(p) for p in campaign.phases]


def _rows(session: Session, campaign_id: str) -> list[CampaignDevice]:
    query = select(CampaignDevice).where(CampaignDevice.campaign_id == campaign_id)
    return list(session.scalars(query.order_by(CampaignDevice.position)))


def _events(session: Session, update_ids: list[str]) -> list[UpdateEvent]:
    events: list[UpdateEvent] = []
    for chunk in _chunks(update_ids):
        events.extend(session.scalars(select(UpdateEvent).where(UpdateEvent.update_id.in_(chunk))))
    return sorted(events, key=lambda e: (e.ts, e.id))


__all__ = [
    "DEFAULT_PHASES",
    "SHADOW_KEY",
    "AbortRule",
    "Phase",
    "ShadowReport",
    "StartUpdate",
    "Target",
    "abort",
    "active_campaigns",
    "attach_update",
    "attach_updates",
    "create_campaign",
    "list_campaigns",
    "offer_next",
    "pause",
    "plan_next",
    "record_outcome",
    "record_update_report",
    "resume",
    "rollback",
    "rollback_due",
    "status",
    "unstarted_offers",
]
