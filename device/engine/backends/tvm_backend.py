"""Apache TVM: an ONNX model compiled for this exact CPU with kernels tuned off the device.

The backend takes a model only when records tuned for this model file (by sha256) and this CPU
target come with it (`models.tvm_tuning` makes them on the fleet). TVM's stock pipeline without
tuned schedules ran 15-80x slower than ONNX Runtime, so without records it steps aside.

Where things live (all overridable, so the agent can point them at its data dir):
- records: first the package the model came from (manifest `tvm_records`: files beside the model,
  covered by the manifest's hashes, so a rollout carries them); then the `records_roots` argument,
  else the `EDGEFLEET_TVM_RECORDS` paths (os.pathsep-separated), each holding
  `<model sha256>/<target key>/` folders.
- compiled libraries: `cache_dir` argument, else `EDGEFLEET_TVM_CACHE`, else `<model folder>/../.tvm-cache`
  (beside the slots, so a slot swap keeps the cache and slots stay as installed). One `.so` per model
  sha256, TVM version, target, records digest and batch size; a corrupt one is rebuilt.

Batches: Relax kernels are compiled for static shapes, one library per batch size the records were
tuned for (1 always). A request of n rows runs as the largest compiled batches that fit, then
single rows, so any n works and the engine need not know.

Preference: records whose tuning.json holds a comparison with ONNX Runtime on their target
(`python -m models.tvm_tuning compare`) where TVM was not at least MIN_SPEEDUP faster make
`preference_reason` say so, and the registry then passes TVM over for ONNX Runtime (on this
x86 the sample's tuned kernels ran 1.3-1.4x slower than ONNX Runtime's: bench/engine/tvm_RESULTS.md).
"""

import hashlib
import importlib.metadata
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device.engine.backends.base import Tensors
from device.engine.probe import HardwareProfile, llvm_target_parts
from device.errors import EngineError, InferenceInputError
from models.manifest import Manifest, ModelFormat

if TYPE_CHECKING:
    from models.tvm_tuning import RecordsFiles, TuningMeta

RECORDS_ENV = "EDGEFLEET_TVM_RECORDS"
CACHE_ENV = "EDGEFLEET_TVM_CACHE"


def _tvm_version() -> str | None:
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _env_roots() -> list[Path]:
    return [Path(p) for p in os.environ.get(RECORDS_ENV, "").split(os.pathsep) if p]


@dataclass(frozen=True)
class FoundRecords:
    """Records that fit a model file, this CPU and this TVM, and where they were found."""

    files: "RecordsFiles"
    meta: "TuningMeta"
    source: str  # "the package (model.tvm-x86_64-znver3.*)" or "records root /path"


@dataclass(frozen=True)
class CompiledLibrary:
    path: Path
    batch: int
    cache_hit: bool
    compile_seconds: float


