"""A device simulator for the rollout benchmark: hundreds of devices in one process, on the real protocol.

Each simulated device is one real `device.link.DeviceLink` (one aiomqtt client, its own broker user and
password from `POST /api/devices`, a Last Will, retained `state` with an Ed25519 public key) and one real
`device.tuf_client.TufClient` (python-tuf over `update/meta-req`, its own metadata folder bootstrapped with
the fleet's root). On an offer it does what `device/updater.py` does, in the same order and with the same
checks where they touch the fleet:

    TUF refresh, the offer held to the signed targets (the updater's own `_verify_with_tuf`) -> offered ->
    downloading (chunk by chunk over `update/chunk-req`, one request in flight, each frame checked by the
    link, written to `downloads/<id>.<payload>.part`) -> verifying (the file against the signed target,
    `TufClient.verify_target`) -> applying -> staged -> testing -> probation -> committed

What it skips, because it measures the fleet and the broker, not the device: the journal writes, unpacking or
rebuilding the package into a slot, loading the model and its golden vectors, inference, and the probation
window (`--probation-s`, 0 by default). Sealed telemetry is not sent; plain health is, every
`--health-interval-s` (the agent's default, 5 s), reporting the installed version so the fleet offers a delta
(`--no-report-version`: no model in health, so the fleet offers the whole package).

Run by bench_rollout.py as a child process:

    simdevice.py --identities ids.json --home DIR --out results.json [--installed-version 1 ...]

It prints `READY <n>` once every device is connected and has published its first health, runs until
SIGTERM or SIGINT, and then writes one result per device and its own CPU and memory to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.errors import DeviceError, UpdateRejected
from device.link import DeviceLink
from device.tuf_client import TufClient, bootstrap, fetch_over_loop
from device.updater import CHUNK_ATTEMPTS, CHUNK_TIMEOUT_S, Updater
from models.signing import public_key_pem
from protocol.frames import Chunk
from protocol.messages import Health, ModelHealth, UpdateMetadata, UpdateOffer, UpdateState, UpdateStatus
from protocol.targets import archive_target_name, delta_target_name

log = logging.getLogger("simdevice")
AGENT_VERSION = "simdevice"
CONNECT_BATCH = 50  # clients opened at once; 1,000 simultaneous CONNECTs only add retries
CONNECT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


class SimError(RuntimeError):
    """The simulator cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class SimIdentity:
    """What enrollment gave one simulated device (plain mode: a broker password)."""

    device_id: str
    broker_url: str
    password: str
    tuf_root: str

    @classmethod
    def from_enrollment(cls, enrollment: dict[str, Any]) -> SimIdentity:
        """From the JSON `POST /api/devices` returns on a plain-mode fleet."""
        if "mqtt_password" not in enrollment:
            raise SimError(
                f"the enrollment of {enrollment.get('device_id')!r} has no broker password: the fleet "
                "serves TLS (mqtts) only; the simulator enrolls plain-mode devices: run the fleet without TLS"
            )
        return cls(
            device_id=str(enrollment["device_id"]),
            broker_url=str(enrollment["fleet_url"]),
            password=str(enrollment["mqtt_password"]),
            tuf_root=str(enrollment["tuf_root"]),
        )


@dataclass(frozen=True)
class Installed:
    """The package a simulated device runs: its version and the sha256 of its manifest.json."""

    name: str
    version: int
    manifest_sha256: str


@dataclass
class UpdateResult:
    """One update as the simulated device saw it; times are epoch seconds on this machine's clock."""

    device_id: str
    update_id: str = ""
    state: str = ""
    reason: str = ""
    payload: str = ""  # "delta" or "package"
    payload_bytes: int = 0  # chunk data received
    frame_bytes: int = 0  # chunk frames received: data plus each frame's header
    metadata_bytes: int = 0  # TUF metadata files received
    metadata_files: int = 0
    offer_bytes: int = 0
    chunks: int = 0
    chunk_retries: int = 0
    offer_received: float = 0.0
    offered: float = 0.0
    downloaded: float = 0.0
    committed: float = 0.0


