"""The fleet's MQTT worker: ingest device state, health and update statuses; answer chunk requests.

Health, statuses and chunk requests come through MQTT 5 shared subscriptions, so more workers
can share the load behind one broker. Retained state is not delivered to shared subscriptions,
so each worker reads `state` with a plain one.

Three paths, so that no device waits on another's kind of work:
- chunk and metadata requests are answered concurrently, MAX_REQUESTS_IN_FLIGHT at once (building
  the frame and awaiting its PUBACK); past that the worker reads no further message until one ends;
- state, health and update statuses go into one ordered queue (`DeviceReports`) whose database work
  runs on one thread, in arrival order, so a device's reports are recorded in the order it sent them
  and the event loop keeps answering chunk requests while SQLite commits;
- sealed telemetry goes to the `IngestBatcher` (batches in a thread, receipts after the commit).
"""

import asyncio
import contextlib
import itertools
import logging
import math
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy.exc import OperationalError

from fleet.broker_auth import FLEET_USER
from fleet.db import Update
from fleet.ingest import MAX_BATCH, IngestBatcher, Outcome
from fleet.mqtt_link import LinkError, LinkOptions, MqttLink
from fleet.service import OFFERS_IN_FLIGHT, FleetService, Report
from protocol import topics
from protocol.backoff import backoff_delay
from protocol.errors import ProtocolError
from protocol.frames import Chunk, encode_chunk
from protocol.messages import (
    ChunkRequest,
    DeviceState,
    Health,
    MetadataRequest,
    TelemetryAck,
    UpdateStatus,
    decode,
    encode,
)

log = logging.getLogger(__name__)
_Own = TypeVar("_Own", DeviceState, Health, UpdateStatus)


SESSION_EXPIRY_S = 24 * 3600
RECEIPT_INTERVAL_S = 0.2
RECEIPT_MAX_SEQS = 10_000  # per list in one TelemetryAck (its schema's bound)
RECEIPT_MAX_DELAY_S = 5.0  # a device waits at most this for its receipt (it resends after 15 s)
RECEIPTS_PER_TICK = 100  # receipts sent per tick at least, when that many devices wait
RECEIPTS_IN_FLIGHT = 64  # receipts awaiting their PUBACK at once
# Telemetry messages the broker may send the link ahead of our PUBACKs (sent once a batch is
# committed): two full ingest batches, so one gathers while the other is stored. The rest of a
# backlog waits in the broker's queue for this session, not in the worker's memory.
TELEMETRY_RECEIVE_MAXIMUM = 2 * MAX_BATCH
MAX_REQUESTS_IN_FLIGHT = 64  # chunk and metadata answers being built or awaiting their PUBACK at once
MAX_REPORTS_QUEUED = 10_000  # device reports waiting for the database; past it the worker waits
REPORTS_PER_BATCH = 200  # reports the database thread records in one transaction, at most


def _session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    return properties


@dataclass(frozen=True)
class _Report:
    device_id: str
    message: DeviceState | Health | UpdateStatus


