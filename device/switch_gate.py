"""When a proven model may take over: inside a maintenance window, and only while the line is idle.

The fleet turns each group's maintenance windows (cron, duration, time zone) into plain
`[start, end)` UTC epoch intervals in the offer, so the device needs no cron or time-zone rules. No
windows means any time. The line state comes from the plant (device/line.py).
"""

from dataclasses import dataclass
from typing import Any

from device.errors import UpdateRejected
from device.line import LineState

Window = tuple[float, float]
WAIT_WINDOW = "maintenance window"
WAIT_LINE = "line idle"


@dataclass(frozen=True)
class Wait:
    """What the switch waits for, in the shape reported in `UpdateStatus.detail`."""

    waiting_for: str
    next_start: float | None = None

    def detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"waiting_for": self.waiting_for}
        if self.next_start is not None:
            detail["next_start"] = self.next_start
        return detail


def window_wait(windows: list[Window], now: float) -> Wait | None:
    """None when a window is open now (or there are none); else the wait for the next one.

    Raises UpdateRejected when every window has ended: the fleet must offer again with new ones.
    """
    if not windows:
        return None
    if any(start <= now < end for start, end in windows):
        return None
    upcoming = [start for start, _ in windows if start > now]
    if not upcoming:
        last_end = max(end for _, end in windows)
        raise UpdateRejected(
            f"every switch window of this offer has ended (the last at {last_end:.0f}); "
            "the fleet must offer the update again with new windows"
        )
    return Wait(WAIT_WINDOW, min(upcoming))


def switch_wait(windows: list[Window], line: LineState | None, now: float) -> Wait | None:
    """What keeps the switch from happening now, the window first; None to switch."""
    waiting = window_wait(windows, now)
    if waiting is not None:
        return waiting
    if line is not None and line.busy:
        return Wait(WAIT_LINE)
    return None
