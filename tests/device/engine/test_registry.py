"""The backend order per machine profile, and selection with real backends and the sample model."""

import dataclasses
from pathlib import Path

import pytest

from device.engine import registry
from device.engine.probe import HardwareProfile, probe
from device.engine.registry import (
    UnavailableBackend,
    backend_order,
    build_backend,
    default_backends,
    left_out,
    select_and_load,
)
from device.errors import EngineError, NoBackendAvailable
from models.manifest import Manifest, load_manifest

FIXTURES = Path(__file__).parent / "fixtures"
NVIDIA_ORDER = ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "tvm", "litert", "onnxruntime-cpu"]
CPU_ORDER = ["tvm", "litert", "onnxruntime-cpu"]


def machine(name: str, **runtimes: bool) -> HardwareProfile:
    """A recorded machine's profile; `runtimes` overrides what this Python can import."""
    profile = probe(FIXTURES / name)
    return dataclasses.replace(profile, runtimes={**profile.runtimes, **runtimes})


@pytest.fixture
def manifest(zoo: Path) -> Manifest:
    return load_manifest(zoo / "v1")


@pytest.mark.parametrize(
    ("name", "order"),
    [
        ("orin_agx", NVIDIA_ORDER),
        ("xavier_nx", NVIDIA_ORDER),
        ("x86_gpu", NVIDIA_ORDER),
        ("rpi5", CPU_ORDER),
        ("x86_cpu", CPU_ORDER),
    ],
)
def test_backend_order_per_machine(name: str, order: list[str]) -> None:
    profile = machine(name)
    assert backend_order(profile) == order
    assert backend_order(profile)[-1] == "onnxruntime-cpu"
    assert [b.name for b in default_backends(profile)] == order


def test_machines_without_nvidia_say_why_the_gpu_backends_are_not_tried() -> None:
    reasons = left_out(machine("rpi5"))
    assert set(reasons) == {"tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda"}
    assert all("no NVIDIA GPU" in why for why in reasons.values())
    assert "CUDAExecutionProvider is not in this onnxruntime build" in reasons["onnxruntime-cuda"]
    assert left_out(machine("orin_agx")) == {}


def test_this_machine_runs_the_sample_on_onnxruntime_cpu(zoo: Path, manifest: Manifest) -> None:
    profile = probe()
    selection = select_and_load(zoo / "v1" / manifest.model_file, manifest, profile)
    try:
        assert selection.backend == "onnxruntime-cpu"
        expected = set(registry.ALL_BACKENDS) - {"onnxruntime-cpu"}
        assert set(selection.passed_over) == expected
    finally:
        selection.model.close()


def test_on_a_jetson_every_earlier_backend_says_why(zoo: Path, manifest: Manifest) -> None:
    """The Orin's order, run here: each GPU backend reaches its own check and records why it passed."""
    profile = machine("orin_agx", tensorrt=False)
    selection = select_and_load(zoo / "v1" / manifest.model_file, manifest, profile)
    try:
        assert selection.backend == "onnxruntime-cpu"
        assert list(selection.passed_over)[:3] == ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda"]
        assert "tensorrt Python package is not installed" in selection.passed_over["tensorrt"]
        assert "not in this onnxruntime build" in selection.passed_over["onnxruntime-tensorrt"]
    finally:
        selection.model.close()


def test_a_xavier_on_jetpack_4_passes_tensorrt_over_for_its_version(zoo: Path, manifest: Manifest) -> None:
    profile = machine("xavier_nx", tensorrt=True, **{"cuda-python": True})
    selection = select_and_load(zoo / "v1" / manifest.model_file, manifest, profile)
    try:
        assert "TensorRT 8.2.1.8 is too old" in selection.passed_over["tensorrt"]
    finally:
        selection.model.close()


def test_a_pin_passes_over_every_other_backend(zoo: Path, manifest: Manifest) -> None:
    selection = select_and_load(zoo / "v1" / "model.onnx", manifest, probe(), pinned="onnxruntime-cpu")
    try:
        assert selection.backend == "onnxruntime-cpu"
        assert selection.passed_over["tvm"] == "configuration pins onnxruntime-cpu"
        assert selection.passed_over["tensorrt"].startswith("not tried")  # still says why it was left out
    finally:
        selection.model.close()


def test_a_pin_to_a_left_out_backend_tries_it(zoo: Path, manifest: Manifest) -> None:
    """The operator may know of a GPU the probe cannot see; the backend's own check then decides."""
    with pytest.raises(NoBackendAvailable) as caught:
        select_and_load(zoo / "v1" / "model.onnx", manifest, machine("x86_cpu"), pinned="onnxruntime-cuda")
    assert (
        caught.value.reasons["onnxruntime-cuda"] == "CUDAExecutionProvider is not in this onnxruntime build"
    )
    assert caught.value.reasons["onnxruntime-cpu"] == "configuration pins onnxruntime-cuda"


def test_a_pin_to_no_known_backend_is_refused(zoo: Path, manifest: Manifest) -> None:
    with pytest.raises(NoBackendAvailable, match="use one of tensorrt, "):
        select_and_load(zoo / "v1" / "model.onnx", manifest, probe(), pinned="openvino")


def test_a_backend_module_that_fails_to_import_is_a_reason(
    zoo: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        registry.FACTORIES, "tvm", ("device.engine.backends.no_such_backend", "TvmBackend", ())
    )
    selection = select_and_load(zoo / "v1" / "model.onnx", manifest, probe())
    try:
        assert selection.backend == "onnxruntime-cpu"
        assert "no_such_backend failed to import: ModuleNotFoundError" in selection.passed_over["tvm"]
    finally:
        selection.model.close()


def test_build_backend(manifest: Manifest) -> None:
    broken = build_backend("tvm", {"tvm": ("device.engine.backends.no_such_backend", "TvmBackend", ())})
    assert isinstance(broken, UnavailableBackend) and broken.name == "tvm"
    with pytest.raises(EngineError, match="cannot load"):
        broken.load(Path("x.onnx"), manifest, probe())
    with pytest.raises(EngineError, match="no backend is named 'openvino'"):
        build_backend("openvino")
    assert build_backend("onnxruntime-cuda").name == "onnxruntime-cuda"


def test_tvm_is_never_picked_for_a_model_without_tuned_schedules(zoo: Path, manifest: Manifest) -> None:
    backend = build_backend("tvm")
    if isinstance(backend, UnavailableBackend):
        pytest.skip(f"the TVM backend is not here: {backend.reason}")
    profile = dataclasses.replace(probe(), runtimes={**probe().runtimes, "tvm": True})
    with pytest.raises(NoBackendAvailable) as caught:
        select_and_load(zoo / "v1" / "model.onnx", manifest, profile, pinned="tvm")
    assert "tvm" in caught.value.reasons
