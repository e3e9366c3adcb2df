"""TVM records shipped inside model packages: the manifest field, hashing, packaging and deltas.

None of this needs TVM: records are plain files to a package. The device side (compiling with
them) is tests/device/engine/test_tvm_package_records.py.
"""

import gzip
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from models.errors import ManifestError, PackageError
from models.manifest import (
    MAX_TVM_RECORDS,
    MAX_TVM_RECORDS_BYTES,
    MAX_TVM_TUNING_BYTES,
    Manifest,
    load_manifest,
    parse_manifest,
)
from models.package import MANIFEST, pack, unpack, verify_package, write_manifest
from models.package_delta import apply_package_delta, build_package_delta, manifest_sha256
from models.tvm_tuning import META_FILE, TuningError, TuningMeta, main, package_file_names, package_records
from tests.conftest import ZOO

from .conftest import FIELDS

ROOT = ZOO / "tvm"  # the committed records root: <model sha256>/<target key>/
SHA = "0" * 64
NAMES = package_file_names("model.onnx", "x86_64-znver3")
ENTRY = {
    "model": "model.onnx",
    "target": "x86_64-znver3",
    "tuning": NAMES[0],
    "workloads": NAMES[1],
    "records": NAMES[2],
}
FILES = {
    "model.onnx": {"size": 10, "sha256": SHA},
    "model.int8.onnx": {"size": 5, "sha256": SHA},
    "golden.npz": {"size": 5, "sha256": SHA},
    **{name: {"size": 100, "sha256": SHA} for name in NAMES},
}
INT8 = {"file": "model.int8.onnx", "format": "onnx", "precision": "int8"}


def raw(**changes: Any) -> bytes:
    fields = {
        **FIELDS,
        "golden": {"file": "golden.npz"},
        "variants": [INT8],
        "tvm_records": [ENTRY],
        "files": FILES,
    }
    return json.dumps({**fields, **changes}).encode()


def _committed_folder(manifest: Manifest) -> Path:
    (folder,) = (ROOT / manifest.files[manifest.model_file].sha256).iterdir()
    return folder


def _without_records(source: Path, dest: Path) -> Path:
    """A copy of a package with its TVM records taken out, as a package built before them was."""
    folder = Path(shutil.copytree(source, dest))
    manifest = load_manifest(folder)
    shipped = {name for entry in manifest.tvm_records for name in entry.file_names}
    fields = manifest.model_dump(mode="json", by_alias=True, exclude={"files", "tvm_records"})
    write_manifest(folder, fields, [name for name in manifest.files if name not in shipped])
    for name in shipped:
        (folder / name).unlink()
    return folder


def _retargeted(folder: Path, dest: Path, mtriple: str, mcpu: str) -> Path:
    """A copy of a records folder that says it was tuned for another CPU."""
    copy = Path(shutil.copytree(folder, dest))
    meta = json.loads((copy / META_FILE).read_text())
    meta["target"] = {"kind": "llvm", "mtriple": mtriple, "mcpu": mcpu}
    (copy / META_FILE).write_text(json.dumps(meta))
    return copy


# -- the manifest field -----------------------------------------------------------------------------
def test_an_entry_parses_reads_back_and_its_files_are_referenced() -> None:
    manifest = parse_manifest(raw())
    (entry,) = manifest.tvm_records
    assert (entry.model, entry.target, entry.file_names) == ("model.onnx", "x86_64-znver3", NAMES)
    assert parse_manifest(manifest.to_json()) == manifest


def test_a_manifest_without_records_keeps_its_bytes() -> None:
    manifest = parse_manifest(raw(tvm_records=[]))
    assert "tvm_records" not in manifest.to_json(), "an older package's manifest reads back as it was"


def test_records_for_a_variant_are_allowed() -> None:
    names = package_file_names("model.int8.onnx", "aarch64-cortex-a76")
    files = {**FILES, **{name: {"size": 1, "sha256": SHA} for name in names}}
    variant = {"model": "model.int8.onnx", "target": "aarch64-cortex-a76", "tuning": names[0]}
    variant |= {"workloads": names[1], "records": names[2]}
    assert len(parse_manifest(raw(tvm_records=[ENTRY, variant], files=files)).tvm_records) == 2


