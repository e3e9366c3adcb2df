"""Static int8 (QDQ) quantization of the sample model with ONNX Runtime's tools, and its accuracy check.

Dev-only (needs onnx and onnxruntime, the [dev] and [device] extras); `build_packages` calls it.
The result is deterministic for a given model, calibration set and onnxruntime version: MinMax
calibration has no randomness, and the quantizer writes no timestamps.

Settings, as measured on the sample CNN (held-out set of 1,000 images, numbers in the zoo README):
- QDQ format: the graph keeps float inputs and outputs, so a device swaps the file and nothing else,
  and ONNX Runtime fuses each DequantizeLinear -> Conv -> QuantizeLinear into an int8 convolution.
- per-channel weights with `reduce_range` (7-bit weights): on an AVX2 CPU without VNNI the u8 x s8
  multiply-adds accumulate pairs in int16 and saturate with full 8-bit weights; per-channel without
  it agreed with fp32 on only ~91% of held-out images, with it on 99.8-99.9%.
- uint8 activations, int8 weights (ONNX Runtime's recommended pairing on x86 and ARM).
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

CALIBRATION_BATCH = 8
SETTINGS: dict[str, Any] = {
    "quant_format": "QDQ",
    "per_channel": True,
    "reduce_range": True,
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "calibrate_method": "MinMax",
}


class _Batches(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type stubs
    """Feeds the calibration inputs to the quantizer a few rows at a time."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        rows = len(next(iter(inputs.values())))
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [
                {k: v[i : i + CALIBRATION_BATCH] for k, v in inputs.items()}
                for i in range(0, rows, CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    """Write the static QDQ int8 version of `model` to `out`, calibrated on `calibration` (name -> rows)."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        # The quantizer writes an augmented copy of the model next to its output; keep it out of the zoo.
        staged = Path(tmp) / out.name
        quantize_static(
            str(model),
            str(staged),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=SETTINGS["per_channel"],
            reduce_range=SETTINGS["reduce_range"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        out.write_bytes(staged.read_bytes())


def _session(model: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def logits(model: Path, inputs: np.ndarray, input_name: str = "image", chunk: int = 100) -> np.ndarray:
    """The model's first output on `inputs`, run `chunk` rows at a time on ONNX Runtime's CPU provider."""
    session = _session(model)
    parts = [session.run(None, {input_name: inputs[i : i + chunk]})[0] for i in range(0, len(inputs), chunk)]
    return np.concatenate(parts)


def compare(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of both, their top-1 agreement and logit differences, on one labelled set."""
    diff = np.abs(fp32.astype(np.float64) - int8).max(axis=1)
    return {
        "images": len(labels),
        "accuracy_fp32": float((fp32.argmax(1) == labels).mean()),
        "accuracy_int8": float((int8.argmax(1) == labels).mean()),
        "top1_agreement": float((fp32.argmax(1) == int8.argmax(1)).mean()),
        "max_abs_logit_diff": float(diff.max()),
        "p99_abs_logit_diff": float(np.quantile(diff, 0.99)),
    }
