"""The sample packages' int8 variants and calibration sets are what models/zoo/build_packages.py makes."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.zoo import build_packages
from models.zoo.quantize import compare, logits
from models.zoo.surface_data import make_dataset, to_input

REPORT = json.loads(build_packages.REPORT.read_text())
SAME_RUNTIME = pytest.mark.skipif(
    ort.__version__ != REPORT["onnxruntime"],
    reason=f"the committed int8 files come from onnxruntime {REPORT['onnxruntime']}, not {ort.__version__}",
)


def test_the_calibration_set_is_the_documented_sample(zoo: Path) -> None:
    for version in ("v1", "v2"):
        with np.load(zoo / version / "calibration.npz") as data:
            assert data.files == ["input.image"]
            np.testing.assert_array_equal(data["input.image"], build_packages.calibration_inputs())


@SAME_RUNTIME
def test_rebuilding_a_package_gives_the_committed_bytes(tmp_path: Path, zoo: Path) -> None:
    """Deterministic, and it only adds files: model.onnx and golden.npz are kept as they are."""
    folder = tmp_path / "v1"
    folder.mkdir()
    for name in ("model.onnx", "golden.npz"):
        shutil.copy(zoo / "v1" / name, folder / name)
    build_packages.build(folder, 1)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (zoo / "v1").iterdir())
    for path in folder.iterdir():
        assert path.read_bytes() == (zoo / "v1" / path.name).read_bytes(), path.name


@SAME_RUNTIME
@pytest.mark.slow
def test_the_recorded_accuracy_change_is_reproduced(zoo: Path) -> None:
    images, labels = make_dataset(**build_packages.TEST)  # type: ignore[arg-type]
    test = to_input(images)
    result = compare(
        logits(zoo / "v1" / "model.onnx", test), logits(zoo / "v1" / "model.int8.onnx", test), labels
    )
    recorded = REPORT["v1"]["held_out"]
    for key in ("accuracy_fp32", "accuracy_int8", "top1_agreement"):
        assert result[key] == pytest.approx(recorded[key], abs=0.002), key
    assert abs(result["accuracy_fp32"] - result["accuracy_int8"]) <= 0.01, "int8 costs at most a point"
