"""The TVM backend with records that ship inside the model package: real TVM, real packages, real slots.

The committed records (models/zoo/surface_defect/tvm/) were tuned on an AMD EPYC (x86_64-znver3).
On another CPU the tests retarget a copy to this machine's key before packaging it: the schedules
still compile and give the same numbers there, which is what these test (not their speed).
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device.engine.backends.tvm_backend import CACHE_ENV, RECORDS_ENV, TvmBackend
from device.engine.engine import Engine, load_golden
from device.engine.probe import HardwareProfile, llvm_target_parts
from device.engine.registry import select_and_load
from device.errors import EngineError, NoBackendAvailable
from device.slots import ModelSlots, install_initial
from models.manifest import Manifest, load_manifest
from models.package import pack, write_manifest
from models.tvm_tuning import (
    META_FILE,
    MIN_SPEEDUP,
    Comparison,
    RecordsFiles,
    TuningError,
    TuningMeta,
    compare,
    host_target,
    main,
    package_records,
    record_comparison,
    target_key,
)
from tests.conftest import ZOO

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgefleet[tvm]')")
pytest.importorskip("onnx", reason="the TVM backend imports ONNX models with the onnx package")

ATOL = 1e-4  # TVM and ONNX Runtime sum the convolutions in different orders (~1e-5 here)
V1 = load_manifest(ZOO / "v1")
COMMITTED = ZOO / "tvm" / V1.files["model.onnx"].sha256 / "x86_64-znver3"


@pytest.fixture(scope="module")
def key(tvm_profile: HardwareProfile) -> str:
    return target_key(llvm_target_parts(tvm_profile))


@pytest.fixture(autouse=True)
def no_records_roots(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Records come from the package only, and compiled libraries go to one shared temp cache."""
    monkeypatch.delenv(RECORDS_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "tvm-cache"))


def _records(dest: Path, target: dict[str, str], speedup: float | None) -> Path:
    """The committed v1 records, said to be tuned for `target`, with a comparison of `speedup`."""
    folder = Path(shutil.copytree(COMMITTED, dest))
    meta = json.loads((folder / META_FILE).read_text())
    meta["target"] = target
    meta.pop("onnxruntime", None)
    (folder / META_FILE).write_text(json.dumps(meta))
    if speedup is not None:
        # Figures as `compare` would keep them, chosen to put TVM on one side of MIN_SPEEDUP or the other.
        stated = Comparison(
            batch=1,
            threads=1,
            tvm_ms=1.0,
            onnxruntime_ms=speedup,
            onnxruntime_version="test",
            repeats=1,
            calls=1,
            cpu="test input",
            measured="2026-01-01T00:00:00+00:00",
        )
        record_comparison(folder, stated)
    return folder


def _package(dest: Path, records: Path) -> Path:
    """v1 with only `records` shipped in it (the zoo's own are taken out first)."""
    folder = Path(shutil.copytree(ZOO / "v1", dest))
    shipped = {name for entry in V1.tvm_records for name in entry.file_names}
    fields = V1.model_dump(mode="json", by_alias=True, exclude={"files", "tvm_records"})
    write_manifest(folder, fields, [name for name in V1.files if name not in shipped])
    for name in shipped:
        (folder / name).unlink()
    package_records(folder, [records])
    return folder


def _install(tmp: Path, package: Path) -> Path:
    """Pack and install into slot a of a device's models folder, as provisioning does."""
    archive = tmp / "package.tar"
    pack(package, archive)
    install_initial(tmp / "models", archive)
    return ModelSlots(tmp / "models" / V1.name).current


def _with_tuning_meta(slot: Path, dest: Path, **changes: object) -> tuple[Path, Manifest]:
    """A copy of an installed package whose shipped tuning meta has `changes`, with its manifest
    rewritten to match, so the edit passes the file hashes and only the meta's content is judged."""
    manifest = load_manifest(slot)
    copy = Path(shutil.copytree(slot.resolve(), dest))
    (entry,) = manifest.tvm_records
    meta = json.loads((copy / entry.tuning).read_text())
    (copy / entry.tuning).write_text(json.dumps({**meta, **changes}))
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"files"})
    return copy, write_manifest(copy, fields, list(manifest.files))


Installer = Callable[[float | None], Path]


@pytest.fixture
def installed(tmp_path: Path, tvm_profile: HardwareProfile) -> Installer:
    """An installed package whose records fit this CPU, compared at the given speedup (or not)."""

    def make(speedup: float | None) -> Path:
        target = {k: v for k, v in llvm_target_parts(tvm_profile).items() if k in ("kind", "mtriple", "mcpu")}
        return _install(tmp_path, _package(tmp_path / "pkg", _records(tmp_path / "rec", target, speedup)))

    return make


def _ort(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"image": x})[0])


