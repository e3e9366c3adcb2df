"""Delta codec benchmark: this codec vs zstd --patch-from, xdelta3, bsdiff4 and plain zstd.

    .venv/bin/python bench/delta/bench_delta.py [--big] [--runs 3]

For each pair: delta size as % of the new file, encode and apply seconds, and apply peak RSS (its
own subprocess, measured with os.wait4), medians over the runs; every apply is checked byte for
byte. Also an estimate of the update's entropy floor: per tensor, the order-0 entropy of each byte
plane of the wrapping integer difference (unchanged tensors cost 0), plus the gap stream as coded.
Prints a markdown table and writes bench/delta/results.json.
"""

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.delta import encode, info  # noqa: E402
from models.delta.format import Transform  # noqa: E402
from models.delta.onnx_scan import find_initializers  # noqa: E402
from models.delta.transforms import forward  # noqa: E402

PY = sys.executable
ZOO = ROOT / "models" / "zoo" / "surface_defect"


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command, measured by /usr/bin/time in its own process
    (a child forked from this big Python would inherit its high-water mark in ru_maxrss)."""
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        elapsed = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
        return elapsed, int(rss.read().split()[-1])


def long_flag(size: int) -> str:
    return f"--long={max(10, min(30, math.ceil(math.log2(max(size, 2))) + 1))}"


def tools(level: int) -> dict[str, tuple[Callable[[Path, Path, Path], list[str]], Callable[..., list[str]]]]:
    py_apply = (
        "import sys; from pathlib import Path as P; from models.delta import apply;"
        " apply(*map(P, sys.argv[1:]))"
    )
    py_encode = (
        "import sys; from pathlib import Path as P; from models.delta import encode;"
        f" encode(*map(P, sys.argv[1:]), level={level})"
    )
    bs_enc = "import sys, bsdiff4; bsdiff4.file_diff(*sys.argv[1:])"
    bs_app = "import sys, bsdiff4; bsdiff4.file_patch(sys.argv[1], sys.argv[3], sys.argv[2])"
    return {
        f"edgefleet delta (zstd {level})": (
            lambda o, n, d: [PY, "-c", py_encode, str(o), str(n), str(d)],
            lambda o, d, out, size: [PY, "-c", py_apply, str(o), str(d), str(out)],
        ),
        "zstd -19 --long --patch-from": (
            lambda o, n, d: [
                "zstd",
                "-q",
                "-f",
                "-19",
                long_flag(n.stat().st_size),
                f"--patch-from={o}",
                str(n),
                "-o",
                str(d),
            ],
            lambda o, d, out, size: [
                "zstd",
                "-q",
                "-f",
                "-d",
                long_flag(size),
                f"--patch-from={o}",
                str(d),
                "-o",
                str(out),
            ],
        ),
        "xdelta3 -9": (
            lambda o, n, d: ["xdelta3", "-9", "-e", "-f", "-s", str(o), str(n), str(d)],
            lambda o, d, out, size: ["xdelta3", "-d", "-f", "-s", str(o), str(d), str(out)],
        ),
        "bsdiff4": (
            lambda o, n, d: [PY, "-c", bs_enc, str(o), str(n), str(d)],
            lambda o, d, out, size: [PY, "-c", bs_app, str(o), str(d), str(out)],
        ),
        "zstd -19 (new file alone)": (
            lambda o, n, d: ["zstd", "-q", "-f", "-19", str(n), "-o", str(d)],
            lambda o, d, out, size: ["zstd", "-q", "-f", "-d", str(d), "-o", str(out)],
        ),
    }


def entropy_floor(old: Path, new: Path, gap_coded: int) -> int:
    """Bytes: order-0 entropy of the byte planes of (new - old) per matched tensor, plus the rest."""
    a, b = old.read_bytes(), new.read_bytes()
    old_spans = {s.name: s for s in find_initializers(a)}
    total = 0.0
    for s in find_initializers(b):
        o = old_spans.get(s.name)
        data = b[s.offset : s.offset + s.length]
        base = a[o.offset : o.offset + o.length] if o and o.length == s.length else None
        if base == data:
            continue
        coded = forward(Transform.SUB if base else Transform.PLANES, s.width, data, base)
        plane = len(coded) // s.width
        for k in range(s.width):
            counts = np.bincount(np.frombuffer(coded[k * plane : (k + 1) * plane], np.uint8), minlength=256)
            p = counts[counts > 0] / plane
            total += float(-(p * np.log2(p)).sum()) * plane / 8
    return int(total) + gap_coded


def big_pair(folder: Path, params: int = 4_000_000) -> tuple[Path, Path]:
    """A synthetic ONNX 'fine-tune': float32 weights, v2 = v1 + noise 1e-3 relative, a few frozen."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(params // 8,), (params // 4,), (params // 2,), (params // 8,)]
    w1 = [rng.standard_normal(s, dtype=np.float32) * 0.05 for s in shapes]
    w2 = [w + rng.standard_normal(w.shape, dtype=np.float32) * 5e-5 if i else w for i, w in enumerate(w1)]
    paths = []
    for name, ws in (("big_v1.onnx", w1), ("big_v2.onnx", w2)):
        inits = [numpy_helper.from_array(w, f"layer{i}.weight") for i, w in enumerate(ws)]
        node = helper.make_node("Identity", ["x"], ["y"])
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        model = helper.make_model(helper.make_graph([node], "big", [x], [y], initializer=inits))
        onnx.save(model, str(folder / name))
        paths.append(folder / name)
    return paths[0], paths[1]


