"""The agent: one process that loads the models, runs the pipeline, the updater, the link and the API."""

import asyncio
import contextlib
import logging
import signal
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import uvicorn

from device.api import create_app
from device.api import updates as update_routes
from device.api.ratelimit import FailedLoginLimiter
from device.api.server import api_server_config
from device.config import DataDir, DeviceConfig, PlantSignal
from device.engine.batcher import BatchConfig
from device.engine.engine import Engine
from device.engine.probe import probe
from device.errors import ConfigError, DeviceError
from device.fleet_keys import FleetKeys
from device.health import collect, model_health
from device.line import LineState
from device.line_mqtt import PlantLineListener, PlantSignalConfig
from device.link import DeviceLink
from device.pipeline import FolderPipeline
from device.provision import renew_forever
from device.shadow import ShadowConfig, ShadowHub
from device.slots import ModelSlots
from device.telemetry.outbox import Kind, Outbox
from device.telemetry.sender import TelemetrySender
from device.tuf_client import TufClient, fetch_over_loop
from device.update_boot import load_at_boot
from device.updater import Updater
from models.signing import load_private_key, public_key_pem
from protocol.messages import RollbackCommand, TelemetryRecord, UpdateOffer, encode

log = logging.getLogger(__name__)
KEYS_RETRY_S = 30.0


def agent_version() -> str:
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0+unknown"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the agent owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


