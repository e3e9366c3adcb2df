import hashlib
import shutil
import tarfile
from pathlib import Path

import pytest

from models.errors import PackageError
from models.package import hash_file, pack, verify_package
from models.package_delta import (
    DeltaIndex,
    apply_package_delta,
    build_package_delta,
    manifest_sha256,
    read_index,
)
from tests.conftest import ZOO

V1, V2 = ZOO / "v1", ZOO / "v2"


@pytest.fixture(scope="module")
def v1_v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeltaIndex]:
    """Encoding is the slow part: the tests share one v1 -> v2 delta and only read it."""
    delta = tmp_path_factory.mktemp("pdelta") / "v1-v2.pdelta"
    return delta, build_package_delta(V1, V2, delta)


def _same_folder(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


def test_a_fine_tune_travels_as_a_small_delta_and_rebuilds_byte_for_byte(
    tmp_path: Path, v1_v2: tuple[Path, DeltaIndex]
) -> None:
    delta, index = v1_v2
    assert (index.base.version, index.target.version) == (1, 2)
    assert index.files["model.onnx"].mode == "delta"
    archive = tmp_path / "v2.tar"
    pack(V2, archive)
    assert delta.stat().st_size < 0.9 * archive.stat().st_size

    out = tmp_path / "slot"
    manifest = apply_package_delta(delta, V1, out, manifest_sha256(V2))
    assert manifest.version == 2
    _same_folder(out, V2)
    assert read_index(delta) == index


def test_identical_files_are_copied_from_the_base_not_sent(tmp_path: Path) -> None:
    v2b = tmp_path / "v2b"
    shutil.copytree(V2, v2b)
    delta = tmp_path / "v2-v2b.pdelta"
    index = build_package_delta(V2, v2b, delta)
    assert {plan.mode for plan in index.files.values()} == {"copy"}
    apply_package_delta(delta, V2, tmp_path / "slot", manifest_sha256(v2b))
    _same_folder(tmp_path / "slot", v2b)


def test_a_delta_for_another_base_is_refused_before_anything_is_written(
    tmp_path: Path, v1_v2: tuple[Path, DeltaIndex]
) -> None:
    delta, _ = v1_v2
    out = tmp_path / "slot"
    with pytest.raises(
        PackageError, match="built against surface-defect v1, this device has surface-defect v2"
    ):
        apply_package_delta(delta, V2, out, manifest_sha256(V2))
    assert list(out.iterdir()) == []


def test_a_manifest_other_than_the_signed_one_is_refused(
    tmp_path: Path, v1_v2: tuple[Path, DeltaIndex]
) -> None:
    delta, _ = v1_v2
    out = tmp_path / "slot"
    with pytest.raises(PackageError, match="not the one the signed metadata names"):
        apply_package_delta(delta, V1, out, hashlib.sha256(b"another manifest").hexdigest())
    assert list(out.iterdir()) == []


def test_a_corrupted_delta_member_never_yields_a_package(
    tmp_path: Path, v1_v2: tuple[Path, DeltaIndex]
) -> None:
    delta, _ = v1_v2
    raw = bytearray(delta.read_bytes())
    with tarfile.open(delta) as tar:
        member = tar.getmember("deltas/model.onnx")
        middle = member.offset_data + member.size // 2
    raw[middle] ^= 0xFF
    bad = tmp_path / "bad.pdelta"
    bad.write_bytes(bytes(raw))
    with pytest.raises(PackageError):
        apply_package_delta(bad, V1, tmp_path / "slot", manifest_sha256(V2))


@pytest.mark.parametrize("cut", [0.001, 0.3, 0.6, 0.99])
def test_a_truncated_delta_is_refused(tmp_path: Path, v1_v2: tuple[Path, DeltaIndex], cut: float) -> None:
    delta, _ = v1_v2
    with tarfile.open(delta) as tar:
        last = tar.getmembers()[-1]
        data_end = last.offset_data + last.size  # past it is only the tar's zero padding
    bad = tmp_path / "cut.pdelta"
    bad.write_bytes(delta.read_bytes()[: int(data_end * cut)])
    with pytest.raises(PackageError):
        apply_package_delta(bad, V1, tmp_path / "slot", manifest_sha256(V2))


def test_base_and_target_must_be_the_same_model(tmp_path: Path, tiny_package: Path) -> None:
    with pytest.raises(PackageError, match="versions of one model"):
        build_package_delta(tiny_package, V2, tmp_path / "x.pdelta")


def test_the_rebuilt_package_verifies_and_packs_to_the_fleets_archive(
    tmp_path: Path, v1_v2: tuple[Path, DeltaIndex]
) -> None:
    delta, _ = v1_v2
    out = tmp_path / "slot"
    apply_package_delta(delta, V1, out, manifest_sha256(V2))
    verify_package(out)
    pack(out, tmp_path / "rebuilt.tar")
    pack(V2, tmp_path / "original.tar")
    assert hash_file(tmp_path / "rebuilt.tar") == hash_file(tmp_path / "original.tar")