class TvmModel:
    """One Relax VM per compiled batch size. Runs are serialised: a VM is not safe to share."""

    calls_in_flight = 1

    def __init__(
        self,
        libraries: list[CompiledLibrary],
        input_names: list[str],
        output_names: list[str],
        records_source: str = "",
    ) -> None:
        import tvm
        from tvm import relax

        self.libraries = libraries
        self.records_source = records_source  # where the records came from, for status and logs
        self._input_names = input_names
        self._output_names = output_names
        self._device = tvm.cpu()
        self._tensor = tvm.runtime.tensor
        self._vms: dict[int, Any] = {}
        for lib in libraries:
            try:
                self._vms[lib.batch] = relax.VirtualMachine(
                    tvm.runtime.load_module(str(lib.path)), self._device
                )
            except Exception as e:  # TVM raises its own error types for a library it cannot load
                raise EngineError(f"TVM could not load {lib.path}: {e}") from e
        self._sizes = sorted(self._vms, reverse=True)
        self._lock = threading.Lock()

    @property
    def cache_hit(self) -> bool:
        """Whether every library came from the cache (no compile in this load)."""
        return all(lib.cache_hit for lib in self.libraries)

    def _call(self, batch: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = self._vms[batch]["main"](*(self._tensor(a, self._device) for a in inputs))
        parts = [out] if hasattr(out, "numpy") else list(out)
        return [p.numpy() for p in parts]

    def run(self, inputs: Tensors) -> Tensors:
        arrays = [np.ascontiguousarray(inputs[name]) for name in self._input_names]
        rows = arrays[0].shape[0]
        if rows < 1 or any(a.shape[0] != rows for a in arrays):
            raise InferenceInputError(f"inputs must share a batch of at least one row, got {rows}")
        chunks: list[list[np.ndarray]] = []
        start = 0
        with self._lock:
            while start < rows:
                # Largest compiled batch that fits; batch 1 is always there, so this ends.
                size = next(s for s in self._sizes if s <= rows - start)
                chunks.append(self._call(size, [a[start : start + size] for a in arrays]))
                start += size
        if len(chunks) == 1:
            outputs = chunks[0]
        else:
            outputs = [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        self._vms.clear()


class TvmBackend:
    name = "tvm"

    def __init__(self, records_roots: list[Path] | None = None, cache_dir: Path | None = None) -> None:
        self._roots = records_roots
        self._cache_dir = cache_dir

    @property
    def records_roots(self) -> list[Path]:
        return list(self._roots) if self._roots is not None else _env_roots()

    def _candidates(
        self, package: Path | None, manifest: Manifest, sha: str, key: str
    ) -> list[tuple["RecordsFiles", str]]:
        """Records for the model file `sha` on `key`: the package's first, then each root's."""
        from models.tvm_tuning import META_FILE, RecordsFiles

        found: list[tuple[RecordsFiles, str]] = []
        if package is not None:
            for entry in manifest.tvm_records:
                listed = manifest.files.get(entry.model)
                if entry.target == key and listed is not None and listed.sha256 == sha:
                    # Plain file names (no folders in a package): the character prefix is the point.
                    label = os.path.commonprefix(list(entry.file_names))  # noqa: RUF071
                    found.append((RecordsFiles.in_package(package, entry), f"the package ({label}*)"))
        for root in self.records_roots:
            folder = root / sha / key
            if (folder / META_FILE).is_file():
                found.append((RecordsFiles.in_folder(folder), f"records root {root}"))
        return found

    def _locate(
        self, package: Path | None, manifest: Manifest, sha: str, target: dict[str, Any]
    ) -> tuple[FoundRecords | None, list[str]]:
        """The first records that fit this model, target and TVM; else why each candidate did not."""
        from models.tvm_tuning import TuningError, TuningMeta, target_key

        key = target_key(target)
        problems: list[str] = []
        for files, source in self._candidates(package, manifest, sha, key):
            try:
                meta = TuningMeta.read(files)
            except TuningError as e:
                problems.append(f"{source}: {e}")
                continue
            if meta.model_sha256 != sha:
                problems.append(
                    f"{source}: tuned for sha256 {meta.model_sha256[:12]}, not this model file ({sha[:12]})"
                )
            elif target_key(meta.target) != key:
                problems.append(f"{source}: tuned for {target_key(meta.target)}, not {key}")
            elif meta.tvm_version != _tvm_version():
                problems.append(
                    f"{source}: tuned with TVM {meta.tvm_version}, this device has {_tvm_version()}; "
                    "re-tune with the device's TVM version"
                )
            else:
                return FoundRecords(files, meta, source), problems
        return None, problems

    def _none_found(self, manifest: Manifest, sha: str, key: str, problems: list[str]) -> str:
        shipped = sorted({e.target for e in manifest.tvm_records if e.model == manifest.model_file})
        roots = ", ".join(str(r) for r in self.records_roots) or f"none (set {RECORDS_ENV})"
        if shipped and key not in shipped:
            where = f"the package ships TVM records for {', '.join(shipped)} only, this CPU is {key}"
        else:
            where = f"no tuned schedules for this model (sha256 {sha[:12]}) on {key}"
        reason = f"{where}; records roots: {roots}"
        if problems:
            reason += "; unusable: " + "; ".join(problems)
        return (
            reason + ". Untuned TVM runs 15-80x slower than ONNX Runtime; tune it off the device "
            "(python -m models.tvm_tuning tune) and ship the records in the package (package-records)"
        )

    def unavailable_reason(self, profile: HardwareProfile, manifest: Manifest) -> str | None:
        if manifest.format is not ModelFormat.ONNX:
            return f"compiles ONNX models only, this one is {manifest.format.value}"
        if not profile.runtimes.get("tvm") or _tvm_version() is None:
            return "apache-tvm is not installed (pip install 'edgefleet[tvm]')"
        try:
            target = llvm_target_parts(profile)
        except ValueError as e:
            return str(e)
        from models.tvm_tuning import target_key

        key = target_key(target)
        sha = manifest.files[manifest.model_file].sha256
        if any(e.target == key and e.model == manifest.model_file for e in manifest.tvm_records):
            return None  # the package's own files are read at load (and by preference_reason)
        found, problems = self._locate(None, manifest, sha, target)
        return None if found is not None else self._none_found(manifest, sha, key, problems)

    def preference_reason(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> str | None:
        """Why ONNX Runtime should serve this model instead, though TVM could: its records were
        measured slower than ONNX Runtime on their target, or none here fit after all."""
        from models.tvm_tuning import MIN_SPEEDUP, TuningError, sha256_file, target_key

        target = llvm_target_parts(profile)
        try:
            sha = sha256_file(model_path)
        except OSError as e:
            return f"cannot read {model_path}: {e}"
        found, problems = self._locate(model_path.parent, manifest, sha, target)
        if found is None:
            return self._none_found(manifest, sha, target_key(target), problems)
        try:
            comparison = found.meta.comparison
        except TuningError as e:
            return f"records in {found.source}: {e}"
        if comparison is None or comparison.speedup >= MIN_SPEEDUP:
            return None
        return (
            f"records for {target_key(target)} found in {found.source}, but TVM ran at "
            f"{comparison.speedup:.2f}x ONNX Runtime's speed where they were compared "
            f"({comparison.describe()}); it must reach {MIN_SPEEDUP}x to be preferred, so ONNX Runtime "
            "serves (a pin does not override a measurement; if it is wrong for this CPU, re-run "
            "`python -m models.tvm_tuning compare` on it and re-package)"
        )

    def load(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> TvmModel:
        from models.tvm_tuning import TuningError, graph_io, sha256_file, target_key

        target = llvm_target_parts(profile)
        sha = sha256_file(model_path)
        found, problems = self._locate(model_path.parent, manifest, sha, target)
        if found is None:
            detail = (
                "; ".join(problems)
                or "the file is not the one its manifest lists, or the records were removed"
            )
            raise EngineError(
                f"no TVM records for {model_path.name} (sha256 {sha[:12]}) on {target_key(target)}: {detail}"
            )
        try:
            inputs, outputs = graph_io(model_path)
            if sorted(inputs) != sorted(s.name for s in manifest.inputs):
                raise TuningError(f"the model's inputs are {inputs}, the manifest lists other names")
            if outputs != [s.name for s in manifest.outputs]:
                raise TuningError(
                    f"the model's outputs are {outputs}, the manifest lists "
                    f"{[s.name for s in manifest.outputs]}; fix the manifest"
                )
            if 1 not in found.meta.batch_sizes:
                raise TuningError(
                    f"records in {found.source} have no batch-1 schedules; re-tune with --batch 1"
                )
            libraries = [
                self._library(model_path, sha, found.files, target, b) for b in found.meta.batch_sizes
            ]
        except (TuningError, OSError) as e:
            raise EngineError(f"TVM: {e}") from e
        return TvmModel(libraries, inputs, outputs, found.source)

    def _cache_root(self, model_path: Path) -> Path:
        if self._cache_dir is not None:
            return self._cache_dir
        if os.environ.get(CACHE_ENV):
            return Path(os.environ[CACHE_ENV])
        return model_path.resolve().parent.parent / ".tvm-cache"

    def _library(
        self, model_path: Path, sha: str, records: "RecordsFiles", target: dict[str, Any], batch: int
    ) -> CompiledLibrary:
        """The compiled library for one batch size: from the cache, else compiled into it."""
        from models.tvm_tuning import target_key

        # By content, not place: the same records from the package or a root share one library.
        digest = hashlib.sha256()
        for path in records.databases:
            digest.update(path.read_bytes())
        version = _tvm_version()
        key = hashlib.sha256(json.dumps([sha, version, target, digest.hexdigest(), batch]).encode())
        path = (
            self._cache_root(model_path)
            / sha[:16]
            / f"{target_key(target)}-tvm{version}-b{batch}-{key.hexdigest()[:16]}.so"
        )
        if _intact(path):
            return CompiledLibrary(path, batch, cache_hit=True, compile_seconds=0.0)
        started = time.monotonic()
        _compile(model_path, records, target, batch, path)
        return CompiledLibrary(path, batch, cache_hit=False, compile_seconds=time.monotonic() - started)


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """Whether the cached library is the one that was written: its bytes match the digest beside it.

    Checked by hash, not by loading: dlopen of a damaged file can crash the process, and a path
    this process loaded before would be served from the loader's memory, not from the disk.
    """
    from models.tvm_tuning import sha256_file

    try:
        return _digest_file(path).read_text().strip() == sha256_file(path)
    except OSError:
        return False


def _compile(
    model_path: Path, records: "RecordsFiles", target: dict[str, Any], batch: int, path: Path
) -> None:
    """Compile with the records and move the library into place in one rename."""
    from models.tvm_tuning import compile_tuned, export_library, load_records, prepare, sha256_file

    executable = compile_tuned(prepare(model_path, batch, target), target, load_records(records))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    digest = _digest_file(partial)
    try:
        export_library(executable, partial)
        digest.write_text(sha256_file(partial) + "\n")
        # Library first, digest last: a crash in between leaves a mismatch, which recompiles.
        os.replace(partial, path)
        os.replace(digest, _digest_file(path))
    finally:
        partial.unlink(missing_ok=True)
        digest.unlink(missing_ok=True)
