"""Progress of a long byte transfer on stderr: a live bar on a terminal, one summary line elsewhere.

Logs, CI and pipes get no carriage returns to garble them; an operator at a terminal sees bytes,
percentage and rate while a package of hundreds of MiB goes up to the fleet.
"""

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

REDRAW_S = 0.1  # at most ten redraws a second: a fast local upload must not be slowed by the terminal
RATE_WINDOW_S = 2.0  # the live rate is over the last seconds, so a stall shows at once
MIN_BAR = 8
ELLIPSIS = "..."  # ASCII: stderr may have no UTF-8 locale (a service unit, a bare SSH session)
DEFAULT_COLUMNS = 80
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    for unit in UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {UNITS[-1]}"


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return DEFAULT_COLUMNS
    return columns or DEFAULT_COLUMNS  # a fresh pty reports 0 until someone sets its size


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ByteProgress:
    """`update(sent, total)` is the callback of a transfer; use it as a context manager so the last
    state is drawn (or the summary written) once the transfer ends, or says where it stopped."""

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        *,
        live: bool | None = None,
        waiting_note: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`live` defaults to whether `stream` is a terminal; `waiting_note` is shown once every byte
        is sent while the other side still works (e.g. the fleet verifying the package)."""
        self.label = label
        self.total = max(total, 0)
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        self.waiting_note = waiting_note
        self.clock = clock
        self.sent = 0
        self.started = clock()
        self.ended: float | None = None
        self.sent_all_at: float | None = None  # the last byte left: what follows is the other side's time
        self._drawn_at: float | None = None
        self._drawn_width = 0
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    # -- the callback --------------------------------------------------------------------------------
    def update(self, sent: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.sent = sent
        now = self.clock()
        self._samples.append((now, sent))
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW_S:
            self._samples.popleft()
        finished = self.total > 0 and sent >= self.total
        if finished and self.sent_all_at is None:
            self.sent_all_at = now
        if self.live and (finished or self._drawn_at is None or now - self._drawn_at >= REDRAW_S):
            self._draw(now)

    __call__ = update

    # -- figures -------------------------------------------------------------------------------------
    def rate(self, now: float | None = None) -> float:
        """Bytes per second over the last RATE_WINDOW_S; over the whole transfer once every byte left."""
        if self.sent_all_at is not None:
            elapsed = self.sent_all_at - self.started
            return self.sent / elapsed if elapsed > 0 else 0.0
        first_t, first_sent = self._samples[0]
        last_t, last_sent = self._samples[-1]
        span = last_t - first_t
        return (last_sent - first_sent) / span if span > 0 else 0.0

    def line(self, columns: int = DEFAULT_COLUMNS) -> str:
        """The bar as drawn: label, bar, percentage, bytes, rate; fitted to `columns`.

        When room runs short the waiting note goes first, then the bar shrinks to MIN_BAR, then the
        label loses its head (a file name's end tells it apart); the figures always stay."""
        fraction = min(self.sent / self.total, 1.0) if self.total else 0.0
        sizes = f"{format_bytes(self.sent)}/{format_bytes(self.total)}"
        figures = f" {fraction:4.0%} {sizes} {format_bytes(self.rate())}/s"
        width = columns - 1  # the last column would wrap on some terminals
        label = self.label
        if self.total and self.sent >= self.total and self.waiting_note and self.ended is None:
            noted = f" {fraction:4.0%} {sizes} - {self.waiting_note}"  # the rate of nothing moving: 0
            if width - len(label) - len(noted) - 3 >= MIN_BAR:
                figures = noted
        room = width - len(label) - len(figures) - 3  # 3: " [" and "]"
        if room < MIN_BAR:
            keep = max(0, len(label) - (MIN_BAR - room) - len(ELLIPSIS))
            label = ELLIPSIS + label[len(label) - keep :] if keep else ""
            room = MIN_BAR
        filled = round(room * fraction)
        return f"{label} [{'#' * filled}{'.' * (room - filled)}]{figures}"[:width]

    def summary(self, error: BaseException | None = None) -> str:
        end = self.ended if self.ended is not None else self.clock()
        elapsed = end - self.started
        if error is None and (self.sent_all_at is not None or self.total == 0):
            sent_all_at = self.sent_all_at if self.sent_all_at is not None else end
            line = (
                f"{self.label}: {format_bytes(self.sent)} in {sent_all_at - self.started:.1f} s "
                f"({format_bytes(self.rate())}/s)"
            )
            waited = end - sent_all_at
            return line + (f", answered {waited:.1f} s later" if waited >= 0.05 else "")
        if self.sent_all_at is not None:  # every byte went; the other side answered with an error
            took = self.sent_all_at - self.started
            return f"{self.label}: all {format_bytes(self.sent)} sent in {took:.1f} s, then it failed"
        percent = self.sent / self.total if self.total else 0.0
        return (
            f"{self.label}: stopped at {percent:.0%} ({format_bytes(self.sent)} of "
            f"{format_bytes(self.total)}) after {elapsed:.1f} s"
        )

    # -- output --------------------------------------------------------------------------------------
    def _draw(self, now: float) -> None:
        text = self.line(_columns(self.stream))
        # Pad over what the last draw left: a shorter line (a rate that lost a digit) must not leave debris.
        self.stream.write("\r" + text + " " * max(0, self._drawn_width - len(text)))
        self.stream.flush()
        self._drawn_at = now
        self._drawn_width = len(text)

    def close(self, error: BaseException | None = None) -> None:
        if self.ended is not None:
            return
        self.ended = self.clock()
        if self.live:
            self._draw(self.ended)  # the final figures, without the waiting note
            self.stream.write("\n")
            if error is not None:
                self.stream.write(self.summary(error) + "\n")
        else:
            self.stream.write(self.summary(error) + "\n")
        self.stream.flush()

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(error)
