"""Model packages: a folder with `manifest.json` and the files it lists, or a tar archive of it.

`verify_package` is the gate: nothing loads a package whose files do not match the manifest
byte for byte. Unpacking refuses links, paths and sizes it was not told to expect, so a hostile
archive can neither escape its folder nor fill the disk.
"""

import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from models.errors import PackageError
from models.fsutil import fsync_dir
from models.manifest import FileEntry, Manifest, load_manifest, parse_manifest, referenced_files

MANIFEST = "manifest.json"
DEFAULT_MAX_PACKAGE_BYTES = 512 * 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BLOCK = 1024 * 1024


def hash_file(path: Path) -> FileEntry:
    """Size and sha256 of a file, read in blocks so memory stays flat."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return FileEntry(size=size, sha256=digest.hexdigest())


def write_manifest(folder: Path, fields: dict[str, Any], files: list[str]) -> Manifest:
    """Write `manifest.json` for `folder` from `fields`, hashing into it each of `files` and every
    file the fields name (model, golden vectors, calibration set, variants)."""
    named = referenced_files(Manifest.model_validate({**fields, "files": {}}))
    entries = {name: hash_file(folder / name).model_dump() for name in sorted({*files, *named})}
    manifest = parse_manifest(Manifest.model_validate({**fields, "files": entries}).to_json())
    (folder / MANIFEST).write_text(manifest.to_json())
    return manifest


def verify_package(folder: Path) -> Manifest:
    """Check every listed file's size and sha256; return the manifest or raise PackageError."""
    manifest = load_manifest(folder)
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise PackageError(f"package {folder} lacks the file {name!r} its manifest lists")
        actual = hash_file(path)
        if actual.size != expected.size:
            raise PackageError(f"{name}: {actual.size} bytes on disk, manifest says {expected.size}")
        if actual.sha256 != expected.sha256:
            raise PackageError(f"{name}: sha256 {actual.sha256[:16]}... does not match the manifest")
    return manifest


def pack(folder: Path, archive: Path) -> Manifest:
    """Verify `folder` and write it as a reproducible tar (fixed order, owner and mtime)."""
    manifest = verify_package(folder)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in [MANIFEST, *sorted(manifest.files)]:
            info = tarfile.TarInfo(name)
            info.size = (folder / name).stat().st_size
            info.mode = 0o644
            with (folder / name).open("rb") as f:
                tar.addfile(info, f)
    return manifest


def unpack(archive: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> Manifest:
    """Extract a package archive into the empty folder `dest` and verify it.

    Only regular files with plain names are accepted, each at most the size the manifest lists
    and all together at most `max_bytes`; the manifest must come first.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise PackageError(f"refusing to unpack into {dest}: the folder is not empty")
    try:
        with tarfile.open(archive, "r:") as tar:
            manifest = _extract_members(tar, dest, max_bytes)
    except (tarfile.TarError, EOFError) as e:
        raise PackageError(f"{archive} is not a readable package archive: {e}") from e
    return _verify_unpacked(dest, manifest)


def _extract_members(tar: tarfile.TarFile, dest: Path, max_bytes: int) -> Manifest:
    manifest: Manifest | None = None
    total = 0
    for member in tar:
        if not member.isfile() or not _SAFE_NAME.match(member.name):
            raise PackageError(f"archive member {member.name!r} is not a plain file name; refused")
        total += member.size
        if total > max_bytes:
            raise PackageError(f"archive holds more than {max_bytes} bytes; refused")
        if manifest is None:
            if member.name != MANIFEST:
                raise PackageError(f"archive must start with {MANIFEST}, found {member.name!r}")
            manifest = parse_manifest(_read_member(tar, member, 1024 * 1024))
            with (dest / MANIFEST).open("xb") as out:
                out.write(manifest.to_json().encode())
                os.fsync(out.fileno())
            continue
        expected = manifest.files.get(member.name)
        if expected is None or member.size != expected.size:
            raise PackageError(f"archive member {member.name!r} is not in the manifest or has the wrong size")
        source = tar.extractfile(member)
        if source is None:
            raise PackageError(f"archive member {member.name!r} has no data")
        with source, (dest / member.name).open("xb") as out:
            while block := source.read(_BLOCK):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())  # a slot becomes active by a rename; its bytes must be on disk first
    if manifest is None:
        raise PackageError("archive is empty")
    fsync_dir(dest)
    return manifest


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise PackageError(f"{member.name} is {member.size} bytes, over the {limit} limit")
    source = tar.extractfile(member)
    if source is None:
        raise PackageError(f"archive member {member.name!r} has no data")
    with source:
        return source.read()


def _verify_unpacked(dest: Path, manifest: Manifest) -> Manifest:
    on_disk = verify_package(dest)
    if on_disk != manifest:
        raise PackageError("unpacked manifest differs from the archive's")
    return manifest


def read_archive_manifest(archive: Path) -> Manifest:
    """The manifest of a package archive, without extracting the rest."""
    try:
        with tarfile.open(archive, "r:") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise PackageError(f"{archive}: the first member must be {MANIFEST}")
            return parse_manifest(_read_member(tar, first, 1024 * 1024))
    except (tarfile.TarError, EOFError) as e:
        raise PackageError(f"{archive} is not a readable package archive: {e}") from e
