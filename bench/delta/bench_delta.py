"""Delta codec benchmark on the corpus of build_corpus.py, side by side with generic tools.

    nice -n 10 .venv/bin/python bench/delta/bench_delta.py [--runs 3] [--pairs minilm-full,...]
        [--merge bench/delta/results.json --keep-others]  # re-measure only this codec, on some pairs

Tools: this codec (zstd level 19 by default), bsdiff4, `xdelta3 -9`, `zstd -19 --long --patch-from`
and `zstd -19` of the new file alone. Per pair and tool: delta size as % of the new file, encode
seconds, apply seconds (wall and CPU = user + sys) and apply peak RSS, each apply in its own
process under /usr/bin/time (wait4's ru_maxrss of that process alone). Every apply is checked
byte for byte against the new file. Sizes are deterministic, so each tool encodes once per pair
(¹ in the table), except this codec on the full MiniLM fine-tune, whose encode time is a goal: the
median of --runs. Applies are medians of --runs for every tool; bsdiff4 skips files over 32 MiB.
Beside each pair: estimates of the entropy floor (bench/delta/floor.py). Prints markdown and
writes bench/delta/results.json.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from floor import entropy_floor  # noqa: E402

from models.delta import info  # noqa: E402

PY = sys.executable
CORPUS = HERE / ".corpus"
# bsdiff4 needs ~17x the file in memory and minutes per 90 MB on two cores: the 90 MB pairs skip it.
BSDIFF_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Pair:
    key: str
    label: str
    old: str
    new: str
    goal: str
    time_encode: bool = False  # our encode timed --runs times (a goal); else once, like the others
    model: bool = True  # an ONNX model: bench/delta/floor.py estimates its floor (else none is shown)


ZOO = ROOT / "models" / "zoo" / "surface_defect"


PAIRS = [
    Pair("cnn", "sample CNN fine-tuned (surface_defect v1 -> v2)", "cnn_v1.onnx", "cnn_v2.onnx", "< generic"),
    Pair(
        "minilm-full", "MiniLM, every layer fine-tuned", "minilm_v1.onnx", "minilm_full.onnx", "<= 36%", True
    ),
    Pair(
        "minilm-full-ext",
        "MiniLM, every layer fine-tuned, external data file",
        "ext_v1/model.onnx.data",
        "ext_full/model.onnx.data",
        "<= 36%",
    ),
    Pair("minilm-last1", "MiniLM, last layer + pooler tuned", "minilm_v1.onnx", "minilm_last1.onnx", "<= 8%"),
    Pair(
        "minilm-last2", "MiniLM, last 2 layers + pooler tuned", "minilm_v1.onnx", "minilm_last2.onnx", "(8%)"
    ),
    Pair(
        "minilm-int8",
        "MiniLM int8 re-quantised (v1 int8 -> full-tune int8)",
        "minilm_v1_int8.onnx",
        "minilm_full_int8.onnx",
        "<= 8%",
    ),
    Pair(
        "cnn-int8",
        "sample CNN int8 re-quantised (v1 -> v2)",
        "cnn_v1_int8.onnx",
        "cnn_v2_int8.onnx",
        "< generic",
    ),
    Pair(
        "minilm-reexport",
        "MiniLM re-exported, graph changes only",
        "minilm_v1.onnx",
        "minilm_v1_reexport.onnx",
        "<= 8%",
    ),
    Pair("unrelated-to-minilm", "unrelated: CNN -> MiniLM", "cnn_v2.onnx", "minilm_v1.onnx", "<= 84%"),
    Pair("unrelated-to-cnn", "unrelated: MiniLM -> CNN", "minilm_v1.onnx", "cnn_v2.onnx", "<= 84%"),
    # Not ONNX (issue #4: "for any other file ... a generic binary delta, chosen by size"); the
    # last two are built by bench/delta/build_binaries.py.
    Pair(
        "tflite",
        "sample CNN .tflite retrained (surface_defect tflite-v1 -> v2)",
        str(ZOO / "tflite-v1" / "model.tflite"),
        str(ZOO / "tflite-v2" / "model.tflite"),
        "< generic",
        model=False,
    ),
    Pair(
        "tvm-engine",
        "sample CNN compiled by TVM, retrained (v1 -> v2 library)",
        "tvm_v1.so",
        "tvm_v2.so",
        "< generic",
        model=False,
    ),
    Pair(
        "numpy-lib",
        "native library update (numpy 2.4.5 -> 2.4.6 _multiarray_umath.so)",
        "numpy-2.4.5/_multiarray_umath.so",
        "numpy-2.4.6/_multiarray_umath.so",
        "(bsdiff's case)",
        model=False,
    ),
]


@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float
    peak_rss_kib: int


def run(cmd: list[str]) -> Measured:
    """One command in its own process under /usr/bin/time: wall, CPU (user + sys) and peak RSS."""
    with tempfile.NamedTemporaryFile("r") as stats:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M %U %S", "-o", stats.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr.decode()[-800:]}")
        rss, user, sys_s = stats.read().split()[-3:]
        return Measured(wall, float(user) + float(sys_s), int(rss))


def _long(size: int) -> str:
    return f"--long={max(10, min(30, math.ceil(math.log2(max(size, 2))) + 1))}"


Cmd = Callable[[Path, Path, Path, int], list[str]]


def tools(level: int) -> dict[str, tuple[Cmd, Cmd]]:
    """name -> (encode(old, new, delta, size), apply(old, delta, out, size)) command lines."""
    ours_enc = (
        "import sys; from pathlib import Path as P; from models.delta import encode;"
        f" encode(*map(P, sys.argv[1:]), level={level})"
    )
    ours_app = (
        "import sys; from pathlib import Path as P; from models.delta import apply;"
        " apply(*map(P, sys.argv[1:]))"
    )
    bs_enc = "import sys, bsdiff4; bsdiff4.file_diff(*sys.argv[1:])"
    bs_app = "import sys, bsdiff4; bsdiff4.file_patch(sys.argv[1], sys.argv[3], sys.argv[2])"
    return {
        f"edgefleet delta (zstd {level})": (
            lambda o, n, d, s: [PY, "-c", ours_enc, str(o), str(n), str(d)],
            lambda o, d, out, s: [PY, "-c", ours_app, str(o), str(d), str(out)],
        ),
        "bsdiff4": (
            lambda o, n, d, s: [PY, "-c", bs_enc, str(o), str(n), str(d)],
            lambda o, d, out, s: [PY, "-c", bs_app, str(o), str(d), str(out)],
        ),
        "xdelta3 -9": (
            lambda o, n, d, s: ["xdelta3", "-9", "-e", "-f", "-s", str(o), str(n), str(d)],
            lambda o, d, out, s: ["xdelta3", "-d", "-f", "-s", str(o), str(d), str(out)],
        ),
        "zstd -19 --long --patch-from": (
            lambda o, n, d, s: [
                "zstd",
                "-q",
                "-f",
                "-19",
                _long(s),
                f"--patch-from={o}",
                str(n),
                "-o",
                str(d),
            ],
            lambda o, d, out, s: [
                "zstd",
                "-q",
                "-f",
                "-d",
                _long(s),
                f"--patch-from={o}",
                str(d),
                "-o",
                str(out),
            ],
        ),
        "zstd -19 (new file alone)": (
            lambda o, n, d, s: ["zstd", "-q", "-f", "-19", str(n), "-o", str(d)],
            lambda o, d, out, s: ["zstd", "-q", "-f", "-d", str(d), "-o", str(out)],
        ),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def bench_pair(
    pair: Pair, corpus: Path, runs: int, level: int, work: Path, only_ours: bool = False
) -> dict[str, object]:
    old, new = corpus / pair.old, corpus / pair.new
    size, want = new.stat().st_size, _sha256(new)
    rows = []
    ours = ""
    for tool, (enc, app) in tools(level).items():
        if (tool == "bsdiff4" and size > BSDIFF_MAX_BYTES) or (
            only_ours and not tool.startswith("edgefleet")
        ):
            continue
        delta, out = work / "delta", work / "out"
        encodes = []
        for _ in range(runs if tool.startswith("edgefleet") and pair.time_encode else 1):
            delta.unlink(missing_ok=True)
            encodes.append(run(enc(old, new, delta, size)))
        delta_bytes = delta.stat().st_size
        if tool.startswith("edgefleet"):
            ours = json.dumps(info(delta).target_bytes_by)
        applies = []
        for _ in range(runs):
            out.unlink(missing_ok=True)
            applies.append(run(app(old, delta, out, size)))
            if _sha256(out) != want:
                raise SystemExit(f"{tool}: apply did not rebuild {new} byte for byte")
        rows.append(
            {
                "tool": tool,
                "delta_bytes": delta_bytes,
                "delta_pct": 100 * delta_bytes / size,
                "encode_s": statistics.median(m.wall_s for m in encodes),
                "encode_runs": len(encodes),
                "apply_s": statistics.median(m.wall_s for m in applies),
                "apply_cpu_s": statistics.median(m.cpu_s for m in applies),
                "apply_peak_rss_mib": statistics.median(m.peak_rss_kib for m in applies) / 1024,
            }
        )
        print(f"  {tool}: {rows[-1]['delta_pct']:.2f}%", flush=True)
    floor = entropy_floor(old, new) if pair.model else None
    return {
        "pair": pair.key,
        "label": pair.label,
        "goal": pair.goal,
        "new_bytes": size,
        "rows": rows,
        "floor": floor,
        "our_target_bytes_by": ours,
    }


def _pct(value: float) -> str:
    return f"{value:.4f}" if value < 0.1 else f"{value:.2f}"


def table(results: list[dict[str, object]]) -> str:
    lines = [
        "| pair | tool | delta bytes | % of new | encode s | apply s | apply CPU s | apply peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        rows = res["rows"]
        assert isinstance(rows, list)
        best = min(r["delta_bytes"] for r in rows[1:]) if len(rows) > 1 else None
        for i, r in enumerate(rows):
            label = f"{res['label']} ({res['new_bytes'] / 1e6:.1f} MB)" if i == 0 else ""
            pct = f"**{_pct(r['delta_pct'])}**" if i == 0 else _pct(r["delta_pct"])
            if i and r["delta_bytes"] == best:
                pct += " (best generic)"
            enc = f"{r['encode_s']:.2f}" + ("" if r["encode_runs"] > 1 else "¹")
            lines.append(
                f"| {label} | {r['tool']} | {r['delta_bytes']} | {pct} | {enc} | {r['apply_s']:.2f} "
                f"| {r['apply_cpu_s']:.2f} | {r['apply_peak_rss_mib']:.1f} |"
            )
    return "\n".join(lines)


def floors(results: list[dict[str, object]]) -> str:
    lines = [
        "| pair | goal | ours % | best generic % | order-0 floor % | context floor % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for res in results:
        rows, floor = res["rows"], res["floor"]
        assert isinstance(rows, list) and (floor is None or isinstance(floor, dict))
        best = min((r["delta_pct"] for r in rows[1:]), default=float("nan"))
        # no floor for files that are not models: their bytes have no tensors to estimate
        order0, ctx = (_pct(floor["order0_pct"]), _pct(floor["context_pct"])) if floor else ("-", "-")
        lines.append(
            f"| {res['label']} | {res['goal']} | {_pct(rows[0]['delta_pct'])} | {_pct(best)} "
            f"| {order0} | {ctx} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="delta codec vs generic tools on the corpus")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=19)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--pairs", default=",".join(p.key for p in PAIRS), help="comma-separated keys")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--markdown", default=str(HERE / "RESULTS.md"), help="'' to skip")
    parser.add_argument(
        "--merge",
        type=Path,
        help="measure only this codec; take the other tools' rows from this results.json",
    )
    parser.add_argument(
        "--keep-others",
        action="store_true",
        help="keep the results of the pairs not in --pairs that --out already holds (one table, updated)",
    )
    parser.add_argument("--render", type=Path, help="only write the markdown of an earlier results.json")
    args = parser.parse_args()
    if args.render:
        done = json.loads(args.render.read_text())
        markdown = report(_with_commands(done), done["command"], args.runs)
        Path(args.markdown).write_text(markdown)
        print(markdown)
        return
    for exe in ("zstd", "xdelta3"):
        if not shutil.which(exe):
            raise SystemExit(f"{exe} is missing: apt-get install {exe}")
    chosen = [p for p in PAIRS if p.key in args.pairs.split(",")]
    missing = [p.new for p in chosen if not (args.corpus / p.new).exists()]
    if missing:
        raise SystemExit(
            f"{missing} not in {args.corpus}: build it with bench/delta/build_corpus.py"
            " (models) and bench/delta/build_binaries.py (other files) first"
        )
    results = []
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness else ""
    command = " ".join([f"{prefix}.venv/bin/python bench/delta/bench_delta.py", *sys.argv[1:]])
    kept: dict[str, dict[str, Any]] = {}
    if args.keep_others and args.out.exists():
        kept = {r["pair"]: r for r in _with_commands(json.loads(args.out.read_text()))}
    earlier: dict[str, dict[str, Any]] = {}
    if args.merge is not None:
        merged = json.loads(args.merge.read_text())
        earlier = {r["pair"]: r for r in _with_commands(merged)}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in chosen:
            print(f"{pair.label}", flush=True)
            result = bench_pair(pair, args.corpus, args.runs, args.level, Path(tmp), args.merge is not None)
            for row in result["rows"]:  # type: ignore[attr-defined]
                row["command"] = command
            if pair.key in earlier:  # the generic tools' rows: they do not depend on this codec
                rows = earlier[pair.key]["rows"]
                result["rows"] += [r for r in rows if not r["tool"].startswith("edgefleet")]  # type: ignore[operator]
            result["command"] = command
            results.append(result)
            # after each pair, so a long run that is stopped keeps what it measured
            _write(args.out, command, _in_order(results, kept))
    results = _in_order(results, kept)
    markdown = report(results, command, args.runs)
    print(markdown)
    _write(args.out, command, results)
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    print(f"wrote {args.out}" + (f" and {args.markdown}" if args.markdown else ""))


def _with_commands(done: dict[str, Any]) -> list[dict[str, Any]]:
    """An earlier results.json's pairs, each row with the command that measured it."""
    out = []
    for res in done["results"]:
        command = res.get("command", done["command"])
        rows = [{"command": command, **row} for row in res["rows"]]
        out.append({**res, "command": command, "rows": rows})
    return out


