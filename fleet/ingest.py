"""Sealed telemetry ingest in batches: open many envelopes, store them in one transaction, say what
became of each, so the worker can receipt every record only after its row is committed.

Per record the work is the envelope's crypto (an X25519 exchange and an Ed25519 verify, about
0.2 ms of CPU here; the ML-KEM-768+X25519 hybrid adds an ML-KEM decapsulation) and one row.
Batching takes the rest off the per-record path: one transaction and one multi-row
`INSERT ... ON CONFLICT (device_id, seq) DO NOTHING RETURNING` per batch instead of a session and
a commit per record, one query for the device keys a batch still lacks, one thread hop per batch.
The unique (device, seq) constraint is still what drops a duplicate, so workers in other
processes sharing the subscription never store a record twice.
The crypto can run in worker processes (`IngestBatcher(processes=N)`): `cryptography` holds the
GIL through these small operations, so threads would not run them in parallel.

Fleet keys may be of either KEM (protocol/sealed.py) and may change while ingest runs (a rotation):
`TelemetryIngest` takes a mapping or a function returning the current one, read once per batch,
and a worker process gets the keys as (kem, PKCS#8 PEM) with each batch, loading only what changed.

Outcomes, as counted in `FleetService.telemetry_counts` and receipted by the worker:
`stored`, `duplicate` (receipted as stored), `rejected: <why>` (refused for good: receipted as
refused; but `rejected: UnknownKeyError`, sealed to a fleet key this fleet does not hold, e.g. one
rotated away, is receipted as `rekey`: the device seals it again to the current key),
`deferred: <why>` (the device's key is not pinned yet: not receipted, so it comes again),
`error: <why>` (this batch failed on the fleet's side: not receipted).
"""

import asyncio
import logging
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeAlias, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Insert, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from fleet.db import Device, TelemetryRecordRow
from fleet.errors import FleetError
from models.errors import ModelError
from models.signing import load_public_key
from protocol.errors import ProtocolError
from protocol.messages import TelemetryRecord, decode
from protocol.sealed import (
    ForgedSenderError,
    TelemetryPrivateKey,
    UnknownKeyError,
    kem_of,
    open_sealed,
    peek_header,
    private_from_bytes,
    private_to_bytes,
)

log = logging.getLogger(__name__)

STORED = "stored"
DUPLICATE = "duplicate"
NOT_PINNED = "deferred: no device key pinned yet"
UNKNOWN_KEY = f"rejected: {UnknownKeyError.__name__}"
MAX_BATCH = 2000  # records per transaction: big enough to amortise it, small enough to commit in ms
LINGER_S = 0.02  # how long a batch may wait to fill once a record is waiting
MAX_PENDING = 3 * MAX_BATCH  # arrivals waiting for a batch before the receiver stops reading

# What opening one envelope gives: ("ok", seq, kind, ts, body) or ("rejected", seq, outcome, message)
# or ("deferred", seq, outcome, ""); plain tuples, because they cross process boundaries.
Opened = tuple[Any, ...]
FleetKeys: TypeAlias = Mapping[str, TelemetryPrivateKey]
# How a fleet key crosses to a worker process: key id -> (kem, private_to_bytes(key)).
WireKeys: TypeAlias = dict[str, tuple[str, bytes]]


@dataclass(frozen=True)
class Arrival:
    """One message from a device's telemetry topic; `device_id` is the topic's (the broker
    authenticated it), not yet the envelope's."""

    device_id: str
    envelope: bytes
    token: object = None  # the receiver's handle to acknowledge the message by, once handled


@dataclass(frozen=True)
class Outcome:
    device_id: str
    seq: int | None  # the envelope's seq when its header names this device: what a receipt can name
    outcome: str

    @property
    def receipt(self) -> Literal["stored", "refused", "rekey"] | None:
        """How the device is told: stored (or already held), refused for good, sealed to a key the
        fleet does not hold (send it again sealed to the current key), or not at all."""
        if self.seq is None:
            return None
        if self.outcome in (STORED, DUPLICATE):
            return "stored"
        if self.outcome == UNKNOWN_KEY:
            return "rekey"
        if self.outcome.startswith("rejected"):
            return "refused"
        return None


def _receipt_seq(envelope: bytes, device_id: str) -> int | None:
    try:
        _, sender, seq = peek_header(envelope)
    except ProtocolError:
        return None
    return seq if sender == device_id else None


