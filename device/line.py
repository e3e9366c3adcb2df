"""Whether the production line is busy: set by the plant, read by the updater before a switch.

The plant (a PLC gateway, a MES hook) marks the line busy or idle through the local API
(`PUT /api/line`); the updater proves a new model while the line runs, but switches to it only while
the line is idle, so an update never interrupts production. The state is kept on disk, written
atomically, so an agent restarted mid-shift still knows the line is busy.
"""

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device.atomic import write_json_atomic
from device.errors import ConfigError

log = logging.getLogger(__name__)
MAX_SETTER_CHARS = 64
MAX_REASON_CHARS = 256  # a reason is a note in the status, not a log


@dataclass(frozen=True)
class LineStatus:
    busy: bool
    since: float  # epoch seconds of the last change between busy and idle
    by: str  # who set it: "api", "mqtt", a plant system's name
    reason: str = ""  # why, when the setter says: "plant topic line/3/state", "plant signal silent"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LineState:
    """Thread-safe: the API sets it on the event loop, the updater reads it, a plant bridge may set it."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._status = self._load()

    def _load(self) -> LineStatus:
        if self.path is None or not self.path.exists():
            return LineStatus(busy=False, since=time.time(), by="default")
        try:
            raw = json.loads(self.path.read_text())
            return LineStatus(
                busy=bool(raw["busy"]),
                since=float(raw["since"]),
                by=str(raw["by"]),
                reason=str(raw.get("reason", "")),  # absent in files written before reasons
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Unknown is treated as busy: a switch that waits costs less than one that stops production.
            log.error("cannot read %s (%s); treating the line as busy until the plant sets it", self.path, e)
            return LineStatus(busy=True, since=time.time(), by=f"unreadable {self.path.name}")

    def get(self) -> LineStatus:
        with self._lock:
            return self._status

    @property
    def busy(self) -> bool:
        return self.get().busy

    def set(self, busy: bool, by: str, reason: str = "") -> LineStatus:
        """Mark the line busy or idle; `since` moves only when the state changes."""
        if not by or len(by) > MAX_SETTER_CHARS:
            raise ConfigError(f"name who sets the line state in 1 to {MAX_SETTER_CHARS} characters")
        reason = reason[:MAX_REASON_CHARS]
        with self._lock:
            if busy == self._status.busy:
                status = LineStatus(busy, self._status.since, by, reason)
            else:
                status = LineStatus(busy, time.time(), by, reason)
            # Memory first: when the disk refuses the write (full, read-only), the updater still sees
            # what the plant said now; the error goes to the caller and a restart reads the older file.
            self._status = status
            if self.path is not None:
                write_json_atomic(self.path, status.to_json())
        log.info("line marked %s by %s%s", "busy" if busy else "idle", by, f" ({reason})" if reason else "")
        return status
