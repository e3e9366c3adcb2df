"""Schemathesis against the fleet's JSON API, served by uvicorn on a real socket over a real SQLite file.

Every operation is fuzzed for a bounded number of cases (valid and invalid), then the stateful phase
chains them (a device added, then read, labelled, rolled back...); checks: no 5xx, bodies match the
declared schema, and an operation that declares the bearer scheme refuses a missing or wrong token.
The enrollment routes declare no security: the enrollment token in the body is their credential.
`HYPOTHESIS_PROFILE=fuzz` (make fuzz) multiplies the bounds by FUZZ_SCALE.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis

from fleet.api import create_app
from fleet.db import open_database
from fleet.service import FleetService
from fleet.store import FleetDataDir
from tests.asgi_server import serving
from tests.conftest import FUZZ_SCALE
from tests.device.api.test_schemathesis import CHECKS, fuzz_each_operation, run_stateful

TOKEN = "operator-fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 25 * FUZZ_SCALE
STATEFUL_EXAMPLES, STATEFUL_STEPS = 10, 8
KNOWN = {"device_id": "cam-1", "model_name": "surface-defect"}
OPEN_OPERATIONS = {("get", "/healthz"), ("post", "/api/enroll"), ("post", "/api/enroll/renew")}


@pytest.fixture(scope="module")
def fleet_url(tmp_path_factory: pytest.TempPathFactory, archives: dict[int, Path]) -> Iterator[str]:
    data = FleetDataDir(tmp_path_factory.mktemp("fleet-fuzz") / "fleet")
    data.make_dirs()
    service = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", chunk_size=4096)
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes, qos: int) -> None:  # no broker: offers are kept
        sent.append((topic, payload))

    service.publish = publish  # type: ignore[method-assign]
    service.add_device(KNOWN["device_id"])
    service.register_model(archives[1])
    service.register_model(archives[2])
    with serving(create_app(service, TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def fleet_schema(fleet_url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{fleet_url}/openapi.json", headers=AUTH)
    schema.config.update(base_url=fleet_url, headers=AUTH)
    schema.config.generation.update(max_examples=MAX_EXAMPLES)
    return schema


def test_each_operation(fleet_schema: Any) -> None:
    assert fuzz_each_operation(fleet_schema, MAX_EXAMPLES, CHECKS, KNOWN) == []


def test_stateful(fleet_schema: Any) -> None:
    run_stateful(fleet_schema, FUZZ_SCALE, STATEFUL_EXAMPLES, STATEFUL_STEPS, CHECKS)


def test_every_secured_operation_refuses_a_missing_or_wrong_token(fleet_url: str) -> None:
    # one connection for all: the probes are many
    with httpx.Client(base_url=fleet_url) as client:
        spec = client.get("/openapi.json", headers=AUTH).json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        open_operations = set()
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                if not operation.get("security"):
                    open_operations.add((method, path))
                    continue
                url = path.replace("{device_id}", KNOWN["device_id"])
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    answer = client.request(method, url, headers=headers)
                    assert answer.status_code == 401, (method, path, headers, answer.text)
                    assert answer.headers["www-authenticate"] == "Bearer"
        assert open_operations == OPEN_OPERATIONS
        assert client.get("/openapi.json").status_code == 401
