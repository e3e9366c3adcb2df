"""TVM with tuned kernels vs TVM's stock pipeline vs ONNX Runtime, on this CPU, for the sample model.

    nice -n 10 .venv/bin/python bench/engine/bench_tvm.py [--repeats 7] [--calls 40] [--threads 1]
        [--batch 1 --batch 8] [--records models/zoo/surface_defect/tvm] [--out results-tvm.json]

- "tvm tuned": `TvmBackend` with the committed MetaSchedule records (compiled once into a temp cache).
- "tvm untuned": `tvm.compile` of the same ONNX import with TVM's default pipeline, no schedules.
- "onnxruntime": `InferenceSession` on the CPU provider, the same thread count.
Each repeat times `--calls` calls of each runtime in turn (so drift on a shared machine hits all
alike) and keeps the median per call; the table gives the median over repeats of wall time and of
process CPU time per call. CPU time is the steadier figure when other jobs share the cores. Outputs
are checked against ONNX Runtime first (the tolerance below), so a fast wrong kernel cannot win.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "models" / "zoo" / "surface_defect" / "v1"
RECORDS = ROOT / "models" / "zoo" / "surface_defect" / "tvm"
ATOL = 1e-4
UNTUNED_MAX_CALLS = 5  # the stock pipeline is 10-80x slower; a few calls give a stable median


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--out", type=Path, default=None, help="write the raw figures as JSON")
    return parser.parse_args()


def _time(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Median wall ms per call, and process CPU ms per call over the block."""
    walls = []
    cpu0 = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        walls.append((time.perf_counter() - start) * 1000)
    return statistics.median(walls), (time.process_time() - cpu0) * 1000 / calls


def main() -> int:
    args = _args()
    # TVM's thread pool reads this once, when it starts; it must be set before tvm is imported.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from device.engine.backends.tvm_backend import TvmBackend
    from device.engine.probe import llvm_target, llvm_target_parts, probe
    from models.manifest import load_manifest
    from models.tvm_tuning import compile_untuned

    profile = probe()
    manifest = load_manifest(PACKAGE)
    model_path = PACKAGE / manifest.model_file
    target = llvm_target_parts(profile)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    backend = TvmBackend(records_roots=[args.records], cache_dir=Path(tempfile.mkdtemp(prefix="tvm-bench-")))
    reason = backend.unavailable_reason(profile, manifest)
    if reason is not None:
        print(f"TVM backend unavailable: {reason}", file=sys.stderr)
        return 1
    started = time.monotonic()
    tuned = backend.load(model_path, manifest, profile)
    compile_s = time.monotonic() - started
    results: dict[str, Any] = {
        "cpu": profile.cpu.model,
        "target": llvm_target(profile),
        "threads": args.threads,
        "tvm": tvm.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "compile_with_records_s": round(compile_s, 2),
        "load_avg_at_start": os.getloadavg(),
        "batches": {},
    }
    rng = np.random.default_rng(0)
    for batch in args.batch or [1, 8]:
        x = rng.normal(size=(batch, 3, 64, 64)).astype(np.float32)
        vm = relax.VirtualMachine(compile_untuned(model_path, batch, target), tvm.cpu())
        runners: dict[str, Callable[[], Any]] = {
            "onnxruntime": lambda x=x: session.run(["logits"], {"image": x})[0],
            "tvm tuned": lambda x=x: tuned.run({"image": x})["logits"],
            "tvm untuned": lambda x=x, vm=vm: vm["main"](tvm.runtime.tensor(x)).numpy(),
        }
        reference = runners["onnxruntime"]()
        for name, fn in runners.items():
            worst = float(np.max(np.abs(fn() - reference)))
            if worst > ATOL:
                print(f"{name} differs from onnxruntime by {worst:.2e} at batch {batch}", file=sys.stderr)
                return 1
            for _ in range(3):
                fn()  # warm caches and thread pools
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, fn in runners.items():
                calls = min(args.calls, UNTUNED_MAX_CALLS) if name == "tvm untuned" else args.calls
                samples[name].append(_time(fn, calls))
        row = {
            name: {
                "wall_ms": round(statistics.median(s[0] for s in runs), 3),
                "cpu_ms": round(statistics.median(s[1] for s in runs), 3),
                "wall_ms_range": [round(min(s[0] for s in runs), 3), round(max(s[0] for s in runs), 3)],
            }
            for name, runs in samples.items()
        }
        results["batches"][str(batch)] = row
        ort_row = row["onnxruntime"]
        print(f"\nbatch {batch}, {args.threads} thread(s), medians of {args.repeats} repeats")
        print("| runtime | wall ms/call | CPU ms/call | wall vs ORT | CPU vs ORT |")
        print("|---|---|---|---|---|")
        for name, r in row.items():
            print(
                f"| {name} | {r['wall_ms']:.3f} | {r['cpu_ms']:.3f} | "
                f"{r['wall_ms'] / ort_row['wall_ms']:.2f}x | {r['cpu_ms'] / ort_row['cpu_ms']:.2f}x |"
            )
    results["load_avg_at_end"] = os.getloadavg()
    print(f"\ncompile with records (cache miss, all batch sizes): {compile_s:.1f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
