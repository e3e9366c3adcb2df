"""The fleet's lean MQTT 5 link (fleet/mqtt_link.py): against the fleet's own Mosquitto (users, ACL,
persistence), and against a scripted server for the packet shapes a broker may send."""

import asyncio
import struct
from collections.abc import Awaitable, Iterator
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from edgefleet.procs import free_port
from fleet.broker import ManagedBroker
from fleet.broker_auth import FLEET_USER
from fleet.db import Device, TelemetryRecordRow, open_database
from fleet.mqtt_link import LinkError, LinkOptions, MqttLink, publish_packet, varint
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir
from models.signing import public_key_pem
from protocol import topics
from protocol.messages import TelemetryRecord, encode
from protocol.sealed import seal
from tests.integration.test_telemetry_link import until

TELEMETRY = topics.shared(topics.all_devices(topics.TELEMETRY))
Received = list[tuple[str, bytes, int | None]]


class Fleet:
    def __init__(self, root: Path) -> None:
        data = FleetDataDir(root / "fleet")
        data.make_dirs()
        self.port = free_port()
        self.service = FleetService(data, open_database(data.database), f"mqtt://127.0.0.1:{self.port}")
        self.device_password = self.service.add_device("cam-1")["mqtt_password"]
        self.broker = ManagedBroker(data.broker, "127.0.0.1", self.port, data.password_file, data.acl_file)

    def options(self, client_id: str = "fleet-link", **changes: object) -> LinkOptions:
        fields: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.port,
            "client_id": client_id,
            "username": FLEET_USER,
            "password": self.service.fleet_mqtt_password,
        }
        fields.update(changes)
        return LinkOptions(**fields)  # type: ignore[arg-type]

    def device(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier="cam-1",
            username="cam-1",
            password=self.device_password,
            protocol=aiomqtt.ProtocolVersion.V5,
        )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    rig = Fleet(tmp_path)
    rig.broker.start()
    try:
        yield rig
    finally:
        rig.broker.stop()


async def connected(options: LinkOptions, received: Received) -> MqttLink:
    link = MqttLink(options, lambda topic, payload, pid: received.append((topic, payload, pid)))
    await link.connect()
    return link


def test_receives_device_telemetry_on_the_shared_subscription_and_publishes_to_the_device(
    fleet: Fleet,
) -> None:
    async def scenario() -> None:
        received: Received = []
        link = await connected(fleet.options(), received)
        await link.subscribe(TELEMETRY)
        async with fleet.device() as device:
            await device.subscribe(topics.device_topic("cam-1", topics.CMD_TELEMETRY_ACK), qos=1)
            for i in range(300):
                await device.publish(
                    topics.device_topic("cam-1", topics.TELEMETRY), bytes([i % 256]) * i, qos=1
                )
            await until("300 messages", lambda: len(received) == 300)
            link.ack(pid for _, _, pid in received if pid is not None)
            await link.publish(topics.device_topic("cam-1", topics.CMD_TELEMETRY_ACK), b"receipt")
            message = await asyncio.wait_for(anext(aiter(device.messages)), 10)
            assert bytes(message.payload) == b"receipt"
        await link.close()
        assert [payload for _, payload, _ in received] == [bytes([i % 256]) * i for i in range(300)]
        assert {topic for topic, _, _ in received} == {topics.device_topic("cam-1", topics.TELEMETRY)}
        assert all(pid is not None for _, _, pid in received), "QoS 1: every message carries a packet id"

    asyncio.run(scenario())


def test_unacked_messages_come_again_in_the_next_session_and_acked_ones_do_not(fleet: Fleet) -> None:
    """What makes acking after the commit worth it: a worker that dies before storing a batch gets
    those records again from the broker."""

    async def scenario() -> None:
        first: Received = []
        link = await connected(fleet.options(), first)
        await link.subscribe(TELEMETRY)
        async with fleet.device() as device:
            for i in range(10):
                await device.publish(topics.device_topic("cam-1", topics.TELEMETRY), f"r{i}".encode(), qos=1)
        await until("10 messages", lambda: len(first) == 10)
        link.ack(pid for _, payload, pid in first if payload in (b"r0", b"r1", b"r2") and pid is not None)
        await asyncio.sleep(0.2)
        await link.close()  # "dies" with r3..r9 unacked

        second: Received = []
        link = await connected(fleet.options(), second)  # same client id, session kept
        await until("the unacked messages again", lambda: len(second) == 7)
        await link.close()
        assert sorted(payload for _, payload, _ in second) == [f"r{i}".encode() for i in range(3, 10)]

    asyncio.run(scenario())


