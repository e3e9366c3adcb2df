"""Simulated devices for the ingest benchmark: real sealed records, sent on a schedule over real MQTT.

Every device has its own Ed25519 key (derived from its id, so a sealed corpus can be cached and
reused across runs) and its own seqs from 1. Records are sealed before the timed run, exactly as
`protocol.sealed.seal` seals them on a device, so during the run the simulator only writes bytes.

The devices share `connections` MQTT connections as the fleet user (whose ACL is `edgefleet/#`),
each PUBLISH going to its own device's `edgefleet/v1/<id>/telemetry` topic, and each connection
subscribes at QoS 1 to its devices' `cmd/telemetry-ack` topics, so the broker delivers (and the
simulator acknowledges) every receipt a real device would get. What differs from 5,000 real
devices: 5,000 TCP connections and their keepalives are not there (the broker's per-connection
cost is not measured), and the simulator does not resend unreceipted records.
"""

import asyncio
import hashlib
import json
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from mqtt_wire import WireClient, publish_packet, subscribe_packet

from protocol import topics
from protocol.messages import TelemetryRecord, encode
from protocol.sealed import fleet_key_id, seal

SLOT_S = 0.01  # the schedule's resolution: each 10 ms slot's packets leave in one write per connection
STALL_S = 30.0  # a windowed send gives up when nothing was taken for this long


def device_id(index: int) -> str:
    return f"sim-{index:05d}"


def device_key(index: int) -> Ed25519PrivateKey:
    """The same key for the same device every run, so a cached corpus stays valid."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"edgefleet-sim/{index}".encode()).digest())


def public_pem(index: int) -> str:
    return (
        device_key(index)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def record_bytes(index: int, seq: int) -> bytes:
    """A pipeline-result metric of about 160 bytes of JSON, like the device's pipeline puts."""
    body = {
        "model": "surface-defect",
        "version": 2,
        "label": "crack" if seq % 7 == 0 else "ok",
        "score": round((seq * 37 % 100) / 100, 2),
        "latency_ms": 11.5 + index % 5,
        "source": "line-3/cam",
    }
    return encode(TelemetryRecord(kind="metric", ts=1.7e9 + seq, body=body))


def _seal_device(args: tuple[int, int, bytes]) -> list[bytes]:
    index, count, fleet_raw = args
    fleet_public = X25519PublicKey.from_public_bytes(fleet_raw)
    kid, key, dev = fleet_key_id(fleet_public), device_key(index), device_id(index)
    return [
        seal(
            record_bytes(index, seq),
            device_id=dev,
            seq=seq,
            device_key=key,
            fleet_public=fleet_public,
            fleet_key_id=kid,
        )
        for seq in range(1, count + 1)
    ]


def sealed_corpus(
    fleet_key: X25519PrivateKey, devices: int, per_device: int, cache: Path
) -> list[list[bytes]]:
    """`per_device` sealed records for each of `devices` devices, from the cache when it has them."""
    fleet_raw = fleet_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    path = cache / f"corpus-{fleet_raw.hex()[:12]}-{devices}x{per_device}.pickle"
    if path.exists():
        corpus: list[list[bytes]] = pickle.loads(path.read_bytes())
        return corpus
    # Any cached corpus with as many devices and at least as many records serves as well.
    for other in sorted(cache.glob(f"corpus-{fleet_raw.hex()[:12]}-*x*.pickle")):
        n, m = (int(x) for x in other.stem.rsplit("-", 1)[1].split("x"))
        if n >= devices and m >= per_device:
            corpus = pickle.loads(other.read_bytes())
            return [records[:per_device] for records in corpus[:devices]]
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1, initializer=os.nice, initargs=(10,)) as pool:
        corpus = list(
            pool.map(_seal_device, [(i, per_device, fleet_raw) for i in range(devices)], chunksize=20)
        )
    print(
        f"  sealed {devices * per_device:,} records in {time.perf_counter() - started:.0f} s (cached: {path})"
    )
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(corpus, protocol=pickle.HIGHEST_PROTOCOL))
    return corpus


@dataclass
class Schedule:
    """Per 10 ms slot, one blob of PUBLISH packets per connection; and each record's slot."""

    blobs: list[list[bytes]]  # [slot][connection]
    slot_of: dict[tuple[int, int], int]  # (device index, seq) -> slot
    sizes: list[int]  # records per slot

    @classmethod
    def of(cls, blobs: list[list[bytes]], slot_of: dict[tuple[int, int], int]) -> "Schedule":
        sizes = [0] * len(blobs)
        for slot in slot_of.values():
            sizes[slot] += 1
        return cls(blobs=blobs, slot_of=slot_of, sizes=sizes)

    @property
    def total(self) -> int:
        return len(self.slot_of)


