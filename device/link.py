"""The device's MQTT link to the fleet: one client owner, a Last Will, jittered reconnects.

Implements `FleetTransport` for the updater. Update statuses published while the link is down
wait in a bounded in-memory queue and go out on reconnect (the durable on-disk outbox for
telemetry is a separate, later part).
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.config import LinkTls
from device.errors import ChunkRefused, ConfigError
from protocol import topics
from protocol.backoff import backoff_delay
from protocol.errors import ProtocolError
from protocol.frames import Chunk, ChunkUnavailable, decode_chunk, decode_chunk_answer
from protocol.messages import (
    ChunkRequest,
    DeviceState,
    Health,
    KeysNotice,
    MetadataRequest,
    RollbackCommand,
    TelemetryAck,
    UpdateOffer,
    UpdateState,
    UpdateStatus,
    decode,
    encode,
)

log = logging.getLogger(__name__)
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
MAX_PENDING_STATUSES = 1000

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

OfferHandler = Callable[[UpdateOffer], Awaitable[None]]
RollbackHandler = Callable[[RollbackCommand], Awaitable[None]]


def parse_broker_url(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtts://host:port (TLS) or mqtt://host:port")
    return parsed.hostname, parsed.port or DEFAULT_PORTS[parsed.scheme]


class DeviceLink:
    on_rollback: RollbackHandler | None = None  # set by the agent: `cmd/rollback` goes there
    # Set by the agent: called on every (re)connect and on `cmd/keys`, so the device refreshes the
    # fleet's keys document when it may have missed a change or was told of one.
    on_keys_wanted: Callable[[int | None], None] | None = None

    def __init__(
        self,
        device_id: str,
        broker_url: str,
        password: str | None,
        on_offer: OfferHandler,
        agent_version: str,
        public_key: str | None = None,
        tls: LinkTls | None = None,
    ) -> None:
        """`mqtts://` connects with TLS: the broker is checked against the fleet CA and the device shows
        its certificate (`tls`), which is all the broker needs; `mqtt://` is plain mode (password)."""
        self.on_telemetry_ack: Callable[[TelemetryAck], Awaitable[None]] | None = None
        self.device_id = device_id
        self.public_key = public_key
        self.host, self.port = parse_broker_url(broker_url)
        self.tls = tls if broker_url.startswith("mqtts:") else None
        if broker_url.startswith("mqtts:") and tls is None:
            raise ConfigError(
                f"{broker_url} needs the device's certificate: provision it with an enrollment token"
            )
        self.password = password
        self.on_offer = on_offer
        self.agent_version = agent_version
        self.connected = asyncio.Event()
        self.malformed_messages = 0
        self._client: aiomqtt.Client | None = None
        self._pending: deque[UpdateStatus] = deque(maxlen=MAX_PENDING_STATUSES)
        self._waiting: dict[tuple[str, int], asyncio.Future[Chunk]] = {}
        self._waiting_metadata: dict[str, asyncio.Future[Chunk]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _topic(self, leaf: str) -> str:
        return topics.device_topic(self.device_id, leaf)

    def _state(self, online: bool) -> bytes:
        state = DeviceState(
            device_id=self.device_id,
            online=online,
            agent_version=self.agent_version,
            public_key=self.public_key,
        )
        return encode(state)

    async def run(self) -> None:
        """Stay connected until cancelled."""
        attempt = 0
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as e:
                log.warning("broker link down (%s); reconnecting", e)
            finally:
                if self.connected.is_set():
                    attempt = 0  # a session that connected starts the backoff over
                self._client = None
                self.connected.clear()
            await asyncio.sleep(backoff_delay(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S))
            attempt += 1

    async def _session(self) -> None:
        will = aiomqtt.Will(self._topic(topics.STATE), self._state(False), qos=1, retain=True)
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"device-{self.device_id}",
            username=self.device_id,
            # With TLS the certificate is the credential; a password is never sent.
            password=None if self.tls else self.password,
            tls_context=self.tls.context() if self.tls else None,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            keepalive=15,
            timeout=10,
        ) as client:
            self._client = client
            await client.subscribe(self._topic("cmd/#"), qos=1)
            await client.publish(self._topic(topics.STATE), self._state(True), qos=1, retain=True)
            self.connected.set()
            log.info("connected to %s:%d as %s", self.host, self.port, self.device_id)
            if self.on_keys_wanted is not None:
                self.on_keys_wanted(None)
            await self._flush_pending(client)
            async for message in client.messages:
                self._dispatch(str(message.topic), bytes(message.payload))

    async def _flush_pending(self, client: aiomqtt.Client) -> None:
        while self._pending:
            await client.publish(self._topic(topics.UPDATE_STATUS), encode(self._pending[0]), qos=1)
            self._pending.popleft()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            if topic == self._topic(topics.CMD_CHUNK):
                self._resolve_chunk(decode_chunk_answer(payload))
            elif topic == self._topic(topics.CMD_METADATA):
                frame = decode_chunk(payload)
                waiting = self._waiting_metadata.pop(frame.update_id, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(frame)
            elif topic == self._topic(topics.CMD_UPDATE):
                offer = decode(UpdateOffer, payload, topic=topic)
                self._spawn(self.on_offer(offer))
            elif topic == self._topic(topics.CMD_ROLLBACK):
                command = decode(RollbackCommand, payload, topic=topic)
                if self.on_rollback is not None:
                    self._spawn(self.on_rollback(command))
                else:
                    log.warning("rollback %s ignored: no handler is wired", command.request_id)
            elif topic == self._topic(topics.CMD_KEYS):
                notice = decode(KeysNotice, payload, topic=topic)
                if self.on_keys_wanted is not None:
                    self.on_keys_wanted(notice.serial)
            elif topic == self._topic(topics.CMD_TELEMETRY_ACK):
                ack = decode(TelemetryAck, payload, topic=topic)
                if self.on_telemetry_ack is not None:
                    self._spawn(self.on_telemetry_ack(ack))
            else:
                log.warning("ignoring message on unknown topic %s", topic)
        except ProtocolError as e:
            self.malformed_messages += 1
            log.error("rejected %s", e)
            if topic == self._topic(topics.CMD_UPDATE):
                status = UpdateStatus(
                    device_id=self.device_id,
                    update_id="invalid-offer",
                    model_name="",
                    version=0,
                    state=UpdateState.FAILED,
                    reason=e.reason,
                )
                self._spawn(self.publish_update_status(status))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resolve_chunk(self, answer: Chunk | ChunkUnavailable) -> None:
        future = self._waiting.pop((answer.update_id, answer.offset), None)
        if future is None or future.done():
            return
        if isinstance(answer, ChunkUnavailable):
            future.set_exception(ChunkRefused(answer.offset, answer.reason, answer.retry_after_s))
        else:
            future.set_result(answer)

    # -- FleetTransport ----------------------------------------------------------------------
    async def publish_update_status(self, status: UpdateStatus) -> None:
        client = self._client
        if client is None:
            self._pending.append(status)
            return
        try:
            await client.publish(self._topic(topics.UPDATE_STATUS), encode(status), qos=1, timeout=10)
        except aiomqtt.MqttError:
            self._pending.append(status)

    async def fetch_chunk(
        self, update_id: str, offset: int, length: int, timeout: float, payload: str = "package"
    ) -> Chunk:
        await asyncio.wait_for(self.connected.wait(), timeout)
        client = self._client
        if client is None:
            raise TimeoutError("broker link dropped")
        future: asyncio.Future[Chunk] = asyncio.get_running_loop().create_future()
        self._waiting[(update_id, offset)] = future
        request = ChunkRequest.model_validate(
            {"update_id": update_id, "offset": offset, "length": length, "payload": payload}
        )
        try:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self._topic(topics.CMD_CHUNK)
            await client.publish(self._topic(topics.CHUNK_REQUEST), encode(request), qos=1, properties=props)
            return await asyncio.wait_for(future, timeout)
        except aiomqtt.MqttError as e:
            raise TimeoutError(f"chunk request failed: {e}") from e
        finally:
            self._waiting.pop((update_id, offset), None)

    async def fetch_metadata(self, url: str, max_length: int, deadline_s: float) -> bytes:
        """One TUF metadata file from the fleet (the TUF client's fetch); FileNotFoundError if none."""
        name = url.rsplit("/", 1)[-1]
        try:
            request = MetadataRequest(name=name)
        except ValueError:
            raise FileNotFoundError(f"{name!r} is not a TUF metadata file the fleet serves") from None
        await asyncio.wait_for(self.connected.wait(), deadline_s)
        client = self._client
        if client is None:
            raise TimeoutError("broker link dropped")
        future: asyncio.Future[Chunk] = asyncio.get_running_loop().create_future()
        self._waiting_metadata[name] = future
        try:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self._topic(topics.CMD_METADATA)
            await client.publish(
                self._topic(topics.METADATA_REQUEST), encode(request), qos=1, properties=props
            )
            frame = await asyncio.wait_for(future, deadline_s)
        except aiomqtt.MqttError as e:
            raise TimeoutError(f"metadata request failed: {e}") from e
        finally:
            self._waiting_metadata.pop(name, None)
        if frame.total == 0:
            raise FileNotFoundError(f"the fleet has no {name}")
        if frame.total > max_length or frame.total != len(frame.data):
            raise ValueError(f"{name}: {frame.total} bytes, over the {max_length} allowed or in pieces")
        return frame.data

    async def publish_telemetry(self, envelopes: list[bytes]) -> None:
        """Publish sealed records at QoS 1; returns once the broker acknowledged every one."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        topic = self._topic(topics.TELEMETRY)
        await asyncio.gather(*(client.publish(topic, e, qos=1, timeout=10) for e in envelopes))

    async def publish_health(self, health: Health) -> bool:
        """Best effort: health is periodic, a missed one is replaced by the next."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(self._topic(topics.HEALTH), encode(health), qos=0)
            return True
        except aiomqtt.MqttError:
            return False

    async def say_offline(self) -> None:
        """A clean shutdown does not fire the Will, so say it ourselves."""
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(
                    self._topic(topics.STATE), self._state(False), qos=1, retain=True, timeout=5
                )
