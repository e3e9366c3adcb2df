"""The TVM backend on the sample model: real TVM compiles, real Relax VM runs, real ONNX Runtime to compare.

The committed records (models/zoo/surface_defect/tvm/) were tuned on an AMD EPYC (x86_64-znver3).
On another CPU the tests copy them under this machine's target key: the schedules still compile and
give the same numbers there (only their speed is tuned for another core), which is what these test.
"""

import dataclasses
import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from device.engine.backends.tvm_backend import RECORDS_ENV, TvmBackend
from device.engine.engine import Engine, load_golden
from device.engine.probe import HardwareProfile, llvm_target_parts
from device.errors import EngineError, NoBackendAvailable
from models.manifest import Manifest, ModelFormat, load_manifest
from models.package import write_manifest
from models.tvm_tuning import META_FILE, RECORDS_FILES, TuningMeta, target_key

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgefleet[tvm]')")
pytest.importorskip("onnx", reason="the TVM backend imports ONNX models with the onnx package")

ZOO = Path(__file__).resolve().parents[4] / "models" / "zoo" / "surface_defect"
COMMITTED = ZOO / "tvm"
# TVM and ONNX Runtime sum the convolutions in different orders; fp32 logits agree to ~1e-5 here.
ATOL = 1e-4


@pytest.fixture(scope="session")
def manifest() -> Manifest:
    # These tests are about records roots; records shipped in the package (manifest tvm_records)
    # are tested in ../test_tvm_package_records.py, so the manifest here lists none.
    return load_manifest(ZOO / "v1").model_copy(update={"tvm_records": []})


def _committed_folder(manifest: Manifest) -> Path:
    sha = manifest.files[manifest.model_file].sha256
    folders = sorted((COMMITTED / sha).iterdir())
    assert folders, f"no committed records under {COMMITTED / sha}"
    return folders[0]


@pytest.fixture(scope="session")
def records_root(
    tmp_path_factory: pytest.TempPathFactory, tvm_profile: HardwareProfile, manifest: Manifest
) -> Path:
    """The committed records root, or a copy with each model's records under this CPU's target key."""
    key = target_key(llvm_target_parts(tvm_profile))
    if _committed_folder(manifest).name == key:
        return COMMITTED
    root = tmp_path_factory.mktemp("records")
    for model in COMMITTED.iterdir():
        shutil.copytree(sorted(model.iterdir())[0], root / model.name / key)
    return root


@dataclasses.dataclass(frozen=True)
class FirstLoad:
    cache: Path
    seconds: float
    cache_hit: bool
    libraries: list[Path]


@pytest.fixture(scope="session")
def first_load(
    tmp_path_factory: pytest.TempPathFactory,
    records_root: Path,
    tvm_profile: HardwareProfile,
    manifest: Manifest,
) -> FirstLoad:
    """One compile with the records into a fresh cache, shared by the tests (it takes seconds)."""
    cache = tmp_path_factory.mktemp("tvm-cache")
    started = time.monotonic()
    model = TvmBackend(records_roots=[records_root], cache_dir=cache).load(
        ZOO / "v1" / "model.onnx", manifest, tvm_profile
    )
    seconds = time.monotonic() - started
    model.close()
    return FirstLoad(cache, seconds, model.cache_hit, [lib.path for lib in model.libraries])


def _ort(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"image": x})[0])


def test_unavailable_without_records(
    tmp_path: Path, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    reason = TvmBackend(records_roots=[tmp_path]).unavailable_reason(tvm_profile, manifest)
    assert reason is not None
    assert "no tuned schedules" in reason and manifest.files["model.onnx"].sha256[:12] in reason


def test_unavailable_with_no_roots_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    monkeypatch.delenv(RECORDS_ENV, raising=False)
    reason = TvmBackend().unavailable_reason(tvm_profile, manifest)
    assert reason is not None and RECORDS_ENV in reason


def test_unavailable_for_non_onnx_and_without_tvm(
    records_root: Path, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    backend = TvmBackend(records_roots=[records_root])
    tflite = manifest.model_copy(update={"format": ModelFormat.TFLITE})
    assert "ONNX models only" in (backend.unavailable_reason(tvm_profile, tflite) or "")
    no_tvm = dataclasses.replace(tvm_profile, runtimes={**tvm_profile.runtimes, "tvm": False})
    assert "apache-tvm is not installed" in (backend.unavailable_reason(no_tvm, manifest) or "")


def test_records_from_another_tvm_version_are_passed_over(
    tmp_path: Path, records_root: Path, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    sha = manifest.files["model.onnx"].sha256
    key = target_key(llvm_target_parts(tvm_profile))
    folder = Path(shutil.copytree(records_root / sha / key, tmp_path / sha / key))
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "tvm_version": "0.99.0"}))
    reason = TvmBackend(records_roots=[tmp_path]).unavailable_reason(tvm_profile, manifest)
    assert reason is not None and "0.99.0" in reason


