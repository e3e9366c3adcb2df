"""The LiteRT backend on the committed .tflite sample packages, against ONNX Runtime on the same inputs."""

import dataclasses
import importlib.util
import json
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from device.engine.backends.base import Backend
from device.engine.backends.litert_backend import LiteRTBackend
from device.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from device.engine.engine import Engine
from device.engine.probe import HardwareProfile
from device.errors import EngineError, NoBackendAvailable
from models.manifest import load_manifest
from models.package import verify_package, write_manifest
from models.zoo.surface_data import make_dataset, to_input

# LiteRT (XNNPACK) and ONNX Runtime (MLAS) run the same fp32 weights through the same ops but sum in
# different orders, so logits (magnitude up to ~12) differ by float rounding only: measured <= 5e-6.
# 1e-4 absolute is 20x that and still 4 orders of magnitude below any logit gap that flips a class.
PARITY_ATOL = 1e-4
VERSIONS = (1, 2)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None,
    reason="ai-edge-litert is not installed here: pip install ai-edge-litert to run the LiteRT backend",
)


@pytest.fixture(scope="module")
def sample_inputs() -> np.ndarray:
    images, _ = make_dataset(48, seed=7)  # not the golden seed: inputs the conversion never saw
    return to_input(images)


def _onnx_logits(zoo: Path, version: int, profile: HardwareProfile, x: np.ndarray) -> np.ndarray:
    folder = zoo / f"v{version}"
    manifest = load_manifest(folder)
    model = OnnxRuntimeBackend("CPUExecutionProvider").load(folder / manifest.model_file, manifest, profile)
    try:
        return model.run({"image": x})["logits"]
    finally:
        model.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_tflite_packages_are_complete_and_tflite(zoo: Path, version: int) -> None:
    manifest = verify_package(zoo / f"tflite-v{version}")
    assert manifest.format.value == "tflite" and manifest.version == version
    assert [s.name for s in manifest.inputs] == ["image"] and manifest.inputs[0].shape == [-1, 3, 64, 64]
    assert manifest.preprocessing is not None and manifest.preprocessing.layout == "NCHW"


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_vectors_pass_on_litert(engine_profile: HardwareProfile, zoo: Path, version: int) -> None:
    folder = zoo / f"tflite-v{version}"
    serving = Engine(engine_profile, backends=[LiteRTBackend()]).prepare(folder, load_manifest(folder))
    try:
        assert serving.backend == "litert"
        assert serving.golden_p95_ms is not None
    finally:
        serving.model.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_litert_agrees_with_onnxruntime(
    engine_profile: HardwareProfile, zoo: Path, sample_inputs: np.ndarray, version: int
) -> None:
    folder = zoo / f"tflite-v{version}"
    manifest = load_manifest(folder)
    model = LiteRTBackend().load(folder / manifest.model_file, manifest, engine_profile)
    try:
        got = model.run({"image": sample_inputs})["logits"]
    finally:
        model.close()
    want = _onnx_logits(zoo, version, engine_profile, sample_inputs)
    assert got.shape == want.shape == (len(sample_inputs), 4)
    worst = float(np.abs(got - want).max())
    assert worst <= PARITY_ATOL, f"LiteRT differs from ONNX Runtime by {worst:.3g}"
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_changing_batch_sizes_give_the_rows_of_one_big_batch(
    engine_profile: HardwareProfile, zoo: Path, sample_inputs: np.ndarray
) -> None:
    folder = zoo / "tflite-v2"
    manifest = load_manifest(folder)
    model = LiteRTBackend().load(folder / manifest.model_file, manifest, engine_profile)
    try:
        whole = model.run({"image": sample_inputs})["logits"]
        start = 0
        for size in (1, 7, 1, 16, 23):  # grows, shrinks, repeats: every resize path
            part = model.run({"image": sample_inputs[start : start + size]})["logits"]
            np.testing.assert_allclose(part, whole[start : start + size], atol=1e-5, rtol=0)
            start += size
        assert start == len(sample_inputs)
    finally:
        model.close()


