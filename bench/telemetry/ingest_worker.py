"""One fleet worker process for the ingest benchmark: the fleet's own FleetService and FleetWorker.

    python bench/telemetry/ingest_worker.py DATA_DIR PORT WORKER_ID [--open-processes N]
    python bench/telemetry/ingest_worker.py DATA_DIR PORT WORKER_ID --sink v5|v311 --expect N

It serves no HTTP API: it is the MQTT side of `edgefleet fleet serve` on an existing data dir, so
several of them can share one broker's shared subscription, each in its own process (own GIL).
Prints `ready` once subscribed; runs until SIGTERM. (The benchmark profiles it from outside with
py-spy, which sees the ingest thread as well as the event loop.)

`--sink` measures the receive path alone: `link` is the FleetWorker's own telemetry link
(fleet/mqtt_link.py) and handler with the batcher's `put` replaced by a counter that acks at once
(nothing opened, stored or receipted); `v5` and `v311` are what one would use instead, a plain
aiomqtt (paho) client on the same shared subscription over MQTT 5 or 3.1.1 (Mosquitto shares
subscriptions with 3.1.1 clients too). Prints `received N` once N telemetry messages arrived.
"""

import argparse
import asyncio
import faulthandler
import inspect
import logging
import signal
import sys
from pathlib import Path

import aiomqtt

from fleet.broker_auth import FLEET_USER
from fleet.db import open_database
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir
from protocol import topics


class Counter:
    """Counts messages; every 500 it writes the count to `progress` (the sender's flow control:
    Mosquitto drops what a slow subscriber has queued past max_queued_messages)."""

    def __init__(self, expect: int, progress: Path | None) -> None:
        self.n = 0
        self.expect = expect
        self.progress = progress

    def __call__(self, *_: object) -> None:
        self.n += 1
        if self.progress is not None and self.n % 500 == 0:
            self.progress.write_text(str(self.n))
        if self.n == self.expect:
            print(f"received {self.n}", flush=True)


async def aiomqtt_sink(
    data: FleetDataDir, port: int, worker_id: str, count: Counter, stop: asyncio.Event, protocol: str
) -> None:
    """Receive the shared telemetry subscription with aiomqtt (MQTT 5 or 3.1.1) and only count."""
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"edgefleet-sink-{worker_id}",
        username=FLEET_USER,
        password=data.secret("broker-fleet-password"),
        protocol=aiomqtt.ProtocolVersion.V5 if protocol == "v5" else aiomqtt.ProtocolVersion.V311,
        keepalive=15,
    ) as client:
        await client.subscribe(topics.shared(topics.all_devices(topics.TELEMETRY)), qos=1)
        print("ready", flush=True)

        async def receive() -> None:
            async for message in client.messages:
                count(message.topic, message.payload)

        task = asyncio.create_task(receive())
        await stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("worker_id")
    parser.add_argument("--open-processes", type=int, default=None)
    parser.add_argument("--sink", choices=["link", "v5", "v311"], default=None, help="receive only; count")
    parser.add_argument("--expect", type=int, default=0, help="--sink: say when this many arrived")
    parser.add_argument("--progress", type=Path, default=None, help="--sink: keep the count here")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it stuck?
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    data = FleetDataDir(args.data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.sink in ("v5", "v311"):
        count = Counter(args.expect, args.progress)
        await aiomqtt_sink(data, args.port, args.worker_id, count, stop, args.sink)
        print(f"counts {{}} handled {{'telemetry': {count.n}}}", flush=True)
        return
    service = FleetService(data, open_database(data.database), f"mqtt://127.0.0.1:{args.port}")
    options = {}
    if args.open_processes is not None:
        if "open_processes" not in inspect.signature(FleetWorker).parameters:
            sys.exit("this FleetWorker has no open_processes option (the per-message ingest)")
        options["open_processes"] = args.open_processes
    worker = FleetWorker(service, "127.0.0.1", args.port, worker_id=args.worker_id, **options)
    service.publish = worker.publish
    if args.sink == "link":
        count = Counter(args.expect, args.progress)

        def put(device_id: str, envelope: bytes, token: object = None) -> None:
            count()
            worker._ack_telemetry([token])

        worker.telemetry.put = put  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 30)
    print("ready", flush=True)
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    counts = dict(service.telemetry_counts)
    print(f"counts {counts} handled {dict(worker.handled)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
