"""Package deltas: a new model package expressed against the version a device already runs.

A package delta is a plain tar (read with the same care as a package archive):

    delta.json        what follows, per file of the new package: "copy" from the base slot,
                      "delta" (a models.delta container against the base's file of that name),
                      or "zstd" (the whole file, compressed)
    manifest.json     the new package's manifest, byte for byte
    deltas/<file>     one per "delta" file
    files/<file>.zst  one per "zstd" file

Trust does not come from this file: the signed update metadata names the sha256 of the whole delta
and of the new manifest.json, and the manifest names every file's sha256. `apply_package_delta`
checks the manifest against the signed hash first, writes every file into an empty folder, and
finishes with `verify_package`, so a wrong byte anywhere is caught before the slot can be used.
"""

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any, Literal

import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.delta import DEFAULT_LEVEL, DeltaError
from models.delta import apply as apply_file_delta
from models.delta import encode as encode_file_delta
from models.errors import PackageError
from models.fsutil import fsync_dir
from models.manifest import Manifest, load_manifest, parse_manifest
from models.package import DEFAULT_MAX_PACKAGE_BYTES, MANIFEST, verify_package

FORMAT: Literal["edgefleet.package-delta/1"] = "edgefleet.package-delta/1"
DELTA_INDEX = "delta.json"
# Files below this size are not worth a delta container's header; they travel compressed.
MIN_DELTA_FILE_BYTES = 4096
_BLOCK = 1024 * 1024
_MAX_INDEX_BYTES = 1024 * 1024