def bench_pair(label: str, old: Path, new: Path, runs: int, level: int, work: Path) -> dict[str, object]:
    size = new.stat().st_size
    expected = new.read_bytes()
    rows = []
    for tool, (enc, app) in tools(level).items():
        if tool == "bsdiff4" and size > 64 * 1024 * 1024:
            continue
        sizes, enc_s, app_s, rss = [], [], [], []
        for _ in range(runs):
            d, out = work / "delta", work / "out"
            for p in (d, out):
                p.unlink(missing_ok=True)
            t, _ = run(enc(old, new, d))
            enc_s.append(t)
            sizes.append(d.stat().st_size)
            t, kib = run(app(old, d, out, size))
            app_s.append(t)
            rss.append(kib)
            if out.read_bytes() != expected:
                raise SystemExit(f"{tool}: apply did not rebuild {new} byte for byte")
        rows.append(
            {
                "tool": tool,
                "delta_bytes": int(statistics.median(sizes)),
                "delta_pct": 100 * statistics.median(sizes) / size,
                "encode_s": statistics.median(enc_s),
                "apply_s": statistics.median(app_s),
                "apply_peak_rss_mib": statistics.median(rss) / 1024,
            }
        )
    encode(old, new, work / "ours", level=level)
    gap_coded = _gap_stream_bytes(work / "ours")
    floor = entropy_floor(old, new, gap_coded)
    baseline = run([PY, "-c", "import models.delta, numpy, zstandard"])[1] / 1024
    return {
        "pair": label,
        "new_bytes": size,
        "rows": rows,
        "entropy_floor_bytes": floor,
        "entropy_floor_pct": 100 * floor / size,
        "transforms": info(work / "ours").target_bytes_by,
        "python_import_rss_mib": baseline,
    }


def _gap_stream_bytes(delta: Path) -> int:
    """The coded size of the gap stream (graph, framing) inside one of our deltas."""
    from models.delta.apply import _open, _records
    from models.delta.format import Op

    with delta.open("rb") as f:
        header, r = _open(f, 1 << 62)
        return sum(
            rec.payload_len for rec in _records(r, header, lambda _o, _n: None) if rec.op is Op.GAPSTREAM
        )


def table(result: dict[str, object]) -> str:
    lines = [
        f"### {result['pair']} (new file {result['new_bytes']} bytes)",
        "",
        "| tool | delta bytes | % of new | encode s | apply s | apply peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = result["rows"]
    assert isinstance(rows, list)
    for r in rows:
        lines.append(
            f"| {r['tool']} | {r['delta_bytes']} | {r['delta_pct']:.2f} | {r['encode_s']:.3f} "
            f"| {r['apply_s']:.3f} | {r['apply_peak_rss_mib']:.1f} |"
        )
    lines += [
        "",
        f"entropy floor estimate: {result['entropy_floor_bytes']} bytes ({result['entropy_floor_pct']:.2f}%);"
        f" our transforms: {result['transforms']};"
        f" a bare python with numpy+zstandard imported: {result['python_import_rss_mib']:.1f} MiB",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=19)
    parser.add_argument("--big", action="store_true", help="also a synthetic 16 MB ONNX fine-tune pair")
    args = parser.parse_args()
    for exe in ("zstd", "xdelta3"):
        if not shutil.which(exe):
            raise SystemExit(f"{exe} is missing: apt-get install {exe}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = [("surface-defect v1 -> v2", ZOO / "v1" / "model.onnx", ZOO / "v2" / "model.onnx")]
        if args.big:
            pairs.append(("synthetic 16 MB fine-tune v1 -> v2", *big_pair(work)))
        for label, old, new in pairs:
            result = bench_pair(label, old, new, args.runs, args.level, work)
            print(table(result) + "\n", flush=True)
            results.append(result)
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
