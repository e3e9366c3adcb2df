"""One model served at a precision the bench chooses, so its ceiling and its server run the same file.

The engine's `auto` precision picks the package's int8 variant or fp32 at every load, from a timing
that swings on a busy machine; a throughput ratio between a raw fp32 session and a server that
happened to pick int8 (1.2-1.4x faster here) says nothing. The bench therefore decides once (`auto`:
what the engine picks on its first load; or `fp32`, `int8`, `fp16` outright), then serves that file in
every server and times that very file raw.
"""

import dataclasses
from pathlib import Path

from device.engine.engine import Engine, ServingModel
from device.engine.precision import PrecisionDecision
from device.engine.probe import probe
from device.errors import ConfigError
from device.standalone import load_for_serving
from models.package import verify_package

PRECISIONS = ("auto", "fp32", "int8", "fp16")
BACKEND = "onnxruntime-cpu"


def load_pinned(model: Path, precision: str, threads: int | None) -> tuple[Engine, ServingModel]:
    """An engine serving `model` (a package folder or an .onnx) at `precision`, with `threads`
    runtime threads (None: the profile's core count, as the device does)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if threads is None and precision in ("auto", "fp32"):
        return load_for_serving(model, BACKEND, precision)
    profile = probe()
    if threads is not None:
        # The onnxruntime backend sizes its pool from the profile's core count.
        profile = dataclasses.replace(profile, cpu_count=threads)
    if precision in ("auto", "fp32"):
        _, bare = load_for_serving(model, BACKEND, "fp32")  # just for the folder and manifest
        bare.model.close()
        engine = Engine(profile, pinned=BACKEND, precision=precision)
        serving = engine.prepare(bare.folder, bare.manifest)
        engine.serve(serving)
        return engine, serving
    if not model.is_dir():
        raise ConfigError(f"{model}: precision {precision} needs a package folder with that variant")
    manifest = verify_package(model)
    variant = next((v for v in manifest.variants if v.precision == precision), None)
    if variant is None:
        offered = ", ".join(sorted({v.precision for v in manifest.variants})) or "none"
        raise ConfigError(f"{model} offers no {precision} variant (variants: {offered})")
    # The variant as if it were the model file. Its golden outputs are fp32's, which int8 misses by
    # more than the manifest's tolerance (the engine checks variants by agreement instead), so the
    # golden check is left out: this is a throughput bench, bench_precision.py measures accuracy.
    as_model = manifest.model_copy(
        update={
            "model_file": variant.file,
            "format": variant.format,
            "variants": [],
            "precision": None,
            "golden": None,
        }
    )
    engine = Engine(profile, pinned=BACKEND, precision="fp32")
    serving = engine.prepare(model, as_model)
    serving.precision = PrecisionDecision(
        variant.precision, variant.file, "pinned by the bench, not checked against fp32", "pinned"
    )
    engine.serve(serving)
    return engine, serving


def served_file(serving: ServingModel) -> Path:
    """The model file `serving` runs."""
    file = serving.precision.file if serving.precision else serving.manifest.model_file
    return serving.folder / file
