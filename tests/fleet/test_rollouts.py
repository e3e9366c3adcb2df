"""Rollout campaigns on a real SQLite file, driven through the real FleetService (publishing captured).

The helpers `tick` and `report` are the wiring the service gets: `offer_next` on its tick loop, and
`record_update_report` right after `on_update_status` records a device's report.
"""

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fleet import rollouts
from fleet.db import ModelVersion, open_database
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.rollout_db import labels_of, set_labels
from fleet.rollouts import AbortRule, Phase, Target
from fleet.service import FleetService
from fleet.store import FleetDataDir
from protocol import topics
from protocol.messages import DeviceState, UpdateState, UpdateStatus
from tests.health_reports import health_report

MODEL = "surface-defect"
T0 = 1_750_000_000.0
WALK = ("offered", "downloading", "verifying", "applying", "staged", "testing", "probation")
DEVICES = [f"cam-{i:02d}" for i in range(1, 26)]


@pytest.fixture
def service(tmp_path: Path, archives: dict[int, Path]) -> FleetService:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    service = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", chunk_size=4096)
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        sent.append((topic, payload))

    service.publish = publish
    service.sent = sent  # type: ignore[attr-defined]
    service.register_model(archives[1])
    service.register_model(archives[2])
    for device_id in DEVICES:
        service.add_device(device_id)
    return service


def offers_sent(service: FleetService) -> list[tuple[str, int]]:
    """(device id, version) of every offer published so far."""
    out = []
    for topic, payload in service.sent:  # type: ignore[attr-defined]
        if topic.endswith("/" + topics.CMD_UPDATE):
            update = json.loads(payload)["update"]  # read loosely: the offer's envelope is changing (TUF)
            out.append((topic.split("/")[2], update.get("metadata", update)["version"]))
    return out


def rollbacks_sent(service: FleetService) -> list[tuple[str, int]]:
    """(device id, version) of every rollback command published so far."""
    return [
        (topic.split("/")[2], json.loads(payload)["to_version"])
        for topic, payload in service.sent  # type: ignore[attr-defined]
        if topic.endswith("/" + topics.CMD_ROLLBACK)
    ]


def create(service: FleetService, target: Target, phases: list[Phase] | None = None, **kw: Any) -> str:
    with service.sessions.begin() as s:
        return rollouts.create_campaign(s, MODEL, 2, target, phases, now=T0, **kw)


def tick(service: FleetService, campaign_id: str, now: float = T0) -> dict[str, str]:
    """Offer what is due; {device id: update id} of the new offers."""
    ids = asyncio.run(
        rollouts.offer_next(
            service.sessions, campaign_id, service.start_update, service.request_rollback, now
        )
    )
    return {service.get_update(u)["device_id"]: u for u in ids}


def report(
    service: FleetService,
    device_id: str,
    update_id: str,
    state: str,
    detail: dict[str, Any] | None = None,
    reason: str = "",
    now: float = T0,
) -> str | None:
    update = service.get_update(update_id)
    status = UpdateStatus(
        device_id=device_id,
        update_id=update_id,
        model_name=MODEL,
        version=update["version"],
        state=UpdateState(state),
        reason=reason,
        ts=now,
        detail=detail or {},
    )
    service.clock = lambda: now
    service.on_update_status(device_id, status)  # which takes the report into its campaign
    with service.sessions() as s:
        return rollouts.campaign_of_update(s, update_id)


def install(
    service: FleetService, offers: dict[str, str], outcome: str = "committed", now: float = T0
) -> None:
    """Each device walks the state machine to `outcome`, one second per step."""
    for device_id, update_id in offers.items():
        for i, state in enumerate((*WALK, outcome)):
            report(service, device_id, update_id, state, now=now + i)


def status(service: FleetService, campaign_id: str) -> dict[str, Any]:
    with service.sessions() as s:
        return rollouts.status(s, campaign_id)


def runs(service: FleetService, device_id: str, version: int) -> None:
    service.on_health(device_id, health_report(device_id, model=MODEL, version=version))


PHASES = [
    Phase(name="canary", count=1, abort=AbortRule(max_failures=0)),
    Phase(name="10%", percent=10, abort=AbortRule(max_failure_rate=0.5)),
    Phase(name="all", percent=100, abort=AbortRule(max_failure_rate=0.1)),
]


