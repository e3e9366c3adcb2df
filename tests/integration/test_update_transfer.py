"""An update's payload over a real Mosquitto, with the broker restarted in the middle of the transfer."""

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.engine.engine import Engine
from device.engine.probe import probe
from device.link import DeviceLink
from device.slots import ModelSlots, install_initial
from device.tuf_client import TufClient, bootstrap, fetch_over_loop
from device.updater import Updater
from edgefleet.procs import free_port
from fleet.broker import ManagedBroker
from fleet.db import open_database
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir
from models.signing import public_key_pem
from protocol.messages import ChunkRequest, UpdateOffer
from tests.integration.test_telemetry_link import until

pytestmark = pytest.mark.e2e
CHUNK = 8 * 1024


class CountingService(FleetService):
    """The real service; counts the payload bytes it serves, and can stall after a number of chunks."""

    served_bytes = 0
    served_chunks = 0
    outage_after_chunks = 0
    outage = asyncio.Event()

    async def answer_chunk(self, device_id: str, request: ChunkRequest) -> bytes:
        frame = await super().answer_chunk(device_id, request)
        self.served_chunks += 1  # every request is answered now (a refusal too; none happen here)
        self.served_bytes += min(request.length, CHUNK)
        if self.served_chunks == self.outage_after_chunks:
            self.outage.set()
        return frame


def test_a_broker_restart_mid_transfer_resumes_the_download_not_restarts_it(
    tmp_path: Path, archives: dict[int, Path]
) -> None:
    asyncio.run(_broker_restart_mid_transfer(tmp_path, archives, Engine(probe())))


async def _broker_restart_mid_transfer(tmp_path: Path, archives: dict[int, Path], engine: Engine) -> None:
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    port = free_port()
    service = CountingService(
        data, open_database(data.database), f"mqtt://127.0.0.1:{port}", chunk_size=CHUNK
    )
    service.outage = asyncio.Event()
    service.outage_after_chunks = 20
    service.register_model(archives[2])
    enrollment = service.add_device("cam-1")
    broker = ManagedBroker(data.broker, "127.0.0.1", port, data.password_file, data.acl_file)
    broker.start()

    device_root = tmp_path / "device"
    install_initial(device_root / "models", archives[1])
    slots = ModelSlots(device_root / "models" / "surface-defect")
    engine.serve(engine.prepare(slots.active_dir(), slots.active_manifest()))
    bootstrap(device_root, enrollment["tuf_root"].encode())
    updater_box: list[Updater] = []

    async def on_offer(offer: UpdateOffer) -> None:
        await updater_box[0].handle_offer(offer)

    link = DeviceLink(
        "cam-1",
        enrollment["fleet_url"],
        enrollment["mqtt_password"],
        on_offer,
        "test",
        public_key=public_key_pem(Ed25519PrivateKey.generate()),
    )
    tuf = TufClient(device_root, fetch_over_loop(asyncio.get_running_loop(), link.fetch_metadata))
    updater = Updater("cam-1", device_root, engine, link, tuf, probation_s=0)
    updater_box.append(updater)
    worker = FleetWorker(service, "127.0.0.1", port)
    service.publish = worker.publish
    tasks = [asyncio.create_task(worker.run()), asyncio.create_task(link.run())]
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        await asyncio.wait_for(link.connected.wait(), 10)
        (update,) = await service.start_update("surface-defect", 2, ["cam-1"])
        await asyncio.wait_for(service.outage.wait(), 30)
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(broker.start)
        await until(
            "the update to commit",
            lambda: service.get_update(update["update_id"])["state"] == "committed",
            60,
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        broker.stop()
    size = archives[2].stat().st_size
    assert engine.get("surface-defect").manifest.version == 2
    # Chunks in flight at the outage are asked for again; the chunks before it are not.
    assert service.served_bytes < size + 4 * CHUNK, (service.served_bytes, size)