def _entry(**changes: str) -> dict[str, str]:
    return {**ENTRY, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tvm_records": [_entry(tuning="tvm/x86_64-znver3/tuning.json")]}, "tvm_records.0.tuning"),
        ({"tvm_records": [_entry(records="../records.json.gz")]}, "tvm_records.0.records"),
        ({"tvm_records": [_entry(target="../../etc")]}, "tvm_records.0.target"),
        ({"tvm_records": [_entry(target="znver3")]}, "tvm_records.0.target"),
        ({"tvm_records": [{**ENTRY, "folder": "tvm"}]}, "tvm_records.0.folder"),
        ({"tvm_records": [_entry(model="golden.npz")]}, "not an ONNX model of this package"),
        ({"tvm_records": [ENTRY, ENTRY]}, r"tvm_records\.1'.*listed twice"),
        ({"tvm_records": [_entry(tuning="golden.npz")]}, "already used by golden"),
        ({"tvm_records": [_entry(workloads="model.onnx")]}, "already used by model_file"),
        ({"tvm_records": [_entry(records=NAMES[1])]}, "already used by tvm_records.0"),
        ({"tvm_records": [_entry(tuning="absent.json")]}, "'files' lacks 'absent.json'"),
        ({"tvm_records": [ENTRY] * (MAX_TVM_RECORDS + 1)}, "tvm_records"),
    ],
)
def test_bad_entries_are_refused_with_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw(**changes))


def test_oversized_records_are_refused() -> None:
    big = {**FILES, NAMES[1]: {"size": MAX_TVM_RECORDS_BYTES, "sha256": SHA}}
    with pytest.raises(ManifestError, match=r"tvm_records\.0'.*over the .* limit; ship the pruned"):
        parse_manifest(raw(files=big))
    tuning = {**FILES, NAMES[0]: {"size": MAX_TVM_TUNING_BYTES + 1, "sha256": SHA}}
    with pytest.raises(ManifestError, match=r"model\.tvm-x86_64-znver3\.tuning\.json is over"):
        parse_manifest(raw(files=tuning))


def test_records_for_a_tflite_package_are_refused() -> None:
    with pytest.raises(ManifestError, match="not an ONNX model of this package"):
        parse_manifest(raw(format="tflite", model_file="model.onnx", variants=[]))


# -- the sample packages ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_sample_packages_ship_the_committed_records_under_their_hashes(version: str) -> None:
    manifest = verify_package(ZOO / version)
    committed = _committed_folder(manifest)
    (entry,) = manifest.tvm_records
    assert (entry.model, entry.target) == ("model.onnx", committed.name)
    for shipped, original in zip(
        entry.file_names,
        (META_FILE, "database_workload.json.gz", "database_tuning_record.json.gz"),
        strict=True,
    ):
        assert (ZOO / version / shipped).read_bytes() == (committed / original).read_bytes(), shipped
    meta = TuningMeta.read(committed)
    assert meta.model_sha256 == manifest.files["model.onnx"].sha256
    assert meta.comparison is not None, "the zoo's records carry their comparison with ONNX Runtime"
    assert sum(manifest.files[name].size for name in entry.file_names) < 100_000


def test_package_records_rebuilds_the_builders_manifest_byte_for_byte(tmp_path: Path) -> None:
    package = _without_records(ZOO / "v1", tmp_path / "v1")
    assert "tvm_records" not in (package / MANIFEST).read_text()
    package_records(package, [ROOT])
    assert (package / MANIFEST).read_bytes() == (ZOO / "v1" / MANIFEST).read_bytes()
    package_records(package, [ROOT])  # again: the same entry is replaced, nothing is left behind
    assert (package / MANIFEST).read_bytes() == (ZOO / "v1" / MANIFEST).read_bytes()
    assert sorted(p.name for p in package.iterdir()) == sorted([MANIFEST, *load_manifest(ZOO / "v1").files])


def test_package_records_adds_another_target_beside_the_first(tmp_path: Path) -> None:
    package = Path(shutil.copytree(ZOO / "v1", tmp_path / "v1"))
    arm = _retargeted(
        _committed_folder(load_manifest(package)), tmp_path / "arm", "aarch64-linux-gnu", "cortex-a76"
    )
    manifest = package_records(package, [arm])
    assert [(e.model, e.target) for e in manifest.tvm_records] == [
        ("model.onnx", "aarch64-cortex-a76"),
        ("model.onnx", "x86_64-znver3"),
    ]
    assert verify_package(package) == manifest
    shipped = package / package_file_names("model.onnx", "aarch64-cortex-a76")[0]
    assert json.loads(shipped.read_text())["target"]["mcpu"] == "cortex-a76"


def test_records_of_another_model_file_are_refused(tmp_path: Path) -> None:
    package = _without_records(ZOO / "v1", tmp_path / "v1")
    before = sorted(p.name for p in package.iterdir())
    v2_records = _committed_folder(load_manifest(ZOO / "v2"))
    with pytest.raises(TuningError, match="adopt them for this file first"):
        package_records(package, [v2_records])
    with pytest.raises(TuningError, match="no records for sha256"):
        package_records(package, [tmp_path / "empty-root"])
    assert sorted(p.name for p in package.iterdir()) == before
    verify_package(package)