Mode = Literal["copy", "delta", "zstd"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackageRef(_Strict):
    name: str
    version: int = Field(ge=1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FilePlan(_Strict):
    mode: Mode
    size: int = Field(ge=0, description="bytes of this file's member in the delta (0 for copy)")


class DeltaIndex(_Strict):
    format: Literal["edgefleet.package-delta/1"] = FORMAT
    base: PackageRef
    target: PackageRef
    files: dict[str, FilePlan]

    def payload_bytes(self) -> int:
        return sum(plan.size for plan in self.files.values())


def manifest_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def _ref(folder: Path, manifest: Manifest) -> PackageRef:
    return PackageRef(name=manifest.name, version=manifest.version, manifest_sha256=manifest_sha256(folder))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def build_package_delta(base: Path, target: Path, out: Path, level: int = DEFAULT_LEVEL) -> DeltaIndex:
    """Write the delta that turns package folder `base` into package folder `target`, atomically.

    Each file takes the cheapest of copy / tensor-aware delta / zstd of the whole file.
    """
    base_manifest, target_manifest = verify_package(base), verify_package(target)
    if base_manifest.name != target_manifest.name:
        raise PackageError(
            f"a delta joins versions of one model: {base_manifest.name} vs {target_manifest.name}"
        )
    plans: dict[str, FilePlan] = {}
    members: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pdelta-") as tmp:
        for name, entry in sorted(target_manifest.files.items()):
            old = base_manifest.files.get(name)
            if old is not None and old == entry:
                plans[name] = FilePlan(mode="copy", size=0)
                continue
            whole = zstandard.ZstdCompressor(level=level).compress((target / name).read_bytes())
            candidate: tuple[Mode, str, bytes] = ("zstd", f"files/{name}.zst", whole)
            if old is not None and entry.size >= MIN_DELTA_FILE_BYTES:
                delta_path = Path(tmp) / f"{name}.efd"
                encode_file_delta(base / name, target / name, delta_path, level)
                delta = delta_path.read_bytes()
                if len(delta) < len(whole):
                    candidate = ("delta", f"deltas/{name}", delta)
            mode, member, data = candidate
            plans[name] = FilePlan(mode=mode, size=len(data))
            members.append((member, data))
        index = DeltaIndex(base=_ref(base, base_manifest), target=_ref(target, target_manifest), files=plans)
        fd, tmp_out = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with (
                os.fdopen(fd, "wb") as raw,
                tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                _add_bytes(tar, DELTA_INDEX, index.model_dump_json(indent=2).encode())
                _add_bytes(tar, MANIFEST, (target / MANIFEST).read_bytes())
                for member, data in members:
                    _add_bytes(tar, member, data)
            os.replace(tmp_out, out)
        except BaseException:
            Path(tmp_out).unlink(missing_ok=True)
            raise
    return index


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if not member.isfile() or member.size > limit:
        raise PackageError(f"package delta member {member.name!r} is not a file of at most {limit} bytes")
    source = tar.extractfile(member)
    if source is None:
        raise PackageError(f"package delta member {member.name!r} has no data")
    with source:
        return source.read()


def _copy_stream(source: IO[bytes], out: IO[bytes], limit: int, what: str) -> None:
    written = 0
    while block := source.read(_BLOCK):
        written += len(block)
        if written > limit:
            raise PackageError(f"{what} expands past the {limit} bytes its manifest allows; refused")
        out.write(block)


def _write_member_to(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise PackageError(f"package delta member {member.name!r} has no data")
    with source, path.open("xb") as out:
        _copy_stream(source, out, member.size, member.name)


def _unzstd_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, size: int) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise PackageError(f"package delta member {member.name!r} has no data")
    with source, zstandard.ZstdDecompressor().stream_reader(source) as reader, path.open("xb") as out:
        _copy_stream(reader, out, size, member.name)


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def read_index(delta: Path) -> DeltaIndex:
    """What a package delta holds, without applying it."""
    try:
        with tarfile.open(delta, "r:") as tar:
            first = tar.next()
            if first is None or first.name != DELTA_INDEX:
                raise PackageError(f"{delta}: a package delta must start with {DELTA_INDEX}")
            return _parse_index(_read_small(tar, first, _MAX_INDEX_BYTES))
    except (tarfile.TarError, EOFError) as e:
        raise PackageError(f"{delta} is not a readable package delta: {e}") from e


def _parse_index(raw: bytes) -> DeltaIndex:
    try:
        return DeltaIndex.model_validate(json.loads(raw))
    except (ValueError, ValidationError, RecursionError) as e:
        raise PackageError(f"package delta index is invalid: {e}") from e


def apply_package_delta(
    delta: Path,
    base: Path,
    dest: Path,
    expected_manifest_sha256: str,
    *,
    max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES,
) -> Manifest:
    """Rebuild the new package into the empty folder `dest` from the package folder `base`.

    Refuses, before writing anything, a delta for another base or a manifest whose sha256 is not the
    signed one; verifies every file at the end. On error `dest` may hold partial files: the caller
    owns it (an inactive slot) and clears it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise PackageError(f"refusing to apply into {dest}: the folder is not empty")
    base_manifest = load_manifest(base)
    try:
        with tarfile.open(delta, "r:") as tar:
            manifest = _apply_members(tar, base, base_manifest, dest, expected_manifest_sha256, max_bytes)
    except (tarfile.TarError, EOFError) as e:
        raise PackageError(f"{delta} is not a readable package delta: {e}") from e
    except DeltaError as e:
        raise PackageError(f"package delta refused: {e}") from e
    fsync_dir(dest)
    on_disk = verify_package(dest)
    if on_disk != manifest:
        raise PackageError("rebuilt package's manifest differs from the delta's")
    return manifest


def _apply_members(
    tar: tarfile.TarFile,
    base: Path,
    base_manifest: Manifest,
    dest: Path,
    expected_manifest_sha256: str,
    max_bytes: int,
) -> Manifest:
    first = tar.next()
    if first is None or first.name != DELTA_INDEX:
        raise PackageError(f"a package delta must start with {DELTA_INDEX}")
    index = _parse_index(_read_small(tar, first, _MAX_INDEX_BYTES))
    base_sha = manifest_sha256(base)
    if index.base.manifest_sha256 != base_sha:
        raise PackageError(
            f"delta was built against {index.base.name} v{index.base.version}, "
            f"this device has {base_manifest.name} v{base_manifest.version} with other files"
        )
    second = tar.next()
    if second is None or second.name != MANIFEST:
        raise PackageError(f"a package delta's second member must be {MANIFEST}")
    raw_manifest = _read_small(tar, second, 1024 * 1024)
    if hashlib.sha256(raw_manifest).hexdigest() != expected_manifest_sha256:
        raise PackageError("the delta's manifest is not the one the signed metadata names; refused")
    manifest = parse_manifest(raw_manifest)
    if set(index.files) != set(manifest.files):
        raise PackageError("package delta index and manifest list different files")
    if sum(e.size for e in manifest.files.values()) > max_bytes:
        raise PackageError(f"the new package would hold more than {max_bytes} bytes; refused")
    (dest / MANIFEST).write_bytes(raw_manifest)
    _fsync_file(dest / MANIFEST)
    for name, plan in index.files.items():
        if plan.mode == "copy":
            _copy_from_base(base, base_manifest, name, dest, manifest)
    expected_members: dict[str, str] = {
        (f"deltas/{n}" if p.mode == "delta" else f"files/{n}.zst"): n
        for n, p in index.files.items()
        if p.mode != "copy"
    }
    while (member := tar.next()) is not None:  # iterating `tar` would start again at the first member
        file_name = expected_members.pop(member.name, None)
        if file_name is None or not member.isfile() or member.size != index.files[file_name].size:
            raise PackageError(f"package delta member {member.name!r} is unexpected or of the wrong size")
        size = manifest.files[file_name].size
        if index.files[file_name].mode == "zstd":
            _unzstd_member(tar, member, dest / file_name, size)
        else:
            _apply_delta_member(tar, member, base / file_name, dest / file_name, size)
        _fsync_file(dest / file_name)
    if expected_members:
        raise PackageError(f"package delta lacks {sorted(expected_members)}")
    return manifest


def _copy_from_base(base: Path, base_manifest: Manifest, name: str, dest: Path, manifest: Manifest) -> None:
    if base_manifest.files.get(name) != manifest.files[name]:
        raise PackageError(f"delta says copy {name!r} from the base, but the base's file differs")
    with (base / name).open("rb") as source, (dest / name).open("xb") as out:
        _copy_stream(source, out, manifest.files[name].size, name)
        out.flush()
        os.fsync(out.fileno())


def _apply_delta_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, old: Path, out: Path, size: int
) -> None:
    if not old.is_file():
        raise PackageError(f"delta for {out.name!r} needs the base's file, which is missing")
    # The container is random-access (it reads its trailer first), so it goes to a file beside the output.
    staged = out.with_name(f".{out.name}.efd")
    try:
        _write_member_to(tar, member, staged)
        apply_file_delta(old, staged, out, max_output=size)
    finally:
        staged.unlink(missing_ok=True)


def describe(index: DeltaIndex) -> dict[str, Any]:
    """A summary for logs and the CLI."""
    return {
        "model": index.target.name,
        "from": index.base.version,
        "to": index.target.version,
        "files": {name: plan.mode for name, plan in index.files.items()},
        "payload_bytes": index.payload_bytes(),
    }