class Agent:
    def __init__(self, data: DataDir, config: DeviceConfig) -> None:
        self.data = data
        self.config = config
        self.started = time.time()
        self.version = agent_version()
        self.engine = Engine(probe(), pinned=config.backend, precision=config.precision)
        device_key = load_private_key(data.device_key)
        self.link = DeviceLink(
            config.device_id,
            config.fleet_url,
            data.optional_secret("mqtt-password"),  # plain mode only
            self._on_offer,
            self.version,
            public_key=public_key_pem(device_key),
            tls=data.link_tls(),
        )
        self.outbox = Outbox(data.outbox, config.telemetry_max_bytes)
        self.fleet_keys = FleetKeys(data.fleet_keys, data.fleet_telemetry_key)
        self.fleet_keys.telemetry_key()  # fail at start, not at the first send, without any key
        self._keys_wanted = asyncio.Event()
        self._keys_wanted_serial = 0
        self.sender = TelemetrySender(
            self.outbox,
            config.device_id,
            device_key,
            self.fleet_keys.telemetry_key,
            self.link.connected,
            self.link.publish_telemetry,
            on_rekey=lambda: self._want_keys(None),
        )
        self.fleet_keys.on_change(lambda _: self.sender.keys_changed_threadsafe())
        self.link.on_keys_wanted = self._want_keys
        self.link.on_telemetry_ack = self.sender.on_receipt
        self.link.on_rollback = self._on_rollback
        self._loop: asyncio.AbstractEventLoop | None = None
        self.line = LineState(data.root / "line-state.json")
        self.plant_line = self._plant_listener(config.plant_signal)
        self.shadow_hub = ShadowHub()
        self.tuf = TufClient(data.root, self._fetch_tuf_file)
        self.updater = Updater(
            config.device_id,
            data.root,
            self.engine,
            self.link,
            self.tuf,
            probation_s=config.probation_s,
            probation_max_error_rate=config.probation_max_error_rate,
            line=self.line,
            shadow=ShadowConfig(
                sample_rate=config.shadow_sample_rate,
                cpu_budget=config.shadow_cpu_budget,
                min_samples=config.shadow_min_samples,
                min_agreement=config.shadow_min_agreement,
                max_p95_increase=config.shadow_max_p95_increase,
            ),
            shadow_hub=self.shadow_hub,
        )
        self.slots = {s.model_name: s for s in map(ModelSlots, sorted(data.models.iterdir())) if s.exists()}
        if not self.slots:
            raise ConfigError(f"no model is installed under {data.models}: provision the device with one")
        self.pipeline: FolderPipeline | None = None
        self.health_seq = 0
        self.failed = False
        self.api_port: int | None = None

    def _plant_listener(self, plant: PlantSignal | None) -> PlantLineListener | None:
        if plant is None:
            return None
        settings = plant.model_dump()
        for name in ("credentials_file", "ca_file"):  # relative to the data dir
            if settings[name] is not None:
                settings[name] = self.data.root / settings[name]
        settings["busy_values"] = frozenset(plant.busy_values)
        settings["idle_values"] = frozenset(plant.idle_values)
        return PlantLineListener(PlantSignalConfig(**settings), self.line)

    def load_models(self) -> None:
        for name, slots in self.slots.items():
            # Crash-looping or broken new models go back to their previous slot here, before serving.
            serving = load_at_boot(self.updater, slots)
            batching = self.config.batching.get(name)
            if batching is not None:
                self.engine.configure_batching(
                    name,
                    BatchConfig(
                        batching.max_batch, batching.max_wait_ms, batching.max_queue, batching.workers
                    ),
                )
            self.engine.serve(serving)
            log.info(
                "serving %s v%d from slot %s on %s",
                name,
                serving.manifest.version,
                slots.active_slot(),
                serving.backend,
            )

    async def _on_offer(self, offer: UpdateOffer) -> None:
        await self.updater.handle_offer(offer)

    async def _on_rollback(self, command: RollbackCommand) -> None:
        reason = f"fleet: {command.reason or 'no reason given'}"
        await self.updater.roll_back(command.model_name, command.to_version, reason, command.request_id)

    def status(self) -> dict[str, Any]:
        record = self.updater.record
        outbox = self.outbox.stats()
        return {
            "device_id": self.config.device_id,
            "agent_version": self.version,
            "uptime_s": round(time.time() - self.started, 1),
            "link": {
                "broker": self.config.fleet_url,
                "connected": self.link.connected.is_set(),
                "malformed_messages": self.link.malformed_messages,
            },
            "models": [
                {
                    **self.engine.get(name).describe(),
                    "slot": self.slots[name].active_slot(),
                    "batching": self.engine.batcher_stats(name),
                }
                for name in self.engine.names()
            ],
            "last_update": record.to_json() if record else None,
            "line": self.line.get().to_json(),
            "plant_signal": self.plant_line.status() if self.plant_line else None,
            "pipeline": {
                "inferred_by_version": dict(self.pipeline.by_version) if self.pipeline else {},
                "labels": dict(self.pipeline.by_label) if self.pipeline else {},
                "rejected": self.pipeline.rejected_count if self.pipeline else 0,
            },
            "telemetry": {
                "pending": outbox.pending,
                "sent": self.sender.sent,
                "receipted_by_fleet": self.sender.receipted,
                "refused_by_fleet": self.sender.refused_by_fleet,
                "evicted": {str(k): v for k, v in outbox.evicted_by_kind.items()},
            },
            "hardware": self.engine.profile.to_dict(),
        }

    def record_metric(self, result: dict[str, Any]) -> None:
        """Called by the pipeline thread for every result; durable once this returns."""
        self._queue(Kind.METRIC, result)

    def _queue(self, kind: Kind, body: dict[str, Any]) -> None:
        self.outbox.put(kind, encode(TelemetryRecord(kind=kind.value, ts=time.time(), body=body)))
        self.sender.wakeup_threadsafe()

    def _metrics_extra(self) -> dict[str, Any]:
        outbox = self.outbox.stats()
        return {
            "telemetry_pending": outbox.pending,
            "telemetry_evicted": {str(k): v for k, v in outbox.evicted_by_kind.items()},
            "update_state": self.updater.state.value,
        }

    async def _health_loop(self) -> None:
        while True:
            slots_of = {name: s.active_slot() for name, s in self.slots.items()}
            stats = await asyncio.to_thread(self.outbox.stats)
            health = await asyncio.to_thread(
                collect,
                self.config.device_id,
                self.health_seq,
                self.started,
                self.data.root,
                model_health(self.engine, slots_of),
                self.updater.state,
                stats.pending,
                {str(k): v for k, v in stats.evicted_by_kind.items()},
            )
            self.health_seq += 1
            # The readable live copy for dashboards (best effort), and the durable one for the fleet.
            await self.link.publish_health(health.broker_view())  # the sealed copy keeps addresses
            await asyncio.to_thread(self._queue, Kind.HEALTH, health.model_dump(mode="json"))
            await asyncio.sleep(self.config.health_interval_s)

    def _api_tls_files(self) -> tuple[str | None, str | None]:
        """HTTPS with the device's own certificate (a field engineer checks it against the fleet CA
        and the device id it names); plain HTTP for a device without one or with `api_tls` off.
        The certificate is read when the API starts: a renewed one is served after a restart."""
        if not self.config.api_tls or not self.data.device_cert.exists():
            return None, None
        return str(self.data.device_cert), str(self.data.tls_key)

    def _want_keys(self, serial: int | None) -> None:
        """Refresh the keys document soon: on (re)connect (None), on a rekey receipt (None), on the
        fleet's notice of a newer serial; a notice of a serial held already is ignored."""
        if serial is None or serial > self.fleet_keys.serial():
            self._keys_wanted.set()

    async def _keys_loop(self) -> None:
        """Keep the fleet's keys document fresh: when asked, and every `keys_refresh_s` anyway."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._keys_wanted.wait(), self.config.keys_refresh_s)
            await self.link.connected.wait()
            self._keys_wanted.clear()
            try:
                await asyncio.to_thread(self.fleet_keys.refresh, self.tuf)
            except DeviceError as e:  # a TUF or transport refusal: the keys held stay in force
                log.warning("fleet keys not refreshed (%s); retrying in %.0f s", e, KEYS_RETRY_S)
                await asyncio.sleep(KEYS_RETRY_S)
                self._keys_wanted.set()
            except Exception as e:  # a malformed document signed by the fleet: keep what we hold
                log.error("fleet keys document refused (%s); keeping serial %d", e, self.fleet_keys.serial())
                await asyncio.sleep(KEYS_RETRY_S)

    def _fetch_tuf_file(self, url: str, max_length: int, deadline_s: float) -> bytes:
        """The TUF client's transport: blocking, called from the updater's worker thread."""
        if self._loop is None:
            raise TimeoutError("the agent is not running yet")
        return fetch_over_loop(self._loop, self.link.fetch_metadata)(url, max_length, deadline_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; models are loaded and proven before anything else starts."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.load_models)
        first_model = next(iter(self.slots))
        self.pipeline = FolderPipeline(
            self.engine,
            first_model,
            self.data.inbox,
            self.data.processed,
            self.data.rejected,
            self.data.results,
            self.config.pipeline_poll_s,
            on_result=self.record_metric,
            on_inference=self.shadow_hub.observe,
        )
        self.pipeline.start()
        token = self.data.ensure_api_token()
        limiter = FailedLoginLimiter()  # one count of failed logins across all routes
        app = create_app(
            self.engine,
            self.status,
            token,
            self._metrics_extra,
            limiter,
            routers=[update_routes.router(self.updater, self.line)],
            field_trust=self.fleet_keys.field_trust,
            device_id=self.config.device_id,
        )
        certfile, keyfile = self._api_tls_files()
        server = _Server(
            api_server_config(
                app, self.config.api_host, self.config.api_port, ssl_certfile=certfile, ssl_keyfile=keyfile
            )
        )
        if self.plant_line is not None:
            # Busy until the plant speaks: a restart must not switch on the last state saved.
            self.plant_line.hold_now()
        tasks = [
            asyncio.create_task(self.link.run(), name="link"),
            asyncio.create_task(self._health_loop(), name="health"),
            asyncio.create_task(self.sender.run(), name="telemetry"),
            asyncio.create_task(self._keys_loop(), name="fleet-keys"),
            asyncio.create_task(self.updater.recover(), name="recover"),
            asyncio.create_task(renew_forever(self.data), name="cert-renewal"),
            asyncio.create_task(server.serve(), name="api"),
        ]
        if self.plant_line is not None:
            tasks.insert(0, asyncio.create_task(self.plant_line.run(), name="plant-line"))
        for task in tasks:
            task.add_done_callback(lambda t: self._part_ended(t, stop))
        await self._announce_port(server, tasks[-1])
        await stop.wait()
        log.info("stopping")
        await asyncio.to_thread(self.pipeline.stop)
        await self.link.say_offline()
        server.should_exit = True
        for task in tasks[:-1]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.engine.close()
        self.outbox.close()

    def _part_ended(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """A part of the agent that dies stops the whole agent, so its supervisor restarts it whole."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("agent part %r died: %r; stopping the agent", task.get_name(), task.exception())
        self.failed = True
        stop.set()

    async def _announce_port(self, server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
        """Record the API's real port (it may have been 0 = any) so tools and tests can find it."""
        while not server.started:
            if serving.done():
                raise ConfigError(
                    f"the local API could not start on {self.config.api_host}:{self.config.api_port}"
                    " (port in use?)"
                )
            await asyncio.sleep(0.05)
        sockets = [s for srv in server.servers for s in (srv.sockets or [])]
        self.api_port = sockets[0].getsockname()[1] if sockets else self.config.api_port
        (self.data.root / "api-port").write_text(str(self.api_port))
        scheme = "https" if self._api_tls_files()[0] else "http"
        (self.data.root / "api-url").write_text(f"{scheme}://{self.config.api_host}:{self.api_port}")
        log.info("local API on %s://%s:%d", scheme, self.config.api_host, self.api_port)


def run_agent(data_dir: Path, fleet_url: str | None = None) -> None:
    data = DataDir(data_dir)
    config = data.load_config()
    if fleet_url:
        config = config.model_copy(update={"fleet_url": fleet_url})
    data.make_dirs()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(data, config)
        await agent.run(stop)
        if agent.failed:
            raise DeviceError("a part of the agent failed (see the log above); restart it")

    asyncio.run(main())