def test_canary_then_ten_percent_then_all_on_25_devices(service: FleetService) -> None:
    campaign = create(service, Target(devices=DEVICES), PHASES)

    canary = tick(service, campaign)
    assert len(canary) == 1
    assert offers_sent(service) == [(next(iter(canary)), 2)]
    assert tick(service, campaign, T0 + 5) == {}, "no second phase while the canary is still updating"
    view = status(service, campaign)
    assert view["phases"][0] | {"abort": None} == {
        "index": 0,
        "name": "canary",
        "state": "active",
        "abort": None,
        "devices": 1,
        "offered": 1,
        "committed": 0,
        "failed": 0,
        "rolled_back": 0,
        "in_progress": 1,
    }
    assert view["progress"] == 0.0

    install(service, canary, now=T0 + 10)
    second = tick(service, campaign, T0 + 60)
    assert len(second) == 2, "10% of 25 rounds up to 3 devices reached, the canary being one"
    install(service, second, now=T0 + 70)
    rest = tick(service, campaign, T0 + 120)
    assert len(rest) == 22
    assert sorted([*canary, *second, *rest]) == DEVICES, "every device offered exactly once"
    assert status(service, campaign)["progress"] == pytest.approx(3 / 25)

    install(service, rest, now=T0 + 130)
    view = status(service, campaign)
    assert (view["state"], view["progress"], view["reason"]) == ("completed", 1.0, "")
    assert [p["state"] for p in view["phases"]] == ["done", "done", "done"]
    assert [p["committed"] for p in view["phases"]] == [1, 2, 22]
    timeline = next(d for d in view["devices"] if d["device_id"] in canary)["timeline"]
    assert [e["state"] for e in timeline] == [*WALK, "committed"]
    assert tick(service, campaign, T0 + 200) == {}


def test_canary_is_chosen_by_seed_and_reproducible(service: FleetService) -> None:
    expected = min(DEVICES, key=lambda d: hashlib.sha256(f"line-seed:{d}".encode()).hexdigest())
    first = create(service, Target(devices=DEVICES), PHASES, seed="line-seed")
    with service.sessions.begin() as s:
        assert rollouts.plan_next(s, first, T0) == [(expected, 0)]
        assert rollouts.plan_next(s, first, T0) == [(expected, 0)], "planning again offers nothing new"
        rollouts.abort(s, first)
    again = create(service, Target(devices=DEVICES), PHASES, seed="line-seed")
    with service.sessions() as s:
        assert rollouts.plan_next(s, again, T0) == [(expected, 0)]


def test_a_failed_canary_aborts_the_campaign_by_itself(service: FleetService) -> None:
    campaign = create(service, Target(devices=DEVICES), PHASES)
    ((device, update),) = tick(service, campaign).items()
    for state in WALK[:5]:
        assert report(service, device, update, state) == "running"
    assert report(service, device, update, "failed", reason="golden vector 2 off by 0.4") == "aborted"

    view = status(service, campaign)
    assert view["state"] == "aborted"
    assert "phase 'canary'" in view["reason"] and device in view["reason"]
    assert "golden vector 2 off by 0.4" in view["reason"], "the operator sees why the device failed"
    assert [p["state"] for p in view["phases"]] == ["aborted", "not started", "not started"]
    assert tick(service, campaign, T0 + 3600) == {}
    assert len(offers_sent(service)) == 1


def test_failure_rate_counts_against_the_whole_phase(service: FleetService) -> None:
    phases = [Phase(name="all", percent=100, abort=AbortRule(max_failure_rate=0.1))]
    campaign = create(service, Target(devices=DEVICES[:10]), phases)
    offers = tick(service, campaign)
    (a, ua), (b, ub), *_ = offers.items()
    assert report(service, a, ua, "failed") == "running", "1 of 10 is not above 10%"
    assert report(service, b, ub, "rolled_back") == "aborted", "a device's own rollback is a failure too"
    assert "2 of 10 failed" in status(service, campaign)["reason"]