def test_receive_maximum_and_room_hold_the_backlog_at_the_broker(fleet: Fleet) -> None:
    """Receive Maximum holds Mosquitto back until the first ack; after it, Mosquitto 2.0 sends all
    it queued for the session, so the link's `room` (stop reading) is what bounds the worker."""

    async def scenario() -> None:
        received: Received = []
        link = await connected(fleet.options(receive_maximum=5), received)
        await link.subscribe(TELEMETRY)
        async with fleet.device() as device:
            for i in range(30):
                await device.publish(topics.device_topic("cam-1", topics.TELEMETRY), b"%d" % i, qos=1)
            await until("the first 5", lambda: len(received) == 5)
            await asyncio.sleep(0.3)
            assert len(received) == 5, "no more than Receive Maximum before an ack"
            link.ack(pid for _, _, pid in received if pid is not None)
            await until("the rest", lambda: len(received) == 30)
        await link.close()
        assert [payload for _, payload, _ in received] == [b"%d" % i for i in range(30)]

        # With `room` closed the link reads nothing more, acked or not.
        gate = asyncio.Event()
        held: Received = []
        link = MqttLink(
            fleet.options(client_id="held"), lambda t, p, i: held.append((t, p, i)), room=gate.wait
        )
        await link.connect()
        gate.set()
        # Not the shared filter: the first link's session (kept while it is away) would take every
        # other message of the share.
        await link.subscribe(topics.all_devices(topics.TELEMETRY))
        topic = topics.device_topic("cam-1", topics.TELEMETRY)
        async with fleet.device() as device:
            await device.publish(topic, b"one", qos=1)
            await until("one message", lambda: len(held) == 1)
            gate.clear()  # the read already waiting still completes; the next one waits for room
            await device.publish(topic, b"two", qos=1)
            await until("two messages", lambda: len(held) == 2)
            await device.publish(topic, b"three", qos=1)
            await asyncio.sleep(0.3)
            assert [p for _, p, _ in held] == [b"one", b"two"], "nothing read while there is no room"
            gate.set()
            await until("the held message", lambda: len(held) == 3)
        await link.close()

    asyncio.run(scenario())


def test_wrong_password_is_refused_with_what_to_check(fleet: Fleet) -> None:
    async def scenario() -> None:
        with pytest.raises(LinkError, match=r"refused the connection as 'edgefleet-fleet'.*credentials"):
            await connected(fleet.options(password="wrong"), [])

    asyncio.run(scenario())


def test_no_broker_is_a_clear_error() -> None:
    options = LinkOptions("127.0.0.1", free_port(), "x", FLEET_USER, "p")

    async def scenario() -> None:
        with pytest.raises(LinkError, match=r"cannot connect to the broker at 127\.0\.0\.1"):
            await MqttLink(options, lambda *_: None).connect(timeout=2)

    asyncio.run(scenario())


# -- a scripted server: packet shapes Mosquitto may send, and ones it must not ----------------------
CONNACK_WITH_PROPERTIES = bytes([0x20]) + varint(6) + b"\x00\x00" + varint(3) + b"\x21" + struct.pack(">H", 7)


def _publish_with_properties(topic: str, payload: bytes, pid: int) -> bytes:
    props = b"\x01\x01" + b"\x03" + struct.pack(">H", 4) + b"json"  # payload format, content type
    body = (
        struct.pack(">H", len(topic)) + topic.encode() + struct.pack(">H", pid) + varint(len(props)) + props
    )
    return bytes([0x32]) + varint(len(body) + len(payload)) + body + payload


