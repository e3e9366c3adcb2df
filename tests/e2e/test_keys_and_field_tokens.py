"""Through a real fleet, broker and agent: the local API over HTTPS with the device's certificate,
field-engineer tokens issued by the fleet and checked by the device (also with the fleet gone),
revocation reaching the device, and `fleet keys rotate` (telemetry, TUF signing, field-token keys)
while the device keeps running and its telemetry keeps arriving."""

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from device.api.client import LocalApi
from edgefleet.demo import DeviceProcess, FleetProcess
from edgefleet.procs import wait_for
from fleet.client import FleetApiError, FleetClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
DEVICE = "cam-keys"


@pytest.fixture
def rig(
    tmp_path: Path, archives: dict[int, Path]
) -> Iterator[tuple[FleetProcess, FleetClient, DeviceProcess]]:
    fleet = FleetProcess(tmp_path / "fleet")
    client = fleet.start()
    client.push_model(archives[1])
    device = DeviceProcess(DEVICE, tmp_path / DEVICE)
    try:
        device.provision(client, archives[1], probation_s=1.0)
        config = json.loads((device.root / "device.json").read_text())
        config["batching"] = {"surface-defect": {"max_batch": 4, "max_wait_ms": 1.0}}
        (device.root / "device.json").write_text(json.dumps(config))
        device.start()
        wait_for("the device online", lambda: client.device(DEVICE)["online"], 60)
        wait_for("the device's API", lambda: (device.root / "api-url").exists(), 30)
        wait_for("the first keys document", lambda: _keys(device) is not None, 30)
        yield fleet, client, device
    finally:
        device.stop()
        fleet.stop()


def _keys(device: DeviceProcess) -> dict[str, Any] | None:
    path = device.root / "fleet-keys.json"
    return json.loads(path.read_text()) if path.exists() else None


def _api(device: DeviceProcess, token: str, device_id: str = DEVICE) -> LocalApi:
    url = (device.root / "api-url").read_text().strip()
    return LocalApi(url, device_id, token, ca_file=device.root / "fleet-ca.pem")


def _infer_body(api: LocalApi) -> dict[str, Any]:
    meta = api.request("GET", "/v2/models/surface-defect").json()
    spec = meta["inputs"][0]
    shape = [1 if d < 0 else d for d in spec["shape"]]
    count = 1
    for d in shape:
        count *= d
    return {"inputs": [{"name": spec["name"], "shape": shape, "datatype": "FP32", "data": [0.0] * count}]}


def _stored(client: FleetClient) -> int:
    return int(client.telemetry(DEVICE, limit=1)["counts"].get("health", 0))


def test_local_api_is_https_with_the_device_certificate(
    rig: tuple[FleetProcess, FleetClient, DeviceProcess],
) -> None:
    _, _, device = rig
    url = (device.root / "api-url").read_text().strip()
    assert url.startswith("https://")
    break_glass = (device.root / "secrets" / "api-token").read_text().strip()
    with _api(device, break_glass) as api:
        status = api.request("GET", "/api/status")
        assert status.status_code == 200
        batching = status.json()["models"][0]["batching"]  # from device.json, applied at load
        assert (batching["max_batch"], batching["max_wait_ms"]) == (4, 1.0)
    # The wrong device (a laptop pointed at the wrong box) is refused in the handshake.
    with _api(device, break_glass, device_id="cam-other") as api, pytest.raises(httpx.ConnectError):
        api.request("GET", "/api/status")
    # Plain HTTP to the TLS port gets no answer from the API.
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/api/status", timeout=5)
    # Without the fleet CA the certificate is not trusted.
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v2/health/live", verify=ssl.create_default_context(), timeout=5)


