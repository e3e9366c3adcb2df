"""Apache TVM, the offline half: tune a model's kernels for one CPU, and compile it with those records.

Tuning runs on the fleet or a dev machine, never on a device: MetaSchedule searches schedules for
each fused kernel within a bounded trial budget, and only the best record per kernel is kept, as a
small records folder that ships with the model. Compiling applies the records; a device does that
once per model and target, then loads the library from its cache.

This lives in `models`, not `device`, because both sides need it and must agree exactly: the fleet
tunes (and `fleet` may not import `device`), the device compiles, and the Relax module both build
from the ONNX file must be prepared the same way, or no record matches its kernel.

Versions (the `tvm` extra pins them): apache-tvm 0.25.0.post1 with apache-tvm-ffi 0.1.12. The 0.26
and 0.27 wheels on PyPI segfault in MetaSchedule as soon as a TuneContext is made (in ToJSONGraph),
from `tvm-tune` and the Python API alike; 0.25.0.post1 tunes and runs. Tuning also needs xgboost
(the cost model; `xgboost-cpu` avoids a 350 MB NCCL wheel), cloudpickle and tornado. Compiling
needs only apache-tvm, apache-tvm-ffi, onnx and a C compiler (g++) to link the library.

Records folder, one per model file and target:

    <root>/<model sha256>/<target key>/      target key: "<arch>-<mcpu>", e.g. x86_64-znver3
        tuning.json                          what was tuned, how long, best latency per kernel
        database_workload.json.gz            MetaSchedule's JSONDatabase files, gzipped: `gunzip`
        database_tuning_record.json.gz       gives TVM's own format back (best record per kernel)

In a model package (so a fleet rollout carries them, under the manifest's hashes): the same three
files beside the model, named `<model stem>.tvm-<target key>.{tuning.json,workloads.json.gz,
records.json.gz}` and listed in the manifest's `tvm_records` (`package-records` puts them there).

`compare` times the tuned model against ONNX Runtime on a machine of the records' target and keeps
the figures in tuning.json; a device passes TVM over where it was measured slower (registry).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from models.errors import ModelError

if TYPE_CHECKING:
    from models.manifest import Manifest, TvmRecords

TVM_VERSION = "0.25.0.post1"
TVM_FFI_VERSION = "0.1.12"
RECORDS_FILES = ("database_workload.json.gz", "database_tuning_record.json.gz")
META_FILE = "tuning.json"
# MetaSchedule's own builder imports tvm.s_tir.tensor_intrin in every fresh worker, and that
# import parses a few hundred TVMScript intrinsics through inspect.stack(): 40 s of CPU per build
# batch here. fp32 CPU schedules never tensorize, so our builder skips it (see `_build_kernel`).
BUILD_TIMEOUT_S = 120.0
SURVEY_TRIALS = 16  # per kernel, first pass: plenty for pools and reshapes
HEAVY_SHARE = 0.05  # kernels with at least this share of the surveyed latency get the rest
# The records are hash-checked, but gunzip inflates them: a pruned database is a few MB at most.
MAX_RECORDS_DECODED_BYTES = 64 * 1024 * 1024
# Where TVM was compared with ONNX Runtime, a device prefers it only when it was this much faster
# (the engine's precision check holds variants to the same margin over timing noise).
MIN_SPEEDUP = 1.05


class TuningError(ModelError):
    """A model TVM cannot import, records that do not fit it, or a tuning run that failed."""


Target = Mapping[str, Any]


def target_key(target: Target) -> str:
    """The folder name records for `target` live under: "<arch>-<mcpu>" (x86_64-znver3)."""
    arch = str(target.get("mtriple", "")).split("-")[0] or platform.machine()
    return f"{arch}-{target.get('mcpu', 'generic')}"


def host_target() -> dict[str, Any]:
    """This machine's CPU as LLVM sees it; the device's probe computes the same from /proc/cpuinfo."""
    import tvm

    return {
        "kind": "llvm",
        "mtriple": f"{platform.machine()}-linux-gnu",
        "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def records_dir(root: Path, model_sha256: str, target: Target) -> Path:
    return root / model_sha256 / target_key(target)


@dataclass(frozen=True)
class RecordsFiles:
    """The three files of one set of records, wherever they are: a records folder or a package."""

    tuning: Path
    workloads: Path
    records: Path

    @classmethod
    def in_folder(cls, folder: Path) -> RecordsFiles:
        return cls(folder / META_FILE, folder / RECORDS_FILES[0], folder / RECORDS_FILES[1])

    @classmethod
    def in_package(cls, package: Path, entry: TvmRecords) -> RecordsFiles:
        return cls(package / entry.tuning, package / entry.workloads, package / entry.records)

    @property
    def databases(self) -> tuple[Path, Path]:
        """The two MetaSchedule files, in RECORDS_FILES order."""
        return (self.workloads, self.records)


def _files(where: Path | RecordsFiles) -> RecordsFiles:
    return where if isinstance(where, RecordsFiles) else RecordsFiles.in_folder(where)


def package_file_names(model_file: str, key: str) -> tuple[str, str, str]:
    """The names one set of records takes in a package: tuning, workloads, records."""
    stem = f"{model_file.removesuffix('.onnx')}.tvm-{key}"
    return (f"{stem}.tuning.json", f"{stem}.workloads.json.gz", f"{stem}.records.json.gz")


@dataclass(frozen=True)
class TuningMeta:
    """`tuning.json`: enough to tell whether a records folder fits a model, a target and a TVM."""

    model_sha256: str
    target: dict[str, Any]
    tvm_version: str
    batch_sizes: list[int]
    trials: int  # the budget
    trials_measured: int  # candidates actually built and timed (small search spaces run out early)
    tuning_seconds: float
    kernels_us: dict[str, float]
    tuned_on: str
    created: str
    adopted_from: str | None = None  # sha256 of the model the records were tuned on, if not this one
    onnxruntime: dict[str, Any] | None = None  # a `Comparison` on the target, from `compare`

    @property
    def comparison(self) -> Comparison | None:
        if self.onnxruntime is None:
            return None
        known = {f.name for f in dataclasses.fields(Comparison)}
        try:  # like tuning.json itself: fields a newer tool added are ignored, a missing one is not
            comparison = Comparison(**{k: v for k, v in self.onnxruntime.items() if k in known})
        except TypeError as e:
            raise TuningError(f"tuning.json's onnxruntime comparison is invalid ({e}); re-run compare") from e
        times = (comparison.tvm_ms, comparison.onnxruntime_ms)
        if not all(isinstance(t, int | float) and not isinstance(t, bool) and t > 0 for t in times):
            raise TuningError(
                f"tuning.json's onnxruntime comparison has no positive times {times}; re-run compare"
            )
        return comparison

    @classmethod
    def read(cls, where: Path | RecordsFiles) -> TuningMeta:
        path = _files(where).tuning
        try:
            data = json.loads(path.read_text())
            # Fields a newer tuner added are ignored; a missing one is an error (TypeError).
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError) as e:
            raise TuningError(f"{path} is missing or invalid ({e}); re-run the tuning step") from e

    def write(self, where: Path | RecordsFiles) -> None:
        fields = {k: v for k, v in self.__dict__.items() if v is not None}
        _files(where).tuning.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Comparison:
    """Tuned TVM against ONNX Runtime on one machine of the records' target, same input, same threads."""

    batch: int
    threads: int
    tvm_ms: float  # median over repeats of the median call
    onnxruntime_ms: float
    onnxruntime_version: str
    repeats: int
    calls: int
    cpu: str
    measured: str

    @property
    def speedup(self) -> float:
        """ONNX Runtime's time over TVM's: above 1, TVM is faster."""
        return self.onnxruntime_ms / self.tvm_ms if self.tvm_ms > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.tvm_ms:.3g} ms vs {self.onnxruntime_ms:.3g} ms per call, batch {self.batch}, "
            f"{self.threads} thread{'s' if self.threads != 1 else ''}, {self.cpu}, {self.measured[:10]}"
        )


