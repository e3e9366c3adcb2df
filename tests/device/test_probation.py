"""The probation verdict: the device's limits, and the model's own where its manifest names them."""

import asyncio
from pathlib import Path

import pytest

from device.engine.engine import Engine
from device.probation import MIN_LATENCY_SAMPLES, Probation
from models.manifest import ProbationLimits
from tests.device.test_updater import serve_v1

NAME = "surface-defect"


@pytest.fixture
def serving(engine: Engine, data_dir: Path) -> Engine:
    return serve_v1(engine, data_dir)


def verdict(engine: Engine, max_error_rate: float = 0.2) -> str | None:
    return asyncio.run(Probation(engine, NAME, 0.0, max_error_rate).run()).reason


def limit(engine: Engine, **limits: float) -> None:
    serving = engine.get(NAME)
    serving.manifest = serving.manifest.model_copy(update={"probation": ProbationLimits(**limits)})


def record(engine: Engine, ok: int, failed: int, latency_ms: float) -> None:
    stats = engine.get(NAME).stats
    for _ in range(ok):
        stats.record(1, latency_ms)
    stats.failed(failed)


def test_a_healthy_model_commits(serving: Engine) -> None:
    record(serving, MIN_LATENCY_SAMPLES, 0, 1.0)
    assert verdict(serving) is None


def test_the_device_error_limit_applies_without_manifest_limits(serving: Engine) -> None:
    record(serving, 85, 15, 1.0)  # 15%
    assert verdict(serving, max_error_rate=0.2) is None
    assert "above the 10% allowed" in (verdict(serving, max_error_rate=0.1) or "")


def test_the_manifest_error_limit_wins_over_the_device_default(serving: Engine) -> None:
    record(serving, 95, 5, 1.0)  # 5%
    limit(serving, max_error_rate=0.01)
    assert "above the 1% allowed" in (verdict(serving, max_error_rate=0.2) or "")
    limit(serving, max_error_rate=0.5)
    assert verdict(serving, max_error_rate=0.01) is None, "a model may also be allowed more"


def test_the_manifest_latency_limit_wins_over_the_budget(serving: Engine) -> None:
    budget = serving.get(NAME).manifest.latency_budget_ms
    record(serving, MIN_LATENCY_SAMPLES, 0, budget / 2)
    assert verdict(serving) is None
    limit(serving, max_latency_p95_ms=budget / 4)
    reason = verdict(serving) or ""
    assert "exceeds the manifest's probation limit" in reason
