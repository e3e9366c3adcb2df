"""The batched telemetry ingest on a real SQLite file, with real envelopes and a real process pool."""

import asyncio
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fleet.db import Device, TelemetryRecordRow, open_database
from fleet.ingest import (
    DUPLICATE,
    NOT_PINNED,
    STORED,
    Arrival,
    EnvelopeOpener,
    IngestBatcher,
    Outcome,
    TelemetryIngest,
)
from models.signing import public_key_pem
from protocol import sealed
from protocol.messages import TelemetryRecord, encode
from protocol.sealed import (
    KEM_MLKEM768_X25519,
    TelemetryPrivateKey,
    fleet_key_id,
    generate_telemetry_key,
    peek_kem,
    seal,
)


class Fleet:
    """A fleet database with pinned devices, and the fleet's telemetry key."""

    def __init__(self, path: Path, devices: int = 3) -> None:
        self.path = path
        self.sessions: sessionmaker[Session] = open_database(path)
        self.key = X25519PrivateKey.generate()
        self.key_id = fleet_key_id(self.key.public_key())
        self.device_keys = {f"cam-{i}": Ed25519PrivateKey.generate() for i in range(devices)}
        with self.sessions.begin() as s:
            for device_id, key in self.device_keys.items():
                s.add(Device(id=device_id, mqtt_password_hash="", public_key=public_key_pem(key)))
            s.add(Device(id="unpinned", mqtt_password_hash=""))

    def ingest(self, counts: Counter[str] | None = None) -> TelemetryIngest:
        """An ingest with its own database engine, as a worker in another process would have."""
        return TelemetryIngest(
            open_database(self.path), {self.key_id: self.key}, Counter() if counts is None else counts
        )

    def seal(self, device_id: str, seq: int, key: Ed25519PrivateKey | None = None, **kw: Any) -> bytes:
        record = encode(TelemetryRecord(kind="metric", ts=float(seq), body={"seq": seq}))
        return seal(
            record,
            device_id=device_id,
            seq=seq,
            device_key=key or self.device_keys[device_id],
            fleet_public=kw.get("fleet_public", self.key.public_key()),
            fleet_key_id=kw.get("fleet_key_id", self.key_id),
        )

    def rows(self) -> list[tuple[str, int]]:
        with self.sessions() as s:
            rows = s.execute(
                select(TelemetryRecordRow.device_id, TelemetryRecordRow.seq).order_by(TelemetryRecordRow.id)
            )
            return [(d, q) for d, q in rows]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "fleet.sqlite")


def test_one_batch_stores_new_records_and_says_what_became_of_each(fleet: Fleet) -> None:
    counts: Counter[str] = Counter()
    ingest = fleet.ingest(counts)
    assert ingest.ingest([Arrival("cam-0", fleet.seal("cam-0", 1))])[0].outcome == STORED
    tampered = bytearray(fleet.seal("cam-1", 5))
    tampered[-3] ^= 0x01
    other_fleet = X25519PrivateKey.generate().public_key()
    batch = [
        Arrival("cam-0", fleet.seal("cam-0", 2)),  # new
        Arrival("cam-0", fleet.seal("cam-0", 1)),  # stored by the earlier batch
        Arrival("cam-1", fleet.seal("cam-1", 1)),  # new: seqs are per device
        Arrival("cam-1", fleet.seal("cam-1", 1)),  # the same record twice in one batch
        Arrival("cam-1", fleet.seal("cam-1", 4, key=Ed25519PrivateKey.generate())),  # forged
        Arrival("cam-1", bytes(tampered)),
        Arrival("cam-2", fleet.seal("cam-0", 3)),  # cam-0's record on cam-2's topic
        Arrival("cam-2", fleet.seal("cam-2", 6, fleet_public=other_fleet, fleet_key_id="0123456789abcdef")),
        Arrival("cam-2", b"not an envelope"),
        Arrival("unpinned", b"anything"),
        Arrival("cam-2", fleet.seal("cam-2", 7)),  # new, after all of that
    ]
    outcomes = ingest.ingest(batch)
    assert [o.outcome for o in outcomes] == [
        STORED,
        DUPLICATE,
        STORED,
        DUPLICATE,
        "rejected: ForgedSenderError",
        "rejected: TamperedError",
        "rejected: ForgedSenderError",
        "rejected: UnknownKeyError",
        "rejected: MalformedEnvelopeError",
        NOT_PINNED,
        STORED,
    ]
    # What a receipt can name: the seq of an envelope that names the topic's device, nothing else.
    assert [(o.seq, o.receipt) for o in outcomes] == [
        (2, "stored"),
        (1, "stored"),
        (1, "stored"),
        (1, "stored"),
        (4, "refused"),
        (5, "refused"),
        (None, None),  # it names cam-0, so it is not cam-2's seq to refuse
        (6, "rekey"),  # sealed to a key this fleet does not hold: re-seal it
        (None, None),
        (None, None),  # deferred: the device sends it again once its key is pinned
        (7, "stored"),
    ]
    assert fleet.rows() == [("cam-0", 1), ("cam-0", 2), ("cam-1", 1), ("cam-2", 7)], "in arrival order"
    assert counts == {
        STORED: 4,
        DUPLICATE: 2,
        "rejected: ForgedSenderError": 2,
        "rejected: TamperedError": 1,
        "rejected: UnknownKeyError": 1,
        "rejected: MalformedEnvelopeError": 1,
        "deferred": 1,
    }