def open_one(
    envelope: bytes,
    device_id: str,
    fleet_keys: FleetKeys,
    device_key: Ed25519PublicKey | None,
) -> Opened:
    """Open and check one envelope from `device_id`'s topic, whose pinned key is `device_key`."""
    if device_key is None:
        return ("deferred", _receipt_seq(envelope, device_id), NOT_PINNED, "")
    try:
        # The envelope must name the topic's device: another device's record is not this one's to send.
        opened = open_sealed(
            envelope, fleet_keys=fleet_keys, device_keys=lambda d: device_key if d == device_id else None
        )
        record = decode(TelemetryRecord, opened.record)
    except (ProtocolError, ModelError) as e:
        return ("rejected", _receipt_seq(envelope, device_id), f"rejected: {type(e).__name__}", str(e))
    return ("ok", opened.seq, record.kind, record.ts, record.body)


# -- the process pool's side: keys arrive as (kem, bytes) and are loaded once per process ----------
_pool_fleet_keys: dict[str, TelemetryPrivateKey] = {}
_pool_fleet_wire: WireKeys = {}
_pool_device_keys: dict[bytes, Ed25519PublicKey] = {}


def _to_wire(fleet_keys: FleetKeys) -> WireKeys:
    return {kid: (kem_of(key), private_to_bytes(key)) for kid, key in fleet_keys.items()}


def _pool_sync_keys(wire: WireKeys) -> None:
    """Hold exactly the keys in `wire`: load the ones new or changed since the last batch, drop the
    ones the fleet no longer opens with (a rotation's grace ended)."""
    for kid in _pool_fleet_keys.keys() - wire.keys():
        del _pool_fleet_keys[kid], _pool_fleet_wire[kid]
    for kid, entry in wire.items():
        if _pool_fleet_wire.get(kid) != entry:
            _pool_fleet_keys[kid] = private_from_bytes(*entry)
            _pool_fleet_wire[kid] = entry


def _pool_init(fleet_keys: WireKeys) -> None:
    _pool_sync_keys(fleet_keys)


def _pool_open(items: list[tuple[bytes, str, bytes | None]], fleet_keys: WireKeys) -> list[Opened]:
    _pool_sync_keys(fleet_keys)
    out = []
    for envelope, device_id, raw in items:
        key = None
        if raw is not None:
            key = _pool_device_keys.get(raw)
            if key is None:
                key = _pool_device_keys.setdefault(raw, Ed25519PublicKey.from_public_bytes(raw))
        out.append(open_one(envelope, device_id, _pool_fleet_keys, key))
    return out


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class EnvelopeOpener:
    """Opens envelopes in this thread, or spread over `processes` child processes."""

    def __init__(self, fleet_keys: FleetKeys, processes: int = 0) -> None:
        if processes < 0:
            raise ValueError(f"processes must be 0 (open in this process) or more, not {processes}")
        self.processes = processes
        # (keys, their wire form), swapped in one assignment so a reader in another thread sees a pair.
        self._keys: tuple[dict[str, TelemetryPrivateKey], WireKeys] = ({}, {})
        self.use_keys(fleet_keys)
        self._pool: ProcessPoolExecutor | None = None
        if processes:
            # spawn: the fleet process has threads (asyncio, SQLite, paho); forking it is not safe.
            self._pool = ProcessPoolExecutor(
                processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_pool_init,
                initargs=(self._keys[1],),
            )

    @property
    def fleet_keys(self) -> dict[str, TelemetryPrivateKey]:
        return self._keys[0]

    def use_keys(self, fleet_keys: FleetKeys) -> None:
        """Open with these keys from now on (after a rotation); nothing to do when they are the ones
        in use. Worker processes load the change with the next batch they are given."""
        keys = dict(fleet_keys)
        current = self._keys[0]
        if keys.keys() == current.keys() and all(keys[k] is current[k] for k in keys):
            return
        self._keys = (keys, _to_wire(keys) if self.processes else {})

    def open(self, items: list[tuple[bytes, str, Ed25519PublicKey | None]]) -> list[Opened]:
        keys, wire_keys = self._keys
        if self._pool is None or len(items) < 2:
            return [open_one(envelope, device, keys, key) for envelope, device, key in items]
        wire = [(envelope, device, _raw(key) if key else None) for envelope, device, key in items]
        size = -(-len(wire) // self.processes)
        chunks = [wire[i : i + size] for i in range(0, len(wire), size)]
        work = partial(_pool_open, fleet_keys=wire_keys)
        return [opened for part in self._pool.map(work, chunks) for opened in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _insert_new(dialect: str) -> Insert:
    """INSERT that skips rows whose (device_id, seq) is stored already and returns the ones it stored."""
    insert: Callable[[Any], Any]
    if dialect == "sqlite":
        insert = sqlite.insert
    elif dialect == "postgresql":
        insert = postgresql.insert
    else:
        raise FleetError(
            f"telemetry ingest needs SQLite or PostgreSQL, not {dialect}: use one as the fleet database"
        )
    # On the Table, not the ORM class: the same SQL without the ORM's bulk-insert bookkeeping,
    # 25 -> 14 µs per record (bench/telemetry/RESULTS.md, "parts").
    table = cast(Table, TelemetryRecordRow.__table__)
    statement: Insert = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["device_id", "seq"])
        .returning(table.c.device_id, table.c.seq)
    )
    return statement