async def scripted(send: bytes, *, piecewise: bool = False) -> tuple[MqttLink, Received, Awaitable[None]]:
    """A server that accepts, answers CONNACK (Receive Maximum 7), then writes `send` (one byte
    per write when `piecewise`), and a link connected to it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(CONNACK_WITH_PROPERTIES)
        await writer.drain()
        for i in range(len(send)) if piecewise else [None]:
            writer.write(send if i is None else send[i : i + 1])
            await writer.drain()
            if piecewise:
                await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    received: Received = []
    link = MqttLink(LinkOptions("127.0.0.1", port, "x", "u", "p"), lambda t, p, i: received.append((t, p, i)))
    await link.connect()

    async def done() -> None:
        server.close()

    return link, received, done()


def test_long_packets_properties_and_qos0_are_parsed() -> None:
    big = b"x" * 70_000  # a three-byte remaining length
    stream = publish_packet("edgefleet/v1/cam-1/telemetry", b"small", 1) + publish_packet(
        "edgefleet/v1/cam-1/telemetry", big, 2
    )
    stream += _publish_with_properties("edgefleet/v1/cam-2/telemetry", b"with props", 3)
    stream += bytes([0x30]) + varint(2 + 3 + 1 + 2) + struct.pack(">H", 3) + b"a/b" + b"\x00" + b"q0"

    async def scenario() -> None:
        link, received, done = await scripted(stream)
        assert link._server_receive_maximum == 7, "the CONNACK's properties are read"
        with pytest.raises(LinkError, match="closed the connection"):
            await link.run()
        await done
        assert received == [
            ("edgefleet/v1/cam-1/telemetry", b"small", 1),
            ("edgefleet/v1/cam-1/telemetry", big, 2),
            ("edgefleet/v1/cam-2/telemetry", b"with props", 3),
            ("a/b", b"q0", None),
        ]

    asyncio.run(scenario())


def test_packets_split_at_every_byte_are_reassembled() -> None:
    stream = publish_packet("t/1", b"a" * 200, 9) + _publish_with_properties("t/2", b"b", 10)

    async def scenario() -> None:
        link, received, done = await scripted(stream, piecewise=True)
        with pytest.raises(LinkError):
            await link.run()
        await done
        assert received == [("t/1", b"a" * 200, 9), ("t/2", b"b", 10)]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (bytes([0x34]) + varint(7) + struct.pack(">H", 1) + b"t" + struct.pack(">H", 1) + b"\x00x", "QoS 2"),
        (bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), "malformed remaining length"),
        (bytes([0xE0, 0x01, 0x8E]), r"disconnected this session \(reason 0x8e\)"),
        (bytes([0x70, 0x00]), "unexpected MQTT packet type 7"),
    ],
)
def test_what_the_link_refuses(stream: bytes, reason: str) -> None:
    async def scenario() -> None:
        link, received, done = await scripted(stream)
        with pytest.raises(LinkError, match=reason):
            await link.run()
        await done
        assert received == []

    asyncio.run(scenario())


def test_a_refused_subscription_is_an_error_naming_the_filter() -> None:
    """Mosquitto 2.0 grants every subscription and filters by ACL at delivery; a broker that
    refuses one in its SUBACK (reason 0x87, not authorized) must not leave the fleet deaf."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(CONNACK_WITH_PROPERTIES)
        subscribe = await reader.read(1024)
        pid = subscribe[2:4]  # fixed header (2 bytes: a short SUBSCRIBE), then the packet id
        writer.write(bytes([0x90, 4]) + pid + b"\x00\x87")
        await writer.drain()
        await reader.read(1024)

    async def scenario() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = MqttLink(LinkOptions("127.0.0.1", port, "x", "u", "p"), lambda *_: None)
        await link.connect()
        with pytest.raises(LinkError, match=r"refused the subscription to '\$share/.*0x87.*ACL"):
            await link.subscribe(TELEMETRY)
        await link.close()
        server.close()

    asyncio.run(scenario())


