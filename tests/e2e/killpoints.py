"""One SIGKILL of a device agent at a chosen instant of an update, and whether it converged.

Shared by tests/e2e/test_crash_during_update.py (20 seeded points in CI) and the soak in
bench/updates/soak.py (hundreds). Each point is a fresh device on a shared fleet, so points can run
in parallel; the kill instant, counted from the fleet's offer, is what varies.
"""

import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from edgefleet.demo import DeviceProcess, FleetProcess
from edgefleet.procs import wait_for
from fleet.client import FleetClient

FINAL = ("committed", "failed", "rolled_back")


@dataclass
class KillPoint:
    index: int
    kill_after_s: float
    state: str = ""  # the update's final state as the fleet recorded it
    reason: str = ""
    version: int = 0  # what the restarted agent serves
    slot: str = ""
    link: str = ""  # where models/<name>/current points on disk
    restarts: int = 0  # times the agent exited by itself afterwards and was started again
    error: str = ""  # a scenario that could not run to its end

    @property
    def problem(self) -> str:
        """Why this point did not converge; '' when the device and the fleet agree on a whole model."""
        if self.error:
            return self.error
        expected = 2 if self.state == "committed" else 1
        if self.version != expected:
            return f"fleet says {self.state}, the agent serves v{self.version}"
        if self.link != self.slot:
            return f"the agent serves slot {self.slot} but `current` points at {self.link}"
        if self.state == "failed" and "restarted during" not in self.reason:
            return f"failed for another reason than the restart: {self.reason}"
        return ""


def seeded_points(count: int, seed: int, low_s: float = 0.05, high_s: float = 2.5) -> list[KillPoint]:
    rng = random.Random(seed)
    return [KillPoint(i, round(rng.uniform(low_s, high_s), 3)) for i in range(count)]


def _final(client: FleetClient, update_id: str) -> dict[str, Any] | None:
    view = client.update(update_id)
    return view if view["state"] in FINAL else None


def _supervised(device: DeviceProcess, point: KillPoint, check: Callable[[], Any]) -> Callable[[], Any]:
    """`check`, after starting the agent again if it exited, as its service manager would."""

    def supervised() -> Any:
        if device.child is not None and not device.child.alive():
            point.restarts += 1
            device.start()
        return check()

    return supervised


def run_point(fleet: FleetProcess, archives: dict[int, Path], work: Path, point: KillPoint) -> KillPoint:
    """Provision a device on v1, offer v2, SIGKILL the agent `kill_after_s` later, restart it, and look."""
    assert fleet.client is not None
    token = (fleet.root / "secrets" / "operator-token").read_text().strip()
    client = FleetClient(fleet.url, token)  # one per thread
    device_id = f"kill-{point.index:04d}"
    device = DeviceProcess(device_id, work / device_id)
    try:
        device.provision(client, archives[1], probation_s=1.0)
        device.start()
        assert device.child is not None
        online = _supervised(device, point, lambda: client.device(device_id)["online"])
        wait_for(f"{device_id} online", online, 60)
        (update,) = client.start_update("surface-defect", 2, [device_id])
        time.sleep(point.kill_after_s)  # the kill instant is what varies; nothing waits on the update
        device.child.kill()
        device.start()  # the same data dir, as after a power cut
        ended = _supervised(device, point, partial(_final, client, update["update_id"]))
        view = wait_for(f"{device_id}'s update to end", ended, 120)
        status = wait_for(f"{device_id}'s API", _supervised(device, point, device.status), 60)
        model = status["models"][0]
        point.state, point.reason = str(view["state"]), str(view["reason"])
        point.version, point.slot = int(model["version"]), str(model["slot"])
        point.link = (device.root / "models" / "surface-defect" / "current").readlink().name
    except Exception as e:  # reported as this point's problem, with the agent's last words
        tail = device.child.log_tail(20) if device.child else ""
        point.error = f"{type(e).__name__}: {e}\n{tail}"
    finally:
        device.stop()
        client.close()
    return point


def run_points(
    fleet: FleetProcess,
    archives: dict[int, Path],
    work: Path,
    points: Iterable[KillPoint],
    parallel: int,
    on_done: Callable[[KillPoint], None] | None = None,
) -> list[KillPoint]:
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run_point, fleet, archives, work, p) for p in points]
        done = []
        for future in futures:
            point = future.result()
            if on_done is not None:
                on_done(point)
            done.append(point)
    return done
