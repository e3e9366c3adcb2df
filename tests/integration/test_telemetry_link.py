"""Sealed telemetry from a device outbox to fleet workers over a real Mosquitto, with faults."""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from device.link import DeviceLink
from device.telemetry.outbox import Kind, Outbox
from device.telemetry.sender import FleetKeySource, TelemetrySender
from edgefleet.procs import free_port
from fleet.broker import ManagedBroker
from fleet.db import TelemetryRecordRow, open_database
from fleet.ingest import Arrival, EnvelopeOpener, Outcome
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir
from models.signing import public_key_pem
from protocol.messages import TelemetryRecord, UpdateOffer, encode

pytestmark = pytest.mark.e2e


class Rig:
    def __init__(self, root: Path) -> None:
        self.data = FleetDataDir(root / "fleet")
        self.data.make_dirs()
        self.port = free_port()
        self.service = FleetService(
            self.data, open_database(self.data.database), f"mqtt://127.0.0.1:{self.port}"
        )
        self.enrollment = self.service.add_device("cam-1")
        self.broker = ManagedBroker(
            self.data.broker, "127.0.0.1", self.port, self.data.password_file, self.data.acl_file
        )
        self.outbox = Outbox(root / "outbox.sqlite", 4 * 1024 * 1024)
        self.device_key = Ed25519PrivateKey.generate()
        self.sender: TelemetrySender | None = None

    def another_service(self) -> FleetService:
        return FleetService(self.data, open_database(self.data.database), f"mqtt://127.0.0.1:{self.port}")

    def produce(self, count: int) -> None:
        for i in range(count):
            self.outbox.put(Kind.METRIC, encode(TelemetryRecord(kind="metric", ts=float(i), body={"i": i})))

    def stored_seqs(self) -> list[int]:
        """Seqs in the order the fleet stored them."""
        with self.service.sessions() as s:
            rows = s.scalars(select(TelemetryRecordRow).order_by(TelemetryRecordRow.id))
            return [r.seq for r in rows]


async def until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@asynccontextmanager
async def running(
    rig: Rig,
    workers: int = 1,
    resend_after_s: float = 2.0,
    open_processes: int = 0,
    fleet_key: FleetKeySource | None = None,
    on_rekey: Callable[[], None] = lambda: None,
) -> AsyncIterator[list[FleetWorker]]:
    async def no_offers(_: UpdateOffer) -> None:
        return None

    # Each worker after the first gets a FleetService of its own (own engine, key cache and counts),
    # as a worker in another process has; they share the SQLite file and the shared subscription.
    services = [rig.service, *(rig.another_service() for _ in range(workers - 1))]
    fleet_workers = [
        FleetWorker(service, "127.0.0.1", rig.port, worker_id=f"w{i}", open_processes=open_processes)
        for i, service in enumerate(services)
    ]
    link = DeviceLink(
        "cam-1",
        rig.enrollment["fleet_url"],
        rig.enrollment["mqtt_password"],
        no_offers,
        "test",
        public_key=public_key_pem(rig.device_key),
    )
    sender = TelemetrySender(
        rig.outbox,
        "cam-1",
        rig.device_key,
        fleet_key or (lambda: (rig.service.telemetry_key_id, rig.service.telemetry_key.public_key())),
        link.connected,
        link.publish_telemetry,
        resend_after_s=resend_after_s,
        on_rekey=on_rekey,
    )
    rig.sender = sender
    link.on_telemetry_ack = sender.on_receipt
    tasks = [asyncio.create_task(w.run()) for w in fleet_workers]
    await asyncio.gather(*(asyncio.wait_for(w.connected.wait(), 10) for w in fleet_workers))
    tasks += [asyncio.create_task(link.run()), asyncio.create_task(sender.run())]
    try:
        yield fleet_workers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_a_broker_outage_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.broker.start()

    async def scenario() -> None:
        async with running(rig):
            rig.produce(50)
            await until("the first 50 records", lambda: len(rig.stored_seqs()) == 50)
            await asyncio.to_thread(rig.broker.stop)
            rig.produce(100)  # the device keeps producing while the broker is down
            assert rig.outbox.stats().pending >= 100
            await asyncio.to_thread(rig.broker.start)
            await until("all 150 records after the outage", lambda: len(rig.stored_seqs()) == 150, 120)
            await until("the outbox to drain", lambda: rig.outbox.stats().pending == 0)

    try:
        asyncio.run(scenario())
    finally:
        rig.broker.stop()
    seqs = rig.stored_seqs()
    assert seqs == sorted(seqs) == list(range(1, 151)), "every record once, in sequence order"


