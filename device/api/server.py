"""How the local API is served: one uvicorn configuration for the agent, `device serve` and the bench."""

import logging
from typing import Any

import uvicorn

from device.api.fastpath import InferFastPath
from device.api.infer_protocol import protocol_for

log = logging.getLogger(__name__)


def api_server_config(app: Any, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn's Config for the device API `app` (from `create_app`).

    Infer requests are answered by the HTTP protocol itself (device/api/infer_protocol.py) where
    uvicorn has its httptools protocol; elsewhere, or with `http=` given, by the ASGI fast path.
    `X-Forwarded-*` headers are not trusted: nothing proxies the device's API, and the failed-login
    limiter must count the real peer, not an address a local process wrote into a header.
    """
    options.setdefault("log_level", "warning")
    options.setdefault("access_log", False)
    options.setdefault("proxy_headers", False)
    if "http" not in options and isinstance(app, InferFastPath):
        protocol = protocol_for(app)
        if protocol is None:
            log.warning("uvicorn has no httptools protocol here: infer requests take the ASGI path")
        else:
            options["http"] = protocol
    return uvicorn.Config(app, host=host, port=port, **options)
