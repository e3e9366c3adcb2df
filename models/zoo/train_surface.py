"""Train the sample surface-defect models (v1 from scratch, v2 fine-tuned from v1) and export ONNX.

Dev-only tool: needs torch (CPU build), onnx and onnxruntime. Run from the repository root:

    python -m models.zoo.train_surface

Writes models/zoo/surface_defect/{v1,v2}/model.onnx and models/zoo/surface_defect/training_report.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from models.zoo.surface_data import CLASSES, MEAN, SIZE, STD, make_dataset, to_input

OUT_DIR = Path(__file__).resolve().parent / "surface_defect"
OPSET = 17

# Data set plan (sizes, seeds, difficulty); see surface_data.make_dataset.
V1_TRAIN = {"n": 4000, "seed": 1, "difficulty": 1.0}
V2_EXTRA = {"n": 4000, "seed": 2, "difficulty": 1.15}
TEST = {"n": 1000, "seed": 99, "difficulty": 1.0}
V1_EPOCHS, V1_LR = 18, 3e-3
V2_EPOCHS, V2_LR = 6, 5e-4
BATCH = 64


class SurfaceNet(nn.Module):
    """Four conv blocks (conv-BN-ReLU, max-pool), global average pool, linear to len(CLASSES)."""

    def __init__(self, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        chans = [3, 24, 48, 96, 128]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(chans[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations (the surface has no preferred orientation)."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(2)
    k = int(torch.randint(0, 4, (1,), generator=gen).item())
    return torch.rot90(x, k, dims=(2, 3)) if k else x


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, tag: str
) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    history = []
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = _augment(x[idx], gen), y[idx]
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        rec = {"epoch": epoch + 1, "loss": loss_sum / total, "train_acc": correct / total}
        history.append(rec)
        print(
            f"[{tag}] epoch {epoch + 1}/{epochs} loss {rec['loss']:.4f} "
            f"train_acc {rec['train_acc']:.4f} ({time.time() - t0:.1f}s)",
            flush=True,
        )
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])


def accuracy(pred: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    per_class = {name: float((pred[y == c] == c).mean()) for c, name in enumerate(CLASSES)}
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    for t, p in zip(y, pred, strict=True):
        confusion[t, p] += 1
    return {
        "overall": float((pred == y).mean()),
        "per_class": per_class,
        "confusion_rows_true_cols_pred": confusion.tolist(),
    }


def export(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    dummy = torch.zeros(1, 3, SIZE, SIZE)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        export_params=True,
        dynamo=False,
    )
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    # The exporter folds BatchNorm into the convs and names the folded tensors "onnx::Conv_NN";
    # give them stable, readable names (the same in every version of this architecture).
    renames: dict[str, str] = {}
    conv_i = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            for j, suffix in ((1, "weight"), (2, "bias")):
                if j < len(node.input) and node.input[j].startswith("onnx::"):
                    renames[node.input[j]] = f"conv{conv_i}.{suffix}"
            conv_i += 1
    for init in m.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in m.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    # Keep the file self-contained and free of exporter-version noise.
    m.producer_name = "edgefleet-train_surface"
    m.producer_version = torch.__version__
    m.doc_string = "edgefleet sample surface-defect classifier"
    onnx.checker.check_model(m)
    onnx.save_model(m, str(path), save_as_external_data=False)


def check_onnx(path: Path, model: nn.Module, x: torch.Tensor, y: np.ndarray) -> dict[str, Any]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xn = x.numpy()
    onnx_logits = np.concatenate(
        [sess.run(["logits"], {"image": xn[i : i + 256]})[0] for i in range(0, len(xn), 256)]
    )
    torch_logits = predict(model, x).numpy()
    m = onnx.load(str(path))
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    return {
        "max_abs_diff_vs_torch": float(np.abs(onnx_logits - torch_logits).max()),
        "argmax_agreement_vs_torch": float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "test_accuracy": accuracy(onnx_logits.argmax(1), y),
        "input": {"name": inp.name, "shape": [str(d) for d in inp.shape], "type": inp.type},
        "output": {"name": out.name, "shape": [str(d) for d in out.shape], "type": out.type},
        "initializers": sorted(t.name for t in m.graph.initializer),
        "opset": [{"domain": o.domain, "version": o.version} for o in m.opset_import],
    }


def file_info(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    print("making data ...", flush=True)
    x1_np, y1_np = make_dataset(**V1_TRAIN)  # type: ignore[arg-type]
    x2_np, y2_np = make_dataset(**V2_EXTRA)  # type: ignore[arg-type]
    xt_np, yt_np = make_dataset(**TEST)  # type: ignore[arg-type]
    x1, y1 = torch.from_numpy(to_input(x1_np)), torch.from_numpy(y1_np)
    x2, y2 = torch.from_numpy(to_input(x2_np)), torch.from_numpy(y2_np)
    xt = torch.from_numpy(to_input(xt_np))
    print(f"data ready ({time.time() - t_start:.1f}s)", flush=True)

    model = SurfaceNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}", flush=True)

    t0 = time.time()
    hist1 = train(model, x1, y1, V1_EPOCHS, V1_LR, seed=1, tag="v1")
    v1_train_s = time.time() - t0
    v1_state = {k: v.clone() for k, v in model.state_dict().items()}
    v1_acc = accuracy(predict(model, xt).argmax(1).numpy(), yt_np)
    print(f"v1 test acc {v1_acc['overall']:.4f} {v1_acc['per_class']}", flush=True)
    v1_path = args.out / "v1" / "model.onnx"
    export(model, v1_path)
    v1_onnx = check_onnx(v1_path, model, xt, yt_np)

    # v2: fine-tune from v1's weights on v1's data plus new, slightly harder field data.
    x12, y12 = torch.cat([x1, x2]), torch.cat([y1, y2])
    t0 = time.time()
    hist2 = train(model, x12, y12, V2_EPOCHS, V2_LR, seed=2, tag="v2")
    v2_train_s = time.time() - t0
    v2_acc = accuracy(predict(model, xt).argmax(1).numpy(), yt_np)
    print(f"v2 test acc {v2_acc['overall']:.4f} {v2_acc['per_class']}", flush=True)
    v2_path = args.out / "v2" / "model.onnx"
    export(model, v2_path)
    v2_onnx = check_onnx(v2_path, model, xt, yt_np)

    v2_state = model.state_dict()
    rel_change = {
        k: float((v2_state[k].float() - v).norm() / (v.float().norm() + 1e-12))
        for k, v in v1_state.items()
        if v.is_floating_point()
    }
    same_names = v1_onnx["initializers"] == v2_onnx["initializers"]

    report = {
        "model": "surface_defect",
        "classes": list(CLASSES),
        "input": {
            "name": "image",
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", 3, SIZE, SIZE],
            "color": "RGB",
            "normalisation": "(pixel / 255 - mean) / std, per channel",
            "mean": list(MEAN),
            "std": list(STD),
        },
        "output": {
            "name": "logits",
            "dtype": "float32",
            "shape": ["batch", len(CLASSES)],
            "note": "raw logits; softmax for probabilities; argmax indexes classes",
        },
        "architecture": "SurfaceNet: 4x(conv3x3-BN-ReLU) with 3 max-pools, global avg pool, linear",
        "parameters": n_params,
        "data": {
            "generator": "models/zoo/surface_data.py make_dataset(n, seed, difficulty)",
            "v1_train": V1_TRAIN,
            "v2_train": {"v1_train": V1_TRAIN, "extra": V2_EXTRA, "n_total": len(x12)},
            "test": TEST,
            "augmentation": "random horizontal/vertical flips and 90-degree rotations",
        },
        "training": {
            "optimizer": "AdamW(weight_decay=1e-4), OneCycleLR, CrossEntropy(label_smoothing=0.05)",
            "batch_size": BATCH,
            "threads": args.threads,
            "v1": {
                "from": "scratch",
                "epochs": V1_EPOCHS,
                "max_lr": V1_LR,
                "train_seconds": round(v1_train_s, 1),
                "history": hist1,
            },
            "v2": {
                "from": "v1",
                "epochs": V2_EPOCHS,
                "max_lr": V2_LR,
                "train_seconds": round(v2_train_s, 1),
                "history": hist2,
                "weight_change_rel_l2": {
                    "min": min(rel_change.values()),
                    "max": max(rel_change.values()),
                    "tensors_changed": sum(c > 0 for c in rel_change.values()),
                    "tensors_total": len(rel_change),
                },
            },
        },
        "results": {
            "v1": {
                "test_torch": v1_acc,
                "onnx": {k: v for k, v in v1_onnx.items() if k != "initializers"},
                "file": {"path": "surface_defect/v1/model.onnx", **file_info(v1_path)},
            },
            "v2": {
                "test_torch": v2_acc,
                "onnx": {k: v for k, v in v2_onnx.items() if k != "initializers"},
                "file": {"path": "surface_defect/v2/model.onnx", **file_info(v2_path)},
            },
        },
        "onnx": {
            "opset": OPSET,
            "exporter": "torch.onnx.export(dynamo=False)",
            "external_data": False,
            "dynamic_axes": {"image": {"0": "batch"}, "logits": {"0": "batch"}},
            "initializer_names_identical_v1_v2": same_names,
            "initializer_count": len(v2_onnx["initializers"]),
        },
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "total_seconds": round(time.time() - t_start, 1),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report["results"][k]["onnx"]["test_accuracy"]["overall"] for k in ("v1", "v2")}))
    print(f"done in {time.time() - t_start:.1f}s; initializer names identical: {same_names}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