class TelemetryIngest:
    """Opens, checks and stores batches of sealed records; safe to call from several threads."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        fleet_keys: FleetKeys | Callable[[], FleetKeys],
        counts: Counter[str],
        key_cache: MutableMapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        """`fleet_keys`: the fleet's telemetry keys by key id, or a function returning the current
        ones (read once per batch, e.g. a keyring's, so a rotation reaches ingest without a restart)."""
        self.sessions = sessions
        self._fleet_keys = fleet_keys if callable(fleet_keys) else dict(fleet_keys)
        self.counts = counts
        # Pinned device keys, loaded once (others may drop an entry when they re-pin a key).
        self.keys: MutableMapping[str, Ed25519PublicKey] = key_cache if key_cache is not None else {}
        self._lock = threading.Lock()
        self._inline = EnvelopeOpener(self.fleet_keys)

    @property
    def fleet_keys(self) -> dict[str, TelemetryPrivateKey]:
        """The keys envelopes are opened with now."""
        source = self._fleet_keys
        return dict(source() if callable(source) else source)

    def ingest(self, batch: list[Arrival], opener: EnvelopeOpener | None = None) -> list[Outcome]:
        """One outcome per arrival, in order. Stored rows are committed when this returns; if the
        database fails, it raises and nothing of the batch is stored (so nothing may be receipted)."""
        if not batch:
            return []
        opener = opener or self._inline
        opener.use_keys(self.fleet_keys)
        cached = set(self.keys)
        self._load_keys({a.device_id for a in batch})
        opened = opener.open([(a.envelope, a.device_id, self.keys.get(a.device_id)) for a in batch])
        opened = self._retry_changed_keys(batch, opened, cached, opener)
        now = time.time()
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for arrival, result in zip(batch, opened, strict=True):
            if result[0] == "ok":
                _, seq, kind, ts, body = result
                rows.setdefault(
                    (arrival.device_id, seq),
                    {
                        "device_id": arrival.device_id,
                        "seq": seq,
                        "kind": kind,
                        "ts": ts,
                        "received": now,
                        "body": body,
                    },
                )
        stored = self._store(list(rows.values())) if rows else set()
        return self._outcomes(batch, opened, stored)

    def _outcomes(
        self, batch: list[Arrival], opened: list[Opened], stored: set[tuple[str, int]]
    ) -> list[Outcome]:
        outcomes, tally = [], Counter[str]()
        for arrival, result in zip(batch, opened, strict=True):
            if result[0] == "ok":
                key = (arrival.device_id, result[1])
                outcome = STORED if key in stored else DUPLICATE
                stored.discard(key)  # a second copy in the same batch is a duplicate
            else:
                outcome = result[2]
                if result[0] == "rejected":
                    log.warning("telemetry from %s rejected: %s", arrival.device_id, result[3])
            tally[outcome.split(":")[0] if outcome.startswith("deferred") else outcome] += 1
            outcomes.append(Outcome(arrival.device_id, result[1], outcome))
        with self._lock:
            self.counts.update(tally)
        return outcomes

    def _load_keys(self, device_ids: Iterable[str]) -> None:
        missing = [d for d in device_ids if d not in self.keys]
        if not missing:
            return
        with self.sessions() as s:
            for start in range(0, len(missing), 500):  # stay under the database's bound-parameter limit
                part = missing[start : start + 500]
                found = s.execute(select(Device.id, Device.public_key).where(Device.id.in_(part))).all()
                for device_id, pem in found:
                    if pem is not None:
                        self.keys[device_id] = load_public_key(pem)

    def _retry_changed_keys(
        self, batch: list[Arrival], opened: list[Opened], cached: set[str], opener: EnvelopeOpener
    ) -> list[Opened]:
        """A signature that fails against a key this process cached earlier may be a key the operator
        re-pinned since (in another process): read the key again before refusing the record for good."""
        forged = f"rejected: {ForgedSenderError.__name__}"
        suspects = {
            a.device_id for a, r in zip(batch, opened, strict=True) if r[0] == "rejected" and r[2] == forged
        } & cached
        if not suspects:
            return opened
        before = {d: _raw(key) for d in suspects if (key := self.keys.get(d)) is not None}
        for device_id in suspects:
            self.keys.pop(device_id, None)
        self._load_keys(suspects)
        fresh = {d: key for d in suspects if (key := self.keys.get(d)) is not None}
        changed = {d for d, key in fresh.items() if _raw(key) != before.get(d)}
        if not changed:
            return opened
        again = [i for i, a in enumerate(batch) if a.device_id in changed and opened[i][0] == "rejected"]
        reopened = opener.open(
            [(batch[i].envelope, batch[i].device_id, fresh[batch[i].device_id]) for i in again]
        )
        out = list(opened)
        for i, result in zip(again, reopened, strict=True):
            out[i] = result
        return out

    def _store(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        """Insert the rows in one transaction; return the (device, seq) it stored (the rest were held)."""
        with self.sessions.begin() as s:
            statement = _insert_new(s.get_bind().dialect.name)
            return {(device_id, seq) for device_id, seq in s.execute(statement, rows)}


class IngestBatcher:
    """Collects telemetry arrivals on the event loop and ingests them in batches in a thread.

    While one batch is opened and stored, the next one gathers, so batches grow with the load:
    one record at a time when it is quiet, up to `max_batch` under load. `on_done` gets each
    batch's outcomes once its rows are committed; a batch that fails gets none (no receipts, so
    its devices send it again). `on_handled` then gets the tokens given to `put` for every batch,
    stored or failed: the MQTT link acknowledges those messages to the broker only then, so a
    worker that dies mid-batch has them delivered again.
    """

    def __init__(
        self,
        ingest: TelemetryIngest,
        on_done: Callable[[list[Outcome]], None],
        processes: int = 0,
        max_batch: int = MAX_BATCH,
        linger_s: float = LINGER_S,
        on_handled: Callable[[list[object]], None] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.ingest = ingest
        self.on_done = on_done
        self.on_handled = on_handled
        self.max_pending = max_pending
        self.processes = processes
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.batches = 0
        self.failed = 0  # records in batches that failed on the fleet's side
        self._queue: list[Arrival] = []
        self._waiting = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def room(self) -> None:
        """Return once fewer than `max_pending` arrivals wait: a receiver awaits this before it
        reads more, so a backlog waits at the broker, not in this process's memory."""
        while len(self._queue) >= self.max_pending:
            await asyncio.sleep(self.linger_s or 0.01)

    def put(self, device_id: str, envelope: bytes, token: object = None) -> None:
        self._queue.append(Arrival(device_id, envelope, token))
        self._waiting.set()

    async def run(self) -> None:
        opener = await asyncio.to_thread(EnvelopeOpener, self.ingest.fleet_keys, self.processes)
        try:
            while True:
                await self._waiting.wait()
                if len(self._queue) < self.max_batch and self.linger_s > 0:
                    await asyncio.sleep(self.linger_s)
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                if not self._queue:
                    self._waiting.clear()
                try:
                    outcomes = await asyncio.to_thread(self.ingest.ingest, batch, opener)
                except Exception:  # a busy or broken database must not stop ingest; devices resend
                    self.failed += len(batch)
                    log.exception("ingest of %d telemetry records failed; none receipted", len(batch))
                else:
                    self.batches += 1
                    self.on_done(outcomes)
                if self.on_handled is not None:
                    self.on_handled([a.token for a in batch if a.token is not None])
        finally:
            await asyncio.to_thread(opener.close)
