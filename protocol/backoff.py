"""How every peer reconnects to the broker: exponential backoff with full jitter.

Part of the contract because it protects the shared broker: a thousand devices coming back after
an outage must not arrive in one wave.
"""

import random

MAX_EXPONENT = 16  # beyond this the cap rules anyway; keeps 2**attempt from overflowing a float


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0-based): uniform in [0, min(cap, base*2^n)]."""
    return random.uniform(0, min(cap, base * 2 ** min(max(attempt, 0), MAX_EXPONENT)))