@pytest.mark.parametrize(
    ("shadow", "outcome", "why"),
    [
        (
            {"agreement": 0.95, "p95_ms_old": 10.0, "p95_ms_new": 10.5, "samples": 400},
            "aborted",
            "agreement 95.00%",
        ),
        ({"agreement": 0.99, "p95_ms_old": 12.0, "p95_ms_new": 15.0, "samples": 400}, "aborted", "(+25%)"),
        ({"agreement": 0.99, "p95_ms_old": 10.0, "p95_ms_new": 11.0, "samples": 400}, "running", ""),
        ({"agreement": "high"}, "running", ""),  # malformed: gates nothing
    ],
)
def test_shadow_quality_from_the_status_detail_gates_the_phase(
    service: FleetService, shadow: dict[str, Any], outcome: str, why: str
) -> None:
    gate = AbortRule(max_failures=0, min_agreement=0.97, max_p95_increase=0.2)
    phases = [Phase(name="canary", count=1, abort=gate), Phase(name="all", percent=100)]
    campaign = create(service, Target(devices=DEVICES[:4]), phases)
    ((device, update),) = tick(service, campaign).items()
    for state in WALK[:-1]:
        report(service, device, update, state)
    # Probation is where the device runs the new model beside the old one: the gate acts before commit.
    assert report(service, device, update, "probation", {"shadow": shadow}) == outcome
    view = status(service, campaign)
    assert why in view["reason"]
    if outcome == "running":
        report(service, device, update, "committed")
        assert len(tick(service, campaign, T0 + 60)) == 3
    else:
        assert tick(service, campaign, T0 + 60) == {}
        (shown,) = [d["shadow"] for d in view["devices"] if d["device_id"] == device]
        assert shown["agreement"] == shadow["agreement"]


def test_pause_stops_new_offers_and_resume_continues(service: FleetService) -> None:
    campaign = create(service, Target(devices=DEVICES[:20]), PHASES)
    canary = tick(service, campaign)
    with service.sessions.begin() as s:
        rollouts.pause(s, campaign, now=T0 + 1)
        with pytest.raises(Conflict, match="it is paused"):
            rollouts.pause(s, campaign)
    install(service, canary, now=T0 + 2)  # reports still count while paused
    assert tick(service, campaign, T0 + 60) == {}
    view = status(service, campaign)
    assert view["state"] == "paused" and view["phases"][0]["committed"] == 1
    with service.sessions.begin() as s:
        rollouts.resume(s, campaign, now=T0 + 61)
        with pytest.raises(Conflict, match="it is running"):
            rollouts.resume(s, campaign)
    assert len(tick(service, campaign, T0 + 62)) == 1, "10% of 20 is 1 more after the canary"


def test_a_phase_that_adds_no_device_passes_at_once(service: FleetService) -> None:
    campaign = create(service, Target(devices=DEVICES[:10]), PHASES)
    install(service, tick(service, campaign))
    assert len(tick(service, campaign, T0 + 60)) == 9, "10% of 10 is the canary alone: on to 'all'"
    phases = status(service, campaign)["phases"]
    assert [(p["devices"], p["state"]) for p in phases] == [(1, "done"), (0, "done"), (9, "active")]


def test_hold_delays_the_next_phase(service: FleetService) -> None:
    phases = [Phase(name="canary", count=1, hold_minutes=30), Phase(name="all", percent=100)]
    campaign = create(service, Target(devices=DEVICES[:5]), phases)
    install(service, tick(service, campaign), now=T0)
    done = T0 + len(WALK)  # the canary's committed report
    assert tick(service, campaign, done + 29 * 60) == {}
    assert len(tick(service, campaign, done + 30 * 60)) == 4


def test_abort_leaves_unstarted_offers_for_the_service_to_withdraw(service: FleetService) -> None:
    campaign = create(service, Target(devices=DEVICES[:10]), [PHASES[0], Phase(name="all", percent=100)])
    install(service, tick(service, campaign))
    rest = tick(service, campaign, T0 + 60)
    started, *unstarted = rest.items()
    report(service, *started, "downloading")
    with service.sessions.begin() as s:
        rollouts.abort(s, campaign, "line 3 stopped for inspection")
        assert rollouts.unstarted_offers(s, campaign) == sorted(u for _, u in unstarted)
        with pytest.raises(Conflict, match="it is aborted"):
            rollouts.abort(s, campaign)
    assert status(service, campaign)["reason"] == "line 3 stopped for inspection"


