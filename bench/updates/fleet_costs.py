"""Where the fleet's time goes in a rollout: each message it handles, timed in-process with no broker.

    nice -n 10 .venv/bin/python bench/updates/fleet_costs.py --devices 1000

Drives the real `FleetService` and `CampaignDriver` (SQLite in a temp folder, the real artifacts, TUF
repository and delta builder) through what N devices make it do in one rollout of surface-defect v1 -> v2:
enrollment, the `state` and `health` each device sends, the rollout's POST (campaign, offers), and per
device the TUF metadata files, the delta's chunks and the eight statuses offered ... committed, in the
order the MQTT worker would see them. Publishing is a stub that only counts bytes, so these are the
fleet's own costs, without MQTT (aiomqtt, paho) and without waiting on the broker. CPU and wall per
message; the end-to-end figures are bench_rollout.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.demo import package_archives
from fleet.campaigns import CampaignDriver
from fleet.db import open_database
from fleet.rollouts import Phase, Target
from fleet.service import FleetService
from fleet.store import FleetDataDir
from models.signing import public_key_pem
from protocol.frames import decode_chunk
from protocol.messages import ChunkRequest, DeviceState, Health, ModelHealth, UpdateState, UpdateStatus

MODEL = "surface-defect"
STATES = [
    UpdateState.OFFERED,
    UpdateState.DOWNLOADING,
    UpdateState.VERIFYING,
    UpdateState.APPLYING,
    UpdateState.STAGED,
    UpdateState.TESTING,
    UpdateState.PROBATION,
    UpdateState.COMMITTED,
]


class Timer:
    """CPU and wall time per kind of operation."""

    def __init__(self) -> None:
        self.cpu: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}

    def run(self, kind: str, fn: Callable[[], Any]) -> Any:
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        self.cpu.setdefault(kind, []).append(time.process_time() - cpu)
        self.wall.setdefault(kind, []).append(time.perf_counter() - wall)
        return result

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            kind: {
                "count": len(values),
                "cpu_ms_median": statistics.median(values) * 1000,
                "cpu_ms_mean": statistics.fmean(values) * 1000,
                "wall_ms_median": statistics.median(self.wall[kind]) * 1000,
                "cpu_s_total": sum(values),
            }
            for kind, values in self.cpu.items()
        }


def health(device_id: str) -> Health:
    return Health(
        device_id=device_id,
        seq=1,
        ts=time.time(),
        uptime_s=1.0,
        cpu_percent=0.0,
        memory_percent=0.0,
        disk_free_bytes=10**10,
        disk_percent=10.0,
        models=[ModelHealth(name=MODEL, version=1, slot="a", backend="sim")],
    )


async def measure(devices: int, folder: Path) -> dict[str, Any]:
    archives = package_archives(folder / "packages")
    data = FleetDataDir(folder / "fleet")
    data.make_dirs()
    service = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", 64 * 1024)
    service.write_broker_auth()
    sent: dict[str, int] = {}

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        leaf = topic.split("/", 3)[-1]
        sent[leaf] = sent.get(leaf, 0) + len(payload)

    service.publish = publish
    driver = CampaignDriver(service)
    timer = Timer()
    for version in sorted(archives):
        service.register_model(archives[version])
    ids = [f"sim-{i:05d}" for i in range(devices)]
    key = public_key_pem(Ed25519PrivateKey.generate())
    for device_id in ids:
        timer.run("enroll (POST /api/devices)", partial(service.add_device, device_id))
    for device_id in ids:
        online = DeviceState(device_id=device_id, online=True, public_key=key)
        cpu, wall = time.process_time(), time.perf_counter()
        await service.on_device_state(device_id, online)
        timer.cpu.setdefault("state", []).append(time.process_time() - cpu)
        timer.wall.setdefault("state", []).append(time.perf_counter() - wall)
        timer.run("health", partial(service.on_health, device_id, health(device_id)))
    cpu, wall = time.process_time(), time.perf_counter()
    campaign = await driver.start(MODEL, 2, Target(devices=ids), [Phase(name="all", percent=100)])
    rollout_post = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    updates = {d["device_id"]: d["update_id"] for d in campaign["devices"]}
    offer = service.get_update(updates[ids[0]])
    delta_size = _delta_size(service, updates[ids[0]])
    names = ["2.root.json", "timestamp.json", f"{service.tuf.version('snapshot')}.snapshot.json"]
    names.append(f"{service.tuf.version('targets')}.targets.json")
    for device_id in ids:
        update_id = updates[device_id]
        for name in names:
            timer.run("metadata request", partial(service.metadata_file, name))
        for state in STATES[:2]:
            timer.run(
                "status", partial(service.on_update_status, device_id, _status(device_id, update_id, state))
            )
        for offset in range(0, delta_size, service.chunk_size):
            request = ChunkRequest(
                update_id=update_id,
                offset=offset,
                length=min(service.chunk_size, delta_size - offset),
                payload="delta",
            )
            frame = timer.run("chunk request", partial(service.chunk_for, device_id, request))
            decode_chunk(frame)  # a refusal (ChunkUnavailable) raises ProtocolError, saying why
        for state in STATES[2:]:
            timer.run(
                "status", partial(service.on_update_status, device_id, _status(device_id, update_id, state))
            )
    final = driver.status(campaign["campaign_id"])
    if final["state"] != "completed":
        raise RuntimeError(f"the campaign ended {final['state']}: {final['reason']}")
    costs = timer.summary()
    per_device = sum(c["cpu_s_total"] for k, c in costs.items() if not k.startswith("enroll")) / devices
    return {
        "devices": devices,
        "whatif": _patched(),
        "delta_bytes": delta_size,
        "offer_state": offer["state"],
        "rollout_post": rollout_post,
        "costs": costs,
        "fleet_cpu_s_per_device_without_mqtt": per_device + rollout_post["cpu_s"] / devices,
        "published_bytes": sent,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _patched() -> bool:
    from fleet import rollouts

    return rollouts.record_update_report.__name__ != "record_update_report"


def _delta_size(service: FleetService, update_id: str) -> int:
    from fleet.db import Update

    with service.sessions() as s:
        update = s.get(Update, update_id)
        assert update is not None
        return int(update.offer["update"]["delta"]["size"])


def _status(device_id: str, update_id: str, state: UpdateState) -> UpdateStatus:
    return UpdateStatus(device_id=device_id, update_id=update_id, model_name=MODEL, version=2, state=state)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--whatif", action="store_true", help="with whatif_fleet.py's change 3 applied")
    args = parser.parse_args()
    if args.whatif:
        from whatif_fleet import skip_unchanging_reports

        skip_unchanging_reports()
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-costs-") as tmp:
        result = asyncio.run(measure(args.devices, Path(tmp)))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
