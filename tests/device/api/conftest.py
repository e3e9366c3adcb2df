"""The local API on a real socket: uvicorn in a thread, the sample model served by a real engine."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from device.api import create_app
from device.engine.engine import Engine
from edgefleet.procs import free_port, wait_for
from models.manifest import load_manifest

TOKEN = "test-token-123"


@pytest.fixture
def served(engine: Engine, zoo: Path) -> Iterator[Engine]:
    """The engine behind the API, with surface-defect v1 loaded; tests may serve more models on it."""
    engine.serve(engine.prepare(zoo / "v1", load_manifest(zoo / "v1")))
    yield engine
    engine.close()  # after the server (fixtures end in reverse): its batchers finish first


@pytest.fixture
def api(served: Engine) -> Iterator[str]:
    port = free_port()
    app = create_app(served, lambda: {"device_id": "dev-a"}, TOKEN, lambda: {"update_state": "idle"})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the API", lambda: server.started, 10, 0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
