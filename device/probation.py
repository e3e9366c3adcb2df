"""One probation window: the new model serves live traffic while the agent watches it.

It ends early when someone asks for a rollback (fleet, local API); at its end the new model is
judged on its live error rate, its live p95 latency against the manifest's budget, and, when a
shadow gate ran the previous model beside it, on agreement and latency growth. The verdict is a
reason to roll back, or None to commit, with the figures to report either way.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from device.engine.engine import Engine
from device.shadow import ShadowGate

log = logging.getLogger(__name__)
MIN_LATENCY_SAMPLES = 20  # fewer live inferences say nothing about a p95
PROGRESS_EVERY_S = 10.0

Progress = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Verdict:
    reason: str | None  # why to roll back; None to commit
    detail: dict[str, Any] = field(default_factory=dict)


class Probation:
    def __init__(
        self,
        engine: Engine,
        model_name: str,
        seconds: float,
        max_error_rate: float,
        gate: ShadowGate | None = None,
        on_progress: Progress | None = None,
        progress_every_s: float = PROGRESS_EVERY_S,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.seconds = seconds
        self.max_error_rate = max_error_rate
        self.gate = gate
        self.on_progress = on_progress
        self.progress_every_s = progress_every_s
        self.requested: str | None = None
        self.decided = False
        self.finished = asyncio.Event()  # set by the updater once the verdict has been acted on
        self._wake = asyncio.Event()

    def request_rollback(self, reason: str) -> bool:
        """Ask this probation to end in a rollback; False when it has already decided."""
        if self.decided:
            return False
        self.requested = reason
        self._wake.set()
        return True

    async def run(self) -> Verdict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        last_shown: dict[str, Any] | None = None
        while self.requested is None and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):  # woken early only by a rollback request
                await asyncio.wait_for(self._wake.wait(), timeout=min(left, self.progress_every_s))
            shadow = self.gate.report() if self.gate else None
            if shadow and shadow != last_shown and self.on_progress and self.requested is None:
                await self.on_progress({"shadow": shadow})
                last_shown = shadow
        self.decided = True
        return self._verdict()

    def _verdict(self) -> Verdict:
        serving = self.engine.get(self.model_name)
        stats = serving.stats
        detail: dict[str, Any] = {"inferences": stats.inferences, "errors": stats.errors}
        shadow = self.gate.report() if self.gate else None
        if shadow is not None:
            detail["shadow"] = shadow
        if self.requested is not None:
            return Verdict(self.requested, detail)
        # The model's own limits (manifest `probation`) where it names them, else the device's
        # error-rate limit and the manifest's latency budget.
        limits = serving.manifest.probation
        max_error_rate = self.max_error_rate
        if limits is not None and limits.max_error_rate is not None:
            max_error_rate = limits.max_error_rate
        budget: float = serving.manifest.latency_budget_ms
        budget_name = "budget"
        if limits is not None and limits.max_latency_p95_ms is not None:
            budget, budget_name = limits.max_latency_p95_ms, "manifest's probation limit"
        attempts = stats.inferences + stats.errors
        error_rate = stats.errors / attempts if attempts else 0.0
        if error_rate > max_error_rate:
            return Verdict(
                f"error rate {error_rate:.0%} during probation, above the {max_error_rate:.0%} allowed",
                detail,
            )
        p95 = stats.quantile(0.95)
        if p95 is not None and stats.latency_samples >= MIN_LATENCY_SAMPLES and p95 > budget:
            return Verdict(
                f"live p95 latency {p95:.1f} ms during probation exceeds the {budget_name} {budget} ms",
                detail,
            )
        if self.gate is not None:
            reason = self.gate.verdict()
            if reason is not None:
                return Verdict(reason, detail)
        return Verdict(None, detail)