class _CountingLink(DeviceLink):
    """The real link, counting what it brings in for the update (the bytes the benchmark reports)."""

    metadata_bytes = 0
    metadata_files = 0

    async def fetch_metadata(self, url: str, max_length: int, deadline_s: float) -> bytes:
        data = await super().fetch_metadata(url, max_length, deadline_s)
        self.metadata_bytes += len(data)
        self.metadata_files += 1
        return data


class _TufHolder:
    """The one attribute `Updater._verify_with_tuf` reads, so the simulator runs the updater's own checks."""

    def __init__(self, tuf: TufClient) -> None:
        self.tuf = tuf


def frame_header_bytes(chunk: Chunk) -> int:
    """The bytes a chunk frame carries besides its data (protocol/frames.py's layout; sha256 is 64 hex)."""
    header = {
        "update_id": chunk.update_id,
        "offset": chunk.offset,
        "total": chunk.total,
        "length": len(chunk.data),
        "sha256": "0" * 64,
    }
    return 8 + len(json.dumps(header, separators=(",", ":")))


class SimDevice:
    def __init__(
        self,
        identity: SimIdentity,
        home: Path,
        installed: Installed,
        *,
        report_version: bool = True,
        health_interval_s: float = 5.0,
        probation_s: float = 0.0,
        fsync: bool = False,
    ) -> None:
        self.identity = identity
        self.home = home
        self.installed = installed
        self.report_version = report_version
        self.health_interval_s = health_interval_s
        self.probation_s = probation_s
        self.fsync = fsync
        self.state = UpdateState.IDLE
        self.result = UpdateResult(device_id=identity.device_id)
        self._health_seq = 0
        self._started = time.monotonic()
        self._lock = asyncio.Lock()
        self.link = _CountingLink(
            identity.device_id,
            identity.broker_url,
            identity.password,
            on_offer=self._on_offer,
            agent_version=AGENT_VERSION,
            public_key=public_key_pem(Ed25519PrivateKey.generate()),
        )
        self.health_sent = asyncio.Event()
        home.mkdir(parents=True, exist_ok=True)
        bootstrap(home, identity.tuf_root.encode())
        self.tuf: TufClient | None = None

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    async def run(self) -> None:
        """Stay connected and report health until cancelled."""
        self.tuf = TufClient(self.home, fetch_over_loop(asyncio.get_running_loop(), self.link.fetch_metadata))
        link = asyncio.create_task(self.link.run())
        try:
            while True:
                await self.link.connected.wait()
                if await self.publish_health():
                    self.health_sent.set()
                await asyncio.sleep(self.health_interval_s)
        finally:
            link.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link
            await self.link.say_offline()

    async def publish_health(self) -> bool:
        models = []
        if self.report_version:
            models.append(
                ModelHealth(name=self.installed.name, version=self.installed.version, slot="a", backend="sim")
            )
        health = Health(
            device_id=self.device_id,
            seq=self._health_seq,
            ts=time.time(),
            uptime_s=time.monotonic() - self._started,
            cpu_percent=0.0,
            memory_percent=0.0,
            disk_free_bytes=10**10,
            disk_percent=10.0,
            models=models,
            update_state=self.state,
        )
        self._health_seq += 1
        return await self.link.publish_health(health)

    # -- the update ------------------------------------------------------------------------------------
    async def _on_offer(self, offer: UpdateOffer) -> None:
        meta = offer.update
        if meta.update_id == self.result.update_id:  # re-sent on reconnect: say where it stands
            await self._report(meta, self.state, self.result.reason)
            return
        async with self._lock:
            self.result = UpdateResult(
                device_id=self.device_id,
                update_id=meta.update_id,
                offer_received=time.time(),
                offer_bytes=len(offer.model_dump_json()),
            )
            try:
                await self._update(offer)
            except (DeviceError, TimeoutError, OSError) as e:
                self.result.reason = str(e)
                self.result.state = UpdateState.FAILED.value
                self.state = UpdateState.FAILED
                await self._report(meta, UpdateState.FAILED, str(e))
            finally:
                self.result.metadata_bytes = self.link.metadata_bytes
                self.result.metadata_files = self.link.metadata_files

    async def _update(self, offer: UpdateOffer) -> None:
        meta = offer.update
        if meta.model_name != self.installed.name or meta.version <= self.installed.version:
            raise UpdateRejected(f"v{meta.version} of {meta.model_name} is not newer than what runs here")
        self.link.metadata_bytes = self.link.metadata_files = 0
        verified = await asyncio.to_thread(self._verify_with_tuf, meta)
        await self._step(verified, UpdateState.OFFERED)
        self.result.offered = time.time()
        await self._step(verified, UpdateState.DOWNLOADING)
        delta = verified.delta
        usable = delta is not None and delta.base_manifest_sha256 == self.installed.manifest_sha256
        if usable and delta is not None:
            kind, size, name = (
                "delta",
                delta.size,
                delta_target_name(meta.model_name, delta.base_version, meta.version),
            )
        else:
            kind, size, name = "package", meta.size, archive_target_name(meta.model_name, meta.version)
        part = await self._download(meta.update_id, offer.chunk_size, kind, size)
        self.result.payload = kind
        self.result.downloaded = time.time()
        await self._step(verified, UpdateState.VERIFYING, payload=kind, bytes=size)
        try:
            assert self.tuf is not None
            await asyncio.to_thread(self.tuf.verify_target, name, part)
        finally:
            part.unlink(missing_ok=True)  # the slot write is skipped, so the payload has no further use
        for state in (UpdateState.APPLYING, UpdateState.STAGED, UpdateState.TESTING):
            await self._step(verified, state)
        await self._step(verified, UpdateState.PROBATION, backend="sim")
        await asyncio.sleep(self.probation_s)
        self.installed = Installed(meta.model_name, meta.version, "")  # what the slot write would have made
        await self._step(verified, UpdateState.COMMITTED)
        self.result.committed = time.time()
        self.result.state = UpdateState.COMMITTED.value
        await self.publish_health()

    def _verify_with_tuf(self, meta: UpdateMetadata) -> UpdateMetadata:
        # The updater's own check, not a copy: refresh, then every hash and size must be the signed one.
        return Updater._verify_with_tuf(cast(Updater, _TufHolder(self._tuf())), meta)

    def _tuf(self) -> TufClient:
        if self.tuf is None:
            raise SimError("the device is not running: call run() first")
        return self.tuf

    async def _download(self, update_id: str, chunk_size: int, kind: str, size: int) -> Path:
        """One chunk in flight at a time, at the device's own pace, as device/updater.py pulls them."""
        downloads = self.home / "downloads"
        downloads.mkdir(exist_ok=True)
        part = downloads / f"{update_id}.{kind}.part"
        with part.open("wb") as out:
            offset = 0
            while offset < size:
                length = min(chunk_size, size - offset)
                chunk = await self._fetch(update_id, offset, length, kind, size)
                out.write(chunk.data)
                if self.fsync:
                    out.flush()
                    await asyncio.to_thread(os.fsync, out.fileno())
                self.result.chunks += 1
                self.result.payload_bytes += len(chunk.data)
                self.result.frame_bytes += len(chunk.data) + frame_header_bytes(chunk)
                offset += length
        return part

    async def _fetch(self, update_id: str, offset: int, length: int, kind: str, total: int) -> Chunk:
        for attempt in range(CHUNK_ATTEMPTS):
            if attempt:
                self.result.chunk_retries += 1
            try:
                chunk = await self.link.fetch_chunk(update_id, offset, length, CHUNK_TIMEOUT_S, kind)
            except TimeoutError:
                continue
            if chunk.offset == offset and chunk.total == total and len(chunk.data) == length:
                return chunk
        raise TimeoutError(f"chunk at {offset} of {update_id} did not arrive after {CHUNK_ATTEMPTS} tries")

    async def _step(self, meta: UpdateMetadata, state: UpdateState, **detail: Any) -> None:
        self.state = state
        await self._report(meta, state, "", **detail)

    async def _report(self, meta: UpdateMetadata, state: UpdateState, reason: str, **detail: Any) -> None:
        status = UpdateStatus(
            device_id=self.device_id,
            update_id=meta.update_id,
            model_name=meta.model_name,
            version=meta.version,
            state=state,
            reason=reason,
            detail=detail,
        )
        await self.link.publish_update_status(status)