def test_two_workers_with_their_own_databases_never_store_a_record_twice(tmp_path: Path) -> None:
    """The unique (device, seq) constraint decides, whichever worker commits first."""
    fleet = Fleet(tmp_path / "fleet.sqlite", devices=600)  # more devices than one key query takes
    envelopes = [Arrival(d, fleet.seal(d, seq)) for seq in (1, 2) for d in fleet.device_keys]
    counts: list[Counter[str]] = [Counter(), Counter()]
    ingests = [fleet.ingest(counts[0]), fleet.ingest(counts[1])]
    results: list[list[Outcome]] = [[], []]

    def work(n: int) -> None:  # both see every record, in batches of 100, in opposite orders
        mine = envelopes if n == 0 else envelopes[::-1]
        for start in range(0, len(mine), 100):
            results[n] += ingests[n].ingest(mine[start : start + 100])

    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = fleet.rows()
    assert len(rows) == len(set(rows)) == 1200
    assert counts[0][STORED] + counts[1][STORED] == 1200
    assert counts[0][DUPLICATE] + counts[1][DUPLICATE] == 1200
    assert all(o.receipt == "stored" for r in results for o in r), "a duplicate is receipted as stored"


def test_the_process_pool_opens_like_this_process(fleet: Fleet) -> None:
    batch = [Arrival("cam-0", fleet.seal("cam-0", seq)) for seq in range(1, 41)]
    batch.append(Arrival("cam-1", fleet.seal("cam-1", 1, key=Ed25519PrivateKey.generate())))
    batch.append(Arrival("unpinned", b"x"))
    inline = fleet.ingest()
    pooled_ingest = fleet.ingest()
    pool = EnvelopeOpener({fleet.key_id: fleet.key}, processes=2)
    try:
        pooled_ingest._load_keys({a.device_id for a in batch})
        keys = [(a.envelope, a.device_id, pooled_ingest.keys.get(a.device_id)) for a in batch]
        assert pool.open(keys) == inline._inline.open(keys), "same results, in the same order"
        outcomes = pooled_ingest.ingest(batch, pool)
    finally:
        pool.close()
    assert [o.outcome for o in outcomes] == [STORED] * 40 + ["rejected: ForgedSenderError", NOT_PINNED]
    with pytest.raises(ValueError, match="processes must be 0"):
        EnvelopeOpener({}, processes=-1)


def test_a_key_re_pinned_elsewhere_is_read_again_before_a_record_is_refused(fleet: Fleet) -> None:
    ingest = fleet.ingest()
    assert ingest.ingest([Arrival("cam-0", fleet.seal("cam-0", 1))])[0].outcome == STORED  # key cached
    replacement = Ed25519PrivateKey.generate()
    with fleet.sessions.begin() as s:  # the operator re-pins cam-0 (another process: no cache to drop)
        s.execute(update(Device).where(Device.id == "cam-0").values(public_key=public_key_pem(replacement)))
    assert ingest.ingest([Arrival("cam-0", fleet.seal("cam-0", 2, key=replacement))])[0].outcome == STORED
    old = fleet.seal("cam-0", 3)  # the old key is refused now
    assert ingest.ingest([Arrival("cam-0", old)])[0].outcome == "rejected: ForgedSenderError"