def test_tvm_runs_a_model_with_the_records_its_installed_package_ships(
    installed: Installer, tvm_profile: HardwareProfile
) -> None:
    slot = installed(None)
    manifest = load_manifest(slot)
    backend = TvmBackend()  # no records roots, no EDGEFLEET_TVM_RECORDS
    assert backend.records_roots == []
    assert backend.unavailable_reason(tvm_profile, manifest) is None
    serving = Engine(tvm_profile, backends=[backend]).prepare(slot, manifest)  # golden vectors and budget
    assert serving.backend == "tvm"
    assert getattr(serving.model, "records_source", "").startswith("the package (model.tvm-")
    inputs, expected = load_golden(slot, manifest)
    np.testing.assert_allclose(serving.model.run(inputs)["logits"], expected["logits"], atol=1e-3)
    rng = np.random.default_rng(3)
    for rows in (1, 3, 8, 11):  # compiled for batches 1 and 8
        x = rng.normal(size=(rows, 3, 64, 64)).astype(np.float32)
        got = serving.model.run({"image": x})["logits"]
        np.testing.assert_allclose(got, _ort(slot / "model.onnx", x), atol=ATOL, rtol=0)
    serving.model.close()


def test_the_device_prefers_tvm_where_its_records_were_measured_faster(
    installed: Installer, tvm_profile: HardwareProfile
) -> None:
    slot = installed(2.0)
    serving = Engine(tvm_profile).prepare(slot, load_manifest(slot))  # the registry's own order
    assert serving.backend == "tvm", serving.passed_over
    serving.model.close()


def test_records_measured_slower_step_aside_for_onnxruntime_even_when_pinned(
    installed: Installer, tvm_profile: HardwareProfile
) -> None:
    slot = installed(0.78)
    manifest = load_manifest(slot)
    serving = Engine(tvm_profile).prepare(slot, manifest)
    assert serving.backend == "onnxruntime-cpu"
    reason = serving.passed_over["tvm"]
    assert "found in the package" in reason and "0.78x ONNX Runtime's speed" in reason
    assert f"must reach {MIN_SPEEDUP}x" in reason
    with pytest.raises(NoBackendAvailable, match=r"0\.78x"):
        select_and_load(slot / "model.onnx", manifest, tvm_profile, pinned="tvm")
    # An explicit backend list is the caller's own choice (tests, benchmarks): TVM loads.
    model = TvmBackend().load(slot / "model.onnx", manifest, tvm_profile)
    assert model.run({"image": np.zeros((1, 3, 64, 64), np.float32)})["logits"].shape == (1, 4)
    model.close()


def test_records_for_another_cpu_are_ignored_with_the_reason(
    tmp_path: Path, tvm_profile: HardwareProfile, key: str
) -> None:
    other = (
        ("aarch64-linux-gnu", "cortex-a76") if key != "aarch64-cortex-a76" else ("x86_64-linux-gnu", "znver4")
    )
    target = {"kind": "llvm", "mtriple": other[0], "mcpu": other[1]}
    slot = _install(tmp_path, _package(tmp_path / "pkg", _records(tmp_path / "rec", target, None)))
    manifest = load_manifest(slot)
    other_key = target_key(target)
    expected = f"the package ships TVM records for {other_key} only, this CPU is {key}"
    assert expected in (TvmBackend().unavailable_reason(tvm_profile, manifest) or "")
    selection = select_and_load(slot / "model.onnx", manifest, tvm_profile)
    assert selection.backend == "onnxruntime-cpu"
    assert expected in selection.passed_over["tvm"]
    with pytest.raises(EngineError, match=f"no TVM records for model.onnx .* on {key}"):
        TvmBackend().load(slot / "model.onnx", manifest, tvm_profile)


def test_the_sample_package_says_what_its_records_are_worth_here(
    tvm_profile: HardwareProfile, key: str
) -> None:
    selection = select_and_load(ZOO / "v2" / "model.onnx", load_manifest(ZOO / "v2"), tvm_profile)
    assert selection.backend == "onnxruntime-cpu"
    reason = selection.passed_over["tvm"]
    if key == "x86_64-znver3":  # where they were tuned and measured slower than ONNX Runtime
        assert (
            "found in the package (model.tvm-x86_64-znver3.*)" in reason and "ONNX Runtime's speed" in reason
        )
    else:
        assert f"ships TVM records for x86_64-znver3 only, this CPU is {key}" in reason


