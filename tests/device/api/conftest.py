"""The local API on a real socket: uvicorn in a thread, the sample model served by a real engine."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from device.api import create_app
from device.engine.engine import Engine
from models.manifest import load_manifest
from tests.asgi_server import serving

TOKEN = "test-token-123"


@pytest.fixture
def served(engine: Engine, zoo: Path) -> Iterator[Engine]:
    """The engine behind the API, with surface-defect v1 loaded; tests may serve more models on it."""
    engine.serve(engine.prepare(zoo / "v1", load_manifest(zoo / "v1")))
    yield engine
    engine.close()  # after the server (fixtures end in reverse): its batchers finish first


@pytest.fixture
def api(served: Engine) -> Iterator[str]:
    app = create_app(served, lambda: {"device_id": "dev-a"}, TOKEN, lambda: {"update_state": "idle"})
    with serving(app) as url:
        yield url
