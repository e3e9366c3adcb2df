"""Through a real agent: a rollback commanded by the fleet (`cmd/rollback`), one by a field engineer on
the local API, and a switch held back by a busy line until the plant marks it idle."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgefleet.demo import DeviceProcess, FleetProcess
from edgefleet.procs import wait_for
from fleet.broker import find_mosquitto
from fleet.client import FleetClient
from tests.plant_broker import PlantBroker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
FINAL = ("committed", "failed", "rolled_back")


@pytest.fixture
def device(tmp_path: Path, archives: dict[int, Path]) -> Iterator[tuple[FleetClient, DeviceProcess]]:
    fleet = FleetProcess(tmp_path / "fleet")
    client = fleet.start()
    for archive in archives.values():
        client.push_model(archive)
    device = DeviceProcess("cam-rb", tmp_path / "cam-rb")
    try:
        device.provision(client, archives[1], probation_s=1.0)
        device.start()
        wait_for("the device online", lambda: client.device("cam-rb")["online"], 60)
        yield client, device
    finally:
        device.stop()
        fleet.stop()


def ended(client: FleetClient, update_id: str) -> dict[str, Any] | None:
    view = client.update(update_id)
    return view if view["state"] in FINAL else None


def serving(device: DeviceProcess) -> tuple[int, str]:
    model = device.status()["models"][0]
    return int(model["version"]), str(model["slot"])


def test_rollbacks_and_a_busy_line_through_a_real_agent(
    device: tuple[FleetClient, DeviceProcess],
) -> None:
    client, agent = device
    (first,) = client.start_update("surface-defect", 2, ["cam-rb"])
    assert wait_for("v2 committed", lambda: ended(client, first["update_id"]), 60)["state"] == "committed"
    assert serving(agent) == (2, "b")

    # The operator rolls back from the fleet: the device serves v1 from slot a again.
    back = client.roll_back("cam-rb", "surface-defect", 1, "operator: false rejects on line 3")
    view = wait_for("the rollback to end", lambda: ended(client, back["update_id"]), 30)
    assert view["state"] == "rolled_back", view
    assert view["reason"] == "fleet: operator: false rejects on line 3"
    assert serving(agent) == (1, "a")

    # A second rollback has nothing to go back to that it asked for: refused, nothing changes.
    again = client.roll_back("cam-rb", "surface-defect", 1, "twice")
    refused = wait_for("the refusal", lambda: ended(client, again["update_id"]), 30)
    assert refused["state"] == "failed" and "holds surface-defect v2, not v1" in refused["reason"]
    assert serving(agent) == (1, "a")

    # The plant marks the line busy: the next update is proven but waits for it to be idle.
    assert agent.api("/api/line", "PUT", json={"busy": True, "by": "plc-3"}).status_code == 200
    (second,) = client.start_update("surface-defect", 2, ["cam-rb"])

    def waiting() -> bool:
        events = client.update(second["update_id"])["events"]
        return any(e["detail"].get("waiting_for") == "line idle" for e in events)

    wait_for("the update to wait for the line", waiting, 60)
    assert serving(agent) == (1, "a"), "no switch while the line is busy"
    assert client.update(second["update_id"])["state"] == "testing"
    assert agent.api("/api/line", "PUT", json={"busy": False, "by": "plc-3"}).status_code == 200
    assert wait_for("v2 again", lambda: ended(client, second["update_id"]), 60)["state"] == "committed"
    assert serving(agent) == (2, "b"), "written again into the slot that was not serving"

    # A field engineer rolls back on the local API.
    answer = agent.api("/api/models/surface-defect/rollback", "POST", json={"reason": "bench test"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "rolled_back" and answer.json()["version"] == 1
    assert serving(agent) == (1, "a")
    status = agent.status()
    assert status["line"]["busy"] is False and status["last_update"]["state"] == "rolled_back"


def test_a_plant_topic_holds_the_switch_until_the_line_is_idle(
    tmp_path: Path, archives: dict[int, Path]
) -> None:
    """The line state from the plant's own broker (a PLC gateway's topic), through a real agent."""
    find_mosquitto()
    plant = PlantBroker(tmp_path / "plant")
    plant.start()
    fleet = FleetProcess(tmp_path / "fleet")
    client = fleet.start()
    for archive in archives.values():
        client.push_model(archive)
    device = DeviceProcess("cam-plant", tmp_path / "cam-plant")
    try:
        device.provision(client, archives[1], probation_s=1.0)
        config = json.loads((device.root / "device.json").read_text())
        config["plant_signal"] = {"broker_url": f"mqtt://127.0.0.1:{plant.port}", "topic": "plant/l3"}
        (device.root / "device.json").write_text(json.dumps(config))
        plant_say("busy", plant.port)
        device.start()
        wait_for("the device online", lambda: client.device("cam-plant")["online"], 60)
        wait_for("the plant signal", lambda: device.status()["plant_signal"]["signal"] == "live", 30)
        assert device.status()["line"]["busy"] is True
        (update,) = client.start_update("surface-defect", 2, ["cam-plant"])

        def waiting() -> bool:
            events = client.update(update["update_id"])["events"]
            return any(e["detail"].get("waiting_for") == "line idle" for e in events)

        wait_for("the update to wait for the line", waiting, 60)
        assert serving(device) == (1, "a")
        plant_say("idle", plant.port)
        view = wait_for("v2 committed", lambda: ended(client, update["update_id"]), 60)
        assert view["state"] == "committed" and serving(device) == (2, "b")
    finally:
        device.stop()
        fleet.stop()
        plant.stop()


def plant_say(state: str, port: int) -> None:
    async def publish() -> None:
        async with aiomqtt.Client("127.0.0.1", port) as c:
            await c.publish("plant/l3", state.encode(), qos=1, retain=True)

    asyncio.run(publish())
