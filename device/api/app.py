"""The app factory: explicit dependencies in, one FastAPI app out. Auth on all but liveness."""

import asyncio
import hmac
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from device.api.limits import BodySizeLimit
from device.api.metrics import render
from device.api.ratelimit import FailedLoginLimiter
from device.api.v2 import InferRequest, decode_inputs, encode_outputs, model_metadata
from device.engine.engine import Engine
from device.errors import EngineError, InferenceInputError

MAX_BODY_BYTES = 16 * 1024 * 1024
bearer = HTTPBearer(auto_error=False, description="the device's API token (secrets/api-token)")


def create_app(
    engine: Engine,
    status: Callable[[], dict[str, Any]],
    token: str,
    metrics_extra: Callable[[], dict[str, Any]] = dict,
    limiter: FailedLoginLimiter | None = None,
) -> Any:
    limiter = limiter or FailedLoginLimiter()
    app = FastAPI(title="edgefleet device", version="1", docs_url=None, redoc_url=None, openapi_url=None)

    def require_token(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        client = request.client.host if request.client else "unknown"
        wait = limiter.blocked_for(client)
        if wait > 0:
            raise HTTPException(
                429,
                f"too many failed logins; retry in {wait:.0f} s",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            if credentials is not None:  # a wrong token is a guess; a missing one is not counted
                limiter.failed(client)
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    Auth = Depends(require_token)

    @app.exception_handler(InferenceInputError)
    async def bad_input(_: Request, e: InferenceInputError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(EngineError)
    async def engine_failed(_: Request, e: EngineError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=503)

    @app.get("/openapi.json", dependencies=[Auth], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", dependencies=[Auth])
    def ready() -> JSONResponse:
        ok = bool(engine.names())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Auth], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(engine, metrics_extra), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status", dependencies=[Auth])
    def get_status() -> dict[str, Any]:
        return status()

    def serving_or_404(name: str) -> Any:
        if name not in engine.names():
            raise HTTPException(404, f"no model named {name!r}; loaded: {engine.names()}")
        return engine.get(name)

    @app.get("/v2/models/{name}", dependencies=[Auth])
    def metadata(name: str) -> dict[str, Any]:
        return model_metadata(serving_or_404(name))

    @app.get("/v2/models/{name}/ready", dependencies=[Auth])
    def model_ready(name: str) -> dict[str, Any]:
        serving_or_404(name)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", dependencies=[Auth])
    async def infer(name: str, request: InferRequest) -> dict[str, Any]:
        serving = serving_or_404(name)
        inputs = decode_inputs(request)
        outputs = await asyncio.to_thread(engine.run, name, inputs)
        return encode_outputs(serving, outputs, request)

    return BodySizeLimit(app, MAX_BODY_BYTES)