def schedule(corpus: list[list[bytes]], rate: float, duration_s: float, connections: int) -> Schedule:
    """Each device sends `rate` records/s from a phase of its own, spread evenly over the period."""
    slots = max(1, round(duration_s / SLOT_S))
    per_slot: list[list[list[bytes]]] = [[[] for _ in range(connections)] for _ in range(slots)]
    slot_of: dict[tuple[int, int], int] = {}
    packet_ids = [0] * connections
    period = 1.0 / rate
    devices = len(corpus)
    for index, records in enumerate(corpus):
        conn = index % connections
        topic = topics.device_topic(device_id(index), topics.TELEMETRY)
        phase = period * index / devices
        for k, envelope in enumerate(records):
            slot = int((phase + k * period) / SLOT_S)
            if slot >= slots:
                break
            packet_ids[conn] = packet_ids[conn] % 65535 + 1
            per_slot[slot][conn].append(publish_packet(topic, envelope, packet_ids[conn]))
            slot_of[(index, k + 1)] = slot
    return Schedule.of([[b"".join(packets) for packets in conns] for conns in per_slot], slot_of)


def burst(corpus: list[list[bytes]], connections: int) -> Schedule:
    """A backlog after an outage, oldest first, round-robin over devices: one record of every device
    per slot, so `play` offers it at devices / SLOT_S records/s (50 devices: 5,000/s), or with a
    `window` as fast as the fleet stores it."""
    blobs: list[list[bytes]] = []
    slot_of: dict[tuple[int, int], int] = {}
    packet_ids = [0] * connections
    depth = max(len(r) for r in corpus)
    for k in range(depth):  # one "slot" per round of one record from every device
        conns: list[list[bytes]] = [[] for _ in range(connections)]
        for index, records in enumerate(corpus):
            if k < len(records):
                conn = index % connections
                packet_ids[conn] = packet_ids[conn] % 65535 + 1
                topic = topics.device_topic(device_id(index), topics.TELEMETRY)
                conns[conn].append(publish_packet(topic, records[k], packet_ids[conn]))
                slot_of[(index, k + 1)] = k
        blobs.append([b"".join(p) for p in conns])
    return Schedule.of(blobs, slot_of)


@dataclass
class Receipts:
    stored: set[tuple[str, int]] = field(default_factory=set)
    refused: int = 0
    at: dict[tuple[str, int], float] = field(default_factory=dict)

    def on_publish(self, topic: str, payload: bytes) -> None:
        now = time.time()
        device, _ = topics.split_device_topic(topic)
        ack = json.loads(payload)
        for seq in ack.get("stored", ()):
            key = (device, seq)
            if key not in self.stored:
                self.stored.add(key)
                self.at[key] = now
        self.refused += len(ack.get("refused", ()))


class Fleetless:
    """The simulator's connections: publish the schedule, collect receipts."""

    def __init__(self, devices: int, connections: int) -> None:
        self.devices = devices
        self.receipts = Receipts()
        self.clients = [WireClient(self.receipts.on_publish) for _ in range(connections)]
        self.sent_at: list[float] = []  # per slot: when its packets were written
        self.sent = 0

    async def connect(self, host: str, port: int, username: str, password: str) -> None:
        for n, client in enumerate(self.clients):
            await client.connect(host, port, f"sim-{os.getpid()}-{n}", username, password)
        expected = []
        for n, client in enumerate(self.clients):
            mine = [
                topics.device_topic(device_id(i), topics.CMD_TELEMETRY_ACK)
                for i in range(n, self.devices, len(self.clients))
            ]
            for start in range(0, len(mine), 500):
                client.write(subscribe_packet(1 + start // 500, mine[start : start + 500]))
            expected.append(-(-len(mine) // 500))
        await _until(lambda: all(c.subacks >= e for c, e in zip(self.clients, expected, strict=True)))

    async def play(
        self, plan: Schedule, slot_s: float = SLOT_S, window: int = 0, stored: Callable[[], int] | None = None
    ) -> None:
        """Write each slot's packets at its time; or, with `window`, as soon as fewer than `window`
        records are sent and not yet `stored()`: a backlog pushed as fast as the fleet takes it."""
        start = time.time()
        for slot, blobs in enumerate(plan.blobs):
            if window:
                assert stored is not None, "a window needs the stored count"
                last, since = stored(), time.monotonic()
                while self.sent - (now := stored()) > window:
                    if now != last:
                        last, since = now, time.monotonic()
                    elif time.monotonic() - since > STALL_S:
                        raise TimeoutError(
                            f"no progress for {STALL_S:.0f} s with {self.sent - now} records sent and not "
                            "taken: did the broker drop them? (see its log for 'dropped')"
                        )
                    await asyncio.sleep(0.05)
            else:
                delay = start + slot * slot_s - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.sent_at.append(time.time())
            for client, blob in zip(self.clients, blobs, strict=True):
                if blob:
                    client.write(blob)
            self.sent += plan.sizes[slot]
            if slot % 10 == 0:
                await asyncio.gather(*(c.drain() for c in self.clients))

    def pubacks(self) -> int:
        return sum(c.pubacks for c in self.clients)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the broker did not acknowledge the simulator's subscriptions")
        await asyncio.sleep(0.01)
