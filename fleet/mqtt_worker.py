"""The fleet's MQTT worker: ingest device state, health and update statuses; answer chunk requests.

Health, statuses and chunk requests come through MQTT 5 shared subscriptions, so more workers
can share the load behind one broker. Retained state is not delivered to shared subscriptions,
so each worker reads `state` with a plain one.
"""

import asyncio
import itertools
import logging
import math
from collections import Counter, deque
from typing import TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.broker_auth import FLEET_USER
from fleet.ingest import IngestBatcher, Outcome
from fleet.service import FleetService
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


def _session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    return properties


class FleetWorker:
    def __init__(
        self,
        service: FleetService,
        host: str,
        port: int,
        worker_id: str = "fleet-0",
        open_processes: int = 0,
    ) -> None:
        """`open_processes`: child processes that open sealed telemetry (0: in this process's ingest
        thread). One worker process and its children use as many cores; so do that many workers."""
        self.service = service
        self.host = host
        self.port = port
        self.worker_id = worker_id
        self.connected = asyncio.Event()
        self.handled: Counter[str] = Counter()  # messages per leaf, to see how workers split the load
        # Per device: seqs stored (or already held) and seqs refused for good, not yet told to it.
        self._receipts: dict[str, tuple[list[int], list[int], list[int]]] = {}  # stored, refused, rekey
        self._client: aiomqtt.Client | None = None
        self.telemetry = IngestBatcher(service.telemetry_ingest, self._receipt_all, processes=open_processes)

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        await asyncio.wait_for(self.connected.wait(), 30)
        assert self._client is not None
        await self._client.publish(topic, payload, qos=qos)

    async def run(self) -> None:
        helpers = [asyncio.create_task(self._receipt_loop()), asyncio.create_task(self.telemetry.run())]
        try:
            await self._connect_loop()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

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
        try:
            await self.publish(topics.device_topic(device_id, topics.CMD_TELEMETRY_ACK), encode(ack), 1)
        except (aiomqtt.MqttError, TimeoutError) as e:  # the device resends; we receipt it then
            log.info("receipt to %s not sent (%s)", device_id, e)

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
            for leaf in (
                topics.HEALTH,
                topics.UPDATE_STATUS,
                topics.CHUNK_REQUEST,
                topics.METADATA_REQUEST,
                topics.TELEMETRY,
            ):
                await client.subscribe(topics.shared(topics.all_devices(leaf)), qos=1)
            self.connected.set()
            log.info("fleet worker %s subscribed on %s:%d", self.worker_id, self.host, self.port)
            async for message in client.messages:
                await self._handle(str(message.topic), bytes(message.payload))

    async def _handle(self, topic: str, payload: bytes) -> None:
        try:
            device_id, leaf = topics.split_device_topic(topic)
            self.handled[leaf] += 1
            if leaf == topics.STATE:
                await self.service.on_device_state(
                    device_id, self._own(device_id, decode(DeviceState, payload))
                )
            elif leaf == topics.HEALTH:
                self.service.on_health(device_id, self._own(device_id, decode(Health, payload)))
            elif leaf == topics.UPDATE_STATUS:
                self.service.on_update_status(device_id, self._own(device_id, decode(UpdateStatus, payload)))
            elif leaf == topics.TELEMETRY:
                # Receipted once its batch is committed (IngestBatcher -> _receipt_all).
                self.telemetry.put(device_id, payload)
            elif leaf == topics.CHUNK_REQUEST:
                request = decode(ChunkRequest, payload)
                frame = self.service.chunk_for(device_id, request)
                if frame is not None:
                    await self.publish(topics.device_topic(device_id, topics.CMD_CHUNK), frame, 1)
            elif leaf == topics.METADATA_REQUEST:
                name = decode(MetadataRequest, payload).name
                data = await asyncio.to_thread(self.service.metadata_file, name) or b""
                frame = encode_chunk(Chunk(update_id=name, offset=0, total=len(data), data=data))
                await self.publish(topics.device_topic(device_id, topics.CMD_METADATA), frame, 1)
        except (ProtocolError, ValueError) as e:
            self.service.rejected_messages += 1
            log.warning("rejected message on %s: %s", topic, e)
        except Exception:  # one bad message or a busy database must not stop ingest for every device
            self.service.rejected_messages += 1
            log.exception("error handling a message on %s", topic)

    @staticmethod
    def _own(device_id: str, message: _Own) -> _Own:
        """A device speaks only for itself: the id in the payload must be the one in the topic."""
        if message.device_id != device_id:
            raise ProtocolError(f"payload names device {message.device_id!r} on {device_id!r}'s topic")
        return message
