"""Auth of the local API over a real socket: fleet-signed field tokens with roles, and break-glass.

The fleet's side is a real Ed25519 key issuing real tokens (protocol/field_token.py); the device
holds its public key in a FieldTrust the test swaps as the fleet would (new revocations).
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, HTTPException

from device.api import create_app
from device.api.auth import SCHEME_DESCRIPTION, Authenticator
from device.api.ratelimit import FailedLoginLimiter
from device.engine.engine import Engine
from protocol.field_token import FieldTrust, issue, key_id
from tests.asgi_server import serving
from tests.device.api.conftest import TOKEN

DEVICE = "dev-a"
FLEET_KEY = Ed25519PrivateKey.generate()
KID = key_id(FLEET_KEY.public_key())
INFER = "/v2/models/surface-defect/infer"
BODY = {
    "inputs": [
        {
            "name": "image",
            "shape": [1, 3, 64, 64],
            "datatype": "FP32",
            "data": np.zeros(3 * 64 * 64, np.float32).tolist(),
        }
    ]
}


class TrustHolder:
    """What the agent keeps: the trust of the fleet's last keys document, swapped when one arrives."""

    def __init__(self, trust: FieldTrust | None) -> None:
        self.trust = trust

    def __call__(self) -> FieldTrust | None:
        return self.trust


def field_token(
    role: str, devices: tuple[str, ...] = (DEVICE,), ttl_s: int = 600, now: float | None = None
) -> str:
    return issue(FLEET_KEY, KID, "ana", role, list(devices), ttl_s, now=now)[0]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def serve(app: object) -> Iterator[str]:
    with serving(app) as url:
        yield url


def line_router() -> APIRouter:
    """A router with a read and a change, as device/api/updates.py has, without an updater behind it."""
    routes = APIRouter()
    state = {"busy": False}

    @routes.get("/api/line")
    def get_line() -> dict[str, bool]:
        return state

    @routes.put("/api/line")
    def put_line(busy: bool) -> dict[str, bool]:
        state["busy"] = busy
        return state

    @routes.get("/api/broken")
    def broken() -> None:
        raise HTTPException(418, "not reached by callers without a token")

    return routes


@dataclass
class Device:
    url: str
    trust: TrustHolder


@pytest.fixture
def device(served: Engine) -> Iterator[Device]:
    trust = TrustHolder(FieldTrust(keys={KID: FLEET_KEY.public_key()}))
    app = create_app(
        served,
        lambda: {"device_id": DEVICE},
        TOKEN,
        routers=[line_router()],
        field_trust=trust,
        device_id=DEVICE,
    )
    for url in serve(app):
        yield Device(url, trust)


def test_liveness_needs_nothing(device: Device) -> None:
    assert httpx.get(f"{device.url}/healthz").status_code == 200
    assert httpx.get(f"{device.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{device.url}/api/status").status_code == 401


