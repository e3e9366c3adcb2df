"""BSDIFF records (whole target from whole base by a bsdiff patch, files that are not ONNX): round
trips on real and synthetic pairs, chosen only where smaller, refused where crafted or over the
declared limits, and never decoded to anything but the target."""

import hashlib
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from models.delta import DeltaError, apply, bsdiff, encode, info
from models.delta.encode import _bsdiff, _patch_from
from models.delta.format import (
    CHUNK_BYTES,
    Limits,
    Op,
    Reader,
    Transform,
    bsdiff_record,
    parse_header,
    read_record,
    varint,
)
from models.delta.transforms import forward

from .conftest import mutated, refused_or_exact
from .test_bad_input import BASE, crafted, refused

pytest.importorskip("bsdiff4", reason="the encoder's BSDIFF records need bsdiff4 (the fleet extra)")

ROOT = Path(__file__).resolve().parents[3]
# The last commit whose decoder predates BSDIFF: what a device not yet updated runs.
BEFORE_BSDIFF = "d40da9d"


def relocated(seed: int = 3, records: int = 20000) -> tuple[bytes, bytes]:
    """Code-like bytes: opcodes followed by 4-byte absolute addresses. The new version inserts 1500
    bytes near the start (every address past it grows by 1500) and moves an 8000-byte block: what
    relinking an executable does, and where bsdiff's approximate matches beat exact ones."""
    rng = random.Random(seed)
    ops = [rng.randbytes(rng.randrange(2, 12)) for _ in range(200)]
    body = [(rng.choice(ops), rng.randrange(0, 1 << 20)) for _ in range(records)]
    inserted = rng.randbytes(1500)

    def build(shift: int, insert_at: int) -> bytes:
        out = bytearray()
        for i, (op, addr) in enumerate(body):
            if i == insert_at:
                out += inserted
            out += op + (addr + (shift if addr > 4096 else 0)).to_bytes(4, "little")
        return bytes(out)

    old, new = build(0, -1), build(1500, 100)
    at = len(new) // 3
    block = new[at : at + 8000]
    new = new[:at] + new[at + 8000 :]
    middle = len(new) // 2 + 17
    return old, new[:middle] + block + new[middle:]


def scattered(seed: int = 4, size: int = 400_000) -> tuple[bytes, bytes]:
    """A library's next patch release, in miniature: 1 % of the bytes nudged at random places (the
    displacements of moved calls), and 300 bytes inserted (so offsets do not line up)."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 256, (64, 16), dtype=np.uint8)
    old = words[rng.integers(0, 64, size // 16)].ravel()
    new = old.copy()
    at = rng.random(new.size) < 0.01
    new[at] += rng.integers(1, 4, int(at.sum()), dtype=np.uint8)
    cut = size // 5
    return old.tobytes(), new[:cut].tobytes() + rng.bytes(300) + new[cut:].tobytes()


def roundtrip(old: bytes, new: bytes, folder: Path, level: int = 19) -> tuple[Path, dict[str, int]]:
    folder.mkdir(exist_ok=True)
    a, b, delta, out = folder / "old.bin", folder / "new.bin", folder / "d.efd", folder / "out"
    a.write_bytes(old)
    b.write_bytes(new)
    made = encode(a, b, delta, level=level)
    apply(a, delta, out)
    assert out.read_bytes() == new
    assert made.kind == "binary" and info(delta) == made
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    return delta, made.target_bytes_by


def _record(delta: Path) -> tuple[Op, Transform]:
    """The op (and transform) of a delta's first record."""
    with delta.open("rb") as f:
        parse_header(f)
        rec = read_record(Reader(f, delta.stat().st_size))
    return rec.op, rec.transform


def test_relocated_code_takes_bsdiff_at_a_third_of_patch_from(tmp_path: Path) -> None:
    old, new = relocated()
    delta, by = roundtrip(old, new, tmp_path / "fwd")
    assert by == {"bsdiff": len(new)}
    assert _record(delta)[0] is Op.BSDIFF
    patch_from = _patch_from(old, new, 1, 19, 2).size
    assert delta.stat().st_size < 0.4 * patch_from
    _, by = roundtrip(new, old, tmp_path / "back")
    assert by == {"bsdiff": len(old)}


