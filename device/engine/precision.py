"""Lower precisions, checked on the device itself before they are served.

A package may offer fp16 or int8 variants of its model (manifest `variants`). Whether one is faster,
and whether it still gives fp32's answers, depends on the machine: on this AVX2 CPU static int8 made
the sample CNN 1.3-1.4x faster and dynamic int8 made it slower (0.54-0.84x), and per-channel int8
without reduce_range lost 8 points of accuracy there (no VNNI). So the engine runs fp32 and the
variant side by side on the package's golden and calibration inputs, times both, and serves the
variant only when its top-1 agreement (and output difference, if the manifest limits it) is within
the manifest's policy AND it is faster here by the policy's margin; otherwise fp32. The figures and
the reason reach the status API (`ServingModel.describe()["precision_decision"]`).
"""

import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.engine.backends.base import Backend, LoadedModel, Tensors
from device.engine.probe import HardwareProfile
from device.engine.registry import CPU_BACKENDS, NVIDIA_BACKENDS
from models.manifest import Manifest, PrecisionPolicy, Variant

# "auto" follows the manifest's policy; "fp32" serves the model file and checks nothing.
PRECISION_SETTINGS = ("auto", "fp32")
_RANK = {"int8": 0, "fp16": 1, "fp32": 2}
WARMUP_RUNS = 2
# Timing runs in rounds; each round times a short block of each model, in alternating order, so a
# burst of load from another process hits both sides of a round alike. The first call of a block
# (which wakes the runtime's idle workers) is not counted. At least TIMING_ROUNDS, more while the
# batch size's time budget lasts. With ONNX Runtime's spinning workers and more than one thread on a
# busy 2-core box a session runs at one of two speeds for seconds at a time, which no timing order
# undoes (bench/engine/RESULTS_precision.md); a wrong call there keeps fp32, the safe side.
TIMING_ROUNDS = 7
TIMING_MAX_ROUNDS = 61
TIMING_BUDGET_S = 0.25
TIMING_BLOCK = 3
TIMING_BATCH = 8
COMPARE_CHUNK = 32
# The calibration file is hash-checked, but np.load inflates it; bound what it may inflate to.
MAX_CALIBRATION_DECODED_BYTES = 256 * 1024 * 1024
_NUMPY_DTYPES = {name: np.dtype(name) for name in ("float32", "float16", "int8", "uint8", "int32", "int64")}


class CalibrationUnusable(Exception):
    """The calibration set does not fit the model's inputs; lower precisions are then not tried."""


@dataclass
class VariantCheck:
    """What one variant did against fp32 on this machine."""

    file: str
    precision: str
    target: str | None
    used: bool = False
    reason: str = ""
    agreement: float | None = None
    compared_rows: int = 0
    max_abs_diff: float | None = None
    fp32_ms: dict[int, float] = field(default_factory=dict)  # batch rows -> median ms
    variant_ms: dict[int, float] = field(default_factory=dict)
    speedups: dict[int, float] = field(default_factory=dict)  # batch rows -> fp32 ms / variant ms
    speedup: float | None = None  # their geometric mean: what the policy's min_speedup is held to
    variant_p95_ms: float | None = None  # over the rounds, at the largest batch timed (golden)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "precision": self.precision,
            "target": self.target,
            "used": self.used,
            "reason": self.reason,
            "agreement": self.agreement,
            "compared_rows": self.compared_rows,
            "max_abs_diff": self.max_abs_diff,
            "fp32_ms": {str(k): round(v, 4) for k, v in self.fp32_ms.items()},
            "variant_ms": {str(k): round(v, 4) for k, v in self.variant_ms.items()},
            "speedups": {str(k): round(v, 3) for k, v in self.speedups.items()},
            "speedup": None if self.speedup is None else round(self.speedup, 3),
            "variant_p95_ms": None if self.variant_p95_ms is None else round(self.variant_p95_ms, 4),
        }


@dataclass
class PrecisionDecision:
    """The precision a model is served at on this machine, and why."""

    precision: str
    file: str
    reason: str
    setting: str = "auto"
    prefer: str = "fp32"
    checks: list[VariantCheck] = field(default_factory=list)
    golden_p95_ms: float | None = None  # of the variant served, timed on the golden batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "served": self.precision,
            "file": self.file,
            "reason": self.reason,
            "setting": self.setting,
            "prefer": self.prefer,
            "checks": [c.to_dict() for c in self.checks],
        }


def fp32_only(manifest: Manifest, reason: str, setting: str = "auto") -> PrecisionDecision:
    prefer = manifest.precision.prefer if manifest.precision else "fp32"
    return PrecisionDecision("fp32", manifest.model_file, reason, setting, prefer)


