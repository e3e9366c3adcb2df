"""Schemathesis against the device's local API, served by uvicorn on a real socket.

The app is the one the agent builds: a real engine serving surface-defect v1, the update routes
over a real updater, and the token. Every operation is fuzzed for a bounded number of cases, then
the stateful phase chains operations; checks: no 5xx, bodies match the declared schema, and an
operation that declares the bearer scheme refuses the request without (or with a wrong) token.
`HYPOTHESIS_PROFILE=fuzz` (make fuzz) multiplies the bounds by FUZZ_SCALE.
"""

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth, response_schema_conformance

from device.api import create_app
from device.api import updates as update_routes
from device.api.auth import SCHEME_DESCRIPTION
from device.api.ratelimit import FailedLoginLimiter
from device.engine.engine import Engine
from device.engine.probe import probe
from device.line import LineState
from device.slots import install_initial
from tests.asgi_server import serving
from tests.conftest import FUZZ_SCALE
from tests.device.test_updater import MemoryFleet, make_updater, new_fleet_tuf, serve_v1

TOKEN = "fuzz-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVED = {"name": "surface-defect", "version": "1"}
MAX_EXAMPLES = 25 * FUZZ_SCALE
STATEFUL_EXAMPLES, STATEFUL_STEPS = 8, 6
CHECKS = [schemathesis.checks.not_a_server_error, response_schema_conformance, ignored_auth]


def fuzz_each_operation(
    schema: Any, max_examples: int, checks: list[Any], known: Mapping[str, str] = MappingProxyType({})
) -> list[str]:
    """Run every operation of `schema` for up to `max_examples` valid and invalid cases each; the
    failures, one line per operation (the first falsifying case's error), empty when all passed.
    `known` path parameter values (a served model's name) reach past the 404 a random name gets.

    A loop rather than schemathesis' pytest plugin: its lazy-fixture path reads a private pytest
    attribute that pytest 9 no longer has (`Function._nodeid`)."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )
        fixed = {name: known[name] for name in re.findall(r"{(\w+)}", operation.path) if name in known}
        if fixed:
            strategy |= operation.as_strategy(GenerationMode.POSITIVE, path_parameters=fixed)

        @given(strategy)
        @settings(
            max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def run(case: Any) -> None:
            case.call_and_validate(checks=checks)

        try:
            run()
        except (Exception, BaseExceptionGroup) as e:  # collected: one run reports every failing operation
            failures.append(f"{operation.label}: {type(e).__name__}: {e}")
    return failures


def run_stateful(schema: Any, runs: int, max_examples: int, steps: int, checks: list[Any]) -> None:
    """The stateful phase: chains of calls linked through the spec (ids one call returns fed to the
    next), each response held to `checks` only, the same checks as the per-operation phase.

    Longer fuzzing is more runs of a fresh machine, not one run with more examples: schemathesis
    caps transitions with counters kept across a run's examples, and once a cap closes a rule
    Hypothesis sees the rule choice change under a replayed prefix (FlakyStrategyDefinition)."""
    for _ in range(runs):

        class Machine(schema.as_state_machine()):  # type: ignore[misc]
            def validate_response(
                self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
            ) -> None:
                case.validate_response(
                    response,
                    checks=checks,
                    transport_kwargs=kwargs or None,
                    recorder=getattr(self, "recorder", None),
                )

        Machine.run(
            settings=settings(
                max_examples=max_examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
        )


@pytest.fixture(scope="module")
def device_url(tmp_path_factory: pytest.TempPathFactory, archives: dict[int, Path]) -> Iterator[str]:
    root = tmp_path_factory.mktemp("device-fuzz")
    data_dir = root / "data"
    (data_dir / "models").mkdir(parents=True)
    install_initial(data_dir / "models", archives[1])
    engine = serve_v1(Engine(probe()), data_dir)
    updater = make_updater(
        data_dir, engine, MemoryFleet(archives[2].read_bytes()), new_fleet_tuf(root, archives)
    )
    line = LineState(data_dir / "line-state.json")
    # The auth probes send wrong tokens on purpose; the default limiter would turn the rest into 429s.
    limiter = FailedLoginLimiter(max_failures=10**9)
    app = create_app(
        engine,
        lambda: {"device_id": "dev-a"},
        TOKEN,
        lambda: {"update_state": "idle"},
        limiter=limiter,
        routers=[update_routes.router(updater, line)],
    )
    with serving(app) as url:
        yield url
    engine.close()


@pytest.fixture(scope="module")
def device_schema(device_url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{device_url}/openapi.json", headers=AUTH)
    schema.config.update(base_url=device_url, headers=AUTH)
    schema.config.generation.update(max_examples=MAX_EXAMPLES)
    return schema


def test_each_operation(device_schema: Any) -> None:
    assert fuzz_each_operation(device_schema, MAX_EXAMPLES, CHECKS, SERVED) == []


def test_stateful(device_schema: Any) -> None:
    run_stateful(device_schema, FUZZ_SCALE, STATEFUL_EXAMPLES, STATEFUL_STEPS, CHECKS)


def test_every_secured_operation_refuses_a_missing_or_wrong_token(device_url: str) -> None:
    # one connection for all: the probes are many
    with httpx.Client(base_url=device_url) as client:
        spec = client.get("/openapi.json", headers=AUTH).json()
        scheme = spec["components"]["securitySchemes"]["HTTPBearer"]
        assert scheme == {"type": "http", "scheme": "bearer", "description": SCHEME_DESCRIPTION}
        assert "field-engineer token" in scheme["description"] and "break-glass" in scheme["description"]
        open_paths = set()
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                url = path.replace("{name}", "surface-defect").replace("{version}", "1")
                if not operation.get("security"):
                    open_paths.add(path)
                    continue
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    answer = client.request(method, url, headers=headers)
                    assert answer.status_code == 401, (method, path, headers, answer.text)
                    assert answer.headers["www-authenticate"] == "Bearer"
        assert open_paths == {"/healthz", "/v2/health/live"}  # liveness only
        assert client.get("/openapi.json").status_code == 401  # the spec itself is behind the token