def test_scattered_byte_changes_code_the_diff_block_sparse(tmp_path: Path) -> None:
    old, new = scattered()
    delta, by = roundtrip(old, new, tmp_path)
    assert by == {"bsdiff": len(new)}
    assert _record(delta) == (Op.BSDIFF, Transform.SPARSE)
    blocks = bsdiff.diff(old, new, CHUNK_BYTES)
    assert blocks is not None
    raw = len(zstandard.ZstdCompressor(level=19).compress(blocks.diff))
    sparse = forward(Transform.SPARSE, 1, blocks.diff, bytes(len(blocks.diff)))
    assert len(zstandard.ZstdCompressor(level=19).compress(sparse)) < 0.9 * raw  # why SPARSE was chosen


def test_the_tflite_sample_model_v1_to_v2(zoo: Path, tmp_path: Path) -> None:
    """A retrained .tflite: values change in place, so the aligned coding beats bsdiff, and the
    encoder keeps the smaller one."""
    v1 = (zoo / "tflite-v1" / "model.tflite").read_bytes()
    v2 = (zoo / "tflite-v2" / "model.tflite").read_bytes()
    delta, by = roundtrip(v1, v2, tmp_path / "fwd")
    assert "bsdiff" not in by
    blocks = bsdiff.diff(v1, v2, CHUNK_BYTES)
    assert blocks is not None
    size = delta.stat().st_size
    assert size < _bsdiff(blocks, len(v2), 19).size
    assert size < _patch_from(v1, v2, 1, 19, 2).size
    roundtrip(v2, v1, tmp_path / "back")


def test_a_pair_of_the_sample_models_other_files_round_trips(zoo: Path, tmp_path: Path) -> None:
    """golden.npz (a zip archive) of the tflite package, v1 -> v2, whichever coding wins."""
    roundtrip(
        (zoo / "tflite-v1" / "golden.npz").read_bytes(),
        (zoo / "tflite-v2" / "golden.npz").read_bytes(),
        tmp_path,
    )


def test_the_patch_agrees_with_bsdiff4s_own() -> None:
    import bsdiff4

    old, new = relocated(records=3000)
    blocks = bsdiff.diff(old, new, CHUNK_BYTES)
    assert blocks is not None
    x, y, z = bsdiff.parse_control(
        zstandard.ZstdDecompressor().decompress(_compress(blocks.control())), blocks.count
    )
    assert (x == blocks.x).all() and (y == blocks.y).all() and (z == blocks.z).all()
    oldpos = bsdiff.check(x, y, z, len(old), len(new))
    ours = b"".join(bytes(p) for p in bsdiff.patch(old, x, y, oldpos, blocks.diff, blocks.extra))
    assert ours == new == bsdiff4.patch(old, bsdiff4.diff(old, new))


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def test_no_bsdiff_where_apply_would_hold_too_much() -> None:
    assert bsdiff.diff(b"a" * 100, b"b" * 100, 99) is None  # base or target over the segment limit
    assert bsdiff.diff(b"a" * 100, b"b" * 101, 100) is None
    assert bsdiff.diff(b"", b"b" * 100, 1000) is None  # nothing to match
    assert bsdiff.diff(b"a" * 100, b"b" * 100, 100) is not None


# --- crafted records, against test_bad_input's 16 KiB BASE -------------------------------------


def _triples(triples: list[tuple[int, int, int]]) -> bytes:
    """A control block as a BSDIFF record holds it, before zstd."""
    arr = np.array(triples, np.int64).reshape(-1, 3)
    return bsdiff.Blocks(arr[:, 0], arr[:, 1], arr[:, 2], b"", b"").control()


def _bs(
    triples: list[tuple[int, int, int]],
    diff: bytes,
    extra: bytes,
    length: int | None = None,
    coding: Transform = Transform.RAW,
    frames: dict[str, bytes] | None = None,
) -> bytes:
    coded = forward(Transform.SPARSE, 1, diff, bytes(len(diff))) if coding is Transform.SPARSE else diff
    parts = {"control": _compress(_triples(triples)), "diff": _compress(coded), "extra": _compress(extra)}
    parts.update(frames or {})
    n = sum(t[0] + t[1] for t in triples) if length is None else length
    return bsdiff_record(n, len(triples), coding, parts["control"], parts["diff"], parts["extra"])


