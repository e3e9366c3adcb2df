"""`edgefleet delta ...`: encode, apply and inspect deltas. Mounted by the main CLI."""

import dataclasses
import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from models.delta.apply import DEFAULT_MAX_OUTPUT
from models.delta.encode import DEFAULT_LEVEL
from models.delta.format import DeltaInfo

app = typer.Typer(no_args_is_help=True, help="Model deltas: encode, apply, info.")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _summary(info: DeltaInfo) -> str:
    return (
        f"{info.kind} delta: {info.delta_size} bytes, {100 * info.ratio:.2f}% of the "
        f"{info.target_size}-byte target, base sha256 {info.base_sha256[:16]}..."
    )


@app.command("encode")
def encode_cmd(
    old: Path,
    new: Path,
    out: Annotated[Path, typer.Option("-o", "--out", help="the delta to write")],
    level: Annotated[int, typer.Option(help="zstd level")] = DEFAULT_LEVEL,
    old_layout: Annotated[
        Path | None, typer.Option(help="ONNX file whose external data OLD is (default: the .onnx beside it)")
    ] = None,
    new_layout: Annotated[
        Path | None, typer.Option(help="ONNX file whose external data NEW is (default: the .onnx beside it)")
    ] = None,
) -> None:
    """Write a delta that turns OLD into NEW (ONNX models and their external data: tensor by tensor)."""
    from models.delta.encode import encode
    from models.delta.errors import DeltaError

    try:
        info = encode(old, new, out, level=level, old_layout=old_layout, new_layout=new_layout)
    except DeltaError as e:
        _fail(str(e))
    typer.echo(f"wrote {out}: {_summary(info)}")


@app.command("apply")
def apply_cmd(
    old: Path,
    delta: Path,
    out: Annotated[Path, typer.Option("-o", "--out", help="the file to rebuild")],
    max_output: Annotated[
        int, typer.Option(help="refuse a delta whose output is larger (bytes)")
    ] = DEFAULT_MAX_OUTPUT,
) -> None:
    """Rebuild the new file from OLD and DELTA; nothing is written unless its sha256 matches."""
    from models.delta.apply import apply
    from models.delta.errors import DeltaError

    try:
        apply(old, delta, out, max_output=max_output)
    except DeltaError as e:
        _fail(str(e))
    typer.echo(f"wrote {out}")


@app.command("info")
def info_cmd(
    delta: Path, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False
) -> None:
    """Check a delta's structure and print what it holds."""
    from models.delta.apply import info
    from models.delta.errors import DeltaError

    try:
        result = info(delta)
    except DeltaError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps({**dataclasses.asdict(result), "ratio": result.ratio}, indent=2))
    else:
        typer.echo(_summary(result))
        typer.echo(f"target sha256 {result.target_sha256}")
        for source, n in sorted(result.target_bytes_by.items()):
            typer.echo(f"  {source:>6}: {n} bytes")
