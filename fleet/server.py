"""`edgefleet fleet serve`: the managed broker, the MQTT worker and the JSON API in one process."""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import uvicorn

from fleet.api import create_app
from fleet.broker import ManagedBroker
from fleet.db import open_database
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    broker_url: str | None = None  # None: start the embedded Mosquitto
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    chunk_size: int = 256 * 1024


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the fleet owns shutdown and stops the broker last."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(options: ServeOptions, stop: asyncio.Event) -> None:
    data = FleetDataDir(options.data_dir)
    data.make_dirs()
    broker: ManagedBroker | None = None
    if options.broker_url is None:
        broker = ManagedBroker(
            data.broker, options.broker_host, options.broker_port, data.password_file, data.acl_file
        )
        broker_url = broker.url
    else:
        broker_url = options.broker_url
    service = FleetService(data, open_database(data.database), broker_url, options.chunk_size)
    service.write_broker_auth()
    if broker is not None:
        await asyncio.to_thread(broker.start)
        service.on_credentials_changed = broker.reload
    parsed = urlparse(broker_url)
    worker = FleetWorker(service, parsed.hostname or "127.0.0.1", parsed.port or 1883)
    service.publish = worker.publish
    app = create_app(service, data.secret("operator-token"))
    server = _Server(
        uvicorn.Config(
            app, host=options.http_host, port=options.http_port, log_level="warning", access_log=False
        )
    )
    tasks = [asyncio.create_task(worker.run(), name="mqtt"), asyncio.create_task(server.serve(), name="http")]
    try:
        log.info("fleet API on http://%s:%d, broker %s", options.http_host, options.http_port, broker_url)
        done, _ = await asyncio.wait(
            [asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED
        )
        if tasks[1] in done and not stop.is_set():
            raise RuntimeError(f"the fleet API stopped: is port {options.http_port} already in use?")
        if tasks[0] in done and not stop.is_set():
            raise RuntimeError(f"the MQTT worker stopped: {tasks[0].exception()!r}")
    finally:
        server.should_exit = True
        tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if broker is not None:
            broker.stop()


def run_server(options: ServeOptions) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(options, stop)

    asyncio.run(main())