def _target(triples: list[tuple[int, int, int]], diff: bytes, extra: bytes) -> bytes:
    """What the triples mean, byte by byte (bsdiff's patch loop, the slow way)."""
    out, d, e, pos = bytearray(), 0, 0, 0
    for x, y, z in triples:
        out += bytes((diff[d + j] + BASE[pos + j]) & 0xFF for j in range(x))
        out += extra[e : e + y]
        d, e, pos = d + x, e + y, pos + x + z
    return bytes(out)


GOOD = [(100, 5, 300), (50, 0, -200), (0, 7, 10), (16, 1, 0)]
_rng = random.Random(1)
DIFF = bytes(_rng.randrange(1, 4) if _rng.random() < 0.1 else 0 for _ in range(166))  # bsdiff-like: mostly 0
EXTRA = b"extra-bytes!!"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "base").write_bytes(BASE)
    (tmp_path / "t").mkdir()
    return {"base": tmp_path / "base", "dir": tmp_path / "t"}


@pytest.mark.parametrize("coding", [Transform.RAW, Transform.SPARSE])
def test_a_crafted_record_that_is_right_applies(files: dict[str, Path], coding: Transform) -> None:
    want = _target(GOOD, DIFF, EXTRA)
    path, out = files["dir"] / "ok.efd", files["dir"] / "out"
    path.write_bytes(crafted([_bs(GOOD, DIFF, EXTRA, coding=coding)], want))
    apply(files["base"], path, out)
    assert out.read_bytes() == want


def _bad(
    files: dict[str, Path], record: bytes, match: str, out: bytes | None = None, **fields: object
) -> None:
    want = _target(GOOD, DIFF, EXTRA) if out is None else out
    refused(files, crafted([record], want, **fields), files["dir"], match)


@pytest.mark.parametrize(
    ("triples", "match"),
    [
        ([(100, 5, 300), (50, 0, -200), (0, 7, 10), (16, -1, 0)], "out of range"),
        ([(1 << 40, 0, 0)], "writes more than the target"),
        ([(10, 0, -20), (10, 0, 0)], "reads outside the base"),
        ([(10, 0, 3 * len(BASE))], "moves outside the base"),
        ([(10, 0, len(BASE)), (10, 0, 0)], "reads outside the base"),
        ([(len(BASE) + 1, 0, 0)], "reads outside the base"),
    ],
)
def test_triples_that_read_or_write_out_of_bounds(
    files: dict[str, Path], triples: list[tuple[int, int, int]], match: str
) -> None:
    n = sum(max(t[0], 0) + max(t[1], 0) for t in triples)
    rec = _bs(
        triples,
        bytes(sum(max(t[0], 0) for t in triples) % (1 << 20)),
        bytes(sum(max(t[1], 0) for t in triples) % (1 << 20)),
        length=min(n, 1 << 20),
    )
    refused(files, crafted([rec], bytes(min(n, 1 << 20))), files["dir"], match)


def test_the_y_overflow_bsdiff4s_c_patch_does_not_check(files: dict[str, Path]) -> None:
    """bsdiff4's C patch checks newpos + x against the target, never newpos + x + y: here the
    triples say 10 + 50 bytes for a 20-byte target."""
    rec = _bs([(10, 50, 0)], bytes(10), bytes(50), length=20)
    refused(files, crafted([rec], bytes(20)), files["dir"], "writes more than the target|do not add up")


def test_triples_that_do_not_add_up_to_the_record(files: dict[str, Path]) -> None:
    n = sum(t[0] + t[1] for t in GOOD)
    _bad(files, _bs(GOOD, DIFF, EXTRA, length=n + 1), "do not add up|more than the declared", bytes(n + 1))


@pytest.mark.parametrize(
    ("part", "payload", "match"),
    [
        ("diff", _compress(DIFF + b"\0"), "frame holds 167 bytes"),
        ("diff", _compress(DIFF[:-1]), "frame holds 165 bytes"),
        ("extra", _compress(EXTRA[:-1]), "frame holds 12 bytes"),
        ("control", _compress(_triples(GOOD) + bytes(8)), "frame holds"),
        ("control", b"not zstd at all", "not a zstd frame"),
        ("diff", _compress(DIFF) + b"junk", "not exactly one zstd frame"),
        ("extra", zstandard.ZstdCompressor(write_content_size=False).compress(EXTRA), "does not declare"),
    ],
)
def test_frames_that_hold_other_sizes(files: dict[str, Path], part: str, payload: bytes, match: str) -> None:
    _bad(files, _bs(GOOD, DIFF, EXTRA, frames={part: payload}), match)


