"""How long the fleet keeps opened telemetry records, and the pruning that enforces it.

Per kind of record, two limits, either of which may be off (None):
- `max_age_s`: rows the fleet received longer ago than this go. Age is measured on `received`, the
  fleet's clock, not `ts`: a device's clock may be wrong (boards without an RTC start in 1970), and a
  device back after days offline should not have its backlog deleted the moment it lands.
- `max_rows_per_device`: only the newest N rows (by the device's seq) of each device are kept, so
  one chatty device cannot fill the disk for all.

Defaults (`RetentionPolicy()`), sized for the agent's default 5 s health interval (17,280 a day):
- health: 7 days, at most 20,000 rows per device (about 28 hours at 5 s; 7 days at 30 s);
- metric: 30 days, at most 200,000 rows per device;
- any other kind: kept (no limit), so that a new kind is never deleted by a policy that forgot it.

Deleting is done in batches of `batch_size` rows, each in its own short transaction, so SQLite's single
write lock is held for milliseconds at a time and the MQTT worker's inserts interleave (measured in
tests/fleet/test_retention.py). Pruned (device, seq) pairs no longer block a late resend of the same
seq; with the device deleting records as soon as the fleet's receipt arrives, that needs a receipt
lost for longer than the retention, and would store that one record again.
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from fleet.db import TelemetryRecordRow
from fleet.errors import InvalidRequest

DAY_S = 24 * 3600


@dataclass(frozen=True)
class KindRetention:
    max_age_s: float | None = None
    max_rows_per_device: int | None = None

    def __post_init__(self) -> None:
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise InvalidRequest(f"max_age_s must be positive or None (keep forever), got {self.max_age_s}")
        if self.max_rows_per_device is not None and self.max_rows_per_device < 1:
            raise InvalidRequest(
                f"max_rows_per_device must be at least 1 or None (no cap), got {self.max_rows_per_device}"
            )


def _default_kinds() -> dict[str, KindRetention]:
    return {
        "health": KindRetention(max_age_s=7 * DAY_S, max_rows_per_device=20_000),
        "metric": KindRetention(max_age_s=30 * DAY_S, max_rows_per_device=200_000),
    }


@dataclass(frozen=True)
class RetentionPolicy:
    kinds: Mapping[str, KindRetention] = field(default_factory=_default_kinds)
    batch_size: int = 1000
    # Sleep between batches: room for other writers on a busy SQLite file. 0 on PostgreSQL.
    pause_s: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 100_000:
            raise InvalidRequest(f"batch_size must be between 1 and 100000, got {self.batch_size}")
        if self.pause_s < 0:
            raise InvalidRequest(f"pause_s must not be negative, got {self.pause_s}")

    @classmethod
    def from_days(
        cls,
        health_days: float | None = 7,
        health_max_rows: int | None = 20_000,
        metric_days: float | None = 30,
        metric_max_rows: int | None = 200_000,
        **kwargs: Any,
    ) -> "RetentionPolicy":
        """The policy from the fleet's config fields (days rather than seconds)."""

        def seconds(days: float | None) -> float | None:
            return None if days is None else days * DAY_S

        return cls(
            kinds={
                "health": KindRetention(seconds(health_days), health_max_rows),
                "metric": KindRetention(seconds(metric_days), metric_max_rows),
            },
            **kwargs,
        )


def _delete_batches(sessions: sessionmaker[Session], where: Any, policy: RetentionPolicy) -> int:
    """Delete the rows matching `where`, `batch_size` at a time.

    The rows are found in a read transaction (which in WAL mode blocks no writer), walking the
    primary key forward so the whole pass reads the table once; only the delete by primary key
    holds the write lock. A row's kind, seq and received never change, so what was found still
    matches when it is deleted.
    """
    deleted = 0
    after = 0
    while True:
        with sessions() as s:
            ids = list(
                s.scalars(
                    select(TelemetryRecordRow.id)
                    .where(TelemetryRecordRow.id > after, *where)
                    .order_by(TelemetryRecordRow.id)
                    .limit(policy.batch_size)
                )
            )
        if not ids:
            return deleted
        with sessions.begin() as s:
            done = s.execute(delete(TelemetryRecordRow).where(TelemetryRecordRow.id.in_(ids)))
        # rowcount, not len(ids): a second pruner (another worker) may have taken some already.
        deleted += cast(CursorResult[Any], done).rowcount
        after = ids[-1]
        if len(ids) < policy.batch_size:
            return deleted
        if policy.pause_s:
            time.sleep(policy.pause_s)


def _prune_by_age(sessions: sessionmaker[Session], kind: str, cutoff: float, policy: RetentionPolicy) -> int:
    where = (TelemetryRecordRow.kind == kind, TelemetryRecordRow.received < cutoff)
    return _delete_batches(sessions, where, policy)


def _prune_by_count(sessions: sessionmaker[Session], kind: str, keep: int, policy: RetentionPolicy) -> int:
    with sessions() as s:
        over = s.execute(
            select(TelemetryRecordRow.device_id)
            .where(TelemetryRecordRow.kind == kind)
            .group_by(TelemetryRecordRow.device_id)
            .having(func.count() > keep)
        ).scalars()
        devices = list(over)
    deleted = 0
    for device_id in devices:
        with sessions() as s:
            # The seq of the oldest row to keep; everything of this kind below it goes.
            floor = s.execute(
                select(TelemetryRecordRow.seq)
                .where(TelemetryRecordRow.device_id == device_id, TelemetryRecordRow.kind == kind)
                .order_by(TelemetryRecordRow.seq.desc())
                .offset(keep - 1)
                .limit(1)
            ).scalar_one_or_none()
        if floor is None:
            continue
        where = (
            TelemetryRecordRow.device_id == device_id,
            TelemetryRecordRow.kind == kind,
            TelemetryRecordRow.seq < floor,
        )
        deleted += _delete_batches(sessions, where, policy)
    return deleted


def prune(
    session_factory: sessionmaker[Session], policy: RetentionPolicy | None = None, now: float | None = None
) -> dict[str, int]:
    """Apply `policy` at time `now`; returns the rows deleted per kind (every kind of the policy).

    Safe to run while the fleet ingests: each batch is its own transaction, and a row inserted
    meanwhile is either newer than the cut (kept) or deleted by the next run.
    """
    policy = policy or RetentionPolicy()
    now = time.time() if now is None else now
    result: dict[str, int] = {}
    for kind, rule in policy.kinds.items():
        deleted = 0
        if rule.max_age_s is not None:
            deleted += _prune_by_age(session_factory, kind, now - rule.max_age_s, policy)
        if rule.max_rows_per_device is not None:
            deleted += _prune_by_count(session_factory, kind, rule.max_rows_per_device, policy)
        result[kind] = deleted
    return result