def candidates(manifest: Manifest, prefer: str) -> list[Variant]:
    """Variants below fp32 and at or above `prefer`, lowest precision first (the order they are tried)."""
    floor = _RANK[prefer]
    chosen = [v for v in manifest.variants if floor <= _RANK[v.precision] < _RANK["fp32"]]
    return sorted(chosen, key=lambda v: _RANK[v.precision])


def load_calibration(folder: Path, manifest: Manifest) -> Tensors | None:
    """The calibration inputs, checked against the model's inputs; None when the package has none."""
    calibration = manifest.calibration
    if calibration is None:
        return None
    path = folder / calibration.file
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
        if inflated > MAX_CALIBRATION_DECODED_BYTES:
            raise CalibrationUnusable(
                f"{calibration.file} inflates to {inflated} bytes, over {MAX_CALIBRATION_DECODED_BYTES}"
            )
        with np.load(path, allow_pickle=False) as data:
            arrays = {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CalibrationUnusable(f"{calibration.file} is not a readable .npz: {e}") from e
    wanted = sorted(spec.name for spec in manifest.inputs)
    if sorted(arrays) != wanted:
        raise CalibrationUnusable(
            f"{calibration.file} holds inputs {sorted(arrays)}, the model takes {wanted} (as `input.<name>`)"
        )
    for spec in manifest.inputs:
        array = arrays[spec.name]
        if array.dtype != _NUMPY_DTYPES[spec.dtype]:
            raise CalibrationUnusable(
                f"{calibration.file}: input {spec.name!r} is {array.dtype}, not {spec.dtype}"
            )
        if array.ndim != len(spec.shape) or array.shape[0] != calibration.samples:
            raise CalibrationUnusable(
                f"{calibration.file}: input {spec.name!r} has shape {list(array.shape)}; the manifest "
                f"says {calibration.samples} samples of {spec.shape}"
            )
        if any(want not in (-1, got) for want, got in zip(spec.shape[1:], array.shape[1:], strict=True)):
            raise CalibrationUnusable(
                f"{calibration.file}: input {spec.name!r} has shape {list(array.shape)}, "
                f"the model takes {spec.shape}"
            )
        arrays[spec.name] = np.ascontiguousarray(array)
    return arrays


def _rows(tensors: Tensors) -> int:
    return int(next(iter(tensors.values())).shape[0])


def _slice(tensors: Tensors, start: int, stop: int) -> Tensors:
    return {name: np.ascontiguousarray(array[start:stop]) for name, array in tensors.items()}


def _fixed_batch(manifest: Manifest) -> int:
    """-1 when every input's first axis is dynamic, else the first input's fixed batch size."""
    if all(spec.shape and spec.shape[0] == -1 for spec in manifest.inputs):
        return -1
    return manifest.inputs[0].shape[0] if manifest.inputs[0].shape else 1


def _chunks(sets: list[Tensors], manifest: Manifest) -> Iterator[Tensors]:
    """The comparison inputs in batches the model takes: up to COMPARE_CHUNK rows, or its fixed batch."""
    fixed = _fixed_batch(manifest)
    size = COMPARE_CHUNK if fixed == -1 else fixed
    for tensors in sets:
        rows = _rows(tensors)
        # A fixed batch takes only whole batches: the rows past the last one are left out.
        last = rows if fixed == -1 else rows - rows % size
        for start in range(0, last, size):
            yield _slice(tensors, start, min(start + size, last))


@dataclass
class _Agreement:
    matches: int = 0
    rows: int = 0
    max_abs_diff: float = 0.0

    def add(self, reference: Tensors, variant: Tensors) -> None:
        for name, want in reference.items():
            got = variant.get(name)
            if got is None or got.shape != want.shape:
                shape = None if got is None else list(got.shape)
                raise ValueError(f"output {name!r} is {shape}, fp32 gives {list(want.shape)}")
            if np.issubdtype(want.dtype, np.floating) or np.issubdtype(got.dtype, np.floating):
                diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
                # NaN compares false with everything: count it as the worst difference there is.
                worst = float("inf") if np.isnan(diff).any() else float(diff.max(initial=0.0))
                self.max_abs_diff = max(self.max_abs_diff, worst)
            if want.ndim >= 2 and want.shape[-1] > 1:  # a class axis: compare the top-1 of every row
                self.matches += int((want.argmax(-1) == got.argmax(-1)).sum())
                self.rows += int(np.prod(want.shape[:-1]))

    @property
    def agreement(self) -> float | None:
        return self.matches / self.rows if self.rows else None


def _block_ms(model: LoadedModel, inputs: Tensors) -> float:
    """Median ms of one block of calls, the first (which wakes the runtime's workers) left out."""
    times = []
    for _ in range(TIMING_BLOCK):
        start = time.perf_counter()
        model.run(inputs)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times[1:]))


