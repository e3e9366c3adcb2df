"""The shadow gate: the previous model beside the new one on live inputs, within a CPU budget.

The models are real: the sample's v1 and v2, and two edits of v1 written with the onnx package, one
whose labels are rotated (it never agrees with v1) and one that computes the same logits after
a chain of matrix products (it is much slower).
"""

import asyncio
import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from device.engine.engine import Engine, ServingModel
from device.engine.preprocess import load_image
from device.errors import ConfigError
from device.pipeline import FolderPipeline
from device.shadow import ShadowConfig, ShadowGate, ShadowHub
from device.updater import Updater
from fleet.tuf_repository import TufRepository
from models.package import verify_package, write_manifest
from models.zoo.surface_data import write_images
from protocol.messages import UpdateState
from tests.conftest import ZOO
from tests.device.test_updater import (
    MemoryFleet,
    archive_of,
    make_updater,
    new_fleet_tuf,
    offer_for,
    publish,
    serve_v1,
)

onnx = pytest.importorskip("onnx", reason="the onnx package writes the edited test models (pip install onnx)")
SHADOW_KEYS = {"agreement", "p95_ms_old", "p95_ms_new", "samples"}
ROTATION = [1, 2, 3, 0]  # no label stays in place: top-1 never agrees


def edit_v1(
    dest: Path,
    version: int,
    tail: Callable[[object], list[object]],
    golden: Callable[[np.ndarray], np.ndarray],
) -> Path:
    """v1 with `tail(graph)` nodes after its last layer (which now writes `raw`), as package `version`."""
    folder = Path(shutil.copytree(ZOO / "v1", dest))
    model = onnx.load(str(folder / "model.onnx"))
    last = model.graph.node[-1]
    assert list(last.output) == ["logits"]
    last.output[0] = "raw"
    model.graph.node.extend(tail(model.graph))
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with np.load(folder / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["output.logits"] = golden(arrays["output.logits"])
    np.savez(folder / "golden.npz", **arrays)
    fields = json.loads((folder / "manifest.json").read_text())
    fields.pop("files")
    write_manifest(folder, {**fields, "version": version}, ["model.onnx", "golden.npz"])
    return folder


def rotated_labels(graph: object) -> list[object]:
    indices = onnx.numpy_helper.from_array(np.array(ROTATION, np.int64), "rotation")
    graph.initializer.append(indices)  # type: ignore[attr-defined]
    return [onnx.helper.make_node("Gather", ["raw", "rotation"], ["logits"], axis=1)]


def matrix_chain(graph: object, links: int = 300, width: int = 512) -> list[object]:
    """logits = raw + 0 * sum(x[:, :width] @ W @ W ...): the same numbers, many more operations."""
    rng = np.random.default_rng(0)
    consts = {
        "w": (rng.standard_normal((width, width)) * 0.01).astype(np.float32),
        "flat_shape": np.array([0, -1], np.int64),
        "starts": np.array([0], np.int64),
        "ends": np.array([width], np.int64),
        "axis1": np.array([1], np.int64),
        "zero": np.array(0.0, np.float32),
    }
    for name, value in consts.items():
        graph.initializer.append(onnx.numpy_helper.from_array(value, name))  # type: ignore[attr-defined]
    make = onnx.helper.make_node
    nodes = [
        make("Reshape", ["image", "flat_shape"], ["flat"]),
        make("Slice", ["flat", "starts", "ends", "axis1"], ["h0"]),
    ]
    nodes += [make("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(links)]
    nodes += [
        make("ReduceSum", [f"h{links}", "axis1"], ["total"], keepdims=1),
        make("Mul", ["total", "zero"], ["nothing"]),
        make("Add", ["raw", "nothing"], ["logits"]),
    ]
    return nodes


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        "rotated": edit_v1(root / "rotated", 3, rotated_labels, lambda out: out[:, ROTATION]),
        "slow": edit_v1(root / "slow", 3, matrix_chain, lambda out: out),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [path for path, _ in write_images(tmp_path_factory.mktemp("images"), 60, seed=11)]


def prepared(engine: Engine, folder: Path) -> ServingModel:
    return engine.prepare(folder, verify_package(folder))


def live(engine: Engine, gate: ShadowGate, images: list[Path]) -> list[dict[str, np.ndarray]]:
    """What the pipeline does per image: run the serving model, then hand the result to the gate."""
    served = gate.new
    assert served.manifest.preprocessing is not None
    engine.serve(served)
    fed = []
    for path in images:
        inputs = {"image": load_image(path, served.manifest.preprocessing)}
        start = time.perf_counter()
        outputs = engine.run(served.manifest.name, inputs)
        gate.observe(served.manifest.version, inputs, outputs, (time.perf_counter() - start) * 1000)
        fed.append(inputs)
    return fed


EVERY_SAMPLE = ShadowConfig(sample_rate=1.0, cpu_budget=1.0, min_samples=10, max_p95_increase=10.0)


def test_agreement_is_the_share_of_inputs_with_the_same_top1(engine: Engine, images: list[Path]) -> None:
    old, new = prepared(engine, ZOO / "v1"), prepared(engine, ZOO / "v2")
    gate = ShadowGate(new, old, EVERY_SAMPLE)
    fed = live(engine, gate, images)
    # Computed again here, straight from both models.
    same = [
        int(np.argmax(old.model.run(x)["logits"])) == int(np.argmax(new.model.run(x)["logits"])) for x in fed
    ]
    report = gate.report()
    assert report is not None and set(report) == SHADOW_KEYS
    assert report["samples"] == len(images)
    assert report["agreement"] == round(sum(same) / len(same), 4)
    assert report["p95_ms_old"] > 0 and report["p95_ms_new"] > 0
    if report["agreement"] >= EVERY_SAMPLE.min_agreement:
        assert gate.verdict() is None


def test_a_model_that_never_agrees_is_refused(
    engine: Engine, images: list[Path], variants: dict[str, Path]
) -> None:
    gate = ShadowGate(prepared(engine, variants["rotated"]), prepared(engine, ZOO / "v1"), EVERY_SAMPLE)
    live(engine, gate, images)
    report = gate.report()
    assert report is not None and report["agreement"] == 0.0
    verdict = gate.verdict()
    assert verdict is not None and "agreement with v1 0.0%" in verdict and "97.0% required" in verdict


def test_too_few_samples_decide_nothing(
    engine: Engine, images: list[Path], variants: dict[str, Path]
) -> None:
    gate = ShadowGate(prepared(engine, variants["rotated"]), prepared(engine, ZOO / "v1"), EVERY_SAMPLE)
    live(engine, gate, images[:9])
    assert gate.report() is not None and gate.verdict() is None


def test_a_much_slower_model_is_refused(
    engine: Engine, images: list[Path], variants: dict[str, Path]
) -> None:
    config = ShadowConfig(sample_rate=1.0, cpu_budget=1.0, min_samples=10, min_agreement=0.0)
    gate = ShadowGate(prepared(engine, variants["slow"]), prepared(engine, ZOO / "v1"), config)
    live(engine, gate, images[:30])
    report = gate.report()
    assert report is not None and report["agreement"] == 1.0, "same logits, so the same labels"
    assert report["p95_ms_new"] > report["p95_ms_old"]
    verdict = gate.verdict()
    assert verdict is not None and "more than the +20% allowed" in verdict, report


def test_the_cpu_budget_bounds_the_shadow_time(
    engine: Engine, images: list[Path], variants: dict[str, Path]
) -> None:
    config = ShadowConfig(sample_rate=1.0, cpu_budget=0.02)  # 20 ms of shadow per second
    old = prepared(engine, variants["slow"])  # the expensive one runs in shadow
    gate = ShadowGate(prepared(engine, ZOO / "v1"), old, config)
    started = time.monotonic()
    live(engine, gate, images)
    elapsed = time.monotonic() - started
    assert gate.skipped_for_budget > 0 and gate.samples < len(images)
    assert gate.spent_s <= config.cpu_budget * (elapsed + 1) + gate.longest_s


def test_sampling_takes_about_the_configured_share(engine: Engine, images: list[Path]) -> None:
    config = ShadowConfig(sample_rate=0.25, cpu_budget=1.0)
    gate = ShadowGate(
        prepared(engine, ZOO / "v1"), prepared(engine, ZOO / "v1"), config, rng=random.Random(3)
    )
    live(engine, gate, images)
    assert 5 <= gate.samples <= 25, gate.samples  # 15 expected of 60
    assert gate.report() is not None and gate.report()["agreement"] == 1.0  # type: ignore[index]


def test_bad_shadow_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="sample_rate"):
        ShadowConfig(sample_rate=1.5)
    with pytest.raises(ConfigError, match="cpu_budget"):
        ShadowConfig(cpu_budget=0)


def test_a_closed_gate_samples_nothing_more(engine: Engine, images: list[Path]) -> None:
    hub = ShadowHub()
    gate = ShadowGate(prepared(engine, ZOO / "v1"), prepared(engine, ZOO / "v1"), EVERY_SAMPLE)
    hub.attach("surface-defect", gate)
    live(engine, gate, images[:3])
    assert hub.detach("surface-defect") is gate and hub.gate("surface-defect") is None
    live(engine, gate, images[3:6])
    assert gate.samples == 3


# -- during probation, through the pipeline ---------------------------------------------------------
@pytest.fixture
def line_running(
    engine: Engine, data_dir: Path, images: list[Path], tmp_path: Path
) -> Iterator[tuple[Engine, ShadowHub]]:
    """v1 serving, the folder pipeline fed one image every 20 ms, its results handed to a shadow hub."""
    serve_v1(engine, data_dir)
    hub = ShadowHub()
    folders = {name: tmp_path / name for name in ("inbox", "processed", "rejected", "results")}
    for folder in folders.values():
        folder.mkdir()
    pipeline = FolderPipeline(
        engine, "surface-defect", *folders.values(), poll_s=0.01, on_inference=hub.observe
    )
    stop = threading.Event()

    def feed() -> None:
        n = 0
        while not stop.is_set():
            staged = folders["inbox"] / f".{n}.part"
            shutil.copyfile(images[n % len(images)], staged)
            staged.rename(folders["inbox"] / f"frame_{n:06d}.png")
            n += 1
            stop.wait(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    pipeline.start()
    feeder.start()
    try:
        yield engine, hub
    finally:
        stop.set()
        feeder.join()
        pipeline.stop()


def shadow_updater(
    engine: Engine, data_dir: Path, fleet: MemoryFleet, repo: TufRepository, hub: ShadowHub
) -> Updater:
    updater = make_updater(data_dir, engine, fleet, repo)
    updater.probation_s = 2.0
    updater.shadow_hub = hub
    updater.shadow = ShadowConfig(sample_rate=1.0, cpu_budget=1.0, min_samples=10, max_p95_increase=10.0)
    return updater


def test_probation_rolls_back_a_model_that_disagrees_in_shadow(
    line_running: tuple[Engine, ShadowHub],
    data_dir: Path,
    archives: dict[int, Path],
    variants: dict[str, Path],
    tmp_path: Path,
) -> None:
    engine, hub = line_running
    repo = new_fleet_tuf(tmp_path, archives)
    archive = archive_of(variants["rotated"])
    publish(repo, archive, 3)
    fleet = MemoryFleet(archive.read_bytes())
    updater = shadow_updater(engine, data_dir, fleet, repo, hub)
    asyncio.run(updater.handle_offer(offer_for(archive.read_bytes(), version=3)))
    final = fleet.statuses[-1]
    assert final.state is UpdateState.ROLLED_BACK, final
    assert final.reason.startswith("shadow: top-1 agreement with v1 0.0%")
    assert set(final.detail["shadow"]) == SHADOW_KEYS and final.detail["shadow"]["samples"] >= 10
    assert engine.get("surface-defect").manifest.version == 1
    assert hub.gate("surface-defect") is None, "the gate is gone with its probation"


def test_a_committed_update_reports_its_shadow_figures(
    line_running: tuple[Engine, ShadowHub], data_dir: Path, archives: dict[int, Path], tmp_path: Path
) -> None:
    engine, hub = line_running
    fleet = MemoryFleet(archives[2].read_bytes())
    updater = shadow_updater(engine, data_dir, fleet, new_fleet_tuf(tmp_path, archives), hub)
    updater.shadow = ShadowConfig(sample_rate=1.0, cpu_budget=1.0, min_agreement=0.5, max_p95_increase=10.0)
    asyncio.run(updater.handle_offer(offer_for(archives[2].read_bytes())))
    final = fleet.statuses[-1]
    assert final.state is UpdateState.COMMITTED, final
    shadow = final.detail["shadow"]
    assert set(shadow) == SHADOW_KEYS and shadow["samples"] > 0 and 0.5 <= shadow["agreement"] <= 1
    assert engine.get("surface-defect").manifest.version == 2
