"""An ASGI app on a real port, served by uvicorn in a thread: what the API tests talk to."""

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from edgefleet.procs import free_port, wait_for


@contextlib.contextmanager
def serving(app: Any, *, https: tuple[str, str] | None = None, **config: Any) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL. `https`: (certfile, keyfile)."""
    port = free_port()
    cert, key = https or (None, None)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ssl_certfile=cert,
            ssl_keyfile=key,
            **config,
        )
    )
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
