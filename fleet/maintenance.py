"""Maintenance windows: when a group's devices may switch to a new model (they may download any time).

A window is a 5-field cron expression for its start, read in the window's own time zone, and a duration
in real minutes. Daylight-saving time follows croniter: a start inside the spring-forward gap opens at
the first instant after it (02:30 on a night that skips 02:00-03:00 opens at 03:00), and a start inside
the repeated autumn hour opens twice, so that night's window runs to the same wall-clock end as on
other nights. A device in several groups may switch inside any window of any of them; a device whose
groups have no window may switch at any time.
"""

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db import Device
from fleet.errors import InvalidRequest, NotFound
from fleet.rollout_db import DeviceLabel, MaintenanceWindow, check_label

MAX_DURATION_MINUTES = 7 * 24 * 60


@dataclass(frozen=True)
class Window:
    """A window as validated values, apart from the table."""

    cron: str
    duration_minutes: int
    tz: str

    def __post_init__(self) -> None:
        if len(self.cron.split()) != 5 or not croniter.is_valid(self.cron):
            raise InvalidRequest(
                f"invalid cron expression {self.cron!r}: give 5 fields, minute hour day month weekday "
                "(e.g. '0 2 * * 0' for Sundays at 02:00)"
            )
        if not 1 <= self.duration_minutes <= MAX_DURATION_MINUTES:
            raise InvalidRequest(f"window duration must be 1 to {MAX_DURATION_MINUTES} minutes")
        zone(self.tz)

    def last_start(self, now: float) -> float:
        """The latest start at or before `now` (epoch seconds)."""
        # croniter's get_prev is strictly before its base; one second later makes a start at `now` count.
        # (Added to the epoch, not to the local time, whose arithmetic ignores DST changes.)
        local = datetime.fromtimestamp(now + 1, zone(self.tz))
        start: datetime = croniter(self.cron, local).get_prev(datetime)
        return start.timestamp()

    def next_start(self, now: float) -> float:
        """The first start strictly after `now`."""
        local = datetime.fromtimestamp(now, zone(self.tz))
        start: datetime = croniter(self.cron, local).get_next(datetime)
        return start.timestamp()

    def is_open(self, now: float) -> bool:
        # Every start of one window has the same duration, so the latest start has the latest end.
        return now < self.last_start(now) + self.duration_minutes * 60


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise InvalidRequest(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin'") from e


def add_window(session: Session, group: str, cron: str, duration_minutes: int, tz: str) -> int:
    """Store a window for `group` and return its id."""
    window = Window(cron.strip(), duration_minutes, tz)
    row = MaintenanceWindow(
        group_name=check_label(group), cron=window.cron, duration_minutes=window.duration_minutes, tz=tz
    )
    session.add(row)
    session.flush()
    return row.id


def remove_window(session: Session, window_id: int) -> None:
    row = session.get(MaintenanceWindow, window_id)
    if row is None:
        raise NotFound(f"no maintenance window {window_id}")
    session.delete(row)
    session.flush()


def list_windows(session: Session, group: str | None = None) -> list[dict[str, object]]:
    query = select(MaintenanceWindow).order_by(MaintenanceWindow.group_name, MaintenanceWindow.id)
    if group is not None:
        query = query.where(MaintenanceWindow.group_name == group)
    return [
        {
            "id": w.id,
            "group": w.group_name,
            "cron": w.cron,
            "duration_minutes": w.duration_minutes,
            "tz": w.tz,
        }
        for w in session.scalars(query)
    ]


def windows_of(session: Session, device_id: str) -> list[Window]:
    if session.get(Device, device_id) is None:
        raise NotFound(f"no device {device_id!r}")
    groups = select(DeviceLabel.value).where(DeviceLabel.device_id == device_id, DeviceLabel.kind == "group")
    rows = session.scalars(select(MaintenanceWindow).where(MaintenanceWindow.group_name.in_(groups)))
    return [Window(r.cron, r.duration_minutes, r.tz) for r in rows]


def switch_allowed(session: Session, device_id: str, now: float) -> tuple[bool, float | None]:
    """May `device_id` switch models at `now`? If not, also when its next window opens (epoch seconds)."""
    windows = windows_of(session, device_id)
    if not windows or any(w.is_open(now) for w in windows):
        return True, None
    return False, min(w.next_start(now) for w in windows)


def upcoming_windows(
    session: Session, device_id: str, now: float, count: int = 3
) -> list[tuple[float, float]] | None:
    """The next `count` (start, end) spans in which the device may switch, the open one first.

    None means no restriction. An offer can carry these so a device that goes offline for days still
    knows when it may switch; overlapping spans are merged.
    """
    windows = windows_of(session, device_id)
    if not windows:
        return None
    spans: list[tuple[float, float]] = []
    for w in windows:
        length = w.duration_minutes * 60
        start = w.last_start(now)
        if now < start + length:
            spans.append((start, start + length))
        it = croniter(w.cron, datetime.fromtimestamp(now, zone(w.tz)))
        for _ in range(count):
            nxt = it.get_next(datetime).timestamp()
            spans.append((nxt, nxt + length))
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged[:count]


__all__ = [
    "Window",
    "add_window",
    "list_windows",
    "remove_window",
    "switch_allowed",
    "upcoming_windows",
    "windows_of",
]
