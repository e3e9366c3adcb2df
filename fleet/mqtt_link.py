"""A lean MQTT 5 client for the fleet's hot path: sealed telemetry in, receipts out.

Why not aiomqtt/paho here: at 5,000 records/s, paho's pure-Python packet reader, its MQTT 5
`Properties` objects and aiomqtt's per-message iterator cost the ingest worker ~175 µs of CPU per
message (bench/telemetry/RESULTS.md), more than opening the envelope. This link reads the socket in
large blocks, parses PUBLISH packets with slicing and `struct`, and writes PUBACKs in batches: a few
microseconds per message. Everything else the fleet says over MQTT (state, health, update
statuses, chunks, offers) stays on aiomqtt, where its convenience costs little.

It speaks only what the link needs, and refuses the rest loudly:

- CONNECT (MQTT 5, user name with a password or the TLS client certificate, clean start off and a
  session expiry, so messages wait at the broker while a worker restarts), CONNACK;
- SUBSCRIBE at QoS 1 (shared subscriptions `$share/...` included), SUBACK: a refused filter
  (e.g. the broker's ACL) raises `LinkError`;
- PUBLISH received at QoS 0 or 1, acknowledged by `ack()` when the caller says so: the fleet acks a
  telemetry record only after its batch is committed, so a record the worker had not stored when
  it died is delivered again. `receive_maximum` bounds the messages the broker sends ahead of
  those acks, but only until the first ack: Mosquitto 2.0 then sends its whole queue for the
  session (tests/fleet/test_mqtt_link.py shows it). So the owner also passes `room`, and the link
  stops reading the socket while the owner has too much waiting: the backlog stays at the broker;
- PUBLISH sent at QoS 1 within the broker's own Receive Maximum (Mosquitto: 20 by default; past it
  Mosquitto drops the connection), PUBACK;
- PINGREQ every keepalive/2; a server DISCONNECT or a silent broker ends the session.
Not supported (never used by the fleet): QoS 2, topic aliases (the CONNECT announces none, so the
broker sends none), authentication exchanges (AUTH), wills.
"""

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 10, 11, 12, 13, 14
PROP_SESSION_EXPIRY = 0x11
PROP_RECEIVE_MAXIMUM = 0x21
READ_BLOCK = 1 << 20
MAX_PACKET = 5 * 1024 * 1024  # the fleet broker's max_packet_size

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# Bytes of each property's value by identifier (MQTT 5 section 2.2.2.2), to skip those we ignore.
# -1: a UTF-8 string or binary data (2-byte length), -2: a string pair, -3: a variable byte integer.
_PROPERTY_SIZES = {
    0x01: 1, 0x02: 4, 0x03: -1, 0x08: -1, 0x09: -1, 0x0B: -3, 0x11: 4, 0x12: -1, 0x13: 2, 0x15: -1,
    0x16: -1, 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: -1, 0x1C: -1, 0x1F: -1, 0x21: 2, 0x22: 2, 0x23: 2,
    0x24: 1, 0x25: 1, 0x26: -2, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip


class LinkError(ConnectionError):
    """The session cannot go on: refused, dropped, a protocol violation; the caller reconnects."""


@dataclass(frozen=True)
class LinkOptions:
    host: str
    port: int
    client_id: str
    username: str
    password: str | None = None  # None with TLS: the client certificate is the credential
    ssl_context: ssl.SSLContext | None = None
    keepalive_s: int = 15
    session_expiry_s: int = 24 * 3600
    receive_maximum: int = 4000  # QoS 1 messages the broker may send before we ack


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string_field(s: str | bytes) -> bytes:
    """An MQTT UTF-8 string or binary field: 2-byte length, then the bytes."""
    raw = s.encode() if isinstance(s, str) else s
    return _U16.pack(len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    """A whole packet: the first byte, the remaining length, the body."""
    if len(body) > MAX_PACKET:
        raise ValueError(f"MQTT packet of {len(body)} bytes exceeds the broker's {MAX_PACKET}")
    return bytes([first]) + varint(len(body)) + body


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); raises LinkError on more than 4 bytes."""
    value = shift = 0
    for _ in range(4):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise LinkError("malformed variable byte integer from the broker")


def _properties(data: bytes, pos: int) -> tuple[dict[int, int | bytes], int]:
    """Parse a property block at `pos`: {identifier: value} (last wins) and the position after."""
    length, pos = _read_varint(data, pos)
    end = pos + length
    found: dict[int, int | bytes] = {}
    while pos < end:
        ident = data[pos]
        pos += 1
        size = _PROPERTY_SIZES.get(ident)
        if size is None:
            raise LinkError(f"unknown MQTT 5 property 0x{ident:02x} from the broker")
        if size > 0:
            found[ident] = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif size == -3:
            found[ident], pos = _read_varint(data, pos)
        else:
            for _ in range(-size):
                (n,) = _U16.unpack_from(data, pos)
                found[ident] = bytes(data[pos + 2 : pos + 2 + n])
                pos += 2 + n
    if pos != end:
        raise LinkError("malformed MQTT 5 property block from the broker")
    return found, end


def connect_packet(options: LinkOptions) -> bytes:
    flags = 0x80  # user name; clean start off: keep the session (and its queued messages)
    if options.password is not None:
        flags |= 0x40
    props = (
        bytes([PROP_SESSION_EXPIRY])
        + _U32.pack(options.session_expiry_s)
        + bytes([PROP_RECEIVE_MAXIMUM])
        + _U16.pack(options.receive_maximum)
    )
    body = (
        string_field("MQTT") + bytes([5, flags]) + _U16.pack(options.keepalive_s) + varint(len(props)) + props
    )
    body += string_field(options.client_id) + string_field(options.username)
    if options.password is not None:
        body += string_field(options.password)
    return packet(CONNECT << 4, body)


def subscribe_packet(packet_id: int, filters: Iterable[str], qos: int = 1) -> bytes:
    body = _U16.pack(packet_id) + b"\x00" + b"".join(string_field(f) + bytes([qos]) for f in filters)
    return packet(SUBSCRIBE << 4 | 0x02, body)


def unsubscribe_packet(packet_id: int, filters: Iterable[str]) -> bytes:
    return packet(
        UNSUBSCRIBE << 4 | 0x02, _U16.pack(packet_id) + b"\x00" + b"".join(map(string_field, filters))
    )


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH with no properties."""
    return packet(PUBLISH << 4 | 0x02, string_field(topic) + _U16.pack(packet_id) + b"\x00" + payload)


def puback_packets(packet_ids: Iterable[int]) -> bytes:
    return b"".join(b"\x40\x02" + _U16.pack(pid) for pid in packet_ids)


# on_publish(topic, payload, packet_id): packet_id is None for QoS 0, else the caller must ack() it.
OnPublish = Callable[[str, bytes, int | None], None]


class MqttLink:
    """One MQTT 5 session; `run()` reads until the connection ends, then raises LinkError."""

    def __init__(
        self,
        options: LinkOptions,
        on_publish: OnPublish,
        room: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """`room`: awaited before each read of the socket; while it waits, nothing more is read,
        and TCP's flow control holds the broker's sending back (see `receive_maximum`)."""
        self.options = options
        self.on_publish = on_publish
        self.room = room
        self.received = 0
        self.published = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[int]] = {}  # SUBACK/UNSUBACK/PUBACK by packet id
        self._send_slots: asyncio.Semaphore | None = None
        self._server_receive_maximum = 65535
        self._closed = False
        self._session: asyncio.Task[None] | None = None
        self._last_read = 0.0  # loop time of the last bytes from the broker
        self._holding = False  # True while `room` holds reading back

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._closed

    async def connect(self, timeout: float = 10.0) -> None:
        o = self.options
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    o.host,
                    o.port,
                    ssl=o.ssl_context,
                    server_hostname=o.host if o.ssl_context else None,
                    limit=READ_BLOCK,
                ),
                timeout,
            )
            self._reader, self._writer = reader, writer
            writer.write(connect_packet(o))
            first, body = await asyncio.wait_for(self._read_packet(), timeout)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            await self.close()
            raise LinkError(f"cannot connect to the broker at {o.host}:{o.port}: {e}") from e
        if first >> 4 != CONNACK or len(body) < 2:
            await self.close()
            raise LinkError(f"the broker answered CONNECT with packet type {first >> 4}, not CONNACK")
        if body[1] != 0:
            await self.close()
            raise LinkError(
                f"the broker refused the connection as {o.username!r} (reason 0x{body[1]:02x}): "
                "check the fleet's broker credentials or client certificate"
            )
        props, _ = _properties(body, 2)
        maximum = props.get(PROP_RECEIVE_MAXIMUM, 65535)
        self._server_receive_maximum = maximum if isinstance(maximum, int) else 65535
        self._send_slots = asyncio.Semaphore(self._server_receive_maximum)
        # Reading starts now: SUBACKs and messages of a resumed session arrive from here on.
        self._last_read = asyncio.get_running_loop().time()
        self._session = asyncio.create_task(self._serve())

    async def _read_packet(self) -> tuple[int, bytes]:
        """One whole packet, for the handshake (the run loop parses blocks instead)."""
        assert self._reader is not None
        first = (await self._reader.readexactly(1))[0]
        length = shift = 0
        for _ in range(4):
            byte = (await self._reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, await self._reader.readexactly(length)

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise LinkError("no free MQTT packet id: 65,535 requests await an answer")

    def _write(self, data: bytes) -> None:
        if self._writer is None or self._closed:
            raise LinkError("the broker connection is closed")
        self._writer.write(data)

    async def _request(self, packet: Callable[[int], bytes], what: str, timeout: float = 10.0) -> int:
        """Send a packet that the broker answers by packet id; return the answer's reason code."""
        pid = self._packet_id()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[pid] = future
        try:
            self._write(packet(pid))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as e:
            raise LinkError(f"the broker did not answer {what} within {timeout:.0f} s") from e
        finally:
            self._waiting.pop(pid, None)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        code = await self._request(lambda pid: subscribe_packet(pid, [topic_filter], qos), "SUBSCRIBE")
        if code >= 0x80:
            raise LinkError(
                f"the broker refused the subscription to {topic_filter!r} (reason 0x{code:02x}); "
                "check the broker's ACL for the fleet user"
            )

    async def unsubscribe(self, topic_filter: str) -> None:
        await self._request(lambda pid: unsubscribe_packet(pid, [topic_filter]), "UNSUBSCRIBE")

    async def publish(self, topic: str, payload: bytes, timeout: float = 30.0) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK (within its Receive Maximum)."""
        assert self._send_slots is not None, "connect first"
        async with self._send_slots:
            code = await self._request(lambda pid: publish_packet(topic, payload, pid), "PUBLISH", timeout)
        self.published += 1
        if code >= 0x80:
            raise LinkError(f"the broker refused a publish to {topic!r} (reason 0x{code:02x})")

    def ack(self, packet_ids: Iterable[int]) -> None:
        """Acknowledge received QoS 1 messages (in any order); dropped if the session is gone (the
        broker then delivers them again on the next session)."""
        if self.connected:
            self._write(puback_packets(packet_ids))

    async def run(self) -> None:
        """Wait while the session reads and dispatches; raises LinkError when the connection ends."""
        assert self._session is not None, "connect first"
        try:
            await self._session
        finally:
            await self.close()

    async def _serve(self) -> None:
        pinger = asyncio.create_task(self._ping_loop())
        try:
            await self._read_loop()
            raise LinkError("the broker closed the connection")
        except (OSError, asyncio.IncompleteReadError) as e:
            raise LinkError(f"the broker connection failed: {e}") from e
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkError):
                await pinger
            self._fail_waiting()

    async def _ping_loop(self) -> None:
        """PINGREQ every keepalive/2; a broker silent for 1.5 keepalives (no PINGRESP, nothing) is
        gone, even where TCP has not noticed: drop the connection so the owner reconnects. Silence
        while the owner holds reading back (`room`) is ours, not the broker's."""
        interval = max(1.0, self.options.keepalive_s / 2)
        while True:
            await asyncio.sleep(interval)
            silent = asyncio.get_running_loop().time() - self._last_read
            if not self._holding and silent > 1.5 * self.options.keepalive_s:
                log.warning("the broker sent nothing for %.0f s; dropping the connection", silent)
                if self._writer is not None:
                    self._writer.transport.abort()
                return
            self._write(b"\xc0\x00")

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        buffer = b""
        on_publish = self.on_publish
        unpack16 = _U16.unpack_from
        room = self.room
        loop = asyncio.get_running_loop()
        while True:
            if room is not None:
                self._holding = True
                await room()
                self._holding = False
            chunk = await reader.read(READ_BLOCK)
            self._last_read = loop.time()
            if not chunk:
                return
            buffer = buffer + chunk if buffer else chunk
            pos, end = 0, len(buffer)
            while end - pos >= 2:
                start = pos
                first = buffer[pos]
                # Remaining length: one byte below 128 (almost every telemetry message), else a varint.
                length = buffer[pos + 1]
                pos += 2
                if length & 0x80:
                    length, shift = length & 0x7F, 7
                    while True:
                        if pos >= end:
                            pos = -1
                            break
                        byte = buffer[pos]
                        pos += 1
                        length |= (byte & 0x7F) << shift
                        shift += 7
                        if not byte & 0x80:
                            break
                        if shift > 21:
                            raise LinkError("malformed remaining length from the broker")
                    if pos < 0:
                        pos = start
                        break
                if end - pos < length:
                    pos = start
                    break
                body_end = pos + length
                kind = first >> 4
                if kind == PUBLISH:
                    (topic_len,) = unpack16(buffer, pos)
                    cursor = pos + 2 + topic_len
                    topic = buffer[pos + 2 : cursor].decode()
                    packet_id = None
                    if first & 0x06:
                        if first & 0x06 == 0x04:
                            raise LinkError("the broker sent a QoS 2 message; the fleet subscribes at QoS 1")
                        (packet_id,) = unpack16(buffer, cursor)
                        cursor += 2
                    if buffer[cursor] == 0:  # no properties: the usual case
                        cursor += 1
                    else:
                        props_len, cursor = _read_varint(buffer, cursor)
                        cursor += props_len
                    self.received += 1
                    on_publish(topic, buffer[cursor:body_end], packet_id)
                elif kind in (PUBACK, SUBACK, UNSUBACK):
                    (pid,) = unpack16(buffer, pos)
                    if kind == PUBACK:
                        code = buffer[pos + 2] if length > 2 else 0
                    else:
                        _, after = _properties(buffer, pos + 2)
                        code = buffer[after] if after < body_end else 0
                    future = self._waiting.get(pid)
                    if future is not None and not future.done():
                        future.set_result(code)
                elif kind == DISCONNECT:
                    code = buffer[pos] if length else 0
                    raise LinkError(f"the broker disconnected this session (reason 0x{code:02x})")
                elif kind != PINGRESP:
                    raise LinkError(f"unexpected MQTT packet type {kind} from the broker")
                pos = body_end
            buffer = buffer[pos:] if pos < end else b""

    def _fail_waiting(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LinkError("the broker connection closed"))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_waiting()
        if self._session is not None and not self._session.done():
            self._session.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkError):
                await self._session
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.write(b"\xe0\x00")  # DISCONNECT, normal
                self._writer.close()
                await asyncio.wait_for(self._writer.wait_closed(), 2)
