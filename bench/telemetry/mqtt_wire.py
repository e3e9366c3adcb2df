"""Just enough MQTT 3.1.1 on a raw asyncio stream for the ingest simulator.

Why not paho: a pure-Python paho client spends tens of microseconds of CPU per QoS 1 publish and
PUBACK; at 5,000 messages/s on a 2-core machine that steals the CPU from the fleet being measured.
Here every PUBLISH is encoded before the timed run, and a whole time slot's packets leave in one
write, so the simulator's CPU goes to the socket. The broker sees ordinary MQTT: CONNECT with a
user name and password, QoS 1 PUBLISHes it acknowledges, and a SUBSCRIBE for the receipts.
"""

import asyncio
import struct
from collections.abc import Callable, Iterable

from fleet.mqtt_link import packet as _packet
from fleet.mqtt_link import string_field as _string

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9


def connect_packet(client_id: str, username: str, password: str, keepalive: int = 0) -> bytes:
    flags = 0x80 | 0x40 | 0x02  # user name, password, clean session
    body = _string("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive)
    return _packet(CONNECT << 4, body + _string(client_id) + _string(username) + _string(password))


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH (the broker answers with a PUBACK for `packet_id`)."""
    return _packet(PUBLISH << 4 | 0x02, _string(topic) + struct.pack(">H", packet_id) + payload)


def subscribe_packet(packet_id: int, filters: Iterable[str], qos: int = 1) -> bytes:
    body = struct.pack(">H", packet_id) + b"".join(_string(f) + bytes([qos]) for f in filters)
    return _packet(SUBSCRIBE << 4 | 0x02, body)


def puback_packet(packet_id: int) -> bytes:
    return bytes([PUBACK << 4, 2]) + struct.pack(">H", packet_id)


class WireClient:
    """One MQTT connection: write pre-encoded packets, count PUBACKs, hand received PUBLISHes on.

    `on_publish(topic, payload)` is called for each message the broker delivers (QoS 1 ones are
    acknowledged here, as a device would).
    """

    def __init__(self, on_publish: Callable[[str, bytes], None] | None = None) -> None:
        self.on_publish = on_publish
        self.pubacks = 0
        self.subacks = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self, host: str, port: int, client_id: str, username: str, password: str) -> None:
        self._reader, self._writer = await asyncio.open_connection(host, port, limit=1 << 22)
        self._writer.write(connect_packet(client_id, username, password))
        header = await self._reader.readexactly(4)
        if header[0] >> 4 != CONNACK or header[3] != 0:
            raise ConnectionError(
                f"broker refused the connection (CONNACK {header.hex()}): check the password"
            )
        self._task = asyncio.create_task(self._read_loop())

    def write(self, data: bytes) -> None:
        assert self._writer is not None, "connect first"
        self._writer.write(data)

    async def drain(self) -> None:
        assert self._writer is not None
        await self._writer.drain()

    async def _read_loop(self) -> None:
        assert self._reader is not None and self._writer is not None
        buffer = b""
        while True:
            chunk = await self._reader.read(1 << 20)
            if not chunk:
                return
            buffer += chunk
            acks = []
            pos = 0
            while True:
                start = pos
                if len(buffer) - pos < 2:
                    break
                first = buffer[pos]
                length, shift, pos = 0, 0, pos + 1
                while pos < len(buffer):
                    byte = buffer[pos]
                    pos += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                else:
                    pos = start
                    break
                if len(buffer) - pos < length:
                    pos = start
                    break
                body = buffer[pos : pos + length]
                pos += length
                kind = first >> 4
                if kind == PUBACK:
                    self.pubacks += 1
                elif kind == SUBACK:
                    self.subacks += 1
                elif kind == PUBLISH:
                    (topic_len,) = struct.unpack_from(">H", body)
                    topic = body[2 : 2 + topic_len].decode()
                    rest = 2 + topic_len
                    if (first >> 1) & 0x03:
                        acks.append(puback_packet(struct.unpack_from(">H", body, rest)[0]))
                        rest += 2
                    if self.on_publish is not None:
                        self.on_publish(topic, body[rest:])
            buffer = buffer[pos:]
            if acks:
                self._writer.write(b"".join(acks))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.write(bytes([0xE0, 0]))  # DISCONNECT
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
