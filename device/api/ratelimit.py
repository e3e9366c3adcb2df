"""Failed-login limiting for the local API: a client that keeps guessing tokens is slowed to a stop.

Per client address, failures inside a sliding window are counted; past the limit every request from
that address gets 429 until the window has passed, whatever token it carries. In memory: a restart
clears it, which costs an attacker a reboot of the device per few guesses.
"""

import threading
import time
from collections import defaultdict, deque


class FailedLoginLimiter:
    def __init__(self, max_failures: int = 10, window_s: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures[client]
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        return failures

    def blocked_for(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        # Asked on every request: a client with no failure on record (one dict lookup, safe without
        # the lock) is answered at once, and leaves no entry behind.
        if client not in self._failures:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._recent(client, now)
            if len(failures) < self.max_failures:
                return 0.0
            return max(0.0, self.window_s - (now - failures[0]))

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._recent(client, now)
            failures.append(now)
            if len(self._failures) > 10_000:  # bound memory against address spraying
                self._failures = defaultdict(deque, list(self._failures.items())[-5_000:])