# -- one process of simulated devices -------------------------------------------------------------------
@dataclass
class ProcessReport:
    devices: int
    cpu_user_s: float
    cpu_system_s: float
    max_rss_bytes: int
    results: list[UpdateResult] = field(default_factory=list)


async def run_devices(
    devices: list[SimDevice], stop: asyncio.Event, ready: asyncio.Event, on_stop: Callable[[], None]
) -> None:
    """Connect the devices a batch at a time, set `ready` once all published health, run until `stop`.

    `on_stop` runs before the links are torn down: closing hundreds of clients takes seconds, and the
    results must not wait on that.
    """
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(0, len(devices), CONNECT_BATCH):
            batch = devices[i : i + CONNECT_BATCH]
            tasks += [asyncio.create_task(d.run(), name=d.device_id) for d in batch]
            await asyncio.wait_for(
                asyncio.gather(*(d.link.connected.wait() for d in batch)), CONNECT_TIMEOUT_S
            )
        await asyncio.wait_for(asyncio.gather(*(d.health_sent.wait() for d in devices)), CONNECT_TIMEOUT_S)
        ready.set()
        await stop.wait()
    finally:
        on_stop()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)


def _report(devices: list[SimDevice]) -> ProcessReport:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return ProcessReport(
        devices=len(devices),
        cpu_user_s=usage.ru_utime,
        cpu_system_s=usage.ru_stime,
        max_rss_bytes=usage.ru_maxrss * 1024,
        results=[d.result for d in devices],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identities", type=Path, required=True, help="JSON list of SimIdentity objects")
    parser.add_argument("--home", type=Path, required=True, help="folder for the devices' TUF and downloads")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="surface-defect")
    parser.add_argument("--installed-version", type=int, default=1)
    parser.add_argument("--installed-manifest-sha256", required=True)
    parser.add_argument("--no-report-version", action="store_true", help="health names no model")
    parser.add_argument("--health-interval-s", type=float, default=5.0)
    parser.add_argument("--probation-s", type=float, default=0.0)
    parser.add_argument("--fsync", action="store_true", help="fsync each chunk as the real device does")
    parser.add_argument("--threads", type=int, default=64, help="worker threads (TUF refresh, verify)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    identities = [SimIdentity(**raw) for raw in json.loads(args.identities.read_text())]
    installed = Installed(args.model, args.installed_version, args.installed_manifest_sha256)
    devices = [
        SimDevice(
            identity,
            args.home / identity.device_id,
            installed,
            report_version=not args.no_report_version,
            health_interval_s=args.health_interval_s,
            probation_s=args.probation_s,
            fsync=args.fsync,
        )
        for identity in identities
    ]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        # One TUF refresh holds a thread while it waits on the link; the default pool (6 here) would
        # queue a thousand devices' refreshes behind each other, which no real fleet of devices does.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=args.threads))
        stop, ready = asyncio.Event(), asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = asyncio.create_task(run_devices(devices, stop, ready, write_report))
        done, _ = await asyncio.wait(
            [runner, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if runner in done:
            runner.result()  # raises what stopped it
        print(f"READY {len(devices)}", flush=True)
        await runner

    def write_report() -> None:
        args.out.write_text(json.dumps(asdict(_report(devices))))

    asyncio.run(run())


if __name__ == "__main__":
    try:
        main()
    except SimError as e:
        sys.exit(f"simdevice: {e}")
    # A TUF fetch abandoned at its deadline may still hold a worker thread; the results are written.
    os._exit(0)
