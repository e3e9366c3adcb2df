"""Build the delta benchmark's non-model binary pairs into bench/delta/.corpus/ (issue #4: .tflite,
engines, other files). Runs with the project's venv (the `tvm` extra for the engine pair)::

    nice -n 10 .venv/bin/python bench/delta/build_binaries.py

What it makes:
- numpy-2.4.5/_multiarray_umath.so, numpy-2.4.6/_multiarray_umath.so: numpy's core library
  (10.4 MB, CPython 3.11, manylinux x86_64) from two consecutive patch releases, taken from the
  wheels `pip download` fetches: a native library's ordinary update, code relinked, bsdiff's case.
  Needs PyPI (or a pip cache holding both wheels).
- tvm_v1.so, tvm_v2.so: the sample CNN (models/zoo/surface_defect v1 and v2, retrained) compiled
  by TVM with its committed tuning records for x86_64 znver3 (cross-compiled, whatever this CPU):
  a compiled engine whose weights changed, as a TensorRT engine or TVM library on a device is.
  TVM's output is deterministic here (two builds of v1 are byte for byte equal).
The .tflite pair needs no build: the benchmark reads models/zoo/surface_defect/tflite-v1|v2.
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = HERE / ".corpus"
ZOO = ROOT / "models" / "zoo" / "surface_defect"
NUMPY_VERSIONS = ("2.4.5", "2.4.6")
NUMPY_LIB = "numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"
# The target the zoo's TVM records were tuned for (their tuning.json).
TVM_TARGET = {"kind": "llvm", "mcpu": "znver3", "mtriple": "x86_64-linux-gnu"}


def numpy_pair(force: bool) -> None:
    for version in NUMPY_VERSIONS:
        out = CORPUS / f"numpy-{version}" / "_multiarray_umath.so"
        if out.exists() and not force:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
                 "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", f"numpy=={version}"],
                check=True,
            )  # fmt: skip
            wheel = next(Path(tmp).glob(f"numpy-{version}-*.whl"))
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as z:
                out.write_bytes(z.read(NUMPY_LIB))
        print(f"{out}: {out.stat().st_size} bytes", flush=True)


def tvm_pair(force: bool) -> None:
    from models.tvm_tuning import (
        compile_tuned,
        export_library,
        load_records,
        prepare,
        records_dir,
        sha256_file,
    )

    for version in ("v1", "v2"):
        out = CORPUS / f"tvm_{version}.so"
        if out.exists() and not force:
            continue
        model = ZOO / version / "model.onnx"
        records = records_dir(ZOO / "tvm", sha256_file(model), TVM_TARGET)
        executable = compile_tuned(prepare(model, 1, TVM_TARGET), TVM_TARGET, load_records(records))
        export_library(executable, out)
        print(f"{out}: {out.stat().st_size} bytes", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild what is already there")
    parser.add_argument("--skip-tvm", action="store_true", help="no engine pair (no tvm extra)")
    args = parser.parse_args()
    CORPUS.mkdir(exist_ok=True)
    (CORPUS / ".gitignore").write_text("*\n")
    numpy_pair(args.force)
    if not args.skip_tvm:
        tvm_pair(args.force)


if __name__ == "__main__":
    main()
