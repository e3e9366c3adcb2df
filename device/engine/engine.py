"""The engine: loads models on the best backend, proves them with their golden vectors, runs them.

A model becomes visible to callers only after warm-up and a golden-vector pass, and a newer
model replaces an older one in a single assignment, so callers never see a half-loaded model.
"""

import asyncio
import bisect
import functools
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.engine.backends.base import Backend, LoadedModel, Tensors
from device.engine.batcher import BatchConfig, MicroBatcher, Unavailable
from device.engine.precision import PRECISION_SETTINGS, PrecisionDecision, choose_precision, fp32_only
from device.engine.probe import HardwareProfile
from device.engine.registry import select_and_load
from device.errors import EngineError, GoldenTestFailed, InferenceInputError
from models.manifest import Manifest, TensorSpec

WARMUP_RUNS = 3
LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
GOLDEN_TIMING_RUNS = 10
_NUMPY_DTYPES = {name: np.dtype(name) for name in ("float32", "float16", "int8", "uint8", "int32", "int64")}


# Latency samples kept for quantiles (the histogram counts every call)
LATENCY_WINDOW = 4096
# Calls recorded before the call that finds this many waiting folds them in itself
FOLD_EVERY = 1024


@dataclass(frozen=True)
class StatsSnapshot:
    """One consistent reading of a model's counters (for /metrics)."""

    inferences: int
    errors: int
    bucket_counts: list[int]  # per upper bound of LATENCY_BUCKETS_MS, then +Inf; not cumulative
    latency_sum_ms: float


