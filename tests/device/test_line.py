"""When a proven model may switch: the line state from the plant, the fleet's switch windows, the local
API for both and for rollbacks, and the pipeline across a switch (no image dropped)."""

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from device.api import create_app
from device.api import updates as update_routes
from device.engine.engine import Engine
from device.errors import ConfigError, UpdateRejected
from device.line import LineState
from device.pipeline import FolderPipeline
from device.slots import ModelSlots
from device.switch_gate import Wait, switch_wait, window_wait
from device.update_record import UpdateRecord
from device.updater import Updater
from fleet.tuf_repository import TufRepository
from models.zoo.surface_data import write_images
from protocol.messages import UpdateOffer, UpdateState
from tests.device.test_updater import (
    MemoryFleet,
    assert_still_serving_v1,
    make_updater,
    new_fleet_tuf,
    offer_for,
    run_offer,
    serve_v1,
    until,
)

TOKEN = "line-test-token"


@pytest.fixture
def fleet_tuf(tmp_path: Path, archives: dict[int, Path]) -> TufRepository:
    return new_fleet_tuf(tmp_path, archives)


@pytest.fixture
def serving_v1(engine: Engine, data_dir: Path) -> Engine:
    return serve_v1(engine, data_dir)


# -- the line state ---------------------------------------------------------------------------------
def test_the_line_state_survives_a_restart_and_keeps_its_since(tmp_path: Path) -> None:
    path = tmp_path / "line-state.json"
    line = LineState(path)
    assert not line.busy and line.get().by == "default"
    first = line.set(True, "plc-7")
    time.sleep(0.01)
    again = line.set(True, "mes")  # still busy: `since` stays the start of the busy spell
    assert again.since == first.since and again.by == "mes"
    restarted = LineState(path)
    assert restarted.busy and restarted.get() == again
    idle = restarted.set(False, "plc-7")
    assert idle.since > first.since and not LineState(path).busy


def test_an_unreadable_line_state_counts_as_busy(tmp_path: Path) -> None:
    path = tmp_path / "line-state.json"
    path.write_text("{not json")
    line = LineState(path)
    assert line.busy and "unreadable" in line.get().by
    with pytest.raises(ConfigError, match="1 to 64 characters"):
        line.set(False, "")


# -- switch windows -----------------------------------------------------------------------------------
def test_window_math() -> None:
    windows = [(100.0, 200.0), (300.0, 400.0)]
    assert window_wait([], 50) is None, "no windows: any time"
    assert window_wait(windows, 150) is None and window_wait(windows, 300) is None
    assert window_wait(windows, 50) == Wait("maintenance window", 100.0)
    assert window_wait(windows, 200) == Wait("maintenance window", 300.0), "a window's end is outside it"
    with pytest.raises(UpdateRejected, match="every switch window of this offer has ended"):
        window_wait(windows, 400)
    busy = LineState()
    busy.set(True, "plc")
    assert switch_wait(windows, busy, 50) == Wait("maintenance window", 100.0), "the window comes first"
    assert switch_wait(windows, busy, 150) == Wait("line idle")


def test_an_offer_refuses_malformed_windows() -> None:
    offer = offer_for(b"x")
    fields = offer.model_dump(mode="json")
    with pytest.raises(ValueError, match="end > start"):
        UpdateOffer.model_validate({**fields, "switch_windows": [[200, 100]]})
    parsed = UpdateOffer.model_validate({**fields, "switch_windows": [[300, 400], [100, 200]]})
    assert parsed.switch_windows == [(100, 200), (300, 400)]
    assert UpdateOffer.model_validate(fields).switch_windows == [], "absent: any time"


def windowed(payload: bytes, start: float, end: float, **overrides: object) -> UpdateOffer:
    return offer_for(payload, **overrides).model_copy(update={"switch_windows": [(start, end)]})


