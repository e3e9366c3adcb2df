"""LiteRT vs ONNX Runtime (CPU) on the sample surface-defect model, through the engine's own backends.

    .venv/bin/python bench/engine/bench_litert.py [--repeats 7] [--batches 1 8 32] [--threads 1 2]
                                                  [--json results.json]

Latency: for each batch size and thread count, each repeat times `calls` back-to-back runs of each
runtime (the runtimes alternate which goes first, so background load hits both alike) and keeps the
median call; the table gives the median over repeats, in ms per call and images/s.
Accuracy: both runtimes classify the generator's held-out test set (1,000 images, seed 99, the
training report's test set); argmax agreement, max |logit difference| and accuracy per runtime.
Needs ai-edge-litert and onnxruntime in the venv; prints markdown.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device.engine.backends.base import Backend, LoadedModel  # noqa: E402
from device.engine.backends.litert_backend import LiteRTBackend  # noqa: E402
from device.engine.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from device.engine.probe import HardwareProfile, probe  # noqa: E402
from models.manifest import load_manifest  # noqa: E402
from models.zoo.surface_data import make_dataset, to_input  # noqa: E402

ZOO = ROOT / "models" / "zoo" / "surface_defect"
TEST_SET = {"n": 1000, "seed": 99, "difficulty": 1.0}  # as in models/zoo/train_surface.py
RUNTIMES: dict[str, tuple[str, Backend]] = {
    "onnxruntime-cpu": ("v{v}", OnnxRuntimeBackend("CPUExecutionProvider")),
    "litert": ("tflite-v{v}", LiteRTBackend()),
}


def load(runtime: str, version: int, profile: HardwareProfile) -> tuple[LoadedModel, float]:
    folder_pattern, backend = RUNTIMES[runtime]
    folder = ZOO / folder_pattern.format(v=version)
    manifest = load_manifest(folder)
    start = time.perf_counter()
    model = backend.load(folder / manifest.model_file, manifest, profile)
    return model, (time.perf_counter() - start) * 1000


def median_call_ms(model: LoadedModel, x: np.ndarray, calls: int) -> tuple[float, float]:
    """Median wall ms and median process-CPU ms of one call (CPU time is blind to being descheduled)."""
    wall, cpu = [], []
    for _ in range(calls):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.run({"image": x})
        cpu.append((time.process_time() - start_cpu) * 1000)
        wall.append((time.perf_counter() - start) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def latency(profile: HardwareProfile, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    x_all = to_input(make_dataset(max(args.batches), seed=5)[0])
    for threads in args.threads:
        prof = dataclasses.replace(profile, cpu_count=threads)
        models = {rt: load(rt, args.version, prof) for rt in RUNTIMES}
        for batch in args.batches:
            x = np.ascontiguousarray(x_all[:batch])
            calls = max(5, 64 // batch)
            for model, _ in models.values():
                median_call_ms(model, x, 5)  # warm-up: allocation, resize to this batch
            per_rt: dict[str, list[tuple[float, float]]] = {rt: [] for rt in RUNTIMES}
            order = list(RUNTIMES)
            for _ in range(args.repeats):
                for rt in order:
                    per_rt[rt].append(median_call_ms(models[rt][0], x, calls))
                order.reverse()
            for rt, repeats in per_rt.items():
                ms = statistics.median(w for w, _ in repeats)
                rows.append(
                    {
                        "runtime": rt,
                        "threads": threads,
                        "batch": batch,
                        "ms_per_call": ms,
                        "images_per_s": batch / ms * 1000,
                        "cpu_ms_per_call": statistics.median(c for _, c in repeats),
                        "repeat_medians_wall_cpu_ms": repeats,
                        "load_ms": models[rt][1],
                    }
                )
        for model, _ in models.values():
            model.close()
    return rows


def accuracy(profile: HardwareProfile) -> list[dict[str, Any]]:
    images, labels = make_dataset(**TEST_SET)  # type: ignore[arg-type]
    x = to_input(images)
    rows = []
    for version in (1, 2):
        logits = {}
        for rt in RUNTIMES:
            model, _ = load(rt, version, profile)
            logits[rt] = np.concatenate(
                [model.run({"image": x[i : i + 100]})["logits"] for i in range(0, len(x), 100)]
            )
            model.close()
        onnx_l, lite_l = logits["onnxruntime-cpu"], logits["litert"]
        rows.append(
            {
                "version": version,
                "accuracy_onnxruntime": float((onnx_l.argmax(1) == labels).mean()),
                "accuracy_litert": float((lite_l.argmax(1) == labels).mean()),
                "argmax_agreement": float((onnx_l.argmax(1) == lite_l.argmax(1)).mean()),
                "max_abs_logit_diff": float(np.abs(onnx_l - lite_l).max()),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--version", type=int, default=2, choices=(1, 2))
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    profile = probe()

    acc = accuracy(profile)
    print("| model | ONNX Runtime accuracy | LiteRT accuracy | argmax agreement | max abs logit diff |")
    print("|---|---|---|---|---|")
    for a in acc:
        print(
            f"| v{a['version']} | {a['accuracy_onnxruntime']:.1%} | {a['accuracy_litert']:.1%} "
            f"| {a['argmax_agreement']:.1%} | {a['max_abs_logit_diff']:.1e} |"
        )

    rows = latency(profile, args)
    print(f"\nsurface-defect v{args.version}, median of {args.repeats} repeats")
    print(
        "| threads | batch | ORT ms/call | LiteRT ms/call | LiteRT / ORT | ORT img/s | LiteRT img/s "
        "| ORT CPU ms/call | LiteRT CPU ms/call |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["runtime"], r["threads"], r["batch"]): r for r in rows}
    for threads in args.threads:
        for batch in args.batches:
            o, lt = by_key["onnxruntime-cpu", threads, batch], by_key["litert", threads, batch]
            print(
                f"| {threads} | {batch} | {o['ms_per_call']:.2f} | {lt['ms_per_call']:.2f} "
                f"| {lt['ms_per_call'] / o['ms_per_call']:.2f} | {o['images_per_s']:.0f} "
                f"| {lt['images_per_s']:.0f} | {o['cpu_ms_per_call']:.2f} | {lt['cpu_ms_per_call']:.2f} |"
            )
    loads = {r["runtime"]: r["load_ms"] for r in rows if r["batch"] == args.batches[0]}
    print(f"\nload time (ms, last thread setting): {json.dumps({k: round(v, 1) for k, v in loads.items()})}")
    if args.json:
        args.json.write_text(json.dumps({"accuracy": acc, "latency": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
