"""The fleet's MQTT worker: ingest device state, health and update statuses; answer chunk requests.

Health, statuses and chunk requests come through MQTT 5 shared subscriptions, so more workers
can share the load behind one broker. Retained state is not delivered to shared subscriptions,
so each worker reads `state` with a plain one.
"""

import asyncio
import logging
from collections import Counter
from typing import TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.broker_auth import FLEET_USER
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
from protocol.sealed import peek_header

log = logging.getLogger(__name__)
_Own = TypeVar("_Own", DeviceState, Health, UpdateStatus)


SESSION_EXPIRY_S = 24 * 3600
RECEIPT_INTERVAL_S = 0.2


def _session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    return properties


class FleetWorker:
    def __init__(self, service: FleetService, host: str, port: int, worker_id: str = "fleet-0") -> None:
        self.service = service
        self.host = host
        self.port = port
        self.worker_id = worker_id
        self.connected = asyncio.Event()
        self.handled: Counter[str] = Counter()  # messages per leaf, to see how workers split the load
        # Per device: seqs stored (or already held) and seqs refused for good, not yet told to it.
        self._receipts: dict[str, tuple[list[int], list[int]]] = {}
        self._client: aiomqtt.Client | None = None

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        await asyncio.wait_for(self.connected.wait(), 30)
        assert self._client is not None
        await self._client.publish(topic, payload, qos=qos)

    async def run(self) -> None:
        receipts = asyncio.create_task(self._receipt_loop())
        try:
            await self._connect_loop()
        finally:
            receipts.cancel()

    async def _receipt_loop(self) -> None:
        """Tell devices which records are stored, a few times a second, so their outboxes drain."""
        while True:
            await asyncio.sleep(RECEIPT_INTERVAL_S)
            if self._receipts and self.connected.is_set():
                await self._send_receipts()

    async def _send_receipts(self) -> None:
        receipts, self._receipts = self._receipts, {}
        for device_id, (stored, refused) in receipts.items():
            ack = TelemetryAck(stored=stored, refused=refused)
            try:
                await self.publish(topics.device_topic(device_id, topics.CMD_TELEMETRY_ACK), encode(ack), 1)
            except (aiomqtt.MqttError, TimeoutError) as e:  # the device resends; we receipt it then
                log.info("receipt to %s not sent (%s)", device_id, e)

    def _receipt(self, device_id: str, seq: int, outcome: str) -> None:
        """Stored and duplicate records are receipted, refused ones too (the device counts them);
        deferred ones are not, so the device sends them again later."""
        if outcome.startswith("deferred"):
            return
        stored, refused = self._receipts.setdefault(device_id, ([], []))
        (refused if outcome.startswith("rejected") else stored).append(seq)

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
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"edgefleet-{self.worker_id}",
            username=FLEET_USER,
            password=self.service.fleet_mqtt_password,
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
                outcome = await asyncio.to_thread(self.service.on_telemetry, device_id, payload)
                _, sender, seq = peek_header(payload)
                if sender == device_id:
                    self._receipt(device_id, seq, outcome)
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
