"""The durable on-disk outbox between telemetry producers and the MQTT link.

One SQLite file in WAL mode. A record counts as produced only once `put` returned: by then its
INSERT, its sequence number and any evictions it caused are one committed transaction.

Durability: `synchronous=FULL`. With WAL, NORMAL survives a process crash but not a power cut: the
last commits before the cut can roll back. On a factory floor power cuts are the common failure,
and a rolled-back commit would roll back the seq counter too, so after reboot the device would
hand out a seq the fleet may already have accepted, and the fleet's replay guard would then drop
the new record as a replay. FULL fsyncs the WAL at every commit, so a seq that `put` returned
(and that may have been published) is never handed out again. It costs one fsync per commit;
`put_many` batches records into one commit where that matters.

Bound and eviction: the sum of `len(payload) + RECORD_OVERHEAD` over pending records stays
`<= max_bytes`. When a new record does not fit, records are evicted by kind priority, then age:
oldest `metric` first; `health` summaries only when no metric is left. A new metric that could
only fit by evicting health is itself dropped, and nothing else is (it is the lowest priority;
it still consumed its seq, so the fleet sees a gap). Evictions are counted per kind in the same
transaction, so the counts survive restarts and can be reported upstream.

The files on disk are larger than the bound: page slack and indexes (freed pages are reused, not
returned), the WAL, checkpointed every max_bytes/2 (at least 128 KiB, at most 4 MiB), and a
32 KiB shm. Measured after 20,000 records: 2.0 MiB on disk for a 1 MiB bound, 313 KiB for 64 KiB.

Sequence numbers: one per record, per device (one outbox per device), strictly increasing
across restarts: `last_seq` is stored in the same transaction as the insert. Acked and evicted
seqs are never reused.

Threads: every method takes one lock around one connection (`check_same_thread=False`), so the
pipeline thread and the asyncio loop may share an Outbox. Calls block for an fsync; from the
event loop prefer `await asyncio.to_thread(outbox.ack, seq)` when that matters.
"""

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

