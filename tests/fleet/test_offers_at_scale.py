"""Starting a rollout to many devices: offers go out concurrently but bounded, and the delta is built
before the rollout asks for it. A real SQLite file and the real service; publishing is a coroutine
that takes as long as a broker round trip and records what was sent."""

import asyncio
import json
import time
from pathlib import Path

import pytest

from fleet.campaigns import CampaignDriver
from fleet.db import Device, open_database
from fleet.deltas import delta_path
from fleet.rollouts import Phase, Target
from fleet.service import OFFERS_IN_FLIGHT, FleetService
from fleet.store import FleetDataDir
from protocol import topics
from protocol.targets import delta_target_name
from tests.health_reports import health_report

MODEL = "surface-defect"
DEVICES = [f"cam-{i:03d}" for i in range(150)]
ROUND_TRIP_S = 0.05


class Broker:
    """What the service publishes, with a round trip's wait per message and the most waits at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.in_flight = 0
        self.peak = 0
        self.fail_for: set[str] = set()

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(ROUND_TRIP_S)
            if topic.split("/")[2] in self.fail_for:
                raise TimeoutError("the broker did not answer")
            self.sent.append((topic, payload))
        finally:
            self.in_flight -= 1

    def offered(self) -> list[str]:
        return [t.split("/")[2] for t, _ in self.sent if t.endswith("/" + topics.CMD_UPDATE)]


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def service(tmp_path: Path, archives: dict[int, Path], broker: Broker) -> FleetService:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    service = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", chunk_size=64 * 1024)
    service.publish = broker.publish
    with service.sessions.begin() as s:  # rows as enrollment leaves them; 150 password hashes cost minutes
        s.add_all(Device(id=d, mqtt_password_hash="") for d in DEVICES)
    return service


def runs(service: FleetService, device_ids: list[str], version: int) -> None:
    service.on_healths([(d, health_report(d, model=MODEL, version=version)) for d in device_ids])


def test_a_rollout_sends_its_offers_concurrently_and_bounded(
    service: FleetService, archives: dict[int, Path], broker: Broker
) -> None:
    service.register_model(archives[1])
    service.register_model(archives[2])
    runs(service, DEVICES, 1)
    assert service.delta_builds.wait(120)
    driver = CampaignDriver(service)
    started = time.perf_counter()
    campaign = asyncio.run(driver.start(MODEL, 2, Target(devices=DEVICES), [Phase(name="all", percent=100)]))
    took = time.perf_counter() - started
    assert sorted(broker.offered()) == DEVICES, "every device offered once"
    assert broker.peak == OFFERS_IN_FLIGHT, "as many in flight as allowed, never more"
    one_by_one = len(DEVICES) * ROUND_TRIP_S
    assert took < one_by_one, f"{took:.1f} s, no faster than one offer at a time ({one_by_one:.1f} s)"
    offers = [json.loads(p)["update"] for _, p in broker.sent]
    assert all(o["delta"] and o["delta"]["base_version"] == 1 for o in offers), "each offer names the delta"
    assert {d["update_state"] for d in campaign["devices"]} <= {"pending", None}
    assert all(d["update_id"] for d in campaign["devices"]), "every offer attached to the campaign"


def test_a_failed_publish_stops_the_sending_and_leaves_the_rest_pending(
    service: FleetService, archives: dict[int, Path], broker: Broker
) -> None:
    service.register_model(archives[2])
    broker.fail_for = {DEVICES[0]}
    with pytest.raises(TimeoutError):
        asyncio.run(service.start_update(MODEL, 2, DEVICES))
    sent = len(broker.offered())
    assert sent < len(DEVICES) - 1, "no new offer starts after the first failure"
    assert sent <= OFFERS_IN_FLIGHT, "only those already in flight ended"
    states = {u["state"] for u in service.list_updates()}
    assert states == {"pending"}, "unsent offers wait for their device's next connect"


def test_the_delta_is_built_when_a_version_is_registered(
    service: FleetService, archives: dict[int, Path]
) -> None:
    service.register_model(archives[1])
    runs(service, DEVICES[:3], 1)
    assert not delta_path(service.data.artifacts, MODEL, 1, 2).exists()
    service.register_model(archives[2])
    assert service.delta_builds.wait(120)
    assert delta_path(service.data.artifacts, MODEL, 1, 2).exists(), "built for the version devices run"
    listed = service.tuf.target(delta_target_name(MODEL, 1, 2))
    assert listed is not None, "and listed in the signed targets before any rollout"
    targets_version = service.tuf.version("targets")
    (view,) = asyncio.run(service.start_update(MODEL, 2, [DEVICES[0]]))
    assert service.tuf.version("targets") == targets_version, "the rollout had nothing left to list"
    assert view["state"] == "pending"


def test_the_delta_is_built_when_a_device_reports_an_older_version(
    service: FleetService, archives: dict[int, Path]
) -> None:
    service.register_model(archives[1])
    service.register_model(archives[2])
    assert service.delta_builds.wait(120)
    assert not delta_path(service.data.artifacts, MODEL, 1, 2).exists(), "no device runs v1 yet"
    runs(service, DEVICES[:1], 2)  # already on the newest: nothing to build
    assert service.delta_builds.wait(120)
    assert not delta_path(service.data.artifacts, MODEL, 1, 2).exists()
    runs(service, DEVICES[1:], 1)
    assert service.delta_builds.wait(120)
    assert delta_path(service.data.artifacts, MODEL, 1, 2).exists()
    assert service.delta_builds.failed == 0