def test_a_broker_that_goes_silent_is_dropped_after_one_and_a_half_keepalives() -> None:
    """A half-open connection (no PINGRESP, nothing) must not leave the fleet waiting forever."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(CONNACK_WITH_PROPERTIES)
        await writer.drain()
        while await reader.read(1024):  # swallow PINGREQs, answer nothing
            pass

    async def scenario() -> float:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = MqttLink(LinkOptions("127.0.0.1", port, "x", "u", "p", keepalive_s=2), lambda *_: None)
        await link.connect()
        started = asyncio.get_running_loop().time()
        with pytest.raises(LinkError):
            await asyncio.wait_for(link.run(), 10)
        server.close()
        return asyncio.get_running_loop().time() - started

    assert 2.5 < asyncio.run(scenario()) < 6


# -- the worker's telemetry link over a resumed session ----------------------------------------------
def _sealed_records(fleet: Fleet, count: int) -> list[bytes]:
    """`count` records as cam-1's outbox would send them, cam-1's signing key pinned at the fleet."""
    key = Ed25519PrivateKey.generate()
    with fleet.service.sessions.begin() as s:
        device = s.get(Device, "cam-1")
        assert device is not None
        device.public_key = public_key_pem(key)
    record = encode(TelemetryRecord(kind="metric", ts=0.0, body={"n": 1}))
    return [
        seal(
            record,
            device_id="cam-1",
            seq=seq,
            device_key=key,
            fleet_public=fleet.service.telemetry_key.public_key(),
            fleet_key_id=fleet.service.telemetry_key_id,
        )
        for seq in range(1, count + 1)
    ]


def test_records_redelivered_to_a_resumed_worker_session_are_acked_by_it(fleet: Fleet) -> None:
    """A worker died holding records it had not acked; the next worker under its client id resumes
    the session and Mosquitto redelivers them at once, before the SUBACK. The new worker stores
    them and must ack them too: unacked, they hold the session's inflight slots and come again on
    every later connection. (Before 1f564c0 the worker counted a new link session only after the
    SUBACK, so the redelivered records carried the old session's number and their acks were dropped.)"""
    worker_id = "w0"
    client_id = f"edgefleet-{worker_id}-telemetry"  # the client id FleetWorker's link connects as
    topic = topics.device_topic("cam-1", topics.TELEMETRY)

    async def scenario() -> None:
        envelopes = _sealed_records(fleet, 20)
        # The worker that dies: its link receives every record and never acks one.
        dead: Received = []
        link = await connected(fleet.options(client_id), dead)
        await link.subscribe(TELEMETRY)
        async with fleet.device() as device:
            for envelope in envelopes:
                await device.publish(topic, envelope, qos=1)
        await until("the records at the dying worker", lambda: len(dead) == 20)
        await link.close()

        # The worker that takes over: FleetWorker's own link loop, ingest and acks.
        worker = FleetWorker(fleet.service, "127.0.0.1", fleet.port, worker_id=worker_id, telemetry_only=True)
        handled: list[object] = []
        ack = worker.telemetry.on_handled
        assert ack is not None

        def counted(tokens: list[object]) -> None:
            ack(tokens)  # PUBACKs written before the count says so, so stopping after it loses none
            handled.extend(tokens)

        worker.telemetry.on_handled = counted
        running = asyncio.create_task(worker.run())
        try:
            await until("the redelivered records handled", lambda: len(handled) == 20)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        with fleet.service.sessions() as s:
            stored = s.scalars(select(TelemetryRecordRow.seq).order_by(TelemetryRecordRow.seq)).all()
        assert stored == list(range(1, 21))

        # The session once more: what it holds unacked comes first, then what is new.
        after: Received = []
        link = await connected(fleet.options(client_id), after)
        async with fleet.device() as device:
            await device.publish(topic, b"marker", qos=1)
            await until("the marker", lambda: any(payload == b"marker" for _, payload, _ in after))
        await link.close()
        again = sum(payload in envelopes for _, payload, _ in after)
        assert again == 0, (
            f"{again} of the 20 records came a third time: the resumed session never acked them"
        )
        assert [payload for _, payload, _ in after] == [b"marker"]

    asyncio.run(scenario())