def test_rollback_asks_those_already_updated_to_serve_the_previous_version(service: FleetService) -> None:
    # The campaign's order is a hash of (seed, id), so each device's part can be chosen up front.
    order = sorted(DEVICES[:6], key=lambda d: hashlib.sha256(f"rb:{d}".encode()).hexdigest())
    canary, updated_1, updated_2, unknown, failing, in_flight = order
    committed = [updated_1, updated_2, unknown]
    for device_id in order:
        if device_id != unknown:
            runs(service, device_id, 1)  # `unknown` never reported what it runs
    v1_id = _version_id(service, 1)
    phases = [PHASES[0], Phase(name="all", percent=100)]
    campaign = create(service, Target(devices=order), phases, seed="rb")
    first = tick(service, campaign)
    assert list(first) == [canary]
    install(service, first)
    rest = tick(service, campaign, T0 + 60)
    install(service, {d: rest[d] for d in committed}, now=T0 + 70)
    install(service, {failing: rest[failing]}, "failed", now=T0 + 70)
    report(service, in_flight, rest[in_flight], "downloading")

    with service.sessions.begin() as s:
        plan = rollouts.rollback(s, campaign, now=T0 + 100)
        with pytest.raises(Conflict, match="rolling_back"):
            rollouts.rollback(s, campaign)
    expected = sorted([canary, updated_1, updated_2])
    assert sorted(plan) == [(d, v1_id) for d in expected]
    view = status(service, campaign)
    assert view["state"] == "rolling_back"
    marks = {d["device_id"]: d["rollback"] for d in view["devices"]}
    assert marks == {
        **dict.fromkeys(expected, "requested"),
        unknown: "unavailable",
        failing: None,
        in_flight: "awaiting",
    }

    offers_before = len(offers_sent(service))
    back = tick(service, campaign, T0 + 101)
    assert sorted(back) == expected
    assert sorted(rollbacks_sent(service)) == [(d, 1) for d in expected], "back to v1 from the other slot"
    assert len(offers_sent(service)) == offers_before, "a rollback is no downgrade offer"
    assert tick(service, campaign, T0 + 102) == {}, "each rollback is offered once"

    install(service, {in_flight: rest[in_flight]}, now=T0 + 110)  # it committed after the rollback began
    assert list(tick(service, campaign, T0 + 120)) == [in_flight]
    with service.sessions.begin() as s, pytest.raises(Conflict, match="abort it first"):
        rollouts.create_campaign(s, MODEL, 2, Target(devices=[canary]))
    for device_id, request_id in back.items():
        report(service, device_id, request_id, "rolled_back", now=T0 + 130)
    view = status(service, campaign)
    for device_id in expected:
        row = next(d for d in view["devices"] if d["device_id"] == device_id)
        assert row["rollback"] == "rolled_back" and row["previous_version"] == 1
        assert [e["state"] for e in row["rollback_timeline"]][-1] == "rolled_back"
    with service.sessions.begin() as s:  # rolled back: the devices are free for a new campaign
        rollouts.create_campaign(s, MODEL, 2, Target(devices=expected))


def test_offline_devices_are_planned_and_get_their_offer_when_back(service: FleetService) -> None:
    online = DEVICES[:3]
    for device_id in online:
        asyncio.run(service.on_device_state(device_id, DeviceState(device_id=device_id, online=True)))
    campaign = create(service, Target(devices=DEVICES[:6]), [Phase(name="all", percent=100)])
    offers = tick(service, campaign)
    assert sorted(offers) == DEVICES[:6], "offline devices are offered like the others"
    away = DEVICES[4]
    before = len(offers_sent(service))
    asyncio.run(service.on_device_state(away, DeviceState(device_id=away, online=True)))
    assert offers_sent(service)[before:] == [(away, 2)], "the service re-sends the open offer on reconnect"
    assert status(service, campaign)["phases"][0]["in_progress"] == 6