def test_a_sparse_diff_block_that_does_not_fit(files: dict[str, Path]) -> None:
    sparse = bytearray(forward(Transform.SPARSE, 1, DIFF, bytes(len(DIFF))))
    sparse[4:8] = (1000).to_bytes(4, "little")  # a gap past the block's end
    rec = _bs(GOOD, DIFF, EXTRA, coding=Transform.SPARSE, frames={"diff": _compress(bytes(sparse))})
    _bad(files, rec, "sparse tensor")


def test_an_unknown_diff_coding(files: dict[str, Path]) -> None:
    rec = bytearray(_bs(GOOD, DIFF, EXTRA))
    rec[1 + len(varint(len(_target(GOOD, DIFF, EXTRA)))) + 1] = Transform.XOR  # the coding byte
    _bad(files, bytes(rec), "diff block coded as 2")


def test_bsdiff_must_be_the_only_record(files: dict[str, Path]) -> None:
    want = _target(GOOD, DIFF, EXTRA)
    copy = bytes([Op.COPY]) + varint(1) + varint(0)
    rec = _bs(GOOD, DIFF, EXTRA)
    refused(files, crafted([copy, rec], BASE[:1] + want), files["dir"], "only record")
    refused(files, crafted([rec, copy], want + BASE[:1]), files["dir"], "only record")


def test_a_base_over_the_declared_segment_limit_is_refused_before_it_is_read(files: dict[str, Path]) -> None:
    """Apply holds the whole base for BSDIFF: a delta whose base is larger than its own declared
    segment limit is refused before any payload is decoded or the base loaded."""
    limits = Limits(max_segment_bytes=len(BASE) - 1, window_log=24)
    _bad(
        files,
        _bs(GOOD, DIFF, EXTRA),
        "whole 16384-byte base in memory, over its declared limit",
        limits=limits,
    )


def test_a_target_or_control_over_the_declared_segment_limit(files: dict[str, Path]) -> None:
    limits = Limits(max_segment_bytes=len(BASE), window_log=24)
    n = len(BASE) + 1
    rec = _bs([(0, n, 0)], b"", bytes(n))
    refused(files, crafted([rec], bytes(n), limits=limits), files["dir"], "exceeds its declared limit")
    many = bytes([Op.BSDIFF]) + varint(1) + varint(len(BASE)) + bytes([0]) + (varint(0) * 3)
    refused(
        files, crafted([many], b"x", limits=limits), files["dir"], "control block of 16384 triples exceeds"
    )


def test_a_payload_larger_than_its_content_could_need(files: dict[str, Path]) -> None:
    _bad(files, _bs(GOOD, DIFF, EXTRA, frames={"extra": bytes(2000)}), "larger than its content could need")