def test_package_records_come_first_then_the_roots(
    tmp_path: Path, installed: Installer, tvm_profile: HardwareProfile, key: str
) -> None:
    slot = installed(None)
    manifest = load_manifest(slot)
    sha = manifest.files["model.onnx"].sha256
    root = tmp_path / "root"
    shutil.copytree(tmp_path / "rec", root / sha / key)  # the same records the package ships
    first = TvmBackend(records_roots=[root]).load(slot / "model.onnx", manifest, tvm_profile)
    assert first.records_source.startswith("the package")
    first.close()
    # The package's records are for another TVM: the root's are used, and the reason says why.
    copy, changed = _with_tuning_meta(slot, tmp_path / "copy", tvm_version="0.99.0")
    second = TvmBackend(records_roots=[root]).load(copy / "model.onnx", changed, tvm_profile)
    assert second.records_source == f"records root {root}"
    second.close()
    reason = TvmBackend().preference_reason(copy / "model.onnx", changed, tvm_profile) or ""
    assert "tuned with TVM 0.99.0" in reason


def test_stale_records_for_an_edited_model_are_not_used(
    tmp_path: Path, installed: Installer, tvm_profile: HardwareProfile
) -> None:
    """A package rewritten around a changed model file but still listing the old records."""
    slot = installed(None)
    manifest = load_manifest(slot)
    copy = Path(shutil.copytree(slot.resolve(), tmp_path / "edited"))
    shutil.copyfile(ZOO / "v2" / "model.onnx", copy / "model.onnx")
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"files"})
    edited = write_manifest(copy, fields, list(manifest.files))
    reason = TvmBackend().preference_reason(copy / "model.onnx", edited, tvm_profile) or ""
    assert "tuned for sha256 96357cb224e7, not this model file (d21a45c5381e)" in reason
    selection = select_and_load(copy / "model.onnx", edited, tvm_profile)
    assert selection.backend == "onnxruntime-cpu" and "not this model file" in selection.passed_over["tvm"]


# -- compare: the measurement the preference rests on ---------------------------------------------------
def test_compare_times_tvm_against_onnxruntime_and_keeps_the_figures(tmp_path: Path) -> None:
    here = host_target()
    records = _records(tmp_path / "rec", {k: here[k] for k in ("kind", "mtriple", "mcpu")}, None)
    result = compare(ZOO / "v1" / "model.onnx", records, calls=5, repeats=3)
    assert result.batch == 1 and result.threads >= 1 and (result.repeats, result.calls) == (3, 5)
    assert 0 < result.tvm_ms < 1000 and 0 < result.onnxruntime_ms < 1000
    assert result.speedup == pytest.approx(result.onnxruntime_ms / result.tvm_ms)
    record_comparison(records, result)
    assert TuningMeta.read(records).comparison == result


def test_compare_refuses_records_of_another_cpu_or_model(tmp_path: Path) -> None:
    arm = _records(
        tmp_path / "arm", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}, None
    )
    if target_key(host_target()) != "aarch64-cortex-a76":
        with pytest.raises(TuningError, match="compare on a machine of the records' target"):
            compare(ZOO / "v1" / "model.onnx", arm, calls=1, repeats=1)
    here = host_target()
    records = _records(tmp_path / "here", {k: here[k] for k in ("kind", "mtriple", "mcpu")}, None)
    with pytest.raises(TuningError, match="tuned for sha256 96357cb224e7"):
        compare(ZOO / "v2" / "model.onnx", records, calls=1, repeats=1)


def test_compare_threads_must_be_set_before_tvm_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["compare", str(ZOO / "v1" / "model.onnx"), "--records", str(COMMITTED), "--threads", "1"]) == 1
    )
    assert "--threads must be set before TVM is imported" in capsys.readouterr().err


def test_the_committed_comparison_is_what_the_sample_packages_carry() -> None:
    for version in ("v1", "v2"):
        manifest = load_manifest(ZOO / version)
        (entry,) = manifest.tvm_records
        shipped = TuningMeta.read(RecordsFiles.in_package(ZOO / version, entry))
        assert shipped.comparison is not None and shipped.comparison.threads == 1
        assert shipped.model_sha256 == manifest.files["model.onnx"].sha256


def test_an_unreadable_comparison_passes_tvm_over_with_the_reason(
    tmp_path: Path, installed: Installer, tvm_profile: HardwareProfile
) -> None:
    slot = installed(None)
    copy, changed = _with_tuning_meta(slot, tmp_path / "copy", onnxruntime={"tvm_ms": "fast"})
    selection = select_and_load(copy / "model.onnx", changed, tvm_profile)
    assert selection.backend == "onnxruntime-cpu"
    assert "onnxruntime comparison is invalid" in selection.passed_over["tvm"]


def test_records_that_inflate_past_the_bound_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import tvm_tuning

    monkeypatch.setattr(tvm_tuning, "MAX_RECORDS_DECODED_BYTES", 1000)  # the real bound is 64 MiB
    with pytest.raises(TuningError, match="inflates past 1000 bytes"):
        tvm_tuning.load_records(COMMITTED)