def test_loads_with_committed_records_passes_golden_and_matches_onnxruntime(
    records_root: Path, first_load: FirstLoad, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    backend = TvmBackend(records_roots=[records_root], cache_dir=first_load.cache)
    assert backend.unavailable_reason(tvm_profile, manifest) is None
    engine = Engine(tvm_profile, backends=[backend])
    serving = engine.prepare(ZOO / "v1", manifest)  # warm-up, golden vectors and latency budget
    assert serving.backend == "tvm"
    inputs, expected = load_golden(ZOO / "v1", manifest)
    got = serving.model.run(inputs)["logits"]
    np.testing.assert_allclose(
        got, expected["logits"], atol=manifest.golden.atol if manifest.golden else 1e-3
    )
    rng = np.random.default_rng(7)
    for rows in (1, 3, 8, 11):  # compiled for 1 and 8: 3 runs row by row, 11 as 8 + 1 + 1 + 1
        x = rng.normal(size=(rows, 3, 64, 64)).astype(np.float32)
        out = serving.model.run({"image": x})["logits"]
        assert out.shape == (rows, 4)
        np.testing.assert_allclose(out, _ort(ZOO / "v1" / "model.onnx", x), atol=ATOL, rtol=0)
    serving.model.close()


def test_second_load_comes_from_the_cache(
    records_root: Path, first_load: FirstLoad, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    """A new backend on the same cache (an agent restart) loads the libraries without compiling."""
    assert not first_load.cache_hit and all(path.is_file() for path in first_load.libraries)
    backend = TvmBackend(records_roots=[records_root], cache_dir=first_load.cache)
    started = time.monotonic()
    second = backend.load(ZOO / "v1" / "model.onnx", manifest, tvm_profile)
    cached_s = time.monotonic() - started
    assert second.cache_hit
    assert [lib.path for lib in second.libraries] == first_load.libraries
    assert cached_s < first_load.seconds / 2, (first_load.seconds, cached_s)
    x = np.ones((2, 3, 64, 64), np.float32)
    np.testing.assert_allclose(
        second.run({"image": x})["logits"], _ort(ZOO / "v1" / "model.onnx", x), atol=ATOL, rtol=0
    )


def test_damaged_cached_library_is_rebuilt(
    tmp_path: Path,
    records_root: Path,
    first_load: FirstLoad,
    tvm_profile: HardwareProfile,
    manifest: Manifest,
) -> None:
    cache = Path(shutil.copytree(first_load.cache, tmp_path / "cache"))
    victim = cache / first_load.libraries[0].relative_to(first_load.cache)
    # Damage by rename, as a torn copy would land: rewriting a library in place while a process
    # has it mapped crashes that process (SIGBUS), which is why the backend only renames into place.
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(b"\x7fELF truncated")
    damaged.replace(victim)
    again = TvmBackend(records_roots=[records_root], cache_dir=cache).load(
        ZOO / "v1" / "model.onnx", manifest, tvm_profile
    )
    hits = {lib.path: lib.cache_hit for lib in again.libraries}
    assert hits[victim] is False and all(hit for path, hit in hits.items() if path != victim)
    assert victim.read_bytes()[:4] == b"\x7fELF" and victim.stat().st_size > 1000
    assert again.run({"image": np.zeros((1, 3, 64, 64), np.float32)})["logits"].shape == (1, 4)


def _records_for(root: Path, source: Path, sha: str) -> Path:
    folder = Path(shutil.copytree(source, root / sha / source.name))
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "model_sha256": sha}))
    return folder