def _in_order(fresh: list[dict[str, Any]], kept: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs just measured and those kept from an earlier run, in PAIRS order."""
    by_key = {**kept, **{r["pair"]: r for r in fresh}}
    return [by_key[p.key] for p in PAIRS if p.key in by_key]


def _write(out: Path, command: str, results: list[dict[str, Any]]) -> None:
    commands = list(dict.fromkeys(str(r.get("command", command)) for r in results))
    out.write_text(json.dumps({"command": " and ".join(commands), "results": results}, indent=2) + "\n")


def _made_by(results: list[dict[str, Any]], command: str) -> str:
    """Each command that measured rows of the table, with whose rows: this codec's or the other
    tools', and of which pairs (a table may be measured in several runs, see --merge)."""
    every = [str(r["pair"]) for r in results]
    groups: dict[str, dict[str, list[str]]] = {}
    for res in results:
        for row in res["rows"]:
            kind = "this codec" if row["tool"].startswith("edgefleet") else "the other tools"
            pairs = groups.setdefault(str(row.get("command", command)), {}).setdefault(kind, [])
            if res["pair"] not in pairs:
                pairs.append(res["pair"])
    if len(groups) <= 1:
        return f"Made by `{next(iter(groups), command)}`"
    parts = []
    for cmd, kinds in groups.items():
        what = "; ".join(
            f"{kind}, {'every pair' if pairs == every else 'pairs ' + ', '.join(pairs)}"
            for kind, pairs in kinds.items()
        )
        parts.append(f"`{cmd}` ({what})")
    return "Made by " + ", ".join(parts) + ","


def report(results: list[dict[str, Any]], command: str, runs: int) -> str:
    corpus = CORPUS / "report.json"
    tunes = json.loads(corpus.read_text()) if corpus.exists() else {}
    lines = [
        "## Model deltas (issue #4)",
        "",
        f"{_made_by(results, command)} on {os.cpu_count()} shared cores, after",
        "`nice -n 10 /tmp/delta-corpus-venv/bin/python bench/delta/build_corpus.py` built the corpus",
        "and `nice -n 10 .venv/bin/python bench/delta/build_binaries.py` its non-model pairs",
        "(see their docstrings). Sizes are exact; times are medians of "
        f"{runs} runs (¹: one encode; sizes do not vary). Apply CPU = user + sys of the whole apply",
        "process, Python start-up and imports included; peak RSS = that process's ru_maxrss. Every",
        "apply was checked byte for byte.",
        "",
        table(results),
        "",
        "Goals and entropy floors (bench/delta/floor.py: order 0 = each changed tensor's best",
        "transform, byte planes, order-0 entropy per plane; context = the same given the base",
        "element's exponent byte; plus the graph bytes as zstd codes them):",
        "",
        floors(results),
    ]
    for name in ("full", "last1", "last2"):
        t = tunes.get(name)
        if isinstance(t, dict):
            held, before = t.get("held_out", {}), tunes.get("v1_held_out", {})
            lines.append(
                f"\nFine-tune `{name}`: {t['steps']} AdamW steps (lr {t['lr']}, batch {t['batch']}),"
                f" {t['trainable_params']} trainable parameters,"
                f" loss {t['loss_first_25']} -> {t['loss_last_25']},"
                f" held-out top-1 retrieval {before.get('top1')} -> {held.get('top1')}."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
