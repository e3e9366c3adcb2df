"""An extra telemetry ingest worker in a process of its own: `fleet serve --ingest-workers N`.

Opening sealed envelopes is CPU-bound and `cryptography` holds the GIL while it works, so one
process ingests on one core; a second one sharing the telemetry subscription raises the ceiling
(bench/telemetry/RESULTS.md: 5,000 records/s kept up with two on 2 cores, ~4,300 with one). Such a
worker runs only the telemetry link (`FleetWorker(telemetry_only=True)`): state, health, update
statuses and chunk requests stay with `fleet serve`'s own worker. It reads the fleet's data dir
(database, keyring, broker credentials) and must run where that is, as the fleet's user.

    python -m fleet.ingest_process DATA_DIR BROKER_URL WORKER_ID
"""

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from urllib.parse import urlparse

from fleet.db import open_database
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir

log = logging.getLogger(__name__)


async def run_ingest_worker(data_dir: Path, broker_url: str, worker_id: str, stop: asyncio.Event) -> None:
    data = FleetDataDir(data_dir)
    service = FleetService(data, open_database(data.database), broker_url)
    parsed = urlparse(broker_url)
    port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
    worker = FleetWorker(
        service, parsed.hostname or "127.0.0.1", port, worker_id=worker_id, telemetry_only=True
    )
    task = asyncio.create_task(worker.run())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
    finally:
        for pending in (task, stopping):
            pending.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
        service.sessions.kw["bind"].dispose()
        counts = dict(service.telemetry_counts)
        print(f"{worker_id}: handled {worker.handled['telemetry']} telemetry messages: {counts}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("broker_url")
    parser.add_argument("worker_id")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s {args.worker_id} %(name)s %(levelname)s %(message)s",
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_ingest_worker(args.data_dir, args.broker_url, args.worker_id, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
