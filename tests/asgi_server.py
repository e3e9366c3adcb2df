"""An ASGI app on a real port, served by uvicorn in a thread: what the API tests talk to.

The device's API is served as the agent serves it (device/api/server.py: infer requests answered by
the HTTP protocol itself); `http="httptools"` serves it through plain uvicorn and ASGI instead."""

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from device.api.fastpath import InferFastPath
from device.api.server import api_server_config
from edgefleet.procs import free_port, wait_for


@contextlib.contextmanager
def serving(app: Any, *, https: tuple[str, str] | None = None, **config: Any) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL. `https`: (certfile, keyfile)."""
    port = free_port()
    cert, key = https or (None, None)
    options = {"log_level": "warning", "ssl_certfile": cert, "ssl_keyfile": key, **config}
    if isinstance(app, InferFastPath):
        server = uvicorn.Server(api_server_config(app, "127.0.0.1", port, **options))
    else:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the API", lambda: server.started or not thread.is_alive(), 20, 0.02)
    if not server.started:
        raise RuntimeError(f"the API did not start on port {port}")
    try:
        yield f"{'https' if https else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
