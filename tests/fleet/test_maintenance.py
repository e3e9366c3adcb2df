"""Maintenance windows on a real SQLite file: local time zones, DST nights, several groups."""

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from fleet import maintenance
from fleet.db import Device, open_database
from fleet.errors import InvalidRequest, NotFound
from fleet.rollout_db import set_labels


def utc(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    sessions = open_database(tmp_path / "fleet.sqlite")
    with sessions.begin() as s:
        for device_id, groups in (
            ("berlin-1", ["plant-berlin"]),
            ("ny-1", ["plant-ny"]),
            ("tokyo-1", ["plant-tokyo"]),
            ("both-1", ["plant-ny", "plant-tokyo"]),
            ("free-1", ["lab"]),
        ):
            s.add(Device(id=device_id, mqtt_password_hash="-"))
            s.flush()
            set_labels(s, device_id, groups=groups, tags=[])
    with sessions.begin() as s:
        yield s


def test_a_device_without_windows_may_switch_any_time(session: Session) -> None:
    assert maintenance.switch_allowed(session, "free-1", utc(2025, 1, 15, 12, 0)) == (True, None)
    assert maintenance.upcoming_windows(session, "free-1", utc(2025, 1, 15, 12, 0)) is None
    with pytest.raises(NotFound):
        maintenance.switch_allowed(session, "nobody", 0.0)


def test_a_window_follows_local_time_in_winter_and_summer(session: Session) -> None:
    maintenance.add_window(session, "plant-berlin", "0 2 * * *", 120, "Europe/Berlin")
    # January: CET = UTC+1, the window is 01:00-03:00 UTC.
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 1, 15, 0, 59)) == (
        False,
        utc(2025, 1, 15, 1, 0),
    )
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 1, 15, 1, 0)) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 1, 15, 2, 59)) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 1, 15, 3, 0)) == (
        False,
        utc(2025, 1, 16, 1, 0),
    ), "the end is exclusive"
    # July: CEST = UTC+2, the same local window is 00:00-02:00 UTC.
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 7, 15, 0, 30)) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 7, 15, 2, 30)) == (
        False,
        utc(2025, 7, 16, 0, 0),
    )


def test_spring_forward_a_start_in_the_skipped_hour_opens_after_the_gap(session: Session) -> None:
    # 2025-03-30: Berlin clocks jump from 02:00 CET to 03:00 CEST (01:00 UTC); 02:30 never happens.
    maintenance.add_window(session, "plant-berlin", "30 2 * * *", 60, "Europe/Berlin")
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 3, 30, 0, 59)) == (
        False,
        utc(2025, 3, 30, 1, 0),
    )
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 3, 30, 1, 30)) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 3, 30, 2, 0)) == (
        False,
        utc(2025, 3, 31, 0, 30),
    ), "the next night the window is 02:30 CEST again"


def test_fall_back_the_repeated_hour_keeps_the_wall_clock_end(session: Session) -> None:
    # 2025-10-26: Berlin clocks go from 03:00 CEST back to 02:00 CET (01:00 UTC); 02:30 happens twice.
    maintenance.add_window(session, "plant-berlin", "30 2 * * *", 60, "Europe/Berlin")
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 10, 26, 0, 29))[0] is False
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 10, 26, 0, 30)) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 10, 26, 1, 45)) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 10, 26, 2, 30)) == (
        False,
        utc(2025, 10, 27, 1, 30),
    ), "closed at 03:30 CET, the wall-clock end of any other night"


