"""The TensorRT backend: what runs without a GPU here, and the GPU tests for a machine that has one."""

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from device.engine.backends import tensorrt_backend
from device.engine.backends.tensorrt_backend import (
    CudaRuntime,
    EngineCache,
    EngineCacheKey,
    TensorRTBackend,
    default_cache_dir,
    has_fast_fp16,
    has_fast_int8,
    select_precision,
    version_tuple,
)
from device.engine.probe import GpuInfo, HardwareProfile, probe
from device.errors import EngineError
from models.manifest import Manifest, ModelFormat, TensorSpec, load_manifest

FIXTURES = Path(__file__).parent.parent / "fixtures"
READY = {"tensorrt": True, "cuda-python": True, "onnxruntime": True}


def _gpu_missing() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt, or python3-libnvinfer on JetPack)"
    try:
        CudaRuntime().device_identity()
    except EngineError as e:
        return f"no usable NVIDIA GPU: {e}"
    return None


GPU_MISSING = _gpu_missing()
gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=GPU_MISSING or "")


def machine(name: str, **changes: object) -> HardwareProfile:
    profile = probe(FIXTURES / name)
    return dataclasses.replace(profile, runtimes={**profile.runtimes, **READY}, **changes)  # type: ignore[arg-type]


@pytest.fixture
def manifest(zoo: Path) -> Manifest:
    return load_manifest(zoo / "v1")


# -- precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("capability", "fp16", "int8"),
    [
        *[("5.3", True, False), ("6.0", True, False), ("6.1", False, True), ("6.2", True, False)],
        *[("7.2", True, True), ("7.5", True, True), ("8.7", True, True), ("9.0", True, True)],
        ("5.2", False, False),
    ],
)
def test_fast_precisions_by_compute_capability(capability: str, fp16: bool, int8: bool) -> None:
    assert has_fast_fp16(capability) is fp16 and has_fast_int8(capability) is int8


def test_precision_selection() -> None:
    assert select_precision("fp32", "5.2") == "fp32"
    assert select_precision("fp16", "8.7") == "fp16"
    assert select_precision("int8", "7.5") == "int8"
    assert select_precision("int8", None) == "int8"  # an unknown GPU is the builder's to judge
    with pytest.raises(EngineError, match="no fast fp16; set the precision to fp32"):
        select_precision("fp16", "6.1")
    with pytest.raises(EngineError, match="no fast int8"):
        select_precision("int8", "6.0")
    with pytest.raises(EngineError, match="'bf16' is not one of fp32, fp16, int8"):
        select_precision("bf16", "9.0")


def test_version_tuple() -> None:
    assert version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert version_tuple("8.6.2.post1") == (8, 6, 2)
    assert version_tuple("11.4.0rc1") == (11, 4, 0)
    assert version_tuple("8.2.1.8") < (8, 5) <= version_tuple("8.5.2.2")


