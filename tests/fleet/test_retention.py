"""Telemetry retention on a real SQLite file: what goes, what stays, and that ingest is not locked out."""

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from fleet.db import TelemetryRecordRow, open_database
from fleet.errors import InvalidRequest
from fleet.retention import DAY_S, KindRetention, RetentionPolicy, prune

NOW = 1_800_000_000.0


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    return open_database(tmp_path / "fleet.sqlite")


def add(sessions: sessionmaker[Session], rows: list[dict[str, Any]]) -> None:
    with sessions.begin() as s:
        s.execute(insert(TelemetryRecordRow), rows)


def row(device: str, seq: int, kind: str, age_days: float) -> dict[str, Any]:
    received = NOW - age_days * DAY_S
    return {"device_id": device, "seq": seq, "kind": kind, "ts": received, "received": received, "body": {}}


def remaining(sessions: sessionmaker[Session]) -> dict[tuple[str, str], list[int]]:
    with sessions() as s:
        rows = s.execute(
            select(TelemetryRecordRow.device_id, TelemetryRecordRow.kind, TelemetryRecordRow.seq).order_by(
                TelemetryRecordRow.seq
            )
        ).all()
    result: dict[tuple[str, str], list[int]] = {}
    for device, kind, seq in rows:
        result.setdefault((device, kind), []).append(seq)
    return result


def test_default_policy_by_age_per_kind(sessions: sessionmaker[Session]) -> None:
    add(
        sessions,
        [
            row("a", 1, "health", 10),  # older than 7 days: goes
            row("a", 2, "health", 7.01),  # goes
            row("a", 3, "health", 6.99),  # stays
            row("a", 4, "metric", 10),  # metrics are kept 30 days: stays
            row("a", 5, "metric", 31),  # goes
            row("a", 6, "audit", 400),  # a kind the policy does not name: kept
            row("b", 1, "health", 8),
            row("b", 2, "health", 0),
        ],
    )
    assert prune(sessions, RetentionPolicy(), now=NOW) == {"health": 3, "metric": 1}
    assert remaining(sessions) == {
        ("a", "health"): [3],
        ("a", "metric"): [4],
        ("a", "audit"): [6],
        ("b", "health"): [2],
    }
    assert prune(sessions, RetentionPolicy(), now=NOW) == {"health": 0, "metric": 0}


def test_age_is_the_fleets_receipt_time_not_the_devices_clock(sessions: sessionmaker[Session]) -> None:
    # A board without an RTC stamped its records 1970; they arrived today and stay.
    add(sessions, [row("rtc-less", 1, "health", 0) | {"ts": 0.0}])
    assert prune(sessions, now=NOW) == {"health": 0, "metric": 0}
    assert remaining(sessions) == {("rtc-less", "health"): [1]}


def test_row_cap_keeps_each_devices_newest_by_seq(sessions: sessionmaker[Session]) -> None:
    add(sessions, [row("chatty", seq, "health", 0) for seq in range(1, 101)])
    add(sessions, [row("chatty", seq, "metric", 0) for seq in range(101, 131)])
    add(sessions, [row("quiet", seq, "health", 0) for seq in range(1, 6)])
    # Inserted out of seq order, as resends after an outage arrive: the cap goes by seq, not by id.
    add(sessions, [row("late", seq, "health", 0) for seq in (9, 3, 7, 1, 5, 2, 8, 4, 6, 10)])
    policy = RetentionPolicy(kinds={"health": KindRetention(max_rows_per_device=10)}, batch_size=7)
    assert prune(sessions, policy, now=NOW) == {"health": 90}
    left = remaining(sessions)
    assert left[("chatty", "health")] == list(range(91, 101))
    assert left[("chatty", "metric")] == list(range(101, 131)), "another kind is not counted against health"
    assert left[("quiet", "health")] == [1, 2, 3, 4, 5]
    assert left[("late", "health")] == list(range(1, 11))


def test_age_and_cap_together_and_batches_give_the_same_answer(tmp_path: Path) -> None:
    # Higher seqs are older here (a device whose seq restarted is not the point; the order is).
    rows = [row(f"d{d}", seq, "health", (seq - 0.5) / 10) for d in range(5) for seq in range(1, 201)]
    results = []
    for batch in (1, 13, 1000):
        sessions = open_database(tmp_path / f"fleet-{batch}.sqlite")
        add(sessions, rows)
        policy = RetentionPolicy(
            kinds={"health": KindRetention(max_age_s=15 * DAY_S, max_rows_per_device=120)}, batch_size=batch
        )
        # Age drops seq 151..200 (received more than 15 days ago), then the cap keeps seq 31..150.
        results.append((prune(sessions, policy, now=NOW), remaining(sessions)))
    assert all(result == results[0] for result in results)
    deleted, left = results[0]
    assert deleted == {"health": 5 * (200 - 120)}
    assert left[("d0", "health")] == list(range(31, 151))


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(InvalidRequest, match="max_age_s"):
        KindRetention(max_age_s=0)
    with pytest.raises(InvalidRequest, match="max_rows_per_device"):
        KindRetention(max_rows_per_device=0)
    with pytest.raises(InvalidRequest, match="batch_size"):
        RetentionPolicy(batch_size=0)
    policy = RetentionPolicy.from_days(health_days=2, health_max_rows=None, metric_days=None)
    assert policy.kinds["health"] == KindRetention(2 * DAY_S, None)
    assert policy.kinds["metric"] == KindRetention(None, 200_000)


@pytest.mark.slow
def test_ingest_keeps_writing_while_a_large_prune_runs(sessions: sessionmaker[Session]) -> None:
    total = 60_000
    month_ago = {"received": time.time() - 30 * DAY_S}
    for start in range(0, total, 10_000):
        add(sessions, [row("old", seq, "health", 0) | month_ago for seq in range(start, start + 10_000)])
    stop = threading.Event()
    waits: list[float] = []

    def ingest() -> None:
        seq = 10_000_000
        while not stop.is_set():
            started = time.perf_counter()
            add(sessions, [row("live", seq, "health", 0) | {"received": time.time()}])
            waits.append(time.perf_counter() - started)
            seq += 1

    writer = threading.Thread(target=ingest)
    writer.start()
    time.sleep(0.05)
    started = time.perf_counter()
    try:
        deleted = prune(sessions, RetentionPolicy(batch_size=1000), now=time.time())
    finally:
        took = time.perf_counter() - started
        stop.set()
        writer.join(30)
    assert deleted["health"] == total
    with sessions() as s:
        live = s.scalar(select(func.count()).where(TelemetryRecordRow.device_id == "live"))
    assert live == len(waits) and live > 10, "ingest went on during the prune"
    # One batch's delete, not the whole prune, is the longest an insert waits.
    assert max(waits) < max(1.0, took / 3), (max(waits), took)
