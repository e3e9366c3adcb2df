"""Turn the trained ONNX files into model packages: manifest, golden vectors, file hashes.

Run after training: `python -m models.zoo.build_packages`. Needs onnxruntime (the [device] extra),
not torch. The golden outputs are what ONNX Runtime on the CPU computes for fixed inputs; every
backend on every device must reproduce them within the tolerance before the model is used.
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.manifest import Manifest
from models.package import write_manifest
from models.zoo.surface_data import CLASSES, MEAN, SIZE, STD, make_dataset, to_input

ROOT = Path(__file__).resolve().parent / "surface_defect"
GOLDEN_COUNT = 8
GOLDEN_SEED = 4242
DESCRIPTIONS = {
    1: "Surface-defect classifier trained on 4,000 synthetic images.",
    2: "v1 fine-tuned on 4,000 more synthetic images, including harder ones.",
}


def build(folder: Path, version: int) -> Manifest:
    images, _ = make_dataset(GOLDEN_COUNT, seed=GOLDEN_SEED)
    inputs = to_input(images)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": inputs})
    np.savez(folder / "golden.npz", **{"input.image": inputs, "output.logits": logits})
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
    }
    return write_manifest(folder, fields, ["model.onnx", "golden.npz"])


def main() -> None:
    for version in (1, 2):
        manifest = build(ROOT / f"v{version}", version)
        print(f"built {manifest.name} v{manifest.version}: {sorted(manifest.files)}")


if __name__ == "__main__":
    main()
