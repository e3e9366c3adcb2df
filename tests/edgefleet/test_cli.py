import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from edgefleet.cli import app

runner = CliRunner()


def test_version_as_a_user_runs_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("edgefleet ")


def test_models_pack_inspect_verify(zoo: Path, tmp_path: Path) -> None:
    archive = tmp_path / "v2.tar"
    assert runner.invoke(app, ["models", "pack", str(zoo / "v2"), "-o", str(archive)]).exit_code == 0
    inspected = runner.invoke(app, ["models", "inspect", str(archive)])
    assert inspected.exit_code == 0 and '"version": 2' in inspected.output
    verified = runner.invoke(app, ["models", "verify", str(archive)])
    assert verified.exit_code == 0 and "ok: surface-defect v2" in verified.output


def test_verify_fails_clearly_on_a_tampered_package(package_copy: Path) -> None:
    (package_copy / "golden.npz").write_bytes(b"tampered")
    result = runner.invoke(app, ["models", "verify", str(package_copy)])
    assert result.exit_code == 1
    assert "golden.npz" in result.output


def test_probe_explains_the_backend_choice(zoo: Path) -> None:
    result = runner.invoke(app, ["device", "probe", "--json", "--explain", str(zoo / "v2")])
    assert result.exit_code == 0, result.output
    import json

    explained = json.loads(result.output)
    assert explained["chosen"] == "onnxruntime-cpu"
    assert "not in this onnxruntime build" in explained["passed_over"]["onnxruntime-cuda"]


def test_serve_refuses_a_batcher_setting_out_of_range(zoo: Path) -> None:
    result = runner.invoke(app, ["device", "serve", "--model", str(zoo / "v2"), "--max-batch", "0"])
    assert result.exit_code == 1 and "max_batch must be at least 1" in result.output


def test_rollout_status_renders_progress_and_phases() -> None:
    from edgefleet.rollout_cli import render

    view = {
        "campaign_id": "c1",
        "model_name": "surface-defect",
        "version": 2,
        "state": "running",
        "reason": "",
        "progress": 0.5,
        "skipped": [],
        "phases": [
            {"name": "canary", "state": "done", "offered": 1, "devices": 1, "committed": 1},
            {"name": "all", "state": "active", "offered": 3, "devices": 3, "in_progress": 2, "failed": 1},
        ],
    }
    lines = render(view).splitlines()
    assert lines[0] == "rollout c1  surface-defect v2  running"
    assert lines[1] == "[" + "#" * 15 + "." * 15 + "] 50%"
    assert lines[3].split() == ["all", "active", "3/3", "offered;", "1", "failed,", "2", "in", "progress"]


def test_add_tvm_records_ships_them_in_a_package_and_refuses_a_wrong_model(zoo: Path, tmp_path: Path) -> None:
    import json
    import shutil

    package = tmp_path / "pkg"
    shutil.copytree(zoo / "v1", package)
    manifest = json.loads((package / "manifest.json").read_text())
    for entry in manifest.pop("tvm_records", []):  # start from a package without records
        for field in ("tuning", "workloads", "records"):
            manifest["files"].pop(entry[field])
            (package / entry[field]).unlink()
    (package / "manifest.json").write_text(json.dumps(manifest))
    runner = CliRunner()
    result = runner.invoke(app, ["models", "add-tvm-records", str(package), "--records", str(zoo / "tvm")])
    assert result.exit_code == 0, result.output
    assert "model.onnx on x86_64-znver3" in result.output
    assert runner.invoke(app, ["models", "verify", str(package)]).exit_code == 0
    refused = runner.invoke(
        app,
        ["models", "add-tvm-records", str(package), "--records", str(zoo / "tvm"), "--model", "nope.onnx"],
    )
    assert refused.exit_code != 0 and "nope.onnx" in refused.output
