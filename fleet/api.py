"""The fleet's JSON API for operators and their tools. Every route but /healthz needs the operator token."""

import asyncio
import hmac
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from fleet.artifacts import ArtifactStoreError
from fleet.campaigns import Action, CampaignDriver
from fleet.enrollment_api import add_enrollment_routes
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.keys_api import add_keys_routes
from fleet.metrics import render
from fleet.rollouts import Phase, Target
from fleet.service import FleetService

MAX_UPLOAD_BYTES = 1024 * 1024 * 1024
MAX_SQL_INT = 2**63 - 1  # SQLite's INTEGER: a larger id or version is a 422 here, not an OverflowError (500)
bearer = HTTPBearer(
    auto_error=False, description="the operator token (fleet data dir: secrets/operator-token)"
)


class NewDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The pattern is protocol.topics' rule, declared so clients (and schemathesis) see it; the service
    # enforces it with its own message, so the spec carries it without pydantic checking it twice.
    device_id: str = Field(
        description="lowercase id: a-z, 0-9, '-', '_'",
        json_schema_extra={"pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
    )


class NewRollout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: str
    version: int = Field(ge=1, le=MAX_SQL_INT)
    target: Target
    phases: list[Phase] | None = Field(default=None, description="default: canary 1, then 10%, then all")
    seed: str | None = Field(default=None, description="orders the devices (canary choice); default: the id")


class RolloutAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=1024)


class Labels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[str] = Field(default=[], max_length=64)
    tags: list[str] = Field(default=[], max_length=64)


class NewWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group: str
    cron: str = Field(description="5 fields, when each window opens, e.g. '0 2 * * *'")
    duration_minutes: int = Field(ge=1, le=7 * 24 * 60)
    tz: str = Field(default="UTC", description="IANA time zone, e.g. Europe/Berlin")


class DeviceRollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: str
    to_version: int = Field(ge=1, le=MAX_SQL_INT)
    reason: str = Field(default="", max_length=1024)


class NewUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: str
    version: int = Field(ge=1, le=MAX_SQL_INT)
    device_ids: list[str] = Field(min_length=1, max_length=100_000)


def create_app(service: FleetService, token: str, campaigns: CampaignDriver | None = None) -> FastAPI:
    app = FastAPI(title="edgefleet fleet", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    driver = campaigns or CampaignDriver(service)

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(
                401, "missing or wrong operator token", headers={"WWW-Authenticate": "Bearer"}
            )

    Auth = Depends(require_token)
    # ArtifactStoreError: the bucket refused or could not be reached (say so, and retry later).
    for error, status in ((NotFound, 404), (Conflict, 409), (InvalidRequest, 422), (ArtifactStoreError, 503)):

        async def handler(_: Request, e: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"error": str(e)}, status_code=status)

        app.add_exception_handler(error, handler)
    add_enrollment_routes(app, service, Auth)  # POST /api/enroll (+ renew, tokens, revocation)
    add_keys_routes(app, service, Auth)  # keys document, rotation, field-engineer tokens

    @app.get("/openapi.json", dependencies=[Auth], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/devices", dependencies=[Auth], status_code=201)
    def add_device(body: NewDevice) -> dict[str, Any]:
        return service.add_device(body.device_id)

    @app.get("/api/devices", dependencies=[Auth])
    def list_devices() -> list[dict[str, Any]]:
        return service.list_devices()

    @app.get("/api/devices/{device_id}", dependencies=[Auth])
    def get_device(device_id: str) -> dict[str, Any]:
        return service.get_device(device_id)

    @app.get("/api/devices/{device_id}/telemetry", dependencies=[Auth])
    def get_telemetry(device_id: str, kind: str | None = None, limit: int = 100) -> dict[str, Any]:
        service.get_device(device_id)  # 404 for an unknown device
        return service.telemetry(device_id, kind, limit)

    @app.get("/metrics", dependencies=[Auth], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(service), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/fleet/stats", dependencies=[Auth])
    def fleet_stats() -> dict[str, Any]:
        return {"telemetry": dict(service.telemetry_counts), "rejected_messages": service.rejected_messages}

    @app.get("/api/models", dependencies=[Auth])
    def list_models() -> list[dict[str, Any]]:
        return service.list_models()

    @app.post("/api/models", dependencies=[Auth], status_code=201)
    async def push_model(request: Request) -> dict[str, Any]:
        """Body: the package archive (application/octet-stream), streamed to disk, verified, then kept."""
        fd, name = tempfile.mkstemp(dir=service.data.root, suffix=".upload")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for block in request.stream():
                    size += len(block)
                    if size > MAX_UPLOAD_BYTES:
                        raise HTTPException(413, f"package exceeds {MAX_UPLOAD_BYTES} bytes")
                    out.write(block)
            return await asyncio.to_thread(service.register_model, Path(name))
        finally:
            Path(name).unlink(missing_ok=True)

    @app.post("/api/updates", dependencies=[Auth], status_code=201)
    async def start_update(body: NewUpdate) -> list[dict[str, Any]]:
        return await service.start_update(body.model_name, body.version, body.device_ids)

    @app.get("/api/updates", dependencies=[Auth])
    def list_updates(device_id: str | None = None) -> list[dict[str, Any]]:
        return service.list_updates(device_id)

    @app.get("/api/updates/{update_id}", dependencies=[Auth])
    def get_update(update_id: str) -> dict[str, Any]:
        return service.get_update(update_id)

    @app.post("/api/devices/{device_id}/rollback", dependencies=[Auth], status_code=201)
    async def roll_back_device(device_id: str, body: DeviceRollback) -> dict[str, Any]:
        """Ask one device to serve `to_version` again from its other slot."""
        (view,) = await service.request_rollback(body.model_name, body.to_version, [device_id], body.reason)
        return view

    @app.put("/api/devices/{device_id}/labels", dependencies=[Auth])
    def put_labels(device_id: str, body: Labels) -> dict[str, list[str]]:
        return driver.set_labels(device_id, body.groups, body.tags)

    @app.post("/api/rollouts", dependencies=[Auth], status_code=201)
    async def start_rollout(body: NewRollout) -> dict[str, Any]:
        return await driver.start(body.model_name, body.version, body.target, body.phases, body.seed)

    @app.get("/api/rollouts", dependencies=[Auth])
    def list_rollouts() -> list[dict[str, Any]]:
        return driver.all()

    @app.get("/api/rollouts/{campaign_id}", dependencies=[Auth])
    def get_rollout(campaign_id: str) -> dict[str, Any]:
        return driver.status(campaign_id)

    @app.post("/api/rollouts/{campaign_id}/{action}", dependencies=[Auth])
    async def act_on_rollout(
        campaign_id: str, action: Action, body: RolloutAction | None = None
    ) -> dict[str, Any]:
        return await driver.act(campaign_id, action, body.reason if body else "")

    @app.get("/api/maintenance-windows", dependencies=[Auth])
    def list_windows() -> list[dict[str, object]]:
        return driver.windows()

    @app.post("/api/maintenance-windows", dependencies=[Auth], status_code=201)
    def add_window(body: NewWindow) -> list[dict[str, object]]:
        return driver.add_window(body.group, body.cron, body.duration_minutes, body.tz)

    @app.delete("/api/maintenance-windows/{window_id}", dependencies=[Auth], status_code=204)
    def remove_window(window_id: Annotated[int, PathParam(ge=1, le=MAX_SQL_INT)]) -> None:
        driver.remove_window(window_id)

    return app
