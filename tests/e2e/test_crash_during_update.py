"""The agent killed with SIGKILL at points of an update: it restarts serving a complete model, and
the device's and the fleet's views agree.

A seeded spread of kill times covers the states from download to probation; bench/ will hold the
long random soak (issue #5).
"""

import random
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from edgefleet.demo import DeviceProcess, FleetProcess
from edgefleet.procs import wait_for
from fleet.client import FleetClient

pytestmark = pytest.mark.e2e
_rng = random.Random(7)
KILL_AFTER_S = sorted(round(_rng.uniform(0.05, 2.5), 2) for _ in range(5))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, archives: dict[int, Path]) -> Iterator[FleetProcess]:
    fleet = FleetProcess(tmp_path_factory.mktemp("crash") / "fleet")
    client = fleet.start()
    for archive in archives.values():
        client.push_model(archive)
    yield fleet
    fleet.stop()


def final(client: FleetClient, update_id: str) -> dict[str, object] | None:
    view = client.update(update_id)
    return view if view["state"] in ("committed", "failed", "rolled_back") else None


@pytest.mark.parametrize("kill_after_s", KILL_AFTER_S, ids=lambda s: f"kill-at-{s:.2f}s")
def test_sigkill_mid_update_converges(
    fleet: FleetProcess, archives: dict[int, Path], tmp_path: Path, kill_after_s: float
) -> None:
    client = fleet.client
    assert client is not None
    device_id = f"crash-{int(kill_after_s * 1000)}"
    device = DeviceProcess(device_id, tmp_path / device_id)
    device.provision(client, archives[1], probation_s=1.0)
    device.start()
    assert device.child is not None
    try:
        wait_for("the device online", lambda: client.device(device_id)["online"], 30)
        (update,) = client.start_update("surface-defect", 2, [device_id])
        time.sleep(kill_after_s)  # the kill instant itself is what varies; nothing waits on it
        device.child.kill()
        device.start()  # the same data dir, as after a power cut
        view = wait_for("the update to end", partial(final, client, update["update_id"]), 60)
        status = wait_for("the restarted agent's API", device.status, 30)
        model = status["models"][0]
        print(f"killed at {kill_after_s:.2f}s: update {view['state']} ({view['reason']})")
        expected = 2 if view["state"] == "committed" else 1
        assert model["version"] == expected, (view, model)
        slots_dir = device.root / "models" / "surface-defect"
        assert (slots_dir / "current").readlink().name == model["slot"]
        if view["state"] == "failed":
            assert "restarted during" in str(view["reason"]), view
    finally:
        device.stop()