# -- the engine cache ---------------------------------------------------------------------------------
def key(**changes: object) -> EngineCacheKey:
    base = EngineCacheKey("ab" * 32, "10.3.0.30", "Orin", "8.7", "fp16", 8)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"model_sha256": "cd" * 32},
        {"tensorrt_version": "10.4.0.26"},
        {"gpu_name": "NVIDIA H100 80GB HBM3"},
        {"compute_capability": "9.0"},
        {"precision": "fp32"},
        {"max_batch": 16},
        {"recipe": "edgefleet-trt/2"},
    ],
)
def test_every_field_of_the_key_changes_the_cache_entry(change: dict[str, object], tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    assert key().digest() == key().digest()
    assert cache.path_for(key(**change)) != cache.path_for(key())
    assert cache.path_for(key()).parent == tmp_path and cache.path_for(key()).suffix == ".engine"


def test_cache_round_trip_and_eviction_of_a_damaged_engine(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    assert cache.load(key()) is None
    blob = os.urandom(4096)
    path = cache.store(key(), blob)
    assert cache.load(key()) == blob and cache.load(key(precision="fp32")) is None
    damaged = bytearray(blob)
    damaged[100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert cache.load(key()) is None  # the sidecar's hash no longer matches
    assert not path.exists() and not path.with_suffix(".json").exists()


def test_an_engine_without_its_sidecar_is_not_trusted(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(key(), b"engine")
    path.with_suffix(".json").unlink()
    assert cache.load(key()) is None


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFLEET_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "tensorrt"
    monkeypatch.delenv("EDGEFLEET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "edgefleet" / "tensorrt"
    assert TensorRTBackend().cache.folder == tmp_path / "xdg" / "edgefleet" / "tensorrt"


# -- availability, per recorded machine -------------------------------------------------------------------
def test_a_ready_orin_can_take_the_model(manifest: Manifest, tmp_path: Path) -> None:
    for precision in ("fp32", "fp16", "int8"):
        backend = TensorRTBackend(tmp_path, precision=precision)
        assert backend.unavailable_reason(machine("orin_agx"), manifest) is None


@pytest.mark.parametrize(
    ("name", "runtimes", "reason"),
    [
        ("rpi5", {}, "the probe found no NVIDIA GPU"),
        ("x86_cpu", {}, "the probe found no NVIDIA GPU"),
        ("x86_gpu", {"tensorrt": False}, "tensorrt Python package is not installed"),
        ("x86_gpu", {"cuda-python": False}, "cuda-python is not installed"),
        ("xavier_nx", {}, "TensorRT 8.2.1.8 is too old; this backend needs 8.5+"),
    ],
)
def test_why_a_machine_cannot_take_it(
    name: str, runtimes: dict[str, bool], reason: str, manifest: Manifest, tmp_path: Path
) -> None:
    profile = machine(name)
    profile = dataclasses.replace(profile, runtimes={**profile.runtimes, **runtimes})
    assert reason in (TensorRTBackend(tmp_path).unavailable_reason(profile, manifest) or "")


def test_precision_the_gpu_lacks_is_a_reason(manifest: Manifest, tmp_path: Path) -> None:
    p100 = machine("x86_gpu", gpus=[GpuInfo("Tesla P100-PCIE-16GB", "6.0")])
    assert TensorRTBackend(tmp_path, precision="fp16").unavailable_reason(p100, manifest) is None
    reason = TensorRTBackend(tmp_path, precision="int8").unavailable_reason(p100, manifest)
    assert reason is not None and "no fast int8" in reason


def test_models_it_cannot_take(manifest: Manifest, tmp_path: Path) -> None:
    backend, orin = TensorRTBackend(tmp_path), machine("orin_agx")
    tflite = manifest.model_copy(update={"format": ModelFormat.TFLITE})
    assert "runs ONNX models and TensorRT engines only" in (backend.unavailable_reason(orin, tflite) or "")
    any_size = manifest.model_copy(
        update={"inputs": [TensorSpec(name="image", dtype="float32", shape=[-1, 3, -1, -1])]}
    )
    assert "dynamic dimension other than the batch" in (backend.unavailable_reason(orin, any_size) or "")
    engine = manifest.model_copy(update={"format": ModelFormat.TENSORRT_ENGINE})
    assert backend.unavailable_reason(orin, engine) is None
    with pytest.raises(EngineError, match="max_batch must be at least 1"):
        TensorRTBackend(tmp_path, max_batch=0)


@pytest.mark.skipif(GPU_MISSING is None, reason="this machine has a GPU; the no-GPU path is tested elsewhere")
def test_loading_without_a_gpu_is_an_engine_error(zoo: Path, manifest: Manifest, tmp_path: Path) -> None:
    """The real load path, up to the missing hardware: an EngineError, so the registry moves on."""
    with pytest.raises(EngineError, match=r"cuda-python is not installed|CUDA cudaGetDevice failed"):
        TensorRTBackend(tmp_path).load(zoo / "v1" / "model.onnx", manifest, machine("x86_gpu"))
    assert not any(tmp_path.iterdir())  # nothing half-built was cached


# -- on a GPU ---------------------------------------------------------------------------------------------
def _golden(zoo: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(zoo / "v1" / "golden.npz") as data:
        inputs = {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
        outputs = {k.removeprefix("output."): data[k] for k in data.files if k.startswith("output.")}
    return inputs, outputs


@pytest.mark.gpu
@gpu
def test_builds_caches_and_matches_the_golden_outputs(
    zoo: Path, manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = TensorRTBackend(tmp_path)
    model = backend.load(zoo / "v1" / "model.onnx", manifest, probe())
    inputs, expected = _golden(zoo)
    try:
        outputs = model.run(inputs)
    finally:
        model.close()
    for name, want in expected.items():
        np.testing.assert_allclose(outputs[name], want, atol=1e-3, rtol=1e-3)
    (engine,) = tmp_path.glob("*.engine")
    built_at = engine.stat().st_mtime_ns

    def no_build(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the cached engine should have been used")

    monkeypatch.setattr(tensorrt_backend, "build_engine", no_build)
    again = backend.load(zoo / "v1" / "model.onnx", manifest, probe())
    again.close()
    assert engine.stat().st_mtime_ns == built_at


@pytest.mark.gpu
@gpu
def test_a_damaged_cached_engine_is_rebuilt(zoo: Path, manifest: Manifest, tmp_path: Path) -> None:
    backend = TensorRTBackend(tmp_path)
    backend.load(zoo / "v1" / "model.onnx", manifest, probe()).close()
    (engine,) = tmp_path.glob("*.engine")
    engine.write_bytes(engine.read_bytes()[:1000])
    model = backend.load(zoo / "v1" / "model.onnx", manifest, probe())
    inputs, expected = _golden(zoo)
    try:
        np.testing.assert_allclose(model.run(inputs)["logits"], expected["logits"], atol=1e-3, rtol=1e-3)
    finally:
        model.close()
    assert engine.stat().st_size > 1000


@pytest.mark.gpu
@gpu
def test_a_batch_over_the_engine_range_runs_in_slices(zoo: Path, manifest: Manifest, tmp_path: Path) -> None:
    import onnxruntime as ort

    images = np.random.default_rng(3).random((5, 3, 64, 64), dtype=np.float32)
    want = ort.InferenceSession(str(zoo / "v1" / "model.onnx")).run(None, {"image": images})[0]
    model = TensorRTBackend(tmp_path, max_batch=2).load(zoo / "v1" / "model.onnx", manifest, probe())
    try:
        got = model.run({"image": images})["logits"]
    finally:
        model.close()
    assert got.shape == (5, 4)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@gpu
def test_fp16_stays_close_to_fp32(zoo: Path, manifest: Manifest, tmp_path: Path) -> None:
    import tensorrt as trt

    if version_tuple(trt.__version__) >= (11,):
        pytest.skip("TensorRT 11 takes fp16 from the model, and the sample model is fp32")
    model = TensorRTBackend(tmp_path, precision="fp16").load(zoo / "v1" / "model.onnx", manifest, probe())
    inputs, expected = _golden(zoo)
    try:
        np.testing.assert_allclose(model.run(inputs)["logits"], expected["logits"], atol=5e-2, rtol=5e-2)
    finally:
        model.close()


@pytest.mark.gpu
@gpu
def test_the_engine_picks_tensorrt_on_a_gpu(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from device.engine.engine import Engine

    monkeypatch.setenv("EDGEFLEET_CACHE_DIR", str(tmp_path))
    engine = Engine(probe())
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    try:
        assert serving.backend == "tensorrt", serving.passed_over
    finally:
        serving.model.close()
