"""fp32 vs static int8 on this CPU: raw ONNX Runtime on both files, and the engine with its own choice.

    .venv/bin/python bench/engine/bench_precision.py [--repeats 5] [--threads 1,2] [--versions 1,2]
        [--out bench/engine/results_precision.json]

For each sample model version, runtime thread count and batch size (1 and 8):
- raw: `InferenceSession.run` on model.onnx and on model.int8.onnx, with the options the engine's
  onnxruntime-cpu backend sets, and on a dynamic int8 file (weights only, made here with
  `quantize_dynamic`; ConvInteger) to show why a device must measure rather than assume;
- engine: `engine.run` with `precision="fp32"` and with `"auto"` (which serves what the engine's
  own check chose on this machine: int8 if it agreed and was faster, else fp32).
The four run in alternating blocks (a different order each repeat), so drift in the shared
machine's load hits all alike. Each block gives the median wall time per call and the CPU time per
call (this process, all threads: steadier than wall time on a loaded box); the tables give the
median over repeats. The engine's decision (agreement, its own timings, reason) and what
`Engine.prepare` costs with the check (auto) and without (fp32) are recorded too.

`--spin-study` instead times fp32 against int8 (v1, two runtime threads) in four ways: call by call,
in blocks of 3 with the first call dropped (what the engine's check does), the same after a 5 ms
pause, and call by call with ONNX Runtime's thread spinning off; six sets of 11 rounds each.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from device.engine.engine import Engine
from device.engine.probe import HardwareProfile, probe
from models.package import verify_package
from models.zoo.surface_data import make_dataset, to_input

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "zoo" / "surface_defect"
BATCHES = (1, 8)
CALLS = {1: 200, 8: 40}  # per block: about the same time per block at both sizes
WARMUP_CALLS = 10
PATHS = ("raw fp32", "raw int8", "raw dynamic int8", "engine fp32", "engine auto")


def raw_session(model_file: Path, threads: int, spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def paused_block(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], calls: int, pause_s: float
) -> float:
    """Median ms of `calls` calls after a pause; with more than one call, the first is left out."""
    time.sleep(pause_s)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:] or times)


def spin_study(threads: int = 2, sets: int = 6, rounds: int = 11) -> dict[str, Any]:
    """fp32/int8 ratio ranges: call by call, in blocks (the engine's check), after a pause, spinning off."""
    folder = ZOO / "v1"
    images, _ = make_dataset(max(BATCHES), seed=7)
    out: dict[str, Any] = {}
    for label, spinning, block_calls, pause_s in (
        ("call by call", True, 1, 0.0),
        ("blocks of 3, first call dropped (the check)", True, 3, 0.0),
        ("blocks of 3 after a 5 ms pause, first call dropped", True, 3, 0.005),
        ("call by call, spinning off", False, 1, 0.0),
    ):
        fp32 = raw_session(folder / "model.onnx", threads, spinning)
        int8 = raw_session(folder / "model.int8.onnx", threads, spinning)
        for batch in BATCHES:
            feed = {"image": np.ascontiguousarray(to_input(images[:batch]))}
            for session in (fp32, int8):
                for _ in range(WARMUP_CALLS):
                    session.run(None, feed)

            ratios, fp32_ms, int8_ms = [], [], []
            for _ in range(sets):
                pairs = []
                for i in range(rounds):
                    if i % 2 == 0:
                        a = paused_block(fp32, feed, block_calls, pause_s)
                        b = paused_block(int8, feed, block_calls, pause_s)
                    else:
                        b = paused_block(int8, feed, block_calls, pause_s)
                        a = paused_block(fp32, feed, block_calls, pause_s)
                    pairs.append((a, b))
                ratios.append(statistics.median(a / b for a, b in pairs))
                fp32_ms.append(statistics.median(a for a, _ in pairs))
                int8_ms.append(statistics.median(b for _, b in pairs))
            out[f"{label}, batch {batch}"] = {
                "fp32_over_int8": [round(r, 2) for r in ratios],
                "fp32_ms": [round(m, 3) for m in fp32_ms],
                "int8_ms": [round(m, 3) for m in int8_ms],
            }
            print(
                f"{label}, batch {batch}: fp32/int8 {min(ratios):.2f}-{max(ratios):.2f}x; "
                f"fp32 {min(fp32_ms):.2f}-{max(fp32_ms):.2f} ms, "
                f"int8 {min(int8_ms):.2f}-{max(int8_ms):.2f} ms",
                flush=True,
            )
    return out


def block(call: Callable[[], object], calls: int) -> tuple[float, float]:
    """(median wall ms per call, CPU ms per call) over `calls` calls."""
    for _ in range(WARMUP_CALLS):
        call()
    walls = []
    cpu_start = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu_start) / calls
    return statistics.median(walls) * 1000, cpu * 1000


def prepare_timed(profile: HardwareProfile, folder: Path, precision: str) -> tuple[Engine, float]:
    engine = Engine(profile, precision=precision)
    manifest = verify_package(folder)
    start = time.perf_counter()
    engine.serve(engine.prepare(folder, manifest))
    return engine, (time.perf_counter() - start) * 1000


