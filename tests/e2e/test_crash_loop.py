"""Crash-looping models and power cycles during probation, with real agents on a real fleet.

A model that crashes the runtime kills the agent while it loads, with nothing to catch. That is
simulated exactly: the test watches the agent's update journal and SIGKILLs the agent the moment the
journal says the new model is loading (and checks afterwards that the kill landed before the model
was proven). A model that fails to load with an error is covered in tests/device/test_updater.py.
"""

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.demo import DeviceProcess, FleetProcess
from edgefleet.procs import wait_for
from fleet.client import FleetClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, archives: dict[int, Path]) -> Iterator[FleetClient]:
    fleet = FleetProcess(tmp_path_factory.mktemp("crash-loop") / "fleet")
    client = fleet.start()
    for archive in archives.values():
        client.push_model(archive)
    yield client
    fleet.stop()


def journal(device: DeviceProcess) -> dict[str, Any]:
    return dict(json.loads((device.root / "update-journal.json").read_text()))


def update_state(client: FleetClient, update_id: str) -> str:
    return str(client.update(update_id)["state"])


def v2_in_probation(
    client: FleetClient, archives: dict[int, Path], root: Path, device_id: str, probation_s: float
) -> tuple[DeviceProcess, str]:
    device = DeviceProcess(device_id, root / device_id)
    device.provision(client, archives[1], probation_s=probation_s)
    device.start()
    wait_for(f"{device_id} online", lambda: client.device(device_id)["online"], 60)
    (update,) = client.start_update("surface-defect", 2, [device_id])
    wait_for("the switch to v2", lambda: update_state(client, update["update_id"]) == "probation", 60)
    return device, str(update["update_id"])


def serving(device: DeviceProcess) -> dict[str, Any]:
    return dict(device.status()["models"][0])


def kill_while_loading(device: DeviceProcess, failed_before: int) -> bool:
    """Restart the agent and SIGKILL it once the journal says this boot is loading the new model.

    True when the kill landed before the model was proven (the journal still says `loading`).
    """
    assert device.child is not None
    device.child.kill()
    device.start()
    assert device.child is not None
    deadline = time.monotonic() + 60
    while True:  # read as fast as the agent writes: the loading lasts some tens of milliseconds
        assert time.monotonic() < deadline, "the agent never started loading the new model"
        state = journal(device)
        # This boot's mark, not the last one's: the count of failed starts has caught up first.
        if state["loading"] and state["failed_starts"] == failed_before:
            break
        time.sleep(0.001)
    device.child.kill()
    return bool(journal(device)["loading"])


def test_a_model_that_kills_the_agent_while_loading_is_rolled_back_after_three_starts(
    fleet: FleetClient, archives: dict[int, Path], tmp_path: Path
) -> None:
    device, update_id = v2_in_probation(fleet, archives, tmp_path, "loop-1", probation_s=120)
    try:
        failed = attempts = 0
        while failed < 3:
            attempts += 1
            assert attempts <= 10, "the kill kept landing after the model was proven"
            if kill_while_loading(device, failed):
                failed += 1
            else:
                failed = 0  # a start that proved the model resets the count, as it should
        print(f"3 kills while loading took {attempts} starts")
        assert journal(device)["state"] == "probation", "nothing is decided before the next boot"
        device.start()  # the fourth start
        model = wait_for("the agent on v1", lambda: serving(device), 60)
        assert (model["version"], model["slot"]) == (1, "a")
        wait_for("the fleet to hear", lambda: update_state(fleet, update_id) == "rolled_back", 30)
        reason = fleet.update(update_id)["reason"]
        assert reason == "v2 failed to start 3 times in a row (the agent died while loading it)"
        assert (device.root / "models" / "surface-defect" / "current").readlink().name == "a"
    finally:
        device.stop()


def test_power_cycles_during_a_healthy_probation_do_not_roll_it_back(
    fleet: FleetClient, archives: dict[int, Path], tmp_path: Path
) -> None:
    device, update_id = v2_in_probation(fleet, archives, tmp_path, "cycle-1", probation_s=4)
    rng = random.Random(11)
    try:
        for _ in range(5):
            assert device.child is not None
            wait_for("v2 serving", lambda: serving(device)["version"] == 2, 60)
            time.sleep(rng.uniform(0, 0.5))
            device.child.kill()  # mid-probation: the model loaded and served fine
            device.start()
        ended = ("committed", "rolled_back", "failed")
        wait_for("the probation to end", lambda: update_state(fleet, update_id) in ended, 60)
        view = fleet.update(update_id)
        assert view["state"] == "committed", view
        assert "rolled_back" not in [e["state"] for e in view["events"]]
        assert journal(device)["failed_starts"] == 0
        assert serving(device)["version"] == 2
    finally:
        device.stop()
