"""`edgefleet device serve` as a user runs it: a process, a port, a token, a v2 inference."""

import os
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from device.errors import ConfigError
from device.standalone import manifest_for_bare_onnx
from edgefleet.procs import Child, free_port, wait_for


def test_bare_onnx_manifest_reads_the_file(zoo: Path) -> None:
    manifest = manifest_for_bare_onnx(zoo / "v2" / "model.onnx")
    assert manifest.name == "model" and manifest.model_file == "model.onnx"
    assert manifest.inputs[0].name == "image" and manifest.inputs[0].shape == [-1, 3, 64, 64]
    assert manifest.outputs[0].shape == [-1, 4]


def ready(url: str, child: Child) -> bool:
    if not child.alive():
        raise AssertionError(child.log_tail())
    return httpx.get(f"{url}/healthz", timeout=1).status_code == 200


@pytest.mark.parametrize("which", ["package", "bare"])
def test_serve_a_package_or_a_bare_file(zoo: Path, tmp_path: Path, which: str) -> None:
    model = zoo / "v2" if which == "package" else zoo / "v2" / "model.onnx"
    name = "surface-defect" if which == "package" else "model"
    port, token_file = free_port(), tmp_path / "token"
    child = Child(
        "serve",
        ["device", "serve", "--model", str(model), "--port", str(port), "--token-file", str(token_file)],
        tmp_path / "serve.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the standalone API", partial(ready, url, child), 30)
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        array = np.zeros((1, 3, 64, 64), np.float32)
        body = {
            "inputs": [
                {"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": array.ravel().tolist()}
            ]
        }
        assert httpx.post(f"{url}/v2/models/{name}/infer", json=body).status_code == 401
        response = httpx.post(f"{url}/v2/models/{name}/infer", json=body, headers=headers)
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1, 4]
    finally:
        child.stop()


def test_unknown_file_kind_is_refused(tmp_path: Path) -> None:
    from device.standalone import load_for_serving

    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"package folder or an \.onnx"):
        load_for_serving(tmp_path / "m.bin", None)