def _time_pair(
    reference: LoadedModel, variant: LoadedModel, inputs: Tensors
) -> tuple[list[float], list[float]]:
    """Per round, the block time of each model: (fp32 ms, variant ms)."""
    for _ in range(WARMUP_RUNS):
        reference.run(inputs)
        variant.run(inputs)
    ref_ms: list[float] = []
    var_ms: list[float] = []
    deadline = time.perf_counter() + TIMING_BUDGET_S
    for i in range(TIMING_MAX_ROUNDS):
        if i >= TIMING_ROUNDS and time.perf_counter() > deadline:
            break
        if i % 2 == 0:
            ref_ms.append(_block_ms(reference, inputs))
            var_ms.append(_block_ms(variant, inputs))
        else:
            var_ms.append(_block_ms(variant, inputs))
            ref_ms.append(_block_ms(reference, inputs))
    return ref_ms, var_ms


def _timing_inputs(sets: list[Tensors], manifest: Manifest) -> dict[int, Tensors]:
    """Batch 1 (the pipeline's one image) and the golden batch (at most TIMING_BATCH rows), by rows."""
    first = sets[0]
    fixed = _fixed_batch(manifest)
    if fixed != -1:
        return {fixed: _slice(first, 0, fixed)} if _rows(first) >= fixed else {}
    sizes = sorted({1, min(_rows(first), TIMING_BATCH)})
    return {rows: _slice(first, 0, rows) for rows in sizes}


def _target_problem(variant: Variant, backend_name: str, profile: HardwareProfile) -> str | None:
    target = variant.target
    if target is None:
        return None
    if target == "cpu":
        return (
            None
            if backend_name in CPU_BACKENDS
            else f"made for CPU backends, the model runs on {backend_name}"
        )
    if target == "cuda":
        return (
            None
            if backend_name in NVIDIA_BACKENDS
            else f"made for NVIDIA backends, the model runs on {backend_name}"
        )
    return None if profile.arch == target else f"made for {target}, this machine is {profile.arch}"


def _backend_problem(
    backend: Backend | None, backend_name: str, variant: Variant, profile: HardwareProfile
) -> str | None:
    check = getattr(backend, "variant_problem", None)
    if check is None:
        return f"{backend_name} serves the model_file only (its own precision setting applies)"
    problem: str | None = check(variant, profile)
    return problem


def check_variant(
    variant: Variant,
    reference: LoadedModel,
    backend: Backend | None,
    backend_name: str,
    folder: Path,
    manifest: Manifest,
    profile: HardwareProfile,
    sets: list[Tensors],
) -> tuple[VariantCheck, LoadedModel | None]:
    """Load `variant` beside the fp32 `reference` and judge it; the loaded model comes back only if used."""
    check = VariantCheck(variant.file, variant.precision, variant.target)
    policy = manifest.precision or PrecisionPolicy()
    model_sha = manifest.files[manifest.model_file].sha256
    problem = _target_problem(variant, backend_name, profile) or _backend_problem(
        backend, backend_name, variant, profile
    )
    if problem is None and variant.source_sha256 not in (None, model_sha):
        problem = (
            f"made from model sha256 {variant.source_sha256[:12]}..., this package's model_file is "
            f"{model_sha[:12]}...; rebuild the variant from it"
        )
    if problem is not None or backend is None:
        check.reason = problem or "no backend object to load it on"
        return check, None
    variant_manifest = manifest.model_copy(update={"model_file": variant.file, "format": variant.format})
    try:
        model = backend.load(folder / variant.file, variant_manifest, profile)
    except Exception as e:  # runtimes raise their own untyped errors for files they refuse
        check.reason = f"load failed: {e}"
        return check, None
    try:
        used = _judge(check, model, reference, manifest, policy, sets)
    except Exception as e:
        check.reason = f"failed to run beside fp32: {e}"
        used = False
    if not used:
        model.close()
        return check, None
    check.used = True
    return check, model