def test_outside_every_window_the_model_is_proven_but_switched_only_when_one_opens(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    opens = time.time() + 2.0
    run_offer(updater, windowed(payload, opens, opens + 600))
    waiting = next(s for s in fleet.statuses if s.detail.get("waiting_for"))
    assert waiting.state is UpdateState.TESTING
    assert waiting.detail == {"waiting_for": "maintenance window", "next_start": opens}
    switched = next(s for s in fleet.statuses if s.state is UpdateState.PROBATION)
    assert switched.ts >= opens, "no switch before the window opened"
    assert fleet.states[-1] == "committed"


def test_when_every_window_has_ended_the_update_fails_and_keeps_the_old_model(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    run_offer(updater, windowed(payload, time.time() - 600, time.time() - 60))
    assert fleet.states[-2:] == ["testing", "failed"]
    assert "every switch window of this offer has ended" in fleet.statuses[-1].reason
    assert_still_serving_v1(serving_v1, data_dir)
    assert list(ModelSlots(data_dir / "models" / "surface-defect").slot_dir("b").iterdir()) == []


def test_a_restart_while_waiting_for_a_window_keeps_waiting(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    ModelSlots(data_dir / "models" / "surface-defect").unpack_into("b", archives[2])
    opens = time.time() + 3.0
    record = UpdateRecord(
        update=offer_for(payload).update,
        state=UpdateState.TESTING,
        target_slot="b",
        previous_slot="a",
        switch_windows=[(opens, opens + 600)],
        waiting_for={"waiting_for": "maintenance window", "next_start": opens},
    )
    (data_dir / "update-journal.json").write_text(json.dumps(record.to_json()))
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    asyncio.run(updater.recover())
    assert fleet.states == ["testing", "probation", "committed"], fleet.statuses
    assert fleet.statuses[0].detail["waiting_for"] == "maintenance window"
    assert fleet.statuses[1].ts >= opens
    assert serving_v1.get("surface-defect").manifest.version == 2


def test_the_fleet_can_open_a_window_by_offering_again(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    later = time.time() + 3600

    async def scenario() -> None:
        update = asyncio.create_task(updater.handle_offer(windowed(payload, later, later + 600)))
        await until(lambda: updater.record is not None and updater.record.waiting_for is not None)
        await updater.handle_offer(windowed(payload, time.time() - 1, time.time() + 600))
        await asyncio.wait_for(update, 20)

    asyncio.run(scenario())
    assert fleet.states[-1] == "committed"


# -- the line ---------------------------------------------------------------------------------------
def test_a_busy_line_defers_the_switch_until_it_is_idle(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    line = LineState(data_dir / "line-state.json")
    line.set(True, "plc")
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    updater.line = line

    async def scenario() -> float:
        update = asyncio.create_task(updater.handle_offer(offer_for(payload)))
        await until(lambda: updater.record is not None and updater.record.waiting_for is not None)
        await asyncio.sleep(1.0)  # the line stays busy a while: nothing switches
        assert_still_serving_v1(serving_v1, data_dir)
        journal = json.loads((data_dir / "update-journal.json").read_text())
        assert journal["waiting_for"] == {"waiting_for": "line idle"}, "journaled: a restart waits too"
        line.set(False, "plc")
        idle_at = time.time()
        await asyncio.wait_for(update, 20)
        return idle_at

    idle_at = asyncio.run(scenario())
    waiting = [s for s in fleet.statuses if s.detail.get("waiting_for")]
    assert [(s.state, s.detail) for s in waiting] == [(UpdateState.TESTING, {"waiting_for": "line idle"})]
    switched = next(s for s in fleet.statuses if s.state is UpdateState.PROBATION)
    assert idle_at <= switched.ts < idle_at + 1.0, "switched as soon as the line went idle"
    assert fleet.states[-1] == "committed"


# -- the pipeline across a switch -------------------------------------------------------------------
class Feeder:
    """Moves copies of real images into the inbox at a steady pace, as a camera would."""

    def __init__(self, pool: list[Path], inbox: Path, every_s: float) -> None:
        self.pool, self.inbox, self.every_s = pool, inbox, every_s
        self.fed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            source = self.pool[self.fed % len(self.pool)]
            staged = self.inbox / f".{self.fed:06d}.part"
            shutil.copyfile(source, staged)
            staged.rename(self.inbox / f"frame_{self.fed:06d}.png")
            self.fed += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> "Feeder":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    names = ("inbox", "processed", "rejected", "results", "pool")
    paths = {name: tmp_path / name for name in names}
    for path in paths.values():
        path.mkdir()
    return paths


def test_no_image_is_dropped_across_a_switch_and_a_rollback(
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    fleet_tuf: TufRepository,
    folders: dict[str, Path],
) -> None:
    pool = [path for path, _ in write_images(folders["pool"], 24, seed=5)]
    pipeline = FolderPipeline(
        serving_v1,
        "surface-defect",
        folders["inbox"],
        folders["processed"],
        folders["rejected"],
        folders["results"],
        poll_s=0.01,
    )
    fleet = MemoryFleet(archives[2].read_bytes())
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    updater.probation_s = 1.0

    async def update_then_roll_back() -> None:
        await updater.handle_offer(offer_for(archives[2].read_bytes()))
        await asyncio.sleep(0.5)
        await updater.roll_back("surface-defect", 1, "field engineer", "req-drop")

    pipeline.start()
    try:
        with Feeder(pool, folders["inbox"], every_s=0.01) as feeder:
            time.sleep(0.3)
            asyncio.run(update_then_roll_back())
            time.sleep(0.3)
        deadline = time.monotonic() + 60
        while any(folders["inbox"].glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pipeline.stop()
    results = [json.loads(line) for line in (folders["results"] / "results.jsonl").read_text().splitlines()]
    assert [s.state.value for s in fleet.statuses if s.update_id == "u1"][-1] == "committed"
    assert fleet.statuses[-1].update_id == "req-drop" and updater.state is UpdateState.ROLLED_BACK
    assert pipeline.rejected_count == 0 and not any(folders["rejected"].iterdir())
    assert len(results) == feeder.fed == len(list(folders["processed"].iterdir()))
    assert sorted(r["file"] for r in results) == [f"frame_{i:06d}.png" for i in range(feeder.fed)]
    versions = [r["version"] for r in results]
    assert versions[0] == 1 and 2 in versions and versions[-1] == 1, "v1, then v2, then v1 again"


# -- the local API ----------------------------------------------------------------------------------
@pytest.fixture
def api(
    serving_v1: Engine, data_dir: Path, archives: dict[int, Path], fleet_tuf: TufRepository
) -> Iterator[tuple[TestClient, Updater, LineState, MemoryFleet]]:
    fleet = MemoryFleet(archives[2].read_bytes())
    updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    line = LineState(data_dir / "line-state.json")
    app = create_app(serving_v1, dict, TOKEN, routers=[update_routes.router(updater, line)])
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client, updater, line, fleet


def test_the_plant_sets_the_line_state_through_the_api(
    api: tuple[TestClient, Updater, LineState, MemoryFleet],
) -> None:
    client, _, line, _ = api
    assert client.get("/api/line").json()["busy"] is False
    answer = client.put("/api/line", json={"busy": True, "by": "plc-7"})
    assert answer.status_code == 200 and answer.json()["by"] == "plc-7"
    assert line.busy
    assert client.put("/api/line", json={"busy": "maybe"}).status_code == 422
    assert client.put("/api/line", json={"busy": False, "by": "x" * 65}).status_code == 422
    denied = client.put("/api/line", json={"busy": False}, headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401 and denied.json() == {"error": "missing or wrong bearer token"}
    assert line.busy, "an unauthenticated caller changed nothing"


def test_a_field_engineer_rolls_back_through_the_api(
    api: tuple[TestClient, Updater, LineState, MemoryFleet], data_dir: Path, archives: dict[int, Path]
) -> None:
    client, updater, _, fleet = api
    empty = client.post("/api/models/surface-defect/rollback", json={"to_version": 1})
    assert empty.status_code == 409 and "is empty" in empty.json()["error"]
    assert client.post("/api/models/no-such-model/rollback").status_code == 404
    assert client.post("/api/models/..%2F..%2Fetc/rollback").status_code == 404
    run_offer(updater, offer_for(archives[2].read_bytes()))
    wrong = client.post("/api/models/surface-defect/rollback", json={"to_version": 7})
    assert wrong.status_code == 409 and "not v7" in wrong.json()["error"]
    done = client.post("/api/models/surface-defect/rollback", json={"reason": "labels look off"})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["state"] == "rolled_back" and body["version"] == 1 and body["update_id"].startswith("local-")
    assert body["reason"] == "field engineer via the local API: labels look off"
    assert fleet.statuses[-1].update_id == body["update_id"], "the fleet hears of it too"
    assert_still_serving_v1(updater.engine, data_dir)
    unauthenticated = client.post("/api/models/surface-defect/rollback", headers={"Authorization": ""})
    assert unauthenticated.status_code == 401
