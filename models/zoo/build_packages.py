"""Turn the trained ONNX files into model packages: golden vectors, calibration set, int8 variant, manifest.

Run after training: `python -m models.zoo.build_packages`. Needs onnxruntime (the [device] extra) and
onnx (the [dev] extra, for the quantizer), not torch. The golden outputs are what ONNX Runtime on the
CPU computed for fixed inputs; every backend on every device must reproduce them within the tolerance
before the model is used. They are kept when they exist (recomputing them on another CPU or
onnxruntime would move them by float noise); `--refresh-golden` recomputes them.

Each package also gets `calibration.npz` (64 sample images, the same in every version, so a delta
carries it for free) and `model.int8.onnx`, the static QDQ int8 variant quantized on it
(models/zoo/quantize.py). A device serves the variant only after it agrees with fp32 on the golden
and calibration inputs and is faster there (device/engine/precision.py).

And the TVM records committed under `surface_defect/tvm/<model sha256>/<target key>/` for its
model.onnx ship in it (manifest `tvm_records`, ~85 KB per target), so a rollout carries them and a
device of that CPU never tunes. Their tuning.json holds TVM's comparison with ONNX Runtime there;
where TVM was slower (x86_64-znver3 here), devices keep ONNX Runtime (device/engine/registry.py).
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.manifest import Manifest
from models.package import hash_file, write_manifest
from models.tvm_tuning import copy_records_into
from models.zoo.quantize import SETTINGS, compare, logits, quantize_int8
from models.zoo.surface_data import CLASSES, MEAN, SIZE, STD, make_dataset, to_input

ROOT = Path(__file__).resolve().parent / "surface_defect"
REPORT = ROOT / "int8_report.json"
TVM_RECORDS = ROOT / "tvm"  # records root: <model sha256>/<target key>/
GOLDEN_COUNT = 8
GOLDEN_SEED = 4242
# Seeds apart from training (1, 2), the held-out test set (99) and the golden vectors (4242).
CALIBRATION_COUNT = 64
CALIBRATION_SEED = 4343
TEST = {"n": 1000, "seed": 99, "difficulty": 1.0}  # train_surface.TEST: the held-out set
INT8_FILE = "model.int8.onnx"
CALIBRATION_FILE = "calibration.npz"
# Top-1 agreement with fp32 a device demands before serving int8 (measured: 99.8-100% held out).
MIN_AGREEMENT = 0.98
DESCRIPTIONS = {
    1: "Surface-defect classifier trained on 4,000 synthetic images.",
    2: "v1 fine-tuned on 4,000 more synthetic images, including harder ones.",
}


def write_golden(folder: Path) -> None:
    images, _ = make_dataset(GOLDEN_COUNT, seed=GOLDEN_SEED)
    inputs = to_input(images)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"image": inputs})
    np.savez(folder / "golden.npz", **{"input.image": inputs, "output.logits": out})


def calibration_inputs() -> np.ndarray:
    images, _ = make_dataset(CALIBRATION_COUNT, seed=CALIBRATION_SEED)
    return to_input(images)


def build(folder: Path, version: int, refresh_golden: bool = False) -> Manifest:
    if refresh_golden or not (folder / "golden.npz").exists():
        write_golden(folder)
    calibration = calibration_inputs()
    # Compressed: normalised 8-bit pixels take 256 distinct values, so the set shrinks from 3.1 MB to ~0.7 MB.
    arrays: dict[str, Any] = {"input.image": calibration}  # Any: numpy's stub reads ** as its flags
    np.savez_compressed(folder / CALIBRATION_FILE, **arrays)
    quantize_int8(folder / "model.onnx", {"image": calibration}, folder / INT8_FILE)
    fields = {
        "schema": "edgefleet.model/1",
        "name": "surface-defect",
        "version": version,
        "format": "onnx",
        "model_file": "model.onnx",
        "description": DESCRIPTIONS[version],
        "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 3, SIZE, SIZE]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, len(CLASSES)]}],
        "preprocessing": {
            "resize": [SIZE, SIZE],
            "color": "RGB",
            "layout": "NCHW",
            "scale": 1 / 255,
            "mean": list(MEAN),
            "std": list(STD),
        },
        "labels": list(CLASSES),
        "golden": {"file": "golden.npz", "atol": 1e-3, "rtol": 1e-3},
        "latency_budget_ms": 250.0,
        "calibration": {"file": CALIBRATION_FILE, "samples": CALIBRATION_COUNT},
        "variants": [
            {
                "file": INT8_FILE,
                "format": "onnx",
                "precision": "int8",
                "target": "cpu",
                "source_sha256": hash_file(folder / "model.onnx").sha256,
            }
        ],
        "precision": {"prefer": "int8", "min_agreement": MIN_AGREEMENT},
        "tvm_records": copy_records_into(folder, "model.onnx", [TVM_RECORDS]),
    }
    return write_manifest(folder, fields, ["model.onnx", "golden.npz"])


def accuracy_report(folders: dict[int, Path]) -> dict[str, Any]:
    """fp32 vs int8 on the held-out test set and on the inputs a device compares on."""
    images, labels = make_dataset(**TEST)  # type: ignore[arg-type]
    test = to_input(images)
    report: dict[str, Any] = {
        "quantization": SETTINGS,
        "calibration": {"images": CALIBRATION_COUNT, "seed": CALIBRATION_SEED},
        "test_set": TEST,
        "onnxruntime": ort.__version__,
    }
    for version, folder in folders.items():
        fp32, int8 = folder / "model.onnx", folder / INT8_FILE
        with np.load(folder / "golden.npz") as golden:
            device_inputs = np.concatenate([golden["input.image"], calibration_inputs()])
        fp32_out, int8_out = logits(fp32, device_inputs), logits(int8, device_inputs)
        report[f"v{version}"] = {
            "held_out": compare(logits(fp32, test), logits(int8, test), labels),
            "golden_plus_calibration": {
                "images": len(device_inputs),
                "top1_agreement": float((fp32_out.argmax(1) == int8_out.argmax(1)).mean()),
                "max_abs_logit_diff": float(np.abs(fp32_out.astype(np.float64) - int8_out).max()),
            },
            "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="build the sample model packages")
    parser.add_argument("--refresh-golden", action="store_true", help="recompute golden.npz")
    args = parser.parse_args(argv)
    folders = {version: ROOT / f"v{version}" for version in (1, 2)}
    for version, folder in folders.items():
        manifest = build(folder, version, args.refresh_golden)
        print(f"built {manifest.name} v{manifest.version}: {sorted(manifest.files)}")
    report = accuracy_report(folders)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    for version in folders:
        print(f"v{version}: {json.dumps(report[f'v{version}']['held_out'])}")


if __name__ == "__main__":
    main()
