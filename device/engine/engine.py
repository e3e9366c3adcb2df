"""The engine: loads models on the best backend, proves them with their golden vectors, runs them.

A model becomes visible to callers only after warm-up and a golden-vector pass, and a newer
model replaces an older one in a single assignment, so callers never see a half-loaded model.
"""

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.engine.backends.base import Backend, LoadedModel, Tensors
from device.engine.probe import HardwareProfile
from device.engine.registry import select_and_load
from device.errors import EngineError, GoldenTestFailed, InferenceInputError
from models.manifest import Manifest, TensorSpec

WARMUP_RUNS = 3
LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
GOLDEN_TIMING_RUNS = 10


@dataclass
class ModelStats:
    inferences: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    # Cumulative histogram of call latency (Prometheus style): counts per upper bound, and the sum.
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum_ms: float = 0.0

    def observe(self, items: int, elapsed_ms: float) -> None:
        self.inferences += items
        self.latencies_ms.append(elapsed_ms)
        self.latency_sum_ms += elapsed_ms
        self.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)] += 1

    def quantile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        return float(np.quantile(np.fromiter(self.latencies_ms, float), q))


@dataclass
class ServingModel:
    manifest: Manifest
    folder: Path
    backend: str
    passed_over: dict[str, str]
    model: LoadedModel
    golden_p95_ms: float | None
    stats: ModelStats = field(default_factory=ModelStats)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "backend": self.backend,
            "passed_over": self.passed_over,
            "golden_p95_ms": self.golden_p95_ms,
            "latency_budget_ms": self.manifest.latency_budget_ms,
            "inferences": self.stats.inferences,
            "errors": self.stats.errors,
            "latency_ms_p50": self.stats.quantile(0.5),
            "latency_ms_p95": self.stats.quantile(0.95),
        }


def check_inputs(specs: list[TensorSpec], inputs: Tensors) -> Tensors:
    """Match the caller's tensors to the manifest by name, dtype and shape; raise a 4xx-style error."""
    expected = {s.name for s in specs}
    if set(inputs) != expected:
        raise InferenceInputError(f"inputs must be exactly {sorted(expected)}, got {sorted(inputs)}")
    checked: Tensors = {}
    for spec in specs:
        array = inputs[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise InferenceInputError(f"input {spec.name!r} must be {spec.dtype}, got {array.dtype}")
        shape_ok = len(array.shape) == len(spec.shape) and all(
            want in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        )
        if not shape_ok:
            raise InferenceInputError(
                f"input {spec.name!r} must have shape {spec.shape}, got {list(array.shape)}"
            )
        checked[spec.name] = np.ascontiguousarray(array)
    return checked


def load_golden(folder: Path, manifest: Manifest) -> tuple[Tensors, Tensors]:
    assert manifest.golden is not None
    with np.load(folder / manifest.golden.file, allow_pickle=False) as data:
        inputs = {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
        outputs = {k.removeprefix("output."): data[k] for k in data.files if k.startswith("output.")}
    return inputs, outputs


def prove(model: LoadedModel, folder: Path, manifest: Manifest) -> float | None:
    """Warm the model up, then check its golden vectors and latency budget. Returns the golden p95 in ms."""
    if manifest.golden is None:
        return None
    inputs, expected = load_golden(folder, manifest)
    inputs = check_inputs(manifest.inputs, inputs)
    for _ in range(WARMUP_RUNS):
        outputs = model.run(inputs)
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            raise GoldenTestFailed(f"golden output {name!r} missing or of the wrong shape")
        if not np.allclose(got, want, atol=manifest.golden.atol, rtol=manifest.golden.rtol):
            worst = float(np.max(np.abs(got.astype(np.float64) - want)))
            raise GoldenTestFailed(
                f"golden output {name!r} differs by up to {worst:.3g} (atol {manifest.golden.atol})"
            )
    timings = []
    for _ in range(GOLDEN_TIMING_RUNS):
        start = time.perf_counter()
        model.run(inputs)
        timings.append((time.perf_counter() - start) * 1000)
    p95 = float(np.quantile(timings, 0.95))
    if p95 > manifest.latency_budget_ms:
        raise GoldenTestFailed(
            f"golden p95 latency {p95:.1f} ms exceeds the budget {manifest.latency_budget_ms} ms"
        )
    return p95


class Engine:
    """Several models at once, each on the backend chosen for it on this machine."""

    def __init__(
        self, profile: HardwareProfile, backends: list[Backend] | None = None, pinned: str | None = None
    ) -> None:
        self.profile = profile
        self._backends = backends
        self._pinned = pinned
        self._models: dict[str, ServingModel] = {}

    def prepare(self, folder: Path, manifest: Manifest) -> ServingModel:
        """Load and prove a model without serving it yet (used for new versions before the switch)."""
        selection = select_and_load(
            folder / manifest.model_file, manifest, self.profile, self._backends, self._pinned
        )
        try:
            p95 = prove(selection.model, folder, manifest)
        except Exception:
            selection.model.close()
            raise
        return ServingModel(manifest, folder, selection.backend, selection.passed_over, selection.model, p95)

    def serve(self, serving: ServingModel) -> ServingModel | None:
        """Make `serving` the model callers get under its name; returns the one it replaced."""
        previous = self._models.get(serving.manifest.name)
        self._models[serving.manifest.name] = serving
        return previous

    def get(self, name: str) -> ServingModel:
        try:
            return self._models[name]
        except KeyError:
            raise EngineError(f"no model named {name!r} is loaded; loaded: {sorted(self._models)}") from None

    def names(self) -> list[str]:
        return sorted(self._models)

    def run(self, name: str, inputs: Tensors) -> Tensors:
        serving = self.get(name)
        checked = check_inputs(serving.manifest.inputs, inputs)
        start = time.perf_counter()
        try:
            outputs = serving.model.run(checked)
        except Exception as e:
            with serving.lock:
                serving.stats.errors += len(next(iter(checked.values())))  # per item, like inferences
            raise EngineError(f"{name} failed on {serving.backend}: {e}") from e
        elapsed_ms = (time.perf_counter() - start) * 1000
        with serving.lock:
            serving.stats.observe(len(next(iter(checked.values()))), elapsed_ms)
        return outputs

    def close(self) -> None:
        for serving in self._models.values():
            serving.model.close()
        self._models.clear()
