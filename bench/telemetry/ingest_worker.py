"""One fleet worker process for the ingest benchmark: the fleet's own FleetService and FleetWorker.

    python bench/telemetry/ingest_worker.py DATA_DIR PORT WORKER_ID [--open-processes N]

It serves no HTTP API: it is the MQTT side of `edgefleet fleet serve` on an existing data dir, so
several of them can share one broker's shared subscription, each in its own process (own GIL).
Prints `ready` once subscribed; runs until SIGTERM.
"""

import argparse
import asyncio
import faulthandler
import inspect
import logging
import signal
import sys
from pathlib import Path

from fleet.db import open_database
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("worker_id")
    parser.add_argument("--open-processes", type=int, default=None)
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile the event loop thread into this file"
    )
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it stuck?
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    data = FleetDataDir(args.data_dir)
    service = FleetService(data, open_database(data.database), f"mqtt://127.0.0.1:{args.port}")
    options = {}
    if args.open_processes is not None:
        if "open_processes" not in inspect.signature(FleetWorker).parameters:
            sys.exit("this FleetWorker has no open_processes option (the per-message ingest)")
        options["open_processes"] = args.open_processes
    worker = FleetWorker(service, "127.0.0.1", args.port, worker_id=args.worker_id, **options)
    service.publish = worker.publish
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 30)
    print("ready", flush=True)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    await stop.wait()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    counts = dict(service.telemetry_counts)
    print(f"counts {counts} handled {dict(worker.handled)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
