"""The fleet worker under load, over a real Mosquitto and a real SQLite file: chunk requests are
answered while the database is stuck in a slow commit, and one device's reports keep their order."""

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from device.link import DeviceLink
from edgefleet.procs import free_port
from fleet.broker import ManagedBroker
from fleet.db import UpdateEvent, open_database
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir
from models.signing import public_key_pem
from protocol import topics
from protocol.messages import Health, UpdateOffer, UpdateState, UpdateStatus
from tests.health_reports import health_report
from tests.integration.test_telemetry_link import until

pytestmark = pytest.mark.e2e
CHUNK = 64 * 1024
DEVICES = [f"cam-{i:02d}" for i in range(12)]
WALK = [
    UpdateState.OFFERED,
    UpdateState.DOWNLOADING,
    UpdateState.VERIFYING,
    UpdateState.APPLYING,
    UpdateState.STAGED,
    UpdateState.TESTING,
    UpdateState.PROBATION,
    UpdateState.COMMITTED,
]


@dataclass
class Rig:
    service: FleetService
    worker: FleetWorker
    links: dict[str, DeviceLink]
    updates: dict[str, str]  # device id -> update id
    size: int  # the whole package's bytes


@contextlib.contextmanager
def write_lock(database: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holds SQLite's write lock, as a slow commit would: every writer waits."""
    connection = sqlite3.connect(database, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        connection.execute("ROLLBACK")
        connection.close()


@asynccontextmanager
async def rig(tmp_path: Path, archives: dict[int, Path], requests_in_flight: int = 64) -> AsyncIterator[Rig]:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    port = free_port()
    service = FleetService(data, open_database(data.database), f"mqtt://127.0.0.1:{port}", chunk_size=CHUNK)
    service.register_model(archives[2])
    passwords = {d: service.add_device(d)["mqtt_password"] for d in DEVICES}
    broker = ManagedBroker(data.broker, "127.0.0.1", port, data.password_file, data.acl_file)
    broker.start()
    worker = FleetWorker(service, "127.0.0.1", port, requests_in_flight=requests_in_flight)
    service.publish = worker.publish

    async def ignore(offer: UpdateOffer) -> None:
        return None

    key = public_key_pem(Ed25519PrivateKey.generate())
    links = {
        d: DeviceLink(d, service.broker_url, passwords[d], ignore, "test", public_key=key) for d in DEVICES
    }
    tasks = [asyncio.create_task(worker.run()), *(asyncio.create_task(link.run()) for link in links.values())]
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        await asyncio.wait_for(asyncio.gather(*(link.connected.wait() for link in links.values())), 10)
        views = await service.start_update("surface-defect", 2, DEVICES)
        updates = {v["device_id"]: v["update_id"] for v in views}
        # Each device's online state is recorded before the test holds the database.
        await until("every device online", lambda: all(d["online"] for d in service.list_devices()), 10)
        yield Rig(service, worker, links, updates, archives[2].stat().st_size)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        broker.stop()


async def download(link: DeviceLink, update_id: str, size: int) -> bytes:
    """The whole package, one chunk in flight at a time as the updater pulls it."""
    data = bytearray()
    while len(data) < size:
        chunk = await link.fetch_chunk(update_id, len(data), min(CHUNK, size - len(data)), timeout=10)
        data += chunk.data
    return bytes(data)


def status(device_id: str, update_id: str, state: UpdateState) -> UpdateStatus:
    return UpdateStatus(
        device_id=device_id, update_id=update_id, model_name="surface-defect", version=2, state=state
    )


def health(device_id: str, seq: int) -> Health:
    return health_report(device_id, seq=seq)


def events(service: FleetService, update_id: str) -> list[str]:
    """The states recorded for an update, in the order the fleet recorded them."""
    with service.sessions() as s:
        rows = s.scalars(
            select(UpdateEvent).where(UpdateEvent.update_id == update_id).order_by(UpdateEvent.id)
        )
        return [e.state for e in rows]


def test_chunks_are_answered_while_a_database_commit_is_stuck(
    tmp_path: Path, archives: dict[int, Path]
) -> None:
    asyncio.run(_chunks_while_stuck(tmp_path, archives))


async def _chunks_while_stuck(tmp_path: Path, archives: dict[int, Path]) -> None:
    async with rig(tmp_path, archives) as r:
        expected = archives[2].read_bytes()
        recorded = r.worker.reports.recorded
        with write_lock(r.service.data.database):
            # Every device reports `offered`: the report thread now waits for the lock...
            for device_id, link in r.links.items():
                await link.publish_update_status(status(device_id, r.updates[device_id], UpdateState.OFFERED))
            await until(
                "the statuses to reach the worker",
                lambda: r.worker.handled[topics.UPDATE_STATUS] == len(DEVICES),
                10,
            )
            # ...while every device downloads its whole package (9 chunks each, 10 s timeout per chunk).
            payloads = await asyncio.wait_for(
                asyncio.gather(*(download(r.links[d], r.updates[d], r.size) for d in DEVICES)), 60
            )
            assert all(p == expected for p in payloads)
            assert r.worker.reports.recorded == recorded, "the statuses waited for the lock all along"
            assert all(events(r.service, u) == [] for u in r.updates.values())
        await until(
            "the statuses to be recorded once the lock is gone",
            lambda: all(events(r.service, u) == ["offered"] for u in r.updates.values()),
            30,
        )
        assert r.worker.reports.failed == 0
        assert 1 < r.worker.requests_peak <= 64, "answered concurrently, and never more than the bound"


def test_one_devices_reports_keep_their_order(tmp_path: Path, archives: dict[int, Path]) -> None:
    asyncio.run(_reports_in_order(tmp_path, archives))


async def _reports_in_order(tmp_path: Path, archives: dict[int, Path]) -> None:
    async with rig(tmp_path, archives) as r:

        async def walk(device_id: str, seq0: int) -> None:
            link = r.links[device_id]
            for i, state in enumerate(WALK):
                await link.publish_health(health(device_id, seq0 + i))
                await link.publish_update_status(status(device_id, r.updates[device_id], state))

        # The first half of the walk queues up behind a held lock, the rest arrives after it is gone.
        with write_lock(r.service.data.database):
            walking = asyncio.gather(*(walk(d, 1) for d in DEVICES))
            await asyncio.sleep(0.5)
        await asyncio.wait_for(walking, 30)
        done = [state.value for state in WALK]
        await until(
            "every device's walk to be recorded",
            lambda: all(events(r.service, u) == done for u in r.updates.values()),
            30,
        )
        assert {v["state"] for v in r.service.list_updates()} == {"committed"}
        assert all(d["health"]["seq"] == len(WALK) for d in r.service.list_devices()), "the last health won"
        assert r.worker.reports.failed == 0


def test_chunk_requests_in_flight_are_bounded(tmp_path: Path, archives: dict[int, Path]) -> None:
    asyncio.run(_bounded(tmp_path, archives))


async def _bounded(tmp_path: Path, archives: dict[int, Path]) -> None:
    async with rig(tmp_path, archives, requests_in_flight=3) as r:
        expected = archives[2].read_bytes()
        payloads = await asyncio.wait_for(
            asyncio.gather(*(download(r.links[d], r.updates[d], r.size) for d in DEVICES)), 60
        )
        assert all(p == expected for p in payloads)
        assert r.worker.requests_peak == 3, "12 devices asking at once fill the bound and never pass it"
