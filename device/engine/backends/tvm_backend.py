"""Apache TVM: an ONNX model compiled for this exact CPU with kernels tuned off the device.

The backend takes a model only when a records folder tuned for this model file (by sha256) and
this CPU target ships with it (`models.tvm_tuning` makes them on the fleet). TVM's stock pipeline
without tuned schedules ran 15-80x slower than ONNX Runtime, so without records it steps aside.

Where things live (all overridable, so the agent can point them at its data dir):
- records: `records_roots` argument, else the `EDGEFLEET_TVM_RECORDS` paths (os.pathsep-separated);
  each root holds `<model sha256>/<target key>/` folders.
- compiled libraries: `cache_dir` argument, else `EDGEFLEET_TVM_CACHE`, else `<model folder>/../.tvm-cache`
  (beside the slots, so a slot swap keeps the cache and slots stay as installed). One `.so` per model
  sha256, TVM version, target, records digest and batch size; a corrupt one is rebuilt.

Batches: Relax kernels are compiled for static shapes, one library per batch size the records were
tuned for (1 always). A request of n rows runs as the largest compiled batches that fit, then
single rows, so any n works and the engine need not know.
"""

import hashlib
import importlib.metadata
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device.engine.backends.base import Tensors
from device.engine.probe import HardwareProfile, llvm_target_parts
from device.errors import EngineError, InferenceInputError
from models.manifest import Manifest, ModelFormat

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
class CompiledLibrary:
    path: Path
    batch: int
    cache_hit: bool
    compile_seconds: float


class TvmModel:
    """One Relax VM per compiled batch size. Runs are serialised: a VM is not safe to share."""

    def __init__(
        self, libraries: list[CompiledLibrary], input_names: list[str], output_names: list[str]
    ) -> None:
        import tvm
        from tvm import relax

        self.libraries = libraries
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

    def _records(self, model_sha256: str, target: dict[str, Any]) -> Path | None:
        from models.tvm_tuning import META_FILE, records_dir

        for root in self.records_roots:
            folder = records_dir(root, model_sha256, target)
            if (folder / META_FILE).is_file():
                return folder
        return None

    def unavailable_reason(self, profile: HardwareProfile, manifest: Manifest) -> str | None:
        if manifest.format is not ModelFormat.ONNX:
            return f"compiles ONNX models only, this one is {manifest.format.value}"
        if not profile.runtimes.get("tvm") or _tvm_version() is None:
            return "apache-tvm is not installed (pip install 'edgefleet[tvm]')"
        try:
            target = llvm_target_parts(profile)
        except ValueError as e:
            return str(e)
        from models.tvm_tuning import TuningError, TuningMeta, target_key

        sha = manifest.files[manifest.model_file].sha256
        folder = self._records(sha, target)
        if folder is None:
            roots = ", ".join(str(r) for r in self.records_roots) or f"none (set {RECORDS_ENV})"
            return (
                f"no tuned schedules for this model (sha256 {sha[:12]}) on {target_key(target)} in "
                f"records roots: {roots}. Untuned TVM runs 15-80x slower than ONNX Runtime; tune it "
                "off the device (python -m models.tvm_tuning tune) and ship the records folder"
            )
        try:
            meta = TuningMeta.read(folder)
        except TuningError as e:
            return str(e)
        if meta.tvm_version != _tvm_version():
            return (
                f"records in {folder} were tuned with TVM {meta.tvm_version}, this device has "
                f"{_tvm_version()}; re-tune with the device's TVM version"
            )
        return None

    def load(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> TvmModel:
        from models.tvm_tuning import TuningError, TuningMeta, graph_io, sha256_file, target_key

        target = llvm_target_parts(profile)
        sha = sha256_file(model_path)
        folder = self._records(sha, target)
        if folder is None:
            raise EngineError(
                f"no TVM records for {model_path.name} (sha256 {sha[:12]}) on {target_key(target)}: "
                "the file is not the one its manifest lists, or the records were removed"
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
            meta = TuningMeta.read(folder)
            if 1 not in meta.batch_sizes:
                raise TuningError(f"{folder} has no batch-1 records; re-tune with --batch 1")
            libraries = [self._library(model_path, sha, folder, target, b) for b in meta.batch_sizes]
        except (TuningError, OSError) as e:
            raise EngineError(f"TVM: {e}") from e
        return TvmModel(libraries, inputs, outputs)

    def _cache_root(self, model_path: Path) -> Path:
        if self._cache_dir is not None:
            return self._cache_dir
        if os.environ.get(CACHE_ENV):
            return Path(os.environ[CACHE_ENV])
        return model_path.resolve().parent.parent / ".tvm-cache"

    def _library(
        self, model_path: Path, sha: str, records: Path, target: dict[str, Any], batch: int
    ) -> CompiledLibrary:
        """The compiled library for one batch size: from the cache, else compiled into it."""
        from models.tvm_tuning import RECORDS_FILES, target_key

        digest = hashlib.sha256()
        for name in RECORDS_FILES:
            digest.update((records / name).read_bytes())
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


def _compile(model_path: Path, records: Path, target: dict[str, Any], batch: int, path: Path) -> None:
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