def test_concurrent_runs_each_get_their_own_rows(
    engine_profile: HardwareProfile, zoo: Path, sample_inputs: np.ndarray
) -> None:
    # One interpreter shared by the pipeline thread and API requests: runs must not interleave.
    folder = zoo / "tflite-v1"
    manifest = load_manifest(folder)
    model = LiteRTBackend().load(folder / manifest.model_file, manifest, engine_profile)
    expected = model.run({"image": sample_inputs})["logits"]
    errors: list[str] = []

    def worker(offset: int, size: int) -> None:
        rows = slice(offset, offset + size)
        try:
            for _ in range(100):
                got = model.run({"image": sample_inputs[rows]})["logits"]
                if got.shape != (size, 4) or not np.allclose(got, expected[rows], atol=1e-5, rtol=0):
                    errors.append(f"rows {offset}..{offset + size} came back wrong")
                    return
        except Exception as e:  # an interpreter used by two threads at once raises, too
            errors.append(f"rows {offset}..{offset + size}: {e!r}")

    threads = [threading.Thread(target=worker, args=(8 * i, i + 1)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so unguarded runs would interleave
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    model.close()
    assert errors == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_tflite_is_an_engine_error(
    engine_profile: HardwareProfile, zoo: Path, tmp_path: Path, damage: str
) -> None:
    folder = Path(shutil.copytree(zoo / "tflite-v1", tmp_path / "pkg"))
    manifest = load_manifest(folder)
    path = folder / manifest.model_file
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x00not a flatbuffer" * 64, "truncated": data[:4096], "empty": b""}[damage]
    )
    with pytest.raises(EngineError, match=r"LiteRT could not load model\.tflite"):
        LiteRTBackend().load(path, manifest, engine_profile)
    with pytest.raises(NoBackendAvailable, match="litert: load failed"):
        Engine(engine_profile, backends=[LiteRTBackend()]).prepare(folder, manifest)


def test_manifest_names_that_the_model_lacks_are_refused(
    engine_profile: HardwareProfile, zoo: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(zoo / "tflite-v1", tmp_path / "pkg"))
    fields = json.loads((folder / "manifest.json").read_text())
    fields["inputs"][0]["name"] = "pixels"
    del fields["files"]
    manifest = write_manifest(folder, fields, ["model.tflite", "golden.npz"])
    with pytest.raises(EngineError, match="Fix the manifest's tensor names"):
        LiteRTBackend().load(folder / manifest.model_file, manifest, engine_profile)


def test_unavailable_for_other_formats_and_without_a_runtime(
    engine_profile: HardwareProfile, zoo: Path
) -> None:
    backend = LiteRTBackend()
    tflite, onnx = load_manifest(zoo / "tflite-v1"), load_manifest(zoo / "v1")
    assert backend.unavailable_reason(engine_profile, tflite) is None
    assert backend.unavailable_reason(engine_profile, onnx) == "runs .tflite models only, this one is onnx"
    bare = dataclasses.replace(engine_profile, runtimes={"onnxruntime": True})
    assert "pip install ai-edge-litert" in (backend.unavailable_reason(bare, tflite) or "")
    older = dataclasses.replace(engine_profile, runtimes={"tflite_runtime": True})
    assert backend.unavailable_reason(older, tflite) is None


def test_falls_back_to_tflite_runtime_where_ai_edge_litert_is_missing(
    engine_profile: HardwareProfile, zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tflite-runtime (numpy 1 only) cannot share this venv, so its module path is served by the same
    # real Interpreter class: what is tested is that the backend finds and uses that path.
    from ai_edge_litert.interpreter import Interpreter

    shim = types.ModuleType("tflite_runtime.interpreter")
    shim.Interpreter = Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", shim)
    folder = zoo / "tflite-v1"
    profile = dataclasses.replace(engine_profile, runtimes={"tflite_runtime": True})
    serving = Engine(profile, backends=[LiteRTBackend()]).prepare(folder, load_manifest(folder))
    serving.model.close()
    assert serving.backend == "litert" and serving.golden_p95_ms is not None

    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    manifest = load_manifest(folder)
    with pytest.raises(EngineError, match="pip install ai-edge-litert"):
        LiteRTBackend().load(folder / manifest.model_file, manifest, profile)


def test_engine_picks_litert_for_a_tflite_package(engine: Engine, zoo: Path) -> None:
    folder = zoo / "tflite-v2"
    serving = engine.prepare(folder, load_manifest(folder))  # the default registry for this machine
    engine.serve(serving)
    assert serving.backend == "litert"
    out = engine.run("surface-defect-tflite", {"image": np.zeros((3, 3, 64, 64), np.float32)})
    assert out["logits"].shape == (3, 4) and serving.stats.inferences == 3
    engine.close()


def test_onnxruntime_first_still_passes_a_tflite_package_to_litert(
    engine_profile: HardwareProfile, zoo: Path
) -> None:
    folder = zoo / "tflite-v1"
    backends: list[Backend] = [OnnxRuntimeBackend("CPUExecutionProvider"), LiteRTBackend()]
    serving = Engine(engine_profile, backends=backends).prepare(folder, load_manifest(folder))
    serving.model.close()
    assert serving.backend == "litert"
    assert serving.passed_over == {"onnxruntime-cpu": "runs ONNX models only, this one is tflite"}