def test_targeting_by_group_and_tag(service: FleetService) -> None:
    with service.sessions.begin() as s:
        for device_id in DEVICES[:8]:
            set_labels(s, device_id, groups=["line-1"], tags=["gpu"] if device_id < "cam-03" else [])
        for device_id in DEVICES[8:12]:
            set_labels(s, device_id, groups=["line-2"], tags=["gpu", "outdoor"])
        assert labels_of(s, "cam-09") == {"groups": ["line-2"], "tags": ["gpu", "outdoor"]}
        with pytest.raises(InvalidRequest, match="invalid label"):
            set_labels(s, "cam-01", groups=["line 1"], tags=[])
        with pytest.raises(NotFound):
            set_labels(s, "cam-99", groups=["line-1"], tags=[])

    def targeted(target: Target) -> list[str]:
        with service.sessions.begin() as s:
            campaign = rollouts.create_campaign(s, MODEL, 2, target, now=T0)
            devices = sorted(d["device_id"] for d in rollouts.status(s, campaign)["devices"])
            rollouts.abort(s, campaign)
        return devices

    assert targeted(Target(groups=["line-1"])) == DEVICES[:8]
    assert targeted(Target(tags=["outdoor"])) == DEVICES[8:12]
    assert targeted(Target(tags=["gpu"])) == [*DEVICES[:2], *DEVICES[8:12]]
    assert targeted(Target(groups=["line-2"], devices=["cam-20"])) == [*DEVICES[8:12], "cam-20"]
    with service.sessions.begin() as s:
        with pytest.raises(InvalidRequest, match="matches no device"):
            rollouts.create_campaign(s, MODEL, 2, Target(groups=["line-9"]))
        with pytest.raises(NotFound, match="cam-99"):
            rollouts.create_campaign(s, MODEL, 2, Target(devices=["cam-99"]))
        with pytest.raises(NotFound, match="push it first"):
            rollouts.create_campaign(s, MODEL, 7, Target(groups=["line-1"]))
        rollouts.create_campaign(s, MODEL, 2, Target(groups=["line-1"]))
        with pytest.raises(Conflict, match="abort it first"):
            rollouts.create_campaign(s, MODEL, 2, Target(tags=["gpu"]))


def test_devices_already_on_the_version_are_skipped(service: FleetService) -> None:
    runs(service, "cam-01", 2)
    runs(service, "cam-02", 1)
    campaign = create(service, Target(devices=DEVICES[:3]), [Phase(name="all", percent=100)])
    view = status(service, campaign)
    assert view["skipped"] == ["cam-01"]
    assert sorted(tick(service, campaign)) == ["cam-02", "cam-03"]
    everything = create(service, Target(devices=["cam-01"]), [Phase(name="all", percent=100)])
    assert status(service, everything)["state"] == "completed"


def test_a_report_that_arrives_before_the_update_is_attached_still_counts(service: FleetService) -> None:
    """A device refuses an offer within milliseconds: its report can beat the campaign's bookkeeping."""
    campaign = create(service, Target(devices=DEVICES), PHASES)

    async def start_and_refuse(name: str, version: int, device_ids: list[str]) -> list[dict[str, Any]]:
        views = await service.start_update(name, version, device_ids)
        for view in views:
            assert report(service, view["device_id"], view["update_id"], "failed", reason="disk full") is None
        return views

    asyncio.run(
        rollouts.offer_next(service.sessions, campaign, start_and_refuse, service.request_rollback, T0)
    )
    view = status(service, campaign)
    assert view["state"] == "aborted" and "disk full" in view["reason"]


def test_phases_are_validated(service: FleetService) -> None:
    with pytest.raises(ValidationError, match="exactly one of count and percent"):
        Phase(name="x", count=1, percent=10)
    with pytest.raises(ValidationError):
        AbortRule(min_agreement=97)  # a fraction, not a percent
    with pytest.raises(ValidationError, match="name devices, groups or tags"):
        Target()
    with service.sessions.begin() as s:
        with pytest.raises(InvalidRequest, match="end with a phase of percent 100"):
            rollouts.create_campaign(s, MODEL, 2, Target(devices=DEVICES), [Phase(name="half", percent=50)])
        with pytest.raises(InvalidRequest, match="cumulative"):
            rollouts.create_campaign(
                s, MODEL, 2, Target(devices=DEVICES), [Phase(name="a", count=5), Phase(name="b", count=2)]
            )
        with pytest.raises(NotFound, match="no rollout campaign"):
            rollouts.status(s, "nope")
        with pytest.raises(InvalidRequest, match="unknown update state"):
            campaign = rollouts.create_campaign(s, MODEL, 2, Target(devices=DEVICES[:1]))
            rollouts.record_outcome(s, campaign, DEVICES[0], "exploded")


def _version_id(service: FleetService, version: int) -> int:
    with service.sessions() as s:
        model = s.query(ModelVersion).filter_by(name=MODEL, version=version).one()
        return model.id