@pytest.mark.parametrize("open_processes", [0, 1], ids=["open-inline", "open-in-a-child-process"])
def test_two_workers_split_the_load_and_store_each_record_once(tmp_path: Path, open_processes: int) -> None:
    rig = Rig(tmp_path)
    rig.broker.start()

    async def scenario() -> list[FleetWorker]:
        async with running(rig, workers=2, open_processes=open_processes) as workers:
            rig.produce(300)
            await until("all 300 records", lambda: len(rig.stored_seqs()) == 300, 120)
            return workers

    try:
        workers = asyncio.run(scenario())
    finally:
        rig.broker.stop()
    assert sorted(rig.stored_seqs()) == list(range(1, 301))
    share = [w.handled["telemetry"] for w in workers]
    assert all(n > 0 for n in share), (
        f"both workers should get telemetry through the shared subscription: {share}"
    )
    counts = sum((w.service.telemetry_counts for w in workers), Counter[str]())
    # Every message a worker handled was stored once, found stored already, or deferred (resent).
    assert counts["stored"] == 300 and counts["duplicate"] == sum(share) - 300 - counts["deferred"]
    assert all(w.telemetry.batches > 0 and w.telemetry.failed == 0 for w in workers)


def test_records_a_fleet_worker_lost_before_storing_are_sent_again(tmp_path: Path) -> None:
    """The broker acknowledged them, the worker died before its commit: only the fleet's receipt
    lets a record leave the device, so they come again."""
    rig = Rig(tmp_path)
    ingest = rig.service.telemetry_ingest
    real = ingest.ingest
    crashes = {"left": 20}

    def crash_first_twenty(batch: list[Arrival], opener: EnvelopeOpener | None = None) -> list[Outcome]:
        if crashes["left"] > 0:
            crashes["left"] -= len(batch)
            raise RuntimeError("worker crashed before committing")
        return real(batch, opener)

    ingest.ingest = crash_first_twenty  # type: ignore[method-assign]
    rig.broker.start()

    async def scenario() -> None:
        async with running(rig, resend_after_s=1.0):
            rig.produce(50)
            await until("all 50 records despite the lost ones", lambda: len(rig.stored_seqs()) == 50, 60)
            await until("the outbox to drain", lambda: rig.outbox.stats().pending == 0)

    try:
        asyncio.run(scenario())
    finally:
        rig.broker.stop()
    assert sorted(rig.stored_seqs()) == list(range(1, 51)) and crashes["left"] <= 0


def test_records_sealed_to_a_key_the_fleet_dropped_are_sealed_again_not_lost(tmp_path: Path) -> None:
    """A device that missed a rotation (offline past the old key's grace) seals to a key the fleet
    no longer holds: the fleet sends those seqs back as `rekey`, the device refreshes its keys and
    sends them again; nothing is refused or lost."""
    rig = Rig(tmp_path)
    ring = rig.service.keyring
    stale = (ring.current_telemetry_key()[0], ring.current_telemetry_key()[1].public_key())
    ring.rotate_telemetry()
    ring.telemetry_grace_s = 0
    assert ring.prune() == [f"telemetry:{stale[0]}"]
    known = {"key": stale}
    refreshes = []

    def refresh_keys() -> None:  # what the agent's keys loop does on a rekey receipt
        refreshes.append(1)
        known["key"] = (rig.service.telemetry_key_id, rig.service.telemetry_key.public_key())
        assert rig.sender is not None
        rig.sender.keys_changed.set()

    rig.broker.start()

    async def scenario() -> None:
        async with running(rig, fleet_key=lambda: known["key"], on_rekey=refresh_keys):
            rig.produce(30)
            await until("all 30 records", lambda: len(rig.stored_seqs()) == 30, 60)
            await until("the outbox to drain", lambda: rig.outbox.stats().pending == 0)

    try:
        asyncio.run(scenario())
    finally:
        rig.broker.stop()
    assert sorted(rig.stored_seqs()) == list(range(1, 31))
    assert rig.sender is not None and rig.sender.rekeyed > 0 and rig.sender.refused_by_fleet == 0
    assert len(refreshes) >= 1
    assert rig.service.telemetry_counts["rejected: UnknownKeyError"] > 0, "counted at the fleet"


def test_an_extra_ingest_process_takes_a_share_and_stores_each_record_once(tmp_path: Path) -> None:
    """`fleet serve --ingest-workers 1`'s child: a telemetry-only worker in its own process (its own
    core) beside the fleet's main worker, on the same shared subscription and database."""
    import subprocess
    import sys

    rig = Rig(tmp_path)
    rig.broker.start()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.ingest_process",
            str(rig.data.root),
            rig.service.broker_url,
            "ingest-1",
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    async def scenario() -> None:
        async with running(rig):
            await until("the ingest process to subscribe", lambda: _subscribed(rig, "ingest-1"), 30)
            rig.produce(300)
            await until("all 300 records", lambda: len(rig.stored_seqs()) == 300, 120)
            await until("the outbox to drain", lambda: rig.outbox.stats().pending == 0, 60)

    try:
        asyncio.run(scenario())
    finally:
        child.terminate()
        output, _ = child.communicate(timeout=30)
        rig.broker.stop()
    assert child.returncode == 0, output
    assert sorted(rig.stored_seqs()) == list(range(1, 301)), "each record stored once"
    handled = int(output.split("ingest-1: handled ")[1].split()[0])
    assert 0 < handled < 300 + 50, f"the ingest process should take a share: {output[-500:]}"


def _subscribed(rig: Rig, worker_id: str) -> bool:
    log = rig.data.broker / "mosquitto.log"
    return log.exists() and f"edgefleet-{worker_id}-telemetry" in log.read_text()