@dataclass(frozen=True)
class Prepared:
    """A model imported into Relax for one static batch size and fused into kernels."""

    mod: Any  # tvm.IRModule
    input_names: list[str]
    output_names: list[str]
    batch: int


def _tvm_target(target: Target) -> Any:
    import tvm

    parts = dict(target)
    # MetaSchedule sizes its parallel loops by num-cores; it does not change which records apply.
    parts.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(parts)


def _load_onnx(model_path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(model_path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, OSError... for a bad file
        raise TuningError(f"{model_path.name} is not a valid ONNX model: {e}") from e
    return model


def _static_shapes(model: Any, batch: int) -> tuple[dict[str, list[int]], list[str]]:
    """Input shapes with the batch dim fixed; Relax kernels are tuned and compiled for static shapes."""
    initializers = {t.name for t in model.graph.initializer}
    shapes: dict[str, list[int]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = []
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                if i == 0 and dim.dim_value != batch:
                    raise TuningError(
                        f"input {value.name!r} has a fixed batch of {dim.dim_value}; tune and compile "
                        f"it for that batch only, not {batch}"
                    )
                shape.append(int(dim.dim_value))
            elif i == 0:
                shape.append(batch)
            else:
                raise TuningError(
                    f"input {value.name!r} has a dynamic dim {i}; TVM compiles static shapes and only "
                    "the batch (dim 0) may be dynamic: export the model with fixed sizes"
                )
        shapes[value.name] = shape
    return shapes, [o.name for o in model.graph.output]


def graph_io(model_path: Path) -> tuple[list[str], list[str]]:
    """The model's input names (in the order the compiled function takes them) and output names."""
    model = _load_onnx(model_path)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v.name for v in model.graph.input if v.name not in initializers]
    return inputs, [o.name for o in model.graph.output]


def prepare(model_path: Path, batch: int, target: Target) -> Prepared:
    """Import the ONNX model for `batch` and fuse it into the kernels that records are keyed by."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.onnx import from_onnx

    if batch < 1:
        raise TuningError(f"batch size must be at least 1, got {batch}")
    model = _load_onnx(model_path)
    shapes, outputs = _static_shapes(model, batch)
    tvm_target = _tvm_target(target)
    try:
        mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
        with tvm_target:
            # The CPU pipeline's own fusion (cpu_generic.legalize_passes). Tuning and compiling both
            # go through here, so each fused kernel hashes the same on the fleet and the device.
            mod = tvm.transform.Sequential(
                [*cpu.library_dispatch_passes(tvm_target), *cpu.legalize_passes(tvm_target)]
            )(mod)
    except Exception as e:  # the importer raises anything for an operator it lacks
        raise TuningError(f"TVM could not import {model_path.name}: {e}") from e
    return Prepared(mod, list(shapes), outputs, batch)


def _build_kernel(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build without its 40 s tensor-intrinsic import (see BUILD_TIMEOUT_S)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _gunzip(source: Path, target: Path) -> None:
    """Inflate `source` into `target`, refusing more than MAX_RECORDS_DECODED_BYTES."""
    written = 0
    try:
        with gzip.open(source, "rb") as src, target.open("wb") as dst:
            while block := src.read(1 << 20):
                written += len(block)
                if written > MAX_RECORDS_DECODED_BYTES:
                    raise TuningError(
                        f"{source} inflates past {MAX_RECORDS_DECODED_BYTES} bytes; these are not pruned "
                        "records (models.tvm_tuning tune keeps the best record per kernel)"
                    )
                dst.write(block)
    except (OSError, EOFError) as e:
        raise TuningError(f"{source} is not a readable gzip file: {e}") from e


@contextmanager
def _records_on_disk(files: RecordsFiles) -> Iterator[tuple[str, str]]:
    """The gzipped records as plain files for JSONDatabase, which reads them when it is made."""
    with tempfile.TemporaryDirectory(prefix="tvm-records-") as tmp:
        paths = []
        for name, source in zip(RECORDS_FILES, files.databases, strict=True):
            if not source.is_file():
                raise TuningError(f"{source} is missing; the records are incomplete")
            target = Path(tmp) / name.removesuffix(".gz")
            _gunzip(source, target)
            paths.append(str(target))
        yield paths[0], paths[1]


def load_records(where: Path | RecordsFiles) -> Any:
    """A records folder (or a package's records files) as a MetaSchedule database, in memory."""
    from tvm.s_tir import meta_schedule as ms

    files = _files(where)
    with _records_on_disk(files) as (workloads, records):
        try:
            return ms.database.JSONDatabase(workloads, records, allow_missing=False)
        except Exception as e:  # TVM raises its own error types for a malformed line
            raise TuningError(f"records {files.records.name} do not parse: {e}") from e


def compile_tuned(prepared: Prepared, target: Target, database: Any) -> Any:
    """Compile with the tuned records; refuse if any kernel has none (it would run unscheduled)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tvm_target = _tvm_target(target)
    missing: list[str] = []

    @tvm.transform.module_pass(opt_level=3)  # type: ignore[untyped-decorator]
    def pipeline(mod: Any, _ctx: Any) -> Any:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and not (
                func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)
            ):
                missing.append(gv.name_hint)
        if missing:
            return mod  # reported below, after the build unwinds
        # cpu_generic's __init__ does not export dataflow_lower_passes in 0.25; its pipeline module does.
        return tvm.transform.Sequential(
            [*cpu.dataflow_lower_passes(tvm_target), *cpu.finalize_passes(tvm_target)]
        )(mod)

    try:
        with tvm_target, database, tvm.transform.PassContext(opt_level=3):
            executable = relax.build(prepared.mod, target=tvm_target, relax_pipeline=pipeline)
    except Exception as e:
        if missing:
            raise TuningError(_missing_message(missing, prepared.batch)) from e
        raise TuningError(f"TVM could not compile the model: {e}") from e
    if missing:
        raise TuningError(_missing_message(missing, prepared.batch))
    return executable


def _missing_message(missing: list[str], batch: int) -> str:
    return (
        f"the records have no schedule for kernel(s) {', '.join(sorted(missing))} at batch {batch}; "
        "re-tune this model for this target (python -m models.tvm_tuning tune)"
    )


def compile_untuned(model_path: Path, batch: int, target: Target) -> Any:
    """TVM's stock pipeline with no schedules: the baseline the tuned kernels are measured against."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    model = _load_onnx(model_path)
    shapes, _ = _static_shapes(model, batch)
    return tvm.compile(from_onnx(model, shape_dict=shapes), target=_tvm_target(target))


def export_library(executable: Any, path: Path, cross_cc: str | None = None) -> None:
    """Link the compiled module into a shared library; `cross_cc` (aarch64-linux-gnu-gcc) for another arch."""
    from tvm.support import cc

    kwargs: dict[str, Any] = {}
    if cross_cc is not None:
        if shutil.which(cross_cc) is None:
            raise TuningError(f"cross compiler {cross_cc} not found; install it (g++-aarch64-linux-gnu)")
        kwargs["fcompile"] = cc.cross_compiler(cross_cc)
    elif cc.get_cc() is None:
        raise TuningError(
            "no C compiler to link the TVM library with: install gcc (or set CC), "
            "or ship the library compiled on the fleet (python -m models.tvm_tuning compile)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        executable.export_library(str(path), **kwargs)
    except Exception as e:  # the linker's failure comes back as a TVM error
        raise TuningError(f"linking {path.name} failed: {e}") from e


def _best_us(database: Any, prepared: Sequence[Prepared], target: Target) -> dict[str, float]:
    """Best measured latency per kernel ("b1/fused_conv2d_add_relu": us), for tuning.json."""
    from tvm.s_tir import meta_schedule as ms

    tvm_target = _tvm_target(target)
    best: dict[str, float] = {}
    for module in prepared:
        for task in ms.relax_integration.extract_tasks(module.mod, tvm_target):
            record = database.query_tuning_record(task.dispatched[0], tvm_target, task.task_name)
            if record is not None and record.run_secs:
                secs = [float(s) for s in record.run_secs]
                best[f"b{module.batch}/{task.task_name}"] = round(1e6 * sum(secs) / len(secs), 3)
    return dict(sorted(best.items()))


def _tune_tasks(
    prepared: Prepared, tvm_target: Any, work: Path, trials: int, per_iter: int, **kwargs: Any
) -> None:
    from tvm.s_tir import meta_schedule as ms

    try:
        ms.relax_integration.tune_relax(
            prepared.mod,
            {},
            tvm_target,
            work_dir=str(work),
            max_trials_global=trials,
            num_trials_per_iter=per_iter,
            builder=ms.builder.LocalBuilder(
                f_build=_build_kernel, max_workers=1, timeout_sec=BUILD_TIMEOUT_S
            ),
            **kwargs,
        )
    except Exception as e:  # TVM's errors have no common base worth naming
        raise TuningError(f"tuning at batch {prepared.batch} failed: {e}") from e


def _tune_batch(prepared: Prepared, target: Target, work: Path, budget: int, seed: int) -> None:
    """Survey every kernel briefly, then spend the rest of the budget on the ones that matter.

    MetaSchedule's scheduler would give every kernel a full first round; here half the kernels are
    pools, a reshape and a 128x4 matmul that need a dozen trials, while the convolutions take
    97% of the time and want hundreds.
    """
    from tvm.s_tir import meta_schedule as ms

    tvm_target = _tvm_target(target)
    tasks = ms.relax_integration.extract_tasks(prepared.mod, tvm_target)
    survey = SURVEY_TRIALS * len(tasks)
    if budget < survey:
        raise TuningError(
            f"a budget of {budget} trials at batch {prepared.batch} cannot cover its {len(tasks)} kernels; "
            f"give at least {survey} per batch size (records must schedule every kernel)"
        )
    _tune_tasks(
        prepared, tvm_target, work, survey, SURVEY_TRIALS, max_trials_per_task=SURVEY_TRIALS, seed=seed
    )
    remaining = budget - survey
    if remaining < SURVEY_TRIALS:
        return
    database = ms.database.JSONDatabase(
        str(work / "database_workload.json"), str(work / "database_tuning_record.json")
    )
    latency = {name.split("/", 1)[1]: us for name, us in _best_us(database, [prepared], target).items()}
    total = sum(latency.values())
    heavy = [name for name, us in latency.items() if us >= HEAVY_SHARE * total]
    _tune_tasks(prepared, tvm_target, work, remaining, min(64, remaining), op_names=heavy, seed=seed)


def tune(
    model_path: Path,
    target: Target,
    trials: int,
    out_root: Path,
    *,
    batch_sizes: Sequence[int] = (1,),
    work_dir: Path | None = None,
    seed: int = 0,
) -> Path:
    """Tune `model_path` for `target` within `trials` measured candidates; return the records folder.

    The budget is split evenly over `batch_sizes` (each is its own set of static-shape kernels).
    MetaSchedule's logs and full database stay in `work_dir` (a temp dir if not given).
    """
    import cloudpickle
    import tvm
    from tvm.s_tir import meta_schedule as ms

    if trials < 1 or not batch_sizes:
        raise TuningError("tuning needs a trial budget of at least 1 and at least one batch size")
    if tvm.__version__ != TVM_VERSION or _ffi_version() != TVM_FFI_VERSION:
        # Refused rather than tried: the 0.26/0.27 wheels crash the whole process (SIGSEGV).
        raise TuningError(
            f"tuning needs apache-tvm=={TVM_VERSION} and apache-tvm-ffi=={TVM_FFI_VERSION} "
            f"(found {tvm.__version__} / {_ffi_version()}); pip install 'edgefleet[tvm-tune]'"
        )
    model_sha = sha256_file(model_path)
    # The builder's workers unpickle `_build_kernel`; by value, so they need not import this package.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tvm-tune-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        modules = [prepare(model_path, batch, target) for batch in batch_sizes]
        for prepared in modules:
            _tune_batch(prepared, target, work, max(1, trials // len(batch_sizes)), seed)
        full = ms.database.JSONDatabase(
            str(work / "database_workload.json"), str(work / "database_tuning_record.json")
        )
        pruned_dir = Path(tmp) / "pruned"
        pruned_dir.mkdir()
        pruned = ms.database.JSONDatabase(
            str(pruned_dir / "database_workload.json"), str(pruned_dir / "database_tuning_record.json")
        )
        full.dump_pruned(pruned)
        folder = records_dir(out_root, model_sha, target)
        folder.mkdir(parents=True, exist_ok=True)
        for name in RECORDS_FILES:
            source = pruned_dir / name.removesuffix(".gz")
            # mtime=0: the same records give the same bytes, so re-committing them is a no-op diff.
            with source.open("rb") as src, gzip.GzipFile(folder / name, "wb", mtime=0) as dst:
                shutil.copyfileobj(src, dst)
        TuningMeta(
            model_sha256=model_sha,
            target=dict(target),
            tvm_version=str(tvm.__version__),
            batch_sizes=sorted(batch_sizes),
            trials=trials,
            trials_measured=len(full),
            tuning_seconds=round(time.monotonic() - started, 1),
            kernels_us=_best_us(pruned, modules, target),
            tuned_on=_cpu_name(),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        ).write(folder)
    return folder


def adopt(records: Path, model_path: Path, out_root: Path) -> Path:
    """Key existing records to another model file whose kernels are the same (a fine-tuned version).

    Records hold schedules for kernel shapes, not weights: a new version with the same architecture
    needs no tuning. Every kernel of the new model at every tuned batch size must be in the records,
    or this refuses (the model changed shape and needs `tune`).
    """
    meta = TuningMeta.read(records)
    database = load_records(records)
    tvm_target = _tvm_target(meta.target)
    from tvm.s_tir import meta_schedule as ms

    for batch in meta.batch_sizes:
        prepared = prepare(model_path, batch, meta.target)
        for task in ms.relax_integration.extract_tasks(prepared.mod, tvm_target):
            if database.query_tuning_record(task.dispatched[0], tvm_target, task.task_name) is None:
                raise TuningError(
                    f"{model_path.name} has kernel {task.task_name} at batch {batch} that the records "
                    "lack: its architecture differs from the tuned model's; tune it instead"
                )
    sha = sha256_file(model_path)
    folder = records_dir(out_root, sha, meta.target)
    folder.mkdir(parents=True, exist_ok=True)
    for name in RECORDS_FILES:
        shutil.copyfile(records / name, folder / name)
    dataclasses.replace(meta, model_sha256=sha, adopted_from=meta.adopted_from or meta.model_sha256).write(
        folder
    )
    return folder


def _input_arrays(model_path: Path, batch: int, seed: int) -> dict[str, Any]:
    """Random inputs of the model's static shapes and dtypes, the same for both runtimes."""
    import numpy as np
    import onnx

    model = _load_onnx(model_path)
    shapes, _ = _static_shapes(model, batch)
    dtypes = {
        v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in model.graph.input
    }
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(dtypes[name]) for name, shape in shapes.items()}


def _median_ms(call: Any, calls: int) -> float:
    call()  # the first call of a block wakes idle workers; not counted
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def compare(
    model_path: Path, records: Path | RecordsFiles, *, batch: int = 1, calls: int = 40, repeats: int = 7
) -> Comparison:
    """Time the model compiled with `records` against ONNX Runtime here, on this machine's CPU.

    Only meaningful on a machine of the records' target (refused elsewhere). Both run with TVM's
    thread count (TVM_NUM_THREADS, read when tvm is first imported); the runtimes alternate within
    every repeat, so load from other processes hits both alike. Their outputs must agree first.
    """
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax

    if calls < 1 or repeats < 1:
        raise TuningError("compare needs at least one call and one repeat")
    meta = TuningMeta.read(records)
    here = target_key(host_target())
    if target_key(meta.target) != here:
        raise TuningError(
            f"the records are for {target_key(meta.target)}, this machine is {here}: compare on a "
            "machine of the records' target, where a device would run them"
        )
    sha = sha256_file(model_path)
    if sha != meta.model_sha256:
        raise TuningError(
            f"the records were tuned for sha256 {meta.model_sha256[:12]}, {model_path.name} is {sha[:12]}"
        )
    target = host_target()
    executable = compile_tuned(prepare(model_path, batch, target), target, load_records(records))
    device = tvm.cpu()
    vm = relax.VirtualMachine(executable, device)
    inputs = _input_arrays(model_path, batch, seed=0)
    names, _ = graph_io(model_path)
    tvm_inputs = [tvm.runtime.tensor(inputs[name], device) for name in names]
    threads = int(tvm.runtime.num_threads())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def run_tvm() -> list[Any]:
        out = vm["main"](*tvm_inputs)
        return [p.numpy() for p in ([out] if hasattr(out, "numpy") else list(out))]

    def run_ort() -> list[Any]:
        return list(session.run(None, inputs))

    for got, want in zip(run_tvm(), run_ort(), strict=True):
        if not np.allclose(got, want, atol=1e-3, rtol=1e-3):
            worst = float(np.max(np.abs(got.astype(np.float64) - want)))
            raise TuningError(
                f"TVM's outputs differ from ONNX Runtime's by up to {worst:.3g}: these records do not "
                "compile this model faithfully; re-tune it"
            )
    tvm_ms: list[float] = []
    ort_ms: list[float] = []
    for repeat in range(repeats):
        pair = [(tvm_ms, run_tvm), (ort_ms, run_ort)]
        for times, call in pair if repeat % 2 == 0 else reversed(pair):
            times.append(_median_ms(call, calls))
    return Comparison(
        batch=batch,
        threads=threads,
        tvm_ms=round(statistics.median(tvm_ms), 4),
        onnxruntime_ms=round(statistics.median(ort_ms), 4),
        onnxruntime_version=str(ort.__version__),
        repeats=repeats,
        calls=calls,
        cpu=_cpu_name(),
        measured=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def record_comparison(records: Path | RecordsFiles, comparison: Comparison) -> None:
    """Keep `comparison` in the records' tuning.json (a package that ships them must be rebuilt)."""
    meta = TuningMeta.read(records)
    dataclasses.replace(meta, onnxruntime=dataclasses.asdict(comparison)).write(records)


def _records_folders(model_sha: str, sources: Sequence[Path]) -> list[Path]:
    """Records folders for one model: each source is a records folder or a records root."""
    folders: list[Path] = []
    for source in sources:
        if (source / META_FILE).is_file():
            folders.append(source)
            continue
        found = sorted(p for p in (source / model_sha).glob("*") if (p / META_FILE).is_file())
        if not found:
            raise TuningError(
                f"no records for sha256 {model_sha[:12]} under {source}: give a records folder or a root "
                "holding <sha256>/<target key>/; tune the model (or adopt another version's records) first"
            )
        folders.extend(found)
    return folders


def copy_records_into(package: Path, model_file: str, sources: Sequence[Path]) -> list[dict[str, str]]:
    """Copy the records for `package/model_file` from `sources` into the package folder.

    Returns the `tvm_records` entries for them (manifest JSON); the caller writes the manifest.
    Refuses records tuned for other bytes than the model file's, or two sets for one target.
    """
    sha = sha256_file(package / model_file)
    entries: dict[str, dict[str, str]] = {}
    for folder in _records_folders(sha, sources):
        meta = TuningMeta.read(folder)
        if meta.model_sha256 != sha:
            raise TuningError(
                f"{folder} holds records for sha256 {meta.model_sha256[:12]}, {model_file} is {sha[:12]}: "
                "adopt them for this file first (python -m models.tvm_tuning adopt)"
            )
        key = target_key(meta.target)
        if key in entries:
            raise TuningError(f"two records folders for {model_file} on {key}; give one")
        files = RecordsFiles.in_folder(folder)
        names = package_file_names(model_file, key)
        for source, name in zip((files.tuning, *files.databases), names, strict=True):
            if not source.is_file():
                raise TuningError(f"{source} is missing; the records folder is incomplete")
            shutil.copyfile(source, package / name)
        tuning, workloads, records = names
        entries[key] = {
            "model": model_file,
            "target": key,
            "tuning": tuning,
            "workloads": workloads,
            "records": records,
        }
    return [entries[key] for key in sorted(entries)]


def package_records(package: Path, sources: Sequence[Path], *, model_file: str | None = None) -> Manifest:
    """Ship records in a package folder: copy them in, list them in `tvm_records`, rewrite the manifest.

    Entries already there for the same model file and target are replaced (their old files removed);
    the package is verified before and after, so only a whole, hashed package comes out.
    """
    from models.package import verify_package, write_manifest

    manifest = verify_package(package)
    model = model_file or manifest.model_file
    if model not in manifest.files:
        raise TuningError(f"{model} is not a file of the package {package}")
    added = copy_records_into(package, model, sources)
    replaced = {(e["model"], e["target"]) for e in added}
    kept = [e for e in manifest.tvm_records if (e.model, e.target) not in replaced]
    stale = {
        name
        for e in manifest.tvm_records
        if (e.model, e.target) in replaced
        for name in e.file_names
        if name not in {n for a in added for n in (a["tuning"], a["workloads"], a["records"])}
    }
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"files"})
    fields["tvm_records"] = sorted(
        [e.model_dump(mode="json") for e in kept] + added, key=lambda e: (e["model"], e["target"])
    )
    files = [name for name in manifest.files if name not in stale]
    try:
        write_manifest(package, fields, files)
    except ModelError:
        # The manifest was not rewritten: take back the files this call copied in.
        for entry in added:
            for key in ("tuning", "workloads", "records"):
                if entry[key] not in manifest.files:
                    (package / entry[key]).unlink(missing_ok=True)
        raise
    for name in stale:
        (package / name).unlink(missing_ok=True)
    return verify_package(package)


def _ffi_version() -> str:
    import tvm_ffi

    return str(tvm_ffi.__version__)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parse_target(text: str) -> dict[str, Any]:
    if text == "host":
        return host_target()
    try:
        target = json.loads(text)
    except json.JSONDecodeError as e:
        raise TuningError(f"--target must be 'host' or a JSON object like {_TARGET_EXAMPLE}: {e}") from e
    if not isinstance(target, dict) or target.get("kind") != "llvm" or "mcpu" not in target:
        raise TuningError(f"--target must be an llvm target with mtriple and mcpu, like {_TARGET_EXAMPLE}")
    return cast(dict[str, Any], target)


_TARGET_EXAMPLE = '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}'


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.tvm_tuning", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tune", help="tune a model for a CPU target (off the device)")
    t.add_argument("model", type=Path)
    t.add_argument("--out", type=Path, required=True, help="records root (<root>/<sha256>/<target key>/)")
    t.add_argument("--target", default="host", help="'host' or an llvm target as JSON")
    t.add_argument("--trials", type=int, default=512, help="total measured candidates (default 512)")
    t.add_argument("--batch", type=int, action="append", help="batch size to tune (repeatable; default 1)")
    t.add_argument("--work-dir", type=Path, default=None, help="keep MetaSchedule's logs here")
    c = sub.add_parser("compile", help="compile a tuned model into a shared library (cross-compiles too)")
    c.add_argument("model", type=Path)
    c.add_argument("--records", type=Path, required=True, help="the records folder to apply")
    c.add_argument("--target", default="host")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--out", type=Path, required=True, help="the .so to write")
    c.add_argument("--cc", default=None, help="cross compiler, e.g. aarch64-linux-gnu-gcc")
    a = sub.add_parser("adopt", help="key a tuned model's records to a new version of the same architecture")
    a.add_argument("model", type=Path, help="the new model file")
    a.add_argument("--records", type=Path, required=True, help="the tuned model's records folder")
    a.add_argument("--out", type=Path, required=True, help="records root to add the new folder to")
    m = sub.add_parser(
        "compare", help="time tuned TVM against ONNX Runtime here and keep the figures in tuning.json"
    )
    m.add_argument("model", type=Path)
    m.add_argument("--records", type=Path, required=True, help="the records folder (tuned for this CPU)")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--threads", type=int, default=None, help="TVM and ONNX Runtime threads (default: TVM's)")
    m.add_argument("--calls", type=int, default=40, help="calls per timing block (default 40)")
    m.add_argument("--repeats", type=int, default=7, help="alternating blocks per runtime (default 7)")
    m.add_argument("--dry-run", action="store_true", help="print the figures, leave tuning.json as it is")
    p = sub.add_parser(
        "package-records", help="ship records in a model package folder (rewrites its manifest)"
    )
    p.add_argument("package", type=Path, help="the package folder (manifest.json and its files)")
    p.add_argument(
        "--records",
        type=Path,
        action="append",
        required=True,
        help="a records folder, or a root holding <sha256>/<target key>/ (repeatable)",
    )
    p.add_argument("--model", default=None, help="the model file they are for (default: model_file)")
    args = parser.parse_args(argv)
    try:
        if args.command == "adopt":
            print(adopt(args.records, args.model, args.out))
            return 0
        if args.command == "compare":
            return _compare_command(args)
        if args.command == "package-records":
            return _package_records_command(args)
        target = _parse_target(args.target)
        if args.command == "tune":
            folder = tune(
                args.model,
                target,
                args.trials,
                args.out,
                batch_sizes=args.batch or [1],
                work_dir=args.work_dir,
            )
            print(folder)
        else:
            executable = compile_tuned(
                prepare(args.model, args.batch, target), target, load_records(args.records)
            )
            export_library(executable, args.out, args.cc)
            print(args.out)
    except TuningError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if "tvm" in sys.modules:
            raise TuningError("--threads must be set before TVM is imported; run compare in its own process")
        # TVM's thread pool reads this once, when the runtime starts.
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    result = compare(args.model, args.records, batch=args.batch, calls=args.calls, repeats=args.repeats)
    verdict = "faster" if result.speedup >= 1 else "slower"
    print(f"TVM vs ONNX Runtime: {result.describe()}: TVM is {verdict} ({result.speedup:.2f}x its speed)")
    if not args.dry_run:
        record_comparison(args.records, result)
        print(f"kept in {RecordsFiles.in_folder(args.records).tuning}; re-run package-records for packages")
    return 0


def _package_records_command(args: argparse.Namespace) -> int:
    from models.package import MANIFEST

    before = (args.package / MANIFEST).stat().st_size if (args.package / MANIFEST).is_file() else 0
    manifest = package_records(args.package, args.records, model_file=args.model)
    for entry in manifest.tvm_records:
        size = sum(manifest.files[name].size for name in entry.file_names)
        print(f"{entry.model} on {entry.target}: {', '.join(entry.file_names)} ({size} bytes)")
    grown = (args.package / MANIFEST).stat().st_size - before
    print(f"{manifest.name} v{manifest.version}: manifest rewritten ({grown:+d} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
