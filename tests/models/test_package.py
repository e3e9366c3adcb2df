import io
import tarfile
from pathlib import Path

import pytest

from models.errors import PackageError
from models.package import pack, read_archive_manifest, unpack, verify_package


def test_pack_and_unpack_round_trip(tiny_package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tiny.tar"
    manifest = pack(tiny_package, archive)
    assert read_archive_manifest(archive) == manifest
    assert unpack(archive, tmp_path / "out") == manifest
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (tiny_package / "model.onnx").read_bytes()


def test_pack_is_reproducible(tiny_package: Path, tmp_path: Path) -> None:
    pack(tiny_package, tmp_path / "a.tar")
    pack(tiny_package, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_a_changed_file_fails_verification(tiny_package: Path) -> None:
    model = tiny_package / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"!")
    with pytest.raises(PackageError, match="sha256"):
        verify_package(tiny_package)


def test_truncated_archive_is_refused(tiny_package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tiny.tar"
    pack(tiny_package, archive)
    archive.write_bytes(archive.read_bytes()[:1500])
    with pytest.raises(PackageError):
        unpack(archive, tmp_path / "out")


def _tar(members: list[tarfile.TarInfo], data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "sub/file"])
def test_paths_that_escape_are_refused(tmp_path: Path, name: str) -> None:
    member = tarfile.TarInfo(name)
    member.size = 3
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_tar([member], b"abc"))
    with pytest.raises(PackageError, match="not a plain file name"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_links_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("manifest.json")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = tmp_path / "link.tar"
    archive.write_bytes(_tar([link]))
    with pytest.raises(PackageError, match="not a plain file"):
        unpack(archive, tmp_path / "out")


def test_oversized_archive_is_refused(tiny_package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tiny.tar"
    pack(tiny_package, archive)
    with pytest.raises(PackageError, match="more than"):
        unpack(archive, tmp_path / "out", max_bytes=100)


def test_unpack_needs_an_empty_folder(tiny_package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tiny.tar"
    pack(tiny_package, archive)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(PackageError, match="not empty"):
        unpack(archive, tmp_path / "out")
