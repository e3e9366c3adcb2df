from pathlib import Path

import numpy as np
import pytest

from device.engine.batcher import BatchConfig
from device.engine.engine import Engine
from device.errors import GoldenTestFailed, InferenceInputError, NoBackendAvailable
from models.manifest import load_manifest
from models.package import write_manifest


def test_loads_and_proves_the_sample_model(engine: Engine, zoo: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    assert serving.backend == "onnxruntime-cpu"
    assert "onnxruntime-tensorrt" in serving.passed_over
    assert serving.golden_p95_ms is not None and serving.golden_p95_ms < serving.manifest.latency_budget_ms
    engine.serve(serving)
    out = engine.run("surface-defect", {"image": np.zeros((2, 3, 64, 64), np.float32)})
    assert out["logits"].shape == (2, 4)
    assert serving.stats.inferences == 2


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"img": np.zeros((1, 3, 64, 64), np.float32)}, "inputs must be exactly"),
        ({"image": np.zeros((1, 3, 32, 32), np.float32)}, "shape"),
        ({"image": np.zeros((1, 3, 64, 64), np.float64)}, "float32"),
    ],
)
def test_wrong_inputs_are_the_callers_fault(
    engine: Engine, zoo: Path, inputs: dict[str, np.ndarray], message: str
) -> None:
    engine.serve(engine.prepare(zoo / "v1", load_manifest(zoo / "v1")))
    with pytest.raises(InferenceInputError, match=message):
        engine.run("surface-defect", inputs)
    assert engine.get("surface-defect").stats.errors == 0


def test_corrupt_model_file_names_every_backend(engine: Engine, package_copy: Path) -> None:
    (package_copy / "model.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(NoBackendAvailable, match="onnxruntime-cpu: load failed"):
        engine.prepare(package_copy, load_manifest(package_copy))


def test_golden_mismatch_is_refused(engine: Engine, package_copy: Path) -> None:
    manifest = load_manifest(package_copy)
    with np.load(package_copy / "golden.npz") as golden:
        arrays = {k: golden[k] for k in golden.files}
    arrays["output.logits"] = arrays["output.logits"] + 1.0
    np.savez(package_copy / "golden.npz", **arrays)
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"files"})
    write_manifest(package_copy, fields, list(manifest.files))
    with pytest.raises(GoldenTestFailed, match="differs"):
        engine.prepare(package_copy, load_manifest(package_copy))


def test_latency_budget_is_enforced(engine: Engine, package_copy: Path) -> None:
    manifest = load_manifest(package_copy)
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"files"})
    write_manifest(package_copy, {**fields, "latency_budget_ms": 1e-6}, list(manifest.files))
    with pytest.raises(GoldenTestFailed, match="budget"):
        engine.prepare(package_copy, load_manifest(package_copy))


def test_a_strided_view_gives_the_same_outputs_as_a_copy(engine: Engine, zoo: Path) -> None:
    engine.serve(engine.prepare(zoo / "v1", load_manifest(zoo / "v1")))
    base = np.random.default_rng(5).normal(size=(2, 64, 64, 3)).astype(np.float32)
    view = base.transpose(0, 3, 1, 2)  # NHWC memory read as NCHW: not C-contiguous
    assert not view.flags.c_contiguous
    got = engine.run("surface-defect", {"image": view})["logits"]
    want = engine.run("surface-defect", {"image": np.ascontiguousarray(view)})["logits"]
    np.testing.assert_array_equal(got, want)


def test_api_requests_go_through_a_bounded_queue_by_default(engine: Engine, zoo: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    engine.serve(serving)
    assert serving.batchable  # dim 0 is -1 on its input and output
    out = engine.submit(serving, {"image": np.zeros((2, 3, 64, 64), np.float32)}).result(30)
    assert out["logits"].shape == (2, 4)
    stats = engine.batcher_stats("surface-defect")
    assert (stats["max_batch"], stats["max_queue"], stats["batches"]) == (1, 32, 1)
    # Not grouped, but two calls in flight where ONNX Runtime has two threads or more to fill
    assert stats["workers"] == serving.model.calls_in_flight == (2 if engine.profile.cpu_count >= 2 else 1)
    engine.close()


def test_configured_batching_replaces_the_default(engine: Engine, zoo: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    engine.serve(serving)
    engine.configure_batching("surface-defect", BatchConfig(max_batch=1, workers=1))
    engine.submit(serving, {"image": np.zeros((1, 3, 64, 64), np.float32)}).result(30)
    assert engine.batcher_stats("surface-defect")["workers"] == 1
    engine.close()
