"""The simulator against a real fleet server and its Mosquitto: it must do the update the way a device does.

.venv/bin/pytest bench/updates/test_simdevice.py -q -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simdevice import Installed, SimDevice, SimError, SimIdentity

from edgefleet.demo import SAMPLE_MODEL, FleetProcess, package_archives
from fleet.broker_auth import FLEET_USER
from fleet.client import FleetClient
from models.package_delta import manifest_sha256
from protocol import topics
from protocol.messages import UpdateMetadata, UpdateOffer, encode

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="needs Mosquitto: apt-get install mosquitto",
    ),
]
MODEL = "surface-defect"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[FleetProcess, FleetClient]]:
    process = FleetProcess(tmp_path / "fleet", broker_tls=False)
    client = process.start(timeout=60)
    try:
        for archive in package_archives(tmp_path / "packages").values():
            client.push_model(archive)
        yield process, client
    finally:
        process.stop()


def _device(client: FleetClient, device_id: str, home: Path, report_version: bool) -> SimDevice:
    identity = SimIdentity.from_enrollment(client.add_device(device_id))
    installed = Installed(MODEL, 1, manifest_sha256(SAMPLE_MODEL / "v1"))
    return SimDevice(
        identity, home / device_id, installed, report_version=report_version, health_interval_s=0.5
    )


async def _until(condition: object, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.1)


def test_rollout_commits_with_the_delta_or_the_whole_package(
    fleet: tuple[FleetProcess, FleetClient], tmp_path: Path
) -> None:
    _, client = fleet
    on_v1 = _device(client, "sim-v1", tmp_path, report_version=True)
    unknown = _device(client, "sim-unknown", tmp_path, report_version=False)

    async def scenario() -> None:
        tasks = [asyncio.create_task(d.run()) for d in (on_v1, unknown)]
        try:
            await _until(lambda: on_v1.health_sent.is_set() and unknown.health_sent.is_set(), 30)

            def reported() -> bool:
                devices = {d["device_id"]: d for d in client.devices()}
                return bool(devices["sim-v1"]["health"] and devices["sim-v1"]["health"]["models"])

            await _until(lambda: reported(), 30)
            await asyncio.to_thread(
                client.start_rollout,
                MODEL,
                2,
                {"devices": ["sim-v1", "sim-unknown"]},
                [{"name": "all", "percent": 100}],
            )
            await _until(lambda: on_v1.result.state == unknown.result.state == "committed", 60)

            def recorded() -> bool:  # the fleet records statuses on its own thread, a moment later
                return {u["state"] for u in client.updates()} == {"committed"}

            await _until(recorded, 30)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    offers = {u["device_id"]: client.update(u["update_id"]) for u in client.updates()}
    assert {o["state"] for o in offers.values()} == {"committed"}
    assert on_v1.result.payload == "delta"
    assert unknown.result.payload == "package"
    models = {m["version"]: m for m in client.models()}
    assert unknown.result.payload_bytes == models[2]["size"]
    assert 0 < on_v1.result.payload_bytes < models[2]["size"]
    assert on_v1.result.metadata_files >= 3  # timestamp, snapshot, targets (root 2 is not there: 404)
    verifying = next(e for e in offers["sim-v1"]["events"] if e["state"] == "verifying")
    assert verifying["detail"] == {"payload": "delta", "bytes": on_v1.result.payload_bytes}
    states = [e["state"] for e in offers["sim-v1"]["events"]]
    assert states == [
        "offered",
        "downloading",
        "verifying",
        "applying",
        "staged",
        "testing",
        "probation",
        "committed",
    ]


def test_an_offer_that_differs_from_the_signed_targets_is_refused_before_download(
    fleet: tuple[FleetProcess, FleetClient], tmp_path: Path
) -> None:
    process, client = fleet
    device = _device(client, "sim-forged", tmp_path, report_version=True)
    real = next(m for m in client.models() if m["version"] == 2)
    forged = UpdateOffer(
        update=UpdateMetadata(
            update_id="forged0001",
            model_name=MODEL,
            version=2,
            sha256="0" * 64,  # not the signed hash
            size=real["size"],
            created=0.0,
        )
    )
    password = (process.root / "secrets" / "broker-fleet-password").read_text().strip()

    async def scenario() -> None:
        task = asyncio.create_task(device.run())
        try:
            await _until(device.health_sent.is_set, 30)
            async with aiomqtt.Client(
                "127.0.0.1", process.broker_port, username=FLEET_USER, password=password, identifier="forger"
            ) as forger:
                await forger.publish(
                    topics.device_topic("sim-forged", topics.CMD_UPDATE), encode(forged), qos=1
                )
            await _until(lambda: device.result.state == "failed", 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert "signed target" in device.result.reason
    assert device.result.payload_bytes == 0
    assert device.result.chunks == 0


def test_a_tls_only_ticket_is_refused_with_what_to_do() -> None:
    with pytest.raises(SimError, match="run the fleet without TLS"):
        SimIdentity.from_enrollment({"device_id": "d1", "enrollment_token": "eft1_x"})
