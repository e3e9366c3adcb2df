"""Convert the sample surface-defect models to .tflite packages for the LiteRT backend.

Dev-only tool. The trained weights exist only in the committed ONNX files (train_surface.py keeps no
torch checkpoint), so this script rebuilds the exported graph as a torch module, fills it with the
ONNX initializers, checks it against ONNX Runtime, and converts it with litert-torch. It refuses an
ONNX graph whose operators differ from the architecture it knows, so it never converts a guess.

Its dependencies conflict with the project venv (litert-torch pins its own stack), so it runs from
its own venv. From the repository root:

    python3 -m venv /tmp/litert-convert-venv
    /tmp/litert-convert-venv/bin/pip install torch==2.13.0 litert-torch==0.10.0 \\
        onnx==1.23.2 onnxruntime==1.32.0          # torch pinned: the CPU build on the dev machines' disk
    /tmp/litert-convert-venv/bin/python -m models.zoo.convert_tflite

Writes models/zoo/surface_defect/tflite-v{1,2}/ (manifest.json, model.tflite, golden.npz).

The folders are not named `v1-tflite`: the demo packs every `surface_defect/v*` folder as a version
of `surface-defect`, and these are a separate model (`surface-defect-tflite`) because the fleet
registry keys versions by (name, version) and cannot hold two formats of one version.

Layout: the .tflite keeps the ONNX model's NCHW float32 input `image` [-1, 3, 64, 64] and output
`logits` [-1, 4] (litert-torch inserts the NHWC transposes inside the graph), so the engine feeds
both formats the same tensor. The golden vectors are the ONNX package's (ONNX Runtime's outputs), so
the LiteRT golden check is also a cross-runtime parity check.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from models.manifest import Manifest, ModelFormat
from models.package import verify_package, write_manifest

ROOT = Path(__file__).resolve().parent / "surface_defect"
NAME = "surface-defect-tflite"
CHANNELS = (3, 24, 48, 96, 128)
# The operator sequence torch.onnx.export produced for SurfaceNet (BatchNorm folded into the convs).
EXPECTED_OPS = ["Conv", "Relu", "MaxPool"] * 3 + ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
# torch (same weights, same graph) against ONNX Runtime: only float summation order differs.
TORCH_VS_ONNX_ATOL = 1e-4


def onnx_weights(onnx_path: Path) -> dict[str, np.ndarray]:
    """The initializers of a SurfaceNet ONNX export, after checking its graph is that architecture."""
    model = onnx.load(str(onnx_path))
    ops = [node.op_type for node in model.graph.node]
    if ops != EXPECTED_OPS:
        raise SystemExit(
            f"{onnx_path}: operators {ops} are not the SurfaceNet export this script knows; "
            "update FoldedSurfaceNet and EXPECTED_OPS together"
        )
    return {init.name: numpy_helper.to_array(init).copy() for init in model.graph.initializer}


def folded_surface_net(weights: dict[str, np.ndarray]) -> Any:
    """SurfaceNet as exported: conv(+folded BN bias)-ReLU blocks, max-pools, mean, linear.

    The input is named `image` and the output is a dict with `logits`, so litert-torch gives the
    .tflite signature the same tensor names as the ONNX model.
    """
    import torch
    from torch import nn

    class FoldedSurfaceNet(nn.Module):  # type: ignore[misc,unused-ignore]  # torch is untyped here
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(CHANNELS[i], CHANNELS[i + 1], kernel_size=3, padding=1) for i in range(4)
            )
            self.head = nn.Linear(CHANNELS[-1], len(weights["head.bias"]))

        def forward(self, image: Any) -> dict[str, Any]:
            x = image
            for i, conv in enumerate(self.convs):
                x = torch.relu(conv(x))
                if i < 3:
                    x = nn.functional.max_pool2d(x, 2)
            # A mean over H, W rather than pool + flatten: no reshape to a fixed batch in the graph.
            return {"logits": self.head(x.mean(dim=(2, 3)))}

    net = FoldedSurfaceNet().eval()
    state = {f"convs.{i}.{part}": weights[f"conv{i}.{part}"] for i in range(4) for part in ("weight", "bias")}
    state |= {"head.weight": weights["head.weight"], "head.bias": weights["head.bias"]}
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return net


def convert(onnx_path: Path, out: Path, golden_inputs: np.ndarray) -> None:
    """Write `out` (.tflite, dynamic batch) from the ONNX model, after a torch-vs-ONNX Runtime check."""
    import litert_torch
    import onnxruntime as ort
    import torch

    net = folded_surface_net(onnx_weights(onnx_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (want,) = session.run(["logits"], {"image": golden_inputs})
    with torch.no_grad():
        got = net(image=torch.from_numpy(golden_inputs))["logits"].numpy()
    worst = float(np.abs(got - want).max())
    if worst > TORCH_VS_ONNX_ATOL:
        raise SystemExit(f"rebuilt torch model differs from {onnx_path} by {worst:.3g}; not converting")
    batch = torch.export.Dim("batch", min=1, max=4096)
    edge_model = litert_torch.convert(
        net,
        sample_kwargs={"image": torch.from_numpy(golden_inputs)},
        dynamic_shapes={"image": {0: batch}},
    )
    edge_model.export(str(out))


def check_tflite(path: Path, golden: dict[str, np.ndarray], atol: float, rtol: float) -> float:
    """Run the .tflite on the golden inputs with the LiteRT interpreter; return the worst difference."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    got = runner(image=golden["input.image"])["logits"]
    want = golden["output.logits"]
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=rtol):
        raise SystemExit(f"{path}: LiteRT outputs do not match the ONNX golden vectors; not writing")
    return float(np.abs(got - want).max())


def build(version: int) -> Manifest:
    """Convert `surface_defect/v<version>` into `surface_defect/tflite-v<version>`."""
    source = ROOT / f"v{version}"
    source_manifest = verify_package(source)
    if source_manifest.golden is None:
        raise SystemExit(f"{source} has no golden vectors; run models.zoo.build_packages first")
    with np.load(source / source_manifest.golden.file, allow_pickle=False) as data:
        golden = {key: data[key] for key in data.files}

    dest = ROOT / f"tflite-v{version}"
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        staging = Path(tmp)
        convert(source / source_manifest.model_file, staging / "model.tflite", golden["input.image"])
        worst = check_tflite(
            staging / "model.tflite", golden, source_manifest.golden.atol, source_manifest.golden.rtol
        )
        shutil.copyfile(source / source_manifest.golden.file, staging / "golden.npz")
        fields = json.loads(source_manifest.to_json())
        del fields["files"]
        fields |= {
            "name": NAME,
            "format": ModelFormat.TFLITE.value,
            "model_file": "model.tflite",
            "description": (
                f"{source_manifest.description} LiteRT (.tflite) conversion of surface-defect "
                f"v{version}'s model.onnx (sha256 {source_manifest.files['model.onnx'].sha256[:16]}...)."
            ),
        }
        manifest = write_manifest(staging, fields, ["model.tflite", "golden.npz"])
        # Swap the finished folder in whole, so an interrupted run never leaves a half package.
        staging.chmod(0o755)  # mkdtemp makes it 0700; a package folder is readable like the others
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        staging.mkdir()  # TemporaryDirectory wants something to remove
    print(f"built {manifest.name} v{manifest.version} in {dest.name}/: golden max |diff| {worst:.2e}")
    return manifest


def main() -> None:
    for version in (1, 2):
        build(version)


if __name__ == "__main__":
    main()