def test_corrupt_model_is_an_engine_error(
    tmp_path: Path, records_root: Path, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    package = Path(shutil.copytree(ZOO / "v1", tmp_path / "pkg"))
    (package / "model.onnx").write_bytes(b"\x08\x01garbage, not a protobuf")
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"files"})
    broken = write_manifest(package, fields, list(manifest.files))
    sha = broken.files["model.onnx"].sha256
    key = target_key(llvm_target_parts(tvm_profile))
    _records_for(tmp_path / "records", records_root / manifest.files["model.onnx"].sha256 / key, sha)
    backend = TvmBackend(records_roots=[tmp_path / "records"], cache_dir=tmp_path / "cache")
    assert backend.unavailable_reason(tvm_profile, broken) is None  # records exist for these bytes
    with pytest.raises(EngineError, match="not a valid ONNX model"):
        backend.load(package / "model.onnx", broken, tvm_profile)
    with pytest.raises(NoBackendAvailable, match="tvm: load failed"):
        Engine(tvm_profile, backends=[backend]).prepare(package, broken)


def test_records_missing_a_kernel_are_refused_not_run_untuned(
    tmp_path: Path, records_root: Path, tvm_profile: HardwareProfile, manifest: Manifest
) -> None:
    sha = manifest.files["model.onnx"].sha256
    key = target_key(llvm_target_parts(tvm_profile))
    folder = Path(shutil.copytree(records_root / sha / key, tmp_path / "records" / sha / key))
    records = folder / RECORDS_FILES[1]
    lines = gzip.decompress(records.read_bytes()).decode().splitlines()
    kept = [line for line in lines if json.loads(line)[0] != 0]  # drop the first kernel's record
    records.write_bytes(gzip.compress(("\n".join(kept) + "\n").encode()))
    backend = TvmBackend(records_roots=[tmp_path / "records"], cache_dir=tmp_path / "cache")
    with pytest.raises(EngineError, match="no schedule for kernel"):
        backend.load(ZOO / "v1" / "model.onnx", manifest, tvm_profile)


def test_committed_records_describe_themselves(manifest: Manifest) -> None:
    folder = _committed_folder(manifest)
    meta = TuningMeta.read(folder)
    assert meta.model_sha256 == manifest.files["model.onnx"].sha256
    assert target_key(meta.target) == folder.name
    assert 1 in meta.batch_sizes and meta.kernels_us
    assert sum(f.stat().st_size for f in folder.iterdir()) < 200_000  # small enough to ship in a package


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_fleet_cross_compiles_an_arm_library(tmp_path: Path, manifest: Manifest) -> None:
    """The fleet's path to ARM devices: a model compiled with records and linked for aarch64 on x86.

    The committed records were tuned on x86; replayed for aarch64 they compile (schedules are
    target-neutral TIR), but ARM-tuned ones need an ARM board to measure on (MetaSchedule's RPC runner).
    """
    from models.tvm_tuning import compile_tuned, export_library, load_records, prepare

    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae", "mattr": ["+neon"]}
    executable = compile_tuned(
        prepare(ZOO / "v1" / "model.onnx", 1, target), target, load_records(_committed_folder(manifest))
    )
    library = tmp_path / "model-aarch64.so"
    export_library(executable, library, cross_cc="aarch64-linux-gnu-g++")
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_fine_tuned_version_runs_on_adopted_records(
    tmp_path: Path, records_root: Path, tvm_profile: HardwareProfile
) -> None:
    """v2 is v1 fine-tuned: same kernels, so v1's records were adopted for it, not re-tuned."""
    v2 = load_manifest(ZOO / "v2")
    folder = records_root / v2.files["model.onnx"].sha256 / target_key(llvm_target_parts(tvm_profile))
    assert TuningMeta.read(folder).adopted_from == load_manifest(ZOO / "v1").files["model.onnx"].sha256
    backend = TvmBackend(records_roots=[records_root], cache_dir=tmp_path / "cache")
    serving = Engine(tvm_profile, backends=[backend]).prepare(ZOO / "v2", v2)  # golden vectors pass
    assert serving.backend == "tvm"
    serving.model.close()


def test_adopting_records_for_another_architecture_is_refused(tmp_path: Path, manifest: Manifest) -> None:
    from models.tvm_tuning import TuningError, adopt

    onnx = pytest.importorskip("onnx")
    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["logits"])],
        "other",
        [helper.make_tensor_value_info("image", f32, ["n", 4])],
        [helper.make_tensor_value_info("logits", f32, ["n", 4])],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(other))
    with pytest.raises(TuningError, match="architecture differs"):
        adopt(_committed_folder(manifest), other, tmp_path / "records")
    assert not (tmp_path / "records").exists()