def test_a_failed_commit_stores_and_receipts_nothing_and_ingest_goes_on(fleet: Fleet) -> None:
    ingest = fleet.ingest()
    real_store = ingest._store
    failures = {"left": 1}

    def store_failing_once(rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("database is locked")
        return real_store(rows)

    ingest._store = store_failing_once  # type: ignore[method-assign]
    done: list[Outcome] = []

    async def scenario() -> IngestBatcher:
        batcher = IngestBatcher(ingest, done.extend, linger_s=0.05)
        task = asyncio.create_task(batcher.run())
        for seq in range(1, 11):
            batcher.put("cam-0", fleet.seal("cam-0", seq))
        await asyncio.sleep(0.01)
        while batcher.pending or ingest.counts[STORED] + batcher.failed < 10:
            await asyncio.sleep(0.02)
        for seq in range(1, 11):  # the device's resend of what got no receipt
            batcher.put("cam-0", fleet.seal("cam-0", seq))
        while len(done) < 10:
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return batcher

    batcher = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert batcher.failed == 10, "the first batch (all ten, gathered by the linger) failed"
    assert [(o.seq, o.outcome) for o in done] == [(seq, STORED) for seq in range(1, 11)]
    assert fleet.rows() == [("cam-0", seq) for seq in range(1, 11)]
    assert batcher.batches == 1


def test_batches_grow_with_the_load_and_keep_arrival_order(fleet: Fleet) -> None:
    ingest = fleet.ingest()
    done: list[Outcome] = []
    envelopes = [fleet.seal("cam-1", seq) for seq in range(1, 301)]

    async def scenario() -> IngestBatcher:
        batcher = IngestBatcher(ingest, done.extend, max_batch=120, linger_s=0.01)
        task = asyncio.create_task(batcher.run())
        for envelope in envelopes:
            batcher.put("cam-1", envelope)
        while len(done) < 300:
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return batcher

    batcher = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert batcher.batches == 3, "300 waiting records, 120 per batch"
    assert [o.seq for o in done] == list(range(1, 301))
    assert fleet.rows() == [("cam-1", seq) for seq in range(1, 301)]
    with fleet.sessions() as s:
        assert s.scalar(select(func.count()).select_from(TelemetryRecordRow)) == 300
    with pytest.raises(ValueError, match="max_batch"):
        IngestBatcher(ingest, done.extend, max_batch=0)


def test_receipts_go_to_the_longest_waiting_devices_within_the_delay_bound(tmp_path: Path) -> None:
    """Each tick receipts the devices waiting longest: at least RECEIPTS_PER_TICK, and enough that
    every waiting device is receipted within RECEIPT_MAX_DELAY_S; seqs pile up in one receipt."""
    from fleet import mqtt_worker
    from fleet.service import FleetService
    from fleet.store import FleetDataDir
    from protocol.messages import TelemetryAck, decode

    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    service = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883")
    worker = mqtt_worker.FleetWorker(service, "127.0.0.1", 1883)
    sent: list[tuple[str, TelemetryAck]] = []

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        assert qos == 1
        sent.append((topic.split("/")[2], decode(TelemetryAck, payload)))

    worker.publish = publish  # type: ignore[method-assign]
    many = mqtt_worker.RECEIPTS_PER_TICK * 3
    worker._receipt_all([Outcome(f"d{i}", 1, STORED) for i in range(many)])
    worker._receipt_all([Outcome("d0", 2, DUPLICATE), Outcome("d0", 3, "rejected: TamperedError")])
    worker._receipt_all(
        [Outcome("d1", 9, NOT_PINNED), Outcome("d1", None, "rejected: MalformedEnvelopeError")]
    )
    asyncio.run(worker._send_receipts())
    assert [device for device, _ in sent] == [f"d{i}" for i in range(mqtt_worker.RECEIPTS_PER_TICK)]
    assert (sent[0][1].stored, sent[0][1].refused) == ([1, 2], [3])
    assert (sent[1][1].stored, sent[1][1].refused) == ([1], []), "deferred and unnamed seqs get no receipt"
    # A crowd: enough per tick that the last in line waits at most RECEIPT_MAX_DELAY_S.
    crowd = 20 * many
    worker._receipt_all([Outcome(f"c{i}", 1, STORED) for i in range(crowd)])
    waiting = len(worker._receipts)
    sent.clear()
    asyncio.run(worker._send_receipts())
    per_tick = len(sent)
    assert per_tick >= waiting * mqtt_worker.RECEIPT_INTERVAL_S / mqtt_worker.RECEIPT_MAX_DELAY_S
    assert per_tick > mqtt_worker.RECEIPTS_PER_TICK
    # One device with more seqs than a receipt may list gets several receipts.
    worker._receipts.clear()
    sent.clear()
    worker._receipt_all([Outcome("big", seq, STORED) for seq in range(mqtt_worker.RECEIPT_MAX_SEQS + 5)])
    asyncio.run(worker._send_receipts())
    assert [len(ack.stored) for _, ack in sent] == [mqtt_worker.RECEIPT_MAX_SEQS, 5]


def test_hybrid_key_envelopes_are_ingested_end_to_end_through_a_worker_process(fleet: Fleet) -> None:
    """A fleet holding an X25519 and a post-quantum hybrid key (a rotation in progress) stores what
    was sealed to either, opened in a worker process; the hybrid key crosses to it as (kem, PEM)."""
    if not sealed.hybrid_supported():
        pytest.skip("this cryptography build has no ML-KEM (needs OpenSSL 3.5+/AWS-LC)")
    hybrid = generate_telemetry_key(KEM_MLKEM768_X25519)
    hybrid_id = fleet_key_id(hybrid.public_key())
    assert hybrid_id.startswith("pq-")
    keys: dict[str, TelemetryPrivateKey] = {fleet.key_id: fleet.key}
    counts: Counter[str] = Counter()
    ingest = TelemetryIngest(open_database(fleet.path), lambda: keys, counts)  # read once per batch
    pq = {"fleet_public": hybrid.public_key(), "fleet_key_id": hybrid_id}
    pool = EnvelopeOpener(ingest.fleet_keys, processes=1)
    try:
        # Before the fleet holds the hybrid key, what is sealed to it is refused as an unknown key.
        early = ingest.ingest([Arrival("cam-0", fleet.seal("cam-0", s, **pq)) for s in (1, 2)], pool)
        assert [o.outcome for o in early] == ["rejected: UnknownKeyError"] * 2
        assert [o.receipt for o in early] == ["rekey"] * 2, "kept by the device, to be re-sealed"
        keys[hybrid_id] = hybrid  # rotated in: the worker process gets the key with the next batch
        batch = [
            Arrival("cam-0", fleet.seal("cam-0", 3, **pq)),
            Arrival("cam-0", fleet.seal("cam-0", 4)),  # the old X25519 key, still in its grace period
            Arrival("cam-1", fleet.seal("cam-1", 1, **pq)),
            Arrival("cam-1", fleet.seal("cam-1", 1, **pq)),  # the same record twice
            Arrival("cam-1", fleet.seal("cam-1", 2, key=Ed25519PrivateKey.generate(), **pq)),  # forged
            # Sealed to the hybrid key under the X25519 key's id: refused, not a crash in the worker.
            Arrival(
                "cam-2", fleet.seal("cam-2", 1, fleet_public=hybrid.public_key(), fleet_key_id=fleet.key_id)
            ),
            Arrival("cam-2", fleet.seal("cam-2", 2, **pq)),
        ]
        assert peek_kem(batch[0].envelope) == KEM_MLKEM768_X25519 and peek_kem(batch[1].envelope) == "x25519"
        outcomes = ingest.ingest(batch, pool)
        assert [o.outcome for o in outcomes] == [
            STORED,
            STORED,
            STORED,
            DUPLICATE,
            "rejected: ForgedSenderError",
            "rejected: UnknownKeyError",
            STORED,
        ]
        inline = [(a.envelope, a.device_id, ingest.keys.get(a.device_id)) for a in batch]
        here = EnvelopeOpener(ingest.fleet_keys)
        assert pool.open(inline) == here.open(inline), "the worker opens like this process"
        del keys[fleet.key_id]  # the X25519 key's grace ended: the worker drops it too
        late = ingest.ingest([Arrival("cam-2", fleet.seal("cam-2", s)) for s in (3, 4)], pool)
        assert [o.outcome for o in late] == ["rejected: UnknownKeyError"] * 2
    finally:
        pool.close()
    assert fleet.rows() == [("cam-0", 3), ("cam-0", 4), ("cam-1", 1), ("cam-2", 2)]
    with fleet.sessions() as s:
        bodies = s.scalars(select(TelemetryRecordRow.body).order_by(TelemetryRecordRow.id)).all()
    assert bodies == [{"seq": 3}, {"seq": 4}, {"seq": 1}, {"seq": 2}], "the decrypted records, as sealed"
    assert counts[STORED] == 4 and counts["rejected: UnknownKeyError"] == 5


def test_an_opener_takes_new_keys_only_when_they_change(fleet: Fleet) -> None:
    opener = EnvelopeOpener({fleet.key_id: fleet.key})
    before = opener._keys
    opener.use_keys({fleet.key_id: fleet.key})
    assert opener._keys is before, "the same keys: nothing re-serialized"
    other = X25519PrivateKey.generate()
    opener.use_keys({fleet_key_id(other.public_key()): other})
    assert list(opener.fleet_keys) == [fleet_key_id(other.public_key())]
    envelope = fleet.seal("cam-0", 1)
    assert opener.open([(envelope, "cam-0", fleet.device_keys["cam-0"].public_key())])[0][2] == (
        "rejected: UnknownKeyError"
    )