RECORD_OVERHEAD = 64  # bytes charged per record on top of its payload (row header, index entry)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS evicted (kind TEXT PRIMARY KEY, records INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('last_seq', 0);
"""


class Kind(StrEnum):
    """Record classes, lowest eviction priority first: metrics go before health summaries."""

    METRIC = "metric"
    HEALTH = "health"


EVICTION_ORDER = (Kind.METRIC, Kind.HEALTH)


class OutboxError(ValueError):
    """A record the outbox refuses outright (larger than the whole bound, unknown kind)."""


@dataclass(frozen=True)
class OutboxRecord:
    seq: int
    kind: Kind
    payload: bytes


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    bytes: int  # charged bytes of pending records, <= max_bytes
    last_seq: int
    evicted_by_kind: dict[str, int]  # records evicted since the outbox was created, per kind
    evicted_bytes_by_kind: dict[str, int]


class Outbox:
    def __init__(self, path: Path | str, max_bytes: int) -> None:
        if max_bytes < 1024:
            raise ValueError(f"max_bytes {max_bytes} is too small to be useful (at least 1024)")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Keep the WAL in proportion to the bound: checkpoint every max_bytes/2 of WAL (between
        # 128 KiB and SQLite's default 4 MiB) and truncate it back to that size afterwards.
        wal_pages = min(1000, max(32, max_bytes // 2 // 4096))
        self._db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        self._db.execute(f"PRAGMA journal_size_limit={wal_pages * 4096}")
        self._db.executescript(_SCHEMA)
        self._bytes = {kind: 0 for kind in Kind}  # charged bytes pending, per kind
        with self._tx():
            for kind, total in self._db.execute("SELECT kind, SUM(size) FROM records GROUP BY kind"):
                self._bytes[Kind(kind)] = int(total)
            # A smaller bound than last time: evict down to it now.
            self._evict(self.total_bytes - self.max_bytes, Kind.HEALTH)

    @property
    def total_bytes(self) -> int:
        return sum(self._bytes.values())

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        charged = dict(self._bytes)
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._bytes = charged
            raise
        self._db.execute("COMMIT")

    def _evict(self, need: int, incoming: Kind) -> int:
        """Free at least `need` charged bytes by policy; return how many bytes are still missing.

        Only kinds of lower or equal priority than `incoming` are evicted (health never goes for a
        metric), and nothing at all if even that would not free enough. Runs inside the caller's
        transaction.
        """
        allowed = EVICTION_ORDER[: EVICTION_ORDER.index(incoming) + 1]
        if need > sum(self._bytes[kind] for kind in allowed):
            return need
        for kind in allowed:
            if need <= 0:
                break
            freed, count, last = 0, 0, None
            rows = self._db.execute(
                "SELECT seq, size FROM records WHERE kind = ? ORDER BY seq", (kind.value,)
            )
            for seq, size in rows:
                freed, count, last = freed + size, count + 1, seq
                if freed >= need:
                    break
            rows.close()
            if last is None:
                continue
            self._db.execute("DELETE FROM records WHERE kind = ? AND seq <= ?", (kind.value, last))
            self._count_evicted(kind, count, freed)
            self._bytes[kind] -= freed
            need -= freed
        return need

    def _count_evicted(self, kind: Kind, count: int, freed: int) -> None:
        self._db.execute(
            "INSERT INTO evicted (kind, records, bytes) VALUES (?, ?, ?) ON CONFLICT (kind) DO UPDATE "
            "SET records = records + excluded.records, bytes = bytes + excluded.bytes",
            (kind.value, count, freed),
        )

    def put(self, kind: Kind | str, payload: bytes) -> int:
        """Store one record durably and return its seq (see the module docstring on eviction)."""
        return self.put_many(kind, [payload])[0]

    def put_many(self, kind: Kind | str, payloads: Iterable[bytes]) -> list[int]:
        """Store several records of one kind in one commit (one fsync); return their seqs in order."""
        kind = Kind(kind)
        batch = [bytes(p) for p in payloads]
        for payload in batch:
            if len(payload) + RECORD_OVERHEAD > self.max_bytes:
                raise OutboxError(f"a record of {len(payload)} bytes can never fit in {self.max_bytes}")
        with self._lock, self._tx():
            (last,) = self._db.execute("SELECT value FROM meta WHERE name = 'last_seq'").fetchone()
            seqs = []
            for payload in batch:
                last += 1
                seqs.append(last)
                size = len(payload) + RECORD_OVERHEAD
                if self._evict(self.total_bytes + size - self.max_bytes, kind) > 0:
                    self._count_evicted(kind, 1, size)  # only health left: the new metric goes
                    continue
                self._db.execute(
                    "INSERT INTO records (seq, kind, payload, size) VALUES (?, ?, ?, ?)",
                    (last, kind.value, payload, size),
                )
                self._bytes[kind] += size
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'last_seq'", (last,))
        return seqs

    def start_after(self, seq: int) -> None:
        """Hand out seqs above `seq` from now on (never lowers the counter): a re-provisioned device
        continues after the highest seq the fleet already holds for its id."""
        if seq < 0:
            raise ValueError(f"seq must be >= 0, not {seq}")
        with self._lock, self._tx():
            self._db.execute("UPDATE meta SET value = MAX(value, ?) WHERE name = 'last_seq'", (seq,))

    def peek(self, limit: int = 100, *, after: int = 0) -> list[OutboxRecord]:
        """Up to `limit` pending records with seq > `after`, oldest first. Nothing is removed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, payload FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [OutboxRecord(seq=s, kind=Kind(k), payload=bytes(p)) for s, k, p in rows]

    def ack(self, seq: int) -> bool:
        """Delete one record once the broker acknowledged it (PUBACK); False if it was not pending."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete the given records in one commit; return how many were pending."""
        removed = 0
        with self._lock, self._tx():
            for seq in seqs:
                # No DELETE ... RETURNING: it needs SQLite 3.35, newer than some device OS images.
                row = self._db.execute("SELECT kind, size FROM records WHERE seq = ?", (seq,)).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM records WHERE seq = ?", (seq,))
                    removed += 1
                    self._bytes[Kind(row[0])] -= int(row[1])
        return removed

    def stats(self) -> OutboxStats:
        with self._lock:
            (pending,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
            (last,) = self._db.execute("SELECT value FROM meta WHERE name = 'last_seq'").fetchone()
            evicted = self._db.execute("SELECT kind, records, bytes FROM evicted").fetchall()
            return OutboxStats(
                pending=int(pending),
                bytes=self.total_bytes,
                last_seq=int(last),
                evicted_by_kind={k.value: 0 for k in Kind} | {k: int(n) for k, n, _ in evicted},
                evicted_bytes_by_kind={k.value: 0 for k in Kind} | {k: int(b) for k, _, b in evicted},
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
