"""`edgefleet fleet serve`: the managed broker, the MQTT worker and the JSON API in one process
(plus `--ingest-workers` telemetry ingest processes beside it)."""

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import uvicorn

from fleet import key_rotation
from fleet.api import create_app
from fleet.artifacts import StoreOptions, open_store
from fleet.broker import ManagedBroker
from fleet.campaigns import CampaignDriver
from fleet.db import open_database
from fleet.mqtt_worker import FleetWorker
from fleet.retention import RetentionPolicy, prune
from fleet.service import FleetService
from fleet.store import FleetDataDir
from protocol.backoff import backoff_delay

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
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    retention_interval_s: float = 3600.0
    broker_check_s: float = 2.0
    # The managed broker speaks TLS with fleet-CA client certificates; False: plain TCP with passwords.
    broker_tls: bool = True
    broker_names: tuple[str, ...] = ()  # host names/addresses devices use for the broker (its cert's SAN)
    api_tls: bool = False  # serve the API over HTTPS with a fleet-CA certificate (tickets carry the CA)
    # Where archives and deltas live: the data dir's artifacts/ (default) or an S3-compatible bucket.
    artifacts: StoreOptions = field(default_factory=StoreOptions)
    # Extra telemetry ingest workers, each a process of its own (fleet/ingest_process.py): one more
    # core for opening sealed records. 0: the fleet's own worker ingests alone.
    ingest_workers: int = 0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the fleet owns shutdown and stops the broker last."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(options: ServeOptions, stop: asyncio.Event) -> None:
    data = FleetDataDir(options.data_dir)
    data.make_dirs()
    # Checked first: a wrong bucket or refused credentials stop the fleet before it starts anything.
    artifacts = await asyncio.to_thread(open_store, options.artifacts, data)
    broker: ManagedBroker | None = None
    if options.broker_url is None:
        tls = data.ca().broker_tls(options.broker_names) if options.broker_tls else None
        broker = ManagedBroker(
            data.broker, options.broker_host, options.broker_port, data.password_file, data.acl_file, tls
        )
        broker_url = broker.url
    else:
        broker_url = options.broker_url
    service = FleetService(data, open_database(data.database), broker_url, options.chunk_size, artifacts)
    await asyncio.to_thread(service.check_artifacts)
    service.write_broker_auth()
    if broker is not None:
        await asyncio.to_thread(broker.start)
        service.on_credentials_changed = broker.reload_soon
    parsed = urlparse(broker_url)
    default_port = 8883 if parsed.scheme == "mqtts" else 1883
    worker = FleetWorker(service, parsed.hostname or "127.0.0.1", parsed.port or default_port)
    service.publish = worker.publish
    campaigns = CampaignDriver(service)
    app = create_app(service, data.secret("operator-token"), campaigns)
    api_cert, api_key = _api_tls(data, options)
    server = _Server(
        uvicorn.Config(
            app,
            host=options.http_host,
            port=options.http_port,
            log_level="warning",
            access_log=False,
            ssl_certfile=api_cert,
            ssl_keyfile=api_key,
        )
    )
    tasks = [asyncio.create_task(worker.run(), name="mqtt"), asyncio.create_task(server.serve(), name="http")]
    tasks.append(asyncio.create_task(_prune_forever(service, options), name="retention"))
    tasks.append(asyncio.create_task(_resign_forever(service), name="tuf"))
    tasks.append(asyncio.create_task(campaigns.run(), name="campaigns"))
    if broker is not None:
        tasks.append(asyncio.create_task(_supervise_broker(broker, options.broker_check_s), name="broker"))
    for i in range(1, options.ingest_workers + 1):
        tasks.append(
            asyncio.create_task(_ingest_worker(data, broker_url, f"fleet-ingest-{i}"), name=f"ingest-{i}")
        )
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
        for task in (tasks[0], *tasks[2:]):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if broker is not None:
            broker.stop()


def _api_tls(data: FleetDataDir, options: ServeOptions) -> tuple[Path | None, Path | None]:
    """The API's certificate and key with `api_tls` (devices check it against their ticket's CA)."""
    if not options.api_tls:
        return None, None
    return data.ca().api_tls((options.http_host, *options.broker_names))


async def _prune_forever(service: FleetService, options: ServeOptions) -> None:
    """Telemetry retention: soon after start, then every interval; a failed run is retried next time."""
    await asyncio.sleep(min(60.0, options.retention_interval_s))
    while True:
        try:
            deleted = await asyncio.to_thread(prune, service.sessions, options.retention)
            service.pruned.update(deleted)
            if any(deleted.values()):
                log.info("telemetry retention deleted %s", deleted)
        except Exception:  # the next run tries again; ingest must not stop for this
            log.exception("telemetry retention run failed")
        await asyncio.sleep(options.retention_interval_s)


async def _resign_forever(service: FleetService, every_s: float = 3600.0) -> None:
    """Re-sign TUF metadata before it expires: devices refuse an expired timestamp (a freeze attack
    looks exactly like a fleet that stopped signing)."""
    while True:
        try:
            renewed = await asyncio.to_thread(service.tuf.refresh_expiring)
            if renewed:
                log.info("re-signed TUF metadata: %s", ", ".join(renewed))
            await key_rotation.prune(service)  # retired keys past their grace, expired revocations
        except Exception:
            log.exception("re-signing TUF metadata failed; trying again in %.0f s", every_s)
        await asyncio.sleep(every_s)


async def _supervise_broker(broker: ManagedBroker, every_s: float) -> None:
    """The managed Mosquitto is part of the fleet: if it dies, start it again (devices reconnect)."""
    while True:
        await asyncio.sleep(every_s)
        if broker.running():
            continue
        log.error("managed mosquitto exited (%s); starting it again", broker.log_tail(3))
        try:
            await asyncio.to_thread(broker.start)
        except Exception:
            log.exception("could not restart mosquitto; trying again in %.0f s", every_s)


async def _ingest_worker(data: FleetDataDir, broker_url: str, worker_id: str) -> None:
    """Run one extra ingest worker process, and again (after a pause) whenever it exits; stop it
    when cancelled. Its id is stable across restarts: the broker keeps its session and its share
    of the telemetry for it meanwhile."""
    attempt = 0
    while True:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleet.ingest_process", str(data.root), broker_url, worker_id
        )
        started = time.monotonic()
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
            raise
        attempt = 0 if time.monotonic() - started > 60 else attempt + 1
        delay = backoff_delay(attempt, base=1.0, cap=30.0)
        log.error("ingest worker %s exited with code %s; starting it again in %.1f s", worker_id, code, delay)
        await asyncio.sleep(delay)


def run_server(options: ServeOptions) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(options, stop)

    asyncio.run(main())