class DeviceReports:
    """Device reports (state, health, update statuses) in one queue, recorded by one thread in order.

    One queue and one consumer keep each device's reports in the order they arrived (a status after
    the one before it, `committed` after `probation`), and the database's waits (a commit, another
    writer's lock) happen off the event loop. The thread takes what has queued up, up to
    REPORTS_PER_BATCH, and records them in one transaction.
    """

    def __init__(
        self,
        service: FleetService,
        capacity: int = MAX_REPORTS_QUEUED,
        batch: int = REPORTS_PER_BATCH,
    ) -> None:
        if capacity < 1 or batch < 1:
            raise ValueError("capacity and batch must be at least 1")
        self.service = service
        self.batch = batch
        self.recorded = 0
        self.failed = 0  # reports whose database work raised (logged; the device's next one counts)
        self._queue: queue.SimpleQueue[_Report | None] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(capacity)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resending: set[asyncio.Future[None]] = set()

    async def put(self, device_id: str, message: DeviceState | Health | UpdateStatus) -> None:
        """Queue a report; waits (and so reads no further message) while `capacity` are queued."""
        await self._room.acquire()
        self._queue.put(_Report(device_id, message))

    async def run(self) -> None:
        """Record reports until cancelled; then the ones already queued, for up to 10 s."""
        self._loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._work, name="edgefleet-device-reports", daemon=True)
        thread.start()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            self._queue.put(None)
            await asyncio.to_thread(thread.join, 10.0)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.batch:
                try:
                    report = self._queue.get_nowait()
                except queue.Empty:
                    break
                if report is None:
                    stop = True
                    break
                batch.append(report)
            self._record(batch)
            self._call_soon(self._release, len(batch))
            if stop:
                return

    def _record(self, batch: list[_Report]) -> None:
        """The batch in one transaction; if that fails, each report in its own, so that one bad
        report (or a database error) costs only itself."""
        reports: list[Report] = [(r.device_id, r.message) for r in batch]
        try:
            resend = self.service.record_reports(reports)
            self.recorded += len(batch)
        except (
            OperationalError
        ):  # the database itself (locked past its timeout, disk full): not a report's fault
            self._lost(batch)
            log.exception("recording %d reports failed; the devices report again", len(batch))
            return
        except Exception:
            if len(batch) == 1:
                self._lost(batch)
                log.exception("recording %s's %s failed", batch[0].device_id, type(batch[0].message).__name__)
                return
            log.warning("recording %d reports in one transaction failed; one by one now", len(batch))
            for report in batch:
                self._record([report])
            return
        if resend:
            self._call_soon(self._resend, resend)

    def _lost(self, batch: list[_Report]) -> None:
        self.failed += len(batch)
        self._call_soon(self._count_rejected, len(batch))

    def _call_soon(self, fn: Callable[..., object], *args: object) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while the last reports were recorded
            self._loop.call_soon_threadsafe(fn, *args)

    def _count_rejected(self, count: int) -> None:
        self.service.rejected_messages += count  # on the loop, where the worker counts the others

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._room.release()

    def _resend(self, updates: list[Update]) -> None:
        task = asyncio.ensure_future(self.service.resend_offers(updates))
        self._resending.add(task)  # held, or the loop may drop the task before it ends
        task.add_done_callback(self._resending.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: "asyncio.Future[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        # The offers stay pending; the device is sent them again when it next comes online.
        log.warning("offers not re-sent: %r", task.exception())


class FleetWorker:
    def __init__(
        self,
        service: FleetService,
        host: str,
        port: int,
        worker_id: str = "fleet-0",
        open_processes: int = 0,
        requests_in_flight: int = MAX_REQUESTS_IN_FLIGHT,
        telemetry_only: bool = False,
    ) -> None:
        """`open_processes`: child processes that open sealed telemetry (0: in this process's ingest
        thread). One worker process and its children use as many cores; so do that many workers.
        `requests_in_flight`: chunk and metadata requests answered at once.
        `telemetry_only`: only the telemetry link (an extra ingest worker, `fleet/ingest_process.py`);
        state, health, statuses and chunk requests stay with the fleet's main worker."""
        if requests_in_flight < 1:
            raise ValueError("requests_in_flight must be at least 1")
        self.service = service
        self.host = host
        self.port = port
        self.worker_id = worker_id
        self.telemetry_only = telemetry_only
        self.connected = asyncio.Event()
        self.handled: Counter[str] = Counter()  # messages per leaf, to see how workers split the load
        # Per device: seqs stored (or already held) and seqs refused for good, not yet told to it.
        self._receipts: dict[str, tuple[list[int], list[int], list[int]]] = {}  # stored, refused, rekey
        self._client: aiomqtt.Client | None = None
        self.telemetry = IngestBatcher(
            service.telemetry_ingest,
            self._receipt_all,
            processes=open_processes,
            on_handled=self._ack_telemetry,
        )
        # Sealed telemetry has its own lean MQTT 5 session (fleet/mqtt_link.py): it is most of the
        # messages, and paho's per-message cost was most of the worker's CPU beside the crypto.
        self._link: MqttLink | None = None
        self._link_session = 0  # which link session a telemetry token's packet id belongs to
        self.link_ready = asyncio.Event()
        self.reports = DeviceReports(service)
        self.requests_in_flight = requests_in_flight
        self.requests_peak = 0  # the most chunk/metadata answers in flight at once so far
        self._requests = asyncio.Semaphore(requests_in_flight)
        self._answering: set[asyncio.Task[None]] = set()

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        if not self.connected.is_set():  # wait_for costs a timer per call; a rollout makes thousands
            await asyncio.wait_for(self.connected.wait(), 30)
        assert self._client is not None
        await self._client.publish(topic, payload, qos=qos)

    async def run(self) -> None:
        helpers = [
            asyncio.create_task(self._telemetry_link_loop()),
            asyncio.create_task(self._receipt_loop()),
            asyncio.create_task(self.telemetry.run()),
            asyncio.create_task(self.reports.run()),
        ]
        try:
            if self.telemetry_only:
                await self.link_ready.wait()
                self.connected.set()
                await asyncio.gather(*helpers)
            else:
                await self._connect_loop()
        finally:
            for task in [*helpers, *self._answering]:
                task.cancel()
            await asyncio.gather(*helpers, *self._answering, return_exceptions=True)

    async def _receipt_loop(self) -> None:
        """Tell devices which records are stored, a few times a second, so their outboxes drain."""
        while True:
            await asyncio.sleep(RECEIPT_INTERVAL_S)
            if self._receipts and self.connected.is_set():
                await self._send_receipts()

    async def _send_receipts(self) -> None:
        """Receipts for the devices waiting longest: every device within RECEIPT_MAX_DELAY_S, and no
        more per tick than that needs (at least RECEIPTS_PER_TICK). A receipt costs the worker and the
        broker about what a record does, so under load each one carries more seqs instead of more
        receipts going out. RECEIPTS_IN_FLIGHT at once: one at a time would wait a round trip through
        a busy event loop per device; all at once costs aiomqtt bookkeeping that grows with the
        number pending (and a warning logged per publish past its threshold, raised here)."""
        due = max(
            RECEIPTS_PER_TICK, math.ceil(len(self._receipts) * RECEIPT_INTERVAL_S / RECEIPT_MAX_DELAY_S)
        )
        queue: deque[tuple[str, list[int], list[int], list[int]]] = deque()
        for device_id in list(itertools.islice(self._receipts, due)):  # oldest first: insertion order
            stored, refused, rekey = self._receipts.pop(device_id)
            for i in range(0, max(len(stored), len(refused), len(rekey)), RECEIPT_MAX_SEQS):
                part = slice(i, i + RECEIPT_MAX_SEQS)
                queue.append((device_id, stored[part], refused[part], rekey[part]))

        async def send() -> None:
            while queue:
                await self._send_receipt(*queue.popleft())

        if self._client is not None:  # aiomqtt warns past 10 pending calls by default
            threshold = max(self._client.pending_calls_threshold, RECEIPTS_IN_FLIGHT + 16)
            self._client.pending_calls_threshold = threshold

        await asyncio.gather(*(send() for _ in range(RECEIPTS_IN_FLIGHT)))

    async def _send_receipt(
        self, device_id: str, stored: list[int], refused: list[int], rekey: list[int]
    ) -> None:
        ack = TelemetryAck(stored=stored, refused=refused, rekey=rekey)
        topic = topics.device_topic(device_id, topics.CMD_TELEMETRY_ACK)
        link = self._link
        try:
            if link is not None and link.connected:
                await link.publish(topic, encode(ack))
            elif self.telemetry_only:
                raise LinkError("the telemetry link is down")
            else:
                await self.publish(topic, encode(ack), 1)
        except (aiomqtt.MqttError, LinkError, TimeoutError) as e:  # the device resends; we receipt it then
            log.info("receipt to %s not sent (%s)", device_id, e)

    # -- the telemetry link ---------------------------------------------------------------------
    async def _telemetry_link_loop(self) -> None:
        attempt = 0
        while True:
            link = MqttLink(await self._link_options(), self._on_telemetry, room=self.telemetry.room)
            # Before connecting: a resumed session redelivers its unacked records as soon as it is
            # up, before the SUBACK, and their tokens must name this session to be acked.
            self._link_session += 1
            self._link = link
            try:
                await link.connect()
                await link.subscribe(topics.shared(topics.all_devices(topics.TELEMETRY)), qos=1)
                self.link_ready.set()
                attempt = 0
                log.info("fleet worker %s: telemetry link subscribed", self.worker_id)
                await link.run()
            except LinkError as e:
                log.warning("fleet worker %s: telemetry link lost (%s); reconnecting", self.worker_id, e)
            finally:
                self._link = None
                await link.close()
            await asyncio.sleep(backoff_delay(attempt, base=0.2, cap=10.0))
            attempt += 1

    async def _link_options(self) -> LinkOptions:
        tls = self.service.broker_url.startswith("mqtts:")
        return LinkOptions(
            host=self.host,
            port=self.port,
            client_id=f"edgefleet-{self.worker_id}-telemetry",
            username=FLEET_USER,
            password=None if tls else self.service.fleet_mqtt_password,
            ssl_context=await asyncio.to_thread(self.service.data.ca().fleet_client_context) if tls else None,
            session_expiry_s=SESSION_EXPIRY_S,
            receive_maximum=TELEMETRY_RECEIVE_MAXIMUM,
        )

    def _on_telemetry(self, topic: str, payload: bytes, packet_id: int | None) -> None:
        token = (self._link_session, packet_id) if packet_id is not None else None
        try:
            device_id, leaf = topics.split_device_topic(topic)
            if leaf != topics.TELEMETRY:
                raise ValueError(f"{topic!r} is not a telemetry topic")
        except ValueError as e:
            self.service.rejected_messages += 1
            log.warning("rejected message on the telemetry link: %s", e)
            self._ack_telemetry([token] if token else [])
            return
        self.handled[leaf] += 1
        self.telemetry.put(device_id, payload, token)

    def _ack_telemetry(self, tokens: list[object]) -> None:
        """PUBACK handled telemetry to the broker; ids from an earlier link session are not ours to
        ack any more (the broker delivers those messages again, and the store drops the copies)."""
        link = self._link
        if link is None or not tokens:
            return
        session = self._link_session
        ids = [token[1] for token in tokens if isinstance(token, tuple) and token[0] == session]
        if ids:
            with contextlib.suppress(LinkError):
                link.ack(ids)

    def _receipt_all(self, outcomes: list[Outcome]) -> None:
        """A committed batch's receipts. Stored and duplicate records are receipted, refused ones
        too (the device counts them), and those sealed to a key this fleet no longer holds as
        `rekey` (the device seals them again); deferred ones are not, so the device resends them."""
        for outcome in outcomes:
            kind = outcome.receipt
            if kind is not None and outcome.seq is not None:
                lists = self._receipts.setdefault(outcome.device_id, ([], [], []))
                lists[("stored", "refused", "rekey").index(kind)].append(outcome.seq)

    async def _connect_loop(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as e:
                log.warning("fleet worker lost the broker (%s); reconnecting", e)
            finally:
                if self.connected.is_set():
                    attempt = 0
                self._client = None
                self.connected.clear()
            await asyncio.sleep(backoff_delay(attempt, base=0.2, cap=10.0))
            attempt += 1

    async def _session(self) -> None:
        tls = self.service.broker_url.startswith("mqtts:")
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"edgefleet-{self.worker_id}",
            username=FLEET_USER,
            # TLS (mqtts://): the workers' certificate from the fleet CA (CN = FLEET_USER) is the
            # credential and the broker is checked against the CA; plain mode: the password.
            password=None if tls else self.service.fleet_mqtt_password,
            tls_context=await asyncio.to_thread(self.service.data.ca().fleet_client_context) if tls else None,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=15,
            # A persistent session: while this worker restarts, the broker keeps its QoS 1 messages.
            clean_start=False,
            properties=_session_properties(),
        ) as client:
            self._client = client
            await client.subscribe(topics.all_devices(topics.STATE), qos=1)
            for leaf in (topics.HEALTH, topics.UPDATE_STATUS, topics.CHUNK_REQUEST, topics.METADATA_REQUEST):
                await client.subscribe(topics.shared(topics.all_devices(leaf)), qos=1)
            # Telemetry comes over the link; a session persisted by an older fleet may still hold
            # the subscription here, which would split the records between the two.
            await client.unsubscribe(topics.shared(topics.all_devices(topics.TELEMETRY)))
            if (
                client.pending_calls_threshold
                < self.requests_in_flight + RECEIPTS_IN_FLIGHT + OFFERS_IN_FLIGHT
            ):
                # aiomqtt warns past 10 pending calls; this many are by design, not a leak.
                client.pending_calls_threshold = (
                    self.requests_in_flight + RECEIPTS_IN_FLIGHT + OFFERS_IN_FLIGHT
                )
            # Connected means ready for every kind of message, telemetry included.
            await self.link_ready.wait()
            self.connected.set()
            log.info("fleet worker %s subscribed on %s:%d", self.worker_id, self.host, self.port)
            async for message in client.messages:
                await self._handle(str(message.topic), bytes(message.payload))

    async def _handle(self, topic: str, payload: bytes) -> None:
        """Route one message: answer a request in a task, queue a report, hand telemetry over."""
        try:
            device_id, leaf = topics.split_device_topic(topic)
            self.handled[leaf] += 1
            if leaf == topics.TELEMETRY:
                # Receipted once its batch is committed (IngestBatcher -> _receipt_all).
                self.telemetry.put(device_id, payload)
            elif leaf in (topics.CHUNK_REQUEST, topics.METADATA_REQUEST):
                await self._requests.acquire()  # bounded: a flood waits here, not in memory as tasks
                task = asyncio.create_task(self._answer(device_id, leaf, payload))
                self._answering.add(task)
                task.add_done_callback(self._answered)
                self.requests_peak = max(self.requests_peak, len(self._answering))
            elif leaf == topics.STATE:
                await self.reports.put(device_id, self._own(device_id, decode(DeviceState, payload)))
            elif leaf == topics.HEALTH:
                await self.reports.put(device_id, self._own(device_id, decode(Health, payload)))
            elif leaf == topics.UPDATE_STATUS:
                await self.reports.put(device_id, self._own(device_id, decode(UpdateStatus, payload)))
        except (ProtocolError, ValueError) as e:
            self.service.rejected_messages += 1
            log.warning("rejected message on %s: %s", topic, e)
        except Exception:  # one bad message must not stop ingest for every device
            self.service.rejected_messages += 1
            log.exception("error handling a message on %s", topic)

    def _answered(self, task: "asyncio.Task[None]") -> None:
        self._answering.discard(task)
        self._requests.release()

    async def _answer(self, device_id: str, leaf: str, payload: bytes) -> None:
        """A chunk or a TUF metadata file for the device that asked. Both are read from files the
        page cache holds (chunk_for remembers where an update's payload lies), so on the loop;
        a chunk of an S3 artifact not cached on this fleet's disk is fetched in a thread."""
        try:
            if leaf == topics.CHUNK_REQUEST:
                frame = await self.service.answer_chunk(device_id, decode(ChunkRequest, payload))
                answer = topics.CMD_CHUNK
            else:
                name = decode(MetadataRequest, payload).name
                data = self.service.metadata_file(name) or b""
                frame = encode_chunk(Chunk(update_id=name, offset=0, total=len(data), data=data))
                answer = topics.CMD_METADATA
            await self.publish(topics.device_topic(device_id, answer), frame, 1)
        except (ProtocolError, ValueError) as e:
            self.service.rejected_messages += 1
            log.warning("rejected %s from %s: %s", leaf, device_id, e)
        except (aiomqtt.MqttError, TimeoutError) as e:  # the device asks again after its timeout
            log.info("answer to %s's %s not sent (%s)", device_id, leaf, e)
        except Exception:
            self.service.rejected_messages += 1
            log.exception("error answering %s from %s", leaf, device_id)

    @staticmethod
    def _own(device_id: str, message: _Own) -> _Own:
        """A device speaks only for itself: the id in the payload must be the one in the topic."""
        if message.device_id != device_id:
            raise ProtocolError(f"payload names device {message.device_id!r} on {device_id!r}'s topic")
        return message