class ModelStats:
    """A model's counters, latency histogram (Prometheus style) and recent latencies.

    `record` is on every engine call's path, right after the runtime's call, when the interpreter's
    data is out of the CPU caches: a lock and a histogram update there cost ~6 µs of a 0.34 ms call
    (bench/engine/RESULTS.md). So a call only appends (items, ms) to a deque, which is atomic in
    CPython and needs no lock, and whoever reads the counters folds what waits into them first
    (as does a call that finds FOLD_EVERY waiting, so an unread model's queue stays short).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[tuple[int, float]] = deque()
        self._inferences = 0
        self._errors = 0
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._latency_sum_ms = 0.0

    def record(self, items: int, elapsed_ms: float) -> None:
        """A call that inferred `items` items in `elapsed_ms` (any thread, no lock)."""
        pending = self._pending
        pending.append((items, elapsed_ms))
        if len(pending) >= FOLD_EVERY:
            self._fold()

    def failed(self, items: int) -> None:
        """A call whose `items` items failed (rare: the lock is fine here)."""
        with self._lock:
            self._errors += items

    def _fold(self) -> None:
        with self._lock:
            pending = self._pending
            while pending:  # only this (locked) reader pops; callers only append
                items, elapsed_ms = pending.popleft()
                self._inferences += items
                self._latencies_ms.append(elapsed_ms)
                self._latency_sum_ms += elapsed_ms
                self._bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)] += 1

    @property
    def inferences(self) -> int:
        self._fold()
        return self._inferences

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def latency_samples(self) -> int:
        """How many recent latencies `quantile` draws on (at most LATENCY_WINDOW)."""
        self._fold()
        return len(self._latencies_ms)

    def quantile(self, q: float) -> float | None:
        self._fold()
        with self._lock:
            if not self._latencies_ms:
                return None
            samples = np.fromiter(self._latencies_ms, float)
        return float(np.quantile(samples, q))

    def snapshot(self) -> StatsSnapshot:
        self._fold()
        with self._lock:
            return StatsSnapshot(
                self._inferences, self._errors, list(self._bucket_counts), self._latency_sum_ms
            )


@dataclass
class ServingModel:
    manifest: Manifest
    folder: Path
    backend: str
    passed_over: dict[str, str]
    model: LoadedModel
    golden_p95_ms: float | None
    stats: ModelStats = field(default_factory=ModelStats)
    precision: PrecisionDecision | None = None  # None: built by hand, fp32 from model_file

    @property
    def served_precision(self) -> str:
        return self.precision.precision if self.precision else "fp32"

    @functools.cached_property  # the manifest of a loaded model never changes
    def input_check(self) -> "InputCheck":
        return InputCheck(self.manifest.inputs)

    @functools.cached_property  # asked on every request; the manifest of a loaded model never changes
    def batchable(self) -> bool:
        """Whether requests can be stacked: dim 0 of every input and output is dynamic."""
        specs = [*self.manifest.inputs, *self.manifest.outputs]
        return all(s.shape and s.shape[0] == -1 for s in specs)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "backend": self.backend,
            "passed_over": self.passed_over,
            "precision": self.served_precision,
            "precision_decision": (self.precision or fp32_only(self.manifest, "not checked")).to_dict(),
            "golden_p95_ms": self.golden_p95_ms,
            "latency_budget_ms": self.manifest.latency_budget_ms,
            "inferences": self.stats.inferences,
            "errors": self.stats.errors,
            "latency_ms_p50": self.stats.quantile(0.5),
            "latency_ms_p95": self.stats.quantile(0.95),
        }


def _items(inputs: Tensors) -> int:
    """Items in a call: dim 0 of its first input (1 for a scalar)."""
    first = next(iter(inputs.values()))
    return first.shape[0] if first.ndim else 1


def check_inputs(specs: list[TensorSpec], inputs: Tensors) -> Tensors:
    """Match the caller's tensors to the manifest by name, dtype and shape; raise a 4xx-style error."""
    if len(inputs) != len(specs) or any(spec.name not in inputs for spec in specs):
        expected = sorted(s.name for s in specs)
        raise InferenceInputError(f"inputs must be exactly {expected}, got {sorted(inputs)}")
    checked: Tensors = {}
    for spec in specs:
        array = inputs[spec.name]
        if array.dtype != (_NUMPY_DTYPES.get(spec.dtype) or np.dtype(spec.dtype)):
            raise InferenceInputError(f"input {spec.name!r} must be {spec.dtype}, got {array.dtype}")
        shape = array.shape
        shape_ok = len(shape) == len(spec.shape)
        if shape_ok:
            for want, got in zip(spec.shape, shape, strict=True):
                if want != -1 and want != got:
                    shape_ok = False
                    break
        if not shape_ok:
            raise InferenceInputError(
                f"input {spec.name!r} must have shape {spec.shape}, got {list(array.shape)}"
            )
        checked[spec.name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    return checked


class InputCheck:
    """`check_inputs` for one model's specs, decided once: the same verdicts in fewer steps per call.

    It runs on every request's path, straight after the runtime's own call, when the interpreter's
    data is out of the CPU caches: each step there costs 2-3x what it costs in a loop
    (bench/engine/RESULTS.md, engine overhead). Inputs it does not pass go to `check_inputs`, which
    names what is wrong.
    """

    def __init__(self, specs: list[TensorSpec]) -> None:
        self._specs = specs
        # name, dtype, rank, where the fixed dims start (1 after a dynamic batch dim, else 0) and
        # those dims; None where a later dim is dynamic too (then `check_inputs` decides)
        plan = []
        for spec in specs:
            start = 1 if spec.shape and spec.shape[0] == -1 else 0
            dims = tuple(spec.shape[start:])
            dtype = _NUMPY_DTYPES.get(spec.dtype) or np.dtype(spec.dtype)
            plan.append((spec.name, dtype, len(spec.shape), start, None if -1 in dims else dims))
        self._plan = tuple(plan)

    def __call__(self, inputs: Tensors) -> Tensors:
        if len(inputs) != len(self._plan):
            return check_inputs(self._specs, inputs)
        checked: Tensors = {}
        for name, dtype, rank, start, dims in self._plan:
            array = inputs.get(name)
            if array is None or dims is None or array.dtype != dtype:
                return check_inputs(self._specs, inputs)
            shape = array.shape
            if len(shape) != rank or shape[start:] != dims:
                return check_inputs(self._specs, inputs)
            checked[name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
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
    """Several models at once, each on the backend chosen for it on this machine.

    `precision` "auto" serves a package's lower-precision variant where it passes its check against
    fp32 on this machine (device/engine/precision.py); "fp32" always serves the model file.
    """

    def __init__(
        self,
        profile: HardwareProfile,
        backends: list[Backend] | None = None,
        pinned: str | None = None,
        precision: str = "auto",
    ) -> None:
        if precision not in PRECISION_SETTINGS:
            raise EngineError(
                f"precision setting {precision!r} is not one of {', '.join(PRECISION_SETTINGS)}"
            )
        self.profile = profile
        self._backends = backends
        self._pinned = pinned
        self.precision = precision
        self._models: dict[str, ServingModel] = {}
        self._batch_configs: dict[str, BatchConfig] = {}
        self._batchers: dict[str, MicroBatcher[ServingModel]] = {}
        self._batchers_lock = threading.Lock()
        self._closed = False

    def prepare(self, folder: Path, manifest: Manifest) -> ServingModel:
        """Load and prove a model without serving it yet (used for new versions before the switch)."""
        selection = select_and_load(
            folder / manifest.model_file, manifest, self.profile, self._backends, self._pinned
        )
        try:
            p95 = prove(selection.model, folder, manifest)
            golden = (
                check_inputs(manifest.inputs, load_golden(folder, manifest)[0]) if manifest.golden else None
            )
            model, decision = choose_precision(
                selection.model,
                selection.loader,
                selection.backend,
                folder,
                manifest,
                self.profile,
                golden,
                self.precision,
            )
        except Exception:
            selection.model.close()
            raise
        if model is not selection.model:
            selection.model.close()
            p95 = decision.golden_p95_ms
        return ServingModel(
            manifest, folder, selection.backend, selection.passed_over, model, p95, precision=decision
        )

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

    def find(self, name: str) -> ServingModel | None:
        """The model served under `name`, or None (one dict read: the API asks on every request)."""
        return self._models.get(name)

    def names(self) -> list[str]:
        return sorted(self._models)

    def run(self, name: str, inputs: Tensors) -> Tensors:
        """Run now, in the caller's thread (the pipeline's way); no queue, no batching."""
        serving = self._models.get(name) or self.get(name)
        return self._run_checked(serving, serving.input_check(inputs))

    def submit(self, serving: ServingModel, inputs: Tensors) -> Future[Tensors]:
        """Check `inputs` now, then queue them on the model's batcher (the API's way).

        Raises InferenceInputError for bad inputs and batcher.Overloaded when the queue is full; the
        future holds exactly the caller's rows, or the model's error.
        """
        checked = serving.input_check(inputs)
        return self._batcher(serving.manifest.name).submit(serving, checked, serving.batchable)

    def submit_async(self, serving: ServingModel, inputs: Tensors) -> "asyncio.Future[Tensors]":
        """`submit` for a coroutine on the running loop (the API's way): the future is the loop's own,
        set on the loop's thread, so awaiting it costs no thread-safe future chain."""
        checked = serving.input_check(inputs)
        return self._batcher(serving.manifest.name).submit_async(serving, checked, serving.batchable)

    def configure_batching(self, name: str, config: BatchConfig) -> None:
        """How API requests to `name` are queued and grouped from now on (default: `_config_for`)."""
        with self._batchers_lock:
            self._batch_configs[name] = config
            old = self._batchers.pop(name, None)
        if old is not None:
            old.close()  # finishes what it holds; new requests already go to the new batcher

    def batcher_stats(self, name: str) -> dict[str, Any]:
        with self._batchers_lock:
            batcher = self._batchers.get(name)
            config = batcher.config if batcher else self._config_for(name)  # what runs, or will
        stats = batcher.stats if batcher else None
        return {
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "max_queue": config.max_queue,
            "workers": config.workers,
            "queued": batcher.queued() if batcher else 0,
            "batches": stats.batches if stats else 0,
            "mean_batch_rows": stats.mean_batch_rows() if stats else None,
            "refused": stats.refused if stats else 0,
        }

    def _batcher(self, name: str) -> MicroBatcher[ServingModel]:
        batcher = self._batchers.get(name)  # a dict read is atomic; the lock is for creating one
        if batcher is None:
            with self._batchers_lock:
                if self._closed:
                    raise Unavailable("the engine is shutting down; retry once the device is back")
                batcher = self._batchers.get(name)
                if batcher is None:
                    config = self._config_for(name)
                    batcher = self._batchers[name] = MicroBatcher(name, config, self._run_checked)
        return batcher

    def _config_for(self, name: str) -> BatchConfig:
        """The configured batching of `name`, else no grouping with as many calls in flight as its
        runtime makes good use of (2 on ONNX Runtime's CPU provider, else 1)."""
        configured = self._batch_configs.get(name)
        if configured is not None:
            return configured
        serving = self._models.get(name)
        return BatchConfig(workers=serving.model.calls_in_flight if serving else 1)

    def _run_checked(self, serving: ServingModel, checked: Tensors) -> Tensors:
        # Batches from the batcher thread and single calls from the pipeline share the stats.
        start = time.perf_counter()
        try:
            outputs = serving.model.run(checked)
        except Exception as e:
            serving.stats.failed(_items(checked))  # per item, like inferences
            raise EngineError(f"{serving.manifest.name} failed on {serving.backend}: {e}") from e
        serving.stats.record(_items(checked), (time.perf_counter() - start) * 1000)
        return outputs

    def close(self) -> None:
        with self._batchers_lock:
            self._closed = True
            batchers = list(self._batchers.values())
            self._batchers.clear()
        for batcher in batchers:  # before the models close: they finish what they hold
            batcher.close()
        for serving in self._models.values():
            serving.model.close()
        self._models.clear()
