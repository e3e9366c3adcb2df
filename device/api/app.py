"""The app factory: explicit dependencies in, one FastAPI app out. Auth on all but liveness.

Auth (device/api/auth.py): the break-glass credential or a fleet-signed field token; GETs need the
viewer role, everything else the technician role, the infer fast path included.

Errors are `{"error": message}` everywhere, the shape Triton's and KServe's clients read.

Inference requests (`POST /v2/models/{name}[/versions/{v}]/infer`) are answered by `InferFastPath`
(device/api/fastpath.py) before FastAPI's router and dependency solver see them. The FastAPI route
of the same path stays, with the same code behind it, for the OpenAPI description and for any
composition without the fast path. Served by uvicorn through `device/api/server.py`, the same requests
are answered a layer lower still, by the HTTP protocol (device/api/infer_protocol.py).
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from device.api.auth import SCHEME_DESCRIPTION, Authenticator, TrustSource, role_for
from device.api.errors import MAX_BODY_BYTES, error_status
from device.api.fastpath import InferFastPath, PendingInfer
from device.api.limits import BodySizeLimit, BodyTooLarge, UnsupportedEncoding, decompress_body
from device.api.metrics import render
from device.api.ratelimit import FailedLoginLimiter
from device.api.v2 import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)
from device.engine.engine import Engine, ServingModel
from device.errors import EngineError, InferenceInputError

INFER_DOC = (
    "Open Inference Protocol v2 inference. The body is a JSON request, optionally followed by binary "
    "tensors (Triton's binary tensor data extension: header `Inference-Header-Content-Length`, "
    "`parameters.binary_data_size` per input, `binary_data` per output or `binary_data_output`)."
)
bearer = HTTPBearer(auto_error=False, description=SCHEME_DESCRIPTION)


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with each `{"$ref": "#/$defs/X"}` replaced by X: pydantic's local refs mean nothing
    inside an OpenAPI operation, and the infer models are small and not recursive."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


_INFER_SCHEMA = InferRequest.model_json_schema()
# The route reads the raw body itself (JSON, or JSON + binary tensors), so FastAPI cannot derive the
# body from a parameter; declared here, clients and fuzzers see the JSON form.
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline_refs(_INFER_SCHEMA, _INFER_SCHEMA["$defs"])}},
    }
}


def create_app(
    engine: Engine,
    status: Callable[[], dict[str, Any]],
    token: str,
    metrics_extra: Callable[[], dict[str, Any]] = dict,
    limiter: FailedLoginLimiter | None = None,
    routers: Sequence[APIRouter] = (),
    *,
    field_trust: TrustSource | None = None,
    device_id: str | None = None,
) -> Any:
    """The device's local API. `token` is the break-glass credential (technician). With
    `field_trust` (the fleet's token keys and revocations, None until the device has them) and
    `device_id`, fleet-signed field tokens for this device are accepted too."""
    authenticator = Authenticator(token, limiter or FailedLoginLimiter(), field_trust, device_id)
    authorize = authenticator.authorize
    app = FastAPI(title="edgefleet device", version="1", docs_url=None, redoc_url=None, openapi_url=None)

    async def require_token(  # async: a sync dependency would cost a thread hop per request
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        client = request.client.host if request.client else "unknown"
        request.state.principal = authorize(
            client, credentials.credentials if credentials else None, role_for(request.method)
        )

    Auth = Depends(require_token)

    async def answer_error(_: Request, e: Exception) -> JSONResponse:
        mapped = error_status(e)
        assert mapped is not None  # registered only for the classes error_status maps
        status_code, message, headers = mapped
        return JSONResponse({"error": message}, status_code=status_code, headers=headers)

    for handled in (
        StarletteHTTPException,
        InferenceInputError,
        EngineError,
        BodyTooLarge,
        UnsupportedEncoding,
    ):
        app.add_exception_handler(handled, answer_error)

    for extra in routers:  # e.g. device/api/updates.py: line state and rollback, behind the same auth
        app.include_router(extra, dependencies=[Auth])

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

    @app.get("/v2", dependencies=[Auth])
    def server_metadata() -> dict[str, Any]:
        return {"name": "edgefleet", "version": app.version, "extensions": ["binary_tensor_data"]}

    @app.get("/metrics", dependencies=[Auth], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(engine, metrics_extra), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status", dependencies=[Auth])
    def get_status() -> dict[str, Any]:
        return status()

    def serving_or_404(name: str, version: str | None = None) -> ServingModel:
        serving = engine.find(name)
        if serving is None:
            raise HTTPException(404, f"no model named {name!r}; loaded: {engine.names()}")
        if version is not None and version != str(serving.manifest.version):
            raise HTTPException(
                404, f"{name} serves version {serving.manifest.version}, not {version}; omit the version"
            )
        return serving

    @app.get("/v2/models/{name}", dependencies=[Auth])
    @app.get("/v2/models/{name}/versions/{version}", dependencies=[Auth])
    def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return model_metadata(serving_or_404(name, version))

    @app.get("/v2/models/{name}/ready", dependencies=[Auth])
    @app.get("/v2/models/{name}/versions/{version}/ready", dependencies=[Auth])
    def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        serving_or_404(name, version)
        return {"name": name, "ready": True}

    def start_infer(
        name: str, version: str | None, header_length: str | None, encoding: str | None, body: bytes
    ) -> PendingInfer:
        serving = serving_or_404(name, version)
        body = decompress_body(body, encoding, MAX_BODY_BYTES)
        parsed = parse_infer_request(body, header_length)
        # The batcher sets this loop's future from its thread; waiting on it holds no thread of ours.
        outputs = engine.submit_async(serving, parsed.inputs)
        return PendingInfer(outputs, lambda tensors: encode_infer_response(serving, tensors, parsed))

    infer_doc: dict[str, Any] = {"description": INFER_DOC, "openapi_extra": INFER_BODY}

    @app.post("/v2/models/{name}/infer", dependencies=[Auth], **infer_doc)
    @app.post("/v2/models/{name}/versions/{version}/infer", dependencies=[Auth], **infer_doc)
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        headers = request.headers
        pending = start_infer(
            name, version, headers.get(HEADER_LENGTH), headers.get("content-encoding"), await request.body()
        )
        content, json_length = pending.encode(await pending.outputs)
        if json_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )

    return InferFastPath(BodySizeLimit(app, MAX_BODY_BYTES), authorize, start_infer, MAX_BODY_BYTES)