def _judge(
    check: VariantCheck,
    model: LoadedModel,
    reference: LoadedModel,
    manifest: Manifest,
    policy: PrecisionPolicy,
    sets: list[Tensors],
) -> bool:
    """Fill `check` with the comparison and timings; True when the variant may be served."""
    agreement = _Agreement()
    for chunk in _chunks(sets, manifest):
        agreement.add(reference.run(chunk), model.run(chunk))
    check.agreement, check.compared_rows = agreement.agreement, agreement.rows
    check.max_abs_diff = agreement.max_abs_diff
    if check.agreement is None and policy.max_abs_diff is None:
        check.reason = (
            "outputs have no class axis to compare top-1 on; set precision.max_abs_diff to allow it"
        )
        return False
    if check.agreement is not None and check.agreement < policy.min_agreement:
        check.reason = (
            f"top-1 agreement with fp32 is {check.agreement:.1%} on {agreement.rows} rows, "
            f"below the manifest's {policy.min_agreement:.1%}"
        )
        return False
    if policy.max_abs_diff is not None and agreement.max_abs_diff > policy.max_abs_diff:
        check.reason = (
            f"outputs differ from fp32 by up to {agreement.max_abs_diff:.3g}, over the manifest's "
            f"{policy.max_abs_diff:.3g}"
        )
        return False
    timings = {
        rows: _time_pair(reference, model, inputs) for rows, inputs in _timing_inputs(sets, manifest).items()
    }
    if not timings:
        check.reason = "no inputs of the model's fixed batch size to time it on"
        return False
    check.fp32_ms = {rows: float(np.median(ref)) for rows, (ref, _) in timings.items()}
    check.variant_ms = {rows: float(np.median(var)) for rows, (_, var) in timings.items()}
    check.speedups = {rows: check.fp32_ms[rows] / check.variant_ms[rows] for rows in timings}
    # One figure over the batch sizes (a geometric mean: a noisy batch-8 timing moves it less than
    # the minimum would), and no size clearly slower than fp32.
    check.speedup = float(np.exp(np.mean(np.log(list(check.speedups.values())))))
    slowest = min(check.speedups, key=lambda rows: check.speedups[rows])
    per_batch = ", ".join(
        f"batch {rows}: {check.variant_ms[rows]:.3f} ms vs {check.fp32_ms[rows]:.3f} ms" for rows in timings
    )
    if check.speedup < policy.min_speedup:
        check.reason = (
            f"not faster here: {check.speedup:.2f}x fp32's speed ({per_batch}); "
            f"the manifest asks >= {policy.min_speedup:.2f}x"
        )
        return False
    if check.speedups[slowest] < 1 / policy.min_speedup:
        check.reason = (
            f"slower than fp32 at batch {slowest}: {check.speedups[slowest]:.2f}x ({per_batch}), "
            f"though {check.speedup:.2f}x over all"
        )
        return False
    p95 = check.variant_p95_ms = float(np.quantile(timings[max(timings)][1], 0.95))
    if p95 > manifest.latency_budget_ms:
        check.reason = f"golden p95 {p95:.1f} ms is over the budget {manifest.latency_budget_ms} ms"
        return False
    agreed = "n/a" if check.agreement is None else f"{check.agreement:.1%}"
    check.reason = (
        f"agrees with fp32 on {agreed} of {agreement.rows} golden+calibration rows "
        f"(limit {policy.min_agreement:.1%}, max |diff| {agreement.max_abs_diff:.3g}) and is "
        f"{check.speedup:.2f}x as fast here"
    )
    return True


def choose_precision(
    reference: LoadedModel,
    backend: Backend | None,
    backend_name: str,
    folder: Path,
    manifest: Manifest,
    profile: HardwareProfile,
    golden_inputs: Tensors | None,
    setting: str = "auto",
) -> tuple[LoadedModel, PrecisionDecision]:
    """The model to serve (the fp32 `reference` or a checked variant) and the decision with its figures.

    The caller owns `reference` either way; a variant that is not chosen is closed here.
    """
    if setting == "fp32":
        return reference, fp32_only(manifest, "fp32 forced by the device's precision setting", setting)
    prefer = manifest.precision.prefer if manifest.precision else "fp32"
    if prefer == "fp32":
        return reference, fp32_only(manifest, "the manifest's precision policy serves fp32", setting)
    tried = candidates(manifest, prefer)
    if not tried:
        return reference, fp32_only(
            manifest, f"the package offers no variant from {prefer} up to fp16", setting
        )
    try:
        calibration = load_calibration(folder, manifest)
    except CalibrationUnusable as e:
        return reference, fp32_only(
            manifest, f"calibration set unusable, lower precisions not tried: {e}", setting
        )
    sets = [s for s in (golden_inputs, calibration) if s is not None]
    if not sets:
        reason = "no golden or calibration inputs to check a lower precision against"
        return reference, fp32_only(manifest, reason, setting)
    checks: list[VariantCheck] = []
    for variant in tried:
        check, model = check_variant(
            variant, reference, backend, backend_name, folder, manifest, profile, sets
        )
        checks.append(check)
        if model is not None:
            reason = f"{variant.precision}: {check.reason}"
            decision = PrecisionDecision(variant.precision, variant.file, reason, setting, prefer, checks)
            decision.golden_p95_ms = check.variant_p95_ms
            return model, decision
    why = "; ".join(f"{c.precision} ({c.file}): {c.reason}" for c in checks)
    decision = PrecisionDecision(
        "fp32", manifest.model_file, f"fp32, no lower precision passed: {why}", setting, prefer, checks
    )
    return reference, decision