def test_windows_in_other_time_zones_and_us_dst(session: Session) -> None:
    maintenance.add_window(session, "plant-ny", "0 22 * * 1-5", 60, "America/New_York")
    maintenance.add_window(session, "plant-tokyo", "0 22 * * 1-5", 60, "Asia/Tokyo")
    wednesday_ny_evening = utc(2025, 1, 16, 3, 30)  # Wed 22:30 EST, Thu 12:30 JST
    assert maintenance.switch_allowed(session, "ny-1", wednesday_ny_evening) == (True, None)
    assert maintenance.switch_allowed(session, "tokyo-1", wednesday_ny_evening) == (
        False,
        utc(2025, 1, 16, 13, 0),
    )
    assert maintenance.switch_allowed(session, "both-1", wednesday_ny_evening) == (True, None)
    assert maintenance.switch_allowed(session, "both-1", utc(2025, 1, 16, 13, 30)) == (True, None)
    # Summer in New York (EDT = UTC-4): 22:00 local is 02:00 UTC, not 03:00.
    assert maintenance.switch_allowed(session, "ny-1", utc(2025, 7, 16, 2, 30)) == (True, None)
    assert maintenance.switch_allowed(session, "ny-1", utc(2025, 7, 16, 3, 30))[0] is False
    # Friday 22:00 EST is the last start of the week: the next is Monday's.
    assert maintenance.switch_allowed(session, "ny-1", utc(2025, 1, 18, 12, 0)) == (
        False,
        utc(2025, 1, 21, 3, 0),
    )


def test_a_window_across_midnight_and_the_week(session: Session) -> None:
    maintenance.add_window(session, "plant-berlin", "0 23 * * 6", 180, "UTC")  # Saturday 23:00-02:00
    saturday_2300 = utc(2025, 1, 18, 23, 0)
    assert maintenance.switch_allowed(session, "berlin-1", saturday_2300) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 1, 19, 1, 59)) == (True, None)
    assert maintenance.switch_allowed(session, "berlin-1", utc(2025, 1, 19, 2, 0)) == (
        False,
        saturday_2300 + 7 * 86400,
    )


def test_upcoming_windows_are_ordered_and_merged(session: Session) -> None:
    maintenance.add_window(session, "plant-ny", "0 22 * * *", 60, "America/New_York")
    maintenance.add_window(session, "plant-tokyo", "0 22 * * *", 60, "Asia/Tokyo")
    maintenance.add_window(session, "plant-tokyo", "30 22 * * *", 60, "Asia/Tokyo")  # overlaps the other
    now = utc(2025, 1, 16, 3, 30)  # inside New York's window
    spans = maintenance.upcoming_windows(session, "both-1", now, count=3)
    assert spans == [
        (utc(2025, 1, 16, 3, 0), utc(2025, 1, 16, 4, 0)),
        (utc(2025, 1, 16, 13, 0), utc(2025, 1, 16, 14, 30)),
        (utc(2025, 1, 17, 3, 0), utc(2025, 1, 17, 4, 0)),
    ]


def test_windows_are_validated_with_a_way_out(session: Session) -> None:
    with pytest.raises(InvalidRequest, match="5 fields"):
        maintenance.add_window(session, "plant-ny", "61 2 * * *", 60, "UTC")
    with pytest.raises(InvalidRequest, match="5 fields"):
        maintenance.add_window(session, "plant-ny", "0 2 * *", 60, "UTC")
    with pytest.raises(InvalidRequest, match="5 fields"):
        maintenance.add_window(session, "plant-ny", "0 0 2 * * *", 60, "UTC")  # seconds field
    with pytest.raises(InvalidRequest, match="IANA name"):
        maintenance.add_window(session, "plant-ny", "0 2 * * *", 60, "Mars/Olympus")
    with pytest.raises(InvalidRequest, match="1 to"):
        maintenance.add_window(session, "plant-ny", "0 2 * * *", 0, "UTC")
    with pytest.raises(InvalidRequest, match="invalid label"):
        maintenance.add_window(session, "plant ny", "0 2 * * *", 60, "UTC")
    window_id = maintenance.add_window(session, "plant-ny", " 0 2 * * * ", 60, "UTC")
    assert maintenance.list_windows(session, "plant-ny") == [
        {"id": window_id, "group": "plant-ny", "cron": "0 2 * * *", "duration_minutes": 60, "tz": "UTC"}
    ]
    maintenance.remove_window(session, window_id)
    assert maintenance.list_windows(session) == []
    with pytest.raises(NotFound):
        maintenance.remove_window(session, window_id)