def test_field_tokens_roles_revocation_and_offline_use(
    rig: tuple[FleetProcess, FleetClient, DeviceProcess],
) -> None:
    fleet, client, device = rig
    viewer = client.issue_field_token("alice", "viewer", [DEVICE], 1)
    technician = client.issue_field_token("bob", "technician", ["*"], 8)
    elsewhere = client.issue_field_token("carol", "technician", ["cam-other"], 1)
    assert "token" not in client.field_tokens()[0], "the fleet lists tokens, never their secret"

    with _api(device, viewer["token"]) as api:
        assert api.request("GET", "/api/status").status_code == 200
        body = _infer_body(api)
        refused = api.request("POST", "/v2/models/surface-defect/infer", json=body)
        assert refused.status_code == 403 and "technician" in refused.json()["error"]
    with _api(device, technician["token"]) as api:
        assert api.request("POST", "/v2/models/surface-defect/infer", json=body).status_code == 200
    with _api(device, elsewhere["token"]) as api:
        assert api.request("GET", "/api/status").status_code == 401
    with pytest.raises(FleetApiError, match="422"):
        client.issue_field_token("dave", "technician", [DEVICE], 9)  # over 8 hours

    # Revoked at the fleet: the device is told at once and refuses the token.
    serial = _keys(device)["serial"]  # type: ignore[index]
    client.revoke_field_token(viewer["jti"])

    def refused_now() -> bool:
        with _api(device, viewer["token"]) as api:
            return api.request("GET", "/api/status").status_code == 401

    wait_for("the revocation to reach the device", refused_now, 30)
    assert _keys(device)["serial"] > serial  # type: ignore[index]

    # The fleet goes away: tokens are still checked on the device with the keys it holds.
    fleet.stop()
    with _api(device, technician["token"]) as api:
        assert api.request("GET", "/api/status").status_code == 200
    with _api(device, viewer["token"]) as api:
        assert api.request("GET", "/api/status").status_code == 401


def test_keys_rotate_while_the_device_runs(rig: tuple[FleetProcess, FleetClient, DeviceProcess]) -> None:
    _, client, device = rig
    before = _keys(device)
    assert before is not None
    old_token = client.issue_field_token("erin", "viewer", [DEVICE], 2)
    wait_for("telemetry flowing", lambda: _stored(client) > 0, 30)

    changed = client.rotate_keys(telemetry=True, signing=True, field_tokens=True)
    assert changed["telemetry_key_id"] != before["telemetry"]["key_id"]
    wait_for(
        "the device to adopt the new keys",
        lambda: (_keys(device) or {}).get("serial", 0) >= changed["serial"],
        30,
    )
    after = _keys(device)
    assert after is not None
    assert after["telemetry"]["key_id"] == changed["telemetry_key_id"]
    assert set(after["field_tokens"]["keys"]) == set(before["field_tokens"]["keys"]) | {
        changed["field_token_key_id"]
    }, "the old field-token key stays trusted until its tokens expire"
    # Telemetry sealed to the new key keeps arriving; tokens from before and after both work.
    stored = _stored(client)
    wait_for("telemetry after the rotation", lambda: _stored(client) > stored + 2, 30)
    new_token = client.issue_field_token("erin", "viewer", [DEVICE], 2)
    assert new_token["key_id"] == changed["field_token_key_id"]
    for token in (old_token, new_token):
        with _api(device, token["token"]) as api:
            assert api.request("GET", "/api/status").status_code == 200

    # A leaked field-token key: dropped at once, with every token it signed.
    dropped = client.rotate_keys(field_tokens=True, drop_old_field_key=True)
    wait_for(
        "the device to drop the old key",
        lambda: (_keys(device) or {}).get("serial", 0) >= dropped["serial"],
        30,
    )
    with _api(device, new_token["token"]) as api:
        assert api.request("GET", "/api/status").status_code == 401
    with _api(device, client.issue_field_token("erin", "viewer", [DEVICE], 1)["token"]) as api:
        assert api.request("GET", "/api/status").status_code == 200


def test_no_secret_reaches_the_logs(rig: tuple[FleetProcess, FleetClient, DeviceProcess]) -> None:
    fleet, client, device = rig
    issued = client.issue_field_token("frank", "technician", [DEVICE], 1)
    with _api(device, issued["token"]) as api:
        assert api.request("GET", "/api/status").status_code == 200
    with _api(device, issued["token"] + "x") as api:  # a failed login is logged, its token is not
        assert api.request("GET", "/api/status").status_code == 401
    client.rotate_keys(telemetry=True, field_tokens=True)
    client.revoke_field_token(issued["jti"])
    secrets = {
        "operator token": (fleet.root / "secrets" / "operator-token").read_text().strip(),
        "break-glass": (device.root / "secrets" / "api-token").read_text().strip(),
        "field token": issued["token"],
        "field token signature": issued["token"].rsplit(".", 1)[1],
    }
    logs = {p.name: p.read_text() for p in (fleet.root.parent / "logs").glob("*.log")}
    assert set(logs) >= {"fleet.log", f"{DEVICE}.log"}
    for name, text in logs.items():
        assert "PRIVATE KEY" not in text, name
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in {name}"
