"""The local API over a real socket: auth, Open Inference Protocol v2, and bad requests."""

import httpx
import numpy as np
import pytest

from tests.device.api.conftest import TOKEN


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def infer_body(array: np.ndarray, name: str = "image", datatype: str = "FP32") -> dict[str, object]:
    return {
        "inputs": [
            {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}
        ]
    }


def test_liveness_needs_no_auth_but_everything_else_does(api: str) -> None:
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{api}/v2/health/live").status_code == 200
    for path in ("/api/status", "/v2/health/ready", "/v2/models/surface-defect"):
        assert httpx.get(f"{api}{path}").status_code == 401
        assert httpx.get(f"{api}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{api}/api/status", headers=auth()).json() == {"device_id": "dev-a"}


def test_v2_metadata_and_infer(api: str) -> None:
    meta = httpx.get(f"{api}/v2/models/surface-defect", headers=auth()).json()
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    array = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    response = httpx.post(
        f"{api}/v2/models/surface-defect/infer", json={**infer_body(array), "id": "r1"}, headers=auth()
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1" and body["model_version"] == "1"
    assert body["outputs"][0]["name"] == "logits" and body["outputs"][0]["shape"] == [2, 4]
    assert len(body["outputs"][0]["data"]) == 8


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (infer_body(np.zeros((1, 3, 32, 32), np.float32)), 400, "shape"),
        (infer_body(np.zeros((1, 3, 64, 64), np.float32), name="x"), 400, "inputs must be exactly"),
        (infer_body(np.zeros((1, 3, 64, 64), np.float32), datatype="FP64"), 400, "unknown datatype"),
        (
            {"inputs": [{"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [1, 2]}]},
            400,
            "do not fill",
        ),
        ({"inputs": []}, 422, ""),
    ],
)
def test_bad_requests_get_4xx_with_a_reason(
    api: str, body: dict[str, object], status: int, message: str
) -> None:
    response = httpx.post(f"{api}/v2/models/surface-defect/infer", json=body, headers=auth())
    assert response.status_code == status
    assert message in response.text


def test_unknown_model_is_404(api: str) -> None:
    response = httpx.post(
        f"{api}/v2/models/nope/infer", json=infer_body(np.zeros(1, np.float32)), headers=auth()
    )
    assert response.status_code == 404


def test_oversized_body_is_413(api: str) -> None:
    big = b"0" * (17 * 1024 * 1024)
    response = httpx.post(
        f"{api}/v2/models/surface-defect/infer",
        content=big,
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]


def test_metrics_in_prometheus_text_format(api: str) -> None:
    assert httpx.get(f"{api}/metrics").status_code == 401
    array = np.zeros((3, 3, 64, 64), np.float32)
    httpx.post(
        f"{api}/v2/models/surface-defect/infer", json=infer_body(array), headers=auth()
    ).raise_for_status()
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{api}/metrics", headers=auth()).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {"model": "surface-defect", "version": "1", "backend": "onnxruntime-cpu"}
    (inferred,) = [s for s in families["edgefleet_inferences"].samples if s.name.endswith("_total")]
    # fp32, or int8 where its variant passed the engine's check on this machine
    assert inferred.labels.pop("precision") in ("fp32", "int8")
    assert inferred.labels == labels and inferred.value == 3
    counts = [s for s in families["edgefleet_inference_latency_ms"].samples if s.name.endswith("_count")]
    assert counts[0].value == 1
    assert any(s.labels == {"state": "idle"} for s in families["edgefleet_update_state"].samples)


def test_every_route_but_liveness_refuses_a_missing_token(api: str) -> None:
    spec = httpx.get(f"{api}/openapi.json", headers=auth()).json()
    assert httpx.get(f"{api}/openapi.json").status_code == 401
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    open_paths = {"/healthz", "/v2/health/live"}
    for path, methods in spec["paths"].items():
        concrete = path.replace("{name}", "surface-defect").replace("{version}", "1")
        for method in methods:
            response = httpx.request(method.upper(), f"{api}{concrete}", json={})
            expected = 200 if path in open_paths else 401
            assert response.status_code == expected, (method, path, response.status_code)
            if path not in open_paths:
                assert methods[method].get("security"), f"{method} {path} does not declare its auth"


def test_guessing_tokens_gets_the_client_blocked(api: str) -> None:
    wrong = {"Authorization": "Bearer guess"}
    statuses = [httpx.get(f"{api}/api/status", headers=wrong).status_code for _ in range(10)]
    assert statuses == [401] * 10
    blocked = httpx.get(f"{api}/api/status", headers=auth())  # even the right token, for a while
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
    assert httpx.get(f"{api}/healthz").status_code == 200
