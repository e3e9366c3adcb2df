"""The shadow gate: during probation, the previous model runs beside the new one on live inputs.

For a sampled share of the pipeline's inputs, right after the new model's result has been acted on,
the previous model runs on the same tensors in the pipeline's own thread (so both latencies are
measured under the same conditions, and the result is never delayed). A CPU budget (shadow seconds
per second) bounds what this costs the line. The gate reports top-1 agreement and both p95
latencies in the shape the fleet's rollout planner reads, and says when the new model breaks the
limits, so probation can roll it back by itself.
"""

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from device.engine.backends.base import Tensors
from device.engine.engine import ServingModel, check_inputs
from device.errors import ConfigError

log = logging.getLogger(__name__)
LATENCY_WINDOW = 4096


@dataclass(frozen=True)
class ShadowConfig:
    sample_rate: float = 0.25  # share of live inputs also run on the previous model
    cpu_budget: float = 0.1  # shadow seconds allowed per second of wall time (0.1: a tenth of a core)
    min_samples: int = 50  # below this the gate reports but decides nothing (a p95 of fewer is noise)
    min_agreement: float = 0.97  # top-1 labels of new and old must agree at least this often
    max_p95_increase: float = 0.2  # new p95 may exceed old p95 by at most this share

    def __post_init__(self) -> None:
        if not 0 <= self.sample_rate <= 1:
            raise ConfigError(f"shadow sample_rate {self.sample_rate} must be within 0..1")
        if not 0 < self.cpu_budget <= 1:
            raise ConfigError(f"shadow cpu_budget {self.cpu_budget} must be within (0, 1] s per s")
        if self.min_samples < 1:
            raise ConfigError("shadow min_samples must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"shadow min_agreement {self.min_agreement} must be within 0..1")
        if self.max_p95_increase < 0:
            raise ConfigError("shadow max_p95_increase must be >= 0 (0.2 allows +20%)")


def _p95(values: deque[float]) -> float:
    return float(np.quantile(np.fromiter(values, float), 0.95))


def _top1(outputs: Tensors, name: str) -> np.ndarray:
    scores = outputs[name]
    rows = scores.shape[0] if scores.ndim > 1 else 1
    top: np.ndarray = np.argmax(scores.reshape(rows, -1), axis=1)
    return top


class ShadowGate:
    """One probation's comparison of `new` (serving) against `old` (the previous version)."""

    def __init__(
        self,
        new: ServingModel,
        old: ServingModel,
        config: ShadowConfig,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.new = new
        self.old = old
        self.config = config
        self.samples = 0
        self.agreed = 0
        self.skipped_for_budget = 0
        self.errors = 0
        self.spent_s = 0.0  # shadow time so far, and the longest single run, for the budget's record
        self.longest_s = 0.0
        self._rng = rng or random.Random()
        self._clock = clock
        self._ms_old: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._ms_new: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._budget_s = config.cpu_budget  # a token bucket of shadow seconds, one second's worth at most
        self._refilled = clock()
        self._lock = threading.Lock()  # held through a shadow run, so close() waits for it
        self._closed = False

    def observe(self, version: int, inputs: Tensors, outputs: Tensors, latency_ms: float) -> None:
        """Called by the pipeline after each result of the serving model; may run the old model once."""
        if version != self.new.manifest.version or self._rng.random() >= self.config.sample_rate:
            return
        with self._lock:
            if self._closed or not self._take_budget():
                return
            start = time.perf_counter()
            try:
                old_outputs = self.old.model.run(
                    check_inputs(self.old.manifest.inputs, self._renamed(inputs))
                )
            except Exception as e:  # the shadow never costs the line anything but time
                self.errors += 1
                log.warning(
                    "shadow run of %s v%d failed: %s", self.old.manifest.name, self.old.manifest.version, e
                )
                return
            elapsed = time.perf_counter() - start
            self._budget_s -= elapsed
            self.spent_s += elapsed
            self.longest_s = max(self.longest_s, elapsed)
            new_top = _top1(outputs, self.new.manifest.outputs[0].name)
            old_top = _top1(old_outputs, self.old.manifest.outputs[0].name)
            if new_top.shape != old_top.shape:
                self.errors += 1
                return
            self.samples += len(new_top)
            self.agreed += int(np.sum(new_top == old_top))
            self._ms_old.append(elapsed * 1000)
            self._ms_new.append(latency_ms)

    def _take_budget(self) -> bool:
        now = self._clock()
        cap = self.config.cpu_budget  # one second's worth
        self._budget_s = min(cap, self._budget_s + (now - self._refilled) * self.config.cpu_budget)
        self._refilled = now
        if self._budget_s <= 0:  # one run may overdraw; the debt is paid back before the next
            self.skipped_for_budget += 1
            return False
        return True

    def _renamed(self, inputs: Tensors) -> Tensors:
        """A single input renamed between versions still feeds the old model."""
        names = [spec.name for spec in self.old.manifest.inputs]
        if len(names) == 1 and len(inputs) == 1 and names[0] not in inputs:
            return {names[0]: next(iter(inputs.values()))}
        return inputs

    def report(self) -> dict[str, Any] | None:
        """`{"agreement", "p95_ms_old", "p95_ms_new", "samples"}` (the fleet reads it); None before any."""
        with self._lock:
            if not self.samples or not self._ms_old:
                return None
            return {
                "agreement": round(self.agreed / self.samples, 4),
                "p95_ms_old": round(_p95(self._ms_old), 3),
                "p95_ms_new": round(_p95(self._ms_new), 3),
                "samples": self.samples,
            }

    def verdict(self) -> str | None:
        """Why the new model must be rolled back, or None (also while samples are too few to tell)."""
        report = self.report()
        if report is None or report["samples"] < self.config.min_samples:
            return None
        if report["agreement"] < self.config.min_agreement:
            return (
                f"shadow: top-1 agreement with v{self.old.manifest.version} {report['agreement']:.1%} "
                f"over {report['samples']} samples, below the {self.config.min_agreement:.1%} required"
            )
        limit = report["p95_ms_old"] * (1 + self.config.max_p95_increase)
        if report["p95_ms_old"] > 0 and report["p95_ms_new"] > limit:
            return (
                f"shadow: p95 latency {report['p95_ms_old']:.2f} -> {report['p95_ms_new']:.2f} ms, "
                f"more than the +{self.config.max_p95_increase:.0%} allowed"
            )
        return None

    def close(self) -> None:
        """Stop sampling; returns once a shadow run in flight has finished, so `old` may be closed."""
        with self._lock:
            self._closed = True


class ShadowHub:
    """Where the pipeline hands each result, and where probation attaches a gate per model."""

    def __init__(self) -> None:
        self._gates: dict[str, ShadowGate] = {}

    def attach(self, model_name: str, gate: ShadowGate) -> None:
        self._gates[model_name] = gate

    def detach(self, model_name: str) -> ShadowGate | None:
        """Remove and close the model's gate (waits for a shadow run in flight); returns it."""
        gate = self._gates.pop(model_name, None)
        if gate is not None:
            gate.close()
        return gate

    def gate(self, model_name: str) -> ShadowGate | None:
        return self._gates.get(model_name)

    def observe(
        self, model_name: str, version: int, inputs: Tensors, outputs: Tensors, latency_ms: float
    ) -> None:
        gate = self._gates.get(model_name)  # a dict read: safe from the pipeline thread
        if gate is not None:
            gate.observe(version, inputs, outputs, latency_ms)