def bench_one(version: int, threads: int, repeats: int, profile: HardwareProfile) -> dict[str, Any]:
    folder = ZOO / f"v{version}"
    profile = dataclasses.replace(profile, cpu_count=threads)  # the backend runs cpu_count threads
    fp32_engine, prepare_fp32_ms = prepare_timed(profile, folder, "fp32")
    auto_engine, prepare_auto_ms = prepare_timed(profile, folder, "auto")
    serving = auto_engine.get("surface-defect")
    sessions = {"raw fp32": raw_session(folder / "model.onnx", threads)}
    sessions["raw int8"] = raw_session(folder / "model.int8.onnx", threads)
    with tempfile.TemporaryDirectory() as tmp:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(folder / "model.onnx", Path(tmp) / "dynamic.onnx", weight_type=QuantType.QUInt8)
        sessions["raw dynamic int8"] = raw_session(Path(tmp) / "dynamic.onnx", threads)
    images, _ = make_dataset(max(BATCHES), seed=7)
    inputs = to_input(images)
    results: dict[str, Any] = {}
    for batch in BATCHES:
        feed = {"image": np.ascontiguousarray(inputs[:batch])}
        calls: dict[str, Callable[[], object]] = {
            "raw fp32": lambda f=feed: sessions["raw fp32"].run(None, f),
            "raw int8": lambda f=feed: sessions["raw int8"].run(None, f),
            "raw dynamic int8": lambda f=feed: sessions["raw dynamic int8"].run(None, f),
            "engine fp32": lambda f=feed: fp32_engine.run("surface-defect", f),
            "engine auto": lambda f=feed: auto_engine.run("surface-defect", f),
        }
        runs: dict[str, list[tuple[float, float]]] = {path: [] for path in PATHS}
        for repeat in range(repeats):
            order = PATHS[repeat % len(PATHS) :] + PATHS[: repeat % len(PATHS)]
            for path in order:
                runs[path].append(block(calls[path], CALLS[batch]))
        results[str(batch)] = {
            path: {
                "wall_ms": statistics.median(w for w, _ in values),
                "cpu_ms": statistics.median(c for _, c in values),
                "repeats_wall_ms": [round(w, 4) for w, _ in values],
            }
            for path, values in runs.items()
        }
    decision = serving.precision.to_dict() if serving.precision else None
    fp32_engine.close()
    auto_engine.close()
    return {
        "version": version,
        "threads": threads,
        "engine_served": serving.served_precision,
        "decision": decision,
        "prepare_ms": {"fp32": prepare_fp32_ms, "auto": prepare_auto_ms},
        "batches": results,
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| model | threads | batch | raw fp32 ms | raw int8 ms | int8 speedup (wall / CPU) "
        "| dynamic int8 speedup (wall / CPU) | engine fp32 ms | engine auto ms (serves) | auto speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for batch, paths in run["batches"].items():
            raw32, raw8, dyn = paths["raw fp32"], paths["raw int8"], paths["raw dynamic int8"]
            eng32, auto = paths["engine fp32"], paths["engine auto"]
            lines.append(
                f"| v{run['version']} | {run['threads']} | {batch} | {raw32['wall_ms']:.3f} | "
                f"{raw8['wall_ms']:.3f} | {raw32['wall_ms'] / raw8['wall_ms']:.2f}x / "
                f"{raw32['cpu_ms'] / raw8['cpu_ms']:.2f}x | {raw32['wall_ms'] / dyn['wall_ms']:.2f}x / "
                f"{raw32['cpu_ms'] / dyn['cpu_ms']:.2f}x | {eng32['wall_ms']:.3f} | "
                f"{auto['wall_ms']:.3f} ({run['engine_served']}) | "
                f"{eng32['wall_ms'] / auto['wall_ms']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="comma-separated runtime thread counts")
    parser.add_argument("--versions", default="1,2", help="comma-separated sample model versions")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "engine" / "results_precision.json")
    parser.add_argument("--spin-study", action="store_true", help="only the timing-method study")
    args = parser.parse_args()
    profile = probe()
    load_before = os.getloadavg()
    if args.spin_study:
        study = spin_study()
        out = args.out.with_name(args.out.stem + "_spin.json")
        report = {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "loadavg_before": load_before}
        out.write_text(
            json.dumps({**report, "loadavg_after": os.getloadavg(), "study": study}, indent=2) + "\n"
        )
        print(f"load average {load_before} -> {os.getloadavg()}; raw runs in {out}")
        return
    runs = [
        bench_one(int(version), int(threads), args.repeats, profile)
        for version in args.versions.split(",")
        for threads in args.threads.split(",")
    ]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {
            "cpu": profile.cpu.model,
            "cpu_flags_int8": sorted(
                f for f in profile.cpu.flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
            ),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "repeats": args.repeats,
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(runs))
    for run in runs:
        decision = run["decision"] or {}
        print(
            f"v{run['version']} threads {run['threads']}: engine serves {run['engine_served']}: "
            f"{decision.get('reason')}; prepare {run['prepare_ms']['fp32']:.0f} ms (fp32) vs "
            f"{run['prepare_ms']['auto']:.0f} ms (auto, with the check)"
        )
    print(f"load average {load_before} -> {os.getloadavg()}; raw runs in {args.out}")


if __name__ == "__main__":
    main()