def test_records_over_the_limit_leave_the_package_as_it_was(tmp_path: Path) -> None:
    package = _without_records(ZOO / "v1", tmp_path / "v1")
    manifest_before = (package / MANIFEST).read_bytes()
    records = Path(shutil.copytree(_committed_folder(load_manifest(package)), tmp_path / "big"))
    (records / "database_workload.json.gz").write_bytes(b"\0" * (MAX_TVM_RECORDS_BYTES + 1))
    with pytest.raises(ManifestError, match="over the"):
        package_records(package, [records])
    assert (package / MANIFEST).read_bytes() == manifest_before
    assert not any(p.name.startswith("model.tvm-") for p in package.iterdir())


def test_the_cli_ships_records_and_says_how_much(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = _without_records(ZOO / "v2", tmp_path / "v2")
    assert main(["package-records", str(package), "--records", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert "model.onnx on x86_64-znver3" in out and "bytes" in out
    assert (package / MANIFEST).read_bytes() == (ZOO / "v2" / MANIFEST).read_bytes()
    assert main(["package-records", str(package), "--records", str(tmp_path / "nowhere")]) == 1
    assert "no records for sha256" in capsys.readouterr().err


# -- hashes cover them ------------------------------------------------------------------------------
def test_a_tampered_records_file_fails_verification(tmp_path: Path) -> None:
    package = Path(shutil.copytree(ZOO / "v1", tmp_path / "v1"))
    (entry,) = load_manifest(package).tvm_records
    target = package / entry.records
    # Still a valid gzip of valid JSON lines, so only the hash can tell.
    lines = gzip.decompress(target.read_bytes()).decode().splitlines()
    target.write_bytes(gzip.compress(("\n".join(lines[1:]) + "\n").encode(), mtime=0))
    with pytest.raises(PackageError, match=entry.records):
        verify_package(package)
    with pytest.raises(PackageError, match=entry.records):
        pack(package, tmp_path / "refused.tar")


def test_a_tampered_records_member_is_refused_on_unpack(tmp_path: Path) -> None:
    archive = tmp_path / "v1.tar"
    pack(ZOO / "v1", archive)
    (entry,) = load_manifest(ZOO / "v1").tvm_records
    raw_tar = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = tar.getmember(entry.workloads)
        raw_tar[member.offset_data + member.size // 2] ^= 0xFF
    archive.write_bytes(bytes(raw_tar))
    with pytest.raises(PackageError, match=entry.workloads.replace(".", r"\.")):
        unpack(archive, tmp_path / "slot")


def test_a_missing_records_file_fails_verification(tmp_path: Path) -> None:
    package = Path(shutil.copytree(ZOO / "v1", tmp_path / "v1"))
    (entry,) = load_manifest(package).tvm_records
    (package / entry.tuning).unlink()
    with pytest.raises(PackageError, match="lacks the file"):
        verify_package(package)


def test_packages_with_records_pack_and_unpack_whole(tmp_path: Path) -> None:
    archive = tmp_path / "v2.tar"
    manifest = pack(ZOO / "v2", archive)
    assert unpack(archive, tmp_path / "slot") == manifest
    for name in manifest.tvm_records[0].file_names:
        assert (tmp_path / "slot" / name).read_bytes() == (ZOO / "v2" / name).read_bytes()


# -- deltas carry them like any file ----------------------------------------------------------------
def test_a_delta_that_adds_records_rebuilds_the_package(tmp_path: Path) -> None:
    base = _without_records(ZOO / "v1", tmp_path / "base")
    delta = tmp_path / "add.pdelta"
    index = build_package_delta(base, ZOO / "v1", delta)
    (entry,) = load_manifest(ZOO / "v1").tvm_records
    assert {index.files[name].mode for name in entry.file_names} == {"zstd"}
    assert index.files["model.onnx"].mode == "copy"
    out = tmp_path / "slot"
    apply_package_delta(delta, base, out, manifest_sha256(ZOO / "v1"))
    assert verify_package(out) == load_manifest(ZOO / "v1")
    assert delta.stat().st_size < 120_000  # the records, compressed, and little else


def test_records_that_did_not_change_cost_a_delta_nothing(tmp_path: Path) -> None:
    """v2's records are v1's adopted: the database files are the same bytes, so they are copied."""
    v1, v2 = load_manifest(ZOO / "v1"), load_manifest(ZOO / "v2")
    (old,), (new,) = v1.tvm_records, v2.tvm_records
    assert v1.files[old.workloads] == v2.files[new.workloads]
    assert v1.files[old.records] == v2.files[new.records]
    target = Path(shutil.copytree(ZOO / "v1", tmp_path / "v1b"))
    arm = _retargeted(_committed_folder(v1), tmp_path / "arm", "aarch64-linux-gnu", "cortex-a76")
    package_records(target, [arm])
    delta = tmp_path / "v1-v1b.pdelta"
    index = build_package_delta(ZOO / "v1", target, delta)
    assert {index.files[name].mode for name in old.file_names} == {"copy"}
    apply_package_delta(delta, ZOO / "v1", tmp_path / "slot", manifest_sha256(target))
    assert verify_package(tmp_path / "slot") == load_manifest(target)