def test_a_viewer_reads_but_may_not_infer_or_change(device: Device) -> None:
    viewer = bearer(field_token("viewer"))
    with httpx.Client(base_url=device.url, headers=viewer) as client:
        for path in ("/api/status", "/v2/models/surface-defect", "/metrics", "/api/line", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        refused = client.post(INFER, json=BODY)
        assert refused.status_code == 403
        assert refused.json() == {"error": "this needs the technician role; the token of 'ana' is viewer"}
        # The FastAPI route behind the fast path (version in the path goes through the same check).
        assert client.post("/v2/models/surface-defect/versions/1/infer", json=BODY).status_code == 403
        assert client.put("/api/line", params={"busy": True}).status_code == 403
        assert client.get("/api/line").json() == {"busy": False}, "the refused change did nothing"
        # 403s are not failed logins: the viewer is not locked out after many of them.
        assert all(client.post(INFER, json=BODY).status_code == 403 for _ in range(12))
        assert client.get("/api/status").status_code == 200


def test_a_technician_infers_and_changes(device: Device) -> None:
    with httpx.Client(base_url=device.url, headers=bearer(field_token("technician"))) as client:
        answer = client.post(INFER, json=BODY)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [1, 4]
        assert client.put("/api/line", params={"busy": True}).json() == {"busy": True}
        assert client.get("/api/status").status_code == 200


def test_a_token_for_any_device_of_the_fleet_works(device: Device) -> None:
    assert (
        httpx.post(
            f"{device.url}{INFER}", json=BODY, headers=bearer(field_token("technician", ("*",)))
        ).status_code
        == 200
    )


@pytest.mark.parametrize("path", ["/api/status", INFER])
def test_expired_and_other_device_tokens_get_401_with_the_reason(device: Device, path: str) -> None:
    expired = field_token("technician", ttl_s=3600, now=time.time() - 7200)
    other = field_token("technician", ("dev-b",))
    for credential, reason in (
        (expired, "field token refused: expired"),
        (other, "field token refused: not for this device"),
    ):
        answer = httpx.request(
            "GET" if path == "/api/status" else "POST",
            f"{device.url}{path}",
            json=BODY,
            headers=bearer(credential),
        )
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"].startswith(reason), answer.text


def test_a_revoked_token_is_refused_from_the_next_request_on(device: Device) -> None:
    compact, token = issue(FLEET_KEY, KID, "ana", "technician", [DEVICE], 600)
    with httpx.Client(base_url=device.url, headers=bearer(compact)) as client:
        assert client.post(INFER, json=BODY).status_code == 200
        assert client.get("/api/status").status_code == 200  # verified once, served from the cache
        old = device.trust.trust
        assert old is not None
        device.trust.trust = FieldTrust(keys=old.keys, revoked=frozenset({token.jti}))
        for answer in (client.post(INFER, json=BODY), client.get("/api/status")):
            assert answer.status_code == 401
            assert answer.json()["error"].startswith("field token refused: revoked")


def test_a_token_of_a_key_the_device_does_not_hold_is_refused(device: Device) -> None:
    other_fleet = Ed25519PrivateKey.generate()
    compact, _ = issue(other_fleet, key_id(other_fleet.public_key()), "mallory", "technician", ["*"], 600)
    answer = httpx.get(f"{device.url}/api/status", headers=bearer(compact))
    assert answer.status_code == 401 and "unknown key id" in answer.json()["error"]


def test_without_fleet_keys_field_tokens_are_refused_and_break_glass_works(device: Device) -> None:
    device.trust.trust = None
    answer = httpx.get(f"{device.url}/api/status", headers=bearer(field_token("technician")))
    assert answer.status_code == 401 and "no fleet token keys yet" in answer.json()["error"]
    with httpx.Client(base_url=device.url, headers=bearer(TOKEN)) as client:
        assert client.post(INFER, json=BODY).status_code == 200
        assert client.put("/api/line", params={"busy": True}).status_code == 200
        assert client.get("/api/status").json() == {"device_id": DEVICE}


def test_guessing_field_tokens_trips_the_limiter(device: Device) -> None:
    wrong = [field_token("technician", ("dev-b",)), "eft1.e30.AAAA", "not-a-token"]
    statuses = [
        httpx.get(f"{device.url}/api/status", headers=bearer(wrong[i % 3])).status_code for i in range(10)
    ]
    assert statuses == [401] * 10
    for blocked in (
        httpx.get(f"{device.url}/api/status", headers=bearer(TOKEN)),
        httpx.post(f"{device.url}{INFER}", json=BODY, headers=bearer(field_token("technician"))),
    ):
        assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
    assert httpx.get(f"{device.url}/healthz").status_code == 200


def test_the_spec_declares_both_credentials_on_every_operation_but_liveness(device: Device) -> None:
    spec = httpx.get(f"{device.url}/openapi.json", headers=bearer(field_token("viewer"))).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["description"] == SCHEME_DESCRIPTION
    unsecured = {
        (path, method)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if not op.get("security")
    }
    assert unsecured == {("/healthz", "get"), ("/v2/health/live", "get")}


def test_a_device_without_field_trust_takes_only_break_glass(served: Engine) -> None:
    app = create_app(served, dict, TOKEN)  # the positional form of `device serve` and the benches
    for url in serve(app):
        answer = httpx.get(f"{url}/api/status", headers=bearer(field_token("technician")))
        assert answer.status_code == 401 and "takes no field tokens" in answer.json()["error"]
        assert httpx.get(f"{url}/api/status", headers=bearer(TOKEN)).status_code == 200


# -- the authenticator's cache, on a clock the test moves -----------------------------------------
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_cached_tokens_expire_and_a_new_trust_empties_the_cache() -> None:
    clock = Clock(1_800_000_000.0)
    keys = {KID: FLEET_KEY.public_key()}
    trust = TrustHolder(FieldTrust(keys=keys))
    auth = Authenticator(TOKEN, FailedLoginLimiter(), trust, DEVICE, cache_size=2, clock=clock)
    compact = field_token("viewer", ttl_s=60, now=clock.now)
    first = auth.authorize("10.0.0.1", compact, "viewer")
    assert auth.authorize("10.0.0.1", compact, "viewer") is first, "served from the cache"
    trust.trust = FieldTrust(keys=dict(keys))  # equal, but a new object
    assert auth.authorize("10.0.0.1", compact, "viewer") is first, "an equal trust keeps the cache"
    trust.trust = FieldTrust(keys=dict(keys), revoked=frozenset({"0" * 32}))
    again = auth.authorize("10.0.0.1", compact, "viewer")
    assert again == first and again is not first, "a changed trust verifies again"
    clock.now += 60
    with pytest.raises(HTTPException) as caught:
        auth.authorize("10.0.0.1", compact, "viewer")
    assert caught.value.status_code == 401 and "expired" in caught.value.detail


def test_the_cache_is_bounded() -> None:
    clock = Clock(1_800_000_000.0)
    trust = TrustHolder(FieldTrust(keys={KID: FLEET_KEY.public_key()}))
    auth = Authenticator(TOKEN, FailedLoginLimiter(), trust, DEVICE, cache_size=2, clock=clock)
    tokens = [field_token("viewer", now=clock.now) for _ in range(3)]
    principals = [auth.authorize("10.0.0.1", t, "viewer") for t in tokens]
    assert auth.authorize("10.0.0.1", tokens[2], "viewer") is principals[2]
    assert auth.authorize("10.0.0.1", tokens[0], "viewer") is not principals[0], "the oldest was dropped"


def test_field_trust_needs_a_device_id() -> None:
    with pytest.raises(ValueError, match="device_id"):
        Authenticator(TOKEN, field_trust=TrustHolder(None))