def test_every_truncation_and_flip_of_a_real_bsdiff_delta_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    old, new = relocated(records=2000)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    encode(tmp_path / "old", tmp_path / "new", tmp_path / "d.efd", level=3)
    good = (tmp_path / "d.efd").read_bytes()
    assert _record(tmp_path / "d.efd")[0] is Op.BSDIFF
    base = {"base": tmp_path / "old"}
    for cut in sorted({*range(0, len(good), max(1, len(good) // 40)), len(good) - 1}):
        refused(base, good[:cut], files["dir"])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    refused(base, bytes(flipped), files["dir"], "does not match its trailer")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_bsdiff_deltas_never_decode_to_anything_else(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("bsfuzz")
    (folder / "base").write_bytes(BASE)
    want = _target(GOOD, DIFF, EXTRA)
    coding = data.draw(st.sampled_from([Transform.RAW, Transform.SPARSE]))
    delta = mutated(data, crafted([_bs(GOOD, DIFF, EXTRA, coding=coding)], want))
    refused_or_exact(folder / "base", delta, folder, want)


def _meaning(triples: list[tuple[int, int, int]], diff: bytes, extra: bytes) -> bytes | None:
    """The target the format's rules give these triples, or None where they break one: every base
    position in 0..len(BASE) with its x bytes inside the base, |z| <= 2 * len(BASE), the blocks
    used exactly."""
    out, d, e, pos = bytearray(), 0, 0, 0
    for x, y, z in triples:
        if x < 0 or y < 0 or pos < 0 or pos + x > len(BASE) or abs(z) > 2 * len(BASE):
            return None
        if d + x > len(diff) or e + y > len(extra):
            return None
        out += bytes((diff[d + j] + BASE[pos + j]) & 0xFF for j in range(x))
        out += extra[e : e + y]
        d, e, pos = d + x, e + y, pos + x + z
    return bytes(out) if (d, e) == (len(diff), len(extra)) else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    triples=st.lists(
        st.tuples(
            st.integers(-3, 600),
            st.integers(-3, 40),
            st.one_of(st.integers(-600, 600), st.integers(-40000, 40000)),
        ),
        max_size=6,
    ),
    # the blocks as long as the triples use (most draws), or a little off
    diff_off=st.sampled_from([0, 0, 0, 0, 1, -1, 9]),
    extra_off=st.sampled_from([0, 0, 0, 0, 1, -1, 9]),
    coding=st.sampled_from([Transform.RAW, Transform.SPARSE]),
    seed=st.integers(0, 1000),
)
def test_random_triples_decode_to_their_meaning_or_are_refused(
    tmp_path_factory: pytest.TempPathFactory,
    triples: list[tuple[int, int, int]],
    diff_off: int,
    extra_off: int,
    coding: Transform,
    seed: int,
) -> None:
    rng = random.Random(seed)
    diff_len = max(0, sum(max(x, 0) for x, _, _ in triples) + diff_off)
    diff = bytes(rng.choice([0, 0, 0, rng.randrange(256)]) for _ in range(diff_len))
    extra = rng.randbytes(max(0, sum(max(y, 0) for _, y, _ in triples) + extra_off))
    if coding is Transform.SPARSE and 4 + 5 * sum(map(bool, diff)) > len(diff):
        coding = Transform.RAW  # SPARSE may hold at most the block's length (the encoder's rule too)
    meaning = _meaning(triples, diff, extra)
    length = sum(max(x, 0) + max(y, 0) for x, y, _ in triples)
    target = meaning if meaning is not None else bytes(length)
    folder = tmp_path_factory.mktemp("bsrand")
    (folder / "base").write_bytes(BASE)
    rec = bytes(_bs(triples, diff, extra, length=len(target), coding=coding))
    path, out = folder / "r.efd", folder / "out"
    path.write_bytes(crafted([rec], target))
    event("refused" if meaning is None else "decoded")
    if meaning is None:
        with pytest.raises(DeltaError):
            apply(folder / "base", path, out)
        assert not out.exists()
    else:
        apply(folder / "base", path, out)
        assert out.read_bytes() == meaning


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to check out the decoder before BSDIFF")
def test_a_decoder_from_before_bsdiff_refuses_it_as_an_unknown_op(tmp_path: Path) -> None:
    """Format version 2 is kept: a device not yet updated says 'unknown record op 6' and writes
    nothing, so the fleet can send it the full package."""
    old_code = tmp_path / "old-decoder"
    old_code.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BEFORE_BSDIFF, "models"], capture_output=True, check=False
    )
    if archive.returncode:
        pytest.skip(
            f"commit {BEFORE_BSDIFF} is not in this checkout's history: {archive.stderr.decode()[:200]}"
        )
    subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive.stdout, check=True)
    assert not (old_code / "models" / "delta" / "bsdiff.py").exists()
    old, new = relocated(records=2000)
    work = tmp_path / "work"
    work.mkdir()
    (work / "old").write_bytes(old)
    (work / "new").write_bytes(new)
    encode(work / "old", work / "new", work / "d.efd", level=3)
    assert _record(work / "d.efd")[0] is Op.BSDIFF
    code = (
        "import sys; from pathlib import Path as P; from models.delta import apply, DeltaError\n"
        "try:\n    apply(P(sys.argv[1]), P(sys.argv[2]), P(sys.argv[3]))\n"
        "except DeltaError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(work / "old"), str(work / "d.efd"), str(work / "out")],
        cwd=old_code,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "refused: delta corrupt: unknown record op 6" in done.stdout, done.stdout + done.stderr
    assert sorted(p.name for p in work.iterdir()) == ["d.efd", "new", "old"]
    assert hashlib.sha256(new).hexdigest() == info(work / "d.efd").target_sha256
