"""A real Mosquitto, a real fleet server and a real device agent as processes; a real update."""

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from edgefleet.demo import DeviceProcess, FleetProcess, drop_images
from edgefleet.procs import wait_for
from edgefleet.rollout_cli import render
from fleet.client import FleetClient

pytestmark = pytest.mark.e2e
STATES = ["offered", "downloading", "verifying", "applying", "staged", "testing", "probation", "committed"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetProcess]:
    fleet = FleetProcess(tmp_path / "fleet")
    fleet.start()
    yield fleet
    fleet.stop()


@pytest.fixture
def device(fleet: FleetProcess, archives: dict[int, Path], tmp_path: Path) -> Iterator[DeviceProcess]:
    assert fleet.client is not None
    for archive in archives.values():
        fleet.client.push_model(archive)
    device = DeviceProcess("cam-1", tmp_path / "cam-1")
    device.provision(fleet.client, archives[1], probation_s=1.0)
    device.start()
    try:
        wait_for("the device to come online", partial(online, fleet.client, "cam-1"), 60)
    except TimeoutError as e:
        logs = [
            f"{name}: {child.log_tail(40)}"
            for name, child in (("device", device.child), ("fleet", fleet.child))
            if child
        ]
        raise TimeoutError(f"{e}\n" + "\n".join(logs)) from None
    yield device
    device.stop()


def online(client: FleetClient, device_id: str) -> bool:
    return bool(client.device(device_id)["online"])


def final_state(client: FleetClient, update_id: str) -> str | None:
    state = client.update(update_id)["state"]
    return state if state in ("committed", "failed", "rolled_back") else None


def test_update_is_pushed_applied_and_reported(fleet: FleetProcess, device: DeviceProcess) -> None:
    client = fleet.client
    assert client is not None
    drop_images(device, 5, seed=1)
    wait_for("v1 inferences", lambda: device.inferred(1) >= 5, 30)
    wait_for("the device to report what it runs", lambda: client.device("cam-1")["health"], 30)

    (update,) = client.start_update("surface-defect", 2, ["cam-1"])
    assert wait_for("the update to end", partial(final_state, client, update["update_id"]), 60) == "committed"

    events = client.update(update["update_id"])["events"]
    assert [e["state"] for e in events] == STATES
    downloaded = events[STATES.index("verifying")]["detail"]
    assert downloaded["payload"] == "delta", "a device known to run v1 fetches the v1 -> v2 delta"
    status = device.status()
    assert status["models"][0]["version"] == 2 and status["models"][0]["slot"] == "b"
    drop_images(device, 5, seed=2)
    wait_for("v2 inferences", lambda: device.inferred(2) >= 5, 30)
    wait_for(
        "all 10 sealed metrics at the fleet",
        lambda: client.telemetry("cam-1", kind="metric")["counts"].get("metric") == 10,
        30,
    )
    seqs = [r["seq"] for r in client.telemetry("cam-1", kind="metric")["records"]]
    assert (
        len(set(seqs)) == 10
        and [r["body"]["version"] for r in client.telemetry("cam-1", kind="metric", limit=5)["records"]]
        == [2] * 5
    )
    wait_for(
        "the fleet to see v2 in health",
        lambda: client.device("cam-1")["health"]["models"][0]["version"] == 2,
        30,
    )


def test_a_rollout_campaign_reaches_the_device_and_completes(
    fleet: FleetProcess, device: DeviceProcess
) -> None:
    client = fleet.client
    assert client is not None
    wait_for("the device to report what it runs", lambda: client.device("cam-1")["health"], 30)
    client.set_labels("cam-1", ["line-1"], ["camera"])
    view = client.start_rollout("surface-defect", 2, {"groups": ["line-1"]})
    assert view["phases"][0]["name"] == "canary" and view["phases"][0]["offered"] == 1
    final = wait_for(
        "the rollout to complete",
        lambda: (v := client.rollout(view["campaign_id"]))["state"] in ("completed", "aborted") and v,
        90,
    )
    assert final["state"] == "completed" and final["progress"] == 1.0, final
    (row,) = final["devices"]
    assert row["outcome"] == "committed"
    assert [e["state"] for e in row["timeline"]][-1] == "committed"
    assert render(final).splitlines()[1].endswith("100%")


def test_an_update_the_device_refuses_leaves_it_serving(fleet: FleetProcess, device: DeviceProcess) -> None:
    client = fleet.client
    assert client is not None
    (update,) = client.start_update("surface-defect", 1, ["cam-1"])  # not newer than what it runs
    assert wait_for("the update to end", partial(final_state, client, update["update_id"]), 60) == "failed"
    assert "not newer" in client.update(update["update_id"])["reason"]
    status = device.status()
    assert status["models"][0]["version"] == 1 and status["link"]["connected"]


def test_device_going_offline_is_seen_through_its_last_will(
    fleet: FleetProcess, device: DeviceProcess
) -> None:
    client = fleet.client
    assert client is not None and device.child is not None
    device.child.kill()  # no clean goodbye: the broker publishes the Last Will
    wait_for("the fleet to see the device offline", lambda: not client.device("cam-1")["online"], 60)


def test_a_device_offline_at_offer_time_gets_it_when_it_returns(
    fleet: FleetProcess, device: DeviceProcess
) -> None:
    client = fleet.client
    assert client is not None
    device.stop()
    wait_for("the fleet to see the device offline", lambda: not client.device("cam-1")["online"], 30)
    (update,) = client.start_update("surface-defect", 2, ["cam-1"])
    assert client.update(update["update_id"])["state"] == "pending"
    device.start()
    assert wait_for("the update to end", partial(final_state, client, update["update_id"]), 60) == "committed"


def test_fleet_metrics_count_devices_and_updates(fleet: FleetProcess, device: DeviceProcess) -> None:
    client = fleet.client
    assert client is not None
    (update,) = client.start_update("surface-defect", 2, ["cam-1"])
    wait_for("the update to end", partial(final_state, client, update["update_id"]), 60)
    token = (fleet.root / "secrets" / "operator-token").read_text().strip()
    text = httpx.get(f"{fleet.url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert 'edgefleet_fleet_devices{online="true"} 1.0' in text
    assert 'edgefleet_fleet_updates{state="committed"} 1.0' in text


# Routes without the operator token: liveness, and enrollment, whose credential is the one-time
# token or a live certificate (an empty body is refused before anything else: 422).
PUBLIC = {"/healthz": 200, "/api/enroll": 422, "/api/enroll/renew": 422}


def test_the_fleet_api_needs_the_operator_token(fleet: FleetProcess) -> None:
    assert httpx.get(f"{fleet.url}/healthz").status_code == 200
    token = (fleet.root / "secrets" / "operator-token").read_text().strip()
    spec = httpx.get(f"{fleet.url}/openapi.json", headers={"Authorization": f"Bearer {token}"}).json()
    for path, methods in spec["paths"].items():
        concrete = re.sub(r"\{[a-z_]+\}", "1", path)
        for method in methods:
            response = httpx.request(method.upper(), f"{fleet.url}{concrete}")
            assert response.status_code == PUBLIC.get(path, 401), (method, path)
    for path in ("/api/devices", "/api/models", "/api/updates", "/metrics", "/openapi.json"):
        assert httpx.get(f"{fleet.url}{path}").status_code == 401
        assert httpx.get(f"{fleet.url}{path}", headers={"Authorization": "Bearer nope"}).status_code == 401
